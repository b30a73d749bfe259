"""Qwen3 (models/qwen3/modeling_qwen3.py): Llama's layer with an RMSNorm over each head of q and k."""

from .base import Family
from .decoder import gated_prefill_mlp, llama_layer_saved, llama_like
from .qwen2 import sliding_window

PEFT_TARGETS = ("q_proj", "v_proj")  # peft 0.21 utils/constants.py

FAMILY = Family(
    model_types=("qwen3",),
    parse=lambda r, name, mt: llama_like(r, name, mt, decoder_layer="Qwen3DecoderLayer", default_targets=PEFT_TARGETS,
                                         sliding_window=sliding_window(r), qk_norm=True),
    layer_saved=llama_layer_saved,
    prefill_mlp_per_token=gated_prefill_mlp,
)
