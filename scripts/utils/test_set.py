"""Held-out test instructions (five types) and the per-type scorers of the paired evaluation.

The set is built from templates that share no text with the Stage 1 generation prompts, from a
private `random.Random(seed)`, so the same seed always gives the same records. Every record
carries the metadata its scorer needs, so scoring never looks anything up elsewhere.

Record schema (all types): id ("test_0001"), type, template, instruction, plus
  factual                expected_answers, distractors, case_sensitive
  explanation            keywords, min_words
  list_generation        n_items
  instruction_following  task (the base task), constraints (one or two, in `constraints.to_record`
                         form, worded with TEST wordings only), constraint_split ("trained": every
                         family is one Stage 1 trains on; "held_out": every family is held out of
                         training), catalogue_version
  creative               min_words, max_words, topic_keyword

Scorers take the response as given (already cleaned) and return
{"scored": bool, "success": bool | None, "reason": str}. An empty response always fails.
instruction_following success is every constraint passing its catalogue checker (the same checkers
Stage 1 uses); its result also lists each constraint's outcome under "constraints".
`group_instruction_following` splits those outcomes by constraint_split and by family.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

from . import constraints as catalogue
from .constraints import count_sentences, count_words, list_items, words
from .exit_codes import BadInputError

__all__ = [
    "TYPES",
    "REQUIRED_FIELDS",
    "SCORERS",
    "build_test_set",
    "check_test_set",
    "score_response",
    "score_factual",
    "score_explanation",
    "score_list_generation",
    "score_instruction_following",
    "score_creative",
    "group_instruction_following",
    "record_constraints",
    "IF_SPLITS",
    "count_words",
    "count_sentences",
    "list_items",
]

TYPES = ("factual", "explanation", "list_generation", "instruction_following", "creative")
REQUIRED_FIELDS = {
    "factual": ("expected_answers", "distractors"),
    "explanation": ("keywords", "min_words"),
    "list_generation": ("n_items",),
    "instruction_following": ("constraints", "constraint_split"),
    "creative": ("min_words", "max_words"),
}

_NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
                 "fifteen sixteen seventeen eighteen nineteen twenty").split()

# ---- factual ---------------------------------------------------------------------------------
_CAPITALS = [pair.split("=") for pair in (
    "France=Paris; Japan=Tokyo; Italy=Rome; Germany=Berlin; Spain=Madrid; Egypt=Cairo; Russia=Moscow; "
    "the United Kingdom=London; China=Beijing; Canada=Ottawa; Australia=Canberra; Greece=Athens; "
    "Portugal=Lisbon; Ireland=Dublin; Norway=Oslo; Sweden=Stockholm; Kenya=Nairobi; Peru=Lima; "
    "Austria=Vienna; Poland=Warsaw; Thailand=Bangkok; South Korea=Seoul; Argentina=Buenos Aires; "
    "Cuba=Havana; Finland=Helsinki; Denmark=Copenhagen; Hungary=Budapest; Belgium=Brussels; "
    "the Netherlands=Amsterdam; Mexico=Mexico City").split("; ")]
_CAPITAL_Q = ("What is the capital of {x}?", "What is the capital city of {x}?", "Name the capital of {x}.",
              "Which city is the capital of {x}?", "Tell me the capital city of {x}.")
_SYMBOLS = [pair.split("=") for pair in (
    "oxygen=O hydrogen=H carbon=C nitrogen=N gold=Au silver=Ag iron=Fe sodium=Na potassium=K copper=Cu "
    "lead=Pb calcium=Ca neon=Ne zinc=Zn sulfur=S chlorine=Cl magnesium=Mg tin=Sn mercury=Hg").split()]
_SYMBOL_Q = ("What is the chemical symbol for {x}?", "Which chemical symbol stands for {x}?",
             "What is the symbol of the element {x}?", "Give the chemical symbol of {x}.")
_PLANETS = "Mercury Venus Earth Mars Jupiter Saturn Uranus Neptune".split()
# (phrasings separated by "|", expected answers, distractors or None for "the other planets")
_FACTS = [
    ("Which planet is known as the Red Planet?|Which planet is called the Red Planet?", "Mars", None),
    ("What is the largest planet in our solar system?|Which planet is the biggest in the solar system?", "Jupiter", None),
    ("Which planet is closest to the Sun?|What is the nearest planet to the Sun?", "Mercury", None),
    ("Which planet is famous for its bright rings?|Which planet has the best-known rings?", "Saturn", None),
    ("Which planet do humans live on?|What is the name of the planet we live on?", "Earth", None),
    ("Which planet is the hottest in our solar system?|What is the hottest planet?", "Venus", None),
    ("Which planet is farthest from the Sun?|What is the most distant planet from the Sun?", "Neptune", None),
    ("How many planets are in our solar system?|How many planets orbit the Sun?", "8|eight", "9|nine|7|seven|10"),
    ("How many days are in a week?|How many days does a week have?", "7|seven", "5|6|8|10"),
    ("How many legs does a spider have?|How many legs do spiders have?", "8|eight", "6|six|4|four|10"),
    ("How many sides does a triangle have?|How many corners does a triangle have?", "3|three", "4|four|5|five"),
    ("How many hours are in a day?|How many hours does one day have?", "24|twenty-four|twenty four", "12|60|7|48"),
    ("How many minutes are in an hour?|How many minutes does one hour have?", "60|sixty", "100|30|24|12"),
    ("How many continents are there on Earth?|How many continents are there?", "7|seven", "5|five|6|six|8"),
    ("At what temperature in degrees Celsius does water freeze?|What is the freezing point of water in Celsius?",
     "0|zero", "100|32|10|4"),
    ("At what temperature in degrees Celsius does water boil?|What is the boiling point of water in Celsius?",
     "100|one hundred", "0|212|50|90"),
    ("What is the largest ocean on Earth?|Which ocean is the biggest?", "Pacific", "Atlantic|Indian|Arctic|Southern"),
    ("What colour is the sky on a clear day?|On a sunny day, what colour is the sky?", "blue",
     "red|green|yellow|grey|gray|black|white|orange"),
    ("What is the largest animal on Earth?|Which animal is the biggest that has ever lived?", "blue whale",
     "elephant|giraffe|shark|dinosaur"),
    ("What is frozen water called?|What do we call water when it freezes?", "ice", "steam|vapour|vapor|snow"),
    ("Who wrote Romeo and Juliet?|Which playwright wrote Romeo and Juliet?", "Shakespeare", "Dickens|Marlowe|Austen"),
    ("What is the fastest land animal?|Which land animal can run the fastest?", "cheetah",
     "lion|horse|leopard|antelope|gazelle"),
    ("Which gas do plants take in from the air to make food?|Which gas do plants absorb for photosynthesis?",
     "carbon dioxide|CO2", "oxygen|nitrogen|hydrogen"),
]


def _arithmetic(rng: random.Random):
    op = rng.choice(("plus", "minus", "times"))
    if op == "plus":
        a, b = rng.randint(2, 50), rng.randint(2, 50)
        value, others = a + b, (a * b, abs(a - b))
    elif op == "minus":
        a = rng.randint(10, 60)
        b = rng.randint(1, a - 2)
        value, others = a - b, (a + b,)
    else:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        value, others = a * b, (a + b,)
    symbol = {"plus": "+", "minus": "-", "times": "*"}[op]
    phrasings = (f"What is {a} {op} {b}?", f"What is {a} {symbol} {b}?", f"Calculate {a} {symbol} {b}.",
                 f"How much is {a} {op} {b}?")
    index = rng.randrange(len(phrasings))
    expected = [str(value)] + ([_NUMBER_WORDS[value]] if 2 <= value < len(_NUMBER_WORDS) else [])
    # Near misses and the other operations' results; operands are excluded so that echoing the sum
    # before answering ("7 + 5 = 12") is not mistaken for a wrong answer.
    near = {value + d for d in (-10, -2, -1, 1, 2, 10)} | set(others)
    distractors = [str(n) for n in sorted(near - {value, a, b}) if n >= 0]
    return f"arithmetic_{index + 1}", phrasings[index], {"expected_answers": expected, "distractors": distractors,
                                                         "case_sensitive": False}


def _factual(rng: random.Random):
    kind = rng.choice(("capital", "symbol", "arithmetic", "fact", "fact"))
    if kind == "arithmetic":
        return _arithmetic(rng)
    if kind in ("capital", "symbol"):
        pairs, phrasings = (_CAPITALS, _CAPITAL_Q) if kind == "capital" else (_SYMBOLS, _SYMBOL_Q)
        subject, answer = rng.choice(pairs)
        index = rng.randrange(len(phrasings))
        expected = [answer] + (["Peking"] if answer == "Beijing" else [])
        meta = {"expected_answers": expected, "distractors": [a for _, a in pairs if a != answer],
                "case_sensitive": kind == "symbol"}  # "He"/"he", "S"/"'s": symbols need their case
        return f"{kind}_{index + 1}", phrasings[index].format(x=subject), meta
    fact_index = rng.randrange(len(_FACTS))
    phrasings, expected, distractors = _FACTS[fact_index]
    phrasings, expected = phrasings.split("|"), expected.split("|")
    distractors = distractors.split("|") if distractors else [p for p in _PLANETS if p not in expected]
    index = rng.randrange(len(phrasings))
    return f"fact{fact_index + 1:02d}_{index + 1}", phrasings[index], {
        "expected_answers": expected, "distractors": distractors, "case_sensitive": False}


# ---- explanation -----------------------------------------------------------------------------
# Keywords are matched as word prefixes and never occur in the instruction, so echoing the
# question cannot satisfy them.
_EXPLAIN_TOPICS = [
    ("photosynthesis", "light sun energy chlorophyll oxygen glucose sugar leaf leaves"),
    ("how rainbows form", "light sun water droplet refract reflect prism colo spectrum"),
    ("why the sky is blue", "scatter light sun wavelength atmosphere air molecule"),
    ("how vaccines work", "immun antibod body virus germ infect disease protect"),
    ("what causes the tides", "moon gravit pull ocean sea water"),
    ("how magnets work", "pole attract repel field iron metal north south"),
    ("what inflation is", "price money cost rise increase econom purchas value"),
    ("how the heart pumps blood", "muscle chamber beat vein arter body oxygen contract"),
    ("why ice floats on water", "dens lighter expand molecule solid hydrogen"),
    ("what causes earthquakes", "plate tectonic crust fault shak ground energy"),
    ("how airplanes fly", "wing lift engine thrust pressure speed"),
    ("how bees make honey", "nectar flower hive enzyme evaporat pollen"),
    ("why we need sleep", "brain rest memor body energy repair health"),
    ("how the internet works", "computer network data server connect cable packet information"),
    ("what electricity is", "electron current charge energy power wire flow"),
    ("why leaves change colour in autumn", "chlorophyll green pigment sunlight light cold tree red yellow orange"),
    ("how recycling helps the environment", "waste reuse material plastic paper landfill resource pollut energy"),
    ("what evaporation is", "water heat vapo gas liquid sun temperature"),
    ("how seeds grow into plants", "root water soil sprout sun light germinat leaf leaves"),
    ("what democracy is", "vote elect people citizen government power law"),
    ("how a bicycle works", "pedal wheel chain gear brake ride"),
    ("why exercise is good for you", "heart muscle health strong body weight energy fit"),
    ("how thunder and lightning happen", "electric charge cloud sound flash storm air heat"),
    ("what a volcano is", "lava magma erupt mountain rock ash hot"),
    ("how the moon changes shape", "phase sun light orbit earth reflect crescent"),
]
_EXPLAIN_Q = (("Explain {t}.", 20), ("Explain {t} in simple terms.", 15), ("Give a short explanation of {t}.", 15),
              ("Describe {t} to a ten-year-old.", 20), ("Help me understand {t}.", 20),
              ("In a few sentences, explain {t}.", 25))


def _explanation(rng: random.Random):
    topic, keywords = rng.choice(_EXPLAIN_TOPICS)
    index = rng.randrange(len(_EXPLAIN_Q))
    phrasing, min_words = _EXPLAIN_Q[index]
    return f"explain_{index + 1}", phrasing.format(t=topic), {"keywords": keywords.split(), "min_words": min_words}


# ---- list generation -------------------------------------------------------------------------
_LIST_THINGS = ("fruits", "colours", "animals that live in the ocean", "countries in Europe", "musical instruments",
                "vegetables", "sports played with a ball", "programming languages", "kitchen utensils", "birds",
                "tips for better sleep", "ways to save water at home", "benefits of regular exercise",
                "things to pack for a beach trip", "jobs in a hospital", "board games", "famous scientists",
                "types of weather", "things you find in a classroom", "indoor hobbies", "ways to reduce stress",
                "flowers", "farm animals", "healthy breakfast foods")
_LIST_Q = ("List {n} {x}.", "List {w} {x}.", "Name {w} {x} as a numbered list.", "Give me a list of {n} {x}.",
           "Write a numbered list of {w} {x}.", "What are {w} {x}? Answer with a list.")


def _list_generation(rng: random.Random):
    things, n_items = rng.choice(_LIST_THINGS), rng.randint(3, 7)
    index = rng.randrange(len(_LIST_Q))
    instruction = _LIST_Q[index].format(n=n_items, w=_NUMBER_WORDS[n_items], x=things)
    return f"list_{index + 1}", instruction, {"n_items": n_items}


# ---- instruction following -------------------------------------------------------------------
_SUBJECTS = ("the ocean", "your favourite food", "a rainy day", "the moon", "a busy city", "a loyal dog", "winter",
             "a quiet library", "the mountains", "a cup of coffee", "a train journey", "a garden", "the night sky",
             "a birthday party", "a forest", "the beach", "a thunderstorm", "a school day", "music", "friendship",
             "a sunrise", "autumn", "a bicycle ride", "a street market", "a river")
_TASKS = ("Write about {s}.", "Describe {s}.", "Tell me about {s}.", "Write a short text about {s}.",
          "Share your thoughts on {s}.")
IF_SPLITS = ("trained", "held_out")


def _instruction_following(rng: random.Random, slot: int):
    """A base task plus one or two catalogue constraints in TEST wordings; slots alternate between
    trained and held-out families, so each split gets half of the type (the first slot's split gets
    the odd one)."""
    split = IF_SPLITS[slot % 2]
    pool = catalogue.HELD_OUT_FAMILIES if split == "held_out" else catalogue.TRAINED_FAMILIES
    task_index = rng.randrange(len(_TASKS))
    task = _TASKS[task_index].format(s=rng.choice(_SUBJECTS))
    families = [rng.choice(pool)]
    if rng.random() < 0.5:
        partners = [f for f in pool if catalogue.compatible(families[0], f)]
        if partners:
            families.append(rng.choice(partners))
    instruction, constraints = catalogue.build_instruction(
        task, [catalogue.sample_constraint(f, rng, split="test") for f in families])
    template = "+".join([f"task{task_index + 1}"] + [c.wording_id for c in constraints])
    return template, instruction, {"task": task, "constraints": [catalogue.to_record(c) for c in constraints],
                                   "constraint_split": split, "catalogue_version": catalogue.CATALOGUE_VERSION}


# ---- creative --------------------------------------------------------------------------------
_CREATIVE_TOPICS = [pair.split("=") for pair in (
    "a lost kitten=kitten; the first snow of winter=snow; a lighthouse keeper=lighthouse; "
    "a robot learning to paint=robot; a dragon who is afraid of fire=dragon; the ocean at night=ocean; "
    "an old oak tree=tree; a journey to the moon=moon; a friendly ghost=ghost; a city in the rain=rain; "
    "a forgotten key=key; a garden in spring=garden; a clock that runs backwards=clock; "
    "a small boat in a storm=boat; a baker who bakes magic bread=bread; a talking river=river; "
    "a child's first day at school=school; a star that fell to earth=star; an abandoned castle=castle; "
    "a musician on a street corner=music; a fox in the city=fox; a letter that was never sent=letter; "
    "a train at midnight=train; a mountain village=village; a lonely astronaut=astronaut").split("; ")]
_CREATIVE_Q = (("poem", "Write a short poem about {t}.", 10, 150), ("poem", "Compose a short poem about {t}.", 10, 150),
               ("story", "Write a very short story about {t}.", 40, 300), ("story", "Tell a short story about {t}.", 40, 300),
               ("song", "Write the first verse of a song about {t}.", 10, 150),
               ("fable", "Write a short fable about {t}.", 40, 300),
               ("diary", "Write a short diary entry about {t}.", 30, 250),
               ("description", "Write a vivid description of {t}.", 20, 200))


def _creative(rng: random.Random):
    topic, keyword = rng.choice(_CREATIVE_TOPICS)
    index = rng.randrange(len(_CREATIVE_Q))
    form, phrasing, low, high = _CREATIVE_Q[index]
    return f"{form}_{index + 1}", phrasing.format(t=topic), {"min_words": low, "max_words": high, "topic_keyword": keyword}


# (rng, slot) -> (template, instruction, metadata); slot is the record's position within its type
_GENERATORS: dict[str, Callable] = {"factual": lambda rng, slot: _factual(rng),
                                    "explanation": lambda rng, slot: _explanation(rng),
                                    "list_generation": lambda rng, slot: _list_generation(rng),
                                    "instruction_following": _instruction_following,
                                    "creative": lambda rng, slot: _creative(rng)}


def build_test_set(count: int = 200, seed: int = 999) -> list[dict]:
    """`count` distinct test records, split evenly over TYPES (remainder to the first types).

    Types are interleaved round-robin so that any prefix of the set covers every type. A drawn
    instruction already in the set is redrawn from the same generator, so the result stays a pure
    function of (count, seed); a count larger than the template space raises. The constraint
    catalogue is validated first (a broken family is bad input naming it).
    """
    if count < len(TYPES):
        raise BadInputError(f"test set count must be at least {len(TYPES)} (one per type), got {count}")
    catalogue.validate_catalogue()
    rng = random.Random(seed)
    # instruction_following draws from a stream of its own: a change to the constraint catalogue
    # (a new wording or family) then leaves the other four types' records as they are for a seed
    streams = {t: rng for t in TYPES} | {"instruction_following": random.Random(f"{seed}/instruction_following")}
    per_type = {t: count // len(TYPES) + (i < count % len(TYPES)) for i, t in enumerate(TYPES)}
    seen: set[str] = set()
    drawn: dict[str, list[dict]] = {}
    for type_name in TYPES:
        drawn[type_name], attempts = [], 0
        while len(drawn[type_name]) < per_type[type_name]:
            attempts += 1
            if attempts > 200 * per_type[type_name] + 1000:
                raise BadInputError(f"test set: template space for '{type_name}' exhausted at {len(drawn[type_name])} "
                                    f"distinct instructions (asked for {per_type[type_name]})")
            template, instruction, meta = _GENERATORS[type_name](streams[type_name], len(drawn[type_name]))
            if instruction in seen:
                continue
            seen.add(instruction)
            drawn[type_name].append({"type": type_name, "template": template, "instruction": instruction, **meta})
    ordered = [drawn[t][i] for i in range(max(per_type.values())) for t in TYPES if i < per_type[t]]
    records = [{"id": f"test_{n:04d}", **record} for n, record in enumerate(ordered, start=1)]
    assert len({r["instruction"] for r in records}) == len(records) == count
    return records


def check_test_set(records: list[dict]) -> dict:
    """QC of a (loaded) test set: unique ids and instructions, known types, metadata present, and
    instruction_following constraints that parse, with a constraint_split matching their families."""
    failures = []
    ids, instructions = [r.get("id") for r in records], [r.get("instruction") for r in records]
    if len(set(ids)) != len(ids):
        failures.append("duplicate ids")
    if len(set(instructions)) != len(instructions):
        failures.append("duplicate instructions")
    counts = {t: 0 for t in TYPES}
    splits = {split: 0 for split in IF_SPLITS}
    for record in records:
        type_name = record.get("type")
        if type_name not in REQUIRED_FIELDS:
            failures.append(f"{record.get('id')}: unknown type {type_name!r}")
            continue
        counts[type_name] += 1
        missing = [f for f in REQUIRED_FIELDS[type_name] if f not in record]
        if missing:
            failures.append(f"{record.get('id')}: missing {', '.join(missing)}")
        elif type_name == "instruction_following":
            failures += _constraint_problems(record, splits)
    failures += [f"no records of type {t}" for t, n in counts.items() if n == 0]
    return {"passed": not failures, "failures": failures, "records": len(records), "counts_by_type": counts,
            "instruction_following_by_split": splits}


def _constraint_problems(record: dict, splits: dict) -> list[str]:
    """Why an instruction_following record's constraints are unusable (counting its split when not)."""
    try:
        families = [c.family for c in record_constraints(record)]
    except BadInputError as err:
        return [str(err)]
    expected = "held_out" if all(f in catalogue.HELD_OUT_FAMILIES for f in families) else "trained"
    if any(f in catalogue.HELD_OUT_FAMILIES for f in families) and expected != "held_out":
        return [f"{record.get('id')}: mixes trained and held-out families {families}"]
    if record["constraint_split"] != expected:
        return [f"{record.get('id')}: constraint_split {record['constraint_split']!r} but families {families} are {expected}"]
    splits[expected] += 1
    return []


