"""The Stack seam: the stack a job names decides the software's rules; the default is the installed
transformers, resolved at the CLI and in memplan.estimate only."""

import json
import subprocess
import sys
from importlib.metadata import PackageNotFoundError

import pytest

import memplan
from memplan import Job, estimate_memory
from memplan.dtypes import DType, linear_weight_bytes
from memplan.params import count_params
from memplan.profiles import load_model
from memplan.results import Category
from memplan.stacks import Kernels, get, installed

MEMPLAN = [sys.executable, "-m", "memplan.cli"]


@pytest.mark.parametrize("found, expected", [("4.57.1", "transformers-4"), ("4.36.0", "transformers-4"),
                                             ("5.23.0", "transformers-5"), ("6.0.0", "transformers-5"),
                                             (None, "transformers-5")])
def test_default_stack_follows_the_installed_transformers(monkeypatch, found, expected):
    def version(name):
        assert name == "transformers"
        if found is None:
            raise PackageNotFoundError(name)
        return found

    monkeypatch.setattr("importlib.metadata.version", version)
    assert installed.default_stack() == expected
    assert memplan.estimate("llama-2-7b", method="lora").job.stack == expected


def test_a_job_keeps_its_stack_whatever_is_installed(monkeypatch):
    monkeypatch.setattr("importlib.metadata.version", lambda name: "4.57.1")
    assert memplan.estimate(job=Job(model="llama-2-7b")).job.stack == "transformers-5"
    assert memplan.estimate("llama-2-7b", stack="transformers-5").job.stack == "transformers-5"


def test_falcon_qlora_is_nf4_under_transformers_4():
    """4.x converts every FalconLinear: 4-bit projections, the rest fp32 (kbit upcast)."""
    arch = load_model("falcon-7b")
    p = count_params(arch, get("transformers-4"))
    assert p.quantizable_linear == arch.layers * sum(lin.d_in * lin.d_out for lin in arch.linears)
    nf4 = arch.layers * sum(linear_weight_bytes(lin.d_out, lin.d_in, DType.nf4, True) for lin in arch.linears)
    est4 = memplan.estimate("falcon-7b", method="qlora", stack="transformers-4")
    assert est4.bytes_of("weights") == nf4 + (p.total - p.quantizable_linear) * 4
    est5 = memplan.estimate("falcon-7b", method="qlora", stack="transformers-5")
    assert est5.bytes_of("weights") == p.total * 4  # nothing converted: all fp32 after kbit prepare
    # about 0.56 B per 4-bit param against 4 B: the 5.x base is more than five times the 4.x one
    assert est5.bytes_of("weights") > 5 * est4.bytes_of("weights")
    note = next(n for n in est5.notes if "FalconLinear" in n or "Linear subclass" in n)
    assert "--stack transformers-4" in note and f"{est4.peak_allocated_bytes / 2**30:.2f} GiB" in note
    assert not any("not plain nn.Linear" in n for n in est4.notes)


def test_mixtral_qlora_under_each_stack():
    arch = load_model("mixtral-8x7b")
    attn = arch.layers * sum(lin.d_in * lin.d_out for lin in arch.linears[:4])
    assert count_params(arch, get("transformers-5")).quantizable_linear == attn
    # 4.x: attention, the router and every expert's w1, w2, w3
    experts = arch.layers * arch.experts * 3 * arch.hidden * arch.intermediate
    router = arch.layers * arch.hidden * arch.experts
    assert count_params(arch, get("transformers-4")).quantizable_linear == attn + experts + router
    e4 = memplan.estimate("mixtral-8x7b", method="qlora", stack="transformers-4")
    e5 = memplan.estimate("mixtral-8x7b", method="qlora", stack="transformers-5")
    assert e4.bytes_of("weights") < e5.bytes_of("weights") / 3
    # the dequantized weight is one of 4.x's separate w1/w3 (hidden x intermediate), not a fused gate-up
    assert e4.bytes_of("dequantized weight") == arch.hidden * arch.intermediate * 2


def test_stacks_agree_where_their_rules_agree():
    """Unquantized jobs: transformers 4.57 and 5.23 trace to the same bytes (PROBES.md), so the
    estimates are equal to the byte."""
    for model in ("llama-2-7b", "falcon-7b", "phi-2"):
        for method in ("full", "lora"):
            a = memplan.estimate(model, method=method, stack="transformers-4")
            b = memplan.estimate(model, method=method, stack="transformers-5")
            assert [p.allocated_bytes for p in a.phases] == [p.allocated_bytes for p in b.phases]


