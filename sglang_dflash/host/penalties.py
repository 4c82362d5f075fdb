"""Frequency/presence/repetition penalties, min_new_tokens and logit_bias, read from
SGLang 0.5.23's requests and applied per verify node.

The penalties depend on each request's output history, which the worker keeps itself
(:class:`~sglang_dflash.spec.history.OutputHistory`, exact under overlap scheduling);
the math is SGLang-free (:mod:`sglang_dflash.spec.penalties`). ``min_new_tokens`` holds
back the stop tokens SGLang's ``BatchedMinNewTokensPenalizer`` holds back. ``logit_bias``
does not depend on the position: it is added to every node, after the grammar mask, as
plain decoding adds it.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..spec.history import OutputHistory
from ..spec.penalties import PenaltyRows, apply_penalties
from ..spec.verify_tree import VerifyTree


def is_penalized(params) -> bool:
    """Whether a request's logits depend on its output history through a penalty."""
    return bool(
        params.frequency_penalty or params.presence_penalty or params.repetition_penalty != 1.0 or params.min_new_tokens
    )


def stop_token_ids(req) -> set[int]:
    """The tokens min_new_tokens holds back: SGLang's union of the request's stop ids,
    its EOS ids and the tokenizer's EOS and additional stop ids."""
    tokenizer = req.tokenizer
    ids = set(req.sampling_params.stop_token_ids or ()) | set(req.eos_token_ids or ())
    if tokenizer is not None:
        ids |= set(getattr(tokenizer, "additional_stop_token_ids", None) or ())
        if tokenizer.eos_token_id is not None:
            ids.add(tokenizer.eos_token_id)
    return {int(t) for t in ids if t is not None}


def penalty_rows(reqs: Sequence, rows: list[int], vocab_size: int, device) -> PenaltyRows:
    """The parameters of the penalised rows ``rows`` of a batch (a penalty none of them
    uses is left out)."""
    params = [reqs[i].sampling_params for i in rows]

    def column(values, dtype, neutral):
        if all(v == neutral for v in values):
            return None
        return torch.tensor(values, dtype=dtype, device=device)

    min_new = column([p.min_new_tokens or 0 for p in params], torch.int64, 0)
    stop = None
    if min_new is not None:
        stop = torch.zeros(len(rows), vocab_size, dtype=torch.bool)
        for k, i in enumerate(rows):
            ids = [t for t in stop_token_ids(reqs[i]) if 0 <= t < vocab_size]
            stop[k, ids] = True
        stop = stop.to(device)
    return PenaltyRows(
        index=torch.tensor(rows, dtype=torch.long, device=device),
        frequency=column([float(p.frequency_penalty) for p in params], torch.float32, 0.0),
        presence=column([float(p.presence_penalty) for p in params], torch.float32, 0.0),
        repetition=column([float(p.repetition_penalty) for p in params], torch.float32, 1.0),
        min_new_tokens=min_new,
        stop_tokens=stop,
    )


class PenaltyStep:
    """Penalises each node of the rows' verify trees by the output on its path."""

    def __init__(self, rows: PenaltyRows, counts: torch.Tensor) -> None:
        self.rows = rows
        self.counts = counts

    def __call__(self, logits: torch.Tensor, tree: VerifyTree) -> torch.Tensor:
        index = self.rows.index
        logits[index] = apply_penalties(
            logits[index],
            self.counts,
            tree.tokens[index],
            tree.ancestor_mask()[index],
            tree.depths[index],
            self.rows,
        )
        return logits


def penalty_step(batch, rids: list[str], bonus: torch.Tensor, history: OutputHistory) -> Optional[PenaltyStep]:
    """The batch's penalty step, or None when no request is penalised."""
    rows = [i for i, req in enumerate(batch.reqs) if is_penalized(req.sampling_params)]
    if not rows:
        return None
    index = torch.tensor(rows, dtype=torch.long, device=bonus.device)
    counts = history.counts([rids[i] for i in rows], bonus[index])
    return PenaltyStep(penalty_rows(batch.reqs, rows, batch.sampling_info.vocab_size, bonus.device), counts)


class LogitBiasStep:
    """SGLang's per-request ``logit_bias`` [bs, V], the same at every node."""

    def __init__(self, bias: torch.Tensor) -> None:
        self.bias = bias

    def __call__(self, logits: torch.Tensor, tree: VerifyTree) -> torch.Tensor:
        logits += self.bias[:, None, :].to(logits.dtype)
        return logits
