# dfnydus developer entry points. On a fresh Debian 12 machine, as root:
#
#   make demo    install what is needed, then a local cluster: image build, registry convert,
#                supernode + peers in network namespaces, lazy mounts, containers (runc)
#   make test    install what is needed, then ruff, mypy --strict and pytest
#
# `setup` is idempotent and fast when nothing changed: apt runs only for missing packages, and
# the virtualenv is (re)installed only when it is missing, broken, or older than pyproject.toml.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.dfnydus-installed
# System packages: FUSE (runtime + headers, pyfuse3 is built from source), a compiler, Python
# headers and venv, the tools the benchmarks compare against (mksquashfs, squashfuse, zstd),
# umoci + skopeo, which the tests use to write real OCI image layouts, and runc, which the tests
# and benchmarks run containers with (rootfs on a nydusfs mount), and docker-registry
# (distribution), the real registry the tests, demo and benchmarks push to and mount from, and
# redis-server, the supernode's shared peer store in tests; iproute2 (ip, tc) shapes links
# between network namespaces in benchmarks.
APT_PACKAGES := fuse3 libfuse3-dev pkg-config gcc python3-venv python3-dev \
                squashfs-tools squashfuse zstd umoci skopeo runc docker-registry \
                redis-server iproute2
BENCH_RUNS ?= 3

.PHONY: help setup system-packages venv demo lint test bench bench-rootfs bench-lookup \
        bench-build bench-read bench-convert bench-coldstart bench-supernode bench-fanout \
        bench-upload bench-report clean distclean

help:
	@echo "make demo       set up, then the local demo cluster (scripts/demo.sh)"
	@echo "make test       set up, then ruff check, mypy --strict, pytest"
	@echo "make lint       ruff check and mypy only"
	@echo "make bench      run bench/ (BENCH_RUNS=$(BENCH_RUNS)) and regenerate docs/benchmarks.md"
	@echo "make bench-read reads through nydusfs/squashfuse mounts, mount time (root, /dev/fuse)"
	@echo "make bench-convert    nydusfs convert vs skopeo copy in a local registry (root)"
	@echo "make bench-coldstart  container cold start over a shaped link: lazy mount vs full pull"
	@echo "make bench-supernode  supernode lookups/announces per core (memory, Redis)"
	@echo "make bench-fanout     N nodes in network namespaces: registry vs P2P (root, ~10 min)"
	@echo "make bench-upload     dfagent peer upload server throughput"
	@echo "make setup      apt packages (only if missing) + $(VENV) with the package (editable, dev extras)"
	@echo "make clean      remove caches and bench/.cache;  make distclean  also removes $(VENV)"

setup: system-packages venv

system-packages:
	@missing=""; \
	for p in $(APT_PACKAGES); do \
	    dpkg-query -W -f='$${Status}' "$$p" 2>/dev/null | grep -q 'install ok installed' \
	        || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	    sudo=""; [ "$$(id -u)" -eq 0 ] || sudo="sudo"; \
	    echo "setup: installing system packages:$$missing"; \
	    $$sudo apt-get update -qq; \
	    DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends $$missing; \
	fi

venv:
	@if ! $(BIN)/python -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then \
	    $(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
	        || { echo "setup: $(PYTHON) is older than 3.11; set PYTHON=..." >&2; exit 1; }; \
	    echo "setup: creating $(VENV) with $$($(PYTHON) -c 'import sys; print(sys.executable)')"; \
	    rm -rf $(VENV); \
	    $(PYTHON) -m venv $(VENV); \
	    $(BIN)/python -m pip install -q --upgrade pip; \
	fi
	@if [ ! -f $(STAMP) ] || [ pyproject.toml -nt $(STAMP) ] || [ ! -x $(BIN)/nydusfs ]; then \
	    echo "setup: pip install -e '.[dev]'"; \
	    $(BIN)/python -m pip install -q -e '.[dev]'; \
	    touch $(STAMP); \
	fi

demo: setup
	scripts/demo.sh

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q

# Benchmarks are not tests: they measure ratios against a baseline run in the same session and
# write docs/benchmarks.md. Each step can be run alone; bench-report merges whatever results
# bench/.cache/results/ holds.
bench: bench-lookup bench-build bench-read bench-convert bench-coldstart bench-supernode \
       bench-fanout bench-upload bench-report

bench-rootfs: setup
	bench/rootfs.sh

bench-lookup: setup
	$(BIN)/python bench/lookup_bench.py

bench-build: bench-rootfs
	$(BIN)/python bench/build_bench.py --runs $(BENCH_RUNS)

# Reads through nydusfs / squashfuse mounts vs the native tree, then mount-to-ready time; needs
# root and /dev/fuse (drops the page cache between runs).
bench-read: bench-rootfs
	$(BIN)/python bench/read_bench.py --runs $(BENCH_RUNS)
	$(BIN)/python bench/mount_bench.py --runs $$(( $(BENCH_RUNS) > 5 ? $(BENCH_RUNS) : 5 ))

# nydusfs convert vs skopeo copy of a 5-layer python3 image in a local docker-registry (root).
bench-convert: setup
	$(BIN)/python bench/convert_bench.py --runs $(BENCH_RUNS)

# Cold start over a shaped link (2 netns + tc tbf, 3 and 12.5 MB/s): full pull vs lazy mount
# from the registry. Needs root, /dev/fuse, runc, skopeo, umoci, tc/ip (iproute2), nsenter.
bench-coldstart: setup
	$(BIN)/python bench/coldstart_bench.py --runs $(BENCH_RUNS)

# Supernode lookups/s and announces/s per core, memory and Redis stores; bytes per index entry.
bench-supernode: setup
	$(BIN)/python bench/supernode_bench.py --runs $(BENCH_RUNS)

# N nodes (default 8) in network namespaces with shaped links read a ~200 MB image at once:
# straight from the registry vs through dfagent peers (root, ~10 min).
bench-fanout: setup
	$(BIN)/python bench/fanout_bench.py --runs $(BENCH_RUNS)

# The peer upload server's throughput for 1 MiB chunks vs an aiohttp static file server.
bench-upload: setup
	$(BIN)/python bench/upload_bench.py --runs $(BENCH_RUNS)

bench-report: setup
	$(BIN)/python bench/report.py

clean:
	rm -rf .mypy_cache .ruff_cache .pytest_cache .hypothesis build dist *.egg-info bench/.cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
