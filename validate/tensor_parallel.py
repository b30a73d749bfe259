"""One rank of transformers' own tensor parallelism on the CPU, for the estimate to be held to
(tests/test_tensor_parallel.py): its parameters, and the generate() step under fake tensors.

`python -m memplan.validate.tensor_parallel N --weights MODEL [MODEL ...]` and
`python -m memplan.validate.tensor_parallel N --generate '<Job JSON>' [...]` open a fake process group of
N ranks (torch.testing._internal.distributed.fake_pg, ../shared/PROBES.md section 1) and a CPU device
mesh, build each model on the meta device, resolve its plan as from_pretrained(tp_plan="auto") does
(`_resolve_parallel_plans(DistributedConfig(tp_size=N, tp_plan="auto"))`, transformers 5.23
distributed/mixin.py) and apply it (`apply_tensor_parallelism`, distributed/tensor_parallel.py), then
tie the weights again as loading does (a tied lm_head is then the sharded embedding; plan keys naming
the tied `lm_head.weight`, which the meta model does not list, are left to that). `--weights` prints
model -> bytes of rank 0's local parameter shards; `--generate` runs the prefill and decode steps as
validate/trace.py trace_inference does (FakeTensorMode, LiveBytes over the local shards) and prints,
per job, the peak allocated of each phase. One JSON object on the last line. One process per N: a
process group's world size is fixed.
"""

from __future__ import annotations

import json
import sys
import warnings


def _sharded(name: str, n: int, mesh, use_cache: bool = False):
    import torch
    from transformers.distributed.configuration_utils import DistributedConfig
    from transformers.distributed.tensor_parallel import apply_tensor_parallelism

    from .models import hf_config, meta_model

    cfg = hf_config(name, "sdpa")
    cfg.use_cache = use_cache
    model = meta_model(cfg, torch.bfloat16)
    plan = model._resolve_parallel_plans(DistributedConfig(tp_size=n, tp_plan="auto"))[0]
    known = set(dict(model.named_modules())) | set(dict(model.named_parameters()))
    apply_tensor_parallelism(model, mesh, {k: v for k, v in plan.items() if k in known})
    model._tp_size = n
    return model


def _local(t):
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def rank_weights(n: int, models: list[str], mesh) -> dict[str, int]:
    out = {}
    for name in models:
        model = _sharded(name, n, mesh)
        model.tie_weights()
        out[name] = sum(_local(p).numel() * p.element_size() for p in model.parameters())
    return out


def generate(n: int, jobs: list[dict], mesh) -> list[dict[str, int]]:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memplan.job import Job

    from .step import generation, make_cache
    from .trace import _unmaterialised_causal_mask
    from .tracker import LiveBytes

    out = []
    for spec in jobs:
        job = Job.model_validate(spec)
        model = _sharded(job.model, n, mesh, use_cache=True)
        tracker = LiveBytes()
        phases: dict[str, int] = {}
        with FakeTensorMode(allow_non_fake_inputs=True), _unmaterialised_causal_mask(), torch.no_grad():
            model = model.to_empty(device="cpu")
            model.tie_weights()
            model.eval()
            for t in list(model.parameters()) + list(model.buffers()):
                tracker.track(_local(t))
            ids = torch.randint(0, model.config.vocab_size, (job.micro_batch, job.seq_len))
            with tracker:
                tracker.start_phase("prefill")
                for phase in generation(model, ids, job.new_tokens, make_cache(job, model.config)):
                    phases[phase] = tracker.phase_peak
                    tracker.start_phase("decode")
        out.append(phases)
    return out


def main(argv: list[str]) -> None:
    warnings.filterwarnings("ignore")
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from .quiet import quiet_libraries

    quiet_libraries()
    n, mode, rest = int(argv[0]), argv[1], argv[2:]
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=n)
    mesh = init_device_mesh("cpu", (n,))
    if mode == "--weights":
        result: object = rank_weights(n, rest, mesh)
    elif mode == "--generate":
        result = generate(n, [json.loads(r) for r in rest], mesh)
    else:
        raise SystemExit(f"unknown mode {mode!r}: --weights MODEL... or --generate JOB_JSON...")
    dist.destroy_process_group()
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
