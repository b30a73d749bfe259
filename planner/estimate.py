"""The phase walk: which components are live when, and the peak.

Training is walked as the steady state of a step as the HF Trainer runs it: forward and loss
(outputs dropped before backward), the loss gradient, backward through the layers (activations
freed while gradients appear), then the optimizer step. The peak is the largest phase, not the
sum of every component.
"""

from __future__ import annotations


from . import activations as act
from . import inference as inf
from . import alloc_sequence, layer_split, liger, offload, overhead, prequantized, tensor_parallel
from .allocator import NO_LIMIT, AllocatorSettings
from .device_memory import TERM_NAMES, context_bytes, outside_torch
from .attention import Kernel
from .phases import Moment, PhaseName
from .architecture import ModelArch
from .errors import MemplanInputError
from .gpu import GpuProfile
from .job import Job
from .dtypes import float_bytes
from .fsdp import FsdpRank
from .parallel import ShardPlan, shard, shard_plan
from .params import HEAD_MODULE, count_params, embedding_module, lora_params
from .results import Category, Component, Estimate, Phase
from .stacks import Stack, get as get_stack, registered as registered_stacks
from .units import count, human
from .training import (
    autocast_caches_weights,
    autocast_weight_copies,
    BNB_PAGED_MIN_NUMEL,
    is_paged,
    largest_trainable_tensor,
    unpaged_trainable_params,
    optimizer_state_bytes,
    trainable_bytes_per_param,
    trainable_params,
    unquantized_linears,
    weight_bytes,
)

FWD, LOSS, BWD, OPT, LOAD = (PhaseName.forward.value, PhaseName.loss_backward.value, PhaseName.backward.value,
                             PhaseName.optimizer_step.value, PhaseName.loaded.value)
PREFILL, DECODE = PhaseName.prefill.value, PhaseName.decode.value


def check_job(job: Job, arch: ModelArch) -> None:
    total = job.seq_len + (job.new_tokens if job.task == "infer" else 0)
    if total > arch.max_positions:
        what = "seq-len + new-tokens" if job.new_tokens and job.task == "infer" else "seq-len"
        raise MemplanInputError(f"{what} {total} exceeds {arch.name}'s maximum of {arch.max_positions} positions")


def estimate_memory(job: Job, arch: ModelArch, gpu: GpuProfile | None = None, stack: Stack | None = None,
                    replay_allocator: bool = True) -> Estimate:
    """Estimate one job's per-GPU memory under `stack` (default: the job's, on CUDA; the CPU trace
    compares against `memplan.stacks.get(job.stack).on_cpu()`, the CPU's kernels).

    `replay_allocator=False` skips the caching-allocator replay (tens of milliseconds per job) and
    takes the constant slack instead: recommend's search over hundreds of candidates does."""
    job = prequantized.effective_job(job, arch)  # a bitsandbytes checkpoint: its own 4/8-bit dtype
    prequantized.check_job(job, arch)
    inf.check_cache(job, arch)
    check_job(job, arch)
    liger.check(job, arch)
    stack = stack or get_stack(job.stack)
    stack.check_features(job, arch)
    stack.check(job, arch)
    ws = 0 if stack.cpu else overhead.cublas_workspaces(gpu, job.task)
    if job.task == "infer" and job.sharding == "device_map":
        return _device_map(job, arch, gpu, stack, ws, replay_allocator)
    if job.task == "infer":
        lay = None
        if job.sharding == "tp":
            # one rank's model: split heads and MLP widths (planner/tensor_parallel.py)
            lay = tensor_parallel.layout(arch, job.num_gpus, job.engine)
            arch = tensor_parallel.rank_arch(arch, lay)
        parts = _inference(job, arch, stack, ws, lay)
    else:
        parts = _training(job, arch, stack, ws)
    if not replay_allocator:
        parts[0].alloc_plan = None
    return _finish(job, arch, gpu, stack, *parts)


def _device_map(job: Job, arch: ModelArch, gpu: GpuProfile | None, stack: Stack, ws: int,
                replay_allocator: bool) -> Estimate:
    """accelerate's layer split: every GPU's own estimate (planner/layer_split.py); the busiest one's is
    returned, with the placement of all of them."""
    plan, derived = layer_split.placement_plan(job, arch, gpu, context_bytes(outside_torch(job, arch, gpu)))
    per_gpu: dict[int, Estimate] = {}
    for device, share in layer_split.shares(plan):
        parts = _inference(job, layer_split.share_arch(arch, share), stack, ws, share=share)
        if not replay_allocator:
            parts[0].alloc_plan = None
        per_gpu[device] = _finish(job, arch, gpu, stack, *parts)
    if not per_gpu:
        raise MemplanInputError(f"--sharding device_map: nothing of {arch.name} lands on a GPU with these --max-memory "
                                "figures; give the GPUs more memory")
    placement = layer_split.placement(plan, per_gpu, derived)
    busiest, offloaded = int(placement.busiest), placement.offloaded_bytes
    main = per_gpu[busiest]
    notes = list(main.notes) + [
        f"accelerate device_map={plan.strategy} over {job.num_gpus} GPUs: the figures above are GPU {busiest}'s, the "
        "busiest; one GPU computes at a time (the placement table lists each)"]
    fits = main.fits
    if offloaded:
        notes.append(f"{human(offloaded)} of weights land on the cpu or disk: accelerate streams them to the GPU layer by "
                     "layer, which memplan does not model; counted as not fitting the GPUs")
        fits = False if gpu is not None else None
    if plan.refusal:
        notes.append(plan.refusal)
        fits = False
    if gpu is not None and any(e.fits is False for e in per_gpu.values()):
        fits = False
    return main.model_copy(update={"placement": placement, "notes": notes, "fits": fits})


def _sum(saved: dict[str, int]) -> int:
    return sum(saved.values())


