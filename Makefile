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

.PHONY: help up down test lint docs bench gpu-check gpu-check-bundle system-deps system-test-deps venv venv-dev npm clean

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

# The stamps are rebuilt when pyproject.toml changes, or when the checkout moves (an editable
# install points at one checkout; CI clones into a new folder).
$(VENV)/.ztlab-installed: pyproject.toml $(BIN)/python
	$(PIP) install -q -e .
	echo "$(CURDIR)" > $@

$(VENV)/.ztlab-dev-installed: pyproject.toml $(BIN)/python
	$(PIP) install -q -e '.[dev]'
	echo "$(CURDIR)" > $@

venv: system-deps $(VENV)/.ztlab-installed ## create the venv and install ztlab
	@grep -qx "$(CURDIR)" $(VENV)/.ztlab-installed || { $(PIP) install -q -e . && echo "$(CURDIR)" > $(VENV)/.ztlab-installed; }

venv-dev: system-test-deps $(VENV)/.ztlab-dev-installed ## create the venv and install ztlab[dev]
	@grep -qx "$(CURDIR)" $(VENV)/.ztlab-dev-installed || { $(PIP) install -q -e '.[dev]' && echo "$(CURDIR)" > $(VENV)/.ztlab-dev-installed; }

# The npm parts: configurable-http-proxy (the hub's proxy) and oidc-provider (the
# development identity provider), pinned in package-lock.json.
node_modules/.package-lock.json: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

npm: node_modules/.package-lock.json ## install the npm parts (proxy, development IdP)

lint: venv-dev ## ruff, mypy --strict and the trust-boundary import contracts
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy -p ztlab
	$(BIN)/mypy bench
	$(BIN)/lint-imports

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

gpu-check: venv-dev ## the GPU checks (lease, device fence, NVML) on a machine with a GPU
	$(BIN)/python -m pytest -q -s -rs -m gpu tests/gpu

gpu-check-bundle: ## wheels and .deb for tests/gpu/run-on-device.sh on an offline GPU machine
	rm -rf .whl .deb && mkdir -p .whl .deb
	for p in pydantic pydantic-core annotated-types typing-inspection cedarpy cryptography cffi pycparser; do \
	  $(PIP) download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	    -d .whl "$$p==$$($(PIP) show $$p | awk '/^Version/{print $$2}')"; done
	cd .deb && apt-get download bubblewrap

clean: ## remove build outputs (not the venv, not the state)
	rm -rf docs/_build build *.egg-info .mypy_cache .ruff_cache .pytest_cache
