import random
import re
from dataclasses import replace

import pytest

from utils import constraints as C
from utils.constraints import (
    FAMILIES,
    HELD_OUT_FAMILIES,
    TRAINED_FAMILIES,
    Constraint,
    build_instruction,
    check,
    compatible,
    count_sentences,
    count_words,
    from_record,
    get_family,
    paragraphs,
    resolve_families,
    rewrite,
    rewrite_all,
    sample_constraint,
    split_sentences,
    to_record,
    validate_catalogue,
)
from utils.exit_codes import BadInputError

REQUEST = "Describe a river."


def _constraint(family, **params):
    if family == "repeat_request":
        params.setdefault("request", REQUEST)
    return Constraint(family, params, f"{family}.test1", "(hand-written)")


# ---- checkers on hand-written responses ------------------------------------------------------
# (family, params, passing responses, failing responses): at least two of each, edge cases included
CASES = [
    ("words_max", {"max_words": 5}, ["Waves crash on sand.", "1. Blue\n2. vast   \n", "Caf\u00e9 na\u00efve well-known don't."],
     ["The ocean is big, blue and very deep.", "...", "\u0939\u093f\u0928\u094d\u0926\u0940 " * 6]),
    ("words_min", {"min_words": 4}, ["One two three four.", "Stra\u00dfe \u65e5\u672c\u8a9e caf\u00e9 na\u00efve\r\n"],
     ["Three small words.", "- one\n- two\n- three", ""]),
    ("words_range", {"min_words": 3, "max_words": 5}, ["Rain falls on roofs.", "1) Oak\n2) Elm\n3) Ash"],
     ["Too short.", "One two three four five six.", "   "]),
    ("sentences_exact", {"num_sentences": 2}, ["It rains. The streets shine!", "Is it cold? Yes, very",
                                                "He said \"stop.\" Then he left.", "Pi is 3.5 or so. Really."],
     ["It rains.", "It rains. It pours. It floods.", "Wait... what? No!"]),
    ("paragraphs", {"num_paragraphs": 2}, ["First part.\n\nSecond part.", "One.\r\n   \r\nTwo.\r\n",
                                           "Intro:\n- a\n- b\n\nOutro."],
     ["One paragraph only.", "A.\nB.\nC.", "One.\n\nTwo.\n\nThree."]),
    ("bullet_items", {"num_bullets": 3}, ["- oak\n- elm\n- ash", "Trees:\n* oak\n\u2022 elm\n- ash\nDone.",
                                          "  - indented\n  - list   \n  - here  "],
     ["1. oak\n2. elm\n3. ash", "- oak\n- elm", "-oak\n-elm\n-ash", "*bold* text\n- one"]),
    ("numbered_items", {"num_items": 3}, ["1. oak\n2. elm\n3. ash", "Here:\r\n1) red\r\n2) blue\r\n3) green\r\n"],
     ["1. oak\n2. elm", "1. oak\n1. elm\n1. ash", "- oak\n- elm\n- ash", "1.oak\n2.elm\n3.ash"]),
    ("sections", {"num_sections": 2, "separator": "***"}, ["Part one.\n***\nPart two.", "A\n  ***  \nB\n***\n"],
     ["Part one.\n***\n***\nPart two.", "Only one part.", "A\n***\nB\n***\nC"]),
    ("lowercase", {}, ["all quiet here.", "caf\u00e9 \u00e0 la stra\u00dfe, 3 times!"],
     ["All quiet here.", "all quiet h\u00c9re", "123 456", "i\u0307stanbul \u00dc"]),
    ("uppercase", {}, ["THE RAIN FALLS.", "STRASSE \u00c9T\u00c9 2024!"],
     ["The rain falls.", "THE RAIN falls.", "stra\u00dfe", "42"]),
    ("capital_words", {"relation": "at_least", "count": 2}, ["NASA and ESA launch.", "I SAID NO!"],
     ["I am here. A B C.", "Only NASA here.", "nasa and esa"]),
    ("capital_words", {"relation": "at_most", "count": 1}, ["Only NASA here.", "I like it. A 1B"],
     ["NASA and ESA.", "WE ARE HERE"]),
    ("no_commas", {}, ["No commas here.", "Just words and 1000 apples"],
     ["One, two.", "\u65e5\u672c\u3001\u8a9e", "1,000 apples", ""]),
    ("end_mark", {"mark": "?"}, ["Is it?", "Why not?  \r\n"], ["It is.", "Is it?!", "?"]),
    ("keyword_include", {"keywords": ["golden", "Caf\u00e9"]}, ["A GOLDEN caf\u00e9.", "caf\u00e9 golden"],
     ["A golden cafe.", "goldens caf\u00e9", "Caf\u00e9 only."]),
    ("keyword_forbid", {"forbidden": ["very", "nice"]}, ["It was great.", "Everything is nicely done."],
     ["It was VERY good.", "A nice day.", "very-very"]),
    ("keyword_frequency", {"keyword": "light", "count": 2}, ["Light and light.", "LIGHT, light, light!"],
     ["Light and lights.", "Just light.", "sunlight light"]),
    ("first_word", {"word": "Today"}, ["Today the sky is clear.", '"Today, I walked."', "1. today is fine"],
     ["The sky is clear today.", "Todays are long.", "To day."]),
    ("start_phrase", {"phrase": "Here goes:"}, ["Here goes: an answer.", "  here   goes: done"],
     ["So, here goes: an answer.", "Here goes an answer.", "Here goest: no"]),
    ("end_phrase", {"phrase": "That is all."}, ["Rivers flow. That is all.", "1. a\n2. b\nthat is  ALL.  \r\n"],
     ["That is all. Rivers flow.", "That is all", "Rivers flowThat is all.", "That is all. Bye."]),
    ("json_object", {}, ['{"answer": "a river"}', '```json\n{"a": 1, "b": [2]}\n```\n'],
     ["answer: a river", "[1, 2]", "{}", '{"a": 1} trailing']),
    ("quoted", {}, ['"A river runs."', '  \u201cA river runs.\u201d  \n'],
     ['"A river runs.', "A river runs.", '""', "'A river runs.'"]),
    ("title", {}, ["<<Rivers>>\nA river runs.", "\n<<The Caf\u00e9>>\r\n\r\nText here."],
     ["A river runs.\n<<Rivers>>", "<<Rivers>>", "<<>>\nText.", "Title <<Rivers>>\nText."]),
    ("postscript", {}, ["A river runs.\n\nP.S. Rivers are nice.", "Text.\np.s. lower case works"],
     ["P.S. only a postscript", "A river runs. P.S. inline", "A river runs.\nP.S."]),
    ("repeat_request", {}, ["Describe a river.\n\nA river runs to the sea.", "describe  a river. It flows."],
     ["A river runs to the sea.", "Describe a river.", "Describe the river. It flows."]),
]


