"""Batch-aware verify length: speculate exactly as far as it pays at this batch size.

Verifying ``L`` nodes per request costs the target ``bs * L`` tokens of work. At batch
1 that is nearly free (decode is memory-bound), so long blocks win; at high batch the
verify turns compute-bound and unaccepted nodes are pure waste, which is why users
see DFlash fall behind plain decoding above concurrency ~8. Each step this policy
picks ``L`` from a few buckets (1 = speculation off: no draft, plain decode) to
maximise expected committed tokens per second:

    score(L) = sum_i E_i(L) / T(bs, L),   E_i(L) = 1 + sum_{k<L} prod_{j<=k} alpha_ij

where ``alpha_ij`` is request i's probability that block position j is accepted given
the positions before it were (estimated online, per request and globally), and
``T(bs, L)`` is the measured wall time of a decode step (an online table with a
least-squares fallback for unmeasured cells). Exploration keeps the table honest:
an unmeasured length is probed once per batch-size bucket when the fallback puts it
near the best, and the best-scoring longer length is re-tried at a rate capped by the
throughput it may cost (``explore_budget``). Buckets keep the lengths few, so every
(batch bucket, length) cell of the cost table fills after a few steps.

No target graphs are captured per length: on CUDA the target's verify graphs have the
full verify width, so a shorter verify (and plain decode, a one-node verify) runs the
target eagerly. The step clock measures those steps like any other, so that price is in
``T(bs, L)`` and the policy weighs it; the stats' ``target_graph_by_verify_len`` shows
which lengths replayed a graph.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import numpy as np

LENGTH_BUCKETS = (1, 2, 4, 8, 16, 32)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def length_buckets(block_size: int) -> tuple[int, ...]:
    return tuple(sorted({b for b in LENGTH_BUCKETS if b < block_size} | {block_size}))


def batch_bucket(bs: int) -> int:
    return next((b for b in BATCH_BUCKETS if bs <= b), BATCH_BUCKETS[-1])


def expected_tokens(alpha: np.ndarray, verify_len: int) -> np.ndarray:
    """Committed tokens per step when verifying ``verify_len`` nodes (bonus included);
    ``alpha`` [..., B-1] per-position acceptance -> [...]."""
    return 1.0 + np.cumprod(alpha[..., : verify_len - 1], axis=-1).sum(axis=-1)


@dataclass
class _Counts:
    trials: np.ndarray
    hits: np.ndarray


class AcceptanceEstimator:
    """Per-position conditional acceptance, globally and per request.

    A verify of ``L`` nodes tries block positions ``1 .. min(accepted + 1, L - 1)`` and
    hits ``1 .. accepted``. Acceptance decays smoothly along a block, so each global
    position is shrunk toward the position before it (``chain_prior`` pseudo-trials):
    positions a short verify never reaches inherit the measured rate instead of a
    fixed guess, which keeps the policy from locking itself into short verifies. Global
    counts decay so the estimate follows drift; a request's own counts are shrunk toward
    the global rate with ``prior`` pseudo-trials.
    """

    def __init__(
        self,
        block_size: int,
        *,
        prior: float = 4.0,
        chain_prior: float = 2.0,
        decay: float = 0.995,
        initial_alpha: float = 0.6,
    ):
        n = block_size - 1
        self.prior = prior
        self.chain_prior = chain_prior
        self.decay = decay
        self.initial_alpha = initial_alpha
        self.global_counts = _Counts(np.zeros(n), np.zeros(n))
        self.requests: dict[str, _Counts] = {}

    def observe(self, rid: str, verify_len: int, num_accepted: int) -> None:
        tried = min(num_accepted + 1, verify_len - 1)
        if tried <= 0:
            return
        g = self.global_counts
        g.trials *= self.decay
        g.hits *= self.decay
        g.trials[:tried] += 1
        g.hits[:num_accepted] += 1
        r = self.requests.setdefault(rid, _Counts(np.zeros_like(g.trials), np.zeros_like(g.hits)))
        r.trials[:tried] += 1
        r.hits[:num_accepted] += 1

    def global_alpha(self, optimism: float = 0.0) -> np.ndarray:
        """Per-position estimate; ``optimism`` adds that many standard errors (UCB),
        so positions with few trials look worth verifying until measured."""
        g = self.global_counts
        out = np.empty_like(g.trials)
        prev = self.initial_alpha
        for k in range(len(out)):
            n = g.trials[k] + self.chain_prior
            prev = (g.hits[k] + self.chain_prior * prev) / n
            out[k] = min(1.0, prev + optimism * np.sqrt(prev * (1 - prev) / n))
        return out

    def alpha(self, rid: str, optimism: float = 0.0) -> np.ndarray:
        return self.alphas([rid], optimism)[0]

    def alphas(self, rids: Sequence[str], optimism: float = 0.0) -> np.ndarray:
        """[len(rids), B-1] per-request estimates, shrunk towards the global one."""
        base = self.global_alpha(optimism)
        zeros = np.zeros_like(base)
        counts = [self.requests.get(rid) for rid in rids]
        hits = np.stack([zeros if c is None else c.hits for c in counts])
        trials = np.stack([zeros if c is None else c.trials for c in counts])
        return (hits + self.prior * base) / (trials + self.prior)

    def forget(self, rids: Iterable[str]) -> None:
        for rid in rids:
            self.requests.pop(rid, None)


class StepCostModel:
    """Seconds per decode step for (batch size, verify length).

    Cells hold an exponential moving average of measured steps. Unmeasured cells fall
    back to a ridge fit of ``t = c0 + c1*[L>1] + c2*bs*L + c3*bs*[L>1]`` over recent
    measurements (draft cost appears only when drafting), and before any measurement
    every length costs the same, so the policy starts by speculating.
    """

    def __init__(self, *, ema: float = 0.2, window: int = 512) -> None:
        self.ema = ema
        self.cells: dict[tuple[int, int], float] = {}
        self.recent: deque = deque(maxlen=window)

    @staticmethod
    def _features(bs: int, verify_len: int) -> np.ndarray:
        draft = 1.0 if verify_len > 1 else 0.0
        return np.array([1.0, draft, bs * verify_len, bs * draft])

    def observe(self, bs: int, verify_len: int, seconds: float) -> None:
        key = (batch_bucket(bs), verify_len)
        old = self.cells.get(key)
        self.cells[key] = seconds if old is None else (1 - self.ema) * old + self.ema * seconds
        self.recent.append((bs, verify_len, seconds))

    def predict(self, bs: int, verify_len: int) -> float:
        cell = self.cells.get((batch_bucket(bs), verify_len))
        if cell is not None:
            return cell
        if len(self.recent) < 4:
            return 1.0
        x = np.stack([self._features(b, l) for b, l, _ in self.recent])
        y = np.array([t for _, _, t in self.recent])
        coef = np.linalg.solve(x.T @ x + 1e-6 * np.eye(x.shape[1]), x.T @ y)
        return max(float(self._features(bs, verify_len) @ coef), 1e-6)


@dataclass
class VerifyLengthPolicy:
    """Chooses the verify length of the next decode step."""

    block_size: int
    fixed: Optional[int] = None
    adaptive: bool = True
    explore: float = 0.005
    explore_budget: float = 0.0005
    probe_every: int = 8
    probe_margin: float = 0.8
    optimism: float = 1.0
    seed: int = 0
    acceptance: AcceptanceEstimator = field(init=False)
    cost: StepCostModel = field(default_factory=StepCostModel)

    def __post_init__(self) -> None:
        self.acceptance = AcceptanceEstimator(self.block_size)
        self.buckets = length_buckets(self.block_size)
        self._rng = random.Random(self.seed)
        self._steps = 0

    @property
    def varies(self) -> bool:
        """Whether choices depend on measurements (else every call returns one length)."""
        return self.fixed is None and self.adaptive

    def step_costs(self, bs: int) -> dict[int, float]:
        """Predicted seconds per step for each bucket (one fit per decision)."""
        return {length: self.cost.predict(bs, length) for length in self.buckets}

    def scores(self, rids: Sequence[str], costs: Optional[dict[int, float]] = None) -> dict[int, float]:
        """Expected committed tokens per second for each bucket."""
        costs = costs or self.step_costs(len(rids))
        alphas = self.acceptance.alphas(rids, self.optimism)  # [bs, B-1]
        return {length: float(expected_tokens(alphas, length).sum()) / costs[length] for length in self.buckets}

    def choose(self, rids: Sequence[str]) -> int:
        if self.fixed is not None:
            return self.fixed
        if not self.adaptive:
            return self.block_size
        self._steps += 1
        costs = self.step_costs(len(rids))
        scores = self.scores(rids, costs)
        best = max(scores.values())
        if self._steps % self.probe_every == 0:
            probe = self._probe(len(rids), scores, best)
            if probe is not None:
                return probe
        # Among near-ties prefer the shorter verify: same throughput, less waste.
        choice = min(length for length, s in scores.items() if s >= best * (1 - 1e-9))
        # Keep the acceptance estimate of the later positions fresh at the lowest price:
        # the best-scoring length longer than the choice (only longer verifies measure
        # further positions), at a rate that spends at most ``explore_budget`` of
        # throughput (a runner-up at 60 % of the best is explored rarely, a near-tie often).
        longer = [length for length in self.buckets if length > choice]
        if not longer:
            return choice
        runner_up = max(longer, key=scores.__getitem__)
        # Throughput lost by one such step, in steps of the choice: its shortfall in
        # tokens/s times how much longer it runs.
        slower = costs[runner_up] / costs[choice]
        loss = (1.0 - scores[runner_up] / best) * slower if best > 0 else 1.0
        rate = min(self.explore, self.explore_budget / max(loss, 1e-9))
        return runner_up if self._rng.random() < rate else choice

    def _probe(self, bs: int, scores: dict[int, float], best: float) -> Optional[int]:
        """An unmeasured length at this batch size worth measuring, if any.

        Costs at most 1/probe_every of steps, and only for lengths the fit (from other
        batch sizes) puts within ``probe_margin`` of the best: a server meets every
        new batch size once, and probing a full block at batch 32 when the fit already
        prices it at 3x plain decode is pure loss.
        """
        bucket = batch_bucket(bs)
        for length in self.buckets:
            if (bucket, length) not in self.cost.cells and scores[length] >= self.probe_margin * best:
                return length
        return None

    def observe(self, rids: Sequence[str], verify_len: int, num_accepted: Sequence[int], seconds: Optional[float]) -> None:
        for rid, accepted in zip(rids, num_accepted):
            self.acceptance.observe(rid, verify_len, int(accepted))
        if seconds is not None and math.isfinite(seconds) and seconds > 0:
            self.cost.observe(len(rids), verify_len, seconds)
