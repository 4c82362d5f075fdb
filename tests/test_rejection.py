"""Statistical losslessness of ``chain_rejection_sample`` at the algorithm level.

A tiny vocabulary (V=32) "target" is a random Markov chain whose next-token logits
depend on (position, previous token); a deliberately different "drafter" proposes a
block from its own distribution q. Both are filtered with ``filtered_probs`` (the
request's temperature / top-k / top-p / min-p), as the worker does. Speculative
generation of the first K tokens is simulated many times (vectorised, seeded) and the
generated tokens are chi-square tested against the *exact* target distribution
(computed by enumeration, so the reference has no sampling noise):

* one test per position (marginal, 32 cells) and one on the joint of all K positions
  (tokens bucketed mod 4, 4**K cells); cells with expected count < 5 are pooled;
* lossless rules must pass every test at a Bonferroni-corrected level (family-wise
  false alarm <= 1% per configuration); deliberately wrong rules must be rejected at
  p < 1e-6 by the same statistics.

Everything is seeded, so the outcome is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from sglang_dflash.spec.accept import (
    Acceptance,
    chain_rejection_sample,
    greedy_chain_acceptance,
    one_hot_probs,
    sample_from,
    verify_chain,
)
from sglang_dflash.spec.sampling import RowSampling, SampledRows, filtered_probs
from tests.support.reference_spec import chi_square_gof

V = 32
TOP_K_ALL = 1 << 30
START = 3  # the prompt's last token, at position 0
SAMPLES = 40_000
ALPHA = 0.01


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """The simulations are many small ops: one thread is faster on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass(frozen=True)
class Config:
    temperature: float
    top_p: float = 1.0
    top_k: int = TOP_K_ALL
    min_p: float = 0.0
    block: int = 4  # N: verify width (bonus + N-1 drafts)
    k: int = 4  # generated tokens tested
    drafter: str = "markov"  # "markov": q(. | pos, previous node); "parallel": q(. | pos0, node 0, offset)
    seed: int = 0


@dataclass
class World:
    """target[pos, prev] / markov[pos, prev]: [P, V, V]; parallel[pos0, node0, j]: [P, V, N-1, V]."""

    target: torch.Tensor
    markov: torch.Tensor
    parallel: torch.Tensor


def make_world(cfg: Config, scale: float = 2.0, noise: float = 1.0) -> World:
    gen = torch.Generator().manual_seed(1234 + cfg.seed)
    n = cfg.block
    positions = cfg.k + n + 1
    target_logits = torch.randn(positions, V, V, generator=gen) * scale
    markov_logits = target_logits + noise * torch.randn(positions, V, V, generator=gen)
    # A parallel (block) drafter sees only node 0: for offset j it guesses the target's
    # next-token logits as if the previous token were node 0, plus noise.
    shifted = torch.stack([target_logits[(torch.arange(positions) + j + 1).clamp(max=positions - 1)] for j in range(n - 1)], dim=2)
    parallel_logits = shifted + noise * torch.randn(positions, V, n - 1, V, generator=gen)

    def filt(logits: torch.Tensor) -> torch.Tensor:
        flat = logits.reshape(-1, V)
        r = flat.shape[0]
        params = RowSampling(
            temperature=torch.full((r,), cfg.temperature),
            top_k=torch.full((r,), cfg.top_k, dtype=torch.long),
            top_p=torch.full((r,), cfg.top_p),
            min_p=torch.full((r,), cfg.min_p),
        )
        return filtered_probs(flat, params).view(logits.shape)

    return World(filt(target_logits), filt(markov_logits), filt(parallel_logits))


def exact_joint(world: World, k: int) -> torch.Tensor:
    """[V]*k: the exact probability of each k-token continuation under plain sampling."""
    joint = world.target[1, START].double()
    for t in range(2, k + 1):
        joint = joint[..., None] * world.target[t].double().view(*([1] * (t - 2)), V, V)
    return joint


# --------------------------------------------------------------------------- verify rules


def rule_ours(tokens, target_probs, draft_probs, u, ru):
    return chain_rejection_sample(tokens, target_probs, draft_probs, u, ru)


def rule_target_only(tokens, target_probs, draft_probs, u, ru):
    """Accept with probability target(x), resample from the target without x: the
    one-hot-draft special case of ``chain_rejection_sample``."""
    return chain_rejection_sample(tokens, target_probs, one_hot_probs(tokens[:, 1:], V), u, ru)


