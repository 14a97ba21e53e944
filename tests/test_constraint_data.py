"""Constraint data in Stage 1: accepted pairs relabeled with trained-family constraints, correct by
construction and checked again, chosen deterministically by seed and id."""

import json
import random
from types import SimpleNamespace

import pytest

RESPONSES = [
    "Rivers carry water from hills to the sea. They shape valleys over thousands of years. Many towns grew beside them.",
    "1. Apples\n2. Pears\n3. Plums",
    "Exercise keeps the heart strong, and it lifts the mood.\n\nIt also helps people sleep better at night.",
    "Tokyo",
    "The moon circles the earth about once a month, and its light is reflected sunlight.",
]


def test_selection_is_a_seeded_hash_of_the_id():
    from utils.constraint_data import selected_for_constraints

    keys = [f"s{s:03d}-r00-{i:05d}" for s in range(3) for i in range(400)]
    chosen = [k for k in keys if selected_for_constraints(42, k, 0.3)]
    assert 0.25 < len(chosen) / len(keys) < 0.35
    assert chosen == [k for k in reversed(keys) if selected_for_constraints(42, k, 0.3)][::-1]  # order does not matter
    assert chosen != [k for k in keys if selected_for_constraints(43, k, 0.3)]
    assert not any(selected_for_constraints(42, k, 0.0) for k in keys) and all(selected_for_constraints(42, k, 1.0) for k in keys)


def test_relabeled_pairs_pass_every_checker_and_use_training_wordings_only():
    from utils.constraint_data import constrain_pair, recheck
    from utils.constraints import HELD_OUT_FAMILIES, TRAINED_FAMILIES, normalize_text

    modes, families, counts = set(), set(), set()
    for seed in range(200):
        task, response = f"Describe thing number {seed}.", RESPONSES[seed % len(RESPONSES)]
        result = constrain_pair(task, response, TRAINED_FAMILIES, random.Random(seed))
        if result is None:
            continue
        assert all(check["passed"] for check in recheck(result.constraints, result.response))
        assert result.instruction.startswith(task) and all(c["text"] in result.instruction for c in result.constraints)
        assert all(".train" in c["wording_id"] for c in result.constraints)
        assert not {c["family"] for c in result.constraints} & set(HELD_OUT_FAMILIES)
        assert result.mode == ("measured" if result.response == normalize_text(response).strip() else "rewritten")
        assert len(result.modes) == len(result.constraints) and set(result.modes) <= {"measured", "rewritten"}
        modes.add(result.mode)
        families |= {c["family"] for c in result.constraints}
        counts.add(len(result.constraints))
    assert modes == {"measured", "rewritten"} and counts == {1, 2, 3} and len(families) >= 12


def test_relabeling_is_deterministic_and_keeps_to_the_families_asked_for():
    from utils.constraint_data import constrain_pair

    first = constrain_pair("Name some fruit.", RESPONSES[1], ["numbered_items", "lowercase"], random.Random(5))
    again = constrain_pair("Name some fruit.", RESPONSES[1], ["numbered_items", "lowercase"], random.Random(5))
    assert first == again and {c["family"] for c in first.constraints} <= {"numbered_items", "lowercase"}
    nothing = constrain_pair("Say it.", "Ok", ["words_min"], random.Random(1))
    assert nothing is None  # a two-word answer satisfies no word minimum of the grid, and the family has no rewrite


def test_a_structure_is_never_rewritten_by_cutting_sentences():
    """The catalogue's rewrite splits sentences when a response has fewer than the units asked for
    ("Red shirts." / "Are more." / "Colorful than." / "Blue ones." was seen on the bundled model)."""
    from utils.constraint_data import constrain_pair
    from utils.constraints import count_sentences

    structures = ["sentences_exact", "paragraphs", "bullet_items", "numbered_items"]
    one_sentence = "Red shirts are more colorful than blue ones."
    for seed in range(60):
        result = constrain_pair("Compare shirts.", one_sentence, structures, random.Random(seed))
        assert result is None or result.mode == "measured", result  # only "exactly one sentence" fits as it is
    for seed in range(60):
        result = constrain_pair("Talk about rivers.", RESPONSES[0], structures, random.Random(seed))
        if result is not None and result.mode == "rewritten":
            assert count_sentences(result.response) <= count_sentences(RESPONSES[0])


