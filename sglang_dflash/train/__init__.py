"""Drafter training: distil a DFlash drafter from a Hugging Face target.

``python -m sglang_dflash.train --help`` runs :mod:`.trainer`; the pieces are the
prompts (:mod:`.prompts`), target-generated data with captured features (:mod:`.data`),
the warm start (:mod:`.init`), the block objective (:mod:`.objective`) and the
held-out acceptance loop (:mod:`.eval`).
"""

from .trainer import TrainArgs, TrainResult, main, train, write_report

__all__ = ["TrainArgs", "TrainResult", "main", "train", "write_report"]
