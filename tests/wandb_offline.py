"""Read an offline wandb run's ``run-ID.wandb`` file independently of normbench: the file is a LevelDB-style
log (a 7-byte W&B header, then 32 KiB blocks of records, each with a 7-byte header: crc32c, length, type
FULL/FIRST/MIDDLE/LAST) of wandb's own protobuf ``Record`` messages (wandb.proto.wandb_internal_pb2)."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

BLOCK = 32768
HEADER = struct.Struct("<4sHB")  # ":W&B", magic, version
RECORD = struct.Struct("<IHB")  # crc32c, length, type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    ident, _magic, _version = HEADER.unpack(data[: HEADER.size])
    assert ident == b":W&B", f"{path} is not a wandb run file"
    out, pos, pending = [], HEADER.size, b""
    while pos + RECORD.size <= len(data):
        left = BLOCK - pos % BLOCK
        if left < RECORD.size:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = RECORD.unpack(data[pos : pos + RECORD.size])
        if kind == 0 and length == 0:  # zero padding
            pos += left
            continue
        chunk = data[pos + RECORD.size : pos + RECORD.size + length]
        pos += RECORD.size + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def _items(items) -> dict:
    """Items to a dict; a value logged as a dict (a Table's or Image's reference) comes as one item per nested
    key: nested again here."""
    out: dict = {}
    for item in items:
        *parents, last = [item.key] if item.key else list(item.nested_key)
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = json.loads(item.value_json)
    return out


@dataclass
class OfflineRun:
    run_id: str
    group: str
    job_type: str
    config: dict
    history: list[dict] = field(default_factory=list)  # each logged step: {"_step": n, key: value, ...}
    summary: dict = field(default_factory=dict)


def read_run(run_file: Path) -> OfflineRun:
    run = None
    for record in records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            config = {_key(i): json.loads(i.value_json) for i in record.run.config.update}
            run = OfflineRun(record.run.run_id, record.run.run_group, record.run.job_type, config)
        elif kind == "history":
            run.history.append(_items(record.history.item))
        elif kind == "summary":
            run.summary.update({_key(i): json.loads(i.value_json) for i in record.summary.update if _key(i)})
    return run


def offline_runs(directory: Path) -> list[Path]:
    """The run files of every offline run under ``directory/wandb``, oldest first."""
    return sorted(Path(directory).glob("wandb/offline-run-*/run-*.wandb"))
