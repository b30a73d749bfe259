"""One training step as the HF Trainer runs it, and the optimizers jobs name.

Shared by the CPU trace and the GPU harness so both measure the same step."""

from __future__ import annotations

from memplan.job import Job

PHASES = ("forward", "backward", "optimizer step")
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
