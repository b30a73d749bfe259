"""FSDP as torch runs it, unit by unit, for one rank: FSDP2 (`fully_shard`) and FSDP1
(`FullyShardedDataParallel`), each decoder layer one unit and the rest of the model the root unit
(accelerate's TRANSFORMER_BASED_WRAP). Sizes are per tensor and rounded as the CUDA caching
allocator rounds every block (512 B), because FSDP allocates per parameter (FSDP2) or per unit
(FSDP1) and a shard of a small tensor over many ranks is mostly rounding.

Sources, torch 2.13 (docs/fsdp.md has the line numbers):
- FSDP2 `_fully_shard/_fsdp_param.py`: each parameter's shard is padded to a multiple of the
  world size along dim 0 and allocated on its own; the unsharded parameter is a view of its own
  all-gather output (`init_all_gather_outputs`), `world x padded shard` elements in param_dtype.
- FSDP2 `_fsdp_collectives.py` `foreach_all_gather`: one flat all-gather buffer per unit
  (`all_gather_copy_in`), copied out into the parameters (`foreach_all_gather_copy_out`);
  `foreach_reduce`: one flat reduce-scatter input per unit in the reduce dtype (`chunk_cat`) and
  one flat output shard, the sharded gradients being views of it (a cast when the reduce dtype
  is not the parameters').
- FSDP2 `_fsdp_param_group.py`: in forward the previous unit's all-gather buffer is kept until the
  next unit's `wait_for_unshard` returns (`comm_ctx.all_gather_state`, held by a local through the
  copy-out), the last one until the root's post-forward; in backward each unit prefetches the one
  before it (`_backward_prefetch`) and the previous unit's reduce-scatter input stays referenced
  (`reduce_scatter_states`, at most `reduce_scatter_max_input_buffers` = 1) while the next unit
  runs; `_fsdp_state.py` `_lazy_init`: the root is not resharded after forward.
- FSDP1 `_flat_param.py` / `_runtime_utils.py`: one flat parameter per unit, padded to a multiple
  of the world size; the root is not freed after forward (`_post_forward_reshard`), BACKWARD_PRE
  unshards the next unit before the current one's gradient computation.
"""

from __future__ import annotations

from dataclasses import dataclass

from .architecture import ModelArch
from .dtypes import float_bytes, linear_weight_bytes
from .errors import MemplanInputError
from .job import Job
from .params import HEAD_MODULE, embedding_module

ROUND = 512  # c10/cuda/CUDACachingAllocator.cpp kMinBlockSize: every block is a multiple of 512 B