def test_every_family_has_hand_written_cases():
    counts = {name: [0, 0] for name in FAMILIES}
    for family, _, passing, failing in CASES:
        counts[family][0] += len(passing)
        counts[family][1] += len(failing)
    assert all(p >= 2 and f >= 2 for p, f in counts.values()), counts


@pytest.mark.parametrize("family,params,passing,failing", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_checker_on_hand_written_responses(family, params, passing, failing):
    constraint = _constraint(family, **params)
    for response in passing:
        result = check(constraint, response)
        assert result.passed is True and result.reason, (response, result)
    for response in failing:
        result = check(constraint, response)
        assert result.passed is False and result.reason, (response, result)


def test_text_measures():
    assert count_sentences("One. Two! Three?") == 3 and count_sentences("Wait... what?") == 2
    assert count_sentences("No terminal punctuation") == 1 and count_sentences("") == 0
    assert count_sentences("Fruit, e.g. apples. Mr. Smith agrees. It costs 3.5 dollars in the U.S.A today.") == 3
    assert split_sentences("Intro\n- first item\n- second item.\nTail") == ["Intro", "first item", "second item.", "Tail"]
    assert count_words("1. Apple\n2) Pear\n- well-known\n\u2022 don't") == 4
    assert count_words("\u0939\u093f\u0928\u094d\u0926\u0940 \u092d\u093e\u0937\u093e") == 2  # vowel signs are not breaks
    assert count_words("i\u0307stanbul") == 1
    assert paragraphs("A.\r\n \t\r\nB.\r\n\r\n\r\nC.") == ["A.", "B.", "C."]


# ---- rewrites --------------------------------------------------------------------------------
_VOCAB = ("river stone light morning quiet the a of and to in is was it we they garden city storm "
          "caf\u00e9 na\u00efve Stra\u00dfe \u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac \u65e5\u672c\u8a9e "
          "\u0939\u093f\u0928\u094d\u0926\u0940 \u0130stanbul \ufb01ne \u01c5emal NASA OK I don't well-known 3.5 42 "
          "1,000 e.g. very nice golden").split()
_ENDS = (".", ".", "!", "?", "...", "\u2026", "", '."', ".)")


def _random_sentence(rng):
    words = [rng.choice(_VOCAB) for _ in range(rng.randint(1, 14))]
    words[0] = words[0][:1].upper() + words[0][1:]
    text = " ".join(w + ("," if rng.random() < 0.1 else "") for w in words)
    if rng.random() < 0.1:
        text = f"\u201c{text}\u201d"
    return text + rng.choice(_ENDS) + (" \U0001f642" if rng.random() < 0.05 else "")


def _random_block(rng):
    if rng.random() < 0.3:
        marker = rng.choice(("1.", "1)", "-", "*", "\u2022"))
        lines = []
        for i in range(rng.randint(2, 6)):
            shown = marker.replace("1", str(i + 1)) if marker[0] == "1" else marker
            lines.append(f"{' ' * rng.randint(0, 2)}{shown} {_random_sentence(rng)}")
        return "\n".join(lines)
    return " ".join(_random_sentence(rng) for _ in range(rng.randint(1, 5)))


def random_response(rng: random.Random) -> str:
    """Varied responses: prose, lists of every marker, paragraphs, unicode, CRLF, trailing whitespace."""
    if rng.random() < 0.05:
        return " ".join(rng.choice(_VOCAB) for _ in range(rng.randint(1, 3)))
    joiner = rng.choice(("\n\n", "\n", "\n  \n", "\n***\n", "\n---\n"))
    text = joiner.join(_random_block(rng) for _ in range(rng.randint(1, 4)))
    if rng.random() < 0.2:
        text = text.replace("\n", "\r\n")
    return text + rng.choice(("", "", " ", "\n", "  \r\n"))


def _wording_split(family):
    return "test" if family in HELD_OUT_FAMILIES else "train"


def _sample_bound(family, rng):
    constraint = sample_constraint(family, rng, split=_wording_split(family))
    return build_instruction(REQUEST, [constraint])[1][0]


@pytest.mark.parametrize("family", [name for name, f in FAMILIES.items() if f.rewrite is not None])
def test_rewrite_passes_its_checker_on_1000_random_responses(family):
    rewritten = 0
    for seed in range(1000):
        rng = random.Random(seed)
        response = random_response(rng)
        constraint = _sample_bound(family, rng)
        result = FAMILIES[family].rewrite(C.normalize_text(response), constraint.params)
        if result is not None:
            rewritten += 1
            assert check(constraint, result).passed, (seed, constraint.params, response, result, check(constraint, result))
    assert rewritten >= 500  # None only for responses too short for the parameters drawn


@pytest.mark.parametrize("family", [name for name, f in FAMILIES.items() if f.measure is not None])
def test_measured_parameters_are_satisfied_by_the_response(family):
    measured = 0
    for seed in range(1000):
        rng = random.Random(seed)
        response = C.normalize_text(random_response(rng))
        params = FAMILIES[family].measure(rng, response)
        if params is not None:
            measured += 1
            assert FAMILIES[family].check(response, params)[0], (seed, params, response)
    assert measured >= 100


def test_rewrite_examples_keep_content():
    text = "Rivers carry water to the sea. They shape valleys over time! Fish live in them."
    assert rewrite(_constraint("words_max", max_words=12), text) == "Rivers carry water to the sea. They shape valleys over time!"
    assert rewrite(_constraint("words_max", max_words=3), text) == "Rivers carry water."
    assert rewrite(_constraint("sentences_exact", num_sentences=2), text) == \
        "Rivers carry water to the sea; They shape valleys over time! Fish live in them."
    assert rewrite(_constraint("numbered_items", num_items=4), text) == \
        "1. Rivers carry water.\n2. To the sea.\n3. They shape valleys over time!\n4. Fish live in them."
    assert rewrite(_constraint("lowercase"), "Hello\r\nWorld") == "hello\nworld"
    assert rewrite(_constraint("no_commas"), "Red, green, and 1,000 blue.") == "Red green and 1000 blue."
    assert rewrite(_constraint("title"), text).startswith("<<Rivers carry water to the>>\n\n")
    assert rewrite(_constraint("quoted"), text) == f'"{text}"'
    assert rewrite(_constraint("words_min", min_words=100), text) is None  # no rewrite can add content
    assert rewrite(_constraint("sentences_exact", num_sentences=5), "Two words.") is None
    assert rewrite(_constraint("words_max", max_words=50), text) == text  # already satisfied: unchanged


def test_rewrite_all_combines_compatible_rewrites():
    rng = random.Random(0)
    with_rewrite = [n for n in TRAINED_FAMILIES if FAMILIES[n].rewrite is not None]
    combined = 0
    for seed in range(300):
        rng = random.Random(seed)
        pair = rng.sample(with_rewrite, 2)
        if not compatible(*pair):
            continue
        instruction, constraints = build_instruction(REQUEST, [sample_constraint(n, rng) for n in pair])
        result = rewrite_all(constraints, random_response(rng))
        if result is not None:
            combined += 1
            assert all(check(c, result).passed for c in constraints), (pair, result)
    assert combined >= 100


def test_compatibility_rules():
    assert not compatible("lowercase", "uppercase")
    assert not compatible("title", "paragraphs")  # a title line would be counted as a paragraph
    assert not compatible("repeat_request", "no_commas")  # the repeated request may hold commas
    assert not compatible("words_max", "words_max")
    assert compatible("lowercase", "words_max", "postscript")


# ---- wordings, records, catalogue ------------------------------------------------------------
def test_wordings_deterministic_under_seed():
    for family in FAMILIES:
        for split in ("train", "test"):
            if not FAMILIES[family].wordings[split]:
                continue
            first = [sample_constraint(family, random.Random(seed), split=split) for seed in range(20)]
            assert first == [sample_constraint(family, random.Random(seed), split=split) for seed in range(20)]
            assert len({c.wording_id for c in first}) > 1  # the seed does pick among wordings


def _ngrams(text, n=8):
    tokens = re.findall(r"[a-z0-9]+", text.lower())
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def test_train_and_test_wordings_disjoint_and_held_out_untrainable():
    assert set(HELD_OUT_FAMILIES).isdisjoint(TRAINED_FAMILIES)
    assert set(HELD_OUT_FAMILIES) | set(TRAINED_FAMILIES) == set(FAMILIES) and len(FAMILIES) >= 15
    assert len({FAMILIES[n].kind for n in HELD_OUT_FAMILIES}) >= 3
    train_grams = set().union(*(_ngrams(w) for f in FAMILIES.values() for w in f.wordings["train"]))
    for name, family in FAMILIES.items():
        train, test = family.wordings["train"], family.wordings["test"]
        assert not {w.lower() for w in train} & {w.lower() for w in test}, name
        assert not any(_ngrams(w) & train_grams for w in test), name  # the evaluation's 8-gram rule cannot fire
        assert len(train) + len(test) >= 4
        if name in HELD_OUT_FAMILIES:
            assert not train
            with pytest.raises(BadInputError, match="held out"):
                sample_constraint(name, random.Random(0), split="train")
        else:
            assert len(train) >= C.MIN_TRAINING_WORDINGS and sample_constraint(name, random.Random(0), split="train").wording_id.startswith(
                f"{name}.train")


def test_unknown_family_is_bad_input_naming_it():
    with pytest.raises(BadInputError, match=r"'no_such_rule'.*words_max"):
        get_family("no_such_rule")
    with pytest.raises(BadInputError, match="no_such_rule"):
        sample_constraint("no_such_rule", random.Random(0))
    with pytest.raises(BadInputError, match="no_such_rule"):
        resolve_families(["lowercase", "no_such_rule"])
    with pytest.raises(BadInputError, match="sections.*held out"):
        resolve_families(["lowercase", "sections"], split="train")
    assert resolve_families(["lowercase", "sections"], split="test") == ("lowercase", "sections")


def test_records_round_trip_and_bad_records_refused():
    rng = random.Random(3)
    for family in FAMILIES:
        constraint = sample_constraint(family, rng, split="test")
        assert from_record(to_record(constraint)) == constraint
    good = to_record(sample_constraint("words_max", rng, split="test"))
    for bad in ({**good, "family": "nope"}, {**good, "wording_id": "words_max.test99"},
                {**good, "wording_id": "lowercase.test1"}, {**good, "params": {"max_words": 0}},
                {**good, "params": {"max_words": 5, "extra": 1}}, {k: v for k, v in good.items() if k != "params"}):
        with pytest.raises(BadInputError):
            from_record(bad)


def test_measured_constraints_from_a_response():
    response = "Rivers carry golden water. Golden fish swim there."
    assert sample_constraint("words_max", random.Random(0), response=response).params["max_words"] in (10, 15)
    keyword = sample_constraint("keyword_include", random.Random(0), response=response).params["keywords"]
    assert all(k in response.lower() for k in keyword)
    assert sample_constraint("first_word", random.Random(0), response=response).params == {"word": "Rivers"}
    assert sample_constraint("lowercase", random.Random(0), response=response) is None  # it has capitals
    assert sample_constraint("keyword_frequency", random.Random(0), response=response, split="test").params == \
        {"keyword": "golden", "count": 2}


def test_build_instruction_binds_the_repeat_request_and_puts_it_last():
    rng = random.Random(1)
    repeat, lower = sample_constraint("repeat_request", rng), sample_constraint("lowercase", rng)
    instruction, (first, second) = build_instruction("Describe a river.", [repeat, lower])
    assert instruction == f"Describe a river. {lower.text} {repeat.text}"
    assert (first, second.family) == (lower, "repeat_request")
    assert second.params["request"] == f"Describe a river. {lower.text}"
    assert check(second, f"describe a river. {lower.text.lower()}\n\nrivers run.").passed
    with pytest.raises(BadInputError, match="not bound"):
        check(repeat, "anything at all")


def test_validate_catalogue_refuses_a_rewrite_that_breaks_its_checker(monkeypatch):
    validate_catalogue()
    broken = replace(FAMILIES["lowercase"], name="broken_lowercase", rewrite=lambda text, params: text.upper())
    with pytest.raises(BadInputError, match="'broken_lowercase' rewrite fails its own checker"):
        validate_catalogue({**FAMILIES, "broken_lowercase": broken})
    leaky = replace(FAMILIES["no_commas"], name="leaky", wordings={"train": FAMILIES["no_commas"].wordings["train"],
                                                                  "test": FAMILIES["no_commas"].wordings["train"]})
    with pytest.raises(BadInputError, match="'leaky' shares a wording"):
        validate_catalogue({**FAMILIES, "leaky": leaky})
    with pytest.raises(BadInputError, match="'lowercase' is held out but has training wordings"):
        validate_catalogue(dict(FAMILIES), held_out=HELD_OUT_FAMILIES + ("lowercase",))
    # and a rewrite that fails its checker at run time is a bug (exit 1), never a silently kept answer
    monkeypatch.setitem(FAMILIES, "lowercase", broken)
    with pytest.raises(RuntimeError, match="rewrite fails its own checker"):
        rewrite(_constraint("lowercase"), "Hello there.")
