"""What a Stack is: the rules of one software stack, with the transformers 5.x rules as defaults.

A stack (framework + version) decides which linears bitsandbytes converts, which attention kernel
runs, what the loss materialises, the default precision recipe and what a decoder layer saves. The
analytic core asks the job's Stack (`memplan.stacks.get(job.stack)`) and never branches on a
library's name or version. `kernels` says where the step runs: on CUDA, or on the CPU under fake
tensors (`memplan trace`), whose kernels save different tensors (docs/architecture.md).

A new stack is a subclass that overrides only the hooks whose behaviour differs, each citing the
library file it follows (docs/stacks/).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..activations import Ctx, Saved
    from ..architecture import LinearSpec, ModelArch
    from ..dtypes import DType
    from ..job import Job


class Kernels(str, Enum):
    """Where the step's kernels run: the GPU, or the CPU of the fake-tensor trace."""

    cuda = "cuda"
    cpu = "cpu"


@dataclass(frozen=True)
class LossTerms:
    """Bytes of the head and loss beyond the saved activations: live at the forward's high point
    at the head, live in the loss's backward, and still referenced by the training loop through
    backward and the optimizer step (litgpt's `fit()` keeps `logits`)."""

    forward: int
    backward: int
    held: int
    formula: str
    # The same tensors one by one, in order, for the allocator model (planner/alloc_sequence.py):
    # forward (name, bytes, life), life "free" (dies as the forward returns), "keep" (saved for the
    # loss backward) or "step" (held by the loop to the step's end); backward ("alloc", name, bytes)
    # and ("free", name) steps, a forward tensor freed by name. Empty: cut from the totals.
    forward_tensors: tuple = ()
    backward_ops: tuple = ()


