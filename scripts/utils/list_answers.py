"""List answers: an instruction that asks for a list gets one item per line, checked by code.

The bundled base model answers "List five fruits." with an inline enumeration ("Apples, pears,
plums, figs and grapes.") or with prose; its demonstrations' numbered list is rarely copied
(H100, response_v4: 4 of 392 candidates passed a numbered-list constraint, and 34 of 1,964 training
answers held a list line). An adapter trained on such pairs never writes a list. Here the
instruction's own request becomes a verifiable constraint (the instruction text is unchanged):

- `requested_list(instruction)`: a request for a list (a list verb or the word "list"), the number of
  items it names (2-10, digits or words, read only where it quantifies the listed things: "List 5
  fruits", "a list of ten ...", "Name the top 3 ..."; None when it names none or the number is a value
  or ambiguous, as in "List words that begin with 8") and its style (bullets where it says so, else
  numbered).
- `list_answer(request, response)`: the answer as a line list that satisfies the request, or None.
  A line list with the asked number of items is kept as it is ("measured"); an inline enumeration
  of short items (at most `MAX_ITEM_WORDS` words each, commas and a final "and"/"or") is rewritten
  one item per line, cut to the asked number ("rewritten"), after a lead-in that ends with a colon.
  Prose is not a list: None.

Stage 1 filters the candidates of a list request that `list_answer` cannot make a list of
(`not_a_list`) and writes the kept pair as its line list (constraint mode "list_format", the
constraint `numbered_items` / `bullet_items` with the item count, re-checked like every constraint).

    request = requested_list("Name four colours.")   # ListRequest(count=4, style="numbered")
    list_answer(request, "Red, blue, green and yellow.").response  # "1. Red\\n2. Blue\\n3. Green\\n4. Yellow"
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .constraints import NUMBER_WORDS, Constraint, check, count_words, list_items, normalize_text, to_record

__all__ = ["ListRequest", "ListAnswer", "requested_list", "inline_items", "list_answer", "MAX_ITEM_WORDS", "MAX_ITEMS"]

MAX_ITEM_WORDS = 6  # a longer "item" is a clause: the text is prose, not an enumeration
MAX_ITEMS = 10
_NUMBERS = {word: value for value, word in enumerate(NUMBER_WORDS) if 2 <= value <= MAX_ITEMS}
_LIST_VERBS = r"list|enumerate"
_COUNTED_VERBS = r"name|give|suggest|provide|identify|mention|recommend|write down|what are|what is a list of|tell me"
# A number quantifies the listed things only in a count slot: right after a list or counted verb that opens a
# sentence ("Name three animals", "Give me five tips"), after "list" / "list of" anywhere ("Make a list of 6 ..."),
# or after "top" ("the top 5 ..."), with at most "the"/"your"/"exactly"/... between. Any other word before it
# makes it a value or a bound ("begin with 8", "more than 5", "number 0 through 9", "at least 3", "page 5",
# "animals with exactly 4 legs"), so it is not read. It must be followed by a word (the things: "3 good reasons"),
# not by a range or alternative ("2 or 3", "3 to 5", "2-5"); "5pm", "3D" and "1990" are no whole number 2-10.
_NUMBER = r"(10|[2-9]|" + "|".join(_NUMBERS) + r")\b"
_COUNT_SLOT = re.compile(
    rf"(?:(?:^|[.?!;:]\s+)\s*(?:please\s+)?(?:{_LIST_VERBS}|{_COUNTED_VERBS})(?:\s+(?:me|us))?"
    r"|\blist(?:\s+of)?|\btop)"
    rf"\s+(?:(?:the|your|my|our|exactly|only|just)\s+)?(?:top\s+)?{_NUMBER}(?=\s+[a-z])(?!\s+(?:to|or|and|through)\b)", re.IGNORECASE)
# "A list with 5 items", "a list that has exactly 7 entries", "as 4 numbered lines": the noun names the list's
# items, so the number counts them after these words too (a bound such as "at least 5 items" or "3 to 5 items"
# stays unread; a bare "points" or "lines" may be a value: "teams with 5 points").
_ITEMS_SLOT = re.compile(rf"\b(?:with|has|have|having|holds?|holding|containing|in|of|as|exactly|precisely)\s+"
                         rf"(?:(?:exactly|precisely)\s+)?{_NUMBER}\s+"
                         r"(?:(?:numbered|bulleted)\s+(?:items|entries|points|lines)|items|entries|bullets|bullet points)\b", re.IGNORECASE)
# A number whose noun (after at most two adjectives) is one of these counts something other than the list's
# items ("in 3 short sentences", "5 minute recipes").
_NOT_ITEMS = re.compile(r"(?:\s+[\w'-]+){0,2}?\s+(?:words?|sentences?|paragraphs?|lines?|letters?|characters?|minutes?|hours?|"
                        r"days?|weeks?|months?|years?|times|pages?|percent|steps? of)\b", re.IGNORECASE)
_LIST_VERB = re.compile(rf"^\s*(?:please\s+)?(?:{_LIST_VERBS})\b", re.IGNORECASE)
_COUNTED_VERB = re.compile(rf"^\s*(?:please\s+)?(?:{_COUNTED_VERBS})\b", re.IGNORECASE)
_LIST_WORD = re.compile(r"\blist\b", re.IGNORECASE)
_BULLET_WORD = re.compile(r"\bbullet", re.IGNORECASE)
_TRAILING = re.compile(r"[\s.!;]+$")
_ETC = re.compile(r"(?:,\s*|\s+)(?:etc\.?|and so on|and more)\s*$", re.IGNORECASE)
_LAST_JOIN = re.compile(r"\s+(?:and|or)\s+(?=\S)", re.IGNORECASE)


@dataclass(frozen=True)
class ListRequest:
    count: int | None  # the number of items asked for; None: as many as the answer gives (2-10)
    style: str  # "numbered" or "bullets"


@dataclass(frozen=True)
class ListAnswer:
    response: str
    constraint: dict  # record form (utils.constraints.to_record), checked
    mode: str  # "measured" (already a line list) or "rewritten"


def _count(instruction: str) -> int | None:
    """The number of items the instruction asks for, or None. Two different counts are ambiguous:
    None, since a wrong count cuts or rejects right answers and None keeps any list of 2-10 items."""
    counts = set()
    slots = [m for m in _COUNT_SLOT.finditer(instruction) if not _NOT_ITEMS.match(instruction, m.end())]
    for match in slots + list(_ITEMS_SLOT.finditer(instruction)):
        token = match.group(1).lower()
        counts.add(int(token) if token.isdigit() else _NUMBERS[token])
    return counts.pop() if len(counts) == 1 else None


def requested_list(instruction: str) -> ListRequest | None:
    """The list an instruction asks for, or None when it asks for none."""
    count = _count(instruction)
    asks = bool(_LIST_VERB.match(instruction) or _LIST_WORD.search(instruction)
                or (count is not None and _COUNTED_VERB.match(instruction)))
    if not asks:
        return None
    return ListRequest(count=count, style="bullets" if _BULLET_WORD.search(instruction) else "numbered")


def inline_items(response: str) -> tuple[str | None, list[str]] | None:
    """(lead-in or None, items) of a one-line enumeration ("A, B and C."), or None for anything else:
    more than one line, fewer than two items, an item of more than MAX_ITEM_WORDS words or one that
    holds a sentence end."""
    text = normalize_text(response).strip()
    if not text or "\n" in text:
        return None
    lead = None
    if ":" in text:
        lead, _, text = text.partition(":")
        lead, text = lead.strip() + ":", text.strip()
    text = _ETC.sub("", _TRAILING.sub("", text))
    parts = [part.strip() for part in re.split(r"\s*[,;]\s*", text)]
    parts[-1:] = [piece.strip() for piece in _LAST_JOIN.split(parts[-1])]  # "B and C" ends the enumeration
    parts = [re.sub(r"^(?:and|or)\s+", "", part, flags=re.IGNORECASE) for part in parts]
    if len(parts) < 2 or any(re.search(r"[.!?:]", part) or not 1 <= count_words(part) <= MAX_ITEM_WORDS for part in parts):
        return None
    return lead, parts


def _distinct(items: list[str]) -> list[str]:
    seen, kept = set(), []
    for item in items:
        key = item.lower().strip()
        if key not in seen:
            seen.add(key)
            kept.append(item)
    return kept


def _constraint(request: ListRequest, count: int) -> Constraint:
    # The instruction already asks for the list, so nothing is appended to it: the text is empty and
    # the wording id is the family's first (it names no wording shown to the model).
    if request.style == "bullets":
        return Constraint("bullet_items", {"num_bullets": count}, "bullet_items.train1", "")
    return Constraint("numbered_items", {"num_items": count}, "numbered_items.train1", "")


def list_answer(request: ListRequest, response: str) -> ListAnswer | None:
    """The response as a line list that satisfies `request`, or None where it cannot be one."""
    lines = list_items(response)
    if lines:
        count = request.count or len(lines)
        constraint = _constraint(request, count)
        if 2 <= count <= MAX_ITEMS and check(constraint, response).passed:
            return ListAnswer(response.strip(), to_record(constraint), "measured")
        return None
    parsed = inline_items(response)
    if parsed is None:
        return None
    lead, items = parsed
    items = _distinct(items)
    count = request.count or min(len(items), MAX_ITEMS)
    if len(items) < count or count < 2:
        return None
    items = [item[0].upper() + item[1:] for item in items[:count]]
    markers = ["-"] * count if request.style == "bullets" else [f"{i}." for i in range(1, count + 1)]
    body = "\n".join(f"{marker} {item}" for marker, item in zip(markers, items, strict=True))
    text = f"{lead}\n{body}" if lead else body
    constraint = _constraint(request, count)
    if not check(constraint, text).passed:  # the rewrite promised a passing list: a bug, never a record
        raise RuntimeError(f"list rewrite fails its own check {check(constraint, text)}: {text!r}")
    return ListAnswer(text, to_record(constraint), "rewritten")
