"""Rank 0 of a sharded (FSDP) training step, traced on the CPU through a fake process group
(validate/sharded.py), and the GPU harness's dry run of the same rank on real CPU tensors.

The expected bytes are computed here from the unsharded meta model, independently of FSDP: FSDP2
shards every parameter on dim 0 in chunks of ceil(rows / N) rows (rank 0 always holds a full chunk,
padded), its gradients are views into one reduce-scatter output per FSDP unit, and an all-gathered
parameter is the padded N * chunk rows.
"""

import math

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

import torch  # noqa: E402

from memplan import Job  # noqa: E402
from memplan.profiles import load_model  # noqa: E402
from memplan.validate.models import DTYPES, apply_lora, hf_config, meta_model  # noqa: E402
from memplan.validate.sharded import trace_sharded  # noqa: E402
from memplan.validate.tracker import LiveBytes, rounded  # noqa: E402

from .conftest import DATA  # noqa: E402

TINY = str(DATA / "tiny-llama.json")  # 3 layers, hidden 256, vocab 3000, untied
BASE = dict(model=TINY, num_gpus=8, micro_batch=1, seq_len=32)


def _meta(job: Job):
    model = meta_model(hf_config(job.model, job.attention), DTYPES[job.base_weight_dtype.value])
    return apply_lora(model, job, load_model(job.model)) if job.uses_lora else model


def _chunk(p, n: int, dtype=None) -> int:
    """Bytes of rank 0's dim-0 shard of `p` (padded to a full chunk)."""
    return math.ceil(p.shape[0] / n) * math.prod(p.shape[1:]) * (dtype or p.dtype).itemsize


def _shards(model, n: int, trainable=False, dtype=None) -> int:
    """One storage per parameter: what rank 0 holds of the parameters (or of AdamW's each state)."""
    return sum(rounded(_chunk(p, n, dtype)) for p in model.parameters() if p.requires_grad or not trainable)


