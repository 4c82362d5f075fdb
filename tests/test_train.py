"""Drafter distillation: the objective's masks, a tiny end-to-end run, and checkpoint
compatibility with the z-lab reference (``dflash`` from PyPI, the numerical oracle)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from sglang_dflash.model.checkpoint import load_drafter
from sglang_dflash.model.config import DFlashConfig
from sglang_dflash.model.draft_attention import DraftAttnPlan, TorchDraftAttention
from sglang_dflash.model.draft_kv import DraftKVCache
from sglang_dflash.spec.proposer import BlockProposer
from sglang_dflash.train.trainer import TrainArgs, drafter_config_dict, load_target, train
from sglang_dflash.train.data import SequenceSet, encode_prompt, stop_token_ids
from sglang_dflash.train.eval import evaluate, speculative_generate
from sglang_dflash.train.init import init_drafter, source_layers
from sglang_dflash.train.objective import IGNORE, block_attention_mask, block_hidden, make_batch, sample_anchors
from sglang_dflash.train.prompts import build_prompts, split_prompts

BLOCK = 8
# fp32 on both sides; differences come only from summation order (SDPA kernels, RMSNorm).
REFERENCE_ATOL = 1e-4


# ------------------------------------------------------------------ objective, no model
def reference_visibility(anchors, valid, ctx_len, block):
    """Plain python: per query (s, j, k), the keys it may see, as ('ctx', c) / ('blk', j, k)."""
    rows = []
    for s, (seq_anchors, seq_valid) in enumerate(zip(anchors, valid)):
        seq_rows = []
        for j, (a, ok) in enumerate(zip(seq_anchors, seq_valid)):
            context = {("ctx", c) for c in range(ctx_len) if ok and c < a}
            own = {("blk", j, k) for k in range(block)}
            seq_rows += [context | own] * block
        rows.append(seq_rows)
    return rows


def visibility_from_mask(mask, ctx_len, block):
    rows = []
    for seq_mask in mask[:, 0]:
        seq_rows = []
        for row in seq_mask:
            keys = set()
            for col in row.nonzero().flatten().tolist():
                keys.add(("ctx", col) if col < ctx_len else ("blk", *divmod(col - ctx_len, block)))
            seq_rows.append(keys)
        rows.append(seq_rows)
    return rows


def test_block_mask_matches_plain_python():
    anchors = [[2, 5, 3], [4, 0, 0]]
    valid = [[True, True, True], [True, False, False]]
    ctx_len, block = 7, 3
    mask = block_attention_mask(torch.tensor(anchors), torch.tensor(valid), ctx_len, block)
    assert mask.shape == (2, 1, 3 * block, ctx_len + 3 * block)
    assert visibility_from_mask(mask, ctx_len, block) == reference_visibility(anchors, valid, ctx_len, block)


def test_make_batch_blocks_and_labels():
    lengths, prompt_lens = [12, 9], [4, 6]
    tokens = torch.arange(100, 100 + sum(lengths), dtype=torch.int32)
    offsets = torch.tensor([0, 12, 21])
    feats = torch.arange(sum(lengths), dtype=torch.float32)[:, None].repeat(1, 3)
    data = SequenceSet(tokens, offsets, torch.tensor(prompt_lens), {0: feats})
    mask_id = 7
    batch = make_batch(data, [0, 1], feats, block_size=4, num_anchors=5, mask_token_id=mask_id,
                       generator=torch.Generator().manual_seed(0))
    for row, i in enumerate([0, 1]):
        seq = data.sequence(i).long()
        assert torch.equal(batch.features[row, : len(seq), 0], feats[offsets[i] : offsets[i + 1], 0])
        for j in range(5):
            if batch.labels[row, j].eq(IGNORE).all():  # padding block (seq 1 has only 2 anchors)
                continue
            a = int(batch.anchors[row, j])
            assert prompt_lens[i] <= a <= len(seq) - 2
            assert batch.block_tokens[row, j].tolist() == [int(seq[a])] + [mask_id] * 3
            expected = seq[a + 1 : a + 4].tolist()
            assert batch.labels[row, j].tolist() == expected + [IGNORE] * (3 - len(expected))
            assert batch.block_positions[row, j].tolist() == list(range(a, a + 4))
    assert sample_anchors(6, 9, 5, torch.Generator()) == [6, 7]


# ------------------------------------------------------------------ tiny target fixtures
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine OpenMP spin-waits
    make a second thread several times slower; restore the setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_target_dir(tmp_path_factory) -> Path:
    from sglang_dflash.testing.devmodels.tiny import build_tiny_target

    return build_tiny_target(tmp_path_factory.mktemp("tiny-target"))


@pytest.fixture(scope="module")
def tiny_target(tiny_target_dir):
    return load_target(tiny_target_dir, "cpu")


def tiny_args(target_dir: Path, out: Path, cache: Path, **overrides) -> TrainArgs:
    settings = dict(
        layers=1, block_size=BLOCK, num_prompts=48, num_heldout=4, max_new_tokens=96, gen_batch_size=48,
        steps=150, seqs_per_step=8, anchors_per_seq=16, lr=1e-2, warmup=15, eval_max_new_tokens=48,
        save_dtype="float32", cache_dir=str(cache), progress=False, threads=None,
    )
    settings.update(overrides)
    return TrainArgs(target=str(target_dir), out=str(out), **settings)


@pytest.fixture(scope="module")
def trained(tiny_target_dir, tiny_target, tmp_path_factory):
    """One short training run; returns (args, result, train prompt ids, tau before training)."""
    root = tmp_path_factory.mktemp("train")
    args = tiny_args(tiny_target_dir, root / "drafter", root / "cache")
    target, tokenizer = tiny_target
    prompts, _ = split_prompts(build_prompts(args.num_prompts + args.num_heldout, args.prompt_seed), args.num_heldout)
    train_ids = [encode_prompt(tokenizer, p) for p in prompts[:4]]
    raw = drafter_config_dict(target.config, num_layers=1, target_layer_ids=[2], block_size=BLOCK, mask_token_id=3)
    untrained = init_drafter(DFlashConfig.from_dict(raw), target, seed=0)
    stops = stop_token_ids(target, tokenizer)
    before = evaluate(target, untrained, train_ids, max_new_tokens=64, stop_ids=stops).tau
    return args, train(args), train_ids, before


def test_training_lowers_loss_and_raises_tau(trained, tiny_target):
    args, result, train_ids, tau_before = trained
    target, tokenizer = tiny_target
    losses = result.losses
    assert sum(losses[-15:]) / 15 < 0.85 * sum(losses[:15]) / 15
    drafter = load_drafter(result.path)
    after = evaluate(target, drafter, train_ids, max_new_tokens=64, stop_ids=stop_token_ids(target, tokenizer))
    assert after.tau > 1.1 and after.tau > tau_before + 0.05, (tau_before, after.summary())


def test_checkpoint_round_trip(trained, tiny_target, tmp_path):
    """The trainer writes the z-lab config and the weights it trained (not its starting
    point); a drafter in memory saved and loaded back is bit-identical."""
    from sglang_dflash.model.checkpoint import save_drafter

    args, result, _, _ = trained
    config = DFlashConfig.from_pretrained(result.path)
    assert config.raw["architectures"] == ["DFlashDraftModel"]
    assert config.block_size == BLOCK and config.target_layer_ids == (2,)
    assert config.raw["dflash_config"] == {"target_layer_ids": [2], "mask_token_id": config.mask_token_id,
                                           "block_size": BLOCK}
    assert config.raw["num_target_layers"] == 4
    loaded = load_drafter(result.path).state_dict()
    start = init_drafter(config, tiny_target[0], args.seed, args.init).state_dict()
    assert loaded.keys() == start.keys()
    changed = [k for k in start if not torch.equal(loaded[k], start[k])]
    assert "fc.weight" in changed and any(".mlp." in k for k in changed), changed

    in_memory = init_drafter(config, tiny_target[0], seed=7)
    save_drafter(in_memory, tmp_path / "saved")
    again = load_drafter(tmp_path / "saved").state_dict()
    assert again.keys() == in_memory.state_dict().keys()
    assert all(torch.equal(again[k], v) for k, v in in_memory.state_dict().items())


def _block_inputs(target, drafter, ctx_len: int, anchor_token: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(ctx_len, drafter.config.num_features * drafter.config.hidden_size, generator=gen)
    block = torch.full((BLOCK,), drafter.config.mask_token_id)
    block[0] = anchor_token
    return features, block


def test_checkpoint_matches_zlab_reference(trained, tiny_target):
    from dflash.model import DFlashDraftModel

    _, result, _, _ = trained
    target, _ = tiny_target
    ours = load_drafter(result.path)
    reference = DFlashDraftModel.from_pretrained(str(result.path), dtype=torch.float32).eval()
    assert reference.target_layer_ids == [2] and reference.mask_token_id == ours.config.mask_token_id
    embed_w = target.get_input_embeddings().weight
    head_w = target.get_output_embeddings().weight
    ctx_len = 21
    features, block = _block_inputs(target, ours, ctx_len, anchor_token=42)
    with torch.no_grad():
        ref_hidden = reference(
            position_ids=torch.arange(ctx_len + BLOCK)[None],
            noise_embedding=F.embedding(block, embed_w)[None],
            target_hidden=features[None],
        )[0]
        ref_logits = reference.compute_logits(ref_hidden[1:], target.get_output_embeddings())
        # Ours, through the training path: one sequence, one block anchored after the context.
        from sglang_dflash.train.objective import BlockBatch

        batch = BlockBatch(features=features[None], block_tokens=block[None, None], anchors=torch.tensor([[ctx_len]]),
                           labels=torch.zeros(1, 1, BLOCK - 1, dtype=torch.long),
                           mask=block_attention_mask(torch.tensor([[ctx_len]]), torch.tensor([[True]]), ctx_len, BLOCK))
        our_logits = ours.logits(block_hidden(ours, batch, embed_w)[0, 0, 1:], head_w)
    torch.testing.assert_close(our_logits, ref_logits, atol=REFERENCE_ATOL, rtol=REFERENCE_ATOL)
    assert torch.equal(our_logits.argmax(-1), ref_logits.argmax(-1))


def test_training_forward_matches_serving_path(trained, tiny_target):
    """Many blocks under the block-sparse mask == one block at a time over the draft KV cache."""
    _, result, _, _ = trained
    target, _ = tiny_target
    drafter = load_drafter(result.path)
    embed_w, head_w = target.get_input_embeddings().weight, target.get_output_embeddings().weight
    ctx_len = 30
    features, _ = _block_inputs(target, drafter, ctx_len, anchor_token=0, seed=1)
    anchors = torch.tensor([[5, 17, 9, 28]])
    tokens = torch.randint(0, 500, (ctx_len,), generator=torch.Generator().manual_seed(2))
    block_tokens = torch.full((1, 4, BLOCK), drafter.config.mask_token_id)
    block_tokens[0, :, 0] = tokens[anchors[0]]
    from sglang_dflash.train.objective import BlockBatch

    batch = BlockBatch(features[None], block_tokens, anchors, torch.zeros(1, 4, BLOCK - 1, dtype=torch.long),
                       block_attention_mask(anchors, torch.ones_like(anchors, dtype=torch.bool), ctx_len, BLOCK))
    with torch.no_grad():
        many = drafter.logits(block_hidden(drafter, batch, embed_w)[0, :, 1:], head_w)
        for j, a in enumerate(anchors[0].tolist()):
            cache = DraftKVCache(num_layers=1, num_slots=a + BLOCK, num_kv_heads=drafter.config.num_kv_heads,
                                 head_dim=drafter.config.head_dim, dtype=torch.float32, device="cpu")
            positions = torch.arange(a)
            drafter.inject(cache, features[:a], positions, positions)
            proposer = BlockProposer(drafter, TorchDraftAttention(cache, drafter.config),
                                     embed=lambda ids: F.embedding(ids, embed_w),
                                     lm_head=lambda h: drafter.logits(h, head_w),
                                     mask_token_id=drafter.config.mask_token_id, block_size=BLOCK)
            slots = torch.arange(a + BLOCK)
            plan = DraftAttnPlan(kv_slots=slots[None], kv_lens=torch.tensor([a + BLOCK]),
                                 q_positions=slots[None, a:], block_slots=slots[a:])
            one = proposer.draft_logits(tokens[a : a + 1], plan)[0]
            torch.testing.assert_close(one, many[j], atol=1e-5, rtol=1e-5)


def test_eval_loop_is_lossless_and_agrees_with_reference(trained, tiny_target, monkeypatch):
    """Our greedy speculative loop emits the target's greedy tokens, with the same
    acceptance lengths as the reference's ``dflash_generate`` on the same checkpoint."""
    import dflash.model as zlab

    _, result, train_ids, _ = trained
    target, tokenizer = tiny_target
    drafter = load_drafter(result.path)
    stops = stop_token_ids(target, tokenizer)
    prompt = train_ids[0]
    ours, lengths = speculative_generate(target, drafter, prompt, max_new_tokens=40, stop_ids=stops)
    with torch.no_grad():
        greedy = target.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, eos_token_id=stops,
                                 pad_token_id=stops[0])[0, len(prompt) :].tolist()
    assert ours == greedy[: len(ours)] and len(ours) == len(greedy)
    assert sum(lengths) == len(ours) - 1  # the first token comes from prefill
    monkeypatch.setattr(zlab, "_cuda_time", time.perf_counter)  # the reference times with CUDA syncs
    reference = zlab.DFlashDraftModel.from_pretrained(str(result.path), dtype=torch.float32).eval()
    stats = zlab.dflash_generate(reference, target, torch.tensor([prompt]), max_new_tokens=40, stop_token_ids=stops,
                                 return_stats=True)
    assert stats.output_ids[0, len(prompt) :].tolist()[: len(ours)] == ours
    assert stats.acceptance_lengths[: len(lengths) - 1] == lengths[:-1]


