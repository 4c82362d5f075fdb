"""Mamba ops are not part of the CPU lane; importing works, calling says why not."""

from sgl_kernel import _missing

chunk_gated_delta_rule_cpu = _missing("mamba.chunk_gated_delta_rule_cpu")
causal_conv1d_fn_cpu = _missing("mamba.causal_conv1d_fn_cpu")
causal_conv1d_update_cpu = _missing("mamba.causal_conv1d_update_cpu")
