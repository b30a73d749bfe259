"""`--from FILE`: the user's own training config (axolotl, TrainingArguments / SFTConfig, litgpt,
torchtune, DeepSpeed) read into a Job, key by key."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from memplan import Job
from memplan.config_files import load_training_config, read_file
from memplan.errors import MemplanInputError
from memplan.from_config import FORMATS, flatten, job_fields, read_training_config

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"
AXOLOTL = EXAMPLES / "axolotl-llama2-qlora.yml"
TRL = EXAMPLES / "trl-sft-config.json"
LITGPT = EXAMPLES / "litgpt-llama2-lora.yaml"
TORCHTUNE = EXAMPLES / "torchtune-llama2-7b-lora.yaml"
DEEPSPEED = EXAMPLES / "ds_zero3_offload.json"
MEMPLAN = [sys.executable, "-m", "memplan.cli"]


def run(*args):
    return subprocess.run([*MEMPLAN, *map(str, args)], capture_output=True, text=True, timeout=60)


def job_from(path, cli=None, fmt=None):
    cli = cli or {}
    fc = load_training_config(str(path), fmt, overridden=set(cli))
    fields, _ = job_fields(fc, cli)
    return Job(**fields)


def when_stack(name: str) -> dict:
    """The format's stack, once this memplan has its rules (planner/stacks)."""
    from memplan.from_config import stack_available

    return {"stack": name} if stack_available(name) else {}


def when_modelled(field: str, value=True) -> dict:
    """Fields the lead adds to Job during this work: expected only once the Job has them."""
    return {field: value} if field in Job.model_fields else {}


# --- each example maps to the exact Job ---------------------------------------------------------

def test_axolotl_qlora_example():
    assert job_from(AXOLOTL) == Job(
        model="meta-llama/Llama-2-7b-hf", method="qlora", weight_dtype="nf4", compute_dtype="bf16", autocast=True,
        optimizer="paged_adamw", micro_batch=1, seq_len=4096, lora_rank=32, lora_alpha=16, lora_dropout=0.05,
        lora_targets="all-linear", gradient_checkpointing=True, **when_modelled("packing"),
        **({"attention": "flash_attention_2"} if "flash_attention_2" in str(Job.model_fields["attention"].annotation)
           else {}))


def test_trl_sft_example_with_its_deepspeed_file():
    assert job_from(TRL, {"model": "mistral-7b"}) == Job(
        model="mistral-7b", micro_batch=4, seq_len=2048, gradient_checkpointing=True, optimizer="adamw", foreach=False,
        compute_dtype="bf16", autocast=True, weight_dtype="bf16", attention="sdpa", sharding="zero3", cpu_offload=True,
        **when_modelled("checkpoint_reentrant", False))


def test_litgpt_lora_example():
    assert job_from(LITGPT) == Job(
        model="meta-llama/Llama-2-7b-hf", **when_stack("litgpt"), method="lora", compute_dtype="bf16", micro_batch=2,
        weight_dtype="bf16", seq_len=512, lora_rank=32, lora_alpha=16, lora_dropout=0.05, lora_targets=("q_proj", "v_proj"),
        adapter_dtype="bf16", gradient_checkpointing=False)


