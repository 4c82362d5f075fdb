"""Shared fixtures: models built in code (or unpacked from PyPI), pooled SGLang servers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sglang_dflash.cpu_lane import CPU_ENV, activate

for _key, _value in CPU_ENV.items():
    os.environ.setdefault(_key, _value)
activate()  # the .pth boot hook ran before these variables were set

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / ".cache" / "models"


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_target(models_dir) -> Path:
    from sglang_dflash.devmodels.tiny import build_tiny_target

    return build_tiny_target(models_dir / "tiny-qwen3")


@pytest.fixture(scope="session")
def tiny_drafter(models_dir, tiny_target) -> Path:
    """A random 2-layer drafter (block 8) for the tiny target: exercises every code
    path, accepts almost nothing."""
    from sglang_dflash.devmodels.tiny import build_random_drafter

    return build_random_drafter(
        models_dir / "tiny-drafter", target=tiny_target, num_layers=2, block_size=8, target_layer_ids=[1, 2]
    )


@pytest.fixture(scope="session")
def trained_tiny_drafter(tiny_target) -> Path:
    """A 1-layer drafter distilled from the tiny target (~1-2 min of CPU, deterministic),
    cached under .cache/ keyed by the code that builds it: real multi-token acceptance."""
    import hashlib

    from sglang_dflash.devmodels import tiny, tiny_trained

    sources = [tiny.__file__, tiny_trained.__file__, REPO / "sglang_dflash" / "train.py"]
    key = hashlib.sha256(b"".join(Path(f).read_bytes() for f in sources)).hexdigest()[:12]
    out = MODELS / f"tiny-trained-drafter-{key}"
    if not (out / "model.safetensors").exists():
        tiny_trained.train_tiny_drafter(tiny_target, out)
    return out


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct converted from the PyPI wheel (cached under .cache/)."""
    from sglang_dflash.devmodels.smollm2 import convert

    return convert(MODELS / "smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_drafter() -> Path:
    """The trained drafter shipped in drafters/ (real acceptance on SmolLM2)."""
    return REPO / "drafters" / "smollm2-135m-dflash"


@pytest.fixture(scope="session")
def servers():
    from sglang_dflash.local_server import ServerPool

    pool = ServerPool(capacity=3)
    yield pool
    pool.close()
