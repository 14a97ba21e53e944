"""Every prompt text of the pipeline, versioned by name, and the response cleaner.

Base models know no chat format, so every prompt is a document the model continues: a numbered
list to extend, an `Instruction:`/`Response:` block to complete, or a multiple-choice item whose
answer slot the critic reads. This module is the only place those delimiters are written.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

__all__ = ["CompletionStylePrompts", "CleanedResponse", "PROMPT_VERSIONS", "SEED_INSTRUCTIONS"]

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

PROMPT_VERSIONS = {
    "instruction_generation": "instruction_generation_v1",
    "response": "response_v2",
    "instruction_critic": "instruction_critic_v1",
    "pair_critic": "pair_critic_v1",
}

_LEAK_PATTERN = re.compile(r"(instruction|response)\s*:", re.IGNORECASE)


@dataclass(frozen=True)
class CleanedResponse:
    text: str
    was_cut: bool  # something after the answer (a new block, a leaked label) was removed


class CompletionStylePrompts:
    """Prompt builders; each returns plain text for `encode_prompt` (the loader adds BOS)."""

    versions = PROMPT_VERSIONS

    @staticmethod
    def create_response_prompt(instruction: str) -> str:
        return f"{INSTRUCTION_DELIMITER} {instruction.strip()}\n{RESPONSE_DELIMITER}"

    @staticmethod
    def format_completion(response: str) -> str:
        """The text a model writes after `create_response_prompt`: one space, then the answer."""
        return " " + response.strip()

    @staticmethod
    def response_stop_strings() -> list[str]:
        """Where a response ends: the start of the next block (constant, so matchers are built once)."""
        # A blank line ends the answer: base models go on after it with unrelated text (a new
        # paragraph of the "document"), which was most of the token-limit hits in the first pilot.
        return [f"\n{INSTRUCTION_DELIMITER}", f"\n{RESPONSE_DELIMITER}", "\n\n"]

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
    def clean_response(raw: str) -> CleanedResponse:
        """Cut at the next delimiter and strip a leaked label; whitespace trimmed.

        A response that starts by repeating `Response:` is kept from after it; anything from a new
        `Instruction:`/`Response:` onward is dropped, since it is the model writing the next example.
        """
        text = raw
        was_cut = False
        leading = re.match(r"\s*" + re.escape(RESPONSE_DELIMITER), text, re.IGNORECASE)
        if leading:
            text = text[leading.end():]
            was_cut = True
        match = _LEAK_PATTERN.search(text)
        if match:
            text = text[: match.start()]
            was_cut = True
        stripped = text.strip()
        if "\n\n" in stripped:
            stripped = stripped.split("\n\n")[0].strip()
            was_cut = True
        return CleanedResponse(text=stripped, was_cut=was_cut)

    @staticmethod
    def has_delimiter_leak(text: str) -> bool:
        return bool(_LEAK_PATTERN.search(text))
