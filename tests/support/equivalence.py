"""Run the same requests against a speculative and a plain server and compare tokens."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Sequence


def request_params(i: int, max_new_tokens: int = 40, **extra) -> dict:
    """Vary the length per request so requests finish at different steps."""
    return {"temperature": 0.0, "max_new_tokens": max_new_tokens - (i % 7) * 3, **extra}


def run(server, prompts: Sequence, params: Sequence[dict], *, batch: int) -> list[dict]:
    """``batch`` requests in flight at a time (1 = strictly sequential)."""
    if batch == 1:
        return [server.generate_one(p, q) for p, q in zip(prompts, params)]
    with ThreadPoolExecutor(max_workers=batch) as pool:
        return list(pool.map(lambda pq: server.generate_one(*pq), zip(prompts, params)))


def assert_same_tokens(spec: list[dict], plain: list[dict], prompts: Sequence) -> None:
    for i, (a, b) in enumerate(zip(spec, plain)):
        if a["output_ids"] != b["output_ids"]:
            first = next((j for j, (x, y) in enumerate(zip(a["output_ids"], b["output_ids"])) if x != y), None)
            raise AssertionError(
                f"request {i} differs at output token {first}: prompt={prompts[i]!r}\n"
                f" spec ={a['output_ids']}\n plain={b['output_ids']}"
            )
        assert a["meta_info"]["finish_reason"] == b["meta_info"]["finish_reason"], i


def pool_baseline(server) -> dict:
    server.flush_cache()
    return server.dflash_state()["kv_pool"]


def assert_pool_drained(server, start: dict) -> None:
    """After a flush, every KV slot and request slot is free again."""
    server.flush_cache()
    pool = server.dflash_state()["kv_pool"]
    assert pool["available"] == start["available"] == pool["max_total_num_tokens"], pool
    assert pool["free_req_slots"] == start["free_req_slots"], (pool, start)
    assert pool["evictable"] == 0 and pool["protected"] == 0, pool
