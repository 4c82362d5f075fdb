"""Every target family end to end, on the CPU lane or a GPU: no speculation vs our DFLASH.

    python -m bench.architectures [--device cpu|cuda] [--archs gpt_oss qwen3_5 ...]
                                  [--prompts 30] [--batch 16] [--drafters DIR] [--out DIR]

Per family (``sglang_dflash/testing/devmodels/targets.py``): the tiny random target is
built, its 1-layer drafter is distilled with the tiny recipe (or read from
``--drafters DIR/<family>``), then a no-speculation server and a DFLASH server (whole
blocks) start one after the other with the family's flags
(:func:`~sglang_dflash.testing.devmodels.targets.server_flags`) and serve the same
greedy token-id prompts. Reported per family: exact matches and the first differing
position, accepted drafts per verify step, tokens/s of both, and whether every pool
(full KV, sliding KV, recurrent-state slots) is back to capacity after a flush.

On the CPU lane this is the engine test's check in one table. On a GPU
(``--device cuda``, bf16, CUDA graphs) it runs what only a GPU runs: FlashInfer, or
Triton attention with windows and sinks for gpt-oss / Gemma-4, SGLang's Triton GDN
kernels and its CUDA state-scatter commit for Qwen3-Next / Qwen3.5, with the
``extra_buffer`` radix strategy that tracks recurrent states inside verify blocks.
bf16 verify batches round differently from one-token decode, so a GPU mismatch on a
random model can be a near-tie; the report gives the first differing position and
both tokens for that reason. ``bench/architectures_gpu.sh`` runs it on the GPU lane.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from sglang_dflash.testing.devmodels.targets import ARCHITECTURES, build_target, server_env, server_flags
from sglang_dflash.testing.local_server import CPU_ARGS, Server

GPU_ARGS = {
    "mem-fraction-static": 0.3,
    "max-total-tokens": 65536,
    "dtype": "bfloat16",
    "random-seed": 0,
    "log-level": "warning",
}


def prompts(n: int, seed: int) -> list[list[int]]:
    """Token-id prompts of 3..60 tokens (longer than the 8-token window), every fourth
    sharing a 24-token prefix (radix hits)."""
    import random

    rng = random.Random(seed)
    prefix = [rng.randrange(10, 512) for _ in range(24)]
    out = []
    for i in range(n):
        body = [rng.randrange(10, 512) for _ in range(rng.randint(3, 36))]
        out.append(prefix + body if i % 4 == 0 else body)
    return out


def drafter_for(name: str, target: Path, root: Path) -> Path:
    from sglang_dflash.testing.devmodels.tiny_trained import train_tiny_drafter

    path = root / name
    if not (path / "model.safetensors").exists():
        train_tiny_drafter(target, path)
    return path


def serve(server: Server, batch_prompts, params, batch: int) -> tuple[list[dict], float]:
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=batch) as pool:
        outs = list(pool.map(lambda p: server.generate_one(p, params), batch_prompts))
    return outs, time.perf_counter() - start


def pools_drained(server: Server) -> dict:
    server.flush_cache()
    state = server.dflash_state() or {}
    pools = state.get("pools", {})
    return {name: pool["available"] == pool["capacity"] and pool["cached"] == 0 for name, pool in pools.items()}


def run_family(name: str, args, work: Path, base_args: dict) -> dict:
    target = build_target(name, work / "targets" / name)
    drafter = drafter_for(name, target, Path(args.drafters) if args.drafters else work / "drafters")
    options = {"model-path": str(target), "page-size": 1, "max-running-requests": args.batch,
               **server_flags(name, args.device)}
    ps = prompts(args.prompts, seed=sum(map(ord, name)))
    params = {"temperature": 0.0, "max_new_tokens": args.max_new_tokens, "ignore_eos": True}
    result: dict = {"family": name}
    outputs = {}
    for mode, extra in (("no-spec", {}), ("dflash", {"speculative-algorithm": "DFLASH",
                                                       "speculative-draft-model-path": str(drafter),
                                                       "no-speculative-dflash-adaptive": True})):
        server = Server(options={**options, **extra}, base_args=base_args, env=server_env(name, args.device))
        try:
            server.start(timeout=args.start_timeout)
            serve(server, ps[:2], params, args.batch)  # warm-up (JIT, graphs) off the clock
            outs, seconds = serve(server, ps, params, args.batch)
            outputs[mode] = outs
            tokens = sum(o["meta_info"]["completion_tokens"] for o in outs)
            result[mode] = {"tokens_per_s": round(tokens / seconds, 1)}
            if mode == "dflash":
                steps = [n for o in outs for n in o["meta_info"].get("spec_dflash_accepted_per_step", [])]
                result[mode]["accepted_per_step"] = round(sum(steps) / max(1, len(steps)), 3)
                result[mode]["pools_drained"] = pools_drained(server)
        except (RuntimeError, TimeoutError, requests.RequestException) as exc:
            result[mode] = {"error": str(exc)[-1500:]}
        finally:
            server.stop()
    if "no-spec" in outputs and "dflash" in outputs:
        diffs = []
        for i, (a, b) in enumerate(zip(outputs["dflash"], outputs["no-spec"])):
            if a["output_ids"] != b["output_ids"]:
                at = next(j for j, (x, y) in enumerate(zip(a["output_ids"], b["output_ids"])) if x != y)
                diffs.append({"request": i, "position": at, "dflash": a["output_ids"][at], "no_spec": b["output_ids"][at]})
        result["identical"] = f"{len(ps) - len(diffs)}/{len(ps)}"
        result["first_differences"] = diffs[:5]
    return result


def markdown(results: list[dict], device: str) -> str:
    lines = [f"| family ({device}) | identical | accepted drafts / step | no-spec tok/s | DFLASH tok/s | pools drained |",
             "|---|---|---|---|---|---|"]
    for r in results:
        spec, plain = r.get("dflash", {}), r.get("no-spec", {})
        error = spec.get("error") or plain.get("error")
        if error:
            lines.append(f"| {r['family']} | error: {error.splitlines()[-1][:120]} | | | | |")
            continue
        drained = all(spec.get("pools_drained", {}).values()) and bool(spec.get("pools_drained"))
        lines.append(f"| {r['family']} | {r.get('identical')} | {spec.get('accepted_per_step')} | "
                     f"{plain.get('tokens_per_s')} | {spec.get('tokens_per_s')} | {'yes' if drained else 'NO'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--archs", nargs="*", default=list(ARCHITECTURES), choices=list(ARCHITECTURES))
    parser.add_argument("--prompts", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--drafters", help="folder of distilled drafters, one sub-folder per family")
    parser.add_argument("--work", default=".cache/bench-architectures")
    parser.add_argument("--out", default=None, help="write results.json and results.md here")
    parser.add_argument("--start-timeout", type=float, default=300)
    args = parser.parse_args()
    base_args = dict(CPU_ARGS if args.device == "cpu" else GPU_ARGS)
    results = []
    for name in args.archs:
        results.append(run_family(name, args, Path(args.work), base_args))
        print(json.dumps(results[-1]), flush=True)
    table = markdown(results, args.device)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))
        (out / "results.md").write_text(table)


if __name__ == "__main__":
    main()
