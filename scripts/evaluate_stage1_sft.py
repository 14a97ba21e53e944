"""Evaluate the Stage 1 SFT adapter against its base model on held-out instructions (paired, greedy).

    python scripts/evaluate_stage1_sft.py --sft-checkpoint checkpoints/stage1_sft/final_adapter \
        --test-set data/test_instructions.jsonl --output results/sft_eval

Both models answer every test instruction in the same completion prompt with greedy decoding: the
base model first, then the adapter is attached to the same loaded model. Responses are appended per
record to <output>/base_responses.jsonl and sft_responses.jsonl; a rerun skips ids already there
(and refuses, exit 2, a file written with another model, adapter, prompt or decoding). Then
evaluation_summary.txt, success_rates.png and, last and atomically, evaluation_results.json.

Any two adapters: with --reference-checkpoint (e.g. the Stage 1 adapter, when --sft-checkpoint is the
Stage 2 one) that adapter answers too (reference_responses.jsonl), on the same base, and the results
hold three paired comparisons with the same statistics (`comparisons`: adapter vs base, adapter vs
reference, reference vs base); the gate is then the adapter against the reference, and both adapters'
provenance is recorded (`models.sft`, `models.reference`). The contamination check covers both
adapters' training data. Without the flag nothing changes.

    python scripts/evaluate_stage1_sft.py --sft-checkpoint checkpoints/stage2_dpo/final_adapter \
        --reference-checkpoint checkpoints/stage1_sft/final_adapter --output results/stage2_eval

Exit codes: 3 without final_adapter/TRAINING_SUCCESS, or when an adapter file differs from the sha256
the marker records, the marker or training manifest is malformed, or the base model or the recorded
training data no longer match the training records; 2 on a bad flag, an --output that is a file, a
bad test set or training file (file:line named), or a test prompt too long for --max-instruction-chars
or for the model's context (refused before anything is generated); 0 when the overall McNemar
p < --alpha with the SFT model ahead and no train/test contamination; otherwise 4 (results still
written), e.g. with test instructions found in the SFT training data unless --allow-contamination
(the overlaps are listed either way).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from utils.cli_validation import in_range, positive_int  # noqa: E402
from utils.completion_prompts import ANSWER_ENDS  # noqa: E402
from utils.exit_codes import EXIT_GATE_FAILED, EXIT_OK, run_cli  # noqa: E402

# 25x the 4k-token prompts of common benchmarks: an instruction this long is a broken file, and
# tokenizing megabytes of it would cost more than the check is worth.
MAX_INSTRUCTION_CHARS = 100_000


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--sft-checkpoint", type=Path, default=Path("checkpoints/stage1_sft/final_adapter"),
        help="adapter folder written by train_stage1_sft.py (must hold TRAINING_SUCCESS)")
    add("--reference-checkpoint", type=Path, default=None,
        help="a second adapter (with TRAINING_SUCCESS) to compare --sft-checkpoint against as well, e.g. the Stage 1 adapter "
             "for a Stage 2 one; the gate is then that comparison")
    add("--test-set", type=Path, default=Path("data/test_instructions.jsonl"), help="JSONL with an 'instruction' field")
    add("--output", type=Path, default=Path("results/sft_eval"), help="output folder")
    add("--base-model", default=None, help="base model (default: the one the adapter was trained on, from its manifest)")
    add("--training-data", type=Path, default=None, help="SFT data for the contamination check (default: the recorded one)")
    add("--allow-contamination", action="store_true", help="list train/test overlaps but do not fail the gate on them")
    add("--batch-size", type=positive_int, default=32, help="sequences per generation batch (halved on out-of-memory)")
    add("--max-new-tokens", type=positive_int, default=256,
        help="tokens generated per response (256 fits the longest length rule of the test set, 120 words)")
    add("--answer-end", choices=ANSWER_ENDS, default="block",
        help="where an answer ends: 'block' at EOS or the next prompt block, blank lines kept (an adapter "
             "trained on response_v3/v4 answers writes paragraphs); 'blank_line' also at the first blank line (the source's rule)")
    add("--max-instruction-chars", type=positive_int, default=MAX_INSTRUCTION_CHARS,
        help="refuse (exit 2, file:line) a test instruction longer than this, before any model loads")
    add("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
        help="torch dtype for the model (default bfloat16 on CUDA, float32 on CPU)")
    add("--alpha", type=in_range(float, 0, 1, low_open=True, high_open=True), default=0.01,
        help="significance level of the gate (and of the BH correction)")
    add("--allow-instruct-model", action="store_true", help="override the loader's instruct-model refusal (recorded)")
    add("--no-progress", action="store_true", help="hide progress bars")
    return parser.parse_args(argv)


@dataclass
class Inputs:
    """Everything checked before a model is loaded."""

    adapter: object  # utils.evaluation.TrainedAdapter
    records: list[dict]
    base_model: str | None
    training_path: Path
    training_info: dict
    contamination: dict
    reference: object = None  # utils.evaluation.TrainedAdapter of --reference-checkpoint
    reference_training_info: dict | None = None


def read_inputs(args) -> Inputs:
    """Output folder, adapter(s) (exit 3), test set (exit 2) and the contamination check: no model yet."""
    from utils import evaluation as ev

    ev.check_output_folder(args.output)
    adapter = ev.read_adapter(args.sft_checkpoint)
    reference = ev.read_adapter(args.reference_checkpoint) if args.reference_checkpoint is not None else None
    records = ev.load_test_records(args.test_set, args.max_instruction_chars)
    training_path, training_info = ev.resolve_training_data(args.training_data, adapter)
    training = ev.load_training_instructions(training_path)
    reference_info = None
    if reference is not None:  # the reference's training data counts too: e.g. Stage 2 continues Stage 1's adapter
        reference_path, reference_info = ev.resolve_training_data(None, reference)
        training += [{**row, "id": f"reference:{row['id']}"} for row in ev.load_training_instructions(reference_path)]
    contamination = ev.check_contamination(records, training)
    print(f"[eval] {len(records)} test records; contamination: {contamination['n_contaminated']} overlapping "
          f"instruction(s) {contamination['by_kind']}", flush=True)
    return Inputs(adapter, records, ev.resolve_base_model(args.base_model, adapter), training_path, training_info,
                  contamination, reference, reference_info)


def load_base_model(args, inputs: Inputs):
    """The base model, refused (exit 3) unless it is the one the adapter was trained on, and its
    prompts checked against its context (exit 2) before anything is generated."""
    from utils import evaluation as ev
    from utils.clean_model_loader import CleanModelLoader

    model, tokenizer, provenance = CleanModelLoader(inputs.base_model, dtype=args.dtype,
                                                    allow_instruct_model=args.allow_instruct_model).load()
    checks = {"base_identity": ev.check_base_identity(provenance, inputs.adapter.marker),
              "prompt_lengths": ev.check_prompt_lengths(inputs.records, tokenizer, model, args.max_new_tokens, args.test_set)}
    if inputs.reference is not None:
        checks["reference_base_identity"] = ev.check_base_identity(provenance, inputs.reference.marker)
    return model, tokenizer, provenance, checks


def generate_both(args, model, tokenizer, provenance: dict, inputs: Inputs) -> tuple[dict, dict]:
    """Base responses, then the reference adapter's (if any), then the adapter's, on the same loaded
    model; ({"base", ["reference",] "sft"}, decoding)."""
    from utils import evaluation as ev
    from utils.completion_prompts import CompletionStylePrompts as P
    from utils.generation import GenerationEngine, SamplingParams
    from utils.provenance_helper import sha256_text
    from utils.sft_training import load_adapter

    params = SamplingParams(temperature=0.0, top_p=1.0, repetition_penalty=1.0, max_new_tokens=args.max_new_tokens)
    decoding = {**params.as_dict(), "greedy": True, "stop_strings": P.response_stop_strings(answer_end=args.answer_end),
                "answer_end": args.answer_end, "prompt_version": P.versions["response"], "dtype": provenance.get("dtype")}
    base_key = {"base": ev.model_key(provenance), **decoding}
    keys = {"base": base_key, "sft": {**base_key, "adapter": inputs.adapter.files_sha256}}
    if inputs.reference is not None:
        keys["reference"] = {**base_key, "adapter": inputs.reference.files_sha256}
    keys = {side: sha256_text(json.dumps(key, sort_keys=True))[:16] for side, key in keys.items()}
    args.output.mkdir(parents=True, exist_ok=True)
    engine = GenerationEngine(model, tokenizer, batch_size=args.batch_size, seed=0, show_progress=not args.no_progress)
    responses = {"base": ev.generate_responses("base", engine, inputs.records, args.output / "base_responses.jsonl",
                                               params, keys["base"], args.answer_end)}
    if inputs.reference is None:
        engine.model = load_adapter(model, inputs.adapter.path)
    else:  # both adapters on the one loaded base, each made the active one in turn
        engine.model = model = load_adapter(model, inputs.reference.path, adapter_name="reference")
        responses["reference"] = ev.generate_responses("reference", engine, inputs.records,
                                                       args.output / "reference_responses.jsonl", params, keys["reference"],
                                                       args.answer_end)
        engine.model = load_adapter(model, inputs.adapter.path, adapter_name="sft")
    responses["sft"] = ev.generate_responses("sft", engine, inputs.records, args.output / "sft_responses.jsonl",
                                             params, keys["sft"], args.answer_end)
    return responses, decoding


def write_results(args, inputs: Inputs, provenance: dict, checks: dict, responses: dict, decoding: dict) -> dict:
    """Statistics, the gate, the summary, the plot and, last, evaluation_results.json."""
    from utils import evaluation as ev
    from utils.completion_prompts import CompletionStylePrompts as P
    from utils.provenance_helper import create_session_manifest, sha256_file, write_manifest_atomic

    records, adapter, reference = inputs.records, inputs.adapter, inputs.reference
    rows = {side: info["rows"] for side, info in responses.items()}
    labels = {"base": "base", "sft": "SFT" if reference is None else "adapter", "reference": "reference"}
    contamination, allow = inputs.contamination, args.allow_contamination
    comparisons = None if reference is None else {
        key: ev.compare(records, rows, first, second, args.alpha, contamination, allow, (labels[first], labels[second]))
        for key, (first, second) in ev.COMPARISONS.items()}
    main_comparison = comparisons["adapter_vs_base"] if comparisons else \
        ev.compare(records, rows, "base", "sft", args.alpha, contamination, allow, ("base", "SFT"))
    statistics = main_comparison["statistics"]
    # The gate: the adapter against the base, or with a reference, against the reference.
    gate = comparisons["adapter_vs_reference"]["gate"] if comparisons else main_comparison["gate"]
    header = [f"Stage 1 SFT evaluation: {provenance.get('model_id')} vs + adapter {args.sft_checkpoint}" if reference is None else
              f"Paired evaluation: base {provenance.get('model_id')}, + reference adapter {args.reference_checkpoint}, "
              f"+ adapter {args.sft_checkpoint}",
              f"test set {args.test_set} ({len(records)} records, {statistics['n_scored']} scored); greedy, "
              f"max_new_tokens {args.max_new_tokens}, prompt {P.versions['response']}, answer end {args.answer_end}"]
    summary = ev.format_summary(statistics, gate, inputs.contamination, header, comparisons=comparisons)
    paths = {f"{side}_responses": args.output / f"{side}_responses.jsonl" for side in responses}
    paths["summary"] = args.output / "evaluation_summary.txt"
    paths["summary"].write_text(summary, encoding="utf-8")
    paths["plot"] = ev.plot_success_rates(
        statistics, args.output / "success_rates.png", title=f"base vs adapter(s) ({provenance.get('model_id')})",
        reference_statistics=comparisons["reference_vs_base"]["statistics"] if comparisons else None)
    models = {"base": {"requested": inputs.base_model, "provenance": provenance},
              "sft": {**_adapter_record(adapter), "base_identity_check": checks["base_identity"]}}
    extra = {}
    if reference is not None:
        models["reference"] = {**_adapter_record(reference), "base_identity_check": checks["reference_base_identity"]}
        extra = {"comparisons": comparisons, "reference_training_data": inputs.reference_training_info,
                 "gate_comparison": "adapter_vs_reference"}
    results = create_session_manifest(
        "evaluate_sft", {**vars(args), "base_model_resolved": inputs.base_model},
        inputs={"test_set": args.test_set, "training_data": inputs.training_path},
        outputs=paths, gate=gate, statistics=statistics, contamination=inputs.contamination,
        test_set={"path": str(args.test_set), "sha256": sha256_file(args.test_set), "n_records": len(records),
                  "counts_by_type": dict(Counter(str(r.get("type") or "(none)") for r in records)),
                  "prompt_lengths": checks["prompt_lengths"]},
        models=models, training_data=inputs.training_info, decoding={**decoding, "batch_size": args.batch_size, "seed": 0},
        generation={side: {k: v for k, v in info.items() if k != "rows"} for side, info in responses.items()}, **extra)
    write_manifest_atomic(args.output / "evaluation_results.json", results)
    print(summary, end="")
    print(f"[eval] results in {args.output}", flush=True)
    return gate


def _adapter_record(adapter) -> dict:
    """An evaluated adapter's provenance in the results: its files and its training records."""
    return {"adapter_path": str(adapter.path), "adapter_weights_sha256": adapter.files_sha256.get("adapter_model.safetensors"),
            "adapter_files_sha256": adapter.files_sha256, "training_success": adapter.marker,
            "training_manifest": str(adapter.manifest_path) if adapter.manifest_path else None}


def main(args: argparse.Namespace) -> int:
    inputs = read_inputs(args)  # exit 2/3 before any model is loaded
    model, tokenizer, provenance, checks = load_base_model(args, inputs)
    responses, decoding = generate_both(args, model, tokenizer, provenance, inputs)
    gate = write_results(args, inputs, provenance, checks, responses, decoding)
    return EXIT_OK if gate["passed"] else EXIT_GATE_FAILED


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
