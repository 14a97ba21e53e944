"""Stage 1 scale: generate the SFT set in shards with the pilot's validated parameters, merge, gate on QC.

One process, every shard in turn, then the merge (rerun the same command to resume after a kill):
    python scripts/generate_stage1_scale_data.py --pilot-manifest artifacts/pilot/session_manifest.json \\
        --count 15000 --num-shards 10 --output data/stage1_sft_data.jsonl

One process per GPU with a bash loop (G GPUs, G <= N shards), then one merge:
    N=10; G=$(nvidia-smi -L | wc -l)
    for g in $(seq 0 $((G - 1))); do
      CUDA_VISIBLE_DEVICES=$g python scripts/generate_stage1_scale_data.py --count 15000 --num-shards $N \\
          --shard-index $(seq $g $G $((N - 1))) --no-merge &
    done; wait
    python scripts/generate_stage1_scale_data.py --count 15000 --num-shards $N --merge

Slurm job array (one shard per task; the merge runs once all tasks succeeded):
    JOB=$(sbatch --parsable --array=0-9 --gres=gpu:1 --wrap \\
        "python scripts/generate_stage1_scale_data.py --count 15000 --num-shards 10 --shard-index \\$SLURM_ARRAY_TASK_ID --no-merge")
    sbatch --dependency=afterok:$JOB --wrap "python scripts/generate_stage1_scale_data.py --count 15000 --num-shards 10 --merge"

torchrun / accelerate launch (rank r takes shards i with i % WORLD_SIZE == r on GPU LOCAL_RANK mod the GPU count, ranks
sharing a GPU each held to an even part of its memory; rank 0
waits for the other ranks' shard manifests, then merges; ranks share nothing but files, so across
nodes the output must be on a shared filesystem):
    torchrun --standalone --nproc-per-node 8 scripts/generate_stage1_scale_data.py --count 15000 --num-shards 10
    accelerate launch --num_processes 8 scripts/generate_stage1_scale_data.py --count 15000 --num-shards 10

Refuses (exit 3) without a pilot manifest whose QC passed and whose data is unchanged. Generation
parameters come from the pilot manifest's `config` (checked against the flags' ranges: exit 2
naming the manifest and the field), and so do its calibration and its verdict on the critic signals
(which ones discriminated on its probe set and may accept and rank pairs: a shard never measures its
own, exit 3 where the manifest has none); a flag that changes a parameter is
recorded under `overrides` in every manifest, as is a model other than the pilot's (by content
hashes). --output and --exclude-test-set are checked before any shard runs (exit 2 for a folder or a
path below a file, a test set that cannot be read, or a test instruction that overlaps one of the
response_v3 demonstrations when that template generates the responses).
Shard i (folder `<output stem>_shards/shard_XXX/`) gets an even share of --count (remainder to the
first shards) and the seed `seed * 1000 + i`; it writes sft_data.jsonl, its phase files and
shard_manifest.json (last). A complete shard is skipped, a killed one resumes (refused, exit 2,
where its settings or its model's content hashes differ from the run that started it).
The merge removes exact and near-duplicate instructions across shards (first one wins; a relabeled
variant `<pair>~v<j>` of --constraint-variants stays or goes with its pair, and --count counts pairs),
recomputes QC on the whole and writes --output and `<output stem>.manifest.json`. Exit 0 when the merged QC
passed (or when shards ran and no merge was due yet), 4 when it failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from utils.cli_validation import in_range, non_negative_int, positive_int  # noqa: E402
from utils.exit_codes import EXIT_GATE_FAILED, EXIT_OK, BadInputError, RefusedError, run_cli  # noqa: E402
from utils.sharding import SHARD_SEED_STRIDE  # noqa: E402
from utils.stage1_generation import DefaultsHelpFormatter, add_generation_arguments  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--pilot-manifest", type=Path, default=Path("artifacts/pilot/session_manifest.json"),
                        help="session manifest of a pilot whose QC passed (the gate and the parameters)")
    parser.add_argument("--count", type=positive_int, default=15000, help="pairs in the merged dataset")
    parser.add_argument("--num-shards", type=in_range(int, 1, SHARD_SEED_STRIDE), default=10,
                        help="shards to split --count into (the shard seed rule allows at most 1000)")
    parser.add_argument("--output", type=Path, default=Path("data/stage1_sft_data.jsonl"),
                        help="merged JSONL; shards go to <output stem>_shards/shard_XXX/")
    parser.add_argument("--seed", type=non_negative_int, default=None,
                        help="base seed; shard i uses seed * 1000 + i (default: the pilot's seed)")
    parser.add_argument("--model", default=None, help="model folder, .gguf file or hub id (default: the pilot's model)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="sequences per generation/critic batch (halved on OOM)")
    parser.add_argument("--dtype", default=None, help="torch dtype for the model (default bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--shard-index", type=non_negative_int, nargs="+", default=None,
                        help="run only these shards (split over ranks when launched)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--merge", action="store_true", help="only merge complete shards (no model is loaded)")
    mode.add_argument("--no-merge", action="store_true", help="do not merge after running shards, even when all are complete")
    parser.add_argument("--exclude-test-set", type=Path, default=None,
                        help="held-out test JSONL: pairs whose instruction overlaps one of its instructions (exact, near, "
                             "shared 8-gram; the evaluation's contamination rule) are dropped at the merge")
    parser.add_argument("--allow-instruct-model", action="store_true", help="override the loader's instruct-model refusal (recorded)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_generation_arguments(parser, inherited_from="the pilot manifest's")
    return parser.parse_args(argv)


def _gate(args) -> tuple[dict, object, dict, object]:
    """The pilot gate (exit 3), then the scale config (the pilot's parameters plus recorded overrides)
    and the pilot's critic signals."""
    from utils.provenance_helper import require_upstream_manifest
    from utils.response_selection import signals_from_pilot_manifest
    from utils.stage1_generation import scale_config

    pilot = require_upstream_manifest(args.pilot_manifest, "scale: pilot")
    if not isinstance(pilot.get("config"), dict) or "data" not in pilot.get("outputs", {}):
        raise RefusedError(f"scale: {args.pilot_manifest} is not a pilot session manifest (no config or no data output)")
    config, overrides = scale_config(pilot, args, str(args.pilot_manifest))
    signals = signals_from_pilot_manifest(pilot, str(args.pilot_manifest))
    for name, change in overrides.items():
        print(f"[scale] override {name}: {change['from']} -> {change['to']}", flush=True)
    print(f"[scale] critic signals from the pilot: {list(signals.trusted)} (ranked by {signals.rank_by})", flush=True)
    return pilot, config, overrides, signals


def _shard_config(config, spec):
    return dataclasses.replace(config, count=spec.count, seed=spec.seed)


def _run_shard(spec, config, overrides, args, pilot, signals, load_model, launch) -> None:
    from utils.sharding import SHARD_MANIFEST, exclusive_lock, gpu_memory_fraction, model_override, shard_status
    from utils.stage1_generation import GenerationJob, check_run_identity, generate_into_folder

    shard_config = _shard_config(config, spec)
    with exclusive_lock(spec.folder / ".lock", wait=False, what=f"shard {spec.index}"):
        # The settings are checked before anything else; the model's identity once it has loaded
        # (a complete shard is skipped without loading one).
        check_run_identity(spec.folder, {"config": shard_config.as_dict(), "key_prefix": spec.key_prefix,
                                         "critic_signals": {"trusted": list(signals.trusted), "rank_by": signals.rank_by}})
        status = shard_status(spec)
        if status == "complete":
            print(f"[scale] shard {spec.index}: complete, skipped", flush=True)
            return
        if status == "stale":
            print(f"[scale] shard {spec.index}: files changed since its manifest; re-deriving them", flush=True)
        loaded = load_model()
        job = GenerationJob(
            stage="scale_shard", folder=spec.folder, config=shard_config, manifest_name=SHARD_MANIFEST,
            log_prefix=f"[scale] shard {spec.index}:", key_prefix=spec.key_prefix, inputs={"pilot_manifest": args.pilot_manifest},
            critic_signals=signals,
            manifest_extra={"overrides": {**overrides, **model_override(pilot.get("model_provenance"), loaded[2])},
                            "calibration": pilot.get("calibration"), "shard": spec.as_dict(), "base_seed": config.seed,
                            "rank": {**dataclasses.asdict(launch), "gpu_memory_fraction": gpu_memory_fraction(loaded[0])}})
        result = generate_into_folder(job, loaded, args, batch_size=args.batch_size, show_progress=not args.no_progress,
                                      compile=args.compile)
        print(f"[scale] shard {spec.index}: {result['records']} pairs in {spec.data_path}", flush=True)


def _held_out_index(test_set: Path | None, config):
    """The --exclude-test-set overlap index, read before any shard runs so that a bad file is refused at once,
    and a test instruction that overlaps a response demonstration the responses are generated with (exit 2)."""
    if test_set is None:
        return None
    from utils.completion_prompts import RESPONSE_TEMPLATES, demonstration_overlaps
    from utils.dedup import OverlapIndex
    from utils.evaluation import load_test_records

    index = OverlapIndex(load_test_records(test_set))
    overlaps = demonstration_overlaps(index, config.response_template) if RESPONSE_TEMPLATES[config.response_template].demonstrations else []
    if overlaps:
        shown = "; ".join(f"demonstration {o['demonstration']} ({o['demonstration_instruction']!r}) ~ test {o['test_id']!r} "
                          f"({o['kind']})" for o in overlaps)
        raise BadInputError(f"--exclude-test-set {test_set}: held-out test instructions overlap the {config.response_template} "
                            f"demonstrations the training responses are generated with: {shown}")
    return index


def _merge(args, specs, config, overrides, pilot, signals, held_out) -> int:
    from utils.completion_prompts import RESPONSE_TEMPLATES
    from utils.constraints import CATALOGUE_VERSION
    from utils.jsonl_io import write_jsonl_atomic
    from utils.provenance_helper import create_session_manifest, resolve_recorded_path, write_manifest_atomic
    from utils.qc import format_qc_table
    from utils.records import count_pairs
    from utils.sharding import exclusive_lock, merge_shards, merged_manifest_path, model_override, shards_root

    start = time.time()
    manifest_path = merged_manifest_path(args.output)
    with exclusive_lock(shards_root(args.output) / ".merge.lock", wait=True):
        merged = merge_shards(specs, args.count, {s.index: _shard_config(config, s).as_dict() for s in specs},
                              config.near_duplicate_threshold, config.qc_thresholds, held_out=held_out,
                              critic_signals=signals.as_record())
        records, qc, dedup = merged["records"], merged["qc"], merged["dedup"]
        pairs = count_pairs(records)
        if pairs < args.count:
            qc["shortfall"] = (f"{pairs} pairs of {args.count} asked ({dedup['exact_removed']} exact and {dedup['near_removed']} "
                               f"near duplicates, {dedup['held_out_overlaps_removed']} held-out overlaps removed)")
        manifest_path.unlink(missing_ok=True)  # a manifest on disk must vouch for the data beside it
        write_jsonl_atomic(args.output, records)
        pilot_data = resolve_recorded_path(pilot["outputs"]["data"]["path"], args.pilot_manifest)
        inputs = {"pilot_manifest": args.pilot_manifest, "pilot_data": pilot_data}
        if args.exclude_test_set is not None:
            inputs["excluded_test_set"] = args.exclude_test_set
        manifest = create_session_manifest(
            "scale", args, outputs={"data": args.output}, inputs=inputs, qc=qc, config=config.as_dict(),
            overrides={**overrides, **model_override(pilot.get("model_provenance"), merged["model_provenance"])},
            calibration=pilot.get("calibration"), model_provenance=merged["model_provenance"], shards=merged["shards"],
            dedup=dedup, base_seed=config.seed, shard_seed_rule="base_seed * 1000 + shard_index", records=len(records),
            pairs=pairs, requested_count=args.count, critic_signals=signals.as_record(), constraint_catalogue_version=CATALOGUE_VERSION,
            demonstration_overlap_check="passed" if held_out is not None and RESPONSE_TEMPLATES[config.response_template].demonstrations
            else "not run", wall_seconds=round(time.time() - start, 1))
        write_manifest_atomic(manifest_path, manifest)
    print(format_qc_table(qc))
    print(f"[scale] merged {len(specs)} shards: {pairs} pairs and {len(records) - pairs} relabeled variants in {args.output} "
          f"({dedup['exact_removed']} exact and {dedup['near_removed']} near duplicates removed across shards, "
          f"{dedup['held_out_overlaps_removed']} pairs overlapping the held-out test set); manifest {manifest_path}", flush=True)
    if "shortfall" in qc:
        print(f"[scale] warning: shortfall: {qc['shortfall']}", flush=True)
    return EXIT_OK if qc["passed"] else EXIT_GATE_FAILED


def main(args: argparse.Namespace) -> int:
    from utils.sharding import (
        check_scale_output,
        claim_gpu,
        launch_from_env,
        model_override,
        plan_shards,
        select_shards,
        shard_status,
        wait_for_shards,
    )

    check_scale_output(args.output)
    pilot, config, overrides, signals = _gate(args)
    held_out = _held_out_index(args.exclude_test_set, config)
    specs = plan_shards(args.count, args.num_shards, config.seed, args.output)
    launch = launch_from_env()
    if args.merge:
        if launch.rank != 0:
            print(f"[scale] rank {launch.rank}: --merge runs on rank 0 only", flush=True)
            return EXIT_OK
        return _merge(args, specs, config, overrides, pilot, signals, held_out)
    mine = select_shards(args.num_shards, args.shard_index, launch.rank, launch.world_size)
    where = f"rank {launch.rank}/{launch.world_size}: " if launch.launched else ""
    print(f"[scale] {where}shards {mine} of {args.num_shards} ({args.count} pairs in all) -> {args.output}", flush=True)
    model_name = args.model if args.model is not None else (pilot.get("args") or {}).get("model")
    loaded = {}

    def load_model():
        if not loaded:
            from utils.clean_model_loader import CleanModelLoader

            loaded["model"] = CleanModelLoader(model_name, dtype=args.dtype, device=claim_gpu(launch),
                                               allow_instruct_model=args.allow_instruct_model).load()
            override = model_override(pilot.get("model_provenance"), loaded["model"][2])
            if override:
                print(f"[scale] warning: the model ({override['model']['to']['model_id']}) is not the pilot's "
                      f"({override['model']['from']['model_id']}); recorded under overrides", flush=True)
        return loaded["model"]

    for index in mine:
        _run_shard(specs[index], config, overrides, args, pilot, signals, load_model, launch)
    if args.no_merge:
        print("[scale] --no-merge: merge later by rerunning with --merge", flush=True)
        return EXIT_OK
    if launch.launched and launch.rank != 0:
        print(f"[scale] rank {launch.rank}: my shards are done; rank 0 merges", flush=True)
        return EXIT_OK
    if launch.launched and launch.world_size > 1:
        launch_shards = select_shards(args.num_shards, args.shard_index, 0, 1)
        wait_for_shards([specs[i] for i in launch_shards], poll_seconds=2.0)
    missing = [s.index for s in specs if shard_status(s) != "complete"]
    if missing:
        print(f"[scale] {args.num_shards - len(missing)} of {args.num_shards} shards complete (still to run: {missing}); "
              "no merge yet. Run the remaining shards, then merge with the same flags plus --merge.", flush=True)
        return EXIT_OK
    return _merge(args, specs, config, overrides, pilot, signals, held_out)


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
