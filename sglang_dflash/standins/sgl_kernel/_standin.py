"""Machinery of the stand-in: which names each submodule exports, and the raising stubs.

The name lists mirror the public names of sglang-kernel 0.4.10 (its ``__init__`` and
submodules), so ``from sgl_kernel import X`` and ``hasattr`` feature checks behave as
with the real package; only the ops in :mod:`sgl_kernel._ops` (GPU forward ops) and
:mod:`sgl_kernel._cpu_ops` (the CPU engine's ``*_cpu`` ops) compute anything.
"""

from __future__ import annotations

from typing import Callable

STANDIN = True

# submodule -> public names of sglang-kernel 0.4.10 (the real ones come from _ops).
NAMES: dict[str, tuple[str, ...]] = {
    "allreduce": (
        "init_custom_ar", "dispose", "all_reduce", "get_graph_buffer_ipc_meta", "register_buffer",
        "register_graph_buffers", "meta_size",
    ),
    "attention": ("merge_state_v2",),
    "cutlass_moe": ("get_cutlass_w4a8_moe_mm_data", "cutlass_w4a8_moe_mm"),
    "elementwise": (
        "rmsnorm", "fused_add_rmsnorm", "gemma_rmsnorm", "gemma_fused_add_rmsnorm", "silu_and_mul",
        "gelu_tanh_and_mul", "gelu_and_mul", "dsv4_fused_q_norm_rope", "dsv4_fused_k_norm_rope_flashmla",
        "dsv4_fused_q_indexer_rope_hadamard_quant", "rotary_embedding", "copy_to_gpu_no_ce", "concat_mla_k",
        "concat_mla_absorb_q",
    ),
    "expert_specialization": (
        "es_fp8_blockwise_scaled_grouped_mm", "es_sm100_mxfp8_blockscaled_grouped_mm",
        "es_sm100_mxfp8_blockscaled_grouped_quant",
    ),
    "flash_attn": ("is_fa3_supported", "flash_attn_with_kvcache", "flash_attn_varlen_func", "get_scheduler_metadata"),
    "flash_mla": ("get_mla_metadata", "flash_mla_with_kvcache", "flash_mla_sparse_fwd"),
    "flash_mla_mega": (
        "is_flash_mla_mega_available", "flash_mla_mega_prefill", "flash_mla_mega_decode", "permute_mega_q_weight",
        "permute_mega_wo_weight",
    ),
    "gemm": (
        "int8_scaled_mm", "fp8_scaled_mm", "sgl_per_token_group_quant_8bit", "sgl_per_token_group_quant_fp8",
        "sgl_per_token_group_quant_int8", "sgl_per_token_quant_fp8", "shuffle_rows",
    ),
    "grammar": ("apply_token_bitmask_inplace_cuda",),
    "infllm_v2": ("infllmv2_attn_stage1", "max_pooling_1d_varlen"),
    "kvcacheio": (
        "get_device_accessible_ptr", "transfer_kv_per_layer", "transfer_kv_per_layer_pf_lf",
        "transfer_kv_per_layer_ph_lf", "transfer_kv_all_layer", "transfer_kv_all_layer_lf_pf",
        "transfer_kv_all_layer_lf_ph", "transfer_kv_direct", "transfer_embedding_ranges_direct",
        "transfer_kv_per_layer_direct_pf_lf", "transfer_kv_all_layer_direct_lf_pf", "transfer_kv_per_layer_mla",
        "transfer_kv_per_layer_mla_pf_lf", "transfer_kv_all_layer_mla", "transfer_kv_all_layer_mla_lf_pf",
        "copy_all_layer_kv_cache_cpu",
    ),
    "mamba": (
        "causal_conv1d_fwd", "causal_conv1d_update", "causal_conv1d_fn_cpu", "causal_conv1d_update_cpu",
        "chunk_gated_delta_rule_cpu",
    ),
    "memory": ("weak_ref_tensor",),
    "moe": (
        "moe_align_block_size", "topk_softmax", "topk_sigmoid", "moe_sum_reduce", "moe_sum",
        "fp8_blockwise_scaled_grouped_mm", "prepare_moe_input", "apply_shuffle_mul_sum", "fused_qk_norm_rope",
    ),
    "quantization": (
        "ggml_dequantize", "ggml_mul_mat_vec_a8", "ggml_mul_mat_a8", "ggml_moe_a8", "ggml_moe_a8_vec",
        "ggml_moe_get_block_size",
    ),
    "sampling": ("top_k_renorm_probs", "top_p_renorm_probs", "top_k_renorm_prob", "top_p_renorm_prob"),
    "spatial": ("create_greenctx_stream_by_value", "get_sm_available"),
    "speculative": (
        "tree_speculative_sampling_target_only", "verify_tree_greedy", "build_tree_kernel_efficient",
        "reconstruct_indices_from_tree_mask", "segment_packbits", "verify_tree_greedy_cpu",
        "build_tree_kernel_efficient_cpu", "assign_req_to_token_pool_cpu", "build_draft_decode_metadata_cpu",
        "fill_bonus_tokens_cpu", "fill_accept_out_cache_loc_cpu", "assign_draft_cache_locs_contiguous_cpu",
        "assign_extend_cache_locs_cpu", "rotate_input_ids_cpu",
    ),
    "top_k": (
        "fast_topk", "fast_topk_v2", "fast_topk_transform_fused", "deepseek_v4_topk_transform_512",
        "fast_topk_transform_ragged_fused",
    ),
    "utils": ("is_arch_support_pdl",),
}

