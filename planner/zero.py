"""DeepSpeed ZeRO stages 1, 2 and 3: what one data-parallel rank holds, from DeepSpeed's own source.

Pure (no I/O). Every term is derived in docs/deepspeed.md with file and line of DeepSpeed 0.19.8
(runtime/zero/stage_1_and_2.py, stage3.py, partition_parameters.py, partitioned_param_coordinator.py,
config.py, offload_config.py, runtime/engine.py). The knobs (`ZeroConfig`) are named after DeepSpeed's
`zero_optimization` keys and default to what accelerate 1.15's DeepSpeed plugin writes without a config
file: it sets only the stage and the offload devices (accelerate utils/dataclasses.py
`DeepSpeedPlugin.__post_init__`), so every other value is DeepSpeed's own default (runtime/zero/config.py).

The model, in one paragraph: DeepSpeed with `bf16.enabled` (accelerate's `mixed_precision: bf16`) casts
every floating-point parameter to bf16 (engine.py `_cast_module_mixed_precision`) and runs no autocast;
the optimizer updates fp32 master partitions. ZeRO-1/2 keep the 16-bit weights whole on every rank
(one flat buffer per parameter group), ZeRO-3 keeps 1/N of each parameter (all-gathering a module's
parameters just before it runs, prefetching ahead and keeping parameters whose next use is near).
Gradients go through fixed-size reduce ("ipg") buckets into a per-rank gradient partition.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from .errors import MemplanInputError, input_error

if TYPE_CHECKING:  # the estimate's types (no import cycle: job.py imports this module)
    from .architecture import ModelArch
    from .job import Job
    from .stacks import Stack

# DeepSpeed 0.19.8 runtime/zero/config.py (DeepSpeedZeroConfig field defaults)
DS_VERSION = "0.19.8"
DEFAULTS: dict[str, Any] = {
    "contiguous_gradients": True,
    "overlap_comm": None,  # None: True for stage 3, False for 1 and 2 (validator `overlap_comm_valid`)
    "reduce_bucket_size": 500_000_000,
    "allgather_bucket_size": 500_000_000,
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_max_live_parameters": 1_000_000_000,
    "stage3_max_reuse_distance": 1_000_000_000,
    "stage3_param_persistence_threshold": 100_000,
    "sub_group_size": 1_000_000_000,
}
# stage_1_and_2.py `nccl_start_alignment_factor`: the flat buffer is padded to 2 x world elements
NCCL_ALIGNMENT = 2


class ZeroConfig(BaseModel):
    """DeepSpeed's `zero_optimization` knobs that decide per-rank memory (names as DeepSpeed's keys;
    `offload_*_device` / `*_pin_memory` are its `offload_optimizer.device`, `.pin_memory`, ...).

    An offload device of None follows the job's `cpu_offload`: the optimizer to the host, and for
    ZeRO-3 the parameters too (what `--emit accelerate` writes for it)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    contiguous_gradients: bool = True
    overlap_comm: bool | None = None
    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_max_live_parameters: int = 1_000_000_000
    stage3_max_reuse_distance: int = 1_000_000_000
    stage3_param_persistence_threshold: int = 100_000
    sub_group_size: int = 1_000_000_000
    offload_optimizer_device: Literal["none", "cpu"] | None = None
    offload_optimizer_pin_memory: bool = True
    offload_param_device: Literal["none", "cpu"] | None = None
    offload_param_pin_memory: bool = True

    def __init__(self, **fields) -> None:
        try:
            super().__init__(**fields)
        except ValidationError as exc:
            raise input_error(exc) from exc

    @field_validator("reduce_bucket_size")
    @classmethod
    def _positive(cls, v: int, info) -> int:
        if v <= 0:  # config.py: Field(gt=0)
            raise MemplanInputError(f"deepspeed {info.field_name} must be a positive number of elements, got {v}")
        return v

    @field_validator("allgather_bucket_size", "stage3_prefetch_bucket_size", "stage3_max_live_parameters",
                     "stage3_max_reuse_distance", "stage3_param_persistence_threshold", "sub_group_size")
    @classmethod
    def _non_negative(cls, v: int, info) -> int:
        if v < 0:  # config.py: Field(ge=0)
            raise MemplanInputError(f"deepspeed {info.field_name} must be zero or a positive number of elements, got {v}")
        if info.field_name == "allgather_bucket_size" and v % NCCL_ALIGNMENT:
            # stage_1_and_2.py asserts allgather_bucket_size % nccl_start_alignment_factor == 0
            raise MemplanInputError(f"deepspeed allgather_bucket_size must be a multiple of {NCCL_ALIGNMENT}, got {v}")
        return v

    @classmethod
    def hf_auto(cls, hidden: int, **fields) -> "ZeroConfig":
        """The values transformers' Trainer and accelerate put in for "auto" (transformers
        integrations/deepspeed.py `trainer_config_finalize`, accelerate accelerator.py
        `_prepare_deepspeed`): reduce_bucket_size hidden^2, stage3_prefetch_bucket_size 0.9 hidden^2,
        stage3_param_persistence_threshold 10 hidden."""
        return cls(**{**_auto_values(hidden), **fields})

    def overlap(self, stage: int) -> bool:
        return (stage == 3) if self.overlap_comm is None else self.overlap_comm

    def offload_optimizer(self, cpu_offload: bool) -> bool:
        return cpu_offload if self.offload_optimizer_device is None else self.offload_optimizer_device == "cpu"

    def offload_param(self, stage: int, cpu_offload: bool) -> bool:
        if self.offload_param_device is None:
            return cpu_offload and stage == 3
        return self.offload_param_device == "cpu"

    def check(self, stage: int, cpu_offload: bool) -> None:
        """One line for a combination DeepSpeed refuses or memplan does not model."""
        if self.offload_param_device == "cpu" and stage != 3:
            raise MemplanInputError(f"deepspeed offload_param_device cpu applies to ZeRO-3 (config.py: \"Valid only "
                                    f"with stage 3\"), not to zero{stage}: drop it or use --sharding zero3")
        explicit = [d for d in (self.offload_optimizer_device, self.offload_param_device) if d is not None]
        if "cpu" in explicit and not cpu_offload:
            raise MemplanInputError("deepspeed offload to cpu needs --cpu-offload (the job's host offload switch)")
        if cpu_offload and explicit and "cpu" not in explicit and None not in (
                self.offload_optimizer_device, self.offload_param_device if stage == 3 else "none"):
            raise MemplanInputError("--cpu-offload with every deepspeed offload device 'none' offloads nothing: drop "
                                    "--cpu-offload or set offload_optimizer_device cpu")

    def resolved(self, stage: int, cpu_offload: bool) -> "ZeroConfig":
        """Every None replaced by what it means for this stage and job."""
        return self.model_copy(update={
            "overlap_comm": self.overlap(stage),
            "offload_optimizer_device": "cpu" if self.offload_optimizer(cpu_offload) else "none",
            "offload_param_device": "cpu" if self.offload_param(stage, cpu_offload) else "none",
        })

    def zero_optimization(self, stage: int, cpu_offload: bool) -> dict:
        """The `zero_optimization` section of a DeepSpeed config with these values."""
        r = self.resolved(stage, cpu_offload)
        out: dict[str, Any] = {"stage": stage, "contiguous_gradients": r.contiguous_gradients,
                               "overlap_comm": r.overlap_comm, "reduce_bucket_size": r.reduce_bucket_size,
                               "allgather_bucket_size": r.allgather_bucket_size}
        if stage == 3:
            out.update({"stage3_prefetch_bucket_size": r.stage3_prefetch_bucket_size,
                        "stage3_max_live_parameters": r.stage3_max_live_parameters,
                        "stage3_max_reuse_distance": r.stage3_max_reuse_distance,
                        "stage3_param_persistence_threshold": r.stage3_param_persistence_threshold,
                        "sub_group_size": r.sub_group_size})
        out["offload_optimizer"] = {"device": r.offload_optimizer_device, "pin_memory": r.offload_optimizer_pin_memory}
        if stage == 3:
            out["offload_param"] = {"device": r.offload_param_device, "pin_memory": r.offload_param_pin_memory}
        return out

    @classmethod
    def from_ds_config(cls, data: dict, hidden: int | None = None, source: str = "DeepSpeed config") -> "ZeroConfig":
        """The knobs of a DeepSpeed config dict (its `zero_optimization` section; "auto" filled as
        transformers and accelerate fill it, which needs the model's `hidden` size). Keys this model does
        not read are left to the estimate's other readers (planner/from_config.py)."""
        zo = data.get("zero_optimization", {}) if isinstance(data, dict) else {}
        if not isinstance(zo, dict):
            raise MemplanInputError(f"{source}: zero_optimization must be a mapping, got {type(zo).__name__}")
        fields: dict[str, Any] = {}
        auto = _auto_values(hidden) if hidden else {}
        for key in DEFAULTS:
            if key not in zo or zo[key] is None:
                continue
            v = zo[key]
            if v == "auto":
                if key not in auto:
                    raise MemplanInputError(f"{source}: zero_optimization.{key}: 'auto' is filled by the trainer from "
                                            "the model" + ("" if hidden else "'s hidden size: give the model")
                                            if key in _AUTO_KEYS else f"{source}: zero_optimization.{key}: 'auto' is "
                                            "not a value DeepSpeed or accelerate fills for it")
                fields[key] = auto[key]
            elif isinstance(DEFAULTS[key], bool) or key == "overlap_comm":
                if not isinstance(v, bool):
                    raise MemplanInputError(f"{source}: zero_optimization.{key}: {v!r} is not allowed: true or false")
                fields[key] = v
            else:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v):
                    raise MemplanInputError(f"{source}: zero_optimization.{key}: {v!r} is not allowed: a whole number "
                                            "of elements (e.g. 5e8)")
                fields[key] = int(v)
        for section in ("offload_optimizer", "offload_param"):
            sub = zo.get(section)
            if sub is None:
                continue
            if not isinstance(sub, dict):
                raise MemplanInputError(f"{source}: zero_optimization.{section} must be a mapping, got {sub!r}")
            dev = sub.get("device", "none")
            if not isinstance(dev, str) or dev.lower() not in ("none", "cpu"):
                raise MemplanInputError(f"{source}: zero_optimization.{section}.device: {dev!r} is not allowed: "
                                        "cpu or none (nvme is not modelled)")
            fields[f"{section}_device"] = dev.lower()
            if "pin_memory" in sub:
                if not isinstance(sub["pin_memory"], bool):
                    raise MemplanInputError(f"{source}: zero_optimization.{section}.pin_memory: "
                                            f"{sub['pin_memory']!r} is not allowed: true or false")
                fields[f"{section}_pin_memory"] = sub["pin_memory"]
        return cls(**fields)


