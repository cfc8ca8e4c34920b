"""Models that `torchmics train` and `torchmics bench` build: a GPT decoder, or any HF causal LM."""

from torchmics.models.gpt import (
    GPT,
    PRESETS,
    Block,
    GPTConfig,
    ModelInfo,
    build_model,
    causal_lm_loss,
    get_preset,
    logits_of,
)

__all__ = [
    "GPT",
    "PRESETS",
    "Block",
    "GPTConfig",
    "ModelInfo",
    "build_model",
    "causal_lm_loss",
    "get_preset",
    "logits_of",
]
