"""What recording and verifying checkpoint checksums costs next to saving: one job, one preset, timed.

    python benchmarks/checkpoint_checksum_cost.py --model gpt2-124m --nproc 2    # CPU (gloo)
    python benchmarks/checkpoint_checksum_cost.py --model 1.4b --nproc 8         # GPUs (NCCL)

Prints, on rank 0, seconds for save_checkpoint (which includes recording sizes and CRC-32s of each
rank's own files), for verify_checkpoint (every rank checks its share), and for load_checkpoint of
the verified checkpoint, plus the bytes written.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import torch.distributed as dist

import torchmics
from torchmics.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint, verify_checkpoint
from torchmics.models import build_model
from torchmics.launch import LocalLaunch, spawn


def _timed(fn) -> float:
    dist.barrier()
    began = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - began


def _job(model_name: str, run_dir: str) -> None:
    topo = torchmics.init_mesh(partition_size=int(os.environ["WORLD_SIZE"]))
    model = torchmics.shard(build_model(model_name)[0], topo)
    optimizer = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # AdamW's moments exist, as in a training checkpoint
    path = checkpoint_path(run_dir, 1)
    save_s = _timed(lambda: save_checkpoint(path, model, optimizer, step=1))
    verify_s = _timed(lambda: verify_checkpoint(path))  # remembered: load_checkpoint does not read twice
    load_s = _timed(lambda: load_checkpoint(path, model, optimizer))
    if dist.get_rank() == 0:
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
        print(f"{model_name} on {dist.get_world_size()} ranks: {size / 2**30:.2f} GiB written; save {save_s:.2f} s "
              f"(with checksums), verify {verify_s:.2f} s ({size / 2**30 / verify_s:.2f} GiB/s), load {load_s:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2-124m")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as run_dir:
        spawn(_job, LocalLaunch(args.nproc, use_gpus=torch.cuda.is_available()), args.model, run_dir)


if __name__ == "__main__":
    main()
