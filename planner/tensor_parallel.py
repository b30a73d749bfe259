"""Tensor parallelism for inference: what one of N GPUs holds when each decoder layer's linears are split.

The split is Megatron-LM's (Shoeybi et al. 2019, section 3), as both engines memplan models apply it:
- vLLM 0.33 (vllm/model_executor/layers/linear.py:1065-1071): `QKVParallelLinear` gives each rank
  heads / N query heads and kv_heads / N KV heads, or, when N exceeds the KV heads, one KV head
  replicated on N / kv_heads ranks (`num_kv_head_replicas`); `MergedColumnParallelLinear` (gate_up)
  and `RowParallelLinear` (o_proj, down_proj) split the intermediate width; `VocabParallelEmbedding`
  and `ParallelLMHead` (vocab_parallel_embedding.py) split the vocabulary, padded to a multiple of
  64 (`DEFAULT_VOCAB_PADDING_SIZE`, line 36); norms are replicated. vLLM refuses a head count N does
  not divide (vllm/config/model.py:1558 `verify_with_parallel_config`): Qwen2.5-7B's 28 heads over 8
  GPUs, say, though its 4 KV heads would be replicated twice.
- transformers 5.23 `tp_plan="auto"` (distributed/tensor_parallel.py): the config's
  `base_model_tp_plan` ("colwise" q/k/v, gate/up: `Shard(0)` of the weight; "rowwise" o/down:
  `Shard(-1)`, bias replicated) and the model's `_tp_plan = {"lm_head": "colwise_gather_output"}` (the
  head split by vocabulary, the logits gathered whole on every rank); `init_parallel_plans`
  (distributed/mixin.py) adds "embedding_rowwise" for an `embed_tokens` embedding (split by vocabulary;
  a tied head is the same, split, matrix). DTensor's `Shard` cuts like `torch.chunk`: rank 0 holds the
  ceiling. tests/test_tensor_parallel.py holds rank 0's parameters to transformers' own
  `apply_tensor_parallelism` on the meta model under a fake process group. KV heads are
  not replicated: `get_kv_heads_per_rank` gives up when N does not divide them, and the attention's
  head reshape needs whole heads, so such a job is refused (vLLM replicates instead).

Activations: every hidden-size tensor (the residual stream, norms' outputs, the all-reduced sums) is
whole on every rank; the attention's heads and the MLP's intermediate are split. Pure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .architecture import LinearSpec, ModelArch
from .errors import MemplanInputError

Engine = Literal["transformers", "vllm"]
ENGINES: tuple[str, ...] = Engine.__args__  # type: ignore[attr-defined]

# vllm/model_executor/layers/vocab_parallel_embedding.py DEFAULT_VOCAB_PADDING_SIZE
VLLM_VOCAB_PADDING = 64

# transformers 5.23 model types whose config carries a base_model_tp_plan of plain "colwise" /
# "rowwise" (/ "packed_colwise" experts and replicated norms) splits, as read from each
# models/<type>/configuration_<type>.py; others have none (falcon, bloom, gpt_bigcode, gpt_oss) or
# gather their outputs (phi3, olmo2), which memplan does not model for transformers
TRANSFORMERS_TP_PLANS = frozenset({
    "llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral", "gemma", "gemma2", "gemma3_text",
    "phi", "gpt_neox",
})


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Layout:
    """One rank's share of a model split over `tp` GPUs."""

    tp: int
    engine: str
    heads: int  # query heads per rank
    kv_heads: int  # KV heads per rank
    kv_replicas: int  # ranks holding each KV head (1: the heads are split)
    embedding_rows: int  # rows of the token embedding one rank holds
    head_rows: int  # rows of the output projection one rank holds (its logits' width before the gather)

    @property
    def describe(self) -> str:
        kv = (f"{self.kv_heads} KV head per GPU, each on {self.kv_replicas} GPUs" if self.kv_replicas > 1
              else f"{self.kv_heads} KV heads per GPU")
        return f"tensor parallel over {self.tp} GPUs ({self.engine}): {self.heads} query heads, {kv}"


