"""GPU lane phases: correctness first (greedy equality, CUDA tests), then speed.

Run by ``bench/gpu/run_all.sh``, one phase per process, each bounded by a timeout; every
phase writes ``RESULTS/<phase>.json`` whatever happens to it, and ``report`` turns all of
them into ``gpu_results.md`` / ``gpu_results.json`` (run_all.sh does that after every
phase, so a killed run still returns what it measured).

    python bench/gpu/gpu_bench.py plan                       # phases in order: name, cap s, how
    python bench/gpu/gpu_bench.py run PHASE --results R --logs L --budget S
    python bench/gpu/gpu_bench.py report --results R --out OUT

``GPU_LANE_DRYRUN=1`` rehearses the same phases on CPU: SGLang's CPU engine,
torch_native attention, no CUDA graphs, smaller speed models and shorter runs, so the
orchestration, every request, the JSON and the report are exercised before a device
call is spent on them.

The phases (``PHASES``, in the order of what they prove):

* ``env``: versions, device, the equality pair's manifest.
* ``eq_bf16_{nospec,ours,upstream,adaptive}``: the equality pair (``bench/gpu/pair.py``,
  carried in ``.gpucarry/pair``) in bf16 with FlashInfer and CUDA graphs on: all
  prompts in one batch, greedy. ours runs full blocks (verify length = block, the
  adaptive policy off), so it verifies exactly what SGLang's own DFLASH verifies with
  the same kernels: identical tokens and per-request verify counts are the oracle for
  the verify host lengths. no-spec also returns its top-2 logprobs, so a bf16
  divergence can be told apart from a near-tie.
* ``tests_hd128`` / ``tests_hd64``: ``pytest -m gpu`` over tests/gpu and the Triton
  tests on the device (head_dim 128 cases share the servers' compiled kernels).
* ``eq_fp32_{nospec,ours}``: the pair in float32 (torch_native attention, FlashInfer
  runs fp16/bf16 only; CUDA graphs off): tokens must be identical.
* ``models``, ``speed_{nospec,fixed,adaptive,upstream}``: the Qwen3-8B-shaped dummy
  target (``--load-format dummy``) with a random 8B-shaped drafter (block 16) at
  concurrency 1/8/32: measured tokens/s and step times, and per mode the path taken
  (drafter attention, drafter and target graph replays vs eager steps).
* ``micro``: a verify-shaped 8B forward, eager vs CUDA graph, per verify length;
  ``drafter_kernel``: ``bench/gpu/drafter_step.py`` (draft step vs its memory floor).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parents[2]
DRYRUN = os.environ.get("GPU_LANE_DRYRUN") == "1"
PAIR = Path(os.environ.get("GPU_LANE_PAIR", REPO / ".gpucarry" / "pair"))
CONCURRENCY = (1, 8, 32)
ASSUMED_TAUS = (3.0, 6.5)

QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 12288,
    "max_position_embeddings": 40960, "max_window_layers": 36, "model_type": "qwen3",
    "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}
DRAFTER_8B = {
    "architectures": ["DFlashDraftModel"], "model_type": "qwen3", "attention_bias": False, "attention_dropout": 0.0,
    "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 12288,
    "max_position_embeddings": 40960, "num_attention_heads": 32, "num_hidden_layers": 5, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "vocab_size": 151936, "block_size": 16, "num_target_layers": 36, "layer_types": ["full_attention"] * 5,
    "use_sliding_window": False, "sliding_window": None,
    "dflash_config": {"target_layer_ids": [1, 9, 17, 25, 33], "mask_token_id": 151669},
}
# The CPU rehearsal's stand-in for the 8B shape: same head_dim and GQA group, three layers.
SMALL_TARGET = {**QWEN3_8B, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 3,
                "num_attention_heads": 4, "num_key_value_heads": 1, "max_window_layers": 3, "vocab_size": 1024,
                "bos_token_id": 1, "eos_token_id": 2}
SMALL_DRAFTER = {**DRAFTER_8B, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 1,
                 "num_attention_heads": 4, "num_key_value_heads": 1, "vocab_size": 1024, "num_target_layers": 3,
                 "layer_types": ["full_attention"], "dflash_config": {"target_layer_ids": [0, 1], "mask_token_id": 1023}}


@dataclass(frozen=True)
class Lane:
    """What differs between the device and the CPU rehearsal; everything else is shared."""

    dryrun: bool
    target: dict
    drafter: dict
    speed_prompt_len: int
    speed_new_tokens: int
    eq_new_tokens: int
    eq_prompts: int

    def base_options(self, *, graphs: bool, dtype: str, attention: str) -> dict:
        if self.dryrun:
            from sglang_dflash.testing.local_server import CPU_ARGS

            return {**CPU_ARGS, "dtype": dtype, "log-level": "info", "decode-log-interval": 8}
        return {
            "attention-backend": attention,
            "sampling-backend": "pytorch",
            "dtype": dtype,
            "disable-cuda-graph": not graphs,
            "cuda-graph-max-bs": 32 if graphs else None,
            "cuda-graph-backend-prefill": "disabled",
            "random-seed": 0,
            "decode-log-interval": 8,
            "watchdog-timeout": 600,
            "log-level": "info",
        }


GPU_LANE = Lane(dryrun=False, target=QWEN3_8B, drafter=DRAFTER_8B, speed_prompt_len=512, speed_new_tokens=256,
                eq_new_tokens=160, eq_prompts=48)
CPU_LANE = Lane(dryrun=True, target=SMALL_TARGET, drafter=SMALL_DRAFTER, speed_prompt_len=64, speed_new_tokens=24,
                eq_new_tokens=96, eq_prompts=12)
LANE = CPU_LANE if DRYRUN else GPU_LANE


# -------------------------------------------------------------------------------- helpers
def log(msg: str) -> None:
    print(f"[gpu_bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f"{path.suffix}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


def load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def guarded(name: str, out: Path, fn: Callable[[], dict]) -> int:
    """Run one phase; its result, or its error, always lands in ``out``."""
    start = time.time()
    try:
        result = fn()
        result.setdefault("ok", True)
    except BaseException as exc:  # SystemExit from run_all.sh's timeout too
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
        log(f"{name} FAILED: {result['error']}")
    result.update(phase=name, seconds=round(time.time() - start, 1), lane="cpu-dryrun" if DRYRUN else "gpu")
    write_json(out, result)
    return 0 if result.get("ok") else 1


def random_prompts(n: int, length: int, seed: int, vocab: int) -> list[list[int]]:
    """Token ids clear of the special ones (Qwen3's start at 151643; the small lane's at the top)."""
    lo, hi = (1000, 150000) if vocab > 150000 else (10, vocab - 10)
    rng = random.Random(seed)
    return [[rng.randrange(lo, hi) for _ in range(length)] for _ in range(n)]


def note_process_group(pid: int) -> None:
    """Tell run_all.sh about a process group this phase started (servers, pytest run in
    their own sessions), so it can kill them if the phase itself is killed."""
    pidfile = os.environ.get("GPU_LANE_PIDFILE")
    if pidfile:
        with open(pidfile, "a") as fh:
            fh.write(f"{pid}\n")


def nvidia_smi_used_mib() -> Optional[int]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        return max(int(x) for x in out.split())
    except Exception:
        return None


class GpuMemorySampler:
    """Peak used GPU memory (MiB) from nvidia-smi, sampled in a thread (0 on CPU)."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            value = nvidia_smi_used_mib()
            if value is None:
                return
            self.peak = max(self.peak, value)
            self._stop.wait(self.interval)

    def __enter__(self) -> "GpuMemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


