"""Per-request DFlash statistics in the response's ``meta_info``.

For every output token, ``spec_dflash_positions`` names the block position that
produced it: ``k >= 1`` for a draft accepted at block position k, 0 for a token the
target chose itself (each verify step's bonus, and the first token after prefill).
One entry per token means SGLang's per-token custom-info plumbing slices it with the
tokens, so it streams chunk by chunk and is cut exactly where a stop string or
max_new_tokens cuts the output. When the request finishes it is summarised into

* ``spec_dflash_accepted_per_step``: accepted drafts in each verify step, in order;
* ``spec_dflash_accepted_by_position``: how many times each block position 1, 2, ...
  was accepted (position k can only be accepted after k-1 was).
"""

from __future__ import annotations

from typing import Sequence

POSITIONS = "spec_dflash_positions"
PER_STEP = "spec_dflash_accepted_per_step"
BY_POSITION = "spec_dflash_accepted_by_position"


def step_positions(num_emitted: int) -> list[int]:
    """Block positions of one verify step's emitted tokens: accepted drafts 1..k, then the bonus (0)."""
    return list(range(1, num_emitted)) + [0]


def complete_positions(positions: Sequence[int], completion_tokens: int) -> list[int]:
    """The record is written from the first verify step on, so a stream's first chunk
    (the prefill token) carries none: restore those leading target-chosen entries."""
    positions = [p for p in positions if p is not None]
    return [0] * (completion_tokens - len(positions)) + positions


def summarize(positions: Sequence[int]) -> dict:
    """Per-step accepted counts and per-position acceptance counts from the token record."""
    per_step, run = [], 0
    for position in positions[1:]:  # the first token comes from prefill
        if position == 0:
            per_step.append(run)
            run = 0
        else:
            run += 1
    if run:
        per_step.append(run)  # a final step cut short by a stop condition
    by_position = [0] * max(per_step, default=0)
    for accepted in per_step:
        for k in range(accepted):
            by_position[k] += 1
    return {PER_STEP: per_step, BY_POSITION: by_position}
