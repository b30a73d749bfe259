"""Mistral (models/mistral/modeling_mistral.py): Llama's layer, every layer sliding its window."""

from .base import Family
from .decoder import gated_prefill_mlp, llama_layer_saved, llama_like

PEFT_TARGETS = ("q_proj", "v_proj")  # peft 0.21 utils/constants.py

FAMILY = Family(
    model_types=("mistral",),
    parse=lambda r, name, mt: llama_like(r, name, mt, decoder_layer="MistralDecoderLayer", default_targets=PEFT_TARGETS,
                                         sliding_window=r.int("sliding_window", default=None)),
    layer_saved=llama_layer_saved,
    prefill_mlp_per_token=gated_prefill_mlp,
)
