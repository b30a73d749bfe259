"""transformers + peft + the HF Trainer: the 5.x stack (the defaults of Stack) and the 4.x stack.

The two differ, as far as memory goes, in what bitsandbytes loading converts. Everything else that
was checked is the same: memplan's trace of the real step under transformers 4.57.1 + peft 0.17.1
gives the same bytes as under 5.23 + 0.21 for Llama-2-7B LoRA b2 s512 and Falcon-7B LoRA b1 s512
(512 B apart, ../shared/PROBES.md section 2; tests/test_stack_transformers4.py re-traces in CI).
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Stack


@dataclass(frozen=True)
class Transformers5(Stack):
    name: str = "transformers-5"
    label: str = "transformers 5.x + peft + HF Trainer"
    sources: str = "transformers 5.23.0, peft 0.21.2"


@dataclass(frozen=True)
class Transformers4(Stack):
    name: str = "transformers-4"
    label: str = "transformers 4.x + peft + HF Trainer"
    sources: str = "transformers 4.57.1, peft 0.17.1"
    bnb_rule: str = "every nn.Linear and Conv1D, subclasses included (integrations/bitsandbytes.py)"
    # 4.57.1 modeling_utils.py:3692: gradient_checkpointing_kwargs defaults to {"use_reentrant": True}
    default_reentrant: bool = True
    # decoder layers 4.57.1 never checkpoints: GPTBigCodeBlock is a plain nn.Module there (not a
    # GradientCheckpointingLayer, as in 5.x) and GPTBigCodeModel.forward never calls the
    # checkpoint function (models/gpt_bigcode/modeling_gpt_bigcode.py:274, 419), so
    # gradient_checkpointing_enable() changes nothing (its 4.57 trace equals the unchecked one)
    never_checkpointed: tuple[str, ...] = ("GPTBigCodeBlock",)
    # peft 0.17.1 utils/other.py:156 upcasts with no empty_cache after it (auto_clear_cache came later)
    kbit_prepare_empties_cache: bool = False

    def checkpoints(self, arch) -> bool:
        return arch.decoder_layer not in self.never_checkpointed

    def bnb_converts(self, lin) -> bool:
        """transformers 4.36-4.57 (integrations/bitsandbytes.py `_replace_with_bnb_linear`:
        `isinstance(module, (nn.Linear, Conv1D))`) converts every nn.Linear subclass: Falcon's
        FalconLinear, and Mixtral's router and per-expert w1/w2/w3, which 4.x builds as one
        nn.Linear each (modeling_mixtral.py MixtralBlockSparseTop2MLP)."""
        return True

    def quantized_linears(self, arch) -> list[tuple[int, int, int]]:
        """4.x builds each expert's gate and up projections as two nn.Linear (w1, w3), not one
        fused gate_up tensor: each is converted, and dequantized, on its own."""
        out = []
        for lin in arch.projections:
            if lin.module == "fused experts" and lin.d_out == 2 * arch.intermediate:
                out.append((lin.d_in, arch.intermediate, 2 * lin.copies))
            else:
                out.append((lin.d_in, lin.d_out, lin.copies))
        return out
