"""A GPT decoder in the shape of nanoGPT, plus the presets `train` and `bench` use.

The model is deliberately plain (pre-LN blocks, learned positions, fused SDPA attention) so that what
the benchmarks measure is the sharding runtime, not model cleverness. ``build_model`` also accepts a
Hugging Face causal LM config, and ``logits_of`` hides the difference between the two output types.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from torchmics.materialize import init_weights


@dataclass(frozen=True, kw_only=True)
class GPTConfig:
    """Shape of a GPT decoder. ``seq_len`` is the maximum context (the size of the position table)."""

    n_layer: int
    n_head: int
    d_model: int
    seq_len: int
    vocab_size: int = 256
    dropout: float = 0.0
    tie_embeddings: bool = True
    bias: bool = False

    def __post_init__(self) -> None:
        for field in ("n_layer", "n_head", "d_model", "seq_len", "vocab_size"):
            if getattr(self, field) < 1:
                raise ValueError(f"GPTConfig.{field} must be >= 1, got {getattr(self, field)}")
        if self.d_model % self.n_head != 0:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_head {self.n_head}")

    @property
    def d_ff(self) -> int:
        return 4 * self.d_model

    def num_params(self) -> int:
        """Exact parameter count of ``GPT(self)``, a tied embedding counted once.

        Computed from the shape so that planning a 13B model does not need to build one.
        """
        d, bias = self.d_model, int(self.bias)
        norm = d + bias * d
        linears = (d * 3 * d + bias * 3 * d) + (d * d + bias * d) + 2 * d * self.d_ff + bias * (self.d_ff + d)
        embeddings = (self.vocab_size + self.seq_len) * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return self.n_layer * (2 * norm + linears) + embeddings + norm + head

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: ``6 * N_nonembedding + 12 * n_layer * d_model * seq_len``.

        The PaLM (appendix B) / Megatron-LM accounting: every weight that takes part in a matmul costs
        2 FLOPs per token forward and 4 backward, hence ``6 N``. ``N_nonembedding`` leaves out the
        lookup tables (``wpe``, and ``wte`` when it is not tied), which do no arithmetic, but keeps the
        ``lm_head`` projection, which does. Attention scores ``Q K^T`` and the weighted sum ``A V`` add
        ``2 * 2 * seq_len * d_model`` FLOPs per token and layer forward, times 3 with backward; the
        causal mask is not discounted, as in PaLM. Recomputation is not counted, so MFU stays comparable.
        """
        seq_len = self.seq_len if seq_len is None else seq_len
        lookups = self.seq_len * self.d_model + (0 if self.tie_embeddings else self.vocab_size * self.d_model)
        return 6 * (self.num_params() - lookups) + 12 * self.n_layer * self.d_model * seq_len


def _gpt3(n_layer: int, n_head: int, d_model: int, tie_embeddings: bool = True) -> GPTConfig:
    """GPT-3 paper shapes (Brown et al. 2020, table 2.1) with GPT-2's tokenizer padded to 50304."""
    return GPTConfig(
        n_layer=n_layer, n_head=n_head, d_model=d_model, seq_len=2048, vocab_size=50304, tie_embeddings=tie_embeddings
    )


PRESETS: dict[str, GPTConfig] = {
    # Byte-level toys for CPU: `tiny` trains in seconds in tests, `small` is the default of `torchmics train`.
    "tiny": GPTConfig(n_layer=2, n_head=4, d_model=64, seq_len=128),
    "small": GPTConfig(n_layer=4, n_head=4, d_model=128, seq_len=256),
    "gpt2-124m": GPTConfig(n_layer=12, n_head=12, d_model=768, seq_len=1024, vocab_size=50304),
    "350m": _gpt3(24, 16, 1024),
    "760m": _gpt3(24, 16, 1536),
    # The benchmark model (docs/design.md §7): GPT-3 1.3B's shape with an untied lm_head, 1.418B params.
    "1.4b": _gpt3(24, 16, 2048, tie_embeddings=False),
    "2.7b": _gpt3(32, 32, 2560),
    "6.7b": _gpt3(32, 32, 4096),
    # The paper's d_model 5140 is not divisible by its 40 heads; 5120 (head size 128) is what everyone uses.
    "13b": _gpt3(40, 40, 5120),
}


