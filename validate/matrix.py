"""The jobs `memplan validate` runs."""

from __future__ import annotations

from memplan.job import Job
from memplan.profiles import TINY_DIR  # package data (profiles/tiny): a wheel has no tests/

# QLoRA as users run it: NF4 + double quant, bf16 compute, peft LoRA, prepare_model_for_kbit_training
# (gradient checkpointing on), SDPA, paged AdamW.
_QLORA = dict(method="qlora", weight_dtype="nf4", double_quant=True, compute_dtype="bf16", attention="sdpa")


def default_matrix() -> list[Job]:
    """For one 80 GB-class GPU: QLoRA across families, LoRA bf16 and full fine-tuning of small models."""
    jobs: list[Job] = []
    for model in ("llama-2-7b", "mistral-7b", "llama-3-8b", "gemma-7b", "phi-2", "falcon-7b"):
        for b, s in ((1, 512), (4, 2048)):
            jobs.append(Job(model=model, micro_batch=b, seq_len=min(s, 2048), optimizer="paged_adamw_8bit", **_QLORA))
    for model in ("llama-2-7b", "mistral-7b"):
        jobs.append(Job(model=model, lora_targets="all-linear", micro_batch=4, seq_len=1024, optimizer="paged_adamw", **_QLORA))
        jobs.append(Job(model=model, lora_targets="all-linear", micro_batch=4, seq_len=1024, optimizer="paged_adamw_8bit", **_QLORA))
    for model in ("llama-2-7b", "mistral-7b"):
        for ck in (False, True):
            jobs.append(Job(model=model, method="lora", micro_batch=4, seq_len=1024, gradient_checkpointing=ck))
    # HF Trainer's bf16=True over a QLoRA model: the fp32 stream runs under bf16 autocast
    for model, b, s in (("llama-2-7b", 4, 2048), ("mistral-7b", 1, 512), ("falcon-7b", 1, 512)):
        jobs.append(Job(model=model, micro_batch=b, seq_len=s, optimizer="paged_adamw_8bit", autocast=True, **_QLORA))
    jobs.append(Job(model="llama-2-7b", method="lora", attention="eager", micro_batch=2, seq_len=1024))
    for model, b, s in (("phi-2", 4, 1024), ("gemma-2b", 2, 1024), ("llama-2-7b", 1, 512)):
        jobs.append(Job(model=model, method="full", micro_batch=b, seq_len=s))
    # the AdamW foreach temporary, isolated: the same job with the per-parameter loop
    jobs.append(Job(model="phi-2", method="full", micro_batch=4, seq_len=1024, foreach=False))
    jobs.append(Job(model="phi-2", method="full", micro_batch=2, seq_len=1024, gradient_checkpointing=True))
    # the Trainer's default for full fine-tuning with bf16=True: fp32 master weights under autocast
    jobs.append(Job(model="phi-2", method="full", weight_dtype="fp32", micro_batch=2, seq_len=1024))
    return jobs


def holdout_matrix() -> list[Job]:
    """Shapes and models the default matrix does not have: run on a second GPU after calibrating on
    the first, so its errors say how the estimate does on jobs it was not tuned on."""
    q8 = dict(optimizer="paged_adamw_8bit", **_QLORA)
    return [
        Job(model="llama-2-13b", micro_batch=2, seq_len=2048, **q8),
        Job(model="llama-2-7b", micro_batch=2, seq_len=4096, **q8),
        Job(model="mistral-7b", micro_batch=2, seq_len=1024, **q8),
        Job(model="starcoder", micro_batch=1, seq_len=2048, **q8),
        Job(model="llama-3-8b", micro_batch=2, seq_len=2048, autocast=True, **q8),
        Job(model="mistral-7b", micro_batch=4, seq_len=2048, autocast=True, **q8),
        Job(model="gemma-7b", method="lora", micro_batch=1, seq_len=2048),
        Job(model="llama-3-8b", method="lora", micro_batch=2, seq_len=2048, gradient_checkpointing=True),
        Job(model="falcon-7b", method="lora", micro_batch=2, seq_len=1024),
        Job(model="phi-2", method="lora", micro_batch=8, seq_len=512, lora_targets="all-linear"),
        Job(model="gemma-2b", method="full", micro_batch=4, seq_len=1024, gradient_checkpointing=True),
        Job(model="llama-2-7b", method="full", micro_batch=2, seq_len=1024, gradient_checkpointing=True),
    ]


