"""GPU-lane benchmark: no speculation vs upstream DFLASH vs sglang-dflash on a Qwen3-8B shape.

Runs on the GPU machine from ``bench/gpu/run_all.sh`` (which unpacks the bundle and sets
PYTHONPATH and the JIT caches); every subcommand writes one JSON file into
``--results`` and never raises past its own failure, so one broken phase leaves the
others' numbers intact.

    python bench/gpu/gpu_bench.py models --models DIR
    python bench/gpu/gpu_bench.py serve  --mode {nospec,upstream,ours} --models DIR --results DIR --logs DIR
    python bench/gpu/gpu_bench.py micro  --results DIR
    python bench/gpu/gpu_bench.py report --results DIR --out OUT

What is measured, and how:

* **models** -- the target is SGLang's ``--load-format dummy`` Qwen3-8B (only its
  config.json is written); the drafter is a random DFlash checkpoint in the z-lab
  Qwen3-8B-DFlash-b16 layout (5 layers, target layers [1, 9, 17, 25, 33], block 16,
  mask token 151669), written as bf16 safetensors.
* **serve** -- one ``python -m sglang.launch_server`` per mode (FlashInfer attention,
  decode CUDA graphs on, token ids in, ``--skip-tokenizer-init``): health polling with
  deadlines, decode throughput at concurrency 1/8/32 (``/generate`` with
  ``input_ids``, greedy, ``ignore_eos``), per-request step time (latency / verify
  steps), accept length from ``meta_info``, peak GPU memory (nvidia-smi sampling), the
  KV pool size, and 32 greedy outputs for the equality check.
* **micro** -- in-process CUDA timings without a server: a verify-shaped forward of the
  8B target shape (36 layers of torch GEMMs + SDPA over a 1024-token prefix) at verify
  length 1/4/8/16 x batch 1/8/32, eager and CUDA graph; and one drafter step of
  sglang-dflash's own drafter (``BlockProposer`` with ``TorchDraftAttention``), eager
  vs CUDA graph.
* **report** -- ``gpu_results.md`` + ``gpu_results.json``: the tables, tokens/s derived
  at accept length tau = 6.5 and 7.9 from the measured step times
  (``tokens/s = batch * tau / step_time``), and the greedy comparison.

Random weights accept almost nothing (tau ~ 1), which is why end-to-end speed at
realistic tau is derived from step times rather than measured.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional

MODES = ("nospec", "upstream", "ours")
CONCURRENCY = (1, 8, 32)
TAUS = (6.5, 7.9)
VERIFY_LENS = (1, 4, 8, 16)
BATCHES = (1, 8, 32)
PREFIX_LEN = 1024
PROMPT_LEN = 512
NEW_TOKENS = 256
GREEDY_PROMPTS = 32
GREEDY_NEW_TOKENS = 64

QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 12288,
    "max_position_embeddings": 40960,
    "max_window_layers": 36,
    "model_type": "qwen3",
    "num_attention_heads": 32,
    "num_hidden_layers": 36,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

DRAFTER_8B = {
    "architectures": ["DFlashDraftModel"],
    "model_type": "qwen3",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "max_position_embeddings": 40960,
    "num_attention_heads": 32,
    "num_hidden_layers": 5,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 151936,
    "block_size": 16,
    "num_target_layers": 36,
    "layer_types": ["full_attention"] * 5,
    "use_sliding_window": False,
    "sliding_window": None,
    "dflash_config": {"target_layer_ids": [1, 9, 17, 25, 33], "mask_token_id": 151669},
}


# -------------------------------------------------------------------------------- helpers
def log(msg: str) -> None:
    print(f"[gpu_bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def guarded(name: str, out: Path, fn: Callable[[], dict]) -> int:
    """Run one phase; its result (or its error) always lands in ``out``."""
    start = time.time()
    try:
        result = fn()
        result.setdefault("ok", True)
    except BaseException as exc:  # KeyboardInterrupt/SystemExit from a timeout too
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
        log(f"{name} FAILED: {result['error']}")
    result["phase"] = name
    result["seconds"] = round(time.time() - start, 1)
    write_json(out, result)
    return 0 if result.get("ok") else 1


def prompt_ids(n: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000, 150000) for _ in range(length)] for _ in range(n)]


class GpuMemorySampler:
    """Peak used GPU memory (MiB) from nvidia-smi, sampled in a thread."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval, self.peak, self.samples = interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> Optional[int]:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10).stdout
            return max(int(x) for x in out.split())
        except Exception:
            return None

    def _run(self) -> None:
        while not self._stop.is_set():
            value = self._read()
            if value is not None:
                self.peak, self.samples = max(self.peak, value), self.samples + 1
            self._stop.wait(self.interval)

    def __enter__(self) -> "GpuMemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


