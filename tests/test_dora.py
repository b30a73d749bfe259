"""DoRA (peft use_dora=True) and LoRA on the input embedding and the head, against the CPU trace of
the real transformers 5 step with peft 0.21 (docs/activations.md, "DoRA" and "LoRA on embeddings
and the head"): every measured phase within 3%, and the trainable parameters exact against peft's
model on the meta device."""

import itertools
import warnings

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from memplan import Job, estimate_memory  # noqa: E402
from memplan.errors import MemplanInputError  # noqa: E402
from memplan.params import count_params, embedding_module  # noqa: E402
from memplan.profiles import load_model  # noqa: E402
from memplan.stacks import cpu_trace_stack  # noqa: E402
from memplan.training import resolve_targets, trainable_params  # noqa: E402
from memplan.validate.trace import trace_training  # noqa: E402

from .conftest import DATA  # noqa: E402

TOLERANCE = 0.03


def tiny(family: str) -> str:
    return str(DATA / f"tiny-{family}.json")


def _check(row: dict) -> None:
    job = Job(**row)
    traced = trace_training(job)
    est = estimate_memory(job, load_model(job.model), stack=cpu_trace_stack(job))
    err = (est.peak_allocated_bytes - traced.peak_allocated_bytes) / traced.peak_allocated_bytes
    assert abs(err) <= TOLERANCE, f"peak {err:+.2%}"
    by_phase = est.measured_phases()
    for snap in traced.timeline:
        if snap.iteration == 1:
            phase_err = (by_phase[snap.phase] - snap.peak_bytes) / snap.peak_bytes
            assert abs(phase_err) <= TOLERANCE, f"{snap.phase} {phase_err:+.2%}"


DORA_ROWS = [
    dict(model=tiny(f), method="lora", dora=dora, gradient_checkpointing=ck, micro_batch=b, seq_len=s)
    for f, dora, ck, (b, s) in itertools.product(("llama", "mistral", "phi", "falcon"), (False, True), (False, True),
                                                 ((1, 128), (2, 256)))
] + [
    dict(model="llama-2-7b", method="lora", dora=True, micro_batch=1, seq_len=512),
    # every linear targeted, checkpointed: the recomputation's weight norm of the widest input (down_proj, fc2)
    dict(model=tiny("llama"), method="lora", dora=True, lora_targets="all-linear", gradient_checkpointing=True,
         micro_batch=1, seq_len=128),
    dict(model=tiny("phi"), method="lora", dora=True, lora_targets="all-linear", gradient_checkpointing=True,
         micro_batch=2, seq_len=256),
    # DoRA with dropout: the base output recomputed by F.linear over the fp32 copy of the weight
    dict(model=tiny("llama"), method="lora", dora=True, lora_dropout=0.1, lora_targets="all-linear",
         micro_batch=2, seq_len=256),
]
OUTER_ROWS = [
    dict(model=tiny("llama"), method="lora", lora_targets=t, gradient_checkpointing=ck, micro_batch=2, seq_len=256)
    for t, ck in itertools.product(("q_proj,v_proj,lm_head", "q_proj,v_proj,embed_tokens", "lm_head,embed_tokens"),
                                   (False, True))
] + [
    dict(model="llama-2-7b", method="lora", lora_targets="q_proj,v_proj,embed_tokens,lm_head", micro_batch=1, seq_len=512),
    # tied embeddings: peft wraps both and gives each its own adapter over the one shared weight
    dict(model=tiny("gemma"), method="lora", lora_targets="q_proj,v_proj,embed_tokens,lm_head", micro_batch=2, seq_len=256),
    dict(model=tiny("falcon"), method="lora", lora_targets="query_key_value,word_embeddings,lm_head",
         micro_batch=2, seq_len=256),
]


def _id(row: dict) -> str:
    name = row["model"].rsplit("/", 1)[-1].removesuffix(".json")
    return name + "-" + "-".join(f"{k}={v}" for k, v in row.items() if k not in ("model", "method"))


@pytest.mark.parametrize("row", DORA_ROWS, ids=_id)
def test_dora_matches_trace(row):
    _check(row)


@pytest.mark.parametrize("row", OUTER_ROWS, ids=_id)
def test_embedding_and_head_lora_match_trace(row):
    _check(row)


def _peft_trainable(model: str, job: Job) -> int:
    import torch

    from memplan.validate.models import apply_lora, hf_config, meta_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = apply_lora(meta_model(hf_config(model, "sdpa"), torch.bfloat16), job, load_model(model))
    return sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


PARAM_MODELS = [tiny(f) for f in ("llama", "mistral", "phi", "falcon", "gemma", "starcoder")] + ["falcon-7b"]


@pytest.mark.parametrize("model", PARAM_MODELS, ids=lambda m: m.rsplit("/", 1)[-1])
def test_params_match_peft_on_meta(model):
    arch = load_model(model)
    names = ",".join(lin.name for lin in arch.linears if lin.copies == 1)
    for dora, targets in ((True, names), (False, f"{names},{embedding_module(arch)},lm_head")):
        job = Job(model=model, method="lora", dora=dora, lora_targets=targets, lora_rank=8)
        ours = trainable_params(job, arch, count_params(arch), resolve_targets(job, arch))
        assert ours == _peft_trainable(model, job), (dora, targets)


def test_dora_adds_its_magnitude_to_the_adapters():
    arch = load_model("llama-2-7b")
    plain, dora = (estimate_memory(Job(model="llama-2-7b", method="lora", dora=d), arch) for d in (False, True))
    # q_proj and v_proj, 4096 outputs each, 32 layers
    assert dora.trainable_params - plain.trainable_params == 2 * 4096 * 32


def test_family_embedding_names():
    assert embedding_module(load_model(tiny("falcon"))) == "word_embeddings"
    assert embedding_module(load_model(tiny("starcoder"))) == "wte"
    with pytest.raises(MemplanInputError, match="'embed_tokens' is not a linear layer of .*word_embeddings"):
        estimate_memory(Job(model=tiny("falcon"), method="lora", lora_targets="embed_tokens"), load_model(tiny("falcon")))


def test_dora_on_the_head_is_refused():
    with pytest.raises(MemplanInputError, match="--dora with LoRA target 'lm_head'"):
        estimate_memory(Job(model=tiny("llama"), method="lora", dora=True, lora_targets="q_proj,lm_head"),
                        load_model(tiny("llama")))


def test_dora_needs_lora():
    with pytest.raises(MemplanInputError, match="--dora applies to lora and qlora"):
        Job(model=tiny("llama"), method="full", dora=True)
