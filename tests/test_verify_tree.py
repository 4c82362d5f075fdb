"""``VerifyTree``: chain and tree ancestor masks, positions, and SGLang's flattened mask,
checked against a plain-Python parent walk (``support.reference_spec``)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_dflash.spec.verify_tree import VerifyTree, build_chain
from tests.support.reference_spec import ancestor_sets, custom_mask_reference, depths_from_parents

FUZZ = settings(max_examples=100, deadline=None, database=None)


def tree_from_parents(parents_per_request: list[list[int]], vocab: int = 100) -> VerifyTree:
    parents = torch.tensor(parents_per_request)
    depths = torch.tensor([depths_from_parents(p) for p in parents_per_request])
    tokens = torch.arange(parents.numel()).view(parents.shape) % vocab
    return VerifyTree(tokens=tokens, depths=depths, parents=parents, is_chain=False)


def mask_from_sets(sets: list[set[int]]) -> torch.Tensor:
    n = len(sets)
    return torch.tensor([[j in sets[i] for j in range(n)] for i in range(n)])


@st.composite
def parent_arrays(draw, n=None):
    """parents[0] = -1, parents[i] in [0, i): every such array is a valid tree."""
    n = draw(st.integers(1, 10)) if n is None else n
    return [-1] + [draw(st.integers(0, i - 1)) for i in range(1, n)]


# --------------------------------------------------------------------------- chain


def test_chain_structure_and_lower_triangular_mask():
    for bs, n in [(1, 1), (1, 2), (3, 5), (2, 16)]:
        block = torch.randint(0, 50, (bs, n))
        chain = build_chain(block)
        assert chain.is_chain and chain.batch_size == bs and chain.num_nodes == n
        assert torch.equal(chain.tokens, block)
        assert chain.depths.tolist() == [list(range(n))] * bs
        assert chain.parents.tolist() == [list(range(-1, n - 1))] * bs
        mask = chain.ancestor_mask()
        assert mask.shape == (bs, n, n) and mask.dtype == torch.bool
        expected = torch.ones(n, n, dtype=torch.bool).tril()
        assert all(torch.equal(mask[i], expected) for i in range(bs))
        prefix = torch.randint(0, 100, (bs,))
        assert torch.equal(chain.positions(prefix), prefix[:, None] + torch.arange(n)[None, :])


def test_chain_general_path_equals_tril():
    """The same chain through the tree code path (is_chain=False) gives the same mask."""
    chain = build_chain(torch.zeros(2, 7, dtype=torch.long))
    general = VerifyTree(chain.tokens, chain.depths, chain.parents, is_chain=False)
    assert torch.equal(general.ancestor_mask(), chain.ancestor_mask())


def test_chain_custom_mask_layout():
    bs, n = 3, 4
    chain = build_chain(torch.zeros(bs, n, dtype=torch.long))
    prefix = torch.tensor([0, 2, 5])
    flat = chain.sglang_custom_mask(prefix)
    assert flat.dtype == torch.bool
    assert flat.numel() == sum(n * (p + n) for p in prefix.tolist())
    offset = 0
    for p in prefix.tolist():
        block = flat[offset : offset + n * (p + n)].view(n, p + n)
        assert block[:, :p].all()  # the whole committed prefix
        assert torch.equal(block[:, p:], torch.ones(n, n, dtype=torch.bool).tril())
        offset += n * (p + n)
    assert flat.tolist() == custom_mask_reference([list(range(-1, n - 1))] * bs, prefix.tolist())


# --------------------------------------------------------------------------- trees


def test_hand_built_tree():
    #        0
    #      /   \
    #     1     2
    #    / \     \
    #   3   4     5
    #   |
    #   6
    parents = [-1, 0, 0, 1, 1, 2, 3]
    tree = tree_from_parents([parents])
    assert tree.depths.tolist() == [[0, 1, 1, 2, 2, 2, 3]]
    expected = [{0}, {0, 1}, {0, 2}, {0, 1, 3}, {0, 1, 4}, {0, 2, 5}, {0, 1, 3, 6}]
    assert ancestor_sets(parents) == expected
    assert torch.equal(tree.ancestor_mask()[0], mask_from_sets(expected))
    prefix = torch.tensor([3])
    assert tree.positions(prefix).tolist() == [[3, 4, 4, 5, 5, 5, 6]]
    assert tree.sglang_custom_mask(prefix).tolist() == custom_mask_reference([parents], [3])


@FUZZ
@given(st.integers(1, 10).flatmap(lambda n: st.lists(parent_arrays(n), min_size=1, max_size=4)), st.data())
def test_random_trees_match_parent_walk(parents_per_request, data):
    tree = tree_from_parents(parents_per_request)
    mask = tree.ancestor_mask()
    n = len(parents_per_request[0])
    assert mask.shape == (len(parents_per_request), n, n)
    for i, parents in enumerate(parents_per_request):
        assert torch.equal(mask[i], mask_from_sets(ancestor_sets(parents))), parents
    prefix = data.draw(st.lists(st.integers(0, 6), min_size=len(parents_per_request), max_size=len(parents_per_request)))
    flat = tree.sglang_custom_mask(torch.tensor(prefix))
    assert flat.tolist() == custom_mask_reference(parents_per_request, prefix)
    assert torch.equal(tree.positions(torch.tensor(prefix)), torch.tensor(prefix)[:, None] + tree.depths)