_AUTO_KEYS = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")


def _auto_values(hidden: int | None) -> dict[str, int]:
    if not hidden:
        return {}
    return {"reduce_bucket_size": hidden * hidden, "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
            "stage3_param_persistence_threshold": 10 * hidden}


# ---------------------------------------------------------------------------------------------
# the model's parameters, as DeepSpeed sees them


@dataclass(frozen=True)
class Param:
    """One parameter tensor: DeepSpeed's element count (`ds_numel`) and bytes per element as held."""

    numel: int
    elem_bytes: int
    trainable: bool

    @property
    def nbytes(self) -> int:
        return self.numel * self.elem_bytes


@dataclass
class Node:
    """A module as ZeRO-3's hooks see it: the parameters it owns directly (`iter_params(recurse=False)`),
    its submodules in call order, and whether its output takes a backward hook (tensors needing grad)."""

    params: tuple[int, ...] = ()
    children: list["Node"] = field(default_factory=list)
    grad: bool = True
    block: bool = False  # a decoder layer (the checkpointing unit)


@dataclass(frozen=True)
class Layout:
    """The parameters (index -> Param) and the module tree that calls them."""

    params: tuple[Param, ...]
    root: Node


# the first projection of a block's MLP, per family's names (planner/families): the second norm and the
# MLP's module come before it
MLP_FIRST = frozenset({"gate_proj", "up_proj", "fc1", "c_fc", "dense_h_to_4h", "experts.gate_up_proj"})
# the projection the MLP's activation module runs after (gated: gate_proj, act_fn, up_proj, down_proj)
ACT_AFTER = frozenset({"gate_proj", "fc1", "c_fc", "dense_h_to_4h"})


