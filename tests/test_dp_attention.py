"""DP attention (``--enable-dp-attention``), the parts testable without GPUs.

SGLang runs DP attention on CUDA only, so the end-to-end case is a GPU-lane script
(``bench/gpu/parallel_e2e.sh``). Here our host worker runs over the fake SGLang target
(``tests/support/fake_host.py``) with a DP-attention layout, and each test pins one
thing the worker must do for SGLang's DP rounds:

* an idle DP rank still runs the target's forward (it has cross-DP collectives), as an
  empty extend in a prefill round and as an empty verify of its peers' width in a
  decode round, and never drafts or touches prefill fields it does not have;
* every DP rank verifies the same width (SGLang scales cross-DP token counts by each
  rank's own nodes per request), so the adaptive length is pinned;
* a verify runs eagerly when some DP rank is idle or extends, decided from the
  round's global counts, so all ranks decide alike;
* drafter collectives stay inside one DP rank's attention-TP group, and launches
  SGLang's own DFLASH refuses under DP attention are refused too.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sglang_dflash.host.parallel import ParallelLayout, check_vocab_parallel
from sglang_dflash.model.config import DFlashConfigError
from tests.support.fake_host import make_fake_host

DP2 = ParallelLayout(tp_size=2, attn_tp_size=1, dp_size=2, dp_attention=True)


def idle_batch(*, extend_round: bool, global_tokens=(3, 0)):
    """The IDLE batch SGLang's scheduler gives a DP rank with no requests this round
    (``prepare_for_idle``: empty tensors, no prefix/extend lengths, no spec input)."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    empty = torch.empty(0, dtype=torch.int64)
    return SimpleNamespace(
        reqs=[], forward_mode=ForwardMode.IDLE, is_extend_in_batch=extend_round, spec_info=None,
        input_ids=empty, out_cache_loc=empty, seq_lens=empty, seq_lens_cpu=empty, seq_lens_sum=0,
        req_pool_indices=empty, prefix_lens=None, extend_lens=None, global_num_tokens=list(global_tokens),
        can_run_decode_cuda_graph=True,
    )


@pytest.fixture
def dp_host(monkeypatch, tiny_drafter):
    host = make_fake_host(monkeypatch, tiny_drafter, layout=DP2)
    host.start(target_graphs=True)
    return host


def forbid_drafting(monkeypatch, host):
    def draft(*args, **kwargs):
        raise AssertionError("an idle DP rank must not draft")

    monkeypatch.setattr(host.worker.speculator.proposer, "propose", draft)


def test_idle_rank_in_a_decode_round_runs_an_empty_verify_of_the_pinned_width(monkeypatch, dp_host):
    forbid_drafting(monkeypatch, dp_host)
    out = dp_host.worker.forward_batch_generation(idle_batch(extend_round=False))
    [forward] = dp_host.target_worker.forwards
    assert forward.forward_mode.is_idle() and forward.input_ids.numel() == 0
    assert forward.spec_info.draft_token_num == 8  # the block: what every active rank verifies
    assert forward.spec_info.num_tokens_per_req == 8
    assert forward.can_run_decode_cuda_graph is False
    assert out.next_token_ids.numel() == 0 and out.accept_lens.numel() == 0


def test_idle_rank_in_a_prefill_round_runs_an_empty_extend(monkeypatch, dp_host):
    """Not the prefill path: an IDLE batch has no prefix/extend lengths (the old
    dispatch on ``is_extend_in_batch`` sent it to prefill, which crashed on them)."""
    forbid_drafting(monkeypatch, dp_host)
    out = dp_host.worker.forward_batch_generation(idle_batch(extend_round=True))
    [forward] = dp_host.target_worker.forwards
    assert forward.forward_mode.is_idle() and forward.spec_info is None
    assert out.next_draft_input.bonus_tokens.numel() == 0


def test_idle_rank_without_dp_attention_runs_nothing(monkeypatch, tiny_drafter):
    host = make_fake_host(monkeypatch, tiny_drafter)
    host.start(target_graphs=True)
    host.worker.forward_batch_generation(idle_batch(extend_round=False))
    assert host.target_worker.forwards == []


@pytest.mark.parametrize("global_tokens, graphs", [((3, 0), False), ((3, 2), True)])
def test_active_rank_verifies_eagerly_while_a_peer_is_idle(dp_host, global_tokens, graphs):
    batch = dp_host.decode_batch([20, 33, 7])
    batch.global_num_tokens = list(global_tokens)
    batch.can_run_decode_cuda_graph = True
    dp_host.worker.forward_batch_generation(batch)
    assert dp_host.target_worker.forwards[-1].can_run_decode_cuda_graph is graphs


def test_every_step_verifies_the_pinned_width(dp_host):
    """Adaptive is on by default; under DP attention the policy never varies, even
    when its cost table says a shorter verify (or none) would pay."""
    from sglang_dflash.spec.adaptive import batch_bucket

    policy = dp_host.worker.speculator.policy
    for length in policy.buckets:
        policy.cost.cells[(batch_bucket(2), length)] = float(length) ** 2
    for _ in range(3):
        dp_host.worker.forward_batch_generation(dp_host.decode_batch([20, 33]))
        assert dp_host.target_worker.forwards[-1].spec_info.draft_token_num == 8
    assert dp_host.worker.describe()["options"]["adaptive"] is False


def vocab_layer(shards: int):
    return SimpleNamespace(tp_group=object(), tp_size=shards, num_embeddings=512, org_vocab_size=512)


@pytest.mark.parametrize("head, embed, refused", [(2, 1, "lm_head"), (1, 2, "input embedding"), (1, 1, None)])
def test_drafter_collectives_stay_inside_one_dp_rank(head, embed, refused):
    """A layer split past one DP rank's attention-TP group would hang idle ranks."""
    layout = ParallelLayout(tp_size=2, attn_tp_size=1, dp_size=2, dp_attention=True, head_group_size=head,
                            embed_group_size=embed)
    model = SimpleNamespace(lm_head=vocab_layer(head))
    if refused is None:
        check_vocab_parallel(model, layout)
        return
    with pytest.raises(DFlashConfigError, match=f"target's {refused} is split over 2 ranks"):
        check_vocab_parallel(model, layout)


def test_added_vocabulary_refused_under_tp():
    head = SimpleNamespace(tp_group=object(), tp_size=2, num_embeddings=520, org_vocab_size=512)
    with pytest.raises(DFlashConfigError, match="added \\(LoRA\\) vocabulary"):
        check_vocab_parallel(SimpleNamespace(lm_head=head), ParallelLayout(tp_size=2, head_group_size=2))


@pytest.mark.parametrize(
    "extra, message",
    [
        ({}, "needs CUDA (as SGLang's own DFLASH does)"),
        ({"device": "cuda"}, "needs --enable-dp-lm-head"),
        ({"device": "cuda", "enable-dp-lm-head": True, "speculative-dflash-tree-topk": 2,
          "speculative-num-draft-tokens": 16, "speculative-dflash-block-size": 8}, "tree-topk > 1 cannot be combined"),
        ({"device": "cuda", "enable-dp-lm-head": True, "speculative-dflash-verify-len": 1}, "verify-len 1 cannot be"),
    ],
)
def test_dp_attention_launch_refusals(tiny_target, tiny_drafter, extra, message):
    from tests.test_plugin import dflash_options, resolution_fails

    options = dflash_options(tiny_target, tiny_drafter, **{"enable-dp-attention": True, "tp-size": 2, "dp-size": 2})
    assert message in resolution_fails({**options, **extra})
