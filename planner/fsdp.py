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
    part: str = "attention"  # the block half it belongs to (LinearSpec.part; norms count with the attention)

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
        part = lin.part
        if quantized(lin):
            rows = lin.d_in * lin.d_out // (2 * wb)
            out += [Param(rows, rows, wb, False, part)] * lin.copies
        elif lin.module == "fused experts":
            out.append(Param(lin.copies, lin.copies * lin.d_in * lin.d_out, wb, full, part))
        else:
            out += [Param(lin.d_out, lin.d_in * lin.d_out, wb, full, part)] * lin.copies
        if lin.bias:
            out += [Param(lin.d_out, lin.d_out, wb, full, part)] * lin.copies
        if lin.name in targets and lin.copies == 1:
            r = job.lora_rank
            out += [Param(r, r * lin.d_in, ab, True, part), Param(lin.d_out, r * lin.d_out, ab, True, part)]
            if job.dora:
                out.append(Param(lin.d_out, lin.d_out, ab, True, part))
    norms = [Param(arch.hidden, arch.hidden, wb, full)] * (2 if arch.norm_bias else 1)
    out += norms * arch.norms_per_layer
    if arch.qk_norm:
        out += [Param(w, w, wb, full) for w in arch.qk_norm_widths]
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
        cast = rounded(per_rank * world * rbytes) if train and rbytes != gb else 0
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


def unsupported(job: Job) -> str | None:
    """An FSDP job torch 2.13 cannot run, in one line (None when it can)."""
    if job.fsdp_version == 1 and job.sharding == "fsdp_grad_op" and job.uses_lora and job.fsdp_mp \
            and job.checkpointing:
        # peft casts each adapter's input to `lora_A.weight.dtype`: in the forward FSDP1 shows it the
        # fp32 shard, in the recomputation the kept bf16 unsharded leaf, and torch.utils.checkpoint
        # refuses the mismatch (traced: "recomputed metadata ... dtype torch.bfloat16", pytorch#166926)
        return ("FSDP1 SHARD_GRAD_OP with LoRA under FSDP mixed precision and checkpointing fails torch's checkpoint "
                "metadata check (the adapters' inputs are fp32 in the forward, bf16 in the recomputation): use "
                "--fsdp-version 2, --sharding fsdp_full, or --no-gradient-checkpointing")
    return None


