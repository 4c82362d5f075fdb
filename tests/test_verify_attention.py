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

from sglang_dflash.host.torch_native_verify import verify_attention, verify_mask
from sglang_dflash.spec.verify_tree import VerifyTree, build_chain
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


# ------------------------------------------------------------------ windows, sinks, SWA pools
def loop_reference(q, k_cache, v_cache, kv_slots, prefix_lens, scale, *, mode, parents, window_left, sinks):
    """One query at a time, in float64: the keys it may see are listed explicitly from
    positions (a prefix key's position is its index; a block node's is prefix + depth),
    and the sink logit, if any, is one more term of the softmax denominator."""
    bs, n, heads, hd = q.shape
    group = heads // k_cache.shape[1]
    out = torch.empty(bs, n, heads, hd, dtype=torch.float64)
    for i in range(bs):
        p = int(prefix_lens[i])
        depth = depths_from_parents(parents[i]) if mode == "tree" else list(range(n))
        anc = ancestor_sets(parents[i]) if mode == "tree" else None
        for j in range(n):
            q_pos = p + depth[j]
            visible = [c for c in range(p) if window_left is None or c >= q_pos - window_left]
            for m in range(n):
                in_block = {"causal": m <= j, "noncausal": True, "tree": anc is not None and m in anc[j]}[mode]
                if in_block and (window_left is None or p + depth[m] >= q_pos - window_left):
                    visible.append(p + m)
            slots = kv_slots[i, visible].long()
            for h in range(heads):
                keys = k_cache[slots, h // group].double()
                values = v_cache[slots, h // group].double()
                logits = keys @ q[i, j, h].double() * scale
                top = logits.max() if sinks is None else torch.maximum(logits.max(), sinks[h].double())
                weights = torch.exp(logits - top)
                denom = weights.sum() + (0.0 if sinks is None else torch.exp(sinks[h].double() - top))
                out[i, j, h] = (weights / denom) @ values
    return out


@st.composite
def window_cases(draw):
    kv_heads = draw(st.sampled_from([1, 2]))
    n = draw(st.integers(1, 6))
    return dict(
        bs=draw(st.integers(1, 3)),
        n=n,
        kv_heads=kv_heads,
        heads=kv_heads * draw(st.sampled_from([1, 2])),
        max_prefix=draw(st.integers(0, 14)),
        mode=draw(st.sampled_from(["causal", "noncausal", "tree"])),
        # window_left 0 (a window of one token), inside the block, across the block
        # boundary, longer than everything; None: full attention
        window_left=draw(st.one_of(st.none(), st.integers(0, 12))),
        sinks=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@FUZZ
@given(window_cases())
def test_windows_and_sinks_match_a_per_query_loop(case):
    gen = torch.Generator().manual_seed(case["seed"])
    rng = random.Random(case["seed"])
    bs, n, heads, kvh, hd = case["bs"], case["n"], case["heads"], case["kv_heads"], 8
    prefix_lens = torch.tensor([rng.randint(0, case["max_prefix"]) for _ in range(bs)])
    width = int(prefix_lens.max()) + n + 2
    num_slots = bs * width + 3
    kv_slots = torch.randperm(num_slots, generator=gen)[: bs * width].view(bs, width)
    k_cache = torch.randn(num_slots, kvh, hd, generator=gen)
    v_cache = torch.randn(num_slots, kvh, hd, generator=gen)
    q = torch.randn(bs, n, heads, hd, generator=gen)
    sinks = 2 * torch.randn(heads, generator=gen) if case["sinks"] else None
    mode = case["mode"]
    parents = [[-1] + [rng.randrange(i) for i in range(1, n)] for _ in range(bs)] if mode == "tree" else [None] * bs
    tree_mask = positions = None
    if mode == "tree":
        depths = torch.tensor([depths_from_parents(p) for p in parents])
        tree = VerifyTree(tokens=torch.zeros(bs, n, dtype=torch.long), depths=depths, parents=torch.tensor(parents), is_chain=False)
        tree_mask = tree.sglang_custom_mask(prefix_lens)
        positions = tree.positions(prefix_lens).reshape(-1)
    got = verify_attention(
        q, k_cache, v_cache, kv_slots=kv_slots, prefix_lens=prefix_lens, causal=mode != "noncausal", scale=0.3,
        tree_mask=tree_mask, window_left=case["window_left"], positions=positions, sinks=sinks,
    )
    want = loop_reference(
        q, k_cache, v_cache, kv_slots, prefix_lens, 0.3, mode=mode, parents=parents,
        window_left=case["window_left"], sinks=sinks,
    )
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_window_crossing_the_block_edge_hides_old_keys():
    """Window 3 (window_left 2), prefix 5, block 3: node 0 at position 5 sees keys 3..5,
    node 2 at position 7 sees only block keys 5..7; a changed key 2 changes nothing."""
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(9, 1, 4, generator=gen)
    v = torch.randn(9, 1, 4, generator=gen)
    q = torch.randn(1, 3, 1, 4, generator=gen)
    slots = torch.arange(1, 9)[None]
    kwargs = dict(kv_slots=slots, prefix_lens=torch.tensor([5]), causal=True, scale=0.5, window_left=2)
    before = verify_attention(q, k, v, **kwargs)
    k[slots[0, 2]] += 100.0  # position 2: outside every node's window
    torch.testing.assert_close(verify_attention(q, k, v, **kwargs), before)
    k[slots[0, 3]] += 100.0  # position 3: inside node 0's window only
    after = verify_attention(q, k, v, **kwargs)
    assert not torch.allclose(after[0, 0], before[0, 0])
    torch.testing.assert_close(after[0, 1:], before[0, 1:])


def test_swa_translation_reads_the_sliding_pool_through_a_permutation():
    """A hybrid SWA pool: the sliding layer's cache is indexed by SWA slots, mapped from
    full-pool ids through a non-identity permutation; out-of-window keys have no SWA
    peer (slot 0) and must stay masked; an in-window key without one is an error."""
    gen = torch.Generator().manual_seed(1)
    full_slots = torch.tensor([[3, 9, 4, 7, 1, 8, 2, 5, 6]])  # positions 0..8 (prefix 6, block 3)
    mapping = torch.zeros(10, dtype=torch.long)
    perm = torch.randperm(9, generator=gen) + 1  # SWA slots 1..9, shuffled
    mapping[1:] = perm
    swa_k = torch.randn(10, 2, 8, generator=gen)
    swa_v = torch.randn(10, 2, 8, generator=gen)
    q = torch.randn(1, 3, 4, 8, generator=gen)
    kwargs = dict(prefix_lens=torch.tensor([6]), causal=True, scale=0.35, window_left=3)
    got = verify_attention(q, swa_k, swa_v, kv_slots=full_slots, translate=lambda s: mapping[s], **kwargs)
    want = verify_attention(q, swa_k, swa_v, kv_slots=mapping[full_slots], **kwargs)
    torch.testing.assert_close(got, want)
    evicted = mapping.clone()
    evicted[full_slots[0, :3]] = 0  # positions 0..2: outside every node's window (first seen: 6 - 3 = 3)
    torch.testing.assert_close(verify_attention(q, swa_k, swa_v, kv_slots=full_slots, translate=lambda s: evicted[s], **kwargs), got)
    evicted[full_slots[0, 3]] = 0  # position 3: node 0 still sees it
    with pytest.raises(RuntimeError, match="SWA slot was freed"):
        verify_attention(q, swa_k, swa_v, kv_slots=full_slots, translate=lambda s: evicted[s], **kwargs)


class _Layer:
    layer_id = 3
    logit_cap = 0.0
    is_cross_attention = False


def test_refuses_what_it_does_not_compute():
    from sglang_dflash.host.torch_native_verify import UnsupportedAttentionError, check_layer_supported

    sinks = torch.zeros(4)
    assert check_layer_supported(_Layer(), {"sinks": sinks}) is sinks
    assert check_layer_supported(_Layer(), {"other": None}) is None  # absent arguments are fine
    capped = _Layer()
    capped.logit_cap = 50.0
    with pytest.raises(UnsupportedAttentionError, match="logit soft-capping"):
        check_layer_supported(capped, {})
    with pytest.raises(UnsupportedAttentionError, match="k_rope"):
        check_layer_supported(_Layer(), {"k_rope": torch.zeros(1)})


def test_tree_keys_sit_at_their_depth_not_their_column():
    """Tree [-1, 0, 0, 2], window 1 (window_left 0): node 3 (depth 2, column P+3) sees
    itself only; its parent, node 2, sits at depth 1 (column P+2) and is out of its window."""
    gen = torch.Generator().manual_seed(2)
    parents = [[-1, 0, 0, 2]]
    tree = VerifyTree(tokens=torch.zeros(1, 4, dtype=torch.long), depths=torch.tensor([depths_from_parents(parents[0])]),
                      parents=torch.tensor(parents), is_chain=False)
    prefix = torch.tensor([3])
    k, v = torch.randn(8, 1, 4, generator=gen), torch.randn(8, 1, 4, generator=gen)
    q = torch.randn(1, 4, 1, 4, generator=gen)
    got = verify_attention(q, k, v, kv_slots=torch.arange(1, 8)[None], prefix_lens=prefix, causal=True, scale=0.5,
                           tree_mask=tree.sglang_custom_mask(prefix), window_left=0, positions=tree.positions(prefix).reshape(-1))
    torch.testing.assert_close(got[0, 3, 0], v[1 + 3 + 3, 0])  # node 3's own value only
