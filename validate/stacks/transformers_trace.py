"""memplan's own trace (validate/trace.py), run inside another transformers' venv, and that
transformers' own bitsandbytes conversion counted on the meta model. One JSON request on stdin, one
JSON line out, with the library versions that ran it:

    {"jobs": [Job, ...]}         -> {"traces": [TraceResult, ...], "versions": {...}}
    {"converted": [model, ...]}  -> {"converted": {model: params in 4-bit linears}, "versions": {...}}

    echo '{"jobs": [...]}' | .stack-envs/transformers-4/bin/python -m memplan.validate.stacks.transformers_trace
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import version


def converted_params(model: str) -> int:
    """Parameters in the linears transformers' own `replace_with_bnb_linear` turns into Linear4bit,
    on the meta model (no weights, no GPU)."""
    import bitsandbytes as bnb
    import torch
    from transformers import BitsAndBytesConfig
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    from memplan.validate.models import hf_config, meta_model

    m = meta_model(hf_config(model, "sdpa"), torch.bfloat16)
    m = replace_with_bnb_linear(m, quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    return sum(mod.in_features * mod.out_features for mod in m.modules() if isinstance(mod, bnb.nn.Linear4bit))


def main() -> None:
    from memplan.job import Job
    from memplan.validate.quiet import quiet_libraries

    quiet_libraries()
    request = json.loads(sys.stdin.read())
    reply: dict = {"versions": {p: version(p) for p in ("torch", "transformers", "peft")}}
    if "converted" in request:
        reply["converted"] = {m: converted_params(m) for m in request["converted"]}
    if "jobs" in request:
        from memplan.validate.trace import trace_inference, trace_training

        traces = []
        for raw in request["jobs"]:
            job = Job.model_validate(raw)
            result = trace_inference(job) if job.task == "infer" else trace_training(job)
            traces.append(result.model_dump(mode="json"))
        reply["traces"] = traces
    print(json.dumps(reply))


if __name__ == "__main__":
    main()
