"""sglang-kernel 0.4.10 `sgl_kernel.flash_mla_mega` names (stand-in: see sgl_kernel._standin)."""

from ._standin import export

export("flash_mla_mega", globals())
