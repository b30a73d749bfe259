"""The CLI's text output: an Estimate, recommend's plans, and the advice, as plain box-drawn
tables (planner/textable.py; no rich on the estimate's path). `console()` is rich's, for the
validate progress and the compare table only."""

from __future__ import annotations

from .results import Estimate
from .textable import SECTION, Column, paragraph, render as table
from .units import gib, human

BAR_WIDTH = 12
POOL_LABEL = {"torch": "", "unified": " (unified)", "reserved": " (reserved)", "driver": " (driver)"}
PHASE_ABBREV = {"loaded": "ld", "forward": "fw", "loss backward": "lb", "backward": "bw", "optimizer step": "op",
                "prefill": "pf", "decode": "dc", "always": "all"}


def _bar(n: int, largest: int) -> str:
    filled = round(BAR_WIDTH * n / largest) if largest else 0
    return "█" * filled + "·" * (BAR_WIDTH - filled)


def _title(est: Estimate) -> str:
    job = est.job
    if job.task == "infer":
        what = f"inference, batch {job.micro_batch}, {job.seq_len} prompt + {job.new_tokens} new tokens"
    else:
        ck = ", gradient checkpointing" if job.checkpointing else ""
        gpus = "1 GPU" if job.num_gpus == 1 else f"{job.num_gpus} GPUs"
        par = f", {job.sharding} on {gpus}" if job.num_gpus > 1 or job.sharding != "none" else ""
        if job.fsdp:
            par += f" (FSDP{job.fsdp_version})"
        off = " with CPU offload" if job.cpu_offload else ""
        what = f"{job.method} training, micro-batch {job.micro_batch}, seq {job.seq_len}, {job.optimizer}{ck}{par}{off}"
    # under autocast the matmuls run in the compute dtype whatever the weights' dtype: say so
    compute = f"{job.compute_dtype.value} autocast" if job.runs_autocast else f"{job.compute_dtype.value} compute"
    if job.fsdp_mp:
        form = "accelerate's mixed precision" if job.fsdp_mixed_precision == "accelerate" else "MixedPrecisionPolicy"
        red = "fp32" if job.fsdp_mixed_precision == "policy" else job.compute_dtype.value
        compute = f"gathered in {job.compute_dtype.value}, reduced in {red} ({form})" + (
            ", under autocast" if job.runs_autocast else "")
    elif job.deepspeed_mp:
        compute = f"DeepSpeed's {job.compute_dtype.value} mode"
    weights = f"{est.weights_label} weights" if est.weights_label else f"{job.base_weight_dtype.value} weights"
    return (f"{est.model_name}: {what}, {weights} / {compute}, {job.attention}; "
            f"on {est.stack} (--stack {job.stack})" + (f"; GPU {est.gpu} ({est.gpu_card})" if est.gpu else ""))


def _live_in(c) -> str:
    return " ".join(PHASE_ABBREV.get(p, p) for p in c.phases)


def breakdown_table(est: Estimate) -> str:
    """Every row with its bytes at the peak phase and at its own largest: the torch rows add up to
    the peak allocated, and with the rows outside torch's pool to the device figure."""
    at_peak = {c.name: b for c, b in est.at_phase(est.peak_phase)}
    largest = max(at_peak.values(), default=0)
    rows: list[list[str] | None] = []
    for c in est.components:
        if c.pool == "torch":
            b = at_peak.get(c.name, 0)
            rows.append([c.name, human(b) if b else "-", human(c.bytes), _bar(b, largest), _live_in(c), c.formula])
    rows += [SECTION, ["= peak torch allocated", gib(est.peak_allocated_bytes), "", "", "",
                       f"sum of the rows above at {est.peak_phase}"], SECTION]
    for c in est.components:
        if c.pool != "torch":
            rows.append([c.name + POOL_LABEL[c.pool], human(c.bytes), human(c.bytes), _bar(c.bytes, largest),
                         _live_in(c), c.formula])
    rows += [SECTION, ["= device used (pynvml)", gib(est.device_used_bytes), "", "", "", "peak allocated + the rows above"]]
    phases = {p.name for p in est.phases} | {"always"}
    caption = (f"at peak: at the high point of {est.peak_phase}; live in: "
               + ", ".join(f"{v} {k}" for k, v in PHASE_ABBREV.items() if k in phases))
    columns = [Column("component"), Column("at peak", right=True), Column("largest", right=True), Column(""),
               Column("live in"), Column("how", wrap=True)]
    return table(columns, rows, title=_title(est), caption=caption)