# --------------------------------------------------------------------------------- server
class Server:
    """One ``sglang.launch_server`` in its own process group, logged to ``log_path``."""

    def __init__(self, options: dict, env: dict, log_path: Path) -> None:
        from sglang_dflash.testing.local_server import cli_args, free_port

        self.port = free_port()
        self.cmd = [sys.executable, "-m", "sglang.launch_server", "--host", "127.0.0.1", "--port", str(self.port),
                    *cli_args(options)]
        self.env, self.log_path = env, log_path
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> None:
        from sglang_dflash.cpu_lane import CPU_ENV

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **(CPU_ENV if DRYRUN else {}), **self.env}
        with open(self.log_path, "w") as fh:
            fh.write("$ " + " ".join(self.cmd) + "\n" + json.dumps(self.env) + "\n")
            fh.flush()
            self.proc = subprocess.Popen(self.cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        note_process_group(self.proc.pid)

    def wait_ready(self, timeout: float) -> float:
        """Seconds until /health answers and a 4-token /generate succeeds."""
        import requests

        start = time.time()
        healthy = False
        while time.time() < start + timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                healthy = healthy or requests.get(f"{self.url}/health", timeout=5).status_code == 200
                if healthy:
                    body = {"input_ids": [11, 12, 13, 14], "sampling_params": {"max_new_tokens": 4, "temperature": 0}}
                    if requests.post(f"{self.url}/generate", json=body, timeout=120).status_code == 200:
                        return time.time() - start
            except Exception:
                pass
            time.sleep(1)
        raise TimeoutError(f"server not ready after {timeout:.0f}s:\n{self.tail()}")

    def generate(self, ids, params: dict, timeout: float, **extra) -> Any:
        import requests

        body = {"input_ids": ids, "sampling_params": params, **extra}
        resp = requests.post(f"{self.url}/generate", json=body, timeout=timeout)
        resp.raise_for_status()
        return resp.json()

    def info(self) -> dict:
        import requests

        return requests.get(f"{self.url}/get_server_info", timeout=60).json()

    def dflash(self) -> Optional[dict]:
        """Our worker's describe() (None for no-spec and SGLang's own DFLASH)."""
        states = self.info().get("internal_states") or [{}]
        return (states[0] or {}).get("dflash")

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the whole process group and wait until none of it is left (then the
        driver has its memory back for the next server)."""
        from sglang_dflash.testing.local_server import stop_process_group

        if self.proc is None:
            return
        pgid = self.proc.pid
        stop_process_group(self.proc)
        deadline = time.time() + 20
        try:
            while time.time() < deadline:
                os.killpg(pgid, 0)
                time.sleep(0.5)
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc = None


CAPTURE_LINE = re.compile(r"capture.{0,24}graph", re.IGNORECASE)  # "Capture cuda graph end. Time elapsed ..."
GRAPH_FLAG = re.compile(r"(?:cuda|cpu) graph: (True|False)")  # SGLang says "cpu graph" on CPU


def log_evidence(log_path: Path) -> dict:
    """What SGLang's own log says about CUDA graphs: capture lines, and how many decode
    log lines ran with ``cuda graph: True`` vs ``False`` (the target's graph use for
    modes whose worker is not ours)."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return {}
    flags = GRAPH_FLAG.findall(text)
    capture = [line.strip()[-200:] for line in text.splitlines() if len(line) < 400 and CAPTURE_LINE.search(line)]
    return {"decode_log_lines_graph": flags.count("True"), "decode_log_lines_eager": flags.count("False"),
            "capture_lines": capture[:6]}


def path_report(state: Optional[dict]) -> Optional[dict]:
    """The parts of our describe() that say which path each forward took."""
    if not state or state.get("backend") != "sglang-dflash":  # upstream's entry holds no path
        return None
    stats = state.get("stats") or {}
    return {
        "drafter_attention": state.get("drafter_attention"),
        "drafter_graphs": state.get("drafter_graphs"),
        "drafter_graph_steps": stats.get("drafter_graph_steps"),
        "target_graph_by_verify_len": stats.get("target_graph_by_verify_len"),
        "plain_decode": state.get("plain_decode"),
        "context_injection": state.get("context_injection"),
        "options": state.get("options"),
        "steps": stats.get("steps"),
        "draft_ms_per_step": stats.get("draft_ms_per_step"),
        "verify_ms_per_step": stats.get("verify_ms_per_step"),
    }


def serve(name: str, options: dict, env: dict, logs: Path, budget: float, body: Callable[[Server, float], dict]) -> dict:
    """Start a server, run ``body(server, deadline)``, stop it; the result holds the
    start-up time, the server's settings, our describe() and the log's graph evidence.
    SGLang's own DFLASH that fails to start with this package's plugin loaded (which
    should pass it through) is started once more without it (``SGLANG_PLUGINS=none``),
    so the oracle still runs; the result says so."""
    deadline = time.time() + budget
    result: dict[str, Any] = {"options": options, "env": env, "errors": []}
    server = Server(options, env, logs / f"server_{name}.log")
    with GpuMemorySampler() as mem:
        try:
            try:
                server.start()
                result["startup_s"] = round(server.wait_ready(max(30.0, deadline - time.time() - 20)), 1)
            except (RuntimeError, TimeoutError) as exc:
                if env.get("SGLANG_DFLASH_BACKEND") != "upstream" or deadline - time.time() < 90:
                    raise
                server.stop()
                result["errors"].append(f"with the plugin loaded: {type(exc).__name__}: {str(exc)[-600:]}")
                result["env"] = env = {**env, "SGLANG_PLUGINS": "none"}
                server = Server(options, env, logs / f"server_{name}_noplugin.log")
                server.start()
                result["startup_s"] = round(server.wait_ready(max(30.0, deadline - time.time() - 20)), 1)
            log(f"{name}: ready in {result['startup_s']} s")
            result.update(body(server, deadline))
            try:
                info = server.info()
                keep = ("max_total_num_tokens", "attention_backend", "cuda_graph_max_bs", "disable_cuda_graph",
                        "dtype", "speculative_algorithm", "speculative_num_draft_tokens", "version")
                result["server_info"] = {k: info.get(k) for k in keep if k in info}
                result["dflash"] = server.dflash()
            except Exception as exc:
                result["errors"].append(f"get_server_info: {type(exc).__name__}: {exc}")
        finally:
            server.stop()
    result["path"] = path_report(result.get("dflash"))
    result["log_graphs"] = log_evidence(server.log_path)
    result["peak_gpu_mem_mib"] = mem.peak or None
    result["server_log_tail"] = server.tail(15)
    return result


# ---------------------------------------------------------------------- equality phases
def pair_manifest() -> dict:
    manifest = load_json(PAIR / "PAIR.json")
    if not manifest:
        raise FileNotFoundError(f"no equality pair at {PAIR} (build it with `make gpu-pair`)")
    return manifest


def eq_options(mode: str, dtype: str) -> tuple[dict, dict]:
    """Server options and environment of one equality mode on the pair."""
    block = pair_manifest()["block_size"]
    graphs = dtype != "float32"
    attention = "flashinfer" if graphs else "torch_native"
    options = {**LANE.base_options(graphs=graphs, dtype=dtype, attention=attention),
               "model-path": str(PAIR / "target"), "max-running-requests": 32, "max-total-tokens": 32768,
               "mem-fraction-static": 0.25 if DRYRUN else 0.5, "context-length": 1024}
    env: dict[str, str] = {}
    if mode != "nospec":
        options.update({"speculative-algorithm": "DFLASH", "speculative-draft-model-path": str(PAIR / "drafter"),
                        "speculative-num-draft-tokens": block})
        if graphs and not DRYRUN:  # in fp32 each worker picks its own (ours: torch SDPA)
            options["speculative-draft-attention-backend"] = attention
        env["SGLANG_DFLASH_BACKEND"] = "upstream" if mode == "upstream" else "sglang-dflash"
        if mode == "ours":  # full blocks: what SGLang's own DFLASH verifies
            env.update(SGLANG_DFLASH_VERIFY_LEN=str(block), SGLANG_DFLASH_ADAPTIVE="0")
    return options, env


def phase_eq(mode: str, dtype: str, logs: Path, budget: float) -> dict:
    prompts = json.loads((PAIR / "prompts.json").read_text())[: LANE.eq_prompts]
    options, env = eq_options(mode, dtype)

    def body(server: Server, deadline: float) -> dict:
        extra = {"return_logprob": True, "top_logprobs_num": 2} if mode == "nospec" else {}
        params = {"max_new_tokens": LANE.eq_new_tokens, "temperature": 0}
        t0 = time.time()
        outs = server.generate(prompts, params, timeout=max(30.0, deadline - time.time()), **extra)
        wall = time.time() - t0
        outs = outs if isinstance(outs, list) else [outs]
        per = []
        for out in outs:
            meta = out.get("meta_info", {})
            rec = {"output_ids": out.get("output_ids"), "completion_tokens": meta.get("completion_tokens"),
                   "verify_ct": meta.get("spec_verify_ct"), "finish": str(meta.get("finish_reason"))[:60]}
            if mode == "nospec":
                rec["margins"] = [_margin(top) for top in meta.get("output_top_logprobs") or []]
            per.append(rec)
        return {"requests": per, "wall_s": round(wall, 2)}

    result = serve(f"eq_{dtype}_{mode}", options, env, logs, budget, body)
    result.update(mode=mode, dtype=dtype, prompts=len(prompts), pair=pair_manifest().get("sha256"))
    reqs = result.get("requests") or []
    tokens = sum(r["completion_tokens"] or 0 for r in reqs)
    steps = sum(r["verify_ct"] or 0 for r in reqs)
    result["tau"] = round(tokens / steps, 3) if steps and mode != "nospec" else None
    result["ok"] = len(reqs) == len(prompts) and all(r["output_ids"] for r in reqs)
    return result


def _margin(top: list) -> Optional[float]:
    """logprob(top-1) - logprob(top-2) at one output position."""
    try:
        values = sorted((float(entry[0]) for entry in top), reverse=True)
        return round(values[0] - values[1], 4)
    except (TypeError, ValueError, IndexError):
        return None


# ------------------------------------------------------------------------- speed phases
def cmd_models(models: Path) -> dict:
    """The speed target's config (weights: ``--load-format dummy``) and a random drafter."""
    import torch

    target, drafter = models / "speed-target", models / "speed-drafter"
    target.mkdir(parents=True, exist_ok=True)
    (target / "config.json").write_text(json.dumps(LANE.target, indent=2))
    eos = LANE.target["eos_token_id"]
    (target / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos], "do_sample": False}))
    stamp, want = drafter / "STAMP.json", {"config": LANE.drafter, "seed": 0, "init_std": 0.02}
    if load_json(stamp) == want and (drafter / "model.safetensors").is_file():
        return {"target": str(target), "drafter": str(drafter), "reused": True}

    from sglang_dflash.model.checkpoint import save_drafter
    from sglang_dflash.model.config import DFlashConfig
    from sglang_dflash.model.drafter import DFlashDrafter
    from sglang_dflash.model.rope import RotaryEmbedding

    config = DFlashConfig.from_dict(LANE.drafter)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device("meta"):
        model = DFlashDrafter(config)
    model = model.to_empty(device=device)
    model.rotary = RotaryEmbedding(config.hf_config()).to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=generator)
    save_drafter(model.to(torch.bfloat16), drafter, dtype=torch.bfloat16)
    write_json(stamp, want)
    return {"target": str(target), "drafter": str(drafter), "drafter_bytes": (drafter / "model.safetensors").stat().st_size}


