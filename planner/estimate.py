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
from .params import count_params
from .results import Component, Estimate, Phase
from .units import count, human
from .training import (
    autocast_weight_copies,
    is_paged,
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
    if job.task == "infer":
        return _finish(job, arch, gpu, *_inference(job, arch))
    return _finish(job, arch, gpu, *_training(job, arch, platform))


def _sum(saved: dict[str, int]) -> int:
    return sum(saved.values())


def _training(job: Job, arch: ModelArch, platform: str):
    params = count_params(arch)
    targets = resolve_targets(job, arch) if job.uses_lora else ()
    n_train = trainable_params(job, arch, params, targets)
    pb = trainable_bytes_per_param(job)
    t = job.micro_batch * job.seq_len
    comps: list[Component] = []
    notes: list[str] = []

    w, w_formula = weight_bytes(job, arch, params)
    comps.append(Component(name="weights", bytes=w, formula=w_formula, phases=[LOAD, FWD, BWD, OPT]))
    adapters = n_train * pb if job.uses_lora else 0
    if job.uses_lora:
        comps.append(
            Component(
                name="adapters",
                bytes=adapters,
                formula=f"r={job.lora_rank} x (d_in + d_out) on {'/'.join(targets)}: {count(n_train)} x {pb} B",
                phases=[LOAD, FWD, BWD, OPT],
            )
        )
    states, s_formula = optimizer_state_bytes(job, n_train)
    paged = is_paged(job)
    comps.append(
        Component(name="optimizer states", bytes=states, formula=s_formula, phases=[FWD, BWD, OPT],
                  pool="unified" if paged else "torch")
    )
    if paged:
        notes.append("paged optimizer states live in CUDA unified memory: pynvml sees them, torch.cuda does not, "
                     "and the driver can page them to host RAM under pressure")
    resident_states = 0 if paged else states
    static = w + adapters + resident_states

    # gradients: per layer, the head (lm_head or tied embedding + final norm) and the embedding
    if job.method == "full":
        g_layer = params.per_layer * pb
        g_head = (params.lm_head or params.embedding) * pb + params.final_norm * pb
        g_embed_late = params.embedding * pb if params.lm_head else 0
        # tied embeddings: the embedding's gradient arrives while lm_head's is held, and
        # AccumulateGrad adds them out of place (seen in the trace): two extra vocab x hidden buffers
        g_tied_accum = 2 * params.embedding * pb if not params.lm_head else 0
    else:
        g_layer = n_train // arch.layers * pb
        g_head = g_embed_late = g_tied_accum = 0
    g_all = g_layer * arch.layers + g_head + g_embed_late
    comps.append(Component(name="gradients", bytes=g_all, formula=f"{count(n_train)} trainable x {pb} B", phases=[BWD, OPT]))

    # activations
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
        trans += max((lin.d_in * lin.d_out for lin in arch.linears if lin.quantizable), default=0) * ctx.act_bytes
    if job.checkpointing:
        kept = act.checkpoint_saved(arch, ctx) * arch.layers + shared
        a_formula = f"{arch.layers} checkpointed layer inputs x {human(act.checkpoint_saved(arch, ctx))}; backward recomputes one layer ({human(layer)})"
    else:
        kept = layer0 + layer * (arch.layers - 1) + shared
        a_formula = f"{arch.layers} layers x {human(layer)} saved for backward"
    comps.append(Component(name="activations", bytes=kept, formula=a_formula, phases=[FWD, BWD]))
    casts = autocast_weight_copies(job, arch, params)
    if casts:
        comps.append(Component(name="autocast weight copies", bytes=casts,
                               formula=f"matmul weights cast to {ctx.act_bytes} B, kept for backward", phases=[FWD, BWD]))

    v = arch.vocab
    ab = ctx.act_bytes
    logits_fwd = t * v * (ab + (4 if ab != 4 else 0) + 4)
    logits_bwd = t * v * 12
    comps.append(Component(
        name="logits and loss", bytes=logits_bwd,
        formula=f"{count(t)} tokens x {v:,} vocab x 12 B (fp32 log-softmax + 2 gradients)",
        phases=[FWD, LOSS]))
    temp, t_formula = optimizer_step_temporary(job, n_train)
    if temp:
        comps.append(Component(name="optimizer step temporary", bytes=temp, formula=t_formula, phases=[OPT]))

    recompute = layer if job.checkpointing else 0
    bwd_top = static + kept + casts + recompute + g_head + g_layer + trans
    bwd_bottom = (static + g_all - g_embed_late + (layer0 + act.checkpoint_saved(arch, ctx) if job.checkpointing else layer0)
                  + trans)
    bwd_end = static + g_all + g_tied_accum + t * arch.hidden * ab
    phases = [
        Phase(name=LOAD, allocated_bytes=w + adapters, detail="weights and adapters"),
        Phase(name=FWD, allocated_bytes=static + kept + casts + logits_fwd,
              detail="states + saved activations + logits, fp32 copy and log-softmax"),
        Phase(name=LOSS, allocated_bytes=static + kept + casts + logits_bwd,
              detail="states + saved activations + fp32 log-softmax and two vocab-wide gradients"),
        Phase(name=BWD, allocated_bytes=max(bwd_top, bwd_bottom, bwd_end),
              detail="activations freed layer by layer while gradients appear"),
        Phase(name=OPT, allocated_bytes=static + g_all + temp, detail="states + gradients + update temporaries"),
    ]
    n = unquantized_note(job, arch)
    if n:
        notes.append(n)
    if job.kbit_upcast:
        notes.append("prepare_model_for_kbit_training casts embeddings, norms and lm_head to fp32, so the residual "
                     "stream and the logits are fp32 (use --no-kbit-prepare if you skip that call)")
    return comps, phases, params, n_train, notes, (states if paged else 0)


def _inference(job: Job, arch: ModelArch):
    params = count_params(arch)
    comps: list[Component] = []
    notes: list[str] = []
    w, w_formula = weight_bytes(job, arch, params)
    comps.append(Component(name="weights", bytes=w, formula=w_formula, phases=[LOAD, PREFILL, DECODE]))
    kv = inf.kv_cache_bytes(job, arch)
    positions = inf.kv_tokens(job, arch)
    comps.append(Component(
        name="KV cache", bytes=kv,
        formula=f"2 x {arch.layers} layers x {arch.kv_heads} kv heads x {arch.head_dim} head dim x {positions:,} positions "
                f"x batch {job.micro_batch} x {2 if job.compute_dtype.value != 'fp32' else 4} B",
        phases=[PREFILL, DECODE]))
    if arch.sliding_window and job.seq_len + job.new_tokens > arch.sliding_window:
        notes.append(f"sliding window: the cache keeps the last {arch.sliding_window} positions per layer")
    pre = inf.prefill_transient_bytes(job, arch)
    comps.append(Component(name="activations", bytes=pre, formula="one layer's no-grad intermediates during prefill",
                           phases=[PREFILL]))
    logits = inf.logits_bytes(job, arch)
    comps.append(Component(name="logits", bytes=logits,
                           formula="last position only (generate)" if job.new_tokens else "every position, plus fp32 copy",
                           phases=[PREFILL]))
    phases = [
        Phase(name=LOAD, allocated_bytes=w, detail="weights"),
        Phase(name=PREFILL, allocated_bytes=w + kv + pre + logits, detail="weights + KV cache + prefill intermediates"),
        Phase(name=DECODE, allocated_bytes=w + kv + logits, detail="weights + full KV cache"),
    ]
    return comps, phases, params, 0, notes, 0


def _finish(job, arch, gpu, comps, phases, params, n_train, notes, unified) -> Estimate:
    peak = max(phases, key=lambda p: p.allocated_bytes)
    slack = overhead.allocator_slack(peak.allocated_bytes) + overhead.workspace(gpu)
    reserved = peak.allocated_bytes + slack
    context = overhead.cuda_context(gpu)
    comps = comps + [
        Component(name="allocator slack", bytes=slack, formula=f"{overhead.FRAGMENTATION:.0%} of peak + cuBLAS workspace",
                  phases=[peak.name], pool="reserved"),
        Component(name="CUDA context", bytes=context,
                  formula=gpu.cuda_context_source if gpu else "default (no GPU chosen)", phases=["always"], pool="driver"),
    ]
    device = reserved + context + unified
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
        host_bytes=0,
        notes=notes,
    )
