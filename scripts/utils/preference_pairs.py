"""Stage 2 preference pairs: fresh instructions, the Stage 1 adapter's own candidates, pairs formed by
signals that discriminate on this model, QC and the gate.

Phases (each appends typed records, `utils.records`, to its own JSONL in the output folder, keyed by
id, so a killed run resumes where it stopped without duplicates):

1-2 the base model writes instructions and the Stage 1 filters, duplicate removal and instruction
    critic keep the good ones (`stage1_generation`'s phase functions, the pilot's settings, Stage 2's
    own seed and `st2-` ids), in rounds until `num_instructions` are selected;
3   each accepted instruction is checked against the Stage 1 training instructions and the held-out
    test set (the evaluation's overlap rule, `dedup.OverlapIndex`): an overlapping one is recorded as
    excluded and never answered; a seeded fraction of the rest gets one or two constraints of the
    trained families, drawn as Stage 1 draws them for an answer not written yet
    (`constraint_data.generated_constraints`);
4   the Stage 1 adapter samples `num_candidates` answers per instruction from the bare prompt (as
    training and evaluation prompt it), cleaned as the evaluation cleans; the base model scores each
    (`response_selection.score_candidates`: cheap filters, constraint checks, A/B and likelihood
    relevance with the adapter disabled, since the pilot's probe proved the signals on the base model);
5   (`corrupted_pairs`) for a constrained instruction, its best passing candidate copied with one
    constraint broken by a minimal rule-based edit (`corrupt_response`), scored like a candidate;
6   pairs, at most one per instruction and source:
      checker    a candidate that passes every constraint against one that fails some (both clean);
      signal     two clean candidates (both passing any constraints) ranked by a signal the pilot's
                 probe trusted, at least `min_signal_margin` apart;
      corrupted  the passing candidate against its corrupted copy.
    Among the qualifying (chosen, rejected) choices the one closest in length wins (then the larger
    margin): a preference that is only "longer" (or "shorter") is a known failure of DPO data.

"Clean" is passing the cheap filters other than a failed constraint (`CLEAN_FILTERS`): not empty, no
chat marker, not runaway, not cut by the token limit, no leaked delimiter. A pair thus differs in
what its source measures, not in a formatting accident.

QC (`pair_qc`): pairs per source, the margin distribution per source, the chosen/rejected token
length ratio (median, bounded on both sides), the share of pairs whose chosen side is longer, and
duplicates (exact (instruction, chosen, rejected) repeats are removed before the dataset is written;
the gate re-counts them in what is written). The gate: enough pairs, the median length ratio inside
its bounds, no duplicate and no pair whose sides are equal.
"""

from __future__ import annotations

import difflib
import math
import re
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .completion_prompts import CompletionStylePrompts
from .constraint_data import generated_constraints, selected_for_constraints
from .constraints import TRAINED_FAMILIES, check_all, count_words, from_record, split_sentences
from .jsonl_io import JsonlAppender
from .records import PreferenceInstructionRecord, PreferencePairRecord, ResponseRecord, unique_by_id
from .response_selection import CriticSignals, candidate_key, score_candidates

__all__ = ["PHASE_FILES", "PAIRS_FILE", "MANIFEST_FILE", "KEY_PREFIX", "SOURCES", "DEFAULT_SIGNALS", "CLEAN_FILTERS",
           "PAIR_QC_THRESHOLDS", "CORRUPTION_VERSION", "Stage2Config", "exclusion_index", "Corruption", "corrupt_response",
           "checker_pair", "signal_pair", "corrupted_pair", "dedupe_pairs", "pair_qc", "format_pair_qc", "run_stage2_generation"]

PHASE_FILES = {"candidates": "phase1_candidates.jsonl", "instructions": "phase2_instructions.jsonl",
               "selected": "phase3_selected_instructions.jsonl", "responses": "phase4_responses.jsonl",
               "scored": "phase4_scored_responses.jsonl", "corrupted_responses": "phase5_corrupted_responses.jsonl",
               "corrupted_scored": "phase5_corrupted_scored.jsonl", "pairs": "phase6_pairs.jsonl"}
