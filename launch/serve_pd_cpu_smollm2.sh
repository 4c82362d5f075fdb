#!/usr/bin/env bash
# A prefill/decode pair on the CPU lane: SmolLM2-135M-Instruct + the shipped drafter,
# prefill on 127.0.0.1:30000 (bootstrap 8998), decode on 127.0.0.1:30001, paired over
# SGLang's Mooncake backend on TCP (installed by `make install`). Send each request to
# both servers with "bootstrap_host": "127.0.0.1", "bootstrap_port": 8998 and a fresh
# "bootstrap_room"; the decode server answers (sglang_dflash.testing.local_server.PDPair
# does exactly that). Uses ~6 GiB of RAM.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$repo/.venv/bin/python}
MODEL=${MODEL:-$repo/.cache/models/smollm2-135m}
DRAFTER=${DRAFTER:-$repo/drafters/smollm2-135m-dflash}
export SGLANG_USE_CPU_ENGINE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MOONCAKE_PROTOCOL=tcp MC_FORCE_TCP=1
export LD_LIBRARY_PATH=$repo/.venv/pd-sysroot/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
[ -f "$MODEL/config.json" ] || "$PY" -m sglang_dflash.testing.devmodels smollm2 "$MODEL"
common=(--model-path "$MODEL" --speculative-algorithm DFLASH --speculative-draft-model-path "$DRAFTER"
        --device cpu --attention-backend torch_native --disable-cuda-graph --sleep-on-idle
        --dtype float32 --mem-fraction-static 0.25 --max-total-tokens 16384 --page-size 16
        --disaggregation-transfer-backend mooncake --host 127.0.0.1)
"$PY" -m sglang.launch_server "${common[@]}" --disaggregation-mode prefill --port 30000 \
  --disaggregation-bootstrap-port 8998 "$@" &
prefill=$!
"$PY" -m sglang.launch_server "${common[@]}" --disaggregation-mode decode --port 30001 \
  --disaggregation-decode-retraction-backup cpu_tensor "$@" &
decode=$!
trap 'kill $prefill $decode 2>/dev/null' EXIT INT TERM
wait -n $prefill $decode
