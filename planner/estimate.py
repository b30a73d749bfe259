"""The phase walk: which components are live when, and the peak.

Training is walked as the steady state of a step as the HF Trainer runs it: forward and loss
(outputs dropped before backward), the loss gradient, backward through the layers (activations
freed while gradients appear), then the optimizer step. The peak is the largest phase, not the
sum of every component.
"""

from __future__ import annotations

from . import activations as act
from . import inference as inf
from . import overhead
from .architecture import ModelArch
from .errors import MemplanInputError
from .gpu import GpuProfile
from .job import Job
from .dtypes import float_bytes
from .parallel import ShardPlan, shard, shard_plan
from .params import buffer_bytes, count_params
from .results import Component, Estimate, Phase
from .units import count, human
from .training import (
    autocast_caches_weights,
    autocast_weight_copies,
    BNB_PAGED_MIN_NUMEL,
    is_paged,
    largest_trainable_tensor,
    unpaged_trainable_params,
    optimizer_state_bytes,
    optimizer_step_temporary,
    resolve_targets,
    trainable_bytes_per_param,
    trainable_params,
    unquantized_note,
    weight_bytes,
)

FWD, LOSS, BWD, OPT, LOAD = "forward", "loss backward", "backward", "optimizer step", "loaded"
PREFILL, DECODE = "prefill", "decode"


def check_job(job: Job, arch: ModelArch) -> None:
    total = job.seq_len + (job.new_tokens if job.task == "infer" else 0)
    if total > arch.max_positions:
        what = "seq-len + new-tokens" if job.new_tokens and job.task == "infer" else "seq-len"
        raise MemplanInputError(f"{what} {total} exceeds {arch.name}'s maximum of {arch.max_positions} positions")


def estimate_memory(job: Job, arch: ModelArch, gpu: GpuProfile | None = None, platform: str = "cuda") -> Estimate:
    """Estimate one job's per-GPU memory. `platform="cpu"` follows the CPU kernels the trace runs."""
    check_job(job, arch)
    ws = overhead.cublas_workspaces(gpu, job.task) if platform == "cuda" else 0
    if job.task == "infer":
        return _finish(job, arch, gpu, *_inference(job, arch, platform, ws))
    return _finish(job, arch, gpu, *_training(job, arch, platform, ws))


def _sum(saved: dict[str, int]) -> int:
    return sum(saved.values())


class _State:
    """Per-GPU bytes of the step-long state, after sharding and offload."""

    def __init__(self, job: Job, arch: ModelArch, params, n_train: int, plan: ShardPlan, targets: tuple[str, ...]):
        pb = trainable_bytes_per_param(job)
        self.weights, self.weights_formula = weight_bytes(job, arch, params)
        root_params = params.embedding + params.lm_head + params.final_norm
        # embeddings, final norm and lm_head are never quantized
        root_bytes = 4 if job.kbit_upcast else float_bytes(job.compute_dtype if job.quantized else job.base_weight_dtype)
        self.root_weights = root_params * root_bytes
        self.buffers = buffer_bytes(arch)
        self.layer_weights = (self.weights - self.root_weights) // arch.layers
        self.adapters = n_train * pb if job.uses_lora else 0
        self.states, self.states_formula = optimizer_state_bytes(job, n_train)
        # a paged optimizer splits its states: small tensors in device memory, the rest paged
        n_unpaged = unpaged_trainable_params(job, arch, targets) if is_paged(job) else n_train
        self.unpaged_states = optimizer_state_bytes(job, n_unpaged)[0] if n_unpaged < n_train else self.states
        self.paged_states = self.states - self.unpaged_states
        self.temp, self.temp_formula = optimizer_step_temporary(job, n_train, largest_trainable_tensor(job, arch, targets))
        if job.method == "full":
            self.g_layer = params.per_layer * pb
            self.g_head = (params.lm_head or params.embedding) * pb + params.final_norm * pb
            self.g_embed_late = params.embedding * pb if params.lm_head else 0
            # tied embeddings: the embedding's gradient arrives while lm_head's is held, and
            # AccumulateGrad adds them out of place (seen in the trace): two extra vocab x hidden buffers
            self.g_tied_accum = 2 * params.embedding * pb if not params.lm_head else 0
        else:
            self.g_layer = n_train // arch.layers * pb
            self.g_head = self.g_embed_late = self.g_tied_accum = 0
        self.g_all = self.g_layer * arch.layers + self.g_head + self.g_embed_late
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

    def _place(self, nbytes: int, div: int, movable: bool) -> int:
        """This rank's share of `nbytes`: on the GPU, or counted as host RAM when offloaded."""
        share = shard(nbytes, div)
        if self.plan.offload and movable:
            self.host += share
            return 0
        return share

    def grads_share(self, nbytes: int) -> int:
        """Per-GPU bytes of a slice of the gradients (0 where gradients live on the host)."""
        div = self.plan.grads_div
        return 0 if self.plan.offload and div > 1 else shard(nbytes, div)

    @property
    def resident(self) -> int:
        """Bytes in torch's allocator for the whole step (buffers are replicated, not sharded)."""
        return self.gpu_weights + self.buffers + self.gpu_adapters + self.gpu_states


