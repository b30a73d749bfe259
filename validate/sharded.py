"""Sharded training traced per rank: rank 0 of an FSDP job, through a fake process group.

The model is sharded the way HF Trainer + accelerate 1.15 shard it, with accelerate's own plugin
(`utils/dataclasses.py` FullyShardedDataParallelPlugin) and, for FSDP2, accelerate's own
`utils/fsdp_utils.py` `fsdp2_prepare_model` (called with a stand-in for the Accelerator that carries
only what that function reads). The collectives run through torch.distributed's fake backend
(`torch.testing._internal.distributed.fake_pg`): rank 0 of `num_gpus`, every collective a no-op with
outputs of the right shapes, so one process sees exactly the buffers one rank allocates.

`build_sharded` is the one place the sharded model is made; the CPU trace (`trace_sharded`, under
FakeTensorMode) and the GPU worker (real tensors on one device) both call it.

What accelerate does, read from its source (accelerate 1.15.0, transformers 5.23.0):
- FSDP2 (`fsdp2_prepare_model`): `fully_shard` every decoder layer (`transformer_based_wrap` on the
  model's `_no_split_modules`), then the input embedding alone, then [final norm, lm_head] as one group
  with reshard_after_forward=False (with tied embeddings the embedding joins that group), then the root
  with torch's default (False for the root). reshard_after_forward: True for fsdp_full and
  fsdp_hybrid, False for fsdp_grad_op. Mixed precision "accelerate": `set_mixed_precision` builds
  `MixedPrecisionPolicy(param_dtype=c, reduce_dtype=c, output_dtype=c)`; trainable parameters not in
  fp32 are upcast to fp32 when accelerate's mixed_precision is not "no". `Accelerator._prepare_fsdp2`
  never calls `prepare_model`, so the forward is NOT wrapped in autocast (nor convert_outputs_to_fp32)
  under FSDP2, and transformers 5.23's Trainer adds no autocast of its own
  (`autocast_smart_context_manager` returns a nullcontext): the trace runs it without autocast unless
  the job sets `autocast=True` explicitly.
- FSDP1 (`Accelerator.prepare_model`): forward wrapped as `convert_outputs_to_fp32(autocast(forward))`
  when mixed precision is on (native_amp), then `FullyShardedDataParallel(model, sharding_strategy,
  auto_wrap_policy, mixed_precision=MixedPrecision(param, reduce, buffer), backward_prefetch,
  forward_prefetch, use_orig_params, limit_all_gathers, device_id)`, then flat parameters not in fp32
  that train are upcast to fp32. With peft the Trainer first replaces the wrap policy by peft's
  `fsdp_auto_wrap_policy` (transformers `distributed/fsdp.py` `update_fsdp_plugin_peft`): every leaf
  module with a trainable weight (lora_A, lora_B) becomes its own FSDP unit besides the layers.
- fsdp_hybrid: accelerate's `ParallelismConfig(dp_replicate_size=num_gpus/gpus_per_node,
  dp_shard_size=gpus_per_node)` mesh; FSDP2 shards over its `fsdp_dim_names` (HSDP), FSDP1 gets
  HYBRID_SHARD with that 2-D mesh as `device_mesh`.
"""

from __future__ import annotations

import contextlib
import time
from types import SimpleNamespace

from pydantic import BaseModel

from memplan.errors import MemplanInputError
from memplan.job import Job

from .trace import PhaseSnapshot, TraceResult

SHARDINGS = ("fsdp_full", "fsdp_grad_op", "fsdp_hybrid")


def refusal(job: Job, arch) -> str | None:
    """Why `job` cannot be traced sharded, in one line; None when it can."""
    from .trace import refusal as unsharded_refusal

    if job.task != "train":
        return "sharded traces are of training steps: use --task train"
    if job.sharding in ("ddp", "zero1", "zero2", "zero3"):
        return "no fake-tensor trace for DeepSpeed/DDP, its estimate is held by hand-derived tests"
    if job.sharding not in SHARDINGS:
        return f"sharding {job.sharding!r} is not traced sharded: use one of {', '.join(SHARDINGS)}"
    if job.num_gpus < 2:
        return f"a sharded trace needs --num-gpus 2 or more, got {job.num_gpus}"
    from memplan.fsdp import unsupported

    if unsupported(job):
        return unsupported(job)
    if job.cpu_offload:
        return ("--cpu-offload is not traced: on the CPU the offloaded states land on the same device, so the trace "
                "equals the one without offload")
    if job.sharding == "fsdp_hybrid" and (job.gpus_per_node < 2 or job.num_gpus % job.gpus_per_node):
        return (f"fsdp_hybrid shards within groups of --gpus-per-node GPUs: {job.num_gpus} GPUs do not split into "
                f"groups of {job.gpus_per_node} (give a divisor of --num-gpus, 2 or more)")
    return unsharded_refusal(job, arch)


