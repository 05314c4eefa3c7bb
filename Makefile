# The two fresh-machine commands from the README. Each installs what it needs first.
PYTHON ?= python3
# import-linter's `lint-imports`, run with this Python (the layer contracts are in pyproject.toml).
LINT_IMPORTS = $(PYTHON) -c "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports())"
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install browser demo test test-fast lint bench

# System FFmpeg libraries for torchcodec (PyAV bundles its own), then the package with dev tools, at the
# tested versions (deploy/constraints.txt: the whole closure, so pip's resolver never backtracks).
install:
	@if ! ldconfig -p | grep -q libavcodec; then \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq ffmpeg; fi
	$(PYTHON) -m pip install -q -e ".[dev]" -c deploy/constraints.txt

# The main job: the whole pipeline on local Ray on a synthetic corpus (report in runs/demo/report.html),
# ending with the search page served over its index at http://127.0.0.1:8000/ (Ctrl-C stops it;
# `make demo DEMO_FLAGS=--no-serve` ends after the report, `DEMO_FLAGS="--port 8080"` picks another port).
demo: install
	$(PYTHON) -m jobs.demo --workdir runs/demo $(DEMO_FLAGS)

# Debian's Chromium for the search page's browser test (tests only: the image and the demo don't need it).
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium; fi

# The whole test suite, slow end-to-end tests included (CI runs this via .ci/run).
test: install browser
	$(PYTHON) -m ruff check .
	$(LINT_IMPORTS)
	$(PYTHON) -m pytest -q --timeout=900 tests

test-fast: install browser
	$(PYTHON) -m pytest -q -m "not slow" tests

lint:
	$(PYTHON) -m ruff check .
	$(LINT_IMPORTS)
