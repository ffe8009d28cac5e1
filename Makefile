# normbench: `make demo` installs and reproduces GN Table 2 at CPU scale; `make test` installs and tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.install-stamp
FMNIST := /usr/share/datasets/fashion-mnist
# A fresh clone trains for real: results/demo/ is not committed. The committed reference run was made with
# `make demo DEMO_RESULTS=results/fashion_mnist`; a second `make demo` skips finished runs (`make clean-demo`).
DEMO_RESULTS ?= results/demo
# The local SLURM cluster of `make slurm-up`: confs, state, logs, pids and its database, wiped on every up.
SLURM_DIR ?= /tmp/normbench-slurm

.PHONY: install data demo lint test bench clean-demo slurm-up slurm-down slurm-test

install: $(STAMP) data

# torch is served from this machine's disk when present (pip's find-links); elsewhere pip fetches it.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

# Fashion-MNIST offline: Debian's package when we can install it; otherwise torchvision downloads on first use.
data:
	@if [ ! -f $(FMNIST)/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y -q dataset-fashion-mnist >/dev/null || (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null) \
		|| echo "note: could not install dataset-fashion-mnist; torchvision will download Fashion-MNIST"; fi

# GN Table 2 (BN vs GN at 32..2 images/GPU) on Fashion-MNIST: two sweep workers share the grid (one core
# each; the per-run lock keeps them off each other's runs), then the report.
demo: install
	OMP_NUM_THREADS=1 $(BIN)/normbench sweep experiment=gn_table2 preset=fashion_mnist results_dir=$(DEMO_RESULTS) logger.progress=false & \
	OMP_NUM_THREADS=1 $(BIN)/normbench sweep experiment=gn_table2 preset=fashion_mnist results_dir=$(DEMO_RESULTS) logger.progress=false; \
	a=$$?; wait $$!; b=$$?; \
	$(BIN)/normbench report experiment=gn_table2 results_dir=$(DEMO_RESULTS); \
	test $$a = 0 -a $$b = 0

# ruff (rules and line length in pyproject.toml): lint rules, then the one formatting style.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest -q

bench: install
	$(BIN)/python scripts/bench_norms.py --small
	$(BIN)/python scripts/bench_train.py

clean-demo:
	rm -rf $(DEMO_RESULTS)

# A single-node SLURM cluster from Debian's packages (root on Debian; apt only when they are missing).
slurm-up:
	scripts/slurm/up.sh $(SLURM_DIR)

slurm-down:
	scripts/slurm/down.sh $(SLURM_DIR)

# The SLURM tests against that cluster; it is stopped whatever the tests' outcome.
slurm-test: install
	$(MAKE) slurm-up
	SLURM_CONF=$(SLURM_DIR)/slurm.conf $(BIN)/pytest -q -m slurm tests/test_slurm.py; status=$$?; \
	$(MAKE) slurm-down; exit $$status
