#!/usr/bin/env bash
# Every target family on the GPU lane: bench/architectures.py --device cuda, inside the
# bundle bench/gpu/build_bundle.sh builds (SGLang 0.5.23 and its closure for the GPU
# image). Run from the repo root with the device tool, carrying the bundle and,
# optionally, the drafters distilled on the CPU lane (else they are distilled on the GPU):
#
#   run(command="bash bench/architectures_gpu.sh", carry=[".gpucarry", ".cache/bench-architectures/drafters"], timeout_s=600)
#
# Arguments go to bench/architectures.py (e.g. --archs gpt_oss qwen3_5 --prompts 16).
# Writes results.md / results.json / logs.tar.xz to $OUT (default .gpuwork/out/architectures).
set -uo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
work=$repo/.gpuwork
bundle=${GPU_LANE_BUNDLE:-$repo/.gpucarry/bundle.tar.xz}
out=${OUT:-$work/out}/architectures
py=${PYTHON:-python3}
mkdir -p "$out" "$work/jit"

# The bundle, unpacked once per warm machine (the same layout bench/gpu/run_all.sh uses).
if [ ! -f "$work/bundle/MANIFEST.json" ]; then
    [ -f "$bundle" ] || { echo "no bundle at $bundle: build it with bash bench/gpu/build_bundle.sh"; exit 2; }
    mkdir -p "$work/bundle" && xz -d -T0 -c "$bundle" | tar -x -C "$work/bundle" || exit 2
fi
# The stand-in route: sglang-kernel 0.4.10's compiled ops do not load on the image's torch.
paths=$("$py" -c "import json,sys; m=json.load(open(sys.argv[1])); print(':'.join(sys.argv[2]+'/'+p for p in m.get('fallback_pythonpath') or m['pythonpath']))" \
    "$work/bundle/MANIFEST.json" "$work/bundle")
export PYTHONPATH=$repo:$paths
export TRITON_CACHE_DIR=$work/jit/triton FLASHINFER_WORKSPACE_BASE=$work/jit/flashinfer \
       TVM_FFI_CACHE_DIR=$work/jit/tvm-ffi SGLANG_CACHE_DIR=$work/jit/sglang \
       TORCHINDUCTOR_CACHE_DIR=$work/jit/inductor XDG_CACHE_HOME=$work/jit/xdg HF_HOME=$work/hf \
       HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 \
       SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND=python SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE=1 \
       FLASHINFER_CUDA_ARCH_LIST=${FLASHINFER_CUDA_ARCH_LIST:-9.0a}
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
    CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")"); export CUDA_HOME
fi
drafters=()
[ -d .cache/bench-architectures/drafters ] && drafters=(--drafters .cache/bench-architectures/drafters)

timeout --signal=TERM --kill-after=20 "${ARCH_BUDGET_S:-540}" \
    "$py" -m bench.architectures --device cuda --work "$work/architectures" "${drafters[@]}" --out "$out" "$@" \
    2>&1 | tee "$out/run.log"
rc=${PIPESTATUS[0]}
tar -C /tmp -cJf "$out/logs.tar.xz" $(cd /tmp && ls -d sglang-server-*.log 2>/dev/null) 2>/dev/null
exit "$rc"
