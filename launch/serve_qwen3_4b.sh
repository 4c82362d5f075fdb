#!/usr/bin/env bash
# Qwen3-4B with z-lab's DFlash drafter (block 16) on one GPU. See serve_qwen3_8b.sh.
exec env MODEL="${MODEL:-Qwen/Qwen3-4B}" DRAFTER="${DRAFTER:-z-lab/Qwen3-4B-DFlash-b16}" \
  bash "$(dirname "$0")/serve_qwen3_8b.sh" "$@"