PAIRS_FILE = "preference_pairs.jsonl"
MANIFEST_FILE = "session_manifest.json"
KEY_PREFIX = "st2-"  # Stage 2 ids never read as a Stage 1 pilot ("r..") or shard ("s000-") id
SOURCES = ("checker", "signal", "corrupted")
# Signals asked for by default; each forms pairs only where the pilot's probe trusted it.
DEFAULT_SIGNALS = ("relevance_total", "ab_margin")
CLEAN_FILTERS = ("empty_response", "chat_marker", "runaway", "token_limit", "delimiter_leak")
PAIR_QC_THRESHOLDS = {"min_pairs": 20, "max_length_ratio": 1.5, "min_length_ratio": round(1 / 1.5, 4)}
CORRUPTION_VERSION = "rule_corruption_v1"


@dataclass
class Stage2Config:
    """Every setting of a Stage 2 pair run (the manifest's `config`, and the folder's run identity)."""

    seed: int
    num_instructions: int
    num_candidates: int
    instruction_settings: dict  # stage1_generation.Stage1Config.as_dict(): the pilot's, with Stage 2's count and seed
    response: dict  # generation.SamplingParams.as_dict() of the candidates
    constraint_fraction: float
    constraint_families: list = field(default_factory=lambda: list(TRAINED_FAMILIES))
    signals: list = field(default_factory=lambda: list(DEFAULT_SIGNALS))
    min_signal_margin: float = 1.0
    corrupted_pairs: bool = False
    qc_thresholds: dict = field(default_factory=lambda: dict(PAIR_QC_THRESHOLDS))
    answer_end: str = "block"  # completion_prompts.ANSWER_ENDS: the Stage 1 adapter writes paragraphs

    def as_dict(self) -> dict:
        return asdict(self)


# -- phase 3: fresh instructions, checked and constrained -----------------------------------------
def exclusion_index(training_records: list[dict], test_records: list[dict]):
    """The overlap rule (exact, near, shared 8-gram) over the Stage 1 training instructions (with the
    task of a constrained one) and the test instructions; match ids say which (`train:` / `test:`)."""
    from .dedup import OverlapIndex

    rows = [{"id": f"test:{r['id']}", "instruction": r["instruction"]} for r in test_records]
    for record in training_records:
        rows.append({"id": f"train:{record['id']}", "instruction": record["instruction"]})
        if record.get("original_instruction"):
            rows.append({"id": f"train:{record['id']}:task", "instruction": record["original_instruction"]})
    return OverlapIndex(rows)


def _select_instructions(files: dict, keys, config: Stage2Config, exclusion) -> None:
    wanted = set(keys)
    for record in sorted(_records(files["instructions"]), key=lambda r: r["id"]):
        key = record["id"]
        if key not in wanted or not record["accepted"] or key in files["selected"]:
            continue
        overlaps = exclusion.matches(record["instruction"])
        instruction, constraints = record["instruction"], []
        if not overlaps and selected_for_constraints(config.seed, key, config.constraint_fraction):
            # Stage 1's draw for an answer not written yet: fresh parameters, one or two rules, seeded by the id.
            built = generated_constraints(config.seed, key, record["instruction"], config.constraint_families)
            if built is not None:
                instruction, constraints = built
        files["selected"].append(PreferenceInstructionRecord(
            id=key, round=record["round"], task=record["instruction"], instruction=instruction, constraints=constraints,
            excluded=bool(overlaps), overlaps=overlaps).to_dict())


def _usable(files: dict, before_round: int | None = None) -> list[dict]:
    rows = [r for r in _records(files["selected"]) if not r["excluded"]]
    if before_round is not None:
        rows = [r for r in rows if r["round"] < before_round]
    return sorted(rows, key=lambda r: r["id"])


def _instruction_rounds(engine, critic, files: dict, config: Stage2Config, exclusion) -> None:
    """Stage 1's phases 1-2 in rounds, then the exclusion check, until enough instructions are usable;
    a round's size depends only on earlier rounds, so a resumed run asks for the same keys."""
    from .stage1_generation import config_from_dict, filter_and_judge_instructions, generate_instruction_candidates

    settings = config_from_dict(config.instruction_settings)
    for round_index in range(settings.max_rounds):
        before = len(_usable(files, round_index))
        need = config.num_instructions - before
        if need <= 0:
            return
        earlier = sum(r["round"] < round_index for r in _records(files["candidates"]))
        factor = settings.first_round_oversample if round_index == 0 else 1.25 / max(before / earlier if earlier else 0.0, 0.1)
        keys = [f"{KEY_PREFIX}r{round_index:02d}-{i:05d}" for i in range(max(1, math.ceil(need * factor)))]
        generate_instruction_candidates(engine, files["candidates"], keys, round_index, settings)
        filter_and_judge_instructions(critic, files, keys, settings)
        _select_instructions(files, keys, config, exclusion)


