"""Llama (transformers models/llama/modeling_llama.py)."""

from .base import Family
from .decoder import gated_prefill_mlp, llama_layer_saved, llama_like

# peft utils/constants.py TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING (peft 0.21)
PEFT_TARGETS = ("q_proj", "v_proj")

FAMILY = Family(
    model_types=("llama",),
    parse=lambda r, name, mt: llama_like(r, name, mt, decoder_layer="LlamaDecoderLayer", default_targets=PEFT_TARGETS),
    layer_saved=llama_layer_saved,
    prefill_mlp_per_token=gated_prefill_mlp,
)
