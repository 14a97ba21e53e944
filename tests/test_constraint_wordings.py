"""Training wordings of the constraint catalogue (issue 14): enough of them per trained family, varied,
well-formed for any sampled parameters, and far enough from every test wording that neither the
5-word rule below nor the evaluation's contamination rule can tie a training instruction to the test set."""

import random
import re
import string
from dataclasses import replace

import pytest

from utils.constraints import (
    FAMILIES,
    MIN_TRAINING_WORDINGS,
    TRAINED_FAMILIES,
    Constraint,
    build_instruction,
    compatible,
    from_record,
    sample_constraint,
    to_record,
    validate_catalogue,
)
from utils.dedup import normalize_instruction
from utils.exit_codes import BadInputError

REQUEST = "Describe a river."
RUN = 5  # words: a training wording may share no run this long with any test wording
SEEDS = range(30)
# constraints_v1 training wordings that share a 5-word run with a test wording. They stay: a wording id
# ("end_mark.train1") indexes into the tuple, so editing them would change what earlier records mean.
# Most runs hold a parameter ('the words "golden" and "wonder"', 'with "I hope this helps."').
V1_OVERLAPS = frozenset({
    "uppercase.train3",  # "be written in all caps" (capital_words.test3)
    "end_mark.train1", "first_word.train3", "start_phrase.train1", "end_phrase.train2", "json_object.train1",
    "title.train1", *(f"keyword_include.train{i}" for i in range(1, 5)), *(f"keyword_forbid.train{i}" for i in range(1, 5)),
})


def _params(family, seed):
    params = family.sample(random.Random(seed))
    return {**params, "request": REQUEST} if "request" in family.params else params


def _tagged_words(template, fields):
    """The rendered wording's normalized words, each with whether it came from a parameter."""
    tagged = []
    for literal, name, spec, _ in string.Formatter().parse(template):
        tagged += [(word, False) for word in normalize_instruction(literal).split()]
        if name is not None:
            tagged += [(word, True) for word in normalize_instruction(format(fields[name], spec or "")).split()]
    return tagged


def _runs(template, fields):
    """Runs of RUN words of the rendered wording, except those made of parameter words alone (a
    six-word end phrase is the same in every wording that asks for it)."""
    tagged = _tagged_words(template, fields)
    assert " ".join(w for w, _ in tagged) == normalize_instruction(template.format(**fields))
    return {" ".join(w for w, _ in tagged[i:i + RUN]) for i in range(len(tagged) - RUN + 1)
            if not all(from_parameter for _, from_parameter in tagged[i:i + RUN])}


def _training_wordings():
    return [(name, index, wording) for name in TRAINED_FAMILIES for index, wording in enumerate(FAMILIES[name].wordings["train"])]


def test_every_trained_family_has_at_least_12_distinct_training_wordings():
    assert MIN_TRAINING_WORDINGS == 12
    for name in TRAINED_FAMILIES:
        train = FAMILIES[name].wordings["train"]
        assert len(train) >= MIN_TRAINING_WORDINGS, name
        assert len({normalize_instruction(w) for w in train}) == len(train), name
    # varied forms, not one sentence pattern with synonyms
    starts = {normalize_instruction(w).split()[0] for _, _, w in _training_wordings()}
    assert {"please", "could", "make", "your", "i"} <= starts
    assert sum(w.startswith("(") for _, _, w in _training_wordings()) >= len(TRAINED_FAMILIES)


def test_validate_catalogue_refuses_a_trained_family_with_too_few_training_wordings():
    validate_catalogue()
    lowercase = FAMILIES["lowercase"]
    thin = replace(lowercase, name="thin", wordings={"train": lowercase.wordings["train"][:MIN_TRAINING_WORDINGS - 1],
                                                   "test": lowercase.wordings["test"]})
    with pytest.raises(BadInputError, match=f"'thin' has {MIN_TRAINING_WORDINGS - 1} training wordings "
                                            f"\\(at least {MIN_TRAINING_WORDINGS} needed\\)"):
        validate_catalogue({**FAMILIES, "thin": thin})
    validate_catalogue({**FAMILIES, "thin": replace(thin, wordings=lowercase.wordings)})  # 12 are enough


