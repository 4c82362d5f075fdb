#!/usr/bin/env bash
# GPU lane, one entry point for the lent GPU machine (run from the repo root):
#
#   bash bench/gpu/run_all.sh [PHASE ...]     phases: env unpack models nospec ours upstream micro drafter report
#
# Needs the bundle from bench/gpu/build_bundle.sh at .gpucarry/bundle.tar.xz (carry
# `.gpucarry`). Works in .gpuwork/ (git-ignored; kept while the machine stays warm) and
# writes to $OUT (default .gpuwork/out): gpu_results.md, gpu_results.json,
# logs.tar.xz, run_all.log and, when small enough, jit-cache.tar.xz (compiled kernels;
# put it in .gpucarry/ next time and the JIT compiles are skipped).
#
# Robustness: every phase runs under `timeout` inside an overall budget
# (GPU_LANE_BUDGET_S, default 570 s, under the device tool's 10-minute limit); a phase
# that fails or times out is recorded and the next one runs; a phase whose result is
# already in .gpuwork/results is skipped (GPU_LANE_FORCE=1 re-runs), so a second call
# on a warm machine finishes what a first one could not. Servers are killed by process
# group when their phase ends, however it ends.
set -uo pipefail
start=$(date +%s)
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
work=$repo/.gpuwork
OUT=${OUT:-$work/out}
budget=${GPU_LANE_BUDGET_S:-570}
bundle=${GPU_LANE_BUNDLE:-$repo/.gpucarry/bundle.tar.xz}
jit_carry=${GPU_LANE_JIT_CACHE:-$repo/.gpucarry/jit-cache.tar.xz}
res=$work/results
logs=$work/logs
py=${PYTHON:-python3}
mkdir -p "$OUT" "$res" "$logs" "$work/jit"
exec > >(tee -a "$OUT/run_all.log") 2>&1
phases=("$@")
[ ${#phases[@]} -eq 0 ] && phases=(env unpack models nospec ours upstream micro drafter report)

say() { printf '[run_all %s +%ss] %s\n' "$(date +%H:%M:%S)" "$(( $(date +%s) - start ))" "$*"; }
left() { echo $(( budget - ($(date +%s) - start) )); }
done_ok() { [ "${GPU_LANE_FORCE:-0}" != 1 ] && [ -f "$res/$1.json" ] && grep -q '"ok": true' "$res/$1.json"; }
kill_server() {
    local pidfile=$work/server.pid
    if [ -f "$pidfile" ]; then
        local pid; pid=$(cat "$pidfile")
        if kill -0 "$pid" 2>/dev/null; then
            say "killing leftover server process group $pid"
            kill -TERM -- "-$pid" 2>/dev/null; sleep 5; kill -KILL -- "-$pid" 2>/dev/null
            for _ in $(seq 1 20); do  # let the driver release its memory before the next server
                used=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -1)
                [ -z "$used" ] || [ "$used" -lt 4096 ] && break
                sleep 2
            done
        fi
        rm -f "$pidfile"
    fi
}
# run PHASE_NAME SECONDS CMD...: bounded by the phase's seconds and what is left overall
run_phase() {
    local name=$1 secs=$2; shift 2
    local avail; avail=$(( $(left) - 25 ))
    [ "$secs" -gt "$avail" ] && secs=$avail
    if [ "$secs" -lt 20 ]; then
        say "$name: skipped, budget spent"
        return 1
    fi
    say "$name: start (up to ${secs}s)"
    GPU_LANE_PIDFILE=$work/server.pid timeout --signal=TERM --kill-after=30 "$secs" "$@" > "$logs/$name.log" 2>&1
    local rc=$?
    kill_server
    say "$name: rc=$rc ($(tail -n 1 "$logs/$name.log" 2>/dev/null | cut -c1-200))"
    return $rc
}

# ------------------------------------------------------------------ environment + bundle
setup_env() {
    local manifest=$work/bundle/MANIFEST.json
    [ -f "$manifest" ] || phase_unpack
    [ -f "$manifest" ] || { say "no unpacked bundle in $work/bundle"; return 1; }
    local route paths fallback
    route=$("$py" -c "import json,sys; print(json.load(open(sys.argv[1]))['sgl_kernel_route'])" "$manifest")
    paths=$("$py" -c "import json,sys; print(':'.join(sys.argv[2] + '/' + p for p in json.load(open(sys.argv[1]))['pythonpath']))" "$manifest" "$work/bundle")
    fallback=$("$py" -c "import json,sys; print(':'.join(sys.argv[2] + '/' + p for p in json.load(open(sys.argv[1]))['fallback_pythonpath']))" "$manifest" "$work/bundle")
    export PYTHONPATH=$repo:$paths
    export GPU_LANE_ROUTE=$route
    export TRITON_CACHE_DIR=$work/jit/triton FLASHINFER_WORKSPACE_BASE=$work/jit/flashinfer \
           TVM_FFI_CACHE_DIR=$work/jit/tvm-ffi SGLANG_CACHE_DIR=$work/jit/sglang \
           TORCHINDUCTOR_CACHE_DIR=$work/jit/inductor XDG_CACHE_HOME=$work/jit/xdg HF_HOME=$work/hf \
           HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 \
           SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND=python MAX_JOBS=${MAX_JOBS:-16} \
           FLASHINFER_CUDA_ARCH_LIST=${FLASHINFER_CUDA_ARCH_LIST:-9.0a}
    if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
        CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")"); export CUDA_HOME
    fi
    if [ "$route" = real ]; then
        # the real sglang-kernel 0.4.10 must load AND compute right on this torch; else use the stand-in
        if timeout 180 "$py" - > "$logs/sgl_kernel_probe.log" 2>&1 <<'EOF'
import torch, sgl_kernel
x = torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16)
w = torch.rand(4096, device="cuda", dtype=torch.bfloat16)
out = torch.empty_like(x)
torch.ops.sgl_kernel.rmsnorm.default(out, x, w, 1e-6, False)
ref = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6) * w.float()).to(x.dtype)
err = (out.float() - ref.float()).abs().max().item()
print("max abs err", err)
assert err < 0.05, err
EOF
        then
            say "sgl_kernel: real sglang-kernel 0.4.10 probe passed"
        else
            say "sgl_kernel: real sglang-kernel probe FAILED ($(tail -n 2 "$logs/sgl_kernel_probe.log" | tr '\n' ' ' | cut -c1-200)); using the stand-in"
            export PYTHONPATH=$repo:$fallback GPU_LANE_ROUTE="standin (real failed its probe)"
        fi
    fi
    say "PYTHONPATH=$PYTHONPATH route=$GPU_LANE_ROUTE CUDA_HOME=${CUDA_HOME:-unset}"
}

