"""Import-only torchvision stand-in: SGLang imports torchvision at module level for
multimodal models, which the CPU lane never runs."""

from . import io, transforms  # noqa: F401

__version__ = "0.0.0+sglang-dflash-cpu-stub"


def __getattr__(name):
    raise AttributeError(f"torchvision.{name} is not available in sglang-dflash's CPU lane stub")
