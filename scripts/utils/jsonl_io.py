"""JSONL reading and crash-safe appending.

Records are split on b"\\n" only: model text may contain U+2028/U+2029, which str.splitlines()
would treat as line breaks and so tear a record in two.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator

from .exit_codes import BadInputError

__all__ = [
    "iter_jsonl",
    "read_jsonl",
    "repair_torn_tail",
    "JsonlAppender",
    "write_jsonl_atomic",
]


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield (line_number, record); a malformed line raises BadInputError naming file:line."""
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"{path}: file not found")
    with path.open("rb") as handle:
        data = handle.read()
    for line_number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise BadInputError(f"{path}:{line_number}: not valid JSON ({err})") from None
        if not isinstance(record, dict):
            raise BadInputError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
        yield line_number, record


def read_jsonl(path: str | os.PathLike, required_fields: Iterable[str] = ()) -> list[dict]:
    """Read every record; each must carry `required_fields` (else BadInputError with file:line)."""
    required = list(required_fields)
    records = []
    for line_number, record in iter_jsonl(path):
        missing = [field for field in required if field not in record]
        if missing:
            raise BadInputError(f"{path}:{line_number}: missing field(s) {', '.join(missing)}")
        records.append(record)
    return records


def repair_torn_tail(path: str | os.PathLike) -> int:
    """Cut a half-written last line (left by a killed run) back to the last newline.

    Returns the number of bytes removed. A complete last line without its newline is kept and
    given one, so an append after it cannot glue two records together.
    """
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return 0
    with path.open("rb+") as handle:
        data = handle.read()
        if data.endswith(b"\n"):
            return 0
        cut = data.rfind(b"\n") + 1
        tail = data[cut:]
        try:
            json.loads(tail.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            handle.truncate(cut)
            warnings.warn(f"{path}: removed a torn last line ({len(tail)} bytes) left by an interrupted run")
            return len(tail)
        handle.write(b"\n")
        return 0


class JsonlAppender:
    """Append records one at a time, flushed and fsynced, resuming by record key.

    `done_keys` holds the keys already on disk, so a resumed run skips them and never writes a
    duplicate.
    """

    def __init__(self, path: str | os.PathLike, key: str = "id"):
        self.path = Path(path)
        self.key = key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        repair_torn_tail(self.path)
        self.records: list[dict] = []
        if self.path.exists():
            self.records = [record for _, record in iter_jsonl(self.path)]
        self.done_keys = {record.get(key) for record in self.records}
        self._handle = self.path.open("ab")

    def __contains__(self, record_key: Any) -> bool:
        return record_key in self.done_keys

    def append(self, record: dict) -> bool:
        """Write `record` unless its key is already on disk; returns whether it was written."""
        record_key = record.get(self.key)
        if record_key in self.done_keys:
            return False
        self._handle.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self.done_keys.add(record_key)
        self.records.append(record)
        return True

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_jsonl_atomic(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """Write a whole file through a temp file and rename, so readers never see half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with tmp.open("wb") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False, sort_keys=True).encode("utf-8") + b"\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
