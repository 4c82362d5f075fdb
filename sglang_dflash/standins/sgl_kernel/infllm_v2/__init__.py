"""sglang-kernel 0.4.10 `sgl_kernel.infllm_v2` names (stand-in: see sgl_kernel._standin)."""

from .._standin import export

export("infllm_v2", globals())
