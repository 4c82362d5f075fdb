"""A pure-torch stand-in for ``sgl_kernel`` (sglang-kernel 0.4.10's import surface).

One stand-in serves both places where the real package cannot load:

* the CPU lane: PyPI's ``sglang-kernel`` is CUDA-only, and SGLang's CPU engine imports
  a few ``*_cpu`` helpers from it (:mod:`sgl_kernel._cpu_ops` computes them in torch);
* the GPU lane's bundle: SGLang 0.5.23 pins sglang-kernel 0.4.10, whose compiled ops are
  built against torch 2.14; the GPU machine has torch 2.11, where they cannot load
  (missing symbols) nor run correctly (``c10::TensorImpl`` is laid out differently).
  The ops a bf16 Llama/Qwen3 forward calls are real (:mod:`sgl_kernel._ops`: norms and
  gated activations, FlashInfer kernels where possible, torch otherwise).

Every other public name of the real package exists, so imports and ``hasattr`` checks
behave the same, and raises ``NotImplementedError`` naming itself if called. Each
Python process that imports it logs one line saying so.
"""

import logging as _logging

from .version import __version__  # noqa: F401
from ._standin import STANDIN, TOP_LEVEL, export as _export
from . import _cpu_linear_attention, _cpu_ops, _ops
from .flash_attn import is_fa3_supported  # noqa: F401
from .utils import is_arch_support_pdl  # noqa: F401

common_ops = None  # the real package's compiled module; absent here
_cpu_ops.register_torch_ops()  # placeholders for torch.ops.sgl_kernel.*_cpu bound at model import
_cpu_linear_attention.register()  # the GDN hybrid targets' *_cpu ops, computed in torch

for _module, _names in TOP_LEVEL.items():
    _namespace: dict = {}
    _export(_module, _namespace)
    for _name in _names:
        globals()[_name] = _namespace[_name]


def create_greenctx_stream_by_value(*args, **kwargs):
    from .spatial import create_greenctx_stream_by_value as impl

    return impl(*args, **kwargs)


def get_sm_available(*args, **kwargs):
    from .spatial import get_sm_available as impl

    return impl(*args, **kwargs)


_logging.getLogger("sgl_kernel.standin").info(
    "sgl_kernel stand-in %s: real ops %s, everything else raises NotImplementedError", __version__, _ops.REAL_OPS
)
del _module, _names, _namespace, _name
