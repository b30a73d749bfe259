"""`memplan` command line: a thin typer layer over the analytic core.

Every user error becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import atexit
import copy
import gc
import json
import sys
from typing import Optional

import typer
from pydantic import ValidationError

from .errors import MemplanInputError


class _NamedTyper(typer.Typer):
    """Builds only the command named on the command line.

    typer turns the signature of every registered command into click options each time the app
    runs (a cold `memplan estimate` spent 3% of its instructions building the other seven). When
    the first argument names one command, a copy of the app that holds that command alone is built
    as the same group, so parsing, `--help` and usage errors are that command's own; anything else
    (no argument, a group option, an unknown name) builds the whole app as before. Only without
    pretty exceptions and completion, whose hooks typer installs in its own __call__.
    """

    def __call__(self, *args, **kwargs):
        # At exit the interpreter's garbage collector walks every object still alive (pydantic's
        # schemas, typer's and rich's modules: 5% of a cold estimate); frozen objects are skipped.
        atexit.register(gc.freeze)
        argv = args[0] if args else kwargs.get("args")
        argv = sys.argv[1:] if argv is None else list(argv)
        named = [c for c in self.registered_commands
                 if argv and (c.name or typer.main.get_command_name(c.callback.__name__)) == argv[0]]
        if len(named) != 1 or self.pretty_exceptions_enable or getattr(self, "_add_completion", True):
            return super().__call__(*args, **kwargs)
        only = copy.copy(self)
        only.registered_commands = named
        return typer.main.get_group(only)(*args, **kwargs)


app = _NamedTyper(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="GPU memory planner for LLM training and inference.")


def fail(message: str) -> None:
    """Inside a command: the one-line message, then exit code 2 through typer."""
    _print_error(message)
    raise typer.Exit(code=2)


def _print_error(message: str) -> None:
    print(f"memplan: error: {message}", file=sys.stderr)


def validation_message(exc: ValidationError) -> str:
    err = exc.errors()[0]
    msg = err["msg"].removeprefix("Value error, ")
    field = ".".join(str(p) for p in err.get("loc", ()))
    if err.get("type") == "value_error" or not field:
        return msg
    return f"invalid {field.replace('_', '-')} {err.get('input')!r}: {msg}"


def _job(**fields):
    from .job import Job

    return Job(**{k: v for k, v in fields.items() if v is not None})


@app.command()
def estimate(
    model: str = typer.Option(..., "--model", "-m", help="shipped model, alias (falcon-7b), path to a config.json, or a hub id (org/name: its config is fetched once, online)"),
    method: str = typer.Option("full", help="full | lora | qlora"),
    task: str = typer.Option("train", help="train | infer"),
    weight_dtype: Optional[str] = typer.Option(None, help="fp32 | fp16 | bf16 | int8 | nf4 | fp4 (default: nf4 for qlora, else compute dtype)"),
    compute_dtype: str = typer.Option("bf16", help="fp32 | fp16 | bf16"),
    double_quant: bool = typer.Option(True, help="bitsandbytes double quantization of 4-bit absmax"),
    optimizer: str = typer.Option("adamw", help="adamw | adamw_8bit | paged_adamw | paged_adamw_8bit | sgd | sgd_momentum"),
    foreach: bool = typer.Option(True, help="torch AdamW's foreach path (its step allocates a weights-sized temporary)"),
    micro_batch: int = typer.Option(1, "--micro-batch", "-b", help="sequences per GPU per step"),
    seq_len: int = typer.Option(512, "--seq-len", "-s", help="tokens per sequence (prompt length for inference)"),
    new_tokens: int = typer.Option(0, help="inference: tokens generated after the prompt"),
    lora_rank: int = typer.Option(16, "--lora-rank", "-r"),
    lora_alpha: int = typer.Option(32),
    lora_dropout: float = typer.Option(0.0),
    lora_targets: str = typer.Option("default", help="default | all-linear | comma-separated module names"),
    adapter_dtype: str = typer.Option("fp32", help="fp32 | fp16 | bf16: LoRA weights (peft keeps fp32 unless autocast_adapter_dtype=False)"),
    gradient_checkpointing: Optional[bool] = typer.Option(None, help="default: on for qlora, off otherwise"),
    attention: str = typer.Option("sdpa", help="sdpa | eager"),
    kbit_prepare: bool = typer.Option(True, help="peft prepare_model_for_kbit_training (fp32 upcast) for k-bit bases"),
    autocast: Optional[bool] = typer.Option(None, help="forward under torch.autocast, as HF Trainer bf16=True/fp16=True "
                                            "(default: on for fp32 weights with 16-bit compute)"),
    gpu: Optional[str] = typer.Option(None, "--gpu", "-g", help="GPU profile to check the fit against"),
    num_gpus: int = typer.Option(1, "--num-gpus", "-n", help="data-parallel GPUs"),
    sharding: str = typer.Option("none", help="none | ddp | zero1 | zero2 | zero3 | fsdp_full | fsdp_grad_op | fsdp_hybrid"),
    cpu_offload: bool = typer.Option(False, help="offload sharded parameters, gradients and optimizer states to host RAM"),
    gpus_per_node: int = typer.Option(8, help="GPUs per node (fsdp_hybrid shards within a node)"),
    as_json: bool = typer.Option(False, "--json", help="print the Estimate as JSON"),
) -> None:
    """How much memory one GPU needs for a job, component by component, and its peak."""
    from .estimate import estimate_memory
    from memplan.profiles import load_gpu, load_model

    job = _job(
        model=model, method=method, task=task, weight_dtype=weight_dtype, compute_dtype=compute_dtype,
        double_quant=double_quant, optimizer=optimizer, foreach=foreach, micro_batch=micro_batch, seq_len=seq_len,
        new_tokens=new_tokens, lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
        lora_targets=lora_targets, adapter_dtype=adapter_dtype, gradient_checkpointing=gradient_checkpointing, attention=attention,
        kbit_prepare=kbit_prepare, autocast=autocast, gpu=gpu, num_gpus=num_gpus, sharding=sharding,
        cpu_offload=cpu_offload, gpus_per_node=gpus_per_node,
    )
    arch = load_model(job.model)
    est = estimate_memory(job, arch, load_gpu(gpu) if gpu else None)
    if as_json:
        typer.echo(est.model_dump_json(indent=2))
        return
    from .report import console, render

    render(est, console())


def _parse_prices(values: list[str] | None) -> dict[str, float]:
    from memplan.profiles import load_gpu

    prices = {}
    for item in values or []:
        name, sep, usd = item.partition("=")
        try:
            prices[load_gpu(name).name] = float(usd)
        except ValueError:
            fail(f"invalid price {item!r}: use NAME=USD_PER_GPU_HOUR, e.g. H100-80GB=2.49")
        if not sep or prices[load_gpu(name).name] <= 0:
            fail(f"invalid price {item!r}: use NAME=USD_PER_GPU_HOUR with a positive number")
    return prices


@app.command()
def recommend(
    model: str = typer.Option(..., "--model", "-m"),
    method: str = typer.Option("full", help="full | lora | qlora"),
    seq_len: int = typer.Option(2048, "--seq-len", "-s"),
    global_batch: int = typer.Option(32, help="sequences per optimizer step, across GPUs and accumulation"),
    gpus: Optional[str] = typer.Option(None, help="comma-separated GPU profiles to consider (default: all)"),
    max_gpus: int = typer.Option(8, help="largest GPU count to consider"),
    budget: Optional[float] = typer.Option(None, help="most USD per hour for the whole plan"),
    price: Optional[list[str]] = typer.Option(None, help="override an hourly price: NAME=USD (repeatable)"),
    optimizer: str = typer.Option("adamw"),
    weight_dtype: Optional[str] = typer.Option(None),
    lora_rank: int = typer.Option(16, "--lora-rank", "-r"),
    lora_targets: str = typer.Option("default"),
    autocast: Optional[bool] = typer.Option(None, help="forward under torch.autocast (HF Trainer bf16=True)"),
    safety_margin: float = typer.Option(0.05, help="share of each GPU's memory kept free"),
    mfu: Optional[float] = typer.Option(None, help="model FLOPs utilisation for step time and cost (default: measured "
                                        "on H100/H200: 0.16 qlora, 0.37 qlora --autocast, 0.38 otherwise)"),
    top: int = typer.Option(10, help="plans to show"),
    emit: Optional[str] = typer.Option(None, help="accelerate: write a config for the best plan"),
    emit_path: str = typer.Option("accelerate_config.yaml", help="where --emit writes"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """GPU kinds, counts, micro-batch, accumulation, checkpointing and sharding that fit, ranked by cost per million tokens."""
    from memplan.profiles import gpu_names, load_gpu, load_model

    from .recommend import recommend as search

    if global_batch <= 0:
        fail(f"global-batch must be a positive integer, got {global_batch}")
    if max_gpus <= 0:
        fail(f"max-gpus must be a positive integer, got {max_gpus}")
    if not 0 <= safety_margin < 1:
        fail(f"safety-margin must be in [0, 1), got {safety_margin}")
    if mfu is not None and not 0 < mfu <= 1:
        fail(f"mfu must be in (0, 1], got {mfu}")
    if emit not in (None, "accelerate"):
        fail(f"unknown --emit target {emit!r}: allowed: accelerate")
    base = _job(model=model, method=method, seq_len=seq_len, optimizer=optimizer, weight_dtype=weight_dtype,
                lora_rank=lora_rank, lora_targets=lora_targets, autocast=autocast)
    arch = load_model(base.model)
    from .estimate import check_job

    check_job(base, arch)
    kinds = [load_gpu(g.strip()) for g in gpus.split(",")] if gpus else [load_gpu(g) for g in gpu_names()]
    result = search(base, arch, kinds, global_batch, max_gpus, safety_margin, mfu, _parse_prices(price), budget)
    if emit and result.plans:
        from .emit import accelerate_config

        best = result.plans[0]
        from pathlib import Path

        Path(emit_path).write_text(accelerate_config(best.job, arch, best.grad_accum))
    if as_json:
        typer.echo(result.model_dump_json(indent=2))
        return
    from .report import console, recommend_table

    out = console()
    out.print(recommend_table(result, arch.name, top))
    if not result.plans:
        out.print("nothing fits: try more GPUs (--max-gpus), --method lora/qlora, or a shorter --seq-len")
    elif emit:
        out.print(f"accelerate config for the first plan written to {emit_path}")


@app.command()
def fit(
    model: str = typer.Option(..., "--model", "-m"),
    gpu: str = typer.Option(..., "--gpu", "-g"),
    task: str = typer.Option("train", help="train | infer"),
    method: str = typer.Option("full"),
    seq_len: int = typer.Option(2048, "--seq-len", "-s", help="sequence (prompt) length for the batch search"),
    micro_batch: int = typer.Option(1, "--micro-batch", "-b", help="micro-batch for the sequence search"),
    new_tokens: int = typer.Option(0, help="inference: tokens generated after the prompt"),
    optimizer: str = typer.Option("adamw"),
    weight_dtype: Optional[str] = typer.Option(None),
    compute_dtype: str = typer.Option("bf16"),
    gradient_checkpointing: Optional[bool] = typer.Option(None),
    lora_rank: int = typer.Option(16, "--lora-rank", "-r"),
    autocast: Optional[bool] = typer.Option(None, help="forward under torch.autocast (HF Trainer bf16=True)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """The largest micro-batch (batch) and the longest sequence (context) that fit one GPU."""
    from memplan.profiles import load_gpu, load_model

    from .fit import largest
    from .units import gib

    fields = dict(model=model, task=task, method=method, optimizer=optimizer, weight_dtype=weight_dtype,
                  compute_dtype=compute_dtype, gradient_checkpointing=gradient_checkpointing, lora_rank=lora_rank,
                  new_tokens=new_tokens, autocast=autocast)
    arch = load_model(model)
    g = load_gpu(gpu)
    by_batch = largest(_job(**fields, seq_len=min(seq_len, arch.max_positions), micro_batch=1), arch, g, "micro_batch")
    by_seq = largest(_job(**fields, seq_len=1, micro_batch=micro_batch), arch, g, "seq_len")
    if as_json:
        typer.echo(json.dumps({"micro_batch": by_batch.model_dump(), "seq_len": by_seq.model_dump()}, indent=2))
        return
    what = "batch" if task == "infer" else "micro-batch"
    seq = "context" if task == "infer" else "sequence"
    what_job = f"{method} training" if task == "train" else "inference"
    typer.echo(f"{arch.name} {what_job} on {g.name} ({gib(g.memory_bytes)}):")
    if by_batch.largest:
        typer.echo(f"  largest {what} at {min(seq_len, arch.max_positions)} tokens: {by_batch.largest} "
                   f"({gib(by_batch.device_used_bytes)} device used)")
    else:
        typer.echo(f"  not even a {what} of 1 at {seq_len} tokens fits")
    if by_seq.largest:
        capped = " (the model's maximum)" if by_seq.largest == by_seq.limit else ""
        typer.echo(f"  longest {seq} at {what} {micro_batch}: {by_seq.largest} tokens{capped} "
                   f"({gib(by_seq.device_used_bytes)} device used)")
    else:
        typer.echo(f"  not even 1 token at {what} {micro_batch} fits")


@app.command()
def models() -> None:
    """Shipped model profiles and their aliases."""
    from memplan.profiles import ALIASES, load_model
    from .params import count_params

    for alias, hub_id in ALIASES.items():
        arch = load_model(hub_id)
        typer.echo(f"{alias:14s} {hub_id:34s} {arch.family:12s} {count_params(arch).total:>16,} params")


@app.command()
def gpus() -> None:
    """Shipped GPU profiles."""
    from memplan.profiles import gpu_profiles
    from .units import gib

    typer.echo(f"{'GPU':10s} {'memory':>12s} {'16-bit TFLOP/s':>15s} {'USD/h':>7s} {'bf16':>5s}")
    for g in gpu_profiles():
        typer.echo(f"{g.name:10s} {gib(g.memory_bytes):>12s} {g.peak_tflops_16bit:>15,.0f} {g.price_per_hour_usd:>7.2f} "
                   f"{'yes' if g.supports_bf16 else 'no':>5s}")


@app.command()
def trace(
    model: str = typer.Option(..., "--model", "-m"),
    task: str = typer.Option("train", help="train | infer (prefill and decode with the KV cache)"),
    new_tokens: int = typer.Option(0, help="inference: decode steps after the prompt"),
    method: str = typer.Option("full"),
    weight_dtype: Optional[str] = typer.Option(None),
    compute_dtype: str = typer.Option("bf16"),
    optimizer: str = typer.Option("adamw"),
    micro_batch: int = typer.Option(1, "--micro-batch", "-b"),
    seq_len: int = typer.Option(512, "--seq-len", "-s"),
    lora_rank: int = typer.Option(16, "--lora-rank", "-r"),
    lora_dropout: float = typer.Option(0.0),
    lora_targets: str = typer.Option("default"),
    gradient_checkpointing: bool = typer.Option(False),
    attention: str = typer.Option("sdpa"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Run the real transformers training step under fake tensors on the CPU and compare with the estimate."""
    job = _job(
        model=model, task=task, new_tokens=new_tokens, method=method, weight_dtype=weight_dtype,
        compute_dtype=compute_dtype, optimizer=optimizer, micro_batch=micro_batch, seq_len=seq_len,
        lora_rank=lora_rank, lora_dropout=lora_dropout, lora_targets=lora_targets,
        gradient_checkpointing=gradient_checkpointing, attention=attention,
    )
    from .estimate import estimate_memory
    from memplan.profiles import load_model

    arch = load_model(job.model)
    est = estimate_memory(job, arch, platform="cpu")
    try:
        from memplan.validate.trace import trace_inference, trace_training
    except ImportError as exc:
        fail(f"trace needs the trace extra ({exc.name} is missing): pip install 'memplan[trace]'")
    try:
        result = trace_inference(job) if job.task == "infer" else trace_training(job)
    except ValueError as exc:
        fail(str(exc))
    if as_json:
        typer.echo(result.model_dump_json(indent=2))
        return
    from .units import gib

    est_phase = {p.name: p.allocated_bytes for p in est.phases}
    if job.task == "infer":
        typer.echo(f"trace of {arch.name} inference ({result.seconds:.1f} s, CPU, fake tensors):")
        typer.echo(f"{'phase':16s}{'traced peak':>14s}{'estimate':>14s}{'error':>9s}")
        for snap in result.timeline:
            e = est_phase[snap.phase]
            typer.echo(f"{snap.phase:16s}{gib(snap.peak_bytes):>14s}{gib(e):>14s}{100 * (e - snap.peak_bytes) / snap.peak_bytes:>+8.2f}%")
        return
    est_by_trace_phase = {
        "forward": est_phase["forward"],
        "backward": max(est_phase["loss backward"], est_phase["backward"]),
        "optimizer step": est_phase["optimizer step"],
    }
    typer.echo(f"trace of {arch.name} ({result.seconds:.1f} s, CPU, fake tensors); second iteration:")
    typer.echo(f"{'phase':16s}{'traced peak':>14s}{'estimate':>14s}{'error':>9s}")
    for snap in result.timeline:
        if snap.iteration != 1:
            continue
        e = est_by_trace_phase[snap.phase]
        typer.echo(f"{snap.phase:16s}{gib(snap.peak_bytes):>14s}{gib(e):>14s}{100 * (e - snap.peak_bytes) / snap.peak_bytes:>+8.2f}%")
    err = 100 * (est.peak_allocated_bytes - result.peak_allocated_bytes) / result.peak_allocated_bytes
    typer.echo(f"{'peak':16s}{gib(result.peak_allocated_bytes):>14s}{gib(est.peak_allocated_bytes):>14s}{err:>+8.2f}%")
    typer.echo("\nlive at the end of each phase (activations and temporaries = the rest):")
    typer.echo(f"{'iter':>4s} {'phase':16s}{'parameters':>12s}{'gradients':>12s}{'optimizer':>12s}{'the rest':>12s}")
    for snap in result.timeline:
        rest = snap.end_bytes - snap.params_bytes - snap.grads_bytes - snap.optimizer_bytes
        cells = (snap.params_bytes, snap.grads_bytes, snap.optimizer_bytes, rest)
        typer.echo(f"{snap.iteration:>4d} {snap.phase:16s}" + "".join(f"{gib(c):>12s}" for c in cells))


