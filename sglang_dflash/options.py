"""sglang-dflash's own launch options, and how they reach SGLang's worker processes.

SGLang's ``ServerArgs`` is a closed msgspec struct, so options of this package cannot
be fields there. The plugin adds them to SGLang's command line; the main process
copies the parsed values into ``SGLANG_DFLASH_*`` environment variables before it
spawns the scheduler, and the worker reads them back once into a frozen
:class:`DFlashOptions`. Programmatic ``sglang.Engine`` users set the same variables.

Flags (environment variable):

* ``--speculative-dflash-adaptive`` / ``--no-speculative-dflash-adaptive``
  (``SGLANG_DFLASH_ADAPTIVE``, default on): pick the verify length each step from the
  batch size and measured acceptance; 1 turns speculation off under load.
* ``--speculative-dflash-verify-len N`` (``SGLANG_DFLASH_VERIFY_LEN``): fixed verify
  length; overrides the adaptive policy.
* ``--speculative-dflash-tree-topk K`` (``SGLANG_DFLASH_TREE_TOPK``, default 1): K > 1
  verifies a top-K tree built from the single block forward (greedy batches; a batch
  with sampled requests verifies the chain); its node budget is
  ``--speculative-num-draft-tokens`` and the block ``--speculative-dflash-block-size``.
* ``--speculative-dflash-sampling {pq,target-only}`` (``SGLANG_DFLASH_SAMPLING``,
  default pq): how sampled requests draft and accept (both lossless).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Mapping, Optional

ENV_ADAPTIVE = "SGLANG_DFLASH_ADAPTIVE"
ENV_VERIFY_LEN = "SGLANG_DFLASH_VERIFY_LEN"
ENV_TREE_TOPK = "SGLANG_DFLASH_TREE_TOPK"
ENV_SAMPLING = "SGLANG_DFLASH_SAMPLING"
PQ, TARGET_ONLY = "pq", "target-only"
SAMPLING_RULES = (PQ, TARGET_ONLY)


class DFlashOptionsError(ValueError):
    pass


@dataclass(frozen=True)
class DFlashOptions:
    adaptive: bool = True
    verify_len: Optional[int] = None
    tree_topk: int = 1
    sampling_rule: str = "pq"

    @property
    def tree(self) -> bool:
        return self.tree_topk > 1

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "DFlashOptions":
        adaptive = environ.get(ENV_ADAPTIVE, "1").strip().lower() not in ("0", "false", "no", "off")
        verify_len = environ.get(ENV_VERIFY_LEN)
        options = cls(
            adaptive=adaptive,
            verify_len=int(verify_len) if verify_len else None,
            tree_topk=int(environ.get(ENV_TREE_TOPK, "1") or 1),
            sampling_rule=environ.get(ENV_SAMPLING, "pq") or "pq",
        )
        options.validate()
        return options

    def validate(self) -> None:
        if self.verify_len is not None and self.verify_len < 1:
            raise DFlashOptionsError(f"--speculative-dflash-verify-len must be >= 1, got {self.verify_len}")
        if self.tree_topk < 1:
            raise DFlashOptionsError(f"--speculative-dflash-tree-topk must be >= 1, got {self.tree_topk}")
        if self.sampling_rule not in SAMPLING_RULES:
            raise DFlashOptionsError(
                f"--speculative-dflash-sampling must be one of {list(SAMPLING_RULES)}, got {self.sampling_rule!r}"
            )
        if self.tree and self.verify_len is not None:
            raise DFlashOptionsError("--speculative-dflash-verify-len cannot be combined with tree verification")

    def to_env(self) -> dict[str, str]:
        env = {
            ENV_ADAPTIVE: "1" if self.adaptive else "0",
            ENV_TREE_TOPK: str(self.tree_topk),
            ENV_SAMPLING: self.sampling_rule,
        }
        if self.verify_len is not None:
            env[ENV_VERIFY_LEN] = str(self.verify_len)
        return env


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sglang-dflash")
    group.add_argument(
        "--speculative-dflash-adaptive",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="DFLASH (sglang-dflash): choose the verify length per step from batch size and "
        "measured acceptance, down to 1 (speculation off) under load. Default: on.",
    )
    group.add_argument(
        "--speculative-dflash-verify-len",
        type=int,
        default=None,
        help="DFLASH (sglang-dflash): fixed verify length (1..block size); overrides the adaptive policy.",
    )
    group.add_argument(
        "--speculative-dflash-tree-topk",
        type=int,
        default=None,
        help="DFLASH (sglang-dflash): verify a top-K tree (K > 1) built from the block's draft "
        "distributions; --speculative-num-draft-tokens is its node budget.",
    )
    group.add_argument(
        "--speculative-dflash-sampling",
        choices=SAMPLING_RULES,
        default=None,
        help="DFLASH (sglang-dflash), sampled requests: 'pq' drafts from the drafter's distribution and "
        "accepts with min(1, target/draft) (default); 'target-only' drafts the argmax and accepts with "
        "the target's probability (SGLang's built-in rule). Both are lossless.",
    )


def export_cli_args(args: argparse.Namespace, environ=os.environ) -> None:
    """Copy our parsed flags into the environment the scheduler processes inherit."""
    current = DFlashOptions.from_env(environ)
    adaptive = getattr(args, "speculative_dflash_adaptive", None)
    verify_len = getattr(args, "speculative_dflash_verify_len", None)
    topk = getattr(args, "speculative_dflash_tree_topk", None)
    rule = getattr(args, "speculative_dflash_sampling", None)
    options = DFlashOptions(
        adaptive=current.adaptive if adaptive is None else bool(adaptive),
        verify_len=current.verify_len if verify_len is None else verify_len,
        tree_topk=current.tree_topk if topk is None else topk,
        sampling_rule=current.sampling_rule if rule is None else rule,
    )
    options.validate()
    environ.update(options.to_env())
