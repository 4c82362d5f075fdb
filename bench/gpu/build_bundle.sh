#!/usr/bin/env bash
# Build ONE tar.xz that brings SGLang 0.5.23 (the release sglang-dflash pins), its
# runtime closure and this package to the lent GPU machine in a single transfer.
#
#   bash bench/gpu/build_bundle.sh [OUT.tar.xz]      (default .gpucarry/bundle.tar.xz)
#
# Target: the device image (Python 3.12, torch 2.11.0+cu130, triton 3.6.0, no network,
# 64 MiB per transfer, the repo included). Wheels are fetched for cp312 / manylinux
# x86_64 with --no-deps, installed with `pip install --no-index --no-deps --target`,
# trimmed to what the server path needs, and packed with xz. Limit: 56 MiB.
#
# sgl_kernel route (SGL_KERNEL_ROUTE):
#   standin (default)  sglang_dflash/standins/sgl_kernel: sglang-kernel 0.4.10's import
#                      surface in pure Python; norms and gated activations run on
#                      FlashInfer's JIT kernels (torch fallback), every other op raises
#                      NotImplementedError naming itself.
#   real               sglang-kernel 0.4.10's sm90 `common_ops` (FA3, FlashMLA, InfLLM and
#                      sm100 removed), loaded with RTLD_LAZY, plus the stand-in beside it
#                      as a fallback that run_all.sh switches to when a probe fails.
# Why standin is the default: 0.4.10 is built against torch 2.14.1. Against torch
# 2.11.0+cu130 (the image's build; checked with `nm -D` on both wheels) its
# sm90/common_ops misses 5 torch symbols, two of them torch::Library::_def overloads
# (Tag moved to torch::headeronly) that run while the library registers its ops, i.e. at
# load, where lazy binding cannot defer them; and c10::TensorImpl shrank from 184 to 176
# bytes between the two (sizes_and_strides_, numel_, data_type_, key_set_ ... all moved
# by 8), so even with shimmed symbols every inlined tensor accessor in the .so would
# read the wrong fields. The `real` route is kept so that this can be re-checked on the
# device in one call (run_all.sh probes it in a subprocess and falls back).
#
# Other knobs: BUNDLE_CACHE (wheel cache + staging, default .cache/gpu-bundle),
# BUNDLE_XZ (xz preset, default -9e), BUNDLE_LIMIT_MIB (56), BUNDLE_STAGE_ONLY=1 (stop
# before packing; bench/gpu/bundle_check.py can check the staging folder), PYTHON.
# Reproducible: pinned wheels, sorted tar members with fixed mtime/owner, no
# timestamps in MANIFEST.json. Takes ~1 min to fetch (first run) and 3-6 min of xz -9e
# on 2 cores.
set -euo pipefail
start=$(date +%s)
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=$(realpath -m "${1:-$repo/.gpucarry/bundle.tar.xz}")
route=${SGL_KERNEL_ROUTE:-standin}
cache=$(realpath -m "${BUNDLE_CACHE:-$repo/.cache/gpu-bundle}")
py=${PYTHON:-python3}
xz_preset=${BUNDLE_XZ:--9e}
limit_mib=${BUNDLE_LIMIT_MIB:-56}
req=$here/requirements-bundle.txt
sgl_kernel_pin=sglang-kernel==0.4.10
case $route in standin|real) ;; *) echo "SGL_KERNEL_ROUTE must be standin or real, not '$route'" >&2; exit 2;; esac

plat="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux2014_x86_64"
for n in $(seq 17 39); do plat="$plat --platform manylinux_2_${n}_x86_64"; done
pip_quiet() { grep -v -e "is ignored: it is neither a file nor a directory" -e "Running pip as the 'root' user" || true; }

echo "== fetch wheels (cp312 manylinux x86_64) into $cache/wheels"
mkdir -p "$cache/wheels"
extra=()
[ "$route" = real ] && extra+=("$sgl_kernel_pin")
# shellcheck disable=SC2086
"$py" -m pip download -q --no-deps $plat -d "$cache/wheels" -r "$req" "${extra[@]}" 2>&1 | pip_quiet

