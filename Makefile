# freshrec — the two commands a new user needs are `make run` and `make test`.
# Everything is installed from this repository's own files into .venv; the Kafka broker's jars are
# resolved by Maven from freshrec/resources/kafka-pom.xml and cached under ~/.cache/freshrec.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: tools go venv browser run test check lint typecheck bench broker-start broker-stop clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

## Debian's chromium, for the dashboard's headless-browser test (apt; sudo when not root).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the dashboard's browser test"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium \
	  || { $$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium; }; }

## Go, for tests/compose_check (compose-go, Docker Compose's own loader, validates docker-compose.yml).
go:
	@command -v go >/dev/null 2>&1 || test -x /usr/local/go/bin/go || { \
	  echo "installing Debian's Go for the compose-file check"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends golang-go \
	  || { $$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends golang-go; }; }

## Debian's kcat and promtool (package prometheus), for the tests that use freshrec as its users' tools do.
tools:
	@command -v kcat >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || { \
	  echo "installing Debian's kcat and prometheus (promtool) for the external-tool tests"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends kcat prometheus \
	  || { $$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends kcat prometheus; }; }

## Start the local broker, replay ml-100k into the embedded ClickHouse, then count it, fine-tune once
## and show three users' top 10 (about two minutes on a fresh machine).
run: venv
	$(BIN)/freshrec run --dataset ml-100k --until-idle 5 --show 3

## Unit and integration tests against the real broker, the embedded ClickHouse (chDB) and chromium.
test: venv browser go tools
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff format --check freshrec streams learners publishers serving evaluation freshrec_app tests bench
	$(BIN)/ruff check freshrec streams learners publishers serving evaluation freshrec_app tests bench
	$(BIN)/lint-imports

typecheck: venv
	$(BIN)/mypy

## Format check, lint, the layers (import-linter), strict typing, then the tests.
check: lint typecheck test

## Sink throughput against its baselines (see docs/benchmarks.md).
bench: venv
	$(BIN)/python bench/sink_throughput.py

broker-start: venv
	$(BIN)/freshrec broker start

broker-stop: venv
	$(BIN)/freshrec broker stop

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
