"""Trustworthy answers: exit codes, fit margins, what-if savings and nothing-fits advice, each figure
checked by re-estimating the changed job here, independently of planner/advice.py."""

import json
import subprocess
import sys

import pytest

from memplan import Estimate, Job, estimate_memory
from memplan.advice import nothing_fits, what_if
from memplan.dtypes import DType
from memplan.fit import DEFAULT_SAFETY_MARGIN
from memplan.profiles import gpu_names, load_gpu, load_model
from memplan.recommend import recommend
from memplan.units import gib

MEMPLAN = [sys.executable, "-m", "memplan.cli"]
ALL = [load_gpu(g) for g in gpu_names()]


def run(*args):
    return subprocess.run([*MEMPLAN, *args], capture_output=True, text=True, timeout=60)


# --- estimate: exit code and --explain -----------------------------------------------------------

@pytest.mark.parametrize("model, method, gpu", [("llama-2-7b", "qlora", "A10G"), ("llama-2-13b", "full", "A10G")])
def test_estimate_exit_code_is_the_fit(model, method, gpu):
    fits = estimate_memory(Job(model=model, method=method), load_model(model), load_gpu(gpu)).fits
    out = run("estimate", "-m", model, "--method", method, "--gpu", gpu)
    assert out.returncode == (0 if fits else 1), out.stderr
    # a job that does not fit shows the advice without being asked
    assert ("what would save memory" in out.stdout) == (not fits)


def test_estimate_without_gpu_exits_0():
    assert run("estimate", "-m", "llama-2-13b", "--method", "full").returncode == 0


def test_json_stays_an_estimate_unless_explain():
    plain = run("estimate", "-m", "llama-2-13b", "--method", "full", "-g", "A10G", "--json")
    assert plain.returncode == 1
    data = json.loads(plain.stdout)
    assert "what_if" not in data
    Estimate.model_validate(data)
    explained = json.loads(run("estimate", "-m", "llama-2-13b", "--method", "full", "-g", "A10G", "--json",
                               "--explain").stdout)
    job = Job(model="llama-2-13b", method="full", gpu="A10G")
    assert explained["what_if"] == [s.model_dump(mode="json") for s in what_if(job, load_model("llama-2-13b"),
                                                                                load_gpu("A10G"))]
    Estimate.model_validate(explained)


