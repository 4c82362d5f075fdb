"""Past one GPU, end to end: tensor parallelism and DP attention on a multi-GPU machine.

    python -m bench.gpu.parallel_e2e --model Qwen/Qwen3-8B --drafter z-lab/Qwen3-8B-DFlash-b16 --tp 2 [--dp 2]

Starts, one at a time, SGLang without speculation at ``--tp``, our DFLASH at ``--tp``,
and (with ``--dp`` > 1) our DFLASH with ``--enable-dp-attention --dp-size D
--enable-dp-lm-head`` at the same TP; sends the same greedy requests to each, and
checks what the CPU lane checks at TP=2: output identical to no speculation, drafts
accepted, every rank's KV pool back to full. DP attention is GPU-only in SGLang
0.5.23 and needs ``--tp`` >= ``--dp`` >= 2 GPUs, so it is untested on one GPU or on
CPU. Requests are sent ``--concurrency`` at a time: with DP attention some DP ranks
then idle while others decode, which is the case the worker's idle path exists for.
Exit status 0 only when every check passes; results go to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from sglang_dflash.testing.local_server import Server
from tests.support.equivalence import request_params, run
from tests.support.prompts import text_prompts

GPU_ARGS = {"attention-backend": "flashinfer", "mem-fraction-static": 0.8, "random-seed": 0, "log-level": "warning"}


def configurations(args) -> dict[str, dict]:
    common = {"model-path": args.model, "tp-size": args.tp, "max-running-requests": 64}
    spec = {
        **common,
        "speculative-algorithm": "DFLASH",
        "speculative-draft-model-path": args.drafter,
        "speculative-draft-attention-backend": "flashinfer",
    }
    runs = {"nospec": common, "ours_tp": spec}
    if args.dp > 1:
        runs["ours_tp_dp_attention"] = {
            **spec, "dp-size": args.dp, "enable-dp-attention": True, "enable-dp-lm-head": True,
        }
    return runs


def pools_drained(server: Server) -> list:
    server.flush_cache()
    state = server.dflash_state()
    pools = state.get("kv_pool_per_rank") or [state["kv_pool"]]
    return [p["available"] == p["max_total_num_tokens"] and p["evictable"] == 0 for p in pools]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--drafter", required=True)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--dp", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("parallel_e2e.json"))
    args = parser.parse_args(argv)
    prompts = text_prompts(args.prompts, seed=20)
    params = [request_params(i, max_new_tokens=64) for i in range(len(prompts))]
    results, outputs = {}, {}
    for name, options in configurations(args).items():
        server = Server(options=options, base_args=dict(GPU_ARGS))
        started = time.time()
        server.start(timeout=1200)
        try:
            outs = run(server, prompts, params, batch=args.concurrency)
            outputs[name] = [o["output_ids"] for o in outs]
            entry = {"wall_s": round(time.time() - started, 1)}
            if name != "nospec":
                entry["accepted_drafts"] = sum(o["meta_info"].get("spec_num_correct_drafts", 0) for o in outs)
                entry["pools_drained_per_rank"] = pools_drained(server)
                entry["parallel"] = server.dflash_state()["parallel"]
            results[name] = entry
        finally:
            server.stop()
    checks = {
        f"{name}_equals_nospec": outputs[name] == outputs["nospec"] for name in outputs if name != "nospec"
    }
    checks.update({f"{n}_accepts": r["accepted_drafts"] > 0 for n, r in results.items() if "accepted_drafts" in r})
    checks.update({f"{n}_pools": all(r["pools_drained_per_rank"]) for n, r in results.items() if "pools_drained_per_rank" in r})
    report = {"args": vars(args) | {"out": str(args.out)}, "results": results, "checks": checks, "ok": all(checks.values())}
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
