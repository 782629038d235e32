# imstream — the two commands the README promises, and the pieces they are made of.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test lint stack-up stack-down clean browser certs

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "imstream needs Python 3.11+, found " + sys.version.split()[0])'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --constraint constraints.txt --editable ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

# The main job on the embedded local stack (Ctrl-C stops everything it started).
run: install
	$(BIN)/imstream up

# Lint, types, then the whole suite against the real local stack (started if it is not running).
test: install lint browser
	$(BIN)/imstream stack up
	$(BIN)/pytest

# Headless Chromium for the dashboards test (tests/dashboards): Debian's package, installed
# once when missing (needs root or sudo and the Debian archive).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium; }

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	@if docker compose version >/dev/null 2>&1; then \
		env $$($(BIN)/python -c 'from pipelines.certs_cli import COMPOSE_SECRETS; print(" ".join(n + "=x" for n in COMPOSE_SECRETS))') \
			docker compose config --quiet; \
	else echo "docker compose plugin not installed: compose.yaml checked by tests/test_compose.py only"; fi

# compose.yaml's development CA, certificates and passwords, in compose/certs/ (git-ignored):
# then `docker compose --env-file compose/certs/passwords.env up`.
certs: install
	$(BIN)/imstream certs --out compose/certs

stack-up: install
	$(BIN)/imstream stack up

stack-down: install
	$(BIN)/imstream stack down

clean: stack-down
	rm -rf .imstream $(VENV)