def test_family_flag_refuses_unknown_and_held_out_names():
    import argparse

    from utils.constraint_data import family_names

    assert family_names("words_max, lowercase") == ["words_max", "lowercase"]
    with pytest.raises(argparse.ArgumentTypeError, match="unknown constraint family 'nope'"):
        family_names("words_max,nope")
    with pytest.raises(argparse.ArgumentTypeError, match="'words_range' is held out of training"):
        family_names("words_range")
    assert "held out" in family_names.problem(["capital_words"]) and family_names.problem(["title"]) is None


def test_constraint_summary_recomputes_the_checker_pass_rate():
    from utils.constraint_data import constraint_summary
    from utils.constraints import CATALOGUE_VERSION, sample_constraint, to_record

    lower = to_record(sample_constraint("lowercase", random.Random(0)))
    records = [{"id": "a", "response": "all lower here.", "constraints": [lower], "constraint_mode": "rewritten"},
               {"id": "b", "response": "Not Lower.", "constraints": [lower], "constraint_mode": "measured"},  # edited by hand
               {"id": "c", "response": "x", "constraints": [{"family": "nope"}], "constraint_mode": "measured"},  # unreadable
               {"id": "d", "response": "plain", "constraints": [], "constraint_mode": None},
               {"id": "e", "response": "all lower.", "constraints": [lower], "constraint_mode": None}]  # constrained by hand
    summary = constraint_summary(records)
    assert summary["catalogue_version"] == CATALOGUE_VERSION
    assert (summary["constrained"], summary["records"], summary["constrained_fraction"]) == (4, 5, 0.8)
    assert summary["checker_pass_rate"] == pytest.approx(2 / 4) and summary["failed_ids"] == ["b", "c"]
    assert summary["per_family"] == {"lowercase": 3, "nope": 1}
    assert summary["modes"] == {"measured": 2, "rewritten": 1, "unrecorded": 1}
    json.dumps(summary, sort_keys=True)  # as the manifest writes it
    assert constraint_summary(records[3:4])["checker_pass_rate"] is None


class _Appender(list):
    """Enough of JsonlAppender for the phase: records, membership by id, append."""

    @property
    def records(self):
        return list(self)

    def __contains__(self, key):
        return any(r["id"] == key for r in self)

    def append(self, record):
        super().append(record)


def _judged(key, response, accepted=True):
    return {"id": key, "round": 0, "instruction": "Describe rivers.", "response": response, "accepted": accepted}


def test_the_phase_writes_one_checked_record_per_chosen_pair(tiny_model_dir):
    from utils.clean_model_loader import CleanModelLoader
    from utils.constraint_data import constrain_accepted, recheck
    from utils.constraints import TRAINED_FAMILIES
    from utils.records import ConstrainedPairRecord, field_names

    _, tokenizer, _ = CleanModelLoader(str(tiny_model_dir), run_sentinels=False).load()
    config = SimpleNamespace(seed=3, constraint_fraction=1.0, constraint_variants=0, constraint_families=list(TRAINED_FAMILIES))
    files = {"judged": _Appender([_judged(f"r00-{i:05d}", RESPONSES[i % 5]) for i in range(6)] + [_judged("r00-00099", "x", False)]),
             "constrained": _Appender()}
    keys = [f"r00-{i:05d}" for i in range(6)] + ["r00-00099"]
    constrain_accepted(files, keys, config, tokenizer)
    assert [r["id"] for r in files["constrained"]] == keys[:6]  # the rejected pair is never relabeled
    for record in files["constrained"]:
        assert set(record) == set(field_names(ConstrainedPairRecord))
        assert record["original_response"] in RESPONSES and record["original_instruction"] == "Describe rivers."
        if record["constraints"]:
            assert record["constraint_checks"] == recheck(record["constraints"], record["response"])
            assert all(c["passed"] for c in record["constraint_checks"]) and record["n_response_tokens"] > 0
    before = list(files["constrained"])
    constrain_accepted(files, keys, config, tokenizer)  # a resumed run adds nothing
    assert list(files["constrained"]) == before


