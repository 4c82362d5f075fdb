"""Which request options the DFlash worker serves exactly, and a clear refusal otherwise.

A speculative worker must produce exactly what plain decoding would. Options whose
logits depend on tokens *inside* the block being verified (penalties, logit bias,
grammars, min_new_tokens' EOS mask) need per-position logit processing that this
worker does not do yet; a request asking for them is refused with HTTP 400 and a
one-line reason instead of being served differently from non-speculative SGLang.
"""

from __future__ import annotations

from typing import Optional

_PREFIX = "DFLASH speculative decoding (sglang-dflash) does not support"


def unsupported_reason(req) -> Optional[str]:
    """None if the request is served exactly; otherwise the reason it is refused."""
    params = req.sampling_params
    if not req.origin_input_ids:
        # Plain SGLang 0.5.23 crashes its scheduler on an empty prompt; refuse it instead.
        return "the prompt is empty: send at least one token"
    if getattr(req, "return_logprob", False):
        return f"{_PREFIX} return_logprob yet"
    if getattr(req, "return_hidden_states", False):
        return f"{_PREFIX} return_hidden_states"
    if any(getattr(params, name, None) for name in ("json_schema", "regex", "ebnf", "structural_tag")):
        return f"{_PREFIX} grammar-constrained decoding (json_schema/regex/ebnf/structural_tag) yet"
    if params.frequency_penalty or params.presence_penalty or params.repetition_penalty != 1.0:
        return f"{_PREFIX} frequency/presence/repetition penalties yet"
    if params.logit_bias:
        return f"{_PREFIX} logit_bias yet"
    if params.min_new_tokens:
        return f"{_PREFIX} min_new_tokens yet"
    if getattr(req, "custom_logit_processor", None):
        return f"{_PREFIX} custom logit processors"
    return None
