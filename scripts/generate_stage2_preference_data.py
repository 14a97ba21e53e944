"""Stage 2 preference pairs: the Stage 1 adapter's own candidates for fresh instructions, paired by signals that discriminate.

    python scripts/generate_stage2_preference_data.py --stage1-evaluation results/sft_eval/evaluation_results.json \\
        --output artifacts/stage2 --num-instructions 200 --num-candidates 4

Refuses (exit 3, before any model loads) without a Stage 1 evaluation whose gate passed
(evaluate_stage1_sft.py's evaluation_results.json, its outputs unchanged), without the adapter that
evaluation passed (TRAINING_SUCCESS and file hashes as recorded), or when the Stage 1 training data,
the test set or the pilot manifest behind them is missing or changed. The base model writes fresh
instructions as in Stage 1 (the pilot's settings, this run's --seed), each checked against the Stage 1
training instructions and the evaluation's test set by the evaluation's overlap rule (an overlapping
one is excluded); a --constraint-fraction of them gets trained-family constraints; the Stage 1
adapter samples --num-candidates answers each from the bare prompt; the base model scores them; pairs
come from the constraint checkers, from each --signals signal the pilot's probe trusted, and with
--corrupted-pairs from rule-corrupted copies (utils/preference_pairs.py says exactly how).
Outputs in --output: one JSONL per phase (appended per record; rerun the same command to resume),
preference_pairs.jsonl (the dataset) and, last, session_manifest.json with the QC table. Exit 0 when
the pair QC passed, 4 when it failed (the manifest says why), 2 for a bad flag or a --output holding
a run with other settings.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from utils.cli_validation import in_range, non_negative_int, positive_float, positive_int, probability  # noqa: E402
from utils.completion_prompts import ANSWER_ENDS  # noqa: E402
from utils.constraint_data import family_names  # noqa: E402
from utils.exit_codes import EXIT_GATE_FAILED, EXIT_OK, RefusedError, run_cli  # noqa: E402
from utils.preference_pairs import DEFAULT_SIGNALS, PAIR_QC_THRESHOLDS  # noqa: E402
from utils.response_selection import SIGNALS  # noqa: E402


def _signal_names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SIGNALS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected comma-separated signals from {', '.join(SIGNALS)}, got {text!r}")
    return names


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--stage1-evaluation", type=Path, default=Path("results/sft_eval/evaluation_results.json"),
        help="evaluation_results.json of a Stage 1 evaluation whose gate passed (the gate of this stage)")
    add("--stage1-adapter", type=Path, default=None, help="the Stage 1 adapter (default: the one that evaluation passed; must match it)")
    add("--pilot-manifest", type=Path, default=None,
        help="pilot session manifest whose probe verdict says which critic signals may rank pairs "
             "(default: the pilot behind the Stage 1 training data)")
    add("--model", default=None, help="base model (default: the one the Stage 1 adapter was trained on)")
    add("--output", type=Path, default=Path("artifacts/stage2"), help="output folder")
    add("--num-instructions", type=positive_int, default=200, help="fresh instructions to answer (after exclusions)")
    add("--num-candidates", type=in_range(int, 2), default=4, help="answers the Stage 1 adapter samples per instruction")
    add("--seed", type=non_negative_int, default=7, help="seed of this run (instructions, constraints, sampling); not Stage 1's")
    add("--temperature", type=positive_float, default=0.7, help="candidate sampling temperature (diversity among the N)")
    add("--top-p", type=in_range(float, 0, 1, low_open=True), default=0.9, help="candidate nucleus top-p")
    add("--repetition-penalty", type=positive_float, default=1.15, help="candidate repetition penalty (the pilot's response value)")
    add("--max-new-tokens", type=positive_int, default=256, help="candidate token budget (the evaluation's; using it all makes a candidate unclean)")
    add("--answer-end", choices=ANSWER_ENDS, default="block",
        help="where a candidate ends (the evaluation's --answer-end): 'block' keeps blank lines, 'blank_line' cuts at the first")
    add("--constraint-fraction", type=probability, default=0.5, help="fraction of the instructions given trained-family constraints")
    add("--constraint-families", type=family_names, default=None, help=f"{family_names.describe()} (default: all trained)")
    add("--signals", type=_signal_names, default=list(DEFAULT_SIGNALS),
        help="critic signals that may form pairs, each only where the pilot's probe trusted it")
    add("--min-signal-margin", type=positive_float, default=1.0, help="signal difference (its own units, nats) a signal pair needs")
    add("--corrupted-pairs", action=argparse.BooleanOptionalAction, default=False,
        help="also pair a passing candidate with its rule-corrupted copy (one constraint broken, the rest kept)")
    add("--min-pairs", type=positive_int, default=PAIR_QC_THRESHOLDS["min_pairs"], help="QC gate: pairs written at least")
    add("--max-length-ratio", type=positive_float, default=PAIR_QC_THRESHOLDS["max_length_ratio"],
        help="QC gate: median chosen/rejected token length ratio at most this (a 'longer wins' preference is a known failure)")
    add("--min-length-ratio", type=positive_float, default=PAIR_QC_THRESHOLDS["min_length_ratio"],
        help="QC gate: median chosen/rejected token length ratio at least this ('shorter wins')")
    add("--batch-size", type=positive_int, default=16, help="sequences per generation/critic batch (halved on OOM)")
    add("--dtype", default=None, help="torch dtype for the model (default bfloat16 on CUDA, float32 on CPU)")
    add("--compile", action="store_true", help="GPU only: torch.compile the decode step and the critic (pays off on long runs)")
    add("--allow-instruct-model", action="store_true", help="override the loader's instruct-model refusal (recorded)")
    add("--no-progress", action="store_true", help="hide progress bars")
    return parser.parse_args(argv)


@dataclass
class Upstream:
    """Everything checked before a model is loaded."""

    evaluation_path: Path
    adapter: object  # utils.evaluation.TrainedAdapter
    base_model: str | None
    pilot_path: Path
    pilot: dict
    signals: object  # utils.response_selection.CriticSignals
    test_path: Path
    training_path: Path
    exclusion: object  # utils.dedup.OverlapIndex


def _pilot_path(args, adapter) -> Path:
    """--pilot-manifest, else the pilot behind the Stage 1 training data (its manifest, or the scale manifest's input)."""
    from utils.provenance_helper import read_manifest, resolve_recorded_path

    if args.pilot_manifest is not None:
        return args.pilot_manifest
    data_manifest = adapter.marker.get("data_manifest")
    try:
        manifest = read_manifest(data_manifest)
        if manifest.get("stage") == "pilot":
            return Path(data_manifest)
        return resolve_recorded_path(manifest["inputs"]["pilot_manifest"]["path"], Path(data_manifest))
    except (OSError, TypeError, KeyError, ValueError) as err:
        raise RefusedError(f"cannot find the pilot manifest behind the Stage 1 training data ({data_manifest!r}: {err}); "
                           "pass --pilot-manifest") from None


def read_upstream(args) -> Upstream:
    """The gate (exit 3) and every input, checked with no model loaded."""
    from utils import evaluation as ev
    from utils.jsonl_io import read_jsonl
    from utils.preference_pairs import exclusion_index
    from utils.provenance_helper import require_upstream_manifest, resolve_recorded_path, sha256_file
    from utils.response_selection import signals_from_pilot_manifest

    evaluation = require_upstream_manifest(args.stage1_evaluation, "stage 2: Stage 1 evaluation", passed_key=("gate", "passed"))
    evaluated = (evaluation.get("models") or {}).get("sft") or {}
    test_set = evaluation.get("test_set") or {}
    if not isinstance(evaluated.get("adapter_files_sha256"), dict) or not isinstance(test_set.get("path"), str):
        raise RefusedError(f"stage 2: {args.stage1_evaluation} is not an evaluate_stage1_sft.py results file (no evaluated adapter or test set)")
    adapter = ev.read_adapter(args.stage1_adapter or Path(evaluated["adapter_path"]))
    if adapter.files_sha256 != evaluated["adapter_files_sha256"]:
        raise RefusedError(f"stage 2: {adapter.path} is not the adapter {args.stage1_evaluation} evaluated (file hashes differ)")
    test_path = resolve_recorded_path(test_set["path"], args.stage1_evaluation)
    if not test_path.is_file() or sha256_file(test_path) != test_set.get("sha256"):
        raise RefusedError(f"stage 2: the test set {test_path} the Stage 1 evaluation used is missing or changed since")
    training_path, _ = ev.resolve_training_data(None, adapter)  # exit 3 when missing or changed
    pilot_path = _pilot_path(args, adapter)
    pilot = require_upstream_manifest(pilot_path, "stage 2: pilot")
    signals = signals_from_pilot_manifest(pilot, str(pilot_path))
    exclusion = exclusion_index(read_jsonl(training_path, required_fields=["id", "instruction"]), ev.load_test_records(test_path))
    print(f"[stage2] Stage 1 evaluation passed ({args.stage1_evaluation}); adapter {adapter.path}; critic signals trusted by "
          f"the pilot: {list(signals.trusted)}", flush=True)
    return Upstream(args.stage1_evaluation, adapter, ev.resolve_base_model(args.model, adapter), Path(pilot_path), pilot, signals,
                    test_path, training_path, exclusion)


def build_config(args, upstream: Upstream):
    import dataclasses

    from utils.constraints import TRAINED_FAMILIES
    from utils.generation import SamplingParams
    from utils.preference_pairs import Stage2Config
    from utils.stage1_generation import config_from_manifest

    settings = config_from_manifest(upstream.pilot.get("config"), str(upstream.pilot_path))
    settings = dataclasses.replace(settings, count=args.num_instructions, seed=args.seed)
    response = SamplingParams(args.temperature, args.top_p, args.repetition_penalty, args.max_new_tokens)
    return Stage2Config(
        seed=args.seed, num_instructions=args.num_instructions, num_candidates=args.num_candidates,
        instruction_settings=settings.as_dict(), response=response.as_dict(), constraint_fraction=args.constraint_fraction,
        constraint_families=list(args.constraint_families or TRAINED_FAMILIES), signals=list(args.signals),
        min_signal_margin=args.min_signal_margin, corrupted_pairs=args.corrupted_pairs, answer_end=args.answer_end,
        qc_thresholds={"min_pairs": args.min_pairs, "max_length_ratio": args.max_length_ratio, "min_length_ratio": args.min_length_ratio})


def main(args: argparse.Namespace) -> int:
    from utils import evaluation as ev
    from utils.clean_model_loader import CleanModelLoader
    from utils.constraints import CATALOGUE_VERSION
    from utils.jsonl_io import write_jsonl_atomic
    from utils.preference_pairs import MANIFEST_FILE, PAIRS_FILE, PHASE_FILES, dedupe_pairs, format_pair_qc, pair_qc, run_stage2_generation
    from utils.provenance_helper import create_session_manifest, model_identity, write_manifest_atomic
    from utils.stage1_generation import check_output_path, claim_output_dir

    check_output_path(args.output, "--output", "folder")
    upstream = read_upstream(args)  # exit 3 before any model is loaded
    config = build_config(args, upstream)
    model, tokenizer, provenance = CleanModelLoader(upstream.base_model, dtype=args.dtype,
                                                    allow_instruct_model=args.allow_instruct_model).load()
    base_check = ev.check_base_identity(provenance, upstream.adapter.marker)  # exit 3: not the Stage 1 adapter's base
    identity = {"config": {k: v for k, v in config.as_dict().items() if k != "qc_thresholds"}, "model": model_identity(provenance),
                "dtype": provenance.get("dtype"), "stage1_adapter": upstream.adapter.files_sha256}
    resumed = claim_output_dir(args.output, identity)  # exit 2 for a folder of another run
    manifest_path = args.output / MANIFEST_FILE
    manifest_path.unlink(missing_ok=True)  # a manifest on disk vouches for the data beside it, which is about to change
    print(f"[stage2] {'resuming' if resumed else 'starting'} in {args.output}: {config.num_instructions} instructions x "
          f"{config.num_candidates} candidates, seed {config.seed}", flush=True)
    start = time.time()
    result = run_stage2_generation(model, tokenizer, upstream.adapter.path, config, args.output, upstream.exclusion, upstream.signals,
                                   batch_size=args.batch_size, show_progress=not args.no_progress, compile=args.compile)
    pairs, removed = dedupe_pairs(result["pairs"])
    data_path = args.output / PAIRS_FILE
    write_jsonl_atomic(data_path, pairs)
    qc = pair_qc(pairs, config.qc_thresholds, duplicates_removed=removed, counts=result["counts"])
    manifest = create_session_manifest(
        "stage2_pairs", {**vars(args), "base_model_resolved": upstream.base_model},
        outputs={"data": data_path, "pairs_formed": args.output / PHASE_FILES["pairs"],
                 "scored_candidates": args.output / PHASE_FILES["scored"], "instructions": args.output / PHASE_FILES["selected"]},
        inputs={"stage1_evaluation": upstream.evaluation_path, "pilot_manifest": upstream.pilot_path, "test_set": upstream.test_path,
                "stage1_training_data": upstream.training_path},
        qc=qc, config=config.as_dict(), records=len(pairs), resumed=resumed, wall_seconds=round(time.time() - start, 1),
        stage1_adapter={"path": str(upstream.adapter.path), "files_sha256": upstream.adapter.files_sha256,
                        "training_manifest": str(upstream.adapter.manifest_path) if upstream.adapter.manifest_path else None},
        model_provenance=provenance, base_identity_check=base_check, critic_signals=upstream.signals.as_record(),
        constraint_catalogue_version=CATALOGUE_VERSION)
    write_manifest_atomic(manifest_path, manifest)
    print(format_pair_qc(qc))
    print(f"[stage2] {len(pairs)} pairs in {data_path}; manifest {manifest_path}", flush=True)
    return EXIT_OK if qc["passed"] else EXIT_GATE_FAILED


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
