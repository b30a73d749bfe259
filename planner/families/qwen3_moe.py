"""Qwen3-MoE (models/qwen3_moe/modeling_qwen3_moe.py, transformers 5): Qwen3's attention (an
RMSNorm over each head of q and k, no biases) and a routed MLP of many small fused experts
(Qwen3MoeExperts: 3-D `gate_up_proj` and `down_proj`, `moe_intermediate_size` wide, run with
grouped_mm), a router of its own (Qwen3MoeTopKRouter: fp32 softmax over all experts, top-k,
`norm_topk_prob`, the weights cast back to the compute dtype) and no shared expert."""

from .base import Family
from .decoder import llama_like
from .routed import ROUTED, experts_of

# peft 0.21 utils/constants.py maps no default targets for qwen3_moe (get_peft_model asks for
# target_modules); memplan's default is qwen3's, q_proj and v_proj
PEFT_TARGETS = ("q_proj", "v_proj")


def _parse(r, name, mt):
    # Qwen3MoeConfig.__post_init__: sliding_window only with use_sliding_window, then in every layer
    window = r.int("sliding_window", default=None) if r.bool("use_sliding_window", False) else None
    return llama_like(r, name, mt, decoder_layer="Qwen3MoeDecoderLayer", default_targets=PEFT_TARGETS,
                      sliding_window=window, qk_norm=True, experts=experts_of(r),
                      expert_intermediate=r.int("moe_intermediate_size"),
                      router_norm_topk=r.bool("norm_topk_prob", False), router_scores_cast=True)


FAMILY = Family(model_types=("qwen3_moe",), parse=_parse, **ROUTED)
