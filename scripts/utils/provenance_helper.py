"""Provenance: git state, environment, file hashes, manifests, and the upstream gate.

A manifest is written last and atomically (temp file + rename): a manifest on disk means the
stage that wrote it finished. `require_upstream_manifest` is the one gate every stage uses.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import socket
import sys
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

from .exit_codes import BadInputError, RefusedError

__all__ = [
    "sha256_file",
    "sha256_text",
    "get_git_info",
    "capture_environment",
    "MODEL_IDENTITY_KEYS",
    "model_identity",
    "same_model",
    "create_artifact_metadata",
    "create_session_manifest",
    "write_manifest_atomic",
    "read_manifest",
    "require_upstream_manifest",
    "REPO_ROOT",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
_PACKAGES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "gguf", "statsmodels", "scipy", "numpy")


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def get_git_info(repo_path: str | os.PathLike = REPO_ROOT) -> dict:
    """Commit and dirty flag of the code that produced a result (None where not a git checkout)."""
    try:
        import git

        repo = git.Repo(repo_path, search_parent_directories=True)
        try:
            commit = repo.head.commit.hexsha
        except ValueError:
            commit = None
        return {"git_hash": commit, "git_dirty": repo.is_dirty(untracked_files=False), "git_branch": _branch(repo)}
    except Exception as err:  # noqa: BLE001 - a copy without .git must still run
        return {"git_hash": None, "git_dirty": None, "git_branch": None, "git_error": str(err)}


def _branch(repo) -> str | None:
    try:
        return repo.active_branch.name
    except TypeError:
        return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def capture_environment() -> dict:
    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "packages": {name: _version(name) for name in _PACKAGES},
        "cuda_available": False,
        "cuda": None,
        "gpus": [],
    }
    try:
        import torch

        env["cuda_available"] = torch.cuda.is_available()
        env["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        if var in os.environ:
            env.setdefault("launcher", {})[var] = os.environ[var]
    return env


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


MODEL_IDENTITY_KEYS = ("file_sha256", "weights_fingerprint", "revision", "tokenizer_sha256")


def model_identity(provenance: dict | None) -> dict:
    """What makes two loads "the same model", decided from the loader's provenance alone.

    Content hashes, never the name it was given: a symlink repointed at other weights is another
    model, and the same folder reached by a relative or absolute path is the same one. A hub id
    counts only where no content hash exists. `source` and `model_id` ride along for messages
    and for finding the model again; `same_model` ignores them.
    """
    provenance = provenance or {}
    identity = {key: provenance.get(key) for key in MODEL_IDENTITY_KEYS}
    identity["source"] = provenance.get("source")
    identity["model_id"] = provenance.get("model_id")
    return identity


def same_model(a: dict | None, b: dict | None) -> bool:
    """True when two `model_identity` dicts (or raw provenances) name the same weights and tokenizer."""
    a, b = model_identity(a), model_identity(b)
    if a["file_sha256"] or a["weights_fingerprint"] or b["file_sha256"] or b["weights_fingerprint"]:
        return all(a[key] == b[key] for key in MODEL_IDENTITY_KEYS)
    return (a["model_id"], a["revision"], a["tokenizer_sha256"]) == (b["model_id"], b["revision"], b["tokenizer_sha256"])


def create_artifact_metadata(artifact_type: str, script_name: str, model_name: str | None = None,
                             loader_provenance: dict | None = None, **extra: Any) -> dict:
    """Metadata stored with one artifact (a record, an adapter): who made it, from what."""
    meta = {
        "artifact_type": artifact_type,
        "script": script_name,
        "model_name": model_name,
        "created_at": _now(),
        **get_git_info(),
    }
    if loader_provenance is not None:
        meta["model_identity"] = model_identity(loader_provenance)
    meta.update(extra)
    return meta


def create_session_manifest(stage: str, args: Any, outputs: dict[str, str | os.PathLike] | None = None,
                            inputs: dict[str, str | os.PathLike] | None = None, **extra: Any) -> dict:
    """A stage's manifest: resolved arguments, code and environment, and sha256 of each file.

    `outputs`/`inputs` map a role ("data", "test_set") to a path; both are hashed so a later
    stage can tell whether the data still is what this stage wrote.
    """
    arg_dict = vars(args) if hasattr(args, "__dict__") else dict(args or {})
    return {
        "stage": stage,
        "created_at": _now(),
        "argv": sys.argv,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in arg_dict.items()},
        **get_git_info(),
        "environment": capture_environment(),
        "inputs": _hashed(inputs),
        "outputs": _hashed(outputs),
        **extra,
    }


def _hashed(paths: dict | None) -> dict:
    return {role: {"path": str(path), "sha256": sha256_file(path)} for role, path in (paths or {}).items()}


def write_manifest_atomic(path: str | os.PathLike, manifest: dict) -> Path:
    """Write `manifest` through a temp file and rename (`jsonl_io.open_atomic`): a manifest on disk
    is whole, a failed write leaves no temp file, and a folder as target is a BadInputError."""
    from .jsonl_io import open_atomic

    text = json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n"  # serialised first: a bad value writes nothing
    with open_atomic(path) as handle:
        handle.write(text.encode("utf-8"))
    return Path(path)


def read_manifest(path: str | os.PathLike) -> dict:
    """A JSON object read from `path`; anything else is BadInputError (exit 2) naming the file.

    The rule for malformed JSON files (not UTF-8, not JSON, or JSON that is not an object):
    read directly, as a file the user handed to a stage, it is bad input (exit 2). Where the file
    stands for finished upstream work (a manifest, a marker, a run record that a stage relies on),
    the caller turns that into a refusal (RefusedError, exit 3), as `require_upstream_manifest`
    does: a damaged record means the upstream stage cannot be shown to have finished. A missing
    file stays an OSError for the caller to word.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except UnicodeDecodeError as err:
        raise BadInputError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise BadInputError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(manifest, dict):
        raise BadInputError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    return manifest


