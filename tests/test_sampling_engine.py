"""Issue [4 of 8]: lossless sampling at T > 0 through the real server.

A vocab-32 random Qwen3 (no tokenizer: token ids in and out) and a random drafter
whose distribution differs from the target's, so drafts are accepted *and* rejected.
The exact distribution of the first K generated tokens is enumerated with
transformers on the same weights, filtered exactly as SGLang's sampler filters
(``filtered_probs``); samples from our DFLASH server must fit it by chi-square, per
position and jointly for the first two. The same chi-square test run on an
accept-always variant (the drafter's own proposals, sampled in-process from the same
drafter) must fail, which shows the test can tell.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from sglang_dflash.spec.sampling import RowSampling, filtered_probs
from tests.support.reference_spec import chi_square_gof

VOCAB, K, BLOCK = 32, 3, 4
PROMPT = [3, 17, 9, 25, 4, 11]
CONFIGS = {
    "T0.7": {"temperature": 0.7},
    "T1.0": {"temperature": 1.0},
    "T1.0-top_p0.9": {"temperature": 1.0, "top_p": 0.9},
}


@pytest.fixture(scope="module")
def vocab32(models_dir):
    from sglang_dflash.testing.devmodels.tiny import build_random_drafter, build_tiny_target

    target = build_tiny_target(models_dir / "vocab32", vocab_size=VOCAB, init_std=0.2, seed=1)
    drafter = build_random_drafter(
        models_dir / "vocab32-drafter", target=target, num_layers=1, block_size=BLOCK, target_layer_ids=[1, 2], init_std=0.3
    )
    return target, drafter


def spec_server(servers, target, drafter, **extra):
    return servers.get(
        {
            "model-path": target,
            "skip-tokenizer-init": True,
            "speculative-algorithm": "DFLASH",
            "speculative-draft-model-path": drafter,
            "speculative-num-draft-tokens": BLOCK,
            "max-running-requests": 64,
            "no-speculative-dflash-adaptive": True,  # always draft: exercise acceptance every step
            **extra,
        }
    )


def sampling_row(params: dict) -> RowSampling:
    return RowSampling(
        temperature=torch.tensor([params["temperature"]]),
        top_k=torch.tensor([1 << 30]),
        top_p=torch.tensor([params.get("top_p", 1.0)]),
        min_p=torch.tensor([0.0]),
    )


def exact_distribution(target_dir, params: dict) -> torch.Tensor:
    """[V]*K joint probabilities of the first K tokens under plain target sampling."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    row = sampling_row(params)
    joint = torch.ones(1)
    prefixes = [[]]
    with torch.no_grad():
        for _ in range(K):
            ids = torch.tensor([PROMPT + p for p in prefixes])
            logits = model(ids).logits[:, -1]
            probs = filtered_probs(logits, RowSampling(*(t.expand(len(prefixes)) for t in vars(row).values())))
            joint = (joint[:, None] * probs).reshape(-1)
            prefixes = [p + [t] for p in prefixes for t in range(VOCAB)]
    return joint.view(*([VOCAB] * K))


def sample(server, params: dict, n: int, **extra) -> list[tuple[int, ...]]:
    """n independent samples of the first K tokens (batched in chunks). Tokens 2..K come
    from one verify step per request; some of its drafts must have been accepted and
    some rejected, or the fit would test plain sampling (or the drafter) alone."""
    out, steps = [], []
    body = {"max_new_tokens": K, "ignore_eos": True, **params}
    for start in range(0, n, 500):
        batch = [list(PROMPT)] * min(500, n - start)
        outs = server.generate(batch, body, **extra)
        out += [tuple(o["output_ids"][:K]) for o in outs]
        steps += [o["meta_info"]["spec_dflash_accepted_per_step"] for o in outs]
    first = [s[0] for s in steps]  # each request's first verify step
    assert len(first) == n and 0 < sum(a > 0 for a in first) < n, "drafts were never, or always, accepted"
    return out


