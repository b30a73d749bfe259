"""DeepSeek-V3 (models/deepseek_v3/modeling_deepseek_v3.py, transformers 5): DeepSeek-V2's layer
(deepseek_v2.py) with rotary by rotate_half or its interleaved form in place of complex
multiplication, MLPs without bias, and DeepseekV3TopkRouter: fp32 sigmoid scores plus the fp32
`e_score_correction_bias` buffer, grouped top-k (n_group, topk_group), normalised weights.
The multi-token-prediction layers (`num_nextn_predict_layers`) are not built by transformers
(DeepseekV3PreTrainedModel._keys_to_ignore_on_load_unexpected drops `model.layers.61.*`)."""

from .base import Family
from .deepseek_v2 import layer_saved, parse_deepseek, prefill_mlp

FAMILY = Family(model_types=("deepseek_v3",),
                parse=lambda r, name, mt: parse_deepseek(r, name, mt, decoder_layer="DeepseekV3DecoderLayer",
                                                         experts_key="n_routed_experts", router="sigmoid_grouped",
                                                         mlp_bias=False),
                layer_saved=layer_saved, prefill_mlp_per_token=prefill_mlp)
