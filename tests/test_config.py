"""Checkpoint config parsing: field precedence, defaults, and one-line refusals."""

from __future__ import annotations

import json

import pytest

from sglang_dflash.model.config import (
    DFlashConfig,
    DFlashConfigError,
    capture_points,
    default_target_layer_ids,
)


def zlab_config(**overrides) -> dict:
    raw = {
        "architectures": ["DFlashDraftModel"],
        "model_type": "qwen3",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "vocab_size": 512,
        "block_size": 16,
        "num_target_layers": 36,
        "dflash_config": {"target_layer_ids": [1, 9, 17, 25, 33], "mask_token_id": 500},
    }
    raw.update(overrides)
    return raw


def test_reads_zlab_fields():
    cfg = DFlashConfig.from_dict(zlab_config())
    assert cfg.target_layer_ids == (1, 9, 17, 25, 33)
    assert cfg.block_size == 16 and cfg.mask_token_id == 500 and cfg.num_features == 5
    assert cfg.layer_types == ("full_attention", "full_attention")
    assert not cfg.layer_is_causal(0) and cfg.layer_window(0) is None


def test_dflash_config_wins_over_top_level():
    raw = zlab_config(mask_token_id=7)
    raw["dflash_config"]["block_size"] = 8
    cfg = DFlashConfig.from_dict(raw)
    assert cfg.block_size == 8 and cfg.mask_token_id == 500


def test_top_level_fallbacks():
    raw = zlab_config(mask_token_id=7)
    del raw["dflash_config"]["mask_token_id"]
    cfg = DFlashConfig.from_dict(raw)
    assert cfg.mask_token_id == 7 and cfg.block_size == 16


@pytest.mark.parametrize(
    "num_target_layers, num_draft_layers, expected",
    [(36, 5, (1, 9, 17, 25, 33)), (64, 5, (1, 16, 31, 46, 61)), (36, 1, (18,)), (8, 2, (1, 5))],
)
def test_default_layer_rule(num_target_layers, num_draft_layers, expected):
    assert default_target_layer_ids(num_target_layers, num_draft_layers) == expected


def test_default_layer_ids_when_absent():
    raw = zlab_config(num_hidden_layers=5)
    del raw["dflash_config"]["target_layer_ids"]
    assert DFlashConfig.from_dict(raw).target_layer_ids == (1, 9, 17, 25, 33)
    # The runtime target's depth wins over the trained num_target_layers.
    assert DFlashConfig.from_dict(raw, target_num_layers=64).target_layer_ids == (1, 16, 31, 46, 61)


def test_capture_points_are_layer_outputs():
    """DFlash id i (output of layer i) is captured entering layer i+1; the same index
    addresses HF's output_hidden_states, whose entry 0 is the embedding output."""
    assert capture_points((1, 9, 33)) == [2, 10, 34]


def test_sliding_layers_follow_hf_semantics():
    raw = zlab_config(layer_types=["sliding_attention", "full_attention"], sliding_window=128, use_sliding_window=True)
    cfg = DFlashConfig.from_dict(raw)
    assert cfg.layer_is_causal(0) and cfg.layer_window(0) == 128
    assert not cfg.layer_is_causal(1) and cfg.layer_window(1) is None
    # Without use_sliding_window transformers drops the window: sliding layers are only causal.
    cfg = DFlashConfig.from_dict(zlab_config(layer_types=["sliding_attention"] * 2, sliding_window=128))
    assert cfg.layer_is_causal(0) and cfg.layer_window(0) is None
    # An explicit is_causal applies to every layer.
    assert DFlashConfig.from_dict(zlab_config(is_causal=True)).layer_is_causal(1)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(architectures=["DFlash2DraftModel"]), "DFlash2DraftModel drafters need dflash_config.selector_rank"),
        (dict(architectures=["DFlashLagunaForCausalLM"]), "Laguna DFlash drafters are not supported"),
        (dict(architectures=["LlamaForCausalLM"]), "unknown drafter architecture 'LlamaForCausalLM'"),
        (dict(architectures=[]), "has no 'architectures'"),
        (dict(dflash_config=None, block_size=None), "has no dflash_config"),
        (dict(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
        (dict(num_hidden_layers=None), "missing 'num_hidden_layers'"),
        (dict(layer_types=["full_attention"]), "layer_types has 1 entries for 2 layers"),
        (dict(layer_types=["linear_attention"] * 2), "unsupported entries ['linear_attention']"),
        (dict(num_attention_heads=4, num_key_value_heads=3), "not a multiple of num_key_value_heads=3"),
    ],
)
def test_bad_configs_fail_in_one_line(change, message):
    with pytest.raises(DFlashConfigError) as info:
        DFlashConfig.from_dict(zlab_config(**change))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_no_layer_ids_and_no_depth():
    raw = zlab_config(num_target_layers=None)
    del raw["dflash_config"]["target_layer_ids"]
    with pytest.raises(DFlashConfigError, match="cannot tell which target layers to capture"):
        DFlashConfig.from_dict(raw)


@pytest.mark.parametrize(
    "target, message",
    [
        (dict(hidden_size=128, vocab_size=512, num_layers=36), "does not match the target's hidden_size=128"),
        (dict(hidden_size=64, vocab_size=1024, num_layers=36), "vocab_size=512 does not match the target's vocab_size=1024"),
        (dict(hidden_size=64, vocab_size=512, num_layers=20), "[25, 33] are out of range for a 20-layer target"),
    ],
)
def test_target_mismatch(target, message):
    with pytest.raises(DFlashConfigError) as info:
        DFlashConfig.from_dict(zlab_config()).validate_target(**target)
    assert message in str(info.value)


def test_mask_token_outside_vocab():
    raw = zlab_config(vocab_size=None)
    raw["dflash_config"]["mask_token_id"] = 600
    with pytest.raises(DFlashConfigError, match="mask_token_id=600 is outside the target vocabulary"):
        DFlashConfig.from_dict(raw).validate_target(hidden_size=64, vocab_size=512, num_layers=36)


def test_missing_files(tmp_path):
    with pytest.raises(DFlashConfigError, match="has no config.json"):
        DFlashConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(DFlashConfigError, match="is not valid JSON"):
        DFlashConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(zlab_config()))
    assert DFlashConfig.from_pretrained(tmp_path).block_size == 16


@pytest.mark.parametrize(
    "ids, order",
    [((1, 9, 17), None), ((1, 1), [0, 0]), ((9, 1, 5), [2, 0, 1]), ((3, 1, 3), [1, 0, 1])],
)
def test_captured_feature_order(ids, order):
    """SGLang captures each layer once, ascending; DFlash wants the listed order."""
    raw = zlab_config()
    raw["dflash_config"]["target_layer_ids"] = list(ids)
    cfg = DFlashConfig.from_dict(raw)
    assert cfg.captured_feature_order() == order
    captured = sorted(set(ids))
    rebuilt = [captured[j] for j in (order or range(len(captured)))]
    assert rebuilt == list(ids)


def test_missing_local_path():
    with pytest.raises(DFlashConfigError, match="'/no/such/drafter' does not exist"):
        DFlashConfig.from_pretrained("/no/such/drafter")


def test_hub_id_offline(monkeypatch):
    """A hub repo id is fetched with huggingface_hub; offline and uncached, it fails in one line."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DFlashConfigError, match="cannot fetch DFlash drafter 'no-such-org/no-such-drafter' from the hub"):
        DFlashConfig.from_pretrained("no-such-org/no-such-drafter")