def fit(samples: list[tuple[int, ...]], joint: torch.Tensor) -> dict[str, float]:
    """p-values: each position's marginal and the (t1, t2) pair."""
    pvalues = {}
    for pos in range(K):
        counts = Counter(s[pos] for s in samples)
        marginal = joint.sum(dim=[d for d in range(K) if d != pos])
        pvalues[f"pos{pos + 1}"] = chi_square_gof([counts[v] for v in range(VOCAB)], marginal.tolist())[2]
    pair = joint.sum(dim=2).reshape(-1)
    counts = Counter(s[0] * VOCAB + s[1] for s in samples)
    pvalues["pair12"] = chi_square_gof([counts[v] for v in range(VOCAB * VOCAB)], pair.tolist())[2]
    return pvalues


def accept_always_samples(target_dir, drafter_dir, params: dict, n: int) -> list[tuple[int, ...]]:
    """What a server that accepted every draft would emit: t1 from the target, then the
    drafter's own samples for the next positions (same drafter, same filter)."""
    from transformers import AutoModelForCausalLM

    from sglang_dflash.model.checkpoint import load_drafter
    from sglang_dflash.model.config import capture_points
    from sglang_dflash.model.draft_attention import DraftAttnPlan, TorchDraftAttention
    from sglang_dflash.model.draft_kv import DraftKVCache

    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    drafter = load_drafter(drafter_dir)
    cfg = drafter.config
    row = sampling_row(params)
    with torch.no_grad():
        out = model(torch.tensor([PROMPT]), output_hidden_states=True)
        feats = torch.cat([out.hidden_states[p][0] for p in capture_points(cfg.target_layer_ids)], dim=-1)
        t1 = torch.multinomial(filtered_probs(out.logits[:, -1], row), n, replacement=True)[0]
        ctx = len(PROMPT)
        cache = DraftKVCache(num_layers=cfg.num_layers, num_slots=ctx + BLOCK * n + 1, num_kv_heads=cfg.num_kv_heads,
                             head_dim=cfg.head_dim, dtype=torch.float32, device="cpu")
        drafter.inject(cache, feats, torch.arange(ctx), torch.arange(1, ctx + 1))
        table = torch.zeros(n, ctx + BLOCK, dtype=torch.long)
        table[:, :ctx] = torch.arange(1, ctx + 1)
        table[:, ctx:] = ctx + 1 + torch.arange(n * BLOCK).view(n, BLOCK)  # every block its own slots
        plan = DraftAttnPlan.from_req_to_token(req_to_token=table, req_pool_indices=torch.arange(n),
                                               prefix_lens=torch.full((n,), ctx), block_size=BLOCK, width=ctx + BLOCK)
        attention = TorchDraftAttention(cache, cfg)
        attention.bind(plan)
        block = torch.full((n, BLOCK), cfg.mask_token_id)
        block[:, 0] = t1
        embed = model.get_input_embeddings().weight
        hidden = drafter(drafter.embed(block.reshape(-1), embed), plan.q_positions.reshape(-1), attention, plan.block_size)
        logits = drafter.logits(hidden.view(n, BLOCK, -1)[:, 1:K].reshape(-1, hidden.shape[-1]), model.lm_head.weight)
        q = filtered_probs(logits, RowSampling(*(t.expand(logits.shape[0]) for t in vars(row).values())))
        drafts = torch.multinomial(q, 1).view(n, K - 1)
    return [tuple([int(a)] + b.tolist()) for a, b in zip(t1, drafts)]


@pytest.mark.parametrize("name", ["T1.0"])
def test_lossless_sampling_quick(servers, vocab32, name):
    _check_lossless(servers, vocab32, name, n=4000)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_lossless_sampling(servers, vocab32, name):
    _check_lossless(servers, vocab32, name, n=20000)


def _check_lossless(servers, vocab32, name, n):
    target, drafter = vocab32
    params = CONFIGS[name]
    joint = exact_distribution(target, params)
    server = spec_server(servers, target, drafter)
    pvalues = fit(sample(server, params, n), joint)
    wrong = fit(accept_always_samples(target, drafter, params, n), joint)
    print(f"{name}: DFLASH p-values {pvalues}; accept-always p-values {wrong}")
    threshold = 0.01 / len(pvalues)  # Bonferroni over the four tests
    assert min(pvalues.values()) > threshold, pvalues
    assert min(wrong.values()) < 1e-6, wrong


