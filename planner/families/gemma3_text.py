"""Gemma 3 text (models/gemma3/modeling_gemma3.py, Gemma3ForCausalLM / Gemma3TextConfig): Gemma 2's
four-norm layer (Gemma3DecoderLayer) with q_norm and k_norm, Gemma3RMSNorm over each head
(Gemma3Attention.forward), five sliding layers to one global (`layer_types`; without it
Gemma3TextConfig.__post_init__ slides every layer but each `sliding_window_pattern`-th, default 6),
two RoPE bases (Gemma3RotaryEmbedding: one inv_freq pair per layer type, and Gemma3TextModel
computes one cos/sin table per layer type), no soft-capping by default, and SDPA supported.

The multimodal `gemma3` model_type (Gemma 3 4B and larger: Gemma3ForConditionalGeneration, a
SigLIP vision tower and a projector around this language model) is estimated from its
`text_config` alone (Gemma3Config builds the language model from it as a Gemma3TextConfig): the
language model's parameters, activations and cache, with a note that the vision tower and the
projector (about 0.4B parameters, and the image tokens' activations) are not counted."""

from __future__ import annotations

from ..architecture import ConfigReader, ModelArch
from .base import Family
from .decoder import gated_prefill_mlp
from .gemma2 import gemma_sandwich_arch, sandwich_layer_saved


def _parse(r: ConfigReader, name: str, mt: str) -> ModelArch:
    if mt == "gemma3":
        return _multimodal(r, name)
    pattern = r.int("sliding_window_pattern", default=6)
    arch = gemma_sandwich_arch(r, name, mt, decoder_layer="Gemma3DecoderLayer",
                               windows_default=lambda i: "sliding_attention" if (i + 1) % pattern else "full_attention",
                               attn_softcap_default=None, final_softcap_default=None, qk_norm=True, rope_kinds=1,
                               sdpa_supported=True, vocab_default=262208)
    kinds = len({w is None for w in arch.layer_windows})  # one RoPE per layer type present
    return arch.model_copy(update={"rope_kinds": kinds})


FAMILY = Family(model_types=("gemma3_text", "gemma3"), parse=_parse, layer_saved=sandwich_layer_saved,
                prefill_mlp_per_token=gated_prefill_mlp)


def _multimodal(r: ConfigReader, name: str) -> ModelArch:
    text = r.cfg.get("text_config")
    if not isinstance(text, dict):
        r.fail("model_type 'gemma3' (multimodal Gemma 3) needs text_config, the language model's gemma3_text config "
               f"as a JSON object; got {text!r}")
    inner = ConfigReader(dict(text, model_type="gemma3_text"), name)
    inner.source = f"{r.source} (text_config)"
    arch = _parse(inner, name, "gemma3_text")
    return arch.model_copy(update={
        "family": "gemma3",
        "partial_model": (f"{name} is the multimodal Gemma 3: only its language model (text_config) is counted; "
                          "the SigLIP vision tower, the projector and image tokens are not"),
    })
