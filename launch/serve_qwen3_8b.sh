#!/usr/bin/env bash
# Qwen3-8B with z-lab's DFlash drafter (block 16) on one GPU: FlashInfer attention for
# target and drafter, CUDA graphs on. SGLANG_DFLASH_BACKEND=upstream runs SGLang's
# built-in DFLASH instead, with the same flags. Extra args go to SGLang.
#   bash launch/serve_qwen3_8b.sh [--tp-size 2 ...]
set -euo pipefail
PY=${PY:-python}
MODEL=${MODEL:-Qwen/Qwen3-8B}
DRAFTER=${DRAFTER:-z-lab/Qwen3-8B-DFlash-b16}
exec "$PY" -m sglang.launch_server \
  --model-path "$MODEL" \
  --speculative-algorithm DFLASH \
  --speculative-draft-model-path "$DRAFTER" \
  --speculative-num-draft-tokens "${BLOCK:-16}" \
  --attention-backend flashinfer --speculative-draft-attention-backend flashinfer \
  --mem-fraction-static "${MEM_FRACTION:-0.8}" --max-running-requests "${MAX_RUNNING:-32}" \
  --host "${HOST:-0.0.0.0}" --port "${PORT:-30000}" "$@"
