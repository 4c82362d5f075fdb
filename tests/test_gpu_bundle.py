"""The GPU-lane bundle (bench/gpu/build_bundle.sh) and its helpers, checked on CPU.

The bundle targets the lent GPU machine's image: CPython 3.12, torch 2.11.0+cu130,
no network. Neither that Python nor that torch can be had here (pip cannot resolve a
cp312 CPU build of torch 2.11 for this machine, and the CUDA build does not import
without a GPU), so the slow tests use the best approximation there is: the unpacked
bundle imported by *this* interpreter with this CPU torch, in a fresh ``python -S``
that sees only the bundle plus the packages the image has (``bundle_check``), with
this environment's same-version builds of the bundle's cp312 extension modules placed
beside them, the CPU lane's torchvision stand-in for the image's torchvision, and
``torch.cuda`` faking an H100 so SGLang's CUDA-only import branches run. What this
cannot show: that the cp312/torch-2.11 binaries load on the device, and anything at
run time (JIT builds, CUDA graphs); ``bench/gpu/run_all.sh`` does that on the GPU.

The bundle is built once and cached under ``.cache/gpu-bundle/`` (rebuilt when the
build script, its requirements or the sgl_kernel stand-in change; ~2 min of downloads
the first time, then 5-10 min of xz on two cores). ``GPU_BUNDLE=path`` checks a given
bundle instead.
"""

from __future__ import annotations

import glob
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GPU = REPO / "bench" / "gpu"
CACHE = REPO / ".cache" / "gpu-bundle"
LIMIT_MIB = 56
sys.path.insert(0, str(GPU))

import bundle_check  # noqa: E402
import gpu_bench  # noqa: E402

# Building the bundle (xz -9e) can take over half an hour on two busy cores.
pytestmark = pytest.mark.timeout(5400)