def layout(job: "Job", arch: "ModelArch", targets: tuple[str, ...], stack: "Stack") -> Layout:
    """The model's parameter tensors and the modules that call them, in call order (planner/params.py
    counts the same tensors; tests/test_zero.py checks the sums). ZeRO-3 hooks every module, and every
    fetch, of a module with parameters or without, issues a prefetch: so the tree has the causal-LM
    wrapper, the model body, the rotary embedding (no backward: its outputs need no grad), and per block
    the block, its attention and MLP modules and the activation, as transformers' modeling files call
    them (peft's LoRA layer: the wrapper, base_layer, lora_dropout, lora_A, lora_B). Under DeepSpeed's
    bf16/fp16 mode every float parameter is held in the compute dtype (engine.py
    `_cast_module_mixed_precision`); 4/8-bit weights keep bitsandbytes' packed storage, counted as
    bytes (ds_numel of a uint8 tensor), with their quantization statistics."""
    from .dtypes import float_bytes, linear_weight_bytes
    from .params import HEAD_MODULE, embedding_module

    eb = float_bytes(job.compute_dtype)  # 16-bit mode casts every float parameter; fp32 compute keeps fp32
    full = job.method == "full"
    quantized = {lin.name for lin in arch.projections if job.quantized and stack.bnb_converts(lin)}
    params: list[Param] = []

    def add(numel: int, trainable: bool, elem: int = eb) -> int:
        params.append(Param(numel=numel, elem_bytes=elem, trainable=trainable))
        return len(params) - 1

    def leaf(*idx: int, grad: bool = True) -> Node:
        return Node(params=tuple(idx), grad=grad)

    def lora(base: Node, d_in: int, d_out: int, extra: tuple[int, ...] = ()) -> Node:
        """peft's LoraLayer around `base`: base_layer, lora_dropout, lora_A, lora_B (with DoRA's magnitude)."""
        r = job.lora_rank
        return Node(params=extra, children=[base, Node(), leaf(add(r * d_in, True)),
                                            leaf(add(d_out * r, True), *((add(d_out, True),) if job.dora else ()))])

    def norm() -> Node:
        return leaf(add(arch.hidden, full), *((add(arch.hidden, full),) if arch.norm_bias else ()))

    body = Node()
    emb_w = add(arch.vocab * arch.hidden, full)
    embed = leaf(emb_w)
    if not full and embedding_module(arch) in targets:  # peft Embedding: the adapters are its own parameters
        r = job.lora_rank
        embed = Node(params=(emb_w, add(r * arch.vocab, True), add(arch.hidden * r, True),
                             *((add(arch.hidden, True),) if job.dora else ())), children=[Node()])
    body.children.append(embed)
    if arch.learned_positions:
        body.children.append(leaf(add(arch.max_positions * arch.hidden, full)))
    else:
        body.children.append(Node(grad=False))  # rotary embedding: cos/sin need no grad
    projections = list(arch.linears)
    mlp_at = next((k for k, lin in enumerate(projections) if lin.name in MLP_FIRST or lin.module == "fused experts"),
                  len(projections))
    if arch.router is not None:
        projections.insert(mlp_at, arch.router)
    for _ in range(arch.layers):
        # call order in the tree; parameters numbered in registration order (the flat buffer's order:
        # transformers' blocks register the attention and the MLP before their norms)
        block = Node(block=True)
        norm1, norm2, qk = Node(), Node(), [Node(), Node()] if arch.qk_norm else []
        block.children.append(norm1)
        attn, mlp = Node(), Node()
        block.children.append(attn)
        attn.children += qk
        experts: list[int] = []
        for k, lin in enumerate(projections):
            if lin.name in quantized:
                w = linear_weight_bytes(lin.d_out, lin.d_in, job.base_weight_dtype, job.double_quant)
                idx = [add(lin.copies * w, False, 1)]
            else:
                idx = [add(lin.copies * lin.d_in * lin.d_out, full)]
            if lin.bias:
                idx.append(add(lin.copies * lin.d_out, full))
            parent = attn if k < mlp_at else mlp
            if lin.module == "fused experts":
                experts += idx  # transformers 5 MoE: one experts module holds the fused tensors
                continue
            node = leaf(*idx)
            if not full and lin.name in targets:
                node = lora(node, lin.d_in, lin.d_out)
            parent.children.append(node)
            if lin.name in ACT_AFTER:
                parent.children.append(Node())  # the activation module
        if experts:
            mlp.children.append(leaf(*experts))
        for q, width in zip(qk, arch.qk_norm_widths):
            q.params = (add(width, full),)
        norm1.params = norm().params
        if arch.norms_per_layer >= 2:
            norm2.params = norm().params
            block.children.append(norm2)
        for _ in range(arch.norms_per_layer - 2):  # Gemma 2/3's pre- and post-feedforward norms
            block.children.append(norm())
        block.children.append(mlp)
        body.children.append(block)
    body.children.append(norm())
    if arch.tied_embeddings:
        head = leaf(emb_w)
    else:
        head = leaf(add(arch.vocab * arch.hidden, full), *((add(arch.vocab, full),) if arch.lm_head_bias else ()))
    if not full and HEAD_MODULE in targets:
        head = lora(head, arch.hidden, arch.vocab)
    root = Node(children=[body, head])
    return Layout(params=tuple(params), root=root)


