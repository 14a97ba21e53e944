"""Every prompt text of the pipeline, versioned by name, and the response cleaners.

Base models know no chat format, so every prompt is a document the model continues: a numbered
list to extend, an `Instruction:`/`Response:` block to complete, or a multiple-choice item whose
answer slot the critic reads. This module is the only place those delimiters are written.

Response templates (`RESPONSE_TEMPLATES`, chosen by `--response-template`):
- `response_v2`: the bare `Instruction: X\nResponse:` block; the answer ends at the next block or
  at the first blank line. Training and evaluation always use this bare prompt (`create_response_prompt`).
- `response_v3`, `response_v4` (context distillation): a short header and a fixed set of hand-written
  demonstration pairs (the template's `demonstrations`; `RESPONSE_DEMONSTRATIONS` is the default
  template's set), each closed by `RESPONSE_END_MARKER` on its own line, before the
  same bare block. The model's answer ends where it would write the end marker, so lists and
  multi-paragraph answers survive; the adapter is trained on the bare prompt and so learns the
  demonstrated behaviour without the demonstrations. Changing a demonstration means a new version.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

from .exit_codes import BadInputError

__all__ = ["CompletionStylePrompts", "CleanedResponse", "PROMPT_VERSIONS", "SEED_INSTRUCTIONS", "ResponseTemplate",
           "RESPONSE_TEMPLATES", "RESPONSE_DEMONSTRATIONS", "RESPONSE_END_MARKER", "DEFAULT_RESPONSE_TEMPLATE",
           "demonstrations_fingerprint", "check_demonstrations", "demonstration_overlaps", "ANSWER_ENDS"]

INSTRUCTION_DELIMITER = "Instruction:"
RESPONSE_DELIMITER = "Response:"

# Hand-written, deliberately plain and varied: the few-shot pool the base model imitates.
SEED_INSTRUCTIONS = (
    "Name three primary colors.",
    "Explain why the sky looks blue during the day.",
    "Write a short poem about the ocean.",
    "List four common fruits that are red.",
    "Give a one-sentence definition of photosynthesis.",
    "Translate the word 'house' into Spanish.",
    "Describe how to boil an egg in three steps.",
    "What is the capital of Japan?",
    "Suggest a name for a friendly pet dog.",
    "Summarize the story of Cinderella in two sentences.",
    "Explain what a noun is to a child.",
    "List three ways to save water at home.",
    "Write a haiku about autumn leaves.",
    "Give two reasons why exercise is healthy.",
    "Convert 5 kilometers to meters.",
    "Describe the taste of a lemon.",
    "Name the largest planet in the solar system.",
    "Write a polite sentence declining an invitation.",
    "Explain the difference between weather and climate.",
    "List the days of the week that start with the letter T.",
)

_INSTRUCTION_CRITIC_EXAMPLES = (
    ("List three animals that live in the desert.", "A"),
    ("and then the 5. of it was", "B"),
    ("Explain how a rainbow forms.", "A"),
    ("Click here to subscribe to our newsletter!!!", "B"),
)

_PAIR_CRITIC_EXAMPLES = (
    ("Name two planets.", "Mars and Venus.", "A"),
    ("Write a sentence about cats.", "Dogs are loyal animals that like to play fetch.", "B"),
    ("What is 3 plus 4?", "3 plus 4 is 7.", "A"),
    ("List three colors.", "I like to go to the park on Sundays with my family.", "B"),
)

# Hand-written for this project (never taken from a dataset), and varied on purpose: a numbered
# list, a one-line fact, two paragraphs, answers that obey a stated length, case, first word or last
# word, and bullets, so the base model sees that an answer's form follows its instruction. Kept short:
# the whole prefix is about 320 tokens of the bundled model, paid for every response generated.
_DEMONSTRATIONS_V3 = (
    ("List three kitchen tools.",
     "1. A chef's knife\n2. A cutting board\n3. A frying pan"),
    ("At what temperature does water boil at sea level?",
     "Water boils at 100 degrees Celsius at sea level."),
    ("Write two short paragraphs about why people keep gardens.",
     "Many people garden because growing food is satisfying. A few seeds can fill a kitchen with herbs."
     "\n\nOthers garden for the calm it brings. Weeding and watering rest the mind."),
    ("Describe a lighthouse in exactly two sentences.",
     "A lighthouse is a tall tower on a rocky coast. Its bright lamp warns ships away from danger at night."),
    ("Explain what a shadow is, using only lowercase letters.",
     "a shadow is the dark shape behind an object that blocks the light."),
    ('Give one tip for sleeping better. Start your answer with the word "Try".',
     "Try going to bed at the same time every night."),
    ('Write a sentence about autumn that ends with the word "leaves".',
     "Every October the wind fills the streets with red and yellow leaves."),
    ("Suggest three names for a small bakery, as a bulleted list.",
     "- The Morning Loaf\n- Crumb and Crust\n- Little Oven"),
)

# response_v4: the v3 set taught answers that were too short (median 15 tokens; an adapter trained on
# them answered "explain ..." in one sentence). Here an explanation takes the three or four sentences
# it needs, a fact comes with its reason, a tip with why it works, and a poem and a word limit join the
# forms. Still hand-written for this project; 684 tokens of the bundled model (v3: 322).
_DEMONSTRATIONS_V4 = (
    ("List three kitchen tools.",
     "1. A chef's knife\n2. A cutting board\n3. A frying pan"),
    ("At what temperature does water boil at sea level?",
     "Water boils at 100 degrees Celsius (212 degrees Fahrenheit) at sea level. Higher up, the air pressure is lower, "
     "so water boils at a lower temperature."),
    ("Explain why bread goes stale.",
     "Bread goes stale mostly because of the starch inside it, not because it dries out. In fresh bread the starch holds "
     "water in a soft, loose structure. Over a few days the starch molecules pack back into stiff crystals and squeeze "
     "the water out, so the crumb turns firm and crumbly. Warming the bread in an oven loosens the starch again for a while."),
    ("Write two short paragraphs about why people keep gardens.",
     "Many people garden because growing food is satisfying. A few seeds can fill a kitchen with herbs."
     "\n\nOthers garden for the calm it brings. Weeding and watering rest the mind."),
    ("Describe a lighthouse in exactly two sentences.",
     "A lighthouse is a tall tower on a rocky coast. Its bright lamp warns ships away from danger at night."),
    ("Explain what a shadow is, using only lowercase letters.",
     "a shadow is the dark area behind an object that blocks light. light travels in straight lines, so it cannot bend "
     "around the object to reach the surface behind it. the shadow takes the outline of the object, and it grows longer "
     "when the light comes from a low angle."),
    ('Give one tip for sleeping better. Start your answer with the word "Try".',
     "Try going to bed and getting up at the same time every day, weekends included. A steady schedule sets your body "
     "clock, so you feel sleepy at night and alert in the morning."),
    ("Write a four-line poem about a train at night.",
     "The night train hums along the track,\nits windows gold against the black.\nIt carries dreams from town to town"
     "\nand sings until the sun comes down."),
    ("In under 25 words, say what a public library offers.",
     "A public library lends books, films and music for free, and offers quiet study space, internet access and help "
     "finding information."),
    ('Write a sentence about autumn that ends with the word "leaves".',
     "Every October the wind fills the streets with red and yellow leaves."),
    ("Suggest three names for a small bakery, as a bulleted list.",
     "- The Morning Loaf\n- Crumb and Crust\n- Little Oven"),
    ("How does a bicycle pump work?",
     "A bicycle pump pushes air from a cylinder into the tire. When you pull the handle up, a valve opens and outside air "
     "fills the cylinder. When you push it down, that valve closes and the air is squeezed through the hose into the tire. "
     "A second valve in the tire stops the air from flowing back out."),
)
RESPONSE_END_MARKER = "### END"
_DEMONSTRATION_HEADER = f"Each response below does exactly what its instruction asks and ends with the line {RESPONSE_END_MARKER}."


@dataclass(frozen=True)
class ResponseTemplate:
    """How responses are generated: with or without the demonstrations, where an answer ends, and
    the token cap that fits its longest expected answer (the default of --response-max-new-tokens)."""

    name: str
    demonstrations: tuple[tuple[str, str], ...]  # (instruction, response) pairs; empty: the bare block
    default_max_new_tokens: int
    description: str


RESPONSE_TEMPLATES = {
    "response_v2": ResponseTemplate("response_v2", (), 80, "the bare block; the answer ends at the next block or a blank line"),
    "response_v3": ResponseTemplate("response_v3", _DEMONSTRATIONS_V3, 256, "8 short demonstrations first; the answer ends at the end marker"),
    "response_v4": ResponseTemplate("response_v4", _DEMONSTRATIONS_V4, 256,
                                    "12 demonstrations with full-length explanations first; the answer ends at the end marker"),
}
DEFAULT_RESPONSE_TEMPLATE = "response_v4"
RESPONSE_DEMONSTRATIONS = RESPONSE_TEMPLATES[DEFAULT_RESPONSE_TEMPLATE].demonstrations

PROMPT_VERSIONS = {
    "instruction_generation": "instruction_generation_v1",
    # The bare prompt and the blank-line cleaner: what training and evaluation use, whichever
    # template generated the training responses (that one is recorded per record and per run).
    "response": "response_v2",
    "instruction_critic": "instruction_critic_v1",
    "pair_critic": "pair_critic_v1",
}

# Where an answer to the bare prompt ends. "blank_line" is the source's rule for base-model completions
# (the base model starts an unrelated paragraph after one). "block" keeps blank lines and ends at EOS or
# at the next Instruction:/Response: block: an adapter trained on response_v3/v4 answers writes
# paragraphs, a title line, a P.S. or a repeated request before a blank line, and stops with EOS, so
# cutting it at the first blank line scores half an answer (evaluation and Stage 2 candidates use it).
ANSWER_ENDS = ("block", "blank_line")

_LEAK_PATTERN = re.compile(r"(instruction|response)\s*:", re.IGNORECASE)
_END_PATTERN = re.compile(re.escape(RESPONSE_END_MARKER))


def _demonstration_block(instruction: str, response: str) -> str:
    return f"{INSTRUCTION_DELIMITER} {instruction}\n{RESPONSE_DELIMITER} {response}\n{RESPONSE_END_MARKER}\n\n"


def _template(name: str) -> ResponseTemplate:
    if name not in RESPONSE_TEMPLATES:
        raise BadInputError(f"unknown response template {name!r}; known: {', '.join(RESPONSE_TEMPLATES)}")
    return RESPONSE_TEMPLATES[name]


def _answer_end(name: str) -> str:
    if name not in ANSWER_ENDS:
        raise BadInputError(f"unknown answer end {name!r}; known: {', '.join(ANSWER_ENDS)}")
    return name


def demonstrations_fingerprint(template: str = DEFAULT_RESPONSE_TEMPLATE) -> str:
    """sha256 of the template's demonstration prefix: a test ties each to its version name, so an
    edited demonstration cannot keep the old version."""
    return hashlib.sha256(CompletionStylePrompts.demonstration_prefix(template).encode("utf-8")).hexdigest()


def check_demonstrations(tokenizer, template: str = DEFAULT_RESPONSE_TEMPLATE) -> None:
    """Refuse (BadInputError, exit 2, naming the demonstration) a demonstration that carries a chat
    marker or encodes to a chat-control token for this tokenizer; the prompt guard would refuse the
    whole prompt later, but without saying which demonstration is at fault."""
    from .prompt_guards import ContaminationError, encode_continuation

    for number, (instruction, response) in enumerate(_template(template).demonstrations, start=1):
        try:
            encode_continuation(tokenizer, _demonstration_block(instruction, response))
        except ContaminationError as err:
            raise BadInputError(f"{template} demonstration {number} ({instruction!r}) cannot enter a prompt: {err}") from None


def demonstration_overlaps(overlap_index, template: str = DEFAULT_RESPONSE_TEMPLATE) -> list[dict]:
    """Each (demonstration, test instruction) overlap by the held-out rule of `overlap_index`
    (a `dedup.OverlapIndex` of test instructions): exact, near or a shared 8-gram."""
    found = []
    for number, (instruction, _) in enumerate(_template(template).demonstrations, start=1):
        for match in overlap_index.matches(instruction):
            found.append({"demonstration": number, "demonstration_instruction": instruction, "test_id": match["id"],
                          "kind": match["kind"]})
    return found


@dataclass(frozen=True)
class CleanedResponse:
    text: str
    was_cut: bool  # something after the answer (a new block, a leaked label) was removed


class CompletionStylePrompts:
    """Prompt builders; each returns plain text for `encode_prompt` (the loader adds BOS)."""

    versions = PROMPT_VERSIONS

    @staticmethod
    def create_response_prompt(instruction: str) -> str:
        """The bare block: what training and evaluation prompt with, and what response_v2 generates from."""
        return f"{INSTRUCTION_DELIMITER} {instruction.strip()}\n{RESPONSE_DELIMITER}"

    @staticmethod
    def demonstration_prefix(template: str = DEFAULT_RESPONSE_TEMPLATE) -> str:
        """The header and every demonstration block of `template`, each closed by the end marker."""
        blocks = "".join(_demonstration_block(i, r) for i, r in _template(template).demonstrations)
        return f"{_DEMONSTRATION_HEADER}\n\n" + blocks

    @classmethod
    def create_generation_response_prompt(cls, instruction: str, template: str = DEFAULT_RESPONSE_TEMPLATE) -> str:
        """The prompt a training response is generated from under `template`."""
        prefix = cls.demonstration_prefix(template) if _template(template).demonstrations else ""
        return prefix + cls.create_response_prompt(instruction)

    @staticmethod
    def unconditioned_response_prompt() -> str:
        """The bare response delimiter: the context for log p(response) without the instruction."""
        return RESPONSE_DELIMITER

    @staticmethod
    def format_completion(response: str) -> str:
        """The text a model writes after `create_response_prompt`: one space, then the answer."""
        return " " + response.strip()

    @staticmethod
    def response_stop_strings(template: str = "response_v2", answer_end: str = "blank_line") -> list[str]:
        """Where a response ends under `template` (constant per template, so matchers are built once);
        `answer_end` (see ANSWER_ENDS) applies to the bare template only."""
        if _template(template).demonstrations:
            # The demonstrations end each answer with the marker; a blank line is part of an answer.
            return [RESPONSE_END_MARKER, f"\n{INSTRUCTION_DELIMITER}"]
        next_block = [f"\n{INSTRUCTION_DELIMITER}", f"\n{RESPONSE_DELIMITER}"]
        # "blank_line": base models go on after a blank line with unrelated text (a new paragraph of
        # the "document"), which was most of the token-limit hits in the first pilot.
        return next_block + ["\n\n"] if _answer_end(answer_end) == "blank_line" else next_block

    @staticmethod
    def create_instruction_generation_prompt(rng: random.Random, num_examples: int = 5,
                                             pool: tuple[str, ...] = SEED_INSTRUCTIONS) -> tuple[str, list[str]]:
        """A numbered list of `num_examples` seed tasks; the model writes item n+1.

        Returns the prompt and the examples used, so copies of them can be filtered out.
        """
        examples = rng.sample(list(pool), k=min(num_examples, len(pool)))
        lines = ["Below is a list of short, varied tasks that a person might ask a helpful assistant to do."]
        lines += [f"{i}. {text}" for i, text in enumerate(examples, start=1)]
        lines.append(f"{len(examples) + 1}.")
        return "\n".join(lines), examples

    @staticmethod
    def instruction_stop_strings(num_examples: int = 5) -> list[str]:
        return [f"\n{num_examples + 2}.", "\n\n"]

    @staticmethod
    def clean_generated_instruction(text: str) -> str:
        first_line = text.strip().split("\n")[0]
        return re.sub(r"\s+", " ", first_line).strip()

    @classmethod
    def create_instruction_critic_prompt(cls, instruction: str, swapped: bool = False) -> str:
        """A/B item; with `swapped` the options trade letters (A = bad), to measure position bias."""
        good, bad = ("B", "A") if swapped else ("A", "B")
        options = f"{good}) good task  {bad}) bad task" if not swapped else f"{bad}) bad task  {good}) good task"
        header = (f"Each item shows a candidate task for an assistant. Answer {good} if it is a clear, complete, "
                  f"self-contained instruction or question in English; answer {bad} if it is unclear, broken, "
                  "or not a task.\n\n")
        shots = "".join(f"Task: {text}\n{options}\nAnswer: {good if label == 'A' else bad}\n\n"
                        for text, label in _INSTRUCTION_CRITIC_EXAMPLES)
        return f"{header}{shots}Task: {instruction.strip()}\n{options}\nAnswer:"

    @classmethod
    def create_pair_critic_prompt(cls, instruction: str, response: str, swapped: bool = False) -> str:
        good, bad = ("B", "A") if swapped else ("A", "B")
        options = f"{good}) fulfils the task  {bad}) does not" if not swapped else f"{bad}) does not  {good}) fulfils the task"
        header = (f"Each item shows a task and a reply. Answer {good} if the reply correctly and directly does "
                  f"what the task asks; answer {bad} if it does not.\n\n")
        shots = "".join(f"Task: {task}\nReply: {reply}\n{options}\nAnswer: {good if label == 'A' else bad}\n\n"
                        for task, reply, label in _PAIR_CRITIC_EXAMPLES)
        return f"{header}{shots}Task: {instruction.strip()}\nReply: {response.strip()}\n{options}\nAnswer:"

    @staticmethod
    def critic_label_texts() -> tuple[str, str]:
        """The two answer-slot continuations; each must be one token (the critic refuses a tokenizer where not)."""
        return (" A", " B")

    @staticmethod
    def clean_response(raw: str, template: str = "response_v2", answer_end: str = "blank_line") -> CleanedResponse:
        """Cut at the next delimiter and strip a leaked label; whitespace trimmed.

        A response that starts by repeating `Response:` is kept from after it; anything from a new
        `Instruction:`/`Response:` onward is dropped, since it is the model writing the next example.
        response_v2 also cuts at the first blank line unless `answer_end` is "block"; response_v3 cuts at
        the end marker instead and keeps blank lines (paragraphs, spaced lists).
        """
        demonstrations = _template(template).demonstrations
        text = raw
        was_cut = False
        leading = re.match(r"\s*" + re.escape(RESPONSE_DELIMITER), text, re.IGNORECASE)
        if leading:
            text = text[leading.end():]
            was_cut = True
        cuts = [m.start() for m in (_LEAK_PATTERN.search(text), _END_PATTERN.search(text) if demonstrations else None) if m]
        if cuts:
            text = text[: min(cuts)]
            was_cut = True
        stripped = text.strip()
        if not demonstrations and _answer_end(answer_end) == "blank_line" and "\n\n" in stripped:
            stripped = stripped.split("\n\n")[0].strip()
            was_cut = True
        return CleanedResponse(text=stripped, was_cut=was_cut)

    @staticmethod
    def has_delimiter_leak(text: str) -> bool:
        """A prompt delimiter or the end marker in text that should hold neither."""
        return bool(_LEAK_PATTERN.search(text) or _END_PATTERN.search(text))