def _accelerate_mixed_precision(job: Job) -> str:
    """accelerate's `mixed_precision` for the job: the compute dtype where the Trainer would run
    bf16=True / fp16=True (fp32 weights with 16-bit compute, or autocast asked for), else "no"."""
    if job.fsdp_policy:
        return "no"  # an explicit MixedPrecisionPolicy over fp32 weights: nothing for accelerate to cast
    if job.mixed_precision or job.autocast:
        return job.compute_dtype.value
    return "no"


def _plugin(job: Job, model, arch):
    """accelerate's FullyShardedDataParallelPlugin as the Trainer's fsdp config builds it."""
    import torch
    from accelerate.utils import FullyShardedDataParallelPlugin

    from .models import DTYPES

    v = job.fsdp_version
    if v == 2:
        reshard = job.sharding != "fsdp_grad_op"
    else:
        reshard = {"fsdp_full": "FULL_SHARD", "fsdp_grad_op": "SHARD_GRAD_OP",
                   "fsdp_hybrid": "HYBRID_SHARD"}[job.sharding]
    kwargs = dict(fsdp_version=v, reshard_after_forward=reshard, auto_wrap_policy="transformer_based_wrap",
                  transformer_cls_names_to_wrap=[arch.decoder_layer], cpu_ram_efficient_loading=False,
                  state_dict_type="SHARDED_STATE_DICT")
    if v == 1:
        # sharding_strategy too: accelerate's plugin defaults it to FULL_SHARD (FSDP_SHARDING_STRATEGY unset)
        # and prepare_model prefers it to reshard_after_forward, so a strategy given as reshard_after_forward
        # alone (transformers 5.23 TrainingArguments' FSDP1 route) runs FULL_SHARD; the trace runs the job's
        kwargs.update(sharding_strategy=reshard, use_orig_params=True, backward_prefetch="BACKWARD_PRE",
                      forward_prefetch=False, sync_module_states=False)
    plugin = FullyShardedDataParallelPlugin(**kwargs)
    compute = DTYPES[job.compute_dtype.value]
    if job.fsdp_policy:
        # an explicit policy, as torchtitan and torchtune set it: gathered in the compute dtype, reduced in fp32
        if v == 2:
            from torch.distributed.fsdp import MixedPrecisionPolicy

            plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
        else:
            from torch.distributed.fsdp import MixedPrecision

            plugin.mixed_precision_policy = MixedPrecision(param_dtype=compute, reduce_dtype=torch.float32,
                                                           buffer_dtype=compute)
    elif _accelerate_mixed_precision(job) != "no":
        # accelerate state.py: fsdp_plugin.set_mixed_precision(mixed_precision) when it is not "no"
        plugin.set_mixed_precision(_accelerate_mixed_precision(job))
    plugin.set_auto_wrap_policy(model)
    if v == 1 and job.uses_lora:
        from transformers.distributed.fsdp import update_fsdp_plugin_peft

        update_fsdp_plugin_peft(model, SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)))
    return plugin


