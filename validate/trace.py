"""CPU trace: the real transformers training step under FakeTensorMode, every live storage counted.

No memory is allocated (fake tensors carry shapes only), so a 7B model traces in seconds. The step
is the HF Trainer's: forward with labels, loss kept, outputs dropped, backward, optimizer step,
zero_grad(set_to_none=True); two iterations so optimizer state exists in the second.

The tracker also records the allocation sequence it saw (validate/tracker.py, `record`), and the
result carries planner/allocator.py's replay of it: the reserved memory torch's caching allocator
model gives for the true sequence, with default settings and with expandable segments.
"""

from __future__ import annotations

import contextlib
import time

from pydantic import BaseModel

from memplan.allocator import AllocatorSettings, AllocatorStats, replay
from memplan.job import Job
from memplan.phases import PhaseName
from memplan.results import Category


class PhaseSnapshot(BaseModel):
    iteration: int
    phase: PhaseName
    peak_bytes: int
    end_bytes: int
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int

    def bytes_by_category(self) -> dict[Category, int]:
        """What the trace attributes at the phase's end, in the estimate's categories."""
        return {Category.weights: self.params_bytes, Category.gradients: self.grads_bytes,
                Category.optimizer: self.optimizer_bytes}


class TraceResult(BaseModel):
    job: Job
    peak_allocated_bytes: int
    peak_phase: PhaseName
    timeline: list[PhaseSnapshot]
    seconds: float
    # planner/allocator.py replayed over the trace's allocation sequence (None where no sequence was
    # recorded: the sharded trace, other stacks' traces)
    allocator: AllocatorStats | None = None  # default PYTORCH_CUDA_ALLOC_CONF
    allocator_expandable: AllocatorStats | None = None  # expandable_segments:True
    events: int | None = None  # events in the sequence
    allocations: int | None = None  # of them, allocations


def replayed(events: list[tuple] | None) -> dict:
    """The TraceResult fields of the allocator model replayed over `events`, both settings (none
    when the trace did not record its sequence)."""
    if events is None:
        return {}
    return dict(allocator=replay(events), allocator_expandable=replay(events, AllocatorSettings(expandable_segments=True)),
                events=len(events), allocations=sum(1 for e in events if e[0] == "alloc"))


@contextlib.contextmanager
def _unmaterialised_causal_mask():
    """Under fake tensors transformers treats every tensor as traced and builds an explicit 4D mask
    (masking_utils: is_tracing -> no `is_causal` skip). A real unpadded batch gets no mask and SDPA
    runs with is_causal=True, so the trace reproduces that."""
    from transformers import masking_utils as mu

    saved = mu._ignore_causal_mask_sdpa, mu.find_packed_sequence_indices

    def ignore(padding_mask, *args, **kwargs):
        return saved[0](None, *args, **kwargs)

    mu._ignore_causal_mask_sdpa = ignore
    mu.find_packed_sequence_indices = lambda *a, **k: None
    try:
        yield
    finally:
        mu._ignore_causal_mask_sdpa, mu.find_packed_sequence_indices = saved


def refusal(job: Job, arch) -> str | None:
    """Why the trace cannot run `job` as described, in one line; None when it can."""
    if arch.experts and job.base_weight_dtype.value != "bf16":
        # transformers integrations/moe.py takes torch's grouped_mm on the CPU for every dtype, and
        # torch 2.13's meta_grouped_mm accepts bf16 inputs only ("Expected inputs of BF16 type")
        return f"{arch.name}'s grouped_mm experts run in bf16 only (torch meta_grouped_mm): trace it with bf16 weights"
    if job.kv_cache_dtype in ("int4", "int8"):
        return "int4/int8 KV caches cannot be traced: quanto and HQQ are not installed (derived, docs/quantization.md)"
    if getattr(arch, "quantization", None) is not None and not arch.quantization.dequantize:
        return "pre-quantized checkpoints cannot be traced: their quantized linears need gptqmodel / triton kernels"
    if job.quantized:
        return "4-bit and 8-bit bases cannot be traced: bitsandbytes Params4bit does not run under fake tensors"
    if job.attention == "flash_attention_2":
        return "flash_attention_2 cannot be traced: flash-attn has no CPU build (its memory is derived, docs/activations.md)"
    if job.liger:
        return "Liger kernels cannot be traced: they are Triton-only, with no CPU path (derived instead, docs/liger.md)"
    if job.activation_offloading:
        return "activation offloading cannot be traced: it needs CUDA streams (derived instead, docs/offload.md)"
    if job.packing:
        return "packed rows are not traced: the trace runs one unpacked sequence per row"
    if job.task == "infer" and job.engine == "vllm":
        return ("vLLM cannot be traced: it does not install here; its KV budget is derived from its source "
                "(memplan estimate --engine vllm, docs/serving.md)")
    if job.task == "infer" and job.sharding == "tp":
        return (f"tensor-parallel generation is traced by its own harness: python -m memplan.validate.tensor_parallel "
                f"{job.num_gpus} --generate '<Job JSON>' (a fake process group; docs/tensor-parallel.md)")
    if job.task == "infer" and job.sharding == "device_map":
        return "accelerate's layer split cannot be traced on one CPU device (its placement is checked exactly: docs/device-map.md)"
    if job.task == "train" and job.optimizer not in ("adamw", "sgd", "sgd_momentum"):
        return f"optimizer {job.optimizer!r} cannot be traced: bitsandbytes optimizers need real tensors"
    return None


