"""Random FSDP jobs, the estimate of rank 0 held against the sharded trace of rank 0.

The draw covers what `trace_sharded` runs: every tiny family, full fine-tuning and LoRA,
checkpointing on and off, 2 to 64 ranks, fsdp_full / fsdp_grad_op / fsdp_hybrid, FSDP2 and FSDP1,
16-bit weights and FSDP mixed precision over fp32 weights (accelerate's form and an explicit
policy). One generator serves the CI test (tests/test_fsdp_trace.py, a fixed seed) and this
report:

    python -m memplan.validate.fsdp_differential --jobs 60 --seed 0
"""

from __future__ import annotations

import argparse
import random
import sys
import time

from memplan.errors import MemplanInputError
from memplan.job import Job

from .differential import known_gap, tiny_path

# The families the sharded trace was derived on (issue 11). Those added since (Gemma 2/3, Phi-3,
# OLMo 2 in the unsharded draw) are not yet held to it: the first draw with tiny Gemma 2 found a
# checkpointed LoRA forward under fsdp_hybrid at -3.11% (docs/fsdp.md).
TINY_FAMILIES = ("llama", "mistral", "mixtral", "gemma", "phi", "falcon", "starcoder")

TOLERANCE = 0.03
RANKS = (2, 4, 8, 16, 64)


def draw(rng: random.Random) -> Job:
    """One valid FSDP job (redrawn until the Job and the trace both accept it)."""
    while True:
        family = rng.choice(TINY_FAMILIES)
        n = rng.choice(RANKS)
        sharding = rng.choice(("fsdp_full", "fsdp_grad_op", "fsdp_hybrid"))
        version = rng.choice((1, 2))
        fields = dict(model=tiny_path(family), method=rng.choice(("full", "lora")), num_gpus=n, sharding=sharding,
                      fsdp_version=version, gradient_checkpointing=rng.random() < 0.5,
                      micro_batch=rng.choice((1, 2)), seq_len=rng.choice((64, 128)))
        if sharding == "fsdp_hybrid":
            groups = [g for g in (2, 4, 8) if g < n and n % g == 0]
            if not groups:
                continue
            fields["gpus_per_node"] = rng.choice(groups)
        recipe = rng.choice(("bf16", "accelerate", "policy"))
        if recipe != "bf16" and family != "mixtral":  # Mixtral's grouped_mm experts trace in bf16 only
            fields.update(weight_dtype="fp32", compute_dtype="bf16", fsdp_mixed_precision=recipe)
        try:
            job = Job(**fields)
        except MemplanInputError:
            continue
        if refusal(job) is None:
            return job


def fsdp_gap(job: Job, family: str) -> str | None:
    """FSDP jobs the estimate is known not to follow to 3% (docs/fsdp.md, Known gaps)."""
    if job.fsdp_version == 1 and job.uses_lora and family == "mixtral":
        return ("FSDP1 LoRA over Mixtral's fused experts: forward -4%, backward +5% against the trace, "
                "not yet derived (FSDP2 and full fine-tuning follow it)")
    return None


def refusal(job: Job) -> str | None:
    from memplan.profiles import load_model

    from .sharded import refusal as sharded_refusal

    from memplan.estimate import as_run

    arch = load_model(job.model)
    # the unsharded estimate's known gaps, for the step as FSDP runs it (16-bit gathered parameters)
    return sharded_refusal(job, arch) or known_gap(as_run(job), arch.family) or fsdp_gap(job, arch.family)


def compare(job: Job) -> tuple[dict[str, float], float]:
    """(per measured phase, (estimate - trace) / trace), and the trace's seconds."""
    from memplan.estimate import estimate_memory
    from memplan.profiles import load_model
    from memplan.stacks import cpu_trace_stack

    from .sharded import trace_sharded

    arch = load_model(job.model)
    est = estimate_memory(job, arch, stack=cpu_trace_stack(job)).measured_phases()
    trace = trace_sharded(job)
    errors = {s.phase.value: (est[s.phase.value] - s.peak_bytes) / s.peak_bytes
              for s in trace.timeline if s.iteration == 1}
    return errors, trace.seconds


def describe(job: Job) -> str:
    from pathlib import Path

    recipe = job.fsdp_mixed_precision if job.fsdp_mp else job.base_weight_dtype.value
    return (f"{Path(job.model).stem} {job.method} {job.sharding} v{job.fsdp_version} n={job.num_gpus}"
            + (f"/{job.gpus_per_node}" if job.sharding == "fsdp_hybrid" else "")
            + f" {recipe} ckpt={'on' if job.checkpointing else 'off'} b{job.micro_batch} s{job.seq_len}")


def main(argv: list[str] | None = None) -> int:
    from .quiet import quiet_libraries

    quiet_libraries()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    within = 0
    started = time.perf_counter()
    for _ in range(args.jobs):
        job = draw(rng)
        errors, seconds = compare(job)
        worst = max(errors.values(), key=abs)
        within += abs(worst) <= TOLERANCE
        cells = " ".join(f"{p[:3]} {100 * e:+6.2f}%" for p, e in errors.items())
        print(f"{'ok ' if abs(worst) <= TOLERANCE else 'OFF'} {describe(job):70s} {cells}  ({seconds:.1f} s)", flush=True)
    print(f"{within}/{args.jobs} jobs within {TOLERANCE:.0%} in every phase ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
