"""Check the GPU bundle on a machine without a GPU, as far as that can go.

The bundle (``bench/gpu/build_bundle.sh``) is made for the GPU machine's image: Python
3.12, torch 2.11.0+cu130 and the packages listed in :data:`IMAGE_PACKAGES`. Here we
have neither that Python nor that torch, so the check rebuilds the closest thing:

* **an image view**: a folder of links to this interpreter's copies of the packages
  the image has (torch among them), and nothing else, so a package the bundle forgot
  shows up as ``ModuleNotFoundError`` instead of being found in this environment;
* **an ABI overlay**: the bundle's cp312 extension modules cannot load in another
  Python, so next to each one we put a build for this Python of the *same
  distribution at the same version* (this environment's, or that version's wheel
  fetched once; for Python 3.12 itself nothing is added);
* **a fake H100**: ``torch.cuda`` answers as an sm90 device, so SGLang's module-level
  ``if is_cuda():`` branches import what they import on the GPU machine (the real
  ``sgl_kernel`` route cannot load without CUDA; the stand-in route can).

Then it imports the server path module by module in a fresh ``python -S`` and reports
what loaded. CLI: ``python bench/gpu/bundle_check.py BUNDLE.tar.xz`` (or an unpacked
folder).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path
from typing import Iterable, Optional

# The 'cuda' image's Python packages (the device tool's KINDS.md, read 2026-11-17).
IMAGE_PACKAGES = frozenset(
    """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
    certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
    cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
    flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
    huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
    jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
    llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
    multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
    nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
    nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
    nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
    opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec
    patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
    py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
    pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
    scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools
    shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server
    tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric
    torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3
    uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp""".split()
)

# What `python -m sglang.launch_server` imports on the GPU machine for our runs, in the
# order a failure is easiest to read (leaves first).
SERVER_PATH_MODULES = (
    "sgl_kernel",
    "transformers",
    "xgrammar",
    "flashinfer",
    "flashinfer.norm",
    "flashinfer.activation",
    "flashinfer.sampling",
    "flashinfer.decode",
    "flashinfer.prefill",
    "sglang",
    "sglang.srt.server_args",
    "sglang.srt.layers.layernorm",
    "sglang.srt.layers.activation",
    "sglang.srt.layers.sampler",
    "sglang.srt.layers.attention.flashinfer_backend",
    "sglang.srt.models.qwen3",
    "sglang.srt.model_executor.model_runner",
    "sglang.srt.managers.scheduler",
    "sglang.srt.managers.tokenizer_manager",
    "sglang.srt.managers.detokenizer_manager",
    "sglang.srt.speculative.dflash_worker_v2",
    "sglang.srt.entrypoints.http_server",
    "sglang.launch_server",
    "sglang_dflash",
    "sglang_dflash.plugin",
    "sglang_dflash.host.hooks",
    "sglang_dflash.host.worker",
)

_FAKE_H100 = r'''
import types, torch
_props = types.SimpleNamespace(name="NVIDIA H100 80GB HBM3", major=9, minor=0, total_memory=80 * 2**30,
                               multi_processor_count=132, L2_cache_size=50 * 2**20, gcnArchName="",
                               is_integrated=False, uuid="GPU-00000000-0000-0000-0000-000000000000")
torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1
torch.cuda.current_device = lambda: 0
torch.cuda.get_device_capability = lambda device=None: (9, 0)
torch.cuda.get_device_name = lambda device=None: _props.name
torch.cuda.get_device_properties = lambda device=None: _props
torch.cuda.mem_get_info = lambda device=None: (79 * 2**30, 80 * 2**30)
torch.cuda.is_bf16_supported = lambda *a, **k: True
torch.version.cuda = "13.0"
'''

_IMPORT_LOOP = r'''
import importlib, json, sys, traceback
results = {}
for name in MODULES:
    try:
        importlib.import_module(name)
        results[name] = "ok"
    except BaseException as exc:  # SystemExit from a module counts as a failure too
        tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
        results[name] = f"{type(exc).__name__}: {exc}"[:600] + "\n" + "".join(tb[-3:])[-1500:]
where = {}
for name in ("sglang", "transformers", "flashinfer", "xgrammar", "sgl_kernel", "sglang_dflash", "torch", "pydantic"):
    mod = sys.modules.get(name)
    where[name] = [getattr(mod, "__file__", None), getattr(mod, "__version__", None)] if mod else None
print("@@RESULT@@" + json.dumps({"imports": results, "where": where}))
'''


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# ---------------------------------------------------------------------------------- bundle
def unpack(bundle: Path, dest: Path) -> Path:
    """Unpack ``bundle`` (tar.xz) into ``dest``; return ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(bundle) as tar:
        if sys.version_info >= (3, 12):
            tar.extractall(dest, filter="data")
        else:
            tar.extractall(dest)
    return dest


