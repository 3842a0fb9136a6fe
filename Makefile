# Every target that needs Python installs the project first (into .venv) if it is not installed yet.
PY      ?= python3
VENV    := .venv
PYTHON  := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

.PHONY: install test reproduce-table1 bench embedded-model clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(PYTHON) -m pytest -q tests

# Main job (embedded default, offline). Until the table pipeline lands it explains example pairs.
reproduce-table1: $(STAMP)
	$(PYTHON) scripts/explain_examples.py

bench: $(STAMP)
	$(PYTHON) scripts/bench_m2ib.py

clean:
	rm -rf $(VENV) .pytest_cache