def rule_always_accept(tokens, target_probs, draft_probs, u, ru):
    """WRONG: take every draft, then a target bonus."""
    bs, n = tokens.shape
    bonus = sample_from(target_probs[:, -1], ru)
    out = torch.cat([tokens[:, 1:], bonus[:, None]], dim=1)
    return Acceptance(num_accepted=torch.full((bs,), n - 1), out_tokens=out, bonus=bonus)


def _accept_by_target_only(tokens, target_probs, draft_probs, u, ru, residual_of):
    bs, n, _ = target_probs.shape
    drafts = tokens[:, 1:]
    p_draft = target_probs[:, :-1].gather(-1, drafts[..., None]).squeeze(-1)
    num_accepted = (u < p_draft).int().cumprod(dim=1).sum(dim=1)
    rows = torch.arange(bs)
    final = target_probs[rows, num_accepted]
    rejected = num_accepted < n - 1
    idx = num_accepted.clamp(max=n - 2)
    dist = torch.where(rejected[:, None], residual_of(final, draft_probs[rows, idx], drafts[rows, idx]), final)
    bonus = sample_from(dist, ru)
    out = torch.cat([drafts, drafts[:, :1]], dim=1).clone()
    out.scatter_(1, num_accepted[:, None], bonus[:, None])
    return Acceptance(num_accepted=num_accepted, out_tokens=out, bonus=bonus)


def rule_ignore_q_pq_residual(tokens, target_probs, draft_probs, u, ru):
    """WRONG: accept with probability target(x) (ignoring q), residual max(0, target - q)."""

    def residual(p, q, x):
        r = (p - q).clamp_min(0)
        m = r.sum(-1, keepdim=True)
        return torch.where(m > 0, r / m.clamp_min(1e-30), p)

    return _accept_by_target_only(tokens, target_probs, draft_probs, u, ru, residual)


def rule_ignore_q_full_resample(tokens, target_probs, draft_probs, u, ru):
    """WRONG: accept with probability target(x) (ignoring q), resample from the full target."""
    return _accept_by_target_only(tokens, target_probs, draft_probs, u, ru, lambda p, q, x: p)


# --------------------------------------------------------------------------- simulation


def simulate(world: World, cfg: Config, rule, *, samples: int = SAMPLES, greedy_draft: bool = False, seed: int = 1):
    """Speculative generation of cfg.k tokens for ``samples`` independent sequences.

    Returns (tokens [samples, k], accepted drafts per verify step [steps*active rows]).
    Node 0 of the first block is START (position 0), so every generated token, the
    first included, comes out of the verify rule.
    """
    gen = torch.Generator().manual_seed(seed)
    n = cfg.block
    last_pos = world.target.shape[0] - 1

    def step(last: torch.Tensor, pos0: torch.Tensor) -> Acceptance:
        nodes, dists = [last], []
        for j in range(n - 1):
            if cfg.drafter == "markov":
                q = world.markov[(pos0 + j + 1).clamp(max=last_pos), nodes[-1]]
            else:
                q = world.parallel[pos0, last, j]
            draft = q.argmax(-1) if greedy_draft else sample_from(q, torch.rand(samples, generator=gen))
            nodes.append(draft)
            dists.append(q)
        tokens = torch.stack(nodes, dim=1)
        positions = (pos0[:, None] + torch.arange(n) + 1).clamp(max=last_pos)
        target_probs = world.target[positions, tokens]  # [samples, N, V]: after node j
        return rule(
            tokens,
            target_probs,
            torch.stack(dists, dim=1),
            torch.rand(samples, n - 1, generator=gen),
            torch.rand(samples, generator=gen),
        )

    return speculate(samples, cfg.k, n, step)


