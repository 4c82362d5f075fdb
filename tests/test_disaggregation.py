"""Prefill/decode disaggregation on the CPU lane: a prefill and a decode server on
127.0.0.1, paired over SGLang's Mooncake transfer backend (TCP), against one server.

The drafter's KV rows of the prompt travel with the target's KV pages (our worker
registers them as SGLang's ``primary_draft_kv_pool``), so the decode server starts
speculating with the same drafter context a single server has after its prefill:
output, verify steps and accepted drafts per request are identical. Without the rows (the decode side's
drafter would attend over zeros for the prompt) the output stays correct but
acceptance drops, which this test would catch.

Why Mooncake: SGLang 0.5.23's ``fake`` backend is decode-only (its prefill side
refuses it) and moves no data, so the decode side's prompt KV is garbage and its
first token synthetic; nothing could equal a single server. NIXL's PyPI wheels are
CUDA builds, and mori/ascend need AMD/Ascend devices. Mooncake's non-CUDA wheel runs
its transfer engine over TCP; ``make install`` installs it and unpacks the RDMA
user-space libraries it links from Debian's packages next to the venv.
"""

from __future__ import annotations

import importlib.util

import pytest

from tests.support.equivalence import assert_pool_drained, assert_same_tokens, pool_baseline, request_params
from tests.support.prompts import text_prompts

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("mooncake") is None, reason="mooncake-transfer-engine-non-cuda is not installed"
    ),
]

N_PROMPTS = 12


def options(model, drafter) -> dict:
    """The canonical SmolLM2 speculative server of the equivalence tests (page 16, small
    chunked prefill, whole blocks so every step's acceptance is comparable)."""
    return {
        "model-path": model,
        "speculative-algorithm": "DFLASH",
        "speculative-draft-model-path": drafter,
        "speculative-num-draft-tokens": 8,
        "page-size": 16,
        "chunked-prefill-size": 16,
        "max-running-requests": 16,
        "no-speculative-dflash-adaptive": True,
    }


@pytest.fixture(scope="module")
def pd_pair(smollm2, smollm2_drafter):
    from sglang_dflash.testing.local_server import PDPair

    # The CPU engine sizes the KV pool from the memory free before and after loading;
    # a higher fraction keeps the second server's start robust to the first one's (and
    # other processes') allocations meanwhile (--max-total-tokens still caps the pool).
    pair = PDPair({**options(smollm2, smollm2_drafter), "mem-fraction-static": 0.6}).start()
    yield pair
    pair.stop()


def test_pd_pair_equals_one_server(pd_pair, servers, smollm2, smollm2_drafter):
    single = servers.get(options(smollm2, smollm2_drafter))
    prompts = text_prompts(N_PROMPTS, seed=5)
    params = [request_params(i, max_new_tokens=32) for i in range(N_PROMPTS)]
    start = {"prefill": pool_baseline(pd_pair.prefill), "decode": pool_baseline(pd_pair.decode)}
    got = [pd_pair.generate_one(p, q) for p, q in zip(prompts, params)]
    want = [single.generate_one(p, q) for p, q in zip(prompts, params)]
    assert_same_tokens(got, want, prompts)
    decode_state = pd_pair.decode.dflash_state()
    assert decode_state["backend"] == "sglang-dflash"
    # SGLang's own per-request counters: the same verify steps and accepted drafts as
    # one server (a decode side whose drafter lacked the prompt's rows would accept less).
    counters = ("spec_verify_ct", "spec_num_correct_drafts")
    pd_counts = [[o["meta_info"].get(k) for k in counters] for o in got]
    single_counts = [[o["meta_info"].get(k) for k in counters] for o in want]
    assert pd_counts == single_counts, (pd_counts, single_counts, sorted(got[0]["meta_info"]))
    # (SGLang leaves both counters out for a request that ends at its first token.)
    assert sum(c[1] or 0 for c in pd_counts) > 0, "no drafts accepted: speculation did not run"
    # Our own per-token record: the block position of every output token, as one server's
    # (the decode side's first token came from the prefill server, so it reads 0; a
    # request that ends at its first token has no verify step and no record on either).
    records = ("spec_dflash_positions", "spec_dflash_accepted_per_step", "spec_dflash_accepted_by_position")
    pd_records = [[o["meta_info"].get(k) for k in records] for o in got]
    assert pd_records == [[o["meta_info"].get(k) for k in records] for o in want]
    assert any(r[1] and max(r[1]) > 0 for r in pd_records), "no accepted draft in the decode side's record"
    for side in ("prefill", "decode"):
        assert_pool_drained(getattr(pd_pair, side), start[side])