# What the real package's __init__ re-exports at top level (CUDA build, 0.4.10).
TOP_LEVEL: dict[str, tuple[str, ...]] = {
    "allreduce": NAMES["allreduce"],
    "attention": ("merge_state_v2",),
    "cutlass_moe": NAMES["cutlass_moe"],
    "elementwise": NAMES["elementwise"],
    "expert_specialization": NAMES["expert_specialization"],
    "gemm": NAMES["gemm"],
    "grammar": NAMES["grammar"],
    "infllm_v2": NAMES["infllm_v2"],
    "kvcacheio": (
        "copy_all_layer_kv_cache_cpu", "transfer_kv_all_layer", "transfer_kv_all_layer_mla",
        "transfer_kv_per_layer", "transfer_kv_per_layer_mla",
    ),
    "mamba": NAMES["mamba"],
    "memory": NAMES["memory"],
    "moe": NAMES["moe"],
    "quantization": NAMES["quantization"],
    "sampling": ("top_k_renorm_prob", "top_p_renorm_prob"),
    "speculative": (
        "assign_draft_cache_locs_contiguous_cpu", "assign_extend_cache_locs_cpu", "assign_req_to_token_pool_cpu",
        "build_draft_decode_metadata_cpu", "build_tree_kernel_efficient_cpu", "fill_accept_out_cache_loc_cpu",
        "fill_bonus_tokens_cpu", "rotate_input_ids_cpu", "verify_tree_greedy_cpu",
    ),
    "top_k": ("fast_topk", "fast_topk_transform_fused", "fast_topk_transform_ragged_fused", "fast_topk_v2"),
}


def missing(name: str) -> Callable:
    """A stub that raises NotImplementedError naming the op, when called."""

    def op(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name} is not implemented by sglang-dflash's sgl_kernel stand-in; "
            "this SGLang feature needs the real sglang-kernel build for this torch"
        )

    op.__name__ = op.__qualname__ = name
    op.__sgl_kernel_standin__ = True
    return op


def export(module: str, namespace: dict) -> None:
    """Fill ``namespace`` (a submodule's globals) with its names: real op or stub."""
    from . import _cpu_linear_attention, _cpu_ops, _ops

    for name in NAMES[module]:
        if name not in namespace:
            namespace[name] = (
                getattr(_ops, name, None)
                or getattr(_cpu_ops, name, None)
                or (getattr(_cpu_linear_attention, name) if name in _cpu_linear_attention.MAMBA_OPS else None)
                or missing(name)
            )
