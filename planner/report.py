"""Rich rendering of an Estimate (the CLI's default output)."""

from __future__ import annotations

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from .results import Estimate
from .units import gib, human

BAR_WIDTH = 12
POOL_LABEL = {"torch": "", "unified": " (unified)", "reserved": " (reserved)", "driver": " (driver)"}


def _bar(n: int, largest: int) -> Text:
    filled = round(BAR_WIDTH * n / largest) if largest else 0
    return Text("█" * filled + "·" * (BAR_WIDTH - filled), style="cyan")


def _title(est: Estimate) -> str:
    job = est.job
    if job.task == "infer":
        what = f"inference, batch {job.micro_batch}, {job.seq_len} prompt + {job.new_tokens} new tokens"
    else:
        ck = ", gradient checkpointing" if job.checkpointing else ""
        gpus = "1 GPU" if job.num_gpus == 1 else f"{job.num_gpus} GPUs"
        par = f", {job.sharding} on {gpus}" if job.num_gpus > 1 or job.sharding != "none" else ""
        off = " with CPU offload" if job.cpu_offload else ""
        what = f"{job.method} training, micro-batch {job.micro_batch}, seq {job.seq_len}, {job.optimizer}{ck}{par}{off}"
    # under autocast the matmuls run in the compute dtype whatever the weights' dtype: say so
    compute = f"{job.compute_dtype.value} autocast" if job.runs_autocast else f"{job.compute_dtype.value} compute"
    return f"{est.model_name}: {what}, {job.base_weight_dtype.value} weights / {compute}, {job.attention}"


PHASE_ABBREV = {"loaded": "ld", "forward": "fw", "loss backward": "lb", "backward": "bw", "optimizer step": "op",
                "prefill": "pf", "decode": "dc", "always": "all"}


def breakdown_table(est: Estimate) -> Table:
    """Every row with its bytes at the peak phase and at its own largest: the torch rows add up to
    the peak allocated, and with the rows outside torch's pool to the device figure."""
    table = Table(title=_title(est), title_justify="left", show_lines=False,
                  caption=f"at peak: at the high point of {est.peak_phase}; live in: "
                          + ", ".join(f"{v} {k}" for k, v in PHASE_ABBREV.items() if k in _phase_names(est)),
                  caption_justify="left")
    table.add_column("component")
    table.add_column("at peak", justify="right")
    table.add_column("largest", justify="right")
    table.add_column("", no_wrap=True)
    table.add_column("live in", no_wrap=True)
    table.add_column("how", overflow="fold")
    at_peak = {c.name: b for c, b in est.at_phase(est.peak_phase)}
    outside = [c for c in est.components if c.pool != "torch"]
    largest = max(at_peak.values(), default=0)
    for c in est.components:
        if c.pool != "torch":
            continue
        b = at_peak.get(c.name, 0)
        table.add_row(c.name, human(b) if b else "-", human(c.bytes), _bar(b, largest),
                      " ".join(PHASE_ABBREV.get(p, p) for p in c.phases), c.formula)
    table.add_section()
    table.add_row("= peak torch allocated", gib(est.peak_allocated_bytes), "", "", "", f"sum of the rows above at {est.peak_phase}",
                  style="bold")
    table.add_section()
    for c in outside:
        table.add_row(c.name + POOL_LABEL[c.pool], human(c.bytes), human(c.bytes), _bar(c.bytes, largest),
                      " ".join(PHASE_ABBREV.get(p, p) for p in c.phases), c.formula)
    table.add_section()
    table.add_row("= device used (pynvml)", gib(est.device_used_bytes), "", "", "", "peak allocated + the rows above",
                  style="bold")
    return table


def _phase_names(est: Estimate) -> set[str]:
    return {p.name for p in est.phases} | {"always"}


def phase_table(est: Estimate) -> Table:
    table = Table(title="torch-allocated bytes by phase", title_justify="left")
    table.add_column("phase")
    table.add_column("allocated", justify="right")
    table.add_column("what is live", overflow="fold")
    for p in est.phases:
        style = "bold" if p.name == est.peak_phase else ""
        table.add_row(p.name + (" (peak)" if p.name == est.peak_phase else ""), gib(p.allocated_bytes), p.detail, style=style)
    return table


def summary(est: Estimate) -> Text:
    t = Text()
    t.append(f"Peak torch allocated  {gib(est.peak_allocated_bytes)}  ({est.peak_phase})\n", style="bold")
    t.append(f"Peak torch reserved   {gib(est.peak_reserved_bytes)}\n")
    t.append(f"Device used (pynvml)  {gib(est.device_used_bytes)}" + (" per GPU" if est.job.num_gpus > 1 else "") + "\n", style="bold")
    if est.host_bytes:
        t.append(f"Host RAM (offload)    {gib(est.host_bytes)} per GPU\n")
    if est.gpu:
        head = est.gpu_memory_bytes - est.device_used_bytes
        verdict = ("fits", "green") if est.fits else ("does not fit", "red")
        t.append(f"{est.gpu} ({gib(est.gpu_memory_bytes)}): ")
        t.append(verdict[0], style=f"bold {verdict[1]}")
        t.append(f", headroom {gib(head)}\n" if est.fits else f", short by {gib(-head)}\n")
    for note in est.notes:
        t.append(f"note: {note}\n", style="yellow")
    return t


