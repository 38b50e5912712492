# Local Argilla 2.8 server and the human-feedback helpers.
# Included by the Makefile (`include mk/argilla.mk`), which defines PY, VENV and $(VENV)/.installed.
#
#   make argilla               start the server (idempotent), print its URL and the owner's sign-in
#   make argilla-stop          stop what `make argilla` started (PID files under .argilla/run/)
#   make argilla-status        records pending/completed and submissions per annotator, per dataset
#   make annotators USERS=alice,bob [WORKSPACE=...]   annotator accounts, passwords printed once
#   make argilla-deps          server venv (.venv-argilla) + Debian redis-server
#   make argilla-browser-deps  Debian chromium + fonts (for tests/test_argilla_browser.py)
#
# Server data (SQLite, Redis dump, logs, credentials.json) lives in .argilla/ and survives restarts.

ARGILLA_VENV      ?= .venv-argilla
ARGILLA_PYTHON    ?= python3
ARGILLA_PORT      ?= 6900
ARGILLA_LOCAL_HOME ?= $(CURDIR)/.argilla
export ARGILLA_LOCAL_HOME
# the workspace `make candidates` and `make reward` use by default
ARGILLA_WORKSPACE ?= align
ARGILLA_CTL        = $(ARGILLA_VENV)/bin/python services/argilla/ctl.py --home $(ARGILLA_LOCAL_HOME)

.PHONY: argilla argilla-stop argilla-status annotators argilla-deps argilla-browser-deps

argilla-deps: $(ARGILLA_VENV)/.installed $(ARGILLA_VENV)/.debs

# Debian packages, installed once (stamp); dpkg -s skips apt when they are already there.
$(ARGILLA_VENV)/.debs:
	@mkdir -p $(ARGILLA_VENV)
	@dpkg -s redis-server >/dev/null 2>&1 || { $(APT) update -q && \
	  $(APT) install -y -q --no-install-recommends redis-server; }
	@touch $@

$(ARGILLA_VENV)/.browser-debs:
	@mkdir -p $(ARGILLA_VENV)
	@dpkg -s chromium fonts-dejavu-core >/dev/null 2>&1 || { $(APT) update -q && \
	  $(APT) install -y -q --no-install-recommends chromium fonts-dejavu-core; }
	@touch $@

argilla-browser-deps: $(ARGILLA_VENV)/.browser-debs

# The server's own venv: its pins (pydantic 2.9, httpx 0.27, typer 0.9, urllib3 1.26) clash with the ML stack.
$(ARGILLA_VENV)/.installed: requirements/argilla-server.txt
	@test -x $(ARGILLA_VENV)/bin/python || $(ARGILLA_PYTHON) -m venv $(ARGILLA_VENV)
	$(ARGILLA_VENV)/bin/python -m pip install -q --disable-pip-version-check -r requirements/argilla-server.txt
	@touch $@

argilla: argilla-deps
	@$(ARGILLA_CTL) start --port $(ARGILLA_PORT)

argilla-stop:
	@if [ -x $(ARGILLA_VENV)/bin/python ]; then $(ARGILLA_CTL) stop; \
	 else python3 services/argilla/ctl.py --home $(ARGILLA_LOCAL_HOME) stop; fi

argilla-status: $(VENV)/.installed
	$(PY) -m stages.argilla_status

annotators: $(VENV)/.installed
	@test -n "$(USERS)" || { echo "usage: make annotators USERS=alice,bob [WORKSPACE=$(ARGILLA_WORKSPACE)]"; exit 2; }
	$(PY) -m stages.annotators --users "$(USERS)" --workspace "$(or $(WORKSPACE),$(ARGILLA_WORKSPACE))"
