"""recommend, fit and the accelerate config they emit."""

import subprocess
import sys

import pytest

from memplan import Job, estimate_memory
from memplan.emit import accelerate_config
from memplan.errors import MemplanInputError
from memplan.fit import DEFAULT_SAFETY_MARGIN, largest
from memplan.profiles import gpu_names, load_gpu, load_model
from memplan.recommend import recommend
from memplan.throughput import flops_per_token

ALL = [load_gpu(g) for g in gpu_names()]


def test_every_plan_fits_and_adds_up():
    arch = load_model("llama-2-7b")
    result = recommend(Job(model="llama-2-7b", method="lora", seq_len=1024), arch, ALL, global_batch=64, max_gpus=8)
    # the search stays bounded (a wall-clock limit would fail on a loaded CI machine): each
    # (GPU, count, sharding, checkpointing) stops at the first micro-batch that does not fit
    assert result.searched <= 100 * len(ALL)
    assert result.plans
    for p in result.plans:
        assert p.micro_batch * p.grad_accum * p.num_gpus == 64
        est = estimate_memory(p.job, arch, load_gpu(p.gpu), replay_allocator=False)
        assert est.device_used_bytes == p.device_used_bytes <= p.gpu_memory_bytes * (1 - result.safety_margin)
    costs = [p.usd_per_million_tokens for p in result.plans]
    assert costs == sorted(costs) or max(b - a for a, b in zip(costs, costs[1:])) >= -1e-9


def test_largest_micro_batch_is_chosen():
    arch = load_model("llama-2-7b")
    gpu = load_gpu("A100-80GB")
    result = recommend(Job(model="llama-2-7b", method="qlora", seq_len=1024), arch, [gpu], global_batch=64, max_gpus=1)
    p = result.plans[0]
    bigger = p.job.model_copy(update={"micro_batch": p.micro_batch * 2})
    assert estimate_memory(bigger, arch, gpu, replay_allocator=False).device_used_bytes > gpu.memory_bytes * 0.95 or p.micro_batch == 64


def test_budget_and_bf16_support():
    arch = load_model("phi-2")
    result = recommend(Job(model="phi-2", method="lora", seq_len=512), arch, ALL, global_batch=16, budget_usd_per_hour=1.0)
    assert all(p.usd_per_hour <= 1.0 for p in result.plans)
    assert all(p.compute_dtype == "fp16" for p in result.plans if p.gpu == "T4")


def test_70b_full_finetune_needs_sharding():
    arch = load_model("llama-2-70b")
    result = recommend(Job(model="llama-2-70b", method="full", seq_len=2048), arch, [load_gpu("H100-80GB")],
                       global_batch=64, max_gpus=64)
    assert result.plans and all(p.sharding == "fsdp_full" and p.num_gpus >= 16 for p in result.plans)


def test_flops_by_hand():
    arch = load_model("llama-2-7b")
    n = 6_738_415_616
    attn = 2 * 32 * 1024 * 4096
    full = Job(model="llama-2-7b", method="full", seq_len=1024)
    assert flops_per_token(full, arch) == 3 * (2 * n + attn)
    lora_ckpt = Job(model="llama-2-7b", method="lora", seq_len=1024, gradient_checkpointing=True)
    assert flops_per_token(lora_ckpt, arch) == 3 * (2 * n + attn)  # no weight gradients, one recompute


@pytest.mark.parametrize(
    "job, field",
    [
        (Job(model="llama-2-7b", method="qlora", seq_len=2048), "micro_batch"),
        (Job(model="llama-2-7b", method="full", seq_len=512), "micro_batch"),
        (Job(model="mistral-7b", method="lora", micro_batch=4, gradient_checkpointing=True), "seq_len"),
        (Job(model="llama-3-8b", task="infer", seq_len=4096, new_tokens=256), "micro_batch"),
        (Job(model="llama-3-8b", task="infer", new_tokens=256), "seq_len"),
    ],
)
def test_fit_finds_the_boundary(job, field):
    arch = load_model(job.model)
    gpu = load_gpu("A10G")
    ans = largest(job, arch, gpu, field)
    assert ans.margin == DEFAULT_SAFETY_MARGIN > 0
    room = gpu.memory_bytes * (1 - ans.margin)
    if ans.largest == 0:
        assert estimate_memory(job.model_copy(update={field: 1}), arch, gpu).device_used_bytes > room
        return
    at = estimate_memory(job.model_copy(update={field: ans.largest}), arch, gpu)
    assert at.device_used_bytes == ans.device_used_bytes <= room
    assert ans.headroom_bytes == gpu.memory_bytes - at.device_used_bytes >= gpu.memory_bytes * ans.margin
    if ans.largest < ans.limit:
        over = estimate_memory(job.model_copy(update={field: ans.largest + 1}), arch, gpu)
        assert over.device_used_bytes > room


