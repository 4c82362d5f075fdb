"""The ops the stand-in really computes: the ones a bf16 Llama/Qwen3 forward calls.

Each runs FlashInfer's kernel when FlashInfer imports and the tensor is a CUDA
fp16/bf16 tensor (that is what sglang-kernel 0.4.10 itself does for the norms), else a
plain torch version with the same semantics (fp32 math, one rounding at the end).
``SGL_KERNEL_STANDIN_IMPL=torch`` forces the torch versions. A FlashInfer call that
fails (say its JIT cannot build) logs once and switches that op to torch for good.
All of them are CUDA-graph capturable.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch
import torch.nn.functional as F

logger = logging.getLogger("sgl_kernel.standin")

_MODE = os.environ.get("SGL_KERNEL_STANDIN_IMPL", "auto").strip().lower()
_FI_DTYPES = (torch.float16, torch.bfloat16)
_broken: set[str] = set()
_fi_modules: dict[str, object] = {}


def _flashinfer(module: str, op: str, x: torch.Tensor):
    """FlashInfer's ``module.op`` when it should be used for ``x``, else None."""
    if _MODE == "torch" or op in _broken or not x.is_cuda or x.dtype not in _FI_DTYPES:
        return None
    if module not in _fi_modules:
        try:
            import importlib

            _fi_modules[module] = importlib.import_module(module)
        except Exception as exc:  # FlashInfer missing or broken: torch from now on
            logger.warning("sgl_kernel stand-in: %s unavailable (%s); using torch ops", module, exc)
            _fi_modules[module] = None
    return getattr(_fi_modules[module], op, None) if _fi_modules[module] is not None else None


def _call(module: str, op: str, x: torch.Tensor, fallback, *args):
    fn = _flashinfer(module, op, x)
    if fn is not None:
        try:
            return fn(*args)
        except Exception as exc:
            if torch.cuda.is_current_stream_capturing():
                raise
            _broken.add(op)
            logger.warning("sgl_kernel stand-in: flashinfer %s failed (%s); using torch for it", op, exc)
    return fallback(*args)


# ------------------------------------------------------------------------------ norms
def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return xf * (weight.float() + offset)


def _torch_rmsnorm(input, weight, eps=1e-6, out=None, enable_pdl=None, *, offset=0.0):
    result = _rms(input, weight, eps, offset).to(input.dtype)
    if out is None:
        return result
    out.copy_(result)
    return out


def _torch_fused_add_rmsnorm(input, residual, weight, eps=1e-6, enable_pdl=None, *, offset=0.0):
    total = input.float() + residual.float()
    residual.copy_(total)
    input.copy_(_rms(total, weight, eps, offset))


def rmsnorm(input: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, out: Optional[torch.Tensor] = None,
            enable_pdl: Optional[bool] = None) -> torch.Tensor:
    """``out = input / RMS(input) * weight``."""
    return _call("flashinfer.norm", "rmsnorm", input, _torch_rmsnorm, input, weight, eps, out, enable_pdl)


def fused_add_rmsnorm(input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                      enable_pdl: Optional[bool] = None) -> None:
    """In place: ``residual += input``; ``input = residual / RMS(residual) * weight``."""
    _call("flashinfer.norm", "fused_add_rmsnorm", input, _torch_fused_add_rmsnorm,
          input, residual, weight, eps, enable_pdl)


def gemma_rmsnorm(input: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, out: Optional[torch.Tensor] = None,
                  enable_pdl: Optional[bool] = None) -> torch.Tensor:
    """``out = input / RMS(input) * (1 + weight)``."""
    def fallback(*args):
        return _torch_rmsnorm(*args, offset=1.0)

    return _call("flashinfer.norm", "gemma_rmsnorm", input, fallback, input, weight, eps, out, enable_pdl)


def gemma_fused_add_rmsnorm(input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                            enable_pdl: Optional[bool] = None) -> None:
    def fallback(*args):
        return _torch_fused_add_rmsnorm(*args, offset=1.0)

    _call("flashinfer.norm", "gemma_fused_add_rmsnorm", input, fallback, input, residual, weight, eps, enable_pdl)


# ------------------------------------------------------------------------ activations
def _gated(act):
    def run(input: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        d = input.shape[-1] // 2
        result = (act(input[..., :d].float()) * input[..., d:].float()).to(input.dtype)
        if out is None:
            return result
        out.copy_(result)
        return out

    return run


_torch_silu_and_mul = _gated(F.silu)
_torch_gelu_and_mul = _gated(lambda x: F.gelu(x, approximate="none"))
_torch_gelu_tanh_and_mul = _gated(lambda x: F.gelu(x, approximate="tanh"))


def _check_alignment(input: torch.Tensor) -> None:
    if input.shape[-1] * input.dtype.itemsize % 16 != 0:
        raise ValueError("The pointers must be multiple of 16 bytes.")


def silu_and_mul(input: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``silu(input[..., :d]) * input[..., d:]`` with ``d = input.shape[-1] // 2``."""
    _check_alignment(input)
    return _call("flashinfer.activation", "silu_and_mul", input, _torch_silu_and_mul, input, out)


def gelu_and_mul(input: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    _check_alignment(input)
    return _call("flashinfer.activation", "gelu_and_mul", input, _torch_gelu_and_mul, input, out)


def gelu_tanh_and_mul(input: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    _check_alignment(input)
    return _call("flashinfer.activation", "gelu_tanh_and_mul", input, _torch_gelu_tanh_and_mul, input, out)


def weak_ref_tensor(tensor):
    """The real op returns a non-owning alias (for CUDA-graph outputs in piecewise and
    breakable graphs, both off in our runs). This returns the tensor itself: the same
    values and storage, only kept alive a little longer."""
    return tensor


def is_arch_support_pdl() -> bool:
    from .utils import is_arch_support_pdl as impl

    return impl()


REAL_OPS = (
    "rmsnorm", "fused_add_rmsnorm", "gemma_rmsnorm", "gemma_fused_add_rmsnorm",
    "silu_and_mul", "gelu_and_mul", "gelu_tanh_and_mul", "weak_ref_tensor",
)