def phase_table(est: Estimate) -> str:
    rows = [[p.name + (" (peak)" if p.name == est.peak_phase else ""), gib(p.allocated_bytes), p.detail]
            for p in est.phases]
    return table([Column("phase"), Column("allocated", right=True), Column("what is live", wrap=True)], rows,
                 title="torch-allocated bytes by phase")


def summary(est: Estimate) -> str:
    lines = [f"Peak torch allocated  {gib(est.peak_allocated_bytes)}  ({est.peak_phase})",
             f"Peak torch reserved   {gib(est.peak_reserved_bytes)}",
             f"Device used (pynvml)  {gib(est.device_used_bytes)}" + (" per GPU" if est.job.num_gpus > 1 else "")]
    if est.required_bytes and est.required_bytes < est.device_used_bytes - 2**20:
        # cached segments a smaller card would have the allocator release before an OOM
        lines.append(f"Needs at least        {gib(est.required_bytes)}  (the allocator gives back cached segments "
                     "and retries before an out-of-memory error)")
    if est.host_bytes:
        lines.append(f"Host RAM (offload)    {gib(est.host_bytes)} per GPU")
    if est.gpu:
        head = est.gpu_memory_bytes - est.device_used_bytes
        verdict = f"fits, headroom {gib(head)}" if est.fits else f"does not fit, short by {gib(-head)}"
        lines.append(f"{est.gpu} ({gib(est.gpu_memory_bytes)}): {verdict}")
    lines += [paragraph(f"note: {note}") for note in est.notes]
    return "\n".join(lines)


def render(est: Estimate) -> str:
    parts = [breakdown_table(est), phase_table(est), summary(est)]
    if est.placement is not None:
        parts.append(placement_table(est.placement))
    return "\n".join(parts)


def placement_table(pl) -> str:
    """--sharding device_map: where accelerate puts the model, and every GPU's own figures."""
    from .layer_split import layer_runs

    how = "max_memory from each card's memory less its CUDA context" if pl.max_memory_derived else "--max-memory"
    title = (f"device_map={pl.strategy} placement ({how}; {gib(pl.reserve_bytes)} kept on GPU 0 for the largest "
             f"layer while placing); busiest GPU {pl.busiest}")
    names = ("device", "decoder layers", "other modules", "weights", "KV cache", "peak allocated", "device used",
             "max_memory", "fits")
    columns = [Column(n, right=n in ("weights", "KV cache", "peak allocated", "device used", "max_memory"),
                      wrap=n == "other modules") for n in names]
    rows = []
    for sh in pl.shares:
        gpu = sh.device.isdigit()
        rows.append([("GPU " + sh.device) if gpu else sh.device, layer_runs(sh.layers), ", ".join(sh.modules) or "-",
                     gib(sh.weights_bytes), gib(sh.kv_cache_bytes) if gpu else "-",
                     gib(sh.peak_allocated_bytes) if gpu else "-", gib(sh.device_used_bytes) if gpu else "-",
                     gib(sh.budget_bytes) if sh.budget_bytes is not None else "-",
                     {True: "yes", False: "no", None: "-"}[sh.fits]])
    return table(columns, rows, title=title)


def console():
    """rich's console, wide enough when piped (rich falls back to 80 columns): validate and compare."""
    from rich.console import Console

    c = Console()
    return c if c.is_terminal else Console(width=130)


