"""The shape of a decoder model: all the planner needs to know about it.

The memory and cost models only need sizes (parameters, layers, width, sequence, vocabulary, heads),
so a ``ModelSpec`` can describe a model that was never built: one of our GPT presets, a Hugging Face
``config.json``, or a model from a paper that is far too large for the machine running the planner.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Hugging Face decoders with a SiLU activation (LLaMA, Mistral, Qwen) use a gated MLP: three matrices.
_GATED_ACTIVATIONS = ("silu", "swiglu")


@dataclass(frozen=True)
class ModelSpec:
    """Sizes of a decoder-only transformer; ``num_params`` counts every trainable parameter.

    ``lookup_params`` are parameters only ever indexed, never multiplied: an input embedding that is
    not tied to the output head, learned positions. They cost memory and communication but no FLOPs.
    """

    num_params: int
    n_layer: int
    d_model: int
    seq_len: int
    vocab_size: int
    n_head: int
    lookup_params: int = 0

    @property
    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward): 6 per matmul weight plus attention scores.

        The PaLM / Megatron-LM accounting that ``torchmics bench`` reports MFU against: lookup tables
        do no arithmetic, and the attention term is 12 * n_layer * d_model * seq_len. Recomputation is
        *not* included, so MFU stays comparable with and without activation checkpointing.
        """
        matmul_params = self.num_params - self.lookup_params
        return 6 * matmul_params + 12 * self.n_layer * self.d_model * self.seq_len

    @property
    def embedding_params(self) -> int:
        """Parameters outside the blocks: the lookup tables plus the output head (one matrix when tied).

        FSDP2 keeps them in the root unit, gathered once per micro-step for the whole forward.
        """
        return self.vocab_size * self.d_model + self.lookup_params

    @property
    def layer_params(self) -> int:
        """Parameters of one transformer block: one FSDP2 unit, one all-gather and one reduce-scatter."""
        return max(1, (self.num_params - self.embedding_params) // self.n_layer)

    @classmethod
    def from_shape(
        cls,
        n_layer: int,
        d_model: int,
        n_head: int,
        seq_len: int,
        vocab_size: int,
        num_params: int | None = None,
    ) -> ModelSpec:
        """A GPT-style decoder; ``num_params=None`` counts 12 * n_layer * d^2 + vocab * d (tied head)."""
        if num_params is None:
            num_params = _decoder_params(n_layer, d_model, vocab_size)
        return cls(num_params, n_layer, d_model, seq_len, vocab_size, n_head)

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> ModelSpec:
        """Read a Hugging Face ``config.json`` (LLaMA-style names, or GPT-2's n_layer / n_embd / n_positions).

        The parameter count is estimated from the shape: grouped-query attention, a gated MLP for
        SiLU models, and an untied output head are taken into account; biases and norms are not
        (they are < 0.1% of a billion-parameter model).
        """
        # imported lazily: planning must not pay for importing torch.nn model code
        from torchmics.models.gpt import hf_shape

        shape = hf_shape(config, "config")
        if shape.n_head is None or shape.max_context is None:
            raise ValueError("config names no attention heads or no maximum context; "
                             "is it a decoder-only transformer config?")
        n_layer, d_model, n_head, vocab_size = shape.n_layer, shape.d_model, shape.n_head, shape.vocab_size
        seq_len = shape.max_context
        ffn = config.get("intermediate_size") or config.get("n_inner") or 4 * d_model
        kv_dim = d_model * config.get("num_key_value_heads", n_head) // n_head
        tied = config.get("tie_word_embeddings", True)
        num_params = _decoder_params(
            n_layer,
            d_model,
            vocab_size,
            ffn=ffn,
            kv_dim=kv_dim,
            gated=config.get("hidden_act", "") in _GATED_ACTIVATIONS,
            tied=tied,
        )
        return cls(num_params, n_layer, d_model, seq_len, vocab_size, n_head, 0 if tied else vocab_size * d_model)

    @classmethod
    def from_name(cls, name: str) -> ModelSpec:
        """What ``torchmics train --model`` accepts: a preset, or ``hf:`` and a ``config.json`` (or its folder)."""
        if not name.startswith("hf:"):
            return cls.from_preset(name)
        from torchmics.models.gpt import hf_config_file  # lazily, as in from_hf_config

        return cls.from_hf_config(json.loads(Path(hf_config_file(name)).read_text()))

    @classmethod
    def from_preset(cls, name: str) -> ModelSpec:
        """A paper model from :data:`PAPER_MODELS`, or a preset of ``torchmics.models.gpt``."""
        if name in PAPER_MODELS:
            return PAPER_MODELS[name]
        # imported lazily: planning must not pay for importing torch.nn model code
        from torchmics.models import gpt

        if name not in gpt.PRESETS:
            known = sorted([*PAPER_MODELS, *gpt.PRESETS])
            raise ValueError(f"unknown model preset {name!r}; known presets: {known}")
        cfg = gpt.PRESETS[name]
        lookups = cfg.seq_len * cfg.d_model + (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model)
        return cls(cfg.num_params(), cfg.n_layer, cfg.d_model, cfg.seq_len, cfg.vocab_size, cfg.n_head, lookups)


def _decoder_params(
    n_layer: int,
    d_model: int,
    vocab_size: int,
    *,
    ffn: int | None = None,
    kv_dim: int | None = None,
    gated: bool = False,
    tied: bool = True,
) -> int:
    ffn = ffn or 4 * d_model
    kv_dim = kv_dim or d_model
    attention = 2 * d_model * d_model + 2 * d_model * kv_dim  # q, o and k, v projections
    mlp = (3 if gated else 2) * d_model * ffn
    return n_layer * (attention + mlp) + (1 if tied else 2) * vocab_size * d_model


PAPER_MODELS: dict[str, ModelSpec] = {
    # The MiCS paper's 100B-class model (its case study: 512 A100-40GB GPUs on p4d). Assumption:
    # d_model 8192 and 124 layers (12 * 124 * 8192^2 = 99.9B, twice the depth of the paper's BERT-50B),
    # 64 heads, sequence 512 (the paper's BERT pre-training length) and a 32k vocabulary; the paper
    # does not publish the exact shape of this proprietary model.
    "mics-100b": ModelSpec.from_shape(n_layer=124, d_model=8192, n_head=64, seq_len=512, vocab_size=32000),
    # GPT-3 175B (Brown et al. 2020, Table 2.1): 96 layers, d 12288, 96 heads, context 2048.
    "gpt3-175b": ModelSpec.from_shape(n_layer=96, d_model=12288, n_head=96, seq_len=2048, vocab_size=50257),
}
