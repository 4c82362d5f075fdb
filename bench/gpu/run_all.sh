#!/usr/bin/env bash
# GPU lane, one entry point (run from anywhere; it works in the repo root):
#
#   bash bench/gpu/run_all.sh [PHASE|GROUP ...]     default: every phase of `gpu_bench.py plan`, in order
#   GPU_LANE_DRYRUN=1 bash bench/gpu/run_all.sh     the same phases on CPU (a rehearsal; see README.md)
#
# Groups: eq (every equality phase), eq_bf16, eq_fp32, tests, speed (models + 4 modes), micro.
# Needs .gpucarry/bundle.tar.xz (make gpu-bundle) and .gpucarry/pair (make gpu-pair); carry
# `.gpucarry`. Works in .gpuwork/ (git-ignored; kept while the machine stays warm) and writes
# to $OUT (default .gpuwork/out), after EVERY phase: gpu_results.md, gpu_results.json,
# logs.tar.gz, plus run_all.log as it goes and, at the end, jit-cache.tar.xz (compiled
# kernels, when under 15 MiB: put it in .gpucarry/ next time and the JIT builds are skipped).
#
# Bounded: the whole run by GPU_LANE_BUDGET_S (default 420 s on the device, under the
# 10-minute limit of one call), each phase by its own cap (`gpu_bench.py plan`) and by what
# is left. A phase that fails or times out is recorded and the next one runs. Phases already
# done are skipped (GPU_LANE_FORCE=1 re-runs them): done in .gpuwork/results on a warm
# machine, or in a previous call's gpu_results.json copied to .gpucarry/ (GPU_LANE_PREVIOUS)
# on a fresh one. `bg` phases (the CUDA tests) run beside the next ones; `par` phases (the
# equality servers after the first, which pays the JIT builds) run side by side on the device
# (GPU_LANE_PARALLEL=0: one after another, the rehearsal's default); `excl` phases
# (everything timed) wait for all of them. Servers die with their phase, by process group.
set -uo pipefail
start=$(date +%s)
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
dryrun=${GPU_LANE_DRYRUN:-0}
work=${GPU_LANE_WORK:-$repo/.gpuwork}
OUT=${OUT:-$work/out}
if [ "$dryrun" = 1 ]; then
    budget=${GPU_LANE_BUDGET_S:-5400}
    parallel=${GPU_LANE_PARALLEL:-0}  # two cores
    py=${PYTHON:-$( [ -x "$repo/.venv/bin/python" ] && echo "$repo/.venv/bin/python" || echo python3 )}
else
    budget=${GPU_LANE_BUDGET_S:-420}
    parallel=${GPU_LANE_PARALLEL:-1}
    py=${PYTHON:-python3}
fi
bundle=${GPU_LANE_BUNDLE:-$repo/.gpucarry/bundle.tar.xz}
jit_carry=${GPU_LANE_JIT_CACHE:-$repo/.gpucarry/jit-cache.tar.xz}
previous=${GPU_LANE_PREVIOUS:-$repo/.gpucarry/gpu_results.json}
res=$work/results
logs=$work/logs
pids=$work/pids
reserve=30  # seconds kept for the final collect
mkdir -p "$OUT" "$res" "$logs" "$pids" "$work/jit" "$work/models"
exec > >(tee -a "$OUT/run_all.log") 2>&1

say() { printf '[run_all %s +%ss] %s\n' "$(date +%H:%M:%S)" "$(( $(date +%s) - start ))" "$*"; }
left() { echo $(( budget - ($(date +%s) - start) )); }
# `models` writes files the speed phases read: never taken as done (it reuses them when present)
done_ok() { [ "$1" != models ] && [ "${GPU_LANE_FORCE:-0}" != 1 ] && [ -f "$res/$1.json" ] && grep -q '"ok": true' "$res/$1.json"; }

kill_group_of() {  # PIDFILE: TERM, then KILL, every process group a phase started
    local file=$1 pid
    [ -f "$file" ] || return 0
    while read -r pid; do
        [ -n "$pid" ] || continue
        if kill -0 -- "-$pid" 2>/dev/null; then
            say "killing leftover process group $pid"
            kill -TERM -- "-$pid" 2>/dev/null
            for _ in $(seq 1 20); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.5; done
            kill -KILL -- "-$pid" 2>/dev/null
        fi
    done < "$file"
    rm -f "$file"
}

publish() {  # the report and logs as they stand, into $OUT
    "$py" bench/gpu/gpu_bench.py report --results "$res" --out "$OUT" > "$logs/report.log" 2>&1 \
        || say "report FAILED: $(tail -n 3 "$logs/report.log" | tr '\n' ' ')"
    local part=$OUT/.logs.$BASHPID.part  # a background phase may publish at the same time
    tar -C "$work" -czf "$part" logs results 2>/dev/null && mv "$part" "$OUT/logs.tar.gz"
}

