"""The verify-length policy: acceptance estimates, step costs, and the choice they imply."""

from __future__ import annotations

import numpy as np
import pytest

from sglang_dflash.spec.adaptive import (
    AcceptanceEstimator,
    StepCostModel,
    VerifyLengthPolicy,
    batch_bucket,
    expected_tokens,
    length_buckets,
)


def test_length_buckets_include_block():
    assert length_buckets(16) == (1, 2, 4, 8, 16)
    assert length_buckets(10) == (1, 2, 4, 8, 10)
    assert length_buckets(2) == (1, 2)


def test_expected_tokens():
    alpha = np.array([0.5, 0.5, 0.5])
    assert expected_tokens(alpha, 1) == 1.0
    assert expected_tokens(alpha, 2) == 1.5
    assert expected_tokens(alpha, 4) == pytest.approx(1 + 0.5 + 0.25 + 0.125)


def test_estimator_counts_tried_positions():
    est = AcceptanceEstimator(5, decay=1.0, initial_alpha=0.5)
    # Verify 5 nodes, 2 accepted: positions 1,2 hit, position 3 tried and missed, 4 untried.
    for _ in range(20):
        est.observe("r", 5, 2)
    r = est.requests["r"]
    assert r.trials.tolist() == [20, 20, 20, 0] and r.hits.tolist() == [20, 20, 0, 0]
    a = est.alpha("r")
    assert a[0] > 0.9 and a[1] > 0.9 and a[2] < 0.1
    # Untried position 4 falls back to the global estimate.
    assert a[3] == pytest.approx(est.global_alpha()[3])
    est.forget(["r"])
    assert "r" not in est.requests


def test_cost_model_cells_and_fallback():
    cost = StepCostModel(ema=1.0)
    assert cost.predict(4, 8) == 1.0  # nothing measured: all lengths cost the same
    for bs in (1, 2, 4, 8, 16):
        for length in (1, 4):
            cost.observe(bs, length, 0.01 + 0.002 * (length > 1) + 0.001 * bs * length)
    assert cost.predict(8, 4) == pytest.approx(0.01 + 0.002 + 0.032)
    # An unmeasured length is extrapolated from the fit.
    assert cost.predict(8, 8) == pytest.approx(0.01 + 0.002 + 0.064, rel=1e-3)
    assert batch_bucket(5) == 8 and batch_bucket(1000) == 256


def policy_after(block, *, alpha, cost_fn, bs, steps=400):
    policy = VerifyLengthPolicy(block, explore=0.0)
    rids = [f"r{i}" for i in range(bs)]
    rng = np.random.default_rng(0)
    for _ in range(steps):
        length = policy.choose(rids)
        accepted = []
        for _ in rids:
            a = 0
            while a < length - 1 and rng.random() < alpha:
                a += 1
            accepted.append(a)
        policy.observe(rids, length, accepted, cost_fn(bs, length))
    return policy, policy.choose(rids)


def cpu_like_cost(bs, length):
    """Work grows with tokens: speculation only pays when it is accepted."""
    return 0.005 + 0.004 * (length > 1) + 0.0008 * bs * length


def test_speculation_off_when_nothing_is_accepted():
    _, choice = policy_after(8, alpha=0.0, cost_fn=cpu_like_cost, bs=4)
    assert choice == 1


def test_long_blocks_at_batch_one_with_good_acceptance():
    _, choice = policy_after(16, alpha=0.9, cost_fn=cpu_like_cost, bs=1)
    assert choice >= 8


def test_shorter_blocks_as_the_batch_grows():
    small = policy_after(16, alpha=0.7, cost_fn=cpu_like_cost, bs=1)[1]
    large = policy_after(16, alpha=0.7, cost_fn=cpu_like_cost, bs=64)[1]
    assert large < small


def test_fixed_and_disabled():
    assert VerifyLengthPolicy(8, fixed=3).choose(["a"]) == 3
    assert VerifyLengthPolicy(8, adaptive=False).choose(["a"]) == 8


def test_new_batch_size_probes_only_lengths_the_fit_puts_near_the_best():
    """At an unseen batch size, a length the cost fit already prices far below the best
    is not probed (a full block at batch 32 would cost a 3x step for nothing)."""
    policy = VerifyLengthPolicy(8, explore=0.0, probe_every=1)
    for bs in (1, 2, 4, 8):
        for length in policy.buckets:
            policy.cost.observe(bs, length, cpu_like_cost(bs, length))
    for _ in range(200):
        policy.acceptance.observe("old", 8, 0)  # the drafter is rarely right
    rids = [f"r{i}" for i in range(32)]
    chosen = []
    for _ in range(16):
        length = policy.choose(rids)
        chosen.append(length)
        policy.observe(rids, length, [0] * len(rids), cpu_like_cost(len(rids), length))
    assert set(chosen) == {1}, chosen
    assert (32, 1) in policy.cost.cells and (32, 8) not in policy.cost.cells
