"""Run the same requests against a speculative and a plain server and compare tokens."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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


def frequent_token(plain, prompts) -> list[int]:
    """A token the plain model emits often, used as a stop token that hits mid-block."""
    outs = run(plain, prompts[:8], [request_params(i) for i in range(8)], batch=8)
    counts: dict[int, int] = {}
    for o in outs:
        for t in o["output_ids"][3:]:
            counts[t] = counts.get(t, 0) + 1
    return [max(counts, key=counts.get)]


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


# ---------------------------------------------------------------- did speculation happen?
# SGLang's ``spec_verify_ct`` counts every decode step, plain decode included, so it
# proves nothing; these read what our worker itself reports.


def accepted_drafts(outs: Sequence[dict]) -> int:
    """Drafts accepted over these requests (our per-request ``meta_info``; a request
    that ended with its prefill token ran no decode step and carries none)."""
    for o in outs:
        meta = o["meta_info"]
        assert "spec_dflash_accepted_per_step" in meta or meta["completion_tokens"] <= 1, meta
    return sum(sum(o["meta_info"].get("spec_dflash_accepted_per_step", [])) for o in outs)


def worker_stats(server) -> dict:
    return server.dflash_state()["stats"]


@dataclass
class Activity:
    """What our worker did between two reads of its stats (tests run one at a time,
    so on a shared server this is the test's own traffic)."""

    accepted_drafts: int
    off_chain_paths: int
    steps_by_verify_len: dict[int, int]

    @property
    def speculative_steps(self) -> int:
        """Steps that verified more than one node (1 = speculation off)."""
        return sum(n for length, n in self.steps_by_verify_len.items() if length > 1)


def activity_since(server, before: dict) -> Activity:
    after = worker_stats(server)

    def steps(stats: dict) -> dict[int, int]:
        return {int(n): c["graph"] + c["eager"] for n, c in stats["target_graph_by_verify_len"].items()}

    now, then = steps(after), steps(before)
    return Activity(
        accepted_drafts=after["accepted_drafts"] - before["accepted_drafts"],
        off_chain_paths=after["off_chain_paths"] - before["off_chain_paths"],
        steps_by_verify_len={n: c - then.get(n, 0) for n, c in now.items() if c > then.get(n, 0)},
    )


def assert_speculated(server, before: dict, outs: Sequence[dict]) -> Activity:
    """Multi-token commits happened; under the adaptive policy, verify lengths > 1
    were chosen; under tree verification, some accepted path left the top-1 chain."""
    activity = activity_since(server, before)
    assert accepted_drafts(outs) > 0, f"no draft accepted: plain decoding was compared ({activity})"
    options = server.dflash_state()["options"]
    if options["tree_topk"] > 1:
        assert activity.off_chain_paths > 0, f"no accepted tree path left the top-1 chain ({activity})"
    elif options["adaptive"] and options["verify_len"] is None:
        assert activity.speculative_steps > 0, f"the adaptive policy never verified a draft ({activity})"
    return activity


def pools_baseline(server) -> dict:
    server.flush_cache()
    state = server.dflash_state()
    return {"pools": state["pools"], "free_req_slots": state["kv_pool"]["free_req_slots"]}


def assert_pools_drained(server, start: dict) -> None:
    """After a flush every pool (full KV, sliding-window KV, recurrent-state slots) is
    wholly available again, nothing stays cached, and every request slot is free."""
    server.flush_cache()
    state = server.dflash_state()
    assert state["pools"].keys() == start["pools"].keys(), (state["pools"], start)
    for name, pool in state["pools"].items():
        assert pool["available"] == pool["capacity"] == start["pools"][name]["available"], (name, pool, start)
        assert pool["cached"] == 0, (name, pool)
    assert state["kv_pool"]["free_req_slots"] == start["free_req_slots"], (state["kv_pool"], start)