# -- phase 4: the Stage 1 adapter's candidates ----------------------------------------------------
def _generate_candidates(engine, tokenizer, files: dict, instructions: list[dict], config: Stage2Config) -> None:
    from .generation import SamplingParams
    from .prompt_guards import encode_continuation

    prompts = CompletionStylePrompts
    owner, todo = {}, []
    for record in instructions:
        prompt = prompts.create_response_prompt(record["instruction"])
        for index in range(config.num_candidates):
            key = candidate_key(record["id"], index)
            owner[key] = (record, index)
            if key not in files["responses"]:
                todo.append((key, prompt))

    def save(result) -> None:
        record, index = owner[result.key]
        cleaned = prompts.clean_response(result.text, answer_end=config.answer_end)
        n_tokens = len(encode_continuation(tokenizer, prompts.format_completion(cleaned.text))) if cleaned.text else 0
        files["responses"].append(ResponseRecord(
            id=result.key, instruction_id=record["id"], candidate_index=index, round=record["round"],
            instruction=record["instruction"], raw_response=result.text, response=cleaned.text, was_cut=cleaned.was_cut,
            finish_reason=result.finish_reason, n_generated_tokens=result.n_generated_tokens, n_response_tokens=n_tokens,
            prompt_version=prompts.versions["response"]).to_dict())

    engine.generate(todo, SamplingParams(**config.response), prompts.response_stop_strings(answer_end=config.answer_end), on_result=save,
                    description="stage 2 candidates")


# -- phase 5: rule-corrupted copies ---------------------------------------------------------------
@dataclass(frozen=True)
class Corruption:
    text: str
    operation: str
    broken: list[str]  # the families the copy fails (one, where an edit could keep the others)


def _sentences(text: str) -> list[str]:
    return [s for s in split_sentences(text) if s in text]


def _drop(text: str, piece: str, last: bool = False) -> str:
    at = text.rfind(piece) if last else text.find(piece)
    return re.sub(r"[ \t]{2,}", " ", (text[:at] + text[at + len(piece):]).strip()) if at >= 0 else text


def _without_prefix(text: str, prefix: str) -> str | None:
    head = text[:len(prefix)]
    return text[len(prefix):].lstrip(" \t\n:,.-").strip() if head.casefold() == prefix.casefold() else None


def _without_suffix(text: str, suffix: str) -> str | None:
    body = text.rstrip()
    return body[:-len(suffix)].rstrip() if suffix and body[-len(suffix):].casefold() == suffix.casefold() else None


def _json_unwrapped(text: str) -> str:
    import json

    try:
        value = json.loads(text)
    except ValueError:
        return text[:-1]
    strings = [v for v in value.values() if isinstance(v, str)] if isinstance(value, dict) else []
    return strings[0] if len(strings) == 1 else text[:-1]


def _repeat_past(text: str, sentences: list[str], limit: int) -> str:
    longer, k = text, 0
    while count_words(longer) <= limit and k < 1000:
        longer, k = f"{longer} {sentences[k % len(sentences)]}", k + 1
    return longer


def _drop_below(text: str, sentences: list[str], limit: int) -> str:
    for sentence in reversed(sentences[1:]):
        if count_words(text) < limit:
            break
        text = _drop(text, sentence, last=True)
    return text


