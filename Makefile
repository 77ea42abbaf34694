# Clave: entry points for people and CI.  `make` alone lists the targets.
#
# The local stack (Kafka, SecantusDB, mail catcher, the services; INSTANCES=N of each) is run by
# deploy/local/stack.py through its wrapper deploy/local/stack.sh (the store, secantusd-rs, is built once with cargo into
# ~/.cache/clave on the first start, 4-8 min; STORE_ENGINE=py runs secantusd-py instead).  test/demo/bench/test-faults go through `stack.sh run -- CMD`:
# start whatever is not running yet, run CMD with the stack's environment, then stop
# exactly what was started for it (a stack you started with `make up` stays up), and
# exit with CMD's status.

SHELL       := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON      ?= python3.11
VENV        := .venv
PY          := $(VENV)/bin/python
STACK       := deploy/local/stack.sh
PYTEST_ARGS ?=
BENCH_ARGS  ?=

.PHONY: help install up down status portal test test-faults test-scale bench-scale demo bench bench-login bench-audit lint deploy-check contract contract-check docs

help: ## list the targets
	@echo "Clave make targets:"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## (.*)/  make \1\t\2/' | expand -t 20
	@echo "Variables: PYTEST_ARGS='...' (extra pytest arguments), BENCH_ARGS='--n 200 ...' (make bench), KEEP=1 (make demo),"
	@echo "           PROMETHEUS=1 (make up also starts a local Prometheus), PYTHON=$(PYTHON) (to create .venv),"
	@echo "           STORE_ENGINE=py (the Python store secantusd-py instead of secantusd-rs, which is built once with cargo)"

install: $(VENV)/.installed ## create .venv and install the project (re-runs pip only when pyproject.toml or requirements.lock changed)

$(PY):
	$(PYTHON) -m venv $(VENV)

# requirements.lock pins the transitive dependencies (pip constraints). The portal's client
# library (clients/python, package clave_portal) and the reference page (clients/page) are
# packages of their own, installed editable too (the page's dependencies are pinned in the
# dev extra).
$(VENV)/.installed: pyproject.toml requirements.lock clients/python/pyproject.toml clients/page/pyproject.toml | $(PY)
	$(PY) -m pip install -c requirements.lock -e '.[dev]' -e clients/python
	$(PY) -m pip install --no-deps -e clients/page
	@touch $@

up: install ## start the local stack (Kafka, store, mail catcher, services) and leave it running
	@$(STACK) up

down: ## stop the local stack
	@$(STACK) down

status: ## show each component of the local stack
	@$(STACK) status

# The reference recovery page (clients/page) on 127.0.0.1:$(PAGE_PORT), with the stack, as the
# portal principal; the sample accounts (deploy/local/sample/accounts.jsonl) are imported
# first, so the page can be tried at once.  Ctrl-C stops the page and what it started.
PAGE_PORT ?= 8000

portal: install ## serve the reference recovery page on 127.0.0.1:8000 with the local stack
	@PAGE_PORT=$(PAGE_PORT) $(STACK) run -- bash -c 'KAFKA_CLIENT_PROPERTIES=var/secrets/kafka/operator.properties $(PY) -m clave.cli accounts import deploy/local/sample/accounts.jsonl >/dev/null && \
	  echo "The page: http://127.0.0.1:$(PAGE_PORT)/solicitar  (sample accounts: deploy/local/sample/accounts.jsonl; mail in var/mail)" && \
	  KAFKA_CLIENT_PROPERTIES=var/secrets/kafka/portal.properties exec $(PY) -m clave_page'

# Short token lifetimes and e-mail change cooling-off when `make test` starts the services
# itself, so the expiry and approval tests take seconds (a stack already started by `make up`
# keeps its settings, and those tests then skip, saying why).
TEST_ENV := LINK_TTL_S=30 CODE_TTL_S=20 EMAIL_CHANGE_COOLING_OFF_S=10

test: install ## run the whole test suite against the real local stack
	@$(TEST_ENV) $(STACK) run -- $(PY) -m pytest -q $(PYTEST_ARGS)

test-faults: install ## run the fault tests (tests/faults, marker "faults")
	@$(STACK) run -- $(PY) -m pytest -q -m faults tests/faults $(PYTEST_ARGS)

# Several instances per service: the fault suite's scenario and checks (tests/faults/test_faults.py)
# with FAULT_PLAN=scale (one instance of every service SIGKILLed mid-load, not restarted) or
# FAULT_PLAN=none (no fault: the throughput). A stack already up with fewer instances gets the
# missing ones for the run (and loses them after). Report: $(VAR_DIR)/faults-report.json.
SCALE_N     ?= 300
SCALE_TEST  := $(PY) -m pytest -q -m faults tests/faults/test_faults.py
# A measurement, not a bounded check: on a busy machine one instance may need longer.
BENCH_SCALE_ENV := FAULT_BUDGET_S=1800 FAULT_LOAD_TIMEOUT_S=1200 FAULT_IMPORT_TIMEOUT_S=600
REPORT_DIR  := $${VAR_DIR:-var}

