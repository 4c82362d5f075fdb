"""Sampled requests (T > 0) with a frequency penalty and a logit bias stay lossless.

The vocab-32 tiny target and random drafter of ``test_sampling_engine`` (drafts are
accepted and rejected), block 4. Each position's target distribution is the processed
one -- the penalty counting the tokens sampled before it, inside the block too, then
the bias -- so the first K tokens must follow plain decoding's exact joint
distribution, enumerated here with transformers on the same weights. The same samples
must *reject* the distribution a per-block penalty would give (every verify position
penalised by the output before the block only), which shows the test can tell.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from sglang_dflash.spec.sampling import RowSampling, filtered_probs
from tests.support.reference_spec import chi_square_gof
from tests.test_sampling_engine import K, PROMPT, VOCAB, spec_server, vocab32  # noqa: F401 (fixture)
from tests.test_sampling_engine import fit as engine_fit

BIAS = {3: 1.5, 11: 1.0, 20: -2.0}
PARAMS = {"temperature": 1.0, "frequency_penalty": 1.5, "logit_bias": {str(k): v for k, v in BIAS.items()}}


def exact_distribution(target_dir, *, per_block: bool = False) -> torch.Tensor:
    """[V]*K joint probabilities of the first K tokens under plain sampling with the
    penalty and bias. ``per_block``: position 3 penalised by token 1 only (token 1 is
    the prefill's; tokens 2 and 3 are verified in one block)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    bias = torch.zeros(VOCAB)
    for token, value in BIAS.items():
        bias[token] = value
    joint = torch.ones(1)
    prefixes = [[]]
    with torch.no_grad():
        for position in range(K):
            logits = model(torch.tensor([PROMPT + p for p in prefixes])).logits[:, -1]
            counts = torch.zeros(len(prefixes), VOCAB)
            for row, prefix in enumerate(prefixes):
                for token in prefix[:1] if per_block and position == 2 else prefix:
                    counts[row, token] += 1
            logits = logits - PARAMS["frequency_penalty"] * counts + bias
            n = len(prefixes)
            row = RowSampling(torch.ones(n), torch.full((n,), 1 << 30), torch.ones(n), torch.zeros(n))
            joint = (joint[:, None] * filtered_probs(logits, row)).reshape(-1)
            prefixes = [p + [t] for p in prefixes for t in range(VOCAB)]
    return joint.view(*([VOCAB] * K))


def sample(server, n: int) -> tuple[list[tuple[int, ...]], int]:
    """n samples of the first K tokens, and how many drafts their decode steps accepted."""
    out, accepted = [], 0
    body = {"max_new_tokens": K, "ignore_eos": True, **PARAMS}
    for start in range(0, n, 500):
        for o in server.generate([list(PROMPT)] * min(500, n - start), body):
            out.append(tuple(o["output_ids"][:K]))
            accepted += sum(o["meta_info"]["spec_dflash_accepted_per_step"])
    return out, accepted


def fit(samples: list[tuple[int, ...]], joint: torch.Tensor) -> dict[str, float]:
    """p-values: each position's marginal, the (t1, t2) pair, the (t2, t3) pair (one
    decode step verifies both), and how often t3 repeats t2 (what an in-block penalty
    changes most)."""
    pvalues = engine_fit(samples, joint)
    pair = joint.sum(dim=0)
    counts = Counter(s[1] * VOCAB + s[2] for s in samples)
    pvalues["pair23"] = chi_square_gof([counts[v] for v in range(VOCAB * VOCAB)], pair.reshape(-1).tolist())[2]
    repeat = float(pair.diagonal().sum())
    repeats = sum(s[1] == s[2] for s in samples)
    pvalues["repeat23"] = chi_square_gof([repeats, len(samples) - repeats], [repeat, 1 - repeat])[2]
    return pvalues


def test_penalty_and_bias_sampling_is_lossless(servers, vocab32):
    n = 4000
    target, drafter = vocab32
    server = spec_server(servers, target, drafter)
    samples, accepted = sample(server, n)
    assert accepted > n // 10, accepted  # drafts were accepted (token 3 often came in token 2's step)
    pvalues = fit(samples, exact_distribution(target))
    wrong = fit(samples, exact_distribution(target, per_block=True))
    print(f"penalty+bias T=1: p-values {pvalues}; against per-block penalties {wrong}")
    assert min(pvalues.values()) > 0.01 / len(pvalues), pvalues
    assert min(wrong.values()) < 1e-6, wrong
