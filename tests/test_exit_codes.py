"""Exit codes a script can use, one-line bad input for every command, and nothing silently ignored:
0 success, 1 does not fit (passed through from a command), 2 bad input, 3 internal error, 130 Ctrl-C."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import memplan
from memplan import Job, MemplanInputError

from .conftest import DATA

MEMPLAN = [sys.executable, "-m", "memplan"]
RESULTS = Path(__file__).parent.parent / "validate" / "results" / "H200-2026-11-24-holdout.jsonl"


def run(*args, env=None):
    return subprocess.run([*MEMPLAN, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def run_main(setup: str, *args, env=None):
    """`memplan ARGS` in a fresh interpreter after `setup` (a monkeypatch) has run."""
    code = textwrap.dedent(setup) + f"\nimport sys\nsys.argv = ['memplan', *{list(args)!r}]\nfrom memplan.cli import main\nmain()\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def one_line(out, code=2):
    assert out.returncode == code, (out.returncode, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    return lines[0]


BOOM = """
import importlib
core = importlib.import_module("memplan.estimate")  # the module: memplan.estimate is the library function
def boom(*a, **k):
    raise RuntimeError("the core\\nbroke")
core.estimate_memory = boom
"""


def test_internal_error_is_one_line_exit_3():
    line = one_line(run_main(BOOM, "estimate", "-m", "llama-2-7b"), code=3)
    assert line == "memplan: internal error: RuntimeError: the core broke (set MEMPLAN_DEBUG=1 for the traceback)"


def test_internal_error_traceback_with_memplan_debug():
    out = run_main(BOOM, "estimate", "-m", "llama-2-7b", env={"MEMPLAN_DEBUG": "1"})
    assert out.returncode == 3
    assert "Traceback" in out.stderr and "in boom" in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("memplan: internal error: RuntimeError")


def test_keyboard_interrupt_exits_130():
    setup = """
import importlib
core = importlib.import_module("memplan.estimate")
def interrupted(*a, **k):
    raise KeyboardInterrupt
core.estimate_memory = interrupted
"""
    out = run_main(setup, "estimate", "-m", "llama-2-7b")
    assert out.returncode == 130, out.stderr
    assert out.stderr.strip() == "memplan: interrupted" and "Traceback" not in out.stderr


def test_a_commands_exit_code_1_passes_through():
    """1 is "does not fit": whatever command returns it, main() must not turn it into 0, 2 or 3."""
    setup = """
import typer
from memplan.cli import app
@app.command("nofit")
def nofit():
    raise typer.Exit(1)
