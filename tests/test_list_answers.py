"""List answers: which instructions ask for a list, which answers can be one, the rewrite to one item
per line (checked), the candidate filter and the phase-5 record."""

import random
from types import SimpleNamespace

import pytest

from test_constraint_data import _Appender, _judged


@pytest.mark.parametrize("instruction, count, style", [
    ("List five fruits.", 5, "numbered"),
    ("Name 4 colours.", 4, "numbered"),
    ("What are three animals that live in the ocean? Answer with a list.", 3, "numbered"),
    ("Give me a list of ten board games.", 10, "numbered"),
    ("List the planets of the solar system.", None, "numbered"),
    ("Name some fruits as a bulleted list.", None, "bullets"),
    ("Write a shopping list for a picnic.", None, "numbered"),
    ("Suggest two ways to save water, in 3 sentences.", 2, "numbered"),  # "3 sentences" counts no items
])
def test_list_requests_and_their_counts(instruction, count, style):
    from utils.list_answers import ListRequest, requested_list

    assert requested_list(instruction) == ListRequest(count, style)


# The count is read only where the number quantifies the listed things (after a list verb, "list of", a
# counted verb or "top"); a number that is a value, a bound, a range or one of two counts gives None.
@pytest.mark.parametrize("instruction, count", [
    ("List 5 fruits.", 5),
    ("Name three animals.", 3),
    ("Give me five tips for sleeping better.", 5),
    ("Write a list of 10 things to pack.", 10),
    ("What are 3 benefits of tea?", 3),
    ("Provide 4 examples of renewable energy.", 4),
    ("Suggest two names for a cat.", 2),
    ("Please list seven wonders of the world.", 7),
    ("Make a list of 6 healthy snacks.", 6),
    ("Give 3 reasons why exercise helps.", 3),
    ("Identify the three main causes of the war.", 3),
    ("What are the top 5 places to visit in Paris?", 5),
    ("Give me 3 good reasons to learn Python.", 3),
    ("List five small red fruits.", 5),
    ("Name your top 3 films as a list.", 3),
    ("Tell me 4 jokes.", 4),
    ("List the top 10 songs of 1990.", 10),  # the year is no count
    ("Name three fruits. List three vegetables.", 3),  # two slots, one count
    ("List words that begin with 8.", None),
    ("List the days of the month with the number 0 through 9.", None),
    ("Name animals that live more than 5 years, as a list.", None),
    ("Tell the alphabet and number 1-9 in a list.", None),
    ("List 2 or 3 fruits.", None),
    ("List 3 to 5 fruits.", None),
    ("List 2-5 fruits.", None),
    ("List at least 3 fruits.", None),
    ("List about 5 fruits.", None),
    ("List fruits from 2 countries.", None),
    ("List books for kids aged 8 to 10.", None),
    ("List numbers between 2 and 9.", None),
    ("List the multiples of 3.", None),
    ("List the characters on page 5.", None),
    ("List the new features of version 2.", None),
    ("List things to do at 5pm.", None),
    ("List 3D shapes.", None),
    ("List 3-letter words.", None),
    ("List ten-minute recipes.", None),
    ("Give me a list of 5 minute recipes.", None),  # minutes, not items
    ("List 3 very short sentences about cats.", None),  # sentences after two adjectives
    ("Name three fruits and list 4 vegetables.", None),  # two different counts: ambiguous
    ("Write a shopping list with 5 items.", 5),  # the noun names the items, so "with" is no value here
    ("Reply using a numbered list that has exactly 7 entries.", 7),
    ("Write a list with at least 5 items.", None),  # a bound, not a count
    ("Write a list with 3 to 5 items.", None),
    ("Write a shopping list as 4 numbered lines.", 4),
    ("List animals with exactly 4 legs.", None),
    ("Write a list of animals with 5 legs.", None),  # "with" makes a number a value: rather no count than a wrong one
    ("List 12 fruits.", None),  # more than MAX_ITEMS
])
def test_the_count_is_read_only_where_the_number_counts_the_listed_things(instruction, count):
    from utils.list_answers import ListRequest, requested_list

    assert requested_list(instruction) == ListRequest(count, "numbered")


@pytest.mark.parametrize("instruction", [
    "Explain how rain forms.", "Write a story in 3 sentences about a dog.", "Describe a playlist for a long drive.",
    "Why do people listen to music?", "Name the capital of France.", "Summarise the plot in 5 words.",
])
def test_instructions_that_ask_for_no_list(instruction):
    from utils.list_answers import requested_list

    assert requested_list(instruction) is None


