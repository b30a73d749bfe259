"""The allocation sequence the estimate derives (planner/alloc_sequence.py), checked event by event
against what the libraries do: bitsandbytes' per-call dequantization, the parameters' module order."""

import pytest

from memplan import alloc_sequence as S
from memplan.estimate import estimate_memory
from memplan.job import Job
from memplan.profiles import load_model
from memplan.stacks import get


def _plan(job: Job):
    """The plan the estimate replays for `job`."""
    seen = {}
    real = S.replayed

    def keep(plan, settings):
        seen["plan"] = plan
        return real(plan, settings)

    S._REPLAYS.clear()
    S.replayed = keep
    try:
        estimate_memory(job, load_model(job.model), None)
    finally:
        S.replayed = real
    return seen["plan"]


def _after(events, mark):
    i = events.index(("mark", mark))
    return events[i + 1:]


@pytest.mark.parametrize("ckpt, passes", [(True, 3), (False, 2)])
def test_every_converted_linear_dequantizes_its_weight_per_call(ckpt, passes):
    """QLoRA: MatMul4Bit dequantizes each converted weight in its forward and again in its backward,
    and a checkpointed layer runs its forward twice: 3 (or 2) dequantized weights per converted linear,
    per layer and step, each of d_in x d_out in the compute dtype (bf16)."""
    job = Job(model="llama-2-7b", method="qlora", micro_batch=1, seq_len=512, gradient_checkpointing=ckpt)
    arch = load_model("llama-2-7b")
    plan = _plan(job)
    converted = get("transformers-5").quantized_linears(arch)
    assert [c.dequant for c in plan.linear_calls] == [d_in * d_out * 2 for d_in, d_out, _ in converted]
    # the second step's forward and backward (the first also allocates the two cuBLAS workspaces)
    step = _after(S.events(plan), "step 1 optimizer step")
    step = step[:step.index(("mark", "step 2 backward"))]
    sizes = [e[2] for e in step if e[0] == "alloc"]
    for n in {c.dequant for c in plan.linear_calls}:
        calls = sum(1 for c in plan.linear_calls if c.dequant == n)
        # an activation of the same size would be counted too: at 512 tokens none is
        assert sizes.count(n) == calls * passes * arch.layers


def test_the_fp32_stream_is_cast_around_each_4bit_matmul():
    """peft's kbit upcast leaves an fp32 stream: Linear4bit casts each input to bf16 and the output
    back (`x.to(compute_dtype)`, `.to(inp_dtype)`)."""
    plan = _plan(Job(model="llama-2-7b", method="qlora", micro_batch=1, seq_len=512))
    t = 512
    for call, lin in zip(plan.linear_calls, load_model("llama-2-7b").projections):
        assert (call.cast, call.out, call.out_cast) == (t * lin.d_in * 2, t * lin.d_out * 2, t * lin.d_out * 4)
    plain = _plan(Job(model="llama-2-7b", method="qlora", micro_batch=1, seq_len=512, kbit_prepare=False))
    assert all(c.cast == 0 and c.out_cast == 0 for c in plain.linear_calls)


def test_optimizer_states_follow_model_parameters_order():
    """torch's AdamW creates each parameter's states at its first step in param-group order, which is
    model.parameters(): the embedding first. Gemma-2B's tied 256k x 2048 embedding's two bf16 states
    are the step's first allocations."""
    arch = load_model("gemma-2b")
    plan = _plan(Job(model="gemma-2b", method="full", micro_batch=1, seq_len=256))
    opt = _after(S.events(plan), "step 1 backward")
    first = [e[2] for e in opt if e[0] == "alloc"][:2]
    assert first == [arch.vocab * arch.hidden * 2] * 2


def test_a_tied_embedding_gradient_is_summed_out_of_place():
    """The tied embedding's second gradient (from the embedding's backward) arrives while the head's
    is held; AccumulateGrad allocates their sum: two vocab x hidden tensors at the end of the backward."""
    arch = load_model("gemma-2b")
    plan = _plan(Job(model="gemma-2b", method="full", micro_batch=1, seq_len=256))
    g = arch.vocab * arch.hidden * 2
    assert plan.tied_grad == g
    ev = S.events(plan)
    bwd = ev[ev.index(("mark", "step 1 forward")) + 1:ev.index(("mark", "step 1 backward"))]
    assert [e[2] for e in bwd if e[0] == "alloc"].count(g) == 3  # the head's, the embedding's, the sum
    untied = _plan(Job(model="llama-2-7b", method="full", micro_batch=1, seq_len=256))
    assert untied.tied_grad == 0