def speculate(samples: int, k: int, n: int, step) -> tuple[torch.Tensor, torch.Tensor]:
    """The generation loop shared by the simulations: ``step(last, pos0)`` verifies one
    block of N nodes for every sequence and returns its :class:`Acceptance`; this keeps
    the emitted tokens until each sequence has ``k``. Returns (tokens [samples, k],
    accepted drafts per verify step of the active sequences)."""
    out = torch.zeros(samples, k + n, dtype=torch.long)
    count = torch.zeros(samples, dtype=torch.long)
    last = torch.full((samples,), START, dtype=torch.long)
    accepted = []
    while bool((count < k).any()):
        active = count < k
        result = step(last, count.clamp(max=k))
        emitted = result.num_accepted + 1
        cols = (count[:, None] + torch.arange(n)).clamp(max=k + n - 1)
        write = active[:, None] & (torch.arange(n)[None, :] < emitted[:, None])
        out.scatter_(1, cols, torch.where(write, result.out_tokens, out.gather(1, cols)))
        accepted.append(result.num_accepted[active])
        count = torch.where(active, count + emitted, count)
        last = torch.where(active, result.bonus, last)
    return out[:, :k], torch.cat(accepted)


def p_values(tokens: torch.Tensor, joint: torch.Tensor, buckets: int = 4) -> dict[str, float]:
    k = tokens.shape[1]
    result = {}
    for t in range(k):
        marginal = joint.sum(dim=[d for d in range(k) if d != t])
        counts = torch.bincount(tokens[:, t], minlength=V)
        result[f"pos{t + 1}"] = chi_square_gof(counts.tolist(), marginal.tolist())[2]
    bucket = torch.arange(V) % buckets
    code = torch.zeros(tokens.shape[0], dtype=torch.long)
    cell = torch.zeros([V] * k, dtype=torch.long)
    for t in range(k):
        code = code * buckets + bucket[tokens[:, t]]
        cell = cell * buckets + bucket.view(*([1] * t), V, *([1] * (k - t - 1)))
    expected = torch.zeros(buckets**k, dtype=torch.float64).index_add_(0, cell.reshape(-1), joint.reshape(-1))
    result["joint"] = chi_square_gof(torch.bincount(code, minlength=buckets**k).tolist(), expected.tolist())[2]
    return result


def fmt(pv: dict[str, float]) -> str:
    return " ".join(f"{name}={p:.3g}" for name, p in pv.items())


LOSSLESS_CONFIGS = [
    Config(temperature=0.7),
    Config(temperature=1.0),
    Config(temperature=1.0, top_p=0.9),
    Config(temperature=0.7, top_p=0.9, block=3, k=3, drafter="parallel", seed=1),
    Config(temperature=1.0, top_p=0.9, block=8, k=4, drafter="parallel", seed=2),
    Config(temperature=0.8, top_k=8, min_p=0.05, block=5, seed=3),
    Config(temperature=1.0, block=2, k=3, drafter="parallel", seed=4),
]


def config_id(c: Config) -> str:
    top_k = "" if c.top_k == TOP_K_ALL else f"-topk{c.top_k}"
    min_p = f"-minp{c.min_p}" if c.min_p else ""
    return f"T{c.temperature}-topp{c.top_p}{top_k}{min_p}-N{c.block}-K{c.k}-{c.drafter}"


@pytest.mark.parametrize("cfg", LOSSLESS_CONFIGS, ids=config_id)
def test_chain_rejection_sample_is_lossless(cfg):
    world = make_world(cfg)
    tokens, accepted = simulate(world, cfg, rule_ours)
    pv = p_values(tokens, exact_joint(world, cfg.k))
    print(f"\n{config_id(cfg)}: accepted/step={accepted.float().mean():.3f} {fmt(pv)}")
    # The drafts were really exercised: some steps accept all, some reject early.
    assert (accepted == cfg.block - 1).any() and (accepted < cfg.block - 1).any()
    assert min(pv.values()) > ALPHA / len(pv), fmt(pv)


DETECT_CFGS = [Config(temperature=1.0), Config(temperature=0.7, top_p=0.9, seed=5)]


@pytest.mark.parametrize("cfg", DETECT_CFGS, ids=["T1.0", "T0.7-p0.9"])
@pytest.mark.parametrize("rule", [rule_always_accept, rule_ignore_q_pq_residual, rule_ignore_q_full_resample], ids=lambda r: r.__name__)
def test_wrong_rules_are_detected(cfg, rule):
    world = make_world(cfg)
    tokens, _ = simulate(world, cfg, rule)
    pv = p_values(tokens, exact_joint(world, cfg.k))
    print(f"\n{rule.__name__} {config_id(cfg)}: {fmt(pv)}")
    assert pv["joint"] < 1e-6, fmt(pv)