SPEED_MODES = {  # mode -> (backend, env)
    "nospec": (None, {}),
    "fixed": ("sglang-dflash", {"SGLANG_DFLASH_ADAPTIVE": "0"}),  # verify length = block, set below
    "adaptive": ("sglang-dflash", {"SGLANG_DFLASH_ADAPTIVE": "1"}),
    "upstream": ("upstream", {}),
}


def speed_options(mode: str, models: Path) -> tuple[dict, dict]:
    backend, env = SPEED_MODES[mode]
    options = {**LANE.base_options(graphs=True, dtype="bfloat16", attention="flashinfer"),
               "model-path": str(models / "speed-target"), "load-format": "dummy", "skip-tokenizer-init": True,
               "max-running-requests": 32, "max-total-tokens": 65536 if DRYRUN else 131072,
               "mem-fraction-static": 0.25 if DRYRUN else 0.8, "context-length": 4096}
    env = dict(env)
    if backend is not None:
        block = LANE.drafter["block_size"]
        options.update({"speculative-algorithm": "DFLASH", "speculative-draft-model-path": str(models / "speed-drafter"),
                        "speculative-num-draft-tokens": block})
        if not DRYRUN:
            options["speculative-draft-attention-backend"] = "flashinfer"
        env["SGLANG_DFLASH_BACKEND"] = backend
        if mode == "fixed":
            env["SGLANG_DFLASH_VERIFY_LEN"] = str(block)
    return options, env


