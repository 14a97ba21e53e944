"""Paired base-vs-SFT evaluation: test-set reading, statistics tables, the gate, the train/test
contamination check, the summary text and the success-rate plot.

Statistics (all from `stats`, i.e. statsmodels): per type and overall, n scored, successes, rate and
Wilson 95% CI for each model; McNemar on the paired outcomes (exact binomial when the discordant
pairs b + c < 25, else chi-square with continuity correction; the method is stored with each test);
Cohen's h (positive = SFT ahead); Benjamini-Hochberg over the per-type McNemar p-values at the gate
alpha. Records of a type without a scorer are generated and saved but sit outside every table.

Gate: overall McNemar p < alpha with more SFT-only than base-only successes (c > b), and no
train/test contamination unless it is explicitly allowed.

Any two adapters (`compare`, `COMPARISONS`): with a reference adapter the same statistics run for
each pair of the three models (adapter vs base, adapter vs reference, reference vs base), each a
`compare` of two response sets, the first as the tables' base side; the gate is then the adapter
against the reference.

Contamination rule: a test instruction is contaminated when some SFT training instruction
  exact  is equal to it after `normalize_instruction` (lowercase, words only), or
  near   has Jaccard >= 0.7 of word unigram+bigram `shingles` (candidates from a MinHash
         `NearDuplicateIndex` built on the training set, each confirmed with the exact Jaccard), or
  ngram  shares a run of 8 consecutive normalized words with it (the usual 8-gram
         benchmark-leak test; instructions shorter than 8 words can only match exact/near).
Every match is listed with both ids and texts; the first match per kind per test record is kept.

The adapter under test (`read_adapter`): its TRAINING_SUCCESS marker must parse as an object and
list the sha256 of every adapter file, each of which must still match (exit 3 naming the file),
whether or not the training manifest is still beside it; where that manifest is found it must
parse too. Malformed markers and manifests are refusals (exit 3): they stand for upstream work.

Prompt length rule: an instruction longer than `max_chars` characters is refused while the test set
is read (exit 2, file:line and the limit, before any model loads); once the tokenizer is loaded,
a prompt whose tokens plus max_new_tokens exceed the model's context is refused the same way
(`check_prompt_lengths`), before anything is generated. Nothing is cut.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .dedup import OVERLAP_JACCARD, OVERLAP_NGRAM, OverlapIndex
from .exit_codes import BadInputError, RefusedError
from .jsonl_io import iter_jsonl
from .provenance_helper import model_identity, read_manifest, same_model, sha256_file
from .stats import EXACT_DISCORDANT_THRESHOLD, benjamini_hochberg, cohens_h, mcnemar_test, wilson_ci
from .test_set import TYPES, group_instruction_following, score_response

__all__ = [
    "CONTAMINATION_JACCARD", "CONTAMINATION_NGRAM", "CI_ALPHA", "TrainedAdapter",
    "check_output_folder", "read_adapter", "resolve_base_model", "resolve_training_data", "check_base_identity",
    "load_test_records", "check_prompt_lengths", "load_training_instructions", "model_key", "generate_responses",
    "score_pairs", "check_contamination", "paired_table", "paired_statistics", "constraint_breakdown", "gate_decision", "format_summary",
    "plot_success_rates", "COMPARISONS", "compare",
]

CONTAMINATION_JACCARD = OVERLAP_JACCARD
CONTAMINATION_NGRAM = OVERLAP_NGRAM
CI_ALPHA = 0.05  # the Wilson intervals are 95% whatever the gate alpha
# An evaluation with a reference adapter compares three models pairwise: (first, second) response sets of each
# comparison, the second being the one whose lead McNemar tests; the gate is the adapter against the reference.
COMPARISONS = {"adapter_vs_base": ("base", "sft"), "adapter_vs_reference": ("reference", "sft"),
               "reference_vs_base": ("base", "reference")}


# ---- inputs ---------------------------------------------------------------------------------------
def check_output_folder(output) -> None:
    """--output must be a folder or not exist yet (checked before anything is loaded)."""
    if Path(output).exists() and not Path(output).is_dir():
        raise BadInputError(f"--output {output}: exists and is not a folder")


@dataclass(frozen=True)
class TrainedAdapter:
    """An adapter folder whose files match its TRAINING_SUCCESS marker, and the training manifest
    found for it (None where it was copied away from it)."""

    path: Path
    marker: dict
    manifest: dict | None
    manifest_path: Path | None
    files_sha256: dict


_MARKER_FIELDS = {"training_manifest": str, "model_identity": dict, "dataset_sha256": str, "dataset_path": str}
_MANIFEST_FIELDS = {"args": dict, "dataset": dict, "outputs": dict}


def _refuse_malformed(record: dict, fields: dict, path: Path) -> None:
    for name, kind in fields.items():
        if record.get(name) is not None and not isinstance(record[name], kind):
            raise RefusedError(f"{path}: field {name!r} is {type(record[name]).__name__}, expected {kind.__name__}")


def read_adapter(adapter) -> TrainedAdapter:
    """The adapter and its training records, refused (exit 3) unless every file is as training wrote it."""
    from .sft_training import MARKER_NAME, verify_adapter_files

    adapter = Path(adapter)
    marker_path = adapter / MARKER_NAME
    if not marker_path.is_file():
        raise RefusedError(f"{adapter}: no {MARKER_NAME} marker, so training did not finish there (or this is "
                           "not an adapter folder); run train_stage1_sft.py or pass --sft-checkpoint")
    try:
        marker = read_manifest(marker_path)
    except (OSError, BadInputError) as err:
        raise RefusedError(f"{marker_path}: unreadable {MARKER_NAME} marker ({err})") from None
    _refuse_malformed(marker, _MARKER_FIELDS, marker_path)
    verify_adapter_files(adapter, marker.get("adapter_files_sha256"))
    candidates = [Path(marker["training_manifest"])] if marker.get("training_manifest") else []
    manifest_path = next((p for p in candidates + [adapter.parent / "training_manifest.json"] if p.is_file()), None)
    manifest = None
    if manifest_path is not None:
        try:
            manifest = read_manifest(manifest_path)
        except (OSError, BadInputError) as err:
            raise RefusedError(f"{manifest_path}: unreadable training manifest ({err})") from None
        _refuse_malformed(manifest, _MANIFEST_FIELDS, manifest_path)
        files = marker["adapter_files_sha256"]  # verified above: these are the files on disk
        for role, entry in (manifest.get("outputs") or {}).items():
            if role.startswith("adapter_"):
                name = Path(str(entry.get("path") if isinstance(entry, dict) else entry)).name
                if not isinstance(entry, dict) or files.get(name) != entry.get("sha256"):
                    raise RefusedError(f"{adapter / name}: not the file {manifest_path} records as {role} (sha256 differs)")
    return TrainedAdapter(adapter, marker, manifest, manifest_path, dict(marker["adapter_files_sha256"]))


def resolve_base_model(requested: str | None, adapter: TrainedAdapter) -> str | None:
    """--base-model, else the model the training manifest names (None = the bundled one)."""
    if requested is not None:
        return requested
    if adapter.manifest is not None and "model" in (adapter.manifest.get("args") or {}):
        return adapter.manifest["args"]["model"]
    identity = adapter.marker.get("model_identity") or {}
    if identity.get("source") == "bundled":
        return None
    if identity.get("source") in ("local", "hub") and identity.get("model_id"):
        return identity["model_id"]
    raise RefusedError(f"{adapter.path}: cannot tell which base model the adapter was trained on (no training "
                       "manifest); pass --base-model")


def resolve_training_data(requested: Path | None, adapter: TrainedAdapter) -> tuple[Path, dict]:
    """The SFT data for the contamination check: --training-data, else the recorded file (which
    must still hash as recorded, exit 3 otherwise)."""
    dataset = (adapter.manifest or {}).get("dataset") or {}
    recorded_sha = adapter.marker.get("dataset_sha256") or dataset.get("sha256")
    path = requested
    if path is None:
        recorded = adapter.marker.get("dataset_path") or dataset.get("path")
        if not recorded or not Path(recorded).is_file():
            raise RefusedError(f"the SFT training data recorded for the adapter ({recorded}) is not here, so the "
                               "contamination check cannot run; pass --training-data")
        path = Path(recorded)
    elif not path.is_file():
        raise BadInputError(f"--training-data {path}: file not found")
    sha = sha256_file(path)
    if requested is None and recorded_sha and sha != recorded_sha:
        raise RefusedError(f"{path} changed since the adapter was trained on it (sha256 {sha[:12]}... != {recorded_sha[:12]}...)")
    if recorded_sha and sha != recorded_sha:
        print(f"[eval] warning: --training-data {path} is not the file the adapter was trained on (sha256 differs)", file=sys.stderr)
    return path, {"path": str(path), "sha256": sha, "recorded_sha256": recorded_sha, "matches_recorded": sha == recorded_sha}


def check_base_identity(provenance: dict, marker: dict) -> dict:
    """Refuse (exit 3) a base model other than the one the adapter was trained on, by content
    hashes (`same_model`), whatever name or path it was loaded by."""
    trained = marker.get("model_identity")
    if not isinstance(trained, dict):
        raise RefusedError("the adapter's TRAINING_SUCCESS records no base model identity; cannot check the base model")
    if not same_model(trained, provenance):
        loaded = model_identity(provenance)
        differing = [key for key in ("file_sha256", "weights_fingerprint", "revision", "tokenizer_sha256")
                     if trained.get(key) != loaded[key]]
        raise RefusedError(f"the base model loaded ({loaded['model_id']}) is not the one the adapter was trained on "
                           f"({trained.get('model_id')}): {', '.join(differing) or 'model id'} differ")
    return {"rule": "same_model (content hashes)", "trained_on": model_identity(trained), "matches": True}


def load_test_records(path, max_chars: int | None = None) -> list[dict]:
    """Records with a non-empty `instruction`; `id` defaults to "line-<n>" (ids kept as strings),
    and `_line` keeps the line for later messages.

    Duplicate ids, a missing instruction, an instruction over `max_chars` characters or a known
    type without its scorer metadata is bad input naming file:line (exit 2).
    """
    if Path(path).is_dir():
        raise BadInputError(f"{path}: is a folder, expected a JSONL file")
    records, lines = [], {}
    for line, record in iter_jsonl(path):
        instruction = record.get("instruction")
        if not isinstance(instruction, str) or not instruction.strip():
            raise BadInputError(f"{path}:{line}: missing or empty 'instruction' field")
        if max_chars is not None and len(instruction) > max_chars:
            raise BadInputError(f"{path}:{line}: instruction is {len(instruction):,} characters, over the limit of "
                                f"{max_chars:,} (--max-instruction-chars)")
        record = {**record, "id": str(record.get("id", f"line-{line}")), "_line": line}
        if record["id"] in lines:
            raise BadInputError(f"{path}:{line}: duplicate id {record['id']!r} (first on line {lines[record['id']]})")
        lines[record["id"]] = line
        try:
            score_response(record, "probe")  # a known type without its metadata fails here, not mid-run
        except BadInputError as err:
            raise BadInputError(f"{path}:{line}: {err}") from None
        records.append(record)
    if not records:
        raise BadInputError(f"{path}: no records")
    return records


def check_prompt_lengths(records: list[dict], tokenizer, model, max_new_tokens: int, source) -> dict:
    """Refuse (exit 2, file:line) a test prompt that with max_new_tokens exceeds the model's context."""
    from .completion_prompts import CompletionStylePrompts
    from .generation import check_prompts_fit, context_length
    from .prompt_guards import encode_prompt

    encoded = []
    for record in records:
        where = f"{source}:{record['_line']} (id {record['id']})"
        try:  # the prompt guards refuse e.g. a chat-control token; name the record they refused
            encoded.append((where, encode_prompt(tokenizer, CompletionStylePrompts.create_response_prompt(record["instruction"]))))
        except BadInputError as err:
            raise BadInputError(f"{where}: {err}") from None
    limit = context_length(model)
    check_prompts_fit(encoded, max_new_tokens, limit)
    return {"context_tokens": limit, "longest_prompt_tokens": max(len(ids) for _, ids in encoded),
            "max_new_tokens": max_new_tokens}