def test_cpu_kernels_are_a_property_of_the_stack():
    s = get("transformers-5")
    assert s.kernels is Kernels.cuda and s.on_cpu().kernels is Kernels.cpu and s.on_cpu().name == s.name
    job = Job(model="llama-2-7b", method="lora", stack="transformers-5")
    cuda = estimate_memory(job, load_model(job.model))
    cpu = estimate_memory(job, load_model(job.model), stack=s.on_cpu())
    assert cuda.bytes_of("cuBLAS workspaces") > 0 and cpu.bytes_of("cuBLAS workspaces") == 0


def test_every_component_has_a_category():
    est = memplan.estimate("llama-2-7b", method="qlora", gpu="A10G", stack="transformers-5")
    cats = {c.name: c.category for c in est.components}
    assert cats["weights"] is Category.weights and cats["optimizer states"] is Category.optimizer
    assert cats["CUDA context at init"] is Category.overhead and cats["activations"] is Category.activations
    inf = memplan.estimate("llama-2-7b", task="infer", new_tokens=8, stack="transformers-5")
    assert {c.name: c.category for c in inf.components}["KV cache"] is Category.kv_cache


def test_cli_names_the_stack_and_refuses_an_unknown_one():
    out = subprocess.run([*MEMPLAN, "estimate", "-m", "falcon-7b", "--method", "qlora", "--stack", "transformers-4"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "transformers 4.x" in out.stdout and "--stack transformers-4" in out.stdout
    js = subprocess.run([*MEMPLAN, "estimate", "-m", "falcon-7b", "--stack", "transformers-4", "--json"],
                        capture_output=True, text=True, timeout=60)
    assert json.loads(js.stdout)["job"]["stack"] == "transformers-4"
    bad = subprocess.run([*MEMPLAN, "estimate", "-m", "falcon-7b", "--stack", "tx4"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "'tx4'" in bad.stderr and "transformers-4" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("model, method", [("tiny-llama", "lora"), ("tiny-llama", "full"), ("tiny-phi", "lora")])
def test_reentrant_and_non_reentrant_checkpointing_trace_alike(model, method):
    """transformers 4.57 checkpoints reentrant by default, 5.23 not (modeling_utils.py); the estimate
    is the same for both, and so is the trace of the real step, phase by phase, to 1%."""
    pytest.importorskip("torch")
    from memplan.validate.trace import trace_training

    from .conftest import DATA

    peaks = {}
    for reentrant in (True, False):
        job = Job(model=str(DATA / f"{model}.json"), method=method, gradient_checkpointing=True, micro_batch=2,
                  seq_len=256, checkpoint_reentrant=reentrant, stack="transformers-5")
        traced = trace_training(job)
        peaks[reentrant] = {s.phase: s.peak_bytes for s in traced.timeline if s.iteration == 1}
        est = estimate_memory(job, load_model(job.model), stack=get("transformers-5").on_cpu())
        assert est.peak_allocated_bytes == estimate_memory(
            job.model_copy(update={"checkpoint_reentrant": not reentrant}), load_model(job.model),
            stack=get("transformers-5").on_cpu()).peak_allocated_bytes
    for phase, peak in peaks[True].items():
        assert abs(peak - peaks[False][phase]) <= 0.01 * peak, phase
    assert Job(model="llama-2-7b", stack="transformers-4").reentrant is True
    assert Job(model="llama-2-7b", stack="transformers-5").reentrant is False


def test_stacks_command_shows_one_job_on_each_stack():
    out = subprocess.run([*MEMPLAN, "stacks", "-m", "falcon-7b", "--method", "qlora"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    for name in ("transformers-5", "transformers-4", "litgpt", "torchtune"):
        assert name in out.stdout
    e4 = memplan.estimate("falcon-7b", method="qlora", stack="transformers-4")
    e5 = memplan.estimate("falcon-7b", method="qlora", stack="transformers-5")
    row = next(line for line in out.stdout.splitlines() if line.startswith("│ peak allocated"))
    assert f"{e5.peak_allocated_bytes / 2**30:.2f} GiB" in row and f"{e4.peak_allocated_bytes / 2**30:.2f} GiB" in row
    assert "not run: litgpt:" in out.stdout and "not run: torchtune:" in out.stdout
    bad = subprocess.run([*MEMPLAN, "stacks", "-m", "falcon-7b", "--stacks", "tx9"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "unknown stack 'tx9'" in bad.stderr


def test_a_stack_refuses_a_feature_it_does_not_run():
    with pytest.raises(memplan.MemplanInputError, match="--optimizer-in-backward is not something --stack transformers-5"):
        memplan.estimate("llama-2-7b", method="full", optimizer_in_backward=True, stack="transformers-5")
    with pytest.raises(memplan.MemplanInputError, match="--liger is not something --stack torchtune"):
        memplan.estimate("llama-2-7b", method="lora", liger=True, stack="torchtune")
