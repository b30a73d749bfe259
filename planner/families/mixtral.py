"""Mixtral (models/mixtral/modeling_mixtral.py, transformers 5): fused 3-D expert tensors
(`gate_up_proj`, `down_proj`) run with grouped_mm, a router of its own (MixtralTopKRouter)."""

from .base import Family
from .decoder import llama_layer_saved, llama_like, routed_prefill_mlp

PEFT_TARGETS = ("q_proj", "v_proj")  # peft 0.21 utils/constants.py


def _parse(r, name, mt):
    experts = r.int("num_local_experts")
    per_tok = r.int("num_experts_per_tok")
    if per_tok > experts:
        r.fail(f"num_experts_per_tok must be at most num_local_experts ({experts}), got {per_tok}")
    return llama_like(r, name, mt, decoder_layer="MixtralDecoderLayer", default_targets=PEFT_TARGETS,
                      sliding_window=r.int("sliding_window", default=None), experts=(experts, per_tok))


FAMILY = Family(model_types=("mixtral",), parse=_parse, layer_saved=llama_layer_saved,
                prefill_mlp_per_token=routed_prefill_mlp)
