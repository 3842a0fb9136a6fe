# m2ib-bench. Every target that needs Python installs the project into .venv first (once).
PY      ?= python3
VENV    := .venv
PYTHON  := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
MODEL   ?= embedded
DATA    ?= embedded
ARGS    ?=
RUN     := $(PYTHON) scripts/run.py model=$(MODEL) data=$(DATA)
# Published tables (results/) come only from these targets, from a clean git tree (publish=true);
# ad hoc `scripts/run.py` runs write under runs/ (git-ignored).
# ALLOW_DIRTY=1 publishes from a tree with uncommitted changes anyway (recorded in the sidecars).
ALLOW_DIRTY ?=
PUBLISH := $(RUN) publish=true $(if $(ALLOW_DIRTY),allow_dirty=true)
SWEEP_DIRTY := $(if $(ALLOW_DIRTY),--allow-dirty)

.PHONY: install browser test reproduce-table1 reproduce-table2 reproduce-table3 reproduce-estimators reproduce-sanity reproduce-sweep sweep regression \
        regression-reference bench bench-baselines bench-readout readout embedded-model clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

## Headless chromium for the HTML report's browser test (Debian's package; installed once, needs root or sudo).
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
browser:
	@command -v chromium >/dev/null || ($(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends chromium)

## The test suite (CI runs exactly this through .ci/run).
test: $(STAMP) browser
	$(PYTHON) -m pytest -q -n 2 tests

## Table 1 (confidence drop/increase, all methods, both modalities). Real data: MODEL=vit_b32_openai DATA=cc
reproduce-table1: $(STAMP)
	$(PUBLISH) experiment=table1 $(ARGS)

## Table 2 (zero-shot detection IoU and friends, ROAR+).
reproduce-table2: $(STAMP)
	$(PUBLISH) experiment=table2 $(ARGS)

## Table 3 (degradation test, deletion/insertion, ROAD, caption sensitivity; curves), first 100 test pairs.
reproduce-table3: $(STAMP)
	$(PUBLISH) experiment=table3 $(ARGS)

## The IB family side by side: M2IB's estimators, multi-layer bottlenecks and the readout on every metric
## (first 100 test pairs). Trains the readout first where it is missing (cached: a hit never retrains).
reproduce-estimators: $(STAMP)
	OMP_NUM_THREADS=1 $(PYTHON) scripts/train_readout.py --model $(MODEL)
	$(PUBLISH) experiment=estimators $(ARGS)

## Sanity checks (cascading randomisation): per-layer tables and curves.
reproduce-sanity: $(STAMP)
	$(PUBLISH) experiment=sanity $(ARGS)

## Multirun over beta / var / layer on the embedded set, collected with heatmaps into runs/sweep-tables/
## (make sweep) or into the published results/sweep/ (make reproduce-sweep).
sweep: $(STAMP)
	$(PYTHON) scripts/run.py --multirun model=$(MODEL) data=$(DATA) experiment=sweep $(ARGS)
	$(PYTHON) scripts/collect_sweep.py

reproduce-sweep: $(STAMP)
	$(PYTHON) scripts/collect_sweep.py --publish --check-only $(SWEEP_DIRTY)
	$(PYTHON) scripts/run.py --multirun model=$(MODEL) data=$(DATA) experiment=sweep $(ARGS)
	$(PYTHON) scripts/collect_sweep.py --out results/sweep --publish $(SWEEP_DIRTY)

## The CI metric-regression check alone, and regenerating its committed reference (say why in the commit).
regression: $(STAMP)
	$(PYTHON) -m pytest -q tests/test_regression.py

regression-reference: $(STAMP)
	$(PYTHON) scripts/run.py experiment=regression publish=true $(if $(ALLOW_DIRTY),allow_dirty=true) cache_dir=$$(mktemp -d) progress=false

## Speed: fast M2IB vs the plain release algorithm (ratio measured in one run); baselines' cost per pair.
bench: $(STAMP)
	$(PYTHON) scripts/bench_m2ib.py $(ARGS)

bench-baselines: $(STAMP)
	$(PYTHON) scripts/bench_baselines.py $(ARGS)

## Train the readout bottlenecks of method m2ib_readout for MODEL (default embedded; cached, a hit never
## retrains; ARGS="--retrain" forces, ARGS="image_alpha=token ..." changes settings), deterministic, 1 thread, ~4 min.
readout: $(STAMP)
	OMP_NUM_THREADS=1 $(PYTHON) scripts/train_readout.py --model $(MODEL) $(ARGS)

## Readout vs per-sample M2IB in one run: pairs/s ratio and image IoU fraction (first 100 embedded test pairs).
bench-readout: $(STAMP)
	OMP_NUM_THREADS=1 $(PYTHON) scripts/bench_readout.py --model $(MODEL) $(ARGS)

## Retrain the embedded benchmark's small CLIP (deterministic, CPU, ~15 min) and rewrite its assets.
embedded-model: $(STAMP)
	OMP_NUM_THREADS=1 $(PYTHON) scripts/train_embedded_model.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache runs