def test_an_inline_enumeration_becomes_one_checked_item_per_line():
    from utils.constraints import check, from_record
    from utils.list_answers import list_answer, requested_list

    answer = list_answer(requested_list("Name four colours."), "Red, orange, blue and green.")
    assert answer.response == "1. Red\n2. Orange\n3. Blue\n4. Green" and answer.mode == "rewritten"
    assert answer.constraint == {"family": "numbered_items", "params": {"num_items": 4}, "wording_id": "numbered_items.train1", "text": ""}
    assert check(from_record(answer.constraint), answer.response).passed
    # More items than asked: the first ones, duplicates dropped first; "etc." is no item.
    cut = list_answer(requested_list("List 3 things to pack."), "A towel, sunscreen, a towel, a hat, a book, etc.")
    assert cut.response == "1. A towel\n2. Sunscreen\n3. A hat"
    # A lead-in ending with a colon stays on its own line; bullets where the instruction says so.
    bullets = list_answer(requested_list("Name some fruits as a bulleted list."), "Here are some: apples, pears; plums or figs!")
    assert bullets.response == "Here are some:\n- Apples\n- Pears\n- Plums\n- Figs"
    assert bullets.constraint["family"] == "bullet_items" and bullets.constraint["params"] == {"num_bullets": 4}


def test_a_line_list_is_kept_when_its_count_is_right_and_prose_is_no_list():
    from utils.list_answers import list_answer, requested_list

    request = requested_list("List three animals.")
    kept = list_answer(request, "1. Cat\n2. Dog\n3. Cow\n")
    assert kept.response == "1. Cat\n2. Dog\n3. Cow" and kept.mode == "measured"
    assert list_answer(request, "1. Cat\n2. Dog") is None  # a line list of the wrong count
    assert list_answer(request, "Cats, dogs.") is None  # fewer items than asked
    assert list_answer(request, "I have a cat and it sleeps all day, which is nice.") is None  # prose
    assert list_answer(request, "Cats are calm. Dogs, cows and hens are loud.") is None  # a sentence end inside
    assert list_answer(request, "My old cat who sleeps all day long, a dog, a cow.") is None  # a clause, not an item
    assert list_answer(request, "Cat, dog\ncow") is None  # two lines but no list lines


def test_every_rewrite_passes_its_checker_on_random_enumerations():
    from utils.constraints import check, from_record
    from utils.list_answers import list_answer, requested_list

    rng = random.Random(0)
    words = ["apple", "red car", "the blue sea", "Über café", "x-ray", "rock 'n' roll", "ice cream cone"]
    for _ in range(500):
        n = rng.randint(2, 8)
        items = [rng.choice(words) + f" {i}" for i in range(n)]
        text = ", ".join(items[:-1]) + rng.choice([", and ", " and ", " or ", ", "]) + items[-1] + rng.choice(["", ".", "!", " etc."])
        asked = rng.randint(2, n)
        answer = list_answer(requested_list(f"List {asked} things."), text)
        assert answer is not None and check(from_record(answer.constraint), answer.response).passed
        assert answer.response.count("\n") == asked - 1


def test_the_candidate_filter_names_an_answer_that_is_no_list():
    from utils.response_selection import filter_reasons

    ok = {"response": "Fine.", "raw_response": " Fine.", "finish_reason": "stop"}
    assert filter_reasons(ok, None, not_a_list=True) == ["not_a_list"]


def test_phase_5_writes_a_list_request_as_its_line_list_and_never_relabels_it(tiny_model_dir):
    from utils.clean_model_loader import CleanModelLoader
    from utils.constraint_data import constrain_accepted
    from utils.constraints import TRAINED_FAMILIES
    from utils.list_answers import requested_list

    _, tokenizer, _ = CleanModelLoader(str(tiny_model_dir), run_sentinels=False).load()
    config = SimpleNamespace(seed=3, constraint_fraction=1.0, constraint_variants=0, constraint_families=list(TRAINED_FAMILIES))
    pair = {**_judged("r00-00000", "Red, blue and green."), "instruction": "Name three colours."}
    files = {"judged": _Appender([pair]), "constrained": _Appender()}
    constrain_accepted(files, ["r00-00000"], config, tokenizer, {}, {"r00-00000": requested_list(pair["instruction"])})
    (record,) = files["constrained"]
    assert record["constraint_mode"] == "list_format" and record["constraint_modes"] == ["rewritten"]
    assert record["instruction"] == record["original_instruction"] == "Name three colours."  # nothing appended
    assert record["response"] == "1. Red\n2. Blue\n3. Green" and record["original_response"] == "Red, blue and green."
    assert [c["passed"] for c in record["constraint_checks"]] == [True]
    # An accepted list request whose answer is no list got past the candidate filter: a bug, never a record.
    prose = {**pair, "id": "r00-00001", "response": "Colours are nice."}
    files = {"judged": _Appender([prose]), "constrained": _Appender()}
    with pytest.raises(RuntimeError, match="asks for a list"):
        constrain_accepted(files, ["r00-00001"], config, tokenizer, {}, {"r00-00001": requested_list(prose["instruction"])})
