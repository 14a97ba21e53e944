"""Shards of the scale stage: planning, the rank split, completeness, locks, and the merge.

Plan: `--count` is split evenly over `--num-shards` (the remainder goes to the first shards);
shard i lives in `<output stem>_shards/shard_{i:03d}/`, prefixes its record ids with `s{i:03d}-`
and uses the seed `base_seed * 1000 + i` (SHARD_SEED_STRIDE = 1000, so at most 1000 shards, and
two runs whose base seeds differ never share a shard seed).

A shard is complete when its `shard_manifest.json` (written last) exists and the files it vouches
for (`sft_data.jsonl`, `phase4_judged.jsonl`) still have the recorded sha256.

Rank split (torchrun / accelerate launch set RANK, WORLD_SIZE, LOCAL_RANK): rank r takes shard i
when i % WORLD_SIZE == r; with explicit shard indices, rank r takes the r-th, (r+W)-th, ... of them.
On a GPU host local rank l takes GPU l % (visible GPUs) (`gpu_share`); ranks beyond the GPU count share
them, each held to an even part of the card's memory (SHARED_GPU_MEMORY, split between the ranks on it).

Merge: shards in index order, records in id order; an instruction that is an exact or near
duplicate (NearDuplicateIndex, the pilot's threshold) of one already kept is removed (first one
wins; a pair relabeled with constraints is compared by its task, the instruction before the
constraint texts); a pair whose instruction, or whose task, overlaps the held-out test set is
removed; the result is cut to the requested count. QC is recomputed on every shard's judged pairs
minus the removed ones, with the pilot's critic-signal verdict and the constraint checks of the
merged records.

The output path is checked before any shard runs (`check_scale_output`): a folder where the
merged file goes, or a path below a file, is refused at once (exit 2) instead of after the last shard.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .constraint_data import constraint_summary
from .dedup import NearDuplicateIndex
from .exit_codes import BadInputError, RefusedError
from .jsonl_io import read_jsonl
from .provenance_helper import model_identity, read_manifest, same_model, sha256_file
from .qc import compute_qc
from .records import base_pair_id, first_pairs
from .stage1_generation import PHASE_FILES, SFT_DATA_FILE, check_output_path, describe_differences

__all__ = ["SHARD_SEED_STRIDE", "SHARD_MANIFEST", "ShardSpec", "Launch", "shard_seed", "shards_root", "plan_shards",
           "launch_from_env", "select_shards", "shard_status", "exclusive_lock", "wait_for_shards", "merge_records",
           "sum_phase_counts", "merge_shards", "merged_manifest_path", "check_scale_output", "model_override", "gpu_share",
           "claim_gpu", "gpu_memory_fraction", "SHARED_GPU_MEMORY"]

SHARD_SEED_STRIDE = 1000
SHARD_MANIFEST = "shard_manifest.json"
# The part of a shared GPU's memory its ranks' allocators may hold together; the rest is for each process's CUDA
# context, which the allocator does not count (about 0.5 GiB each).
SHARED_GPU_MEMORY = 0.94


@dataclass(frozen=True)
class ShardSpec:
    index: int
    num_shards: int
    count: int
    seed: int
    folder: Path

    @property
    def key_prefix(self) -> str:
        return f"s{self.index:03d}-"

    @property
    def data_path(self) -> Path:
        return self.folder / SFT_DATA_FILE

    @property
    def judged_path(self) -> Path:
        return self.folder / PHASE_FILES["judged"]

    @property
    def manifest_path(self) -> Path:
        return self.folder / SHARD_MANIFEST

    def as_dict(self) -> dict:
        return {"index": self.index, "num_shards": self.num_shards, "count": self.count, "seed": self.seed,
                "key_prefix": self.key_prefix, "folder": str(self.folder)}


@dataclass(frozen=True)
class Launch:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launched: bool = False
    local_world_size: int = 1


def shard_seed(base_seed: int, index: int) -> int:
    """The seed of shard `index`: base_seed * 1000 + index."""
    if not 0 <= index < SHARD_SEED_STRIDE:
        raise BadInputError(f"shard index {index} outside 0..{SHARD_SEED_STRIDE - 1}")
    return base_seed * SHARD_SEED_STRIDE + index


def shards_root(output: Path) -> Path:
    output = Path(output)
    return output.with_name(f"{output.stem}_shards")


def merged_manifest_path(output: Path) -> Path:
    """`<stem>.manifest.json` beside the data, where provenance.find_dataset_manifest looks."""
    output = Path(output)
    return output.with_name(f"{output.stem}.manifest.json")


def check_scale_output(output: Path) -> None:
    """Exit 2 now for an --output the merge could never write (see the module docstring)."""
    output = Path(output)
    check_output_path(output, "--output", "file")
    check_output_path(shards_root(output), f"--output {output}: its shard folder", "folder")
    check_output_path(merged_manifest_path(output), f"--output {output}: its manifest", "file")


def model_override(pilot_provenance: dict | None, provenance: dict | None) -> dict:
    """{"model": {"from": pilot's identity, "to": this one}} when the model is not the pilot's
    (by content hashes), else {}: how a manifest's `overrides` records another model."""
    if same_model(pilot_provenance, provenance):
        return {}
    return {"model": {"from": model_identity(pilot_provenance), "to": model_identity(provenance)}}


def plan_shards(count: int, num_shards: int, base_seed: int, output: Path) -> list[ShardSpec]:
    if count < 1 or num_shards < 1:
        raise BadInputError("--count and --num-shards must be positive")
    if num_shards > count:
        raise BadInputError(f"--num-shards {num_shards} is more than --count {count}: a shard would be empty")
    if num_shards > SHARD_SEED_STRIDE:
        raise BadInputError(f"--num-shards is at most {SHARD_SEED_STRIDE} (the shard seed rule needs it)")
    base, extra = divmod(count, num_shards)
    root = shards_root(output)
    return [ShardSpec(i, num_shards, base + (i < extra), shard_seed(base_seed, i), root / f"shard_{i:03d}")
            for i in range(num_shards)]


def launch_from_env(environ=None) -> Launch:
    """Rank facts set by torchrun / accelerate launch (both set RANK and WORLD_SIZE)."""
    env = os.environ if environ is None else environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return Launch()
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    except ValueError:
        raise BadInputError(f"RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE are not integers: {env.get('RANK')!r}/"
                            f"{env.get('WORLD_SIZE')!r}/{env.get('LOCAL_RANK')!r}/{env.get('LOCAL_WORLD_SIZE')!r}") from None
    if world < 1 or not 0 <= rank < world:
        raise BadInputError(f"RANK {rank} is not within WORLD_SIZE {world}")
    if not 0 <= local < local_world:
        raise BadInputError(f"LOCAL_RANK {local} is not within LOCAL_WORLD_SIZE {local_world}")
    return Launch(rank, world, local, True, local_world)


def gpu_share(local_rank: int, local_world_size: int, device_count: int) -> tuple[int, float]:
    """This rank's GPU (local ranks take the visible GPUs round-robin) and the fraction of its memory this rank may
    hold: all of it when the rank has the GPU to itself, else an even part of SHARED_GPU_MEMORY. Held to that part,
    a rank that needs more frees its own cache or halves its own batch; unheld, it took the memory another rank on
    the card then ran out of (docs/measurements.md, "Two scale ranks on one GPU")."""
    if device_count < 1:
        raise ValueError("gpu_share needs at least one GPU")
    gpu = local_rank % device_count
    sharing = len(range(gpu, local_world_size, device_count))
    return gpu, 1.0 if sharing <= 1 else SHARED_GPU_MEMORY / sharing


def claim_gpu(launch: Launch) -> str:
    """The device a scale rank loads its model on: "auto" unless launched on a GPU host, else its GPU (`gpu_share`),
    made the current device and, where ranks share it, with this process's allocator held to its part."""
    import torch

    if not launch.launched or not torch.cuda.is_available():
        return "auto"
    gpu, memory_fraction = gpu_share(launch.local_rank, launch.local_world_size, torch.cuda.device_count())
    torch.cuda.set_device(gpu)
    if memory_fraction < 1.0:
        torch.cuda.set_per_process_memory_fraction(memory_fraction, gpu)
        print(f"[scale] rank {launch.rank}: GPU {gpu} is shared; this rank holds at most {memory_fraction:.0%} of its memory",
              flush=True)
    return f"cuda:{gpu}"


def gpu_memory_fraction(model) -> float | None:
    """The part of its GPU's memory the process holding `model` may take (below 1 where scale ranks share the GPU);
    None off a GPU. Shard manifests record it."""
    device = getattr(model, "device", None)
    if getattr(device, "type", None) != "cuda":
        return None
    import torch

    return round(torch.cuda.get_per_process_memory_fraction(device), 4)


def select_shards(num_shards: int, requested: list[int] | None, rank: int = 0, world_size: int = 1) -> list[int]:
    """The shard indices this process runs (see the module docstring)."""
    if requested:
        bad = sorted(i for i in requested if not 0 <= i < num_shards)
        if bad:
            raise BadInputError(f"--shard-index {bad} outside 0..{num_shards - 1} (--num-shards {num_shards})")
        return [i for pos, i in enumerate(sorted(set(requested))) if pos % world_size == rank]
    return [i for i in range(num_shards) if i % world_size == rank]


def shard_status(spec: ShardSpec) -> str:
    """"complete", "stale" (manifest present, files changed since), "partial" (started) or "absent"."""
    if not spec.manifest_path.exists():
        return "partial" if spec.folder.exists() else "absent"
    try:
        outputs = read_manifest(spec.manifest_path)["outputs"]
        paths = {role: spec.folder / Path(entry["path"]).name for role, entry in outputs.items()}
        ok = all(paths[role].exists() and sha256_file(paths[role]) == outputs[role]["sha256"] for role in ("data", "judged"))
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        return "stale"
    return "complete" if ok else "stale"


@contextmanager
def exclusive_lock(path: Path, wait: bool = True, what: str = ""):
    """An flock on `path`; with wait=False, RefusedError if another process holds it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise RefusedError(f"{what or path.parent} is being worked on by another process (lock {path})") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def wait_for_shards(specs: list[ShardSpec], poll_seconds: float = 10.0, log=print, timeout: float | None = None) -> bool:
    """Block until every shard in `specs` is complete; False if `timeout` seconds pass first."""
    start, last_note = time.time(), 0.0
    while True:
        missing = [s.index for s in specs if shard_status(s) != "complete"]
        if not missing:
            return True
        if timeout is not None and time.time() - start > timeout:
            return False
        if time.time() - last_note > 300:
            log(f"[scale] waiting for shard(s) {missing} from the other ranks")
            last_note = time.time()
        time.sleep(poll_seconds)


def merge_records(shard_records: list[list[dict]], threshold: float, count: int | None = None,
                  held_out=None) -> tuple[list[dict], list[dict]]:
    """(kept, removed): records walked shard by shard in id order; first one wins.

    Each removed entry is {"id", "shard", "kind": "exact"|"near", "duplicate_of"}, or, for a record
    whose instruction overlaps the held-out test set (`held_out`, a `dedup.OverlapIndex`),
    {"id", "shard", "kind": "held_out_overlap", "test_id", "match"}. A relabeled variant (`records.variant_id`)
    is kept only after its pair and is never a duplicate of it; that of a removed pair is removed
    ("variant_of_removed"). `count` counts pairs: the first `count` are kept, each with its variants.
    """
    index = NearDuplicateIndex(threshold)
    kept, removed, kept_pairs = [], [], set()
    for shard, records in enumerate(shard_records):
        for record in sorted(records, key=lambda r: r["id"]):
            pair = base_pair_id(record["id"])
            if pair != record["id"] and (shard, pair) not in kept_pairs:
                # a relabeled variant shares its pair's task: it stands or falls with the pair
                removed.append({"id": record["id"], "shard": shard, "kind": "variant_of_removed", "duplicate_of": pair})
                continue
            # A constrained pair's task alone may equal a short test instruction that its appended
            # constraint texts hide from the near-duplicate and 8-gram rules: both are checked.
            task = record.get("original_instruction") or record["instruction"]
            overlaps = []
            if held_out is not None:
                overlaps = held_out.matches(record["instruction"]) or (held_out.matches(task) if task != record["instruction"] else [])
            if overlaps:
                removed.append({"id": record["id"], "shard": shard, "kind": "held_out_overlap", "test_id": overlaps[0]["id"],
                                "match": overlaps[0]["kind"]})
                continue
            if pair != record["id"]:
                kept.append(record)
                continue
            kind, match = index.find(task)
            if kind != "new":
                removed.append({"id": record["id"], "shard": shard, "kind": kind, "duplicate_of": match})
                continue
            index.add(record["id"], task)
            kept_pairs.add((shard, pair))
            kept.append(record)
    return first_pairs(kept, count), removed


def sum_phase_counts(all_counts: list[dict]) -> dict:
    """Shard phase counts added up; the instruction-critic acceptance rate recomputed."""
    total: dict = {}
    for counts in all_counts:
        for key, value in counts.items():
            if isinstance(value, dict):
                total[key] = dict(Counter(total.get(key, {})) + Counter(value))
            elif isinstance(value, int) and not isinstance(value, bool):
                total[key] = total.get(key, 0) + value
    judged = total.get("instruction_critic_judged", 0)
    total["instruction_critic_acceptance_rate"] = total.get("instruction_critic_accepted", 0) / judged if judged else None
    return total


def merge_shards(specs: list[ShardSpec], count: int, expected_configs: dict[int, dict], threshold: float,
                 qc_thresholds: dict, held_out=None, critic_signals: dict | None = None) -> dict:
    """Check every shard, merge and dedup, recompute QC. Raises RefusedError for a missing,
    changed or differently configured shard, shards made by different models, or (given the
    pilot's `critic_signals` record) shards made with another critic-signal verdict."""
    states = {s.index: shard_status(s) for s in specs}
    bad = {i: st for i, st in states.items() if st != "complete"}
    if bad:
        raise RefusedError("cannot merge: shard(s) not complete: " + ", ".join(f"{i} ({st})" for i, st in sorted(bad.items())))
    manifests = [read_manifest(s.manifest_path) for s in specs]
    identity = None
    for spec, manifest in zip(specs, manifests, strict=True):
        expected = json.loads(json.dumps(expected_configs[spec.index]))
        if manifest.get("config") != expected:
            diff = describe_differences(manifest.get("config") or {}, expected, "config")
            raise RefusedError(f"cannot merge: shard {spec.index} was made with a different configuration (differs in: {'; '.join(diff)}); "
                               "merge with the flags that made the shards")
        if critic_signals is not None:
            made_with = manifest.get("critic_signals") or {}
            if (made_with.get("trusted"), made_with.get("rank_by")) != (critic_signals["trusted"], critic_signals["rank_by"]):
                raise RefusedError(f"cannot merge: shard {spec.index} was made trusting {made_with.get('trusted')} ranked by "
                                   f"{made_with.get('rank_by')}, the pilot's verdict is {critic_signals['trusted']} ranked by "
                                   f"{critic_signals['rank_by']}; rerun that shard")
        ident = model_identity(manifest.get("model_provenance"))
        if identity is not None and not same_model(ident, identity):
            raise RefusedError(f"cannot merge: shard {spec.index} was made by a different model ({ident}) than shard {specs[0].index} ({identity})")
        identity = ident
    data = [read_jsonl(s.data_path, ["id", "instruction", "response"]) for s in specs]
    kept, removed = merge_records(data, threshold, held_out=held_out)
    records = first_pairs(kept, count)
    removed_ids = {r["id"] for r in removed}
    judged = [r for s in specs for r in sorted(read_jsonl(s.judged_path), key=lambda r: r["id"]) if r["id"] not in removed_ids]
    kinds = Counter(r["kind"] for r in removed)
    for r in removed:
        r["shard"] = specs[r["shard"]].index
    phase_counts = sum_phase_counts([m.get("phase_counts") or {} for m in manifests])
    phase_counts.update(shards=len(specs), cross_shard_exact_duplicates=kinds["exact"], cross_shard_near_duplicates=kinds["near"],
                        held_out_overlaps_removed=kinds["held_out_overlap"], variants_of_removed_pairs=kinds["variant_of_removed"])
    qc = compute_qc(judged, qc_thresholds, phase_counts, critic_signals=critic_signals, constraints=constraint_summary(records))
    shards = [{**s.as_dict(), "manifest": str(s.manifest_path), "manifest_sha256": sha256_file(s.manifest_path),
               "data_sha256": m["outputs"]["data"]["sha256"], "records": m.get("records"), "qc_passed": m["qc"]["passed"],
               "wall_seconds": m.get("wall_seconds"), "phase_seconds": m.get("phase_seconds"),
               "phase_peak_gpu_gib": m.get("phase_peak_gpu_gib")} for s, m in zip(specs, manifests, strict=True)]
    dedup = {"threshold": threshold, "exact_removed": kinds["exact"], "near_removed": kinds["near"],
             "held_out_overlaps_removed": kinds["held_out_overlap"], "removed": removed,
             "records_before": sum(map(len, data)), "records_after_dedup": len(kept), "truncated_to_count": len(kept) - len(records)}
    return {"records": records, "qc": qc, "dedup": dedup, "shards": shards, "model_provenance": manifests[0].get("model_provenance")}
