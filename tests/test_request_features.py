"""Issue [4 of 6]: everything a request can ask of SGLang's own DFLASH, served exactly.

Real ``launch_server`` processes on the CPU lane, float32, SmolLM2-135M-Instruct with
the shipped drafter (block 8), so blocks really commit several tokens. Every feature --
grammars (regex, JSON schema, EBNF, OpenAI ``json_object``), frequency / presence /
repetition penalties, ``logit_bias``, ``min_new_tokens``, custom logit processors (a
stateless one and one that reads the output so far), log-probabilities (native and
OpenAI) -- must give greedy output identical to no-spec SGLang run with
``--disable-overlap-schedule`` (plain decoding's penalties then see the output so far);
grammar answers that ended by themselves must validate; log-probabilities must agree
within ``LOGPROB_TOLERANCE`` with the same tokens, counts and top-k tokens; and drafts
must have been accepted, so speculative steps were compared, not plain decode.

The default run sends two requests per feature, each asking for that feature alone, in
mixed batches to the full-block server. The slow matrix sends 30 prompts per feature
group (requests asking for several features at once, ``GROUPS``: every feature in at
least one) at batch 1 and 16 to a full-block and an adaptive server, and every group
over a top-2 verify tree. All share one plain server, and the LoRA tests share them all.
"""

from __future__ import annotations

import pytest

from tests.support.features import (
    FEATURES,
    GROUPS,
    OPENAI,
    accepted_drafts,
    assert_same_answer,
    chat_text,
    feature_cases,
    group_case,
    max_logprob_gap,
    named_tokens,
    plain_options,
    run_cases,
    spec_options,
    stopped,
    wait_idle,
)
from tests.support.prompts import text_prompts

N_PROMPTS = 30
GRAMMARS = {"regex", "json_schema", "ebnf", "json_object"}


def max_new_tokens(features) -> int:
    """Grammar answers end by themselves (given room); others stop at a few blocks."""
    return 48 if GRAMMARS & set(features) else 20


def cases_for(model, features: list[str], n: int, seed: int):
    prompts = text_prompts(n, seed=seed)
    chats = chat_text(model, prompts)
    tokens = named_tokens(model)
    if len(features) == 1:
        return [feature_cases(features[0], i, p, c, tokens) for i, (p, c) in enumerate(zip(prompts, chats))]
    return [group_case(features, i, p, c, tokens) for i, (p, c) in enumerate(zip(prompts, chats))]


def check(spec, plain, model, features: list[str], *, n: int, batch: int, seed: int, want=None):
    """``n`` requests asking for ``features``: identical to plain decoding, grammar
    answers complete and valid, drafts accepted. Returns both sides' answers."""
    cases = cases_for(model, features, n, seed)
    limit = max_new_tokens(features)
    wait_idle(spec)
    before = accepted_drafts(spec)
    got = run_cases(spec, cases, batch=batch, max_new_tokens=limit)
    accepted = accepted_drafts(spec) - before
    want = want if want is not None else run_cases(plain, cases, batch=16, max_new_tokens=limit)
    for i, (case, g, w) in enumerate(zip(cases, got, want)):
        assert_same_answer(case, g, w, f"{case.feature} request {i}")
    if cases[0].validate is not None and "json_object" not in features:  # a free JSON object has no bound
        assert any(stopped(g.finish) for g in got), f"{features}: no answer completed its grammar"
    if not OPENAI & set(features):
        accepted = sum(a.accepted for a in got)  # these requests' own accepted drafts
    assert accepted > 0, f"{features}: no draft was accepted, so nothing speculative was compared"
    return got, want


