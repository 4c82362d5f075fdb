"""Logits steps: per-position request features applied to the target's verify logits.

Between the target's verify forward and acceptance, every request option that changes
what plain decoding would pick -- a grammar mask, penalties, logit bias, a minimum
length, a custom logit processor -- rewrites the verify logits **per position**: the
logits after node ``j`` are processed as if nodes ``1..j`` had already been generated
(a penalty at node ``j`` counts the block's own earlier tokens, a grammar is advanced
through them). Acceptance then runs on the processed logits, so greedy output is what
no-spec decoding with the same options produces, and sampled output is drawn from the
same processed distribution.

A step is any callable ``step(logits, tree) -> logits`` over ``[bs, N, V]``; the host
builds the batch's steps from the requests (``DecodeBatch.logits_steps``), in the
order no-spec SGLang applies them. A step that reads the tree on the host may also define
``prepare(tree)``, called before the target verify is launched, to start that copy
early so it overlaps the forward.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch

from .verify_tree import VerifyTree


class LogitsStep(Protocol):
    def __call__(self, logits: torch.Tensor, tree: VerifyTree) -> torch.Tensor:
        """logits: [bs, N, V] after each node of ``tree`` -> processed logits, same shape."""


def prepare_logits_steps(steps: Sequence[LogitsStep], tree: VerifyTree) -> None:
    """Before the target verify: let steps that need the tree on the host start copying it."""
    for step in steps:
        prepare = getattr(step, "prepare", None)
        if prepare is not None:
            prepare(tree)


def apply_logits_steps(steps: Sequence[LogitsStep], logits: torch.Tensor, tree: VerifyTree) -> torch.Tensor:
    """Run the batch's logits steps in order (no steps: the logits as they are)."""
    for step in steps:
        logits = step(logits, tree)
    return logits