# ---- scoring ---------------------------------------------------------------------------------
# Words, sentences and list lines are counted by the constraint catalogue's text measures
# (count_words, count_sentences, list_items, re-exported here), so every scorer and every checker
# counts alike.


def _first_match(text: str, phrases, case_sensitive: bool = False, prefix: bool = False) -> int | None:
    flags = 0 if case_sensitive else re.IGNORECASE
    # Whole words; digits joined to others by a decimal point or a separator ("4869.7", "1,7") are one number.
    tail = "" if prefix else r"(?!\w)(?![.,]\d)"
    positions = [m.start() for p in phrases for m in [re.search(rf"(?<!\w)(?<!\d[.,]){re.escape(p)}{tail}", text, flags)] if m]
    return min(positions) if positions else None


def _degenerate(text: str) -> bool:
    found = [w.lower() for w in words(text)]
    return len(found) >= 10 and len(set(found)) / len(found) < 0.3


def _result(success: bool, reason: str) -> dict:
    return {"scored": True, "success": success, "reason": reason}


def score_factual(record: dict, response: str) -> dict:
    """Pass iff an expected answer occurs as a whole word and no distractor occurs before it.

    Matching is case-insensitive unless record["case_sensitive"] (chemical symbols). Distractors
    are the other answers of the same kind (other capitals, planets, near-miss numbers), so a
    response that shotguns candidates, or names a wrong one first, fails.
    """
    case = bool(record.get("case_sensitive", False))
    hit = _first_match(response, record["expected_answers"], case)
    if hit is None:
        return _result(False, "no expected answer found")
    wrong = _first_match(response, record["distractors"], case)
    if wrong is not None and wrong < hit:
        return _result(False, "a wrong candidate answer comes before the expected one")
    return _result(True, "expected answer found first")


