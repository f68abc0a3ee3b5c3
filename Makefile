# pydstack: `make up` runs the control plane, `make test` runs every check.
# Both install whatever is missing first (Debian packages, then the .venv).
# Pass options to the control plane with ARGS, e.g. `make up ARGS="--port 4333"`.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# solc for contracts/: npm's solc package (solcjs, WebAssembly) compiles offline once installed.
SOLC_VERSION := 0.8.28
SOLCJS := $(VENV)/solcjs/.installed-$(SOLC_VERSION)
# anvil (Foundry's local Ethereum node, from npm) runs the eth backend's tests and dev chains;
# OpenZeppelin at the version dstack v0.5.11 pins compiles dstack's own contracts in tests/eth.
ANVIL_VERSION := 1.7.1
ANVIL := $(VENV)/anvil/.installed-$(ANVIL_VERSION)
OZ_VERSION := 5.4.0
OPENZEPPELIN := $(VENV)/openzeppelin/.installed-$(OZ_VERSION)
# dstack's JavaScript SDK for the guest-agent tests (run with node): the 0.5 line with its
# peers at major 1 (version 2 of @noble/* breaks its imports). Pinned; tests/guest/jssdk.py.
DSTACK_SDK_JS := @phala/dstack-sdk@0.5.8 @noble/hashes@1.8.0 @noble/curves@1.9.7
DSTACK_SDK_JS_STAMP := $(VENV)/dstack-sdk-js/.installed-0.5.8
# Debian packages the project needs; installed only when missing. nftables + acl: the QEMU
# backend runs QEMU as its own user (pydstack-qemu, made by the VMM) behind nft rules.
DEB_PACKAGES := python3-venv ca-certificates wireguard-go wireguard-tools iproute2 qemu-system-x86 qemu-utils mmdebstrap linux-image-amd64 busybox-static e2fsprogs cpio pebble knot chromium chromium-driver haproxy nginx libnginx-mod-stream wrk docker.io docker-compose docker-registry nftables acl ovmf osslsigncode
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: up test lint typecheck unit deps sysdeps bench clean

# `make up` runs a whole plane, sandbox CVMs included (and a local image registry they pull
# through: `pydstack image push`), so `pydstack deploy` works at once;
# ARGS come last and win (e.g. ARGS="--vmm qemu" after `make image`, or "--vmm none").
UP_ARGS ?= --vmm sandbox --registry

up: deps
	$(BIN)/pydstack up $(UP_ARGS) $(ARGS)

test: deps lint typecheck unit

lint: deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: deps
	$(BIN)/mypy

unit: deps
	$(BIN)/pytest -q -rfEs --tb=short -p no:cacheprovider

deps: sysdeps $(STAMP) $(SOLCJS) $(ANVIL) $(OPENZEPPELIN) $(DSTACK_SDK_JS_STAMP)

sysdeps:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

$(SOLCJS): | $(STAMP)
	command -v npm >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm)
	npm install --silent --prefix $(VENV)/solcjs --no-save --no-package-lock --no-audit --no-fund solc@$(SOLC_VERSION)
	touch $@

$(ANVIL): | $(STAMP)
	command -v npm >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm)
	npm install --silent --prefix $(VENV)/anvil --no-save --no-package-lock --no-audit --no-fund @foundry-rs/anvil-linux-amd64@$(ANVIL_VERSION)
	touch $@

$(OPENZEPPELIN): | $(STAMP)
	command -v npm >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm)
	npm install --silent --prefix $(VENV)/openzeppelin --no-save --no-package-lock --no-audit --no-fund @openzeppelin/contracts@$(OZ_VERSION) @openzeppelin/contracts-upgradeable@$(OZ_VERSION)
	touch $@

$(DSTACK_SDK_JS_STAMP): | $(STAMP)
	command -v npm >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm)
	npm install --silent --prefix $(VENV)/dstack-sdk-js --no-save --no-package-lock --no-audit --no-fund $(DSTACK_SDK_JS)
	touch $@

bench: deps
	for b in append replay; do $(BIN)/python -m bench.$$b --quick || exit 1; done

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

# Guest image for the QEMU backend, cached outside the repo (see image/build.sh).
.PHONY: image
image: deps
	bash image/build.sh