def test_fit_without_margin_can_fill_the_card():
    # the margin is what keeps the answer off the card's edge: with none, the longest sequence
    # leaves less than the default margin free (mistral-7b QLoRA on an A10G fills it to the byte)
    arch = load_model("mistral-7b")
    gpu = load_gpu("A10G")
    job = Job(model="mistral-7b", method="qlora", micro_batch=1)
    bare, kept = largest(job, arch, gpu, "seq_len", margin=0.0), largest(job, arch, gpu, "seq_len")
    assert kept.largest < bare.largest
    assert bare.headroom_bytes < gpu.memory_bytes * DEFAULT_SAFETY_MARGIN <= kept.headroom_bytes


def test_margin_is_checked_in_the_core():
    arch = load_model("phi-2")
    for bad in (-0.1, 1.0):
        with pytest.raises(MemplanInputError, match="safety-margin"):
            largest(Job(model="phi-2"), arch, load_gpu("A10G"), "micro_batch", margin=bad)


@pytest.mark.parametrize(
    "sharding, n, offload, kind",
    [("none", 1, False, "NO"), ("ddp", 4, False, "MULTI_GPU"), ("zero3", 8, True, "DEEPSPEED"),
     ("fsdp_full", 16, False, "FSDP"), ("fsdp_hybrid", 16, False, "FSDP")],
)
def test_accelerate_config_loads(tmp_path, sharding, n, offload, kind):
    pytest.importorskip("accelerate")
    from accelerate.commands.config.config_args import ClusterConfig

    job = Job(model="mistral-7b", method="full", num_gpus=n, sharding=sharding, cpu_offload=offload,
              gradient_checkpointing=True, micro_batch=2)
    path = tmp_path / "cfg.yaml"
    path.write_text(accelerate_config(job, load_model("mistral-7b"), grad_accum=4))
    cfg = ClusterConfig.from_yaml_file(str(path))
    assert cfg.distributed_type.value == kind
    assert cfg.num_processes == n
    if kind == "FSDP":
        assert cfg.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "MistralDecoderLayer"
    if kind == "DEEPSPEED":
        assert cfg.deepspeed_config["zero_stage"] == 3 and cfg.deepspeed_config["offload_param_device"] == "cpu"


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "memplan.cli", *args], capture_output=True, text=True, timeout=60)


def test_cli_recommend_emits_and_fit_answers(tmp_path):
    out = _cli("recommend", "-m", "llama-2-13b", "--method", "lora", "--gpus", "A100-80GB,L40S", "--max-gpus", "4",
               "--emit", "accelerate", "--emit-path", str(tmp_path / "a.yaml"))
    assert out.returncode == 0, out.stderr
    assert "USD / 1M tok" in out.stdout and (tmp_path / "a.yaml").exists()
    fit = _cli("fit", "-m", "llama-2-7b", "-g", "A10G", "--method", "qlora")
    assert fit.returncode == 0 and "largest micro-batch" in fit.stdout


@pytest.mark.parametrize(
    "args, words",
    [(["recommend", "-m", "llama-2-7b", "--global-batch", "0"], "global-batch"),
     (["recommend", "-m", "llama-2-7b", "--gpus", "TPU-v5e"], "unknown GPU"),
     (["recommend", "-m", "llama-2-7b", "--price", "H100-80GB=cheap"], "NAME=USD"),
     (["recommend", "-m", "llama-2-7b", "--emit", "slurm"], "accelerate"),
     (["fit", "-m", "llama-2-7b", "-g", "A10GX"], "A10G")],
)
def test_cli_bad_input(args, words):
    out = _cli(*args)
    assert out.returncode == 2 and words in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_step_time_is_the_roofline_of_compute_and_weight_traffic():
    from memplan.throughput import flops_per_token, step_seconds

    arch = load_model("llama-2-7b")
    n = 6_738_415_616  # Llama-2-7B's parameters (tests/test_params.py)
    h20, h100 = load_gpu("h20"), load_gpu("h100")
    # 8 tokens per micro-batch of full bf16 fine-tuning on the H20 (148 TFLOP/s, 4.0 TB/s): reading every
    # weight twice and writing its gradient (3 x 2 B per weight) takes longer than the FLOPs at 38% MFU
    short = Job(model="llama-2-7b", method="full", micro_batch=1, seq_len=8)
    memory = 3 * n * 2 / 4.0e12
    compute = flops_per_token(short, arch) * 8 / (148e12 * 0.38)
    assert compute < memory and step_seconds(short, arch, h20, 8, 0.38) == pytest.approx(memory, rel=1e-12)
    # LoRA reads the frozen weights twice and writes no gradient for them
    lora = short.model_copy(update={"method": "lora", "seq_len": 4})
    assert step_seconds(lora, arch, h20, 4, 0.38) == pytest.approx(2 * n * 2 / 4.0e12, rel=1e-12)
    # at 128 tokens the same card is compute-bound
    assert step_seconds(short.model_copy(update={"seq_len": 128}), arch, h20, 128, 0.38) > 5 * memory
    # 4,096 tokens per micro-batch on the H100: compute-bound, the FLOP model alone
    long = Job(model="llama-2-7b", method="full", micro_batch=1, seq_len=4096)
    assert step_seconds(long, arch, h100, 4096, 0.38) == pytest.approx(
        flops_per_token(long, arch) * 4096 / (989e12 * 0.38), rel=1e-12)