def throughput(server: Server, concurrency: int, deadline: float) -> dict:
    """``concurrency`` clients, one request each (two at concurrency 1), greedy, ignore_eos."""
    n = 2 if concurrency == 1 else concurrency
    params = {"max_new_tokens": LANE.speed_new_tokens, "temperature": 0, "ignore_eos": True}
    prompts = random_prompts(n, LANE.speed_prompt_len, seed=1000 + concurrency, vocab=LANE.target["vocab_size"])

    def one(ids):
        t0 = time.time()
        out = server.generate(ids, params, timeout=max(30.0, deadline - time.time()))
        meta = out.get("meta_info", {})
        tokens = int(meta.get("completion_tokens") or 0)
        return {"latency": time.time() - t0, "tokens": tokens, "steps": int(meta.get("spec_verify_ct") or tokens or 1)}

    t0 = time.time()
    with ThreadPoolExecutor(concurrency) as pool:
        records = list(pool.map(one, prompts))
    wall = time.time() - t0
    tokens, steps = sum(r["tokens"] for r in records), sum(r["steps"] for r in records)
    return {
        "concurrency": concurrency, "requests": n, "wall_s": round(wall, 3), "output_tokens": tokens,
        "tokens_per_s": round(tokens / wall, 2),
        "tau": round(tokens / steps, 3) if steps else None,
        # per request: its latency over its steps (its prefill is ~1% of it at these lengths)
        "step_ms": round(statistics.median(1e3 * r["latency"] / r["steps"] for r in records), 3),
    }


def _graph_delta(before: Optional[dict], after: Optional[dict]) -> Optional[dict]:
    """Graph vs eager counts of our worker during one measurement."""
    if not after:
        return None

    def counts(state, key):
        return ((state or {}).get("stats") or {}).get(key) or {}

    target = {}
    for n, c in counts(after, "target_graph_by_verify_len").items():
        b = counts(before, "target_graph_by_verify_len").get(n, {})
        target[n] = {k: c.get(k, 0) - b.get(k, 0) for k in ("graph", "eager")}
    draft_a, draft_b = counts(after, "drafter_graph_steps"), counts(before, "drafter_graph_steps")
    return {"target_by_verify_len": target,
            "drafter": {k: draft_a.get(k, 0) - draft_b.get(k, 0) for k in ("graph", "eager")} if draft_a else None}


def phase_speed(mode: str, models: Path, logs: Path, budget: float) -> dict:
    options, env = speed_options(mode, models)

    def body(server: Server, deadline: float) -> dict:
        # warm-up: first-use compiles (our Triton kernels, verify shapes) stay out of the timings
        warm = random_prompts(8, LANE.speed_prompt_len, seed=7, vocab=LANE.target["vocab_size"])
        server.generate(warm, {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True},
                        timeout=max(30.0, deadline - time.time()))
        points, errors = [], []
        for conc in CONCURRENCY:
            if time.time() > deadline - 15:
                errors.append(f"concurrency {conc} skipped: phase budget spent")
                continue
            try:
                before = server.dflash()
                point = throughput(server, conc, deadline)
                point["graphs"] = _graph_delta(before, server.dflash())
                points.append(point)
                log(f"speed {mode}: c={conc} {point['tokens_per_s']} tok/s, step {point['step_ms']} ms, tau {point['tau']}")
            except Exception as exc:
                errors.append(f"concurrency {conc}: {type(exc).__name__}: {exc}")
        return {"throughput": points, "errors": errors}

    result = serve(f"speed_{mode}", options, env, logs, budget, body)
    result.update(mode=mode, prompt_len=LANE.speed_prompt_len, new_tokens=LANE.speed_new_tokens)
    result["ok"] = len(result.get("throughput") or []) == len(CONCURRENCY)
    return result


