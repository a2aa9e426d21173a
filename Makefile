# Two commands set everything up on a fresh machine:
#   make demo   creates .venv, installs simret, runs the offline demo on embedded data
#   make test   creates .venv, installs simret with its dev extras, runs the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.simret-installed
DEMO_OUT ?= demo-out

.PHONY: demo test bench lint clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m simret demo --out $(DEMO_OUT)

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) scripts/bench.py

lint: $(STAMP)
	$(VENV)/bin/ruff check simret scripts tests

clean:
	rm -rf $(VENV) $(DEMO_OUT) build *.egg-info
