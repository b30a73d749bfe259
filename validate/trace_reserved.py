"""Does the allocator model, fed the true allocation sequence, reproduce the GPU's reserved memory?

`python -m memplan.validate.trace_reserved --out FILE [--rows ROWS.jsonl ...] [--iterations 3]`
takes every committed GPU row it can trace at full size under fake tensors (method lora or full:
quantized bases cannot be traced, validate/trace.py `refusal`), traces the row's job on the CPU
(validate/trace.py trace_training), replays the recorded sequence through planner/allocator.py with
default settings and with expandable segments, and appends one JSON line per row to FILE as it goes:
the measured peak allocated and reserved, the trace's, the replayed reserved and its error against
the measured one. `--job '<Job JSON>'` traces one job (no measured figures) and prints its line.

Iterations: the GPU worker runs 1 warm-up step and 2 measured steps in one process
(validate/worker.py `measure`), and its peak_reserved_bytes is the maximum over the whole process,
the model build included (the caching allocator releases nothing without empty_cache, so that is
the reserved at the end). The trace therefore runs 3 iterations by default, the parameters tracked
first in model.parameters() order standing for the build.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
GPU_ROWS = [RESULTS / "H100-80GB-2026-11-24.jsonl", RESULTS / "H200-2026-11-24-holdout.jsonl"]
GPU_STEPS = 3  # 1 warm-up + 2 measured (validate/worker.py measure: warmup=1, steps=2)


def traceable_rows(paths: list[Path]) -> list[dict]:
    """The rows measured without error whose job the trace can run at full size."""
    from memplan.job import Job
    from memplan.profiles import load_model

    from .trace import refusal

    out = []
    for path in paths:
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            if row["job"].get("task", "train") != "train" or row["measured"].get("status") != "ok":
                continue
            job = Job.model_validate(row["job"])
            if refusal(job, load_model(job.model)) is None:
                out.append(row | {"source": path.name})
    return out


def versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def trace_row(job_json: dict, iterations: int = GPU_STEPS) -> dict:
    """The trace's and the replayed figures for one job."""
    from memplan.job import Job

    from .trace import trace_training

    r = trace_training(Job.model_validate(job_json), iterations=iterations, allocator=True)
    return {
        "trace_peak_allocated_bytes": r.peak_allocated_bytes,
        "replayed_peak_allocated_bytes": r.allocator.peak_allocated_bytes,
        "replayed_peak_reserved_bytes": r.allocator.peak_reserved_bytes,
        "replayed_segments": r.allocator.segments,
        "replayed_expandable_peak_reserved_bytes": r.allocator_expandable.peak_reserved_bytes,
        "events": r.events,
        "allocations": r.allocations,
        "iterations": iterations,
        "trace_seconds": round(r.seconds, 1),
    }


def command(job_json: dict, iterations: int) -> str:
    return (f"python -m memplan.validate.trace_reserved --job {shlex.quote(json.dumps(job_json, separators=(',', ':')))}"
            f" --iterations {iterations}")


def line(row: dict, traced: dict, vers: dict) -> dict:
    """One output line: the measured row's figures beside the trace's and the replay's."""
    measured = row["measured"]
    reserved = measured["peak_reserved_bytes"]
    return {
        "job": row["job"],
        "source": row["source"],
        "gpu": row["environment"].get("gpu"),
        "gpu_torch": row["environment"].get("torch"),
        "measured_peak_allocated_bytes": measured["peak_allocated_bytes"],
        "measured_peak_reserved_bytes": reserved,
        **traced,
        # (replayed - measured) / measured
        "replayed_reserved_error": round((traced["replayed_peak_reserved_bytes"] - reserved) / reserved, 4),
        "trace_allocated_error": round((traced["trace_peak_allocated_bytes"] - measured["peak_allocated_bytes"])
                                       / measured["peak_allocated_bytes"], 4),
        "command": command(row["job"], traced["iterations"]),
        "versions": vers,
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m memplan.validate.trace_reserved", description=__doc__.splitlines()[0])
    p.add_argument("--out", help="JSONL file the rows are appended to as they are produced")
    p.add_argument("--rows", nargs="*", help="GPU result files (default: the committed H100 and H200 rows)")
    p.add_argument("--job", help="trace this one Job (JSON) and print its line")
    p.add_argument("--iterations", type=int, default=GPU_STEPS, help="training steps traced (default: the GPU's 3)")
    args = p.parse_args(argv)
    if args.iterations < 1:
        print(f"--iterations {args.iterations}: give 1 or more", file=sys.stderr)
        return 2
    from .quiet import quiet_libraries

    quiet_libraries()
    vers = versions()
    if args.job:
        job_json = json.loads(args.job)
        print(json.dumps({"job": job_json, **trace_row(job_json, args.iterations),
                          "command": command(job_json, args.iterations), "versions": vers}))
        return 0
    if not args.out:
        print("give --out FILE (or --job JSON)", file=sys.stderr)
        return 2
    rows = traceable_rows([Path(r) for r in args.rows] if args.rows else GPU_ROWS)
    done: dict[str, dict] = {}  # a job measured twice is traced once
    for i, row in enumerate(rows):
        key = json.dumps(row["job"], sort_keys=True)
        if key not in done:
            done[key] = trace_row(row["job"], args.iterations)
        out = line(row, done[key], vers)
        with open(args.out, "a") as f:
            f.write(json.dumps(out) + "\n")
        print(f"{i + 1}/{len(rows)} {row['job']['model']} {row['job']['method']}: replayed reserved "
              f"{out['replayed_reserved_error']:+.2%} vs measured", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
