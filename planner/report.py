"""Rich rendering of an Estimate (the CLI's default output)."""

from __future__ import annotations

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from .results import Estimate
from .units import gib, human

BAR_WIDTH = 24
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
        par = f", {job.sharding} on {job.num_gpus} GPUs" if job.num_gpus > 1 or job.sharding != "none" else ""
        off = " with CPU offload" if job.cpu_offload else ""
        what = f"{job.method} training, micro-batch {job.micro_batch}, seq {job.seq_len}, {job.optimizer}{ck}{par}{off}"
    return f"{est.model_name}: {what}, {job.base_weight_dtype.value} weights / {job.compute_dtype.value} compute, {job.attention}"


def breakdown_table(est: Estimate) -> Table:
    table = Table(title=_title(est), title_justify="left", show_lines=False)
    table.add_column("component")
    table.add_column("per GPU", justify="right")
    table.add_column("", no_wrap=True)
    table.add_column("how", overflow="fold")
    largest = max(c.bytes for c in est.components)
    for c in est.components:
        table.add_row(c.name + POOL_LABEL[c.pool], human(c.bytes), _bar(c.bytes, largest), c.formula)
    return table


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
