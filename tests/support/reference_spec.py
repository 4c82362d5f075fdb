"""Plain-Python references for the verification maths (no torch in the references).

Each function here restates one rule from its definition, as simply as possible, so the
vectorised library code can be compared with it:

* :func:`sglang_filter_reference`: SGLang 0.5.23's torch sampler filter
  (``top_k_top_p_min_p_sampling_from_probs_torch``), step by step;
* :func:`greedy_chain_reference`: argmax acceptance along a verify chain;
* :func:`stop_truncate` / :func:`greedy_decode_reference`: what the scheduler emits
  (up to and including the first stop token, at most ``max_new_tokens``);
* :func:`ancestor_sets` / :func:`depths_from_parents` / :func:`custom_mask_reference`:
  the verify tree and SGLang's flattened ``[N, P+N]`` tree mask;
* :func:`chi_square_gof`: a chi-square goodness-of-fit test that pools sparse cells.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence


# --------------------------------------------------------------------------- sampling


def sglang_filter_reference(
    logits: Sequence[float],
    temperature: float,
    top_k: int,
    top_p: float,
    min_p: float,
) -> list[float]:
    """The normalised distribution SGLang's torch sampler draws one row from.

    Steps, as in ``Sampler.forward`` + ``top_k_top_p_min_p_sampling_from_probs_torch``:
    ``softmax(logits / T)``; sort descending; zero ranks ``>= top_k``; zero entries whose
    *unfiltered* cumulative mass before them exceeds ``top_p``; zero entries below
    ``min_p * (largest remaining)``; multinomial draws proportionally to what is left.
    """
    scaled = [x / temperature for x in logits]
    top = max(scaled)
    exps = [math.exp(x - top) for x in scaled]
    total = sum(exps)
    probs = [e / total for e in exps]
    # Stable sort by descending probability (ties keep index order).
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept = {}
    before = 0.0
    for rank, idx in enumerate(order):
        p = probs[idx]
        keep = rank < top_k and before <= top_p
        before += p  # the cumulative sum is taken before any entry is zeroed
        kept[idx] = p if keep else 0.0
    largest = kept[order[0]]
    for idx in order:
        if kept[idx] < min_p * largest:
            kept[idx] = 0.0
    mass = sum(kept.values())
    return [kept[i] / mass for i in range(len(probs))]


# --------------------------------------------------------------------------- greedy


def greedy_chain_reference(draft: Sequence[int], top1: Sequence[int]) -> tuple[int, list[int]]:
    """One request's verify chain -> (accepted drafts, emitted tokens).

    ``draft[0]`` is the previous bonus, ``draft[j]`` (j >= 1) a drafted token;
    ``top1[j]`` is the target's argmax after node j. Draft j is accepted while every
    draft up to it equals the target's choice; the emitted tokens are the accepted
    drafts followed by the target's choice after the last accepted node.
    """
    accepted = 0
    for j in range(1, len(draft)):
        if draft[j] != top1[j - 1]:
            break
        accepted += 1
    return accepted, [int(t) for t in top1[: accepted + 1]]


def stop_truncate(tokens: Iterable[int], stop_ids: Iterable[int], budget: int) -> tuple[list[int], bool]:
    """Scheduler-side output of a step: keep tokens up to and including the first stop
    token, and at most ``budget`` of them. Returns (kept, finished)."""
    stop = set(stop_ids)
    kept: list[int] = []
    for tok in tokens:
        if len(kept) >= budget:
            return kept, True
        kept.append(int(tok))
        if tok in stop:
            return kept, True
    return kept, len(kept) >= budget


def greedy_decode_reference(
    next_token: Callable[[int, int], int],
    start: int,
    max_new_tokens: int,
    stop_ids: Iterable[int],
) -> list[int]:
    """Plain greedy decoding of a Markov target: ``next_token(position, previous)``.

    ``start`` sits at position 0; the first generated token is at position 1.
    """
    stop = set(stop_ids)
    out: list[int] = []
    prev = start
    while len(out) < max_new_tokens:
        prev = next_token(len(out) + 1, prev)
        out.append(prev)
        if prev in stop:
            break
    return out


# --------------------------------------------------------------------------- verify tree


def depths_from_parents(parents: Sequence[int]) -> list[int]:
    depths = []
    for i, p in enumerate(parents):
        assert (i == 0 and p == -1) or 0 <= p < i, "parents must precede their children"
        depths.append(0 if p < 0 else depths[p] + 1)
    return depths


def ancestor_sets(parents: Sequence[int]) -> list[set[int]]:
    """Node i -> {i} plus every ancestor of i (walked up the parent links)."""
    sets = []
    for i in range(len(parents)):
        seen = {i}
        node = parents[i]
        while node >= 0:
            seen.add(node)
            node = parents[node]
        sets.append(seen)
    return sets


def custom_mask_reference(parents_per_request: Sequence[Sequence[int]], prefix_lens: Sequence[int]) -> list[bool]:
    """SGLang's flattened verify mask: per request, row-major ``[N, P+N]`` (True = may
    attend): the whole prefix, then the node's ancestors and itself; requests concatenated."""
    flat: list[bool] = []
    for parents, p in zip(parents_per_request, prefix_lens):
        anc = ancestor_sets(parents)
        n = len(parents)
        for i in range(n):
            flat.extend([True] * p)
            flat.extend(j in anc[i] for j in range(n))
    return flat


# --------------------------------------------------------------------------- statistics


def chi_square_gof(counts: Sequence[float], expected_probs: Sequence[float], min_expected: float = 5.0):
    """Pearson chi-square goodness of fit of ``counts`` to ``expected_probs``.

    Cells whose expected count is below ``min_expected`` are pooled into one cell (and
    that pool is merged into the smallest regular cell if it is itself too small), so
    the chi-square approximation holds. A count in a cell of probability zero makes the
    fit impossible: p-value 0. Returns (statistic, dof, p-value).
    """
    from scipy.stats import chi2

    n = float(sum(counts))
    if any(c > 0 and e <= 0 for c, e in zip(counts, expected_probs)):
        return math.inf, 0, 0.0
    cells = [(float(c), n * float(e)) for c, e in zip(counts, expected_probs) if e > 0]
    regular = [cell for cell in cells if cell[1] >= min_expected]
    small = [cell for cell in cells if cell[1] < min_expected]
    pool = (sum(c for c, _ in small), sum(e for _, e in small))
    if pool[1] > 0:
        if pool[1] >= min_expected or not regular:
            regular.append(pool)
        else:
            regular.sort(key=lambda cell: cell[1])
            c, e = regular[0]
            regular[0] = (c + pool[0], e + pool[1])
    if len(regular) < 2:
        return 0.0, 0, 1.0
    stat = sum((c - e) ** 2 / e for c, e in regular)
    dof = len(regular) - 1
    return stat, dof, float(chi2.sf(stat, dof))