def test_torchtune_lora_example():
    assert job_from(TORCHTUNE) == Job(
        model="meta-llama/Llama-2-7b-hf", **when_stack("torchtune"), method="lora", compute_dtype="bf16", micro_batch=2,
        seq_len=1024, lora_rank=8, lora_alpha=16, lora_dropout=0.0, optimizer="adamw", foreach=False,
        lora_targets=("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), adapter_dtype="bf16",
        gradient_checkpointing=True, **when_modelled("chunked_loss", 8))


def test_deepspeed_file_alone():
    assert job_from(DEEPSPEED, {"model": "llama-2-7b", "num_gpus": 8}) == Job(
        model="llama-2-7b", num_gpus=8, sharding="zero3", cpu_offload=True, optimizer="adamw", foreach=False)


@pytest.mark.parametrize("path, fmt", [(AXOLOTL, "axolotl"), (TRL, "hf"), (LITGPT, "litgpt"), (TORCHTUNE, "torchtune"),
                                       (DEEPSPEED, "deepspeed")])
def test_every_key_is_used_or_ignored(path, fmt):
    fc = load_training_config(str(path), None, overridden={"model"})
    assert fc.format == fmt  # told from the keys
    seen = {u[0] for u in fc.used} | {i[0] for i in fc.ignored}
    keys = {k for k, _ in flatten(read_file(path))}
    if fc.references:
        ref = path.parent / fc.references[0][1]
        keys |= {f"{ref.name}:{k}" for k, _ in flatten(read_file(ref))}
    assert keys - seen == set()
    assert seen - keys == set()


def test_ignored_keys_say_why():
    fc = load_training_config(str(AXOLOTL))
    why = dict(fc.ignored)
    assert "no effect" in why["learning_rate"] and "no effect" in why["datasets"]
    assert why["fp16"] == "null: unset"
    if "packing" not in Job.model_fields:
        assert "not modelled by this memplan" in why["sample_packing"]
    if "flash_attention_2" not in str(Job.model_fields["attention"].annotation):
        assert "not modelled by this memplan" in why["flash_attention"]


def test_fields_the_lead_adds_light_up():
    data = {"base_model": "llama-2-7b", "liger_fused_linear_cross_entropy": True, "peft_use_dora": True,
            "adapter": "lora", "torch_compile": True, "activation_offloading": True, "gradient_checkpointing": True}
    fc = read_training_config(data, None, "x.yml")
    for key, field in [("liger_fused_linear_cross_entropy", "liger"), ("peft_use_dora", "dora"),
                       ("torch_compile", "compile"), ("activation_offloading", "activation_offloading")]:
        if field in Job.model_fields:
            assert fc.fields[field] is True
        else:
            assert field not in fc.fields
            assert f"Job has no {field!r} field" in dict(fc.ignored)[key]


# --- rules of each format (library, fast) -------------------------------------------------------

@pytest.mark.parametrize("data, expected", [
    # axolotl: no bf16 key is its default auto; bf16: false is fp32; fp16: true autocasts fp16
    ({"base_model": "x", "optimizer": "adamw_torch"}, {"autocast": True, "optimizer": "adamw"}),
    ({"base_model": "x", "bf16": False}, {"compute_dtype": "fp32", "foreach": False}),
    ({"base_model": "x", "bf16": "auto", "fp16": True}, {"compute_dtype": "fp16", "autocast": True, "foreach": False}),
    ({"base_model": "x", "float16": True, "bf16": False}, {"compute_dtype": "fp16", "foreach": False}),
    ({"base_model": "x", "adapter": "lora", "load_in_8bit": True, "bf16": False},
     {"method": "lora", "weight_dtype": "int8", "compute_dtype": "fp16", "foreach": False}),
    ({"base_model": "x", "adapter": "qlora", "load_in_4bit": True, "bnb_config_kwargs": {
        "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": False}, "optimizer": "adamw_bnb_8bit"},
     {"method": "qlora", "weight_dtype": "fp4", "double_quant": False, "optimizer": "adamw_8bit", "autocast": True}),
    ({"base_model": "x", "lora_r": 8, "optimizer": "sgd", "deepspeed": {"zero_optimization": {"stage": 2}}},
     {"optimizer": "sgd", "sharding": "zero2", "autocast": True}),  # no adapter: LoRA keys unused
    ({"base_model": "x", "fsdp": ["full_shard", "auto_wrap"], "fsdp_config": {"fsdp_offload_params": True}},
     {"sharding": "fsdp_full", "cpu_offload": True, "autocast": True, "foreach": False}),
    # peft_autocast_adapter_dtype: false keeps LoRA weights in the base's dtype
    ({"base_model": "x", "adapter": "lora", "peft_autocast_adapter_dtype": False, "bf16": True},
     {"method": "lora", "adapter_dtype": "bf16", "compute_dtype": "bf16", "autocast": True, "foreach": False}),
    # axolotl 0.21: an fsdp_config alone runs FSDP2 (full shard unless reshard_after_forward is false)
    ({"base_model": "x", "fsdp_config": {"offload_params": True, "version": 2}},
     {"sharding": "fsdp_full", "cpu_offload": True, "autocast": True, "foreach": False, "fsdp_version": 2}),
    ({"base_model": "x", "fsdp_config": {"reshard_after_forward": False}, "activation_offloading": "legacy",
      "gradient_checkpointing": True},
     {"sharding": "fsdp_grad_op", "gradient_checkpointing": True, "autocast": True, "foreach": False,
      **when_modelled("activation_offloading")}),
    ({"base_model": "x", "fsdp_config": {"fsdp_sharding_strategy": "SHARD_GRAD_OP"}},
     {"sharding": "fsdp_grad_op", "autocast": True, "foreach": False}),
])
def test_axolotl_rules(data, expected):
    fields = read_training_config(data, "axolotl", "x.yml").fields
    assert {k: v for k, v in fields.items() if k != "model"} == expected


@pytest.mark.parametrize("data, expected", [
    # plain TrainingArguments: batch 8, adamw_torch_fused, fp32 unless bf16 / fp16
    ({"output_dir": "o"}, {"micro_batch": 8, "foreach": False, "compute_dtype": "fp32"}),
    ({"bf16": True, "optim": "adamw_torch"}, {"micro_batch": 8, "optimizer": "adamw", "compute_dtype": "bf16",
                                              "autocast": True}),
    # TRL: SFTTrainer loads float32 unless dtype is given; max_length 1024
    ({"max_length": None, "bf16": True},
     {"micro_batch": 8, "foreach": False, "compute_dtype": "bf16", "autocast": True, "weight_dtype": "fp32",
      "seq_len": 1024}),
    ({"use_peft": True, "load_in_4bit": True, "dtype": "bfloat16", "bf16": True, "per_device_train_batch_size": 1,
      "max_length": 512, "lora_target_modules": "all-linear", "optim": "paged_adamw_8bit"},
     {"method": "qlora", "weight_dtype": "nf4", "double_quant": False, "lora_dropout": 0.05, "compute_dtype": "bf16",
      "autocast": True, "micro_batch": 1, "seq_len": 512, "lora_targets": "all-linear", "optimizer": "paged_adamw_8bit"}),
    ({"fsdp": "hybrid_shard offload", "fsdp_config": {"activation_checkpointing": True}, "fp16": True},
     {"sharding": "fsdp_hybrid", "cpu_offload": True, "gradient_checkpointing": True, "compute_dtype": "fp16",
      "autocast": True, "micro_batch": 8, "foreach": False}),
    # dtype auto: the checkpoint's dtype, not resolved: no fp32 assumption (the weights follow the compute dtype)
    ({"model_name_or_path": "m", "model_init_kwargs": {"dtype": "auto"}, "bf16": True},
     {"model": "m", "micro_batch": 8, "foreach": False, "compute_dtype": "bf16", "autocast": True, "seq_len": 1024}),
    ({"deepspeed": {"zero_optimization": {"stage": 1}, "train_micro_batch_size_per_gpu": 2}},
     {"sharding": "zero1", "micro_batch": 2, "compute_dtype": "fp32", "foreach": False}),
])
def test_hf_rules(data, expected):
    assert read_training_config(data, "hf", "args.json").fields == expected


@pytest.mark.parametrize("data, expected", [
    # no precision: bf16-mixed (fp32 weights); full fine-tuning without lora keys
    ({"checkpoint_dir": "checkpoints/meta-llama/Llama-2-7b-hf"},
     {"weight_dtype": "fp32", "gradient_checkpointing": False}),
    # quantize: qlora, adapters in the precision's dtype, bnb PagedAdamW replaces AdamW, litgpt LoRA defaults
    ({"checkpoint_dir": "checkpoints/x/y", "precision": "bf16-true", "quantize": "bnb.nf4-dq"},
     {"method": "qlora", "weight_dtype": "nf4", "double_quant": True, "kbit_prepare": False, "lora_rank": 8,
      "compute_dtype": "bf16",
      "lora_alpha": 16, "lora_dropout": 0.05, "adapter_dtype": "bf16", "lora_targets": ("q_proj", "v_proj"),
      "optimizer": "paged_adamw", "gradient_checkpointing": False}),
    # more than one GPU: full shard and checkpointing of every Block
    ({"checkpoint_dir": "checkpoints/x/y", "precision": "bf16-true", "devices": 4, "num_nodes": 2, "lora_mlp": True,
      "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"momentum": 0.9}}},
     {"method": "lora", "num_gpus": 8, "gpus_per_node": 4, "sharding": "fsdp_full", "gradient_checkpointing": True,
      "compute_dtype": "bf16", "weight_dtype": "bf16",
      "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.05, "adapter_dtype": "bf16", "optimizer": "sgd_momentum",
      "lora_targets": ("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj")}),
])
def test_litgpt_rules(data, expected):
    fields = read_training_config(data, "litgpt", "c.yaml").fields
    fields.pop("model")
    assert fields == {**when_stack("litgpt"), **expected}


@pytest.mark.parametrize("builder, model, method", [
    ("torchtune.models.llama3.qlora_llama3_8b", "meta-llama/Meta-Llama-3-8B", "qlora"),
    ("torchtune.models.mistral.lora_mistral_7b", "mistralai/Mistral-7B-v0.1", "lora"),
    ("torchtune.models.qwen2_5.lora_qwen2_5_7b_instruct", "Qwen/Qwen2.5-7B", "lora"),
    ("torchtune.models.gemma.gemma_2b", "google/gemma-2b", "full"),
])
def test_torchtune_builders(builder, model, method):
    data = {"model": {"_component_": builder, "lora_attn_modules": ["q_proj", "k_proj"]}, "batch_size": 1}
    fc = read_training_config(data, None, "r.yaml")
    assert (fc.fields["model"], fc.fields.get("method", "full")) == (model, method)
    fields, _ = job_fields(fc, {})
    Job(**fields)  # a valid job: a full builder's LoRA keys are not passed on


def test_torchtune_builder_without_a_shipped_model():
    data = {"model": {"_component_": "torchtune.models.phi3.lora_phi3_mini", "lora_attn_modules": ["q_proj"]}}
    fc = read_training_config(data, "torchtune", "r.yaml")
    assert "model" not in fc.fields
    assert "lora_phi3_mini" in fc.model_missing and "llama2_7b" in fc.model_missing
    fields, _ = job_fields(fc, {"model": "phi-2"})  # --model resolves it
    assert fields["model"] == "phi-2"


@pytest.mark.parametrize("fmt, data, words", [
    ("axolotl", {"base_model": "x", "lora_r": -3}, ["x.yml: lora_r: -3", "positive integer"]),
    ("axolotl", {"base_model": "x", "optimizer": "adafactor"}, ["optimizer 'adafactor' is not one memplan models",
                                                                 "adamw_torch_fused", "--optimizer"]),
    ("axolotl", {"base_model": "x", "lora_dropout": 1.5}, ["lora_dropout: 1.5", "from 0"]),
    ("axolotl", {"base_model": "x", "adapter": "ia3"}, ["adapter: 'ia3'", "lora or qlora"]),
    ("axolotl", {"base_model": "x", "load_in_4bit": True}, ["load_in_4bit", "adapter: qlora"]),
    ("axolotl", {"base_model": "x", "adapter": "qlora"}, ["qlora needs load_in_4bit"]),
    ("axolotl", {"base_model": "x", "micro_batch_size": "2"}, ["micro_batch_size: '2'"]),
    ("hf", {"bf16": True, "fp16": True}, ["bf16 and fp16 are both true"]),
    ("hf", {"fsdp": "full_shard sideways"}, ["fsdp: 'full_shard sideways'"]),
    ("hf", {"deepspeed": {"zero_optimization": {"stage": 4}}}, ["zero_optimization.stage: 4", "0, 1, 2 or 3"]),
    ("hf", {"activation_checkpointing_kwargs": {"every_n_layers": 2}}, ["every_n_layers: 2"]),
    ("litgpt", {"checkpoint_dir": "checkpoints/a/b", "precision": "fp8"}, ["precision: 'fp8'", "bf16-true"]),
    ("litgpt", {"checkpoint_dir": "checkpoints/a/b", "quantize": "bnb.nf4"}, ["mixed precision", "bf16-true"]),
    ("torchtune", {"model": {"_component_": "torchtune.models.llama2.lora_llama2_7b", "lora_attn_modules": ["q"]}},
     ["lora_attn_modules: ['q']", "output_proj"]),
    ("torchtune", {"model": {"_component_": "torchtune.models.llama2.llama2_7b"}, "dtype": "fp16"},
     ["dtype: 'fp16'", "bf16 or fp32"]),
    ("torchtune", {"model": {"_component_": "torchtune.models.llama2.llama2_7b"},
                   "optimizer": {"_component_": "torchao.optim.AdamW8bit"}}, ["'torchao.optim.AdamW8bit' is not one"]),
])
def test_bad_values_one_line(fmt, data, words):
    with pytest.raises(MemplanInputError) as exc:
        read_training_config(data, fmt, {"axolotl": "x.yml"}.get(fmt, "c.yaml"))
    msg = str(exc.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_a_command_line_option_overrides_and_skips_the_key():
    # an optimizer memplan does not model is refused, unless --optimizer replaces it
    data = {"base_model": "llama-2-7b", "optimizer": "adafactor", "micro_batch_size": 2}
    fc = read_training_config(data, "axolotl", "x.yml", overridden={"optimizer"})
    fields, _ = job_fields(fc, {"optimizer": "sgd"})
    assert fields["optimizer"] == "sgd" and "overridden" in dict(fc.ignored)["optimizer"]


def test_method_full_on_the_command_line_drops_the_files_lora_settings():
    fc = load_training_config(str(AXOLOTL), overridden={"method"})
    fields, dropped = job_fields(fc, {"method": "full"})
    job = Job(**fields)
    assert job.method == "full" and job.weight_dtype is None
    assert {d[0] for d in dropped} >= {"lora_rank", "lora_targets", "weight_dtype"}


def test_unknown_format_and_undetectable_file():
    with pytest.raises(MemplanInputError, match="unknown config format 'ludwig'"):
        read_training_config({"base_model": "x"}, "ludwig", "x.yml")
    with pytest.raises(MemplanInputError, match="cannot tell the config's format"):
        read_training_config({"hello": 1}, None, "x.yml")
    with pytest.raises(MemplanInputError, match="keys of litgpt and axolotl"):
        read_training_config({"checkpoint_dir": "a", "base_model": "b"}, None, "x.yml")
    assert set(FORMATS) == {"axolotl", "hf", "litgpt", "torchtune", "deepspeed"}


# --- the command line ----------------------------------------------------------------------------

def _estimate(*args):
    out = run("estimate", *args, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_estimate_from_file_equals_estimate_from_flags():
    from_file = _estimate("--from", AXOLOTL)
    report = from_file.pop("from_config")
    flags = _estimate("-m", "meta-llama/Llama-2-7b-hf", "--method", "qlora", "--weight-dtype", "nf4",
                      "--compute-dtype", "bf16", "--autocast", "--optimizer", "paged_adamw", "-b", "1", "-s", "4096",
                      "-r", "32", "--lora-alpha", "16", "--lora-dropout", "0.05", "--lora-targets", "all-linear",
                      "--gradient-checkpointing", "--packing", "--attention", "flash_attention_2")
    assert from_file == flags
    assert from_file["peak_allocated_bytes"] == flags["peak_allocated_bytes"] > 0
    assert report["format"] == "axolotl" and ["micro_batch_size", 1, "micro_batch", 1] in report["used"]


def test_estimate_from_trl_file_equals_flags():
    from_file = _estimate("--from", TRL, "-m", "mistral-7b", "-n", "8")
    from_file.pop("from_config")
    flags = _estimate("-m", "mistral-7b", "-n", "8", "-b", "4", "-s", "2048", "--gradient-checkpointing",
                      "--no-foreach", "--compute-dtype", "bf16", "--autocast", "--weight-dtype", "bf16",
                      "--sharding", "zero3", "--cpu-offload", "--no-checkpoint-reentrant")
    assert from_file == flags


def test_command_line_overrides_the_file():
    out = run("estimate", "--from", AXOLOTL, "--micro-batch", "4", "--seq-len", "1024", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert (data["job"]["micro_batch"], data["job"]["seq_len"], data["job"]["lora_rank"]) == (4, 1024, 32)
    ignored = dict(map(tuple, data["from_config"]["ignored"]))
    assert "overridden" in ignored["micro_batch_size"] and "overridden" in ignored["sequence_len"]


def test_text_output_lists_used_and_ignored_keys_on_stderr():
    out = run("estimate", "--from", TORCHTUNE)
    assert out.returncode == 0, out.stderr
    assert "Peak torch allocated" in out.stdout and "read from" not in out.stdout
    assert "model._component_: torchtune.models.llama2.lora_llama2_7b -> model=meta-llama/Llama-2-7b-hf" in out.stderr
    assert "ignored, no effect on per-GPU memory" in out.stderr and "lr_scheduler._component_" in out.stderr


def test_fit_and_recommend_from_file():
    out = run("fit", "--from", AXOLOTL, "--gpu", "A10G")
    assert out.returncode == 0, out.stderr
    assert "qlora training" in out.stdout and "at 4096 tokens" in out.stdout  # the file's method and sequence
    out = run("recommend", "--from", LITGPT, "--gpus", "A10G", "--max-gpus", "1", "--global-batch", "8", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["seq_len"] == 512 and data["plans"][0]["job"]["adapter_dtype"] == "bf16"  # litgpt's adapters
    assert data["plans"][0]["job"]["stack"] == when_stack("litgpt").get("stack", data["plans"][0]["job"]["stack"])
    assert {"micro_batch", "gradient_checkpointing"} <= {d[0] for d in data["from_config"]["not_passed"]}


@pytest.mark.parametrize("content, args, words", [
    ("base_model: llama-2-7b\nlora_r: -3\nadapter: lora\n", [], ["lora_r: -3", "positive integer"]),
    ("base_model: llama-2-7b\noptimizer: adafactor\n", [], ["adafactor", "not one memplan models"]),
    ("base_model: llama-2-7b\n", ["--from-format", "ludwig"], ["unknown config format 'ludwig'"]),
    ("hello: 1\n", [], ["cannot tell the config's format", "--from-format"]),
    ("base_model: [unclosed\n", [], ["is not valid YAML"]),
    ("per_device_train_batch_size: 2\n", [], ["names no model", "--model"]),
    ("base_model: llama-2-7b\ndeepspeed: missing_ds.json\n", [], ["missing_ds.json", "does not exist"]),
    ("base_model: llama-2-7b\ndeepspeed: {zero_optimization: {stage: 3, offload_param: {device: cpu}}}\n",
     ["--sharding", "none"], ["cpu offload needs a sharded strategy", "(the job read from", "with the options given here"]),
])
def test_bad_files_one_line_exit_2(tmp_path, content, args, words):
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(content)
    out = run("estimate", "--from", cfg, *args)
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("memplan: error: ")
    for w in words:
        assert w in lines[0]


def test_missing_file_and_no_model():
    out = run("estimate", "--from", "/nonexistent/axolotl.yml")
    assert out.returncode == 2 and "does not exist" in out.stderr
    out = run("estimate")
    assert out.returncode == 2 and "--model" in out.stderr


def test_yaml_only_on_the_from_path():
    code = "import sys, memplan.cli; print('yaml' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_task_infer_on_the_command_line_keeps_the_model_and_its_base():
    fc = load_training_config(str(AXOLOTL), overridden={"task"})
    fields, dropped = job_fields(fc, {"task": "infer"})
    assert Job(**fields) == Job(model="meta-llama/Llama-2-7b-hf", task="infer", weight_dtype="nf4", seq_len=4096,
                                attention="flash_attention_2")
    assert {"method", "optimizer", "lora_rank", "autocast"} <= {d[0] for d in dropped}
