"""Grammar-constrained decoding (JSON schema, regex, EBNF, structural tags) per verify node.

Each request's grammar matcher (SGLang's ``req.grammar``: xgrammar, llguidance, or the
reasoning wrapper around either) is walked over its verify tree with SGLang's generic
spec helpers (``traverse_tree``, shared by EAGLE and NGRAM): node ``i``'s logits are
masked with the matcher's state after the tokens on its path, a draft the grammar
forbids gets no mask below it (acceptance never reaches it: its parent's masked
distribution does not allow it), and every accept is rolled back, so the matcher ends
where it started. SGLang's scheduler advances it over the committed tokens afterwards
(through ``grammar_barrier`` under overlap scheduling, which must run before the walk
reads the matcher). Drafting ignores the grammar; committing obeys it.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..spec.verify_tree import VerifyTree


def has_grammar(reqs) -> bool:
    return any(req.grammar is not None for req in reqs)


def tree_links(parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[bs, N] parents (host) -> (first child, next sibling) per node, -1 for none,
    children in node order: the layout ``traverse_tree`` walks."""
    bs, n = parents.shape
    first_child = torch.full((bs, n), -1, dtype=torch.int64)
    next_sibling = torch.full((bs, n), -1, dtype=torch.int64)
    for b, row in enumerate(parents.tolist()):
        last_child = [-1] * n
        for node in range(1, n):
            parent = row[node]
            if last_child[parent] < 0:
                first_child[b, parent] = node
            else:
                next_sibling[b, last_child[parent]] = node
            last_child[parent] = node
    return first_child, next_sibling


class GrammarStep:
    """Masks every node's logits with its request's grammar state after the node's path."""

    def __init__(self, reqs, vocab_size: int, barrier: Optional[Callable[[], None]]) -> None:
        self.reqs = reqs
        self.vocab_size = vocab_size
        self.barrier = barrier
        self._tree = None

    def prepare(self, tree: VerifyTree) -> None:
        """Start the tree's copy to the host before the verify forward is launched."""
        from sglang.srt.speculative.spec_utils import GrammarTree

        if tree.is_chain:
            self._tree = GrammarTree.from_linear_chain(tree.tokens)
        else:
            first_child, next_sibling = tree_links(tree.parents.cpu())
            self._tree = GrammarTree.from_host(first_child, next_sibling, tree.tokens.cpu())

    def __call__(self, logits: torch.Tensor, tree: VerifyTree) -> torch.Tensor:
        from sglang.srt.constrained.base_grammar_backend import GrammarMask
        from sglang.srt.speculative.spec_utils import generate_token_bitmask

        if self._tree is None:
            self.prepare(tree)
        if self.barrier is not None:
            self.barrier()  # the previous step's committed tokens reach the matchers first
        mask, grammar = generate_token_bitmask(self.reqs, *self._tree.resolve(), self.vocab_size)
        self._tree = None
        if mask is not None:
            bs, n, vocab = logits.shape
            GrammarMask(grammar, grammar.move_vocab_mask(mask, logits.device)).apply(logits.view(bs * n, vocab))
        return logits
