# metaad: `make train` and `make test` work on a fresh clone (they set up the venv first).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The one place torch is pinned: installed before the project so pip never swaps in another build.
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.install.stamp
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install train eval score sweep benchmark benchmark-quick speed speed-images scale scale-store test test-slow lint format tensorboard clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}'
	@echo '  pass Hydra overrides with ARGS="model=siamese dataset.k_shot=1"'

# pip's output goes to .venv/install.log and is shown only if the install fails.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing $(TORCH_PIN), then metaad and its dependencies (log: $(VENV)/install.log)"
	@( $(BIN)/python -m pip install "$(TORCH_PIN)" && \
	   $(BIN)/python -m pip install -e ".[dev]" "$(TORCH_PIN)" ) > $(VENV)/install.log 2>&1 \
	   || { tail -40 $(VENV)/install.log; exit 1; }
	touch $(STAMP)

install: $(STAMP) ## create .venv and install torch, then the project (editable, with dev tools)

train: $(STAMP) ## meta-train the default experiment (ARGS="..." for overrides)
	$(BIN)/metaad-train $(ARGS)

eval: $(STAMP) ## re-score a checkpoint: make eval ARGS="ckpt_path=outputs/.../best.ckpt"
	$(BIN)/metaad-eval $(ARGS)

score: $(STAMP) ## score your data: make score ARGS="ckpt_path=... support=normal.csv query=new.csv output=scores.csv"
	$(BIN)/metaad-score $(ARGS)

# make sweep: a grid over SWEEP (Hydra multirun, one folder per job); every sweep ends with the
# table of its jobs (metaad.apps.summarize.SummarizeAtEnd)
SWEEP ?= model=protonet,siamese dataset.k_shot=1,5
SWEEP_DIR := outputs/multirun/$(shell date +%Y-%m-%d_%H-%M-%S)_sweep
sweep: $(STAMP) ## grid sweep + table of each job's val/test AUROC (SWEEP="model=a,b dataset.k_shot=1,5", ARGS=...)
	$(BIN)/metaad-train -m $(SWEEP) hydra.sweep.dir=$(SWEEP_DIR) $(ARGS)

benchmark: $(STAMP) ## every experiment at CPU length, each learner vs every baseline (preset=cpu)
	$(BIN)/metaad-benchmark preset=cpu $(ARGS)

benchmark-quick: $(STAMP) ## the benchmark's whole pipeline, one epoch a suite (smoke test, not numbers to quote)
	$(BIN)/metaad-benchmark preset=quick $(ARGS)

speed: $(STAMP) ## throughput of each learner; MAML beside TorchOpt and higher (pip install -e .[peers]); scoring start-up
	$(BIN)/python scripts/bench_speed.py $(ARGS)

speed-images: $(STAMP) ## images/s of the pretrained image extractor on one CPU thread, its FLOPs, scoring against K=8
	OMP_NUM_THREADS=1 $(BIN)/python scripts/bench_extractors.py $(ARGS)

scale: $(STAMP) ## how setup, meta-training and evaluation costs grow (tables + PNG in outputs/scale/; ARGS=--quick)
	$(BIN)/python scripts/bench_scale.py $(ARGS)

scale-store: $(STAMP) ## peak memory of metaad-train on tables up to 10^7 rows x 100 features, in memory vs the store (ARGS=--quick)
	OMP_NUM_THREADS=1 $(BIN)/python scripts/bench_store.py $(ARGS)

test: $(STAMP) ## the default test suite (a few minutes on 2 cores)
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

test-slow: $(STAMP) ## the slow tests: multi-process DDP, subprocess runs, sweeps (CI runs them too)
	$(BIN)/python -m pytest -q -m slow $(ARGS)

lint: $(STAMP) ## ruff check and format check
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts

format: $(STAMP) ## ruff fix and format
	$(BIN)/ruff check --fix src tests scripts
	$(BIN)/ruff format src tests scripts

tensorboard: $(STAMP) ## open TensorBoard on every run under outputs/
	$(BIN)/tensorboard --logdir outputs

clean: ## remove caches (keeps .venv and outputs/)
	rm -rf .pytest_cache .ruff_cache src/*.egg-info
	find . -name __pycache__ -type d -not -path './$(VENV)/*' -exec rm -rf {} +
