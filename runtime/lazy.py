"""Names a package exports from submodules that load on first use (PEP 562's module ``__getattr__``).

A package whose ``__init__`` imports every submodule makes each importer pay for all of them; Ray's workers
import a function's whole package to run it, and a light task should not load torch for a stage it never
runs. The package lists those names and the submodule each comes from::

    __getattr__ = exports_on_first_use(__name__, {"EncodeClipsStage": "stages"}, globals())
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def exports_on_first_use(package: str, submodule_of: Mapping[str, str],
                         namespace: dict[str, Any]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: name → ``package.<submodule_of[name]>.<name>``, imported on
    first access and then kept in ``namespace`` (the package's globals), so it is looked up once."""

    def __getattr__(name: str) -> Any:
        submodule = submodule_of.get(name)
        if submodule is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{submodule}"), name)
        namespace[name] = value
        return value

    return __getattr__
