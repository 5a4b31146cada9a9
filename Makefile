# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create the pinned environment in .venv on first use (requirements.lock pins every package).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
CORES ?= 2

.PHONY: install demo test lint bench gpu-check clean-demo pilot pilot-publish

$(BIN)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements.lock -e ".[test]"
	touch $@

install: $(BIN)/.installed

# The whole study in miniature on the embedded default (config.yaml): every phase and ablation
# at several lambdas on sample photos, CPU, minutes. Results land in results/.
demo: install
	PATH="$(CURDIR)/$(BIN):$$PATH" WANDB_MODE=disabled $(BIN)/snakemake --cores $(CORES)

# The pilot study (docs/results.md): from scratch, 3 seeds, Kodak; 88 min on 2 cores (measured).
# It records the commit it ran and its wall time in results/pilot_run.txt; `make pilot-publish`
# then copies its tables and plots to docs/results/pilot/ with them.
pilot: install
	start=$$(date +%s); commit=$$(git rev-parse HEAD)$$(git diff --quiet HEAD || echo " (with local changes)"); \
	PATH="$(CURDIR)/$(BIN):$$PATH" WANDB_MODE=disabled \
	  $(BIN)/snakemake --configfile workflow/configs/pilot.yaml --cores $(CORES) && \
	  printf 'commit=%s\nwall_s=%s\n' "$$commit" $$(( $$(date +%s) - start )) > results/pilot_run.txt

pilot-publish:
	PATH="$(CURDIR)/$(BIN):$$PATH" bash workflow/scripts/publish-pilot.sh

# The test suite (CPU, no network).
test: install
	PATH="$(CURDIR)/$(BIN):$$PATH" WANDB_MODE=disabled $(BIN)/python -m pytest -q

# Lint and format check (ruff, configured in pyproject.toml; pinned in the test extra).
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: install
	for script in benchmarks/*.py; do $(BIN)/python $$script || exit 1; done

# The prepared GPU check (docs/gpu.md): exactness, step times, memory, compile, the official code.
# No install step (a GPU machine may have no network): the venv's python when there is one, else
# GPU_PYTHON. Arguments pass through, e.g. make gpu-check ARGS="--official .scratch/LIC-HPCM --out-dir $$OUT"
ARGS ?=
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python)
gpu-check:
	WANDB_MODE=disabled $(GPU_PYTHON) benchmarks/gpu_check.py $(ARGS)
