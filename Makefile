# smolcluster: every target sets up .venv first (idempotent; a no-op when nothing changed).
PYTHON ?= python3
VENV   ?= .venv
GRAFANA_PASSWORD_FILE := observability/.grafana-admin-password
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed.stamp
ARGS   ?=
CLUSTER ?= lan-example
SWEEP   ?= algo=syncps,edp train.lr=0.02,0.05
PYTEST_ARGS ?=

.PHONY: help install node top train train-gpt2 train-edp train-mp infer chat test test-deps lint bench keys clean launch cluster-check sweep observability-up observability-down

help:  ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-20s %s\n", $$1, $$2}'

install: $(STAMP)  ## create .venv and install smolcluster with its dev tools

$(STAMP): pyproject.toml scripts/install.sh
	PYTHON=$(PYTHON) VENV=$(VENV) sh scripts/install.sh
	touch $(STAMP)

train: install  ## train the default model on embedded digits (ARGS="key=value ..." to override)
	$(BIN)/python -m smolcluster.train $(ARGS)

train-gpt2: install  ## gpt2-tiny on the embedded text corpus
	$(BIN)/python -m smolcluster.train model=gpt2-tiny data=text train.optimizer=adamw train.lr=3e-3 train.batch_size=16 train.steps=300 train.eval_every=100 $(ARGS)

train-edp: install  ## EDP (asynchronous PS) with 2 workers, one made 3x slower
	$(BIN)/python -m smolcluster.train algo=edp "cluster.nodes=[{delay_s: 0.01},{delay_s: 0.03}]" $(ARGS)

train-mp: install  ## model parallel: gpt2-tiny split into 2 pipeline stages, 4 micro-batches
	$(BIN)/python -m smolcluster.train algo=mp model=gpt2-tiny data=text train.optimizer=adamw train.lr=3e-3 train.batch_size=16 algo.microbatches=4 train.steps=200 $(ARGS)

infer: install  ## stream text from gpt2-tiny through 2 pipeline stages (ARGS="checkpoint=RUN_DIR prompt=...")
	$(BIN)/python -m smolcluster.infer prompt="The meaning of life is" max_new_tokens=40 $(ARGS)

chat: install  ## Gradio chat + OpenAI-compatible API on gpt2-tiny in 2 local stages (ARGS="checkpoint=RUN_DIR serve.port=8000")
	$(BIN)/python -m smolcluster.chat $(ARGS)

node: install  ## the node agent for cluster=auto (ARGS="--port 5660"); confirm a pairing: python -m smolcluster.node pair CODE (on both machines)
	$(BIN)/python -m smolcluster.node $(ARGS)

top: install  ## live terminal view of a run: make top ARGS="--run-dir RUN_DIR" (nodes need logging.prometheus.port=0 or N)
	$(BIN)/python -m smolcluster.top $(ARGS)

keys: install  ## CURVE keys for a cluster into keys/ (then cluster.keys=keys)
	$(BIN)/python -m smolcluster.keys --dir keys $(ARGS)

launch: install  ## start a cluster file's roles on their hosts over SSH: make launch CLUSTER=NAME|FILE ARGS="algo=edp"
	$(BIN)/python -m launchers.ssh launch --cluster $(CLUSTER) $(ARGS)

cluster-check: install  ## preflight every node of a cluster file: make cluster-check CLUSTER=NAME|FILE
	$(BIN)/python -m launchers.ssh check --cluster $(CLUSTER) $(ARGS)

sweep: install  ## Hydra multirun + sweep.md/sweep.csv: make sweep SWEEP="algo=syncps,edp train.lr=0.02,0.05"
	$(BIN)/python -m smolcluster.train -m $(SWEEP) $(ARGS)

observability-up:  ## start Loki + Grafana + Prometheus on this machine's loopback (docker compose); print the URLs
	@test -n "$$GRAFANA_ADMIN_PASSWORD" || test -s $(GRAFANA_PASSWORD_FILE) || \
	  (umask 077 && $(PYTHON) -c "import secrets; print(secrets.token_urlsafe(18))" > $(GRAFANA_PASSWORD_FILE))
	GRAFANA_ADMIN_PASSWORD="$${GRAFANA_ADMIN_PASSWORD:-$$(cat $(GRAFANA_PASSWORD_FILE))}" docker compose -f observability/docker-compose.yml up -d
	@echo "Grafana:    http://localhost:3000  (dashboard smolcluster; user admin, password \$$GRAFANA_ADMIN_PASSWORD or the one generated in $(GRAFANA_PASSWORD_FILE))"
	@echo "Loki:       http://localhost:3100"
	@echo "Prometheus: http://localhost:9090  (scrapes 127.0.0.1:9400-9405 + observability/targets.json)"
	@echo "train with: logging.loki.url=http://localhost:3100 logging.prometheus.port=9400"
	@echo "  (all three listen on loopback only; other machines: see docs/logging.md, Exposing the endpoints)"

observability-down:  ## stop the observability stack (its data volumes are kept)
	docker compose -f observability/docker-compose.yml down

test-deps:  ## system packages the tests use (chromium, sshd, iproute2, prometheus); skipped when present
	sh scripts/test-deps.sh

test: install test-deps  ## run the test suite
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install  ## ruff
	$(BIN)/ruff check smolcluster tests launchers

bench: install  ## run a benchmark: make bench NAME=local (list: python -m smolcluster.bench)
	$(BIN)/python -m smolcluster.bench $(or $(NAME),local) $(ARGS)

clean:  ## remove run outputs and caches (keeps .venv)
	rm -rf runs outputs multirun bench-*.json .pytest_cache .ruff_cache .hypothesis build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
