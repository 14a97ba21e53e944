"""JSONL reading, crash-safe appending, and atomic whole-file writes.

Records are split on b"\\n" only: model text may contain U+2028/U+2029, which str.splitlines()
would treat as line breaks and so tear a record in two.

`open_atomic` is the one temp-file-and-rename writer (`write_jsonl_atomic` and the manifests use
it): readers never see half a file, and a failed write leaves neither a changed target nor a
`.NAME.tmp.PID` file behind. A target that is a folder, or whose parent is a file, is a
BadInputError naming the path, raised before anything is written.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from .exit_codes import BadInputError

__all__ = [
    "iter_jsonl",
    "read_keyed_text_records",
    "read_jsonl",
    "repair_torn_tail",
    "JsonlAppender",
    "check_output_file",
    "open_atomic",
    "write_jsonl_atomic",
]


def read_keyed_text_records(path, required: Iterable[str], text_fields: Iterable[str], empty: str,
                            check=None) -> list[dict]:
    """A training dataset: every record has the `required` fields, non-empty strings in `text_fields`,
    passes `check(record)` (None, or what is wrong) and has an id no earlier line used (compared as
    text); each keeps its `_line`. Anything else, or no record at all (`empty` says what was wanted),
    is bad input naming file:line (exit 2): ids are how records are traced back."""
    required, text_fields = tuple(required), tuple(text_fields)
    records, first_line = [], {}
    for line, record in iter_jsonl(path):
        missing = [name for name in required if name not in record]
        if missing:
            raise BadInputError(f"{path}:{line}: missing field(s) {', '.join(missing)}")
        for name in text_fields:
            if not isinstance(record[name], str) or not record[name].strip():
                raise BadInputError(f"{path}:{line}: field '{name}' must be a non-empty string")
        problem = check(record) if check is not None else None
        if problem:
            raise BadInputError(f"{path}:{line}: {problem}")
        key = str(record["id"])
        if key in first_line:
            raise BadInputError(f"{path}:{line}: duplicate id {key!r} (first on line {first_line[key]})")
        first_line[key] = line
        records.append({**record, "_line": line})
    if not records:
        raise BadInputError(f"{path}: {empty}")
    return records


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
            warnings.warn(f"{path}: removed a torn last line ({len(tail)} bytes) left by an interrupted run", stacklevel=2)
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

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_output_file(path: str | os.PathLike) -> Path:
    """`path` as a Path if a file can be written there; BadInputError naming it if it is a folder
    or if a file stands where one of its parent folders would have to be."""
    path = Path(path)
    if path.is_dir():
        raise BadInputError(f"{path}: is a folder; expected a file path to write")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise BadInputError(f"{path}: cannot be written, because {parent} is a file, not a folder")
            break
    return path


@contextlib.contextmanager
def open_atomic(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary handle on `.NAME.tmp.PID` beside `path`, fsynced and renamed onto `path` when the
    block ends cleanly; on any failure the temp file is removed and `path` is left as it was."""
    path = check_output_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with tmp.open("wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and path.is_dir():  # a folder appeared there after the check above
            raise BadInputError(f"{path}: is a folder; expected a file path to write") from None
        raise


def write_jsonl_atomic(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """Write a whole file through a temp file and rename, so readers never see half of it."""
    with open_atomic(path) as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False, sort_keys=True).encode("utf-8") + b"\n")
