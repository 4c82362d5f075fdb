"""Measure decode-step wall time per (batch size, verify length) on the CPU lane.

    python -m bench.step_costs [--drafter DIR] [--batch-sizes 1,8,32,64]

For each verify length L (the adaptive policy's buckets for the block) one SmolLM2
server runs with ``--speculative-dflash-verify-len L``; at each batch size it decodes
that many concurrent requests and the worker's own step clock (start to start, so the
scheduler's overhead is included) is read back from ``get_server_info``. The L = block
run also records the drafter's per-position acceptance. Output: JSON for
``bench.adaptive_sim``.
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.cpu_bench import DEFAULT_DRAFTER, REPO, chat_inputs, heldout_prompts
from sglang_dflash.spec.adaptive import batch_bucket, length_buckets
from sglang_dflash.testing.devmodels.smollm2 import convert
from sglang_dflash.testing.local_server import Server


def measure(args) -> dict:
    model = convert(REPO / ".cache" / "models" / "smollm2-135m")
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    prompts = chat_inputs(model, heldout_prompts(max(sizes), args.drafter))
    params = {"temperature": 0.0, "max_new_tokens": args.max_new_tokens, "ignore_eos": True}
    table: dict[int, dict[int, float]] = {b: {} for b in sizes}
    alpha = None
    for length in length_buckets(args.block):
        server = Server(
            options={
                "model-path": model,
                "speculative-algorithm": "DFLASH",
                "speculative-draft-model-path": args.drafter,
                "speculative-num-draft-tokens": args.block,
                "speculative-dflash-verify-len": length,
                "max-running-requests": max(sizes),
                "max-total-tokens": 32768,
            }
        ).start()
        try:
            for bs in sizes:
                with ThreadPoolExecutor(bs) as pool:
                    list(pool.map(lambda p: server.generate_one(p, params), prompts[:bs]))
                state = server.dflash_state()
                cell = state["step_ms"].get(f"bs{batch_bucket(bs)}_len{length}")
                if cell is not None:
                    table[bs][length] = cell / 1e3
                print(f"L={length} bs={bs}: {cell} ms/step", flush=True)
            if length == args.block:
                alpha = state["acceptance_by_position"]
        finally:
            server.stop()
    return {
        "device": "cpu (CPU lane, torch_native attention)",
        "model": "SmolLM2-135M-Instruct",
        "drafter": str(args.drafter),
        "block": args.block,
        "acceptance_by_position": alpha,
        "step_seconds": {str(b): {str(l): t for l, t in row.items()} for b, row in table.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drafter", default=str(DEFAULT_DRAFTER))
    parser.add_argument("--block", type=int, default=8)
    parser.add_argument("--batch-sizes", default="1,8,32,64")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "step_costs.json"))
    args = parser.parse_args()
    result = measure(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
