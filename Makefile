# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export MPLBACKEND := Agg
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE := 1

.PHONY: setup test test-slow demo demo-bench demo-long slurm-up slurm-down bench bench-gpu clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

test: setup slurm-up
	$(BIN)/python -m pytest -m "not slow" -q

test-slow: setup slurm-up
	$(BIN)/python -m pytest -m slow -q

demo: setup
	$(BIN)/harness sweep demo
	$(BIN)/harness report sweeps_out/demo -o reports/demo

# The demo timed and checked against its claim, one row per seed in bench/demo_log.jsonl: make demo-bench SEEDS="0 1 2"
SEEDS ?= 0
demo-bench: setup
	status=0; for seed in $(SEEDS); do $(BIN)/harness demo-bench --seed $$seed || status=1; done; exit $$status

demo-long: setup
	$(BIN)/harness sweep demo_long
	$(BIN)/harness report sweeps_out/demo_long -o reports/demo_long

slurm-up:
	bash tests/slurm/slurm-local.sh start || [ "$$CI" != true ]

slurm-down:
	bash tests/slurm/slurm-local.sh stop

bench: setup
	$(BIN)/harness bench model=mini-S/4

bench-gpu:
	bash tests/gpu/gpu_check.sh

clean:
	rm -rf runs sweeps_out reports bench .pytest_cache