def get_preset(name: str) -> GPTConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)} (or hf:<config.json>)")
    return PRESETS[name]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.qkv(x).split(C, dim=2))
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LN transformer block; the unit ``shard(wrap=(Block,))`` turns into one FSDP2 group."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        if not self.wte.weight.is_meta:  # on meta, torchmics.shard() initializes each rank's shards
            init_weights(self)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """nanoGPT's init, one module at a time: N(0, 0.02), residual projections N(0, 0.02/sqrt(2 n_layer)).

        Per module, in the shape of Hugging Face's ``_init_weights``, so that torchmics can run it on
        one unit at a time when it materializes a model built on ``meta`` (torchmics.materialize).
        The residual projections are rescaled by their parent, which comes after them (as GPT-2 does).
        """
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, 0.02)
        if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
        if isinstance(module, (CausalSelfAttention, MLP)):
            nn.init.normal_(module.proj.weight, 0.0, 0.02 / math.sqrt(2 * self.cfg.n_layer))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, T]`` to next-token logits ``[B, T, vocab_size]``."""
        T = idx.size(1)
        if T > self.cfg.seq_len:
            raise ValueError(f"sequence length {T} exceeds the model's maximum context {self.cfg.seq_len}")
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(T, device=idx.device)))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def causal_lm_loss(logits: torch.Tensor, targets: torch.Tensor, *, fused: bool = False) -> torch.Tensor:
    """Mean next-token cross-entropy; computed in fp32 because bf16 logits lose the loss' small changes.

    ``fused=True`` computes the same fp32 loss through ``torch.compile``: each pass over the logits is
    one kernel that upcasts as it reads, where eager writes an fp32 copy of the ``[tokens, vocab]``
    logits and keeps fp32 log-probabilities for backward (for the 1.4b preset at micro-batch 4, two
    1.6 GB tensors and about 12 GB of memory traffic per micro-step that the fused loss does not need).
    """
    return (_compiled_cross_entropy() if fused else _cross_entropy)(logits, targets)


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


@functools.cache
def _compiled_cross_entropy() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return torch.compile(_cross_entropy)


def logits_of(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """Logits of our ``GPT`` (a tensor) or of a Hugging Face causal LM (an output object with ``.logits``)."""
    out = model(idx)
    return out if isinstance(out, torch.Tensor) else out.logits


@dataclass(frozen=True)
class ModelInfo:
    """What the training loop and the benchmark report about a model, whatever built it."""

    name: str
    num_params: int
    n_layer: int
    d_model: int
    vocab_size: int
    seq_len: int
    flops_per_token: int


def build_model(spec: str, seq_len: int | None = None) -> tuple[nn.Module, ModelInfo]:
    """Build a preset GPT (``spec`` a preset name) or a Hugging Face causal LM (``spec = "hf:<config.json>"``).

    ``seq_len`` is the training sequence length (default: the model's maximum context); it only sets
    ``ModelInfo.seq_len`` and the attention term of ``flops_per_token``. Parameters are created on the
    current default device, so ``with torch.device("meta"):`` builds a model of any size for free.
    HF models get random weights from their config: nothing is downloaded.
    """
    if spec.startswith("hf:"):
        return _build_hf(spec, seq_len)
    cfg = get_preset(spec)
    seq_len = _check_seq_len(spec, seq_len, cfg.seq_len)
    info = ModelInfo(
        name=spec,
        num_params=cfg.num_params(),
        n_layer=cfg.n_layer,
        d_model=cfg.d_model,
        vocab_size=cfg.vocab_size,
        seq_len=seq_len,
        flops_per_token=cfg.flops_per_token(seq_len),
    )
    return GPT(cfg), info


@dataclass(frozen=True)
class HFShape:
    """The shape fields of a Hugging Face config; ``None`` where the config does not name one."""

    n_layer: int
    d_model: int
    vocab_size: int
    n_head: int | None
    max_context: int | None


def hf_config_file(spec: str) -> str:
    """The ``config.json`` that ``spec`` (``"hf:"`` and a config.json or the folder holding one) names."""
    path = spec.removeprefix("hf:")
    path = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(path):
        raise ValueError(f"{spec}: {path} does not exist (expected a config.json or a folder holding one)")
    return path


def hf_shape(config: Mapping[str, Any] | object, spec: str = "the model") -> HFShape:
    """Layers, width, vocabulary, heads and maximum context of a Hugging Face config.

    ``config`` is a ``config.json`` as a dict or a ``transformers.PretrainedConfig``; HF model families
    spell the same field differently (LLaMA's names, or GPT-2's n_layer / n_embd / n_positions), and
    the first that the config has wins.
    """

    def field(*names: str, required: bool = True) -> int | None:
        for name in names:
            value = config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)
            if value is not None:
                return int(value)
        if required:
            raise ValueError(f"{spec}: the config has none of the fields {', '.join(names)}; "
                             "is it a decoder-only transformer config?")
        return None

    return HFShape(
        n_layer=field("num_hidden_layers", "n_layer"),
        d_model=field("hidden_size", "n_embd", "d_model"),
        vocab_size=field("vocab_size"),
        n_head=field("num_attention_heads", "n_head", required=False),
        max_context=field("max_position_embeddings", "n_positions", "seq_length", required=False),
    )


def _build_hf(spec: str, seq_len: int | None) -> tuple[nn.Module, ModelInfo]:
    path = hf_config_file(spec)
    try:
        import transformers
    except ImportError as e:
        raise ImportError(f"{spec} needs Hugging Face transformers: pip install 'torchmics[hf]'") from e
    config = transformers.AutoConfig.from_pretrained(path)
    # fp32 master weights whatever dtype the folder was saved in: --mixed-precision decides the compute dtype.
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    shape = hf_shape(config, spec)
    if seq_len is None and shape.max_context is None:
        raise ValueError(f"{spec}: the config names no maximum context (max_position_embeddings); pass seq_len")
    seq_len = _check_seq_len(spec, seq_len, shape.max_context)
    num_params = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    info = ModelInfo(
        name=spec,
        num_params=num_params,
        n_layer=shape.n_layer,
        d_model=shape.d_model,
        vocab_size=shape.vocab_size,
        seq_len=seq_len,
        flops_per_token=6 * num_params + 12 * shape.n_layer * shape.d_model * seq_len,
    )
    return model, info


def _check_seq_len(spec: str, seq_len: int | None, max_context: int | None) -> int:
    if seq_len is None:
        return max_context
    if seq_len < 1 or (max_context is not None and seq_len > max_context):
        raise ValueError(f"seq_len {seq_len} is outside model {spec}'s context: it must be in [1, {max_context}]")
    return seq_len
