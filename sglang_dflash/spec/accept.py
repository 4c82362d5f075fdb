"""Accept: from the target's verdict on a verify batch to the tokens a step commits.

Three rules, one outcome type (:class:`Acceptance`):

* **greedy chain** -- the longest run of drafts equal to the target's argmax, plus the
  target's own next token (the bonus); greedy output is then exactly the target's;
* **greedy tree** -- the same walk from the root of a top-k verify tree, each step to the
  child carrying the target's argmax;
* **p/q rejection sampling** -- for sampled requests: each draft kept with probability
  ``min(1, target / draft)``, the first rejection replaced by a draw from the residual;
  every emitted token is distributed exactly as the target's own sample.

:func:`verify_chain` applies greedy to greedy rows and rejection sampling to sampled
rows of one batch. The worker finds the sampled rows on the host, so a mixed batch
costs no device sync, and the [rows, N, V] probability tensors exist only for them.

Glossary (per request, verify width ``N``; node 0 is the previous bonus token, which
the target has not seen yet, nodes 1..N-1 are drafts):

* ``target_top1[j]``: the target's argmax *after* node j, i.e. its choice for node j+1.
* ``num_accepted``: the longest run of drafts with ``draft[j] == target_top1[j-1]``.
* ``commit_len = num_accepted + 1``: tokens whose target KV is now valid (node 0 plus
  the accepted drafts); it is also the number of tokens emitted this step.
* emitted tokens: ``target_top1[0 : commit_len]`` -- the accepted drafts (equal to the
  target's own choices) followed by the new bonus ``target_top1[num_accepted]``.

Rejection sampling, without letters (papers disagree on which of p/q is the draft):

* ``target_probs[j]``: the target's distribution for node j+1 given nodes 0..j
  (what plain decoding would sample from, see :mod:`.sampling`);
* ``draft_probs[j]``: the drafter's distribution that node j+1 was sampled from;
  a greedy (deterministic) draft is the one-hot of its token.

Draft ``x = node j+1`` is accepted with probability ``min(1, target(x) / draft(x))``.
At the first rejection, the replacement is sampled from the residual
``normalise(max(0, target - draft))``; if every draft is accepted, the bonus is sampled
from ``target_probs[N-1]`` (Leviathan et al. 2023, Chen et al. 2023). With a one-hot
draft, acceptance probability is ``target(x)`` and the residual is the target with ``x``
removed: the "target-only" rule as a special case. Uniforms are arguments, so seeded
requests are reproducible and tests can drive the sampler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .sampling import SampledRows, filtered_probs


@dataclass
class Acceptance:
    """Per-request outcome of one verify step.

    num_accepted: [bs] accepted drafts (bonus not counted).
    out_tokens:   [bs, N] emitted tokens in columns ``0 .. num_accepted``; the rest is padding.
    bonus:        [bs] the last emitted token: the next block's node 0.
    """

    num_accepted: torch.Tensor
    out_tokens: torch.Tensor
    bonus: torch.Tensor

    @property
    def commit_lens(self) -> torch.Tensor:
        return self.num_accepted + 1


def greedy_chain_acceptance(draft_tokens: torch.Tensor, target_top1: torch.Tensor) -> Acceptance:
    """draft_tokens, target_top1: [bs, N] -> Acceptance (vectorised, no host sync)."""
    matches = (draft_tokens[:, 1:] == target_top1[:, :-1]).int()
    num_accepted = matches.cumprod(dim=1).sum(dim=1)
    bonus = target_top1.gather(1, num_accepted[:, None]).squeeze(1)
    return Acceptance(num_accepted=num_accepted, out_tokens=target_top1.clone(), bonus=bonus)


@dataclass
class TreeAcceptance(Acceptance):
    """path: [bs, D+1] node index at each accepted depth (padded with the last node)."""

    path: torch.Tensor = None


def greedy_tree_acceptance(tokens: torch.Tensor, parents: torch.Tensor, target_top1: torch.Tensor, max_depth: int) -> TreeAcceptance:
    """Walk from the root, each step to the child whose token is the target's argmax.

    tokens, parents, target_top1: [bs, N]. Children of one node carry distinct tokens
    except padding copies, which come after the real child, so taking the first match
    is deterministic. Emitted tokens are the target's argmax along the accepted path.
    """
    bs = tokens.shape[0]
    rows = torch.arange(bs, device=tokens.device)
    cur = torch.zeros(bs, dtype=torch.long, device=tokens.device)
    alive = torch.ones(bs, dtype=torch.bool, device=tokens.device)
    path = [cur]
    for _ in range(max_depth):
        want = target_top1[rows, cur]
        match = (parents == cur[:, None]) & (tokens == want[:, None])
        alive = alive & match.any(dim=1)
        cur = torch.where(alive, match.int().argmax(dim=1), cur)
        path.append(cur)
    path = torch.stack(path, dim=1)
    num_accepted = (path[:, 1:] != path[:, :-1]).sum(dim=1)
    out_tokens = target_top1.gather(1, path)
    bonus = out_tokens[rows, num_accepted]
    return TreeAcceptance(num_accepted=num_accepted, out_tokens=out_tokens, bonus=bonus, path=path)


def off_chain_paths(acceptance: Acceptance) -> Optional[torch.Tensor]:
    """How many requests of a tree step accepted a path off the top-1 chain (a 0-d
    device tensor, for telemetry; None for a chain step). The chain is nodes 0..B-1,
    node d at depth d, so a path ends on it exactly when its last node's index equals
    its depth; off it, the path's target KV is moved to the committed slots."""
    path = getattr(acceptance, "path", None)
    return None if path is None else (path[:, -1] != acceptance.num_accepted).sum()


