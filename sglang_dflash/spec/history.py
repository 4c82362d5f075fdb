"""Each request's output so far, kept by the speculator from its own step outcomes.

Penalties, a minimum length and custom logit processors read a request's output
history. SGLang keeps that history on the host (``req.output_ids``), where under overlap
scheduling it lags the device by a whole step (up to a block of tokens); so the worker
keeps its own copy, updated from every step's committed tokens on the device, which is
exact whatever the scheduler's overlap.

Per request, two forms, each kept only for requests that need it:

* ``counts``: [V] int32 on the device, how often each token was output (rows of one
  pooled tensor, so a batch reads and writes its rows with one gather/scatter);
* ``tokens``: the output ids on the host, for logit processors that read them.

Both include the request's current bonus token (the last output token, node 0 of its
next verify block). A request's first decode step after a prefill records that bonus:
the prefill emitted it, and a (re-)prefill is announced by :meth:`note_prefill`.
"""

from __future__ import annotations

from typing import Sequence

import torch


class OutputHistory:
    def __init__(self, vocab_size: int, device) -> None:
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        # Column V is a write-off column: padding positions scatter there.
        self._counts = torch.zeros(0, vocab_size + 1, dtype=torch.int32, device=self.device)
        self._slots: dict[str, int] = {}
        self._free: list[int] = []
        self._tokens: dict[str, list[int]] = {}
        self._pending_counts: set[str] = set()
        self._pending_tokens: set[str] = set()

    def __contains__(self, rid: str) -> bool:
        return rid in self._slots or rid in self._tokens

    def __bool__(self) -> bool:
        return bool(self._slots) or bool(self._tokens)

    # ---------------------------------------------------------------- lifecycle
    def note_prefill(self, rids: Sequence[str]) -> None:
        """These requests were (re-)prefilled: their next bonus is a new output token."""
        for rid in rids:
            if rid in self._slots:
                self._pending_counts.add(rid)
            if rid in self._tokens:
                self._pending_tokens.add(rid)

    def forget(self, rid: str) -> None:
        slot = self._slots.pop(rid, None)
        if slot is not None:
            self._free.append(slot)
        self._tokens.pop(rid, None)
        self._pending_counts.discard(rid)
        self._pending_tokens.discard(rid)

    # ---------------------------------------------------------------- reads
    def counts(self, rids: Sequence[str], bonus: torch.Tensor) -> torch.Tensor:
        """[R, V] int32 output-token counts of ``rids`` (bonus [R] included)."""
        slots = [self._slot(rid) for rid in rids]
        index = torch.tensor(slots, dtype=torch.long, device=self.device)
        pending = [i for i, rid in enumerate(rids) if rid in self._pending_counts]
        if pending:
            rows = torch.tensor(pending, dtype=torch.long, device=self.device)
            ones = torch.ones(len(pending), dtype=torch.int32, device=self.device)
            self._counts.index_put_((index[rows], bonus[rows].long()), ones, accumulate=True)
            self._pending_counts.difference_update(rids[i] for i in pending)
        return self._counts.index_select(0, index)[:, : self.vocab_size]

    def tokens(self, rids: Sequence[str], bonus: torch.Tensor) -> list[list[int]]:
        """The output ids of ``rids`` on the host (bonus included); syncs only to record
        the bonus of a request's first step after a prefill."""
        pending = [i for i, rid in enumerate(rids) if rid not in self._tokens or rid in self._pending_tokens]
        if pending:
            firsts = bonus[torch.tensor(pending, device=bonus.device)].tolist()
            for i, token in zip(pending, firsts):
                self._tokens.setdefault(rids[i], []).append(int(token))
                self._pending_tokens.discard(rids[i])
        return [self._tokens[rid] for rid in rids]

    # ---------------------------------------------------------------- writes
    def commit(self, rids: Sequence[str], out_tokens: torch.Tensor, commit_lens: torch.Tensor) -> None:
        """Record one step's committed tokens: ``out_tokens[i, :commit_lens[i]]`` of
        request ``rids[i]`` (the new bonus last). Requests without a record are skipped."""
        counted = [i for i, rid in enumerate(rids) if rid in self._slots]
        if counted:
            rows = torch.tensor(counted, dtype=torch.long, device=out_tokens.device)
            tokens = out_tokens[rows].long()
            valid = torch.arange(tokens.shape[1], device=tokens.device)[None, :] < commit_lens[rows][:, None]
            tokens = torch.where(valid, tokens, torch.full_like(tokens, self.vocab_size))
            slots = torch.tensor([self._slots[rids[i]] for i in counted], dtype=torch.long, device=self.device)
            self._counts.index_put_(
                (slots[:, None].expand_as(tokens), tokens.to(self.device)),
                torch.ones(tokens.shape, dtype=torch.int32, device=self.device),
                accumulate=True,
            )
        listed = [i for i, rid in enumerate(rids) if rid in self._tokens]
        if listed:
            rows = torch.tensor(listed, dtype=torch.long, device=out_tokens.device)
            for i, row, n in zip(listed, out_tokens[rows].tolist(), commit_lens[rows].tolist()):
                self._tokens[rids[i]].extend(int(t) for t in row[:n])

    def _slot(self, rid: str) -> int:
        """The request's row of the pooled counts (a new, zeroed row for a new request)."""
        slot = self._slots.get(rid)
        if slot is not None:
            return slot
        if not self._free:
            old = self._counts.shape[0]
            grown = torch.zeros(max(8, 2 * old), self.vocab_size + 1, dtype=torch.int32, device=self.device)
            grown[:old] = self._counts
            self._counts = grown
            self._free = list(range(grown.shape[0] - 1, old - 1, -1))
        slot = self._free.pop()
        self._counts[slot].zero_()
        self._slots[rid] = slot
        self._pending_counts.add(rid)
        return slot