def manifest(root: Path) -> dict:
    path = root / "MANIFEST.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def bundle_dists(site: Path) -> dict[str, tuple[str, Path]]:
    """{normalized name: (version, dist-info path)} of what the bundle's site holds."""
    found = {}
    for info in site.glob("*.dist-info"):
        meta = info / "METADATA"
        if not meta.is_file():
            continue
        name = version = None
        for line in meta.read_text(errors="replace").splitlines():
            if line.startswith("Name:"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("Version:"):
                version = line.split(":", 1)[1].strip()
            if name and version:
                break
        if name:
            found[_norm(name)] = (version, info)
    return found


# ------------------------------------------------------------------------------ image view
def image_view(dest: Path, *, exclude: Iterable[str] = ()) -> list[str]:
    """Links to this interpreter's copies of the image's packages (minus ``exclude``)."""
    from importlib.metadata import distributions

    dest.mkdir(parents=True, exist_ok=True)
    skip = {_norm(n) for n in exclude}
    linked = []
    for dist in distributions():
        name = _norm(dist.metadata["Name"] or "")
        if name not in IMAGE_PACKAGES or name in skip or not dist.files:
            continue
        base = Path(dist.locate_file(""))
        tops = set()
        for f in dist.files:
            parts = Path(str(f)).parts
            if not parts or parts[0] in ("..", "/") or parts[0].endswith(".pth"):
                continue
            tops.add(parts[0])
        for top in sorted(tops):
            src, link = base / top, dest / top
            if src.exists() and not link.exists():
                link.symlink_to(src)
        linked.append(f"{name}=={dist.version}")
    return sorted(linked)


def abi_overlay(site: Path, fetch_cache: Optional[Path] = None) -> dict:
    """Make the bundle's compiled modules loadable by *this* Python, where it differs.

    For each distribution in ``site`` that ships ``cpython-312`` or ``cp312-abi3``
    extension modules, copy a build of the *same distribution at the same version* for
    this interpreter beside them: its ``*.cpython-3XX-*.so`` next to the bundle's cp312
    or abi3 module of the same name (this Python prefers its own suffix), its
    ``*.abi3.so`` over the bundle's. The build is this environment's when the versions
    agree, else (with ``fetch_cache``) the wheel of that exact version for this
    interpreter, fetched once: the bundle's pins and this environment's versions drift
    apart as new releases land, and the check must not depend on which one is
    installed here. Modules trimmed from the bundle stay absent.
    Returns {dist: "ok ..." | reason}.
    """
    tag = sysconfig.get_config_var("EXT_SUFFIX") or ""
    if sys.version_info[:2] == (3, 12):
        return {}
    report = {}
    for name, (version, info) in sorted(bundle_dists(site).items()):
        record = info / "RECORD"
        if not record.is_file():
            continue
        files = [line.split(",", 1)[0] for line in record.read_text().splitlines() if line]
        native = [f for f in files if f.endswith(".so") and (".cpython-312-" in f or f.endswith(".abi3.so"))]
        wheel = (info / "WHEEL").read_text() if (info / "WHEEL").is_file() else ""
        if not native or ("cp312" not in wheel and ".cpython-312-" not in " ".join(native)):
            continue
        build, why = _same_version_build(name, version, fetch_cache)
        if build is None:
            report[name] = why
            continue
        copied = 0
        for rel, src in build:
            dst = site / rel
            if rel.endswith(tag):
                stem = rel[: -len(tag)]
                twins = (site / (stem + ".cpython-312-x86_64-linux-gnu.so"), site / (stem + ".abi3.so"))
                if not any(t.exists() for t in twins):  # trimmed from the bundle: keep it absent
                    continue
            elif not (rel.endswith(".abi3.so") and "cp312-abi3" in wheel and dst.exists()):
                continue
            if dst.exists() or dst.is_symlink():
                dst.unlink()  # never write through a hard link into the source tree
            shutil.copy2(src, dst)
            copied += 1
        report[name] = f"ok ({copied} files from {why})"
    return report


def _same_version_build(name: str, version: str, fetch_cache: Optional[Path]):
    """``([(relative .so path, source file)], origin)`` of ``name==version`` for this
    interpreter, or ``(None, reason)``: this environment's copy, else a fetched wheel."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        here = distribution(name)
    except PackageNotFoundError:
        here = None
    if here is not None and here.version == version:
        sos = [(str(f), Path(here.locate_file(f))) for f in here.files or []
               if str(f).endswith(".so") and not str(f).startswith("..")]
        return sos, f"the local {name}=={version}"
    local = f"local {name} is {here.version}" if here is not None else f"no local {name}"
    if fetch_cache is None:
        return None, f"{local}, bundle has {version}: not overlaid"
    root = Path(fetch_cache) / "abi" / f"{name}-{version}-{sysconfig.get_config_var('SOABI')}"
    if not root.is_dir():
        tmp = root.with_name(root.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--only-binary=:all:",
                               "--target", str(tmp), f"{name}=={version}"], capture_output=True, text=True)
        if proc.returncode != 0:
            return None, f"{local}; fetching {name}=={version} for this Python failed: {proc.stderr.strip()[-300:]}"
        tmp.rename(root)
    sos = [(str(f.relative_to(root)), f) for f in sorted(root.rglob("*.so"))]
    return sos, f"{name}=={version} fetched for this Python ({local})"


# Image packages the server path imports that a CPU environment may lack; they import
# without a GPU, so the check installs them (pip, --target) when this env has none.
IMAGE_EXTRAS = ("cuda-bindings>=13.0.3,<14", "cuda-pathfinder")


def image_extras(dest: Path) -> list[Path]:
    """``cuda.bindings`` (the image has cuda-bindings 13 for torch 2.11) for FlashInfer's imports."""
    import importlib.util

    if importlib.util.find_spec("cuda") is not None:
        return []
    if not (dest / "cuda" / "bindings").is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(dest),
                        *IMAGE_EXTRAS], check=True, capture_output=True, text=True)
    return [dest]


