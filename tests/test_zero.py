"""DeepSpeed ZeRO-1/2/3 per rank, derived by hand from DeepSpeed 0.19.8's source (docs/deepspeed.md
gives every formula with file and line). The arithmetic is written out here, not taken from the model.

Named jobs: Llama-2-7B, full fine-tuning in bf16 (accelerate `mixed_precision: bf16`), micro-batch 1,
512 tokens, 8 GPUs, accelerate's DeepSpeed plugin defaults (DeepSpeed's own defaults for every knob
but the stage and offload devices), torch AdamW (foreach) from the Trainer or the user."""

import json

import pytest

from memplan import Job, estimate, estimate_memory
from memplan.emit import accelerate_config, accelerate_files, deepspeed_config
from memplan.errors import MemplanInputError
from memplan.from_config import read_training_config
from memplan.params import count_params
from memplan.profiles import load_model
from memplan.stacks import get
from memplan.zero import ZeroConfig, layout, per_rank

P = 6_738_415_616  # Llama-2-7B parameters
N = 8
p = P // 8  # 842,301,952: this rank's partition (P is a multiple of 2 x 8, and every tensor of 8)
WS = 2 * 32 * 2**20  # two cuBLAS workspaces (forward and autograd threads)
ROPE = 512  # inv_freq and its original copy, 2 x 64 fp32, replicated
BUCKET = 500_000_000 * 2  # reduce_bucket_size 5e8 elements of bf16 (config.py default)
VOCAB_H = 32_000 * 4_096  # the embedding (and the untied lm_head): the largest tensor
LAYER = 4 * 4096 * 4096 + 3 * 4096 * 11008  # 202,375,168 elements of linears per decoder layer
NORMS = 2 * 32 + 1  # RMSNorm weights of 4,096 each: under stage3_param_persistence_threshold 1e5
T = 512  # tokens per micro-batch
# ZeRO-1/2's grads_in_partition holds the whole gradients of the parameters overlapping the rank's
# slice of the flat buffer (registration order: embedding, then per layer q, k, v, o, gate, up, down
# and the two norms). Rank 0's slice [0, p): the embedding and layers 0-2 (738,222,080 elements),
# then layer 3's q, k, v, o (805,330,944) and gate_proj, which crosses p: held whole.
GIP = VOCAB_H + 3 * (LAYER + 2 * 4096) + 4 * 4096 * 4096 + 4096 * 11008
assert GIP == 850_419_712 and GIP - 4096 * 11008 < p <= GIP


def _job(sharding, **kw):
    return Job(model="llama-2-7b", method="full", num_gpus=N, sharding=sharding, **kw)


def _est(sharding, **kw):
    return estimate(model="llama-2-7b", method="full", num_gpus=N, sharding=sharding, **kw)


def _phase(est, name):
    return next(ph.allocated_bytes for ph in est.phases if ph.name == name)


def _at(est, row, phase):
    """A row's bytes at a phase (0 where the row is not live there or not listed)."""
    return next((c.phase_bytes.get(phase, 0) for c in est.components if c.name == row), 0)


def test_zero2_by_hand():
    est = _est("zero2")
    # bf16 weights whole on every rank: one flat buffer of P elements (P is a multiple of 2 x 8)
    assert est.component("weights").bytes == 2 * P == 13_476_831_232
    # fp32 master partition 4p, Adam exp_avg and exp_avg_sq of it 8p
    assert est.component("fp32 master weights").bytes == 4 * p == 3_369_207_808
    assert est.component("optimizer states").bytes == 8 * p == 6_738_415_616
    # backward: the bf16 gradient partition (grads_in_partition, contiguous_gradients), ONE ipg
    # bucket (overlap_comm defaults to False below stage 3), its flattened copy while it reduces,
    # and the largest gradient before its hook copies it into the bucket
    assert _at(est, "gradient partition", "backward") == 2 * GIP
    assert _at(est, "reduce buckets", "backward") == BUCKET
    assert _at(est, "bucket reduction copy", "backward") == BUCKET
    assert _at(est, "unreduced gradient", "backward") == 2 * VOCAB_H
    assert est.bytes_of("gradients") == 0  # no whole gradients outlive their hook
    # the step: the gradient partition + its flattened copy 2p + the fp32 cast 4p, more than the fp32
    # gradient 4p + torch's foreach temporary 4p of the update
    assert 2 * GIP + 2 * p + 4 * p > 4 * p + 4 * p
    step = 2 * P + ROPE + 8 * p + 4 * p + WS + (2 * GIP + 2 * p + 4 * p)
    assert _phase(est, "optimizer step") == step == 30_406_215_168
    assert est.host_bytes == 0