def test_no_training_wording_shares_a_5_word_run_with_any_test_wording():
    test_runs = {}
    for family in FAMILIES.values():
        for index, wording in enumerate(family.wordings["test"]):
            for seed in SEEDS:
                for run in _runs(wording, family.fields(_params(family, seed))):
                    test_runs.setdefault(run, set()).add(f"{family.name}.test{index + 1}")
    shared = {}
    for name, index, wording in _training_wordings():
        family = FAMILIES[name]
        for seed in SEEDS:
            for run in _runs(wording, family.fields(_params(family, seed))) & set(test_runs):
                shared.setdefault(f"{name}.train{index + 1}", {})[run] = sorted(test_runs[run])
    new = {wording_id: runs for wording_id, runs in shared.items() if wording_id not in V1_OVERLAPS}
    assert not new, new
    assert set(shared) == V1_OVERLAPS  # the old ones are known, and the check does find them


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_wording_renders_well_formed_for_50_seeded_samples(split):
    rendered = 0
    for name, family in FAMILIES.items():
        for index, wording in enumerate(family.wordings[split]):
            wording_id = f"{name}.{split}{index + 1}"
            for seed in range(50):
                params = _params(family, seed)
                text = wording.format(**family.fields(params))
                assert not re.search(r"\{\w*\}", text), (wording_id, text)  # no placeholder left unfilled
                assert text == text.strip() and "  " not in text and " ." not in text and " ," not in text, (wording_id, text)
                if split == "train":  # (test wordings stay as they are: "at most 1 words", a sections one ends in "***")
                    assert re.match(r'[A-Z("<]', text) and re.search(r"""[.?!)"]$""", text), (wording_id, text)
                    assert not re.search(r"\b(?:one|1) (?:\w+ )?(?:sentences|paragraphs|items|points|entries|bullets|lines|words|times)\b",
                                         text), (wording_id, text)  # "one sentences"
                if "phrase" in params:  # the quoted phrase carries its own end: no full stop after the quote
                    assert not text.endswith('".'), (wording_id, text)
                constraint = Constraint(name, params, wording_id, text)
                assert from_record(to_record(constraint)) == constraint
                rendered += 1
    assert rendered >= 50 * (sum(len(f.wordings[split]) for f in FAMILIES.values()))


def _training_instructions(count=300, seed=0):
    """Constrained training instructions in training wordings: every training wording at least once
    (in order), every other one with a second compatible constraint drawn as Stage 1 draws it."""
    from utils.completion_prompts import SEED_INSTRUCTIONS

    rng, wordings, records = random.Random(seed), _training_wordings(), []
    for i in range(count):
        name, index, wording = wordings[i % len(wordings)]
        family = FAMILIES[name]
        params = family.sample(rng)  # a repeat_request's request is bound by build_instruction
        constraints = [Constraint(name, params, f"{name}.train{index + 1}", wording.format(**family.fields(params)))]
        if i % 2:
            other = rng.choice([n for n in TRAINED_FAMILIES if compatible(name, n)])
            constraints.append(sample_constraint(other, rng))
        instruction, _ = build_instruction(SEED_INSTRUCTIONS[i % len(SEED_INSTRUCTIONS)], constraints)
        records.append({"id": f"train_{i:04d}", "instruction": instruction})
    assert len(wordings) <= count
    return records


def test_training_instructions_pass_the_evaluations_contamination_rule():
    from utils.evaluation import check_contamination
    from utils.test_set import build_test_set

    training = _training_instructions()
    for seed in (999, 7):
        test_records = build_test_set(200, seed)
        assert sum(r["type"] == "instruction_following" for r in test_records) == 40
        report = check_contamination(test_records, training)
        assert not report["found"] and report["n_training"] == 300, report["overlaps"][:3]
    # the rule does fire on a training instruction that carries a test instruction's words
    leaked = next(r for r in test_records if r["type"] == "instruction_following")
    report = check_contamination(test_records, training + [{"id": "leak", "instruction": f"Please help. {leaked['instruction']}"}])
    assert report["found"] and report["overlaps"][0]["test_id"] == leaked["id"]
