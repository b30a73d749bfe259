"""Gemma 3 text (models/gemma3/modeling_gemma3.py, Gemma3ForCausalLM / Gemma3TextConfig): Gemma 2's
four-norm layer (Gemma3DecoderLayer) with q_norm and k_norm, Gemma3RMSNorm over each head
(Gemma3Attention.forward), five sliding layers to one global (`layer_types`; without it
Gemma3TextConfig.__post_init__ slides every layer but each `sliding_window_pattern`-th, default 6),
two RoPE bases (Gemma3RotaryEmbedding: one inv_freq pair per layer type, and Gemma3TextModel
computes one cos/sin table per layer type), no soft-capping by default, and SDPA supported.

The multimodal `gemma3` model_type (Gemma 3 4B and larger: Gemma3ForConditionalGeneration, a
SigLIP vision tower and a projector around this language model) is refused: give the
`text_config` as a gemma3_text config to estimate the language model alone."""

from __future__ import annotations

from ..architecture import ConfigReader, ModelArch
from .base import Family
from .decoder import gated_prefill_mlp
from .gemma2 import gemma_sandwich_arch, sandwich_layer_saved


def _parse(r: ConfigReader, name: str, mt: str) -> ModelArch:
    if mt == "gemma3":
        r.fail("model_type 'gemma3' is the multimodal Gemma 3 (vision tower and projector): not supported; "
               "write its text_config as a config with model_type 'gemma3_text' to estimate the language model")
    pattern = r.int("sliding_window_pattern", default=6)
    arch = gemma_sandwich_arch(r, name, mt, decoder_layer="Gemma3DecoderLayer",
                               windows_default=lambda i: "sliding_attention" if (i + 1) % pattern else "full_attention",
                               attn_softcap_default=None, final_softcap_default=None, qk_norm=True, rope_kinds=1,
                               sdpa_supported=True, vocab_default=262208)
    kinds = len({w is None for w in arch.layer_windows})  # one RoPE per layer type present
    return arch.model_copy(update={"rope_kinds": kinds})


FAMILY = Family(model_types=("gemma3_text", "gemma3"), parse=_parse, layer_saved=sandwich_layer_saved,
                prefill_mlp_per_token=gated_prefill_mlp)