def rounded(nbytes: int) -> int:
    return -(-nbytes // ROUND) * ROUND


@dataclass(frozen=True)
class Param:
    """One parameter tensor: its first dimension (FSDP2 shards along it), its elements, its
    storage bytes per element, and whether it trains."""

    dim0: int
    numel: int
    nbytes: int
    trains: bool

    def padded_rows(self, world: int) -> int:
        return -(-self.dim0 // world)

    def shard_numel(self, world: int) -> int:
        """FSDP2: rank 0's padded shard, `ceil(dim0 / world)` rows (`_fsdp_param.py` `_init_sharded_param`)."""
        return self.padded_rows(world) * (self.numel // self.dim0)


def layer_params(job: Job, arch: ModelArch, targets: tuple[str, ...], wb: int, ab: int,
                 quantized=lambda lin: False) -> list[Param]:
    """The parameters of one decoder layer: every projection's weight (a fused expert stack is one
    3-D tensor, sharded along the experts), its bias, the norms, and the LoRA adapters of the
    targets (lora_A r x d_in, lora_B d_out x r, DoRA's magnitude d_out). A 4-bit weight
    (`quantized(lin)`) is its packed data, half a byte per value, stored as a flat `(n, 1)` tensor of
    the quant-storage dtype (bitsandbytes functional.py `quantize_4bit(quant_storage=...)`)."""
    full = job.method == "full"
    out: list[Param] = []
    for lin in arch.projections:
        if quantized(lin):
            rows = lin.d_in * lin.d_out // (2 * wb)
            out += [Param(rows, rows, wb, False)] * lin.copies
        elif lin.module == "fused experts":
            out.append(Param(lin.copies, lin.copies * lin.d_in * lin.d_out, wb, full))
        else:
            out += [Param(lin.d_out, lin.d_in * lin.d_out, wb, full)] * lin.copies
        if lin.bias:
            out += [Param(lin.d_out, lin.d_out, wb, full)] * lin.copies
        if lin.name in targets and lin.copies == 1:
            r = job.lora_rank
            out += [Param(r, r * lin.d_in, ab, True), Param(lin.d_out, r * lin.d_out, ab, True)]
            if job.dora:
                out.append(Param(lin.d_out, lin.d_out, ab, True))
    norms = [Param(arch.hidden, arch.hidden, wb, full)] * (2 if arch.norm_bias else 1)
    out += norms * arch.norms_per_layer
    if arch.qk_norm:
        out += [Param(arch.head_dim, arch.head_dim, wb, full)] * 2
    return out


def root_params(job: Job, arch: ModelArch, targets: tuple[str, ...], wb: int, ab: int) -> list[Param]:
    """The root unit: the token (and learned position) embedding, the final norm, an untied head,
    and LoRA on the embedding or the head."""
    full = job.method == "full"
    out = [Param(arch.vocab, arch.vocab * arch.hidden, wb, full)]
    if arch.learned_positions:
        out.append(Param(arch.max_positions, arch.max_positions * arch.hidden, wb, full))
    out += [Param(arch.hidden, arch.hidden, wb, full)] * (2 if arch.norm_bias else 1)
    if not arch.tied_embeddings:
        out.append(Param(arch.vocab, arch.vocab * arch.hidden, wb, full))
        if arch.lm_head_bias:
            out.append(Param(arch.vocab, arch.vocab, wb, full))
    r = job.lora_rank
    if embedding_module(arch) in targets:
        out += [Param(r, r * arch.vocab, ab, True), Param(arch.hidden, arch.hidden * r, ab, True)]
    if HEAD_MODULE in targets:
        out += [Param(r, r * arch.hidden, ab, True), Param(arch.vocab, arch.vocab * r, ab, True)]
    return out


@dataclass(frozen=True)
class Unit:
    """What one FSDP unit costs a rank, in bytes (each allocation rounded)."""

    shard: int  # the rank's sharded parameters (storage dtype)
    trainable_shard: int  # the sharded parameters that train (their gradients and states take this size per copy)
    gathered: int  # the unsharded parameters, in param_dtype
    ag_buffer: int  # one all-gather buffer (FSDP2: the flat copy-in/out buffer; FSDP1: none beyond `gathered`)
    grads: int  # the unsharded gradients autograd produces, in param_dtype
    rs_input: int  # the reduce-scatter input, in the reduce dtype
    rs_output: int  # the reduce-scatter output shard, in the reduce dtype
    sharded_grads: int  # the sharded gradients as kept until the step, in the parameters' dtype
    states_per_copy: int  # one optimizer state per trainable parameter shard (zeros_like each local shard)
    grad_cast: int  # a cast of the unsharded gradients into the reduce dtype before the reduce-scatter


def unit_bytes(params: list[Param], world: int, version: int, param_bytes: int | None, reduce_bytes: int | None,
               state_bytes: int | None) -> Unit:
    """`param_bytes`: MixedPrecisionPolicy param_dtype (None: the storage dtype); `reduce_bytes`:
    reduce_dtype (None: the gradients' dtype); `state_bytes`: AdamW's states are zeros_like the
    sharded parameter (None: its own dtype)."""
    def pb(p: Param) -> int:
        return param_bytes or p.nbytes

    def rb(p: Param) -> int:
        return reduce_bytes or pb(p)

    train = [p for p in params if p.trains]
    if version == 2:
        shard = sum(rounded(p.shard_numel(world) * p.nbytes) for p in params)
        tshard = sum(rounded(p.shard_numel(world) * p.nbytes) for p in train)
        gathered = sum(rounded(p.shard_numel(world) * world * pb(p)) for p in params)
        ag = rounded(sum(p.shard_numel(world) * world * pb(p) for p in params))
        rs_in = rounded(sum(p.shard_numel(world) * world * rb(p) for p in train)) if train else 0
        rs_out = rounded(sum(p.shard_numel(world) * rb(p) for p in train)) if train else 0
        sharded_grads = rs_out if all(rb(p) == p.nbytes for p in train) else sum(
            rounded(p.shard_numel(world) * p.nbytes) for p in train)
        states = sum(rounded(p.shard_numel(world) * (state_bytes or p.nbytes)) for p in train)
        grads = sum(rounded(p.numel * pb(p)) for p in train)
        cast = 0
    else:
        # one flat parameter per unit (FSDP1 flattens the unit; use_orig_params keeps each
        # parameter's view): flat sizes padded to a multiple of the world size
        # `_init_flat_param_and_metadata`: each parameter starts at a 16-byte boundary of the
        # forward dtype (`_get_aligned_numel`), and the flat parameter is padded to the world size
        align = 16 // (param_bytes or params[0].nbytes)
        numel, starts = 0, []
        for p in params:
            numel += -numel % align
            starts.append(numel)
            numel += p.numel
        per_rank = -(-numel // world)
        b = params[0].nbytes
        shard = rounded(per_rank * b)
        tnumel = sum(p.numel for p in train)
        tshard = rounded(-(-tnumel // world) * b) if train else 0
        gathered = rounded(per_rank * world * (param_bytes or b))
        ag = 0
        gb = param_bytes or b
        grads = rounded(per_rank * world * gb) if train else 0
        rbytes = reduce_bytes or gb
        cast = grads if train and rbytes != gb else 0
        rs_in = 0
        rs_out = rounded(per_rank * rbytes) if train else 0
        sharded_grads = rounded(per_rank * b) if train else 0
        # use_orig_params: rank 0's parameters are the pieces of the first `per_rank` flat elements
        # (`_use_sharded_views`), and AdamW's states are zeros_like each piece
        states = 0
        for p, offset in zip(params, starts):
            piece = max(0, min(offset + p.numel, per_rank) - offset)
            if p.trains and piece:
                states += rounded(piece * (state_bytes or p.nbytes))
    return Unit(shard=shard, trainable_shard=tshard, gathered=gathered, ag_buffer=ag, grads=grads, rs_input=rs_in,
                rs_output=rs_out, sharded_grads=sharded_grads, states_per_copy=states, grad_cast=cast)


def param_dtype_bytes(job: Job) -> int | None:
    """MixedPrecisionPolicy's param_dtype: the compute dtype under FSDP mixed precision (both forms)."""
    return float_bytes(job.compute_dtype) if job.fsdp_mp else None


def reduce_dtype_bytes(job: Job) -> int | None:
    """reduce_dtype: the compute dtype in accelerate's form, fp32 in the explicit policy."""
    if not job.fsdp_mp:
        return None
    return 4 if job.fsdp_mixed_precision == "policy" else float_bytes(job.compute_dtype)


def _split(params: list[Param], keep) -> list[Param]:
    return [p for p in params if keep(p)]


class FsdpRank:
    """Rank 0 of an FSDP job: the sharded state it keeps through the step, and the unsharded
    parameters, communication buffers and unsharded gradients live at each moment of the walk."""

    def __init__(self, job: Job, arch: ModelArch, targets: tuple[str, ...], world: int, state_copies: int,
                 offload: bool, stack) -> None:
        self.offload = offload  # sharded parameters, gradients and states in host RAM (CPUOffloadPolicy / cpu_offload)
        self.version = job.fsdp_version
        self.layers = arch.layers
        self.reshard = job.sharding != "fsdp_grad_op"  # fsdp_full, fsdp_hybrid: reshard_after_forward=True
        # sharded QLoRA keeps every parameter that is not 4-bit in the model's dtype, which is also
        # the 4-bit weights' quant storage (planner/stacks/base.py `sharded_qlora`)
        wb = float_bytes(job.compute_dtype if job.quantized else job.base_weight_dtype)
        ab = float_bytes(job.lora_dtype) if job.uses_lora else wb
        pbytes, rbytes = param_dtype_bytes(job), reduce_dtype_bytes(job)
        if self.version == 1 and job.uses_lora and ab != wb:
            # _flat_param.py `_validate_tensors_to_flatten`: one FlatParameter per unit, one dtype
            raise MemplanInputError(
                f"FSDP1 flattens each unit into one FlatParameter of one dtype, so {job.lora_dtype.value} adapters over "
                f"{job.base_weight_dtype.value} weights do not wrap: use --adapter-dtype {job.base_weight_dtype.value}, "
                "fp32 weights (FSDP mixed precision), or --fsdp-version 2"
            )
        converts = (lambda lin: stack.bnb_converts(lin)) if job.quantized else (lambda lin: False)
        lp = layer_params(job, arch, targets, wb, ab, converts)
        rp = root_params(job, arch, targets, wb, ab)
        # the quantization statistics (absmax, nested absmax, code) are QuantState attributes of each
        # Params4bit, not parameters: every rank keeps all of them (bitsandbytes nn/modules.py)
        self.quant_stats = arch.layers * sum(
            n * (linear_weight_bytes(d_out, d_in, job.base_weight_dtype, job.double_quant) - d_in * d_out // 2)
            for d_in, d_out, n in stack.quantized_linears(arch)) if job.quantized else 0
        self.layer = unit_bytes(lp, world, self.version, pbytes, rbytes, None)
        self.root = unit_bytes(rp, world, self.version, pbytes, rbytes, None)
        L = arch.layers
        # the step-long state: sharded parameters (split into base weights and adapters), states, gradients
        shard = L * self.layer.shard + self.root.shard
        if job.uses_lora:
            if self.version == 2:
                frozen = [p for p in lp if not p.trains], [p for p in rp if not p.trains]
                self.weights = (L * unit_bytes(frozen[0], world, 2, pbytes, rbytes, None).shard
                                + (unit_bytes(frozen[1], world, 2, pbytes, rbytes, None).shard if frozen[1] else 0))
            else:  # the adapters are views into the flat shard
                self.weights = shard - L * self.layer.states_per_copy - self.root.states_per_copy
            self.adapters = shard - self.weights
        else:
            self.weights, self.adapters = shard, 0
        self.weights += self.quant_stats
        self.states = state_copies * (L * self.layer.states_per_copy + self.root.states_per_copy)
        self.grads = L * self.layer.sharded_grads + self.root.sharded_grads
        self.largest_state = max((rounded(p.shard_numel(world) * p.nbytes) for p in lp + rp if p.trains), default=0)
        self.temp_foreach = L * self.layer.states_per_copy + self.root.states_per_copy
        # the root's unsharded gradients: the head's (and the final norm's) arrive in the loss's
        # backward, an untied embedding's last; FSDP1 accumulates into one flat gradient of the whole root
        pb = pbytes or wb
        head = [p for p in rp if p.trains and not (not arch.tied_embeddings and p is rp[0])]
        if self.version == 2:
            self.root_grads_head = sum(rounded(p.numel * (pbytes or p.nbytes)) for p in head)
            self.root_grads_all = self.root.grads
        else:
            self.root_grads_head = self.root_grads_all = self.root.grads
        self.param_bytes = pb
        # HSDP (FSDP2 over a replicate x shard mesh): each layer's reduce-dtype output, all-reduced
        # across replicas, stays referenced in `_all_reduce_state` until `finalize_backward` when
        # the cast to the parameters' dtype made it a copy (`foreach_reduce`, `post_backward`)
        hsdp = job.sharding == "fsdp_hybrid" and job.num_gpus > world
        casts = rbytes is not None and any(rbytes != p.nbytes for p in lp if p.trains)
        self.held_all_reduce = self.layer.rs_output if hsdp and self.version == 2 and casts else 0

    def _kept(self, sharded_grads: int) -> int:
        """Sharded gradients on the GPU: none under CPU offload (copied to host as they are reduced)."""
        return 0 if self.offload else sharded_grads

    def backward_layers(self) -> list[int]:
        """The decoder layers whose backward can hold the most: each term is linear in the layer
        index between the edges where the prefetch and the held reduce-scatter start and stop."""
        L = self.layers
        return sorted({L - 1, max(L - 2, 0), min(1, L - 1), 0}, reverse=True)

    def rows(self, moment, layer: int | None = None) -> dict[str, int]:
        """Rows at `moment`; in the backward, `layer` is the decoder layer running (0 = the first)."""
        from .phases import Moment

        L, lay, root = self.layers, self.layer, self.root
        v2 = self.version == 2
        ag = lay.ag_buffer
        # decoder layers unsharded: with reshard_after_forward=False every layer run so far stays gathered
        if moment in (Moment.forward, Moment.forward_copy_out, Moment.forward_head):
            units = 1 if self.reshard else L
            if moment is Moment.forward_head:
                units = 0 if self.reshard else L
            if moment is Moment.forward_copy_out and not v2:
                return {}
            # FSDP2: the running layer's all-gather buffer is kept until the next one's is copied out;
            # the last one until the root's post-forward (after the loss)
            buffers = (2 * ag if moment is Moment.forward_copy_out else ag) if v2 else 0
            return {"gathered parameters": root.gathered + units * lay.gathered, "all-gather buffers": buffers,
                    "unsharded root gradients": 0, "reduce-scatter buffers": 0, "unsharded unit gradients": 0,
                    "gradients": 0}
        if moment is Moment.loss:
            # the root's pre-backward prefetches the last layer (FSDP2: its all-gather buffer; FSDP1
            # BACKWARD_PRE: the unsharded flat parameter)
            units = 0 if self.reshard else L
            prefetch = (ag if v2 else lay.gathered) if self.reshard else 0
            return {"gathered parameters": root.gathered + units * lay.gathered + (0 if v2 else prefetch),
                    "all-gather buffers": prefetch if v2 else 0, "unsharded root gradients": self.root_grads_head,
                    "reduce-scatter buffers": 0, "unsharded unit gradients": 0, "gradients": 0}
        if moment in (Moment.backward_top, Moment.backward):
            i = L - 1 if layer is None and moment is Moment.backward_top else (0 if layer is None else layer)
            units = 1 if self.reshard else i + 1
            prefetched = self.reshard and i > 0
            gathered = root.gathered + units * lay.gathered
            buffers = 0
            if prefetched:
                if v2:
                    buffers = ag
                else:
                    gathered += lay.gathered
            # FSDP2 keeps the previous layer's reduce-scatter input until this one's post-backward
            held_rs = lay.rs_input if (v2 and i < L - 1) else 0
            unit = lay.grads  # this layer's gradients as autograd produces them, in param_dtype
            return {"gathered parameters": gathered, "all-gather buffers": buffers,
                    "reduce-scatter buffers": held_rs + (L - 1 - i) * self.held_all_reduce,
                    "unsharded unit gradients": unit,
                    "unsharded root gradients": self.root_grads_head, "gradients": self._kept((L - 1 - i) * lay.sharded_grads)}
        if moment is Moment.backward_end:
            return {"gathered parameters": root.gathered, "all-gather buffers": 0,
                    "reduce-scatter buffers": L * self.held_all_reduce, "unsharded unit gradients": 0, "unsharded root gradients": self.root_grads_all,
                    "gradients": self._kept(L * lay.sharded_grads)}
        if moment is Moment.backward_root:
            # post_backward reshards the root, then reduce-scatters its gradients
            rs = (root.rs_input if v2 else root.grad_cast + root.rs_output) + L * self.held_all_reduce
            return {"gathered parameters": 0, "all-gather buffers": 0, "reduce-scatter buffers": rs,
                    "unsharded unit gradients": 0, "unsharded root gradients": self.root_grads_all,
                    "gradients": self._kept(L * lay.sharded_grads)}
        if moment is Moment.optimizer:
            return {"gradients": 0 if self.offload else self.grads}
        return {}
