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
    from sglang_dflash.testing.devmodels.tiny import build_tiny_target

    return build_tiny_target(models_dir / "tiny-qwen3")


@pytest.fixture(scope="session")
def tiny_drafter(models_dir, tiny_target) -> Path:
    """A random 2-layer drafter (block 8) for the tiny target: for start-up, refusals
    and code paths that need no acceptance (it accepts almost nothing, so losslessness
    tests use ``trained_tiny_drafter``)."""
    from sglang_dflash.testing.devmodels.tiny import build_random_drafter

    return build_random_drafter(
        models_dir / "tiny-drafter", target=tiny_target, num_layers=2, block_size=8, target_layer_ids=[1, 2]
    )


@pytest.fixture(scope="session")
def tiny_dflash2_drafter(models_dir, tiny_target) -> Path:
    """A random 2-layer DFlash2 drafter (block 8) of the published shape, scaled down."""
    from sglang_dflash.testing.devmodels.dflash2 import build_random_dflash2_drafter

    return build_random_dflash2_drafter(models_dir / "tiny-dflash2-drafter", target=tiny_target, target_layer_ids=[1, 2])


def _cached_training(name: str, train, target: Path, extra_sources=(), **overrides) -> Path:
    """A trained drafter cached under .cache/, keyed by the code that builds it and the
    ``overrides`` passed to ``train``."""
    import hashlib
    import json

    from sglang_dflash.testing.devmodels import tiny, tiny_trained

    sources = [tiny.__file__, tiny_trained.__file__, REPO / "sglang_dflash" / "train" / "trainer.py", *extra_sources]
    code = b"".join(Path(f).read_bytes() for f in sources)
    extra = json.dumps(overrides, sort_keys=True).encode() if overrides else b""
    out = MODELS / f"{name}-{hashlib.sha256(code + extra).hexdigest()[:12]}"
    if not (out / "model.safetensors").exists():
        train(target, out, **overrides)
    return out


@pytest.fixture(scope="session")
def train_tiny_drafter(tiny_target):
    """Factory: a drafter distilled from the tiny target (``TINY_RECIPE`` with
    ``overrides``, e.g. ``block_size=4``; ~1-2 min of CPU each, deterministic), cached."""
    from sglang_dflash.testing.devmodels import tiny_trained

    def make(**overrides) -> Path:
        return _cached_training("tiny-trained-drafter", tiny_trained.train_tiny_drafter, tiny_target, **overrides)

    return make


@pytest.fixture(scope="session")
def trained_tiny_drafter(train_tiny_drafter) -> Path:
    """The 1-layer block-8 drafter distilled from the tiny target (features of layer 2):
    real multi-token acceptance, a few per cent of drafts on random-token prompts."""
    return train_tiny_drafter()


@pytest.fixture(scope="session")
def trained_tiny_dflash2_drafter(tiny_target) -> Path:
    """A 1-layer DFlash2 drafter distilled the same way (~1-2 min of CPU, cached): its
    selector's paths are really accepted, several tokens per block at times."""
    from sglang_dflash.testing.devmodels import tiny_trained

    package = REPO / "sglang_dflash"
    sources = [package / "train" / "objective.py", package / "model" / "convolution.py", package / "model" / "selector.py"]
    return _cached_training("tiny-trained-dflash2", tiny_trained.train_tiny_dflash2_drafter, tiny_target, sources)


@pytest.fixture(scope="session")
def arch_target(models_dir):
    """``arch_target(name)``: the tiny random target of one architecture family
    (:mod:`sglang_dflash.testing.devmodels.targets`), built once per session."""
    from sglang_dflash.testing.devmodels.targets import build_target

    return lambda name: build_target(name, models_dir / f"tiny-{name}")


@pytest.fixture(scope="session")
def arch_drafter(arch_target):
    """``arch_drafter(name)``: a 1-layer drafter distilled from that target with the
    tiny recipe (real multi-token acceptance), cached like ``trained_tiny_drafter``."""
    from sglang_dflash.testing.devmodels import targets, tiny_trained

    def get(name: str) -> Path:
        return _cached_training(
            f"tiny-trained-drafter-{name}", tiny_trained.train_tiny_drafter, arch_target(name), [targets.__file__]
        )

    return get


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct converted from the PyPI wheel (cached under .cache/)."""
    from sglang_dflash.testing.devmodels.smollm2 import convert

    return convert(MODELS / "smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_drafter() -> Path:
    """The trained drafter shipped in drafters/ (real acceptance on SmolLM2)."""
    return REPO / "drafters" / "smollm2-135m-dflash"


@pytest.fixture(scope="session")
def smollm2_lora(smollm2, models_dir) -> Path:
    """A random rank-8 q/v LoRA adapter for SmolLM2, built in code (PEFT layout)."""
    from sglang_dflash.testing.devmodels.lora import build_lora_adapter

    return build_lora_adapter(models_dir / "smollm2-lora", base_model=smollm2, scale=0.08)


@pytest.fixture(scope="session")
def servers():
    from sglang_dflash.testing.local_server import ServerPool

    pool = ServerPool(capacity=3)
    yield pool
    pool.close()