def score_explanation(record: dict, response: str) -> dict:
    """Pass iff >= min_words words, one keyword occurs as a word prefix, and the text is not a loop.

    A loop is >= 10 words with fewer than 30% distinct words.
    """
    words = count_words(response)
    if words < record["min_words"]:
        return _result(False, f"{words} words < min_words {record['min_words']}")
    if _first_match(response, record["keywords"], prefix=True) is None:
        return _result(False, "no topic keyword")
    if _degenerate(response):
        return _result(False, "degenerate repetition")
    return _result(True, f"{words} words with a topic keyword")


def score_list_generation(record: dict, response: str) -> dict:
    """Pass iff exactly n_items list lines ("1." "1)" "-" "*" bullet + space), all distinct.

    Other lines (an intro, a closing remark) are allowed; inline comma lists do not count.
    Distinct means different after lowercasing and stripping trailing punctuation.
    """
    items = list_items(response)
    n_items = record["n_items"]
    if len(items) != n_items:
        return _result(False, f"{len(items)} list items, asked for {n_items}")
    if len({item.lower().rstrip(".,;:!") for item in items}) != len(items):
        return _result(False, "repeated list items")
    return _result(True, f"{n_items} distinct list items")


def record_constraints(record: dict) -> list[catalogue.Constraint]:
    """The catalogue constraints of an instruction_following record (bad input when malformed)."""
    specs = record.get("constraints")
    if not isinstance(specs, list) or not specs:
        raise BadInputError(f"{record.get('id')}: instruction_following record needs a non-empty 'constraints' list")
    try:
        return [catalogue.from_record(spec) for spec in specs]
    except BadInputError as err:
        raise BadInputError(f"{record.get('id')}: {err}") from None


