#!/usr/bin/env bash
# gpt-oss-120b with z-lab's DFlash drafter on 8 GPUs (tensor parallel 8). Every rank
# holds 1/8 of the target's weights and KV heads and a full copy of the drafter and its
# KV rows (the drafter is replicated; see README "Past one GPU" for the memory per
# rank). Extra args go to SGLang, e.g. DP attention:
#   bash launch/serve_gpt_oss_120b_tp8.sh --dp-size 8 --enable-dp-attention --enable-dp-lm-head
set -euo pipefail
PY=${PY:-python}
MODEL=${MODEL:-openai/gpt-oss-120b}
DRAFTER=${DRAFTER:-z-lab/gpt-oss-120b-DFlash}
exec "$PY" -m sglang.launch_server \
  --model-path "$MODEL" \
  --speculative-algorithm DFLASH \
  --speculative-draft-model-path "$DRAFTER" \
  --speculative-draft-attention-backend flashinfer \
  --tp-size "${TP:-8}" \
  --attention-backend "${ATTENTION:-triton}" \
  --mem-fraction-static "${MEM_FRACTION:-0.85}" --max-running-requests "${MAX_RUNNING:-64}" \
  --host "${HOST:-0.0.0.0}" --port "${PORT:-30000}" "$@"
