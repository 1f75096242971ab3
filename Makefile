# vecpipe: `make demo` runs the pipeline on the demo corpus, `make test` runs every check.
#
# The virtualenv lives outside the clone, keyed by the hash of the dependency lists, so that a
# warm machine (and CI) does not download torch again; only a change of a dependency does (not
# of the package list, the tools' settings or the version).

SHELL := /bin/bash
PYTHON ?= python3
VECPIPE_CACHE ?= $(HOME)/.cache/vecpipe
DEPS_HASH := $(shell sed -n '/^dependencies = \[/,/^\[project.scripts\]/p' pyproject.toml | sha256sum | cut -c1-16)
VENV ?= $(VECPIPE_CACHE)/venv-$(DEPS_HASH)
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test lint typecheck unit integration faults browser soak bench clean-venv \
	services-down \
	venv-path

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip wheel
	@# -qq: errors only; setuptools' warnings about editable installs mean nothing here.
	$(BIN)/python -m pip install -qq -e ".[local,onnx,test]"
	@touch $(STAMP)
	@# Environments of older dependency sets are several GB each: keep only this one.
	@find $(VECPIPE_CACHE) -maxdepth 1 -name 'venv-*' ! -path '$(VENV)' -exec rm -rf {} +

# The editable install points at this checkout; re-pointing it is cheap, so do it every time.
install: $(STAMP)
	@$(BIN)/python -m pip install -qq --no-deps --no-build-isolation -e . >/dev/null
	@echo "vecpipe installed in $(VENV)"

demo: install
	PATH=$(BIN):$$PATH bash scripts/demo.sh

lint: install
	$(BIN)/ruff check vecpipe producers workers tests
	$(BIN)/mypy

unit: install
	$(BIN)/python -m pytest tests/unit -q

integration: install
	PATH=$(BIN):$$PATH $(BIN)/python -m pytest tests/integration -q

# The fault-injection suite (kill -9, broker and database restarts, rebalances, bad inputs)
# restarts the services, so it runs in a pytest session of its own, after the others.
test: install
	$(BIN)/ruff check vecpipe producers workers tests
	$(BIN)/mypy
	PATH=$(BIN):$$PATH $(BIN)/python -m pytest -q -m "not faults and not browser"
	PATH=$(BIN):$$PATH $(BIN)/python -m pytest -q -m faults tests/integration/test_faults.py
	PATH=$(BIN):$$PATH $(BIN)/python -m pytest -q -m browser tests/integration/test_page.py

# The search page in a real headless Chromium (scripts/install-chromium.sh), a session of its own.
browser: install
	PATH=$(BIN):$$PATH $(BIN)/python -m pytest -q -m browser tests/integration/test_page.py

faults: install
	PATH=$(BIN):$$PATH $(BIN)/python -m pytest -q -m faults tests/integration/test_faults.py

soak: install
	PATH=$(BIN):$$PATH VECPIPE_SOAK=1 $(BIN)/python -m pytest -q -m "faults or soak"

services-down: install
	$(BIN)/vecpipe services down

# bin/vecpipe runs the checkout through this virtualenv.
venv-path:
	@echo $(VENV)

clean-venv:
	rm -rf $(VENV)
