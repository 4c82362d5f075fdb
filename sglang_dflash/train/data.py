"""Distillation data: the target's own continuations of prompts, with its hidden states.

The target answers every prompt (through its chat template when it has one), greedily
or by sampling, in left-padded batches with a KV cache. The hidden states of every
token are captured *during* that generation: each forward already returns
``output_hidden_states``, and the entries at :func:`config.capture_points` are the
outputs of the decoder layers named by ``target_layer_ids``. So building a data set
costs one generation pass and no second prefill pass. The last token of a sequence is
never fed back, so its feature row is zero; training never reads it (a block anchored
at ``a`` only sees features of tokens ``< a``, and ``a <= len - 2``).

Everything is kept in one :class:`SequenceSet` (tokens and features concatenated, with
offsets) and cached as safetensors under a key of the target, prompts and generation
settings; features are stored per layer, so a later run that asks for other layers
only adds the missing ones.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..model.config import capture_points


@dataclass
class SequenceSet:
    """tokens: [N] all sequences concatenated; offsets: [S+1]; prompt_lens: [S];
    features: layer id -> [N, hidden] (bf16), row i = output of that layer at token i."""

    tokens: torch.Tensor
    offsets: torch.Tensor
    prompt_lens: torch.Tensor
    features: dict[int, torch.Tensor]

    def __len__(self) -> int:
        return self.prompt_lens.numel()

    def sequence(self, i: int) -> torch.Tensor:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def stacked_features(self, layer_ids: Sequence[int]) -> torch.Tensor:
        """[N, len(layer_ids) * hidden], concatenated in ``layer_ids`` order."""
        return torch.cat([self.features[int(i)] for i in layer_ids], dim=-1)

    def num_response_tokens(self) -> int:
        return int((self.offsets[1:] - self.offsets[:-1] - self.prompt_lens).sum())

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        tensors = {"tokens": self.tokens, "offsets": self.offsets, "prompt_lens": self.prompt_lens}
        tensors.update({f"features.{i}": f.contiguous() for i, f in self.features.items()})
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        tmp.rename(path)

    @classmethod
    def load(cls, path: Path) -> "SequenceSet":
        from safetensors.torch import load_file

        raw = load_file(str(path))
        features = {int(k.split(".", 1)[1]): v for k, v in raw.items() if k.startswith("features.")}
        return cls(raw["tokens"], raw["offsets"], raw["prompt_lens"], features)


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of ``prompt`` as a user turn, ready for the assistant's answer."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer(prompt)["input_ids"]


def stop_token_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = ids if ids is not None else tokenizer.eos_token_id
    ids = ids if isinstance(ids, (list, tuple)) else [ids]
    return sorted({int(i) for i in ids if i is not None})


def _pick(logits: torch.Tensor, temperature: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """logits: [S, V] -> [S] greedy or sampled next tokens."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _capture(hidden_states, points: list[int]) -> torch.Tensor:
    """HF hidden_states tuple -> [S, T, len(points), hidden] (bf16)."""
    return torch.stack([hidden_states[p] for p in points], dim=2).to(torch.bfloat16)


@torch.inference_mode()
def generate_batch(
    model,
    prompts: list[list[int]],
    *,
    layer_ids: Sequence[int],
    max_new_tokens: int,
    stop_ids: Sequence[int],
    pad_id: int,
    temperature: float = 0.0,
    generator: Optional[torch.Generator] = None,
) -> list[tuple[list[int], torch.Tensor]]:
    """Continue a batch of prompts; per prompt (tokens, features [len, K, hidden])."""
    from transformers import DynamicCache

    device = model.device
    points = capture_points(tuple(layer_ids))
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                use_cache=True, output_hidden_states=True, logits_to_keep=1)
    steps_feats, steps_tokens = [_capture(out.hidden_states, points)], []
    stop = torch.tensor(list(stop_ids), device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    lengths = torch.zeros(len(prompts), dtype=torch.long, device=device)
    last_pos = positions[:, -1]
    for step in range(max_new_tokens):
        token = _pick(out.logits[:, -1], temperature, generator)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        steps_tokens.append(token)
        lengths += (~done).long()
        done |= torch.isin(token, stop)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        last_pos = last_pos + 1
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=last_pos[:, None],
                    past_key_values=cache, use_cache=True, output_hidden_states=True)
        steps_feats.append(_capture(out.hidden_states, points))
    new_tokens = torch.stack(steps_tokens, dim=1).cpu()
    feats = torch.cat(steps_feats, dim=1).cpu()  # [S, width + fed steps, K, H]
    results = []
    for row, prompt in enumerate(prompts):
        n_new = int(lengths[row])
        tokens = prompt + new_tokens[row, :n_new].tolist()
        row_feats = torch.zeros(len(tokens), *feats.shape[2:], dtype=feats.dtype)
        fed = feats[row, width - len(prompt) : width + n_new - 1]  # features of tokens[:-1]
        row_feats[: fed.shape[0]] = fed
        results.append((tokens, row_feats))
    return results


def build_sequences(
    model,
    tokenizer,
    prompts: list[str],
    *,
    layer_ids: Sequence[int],
    max_new_tokens: int,
    batch_size: int = 16,
    temperature: float = 0.0,
    seed: int = 0,
    progress: bool = True,
) -> SequenceSet:
    """Generate continuations of ``prompts`` (similar lengths batched together)."""
    from tqdm.auto import tqdm

    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    stop_ids = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    generator = torch.Generator(device=model.device).manual_seed(seed) if temperature > 0 else None
    results: dict[int, tuple[list[int], torch.Tensor]] = {}
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="generate", disable=not progress, unit="batch"):
        outs = generate_batch(
            model, [encoded[i] for i in batch], layer_ids=layer_ids, max_new_tokens=max_new_tokens,
            stop_ids=stop_ids, pad_id=pad_id, temperature=temperature, generator=generator,
        )
        results.update(zip(batch, outs))
    seqs = [results[i] for i in range(len(prompts))]  # back to prompt order
    lengths = torch.tensor([len(t) for t, _ in seqs])
    feats = torch.cat([f for _, f in seqs], dim=0)
    return SequenceSet(
        tokens=torch.tensor([tok for t, _ in seqs for tok in t], dtype=torch.int32),
        offsets=torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
        prompt_lens=torch.tensor([len(e) for e in encoded]),
        features={int(i): feats[:, k].contiguous() for k, i in enumerate(layer_ids)},
    )


def cache_key(target_dir: str | Path, prompts: list[str], **settings) -> str:
    """Stable key of what determines a data set (but not which layers it holds)."""
    target_dir = Path(target_dir)
    digest = hashlib.sha256()
    digest.update((target_dir / "config.json").read_bytes())
    for weights in sorted(target_dir.glob("*.safetensors")):
        digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    digest.update(json.dumps(prompts).encode())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def cached_sequences(path: Optional[Path], layer_ids: Sequence[int], build) -> tuple[SequenceSet, bool]:
    """(data, from_cache). Load ``path`` if it holds every layer in ``layer_ids``; else
    build (all cached layers plus the new ones) and save. ``build(layer_ids) -> SequenceSet``;
    with ``path`` None nothing is cached."""
    if path is None:
        return build(list(layer_ids)), False
    cached_layers: list[int] = []
    if path.is_file():
        data = SequenceSet.load(path)
        if all(int(i) in data.features for i in layer_ids):
            return data, True
        cached_layers = sorted(data.features)
    wanted = sorted(set(cached_layers) | {int(i) for i in layer_ids})
    data = build(wanted)
    path.parent.mkdir(parents=True, exist_ok=True)
    data.save(path)
    return data, False