def check(arch: ModelArch, tp: int, engine: str) -> None:
    """One line naming what keeps `arch` from being split over `tp` GPUs by `engine`."""
    if arch.mla is not None:
        raise MemplanInputError(f"{arch.name}: tensor parallelism over multi-head latent attention (DeepSeek) is not "
                                "modelled; estimate it on one GPU (--num-gpus 1)")
    if engine == "transformers" and arch.family not in TRANSFORMERS_TP_PLANS:
        raise MemplanInputError(
            f"{arch.name} ({arch.family}): transformers 5.23 has no plain tp_plan for this family (its config "
            "holds none, or one that gathers outputs); use --engine vllm or --sharding device_map")
    if engine == "vllm" and arch.heads % tp:
        raise MemplanInputError(f"{arch.name}: {arch.heads} attention heads are not divisible by --num-gpus {tp} "
                                "(vLLM requires it); use a divisor of the head count")
    if engine == "vllm" and tp > arch.kv_heads and tp % arch.kv_heads:
        raise MemplanInputError(f"{arch.name}: --num-gpus {tp} is not a multiple of its {arch.kv_heads} KV heads "
                                "(vLLM replicates each KV head over a whole number of GPUs)")
    if engine == "transformers" and arch.kv_heads % tp:
        raise MemplanInputError(
            f"{arch.name}: {arch.kv_heads} KV heads are not divisible by --num-gpus {tp}: transformers' tp_plan "
            "splits k_proj/v_proj by rows and cannot replicate a KV head; use --engine vllm (it replicates "
            f"each KV head over {max(tp // arch.kv_heads, 1)} GPUs) or a divisor of {arch.kv_heads} GPUs")


def layout(arch: ModelArch, tp: int, engine: str) -> Layout:
    check(arch, tp, engine)
    if engine == "vllm":
        kv = max(arch.kv_heads // tp, 1)
        replicas = max(tp // arch.kv_heads, 1)
        padded = ceil_div(arch.vocab, VLLM_VOCAB_PADDING) * VLLM_VOCAB_PADDING
        rows = ceil_div(padded, tp)
        return Layout(tp, engine, arch.heads // tp, kv, replicas, rows, rows)
    # transformers (distributed/mixin.py init_parallel_plans): "Shard the input embeddings on the
    # vocabulary unless the plan already names them" when the base model has an `embed_tokens`
    # nn.Embedding ("embedding_rowwise", EmbeddingParallel(shard_dim=0)); GPT-NeoX's embed_in stays whole
    embedding = ceil_div(arch.vocab, tp) if arch.embedding_module == "embed_tokens" else arch.vocab
    return Layout(tp, engine, ceil_div(arch.heads, tp), arch.kv_heads // tp, 1, embedding, ceil_div(arch.vocab, tp))


def _attention_width(lin: LinearSpec, arch: ModelArch, lay: Layout) -> int:
    """A column-parallel attention projection's output on one rank: q (heads), k or v (KV heads) or
    a fused q/k/v, split by whole heads; the width it is made of is read off its size."""
    hd = arch.head_dim
    for q_part in (1, 0):
        for kv_part in (2, 1, 0):
            if q_part + kv_part and lin.d_out == (q_part * arch.heads + kv_part * arch.kv_heads) * hd:
                return (q_part * lay.heads + kv_part * lay.kv_heads) * hd
    return ceil_div(lin.d_out, lay.tp)


def _shard(lin: LinearSpec, arch: ModelArch, lay: Layout) -> LinearSpec:
    if lin.tp_style == "replicated":
        return lin
    if lin.tp_style == "rowwise":
        # its input is the split heads (o_proj) or the split intermediate (down_proj); bias whole
        width = lay.heads * arch.head_dim if lin.part == "attention" and lin.d_in == arch.heads * arch.head_dim \
            else ceil_div(lin.d_in, lay.tp)
        return lin.model_copy(update={"d_in": width})
    width = _attention_width(lin, arch, lay) if lin.part == "attention" else ceil_div(lin.d_out, lay.tp)
    return lin.model_copy(update={"d_out": width})


def rank_arch(arch: ModelArch, lay: Layout) -> ModelArch:
    """`arch` as one rank computes it: split heads and MLP widths, the hidden size whole. The
    vocabulary stays whole too (the gathered logits are; the weights' shares are `rank_params`)."""
    update = {
        "heads": lay.heads,
        "kv_heads": lay.kv_heads,
        "intermediate": ceil_div(arch.intermediate, lay.tp),
        "linears": tuple(_shard(lin, arch, lay) for lin in arch.linears),
    }
    if arch.kv_cache_width is not None:
        update["kv_cache_width"] = arch.kv_cache_width * lay.kv_heads // arch.kv_heads
    if arch.shared_expert_intermediate:
        update["shared_expert_intermediate"] = ceil_div(arch.shared_expert_intermediate, lay.tp)
    return arch.model_copy(update=update)


def rank_params(params, arch: ModelArch, lay: Layout):
    """ParamCounts of one rank: the per-layer counts of `rank_arch`'s layers, with the embedding and
    an untied head cut to their rows (a tied head is the embedding's own matrix)."""
    embedding = params.embedding - (arch.vocab - lay.embedding_rows) * arch.hidden
    head = params.lm_head
    if head:
        head = lay.head_rows * arch.hidden + (lay.head_rows if arch.lm_head_bias else 0)
    total = params.total - (params.embedding - embedding) - (params.lm_head - head)
    return params.model_copy(update={"embedding": embedding, "lm_head": head, "total": total})
