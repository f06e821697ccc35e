# Two commands set everything up on a fresh machine:
#   make demo   creates .venv, installs the pinned requirements, trains demo_tiny
#   make test   creates .venv, installs, runs ruff and pytest
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo
PYTEST_WORKERS ?= 2

.PHONY: demo test lint format install clean

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	rm -rf $(DEMO_DIR)/run
	$(PY) scripts/train.py --config=configs/demo_tiny.py --workdir=$(DEMO_DIR)/run

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint
	$(PY) -m pytest -n $(PYTEST_WORKERS) -q tests

clean:
	rm -rf $(VENV) $(DEMO_DIR)