test-scale: install ## scale test: 2 instances of every service, SCALE_N=300 recoveries, one instance of each SIGKILLed mid-load
	@INSTANCES=2 FAULT_PLAN=scale FAULT_N=$(SCALE_N) $(STACK) run -- $(SCALE_TEST) $(PYTEST_ARGS)

bench-scale: install ## recoveries/s with 1, then 2 instances of every service (SCALE_N recoveries, no fault)
	@for n in 1 2; do \
	  INSTANCES=$$n FAULT_PLAN=none FAULT_N=$(SCALE_N) $(BENCH_SCALE_ENV) $(STACK) run -- $(SCALE_TEST) $(PYTEST_ARGS) || exit 1; \
	  cp "$(REPORT_DIR)/faults-report.json" "$(REPORT_DIR)/scale-$$n.json"; \
	done; \
	for n in 1 2; do \
	  $(PY) -c 'import json, sys; r = json.load(open(sys.argv[1])); print("%s instance(s) per service: %s recoveries/s (%s in %.1f s, load average %s)" % (r["instances"], r["throughput_per_s"], r["n"], r["load_seconds"], r.get("loadavg_1m")))' "$(REPORT_DIR)/scale-$$n.json"; \
	done

# KEEP=1: start the stack with `up` first, so that `run` started nothing and stops nothing.
KEEP ?=
demo: install ## run one recovery end to end, as the portal would (KEEP=1: leave the stack running)
	@if [[ "$(KEEP)" == 1 ]]; then $(STACK) up; fi
	@$(STACK) run -- $(PY) -m tools.demo

bench: install ## throughput/latency benchmark against the local stack
	@$(STACK) run -- $(PY) -m tools.bench $(BENCH_ARGS)

bench-login: install ## login idle latency (p50/p95/p99, target p99 <= 100 ms) against the local stack
	@$(STACK) run -- $(PY) -m tools.bench_login $(BENCH_ARGS)

bench-audit: install ## memory and speed of `clave audit verify` on 10,000 and 100,000 signed events (no stack)
	@$(PY) -m tools.bench_audit

lint: install ## ruff + mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy shared services clave tools deploy/local clients/python/clave_portal clients/page/clave_page

# The deployment files (deploy/docker, deploy/compose, deploy/helm) without a Docker
# engine or a cluster: helm lint and template (helm built once from the Go module proxy
# into ~/.cache/clave), the compose file against the compose-spec schema, then the tests
# that check them against the code (also part of `make test`).
CHART := deploy/helm/clave

deploy-check: install ## check the Dockerfile, compose file and Helm chart (no Docker, no cluster)
	@helm=$$(bash deploy/helm/ensure_helm.sh) && $$helm lint --strict $(CHART) && \
	  $$helm template clave $(CHART) --kube-version 1.31.0 >/dev/null && echo "helm template: ok"
	$(VENV)/bin/check-jsonschema --builtin-schema vendor.compose-spec deploy/compose/compose.yaml
	$(PY) -m pytest -q tests/unit/test_deploy_files.py $(PYTEST_ARGS)

# The topic contract: docs/asyncapi.yaml (AsyncAPI 3.0) is made from the code by `clave contract`
# (clave/asyncapi.py). `contract-check` compares it with the code and runs the AsyncAPI project's
# own parser on it; `docs` renders it with the project's html-template. The Node packages are
# pinned in docs/package-lock.json and installed by `npm ci` without install scripts
# (docs/.npmrc): the parser alone for the check, the generator and template for `docs`.
DOCS_HTML := var/docs

docs/node_modules/.validator: docs/package-lock.json
	cd docs && npm ci --omit=dev
	@touch $@

docs/node_modules/.renderer: docs/package-lock.json
	cd docs && npm ci
	@touch $@ docs/node_modules/.validator

contract: install ## regenerate docs/asyncapi.yaml from the code (then commit it)
	$(VENV)/bin/clave contract

contract-check: install docs/node_modules/.validator ## docs/asyncapi.yaml is the code's contract and a valid AsyncAPI document
	$(VENV)/bin/clave contract --check
	node docs/validate.mjs

docs: install docs/node_modules/.renderer contract-check ## render the topic contract to HTML: var/docs/index.html
	node docs/render.mjs docs/asyncapi.yaml $(DOCS_HTML)
