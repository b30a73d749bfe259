"""What the routed-experts families (Qwen2-MoE, Qwen3-MoE, gpt-oss: transformers 5's fused 3-D
experts run by integrations/moe.py's grouped_mm path) share: reading the expert counts, and the
Family hooks of the grouped_mm routed block (planner/activations.py `routed_*`). Not a family."""

from __future__ import annotations

from .. import activations as act
from ..architecture import ConfigReader

# the grouped_mm routed block (planner/activations.py, integrations/moe.py)
ROUTED = dict(layer_saved=act.routed_layer_saved, prefill_mlp_per_token=act.routed_prefill_per_token,
              forward_transient=act.routed_forward_transient, backward_transient=act.routed_backward_transient)


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


def experts_of(r: ConfigReader, key: str = "num_experts") -> tuple[int, int]:
    """(experts, experts per token), every layer routed."""
    experts = r.int(key)
    per_tok = r.int("num_experts_per_tok")
    if per_tok > experts:
        r.fail(f"num_experts_per_tok must be at most {key} ({experts}), got {per_tok}")
    routed_layers(r, experts)
    return experts, per_tok
