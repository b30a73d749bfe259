"""One training step as the HF Trainer runs it, the optimizers jobs name, and one generation as
`generate()` runs it.

Shared by the CPU trace and the GPU harness so both measure the same step."""

from __future__ import annotations

from memplan.job import Job

from memplan.phases import MEASURED_TRAINING

PHASES = tuple(p.value for p in MEASURED_TRAINING)
LR = 1e-5


def make_optimizer(job: Job, params):
    import torch

    opt = job.optimizer
    if opt == "adamw":
        return torch.optim.AdamW(params, lr=LR, foreach=job.foreach)
    if opt == "sgd":
        return torch.optim.SGD(params, lr=LR, foreach=job.foreach)
    if opt == "sgd_momentum":
        return torch.optim.SGD(params, lr=LR, momentum=0.9, foreach=job.foreach)
    import bitsandbytes as bnb

    return {
        "adamw_8bit": bnb.optim.AdamW8bit,
        "paged_adamw": bnb.optim.PagedAdamW,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
    }[opt](params, lr=LR)


def forward_context(job: Job, device: str):
    """HF Trainer's `bf16=True`/`fp16=True`: the forward runs under autocast."""
    import contextlib

    import torch

    from .models import DTYPES

    if job.runs_autocast:
        return torch.autocast(device, dtype=DTYPES[job.compute_dtype.value])
    return contextlib.nullcontext()


def run_phase(phase: str, model, opt, ids, state: dict) -> None:
    """forward: loss kept, outputs dropped; backward; optimizer step then zero_grad(set_to_none)."""
    if phase == "forward":
        state["loss"] = model(input_ids=ids, labels=ids).loss
    elif phase == "backward":
        state.pop("loss").backward()
    else:
        opt.step()
        opt.zero_grad(set_to_none=True)


def make_cache(job, config):
    """The cache generate() builds for the job's cache options (None: the model's DynamicCache):
    cache_implementation="static" -> StaticCache(max_cache_len = prompt + new tokens), its tensors
    allocated at the first update; kv_cache_dtype fp8 -> QuantizedCache(backend="fp8"); int4/int8 ->
    QuantizedCache with quanto (nbits 4) or HQQ (nbits 8), which must be installed."""
    if job.cache_implementation == "static":
        from transformers import StaticCache

        return StaticCache(config=config, max_cache_len=job.seq_len + job.new_tokens)
    if job.kv_cache_dtype == "fp8":
        from transformers import QuantizedCache

        return QuantizedCache(backend="fp8", config=config)
    if job.kv_cache_dtype in ("int4", "int8"):
        from transformers import QuantizedCache

        backend = "quanto" if job.kv_cache_dtype == "int4" else "hqq"
        return QuantizedCache(backend=backend, config=config, nbits=4 if job.kv_cache_dtype == "int4" else 8)
    return None


def generation(model, ids, new_tokens: int, past=None):
    """Greedy generation with a KV cache, as `generate()` runs it: the prompt's prefill keeps the
    logits of the last position only, generate copies them to fp32 and picks the next token, then
    one forward per new token. With no new tokens, a plain forward over the prompt with logits for
    every position (scoring). Yields each phase's name as it ends (the cache stays alive across the
    yield), so callers can read and reset peaks between phases. Run it under no_grad."""
    import torch

    # `past`: a cache built by the caller (a StaticCache or QuantizedCache, as generate() builds it for
    # cache_implementation="static" / "quantized"); None: the model's DynamicCache
    out = model(input_ids=ids, past_key_values=past, use_cache=True, logits_to_keep=1 if new_tokens else 0)
    past = out.past_key_values
    if new_tokens:
        # transformers generation/utils.py `_sample`: logits[:, -1, :].to(copy=True, dtype=torch.float32)
        next_ids = torch.argmax(out.logits[:, -1, :].to(copy=True, dtype=torch.float32), dim=-1)[:, None]
    del out
    yield "prefill"
    if new_tokens:
        for _ in range(new_tokens):
            out = model(input_ids=next_ids, past_key_values=past, use_cache=True, logits_to_keep=1)
            past = out.past_key_values
            next_ids = torch.argmax(out.logits[:, -1, :].to(copy=True, dtype=torch.float32), dim=-1)[:, None]
            del out
        yield "decode"
