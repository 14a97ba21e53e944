"""Constraint data in Stage 1: accepted pairs relabeled with verifiable constraints (rule-based, no model).

After the pair critic, a seeded fraction of the accepted pairs (`constraint_fraction`) gets one to
three compatible constraints from the trained families (`utils.constraints`): either one its
response already satisfies (measured: its word-count band, its item count, a keyword it contains,
its first word) or one the response is rewritten to satisfy (a deterministic rewrite: trimmed,
lower-cased, given a title, ...). The constraint texts are appended to the instruction in one of
their training wordings (`constraints.build_instruction`), and the pair is checked again by every
checker before it is written: a failing pair is a bug (RuntimeError, exit 1), never a kept record.

Before that, another seeded fraction of the accepted instructions (`generated_constraint_fraction`)
is answered under constraints: the model writes its candidates to the constrained instruction (the
demonstrations show answers that obey such rules), the checkers reject every candidate that misses
one (`response_selection.filter_reasons`), and the pair is kept as generated (mode "generated").

An accepted instruction that asks for a list (`utils.list_answers`) is neither: its kept answer
(whose candidates had to be lists) is written one item per line with the asked number of items,
mode "list_format", the instruction unchanged.

Which pairs are chosen, and everything drawn for them, depends only on the run's seed and the
pair's id (a hash, not a position), so a resumed run or another shard layout chooses the same.

    if selected_for_constraints(seed, record["id"], 0.3):
        relabeled = constrain_pair(record["instruction"], record["response"], families, pair_rng(seed, record["id"]))
"""

from __future__ import annotations

import argparse
import hashlib
import random
from collections import Counter
from dataclasses import dataclass

from .constraints import (
    CATALOGUE_VERSION,
    TRAINED_FAMILIES,
    build_instruction,
    check,
    check_all,
    compatible,
    count_sentences,
    from_record,
    get_family,
    normalize_text,
    resolve_families,
    rewrite_all,
    sample_constraint,
    to_record,
)
from .exit_codes import BadInputError

__all__ = ["FamilyNames", "family_names", "selected_for_constraints", "pair_rng", "ConstrainedPair", "constrain_pair",
           "recheck", "constraint_summary", "constrain_accepted", "CONSTRAINT_COUNT_WEIGHTS", "GENERATED_COUNT_WEIGHTS",
           "generated_constraints", "generated_constraint_pass_rates"]

# How many constraints a chosen pair gets: one most often, three least (three rules on one short
# answer rarely fit together, and the rewrites of many would leave little of the model's text).
CONSTRAINT_COUNT_WEIGHTS = {1: 5, 2: 3, 3: 2}
# How many constraints an instruction gets when the model writes the answer under them itself: it
# must satisfy every one unaided (the checkers reject a candidate that misses any), so one most often.
GENERATED_COUNT_WEIGHTS = {1: 3, 2: 1}
# The parameter that says how many units (sentences, paragraphs, items) a structure family asks for.
_UNIT_COUNTS = ("num_sentences", "num_paragraphs", "num_bullets", "num_items")


