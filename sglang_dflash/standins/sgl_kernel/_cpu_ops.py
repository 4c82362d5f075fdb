"""The ``*_cpu`` ops SGLang's CPU engine calls on a plain attention model, in torch.

They are what the CPU build of ``sgl_kernel`` provides for the KV slot table, the
speculative bookkeeping and the KV copy; the CPU lane runs them here. The ops SGLang
binds as ``torch.ops.sgl_kernel.*`` at model import are registered by
:func:`register_torch_ops`.
"""

from __future__ import annotations

import ctypes

import torch


def _row_ranges(start: torch.Tensor, end: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) index pairs covering [start[i], end[i]) for every row i."""
    lens = (end - start).long()
    rows = torch.repeat_interleave(torch.arange(lens.numel()), lens)
    first = torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens)
    cols = start.long()[rows] + torch.arange(int(lens.sum())) - first
    return rows, cols


def assign_req_to_token_pool_cpu(req_pool_indices, req_to_token, start_offset, end_offset,
                                 out_cache_loc, pool_len) -> None:
    """req_to_token[req[i], start[i]:end[i]] = the next slots of out_cache_loc."""
    rows, cols = _row_ranges(start_offset.cpu(), end_offset.cpu())
    if rows.numel():
        req = req_pool_indices.cpu().long()[rows]
        req_to_token[req, cols] = out_cache_loc[: rows.numel()].to(req_to_token.dtype)


def assign_extend_cache_locs_cpu(req_pool_indices, req_to_token, start_offset, end_offset,
                                 out_cache_loc, pool_len) -> None:
    """out_cache_loc = concat_i req_to_token[req[i], start[i]:end[i]]."""
    rows, cols = _row_ranges(start_offset.cpu(), end_offset.cpu())
    if rows.numel():
        req = req_pool_indices.cpu().long()[rows]
        out_cache_loc[: rows.numel()] = req_to_token[req, cols].to(out_cache_loc.dtype)


def assign_draft_cache_locs_contiguous_cpu(req_pool_indices, req_to_token, seq_lens,
                                           out_cache_loc, pool_len, topk, num_cols) -> None:
    """out_cache_loc[i] = req_to_token[req[i], seq_len[i] : seq_len[i] + topk*num_cols]."""
    width = topk * num_cols
    cols = seq_lens.long().unsqueeze(1) + torch.arange(width)
    out_cache_loc.view(-1, width)[:] = req_to_token[req_pool_indices.long().unsqueeze(1), cols]


def fill_bonus_tokens_cpu(accept_tokens, accept_lens, bonus_tokens, accept_stride) -> None:
    """bonus[i] = the last accepted token of row i."""
    rows = torch.arange(accept_lens.numel())
    flat = accept_tokens.reshape(-1)
    bonus_tokens.copy_(flat[rows * accept_stride + accept_lens.long() - 1])


def copy_all_layer_kv_cache_cpu(data_ptrs, strides, tgt_loc, src_loc) -> None:
    """Copy token rows src -> tgt inside every KV buffer (one row = strides[i] bytes)."""
    pairs = list(zip(tgt_loc.tolist(), src_loc.tolist()))
    for base, row_bytes in zip(data_ptrs.tolist(), strides.tolist()):
        for tgt, src in pairs:
            ctypes.memmove(base + tgt * row_bytes, base + src * row_bytes, row_bytes)


REAL_OPS = (
    "assign_req_to_token_pool_cpu", "assign_extend_cache_locs_cpu", "assign_draft_cache_locs_contiguous_cpu",
    "fill_bonus_tokens_cpu", "copy_all_layer_kv_cache_cpu",
)


# --------------------------------------------------------------- torch.ops.sgl_kernel
# SGLang's CPU engine binds some ops as ``torch.ops.sgl_kernel.<name>`` when a model
# module is imported (the registry imports every model), so a missing one costs that
# module ("Ignore import error ... no attribute ..."). The hybrid linear-attention ones
# (Qwen3-Next, Qwen3.5) are computed in :mod:`._cpu_linear_attention`; the rest are
# registered here and raise NotImplementedError naming themselves when called, like
# every other unimplemented name of the stand-in.
TORCH_OPS = {
    # grok
    "fused_moe_router_cpu": (
        "(float moe_softcapping, Tensor hidden_states, Tensor gating_output, int topk, bool renormalize,"
        " Tensor? correction_bias=None) -> (Tensor, Tensor)", None),
    "rmsnorm_cpu": ("(Tensor input, Tensor weight, float eps) -> Tensor", None),
    "fused_dual_residual_rmsnorm_cpu": (
        "(Tensor x, Tensor residual, Tensor w1, Tensor w2, float eps) -> (Tensor, Tensor)", None),
}
_library = None


def _not_implemented(name: str):
    def op(*args, **kwargs):
        raise NotImplementedError(f"sgl_kernel stand-in: torch.ops.sgl_kernel.{name} is not implemented")

    return op


def register_torch_ops() -> None:
    """Define :data:`TORCH_OPS` in the ``sgl_kernel`` op namespace (once per process;
    names something else already defined are left alone)."""
    global _library
    if _library is not None:
        return
    _library = torch.library.Library("sgl_kernel", "FRAGMENT")
    for name, (schema, impl) in TORCH_OPS.items():
        if hasattr(torch.ops.sgl_kernel, name):
            continue
        _library.define(name + schema)
        _library.impl(name, impl or _not_implemented(name), "CompositeExplicitAutograd")
