"""Acceptance and step-time telemetry of the DFlash worker.

Consumers:

* ``get_server_info()["internal_states"][i]["dflash"]["stats"]``: running totals
  (steps, accepted drafts, committed vs verified tokens, tree paths accepted off the
  top-1 chain, draft and verify seconds, steps per verify length);
* Prometheus, when SGLang runs with ``--enable-metrics``: histograms of tokens
  committed per request per step, draft and verify step seconds, and the verify
  length the policy chose (``sglang:dflash_*``);
* per-request ``meta_info``: see :mod:`request_stats`.

Phase timers never synchronise the device: on CUDA they record events and read them
once SGLang has waited for the step's results anyway.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch


@dataclass
class Totals:
    steps: int = 0
    requests: int = 0
    committed_tokens: int = 0
    verified_tokens: int = 0
    # tree verification: accepted paths that left the top-1 chain (their KV was moved)
    off_chain_paths: int = 0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    timed_steps: dict = field(default_factory=lambda: {"draft": 0, "verify": 0})
    # verify length -> [steps that replayed a target CUDA graph, steps that ran eagerly]
    target_graph: dict = field(default_factory=dict)
    # draft steps that replayed a drafter CUDA graph, and those that ran eagerly
    draft_graph: list = field(default_factory=lambda: [0, 0])

    def as_dict(self) -> dict:
        def mean(name: str) -> Optional[float]:
            n = self.timed_steps[name]
            return round(getattr(self, f"{name}_seconds") / n * 1e3, 4) if n else None

        return {
            "steps": self.steps,
            "accepted_drafts": self.committed_tokens - self.requests,
            "off_chain_paths": self.off_chain_paths,
            "tokens_per_request_step": round(self.committed_tokens / self.requests, 4) if self.requests else None,
            "committed_per_verified": round(self.committed_tokens / self.verified_tokens, 4) if self.verified_tokens else None,
            "draft_ms_per_step": mean("draft"),
            "verify_ms_per_step": mean("verify"),
            "target_graph_by_verify_len": {
                str(n): {"graph": g, "eager": e} for n, (g, e) in sorted(self.target_graph.items())
            },
            "drafter_graph_steps": {"graph": self.draft_graph[0], "eager": self.draft_graph[1]},
        }


class PhaseTimer:
    """Wall time of named phases: perf_counter on CPU, CUDA events read lazily on GPU."""

    def __init__(self, device: torch.device | str) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self._pending: deque = deque()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._pending.append((name, start, end))
        else:
            start = time.perf_counter()
            yield
            self._pending.append((name, start, time.perf_counter()))

    def collect(self) -> list[tuple[str, float]]:
        """Finished phases since the last call, as (name, seconds)."""
        done = []
        while self._pending:
            name, start, end = self._pending[0]
            if self.cuda:
                if not end.query():
                    break
                seconds = start.elapsed_time(end) / 1e3
            else:
                seconds = end - start
            self._pending.popleft()
            done.append((name, seconds))
        return done


class DFlashMetrics:
    def __init__(self, *, block_size: int, device, prometheus_labels: Optional[dict] = None) -> None:
        self.totals = Totals()
        self.timer = PhaseTimer(device)
        self.prometheus = None if prometheus_labels is None else _PrometheusMetrics(block_size, prometheus_labels)

    def phase(self, name: str):
        return self.timer.phase(name)

    def note_graph(self, verify_len: int, graphed: bool) -> None:
        """Whether a step's target forward replayed a CUDA graph (a silent eager
        fallback must show up in the stats, per verify length)."""
        counts = self.totals.target_graph.setdefault(verify_len, [0, 0])
        counts[0 if graphed else 1] += 1

    def note_draft(self, replayed: bool) -> None:
        """Whether a draft step replayed a drafter CUDA graph (same reason as note_graph)."""
        self.totals.draft_graph[0 if replayed else 1] += 1

    def observe_step(self, verify_len: int, num_accepted: Sequence[int], off_chain: int = 0) -> None:
        """One decode step's outcome, once its accepted counts are on the host;
        ``off_chain``: requests whose accepted tree path left the top-1 chain."""
        t = self.totals
        t.steps += 1
        t.off_chain_paths += off_chain
        t.requests += len(num_accepted)
        t.committed_tokens += sum(int(a) + 1 for a in num_accepted)
        t.verified_tokens += verify_len * len(num_accepted)
        for name, seconds in self.timer.collect():
            setattr(t, f"{name}_seconds", getattr(t, f"{name}_seconds") + seconds)
            t.timed_steps[name] += 1
            if self.prometheus is not None:
                self.prometheus.observe_seconds(name, seconds)
        if self.prometheus is not None:
            self.prometheus.observe_step(verify_len, num_accepted)


class _PrometheusMetrics:
    """Created in the scheduler process after SGLang set PROMETHEUS_MULTIPROC_DIR."""

    def __init__(self, block_size: int, labels: dict) -> None:
        from prometheus_client import Histogram

        self.labels = labels
        names = list(labels)
        self.accept_length = Histogram(
            "sglang:dflash_accept_length",
            "Tokens committed per request per DFlash verify step (accepted drafts + bonus).",
            labelnames=names,
            buckets=[x + 0.5 for x in range(block_size + 1)],
        )
        self.verify_length = Histogram(
            "sglang:dflash_verify_length",
            "Verify length chosen per DFlash decode step (1 = speculation off).",
            labelnames=names,
            buckets=[x + 0.5 for x in range(2 * block_size + 1)],
        )
        seconds = [1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
        self.step_seconds = {
            phase: Histogram(
                f"sglang:dflash_{phase}_step_seconds",
                f"Wall time of the DFlash {phase} phase of one decode step.",
                labelnames=names,
                buckets=seconds,
            )
            for phase in ("draft", "verify")
        }

    def observe_step(self, verify_len: int, num_accepted: Sequence[int]) -> None:
        self.verify_length.labels(**self.labels).observe(verify_len)
        hist = self.accept_length.labels(**self.labels)
        for accepted in num_accepted:
            hist.observe(int(accepted) + 1)

    def observe_seconds(self, phase: str, seconds: float) -> None:
        self.step_seconds[phase].labels(**self.labels).observe(seconds)
