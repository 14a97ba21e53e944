"""One record schema: the dataclasses of utils/records.py, the tables of docs/record_schema.md, and
what the phases actually write, all with the same fields."""

import re
from pathlib import Path

import pytest

from conftest import read_jsonl_lines, run_python_script
from tiny_models import TRAINED_PIPELINE_FLAGS

ROOT = Path(__file__).resolve().parents[1]
PHASE_KINDS = {"phase1_candidates.jsonl": "candidate", "phase2_instructions.jsonl": "instruction",
               "phase3_responses.jsonl": "response", "phase4_scored_responses.jsonl": "scored response",
               "phase4_judged.jsonl": "judged pair", "phase5_constrained.jsonl": "constrained pair", "sft_data.jsonl": "SFT example"}


def _doc_tables() -> dict[str, list[tuple[str, str]]]:
    """{kind: [(field, type), ...]} from the `## kind` sections of docs/record_schema.md."""
    text = (ROOT / "docs" / "record_schema.md").read_text()
    tables = {}
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        title, _, body = section.partition("\n")
        rows = re.findall(r"^\| `([a-z_]+)` \| `([^`]+)` \|", body, flags=re.M)
        if rows:
            tables[title.strip()] = [(name, kind.replace("\\|", "|")) for name, kind in rows]
    return tables


def test_the_doc_lists_exactly_the_fields_and_types_of_each_record_kind():
    from dataclasses import fields

    from utils.records import RECORD_KINDS

    tables = _doc_tables()
    assert set(RECORD_KINDS) <= set(tables), "docs/record_schema.md lacks a table"
    for kind, record_class in RECORD_KINDS.items():
        assert tables[kind] == [(f.name, f.type) for f in fields(record_class)], kind


def test_no_old_field_names_remain():
    from utils.records import RECORD_KINDS, field_names

    names = {name for kind in RECORD_KINDS.values() for name in field_names(kind)}
    assert not names & {"raw", "raw_output", "cleaner_cut", "n_tokens", "prompt_versions"}
    assert {"raw_response", "was_cut", "n_response_tokens", "round", "prompt_version"} <= names


def test_evaluation_response_fields_as_agreed():
    from utils.records import EvaluationResponseRecord, field_names

    assert field_names(EvaluationResponseRecord) == ["id", "type", "instruction", "raw_response", "response", "was_cut",
                                                     "finish_reason", "n_generated_tokens", "score", "prompt_version"]


def test_unique_by_id_keeps_the_first_of_each_id():
    from utils.records import unique_by_id

    rows = [{"id": "a", "v": 1}, {"id": "b"}, {"id": "a", "v": 2}, {"v": 3}, {"v": 3}]
    assert unique_by_id(rows) == [{"id": "a", "v": 1}, {"id": "b"}, {"v": 3}, {"v": 3}]


@pytest.fixture(scope="module")
def pilot_folder(trained_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("records") / "pilot"
    # --constraint-fraction 1: every accepted pair is offered constraints, so phase 5 writes records.
    done = run_python_script("generate_stage1_pilot_data.py", "--model", trained_model_dir, "--count", 4, "--output", out,
                             "--no-progress", "--constraint-fraction", 1, *TRAINED_PIPELINE_FLAGS)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def test_every_phase_writes_records_of_its_kind(pilot_folder):
    from utils.records import RECORD_KINDS, field_names

    for file_name, kind in PHASE_KINDS.items():
        records = read_jsonl_lines(pilot_folder / file_name)
        assert records, file_name
        for record in records:
            assert set(record) == set(field_names(RECORD_KINDS[kind])), file_name
            # The round is a stored field, the same one the id was made with.
            assert isinstance(record["round"], int) and record["id"].startswith(f"r{record['round']:02d}-")
    for record in read_jsonl_lines(pilot_folder / "phase3_responses.jsonl"):
        assert record["prompt_version"] == "response_v4" and isinstance(record["was_cut"], bool)
        assert (record["n_response_tokens"] == 0) == (record["response"] == "")
        assert record["id"] == f"{record['instruction_id']}-c{record['candidate_index']}"