def _preorder(node: Node) -> list[tuple[int, ...]]:
    out = [node.params]
    for child in node.children:
        out += _preorder(child)
    return out


def _backward(node: Node, ckpt: bool) -> list[tuple[int, ...]]:
    """Pre-backward fetches: a module's hook fires when its output's gradient arrives, so before its
    submodules', which run in reverse; a checkpointed block runs its forward again (see below)."""
    if not node.grad:
        return []
    out: list = [node.params]
    for child in reversed(node.children):
        out += _backward(child, ckpt)
    if ckpt and node.block:
        # non-reentrant checkpointing recomputes when the first backward node needing a saved tensor
        # runs: the hooks down to the first module with parameters (its matmul) have fired by then,
        # and that module's post-backward release comes only after the recomputation (which releases
        # it itself, after its recomputed forward): marked HOLD, no release at its backward fetch
        first = next((k for k, m in enumerate(out) if m), len(out) - 1)
        out = out[:first] + [Hold(out[first])] + _preorder(node) + out[first + 1:]
    return out


class Hold(tuple):
    """A trace entry whose module is not released after it is fetched."""


def trace(lay: Layout, checkpointing: bool) -> tuple[list[tuple[int, ...]], int]:
    """The modules in the order ZeRO-3's hooks fetch them over one step (the coordinator's
    `__submodule_order`), and where the backward starts."""
    fwd = _preorder(lay.root)
    return fwd + _backward(lay.root, checkpointing), len(fwd)