def recommend_table(result, model_name: str, top: int) -> str:
    title = (f"{model_name}: plans that fit with {result.safety_margin:.0%} headroom, global batch {result.global_batch} x "
             f"{result.seq_len} tokens, ranked by cost (MFU {result.mfu:.0%}; communication not modelled)")
    names = ("GPU", "GPUs", "sharding", "micro-batch", "accum", "ckpt", "dtype", "device used / GPU", "step s",
             "USD / 1M tok", "USD / h")
    columns = [Column(n, right=n not in ("GPU", "sharding", "dtype")) for n in names]
    rows = [[p.gpu, str(p.num_gpus), p.sharding, str(p.micro_batch), str(p.grad_accum),
             "yes" if p.gradient_checkpointing else "no", p.compute_dtype,
             f"{gib(p.device_used_bytes)} of {gib(p.gpu_memory_bytes).removesuffix(' GiB')}",
             f"{p.step_seconds:,.2f}", f"{p.usd_per_million_tokens:,.3f}", f"{p.usd_per_hour:,.2f}"]
            for p in result.plans[:top]]
    return table(columns, rows, title=title)


def serving_text(sv, model_name: str, gpu_name: str, seq_len: int) -> str:
    """estimate --engine vllm (planner/serve.py): vLLM's start-up accounting for one GPU, then its KV cache."""
    c = sv.config
    tp = f", tensor parallel {c.tensor_parallel_size}" if c.tensor_parallel_size > 1 else ""
    title = (f"{model_name} served by vLLM 0.33 on {gpu_name}{tp}: max-model-len {c.max_model_len:,}, max-num-seqs "
             f"{c.max_num_seqs}, max-num-batched-tokens {c.max_num_batched_tokens:,}, block {c.block_size}, KV "
             f"{c.kv_element_bytes} B/element (per GPU)")
    graphs = ("not captured (--enforce-eager)" if not c.cudagraphs else
              f"{len(c.capture_sizes)} sizes up to {max(c.capture_sizes)} tokens: approximated, not measured"
              + ("" if c.estimate_cudagraphs else "; not taken off the budget"))
    rows = [
        ["card memory", gib(sv.total_bytes), "torch.cuda.mem_get_info total"],
        ["requested", gib(sv.requested_bytes), f"ceil(total x gpu-memory-utilization {c.gpu_memory_utilization})"],
        ["weights", "- " + gib(sv.weights_bytes), "this GPU's parameters and buffers"],
        ["activation peak", "- " + gib(sv.activation_peak_bytes),
         f"profile run: forward over {c.max_num_batched_tokens:,} tokens {gib(sv.forward_peak_bytes)}, sampler "
         f"{gib(sv.sampler_peak_bytes)} (derived{'' if sv.activation_derived else ', dense formula'})"],
        ["CUDA graphs", "- " + gib(sv.cudagraph_applied_bytes), graphs],
        ["non-torch memory", "- " + gib(sv.non_torch_bytes), "kernels and libraries loaded after the start-up snapshot"],
        ["KV cache budget", gib(max(sv.kv_budget_bytes, 0)), "what is left for blocks"],
    ]
    out = [table([Column("term"), Column("bytes", right=True), Column("how", wrap=True)], rows, title=title)]
    out.append(f"KV cache: {sv.num_blocks:,} blocks x {c.block_size} tokens = {sv.kv_capacity_tokens:,} tokens "
               f"({human(sv.bytes_per_block)} per block: {human(sv.page_bytes_per_layer)} per layer)")
    if sv.fits:
        out.append(f"maximum concurrency for {c.max_model_len:,}-token requests: {sv.max_concurrency:.2f}x; sequences of "
                   f"{seq_len:,} tokens at once: {sv.concurrent_sequences(min(seq_len, c.max_model_len)):,}"
                   f" (max-num-seqs {c.max_num_seqs})")
    else:
        out.append(paragraph(f"vLLM would refuse to start: {sv.error}"))
    out += [paragraph("note: " + n) for n in sv.notes]
    return "\n".join(out)


