"""LoRA targets: the target verifies with each request's adapter, output exactly as
no-spec SGLang with the same adapter, and different from the base model's.

SmolLM2-135M-Instruct with a random rank-8 q/v adapter built in code (PEFT layout,
``smollm2_lora``), SGLang's torch LoRA backend on the CPU lane, the shipped drafter
(which knows only the base model, and borrows its embedding and lm_head without the
adapter). Requests with and without the adapter share batches. The servers are the
request-feature tests' (``tests/support/features.py``).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.features import ADAPTER, chat_text, plain_options, spec_options
from tests.support.prompts import text_prompts


def check_lora(spec, plain, model, *, n: int, batch: int, seed: int, base_every: int):
    """``n`` prompts with the adapter, every ``base_every``-th also without it."""
    prompts = chat_text(model, text_prompts(n, seed=seed))
    requests = [(p, ADAPTER) for p in prompts] + [(p, None) for p in prompts[::base_every]]
    requests = requests[::2] + requests[1::2]  # adapter and base requests interleaved
    params = {"temperature": 0.0, "max_new_tokens": 24}

    def go(server):
        def one(request):
            return server.generate_one(request[0], params, lora_path=request[1])

        if batch == 1:
            return [one(r) for r in requests]
        with ThreadPoolExecutor(batch) as pool:
            return list(pool.map(one, requests))

    got, want = go(spec), go(plain)
    for (prompt, adapter), g, w in zip(requests, got, want):
        assert g["output_ids"] == w["output_ids"], f"adapter {adapter}: {g['text']!r} != {w['text']!r}"
    adapted = {p: o["output_ids"] for (p, a), o in zip(requests, got) if a == ADAPTER}
    base = {p: o["output_ids"] for (p, a), o in zip(requests, got) if a is None}
    changed = sum(adapted[p] != ids for p, ids in base.items())
    assert changed >= max(1, len(base) // 3), f"the adapter changed only {changed} of {len(base)} answers"
    accepted = sum(sum(o["meta_info"]["spec_dflash_accepted_per_step"]) for (_, a), o in zip(requests, got) if a)
    assert accepted > 0, "no draft was accepted for an adapter request"


@pytest.mark.parametrize(
    "adaptive,batch",
    [  # CI's slow run: one cell; the other three in ``make test-matrix``
        pytest.param(False, 16, marks=pytest.mark.slow, id="full-block-16"),
        pytest.param(True, 1, marks=pytest.mark.matrix, id="adaptive-1"),
        pytest.param(False, 1, marks=pytest.mark.matrix, id="full-block-1"),
        pytest.param(True, 16, marks=pytest.mark.matrix, id="adaptive-16"),
    ],
)
def test_lora_matrix(servers, smollm2, smollm2_drafter, smollm2_lora, adaptive, batch):
    spec = servers.get(spec_options(smollm2, smollm2_drafter, smollm2_lora, adaptive=adaptive))
    plain = servers.get(plain_options(smollm2, smollm2_lora))
    check_lora(spec, plain, smollm2, n=30, batch=batch, seed=23, base_every=3)
