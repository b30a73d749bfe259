"""Build the model a job describes on a real device, with random weights and no hub access.

4-bit and 8-bit bases go the way transformers' bitsandbytes loading goes: exact `nn.Linear`
modules outside `lm_head` become bnb modules (transformers `replace_with_bnb_linear`), and each
weight is drawn and quantized one module at a time, so the full 16-bit model never exists on the
device. peft's `prepare_model_for_kbit_training` and `get_peft_model` then run as users run them.
"""

from __future__ import annotations

import torch

from memplan.job import Job

from .models import DTYPES, apply_lora, hf_config, meta_model

INIT_STD = 0.02


def _bnb_config(job: Job):
    from transformers import BitsAndBytesConfig

    if job.base_weight_dtype.value == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=job.base_weight_dtype.value,
        bnb_4bit_use_double_quant=job.double_quant,
        bnb_4bit_compute_dtype=DTYPES[job.compute_dtype.value],
    )


def _quantize_linears(model, job: Job, device: str) -> None:
    import bitsandbytes as bnb
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    replace_with_bnb_linear(model, modules_to_not_convert=["lm_head"], quantization_config=_bnb_config(job))
    dtype = DTYPES[job.compute_dtype.value]
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = torch.randn(module.out_features, module.in_features, dtype=dtype, device=device) * INIT_STD
            module.weight = bnb.nn.Params4bit(
                w.cpu() if device == "cpu" else w,
                requires_grad=False,
                quant_type=module.weight.quant_type,
                compress_statistics=module.weight.compress_statistics,
                quant_storage=torch.uint8,
            ).to(device)
            del w
        elif isinstance(module, bnb.nn.Linear8bitLt):
            w = torch.randn(module.out_features, module.in_features, dtype=dtype) * INIT_STD
            module.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False).to(device)
        else:
            continue
        if module.bias is not None:
            module.bias = torch.nn.Parameter(torch.zeros(module.out_features, dtype=dtype, device=device), requires_grad=False)


def _materialise_rest(model, device: str) -> None:
    """Give every parameter still on the meta device real storage, drawn at random."""
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None or not param.is_meta:
                continue
            real = torch.empty(param.shape, dtype=param.dtype, device=device)
            real.normal_(0.0, INIT_STD) if real.dim() > 1 else real.fill_(1.0)
            module._parameters[name] = torch.nn.Parameter(real, requires_grad=param.requires_grad)
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:
                module._buffers[name] = torch.zeros(buf.shape, dtype=buf.dtype, device=device)


def build(job: Job, arch, device: str):
    """The model, ready to train (quantized, upcast, checkpointed and wrapped in LoRA as the job
    says) or, for an inference job, quantized and in eval mode."""
    cfg = hf_config(job.model, job.attention)
    model = meta_model(cfg, DTYPES[job.compute_dtype.value] if job.quantized else DTYPES[job.base_weight_dtype.value])
    if job.quantized:
        _quantize_linears(model, job, device)
        model.is_loaded_in_4bit = job.base_weight_dtype.is_4bit
        model.is_loaded_in_8bit = not job.base_weight_dtype.is_4bit
    _materialise_rest(model, device)
    model.tie_weights()
    _restore_rotary_buffers(model, device)
    if job.quantized and job.kbit_prepare and job.uses_lora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=job.checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": job.reentrant})
    elif job.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": job.reentrant})
    if job.uses_lora:
        model = apply_lora(model, job, arch)
    model.train(job.task == "train")
    return model


def _restore_rotary_buffers(model, device: str) -> None:
    """Rotary `inv_freq` buffers are computed, not loaded: recompute them on the device."""
    for module in model.modules():
        if hasattr(module, "inv_freq") and hasattr(module, "rope_init_fn"):
            inv_freq, scaling = module.rope_init_fn(module.config, device)
            module.register_buffer("inv_freq", inv_freq, persistent=False)
            module.original_inv_freq = inv_freq
            module.attention_scaling = scaling
