"""Qwen2-MoE (models/qwen2_moe/modeling_qwen2_moe.py, transformers 5): Qwen2's attention (q, k
and v biased by `qkv_bias`, o not) and Qwen2MoeSparseMoeBlock: a router (Qwen2MoeTopKRouter: fp32
softmax over all experts, top-k, `norm_topk_prob`, cast back to the compute dtype), fused experts
`moe_intermediate_size` wide run with grouped_mm, and a shared expert (a Qwen2MoeMLP
`shared_expert_intermediate_size` wide over every token) scaled by sigmoid(shared_expert_gate(x))."""

from .base import Family
from .decoder import llama_like
from .routed import ROUTED, experts_of

# peft 0.21 utils/constants.py maps no default targets for qwen2_moe (get_peft_model asks for
# target_modules); memplan's default is qwen2's, q_proj and v_proj
PEFT_TARGETS = ("q_proj", "v_proj")


def layer_windows(r) -> tuple[int | None, ...]:
    """Qwen2MoeConfig.__post_init__: without `layer_types`, layer i slides (by `sliding_window`)
    when use_sliding_window, i < max_window_layers and i is even (`bool((i + 1) % 2)`); the
    attention reads config.layer_types (Qwen2MoeAttention.__init__)."""
    layers = r.int("num_hidden_layers")
    types = r.cfg.get("layer_types")
    use = r.bool("use_sliding_window", False)
    if types is not None:
        if not isinstance(types, list) or len(types) != layers or not set(types) <= {"sliding_attention", "full_attention"}:
            r.fail(f"layer_types must list 'sliding_attention' or 'full_attention' for each of the {layers} layers")
        sliding = [t == "sliding_attention" for t in types]
    else:
        top = r.int("max_window_layers", default=28, minimum=0)
        sliding = [use and i % 2 == 0 and i < top for i in range(layers)]
    if not any(sliding):
        return ()
    window = r.int("sliding_window", default=4096) if use else None
    if window is None:  # sliding layers with use_sliding_window false: the config sets sliding_window 0 (no window)
        return ()
    return tuple(window if s else None for s in sliding)


def _parse(r, name, mt):
    return llama_like(r, name, mt, decoder_layer="Qwen2MoeDecoderLayer", default_targets=PEFT_TARGETS,
                      qkv_bias=r.bool("qkv_bias", True), experts=experts_of(r),
                      expert_intermediate=r.int("moe_intermediate_size"),
                      shared_expert=r.int("shared_expert_intermediate_size", minimum=0),
                      layer_windows=layer_windows(r),
                      router_norm_topk=r.bool("norm_topk_prob", False), router_scores_cast=True,
                      sliding_mask_always=not r.bool("use_sliding_window", False))


FAMILY = Family(model_types=("qwen2_moe",), parse=_parse, **ROUTED)