def _buffers_component(arch: ModelArch, phases: list[str]) -> Component:
    formula = (f"causal mask buffer {arch.max_positions:,}^2 x 1 B (bool)" if arch.learned_positions
               else "rotary inverse frequencies, fp32")
    return Component(name="buffers", bytes=buffer_bytes(arch), formula=formula, phases=phases)


def _state_components(job: Job, arch: ModelArch, st: _State, targets, n_train: int) -> list[Component]:
    plan = st.plan
    split = f" / {plan.params_div} ({plan.describe})" if plan.params_div > 1 else ""
    comps = [Component(name="weights", bytes=st.gpu_weights, formula=st.weights_formula + split, phases=[LOAD, FWD, BWD, OPT]),
             _buffers_component(arch, [LOAD, FWD, BWD, OPT])]
    if job.uses_lora:
        pb = trainable_bytes_per_param(job)
        comps.append(Component(
            name="adapters", bytes=st.gpu_adapters,
            formula=f"r={job.lora_rank} x (d_in + d_out) on {'/'.join(targets)}: {count(n_train)} x {pb} B{split}",
            phases=[LOAD, FWD, BWD, OPT]))
    if st.gathered:
        comps.append(Component(
            name="gathered parameters", bytes=st.gathered,
            formula=f"root unit (embeddings, lm_head) {human(st.root_weights)} + 2 decoder layers x {human(st.layer_weights)}",
            phases=[FWD, BWD]))
    s_split = f" / {plan.states_div}" if plan.states_div > 1 else ""
    if st.paged_states:
        comps.append(Component(
            name="optimizer states", bytes=st.gpu_states,
            formula=f"{st.states_formula.removesuffix(' (paged)')}, tensors under {BNB_PAGED_MIN_NUMEL:,} elements: "
                    f"not paged{s_split}", phases=[FWD, BWD, OPT]))
        comps.append(Component(name="paged optimizer states", bytes=st.gpu_paged_states,
                               formula=f"the rest, in CUDA unified memory{s_split}", phases=[FWD, BWD, OPT], pool="unified"))
    else:
        comps.append(Component(name="optimizer states", bytes=st.gpu_states, formula=st.states_formula + s_split,
                               phases=[FWD, BWD, OPT]))
    g_split = f" / {plan.grads_div}" if plan.grads_div > 1 else ""
    comps.append(Component(name="gradients", bytes=st.gpu_grads,
                           formula=f"{count(n_train)} trainable x {trainable_bytes_per_param(job)} B{g_split}", phases=[BWD, OPT]))
    if st.ddp_buckets:
        comps.append(Component(name="DDP gradient buckets", bytes=st.ddp_buckets,
                               formula="a second copy of the gradients (gradient_as_bucket_view=False)", phases=[BWD, OPT]))
    if st.unit_grads:
        comps.append(Component(name="unsharded unit gradients", bytes=st.unit_grads,
                               formula="one layer's gradients before reduce-scatter", phases=[BWD]))
    if st.gpu_temp:
        comps.append(Component(name="optimizer step temporary", bytes=st.gpu_temp, formula=st.temp_formula + s_split, phases=[OPT]))
    return comps


