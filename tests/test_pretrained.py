"""Pretrained weights into shards: logits equal transformers' own, reads are partial, export round-trips."""

from __future__ import annotations

import json

import pytest
import safetensors
import torch
from safetensors.torch import load_file

import torchmics
import torchmics.pretrained
from dist_utils import run_ranks
from test_equivalence import build_gpt2, build_llama
from torchmics.models import GPT, get_preset

BUILDERS = {"llama": build_llama, "gpt2": build_gpt2}


def _batch(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(7))


class _CountingOpen:
    """safe_open that adds up the elements each rank takes out of the files."""

    taken = 0

    def __init__(self, *args, **kwargs):
        self._file = safetensors.safe_open(*args, **kwargs)

    def __enter__(self):
        self._opened = self._file.__enter__()
        return self

    def __exit__(self, *exc):
        return self._file.__exit__(*exc)

    def keys(self):
        return self._opened.keys()

    def get_slice(self, name):
        stored = self._opened.get_slice(name)
        outer = self

        class Slice:
            def get_shape(self):
                return stored.get_shape()

            def get_dtype(self):
                return stored.get_dtype()

            def __getitem__(self, index):
                part = stored[index]
                type(outer).taken += part.numel()
                return part

        return Slice()


def _load_and_run(folder: str, partition_size: int, gpus_per_node: int) -> dict:
    torchmics.pretrained.safe_open = _CountingOpen
    topo = torchmics.init_mesh(partition_size=partition_size, gpus_per_node=gpus_per_node)
    from transformers import AutoConfig, AutoModelForCausalLM

    with torchmics.meta_init():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    model = torchmics.shard(model, topo)
    torchmics.load_pretrained(model, folder)
    with torch.no_grad():
        logits = model(_batch(model.config.vocab_size)).logits
    return {"logits": logits, "taken": _CountingOpen.taken}


def _load_each(folders: list[str]) -> list[dict]:
    """Several folders in one job: one spawn for all of them."""
    results = []
    for folder in folders:
        before = _CountingOpen.taken
        result = _load_and_run(folder, 4, 2)
        results.append(result | {"taken": result["taken"] - before})
    return results


def test_hf_weights_into_four_ranks_give_transformers_logits(tmp_path):
    """Tiny Llama and GPT-2 saved by transformers, loaded into 4 ranks (2 nodes x 2, partition 4); the
    Llama once more as a sharded folder (model.safetensors.index.json and several files)."""
    from transformers import AutoModelForCausalLM

    folders, expected = [], []
    for builder, shard_size in (("llama", None), ("gpt2", None), ("llama", "20KB")):
        name = f"{builder}-{shard_size or 'one-file'}"
        torch.manual_seed(3)
        BUILDERS[builder]().save_pretrained(tmp_path / name, **({"max_shard_size": shard_size} if shard_size else {}))
        reference = AutoModelForCausalLM.from_pretrained(tmp_path / name)
        with torch.no_grad():
            expected.append(reference(_batch(reference.config.vocab_size)).logits)
        folders.append(str(tmp_path / name))
    assert len(set(torchmics.pretrained.read_pretrained(folders[-1]).files.values())) > 1
    ranks = run_ranks(_load_each, 4, folders, nodes=2)
    for i, folder in enumerate(folders):
        for rank in ranks:
            torch.testing.assert_close(rank[i]["logits"], expected[i], rtol=1e-5, atol=1e-5)
        files = set(torchmics.pretrained.read_pretrained(folder).files.values())
        stored = sum(t.numel() for path in files for t in load_file(path).values())
        taken = [rank[i]["taken"] for rank in ranks]
        assert sum(taken) <= stored * 1.01  # every element read once over the 4 ranks, not 4 times
        assert max(taken) < stored / 4 * 1.3  # and each rank about its quarter


def _round_trip_source(folder: str) -> None:
    """4 ranks, partition 2: a trained step of the tiny GPT, saved as a sharded checkpoint."""
    topo = torchmics.init_mesh(partition_size=2, gpus_per_node=2)
    torch.manual_seed(0)
    with torchmics.meta_init():
        model = GPT(get_preset("tiny"))
    model = torchmics.shard(model, topo)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = _batch(256)
    torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten()).backward()
    optimizer.step()
    torchmics.save_checkpoint(f"{folder}/step_1", model, optimizer, step=1)


def _round_trip_target(folder: str) -> torch.Tensor:
    topo = torchmics.init_mesh(partition_size=2, gpus_per_node=2)
    with torchmics.meta_init():
        model = GPT(get_preset("tiny"))
    model = torchmics.shard(model, topo)
    torchmics.load_pretrained(model, folder)
    with torch.no_grad():
        return model(_batch(256))


def test_export_then_load_into_another_topology(tmp_path):
    run_ranks(_round_trip_source, 4, str(tmp_path), nodes=2)
    torchmics.export_checkpoint(str(tmp_path / "step_1"), str(tmp_path / "exported"))
    reference = GPT(get_preset("tiny"))
    reference.load_state_dict(load_file(tmp_path / "exported" / "model.safetensors"))
    with torch.no_grad():
        expected = reference(_batch(256))
    logits = run_ranks(_round_trip_target, 2, str(tmp_path / "exported"))
    torch.testing.assert_close(logits[0], expected, rtol=1e-5, atol=1e-5)


