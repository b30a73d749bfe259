"""Advice found by re-estimating: what would save memory for one job (`estimate --explain`), and
the least disruptive change that makes `recommend` find a plan when nothing fits.

Every figure here comes from running the estimator (or the recommend search) again on a changed
Job; nothing is a rule of thumb. Changes the Job refuses (MemplanInputError, e.g. LoRA over a
4-bit base) are skipped rather than reported.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from .architecture import ModelArch
from .dtypes import DType
from .errors import MemplanInputError
from .estimate import estimate_memory
from .gpu import GpuProfile
from .job import Job
from .recommend import GPU_COUNTS, Plan, recommend

SHARD_COUNTS = (2, 4, 8)


class Saving(BaseModel):
    """One change to a job and what it does to device memory per GPU."""

    change: str  # what changes, in words
    flags: str  # the memplan options that make it
    device_used_bytes: int  # after the change
    saved_bytes: int  # before - after (> 0)
    fits: bool | None  # whether the changed job fits the --gpu (None: no GPU given)


class Fragmentation(BaseModel):
    """What the caching allocator holds beyond the peak allocated, and what expandable segments do."""

    slack_bytes: int  # reserved - peak allocated
    device_used_bytes: int
    # the same under expandable_segments:True (None: already on, or no allocation sequence to replay)
    expandable_slack_bytes: int | None
    large: bool  # a tenth or more of the device figure
    replayed: bool  # the slack comes from the allocator model's replay (else a constant share)

    @property
    def saved_bytes(self) -> int:
        return 0 if self.expandable_slack_bytes is None else self.slack_bytes - self.expandable_slack_bytes


# fragmentation worth a sentence of its own: a tenth of what the card holds for the job
LARGE_FRAGMENTATION = 0.10


def fragmentation(job: Job, arch: ModelArch, gpu: GpuProfile | None, est=None) -> Fragmentation:
    est = est or estimate_memory(job, arch, gpu)
    slack = est.peak_reserved_bytes - est.peak_allocated_bytes
    other = None
    # a job with no allocation sequence (est.allocator None) keeps a constant slack: nothing to re-run
    replayed = est.allocator is not None
    if not job.expandable_segments and replayed:
        alt = estimate_memory(job.model_copy(update={"expandable_segments": True}), arch, gpu)
        other = alt.peak_reserved_bytes - alt.peak_allocated_bytes
    return Fragmentation(slack_bytes=slack, device_used_bytes=est.device_used_bytes, expandable_slack_bytes=other,
                         large=slack >= LARGE_FRAGMENTATION * est.device_used_bytes, replayed=replayed)


class Fix(BaseModel):
    """A change to a recommend search that makes at least one plan fit, and the cheapest such plan."""

    change: str
    flags: str
    plan: Plan


class NothingFits(BaseModel):
    """Why a recommend search came back empty and what would change that."""

    # set when plans fit but none within the budget: the cheapest plan per hour without it
    cheapest_over_budget: Plan | None = None
    fixes: list[Fix] = []


def _flag(field: str, value: Any) -> str:
    name = "--" + field.replace("_", "-")
    if isinstance(value, bool):
        return name if value else "--no-" + name[2:]
    return f"{name} {value.value if isinstance(value, DType) else value}"


def _candidates(job: Job, arch: ModelArch) -> list[tuple[str, dict[str, Any]]]:
    """(description, Job update) for every change that could apply to `job`."""
    out: list[tuple[str, dict[str, Any]]] = []
    train = job.task == "train"
    if train and not job.checkpointing:
        out.append(("gradient checkpointing on", {"gradient_checkpointing": True}))
    if train and job.optimizer in ("adamw", "paged_adamw"):
        out.append(("8-bit AdamW (bitsandbytes)", {"optimizer": "adamw_8bit"}))
    if train and job.optimizer == "adamw":
        out.append(("paged AdamW (states in unified memory)", {"optimizer": "paged_adamw"}))
    if train and job.optimizer == "adamw" and job.foreach:
        out.append(("AdamW without foreach (no weights-sized step temporary)", {"foreach": False}))
    if not job.expandable_segments:
        # the caching allocator's own cost: free memory split over segments a request cannot span
        out.append(("PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (one growing range per pool, "
                    "no per-segment fragmentation)", {"expandable_segments": True}))
    if job.micro_batch > 1:
        half = job.micro_batch // 2
        what = (f"micro-batch {half} with 2x gradient accumulation (same tokens per step)" if train
                else f"batch {half}")
        out.append((what, {"micro_batch": half}))
    if train and job.method != "qlora":
        update: dict[str, Any] = {"method": "qlora"}
        if job.weight_dtype is not None:
            update["weight_dtype"] = DType.nf4
        # as on the command line: QLoRA's default turns gradient checkpointing on (kbit prepare)
        ckpt = " (its default turns gradient checkpointing on)" if job.gradient_checkpointing is None and not job.checkpointing else ""
        out.append((f"QLoRA instead of {job.method}{ckpt}", update))
    if train and job.method == "full":
        out.append(("LoRA instead of full fine-tuning", {"method": "lora"}))
    if job.uses_lora and job.lora_targets != "default":
        out.append((f"LoRA on the default targets ({', '.join(arch.default_lora_targets)})", {"lora_targets": "default"}))
    if job.seq_len > 1:
        out.append((f"sequence {job.seq_len // 2} (half)", {"seq_len": job.seq_len // 2}))
    if train:
        sharding = job.sharding if job.sharding in ("zero3", "fsdp_full") else "zero3"
        for n in SHARD_COUNTS:
            if n > job.num_gpus:
                out.append((f"{sharding} over {n} GPUs (per GPU)", {"num_gpus": n, "sharding": sharding}))
    if not train and job.sharding in ("none", "tp"):
        # inference: split the model over more GPUs (planner/tensor_parallel.py refuses a split its
        # heads do not allow; a refused change is skipped)
        for n in SHARD_COUNTS:
            if n > job.num_gpus:
                out.append((f"tensor parallel over {n} GPUs (per GPU)", {"num_gpus": n, "sharding": "tp"}))
    if not train and job.kv_cache_dtype is None and job.new_tokens:
        out.append(("KV cache in int8 (transformers QuantizedCache)" if job.engine == "transformers" else
                    "KV cache in fp8", {"kv_cache_dtype": "int8" if job.engine == "transformers" else "fp8"}))
    if job.attention == "eager":
        out.append(("SDPA attention instead of eager", {"attention": "sdpa"}))
    return out


def what_if(job: Job, arch: ModelArch, gpu: GpuProfile | None = None) -> list[Saving]:
    """The changes that lower this job's device memory per GPU, largest saving first."""
    before = estimate_memory(job, arch, gpu).device_used_bytes
    savings = []
    for change, update in _candidates(job, arch):
        try:
            changed = Job.model_validate({**job.model_dump(), **update})
            after = estimate_memory(changed, arch, gpu)
        except MemplanInputError:
            continue
        if after.device_used_bytes < before:
            savings.append(Saving(change=change, flags=" ".join(_flag(k, v) for k, v in update.items()),
                                  device_used_bytes=after.device_used_bytes,
                                  saved_bytes=before - after.device_used_bytes, fits=after.fits))
    savings.sort(key=lambda s: -s.saved_bytes)
    return savings