def load_training_instructions(path) -> list[dict]:
    """[{id, instruction}] of an SFT dataset; ids default to "line-<n>"."""
    rows = []
    for line, record in iter_jsonl(path):
        if not isinstance(record.get("instruction"), str):
            raise BadInputError(f"{path}:{line}: missing 'instruction' field")
        rows.append({"id": str(record.get("id", f"line-{line}")), "instruction": record["instruction"]})
    return rows


def model_key(provenance: dict) -> dict:
    """The base model's part of a response file's generation key: `model_identity` without the name
    where content hashes decide (as in `same_model`), so the same weights by another path match."""
    identity = model_identity(provenance)
    if identity["file_sha256"] or identity["weights_fingerprint"]:
        identity.pop("model_id")
        identity.pop("source")
    return identity


def generate_responses(label: str, engine, records: list[dict], path, params, generation_key: str,
                       answer_end: str = "block") -> dict:
    """Append `label` responses for records not yet in `path`; refuses a file made with other settings.
    `answer_end`: where an answer ends (completion_prompts.ANSWER_ENDS)."""
    from .completion_prompts import CompletionStylePrompts as P
    from .jsonl_io import JsonlAppender
    from .records import EvaluationResponseRecord

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
            cleaned = P.clean_response(result.text, answer_end=answer_end)
            row = EvaluationResponseRecord(
                id=record["id"], type=record.get("type"), instruction=record["instruction"], raw_response=result.text,
                response=cleaned.text, was_cut=cleaned.was_cut, finish_reason=result.finish_reason,
                n_generated_tokens=result.n_generated_tokens, score=score_response(record, cleaned.text),
                prompt_version=P.versions["response"])
            appender.append({**row.to_dict(), "model": label, "generation_key": generation_key})

        items = [(r["id"], P.create_response_prompt(r["instruction"])) for r in pending]
        engine.generate(items, params, P.response_stop_strings(answer_end=answer_end), on_result=save,
                        description=f"{label} responses")
        rows = {row["id"]: row for row in appender.records if row["id"] in by_id}
    return {"rows": rows, "generated_now": len(pending), "seconds": round(time.time() - start, 2),
            "finish_reasons": dict(Counter(rows[r["id"]]["finish_reason"] for r in records))}