def score_instruction_following(record: dict, response: str) -> dict:
    """Pass iff every constraint of the record passes its catalogue checker; the per-constraint
    outcomes come back under "constraints" ([{family, passed, reason}])."""
    results = catalogue.check_all(record_constraints(record), response)
    failed = [r for r in results if not r.passed]
    reason = "; ".join(f"{r.family}: {r.reason}" for r in (failed or results))
    return {**_result(not failed, reason), "constraints": [r._asdict() for r in results]}


def group_instruction_following(records: list[dict], outcomes: dict) -> dict:
    """instruction_following outcomes grouped for separate reporting of trained and held-out families.

    `outcomes` maps a record id to anything (a success flag, a base/SFT pair); records without an
    outcome are left out. Returns {"by_split": {"trained": [...], "held_out": [...]},
    "by_family": {family: [...]}}, each list in record order. A record with two constraints counts
    for both families, with its own (all-constraints) outcome.
    """
    by_split: dict[str, list] = {split: [] for split in IF_SPLITS}
    by_family: dict[str, list] = {}
    for record in records:
        if record.get("type") != "instruction_following" or record.get("id") not in outcomes:
            continue
        split = record.get("constraint_split")
        if split not in by_split:
            raise BadInputError(f"{record.get('id')}: constraint_split must be one of {', '.join(IF_SPLITS)}, got {split!r}")
        outcome = outcomes[record["id"]]
        by_split[split].append(outcome)
        for constraint in record_constraints(record):
            by_family.setdefault(constraint.family, []).append(outcome)
    return {"by_split": by_split, "by_family": dict(sorted(by_family.items()))}


