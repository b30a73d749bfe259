"""Model families, one module per family: config parsing, parameter layout, what the decoder layer
saves, its no-grad MLP moment, decoder-layer class and peft's default LoRA targets. A new family is
one module here plus a line in `_MODULES` (docs/architecture.md)."""

from __future__ import annotations

import importlib

from .base import Family

_MODULES = ("llama", "mistral", "mixtral", "gemma", "qwen2", "qwen3", "falcon", "phi", "gpt_bigcode", "qwen3_moe", "qwen2_moe",
            "gpt_oss", "gpt_neox", "bloom", "gemma2", "gemma3_text", "phi3", "olmo2", "deepseek_v2", "deepseek_v3")

FAMILIES: dict[str, Family] = {}
for _name in _MODULES:
    _family = importlib.import_module(f"{__name__}.{_name}").FAMILY
    for _model_type in _family.model_types:
        FAMILIES[_model_type] = _family


def supported_model_types() -> tuple[str, ...]:
    return tuple(FAMILIES)


def family_of(arch) -> Family:
    return FAMILIES[arch.family]