@contextlib.contextmanager
def fake_process_group(world_size: int, rank: int = 0):
    """torch.distributed's fake backend as the default group (rank `rank` of `world_size`), destroyed
    on exit so the next trace in the process starts clean. One at a time."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised: sharded traces run one at a time")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _mesh(job: Job, device_type: str):
    """(the mesh FSDP shards over, the names of its FSDP dims or None)."""
    from torch.distributed.device_mesh import init_device_mesh

    if job.sharding == "fsdp_hybrid":
        from accelerate.parallelism_config import ParallelismConfig

        pc = ParallelismConfig(dp_replicate_size=job.num_gpus // job.gpus_per_node, dp_shard_size=job.gpus_per_node)
        mesh = pc.build_device_mesh(device_type)
        return mesh, tuple(pc.fsdp_dim_names)
    return init_device_mesh(device_type, (job.num_gpus,)), None


class _Accelerator:
    """What `fsdp2_prepare_model` reads of an Accelerator, and nothing else."""

    def __init__(self, plugin, mesh, dims, mixed_precision: str, device) -> None:
        self.state = SimpleNamespace(fsdp_plugin=plugin)
        self.torch_device_mesh = mesh if dims else None
        self.parallelism_config = SimpleNamespace(fsdp_dim_names=dims) if dims else None
        self.mixed_precision = mixed_precision
        self.is_main_process = False  # keeps accelerate's informational warnings quiet
        self.device = device


def _wrap_forward_amp(job: Job, model, device_type: str) -> None:
    """accelerator.prepare_model with native_amp: forward = convert_outputs_to_fp32(autocast(forward))."""
    from types import MethodType

    import torch
    from accelerate.utils import convert_outputs_to_fp32

    from .models import DTYPES

    autocast = torch.autocast(device_type=device_type, dtype=DTYPES[job.compute_dtype.value])
    forward = autocast(model.forward.__func__)
    model.forward = MethodType(forward, model)
    model.forward = MethodType(convert_outputs_to_fp32(model.forward.__func__), model)


def build_sharded(job: Job, arch, device: str, materialise=contextlib.nullcontext, init=None):
    """The model of `job` sharded for rank 0 on `device` ("cpu" for the trace, "cuda" on a GPU),
    inside a fake process group the caller holds. Built on the meta device, then given storage
    inside `materialise()` (FakeTensorMode for the trace); `init(model)`, if given, fills the
    storage (the GPU worker draws random weights). Returns (model, mesh)."""
    import torch

    from .models import training_meta_model

    model = training_meta_model(job, arch)
    plugin = _plugin(job, model, arch)
    mesh, dims = _mesh(job, torch.device(device).type)
    mp = _accelerate_mixed_precision(job)
    if job.fsdp_version == 2:
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        if job.runs_autocast:
            _wrap_forward_amp(job, model, torch.device(device).type)
        model = fsdp2_prepare_model(_Accelerator(plugin, mesh, dims, mp, torch.device(device)), model)
        with materialise():
            model = model.to_empty(device=device)
            _retie(model)
            if init is not None:
                init(model)
        return model, mesh
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with materialise():
        model = model.to_empty(device=device)
        _retie(model)
        if init is not None:
            init(model)
        if job.runs_autocast:
            _wrap_forward_amp(job, model, torch.device(device).type)
        kwargs = dict(
            sharding_strategy=plugin.sharding_strategy or plugin.reshard_after_forward,
            cpu_offload=plugin.cpu_offload,
            auto_wrap_policy=plugin.auto_wrap_policy,
            mixed_precision=plugin.mixed_precision_policy,
            sync_module_states=plugin.sync_module_states,
            backward_prefetch=plugin.backward_prefetch,
            forward_prefetch=plugin.forward_prefetch,
            use_orig_params=plugin.use_orig_params,
            limit_all_gathers=plugin.limit_all_gathers,
            device_id=torch.device(device),
        )
        if job.sharding == "fsdp_hybrid":
            kwargs["device_mesh"] = mesh
        model = FSDP(model, **kwargs)
        if mp != "no":  # accelerator.py prepare_model: trainable flat parameters upcast to fp32
            for module in FSDP.fsdp_modules(model):
                if not module._has_params:
                    continue
                param = module._flat_param
                if param.dtype != torch.float32 and param.device != torch.device("meta") and param.requires_grad:
                    param.data = param.data.to(torch.float32)
                    module._handle._orig_param_dtype = torch.float32
    return model, mesh


@contextlib.contextmanager
def _linear_foreach_sharding():
    """Speed only, no change in what runs or allocates. DTensor's sharding propagation of a foreach op
    (AdamW's `_foreach_*` over every parameter: 291 DTensors for a 7B model) is the first optimizer
    step's cost; two of its steps are redone per tensor for identical inputs:
    - `_sharding_prop._propagate_use_strided_shard_flag` is called once per tensor of the op, and each
      call scans every argument's spec for a `_StridedShard` placement (O(n^2)); it does nothing when
      none has one (its `_use_strided is None` return), so that scan is done once per op schema and the
      call skipped when it finds none;
    - `_ops.utils.expand_to_full_mesh_op_strategy`, which single_dim_strategy.py looks up at each call,
      expands the same per-element schema (its lru-cached closure passes one schema object for all
      elements of equal shape) to the same strategy: it is a pure function of its arguments, so its
      result is kept for the same schema object, mesh, output meta and (structurally) equal strategies.
    Both are restored, and the kept results dropped, on exit."""
    from torch.distributed.tensor import _sharding_prop as sp
    from torch.distributed.tensor._ops import utils as op_utils
    from torch.distributed.tensor.placement_types import _StridedShard

    saved_flag, saved_expand = sp._propagate_use_strided_shard_flag, op_utils.expand_to_full_mesh_op_strategy
    last: list = [None, False]
    kept: dict = {}

    def propagate(op_strategy, op_schema) -> None:
        if last[0] is not op_schema:
            strided = any(isinstance(p, _StridedShard) for spec in op_schema.args_spec for p in spec.placements)
            last[:] = [op_schema, strided]
        if last[1]:
            saved_flag(op_strategy, op_schema)

    def expand(mesh, op_schema, strategies, **kwargs):
        meta = kwargs.get("output_tensor_meta")
        key = (id(mesh), id(op_schema), id(meta), repr(strategies),
               repr(sorted((k, v) for k, v in kwargs.items() if k != "output_tensor_meta")))
        hit = kept.get(key)
        if hit is None:
            # the objects whose ids are in the key stay referenced, so no id is reused while kept
            hit = kept[key] = (saved_expand(mesh, op_schema, strategies, **kwargs), mesh, op_schema, meta)
        return hit[0]

    sp._propagate_use_strided_shard_flag, op_utils.expand_to_full_mesh_op_strategy = propagate, expand
    try:
        yield
    finally:
        sp._propagate_use_strided_shard_flag, op_utils.expand_to_full_mesh_op_strategy = saved_flag, saved_expand
        last[:] = [None, False]
        kept.clear()


@contextlib.contextmanager
def _fake_data_pointers():
    """Fake tensors have no memory, so every data pointer reads 0 (with a warning). FSDP decides by
    data pointers: FSDP1 `_runtime_utils._catch_all_reshard` skips a unit whose flat parameter's
    pointer equals its local shard's ("already resharded"), which with 0 == 0 leaves every unit
    without a post-backward hook gathered (frozen LoRA units: +0.9 GiB for Llama-2-7B that a real run
    frees); `_flat_param` asserts an unsharded flat parameter is allocated by a pointer > 0 (FSDP1
    SHARD_GRAD_OP fails) and compares storages by pointer; FSDP2's `reset_sharded_param` does too.
    While a sharded trace runs, a fake tensor's storage (a meta one) with bytes reads its
    StorageImpl's address instead (unique while it lives, equal exactly for the same storage), and a
    tensor that pointer plus its offset; an empty storage stays 0, as a freed one reads on a device.
    Real tensors keep their pointers."""
    import torch

    saved_storage, saved_tensor = torch.UntypedStorage.data_ptr, torch.Tensor.data_ptr

    def storage_ptr(storage) -> int:
        if storage.device.type != "meta":  # a fake tensor's storage is a meta one
            return saved_storage(storage)
        return storage._cdata if storage.nbytes() > 0 else 0

    def tensor_ptr(tensor) -> int:
        storage = tensor.untyped_storage()
        if storage.device.type != "meta":
            return saved_tensor(tensor)
        return storage._cdata + tensor.storage_offset() * tensor.element_size() if storage.nbytes() > 0 else 0

    torch.UntypedStorage.data_ptr, torch.Tensor.data_ptr = storage_ptr, tensor_ptr
    try:
        yield
    finally:
        torch.UntypedStorage.data_ptr, torch.Tensor.data_ptr = saved_storage, saved_tensor


def init_weights(model) -> None:
    """Random weights in the rank's shards (the GPU worker and the CPU dry run hold real storage;
    to_empty leaves it uninitialised), and the rotary buffers recomputed, as validate/build.py does."""
    import torch

    from .build import INIT_STD, _restore_rotary_buffers
    from .tracker import local

    with torch.no_grad():
        for p in model.parameters():
            t = local(p)
            t.normal_(0.0, INIT_STD) if p.dim() > 1 else t.fill_(1.0)
    device = next(model.parameters()).device
    _restore_rotary_buffers(model, device)


def _retie(model) -> None:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner.tie_weights()


def _params(model) -> list:
    """Every parameter the rank holds: the original ones (DTensors under FSDP2, views into the
    flat shard under FSDP1 with use_orig_params) and FSDP1's flat parameters."""
    params = list(model.parameters())
    try:
        from torch.distributed.fsdp._traversal_utils import _get_fsdp_handles

        params += [h.flat_param for h in _get_fsdp_handles(model)]
    except Exception:  # noqa: BLE001 - FSDP2 modules have no handles
        pass
    return params


