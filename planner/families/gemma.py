"""Gemma (models/gemma/modeling_gemma.py): Llama's layer with GemmaRMSNorm (x * (1 + w), in fp32)
and tied embeddings by default."""

from .base import Family
from .decoder import gated_prefill_mlp, llama_layer_saved, llama_like

PEFT_TARGETS = ("q_proj", "v_proj")  # peft 0.21 utils/constants.py

FAMILY = Family(
    model_types=("gemma",),
    parse=lambda r, name, mt: llama_like(r, name, mt, decoder_layer="GemmaDecoderLayer", default_targets=PEFT_TARGETS,
                                         tied_default=True, norm="rms_gemma"),
    layer_saved=llama_layer_saved,
    prefill_mlp_per_token=gated_prefill_mlp,
)