"""
    out = run_main(setup, "nofit")
    assert out.returncode == 1 and out.stderr == ""


def test_success_is_0_and_usage_errors_2():
    assert run("estimate", "-m", "llama-2-7b", "--json").returncode == 0
    assert "No such option" in one_line(run("estimate", "-m", "llama-2-7b", "--bogus"))
    assert "Missing option '--model'" in one_line(run("estimate"))


@pytest.mark.parametrize(
    "args, says",
    [
        (["recommend", "-m", "llama-2-7b", "--top", "0"], "top must be a positive integer, got 0"),
        (["recommend", "-m", "llama-2-7b", "--top", "-3"], "top must be a positive integer, got -3"),
        (["recommend", "-m", "llama-2-7b", "--emit", "accelerate", "--emit-path", "/nonexistent/dir/a.yaml"],
         "folder '/nonexistent/dir' does not exist"),
        (["recommend", "-m", "llama-2-7b", "--emit", "accelerate", "--emit-path", "."], "'.' is a directory"),
        (["validate", "--device", "cpu", "--steps", "0"], "steps must be a positive integer, got 0"),
        (["validate", "--device", "cpu", "--steps", "-1"], "steps must be a positive integer, got -1"),
        (["validate", "--device", "cpu", "--timeout", "0"], "timeout must be a positive number of seconds, got 0"),
        (["validate", "--device", "cpu", "--timeout", "-5"], "timeout must be a positive number of seconds, got -5"),
        (["compare", "README.md"], "line 1 is not JSON"),
        (["compare", "validate/results/H200-2026-11-24-holdout.jsonl", "--recorded", "--now"], "contradict"),
    ],
)
def test_bad_input_one_line(args, says):
    assert says in one_line(run(*args))


def test_compare_empty_file_and_rows_that_are_not_results(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert "holds no result rows" in one_line(run("compare", str(empty)))
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"job": {"model": "llama-2-7b"}}) + "\n")
    line = one_line(run("compare", str(other)))
    assert "line 1 is not a result row" in line and "predicted" in line


def test_compare_re_estimates_by_default_with_the_recorded_column():
    now = run("compare", str(RESULTS))
    assert now.returncode == 0, now.stderr
    assert "recorded" in now.stdout
    assert run("compare", str(RESULTS), "--now").stdout == now.stdout  # the old flag is the default
    recorded = run("compare", str(RESULTS), "--recorded")
    assert recorded.returncode == 0 and "recorded" not in recorded.stdout


@pytest.mark.parametrize(
    "args, says",
    [
        (["--task", "infer", "--method", "lora"], "inference has no training method: drop --method lora"),
        (["--task", "infer", "--method", "qlora"], "drop --method qlora"),
        (["--task", "infer", "--optimizer", "sgd"], "--optimizer sgd applies to training"),
        (["--task", "infer", "--no-foreach"], "--no-foreach applies to training"),
        (["--task", "infer", "--lora-rank", "8"], "--lora-rank 8 applies to training"),
        (["--task", "infer", "--adapter-dtype", "bf16"], "--adapter-dtype bf16 applies to training"),
        (["--task", "infer", "--gradient-checkpointing"], "--gradient-checkpointing applies to training"),
        (["--task", "infer", "--no-kbit-prepare"], "--no-kbit-prepare applies to training"),
        (["--task", "infer", "--autocast"], "--autocast applies to training"),
        (["--task", "infer", "--gpus-per-node", "4"], "--gpus-per-node 4 applies to training"),
        (["--task", "infer", "-n", "2"], "say how the model is split"),
        (["--new-tokens", "16"], "--new-tokens 16 applies to inference"),
        (["--lora-alpha", "64"], "--lora-alpha 64 applies to lora and qlora, not to --method full"),
    ],
)
def test_options_the_job_never_reads_are_refused(args, says):
    assert says in one_line(run("estimate", "-m", "llama-2-7b", *args))


def test_job_defaults_given_explicitly_are_not_refused():
    """A Job read back from a results file has every field set: its defaults must still validate."""
    job = Job(model="llama-2-7b", task="infer", new_tokens=8)
    assert Job.model_validate_json(job.model_dump_json()) == job
    assert run("estimate", "-m", "llama-2-7b", "--task", "infer", "--optimizer", "adamw").returncode == 0


def test_sharding_on_one_gpu_is_noted_and_the_title_says_1_gpu():
    assert Job(model="llama-2-7b", sharding="zero3").notes() == [
        "zero3 on 1 GPU divides nothing: parameters, gradients and optimizer states are counted whole, as "
        "without sharding (give the data-parallel size with --num-gpus)"]
    assert Job(model="llama-2-7b", sharding="zero3", num_gpus=2).notes() == []
    out = run("estimate", "-m", "llama-2-7b", "--sharding", "zero3")
    assert "zero3 on 1 GPU," in out.stdout and "1 GPUs" not in out.stdout


def test_library_refuses_a_model_or_fields_beside_a_job():
    job = Job(model="mistral-7b")
    with pytest.raises(MemplanInputError, match="not both: got job=Job\\(model='mistral-7b'\\) and model"):
        memplan.estimate("llama-2-70b", job=job)
    with pytest.raises(MemplanInputError, match="and micro_batch"):
        memplan.estimate(job=job, micro_batch=4)
    with pytest.raises(MemplanInputError, match="needs a model name or a Job"):
        memplan.estimate()


@pytest.mark.parametrize(
    "fields, cli",
    [
        (dict(micro_batch=0), ["-b", "0"]),
        (dict(method="sideways"), ["--method", "sideways"]),
        (dict(task="infer", method="lora"), ["--task", "infer", "--method", "lora"]),
    ],
)
def test_library_raises_memplan_input_error_with_the_cli_message(fields, cli):
    with pytest.raises(MemplanInputError) as lib:
        memplan.estimate("llama-2-7b", **fields)
    with pytest.raises(MemplanInputError) as job:
        Job(model="llama-2-7b", **fields)
    line = one_line(run("estimate", "-m", "llama-2-7b", *cli))
    assert line == f"memplan: error: {lib.value}" == f"memplan: error: {job.value}"


def test_trace_takes_every_job_option_estimate_does():
    import typer.main

    from memplan.cli import JOB_OPTIONS, app

    commands = typer.main.get_command(app).commands
    names = {c: {p.name for p in commands[c].params} for c in ("estimate", "trace")}
    assert set(JOB_OPTIONS) <= names["estimate"]
    assert names["trace"] == names["estimate"] - {"explain"} | {"detail"}
    for c in ("estimate", "trace", "fit", "recommend"):
        assert "revision" in {p.name for p in commands[c].params}


def test_trace_without_torch_names_the_extra():
    setup = "import sys\nsys.modules['torch'] = None  # `import torch` now raises ModuleNotFoundError\n"
    line = one_line(run_main(setup, "trace", "-m", str(DATA / "tiny-llama.json")))
    assert line == "memplan: error: trace needs the trace extra (torch is missing): pip install 'memplan[trace]'"


def test_trace_output_has_no_library_noise():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    out = run("trace", "-m", str(DATA / "tiny-llama.json"), "-b", "1", "-s", "32", "--method", "lora")
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    assert "peak" in out.stdout


def test_quiet_libraries_silences_their_warnings_and_loggers():
    code = textwrap.dedent("""
        import logging, warnings
        from memplan.validate.quiet import quiet_libraries
        quiet_libraries()
        with warnings.catch_warnings(record=True) as seen:
            warnings.warn_explicit("old", FutureWarning, "x.py", 1, module="transformers.modeling_utils")
            warnings.warn_explicit("mine", UserWarning, "x.py", 1, module="memplan.cli")
        assert [str(w.message) for w in seen] == ["mine"], seen
        assert not logging.getLogger("bitsandbytes.backends.cpu.ops").isEnabledFor(logging.WARNING)
        import os; assert os.environ["TRANSFORMERS_VERBOSITY"] == "error"
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_version_and_module_entry():
    from importlib.metadata import version

    out = run("--version")
    assert out.returncode == 0 and out.stdout == f"memplan {version('memplan')}\n" == "memplan 0.1.0\n"
    assert run("estimate", "-m", "phi-2", "--json").returncode == 0  # python -m memplan runs the CLI
    script = subprocess.run(["memplan", "--version"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})
    assert script.stdout == out.stdout


def test_revision_reaches_load_model_only_when_given():
    """`load_model(name)` as every memplan calls it without --revision; `revision=` only when given."""
    setup = """
import sys
import memplan.profiles as profiles
real = profiles.load_model
def load_model(name, *, revision="not passed"):
    print(f"revision={revision}", file=sys.stderr)
    return real(name)
profiles.load_model = load_model
"""
    for args, seen in ((["--revision", "v1.0"], "revision=v1.0"), ([], "revision=not passed")):
        out = run_main(setup, "estimate", "-m", "phi-2", "--json", *args)
        assert out.returncode == 0 and out.stderr.strip() == seen, out.stderr
    line = one_line(run("trace", "-m", "phi-2", "--revision", "v1.0"))
    assert "the Job carries no revision yet" in line
