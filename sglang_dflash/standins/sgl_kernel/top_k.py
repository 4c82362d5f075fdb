"""sglang-kernel 0.4.10 `sgl_kernel.top_k` names (stand-in: see sgl_kernel._standin)."""

from ._standin import export

export("top_k", globals())