@app.command()
def validate(
    matrix: str = typer.Option("default", help="default (one 80 GB-class GPU) | holdout (jobs the default matrix lacks) | inference (generation and scoring) | quick (tiny models)"),
    model: Optional[list[str]] = typer.Option(None, "--model", "-m", help="only these models (repeatable)"),
    out: Optional[str] = typer.Option(None, help="JSONL file results are appended to (default validate/results/<gpu>-<date>.jsonl)"),
    device: str = typer.Option("cuda", help="cuda | cpu (a dry run of the harness without a GPU)"),
    steps: int = typer.Option(2, help="measured steps after one warm-up step"),
    timeout: float = typer.Option(900, help="seconds per job"),
    jobs_slice: Optional[str] = typer.Option(None, "--slice", help="only jobs START:END of the matrix (0-based, as Python slices)"),
    time_budget: Optional[float] = typer.Option(None, help="start no new job after this many seconds"),
) -> None:
    """Run real training steps on the local GPU, each job in its own process, and compare with the estimate."""
    import shlex
    from datetime import date
    from pathlib import Path

    if device not in ("cuda", "cpu"):
        fail(f"invalid device {device!r}: use cuda or cpu")
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as exc:
        fail(f"validate needs the gpu extra ({exc.name} is missing): pip install 'memplan[gpu]'")
    if device == "cuda" and not torch.cuda.is_available():
        fail("no NVIDIA GPU visible (torch.cuda.is_available() is False): validate needs one, or --device cpu for a dry run")
    from memplan.validate.environment import describe
    from memplan.validate.harness import run_matrix
    from memplan.validate.matrix import MATRICES
    from memplan.validate.compare import calibrate, describe_job, table
    from memplan.profiles import load_gpu

    if matrix not in MATRICES:
        fail(f"unknown matrix {matrix!r}: use {' or '.join(MATRICES)}")
    jobs = [j for j in MATRICES[matrix]() if not model or j.model in model]
    if jobs_slice is not None:
        jobs = jobs[_parse_slice(jobs_slice)]
    if not jobs:
        fail(f"no job of the {matrix} matrix uses {', '.join(model or [])}")
    env = describe(device)
    gpu = _gpu_for(env.get("gpu"), load_gpu) if device == "cuda" else None
    stamp = date.today().isoformat()
    name = (env.get("gpu") or "cpu").replace(" ", "-")
    path = Path(out) if out else Path("validate/results") / f"{name}-{stamp}.jsonl"
    from rich.progress import Progress

    from .report import console as make_console

    console = make_console()
    with Progress(console=console) as progress:
        task = progress.add_task(f"{len(jobs)} jobs on {env.get('gpu') or 'cpu'}", total=len(jobs))

        def report(row):
            progress.console.print(f"{describe_job(row)}: {row.measured.status}")
            progress.advance(task)

        rows = run_matrix(jobs, path, device, gpu, env, steps=steps, timeout_s=timeout, on_result=report,
                          invocation=shlex.join(["memplan", *sys.argv[1:]]), time_budget_s=time_budget)
    if len(rows) < len(jobs):
        console.print(f"time budget of {time_budget:.0f} s spent: ran {len(rows)} of {len(jobs)} jobs; "
                      f"the rest start at --slice {_slice_start(jobs_slice) + len(rows)}:")
    console.print(table(rows))
    cal = calibrate(rows)
    console.print(f"results appended to {path}; median |error|: "
                  + ", ".join(f"{k} {v:.1%}" for k, v in cal.median_abs_error.items()))


