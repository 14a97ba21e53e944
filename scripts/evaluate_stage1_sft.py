"""Evaluate the Stage 1 SFT adapter against its base model on held-out instructions (paired, greedy).

    python scripts/evaluate_stage1_sft.py --sft-checkpoint checkpoints/stage1_sft/final_adapter \
        --test-set data/test_instructions.jsonl --output results/sft_eval

Both models answer every test instruction in the same completion prompt with greedy decoding: the
base model first, then the adapter is attached to the same loaded model. Responses are appended per
record to <output>/base_responses.jsonl and sft_responses.jsonl; a rerun skips ids already there
(and refuses, exit 2, a file written with another model, adapter, prompt or decoding). Then
evaluation_summary.txt, success_rates.png and, last and atomically, evaluation_results.json.

Exit codes: 3 without final_adapter/TRAINING_SUCCESS (or when the adapter, its base model or the
recorded training data no longer match the training records); 2 on a bad test set or training
file (file:line named); 0 when the overall McNemar p < --alpha with the SFT model ahead and no
train/test contamination; otherwise 4 (results still written), e.g. with test instructions found in
the SFT training data unless --allow-contamination (the overlaps are listed either way).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from utils.exit_codes import EXIT_GATE_FAILED, EXIT_OK, BadInputError, RefusedError, run_cli  # noqa: E402

IDENTITY_KEYS = ("source", "model_id", "file_sha256", "weights_fingerprint", "tokenizer_sha256")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--sft-checkpoint", type=Path, default=Path("checkpoints/stage1_sft/final_adapter"),
        help="adapter folder written by train_stage1_sft.py (must hold TRAINING_SUCCESS)")
    add("--test-set", type=Path, default=Path("data/test_instructions.jsonl"), help="JSONL with an 'instruction' field")
    add("--output", type=Path, default=Path("results/sft_eval"), help="output folder")
    add("--base-model", default=None, help="base model (default: the one the adapter was trained on, from its manifest)")
    add("--training-data", type=Path, default=None, help="SFT data for the contamination check (default: the recorded one)")
    add("--allow-contamination", action="store_true", help="list train/test overlaps but do not fail the gate on them")
    add("--batch-size", type=int, default=32, help="sequences per generation batch (halved on out-of-memory)")
    add("--max-new-tokens", type=int, default=80, help="tokens generated per response")
    add("--dtype", default=None, help="torch dtype for the model (default bfloat16 on CUDA, float32 on CPU)")
    add("--alpha", type=float, default=0.01, help="significance level of the gate (and of the BH correction)")
    add("--allow-instruct-model", action="store_true", help="override the loader's instruct-model refusal (recorded)")
    add("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.max_new_tokens < 1 or not 0 < args.alpha < 1:
        raise BadInputError("--batch-size and --max-new-tokens must be >= 1 and --alpha in (0, 1)")
    return args


def read_adapter(adapter: Path) -> tuple[dict, dict | None, Path | None]:
    """(TRAINING_SUCCESS content, training manifest or None, its path); refuses without the marker."""
    from utils.provenance_helper import read_manifest, sha256_file

    marker_path = adapter / "TRAINING_SUCCESS"
    if not marker_path.is_file():
        raise RefusedError(f"{adapter}: no TRAINING_SUCCESS marker, so training did not finish there (or this is "
                           "not an adapter folder); run train_stage1_sft.py or pass --sft-checkpoint")
    try:
        marker = read_manifest(marker_path)
    except (OSError, ValueError) as err:
        raise RefusedError(f"{marker_path}: unreadable TRAINING_SUCCESS marker ({err})") from None
    candidates = [Path(marker["training_manifest"])] if marker.get("training_manifest") else []
    manifest_path = next((p for p in candidates + [adapter.parent / "training_manifest.json"] if p.is_file()), None)
    manifest = read_manifest(manifest_path) if manifest_path else None
    recorded = ((manifest or {}).get("outputs") or {}).get("adapter_weights", {}).get("sha256")
    weights = adapter / "adapter_model.safetensors"
    if recorded and weights.is_file() and sha256_file(weights) != recorded:
        raise RefusedError(f"{weights} changed since {manifest_path} was written (sha256 differs)")
    return marker, manifest, manifest_path


def resolve_base_model(args, marker: dict, manifest: dict | None) -> str | None:
    if args.base_model is not None:
        return args.base_model
    if manifest is not None and "model" in manifest.get("args", {}):
        return manifest["args"]["model"]  # None = the bundled model
    identity = marker.get("model_identity") or {}
    if identity.get("source") == "bundled":
        return None
    if identity.get("source") in ("local", "hub") and identity.get("model_id"):
        return identity["model_id"]
    raise RefusedError(f"{args.sft_checkpoint}: cannot tell which base model the adapter was trained on (no training "
                       "manifest); pass --base-model")


def resolve_training_data(args, marker: dict, manifest: dict | None) -> tuple[Path, dict]:
    from utils.provenance_helper import sha256_file

    recorded_sha = marker.get("dataset_sha256") or ((manifest or {}).get("dataset") or {}).get("sha256")
    path = args.training_data
    if path is None:
        recorded = marker.get("dataset_path") or ((manifest or {}).get("dataset") or {}).get("path")
        if not recorded or not Path(recorded).is_file():
            raise RefusedError(f"the SFT training data recorded for the adapter ({recorded}) is not here, so the "
                               "contamination check cannot run; pass --training-data")
        path = Path(recorded)
    elif not path.is_file():
        raise BadInputError(f"--training-data {path}: file not found")
    sha = sha256_file(path)
    if args.training_data is None and recorded_sha and sha != recorded_sha:
        raise RefusedError(f"{path} changed since the adapter was trained on it (sha256 {sha[:12]}... != {recorded_sha[:12]}...)")
    if recorded_sha and sha != recorded_sha:
        print(f"[eval] warning: --training-data {path} is not the file the adapter was trained on (sha256 differs)", file=sys.stderr)
    return path, {"path": str(path), "sha256": sha, "recorded_sha256": recorded_sha, "matches_recorded": sha == recorded_sha}


def check_base_identity(provenance: dict, marker: dict) -> dict:
    """Refuse an adapter on a base model whose recorded identity (hashes) differs from the loaded one."""
    trained = marker.get("model_identity") or {}
    compared = {k: (trained.get(k), provenance.get(k)) for k in ("file_sha256", "weights_fingerprint", "tokenizer_sha256")
                if trained.get(k) and provenance.get(k)}
    differing = [k for k, (a, b) in compared.items() if a != b]
    if differing:
        raise RefusedError(f"the base model loaded ({provenance.get('model_id')}) is not the one the adapter was trained on "
                           f"({trained.get('model_id')}): {', '.join(differing)} differ")
    return {"compared": sorted(compared), "matches": True}


def generate_responses(label, engine, records, path, params, generation_key) -> dict:
    """Append `label` responses for records not yet in `path`; refuses a file made with other settings."""
    from utils.completion_prompts import CompletionStylePrompts as P
    from utils.jsonl_io import JsonlAppender
    from utils.test_set import score_response

    by_id = {r["id"]: r for r in records}
    start = time.time()
    with JsonlAppender(path) as appender:
        for row in appender.records:
            record = by_id.get(row.get("id"))
            if record is not None and (row.get("generation_key") != generation_key or row.get("instruction") != record["instruction"]):
                raise BadInputError(f"{path}: holds a {label} response for {row['id']!r} made with another model, adapter, "
                                    "prompt, decoding or instruction; use another --output or delete that file")
        pending = [r for r in records if r["id"] not in appender]
        print(f"[eval] {label}: {len(records) - len(pending)} of {len(records)} responses already on disk, "
              f"{len(pending)} to generate", flush=True)

        def save(result):
            record = by_id[result.key]
            cleaned = P.clean_response(result.text)
            appender.append({"id": record["id"], "type": record.get("type"), "instruction": record["instruction"],
                             "model": label, "prompt_version": P.versions["response"], "generation_key": generation_key,
                             "raw_output": result.text, "response": cleaned.text, "was_cut": cleaned.was_cut,
                             "finish_reason": result.finish_reason, "n_generated_tokens": result.n_generated_tokens,
                             "score": score_response(record, cleaned.text)})

        items = [(r["id"], P.create_response_prompt(r["instruction"])) for r in pending]
        engine.generate(items, params, P.response_stop_strings(), on_result=save, description=f"{label} responses")
        rows = {row["id"]: row for row in appender.records if row["id"] in by_id}
    return {"rows": rows, "generated_now": len(pending), "seconds": round(time.time() - start, 2),
            "finish_reasons": dict(Counter(rows[r["id"]]["finish_reason"] for r in records))}


def main(args: argparse.Namespace) -> int:
    marker, manifest, manifest_path = read_adapter(args.sft_checkpoint)  # exit 3 before anything heavy
    from utils import evaluation as ev
    from utils.provenance_helper import create_session_manifest, sha256_file, sha256_text, write_manifest_atomic

    records = ev.load_test_records(args.test_set)
    base_model = resolve_base_model(args, marker, manifest)
    training_path, training_info = resolve_training_data(args, marker, manifest)
    contamination = ev.check_contamination(records, ev.load_training_instructions(training_path))
    print(f"[eval] {len(records)} test records; contamination: {contamination['n_contaminated']} overlapping "
          f"instruction(s) {contamination['by_kind']}", flush=True)

    from utils.clean_model_loader import CleanModelLoader
    from utils.completion_prompts import CompletionStylePrompts as P
    from utils.generation import GenerationEngine, SamplingParams
    from utils.sft_training import load_adapter

    model, tokenizer, provenance = CleanModelLoader(base_model, dtype=args.dtype,
                                                    allow_instruct_model=args.allow_instruct_model).load()
    identity_check = check_base_identity(provenance, marker)
    params = SamplingParams(temperature=0.0, top_p=1.0, repetition_penalty=1.0, max_new_tokens=args.max_new_tokens)
    adapter_files = {p.name: sha256_file(p) for p in sorted(args.sft_checkpoint.iterdir()) if p.is_file()}
    decoding = {**params.as_dict(), "greedy": True, "stop_strings": P.response_stop_strings(),
                "prompt_version": P.versions["response"], "dtype": provenance.get("dtype")}
    base_identity = {k: provenance.get(k) for k in IDENTITY_KEYS}
    base_key = sha256_text(json.dumps({"base": base_identity, **decoding}, sort_keys=True))[:16]
    sft_key = sha256_text(json.dumps({"base": base_identity, "adapter": adapter_files, **decoding}, sort_keys=True))[:16]
    args.output.mkdir(parents=True, exist_ok=True)
    paths = {name: args.output / f"{name}.jsonl" for name in ("base_responses", "sft_responses")}
    engine = GenerationEngine(model, tokenizer, batch_size=args.batch_size, seed=0, show_progress=not args.no_progress)
    base = generate_responses("base", engine, records, paths["base_responses"], params, base_key)
    engine.model = load_adapter(model, args.sft_checkpoint)
    sft = generate_responses("sft", engine, records, paths["sft_responses"], params, sft_key)

    from utils.test_set import score_response

    pairs = []
    for record in records:  # rescored from the saved cleaned responses, so resumed rows use this code too
        b, s = (score_response(record, side["rows"][record["id"]]["response"]) for side in (base, sft))
        pairs.append({"id": record["id"], "type": record.get("type"), "scored": b["scored"] and s["scored"],
                      "base_success": bool(b["success"]), "sft_success": bool(s["success"])})
    statistics = ev.paired_statistics(pairs, alpha=args.alpha)
    gate = ev.gate_decision(statistics, contamination, args.alpha, args.allow_contamination)
    header = [f"Stage 1 SFT evaluation: {provenance.get('model_id')} vs + adapter {args.sft_checkpoint}",
              f"test set {args.test_set} ({len(records)} records, {statistics['n_scored']} scored); greedy, "
              f"max_new_tokens {args.max_new_tokens}, prompt {P.versions['response']}"]
    summary = ev.format_summary(statistics, gate, contamination, header)
    paths["summary"] = args.output / "evaluation_summary.txt"
    paths["summary"].write_text(summary, encoding="utf-8")
    paths["plot"] = ev.plot_success_rates(statistics, args.output / "success_rates.png",
                                          title=f"base vs SFT adapter ({provenance.get('model_id')})")
    type_counts = Counter(str(r.get("type") or "(none)") for r in records)
    results = create_session_manifest(
        "evaluate_sft", {**vars(args), "base_model_resolved": base_model},
        inputs={"test_set": args.test_set, "training_data": training_path},
        outputs=paths, gate=gate, statistics=statistics, contamination=contamination,
        test_set={"path": str(args.test_set), "sha256": sha256_file(args.test_set), "n_records": len(records),
                  "counts_by_type": dict(type_counts)},
        models={"base": {"requested": base_model, "provenance": provenance},
                "sft": {"adapter_path": str(args.sft_checkpoint),
                        "adapter_weights_sha256": adapter_files.get("adapter_model.safetensors"),
                        "adapter_files_sha256": adapter_files, "training_success": marker,
                        "training_manifest": str(manifest_path) if manifest_path else None,
                        "base_identity_check": identity_check}},
        training_data=training_info, decoding={**decoding, "batch_size": args.batch_size, "seed": 0},
        generation={side: {k: v for k, v in info.items() if k != "rows"} for side, info in (("base", base), ("sft", sft))})
    write_manifest_atomic(args.output / "evaluation_results.json", results)
    print(summary, end="")
    print(f"[eval] results in {args.output}", flush=True)
    return EXIT_OK if gate["passed"] else EXIT_GATE_FAILED


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
