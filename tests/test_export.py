"""Export: a sharded model in memory or a weights-only checkpoint becomes a folder `from_pretrained` loads."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import torchmics
from dist_utils import run_ranks
from toy import ToyModel

transformers = pytest.importorskip("transformers")

TOKENS = torch.tensor([[1, 5, 9, 2, 30, 7], [3, 3, 8, 0, 36, 4]])


def _tiny_gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(vocab_size=37, n_embd=16, n_layer=2, n_head=4, n_positions=32,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.AutoModelForCausalLM.from_config(config)


def _error(fn) -> str | None:
    try:
        fn()
    except Exception as err:  # compared on every rank
        return f"{type(err).__name__}: {err}"
    return None


def _export_sharded(out: str) -> dict:
    """A tied-embedding GPT-2 sharded over 2 ranks: exported from memory, and saved without optimizer or spec."""
    topo = torchmics.init_mesh(partition_size=2, gpus_per_node=2)
    torch.manual_seed(0)
    model = torchmics.shard(_tiny_gpt2(), topo)
    with torch.no_grad():
        logits = model.eval()(TOKENS).logits
    torchmics.export_model(model, os.path.join(out, "memory"))
    torchmics.export_model(model, os.path.join(out, "memory.safetensors"))
    existing = _error(lambda: torchmics.export_model(model, os.path.join(out, "memory")))
    ckpt = torchmics.checkpoint_path(os.path.join(out, "run"), 0)
    torchmics.save_checkpoint(ckpt, model, None, step=0)  # weights only, and no extra["model"]
    torchmics.load_checkpoint(ckpt, model)
    optimizer = torch.optim.AdamW(model.parameters())
    load_with_optimizer = _error(lambda: torchmics.load_checkpoint(ckpt, model, optimizer))
    toy = torchmics.shard(ToyModel(), topo)
    torchmics.export_model(toy, os.path.join(out, "toy"))
    return {"logits": logits, "existing": existing, "load_with_optimizer": load_with_optimizer,
            "toy": torchmics.full_state_dict(toy)}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    return out, run_ranks(_export_sharded, 2, str(out))


def _logits(folder) -> torch.Tensor:
    with torch.no_grad():
        return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()(TOKENS).logits


def test_export_model_loads_with_from_pretrained_to_the_same_logits(exported):
    out, results = exported
    assert sorted(os.listdir(out / "memory")) == ["config.json", "model.safetensors"]  # the model's own config
    torch.testing.assert_close(_logits(out / "memory"), results[0]["logits"])
    single = load_file(out / "memory.safetensors")
    for name, tensor in load_file(out / "memory" / "model.safetensors").items():
        assert torch.equal(single[name], tensor), name


def test_export_model_refuses_an_existing_destination_on_every_rank(exported):
    _, results = exported
    for result in results:
        assert result["existing"].startswith("FileExistsError") and "never overwritten" in result["existing"]


def test_a_plain_module_exports_weights_only(exported):
    out, results = exported
    assert os.listdir(out / "toy") == ["model.safetensors"]
    exported_weights = load_file(out / "toy" / "model.safetensors")
    assert exported_weights.keys() == results[0]["toy"].keys()
    for name, tensor in results[0]["toy"].items():  # tied head and embedding written as two tensors
        assert torch.equal(exported_weights[name], tensor), name


def test_checkpoint_without_optimizer_or_spec_exports_its_model_config(exported, tmp_path):
    out, results = exported
    for result in results:
        assert "holds no optimizer state" in result["load_with_optimizer"]
        assert "without an optimizer" in result["load_with_optimizer"]
    torchmics.export_checkpoint(str(out / "run" / "step_0"), str(tmp_path / "hf"))
    torch.testing.assert_close(_logits(tmp_path / "hf"), results[0]["logits"])


def test_export_checkpoint_takes_an_explicit_config(exported, tmp_path):
    out, _ = exported
    config = transformers.AutoConfig.from_pretrained(out / "memory")
    config.summary_activation = "explicit"  # a field the model does not use: shows which config was written
    torchmics.export_checkpoint(str(out / "run" / "step_0"), str(tmp_path / "hf"), hf_config=config)
    assert transformers.AutoConfig.from_pretrained(tmp_path / "hf").summary_activation == "explicit"
    with pytest.raises(ValueError, match="single .safetensors file"):
        torchmics.export_checkpoint(str(out / "run" / "step_0"), str(tmp_path / "w.safetensors"), hf_config=config)
    assert not (tmp_path / "w.safetensors").exists()


def test_export_command_prints_no_warning(exported, tmp_path):
    out, _ = exported
    command = [sys.executable, "-m", "torchmics.cli", "export", str(out / "run" / "step_0"), "--to", str(tmp_path / "cli")]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    assert done.stderr == ""
    assert done.stdout.startswith(f"wrote {tmp_path / 'cli' / 'model.safetensors'}")
    assert sorted(os.listdir(tmp_path / "cli")) == ["config.json", "model.safetensors"]
