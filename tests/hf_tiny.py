"""Tiny random Hugging Face MoE models built from configs (no hub), one per supported family.

Shared by every test that needs a real transformers model. Shapes are small enough that a
forward takes milliseconds on CPU, but every family keeps its real structure: shared experts,
dense first layers, group-limited routing, hybrid attention.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

COMMON = dict(vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)

TINY: dict[str, dict] = {
    "qwen2_moe": dict(intermediate_size=128, moe_intermediate_size=32,
                      shared_expert_intermediate_size=64, num_experts=8, num_experts_per_tok=2,
                      decoder_sparse_step=1),
    "qwen3_moe": dict(intermediate_size=128, moe_intermediate_size=32, num_experts=8,
                      num_experts_per_tok=2, norm_topk_prob=True, head_dim=16),
    "mixtral": dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2),
    "olmoe": dict(intermediate_size=32, num_experts=8, num_experts_per_tok=2),
    "deepseek_v2": dict(num_key_value_heads=4, intermediate_size=128, moe_intermediate_size=32,
                        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
                        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                        topk_method="group_limited_greedy", n_group=4, topk_group=2),
    "deepseek_v3": dict(num_key_value_heads=4, intermediate_size=128, moe_intermediate_size=32,
                        n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4,
                        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32,
                        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, n_group=4,
                        topk_group=2),
    "gpt_oss": dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, head_dim=16,
                    sliding_window=32, layer_types=["sliding_attention", "full_attention"] * 2),
    "qwen3_next": dict(intermediate_size=128, moe_intermediate_size=32,
                       shared_expert_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                       head_dim=16, linear_num_value_heads=4, linear_num_key_heads=2,
                       linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4,
                       layer_types=["linear_attention", "full_attention"] * 2),
    # More families on the same routers (the "generous sample" of patch()'s support).
    "glm4_moe": dict(intermediate_size=128, moe_intermediate_size=32, n_routed_experts=8,
                     n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
                     n_group=2, topk_group=1, head_dim=16),
    "dots1": dict(intermediate_size=128, moe_intermediate_size=32, n_routed_experts=8,
                  n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, n_group=1,
                  topk_group=1, head_dim=16, layer_types=["full_attention"] * 4),
    "flex_olmo": dict(intermediate_size=32, num_experts=8, num_experts_per_tok=2, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2),
    "minimax": dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
                    head_dim=16, layer_types=["full_attention", "linear_attention"] * 2),
}

# Families beyond the first eight supported, on routers of the same kinds.
EXTRA_VARIANTS: list[tuple[str, dict]] = [
    ("glm4_moe", {}), ("dots1", {}), ("flex_olmo", {}), ("minimax", {})]

# (model_type, extra config) pairs covering each routing variant once; DeepSeek-V2 twice.
VARIANTS: list[tuple[str, dict]] = [
    ("qwen2_moe", {}),
    ("qwen3_moe", {}),
    ("olmoe", {}),
    ("mixtral", {}),
    ("deepseek_v2", {"topk_method": "greedy"}),
    ("deepseek_v2", {"topk_method": "group_limited_greedy"}),
    ("deepseek_v3", {}),
    ("gpt_oss", {}),
    ("qwen3_next", {}),
]


def variant_id(variant: tuple[str, dict]) -> str:
    model_type, extra = variant
    return model_type + "".join(f"-{v}" for v in extra.values())


def build(model_type: str, seed: int = 0, **extra) -> torch.nn.Module:
    """A tiny random `AutoModelForCausalLM` of the family, in eval mode, fp32."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **{**COMMON, **TINY[model_type], **extra})
    model = AutoModelForCausalLM.from_config(config).eval()
    # Random init leaves DeepSeek-V3's correction bias at zero; give it values so the test sees it.
    for module in model.modules():
        bias = getattr(module, "e_score_correction_bias", None)
        if bias is not None:
            with torch.no_grad():
                bias.copy_(torch.randn_like(bias) * 0.05)
        # Router weights start at zero in some families (all-tied routing): draw them.
        weight = getattr(module, "weight", None)
        if (type(module).__name__.endswith(("TopKRouter", "TopkRouter")) and weight is not None):
            with torch.no_grad():
                weight.normal_(0.0, 0.5)
    return model

ALL_VARIANTS = VARIANTS + EXTRA_VARIANTS
