"""Qwen3-MoE (models/qwen3_moe/modeling_qwen3_moe.py, transformers 5): Qwen3's attention (an
RMSNorm over each head of q and k, no biases) and a routed MLP of many small fused experts
(Qwen3MoeExperts: 3-D `gate_up_proj` and `down_proj`, `moe_intermediate_size` wide, run with
grouped_mm), a router of its own (Qwen3MoeTopKRouter: fp32 softmax over all experts, top-k,
`norm_topk_prob`, the weights cast back to the compute dtype) and no shared expert."""

from .. import activations as act
from ..architecture import ConfigReader
from .base import Family
from .decoder import llama_like

PEFT_TARGETS = ("q_proj", "v_proj")  # peft 0.21 utils/constants.py (qwen3_moe)


def routed_layers(r: ConfigReader, experts: int) -> None:
    """Qwen2MoeDecoderLayer / Qwen3MoeDecoderLayer build the routed block in layer i unless i is in
    `mlp_only_layers` or (i + 1) % `decoder_sparse_step` != 0, a dense MLP there. memplan's layer
    walk holds every decoder layer alike, so only configs whose every layer is routed are taken."""
    layers = r.int("num_hidden_layers")
    step = r.int("decoder_sparse_step", default=1)
    dense = r.cfg.get("mlp_only_layers") or []
    if not isinstance(dense, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in dense):
        r.fail(f"mlp_only_layers must be a list of layer indices, got {dense!r}")
    if step != 1 or any(0 <= i < layers for i in dense):
        r.fail(f"mlp_only_layers ({dense}) and decoder_sparse_step ({step}) make some layers dense; memplan "
               "supports MoE configs whose every layer is routed (mlp_only_layers [] and decoder_sparse_step 1)")


def experts_of(r: ConfigReader) -> tuple[int, int]:
    experts = r.int("num_experts")
    per_tok = r.int("num_experts_per_tok")
    if per_tok > experts:
        r.fail(f"num_experts_per_tok must be at most num_experts ({experts}), got {per_tok}")
    routed_layers(r, experts)
    return experts, per_tok


def _parse(r, name, mt):
    # Qwen3MoeConfig.__post_init__: sliding_window only with use_sliding_window, then in every layer
    window = r.int("sliding_window", default=None) if r.bool("use_sliding_window", False) else None
    return llama_like(r, name, mt, decoder_layer="Qwen3MoeDecoderLayer", default_targets=PEFT_TARGETS,
                      sliding_window=window, qk_norm=True, experts=experts_of(r),
                      expert_intermediate=r.int("moe_intermediate_size"),
                      router_norm_topk=r.bool("norm_topk_prob", False), router_scores_cast=True)


# the grouped_mm routed block (planner/activations.py, integrations/moe.py)
ROUTED = dict(layer_saved=act.routed_layer_saved, prefill_mlp_per_token=act.routed_prefill_per_token,
              forward_transient=act.routed_forward_transient, backward_transient=act.routed_backward_transient)

FAMILY = Family(model_types=("qwen3_moe",), parse=_parse, **ROUTED)
