# The two commands of the README: `make demo` (run it) and `make test` (test it).
# Everything else here is a step they depend on.

# The first interpreter that really runs (pyenv shims may exist for versions that are not
# active) and is new enough: 3.11+ for the services, exactly 3.9 for the guest-side tests.
find_python = $(shell for c in $(1); do $$c -c 'import sys; sys.exit(0 if $(2) else 1)' >/dev/null 2>&1 && { command -v $$c; break; }; done)
PYTHON ?= $(call find_python,python3 python3.13 python3.12 python3.11 $(wildcard $(HOME)/.pyenv/versions/3.1[123]*/bin/python3),sys.version_info >= (3, 11))
PYTHON39 ?= $(call find_python,python3.9 $(wildcard $(HOME)/.pyenv/versions/3.9*/bin/python3.9) /usr/bin/python3.9,sys.version_info[:2] == (3, 9))
VENV := .venv
VENV39 := .venv39
DEMO_VMS ?= 5

.PHONY: demo up test test-guest tools lint typecheck schemas bench clean help e2e e2e-deps

help:
	@echo "make demo       embedded NATS + all services + $(DEMO_VMS) lab VMs (Ctrl-C stops all)"
	@echo "make test       the test suite (host services on 3.11+, guest code also on 3.9)"
	@echo "make lint       ruff + mypy (as CI runs them)"
	@echo "make e2e        the real-hypervisor tier: libvirt/QEMU guests (root; installs its apt packages)"
	@echo "make schemas    regenerate schemas/*.json from the contract"

$(VENV)/.installed: pyproject.toml
	@test -n "$(PYTHON)" || { echo "guestbus needs Python 3.11+: none found; set PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[dev]'
	@touch $@

# Guest-side code (guestbus.wire, the agent) must run on CPython 3.9: test it there too.
$(VENV39)/.installed:
	@if [ -n "$(PYTHON39)" ]; then \
		$(PYTHON39) -m venv $(VENV39) && \
		$(VENV39)/bin/python -m pip install -q --upgrade pip && \
		$(VENV39)/bin/python -m pip install -q pytest hypothesis pytest-timeout pyserial-asyncio cryptography 'mypy<2' && \
		touch $@; \
	else echo "note: no python3.9 found: guest-side tests run on $(PYTHON) only"; fi

# The ISO tests read images back with independent readers (isoinfo from genisoimage, and
# xorriso); the agent's quiesce and restore tests freeze and mount real loop-device file
# systems (mkfs.ext4, losetup, blkid, parted, partx). As root on Debian/Ubuntu they are
# installed here, otherwise we say what to install.
TEST_TOOLS := isoinfo xorriso mkfs.ext4 losetup blkid parted partx
TEST_APT := genisoimage xorriso e2fsprogs util-linux parted
tools:
	@missing=""; for t in $(TEST_TOOLS); do command -v $$t >/dev/null 2>&1 || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing $(TEST_APT) (for:$$missing)"; \
			apt-get install -y -q $(TEST_APT) >/dev/null 2>&1 || \
			{ apt-get update -q >/dev/null && apt-get install -y -q $(TEST_APT) >/dev/null; }; \
		else echo "the tests need$$missing: apt-get install $(TEST_APT)"; exit 1; fi; \
	fi

demo up: $(VENV)/.installed
	$(VENV)/bin/guestbus up --demo $(DEMO_VMS)

test: $(VENV)/.installed $(VENV39)/.installed tools
	$(VENV)/bin/python -m pytest -q
	@if [ -f $(VENV39)/.installed ]; then \
		echo "== guest-side tests on $$($(VENV39)/bin/python --version)"; \
		PYTHONPATH=src:agent $(VENV39)/bin/python -m pytest -q --noconftest -o addopts='-p no:cacheprovider' tests/wire tests/agent; \
	fi

# The real-hypervisor tier (e2e/README.md): Debian guests under libvirt/QEMU (TCG) with the
# services, as root. Missing packages are installed with apt (as `tools` does); a machine that
# cannot run the tier fails here with the reason, it is never skipped.
E2E_APT := libvirt-daemon-system qemu-system-x86 qemu-utils libvirt-dev pkg-config debootstrap \
	genisoimage e2fsprogs gcc python3-dev
E2E_TOOLS := libvirtd virtlogd qemu-system-x86_64 qemu-img debootstrap genisoimage mke2fs pkg-config gcc
# libvirtd, virtlogd and debootstrap live in sbin, which a non-login root shell may lack.
e2e e2e-deps: export PATH := $(PATH):/usr/sbin:/sbin
e2e-deps:
	@if [ "$$(id -u)" != 0 ]; then \
		echo "make e2e: the real-hypervisor tier needs root (libvirtd, QEMU's sockets, debootstrap): sudo make e2e"; \
		exit 1; fi
	@missing() { m=""; for t in $(E2E_TOOLS); do command -v $$t >/dev/null 2>&1 || m="$$m $$t"; done; \
		pkg-config --exists libvirt 2>/dev/null || m="$$m libvirt.pc"; echo "$$m"; }; \
	need=$$(missing); \
	if [ -n "$$need" ]; then \
		command -v apt-get >/dev/null 2>&1 || { echo "make e2e: missing$$need; install: $(E2E_APT)"; exit 1; }; \
		echo "make e2e: installing $(E2E_APT) (for:$$need)"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -q $(E2E_APT) >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null && apt-get install -y -q $(E2E_APT) >/dev/null; } || \
		{ echo "make e2e: apt-get install $(E2E_APT) failed"; exit 1; }; \
		need=$$(missing); \
		if [ -n "$$need" ]; then echo "make e2e: still missing after apt-get:$$need"; exit 1; fi; \
	fi

e2e: $(VENV)/.installed e2e-deps
	@$(VENV)/bin/python -c 'import libvirt' 2>/dev/null || { \
		echo "make e2e: installing the e2e extra (libvirt-python, built against libvirt-dev)"; \
		$(VENV)/bin/python -m pip install -q -e '.[dev,e2e]' || { \
			echo "make e2e: building libvirt-python failed (it needs gcc, pkg-config, libvirt-dev and the headers of $$(readlink -f $(VENV)/bin/python))"; \
			exit 1; }; }
	e2e/guest-image >/dev/null
	$(VENV)/bin/python -m pytest -m e2e tests/e2e tests/hv -v

lint typecheck: $(VENV)/.installed $(VENV39)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	@if [ -f $(VENV39)/.installed ]; then \
		echo "== mypy (guest side, Python 3.9)"; \
		$(VENV39)/bin/mypy --config-file .ci/mypy-py39.ini src/guestbus/wire agent/guestbus_agent; \
	else \
		echo "== mypy (guest side; no python3.9 here: checking as 3.10, the oldest mypy 2 knows)"; \
		$(VENV)/bin/mypy --python-version 3.10 src/guestbus/wire agent; \
	fi

schemas: $(VENV)/.installed
	$(VENV)/bin/guestbus schemas --write

clean:
	rm -rf $(VENV) $(VENV39) .mypy_cache .ruff_cache