stage=$cache/stage
site=$stage/site
echo "== install into $site"
rm -rf "$stage"
mkdir -p "$site" "$stage/standin"
# shellcheck disable=SC2086
"$py" -m pip install -q --no-index --no-deps --no-compile $plat --find-links "$cache/wheels" \
    --target "$site" -r "$req" 2>&1 | pip_quiet

echo "== trim"
cd "$site"
rm -rf bin
# SGLang: tests, the diffusion server, benchmarks, and the prebuilt Rust extensions: the
# HTTP/gRPC/multimodal ones are only loaded for --grpc-mode, the Rust server and image
# processors; the Rust radix-tree core links torch 2.14 (the Python tree core is used).
rm -rf sglang/test sglang/multimodal_gen sglang/benchmark sglang/bench_*.py \
       sglang/srt/rust_extensions/*.so sglang/srt/mem_cache/rust_tree_core/*.so
# FlashInfer: keep every Python module (its __init__ imports most of them) and the JIT
# sources of the kernels SGLang's flashinfer backend, norms, activations, sampling and
# paging build on sm90 (top-level csrc + include + cutlass/cccl/spdlog headers). Drop
# the csrc of model-specific/Blackwell kernels, tuning artifacts, examples and tests.
fi=flashinfer
find $fi/data/csrc -mindepth 1 -maxdepth 1 -type d ! -name generated -exec rm -rf {} +
rm -f $fi/data/csrc/cake_* $fi/data/csrc/alphamoe_* $fi/data/csrc/*sm100* $fi/data/csrc/*sm103* \
      $fi/data/csrc/*sm110* $fi/data/csrc/*sm120* $fi/data/csrc/*sm12x*
rm -rf $fi/data/cutlass/examples $fi/data/cutlass/python $fi/data/cutlass/test $fi/data/cutlass/docs \
       $fi/data/cutlass/media $fi/data/cccl/python $fi/data/cccl/ci $fi/data/cccl/docs $fi/data/cccl/examples \
       $fi/data/cccl/test $fi/data/cccl/c2h
find $fi/data/cutlass/tools -mindepth 1 -maxdepth 1 ! -name util -exec rm -rf {} +
find $fi/data/cutlass/tools/util -mindepth 1 -maxdepth 1 ! -name include -exec rm -rf {} + 2>/dev/null || true
rm -rf $fi/fused_moe/backends/cudnn_frost/artifacts $fi/moe_ep/kernel_src
find $fi/experimental -type d -name csrc -prune -exec rm -rf {} +
# test helpers and type stubs nobody imports at run time
rm -rf xgrammar/lib
find . -name __pycache__ -prune -exec rm -rf {} +
find . -name "*.pyi" -delete

echo "== sgl_kernel route: $route"
cp -r "$repo/sglang_dflash/standins/sgl_kernel" "$stage/standin/sgl_kernel"
find "$stage/standin" -name __pycache__ -prune -exec rm -rf {} +
if [ "$route" = real ]; then
    wheel=$(ls "$cache"/wheels/sglang_kernel-0.4.10-*.whl)
    "$py" - "$wheel" "$site" <<'EOF'
import sys, zipfile
wheel, site = sys.argv[1], sys.argv[2]
skip = ("sgl_kernel/flash_ops", "sgl_kernel/flashmla_ops", "sgl_kernel/infllm_ops", "sgl_kernel/sm100/", "triton_kernels/")
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(("sgl_kernel/", "sglang_kernel-")) and not name.startswith(skip):
            z.extract(name, site)
EOF
    # Load common_ops with lazy binding so that a missing symbol only fails when called.
    "$py" - "$site/sgl_kernel/load_utils.py" <<'EOF'
import sys
path = sys.argv[1]
src = open(path).read()
old = "            spec.loader.exec_module(common_ops)\n"
new = ("            import os as _os, sys as _sys\n"
       "            _flags = _sys.getdlopenflags()\n"
       "            _sys.setdlopenflags(_os.RTLD_LAZY | _os.RTLD_GLOBAL)\n"
       "            try:\n"
       "                spec.loader.exec_module(common_ops)\n"
       "            finally:\n"
       "                _sys.setdlopenflags(_flags)\n")
assert src.count(old) >= 1, "sgl_kernel/load_utils.py changed; update the lazy-load patch"
open(path, "w").write(src.replace(old, new, 1))
EOF
fi

echo "== IPython stub (sglang imports IPython.display for notebook helpers only)"
if ! [ -d IPython ]; then
    mkdir -p IPython
    printf '"""Stub: SGLang imports IPython.display for notebook helpers only."""\nfrom .display import HTML, display  # noqa: F401\n' > IPython/__init__.py
    printf 'class HTML:\n    def __init__(self, data=None, *args, **kwargs):\n        self.data = data\n\n\ndef display(*objs, **kwargs):\n    for obj in objs:\n        print(getattr(obj, "data", obj))\n' > IPython/display.py
fi

echo "== sglang_dflash (source tree + a dist-info carrying the plugin entry point)"
version=$("$py" -c "import re,sys; print(re.search(r'^version\s*=\s*\"([^\"]+)\"', open(sys.argv[1]).read(), re.M).group(1))" "$repo/pyproject.toml")
mkdir -p sglang_dflash
(cd "$repo" && tar cf - --exclude=__pycache__ --exclude='*.pyc' sglang_dflash) | tar xf - -C .
info=sglang_dflash-$version.dist-info
mkdir -p "$info"
printf 'Metadata-Version: 2.1\nName: sglang-dflash\nVersion: %s\nSummary: DFlash block-diffusion speculative decoding as an SGLang algorithm backend\n' "$version" > "$info/METADATA"
printf '[sglang.srt.plugins]\ndflash = sglang_dflash.plugin:register\n' > "$info/entry_points.txt"
printf 'sglang_dflash\n' > "$info/top_level.txt"
printf 'bundle\n' > "$info/INSTALLER"
: > "$info/RECORD"

echo "== manifest"
"$py" - "$stage" "$route" "$req" <<'EOF'
import hashlib, json, os, sys
from pathlib import Path
stage, route, req = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
site = stage / "site"
dists = {}
for info in sorted(site.glob("*.dist-info")):
    meta = dict(l.split(": ", 1) for l in (info / "METADATA").read_text(errors="replace").splitlines()[:20] if ": " in l)
    dists[meta.get("Name", info.name)] = meta.get("Version")
size = sum(f.stat().st_size for f in stage.rglob("*") if f.is_file())
manifest = {
    "format": 1,
    "sglang": dists.get("sglang"),
    "sgl_kernel_route": route,
    # PYTHONPATH order on the device, relative to the unpacked bundle
    "pythonpath": ["standin", "site"] if route == "standin" else ["site"],
    "fallback_pythonpath": ["standin", "site"],
    "target": {"python": "3.12", "torch": "2.11.0+cu130", "platform": "manylinux x86_64"},
    "requirements_sha256": hashlib.sha256(req.read_bytes()).hexdigest(),
    "unpacked_bytes": size,
    "distributions": dists,
}
(stage / "MANIFEST.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
print(f"   {len(dists)} distributions, {size / 2**20:.1f} MiB unpacked")
EOF
cd "$stage"
if [ "${BUNDLE_STAGE_ONLY:-0}" = 1 ]; then
    echo "staged in $stage ($(( $(date +%s) - start )) s); BUNDLE_STAGE_ONLY=1: not packed"
    exit 0
fi

echo "== pack ($xz_preset)"
mkdir -p "$(dirname "$out")"
pack_start=$(date +%s)
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --format=gnu -cf - MANIFEST.json site standin \
    | xz "$xz_preset" -T0 -c > "$out.part"
mv "$out.part" "$out"
bytes=$(stat -c %s "$out")
end=$(date +%s)
printf '== %s: %.1f MiB (route %s), packed in %d s, total %d s\n' "$out" "$(echo "$bytes / 1048576" | bc -l)" \
    "$route" $(( end - pack_start )) $(( end - start ))
if [ "$bytes" -gt $(( limit_mib * 1048576 )) ]; then
    echo "bundle is over the ${limit_mib} MiB limit" >&2
    exit 1
fi
