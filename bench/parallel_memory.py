"""KV memory per token and per rank, target and drafter, for a TP deployment.

    python -m bench.parallel_memory --target .cache/models/smollm2-135m --drafter drafters/smollm2-135m-dflash --tp 1 2 8

``--target`` / ``--drafter``: a model folder (its ``config.json``) or the config's
fields as inline JSON (``'{"num_hidden_layers": 36, "num_key_value_heads": 8,
"head_dim": 64}'``). Per token and rank:

* target KV = 2 (K and V) x layers x KV heads on the rank x head dim x bytes; SGLang
  splits KV heads over TP ranks and replicates them when there are fewer heads than
  ranks (sliding-window layers hold only their window, so this is an upper bound for
  models that have them);
* drafter KV = 2 x drafter layers x drafter KV heads x head dim x bytes, **not** divided
  by TP: the drafter is replicated (each rank holds every row for the target's slots).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "fp8": 1}


def load_config(spec: str) -> dict:
    if spec.lstrip().startswith("{"):
        return json.loads(spec)
    path = Path(spec)
    return json.loads((path / "config.json" if path.is_dir() else path).read_text())


def head_dim(config: dict) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def kv_heads_per_rank(kv_heads: int, tp: int) -> int:
    """SGLang's split: ceil(heads / tp) when there are enough heads (exact on GPU, where
    they must divide; the CPU engine pads them to a multiple of tp), else one
    replicated head per rank."""
    return -(-kv_heads // tp) if kv_heads >= tp else 1


def per_token_bytes(target: dict, drafter: dict, tp: int, dtype_bytes: int) -> dict:
    target_kv = 2 * int(target["num_hidden_layers"]) * kv_heads_per_rank(int(target["num_key_value_heads"]), tp)
    drafter_kv = 2 * int(drafter["num_hidden_layers"]) * int(drafter["num_key_value_heads"])
    out = {
        "tp": tp,
        "target_kv_bytes_per_token_per_rank": target_kv * head_dim(target) * dtype_bytes,
        "drafter_kv_bytes_per_token_per_rank": drafter_kv * head_dim(drafter) * dtype_bytes,
    }
    out["drafter_share"] = round(
        out["drafter_kv_bytes_per_token_per_rank"]
        / (out["drafter_kv_bytes_per_token_per_rank"] + out["target_kv_bytes_per_token_per_rank"]),
        4,
    )
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--drafter", required=True)
    parser.add_argument("--tp", type=int, nargs="+", default=[1])
    parser.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bfloat16")
    args = parser.parse_args(argv)
    target, drafter = load_config(args.target), load_config(args.drafter)
    for tp in args.tp:
        print(json.dumps(per_token_bytes(target, drafter, tp, DTYPE_BYTES[args.dtype])))


if __name__ == "__main__":
    main()
