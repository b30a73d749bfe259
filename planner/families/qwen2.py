"""Qwen2 (models/qwen2/modeling_qwen2.py): q, k and v carry a bias, o does not."""

from ..architecture import ConfigReader
from .base import Family
from .decoder import gated_prefill_mlp, llama_layer_saved, llama_like

PEFT_TARGETS = ("q_proj", "v_proj")  # peft 0.21 utils/constants.py


def sliding_window(r: ConfigReader) -> int | None:
    """Qwen2 and Qwen3 slide only with `use_sliding_window`, and then only the layers from
    `max_window_layers` on (transformers Qwen2Config.layer_types); with some layers full, the cache
    is counted at full length (an upper bound)."""
    if r.bool("use_sliding_window", False) and r.int("max_window_layers", default=0, minimum=0) == 0:
        return r.int("sliding_window", default=None)
    return None


FAMILY = Family(
    model_types=("qwen2",),
    parse=lambda r, name, mt: llama_like(r, name, mt, decoder_layer="Qwen2DecoderLayer", default_targets=PEFT_TARGETS,
                                         qkv_bias=True, sliding_window=sliding_window(r)),
    layer_saved=llama_layer_saved,
    prefill_mlp_per_token=gated_prefill_mlp,
)