def _load_expecting_errors(folders: list[str]) -> list[str]:
    topo = torchmics.init_mesh(partition_size=2, gpus_per_node=2)
    with torchmics.meta_init():
        model = GPT(get_preset("tiny"))
    model = torchmics.shard(model, topo)
    messages = []
    for folder in folders:  # a refused load loads nothing, so the model serves the next folder
        try:
            torchmics.load_pretrained(model, folder)
            messages.append("")
        except ValueError as err:
            messages.append(str(err))
    return messages


def test_mismatched_folder_is_refused_on_every_rank(tmp_path):
    from safetensors.torch import save_file

    weights = {k: v.contiguous() for k, v in GPT(get_preset("tiny")).state_dict().items() if k != "lm_head.weight"}
    weights["wpe.weight"] = torch.zeros(64, 64)  # the tiny preset's table is [128, 64]
    weights["stray"] = torch.zeros(1)
    save_file(weights, str(tmp_path / "model.safetensors"))
    missing = tmp_path / "missing"
    for mismatched, absent in run_ranks(_load_expecting_errors, 2, [str(tmp_path), str(missing)]):
        assert "wpe.weight: folder [64, 64] vs model [128, 64]" in mismatched
        assert "stray: in the folder, not in the model" in mismatched and "Nothing was loaded" in mismatched
        assert absent.startswith(f"cannot read the pretrained weights in {missing} (rank 0): FileNotFoundError: ")
        assert absent.endswith(". Nothing was loaded.") and ".." not in absent


def _llama_folder(path) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=0.2, dtype="bfloat16")  # as checkpoints ship; wide, so the batch matters
    torch.manual_seed(11)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return str(path)


def _first_batch(world: int, micro_batch: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 0's global micro-batch as `train` deals it out: every rank's rows in rank order."""
    from torchmics.train.data import BatchSampler, load_tokens

    data = load_tokens(None, seq_len)
    parts = [BatchSampler(data.train, seq_len, micro_batch * world, r, world, seed=0).batch(0, 0) for r in range(world)]
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])


def test_train_fine_tunes_from_the_folder(tmp_path):
    """`torchmics train --model hf:DIR`: the first step's loss is transformers' own loss on that batch.

    The folder is saved in bf16, as published checkpoints are: train keeps fp32 master weights (the
    default --mixed-precision fp32), so the reference is transformers' model loaded in fp32.
    """
    from test_train_cli import _cli, _metrics, _succeeded
    from transformers import AutoModelForCausalLM

    folder = _llama_folder(tmp_path / "llama")
    flags = ["--model", f"hf:{folder}", "--nproc", "2", "--steps", "1", "--accum", "1", "--micro-batch", "2",
             "--seq-len", "32", "--log-every", "1", "--eval-every", "1"]
    result = _succeeded(_cli("train", *flags, "--out", str(tmp_path / "run")))
    assert f"pretrained from {folder}" in result.stdout
    x, y = _first_batch(2, 2, 32)
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(x).logits
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).item()
    assert _metrics(tmp_path / "run")[0]["loss"] == pytest.approx(expected, rel=1e-5)
    scratch = _succeeded(_cli("train", *flags, "--random-init", "--out", str(tmp_path / "scratch")))
    assert "random init" in scratch.stdout
    assert _metrics(tmp_path / "scratch")[0]["loss"] != pytest.approx(expected, rel=1e-3)


def test_train_refuses_weights_that_do_not_fit_before_spawning(tmp_path):
    from test_train_cli import _cli

    folder = _llama_folder(tmp_path / "llama")
    config = json.loads((tmp_path / "llama" / "config.json").read_text())
    (tmp_path / "llama" / "config.json").write_text(json.dumps(config | {"intermediate_size": 40}))
    result = _cli("train", "--model", f"hf:{folder}", "--nproc", "2", "--steps", "1", "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "mlp.gate_proj.weight: folder [48, 32] vs model [40, 32]" in result.stderr
    assert "--random-init" in result.stderr and not (tmp_path / "run" / "metrics.jsonl").exists()
    assert len(result.stderr.strip().splitlines()) == 1


def _train_refusing_pretrained_reads(cfg) -> None:
    """`train` in a rank where reading a pretrained folder raises (train/build.py calls torchmics.load_pretrained)."""
    from torchmics.train.loop import train

    def refuse(*args, **kwargs):
        raise AssertionError("read the pretrained weights")

    torchmics.load_pretrained = refuse
    train(cfg)


def test_a_resumed_fine_tune_takes_its_weights_from_the_checkpoint_without_reading_the_folder(tmp_path):
    from torchmics.train import command, loop
    from torchmics.train.config import TrainConfig

    folder = _llama_folder(tmp_path / "llama")

    def config(out: str, **flags) -> TrainConfig:
        cfg = TrainConfig(model=f"hf:{folder}", nproc=2, accum=1, micro_batch=2, seq_len=32, log_every=1,
                          eval_every=1, checkpoint_every=1, out=str(tmp_path / out), **flags)
        command.preflight(cfg, check_results=False)
        return cfg

    with pytest.raises(Exception, match="read the pretrained weights"):  # the refusal works: a fresh run reads
        run_ranks(_train_refusing_pretrained_reads, 2, config("fresh", steps=1))
    run_ranks(loop.train, 2, config("run", steps=1))
    run_ranks(_train_refusing_pretrained_reads, 2, config("run", steps=2, resume="auto"))
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1, 2]