def inference_plans_table(result, model_name: str, top: int) -> str:
    """recommend --task infer (planner/recommend_inference.py)."""
    fit = ("vLLM starts with and whose KV blocks hold every sequence" if result.engine == "vllm" else
           f"fit with {result.safety_margin:.0%} headroom")
    title = (f"{model_name}: inference plans that {fit}, {result.sequences} "
             f"sequence(s) x ({result.prompt} prompt + {result.new_tokens} new tokens), ranked by cost per 1M generated "
             f"tokens (decode bandwidth-bound, prefill at {result.utilisation:.0%} of peak; all-reduce not modelled)")
    if not result.plans:
        why = "".join(f"\n  {k}: {v}" for k, v in list(result.refused.items())[:5])
        return f"{title}\nnothing fits{why}"
    names = ("GPU", "GPUs", "split", "dtype", "device used / GPU", "KV / GPU", "prefill s", "step ms", "tok/s",
             "USD / 1M tok", "USD / h")
    columns = [Column(n, right=n not in ("GPU", "split", "dtype")) for n in names]
    rows = [[p.gpu, str(p.num_gpus), "tensor parallel" if p.sharding == "tp" else "one GPU", p.compute_dtype,
             f"{gib(p.device_used_bytes)} of {gib(p.gpu_memory_bytes).removesuffix(' GiB')}", gib(p.kv_cache_bytes),
             f"{p.prefill_seconds:,.2f}", f"{p.decode_step_seconds * 1e3:,.1f}", f"{p.tokens_per_second:,.0f}",
             f"{p.usd_per_million_tokens:,.3f}", f"{p.usd_per_hour:,.2f}"]
            for p in result.plans[:top]]
    return table(columns, rows, title=title)


def fragmentation_line(frag) -> str:
    """`estimate --explain`: the allocator's share of the device figure, and what expandable segments change."""
    share = frag.slack_bytes / frag.device_used_bytes if frag.device_used_bytes else 0
    text = (f"caching allocator: reserves {gib(frag.slack_bytes)} beyond the peak allocated, {share:.0%} of the "
            "device figure" + (" (large: freed blocks split over segments that later, larger requests cannot use)"
                               if frag.large else ""))
    if frag.expandable_slack_bytes is None and not frag.replayed:
        text += " (a constant share of the peak: no allocation sequence is derived for this job, docs/allocator.md)"
    elif frag.expandable_slack_bytes is not None:
        text += (f"; with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (--expandable-segments) it would be "
                 f"{gib(frag.expandable_slack_bytes)}, saving {gib(frag.saved_bytes)}")
    return paragraph(text)


def savings_table(savings, est: Estimate) -> str:
    """`estimate --explain`: each change re-estimated, largest saving first (planner/advice.py)."""
    per = " per GPU" if est.job.num_gpus > 1 else ""
    if not savings:
        return "what would save memory: no single change in memplan's list lowers this job's device memory"
    columns = [Column("change", wrap=True), Column("options"), Column("saves", right=True),
               Column("device used", right=True)]
    if est.gpu:
        columns.append(Column(f"fits {est.gpu}"))
    rows = []
    for s in savings:
        row = [s.change, s.flags, gib(s.saved_bytes), gib(s.device_used_bytes)]
        if est.gpu:
            row.append("yes" if s.fits else "no")
        rows.append(row)
    return table(columns, rows,
                 title=f"what would save memory (each change re-estimated; device used now {gib(est.device_used_bytes)}{per})")


def _plan_brief(p) -> str:
    shard = f"{p.sharding}, " if p.sharding != "none" else ""
    return f"{shard}{p.num_gpus} x {p.gpu}, ${p.usd_per_hour:,.2f}/h"


