"""The two speculative inputs SGLang's scheduler carries for DFLASH.

* :class:`DFlashDraftState` rides on the running batch between steps: each request's
  bonus token (node 0 of its next block) and committed length. SGLang filters/merges it
  with the batch, relays it through its FutureMap under overlap scheduling, and calls
  :meth:`DFlashDraftState.prepare_for_decode` to reserve the next block's KV slots.
* :class:`BlockVerifyInput` describes one verify forward of the target: a
  :class:`~sglang_dflash.spec.verify_tree.VerifyTree` as SGLang's TARGET_VERIFY batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

import torch

from . import api as sg


def _decode_reservation(req, *, reserve: int, page_size: int, row_width: int) -> int:
    """Slots request ``req`` must own after this prepare (its next allocated length)."""
    committed = int(req.kv.kv_committed_len)
    wanted = -(-(committed + reserve) // page_size) * page_size
    capped = min(wanted, row_width // page_size * page_size)
    return max(int(req.kv.kv_allocated_len), capped)


@dataclass
class DFlashDraftState(sg.SpecInput):
    """bonus_tokens, new_seq_lens: [bs] int64."""

    bonus_tokens: torch.Tensor
    new_seq_lens: torch.Tensor
    # Nodes per verify (the block, or a tree's node budget): the slots to reserve.
    verify_width: int = 0
    # Set by SGLang's scheduler when it relays this state through the FutureMap.
    future_indices: Optional[torch.Tensor] = None
    # Host upper bound of every request's reserved slots (covers prefix + block).
    allocated_lens_cpu: Optional[torch.Tensor] = None
    # SGLang's relay payload reads these from any draft input; DFlash carries none.
    topk_p: Optional[torch.Tensor] = None
    topk_index: Optional[torch.Tensor] = None
    hidden_states: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        super().__init__(spec_input_type=sg.SpecInputType.DFLASH_DRAFT)
        self.num_tokens_per_req = 1
        self.num_tokens_for_logprob_per_req = 1

    @classmethod
    def empty(cls, device: Any, verify_width: int) -> "DFlashDraftState":
        return cls(
            bonus_tokens=torch.empty(0, dtype=torch.int64, device=device),
            new_seq_lens=torch.empty(0, dtype=torch.int64, device=device),
            verify_width=verify_width,
        )

    def prepare_for_decode(self, batch) -> None:
        """Reserve KV slots for the next verify block of every request.

        The verify nodes occupy ``[committed, committed + W)``. Under overlap scheduling the
        host's committed length lags the device's by one step (up to ``B`` tokens), so
        the reservation doubles; rows are capped at the slot-table width, which
        SGLang sizes to hold one verify width past the context length.
        """
        bs = batch.batch_size()
        if bs == 0:
            return
        batch.maybe_evict_swa()
        reserve = self.verify_width * (2 if batch.enable_overlap else 1)
        allocator = batch.token_to_kv_pool_allocator
        page_size = allocator.page_size
        row_width = batch.req_to_token_pool.req_to_token.shape[1]
        cur = [int(r.kv.kv_allocated_len) for r in batch.reqs]
        nxt = [_decode_reservation(r, reserve=reserve, page_size=page_size, row_width=row_width) for r in batch.reqs]
        committed = [int(r.kv.kv_committed_len) for r in batch.reqs]
        cur_cpu = torch.tensor(cur, dtype=torch.int32)
        nxt_cpu = torch.tensor(nxt, dtype=torch.int32)
        sg.alloc_for_spec_decode(
            batch.tree_cache,
            batch.req_to_token_pool,
            reqs=batch.reqs,
            req_pool_indices=batch.req_pool_indices,
            cur_kv_lens=cur_cpu.to(batch.device, non_blocking=True),
            cur_kv_lens_cpu=cur_cpu,
            nxt_kv_lens=nxt_cpu.to(batch.device, non_blocking=True),
            nxt_kv_lens_cpu=nxt_cpu,
            num_needed_tokens=sum(nxt) - sum(cur),
            batch=batch,
        )
        for req in batch.reqs:
            req.decode_batch_idx += 1
        batch.seq_lens_cpu = torch.tensor(committed, dtype=torch.int64)
        batch.seq_lens_sum = sum(committed)
        self.allocated_lens_cpu = nxt_cpu

    def filter_batch(self, new_indices: torch.Tensor, new_indices_cpu: Optional[List[int]] = None) -> None:
        if self.allocated_lens_cpu is not None:
            keep = new_indices_cpu if new_indices_cpu is not None else new_indices.cpu()
            self.allocated_lens_cpu = self.allocated_lens_cpu[keep]
        if self.future_indices is not None:
            self.future_indices = self.future_indices[new_indices]
            return
        self.bonus_tokens = self.bonus_tokens[new_indices]
        self.new_seq_lens = self.new_seq_lens[new_indices]

    def merge_batch(self, other: "DFlashDraftState") -> None:
        if self.allocated_lens_cpu is not None and other.allocated_lens_cpu is not None:
            self.allocated_lens_cpu = torch.cat([self.allocated_lens_cpu, other.allocated_lens_cpu])
        else:
            self.allocated_lens_cpu = None
        if self.future_indices is not None:
            self.future_indices = torch.cat([self.future_indices, other.future_indices])
            return
        self.bonus_tokens = torch.cat([self.bonus_tokens, other.bonus_tokens])
        self.new_seq_lens = torch.cat([self.new_seq_lens, other.new_seq_lens])


@dataclass
class BlockVerifyInput(sg.SpecInput):
    """One TARGET_VERIFY forward: ``draft_token_num`` nodes per request.

    draft_token: [bs*N] node tokens; positions: [bs*N]; custom_mask: SGLang's flat
    tree mask, or None for a chain on a backend that verifies causally.
    """

    draft_token: torch.Tensor
    positions: torch.Tensor
    draft_token_num: int
    custom_mask: Optional[torch.Tensor] = None
    topk: int = 1
    capture_hidden_mode: Any = None

    def __post_init__(self) -> None:
        super().__init__(spec_input_type=sg.SpecInputType.DFLASH_VERIFY)
        if self.capture_hidden_mode is None:
            self.capture_hidden_mode = sg.CaptureHiddenMode.FULL
        self.num_tokens_per_req = int(self.draft_token_num)
        self.num_tokens_for_logprob_per_req = int(self.draft_token_num)

    @property
    def eager_only(self) -> bool:
        """A tree (custom mask) verifies eagerly: SGLang 0.5.23's FlashInfer verify graphs
        are captured without a mask for DFLASH and refuse one at replay."""
        return self.custom_mask is not None

    def generate_attn_arg_prefill(
        self,
        *,
        req_pool_indices: torch.Tensor,
        paged_kernel_lens: torch.Tensor,
        paged_kernel_lens_sum: int,
        translator,
        plan,
        kv_start_idx: Optional[torch.Tensor] = None,
        kv_indices_buf: Optional[torch.Tensor] = None,
        kind=None,
    ):
        """CSR attention args for GPU backends (FlashInfer/Triton): every request reads
        its prefix plus its N verify slots."""
        device = req_pool_indices.device
        bs = req_pool_indices.numel()
        n = self.draft_token_num
        qo_indptr = torch.arange(0, (bs + 1) * n, step=n, dtype=torch.int32, device=device)
        kv_lens = paged_kernel_lens + n
        kv_indptr = torch.zeros(bs + 1, dtype=torch.int32, device=device)
        kv_indptr[1:] = torch.cumsum(kv_lens, dim=0)
        kv_indices = kv_indices_buf
        if kv_indices is None:
            kv_indices = torch.empty(paged_kernel_lens_sum + n * bs, dtype=torch.int32, device=device)
        kwargs = {} if kind is None else {"kind": kind}
        translator.pack_read_stream(
            plan,
            req_pool_indices=req_pool_indices,
            seq_lens=kv_lens,
            indptr=kv_indptr,
            out=kv_indices,
            kv_start_idx=kv_start_idx,
            **kwargs,
        )
        return kv_indices, kv_indptr, qo_indptr, self.custom_mask