def require_upstream_manifest(path: str | os.PathLike | None, what: str,
                              passed_key: Iterable[str] = ("qc", "passed"),
                              check_roles: Iterable[str] | None = None,
                              expected_data: str | os.PathLike | None = None) -> dict:
    """Refuse (RefusedError, exit 3) unless the manifest exists, passed, and matches its data.

    `expected_data`, when given, must be the file the manifest records as its "data" output.
    `passed_key` is the path of the boolean inside the manifest; `check_roles` limits which
    outputs are re-hashed (default: all of them). Paths in the manifest that are relative are
    taken relative to the manifest's own folder first, then to the working directory.
    A manifest that is not UTF-8, not JSON, not an object, or whose `outputs` entries are not
    {path, sha256} objects is a refusal too (exit 3, the file named): an upstream record this
    stage cannot read vouches for nothing (see `read_manifest` for the rule).
    """
    if path is None:
        raise RefusedError(f"{what}: no manifest given")
    path = Path(path)
    if not path.exists():
        raise RefusedError(f"{what}: manifest {path} does not exist (did the upstream stage finish?)")
    try:
        manifest = read_manifest(path)
    except (OSError, BadInputError) as err:
        raise RefusedError(f"{what}: manifest {path} is unreadable ({err})") from None
    node: Any = manifest
    for key in passed_key:
        node = node.get(key) if isinstance(node, dict) else None
    if node is not True:
        qc = manifest.get("qc")
        reasons = qc.get("failures") if isinstance(qc, dict) else None
        detail = f": {'; '.join(map(str, reasons))}" if isinstance(reasons, list) and reasons else ""
        raise RefusedError(f"{what}: manifest {path} did not pass its gate ({'.'.join(passed_key)} is {node!r}){detail}")
    outputs = manifest.get("outputs", {})
    malformed = not isinstance(outputs, dict) or any(
        not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not isinstance(entry.get("sha256"), str)
        for entry in outputs.values())
    if malformed:
        raise RefusedError(f"{what}: manifest {path} is malformed: 'outputs' must map each role to "
                           "{\"path\": str, \"sha256\": str}")
    if expected_data is not None:
        recorded = outputs.get("data", {}).get("path")
        if recorded is None or not resolve_recorded_path(recorded, path).resolve() == Path(expected_data).resolve():
            raise RefusedError(f"{what}: manifest {path} vouches for {recorded!r}, not for {expected_data}")
    roles = list(outputs) if check_roles is None else list(check_roles)
    for role in roles:
        entry = outputs.get(role)
        if entry is None:
            raise RefusedError(f"{what}: manifest {path} records no output '{role}'")
        data_path = resolve_recorded_path(entry["path"], path)
        if not data_path.exists():
            raise RefusedError(f"{what}: {data_path} named by {path} is missing")
        actual = sha256_file(data_path)
        if actual != entry["sha256"]:
            raise RefusedError(f"{what}: {data_path} changed since {path} was written "
                               f"(sha256 {actual[:12]}... != recorded {entry['sha256'][:12]}...)")
    return manifest


def resolve_recorded_path(recorded: str, manifest_path: Path) -> Path:
    recorded_path = Path(recorded)
    if recorded_path.is_absolute():
        return recorded_path
    beside = manifest_path.parent / recorded_path.name
    return recorded_path if recorded_path.exists() else beside


__all__.append("resolve_recorded_path")


def find_dataset_manifest(data_path: str | os.PathLike) -> Path | None:
    """The manifest that vouches for a dataset: `<stem>.manifest.json`, else `session_manifest.json` beside it."""
    data_path = Path(data_path)
    for candidate in (data_path.with_name(f"{data_path.stem}.manifest.json"), data_path.parent / "session_manifest.json"):
        if candidate.exists():
            return candidate
    return None


__all__.append("find_dataset_manifest")
