"""Log-probabilities of every committed token, in SGLang 0.5.23's multi-token layout.

``return_logprob`` (with ``top_logprobs_num``, ``token_ids_logprob``; the OpenAI routes'
``logprobs`` / ``top_logprobs``) needs, for a speculative step, ``next_token_logprobs``
[bs, stride] and flat per-(request, position) top-k and token-id lists, which the
scheduler reads for the first ``accept_len`` positions of each request. They are
computed from the logits acceptance ran on -- after penalties, grammar mask, logit bias
and custom processors -- with the request's temperature, exactly as SGLang's sampler
reports them without speculation, by SGLang's generic ``compute_spec_logprobs`` (shared
with EAGLE). Input (prompt) log-probabilities come from the target's own prefill.
"""

from __future__ import annotations

import torch

from ..spec.accept import Acceptance


def write_logprobs(batch, logits_output, logits: torch.Tensor, acceptance: Acceptance) -> None:
    """Fill ``logits_output``'s decode log-probability fields for the emitted tokens.

    logits: [bs, N, V] the processed logits after each verify node; emitted token ``j``
    of a chain came from node ``j``, of a tree from node ``path[j]``.
    """
    from sglang.srt.layers.logprob_processor import compute_spec_logprobs

    bs, n, vocab = logits.shape
    logits_output.next_token_logits = logits.reshape(bs * n, vocab)
    path = getattr(acceptance, "path", None)
    if path is None:
        compute_spec_logprobs(batch, logits_output, acceptance.out_tokens.reshape(-1), chain_stride=n)
        return
    accept_index = path + torch.arange(bs, device=path.device)[:, None] * n
    predict = torch.zeros(bs * n, dtype=acceptance.out_tokens.dtype, device=path.device)
    predict[accept_index.reshape(-1)] = acceptance.out_tokens.reshape(-1)
    compute_spec_logprobs(batch, logits_output, predict, accept_index=accept_index)
