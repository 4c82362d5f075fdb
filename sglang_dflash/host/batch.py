"""The typed view through which the speculator reads SGLang's decode batch.

SGLang's ``ScheduleBatch`` carries the requests, their KV slot table, their sampling
state and our draft state (:class:`~.spec_inputs.DFlashDraftState`). :class:`DecodeView`
reads what one decode step needs, once, into plain tensors and lists with our own
names (the :class:`~sglang_dflash.spec.worker.DecodeBatch` protocol); nothing outside
``host/`` reads SGLang's batch, request or sampling fields.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..spec.logits import LogitsStep
from ..spec.sampling import RowSampling, SampledRows, request_uniforms

# SGLang seeds sampling only under --enable-deterministic-inference, with 42 by default.
DETERMINISTIC_DEFAULT_SEED = 42


def sampling_params_of(sampling_info) -> RowSampling:
    """SGLang's per-request sampling tensors as :class:`RowSampling` (one row per request)."""
    return RowSampling(
        temperature=sampling_info.temperatures.view(-1).float(),
        top_k=sampling_info.top_ks.view(-1).long(),
        top_p=sampling_info.top_ps.view(-1).float(),
        min_p=sampling_info.min_ps.view(-1).float(),
    )


class DecodeView:
    """One decode batch, read through SGLang 0.5.23's field names."""

    def __init__(
        self,
        batch,
        *,
        verify_width: int,
        block_size: int,
        rule: str,
        deterministic: bool,
        req_to_token,
        generator: torch.Generator,
    ) -> None:
        self.batch = batch
        state = batch.spec_info
        self.rids: list[str] = [r.rid for r in batch.reqs]
        self.bonus: torch.Tensor = state.bonus_tokens
        self.prefix_lens: torch.Tensor = batch.seq_lens
        self.prefix_lens_cpu: Optional[torch.Tensor] = batch.seq_lens_cpu
        self.plan_width_bound = self._width_bound(state, verify_width)
        self.sampled = self._sampled_rows(block_size, rule, deterministic, generator)
        self.logits_steps: list[LogitsStep] = []
        self._req_to_token = req_to_token
        self._rows: Optional[torch.Tensor] = None

    @property
    def device(self) -> torch.device:
        return self.prefix_lens.device

    def slot_rows(self, width: int) -> torch.Tensor:
        """[bs, width] the requests' rows of SGLang's ``req_to_token`` slot table."""
        if self._rows is None or self._rows.shape[1] < width:
            self._rows = self._req_to_token[self.batch.req_pool_indices.long(), :width]
        return self._rows[:, :width]

    def _width_bound(self, state, verify_width: int) -> int:
        """A host-side bound on ``prefix + verify width`` over the batch (no device sync)."""
        if self.prefix_lens_cpu is not None:
            return int(self.prefix_lens_cpu.max()) + verify_width
        return int(state.allocated_lens_cpu.max())

    def _sampled_rows(
        self, block_size: int, rule: str, deterministic: bool, generator: torch.Generator
    ) -> Optional[SampledRows]:
        """The batch's sampled requests (SGLang encodes greedy as top_k == 1), found on the host."""
        reqs = self.batch.reqs
        rows = [i for i, req in enumerate(reqs) if req.sampling_params.top_k != 1]
        if not rows:
            return None
        chosen = [reqs[i] for i in rows]
        default_seed = DETERMINISTIC_DEFAULT_SEED if deterministic else None
        seeds = [r.sampling_params.sampling_seed for r in chosen]
        uniforms = request_uniforms(
            [default_seed if seed is None else seed for seed in seeds],
            [r.decode_batch_idx for r in chosen],
            2 * block_size - 1,
            self.device,
            generator=generator,
        )
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        params = sampling_params_of(self.batch.sampling_info).select(index)
        return SampledRows(index=index, params=params, uniforms=uniforms, rule=rule)
