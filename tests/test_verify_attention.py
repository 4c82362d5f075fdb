"""``verify_attention`` over a paged cache equals a per-request loop of plain attention
with an explicit [N, P+N] mask: causal (chain), non-causal (all-to-all block) and tree
(SGLang's flattened mask from ``VerifyTree``)."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.functional import scaled_dot_product_attention

from sglang_dflash.verify_attention import verify_attention, verify_mask
from sglang_dflash.verify_tree import VerifyTree, build_chain
from tests.support.reference_spec import ancestor_sets, depths_from_parents

FUZZ = settings(max_examples=60, deadline=None, database=None)


def explicit_mask(mode: str, p: int, n: int, parents: list[int] | None) -> torch.Tensor:
    """[N, P+N] may-attend mask for one request, written out entry by entry."""
    if mode == "tree":
        anc = ancestor_sets(parents)
    rows = []
    for i in range(n):
        row = [True] * p
        for j in range(n):
            if mode == "causal":
                row.append(j <= i)
            elif mode == "noncausal":
                row.append(True)
            else:
                row.append(j in anc[i])
        rows.append(row)
    return torch.tensor(rows)


def reference(q, k_cache, v_cache, kv_slots, prefix_lens, scale, mode, parents_per_request):
    bs, n, heads, hd = q.shape
    out = torch.empty_like(q)
    for i in range(bs):
        p = int(prefix_lens[i])
        slots = kv_slots[i, : p + n].long()
        group = heads // k_cache.shape[1]
        keys = k_cache[slots].repeat_interleave(group, dim=1).transpose(0, 1)  # [heads, P+N, hd]
        values = v_cache[slots].repeat_interleave(group, dim=1).transpose(0, 1)
        mask = explicit_mask(mode, p, n, parents_per_request[i] if parents_per_request else None)
        o = scaled_dot_product_attention(q[i].transpose(0, 1), keys, values, attn_mask=mask, scale=scale)
        out[i] = o.transpose(0, 1)
    return out


@st.composite
def cases(draw):
    kv_heads = draw(st.sampled_from([1, 2, 3]))
    return dict(
        bs=draw(st.integers(1, 4)),
        n=draw(st.integers(1, 6)),
        kv_heads=kv_heads,
        heads=kv_heads * draw(st.sampled_from([1, 2, 4])),
        head_dim=draw(st.sampled_from([4, 8, 16])),
        max_prefix=draw(st.integers(0, 12)),
        mode=draw(st.sampled_from(["causal", "noncausal", "tree", "chain-tree"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@FUZZ
@given(cases())
def test_verify_attention_matches_per_request_sdpa(case):
    gen = torch.Generator().manual_seed(case["seed"])
    rng = random.Random(case["seed"])
    bs, n, heads, kvh, hd = case["bs"], case["n"], case["heads"], case["kv_heads"], case["head_dim"]
    prefix_lens = torch.tensor([rng.randint(0, case["max_prefix"]) for _ in range(bs)])
    # Paged cache: each request's keys sit in scattered slots; rows are padded past
    # P+N with other (live) slots that must be masked out.
    width = int(prefix_lens.max()) + n + rng.randint(0, 3)
    num_slots = bs * width + 5
    kv_slots = torch.randperm(num_slots, generator=gen)[: bs * width].view(bs, width).int()
    k_cache = torch.randn(num_slots, kvh, hd, generator=gen)
    v_cache = torch.randn(num_slots, kvh, hd, generator=gen)
    q = torch.randn(bs, n, heads, hd, generator=gen)
    scale = hd**-0.5

    mode = case["mode"]
    parents = None
    tree_mask = None
    if mode == "tree":
        parents = [[-1] + [rng.randrange(i) for i in range(1, n)] for _ in range(bs)]
        tree = VerifyTree(
            tokens=torch.zeros(bs, n, dtype=torch.long),
            depths=torch.tensor([depths_from_parents(p) for p in parents]),
            parents=torch.tensor(parents),
            is_chain=False,
        )
        tree_mask = tree.sglang_custom_mask(prefix_lens)
    elif mode == "chain-tree":  # a chain through the tree-mask path equals causal
        tree_mask = build_chain(torch.zeros(bs, n, dtype=torch.long)).sglang_custom_mask(prefix_lens)
    ref_mode = {"chain-tree": "causal"}.get(mode, mode)

    got = verify_attention(
        q, k_cache, v_cache, kv_slots=kv_slots, prefix_lens=prefix_lens,
        causal=(mode != "noncausal"), scale=scale, tree_mask=tree_mask,
    )
    want = reference(q, k_cache, v_cache, kv_slots, prefix_lens, scale, ref_mode, parents)
    assert got.shape == q.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["causal", "noncausal", "tree"])
def test_verify_mask_layout(mode):
    prefix_lens = torch.tensor([0, 3, 1])
    n = 4
    width = int(prefix_lens.max()) + n + 2
    parents = [[-1, 0, 0, 1], [-1, 0, 1, 1], [-1, 0, 1, 2]]
    tree_mask = None
    if mode == "tree":
        tree = VerifyTree(
            tokens=torch.zeros(3, n, dtype=torch.long),
            depths=torch.tensor([depths_from_parents(p) for p in parents]),
            parents=torch.tensor(parents),
            is_chain=False,
        )
        tree_mask = tree.sglang_custom_mask(prefix_lens)
    mask = verify_mask(prefix_lens, n, width, causal=(mode != "noncausal"), tree_mask=tree_mask)
    assert mask.dtype == torch.bool
    # The non-causal mask is the same for every query row and comes back with a
    # broadcastable row dimension of 1; SDPA broadcasts it.
    mask = mask.expand(3, 1, n, width)
    for i, p in enumerate(prefix_lens.tolist()):
        want = torch.zeros(n, width, dtype=torch.bool)
        want[:, : p + n] = explicit_mask(mode, p, n, parents[i])
        assert torch.equal(mask[i, 0], want), (mode, i)