def _refuse(job: Job) -> None:
    from memplan.profiles import load_model

    why = refusal(job, load_model(job.model))
    if why:
        raise ValueError(why)


def trace_training(job: Job, iterations: int = 2, allocator: bool = False) -> TraceResult:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memplan.profiles import load_model

    from .models import training_meta_model
    from .step import PHASES, forward_context, make_optimizer, run_phase
    from .tracker import LiveBytes

    _refuse(job)
    started = time.perf_counter()
    arch = load_model(job.model)
    model = training_meta_model(job, arch)
    tracker = LiveBytes(record=allocator)  # `allocator`: record the sequence and replay it
    timeline: list[PhaseSnapshot] = []
    with FakeTensorMode(allow_non_fake_inputs=True), _unmaterialised_causal_mask():
        model = model.to_empty(device="cpu")
        model.tie_weights()
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        for p in model.parameters():
            tracker.track(p)
        for b in model.buffers():
            tracker.track(b)
        opt = make_optimizer(job, params)
        ids = torch.randint(0, arch.vocab, (job.micro_batch, job.seq_len))
        with tracker:
            state: dict = {}
            for it in range(iterations):
                for phase in PHASES:
                    tracker.start_phase(phase)
                    with forward_context(job, "cpu") if phase == "forward" else contextlib.nullcontext():
                        run_phase(phase, model, opt, ids, state)
                    timeline.append(_snapshot(tracker, it, phase, tracker.phase_peak, model, opt))
        # the step's sequence: what dies after this (the model, the optimizer) is no part of it
        events = list(tracker.events) if allocator else None
    steady = [s for s in timeline if s.iteration == iterations - 1]
    top = max(steady, key=lambda s: s.peak_bytes)
    return TraceResult(
        job=job,
        peak_allocated_bytes=top.peak_bytes,
        peak_phase=top.phase,
        timeline=timeline,
        seconds=time.perf_counter() - started,
        **replayed(events),
    )


def _snapshot(tracker, iteration, phase, phase_peak, model, opt) -> PhaseSnapshot:
    params = list(model.parameters())
    grads = [p.grad for p in params if p.grad is not None]
    states = [v for st in opt.state.values() for v in st.values() if hasattr(v, "untyped_storage") and v.dim() > 0]
    return PhaseSnapshot(
        iteration=iteration,
        phase=phase,
        peak_bytes=phase_peak,
        end_bytes=tracker.current,
        params_bytes=tracker.bytes_of(params),
        grads_bytes=tracker.bytes_of(grads),
        optimizer_bytes=tracker.bytes_of(states),
    )


def trace_inference(job: Job, allocator: bool = False) -> TraceResult:
    """Prefill of the prompt and `new_tokens` decode steps as generate() runs them (KV cache on,
    logits for the last position only), under no_grad."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memplan.profiles import load_model

    from .models import DTYPES, hf_config, meta_model
    from .step import generation, make_cache
    from .tracker import LiveBytes

    _refuse(job)
    started = time.perf_counter()
    arch = load_model(job.model)
    cfg = hf_config(job.model, job.attention)
    cfg.use_cache = True
    model = meta_model(cfg, DTYPES[job.base_weight_dtype.value])
    tracker = LiveBytes(record=allocator)  # `allocator`: record the sequence and replay it
    timeline: list[PhaseSnapshot] = []
    with FakeTensorMode(allow_non_fake_inputs=True), _unmaterialised_causal_mask(), torch.no_grad():
        model = model.to_empty(device="cpu")
        model.tie_weights()
        model.eval()
        for t in list(model.parameters()) + list(model.buffers()):
            tracker.track(t)
        ids = torch.randint(0, arch.vocab, (job.micro_batch, job.seq_len))
        with tracker:
            tracker.start_phase("prefill")
            for phase in generation(model, ids, job.new_tokens, make_cache(job, model.config)):
                timeline.append(_inference_snapshot(tracker, phase))
                tracker.start_phase("decode")  # the phase after the prefill, if there is one
        events = list(tracker.events) if allocator else None
    top = max(timeline, key=lambda s: s.peak_bytes)
    return TraceResult(job=job, peak_allocated_bytes=top.peak_bytes, peak_phase=top.phase, timeline=timeline,
                       seconds=time.perf_counter() - started, **replayed(events))


def _inference_snapshot(tracker, phase: str) -> PhaseSnapshot:
    return PhaseSnapshot(iteration=0, phase=phase, peak_bytes=tracker.phase_peak, end_bytes=tracker.current,
                         params_bytes=0, grads_bytes=0, optimizer_bytes=0)
