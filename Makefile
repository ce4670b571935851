# The two commands of the README: `make run` (the main job on generated data) and `make test`.
# Both create the virtual environment first when it is absent (or when pyproject.toml changed).

PYTHON ?= python3
VENV ?= .venv
# PyTorch requirement; CI pins the build it has on local disk (see .ci/run).
TORCH ?= torch>=2.4 torchvision>=0.19
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Python writes byte-code even where the environment says not to (PYTHONDONTWRITEBYTECODE=1): with
# it, every process (each notebook kernel, each test subprocess) compiled this package's modules
# again. pip byte-compiles the dependencies at install: lazily, on first import (--no-compile), a
# fresh clone's suite took 657 s instead of about 520 s.
export PYTHONDONTWRITEBYTECODE :=

.PHONY: setup run test clean-outputs

setup: $(STAMP)

# (a set-up stopped while the environment was being created leaves a python without pip: made again)
$(STAMP): pyproject.toml
	$(BIN)/python -m pip --version >/dev/null 2>&1 || { rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install --quiet $(foreach req,$(TORCH),'$(req)') -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m helpers.pipeline --profile smoke --out outputs/smoke

# Two phases: everything but the `serial` tests on TEST_WORKERS pytest-xdist workers (each with its
# share of the cores: conftest.py), then the tests that measure wall time, alone on the machine.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) -m "not serial" --nbval-lax tests notebooks
	$(BIN)/python -m pytest -q -m serial tests

clean-outputs:
	rm -rf outputs/smoke