# ------------------------------------------------------------------------ test phases
TEST_LINE = re.compile(r"^(tests/\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)")
SHORT_LINE = re.compile(r"^(FAILED|ERROR|SKIPPED) (.+)$")
TEST_SELECTIONS = {"tests_hd128": "not hd64", "tests_hd64": "hd64"}


def phase_tests(name: str, logs: Path, budget: float) -> dict:
    """``pytest -m gpu`` on tests/gpu and the Triton tests; results read from the -v log
    as it streams, so a timeout still reports what ran."""
    log_path = logs / f"pytest_{name}.log"
    cmd = [sys.executable, "-m", "pytest", "-v", "-rA", "-m", "gpu", "-k", TEST_SELECTIONS[name], "-p",
           "no:cacheprovider", "--timeout", "300", "tests/gpu", "tests/test_triton_kernels.py"]
    env = {**os.environ, "SGLANG_USE_CPU_ENGINE": os.environ.get("SGLANG_USE_CPU_ENGINE", "0")}
    with open(log_path, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        note_process_group(proc.pid)
        try:
            rc = proc.wait(timeout=max(10.0, budget - 10))
        except subprocess.TimeoutExpired:
            from sglang_dflash.testing.local_server import stop_process_group

            stop_process_group(proc, wait=10)
            rc = "timeout"
    outcomes: dict[str, str] = {}
    reasons: dict[str, str] = {}
    for line in log_path.read_text(errors="replace").splitlines():
        m = TEST_LINE.match(line)
        if m:
            outcomes[m.group(1)] = m.group(2)
        s = SHORT_LINE.match(line)
        if s and s.group(1) in ("FAILED", "ERROR"):
            reasons[s.group(2).split(" - ")[0]] = s.group(2)[-400:]
    counts = {k: sum(1 for v in outcomes.values() if v == k) for k in ("PASSED", "FAILED", "SKIPPED", "ERROR")}
    ok = rc == 0 and counts["FAILED"] == counts["ERROR"] == 0 and (DRYRUN or counts["PASSED"] > 0)
    return {"command": " ".join(cmd), "rc": rc, "counts": counts, "outcomes": outcomes,
            "failures": list(reasons.values())[:20], "ok": ok}


# ------------------------------------------------------------------------- micro phases
def _cuda_ms(fn: Callable[[], Any], iters: int, warmup: int = 2) -> float:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _eager_vs_graph(fn: Callable[[], Any]) -> dict:
    import torch

    row = {"eager_ms": round(_cuda_ms(fn, iters=5), 3)}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    row["graph_ms"] = round(_cuda_ms(graph.replay, iters=20), 3)
    return row


def phase_micro(budget: float) -> dict:
    """A verify-shaped forward of the 8B target (36 layers of torch GEMMs + SDPA over a
    1024-token prefix) per verify length and batch, eager and as a CUDA graph: the
    hardware's cost of a verify step, against which the server's step times read."""
    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        return {"ok": DRYRUN, "skipped": "no CUDA"}
    deadline = time.time() + budget - 10
    c, prefix = QWEN3_8B, 1024
    h, heads, kvh, hd, inter = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], c["intermediate_size"]
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)

    def w(*shape):
        return torch.randn(*shape, device=dev, dtype=dt, generator=g) * 0.02

    layers = [dict(qkv=w((heads + 2 * kvh) * hd, h), o=w(h, heads * hd), gu=w(2 * inter, h), d=w(h, inter))
              for _ in range(c["num_hidden_layers"])]
    lm_head = w(c["vocab_size"], h)
    rows = []
    for bs in CONCURRENCY:
        kv = [(w(bs, kvh, prefix + 16, hd), w(bs, kvh, prefix + 16, hd)) for _ in layers]
        for n in (1, 4, 8, 16):
            if time.time() > deadline:
                rows.append({"batch": bs, "verify_len": n, "error": "budget spent"})
                continue
            x0 = w(bs * n, h)
            mask = (torch.arange(prefix + n, device=dev)[None, :] <= prefix + torch.arange(n, device=dev)[:, None])

            def forward():
                x = x0
                for lw, (kc, vc) in zip(layers, kv):
                    q, k, v = (F.rms_norm(x, (h,)) @ lw["qkv"].t()).split([heads * hd, kvh * hd, kvh * hd], -1)
                    kc[:, :, prefix : prefix + n] = k.view(bs, n, kvh, hd).transpose(1, 2)
                    vc[:, :, prefix : prefix + n] = v.view(bs, n, kvh, hd).transpose(1, 2)
                    a = F.scaled_dot_product_attention(q.view(bs, n, heads, hd).transpose(1, 2), kc[:, :, : prefix + n],
                                                       vc[:, :, : prefix + n], attn_mask=mask, enable_gqa=True)
                    x = x + a.transpose(1, 2).reshape(bs * n, heads * hd) @ lw["o"].t()
                    gate, up = (F.rms_norm(x, (h,)) @ lw["gu"].t()).chunk(2, -1)
                    x = x + (F.silu(gate) * up) @ lw["d"].t()
                return (F.rms_norm(x, (h,)) @ lm_head.t()).argmax(-1)

            try:
                rows.append({"batch": bs, "verify_len": n, **_eager_vs_graph(forward)})
            except Exception as exc:
                rows.append({"batch": bs, "verify_len": n, "error": f"{type(exc).__name__}: {exc}"})
        kv = None  # this batch's caches go before the next batch's are made
        torch.cuda.empty_cache()
    return {"device": torch.cuda.get_device_name(0), "verify_shaped": rows, "ok": any("eager_ms" in r for r in rows)}


def phase_drafter_kernel(results: Path, budget: float) -> dict:
    out = results / "drafter_kernel.rows"  # not *.json: the report reads every *.json as a phase
    cmd = [sys.executable, str(REPO / "bench/gpu/drafter_step.py"), "--json", str(out)] + (["--smoke"] if DRYRUN else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(10.0, budget - 5))
    data = load_json(out)
    return {"rc": proc.returncode, "markdown": proc.stdout[-4000:], "stderr": proc.stderr[-2000:], **data,
            "ok": proc.returncode == 0 and bool(data)}