def test_zero3_by_hand():
    est = _est("zero3")
    # 1/8 of every tensor in bf16; the 65 norms persistent: also whole, kept gathered
    assert est.component("weights").bytes == 2 * p == 1_684_603_904
    assert est.component("persistent parameters").bytes == NORMS * 4096 * 2 == 532_480
    # allocated at init, so live from the first forward: the bf16 gradient partition and one ipg bucket
    assert _at(est, "gradient partition", "forward") == 2 * p
    assert _at(est, "reduce buckets", "forward") == BUCKET
    # the step runs one sub-group (842M < sub_group_size 1e9): fp32 gradient 4p + foreach temporary
    # 4p (> the flattened bf16 copy 2p + fp32 cast 4p); every parameter, persistent ones too, released
    # first (`_partition_all_parameters`) and the persistent ones gathered again after it
    step = 2 * p + 4 * p + 8 * p + 2 * p + BUCKET + (4 * p + 4 * p) + ROPE + WS
    assert _phase(est, "optimizer step") == step == 21_282_356_224
    assert "optimizer step" not in est.component("persistent parameters").phase_bytes
    assert est.peak_phase == "optimizer step"
    # with the defaults each fetch prefetches up to 5e7 more elements while fewer than
    # stage3_max_live_parameters (1e9) are gathered or in flight: bounded by that, plus the module
    # being fetched (at most the 131M-element head), counted twice at most (a batch's flat buffer
    # lives until its last parameter is used, beside the parameters it materialised)
    fwd = _at(est, "gathered parameters", "forward") + _at(est, "all-gather buffers", "forward")
    assert 2 * (2 * LAYER) < fwd <= 2 * 2 * (1_000_000_000 + VOCAB_H)


def test_zero3_reuse_distance_by_hand():
    """Prefetch off (stage3_prefetch_bucket_size 0): what stays gathered is what
    `__params_to_release` keeps: a parameter whose next use comes before stage3_max_reuse_distance
    (1e9) elements of the module trace. After module m of layer k (a elements of the layer follow it)
    the walk to its backward use crosses the rest of layer k (a), layers k+1..31 forward and
    backward, the final norm and lm_head twice, and the a elements of layer k's backward before m:
    2a + 2 (31 - k) L + 2 H + 2 x 4,096, with L = a layer's 202,383,360 elements (norms included)."""
    L, H = LAYER + 2 * 4096, VOCAB_H
    fixed = 2 * L + 2 * H + 2 * 4096  # layer 30
    assert fixed == 666_918_912
    # layer 31 (k = 31): 2a + 2H + 8192 < 1e9 for every module: all kept
    # layer 30: kept iff 2a < 1e9 - 666,918,912, i.e. a < 166,540,544: down (a = 0), up, gate
    # (a = 2 x 45,088,768), o_proj (the MLP 135,266,304 + the second norm 4,096), v_proj (+ o 16,777,216);
    # k_proj (+ v) and q_proj released
    assert 2 * (135_266_304 + 4096 + 16_777_216) < 1e9 - fixed < 2 * (135_266_304 + 4096 + 2 * 16_777_216)
    # layer 29: 2a + 4L + 2H + 8192 >= 1,071,685,632 > 1e9: released
    assert 4 * L + 2 * H + 2 * 4096 > 1e9
    kept = LAYER + (2 * 16_777_216 + 3 * 45_088_768)
    est = _est("zero3", deepspeed=ZeroConfig(stage3_prefetch_bucket_size=0))
    # at the head's forward: layer 31, layer 30's last five projections and the head itself (a batch of
    # one parameter: `param.data` is a view of its all-gather buffer, 131,072,000 elements, a multiple of 8)
    assert _at(est, "gathered parameters", "forward") == 2 * (kept + H) == 1_004_535_808
    assert _at(est, "all-gather buffers", "forward") == 0
    assert _at(est, "gathered parameters", "loss backward") == 2 * (kept + H)
    # stage3_max_reuse_distance 0: every module released after use, only the head gathered at the end
    bare = _est("zero3", deepspeed=ZeroConfig(stage3_prefetch_bucket_size=0, stage3_max_reuse_distance=0))
    assert _at(bare, "gathered parameters", "forward") == 2 * H


