"""Parameter counts from the architecture alone.

They must equal `sum(p.numel() for p in model.parameters())` of the transformers model built
on the meta device (tests/test_params.py checks every shipped profile).
"""

from __future__ import annotations

from pydantic import BaseModel

from .architecture import ModelArch
from .stacks import Stack


class ParamCounts(BaseModel):
    embedding: int
    per_layer: int
    layers: int
    final_norm: int
    lm_head: int
    # Weights of the linear layers the stack's bitsandbytes loading replaces (Stack.bnb_converts).
    quantizable_linear: int
    # Largest single block, for FSDP units and checkpointed recomputation.
    total: int
    embedding_norm: int = 0  # a LayerNorm over the embeddings (Bloom's word_embeddings_layernorm), in the root
    # every decoder layer's parameters when the layers differ (DeepSeek's first dense
    # layers are smaller than `per_layer`, the routed ones'); None: per_layer x layers
    all_blocks: int | None = None

    @property
    def blocks(self) -> int:
        return self.per_layer * self.layers if self.all_blocks is None else self.all_blocks

    @property
    def unquantized(self) -> int:
        return self.total - self.quantizable_linear


def count_params(arch: ModelArch, stack: Stack | None = None) -> ParamCounts:
    """`stack` decides which linears count as quantizable (default: transformers 5's rule)."""
    if stack is None:
        from .stacks import get

        stack = get("transformers-5")
    linear_params = sum(lin.params for lin in arch.projections)
    head_norms = sum(arch.qk_norm_widths)
    sinks = arch.heads if arch.attention_sinks else 0  # GptOssAttention.sinks: one logit per head
    per_layer = linear_params + arch.norms_per_layer * arch.norm_params + head_norms + sinks
    embedding = arch.vocab * arch.hidden + (arch.max_positions * arch.hidden if arch.learned_positions else 0)
    lm_head = 0 if arch.tied_embeddings else arch.vocab * arch.hidden + (arch.vocab if arch.lm_head_bias else 0)
    quantizable = arch.layers * sum(d_in * d_out * n for d_in, d_out, n in stack.quantized_linears(arch))
    embedding_norm = arch.norm_params if arch.embedding_norm else 0  # Bloom's word_embeddings_layernorm
    total = embedding + embedding_norm + per_layer * arch.layers + arch.norm_params + lm_head
    if arch.mla is not None or arch.dense_layers:
        # MLA's latent norms in every layer; DeepSeek's first dense layers hold their dense
        # MLP in place of the routed one: per_layer stays the routed (largest) layer's
        per_layer += arch.mla.norm_params if arch.mla else 0
        total += arch.layers * (arch.mla.norm_params if arch.mla else 0)
        if arch.dense_layers:
            dense = arch.dense_view()
            routed = per_layer - sum(lin.params for lin in dense.projections)
            routed -= arch.norms_per_layer * arch.norm_params + (arch.mla.norm_params if arch.mla else 0)
            total -= arch.dense_layers * routed
            quantizable -= arch.dense_layers * (
                sum(d_in * d_out * n for d_in, d_out, n in stack.quantized_linears(arch))
                - sum(d_in * d_out * n for d_in, d_out, n in stack.quantized_linears(dense)))
    all_blocks = None
    if arch.dense_layers:
        all_blocks = total - embedding - embedding_norm - arch.norm_params - lm_head
    return ParamCounts(
        all_blocks=all_blocks,
        embedding=embedding,
        per_layer=per_layer,
        layers=arch.layers,
        final_norm=arch.norm_params,
        lm_head=lm_head,
        quantizable_linear=quantizable,
        total=total,
        embedding_norm=embedding_norm,
    )


# Module names of the input embedding per family (transformers modeling files); every shipped
# family calls its output projection `lm_head`. LoRA may target either (peft tuners/lora/layer.py
# `Embedding`, and `Linear` for the head). The embedding's name is the family's (ModelArch.embedding_module).
HEAD_MODULE = "lm_head"


def embedding_module(arch: ModelArch) -> str:
    return arch.embedding_module


def lora_params(arch: ModelArch, targets: tuple[str, ...], rank: int, dora: bool = False) -> int:
    """Trainable LoRA parameters: r x (d_in + d_out) per targeted linear per layer (peft LoraLayer:
    lora_A is r x d_in, lora_B d_out x r), and with DoRA the magnitude vector, d_out values per
    targeted linear (dora.py `DoraLinearLayer.update_layer`: the weight's norm over each output row).
    The input embedding takes lora_embedding_A (r x vocab) and lora_embedding_B (hidden x r)
    (layer.py `Embedding.update_layer`), with DoRA a magnitude of `hidden` values
    (`DoraEmbeddingLayer`: the norm of the transposed weight); the head is a Linear hidden -> vocab."""
    per_layer = sum(rank * (lin.d_in + lin.d_out) + (lin.d_out if dora else 0)
                    for lin in arch.linears if lin.name in targets)
    total = per_layer * arch.layers
    if embedding_module(arch) in targets:
        total += rank * (arch.vocab + arch.hidden) + (arch.hidden if dora else 0)
    if HEAD_MODULE in targets:
        total += rank * (arch.hidden + arch.vocab) + (arch.vocab if dora else 0)
    return total


def buffer_bytes(arch: ModelArch) -> int:
    """Non-parameter tensors the model registers: GPT-BigCode's (positions x positions) bool causal
    mask, and the rotary inverse frequencies (and their original copy) in fp32."""
    if arch.learned_positions:
        return arch.max_positions * arch.max_positions
    if arch.alibi:  # Bloom registers no buffer: its ALiBi slopes are built every forward
        return 0
    rotary = 2 * (arch.rotary_dim // 2) * 4 * arch.rope_kinds  # Gemma 3: a pair per layer type
    if arch.deepseek_router == "sigmoid_grouped":
        # DeepseekV3TopkRouter.e_score_correction_bias: one fp32 value per expert per MoE
        # layer (kept fp32: DeepseekV3PreTrainedModel._keep_in_fp32_modules_strict)
        return rotary + arch.moe_layers * arch.experts * 4
    return rotary