def _search(base: Job, arch: ModelArch, gpus: list[GpuProfile], global_batch: int, max_gpus: int, **kw) -> list[Plan]:
    try:
        return recommend(base, arch, gpus, global_batch, max_gpus, **kw).plans
    except MemplanInputError:
        return []


def _cheapest(plans: list[Plan]) -> Plan:
    return min(plans, key=lambda p: (p.usd_per_hour, p.num_gpus))


def nothing_fits(
    base: Job,
    arch: ModelArch,
    gpus: list[GpuProfile],
    global_batch: int,
    max_gpus: int,
    all_gpus: list[GpuProfile],
    safety_margin: float,
    mfu: float | None = None,
    prices: dict[str, float] | None = None,
    budget_usd_per_hour: float | None = None,
    most: int = 3,
) -> NothingFits:
    """For a search that found no plan: the budget, if that is all that stands in the way; otherwise up
    to `most` changes that make a plan fit, least disruptive first, each with its cheapest plan per hour.

    Gradient checkpointing and sharding are not offered: the search already tries them. The order,
    least disruptive first: an 8-bit optimizer (same training, near-identical updates); more GPUs
    of the kinds asked for; another GPU kind; LoRA, then QLoRA (a different kind of training); and
    last a shorter sequence (different data: halved until a plan fits)."""
    kw = dict(safety_margin=safety_margin, mfu=mfu, prices=prices)
    if budget_usd_per_hour is not None:
        plans = _search(base, arch, gpus, global_batch, max_gpus, **kw)
        if plans:
            return NothingFits(cheapest_over_budget=_cheapest(plans))
    fixes: list[Fix] = []

    def add(change: str, flags: str, plans: list[Plan]) -> bool:
        if plans:
            fixes.append(Fix(change=change, flags=flags, plan=_cheapest(plans)))
        return bool(plans)

    if base.optimizer in ("adamw", "paged_adamw"):
        add("8-bit AdamW", "--optimizer adamw_8bit",
            _search(base.model_copy(update={"optimizer": "adamw_8bit"}), arch, gpus, global_batch, max_gpus, **kw))
    for n in GPU_COUNTS:
        if n > max_gpus and add(f"up to {n} GPUs", f"--max-gpus {n}", _search(base, arch, gpus, global_batch, n, **kw)):
            break
    names = {g.name for g in gpus}
    others = [g for g in all_gpus if g.name not in names]
    if others:
        plans = _search(base, arch, others, global_batch, max_gpus, **kw)
        if plans:
            add(f"another GPU kind ({_cheapest(plans).gpu})", f"--gpus {_cheapest(plans).gpu}", plans)
    methods = {"full": ("lora", "qlora"), "lora": ("qlora",)}.get(base.method, ())
    for method in methods:
        update: dict[str, Any] = {"method": method}
        if method == "qlora" and base.weight_dtype is not None:
            update["weight_dtype"] = DType.nf4
        try:
            changed = Job.model_validate({**base.model_dump(), **update})
        except MemplanInputError:
            continue
        if add(f"{'QLoRA' if method == 'qlora' else 'LoRA'} instead of {base.method}",
               " ".join(_flag(k, v) for k, v in update.items()),
               _search(changed, arch, gpus, global_batch, max_gpus, **kw)):
            break
    seq = base.seq_len // 2
    while seq >= 1:
        if add(f"sequence {seq}", f"--seq-len {seq}",
               _search(base.model_copy(update={"seq_len": seq}), arch, gpus, global_batch, max_gpus, **kw)):
            break
        seq //= 2
    return NothingFits(fixes=fixes[:most])
