"""LoRA targets (``--enable-lora``, ``--lora-paths``, per-request ``lora_path``).

The target verifies with each request's adapter through SGLang's own LoRA manager: a
TARGET_VERIFY ``ForwardBatch`` carries the requests' adapters with one segment of
``draft_token_num`` tokens each. The drafter borrows the target's embedding and
lm_head *without* the adapter: a LoRA wrapper applies the batch info of the last
target forward, which does not describe a drafter block, so the drafter reads the
plain modules behind the wrappers (its inputs -- the target's captured features --
already carry the adapter's effect).

On the CPU lane SGLang 0.5.23's LoRA modules pin host memory unconditionally, which
CPU-only torch refuses; :func:`lift_pinned_memory_on_cpu` makes those requests plain
host allocations there (and nowhere else).
"""

from __future__ import annotations

import functools
import types

import torch

# The modules whose LoRA set-up and batch preparation ask for pinned host memory.
_PINNING_MODULES = ("sglang.srt.lora.layers", "sglang.srt.lora.lora", "sglang.srt.lora.backend.torch_backend")
_FACTORIES = ("empty", "zeros", "ones", "full", "tensor", "arange", "as_tensor")


def without_adapter(module: torch.nn.Module) -> torch.nn.Module:
    """The plain module behind SGLang's LoRA wrapper (the module itself if unwrapped)."""
    from sglang.srt.lora.layers import unwrap_lora_layer

    return unwrap_lora_layer(module)


def lift_pinned_memory_on_cpu() -> None:
    """On a machine without an accelerator, let SGLang's LoRA modules ask for pinned
    memory: ``pin_memory=True`` and ``Tensor.pin_memory()`` become plain host tensors."""
    import importlib

    if torch.cuda.is_available() or getattr(torch.Tensor.pin_memory, "_sglang_dflash_cpu_safe", False):
        return
    original = torch.Tensor.pin_memory

    def pin_memory(self, *args, **kwargs):
        return self if self.device.type == "cpu" else original(self, *args, **kwargs)

    pin_memory._sglang_dflash_cpu_safe = True
    torch.Tensor.pin_memory = pin_memory
    pinless = _pinless_torch()
    for name in _PINNING_MODULES:
        module = importlib.import_module(name)
        if getattr(module, "torch", None) is torch:
            module.torch = pinless


def _pinless_torch() -> types.ModuleType:
    """``torch`` for one module's globals, with ``pin_memory=`` dropped from its factories."""

    class PinlessTorch(types.ModuleType):
        def __getattr__(self, name):
            return getattr(torch, name)

    proxy = PinlessTorch("torch")
    for name in _FACTORIES:
        factory = getattr(torch, name)

        @functools.wraps(factory)
        def unpinned(*args, _factory=factory, **kwargs):
            kwargs.pop("pin_memory", None)
            return _factory(*args, **kwargs)

        setattr(proxy, name, unpinned)
    return proxy
