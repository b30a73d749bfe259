"""Rank 0's parameter bytes under transformers' own tensor parallelism, on the meta model, for the estimate's
tensor-parallel split to be held to (tests/test_tensor_parallel.py).

`python -m memplan.validate.tp_shards N MODEL [MODEL ...]` opens a fake process group of N ranks
(torch.testing._internal.distributed.fake_pg, ../shared/PROBES.md section 1) and a CPU device mesh,
builds each model on the meta device in bf16, resolves its plan as from_pretrained(tp_plan="auto") does
(`_resolve_parallel_plans(DistributedConfig(tp_size=N, tp_plan="auto"))`, transformers 5.23
distributed/mixin.py), applies it (`apply_tensor_parallelism`, distributed/tensor_parallel.py), ties
the weights again as loading does (a tied lm_head is then the sharded embedding: plan keys naming the
tied `lm_head.weight`, which the meta model does not list, are left to that), and prints one JSON
object: model -> bytes of rank 0's local shards of every parameter. One process per N: a process
group's world size is fixed.
"""

from __future__ import annotations

import json
import sys
import warnings


def main(argv: list[str]) -> None:
    warnings.filterwarnings("ignore")
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from transformers.distributed.configuration_utils import DistributedConfig
    from transformers.distributed.tensor_parallel import apply_tensor_parallelism

    from .models import hf_config, meta_model
    from .quiet import quiet_libraries

    quiet_libraries()
    n, models = int(argv[0]), argv[1:]
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=n)
    mesh = init_device_mesh("cpu", (n,))
    out = {}
    for name in models:
        model = meta_model(hf_config(name, "sdpa"), torch.bfloat16)
        plan = model._resolve_parallel_plans(DistributedConfig(tp_size=n, tp_plan="auto"))[0]
        known = set(dict(model.named_modules())) | set(dict(model.named_parameters()))
        apply_tensor_parallelism(model, mesh, {k: v for k, v in plan.items() if k in known})
        model.tie_weights()
        out[name] = sum((p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size()
                        for p in model.parameters())
    dist.destroy_process_group()
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
