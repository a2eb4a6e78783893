# Two commands for a newcomer: `make demo` and `make test`. Both create/refresh .venv and are idempotent.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The one place torch is chosen. On the dev/CI machines `torch==2.13.0` resolves to a local CPU wheel;
# GPU users can run `make TORCH_SPEC=torch install` (or install their CUDA build first).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: install
	$(BIN)/swarm demo

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV)