def score_creative(record: dict, response: str) -> dict:
    """Pass iff min_words <= words <= max_words, topic_keyword (if any) occurs as a word prefix,
    and the text is not a loop (see score_explanation)."""
    words = count_words(response)
    if not record["min_words"] <= words <= record["max_words"]:
        return _result(False, f"{words} words outside [{record['min_words']}, {record['max_words']}]")
    keyword = record.get("topic_keyword")
    if keyword and _first_match(response, [keyword], prefix=True) is None:
        return _result(False, f"topic keyword {keyword!r} absent")
    if _degenerate(response):
        return _result(False, "degenerate repetition")
    return _result(True, f"{words} words on topic")


SCORERS: dict[str, Callable[[dict, str], dict]] = {
    "factual": score_factual,
    "explanation": score_explanation,
    "list_generation": score_list_generation,
    "instruction_following": score_instruction_following,
    "creative": score_creative,
}


def score_response(record: dict, response: str | None) -> dict:
    """Score one response; records of an unknown or missing type pass through unscored.

    A known type missing its metadata is a malformed test file and raises BadInputError.
    """
    type_name = record.get("type")
    if type_name not in SCORERS:
        return {"scored": False, "success": None, "reason": f"no scorer for type {type_name!r}"}
    missing = [f for f in REQUIRED_FIELDS[type_name] if f not in record]
    if missing:
        earlier = " (an earlier test-set format: regenerate it with generate_test_instructions.py)" if "constraint" in record else ""
        raise BadInputError(f"{record.get('id')}: {type_name} record missing {', '.join(missing)}{earlier}")
    if not isinstance(response, str) or not response.strip():
        return _result(False, "empty response")
    return SCORERS[type_name](record, response)
