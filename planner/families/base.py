"""What a model family module provides: its config parser, what its decoder layer saves for
backward, and its MLP's widest no-grad moment. Everything else about a family is data on the
ModelArch its parser returns (traits such as `sdpa_broadcast_kv`), so formulas read traits and never
branch on a family's name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from ..activations import Ctx, Saved
    from ..architecture import ConfigReader, ModelArch


@dataclass(frozen=True)
class Family:
    model_types: tuple[str, ...]  # config.json model_type values it parses
    parse: "Callable[[ConfigReader, str, str], ModelArch]"  # (reader, display name, model_type)
    # bytes of each tensor one decoder layer saves for backward (transformers modeling file)
    layer_saved: "Callable[[ModelArch, Ctx], Saved]"
    # bytes the MLP holds at its widest moment of a no-grad forward, per token, in the compute dtype
    # (inference.prefill_transient_bytes adds the stream tensors around it)
    prefill_mlp_per_token: "Callable[[ModelArch, int], int]"
    # Optional moments of the layer's MLP that the shared formulas do not hold (routed experts
    # combined by transformers' grouped_mm path, integrations/moe.py): bytes above the saved tensors
    # at the MLP's forward high point (the walk takes the larger of it and the attention's), and
    # the layer's whole backward transient in place of activations.layer_backward_transient.
    forward_transient: "Callable[[ModelArch, Ctx, Saved, bool], int] | None" = None
    backward_transient: "Callable[[ModelArch, Ctx, Saved], int] | None" = None
