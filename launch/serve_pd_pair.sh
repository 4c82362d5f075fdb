#!/usr/bin/env bash
# Prefill/decode disaggregation on one 8-GPU node: a prefill server on GPUs 0-3 and a
# decode server on GPUs 4-7, both TP 4 with our DFLASH, paired through SGLang's
# transfer backend (Mooncake by default; the drafter's KV rows travel with the target's
# KV pages). Both sides must run the same drafter and TP size. A PD router sends each
# request to both (SGLang's sglang-router: --pd-disaggregation --prefill URL BOOTSTRAP_PORT
# --decode URL). Extra args go to both servers.
#   MODEL=Qwen/Qwen3-8B DRAFTER=z-lab/Qwen3-8B-DFlash-b16 bash launch/serve_pd_pair.sh
set -euo pipefail
PY=${PY:-python}
MODEL=${MODEL:-Qwen/Qwen3-8B}
DRAFTER=${DRAFTER:-z-lab/Qwen3-8B-DFlash-b16}
TP=${TP:-4}
BACKEND=${BACKEND:-mooncake}
common=(--model-path "$MODEL" --speculative-algorithm DFLASH --speculative-draft-model-path "$DRAFTER"
        --speculative-draft-attention-backend flashinfer --attention-backend "${ATTENTION:-flashinfer}"
        --tp-size "$TP" --disaggregation-transfer-backend "$BACKEND" --host "${HOST:-0.0.0.0}")
"$PY" -m sglang.launch_server "${common[@]}" --disaggregation-mode prefill --base-gpu-id 0 \
  --port "${PREFILL_PORT:-30000}" --disaggregation-bootstrap-port "${BOOTSTRAP_PORT:-8998}" "$@" &
prefill=$!
"$PY" -m sglang.launch_server "${common[@]}" --disaggregation-mode decode --base-gpu-id "$TP" \
  --port "${DECODE_PORT:-30001}" "$@" &
decode=$!
trap 'kill $prefill $decode 2>/dev/null' EXIT INT TERM
wait -n $prefill $decode
