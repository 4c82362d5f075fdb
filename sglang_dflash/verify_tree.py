"""The verify-tree builder: what the target checks in one forward, node by node.

A step's verify batch is a set of ``N`` nodes per request, laid out in slot order
after the committed prefix: node 0 is the previous bonus token (the root), every other
node is a drafted token with a parent. A node sits at position ``prefix + depth`` and
attends to the whole prefix plus its ancestors and itself. A linear chain (node ``j``
at depth ``j``, parent ``j-1``) is the DFlash default and needs no mask on backends
that do causal verify; a top-k tree built from the same single block forward is the
same structure with branching, verified through SGLang's tree mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class VerifyTree:
    """tokens, depths, parents: [bs, N]; parents[:, 0] == -1."""

    tokens: torch.Tensor
    depths: torch.Tensor
    parents: torch.Tensor
    is_chain: bool

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_nodes(self) -> int:
        return self.tokens.shape[1]

    def positions(self, prefix_lens: torch.Tensor) -> torch.Tensor:
        """[bs, N] absolute positions of the nodes."""
        return prefix_lens.long()[:, None] + self.depths

    def ancestor_mask(self) -> torch.Tensor:
        """[bs, N, N]: node i may attend node j iff j is i or an ancestor of i."""
        bs, n = self.tokens.shape
        if self.is_chain:
            return torch.ones(n, n, dtype=torch.bool, device=self.tokens.device).tril().expand(bs, n, n)
        mask = torch.eye(n, dtype=torch.bool, device=self.tokens.device).repeat(bs, 1, 1)
        node = torch.arange(n, device=self.tokens.device).expand(bs, n)
        rows = torch.arange(bs, device=self.tokens.device)[:, None]
        parent = self.parents
        for _ in range(int(self.depths.max())):
            valid = parent >= 0
            mask[rows.expand_as(node)[valid], node[valid], parent[valid]] = True
            parent = torch.where(valid, self.parents.gather(1, parent.clamp_min(0)), parent)
        return mask

    def sglang_custom_mask(self, prefix_lens: torch.Tensor) -> torch.Tensor:
        """SGLang's flattened verify mask: per request a row-major [N, P+N] bool block
        (True = may attend), requests concatenated."""
        blocks = []
        ancestors = self.ancestor_mask()
        for i, p in enumerate(prefix_lens.tolist()):
            prefix = torch.ones(self.num_nodes, p, dtype=torch.bool, device=self.tokens.device)
            blocks.append(torch.cat([prefix, ancestors[i]], dim=1).reshape(-1))
        return torch.cat(blocks)


def build_chain(block_tokens: torch.Tensor) -> VerifyTree:
    """The block ``[bonus, d1 .. d_{B-1}]`` verified as a linear chain."""
    bs, n = block_tokens.shape
    depths = torch.arange(n, device=block_tokens.device).expand(bs, n)
    return VerifyTree(tokens=block_tokens, depths=depths, parents=depths - 1, is_chain=True)