def _inputs_fingerprint() -> str:
    files = [GPU / "build_bundle.sh", GPU / "requirements-bundle.txt"]
    files += sorted((REPO / "sglang_dflash" / "standins" / "sgl_kernel").rglob("*.py"))
    digest = hashlib.sha256()
    for f in files:
        digest.update(str(f.relative_to(REPO)).encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def bundle() -> Path:
    given = os.environ.get("GPU_BUNDLE")
    if given:
        return Path(given)
    path = CACHE / "test-bundle.tar.xz"
    stamp = path.with_name(path.name + ".inputs")
    want = _inputs_fingerprint()
    if path.is_file() and stamp.is_file() and stamp.read_text() == want:
        return path
    env = {**os.environ, "BUNDLE_CACHE": str(CACHE), "SGL_KERNEL_ROUTE": "standin"}
    proc = subprocess.run(["bash", str(GPU / "build_bundle.sh"), str(path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, f"build_bundle.sh failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    stamp.write_text(want)
    return path


@pytest.fixture(scope="module")
def unpacked(bundle, tmp_path_factory) -> Path:
    return bundle_check.unpack(bundle, tmp_path_factory.mktemp("gpu-bundle") / "bundle")


def _requirements() -> dict[str, str]:
    pins = {}
    for line in (GPU / "requirements-bundle.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[bundle_check._norm(name)] = version.strip()
    return pins


# ------------------------------------------------------------------------------- bundle
@pytest.mark.slow
def test_bundle_fits_one_transfer(bundle):
    size = bundle.stat().st_size
    assert size <= LIMIT_MIB * 2**20, f"bundle is {size / 2**20:.1f} MiB, over {LIMIT_MIB} MiB"


@pytest.mark.slow
def test_bundle_manifest_and_pins(unpacked):
    manifest = bundle_check.manifest(unpacked)
    assert manifest["sglang"] == "0.5.23"
    assert manifest["sgl_kernel_route"] in ("standin", "real")
    assert manifest["target"]["python"] == "3.12"
    dists = {bundle_check._norm(k): v for k, v in manifest["distributions"].items()}
    wrong = {n: (v, dists.get(n)) for n, v in _requirements().items() if dists.get(n) != v}
    assert not wrong, f"bundle versions differ from requirements-bundle.txt: {wrong}"
    assert dists["sglang-dflash"] == importlib.import_module("sglang_dflash").__version__


@pytest.mark.slow
def test_bundle_holds_the_server_path_files(unpacked):
    site = unpacked / "site"
    must = [
        "sglang/launch_server.py",
        "sglang/srt/layers/attention/flashinfer_backend.py",
        "sglang/srt/speculative/dflash_worker_v2.py",
        "flashinfer/data/include/flashinfer/attention/prefill.cuh",
        "flashinfer/data/csrc/batch_prefill.cu",
        "flashinfer/data/csrc/batch_decode.cu",
        "flashinfer/data/csrc/norm.cu",
        "flashinfer/data/cutlass/include/cute/tensor.hpp",
        "tvm_ffi/lib/libtvm_ffi.so",
        "sglang_dflash/host/worker.py",
        "IPython/display.py",
    ]
    missing = [m for m in must if not (site / m).exists()]
    assert not missing, f"bundle lacks {missing}"
    assert (unpacked / "standin" / "sgl_kernel" / "__init__.py").is_file()
    entry = next(site.glob("sglang_dflash-*.dist-info")) / "entry_points.txt"
    assert "dflash = sglang_dflash.plugin:register" in entry.read_text()
    # what must never travel: FA3's 1 GB library, and binaries built against torch 2.14
    assert not list(site.rglob("flash_ops*.so"))
    assert not list((site / "sglang").rglob("*.so")), "SGLang's Rust extensions link torch 2.14; they stay out"


@pytest.mark.slow
def test_bundle_imports_the_server_path(bundle, tmp_path):
    result = bundle_check.check(bundle, work=tmp_path, extras_cache=CACHE / "image-extra")
    bad = {k: v for k, v in result["imports"].items() if v != "ok"}
    assert not bad, "server path imports failed:\n" + "\n\n".join(f"{k}: {v}" for k, v in bad.items())
    where = result["where"]
    root = str(tmp_path / "bundle")
    for name in ("sglang", "transformers", "flashinfer", "xgrammar", "sgl_kernel", "sglang_dflash"):
        assert where[name] and where[name][0].startswith(root), f"{name} came from {where[name]}, not the bundle"
    assert where["transformers"][1] == "5.19.0"  # shadows the image's 5.17.0
    assert where["flashinfer"][1] == "0.7.2"
    if result["manifest"]["sgl_kernel_route"] == "standin":
        assert "/standin/" in where["sgl_kernel"][0]


@pytest.mark.slow
def test_bundle_serves_our_dflash_on_the_cpu_lane(unpacked, tiny_target, tiny_drafter, tmp_path):
    """The whole server path, lazily imported modules and subprocesses included, from
    the bundle alone: ``python -S`` (no site-packages) with PYTHONPATH = bundle + image
    view + the CPU lane's stand-ins (its CPU ``sgl_kernel`` replaces the GPU one), run
    from a folder outside the repo so the bundle's own ``sglang_dflash`` copy is used."""
    import requests

    from sglang_dflash.cpu_lane import CPU_ENV, STUBS_DIR
    from sglang_dflash.testing.local_server import free_port, stop_process_group

    site = unpacked / "site"
    overlay = bundle_check.abi_overlay(site, CACHE / "image-extra")
    assert all(v.startswith("ok") for v in overlay.values()), overlay
    view = tmp_path / "image"
    bundle_check.image_view(view, exclude=bundle_check.bundle_dists(site))
    paths = [site, view, *bundle_check.image_extras(CACHE / "image-extra"), Path(STUBS_DIR)]
    port = free_port()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", str(tmp_path)),
           "PYTHONPATH": os.pathsep.join(map(str, paths)), **CPU_ENV}
    cmd = [sys.executable, "-S", "-m", "sglang.launch_server", "--model-path", str(tiny_target), "--device", "cpu",
           "--attention-backend", "torch_native", "--disable-cuda-graph", "--mem-fraction-static", "0.25",
           "--max-total-tokens", "8192", "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning", "--speculative-algorithm", "DFLASH",
           "--speculative-draft-model-path", str(tiny_drafter)]
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 900
        while time.time() < deadline:
            assert proc.poll() is None, f"server exited:\n{log_path.read_text()[-4000:]}"
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        else:
            pytest.fail(f"server not healthy:\n{log_path.read_text()[-4000:]}")
        body = {"text": "The quick brown fox", "sampling_params": {"max_new_tokens": 12, "temperature": 0}}
        out = requests.post(f"{url}/generate", json=body, timeout=300).json()
        assert out["meta_info"]["completion_tokens"] == 12
        info = requests.get(f"{url}/get_server_info", timeout=60).json()
        assert info["version"] == "0.5.23"
        assert (info.get("internal_states") or [{}])[0]["dflash"]["backend"] == "sglang-dflash"
    finally:
        stop_process_group(proc, wait=60)


def _python312():
    """A working CPython 3.12: on PATH, or installed by pyenv (its shim may not be active)."""
    candidates = [shutil.which("python3.12")]
    pyenv = shutil.which("pyenv")
    if pyenv:
        root = subprocess.run([pyenv, "root"], capture_output=True, text=True).stdout.strip()
        candidates += sorted(glob.glob(os.path.join(root, "versions", "3.12*", "bin", "python3.12")), reverse=True)
    for candidate in filter(None, candidates):
        probe = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 12))"],
                               capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.strip() == "True":
            return candidate
    return None


@pytest.mark.slow
def test_bundle_cp312_extensions_load_in_python312(unpacked, tmp_path):
    """The bundle's own cp312 binaries, in a real CPython 3.12 (no torch needed; the
    image's pure-Python packages such as typing_extensions come from the image view)."""
    python = _python312()
    if python is None:
        pytest.skip("no CPython 3.12 on this machine")
    view = tmp_path / "image"
    bundle_check.image_view(view, exclude=bundle_check.bundle_dists(unpacked / "site"))
    modules = ["pydantic_core._pydantic_core", "orjson", "msgspec", "zmq", "setproctitle", "pybase64",
               "zstandard", "rpds", "jiter", "tvm_ffi", "cffi", "watchfiles", "llguidance", "Cryptodome.Cipher.AES"]
    code = ("import importlib, json, sys\nsys.path[:0] = sys.argv[1].split(':')\nbad = {}\n"
            "for m in sys.argv[2:]:\n    try:\n        importlib.import_module(m)\n"
            "    except Exception as e:\n        bad[m] = repr(e)\nprint(json.dumps(bad))")
    proc = subprocess.run([python, "-S", "-c", code, f"{unpacked / 'site'}:{view}", *modules],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bad = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not bad, f"cp312 extension modules failed to load: {bad}"


# ----------------------------------------------------------------- sgl_kernel stand-in
def _standin():
    path = str(REPO / "sglang_dflash" / "standins")
    code = "import sys; sys.path.insert(0, sys.argv[1]); import sgl_kernel; print(sgl_kernel.__file__)"
    out = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return path


def test_standin_ops_match_their_definitions():
    """CPU: the torch versions of the real ops; stubs raise naming themselves."""
    path = _standin()
    code = r"""
import sys; sys.path.insert(0, sys.argv[1])
import torch, sgl_kernel
from sgl_kernel import rmsnorm, fused_add_rmsnorm, gemma_rmsnorm, gemma_fused_add_rmsnorm, silu_and_mul
from sgl_kernel.scalar_type import scalar_types
torch.manual_seed(0)
x, w = torch.randn(5, 64), torch.rand(64)
ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
assert torch.allclose(rmsnorm(x, w), ref, atol=1e-5)
assert torch.allclose(gemma_rmsnorm(x, w), x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + w), atol=1e-5)
out = torch.empty_like(x); rmsnorm(x, w, out=out); assert torch.allclose(out, ref, atol=1e-5)
inp, res = torch.randn(5, 64), torch.randn(5, 64)
total = inp + res
fused_add_rmsnorm(inp, res, w)
assert torch.allclose(res, total) and torch.allclose(inp, total / torch.sqrt(total.pow(2).mean(-1, keepdim=True) + 1e-6) * w, atol=1e-5)
g = torch.randn(3, 2 * 16)
assert torch.allclose(silu_and_mul(g), torch.nn.functional.silu(g[:, :16]) * g[:, 16:], atol=1e-6)
assert str(scalar_types.uint4b8) == "uint4b8" and scalar_types.uint8b128.size_bits == 8
assert sgl_kernel.is_fa3_supported() is False
for name in ("transfer_kv_all_layer", "top_k_renorm_prob", "verify_tree_greedy_cpu"):
    try:
        getattr(sgl_kernel, name)()
    except NotImplementedError as exc:
        assert name in str(exc)
    else:
        raise AssertionError(name + " did not raise")
from sgl_kernel.kvcacheio import transfer_embedding_ranges_direct
from sgl_kernel.quantization.gguf import ggml_dequantize
from sgl_kernel.speculative import reconstruct_indices_from_tree_mask
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


# -------------------------------------------------------------------------- the lane
def _eq_result(outputs, verify_cts=None, margins=None, **extra):
    reqs = []
    for i, ids in enumerate(outputs):
        rec = {"output_ids": ids, "completion_tokens": len(ids), "verify_ct": (verify_cts or [None] * len(outputs))[i]}
        if margins is not None:
            rec["margins"] = margins[i]
        reqs.append(rec)
    return {"ok": True, "requests": reqs, **extra}


def _speed_result(mode, step_ms, tau, graphs=None, path=None):
    points = [{"concurrency": c, "requests": c, "wall_s": 1.0, "output_tokens": 100, "tokens_per_s": 100.0 + c,
               "tau": tau, "step_ms": step_ms, "graphs": graphs} for c in (1, 8, 32)]
    return {"ok": True, "mode": mode, "startup_s": 60, "throughput": points, "path": path, "options": {}}


def test_plan_puts_correctness_before_speed_and_fits_one_call():
    """Equality and the CUDA tests come before anything timed; timed phases run alone;
    no phase may outlast one device call."""
    names = list(gpu_bench.PHASES)
    first_speed = names.index("models")
    assert names[0] == "env"
    assert all(names.index(n) < first_speed for n in names if n.startswith(("eq_", "tests_hd128")))
    assert all(gpu_bench.PHASES[n].how == "excl" for n in names if n.startswith(("speed_", "micro", "drafter_kernel")))
    assert all(p.gpu_cap <= 420 and p.cpu_cap <= 600 for p in gpu_bench.PHASES.values())
    assert set(gpu_bench.TEST_SELECTIONS) == {n for n in names if n.startswith("tests_")}


def test_report_compares_greedy_outputs_and_keeps_derived_figures_apart(tmp_path):
    results, out = tmp_path / "results", tmp_path / "out"
    ref = [[5, 6, 7, 8], [1, 2, 3, 4], [9, 9, 9, 9]]
    write = lambda name, data: gpu_bench.write_json(results / f"{name}.json", data)  # noqa: E731
    write("env", {"ok": True, "gpu": "NVIDIA H200", "pair": {"block_size": 8, "drafter_heldout_tau": 6.5}})
    write("eq_bf16_nospec", _eq_result(ref, margins=[[2.0] * 4, [2.0, 0.01, 2.0, 2.0], [2.0] * 4]))
    write("eq_bf16_ours", _eq_result([[5, 6, 7, 8], [1, 7, 3, 4], [9, 9, 9, 9]], [2, 3, 1], tau=2.4))
    write("eq_bf16_upstream", _eq_result([[5, 6, 7, 8], [1, 7, 3, 4], [9, 9, 9, 9]], [2, 2, 1], tau=2.6))
    write("eq_fp32_nospec", _eq_result(ref))
    write("eq_fp32_ours", _eq_result(ref, [2, 2, 1], tau=2.4))
    path = {"drafter_attention": "flashinfer", "drafter_graphs": {"batch_sizes": [1, 2], "reason": None},
            "drafter_graph_steps": {"graph": 7, "eager": 3}, "target_graph_by_verify_len": {"16": {"graph": 9, "eager": 0}},
            "plain_decode": "one-node verify"}
    graphs = {"target_by_verify_len": {"16": {"graph": 5, "eager": 0}}, "drafter": {"graph": 4, "eager": 1}}
    write("speed_nospec", _speed_result("nospec", 10.0, None))
    write("speed_fixed", _speed_result("fixed", 20.0, 1.1, graphs, path))
    write("speed_upstream", _speed_result("upstream", 25.0, 1.0))
    gpu_bench.report(results, out)
    md = (out / "gpu_results.md").read_text()
    summary = json.loads((out / "gpu_results.json").read_text())

    eq = summary["equality"]
    vs_upstream = eq["bf16: ours (full blocks) vs upstream DFLASH"]
    assert vs_upstream["identical"] == 3 and vs_upstream["identical_verify_counts"] == 2
    vs_nospec = eq["bf16: ours (full blocks) vs no-spec"]
    assert vs_nospec["identical"] == 2 and vs_nospec["divergences"] == [{"prompt": 1, "at": 1, "margin": 0.01}]
    assert vs_nospec["token_match_rate"] == pytest.approx(9 / 12, abs=1e-4)
    assert eq["fp32: ours (full blocks) vs no-spec"]["identical"] == 3
    assert "| bf16: ours (full blocks) vs upstream DFLASH | 3 | 3 | 2 (#1: 2 vs 3) |" in md

    fixed_c8 = next(r for r in summary["derived"] if r["mode"] == "fixed" and r["concurrency"] == 8)
    assert fixed_c8["tps_6.5"] == pytest.approx(8 * 6.5 / 0.020, rel=1e-3)
    assert fixed_c8["x_6.5"] == pytest.approx((8 * 6.5 / 0.020) / (8 / 0.010), rel=1e-3)
    measured, derived = md.split("## DERIVED, NOT MEASURED")
    assert "2600" not in measured and "2600" in derived  # 8 x 6.5 / 20 ms appears only in the derived table
    assert "| fixed | 8 | 108.0 | 20.0 | 1.1 | target 16: 5/0; drafter 4/1 |" in measured
    assert "steps 7/3" in measured  # the drafter's eager fallbacks are reported, not hidden


def _rehearse(tmp_path, *phases, budget=None):
    env = {**os.environ, "GPU_LANE_DRYRUN": "1", "GPU_LANE_WORK": str(tmp_path / "work"), "OUT": str(tmp_path / "out"),
           "GPU_LANE_PREVIOUS": str(tmp_path / "none.json")}
    if budget is not None:
        env["GPU_LANE_BUDGET_S"] = str(budget)
    proc = subprocess.run(["bash", str(GPU / "run_all.sh"), *phases], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, tmp_path / "out"


def test_rehearsal_skips_what_the_budget_cannot_hold_and_still_reports(tmp_path):
    """run_all.sh on CPU with no budget left for any phase: nothing starts, and $OUT
    still gets a report that says so, the logs and the run log."""
    log, out = _rehearse(tmp_path, "micro", budget=40)
    assert "micro: not started, budget spent" in log
    assert {"gpu_results.md", "gpu_results.json", "logs.tar.gz", "run_all.log"} <= {p.name for p in out.iterdir()}
    assert "| micro | not run |" in (out / "gpu_results.md").read_text()


@pytest.fixture(scope="module")
def pair_dir() -> Path:
    """The lane's equality pair (bench/gpu/pair.py), built once and cached under .cache/."""
    import pair

    return pair.cached(REPO / ".cache" / "gpu-pair")


@pytest.mark.slow
def test_pair_accepts_and_rehearsal_proves_fp32_equality(tmp_path, pair_dir, monkeypatch):
    """The lane's fp32 equality phases, rehearsed on CPU servers with the pair the device
    gets: ours (full blocks) emits exactly no-spec's tokens, speculation really commits
    several tokens per verify (tau well above 1), and the report says which path ran."""
    monkeypatch.setenv("GPU_LANE_PAIR", str(pair_dir))
    log, out = _rehearse(tmp_path, "env", "eq_fp32_nospec", "eq_fp32_ours")
    summary = json.loads((out / "gpu_results.json").read_text())
    phases = summary["phases"]
    assert all(phases[n]["ok"] for n in ("env", "eq_fp32_nospec", "eq_fp32_ours")), log[-3000:]
    same = summary["equality"]["fp32: ours (full blocks) vs no-spec"]
    assert same["prompts"] == gpu_bench.CPU_LANE.eq_prompts and same["identical"] == same["prompts"], same
    ours = phases["eq_fp32_ours"]
    assert ours["tau"] > 3.0, ours["tau"]
    assert ours["path"]["drafter_attention"] == "torch" and ours["path"]["drafter_graph_steps"]["graph"] == 0
    assert ours["path"]["target_graph_by_verify_len"]["8"]["eager"] > 0
    assert "| fp32: ours (full blocks) vs no-spec |" in (out / "gpu_results.md").read_text()


def test_models_config_is_a_valid_8b_drafter():
    from sglang_dflash.model.config import DFlashConfig

    for lane in (gpu_bench.GPU_LANE, gpu_bench.CPU_LANE):
        config = DFlashConfig.from_dict(lane.drafter)
        target = lane.target
        config.validate_target(hidden_size=target["hidden_size"], vocab_size=target["vocab_size"],
                               num_layers=target["num_hidden_layers"])
        assert config.head_dim == target["head_dim"] == 128
    config = DFlashConfig.from_dict(gpu_bench.DRAFTER_8B)
    assert config.capture_points() == [2, 10, 18, 26, 34]
    assert config.block_size == 16 and config.mask_token_id == 151669 and config.num_layers == 5