phase_unpack() {
    [ -f "$bundle" ] || { say "unpack: no bundle at $bundle (build it with bench/gpu/build_bundle.sh)"; return 1; }
    local sum; sum=$(sha256sum "$bundle" | cut -c1-64)
    if [ -f "$work/bundle/.sha256" ] && [ "$(cat "$work/bundle/.sha256")" = "$sum" ]; then
        say "unpack: bundle already unpacked"
    else
        rm -rf "$work/bundle"; mkdir -p "$work/bundle"
        local t0; t0=$(date +%s)
        xz -d -T0 -c "$bundle" | tar -x -C "$work/bundle" || { say "unpack: FAILED"; return 1; }
        echo "$sum" > "$work/bundle/.sha256"
        say "unpack: $(du -sh "$work/bundle" | cut -f1) in $(( $(date +%s) - t0 ))s"
    fi
    if [ -f "$jit_carry" ] && [ ! -f "$work/jit/.restored" ]; then
        tar -xJf "$jit_carry" -C "$work/jit" && touch "$work/jit/.restored" && say "unpack: restored JIT caches from $jit_carry"
    fi
}

machine_report() {
    {
        echo "## nvidia-smi"; timeout 30 nvidia-smi 2>&1 | head -20
        echo "## glibc"; ldd --version 2>&1 | head -1
        echo "## nvcc"; timeout 30 nvcc --version 2>&1 | tail -2
        echo "## python"; timeout 60 "$py" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, torch.version.cuda)"
        echo "## disk"; df -h "$work" 2>&1 | tail -1
    } > "$logs/env_machine.txt" 2>&1
}

