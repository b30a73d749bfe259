"""What is live at a job's peak on the GPU, allocation by allocation.

`python -m memplan.validate.alloc_trace --job '<Job JSON>' [--layers 2]` builds the job (with the
model cut to `--layers` decoder layers, so the record stays short), runs one warm-up step, then
records one step with torch.cuda.memory._record_memory_history and replays the allocator's events
to find the moment of peak allocated bytes. It prints one JSON line: the peak, the phase it fell
in, the live blocks grouped by the source line that allocated them, and memplan's estimate for the
same cut model. Needs a GPU; used to explain rows where estimate and measurement disagree.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys


def _where(frames: list[dict]) -> str:
    """The innermost frame in model, library or torch Python code: the line that asked."""
    for fr in frames:
        name = fr.get("filename", "")
        if name.endswith(".py") and "memory.py" not in name and "_python_dispatch" not in name:
            short = "/".join(name.split("/")[-2:])
            return f"{short}:{fr.get('line')} {fr.get('name')}"
    return "?"


def live_at_peak(events: list[dict]) -> tuple[int, list[dict]]:
    """Replay alloc/free events; return the peak and the blocks live at it."""
    live: dict[int, dict] = {}
    current = peak = 0
    at_peak: list[dict] = []
    for ev in events:
        action = ev.get("action")
        if action == "alloc":
            live[ev["addr"]] = ev
            current += ev["size"]
            if current > peak:
                peak = current
                at_peak = list(live.values())
        elif action == "free_requested" and ev["addr"] in live:
            current -= live.pop(ev["addr"])["size"]
    return peak, at_peak


def trace(job_json: dict, layers: int, vocab: int | None = None, only_phase: str | None = None) -> dict:
    import torch

    from memplan.estimate import estimate_memory
    from memplan.job import Job
    from memplan.profiles import load_model

    from .build import build
    from .models import cut_config
    from .step import PHASES, forward_context, make_optimizer, run_phase

    job = Job.model_validate({**job_json, "model": cut_config(job_json["model"], layers, vocab)})
    arch = load_model(job.model)
    model = build(job, arch, "cuda")
    opt = make_optimizer(job, [p for p in model.parameters() if p.requires_grad])
    ids = torch.randint(0, arch.vocab, (job.micro_batch, job.seq_len), device="cuda")
    state: dict = {}

    snaps: list[dict] = []
    bases: list[int] = []

    def step(record: bool) -> None:
        for phase in PHASES:
            watch = record and (only_phase is None or phase == only_phase)
            if watch and (only_phase is not None or phase == PHASES[0]):
                torch.cuda.synchronize()
                bases.append(torch.cuda.memory_allocated())
                torch.cuda.memory._record_memory_history(max_entries=500_000, stacks="python")
            with forward_context(job, "cuda") if phase == "forward" else contextlib.nullcontext():
                run_phase(phase, model, opt, ids, state)
            if watch and (only_phase is not None or phase == PHASES[-1]):
                torch.cuda.synchronize()
                snaps.append(torch.cuda.memory._snapshot())
                torch.cuda.memory._record_memory_history(enabled=None)

    step(False)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step(True)
    snap, base = snaps[0], bases[0]
    events = snap["device_traces"][0]
    rel_peak, blocks = live_at_peak(events)
    groups: dict[str, int] = {}
    for b in blocks:
        key = _where(b.get("frames", []))
        groups[key] = groups.get(key, 0) + b["size"]
    est = estimate_memory(job, arch)
    return {
        "check": "alloc_trace",
        "job": job_json,
        "layers": layers,
        "measured_peak_allocated": torch.cuda.max_memory_allocated(),
        "base_allocated": base,
        "peak_above_base": rel_peak,
        "estimate_peak_allocated": est.peak_allocated_bytes,
        "estimate_peak_phase": est.peak_phase,
        "estimate_phases": {p.name: p.allocated_bytes for p in est.phases},
        "vocab": vocab,
        "phase": only_phase or "step",
        "live_above_base_by_source": dict(sorted(groups.items(), key=lambda kv: -kv[1])[:25]),
        "largest_live_blocks": [(b["size"], _where(b.get("frames", []))) for b in sorted(blocks, key=lambda b: -b["size"])[:30]],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--job", required=True, action="append", help="Job as JSON (repeatable)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=None, help="override the vocabulary size")
    parser.add_argument("--phase", default=None, choices=["forward", "backward", "optimizer step"],
                        help="record only this phase (its peak instead of the step's)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    for job in args.job:
        try:
            line = json.dumps(trace(json.loads(job), args.layers, args.vocab, args.phase))
        except Exception as exc:  # recorded, so one failure does not hide the other jobs
            line = json.dumps({"check": "failed", "job": job, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