def test_zero3_offload_by_hand():
    job = _job("zero3", cpu_offload=True)  # accelerate: offload_optimizer_device cpu, offload_param_device cpu
    est = estimate_memory(job, load_model("llama-2-7b"))
    # on the GPU: the persistent norms' partitions (512 elements each) and their whole copies, the ipg
    # bucket; no master, states or gradient partition (the optimizer runs on the host: CPU Adam)
    assert est.component("weights").bytes == NORMS * 512 * 2 == 66_560
    assert est.bytes_of("fp32 master weights") == est.bytes_of("optimizer states") == 0
    assert est.bytes_of("gradient partition") == 0
    step = NORMS * 512 * 2 + BUCKET + ROPE + WS
    assert _phase(est, "optimizer step") == step == 1_067_175_936
    # host RAM: fp32 master 4p, bf16 gradient partition 2p (pinned), fp32 gradient 4p (pinned), Adam
    # states 8p, and the bf16 partitions of every non-persistent parameter (pinned)
    params16 = 2 * (P - NORMS * 4096) // 8
    assert est.host_bytes == 18 * p + params16 == 16_845_972_480
    arch = load_model("llama-2-7b")
    zr = per_rank(job, arch, (), get(job.stack), P, VOCAB_H)
    assert zr.host_pinned == 2 * p + 4 * p + params16
    unpinned = per_rank(_job("zero3", cpu_offload=True, deepspeed=ZeroConfig(
        offload_optimizer_pin_memory=False, offload_param_pin_memory=False)), arch, (), get(job.stack), P, VOCAB_H)
    assert unpinned.host == zr.host and unpinned.host_pinned == 0


def test_zero1_by_hand():
    est = _est("zero1")
    # ZeRO-1 without overlap_comm reduces after backward: every bf16 gradient is whole at its end,
    # beside the ipg bucket (allocated by the first gradient hook) and the gradient partition
    end = (2 * P + ROPE + 8 * p + 4 * p + WS) + 2 * P + BUCKET + 2 * GIP + T * 4096 * 2
    assert _phase(est, "backward") == end == 39_833_428_992
    assert next(ph.detail for ph in est.phases if ph.name == "backward").startswith("end of backward")
    # the step as ZeRO-2's
    assert _phase(est, "optimizer step") == 2 * P + ROPE + 8 * p + 4 * p + WS + 2 * GIP + 6 * p
    # with overlap_comm it reduces during backward, like ZeRO-2, through two buckets
    ov = _est("zero1", deepspeed=ZeroConfig(overlap_comm=True))
    assert ov.bytes_of("gradients") == 0
    assert _at(ov, "reduce buckets", "backward") == 2 * BUCKET


def test_zero2_offload_by_hand():
    est = _est("zero2", cpu_offload=True)
    # GPU: the weights, the largest-parameter staging buffer (temp_grad_buffer_for_gpu_offload)
    assert _phase(est, "optimizer step") == 2 * P + ROPE + WS + 2 * VOCAB_H
    # host: fp32 master 4p and gradient 4p, the bf16 copy-back buffer 2p, the largest-parameter
    # staging buffer, Adam states 8p
    assert est.host_bytes == 18 * p + 2 * VOCAB_H