def test_training_is_deterministic(tiny_target_dir, trained, tmp_path):
    args, _, _, _ = trained
    states = []
    for run in range(2):
        again = tiny_args(tiny_target_dir, tmp_path / f"d{run}", Path(args.cache_dir), steps=12, num_heldout=1,
                          eval_max_new_tokens=4)
        result = train(again)
        states.append(load_drafter(result.path).state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_init_from_continues_an_existing_drafter(tiny_target_dir, trained, tmp_path):
    """--init-from starts where the earlier run ended, not from random weights."""
    args, result, _, _ = trained
    more = tiny_args(tiny_target_dir, tmp_path / "more", Path(args.cache_dir), steps=4, num_heldout=1,
                     eval_max_new_tokens=4, init_from=str(result.path))
    continued = train(more)
    fresh_start, trained_end = result.losses[0], sum(result.losses[-15:]) / 15
    assert continued.losses[0] < 0.5 * (fresh_start + trained_end), (fresh_start, trained_end, continued.losses)


def test_init_from_refuses_a_different_drafter(tiny_target_dir, trained, tmp_path):
    args, result, _, _ = trained
    other = tiny_args(tiny_target_dir, tmp_path / "other", Path(args.cache_dir), steps=2, num_heldout=1,
                      block_size=BLOCK + 2, init_from=str(result.path))
    with pytest.raises(ValueError, match=r"does not match this run's drafter: block_size"):
        train(other)


# ------------------------------------------------------------------ warm start (--init)
def _tiny_config(target, **overrides) -> DFlashConfig:
    settings = dict(num_layers=1, target_layer_ids=[0, 2], block_size=BLOCK, mask_token_id=3)
    settings.update(overrides)
    return DFlashConfig.from_dict(drafter_config_dict(target.config, **settings))


def test_warm_start_injects_the_targets_own_kv(tiny_target):
    """With ``--init target`` the context K/V of a fresh drafter are the K/V the target's
    layer after the deepest captured one computes (fc's small noise on the other
    features' slices zeroed here): the +1 capture offset and the norms are wired right."""
    target, _ = tiny_target
    config = _tiny_config(target)
    drafter = init_drafter(config, target, seed=0, how="target")
    (src,) = source_layers(config, target.config.num_hidden_layers)
    assert src == 3  # reads feature 2, the deepest captured
    layer = target.model.layers[src]
    assert torch.equal(drafter.layers[0].mlp.down_proj.weight, layer.mlp.down_proj.weight)
    assert torch.equal(drafter.layers[0].self_attn.k_norm.weight, layer.self_attn.k_norm.weight)
    hidden = config.hidden_size
    noise = drafter.fc.weight[:, :hidden]
    assert 0 < noise.abs().max() < 0.05  # other features start small, not silent
    with torch.no_grad():
        noise.zero_()
        ids = torch.tensor([[5, 17, 42, 99, 7, 256]])
        states = target(ids, output_hidden_states=True).hidden_states
        features = torch.cat([states[i + 1][0] for i in config.target_layer_ids], dim=-1)
        k, v = drafter.context_kv(features, torch.zeros(ids.shape[1], dtype=torch.long))  # position 0: no rotation
        normed = layer.input_layernorm(states[src][0])
        attn = layer.self_attn
        want_k = attn.k_norm(attn.k_proj(normed).view(ids.shape[1], -1, attn.head_dim))
        want_v = attn.v_proj(normed).view(ids.shape[1], -1, attn.head_dim)
    torch.testing.assert_close(v[0], want_v, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k[0], want_k, atol=1e-5, rtol=1e-5)


def test_warm_start_falls_back_or_refuses_on_another_shape(tiny_target):
    target, _ = tiny_target
    config = _tiny_config(target, intermediate_size=3 * target.config.hidden_size)
    with pytest.raises(ValueError, match=r"--init target: target layer 3 does not match drafter layer 0 in down_proj"):
        init_drafter(config, target, seed=0, how="target")
    auto = init_drafter(config, target, seed=0, how="auto")
    normal = init_drafter(config, target, seed=0, how="normal")
    assert all(torch.equal(a, b) for a, b in zip(auto.state_dict().values(), normal.state_dict().values()))
    with pytest.raises(ValueError, match=r"--init must be one of auto, target, normal, not 'zeros'"):
        init_drafter(config, target, seed=0, how="zeros")


# ------------------------------------------------------------------ DFlash2 drafters
def test_selector_loss_is_teacher_forced_cross_entropy_over_candidates():
    """Per slot: the top-K logits are the candidates, scored from the *true* previous
    token; cross-entropy at the label's candidate, weighted; slots whose label is not
    a candidate add nothing. With a restricted head, rows map back to token ids."""
    from sglang_dflash.model.selector import CandidateSelector
    from sglang_dflash.train.objective import selector_loss

    torch.manual_seed(0)
    vocab, rows, k = 20, 12, 3
    selector = CandidateSelector(8, vocab, 4, k)
    with torch.no_grad():
        for p in selector.parameters():
            p.normal_()
    row_ids = torch.randperm(vocab)[:rows].sort().values
    hidden, logits = torch.randn(5, 8), torch.randn(5, rows) * 3
    previous, weights = torch.randint(0, vocab, (5,)), torch.rand(5) + 0.1
    order = logits.argsort(dim=-1, descending=True)
    targets = torch.stack([order[0, 1], order[1, 0], order[2, 2], order[3, 1], order[4, k]])  # the last: no candidate

    expected, total = 0.0, 0.0
    for i in range(4):
        cands = order[i, :k]
        gate = selector.hidden_projection(hidden[i]) * selector.predecessor_codebook[previous[i]]
        scores = logits[i, cands] + selector.successor_codebook[row_ids[cands]] @ gate
        expected += weights[i] * -torch.log_softmax(scores, -1)[(cands == targets[i]).int().argmax()]
        total += weights[i]
    got = selector_loss(selector, hidden, logits, targets, previous, weights, row_ids)
    assert torch.allclose(got, expected / total, atol=1e-5)


def test_dflash2_training_config_and_flags(tiny_target):
    from sglang_dflash.train.trainer import dflash2_fields, parse_args

    target, _ = tiny_target
    args = parse_args(["--target", "t", "--out", "o", "--selector-rank", "8", "--selector-top-k", "8",
                       "--conv-kernel-size", "2", "--conv-group-size", "16"])
    raw = drafter_config_dict(target.config, num_layers=1, target_layer_ids=[2], block_size=BLOCK, mask_token_id=3,
                              dflash2=dflash2_fields(args))
    config = DFlashConfig.from_dict(raw)
    assert raw["architectures"] == ["DFlash2DraftModel"] and config.has_selector and config.has_convolution
    assert dflash2_fields(parse_args(["--target", "t", "--out", "o"])) is None
    only_conv = DFlashConfig.from_dict(drafter_config_dict(target.config, num_layers=1, target_layer_ids=[2],
                                                           block_size=BLOCK, mask_token_id=3,
                                                           dflash2={"conv_kernel_size": 2, "conv_group_size": 16}))
    assert only_conv.architecture == "DFlashDraftModel" and only_conv.has_convolution and not only_conv.has_selector