@dataclass(frozen=True)
class Stack:
    name: str
    label: str  # the software, as the header names it
    sources: str  # the library versions its rules were read off
    kernels: Kernels = Kernels.cuda
    # what its bitsandbytes loading converts, in words, for notes
    bnb_rule: str = "only modules whose type is exactly nn.Linear (integrations/bitsandbytes.py)"
    # gradient_checkpointing_enable()'s default: transformers 5.23 modeling_utils.py:3149
    # {"use_reentrant": False}
    default_reentrant: bool = False
    # peft 0.21 prepare_model_for_kbit_training (utils/other.py:214, `auto_clear_cache=True`):
    # torch.cuda.empty_cache() after the fp32 upcast, so the freed 16-bit segments go back to the
    # driver (the allocator model's load sequence, planner/alloc_sequence.py)
    kbit_prepare_empties_cache: bool = True

    def on_cpu(self) -> "Stack":
        """The same stack on the CPU trace's kernels."""
        return dataclasses.replace(self, kernels=Kernels.cpu)

    @property
    def cpu(self) -> bool:
        return self.kernels is Kernels.cpu

    # the optional training features (Job fields) this stack runs and memplan models for it
    features: tuple[str, ...] = ("liger", "packing", "activation_offloading", "flash_attention_2", "dora",
                                 "lora_on_embeddings_or_head")

    def check(self, job: "Job", arch: "ModelArch") -> None:
        """Refuse, with one line, a job this stack cannot run or memplan does not model for it.
        transformers runs everything the Job allows."""

    def check_features(self, job: "Job", arch: "ModelArch") -> None:
        """A feature the job asks for that this stack does not run is refused, never ignored."""
        from ..params import HEAD_MODULE, embedding_module

        targets = () if isinstance(job.lora_targets, str) and job.lora_targets in ("default", "all-linear") else (
            (job.lora_targets,) if isinstance(job.lora_targets, str) else job.lora_targets)
        targets = {t for part in targets for t in part.split(",")}
        outer = job.uses_lora and bool(targets & {HEAD_MODULE, embedding_module(arch)})
        asked = {"lora_on_embeddings_or_head": outer,"liger": job.liger, "packing": job.packing, "activation_offloading": job.activation_offloading,
                 "flash_attention_2": job.attention == "flash_attention_2",
                 "optimizer_in_backward": job.optimizer_in_backward, "chunked_loss": bool(job.chunked_loss),
                 "dora": job.dora}
        for feature, on in asked.items():
            if on and feature not in self.features:
                from ..errors import MemplanInputError

                flag = {"flash_attention_2": "--attention flash_attention_2",
                        "lora_on_embeddings_or_head": "--lora-targets with the embedding or lm_head"}.get(
                            feature, "--" + feature.replace("_", "-"))
                runs = ", ".join(self.features) or "none of the optional features"
                raise MemplanInputError(f"{flag} is not something --stack {self.name} runs (memplan models it for other "
                                        f"stacks); {self.name} runs: {runs}")

    # --- loading -------------------------------------------------------------------------------
    def bnb_converts(self, lin: "LinearSpec") -> bool:
        """Whether bitsandbytes loading replaces this linear with a 4/8-bit one. transformers 5.x
        (integrations/bitsandbytes.py `_replace_with_bnb_linear`: `type(module) is nn.Linear`)
        converts exact nn.Linear only: Falcon's FalconLinear subclass, fused 3-D expert tensors and
        Mixtral's router (a bare Parameter) stay in the compute dtype."""
        return lin.module == "Linear"

    def quantized_linears(self, arch: "ModelArch") -> list[tuple[int, int, int]]:
        """(d_in, d_out, tensors per layer) of every weight bitsandbytes loading converts."""
        return [(lin.d_in, lin.d_out, lin.copies) for lin in arch.projections if self.bnb_converts(lin)]

    def default_weight_dtype(self, job: "Job") -> "DType":
        """The base weights' dtype when the job does not name one: NF4 for QLoRA, else the compute
        dtype (from_pretrained(torch_dtype=...) with the Trainer's bf16/fp16)."""
        from ..dtypes import DType

        return DType.nf4 if job.method == "qlora" else job.compute_dtype

    def buffer_bytes(self, job: "Job", arch: "ModelArch") -> int:
        """Non-parameter tensors the model registers (params.py `buffer_bytes`: transformers'
        rotary inverse frequencies, or GPT-BigCode's causal mask)."""
        from ..params import buffer_bytes

        return buffer_bytes(arch)

    def buffers_formula(self, job: "Job", arch: "ModelArch") -> str:
        """How `buffer_bytes` counts, for the breakdown."""
        return (f"causal mask buffer {arch.max_positions:,}^2 x 1 B (bool)" if arch.learned_positions
                else "rotary inverse frequencies, fp32")

    # --- optimizer -----------------------------------------------------------------------------
    def optimizer_step_temporary(self, job: "Job", n_train: int, largest: int) -> tuple[int, str]:
        """The optimizer step's temporaries: torch.optim's AdamW with the job's `foreach`
        (training.py `optimizer_step_temporary`)."""
        from ..training import optimizer_step_temporary

        return optimizer_step_temporary(job, n_train, largest)

    def step_counter_bytes(self, job: "Job") -> int:
        """Bytes per trainable tensor of AdamW's `step` counter. torch keeps it as a 0-d fp32 tensor
        on the CPU unless fused or capturable (optim/adamw.py `_init_group`: `torch.tensor(0.0)`):
        nothing on the GPU, but one 512-byte block each in the CPU trace."""
        return 512 if self.cpu and job.optimizer == "adamw" else 0

    def gradients_held(self, job: "Job", produced: int, in_flight: int) -> int:
        """Gradient bytes live once `produced` bytes of gradients have been produced; `in_flight`
        is the largest single gradient that may still be awaiting its update (0 once backward is
        over). The HF Trainer keeps every gradient until the optimizer step."""
        return produced

    def lora_targets(self, job: "Job", arch: "ModelArch") -> tuple[str, ...]:
        """The linears LoRA adapts: the job's names, or for "default" peft's per-family default
        (utils/constants.py TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING; training.py
        `resolve_targets`)."""
        from ..training import resolve_targets

        return resolve_targets(job, arch)

    def default_adapter_dtype(self, job: "Job") -> "DType":
        """peft's get_peft_model(autocast_adapter_dtype=True) (peft tuners_utils.py
        `_cast_adapter_dtype`): fp16/bf16 adapters are upcast to fp32; sharded QLoRA passes
        autocast_adapter_dtype=False (see `sharded_qlora`): the model's dtype."""
        from ..dtypes import DType

        return job.compute_dtype if self.sharded_qlora(job) else DType.fp32

    def sharded_qlora(self, job: "Job") -> bool:
        """QLoRA under FSDP as TRL runs it (trl 0.24 models/utils.py `prepare_peft_model`): the
        4-bit weights are stored in the model's dtype (`bnb_4bit_quant_storage`, so FSDP can
        shard them) and still on cpu/meta when the trainer sees them (`is_sharded_qlora`), so
        prepare_model_for_kbit_training is skipped (no fp32 upcast) and the adapters are made
        with autocast_adapter_dtype=False."""
        return job.quantized and job.uses_lora and job.fsdp

    def kbit_prepares(self, job: "Job") -> bool:
        """Whether prepare_model_for_kbit_training runs (its fp32 upcast of every non-4/8-bit
        parameter): as the job says, except for sharded QLoRA, where TRL skips it."""
        return job.kbit_prepare and not self.sharded_qlora(job)

    # --- activations ---------------------------------------------------------------------------
    def checkpoints(self, arch: "ModelArch") -> bool:
        """Whether `gradient_checkpointing_enable()` really checkpoints this architecture's decoder
        layers: in transformers 5 every decoder layer is a GradientCheckpointingLayer
        (modeling_layers.py)."""
        return True

    def layer_saved(self, arch: "ModelArch", ctx: "Ctx") -> "Saved":
        """What one decoder layer saves for backward: the family's transformers modeling file."""
        from ..families import family_of

        return family_of(arch).layer_saved(arch, ctx)

    def layer_backward_transient(self, arch: "ModelArch", ctx: "Ctx", saved: "Saved") -> int:
        from .. import activations
        from ..families import family_of

        own = family_of(arch).backward_transient
        return own(arch, ctx, saved) if own else activations.layer_backward_transient(arch, ctx, saved)

    def layer_forward_transient(self, arch: "ModelArch", ctx: "Ctx", saved: "Saved", checkpointed: bool) -> int:
        from .. import activations
        from ..families import family_of

        attention = activations.layer_forward_transient(arch, ctx, saved, checkpointed)
        own = family_of(arch).forward_transient
        return max(attention, own(arch, ctx, saved, checkpointed)) if own else attention

    # --- loss ----------------------------------------------------------------------------------
    def loss(self, job: "Job", arch: "ModelArch", tokens: int, logit_bytes: int) -> LossTerms:
        """transformers' ForCausalLMLoss (loss/loss_utils.py): `logits.float()` then cross-entropy,
        whose forward keeps the fp32 log-softmax; its backward holds the log-softmax and two fp32
        vocab-wide gradients. Logits come out of lm_head in `logit_bytes`."""
        v = arch.vocab
        upcast = 4 if logit_bytes != 4 else 0
        parts = f"{logit_bytes} B logits + an fp32 copy + fp32 log-softmax" if upcast else "fp32 logits + fp32 log-softmax"
        tv = tokens * v
        # nll_loss's backward makes the log-softmax's output gradient, log_softmax's backward the
        # input gradient (both fp32); `.float()`'s backward casts that to the logits' dtype
        fwd = (("logits", tv * logit_bytes, "free"),) + ((("logits.float", tv * 4, "free"),) if upcast else ()) \
            + (("log_softmax", tv * 4, "keep"),)
        bwd = (("alloc", "grad log_softmax", tv * 4), ("alloc", "grad logits.float", tv * 4),
               ("free", "grad log_softmax"), ("free", "log_softmax"))
        if upcast:
            bwd += (("alloc", "grad logits", tv * logit_bytes), ("free", "grad logits.float"))
        terms = LossTerms(
            forward=tokens * v * (logit_bytes + upcast + 4),
            backward=tokens * v * 12,
            held=0,
            formula=(f"{tokens:,} tokens x {v:,} vocab x {logit_bytes + upcast + 4} B in forward ({parts}), "
                     "x 12 B in loss backward (fp32 log-softmax + 2 fp32 gradients)"),
            forward_tensors=fwd,
            backward_ops=bwd,
        )
        return softcapped_loss(terms, arch, tokens, logit_bytes)


def softcapped_loss(terms: LossTerms, arch: "ModelArch", tokens: int, logit_bytes: int) -> LossTerms:
    """Final-logit soft-capping (Gemma 2 `final_logit_softcapping`, Gemma2ForCausalLM.forward:
    `logits / cap`, `tanh`, `* cap` before the loss): tanh saves its output, one more logits-sized
    tensor in the logits' dtype, kept from the forward's head through the loss's backward."""
    if arch.final_softcap is None:
        return terms
    extra = tokens * arch.vocab * logit_bytes
    tensors = terms.forward_tensors + (("tanh", extra, "keep"),) if terms.forward_tensors else ()
    return dataclasses.replace(terms, forward=terms.forward + extra, backward=terms.backward + extra,
                               forward_tensors=tensors,
                               formula=terms.formula + f"; + {logit_bytes} B tanh output of the final-logit soft-capping")