def test_hf_auto_values():
    cfg = ZeroConfig.hf_auto(4096)  # transformers trainer_config_finalize / accelerate _prepare_deepspeed
    assert (cfg.reduce_bucket_size, cfg.stage3_prefetch_bucket_size, cfg.stage3_param_persistence_threshold) == (
        4096 * 4096, 15_099_494, 40_960)
    est = _est("zero2", deepspeed=cfg)
    assert _at(est, "reduce buckets", "backward") == 4096 * 4096 * 2
    read = ZeroConfig.from_ds_config({"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto",
                                                            "stage3_prefetch_bucket_size": "auto",
                                                            "stage3_param_persistence_threshold": "auto",
                                                            "sub_group_size": 1e9}}, hidden=4096)
    assert read == cfg


@pytest.mark.parametrize("name", ["llama-2-7b", "falcon-7b", "gemma-2b", "phi-2", "mixtral-8x7b", "starcoder",
                                  "qwen3-8b", "llama-3-8b"])
def test_layout_counts_every_parameter(name):
    """The tensors ZeRO-3 partitions are the model's parameters (planner/params.py's count)."""
    arch = load_model(name)
    job = Job(model=name, method="full")
    lay = layout(job, arch, (), get(job.stack))
    assert sum(q.numel for q in lay.params) == count_params(arch).total
    # LoRA (all linears, DoRA): the trainable tensors are peft's adapters, as planner/params.py counts them
    from memplan.training import trainable_params

    lora = Job(model=name, method="lora", lora_targets="all-linear", dora=True)
    stack = get(lora.stack)
    targets = stack.lora_targets(lora, arch)
    lay = layout(lora, arch, targets, stack)
    assert sum(q.numel for q in lay.params if q.trainable) == trainable_params(lora, arch, count_params(arch, stack),
                                                                             targets)


def test_lora_adapters_are_persistent():
    # r=16 on q_proj and v_proj: lora_A 16 x 4,096 and lora_B 4,096 x 16 = 65,536 elements < 1e5,
    # so ZeRO-3 keeps every adapter whole on every rank (plus its 1/8 partition)
    est = estimate(model="llama-2-7b", method="lora", num_gpus=N, sharding="zero3")
    adapters = 32 * 2 * 2 * 16 * 4096
    assert est.component("persistent parameters").bytes == 2 * (adapters + NORMS * 4096)
    assert est.component("adapters").bytes == 2 * adapters // 8
    assert est.component("fp32 master weights").bytes == 4 * adapters // 8


@pytest.mark.parametrize("sharding, offload, knobs", [
    ("zero2", False, {}), ("zero3", True, {}), ("zero1", False, {"overlap_comm": True}),
    ("zero3", False, {"reduce_bucket_size": 16_777_216, "stage3_prefetch_bucket_size": 15_099_494}),
])
def test_emitted_config_round_trip(sharding, offload, knobs):
    """emit -> the --from DeepSpeed reader and ZeroConfig.from_ds_config -> the same job and knobs."""
    job = _job(sharding, cpu_offload=offload, micro_batch=2, **({"deepspeed": ZeroConfig(**knobs)} if knobs else {}))
    data = json.loads(json.dumps(deepspeed_config(job, grad_accum=4)))
    fc = read_training_config(data, "deepspeed", "ds_config.json")
    assert {k: fc.fields[k] for k in ("sharding", "micro_batch")} == {"sharding": sharding, "micro_batch": 2}
    assert fc.fields.get("cpu_offload", False) is offload
    stage = int(sharding[-1])
    assert ZeroConfig.from_ds_config(data).resolved(stage, offload) == (job.deepspeed or ZeroConfig()).resolved(
        stage, offload)
    files = accelerate_files(job, load_model("llama-2-7b"), 4, "acc.yaml")
    assert ("ds_config.json" in files) is bool(knobs)
    if knobs:
        assert json.loads(files["ds_config.json"]) == data