def score_pairs(records: list[dict], base_rows: dict, sft_rows: dict) -> list[dict]:
    """Paired outcomes, rescored from the saved cleaned responses (so resumed rows use this code too)."""
    pairs = []
    for record in records:
        base, sft = (score_response(record, rows[record["id"]]["response"]) for rows in (base_rows, sft_rows))
        pairs.append({"id": record["id"], "type": record.get("type"), "scored": base["scored"] and sft["scored"],
                      "base_success": bool(base["success"]), "sft_success": bool(sft["success"])})
    return pairs


# ---- statistics and the gate --------------------------------------------------------------------
def check_contamination(test_records: list[dict], training_records: list[dict],
                        threshold: float = CONTAMINATION_JACCARD, ngram: int = CONTAMINATION_NGRAM) -> dict:
    """Every test instruction against every training instruction (see the module docstring)."""
    index = OverlapIndex(training_records, threshold, ngram)
    overlaps = []
    for record in test_records:
        matches = [{"kind": m.pop("kind"), "training_id": m.pop("id"), **m} for m in index.matches(record["instruction"])]
        for match in matches:
            match["training_instruction"] = index.texts[match["training_id"]]
        if matches:
            overlaps.append({"test_id": record["id"], "test_instruction": record["instruction"], "matches": matches})
    kinds = Counter(m["kind"] for o in overlaps for m in o["matches"])
    return {"rule": f"exact after normalize_instruction, or Jaccard(shingles) >= {threshold}, or a shared "
                    f"{ngram}-gram of normalized words", "jaccard_threshold": threshold, "ngram": ngram,
            "n_test": len(test_records), "n_training": len(training_records), "found": bool(overlaps),
            "n_contaminated": len(overlaps), "by_kind": {k: kinds.get(k, 0) for k in ("exact", "near", "ngram")},
            "overlaps": overlaps}


