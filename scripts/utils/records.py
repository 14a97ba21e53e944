"""The record kinds of the pipeline, one typed dataclass each, with one set of field names.

Generation writes CandidateRecord (phase 1), InstructionRecord (phase 2), ResponseRecord (phase 3),
JudgedPairRecord (phase 4) and SFTExampleRecord (the accepted pairs: the pilot's and each shard's
`sft_data.jsonl`, and the merged dataset); the evaluation writes EvaluationResponseRecord. The
same thing has the same name in every kind: `raw_response` is the model's text before cleaning,
`response` the cleaned text, `was_cut` whether the cleaner removed something, `round` the
generation round. docs/record_schema.md documents every field; a test keeps the two in step.

    record = ResponseRecord(id="r00-00003", round=0, instruction=..., ...)
    appender.append(record.to_dict())
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields

__all__ = ["CandidateRecord", "InstructionRecord", "ResponseRecord", "JudgedPairRecord", "SFTExampleRecord",
           "EvaluationResponseRecord", "RECORD_KINDS", "field_names", "unique_by_id"]


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
    pair_critic: dict


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
    pair_critic: dict
    generation: dict
    seed: int
    prompt_version: str


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


# The file each kind is written to, as docs/record_schema.md names its tables.
RECORD_KINDS = {
    "candidate": CandidateRecord,
    "instruction": InstructionRecord,
    "response": ResponseRecord,
    "judged pair": JudgedPairRecord,
    "SFT example": SFTExampleRecord,
    "evaluation response": EvaluationResponseRecord,
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
