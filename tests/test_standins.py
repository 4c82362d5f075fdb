"""The ``torch.ops.sgl_kernel`` ops the stand-in registers for SGLang's CPU engine.

SGLang binds them when a model module is imported, and its model registry imports every
model at start-up: a missing op used to cost each such module a logged import error.
"""

from __future__ import annotations

import os
import subprocess
import sys

from sglang_dflash.cpu_lane import CPU_ENV, STUBS_DIR

# The model modules that bind the registered ops at import (SGLang 0.5.23).
BINDING_MODULES = ("qwen3_5", "qwen3_5_text", "muse_glimmer", "grok")

CHECKS = r"""
import importlib, torch, sgl_kernel
from sgl_kernel._cpu_ops import TORCH_OPS
torch.manual_seed(0)
# fused_sigmoid_mul_cpu: input *= sigmoid(gate), in place, float32 math rounded once
for dtype in (torch.float32, torch.bfloat16):
    x = torch.randn(5, 2 * 8).to(dtype)
    for gate in (torch.randn(5, 2 * 8), torch.randn(5, 2, 16)[:, :, :8]):  # flat; [T, heads, head_dim] strided
        gate = gate.to(dtype)
        want = (x.float() * torch.sigmoid(gate.float()).reshape(5, 16)).to(dtype)
        got = x.clone()
        assert torch.ops.sgl_kernel.fused_sigmoid_mul_cpu(got, gate) is None
        assert torch.equal(got, want), (dtype, (got.float() - want.float()).abs().max())
# the others exist and, called, name themselves
assert all(hasattr(torch.ops.sgl_kernel, name) for name in TORCH_OPS)
try:
    torch.ops.sgl_kernel.rmsnorm_cpu(torch.randn(3, 8), torch.ones(8), 1e-6)
except NotImplementedError as exc:
    assert "rmsnorm_cpu" in str(exc), exc
else:
    raise AssertionError("rmsnorm_cpu did not raise")
# what the model registry does at start-up
for module in MODULES:
    importlib.import_module("sglang.srt.models." + module)
print("ok")
"""


def test_cpu_ops_compute_name_themselves_and_let_their_models_import():
    code = f"import sys; sys.path.append({str(STUBS_DIR)!r}); MODULES = {BINDING_MODULES!r}\n" + CHECKS
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **CPU_ENV})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
