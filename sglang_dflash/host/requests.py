"""Requests: which options the worker serves exactly (else a clear refusal), and the
per-request statistics SGLang's request objects carry to ``meta_info``.

A speculative worker must produce exactly what plain decoding would. Grammars,
penalties, logit bias, min_new_tokens, custom logit processors and log-probabilities
are served per verify position (:mod:`.features`); a request asking for something the
worker cannot serve exactly is refused with HTTP 400 and a one-line reason instead of
being served differently from non-speculative SGLang.
"""

from __future__ import annotations

from typing import Optional, Sequence

from ..telemetry.request_stats import POSITIONS, complete_positions, step_positions, summarize

_PREFIX = "DFLASH speculative decoding (sglang-dflash) does not support"


def unsupported_reason(req) -> Optional[str]:
    """None if the request is served exactly; otherwise the reason it is refused."""
    if not req.origin_input_ids:
        # Plain SGLang 0.5.23 crashes its scheduler on an empty prompt; refuse it instead.
        return "the prompt is empty: send at least one token"
    if getattr(req, "return_hidden_states", False):
        return f"{_PREFIX} return_hidden_states"
    return None


def record_step(reqs: Sequence, emitted: Sequence[Sequence[int]]) -> None:
    """Append one verify step's tokens' block positions per request (streamed with the tokens)."""
    for req, tokens in zip(reqs, emitted):
        if req.is_retracted or req.finished() or not tokens:
            continue
        if req.customized_info is None:
            req.customized_info = {}
        positions = req.customized_info.setdefault(POSITIONS, [])
        positions.extend([0] * (len(req.output_ids) - len(positions)))  # tokens from prefill
        positions.extend(step_positions(len(tokens)))


def summarize_meta_info(meta_info: dict) -> None:
    """A finished request's position record, completed and summarised in place."""
    if POSITIONS in meta_info:
        meta_info[POSITIONS] = positions = complete_positions(meta_info[POSITIONS], meta_info["completion_tokens"])
        meta_info.update(summarize(positions))
