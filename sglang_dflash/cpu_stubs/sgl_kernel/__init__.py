"""Pure-torch stand-in for the CPU build of ``sgl_kernel`` (CPU lane only).

Only the ops SGLang's CPU engine calls on a plain attention model are real; every
other name raises ``NotImplementedError`` naming itself, so a missing op fails
loudly instead of computing something wrong.
"""

from __future__ import annotations

import ctypes

import torch

__version__ = "0.0.0+sglang-dflash-cpu-stub"


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


def _missing(name: str):
    def op(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name} has no CPU stand-in in sglang-dflash's CPU lane; "
            "this SGLang feature needs the real sgl_kernel on a GPU."
        )

    op.__name__ = name
    return op


for _name in (
    "fill_accept_out_cache_loc_cpu",
    "rotate_input_ids_cpu",
    "build_tree_kernel_efficient_cpu",
    "verify_tree_greedy_cpu",
    "build_draft_decode_metadata_cpu",
):
    globals()[_name] = _missing(_name)
