"""Our DFlash2 drafter against SGLang 0.5.23's own ``DFlash2DraftModel`` on the same
weights and inputs.

SGLang's model runs standalone on CPU in a subprocess (``tests/support/dflash2_oracle.py``:
its layers, convolutions, candidate top-K, lattice and walk, with SDPA in place of its
RadixAttention). Ours runs the serving path: context injected into the slot-addressed
cache, a padded batch of requests with different context lengths. Compared, per
request and draft slot:

* hidden states: max |difference| < 1e-4 (float32);
* candidate ids: identical; unary scores and lattice: max |difference| < 1e-4;
* the walked path: identical, greedy rows and sampled rows (same explicit uniforms);
* q rows: max |difference| < 1e-5.

Two drafters: the published shape (two taps, groups of 16 channels, rank 8, top 16,
output multiplier and soft-capping, one windowed layer whose window the contexts
exceed) and another (three taps, groups of 32, top 4, block 16, full attention).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch.nn import functional as F

from sglang_dflash.model.checkpoint import load_drafter
from sglang_dflash.spec.selector import candidates, walk
from tests.conftest import REPO
from tests.support.drafting import run_block

HIDDEN, VOCAB = 64, 512
CASES = {
    "published-shape": dict(block=8, layer_types=["sliding_attention", "full_attention"], sliding_window=6,
                            output_multiplier=0.5, final_logit_softcapping=5.0),
    "three-taps": dict(block=16, conv_kernel_size=3, conv_group_size=32, selector_top_k=4,
                       layer_types=["full_attention", "full_attention"], sliding_window=None),
}


def make_case(name: str, drafter_dir, seed: int) -> dict:
    block = CASES[name]["block"]
    gen = torch.Generator().manual_seed(seed)
    bs, mask = 4, 3
    block_ids = torch.full((bs, block), mask)
    block_ids[:, 0] = torch.randint(0, VOCAB, (bs,), generator=gen)
    return dict(
        drafter=str(drafter_dir),
        features=[torch.randn(n, 2 * HIDDEN, generator=gen) for n in (3, 11, 9, 17)],
        block_ids=block_ids,
        embed=torch.randn(VOCAB, HIDDEN, generator=gen) * 0.5,
        lm_head=torch.randn(VOCAB, HIDDEN, generator=gen) * 0.3,
        uniforms=torch.rand(bs, block - 1, generator=gen),
        temperatures=torch.tensor([1.0, 0.7, 1.0, 1.6]),
        greedy=torch.tensor([True, False, False, False]),
    )


def ours(case: dict) -> dict:
    drafter = load_drafter(case["drafter"])
    block_ids = case["block_ids"]
    with torch.no_grad():
        hidden = run_block(drafter, [(f, F.embedding(ids, case["embed"])) for f, ids in zip(case["features"], block_ids)],
                           block_ids.shape[1])
        predicted = hidden[:, 1:]
        bs, slots = predicted.shape[:2]
        logits = drafter.logits(predicted.reshape(bs * slots, -1), case["lm_head"]).view(bs, slots, -1)
        ids, unary = candidates(logits, drafter.candidate_selector.top_k)
        scores = drafter.candidate_selector.lattice(ids, unary, predicted, block_ids[:, 0])
        index, q = walk(scores, greedy=case["greedy"], temperature=case["temperatures"], uniforms=case["uniforms"])
    tokens = ids.gather(-1, index[..., None]).squeeze(-1)
    return {"hidden": hidden, "candidates": ids, "unary": unary, "scores": scores, "tokens": tokens, "q_rows": q,
            "argmax": logits.argmax(-1)}


@pytest.fixture(scope="module")
def oracle_results(tmp_path_factory, tiny_target):
    from sglang_dflash.testing.devmodels.dflash2 import build_random_dflash2_drafter

    work = tmp_path_factory.mktemp("dflash2-oracle")
    cases = []
    for seed, (name, spec) in enumerate(CASES.items()):
        options = {k: v for k, v in spec.items() if k != "block"}
        drafter = build_random_dflash2_drafter(work / name, target=tiny_target, target_layer_ids=[1, 2],
                                               block_size=spec["block"], seed=seed, **options)
        cases.append(make_case(name, drafter, seed))
    torch.save(cases, work / "in.pt")
    run = subprocess.run([sys.executable, "-m", "tests.support.dflash2_oracle", str(tiny_target), str(work / "in.pt"),
                          str(work / "out.pt")], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return dict(zip(CASES, zip(cases, torch.load(work / "out.pt"))))


@pytest.mark.parametrize("name", list(CASES))
def test_same_candidates_lattice_path_and_q_as_sglang(oracle_results, name):
    case, want = oracle_results[name]
    got = ours(case)
    assert (got["hidden"] - want["hidden"]).abs().max() < 1e-4
    assert torch.equal(got["candidates"], want["candidates"])
    assert (got["unary"] - want["unary"]).abs().max() < 1e-4
    assert (got["scores"] - want["scores"]).abs().max() < 1e-4
    assert torch.equal(got["tokens"], want["tokens"]), (got["tokens"], want["tokens"])
    assert (got["q_rows"] - want["q_rows"]).abs().max() < 1e-5
    # The comparison is not vacuous: sampled rows really sample (q is not one-hot),
    # and the selector's path departs from the plain top-1 somewhere.
    assert (want["q_rows"][1:].max(-1).values < 0.999).any()
    assert torch.equal(want["q_rows"][0].max(-1).values, torch.ones(want["q_rows"].shape[1]))  # greedy: one-hot
    assert not torch.equal(got["tokens"], got["argmax"])
