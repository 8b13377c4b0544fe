# The two commands of the README: `make demo` and `make test`.
# Both install what they need: a virtualenv with the package, and restic.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-sqlite test-postgresql lint restic postgresql venv clean agent install

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# Debian's restic, installed once when missing (we run as root here; sudo otherwise).
restic:
	@command -v restic >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq restic >/dev/null; }
	@restic version

# Debian's PostgreSQL server, for the tests of the store on it (they start
# their own server in a temp dir; the package's own cluster is not used)
postgresql:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; }

lint: venv
	$(BIN)/ruff check .

# four workers on any machine: the tests mostly wait on fleetd, agents and
# restic, so even two cores keep four busy; a module's tests stay together
# (--dist loadfile), as they share one fleetd. Then the integration and
# end-to-end suites again with every fleetd on a real PostgreSQL (the
# harness starts one in a temp dir: tests/postgres.py).
test: venv restic postgresql lint
	$(BIN)/pytest -q -n 4 --dist loadfile
	FLEET_TEST_STORE=postgresql $(BIN)/pytest -q -n 4 --dist loadfile tests/integration tests/e2e

# one half of `make test` each
test-sqlite: venv restic lint
	$(BIN)/pytest -q -n 4 --dist loadfile

test-postgresql: venv restic postgresql lint
	FLEET_TEST_STORE=postgresql $(BIN)/pytest -q -n 4 --dist loadfile tests/integration tests/e2e

demo: venv restic
	bash build/demo.sh

# the agent as one file: dist/fleet-agent.pyz (reproducible, CPython 3.9+)
agent: venv
	bash build/build-agent.sh

# fleetd and fleetctl for good, as root: a virtualenv in /opt/fleet, the man
# pages, the fleetd user and its unit (build/install-fleetd.sh; again to
# upgrade). DESTDIR=DIR installs under DIR instead, for a test or staging.
install:
	bash build/install-fleetd.sh $(if $(DESTDIR),--root $(DESTDIR))

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache dist demo-data