# ---------------------------------------------------------------- default run
def test_every_feature_matches_no_spec(servers, smollm2, smollm2_drafter, smollm2_lora):
    """Two requests per feature; the native ones all in flight together (mixed batches),
    then each OpenAI-route feature on its own, so the accepted drafts counted are its own."""
    spec = servers.get(spec_options(smollm2, smollm2_drafter, smollm2_lora, adaptive=False))
    plain = servers.get(plain_options(smollm2, smollm2_lora))
    native = [f for f in FEATURES if f not in OPENAI]
    cases = [c for f in native for c in cases_for(smollm2, [f], 2, seed=3)]
    got = run_cases(spec, cases, batch=16, max_new_tokens=32)
    want = run_cases(plain, cases, batch=16, max_new_tokens=32)
    for i, (case, g, w) in enumerate(zip(cases, got, want)):
        assert_same_answer(case, g, w, f"request {i}")
    for feature in native:
        answers = [(c, g) for c, g in zip(cases, got) if c.feature == feature]
        assert sum(g.accepted for _, g in answers) > 0, f"{feature}: no draft accepted"
        if feature in GRAMMARS:
            assert any(stopped(g.finish) for _, g in answers), f"{feature}: no answer completed its grammar"
    print(f"largest output logprob gap spec vs plain: {max_logprob_gap(got, want):.2e}")
    for feature in sorted(OPENAI):
        check(spec, plain, smollm2, [feature], n=2, batch=2, seed=3)


# ---------------------------------------------------------------- slow matrix
_PLAIN_ANSWERS: dict = {}


# group -> the verify mode CI runs it in (adaptive?)
CI_GROUPS = {"ebnf+repetition+history_processor": False, "json_schema+presence+bias": True,
             "penalties+min_new+disallowed+logprobs": False}


def matrix_cells() -> list:
    """Every (group, verify mode, batch) cell. CI's slow run takes three groups at batch
    16 (``CI_GROUPS``, both verify modes between them; the default run already serves
    every feature once); the rest, batch 1 included, are ``matrix`` (``make test-matrix``)."""
    cells = []
    for group in sorted(GROUPS):
        for adaptive in (False, True):
            for batch in (16, 1):
                in_ci = batch == 16 and CI_GROUPS.get(group) == adaptive
                mode = "adaptive" if adaptive else "full-block"
                mark = pytest.mark.slow if in_ci else pytest.mark.matrix
                cells.append(pytest.param(group, adaptive, batch, marks=mark, id=f"{group}-{mode}-{batch}"))
    return cells


@pytest.mark.parametrize("group,adaptive,batch", matrix_cells())
def test_feature_matrix(servers, smollm2, smollm2_drafter, smollm2_lora, group, adaptive, batch):
    """30 prompts per feature group at batch 1 and 16, full blocks and adaptive; plain
    decoding's answers are computed once per group (at batch 16) and shared."""
    spec = servers.get(spec_options(smollm2, smollm2_drafter, smollm2_lora, adaptive=adaptive))
    plain = servers.get(plain_options(smollm2, smollm2_lora))
    got, want = check(spec, plain, smollm2, GROUPS[group], n=N_PROMPTS, batch=batch, seed=11, want=_PLAIN_ANSWERS.get(group))
    _PLAIN_ANSWERS[group] = want
    if "logprobs" in group:
        print(f"{group}: largest output logprob gap spec vs plain: {max_logprob_gap(got, want):.2e}")


TREE = {"speculative-dflash-tree-topk": 2, "speculative-dflash-block-size": 8, "speculative-num-draft-tokens": 16}


@pytest.mark.slow
def test_feature_groups_on_a_verify_tree(servers, smollm2, smollm2_drafter, smollm2_lora):
    """A top-2 tree: grammars walk the tree, penalties and custom processors count each
    node's own path, log-probabilities follow the accepted path."""
    spec = servers.get({**spec_options(smollm2, smollm2_drafter, smollm2_lora, adaptive=True), **TREE})
    plain = servers.get(plain_options(smollm2, smollm2_lora))
    for group in sorted(GROUPS):
        check(spec, plain, smollm2, GROUPS[group], n=6, batch=6, seed=5)