def _slice_start(text: str | None) -> int:
    return (_parse_slice(text).start or 0) if text else 0


def _parse_slice(text: str) -> slice:
    parts = text.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        return slice(*(int(p) if p.strip() else None for p in parts))
    except ValueError:
        fail(f"invalid slice {text!r}: use START:END, e.g. 0:12 or 12:")


@app.command()
def compare(
    path: str = typer.Argument(..., help="a validate results .jsonl file"),
    now: bool = typer.Option(False, "--now", help="re-estimate every row with this memplan instead of the recorded prediction"),
) -> None:
    """Predicted against measured for a results file, and the constants it calibrates."""
    from pathlib import Path

    from memplan.validate.compare import calibrate, table
    from memplan.validate.results import read

    from .report import console as make_console

    if not Path(path).is_file():
        fail(f"results file {path!r} does not exist")
    rows = read(Path(path))
    if now:
        from memplan.profiles import load_gpu
        from memplan.validate.harness import predict

        rows = [r.model_copy(update={"predicted": predict(r.job, _gpu_for(r.environment.get("gpu"), load_gpu)
                                                           if r.measured.device == "cuda" else None, r.measured.device)})
                for r in rows]
    console = make_console()
    console.print(table(rows))
    console.print(calibrate(rows).model_dump_json(indent=2))


def _gpu_for(name: str | None, load_gpu):
    """The shipped profile of the local GPU, matched on its marketing name, if there is one."""
    if not name:
        return None
    from memplan.profiles import gpu_names

    for candidate in gpu_names():
        if candidate.split("-")[0].lower() in name.lower():
            return load_gpu(candidate)
    return None


def main() -> None:
    try:
        # with standalone_mode=False click returns a command's typer.Exit code instead of exiting
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except MemplanInputError as exc:
        fail_now(str(exc))
    except ValidationError as exc:
        fail_now(validation_message(exc))
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # click usage errors (bad option, missing value)
        # typer may vendor its own click (typer._click): match the exception classes by name
        kinds = {c.__name__ for c in type(exc).__mro__}
        if "ClickException" in kinds:
            fail_now(exc.format_message().replace("\n", " "))
        if "Abort" in kinds:
            sys.exit(1)
        raise


def fail_now(message: str) -> None:
    """Outside typer (errors raised by the core): the same line, then exit code 2."""
    _print_error(message)
    sys.exit(2)


if __name__ == "__main__":
    main()
