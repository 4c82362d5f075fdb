"""The functions SGLang calls into this package: one body per integration point.

The plugin's hooks (:mod:`.hooks`) and the source patch in ``patches/`` call the same
functions, so both ways of enabling the package behave identically.
"""

from __future__ import annotations

from typing import Optional

from .version import OURS, UPSTREAM, selected_backend


def dflash_worker_class() -> Optional[type]:
    """Our worker class for DFLASH, or None when the upstream backend is selected."""
    if selected_backend() != OURS:
        return None
    from .worker import DFlashWorker

    return DFlashWorker


def handle_dflash_server_args(server_args) -> bool:
    """Validate/resolve DFLASH server args our way; False leaves them to upstream."""
    if selected_backend() != OURS:
        return False
    from .server_args import handle_dflash

    handle_dflash(server_args)
    return True


def resolve_dflash_aux_hidden_state(**kwargs) -> bool:
    """Configure the target's feature capture from our config; False leaves it to upstream."""
    if selected_backend() != OURS:
        return False
    from .server_args import resolve_aux_hidden_state

    resolve_aux_hidden_state(**kwargs)
    return True


def configure_dflash_capture(model, target_layer_ids) -> bool:
    """Install the target's DFlash feature capture our way (sorted unique ids, our own
    capture where SGLang has none); False leaves it to upstream."""
    if selected_backend() != OURS:
        return False
    from .capture import install_capture

    install_capture(model, target_layer_ids)
    return True


def dflash_request_refusal(req) -> Optional[str]:
    """Why our worker refuses this request (the scheduler answers HTTP 400), or None."""
    from .requests import unsupported_reason

    return unsupported_reason(req)


def torch_native_verify(backend, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **extra):
    """TARGET_VERIFY attention on the torch_native backend (which 0.5.23 lacks);
    ``extra``: the layer's further attention arguments (gpt-oss ``sinks``)."""
    from .torch_native_verify import torch_native_verify as verify

    return verify(backend, q, k, v, layer, forward_batch, save_kv_cache, **extra)


def verify_needs_eager(forward_batch) -> bool:
    """A verify our worker marked eager-only (a tree's custom mask, which 0.5.23's
    FlashInfer verify graphs cannot take) must not replay the target's CUDA graph."""
    return bool(getattr(forward_batch.spec_info, "eager_only", False))


def dflash_disagg_draft_input(batch, last_tokens, future_map):
    """Decode side of PD disaggregation: our draft state for a transferred batch, or
    None when the upstream backend is selected (SGLang then builds its own)."""
    if selected_backend() != OURS:
        return None
    from .api import get_spec
    from .disagg import disagg_draft_state

    return disagg_draft_state(batch, last_tokens, future_map, get_spec().speculative_num_draft_tokens)


def add_dflash_state(controller, state) -> None:
    """``get_server_info()["internal_states"][i]["dflash"]``: which DFLASH backend runs,
    what it loaded, and the KV pool counts tests use to prove nothing leaks."""
    scheduler = controller.scheduler
    if not scheduler.spec_algorithm.is_dflash():
        return
    worker = scheduler.draft_worker
    if hasattr(worker, "describe"):
        info = worker.describe()
    else:
        from .upstream import upstream_stats

        info = {"backend": UPSTREAM, "stats": upstream_stats()}
    pool = {
        "max_total_num_tokens": int(scheduler.max_total_num_tokens),
        "available": int(scheduler.token_to_kv_pool_allocator.available_size()),
        "evictable": int(scheduler.tree_cache.evictable_size()),
        "protected": int(scheduler.tree_cache.protected_size()),
        "free_req_slots": len(scheduler.req_to_token_pool.free_slots),
        "req_slots": int(scheduler.req_to_token_pool.size),
    }
    info["kv_pool"] = pool
    if hasattr(worker, "gather_over_batch_ranks"):
        # Every rank of a TP group runs this request (SGLang broadcasts control
        # requests), so each rank's own pool is reported, not just the first's.
        info["kv_pool_per_rank"] = worker.gather_over_batch_ranks(pool)
    info["pools"] = pool_counts(scheduler)
    state["dflash"] = info


def pool_counts(scheduler) -> dict:
    """Every pool the target holds per token or per request, as capacity / available /
    cached-in-the-radix-tree (evictable + protected): after a flush an idle server has
    ``available == capacity`` in each. Hybrid SWA targets count their full and sliding
    pools apart; hybrid linear-attention targets add their recurrent-state slots."""
    stats = scheduler.pool_stats_observer.get_pool_stats()
    tree = scheduler.tree_cache
    full_protected = tree.full_protected_size() if (stats.is_hybrid_swa or stats.is_hybrid_ssm) else tree.protected_size()
    pools = {
        "full": {
            "capacity": int(stats.full_capacity),
            "available": int(stats.full_available_size),
            "cached": int(stats.full_evictable_size) + int(full_protected),
        }
    }
    if stats.is_hybrid_swa:
        pools["swa"] = {
            "capacity": int(stats.swa_capacity),
            "available": int(stats.swa_available_size),
            "cached": int(stats.swa_evictable_size) + int(tree.swa_protected_size()),
        }
    if stats.is_hybrid_ssm:
        pools["mamba"] = {
            "capacity": int(scheduler.req_to_token_pool.mamba_pool.size),
            "available": int(stats.mamba_available_size),
            "cached": int(stats.mamba_evictable_size) + int(tree.mamba_protected_size()),
        }
    return pools