def cpu_substitutes(view: Path) -> list[Path]:
    """Stand-ins for image packages this environment cannot load (after everything else).

    The image has torchvision 0.26 (for torch 2.11+cu130); PyPI's torchvision does not
    load beside a CPU torch, so the CPU lane's import stand-in takes its place.
    """
    extra = []
    if not (view / "torchvision").exists():
        try:
            from sglang_dflash.cpu_lane import STUBS_DIR
        except ImportError:
            STUBS_DIR = Path(__file__).resolve().parents[2] / "sglang_dflash" / "standins"
        sub = view.parent / "cpu-substitutes"
        sub.mkdir(parents=True, exist_ok=True)
        link = sub / "torchvision"
        if not link.exists():
            link.symlink_to(Path(STUBS_DIR) / "torchvision")
        extra.append(sub)
    return extra


def stdlib_paths() -> list[str]:
    out = subprocess.run([sys.executable, "-S", "-c", "import sys, json; print(json.dumps(sys.path[1:]))"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


# ---------------------------------------------------------------------------------- import
def import_modules(
    paths: list[str],
    modules: Iterable[str] = SERVER_PATH_MODULES,
    *,
    fake_cuda: bool = True,
    env: Optional[dict] = None,
    timeout: float = 900,
) -> dict:
    """Import ``modules`` in a fresh ``python -S -E`` whose sys.path is ``paths`` + stdlib."""
    code = "import sys\nsys.path[:] = " + repr(list(paths) + stdlib_paths()) + "\n"
    if fake_cuda:
        code += _FAKE_H100
    code += "MODULES = " + repr(list(modules)) + "\n" + _IMPORT_LOOP
    run_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"),
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               **(env or {})}
    proc = subprocess.run([sys.executable, "-S", "-E", "-B", "-c", code], capture_output=True, text=True,
                          timeout=timeout, env=run_env)
    marker = [line for line in proc.stdout.splitlines() if line.startswith("@@RESULT@@")]
    if not marker:
        raise RuntimeError(f"import probe died (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    result = json.loads(marker[-1][len("@@RESULT@@"):])
    result["stderr_tail"] = proc.stderr[-3000:]
    return result


def check(bundle_or_dir: Path, *, work: Optional[Path] = None, modules=SERVER_PATH_MODULES,
          extras_cache: Optional[Path] = None) -> dict:
    """Unpack (or hard-link copy) the bundle, add the image view + ABI overlay, import
    the server path. ``extras_cache`` keeps :data:`IMAGE_EXTRAS` between runs."""
    work = Path(work or tempfile.mkdtemp(prefix="gpu-bundle-check-"))
    root = Path(bundle_or_dir)
    target = work / "bundle"
    if target.exists():
        shutil.rmtree(target)
    if root.is_file():
        root = unpack(root, target)
    else:
        shutil.copytree(root, target, copy_function=os.link, symlinks=True)
        root = target
    info = manifest(root)
    site = root / "site"
    overlay = abi_overlay(site, Path(extras_cache or work / "image-extra"))
    view = work / "image"
    if view.exists():
        shutil.rmtree(view)
    linked = image_view(view, exclude=bundle_dists(site))
    paths = [str(root / p) for p in info.get("pythonpath", ["site"])] + [str(view)]
    paths += [str(p) for p in cpu_substitutes(view)]
    paths += [str(p) for p in image_extras(Path(extras_cache or work / "image-extra"))]
    result = import_modules(paths, modules)
    result.update(manifest=info, overlay=overlay, image_view=linked, root=str(root))
    return result


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, help="bundle .tar.xz or an unpacked bundle folder")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="write the full report here")
    parser.add_argument("--extras-cache", type=Path, default=None, help="where to keep cuda-bindings for the check")
    args = parser.parse_args(argv)
    result = check(args.bundle, work=args.work, extras_cache=args.extras_cache)
    bad = {k: v for k, v in result["imports"].items() if v != "ok"}
    for name, status in result["imports"].items():
        print(f"{'ok ' if status == 'ok' else 'BAD'} {name}" + ("" if status == "ok" else f"\n    {status}"))
    for name, status in result["overlay"].items():
        print(f"overlay {name}: {status}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