@pytest.mark.parametrize("sharding, offload", [("zero2", False), ("zero3", True)])
def test_accelerate_plugin_round_trip(tmp_path, sharding, offload):
    """The inline YAML through accelerate's own readers: ClusterConfig, then DeepSpeedPlugin's config."""
    pytest.importorskip("accelerate")
    import yaml
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import DeepSpeedPlugin

    job = _job(sharding, cpu_offload=offload)
    path = tmp_path / "cfg.yaml"
    path.write_text(accelerate_config(job, load_model("llama-2-7b"), grad_accum=4))
    ds = ClusterConfig.from_yaml_file(str(path)).deepspeed_config
    plugin = DeepSpeedPlugin(zero_stage=ds["zero_stage"], offload_optimizer_device=ds["offload_optimizer_device"],
                             offload_param_device=ds["offload_param_device"], zero3_init_flag=ds["zero3_init_flag"],
                             gradient_accumulation_steps=ds["gradient_accumulation_steps"])
    stage = int(sharding[-1])
    assert ZeroConfig.from_ds_config(plugin.deepspeed_config).resolved(stage, offload) == ZeroConfig().resolved(
        stage, offload)
    # the comment states the values assumed, and they are the defaults accelerate leaves to DeepSpeed
    comment = next(line for line in path.read_text().splitlines() if "zero_optimization:" in line)
    assumed = json.loads(comment.split("zero_optimization: ", 1)[1])
    assert ZeroConfig.from_ds_config({"zero_optimization": assumed}).resolved(stage, offload) == ZeroConfig().resolved(
        stage, offload)
    assert yaml.safe_load(path.read_text())["deepspeed_config"]["zero_stage"] == stage


@pytest.mark.parametrize("fields, words", [
    (dict(sharding="fsdp_full", deepspeed=ZeroConfig()), ["zero1, zero2 or zero3", "fsdp_full"]),
    (dict(sharding="zero2", deepspeed=ZeroConfig(offload_param_device="cpu"), cpu_offload=True),
     ["offload_param_device cpu", "ZeRO-3"]),
    (dict(sharding="zero3", deepspeed=ZeroConfig(offload_optimizer_device="cpu")), ["--cpu-offload"]),
])
def test_refusals(fields, words):
    with pytest.raises(MemplanInputError) as err:
        Job(model="llama-2-7b", num_gpus=N, **fields)
    assert all(w in str(err.value) for w in words), str(err.value)


@pytest.mark.parametrize("fields, words", [
    (dict(reduce_bucket_size=0), ["reduce_bucket_size", "positive", "0"]),
    (dict(allgather_bucket_size=3), ["allgather_bucket_size", "multiple of 2", "3"]),
    (dict(stage3_max_live_parameters=-1), ["stage3_max_live_parameters", "-1"]),
])
def test_bad_knobs(fields, words):
    with pytest.raises(MemplanInputError) as err:
        ZeroConfig(**fields)
    assert all(w in str(err.value) for w in words), str(err.value)
    with pytest.raises(MemplanInputError, match="nvme is not modelled"):
        ZeroConfig.from_ds_config({"zero_optimization": {"offload_optimizer": {"device": "nvme"}}})
    with pytest.raises(MemplanInputError, match="hidden size"):
        ZeroConfig.from_ds_config({"zero_optimization": {"reduce_bucket_size": "auto"}})


def test_non_zero_jobs_do_not_see_zero():
    # FSDP and DDP rows are the lead's: no ZeRO row appears there
    for sharding in ("ddp", "fsdp_full"):
        est = estimate(model="llama-2-7b", method="full", num_gpus=N, sharding=sharding)
        assert not {c.name for c in est.components} & {"fp32 master weights", "reduce buckets", "gradient partition"}


# ---------------------------------------------------------------------------------------------
# the ZeRO-3 replay against DeepSpeed itself: rank 0 of 8 on the CPU (a fake process group: the
# collectives are no-ops, the coordinator's bookkeeping and allocations are DeepSpeed's own), tiny
# Llama in bf16. After every fetch of a module that owns parameters: the bytes of the gathered
# non-persistent parameters (unique storages) and of the flat all-gather buffers still in flight.