def test_a_relabeled_pair_that_fails_its_checker_is_a_bug_not_a_record(tiny_model_dir, monkeypatch):
    import utils.constraint_data as constraint_data
    from utils.clean_model_loader import CleanModelLoader
    from utils.constraints import TRAINED_FAMILIES

    _, tokenizer, _ = CleanModelLoader(str(tiny_model_dir), run_sentinels=False).load()
    real = constraint_data.constrain_pair

    def broken(*args, **kwargs):  # a relabeling whose response no longer satisfies its constraints
        result = real(*args, **kwargs)
        return result and constraint_data.ConstrainedPair(result.instruction, "", result.constraints, result.modes, result.mode)

    monkeypatch.setattr(constraint_data, "constrain_pair", broken)
    config = SimpleNamespace(seed=3, constraint_fraction=1.0, constraint_variants=0, constraint_families=list(TRAINED_FAMILIES))
    files = {"judged": _Appender([_judged("r00-00000", RESPONSES[0])]), "constrained": _Appender()}
    with pytest.raises(RuntimeError, match="fails its own checker"):
        constraint_data.constrain_accepted(files, ["r00-00000"], config, tokenizer)
    assert list(files["constrained"]) == []


def test_generated_constraints_are_seeded_by_id_and_rebuild_their_instruction():
    from utils.constraint_data import generated_constraints
    from utils.constraints import HELD_OUT_FAMILIES, TRAINED_FAMILIES, build_instruction, from_record

    drawn = [generated_constraints(7, f"r00-{i:05d}", "Describe rivers.", TRAINED_FAMILIES) for i in range(40)]
    assert drawn == [generated_constraints(7, f"r00-{i:05d}", "Describe rivers.", TRAINED_FAMILIES) for i in range(40)]
    assert drawn != [generated_constraints(8, f"r00-{i:05d}", "Describe rivers.", TRAINED_FAMILIES) for i in range(40)]
    families = {c["family"] for _, constraints in drawn for c in constraints}
    assert families <= set(TRAINED_FAMILIES) and not families & set(HELD_OUT_FAMILIES) and len(families) > 8
    assert {len(constraints) for _, constraints in drawn} == {1, 2}
    for instruction, constraints in drawn:
        assert instruction.startswith("Describe rivers. ")
        assert build_instruction("Describe rivers.", [from_record(c) for c in constraints])[0] == instruction
    only = generated_constraints(7, "r00-00000", "Describe rivers.", ["lowercase"])
    assert [c["family"] for c in only[1]] == ["lowercase"]


def test_a_generated_pair_is_recorded_as_it_was_written_and_never_relabeled(tiny_model_dir):
    from utils.clean_model_loader import CleanModelLoader
    from utils.constraint_data import constrain_accepted, generated_constraint_pass_rates, recheck
    from utils.constraints import sample_constraint, to_record

    _, tokenizer, _ = CleanModelLoader(str(tiny_model_dir), run_sentinels=False).load()
    lower = to_record(sample_constraint("lowercase", random.Random(0)))
    config = SimpleNamespace(seed=3, constraint_fraction=1.0, constraint_variants=0, constraint_families=["uppercase"])
    passing = {**_judged("r00-00000", "rivers run to the sea."), "instruction": "Describe rivers. " + lower["text"]}
    files = {"judged": _Appender([passing]), "constrained": _Appender()}
    constrain_accepted(files, ["r00-00000"], config, tokenizer, {"r00-00000": ("Describe rivers.", passing["instruction"], [lower])})
    (record,) = files["constrained"]
    assert record["constraint_mode"] == "generated" and record["constraint_modes"] == ["generated"]
    assert record["response"] == record["original_response"] == "rivers run to the sea."  # not upper-cased by phase 5
    assert record["original_instruction"] == "Describe rivers." and record["instruction"] == passing["instruction"]
    assert record["constraint_checks"] == recheck([lower], record["response"]) and record["constraint_checks"][0]["passed"]
    # A generated pair that misses its constraint got past the candidate filter: a bug, never a record.
    failing = {**passing, "id": "r00-00001", "response": "Rivers run to the sea."}
    files = {"judged": _Appender([failing]), "constrained": _Appender()}
    with pytest.raises(RuntimeError, match="fails its own checker"):
        constrain_accepted(files, ["r00-00001"], config, tokenizer, {"r00-00001": ("Describe rivers.", failing["instruction"], [lower])})
    scored = [{"constraint_checks": recheck([lower], text)} for text in ("all lower.", "Not lower.", "fine too.")] + [{"constraint_checks": None}]
    assert generated_constraint_pass_rates(scored) == {"candidates": {"lowercase": 3}, "passed": {"lowercase": 2}}