# run_phase NAME CAP: one gpu_bench.py phase under `timeout`, bounded by its cap and the budget
run_phase() {
    local name=$1 secs=$2 avail
    avail=$(( $(left) - reserve ))
    [ "$secs" -gt "$avail" ] && secs=$avail
    if [ "$secs" -lt 20 ]; then
        say "$name: not started, budget spent"
        return 1
    fi
    say "$name: start (up to ${secs}s)"
    GPU_LANE_PIDFILE=$pids/$name timeout --signal=TERM --kill-after=20 "$secs" \
        "$py" bench/gpu/gpu_bench.py run "$name" --results "$res" --logs "$logs" --models "$work/models" \
        --budget $(( secs - 15 )) > "$logs/phase_$name.log" 2>&1
    local rc=$?
    kill_group_of "$pids/$name"
    [ -f "$res/$name.json" ] || printf '{"ok": false, "phase": "%s", "error": "killed after %ss (rc %s) before writing a result"}\n' \
        "$name" "$secs" "$rc" > "$res/$name.json"
    say "$name: rc=$rc ($(tail -n 1 "$logs/phase_$name.log" 2>/dev/null | cut -c1-160))"
    [ "$dryrun" = 1 ] || say "$name: JIT caches now $(du -sh "$work/jit" 2>/dev/null | cut -f1)"
    publish
    return $rc
}

bg=()  # background phases: "pid name"
start_bg() {  # NAME CAP: a phase beside the ones that follow (its cap is counted from now, within the budget)
    run_phase "$1" "$2" &
    bg+=("$! $1")
    sleep 3  # staggered: servers starting together pick ports and profile memory one after another
}
wait_bg() {  # every background phase ends within its own cap, itself within the budget
    local entry
    for entry in "${bg[@]}"; do
        say "waiting for background phase ${entry#* }"
        wait "${entry%% *}" 2>/dev/null
    done
    bg=()
}

# ------------------------------------------------------------------ environment
setup_env() {
    export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false GPU_LANE_DRYRUN=$dryrun
    if [ "$dryrun" = 1 ]; then
        export PYTHONPATH=$repo SGLANG_USE_CPU_ENGINE=1 GPU_LANE_ROUTE="cpu rehearsal (no bundle)"
        return 0
    fi
    local manifest=$work/bundle/MANIFEST.json route paths fallback
    [ -f "$manifest" ] || unpack
    [ -f "$manifest" ] || { say "no unpacked bundle in $work/bundle"; return 1; }
    route=$("$py" -c "import json,sys; print(json.load(open(sys.argv[1]))['sgl_kernel_route'])" "$manifest")
    paths=$("$py" -c "import json,sys; print(':'.join(sys.argv[2] + '/' + p for p in json.load(open(sys.argv[1]))['pythonpath']))" "$manifest" "$work/bundle")
    fallback=$("$py" -c "import json,sys; print(':'.join(sys.argv[2] + '/' + p for p in json.load(open(sys.argv[1]))['fallback_pythonpath']))" "$manifest" "$work/bundle")
    export PYTHONPATH=$repo:$paths GPU_LANE_ROUTE=$route
    # every compile cache in one folder: kept while the machine is warm, returned at the end
    export TRITON_CACHE_DIR=$work/jit/triton FLASHINFER_WORKSPACE_BASE=$work/jit/flashinfer \
           TVM_FFI_CACHE_DIR=$work/jit/tvm-ffi SGLANG_CACHE_DIR=$work/jit/sglang \
           TORCHINDUCTOR_CACHE_DIR=$work/jit/inductor XDG_CACHE_HOME=$work/jit/xdg HF_HOME=$work/hf \
           SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND=python MAX_JOBS=${MAX_JOBS:-16} \
           FLASHINFER_CUDA_ARCH_LIST=${FLASHINFER_CUDA_ARCH_LIST:-9.0a}
    if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
        CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")"); export CUDA_HOME
    fi
    if [ "$route" = real ]; then
        # the real sglang-kernel must load AND compute right on this torch; else the stand-in
        if ! timeout 180 "$py" - > "$logs/sgl_kernel_probe.log" 2>&1 <<'EOF'
import torch, sgl_kernel
x = torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16)
w = torch.rand(4096, device="cuda", dtype=torch.bfloat16)
out = torch.empty_like(x)
torch.ops.sgl_kernel.rmsnorm.default(out, x, w, 1e-6, False)
ref = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6) * w.float()).to(x.dtype)
assert (out.float() - ref.float()).abs().max().item() < 0.05
EOF
        then
            say "sgl_kernel: real sglang-kernel probe FAILED; using the stand-in"
            export PYTHONPATH=$repo:$fallback GPU_LANE_ROUTE="standin (real failed its probe)"
        fi
    fi
    say "PYTHONPATH=$PYTHONPATH route=$GPU_LANE_ROUTE CUDA_HOME=${CUDA_HOME:-unset}"
}

