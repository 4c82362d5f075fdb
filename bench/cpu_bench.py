"""CPU-lane benchmark: no speculation vs our DFLASH vs SGLang's DFLASH, in one run.

    python -m bench.cpu_bench [--drafter DIR] [--prompts 16] [--max-new-tokens 96]

SmolLM2-135M-Instruct (from the PyPI wheel) serves held-out prompts of the drafter's
training recipe, greedy, through three real ``launch_server`` processes started one
after another with identical flags. Per mode and concurrency it reports end-to-end
output tokens/s, tau (tokens per target forward = completion tokens / verify steps,
the bonus included) and the server-side draft and verify step times (ours from its
telemetry, upstream's from the runner-forward timer SGLANG_DFLASH_TIMING enables).
Greedy outputs of both speculative modes are checked against no speculation. Ratios
are taken within this one run; absolute numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sglang_dflash.devmodels.smollm2 import convert
from sglang_dflash.local_server import Server

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DRAFTER = REPO / "drafters" / "smollm2-135m-dflash"
MODES = {
    "no-spec": ({}, {}),
    "ours": ({"speculative-algorithm": "DFLASH"}, {}),
    "ours-full-block": ({"speculative-algorithm": "DFLASH", "no-speculative-dflash-adaptive": True}, {}),
    "upstream": ({"speculative-algorithm": "DFLASH"}, {"SGLANG_DFLASH_BACKEND": "upstream", "SGLANG_DFLASH_TIMING": "1"}),
}


def heldout_prompts(n: int, drafter: Path = DEFAULT_DRAFTER) -> list[str]:
    """Prompts the drafter never saw: same generator and split as its training run,
    read from the ``train_report.json`` the trainer writes next to the weights."""
    from sglang_dflash.train_prompts import build_prompts, split_prompts

    report = Path(drafter) / "train_report.json"
    if not report.exists():
        raise SystemExit(f"{report} is missing: the benchmark needs a drafter trained by `make drafter`")
    recipe = json.loads(report.read_text())["args"]
    prompts = build_prompts(recipe["num_prompts"] + recipe["num_heldout"], recipe["prompt_seed"])
    _, heldout = split_prompts(prompts, recipe["num_heldout"])
    return [heldout[i % len(heldout)] for i in range(n)]  # cycled when n exceeds the split


def run_requests(server: Server, prompts, params, concurrency: int) -> tuple[list[dict], float]:
    start = time.perf_counter()
    if concurrency == 1:
        outs = [server.generate_one(p, params) for p in prompts]
    else:
        with ThreadPoolExecutor(concurrency) as pool:
            outs = list(pool.map(lambda p: server.generate_one(p, params), prompts))
    return outs, time.perf_counter() - start


def summarize(outs: list[dict], seconds: float, server: Server, spec: bool) -> dict:
    tokens = sum(o["meta_info"]["completion_tokens"] for o in outs)
    row = {"tokens": tokens, "seconds": round(seconds, 3), "tok_per_s": round(tokens / seconds, 2)}
    if spec:
        verify = sum(o["meta_info"].get("spec_verify_ct", 0) for o in outs)
        # The first token of each request comes from prefill, not from a verify step.
        row["tau"] = round((tokens - len(outs)) / max(verify, 1), 3)
        stats = (server.dflash_state() or {}).get("stats", {})
        row["draft_ms"] = stats.get("draft_ms_per_step")
        row["verify_ms"] = stats.get("verify_ms_per_step")
    return row


def bench(args) -> dict:
    model = convert(REPO / ".cache" / "models" / "smollm2-135m")
    prompts = heldout_prompts(args.prompts, args.drafter)
    params = {"temperature": 0.0, "max_new_tokens": args.max_new_tokens}
    results, outputs = {}, {}
    for mode, (options, env) in MODES.items():
        opts = {"model-path": model, "max-running-requests": max(args.concurrency), **options}
        if options:
            opts["speculative-draft-model-path"] = args.drafter
            opts["speculative-num-draft-tokens"] = args.block
        server = Server(options=opts, env=env).start()
        try:
            run_requests(server, prompts[:2], params, 1)  # warm-up
            for concurrency in args.concurrency:
                server.flush_cache()
                outs, seconds = run_requests(server, prompts, params, concurrency)
                results[(mode, concurrency)] = summarize(outs, seconds, server, bool(options))
                outputs[(mode, concurrency)] = [o["output_ids"] for o in outs]
                print(mode, concurrency, results[(mode, concurrency)], flush=True)
        finally:
            server.stop()
    for (mode, concurrency), ids in outputs.items():
        results[(mode, concurrency)]["same_as_no_spec"] = ids == outputs[("no-spec", concurrency)]
    return results


def table(results: dict, concurrencies) -> str:
    lines = [
        "| concurrency | mode | tok/s | vs no-spec | tau | draft ms/step | verify ms/step | greedy == no-spec |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in concurrencies:
        base = results[("no-spec", c)]["tok_per_s"]
        for mode in MODES:
            r = results[(mode, c)]
            lines.append(
                f"| {c} | {mode} | {r['tok_per_s']} | {r['tok_per_s'] / base:.2f}x | {r.get('tau', '-')} | "
                f"{r.get('draft_ms') or '-'} | {r.get('verify_ms') or '-'} | {r['same_as_no_spec']} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drafter", default=str(DEFAULT_DRAFTER))
    parser.add_argument("--block", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    parser.add_argument("--json", default=str(REPO / "bench" / "out" / "cpu_bench.json"))
    args = parser.parse_args()
    results = bench(args)
    print(table(results, args.concurrency))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({f"{m}@{c}": r for (m, c), r in results.items()}, indent=2))


if __name__ == "__main__":
    main()