def _family_edits(family: str, params: dict, text: str) -> list[tuple[str, str | None]]:
    """Edits aimed at one family's rule, each leaving a fluent answer that simply ignores the rule (its
    request dropped, its mark changed, a comma added); the checkers decide whether each broke it."""
    sentences = _sentences(text)
    first = re.match(r"\s*\S+\s*", text)
    paragraphs = re.split(r"\n\s*\n", text.strip(), maxsplit=1)
    postscript = re.search(r"\n\s*P\.[ \t]?S\..*\Z", text, flags=re.IGNORECASE | re.DOTALL)
    without_last_line = "\n".join(text.rstrip().split("\n")[:-1]).rstrip()
    edits = {
        "words_max": lambda: [("repeat_sentences_past_the_limit", _repeat_past(text, sentences, params["max_words"]) if sentences else None)],
        "words_min": lambda: [("drop_sentences_below_the_minimum", _drop_below(text, sentences, params["min_words"]))],
        "sentences_exact": lambda: [("drop_last_sentence", _drop(text, sentences[-1], last=True) if len(sentences) > 1 else None),
                                    ("repeat_last_sentence", f"{text.rstrip()} {sentences[-1]}" if sentences else None)],
        "paragraphs": lambda: [("merge_first_two_paragraphs", " ".join(paragraphs) if len(paragraphs) > 1 else None),
                               ("split_after_first_sentence", text.replace(sentences[0], sentences[0] + "\n\n", 1).replace("\n\n ", "\n\n")
                                if len(sentences) > 1 else None)],
        "bullet_items": lambda: [("drop_last_item", without_last_line)],
        "numbered_items": lambda: [("drop_last_item", without_last_line)],
        "lowercase": lambda: [("capitalise_first_letter", re.sub(r"[a-z]", lambda m: m.group(0).upper(), text, count=1))],
        "uppercase": lambda: [("lowercase_first_word", first.group(0).lower() + text[first.end():] if first else None)],
        "no_commas": lambda: [("comma_after_first_word", first.group(0).rstrip() + ", " + text[first.end():] if first else None)],
        "end_mark": lambda: [("change_end_mark", text.rstrip().rstrip(".!?") + ("!" if params["mark"] != "!" else "."))],
        "keyword_include": lambda: [("remove_keywords", re.sub(r"[ \t]{2,}", " ", re.sub(
            "|".join(rf"\b{re.escape(w)}\b" for w in params["keywords"]), "", text, flags=re.IGNORECASE)))],
        "keyword_forbid": lambda: [("insert_forbidden_word", first.group(0).rstrip() + f" {params['forbidden'][0]} " + text[first.end():]
                                    if first else None)],
        "first_word": lambda: [("drop_first_word", text[first.end():][:1].upper() + text[first.end():][1:] if first else None)],
        "start_phrase": lambda: [("drop_start_phrase", _without_prefix(text, params["phrase"]))],
        "end_phrase": lambda: [("drop_end_phrase", _without_suffix(text, params["phrase"]))],
        "json_object": lambda: [("unwrap_json", _json_unwrapped(text.strip()))],
        "quoted": lambda: [("remove_quotes", text.strip()[1:-1])],
        "title": lambda: [("drop_title_line", "\n".join(text.lstrip().split("\n")[1:]))],
        "postscript": lambda: [("drop_postscript", text[:postscript.start()] if postscript else None)],
        "repeat_request": lambda: [("drop_repeated_request", _without_prefix(text, params["request"]) if params.get("request") else None),
                                   ("drop_first_paragraph", paragraphs[1] if len(paragraphs) > 1 else None)],
    }.get(family, lambda: [])
    return edits()


def corrupt_response(response: str, constraints: list[dict]) -> Corruption | None:
    """A copy of `response` (which passes `constraints`) with one constraint broken by a small edit and
    the others still passing, the edit closest to the original (difflib ratio); None where no edit does.
    Deterministic: the same response and constraints give the same copy."""
    specs = [from_record(c) for c in constraints]
    original = response.strip()
    best = None
    for order, spec in enumerate(sorted(specs, key=lambda s: s.family)):
        for operation, text in _family_edits(spec.family, spec.params, original):
            text = (text or "").strip()
            if not text or text == original:
                continue
            broken = [r.family for r in check_all(specs, text) if not r.passed]
            if broken != [spec.family]:
                continue  # the target still passes, or another constraint broke too: not "the constraint broken, else equal"
            key = (-difflib.SequenceMatcher(None, original, text, autojunk=False).ratio(), order, operation)
            if best is None or key < best[0]:
                best = (key, Corruption(text, operation, broken))
    return None if best is None else best[1]