@dataclass(frozen=True)
class FamilyNames:
    """A comma-separated list of trained constraint families, as a flag (argparse `type=`) and as a
    value read back from a manifest (`problem`); unknown or held-out names are refused, named."""

    kind: type = list
    metavar: str = "NAMES"

    def __call__(self, text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        if not names:
            raise argparse.ArgumentTypeError("expected one or more constraint family names, comma-separated")
        try:
            return list(resolve_families(names, split="train"))
        except BadInputError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    def problem(self, value) -> str | None:
        if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
            return f"got {value!r}, expected a list of trained constraint family names"
        try:
            resolve_families(value, split="train")
        except BadInputError as err:
            return str(err)
        return None

    def describe(self) -> str:
        return f"comma-separated trained families ({', '.join(TRAINED_FAMILIES)})"


family_names = FamilyNames()


def _unit_interval(text: str) -> float:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64


def selected_for_constraints(seed: int, key: str, fraction: float) -> bool:
    """Whether the pair `key` of the run seeded `seed` is relabeled: a hash below `fraction`."""
    return _unit_interval(f"constraints:{seed}:{key}") < fraction


def pair_rng(seed: int, key: str) -> random.Random:
    """The draws for one pair (how many constraints, which families, parameters, wordings)."""
    return random.Random(f"constraints:{seed}:{key}:draws")


@dataclass(frozen=True)
class ConstrainedPair:
    instruction: str
    response: str
    constraints: list[dict]  # to_record form, repeat_request bound to its request
    modes: list[str]  # per constraint: "measured" (the response already satisfied it) or "rewritten"
    mode: str  # "rewritten" when the response was changed, else "measured"


def constrain_pair(task: str, response: str, families, rng: random.Random) -> ConstrainedPair | None:
    """One to three compatible constraints for this pair, or None when none fits (a response with
    too little material for any rewrite and no measurable property). Families are tried in a
    seeded order; for each, either measured or rewritten parameters first (a seeded coin), then the
    other. A structure is rewritten only where the response has a sentence for every unit."""
    original = normalize_text(response).strip()
    wanted = rng.choices(list(CONSTRAINT_COUNT_WEIGHTS), weights=list(CONSTRAINT_COUNT_WEIGHTS.values()))[0]
    order = list(families)
    rng.shuffle(order)
    chosen, result = [], None
    for name in order:
        if len(chosen) == wanted:
            break
        if not compatible(*(c.family for c in chosen), name):
            continue
        family = get_family(name)
        attempts = ["measured", "rewritten"] if rng.random() < 0.5 else ["rewritten", "measured"]
        for attempt in attempts:
            if attempt == "measured" and "request" in family.params:
                continue  # an answer never starts with its own request: only a rewrite can satisfy it
            if attempt == "rewritten" and family.rewrite is None:
                continue
            constraint = sample_constraint(name, rng, response=original if attempt == "measured" else None)
            if constraint is None or (attempt == "rewritten" and _cuts_sentences(constraint, original)):
                continue
            instruction, bound = build_instruction(task, chosen + [constraint])
            text = rewrite_all(bound, original)
            if text is not None:
                chosen.append(constraint)
                result = (instruction, text, bound)
                break
    if result is None:
        return None
    instruction, text, bound = result
    modes = ["measured" if check(c, original).passed else "rewritten" for c in bound]
    return ConstrainedPair(instruction=instruction, response=text.strip(), constraints=[to_record(c) for c in bound],
                           modes=modes, mode="rewritten" if text.strip() != original else "measured")


def generated_constraints(seed: int, key: str, task: str, families) -> tuple[str, list[dict]] | None:
    """The constrained instruction and its constraints (record form) for an answer not written yet
    (verifier-filtered generation: the model answers the constrained instruction and the checkers
    reject the candidates that miss). Fresh parameters, no response to measure; drawn from the seed
    and the instruction's id only, so a resumed run or a later phase recomputes the same."""
    rng = random.Random(f"generated-constraints:{seed}:{key}")
    wanted = rng.choices(list(GENERATED_COUNT_WEIGHTS), weights=list(GENERATED_COUNT_WEIGHTS.values()))[0]
    order = list(families)
    rng.shuffle(order)
    chosen = []
    for name in order:
        if len(chosen) == wanted:
            break
        if compatible(*(c.family for c in chosen), name):
            constraint = sample_constraint(name, rng)
            if constraint is not None:
                chosen.append(constraint)
    if not chosen:
        return None
    instruction, bound = build_instruction(task, chosen)
    return instruction, [to_record(c) for c in bound]


def generated_constraint_pass_rates(scored: list[dict]) -> dict:
    """Per family: how many scored candidates were written under that constraint (`candidates`) and how
    many of them passed its checker (`passed`): what the model manages unaided. Flat counts, so the
    scale stage adds its shards' up."""
    candidates, passed = Counter(), Counter()
    for record in scored:
        for result in record.get("constraint_checks") or []:
            candidates[result["family"]] += 1
            passed[result["family"]] += bool(result["passed"])
    return {"candidates": dict(sorted(candidates.items())), "passed": {family: passed[family] for family in sorted(candidates)}}


def _cuts_sentences(constraint, response: str) -> bool:
    """Whether rewriting to this structure needs more units than the response has sentences: the
    catalogue's rewrite would then cut sentences in two ("Red shirts." / "Are more."), which would
    teach broken sentences. Regrouping whole sentences is fine."""
    wanted = [constraint.params[key] for key in _UNIT_COUNTS if key in constraint.params]
    return bool(wanted) and count_sentences(response) < wanted[0]


def recheck(constraints: list[dict], response: str) -> list[dict]:
    """Every checker's verdict on the response, from the stored (record) form of the constraints."""
    return [result._asdict() for result in check_all([from_record(c) for c in constraints], response)]


def constraint_summary(records: list[dict]) -> dict:
    """QC of the constrained records among `records` (final pairs): the constrained fraction, the
    checker pass rate recomputed from the stored constraints (a record whose constraints cannot be
    read counts as failed), per-family and per-mode counts, and the catalogue version."""
    constrained = [r for r in records if r.get("constraints")]
    failed = []
    for record in constrained:
        try:
            passed = all(result["passed"] for result in recheck(record["constraints"], record["response"]))
        except (BadInputError, KeyError, TypeError):
            passed = False
        if not passed:
            failed.append(record["id"])
    n = len(constrained)
    return {
        "catalogue_version": CATALOGUE_VERSION,
        "records": len(records),
        "constrained": n,
        "constrained_fraction": round(n / len(records), 4) if records else None,
        "checker_pass_rate": (n - len(failed)) / n if n else None,
        "failed_ids": failed[:20],
        "per_family": dict(sorted(Counter(c["family"] for r in constrained for c in r["constraints"]
                                          if isinstance(c, dict) and "family" in c).items())),
        # A record constrained by hand has no mode: a key of its own, since a None key among strings stops the
        # manifest's sorted JSON.
        "modes": dict(sorted(Counter(r.get("constraint_mode") or "unrecorded" for r in constrained).items())),
        "constraints_per_record": dict(sorted(Counter(len(r["constraints"]) for r in constrained).items())),
    }


def constrain_accepted(files: dict, keys, config, tokenizer, generated: dict | None = None, list_requests: dict | None = None) -> None:
    """Phase 5: relabel the chosen accepted judged pairs of `keys` not relabeled yet, one record
    each in files["constrained"] (a chosen pair that no constraint fits is recorded with none).
    `generated` maps an instruction id whose answers were written under constraints to (its task
    before them, the constrained instruction, the constraints): such a pair is recorded as it is, mode "generated", never relabeled.
    `list_requests` maps an instruction id to the list it asks for: its answer is written as that line
    list (mode "list_format", the instruction unchanged; `list_answers.list_answer`), never relabeled.
    Every other accepted pair also gets `config.constraint_variants` relabeled copies (ids
    `records.variant_id(key, j)`), each with constraints drawn afresh for its own id."""
    from .list_answers import list_answer
    from .records import unique_by_id, variant_id

    wanted, generated, list_requests = set(keys), generated or {}, list_requests or {}
    judged = sorted(unique_by_id(files["judged"].records), key=lambda r: r["id"])
    for record in judged:
        key = record["id"]
        if key not in wanted or not record["accepted"]:
            continue
        if key in generated:
            if key not in files["constrained"]:
                task, _, constraints = generated[key]
                _append_constrained(files, tokenizer, key, record, task, ConstrainedPair(
                    record["instruction"], record["response"], constraints, ["generated"] * len(constraints), "generated"))
            continue  # answered under its constraints: no variants
        task = record["instruction"]
        if key in list_requests:
            if key not in files["constrained"]:
                answer = list_answer(list_requests[key], record["response"])
                if answer is None:  # the candidate filter let no non-list through: a bug, never a record
                    raise RuntimeError(f"accepted pair {key} asks for a list but its answer is none: {record['response']!r}")
                _append_constrained(files, tokenizer, key, record, task, ConstrainedPair(
                    record["instruction"], answer.response, [answer.constraint], [answer.mode], "list_format"))
            continue  # a list answer keeps the instruction as asked: no variants
        if key not in files["constrained"] and selected_for_constraints(config.seed, key, config.constraint_fraction):
            _append_constrained(files, tokenizer, key, record, task, constrain_pair(
                record["instruction"], record["response"], config.constraint_families, pair_rng(config.seed, key)))
        for index in range(1, config.constraint_variants + 1):
            variant = variant_id(key, index)
            if variant not in files["constrained"]:
                _append_constrained(files, tokenizer, variant, record, task, constrain_pair(
                    record["instruction"], record["response"], config.constraint_families, pair_rng(config.seed, variant)))


def _append_constrained(files: dict, tokenizer, key: str, record: dict, task: str, relabeled: ConstrainedPair | None) -> None:
    """One phase-5 record: the pair as relabeled, re-checked by every checker (a failure is a bug:
    RuntimeError, never a kept record), or with no constraints where none fitted."""
    from .completion_prompts import CompletionStylePrompts
    from .prompt_guards import encode_continuation
    from .records import ConstrainedPairRecord

    if relabeled is None:
        instruction, response, constraints, checks, modes, mode = record["instruction"], record["response"], [], [], [], None
    else:
        instruction, response, constraints = relabeled.instruction, relabeled.response, relabeled.constraints
        checks, modes, mode = recheck(constraints, response), relabeled.modes, relabeled.mode
        failed = [c for c in checks if not c["passed"]]
        if failed:  # the rewrite or the candidate filter promised a passing text: a bug, never a record
            raise RuntimeError(f"constrained pair {key} fails its own checker(s) {failed}: instruction {instruction!r}, "
                               f"response {response!r}")
    n_tokens = len(encode_continuation(tokenizer, CompletionStylePrompts.format_completion(response))) if response else 0
    files["constrained"].append(ConstrainedPairRecord(
        id=key, round=record["round"], instruction=instruction, response=response, n_response_tokens=n_tokens,
        original_instruction=task, original_response=record["response"], constraints=constraints,
        constraint_checks=checks, constraint_mode=mode, constraint_modes=modes).to_dict())