def test_variants_are_extra_relabeled_copies_that_resume_by_id(tiny_model_dir):
    from utils.clean_model_loader import CleanModelLoader
    from utils.constraint_data import constrain_accepted, recheck
    from utils.constraints import TRAINED_FAMILIES, sample_constraint, to_record
    from utils.records import base_pair_id, variant_id

    _, tokenizer, _ = CleanModelLoader(str(tiny_model_dir), run_sentinels=False).load()
    # fraction 0: the pairs themselves stay as they are; only their variants carry constraints
    config = SimpleNamespace(seed=3, constraint_fraction=0.0, constraint_variants=2, constraint_families=list(TRAINED_FAMILIES))
    lower = to_record(sample_constraint("lowercase", random.Random(0)))
    generated = {**_judged("r00-00006", "rivers run to the sea."), "instruction": "Describe rivers. " + lower["text"]}
    files = {"judged": _Appender([_judged(f"r00-{i:05d}", RESPONSES[i % 5]) for i in range(6)] + [generated]),
             "constrained": _Appender()}
    keys = [f"r00-{i:05d}" for i in range(7)]
    constrain_accepted(files, keys, config, tokenizer, {"r00-00006": ("Describe rivers.", generated["instruction"], [lower])})
    written = [r["id"] for r in files["constrained"]]
    # two variants per relabeled pair, none for the pair answered under its constraints
    assert written == [variant_id(key, j) for key in keys[:6] for j in (1, 2)] + ["r00-00006"]
    by_pair = {}
    for record in files["constrained"]:
        if record["id"] == "r00-00006":
            continue
        pair = base_pair_id(record["id"])
        assert record["original_instruction"] == "Describe rivers." and record["original_response"] == RESPONSES[int(pair[-1]) % 5]
        if record["constraints"]:
            assert all(c["passed"] for c in recheck(record["constraints"], record["response"]))
            by_pair.setdefault(pair, set()).add(record["instruction"])
    assert sum(len(instructions) == 2 for instructions in by_pair.values()) >= 3  # fresh draws per variant, not copies
    before = list(files["constrained"])
    constrain_accepted(files, keys, config, tokenizer, {"r00-00006": ("Describe rivers.", generated["instruction"], [lower])})
    assert list(files["constrained"]) == before
    # one more variant asked later: only the missing ones are written, the first two unchanged
    constrain_accepted(files, keys[:6], SimpleNamespace(**{**vars(config), "constraint_variants": 3}), tokenizer)
    assert [r["id"] for r in files["constrained"]][len(before):] == [variant_id(key, 3) for key in keys[:6]]


def test_variant_ids_group_with_their_pair():
    from utils.records import base_pair_id, count_pairs, first_pairs, is_pair, variant_id

    assert variant_id("s001-r00-00007", 2) == "s001-r00-00007~v2" and base_pair_id("s001-r00-00007~v2") == "s001-r00-00007"
    assert base_pair_id("s001-r00-00007") == "s001-r00-00007"
    records = [{"id": i} for i in ("a", "a~v1", "a~v2", "b", "c", "c~v1")]
    assert [r["id"] for r in first_pairs(records, 2)] == ["a", "a~v1", "a~v2", "b"]
    assert first_pairs(records, 3) == records and first_pairs(records, None) == records and first_pairs(records, 0) == []
    assert is_pair("a") and not is_pair("a~v1") and count_pairs(records) == 3 and count_pairs(first_pairs(records, 2)) == 2
    # the mark sorts a variant right after its pair, before the next pair (the merge walks ids in order)
    ids = ["s000-r00-00001", variant_id("s000-r00-00000", 1), "s000-r00-00000", variant_id("s000-r00-00009", 10)]
    assert sorted(ids) == ["s000-r00-00000", variant_id("s000-r00-00000", 1), "s000-r00-00001", "s000-r00-00009~v10"]
