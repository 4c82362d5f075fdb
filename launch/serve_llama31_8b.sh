#!/usr/bin/env bash
# Llama-3.1-8B-Instruct with z-lab's UltraChat DFlash drafter (trained with block 10).
exec env MODEL="${MODEL:-meta-llama/Llama-3.1-8B-Instruct}" \
  DRAFTER="${DRAFTER:-z-lab/LLaMA3.1-8B-Instruct-DFlash-UltraChat}" BLOCK="${BLOCK:-10}" \
  bash "$(dirname "$0")/serve_qwen3_8b.sh" "$@"
