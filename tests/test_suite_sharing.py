"""The suite's own machinery (tests/conftest.py): a SharedResource starts for the first test that asks for
it, stays up through tests that don't while a later one will, and stops right after the last one; the
module's tests stay together on one xdist worker (its group). Run alone or under ``-n 2 --dist loadgroup``.
"""

from __future__ import annotations

import contextlib

import conftest
import pytest
from conftest import SharedResource

# A resource only this module uses, registered before the collection hook reads the table.
conftest.SHARED_FIXTURES["suite_probe"] = "suite-probe"
EVENTS: list[str] = []


@contextlib.contextmanager
def _probe_running():
    EVENTS.append("start")
    yield "probe handle"
    EVENTS.append("stop")


PROBE = SharedResource("suite_probe", _probe_running)


@pytest.fixture
def suite_probe():
    return PROBE.get()


def test_first_user_starts_it(suite_probe):
    assert suite_probe == "probe handle" and EVENTS == ["start"]


def test_it_stays_up_between_users():
    assert EVENTS == ["start"] and PROBE.running


def test_a_later_user_gets_the_same_one(suite_probe):
    assert suite_probe == "probe handle" and EVENTS == ["start"] and PROBE.starts == 1


def test_it_stopped_after_its_last_user():
    assert EVENTS == ["start", "stop"] and not PROBE.running and PROBE.starts == 1