class LiveGroup(BaseModel):
    dtype: str
    bytes: int
    op: str
    count: int


class ShardedSnapshot(PhaseSnapshot):
    """A phase of the rank's step; with detail, what was live at the phase's peak."""

    live_at_peak: list[LiveGroup] = []


class ShardedTrace(TraceResult):
    timeline: list[ShardedSnapshot]
    autocast: bool
    world_size: int


def trace_sharded(job: Job, iterations: int = 2, detail: bool = False) -> ShardedTrace:
    """Rank 0 of the job's sharded training step under FakeTensorMode: per phase (forward, backward,
    optimizer step) peak and end bytes, the rank's local parameter, gradient and optimizer-state
    bytes; `iterations` steps, the steady state being the last."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memplan.profiles import load_model

    from .step import PHASES, make_optimizer, run_phase
    from .trace import _unmaterialised_causal_mask
    from .tracker import LiveBytes

    arch = load_model(job.model)
    why = refusal(job, arch)
    if why:
        raise MemplanInputError(why)
    # the libraries first: `seconds` is the trace's own time, not the process's first imports
    import accelerate.utils.fsdp_utils  # noqa: F401
    import peft  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401
    import transformers  # noqa: F401

    started = time.perf_counter()
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    timeline: list[ShardedSnapshot] = []
    with fake_process_group(job.num_gpus), _unmaterialised_causal_mask(), _linear_foreach_sharding(), \
            _fake_data_pointers():
        model, _mesh_ = build_sharded(job, arch, "cpu", materialise=lambda: fake)
        with fake:
            model.train()
            tracker = LiveBytes(detail=detail)
            for t in _params(model):
                tracker.track(t)
            for b in model.buffers():
                tracker.track(b)
            opt = make_optimizer(job, [p for p in model.parameters() if p.requires_grad])
            ids = torch.randint(0, arch.vocab, (job.micro_batch, job.seq_len))
            with tracker:
                state: dict = {}
                for it in range(iterations):
                    for phase in PHASES:
                        tracker.start_phase(phase)
                        run_phase(phase, model, opt, ids, state)
                        timeline.append(_snapshot(tracker, it, phase, model, opt, detail))
            del state, opt, model
    steady = [s for s in timeline if s.iteration == iterations - 1]
    top = max(steady, key=lambda s: s.peak_bytes)
    return ShardedTrace(job=job, peak_allocated_bytes=top.peak_bytes, peak_phase=top.phase, timeline=timeline,
                        seconds=time.perf_counter() - started, autocast=job.runs_autocast, world_size=job.num_gpus)


def _snapshot(tracker, iteration, phase, model, opt, detail) -> ShardedSnapshot:
    params = _params(model)
    grads = [p.grad for p in params if p.grad is not None]
    states = [v for st in opt.state.values() for v in st.values() if hasattr(v, "untyped_storage") and v.dim() > 0]
    live = []
    if detail:
        live = [LiveGroup(dtype=d, bytes=n, op=op, count=c)
                for (d, n, op), c in sorted(tracker.phase_peak_live.items(), key=lambda kv: -kv[0][1] * kv[1])]
    return ShardedSnapshot(
        iteration=iteration, phase=phase, peak_bytes=tracker.phase_peak, end_bytes=tracker.current,
        params_bytes=tracker.bytes_of(params), grads_bytes=tracker.bytes_of(grads),
        optimizer_bytes=tracker.bytes_of(states), live_at_peak=live,
    )


def _describe(result: ShardedTrace, top: int = 12) -> str:
    """The rank's timeline, and with detail what was live at each steady-state phase's peak."""
    from memplan.units import human as gib

    job = result.job
    lines = [f"rank 0 of {job.num_gpus}, {job.sharding} FSDP{job.fsdp_version}, {job.model} {job.method}, "
             f"b{job.micro_batch} s{job.seq_len}, autocast {'on' if result.autocast else 'off'} "
             f"({result.seconds:.1f} s, CPU, fake tensors)",
             f"{'iter':>4s} {'phase':16s}{'peak':>12s}{'end':>12s}"
             f"{'parameters':>12s}{'gradients':>12s}{'optimizer':>12s}"]
    for s in result.timeline:
        cells = (s.peak_bytes, s.end_bytes, s.params_bytes, s.grads_bytes, s.optimizer_bytes)
        lines.append(f"{s.iteration:>4d} {s.phase:16s}" + "".join(f"{gib(c):>12s}" for c in cells))
    return "\n".join(lines) + describe_live(result, top)


def describe_live(result: ShardedTrace, top: int = 12) -> str:
    """With detail: the largest groups of storages live at each steady-state phase's peak."""
    from memplan.units import human

    lines = []
    last = result.timeline[-1].iteration
    for s in result.timeline:
        if s.iteration != last or not s.live_at_peak:
            continue
        lines.append(f"\nlive at the {s.phase} peak ({human(s.peak_bytes)}; {s.peak_bytes:,} B), largest groups "
                     "(op: the one that allocated them):")
        lines.append(f"{'count':>6s} {'dtype':9s}{'bytes each':>16s}{'total':>12s}  op")
        for g in s.live_at_peak[:top]:
            lines.append(f"{g.count:>6d} {g.dtype:9s}{g.bytes:>16,d}{human(g.count * g.bytes):>12s}  "
                         f"{g.op or '(before the step)'}")
        rest = s.live_at_peak[top:]
        if rest:
            lines.append(f"{sum(g.count for g in rest):>6d} more in {len(rest)} groups, "
                         f"{human(sum(g.count * g.bytes for g in rest))}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m memplan.validate.sharded",
                                     description="Trace rank 0 of a sharded (FSDP) training step on the CPU.")
    parser.add_argument("--model", required=True)
    parser.add_argument("--num-gpus", type=int, default=8)
    parser.add_argument("--sharding", default="fsdp_full", choices=SHARDINGS)
    parser.add_argument("--fsdp-version", type=int, default=2, choices=(1, 2))
    parser.add_argument("--fsdp-mixed-precision", default=None, choices=("accelerate", "policy"))
    parser.add_argument("--gpus-per-node", type=int, default=None)
    parser.add_argument("--method", default="full", choices=("full", "lora"))
    parser.add_argument("--weight-dtype", default=None)
    parser.add_argument("--compute-dtype", default=None)
    parser.add_argument("--micro-batch", "-b", type=int, default=1)
    parser.add_argument("--seq-len", "-s", type=int, default=512)
    parser.add_argument("--gradient-checkpointing", action="store_true", default=None)
    parser.add_argument("--optimizer", default=None, choices=("adamw", "sgd", "sgd_momentum"))
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--detail", action="store_true", help="what is live at each phase's peak, grouped")
    parser.add_argument("--top", type=int, default=12, help="groups shown per phase with --detail")
    args = parser.parse_args(argv)
    from .quiet import quiet_libraries

    quiet_libraries()
    fields = {k: v for k, v in vars(args).items() if k not in ("iterations", "detail", "top") and v is not None}
    try:
        job = Job(**fields)
        result = trace_sharded(job, iterations=args.iterations, detail=args.detail)
    except MemplanInputError as exc:
        print(f"memplan: error: {exc}", file=__import__("sys").stderr)
        return 2
    print(_describe(result, args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
