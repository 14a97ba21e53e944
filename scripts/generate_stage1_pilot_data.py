"""Stage 1 pilot: generate 100-200 instruction/response pairs from the base model alone, gated by QC.

    python scripts/generate_stage1_pilot_data.py --count 100 --seed 42 --output artifacts/pilot

Phases: new instructions from few-shot numbered lists; pre-filters, duplicate removal and the A/B
instruction critic; responses in completion form; the A/B pair critic; QC. Outputs in --output:
sft_data.jsonl (accepted pairs), one JSONL per phase, and session_manifest.json (written last).
Exit 0 when QC passed, 4 when it failed (the manifest says why). Rerun the same command to resume.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from utils.exit_codes import EXIT_GATE_FAILED, EXIT_OK, BadInputError, run_cli  # noqa: E402
from utils.stage1_generation import add_generation_arguments  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--count", type=int, default=100, help="accepted pairs to produce")
    parser.add_argument("--seed", type=int, default=42, help="seed for example selection and sampling")
    parser.add_argument("--output", type=Path, default=Path("artifacts/pilot"), help="output folder")
    parser.add_argument("--model", default=None, help="model folder, .gguf file or hub id (default: bundled gemma-3-270m)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per generation/critic batch (halved on OOM)")
    parser.add_argument("--dtype", default=None, help="torch dtype for the model (default bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--label-swap", action="store_true", help="ask each critic item twice with A/B swapped and average")
    parser.add_argument("--max-rounds", type=int, default=6, help="generation rounds allowed to reach --count")
    parser.add_argument("--allow-instruct-model", action="store_true", help="override the loader's instruct-model refusal (recorded)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_generation_arguments(parser)
    args = parser.parse_args(argv)
    if args.count < 1 or args.batch_size < 1:
        raise BadInputError("--count and --batch-size must be positive")
    return args


def main(args: argparse.Namespace) -> int:
    from utils.clean_model_loader import CleanModelLoader
    from utils.jsonl_io import write_jsonl_atomic
    from utils.provenance_helper import create_session_manifest, write_manifest_atomic
    from utils.qc import format_qc_table
    from utils.stage1_generation import claim_output_dir, config_from_args, run_stage1_generation

    config, _ = config_from_args(args)
    resumed = claim_output_dir(args.output, {"config": config.as_dict(), "model": args.model, "dtype": args.dtype})
    print(f"[pilot] {'resuming' if resumed else 'starting'} in {args.output}", flush=True)
    start = time.time()
    model, tokenizer, provenance = CleanModelLoader(args.model, dtype=args.dtype, allow_instruct_model=args.allow_instruct_model).load()
    result = run_stage1_generation(model, tokenizer, config, args.output, batch_size=args.batch_size, show_progress=not args.no_progress,
                                   compile=args.compile)
    data_path = args.output / "sft_data.jsonl"
    write_jsonl_atomic(data_path, result["final"])
    qc = result["qc"]
    if len(result["final"]) < config.count:
        qc["shortfall"] = f"{len(result['final'])} accepted of {config.count} asked after {config.max_rounds} rounds"
    manifest = create_session_manifest(
        "pilot", args, outputs={"data": data_path}, qc=qc, config=config.as_dict(), model_provenance=provenance,
        wall_seconds=round(time.time() - start, 1), resumed=resumed, records=len(result["final"]))
    write_manifest_atomic(args.output / "session_manifest.json", manifest)
    print(format_qc_table(qc))
    print(f"[pilot] {len(result['final'])} pairs in {data_path}; manifest {args.output / 'session_manifest.json'}")
    return EXIT_OK if qc["passed"] else EXIT_GATE_FAILED


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
