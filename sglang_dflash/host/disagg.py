"""Prefill/decode disaggregation: the decode side starts with a complete drafter context.

With ``--disaggregation-mode prefill|decode`` the prompt is prefilled on one server
and decoded on another. The prefill server's worker injects the prompt's target
features into its drafter KV cache as usual; the question is how the decode server's
drafter gets that context. Two ways were open:

* **the drafter KV travels** with the target KV (chosen): SGLang's transfer backends
  already move the target's KV pages and append a spec worker's draft pool to them
  (``primary_draft_kv_pool``: "draft KV shares target virtual ids"). Our drafter rows
  are keyed by the target's own slot ids, laid out slot-row major like SGLang's MHA
  pools, so the same page indices address them, and nothing is recomputed. Per token
  it moves ``2 * layers * kv_heads * head_dim`` values (384 for the shipped SmolLM2
  drafter), against ``K * hidden`` (2880) for the captured features.
* the decode side rebuilds the drafter KV from the prefill's features: it would need
  a per-token feature buffer registered with the transfer (SGLang's metadata buffers
  are one fixed-width row per request, not per token), would move ~7x more data and
  redo ``fc``/``k_proj``/``v_proj`` work the prefill server already did.

:class:`DraftKVTransferView` is what the scheduler registers; :func:`disagg_draft_state`
builds our :class:`~.spec_inputs.DFlashDraftState` for a batch that arrived by
transfer (its bonus token is the prefill's first token), where SGLang would build its
own DFLASH's input type.

Both servers must run the same drafter checkpoint and TP size: the drafter rows are
replicated per rank, and SGLang slices transferred pages by the target's KV heads only
when the two sides' TP differ.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..model.draft_kv import DraftKVCache


class DraftKVTransferView:
    """The drafter KV cache as a transferable pool: one registered buffer per layer's
    K, then per layer's V (the order SGLang's MHA pools use), one page of slot rows
    per transferred item."""

    def __init__(self, kv: Optional[DraftKVCache], *, page_size: int) -> None:
        if kv is None:
            raise RuntimeError("the drafter KV cache is allocated in alloc_memory_pool, before disaggregation starts")
        self.kv = kv
        self.page_size = int(page_size)

    def buffers(self) -> list[torch.Tensor]:
        return [self.kv.k[layer] for layer in range(self.kv.num_layers)] + [
            self.kv.v[layer] for layer in range(self.kv.num_layers)
        ]

    def get_contiguous_buf_infos(self) -> tuple[list[int], list[int], list[int]]:
        """(data pointers, buffer lengths in bytes, bytes per page) for registration."""
        buffers = self.buffers()
        ptrs = [b.data_ptr() for b in buffers]
        lens = [b.nbytes for b in buffers]
        items = [b[0].nbytes * self.page_size for b in buffers]
        return ptrs, lens, items


def disagg_draft_state(batch, last_tokens: torch.Tensor, future_map, verify_width: int):
    """Decode side: the draft state of a batch whose prompts were prefilled elsewhere.

    The prefill's first token is the bonus of the first block; the committed length is
    the prompt's. Under overlap scheduling the state rides SGLang's FutureMap, which
    expects the lengths published and the bonus stashed under the requests' slots.
    """
    from .api import RelayPayload
    from .spec_inputs import DFlashDraftState

    state = DFlashDraftState(
        bonus_tokens=last_tokens.long(), new_seq_lens=batch.seq_lens.long(), verify_width=int(verify_width)
    )
    if batch.enable_overlap:
        state.future_indices = batch.req_pool_indices
        future_map.publish(state.future_indices, batch.seq_lens)
        future_map.stash(state.future_indices, RelayPayload(bonus_tokens=last_tokens))
    return state


# ------------------------------------------------------------------ CPU lane
def register_cpu_transfer_lift(registry, hook_type) -> None:
    """SGLang's CPU engine with Mooncake over TCP (``MOONCAKE_PROTOCOL=tcp``): 0.5.23's
    prefill side copies each chunk's page indices into pinned memory and records a
    ``torch.cuda.Event`` whenever the sender advertises host page indices; on the CPU
    engine the sender takes the plain synchronous path instead. Any DFLASH backend
    (and none) benefits; nothing changes on a GPU."""
    import os

    if os.environ.get("SGLANG_USE_CPU_ENGINE") != "1":
        return
    registry.register(
        "sglang.srt.disaggregation.mooncake.conn.MooncakeKVSender.__init__", _host_indices_off, hook_type.AFTER
    )


def _host_indices_off(result, sender, *args, **kwargs) -> None:
    sender.supports_host_tensor_indices = False
