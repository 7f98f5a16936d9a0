# The two commands of the README: `make demo` (run it) and `make test` (test it).
# Everything else here is a step they depend on.

PYTHON ?= $(shell command -v python3.13 || command -v python3.12 || command -v python3.11 || command -v python3)
PYTHON39 ?= $(shell command -v python3.9 2>/dev/null)
VENV := .venv
VENV39 := .venv39
DEMO_VMS ?= 5

.PHONY: demo up test test-guest lint typecheck schemas bench clean help

help:
	@echo "make demo       embedded NATS + all services + $(DEMO_VMS) lab VMs (Ctrl-C stops all)"
	@echo "make test       the test suite (host services on 3.11+, guest code also on 3.9)"
	@echo "make lint       ruff + mypy (as CI runs them)"
	@echo "make schemas    regenerate schemas/*.json from the contract"

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "guestbus needs Python 3.11+ (found " + sys.version.split()[0] + "); set PYTHON=/path/to/python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[dev]'
	@touch $@

# Guest-side code (guestbus.wire, the agent) must run on CPython 3.9: test it there too.
$(VENV39)/.installed:
	@if [ -n "$(PYTHON39)" ]; then \
		$(PYTHON39) -m venv $(VENV39) && \
		$(VENV39)/bin/python -m pip install -q --upgrade pip && \
		$(VENV39)/bin/python -m pip install -q pytest hypothesis pytest-timeout pyserial-asyncio && \
		touch $@; \
	else echo "note: no python3.9 found: guest-side tests run on $(PYTHON) only"; fi

demo up: $(VENV)/.installed
	$(VENV)/bin/guestbus up --demo $(DEMO_VMS)

test: $(VENV)/.installed $(VENV39)/.installed
	$(VENV)/bin/python -m pytest -q
	@if [ -f $(VENV39)/.installed ]; then \
		echo "== guest-side tests on $$($(VENV39)/bin/python --version)"; \
		PYTHONPATH=src:agent $(VENV39)/bin/python -m pytest -q --noconftest -o addopts='-p no:cacheprovider' tests/wire $(wildcard tests/guest39); \
	fi

lint typecheck: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy --python-version 3.9 src/guestbus/wire agent

schemas: $(VENV)/.installed
	$(VENV)/bin/guestbus schemas --write

clean:
	rm -rf $(VENV) $(VENV39) .mypy_cache .ruff_cache
