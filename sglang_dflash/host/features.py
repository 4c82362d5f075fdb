"""Request features that change what decoding picks: each decode step's logits steps,
the output history they read, and the log-probabilities requests ask for.

A decode batch gets, in the order SGLang 0.5.23's sampler applies them without
speculation, only the steps some request in it needs:

1. penalties and ``min_new_tokens`` (:mod:`.penalties`), from the output history;
2. the grammar mask (:mod:`.grammar`);
3. ``logit_bias`` (:mod:`.penalties`);
4. custom logit processors (:mod:`.custom_processors`).

A batch that needs none of them gets no steps, and its step runs as before. After the
step, the committed tokens extend the history of the requests that keep one, and
requests with ``return_logprob`` get the emitted tokens' log-probabilities
(:mod:`.logprobs`). Histories live until their request finishes.
"""

from __future__ import annotations

import weakref
from typing import Callable, Optional

import torch

from ..spec.history import OutputHistory
from ..spec.logits import LogitsStep
from ..spec.ports import StepOutcome
from .custom_processors import custom_processor_step
from .grammar import GrammarStep, has_grammar
from .logprobs import write_logprobs
from .penalties import LogitBiasStep, penalty_step


class RequestFeatures:
    def __init__(self, vocab_size: int, device) -> None:
        self.history = OutputHistory(vocab_size, device)
        self._owners: dict[str, weakref.ref] = {}

    def on_prefill(self, batch) -> None:
        """A (re-)prefilled request's next bonus is a new output token of its history."""
        self._drop_finished()
        self.history.note_prefill([req.rid for req in batch.reqs if req.rid in self.history])

    def logits_steps(
        self, batch, rids: list[str], bonus: torch.Tensor, grammar_barrier: Optional[Callable[[], None]]
    ) -> list[LogitsStep]:
        """The decode batch's logits steps, in no-spec order (empty: nothing to do)."""
        sampling_info = batch.sampling_info
        if sampling_info is None:
            return []
        self._drop_finished()
        steps: list[LogitsStep] = []
        penalties = penalty_step(batch, rids, bonus, self.history)
        if penalties is not None:
            steps.append(penalties)
        if has_grammar(batch.reqs):
            steps.append(GrammarStep(batch.reqs, sampling_info.vocab_size, grammar_barrier))
        if sampling_info.logit_bias is not None:
            steps.append(LogitBiasStep(sampling_info.logit_bias))
        custom = custom_processor_step(batch, rids, bonus, self.history)
        if custom is not None:
            steps.append(custom)
        for req in batch.reqs:
            if req.rid in self.history and req.rid not in self._owners:
                self._owners[req.rid] = weakref.ref(req)
        return steps

    def after_step(self, batch, rids: list[str], outcome: StepOutcome, logits_output) -> None:
        """Extend the histories with the committed tokens; write requested log-probabilities."""
        acceptance = outcome.acceptance
        if self.history:
            self.history.commit(rids, acceptance.out_tokens, acceptance.commit_lens)
        if batch.return_logprob and logits_output is not None:
            write_logprobs(batch, logits_output, outcome.logits, acceptance)

    def forget(self, rid: str) -> None:
        self.history.forget(rid)
        self._owners.pop(rid, None)

    def _drop_finished(self) -> None:
        """Histories of requests that finished without a decode step telling us (e.g. at
        prefill, or aborted while waiting)."""
        for rid, owner in list(self._owners.items()):
            req = owner()
            if req is None or req.finished():
                self.forget(rid)
