"""The record kinds of the pipeline, one typed dataclass each, with one set of field names.

Generation writes CandidateRecord (phase 1), InstructionRecord (phase 2), ResponseRecord (phase 3:
one per sampled response candidate), ScoredResponseRecord (phase 4: every candidate with its scores),
JudgedPairRecord (phase 4: one per instruction, the chosen candidate and the verdict),
ConstrainedPairRecord (phase 5: the accepted pairs given verifiable constraints) and SFTExampleRecord
(the accepted pairs: the pilot's and each shard's `sft_data.jsonl`, and the merged dataset); the
evaluation writes EvaluationResponseRecord; Stage 2 writes PreferenceInstructionRecord (a fresh
instruction, its exclusion check and constraints) and PreferencePairRecord (a chosen/rejected pair,
why it was formed and both sides' scores), and reuses ResponseRecord/ScoredResponseRecord for the
Stage 1 adapter's candidates. The
same thing has the same name in every kind: `raw_response` is the model's text before cleaning,
`response` the cleaned text, `was_cut` whether the cleaner removed something, `round` the
generation round. docs/record_schema.md documents every field; a test keeps the two in step.

    record = ResponseRecord(id="r00-00003", round=0, instruction=..., ...)
    appender.append(record.to_dict())
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields

__all__ = ["CandidateRecord", "InstructionRecord", "ResponseRecord", "ScoredResponseRecord", "JudgedPairRecord",
           "ConstrainedPairRecord", "SFTExampleRecord", "EvaluationResponseRecord", "PreferenceInstructionRecord",
           "PreferencePairRecord", "RECORD_KINDS", "field_names", "unique_by_id", "VARIANT_MARK", "variant_id",
           "base_pair_id", "is_pair", "count_pairs", "first_pairs"]

# A relabeled variant of an accepted pair (the same answer under other constraints) has the id
# `<pair id>~v<j>`: it sorts right after its pair, and the merge and the train/validation split keep
# the two together.
VARIANT_MARK = "~v"


def variant_id(pair_id: str, index: int) -> str:
    return f"{pair_id}{VARIANT_MARK}{index}"


def base_pair_id(record_id: str) -> str:
    """The accepted pair a record comes from: its own id, or the pair a variant was made from."""
    return record_id.split(VARIANT_MARK, 1)[0]


def is_pair(record_id: str) -> bool:
    """True for an accepted pair's own record, False for one of its relabeled variants."""
    return base_pair_id(record_id) == record_id


def count_pairs(records: list[dict]) -> int:
    """Accepted pairs among `records` (their variants not counted)."""
    return sum(is_pair(record["id"]) for record in records)


def first_pairs(records: list[dict], count: int | None) -> list[dict]:
    """The records of the first `count` accepted pairs (in order), each pair with its variants."""
    if count is None:
        return list(records)
    kept, pairs = [], 0
    for record in records:
        pairs += is_pair(record["id"])
        if pairs > count:
            break
        kept.append(record)
    return kept


class _Record:
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict, **extra):
        """This kind built from a record of another kind: the shared fields copied, `extra` added."""
        names = field_names(cls)
        return cls(**{name: record[name] for name in names if name in record and name not in extra}, **extra)


@dataclass(frozen=True)
class CandidateRecord(_Record):
    id: str
    round: int
    raw_instruction: str
    instruction: str
    finish_reason: str
    n_generated_tokens: int
    examples: list[str]
    prompt_version: str


@dataclass(frozen=True)
class InstructionRecord(_Record):
    id: str
    round: int
    instruction: str
    filter: str | None
    instruction_critic: dict | None
    accepted: bool


@dataclass(frozen=True)
class ResponseRecord(_Record):
    id: str
    instruction_id: str
    candidate_index: int
    round: int
    instruction: str
    raw_response: str
    response: str
    was_cut: bool
    finish_reason: str
    n_generated_tokens: int
    n_response_tokens: int
    prompt_version: str


@dataclass(frozen=True)
class ScoredResponseRecord(ResponseRecord):
    """A response record plus its scores: the same fields first, in the same order."""

    pair_critic: dict | None
    relevance: dict | None
    signals: dict
    runaway: bool
    token_limit: bool
    constraint_checks: list[dict] | None
    filter_reasons: list[str]


