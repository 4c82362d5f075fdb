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
a fixed block (no adaptive verify length) to match the references' step structure.
"""

from __future__ import annotations

import time

import pytest
import torch

from tests.support.configs import tiny_spec
from tests.support.prompts import token_prompts

GREEDY = {"temperature": 0.0, "max_new_tokens": 48, "ignore_eos": True}


def fixed_block(server_opts: dict) -> dict:
    return {**server_opts, "no-speculative-dflash-adaptive": True}


def assert_same_drafts_as_upstream(servers, target, drafter, prompts, *, page: int) -> int:
    """Ours (full blocks) and upstream: same tokens and, request by request, the same
    verify steps and histogram of accepted drafts. Returns the drafts accepted."""
    common = {"model-path": target, "speculative-algorithm": "DFLASH", "speculative-draft-model-path": drafter,
              "speculative-num-draft-tokens": 8, "page-size": page}
    ours = servers.get(fixed_block(common))
    upstream = servers.get(common, env={"SGLANG_DFLASH_BACKEND": "upstream"})
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
    assert_same_drafts_as_upstream(servers, tiny_target, trained_tiny_drafter,
                                   token_prompts(16, vocab_size=512, seed=21), page=1)


@pytest.mark.slow
def test_shipped_smollm2_drafter_drafts_the_same_in_upstream(servers, smollm2, smollm2_drafter):
    """The shipped checkpoint loads in SGLang's own DFLASH, which drafts what ours drafts."""
    from sglang_dflash.train_prompts import build_prompts

    assert_same_drafts_as_upstream(servers, smollm2, smollm2_drafter, build_prompts(8, seed=3), page=16)


def test_acceptance_matches_zlab_reference(servers, tiny_target, trained_tiny_drafter, monkeypatch):
    dflash_model = pytest.importorskip("dflash.model")
    monkeypatch.setattr(dflash_model, "_cuda_time", time.perf_counter)  # the reference times with CUDA syncs
    from transformers import AutoModelForCausalLM

    target = AutoModelForCausalLM.from_pretrained(tiny_target, dtype=torch.float32).eval()
    reference = dflash_model.DFlashDraftModel.from_pretrained(str(trained_tiny_drafter), dtype=torch.float32).eval()
    ours = servers.get(fixed_block(tiny_spec(tiny_target, trained_tiny_drafter)))
    prompts = token_prompts(6, vocab_size=512, seed=5)
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
        # The last step may be cut by max_new_tokens differently; compare all full steps.
        assert ours_steps[:-1] == ref_steps[: len(ours_steps) - 1], (ours_steps, ref_steps)
