# Unified Ads Integration Backend — every target sets itself up (venv, install, store jars) idempotently.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DATA   ?= data

.PHONY: help setup test demo demo-once sandbox store bench clean-data

help:
	@echo "make demo       store + sandbox + portal + Dagster UI (daemon included), demo user printed"
	@echo "make demo-once  headless: sign up, OAuth consent, sync through Dagster, verify, exit"
	@echo "make test       the test suite (starts its own store and sandbox)"
	@echo "make sandbox    only the offline platform sandbox"
	@echo "make store      only the embedded MongoDB-wire store"
	@echo "make bench      the benchmarks (QUICK=1 for a short run)"
	@echo "make clean-data remove data/ (store file, keys, Dagster instance, sandbox state)"

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required (set PYTHON=python3.11)")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/unified-ads demo

demo-once: $(STAMP)
	$(VENV)/bin/unified-ads demo --once

sandbox: $(STAMP)
	$(VENV)/bin/unified-ads sandbox

store: $(STAMP)
	$(VENV)/bin/unified-ads store

bench: $(STAMP)
	$(PY) -m benchmarks $(if $(QUICK),--quick,)

clean-data:
	rm -rf $(DATA)
