"""DFlash2 drafters end to end through our worker, on the CPU lane (float32).

A DFlash2 drafter distilled from the tiny target (``trained_tiny_dflash2_drafter``:
two-tap block convolutions, a rank-8 selector over the top 8 candidates) serves with
full blocks of 8:

* greedy output is token-for-token non-speculative SGLang at batch 16 (and 1, slow),
  with stop tokens landing mid-block, and the KV pool drains; blocks really commit
  several tokens;
* sampled requests draft sampled selector paths and accept some (their losslessness is
  the chi-square in ``test_rejection.py``);
* the server reports the drafter's family, selector and convolution, and why its draft
  steps are not graph-captured.

Drafts equal to SGLang's own DFLASH on the same checkpoint: ``test_oracles.py`` (slow).
"""

from __future__ import annotations

import json

import pytest

from sglang_dflash.model.checkpoint import load_drafter
from tests.support.configs import tiny_plain
from tests.support.equivalence import assert_pool_drained, assert_same_tokens, pool_baseline, request_params, run
from tests.support.prompts import token_prompts


def test_distilled_dflash2_drafter(trained_tiny_dflash2_drafter):
    """The DFlash2 drafter the engine tests serve: trained by this trainer, its held-out
    greedy loop (which drafts through the selector) commits several tokens at times."""
    drafter = load_drafter(trained_tiny_dflash2_drafter)
    assert drafter.config.has_selector and drafter.layers[0].attention_conv is not None
    report = json.loads((trained_tiny_dflash2_drafter / "train_report.json").read_text())
    assert report["heldout_tau"] > 1.2 and sum(report["heldout_accept_histogram"][2:]) > 0, report


def dflash2_spec(target, drafter) -> dict:
    """The same options as the upstream comparison in test_oracles (page 1), so the
    session's pool starts this server once."""
    return {"model-path": target, "speculative-algorithm": "DFLASH", "speculative-draft-model-path": drafter,
            "speculative-num-draft-tokens": 8, "page-size": 1, "no-speculative-dflash-adaptive": True}


@pytest.mark.parametrize("batch", [16, pytest.param(1, marks=pytest.mark.slow)])
def test_greedy_output_is_no_spec(servers, tiny_target, trained_tiny_dflash2_drafter, batch):
    spec = servers.get(dflash2_spec(tiny_target, trained_tiny_dflash2_drafter))
    plain = servers.get(tiny_plain(tiny_target))
    prompts = token_prompts(32 if batch > 1 else 12, vocab_size=512, seed=31)
    start = pool_baseline(spec)
    stop = [frequent(plain, prompts)]
    params = [request_params(i, max_new_tokens=48, stop_token_ids=stop if i % 3 == 0 else None)
              for i in range(len(prompts))]
    got, want = run(spec, prompts, params, batch=batch), run(plain, prompts, params, batch=batch)
    assert_same_tokens(got, want, prompts)
    accepted = [n for o in got for n in o["meta_info"].get("spec_dflash_accepted_per_step", [])]
    assert sum(accepted) >= len(prompts) and max(accepted) >= 3, accepted  # multi-token commits happened
    assert_pool_drained(spec, start)


def frequent(plain, prompts) -> int:
    """A token the plain model emits often: a stop token that lands mid-block."""
    outs = run(plain, prompts[:8], [request_params(i) for i in range(8)], batch=8)
    counts: dict[int, int] = {}
    for o in outs:
        for t in o["output_ids"][3:]:
            counts[t] = counts.get(t, 0) + 1
    return max(counts, key=counts.get)


def test_sampled_requests_draft_and_accept(servers, tiny_target, trained_tiny_dflash2_drafter):
    spec = servers.get(dflash2_spec(tiny_target, trained_tiny_dflash2_drafter))
    prompts = token_prompts(8, vocab_size=512, seed=32)
    params = [{"temperature": 0.8, "top_p": 0.95, "max_new_tokens": 48, "ignore_eos": True} for _ in prompts]
    outs = run(spec, prompts, params, batch=8)
    assert all(len(o["output_ids"]) == 48 for o in outs)
    assert sum(sum(o["meta_info"].get("spec_dflash_accepted_per_step", [])) for o in outs) > 0


def test_server_describes_the_dflash2_drafter(servers, tiny_target, trained_tiny_dflash2_drafter):
    state = servers.get(dflash2_spec(tiny_target, trained_tiny_dflash2_drafter)).dflash_state()
    drafter = state["drafter"]
    assert drafter["architecture"] == "DFlash2DraftModel" and drafter["family"] == "dflash2"
    assert drafter["selector"] == {"top_k": 8, "rank": 8}
    assert drafter["convolution"] == {"kernel_size": 2, "group_size": 16}
    assert state["drafter_graphs"]["batch_sizes"] == [] and state["drafter_graphs"]["reason"]