class _State:
    """Per-GPU bytes of the step-long state, after sharding and offload."""

    def __init__(self, job: Job, arch: ModelArch, params, n_train: int, plan: ShardPlan, targets: tuple[str, ...],
                 stack: Stack):
        pb = trainable_bytes_per_param(job)
        self.weights, self.weights_formula = weight_bytes(job, arch, params, stack)
        root_params = params.embedding + params.lm_head + params.final_norm + params.embedding_norm
        # embeddings, final norm and lm_head are never quantized
        root_bytes = 4 if job.kbit_upcast else float_bytes(job.compute_dtype if job.quantized else job.base_weight_dtype)
        self.root_weights = root_params * root_bytes
        self.buffers = stack.buffer_bytes(job, arch)
        self.buffers_formula = stack.buffers_formula(job, arch)
        self.layer_weights = (self.weights - self.root_weights) // arch.layers
        self.adapters = n_train * pb if job.uses_lora else 0
        self.states, self.states_formula = optimizer_state_bytes(job, n_train)
        # a paged optimizer splits its states: small tensors in device memory, the rest paged
        n_unpaged = unpaged_trainable_params(job, arch, targets) if is_paged(job) else n_train
        self.unpaged_states = optimizer_state_bytes(job, n_unpaged)[0] if n_unpaged < n_train else self.states
        self.paged_states = self.states - self.unpaged_states
        largest = largest_trainable_tensor(job, arch, targets)
        self.temp, self.temp_formula = stack.optimizer_step_temporary(job, n_train, largest)
        if job.method == "full":
            self.g_layer = params.per_layer * pb
            self.g_head = (params.lm_head or params.embedding) * pb + params.final_norm * pb
            self.g_embed_late = params.embedding * pb if params.lm_head else 0
            # tied embeddings: the embedding's gradient arrives while lm_head's is held, and
            # AccumulateGrad adds them out of place (seen in the trace): two extra vocab x hidden buffers
            self.g_tied_accum = 2 * params.embedding * pb if not params.lm_head else 0
        else:
            # LoRA on the head or the embedding: their adapters' gradients arrive first and last
            head, embed = outer_lora_params(job, arch, targets)
            self.g_layer = (n_train - head - embed) // arch.layers * pb
            self.g_head, self.g_embed_late, self.g_tied_accum = head * pb, embed * pb, 0
        self.g_all = self.g_layer * arch.layers + self.g_head + self.g_embed_late
        if params.all_blocks is not None and job.method == "full":
            # layers of different sizes (DeepSeek's dense first layers): g_layer stays the
            # largest layer's, the sum is every layer's
            self.g_all = params.blocks * pb + self.g_head + self.g_embed_late
        self.g_largest = largest * pb
        self.plan = plan
        # per GPU; with offload the optimizer (states and its temporaries) runs on the host, and
        # parameters and gradients follow it there where they are sharded
        self.host = 0
        self.gpu_weights = self._place(self.weights, plan.params_div, plan.params_div > 1)
        self.gpu_adapters = self._place(self.adapters, plan.params_div, plan.params_div > 1)
        self.gpu_states = self._place(self.unpaged_states, plan.states_div, True)
        self.gpu_paged_states = self._place(self.paged_states, plan.states_div, True)
        self.gpu_grads = self._place(self.g_all, plan.grads_div, plan.grads_div > 1)
        self.gpu_temp = 0 if plan.offload else shard(self.temp, plan.states_div)
        # FSDP/ZeRO-3: the root unit (embeddings, final norm, lm_head) stays gathered through the
        # step; decoder layers are gathered one at a time, a second one prefetched
        self.gathered = self.root_weights + 2 * (self.layer_weights + self.adapters // arch.layers) if plan.gathers_units else 0
        # gradients of the unit in backward, unsharded until their reduce-scatter
        self.unit_grads = self.g_layer if plan.grads_div > 1 else 0
        self.ddp_buckets = self.g_all if plan.ddp_buckets else 0
        # [zero] DeepSpeed ZeRO-1/2/3: the rank's state from DeepSpeed's own source (planner/zero.py)
        self.zero = None
        if plan.strategy in ("zero1", "zero2", "zero3"):
            from .zero import per_rank

            self.zero = z = per_rank(job, arch, targets, stack, n_train, largest)
            full = job.method == "full"
            self.gpu_weights = z.weights + (z.trainable16 if full else 0)
            self.gpu_adapters = 0 if full else z.trainable16
            self.gpu_states, self.gpu_paged_states, self.gpu_temp = z.states, 0, 0
            self.gpu_grads = 0
            self.gathered = self.unit_grads = 0
            self.host = z.host
            self._zero_pb = pb

        self.fsdp: FsdpRank | None = None
        if job.fsdp:
            self._fsdp(job, arch, targets, stack)

    def _fsdp(self, job: Job, arch: ModelArch, targets: tuple[str, ...], stack: Stack) -> None:
        """FSDP's own per-tensor account (planner/fsdp.py) replaces the proportional one."""
        copies = {"adamw": 2, "sgd_momentum": 1, "sgd": 0}.get(job.optimizer)
        f = self.fsdp = FsdpRank(job, arch, targets, self.plan.group, copies or 0, self.plan.offload, stack)
        self.gathered = self.unit_grads = 0
        self.host = 0
        self.gpu_weights = self._place(f.weights, 1, True)
        self.gpu_adapters = self._place(f.adapters, 1, True)
        if copies is not None:  # bitsandbytes optimizers keep their proportional share
            self.gpu_states = self._place(f.states, 1, True)
            self.gpu_paged_states = 0
        else:
            self.gpu_states = self._place(self.unpaged_states, self.plan.states_div, True)
            self.gpu_paged_states = self._place(self.paged_states, self.plan.states_div, True)
        self.gpu_grads = self._place(f.grads, 1, True)
        if job.optimizer == "adamw" and not self.plan.offload:
            self.gpu_temp = f.temp_foreach if job.foreach else 2 * f.largest_state

    def shard_rows(self, moment: "Moment") -> dict[str, int]:
        """The sharding strategy's own buffers live at `moment` of the walk (row name -> bytes)."""
        if self.zero is not None:  # [zero] planner/zero.py; "gradients" and the step temporary are ZeRO's own
            rows = self.zero.rows_at(moment.value)
            if moment is Moment.optimizer:
                rows = {"gradients": 0, "optimizer step temporary": 0, **rows}
            return rows
        if self.fsdp is not None:
            return self.fsdp.rows(moment)
        in_pass = moment not in (Moment.backward_end, Moment.backward_root, Moment.optimizer)
        rows = {"gathered parameters": self.gathered} if in_pass else {}
        if moment in (Moment.backward_top, Moment.backward):
            rows["unsharded unit gradients"] = self.unit_grads
        if moment in (Moment.backward_top, Moment.backward, Moment.backward_end, Moment.optimizer):
            rows["DDP gradient buckets"] = self.ddp_buckets
        return rows

    def _place(self, nbytes: int, div: int, movable: bool) -> int:
        """This rank's share of `nbytes`: on the GPU, or counted as host RAM when offloaded."""
        share = shard(nbytes, div)
        if self.plan.offload and movable:
            self.host += share
            return 0
        return share

    def grads_share(self, nbytes: int) -> int:
        """Per-GPU bytes of a slice of the gradients (0 where gradients live on the host)."""
        if self.zero is not None:  # [zero] only ZeRO-1 without overlap_comm keeps whole 16-bit gradients
            return nbytes * self.zero.elem16 // self._zero_pb if self.zero.full_grads else 0
        div = self.plan.grads_div
        return 0 if self.plan.offload and div > 1 else shard(nbytes, div)

    @property
    def resident(self) -> int:
        """Bytes in torch's allocator for the whole step (buffers are replicated, not sharded)."""
        return self.gpu_weights + self.buffers + self.gpu_adapters + self.gpu_states


_C = Category
# Every row of the breakdown and its category (a row missing here fails at once: KeyError)
ROW_CATEGORY: dict[str, Category] = {
    "weights": _C.weights, "buffers": _C.weights, "adapters": _C.weights, "gathered parameters": _C.weights,
    "gradients": _C.gradients, "DDP gradient buckets": _C.gradients, "unsharded unit gradients": _C.gradients,
    "tied embedding gradient sum": _C.gradients, "all-gather buffers": _C.weights,
    "reduce-scatter buffers": _C.gradients, "unsharded root gradients": _C.gradients,
    "optimizer states": _C.optimizer, "paged optimizer states": _C.optimizer, "optimizer step temporary": _C.optimizer,
    "activations": _C.activations, "autocast weight copies": _C.activations, "recomputed layer": _C.activations,
    "KV cache": _C.kv_cache, "KV cache append": _C.kv_cache,
    "MLA decompressed keys and values": _C.transients,
    "logits and loss": _C.transients, "logits held by the loop": _C.transients, "autocast lm_head copy": _C.transients,
    "layer forward transients": _C.transients, "backward transients": _C.transients,
    "dequantized weight": _C.transients, "decode dequantized weight": _C.transients,
    "embedding input gradient": _C.transients, "logits": _C.transients, "logits shard": _C.transients,
    "all-reduce output": _C.transients,
    "DoRA weight-norm transients": _C.transients,
    "embedding LoRA activations": _C.activations, "lm_head LoRA activations": _C.activations,
    "lm_head LoRA output": _C.transients,
    "cuBLAS workspaces": _C.overhead, "allocator slack": _C.overhead,
    # memory outside torch's allocator (planner/device_memory.py)
    **{name: _C.overhead for name in TERM_NAMES},
    # [zero] DeepSpeed ZeRO's own rows (planner/zero.py, docs/deepspeed.md)
    "persistent parameters": _C.weights, "fp32 master weights": _C.optimizer,
    "gradient partition": _C.gradients, "reduce buckets": _C.gradients, "bucket reduction copy": _C.transients,
    "unreduced gradient": _C.gradients, "fp32 gradient partition": _C.optimizer,
    "flattened gradient copy": _C.transients, "offload gradient staging buffer": _C.gradients,
}


class _Walk:
    """The rows of the breakdown and the phases they fill.

    A phase is a set of candidate moments (row name -> bytes live then); its high point is the
    largest moment, the phase's allocated bytes are that moment's sum, and each row records its
    bytes at that moment. So the rows live at any phase add up to the phase, to the byte."""

    def __init__(self) -> None:
        self._rows: dict[str, dict] = {}
        self.phases: list[Phase] = []
        # the step's allocation order, for the caching-allocator model (planner/alloc_sequence.py)
        self.alloc_plan = None

    def row(self, name: str, formula: str, pool: str = "torch") -> None:
        self._rows[name] = {"formula": formula, "pool": pool, "phase_bytes": {}, "fixed": None}

    def fixed(self, name: str, nbytes: int, formula: str, phases: list[str], pool: str) -> None:
        """A row outside torch's allocator (unified memory, driver, allocator slack): listed with
        the phases it spans, never part of a phase's allocated bytes."""
        self._rows[name] = {"formula": formula, "pool": pool, "phase_bytes": {}, "fixed": (nbytes, phases)}

    def phase(self, name: str, *moments: tuple[str, dict[str, int]]) -> None:
        detail, moment = max(moments, key=lambda m: sum(m[1].values()))
        for row, nbytes in moment.items():
            if nbytes:
                self._rows[row]["phase_bytes"][name] = nbytes
        self.phases.append(Phase(name=name, allocated_bytes=sum(moment.values()), detail=detail))

    def components(self) -> list[Component]:
        out = []
        for name, r in self._rows.items():
            if r["fixed"] is not None:
                nbytes, phases = r["fixed"]
                by_phase = {}
            else:
                by_phase = r["phase_bytes"]
                nbytes, phases = max(by_phase.values(), default=0), list(by_phase)
            if nbytes:  # a row of zero bytes says nothing: the job has no such term
                out.append(Component(name=name, category=ROW_CATEGORY[name], bytes=nbytes, formula=r["formula"], phases=phases,
                                     phase_bytes=by_phase, pool=r["pool"]))
        return out


def _state_rows(walk: _Walk, job: Job, arch: ModelArch, st: _State, targets, n_train: int) -> None:
    plan = st.plan
    split = f" / {plan.params_div} ({plan.describe})" if plan.params_div > 1 else ""
    if st.fsdp is not None:
        # FSDP shards every tensor (FSDP2: by rows, each padded to the world size) or each unit's flat
        # parameter (FSDP1): not the total / N
        split = (f"; rank 0's ceil(rows / {plan.group}) of each tensor (FSDP2, {plan.describe})" if st.fsdp.version == 2
                 else f"; rank 0's 1/{plan.group} of each unit's flat parameter (FSDP1, {plan.describe})")
    walk.row("weights", st.weights_formula + split)
    walk.row("buffers", st.buffers_formula)
    pb = trainable_bytes_per_param(job)
    walk.row("adapters", f"r={job.lora_rank} x (d_in + d_out) on {'/'.join(targets)}: {count(n_train)} x {pb} B{split}")
    walk.row("gathered parameters",
             f"root unit (embeddings, lm_head) {human(st.root_weights)} + 2 decoder layers x {human(st.layer_weights)}")
    s_split = f" / {plan.states_div}" if plan.states_div > 1 else ""
    if st.paged_states:
        walk.row("optimizer states", f"{st.states_formula.removesuffix(' (paged)')}, tensors under "
                                     f"{BNB_PAGED_MIN_NUMEL:,} elements: not paged{s_split}")
        walk.fixed("paged optimizer states", st.gpu_paged_states, f"the rest, in CUDA unified memory{s_split}",
                   [FWD, LOSS, BWD, OPT], "unified")
    else:
        walk.row("optimizer states", st.states_formula + s_split)
    g_split = f" / {plan.grads_div}" if plan.grads_div > 1 else ""
    walk.row("gradients", f"{count(n_train)} trainable x {pb} B{g_split} (in backward: those produced so far)")
    walk.row("DDP gradient buckets", "a second copy of the gradients (gradient_as_bucket_view=False)")
    walk.row("unsharded unit gradients", "one layer's gradients before reduce-scatter")
    f = st.fsdp
    if f is not None:
        v = f"FSDP{f.version}"
        outer = (f"the root unit (embeddings, final norm, lm_head) {human(f.tail.gathered)}" if f.version == 1 else
                 f"the final norm and lm_head{' (and the tied embedding)' if f.tied else ''} {human(f.tail.gathered)} "
                 "from their forward to their backward"
                 + ("" if f.tied else f", the embedding {human(f.embed.gathered)} in its forward and backward"))
        walk.row("gathered parameters", f"{v}: {outer}, + decoder layers x {human(f.layer.gathered)} unsharded in "
                                        "param_dtype" + ("" if f.reshard else
                                                         " (reshard_after_forward=False: every layer run so far)"))
        walk.row("all-gather buffers", f"{v}: one layer's flat all-gather buffer {human(f.layer.ag_buffer)}, two while "
                                       "the next layer is copied out in forward, one prefetched in backward")
        walk.row("reduce-scatter buffers", f"{v}: the previous layer's reduce-scatter input {human(f.layer.rs_input)} "
                                           "(reduce dtype), kept while the next layer runs backward; the root's at the end")
        walk.row("unsharded root gradients", f"{v}: the gradients of the embedding (and of the head, when it is in "
                                             "the same unit) unsharded until their unit's post-backward reduce-scatter")
    walk.row("optimizer step temporary", st.temp_formula + s_split)
    if st.zero is not None:  # [zero]
        _zero_rows(walk, job, st)


def _zero_rows(walk: _Walk, job: Job, st: _State) -> None:
    """[zero] The rows of a ZeRO job, worded from planner/zero.py's terms (docs/deepspeed.md)."""
    z = st.zero
    c = z.config
    n, e, p = z.world, z.elem16, z.partition
    part = f"{count(p)} elements ({count(z.n_train)} trainable / {n} ranks)"
    kind = "partitions (1/" + str(n) + " of each parameter)" if z.stage == 3 else "replicated on every rank"
    walk.row("weights", f"{job.compute_dtype.value} under DeepSpeed (bf16/fp16 mode casts every float parameter), "
                        f"{kind}" + ("; offload_param: non-persistent partitions in pinned host RAM"
                                     if c.offload_param_device == "cpu" else ""))
    walk.row("adapters", f"trainable parameters, {e} B, {kind}")
    walk.row("persistent parameters", f"parameters of at most stage3_param_persistence_threshold "
                                      f"{c.stage3_param_persistence_threshold:,} elements, kept gathered whole")
    walk.row("gathered parameters", z.formulas.get("gathered parameters", ""))
    walk.row("all-gather buffers", "flat all-gather buffers (padded partitions x ranks) alive until their last "
                                   "parameter is waited for")
    walk.row("fp32 master weights", f"fp32 copy of this rank's partition: {part} x 4 B")
    walk.row("optimizer states", f"{job.optimizer} states of the fp32 partition: {part}")
    walk.row("gradients", f"whole {e} B gradients until the end of backward (ZeRO-1: reduced after backward)")
    walk.row("gradient partition", f"this rank's reduced {e} B gradients: {part} x {e} B (allocated at init)"
             if z.stage == 3 else f"this rank's reduced {e} B gradients (contiguous_gradients): the parameters "
                                  f"overlapping rank 0's slice of {count(p)} elements, held whole")
    walk.row("reduce buckets", z.formulas.get("reduce buckets", ""))
    walk.row("bucket reduction copy", f"the flattened copy of a full reduce bucket (min(reduce_bucket_size, "
                                      f"trainable) x {e} B) while it is reduced")
    walk.row("unreduced gradient", f"the largest trainable parameter's gradient before its hook copies it into "
                                   f"the bucket ({e} B)")
    walk.row("fp32 gradient partition", "the step's fp32 gradient of the partition"
                                        + (f" (one sub-group of sub_group_size {c.sub_group_size:,})" if z.stage == 3 else ""))
    walk.row("flattened gradient copy", f"the step's flattened {e} B copy of the gradient partition before its "
                                        "fp32 cast")
    walk.row("offload gradient staging buffer", z.formulas.get("offload gradient staging buffer", ""))
    walk.row("optimizer step temporary", "torch AdamW foreach over the fp32 partition: 4 B per element "
                                         "(DeepSpeed's FusedAdam, --no-foreach: none)")


def _fsdp_backward_layers(st: _State, static, acts_at, own: int, recompute: int, transients,
                          casts: int, embed_lora: int, after_mlp: tuple[int, int]) -> list[tuple[str, dict[str, int]]]:
    """FSDP: the backward of the layers where its buffers change (planner/fsdp.py `backward_layers`);
    the saved activations go down linearly from the top layer's to the first's."""
    f = st.fsdp
    if f is None:
        return []
    out = []
    L = f.layers
    for i in f.backward_layers():
        acts = acts_at(i)  # the saved tensors of layers 0..i (their checkpointed inputs), not its recomputation
        below = max(acts - own, 0)  # once layer i's own are freed
        # the start of its backward: every saved tensor (and the recomputed layer), its gradients not yet made
        start = {**static, "activations": acts, "autocast weight copies": casts, "recomputed layer": recompute,
                 **transients, "embedding LoRA activations": embed_lora,
                 **f.rows(Moment.backward, layer=i, produced=False)}
        out.append((f"backward of decoder layer {i} starting: its saved tensors and FSDP's buffers", start))
        freed, attn = after_mlp
        if f.mlp_grads:
            # the MLP's backward done: its saved tensors freed, its gradients made, the attention's running
            mid = {**start, "activations": max(acts - (0 if recompute else freed), 0),
                   "recomputed layer": max(recompute - freed, 0) if recompute else 0,
                   "backward transients": attn, "dequantized weight": 0,
                   **f.rows(Moment.backward, layer=i, produced="mlp")}
            out.append((f"backward of decoder layer {i}: its MLP's gradients beside the attention's backward", mid))
        # its end: the layer's own saved tensors and transients are gone, its gradients made
        end = {**static, "activations": below, "autocast weight copies": casts,
               "embedding LoRA activations": embed_lora, **f.rows(Moment.backward, layer=i)}
        out.append((f"backward of decoder layer {i} done: its unsharded gradients beside FSDP's buffers", end))
        post = {**static, "activations": below, "autocast weight copies": casts,
                "embedding LoRA activations": embed_lora, **f.rows(Moment.backward_post, layer=i)}
        out.append((f"post-backward of decoder layer {i}: its gradients flattened for the reduce-scatter", post))
    return out


def _workspace_formula(ws: int, task: str) -> str:
    handles = overhead.cublas_handles(task)
    threads = "forward thread, autograd thread" if handles > 1 else "one thread"
    return (f"{handles} handle{'s' if handles > 1 else ''} ({threads}) x {human(ws // handles)}, "
            "from torch's caching allocator")


def outer_lora_params(job: Job, arch: ModelArch, targets: tuple[str, ...]) -> tuple[int, int]:
    """Trainable parameters of LoRA on the head and on the input embedding (planner/params.py)."""
    if job.method == "full":
        return 0, 0
    head = lora_params(arch, (HEAD_MODULE,), job.lora_rank, job.dora) if HEAD_MODULE in targets else 0
    emb = embedding_module(arch)
    embed = lora_params(arch, (emb,), job.lora_rank, job.dora) if emb in targets else 0
    return head, embed


def _outer_lora(job: Job, arch: ModelArch, targets: tuple[str, ...], ctx: act.Ctx) -> tuple[int, int, int]:
    """LoRA on the input embedding and on the head: (embedding saved, head saved, head forward transient).

    Embedding (peft tuners/lora/layer.py `Embedding.forward`): `after_A = F.embedding(x, A.T)`, tokens x r
    in the adapter dtype, saved by `after_A @ B` for B's gradient. The head is a peft `Linear`: its lora_A
    keeps its input (the final norm's output, cast to the adapter dtype) and lora_B its r-wide input, as in
    the blocks (activations.lora_inputs); its lora_B output is vocab-wide, and `* scaling` makes a second
    one before the sum with the logits (`result + lora_B(lora_A(x)) * scaling`, layer.py `Linear.forward`)."""
    t = job.micro_batch * job.seq_len
    embed = t * job.lora_rank * ctx.adapter_bytes if embedding_module(arch) in targets else 0
    head = head_out = 0
    if HEAD_MODULE in targets:
        saved: dict[str, int] = {}
        act.lora_inputs(ctx, HEAD_MODULE, arch.hidden, "final_norm.lora_input", saved)
        head = _sum(saved)
        ob = ctx.sdpa_bytes if ctx.lora_autocast else ctx.adapter_bytes
        head_out = 2 * t * arch.vocab * ob
    return embed, head, head_out


def as_run(job: Job) -> Job:
    """The job as its forward and backward compute it. FSDP mixed precision gathers fp32 sharded
    weights (and adapters) in param_dtype, the compute dtype (planner/fsdp.py): the step is a 16-bit
    model's, under autocast for FSDP1 in accelerate's form, without it otherwise; DeepSpeed's bf16/fp16
    mode runs the module in the 16-bit dtype with no autocast (planner/zero.py)."""
    if not (job.fsdp_mp or job.deepspeed_mp):
        return job
    c = job.compute_dtype
    if job.deepspeed_mp:  # the whole module in the 16-bit dtype, adapters included (Job.deepspeed_mp)
        return job.model_copy(update={"weight_dtype": c, "adapter_dtype": c if job.uses_lora else None,
                                      "autocast": False})
    # FSDP1 wraps each LoRA leaf as its own unit, so when peft casts a layer's input to
    # `lora_A.weight.dtype` it reads the sharded fp32 view (the leaf is gathered in param_dtype only
    # inside its own forward): the adapters' inputs are fp32, as over a 16-bit base (traced)
    adapters = (job.lora_dtype if job.fsdp_version == 1 else c) if job.uses_lora else None
    return job.model_copy(update={"weight_dtype": c, "adapter_dtype": adapters, "autocast": job.runs_autocast})


def _training(job: Job, arch: ModelArch, stack: Stack, ws: int):
    params = count_params(arch, stack)
    targets = stack.lora_targets(job, arch) if job.uses_lora else ()
    n_train = trainable_params(job, arch, params, targets)
    plan = shard_plan(job.sharding, job.num_gpus, job.gpus_per_node, job.cpu_offload)
    st = _State(job, arch, params, n_train, plan, targets, stack)
    t = job.micro_batch * job.seq_len
    walk = _Walk()
    _state_rows(walk, job, arch, st, targets, n_train)
    notes: list[str] = []
    if st.paged_states:
        notes.append("paged optimizer states live in CUDA unified memory: pynvml sees them, torch.cuda does not, "
                     "and the driver can page them to host RAM under pressure")
    elif is_paged(job) and st.states:
        notes.append(f"paged optimizer, but every state tensor is under {BNB_PAGED_MIN_NUMEL:,} elements: bitsandbytes "
                     "keeps them all in ordinary device memory")
    walk.row("cuBLAS workspaces", _workspace_formula(ws, job.task) if ws else "")
    if st.fsdp is not None:
        sharded_away = st.weights + st.adapters - st.fsdp.weights - st.fsdp.adapters
        gathered, what = st.fsdp.most_gathered(), "the unsharded units and all-gather buffers"
    else:
        sharded_away = (st.weights - shard(st.weights, plan.params_div)) + (st.adapters - shard(st.adapters, plan.params_div))
        gathered, what = st.gathered, "the gathered root unit and two decoder layers"
    if gathered > sharded_away:
        notes.append(f"{job.sharding} on {job.num_gpus} GPUs: sharding the parameters saves {human(sharded_away)} per GPU, "
                     f"but {what} take up to {human(gathered)}, so each GPU holds more parameter bytes at that moment "
                     "than one unsharded GPU would; more GPUs shrink the shard, not what is gathered")
    if job.num_gpus > 1 and job.sharding == "none":
        notes.append(f"{job.num_gpus} GPUs without --sharding: plain DDP, every GPU holds a full replica")

    # activations (per GPU: each data-parallel rank runs its own micro-batch)
    # checkpointing as asked for, and as the stack really runs it for this architecture
    ckpt = job.checkpointing and stack.checkpoints(arch)
    if job.checkpointing and not ckpt:
        notes.append(f"{stack.label} does not checkpoint {arch.decoder_layer}: gradient_checkpointing_enable() "
                     "has no effect there, so every layer's activations are kept (docs/stacks/transformers.md)")
    # LoRA on the embedding: gradients flow into the first layer's input
    grad_in_first = job.method == "full" or ckpt or embedding_module(arch) in targets
    # what the forward and backward compute in: under FSDP mixed precision the gathered parameters
    # (adapters included) are in param_dtype, so the step runs as a 16-bit model would, with
    # accelerate's autocast around it or none (an explicit policy)
    run = as_run(job)
    ctx = act.make_ctx(run, arch, targets, stack, grad_in=True)
    ctx0 = act.make_ctx(run, arch, targets, stack, grad_in=grad_in_first)
    layer_tensors = stack.layer_saved(arch, ctx)
    # a LoRA step over a GPTQ base also saves each linear's dequantized weight (planner/prequantized.py)
    pq_saved = prequantized.backward_saved_per_layer(job, arch, ctx.act_bytes)
    if pq_saved:
        layer_tensors = {**layer_tensors, "dequantized GPTQ weights": pq_saved}
    layer = _sum(layer_tensors)
    layer0 = _sum(stack.layer_saved(arch, ctx0))
    dense_extra = 0
    if arch.dense_layers:
        # DeepSeek's first dense layers (first_k_dense_replace) save their dense MLP's
        # tensors in place of the routed ones; layer 0 is one of them
        dense = arch.dense_view()
        layer0 = _sum(stack.layer_saved(dense, ctx0))
        dense_extra = (_sum(stack.layer_saved(dense, ctx)) - layer) * (arch.dense_layers - 1)
    layer0 += prequantized.backward_saved_per_layer(job, arch, ctx.act_bytes, grad_in_first)
    shared = act.rotary_tables(arch, ctx) + _sum(act.final_norm_saved(arch, ctx))
    if arch.embd_dropout > 0:
        shared += t * arch.hidden * ctx.dropout_mask(ctx.act_bytes)
    shared += act.attention_mask_bytes(arch, ctx, job.micro_batch)
    trans = stack.layer_backward_transient(arch, ctx, layer_tensors)
    # bitsandbytes dequantizes one weight at a time for the input gradient: into the compute dtype
    # on CUDA (MatMul4Bit.backward), into the activation dtype on the CPU
    dequant = inf.dequant_bytes(job, arch, stack, t, ctx.act_bytes if stack.cpu else None)
    if ckpt:
        kept = act.checkpoint_saved(arch, ctx) * arch.layers + shared
        a_formula = (f"{arch.layers} checkpointed layer inputs x {human(act.checkpoint_saved(arch, ctx))}; "
                     f"backward recomputes one layer ({human(layer)})")
    else:
        kept = layer0 + layer * (arch.layers - 1) + dense_extra + shared
        a_formula = f"{arch.layers} layers x {human(layer)} saved for backward"
    offloaded = 0
    kept_bwd, bottom_extra = kept, None
    if job.activation_offloading:
        # every saved tensor goes to pinned host memory; the GPU keeps the forward stash and, in the
        # backward, the tensors of the nodes running (planner/offload.py)
        largest = act.checkpoint_saved(arch, ctx) if ckpt else max([*layer_tensors.values(), shared // 2, 1])
        offloaded = kept
        kept, kept_bwd = offload.on_gpu(kept, largest)
        bottom_extra = kept_bwd
        a_formula += (f"; offloaded to host RAM ({human(offloaded)}): on the GPU the last {offload.MAX_FWD_STASH} "
                      f"saved tensors (forward) and {offload.BACKWARD_NODES} nodes' tensors more (backward), "
                      f"the largest {human(largest)}")
    walk.row("activations", a_formula)
    casts = autocast_weight_copies(run, arch, params)
    # a checkpointed forward over frozen weights keeps only the head's cast (lm_head runs outside
    # the checkpointed layers); autocast's cache keeps every trainable weight's (training.py)
    casts_fwd = casts
    if casts and ckpt and not autocast_caches_weights(job):
        casts_fwd = (params.lm_head or params.embedding) * float_bytes(job.compute_dtype)
    walk.row("autocast weight copies", f"matmul weights cast to {ctx.act_bytes} B, kept for backward")

    v = arch.vocab
    ab = ctx.act_bytes
    # autocast over QLoRA's fp32 lm_head (Trainer bf16=True): the head's matmul runs in 16 bits, so
    # the logits are 16-bit before the loss upcasts them, and the 16-bit copy of the head weight is
    # kept for backward (H100/H200: forward and loss backward within 1.5%, validate/results)
    head_autocast = job.kbit_upcast and job.runs_autocast
    head_copy = 0
    if head_autocast:
        ab = float_bytes(job.compute_dtype)
        head_copy = (params.lm_head or params.embedding) * ab
    walk.row("autocast lm_head copy", f"{v:,} x {arch.hidden:,} head weight cast to {ab} B, kept for backward")
    if job.liger:
        loss = liger.fused_linear_cross_entropy(arch, t, ctx.stream_bytes, ab, trainable_bytes_per_param(job),
                                                head_trains=job.method == "full")
    else:
        loss = stack.loss(run, arch, t, ab)
    logits_fwd, logits_bwd = loss.forward, loss.backward
    walk.row("logits and loss", loss.formula)
    walk.row("logits held by the loop", "the training loop still references the logits through backward and the step")

    fwd_layer = stack.layer_forward_transient(arch, ctx, layer_tensors, ckpt)
    walk.row("layer forward transients", "one layer's attention scores while it runs (checkpointed: its attention tensors too)")
    dora_fwd = act.dora_layer_transient(ctx, ckpt)
    walk.row("DoRA weight-norm transients", "the largest DoRA target's eye(d_in), lora_B @ lora_A, the base weight in "
                                            "the adapter dtype and W + s * BA, alive while its forward runs")
    recompute = layer - act.recompute_input_alias(arch, ctx) if ckpt else 0
    walk.row("recomputed layer", "one checkpointed layer's saved tensors, recomputed for its backward")
    walk.row("backward transients", "one layer's backward: stream gradients + the MLP's or the attention's gradients")
    walk.row("dequantized weight", prequantized.dequant_row(arch) or
             "the largest 4/8-bit weight, dequantized for the input gradient (bitsandbytes)")
    walk.row("tied embedding gradient sum", "tied embedding and head gradients, summed out of place")
    walk.row("embedding input gradient", f"{count(t)} tokens x {arch.hidden:,} x {ab} B into the embedding's backward")
    # autocast's cache of cast weights dies with the autocast region; only tensors saved for
    # backward keep them, and a checkpointed forward saves none (the recomputation re-casts one layer)
    casts_bwd = casts // arch.layers if ckpt else casts

    def g_share(produced: int) -> int:
        return st.grads_share(stack.gradients_held(job, produced, st.g_largest))
    static = {"weights": st.gpu_weights, "buffers": st.buffers, "adapters": st.gpu_adapters,
              "optimizer states": st.gpu_states, "cuBLAS workspaces": ws, "logits held by the loop": loss.held}
    def at(moment: Moment, rows: dict[str, int]) -> dict[str, int]:
        """`rows` with the sharding strategy's own at `moment` (FSDP also replaces the gradients)."""
        return {**rows, **st.shard_rows(moment)}
    embed_lora, head_lora, head_out = _outer_lora(job, arch, targets, ctx)
    walk.row("embedding LoRA activations", f"F.embedding(ids, lora_embedding_A.T): {count(t)} tokens x r={job.lora_rank}, "
                                           "kept by the product with lora_embedding_B")
    walk.row("lm_head LoRA activations", "the head's lora_A input (its cast of the final norm's output) and lora_A's output")
    walk.row("lm_head LoRA output", f"the head's lora_B output and its scaled copy, {count(t)} tokens x {arch.vocab:,} vocab, "
                                    "beside the base logits")
    held = {**static, "activations": kept, "autocast weight copies": casts_fwd,
            "embedding LoRA activations": embed_lora, "lm_head LoRA activations": head_lora}
    walk.phase(LOAD, ("weights and adapters",
                      {"weights": st.gpu_weights, "buffers": st.buffers, "adapters": st.gpu_adapters}))
    fwd_moments = [
        ("states + saved activations + the head's logits and loss",
         at(Moment.forward_head, {**held, "autocast lm_head copy": head_copy, "logits and loss": logits_fwd})),
        ("states + saved activations + one layer's attention transients",
         at(Moment.forward, {**held, "layer forward transients": fwd_layer})),
        ("states + saved activations + the head's vocab-wide LoRA output",
         at(Moment.forward_head, {**held, "lm_head LoRA output": head_out})),
        ("states + saved activations + one DoRA linear's weight norm",
         at(Moment.forward, {**held, "DoRA weight-norm transients": dora_fwd}))]
    if st.fsdp is not None:
        # the last layer's own saved tensors do not exist yet when its parameters are copied out
        before_last = {**held, "activations": max(kept - (act.checkpoint_saved(arch, ctx) if ckpt else layer), 0)}
        fwd_moments.append(("states + saved activations + the last layer's all-gather copied out",
                            at(Moment.forward_copy_out, before_last)))
        fwd_moments.append(("states + saved activations + the head's all-gather copied out",
                            at(Moment.forward_tail_copy_out, held)))
    walk.phase(FWD, *fwd_moments)
    walk.phase(LOSS, ("states + saved activations + the loss's backward (its saved tensors and gradients)",
                      at(Moment.loss, {**static, "activations": kept, "autocast weight copies": casts_bwd,
                                       "autocast lm_head copy": head_copy, "logits and loss": logits_bwd,
                                       "embedding LoRA activations": embed_lora, "lm_head LoRA activations": head_lora})))
    transients = {"backward transients": trans, "dequantized weight": dequant}
    bottom_acts = layer0 + act.checkpoint_saved(arch, ctx) if ckpt else layer0
    if bottom_extra is not None:
        bottom_acts = min(bottom_acts, bottom_extra)
    # FSDP's per-layer walk: what layers 0..i saved (a checkpointed layer: its input), the shared
    # tensors (rotary tables, the final norm's) until the last layer's backward; `own` is layer i's share
    own = act.checkpoint_saved(arch, ctx) if ckpt else layer

    def acts_at(i: int) -> int:
        if job.activation_offloading:
            return bottom_acts + (kept_bwd - bottom_acts) * i // max(arch.layers - 1, 1)
        base = own * (i + 1) if ckpt else layer0 + layer * i
        return base + (shared if i == arch.layers - 1 else 0)
    bwd_moments = [
        ("top of backward: every activation, the last layer recomputed, head and layer gradients",
         at(Moment.backward_top, {**static, "activations": kept_bwd, "autocast weight copies": casts_bwd,
                                  "recomputed layer": recompute, "gradients": g_share(st.g_head + st.g_layer),
                                  **transients, "embedding LoRA activations": embed_lora})),
        ("top of backward: the last layer recomputed, one DoRA linear's weight norm",
         at(Moment.backward_top, {**static, "activations": kept_bwd, "autocast weight copies": casts_bwd,
                                  "recomputed layer": recompute, "gradients": g_share(st.g_head + st.g_layer),
                                  # the recomputation runs once the layer's output gradient has arrived
                                  "DoRA weight-norm transients": act.dora_recompute_transient(ctx)
                                  + 2 * t * arch.hidden * ctx.stream_bytes if ckpt and ctx.dora else 0,
                                  "embedding LoRA activations": embed_lora})),
        ("bottom of backward: the first layer's activations beside nearly every gradient",
         at(Moment.backward, {**static, "activations": bottom_acts, "gradients": g_share(st.g_all - st.g_embed_late),
                              **transients, "embedding LoRA activations": embed_lora})),
        *_fsdp_backward_layers(st, static, acts_at, own, recompute, transients, casts_bwd, embed_lora,
                               act.attention_backward_after_mlp(arch, ctx, layer_tensors)),
        ("end of backward: every gradient, the embedding's last",
         at(Moment.backward_end, {**static, "gradients": g_share(st.g_all),
                                  "tied embedding gradient sum": g_share(st.g_tied_accum),
                                  "embedding input gradient": t * arch.hidden * ab}))]
    if st.fsdp is not None:
        # FSDP walks the layers itself (`_fsdp_backward_layers`); the DoRA and end moments stay
        bwd_moments = [m for m in bwd_moments if not m[0].startswith(("top of backward", "bottom of backward"))]
        bwd_moments.append(("end of backward: the root unit's gradients reduce-scattered",
                            at(Moment.backward_root, dict(static))))
    walk.phase(BWD, *bwd_moments)
    walk.phase(OPT, ("states + gradients + update temporaries",
                     at(Moment.optimizer, {**static, "gradients": st.grads_share(stack.gradients_held(job, st.g_all, 0)),
                                           "optimizer step temporary": st.gpu_temp})))
    if ctx.attention is Kernel.math_fp32 and not arch.sdpa_always_math and job.attention == "sdpa" and not stack.cpu:
        notes.append("fp32 attention on a grouped-query model runs SDPA's math kernel on CUDA (transformers passes "
                     "enable_gqa, which only the 16-bit kernels take): the scores are materialised, quadratic in the "
                     "sequence; under the Trainer's bf16 autocast (--autocast) a fused kernel runs instead")
    notes += _unconverted_notes(job, arch, stack)
    if head_autocast:
        c = job.compute_dtype.value
        notes.append(f"prepare_model_for_kbit_training casts embeddings, norms and lm_head to fp32, so the residual "
                     f"stream is fp32; under {c} autocast the matmuls, lm_head included, run in {c}: {c} logits "
                     f"(upcast by the loss), a {c} copy of the head weight, {c} inputs to the adapters")
    elif job.kbit_upcast:
        notes.append("prepare_model_for_kbit_training casts embeddings, norms and lm_head to fp32, so the residual "
                     "stream and the logits are fp32 (use --no-kbit-prepare if you skip that call; --autocast for "
                     "the Trainer's bf16=True)")
    if st.host:
        notes.append(f"cpu offload: {human(st.host)} of host RAM per GPU")
    if offloaded:
        notes.append(f"activation offloading: {human(offloaded)} of saved activations in pinned host RAM per GPU "
                     "(autocast weight casts and the recomputed layer stay on the GPU as counted)")
    unified = st.gpu_paged_states
    if plan.params_div == 1 and plan.grads_div == 1 and plan.states_div == 1 and not job.activation_offloading:
        walk.alloc_plan = alloc_sequence.plan_training(
            job, arch, stack, targets, saved0=stack.layer_saved(arch, ctx0),
            saved=layer_tensors, checkpointed=ckpt, checkpoint_input=act.checkpoint_saved(arch, ctx),
            forward_transient=fwd_layer, backward_transient=trans, scores=act.score_bytes(arch, ctx),
            shared=shared, loss=loss,
            tokens=t, hidden_grad=t * arch.hidden * ctx.stream_bytes,
            calls=alloc_sequence.linear_calls(job, arch, stack, ctx, dequant),
            workspaces=[ws // overhead.cublas_handles(job.task)] * overhead.cublas_handles(job.task) if ws else [])
    return walk, params, n_train, notes, unified, st.host + offloaded


def _unconverted_notes(job: Job, arch: ModelArch, stack: Stack) -> list[str]:
    """A quantized job whose stack leaves some projections in 16 bits says which, and what a stack
    that converts them would give (a pure re-estimate under that stack)."""
    skipped = unquantized_linears(job, arch, stack)
    if not skipped:
        return []
    kept = "fp32 (kbit upcast)" if job.kbit_upcast else job.compute_dtype.value
    kinds = sorted({lin.module for lin in arch.projections if lin.name in skipped})
    note = (f"{arch.name}: {', '.join(skipped)} ({', '.join(kinds)}: not plain nn.Linear) stay unquantized, as "
            f"{stack.label}'s bitsandbytes loading converts {stack.bnb_rule}; they are counted in {kept}")
    for other in registered_stacks():
        other = other.on_cpu() if stack.cpu else other
        if other.name != stack.name and not unquantized_linears(job, arch, other):
            alt = estimate_memory(job.model_copy(update={"stack": other.name}), arch, None, other)
            note += (f"; under {other.label} (--stack {other.name}) every projection is {job.base_weight_dtype.value}: "
                     f"peak {human(alt.peak_allocated_bytes)} allocated")
            break
    return [note]


def _inference(job: Job, arch: ModelArch, stack: Stack, ws: int, lay: tensor_parallel.Layout | None = None,
               share: layer_split.Share | None = None):
    """`lay`: one tensor-parallel rank; `share`: one GPU of accelerate's layer split (`arch` cut to
    its layers, its weights the placement's bytes, parameters and buffers together)."""
    params = count_params(arch, stack)
    walk = _Walk()
    notes: list[str] = _unconverted_notes(job, arch, stack)
    if lay is not None:
        params = tensor_parallel.rank_params(params, arch, lay)
        notes.append(lay.describe + "; figures are per GPU (rank 0, which holds the largest shares)")
    w, w_formula = weight_bytes(job, arch, params, stack)
    buffers = stack.buffer_bytes(job, arch)
    if share is not None:
        w, buffers = share.weights_bytes, 0
        w_formula = (f"the parameters and buffers accelerate's device_map puts on this GPU ({share.layers} decoder "
                     "layers and the modules beside them)")
    walk.row("weights", w_formula)
    walk.row("buffers", stack.buffers_formula(job, arch) if buffers else "")
    kv = inf.kv_cache_bytes(job, arch)
    kv_prompt = inf.kv_cache_bytes(job, arch, generated=False)
    walk.row("KV cache", inf.kv_cache_formula(job, arch))
    windows = {w for w in (arch.window_of(i) for i in range(arch.layers)) if w}
    if windows and job.seq_len + job.new_tokens > min(windows):
        notes.append("sliding window: the cache keeps the last " + " or ".join(f"{w:,}" for w in sorted(windows))
                     + " positions in each sliding layer")
    pre = inf.prefill_transient_bytes(job, arch, stack)
    # the prefill's high point inside a layer includes one dequantized 4-bit weight: its own row
    pre_dequant = inf.dequant_bytes(job, arch, stack, job.micro_batch * job.seq_len)
    walk.row("activations", "one layer's no-grad intermediates during prefill")
    walk.row("dequantized weight", prequantized.dequant_row(arch) or
             "bitsandbytes dequantizes the largest 4-bit weight to the compute dtype "
             f"for more than {inf.BNB_FUSED_MAX_ROWS} rows")
    head = inf.head_bytes(job, arch) if share is None or share.holds_head else 0
    logits = inf.logits_bytes(job, arch) if share is None or share.holds_head else 0
    walk.row("logits", ("final norm output + last position's logits and their fp32 copy (generate); "
                        "in decode, one step's logits" if job.new_tokens
                        else "final norm output + logits for every position (plain forward)"))
    append = inf.cache_append_bytes(job, arch, stack)
    decode_dequant = inf.dequant_bytes(job, arch, stack, job.micro_batch) if job.new_tokens else 0
    walk.row("decode dequantized weight", f"bitsandbytes dequantizes the largest 4-bit weight for {job.micro_batch} "
                                          f"rows (> {inf.BNB_FUSED_MAX_ROWS}: no fused kernel guaranteed)")
    walk.row("KV cache append", inf.cache_append_formula(job))
    walk.row("cuBLAS workspaces", _workspace_formula(ws, job.task) if ws else "")
    base = {"weights": w, "buffers": buffers, "cuBLAS workspaces": ws}
    walk.phase(LOAD, ("weights", {"weights": w, "buffers": buffers}))
    # tensor parallel: o_proj's partial sums and their all-reduced copy are alive together, which can
    # top the layer's other moments (planner/inference.py all_reduce_bytes); the head's logits shard
    # beside the gathered logits (colwise_gather_output)
    reduced = inf.all_reduce_bytes(job, arch, pre - pre_dequant) if lay else 0
    walk.row("all-reduce output", "tensor parallel: o_proj's partial sums and their all-reduced copy beside the "
                                  "attention's stream and norm tensors, above the layer's other moments" if lay else "")
    head_shard = head * lay.head_rows // arch.vocab if lay and job.engine == "transformers" else 0
    walk.row("logits shard", "tensor parallel: this rank's slice of the logits before they are gathered"
             if head_shard else "")
    walk.phase(PREFILL,
               ("weights + the prompt's KV cache + one layer's intermediates",
                {**base, "KV cache": kv_prompt, "activations": pre - pre_dequant, "dequantized weight": pre_dequant,
                 "all-reduce output": reduced}),
               ("weights + the prompt's KV cache + the head",
                {**base, "KV cache": kv_prompt, "logits": head, "logits shard": head_shard}))
    decode_moments = [("weights + full KV cache + one step's logits",
                       {**base, "KV cache": kv, "KV cache append": append,
                        "decode dequantized weight": decode_dequant, "logits": logits})]
    if arch.mla is not None:
        # each decode step decompresses one layer's whole cache to per-head keys and values
        walk.row("MLA decompressed keys and values", "expand_kv: kv_b_proj over every cached latent and the new "
                                                     "key, one layer at a time (the kernel's copies too)")
        decode_moments.append(("weights + full KV cache + one layer's decompressed keys and values",
                               {**base, "KV cache": kv, "MLA decompressed keys and values":
                                inf.mla_decode_bytes(job, arch, stack), "decode dequantized weight": decode_dequant}))
        notes.append(inf.mla_cache_note(job, arch))
    if job.new_tokens:
        walk.phase(DECODE, *decode_moments)
    walk.alloc_plan = alloc_sequence.plan_inference(
        job, arch, stack, prompt_cache=[inf.layer_cache_bytes(job, arch, i, generated=False) for i in range(arch.layers)],
        final_cache=[inf.layer_cache_bytes(job, arch, i) for i in range(arch.layers)], prefill=pre, head=head,
        logits=logits, workspaces=[ws] if ws else [], weights=w if share is not None else None)
    return walk, params, 0, notes, 0, 0


def _finish(job, arch, gpu, stack: Stack, walk: _Walk, params, n_train, notes, unified, host) -> Estimate:
    phases = walk.phases
    peak = max(phases, key=lambda p: p.allocated_bytes)
    outside = outside_torch(job, arch, gpu)
    beside = sum(term.bytes for term in outside) + unified  # what the card holds outside torch's pool
    slack, least, stats = overhead.allocator_slack(peak.allocated_bytes), None, None
    if walk.alloc_plan is not None:
        # the caching allocator replayed over the step's allocation sequence (planner/allocator.py),
        # on the card's memory when one is given: past it the allocator releases its cached segments
        # and retries, so what pynvml shows is capped there while the job still runs
        plan, scale = alloc_sequence.bounded(walk.alloc_plan)
        capacity = gpu.memory_bytes - beside if gpu else NO_LIMIT
        stats, n_events = alloc_sequence.replayed(plan, AllocatorSettings(
            expandable_segments=job.expandable_segments, capacity=max(capacity, 0)))
        slack = int(max(stats.peak_reserved_bytes - stats.peak_allocated_bytes, 0) * scale)
        least = int(max(stats.required_bytes - stats.peak_allocated_bytes, 0) * scale)
        formula = overhead.slack_formula(stats, n_events, job.expandable_segments)
        if scale != 1.0:
            formula += (f"; {alloc_sequence.MAX_REPLAYED_LAYERS} of {arch.layers} layers replayed, the slack "
                        "scaled by their ratio")
        walk.fixed("allocator slack", slack, formula, [peak.name], "reserved")
    else:
        walk.fixed("allocator slack", slack, f"{overhead.FRAGMENTATION:.0%} of peak (no allocation sequence for "
                   "this job: see docs/allocator.md)", [peak.name], "reserved")
    reserved = peak.allocated_bytes + slack
    required = peak.allocated_bytes + (slack if least is None else least) + beside
    for term in outside:
        walk.fixed(term.name, term.bytes, term.source, ["always"], "driver")
    device = reserved + beside
    notes = job.notes() + prequantized.notes(job, arch) + notes
    if arch.partial_model:
        notes.append(arch.partial_model)
    if job.attention == "sdpa" and not arch.sdpa_supported:
        notes = notes + [f"{arch.name}: transformers 5 has no SDPA path for {arch.family} (_supports_sdpa = False); "
                         "counted with its eager attention, which transformers picks by default there"]
    if arch.unbuilt_mtp_layers:
        # DeepSeek-V3's multi-token-prediction module is in the checkpoint only
        notes = notes + [f"{arch.name}: its {arch.unbuilt_mtp_layers} multi-token-prediction layer(s) "
                         "(num_nextn_predict_layers) are not loaded by transformers (DeepseekV3PreTrainedModel "
                         "drops model.layers.61.* on load): not counted"]
    if gpu and not gpu.supports_bf16 and job.compute_dtype.value == "bf16":
        notes = notes + [f"{gpu.name} has no bf16 support: use --compute-dtype fp16 (same memory, different numerics)"]
    return Estimate(
        job=job,
        stack=stack.label,
        model_name=arch.name,
        params=params,
        trainable_params=n_train,
        components=walk.components(),
        phases=phases,
        peak_phase=peak.name,
        peak_allocated_bytes=peak.allocated_bytes,
        peak_reserved_bytes=reserved,
        device_used_bytes=device,
        gpu=gpu.name if gpu else None,
        gpu_memory_bytes=gpu.memory_bytes if gpu else None,
        gpu_card=gpu.card if gpu else None,
        weights_label=arch.quantization.label if prequantized.applies(job, arch) else None,
        fits=(device <= gpu.memory_bytes and not (stats and stats.num_ooms)) if gpu else None,
        required_bytes=required,
        allocator=stats,
        host_bytes=host,
        notes=notes,
    )
