"""Tensor parallelism at unit level: two CPU processes on SGLang's real gloo TP group.

Each rank runs our host worker over the fake SGLang target of
``tests/support/fake_host.py``, except that the target's embedding and lm_head are
SGLang's own ``VocabParallelEmbedding`` / ``ParallelLMHead``, sharded over the TP
group exactly as in a TP=2 server (vocabulary 1000, padded to 1024: rank 1 holds 488
real rows and 24 zero rows). The same steps run once more in this process with the
unsharded tables. Every rank must draft, verify and accept exactly what the single
process does, although each rank's own adaptive policy is skewed to prefer another
verify length and rank 1's global RNG is consumed between steps.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.support.fake_host import FakeModel, make_fake_host

VOCAB, HIDDEN, LAYERS = 1000, 64, 4
STEPS = 5
PREFIX = [20, 33, 7]


@pytest.fixture(scope="module")
def tp_drafter(tmp_path_factory) -> Path:
    """A random drafter for a target whose vocabulary does not split evenly."""
    from sglang_dflash.testing.devmodels.tiny import build_random_drafter

    root = tmp_path_factory.mktemp("tp")
    target = root / "target"
    target.mkdir()
    (target / "config.json").write_text(json.dumps({
        "vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": 2 * HIDDEN, "num_hidden_layers": LAYERS,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 4096,
    }))
    return build_random_drafter(root / "drafter", target=target, num_layers=1, block_size=8, target_layer_ids=[1, 2])


def tables() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return torch.randn(VOCAB, HIDDEN, generator=gen), torch.randn(VOCAB, HIDDEN, generator=gen) * 0.3


def target_model(layers_to_capture, *, sharded: bool, dtype=torch.float32) -> torch.nn.Module:
    """The fake target with the full tables, or with SGLang's vocab-parallel layers
    loaded from them through their own weight loaders."""
    embed, head = tables()
    model = FakeModel(VOCAB, HIDDEN, layers_to_capture)
    if sharded:
        from sglang.srt.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

        model.embed = VocabParallelEmbedding(VOCAB, HIDDEN, params_dtype=dtype)
        model.lm_head = ParallelLMHead(VOCAB, HIDDEN, params_dtype=dtype)
        model.embed.weight_loader(model.embed.weight, embed.to(dtype))
        model.lm_head.weight_loader(model.lm_head.weight, head.to(dtype))
        return model
    model.embed.weight.data.copy_(embed)
    model.lm_head.weight.data.copy_(head)
    return model.to(dtype)


def skew_costs(policy, rank: int) -> None:
    """Rank 0's table makes the whole block the best length; rank 1's makes speculation
    not pay at all (verify length 1), so unsynchronised ranks would diverge at once."""
    from sglang_dflash.spec.adaptive import batch_bucket

    bucket = batch_bucket(len(PREFIX))
    for length in policy.buckets:
        policy.cost.cells[(bucket, length)] = 1.0 if rank == 0 else float(length) ** 2


def sampled(batch) -> None:
    """Every request samples (temperature 2: diffuse target and draft distributions,
    so p/q rejection sampling accepts several drafts), none seeded."""
    bs = len(batch.reqs)
    for req in batch.reqs:
        req.sampling_params.top_k = -1
    batch.sampling_info = SimpleNamespace(
        temperatures=torch.full((bs, 1), 2.0), top_ks=torch.full((bs,), VOCAB), top_ps=torch.ones(bs),
        min_ps=torch.zeros(bs), vocab_size=VOCAB, logit_bias=None, has_custom_logit_processor=False,
    )


def decode_steps(drafter: Path, rank: int, *, sharded: bool, perturb_rng: bool) -> dict:
    """Greedy then sampled decode steps through the host worker; what each step drafted
    (the verify forward's tokens), accepted and committed."""
    from sglang_dflash.model.config import DFlashConfig, capture_points

    config = DFlashConfig.from_pretrained(drafter)
    with pytest.MonkeyPatch.context() as mp:
        model = target_model(capture_points(config.target_layer_ids), sharded=sharded)
        host = make_fake_host(mp, drafter, layout="sglang" if sharded else None, model=model)
        host.start(target_graphs=False)
        speculator = host.worker.speculator
        skew_costs(speculator.policy, rank)
        # Measured step times would make even rank 0 and the single process disagree
        # (that is what the agreement is for); keep each table as skewed.
        mp.setattr(speculator.policy.cost, "observe", lambda *args: None)
        record = {"local_choices": [], "greedy": [], "sampled": []}
        choose = speculator.policy.choose
        mp.setattr(speculator.policy, "choose", lambda rids: record["local_choices"].append(choose(rids)) or record["local_choices"][-1])
        for kind in ("greedy", "sampled"):
            for step in range(STEPS):
                if perturb_rng:
                    torch.rand(13 + step)  # what any other consumer of the global RNG would do
                batch = host.decode_batch(PREFIX)
                for req in batch.reqs:
                    req.decode_batch_idx = step
                if kind == "sampled":
                    sampled(batch)
                out = host.worker.forward_batch_generation(batch)
                forward = host.target_worker.forwards[-1]
                record[kind].append({
                    "verify_len": int(forward.spec_info.draft_token_num),
                    "drafts": forward.input_ids.tolist(),
                    "tokens": out.next_token_ids.tolist(),
                    "accepted": out.accept_lens.tolist(),
                })
        record["parallel"] = host.worker.describe()["parallel"]
        record["gathered"] = host.worker.gather_over_batch_ranks({"rank": rank})
    return record


def shard_logits(rank: int) -> dict:
    """Drafter-shaped hidden states through SGLang's ParallelLMHead and tied
    VocabParallelEmbedding, gathered by :func:`full_vocab_logits`."""
    from sglang.srt.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    from sglang_dflash.host.parallel import full_vocab_logits

    _, full = tables()
    hidden = torch.randn(7, HIDDEN, generator=torch.Generator().manual_seed(3))
    out = {}
    for name, cls in (("lm_head", ParallelLMHead), ("tied_embedding", VocabParallelEmbedding)):
        head = cls(VOCAB, HIDDEN, params_dtype=torch.float32)
        head.weight_loader(head.weight, full)
        logits = full_vocab_logits(torch.nn.functional.linear(hidden, head.weight), head, VOCAB)
        out[name] = {"shard_rows": head.weight.shape[0], "logits": logits}
    out["reference"] = hidden @ full.T
    return out


def graph_capture_context(drafter: Path) -> bool:
    """On the CUDA path (recorded on CPU), whether the drafter's graphs would be
    captured inside SGLang's graph_capture() context."""
    from sglang.srt.distributed.parallel_state import graph_capture

    from sglang_dflash.model.config import DFlashConfig, capture_points
    from tests.support.fake_host import GraphRecorder

    config = DFlashConfig.from_pretrained(drafter)
    with pytest.MonkeyPatch.context() as mp:
        model = target_model(capture_points(config.target_layer_ids), sharded=True, dtype=torch.bfloat16)
        host = make_fake_host(mp, drafter, layout="sglang", model=model, cuda=True, dtype=torch.bfloat16)
        host.start(target_graphs=True)
        return GraphRecorder.instances[-1].capture_context is graph_capture


def rank_job(rank: int, drafter: str) -> dict:
    torch.set_num_threads(1)
    return {
        "logits": shard_logits(rank),
        "steps": decode_steps(Path(drafter), rank, sharded=True, perturb_rng=rank == 1),
        "graph_capture": graph_capture_context(Path(drafter)),
    }


@pytest.fixture(scope="module")
def ranks(tp_drafter):
    from tests.support.tp_group import run_ranks

    return run_ranks(rank_job, str(tp_drafter), world=2)


@pytest.fixture(scope="module")
def single(tp_drafter):
    """The same steps in one process with the full tables and rank 0's cost table."""
    return decode_steps(tp_drafter, 0, sharded=False, perturb_rng=False)


def test_vocab_parallel_draft_logits_are_the_full_vocabulary(ranks):
    """Both the untied ParallelLMHead and a tied VocabParallelEmbedding: each rank holds
    half the padded vocabulary (512 rows), and the gathered, cut logits are the
    single-process [T, 1000] logits on every rank."""
    for out in ranks:
        reference = out["logits"]["reference"]
        for name in ("lm_head", "tied_embedding"):
            got = out["logits"][name]
            assert got["shard_rows"] == 512, name
            assert got["logits"].shape == reference.shape, name
            torch.testing.assert_close(got["logits"], reference, rtol=1e-5, atol=1e-5)
            assert torch.equal(got["logits"].argmax(-1), reference.argmax(-1)), name


@pytest.mark.parametrize("kind", ["greedy", "sampled"])
def test_ranks_draft_and_accept_like_one_process(ranks, single, kind):
    """Drafts (the verify forward's tokens), accepted counts and committed tokens are
    identical on both ranks and equal to the unsharded single process. Sampled
    requests are unseeded and rank 1's global RNG is consumed between steps; their
    drafts really are accepted (multi-token commits)."""
    rank0, rank1 = (r["steps"][kind] for r in ranks)
    assert rank0 == rank1
    assert rank0 == single[kind]
    if kind == "sampled":
        assert sum(sum(step["accepted"]) for step in rank0) > len(rank0) * len(PREFIX), rank0
        drafted = {token for step in rank0 for token in step["drafts"]}
        assert min(drafted) < 512 <= max(drafted), "drafts should come from both ranks' vocabulary shards"


def test_adaptive_length_is_the_first_ranks(ranks):
    """Each rank's own policy chooses differently at every step (rank 1's cost table
    says speculation does not pay: length 1); every step verifies rank 0's choice on
    both ranks."""
    chosen0, chosen1 = (r["steps"]["local_choices"] for r in ranks)
    assert set(chosen1) == {1} and 1 not in chosen0
    for r in ranks:
        verified = [step["verify_len"] for kind in ("greedy", "sampled") for step in r["steps"][kind]]
        assert verified == chosen0


def test_layout_graph_context_and_per_rank_reports(ranks):
    """The worker reads the TP layout from SGLang's groups (the lm_head and embedding
    are split over 2 ranks), captures drafter graphs inside SGLang's graph_capture(),
    and gathers per-rank reports (used for each rank's KV pool) in rank order."""
    for r in ranks:
        assert r["steps"]["parallel"]["tp_size"] == 2
        assert r["steps"]["parallel"]["lm_head_shards"] == 2 and r["steps"]["parallel"]["embedding_shards"] == 2
        assert r["steps"]["gathered"] == [{"rank": 0}, {"rank": 1}]
        assert r["graph_capture"] is True