def _add_corrupted(files: dict, tokenizer, instructions: list[dict], by_instruction: dict, signals: CriticSignals) -> None:
    from .prompt_guards import encode_continuation

    for record in instructions:
        if not record["constraints"]:
            continue
        source = _corruption_source(by_instruction.get(record["id"], []), signals)
        if source is None or f"{source['id']}-corrupt" in files["corrupted_responses"]:
            continue
        corruption = corrupt_response(source["response"], record["constraints"])
        if corruption is None:
            continue
        n_tokens = len(encode_continuation(tokenizer, CompletionStylePrompts.format_completion(corruption.text)))
        files["corrupted_responses"].append(ResponseRecord(
            id=f"{source['id']}-corrupt", instruction_id=record["id"], candidate_index=source["candidate_index"],
            round=record["round"], instruction=record["instruction"], raw_response=corruption.text, response=corruption.text,
            was_cut=False, finish_reason=source["finish_reason"], n_generated_tokens=0, n_response_tokens=n_tokens,
            prompt_version=CORRUPTION_VERSION).to_dict())


def _corruption_source(candidates: list[dict], signals: CriticSignals) -> dict | None:
    """The best clean candidate that passes every constraint (by the pilot's ranking signal, then index)."""
    passing = [c for c in candidates if _clean(c) and _passed(c) == 1.0]
    if not passing:
        return None
    return min(passing, key=lambda c: (-(c["signals"].get(signals.rank_by) if signals.rank_by and
                                         c["signals"].get(signals.rank_by) is not None else -math.inf), c["candidate_index"]))


# -- phase 6: pairs -------------------------------------------------------------------------------
def _clean(candidate: dict) -> bool:
    return not set(candidate["filter_reasons"]) & set(CLEAN_FILTERS)


def _passed(candidate: dict) -> float | None:
    checks = candidate.get("constraint_checks")
    return sum(c["passed"] for c in checks) / len(checks) if checks else None


def _side(candidate: dict) -> dict:
    return {"signals": candidate["signals"], "constraint_checks": candidate.get("constraint_checks"),
            "constraints_passed": _passed(candidate), "filter_reasons": candidate["filter_reasons"],
            "n_response_tokens": candidate["n_response_tokens"], "finish_reason": candidate["finish_reason"]}


def _length_gap(chosen: dict, rejected: dict) -> float:
    return abs(math.log(max(chosen["n_response_tokens"], 1) / max(rejected["n_response_tokens"], 1)))


def _best_choice(options: list[tuple[dict, dict, float]]) -> tuple[dict, dict, float] | None:
    """The (chosen, rejected, margin) closest in length, then with the larger margin, then by index."""
    return min(options, key=lambda o: (round(_length_gap(o[0], o[1]), 9), -o[2], o[0]["id"], o[1]["id"]), default=None)


def _pair(instruction: dict, source: str, chosen: dict, rejected: dict, margin: float, margin_kind: str, reason: str,
          seed: int, signal: str | None = None, corruption: dict | None = None) -> dict:
    tag = f"signal-{signal}" if source == "signal" else source
    n_chosen, n_rejected = chosen["n_response_tokens"], rejected["n_response_tokens"]
    return PreferencePairRecord(
        id=f"{instruction['id']}:{tag}", source=source, signal=signal, reason=reason, instruction_id=instruction["id"],
        round=instruction["round"], instruction=instruction["instruction"], task=instruction["task"],
        constraints=instruction["constraints"], chosen=chosen["response"], rejected=rejected["response"], chosen_id=chosen["id"],
        rejected_id=rejected["id"], chosen_scores=_side(chosen), rejected_scores=_side(rejected), margin=round(margin, 6),
        margin_kind=margin_kind, n_chosen_tokens=n_chosen, n_rejected_tokens=n_rejected,
        length_ratio=round(n_chosen / max(n_rejected, 1), 6), corruption=corruption, seed=seed,
        prompt_version=CompletionStylePrompts.versions["response"]).to_dict()


def _failed_families(candidate: dict) -> str:
    return ", ".join(c["family"] for c in candidate["constraint_checks"] if not c["passed"])


def checker_pair(instruction: dict, candidates: list[dict], seed: int) -> tuple[dict | None, str]:
    """(pair, "formed") or (None, why not): a clean candidate passing every constraint against a clean one failing some."""
    if not instruction["constraints"]:
        return None, "unconstrained"
    clean = [c for c in candidates if _clean(c)]
    passing = [c for c in clean if _passed(c) == 1.0]
    failing = [c for c in clean if _passed(c) is not None and _passed(c) < 1.0]
    if not passing or not failing:
        return None, "no clean passing candidate" if not passing else "no clean failing candidate"
    chosen, rejected, margin = _best_choice([(p, f, 1.0 - _passed(f)) for p in passing for f in failing])
    reason = f"{chosen['id']} passes all {len(instruction['constraints'])} constraint(s); {rejected['id']} fails {_failed_families(rejected)}"
    return _pair(instruction, "checker", chosen, rejected, margin, "constraints_passed", reason, seed), "formed"