def _workspace_component(ws: int, task: str, phases: list[str]) -> Component:
    handles = overhead.cublas_handles(task)
    return Component(name="cuBLAS workspaces", bytes=ws, phases=phases,
                     formula=f"{handles} handle{'s' if handles > 1 else ''} ({'forward thread, autograd thread' if handles > 1 else 'one thread'})"
                             f" x {human(ws // handles)}, from torch's caching allocator")


def _training(job: Job, arch: ModelArch, platform: str, ws: int):
    params = count_params(arch)
    targets = resolve_targets(job, arch) if job.uses_lora else ()
    n_train = trainable_params(job, arch, params, targets)
    plan = shard_plan(job.sharding, job.num_gpus, job.gpus_per_node, job.cpu_offload)
    st = _State(job, arch, params, n_train, plan, targets)
    t = job.micro_batch * job.seq_len
    comps = _state_components(job, arch, st, targets, n_train)
    notes: list[str] = []
    if st.paged_states:
        notes.append("paged optimizer states live in CUDA unified memory: pynvml sees them, torch.cuda does not, "
                     "and the driver can page them to host RAM under pressure")
    elif is_paged(job) and st.states:
        notes.append(f"paged optimizer, but every state tensor is under {BNB_PAGED_MIN_NUMEL:,} elements: bitsandbytes "
                     "keeps them all in ordinary device memory")
    if ws:
        comps.append(_workspace_component(ws, job.task, [FWD, BWD, OPT]))
    sharded_away = (st.weights - shard(st.weights, plan.params_div)) + (st.adapters - shard(st.adapters, plan.params_div))
    if st.gathered > sharded_away:
        notes.append(f"{job.sharding} on {job.num_gpus} GPUs: sharding the parameters saves {human(sharded_away)} per GPU, "
                     f"but the gathered root unit and two decoder layers take {human(st.gathered)}, so each GPU holds "
                     "more parameter bytes than one unsharded GPU would (the embeddings and head outweigh the sharded "
                     "layers); zero2 / fsdp_grad_op gathers nothing, and more GPUs shrink the shard")
    if job.num_gpus > 1 and job.sharding == "none":
        notes.append(f"{job.num_gpus} GPUs without --sharding: plain DDP, every GPU holds a full replica")

    # activations (per GPU: each data-parallel rank runs its own micro-batch)
    grad_in_first = job.method == "full" or job.checkpointing
    ctx = act.make_ctx(job, arch, targets, platform, grad_in=True)
    ctx0 = act.make_ctx(job, arch, targets, platform, grad_in=grad_in_first)
    layer_tensors = act.layer_saved(arch, ctx)
    layer = _sum(layer_tensors)
    layer0 = _sum(act.layer_saved(arch, ctx0))
    shared = act.rotary_tables(arch, ctx) + _sum(act.final_norm_saved(arch, ctx))
    if arch.embd_dropout > 0:
        shared += t * arch.hidden * ctx.dropout_mask(ctx.act_bytes)
    shared += act.attention_mask_bytes(arch, ctx, job.micro_batch)
    trans = act.layer_backward_transient(arch, ctx, layer_tensors)
    if job.quantized:
        # bitsandbytes dequantizes one weight at a time for the input gradient: into the compute
        # dtype on CUDA (MatMul4Bit.backward), into the activation dtype on the CPU
        trans += arch.largest_quantizable_linear * (ctx.act_bytes if platform == "cpu" else float_bytes(job.compute_dtype))
    if job.checkpointing:
        kept = act.checkpoint_saved(arch, ctx) * arch.layers + shared
        a_formula = f"{arch.layers} checkpointed layer inputs x {human(act.checkpoint_saved(arch, ctx))}; backward recomputes one layer ({human(layer)})"
    else:
        kept = layer0 + layer * (arch.layers - 1) + shared
        a_formula = f"{arch.layers} layers x {human(layer)} saved for backward"
    comps.append(Component(name="activations", bytes=kept, formula=a_formula, phases=[FWD, BWD]))
    casts = autocast_weight_copies(job, arch, params)
    # a checkpointed forward over frozen weights keeps only the head's cast (lm_head runs outside
    # the checkpointed layers); autocast's cache keeps every trainable weight's (training.py)
    casts_fwd = casts
    if casts and job.checkpointing and not autocast_caches_weights(job):
        casts_fwd = (params.lm_head or params.embedding) * float_bytes(job.compute_dtype)
    if casts:
        comps.append(Component(name="autocast weight copies", bytes=casts_fwd,
                               formula=f"matmul weights cast to {ctx.act_bytes} B, kept for backward", phases=[FWD, BWD]))

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
        comps.append(Component(name="autocast lm_head copy", bytes=head_copy,
                               formula=f"{v:,} x {arch.hidden:,} head weight cast to {ab} B, kept for backward",
                               phases=[FWD, LOSS]))
    logits_fwd = t * v * (ab + (4 if ab != 4 else 0) + 4)
    logits_bwd = t * v * 12
    comps.append(Component(
        name="logits and loss", bytes=logits_bwd,
        formula=f"{count(t)} tokens x {v:,} vocab x 12 B (fp32 log-softmax + 2 gradients)",
        phases=[FWD, LOSS]))

    fwd_layer = act.layer_forward_transient(arch, ctx, layer_tensors, job.checkpointing)
    static = st.resident + ws
    live = static + st.gathered
    recompute = layer - act.recompute_input_alias(arch, ctx) if job.checkpointing else 0
    # autocast's cache of cast weights dies with the autocast region; only tensors saved for
    # backward keep them, and a checkpointed forward saves none (the recomputation re-casts one layer)
    casts_bwd = casts // arch.layers if job.checkpointing else casts
    g_share = st.grads_share
    bwd_top = live + kept + casts_bwd + recompute + g_share(st.g_head + st.g_layer) + st.unit_grads + trans + st.ddp_buckets
    bottom_acts = layer0 + act.checkpoint_saved(arch, ctx) if job.checkpointing else layer0
    bwd_bottom = live + g_share(st.g_all - st.g_embed_late) + bottom_acts + st.unit_grads + trans + st.ddp_buckets
    bwd_end = static + st.gpu_grads + g_share(st.g_tied_accum) + t * arch.hidden * ab + st.ddp_buckets
    phases = [
        Phase(name=LOAD, allocated_bytes=st.gpu_weights + st.buffers + st.gpu_adapters, detail="weights and adapters"),
        Phase(name=FWD, allocated_bytes=live + kept + casts_fwd + max(head_copy + logits_fwd, fwd_layer),
              detail="states + saved activations + logits, fp32 copy and log-softmax"),
        Phase(name=LOSS, allocated_bytes=live + kept + casts_bwd + head_copy + logits_bwd,
              detail="states + saved activations + fp32 log-softmax and two vocab-wide gradients"),
        Phase(name=BWD, allocated_bytes=max(bwd_top, bwd_bottom, bwd_end),
              detail="activations freed layer by layer while gradients appear"),
        Phase(name=OPT, allocated_bytes=static + st.gpu_grads + st.gpu_temp + st.ddp_buckets,
              detail="states + gradients + update temporaries"),
    ]
    if ctx.attention == "math_fp32" and arch.family != "falcon" and job.attention == "sdpa" and platform == "cuda":
        notes.append("fp32 attention on a grouped-query model runs SDPA's math kernel on CUDA (transformers passes "
                     "enable_gqa, which only the 16-bit kernels take): the scores are materialised, quadratic in the "
                     "sequence; under the Trainer's bf16 autocast (--autocast) a fused kernel runs instead")
    n = unquantized_note(job, arch)
    if n:
        notes.append(n)
    if job.kbit_upcast:
        notes.append("prepare_model_for_kbit_training casts embeddings, norms and lm_head to fp32, so the residual "
                     "stream and the logits are fp32 (use --no-kbit-prepare if you skip that call)")
    if st.host:
        notes.append(f"cpu offload: {human(st.host)} of host RAM per GPU")
    unified = st.gpu_paged_states
    return comps, phases, params, n_train, notes, unified, st.host


