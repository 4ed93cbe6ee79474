# waardhaven-tasks: every target installs what it needs into .venv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
UV_VERSION := 0.13.8
IMAGE ?= localhost/waardhaven-tasks:dev
# The Celery exporter pins redis<6 and ships a package named `src`: it gets a venv of its own.
EXPORTER_VENV ?= .venv-exporter

.PHONY: help venv exporter-venv run test test-fast lint bench chaos image manifests rules lock clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | column -t -s $$'\t'

$(BIN)/.installed: requirements/base.lock requirements/dev.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check uv==$(UV_VERSION)
	$(BIN)/uv pip install -q --python $(BIN)/python -r requirements/base.lock -r requirements/dev.lock
	$(BIN)/uv pip install -q --python $(BIN)/python --no-deps -e .
	touch $@

venv: $(BIN)/.installed ## create .venv with the pinned dependencies

$(EXPORTER_VENV)/.installed: services/exporter/requirements.lock $(BIN)/.installed
	test -x $(EXPORTER_VENV)/bin/python || $(PYTHON) -m venv $(EXPORTER_VENV)
	$(BIN)/uv pip install -q --python $(EXPORTER_VENV)/bin/python -r services/exporter/requirements.lock
	touch $@

exporter-venv: $(EXPORTER_VENV)/.installed ## create .venv-exporter for services/exporter (queue metrics)

run: venv ## start the whole stack locally (Redis, SQLite, workers, beat, Flower, API); Ctrl-C stops it
	$(BIN)/waardhaven-tasks dev

test-fast: venv ## the pure tests (tests/unit): seconds, no Redis, no PostgreSQL
	$(BIN)/pytest tests/unit -q $(PYTEST_ARGS)

test: venv exporter-venv ## run the whole test suite
	$(BIN)/pytest --durations=30 $(PYTEST_ARGS)

lint: venv ## ruff and mypy
	$(BIN)/ruff check
	$(BIN)/ruff format --check
	$(BIN)/mypy

bench: venv ## benchmarks against same-run baselines; prints a table, writes bench/results.json
	$(BIN)/python bench/run.py

chaos: venv ## fault scenarios (kills, restarts, outages, bad input); prints the reliability table
	$(BIN)/python scripts/chaos.py

image: ## build the container image with buildah (or docker where one runs); IMAGE=name:tag
	IMAGE=$(IMAGE) scripts/build-image.sh

manifests: venv rules ## render the chart into deploy/k8s (plain manifests + kustomization.yaml)
	$(BIN)/python scripts/render-manifests.py

rules: venv ## regenerate deploy/prometheus/alerts.yaml from the chart's rules and thresholds
	$(BIN)/python tests/observability/render_rules.py

lock: ## re-pin requirements/*.lock from requirements/*.in
	$(PYTHON) -m pip install -q uv==$(UV_VERSION) --target .lock-tools && \
	cd requirements && PYTHONPATH=../.lock-tools ../.lock-tools/bin/uv pip compile -q --python-version 3.11 base.in -o base.lock && \
	PYTHONPATH=../.lock-tools ../.lock-tools/bin/uv pip compile -q --python-version 3.11 dev.in -o dev.lock
	rm -rf .lock-tools

clean: ## remove the venv and local state
	rm -rf $(VENV) $(EXPORTER_VENV) var
