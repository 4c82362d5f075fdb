"""Custom logit processors (``--enable-custom-logit-processor``) per verify node.

SGLang calls a processor with the rows of the requests that use it and their
``custom_params``, into which it puts ``"__req__"`` (the request) for processors that read
its history (``req.output_ids``: thinking budgets, n-gram bans). Here every verify node
is one row, and its ``__req__`` is the request as it would be had the node's path been
generated: ``output_ids`` is the request's output so far (the worker's own record, exact
under overlap scheduling) plus the drafted tokens on the node's path. Rows are called
after penalties, grammar and logit bias, as in SGLang's sampler.
"""

from __future__ import annotations

from array import array
from typing import Any, Optional

import torch

from ..spec.history import OutputHistory
from ..spec.verify_tree import VerifyTree

REQ_KEY = "__req__"


class RequestAtNode:
    """A request seen from one verify node: its output extended by the node's path;
    every other attribute is the request's own."""

    def __init__(self, req, output_ids: list[int]) -> None:
        object.__setattr__(self, "_req", req)
        object.__setattr__(self, "output_ids", array("q", output_ids))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._req, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._req, name, value)


def reads_request(params) -> bool:
    return isinstance(params, dict) and REQ_KEY in params


class CustomProcessorStep:
    """Runs each custom processor once over all nodes of its requests."""

    def __init__(self, sampling_info, outputs: dict[int, list[int]]) -> None:
        self.entries = list(sampling_info.custom_logit_processor.values())
        self.params = sampling_info.custom_params
        self.outputs = outputs  # batch row -> output ids so far (rows whose params read the request)

    def __call__(self, logits: torch.Tensor, tree: VerifyTree) -> torch.Tensor:
        bs, n, vocab = logits.shape
        flat = logits.view(bs * n, vocab)
        paths = self._paths(tree) if self.outputs else None
        for entry in self.entries:
            rows = list(entry.rows)
            index = torch.tensor([r * n + i for r in rows for i in range(n)], dtype=torch.long, device=logits.device)
            params = [self._params_at(r, i, paths) for r in rows for i in range(n)]
            result = entry.processor(flat.index_select(0, index), params)
            flat.index_copy_(0, index, result.to(flat.dtype))
        return logits

    def _params_at(self, row: int, node: int, paths: Optional[list]) -> Optional[dict]:
        params = self.params[row]
        if not reads_request(params):
            return params
        return {**params, REQ_KEY: RequestAtNode(params[REQ_KEY], self.outputs[row] + paths[row][node])}

    @staticmethod
    def _paths(tree: VerifyTree) -> list[list[list[int]]]:
        """Per request and node, the drafted tokens from the root (excluded) to the node."""
        tokens, parents = tree.tokens.tolist(), tree.parents.tolist()
        out = []
        for row_tokens, row_parents in zip(tokens, parents):
            paths = [[] for _ in row_tokens]
            for node in range(1, len(row_tokens)):  # parents precede children
                paths[node] = paths[row_parents[node]] + [row_tokens[node]]
            out.append(paths)
        return out


def custom_processor_step(batch, rids: list[str], bonus: torch.Tensor, history: OutputHistory) -> Optional[CustomProcessorStep]:
    sampling_info = batch.sampling_info
    if not sampling_info.has_custom_logit_processor or not sampling_info.custom_logit_processor:
        return None
    rows = [i for i, params in enumerate(sampling_info.custom_params or ()) if reads_request(params)]
    outputs = {}
    if rows:
        index = torch.tensor(rows, dtype=torch.long, device=bonus.device)
        listed = history.tokens([rids[i] for i in rows], bonus[index])
        outputs = {row: list(tokens) for row, tokens in zip(rows, listed)}
    return CustomProcessorStep(sampling_info, outputs)
