"""Host pieces every target family needs, at the model level (no server): the drafter's
borrowed embedding is the raw table, the drafter KV cache is sized from the full KV
pool, and the features captured are the residual stream the drafter was trained on."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sglang_dflash.host.capture import install_capture
from sglang_dflash.host.target import kv_slot_count, raw_embedding
from sglang_dflash.model.config import DFlashConfigError


class ScaledEmbedding(nn.Embedding):
    """Gemma's embedding module: the table times sqrt(hidden)."""

    def __init__(self, rows: int, dim: int) -> None:
        super().__init__(rows, dim)
        self.embed_scale = dim**0.5

    def forward(self, ids):
        return super().forward(ids) * self.embed_scale


def test_raw_embedding_bypasses_the_modules_own_scale():
    module = ScaledEmbedding(40, 16)
    ids = torch.tensor([3, 0, 39, 3])
    torch.testing.assert_close(raw_embedding(module, ids, vocab_size=40), module.weight[ids], rtol=0, atol=0)
    # A vocabulary-parallel shard (fewer rows than the vocabulary): the module's
    # gathered output, unscaled.
    shard = ScaledEmbedding(20, 16)
    torch.testing.assert_close(raw_embedding(shard, ids.clamp(max=19), vocab_size=40), shard.weight[ids.clamp(max=19)])


class _Pool:
    def __init__(self, size: int, page_size: int, full=None) -> None:
        self.size, self.page_size = size, page_size
        if full is not None:
            self.full_kv_pool = full

    def get_key_buffer(self, layer_id):  # layer 0 of a hybrid pool: never the count to use
        raise AssertionError("sized from layer 0")


@pytest.mark.parametrize("page", [1, 16])
def test_drafter_kv_rows_match_the_full_pool(page):
    plain = _Pool(8192, page)
    assert kv_slot_count(plain) == 8192 + page
    # SWAKVPool / HybridLinearKVPool: layer 0 is a smaller SWA pool or has no KV at all.
    hybrid = _Pool(6000, page, full=_Pool(8192, page))
    assert kv_slot_count(hybrid) == 8192 + page


class _Recorder(nn.Module):
    def set_dflash_layers_to_capture(self, ids):
        self.ids = ids


def test_capture_ids_reach_sglang_unique_and_ascending():
    """Qwen3.5's set_dflash_layers_to_capture refuses unsorted or repeated ids."""
    model = _Recorder()
    install_capture(model, [2, 0, 2, 1])
    assert model.ids == [0, 1, 2]


class _SplitResidualLayer(nn.Module):
    """A Gemma-3 decoder layer's contract: returns (branch output, residual), unsummed."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        torch.manual_seed(seed)
        nn.init.normal_(self.proj.weight)

    def forward(self, positions=None, hidden_states=None, residual=None):
        residual = hidden_states if residual is None else hidden_states + residual
        return torch.tanh(self.proj(residual)), residual


class _SplitResidualText(nn.Module):
    """Gemma3TextModel's loop: SGLang's own capture appends ``hidden_states`` before
    the residual add."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_SplitResidualLayer(i) for i in range(n))
        self.layers_to_capture = []

    def forward(self, x):
        aux, hidden, residual = [], x, None
        for i, layer in enumerate(self.layers):
            if i in self.layers_to_capture:
                aux.append(hidden)
            hidden, residual = layer(positions=None, hidden_states=hidden, residual=residual)
        if len(self.layers) in self.layers_to_capture:
            aux.append(hidden)
        return (hidden + residual, aux) if aux else hidden + residual

    def stream(self, x):
        """HF's hidden_states: the residual stream entering each layer, then the output."""
        out, hidden, residual = [x], x, None
        for layer in self.layers:
            hidden, residual = layer(positions=None, hidden_states=hidden, residual=residual)
            out.append(hidden + residual)
        return out


class Gemma3ForCausalLM(nn.Module):  # named as SGLang's class: the capture is chosen by name
    def __init__(self) -> None:
        super().__init__()
        self.model = _SplitResidualText(4)
        self.capture_aux_hidden_states = False


@pytest.mark.parametrize("ids", [[0, 2], [3, 1, 3], [2]])
def test_gemma3_capture_is_the_residual_stream(ids):
    model = Gemma3ForCausalLM()
    install_capture(model, ids)
    x = torch.randn(5, 8)
    hidden, features = model.model(x)
    want = model.model.stream(x)
    assert model.capture_aux_hidden_states and model.model.layers_to_capture == [i + 1 for i in sorted(set(ids))]
    assert len(features) == len(set(ids))
    for got, layer in zip(features, sorted(set(ids))):
        torch.testing.assert_close(got, want[layer + 1])
    torch.testing.assert_close(hidden, want[-1])
    # every forward captures afresh
    assert len(model.model(x)[1]) == len(set(ids))


def test_targets_without_any_capture_are_refused():
    with pytest.raises(DFlashConfigError, match="no DFlash feature capture"):
        install_capture(nn.Linear(2, 2), [1])


@pytest.mark.parametrize("arch", ["gemma3", "qwen3_5"])
def test_eval_loop_stays_lossless_on_window_and_recurrent_caches(arch, arch_target, tmp_path):
    """The trainer's held-out loop on a sliding-window target (its cache keeps the block
    until the crop) and a linear-attention target (its recurrent state cannot be
    cropped: rejected drafts are undone by replaying the committed tokens on a
    snapshot) still emits exactly the target's greedy tokens."""
    from transformers import AutoModelForCausalLM

    from sglang_dflash.model.checkpoint import load_drafter
    from sglang_dflash.testing.devmodels.tiny import build_random_drafter
    from sglang_dflash.train.eval import speculative_generate

    path = arch_target(arch)
    target = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    drafter = load_drafter(build_random_drafter(tmp_path / "drafter", target=path, num_layers=1, block_size=4))
    prompt = [11, 45, 300, 21, 99, 7, 250, 31, 480, 12, 77, 8]  # longer than the 8-token window
    ours, lengths = speculative_generate(target, drafter, prompt, max_new_tokens=30)
    with torch.no_grad():
        greedy = target.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False, eos_token_id=None)
    assert ours == greedy[0, len(prompt) :].tolist()
    assert sum(lengths) == len(ours) - 1


def test_tree_verification_refused_on_hybrid_linear_attention_targets(arch_target, tmp_path):
    """A tree verify cannot keep one recurrent state per branch: refused at launch."""
    from sglang_dflash.testing.devmodels.targets import server_flags
    from sglang_dflash.testing.devmodels.tiny import build_random_drafter
    from tests.test_plugin import dflash_options, resolution_fails

    target = arch_target("qwen3_5")
    drafter = build_random_drafter(tmp_path / "drafter", target=target, num_layers=1, block_size=4)
    options = dflash_options(target, drafter, **server_flags("qwen3_5"), **{"speculative-dflash-tree-topk": 2})
    assert "not supported on hybrid linear-attention targets" in resolution_fails(options)