# ---------------------------------------------------------------- p/q rejection sampling
def chain_rejection_sample(
    draft_tokens: torch.Tensor,
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    uniforms: torch.Tensor,
    residual_uniforms: torch.Tensor,
) -> Acceptance:
    """
    draft_tokens:      [bs, N] node 0 = previous bonus, nodes 1.. = drafts.
    target_probs:      [bs, N, V] target distribution after each node.
    draft_probs:       [bs, N-1, V] distribution each draft was sampled from.
    uniforms:          [bs, N-1] U(0,1) for the accept tests.
    residual_uniforms: [bs] U(0,1) for the replacement / bonus draw.
    """
    bs, n, _ = target_probs.shape
    drafts = draft_tokens[:, 1:]
    p_draft = target_probs[:, :-1].gather(-1, drafts[..., None]).squeeze(-1)
    q_draft = draft_probs.gather(-1, drafts[..., None]).squeeze(-1)
    accept = uniforms * q_draft < p_draft  # u < p/q without dividing by q
    num_accepted = accept.int().cumprod(dim=1).sum(dim=1)

    rows = torch.arange(bs, device=target_probs.device)
    final = target_probs[rows, num_accepted]
    rejected = num_accepted < n - 1
    safe_idx = num_accepted.clamp(max=n - 2)
    residual = (final - draft_probs[rows, safe_idx]).clamp_min(0)
    mass = residual.sum(dim=-1, keepdim=True)
    # A zero residual means target == draft at that node, which rejects with
    # probability zero; keep the target there so the draw stays well defined.
    residual = torch.where(mass > 0, residual / mass.clamp_min(torch.finfo(mass.dtype).tiny), final)
    dist = torch.where(rejected[:, None], residual, final)
    bonus = sample_from(dist, residual_uniforms)

    out_tokens = torch.cat([drafts, drafts[:, :1]], dim=1).clone()
    out_tokens.scatter_(1, num_accepted[:, None], bonus[:, None])
    return Acceptance(num_accepted=num_accepted, out_tokens=out_tokens, bonus=bonus)


def sample_from(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: probs [R, V], uniforms [R] -> token ids [R]."""
    cdf = probs.float().cumsum(dim=-1)
    target = uniforms.float()[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, target, right=True).clamp(max=probs.shape[-1] - 1).squeeze(-1)


def one_hot_probs(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The distribution of a deterministic draft: [...] -> [..., V]."""
    return torch.nn.functional.one_hot(tokens.long(), vocab_size).float()


# ---------------------------------------------------------------- one verified chain
# (draft_tokens, target_top1) -> Acceptance: greedy_chain_acceptance, or its one-launch
# Triton twin on CUDA (sglang_dflash.gpu.fused_greedy_acceptance).
GreedyRule = Callable[[torch.Tensor, torch.Tensor], Acceptance]


def verify_chain(
    tokens: torch.Tensor,
    draft_probs: Optional[torch.Tensor],
    target_logits: torch.Tensor,
    sampled: Optional[SampledRows],
    greedy: GreedyRule = greedy_chain_acceptance,
) -> Acceptance:
    """Acceptance of every row of a verified chain, greedy and sampled rows together.

    tokens: [bs, N] the chain (node 0 = previous bonus); draft_probs: [S, N-1, V] the
    drafter distributions of the sampled rows (None: argmax drafts); target_logits:
    [bs, N, V]. Greedy rows accept by exact argmax match (``greedy``); sampled rows'
    outcomes then overwrite theirs.
    """
    result = greedy(tokens, target_logits.argmax(dim=-1))
    if sampled is None:
        return result
    rows = sampled.index
    s, n = rows.numel(), tokens.shape[1]
    vocab = target_logits.shape[-1]
    target_probs = filtered_probs(target_logits[rows].reshape(s * n, vocab), sampled.params.repeat_interleave(n))
    if n == 1:  # nothing drafted (speculation off): a plain sample from the target
        result.bonus[rows] = sample_from(target_probs, sampled.residual_uniforms())
        result.out_tokens[rows, 0] = result.bonus[rows]
        return result
    if draft_probs is None:  # target-only rule: the draft was a deterministic argmax
        draft_probs = one_hot_probs(tokens[rows, 1:], vocab)
    outcome = chain_rejection_sample(
        tokens[rows],
        target_probs.view(s, n, vocab),
        draft_probs,
        sampled.accept_uniforms(n - 1),
        sampled.residual_uniforms(),
    )
    result.num_accepted[rows] = outcome.num_accepted
    result.out_tokens[rows] = outcome.out_tokens
    result.bonus[rows] = outcome.bonus
    return result