class _Console(Console):
    """rich looks for :name: emoji codes in every string it renders, importing a 3,600-name table the
    first time (1.5% of a cold `memplan estimate`); a string with fewer than two colons holds no
    code, so it skips the lookup and renders the same."""

    def render_str(self, text: str, *, emoji: bool | None = None, **kwargs) -> Text:
        if emoji is None and text.count(":") < 2:
            emoji = False
        return super().render_str(text, emoji=emoji, **kwargs)


def console() -> Console:
    """Wide enough for the formulas when output is piped (rich falls back to 80 columns)."""
    c = _Console()
    return c if c.is_terminal else _Console(width=130)


def render(est: Estimate, console: Console) -> None:
    console.print(Group(breakdown_table(est), phase_table(est), summary(est)))


def recommend_table(result, model_name: str, top: int) -> Table:
    t = Table(
        title=f"{model_name}: plans that fit with {result.safety_margin:.0%} headroom, global batch {result.global_batch} x "
        f"{result.seq_len} tokens, ranked by cost (MFU {result.mfu:.0%}; communication not modelled)",
        title_justify="left",
    )
    for col in ("GPU", "GPUs", "sharding", "micro-batch", "accum", "ckpt", "dtype", "device used / GPU", "step s",
                "USD / 1M tok", "USD / h"):
        t.add_column(col, justify="right" if col not in ("GPU", "sharding", "dtype") else "left")
    for p in result.plans[:top]:
        t.add_row(p.gpu, str(p.num_gpus), p.sharding, str(p.micro_batch), str(p.grad_accum),
                  "yes" if p.gradient_checkpointing else "no", p.compute_dtype,
                  f"{gib(p.device_used_bytes)} of {gib(p.gpu_memory_bytes).removesuffix(' GiB')}",
                  f"{p.step_seconds:,.2f}", f"{p.usd_per_million_tokens:,.3f}", f"{p.usd_per_hour:,.2f}")
    return t


def savings_table(savings, est: Estimate) -> Table | Text:
    """`estimate --explain`: each change re-estimated, largest saving first (planner/advice.py)."""
    per = " per GPU" if est.job.num_gpus > 1 else ""
    if not savings:
        return Text("what would save memory: no single change in memplan's list lowers this job's device memory\n")
    t = Table(title=f"what would save memory (each change re-estimated; device used now {gib(est.device_used_bytes)}{per})",
              title_justify="left")
    t.add_column("change")
    t.add_column("options", overflow="fold")
    t.add_column("saves", justify="right")
    t.add_column("device used", justify="right")
    if est.gpu:
        t.add_column(f"fits {est.gpu}")
    for s in savings:
        row = [s.change, s.flags, gib(s.saved_bytes), gib(s.device_used_bytes)]
        if est.gpu:
            row.append(Text("yes", style="green") if s.fits else Text("no", style="red"))
        t.add_row(*row)
    return t


def _plan_brief(p) -> str:
    shard = f"{p.sharding}, " if p.sharding != "none" else ""
    return f"{shard}{p.num_gpus} x {p.gpu}, ${p.usd_per_hour:,.2f}/h"


def nothing_fits_text(advice, gpu_names: list[str], max_gpus: int, budget: float | None) -> Text:
    """`recommend` when no plan fits: the budget's cheapest alternative, or the changes that would fit (planner/advice.py)."""
    t = Text()
    cheapest = advice.cheapest_over_budget
    if cheapest is not None:
        t.append(f"no plan within ${budget:,.2f}/h; the cheapest plan that fits costs ${cheapest.usd_per_hour:,.2f}/h "
                 f"({cheapest.num_gpus} x {cheapest.gpu})", style="bold")
        return t
    kinds = ", ".join(gpu_names) if len(gpu_names) <= 3 else f"any of {len(gpu_names)} GPU kinds"
    counts = "1" if max_gpus == 1 else f"1-{max_gpus}"
    t.append(f"nothing fits {counts} x {kinds}", style="bold red")
    if budget is not None:
        t.append(f" (even without the ${budget:,.2f}/h budget)")
    if not advice.fixes:
        t.append("; no single change memplan tries (more GPUs, another GPU kind, an 8-bit optimizer, LoRA/QLoRA, "
                 "shorter sequences) makes a plan fit")
        return t
    t.append("; would fit: ")
    t.append(", or ".join(f"{f.flags} ({_plan_brief(f.plan)})" for f in advice.fixes))
    return t