def _inference(job: Job, arch: ModelArch, platform: str, ws: int):
    params = count_params(arch)
    comps: list[Component] = []
    notes: list[str] = []
    w, w_formula = weight_bytes(job, arch, params)
    comps.append(Component(name="weights", bytes=w, formula=w_formula, phases=[LOAD, PREFILL, DECODE]))
    comps.append(_buffers_component(arch, [LOAD, PREFILL, DECODE]))
    w += buffer_bytes(arch)
    kv = inf.kv_cache_bytes(job, arch)
    kv_prompt = inf.kv_cache_bytes(job, arch, generated=False)
    positions = inf.kv_tokens(job, arch)
    decode = [DECODE] if job.new_tokens else []
    comps.append(Component(
        name="KV cache", bytes=kv,
        formula=f"2 x {arch.layers} layers x {arch.kv_heads} kv heads x {arch.head_dim} head dim x {positions:,} positions "
                f"x batch {job.micro_batch} x {float_bytes(job.compute_dtype)} B",
        phases=[PREFILL, *decode]))
    if arch.sliding_window and job.seq_len + job.new_tokens > arch.sliding_window:
        notes.append(f"sliding window: the cache keeps the last {arch.sliding_window} positions per layer")
    pre = inf.prefill_transient_bytes(job, arch, platform)
    comps.append(Component(name="activations", bytes=pre, formula="one layer's no-grad intermediates during prefill",
                           phases=[PREFILL]))
    head = inf.head_bytes(job, arch)
    logits = inf.logits_bytes(job, arch)
    comps.append(Component(
        name="logits", bytes=head,
        formula=("final norm output + last position's logits and their fp32 copy (generate)" if job.new_tokens
                 else "final norm output + logits for every position (plain forward)"),
        phases=[PREFILL]))
    append = inf.cache_append_bytes(job, arch)
    decode_dequant = inf.dequant_bytes(job, arch, job.micro_batch) if job.new_tokens else 0
    if decode_dequant:
        comps.append(Component(name="decode dequantized weight", bytes=decode_dequant, phases=[DECODE],
                               formula=f"bitsandbytes dequantizes the largest 4-bit weight for {job.micro_batch} rows "
                                       f"(> {inf.BNB_FUSED_MAX_ROWS}: no fused kernel guaranteed)"))
    if append:
        comps.append(Component(name="KV cache append", bytes=append, phases=[DECODE],
                               formula="DynamicCache torch.cat: one layer's old and new keys alive at once"))
    if ws:
        comps.append(_workspace_component(ws, job.task, [PREFILL, *decode]))
    phases = [
        Phase(name=LOAD, allocated_bytes=w, detail="weights"),
        Phase(name=PREFILL, allocated_bytes=w + ws + kv_prompt + max(pre, head),
              detail="weights + the prompt's KV cache + the larger of one layer's intermediates and the head"),
    ]
    if job.new_tokens:
        phases.append(Phase(name=DECODE, allocated_bytes=w + ws + kv + append + decode_dequant + logits,
                            detail="weights + full KV cache + one step's logits"))
    return comps, phases, params, 0, notes, 0, 0