def _by_hand(job: Job, arch) -> dict[str, Job]:
    """Each change of `estimate --explain`, built here from its flags."""
    up = lambda **kw: Job.model_validate({**job.model_dump(), **kw})  # noqa: E731
    changes = {
        "--gradient-checkpointing": up(gradient_checkpointing=True),
        "--optimizer adamw_8bit": up(optimizer="adamw_8bit"),
        "--optimizer paged_adamw": up(optimizer="paged_adamw"),
        "--no-foreach": up(foreach=False),
        "--expandable-segments": up(expandable_segments=True),
        f"--micro-batch {job.micro_batch // 2}": up(micro_batch=job.micro_batch // 2),
        f"--seq-len {job.seq_len // 2}": up(seq_len=job.seq_len // 2),
        "--attention sdpa": up(attention="sdpa"),
        "--num-gpus 2 --sharding zero3": up(num_gpus=2, sharding="zero3"),
        "--num-gpus 4 --sharding zero3": up(num_gpus=4, sharding="zero3"),
        "--num-gpus 8 --sharding zero3": up(num_gpus=8, sharding="zero3"),
    }
    if job.method == "full":
        changes["--method lora"] = up(method="lora")
        changes["--method qlora"] = up(method="qlora")
    if job.method == "lora":
        changes["--method qlora"] = up(method="qlora")
        changes["--lora-targets default"] = up(lora_targets="default")
    return changes


@pytest.mark.parametrize("job", [
    Job(model="llama-2-13b", method="full", micro_batch=4, seq_len=2048, attention="eager"),
    Job(model="mistral-7b", method="lora", micro_batch=8, seq_len=1024, lora_targets="all-linear"),
])
def test_savings_are_re_estimated_differences_sorted(job):
    arch, gpu = load_model(job.model), load_gpu("A10G")
    before = estimate_memory(job, arch, gpu)
    assert not before.fits
    expected = {}
    for flags, changed in _by_hand(job, arch).items():
        after = estimate_memory(changed, arch, gpu)
        if after.device_used_bytes < before.device_used_bytes:
            expected[flags] = (before.device_used_bytes - after.device_used_bytes, after.device_used_bytes, after.fits)
    savings = what_if(job, arch, gpu)
    assert savings, "a job that does not fit must get advice"
    assert {s.flags: (s.saved_bytes, s.device_used_bytes, s.fits) for s in savings} == expected
    saved = [s.saved_bytes for s in savings]
    assert saved == sorted(saved, reverse=True) and min(saved) > 0


def test_savings_skip_what_does_not_apply():
    # QLoRA already: no method change; a 4-bit base cannot be LoRA; no half micro-batch at 1
    job = Job(model="llama-2-7b", method="qlora")
    flags = {s.flags for s in what_if(job, load_model("llama-2-7b"), load_gpu("A10G"))}
    assert not flags & {"--method lora", "--method qlora", "--gradient-checkpointing", "--micro-batch 0"}


def test_explain_table_prints_the_savings():
    job = Job(model="llama-2-13b", method="full")
    top = what_if(job, load_model("llama-2-13b"), load_gpu("A10G"))[0]
    out = run("estimate", "-m", "llama-2-13b", "--method", "full", "-g", "A10G", "--explain")
    assert "what would save memory" in out.stdout
    assert top.flags in out.stdout and gib(top.saved_bytes) in out.stdout


# --- fit: margin, headroom, exit code --------------------------------------------------------------

def test_fit_keeps_the_margin_and_prints_headroom():
    arch, gpu = load_model("mistral-7b"), load_gpu("A10G")
    out = run("fit", "-m", "mistral-7b", "-g", "A10G", "--method", "qlora", "-s", "2048", "--json")
    assert out.returncode == 0, out.stderr
    answers = json.loads(out.stdout)
    room = gpu.memory_bytes * (1 - DEFAULT_SAFETY_MARGIN)
    base = Job(model="mistral-7b", method="qlora")
    for field, job in (("micro_batch", base.model_copy(update={"seq_len": 2048})), ("seq_len", base)):
        ans = answers[field]
        assert ans["margin"] == DEFAULT_SAFETY_MARGIN
        at = estimate_memory(job.model_copy(update={field: ans["largest"]}), arch, gpu).device_used_bytes
        over = estimate_memory(job.model_copy(update={field: ans["largest"] + 1}), arch, gpu).device_used_bytes
        assert at == ans["device_used_bytes"] <= room < over
    text = run("fit", "-m", "mistral-7b", "-g", "A10G", "--method", "qlora", "-s", "2048").stdout
    head = gpu.memory_bytes - answers["seq_len"]["device_used_bytes"]
    assert f"headroom {gib(head)} = {head / gpu.memory_bytes:.1%} of the card" in text
    assert "keeping 5% free" in text


def test_fit_margin_option_moves_the_answer():
    tight = json.loads(run("fit", "-m", "mistral-7b", "-g", "A10G", "--method", "qlora", "--safety-margin", "0",
                           "--json").stdout)["seq_len"]
    loose = json.loads(run("fit", "-m", "mistral-7b", "-g", "A10G", "--method", "qlora", "--safety-margin", "0.2",
                           "--json").stdout)["seq_len"]
    assert loose["largest"] < tight["largest"]
    assert loose["gpu_memory_bytes"] - loose["device_used_bytes"] >= 0.2 * loose["gpu_memory_bytes"]


def test_fit_exit_1_when_nothing_fits_and_2_for_a_bad_margin():
    arch, gpu = load_model("llama-2-13b"), load_gpu("T4")
    assert estimate_memory(Job(model="llama-2-13b", method="full", seq_len=1), arch, gpu).device_used_bytes > gpu.memory_bytes
    out = run("fit", "-m", "llama-2-13b", "-g", "T4", "--method", "full")
    assert out.returncode == 1 and "not even" in out.stdout
    bad = run("fit", "-m", "phi-2", "-g", "A10G", "--safety-margin", "1")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "safety-margin" in bad.stderr


# --- recommend: nothing fits -------------------------------------------------------------------

def test_recommend_exit_codes():
    assert run("recommend", "-m", "phi-2", "--method", "lora", "--gpus", "A10G").returncode == 0
    assert run("recommend", "-m", "llama-2-13b", "--gpus", "A10G", "--max-gpus", "4").returncode == 1


def test_nothing_fits_names_changes_that_fit():
    arch, a10g = load_model("llama-2-13b"), load_gpu("A10G")
    base = Job(model="llama-2-13b", seq_len=2048)
    assert not recommend(base, arch, [a10g], 32, max_gpus=4).plans
    advice = nothing_fits(base, arch, [a10g], 32, 4, ALL, DEFAULT_SAFETY_MARGIN)
    assert advice.fixes and advice.cheapest_over_budget is None
    for fix in advice.fixes:
        # every proposed plan is a real one: re-estimated, it fits with the margin
        est = estimate_memory(fix.plan.job, arch, load_gpu(fix.plan.gpu))
        assert est.device_used_bytes == fix.plan.device_used_bytes <= fix.plan.gpu_memory_bytes * (1 - DEFAULT_SAFETY_MARGIN)
    flags = [f.flags for f in advice.fixes]
    # the 8-bit optimizer, least disruptive, is rightly absent: it does not make a plan fit
    assert not recommend(base.model_copy(update={"optimizer": "adamw_8bit"}), arch, [a10g], 32, max_gpus=4).plans
    # the fewest GPUs that fit: 8 does, 4 (the search) did not
    assert flags[0] == "--max-gpus 8" and recommend(base, arch, [a10g], 32, max_gpus=8).plans
    out = run("recommend", "-m", "llama-2-13b", "--gpus", "A10G", "--max-gpus", "4")
    assert out.returncode == 1
    assert "nothing fits 1-4 x A10G; would fit: --max-gpus 8 (fsdp_full, 8 x A10G" in " ".join(out.stdout.split())


def test_nothing_fits_halves_the_sequence_until_a_plan_fits():
    arch, t4 = load_model("llama-3-8b"), load_gpu("T4")
    base = Job(model="llama-3-8b", method="qlora", seq_len=8192)
    advice = nothing_fits(base, arch, [t4], 32, 1, ALL, DEFAULT_SAFETY_MARGIN, most=10)
    seq = [f for f in advice.fixes if f.flags.startswith("--seq-len")]
    assert len(seq) == 1
    s = seq[0].plan.job.seq_len
    assert seq[0].flags == f"--seq-len {s}" and 8192 % s == 0
    assert recommend(base.model_copy(update={"seq_len": s}), arch, [t4], 32, max_gpus=1).plans
    assert not recommend(base.model_copy(update={"seq_len": 2 * s}), arch, [t4], 32, max_gpus=1).plans


def test_qlora_fix_from_mixed_precision_sets_a_4bit_base():
    # fp32 weights (mixed precision): `--method qlora` alone would be refused, the fix names nf4
    arch, a10g = load_model("llama-2-13b"), load_gpu("A10G")
    base = Job(model="llama-2-13b", weight_dtype="fp32", seq_len=2048)
    assert not recommend(base.model_copy(update={"method": "lora"}), arch, [a10g], 32, max_gpus=1).plans
    advice = nothing_fits(base, arch, [a10g], 32, 1, [a10g], DEFAULT_SAFETY_MARGIN, most=10)
    qlora = [f for f in advice.fixes if "--method" in f.flags]
    assert [f.flags for f in qlora] == ["--method qlora --weight-dtype nf4"]
    assert qlora[0].plan.job.method == "qlora" and qlora[0].plan.job.base_weight_dtype is DType.nf4


def test_budget_below_the_cheapest_plan_names_its_cost():
    arch = load_model("llama-2-7b")
    plans = recommend(Job(model="llama-2-7b", method="qlora", seq_len=2048), arch, ALL, 32).plans
    cheapest = min(p.usd_per_hour for p in plans)
    budget = cheapest / 2
    out = run("recommend", "-m", "llama-2-7b", "--method", "qlora", "--budget", str(budget))
    assert out.returncode == 1
    assert f"no plan within ${budget:,.2f}/h; the cheapest plan that fits costs ${cheapest:,.2f}/h" in " ".join(out.stdout.split())


def test_emit_with_nothing_to_emit_writes_nothing(tmp_path):
    path = tmp_path / "accelerate.yaml"
    out = run("recommend", "-m", "llama-2-13b", "--gpus", "A10G", "--max-gpus", "4", "--emit", "accelerate",
              "--emit-path", str(path))
    assert out.returncode == 1 and not path.exists()
    assert "nothing to emit" in out.stdout


def test_inference_that_fits_no_card_is_told_to_split():
    """A 70B model in bf16 on one A100-80GB: tensor parallel over 2, 4 and 8 GPUs, each re-estimated per
    GPU (planner/tensor_parallel.py); the 2-GPU share is what tests/test_tensor_parallel.py derives by hand."""
    from memplan.advice import what_if
    from memplan.profiles import load_gpu, load_model

    job = Job(model="llama-2-70b", task="infer", gpu="A100-80GB")
    got = {s.flags: s for s in what_if(job, load_model("llama-2-70b"), load_gpu("A100-80GB"))}
    assert {"--num-gpus 2 --sharding tp", "--num-gpus 4 --sharding tp", "--num-gpus 8 --sharding tp"} <= set(got)
    two = estimate_memory(job.model_copy(update={"num_gpus": 2, "sharding": "tp"}), load_model("llama-2-70b"),
                          load_gpu("A100-80GB"))
    assert got["--num-gpus 2 --sharding tp"].device_used_bytes == two.device_used_bytes and got[
        "--num-gpus 2 --sharding tp"].fits


# --- estimate --explain: the allocator's share --------------------------------------------------

def test_explain_gives_the_allocator_share_and_what_expandable_segments_change():
    """Gemma-2B full fine-tuning with checkpointing: its replayed slack is a quarter of the device
    figure, and expandable segments (re-estimated here) would give back part of it."""
    from memplan.advice import fragmentation

    job = Job(model="gemma-2b", method="full", micro_batch=4, seq_len=1024, gradient_checkpointing=True)
    arch = load_model("gemma-2b")
    est = estimate_memory(job, arch, None)
    alt = estimate_memory(job.model_copy(update={"expandable_segments": True}), arch, None)
    frag = fragmentation(job, arch, None, est)
    assert est.allocator is not None and frag.large
    assert frag.slack_bytes == est.peak_reserved_bytes - est.peak_allocated_bytes
    assert frag.expandable_slack_bytes == alt.peak_reserved_bytes - alt.peak_allocated_bytes < frag.slack_bytes
    out = run("estimate", "-m", "gemma-2b", "--method", "full", "-b", "4", "-s", "1024", "--gradient-checkpointing",
              "--explain").stdout
    assert f"saving {gib(frag.saved_bytes)}" in " ".join(out.split())


def test_explain_says_when_the_slack_is_a_constant_share():
    """ZeRO-3 has no derived allocation sequence (docs/allocator.md): no expandable figure is
    claimed for it, and the line says the slack is a constant share."""
    from memplan.advice import fragmentation

    job = Job(model="starcoder", method="full", weight_dtype=DType.fp32, num_gpus=3, sharding="zero3")
    arch = load_model("starcoder")
    est = estimate_memory(job, arch, load_gpu("A100-80GB"))
    frag = fragmentation(job, arch, load_gpu("A100-80GB"), est)
    assert est.allocator is None and frag.expandable_slack_bytes is None
    out = " ".join(run("estimate", "-m", "starcoder", "--method", "full", "--weight-dtype", "fp32", "-n", "3",
                       "--sharding", "zero3", "-g", "A100-80GB").stdout.split())
    assert "a constant share of the peak" in out and "expandable_segments:True" not in out.split("caching allocator:")[1][:200]
