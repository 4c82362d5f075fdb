"""Greedy verification, fuzzed against plain-Python references.

* ``greedy_chain_acceptance`` on random blocks equals the per-request reference;
* ``chain_rejection_sample`` with one-hot targets (a greedy target) and any draft
  distribution / uniforms makes exactly the same decisions;
* end to end: a Markov target table, drafts that are partly right, stop tokens and a
  ``max_new_tokens`` budget; prefill emits the first token, then verify steps emit
  ``accepted + 1`` tokens each, truncated the way SGLang's scheduler does (up to and
  including the first stop token, at most the remaining budget). The emitted text must
  equal plain greedy decoding of the same table, for both acceptance functions.
"""

from __future__ import annotations

import random

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sglang_dflash.spec.accept import chain_rejection_sample, greedy_chain_acceptance, one_hot_probs
from tests.support.reference_spec import greedy_chain_reference, greedy_decode_reference, stop_truncate

FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def blocks(draw, min_n=1):
    """(draft_tokens [bs, N], target_top1 [bs, N], vocab): drafts copy the target's
    choice with a per-request probability, so every acceptance length shows up."""
    bs = draw(st.integers(1, 6))
    n = draw(st.integers(min_n, 9))
    vocab = draw(st.integers(2, 50))
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    top1 = [[rng.randrange(vocab) for _ in range(n)] for _ in range(bs)]
    drafts = []
    for r in range(bs):
        hit = rng.random()
        row = [rng.randrange(vocab)]
        for j in range(1, n):
            row.append(top1[r][j - 1] if rng.random() < hit else rng.randrange(vocab))
        drafts.append(row)
    return torch.tensor(drafts), torch.tensor(top1), vocab


def check_against_reference(result, drafts, top1):
    for r in range(drafts.shape[0]):
        accepted, emitted = greedy_chain_reference(drafts[r].tolist(), top1[r].tolist())
        assert int(result.num_accepted[r]) == accepted
        assert result.out_tokens[r, : accepted + 1].tolist() == emitted
        assert int(result.bonus[r]) == emitted[-1]
        assert int(result.commit_lens[r]) == accepted + 1


@FUZZ
@given(blocks())
def test_greedy_chain_acceptance_matches_reference(block):
    drafts, top1, _ = block
    check_against_reference(greedy_chain_acceptance(drafts, top1), drafts, top1)


@FUZZ
@given(blocks(min_n=2), st.data())  # block_size >= 2 is enforced by the config
def test_rejection_sampling_with_one_hot_target_is_greedy(block, data):
    drafts, top1, vocab = block
    bs, n = drafts.shape
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    kind = data.draw(st.sampled_from(["one-hot", "random", "sparse"]))
    if kind == "one-hot":  # a greedy drafter
        draft_probs = one_hot_probs(drafts[:, 1:], vocab)
    else:  # any distribution; "sparse" may even give the drafted token zero mass
        draft_probs = torch.rand(bs, n - 1, vocab, generator=gen)
        if kind == "sparse":
            draft_probs = draft_probs * (torch.rand(bs, n - 1, vocab, generator=gen) < 0.3)
            draft_probs[..., 0] += 1e-3
        draft_probs = draft_probs / draft_probs.sum(-1, keepdim=True)
    extreme = torch.tensor([0.0, 1.0 - 2**-24])  # both ends of torch.rand's range
    uniforms = torch.rand(bs, n - 1, generator=gen)
    residual_uniforms = torch.rand(bs, generator=gen)
    if data.draw(st.booleans()):
        uniforms = extreme[torch.randint(0, 2, (bs, n - 1), generator=gen)]
        residual_uniforms = extreme[torch.randint(0, 2, (bs,), generator=gen)]
    result = chain_rejection_sample(drafts, one_hot_probs(top1, vocab), draft_probs, uniforms, residual_uniforms)
    check_against_reference(result, drafts, top1)


# --------------------------------------------------------------------------- end to end


def accept_greedy(tokens, top1, vocab, gen):
    return greedy_chain_acceptance(tokens, top1)


def accept_rejection(tokens, top1, vocab, gen):
    """The sampled path fed a greedy target: one-hot target and draft distributions."""
    bs, n = tokens.shape
    return chain_rejection_sample(
        tokens,
        one_hot_probs(top1, vocab),
        one_hot_probs(tokens[:, 1:], vocab),
        torch.rand(bs, n - 1, generator=gen),
        torch.rand(bs, generator=gen),
    )


@st.composite
def decode_cases(draw):
    vocab = draw(st.integers(2, 40))
    return dict(
        vocab=vocab,
        bs=draw(st.integers(1, 5)),
        block=draw(st.integers(2, 8)),  # block_size >= 2 is enforced by the config
        max_new=draw(st.lists(st.integers(1, 30), min_size=5, max_size=5)),
        stop_ids=draw(st.sets(st.integers(0, vocab - 1), max_size=min(3, vocab - 1))),
        seed=draw(st.integers(0, 2**32 - 1)),
        acceptance=draw(st.sampled_from([accept_greedy, accept_rejection])),
    )


@FUZZ
@given(decode_cases())
def test_speculative_greedy_emits_plain_greedy_tokens(case):
    vocab, bs, n, stop_ids = case["vocab"], case["bs"], case["block"], case["stop_ids"]
    rng = random.Random(case["seed"])
    gen = torch.Generator().manual_seed(case["seed"] % 2**31)
    max_new = case["max_new"][:bs]
    positions = max(max_new) + n + 2
    # Markov target: argmax after a token at position t is table[t + 1][token].
    table = [[rng.randrange(vocab) for _ in range(vocab)] for _ in range(positions)]
    starts = [rng.randrange(vocab) for _ in range(bs)]
    hit_rate = [rng.random() for _ in range(bs)]

    def target(pos, prev):
        return table[min(pos, positions - 1)][prev]

    # Prefill: the first token is the target's own choice.
    outputs = [[target(1, s)] for s in starts]
    finished = [out[-1] in stop_ids or len(out) >= m for out, m in zip(outputs, max_new)]
    bonus = [out[-1] for out in outputs]
    steps = 0
    while not all(finished):
        steps += 1
        assert steps <= max(max_new), "every verify step must emit at least one token"
        block, top1 = [], []
        for r in range(bs):
            pos0 = len(outputs[r])  # node 0 (the bonus) sits at this position
            nodes = [bonus[r]]
            for j in range(1, n):  # the drafter follows its own chain, right or wrong
                right = target(pos0 + j, nodes[-1])
                nodes.append(right if rng.random() < hit_rate[r] else rng.randrange(vocab))
            block.append(nodes)
            top1.append([target(pos0 + j + 1, nodes[j]) for j in range(n)])
        result = case["acceptance"](torch.tensor(block), torch.tensor(top1), vocab, gen)
        for r in range(bs):
            if finished[r]:
                continue
            emitted = result.out_tokens[r, : int(result.num_accepted[r]) + 1].tolist()
            kept, done = stop_truncate(emitted, stop_ids, max_new[r] - len(outputs[r]))
            outputs[r].extend(kept)
            finished[r] = done
            bonus[r] = int(result.bonus[r])
            assert bonus[r] == emitted[-1]
    for r in range(bs):
        assert outputs[r] == greedy_decode_reference(target, starts[r], max_new[r], stop_ids), r
