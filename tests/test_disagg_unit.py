"""PD disaggregation, unit level: what SGLang's transfer code sees of our drafter KV, and
the draft state the decode side builds (the end-to-end pair is tests/test_disaggregation.py).

SGLang's transfer backends register a draft pool's buffers next to the target's and
move each request's pages as byte ranges ``[page * item_len, (page + 1) * item_len)``
of every buffer. The view our worker registers must describe the drafter KV the way
SGLang's own MHA pool describes itself, so that those byte ranges are exactly the
drafter rows of the target slots in that page.
"""

from __future__ import annotations

import ctypes
from types import SimpleNamespace

import pytest
import torch

from sglang_dflash.host.disagg import DraftKVTransferView
from sglang_dflash.model.draft_kv import DraftKVCache


def mha_pool(page: int):
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    return MHATokenToKVPool(
        size=64, page_size=page, dtype=torch.float32, head_num=3, head_dim=64, layer_num=2, device="cpu",
        enable_memory_saver=False, enable_alt_stream=False,
    )


def drafter_kv_for(pool) -> DraftKVCache:
    """As the worker allocates it: one row per target KV slot (same geometry here)."""
    slots = pool.get_key_buffer(0).shape[0]
    return DraftKVCache(num_layers=2, num_slots=slots, num_kv_heads=3, head_dim=64, dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("page", [1, 16])
def test_view_describes_the_drafter_kv_like_sglangs_mha_pool(page):
    pool = mha_pool(page)
    kv = drafter_kv_for(pool)
    ptrs, lens, items = DraftKVTransferView(kv, page_size=page).get_contiguous_buf_infos()
    ref_ptrs, ref_lens, ref_items = pool.get_contiguous_buf_infos()
    assert (lens, items) == (ref_lens, ref_items)
    assert len(ptrs) == len(ref_ptrs)
    assert ptrs == [kv.k[0].data_ptr(), kv.k[1].data_ptr(), kv.v[0].data_ptr(), kv.v[1].data_ptr()]


@pytest.mark.parametrize("page", [1, 16])
def test_page_byte_ranges_carry_exactly_those_slots_rows(page):
    """A transfer of pages [1, 3] (prefill side) into pages [2, 0] (decode side), done
    the way the backends do it (raw bytes per registered buffer and page), puts the
    prefill's drafter rows of those slots at the decode side's slots and nothing else."""
    pool = mha_pool(page)
    src, dst = drafter_kv_for(pool), drafter_kv_for(pool)
    src.k.copy_(torch.randn_like(src.k))
    src.v.copy_(torch.randn_like(src.v))
    ptrs_src, _, items = DraftKVTransferView(src, page_size=page).get_contiguous_buf_infos()
    ptrs_dst, _, _ = DraftKVTransferView(dst, page_size=page).get_contiguous_buf_infos()
    pages = [(1, 2), (3, 0)]
    for p_src, p_dst, item in zip(ptrs_src, ptrs_dst, items):
        for a, b in pages:
            ctypes.memmove(p_dst + b * item, p_src + a * item, item)
    for a, b in pages:
        rows_src, rows_dst = slice(a * page, (a + 1) * page), slice(b * page, (b + 1) * page)
        assert torch.equal(dst.k[:, rows_dst], src.k[:, rows_src]) and torch.equal(dst.v[:, rows_dst], src.v[:, rows_src])
    untouched = torch.ones(dst.num_slots, dtype=torch.bool)
    for _, b in pages:
        untouched[b * page : (b + 1) * page] = False
    assert not dst.k[:, untouched].any() and not dst.v[:, untouched].any()


class RecordingFutureMap:
    def __init__(self) -> None:
        self.published, self.stashed = [], []

    def publish(self, indices, seq_lens) -> None:
        self.published.append((indices.tolist(), seq_lens.tolist()))

    def stash(self, indices, payload) -> None:
        self.stashed.append((indices.tolist(), payload.bonus_tokens.tolist()))


@pytest.mark.parametrize("overlap", [False, True])
def test_transferred_batch_gets_our_draft_state(monkeypatch, overlap):
    """Through SGLang's own dispatcher (``SpeculativeAlgorithm.build_disagg_draft_input``,
    hooked by the plugin): our state, whose bonus is the prefill's first token; under
    overlap scheduling it rides the FutureMap like every other step's state."""
    from sglang.srt.plugins import load_plugins
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    from sglang_dflash.host import api
    from sglang_dflash.host.spec_inputs import DFlashDraftState

    load_plugins()
    monkeypatch.setattr(api, "get_spec", lambda: SimpleNamespace(speculative_num_draft_tokens=8), raising=False)
    batch = SimpleNamespace(
        seq_lens=torch.tensor([17, 40]), req_pool_indices=torch.tensor([3, 5]), enable_overlap=overlap
    )
    future_map = RecordingFutureMap()
    state = SpeculativeAlgorithm.DFLASH.build_disagg_draft_input(batch, torch.tensor([11, 12]), future_map)
    assert isinstance(state, DFlashDraftState)
    assert state.bonus_tokens.tolist() == [11, 12] and state.new_seq_lens.tolist() == [17, 40]
    assert state.verify_width == 8
    if overlap:
        assert state.future_indices.tolist() == [3, 5]
        assert future_map.published == [([3, 5], [17, 40])] and future_map.stashed == [([3, 5], [11, 12])]
    else:
        assert state.future_indices is None and not future_map.published and not future_map.stashed

