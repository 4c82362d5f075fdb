"""Issue [3 of 8]: greedy DFLASH output is token-for-token non-speculative SGLang.

Real ``launch_server`` processes on the CPU lane, float32. Every configuration runs
>= 50 requests with varied lengths (requests finish at different steps), shared
prefixes (radix-cache hits), prompts longer than the forced-small chunked-prefill
size, and stop tokens landing mid-block; afterwards the KV pools must be back to full.
The default run covers one configuration per model; the slow matrix covers every pair
of (block 4/8/16, page 1/16, batch 1/16) values on both models.

Every run also proves that speculation happened (``assert_speculated``): drafts were
accepted, so multi-token commits are what matched; the adaptive policy verified
lengths > 1; a top-k tree accepted paths off its top-1 chain. The tiny target's
drafters are distilled from it (a random drafter accepts almost nothing) and verify
whole blocks; SmolLM2 runs with the shipped drafter.
"""

from __future__ import annotations

import pytest

from tests.support.configs import FULL_BLOCKS, tiny_full_blocks, tiny_plain, tiny_spec
from tests.support.drafters import rewire_target_layers
from tests.support.equivalence import (
    assert_pool_drained,
    assert_same_tokens,
    frequent_token,
    assert_speculated,
    pool_baseline,
    request_params,
    run,
    worker_stats,
)
from tests.support.prompts import text_prompts, token_prompts

N_PROMPTS = 50


def spec_options(model, drafter, *, block, page, chunk):
    return {
        "model-path": model,
        "speculative-algorithm": "DFLASH",
        "speculative-draft-model-path": drafter,
        "speculative-num-draft-tokens": block,
        "page-size": page,
        "chunked-prefill-size": chunk,
        "max-running-requests": 16,
    }


def plain_options(model, *, page, chunk):
    return {"model-path": model, "page-size": page, "chunked-prefill-size": chunk, "max-running-requests": 16}


def check(servers, model, drafter, prompts, *, block, page, batch, stop_token_ids=None, spec=None, plain=None,
          extra=None):
    chunk = max(16, page)
    spec = spec or servers.get({**spec_options(model, drafter, block=block, page=page, chunk=chunk), **(extra or {})})
    plain = plain or servers.get(plain_options(model, page=page, chunk=chunk))
    start = pool_baseline(spec)
    before = worker_stats(spec)
    params = [
        request_params(i, stop_token_ids=stop_token_ids if i % 3 == 0 else None) for i in range(len(prompts))
    ]
    got = run(spec, prompts, params, batch=batch)
    want = run(plain, prompts, params, batch=batch)
    assert_same_tokens(got, want, prompts)
    assert spec.dflash_state()["backend"] == "sglang-dflash"
    assert_speculated(spec, before, got)
    assert_pool_drained(spec, start)
    return got


@pytest.mark.parametrize("batch", [16, 1])
def test_tiny_qwen3(servers, tiny_target, trained_tiny_drafter, batch):
    """50 prompts at batch 16; batch 1 (one request at a time, so wall time is per-step
    latency) runs 12 here and the full 50 in the slow matrix."""
    spec, plain = servers.get(tiny_full_blocks(tiny_target, trained_tiny_drafter)), servers.get(tiny_plain(tiny_target))
    prompts = token_prompts(N_PROMPTS if batch > 1 else 12, vocab_size=512)
    stop = frequent_token(plain, prompts)
    check(servers, tiny_target, trained_tiny_drafter, prompts, block=8, page=1, batch=batch, stop_token_ids=stop,
          spec=spec, plain=plain)


def test_smollm2(servers, smollm2, smollm2_drafter):
    """A real LM with the shipped trained drafter under SGLang's defaults (the adaptive
    verify length on): blocks really commit several tokens and the policy chooses to
    speculate (12 prompts here; >= 50 per configuration, whole blocks, in the slow
    matrix)."""
    check(servers, smollm2, smollm2_drafter, text_prompts(12), block=8, page=16, batch=6)


# Slow matrices: every pair of (block 4/8/16, page 1/16, batch 1/16) values appears in
# some configuration (a pairwise covering: 6 runs instead of 12), >= 50 prompts each.
PAIRWISE = [(4, 1, 1), (4, 16, 16), (8, 1, 16), (8, 16, 1), (16, 1, 1), (16, 16, 16)]


@pytest.mark.slow
@pytest.mark.parametrize("block,page,batch", PAIRWISE)
def test_tiny_qwen3_matrix(servers, tiny_target, train_tiny_drafter, block, page, batch):
    """A drafter distilled for each block size, verifying whole blocks."""
    drafter = train_tiny_drafter() if block == 8 else train_tiny_drafter(block_size=block)
    prompts = token_prompts(N_PROMPTS, vocab_size=512, seed=block + page)
    stop = frequent_token(servers.get(plain_options(tiny_target, page=page, chunk=max(16, page))), prompts)
    check(servers, tiny_target, drafter, prompts, block=block, page=page, batch=batch, stop_token_ids=stop,
          extra=FULL_BLOCKS)


