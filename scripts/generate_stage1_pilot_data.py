"""Stage 1 pilot: generate 100-200 instruction/response pairs from the base model alone, gated by QC.

    python scripts/generate_stage1_pilot_data.py --count 200 --seed 42 --output artifacts/pilot

Phases: new instructions from few-shot numbered lists; pre-filters (length, a keyword blacklist),
duplicate removal and the A/B instruction critic; --num-candidates responses per instruction, generated
after hand-written demonstrations (--response-template response_v3; training and evaluation use the bare
prompt); every candidate scored (A/B pair critic both ways, likelihood relevance, repetition, token
limit), each critic signal proven on a probe built from the first round (ROC AUC >= --min-signal-auc,
else it neither accepts nor ranks), the best passing candidate kept; a seeded fraction of the accepted
pairs relabeled with verifiable constraints (--constraint-fraction); QC. Outputs in --output:
sft_data.jsonl (accepted pairs), one JSONL per phase (every scored candidate in
phase4_scored_responses.jsonl), probe.json, and session_manifest.json (written last).
Settings: Stage1Config's defaults (the source's), then the model's named calibration (--calibration;
`auto` picks it by the loaded model's file sha256: gemma-3-270m for the bundled model, the source's
values for any other), then any flag, recorded as an override; the manifest records all three.
Exit 0 when QC passed, 4 when it failed (the manifest says why; also when no critic signal
discriminates on the probe), 2 for a bad flag or a demonstration that cannot enter a prompt for this
model's tokenizer. Rerun the same command to resume; the folder is claimed only once the model has loaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from utils.calibration import CALIBRATION_CHOICES  # noqa: E402
from utils.cli_validation import non_negative_int, positive_int  # noqa: E402
from utils.exit_codes import EXIT_GATE_FAILED, EXIT_OK, run_cli  # noqa: E402
from utils.stage1_generation import DefaultsHelpFormatter, Stage1Config, add_generation_arguments  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    defaults = Stage1Config()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--count", type=positive_int, default=defaults.count, help="accepted pairs to produce")
    parser.add_argument("--seed", type=non_negative_int, default=defaults.seed, help="seed for example selection and sampling")
    parser.add_argument("--output", type=Path, default=Path("artifacts/pilot"), help="output folder")
    parser.add_argument("--model", default=None, help="model folder, .gguf file or hub id (default: bundled gemma-3-270m)")
    parser.add_argument("--calibration", choices=CALIBRATION_CHOICES, default="auto",
                        help="named settings for a model (utils/calibration.py): auto picks by the loaded model's file "
                             "sha256 (the bundled gemma-3-270m -> gemma-3-270m, any other -> source); flags override single values")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="sequences per generation/critic batch (halved on OOM)")
    parser.add_argument("--dtype", default=None, help="torch dtype for the model (default bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--allow-instruct-model", action="store_true", help="override the loader's instruct-model refusal (recorded)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_generation_arguments(parser)
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    from utils.calibration import choose_calibration
    from utils.clean_model_loader import CleanModelLoader
    from utils.stage1_generation import GenerationJob, check_output_path, generate_into_folder, pilot_config

    check_output_path(args.output, "--output", "folder")
    loaded = CleanModelLoader(args.model, dtype=args.dtype, allow_instruct_model=args.allow_instruct_model).load()
    calibration, chosen_by = choose_calibration(args.calibration, loaded[2])
    config, overrides = pilot_config(args, calibration)
    print(f"[pilot] calibration {calibration.name} ({chosen_by})", flush=True)
    for name, change in overrides.items():
        print(f"[pilot] override {name}: {change['from']} -> {change['to']}", flush=True)
    job = GenerationJob(stage="pilot", folder=args.output, config=config, manifest_name="session_manifest.json",
                        log_prefix="[pilot]", manifest_extra={"calibration": calibration.as_record(chosen_by), "overrides": overrides})
    result = generate_into_folder(job, loaded, args, batch_size=args.batch_size, show_progress=not args.no_progress,
                                  compile=args.compile)
    print(f"[pilot] {result['records']} pairs in {result['data_path']}; manifest {result['manifest_path']}")
    return EXIT_OK if result["qc"]["passed"] else EXIT_GATE_FAILED


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
