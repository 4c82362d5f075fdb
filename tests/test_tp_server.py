"""Tensor parallelism end to end on the CPU lane: ``--tp-size 2`` servers on 127.0.0.1.

SGLang's CPU engine runs TP=2 over gloo when each rank is bound to its own cores
(``SGLANG_CPU_OMP_THREADS_BIND="0|1"``; without it, it asserts one rank per NUMA node).
SmolLM2's 9 query / 3 KV heads need no change: the CPU engine pads heads to a
multiple of the TP size. A TP=2 server costs ~5 GiB, so this file starts one at a
time: the TP=2 no-speculation server, then the TP=2 speculative one, and reuses the
TP=1 SmolLM2 configuration of the equivalence tests from the session's pool.
"""

from __future__ import annotations

import pytest

from sglang_dflash.testing.local_server import Server
from tests.support.equivalence import assert_same_tokens, request_params, run
from tests.support.prompts import text_prompts
from tests.test_greedy_equivalence import FULL_BLOCKS, plain_options, spec_options

pytestmark = pytest.mark.slow

TP2_ENV = {"SGLANG_CPU_OMP_THREADS_BIND": "0|1"}
N_PROMPTS = 32


def tp2(options: dict) -> Server:
    # The CPU engine sizes each rank's KV pool from the memory free before and after
    # loading; a higher fraction keeps other processes' allocations meanwhile from
    # failing the start (--max-total-tokens still caps the pool).
    return Server(options={**options, "tp-size": 2, "mem-fraction-static": 0.6}, env=TP2_ENV)


def drained_on_every_rank(server: Server, start: list) -> None:
    """After a flush, each rank's KV slots and request slots are all free again."""
    server.flush_cache()
    pools = server.dflash_state()["kv_pool_per_rank"]
    assert len(pools) == 2, pools
    for rank, (pool, before) in enumerate(zip(pools, start)):
        assert pool["available"] == pool["max_total_num_tokens"] == before["available"], (rank, pool)
        assert pool["free_req_slots"] == before["free_req_slots"], (rank, pool, before)
        assert pool["evictable"] == 0 and pool["protected"] == 0, (rank, pool)


def test_tp2_greedy_equals_no_spec_and_tp1(servers, smollm2, smollm2_drafter):
    prompts = text_prompts(N_PROMPTS, seed=20)
    params = [request_params(i) for i in range(N_PROMPTS)]
    plain = tp2(plain_options(smollm2, page=16, chunk=16)).start()
    try:
        want = run(plain, prompts, params, batch=8)
    finally:
        plain.stop()
    spec = tp2({**spec_options(smollm2, smollm2_drafter, block=8, page=16, chunk=16), **FULL_BLOCKS}).start()
    try:
        spec.flush_cache()
        start = spec.dflash_state()["kv_pool_per_rank"]
        got = run(spec, prompts, params, batch=8)
        # Unseeded sampled requests: ranks draw alike with no communication, or the
        # server hangs (each rank would accept differently).
        sampled = run(spec, prompts[:8], [{"temperature": 0.9, "max_new_tokens": 24}] * 8, batch=8)
        state = spec.dflash_state()
        drained_on_every_rank(spec, start)
    finally:
        spec.stop()
    assert state["parallel"]["tp_size"] == 2 and state["parallel"]["lm_head_shards"] == 2
    assert_same_tokens(got, want, prompts)
    assert sum(o["meta_info"].get("spec_num_correct_drafts", 0) for o in got) > 0, "no drafts accepted"
    assert all(o["meta_info"]["completion_tokens"] == 24 or o["meta_info"]["finish_reason"] for o in sampled)
    tp1 = servers.get({**spec_options(smollm2, smollm2_drafter, block=8, page=16, chunk=16), **FULL_BLOCKS})
    assert_same_tokens(got, run(tp1, prompts, params, batch=8), prompts)