def nothing_fits_text(advice, gpu_names: list[str], max_gpus: int, budget: float | None) -> str:
    """`recommend` when no plan fits: the budget's cheapest alternative, or the changes that would fit (planner/advice.py)."""
    cheapest = advice.cheapest_over_budget
    if cheapest is not None:
        return paragraph(f"no plan within ${budget:,.2f}/h; the cheapest plan that fits costs "
                         f"${cheapest.usd_per_hour:,.2f}/h ({cheapest.num_gpus} x {cheapest.gpu})")
    kinds = ", ".join(gpu_names) if len(gpu_names) <= 3 else f"any of {len(gpu_names)} GPU kinds"
    counts = "1" if max_gpus == 1 else f"1-{max_gpus}"
    text = f"nothing fits {counts} x {kinds}"
    if budget is not None:
        text += f" (even without the ${budget:,.2f}/h budget)"
    if not advice.fixes:
        text += ("; no single change memplan tries (more GPUs, another GPU kind, an 8-bit optimizer, LoRA/QLoRA, "
                 "shorter sequences) makes a plan fit")
    else:
        text += "; would fit: " + ", or ".join(f"{f.flags} ({_plan_brief(f.plan)})" for f in advice.fixes)
    return paragraph(text)


def stacks_table(estimates: dict[str, "Estimate | str"]) -> str:
    """One job under several stacks, side by side: allocated bytes per phase, the peak and the
    device figure; a stack that cannot run the job shows why."""
    names = list(estimates)
    ok = [e for e in estimates.values() if not isinstance(e, str)]
    phases = list(dict.fromkeys(p.name for e in ok for p in e.phases))
    rows: list[list[str] | None] = []
    for ph in phases:
        rows.append([ph] + [gib(next(p.allocated_bytes for p in e.phases if p.name == ph))
                            if not isinstance(e, str) else "-" for e in estimates.values()])
    rows += [SECTION, ["peak allocated"] + [gib(e.peak_allocated_bytes) if not isinstance(e, str) else "-"
                                            for e in estimates.values()],
             ["device used (pynvml)"] + [gib(e.device_used_bytes) if not isinstance(e, str) else "-"
                                         for e in estimates.values()]]
    first = ok[0] if ok else None
    title = f"{first.model_name}: the same job on each stack" if first else "the same job on each stack"
    out = table([Column("phase")] + [Column(n, right=True) for n in names], rows, title=title)
    why = [f"{n}: {e}" for n, e in estimates.items() if isinstance(e, str)]
    labels = [f"{n}: {e.stack}" for n, e in estimates.items() if not isinstance(e, str)]
    return "\n".join([out, *labels, *(f"not run: {w}" for w in why)])


def gpus_table(profiles) -> str:
    """`memplan gpus`: every shipped GPU profile, its memory as the driver reports it (GiB), and where
    each figure comes from."""
    columns = [Column("GPU"), Column("vendor"), Column("memory", right=True), Column("source"),
               Column("datasheet", wrap=True), Column("16-bit TFLOP/s", right=True), Column("TB/s", right=True),
               Column("bf16"), Column("USD/h", right=True), Column("aliases", wrap=True)]
    rows = []
    for g in sorted(profiles, key=lambda g: (g.vendor != "nvidia", g.memory_bytes, g.name)):
        basis = "measured" if g.memory_source.startswith("measured") else "recalled"
        rows.append([g.name, g.vendor, gib(g.memory_bytes), basis, g.datasheet.split(": ", 1)[-1], f"{g.peak_tflops_16bit:,.0f}",
                     f"{g.memory_bandwidth_bytes_per_s / 1e12:.2f}", "yes" if g.supports_bf16 else "no",
                     f"{g.price_per_hour_usd:.2f}", ", ".join(g.aliases + g.shared_names)])
    return table(columns, rows, title="GPU profiles: memory as the driver reports it (profiles/gpus.json says where each "
                                      "figure comes from; recalled: from the vendor's datasheet or nvidia-smi as remembered, "
                                      "no network); any other card: --gpu 48GiB")


def models_table(models) -> str:
    """`memplan models`: (hub id, aliases, family, parameter count) of every shipped model."""
    columns = [Column("model"), Column("aliases", wrap=True), Column("family"), Column("parameters", right=True)]
    rows = [[hub_id, ", ".join(aliases) or "-", family, f"{params / 1e9:,.2f}B ({params:,})"]
            for hub_id, aliases, family, params in models]
    return table(columns, rows, title=f"{len(rows)} shipped models (profiles/models; any other: a config.json path or hub id)")
