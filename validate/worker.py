"""One job, measured, in its own process: `python -m memplan.validate.worker --job '<Job JSON>'`.

A training job runs training steps (forward, backward, optimizer step); an inference job runs
generations (prefill of the prompt, then `new_tokens` decode steps with the KV cache).

Prints one JSON line (a Measurement) as its last line of stdout. Out-of-memory is a result
(status "oom"), not a crash. On "cuda": torch.cuda peak allocated and reserved after a warm-up
step (reset_peak_memory_stats), and the pynvml peak sampled during the measured steps. On "cpu"
(no GPU: tests and dry runs) the peak allocated figure comes from the live-storage tracker on real
tensors, and `--capacity-bytes` makes allocations beyond it fail the way a full GPU does.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from typing import Literal

from pydantic import BaseModel

from memplan.phases import PhaseName

from memplan.job import Job

# the variable the harness sets per row; torch also reads PYTORCH_ALLOC_CONF, but only when this one is
# unset (c10/cuda/CUDAAllocatorConfig.h `instance()`), and the harness folds that one into this one
ALLOC_CONF = "PYTORCH_CUDA_ALLOC_CONF"


class AllocatorMeasured(BaseModel):
    """The caching allocator's segment picture from torch.cuda.memory_stats(), in the names of
    memplan.allocator.AllocatorStats where it has one, to hold that model to. Peaks are over the
    measured steps (the worker resets peaks at each phase's end, so they are folded over phases);
    counts and `num_*` are at the end of the measured steps, the counters over the whole process."""

    segments: int | None = None  # segment.all.current
    peak_segments: int | None = None  # segment.all.peak
    small_pool_segments: int | None = None  # segment.small_pool.current
    large_pool_segments: int | None = None  # segment.large_pool.current
    peak_reserved_small_pool_bytes: int | None = None  # reserved_bytes.small_pool.peak
    peak_reserved_large_pool_bytes: int | None = None  # reserved_bytes.large_pool.peak
    # inactive_split_bytes.all.peak: the highest free-inside-split-segments figure at any moment,
    # not AllocatorStats.inactive_split_bytes_at_peak (the figure at the reserved peak)
    peak_inactive_split_bytes: int | None = None
    peak_active_bytes: int | None = None  # active_bytes.all.peak
    num_alloc_retries: int | None = None  # cudaMalloc failed, cache released, retried
    num_ooms: int | None = None
    # what torch says is in force (private APIs, so None where this torch lacks them)
    settings: str | None = None  # torch._C._accelerator_getAllocatorSettings(): the conf torch parsed
    backend: str | None = None  # torch.cuda.get_allocator_backend(): "native" or "cudaMallocAsync"
    current_allocator: str | None = None  # type of torch.cuda.memory._get_current_allocator()'s allocator


class Measurement(BaseModel):
    status: Literal["ok", "oom", "error"]
    device: str
    steps: int
    peak_allocated_bytes: int | None = None
    peak_reserved_bytes: int | None = None
    device_used_bytes: int | None = None  # pynvml peak minus what was in use before this process
    cuda_context_bytes: int | None = None
    model_bytes: int | None = None  # allocated right after the model is built
    state_bytes: int | None = None  # allocated between steps: weights, adapters, optimizer states
    # highest allocated in each measured phase (memplan.phases.MEASURED_*), over the measured steps
    phase_peak_allocated_bytes: dict[PhaseName, int] = {}
    step_seconds: float | None = None  # median wall time of a measured step (synchronised)
    seconds: float = 0.0
    error: str | None = None
    # PYTORCH_CUDA_ALLOC_CONF as this process read it (None: unset); the harness sets it per row
    # (validate/harness.py worker_env), so a results file can hold both allocator settings
    alloc_conf: str | None = None
    allocator: AllocatorMeasured | None = None  # on cuda only; rows written before it have none


# memory_stats() keys whose peak the worker folds over the measured phases, and the field each fills
_PEAK_KEYS = {
    "segment.all.peak": "peak_segments",
    "reserved_bytes.small_pool.peak": "peak_reserved_small_pool_bytes",
    "reserved_bytes.large_pool.peak": "peak_reserved_large_pool_bytes",
    "inactive_split_bytes.all.peak": "peak_inactive_split_bytes",
    "active_bytes.all.peak": "peak_active_bytes",
}
# read once, at the end of the measured steps
_END_KEYS = {
    "segment.all.current": "segments",
    "segment.small_pool.current": "small_pool_segments",
    "segment.large_pool.current": "large_pool_segments",
    "num_alloc_retries": "num_alloc_retries",
    "num_ooms": "num_ooms",
}


def fold_peaks(acc: dict[str, int], stats: dict) -> dict[str, int]:
    """`acc` with each peak of `stats` (one torch.cuda.memory_stats() read) folded in by max: the
    worker reads them before each reset_peak_memory_stats(), which zeroes them all."""
    for key in _PEAK_KEYS:
        if key in stats:
            acc[key] = max(acc.get(key, 0), int(stats[key]))
    return acc


def allocator_measured(peaks: dict[str, int], final: dict, settings: dict[str, str | None]) -> AllocatorMeasured:
    """The row's allocator figures: `peaks` folded over the measured phases (fold_peaks), `final`
    the memory_stats() at the end (whose own peaks cover the time since the last reset), `settings`
    what torch says is in force (`_allocator_in_force`)."""
    peaks = fold_peaks(dict(peaks), final)
    fields = {field: peaks[key] for key, field in _PEAK_KEYS.items() if key in peaks}
    fields |= {field: int(final[key]) for key, field in _END_KEYS.items() if key in final}
    return AllocatorMeasured(**fields, **settings)


def _allocator_in_force() -> dict[str, str | None]:
    """What torch reports of its allocator. Each call is private or recent API, so each is guarded:
    a torch without one records None, not a failed row."""
    import torch

    out: dict[str, str | None] = {"settings": None, "backend": None, "current_allocator": None}
    with contextlib.suppress(Exception):
        out["settings"] = torch._C._accelerator_getAllocatorSettings()
    with contextlib.suppress(Exception):
        get = getattr(torch.cuda, "get_allocator_backend", None) or torch._C._cuda_getAllocatorBackend
        out["backend"] = get()
    with contextlib.suppress(Exception):
        out["current_allocator"] = type(torch.cuda.memory._get_current_allocator().allocator()).__name__
    return out


class _CpuMeter:
    """Real-tensor accounting on the CPU, with an optional capacity that raises like a full GPU."""

    def __init__(self, capacity: int | None) -> None:
        from .tracker import LiveBytes

        class Capped(LiveBytes):
            def __torch_dispatch__(inner, func, types, args=(), kwargs=None):
                out = super().__torch_dispatch__(func, types, args, kwargs)
                if capacity is not None and inner.current > capacity:
                    import torch

                    raise torch.OutOfMemoryError(
                        f"simulated capacity of {capacity} bytes exceeded: {inner.current} bytes live"
                    )
                return out

        self.tracker = Capped()

    def track_model(self, model, opt=None) -> None:
        for t in _model_tensors(model):
            self.tracker.track(t)
        if opt is not None:  # states created in the warm-up step, before the tracker was active
            for state in opt.state.values():
                for v in state.values():
                    if hasattr(v, "untyped_storage"):
                        self.tracker.track(v)


def _model_tensors(model):
    from .tracker import local

    for p in model.parameters():
        yield local(p)  # a sharded (FSDP2 DTensor) parameter: this rank's shard
        qs = getattr(p, "quant_state", None)
        for t in _quant_state_tensors(qs):
            yield t
    yield from model.buffers()


def _quant_state_tensors(qs):
    if qs is None:
        return
    for name in ("absmax", "code", "offset"):
        t = getattr(qs, name, None)
        if t is not None and hasattr(t, "untyped_storage"):
            yield t
    yield from _quant_state_tensors(getattr(qs, "state2", None))


def model_bytes(model) -> int:
    """Bytes of every parameter, buffer and bitsandbytes quantization statistic of a model."""
    seen = {}
    for t in _model_tensors(model):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def measure(job: Job, device: str, steps: int = 2, warmup: int = 1, capacity: int | None = None) -> Measurement:
    import torch

    from memplan.profiles import load_model

    from .build import build

    started = time.perf_counter()
    result = Measurement(status="ok", device=device, steps=steps, alloc_conf=os.environ.get(ALLOC_CONF))
    sampler = None
    baseline = 0
    if device == "cuda":
        from .sampler import NvmlPeak

        sampler = NvmlPeak()
        baseline = sampler.used()
        torch.cuda.init()
        torch.empty(0, device="cuda")
        result.cuda_context_bytes = sampler.used() - baseline
    meter = _CpuMeter(capacity) if device == "cpu" else None
    arch = load_model(job.model)
    group = contextlib.ExitStack()
    if is_sharded(job):
        # rank 0 of the job through torch.distributed's fake backend: real allocations on this one
        # device, every collective a no-op (validate/sharded.py)
        from .sharded import fake_process_group

        if device == "cuda":
            torch.cuda.set_device(0)
        group.enter_context(fake_process_group(job.num_gpus))
    phase_peaks = result.phase_peak_allocated_bytes
    peaks = {"reserved": 0}
    alloc_peaks: dict[str, int] = {}  # memory_stats() peaks over the measured phases (fold_peaks)
    step_times: list[float] = []
    try:
        if is_sharded(job):
            from .sharded import build_sharded, init_weights

            model, _ = build_sharded(job, arch, device, init=init_weights)
            if device == "cuda":
                torch.cuda.empty_cache()  # FSDP1 wraps a model built whole on the device: hand its memory back
        else:
            model = build(job, arch, device)
        result.model_bytes = torch.cuda.memory_allocated() if device == "cuda" else model_bytes(model)
        ids = torch.randint(0, arch.vocab, (job.micro_batch, job.seq_len), device=device)
        opt, one_step = (_training_step if job.task == "train" else _generation)(job, model, ids, device)

        def step(measured: bool) -> None:
            t0 = time.perf_counter()
            for phase in one_step():
                if measured and device == "cuda":
                    # the allocator's peak is kept on the host as it allocates: no synchronisation needed
                    phase_peaks[phase] = max(phase_peaks.get(phase, 0), torch.cuda.max_memory_allocated())
                    peaks["reserved"] = max(peaks["reserved"], torch.cuda.max_memory_reserved())
                    fold_peaks(alloc_peaks, torch.cuda.memory_stats())
                    torch.cuda.reset_peak_memory_stats()
            if measured and device == "cuda":
                torch.cuda.synchronize()
                step_times.append(time.perf_counter() - t0)

        for _ in range(warmup):
            step(False)
        if meter:
            meter.track_model(model, opt)
        if device == "cuda":
            torch.cuda.synchronize()
            result.state_bytes = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            sampler.start()
        elif meter:
            meter.tracker.start_phase("measured")
        with meter.tracker if meter else contextlib.nullcontext():
            for _ in range(steps):
                step(True)
        if device == "cuda":
            torch.cuda.synchronize()
            result.step_seconds = sorted(step_times)[len(step_times) // 2] if step_times else None
    except torch.OutOfMemoryError as exc:
        result.status = "oom"
        result.error = str(exc).splitlines()[0][:300]
    except Exception as exc:  # recorded, so one broken job does not stop the matrix
        result.status = "error"
        result.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    group.close()
    if device == "cuda":
        # phases reset the peak as they end; what is left covers a phase cut short by an error
        result.peak_allocated_bytes = max([torch.cuda.max_memory_allocated(), *phase_peaks.values()])
        result.peak_reserved_bytes = max(torch.cuda.max_memory_reserved(), peaks["reserved"])
        result.device_used_bytes = (sampler.stop() if sampler._thread else sampler.used()) - baseline
        with contextlib.suppress(Exception):  # the figures above stand without these
            result.allocator = allocator_measured(alloc_peaks, torch.cuda.memory_stats(), _allocator_in_force())
    elif meter:
        result.peak_allocated_bytes = meter.tracker.phase_peak
    result.seconds = time.perf_counter() - started
    return result


def is_sharded(job: Job) -> bool:
    """A sharded training job: measured as its rank 0 (validate/sharded.py)."""
    return job.task == "train" and job.num_gpus > 1 and job.sharding.startswith("fsdp")


def _training_step(job: Job, model, ids, device: str):
    """The optimizer, and one training step that yields each phase's name as it ends."""
    from .step import PHASES, forward_context, make_optimizer, run_phase

    opt = make_optimizer(job, [p for p in model.parameters() if p.requires_grad])
    state: dict = {}
    # a sharded model carries its own autocast in its forward, as accelerate wraps it (sharded.py)
    autocast = (lambda: contextlib.nullcontext()) if is_sharded(job) else (lambda: forward_context(job, device))

    def one_step():
        for phase in PHASES:
            with autocast() if phase == "forward" else contextlib.nullcontext():
                run_phase(phase, model, opt, ids, state)
            yield phase

    return opt, one_step


def _generation(job: Job, model, ids, device: str):
    """No optimizer, and one generation (prefill, then the new tokens) that yields each phase's name."""
    import torch

    from .step import generation, make_cache

    def one_step():
        with torch.no_grad():
            yield from generation(model, ids, job.new_tokens, make_cache(job, model.config))

    return None, one_step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--job", required=True, help="Job as JSON")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--capacity-bytes", type=int, default=None)
    args = parser.parse_args(argv)
    # the worker's stdout ends in the Measurement line the harness parses; keep library chatter off
    # stderr, where the harness quotes the last lines of a failed worker
    from .quiet import quiet_libraries

    quiet_libraries()
    job = Job.model_validate_json(args.job)
    m = measure(job, args.device, args.steps, args.warmup, args.capacity_bytes)
    sys.stdout.write("\n" + m.model_dump_json() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
