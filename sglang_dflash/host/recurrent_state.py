"""Hybrid linear-attention targets (Qwen3-Next, Qwen3.5/3.6, ...): the recurrent state
after a verify.

A recurrent layer's state summarises every token it has read, so it cannot be rolled
back the way KV slots are simply left unused. SGLang 0.5.23 therefore verifies with
state updates off: a TARGET_VERIFY forward reads each request's state, computes the
state after every verify node into per-step scratch buffers, and leaves the pool's
state alone (the convolution window is shifted past the whole block). After
acceptance the state after the last committed node must be copied back, through the
commit hook SGLang's own speculative workers use
(``HybridLinearAttnBackend.update_mamba_state_after_mtp_verify``): with ``c`` nodes
committed, step ``c - 1``. The same call also fills the radix cache's tracking slots
(``--mamba-radix-cache-strategy extra_buffer``) when the committed span crosses a
tracking boundary.

Prefill and SGLang's own DECODE step update the state in place, so they need no commit;
a one-node verify (plain decode on a target with CUDA graphs) does.
"""

from __future__ import annotations

from typing import Optional

import torch


def has_recurrent_state(runner) -> bool:
    """True for targets with Mamba-style layers whose verify needs a commit."""
    if not hasattr(getattr(runner, "attn_backend", None), "update_mamba_state_after_mtp_verify"):
        return False
    from sglang.srt.configs.hybrid_arch import mambaish_config

    return mambaish_config(runner.model_config) is not None


def steps_to_track(prefix_lens: torch.Tensor, commit_lens: torch.Tensor, interval: int) -> torch.Tensor:
    """Per request, the verify step whose state covers the last multiple of ``interval``
    tokens the committed span crossed, else -1. Node ``j``'s state covers
    ``prefix + j + 1`` tokens."""
    prefix = prefix_lens.long()
    new = prefix + commit_lens.long()
    point = new // interval * interval
    step = point - prefix - 1
    crossed = (prefix // interval != new // interval) & (step >= 0) & (step < commit_lens.long())
    return torch.where(crossed, step, torch.full_like(step, -1))


def commit_verified_state(runner, batch, prefix_lens: torch.Tensor, commit_lens: torch.Tensor) -> None:
    """Copy each request's state after its last committed verify node into its slot
    (and its tracking slot, when the radix cache tracks states)."""
    bs = commit_lens.shape[0]
    track: Optional[torch.Tensor] = getattr(batch, "mamba_track_indices", None)
    track_steps = None
    if track is not None:
        from sglang.srt.runtime_context import mamba_track_grid

        track_steps = steps_to_track(prefix_lens, commit_lens, mamba_track_grid(batch.tree_cache.page_size))
    runner.attn_backend.update_mamba_state_after_mtp_verify(
        last_correct_step_indices=commit_lens.long() - 1,
        mamba_track_indices=track,
        mamba_steps_to_track=track_steps,
        model=runner.model,
        req_pool_indices=batch.req_pool_indices[:bs],
    )


def scatter_committed_states(caches, slots, steps, track_slots=None, track_steps=None, src_rows=None) -> None:
    """Torch twin of SGLang's ``scatter_mamba_states_after_mtp_verify`` (a CUDA/XPU-only
    Triton kernel): for every request ``i`` with ``steps[i] >= 0``, the state after
    verify step ``steps[i]`` (scratch row ``src_rows[i]``, default ``i``) becomes the
    state of slot ``slots[i]``, for the SSM state and every convolution window."""
    _scatter(caches, slots, steps, src_rows)
    if track_slots is not None:
        _scatter(caches, track_slots, track_steps, src_rows)


def _scatter(caches, slots: torch.Tensor, steps: torch.Tensor, src_rows: Optional[torch.Tensor]) -> None:
    steps = steps.long()
    slots = slots.long()[: steps.shape[0]]
    rows = torch.arange(steps.shape[0], device=steps.device) if src_rows is None else src_rows.long()
    pairs = [(caches.temporal, caches.intermediate_ssm)]
    pairs += list(zip(caches.conv, caches.intermediate_conv_window))
    for state, scratch in pairs:
        if state is None or scratch is None or state.numel() == 0:
            continue
        valid = (steps >= 0) & (steps < scratch.shape[2]) & (slots >= 0) & (slots < state.shape[1])
        if bool(valid.any()):
            state[:, slots[valid]] = scratch[:, rows[valid], steps[valid]].to(state.dtype)
