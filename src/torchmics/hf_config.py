"""Which Hugging Face config goes with saved weights, so that an exported folder loads with ``from_pretrained``.

``transformers.AutoModelForCausalLM.from_pretrained(folder)`` needs ``config.json`` beside the weights.
A checkpoint keeps the config of the model it holds (``hf_config.json``) and every export of it to a
folder writes that file as ``config.json``. Where the config comes from, first match wins:

1. ``hf_config=`` passed to :func:`torchmics.save_checkpoint` / :func:`torchmics.export_checkpoint` /
   :func:`torchmics.export_model`: a ``config.json``, the folder holding one, or a
   ``transformers.PretrainedConfig``;
2. ``extra={"model": "hf:<config.json or folder>"}`` at save time (what ``torchmics train`` records);
3. the model's own ``config`` when it is a ``transformers.PreTrainedModel``.

A model that is none of these (a plain ``nn.Module``) gets no config: its folder export holds only
``model.safetensors``.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Union

import torch.nn as nn

if TYPE_CHECKING:
    from transformers import PretrainedConfig

HFConfig = Union[str, "os.PathLike[str]", "PretrainedConfig"]  # a config.json, its folder, or a config object


def config_text(hf_config: HFConfig) -> str:
    """The JSON text of ``hf_config``: a ``config.json``, the folder holding one, or a ``PretrainedConfig``."""
    if hasattr(hf_config, "to_json_string"):
        return hf_config.to_json_string()
    if not isinstance(hf_config, (str, os.PathLike)):
        raise TypeError(
            f"hf_config must be a config.json path, the folder holding one, or a transformers.PretrainedConfig; "
            f"got {type(hf_config).__name__}"
        )
    path = os.path.join(hf_config, "config.json") if os.path.isdir(hf_config) else os.fspath(hf_config)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"hf_config {hf_config!s}: {path} does not exist (expected a config.json or its folder)")
    with open(path) as f:
        return f.read()


def model_config_text(model: nn.Module, hf_config: HFConfig | None, extra: dict | None = None) -> str | None:
    """The config to keep with ``model``'s weights, by the precedence in the module docstring; ``None``: none."""
    if hf_config is not None:
        return config_text(hf_config)
    spec = (extra or {}).get("model")
    if isinstance(spec, str) and spec.startswith("hf:"):
        try:
            return config_text(spec.removeprefix("hf:"))
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"extra['model'] = {spec!r} names no config file ({err}); the checkpoint keeps a copy of it for "
                "export. Pass the spec the model was built from, or hf_config=."
            ) from err
    if _is_transformers_model(model):
        return config_text(model.config)
    return None


def _is_transformers_model(model: nn.Module) -> bool:
    """Without importing transformers: a model can only be one if transformers is imported already."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)
