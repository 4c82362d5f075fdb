"""Our pipeline against two independent implementations on the same weights.

* SGLang 0.5.23's own DFLASH (``SGLANG_DFLASH_BACKEND=upstream``, its CPU refusals
  lifted): same greedy outputs and, request by request, the same verify steps and the
  same histogram of accepted drafts -- which only happens if both draft the same
  tokens at every accepted position.
* The z-lab reference (PyPI ``dflash``: HF target + ``dflash_generate``): our accepted
  drafts per step, read from ``meta_info``, equal its acceptance lengths. This covers
  the whole SGLang integration: the capture offset in SGLang's target model, KV
  injection at the right slots and positions, the block and its mask.

Both use a drafter distilled from the tiny target, so drafts are really accepted, and
a fixed block (no adaptive verify length) to match the references' step structure;
SGLang's own DFLASH is also compared on a distilled DFlash2 drafter.
"""

from __future__ import annotations

import time

import pytest
import torch

from tests.support.configs import FULL_BLOCKS, tiny_full_blocks, tiny_spec
from tests.support.prompts import token_prompts

GREEDY = {"temperature": 0.0, "max_new_tokens": 48, "ignore_eos": True}


UPSTREAM = {"SGLANG_DFLASH_BACKEND": "upstream"}


def assert_same_drafts_as_upstream(servers, options: dict, prompts) -> int:
    """Ours (whole blocks) and upstream on the same ``options``: same tokens and, request
    by request, the same verify steps and histogram of accepted drafts. Returns the
    drafts accepted."""
    ours = servers.get({**options, **FULL_BLOCKS})
    upstream = servers.get(options, env=UPSTREAM)
    assert ours.dflash_state()["backend"] == "sglang-dflash"
    assert upstream.dflash_state()["backend"] == "upstream"
    got, want = ours.generate(prompts, GREEDY), upstream.generate(prompts, GREEDY)
    accepted = 0
    for a, b in zip(got, want):
        assert a["output_ids"] == b["output_ids"]
        for key in ("spec_verify_ct", "spec_num_correct_drafts", "spec_correct_drafts_histogram"):
            assert a["meta_info"].get(key) == b["meta_info"].get(key), (key, a["meta_info"], b["meta_info"])
        accepted += a["meta_info"].get("spec_num_correct_drafts", 0)
    assert accepted >= len(prompts), f"only {accepted} drafts accepted: the comparison would be vacuous"
    return accepted


def test_same_drafts_as_upstream(servers, tiny_target, trained_tiny_drafter):
    assert_same_drafts_as_upstream(servers, tiny_spec(tiny_target, trained_tiny_drafter),
                                   token_prompts(16, vocab_size=512, seed=21))


@pytest.mark.slow
def test_dflash2_drafter_drafts_the_same_as_upstream(servers, tiny_target, trained_tiny_dflash2_drafter):
    """A DFlash2 drafter (block convolutions, candidate selector): SGLang's own DFLASH
    walks the same greedy selector paths, so every request's verify steps and accepted
    histogram are equal."""
    accepted = assert_same_drafts_as_upstream(servers, tiny_spec(tiny_target, trained_tiny_dflash2_drafter),
                                              token_prompts(16, vocab_size=512, seed=21))
    print(f"\nDFlash2 drafter: {accepted} drafts accepted over 16 requests x 48 tokens, as upstream")


@pytest.mark.slow
def test_shipped_smollm2_drafter_drafts_the_same_in_upstream(servers, smollm2, smollm2_drafter):
    """The shipped checkpoint loads in SGLang's own DFLASH, which drafts what ours drafts."""
    from sglang_dflash.train.prompts import build_prompts

    options = {"model-path": smollm2, "speculative-algorithm": "DFLASH", "speculative-draft-model-path": smollm2_drafter,
               "speculative-num-draft-tokens": 8, "page-size": 16}
    assert_same_drafts_as_upstream(servers, options, build_prompts(8, seed=3))


def test_acceptance_matches_zlab_reference(servers, tiny_target, trained_tiny_drafter, monkeypatch):
    dflash_model = pytest.importorskip("dflash.model")
    monkeypatch.setattr(dflash_model, "_cuda_time", time.perf_counter)  # the reference times with CUDA syncs
    from transformers import AutoModelForCausalLM

    target = AutoModelForCausalLM.from_pretrained(tiny_target, dtype=torch.float32).eval()
    reference = dflash_model.DFlashDraftModel.from_pretrained(str(trained_tiny_drafter), dtype=torch.float32).eval()
    ours = servers.get(tiny_full_blocks(tiny_target, trained_tiny_drafter))
    # Prompts on which the reference accepts whole blocks (7 drafts) at some steps, not
    # only single drafts: otherwise a pipeline that drafts fewer tokens per block, or
    # drafts deep positions wrongly, would match step for step.
    prompts = token_prompts(6, vocab_size=512, seed=67)
    accepted, deepest = 0, 0
    for prompt in prompts:
        out = ours.generate_one(prompt, GREEDY)
        stats = dflash_model.dflash_generate(
            reference, target, torch.tensor([prompt]), max_new_tokens=48, stop_token_ids=None,
            block_size=8, return_stats=True,
        )
        ref_tokens = stats.output_ids[0, len(prompt):].tolist()
        assert out["output_ids"] == ref_tokens
        ours_steps = out["meta_info"]["spec_dflash_accepted_per_step"]
        ref_steps = [n - 1 for n in stats.acceptance_lengths]
        # Step for step, as many steps. The last step commits the tokens left: the
        # reference counts them minus one (its bonus), ours counts a step cut before its
        # bonus as all drafts.
        assert len(ours_steps) == len(ref_steps) and ours_steps[:-1] == ref_steps[:-1], (ours_steps, ref_steps)
        assert ours_steps[-1] - ref_steps[-1] in (0, 1), (ours_steps, ref_steps)
        accepted += sum(ours_steps)
        deepest = max(deepest, *ref_steps[:-1])
    assert accepted >= len(prompts), f"only {accepted} drafts accepted: the comparison would be vacuous"
    assert deepest == 7, f"the reference never accepted a whole block (deepest {deepest}): deep drafts went unchecked"
