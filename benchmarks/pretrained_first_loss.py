"""A fine-tune through `torchmics train` starts where the folder's model is: its first loss is transformers' own.

Writes a Hugging Face Llama folder (save_pretrained, bf16 safetensors; random weights, as nothing can
be downloaded here, drawn wide enough, std 0.1, that the loss depends on the batch and the weights), runs `torchmics train --model hf:DIR` for a few steps, and compares the first
step's loss with transformers' loss of ``from_pretrained(DIR)`` on the same batch, in fp32.

    python benchmarks/pretrained_first_loss.py --out runs/pretrained --hidden 2048 --layers 16
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch


def write_folder(folder: Path, hidden: int, layers: int, vocab: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=hidden // 128, num_key_value_heads=hidden // 512,
                         max_position_embeddings=4096, initializer_range=0.1, dtype="bfloat16")
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder, max_shard_size="1GB")


def transformers_losses(folder: Path, seq_len: int, micro_batch: int, device: str) -> list[float]:
    """transformers' loss on the batches of steps 0 and 1 of a one-rank run (train/data.py deals them out)."""
    from transformers import AutoModelForCausalLM

    from torchmics.train.data import BatchSampler, load_tokens

    sampler = BatchSampler(load_tokens(None, seq_len).train, seq_len, micro_batch, 0, 1, seed=0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device)
    losses = []
    for step in (0, 1):
        x, y = (t.to(device) for t in sampler.batch(step, 0))
        with torch.no_grad():
            logits = model(x).logits
        losses.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten()).item())
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=2)
    args = parser.parse_args()
    folder = args.out / "llama"
    write_folder(folder, args.hidden, args.layers, args.vocab)
    run = args.out / "run"
    command = [sys.executable, "-m", "torchmics.cli", "train", "--model", f"hf:{folder}", "--nproc", "1",
               "--steps", "3", "--accum", "1", "--micro-batch", str(args.micro_batch), "--seq-len", str(args.seq_len),
               "--log-every", "1", "--eval-every", "100", "--lr", "1e-5", "--out", str(run)]
    subprocess.run(command, check=True)
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    expected, other_batch = transformers_losses(folder, args.seq_len, args.micro_batch, device)
    result = {"torchmics_first_loss": first, "transformers_loss": expected,
              "relative_difference": abs(first - expected) / expected,
              "transformers_loss_on_the_next_batch": other_batch}  # shows how much the batch moves the loss
    print(json.dumps(result))
    (args.out / "first_loss.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