@dataclass
class Instant:
    """Bytes of ZeRO-3 gathered parameters at one point of the step: materialised full parameters
    (`param.data` after `AllGatherCoalescedHandle.wait`) and the flat all-gather buffers still alive."""

    gathered: int = 0
    buffers: int = 0

    @property
    def total(self) -> int:
        return self.gathered + self.buffers


def simulate(lay: Layout, order: list[tuple[int, ...]], world: int, cfg: ZeroConfig,
             computing: list[Instant] | None = None) -> list[Instant]:
    """ZeRO-3's parameter coordinator over one steady-state step (partitioned_param_coordinator.py
    `fetch_sub_module`, `release_sub_module`, `__params_to_release`, `__all_gather_params_`;
    partition_parameters.py `_all_gather_dtype`, `AllGatherCoalescedHandle.wait`), persistent
    parameters aside. One Instant per module of `order`: the larger of the moment its parameters are
    waited for and the moment it computes (after the prefetch is issued); `computing` collects the
    latter alone.

    A batch of one parameter goes through `_all_gather_sequential` (partition_parameters.py:1598):
    `param.data` is a view of its padded all-gather buffer from the launch on (:1402), no copy; a
    batch of several is one flat buffer, and each parameter is copied out of it by `torch.cat` at the
    first wait (:795)."""
    ps = lay.params
    persist = {i for i, p in enumerate(ps) if p.numel <= cfg.stage3_param_persistence_threshold}
    NOT, FLIGHT, AVAIL = 0, 1, 2
    status = [AVAIL if i in persist else NOT for i in range(len(ps))]
    flat = lambda i: -(-ps[i].numel // world) * world * ps[i].elem_bytes  # noqa: E731
    queue = deque((p, step) for step, m in enumerate(order) for p in sorted(set(m)))
    recent: dict[int, float] = {}
    batch_of: dict[int, int] = {}  # in-flight param -> batch id (the inflight registry)
    batches: dict[int, dict] = {}  # id -> {"params": set, "left": set, "bytes": int, "done": bool}
    n_avail = 0
    gathered = 0
    buffers = 0
    out: list[Instant] = []
    nb = 0
    # `__params_to_release` walks the trace from the next module, adding each module's elements, and
    # stops once stage3_max_reuse_distance is reached: a parameter is kept when its next use is at a
    # module that walk reaches (prefix sums over the trace give the same answer without the walk)
    cum = [0]
    for m in order:
        cum.append(cum[-1] + sum(ps[i].numel for i in set(m)))
    uses: dict[int, list[int]] = {}
    for step, m in enumerate(order):
        for i in set(m):
            uses.setdefault(i, []).append(step)
    seen = {i: 0 for i in uses}

    held: dict[int, int] = {}  # gathered parameter -> the bytes its release frees

    def gather(idx: set[int]) -> None:
        nonlocal n_avail, buffers, nb, gathered
        todo = {i for i in idx if status[i] == NOT}
        if not todo:
            return
        n_avail += sum(ps[i].numel for i in todo)
        nb += 1
        single = len(todo) == 1
        b = {"params": set(todo), "left": set(todo), "bytes": 0 if single else sum(flat(i) for i in todo),
             "done": single}
        batches[nb] = b
        buffers += b["bytes"]
        for i in todo:
            status[i] = AVAIL if single else FLIGHT
            batch_of[i] = nb
            if single:
                held[i] = flat(i)
                gathered += flat(i)

    for step, mod in enumerate(order):
        want = set(mod)
        gather(want)
        # wait: the first wait on a batch materialises all of its parameters; its flat buffer lives
        # until the last of them has been popped from the inflight registry
        touched = {batch_of[i] for i in want if i in batch_of}
        for bid in touched:
            b = batches[bid]
            if not b["done"]:
                b["done"] = True
                for i in b["params"]:
                    status[i] = AVAIL
                    held[i] = ps[i].nbytes
                    gathered += ps[i].nbytes
        at_wait = Instant(gathered, buffers)
        for i in want:
            if i in batch_of:
                b = batches[batch_of.pop(i)]
                b["left"].discard(i)
                if not b["left"]:
                    buffers -= b["bytes"]
        # pop this module's own entries off the fetch queue, then prefetch
        own = {i for i in want if recent.get(i, -1e10) < step}
        popped: set[int] = set()
        while queue and len(popped) < len(own):
            p, s = queue.popleft()
            recent[p] = s
            popped.add(p)
        if cfg.stage3_prefetch_bucket_size > 0:
            budget = min(cfg.stage3_max_live_parameters - n_avail, cfg.stage3_prefetch_bucket_size)
            pre: set[int] = set()
            numel = 0
            while queue and numel < budget:
                p, s = queue.popleft()
                recent[p] = max(recent.get(p, -1e10), s)
                if status[p] == NOT and p not in pre:
                    pre.add(p)
                    numel += ps[p].numel
            gather(pre)
        now = Instant(gathered, buffers)
        out.append(at_wait if at_wait.total > now.total else now)
        if computing is not None:
            computing.append(now)
        # release after the module ran: its non-persistent parameters, unless used again within
        # stage3_max_reuse_distance elements of the trace or already queued for a later use
        nxt = step + 1
        release = set()
        for i in want:
            seen[i] += 1
            later = uses[i][seen[i]] if seen[i] < len(uses[i]) else None
            if isinstance(mod, Hold) or i in persist or recent.get(i, -1e10) > nxt:
                continue
            if later is not None and cum[later] - cum[nxt] < cfg.stage3_max_reuse_distance:
                continue
            release.add(i)
        for i in release:
            if status[i] == AVAIL:
                status[i] = NOT
                gathered -= held.pop(i)
                n_avail -= ps[i].numel
    return out


# ---------------------------------------------------------------------------------------------
# one rank


@dataclass
class ZeroRank:
    """Per-rank bytes under ZeRO. GPU rows are torch-allocator bytes; `host` / `host_pinned` are host RAM."""

    stage: int
    world: int
    config: ZeroConfig  # resolved
    n_train: int  # trainable elements
    partition: int  # this rank's trainable elements (fp32 master, states, gradient partition)
    sub_group: int  # the largest optimizer sub-group's elements on this rank (ZeRO-3), else the partition
    elem16: int  # bytes of a 16-bit (model-dtype) element
    weights: int  # frozen / base parameters on the GPU (replicated under 1/2, partitions under 3)
    trainable16: int  # the trainable parameters' 16-bit storage on the GPU
    persistent: int  # ZeRO-3: full copies of persistent parameters (kept gathered)
    master: int  # fp32 master partition on the GPU
    states: int  # optimizer states on the GPU
    static_rows: dict[str, int]  # rows live from the first step on (buckets, partitions allocated at init)
    moment_rows: dict[str, dict[str, int]]  # moment name -> rows
    host: int = 0
    host_pinned: int = 0
    host_rows: dict[str, int] = field(default_factory=dict)
    full_grads: bool = False  # ZeRO-1 without overlap_comm: whole 16-bit gradients through backward
    formulas: dict[str, str] = field(default_factory=dict)

    def rows_at(self, moment: str) -> dict[str, int]:
        """The rows live at a moment of the estimate's walk (planner/phases.py `Moment`'s values): the
        fp32 master and what lives from init, and the moment's own (a moment ZeRO does not tell apart
        takes the one it falls in: the head's forward the forward's end, a layer's backward the backward)."""
        mine = _MOMENTS.get(moment, moment)
        return {"fp32 master weights": self.master, **self.static_rows, **self.moment_rows.get(mine, {})}


# the walk's moments (planner/phases.py Moment) -> the ones this model tells apart
_MOMENTS = {"forward_copy_out": "forward", "forward_tail_copy_out": "forward", "forward_head": "loss",
            "backward_top": "backward", "backward_post": "backward", "backward_root": "backward_end"}


def per_rank(job: "Job", arch: "ModelArch", targets: tuple[str, ...], stack: "Stack", n_train: int,
             largest_trainable: int) -> ZeroRank:
    """What one rank of `job.num_gpus` holds under `job.sharding` zero1/zero2/zero3, with the job's
    ZeroConfig (accelerate's defaults when it has none)."""
    stage = int(job.sharding[-1])
    n = job.num_gpus
    cfg = (job.deepspeed or ZeroConfig()).resolved(stage, job.cpu_offload)
    off_opt = cfg.offload_optimizer_device == "cpu"
    off_par = cfg.offload_param_device == "cpu"
    lay = layout(job, arch, targets, stack)
    e16 = lay.params[0].elem_bytes  # the model dtype under DeepSpeed (compute dtype)
    ckpt = job.checkpointing and stack.checkpoints(arch)
    train = [p for p in lay.params if p.trainable]
    frozen = [p for p in lay.params if not p.trainable]
    largest = max((p.numel for p in train), default=0)
    n_tr = sum(p.numel for p in train)
    moments = {m: {} for m in ("forward", "loss", "backward", "backward_end", "optimizer")}
    static: dict[str, int] = {}
    host_rows: dict[str, int] = {}
    pinned: dict[str, int] = {}
    f: dict[str, str] = {}
    bucket = cfg.reduce_bucket_size * e16 if cfg.contiguous_gradients or off_opt else 0
    fill = min(cfg.reduce_bucket_size, n_tr) * e16  # a full bucket's reduction copy (bounded by the model)
    persistent = 0
    if stage in (1, 2):
        # stage_1_and_2.py: one flat 16-bit buffer per group, padded to 2 x world elements; 1/world of it
        # is this rank's partition (fp32 master, states, gradient partition)
        align = NCCL_ALIGNMENT * n
        aligned = -(-n_tr // align) * align if n_tr else 0
        part = aligned // n
        sub = part
        # grads_in_partition holds the whole gradients of every parameter overlapping this rank's slice
        # of the flat buffer (`copy_grads_in_partition`: total_size = sum of their numel): rank 0's
        # slice starts at the first parameter and ends inside one, which it holds whole
        gip = _rank0_overlap([q.numel for q in train], part)
        weights = sum(p.nbytes for p in frozen)
        trainable16 = aligned * e16
        master = 4 * part
        n_buckets = (2 if cfg.overlap_comm and (cfg.contiguous_gradients or off_opt) else 1) if bucket else 0
        buckets = n_buckets * bucket
        f["reduce buckets"] = (f"{n_buckets} x reduce_bucket_size {cfg.reduce_bucket_size:,} x {e16} B "
                               f"({'overlap_comm double buffer' if n_buckets == 2 else 'one buffer'})")
        reduces_in_backward = stage == 2 or cfg.overlap_comm
        full_grads = not reduces_in_backward
        if off_opt:
            # CPU offload: the fp32 master, its gradient and a 16-bit staging copy in pinned host RAM,
            # the states in the CPU Adam's memory; one largest-parameter staging buffer on the GPU
            static["offload gradient staging buffer"] = largest * e16
            f["offload gradient staging buffer"] = f"temp_grad_buffer_for_gpu_offload: largest parameter {largest:,} x {e16} B"
            host_rows.update({"fp32 master weights": 4 * part, "fp32 gradient partition": 4 * part,
                              "16-bit copy-back buffer": e16 * part, "largest gradient staging buffer": largest * e16})
            pinned = {k: v for k, v in host_rows.items()} if cfg.offload_optimizer_pin_memory else {}
            host_rows["optimizer states"] = _state_bytes(job, part)
            master = 0
            states = 0
        else:
            states = _state_bytes(job, part)
        for m in ("backward", "backward_end"):
            moments[m]["reduce buckets"] = buckets
        if reduces_in_backward:
            if not off_opt:
                for m in ("backward", "backward_end"):
                    moments[m]["gradient partition"] = e16 * gip
            for m in ("backward", "backward_end"):
                moments[m]["bucket reduction copy"] = fill
                moments[m]["unreduced gradient"] = largest * e16
        else:
            # ZeRO-1: every 16-bit gradient until the end of backward, then reduced bucket by bucket
            # into the partition; each bucket's copy stands in for the gradients it moved
            if not off_opt:
                moments["backward_end"]["gradient partition"] = e16 * gip
        if not off_opt:
            a = {"gradient partition": e16 * gip, "flattened gradient copy": e16 * part,
                 "fp32 gradient partition": 4 * part}
            b = {"fp32 gradient partition": 4 * part, "optimizer step temporary": _temp(job, part)}
            moments["optimizer"] = a if sum(a.values()) >= sum(b.values()) else b
        weights_gpu = weights
    else:
        # stage3.py: every parameter partitioned (partition_parameters.py `_partition_param`: 1/world
        # of the aligned tensor), small ones persistent (kept gathered, partition on the GPU)
        ps = lay.params
        thr = cfg.stage3_param_persistence_threshold
        pn = lambda p: -(-p.numel // n) * p.elem_bytes  # noqa: E731
        pers = [p for p in ps if p.numel <= thr]
        persistent = sum(p.nbytes for p in pers) if n > 1 else 0
        part = sum(-(-p.numel // n) for p in train)
        sub = _largest_sub_group([-(-p.numel // n) for p in train], cfg.sub_group_size)
        base_parts = sum(pn(p) for p in frozen if not off_par or p.numel <= thr)
        tr_parts = sum(pn(p) for p in train if not off_par or p.numel <= thr)
        weights_gpu, trainable16 = base_parts, tr_parts
        if off_par:
            host_rows["16-bit parameter partitions"] = sum(pn(p) for p in ps if p.numel > thr)
            if cfg.offload_param_pin_memory:
                pinned["16-bit parameter partitions"] = host_rows["16-bit parameter partitions"]
        # fp32 master: a separate copy unless the model dtype is fp32 already (stage3.py _create_fp32_partitions)
        master = 4 * part if e16 != 4 or off_opt else 0
        static["reduce buckets"] = bucket
        f["reduce buckets"] = f"one ipg bucket: reduce_bucket_size {cfg.reduce_bucket_size:,} x {e16} B, allocated at init"
        gpart = e16 * part
        if off_opt:
            host_rows.update({"fp32 master weights": 4 * part, "gradient partition": gpart,
                              "fp32 gradient partition": 4 * part, "optimizer states": _state_bytes(job, part)})
            if cfg.offload_optimizer_pin_memory:
                pinned.update({"gradient partition": gpart, "fp32 gradient partition": 4 * part})
            master = 0
            states = 0
        else:
            static["gradient partition"] = gpart
            states = _state_bytes(job, part)
        for m in ("backward", "backward_end"):
            moments[m]["bucket reduction copy"] = fill
            moments[m]["unreduced gradient"] = largest * e16
        if not off_opt:
            a = {"flattened gradient copy": e16 * sub, "fp32 gradient partition": 4 * sub}
            b = {"fp32 gradient partition": 4 * sub, "optimizer step temporary": _temp(job, sub)}
            moments["optimizer"] = a if sum(a.values()) >= sum(b.values()) else b
        full_grads = False
        if n > 1:
            order, fwd_len = trace(lay, ckpt)
            inst = simulate(lay, order, n, cfg)
            fwd = max(inst[:fwd_len], key=lambda i: i.total)
            after_fwd = _after(inst, fwd_len)
            bwd = max(inst[fwd_len:], key=lambda i: i.total) if inst[fwd_len:] else Instant()
            end = inst[-1]
            for m, i in (("forward", fwd), ("loss", after_fwd), ("backward", bwd), ("backward_end", end)):
                moments[m]["gathered parameters"] = i.gathered
                moments[m]["all-gather buffers"] = i.buffers
                # persistent parameters stay gathered through forward and backward; the step releases
                # every parameter first (`_partition_all_parameters` -> `release_and_reset_all`) and
                # gathers the persistent ones again after the update (`_post_step`)
                moments[m]["persistent parameters"] = persistent
        f["gathered parameters"] = (f"modules all-gathered on demand, prefetched up to stage3_prefetch_bucket_size "
                                    f"{cfg.stage3_prefetch_bucket_size:,}, kept within stage3_max_reuse_distance "
                                    f"{cfg.stage3_max_reuse_distance:,} elements of their next use (simulated over the "
                                    "step's module trace)")
    host = sum(host_rows.values())
    return ZeroRank(stage=stage, world=n, config=cfg, n_train=n_tr, partition=part, sub_group=sub, elem16=e16,
                    weights=weights_gpu, trainable16=trainable16, persistent=persistent, master=master,
                    states=states, static_rows=static, moment_rows=moments, host=host,
                    host_pinned=sum(pinned.values()), host_rows=host_rows, full_grads=full_grads, formulas=f)


def _rank0_overlap(numels: list[int], part: int) -> int:
    """Elements of the parameters (flat-buffer order) that overlap rank 0's first `part` elements."""
    total = 0
    for n in numels:
        if total >= part:
            break
        total += n
    return total


def _after(inst: list[Instant], fwd_len: int) -> Instant:
    """The gathered bytes between the forward and the backward: the last forward module's compute
    instant (its release only lowers it; an upper bound)."""
    return inst[fwd_len - 1] if fwd_len else Instant()


def _largest_sub_group(parts: list[int], size: int) -> int:
    """stage3.py `_create_fp16_sub_groups`: parameters are added to a sub-group until its partition
    elements reach sub_group_size; the step runs one sub-group at a time."""
    total = sum(parts)
    if not size or size >= total:
        return total
    best = cur = 0
    for i, p in enumerate(parts):
        cur += p
        if cur >= size or i == len(parts) - 1:
            best = max(best, cur)
            cur = 0
    return best


def _state_bytes(job: "Job", part: int) -> int:
    """Optimizer states of this rank's fp32 partition (torch AdamW / DeepSpeedCPUAdam: exp_avg and
    exp_avg_sq like the fp32 master; bitsandbytes 8-bit states: 1 B + an fp32 absmax per 256)."""
    opt = job.optimizer
    if opt in ("adamw", "paged_adamw"):
        return 2 * 4 * part
    if opt in ("adamw_8bit", "paged_adamw_8bit"):
        return 2 * (part + 4 * -(-part // 256))
    if opt == "sgd_momentum":
        return 4 * part
    return 0


def _temp(job: "Job", elems: int) -> int:
    """The step's temporary on the GPU: torch AdamW foreach over the fp32 flat partition
    (`_foreach_sqrt(exp_avg_sqs)`, 4 B per element); foreach=False stands for DeepSpeed's own
    FusedAdam (a DeepSpeed `optimizer` section: in place, none)."""
    return 4 * elems if job.optimizer == "adamw" and job.foreach else 0
