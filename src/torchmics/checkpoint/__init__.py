"""Checkpoints: sharded save/load through torch.distributed.checkpoint (DCP); full export is torchmics.export.

A checkpoint is a directory that every rank writes its own shards into; no rank ever holds the whole
model. DCP records each tensor's *global* shape and which chunk each file holds, so a checkpoint saved
with one world size or partition size loads with any other (it reads whichever chunks overlap the
shard a rank now owns). Layout of a run directory::

    run/
      latest                  name of the newest complete checkpoint ("step_200"), replaced atomically
      step_100/               one complete checkpoint
        .metadata             DCP's index: global shape of every tensor, where each chunk lives
        __<r>_0.distcp        rank r's shards of the model and optimizer states
        rng/rank<r>.pt        rank r's random number generator states
        residuals/rank<r>.pt  rank r's error-feedback residuals, under a quantized replica hop
        hf_config.json        the Hugging Face config of an HF model (torchmics.hf_config), for export
        torchmics.json        step, extra, topology, torch version, tensor shapes, and the size and
                              CRC-32 of every other file (integrity.py); written last
      step_200/
      step_300.tmp-1a2b3c4d/  an interrupted save: ignored by loading, removed by remove_interrupted_saves

A save writes into a temporary sibling directory and renames it to its final name only once every
rank has finished, then repoints ``latest``; a crash at any moment leaves the previous checkpoint and
``latest`` as they were. Loading first compares every file with its recorded size and checksum, so
a checkpoint damaged later (a full disk, a copy cut short, a deleted file) is named as such before
anything is read; checkpoints saved before sizes were recorded load unverified. The directory must
be on a file system every rank sees (for several nodes: a shared one, e.g. NFS or Lustre).

Where each part lives, each importing only those listed before it:

- ``integrity.py``    sizes and CRC-32s of files, and what differs from them
- ``folders.py``      the run directory: file names, which checkpoints are complete, atomic writes, pruning
- ``every_rank.py``   steps all ranks take together, with one outcome (or one error) for all
- ``state_dicts.py``  model and optimizer state: sharded for DCP, full for export
- ``rank_files.py``   what each rank saves for itself: RNG states, error-feedback residuals
- ``verify.py``       verify_checkpoint: every recorded file checked, its share by each rank
- ``save.py``         save_checkpoint
- ``load.py``         load_checkpoint, and the checks that run before anything is read
"""

from torchmics.checkpoint.every_rank import on_rank0
from torchmics.checkpoint.folders import (
    HF_CONFIG_FILE,
    LATEST_FILE,
    METADATA_FILE,
    checkpoint_path,
    complete_checkpoints,
    latest_checkpoint,
    read_metadata,
    remove_interrupted_saves,
    size_damage,
    step_folders,
)
from torchmics.checkpoint.integrity import DamagedCheckpointError
from torchmics.checkpoint.load import load_checkpoint, saved_optimizer_state, shape_differences
from torchmics.checkpoint.save import save_checkpoint
from torchmics.checkpoint.state_dicts import MODEL_KEY, full_state_dict
from torchmics.checkpoint.verify import verify_checkpoint

__all__ = [
    "HF_CONFIG_FILE",
    "LATEST_FILE",
    "METADATA_FILE",
    "MODEL_KEY",
    "DamagedCheckpointError",
    "checkpoint_path",
    "complete_checkpoints",
    "full_state_dict",
    "latest_checkpoint",
    "load_checkpoint",
    "on_rank0",
    "read_metadata",
    "remove_interrupted_saves",
    "save_checkpoint",
    "saved_optimizer_state",
    "shape_differences",
    "size_damage",
    "step_folders",
    "verify_checkpoint",
]
