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

torchrun / accelerate launch (rank r takes shards i with i % WORLD_SIZE == r on GPU LOCAL_RANK; rank 0
waits for the other ranks' shard manifests, then merges; ranks share nothing but files, so across
nodes the output must be on a shared filesystem):
    torchrun --standalone --nproc-per-node 8 scripts/generate_stage1_scale_data.py --count 15000 --num-shards 10
    accelerate launch --num_processes 8 scripts/generate_stage1_scale_data.py --count 15000 --num-shards 10

Refuses (exit 3) without a pilot manifest whose QC passed and whose data is unchanged. Generation
parameters come from the pilot manifest's `config`; a flag that changes one is recorded under
`overrides` in every manifest. Shard i (folder `<output stem>_shards/shard_XXX/`) gets an even share
of --count (remainder to the first shards) and the seed `seed * 1000 + i`; it writes sft_data.jsonl,
its phase files and shard_manifest.json (last). A complete shard is skipped, a killed one resumes.
The merge removes exact and near-duplicate instructions across shards (first one wins), recomputes
QC on the whole and writes --output and `<output stem>.manifest.json`. Exit 0 when the merged QC
passed (or when shards ran and no merge was due yet), 4 when it failed.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from utils.exit_codes import EXIT_GATE_FAILED, EXIT_OK, BadInputError, RefusedError, run_cli  # noqa: E402
from utils.stage1_generation import add_generation_arguments  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--pilot-manifest", type=Path, default=Path("artifacts/pilot/session_manifest.json"),
                        help="session manifest of a pilot whose QC passed (the gate and the parameters)")
    parser.add_argument("--count", type=int, default=15000, help="pairs in the merged dataset")
    parser.add_argument("--num-shards", type=int, default=10, help="shards to split --count into")
    parser.add_argument("--output", type=Path, default=Path("data/stage1_sft_data.jsonl"),
                        help="merged JSONL; shards go to <output stem>_shards/shard_XXX/")
    parser.add_argument("--seed", type=int, default=None, help="base seed; shard i uses seed * 1000 + i (default: the pilot's seed)")
    parser.add_argument("--model", default=None, help="model folder, .gguf file or hub id (default: the pilot's model)")
    parser.add_argument("--batch-size", type=int, default=64, help="sequences per generation/critic batch (halved on OOM)")
    parser.add_argument("--dtype", default=None, help="torch dtype for the model (default bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--max-rounds", type=int, default=None, help="generation rounds per shard (default: the pilot's)")
    parser.add_argument("--shard-index", type=int, nargs="+", default=None, help="run only these shards (split over ranks when launched)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--merge", action="store_true", help="only merge complete shards (no model is loaded)")
    mode.add_argument("--no-merge", action="store_true", help="do not merge after running shards, even when all are complete")
    parser.add_argument("--exclude-test-set", type=Path, default=None,
                        help="held-out test JSONL: pairs whose instruction overlaps one of its instructions (exact, near, "
                             "shared 8-gram; the evaluation's contamination rule) are dropped at the merge")
    parser.add_argument("--allow-instruct-model", action="store_true", help="override the loader's instruct-model refusal (recorded)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_generation_arguments(parser, defaults_from_pilot=True)
    args = parser.parse_args(argv)
    if args.count < 1 or args.batch_size < 1 or args.num_shards < 1 or (args.max_rounds is not None and args.max_rounds < 1):
        raise BadInputError("--count, --num-shards, --batch-size and --max-rounds must be positive")
    return args


def _gate(args) -> tuple[dict, object, dict]:
    """The pilot gate (exit 3), then the scale config: the pilot's parameters plus recorded overrides."""
    from utils.provenance_helper import require_upstream_manifest
    from utils.stage1_generation import config_from_args, config_from_dict

    pilot = require_upstream_manifest(args.pilot_manifest, "scale: pilot")
    if not isinstance(pilot.get("config"), dict) or "data" not in pilot.get("outputs", {}):
        raise RefusedError(f"scale: {args.pilot_manifest} is not a pilot session manifest (no config or no data output)")
    base = config_from_dict(pilot["config"])
    pilot_model = (pilot.get("args") or {}).get("model")
    resolved = copy.copy(args)
    resolved.seed = base.seed if args.seed is None else args.seed
    resolved.label_swap = base.label_swap
    resolved.max_rounds = base.max_rounds if args.max_rounds is None else args.max_rounds
    config, overrides = config_from_args(resolved, base=base)
    if config.max_rounds != base.max_rounds:
        overrides["max_rounds"] = {"from": base.max_rounds, "to": config.max_rounds}
    if args.model is None:
        args.model = pilot_model
    elif args.model != pilot_model:
        overrides["model"] = {"from": pilot_model, "to": args.model}
        print(f"[scale] warning: --model {args.model} is not the pilot's model ({pilot_model}); recorded under overrides", flush=True)
    args.seed = config.seed
    for name, change in overrides.items():
        print(f"[scale] override {name}: {change['from']} -> {change['to']}", flush=True)
    return pilot, config, overrides


def _shard_config(config, spec):
    return dataclasses.replace(config, count=spec.count, seed=spec.seed)


def _run_shard(spec, config, overrides, args, load_model, launch) -> None:
    from utils.jsonl_io import write_jsonl_atomic
    from utils.provenance_helper import create_session_manifest, write_manifest_atomic
    from utils.qc import format_qc_table
    from utils.sharding import exclusive_lock, shard_status
    from utils.stage1_generation import claim_output_dir, run_stage1_generation

    shard_config = _shard_config(config, spec)
    with exclusive_lock(spec.folder / ".lock", wait=False, what=f"shard {spec.index}"):
        resumed = claim_output_dir(spec.folder, {"config": shard_config.as_dict(), "model": args.model, "dtype": args.dtype,
                                                 "key_prefix": spec.key_prefix})
        status = shard_status(spec)
        if status == "complete":
            print(f"[scale] shard {spec.index}: complete, skipped", flush=True)
            return
        if status == "stale":
            print(f"[scale] shard {spec.index}: files changed since its manifest; re-deriving them", flush=True)
            spec.manifest_path.unlink()
        print(f"[scale] shard {spec.index}: {'resuming' if resumed else 'starting'} ({spec.count} pairs, seed {spec.seed}) "
              f"in {spec.folder}", flush=True)
        model, tokenizer, provenance = load_model()
        start = time.time()
        result = run_stage1_generation(model, tokenizer, shard_config, spec.folder, batch_size=args.batch_size,
                                       show_progress=not args.no_progress, key_prefix=spec.key_prefix, compile=args.compile)
        write_jsonl_atomic(spec.data_path, result["final"])
        qc = result["qc"]
        if len(result["final"]) < spec.count:
            qc["shortfall"] = f"{len(result['final'])} accepted of {spec.count} asked after {shard_config.max_rounds} rounds"
        manifest = create_session_manifest(
            "scale_shard", args, outputs={"data": spec.data_path, "judged": spec.judged_path},
            inputs={"pilot_manifest": args.pilot_manifest}, qc=qc, config=shard_config.as_dict(), overrides=overrides,
            model_provenance=provenance, shard=spec.as_dict(), base_seed=args.seed, phase_counts=result["phase_counts"],
            rank=dataclasses.asdict(launch), wall_seconds=round(time.time() - start, 1), resumed=resumed,
            records=len(result["final"]))
        write_manifest_atomic(spec.manifest_path, manifest)
        print(format_qc_table(qc))
        print(f"[scale] shard {spec.index}: {len(result['final'])} pairs in {spec.data_path}", flush=True)


def _merge(args, specs, config, overrides, pilot) -> int:
    from utils.jsonl_io import write_jsonl_atomic
    from utils.provenance_helper import create_session_manifest, resolve_recorded_path, write_manifest_atomic
    from utils.qc import format_qc_table
    from utils.sharding import exclusive_lock, merge_shards, merged_manifest_path, shards_root

    start = time.time()
    manifest_path = merged_manifest_path(args.output)
    with exclusive_lock(shards_root(args.output) / ".merge.lock", wait=True):
        held_out = None
        if args.exclude_test_set is not None:
            from utils.dedup import OverlapIndex
            from utils.evaluation import load_test_records

            held_out = OverlapIndex(load_test_records(args.exclude_test_set))
        merged = merge_shards(specs, args.count, {s.index: _shard_config(config, s).as_dict() for s in specs},
                              config.near_duplicate_threshold, config.qc_thresholds, held_out=held_out)
        records, qc, dedup = merged["records"], merged["qc"], merged["dedup"]
        if len(records) < args.count:
            qc["shortfall"] = (f"{len(records)} pairs of {args.count} asked ({dedup['exact_removed']} exact and {dedup['near_removed']} "
                               f"near duplicates, {dedup['held_out_overlaps_removed']} held-out overlaps removed)")
        manifest_path.unlink(missing_ok=True)  # a manifest on disk must vouch for the data beside it
        write_jsonl_atomic(args.output, records)
        pilot_data = resolve_recorded_path(pilot["outputs"]["data"]["path"], args.pilot_manifest)
        inputs = {"pilot_manifest": args.pilot_manifest, "pilot_data": pilot_data}
        if args.exclude_test_set is not None:
            inputs["excluded_test_set"] = args.exclude_test_set
        manifest = create_session_manifest(
            "scale", args, outputs={"data": args.output}, inputs=inputs,
            qc=qc, config=config.as_dict(), overrides=overrides, model_provenance=merged["model_provenance"],
            shards=merged["shards"], dedup=dedup, base_seed=args.seed, shard_seed_rule="base_seed * 1000 + shard_index",
            records=len(records), requested_count=args.count, wall_seconds=round(time.time() - start, 1))
        write_manifest_atomic(manifest_path, manifest)
    print(format_qc_table(qc))
    print(f"[scale] merged {len(specs)} shards: {len(records)} pairs in {args.output} ({dedup['exact_removed']} exact and "
          f"{dedup['near_removed']} near duplicates removed across shards, {dedup['held_out_overlaps_removed']} pairs overlapping "
          f"the held-out test set); manifest {manifest_path}", flush=True)
    if "shortfall" in qc:
        print(f"[scale] warning: shortfall: {qc['shortfall']}", flush=True)
    return EXIT_OK if qc["passed"] else EXIT_GATE_FAILED


def main(args: argparse.Namespace) -> int:
    from utils.sharding import launch_from_env, plan_shards, select_shards, shard_status, wait_for_shards

    pilot, config, overrides = _gate(args)
    specs = plan_shards(args.count, args.num_shards, config.seed, args.output)
    launch = launch_from_env()
    if args.merge:
        if launch.rank != 0:
            print(f"[scale] rank {launch.rank}: --merge runs on rank 0 only", flush=True)
            return EXIT_OK
        return _merge(args, specs, config, overrides, pilot)
    mine = select_shards(args.num_shards, args.shard_index, launch.rank, launch.world_size)
    where = f"rank {launch.rank}/{launch.world_size}: " if launch.launched else ""
    print(f"[scale] {where}shards {mine} of {args.num_shards} ({args.count} pairs in all) -> {args.output}", flush=True)
    loaded = {}

    def load_model():
        if not loaded:
            import torch

            from utils.clean_model_loader import CleanModelLoader

            device = "auto"
            if launch.launched and torch.cuda.is_available():
                if launch.local_rank >= torch.cuda.device_count():
                    raise BadInputError(f"LOCAL_RANK {launch.local_rank} but only {torch.cuda.device_count()} GPU(s) visible")
                torch.cuda.set_device(launch.local_rank)
                device = f"cuda:{launch.local_rank}"
            loaded["model"] = CleanModelLoader(args.model, dtype=args.dtype, device=device,
                                               allow_instruct_model=args.allow_instruct_model).load()
        return loaded["model"]

    for index in mine:
        _run_shard(specs[index], config, overrides, args, load_model, launch)
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
    return _merge(args, specs, config, overrides, pilot)


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
