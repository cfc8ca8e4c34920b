"""What the trackers wrote, read back by each tool's own format: TensorBoard's reader, W&B's record protos."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from wandb.proto import wandb_internal_pb2


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag's ``(step, value)`` events in order, through TensorBoard's own reader (it applies purges)."""
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def tensorboard_text(folder: Path, tag: str) -> str:
    events = EventAccumulator(str(folder), size_guidance={"tensors": 0})
    events.Reload()
    return events.Tensors(f"{tag}/text_summary")[-1].tensor_proto.string_val[0].decode()


def wandb_records(run_file: Path) -> list[wandb_internal_pb2.Record]:
    """The records of a ``.wandb`` file: a 7-byte header, then LevelDB's log format (32 KiB blocks of
    chunks, each with a 7-byte header: crc32, length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4) whose
    payloads are W&B's own Record protobufs."""
    data, block = run_file.read_bytes(), 32768
    assert data[:4] == b":W&B"
    records, payload, pos = [], b"", 7
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack_from("<IHB", data, pos)
        payload += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(payload))
            payload = b""
    return records


def wandb_history(run_file: Path) -> dict[int, dict[str, float]]:
    """``{step: {name: value}}`` of the logged history, without W&B's own ``_runtime``-style fields."""
    history = {}
    for record in wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            items = {i.nested_key[0] if i.nested_key else i.key: json.loads(i.value_json) for i in record.history.item}
            history[record.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
    return history


def wandb_config(run_file: Path) -> dict:
    for record in wandb_records(run_file):
        if record.WhichOneof("record_type") == "run":
            return {i.key: json.loads(i.value_json) for i in record.run.config.update}
    raise AssertionError(f"{run_file} holds no run record")