def signal_pair(instruction: dict, candidates: list[dict], signal: str, min_margin: float, seed: int) -> tuple[dict | None, str]:
    """(pair, "formed") or (None, why not): two clean candidates (both passing any constraints) whose
    `signal` values differ by at least `min_margin`."""
    eligible = [c for c in candidates if _clean(c) and _passed(c) in (None, 1.0) and c["signals"].get(signal) is not None]
    if len(eligible) < 2:
        return None, "fewer than two eligible candidates"
    options = [(a, b, a["signals"][signal] - b["signals"][signal]) for a in eligible for b in eligible
               if a is not b and a["signals"][signal] - b["signals"][signal] >= min_margin]
    if not options:
        return None, f"no two candidates {min_margin} apart"
    chosen, rejected, margin = _best_choice(options)
    reason = f"{signal} {chosen['signals'][signal]:.4g} ({chosen['id']}) vs {rejected['signals'][signal]:.4g} ({rejected['id']})"
    return _pair(instruction, "signal", chosen, rejected, margin, signal, reason, seed, signal=signal), "formed"


def corrupted_pair(instruction: dict, candidates: list[dict], corrupted: dict | None, seed: int) -> tuple[dict | None, str]:
    """(pair, "formed") or (None, why not): the candidate that was corrupted against its corrupted copy."""
    if not instruction["constraints"]:
        return None, "unconstrained"
    if corrupted is None:
        return None, "no passing candidate or no edit breaks exactly one constraint"
    chosen = next(c for c in candidates if c["id"] == corrupted["id"].removesuffix("-corrupt"))
    redo = corrupt_response(chosen["response"], instruction["constraints"])  # deterministic: the edit that made the copy
    edit = {"operation": redo.operation, "broken": redo.broken} if redo is not None and redo.text == corrupted["response"] \
        else {"operation": "unknown (made by another version)", "broken": [c["family"] for c in corrupted["constraint_checks"] if not c["passed"]]}
    reason = f"{corrupted['id']} is {chosen['id']} with {edit['operation']} (breaks {', '.join(edit['broken'])})"
    return _pair(instruction, "corrupted", chosen, corrupted, 1.0 - _passed(corrupted), "constraints_passed", reason, seed,
                 corruption=edit), "formed"


def _form_pairs(files: dict, instructions: list[dict], by_instruction: dict, config: Stage2Config, signals: CriticSignals,
                outcomes: Counter) -> None:
    corrupted = {r["instruction_id"]: r for r in _records(files["corrupted_scored"])}
    usable_signals = [name for name in config.signals if name in signals.trusted]
    for record in instructions:
        candidates = by_instruction.get(record["id"], [])
        if len(candidates) < config.num_candidates:
            continue
        attempts = [("checker", checker_pair(record, candidates, config.seed))]
        attempts += [(f"signal-{name}", signal_pair(record, candidates, name, config.min_signal_margin, config.seed))
                     for name in usable_signals]
        if config.corrupted_pairs:
            attempts.append(("corrupted", corrupted_pair(record, candidates, corrupted.get(record["id"]), config.seed)))
        for tag, (pair, outcome) in attempts:
            outcomes[f"{tag}: {outcome}"] += 1
            if pair is not None:
                files["pairs"].append(pair)


def dedupe_pairs(pairs: list[dict]) -> tuple[list[dict], int]:
    """Pairs in id order with exact (instruction, chosen, rejected) repeats removed (first wins), and the count removed."""
    seen, kept = set(), []
    for pair in sorted(pairs, key=lambda p: p["id"]):
        key = (pair["instruction"], pair["chosen"].strip(), pair["rejected"].strip())
        if key not in seen:
            seen.add(key)
            kept.append(pair)
    return kept, len(pairs) - len(kept)


