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