# -------------------------------------------------------------------------------- env
def phase_env() -> dict:
    info: dict[str, Any] = {"python": sys.version.split()[0], "sgl_kernel_route": os.environ.get("GPU_LANE_ROUTE"),
                            "dryrun": DRYRUN}
    for mod in ("torch", "sglang", "flashinfer", "transformers", "sgl_kernel", "sglang_dflash", "triton"):
        try:
            m = __import__(mod)
            info[mod] = getattr(m, "__version__", "?")
            info[mod + "_file"] = getattr(m, "__file__", None)
        except Exception as exc:
            info[mod] = f"IMPORT FAILED: {type(exc).__name__}: {exc}"
    import torch

    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA"
    try:
        info["pair"] = pair_manifest()
    except FileNotFoundError as exc:  # the equality phases fail on their own; speed can still run
        info["pair"], info["warning"] = None, str(exc)
    needed = ("torch", "sglang", "sglang_dflash") + (() if DRYRUN else ("flashinfer", "sgl_kernel"))
    failed = [f"{k}: {info[k]}" for k in needed if str(info.get(k, "")).startswith("IMPORT FAILED")]
    if not DRYRUN and info["gpu"] == "no CUDA":
        failed.append("no CUDA device")
    info["ok"] = not failed
    if failed:
        info["error"] = "; ".join(failed)
    return info


# ------------------------------------------------------------------------------ phases
@dataclass(frozen=True)
class Phase:
    name: str
    gpu_cap: int  # seconds on the device (a first server also pays the JIT builds)
    cpu_cap: int  # seconds in the CPU rehearsal
    how: str = "fg"  # fg | bg (beside the next phases) | par (bg on the device) | excl (alone: timings)
    run: Callable[[argparse.Namespace], dict] = None


def _phases() -> list[Phase]:
    def eq(mode, dtype):
        return lambda a: phase_eq(mode, dtype, Path(a.logs), a.budget)

    def speed(mode):
        return lambda a: phase_speed(mode, Path(a.models), Path(a.logs), a.budget)

    def tests(name):
        return lambda a: phase_tests(name, Path(a.logs), a.budget)

    return [
        Phase("env", 90, 120, run=lambda a: phase_env()),
        Phase("eq_bf16_nospec", 360, 420, run=eq("nospec", "bfloat16")),
        Phase("tests_hd128", 240, 300, "bg", run=tests("tests_hd128")),
        Phase("eq_bf16_ours", 180, 420, "par", run=eq("ours", "bfloat16")),
        Phase("eq_bf16_upstream", 180, 420, "par", run=eq("upstream", "bfloat16")),
        Phase("eq_fp32_nospec", 180, 300, "par", run=eq("nospec", "float32")),
        Phase("eq_fp32_ours", 180, 420, "par", run=eq("ours", "float32")),
        Phase("eq_bf16_adaptive", 180, 420, "par", run=eq("adaptive", "bfloat16")),
        Phase("models", 120, 120, "excl", run=lambda a: cmd_models(Path(a.models))),
        Phase("speed_nospec", 150, 420, "excl", run=speed("nospec")),
        Phase("speed_fixed", 150, 600, "excl", run=speed("fixed")),
        Phase("speed_adaptive", 150, 600, "excl", run=speed("adaptive")),
        Phase("speed_upstream", 150, 600, "excl", run=speed("upstream")),
        Phase("tests_hd64", 180, 300, run=tests("tests_hd64")),
        Phase("micro", 120, 60, "excl", run=lambda a: phase_micro(a.budget)),
        Phase("drafter_kernel", 120, 300, "excl", run=lambda a: phase_drafter_kernel(Path(a.results), a.budget)),
    ]


PHASES = {p.name: p for p in _phases()}


# ------------------------------------------------------------------------------ report
def compare(ref: list[dict], other: list[dict], *, margins: Optional[list] = None, counts: bool = False) -> dict:
    """Per-prompt token equality (and verify-count equality) of ``other`` against ``ref``;
    each divergence with the reference's top-1/top-2 logprob margin there, if known."""
    n = min(len(ref), len(other))
    same, same_counts, matched, total, divergences, count_diffs = 0, 0, 0, 0, [], []
    for i in range(n):
        a, b = ref[i].get("output_ids") or [], other[i].get("output_ids") or []
        k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        same += int(a == b)
        matched, total = matched + k, total + max(len(a), 1)
        if counts:
            same_counts += int(ref[i].get("verify_ct") == other[i].get("verify_ct"))
            if ref[i].get("verify_ct") != other[i].get("verify_ct"):
                count_diffs.append({"prompt": i, "ref": ref[i].get("verify_ct"), "other": other[i].get("verify_ct")})
        if a != b:
            margin = None
            if margins is not None and margins[i] and k < len(margins[i]):
                margin = margins[i][k]
            divergences.append({"prompt": i, "at": k, "margin": margin})
    out = {"prompts": n, "identical": same, "token_match_rate": round(matched / total, 4) if total else None,
           "divergences": divergences[:12]}
    if counts:
        out["identical_verify_counts"] = same_counts
        out["verify_count_diffs"] = count_diffs[:12]
    return out


def equality_summary(results: Path) -> dict:
    eq = {f"{d}_{m}": load_json(results / f"eq_{d}_{m}.json").get("requests")
          for d in ("bf16", "fp32") for m in ("nospec", "ours", "upstream", "adaptive")}
    margins = [r.get("margins") for r in eq["bf16_nospec"]] if eq["bf16_nospec"] else None
    out = {}
    checks = [("bf16: ours (full blocks) vs upstream DFLASH", "bf16_upstream", "bf16_ours", True, None),
              ("bf16: ours (full blocks) vs no-spec", "bf16_nospec", "bf16_ours", False, margins),
              ("bf16: upstream DFLASH vs no-spec (control)", "bf16_nospec", "bf16_upstream", False, margins),
              ("bf16: ours (adaptive) vs no-spec", "bf16_nospec", "bf16_adaptive", False, margins),
              ("fp32: ours (full blocks) vs no-spec", "fp32_nospec", "fp32_ours", False, None)]
    for label, ref, other, counts, m in checks:
        if eq[ref] and eq[other]:
            out[label] = compare(eq[ref], eq[other], margins=m, counts=counts)
    return out