def test_verifying_against_unfiltered_target_is_detected():
    """A subtler mistake: verify against softmax(logits / T) without the request's top-p
    (the drafter still filters). Plain decoding samples from the filtered target."""
    cfg = Config(temperature=1.0, top_p=0.9, seed=9)
    world = make_world(cfg)
    unfiltered = make_world(Config(temperature=1.0, top_p=1.0, seed=9))
    wrong = World(target=unfiltered.target, markov=world.markov, parallel=world.parallel)
    tokens, _ = simulate(wrong, cfg, rule_ours)
    pv = p_values(tokens, exact_joint(world, cfg.k))
    print(f"\nunfiltered target, {config_id(cfg)}: {fmt(pv)}")
    assert pv["joint"] < 1e-6, fmt(pv)


@pytest.mark.parametrize("greedy_draft", [False, True], ids=["sampled-drafts", "argmax-drafts"])
def test_target_only_rule_is_also_lossless(greedy_draft):
    """Accepting with probability target(x) and resampling from the target minus x is
    lossless for ANY draft chosen independently of the verify uniforms (drafts from q or
    argmax q): the same statistics must not flag it. It is only less efficient."""
    cfg = Config(temperature=1.0, top_p=0.9, seed=6)
    world = make_world(cfg)
    tokens, _ = simulate(world, cfg, rule_target_only, greedy_draft=greedy_draft)
    pv = p_values(tokens, exact_joint(world, cfg.k))
    print(f"\ntarget-only ({'argmax' if greedy_draft else 'sampled'} drafts): {fmt(pv)}")
    assert min(pv.values()) > ALPHA / len(pv), fmt(pv)


# --------------------------------------------------------------------------- acceptance length


@pytest.mark.parametrize("drafter", ["markov", "parallel"])
def test_acceptance_length_pq_vs_target_only(drafter):
    """At T=1 the full target/draft ratio accepts at least as much as the target-only
    rule (greedy draft = argmax q, accept with probability target(x)) for a drafter that
    approximates the target. (Not a theorem for any q: target (.9, .1) with draft
    (.6, .4) accepts .7 per node under target/draft but .9 under target-only.)"""
    cfg = Config(temperature=1.0, block=8, k=8, drafter=drafter, seed=7)
    world = make_world(cfg)
    _, ours = simulate(world, cfg, rule_ours, samples=10_000)
    _, target_only = simulate(world, cfg, rule_target_only, samples=10_000, greedy_draft=True)
    ours_mean, base_mean = ours.float().mean().item(), target_only.float().mean().item()
    print(
        f"\n{drafter} drafter, N={cfg.block}, T=1: mean accepted drafts/step p/q={ours_mean:.3f} "
        f"(tau={ours_mean + 1:.3f}), target-only={base_mean:.3f} (tau={base_mean + 1:.3f})"
    )
    assert ours_mean >= base_mean - 0.02


def test_first_node_acceptance_rate_matches_theory():
    """One verify step from START: draft 1 is accepted with probability
    sum_x min(target(x), q(x)) under our rule, target(argmax q) under target-only."""
    cfg = Config(temperature=1.0, block=2, k=1, seed=8)
    world = make_world(cfg)
    p, q = world.target[1, START].double(), world.markov[1, START].double()
    samples = 40_000
    _, ours = simulate(world, cfg, rule_ours, samples=samples)
    _, base = simulate(world, cfg, rule_target_only, samples=samples, greedy_draft=True)
    for got, want in ((ours, torch.minimum(p, q).sum().item()), (base, p[q.argmax()].item())):
        rate = got.float().mean().item()
        sigma = (want * (1 - want) / samples) ** 0.5
        assert abs(rate - want) < 5 * sigma + 1e-9, (rate, want)


# --------------------------------------------------------------------------- mixed batches


