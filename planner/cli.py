"""`memplan` command line: a thin typer layer over the analytic core.

Exit codes a script can use: 0 success (the job fits), 1 it does not fit, 2 bad input (one line on
stderr naming the bad value and what is allowed), 3 an internal error (one line; MEMPLAN_DEBUG=1
prints the traceback), 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import atexit
import copy
import functools
import gc
import inspect
import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Optional

import typer
from pydantic import ValidationError

from .errors import MemplanInputError, validation_message
from .gpu import DEFAULT_SAFETY_MARGIN
from .job import Job


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

EXIT_DOES_NOT_FIT = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


def fail(message: str) -> None:
    """Inside a command: the one-line message, then exit code 2 through typer."""
    _print_error(message)
    raise typer.Exit(code=EXIT_BAD_INPUT)


def _print_error(message: str) -> None:
    print(f"memplan: error: {message}", file=sys.stderr)


def _job(**fields):
    """The Job of the options given; the stack, when not given, is the installed one (resolved here,
    never in the core)."""
    if fields.get("stack") is None:
        from .stacks.installed import default_stack

        fields["stack"] = default_stack()
    return Job(**{k: v for k, v in fields.items() if v is not None})


def _load_model(name: str, revision: str | None = None):
    """The model profile, at a hub revision when one is given."""
    from memplan.profiles import load_model

    return load_model(name, revision=revision) if revision else load_model(name)


FROM_HELP = ("your training config (axolotl, HF TrainingArguments / TRL SFTConfig, litgpt, torchtune; YAML or JSON, "
             "or a DeepSpeed JSON): the job is read from it, options given here override it")
FROM_FORMAT_HELP = "the --from file's format when its keys do not tell: axolotl | hf | litgpt | torchtune | deepspeed"


def _from_config(path: str | None, fmt: str | None, model: str | None, cli: dict, searched: tuple[str, ...] = (),
                 why: str = "searched by this command"):
    """The Job fields of `--from FILE` with the command line's `cli` on top (and `model`), and the
    report of how its keys were read (None without --from); planner/config_files.py does the work."""
    if path is None:
        if fmt is not None:
            fail("--from-format applies to a --from FILE: give one")
        if model is None:
            fail("Missing option '--model' / '-m'")
        return {"model": model, **cli}, None
    from .config_files import job_from_file

    return job_from_file(path, fmt, model, cli, searched, why)


ACCELERATE_HELP = ("an `accelerate launch` config (YAML or JSON, as `accelerate config` writes it): its sharding, "
                   "fsdp_version, processes, offload, mixed precision and activation checkpointing fill the job; "
                   "options given here override it")


def _with_accelerate_config(path: str, fields: dict, typed: dict, revision: str | None,
                            for_trace: bool = False) -> tuple[dict, dict]:
    """`--accelerate-config FILE`: its Job fields under the options typed here (and over a --from
    file's), and the report of what it set (planner/config_files.py reads it)."""
    from .config_files import read_accelerate_file

    arch = _load_model(fields["model"], revision)
    read = read_accelerate_file(path, arch, for_trace=for_trace, method=fields.get("method", "full"))
    if typed.get("fsdp_mixed_precision") == "policy" and read.fields.get("autocast"):
        fail(f"--fsdp-mixed-precision policy runs without autocast, but {path}'s mixed_precision "
             f"{read.fields['compute_dtype']} runs the forward under autocast (accelerate accelerator.py:1824): "
             "set mixed_precision: no there and pass the policy in your script")
    used = {k: v for k, v in read.fields.items() if k not in typed}
    notes = list(read.notes)
    sharding = typed.get("sharding")
    # a strategy typed here takes the file's keys that belong to its own strategy with it
    if sharding is not None and not sharding.startswith("fsdp") and "fsdp_version" in used:
        del used["fsdp_version"]
        notes.append(f"fsdp_version not passed: --sharding {sharding} is not FSDP")
    if sharding in ("none", "ddp", "fsdp_grad_op") and used.get("cpu_offload") is False:
        del used["cpu_offload"]
    report = {"file": path, "used": used, "overridden": sorted(k for k in read.fields if k in typed),
              "notes": notes}
    return {**fields, **used}, report


def _print_accelerate_config(report: dict | None) -> None:
    """What the --accelerate-config file set, on stderr."""
    if report is not None:
        used = ", ".join(f"{k}={v}" for k, v in report["used"].items()) or "nothing"
        over = f" (overridden here: {', '.join(report['overridden'])})" if report["overridden"] else ""
        lines = [f"accelerate config {report['file']}: {used}{over}"] + [f"  note: {n}" for n in report["notes"]]
        print("\n".join(lines), file=sys.stderr)


def _print_from_config(report: dict | None) -> None:
    """How the --from file was read, on stderr (stdout stays the command's own output)."""
    if report is not None:
        from .config_files import describe

        print(describe(report), file=sys.stderr)


def _typed_options() -> set[str]:
    """The parameters of the running command given on the command line (not left at their defaults)."""
    try:
        from typer._click.globals import get_current_context
    except ImportError:  # a typer that uses click itself
        from click import get_current_context
    ctx = get_current_context()
    return {name for name in ctx.params
            if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")}


@dataclass(frozen=True)
class _JobOption:
    annotation: Any
    decls: tuple[str, ...]
    help: str
    default_text: str | None = None  # for fields whose Job default (None) means "depends on the job"


# The Job's options, declared once: estimate and trace take them all (@job_options), fit and
# recommend the subset they search over (job_option). Every default is None, so the Job receives
# only what the user typed and its own default applies otherwise (shown in the help from Job's
# fields): the Job refuses an option its task or method never reads, which it could not do if the
# CLI passed its defaults.
JOB_OPTIONS: dict[str, _JobOption] = {
    "stack": _JobOption(Optional[str], ("--stack",), "transformers-5 | transformers-4 | litgpt | torchtune: the software "
                        "the job runs on", "the installed transformers' major version, else transformers-5"),
    "method": _JobOption(Optional[str], ("--method",), "full | lora | qlora"),
    "task": _JobOption(Optional[str], ("--task",), "train | infer"),
    "weight_dtype": _JobOption(Optional[str], ("--weight-dtype",), "fp32 | fp16 | bf16 | int8 | nf4 | fp4",
                               "nf4 for qlora, else the compute dtype"),
    "compute_dtype": _JobOption(Optional[str], ("--compute-dtype",), "fp32 | fp16 | bf16"),
    "double_quant": _JobOption(Optional[bool], ("--double-quant/--no-double-quant",),
                               "bitsandbytes double quantization of 4-bit absmax"),
    "optimizer": _JobOption(Optional[str], ("--optimizer",),
                            "adamw | adamw_8bit | paged_adamw | paged_adamw_8bit | sgd | sgd_momentum"),
    "foreach": _JobOption(Optional[bool], ("--foreach/--no-foreach",),
                          "torch AdamW's foreach path (its step allocates a weights-sized temporary)"),
    "micro_batch": _JobOption(Optional[int], ("--micro-batch", "-b"), "sequences per GPU per step"),
    "seq_len": _JobOption(Optional[int], ("--seq-len", "-s"), "tokens per sequence (prompt length for inference)"),
    "new_tokens": _JobOption(Optional[int], ("--new-tokens",), "inference: tokens generated after the prompt"),
    # (planner/inference.py)
    "kv_cache_dtype": _JobOption(Optional[str], ("--kv-cache-dtype",),
                                 "inference: int4 | int8 (transformers QuantizedCache, quanto/HQQ) | fp8 "
                                 "(QuantizedCache backend fp8)", "the compute dtype"),
    "cache_implementation": _JobOption(Optional[str], ("--cache-implementation",),
                                       "inference: dynamic (DynamicCache) | static (StaticCache, preallocated)"),
    "lora_rank": _JobOption(Optional[int], ("--lora-rank", "-r"), "LoRA rank r"),
    "lora_alpha": _JobOption(Optional[int], ("--lora-alpha",), "LoRA alpha"),
    "lora_dropout": _JobOption(Optional[float], ("--lora-dropout",), "LoRA dropout (> 0 keeps a dropout copy of each input)"),
    "lora_targets": _JobOption(Optional[str], ("--lora-targets",), "default | all-linear | comma-separated module names"),
    "dora": _JobOption(Optional[bool], ("--dora/--no-dora",), "DoRA (peft use_dora=True): a magnitude vector per target"),
    "adapter_dtype": _JobOption(Optional[str], ("--adapter-dtype",),
                                "fp32 | fp16 | bf16: LoRA weights (peft keeps fp32 unless autocast_adapter_dtype=False)"),
    "gradient_checkpointing": _JobOption(Optional[bool], ("--gradient-checkpointing/--no-gradient-checkpointing",),
                                         "HF gradient checkpointing", "on for qlora, off otherwise"),
    "checkpoint_reentrant": _JobOption(Optional[bool], ("--checkpoint-reentrant/--no-checkpoint-reentrant",),
                                       "gradient_checkpointing_kwargs use_reentrant", "the stack's: 4.x on, 5.x off"),
    "attention": _JobOption(Optional[str], ("--attention",), "sdpa | eager | flash_attention_2 (attn_implementation)"),
    "liger": _JobOption(Optional[bool], ("--liger/--no-liger",),
                        "Liger kernels (use_liger_kernel=True): fused linear cross-entropy, RMSNorm, SwiGLU, RoPE"),
    "activation_offloading": _JobOption(Optional[bool], ("--activation-offloading/--no-activation-offloading",),
                                        "saved activations offloaded to pinned host RAM (TRL, torchtune)"),
    "optimizer_in_backward": _JobOption(Optional[bool], ("--optimizer-in-backward/--no-optimizer-in-backward",),
                                        "torchtune optimizer_in_bwd: each parameter stepped as its gradient arrives"),
    "chunked_loss": _JobOption(Optional[int], ("--chunked-loss",),
                               "output chunks of a chunked cross-entropy (torchtune CEWithChunkedOutputLoss: 8); 0 off"),
    "packing": _JobOption(Optional[bool], ("--packing/--no-packing",),
                          "several sequences packed per row (TRL packing/padding_free, axolotl sample_packing)"),
    "kbit_prepare": _JobOption(Optional[bool], ("--kbit-prepare/--no-kbit-prepare",),
                               "peft prepare_model_for_kbit_training (fp32 upcast) for k-bit bases"),
    "autocast": _JobOption(Optional[bool], ("--autocast/--no-autocast",),
                           "forward under torch.autocast, as HF Trainer bf16=True/fp16=True",
                           "on for fp32 weights with 16-bit compute"),
    "expandable_segments": _JobOption(Optional[bool], ("--expandable-segments/--no-expandable-segments",),
                                      "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True: the caching allocator grows "
                                      "one range per pool instead of a segment per cudaMalloc (planner/allocator.py)"),
    "gpu": _JobOption(Optional[str], ("--gpu", "-g"), "GPU profile to check the fit against", "none"),
    "num_gpus": _JobOption(Optional[int], ("--num-gpus", "-n"), "GPUs: data-parallel ranks in training; in "
                           "inference the GPUs --sharding tp or device_map splits the model over"),
    "sharding": _JobOption(Optional[str], ("--sharding",),
                           "training: none | ddp | zero1 | zero2 | zero3 | fsdp_full | fsdp_grad_op | fsdp_hybrid; "
                           "inference: tp (tensor parallel) | device_map (accelerate's layer split)"),
    "engine": _JobOption(Optional[str], ("--engine",), "inference: transformers (generate()) | vllm (vLLM 0.33's "
                         "engine: paged KV cache, planner/serving.py)"),
    "gpu_memory_utilization": _JobOption(Optional[float], ("--gpu-memory-utilization",),
                                         "--engine vllm: the share of the card vLLM may take", "0.92, vLLM's"),
    "max_model_len": _JobOption(Optional[int], ("--max-model-len",), "--engine vllm: longest request (prompt + "
                                "output)", "the model's maximum positions"),
    "max_num_seqs": _JobOption(Optional[int], ("--max-num-seqs",), "--engine vllm: sequences scheduled together",
                               "vLLM's for the card"),
    "max_num_batched_tokens": _JobOption(Optional[int], ("--max-num-batched-tokens",),
                                         "--engine vllm: tokens per scheduler step (the profiled forward's)",
                                         "vLLM's for the card"),
    "block_size": _JobOption(Optional[int], ("--block-size",), "--engine vllm: tokens per KV-cache block", "16"),
    "enforce_eager": _JobOption(Optional[bool], ("--enforce-eager/--no-enforce-eager",),
                                "--engine vllm: no CUDA graphs"),
    "device_map": _JobOption(Optional[str], ("--device-map",), "--sharding device_map: auto | balanced | "
                             "balanced_low_0 | sequential (from_pretrained device_map=)", "auto"),
    "max_memory": _JobOption(Optional[str], ("--max-memory",), "--sharding device_map: accelerate's max_memory, one "
                             "figure per GPU (40GiB,80GiB; GiB = 2^30 B, GB = 10^9 B)", "each card's memory"),
    "cpu_offload": _JobOption(Optional[bool], ("--cpu-offload/--no-cpu-offload",),
                              "offload sharded parameters, gradients and optimizer states to host RAM"),
    "gpus_per_node": _JobOption(Optional[int], ("--gpus-per-node",), "GPUs per node (fsdp_hybrid shards within a node)"),
    "fsdp_version": _JobOption(Optional[int], ("--fsdp-version",),
                               "2 (fully_shard) | 1 (FullyShardedDataParallel), as accelerate's fsdp_version"),
    "fsdp_mixed_precision": _JobOption(Optional[str], ("--fsdp-mixed-precision",),
                                       "accelerate (mixed_precision bf16: param and reduce bf16, autocast) | policy "
                                       "(MixedPrecisionPolicy param bf16, reduce fp32, no autocast): fp32 weights under FSDP"),
}
# What the CPU trace takes but cannot run, and why (one line each): it checks no GPU's fit, and host
# offload lands on the same device as the trace. A sharded job (--num-gpus > 1, fsdp_*) is traced as
# its rank 0 (validate/sharded.py).
TRACE_REFUSED = {
    "gpu": "trace --gpu: the trace runs on the CPU and checks no GPU's fit; use memplan estimate --gpu",
    "cpu_offload": "trace --cpu-offload: on the CPU the offloaded states land on the device the trace runs on, so "
                   "the trace equals the one without offload (the estimate derives offload: docs/offload.md)",
}


def _default_text(name: str) -> str:
    spec = JOB_OPTIONS[name]
    if spec.default_text:
        return spec.default_text
    default = Job.model_fields[name].default
    if isinstance(default, bool):
        return "on" if default else "off"
    return str(getattr(default, "value", default))


def job_option(name: str, default: Any = None, **overrides: Any):
    """The typer Option for Job field `name`; a command whose own body needs a value (fit's task)
    passes its default, and the help then shows that one."""
    spec = JOB_OPTIONS[name]
    shown = _default_text(name) if default is None else (
        ("on" if default else "off") if isinstance(default, bool) else str(default))
    help_text = overrides.pop("help", spec.help)
    return typer.Option(default, *spec.decls, help=f"{help_text} (default: {shown})", show_default=False, **overrides)


def job_options(*names: str):
    """Add the Job options `names` to a command; it receives those the user gave as `job_fields`."""
    def decorate(command):
        sig = inspect.signature(command, eval_str=True)
        own = [p for p in sig.parameters.values() if p.name != "job_fields"]
        added = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=job_option(n),
                                   annotation=JOB_OPTIONS[n].annotation) for n in names]

        @functools.wraps(command)
        def wrapper(**kwargs):
            fields = {n: kwargs.pop(n) for n in names}
            return command(**kwargs, job_fields={k: v for k, v in fields.items() if v is not None})

        params = [*own, *added]
        wrapper.__signature__ = sig.replace(parameters=params)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper

    return decorate