def _side(successes: int, n: int) -> dict:
    low, high = wilson_ci(successes, n, alpha=CI_ALPHA)
    return {"successes": successes, "rate": successes / n, "ci95": [low, high]}


def paired_table(base: list[bool], sft: list[bool]) -> dict:
    """One row of the report from paired outcomes (index i = the same test record)."""
    n = len(base)
    if n == 0:
        raise BadInputError("paired_table: no scored pairs")
    base_side, sft_side = _side(sum(map(bool, base)), n), _side(sum(map(bool, sft)), n)
    return {"n_scored": n, "base": base_side, "sft": sft_side, "difference": sft_side["rate"] - base_side["rate"],
            "mcnemar": mcnemar_test(base, sft), "cohens_h": cohens_h(sft_side["rate"], base_side["rate"])}


def paired_statistics(pairs: list[dict], alpha: float) -> dict:
    """`pairs`: [{id, type, scored, base_success, sft_success}] -> overall, per-type and BH tables."""
    scored = [p for p in pairs if p["scored"]]
    types = [t for t in TYPES if any(p["type"] == t for p in scored)]
    types += sorted({p["type"] for p in scored} - set(types), key=str)
    per_type = {t: paired_table([p["base_success"] for p in scored if p["type"] == t],
                                [p["sft_success"] for p in scored if p["type"] == t]) for t in types}
    bh = benjamini_hochberg([per_type[t]["mcnemar"]["p_value"] for t in types], alpha=alpha)
    for t, adjusted, reject in zip(types, bh["adjusted"], bh["reject"], strict=True):
        per_type[t].update(bh_adjusted_p=adjusted, bh_reject=reject)
    unscored = [p for p in pairs if not p["scored"]]
    return {
        "overall": paired_table([p["base_success"] for p in scored], [p["sft_success"] for p in scored]) if scored else None,
        "per_type": per_type,
        "multiple_comparisons": {"method": "benjamini_hochberg", "family": "per-type McNemar p-values", "alpha": alpha,
                                 "types": types, "raw_p": [per_type[t]["mcnemar"]["p_value"] for t in types], **bh},
        "mcnemar_method_rule": f"exact binomial when b + c < {EXACT_DISCORDANT_THRESHOLD}, else chi-square with "
                               "continuity correction (statsmodels)",
        "ci": "Wilson score interval, 95%",
        "n_records": len(pairs), "n_scored": len(scored),
        "unscored": {"n": len(unscored), "by_type": dict(Counter(str(p["type"] or "(none)") for p in unscored)),
                     "ids": [p["id"] for p in unscored]},
    }


