"""CPU-lane benchmark: no speculation vs our DFLASH vs SGLang's DFLASH, in one run.

    python -m bench.cpu_bench [--drafter DIR] [--prompts 16] [--max-new-tokens 96]

SmolLM2-135M-Instruct (from the PyPI wheel) serves held-out prompts of the drafter's
training recipe, greedy, as chat turns (the model's chat template, as
``/v1/chat/completions`` applies it; ``--raw-text`` sends the bare instruction),
through real ``launch_server`` processes started one after another with identical
flags. Per mode and concurrency it reports end-to-end output tokens/s, tau (tokens per
target forward = completion tokens / verify steps, the bonus included) and the
server-side draft and verify step times (ours from its telemetry, upstream's from the
runner-forward timer SGLANG_DFLASH_TIMING enables). Each concurrency is first warmed
up off the clock (``--warmup-tokens``) in every mode. Greedy outputs of the
speculative modes are checked against no speculation. Ratios are taken within this
one run; absolute numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sglang_dflash.testing.devmodels.smollm2 import convert
from sglang_dflash.testing.local_server import Server

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
    from sglang_dflash.train.prompts import build_prompts, split_prompts

    report = Path(drafter) / "train_report.json"
    if not report.exists():
        raise SystemExit(f"{report} is missing: the benchmark needs a drafter trained by `make drafter`")
    recipe = json.loads(report.read_text())["args"]
    prompts = build_prompts(recipe["num_prompts"] + recipe["num_heldout"], recipe["prompt_seed"])
    _, heldout = split_prompts(prompts, recipe["num_heldout"])
    return [heldout[i % len(heldout)] for i in range(n)]  # cycled when n exceeds the split


def chat_inputs(model: str, prompts: list[str]) -> list[list[int]]:
    """Each instruction as a user turn through the model's chat template: what a chat
    client sends, and the distribution the drafter was distilled on."""
    from transformers import AutoTokenizer

    from sglang_dflash.train.data import encode_prompt

    tokenizer = AutoTokenizer.from_pretrained(model)
    return [encode_prompt(tokenizer, p) for p in prompts]


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
        state = server.dflash_state() or {}
        stats = state.get("stats", {})
        row["draft_ms"] = stats.get("draft_ms_per_step")
        row["verify_ms"] = stats.get("verify_ms_per_step")
        if "acceptance_by_position" in state:  # ours only: input for bench.adaptive_sim --alpha
            row["acceptance_by_position"] = state["acceptance_by_position"]
    return row


def bench(args) -> dict:
    model = convert(REPO / ".cache" / "models" / "smollm2-135m")
    prompts = heldout_prompts(args.prompts, args.drafter)
    if not args.raw_text:
        prompts = chat_inputs(model, prompts)
    params = {"temperature": 0.0, "max_new_tokens": args.max_new_tokens}
    results, outputs = {}, {}
    warm = {**params, "max_new_tokens": args.warmup_tokens}
    for mode in args.modes:
        options, env = MODES[mode]
        opts = {"model-path": model, "max-running-requests": max(args.concurrency), **options}
        if options:
            opts["speculative-draft-model-path"] = args.drafter
            opts["speculative-num-draft-tokens"] = args.block
        server = Server(options=opts, env=env).start()
        try:
            run_requests(server, prompts[:2], params, 1)  # warm-up
            for concurrency in args.concurrency:
                # Every mode first meets this batch size off the clock, so the adaptive
                # policy's one-time probes of a new batch size are not timed (steady state).
                run_requests(server, prompts[:concurrency], warm, concurrency)
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
        for mode in [m for m in MODES if (m, c) in results]:
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
    parser.add_argument("--modes", type=lambda s: s.split(","), default=list(MODES),
                        help=f"comma-separated subset of {','.join(MODES)} (no-spec is always run)")
    parser.add_argument("--warmup-tokens", type=int, default=32, help="untimed warm-up per concurrency")
    parser.add_argument("--raw-text", action="store_true", help="send bare instructions, not chat turns")
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    parser.add_argument("--json", default=str(REPO / "bench" / "out" / "cpu_bench.json"))
    args = parser.parse_args()
    unknown = sorted(set(args.modes) - set(MODES))
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {list(MODES)}")
    args.modes = ["no-spec"] + [m for m in args.modes if m != "no-spec"]
    results = bench(args)
    print(table(results, args.concurrency))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({f"{m}@{c}": r for (m, c), r in results.items()}, indent=2))


if __name__ == "__main__":
    main()