MODEL_HELP = ("shipped model, alias (falcon-7b), path to a config.json, or a hub id (org/name: its config is "
              "fetched once, online)")
REVISION_HELP = "hub revision (branch, tag or commit) of a hub model's config.json (default: main)"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"memplan {_installed_version()}")
        raise typer.Exit()


def _installed_version() -> str:
    """The installed distribution's version; memplan.__version__ for a source tree run without installing."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("memplan")
    except PackageNotFoundError:
        from memplan import __version__

        return __version__


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version and exit"),
) -> None:
    """GPU memory planner for LLM training and inference."""


@app.command()
@job_options(*JOB_OPTIONS)
def estimate(
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP + " (required without --from)"),
    from_file: Optional[str] = typer.Option(None, "--from", help=FROM_HELP),
    from_format: Optional[str] = typer.Option(None, "--from-format", help=FROM_FORMAT_HELP),
    accelerate_file: Optional[str] = typer.Option(None, "--accelerate-config", help=ACCELERATE_HELP),
    revision: Optional[str] = typer.Option(None, help=REVISION_HELP),
    as_json: bool = typer.Option(False, "--json", help="print the Estimate as JSON"),
    explain: bool = typer.Option(False, "--explain", help="list the changes that would save the most memory, each "
                                 "re-estimated (shown anyway when the job does not fit its --gpu)"),
    *,
    job_fields: dict,
) -> None:
    """How much memory one GPU needs for a job, component by component, and its peak.

    Exit code 0 when the job fits its --gpu (or none is given), 1 when it does not."""
    from .estimate import estimate_memory
    from memplan.profiles import load_gpu

    fields, from_config = _from_config(from_file, from_format, model, job_fields)
    accel = None
    if accelerate_file is not None:
        fields, accel = _with_accelerate_config(accelerate_file, fields, job_fields, revision)
    job = _job(**fields)
    arch = _load_model(job.model, revision)
    g = load_gpu(job.gpu) if job.gpu else None
    if job.engine == "vllm":
        return _serve(job, arch, g, as_json, explain)
    est = estimate_memory(job, arch, g)
    extra = {"from_config": from_config} if from_config else {}
    if accel is not None:
        extra["accelerate_config"] = accel
    # --json stays an Estimate; the advice is an extra key only when asked for
    savings = None
    if explain or (est.fits is False and not as_json):
        from .advice import what_if  # (the search modules stay off the plain estimate's path)

        savings = what_if(job, arch, g)
    if as_json and savings is None and not extra:
        typer.echo(est.model_dump_json(indent=2))
    elif as_json:
        what_if = {"what_if": [s.model_dump(mode="json") for s in savings]} if savings is not None else {}
        typer.echo(json.dumps(est.model_dump(mode="json") | what_if | extra, indent=2))
    else:
        from .report import render, savings_table

        _print_from_config(from_config)
        _print_accelerate_config(accel)
        typer.echo(render(est))
        if savings is not None:
            from .advice import fragmentation
            from .report import fragmentation_line

            typer.echo(fragmentation_line(fragmentation(job, arch, g, est)))
            typer.echo(savings_table(savings, est))
    if est.fits is False:
        raise typer.Exit(code=EXIT_DOES_NOT_FIT)


def _serve(job, arch, gpu, as_json: bool, explain: bool) -> None:
    """estimate --engine vllm: vLLM's KV-cache budget in place of generate()'s breakdown."""
    from .serve import serve

    if explain:
        fail("--explain re-estimates generate()'s options; with --engine vllm change --gpu-memory-utilization, "
             "--max-model-len, --max-num-seqs or --kv-cache-dtype fp8")
    sv = serve(job, arch, gpu)
    if as_json:
        typer.echo(sv.model_dump_json(indent=2))
    else:
        from .report import serving_text

        typer.echo(serving_text(sv, arch.name, gpu.name, job.seq_len + job.new_tokens))
    if not sv.fits:
        raise typer.Exit(code=EXIT_DOES_NOT_FIT)


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


def _check_search(max_gpus: int, safety_margin: float, mfu: float | None, top: int, emit: str | None, target: str,
                  emit_path: str) -> None:
    """recommend's options, training or inference (`target`: what --emit writes for this task)."""
    from .fit import check_safety_margin

    if max_gpus <= 0:
        fail(f"max-gpus must be a positive integer, got {max_gpus}")
    check_safety_margin(safety_margin)
    if mfu is not None and not 0 < mfu <= 1:
        fail(f"mfu must be in (0, 1], got {mfu}")
    if emit not in (None, target):
        fail(f"unknown --emit target {emit!r}: allowed: {target}" + (" (with --task infer)" if target == "vllm" else ""))
    _check_top_and_emit_path(top, emit, emit_path)


