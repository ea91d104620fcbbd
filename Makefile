# The project's one entry point; the README's two commands and .ci/run call it.
#   make demo   install into .venv and run the embedded demo
#   make test   install into .venv (with test tools) and run lint + the test suite
PYTHON ?= python3
VENV   ?= .venv
# A CPU build of torch is enough for everything here; it is installed first, pinned, so that
# no other requirement pulls a newer multi-GB CUDA build. On Linux, PyPI's own torch wheel is
# the CUDA one: where PyTorch's CPU index is reachable, ask for it with
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
# On a GPU machine: make demo TORCH="torch"
TORCH  ?= torch==2.13.0
TORCH_INDEX ?=
TORCH_ARGS := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: demo test install install-test lint bench-queue clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

install: $(PY)
	$(PIP) install -q $(TORCH_ARGS) "$(TORCH)"
	$(PIP) install -q -e .

install-test: $(PY)
	$(PIP) install -q $(TORCH_ARGS) "$(TORCH)"
	$(PIP) install -q -e ".[test]"

demo: install
	$(VENV)/bin/interpq demo

lint: install-test
	$(VENV)/bin/ruff check interpq tests benchmarks
	$(VENV)/bin/ruff format --check interpq tests benchmarks
	$(VENV)/bin/lint-imports

test: install-test lint
	$(PY) -m pytest -q -p no:cacheprovider

bench-queue: install
	$(PY) benchmarks/queue_overhead.py

clean:
	rm -rf $(VENV) interpq-demo interpq-stack interpq-beat-schedule* *.egg-info