def test_pq_accepts_at_least_target_only(servers, vocab32):
    """T=1: drafting from q and accepting with min(1, p/q) accepts no less than SGLang's
    target-only rule (argmax draft accepted with prob p), on the same model and prompts."""
    target, drafter = vocab32
    params = {"temperature": 1.0, "max_new_tokens": 24, "ignore_eos": True}
    prompts = [list(PROMPT[: 2 + i % 5]) + [i % VOCAB] for i in range(96)]
    taus = {}
    for rule in ("pq", "target-only"):
        server = spec_server(servers, target, drafter, **{"speculative-dflash-sampling": rule})
        outs = server.generate(prompts, params)
        tokens = sum(o["meta_info"]["completion_tokens"] - 1 for o in outs)
        taus[rule] = tokens / sum(o["meta_info"]["spec_verify_ct"] for o in outs)
    print(f"tau at T=1 (tokens per verify, bonus included): {taus}")
    assert taus["pq"] >= taus["target-only"]


def test_greedy_rows_exact_in_mixed_batches(servers, vocab32):
    target, drafter = vocab32
    spec = spec_server(servers, target, drafter)
    plain = servers.get({"model-path": target, "skip-tokenizer-init": True, "max-running-requests": 64})
    prompts = [list(PROMPT[: 2 + i % 5]) + [i % VOCAB] for i in range(24)]
    greedy = {"temperature": 0.0, "max_new_tokens": 16, "ignore_eos": True}
    sampled = {"temperature": 1.0, "max_new_tokens": 16, "ignore_eos": True}
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(24) as pool:
        outs = list(pool.map(lambda ip: spec.generate_one(ip[1], greedy if ip[0] % 2 == 0 else sampled), enumerate(prompts)))
    want = plain.generate(prompts[::2], greedy)
    assert [o["output_ids"] for o in outs[::2]] == [o["output_ids"] for o in want]
    assert all(len(o["output_ids"]) == 16 for o in outs[1::2])


# A prompt whose first token is one token with probability 0.88 at T=1 (chosen among
# random prompts by the target's exact distribution, checked in the test).
SEEDED_PROMPT = [0, 8, 4, 27, 14, 25, 14]


def test_seeded_requests_are_reproducible(servers, vocab32):
    """A seeded sampled request draws its drafts and accept tests from its own seed and
    decode step, so given the same first token (which SGLang's own sampler draws, seeded
    only under --enable-deterministic-inference, a GPU-only mode) it continues
    identically, alone or in any batch."""
    from transformers import AutoModelForCausalLM

    target, drafter = vocab32
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    with torch.no_grad():
        first = model(torch.tensor([SEEDED_PROMPT])).logits[0, -1].softmax(-1)
    assert float(first.max()) > 0.8  # most outputs share their first token: groups of one prove nothing
    server = spec_server(servers, target, drafter)
    seeded = {"temperature": 1.0, "max_new_tokens": 12, "ignore_eos": True, "sampling_seed": 1234}
    noisy = {"temperature": 1.0, "max_new_tokens": 12, "ignore_eos": True}
    from concurrent.futures import ThreadPoolExecutor

    alone = [server.generate_one(list(SEEDED_PROMPT), seeded)["output_ids"] for _ in range(6)]
    with ThreadPoolExecutor(8) as pool:  # the same request amid unseeded traffic
        mixed = list(pool.map(lambda i: server.generate_one(list(SEEDED_PROMPT), seeded if i % 2 == 0 else noisy), range(16)))
    in_batches = [mixed[i]["output_ids"] for i in range(0, 16, 2)]
    top = int(first.argmax())
    alone_top = {tuple(ids) for ids in alone if ids[0] == top}
    batched_top = {tuple(ids) for ids in in_batches if ids[0] == top}
    # P(no output starts with the likely token) < 0.12**6 per phase.
    assert alone_top and batched_top, (alone, in_batches)
    assert len(alone_top | batched_top) == 1, (alone_top, batched_top)
    by_first: dict[int, set] = {}
    for ids in alone + in_batches:
        by_first.setdefault(ids[0], set()).add(tuple(ids))
    assert all(len(continuations) == 1 for continuations in by_first.values()), by_first
    other = [server.generate_one(list(SEEDED_PROMPT), {**seeded, "sampling_seed": s})["output_ids"] for s in range(8)]
    assert len({tuple(ids) for ids in other if ids[0] == top}) > 1, other  # different seeds do differ