def _finish(job, arch, gpu, comps, phases, params, n_train, notes, unified, host) -> Estimate:
    peak = max(phases, key=lambda p: p.allocated_bytes)
    slack = overhead.allocator_slack(peak.allocated_bytes)
    reserved = peak.allocated_bytes + slack
    context = overhead.cuda_context(gpu)
    comps = comps + [
        Component(name="allocator slack", bytes=slack, formula=f"{overhead.FRAGMENTATION:.0%} of peak",
                  phases=[peak.name], pool="reserved"),
        Component(name="CUDA context", bytes=context,
                  formula=gpu.cuda_context_source if gpu else "default (no GPU chosen)", phases=["always"], pool="driver"),
    ]
    device = reserved + context + unified
    if gpu and not gpu.supports_bf16 and job.compute_dtype.value == "bf16":
        notes = notes + [f"{gpu.name} has no bf16 support: use --compute-dtype fp16 (same memory, different numerics)"]
    return Estimate(
        job=job,
        model_name=arch.name,
        params=params,
        trainable_params=n_train,
        components=comps,
        phases=phases,
        peak_phase=peak.name,
        peak_allocated_bytes=peak.allocated_bytes,
        peak_reserved_bytes=reserved,
        device_used_bytes=device,
        gpu=gpu.name if gpu else None,
        gpu_memory_bytes=gpu.memory_bytes if gpu else None,
        fits=(device <= gpu.memory_bytes) if gpu else None,
        host_bytes=host,
        notes=notes,
    )