def _fmt(value, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def _graph_cell(graphs: Optional[dict]) -> str:
    if not graphs:
        return "-"
    target = ", ".join(f"{n}: {c['graph']}/{c['eager']}" for n, c in graphs["target_by_verify_len"].items()
                       if c["graph"] or c["eager"])
    drafter = graphs.get("drafter")
    return f"target {target or '-'}; drafter {drafter['graph']}/{drafter['eager']}" if drafter else f"target {target or '-'}"


def report(results: Path, out: Path) -> dict:
    data = {p.stem: load_json(p) for p in sorted(results.glob("*.json"))}
    env = data.get("env", {})
    md = ["# GPU lane results", ""]
    lane = "CPU REHEARSAL (GPU_LANE_DRYRUN=1): orchestration check, no GPU numbers" if env.get("dryrun") else "device"
    md += [f"- lane: {lane}; device: {env.get('gpu', '?')}; torch {env.get('torch', '?')}; sglang "
           f"{env.get('sglang', '?')}; flashinfer {env.get('flashinfer', '?')}; sgl_kernel: "
           f"{env.get('sgl_kernel_route', '?')}", ""]
    md += ["## Phases", "", "| phase | status | seconds | server start s | note |", "|---|---|---|---|---|"]
    for name in PHASES:
        d = data.get(name)
        status = "not run" if not d else ("ok" if d.get("ok") else "FAILED")
        note = (d or {}).get("error") or "; ".join((d or {}).get("errors") or [])
        md.append(f"| {name} | {status} | {_fmt((d or {}).get('seconds'))} | {_fmt((d or {}).get('startup_s'))} | "
                  f"{note[:160].replace('|', '/').replace(chr(10), ' ')} |")
    md.append("")

    pair = env.get("pair") or {}
    md += ["## Greedy equality on the equality pair", "",
           f"Pair: {pair.get('target_shape')}; drafter block {pair.get('block_size')}, held-out tau on CPU "
           f"{pair.get('drafter_heldout_tau')} (bench/gpu/pair.py). bf16: FlashInfer + CUDA graphs; fp32: torch_native, "
           "graphs off. Margin: no-spec's logprob(top-1) - logprob(top-2) where the outputs first differ "
           "(a near-tie when small). Tokens of ours and upstream must be identical (both lossless, same verify "
           "kernels); their verify counts (#prompt: upstream vs ours) can differ only where the two drafters, "
           "separate implementations, draft differently in bf16.", "",
           "| comparison | prompts | identical tokens | identical verify counts | token match rate | first divergences (prompt@pos, margin) |",
           "|---|---|---|---|---|---|"]
    summary = equality_summary(results)
    for label, c in summary.items():
        divs = ", ".join(f"{d['prompt']}@{d['at']} ({_fmt(d['margin'])})" for d in c["divergences"][:6])
        counts = _fmt(c.get("identical_verify_counts"))
        if c.get("verify_count_diffs"):
            counts += " (" + ", ".join(f"#{d['prompt']}: {d['ref']} vs {d['other']}" for d in c["verify_count_diffs"][:4]) + ")"
        md.append(f"| {label} | {c['prompts']} | {c['identical']} | {counts} | {c['token_match_rate']} | {divs or '-'} |")
    md += ["", "| mode | tau (tokens per verify) | wall s | drafter attention | drafter graphs (replayed/eager) | "
           "target graphs by verify length (graph/eager) | plain decode |", "|---|---|---|---|---|---|---|"]
    for name in ("eq_bf16_ours", "eq_bf16_upstream", "eq_bf16_adaptive", "eq_fp32_ours"):
        d = data.get(name)
        if d:
            md.append("| " + " | ".join([name[3:], _fmt(d.get("tau")), _fmt(d.get("wall_s")), *_path_cells(d)]) + " |")
    md.append("")

    md += ["## CUDA tests on the device (pytest -m gpu)", ""]
    for name in ("tests_hd128", "tests_hd64"):
        d = data.get(name)
        if d:
            md.append(f"- {name}: {d.get('counts')} (rc {d.get('rc')})")
            md += [f"  - {f}" for f in d.get("failures", [])[:10]]
    md.append("")

    shape = next((d for d in (data.get(f"speed_{m}") for m in SPEED_MODES) if d and "prompt_len" in d), {})
    md += ["## Speed: Qwen3-8B-shaped dummy target, random drafter (block 16), measured", "",
           f"{shape.get('prompt_len', '?')}-token prompts, {shape.get('new_tokens', '?')} new tokens, greedy, ignore_eos. Step "
           "time: per request, latency / verify steps (median). Random weights accept almost nothing, so "
           "speculative tok/s here is a cost measurement, not the product's speed.", "",
           "| mode | conc | tok/s | step ms | tau | graphs: target per verify length (graph/eager); drafter (graph/eager) |",
           "|---|---|---|---|---|---|"]
    for mode in SPEED_MODES:
        d = data.get(f"speed_{mode}")
        for p in (d or {}).get("throughput", []):
            md.append(f"| {mode} | {p['concurrency']} | {p['tokens_per_s']} | {p['step_ms']} | {_fmt(p['tau'])} | "
                      f"{_graph_cell(p.get('graphs'))} |")
    md += ["", "| mode | server start s | drafter attention | drafter graphs; steps replayed/eager | target graphs "
           "(whole run, graph/eager) | plain decode |", "|---|---|---|---|---|---|"]
    for mode in SPEED_MODES:
        d = data.get(f"speed_{mode}")
        if d:
            md.append(f"| {mode} | {_fmt(d.get('startup_s'))} | " + " | ".join(_path_cells(d)) + " |")
    md.append("")

    derived = derived_table(data)
    if derived:
        md += ["## DERIVED, NOT MEASURED: tokens/s at an assumed tau", "",
               "From the measured step times of the full-block modes above: tok/s = concurrency x tau / step time; "
               "no-spec: concurrency / its step time. These are what the measured step costs would give at the "
               "assumed acceptance, nothing more.", "",
               "| mode | conc | step ms (measured) | " + " | ".join(f"tok/s @ tau {t} | x no-spec @ tau {t}" for t in ASSUMED_TAUS) + " |",
               "|---|---|---|" + "---|---|" * len(ASSUMED_TAUS)]
        for row in derived:
            cells = [f"{_fmt(row[f'tps_{t}'], '.0f')} | {_fmt(row[f'x_{t}'], '.2f')}" for t in ASSUMED_TAUS]
            md.append(f"| {row['mode']} | {row['concurrency']} | {row['step_ms']} | " + " | ".join(cells) + " |")
        md.append("")

    micro = data.get("micro") or {}
    if micro.get("verify_shaped"):
        md += ["## Micro: verify-shaped 8B forward (torch GEMMs + SDPA, prefix 1024), median ms", "",
               "| batch | verify len | eager | CUDA graph |", "|---|---|---|---|"]
        md += [f"| {r['batch']} | {r['verify_len']} | {r.get('eager_ms', r.get('error'))} | {_fmt(r.get('graph_ms'))} |"
               for r in micro["verify_shaped"]]
        md.append("")
    kernel = data.get("drafter_kernel") or {}
    if kernel.get("markdown"):
        md += ["## Draft step vs its memory floor (bench/gpu/drafter_step.py)", "", kernel["markdown"].strip(), ""]

    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".gpu_results.md.{os.getpid()}"  # a background phase may publish at the same time
    tmp.write_text("\n".join(md) + "\n")
    tmp.replace(out / "gpu_results.md")
    write_json(out / "gpu_results.json", {"phases": data, "equality": summary, "derived": derived})
    return {"ok": True, "phases": len(data)}


def _path_cells(d: dict) -> list[str]:
    path = path_report(d["dflash"]) if "dflash" in d else d.get("path")
    if not path:  # no-spec, or SGLang's own DFLASH: only its log tells (decode lines with cuda graph True/False)
        lg = d.get("log_graphs") or {}
        spec = "SGLang's own" if (d.get("options") or {}).get("speculative-algorithm") else "-"
        return [spec, spec, f"SGLang log: {lg.get('decode_log_lines_graph', '-')} graph / "
                f"{lg.get('decode_log_lines_eager', '-')} eager decode lines", "-"]
    dg = path.get("drafter_graphs") or {}
    steps = path.get("drafter_graph_steps") or {}
    graphs = f"buckets {dg.get('batch_sizes')}" if dg.get("batch_sizes") else f"none ({dg.get('reason')})"
    target = ", ".join(f"{n}: {c['graph']}/{c['eager']}" for n, c in (path.get("target_graph_by_verify_len") or {}).items())
    return [str(path.get("drafter_attention")), f"{graphs}; steps {steps.get('graph', '-')}/{steps.get('eager', '-')}",
            target or "-", str(path.get("plain_decode"))]


def derived_table(data: dict) -> list[dict]:
    base = {p["concurrency"]: p for p in (data.get("speed_nospec") or {}).get("throughput", [])}
    rows = []
    for mode in ("fixed", "upstream"):
        for p in (data.get(f"speed_{mode}") or {}).get("throughput", []):
            conc, step = p["concurrency"], p["step_ms"]
            ref = base.get(conc)
            row = {"mode": mode, "concurrency": conc, "step_ms": step}
            for tau in ASSUMED_TAUS:
                tps = conc * tau / (step / 1e3) if step else None
                ref_tps = conc / (ref["step_ms"] / 1e3) if ref and ref.get("step_ms") else None
                row[f"tps_{tau}"] = round(tps, 1) if tps else None
                row[f"x_{tau}"] = round(tps / ref_tps, 3) if tps and ref_tps else None
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------- carry
CARRY_LIMIT = 64 * 2**20


def carry_sizes(repo: Path = REPO) -> dict:
    """Bytes one device call sends: the working tree (tracked and untracked-not-ignored
    files) plus the carried ``.gpucarry`` folder; the limit is 64 MiB for all of it."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                            capture_output=True, check=True).stdout.decode().split("\0")
    tree = sum((repo / f).stat().st_size for f in listed if f and (repo / f).is_file())
    carried = {p.relative_to(repo).as_posix(): p.stat().st_size
               for p in sorted((repo / ".gpucarry").rglob("*")) if p.is_file()}
    total = tree + sum(carried.values())
    return {"tree": tree, "gpucarry": sum(carried.values()), "total": total, "limit": CARRY_LIMIT,
            "fits": total <= CARRY_LIMIT, "largest": sorted(carried.items(), key=lambda kv: -kv[1])[:5]}


# -------------------------------------------------------------------------------- main
def main(argv: Optional[list[str]] = None) -> int:
    # run_all.sh's `timeout` sends SIGTERM: make it SystemExit so servers stop and the JSON is written
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("plan", help="print the phases: name, cap (s), fg|bg|excl")
    p = sub.add_parser("run")
    p.add_argument("phase", choices=list(PHASES))
    p.add_argument("--results", required=True)
    p.add_argument("--logs", required=True)
    p.add_argument("--models", default=str(REPO / ".gpuwork" / "models"))
    p.add_argument("--budget", type=float, required=True, help="seconds for this phase, server start-up included")
    p = sub.add_parser("report")
    p.add_argument("--results", required=True)
    p.add_argument("--out", required=True)
    sub.add_parser("carry", help="what one device call would send, against the 64 MiB limit")
    args = parser.parse_args(argv)
    if args.cmd == "carry":
        sizes = carry_sizes()
        mib = {k: round(sizes[k] / 2**20, 1) for k in ("tree", "gpucarry", "total", "limit")}
        print(json.dumps({**mib, "fits": sizes["fits"], "largest": sizes["largest"]}, indent=1))
        return 0 if sizes["fits"] else 1
    if args.cmd == "plan":
        for phase in PHASES.values():
            print(phase.name, phase.cpu_cap if DRYRUN else phase.gpu_cap, phase.how)
        return 0
    if args.cmd == "report":
        report(Path(args.results), Path(args.out))
        return 0
    phase = PHASES[args.phase]
    return guarded(phase.name, Path(args.results) / f"{phase.name}.json", lambda: phase.run(args))


if __name__ == "__main__":
    sys.exit(main())
