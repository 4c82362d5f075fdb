"""SGLang 0.5.23's own ``DFlash2DraftModel`` run standalone on CPU: a test oracle.

    python -m tests.support.dflash2_oracle TARGET_DIR IN.pt OUT.pt

Runs in its own process because it publishes SGLang's process-global runtime context
(TP=1). No server, scheduler, KV pool or attention backend: SGLang's RadixAttention in
each drafter layer is replaced by SDPA over ``[context K/V ; block K/V]``, where the
context K/V are made by SGLang's own layer methods, exactly as its worker materialises
them, and the mask follows the layer's own attention type and window (SGLang stores
``window - 1``; ENCODER_ONLY layers see both sides). Everything else -- convolutions,
norms, RoPE, candidate top-K, lattice and walk -- is SGLang's code.

IN.pt holds a list of cases, each a dict: ``drafter`` (checkpoint dir), ``features``
(list of [N_i, F*H] per request), ``block_ids`` [bs, B], ``embed`` [V, H], ``lm_head``
[V, H], ``uniforms`` [bs, B-1], ``temperatures`` [bs], ``greedy`` [bs] bool. OUT.pt holds,
per case: ``hidden`` [bs, B, H], ``candidates`` / ``unary`` [bs, B-1, K], ``scores``
[bs, B-1, K, K], ``tokens`` [bs, B-1], ``q_rows`` [bs, B-1, K].
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # SGLang torch.compiles its conv, lattice and walk

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


class ContextAttention(torch.nn.Module):
    """Stands in for one layer's RadixAttention: SDPA over this request's context K/V
    plus the block's own, masked like SGLang's torch backends mask that layer."""

    def __init__(self, attn, store: dict) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = attn.tp_q_head_num, attn.tp_k_head_num, attn.head_dim
        self.scaling, self.window = attn.scaling, attn.sliding_window_size
        self.causal = attn.attn_type.name != "ENCODER_ONLY"
        self.layer_id, self.store = attn.layer_id, store

    def forward(self, q, k, v, forward_batch, **_):
        ck, cv = self.store["kv"][self.layer_id]
        n, block = ck.shape[0], q.shape[0]
        keys = torch.cat([ck, k.view(block, self.kv_heads, self.head_dim)]).transpose(0, 1)
        values = torch.cat([cv, v.view(block, self.kv_heads, self.head_dim)]).transpose(0, 1)
        qpos = torch.arange(n, n + block)[:, None]
        kpos = torch.arange(n + block)[None, :]
        allowed = torch.ones(block, n + block, dtype=torch.bool)
        if self.causal:
            allowed &= kpos <= qpos
        if self.window is not None and self.window >= 0:
            allowed &= (qpos - kpos).abs() <= self.window
        out = F.scaled_dot_product_attention(
            q.view(block, self.heads, self.head_dim).transpose(0, 1), keys, values,
            attn_mask=allowed, scale=self.scaling, enable_gqa=True,
        )
        return out.transpose(0, 1).reshape(block, -1)


def run_case(case: dict) -> dict:
    from safetensors.torch import load_file
    from sglang.srt.models.dflash import DFlash2DraftModel
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(case["drafter"])
    model = DFlash2DraftModel(config).eval()
    model.load_weights(load_file(str(Path(case["drafter"]) / "model.safetensors")).items())
    store: dict = {}
    for layer in model.layers:
        layer.self_attn.attn = ContextAttention(layer.self_attn.attn, store)
    vocab = case["lm_head"].shape[0]
    model.lm_head = SimpleNamespace(weight=case["lm_head"], org_vocab_size=vocab, quant_method=None)
    block_ids = case["block_ids"]
    block = block_ids.shape[1]
    hidden = []
    with torch.no_grad():
        for features, ids in zip(case["features"], block_ids):
            n = features.shape[0]
            ctx = model.project_target_hidden(features)
            store["kv"] = []
            for layer in model.layers:
                a = layer.self_attn
                k, v = a.kv_proj_only(ctx)
                k = a.apply_k_rope(torch.arange(n), a.apply_k_norm(k))
                store["kv"].append((k.view(n, a.num_kv_heads, a.head_dim), v.view(n, a.num_kv_heads, a.head_dim)))
            out = model.forward(ids, torch.arange(n, n + block), forward_batch=None,
                                input_embeds=F.embedding(ids, case["embed"]))
            hidden.append(out.hidden_states)
        hidden = torch.stack(hidden)
        predicted = hidden[:, 1:]
        bs, slots = predicted.shape[:2]
        ids, unary = model.compute_candidates(predicted.reshape(bs * slots, -1))
        ids, unary = ids.view(bs, slots, -1), unary.view(bs, slots, -1)
        selector = model.candidate_selector
        scores = selector.build_lattice(candidate_ids=ids, unary_logits=unary, hidden_states=predicted,
                                        anchor_token_ids=block_ids[:, 0])
        tokens, q_rows = selector.sample_path(candidate_ids=ids, scores=scores, uniforms=case["uniforms"],
                                              temperatures=case["temperatures"], greedy_mask=case["greedy"])
    return {"hidden": hidden, "candidates": ids, "unary": unary, "scores": scores, "tokens": tokens, "q_rows": q_rows}


def main(target: str, inputs: str, outputs: str) -> None:
    from sglang.srt.server_args import ServerArgs
    from sglang.test.parallel_groups import publish

    torch.set_num_threads(1)
    publish(ServerArgs(model_path=target, device="cpu"), role="scheduler")
    torch.save([run_case(case) for case in torch.load(inputs)], outputs)


if __name__ == "__main__":
    main(*sys.argv[1:4])