def compare(records: list[dict], rows: dict, first: str, second: str, alpha: float, contamination: dict | None,
            allow_contamination: bool, labels: tuple[str, str]) -> dict:
    """One paired comparison of two response sets (`rows[first]`, `rows[second]`: id -> response row):
    its statistics (the first is the statistics' "base" side, the second its "sft" side), constraint
    breakdown and gate, and the labels naming the two."""
    pairs = score_pairs(records, rows[first], rows[second])
    statistics = paired_statistics(pairs, alpha=alpha)
    statistics["constraint_families"] = constraint_breakdown(records, pairs)
    gate = gate_decision(statistics, contamination, alpha, allow_contamination, labels=labels)
    return {"labels": list(labels), "statistics": statistics, "gate": gate}


def constraint_breakdown(records: list[dict], pairs: list[dict]) -> dict | None:
    """instruction_following split into trained and held-out constraint families (each a paired table),
    plus per-family counts; None when the test set has no constrained records.

    Held-out families never reach the training data, so their row measures whether following a rule
    generalises to rules never trained on. Reported whatever it shows; not part of the gate.
    """
    outcomes = {p["id"]: (p["base_success"], p["sft_success"]) for p in pairs if p["scored"] and p["type"] == "instruction_following"}
    constrained = [r for r in records if r.get("type") == "instruction_following" and r.get("constraint_split")]
    if not constrained or not outcomes:
        return None
    groups = group_instruction_following(constrained, outcomes)

    def table(rows: list[tuple[bool, bool]]) -> dict | None:
        return paired_table([b for b, _ in rows], [s for _, s in rows]) if rows else None

    return {"by_split": {split: table(rows) for split, rows in groups["by_split"].items()},
            "by_family": {family: {"n": len(rows), "base_successes": sum(b for b, _ in rows),
                                   "sft_successes": sum(s for _, s in rows)}
                          for family, rows in groups["by_family"].items()},
            "note": "a record with two constraints counts for both families, with its all-constraints outcome"}


