"""Simulate the adaptive verify-length policy against fixed policies.

    python -m bench.adaptive_sim [--costs bench/out/step_costs.json] [--alpha 0.8,0.75,...]

Inputs are measurements: per-block-position acceptance (from a real run of the
drafter, ``acceptance_by_position``) and the wall time of a decode step per (batch
size, verify length) (``bench/step_costs.py`` on the CPU lane, or a GPU micro-benchmark
table in the same format). Each simulated step draws every request's accepted drafts
from the per-position rates, charges the measured step time (with 5 % noise), and
feeds the outcome back to the policy exactly as the worker does. Reported: committed
tokens per second per policy and batch size, and adaptive / max(no-spec, fixed block),
in steady state (after ``--warmup`` steps of learning) and with the warm-up included.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from sglang_dflash.adaptive import VerifyLengthPolicy, length_buckets

REPO = Path(__file__).resolve().parents[1]


def load_costs(path: Path) -> dict[tuple[int, int], float]:
    table = json.loads(path.read_text())
    return {(int(b), int(l)): float(t) for b, row in table["step_seconds"].items() for l, t in row.items()}


def cost_fn(table: dict[tuple[int, int], float]):
    """Measured seconds per step; interpolated linearly in batch size between measurements."""
    sizes = sorted({b for b, _ in table})

    def cost(bs: int, length: int) -> float:
        known = [b for b in sizes if (b, length) in table]
        xs = np.array(known, dtype=float)
        ys = np.array([table[(b, length)] for b in known])
        return float(np.interp(bs, xs, ys))

    return cost


def accepted_drafts(alpha: np.ndarray, length: int, rng: np.random.Generator, n: int) -> list[int]:
    out = []
    for _ in range(n):
        a = 0
        while a < length - 1 and rng.random() < alpha[a]:
            a += 1
        out.append(a)
    return out


def simulate(choose, observe, alpha, cost, bs: int, steps: int, seed: int, warmup: int = 0) -> tuple[float, float]:
    """(steady-state tokens/s over the last ``steps`` steps, tokens/s over all
    ``warmup + steps``). The policy learns throughout; warm-up is its one-time price of
    probing every length before its tables fill, which a server pays once per life."""
    rng = np.random.default_rng(seed)
    rids = [f"r{i}" for i in range(bs)]
    seconds = tokens = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            warm_seconds, warm_tokens, seconds, tokens = seconds, tokens, 0.0, 0.0
        length = choose(rids)
        accepted = accepted_drafts(alpha, length, rng, bs)
        dt = cost(bs, length) * rng.uniform(0.95, 1.05)
        observe(rids, length, accepted, dt)
        seconds += dt
        tokens += sum(a + 1 for a in accepted)
    return tokens / seconds, (tokens + warm_tokens) / (seconds + warm_seconds)


def run(alpha: np.ndarray, table, batch_sizes, steps: int, warmup: int) -> dict:
    block = len(alpha) + 1
    cost = cost_fn(table)
    results = {}
    for bs in batch_sizes:
        row = {}
        for length in length_buckets(block):
            row[f"fixed-{length}"], _ = simulate(lambda r, L=length: L, lambda *a: None, alpha, cost, bs, steps, seed=bs)
        policy = VerifyLengthPolicy(block)
        row["adaptive"], row["adaptive_incl_warmup"] = simulate(
            policy.choose, policy.observe, alpha, cost, bs, steps, seed=bs, warmup=warmup
        )
        best = max(row["fixed-1"], row[f"fixed-{block}"])
        row["adaptive_vs_best_of_nospec_and_block"] = row["adaptive"] / best
        row["incl_warmup_vs_best"] = row["adaptive_incl_warmup"] / best
        results[bs] = row
    return results


def table_markdown(results: dict, block: int) -> str:
    lengths = length_buckets(block)
    head = "| batch | " + " | ".join(f"L={l}" + (" (no-spec)" if l == 1 else " (block)" if l == block else "") for l in lengths)
    lines = [head + " | adaptive | adaptive / max(no-spec, block) | same, warm-up included |",
             "|" + "---|" * (len(lengths) + 4)]
    for bs, row in results.items():
        cells = " | ".join(f"{row[f'fixed-{l}']:.1f}" for l in lengths)
        lines.append(f"| {bs} | {cells} | {row['adaptive']:.1f} | {row['adaptive_vs_best_of_nospec_and_block']:.3f} | "
                     f"{row['incl_warmup_vs_best']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--costs", default=str(REPO / "bench" / "out" / "step_costs.json"))
    parser.add_argument("--alpha", default=None, help="per-position acceptance; default: the one in --costs")
    parser.add_argument("--batch-sizes", default="1,8,32,64")
    parser.add_argument("--steps", type=int, default=3000, help="measured steps per cell")
    parser.add_argument("--warmup", type=int, default=500, help="adaptive steps before measuring")
    args = parser.parse_args()
    data = json.loads(Path(args.costs).read_text())
    alpha = np.array([float(x) for x in args.alpha.split(",")]) if args.alpha else np.array(data["acceptance_by_position"])
    results = run(alpha, load_costs(Path(args.costs)), [int(b) for b in args.batch_sizes.split(",")], args.steps, args.warmup)
    print(f"tokens/s (simulated from {args.costs}; per-position acceptance {np.round(alpha, 3).tolist()})")
    print(table_markdown(results, len(alpha) + 1))


if __name__ == "__main__":
    main()
