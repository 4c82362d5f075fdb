"""Greedy acceptance along a linear verify chain.

Glossary (per request, verify width ``N``; node 0 is the previous bonus token, which
the target has not seen yet, nodes 1..N-1 are drafts):

* ``target_top1[j]``: the target's argmax *after* node j, i.e. its choice for node j+1.
* ``num_accepted``: the longest run of drafts with ``draft[j] == target_top1[j-1]``.
* ``commit_len = num_accepted + 1``: tokens whose target KV is now valid (node 0 plus
  the accepted drafts); it is also the number of tokens emitted this step.
* emitted tokens: ``target_top1[0 : commit_len]`` -- the accepted drafts (equal to the
  target's own choices) followed by the new bonus ``target_top1[num_accepted]``.

Because the emitted tokens are always the target's argmax given an accepted prefix,
greedy output is exactly the target's greedy output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Acceptance:
    """Per-request outcome of one verify step.

    num_accepted: [bs] accepted drafts (bonus not counted).
    out_tokens:   [bs, N] emitted tokens in columns ``0 .. num_accepted``; the rest is padding.
    bonus:        [bs] the last emitted token: the next block's node 0.
    """

    num_accepted: torch.Tensor
    out_tokens: torch.Tensor
    bonus: torch.Tensor

    @property
    def commit_lens(self) -> torch.Tensor:
        return self.num_accepted + 1


def greedy_chain_acceptance(draft_tokens: torch.Tensor, target_top1: torch.Tensor) -> Acceptance:
    """draft_tokens, target_top1: [bs, N] -> Acceptance (vectorised, no host sync)."""
    matches = (draft_tokens[:, 1:] == target_top1[:, :-1]).int()
    num_accepted = matches.cumprod(dim=1).sum(dim=1)
    bonus = target_top1.gather(1, num_accepted[:, None]).squeeze(1)
    return Acceptance(num_accepted=num_accepted, out_tokens=target_top1.clone(), bonus=bonus)


@dataclass
class TreeAcceptance(Acceptance):
    """path: [bs, D+1] node index at each accepted depth (padded with the last node)."""

    path: torch.Tensor = None


def greedy_tree_acceptance(tokens: torch.Tensor, parents: torch.Tensor, target_top1: torch.Tensor, max_depth: int) -> TreeAcceptance:
    """Walk from the root, each step to the child whose token is the target's argmax.

    tokens, parents, target_top1: [bs, N]. Children of one node carry distinct tokens
    except padding copies, which come after the real child, so taking the first match
    is deterministic. Emitted tokens are the target's argmax along the accepted path.
    """
    bs = tokens.shape[0]
    rows = torch.arange(bs, device=tokens.device)
    cur = torch.zeros(bs, dtype=torch.long, device=tokens.device)
    alive = torch.ones(bs, dtype=torch.bool, device=tokens.device)
    path = [cur]
    for _ in range(max_depth):
        want = target_top1[rows, cur]
        match = (parents == cur[:, None]) & (tokens == want[:, None])
        alive = alive & match.any(dim=1)
        cur = torch.where(alive, match.int().argmax(dim=1), cur)
        path.append(cur)
    path = torch.stack(path, dim=1)
    num_accepted = (path[:, 1:] != path[:, :-1]).sum(dim=1)
    out_tokens = target_top1.gather(1, path)
    bonus = out_tokens[rows, num_accepted]
    return TreeAcceptance(num_accepted=num_accepted, out_tokens=out_tokens, bonus=bonus, path=path)