unpack() {
    [ -f "$bundle" ] || { say "unpack: no bundle at $bundle (make gpu-bundle)"; return 1; }
    local sum t0; sum=$(sha256sum "$bundle" | cut -c1-64)
    if [ "$(cat "$work/bundle/.sha256" 2>/dev/null)" != "$sum" ]; then
        rm -rf "$work/bundle"; mkdir -p "$work/bundle"; t0=$(date +%s)
        xz -d -T0 -c "$bundle" | tar -x -C "$work/bundle" || { say "unpack: FAILED"; return 1; }
        echo "$sum" > "$work/bundle/.sha256"
        say "unpack: $(du -sh "$work/bundle" | cut -f1) in $(( $(date +%s) - t0 ))s"
    fi
    if [ -f "$jit_carry" ] && [ ! -f "$work/jit/.restored" ]; then
        tar -xJf "$jit_carry" -C "$work/jit" && touch "$work/jit/.restored" && say "unpack: restored JIT caches from $jit_carry"
    fi
}

import_previous() {  # phases a previous call finished (its gpu_results.json, copied to .gpucarry/)
    [ -f "$previous" ] || return 0
    "$py" - "$previous" "$res" <<'EOF'
import json, sys
from pathlib import Path
phases = json.loads(Path(sys.argv[1]).read_text()).get("phases", {})
res = Path(sys.argv[2])
took = [n for n, d in phases.items() if d.get("ok") and n != "models" and not (res / f"{n}.json").exists()]
for n in took:
    (res / f"{n}.json").write_text(json.dumps(phases[n]))
print("imported from the previous call:", ", ".join(took) or "nothing")
EOF
}

machine_report() {
    {
        echo "## nvidia-smi"; timeout 30 nvidia-smi 2>&1 | head -15
        echo "## nvcc"; timeout 30 nvcc --version 2>&1 | tail -2
        echo "## python"; timeout 60 "$py" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, torch.version.cuda)"
        echo "## cpus"; nproc
        echo "## disk"; df -h "$work" 2>&1 | tail -1
    } > "$logs/env_machine.txt" 2>&1
}

collect() {
    wait_bg
    publish
    [ "$dryrun" = 1 ] && return 0
    # the compiled kernels, within what is left of the budget (a partial archive never lands in $OUT)
    local limit=$(( 15 * 1048576 )) t0 secs exclude part=$OUT/.jit.part
    t0=$(date +%s)
    for exclude in "" "--exclude=triton --exclude=inductor --exclude=xdg"; do
        secs=$(( $(left) + reserve - 5 ))
        [ "$secs" -ge 10 ] || { say "collect: no time left to pack the JIT caches"; break; }
        # shellcheck disable=SC2086
        if timeout "$secs" bash -c "tar -C '$work/jit' $exclude --exclude=.restored -cf - . | xz -3 -T0 > '$part'" \
            && [ "$(stat -c %s "$part")" -le "$limit" ]; then
            mv "$part" "$OUT/jit-cache.tar.xz"
            say "collect: jit-cache.tar.xz $(du -h "$OUT/jit-cache.tar.xz" | cut -f1) in $(( $(date +%s) - t0 ))s"
            break
        fi
    done
    rm -f "$part"
    [ -f "$OUT/jit-cache.tar.xz" ] || say "collect: JIT caches not returned ($(du -sh "$work/jit" | cut -f1))"
}

# ------------------------------------------------------------------ phases
trap 'for f in "$pids"/*; do kill_group_of "$f"; done' EXIT
setup_env || { publish; exit 1; }
mapfile -t plan < <("$py" bench/gpu/gpu_bench.py plan)
[ ${#plan[@]} -gt 0 ] || { say "gpu_bench.py plan failed"; exit 1; }
selected=("$@")
want() {  # is phase $1 selected (by name or group)?
    [ ${#selected[@]} -eq 0 ] && return 0
    local s
    for s in "${selected[@]}"; do
        case $s in
            "$1") return 0 ;;
            eq|eq_bf16|eq_fp32|speed|tests) [[ $1 == "$s"_* ]] && return 0 ;;
        esac
        [ "$s" = speed ] && [ "$1" = models ] && return 0
        [ "$s" = micro ] && [ "$1" = drafter_kernel ] && return 0
    done
    return 1
}
import_previous
say "budget ${budget}s; dryrun=$dryrun; OUT=$OUT; phases: ${*:-all}"
for line in "${plan[@]}"; do
    read -r name cap how <<< "$line"
    want "$name" || continue
    if done_ok "$name"; then say "$name: done earlier, skipped"; continue; fi
    [ "$name" = env ] && machine_report
    case $how in
        bg) start_bg "$name" "$cap" ;;
        par)  # beside the others on the device (nothing timed); one after another in the rehearsal
            if [ "$parallel" = 1 ]; then start_bg "$name" "$cap"; else run_phase "$name" "$cap"; fi ;;
        excl) wait_bg; run_phase "$name" "$cap" ;;
        *) run_phase "$name" "$cap" ;;
    esac
    if [ "$name" = env ] && ! done_ok env; then
        say "env failed: the lane cannot run here; see gpu_results.md"
        break
    fi
done
collect
say "done in $(( $(date +%s) - start ))s; results in $OUT"