def inference_matrix() -> list[Job]:
    """Generation and scoring on one 80 GB-class GPU: long prompts, large batches, the vocab-wide
    logits of a plain forward, Falcon's math-kernel attention, and a 4-bit base."""
    return [
        Job(model="llama-2-7b", task="infer", micro_batch=8, seq_len=2048, new_tokens=128),
        Job(model="mistral-7b", task="infer", micro_batch=16, seq_len=1024, new_tokens=256),
        Job(model="llama-3-8b", task="infer", micro_batch=4, seq_len=4096, new_tokens=0),
        Job(model="gemma-7b", task="infer", micro_batch=4, seq_len=2048, new_tokens=0),
        Job(model="falcon-7b", task="infer", micro_batch=2, seq_len=1984, new_tokens=64),
        Job(model="phi-2", task="infer", micro_batch=32, seq_len=512, new_tokens=64),
        Job(model="starcoder", task="infer", micro_batch=4, seq_len=2048, new_tokens=64),
        Job(model="llama-2-7b", task="infer", weight_dtype="nf4", micro_batch=8, seq_len=1024, new_tokens=64),
        Job(model="llama-2-7b", task="infer", attention="eager", micro_batch=2, seq_len=2048, new_tokens=32),
    ]


def quick_matrix() -> list[Job]:
    """Tiny models, every method and a generation: seconds on a CPU; what CI runs end to end."""
    tiny = str(TINY_DIR / "tiny-llama.json")
    return [
        Job(model=tiny, method="full", micro_batch=2, seq_len=128),
        Job(model=tiny, method="full", weight_dtype="fp32", compute_dtype="bf16", micro_batch=2, seq_len=128),
        Job(model=tiny, method="lora", micro_batch=2, seq_len=128),
        Job(model=tiny, micro_batch=2, seq_len=128, optimizer="adamw", **_QLORA),
        Job(model=tiny, task="infer", micro_batch=2, seq_len=128, new_tokens=8),
    ]


def sharded_matrix() -> list[Job]:
    """Jobs for rank 0 of a sharded run on one 80 GB-class GPU (`memplan validate --num-gpus N
    --sharding fsdp_*` gives them their sharding): full fine-tuning and LoRA of 7B-8B models, pure
    bf16 and fp32 weights under bf16 mixed precision, with and without checkpointing."""
    return [
        Job(model="llama-2-7b", method="full", micro_batch=1, seq_len=512),
        Job(model="llama-2-7b", method="full", micro_batch=2, seq_len=1024, gradient_checkpointing=True),
        Job(model="llama-2-7b", method="lora", micro_batch=2, seq_len=1024),
        Job(model="llama-2-7b", method="full", weight_dtype="fp32", compute_dtype="bf16", micro_batch=1, seq_len=512),
        Job(model="mistral-7b", method="full", micro_batch=2, seq_len=1024, gradient_checkpointing=True),
        Job(model="llama-3-8b", method="full", micro_batch=1, seq_len=1024),
    ]


def sharded_quick_matrix() -> list[Job]:
    """Tiny models for a sharded dry run on the CPU (`memplan validate --device cpu --num-gpus N ...`)."""
    tiny = str(TINY_DIR / "tiny-llama.json")
    return [
        Job(model=tiny, method="full", micro_batch=1, seq_len=64),
        Job(model=tiny, method="lora", micro_batch=1, seq_len=64),
        Job(model=tiny, method="full", weight_dtype="fp32", compute_dtype="bf16", micro_batch=1, seq_len=64),
    ]


def shard(jobs: list[Job], **sharding) -> list[Job]:
    """The jobs with `sharding` (num_gpus, sharding, fsdp_version, fsdp_mixed_precision, gpus_per_node)
    applied; fsdp_mixed_precision only where the job is mixed precision (it reads it nowhere else). A job
    the sharded step cannot run (validate/sharded.py refusal) is left out."""
    from memplan.profiles import load_model

    from .sharded import refusal

    out = []
    for job in jobs:
        fields = {**job.model_dump(exclude_defaults=True), **sharding}
        if not job.mixed_precision:
            fields.pop("fsdp_mixed_precision", None)
        sharded = Job(**fields)
        if refusal(sharded, load_model(sharded.model)) is None:
            out.append(sharded)
    return out


MATRICES = {"default": default_matrix, "holdout": holdout_matrix, "inference": inference_matrix, "quick": quick_matrix,
            "sharded": sharded_matrix, "sharded-quick": sharded_quick_matrix}