@dataclass(frozen=True)
class JudgedPairRecord(_Record):
    id: str
    round: int
    instruction: str
    raw_response: str
    response: str
    was_cut: bool
    finish_reason: str
    n_generated_tokens: int
    n_response_tokens: int
    prompt_version: str
    instruction_critic: dict | None
    pair_critic: dict | None
    relevance: dict | None
    signals: dict
    candidate_id: str
    selection: dict
    accepted: bool
    rejection_reasons: list[str]


@dataclass(frozen=True)
class ConstrainedPairRecord(_Record):
    id: str
    round: int
    instruction: str
    response: str
    n_response_tokens: int
    original_instruction: str
    original_response: str
    constraints: list[dict]
    constraint_checks: list[dict]
    constraint_mode: str | None
    constraint_modes: list[str]


@dataclass(frozen=True)
class SFTExampleRecord(_Record):
    id: str
    round: int
    instruction: str
    response: str
    raw_response: str
    was_cut: bool
    finish_reason: str
    n_generated_tokens: int
    n_response_tokens: int
    instruction_critic: dict | None
    pair_critic: dict | None
    relevance: dict | None
    signals: dict
    candidate_id: str
    selection: dict
    original_instruction: str | None
    original_response: str | None
    constraints: list[dict]
    constraint_checks: list[dict]
    constraint_mode: str | None
    generation: dict
    seed: int
    prompt_version: str

    @classmethod
    def from_judged(cls, judged: dict, constrained: dict | None, generation: dict, seed: int) -> SFTExampleRecord:
        """The training record of an accepted judged pair: relabeled where phase 5 gave it constraints."""
        if not constrained or not constrained["constraints"]:
            return cls.from_record(judged, generation=generation, seed=seed, original_instruction=None, original_response=None,
                                   constraints=[], constraint_checks=[], constraint_mode=None)
        return cls.from_record(
            judged, instruction=constrained["instruction"], response=constrained["response"],
            n_response_tokens=constrained["n_response_tokens"], original_instruction=constrained["original_instruction"],
            original_response=constrained["original_response"], constraints=constrained["constraints"],
            constraint_checks=constrained["constraint_checks"], constraint_mode=constrained["constraint_mode"],
            generation=generation, seed=seed)


@dataclass(frozen=True)
class EvaluationResponseRecord(_Record):
    id: str
    type: str | None
    instruction: str
    raw_response: str
    response: str
    was_cut: bool
    finish_reason: str
    n_generated_tokens: int
    score: dict
    prompt_version: str


@dataclass(frozen=True)
class PreferenceInstructionRecord(_Record):
    id: str
    round: int
    task: str
    instruction: str
    constraints: list[dict]
    excluded: bool
    overlaps: list[dict]


@dataclass(frozen=True)
class PreferencePairRecord(_Record):
    id: str
    source: str
    signal: str | None
    reason: str
    instruction_id: str
    round: int
    instruction: str
    task: str
    constraints: list[dict]
    chosen: str
    rejected: str
    chosen_id: str
    rejected_id: str
    chosen_scores: dict
    rejected_scores: dict
    margin: float
    margin_kind: str
    n_chosen_tokens: int
    n_rejected_tokens: int
    length_ratio: float
    corruption: dict | None
    seed: int
    prompt_version: str


# The file each kind is written to, as docs/record_schema.md names its tables.
RECORD_KINDS = {
    "candidate": CandidateRecord,
    "instruction": InstructionRecord,
    "response": ResponseRecord,
    "scored response": ScoredResponseRecord,
    "judged pair": JudgedPairRecord,
    "constrained pair": ConstrainedPairRecord,
    "SFT example": SFTExampleRecord,
    "evaluation response": EvaluationResponseRecord,
    "preference instruction": PreferenceInstructionRecord,
    "preference pair": PreferencePairRecord,
}


def field_names(kind: type) -> list[str]:
    return [f.name for f in fields(kind)]


def unique_by_id(records: Iterable[dict]) -> list[dict]:
    """The first record of each id, in file order. An id written twice (a file edited by hand,
    two writers) is one record: counting it twice would skew every rate computed over the file.
    Records without an id are all kept."""
    seen, unique = set(), []
    for record in records:
        key = record.get("id")
        if key is not None:
            if key in seen:
                continue
            seen.add(key)
        unique.append(record)
    return unique