def _check_top_and_emit_path(top: int, emit: str | None, emit_path: str) -> None:
    from pathlib import Path

    if top <= 0:
        fail(f"top must be a positive integer, got {top}")
    if not emit:
        return
    path = Path(emit_path)
    if path.is_dir():
        fail(f"--emit-path {emit_path!r} is a directory: give a file name, e.g. {str(path / 'accelerate_config.yaml')!r}")
    if not path.parent.is_dir():
        fail(f"--emit-path {emit_path!r}: folder {str(path.parent)!r} does not exist")


@app.command()
def recommend(
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP + " (required without --from)"),
    from_file: Optional[str] = typer.Option(None, "--from", help=FROM_HELP),
    from_format: Optional[str] = typer.Option(None, "--from-format", help=FROM_FORMAT_HELP),
    revision: Optional[str] = typer.Option(None, help=REVISION_HELP),
    method: Optional[str] = job_option("method"),
    stack: Optional[str] = job_option("stack"),
    seq_len: int = job_option("seq_len", 2048),
    global_batch: int = typer.Option(32, help="sequences per optimizer step, across GPUs and accumulation"),
    gpus: Optional[str] = typer.Option(None, help="comma-separated GPU profiles to consider (default: all)"),
    max_gpus: int = typer.Option(8, help="largest GPU count to consider"),
    budget: Optional[float] = typer.Option(None, help="most USD per hour for the whole plan"),
    price: Optional[list[str]] = typer.Option(None, help="override an hourly price: NAME=USD (repeatable)"),
    optimizer: Optional[str] = job_option("optimizer"),
    weight_dtype: Optional[str] = job_option("weight_dtype"),
    lora_rank: Optional[int] = job_option("lora_rank"),
    lora_targets: Optional[str] = job_option("lora_targets"),
    autocast: Optional[bool] = job_option("autocast"),
    safety_margin: float = typer.Option(DEFAULT_SAFETY_MARGIN, help="share of each GPU's memory kept free"),
    mfu: Optional[float] = typer.Option(None, help="model FLOPs utilisation for step time and cost (default: measured "
                                        "on H100/H200: 0.16 qlora, 0.37 qlora --autocast, 0.38 otherwise)"),
    top: int = typer.Option(10, help="plans to show"),
    emit: Optional[str] = typer.Option(None, help="accelerate: write a config for the best plan"),
    emit_path: str = typer.Option("accelerate_config.yaml", help="where --emit writes"),
    fsdp_version: int = typer.Option(2, "--fsdp-version", help="FSDP plans: 2 (fully_shard) or 1 "
                                     "(FullyShardedDataParallel), as accelerate's fsdp_version"),
    task: str = job_option("task", "train"),
    new_tokens: Optional[int] = job_option("new_tokens", help="--task infer: tokens generated per sequence"),
    sequences: int = typer.Option(1, help="--task infer: sequences decoded together (the batch; the concurrency)"),
    engine: Optional[str] = job_option("engine"),
    kv_cache_dtype: Optional[str] = job_option("kv_cache_dtype"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """GPU kinds, counts, micro-batch, accumulation, checkpointing and sharding that fit, ranked by cost per million
    tokens; with --task infer, GPU kinds x tensor-parallel counts ranked by cost per million generated tokens."""
    from memplan.profiles import gpu_names, load_gpu

    from .recommend import recommend as search

    if task == "infer":
        return _recommend_inference(model, revision, stack, seq_len, new_tokens, sequences, engine, kv_cache_dtype,
                                    weight_dtype, gpus, max_gpus, budget, price, safety_margin, mfu, top, emit,
                                    emit_path, as_json)
    if task != "train":
        fail(f"unknown --task {task!r}: allowed: train, infer")
    for name in ("new_tokens", "sequences", "engine", "kv_cache_dtype"):
        if name in _typed_options():
            fail(f"--{name.replace('_', '-')} applies to --task infer: drop it, or add --task infer")

    if global_batch <= 0:
        fail(f"global-batch must be a positive integer, got {global_batch}")
    _check_search(max_gpus, safety_margin, mfu, top, emit, "accelerate", emit_path)
    given = dict(method=method, stack=stack, seq_len=seq_len, optimizer=optimizer, weight_dtype=weight_dtype,
                 lora_rank=lora_rank, lora_targets=lora_targets, autocast=autocast)
    if from_file is not None:  # the file's seq_len unless --seq-len is typed
        given = {k: v for k, v in given.items() if v is not None and (k != "seq_len" or k in _typed_options())}
    fields, from_config = _from_config(from_file, from_format, model, given, searched=(
        "num_gpus", "sharding", "cpu_offload", "gpus_per_node", "micro_batch", "gradient_checkpointing", "gpu"))
    if from_config is not None:
        fields.setdefault("seq_len", seq_len)
    base = _job(**fields)
    arch = _load_model(base.model, revision)
    from .estimate import check_job

    check_job(base, arch)
    kinds = [load_gpu(g.strip()) for g in gpus.split(",")] if gpus else [load_gpu(g) for g in gpu_names()]
    prices = _parse_prices(price)
    if fsdp_version not in (1, 2):
        fail(f"fsdp-version must be 1 or 2, got {fsdp_version}")
    result = search(base, arch, kinds, global_batch, max_gpus, safety_margin, mfu, prices, budget, fsdp_version)
    advice = None
    if not result.plans:
        from .advice import nothing_fits

        every = kinds if not gpus else [load_gpu(g) for g in gpu_names()]
        advice = nothing_fits(base, arch, kinds, global_batch, max_gpus, every, safety_margin, mfu, prices, budget)
    if emit and result.plans:
        from .emit import accelerate_files

        best = result.plans[0]
        from pathlib import Path

        # the YAML, and beside it the DeepSpeed JSON a ZeRO plan's knobs need (emit.accelerate_files)
        for name, text in accelerate_files(best.job, arch, best.grad_accum, Path(emit_path).name).items():
            (Path(emit_path).parent / name).write_text(text)
    extra = {"from_config": from_config} if from_config else {}
    if as_json and advice is None and not extra:
        typer.echo(result.model_dump_json(indent=2))
    elif as_json:
        nothing = {"nothing_fits": advice.model_dump(mode="json")} if advice is not None else {}
        typer.echo(json.dumps(result.model_dump(mode="json") | nothing | extra, indent=2))
    else:
        from .report import nothing_fits_text, recommend_table

        _print_from_config(from_config)
        if advice is None:
            typer.echo(recommend_table(result, arch.name, top))
            if emit:
                typer.echo(f"accelerate config for the first plan written to {emit_path}")
        else:
            typer.echo(nothing_fits_text(advice, [k.name for k in kinds], max_gpus, budget))
            if emit:
                typer.echo(f"nothing to emit: no plan fits, so {emit_path} was not written")
    if advice is not None:
        raise typer.Exit(code=EXIT_DOES_NOT_FIT)


def _recommend_inference(model, revision, stack, seq_len, new_tokens, sequences, engine, kv_cache_dtype, weight_dtype,
                         gpus, max_gpus, budget, price, safety_margin, mfu, top, emit, emit_path, as_json) -> None:
    from memplan.profiles import gpu_names, load_gpu

    from .recommend_inference import recommend_inference

    training = {"method", "optimizer", "lora_rank", "lora_targets", "autocast", "global_batch", "fsdp_version",
                "from_file"}
    for name in sorted(training & _typed_options()):
        fail(f"--{name.replace('_', '-').replace('from-file', 'from')} applies to training, not to --task infer: drop it")
    if model is None:
        fail("recommend --task infer needs --model")
    if sequences <= 0:
        fail(f"sequences must be a positive integer, got {sequences}")
    _check_search(max_gpus, safety_margin, mfu, top, emit, "vllm", emit_path)
    fields = {k: v for k, v in dict(model=model, stack=stack, seq_len=seq_len, new_tokens=new_tokens,
                                    micro_batch=sequences, engine=engine, kv_cache_dtype=kv_cache_dtype,
                                    weight_dtype=weight_dtype).items() if v is not None}
    base = _job(task="infer", **fields)
    arch = _load_model(base.model, revision)
    kinds = [load_gpu(g.strip()) for g in gpus.split(",")] if gpus else [load_gpu(g) for g in gpu_names()]
    result = recommend_inference(base, arch, kinds, max_gpus, safety_margin, mfu, _parse_prices(price), budget)
    if emit and result.plans:
        from pathlib import Path

        from .emit import vllm_serve_command

        text = vllm_serve_command(result.plans[0].job, arch, safety_margin)
        if emit_path == "accelerate_config.yaml":  # recommend's default path is the training one's: print
            emit_path = ""
        if emit_path:
            Path(emit_path).write_text(text + "\n")
    if as_json:
        typer.echo(result.model_dump_json(indent=2))
    else:
        from .report import inference_plans_table

        typer.echo(inference_plans_table(result, arch.name, top))
        if emit and result.plans:
            typer.echo(f"vllm serve command for the first plan written to {emit_path}" if emit_path else text)
    if not result.plans:
        raise typer.Exit(code=EXIT_DOES_NOT_FIT)


def _fit_serving(model, revision, gpu_name, seq_len, fields, as_json) -> None:
    from memplan.profiles import load_gpu

    from .serve import longest_model_len, serve

    if model is None:
        fail("fit --engine vllm needs --model")
    arch = _load_model(model, revision)
    g = load_gpu(gpu_name)
    job = _job(model=model, task="infer", engine="vllm", gpu=g.name, seq_len=seq_len, **fields)
    sv = serve(job, arch, g)
    length = job.seq_len + job.new_tokens
    together = sv.concurrent_sequences(min(length, sv.config.max_model_len)) if sv.fits else 0
    longest = longest_model_len(job, arch, g)
    if as_json:
        typer.echo(json.dumps({"sequences": together, "sequence_tokens": length, "longest_max_model_len": longest,
                               "serving": sv.model_dump(mode="json")}, indent=2))
    else:
        c = sv.config
        tp = f" x {job.num_gpus} (tensor parallel)" if job.num_gpus > 1 else ""
        typer.echo(f"{arch.name} served by vLLM 0.33 on {g.name}{tp}, gpu-memory-utilization {c.gpu_memory_utilization}:")
        typer.echo(f"  KV cache: {sv.num_blocks:,} blocks x {c.block_size} = {sv.kv_capacity_tokens:,} tokens per GPU")
        if sv.fits:
            typer.echo(f"  sequences of {length:,} tokens at once: {together:,} (max-num-seqs {c.max_num_seqs})")
        else:
            typer.echo(f"  at max-model-len {c.max_model_len:,}: vLLM would refuse to start: {sv.error}")
        if longest:
            capped = " (the model's maximum)" if longest == arch.max_positions else ""
            typer.echo(f"  longest max-model-len vLLM starts with: {longest:,} tokens{capped}")
        else:
            typer.echo("  no max-model-len fits: the weights and the profiled activations leave no KV cache")
    if not sv.fits and not longest:
        raise typer.Exit(code=EXIT_DOES_NOT_FIT)


@app.command()
def fit(
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP + " (required without --from)"),
    gpu: str = typer.Option(..., "--gpu", "-g"),
    from_file: Optional[str] = typer.Option(None, "--from", help=FROM_HELP),
    from_format: Optional[str] = typer.Option(None, "--from-format", help=FROM_FORMAT_HELP),
    revision: Optional[str] = typer.Option(None, help=REVISION_HELP),
    task: str = job_option("task", "train"),
    method: str = job_option("method", "full"),
    stack: Optional[str] = job_option("stack"),
    seq_len: int = job_option("seq_len", 2048, help="sequence (prompt) length for the batch search"),
    micro_batch: int = job_option("micro_batch", 1, help="micro-batch for the sequence search"),
    new_tokens: Optional[int] = job_option("new_tokens"),
    kv_cache_dtype: Optional[str] = job_option("kv_cache_dtype"),
    cache_implementation: Optional[str] = job_option("cache_implementation"),
    optimizer: Optional[str] = job_option("optimizer"),
    weight_dtype: Optional[str] = job_option("weight_dtype"),
    compute_dtype: Optional[str] = job_option("compute_dtype"),
    gradient_checkpointing: Optional[bool] = job_option("gradient_checkpointing"),
    lora_rank: Optional[int] = job_option("lora_rank"),
    autocast: Optional[bool] = job_option("autocast"),
    safety_margin: float = typer.Option(DEFAULT_SAFETY_MARGIN, help="share of the GPU's memory kept free"),
    num_gpus: Optional[int] = job_option("num_gpus"),
    sharding: Optional[str] = job_option("sharding"),
    engine: Optional[str] = job_option("engine"),
    gpu_memory_utilization: Optional[float] = job_option("gpu_memory_utilization"),
    max_model_len: Optional[int] = job_option("max_model_len"),
    max_num_seqs: Optional[int] = job_option("max_num_seqs"),
    max_num_batched_tokens: Optional[int] = job_option("max_num_batched_tokens"),
    block_size: Optional[int] = job_option("block_size"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """The largest micro-batch (batch) and the longest sequence (context) that fit one GPU with --safety-margin free.

    With --engine vllm (--task infer): how many sequences of --seq-len + --new-tokens tokens vLLM's KV cache holds
    at once, and the longest --max-model-len it starts with; --gpu-memory-utilization is then the budget.

    Exit code 0 when something fits, 1 when not even micro-batch 1 at --seq-len or not even 1 token fits."""
    from memplan.profiles import load_gpu

    from .fit import check_safety_margin, largest
    from .units import gib

    if engine == "vllm":
        if "safety_margin" in _typed_options():
            fail("--safety-margin does not apply beside --engine vllm: vLLM's --gpu-memory-utilization is the budget")
        if task != "infer":
            fail("--engine vllm serves a model: add --task infer")
        vllm = {k: v for k, v in dict(gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                                      max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                      block_size=block_size, num_gpus=num_gpus, sharding=sharding,
                                      kv_cache_dtype=kv_cache_dtype, stack=stack, weight_dtype=weight_dtype,
                                      compute_dtype=compute_dtype, new_tokens=new_tokens).items() if v is not None}
        return _fit_serving(model, revision, gpu, seq_len, vllm, as_json)
    check_safety_margin(safety_margin)
    fields = dict(task=task, method=method, stack=stack, optimizer=optimizer, weight_dtype=weight_dtype,
                  compute_dtype=compute_dtype, gradient_checkpointing=gradient_checkpointing, lora_rank=lora_rank,
                  new_tokens=new_tokens, autocast=autocast, num_gpus=num_gpus, sharding=sharding,
                  gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                  max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, block_size=block_size)
    fields.update(kv_cache_dtype=kv_cache_dtype, cache_implementation=cache_implementation)
    from_config = None
    if from_file is not None:  # the file's values, unless an option is typed (fit's own defaults do not override)
        typed = _typed_options()
        given = {k: v for k, v in {**fields, "seq_len": seq_len, "micro_batch": micro_batch}.items()
                 if v is not None and (k in typed or k not in ("task", "method", "seq_len", "micro_batch"))}
        fields, from_config = _from_config(from_file, from_format, model, given, searched=("gpu",))
        task, method = fields.setdefault("task", task), fields.setdefault("method", method)
        seq_len, micro_batch = fields.pop("seq_len", seq_len), fields.pop("micro_batch", micro_batch)
        model = fields["model"]
        _print_from_config(None if as_json else from_config)
    else:
        fields, _ = _from_config(None, from_format, model, fields)
    arch = _load_model(model, revision)
    g = load_gpu(gpu)
    by_batch = largest(_job(**fields, seq_len=min(seq_len, arch.max_positions), micro_batch=1), arch, g, "micro_batch",
                       margin=safety_margin)
    by_seq = largest(_job(**fields, seq_len=1, micro_batch=micro_batch), arch, g, "seq_len", margin=safety_margin)
    nothing = not by_batch.largest or not by_seq.largest
    if as_json:
        extra = {"from_config": from_config} if from_config else {}
        typer.echo(json.dumps({"micro_batch": by_batch.model_dump(), "seq_len": by_seq.model_dump()} | extra, indent=2))
        if nothing:
            raise typer.Exit(code=EXIT_DOES_NOT_FIT)
        return
    what = "batch" if task == "infer" else "micro-batch"
    seq = "context" if task == "infer" else "sequence"
    what_job = f"{method} training" if task == "train" else "inference"

    def used(ans) -> str:
        return (f"{gib(ans.device_used_bytes)} device used, headroom {gib(ans.headroom_bytes)} = "
                f"{ans.headroom_bytes / ans.gpu_memory_bytes:.1%} of the card")

    split = ""
    if (num_gpus or 1) > 1:
        split = f" x {num_gpus} ({'tensor parallel' if sharding == 'tp' else sharding}; figures per GPU)"
    typer.echo(f"{arch.name} {what_job} on {g.name} ({gib(g.memory_bytes)}){split}, keeping {safety_margin:.0%} free:")
    if by_batch.largest:
        typer.echo(f"  largest {what} at {min(seq_len, arch.max_positions)} tokens: {by_batch.largest} ({used(by_batch)})")
    else:
        typer.echo(f"  not even a {what} of 1 at {seq_len} tokens fits")
    if by_seq.largest:
        capped = " (the model's maximum)" if by_seq.largest == by_seq.limit else ""
        typer.echo(f"  longest {seq} at {what} {micro_batch}: {by_seq.largest} tokens{capped} ({used(by_seq)})")
    else:
        typer.echo(f"  not even 1 token at {what} {micro_batch} fits")
    if nothing:
        raise typer.Exit(code=EXIT_DOES_NOT_FIT)


@app.command()
@job_options(*(n for n in JOB_OPTIONS if n not in ("stack", "gpu")))
def stacks(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    revision: Optional[str] = typer.Option(None, help=REVISION_HELP),
    only: Optional[str] = typer.Option(None, "--stacks", help="comma-separated stacks to compare (default: all)"),
    *,
    job_fields: dict,
) -> None:
    """The same job estimated on each software stack, side by side (a stack that cannot run it says why)."""
    from .errors import MemplanInputError
    from .estimate import estimate_memory
    from .report import stacks_table
    from .stacks import names

    chosen = [s.strip() for s in only.split(",")] if only else names()
    for s in chosen:
        if s not in names():
            fail(f"unknown stack {s!r}; allowed: {', '.join(names())}")
    arch = _load_model(model, revision)
    estimates = {}
    for s in chosen:
        try:
            estimates[s] = estimate_memory(_job(model=model, stack=s, **job_fields), arch)
        except MemplanInputError as exc:
            estimates[s] = str(exc)
    if all(isinstance(e, str) for e in estimates.values()):
        fail(next(iter(estimates.values())))
    typer.echo(stacks_table(estimates))


@app.command()
def models() -> None:
    """Every shipped model: its aliases, family (config model_type) and exact parameter count."""
    from memplan.profiles import ALIASES, load_model, shipped_models
    from .params import count_params
    from .report import models_table

    rows = []
    for hub_id in shipped_models():
        arch = load_model(hub_id)
        aliases = [a for a, h in ALIASES.items() if h == hub_id]
        rows.append((hub_id, aliases, arch.family, count_params(arch).total))
    rows.sort(key=lambda r: (r[2], r[3]))
    typer.echo(models_table(rows))


@app.command()
def gpus() -> None:
    """Shipped GPU profiles: memory as the driver reports it, throughput, bandwidth, price, and sources."""
    from memplan.profiles import gpu_profiles
    from .report import gpus_table

    typer.echo(gpus_table(gpu_profiles()))


@app.command()
@job_options(*JOB_OPTIONS)
def trace(
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP + " (required without --from)"),
    from_file: Optional[str] = typer.Option(None, "--from", help=FROM_HELP),
    from_format: Optional[str] = typer.Option(None, "--from-format", help=FROM_FORMAT_HELP),
    revision: Optional[str] = typer.Option(None, help=REVISION_HELP),
    as_json: bool = typer.Option(False, "--json"),
    accelerate_file: Optional[str] = typer.Option(None, "--accelerate-config", help=ACCELERATE_HELP + "; the trace "
                                                  "shards the model as that file says (FSDP only)"),
    detail: bool = typer.Option(False, "--detail", help="sharded jobs: what is live at each phase's peak, grouped "
                                "by dtype and size (as python -m memplan.validate.sharded --detail)"),
    *,
    job_fields: dict,
) -> None:
    """Run the real transformers step (training, or prefill and decode with --task infer) under fake
    tensors on the CPU and compare with the estimate. A sharded job (--num-gpus N > 1 with --sharding
    fsdp_full | fsdp_grad_op | fsdp_hybrid) is traced as its rank 0, through a fake process group."""
    for name, why in TRACE_REFUSED.items():
        if name in job_fields:
            fail(why)
    fields, from_config = _from_config(from_file, from_format, model, job_fields, searched=tuple(TRACE_REFUSED),
                                       why="the trace runs one process on the CPU, where offload changes nothing")
    accel = None
    if accelerate_file is not None:
        # the sharding accelerate would build from the very file `recommend --emit accelerate` wrote
        fields, accel = _with_accelerate_config(accelerate_file, fields, job_fields, revision, for_trace=True)
        if fields.get("cpu_offload"):
            fields["cpu_offload"] = False
            accel["notes"].append("fsdp_offload_params: traced without offload (on the CPU the offloaded state "
                                  "lands on the same device; docs/fsdp.md derives it)")
    job = _job(**fields)
    if not as_json:
        _print_from_config(from_config)
        _print_accelerate_config(accel)
    if revision is not None and "revision" not in Job.model_fields:
        # validate/trace.py builds the model from the Job alone: a revision outside it would trace
        # the main branch's config against an estimate of another
        fail(f"trace --revision {revision}: the Job carries no revision yet, so the trace would build main's config; "
             "pass a local config.json of that revision instead")
    from .stacks.installed import default_stack

    if job.stack != default_stack():
        # the trace runs the libraries installed here; another stack's step is traced in its own venv
        fail(f"trace --stack {job.stack}: this environment runs {default_stack()}; {job.stack}'s real step is traced "
             f"in its own venv (memplan.validate.stack_envs, tests/test_stack_*.py)")
    sharded = job.task == "train" and job.num_gpus > 1
    if sharded and not job.sharding.startswith("fsdp"):
        fail(f"trace --sharding {job.sharding} over {job.num_gpus} GPUs: no fake-tensor trace for DeepSpeed/DDP, its "
             "estimate is held by hand-derived tests; trace fsdp_full, fsdp_grad_op or fsdp_hybrid")
    if detail and not sharded:
        fail("trace --detail lists what a sharded rank holds at its peaks: give --num-gpus N > 1 and --sharding fsdp_*")
    # before torch, transformers and peft are first imported: their warnings are set up at import
    from memplan.validate.quiet import quiet_libraries

    quiet_libraries()
    _require("trace", "trace", "torch", "transformers", "peft", *(("accelerate",) if sharded else ()))
    from .estimate import estimate_memory
    from .stacks import cpu_trace_stack

    arch = _load_model(job.model, revision)
    est = estimate_memory(job, arch, stack=cpu_trace_stack(job))
    from memplan.validate.trace import trace_inference, trace_training

    try:
        if sharded:
            from memplan.validate.sharded import trace_sharded

            result = trace_sharded(job, detail=detail)
        else:
            result = trace_inference(job, allocator=True) if job.task == "infer" else trace_training(job, allocator=True)
    except ValueError as exc:
        fail(str(exc))
    if as_json and from_config is None:
        typer.echo(result.model_dump_json(indent=2))
        return
    if as_json:
        typer.echo(json.dumps(result.model_dump(mode="json") | {"from_config": from_config}, indent=2))
        return
    from .units import gib

    est_phase = {p.name: p.allocated_bytes for p in est.phases}
    if job.task == "infer":
        typer.echo(f"trace of {arch.name} inference ({result.seconds:.1f} s, CPU, fake tensors):")
        typer.echo(f"{'phase':16s}{'traced peak':>14s}{'estimate':>14s}{'error':>9s}")
        for snap in result.timeline:
            e = est_phase[snap.phase]
            typer.echo(f"{snap.phase:16s}{gib(snap.peak_bytes):>14s}{gib(e):>14s}{100 * (e - snap.peak_bytes) / snap.peak_bytes:>+8.2f}%")
        _echo_replayed(result)
        return
    est_by_trace_phase = est.measured_phases()
    if sharded:
        typer.echo(f"trace of {arch.name}, rank 0 of {job.num_gpus} ({job.sharding}, FSDP{job.fsdp_version}, forward "
                   f"autocast {'on' if result.autocast else 'off'}; {result.seconds:.1f} s, CPU, fake tensors, fake "
                   "process group); second iteration:")
    else:
        typer.echo(f"trace of {arch.name} ({result.seconds:.1f} s, CPU, fake tensors); second iteration:")
    typer.echo(f"{'phase':16s}{'traced peak':>14s}{'estimate':>14s}{'error':>9s}")
    for snap in result.timeline:
        if snap.iteration != 1:
            continue
        e = est_by_trace_phase[snap.phase]
        typer.echo(f"{snap.phase:16s}{gib(snap.peak_bytes):>14s}{gib(e):>14s}{100 * (e - snap.peak_bytes) / snap.peak_bytes:>+8.2f}%")
    err = 100 * (est.peak_allocated_bytes - result.peak_allocated_bytes) / result.peak_allocated_bytes
    typer.echo(f"{'peak':16s}{gib(result.peak_allocated_bytes):>14s}{gib(est.peak_allocated_bytes):>14s}{err:>+8.2f}%")
    typer.echo("\nlive at the end of each phase (activations and temporaries = the rest)"
               + (", parameters, gradients and optimizer states as this rank's shards:" if sharded else ":"))
    typer.echo(f"{'iter':>4s} {'phase':16s}{'parameters':>12s}{'gradients':>12s}{'optimizer':>12s}{'the rest':>12s}")
    for snap in result.timeline:
        rest = snap.end_bytes - snap.params_bytes - snap.grads_bytes - snap.optimizer_bytes
        cells = (snap.params_bytes, snap.grads_bytes, snap.optimizer_bytes, rest)
        typer.echo(f"{snap.iteration:>4d} {snap.phase:16s}" + "".join(f"{gib(c):>12s}" for c in cells))
    _echo_replayed(result)
    if detail:
        from memplan.validate.sharded import describe_live

        typer.echo(describe_live(result))


def _echo_replayed(result) -> None:
    """The allocator model (planner/allocator.py) replayed over the sequence the trace recorded."""
    if result.allocator is None:
        return
    from .units import gib

    typer.echo(f"\nallocator model (planner/allocator.py) replayed over the {result.allocations} allocations the trace saw:")
    for name, stats in (("default", result.allocator), ("expandable_segments", result.allocator_expandable)):
        typer.echo(f"  {name:20s} peak reserved {gib(stats.peak_reserved_bytes):>10s}, {stats.segments} segments")


@app.command()
def validate(
    matrix: Optional[str] = typer.Option(None, help="default (one 80 GB-class GPU) | holdout (jobs the default matrix lacks) | inference (generation and scoring) | quick (tiny models) | sharded (7B rank-0 jobs) | sharded-quick (tiny ones) (default: default; with --num-gpus, sharded, or sharded-quick on --device cpu)"),
    model: Optional[list[str]] = typer.Option(None, "--model", "-m", help="only these models (repeatable)"),
    out: Optional[str] = typer.Option(None, help="JSONL file results are appended to (default validate/results/<gpu>-<date>.jsonl)"),
    device: str = typer.Option("cuda", help="cuda | cpu (a dry run of the harness without a GPU)"),
    steps: int = typer.Option(2, help="measured steps after one warm-up step"),
    timeout: float = typer.Option(900, help="seconds per job"),
    jobs_slice: Optional[str] = typer.Option(None, "--slice", help="only jobs START:END of the matrix (0-based, as Python slices)"),
    time_budget: Optional[float] = typer.Option(None, help="start no new job after this many seconds"),
    num_gpus: Optional[int] = job_option("num_gpus", help="sharded jobs: rank 0 of this many GPUs, on the one device "
                                         "here, through a fake process group (collectives are no-ops)"),
    sharding: Optional[str] = job_option("sharding", help="with --num-gpus: fsdp_full | fsdp_grad_op | fsdp_hybrid"),
    fsdp_version: Optional[int] = job_option("fsdp_version"),
    fsdp_mixed_precision: Optional[str] = job_option("fsdp_mixed_precision"),
    gpus_per_node: Optional[int] = job_option("gpus_per_node"),
    allocator: Optional[str] = typer.Option(None, help="default | expandable (each worker's PYTORCH_CUDA_ALLOC_CONF "
                                            "gets expandable_segments:True, merged with the rest of yours) | both "
                                            "(each job under each, back to back) (default: as your "
                                            "PYTORCH_CUDA_ALLOC_CONF says)"),
    expandable_segments: bool = typer.Option(False, "--expandable-segments", help="the same as --allocator expandable"),
) -> None:
    """Run real training and inference steps on the local GPU, each job in its own process, and compare with the estimate.
    With --num-gpus N --sharding fsdp_*, each job is rank 0 of a sharded run, measured on the one device here.
    Each row records the allocator setting it ran under, and its estimate is made with that setting."""
    import shlex
    from datetime import date
    from pathlib import Path

    if device not in ("cuda", "cpu"):
        fail(f"invalid device {device!r}: use cuda or cpu")
    if steps <= 0:
        fail(f"steps must be a positive integer, got {steps}")
    if not timeout > 0:
        fail(f"timeout must be a positive number of seconds, got {timeout:g}")
    if time_budget is not None and not time_budget > 0:
        fail(f"time-budget must be a positive number of seconds, got {time_budget:g}")
    from memplan.validate.harness import ALLOCATORS, expandable_in

    if allocator is not None and allocator not in ALLOCATORS:
        fail(f"invalid allocator {allocator!r}: use {', '.join(ALLOCATORS)}")
    if expandable_segments and allocator not in (None, "expandable"):
        fail(f"--expandable-segments means --allocator expandable, not --allocator {allocator}: give one of the two")
    choice = "expandable" if expandable_segments else allocator
    # unnamed: the setting the user's own PYTORCH_CUDA_ALLOC_CONF gives, so the rows say what ran
    settings = ALLOCATORS[choice] if choice else (expandable_in(os.environ),)
    from memplan.validate.quiet import quiet_libraries

    quiet_libraries()
    _require("validate", "gpu", "torch", "transformers", "peft")
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        fail("no NVIDIA GPU visible (torch.cuda.is_available() is False): validate needs one, or --device cpu for a dry run")
    from memplan.validate.environment import describe
    from memplan.validate.harness import run_matrix
    from memplan.validate.matrix import MATRICES
    from memplan.validate.compare import calibrate, describe_job, table
    from memplan.profiles import load_gpu

    sharding_fields = {k: v for k, v in dict(num_gpus=num_gpus, sharding=sharding, fsdp_version=fsdp_version,
                                              fsdp_mixed_precision=fsdp_mixed_precision,
                                              gpus_per_node=gpus_per_node).items() if v is not None}
    if sharding_fields and not (num_gpus or 1) > 1:
        fail(f"{_flag_of(next(iter(sharding_fields)))} measures rank 0 of a sharded job: give --num-gpus N > 1 and "
             "--sharding fsdp_full | fsdp_grad_op | fsdp_hybrid")
    if sharding_fields and not (sharding or "").startswith("fsdp"):
        fail(f"validate --num-gpus {num_gpus} --sharding {sharding or 'none'}: only FSDP ranks run here "
             "(fsdp_full, fsdp_grad_op, fsdp_hybrid); no fake-process-group run for DeepSpeed/DDP, its estimate is held "
             "by hand-derived tests")
    if matrix is None:
        matrix = ("sharded-quick" if device == "cpu" else "sharded") if sharding_fields else "default"
    if matrix not in MATRICES:
        fail(f"unknown matrix {matrix!r}: use {' or '.join(MATRICES)}")
    jobs = [j for j in MATRICES[matrix]() if not model or j.model in model]
    if sharding_fields:
        from memplan.validate.matrix import shard

        jobs = shard(jobs, **sharding_fields)
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
        task = progress.add_task(f"{len(jobs) * len(settings)} jobs on {env.get('gpu') or 'cpu'}",
                                 total=len(jobs) * len(settings))

        def report(row):
            progress.console.print(f"{describe_job(row)}: {row.measured.status}")
            progress.advance(task)

        rows = run_matrix(jobs, path, device, gpu, env, steps=steps, timeout_s=timeout, on_result=report,
                          invocation=shlex.join(["memplan", *sys.argv[1:]]), time_budget_s=time_budget,
                          allocators=settings)
    done = len(rows) // len(settings)  # a job's runs under each setting are never split by the budget
    if done < len(jobs):
        console.print(f"time budget of {time_budget:.0f} s spent: ran {done} of {len(jobs)} jobs; "
                      f"the rest start at --slice {_slice_start(jobs_slice) + done}:")
    console.print(table(rows))
    cal = calibrate(rows)
    console.print(f"results appended to {path}; median |error|: "
                  + ", ".join(f"{k} {v:.1%}" for k, v in cal.median_abs_error.items()))


def _flag_of(field: str) -> str:
    return JOB_OPTIONS[field].decls[0].split("/")[0]


def _require(command: str, extra: str, *modules: str) -> None:
    """Import what an extra installs, up front: a missing one is one line naming the extra, not a
    ModuleNotFoundError halfway through (validate/trace.py imports torch inside its functions)."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            fail(f"{command} needs the {extra} extra ({exc.name or name} is missing): pip install 'memplan[{extra}]'")


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
    recorded: bool = typer.Option(False, "--recorded", help="show the prediction recorded in the file, not a re-estimate"),
    now: bool = typer.Option(False, "--now", hidden=True, help="re-estimate with this memplan (the default; kept for old scripts)"),
) -> None:
    """Measured against this memplan's estimate of every row (the recorded prediction beside it),
    and the constants the measurements calibrate."""
    from pathlib import Path

    from memplan.validate.compare import calibrate, table
    from memplan.validate.results import read

    from .report import console as make_console

    if recorded and now:
        fail("--recorded and --now contradict each other: give one (re-estimating is the default)")
    if not Path(path).is_file():
        fail(f"results file {path!r} does not exist")
    rows = read(Path(path))
    if not rows:
        fail(f"results file {path!r} holds no result rows: give a .jsonl file written by memplan validate")
    then = None
    if not recorded:
        from memplan.profiles import load_gpu
        from memplan.validate.harness import predict

        then = [r.predicted for r in rows]
        rows = [r.model_copy(update={"predicted": predict(r.job, _gpu_for(r.environment.get("gpu"), load_gpu)
                                                           if r.measured.device == "cuda" else None, r.measured.device)})
                for r in rows]
    console = make_console()
    console.print(table(rows, recorded=then))
    console.print(calibrate(rows).model_dump_json(indent=2))


def _gpu_for(name: str | None, load_gpu=None):
    """The shipped profile of a device as torch/pynvml name it, or None (profiles.match_device,
    the one matcher). `load_gpu` is unused; it stays for the callers that pass it."""
    from memplan.profiles import match_device

    return match_device(name)


def main() -> None:
    """The `memplan` entry point: every way a command can end becomes one of the documented exit codes."""
    try:
        # with standalone_mode=False click returns a command's exit code (typer.Exit, return value)
        # instead of exiting, and raises its usage errors for the one-line form below
        code = app(standalone_mode=False)
    except MemplanInputError as exc:
        fail_now(str(exc))
    except ValidationError as exc:
        fail_now(validation_message(exc))
    except typer.Exit as exc:
        code = exc.exit_code
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    except Exception as exc:
        # typer may vendor its own click (typer._click): match click's exception classes by name
        kinds = {c.__name__ for c in type(exc).__mro__}
        if "ClickException" in kinds:  # usage errors: a bad option, a missing value
            fail_now(exc.format_message().replace("\n", " "))
        if "Abort" in kinds:  # click's Ctrl-C / end of input at a prompt
            code = EXIT_INTERRUPTED
        else:
            _internal_error(exc)
    if code == EXIT_INTERRUPTED:
        print("memplan: interrupted", file=sys.stderr)
    # a command's own code passes through: 1 is "does not fit"; None (a command that returned) is 0
    sys.exit(code if isinstance(code, int) else 0)


def _internal_error(exc: BaseException) -> None:
    """A bug, not bad input: one line a user can paste into an issue, the traceback on request."""
    if os.environ.get("MEMPLAN_DEBUG", "") not in ("", "0"):
        import traceback

        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    message = " ".join(str(exc).split())
    print(f"memplan: internal error: {type(exc).__name__}: {message} (set MEMPLAN_DEBUG=1 for the traceback)",
          file=sys.stderr)
    sys.exit(EXIT_INTERNAL)


def fail_now(message: str) -> None:
    """Outside typer (errors raised by the core): the same line, then exit code 2."""
    _print_error(message)
    sys.exit(EXIT_BAD_INPUT)


if __name__ == "__main__":
    main()
