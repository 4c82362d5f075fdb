"""Simulate the adaptive verify-length policy against fixed policies.

    python -m bench.adaptive_sim [--costs bench/costs/cpu-2026-11-29.json] [--alpha 0.8,0.75,...]
                                 [--seeds 0,1,2,3] [--request-tokens 96]

Inputs are measurements: per-block-position acceptance (from a real run of the
drafter, ``acceptance_by_position``) and the wall time of a decode step per (batch
size, verify length) (``bench/step_costs.py`` on the CPU lane, or a GPU micro-benchmark
table in the same format; ``bench/costs/`` holds the tables bench/RESULTS.md uses).
Each simulated step draws every request's accepted drafts from the per-position rates,
charges the measured step time (with 5 % noise), and feeds the outcome back to the
policy exactly as the worker does. Reported: committed tokens per second per policy and
batch size, and adaptive / max(no-spec, fixed block), in steady state (after
``--warmup`` steps of learning) and with the warm-up included.

``--seeds``: one run per seed (the noise, the acceptance draws and the policy's own
exploration draws all follow it) and a summary over the seeds. ``--request-tokens N``:
requests finish once they have committed N tokens and a new request takes the slot
(the policy forgets the old one, as the worker does); by default requests never finish.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from sglang_dflash.spec.adaptive import VerifyLengthPolicy, length_buckets

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


class Requests:
    """The batch's request ids; with ``life`` > 0 a request finishes once it has
    committed ``life`` tokens and a fresh one takes its slot."""

    def __init__(self, bs: int, life: int, forget) -> None:
        self.rids = [f"r{i}" for i in range(bs)]
        self.committed = [0] * bs
        self.life, self.forget, self.next_id = life, forget, bs

    def commit(self, accepted: list[int]) -> None:
        if not self.life:
            return
        for i, a in enumerate(accepted):
            self.committed[i] += a + 1
            if self.committed[i] >= self.life:
                self.forget([self.rids[i]])
                self.rids[i], self.committed[i] = f"r{self.next_id}", 0
                self.next_id += 1


def simulate(choose, observe, alpha, cost, bs: int, steps: int, seed: int, warmup: int = 0, life: int = 0,
             forget=lambda rids: None) -> tuple[float, float]:
    """(steady-state tokens/s over the last ``steps`` steps, tokens/s over all
    ``warmup + steps``). The policy learns throughout; warm-up is its one-time price of
    probing every length before its tables fill, which a server pays once per life."""
    rng = np.random.default_rng([seed, bs])
    batch = Requests(bs, life, forget)
    seconds = tokens = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            warm_seconds, warm_tokens, seconds, tokens = seconds, tokens, 0.0, 0.0
        length = choose(list(batch.rids))
        accepted = accepted_drafts(alpha, length, rng, bs)
        dt = cost(bs, length) * rng.uniform(0.95, 1.05)
        observe(list(batch.rids), length, accepted, dt)
        batch.commit(accepted)
        seconds += dt
        tokens += sum(a + 1 for a in accepted)
    return tokens / seconds, (tokens + warm_tokens) / (seconds + warm_seconds)


def run(alpha: np.ndarray, table, batch_sizes, steps: int, warmup: int, seed: int = 0, life: int = 0) -> dict:
    block = len(alpha) + 1
    cost = cost_fn(table)
    results = {}
    for bs in batch_sizes:
        row = {}
        for length in length_buckets(block):
            row[f"fixed-{length}"], _ = simulate(lambda r, L=length: L, lambda *a: None, alpha, cost, bs, steps,
                                                 seed=seed, life=life)
        policy = VerifyLengthPolicy(block, seed=seed)
        row["adaptive"], row["adaptive_incl_warmup"] = simulate(
            policy.choose, policy.observe, alpha, cost, bs, steps, seed=seed, warmup=warmup, life=life,
            forget=policy.acceptance.forget,
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


def seeds_markdown(per_seed: dict[int, dict]) -> str:
    """adaptive / max(no-spec, block), steady state, per seed and over the seeds."""
    seeds = list(per_seed)
    sizes = list(per_seed[seeds[0]])
    lines = ["| batch | " + " | ".join(f"seed {s}" for s in seeds) + " | min | mean |",
             "|" + "---|" * (len(seeds) + 3)]
    for bs in sizes:
        ratios = [per_seed[s][bs]["adaptive_vs_best_of_nospec_and_block"] for s in seeds]
        cells = " | ".join(f"{r:.3f}" for r in ratios)
        lines.append(f"| {bs} | {cells} | {min(ratios):.3f} | {sum(ratios) / len(ratios):.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--costs", default=str(REPO / "bench" / "costs" / "cpu-2026-11-29.json"))
    parser.add_argument("--alpha", default=None, help="per-position acceptance; default: the one in --costs")
    parser.add_argument("--batch-sizes", default="1,8,32,64")
    parser.add_argument("--steps", type=int, default=3000, help="measured steps per cell")
    parser.add_argument("--warmup", type=int, default=500, help="adaptive steps before measuring")
    parser.add_argument("--seeds", default="0", help="comma-separated simulation seeds")
    parser.add_argument("--request-tokens", type=int, default=0,
                        help="tokens after which a request finishes and is replaced (0: never)")
    args = parser.parse_args()
    data = json.loads(Path(args.costs).read_text())
    alpha = np.array([float(x) for x in args.alpha.split(",")]) if args.alpha else np.array(data["acceptance_by_position"])
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    life = f", requests of {args.request_tokens} tokens" if args.request_tokens else ""
    print(f"tokens/s (simulated from {args.costs}; per-position acceptance {np.round(alpha, 3).tolist()}{life})")
    per_seed = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        per_seed[seed] = run(alpha, load_costs(Path(args.costs)), sizes, args.steps, args.warmup, seed=seed,
                             life=args.request_tokens)
        print(f"\nseed {seed}\n" + table_markdown(per_seed[seed], len(alpha) + 1), flush=True)
    if len(per_seed) > 1:
        print("\nadaptive / max(no-spec, block), steady state\n" + seeds_markdown(per_seed))


if __name__ == "__main__":
    main()