PROBES = [  # (zero_optimization knobs, gradient checkpointing)
    ({"stage3_prefetch_bucket_size": 20_000, "stage3_max_live_parameters": 200_000,
      "stage3_max_reuse_distance": 150_000, "stage3_param_persistence_threshold": 100}, False),
    ({"stage3_prefetch_bucket_size": 50_000, "stage3_max_live_parameters": 300_000,
      "stage3_max_reuse_distance": 400_000, "stage3_param_persistence_threshold": 1_000}, True),
    ({"stage3_prefetch_bucket_size": 0, "stage3_max_reuse_distance": 0, "stage3_param_persistence_threshold": 100}, True),
]


def _probe(probes):  # pragma: no cover - runs in a subprocess (python tests/test_zero.py)
    import os

    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    for k, v in {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": str(N), "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "29511"}.items():
        os.environ.setdefault(k, v)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=N)
    import deepspeed
    from deepspeed.runtime.zero import partitioned_param_coordinator as ppc
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from transformers import LlamaConfig, LlamaForCausalLM

    from memplan.profiles import TINY_DIR

    tiny = {k: v for k, v in json.loads((TINY_DIR / "tiny-llama.json").read_text()).items() if k != "model_type"}
    records: list = []
    params: list = []
    orig = ppc.PartitionedParameterCoordinator.fetch_sub_module

    def fetch(self, module, forward):
        orig(self, module, forward)
        if not list(module.parameters(recurse=False)):
            return
        held = {}
        for q in params:
            if not q.ds_persist and q.ds_status != ZeroParamStatus.NOT_AVAILABLE and q.data.numel():
                held[q.data.untyped_storage().data_ptr()] = q.data.untyped_storage().nbytes()
        flats = {}
        for handle in self._PartitionedParameterCoordinator__inflight_param_registry.values():
            for h in getattr(handle, "handles", [handle]):
                if getattr(h, "partitions", None):
                    st = h.partitions[0].untyped_storage()
                    if st.data_ptr() not in held:
                        flats[st.data_ptr()] = st.nbytes()
        records.append([sum(held.values()), sum(flats.values())])

    ppc.PartitionedParameterCoordinator.fetch_sub_module = fetch
    results = []
    for knobs, ckpt in probes:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**tiny))
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-5), config={
            "train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True}, "steps_per_print": 10**9,
            "zero_optimization": {"stage": 3, **knobs}})
        params[:] = list(engine.module.parameters())
        ids = torch.randint(0, tiny["vocab_size"], (1, 16))
        for _ in range(3):  # the trace is recorded in the first step; the third is steady state
            records.clear()
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()
        results.append(list(records))
    print(json.dumps(results))


def test_zero3_replay_matches_deepspeed():
    """planner/zero.py's coordinator replay, instant by instant, against DeepSpeed 0.19.8 itself."""
    pytest.importorskip("deepspeed")
    import subprocess
    import sys

    from memplan.profiles import TINY_DIR
    from memplan.zero import simulate, trace

    out = subprocess.run([sys.executable, __file__, json.dumps(PROBES)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    arch = load_model(str(TINY_DIR / "tiny-llama.json"))
    job = Job(model="tiny-llama", method="full", num_gpus=N, sharding="zero3")
    lay = layout(job, arch, (), get(job.stack))
    for (knobs, ckpt), ds in zip(PROBES, measured):
        order, _ = trace(lay, ckpt)
        computing: list = []
        simulate(lay, order, N, ZeroConfig(**knobs), computing)
        replay = [[c.gathered, c.buffers] for c, m in zip(computing, order) if m]
        assert replay == ds, (knobs, ckpt)
        assert any(f for _, f in ds) or knobs["stage3_prefetch_bucket_size"] == 0  # coalesced batches were seen


if __name__ == "__main__":  # pragma: no cover
    import sys

    _probe(json.loads(sys.argv[1]))
