"""The command line: output, --json, one-line errors with exit code 2, and a light import path."""

import json
import subprocess
import sys

import pytest

MEMPLAN = [sys.executable, "-m", "memplan.cli"]


def run(*args):
    return subprocess.run([*MEMPLAN, *args], capture_output=True, text=True, timeout=60)


def test_estimate_table_says_gib_and_fit():
    out = run("estimate", "--model", "llama-2-7b", "--method", "qlora", "--gpu", "T4")
    assert out.returncode == 0, out.stderr
    assert "GiB" in out.stdout and " GB" not in out.stdout
    assert "fits" in out.stdout
    assert "Peak torch allocated" in out.stdout


def test_estimate_json_is_the_estimate_model():
    from memplan import Estimate

    out = run("estimate", "-m", "falcon-7b", "--method", "qlora", "--json")
    est = Estimate.model_validate(json.loads(out.stdout))
    assert est.peak_allocated_bytes > 0 and est.peak_phase


def test_local_config_path(tmp_path):
    from memplan.profiles import MODELS_DIR

    cfg = tmp_path / "config.json"
    cfg.write_text((MODELS_DIR / "microsoft--phi-2.json").read_text())
    out = run("estimate", "-m", str(cfg), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["params"]["total"] == 2_779_683_840


@pytest.mark.parametrize(
    "args, words",
    [
        (["-m", "llama-7b"], "llama-2-7b"),
        (["-m", "llama-2-7b", "--gpu", "H10"], "H100-80GB"),
        (["-m", "llama-2-7b", "--gpu", "H1OO"], "did you mean H100-80GB?"),  # matched through the alias h100
        (["-m", "llama-2-7b", "--gpu", "l40x"], "did you mean L40"),
        (["-m", "llama-2-7b", "-b", "0"], "micro-batch"),
        (["-m", "llama-2-7b", "-s", "-1"], "seq-len"),
        (["-m", "llama-2-7b", "-s", "9000"], "4096"),
        (["-m", "llama-2-7b", "--method", "qlora", "--weight-dtype", "bf16"], "4-bit"),
        (["-m", "llama-2-7b", "--method", "sideways"], "'full', 'lora' or 'qlora'"),
        (["-m", "llama-2-7b", "--weight-dtype", "fp8"], "fp8"),
        (["-m", "/nonexistent/config.json"], "does not exist"),
    ],
)
def test_bad_input_one_line_exit_2(args, words):
    out = run("estimate", *args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert words in lines[0]
    assert "Traceback" not in out.stderr


def test_estimate_does_not_import_heavy_packages():
    code = (
        "import sys; from memplan.cli import app; from typer.testing import CliRunner;"
        "r = CliRunner().invoke(app, ['estimate', '-m', 'llama-2-7b', '--method', 'qlora']);"
        "assert r.exit_code == 0, r.output;"
        "heavy = [m for m in ('torch', 'transformers', 'accelerate', 'peft', 'bitsandbytes', 'pynvml', 'huggingface_hub') if m in sys.modules];"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_trace_command_compares_and_shows_categories():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from .conftest import DATA

    out = run("trace", "-m", str(DATA / "tiny-llama.json"), "-b", "2", "-s", "64")
    assert out.returncode == 0, out.stderr
    assert "peak" in out.stdout and "optimizer step" in out.stdout
    assert "parameters" in out.stdout and "gradients" in out.stdout


def test_trace_refuses_qlora_in_one_line():
    pytest.importorskip("torch")
    out = run("trace", "-m", "llama-2-7b", "--method", "qlora")
    assert out.returncode == 2
    assert "Params4bit" in out.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "args, says",
    [
        (["fit", "-m", "mistral-7b", "-g", "A10G", "--bogus"], "No such option: --bogus"),
        (["estimate", "-m", "mistral-7b", "-b"], "'-b' requires an argument"),
        (["estimate", "-m", "mistral-7b", "-b", "x"], "'--micro-batch'"),
        (["estimate", "-m", "mistral-7b", "--method", "qlora", "--compute-dtype", "fp32", "--autocast"], "autocast needs a 16-bit"),
    ],
)
def test_usage_errors_are_one_line_exit_2(args, says):
    out = run(*args)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and says in out.stderr and "Traceback" not in out.stderr


def test_autocast_qlora_gqa_attention():
    """QLoRA's fp32 stream on a grouped-query model runs SDPA's math kernel (H100 probe): the
    estimate says so, and under the Trainer's bf16 autocast the fused kernel returns."""
    plain = json.loads(run("estimate", "-m", "mistral-7b", "--method", "qlora", "-b", "4", "-s", "2048", "--json").stdout)
    auto = json.loads(run("estimate", "-m", "mistral-7b", "--method", "qlora", "-b", "4", "-s", "2048", "--autocast", "--json").stdout)
    assert any("math kernel" in n for n in plain["notes"])
    assert not any("math kernel" in n for n in auto["notes"])
    assert any(c["name"] == "autocast lm_head copy" for c in auto["components"])


def test_foreach_and_adapter_dtype_reach_the_job():
    """--no-foreach trades torch AdamW's weights-sized step temporary (Phi-2 full: 2,779,683,840
    params x 2 B) for the per-parameter one: the sqrt and the denominator of the largest tensor,
    the 51,200 x 2,560 embedding (2 x 131,072,000 x 2 B); --adapter-dtype bf16 halves the adapters (peft's Phi targets q_proj/v_proj/fc1/fc2,
    r=16: 32 x (2 x 16 x (2560 + 2560) + 2 x 16 x (2560 + 10240)) = 18,350,080 params x 2 B)."""
    def est(*args):
        return json.loads(run("estimate", "-m", "phi-2", *args, "--json").stdout)

    def component(e, name):
        return next((c["bytes"] for c in e["components"] if c["name"] == name), 0)

    on, off = est(), est("--no-foreach")
    assert component(on, "optimizer step temporary") == 2_779_683_840 * 2
    assert component(off, "optimizer step temporary") == 2 * 131_072_000 * 2
    assert off["peak_allocated_bytes"] < on["peak_allocated_bytes"]
    assert component(est("--method", "lora", "--adapter-dtype", "bf16"), "adapters") == 18_350_080 * 2
    bad = run("estimate", "-m", "phi-2", "--method", "lora", "--adapter-dtype", "int8")
    assert bad.returncode == 2 and "adapter dtype 'int8'" in bad.stderr
