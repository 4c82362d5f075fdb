"""sglang-kernel 0.4.10 `sgl_kernel.flash_attn` names. The stand-in has no FA3, and says so."""

from ._standin import export


def is_fa3_supported(device=None) -> bool:
    return False


export("flash_attn", globals())