# --------------------------------------------------------------------------------- models
def cmd_models(args) -> dict:
    import torch

    models = Path(args.models)
    target, drafter = models / "qwen3-8b-dummy", models / "qwen3-8b-dflash-b16-random"
    target.mkdir(parents=True, exist_ok=True)
    (target / "config.json").write_text(json.dumps(QWEN3_8B, indent=2))
    (target / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "do_sample": False}, indent=2))
    stamp = drafter / "STAMP.json"
    want = {"config": DRAFTER_8B, "seed": 0, "init_std": 0.02}
    if stamp.is_file() and json.loads(stamp.read_text()) == want and (drafter / "model.safetensors").is_file():
        log(f"drafter exists: {drafter}")
        return {"target": str(target), "drafter": str(drafter), "reused": True}

    from sglang_dflash.checkpoint import save_drafter
    from sglang_dflash.config import DFlashConfig
    from sglang_dflash.drafter import DFlashDrafter
    from sglang_dflash.rope import RotaryEmbedding

    config = DFlashConfig.from_dict(DRAFTER_8B)
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
    model = model.to(torch.bfloat16)
    save_drafter(model, drafter, dtype=torch.bfloat16)
    write_json(stamp, want)
    size = (drafter / "model.safetensors").stat().st_size
    log(f"drafter written: {drafter} ({size / 2**30:.2f} GiB)")
    return {"target": str(target), "drafter": str(drafter), "drafter_bytes": size, "reused": False}


# --------------------------------------------------------------------------------- server
def server_command(mode: str, models: Path, port: int, extra: list[str]) -> tuple[list[str], dict]:
    cmd = [
        sys.executable, "-m", "sglang.launch_server",
        "--model-path", str(models / "qwen3-8b-dummy"),
        "--load-format", "dummy",
        "--skip-tokenizer-init",
        "--dtype", "bfloat16",
        "--attention-backend", "flashinfer",
        "--sampling-backend", "pytorch",
        "--cuda-graph-max-bs", "32",
        "--cuda-graph-backend-prefill", "disabled",
        "--max-running-requests", "32",
        "--mem-fraction-static", "0.80",
        "--context-length", "4096",
        "--random-seed", "0",
        "--decode-log-interval", "40",
        "--watchdog-timeout", "600",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--log-level", "info",
    ]
    env = {}
    if mode != "nospec":
        cmd += [
            "--speculative-algorithm", "DFLASH",
            "--speculative-draft-model-path", str(models / "qwen3-8b-dflash-b16-random"),
            "--speculative-draft-attention-backend", "flashinfer",
        ]
        env["SGLANG_DFLASH_BACKEND"] = "upstream" if mode == "upstream" else "sglang-dflash"
    return cmd + extra, env