def gate_decision(statistics: dict, contamination: dict | None, alpha: float, allow_contamination: bool,
                  labels: tuple[str, str] = ("base", "SFT")) -> dict:
    """Pass iff overall McNemar p < alpha in favour of the second model (the statistics' "sft" side:
    the adapter under test) and no disallowed contamination. `labels` name the two sides in the reasons."""
    first, second = labels
    reasons, overall = [], statistics.get("overall")
    if overall is None:
        reasons.append("no scored records: nothing to test")
    else:
        test = overall["mcnemar"]
        if test["favours"] != "sft":
            reasons.append(f"{second} is not ahead ({first}-only b={test['b']}, {second}-only c={test['c']})")
        if not test["p_value"] < alpha:
            reasons.append(f"overall McNemar p={test['p_value']:.4g} ({test['method']}) is not < alpha {alpha}")
    if contamination is None:
        reasons.append("contamination check not run")
    elif contamination["found"] and not allow_contamination:
        ids = ", ".join(o["test_id"] for o in contamination["overlaps"][:20])
        reasons.append(f"train/test contamination: {contamination['n_contaminated']} test instruction(s) overlap the "
                       f"SFT training data ({ids}{', ...' if contamination['n_contaminated'] > 20 else ''})")
    return {"passed": not reasons, "alpha": alpha, "allow_contamination": allow_contamination, "reasons": reasons,
            "compared": {"first": first, "second": second},
            "rule": f"overall McNemar p < alpha with {second}-only successes > {first}-only successes, and no train/test "
                    "contamination unless --allow-contamination"}


def _fmt_side(side: dict, n: int) -> str:
    low, high = side["ci95"]
    return f"{side['successes']:>3}/{n:<3} {side['rate']:6.1%} [{low:5.1%},{high:6.1%}]"


def _comparison_lines(statistics: dict, labels: tuple[str, str]) -> list[str]:
    """The per-type table (and the constraint-family breakdown) of one paired comparison; `labels` name
    its two sides (the statistics call them base and sft)."""
    first, second = labels
    columns = f"{'type':<22} {first:<27} {second:<27} {'b':>3} {'c':>3} {'p (McNemar)':>12} {'method':<8} {'p BH':>8} {'h':>6}"
    lines = ["", columns, "-" * len(columns)]
    rows = [(t, row) for t, row in statistics["per_type"].items()] + [("OVERALL", statistics["overall"])]
    for name, row in rows:
        if row is None:
            lines.append(f"{name:<22} (no scored records)")
            continue
        test, n = row["mcnemar"], row["n_scored"]
        method = "exact" if test["method"] == "exact_binomial" else "chi2cc"
        bh = f"{row['bh_adjusted_p']:8.4f}" if "bh_adjusted_p" in row else f"{'-':>8}"
        lines.append(f"{name:<22} {_fmt_side(row['base'], n):<27} {_fmt_side(row['sft'], n):<27} {test['b']:>3} "
                     f"{test['c']:>3} {test['p_value']:12.4g} {method:<8} {bh} {row['cohens_h']:6.3f}")
    breakdown = statistics.get("constraint_families")
    if breakdown:
        lines += ["", "instruction_following by constraint family split (held-out families never reach training):"]
        for split, row in breakdown["by_split"].items():
            if row is None:
                lines.append(f"  {split:<20} (no scored records)")
                continue
            test, n = row["mcnemar"], row["n_scored"]
            lines.append(f"  {split:<20} {_fmt_side(row['base'], n):<27} {_fmt_side(row['sft'], n):<27} {test['b']:>3} "
                         f"{test['c']:>3} {test['p_value']:12.4g}")
        lines.append(f"  per family ({first} / {second} successes of n): " + ", ".join(
            f"{family} {row['base_successes']}/{row['sft_successes']} of {row['n']}" for family, row in breakdown["by_family"].items()))
    return lines


