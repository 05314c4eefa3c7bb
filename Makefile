# The two fresh-machine commands from the README. Each installs what it needs first.
#
# Python: inside an active virtualenv (or conda env) make uses it; otherwise it creates .venv from
# $(SYSTEM_PYTHON) and uses that, so a system Python that refuses pip (PEP 668: Debian 12, Ubuntu 24.04)
# is never asked to install anything. PYTHON=... overrides both.
SYSTEM_PYTHON ?= python3
IN_VENV := $(shell $(SYSTEM_PYTHON) -c 'import os, sys; print(int(sys.prefix != sys.base_prefix or "CONDA_PREFIX" in os.environ))' 2>/dev/null)
ifeq ($(IN_VENV),1)
PYTHON ?= $(SYSTEM_PYTHON)
else
PYTHON ?= .venv/bin/python
# Recipes run as if .venv were activated: Ray's job entrypoints and workers that say `python` get it.
export PATH := $(CURDIR)/.venv/bin:$(PATH)
export VIRTUAL_ENV := $(CURDIR)/.venv
endif
# import-linter's `lint-imports`, run with this Python (the layer contracts are in pyproject.toml).
LINT_IMPORTS = $(PYTHON) -c "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports())"
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_INSTALL = $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq

.PHONY: install python browser demo test test-fast lint bench

# .venv when make is not run inside a virtualenv. Debian and Ubuntu ship venv's ensurepip separately
# (python3-venv); it is installed only when creating the venv fails without it.
python:
	@if [ "$(PYTHON)" = .venv/bin/python ] && [ ! -x .venv/bin/python ]; then \
	  $(SYSTEM_PYTHON) -m venv .venv 2>/dev/null || { rm -rf .venv; \
	    $(APT_INSTALL) python3-venv && $(SYSTEM_PYTHON) -m venv .venv; }; fi

# System FFmpeg libraries for torchcodec (PyAV bundles its own; ldconfig lives in /sbin, off a Debian user's
# PATH), then the package with dev tools, at the
# tested versions (deploy/constraints.txt: the whole closure, so pip's resolver never backtracks).
install: python
	@if ! { ldconfig -p 2>/dev/null || /sbin/ldconfig -p; } | grep -q libavcodec; then \
	  $(APT_INSTALL) ffmpeg; fi
	$(PYTHON) -m pip install -q -e ".[dev]" -c deploy/constraints.txt

# The main job: the whole pipeline on local Ray on a synthetic corpus (report in runs/demo/report.html),
# ending with the search page served over its index at http://127.0.0.1:8000/ (Ctrl-C stops it;
# `make demo DEMO_FLAGS=--no-serve` ends after the report, `DEMO_FLAGS="--port 8080"` picks another port).
demo: install
	$(PYTHON) -m jobs.demo --workdir runs/demo $(DEMO_FLAGS)

# Debian's Chromium for the search page's browser test (tests only: the image and the demo don't need it).
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
	  $(APT_INSTALL) chromium; fi

# pytest-xdist workers: the modules run two at a time, each module (or each group of modules sharing a
# cluster) on one worker, the slow groups first (tests/conftest.py); TEST_WORKERS=0 runs them in one process.
TEST_WORKERS ?= 2
PYTEST_WORKERS = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadgroup)

# The whole test suite, slow end-to-end tests included (CI runs this via .ci/run).
test: install browser
	$(PYTHON) -m ruff check .
	$(LINT_IMPORTS)
	$(PYTHON) -m pytest -q --timeout=900 --durations=30 $(PYTEST_WORKERS) tests

test-fast: install browser
	$(PYTHON) -m pytest -q $(PYTEST_WORKERS) -m "not slow" tests

lint:
	$(PYTHON) -m ruff check .
	$(LINT_IMPORTS)
