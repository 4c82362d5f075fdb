"""Our drafter vs the z-lab reference (PyPI dflash==0.1.0) on identical weights.

Tolerance: float32, max |logits difference| < 1e-4, identical argmax drafts. The
reference concatenates context and block K/V per call (batch 1); ours injects context
rows into a slot-addressed cache and attends in a padded batch, so this also checks
the cache layout, positions, masks and batching.
"""

from __future__ import annotations

import json

import pytest
import torch

from sglang_dflash.model.checkpoint import load_drafter, read_state_dict, save_drafter
from sglang_dflash.model.config import DFlashConfigError, capture_points
from tests.support.drafting import run_block

dflash_model = pytest.importorskip("dflash.model")
TOL = 1e-4
HIDDEN, FEATURES, VOCAB = 64, 3, 320


def reference_drafter(tmp_path, *, layers=2, sliding=None, seed=0, block_size=16):
    """A random reference DFlashDraftModel saved in the z-lab layout."""
    from safetensors.torch import save_file
    from transformers import Qwen3Config

    layer_types = ["full_attention"] * layers
    if sliding:
        layer_types[0] = "sliding_attention"
    cfg = Qwen3Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
        max_position_embeddings=1024, layer_types=layer_types,
        sliding_window=sliding, use_sliding_window=sliding is not None,
    )
    cfg.architectures = ["DFlashDraftModel"]
    cfg.num_target_layers = 8
    cfg.block_size = block_size
    cfg.dflash_config = {"target_layer_ids": [1, 3, 5], "mask_token_id": VOCAB - 1}
    torch.manual_seed(seed)
    ref = dflash_model.DFlashDraftModel(cfg).float().eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.15)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    return ref


def run_ours(drafter, requests, block):
    """requests: list of (features [ctx, K*H], noise [B, H]) -> hidden [bs, B, H]."""
    return run_block(drafter, requests, block)


def run_reference(ref, feats, noise):
    ctx, block = feats.shape[0], noise.shape[0]
    return ref(position_ids=torch.arange(ctx + block)[None], noise_embedding=noise[None], target_hidden=feats[None])[0]


@pytest.mark.parametrize("sliding", [None, 5])
@pytest.mark.parametrize("block", [4, 8, 16])
def test_matches_reference(tmp_path, block, sliding):
    ref = reference_drafter(tmp_path, sliding=sliding)
    ours = load_drafter(tmp_path, dtype=torch.float32)
    torch.manual_seed(1)
    lm_head = torch.randn(VOCAB, HIDDEN) * 0.3
    requests = [(torch.randn(ctx, FEATURES * HIDDEN), torch.randn(block, HIDDEN)) for ctx in (1, 7, 33)]
    with torch.no_grad():
        hidden = run_ours(ours, requests, block)
        for i, (feats, noise) in enumerate(requests):
            expected = run_reference(ref, feats, noise)
            assert (hidden[i] - expected).abs().max() < TOL
            ours_logits = ours.logits(hidden[i, 1:], lm_head)
            head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
            head.weight.copy_(lm_head)
            ref_logits = ref.compute_logits(expected[1:], head)
            assert (ours_logits - ref_logits).abs().max() < TOL
            assert torch.equal(ours_logits.argmax(-1), ref_logits.argmax(-1))


def test_sliding_window_changes_the_result(tmp_path):
    """Guard against a mask that is silently ignored: a window must matter."""
    ref = reference_drafter(tmp_path, sliding=3)
    ours = load_drafter(tmp_path, dtype=torch.float32)
    requests = [(torch.randn(20, FEATURES * HIDDEN), torch.randn(8, HIDDEN))]
    with torch.no_grad():
        windowed = run_ours(ours, requests, 8)[0]
        (tmp_path / "config.json").write_text(
            json.dumps({**json.loads((tmp_path / "config.json").read_text()), "use_sliding_window": False})
        )
        unwindowed = run_ours(load_drafter(tmp_path, dtype=torch.float32), requests, 8)[0]
        assert (windowed - run_reference(ref, *requests[0])).abs().max() < TOL
    assert (windowed - unwindowed).abs().max() > 1e-3


def test_checkpoint_round_trip_and_layout(tmp_path):
    (tmp_path / "ref").mkdir()
    reference_drafter(tmp_path / "ref")
    ours = load_drafter(tmp_path / "ref", dtype=torch.float32)
    save_drafter(ours, tmp_path / "ours")
    names = set(read_state_dict(tmp_path / "ours"))
    assert "fc.weight" in names and "hidden_norm.weight" in names and "layers.0.self_attn.q_norm.weight" in names
    assert not any(n.startswith(("model.", "embed_tokens", "lm_head")) for n in names)
    again = load_drafter(tmp_path / "ours", dtype=torch.float32)
    for (name, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    # And the reference reads what we write.
    ref = dflash_model.DFlashDraftModel.from_pretrained(str(tmp_path / "ours"), dtype=torch.float32)
    assert torch.equal(ref.fc.weight, ours.fc.weight)


def test_loader_names_bad_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    reference_drafter(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    bad = dict(weights)
    del bad["layers.1.mlp.up_proj.weight"]
    save_file(bad, str(tmp_path / "model.safetensors"))
    with pytest.raises(DFlashConfigError, match=r"missing \['layers.1.mlp.up_proj.weight'\]"):
        load_drafter(tmp_path)
    bad = dict(weights)
    bad["fc.weight"] = torch.zeros(HIDDEN, 2 * HIDDEN)
    save_file(bad, str(tmp_path / "model.safetensors"))
    with pytest.raises(DFlashConfigError, match="fc.weight takes 128 inputs but 3 target layers"):
        load_drafter(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(DFlashConfigError, match=r"has no \*.safetensors weights"):
        load_drafter(tmp_path)


def test_capture_points_index_layer_outputs(tiny_target):
    """HF's output_hidden_states[capture_points([i])[0]] is the output of decoder layer i."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_target, dtype=torch.float32).eval()
    outputs = {}
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_hook(lambda _m, _a, out, i=i: outputs.__setitem__(i, out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        states = model(torch.tensor([[5, 17, 99, 3]]), output_hidden_states=True).hidden_states
    last = len(model.model.layers) - 1
    for i in range(last):  # the last entry is post-norm in HF; DFlash never uses it
        (point,) = capture_points((i,))
        assert torch.equal(states[point], outputs[i])
