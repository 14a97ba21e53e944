"""Prompt guards: what may enter a prompt, and how its token IDs are made.

    ids = encode_prompt(tokenizer, CompletionStylePrompts.create_response_prompt("Name a color."))
    ids = encode_continuation(tokenizer, " Red.")          # text that follows a prompt: never a BOS

Only a tokenizer that `CleanModelLoader` has guarded (`install_guard`) can encode: the loader alone
decides whether the model's BOS is prepended, and the guard refuses any text that carries a chat
marker or encodes to a chat-control token ID. `looks_assistant_style` is the behavioural hint the
loader's sentinel uses. Standard library only, so text filters can import it without torch.
"""

from __future__ import annotations

import re

from .exit_codes import BadInputError

__all__ = [
    "ContaminationError",
    "install_guard",
    "encode_prompt",
    "encode_continuation",
    "contains_chat_marker",
    "is_chat_control_token",
    "find_chat_control_ids",
    "looks_assistant_style",
]

_CHAT_TOKEN_PATTERN = re.compile(
    r"^(<\|?(im_start|im_end|im_sep|start_header_id|end_header_id|eot_id|system|user|assistant|"
    r"start_of_turn|end_of_turn|begin_of_text_chat|turn)\|?>|\[/?INST\]|<<SYS>>|<</SYS>>)$")
_CHAT_TEXT_PATTERN = re.compile(
    r"<\|(im_start|im_end|im_sep|start_header_id|end_header_id|eot_id|system|user|assistant)\|>|"
    r"<(start|end)_of_turn>|\[/?INST\]|<</?SYS>>")
_ASSISTANT_OPENERS = re.compile(
    r"^\s*(sure\b|certainly|of course|absolutely|here('s| is| are)|i('d| would) be (happy|glad)|"
    r"as an ai|i'm an ai|hello!? how can i)", re.IGNORECASE)


class ContaminationError(BadInputError):
    """A chat-control token or chat marker would have entered a prompt."""


def is_chat_control_token(token: str) -> bool:
    """Whether one vocabulary entry is a chat-control token (`<|im_start|>`, `[INST]`, ...)."""
    return bool(_CHAT_TOKEN_PATTERN.match(token))


def find_chat_control_ids(tokenizer) -> dict[str, int]:
    """Chat-control tokens in the vocabulary (base vocabularies often reserve them too)."""
    return {tok: idx for tok, idx in tokenizer.get_vocab().items() if is_chat_control_token(tok)}


def looks_assistant_style(text: str) -> bool:
    return bool(_ASSISTANT_OPENERS.match(text))


def contains_chat_marker(text: str) -> bool:
    return bool(_CHAT_TEXT_PATTERN.search(text))


def install_guard(tokenizer, prepend_bos: bool, forbidden_ids: set[int]) -> None:
    """Mark `tokenizer` as guarded; only the loader calls this, once it has decided on BOS."""
    tokenizer.stage1_guard = {"prepend_bos": prepend_bos, "bos_id": tokenizer.bos_token_id,
                              "forbidden_ids": set(forbidden_ids)}


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token IDs of a prompt: no tokenizer-added specials, BOS only where the loader decided."""
    state = getattr(tokenizer, "stage1_guard", None)
    if state is None:
        raise ContaminationError("encode_prompt: this tokenizer was not loaded through CleanModelLoader")
    marker = _CHAT_TEXT_PATTERN.search(text)
    if marker:
        raise ContaminationError(f"prompt contains the chat marker {marker.group(0)!r}: {text[:80]!r}")
    ids = tokenizer.encode(text, add_special_tokens=False)
    leaked = sorted(set(ids) & state["forbidden_ids"])
    if leaked:
        raise ContaminationError(f"prompt encodes to chat-control token id(s) {leaked}: {text[:80]!r}")
    return ([state["bos_id"]] if state["prepend_bos"] else []) + ids


def encode_continuation(tokenizer, text: str) -> list[int]:
    """Token IDs of text that follows a prompt (a training completion): guarded, never a BOS."""
    ids = encode_prompt(tokenizer, text)
    return ids[1:] if tokenizer.stage1_guard["prepend_bos"] else ids