def test_verify_chain_mixed_batch_routes_rows():
    """Greedy rows take the argmax path, sampled rows the rejection path with their
    own uniforms (the accept-test columns, then the residual column)."""
    gen = torch.Generator().manual_seed(11)
    bs, n = 5, 4
    greedy_rows = [True, False, True, False, False]
    logits = torch.randn(bs, n, V, generator=gen) * 3
    sampled = torch.tensor([i for i, g in enumerate(greedy_rows) if not g])
    sampling = RowSampling(
        temperature=torch.tensor([0.7, 1.0, 1.3]),
        top_k=torch.tensor([TOP_K_ALL, 5, TOP_K_ALL]),
        top_p=torch.tensor([0.9, 1.0, 1.0]),
        min_p=torch.tensor([0.0, 0.0, 0.1]),
    )
    draft_probs = torch.softmax(torch.randn(3, n - 1, V, generator=gen), -1)
    tokens = torch.randint(0, V, (bs, n), generator=gen)
    tokens[0, 1:] = logits[0, :-1].argmax(-1)  # a fully accepted greedy row
    tokens[1:, 1] = logits[1:, 0].argmax(-1)  # likely first acceptances elsewhere

    replay = torch.Generator().manual_seed(99)
    uniforms = torch.rand(3, 2 * n - 1, generator=replay)  # B = n here: n-1 draft, n-1 accept, 1 residual
    result = verify_chain(tokens, draft_probs, logits, SampledRows(index=sampled, params=sampling, uniforms=uniforms))

    greedy = greedy_chain_acceptance(tokens, logits.argmax(-1))
    for r in (0, 2):
        assert int(result.num_accepted[r]) == int(greedy.num_accepted[r])
        assert torch.equal(result.out_tokens[r], greedy.out_tokens[r])
        assert int(result.bonus[r]) == int(greedy.bonus[r])
    assert int(result.num_accepted[0]) == n - 1

    target = filtered_probs(logits[sampled].reshape(-1, V), sampling.repeat_interleave(n)).view(3, n, V)
    expected = chain_rejection_sample(tokens[sampled], target, draft_probs, uniforms[:, n - 1 : 2 * n - 2], uniforms[:, -1])
    assert torch.equal(result.num_accepted[sampled], expected.num_accepted)
    assert torch.equal(result.out_tokens[sampled], expected.out_tokens)
    assert torch.equal(result.bonus[sampled], expected.bonus)



# --------------------------------------------------------------------------- DFlash2 selector drafts
#
# A DFlash2 drafter draws node j+1 from q_j = softmax(score[j, i_{j-1}, :] / T) over its
# K candidates only, so its draft is a Markov chain over slots whose support is a small
# subset of the vocabulary. The production path (select_drafts, then verify_chain with
# q spread over the vocabulary) must still emit exactly the target's distribution.

SELECTOR_K, SELECTOR_RANK, SELECTOR_HIDDEN = 6, 4, 8


@dataclass
class SelectorWorld:
    """target_logits [P, V, V] (the target before filtering); target: the filtered
    distributions (for exact_joint); drafter logits [P, V, N-1, V] (the target's own
    at the slot's position plus noise, as the parallel drafter above) and hidden
    [P, V, N-1, H] per (first position, node 0, slot); the selector itself."""

    target_logits: torch.Tensor
    target: torch.Tensor
    logits: torch.Tensor
    hidden: torch.Tensor
    selector: torch.nn.Module


def make_selector_world(cfg: Config) -> SelectorWorld:
    from sglang_dflash.model.selector import CandidateSelector

    gen = torch.Generator().manual_seed(4321 + cfg.seed)
    positions = cfg.k + cfg.block + 1
    target_logits = torch.randn(positions, V, V, generator=gen) * 2.0
    params = _params(cfg, positions * V)
    target = filtered_probs(target_logits.reshape(-1, V), params).view(positions, V, V)
    shifted = torch.stack(
        [target_logits[(torch.arange(positions) + j + 1).clamp(max=positions - 1)] for j in range(cfg.block - 1)], dim=2
    )
    logits = shifted + torch.randn(shifted.shape, generator=gen)
    hidden = torch.randn(positions, V, cfg.block - 1, SELECTOR_HIDDEN, generator=gen)
    selector = CandidateSelector(SELECTOR_HIDDEN, V, SELECTOR_RANK, SELECTOR_K)
    with torch.no_grad():
        for p in selector.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return SelectorWorld(target_logits, target, logits, hidden, selector)


def _params(cfg: Config, rows: int) -> RowSampling:
    return RowSampling(
        temperature=torch.full((rows,), cfg.temperature),
        top_k=torch.full((rows,), cfg.top_k, dtype=torch.long),
        top_p=torch.full((rows,), cfg.top_p),
        min_p=torch.full((rows,), cfg.min_p),
    )


