"""Read an offline W&B run back from its ``.wandb`` file, with wandb's own protobuf schema.

wandb >= 0.2x has no Python reader: the file is a LevelDB-style log (a 7-byte ``:W&B``
header, then 32 KiB blocks of records, each a 7-byte header ``crc32c, length, type``
and a piece of a serialized ``wandb_internal_pb2.Record``).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

_BLOCK, _FULL, _FIRST, _MIDDLE, _LAST = 32768, 1, 2, 3, 4


def records(path: Path) -> list[pb.Record]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    out, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        if _BLOCK - pos % _BLOCK < 7:  # a block's tail too short for a header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind == 0:
            continue
        pending = chunk if kind in (_FULL, _FIRST) else pending + chunk
        if kind in (_FULL, _LAST):
            rec = pb.Record()
            rec.ParseFromString(pending)
            out.append(rec)
    return out


@dataclass
class Run:
    group: str = ""
    job_type: str = ""
    name: str = ""
    config: dict = field(default_factory=dict)
    history: dict[int, dict] = field(default_factory=dict)  # step -> {key: value}
    exit_code: int | None = None  # set when the run was finished (wandb.finish): its exit code


def read_run(path: Path) -> Run:
    run = Run()
    for rec in records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run.group, run.job_type, run.name = rec.run.run_group, rec.run.job_type, rec.run.display_name
            run.config.update({u.key: json.loads(u.value_json) for u in rec.run.config.update})
        elif kind == "exit":
            run.exit_code = rec.exit.exit_code
        elif kind == "history":
            row = run.history.setdefault(rec.history.step.num, {})
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):
                    row[key] = json.loads(item.value_json)
    return run
