"""The drafter model: config, checkpoint layout, layers, draft attention, draft KV, RoPE.

SGLang-agnostic: it runs inside our worker, in training, and against the reference.
"""
