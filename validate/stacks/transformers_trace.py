"""memplan's own trace (validate/trace.py), run inside another transformers' venv: one Job in as
JSON on stdin, its TraceResult out as one JSON line, with the library versions that ran it.

    echo '{"job": {...}}' | .stack-envs/transformers-4/bin/python -m memplan.validate.stacks.transformers_trace
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import version


def main() -> None:
    from memplan.job import Job
    from memplan.validate.quiet import quiet_libraries

    quiet_libraries()
    from memplan.validate.trace import trace_inference, trace_training

    request = json.loads(sys.stdin.read())
    job = Job.model_validate(request["job"])
    result = trace_inference(job) if job.task == "infer" else trace_training(job)
    reply = result.model_dump(mode="json")
    reply["versions"] = {p: version(p) for p in ("torch", "transformers", "peft")}
    print(json.dumps(reply))


if __name__ == "__main__":
    main()
