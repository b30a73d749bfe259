"""Build transformers models from shipped configs with no weights downloaded: meta device first,
then storage on the target device (fake CPU tensors for the trace, real GPU tensors for the harness)."""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def hf_config(model: str, attention: str):
    from transformers import AutoConfig

    from memplan.profiles import load_hf_config

    _, raw = load_hf_config(model)
    raw = dict(raw)
    model_type = raw.pop("model_type")
    # a pre-quantized checkpoint's storage (DeepSeek-V3's fp8) is not built on the meta device or
    # traced: the model is built as the unquantized one it dequantizes to
    raw.pop("quantization_config", None)
    cfg = AutoConfig.for_model(model_type, **raw)
    if attention == "sdpa" and not _supports_sdpa(cfg):
        # a model without an SDPA path (Bloom) loads with eager attention when none is asked for
        # (modeling_utils `_check_and_adjust_attn_implementation`); asking for sdpa raises
        attention = "eager"
    cfg._attn_implementation = attention
    cfg.use_cache = False
    return cfg


def _supports_sdpa(cfg) -> bool:
    from transformers import AutoModelForCausalLM

    cls = AutoModelForCausalLM._model_mapping.get(type(cfg), None)
    return cls is None or bool(getattr(cls, "_supports_sdpa", False))


def cut_config(model: str, layers: int, vocab: int | None = None) -> str:
    """A copy of a model's config with fewer decoder layers (and optionally a smaller vocabulary,
    which moves the peak from the loss into the layers), written to a temporary file whose path
    works wherever a model name does."""
    import json
    import tempfile

    from memplan.profiles import load_hf_config

    _, raw = load_hf_config(model)
    raw = dict(raw)
    if vocab:
        raw["vocab_size"] = vocab
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if isinstance(raw.get(key), int) and raw[key] >= vocab:
                raw[key] = 0
    for key in ("num_hidden_layers", "n_layer"):
        if key in raw:
            raw[key] = layers
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(raw, f)
    return f.name


def meta_model(cfg, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.tie_weights()
    return model


def training_meta_model(job, arch):
    """The job's model on the meta device as the Trainer prepares it: checkpointing as the job says,
    then wrapped in LoRA; the unsharded trace and the sharded builder both start from it."""
    model = meta_model(hf_config(job.model, job.attention), DTYPES[job.base_weight_dtype.value])
    if job.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": job.reentrant})
    return apply_lora(model, job, arch) if job.uses_lora else model


def apply_lora(model, job, arch):
    from peft import LoraConfig, get_peft_model

    from memplan.training import resolve_targets

    cfg = LoraConfig(
        r=job.lora_rank,
        lora_alpha=job.lora_alpha,
        lora_dropout=job.lora_dropout,
        target_modules=list(resolve_targets(job, arch)),
        task_type="CAUSAL_LM",
        use_dora=job.dora,
    )
    model = get_peft_model(model, cfg)
    if arch.tied_embeddings:
        _tie_wrapped_embeddings(model.get_base_model())
    # peft makes adapters fp32 over 16-bit bases (autocast_adapter_dtype=True) and in the base
    # dtype otherwise; the job names their dtype, so cast lora_A/lora_B to it (the trace and the
    # GPU worker both build through here)
    dtype = DTYPES[job.lora_dtype.value]
    for name, module in model.named_modules():
        if name.rsplit(".", 2)[-2:-1] in (["lora_A"], ["lora_B"]) and isinstance(module, torch.nn.Linear):
            module.to(dtype)
        elif name.rsplit(".", 2)[-2:-1] == ["lora_magnitude_vector"]:
            module.to(dtype)  # DoRA's magnitude (peft makes it fp32 with the adapters)
    for module in model.modules():  # Embedding LoRA keeps its A and B as bare parameters
        for key in ("lora_embedding_A", "lora_embedding_B"):
            if isinstance(getattr(module, key, None), torch.nn.ParameterDict):
                getattr(module, key).to(dtype)
    return model


def _tie_wrapped_embeddings(inner) -> None:
    """Tied embeddings with LoRA on the embedding or the head: peft wraps them (the base weights stay
    one tensor), but transformers' tie_weights, which the trace calls again after to_empty, sets
    `lm_head.weight` on the wrapper and fails. Tie the wrapped base layers instead, as loading did."""
    emb, head = inner.get_input_embeddings(), inner.get_output_embeddings()
    if not (hasattr(emb, "base_layer") or hasattr(head, "base_layer")):
        return

    def tie_weights(*args, **kwargs) -> None:
        getattr(head, "base_layer", head).weight = getattr(emb, "base_layer", emb).weight

    inner.tie_weights = tie_weights