# -- QC and the gate ------------------------------------------------------------------------------
def _distribution(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    quartiles = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return {"n": len(values), "min": round(min(values), 4), "p25": round(quartiles[0], 4), "median": round(statistics.median(values), 4),
            "p75": round(quartiles[2], 4), "max": round(max(values), 4), "mean": round(statistics.fmean(values), 4)}


def _source_key(pair: dict) -> str:
    return f"signal:{pair['signal']}" if pair["source"] == "signal" else pair["source"]


def pair_qc(pairs: list[dict], thresholds: dict | None = None, duplicates_removed: int = 0, counts: dict | None = None) -> dict:
    """QC of the pairs as written (see the module docstring); `passed` is the gate."""
    limits = {**PAIR_QC_THRESHOLDS, **(thresholds or {})}
    by_source: dict[str, list[dict]] = {}
    for pair in pairs:
        by_source.setdefault(_source_key(pair), []).append(pair)
    ratios = [p["n_chosen_tokens"] / max(p["n_rejected_tokens"], 1) for p in pairs]
    median_ratio = statistics.median(ratios) if ratios else None
    duplicates = len(pairs) - len({(p["instruction"], p["chosen"].strip(), p["rejected"].strip()) for p in pairs})
    identical = sum(p["chosen"].strip() == p["rejected"].strip() for p in pairs)
    checks = {"pairs": (len(pairs), ">=", limits["min_pairs"]),
              "median_length_ratio_max": (median_ratio, "<=", limits["max_length_ratio"]),
              "median_length_ratio_min": (median_ratio, ">=", limits["min_length_ratio"]),
              "duplicate_pairs": (duplicates, "==", 0), "identical_sides": (identical, "==", 0)}
    table, failures = {}, []
    for name, (value, op, limit) in checks.items():
        ok = value is not None and {"<=": value <= limit, ">=": value >= limit, "==": value == limit}[op]
        table[name] = {"value": value, "op": op, "threshold": limit, "passed": ok}
        if not ok:
            failures.append(f"{name} = {value if value is None else round(value, 4)} (needs {op} {limit})")
    return {
        "passed": not failures, "failures": failures, "rates": table, "thresholds": limits,
        "pairs_per_source": {name: len(rows) for name, rows in sorted(by_source.items())},
        "margins": {name: {"kind": rows[0]["margin_kind"], **_distribution([p["margin"] for p in rows])}
                    for name, rows in sorted(by_source.items())},
        "length_ratio": {"all": _distribution(ratios),
                         **{name: _distribution([p["n_chosen_tokens"] / max(p["n_rejected_tokens"], 1) for p in rows])
                            for name, rows in sorted(by_source.items())}},
        "chosen_longer_share": round(sum(r > 1 for r in ratios) / len(ratios), 4) if ratios else None,
        "duplicates": {"removed_before_writing": duplicates_removed, "in_written_pairs": duplicates,
                       "instructions_with_several_pairs": sum(n > 1 for n in Counter(p["instruction_id"] for p in pairs).values())},
        "counts": {"pairs": len(pairs), **(counts or {})},
    }


def format_pair_qc(qc: dict) -> str:
    """The QC table printed at the end of a run."""
    lines = [f"{'check':<26}{'value':>10}  {'gate':<10}{'ok':>4}"]
    for name, row in qc["rates"].items():
        value = "n/a" if row["value"] is None else (f"{row['value']:.3f}" if isinstance(row["value"], float) else str(row["value"]))
        lines.append(f"{name:<26}{value:>10}  {row['op'] + ' ' + str(row['threshold']):<10}{'yes' if row['passed'] else 'NO':>4}")
    lines.append(f"{'source':<22}{'pairs':>6}  {'margin (median, [p25, p75])':<36}{'length ratio median':>20}")
    for name, n in qc["pairs_per_source"].items():
        margin, ratio = qc["margins"][name], qc["length_ratio"][name]
        shown = f"{margin['kind']} {margin['median']} [{margin['p25']}, {margin['p75']}]"
        lines.append(f"{name:<22}{n:>6}  {shown:<36}{ratio['median']:>20}")
    lines.append(f"chosen longer than rejected in {qc['chosen_longer_share']} of pairs; duplicates removed "
                 f"{qc['duplicates']['removed_before_writing']}, left {qc['duplicates']['in_written_pairs']}")
    lines.append(f"PAIR QC {'PASSED' if qc['passed'] else 'FAILED'}: {qc['counts']['pairs']} pairs")
    lines += [f"  - {failure}" for failure in qc["failures"]]
    return "\n".join(lines)


# -- the run --------------------------------------------------------------------------------------
def _records(appender: JsonlAppender) -> list[dict]:
    return unique_by_id(appender.records)


def _candidates_by_instruction(appender: JsonlAppender) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for record in sorted(_records(appender), key=lambda r: r["id"]):
        grouped.setdefault(record["instruction_id"], []).append(record)
    return grouped


def run_stage2_generation(model, tokenizer, stage1_adapter, config: Stage2Config, out_dir: Path, exclusion,
                          signals: CriticSignals, batch_size: int = 16, show_progress: bool = True, compile: bool = False) -> dict:
    """Run (or resume) the phases into `out_dir`; returns {"pairs": every pair formed (phase 6), "counts"}.

    `model` is the loaded base model; `stage1_adapter` the folder of the Stage 1 adapter, attached to
    it (in place) after the instruction phases, which the base model runs."""
    from .generation import GenerationEngine
    from .instruction_critic import InstructionCritic
    from .sft_training import load_adapter
    from .stage1_generation import config_from_dict

    settings = config_from_dict(config.instruction_settings)
    engine = GenerationEngine(model, tokenizer, batch_size=batch_size, seed=config.seed, show_progress=show_progress, compile=compile)
    critic = InstructionCritic(model, tokenizer, batch_size=batch_size, confidence_threshold=settings.confidence_threshold,
                               label_swap=settings.label_swap, show_progress=show_progress, compile=compile)
    files = {name: JsonlAppender(Path(out_dir) / file_name) for name, file_name in PHASE_FILES.items()}
    outcomes: Counter = Counter()
    seconds, clock = {}, time.time()

    def lap(name: str) -> None:  # this process's wall seconds per phase (a resumed run times only what it did)
        nonlocal clock
        seconds[name], clock = round(time.time() - clock, 2), time.time()

    try:
        _instruction_rounds(engine, critic, files, config, exclusion)
        instructions = _usable(files)[: config.num_instructions]
        constraints = {r["id"]: r["constraints"] for r in instructions if r["constraints"]}
        keys = [r["id"] for r in instructions]
        lap("instructions")
        policy = load_adapter(model, stage1_adapter)
        engine.model = policy  # drops the decoders captured on the bare base model
        _generate_candidates(engine, tokenizer, files, instructions, config)
        lap("candidates")
        with policy.disable_adapter():  # the signals are the base model's, as the pilot's probe proved them
            score_candidates(critic, {"responses": files["responses"], "scored": files["scored"]}, keys, settings, constraints)
            by_instruction = _candidates_by_instruction(files["scored"])
            if config.corrupted_pairs:
                _add_corrupted(files, tokenizer, instructions, by_instruction, signals)
                score_candidates(critic, {"responses": files["corrupted_responses"], "scored": files["corrupted_scored"]}, keys,
                                 settings, constraints)
        lap("scoring")
        _form_pairs(files, instructions, by_instruction, config, signals, outcomes)
        lap("pairs")
        selected = _records(files["selected"])
        scored = _records(files["scored"])
        counts = {
            "instruction_candidates": len(_records(files["candidates"])),
            "instruction_filters": dict(Counter(r["filter"] or "passed" for r in _records(files["instructions"]))),
            "instructions_accepted": len(selected), "excluded_overlaps": sum(r["excluded"] for r in selected),
            "excluded_by": dict(Counter(m["id"].split(":")[0] for r in selected for m in r["overlaps"][:1])),
            "instructions_used": len(instructions), "instructions_constrained": len(constraints),
            "shortfall": max(0, config.num_instructions - len(instructions)),
            "candidates_scored": len(scored), "candidate_filters": dict(Counter(x for r in scored for x in r["filter_reasons"])),
            "clean_candidates": sum(_clean(r) for r in scored),
            "corrupted_copies": len(_records(files["corrupted_scored"])), "pair_outcomes": dict(sorted(outcomes.items())),
            "signals_used": [name for name in config.signals if name in signals.trusted],
            "signals_not_trusted": [name for name in config.signals if name not in signals.trusted],
            "phase_seconds": seconds,
        }
        return {"pairs": _records(files["pairs"]), "counts": counts}
    finally:
        for appender in files.values():
            appender.close()

