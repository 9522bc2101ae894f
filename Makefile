# Two entry points: `make train` (the default recipe) and `make test` (the test suite).
# Both create and reuse a virtual environment in .venv; pass Hydra overrides with ARGS="...".
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# `make train` installs the package alone; the test targets add the dev extra (pytest, ruff,
# and the optional search / onnx extras the tests exercise)
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: train test test-slow test-all lint format clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(DEV_STAMP)

train: $(STAMP)
	$(PY) -m ssd_lightning.train $(ARGS)

test: lint
	$(PY) -m pytest $(ARGS)

test-slow: $(DEV_STAMP)
	$(PY) -m pytest -m slow $(ARGS)

test-all: $(DEV_STAMP)
	$(PY) -m pytest -m '' $(ARGS)

lint: $(DEV_STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(DEV_STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean-venv:
	rm -rf $(VENV)
