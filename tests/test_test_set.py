import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from conftest import run_python_script
from utils import constraints as catalogue
from utils.exit_codes import EXIT_BAD_INPUT, BadInputError
from utils.test_set import (
    REQUIRED_FIELDS,
    SCORERS,
    TYPES,
    build_test_set,
    check_test_set,
    count_sentences,
    group_instruction_following,
    score_response,
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "generate_test_instructions.py"


def _run(*args):
    return run_python_script(SCRIPT, *args)


# ---- building --------------------------------------------------------------------------------
def test_same_seed_same_records_different_seed_differs():
    assert build_test_set(200, 999) == build_test_set(200, 999)
    assert build_test_set(200, 999) != build_test_set(200, 1000)


def test_script_output_is_byte_identical_for_same_seed(tmp_path):
    first, second = tmp_path / "a" / "t.jsonl", tmp_path / "b" / "t.jsonl"
    for path in (first, second):
        done = _run("--count", "50", "--seed", "3", "--output", str(path))
        assert done.returncode == 0, done.stderr
    assert first.read_bytes() == second.read_bytes()
    lines = first.read_bytes().split(b"\n")
    assert len([line for line in lines if line]) == 50
    assert json.loads(lines[0]) == build_test_set(50, 3)[0]
    other = tmp_path / "c.jsonl"
    assert _run("--count", "50", "--seed", "4", "--output", str(other)).returncode == 0
    assert other.read_bytes() != first.read_bytes()
    assert "factual" in done.stdout
    manifest = json.loads((tmp_path / "a" / "t.manifest.json").read_text())
    assert manifest["qc"]["passed"] and manifest["args"]["seed"] == 3
    assert manifest["outputs"]["data"]["sha256"] == hashlib.sha256(first.read_bytes()).hexdigest()


@pytest.mark.parametrize("count", ["4", "0", "-3"])
def test_bad_count_exits_2(tmp_path, count):
    done = _run("--count", count, "--output", str(tmp_path / "t.jsonl"))
    assert done.returncode == EXIT_BAD_INPUT
    assert "--count" in done.stderr
    assert not (tmp_path / "t.jsonl").exists()
    with pytest.raises(BadInputError):
        build_test_set(int(count))


def test_broken_constraint_family_is_refused_with_exit_2_naming_it(tmp_path, monkeypatch, capsys):
    from dataclasses import replace

    import generate_test_instructions as script
    from utils.exit_codes import run_cli

    broken = replace(catalogue.FAMILIES["lowercase"], rewrite=lambda text, params: text.upper())
    monkeypatch.setitem(catalogue.FAMILIES, "lowercase", broken)
    output = tmp_path / "t.jsonl"
    with pytest.raises(SystemExit) as exited:
        run_cli(lambda: script.main(script.parse_args(["--count", "10", "--output", str(output)])))
    assert exited.value.code == EXIT_BAD_INPUT
    assert "family 'lowercase' rewrite fails its own checker" in capsys.readouterr().err
    assert not output.exists()


@pytest.mark.parametrize("count", [200, 500])
def test_all_distinct_and_qc_passes(count):
    records = build_test_set(count)
    assert len({r["instruction"] for r in records}) == count
    assert [r["id"] for r in records] == [f"test_{i:04d}" for i in range(1, count + 1)]
    assert check_test_set(records)["passed"]


@pytest.mark.parametrize("count,expected", [(200, [40] * 5), (203, [41, 41, 41, 40, 40]), (7, [2, 2, 1, 1, 1])])
def test_type_counts_split_evenly_remainder_first(count, expected):
    counts = Counter(r["type"] for r in build_test_set(count, seed=5))
    assert [counts[t] for t in TYPES] == expected


def test_types_interleaved_so_any_prefix_covers_all():
    assert [r["type"] for r in build_test_set(200)[:5]] == list(TYPES)


def test_metadata_present_and_sane():
    # 750 = 150 per type, which is every explanation topic x phrasing there is
    for record in build_test_set(750, seed=11):
        assert {"id", "type", "template", "instruction"} <= record.keys()
        assert all(field in record for field in REQUIRED_FIELDS[record["type"]])
        if record["type"] == "factual":
            assert record["expected_answers"] and not set(record["expected_answers"]) & set(record["distractors"])
        elif record["type"] == "explanation":
            # keywords must need real content: none may be satisfied by echoing the instruction
            assert not any(re.search(rf"(?<!\w){k}", record["instruction"], re.I) for k in record["keywords"])
        elif record["type"] == "list_generation":
            assert 3 <= record["n_items"] <= 7
        elif record["type"] == "instruction_following":
            constraints = [catalogue.from_record(c) for c in record["constraints"]]
            assert 1 <= len(constraints) <= 2 and record["instruction"].startswith(record["task"])
            assert all(c.wording_id.split(".")[1].startswith("test") for c in constraints)  # never a training wording
            held_out = {c.family in catalogue.HELD_OUT_FAMILIES for c in constraints}
            assert held_out == {record["constraint_split"] == "held_out"}
            assert catalogue.compatible(*(c.family for c in constraints))
            # keyword rules must need real content: the task never already holds the keyword
            task_words = {w.lower() for w in catalogue.words(record["task"])}
            for c in constraints:
                assert not task_words & {w.lower() for w in c.params.get("keywords", []) + [c.params.get("keyword", "")]}
        else:
            assert record["min_words"] < record["max_words"] and record["topic_keyword"]


# ---- scoring ---------------------------------------------------------------------------------
def _one(type_name, **where):
    for record in build_test_set(500, seed=1):
        if record["type"] == type_name and all(record.get(k) == v for k, v in where.items()):
            return record
    raise AssertionError(f"no {type_name} record with {where}")


def _check(record, passing, failing):
    for response in passing:
        result = score_response(record, response)
        assert result["scored"] and result["success"] is True, (response, result)
    for response in failing:
        result = score_response(record, response)
        assert result["scored"] and result["success"] is False, (response, result)


def test_factual_scorer():
    capital = {"type": "factual", "expected_answers": ["Paris"], "distractors": ["Rome", "Berlin"]}
    _check(capital, ["Paris.", "The capital of France is Paris.", "paris", "Paris, not Rome."],
           ["", "   ", "Rome.", "Rome or Paris.", "Parisian food is great.", "I don't know."])
    symbol = {"type": "factual", "expected_answers": ["Fe"], "distractors": ["Na", "S"], "case_sensitive": True}
    _check(symbol, ["Fe", "Iron's chemical symbol is Fe."], ["fe", "It is S, I think Fe.", "Iron"])
    arithmetic = {"type": "factual", "expected_answers": ["12", "twelve"], "distractors": ["11", "13", "35"]}
    _check(arithmetic, ["7 + 5 = 12", "Twelve.", "The answer is 12."], ["112", "13", "It is 11. No wait, 12."])
    # A number's digits after a decimal point or a thousands separator are part of that number (an adapter
    # answered "How many days does a week have?" with "Every week there are 4869.7 hours.").
    week = {"type": "factual", "expected_answers": ["7", "seven"], "distractors": ["5", "6", "8"]}
    _check(week, ["7.", "A week has 7, not 8, days.", "Seven days, 24.5 hours each."],
           ["Every week there are 4869.7 hours.", "7.5 days", "1,7 days", "It has 17."])


def test_explanation_scorer():
    record = {"type": "explanation", "keywords": ["light", "chlorophyll"], "min_words": 15,
              "instruction": "Explain photosynthesis."}
    good = "Plants capture sunlight with chlorophyll in their leaves and turn water and air into sugar they can use."
    _check(record, [good, "Photosynthesis uses light energy, water and carbon dioxide to make sugar and oxygen inside green plants."],
           ["", "Plants use chlorophyll.", "Photosynthesis is a process that happens in many plants and is very important for the planet.",
            "light " * 30])


def test_list_generation_scorer():
    record = {"type": "list_generation", "n_items": 3}
    _check(record, ["1. Apple\n2. Banana\n3. Cherry", "Here are three:\n- apple\n- pear\n- plum\nEnjoy!",
                    "1) red\n2) blue\n3) green", "\u2022 oak\n\u2022 elm\n\u2022 ash"],
           ["", "Apple, banana, cherry", "1. Apple\n2. Banana", "1. Apple\n2. Banana\n3. Cherry\n4. Date",
            "1. Apple\n2. apple.\n3. Cherry", "1.Apple\n2.Banana\n3.Cherry"])


def _if_record(*specs, split="trained", record_id="t1"):
    """An instruction_following record with constraints given as (family, params)."""
    constraints = [{"family": family, "params": params, "wording_id": f"{family}.test1", "text": "(hand-written)"}
                   for family, params in specs]
    return {"id": record_id, "type": "instruction_following", "instruction": "Describe the ocean.", "task": "Describe the ocean.",
            "constraints": constraints, "constraint_split": split}


@pytest.mark.parametrize("specs,passing,failing", [
    ([("words_max", {"max_words": 5})], ["Waves crash on sand.", "Blue and vast."],
     ["The ocean is big, blue and very deep.", "..."]),
    ([("keyword_include", {"keywords": ["bright"]})], ["The moon is Bright tonight."],
     ["The moon is brightly lit.", "The moon glows."]),
    ([("uppercase", {})], ["THE RAIN FALLS ALL DAY.", "I LOVE WINTER 2024!"], ["The rain falls all day.", "THE RAIN falls."]),
    ([("first_word", {"word": "Today"})], ["Today the sky is clear.", '"Today, I walked."'],
     ["The sky is clear today.", "Todays are long."]),
    ([("sentences_exact", {"num_sentences": 2})], ["It rains. The streets shine!", "Is it cold? Yes, very"],
     ["It rains.", "It rains. It pours. It floods."]),
    # success means every constraint passes
    ([("lowercase", {}), ("words_max", {"max_words": 4})], ["waves on sand.", "- blue\n- vast"],
     ["Waves on sand.", "waves crash on the sand.", "WAVES."]),
    ([("sections", {"num_sections": 2, "separator": "***"}), ("capital_words", {"relation": "at_least", "count": 1})],
     ["Calm SEA.\n***\nWild waves."], ["Calm sea.\n***\nWild waves.", "Calm SEA. Wild waves."]),
])
def test_instruction_following_scorer(specs, passing, failing):
    _check(_if_record(*specs), passing, failing + [""])


def test_instruction_following_result_lists_each_constraint():
    record = _if_record(("lowercase", {}), ("words_max", {"max_words": 3}))
    result = score_response(record, "calm blue waves everywhere")
    assert result["success"] is False and result["reason"].startswith("words_max:")
    assert [(c["family"], c["passed"]) for c in result["constraints"]] == [("lowercase", True), ("words_max", False)]


def test_instruction_following_malformed_record_raises():
    for bad in ({"type": "instruction_following", "constraint_split": "trained"},
                _if_record(("rhyme", {})),
                _if_record(("words_max", {"max_words": "five"})),
                {**_if_record(("words_max", {"max_words": 5})), "constraints": []}):
        with pytest.raises(BadInputError):
            score_response(bad, "Hi.")
    # a record of the earlier one-constraint format is named as such
    with pytest.raises(BadInputError, match="earlier test-set format"):
        score_response({"id": "test_0004", "type": "instruction_following", "constraint": "max_words", "max_words": 5}, "Hi.")


def test_instruction_following_half_trained_half_held_out():
    for count, seed in ((200, 999), (200, 5), (500, 1)):
        records = [r for r in build_test_set(count, seed) if r["type"] == "instruction_following"]
        splits = Counter(r["constraint_split"] for r in records)
        assert splits["trained"] == splits["held_out"] == len(records) // 2
        families = {c["family"] for r in records for c in r["constraints"]}
        assert set(catalogue.HELD_OUT_FAMILIES) <= families and len(families & set(catalogue.TRAINED_FAMILIES)) >= 10
        assert all(r["catalogue_version"] == catalogue.CATALOGUE_VERSION for r in records)
    assert check_test_set(build_test_set(200))["instruction_following_by_split"] == {"trained": 20, "held_out": 20}


def test_check_test_set_refuses_wrong_split_or_bad_constraints():
    records = build_test_set(10, seed=2)
    index = next(i for i, r in enumerate(records) if r["type"] == "instruction_following")
    wrong = {"trained": "held_out", "held_out": "trained"}[records[index]["constraint_split"]]
    for broken in ({**records[index], "constraint_split": wrong},
                   {**records[index], "constraints": [{**records[index]["constraints"][0], "family": "rhyme"}]}):
        qc = check_test_set(records[:index] + [broken] + records[index + 1:])
        assert not qc["passed"] and any(records[index]["id"] in f for f in qc["failures"])


def test_group_instruction_following_by_split_and_family():
    records = [_if_record(("lowercase", {}), ("words_max", {"max_words": 5}), record_id="a"),
               _if_record(("sections", {"num_sections": 2, "separator": "***"}), split="held_out", record_id="b"),
               _if_record(("lowercase", {}), record_id="c"),
               _if_record(("uppercase", {}), record_id="not-scored"),
               {"id": "d", "type": "factual", "expected_answers": ["x"], "distractors": []}]
    outcomes = {"a": True, "b": False, "c": False, "d": True}
    groups = group_instruction_following(records, outcomes)
    assert groups["by_split"] == {"trained": [True, False], "held_out": [False]}
    assert groups["by_family"] == {"lowercase": [True, False], "sections": [False], "words_max": [True]}
    with pytest.raises(BadInputError, match="constraint_split"):
        group_instruction_following([{**records[0], "constraint_split": "maybe"}], outcomes)


def test_creative_scorer():
    record = {"type": "creative", "min_words": 10, "max_words": 40, "topic_keyword": "kitten"}
    poem = "A little kitten lost its way,\nit wandered through the rain all day,\nuntil a child said come and stay."
    _check(record, [poem, "The kittens slept in a box by the fire while the snow kept falling outside all night."],
           ["", "A tiny kitten.", "The puppy slept in a box by the fire while the snow kept falling outside all night.",
            " ".join(["kitten"] * 50), "kitten kitten kitten kitten kitten kitten kitten kitten kitten kitten kitten"])


def test_scorers_registry_and_generated_records_score():
    assert set(SCORERS) == set(TYPES)
    for type_name in TYPES:
        result = score_response(_one(type_name), "1. Something\n2. Else")
        assert result["scored"] and result["success"] in (True, False) and result["reason"]


def test_unknown_or_missing_type_is_unscored():
    for record in ({"type": "mmlu", "instruction": "x"}, {"instruction": "x"}):
        assert score_response(record, "anything") == {"scored": False, "success": None,
                                                      "reason": f"no scorer for type {record.get('type')!r}"}


def test_known_type_missing_metadata_raises():
    with pytest.raises(BadInputError):
        score_response({"id": "test_0001", "type": "list_generation"}, "1. a")


def test_count_sentences():
    assert count_sentences("One. Two! Three?") == 3
    assert count_sentences("No terminal punctuation") == 1
    assert count_sentences("Wait... what?") == 2
    assert count_sentences("") == 0
