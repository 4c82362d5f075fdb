"""sglang-kernel 0.4.10 `sgl_kernel.expert_specialization` names (stand-in: see sgl_kernel._standin)."""

from ._standin import export

export("expert_specialization", globals())