@pytest.mark.parametrize(
    "block,page,batch",
    # CI's slow run: the batch-16 cells (every block size once); batch 1 in ``make test-matrix``
    [pytest.param(*cell, marks=pytest.mark.slow if cell[2] == 16 else pytest.mark.matrix) for cell in PAIRWISE],
)
def test_smollm2_matrix(servers, smollm2, smollm2_drafter, block, page, batch):
    prompts = text_prompts(N_PROMPTS, seed=block + page)
    check(servers, smollm2, smollm2_drafter, prompts, block=block, page=page, batch=batch, extra=FULL_BLOCKS)


MODES = {  # the tree is in the default run; the other modes in the slow matrix
    "tree": {"speculative-dflash-tree-topk": 2, "speculative-dflash-block-size": 8, "speculative-num-draft-tokens": 16},
    "fixed-verify-len": {"speculative-dflash-verify-len": 3},
    "adaptive-off": FULL_BLOCKS,
}


@pytest.mark.parametrize("mode", ["tree", pytest.param("fixed-verify-len", marks=pytest.mark.slow), pytest.param("adaptive-off", marks=pytest.mark.slow)])
def test_modes_stay_lossless(servers, tiny_target, trained_tiny_drafter, mode):
    """Our own flags reach the worker through SGLang's CLI, and every verify mode
    (top-k tree, fixed length, adaptive off) keeps greedy output exact. The tree run
    accepts paths off the top-1 chain, so the target KV of those paths really moves."""
    extra = MODES[mode]
    spec = servers.get(tiny_spec(tiny_target, trained_tiny_drafter, **extra))  # adaptive-off: tiny_full_blocks
    state = spec.dflash_state()
    expected = {
        "tree": {"tree_topk": 2, "adaptive": True, "verify_len": None, "sampling": "pq"},
        "fixed-verify-len": {"tree_topk": 1, "adaptive": True, "verify_len": 3, "sampling": "pq"},
        "adaptive-off": {"tree_topk": 1, "adaptive": False, "verify_len": None, "sampling": "pq"},
    }[mode]
    assert state["options"] == expected
    assert state["verify_width"] == (16 if mode == "tree" else 8) and state["block_size"] == 8
    plain = servers.get(tiny_plain(tiny_target))
    prompts = token_prompts(16, vocab_size=512, seed=7)
    params = [request_params(i) for i in range(len(prompts))]
    start = pool_baseline(spec)
    before = worker_stats(spec)
    got = run(spec, prompts, params, batch=8)
    assert_same_tokens(got, run(plain, prompts, params, batch=8), prompts)
    activity = assert_speculated(spec, before, got)
    if mode == "fixed-verify-len":
        assert set(activity.steps_by_verify_len) == {3}, activity
    assert_pool_drained(spec, start)


@pytest.mark.parametrize(
    "layer_ids", [[2, 0, 2], pytest.param([1, 1], marks=pytest.mark.slow), pytest.param([2, 0, 1], marks=pytest.mark.slow)]
)
def test_repeated_and_unsorted_layer_ids(servers, tiny_target, train_tiny_drafter, models_dir, layer_ids):
    """SGLang captures each layer once, in layer order; DFlash concatenates features in
    the listed order, repeats included (the default rule gives [1, 1] for small
    targets). Ours reorders them; SGLang 0.5.23's own DFLASH crashes on [1, 1].

    The drafter is a distilled one-feature drafter rewired to read its feature through
    ``layer_ids`` (its ``fc`` split over the slots naming that layer, zero elsewhere):
    fed in the listed order it drafts exactly what its source drafts, so both servers
    accept the same drafts at every step; a wrong order or a deduplicated list would
    not."""
    layer = 2 if 2 in layer_ids else 1
    source = train_tiny_drafter() if layer == 2 else train_tiny_drafter(target_layer_ids=[layer])
    drafter = rewire_target_layers(source, models_dir / f"tiny-drafter-ids-{'-'.join(map(str, layer_ids))}", layer_ids)
    spec = servers.get(tiny_full_blocks(tiny_target, drafter))
    reference = servers.get(tiny_full_blocks(tiny_target, source))
    plain = servers.get(tiny_plain(tiny_target))
    prompts = token_prompts(8, vocab_size=512, seed=3)
    params = [request_params(i) for i in range(8)]
    before = worker_stats(spec)
    got = run(spec, prompts, params, batch=8)
    assert_same_tokens(got, run(plain, prompts, params, batch=8), prompts)
    assert_speculated(spec, before, got)
    steps = [o["meta_info"]["spec_dflash_accepted_per_step"] for o in got]
    assert steps == [o["meta_info"]["spec_dflash_accepted_per_step"] for o in run(reference, prompts, params, batch=8)]