class Server:
    def __init__(self, cmd: list[str], env: dict, log_path: Path) -> None:
        self.cmd, self.env, self.log_path = cmd, env, log_path
        self.url = f"http://127.0.0.1:{cmd[cmd.index('--port') + 1]}"
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "w") as fh:
            fh.write("$ " + " ".join(self.cmd) + "\n" + json.dumps(self.env) + "\n")
            fh.flush()
            self.proc = subprocess.Popen(self.cmd, stdout=fh, stderr=subprocess.STDOUT,
                                         env={**os.environ, **self.env}, start_new_session=True)
        pidfile = os.environ.get("GPU_LANE_PIDFILE")
        if pidfile:  # run_all.sh kills this process group if the phase itself is killed
            Path(pidfile).write_text(str(self.proc.pid))

    def wait_ready(self, timeout: float) -> float:
        import requests

        start = time.time()
        deadline = start + timeout
        healthy = False
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if not healthy:
                    healthy = requests.get(f"{self.url}/health", timeout=5).status_code == 200
                if healthy:
                    body = {"input_ids": [11, 12, 13, 14], "sampling_params": {"max_new_tokens": 4, "temperature": 0}}
                    if requests.post(f"{self.url}/generate", json=body, timeout=120).status_code == 200:
                        return time.time() - start
            except Exception:
                pass
            time.sleep(2)
        raise TimeoutError(f"server not ready after {timeout:.0f}s:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        from sglang_dflash.local_server import stop_process_group

        if self.proc is not None:
            stop_process_group(self.proc)
        self.proc = None
        wait_gpu_released()


def wait_gpu_released(limit_mib: int = 4096, timeout: float = 60) -> None:
    """Give the driver time to free a stopped server's memory before the next one starts."""
    sampler = GpuMemorySampler()
    deadline = time.time() + timeout
    while time.time() < deadline:
        used = sampler._read()
        if used is None or used < limit_mib:
            return
        time.sleep(2)


def generate(url: str, ids, params: dict, timeout: float = 600) -> Any:
    import requests

    resp = requests.post(f"{url}/generate", json={"input_ids": ids, "sampling_params": params}, timeout=timeout)
    resp.raise_for_status()
    return resp.json()


def throughput(url: str, concurrency: int, n_requests: int, deadline: float) -> dict:
    params = {"max_new_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}
    prompts = prompt_ids(n_requests, PROMPT_LEN, seed=1000 + concurrency)
    records = []

    def one(ids):
        t0 = time.time()
        out = generate(url, ids, params, timeout=max(30.0, deadline - time.time()))
        meta = out.get("meta_info", {})
        tokens = int(meta.get("completion_tokens") or len(out.get("output_ids") or []))
        steps = int(meta.get("spec_verify_ct") or tokens or 1)
        return {"latency": time.time() - t0, "tokens": tokens, "steps": steps,
                "accept_length": meta.get("spec_accept_length")}

    t0 = time.time()
    with ThreadPoolExecutor(concurrency) as pool:
        for rec in pool.map(one, prompts):
            records.append(rec)
    wall = time.time() - t0
    tokens = sum(r["tokens"] for r in records)
    steps = sum(r["steps"] for r in records)
    step_ms = statistics.median(1000 * r["latency"] / max(r["steps"], 1) for r in records)
    return {
        "concurrency": concurrency,
        "requests": n_requests,
        "wall_s": round(wall, 3),
        "output_tokens": tokens,
        "tokens_per_s": round(tokens / wall, 2),
        "accept_length": round(tokens / steps, 3) if steps else None,
        "step_ms_median": round(step_ms, 3),
        "latency_s_median": round(statistics.median(r["latency"] for r in records), 3),
    }


def cmd_serve(args) -> dict:
    from sglang_dflash.local_server import free_port

    mode, models = args.mode, Path(args.models)
    deadline = time.time() + args.budget
    result: dict[str, Any] = {"mode": mode, "throughput": [], "errors": []}
    port = free_port()
    cmd, env = server_command(mode, models, port, args.extra or [])
    server = Server(cmd, env, Path(args.logs) / f"server_{mode}.log")
    result["command"] = " ".join(cmd)
    result["env"] = env
    with GpuMemorySampler() as mem:
        try:
            server.start()
            result["startup_s"] = round(server.wait_ready(timeout=max(60.0, min(args.start_timeout, deadline - time.time()))), 1)
            log(f"{mode}: ready in {result['startup_s']} s")
            try:
                import requests

                info = requests.get(f"{server.url}/get_server_info", timeout=60).json()
                keep = ("max_total_num_tokens", "speculative_algorithm", "speculative_num_draft_tokens",
                        "attention_backend", "cuda_graph_max_bs", "max_running_requests", "version")
                result["server_info"] = {k: info.get(k) for k in keep if k in info}
                states = info.get("internal_states") or [{}]
                result["server_info"]["dflash"] = (states[0] or {}).get("dflash")
                result["server_info"]["memory_usage"] = (states[0] or {}).get("memory_usage")
            except Exception as exc:
                result["errors"].append(f"get_server_info: {exc}")
            # greedy outputs first: the equality check matters more than the last throughput point
            try:
                prompts = [p[: 32 + 7 * i] for i, p in enumerate(prompt_ids(GREEDY_PROMPTS, 32 + 7 * GREEDY_PROMPTS, 7))]
                outs = generate(server.url, prompts, {"max_new_tokens": GREEDY_NEW_TOKENS, "temperature": 0},
                                timeout=max(30.0, deadline - time.time()))
                outs = outs if isinstance(outs, list) else [outs]
                result["greedy_output_ids"] = [o.get("output_ids") for o in outs]
            except Exception as exc:
                result["errors"].append(f"greedy: {type(exc).__name__}: {exc}")
            for conc in CONCURRENCY:
                if time.time() > deadline - 20:
                    result["errors"].append(f"skipped concurrency {conc}: phase budget spent")
                    continue
                try:
                    n = 3 if conc == 1 else 2 * conc
                    point = throughput(server.url, conc, n, deadline)
                    result["throughput"].append(point)
                    log(f"{mode}: c={conc} {point['tokens_per_s']} tok/s, step {point['step_ms_median']} ms, "
                        f"tau {point['accept_length']}")
                except Exception as exc:
                    result["errors"].append(f"concurrency {conc}: {type(exc).__name__}: {exc}")
        finally:
            server.stop()
    result["peak_gpu_mem_mib"] = mem.peak
    result["server_log_tail"] = server.tail(25)
    result["ok"] = "startup_s" in result and bool(result["throughput"])
    return result


# ---------------------------------------------------------------------------------- micro
def _cuda_time(fn: Callable[[], Any], iters: int, warmup: int = 2) -> float:
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


def _graph(fn: Callable[[], Any]):
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def _eager_vs_graph(fn: Callable[[], Any], eager_iters: int) -> dict:
    """Median ms of ``fn`` run eagerly and replayed from a CUDA graph (or the error)."""
    try:
        row = {"eager_ms": round(_cuda_time(fn, iters=eager_iters), 3)}
        graph = _graph(fn)
        row["graph_ms"] = round(_cuda_time(graph.replay, iters=20), 3)
        del graph
        return row
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def verify_shaped_forward(deadline: float) -> list[dict]:
    """36 Qwen3-8B-shaped layers over ``batch x n`` new tokens attending to a 1024-token
    prefix + causal block; torch GEMMs and SDPA. A hardware reference for the verify step."""
    import torch
    import torch.nn.functional as F

    c = QWEN3_8B
    h, heads, kvh, hd, inter, layers, vocab = (c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"],
                                               c["head_dim"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"])
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)

    def w(*shape):
        return (torch.randn(*shape, device=dev, dtype=dt, generator=g) * 0.02)

    weights = [dict(qkv=w((heads + 2 * kvh) * hd, h), o=w(h, heads * hd), gu=w(2 * inter, h), d=w(h, inter),
                    n1=torch.ones(h, device=dev, dtype=dt), n2=torch.ones(h, device=dev, dtype=dt),
                    qn=torch.ones(hd, device=dev, dtype=dt), kn=torch.ones(hd, device=dev, dtype=dt))
               for _ in range(layers)]
    lm_head, final_norm = w(vocab, h), torch.ones(h, device=dev, dtype=dt)
    rows = []
    for bs in BATCHES:
        kv = [(torch.randn(bs, kvh, PREFIX_LEN + max(VERIFY_LENS), hd, device=dev, dtype=dt, generator=g),
               torch.randn(bs, kvh, PREFIX_LEN + max(VERIFY_LENS), hd, device=dev, dtype=dt, generator=g))
              for _ in range(layers)]
        for n in VERIFY_LENS:
            if time.time() > deadline:
                rows.append({"batch": bs, "verify_len": n, "error": "budget spent"})
                continue
            total = PREFIX_LEN + n
            q_pos = PREFIX_LEN + torch.arange(n, device=dev)
            mask = (torch.arange(total, device=dev)[None, :] <= q_pos[:, None]) if n > 1 else None
            x0 = torch.randn(bs * n, h, device=dev, dtype=dt, generator=g)
            out = {}

            def forward():
                x = x0
                for lw, (kc, vc) in zip(weights, kv):
                    y = F.rms_norm(x, (h,), lw["n1"], 1e-6)
                    qkv = y @ lw["qkv"].t()
                    q, k, v = qkv.split([heads * hd, kvh * hd, kvh * hd], dim=-1)
                    q = F.rms_norm(q.view(bs, n, heads, hd), (hd,), lw["qn"], 1e-6).transpose(1, 2)
                    k = F.rms_norm(k.view(bs, n, kvh, hd), (hd,), lw["kn"], 1e-6).transpose(1, 2)
                    kc[:, :, PREFIX_LEN:total] = k
                    vc[:, :, PREFIX_LEN:total] = v.view(bs, n, kvh, hd).transpose(1, 2)
                    a = F.scaled_dot_product_attention(q, kc[:, :, :total], vc[:, :, :total], attn_mask=mask,
                                                       enable_gqa=True)
                    x = x + a.transpose(1, 2).reshape(bs * n, heads * hd) @ lw["o"].t()
                    y = F.rms_norm(x, (h,), lw["n2"], 1e-6)
                    gate, up = (y @ lw["gu"].t()).chunk(2, dim=-1)
                    x = x + (F.silu(gate) * up) @ lw["d"].t()
                logits = F.rms_norm(x, (h,), final_norm, 1e-6) @ lm_head.t()
                out["ids"] = logits.argmax(-1)

            row = {"batch": bs, "verify_len": n, "prefix_len": PREFIX_LEN, **_eager_vs_graph(forward, eager_iters=5)}
            rows.append(row)
            log(f"verify-shaped bs={bs} n={n}: {row}")
        del kv
        torch.cuda.empty_cache()
    del weights, lm_head
    torch.cuda.empty_cache()
    return rows


def drafter_step(deadline: float) -> list[dict]:
    """One sglang-dflash drafter step (block 16, 5 layers, 8B shape, 1024-token context)."""
    import torch

    from sglang_dflash.config import DFlashConfig
    from sglang_dflash.draft_attention import DraftAttnPlan, TorchDraftAttention
    from sglang_dflash.draft_kv import DraftKVCache
    from sglang_dflash.drafter import DFlashDrafter
    from sglang_dflash.proposer import BlockProposer
    from sglang_dflash.rope import RotaryEmbedding

    config = DFlashConfig.from_dict(DRAFTER_8B)
    dev, dt = torch.device("cuda"), torch.bfloat16
    with torch.device("meta"):
        drafter = DFlashDrafter(config)
    drafter = drafter.to_empty(device=dev)
    drafter.rotary = RotaryEmbedding(config.hf_config()).to(dev)
    g = torch.Generator(device=dev).manual_seed(0)
    drafter = drafter.init_weights(0.02, generator=g).to(dt).eval()
    vocab, hidden = DRAFTER_8B["vocab_size"], DRAFTER_8B["hidden_size"]
    embed_w = torch.randn(vocab, hidden, device=dev, dtype=dt, generator=g) * 0.02
    lm_w = torch.randn(vocab, hidden, device=dev, dtype=dt, generator=g) * 0.02
    block = DRAFTER_8B["block_size"]
    rows = []
    for bs in BATCHES:
        if time.time() > deadline:
            rows.append({"batch": bs, "error": "budget spent"})
            continue
        width = PREFIX_LEN + block
        kv = DraftKVCache(num_layers=config.num_layers, num_slots=bs * width, num_kv_heads=config.num_kv_heads,
                          head_dim=config.head_dim, dtype=dt, device=dev)
        kv.k.normal_(generator=g)
        kv.v.normal_(generator=g)
        req_to_token = torch.arange(bs * width, device=dev, dtype=torch.int32).view(bs, width)
        plan = DraftAttnPlan.from_req_to_token(req_to_token=req_to_token,
                                               req_pool_indices=torch.arange(bs, device=dev),
                                               prefix_lens=torch.full((bs,), PREFIX_LEN, device=dev),
                                               block_size=block, width=width)
        proposer = BlockProposer(drafter, TorchDraftAttention(kv, config),
                                 embed=lambda ids: torch.nn.functional.embedding(ids, embed_w),
                                 lm_head=lambda hs: drafter.logits(hs, lm_w),
                                 mask_token_id=DRAFTER_8B["dflash_config"]["mask_token_id"], block_size=block)
        bonus = torch.randint(1000, 150000, (bs,), device=dev, generator=g)
        out = {}

        def step():
            out["tokens"] = proposer.propose(bonus, plan).tokens

        with torch.inference_mode():
            row = {"batch": bs, "block": block, "context_len": PREFIX_LEN, **_eager_vs_graph(step, eager_iters=10)}
        rows.append(row)
        log(f"drafter step bs={bs}: {row}")
        del kv, proposer
        torch.cuda.empty_cache()
    return rows


def cmd_micro(args) -> dict:
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("micro needs CUDA")
    deadline = time.time() + args.budget
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    for name, fn in (("drafter_step", drafter_step), ("verify_shaped", verify_shaped_forward)):
        try:
            result[name] = fn(deadline)
        except Exception as exc:
            result[name + "_error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-2000:]}"
        torch.cuda.empty_cache()
    result["ok"] = "drafter_step" in result or "verify_shaped" in result
    return result


# --------------------------------------------------------------------------------- report
def _load(results: Path, name: str) -> dict:
    path = results / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except Exception:
        return {}


def greedy_compare(ref: Optional[list], other: Optional[list]) -> Optional[dict]:
    if not ref or not other:
        return None
    exact, prefixes, first_diff = 0, [], []
    for a, b in zip(ref, other):
        a, b = a or [], b or []
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        exact += int(a == b)
        prefixes.append(n)
        if a != b:
            first_diff.append(n)
    return {"prompts": min(len(ref), len(other)), "exact": exact,
            "mean_matching_prefix": round(statistics.mean(prefixes), 2) if prefixes else None,
            "first_divergences": first_diff[:8]}


def cmd_report(args) -> dict:
    results, out = Path(args.results), Path(args.out)
    data = {m: _load(results, f"serve_{m}") for m in MODES}
    env, micro, models = _load(results, "env"), _load(results, "micro"), _load(results, "models")
    md = ["# GPU lane results", ""]
    md += [f"- device: {env.get('gpu', '?')}; torch {env.get('torch', '?')}; sglang {env.get('sglang', '?')}; "
           f"flashinfer {env.get('flashinfer', '?')}; sgl_kernel route: {env.get('sgl_kernel_route', '?')} "
           f"({env.get('sgl_kernel', '?')})",
           f"- target: Qwen3-8B shape, `--load-format dummy`, bf16; drafter: random DFlash b16 (5 layers); "
           f"prompts {PROMPT_LEN} token ids, {NEW_TOKENS} new tokens, greedy, ignore_eos", ""]

    md += ["## Server decode throughput (measured)", "",
           "| mode | startup s | conc | tok/s | step ms (median) | accept len | peak GPU MiB | KV pool tokens |",
           "|---|---|---|---|---|---|---|---|"]
    for m in MODES:
        d = data[m]
        if not d:
            md.append(f"| {m} | not run | | | | | | |")
            continue
        pool = (d.get("server_info") or {}).get("max_total_num_tokens")
        if not d.get("throughput"):
            md.append(f"| {m} | {d.get('startup_s', 'FAILED')} | | | | | {d.get('peak_gpu_mem_mib', '')} | {pool or ''} |")
        for p in d.get("throughput", []):
            md.append(f"| {m} | {d.get('startup_s')} | {p['concurrency']} | {p['tokens_per_s']} | {p['step_ms_median']} "
                      f"| {p['accept_length']} | {d.get('peak_gpu_mem_mib')} | {pool} |")
    md.append("")

    derived = []
    base = {p["concurrency"]: p for p in data["nospec"].get("throughput", [])}
    md += ["## End-to-end tokens/s derived at accept length tau (batch x tau / step time)", "",
           "| mode | conc | step ms | " + " | ".join(f"tok/s @ tau={t} | speed-up @ {t}" for t in TAUS) + " |",
           "|---|---|---|" + "---|---|" * len(TAUS)]
    for m in ("upstream", "ours"):
        for p in data[m].get("throughput", []):
            conc, step = p["concurrency"], p["step_ms_median"]
            row = {"mode": m, "concurrency": conc, "step_ms": step}
            cells = []
            for tau in TAUS:
                tps = conc * tau / (step / 1000.0) if step else None
                ref = base.get(conc)
                ref_tps = conc / (ref["step_ms_median"] / 1000.0) if ref and ref.get("step_ms_median") else None
                row[f"tps_tau_{tau}"] = round(tps, 1) if tps else None
                row[f"speedup_tau_{tau}"] = round(tps / ref_tps, 2) if tps and ref_tps else None
                cells += [str(row[f"tps_tau_{tau}"]), str(row[f"speedup_tau_{tau}"])]
            derived.append(row)
            md.append(f"| {m} | {conc} | {step} | " + " | ".join(cells) + " |")
    md += ["", "No-speculation reference: tok/s = batch / step time at the same concurrency.", ""]

    md += ["## Greedy equality vs no speculation (32 token-id prompts, 64 new tokens)", ""]
    greedy = {}
    for m in ("ours", "upstream"):
        cmp = greedy_compare(data["nospec"].get("greedy_output_ids"), data[m].get("greedy_output_ids"))
        greedy[m] = cmp
        md.append(f"- {m}: " + (f"{cmp['exact']}/{cmp['prompts']} identical, mean matching prefix "
                                f"{cmp['mean_matching_prefix']}, first divergences at {cmp['first_divergences']}"
                                if cmp else "not available"))
    md += ["", "(dummy weights make near-tied logits likely; upstream vs no-spec is the control.)", ""]

    md += ["## Micro-benchmarks (in-process, CUDA events, median)", "",
           "Verify-shaped target forward: 36 Qwen3-8B layers, torch GEMMs + SDPA, prefix 1024 tokens.", "",
           "| batch | verify len | eager ms | CUDA graph ms |", "|---|---|---|---|"]
    for r in micro.get("verify_shaped", []):
        md.append(f"| {r['batch']} | {r['verify_len']} | {r.get('eager_ms', r.get('error', ''))} | {r.get('graph_ms', '')} |")
    if micro.get("verify_shaped_error"):
        md.append(f"\nverify-shaped failed: {micro['verify_shaped_error'].splitlines()[0]}")
    md += ["", "sglang-dflash drafter step (BlockProposer + TorchDraftAttention, block 16, 5 layers, context 1024):", "",
           "| batch | eager ms | CUDA graph ms |", "|---|---|---|"]
    for r in micro.get("drafter_step", []):
        md.append(f"| {r['batch']} | {r.get('eager_ms', r.get('error', ''))} | {r.get('graph_ms', '')} |")
    if micro.get("drafter_step_error"):
        md.append(f"\ndrafter step failed: {micro['drafter_step_error'].splitlines()[0]}")

    kernel = _load(results, "drafter_kernel")
    if kernel:
        md += ["", "Kernel-level drafter step (`bench/gpu/drafter_step.py`): in `gpu_results.json` under "
               "`drafter_kernel`."]
    md += ["", "## Phases", ""]
    for name in ("env", "models", "serve_nospec", "serve_upstream", "serve_ours", "micro"):
        d = _load(results, name)
        status = "not run" if not d else ("ok" if d.get("ok") else "FAILED")
        md.append(f"- {name}: {status}" + (f" ({d.get('seconds')} s)" if d.get("seconds") is not None else ""))
        problems = ([d["error"]] if d.get("error") else []) + list(d.get("errors") or [])
        for err in problems[:5]:
            md += ["", "  ```", *("  " + line for line in str(err)[-1200:].splitlines()), "  ```"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_results.md").write_text("\n".join(md) + "\n")
    summary = {"env": env, "models": models, "serve": data, "derived": derived, "greedy": greedy, "micro": micro,
               "drafter_kernel": kernel or None}
    for d in summary["serve"].values():
        d.pop("greedy_output_ids", None)
    write_json(out / "gpu_results.json", summary)
    print("\n".join(md))
    return {"ok": True}


# ------------------------------------------------------------------------------------ env
def cmd_env(args) -> dict:
    info: dict[str, Any] = {"python": sys.version.split()[0], "sgl_kernel_route": os.environ.get("GPU_LANE_ROUTE")}
    for mod in ("torch", "sglang", "flashinfer", "transformers", "xgrammar", "sgl_kernel", "sglang_dflash", "triton"):
        try:
            m = __import__(mod)
            info[mod] = getattr(m, "__version__", "?")
            info[mod + "_file"] = getattr(m, "__file__", None)
        except Exception as exc:
            info[mod] = f"IMPORT FAILED: {type(exc).__name__}: {exc}"
    try:
        import torch

        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA"
        info["capability"] = torch.cuda.get_device_capability(0) if torch.cuda.is_available() else None
    except Exception as exc:
        info["gpu"] = f"error: {exc}"
    failed = [f"{k}: {info[k]}" for k in ("torch", "sglang", "flashinfer", "sgl_kernel")
              if str(info.get(k, "")).startswith("IMPORT FAILED")]
    info["ok"] = not failed
    if failed:
        info["error"] = "; ".join(failed)
    return info


def main(argv: Optional[list[str]] = None) -> int:
    # `timeout` sends SIGTERM: turn it into SystemExit so `finally` stops the server and
    # the phase still writes its JSON.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("env")
    p.add_argument("--results", required=True)
    p = sub.add_parser("models")
    p.add_argument("--models", required=True)
    p.add_argument("--results", required=True)
    p = sub.add_parser("serve")
    p.add_argument("--mode", choices=MODES, required=True)
    p.add_argument("--models", required=True)
    p.add_argument("--results", required=True)
    p.add_argument("--logs", required=True)
    p.add_argument("--budget", type=float, default=240, help="seconds for this phase, start-up included")
    p.add_argument("--start-timeout", type=float, default=420)
    p.add_argument("--tag", default="", help="suffix of the result file (a re-try)")
    p.add_argument("extra", nargs="*", help="more launch_server arguments (after --)")
    p = sub.add_parser("micro")
    p.add_argument("--results", required=True)
    p.add_argument("--budget", type=float, default=120)
    p = sub.add_parser("report")
    p.add_argument("--results", required=True)
    p.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    results = Path(args.results)
    if args.cmd == "report":
        return guarded("report", results / "report.json", lambda: cmd_report(args))
    name = {"serve": f"serve_{getattr(args, 'mode', '')}{getattr(args, 'tag', '')}"}.get(args.cmd, args.cmd)
    fn = {"env": cmd_env, "models": cmd_models, "serve": cmd_serve, "micro": cmd_micro}[args.cmd]
    return guarded(name, results / f"{name}.json", lambda: fn(args))


if __name__ == "__main__":
    sys.exit(main())
