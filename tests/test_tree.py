"""Top-k verify trees from one block forward, and the greedy walk over them."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_dflash.spec.accept import greedy_chain_acceptance, greedy_tree_acceptance
from sglang_dflash.spec.verify_tree import build_chain, build_topk_tree


def make_tree(seed, bs, block, k, nodes, vocab=50):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(bs, block - 1, vocab, generator=g) * 2
    top = logits.log_softmax(-1).topk(k, dim=-1)
    chain = torch.cat([torch.randint(0, vocab, (bs, 1), generator=g), top.indices[:, :, 0]], dim=1)
    return chain, top, build_topk_tree(chain, top.indices, top.values, nodes)


def reference_walk(tokens, parents, target_top1, max_depth):
    """Plain-python greedy walk from the root, first matching child in node order."""
    path = [0]
    for _ in range(max_depth):
        cur = path[-1]
        nxt = [i for i in range(len(tokens)) if parents[i] == cur and tokens[i] == target_top1[cur]]
        if not nxt:
            break
        path.append(nxt[0])
    return path


@settings(max_examples=60, deadline=None, database=None)
@given(
    seed=st.integers(0, 10_000),
    bs=st.integers(1, 4),
    block=st.integers(2, 8),
    k=st.integers(2, 4),
    extra=st.integers(0, 12),
)
def test_tree_structure(seed, bs, block, k, extra):
    chain, top, tree = make_tree(seed, bs, block, k, block + extra)
    n = block + extra
    assert tree.tokens.shape == (bs, n)
    # The chain is nodes 0..B-1 unchanged.
    assert torch.equal(tree.tokens[:, :block], chain)
    assert torch.equal(tree.parents[:, :block], torch.arange(block).expand(bs, block) - 1)
    for b in range(bs):
        for i in range(1, n):
            p = int(tree.parents[b, i])
            # Parents precede children, depth grows by one, tokens come from the
            # parent's next position's top-k.
            assert 0 <= p < i
            assert int(tree.depths[b, i]) == int(tree.depths[b, p]) + 1
            d = int(tree.depths[b, i])
            assert int(tree.tokens[b, i]) in top.indices[b, d - 1].tolist()
        # Siblings carry distinct tokens (padding copies aside, which follow their twin).
        for i in range(n):
            kids = [int(tree.tokens[b, j]) for j in range(n) if int(tree.parents[b, j]) == i]
            assert len(kids) == len(set(kids)) or i == 0


@settings(max_examples=60, deadline=None, database=None)
@given(seed=st.integers(0, 10_000), bs=st.integers(1, 4), block=st.integers(2, 8), k=st.integers(1, 4), extra=st.integers(0, 10))
def test_walk_matches_reference(seed, bs, block, k, extra):
    chain, top, tree = make_tree(seed, bs, block, k, block + extra, vocab=6)
    g = torch.Generator().manual_seed(seed + 1)
    target = torch.randint(0, 6, tree.tokens.shape, generator=g)
    acc = greedy_tree_acceptance(tree.tokens, tree.parents, target, block - 1)
    for b in range(bs):
        path = reference_walk(tree.tokens[b].tolist(), tree.parents[b].tolist(), target[b].tolist(), block - 1)
        assert int(acc.num_accepted[b]) == len(path) - 1
        assert acc.path[b, : len(path)].tolist() == path
        emitted = [int(target[b, i]) for i in path]
        assert acc.out_tokens[b, : len(path)].tolist() == emitted and int(acc.bonus[b]) == emitted[-1]


def test_chain_walk_equals_chain_acceptance():
    chain, _, _ = make_tree(3, 4, 6, 1, 6)
    tree = build_chain(chain)
    target = chain.roll(-1, dims=1)
    target[1, 2] = -1  # request 1 breaks after 2 accepted drafts
    a = greedy_chain_acceptance(tree.tokens, target)
    b = greedy_tree_acceptance(tree.tokens, tree.parents, target, 5)
    assert torch.equal(a.num_accepted, b.num_accepted) and torch.equal(a.bonus, b.bonus)


def test_tree_beats_chain_when_second_choices_are_right():
    """A drafter whose top-1 is wrong half the time but whose top-2 holds the right
    token: the tree (chain + alternatives) accepts more than the chain alone."""
    torch.manual_seed(0)
    bs, block, vocab = 64, 8, 30
    truth = torch.randint(0, vocab, (bs, block))  # the target's greedy continuation
    logits = torch.randn(bs, block - 1, vocab)
    wrong = torch.rand(bs, block - 1) < 0.5
    decoy = (truth[:, 1:] + 1) % vocab
    rows, cols = torch.meshgrid(torch.arange(bs), torch.arange(block - 1), indexing="ij")
    logits[rows, cols, truth[:, 1:]] = torch.where(wrong, 5.0, 6.0)
    logits[rows, cols, decoy] = torch.where(wrong, 6.0, 5.0)
    top = logits.log_softmax(-1).topk(2, dim=-1)
    chain = torch.cat([truth[:, :1], top.indices[:, :, 0]], dim=1)

    def target_for(tokens, depths):
        # The target's argmax after a node = truth at the next depth, if the node is on the true path.
        return truth.gather(1, (depths + 1).clamp(max=block - 1))

    chain_tree = build_chain(chain)
    chain_acc = greedy_chain_acceptance(chain, target_for(chain, chain_tree.depths)).num_accepted.float().mean()
    tree = build_topk_tree(chain, top.indices, top.values, 4 * block)
    tree_acc = greedy_tree_acceptance(tree.tokens, tree.parents, target_for(tree.tokens, tree.depths), block - 1)
    print(f"accepted drafts per step: chain {chain_acc:.2f}, tree {tree_acc.num_accepted.float().mean():.2f}")
    assert tree_acc.num_accepted.float().mean() > chain_acc + 0.5


def test_off_chain_paths_counts_paths_that_leave_the_top1_chain():
    """The worker's telemetry counts a request when its accepted tree path leaves the
    top-1 chain (its KV is then moved): not when it follows the chain, stops at the
    root, or is a plain chain step."""
    from sglang_dflash.spec.accept import off_chain_paths
    from sglang_dflash.telemetry.metrics import DFlashMetrics

    block = 4
    chain, top, tree = make_tree(11, 3, block, 2, 3 * block)
    b = 0
    sibling = next(i for i in range(block, tree.tokens.shape[1]) if int(tree.parents[b, i]) == 0)
    target = torch.full_like(tree.tokens, -1)  # no match anywhere unless set
    target[0, 0] = tree.tokens[0, sibling]  # request 0: root -> the depth-1 alternative
    target[1, 0], target[1, 1] = tree.tokens[1, 1], tree.tokens[1, 2]  # request 1: two chain nodes
    acceptance = greedy_tree_acceptance(tree.tokens, tree.parents, target, block - 1)
    assert acceptance.num_accepted.tolist() == [1, 2, 0]  # request 2 stops at the root
    assert int(off_chain_paths(acceptance)) == 1
    assert off_chain_paths(greedy_chain_acceptance(chain, target[:, :block])) is None

    metrics = DFlashMetrics(block_size=3 * block, device="cpu")
    metrics.observe_step(3 * block, acceptance.num_accepted.tolist(), int(off_chain_paths(acceptance)))
    stats = metrics.totals.as_dict()
    assert stats["off_chain_paths"] == 1 and stats["accepted_drafts"] == 3
