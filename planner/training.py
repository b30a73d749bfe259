"""Weights, adapters, gradients and optimizer states: the bytes that live across the whole step.

Sources: bitsandbytes functional.py (4-bit and int8 storage), peft `prepare_model_for_kbit_training`
(utils/other.py: every fp16/bf16 parameter that is not Params4bit becomes fp32), torch
optim/adamw.py (states `zeros_like(param)`, i.e. in the parameter dtype; `_multi_tensor_adamw`
allocates `_foreach_sqrt(exp_avg_sqs)`), bitsandbytes optim/optimizer.py (`Optimizer2State`:
32-bit states are fp32; 8-bit states are uint8 plus one fp32 absmax per 256 values).
"""

from __future__ import annotations

from . import prequantized
from .architecture import ModelArch
from .dtypes import bytes_per_param_formula, float_bytes, linear_weight_bytes
from .errors import MemplanInputError
from .job import Job
from .params import HEAD_MODULE, ParamCounts, embedding_module, lora_params
from .stacks import Stack
from .units import count

BNB_OPTIM_BLOCK = 256


def resolve_targets(job: Job, arch: ModelArch) -> tuple[str, ...]:
    if job.lora_targets == "default":
        return arch.default_lora_targets
    names = tuple(lin.name for lin in arch.linears if lin.copies == 1)
    if job.lora_targets == "all-linear":
        return names  # peft's all-linear leaves the output layer out (tuners_utils `_maybe_include_all_linear_layers`)
    wanted = (job.lora_targets,) if isinstance(job.lora_targets, str) else tuple(job.lora_targets)
    wanted = tuple(w for part in wanted for w in part.split(",") if w)
    allowed = names + (embedding_module(arch), HEAD_MODULE)
    bad = [w for w in wanted if w not in allowed]
    if bad:
        raise MemplanInputError(
            f"LoRA target {bad[0]!r} is not a linear layer of {arch.name}; allowed: default, all-linear, {', '.join(allowed)}"
        )
    outer = [w for w in wanted if w in (embedding_module(arch), HEAD_MODULE)]
    if job.dora and outer:
        raise MemplanInputError(
            f"--dora with LoRA target {outer[0]!r} is not modelled (DoRA there forms a vocab x hidden weight product "
            "every forward): target the decoder blocks' linears only, or drop --dora"
        )
    return wanted


def weight_bytes(job: Job, arch: ModelArch, params: ParamCounts, stack: Stack) -> tuple[int, str]:
    """Base-model weights as loaded (and, for k-bit training, after peft's fp32 upcast)."""
    if prequantized.applies(job, arch):  # a pre-quantized checkpoint's own storage (planner/prequantized.py)
        return prequantized.weight_bytes(job, arch, params, stack)
    w = job.base_weight_dtype
    if w.is_float:
        return params.total * float_bytes(w), f"{count(params.total)} params x {float_bytes(w)} B ({w.value})"
    quant = sum(
        n * linear_weight_bytes(d_out, d_in, w, job.double_quant) for d_in, d_out, n in stack.quantized_linears(arch)
    ) * arch.layers
    rest_bytes = 4 if job.kbit_upcast else float_bytes(job.compute_dtype)
    rest = params.unquantized * rest_bytes
    why = "fp32, kbit upcast" if job.kbit_upcast else job.compute_dtype.value
    if not params.quantizable_linear:
        return rest, f"{count(params.total)} params x {rest_bytes} B ({why}): no plain nn.Linear to quantize, see note"
    formula = (
        f"{count(params.quantizable_linear)} {w.value} params x {bytes_per_param_formula(w, job.double_quant)}"
        f" + {count(params.unquantized)} others x {rest_bytes} B ({why})"
    )
    return quant + rest, formula


def trainable_params(job: Job, arch: ModelArch, params: ParamCounts, targets: tuple[str, ...]) -> int:
    if job.task != "train":
        return 0
    if job.method == "full":
        return params.total
    return lora_params(arch, targets, job.lora_rank, job.dora)


# bitsandbytes optim/optimizer.py `Optimizer2State.init_state`: a tensor under `min_8bit_size`
# (4096) elements keeps 32-bit states even under an 8-bit optimizer
BNB_MIN_8BIT_SIZE = 4096