class FsdpRank:
    """Rank 0 of an FSDP job: the sharded state it keeps through the step, and the unsharded
    parameters, communication buffers and unsharded gradients live at each moment of the walk.

    The units are accelerate's. FSDP2 (`utils/fsdp_utils.py` `fsdp2_prepare_model`): every decoder
    layer; the input embedding alone; the final norm with lm_head as one group with
    reshard_after_forward=False (with tied embeddings the embedding joins it and has no unit of its
    own); then the root, which keeps what no unit took (GPT-BigCode's learned positions). FSDP1 (`Accelerator.prepare_model`): the decoder
    layers and the root (embedding, final norm, lm_head); with peft every LoRA leaf is a unit of its
    own (transformers `distributed/fsdp.py` `update_fsdp_plugin_peft`, peft `fsdp_auto_wrap_policy`)."""

    def __init__(self, job: Job, arch: ModelArch, targets: tuple[str, ...], world: int, state_copies: int,
                 offload: bool, stack) -> None:
        why = unsupported(job)
        if why:
            raise MemplanInputError(why)
        self.offload = offload  # sharded parameters, gradients and states in host RAM (CPUOffloadPolicy / cpu_offload)
        self.version = v = job.fsdp_version
        self.layers = L = arch.layers
        self.reshard = job.sharding != "fsdp_grad_op"  # fsdp_full, fsdp_hybrid: reshard_after_forward=True
        self.tied = arch.tied_embeddings
        # sharded QLoRA keeps every parameter that is not 4-bit in the model's dtype, which is also
        # the 4-bit weights' quant storage (planner/stacks/base.py `sharded_qlora`)
        wb = float_bytes(job.compute_dtype if job.quantized else job.base_weight_dtype)
        ab = float_bytes(job.lora_dtype) if job.uses_lora else wb
        pbytes, rbytes = param_dtype_bytes(job), reduce_dtype_bytes(job)
        converts = (lambda lin: stack.bnb_converts(lin)) if job.quantized else (lambda lin: False)
        lp = layer_params(job, arch, targets, wb, ab, converts)
        rp = root_params(job, arch, targets, wb, ab)
        # the quantization statistics (absmax, nested absmax, code) are QuantState attributes of each
        # Params4bit, not parameters: every rank keeps all of them (bitsandbytes nn/modules.py)
        self.quant_stats = arch.layers * sum(
            n * (linear_weight_bytes(d_out, d_in, job.base_weight_dtype, job.double_quant) - d_in * d_out // 2)
            for d_in, d_out, n in stack.quantized_linears(arch)) if job.quantized else 0

        def unit(params: list[Param]) -> Unit:
            return unit_bytes(params, world, v, pbytes, rbytes, None) if params else EMPTY

        n_trainable = sum(p.trains for p in lp) * L + sum(p.trains for p in rp)
        # AdamW without foreach: the sqrt and quotient of the largest trainable shard at once
        self.largest_state = max((rounded(p.shard_numel(world) * p.nbytes) for p in lp + rp if p.trains), default=0)
        # the token embedding (get_input_embeddings); learned positions stay in the root unit
        n_pos = 1 if arch.learned_positions else 0
        embed, pos, tail = rp[:1], rp[1:1 + n_pos], rp[1 + n_pos:]  # tail: the final norm, lm_head, LoRA on them
        self.adapter_units: list[Unit] = []
        if v == 1 and job.uses_lora:
            # each LoRA leaf its own flat parameter; the layer unit keeps the frozen base
            self.adapter_units = [unit([p]) for p in lp if p.trains] * L + [unit([p]) for p in rp if p.trains]
            lp = [p for p in lp if not p.trains]
            rp = [p for p in rp if not p.trains]
            embed, pos, tail = rp[:1], rp[1:1 + n_pos], rp[1 + n_pos:]
        self.layer = unit(lp)
        if v == 2:
            self.embed = EMPTY if self.tied else unit(embed)
            self.tail = unit(tail + (embed if self.tied else []))
            # the root keeps what no other unit took (GPT-BigCode's learned positions), gathered from
            # the forward to the end of the backward (`_fsdp_state.py` `_lazy_init`)
            self.root = unit(pos)
        else:
            self.embed, self.tail, self.root = EMPTY, unit(rp), EMPTY  # FSDP1's root: embedding, final norm, lm_head
        units = [self.layer] * L + [self.embed, self.tail, self.root] + self.adapter_units
        # autograd's per-parameter gradients of the embedding and of the tail (final norm, lm_head),
        # in param_dtype: FSDP1 concatenates them into the root's flat gradient only at its end
        def grads(params: list[Param]) -> int:
            return sum(rounded(p.numel * (pbytes or p.nbytes)) for p in params if p.trains)
        self.tail_grads = grads(tail + (embed if self.tied else []))
        # the MLP's gradients, made before the attention's backward runs
        self.mlp_grads = grads([p for p in layer_params(job, arch, targets, wb, ab, converts) if p.part == "mlp"])
        self.embed_grads = 0 if self.tied else grads(embed)
        # the step-long state: sharded parameters (split into base weights and adapters), states, gradients
        shard = sum(u.shard for u in units)
        self.adapters = sum(u.trainable_shard for u in units) if job.uses_lora else 0
        self.weights = shard - self.adapters + self.quant_stats
        self.states = state_copies * sum(u.states_per_copy for u in units) + n_trainable * stack.step_counter_bytes(job)
        self.temp_foreach = sum(u.states_per_copy for u in units)
        self.grads = sum(u.sharded_grads for u in units)
        # HSDP (FSDP2 over a replicate x shard mesh): each layer's reduce-dtype output, all-reduced
        # across replicas, stays referenced in `_all_reduce_state` until `finalize_backward` when
        # the cast to the parameters' dtype made it a copy (`foreach_reduce`, `post_backward`)
        hsdp = job.sharding == "fsdp_hybrid" and job.num_gpus > world
        casts = rbytes is not None and any(rbytes != p.nbytes for p in lp if p.trains)
        self.held_all_reduce = self.layer.rs_output if hsdp and v == 2 and casts else 0

    def _kept(self, sharded_grads: int) -> int:
        """Sharded gradients on the GPU: none under CPU offload (copied to host as they are reduced)."""
        return 0 if self.offload else sharded_grads

    def most_gathered(self) -> int:
        """The most unsharded parameter bytes (gathered units and all-gather buffers) at any moment."""
        from .phases import Moment

        rows = [self.rows(m, layer=i) for m in Moment for i in self.backward_layers()]
        return max((r.get("gathered parameters", 0) + r.get("all-gather buffers", 0) for r in rows), default=0)

    def backward_layers(self) -> list[int]:
        """The decoder layers whose backward can hold the most: each term is linear in the layer
        index between the edges where the prefetch and the held reduce-scatter start and stop."""
        L = self.layers
        return sorted({L - 1, max(L - 2, 0), min(1, L - 1), 0}, reverse=True)

    def _rows(self, gathered=0, ag=0, rs=0, unit_grads=0, outer_grads=0, grads=0) -> dict[str, int]:
        return {"gathered parameters": gathered, "all-gather buffers": ag, "reduce-scatter buffers": rs,
                "unsharded unit gradients": unit_grads, "unsharded root gradients": outer_grads,
                "gradients": self._kept(grads)}

    def rows(self, moment, layer: int | None = None, produced: bool | str = True) -> dict[str, int]:
        """Rows at `moment`; in the backward, `layer` is the decoder layer running (0 = the first)
        and `produced` which of its gradients exist: none (its start), "mlp" (the MLP's, while the
        attention's backward runs) or all (its end)."""
        rows = self._rows2(moment, layer) if self.version == 2 else self._rows1(moment, layer)
        if produced is not True and "unsharded unit gradients" in rows:
            rows["unsharded unit gradients"] = self.mlp_grads if produced == "mlp" else 0
        return rows

    def _rows2(self, moment, layer):
        rows = self._rows2_units(moment, layer)
        from .phases import Moment

        if moment not in (Moment.optimizer, Moment.backward_root) and rows:
            rows["gathered parameters"] += self.root.gathered
        if moment is Moment.backward_end:
            rows["unsharded root gradients"] += self.root.grads
        if moment is Moment.backward_root:  # the root's post-backward runs last, after the embedding's
            rows["reduce-scatter buffers"] = max(rows["reduce-scatter buffers"], self.root.rs_input)
        return rows

    def _rows2_units(self, moment, layer):
        from .phases import Moment

        L, lay, E, T = self.layers, self.layer, self.embed, self.tail
        R = self.reshard
        # the embedding unit stays gathered after its forward only without resharding; the tail
        # (final norm, lm_head; the tied embedding) is never resharded after forward
        e_fwd = 0 if R else E.gathered
        t_early = T.gathered if self.tied else 0  # the tied tail is gathered by the embedding lookup
        if moment is Moment.forward:  # a layer's forward (the last for fsdp_grad_op), its buffer kept
            return self._rows(gathered=e_fwd + t_early + (1 if R else L) * lay.gathered, ag=lay.ag_buffer)
        if moment is Moment.forward_copy_out:
            # the last layer's all-gather copied out while the layer before's buffer is still held
            # (the local `prev_all_gather_state` in `wait_for_unshard`)
            return self._rows(gathered=e_fwd + t_early + (1 if R else L) * lay.gathered, ag=2 * lay.ag_buffer)
        if moment is Moment.forward_tail_copy_out:  # the tail's, beside the last layer's buffer
            return self._rows(gathered=e_fwd + (0 if R else L) * lay.gathered + T.gathered,
                              ag=lay.ag_buffer + T.ag_buffer)
        if moment is Moment.forward_head:  # the tail's buffer is kept until the root's post-forward
            return self._rows(gathered=e_fwd + (0 if R else L) * lay.gathered + T.gathered, ag=T.ag_buffer)
        if moment is Moment.loss:  # the loss's backward runs before the tail's pre-backward prefetch
            return self._rows(gathered=e_fwd + (0 if R else L) * lay.gathered + T.gathered)
        if moment in (Moment.backward_top, Moment.backward):
            i = L - 1 if layer is None and moment is Moment.backward_top else (0 if layer is None else layer)
            units = 1 if R else i + 1
            # prefetch of the unit before: layer i-1, or for the first layer the embedding
            ag = (lay.ag_buffer if i > 0 else E.ag_buffer) if R else 0
            # the reduce-scatter input of the unit reduced before (layer i+1, or the tail) is kept
            rs = lay.rs_input if i < L - 1 else (0 if self.tied else T.rs_input)
            rs += (L - 1 - i) * self.held_all_reduce
            reduced = (L - 1 - i) * lay.sharded_grads + (0 if self.tied else T.sharded_grads)
            return self._rows(gathered=e_fwd + t_early + units * lay.gathered, ag=ag, rs=rs, unit_grads=lay.grads,
                              outer_grads=T.grads if self.tied else 0, grads=reduced)
        if moment is Moment.backward_post:
            # layer i's post-backward: resharded, the previous reduce-scatter input released, then
            # its gradients copied into its own reduce-scatter input (`foreach_reduce` chunk_cat)
            i = layer
            ag = (lay.ag_buffer if i > 0 else E.ag_buffer) if R else 0
            reduced = (L - 1 - i) * lay.sharded_grads + (0 if self.tied else T.sharded_grads)
            return self._rows(gathered=e_fwd + t_early + (0 if R else i) * lay.gathered, ag=ag,
                              rs=lay.rs_input + (L - 1 - i) * self.held_all_reduce, unit_grads=lay.grads,
                              outer_grads=T.grads if self.tied else 0, grads=reduced)
        if moment is Moment.backward_end:  # the embedding's backward
            outer = T if self.tied else E
            return self._rows(gathered=outer.gathered, rs=lay.rs_input + L * self.held_all_reduce,
                              outer_grads=outer.grads,
                              grads=L * lay.sharded_grads + (0 if self.tied else T.sharded_grads))
        if moment is Moment.backward_root:  # its post-backward: resharded, then reduce-scattered
            outer = T if self.tied else E
            return self._rows(rs=outer.rs_input + L * self.held_all_reduce, outer_grads=outer.grads,
                              grads=L * lay.sharded_grads + (0 if self.tied else T.sharded_grads))
        if moment is Moment.optimizer:
            return self._rows(grads=self.grads)
        return {}

    def _rows1(self, moment, layer):
        from .phases import Moment

        L, lay, root = self.layers, self.layer, self.tail
        R = self.reshard
        head = self.tail_grads  # autograd holds the head's and final norm's gradients until the root's end
        if moment in (Moment.forward, Moment.forward_copy_out, Moment.forward_tail_copy_out):
            return self._rows(gathered=root.gathered + (1 if R else L) * lay.gathered)
        if moment is Moment.forward_head:
            return self._rows(gathered=root.gathered + (0 if R else L) * lay.gathered)
        if moment is Moment.loss:
            # the root's pre-backward hook runs on the loss's gradient, before the loss's backward,
            # and BACKWARD_PRE unshards the last layer then (`_pre_backward_hook`, `_prefetch_handle`)
            return self._rows(gathered=root.gathered + (1 if R else L) * lay.gathered)
        if moment in (Moment.backward_top, Moment.backward):
            i = L - 1 if layer is None and moment is Moment.backward_top else (0 if layer is None else layer)
            # BACKWARD_PRE: the next unit is unsharded before this one's gradients are computed
            units = (1 + (i > 0)) if R else i + 1
            # use_orig_params: autograd makes one gradient per parameter view, and the flat
            # parameter's split backward concatenates them, both alive as it runs
            return self._rows(gathered=root.gathered + units * lay.gathered, unit_grads=2 * lay.grads,
                              outer_grads=head, grads=(L - 1 - i) * lay.sharded_grads)
        if moment is Moment.backward_post:
            # `_post_backward_hook`: reshard (this layer's gathered copy freed), cast the flat gradient
            # to the reduce dtype, reduce-scatter into a new shard (`_reduce_grad`)
            i = layer
            units = (i > 0) if R else i
            return self._rows(gathered=root.gathered + units * lay.gathered, unit_grads=lay.grads,
                              rs=lay.grad_cast + lay.rs_output, outer_grads=head,
                              grads=(L - 1 - i) * lay.sharded_grads)
        if moment is Moment.backward_end:
            # the root's per-view gradients concatenated into its flat gradient
            return self._rows(gathered=root.gathered, outer_grads=head + self.embed_grads + root.grads,
                              grads=L * lay.sharded_grads)
        if moment is Moment.backward_root:  # its post-backward: resharded, cast, reduce-scattered
            return self._rows(rs=root.grad_cast + root.rs_output, outer_grads=root.grads,
                              grads=L * lay.sharded_grads)
        if moment is Moment.optimizer:
            return self._rows(grads=self.grads)
        return {}


EMPTY = Unit(shard=0, trainable_shard=0, gathered=0, ag_buffer=0, grads=0, rs_input=0, rs_output=0, sharded_grads=0,
             states_per_copy=0, grad_cast=0)