def _units(model):
    """The parameters of each FSDP2 unit accelerate makes: every decoder layer, the embedding, and
    [final norm, lm_head] (the root keeps nothing else for Llama)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    units = [list(layer.parameters()) for layer in inner.model.layers]
    units.append(list(inner.model.embed_tokens.parameters()))
    units.append(list(inner.model.norm.parameters()) + list(inner.lm_head.parameters()))
    return units


def _grads(model, n: int, dtype=None) -> int:
    """Sharded gradients: one reduce-scatter output per unit that trains, the grads views into it."""
    return sum(rounded(sum(_chunk(p, n, dtype) for p in unit if p.requires_grad))
               for unit in _units(model) if any(p.requires_grad for p in unit))


def _phase(trace, phase: str, iteration: int = -1):
    last = trace.timeline[-1].iteration if iteration == -1 else iteration
    return next(s for s in trace.timeline if s.iteration == last and s.phase == phase)


def test_tracker_follows_storage_resizes_and_releases_the_current_size():
    t = torch.empty(1000, dtype=torch.float32)  # 4000 B -> 4096 counted
    tracker = LiveBytes()
    tracker.track(t)
    saved = torch.UntypedStorage.resize_
    with tracker:
        assert tracker.current == 4096
        t.untyped_storage().resize_(0)  # FSDP's free_storage
        assert tracker.current == 0
        t.untyped_storage().resize_(10_000)  # alloc_storage, larger than before
        assert tracker.current == 10_240 and tracker.phase_peak == 10_240
        u = torch.empty(0)  # made before tracking, grown by resize: counted from then on
        u.untyped_storage().resize_(600)
        assert tracker.current == 10_240 + 1024
        del t, u
        assert tracker.current == 0  # each released at the size it had when it died
    assert torch.UntypedStorage.resize_ is saved


@pytest.fixture(scope="module")
def full():
    return trace_sharded(Job(**BASE, sharding="fsdp_full"), iterations=1)


def test_fsdp2_rank_holds_exact_shards(full):
    model = _meta(Job(**BASE))
    # an independent count would be 1/8 of the unsharded bytes, up to padding and 512 B rounding
    unsharded = sum(p.numel() * p.element_size() for p in model.parameters())
    assert abs(_phase(full, "backward").params_bytes - unsharded / 8) < 0.01 * unsharded / 8
    assert _phase(full, "backward").params_bytes == _shards(model, 8)
    assert _phase(full, "backward").grads_bytes == _grads(model, 8)
    assert _phase(full, "optimizer step").grads_bytes == 0  # zero_grad(set_to_none=True)
    assert _phase(full, "optimizer step").optimizer_bytes == 2 * _shards(model, 8)


def test_full_shard_frees_what_it_gathered(full):
    """reshard_after_forward=True frees each layer's (and the embedding's) gathered parameters by
    UntypedStorage.resize_(0); SHARD_GRAD_OP keeps them to the end of the forward. A tracker that
    missed the resizes would see no difference."""
    grad_op = trace_sharded(Job(**BASE, sharding="fsdp_grad_op"), iterations=1)
    model = _meta(Job(**BASE))
    inner = model
    gathered = sum(rounded(math.ceil(p.shape[0] / 8) * 8 * math.prod(p.shape[1:]) * p.element_size())
                   for p in [*inner.model.layers.parameters(), *inner.model.embed_tokens.parameters()])
    kept = _phase(grad_op, "forward").end_bytes - _phase(full, "forward").end_bytes
    assert kept == gathered
    # and the sharded step's peak sits well under the unsharded parameters plus their gradients
    unsharded = sum(p.numel() * p.element_size() for p in model.parameters())
    assert full.peak_allocated_bytes < 2 * unsharded


def test_fsdp2_lora_shards_the_adapters():
    job = Job(**BASE, sharding="fsdp_full", method="lora")
    traced = trace_sharded(job, iterations=1)
    model = _meta(job)
    assert _phase(traced, "backward").params_bytes == _shards(model, 8)
    assert _phase(traced, "backward").grads_bytes == _grads(model, 8) > 0
    assert _phase(traced, "optimizer step").optimizer_bytes == 2 * _shards(model, 8, trainable=True)


@pytest.mark.parametrize("version", [2, 1])
def test_hybrid_shards_within_the_node(version):
    job = Job(**BASE, sharding="fsdp_hybrid", gpus_per_node=4, fsdp_version=version)
    held = _phase(trace_sharded(job, iterations=1), "backward").params_bytes
    if version == 2:
        assert held == _shards(_meta(Job(**BASE)), 4)
    else:  # flat shards: 1/4 up to alignment padding and rounding per unit
        unsharded = sum(p.numel() * p.element_size() for p in _meta(Job(**BASE)).parameters())
        assert abs(held - unsharded / 4) < 0.01 * unsharded / 4


def test_policy_mixed_precision_keeps_fp32_shards_and_gathers_bf16():
    mp = dict(weight_dtype="fp32", compute_dtype="bf16", fsdp_mixed_precision="policy")
    job = Job(**BASE, sharding="fsdp_full", **mp)
    traced = trace_sharded(job, iterations=1, detail=True)
    model = _meta(job)
    assert not traced.autocast
    assert _phase(traced, "backward").params_bytes == _shards(model, 8)  # fp32
    assert _phase(traced, "backward").grads_bytes == _grads(model, 8)  # reduced in fp32
    # at the loss the tail unit [norm, lm_head] is gathered (reshard_after_forward=False): in bf16
    head, norm = model.lm_head.weight, model.model.norm.weight
    gathered = rounded(math.ceil(head.shape[0] / 8) * 8 * head.shape[1] * 2)
    live = _phase(traced, "forward").live_at_peak
    assert any(g.dtype == "bfloat16" and g.bytes == gathered for g in live)
    assert not any(g.dtype == "float32" and g.bytes == 2 * gathered for g in live)
    # its gradient is reduce-scattered from an fp32 buffer of the whole unit
    reduce_in = rounded((math.ceil(head.shape[0] / 8) * 8 * head.shape[1] + norm.numel()) * 4)
    assert any(g.dtype == "float32" and g.bytes == reduce_in for g in _phase(traced, "backward").live_at_peak)


def test_fsdp1_traces_with_flat_shards():
    job = Job(**BASE, sharding="fsdp_full", fsdp_version=1)
    traced = trace_sharded(job, iterations=1)
    unsharded = sum(p.numel() * p.element_size() for p in _meta(job).parameters())
    # FlatParameter shards: 1/8 of each unit, up to alignment padding and 512 B rounding per unit
    assert abs(_phase(traced, "backward").params_bytes - unsharded / 8) < 0.01 * unsharded / 8
    assert _phase(traced, "optimizer step").optimizer_bytes == 2 * _phase(traced, "backward").params_bytes
    # SHARD_GRAD_OP keeps the three layers' padded unsharded flat parameters (beside the shards) to the
    # end of the forward
    grad_op = trace_sharded(Job(**BASE, sharding="fsdp_grad_op", fsdp_version=1), iterations=1)
    layers = sum(p.numel() * p.element_size() for p in _meta(job).model.layers.parameters())
    kept = _phase(grad_op, "forward").end_bytes - _phase(traced, "forward").end_bytes
    assert abs(kept - layers) < 0.01 * layers


def test_fsdp1_lora_reshards_frozen_units_after_backward():
    """Units with only frozen parameters (the root, LoRA's base layers) get no post-backward hook;
    FSDP1's final callback reshards them by comparing data pointers, which fake tensors lack
    (sharded._fake_data_pointers). Without that they would stay gathered into the optimizer step."""
    job = Job(**BASE, sharding="fsdp_full", fsdp_version=1, method="lora")
    traced = trace_sharded(job, iterations=1)
    unsharded = sum(p.numel() * p.element_size() for p in _meta(job).parameters())
    for phase in ("backward", "optimizer step"):
        assert abs(_phase(traced, phase).params_bytes - unsharded / 8) < 0.01 * unsharded / 8


def test_refusals_are_one_line():
    from memplan.errors import MemplanInputError

    with pytest.raises(MemplanInputError, match="no fake-tensor trace for DeepSpeed/DDP"):
        trace_sharded(Job(**BASE, sharding="zero3"))
    with pytest.raises(MemplanInputError, match="groups of 3"):
        trace_sharded(Job(**BASE, sharding="fsdp_hybrid", gpus_per_node=3))


def test_cli_traces_rank_zero_and_refuses_what_it_cannot():
    from typer.testing import CliRunner

    from memplan.cli import app

    runner = CliRunner()
    out = runner.invoke(app, ["trace", "-m", TINY, "--num-gpus", "8", "--sharding", "fsdp_full", "-b", "1", "-s", "32"])
    assert out.exit_code == 0, out.output
    assert "rank 0 of 8 (fsdp_full, FSDP2" in out.output
    rows = {line.split()[0]: line for line in out.output.splitlines() if line.split()[:1] in (["forward"], ["peak"])}
    assert set(rows) == {"forward", "peak"} and rows["peak"].count("GiB") == 2
    for args, line in ((["--sharding", "zero3"], "no fake-tensor trace for DeepSpeed/DDP"),
                       (["--sharding", "fsdp_full", "--cpu-offload"], "the trace equals the one without offload")):
        out = runner.invoke(app, ["trace", "-m", TINY, "--num-gpus", "8", *args])
        assert out.exit_code == 2 and line in out.output, out.output


def test_validate_dry_run_measures_the_traced_rank(tmp_path):
    """`memplan validate --device cpu --num-gpus 8 --sharding fsdp_full`: the worker builds the same
    sharded model on real CPU tensors; its peak equals the fake-tensor trace's to the byte."""
    from typer.testing import CliRunner

    from memplan.cli import app
    from memplan.validate.results import read

    path = tmp_path / "r.jsonl"
    out = CliRunner().invoke(app, ["validate", "--device", "cpu", "--num-gpus", "8", "--sharding", "fsdp_full",
                                   "--slice", "0:1", "--steps", "1", "--out", str(path)])
    assert out.exit_code == 0, out.output
    (row,) = read(path)
    assert row.job.num_gpus == 8 and row.job.sharding == "fsdp_full" and row.measured.status == "ok"
    assert row.measured.peak_allocated_bytes == trace_sharded(row.job).peak_allocated_bytes
