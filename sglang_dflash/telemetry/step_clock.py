"""Wall time of decode steps, measured from one decode step's start to the next's.

Start-to-start covers everything a step costs the server -- drafting, verifying, the
scheduler's own work and, under overlap scheduling, the pipelined device time --
without synchronising the device. An interval that contains another forward (a
prefill, a mixed batch) is not a decode step's cost and is dropped.
"""

from __future__ import annotations

import time
from typing import Optional

from ..spec.adaptive import StepCostModel


class StepClock:
    def __init__(self, cost: StepCostModel) -> None:
        self.cost = cost
        self._open: Optional[tuple[float, int, int]] = None

    def decode_started(self, batch_size: int, verify_len: int) -> None:
        now = time.perf_counter()
        if self._open is not None:
            started, bs, length = self._open
            self.cost.observe(bs, length, now - started)
        self._open = (now, batch_size, verify_len)

    def other_forward(self) -> None:
        self._open = None
