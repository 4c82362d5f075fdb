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


def build_topk_tree(
    chain: torch.Tensor,
    topk_tokens: torch.Tensor,
    topk_logprobs: torch.Tensor,
    num_nodes: int,
) -> VerifyTree:
    """The top-1 chain plus the ``num_nodes - B`` most likely alternatives.

    chain:         [bs, B] the block ``[bonus, top-1 drafts]``: nodes 0..B-1.
    topk_tokens:   [bs, B-1, K] the drafter's K best tokens at block positions 1..B-1
                   (column 0 = the chain's token), topk_logprobs their log-probabilities.

    A candidate node is any path the K-ary tree over the block's positions allows; its
    score is the sum of its tokens' draft log-probabilities (positions treated as
    independent, which is what one non-causal block forward gives). Scores fall along
    a path, so the best nodes form a prefix-closed set: a beam of width M per depth
    holds them all, and a final top-M over the depths picks them, with no Python loop
    over nodes. Keeping the whole chain means a tree never accepts less than the chain.
    """
    bs, block = chain.shape
    k = topk_tokens.shape[-1]
    extra = num_nodes - block
    if extra < 0:
        raise ValueError(f"a tree of {num_nodes} nodes cannot hold the {block}-node chain")
    if extra == 0 or k == 1:
        return build_chain(chain)
    device = chain.device
    # Slight preference for shallow nodes breaks exact ties parent-first.
    logq = topk_logprobs.float() - 1e-6 * torch.arange(1, block, device=device)[None, :, None]
    chain_score = torch.cumsum(logq[:, :, 0], dim=1)  # [bs, B-1], chain node d has score [d-1]
    beams = []  # per depth: (score [bs, M], token, parent: chain node id or -(1 + beam index))
    prev = None
    for depth in range(1, block):
        base = chain_score[:, depth - 2] if depth > 1 else torch.zeros(bs, device=device)
        cand_score = [base[:, None] + logq[:, depth - 1, 1:]]
        cand_token = [topk_tokens[:, depth - 1, 1:]]
        cand_parent = [torch.full((bs, k - 1), depth - 1, dtype=torch.long, device=device)]
        if prev is not None:
            p_score, _, _ = prev
            width = p_score.shape[1]
            cand_score.append((p_score[:, :, None] + logq[:, depth - 1][:, None, :]).reshape(bs, -1))
            cand_token.append(topk_tokens[:, depth - 1][:, None, :].expand(bs, width, k).reshape(bs, -1))
            beam_idx = torch.arange(width, device=device).repeat_interleave(k)
            cand_parent.append((-1 - beam_idx).expand(bs, -1))
        scores, tokens, parents = (torch.cat(c, dim=1) for c in (cand_score, cand_token, cand_parent))
        top = scores.topk(min(extra, scores.shape[1]), dim=1)
        prev = (top.values, tokens.gather(1, top.indices), parents.gather(1, top.indices))
        beams.append(prev)
    return _assemble_tree(chain, beams, extra)


def _assemble_tree(chain: torch.Tensor, beams: list, extra: int) -> VerifyTree:
    """Pick the best ``extra`` beam entries over all depths and number them after the chain."""
    bs, block = chain.shape
    device = chain.device
    widths = [b[0].shape[1] for b in beams]
    offsets = torch.tensor([0] + widths[:-1], device=device).cumsum(0)
    scores = torch.cat([b[0] for b in beams], dim=1)
    tokens = torch.cat([b[1] for b in beams], dim=1)
    parents = torch.cat([b[2] for b in beams], dim=1)
    depth_of = torch.cat([torch.full((w,), d + 1, device=device) for d, w in enumerate(widths)])
    # Beam references point into the previous depth's beam: make them global indices.
    prev_offset = torch.cat([torch.full((w,), int(offsets[d - 1]) if d else 0, device=device) for d, w in enumerate(widths)])
    global_parent = torch.where(parents < 0, prev_offset[None, :] + (-1 - parents), parents.new_full(parents.shape, -1))
    take = extra if scores.shape[1] >= extra else scores.shape[1]
    top = scores.topk(take, dim=1)
    # Order chosen nodes by depth so parents precede children.
    order = depth_of[top.indices].argsort(dim=1, stable=True)
    chosen = top.indices.gather(1, order)
    node_of = torch.full(scores.shape, -1, dtype=torch.long, device=device)
    node_of.scatter_(1, chosen, block + torch.arange(take, device=device).expand(bs, take))
    chosen_parent = parents.gather(1, chosen)
    via_beam = global_parent.gather(1, chosen)
    parent_node = torch.where(chosen_parent >= 0, chosen_parent, node_of.gather(1, via_beam.clamp_min(0)))
    if bool((parent_node < 0).any()):
        raise RuntimeError("verify tree is not prefix-closed (a chosen node's parent was dropped)")
    depths = torch.cat([torch.arange(block, device=device).expand(bs, block), depth_of[chosen]], dim=1)
    node_tokens = torch.cat([chain, tokens.gather(1, chosen)], dim=1)
    node_parents = torch.cat([torch.arange(block, device=device).expand(bs, block) - 1, parent_node], dim=1)
    if take < extra:  # too few alternatives exist: pad with copies of the first draft (never chosen by the walk)
        pad = extra - take
        depths = torch.cat([depths, torch.ones(bs, pad, dtype=depths.dtype, device=device)], dim=1)
        node_tokens = torch.cat([node_tokens, chain[:, 1:2].expand(bs, pad)], dim=1)
        node_parents = torch.cat([node_parents, torch.zeros(bs, pad, dtype=node_parents.dtype, device=device)], dim=1)
    return VerifyTree(tokens=node_tokens, depths=depths.long(), parents=node_parents.long(), is_chain=False)