def _three_way_lines(comparisons: dict) -> list[str]:
    """One row per type: the three success rates and the three McNemar p-values (from `comparisons`)."""
    adapter_vs_base, adapter_vs_reference, reference_vs_base = (comparisons[k]["statistics"] for k in COMPARISONS)
    columns = (f"{'type':<22} {'base':>7} {'reference':>9} {'adapter':>8} {'p adapter-ref':>14} {'p adapter-base':>15} "
               f"{'p ref-base':>11}")
    lines = ["", "three-way (success rates; McNemar p per pair of models):", columns, "-" * len(columns)]
    names = list(adapter_vs_base["per_type"]) + ["OVERALL"]
    for name in names:
        rows = [stats["overall"] if name == "OVERALL" else stats["per_type"].get(name)
                for stats in (adapter_vs_base, adapter_vs_reference, reference_vs_base)]
        if any(row is None for row in rows):
            continue
        lines.append(f"{name:<22} {rows[0]['base']['rate']:7.1%} {rows[1]['base']['rate']:9.1%} {rows[0]['sft']['rate']:8.1%} "
                     f"{rows[1]['mcnemar']['p_value']:14.4g} {rows[0]['mcnemar']['p_value']:15.4g} {rows[2]['mcnemar']['p_value']:11.4g}")
    return lines


def format_summary(statistics: dict, gate: dict, contamination: dict | None, header: list[str] = (),
                   comparisons: dict | None = None) -> str:
    """The human-readable report written to evaluation_summary.txt. With `comparisons` (an evaluation
    with a reference adapter: `COMPARISONS` -> {"statistics", "labels"}) the three-way table comes
    first, then each comparison's table."""
    lines = list(header)
    if comparisons:
        lines += _three_way_lines(comparisons)
        for key in COMPARISONS:
            labels = tuple(comparisons[key]["labels"])
            lines += ["", f"{labels[1]} vs {labels[0]}:"] + _comparison_lines(comparisons[key]["statistics"], labels)
    else:
        lines += _comparison_lines(statistics, ("base", "sft"))
    unscored = statistics["unscored"]
    sides = "b = successes of the first model only, c = of the second only" if comparisons else "b = base-only successes, c = SFT-only successes"
    lines += ["", f"rates with Wilson 95% CIs; {sides}; "
                  f"{statistics['mcnemar_method_rule']}; BH = Benjamini-Hochberg over the per-type tests; h = Cohen's h",
              f"unscored records (no scorer for their type; generated and saved): {unscored['n']} {unscored['by_type'] or ''}"]
    if contamination is not None:
        lines.append(f"contamination ({contamination['rule']}): {contamination['n_contaminated']} of "
                     f"{contamination['n_test']} test instructions vs {contamination['n_training']} training instructions")
        for overlap in contamination["overlaps"]:
            for match in overlap["matches"]:
                lines.append(f"  {overlap['test_id']} [{match['kind']}] {overlap['test_instruction']!r} ~ "
                             f"{match['training_id']} {match['training_instruction']!r}")
    lines += ["", f"GATE {'PASSED' if gate['passed'] else 'FAILED'} ({gate['rule']}; alpha {gate['alpha']})"]
    lines += [f"  - {reason}" for reason in gate["reasons"]]
    return "\n".join(lines) + "\n"


def plot_success_rates(statistics: dict, path, title: str = "Stage 1 SFT evaluation", reference_statistics: dict | None = None) -> Path:
    """Grouped bars per type (and overall): base vs SFT success rate with Wilson 95% error bars; with
    `reference_statistics` (reference adapter vs base) a third bar, the reference adapter, between them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(statistics["per_type"].items()) + ([("overall", statistics["overall"])] if statistics["overall"] else [])
    bars = [("base", [row["base"] for _, row in rows], "#8c8c8c")]
    if reference_statistics is not None:
        reference = {**reference_statistics["per_type"], "overall": reference_statistics["overall"]}
        bars.append(("base + reference adapter", [reference[name]["sft"] for name, _ in rows], "#ff7f0e"))
    bars.append(("base + SFT adapter" if reference_statistics is None else "base + adapter", [row["sft"] for _, row in rows], "#1f77b4"))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(rows) + 2), 4.5))
    width = 0.76 / len(bars)
    for index, (label, sides, colour) in enumerate(bars):
        offset = (index - (len(bars) - 1) / 2) * width
        rates = [side["rate"] for side in sides]
        errors = [[side["rate"] - side["ci95"][0] for side in sides], [side["ci95"][1] - side["rate"] for side in sides]]
        ax.bar([i + offset for i in range(len(rows))], rates, width, yerr=errors, capsize=4, color=colour, label=label)
    ax.set_xticks(range(len(rows)), [f"{name}\n(n={row['n_scored']})" for name, row in rows], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("success rate (Wilson 95% CI)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
