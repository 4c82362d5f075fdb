"""DFlash2 drafters at the model level: config, checkpoint names, the block convolution,
the selector walk, the proposer, and parity with the z-lab reference (PyPI
``dflash==0.1.0``) on identical weights.

Tolerance against the reference: float32, max |hidden difference| < 1e-4, identical
greedy paths. (SGLang's own DFlash2DraftModel is compared in ``test_dflash2_oracle.py``.)
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch.nn import functional as F

from sglang_dflash.model.checkpoint import load_drafter, read_state_dict, save_drafter
from sglang_dflash.model.config import DFLASH, DFLASH2, DFlashConfig, DFlashConfigError
from sglang_dflash.model.convolution import BlockConvolution
from sglang_dflash.spec.proposer import BlockProposer
from sglang_dflash.options import PQ, TARGET_ONLY
from sglang_dflash.spec.sampling import RowSampling, SampledRows
from sglang_dflash.spec.selector import candidates, walk
from tests.support.drafting import run_block

TOL = 1e-4
HIDDEN, VOCAB = 64, 512


def dflash2_config(**overrides) -> dict:
    """The published DFlash2 shape, scaled down: two taps in groups of 16 channels,
    a rank-r selector over the top 16 candidates, block 8, bidirectional windowed layers."""
    raw = {
        "architectures": ["DFlash2DraftModel"],
        "model_type": "qwen3",
        "hidden_size": HIDDEN,
        "intermediate_size": 128,
        "num_hidden_layers": 5,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": VOCAB,
        "layer_types": ["sliding_attention"] * 5,
        "sliding_window": 2048,
        "use_sliding_window": True,
        "is_causal": False,
        "dflash_config": {
            "block_size": 8,
            "target_layer_ids": [1, 9, 17, 25, 33],
            "mask_token_id": 500,
            "conv_kernel_size": 2,
            "conv_group_size": 16,
            "selector_rank": 32,
            "selector_top_k": 16,
            "output_multiplier": 0.196,
            "final_logit_softcapping": 20.0,
        },
    }
    dflash = overrides.pop("dflash_config", {})
    raw.update(overrides)
    raw["dflash_config"] = {k: v for k, v in {**raw["dflash_config"], **dflash}.items() if v is not None}
    return raw


# ------------------------------------------------------------------------------ config


def test_reads_every_dflash2_field():
    cfg = DFlashConfig.from_dict(dflash2_config())
    assert cfg.family == DFLASH2 and cfg.has_selector and cfg.has_convolution
    assert (cfg.conv_kernel_size, cfg.conv_group_size, cfg.selector_rank, cfg.selector_top_k) == (2, 16, 32, 16)
    assert cfg.output_multiplier == 0.196 and cfg.final_logit_softcapping == 20.0 and cfg.block_size == 8
    # Bidirectional windowed layers: a key is visible iff |q - k| < 2048.
    assert all(not cfg.layer_is_causal(i) and cfg.layer_window(i) == 2048 for i in range(5))
    plain = DFlashConfig.from_dict(dflash2_config(dflash_config={"output_multiplier": None, "final_logit_softcapping": 0}))
    assert plain.output_multiplier == 1.0 and plain.final_logit_softcapping is None


@pytest.mark.parametrize(
    "architecture, family",
    [("DFlash2DraftModel", DFLASH2), ("MiniMaxDFlash2DraftModel", DFLASH2), ("DFlash2BeamDraftModel", DFLASH2),
     ("DFlashDraftModel", DFLASH), ("MuseGlimmerAssistantModel", DFLASH)],
)
def test_architecture_aliases_map_to_what_sglang_builds(architecture, family):
    """SGLang 0.5.23: MuseGlimmerAssistantModel is its DFlashDraftModel (convolutions if
    configured, never a selector); the other two aliases are DFlash2DraftModel."""
    cfg = DFlashConfig.from_dict(dflash2_config(architectures=[architecture]))
    assert cfg.family == family and cfg.architecture == architecture
    assert cfg.has_convolution  # SGLang's DFlashDraftModel builds the convolutions too
    assert cfg.has_selector == (family == DFLASH2)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(selector_rank=None, selector_top_k=None), "DFlash2DraftModel drafters need dflash_config.selector_rank and selector_top_k"),
        (dict(selector_top_k=None), "candidate selector needs dflash_config.selector_rank and selector_top_k together, got 32 and 0"),
        (dict(conv_group_size=None), "block convolution needs dflash_config.conv_kernel_size and conv_group_size together, got 2 and 0"),
        (dict(conv_group_size=24), "conv_group_size=24 does not divide hidden_size=64"),
        (dict(conv_kernel_size=-1), "conv_kernel_size must be a non-negative integer, got -1"),
        (dict(selector_rank="many"), "selector_rank must be a non-negative integer, got 'many'"),
        (dict(selector_top_k=2.5), "selector_top_k must be a non-negative integer, got 2.5"),
        (dict(selector_top_k=600), "selector_top_k=600 exceeds the vocabulary (512)"),
        (dict(output_multiplier=0), "output_multiplier must be > 0, got 0.0"),
        (dict(output_multiplier="x"), "output_multiplier must be a number, got 'x'"),
        (dict(final_logit_softcapping=[1]), "final_logit_softcapping must be a number"),
    ],
)
def test_bad_dflash2_fields_fail_in_one_line(change, message):
    with pytest.raises(DFlashConfigError) as info:
        DFlashConfig.from_dict(dflash2_config(dflash_config=change))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_dflash2_needs_vocab_size():
    raw = dflash2_config()
    del raw["vocab_size"]
    with pytest.raises(DFlashConfigError, match="missing 'vocab_size'"):
        DFlashConfig.from_dict(raw)


def test_selector_needs_the_targets_vocabulary():
    cfg = DFlashConfig.from_dict(dflash2_config())
    with pytest.raises(DFlashConfigError, match="vocab_size=512 does not match the target's vocab_size=600"):
        cfg.validate_target(hidden_size=HIDDEN, vocab_size=600, num_layers=36)


# ------------------------------------------------------------------------------ checkpoints


@pytest.fixture(scope="module")
def dflash2_dir(tmp_path_factory, tiny_target):
    from sglang_dflash.testing.devmodels.dflash2 import build_random_dflash2_drafter

    return build_random_dflash2_drafter(
        tmp_path_factory.mktemp("dflash2"), target=tiny_target, target_layer_ids=[1, 2],
        layer_types=["sliding_attention", "full_attention"], sliding_window=6,
        output_multiplier=0.5, final_logit_softcapping=5.0,
    )


def test_published_tensor_names_and_shapes(dflash2_dir):
    shapes = {k: tuple(v.shape) for k, v in read_state_dict(dflash2_dir).items()}
    assert shapes["layers.0.attention_conv.base_kernel"] == (2, 2, HIDDEN)
    assert shapes["layers.1.mlp_conv.kernel_projection.weight"] == (2 * 2 * HIDDEN // 16, HIDDEN)
    assert shapes["candidate_selector.hidden_projection.weight"] == (8, HIDDEN)
    # The codebooks carry no ".weight" (SGLang's names; it skips anything else silently).
    assert shapes["candidate_selector.predecessor_codebook"] == (VOCAB, 8)
    assert shapes["candidate_selector.successor_codebook"] == (VOCAB, 8)


def test_codebooks_load_in_either_spelling(tmp_path, dflash2_dir):
    from safetensors.torch import load_file, save_file

    shutil.copytree(dflash2_dir, tmp_path / "hf")
    weights = load_file(str(tmp_path / "hf" / "model.safetensors"))
    for name in ("predecessor_codebook", "successor_codebook"):
        weights[f"candidate_selector.{name}.weight"] = weights.pop(f"candidate_selector.{name}")
    save_file(weights, str(tmp_path / "hf" / "model.safetensors"))
    a, b = load_drafter(dflash2_dir), load_drafter(tmp_path / "hf")
    assert torch.equal(a.candidate_selector.successor_codebook, b.candidate_selector.successor_codebook)
    assert a.candidate_selector.successor_codebook.abs().sum() > 0


def test_dflash_architecture_ignores_selector_weights(tmp_path, dflash2_dir):
    """As SGLang does: a DFlashDraftModel (or Muse assistant) checkpoint builds no
    selector and skips its tensors, but keeps its convolutions."""
    shutil.copytree(dflash2_dir, tmp_path / "v1")
    raw = json.loads((tmp_path / "v1" / "config.json").read_text())
    (tmp_path / "v1" / "config.json").write_text(json.dumps({**raw, "architectures": ["MuseGlimmerAssistantModel"]}))
    drafter = load_drafter(tmp_path / "v1")
    assert drafter.candidate_selector is None and drafter.layers[0].attention_conv is not None


def test_checkpoint_round_trip(tmp_path, dflash2_dir):
    ours = load_drafter(dflash2_dir)
    save_drafter(ours, tmp_path)
    again = load_drafter(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["DFlash2DraftModel"]
    for (name, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------------------ convolution


def convolution_by_definition(conv: BlockConvolution, x, delta, side, block):
    """conv_s(x, C)[p, c] = sum_t (base[s, t, c] + C[p, t, c // group]) * x[p - t, c], per block."""
    out = torch.zeros_like(x)
    for row in range(x.shape[0]):
        p = row % block
        for t in range(conv.taps):
            if p - t < 0:
                continue
            for c in range(x.shape[1]):
                coefficient = conv.base_kernel[side, t, c] + delta[row, t, c // conv.group_size]
                out[row, c] += coefficient * x[row - t, c]
    return out


@pytest.mark.parametrize("taps, group, block", [(2, 16, 4), (3, 8, 4), (4, 32, 3)])
def test_convolution_matches_its_definition(taps, group, block):
    torch.manual_seed(0)
    conv = BlockConvolution(HIDDEN, taps, group)
    with torch.no_grad():
        conv.base_kernel.normal_()
        x = torch.randn(3 * block, HIDDEN)
        delta = torch.randn(3 * block, taps, HIDDEN // group)
        for side in (0, 1):
            got = conv.convolve(x, delta, side=side, block_size=block)
            assert (got - convolution_by_definition(conv, x, delta, side, block)).abs().max() < 1e-5


def test_convolution_stays_inside_each_block():
    torch.manual_seed(1)
    conv = BlockConvolution(HIDDEN, 2, 16)
    with torch.no_grad():
        conv.kernel_projection.weight.normal_()
        x = torch.randn(16, HIDDEN)
        y = x.clone()
        y[:8] += 1.0  # change block 0 only
        sublayer = torch.nn.Linear(HIDDEN, HIDDEN)
        a, b = conv.around(sublayer, x, 8), conv.around(sublayer, y, 8)
    assert torch.equal(a[8:], b[8:]) and not torch.equal(a[:8], b[:8])


# ------------------------------------------------------------------------------ the selector walk


def test_walk_greedy_follows_the_argmax_path():
    torch.manual_seed(2)
    scores = torch.randn(3, 5, 4, 4)
    index, q = walk(scores, greedy=torch.ones(3, dtype=torch.bool), temperature=torch.ones(3), uniforms=torch.rand(3, 5))
    for b in range(3):
        previous = 0
        for e in range(5):
            expected = int(scores[b, e, previous].argmax())
            assert int(index[b, e]) == expected
            previous = expected
    assert torch.equal(q, F.one_hot(index, 4).float())
    tied = torch.zeros(1, 2, 4, 4)
    assert torch.equal(walk(tied, greedy=torch.ones(1, dtype=torch.bool), temperature=torch.ones(1),
                            uniforms=torch.rand(1, 2))[0], torch.zeros(1, 2, dtype=torch.long))  # first maximum


def test_walk_samples_from_the_drawn_predecessors_row():
    torch.manual_seed(3)
    scores = torch.randn(2, 4, 5, 5)
    temperature = torch.tensor([0.5, 2.0])
    uniforms = torch.rand(2, 4)
    index, q = walk(scores, greedy=torch.zeros(2, dtype=torch.bool), temperature=temperature, uniforms=uniforms)
    for b in range(2):
        previous = 0
        for e in range(4):
            probs = torch.softmax(scores[b, e, previous] / temperature[b], dim=-1)
            assert torch.allclose(q[b, e], probs)
            assert int(index[b, e]) == min(int((uniforms[b, e] >= probs.cumsum(-1)).sum()), 4)
            previous = int(index[b, e])


# ------------------------------------------------------------------------------ drafter parity


def reference_inputs(seed: int, block: int, ctx_lens=(1, 7, 12)):
    gen = torch.Generator().manual_seed(seed)
    lm_head = torch.randn(VOCAB, HIDDEN, generator=gen) * 0.3
    requests = [(torch.randn(n, 2 * HIDDEN, generator=gen), torch.randn(block, HIDDEN, generator=gen)) for n in ctx_lens]
    return lm_head, requests


@pytest.mark.parametrize("block", [4, 8, 16])
def test_matches_zlab_reference(dflash2_dir, block):
    """Hidden states and the greedy path of the z-lab DFlash2DraftModel, which reads
    our checkpoint through its own name mapping."""
    dflash_model = pytest.importorskip("dflash.model")
    ref = dflash_model.DFlash2DraftModel.from_pretrained(str(dflash2_dir), dtype=torch.float32).eval()
    ours = load_drafter(dflash2_dir)
    lm_head, requests = reference_inputs(block, block)
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
    with torch.no_grad():
        head.weight.copy_(lm_head)
        hidden = run_block(ours, requests, block)
        for i, (feats, noise) in enumerate(requests):
            n = feats.shape[0]
            expected = ref(position_ids=torch.arange(n + block)[None], noise_embedding=noise[None], target_hidden=feats[None])[0]
            assert (hidden[i] - expected).abs().max() < TOL
            anchor = torch.tensor([7 + i])
            ref_path, _, _ = ref.propose(expected[None, 1:], anchor, head, 0.0)
            logits = ours.logits(hidden[i, 1:], lm_head)[None]
            ids, unary = candidates(logits, ours.candidate_selector.top_k)
            scores = ours.candidate_selector.lattice(ids, unary, hidden[i, None, 1:], anchor)
            index, _ = walk(scores, greedy=torch.ones(1, dtype=torch.bool), temperature=torch.ones(1), uniforms=torch.rand(1, block - 1))
            path = ids.gather(-1, index[..., None]).squeeze(-1)
            assert torch.equal(path, ref_path), (path, ref_path)
            assert not torch.equal(path, logits.argmax(-1)), "the selector never overrode the top-1: a vacuous check"


def test_identity_convolution_and_empty_selector_are_dflash(tmp_path, dflash2_dir):
    """With identity kernels, a zero projection and zero codebooks, a DFlash2 drafter is
    its DFlash backbone: same hidden states, and it drafts the top-1 logits."""
    lifted = load_drafter(dflash2_dir)
    with torch.no_grad():
        for layer in lifted.layers:
            for conv in (layer.attention_conv, layer.mlp_conv):
                conv.base_kernel.zero_()[:, 0] = 1.0
                conv.kernel_projection.weight.zero_()
        lifted.candidate_selector.predecessor_codebook.zero_()
    save_drafter(lifted, tmp_path / "lifted")
    raw = json.loads((tmp_path / "lifted" / "config.json").read_text())
    raw["architectures"] = ["DFlashDraftModel"]
    for key in ("conv_kernel_size", "conv_group_size", "selector_rank", "selector_top_k"):
        raw["dflash_config"].pop(key)
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "config.json").write_text(json.dumps(raw))
    state = {k: v for k, v in read_state_dict(tmp_path / "lifted").items() if "conv" not in k and "selector" not in k}
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "v1" / "model.safetensors"))
    v1 = load_drafter(tmp_path / "v1")
    lm_head, requests = reference_inputs(5, 8)
    proposals = []
    with torch.no_grad():
        a, b = run_block(lifted, requests, 8), run_block(v1, requests, 8)
        assert (a - b).abs().max() < 1e-5
        for drafter, hidden in ((lifted, a), (v1, b)):
            proposer = BlockProposer(drafter, None, embed=None, lm_head=lambda h, d=drafter: d.logits(h, lm_head),
                                     mask_token_id=3, block_size=8)
            proposer.draft_hidden = lambda bonus, plan, h=hidden: h[:, 1:]
            proposals.append(proposer.propose(torch.tensor([5, 6, 7]), None).tokens)
    assert torch.equal(proposals[0], proposals[1])


# ------------------------------------------------------------------------------ the proposer


def sampled_rows(rows, temperature, rule, block):
    n = len(rows)
    params = RowSampling(temperature=torch.tensor(temperature), top_k=torch.full((n,), 1 << 30),
                         top_p=torch.full((n,), 0.9), min_p=torch.zeros(n))
    return SampledRows(index=torch.tensor(rows), params=params, uniforms=torch.rand(n, 2 * block - 1), rule=rule)


def test_proposer_drafts_selector_paths(dflash2_dir):
    drafter = load_drafter(dflash2_dir)
    lm_head, requests = reference_inputs(9, 8)
    with torch.no_grad():
        hidden = run_block(drafter, requests, 8)
    proposer = BlockProposer(drafter, None, embed=None, lm_head=lambda h: drafter.logits(h, lm_head),
                             mask_token_id=3, block_size=8)
    proposer.draft_hidden = lambda bonus, plan: hidden[:, 1:]
    bonus = torch.tensor([5, 6, 7])
    torch.manual_seed(4)
    sampled = sampled_rows([0, 2], [0.8, 1.2], PQ, 8)
    with torch.no_grad():
        greedy = proposer.propose(bonus, None)
        mixed = proposer.propose(bonus, None, sampled=sampled)
        target_only = proposer.propose(bonus, None, sampled=sampled_rows([0, 2], [0.8, 1.2], TARGET_ONLY, 8))
        logits = drafter.logits(hidden[:, 1:].reshape(-1, HIDDEN), lm_head).view(3, 7, -1)
    ids, unary = candidates(logits, drafter.candidate_selector.top_k)
    scores = drafter.candidate_selector.lattice(ids, unary, hidden[:, 1:], bonus)
    index, q = walk(scores, greedy=torch.tensor([False, True, False]), temperature=torch.tensor([0.8, 1.0, 1.2]),
                    uniforms=torch.cat([sampled.draft_uniforms()[:1], torch.zeros(1, 7), sampled.draft_uniforms()[1:]]))
    assert greedy.draft_probs is None and greedy.logits is None and target_only.draft_probs is None
    assert torch.equal(greedy.tokens, target_only.tokens) and torch.equal(greedy.tokens[:, 0], bonus)
    assert torch.equal(mixed.tokens[:, 1:], ids.gather(-1, index[..., None]).squeeze(-1))
    assert torch.equal(mixed.tokens[1], greedy.tokens[1])
    assert not torch.equal(mixed.tokens, greedy.tokens)
    # q over the vocabulary: the walk's rows at the candidates, zero elsewhere.
    dense = mixed.draft_probs
    assert dense.shape == (2, 7, VOCAB)
    assert torch.allclose(dense.gather(-1, ids[[0, 2]]), q[[0, 2]]) and torch.allclose(dense.sum(-1), torch.ones(2, 7))
    truncated = mixed.truncated(4)
    assert truncated.tokens.shape == (3, 4) and truncated.draft_probs.shape == (2, 3, VOCAB)


# ------------------------------------------------------------------ serving decisions


def test_dflash2_draft_steps_are_not_graphed():
    from sglang_dflash.spec.ports import DraftGraphPlan
    from sglang_dflash.spec.worker import drafter_graph_plan

    graphs = DraftGraphPlan(batch_sizes=(1, 2, 4))
    dflash2, dflash = DFlashConfig.from_dict(dflash2_config()), DFlashConfig.from_dict(
        dflash2_config(architectures=["DFlashDraftModel"]))
    plan = drafter_graph_plan(dflash2, graphs)
    assert not plan.enabled and "DFlash2" in plan.reason
    assert drafter_graph_plan(dflash, graphs) is graphs


def test_speculator_refuses_a_tree_with_dflash2(dflash2_dir):
    from sglang_dflash.options import DFlashOptions
    from sglang_dflash.spec.worker import Speculator

    drafter = load_drafter(dflash2_dir)
    with pytest.raises(DFlashConfigError, match="tree verification .* is not supported with DFlash2 drafters"):
        Speculator(drafter=drafter, config=drafter.config, options=DFlashOptions(tree_topk=2), block_size=8,
                   verify_width=16, mask_token_id=3, device="cpu")


def test_muse_glimmer_targets_refused_at_launch(monkeypatch):
    """SGLang maps DFlash layer ids for Muse Glimmer targets per drafter architecture;
    until that is followed, such a launch fails in one line instead of at start-up."""
    from types import SimpleNamespace

    import sglang.srt.utils.hf_transformers_utils as hf_utils

    from sglang_dflash.host.server_args import _validate_against_target

    target = SimpleNamespace(model_type="muse_glimmer", hidden_size=HIDDEN, vocab_size=VOCAB, num_hidden_layers=36)
    monkeypatch.setattr(hf_utils, "get_config", lambda *a, **k: target)
    cfg = SimpleNamespace(model_path="muse", trust_remote_code=False, revision=None)
    with pytest.raises(ValueError, match="Muse Glimmer targets are not supported by sglang-dflash yet"):
        _validate_against_target(cfg, DFlashConfig.from_dict(dflash2_config()))
    target.model_type = "qwen3"
    _validate_against_target(cfg, DFlashConfig.from_dict(dflash2_config()))
