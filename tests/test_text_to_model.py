"""From a text corpus to a trained model, as the README shows it: a tokenizer in a model folder,
`prepare-data`, then `train --model hf:DIR --data ... --tensorboard --wandb` (W&B offline) on 2 ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from logged_scalars import tensorboard_scalars, wandb_config, wandb_history
from tiny_tokenizers import EOT, byte_bpe
from transformers import GPT2Config, PreTrainedTokenizerFast

STDLIB = Path(sysconfig.get_paths()["stdlib"])
STEPS = 30


def _cli(*args: str | Path, env: dict | None = None) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1"} | (env or {})
    command = [sys.executable, "-m", "torchmics.cli", *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env, check=False)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("text-to-model")
    corpus = sorted((STDLIB / "json").glob("*.py")) + sorted((STDLIB / "email").glob("*.py"))
    model = root / "model"  # what a Hugging Face model folder holds: config.json and the tokenizer files
    tokenizer = byte_bpe(512, [f.read_text() for f in corpus])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOT).save_pretrained(model)
    shape = dict(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=512, bos_token_id=0, eos_token_id=0)
    GPT2Config(**shape).save_pretrained(model)
    _cli("prepare-data", *corpus, "--tokenizer", model, "--out", root / "data" / "train.bin")
    flags = ["--model", f"hf:{model}", "--data", root / "data" / "train.bin", "--seq-len", "64", "--micro-batch", "2"]
    flags += ["--accum", "1", "--nproc", "2", "--emulate-nodes", "1", "--steps", str(STEPS), "--eval-every", "10"]
    flags += ["--lr", "3e-3", "--tensorboard", "--wandb", "--out", root / "run"]
    _cli("train", *flags, env={"WANDB_MODE": "offline", "WANDB_CONFIG_DIR": str(root / "wandb-config")})
    return root / "run"


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_on_the_prepared_tokens(trained):
    metrics = _metrics(trained)
    assert [r["step"] for r in metrics] == list(range(1, STEPS + 1))
    first, last = np.mean([r["loss"] for r in metrics[:3]]), np.mean([r["loss"] for r in metrics[-3:]])
    assert first > 6.0 and last < first - 0.5, (first, last)  # ln(512) = 6.24 at random init
    assert json.loads((trained / "config.json").read_text())["data_source"].startswith("token file ")


def test_tensorboard_holds_what_metrics_jsonl_holds(trained):
    scalars = tensorboard_scalars(trained / "tensorboard")
    metrics = _metrics(trained)
    assert {"loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_bytes"} <= set(scalars)
    for name, logged in scalars.items():
        assert logged == [(r["step"], np.float32(r[name])) for r in metrics if r.get(name) is not None], name


def test_wandb_offline_run_holds_what_metrics_jsonl_holds(trained):
    (run_file,) = (trained / "wandb").glob("offline-run-*/run-*.wandb")
    history = wandb_history(run_file)
    assert history == {
        r["step"]: {k: v for k, v in r.items() if k != "step" and v is not None} for r in _metrics(trained)
    }
    config = wandb_config(run_file)
    assert config["steps"] == STEPS and config["world_size"] == 2 and config["model_info"]["vocab_size"] == 512