collect() {
    say "collect: report + logs + JIT caches into $OUT"
    "$py" bench/gpu/gpu_bench.py report --results "$res" --out "$OUT" > "$logs/report.log" 2>&1 \
        || say "report FAILED: $(tail -n 3 "$logs/report.log" | tr '\n' ' ')"
    cp "$res"/*.json "$logs/" 2>/dev/null
    tar -C "$work" -cJf "$OUT/logs.tar.xz" logs 2>/dev/null
    local limit=$(( 15 * 1048576 ))
    local t0; t0=$(date +%s)
    for exclude in "" "--exclude=triton --exclude=inductor --exclude=xdg"; do
        # shellcheck disable=SC2086
        tar -C "$work/jit" $exclude --exclude=.restored -cf - . 2>/dev/null | xz -6 -T0 > "$OUT/jit-cache.tar.xz"
        [ "$(stat -c %s "$OUT/jit-cache.tar.xz")" -le "$limit" ] && break
        rm -f "$OUT/jit-cache.tar.xz"
    done
    if [ -f "$OUT/jit-cache.tar.xz" ]; then
        say "collect: jit-cache.tar.xz $(du -h "$OUT/jit-cache.tar.xz" | cut -f1) in $(( $(date +%s) - t0 ))s"
    else
        say "collect: JIT caches over 15 MiB even without triton; not returned ($(du -sh "$work/jit" | cut -f1))"
    fi
}

trap 'kill_server' EXIT
say "phases: ${phases[*]}; budget ${budget}s; OUT=$OUT"
for phase in "${phases[@]}"; do
    case $phase in
        unpack) phase_unpack ;;
        env)
            machine_report
            setup_env && run_phase env 120 "$py" bench/gpu/gpu_bench.py env --results "$res" ;;
        models)
            [ -n "${GPU_LANE_ROUTE:-}" ] || setup_env
            done_ok models || run_phase models 150 "$py" bench/gpu/gpu_bench.py models --models "$work/models" --results "$res" ;;
        nospec|ours|upstream)
            [ -n "${GPU_LANE_ROUTE:-}" ] || setup_env
            if done_ok "serve_$phase"; then say "$phase: done earlier, skipped"; continue; fi
            case $phase in nospec) secs=240 ;; ours) secs=210 ;; upstream) secs=180 ;; esac
            # the first server on a machine without compiled kernels pays for the JIT builds
            if [ "$phase" = nospec ] && [ -z "$(ls -A "$work/jit/flashinfer" 2>/dev/null)" ]; then secs=330; fi
            run_phase "serve_$phase" "$secs" "$py" bench/gpu/gpu_bench.py serve --mode "$phase" --models "$work/models" \
                --results "$res" --logs "$logs" --budget $(( secs - 40 )) --start-timeout $(( secs - 70 ))
            if [ "$phase" = upstream ] && ! done_ok serve_upstream && [ "$(left)" -gt 150 ]; then
                # the plugin's upstream passthrough failed: run SGLang's DFLASH with the plugin not loaded
                say "upstream: retry with SGLANG_PLUGINS=none (plugin not loaded)"
                SGLANG_PLUGINS=none run_phase serve_upstream_noplugin 150 "$py" bench/gpu/gpu_bench.py serve --mode upstream \
                    --models "$work/models" --results "$res" --logs "$logs" --budget 110 --start-timeout 90 --tag _noplugin \
                    && cp "$res/serve_upstream_noplugin.json" "$res/serve_upstream.json"
            fi ;;
        micro)
            [ -n "${GPU_LANE_ROUTE:-}" ] || setup_env
            done_ok micro || run_phase micro 120 "$py" bench/gpu/gpu_bench.py micro --results "$res" --budget 90 ;;
        drafter)
            # the kernel-level drafter benchmark (bench/gpu/drafter_step.py), when the repo has it
            [ -n "${GPU_LANE_ROUTE:-}" ] || setup_env
            if [ -f bench/gpu/drafter_step.py ] && ! [ -s "$res/drafter_kernel.json" ]; then
                run_phase drafter_kernel 120 "$py" bench/gpu/drafter_step.py --json "$res/drafter_kernel.json"
            fi ;;
        report) ;;
        *) say "unknown phase $phase" ;;
    esac
done
collect
say "done in $(( $(date +%s) - start ))s; results in $OUT"
