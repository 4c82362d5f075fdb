"""sglang-kernel 0.4.10 `sgl_kernel.allreduce` names (stand-in: see sgl_kernel._standin)."""

from ._standin import export

export("allreduce", globals())