def selector_ours(selector, bonus, hidden, logits, sampled):
    from sglang_dflash.spec.selector import select_drafts

    return select_drafts(selector, bonus, hidden, logits, sampled)


def _selector_walk(selector, bonus, hidden, logits, sampled):
    from sglang_dflash.spec.selector import candidates, walk

    ids, unary = candidates(logits, selector.top_k)
    scores = selector.lattice(ids, unary, hidden, bonus)
    bs = ids.shape[0]
    index, q = walk(scores, greedy=torch.zeros(bs, dtype=torch.bool), temperature=sampled.params.temperature,
                    uniforms=sampled.draft_uniforms())
    return ids, scores, index, q


def selector_q_ignores_predecessor(selector, bonus, hidden, logits, sampled):
    """WRONG: draw the path correctly but report each slot's q from the first
    predecessor's row, not the drawn one's."""
    ids, scores, index, _ = _selector_walk(selector, bonus, hidden, logits, sampled)
    q = torch.softmax(scores[:, :, 0].float() / sampled.params.temperature[:, None, None], dim=-1)
    drafts = ids.gather(-1, index[..., None]).squeeze(-1)
    return drafts, torch.zeros(*ids.shape[:2], V).scatter_(-1, ids, q)


def selector_q_full_vocabulary(selector, bonus, hidden, logits, sampled):
    """WRONG: draw from the selector but report the drafter's full-vocabulary softmax
    (the DFlash v1 q) as the draft distribution."""
    ids, _, index, _ = _selector_walk(selector, bonus, hidden, logits, sampled)
    drafts = ids.gather(-1, index[..., None]).squeeze(-1)
    return drafts, torch.softmax(logits / sampled.params.temperature[:, None, None], dim=-1)


def simulate_selector(world: SelectorWorld, cfg: Config, rule, *, samples: int = SAMPLES, seed: int = 1):
    """Like :func:`simulate`, with DFlash2 selector drafts and ``verify_chain`` as the
    server runs them (the request's filters apply to the target, not to q)."""
    gen = torch.Generator().manual_seed(seed)
    n = cfg.block
    last_pos = world.target.shape[0] - 1
    rows = torch.arange(samples)

    def step(last: torch.Tensor, pos0: torch.Tensor) -> Acceptance:
        sampled = SampledRows(index=rows, params=_params(cfg, samples), uniforms=torch.rand(samples, 2 * n - 1, generator=gen))
        with torch.no_grad():
            drafts, draft_probs = rule(world.selector, last, world.hidden[pos0, last], world.logits[pos0, last], sampled)
        tokens = torch.cat([last[:, None], drafts], dim=1)
        positions = (pos0[:, None] + torch.arange(n) + 1).clamp(max=last_pos)
        return verify_chain(tokens, draft_probs, world.target_logits[positions, tokens], sampled)

    return speculate(samples, cfg.k, n, step)


SELECTOR_CONFIGS = [
    Config(temperature=1.0),
    Config(temperature=0.7, top_p=0.9, seed=1),
    Config(temperature=1.3, top_k=8, block=5, k=4, seed=2),
]


@pytest.mark.parametrize("cfg", SELECTOR_CONFIGS, ids=config_id)
def test_selector_drafts_are_lossless(cfg):
    world = make_selector_world(cfg)
    tokens, accepted = simulate_selector(world, cfg, selector_ours)
    pv = p_values(tokens, exact_joint(world, cfg.k))
    print(f"\nselector {config_id(cfg)}: accepted/step={accepted.float().mean():.3f} {fmt(pv)}")
    assert (accepted == cfg.block - 1).any() and (accepted < cfg.block - 1).any()
    assert min(pv.values()) > ALPHA / len(pv), fmt(pv)


@pytest.mark.parametrize("rule", [selector_q_ignores_predecessor, selector_q_full_vocabulary], ids=lambda r: r.__name__)
def test_wrong_selector_q_is_detected(rule):
    cfg = Config(temperature=1.0, seed=3)
    world = make_selector_world(cfg)
    tokens, _ = simulate_selector(world, cfg, rule)
    pv = p_values(tokens, exact_joint(world, cfg.k))
    print(f"\n{rule.__name__}: {fmt(pv)}")
    assert pv["joint"] < 1e-6, fmt(pv)