def state_tensors(job: Job, numel: int) -> tuple[int, ...]:
    """Bytes of each optimizer-state tensor one trainable tensor of `numel` elements gets in device
    memory (the allocator model's view of `optimizer_state_bytes`): torch AdamW's exp_avg and
    exp_avg_sq in the parameter dtype; bitsandbytes' 8-bit state1/state2 (uint8) and their fp32
    absmax per 256 values; a paged optimizer's tensors of 1e5 elements and more live in unified
    memory, outside torch's pool."""
    pb = trainable_bytes_per_param(job)
    opt = job.optimizer
    if opt == "adamw":
        return (numel * pb, numel * pb)
    if opt == "sgd_momentum":
        return (numel * pb,)
    if opt == "sgd":
        return ()
    if is_paged(job) and numel >= BNB_PAGED_MIN_NUMEL:
        return ()
    if opt in ("adamw_8bit", "paged_adamw_8bit") and numel >= BNB_MIN_8BIT_SIZE:
        blocks = -(-numel // BNB_OPTIM_BLOCK)
        return (numel, numel, 4 * blocks, 4 * blocks)
    return (numel * 4, numel * 4)


def trainable_bytes_per_param(job: Job) -> int:
    """dtype of the trainable parameters, hence of their gradients and torch optimizer states."""
    if job.method == "full":
        return float_bytes(job.base_weight_dtype)
    return float_bytes(job.lora_dtype)


def optimizer_state_bytes(job: Job, n: int) -> tuple[int, str]:
    pb = trainable_bytes_per_param(job)
    opt = job.optimizer
    if opt == "adamw":
        return 2 * n * pb, f"2 states x {count(n)} x {pb} B (param dtype)"
    if opt == "paged_adamw":
        return 2 * n * 4, f"2 fp32 states x {count(n)} x 4 B (paged)"
    if opt in ("adamw_8bit", "paged_adamw_8bit"):
        blocks = -(-n // BNB_OPTIM_BLOCK)
        return 2 * (n + 4 * blocks), f"2 states x {count(n)} x (1 + 4/{BNB_OPTIM_BLOCK}) B"
    if opt == "sgd_momentum":
        return n * pb, f"1 momentum buffer x {count(n)} x {pb} B"
    return 0, "plain SGD keeps no state"


def largest_trainable_tensor(job: Job, arch: ModelArch, targets: tuple[str, ...]) -> int:
    """Elements of the biggest trainable parameter tensor: the embedding (or an untied lm_head,
    the same size) or a fused expert stack for full fine-tuning; lora_A (r x d_in) or lora_B
    (d_out x r) of a targeted linear for LoRA."""
    if job.method == "full":
        return max([arch.vocab * arch.hidden] + [lin.copies * lin.d_in * lin.d_out for lin in arch.linears])
    sizes = [job.lora_rank * max(lin.d_in, lin.d_out) for lin in arch.linears if lin.name in targets]
    if embedding_module(arch) in targets or HEAD_MODULE in targets:
        sizes.append(job.lora_rank * max(arch.vocab, arch.hidden))
    if job.dora and HEAD_MODULE in targets:
        sizes.append(arch.vocab)
    return max(sizes, default=0)


def optimizer_step_temporary(job: Job, n: int, largest: int = 0) -> tuple[int, str]:
    """AdamW's update temporaries. foreach (`_multi_tensor_adamw`): `_foreach_sqrt(exp_avg_sqs)`,
    one tensor per parameter at once. Per parameter (`_single_tensor_adam`, foreach=False):
    `denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)` holds the sqrt and the
    quotient together for one parameter at a time, so two copies of the largest one count.
    SGD updates in place (`_single_tensor_sgd`, `_multi_tensor_sgd`): no temporary."""
    if job.optimizer != "adamw":
        return 0, "no step-wide temporary"
    pb = trainable_bytes_per_param(job)
    if job.foreach:
        return n * pb, f"foreach sqrt(exp_avg_sq): {count(n)} x {pb} B"
    return 2 * largest * pb, f"per-parameter sqrt(exp_avg_sq) and denom of the largest tensor: 2 x {count(largest)} x {pb} B"


def is_paged(job: Job) -> bool:
    return job.optimizer.startswith("paged")


# bitsandbytes optim/optimizer.py `get_state_buffer`: a paged optimizer still keeps the states of
# tensors under 1e5 elements in ordinary device memory (torch's allocator); only larger ones are
# paged into unified memory. Seen on the H100: all-linear LoRA on Llama-2-7B keeps 176 MiB of its
# paged AdamW states in torch.cuda.memory_allocated (validate/results).
BNB_PAGED_MIN_NUMEL = 100_000


def unpaged_trainable_params(job: Job, arch: ModelArch, targets: tuple[str, ...]) -> int:
    """Trainable parameters whose optimizer states stay in device memory under a paged optimizer.

    LoRA: each targeted linear has A (r x d_in) and B (d_out x r). Full fine-tuning: counted as all
    paged (only 1-D norm weights and biases fall under the threshold, well under 0.1%)."""
    if not (is_paged(job) and job.uses_lora):
        return 0
    small = 0
    for lin in arch.linears:
        if lin.name in targets:
            sizes = (job.lora_rank * lin.d_in, job.lora_rank * lin.d_out) + ((lin.d_out,) if job.dora else ())
            small += sum(n for n in sizes if n < BNB_PAGED_MIN_NUMEL)
    small *= arch.layers
    outer = []  # the embedding's A and B (and magnitude), the head's
    if embedding_module(arch) in targets:
        outer += [job.lora_rank * arch.vocab, job.lora_rank * arch.hidden] + ([arch.hidden] if job.dora else [])
    if HEAD_MODULE in targets:
        outer += [job.lora_rank * arch.hidden, job.lora_rank * arch.vocab] + ([arch.vocab] if job.dora else [])
    return small + sum(n for n in outer if n < BNB_PAGED_MIN_NUMEL)


def autocast_caches_weights(job: Job) -> bool:
    """torch autocast's weight cache (`cached_cast`) keeps a cast only for an fp32 leaf that
    requires grad: the trainable weights of full fine-tuning, cached until the forward's autocast
    region exits. A frozen base weight (LoRA) is re-cast by every op, and its cast lives only as
    long as the matmul saves it for backward; a checkpointed layer saves none."""
    return job.method == "full"


def autocast_weight_copies(job: Job, arch: ModelArch, params: ParamCounts) -> int:
    """Under autocast, fp32 weights are cast to the compute dtype for every matmul; without
    checkpointing each cast is kept for backward (cached, or saved by the matmul)."""
    if not (job.task == "train" and job.mixed_precision):
        return 0
    matmul_params = sum(lin.d_in * lin.d_out * lin.copies for lin in arch.linears) * arch.layers
    matmul_params += arch.vocab * arch.hidden
    return matmul_params * float_bytes(job.compute_dtype)


def unquantized_linears(job: Job, arch: ModelArch, stack: Stack) -> list[str]:
    """Names of the block projections the stack's bitsandbytes loading leaves in 16 bits."""
    if not job.quantized:
        return []
    return sorted({lin.name for lin in arch.projections if not stack.bnb_converts(lin)})

