"""Verifiable constraints: a catalogue of rule families that code can word, check and enforce.

A constraint is a rule about the form of an answer ("at most 40 words", "all lowercase", "end with
a P.S."). Each family in `FAMILIES` has

  wordings  natural phrasings of the rule, split into TRAINING wordings and TEST wordings (disjoint;
            a wording id such as "words_max.test2" stays valid as long as lists are only appended to);
            a trained family has at least MIN_TRAINING_WORDINGS (12) training wordings of varied form
            (imperative, "Please ...", "Could you ...?", a terse clause), so that training teaches the
            rule rather than its phrasing; those added in constraints_v2 share no run of 5 words with
            any test wording (tests/test_constraint_wordings.py)
  sample    seeded parameters for a new instruction: `sample(rng) -> params`
  measure   parameters a given response already satisfies (its word-count band, a keyword it
            contains, its first word), or None; families without one reuse `sample` and keep the
            parameters only if the response passes
  check     a pure checker `(response, params) -> (passed, reason)`
  rewrite   where possible, a deterministic `(response, params) -> response | None` that makes the
            response pass while keeping its content; None when the response has too little material
            (three words cannot become five sentences)

`HELD_OUT_FAMILIES` is the one list of families kept out of training: they have test wordings only,
so `sample_constraint(..., split="train")` on one raises, and only the held-out test set uses them.
`TRAINED_FAMILIES` is every other family.

Text conventions shared by every checker: line breaks are normalised (CRLF, CR, U+2028/9 -> LF);
a word is a run of letters, digits and combining marks with inner apostrophes or hyphens ("don't",
"well-known", "हिन्दी"); a list line starts with "1." / "1)" (one to three digits) or a bullet
("-", "*", "•", "‣", "◦", "▪", "●") followed by whitespace and text, and its marker is not a word;
sentences end at . ! ? or … (optionally followed by one closing quote or bracket) before whitespace,
and at the end of a paragraph or list item; paragraphs are separated by blank lines.

Usage (test set and Stage 1 alike):

    c = sample_constraint("words_max", random.Random(1), split="test")      # Constraint(...)
    instruction, constraints = build_instruction("Describe a river.", [c])
    check(c, "A river runs.").passed                                         # True
    rewrite(c, long_answer)                                                  # trimmed at a sentence end
    to_record(c) / from_record(record)                                       # JSONL form
"""

from __future__ import annotations

import json
import math
import random
import re
import unicodedata
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from .exit_codes import BadInputError

__all__ = [
    "CATALOGUE_VERSION",
    "HELD_OUT_FAMILIES",
    "MIN_TRAINING_WORDINGS",
    "TRAINED_FAMILIES",
    "FAMILIES",
    "WORDING_SPLITS",
    "Family",
    "Constraint",
    "CheckResult",
    "get_family",
    "resolve_families",
    "family_split",
    "compatible",
    "sample_constraint",
    "build_instruction",
    "check",
    "check_all",
    "rewrite",
    "rewrite_all",
    "to_record",
    "from_record",
    "validate_catalogue",
    "normalize_text",
    "words",
    "count_words",
    "NUMBER_WORDS",
    "split_sentences",
    "count_sentences",
    "paragraphs",
    "list_items",
]

CATALOGUE_VERSION = "constraints_v2"
# A trained family needs many varied training wordings: with four or five, a 270M model learned the
# surface strings and ignored the same rule in a test wording (issue 14); v2 has 12 or more per family.
MIN_TRAINING_WORDINGS = 12
# The held-out families, one of each kind of rule (length, case, repeated words, layout): never
# worded for training, used only by the held-out test set to measure generalisation.
HELD_OUT_FAMILIES = ("words_range", "capital_words", "keyword_frequency", "sections")
WORDING_SPLITS = ("train", "test")


# ---- text measures ---------------------------------------------------------------------------
def _combining_marks() -> str:
    """A regex class body of the BMP combining marks that Python's \\w leaves out (Devanagari vowel
    signs, the dot "İ".lower() leaves behind): without them one Hindi word counts as five."""
    spans, start, previous = [], None, None
    for code in range(0x300, 0x10000):
        char = chr(code)
        if unicodedata.category(char).startswith("M") and not char.isalnum():
            start = code if start is None else start
            previous = code
        elif start is not None:
            spans.append((start, previous))
            start = None
    if start is not None:
        spans.append((start, previous))
    return "".join(f"\\u{a:04x}" if a == b else f"\\u{a:04x}-\\u{b:04x}" for a, b in spans)


_LETTER = rf"(?:[^\W_]|[{_combining_marks()}])"
_WORD = re.compile(rf"[^\W_]{_LETTER}*(?:['\u2019\-][^\W_]{_LETTER}*)*")
_BULLETS = "-*\u2022\u2023\u25e6\u25aa\u25cf"
_MARKER = re.compile(rf"^[ \t\u00a0]*(?:(\d{{1,3}})[.)]|([{re.escape(_BULLETS)}]))[ \t\u00a0]+(?=\S)")
_TERMINATOR = ".!?\u2026"
_CLOSING = "\"'\u201d\u2019\u00bb)\\]"
_SENTENCE_BREAK = re.compile(rf"(?:(?<=[{_TERMINATOR}])|(?<=[{_TERMINATOR}][{_CLOSING}]))\s+")
_ENDS_SENTENCE = re.compile(rf"[{_TERMINATOR}][{_CLOSING}]?$")
_ABBREVIATION_END = re.compile(r"(?<![^\W_])(?:e\.g|i\.e|mr|mrs|ms|dr|vs|cf)\.$", re.IGNORECASE)
_COMMAS = ",\uff0c\u3001\u060c\ufe50"


def normalize_text(text: str) -> str:
    """LF line breaks (CRLF, CR, U+2028 -> LF; U+2029 -> a blank line) and no leading BOM."""
    return (text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n").replace("\u2028", "\n")
            .replace("\u2029", "\n\n"))


def _word_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of every word of already-normalised text, list markers skipped."""
    spans, offset = [], 0
    for line in text.split("\n"):
        marker = _MARKER.match(line)
        spans += [(offset + m.start(), offset + m.end()) for m in _WORD.finditer(line, marker.end() if marker else 0)]
        offset += len(line) + 1
    return spans


def words(text: str) -> list[str]:
    """The words of `text` (see the module docstring), list markers excluded."""
    text = normalize_text(text)
    return [text[a:b] for a, b in _word_spans(text)]


def count_words(text: str) -> int:
    """Number of words; "1. Apple" is one word, "well-known" and "don't" are one each."""
    return len(_word_spans(normalize_text(text)))


def _has_word(text: str) -> bool:
    return _WORD.search(text) is not None


def _list_lines(text: str) -> list[tuple[str | None, str | None, str]]:
    """(number or None, bullet or None, item text) of each list line."""
    found = []
    for line in normalize_text(text).split("\n"):
        marker = _MARKER.match(line)
        if marker:
            found.append((marker.group(1), marker.group(2), line[marker.end():].strip()))
    return found


def list_items(text: str) -> list[str]:
    """Texts of the lines that start with "1." / "1)" / a bullet, then whitespace and text."""
    return [item for _, _, item in _list_lines(text)]


def _blocks(text: str) -> list[str]:
    """Paragraphs (their lines joined by spaces) and list items, in order: the units sentences live in."""
    blocks, current = [], []
    for line in normalize_text(text).split("\n"):
        marker = _MARKER.match(line)
        if marker or not line.strip():
            if current:
                blocks.append(" ".join(current))
                current = []
            if marker:
                blocks.append(line[marker.end():].strip())
        else:
            current.append(line.strip())
    if current:
        blocks.append(" ".join(current))
    return blocks


def _sentences_of(block: str) -> list[str]:
    pieces = []
    for piece in _SENTENCE_BREAK.split(block):
        if pieces and _ABBREVIATION_END.search(pieces[-1]):
            pieces[-1] += " " + piece
        else:
            pieces.append(piece)
    return [piece.strip() for piece in pieces if _has_word(piece)]


def split_sentences(text: str) -> list[str]:
    """Sentences that contain a word. A sentence ends at . ! ? … (plus at most one closing quote or
    bracket) before whitespace, or where its paragraph or list item ends; "3.5", "U.S.A" and the
    abbreviations "e.g." "i.e." "Mr." "Mrs." "Ms." "Dr." "vs." "cf." do not end one; "Wait... what?" is two."""
    return [sentence for block in _blocks(text) for sentence in _sentences_of(block)]


def count_sentences(text: str) -> int:
    return len(split_sentences(text))


def paragraphs(text: str) -> list[str]:
    """Blocks separated by blank lines (whitespace-only lines count as blank) that contain a word."""
    return [block.strip() for block in re.split(r"\n\s*\n", normalize_text(text).strip()) if _has_word(block)]


def _fold(text: str) -> str:
    """Case- and whitespace-insensitive form for phrase matching."""
    return " ".join(normalize_text(text).split()).casefold()


def _cased(char: str) -> bool:
    return char.lower() != char.upper()


def _is_caps_word(word: str) -> bool:
    """A word in capitals: at least two letters that have case ("NASA", "DON'T"; not "I" or "A1")."""
    return sum(map(_cased, word)) >= 2 and word == word.upper()


NUMBER_WORDS = tuple("zero one two three four five six seven eight nine ten eleven twelve".split())


def _number_word(n: int) -> str:
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def _quoted_list(items: list[str]) -> str:
    quoted = [f'"{item}"' for item in items]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


def _counted(n: int, singular: str, plural: str) -> dict:
    """{"n": "3 items", "w": "three items"} for wordings that spell the count either way."""
    noun = singular if n == 1 else plural
    return {"n": f"{n} {noun}", "w": f"{_number_word(n)} {noun}", "count": n, "count_word": _number_word(n)}


# ---- shared rewrites -------------------------------------------------------------------------
def _strip_end(piece: str) -> str:
    """A sentence without its final terminator (kept before a closing quote) or trailing , ; : dash."""
    piece = re.sub(rf"[{_TERMINATOR}]+(?=[{_CLOSING}]?$)", "", piece.rstrip())
    return piece.rstrip(" \t,;:\u2014\u2013-")


def _end_sentence(piece: str) -> str:
    """The piece ending in a terminator the sentence splitter honours ("e.g." is not one)."""
    piece = piece.rstrip().rstrip(",;:\u2014\u2013- \t")
    return piece if _ENDS_SENTENCE.search(piece) and not _ABBREVIATION_END.search(piece) else piece + "."


_MARKER_ONLY = re.compile(r"\d{1,3}[.)]")


def _halves(piece: str, at: int) -> list[str] | None:
    """The piece cut before offset `at` as two sentences, or None where either half would not read
    back as exactly one sentence (a cut inside "e.g.") or the first reads as a list marker ("3.")."""
    left, right = _end_sentence(piece[:at]), piece[at:]
    right = right[:1].upper() + right[1:]
    if _MARKER_ONLY.fullmatch(left) or len(_sentences_of(left)) != 1 or len(_sentences_of(right)) != 1:
        return None
    return [left, right]


def _split_piece(piece: str) -> list[str] | None:
    """One sentence as two, cut at the , ; : or dash nearest its middle, else at the word nearest its middle."""
    spans = list(_WORD.finditer(piece))
    middle = len(spans) / 2
    at_pause = {k for k in range(1, len(spans)) if re.search(r"[,;:\u2014]", piece[spans[k - 1].end():spans[k].start()])}
    for k in sorted(range(1, len(spans)), key=lambda i: (i not in at_pause, abs(i - middle), i)):
        halves = _halves(piece, spans[k].start())
        if halves is not None:
            return halves
    return None


def _units(text: str, n: int) -> list[list[str]] | None:
    """The response's sentences in exactly n consecutive groups; the longest sentences are split
    first when there are fewer than n (None when none can be split: too few words). A stray "3."
    is dropped: at the start of a line it would read as a list marker."""
    pieces = [piece for piece in split_sentences(text) if not _MARKER_ONLY.fullmatch(piece)]
    while len(pieces) < n:
        for index in sorted(range(len(pieces)), key=lambda i: (-count_words(pieces[i]), i)):
            halves = _split_piece(pieces[index])
            if halves is not None:
                pieces[index:index + 1] = halves
                break
        else:
            return None
    size, extra = divmod(len(pieces), n)
    groups, start = [], 0
    for i in range(n):
        end = start + size + (i < extra)
        groups.append(pieces[start:end])
        start = end
    return groups


def _sentence_cuts(text: str) -> list[int]:
    """Offsets where a sentence or a line ends: the places a trimmed answer may stop."""
    cuts, offset = [], 0
    for line in text.split("\n"):
        marker = _MARKER.match(line)
        cuts += [offset + m.start() for m in _SENTENCE_BREAK.finditer(line, marker.end() if marker else 0)
                 if not _ABBREVIATION_END.search(line[:m.start()])]
        if line.strip():
            cuts.append(offset + len(line.rstrip()))
        offset += len(line) + 1
    return cuts


def _trim_words(text: str, low: int, high: int) -> str | None:
    """Cut to at most `high` words (and at least `low`): at the last sentence end that keeps at least
    half of `high` words, else right after word `high` with a full stop."""
    spans = _word_spans(text)
    if len(spans) < max(low, 1):
        return None
    if len(spans) <= high:
        return text.strip()
    keep_at_least = max(low, 1, math.ceil(high / 2))
    for cut in sorted(_sentence_cuts(text), reverse=True):
        if keep_at_least <= count_words(text[:cut]) <= high:
            return text[:cut].strip()
    return _end_sentence(text[:spans[high - 1][1]]).strip()


# ---- families: length ------------------------------------------------------------------------
_WORD_GRID = (10, 15, 20, 25, 30, 40, 50, 60, 80, 100, 150, 200)
_WORD_BANDS = ((10, 30), (20, 40), (30, 50), (40, 60), (50, 80), (60, 100), (80, 120), (100, 150))


def _check_words_max(text, p):
    n = count_words(text)
    return 1 <= n <= p["max_words"], f"{n} words (at most {p['max_words']})"


def _measure_words_max(rng, text):
    n = count_words(text)
    above = [g for g in _WORD_GRID if g >= n]
    return {"max_words": rng.choice(above[:2])} if n and above else None


def _check_words_min(text, p):
    n = count_words(text)
    return n >= p["min_words"], f"{n} words (at least {p['min_words']})"


def _measure_words_min(rng, text):
    below = [g for g in _WORD_GRID if g <= count_words(text)]
    return {"min_words": rng.choice(below[-2:])} if below else None


def _check_words_range(text, p):
    n = count_words(text)
    return p["min_words"] <= n <= p["max_words"], f"{n} words (between {p['min_words']} and {p['max_words']})"


def _measure_words_range(rng, text):
    n = count_words(text)
    bands = [b for b in _WORD_BANDS if b[0] <= n <= b[1]]
    return dict(zip(("min_words", "max_words"), rng.choice(bands), strict=True)) if bands else None


def _check_sentences(text, p):
    n = count_sentences(text)
    return n == p["num_sentences"], f"{n} sentences (exactly {p['num_sentences']})"


def _rewrite_sentences(text, p):
    groups = _units(text, p["num_sentences"])
    if groups is None:
        return None
    merged = ["; ".join([_strip_end(s) for s in group[:-1]] + [group[-1]]) for group in groups]
    return " ".join(_end_sentence(sentence) for sentence in merged)


def _check_paragraphs(text, p):
    n = len(paragraphs(text))
    return n == p["num_paragraphs"], f"{n} paragraphs (exactly {p['num_paragraphs']}, separated by blank lines)"


def _rewrite_paragraphs(text, p):
    groups = _units(text, p["num_paragraphs"])
    return None if groups is None else "\n\n".join(" ".join(group) for group in groups)


def _bullets(text: str) -> list[str]:
    return [item for _, bullet, item in _list_lines(text) if bullet]


def _numbers(text: str) -> list[int]:
    return [int(number) for number, _, _ in _list_lines(text) if number]


def _numbered_run(text: str) -> int:
    """How many numbered items the text has when they run 1, 2, ... n in order, else 0."""
    numbers = _numbers(text)
    return len(numbers) if numbers == list(range(1, len(numbers) + 1)) else 0


def _check_bullets(text, p):
    n = len(_bullets(text))
    return n == p["num_bullets"], f"{n} bullet points (exactly {p['num_bullets']})"


def _rewrite_bullets(text, p):
    groups = _units(text, p["num_bullets"])
    return None if groups is None else "\n".join("- " + " ".join(group) for group in groups)


def _check_numbered(text, p):
    numbers = _numbers(text)
    expected = list(range(1, p["num_items"] + 1))
    if numbers != expected:
        shown = ", ".join(map(str, numbers[:12])) or "none"
        return False, f"numbered items {shown} (expected 1 to {p['num_items']} in order)"
    return True, f"{len(numbers)} numbered items"


def _rewrite_numbered(text, p):
    groups = _units(text, p["num_items"])
    return None if groups is None else "\n".join(f"{i}. {' '.join(group)}" for i, group in enumerate(groups, 1))


_SEPARATORS = ("***", "---", "===")


def _sections(text: str, separator: str) -> list[str]:
    parts, current = [], []
    for line in normalize_text(text).split("\n"):
        if line.strip() == separator:
            parts.append("\n".join(current))
            current = []
        else:
            current.append(line)
    parts.append("\n".join(current))
    while parts and not parts[0].strip():
        parts.pop(0)
    while parts and not parts[-1].strip():
        parts.pop()
    return parts


def _check_sections(text, p):
    parts = _sections(text, p["separator"])
    if any(not _has_word(part) for part in parts):
        return False, f"a section between {p['separator']!r} lines has no text"
    return len(parts) == p["num_sections"], f"{len(parts)} sections split by {p['separator']!r} (exactly {p['num_sections']})"


def _measure_sections(rng, text):
    for separator in _SEPARATORS:
        parts = _sections(text, separator)
        if 2 <= len(parts) <= 6 and all(_has_word(part) for part in parts):
            return {"num_sections": len(parts), "separator": separator}
    return None


def _rewrite_sections(text, p):
    groups = _units(text, p["num_sections"])
    return None if groups is None else f"\n{p['separator']}\n".join(" ".join(group) for group in groups)


def _measure_count(name, low, high, counter):
    def measure(rng, text):
        n = counter(text)
        return {name: n} if low <= n <= high else None
    return measure


# ---- families: case --------------------------------------------------------------------------
def _check_lowercase(text, p):
    upper = sorted({c for c in text if c != c.lower()})
    if not any(map(_cased, text)):
        return False, "no letters"
    return not upper, "all lowercase" if not upper else f"capitals found: {''.join(upper[:10])}"


def _check_uppercase(text, p):
    lower = sorted({c for c in text if c != c.upper()})
    if not any(map(_cased, text)):
        return False, "no letters"
    return not lower, "all capitals" if not lower else f"lowercase letters found: {''.join(lower[:10])}"


def _check_capital_words(text, p):
    n = sum(map(_is_caps_word, words(text)))
    ok = n >= p["count"] if p["relation"] == "at_least" else n <= p["count"]
    return ok, f"{n} words in capitals ({p['relation'].replace('_', ' ')} {p['count']})"


def _measure_capital_words(rng, text):
    n = sum(map(_is_caps_word, words(text)))
    if n:
        return {"relation": "at_least", "count": rng.randint(1, min(n, 6))}
    return {"relation": "at_most", "count": rng.randint(1, 3)}


def _rewrite_capital_words(text, p):
    spans = _word_spans(text)
    caps = [span for span in spans if _is_caps_word(text[span[0]:span[1]])]
    if p["relation"] == "at_least":
        # the first words that can be capitalised (two or more cased letters), in reading order
        candidates = [s for s in spans if s not in caps and sum(map(_cased, text[s[0]:s[1]])) >= 2]
        needed = p["count"] - len(caps)
        if needed > len(candidates):
            return None
        change, convert = candidates[:max(needed, 0)], str.upper
    else:
        change, convert = caps[p["count"]:], lambda w: w[:1] + w[1:].lower()
    for start, end in sorted(change, reverse=True):  # from the end, so earlier offsets stay valid
        text = text[:start] + convert(text[start:end]) + text[end:]
    return text


# ---- families: punctuation -------------------------------------------------------------------
def _check_no_commas(text, p):
    found = sum(text.count(c) for c in _COMMAS)
    if not _has_word(text):
        return False, "no words"
    return found == 0, "no commas" if not found else f"{found} comma(s)"


def _rewrite_no_commas(text, p):
    text = re.sub(r"(?<=\d)[,\uff0c](?=\d{3}(?!\d))", "", text)  # 1,000 -> 1000
    text = re.sub(rf"[ \t]*[{_COMMAS}]+(?=\s|$)", "", text)
    return re.sub(rf"[ \t]*[{_COMMAS}]+[ \t]*", " ", text)


_MARK_NAMES = {"?": "a question mark", "!": "an exclamation mark", ".": "a full stop"}


def _check_end_mark(text, p):
    stripped = text.rstrip()
    last = stripped[-1:] or "nothing"
    return _has_word(stripped) and stripped.endswith(p["mark"]), f"ends with {last!r} (wanted {p['mark']!r})"


def _measure_end_mark(rng, text):
    last = text.rstrip()[-1:]
    return {"mark": last} if last in _MARK_NAMES else None


def _rewrite_end_mark(text, p):
    body = re.sub(rf"[\s{_TERMINATOR};:,]+$", "", text.rstrip())
    return body + p["mark"] if _has_word(body) else None


# ---- families: words -------------------------------------------------------------------------
_STOPWORDS = frozenset(
    "about above after again also among because been before being below between both could does doing down during "
    "each even every from have having here into just like many more most much must only other over same should some "
    "such than that their them then there these they this those through under until upon very were what when where "
    "which while will with would your yours".split())
_INCLUDE_POOL = ("gentle golden whisper silver ancient shadow memory promise wonder careful simple hidden distant "
                 "curious patient steady humble vivid").split()
_FORBID_POOL = "very really thing things good nice just also lot stuff basically".split()
_FREQUENCY_POOL = "light time warm small calm heart water home slow colour".split()


def _folded_words(text: str) -> Counter:
    """Word counts for keyword rules; the parts of a hyphenated word count too ("very-very" uses "very")."""
    counts = Counter()
    for word in words(text):
        folded = word.casefold()
        counts[folded] += 1
        if "-" in folded:
            counts.update(folded.split("-"))
    return counts


def _content_words(text: str) -> list[str]:
    """Distinct alphabetic words of four or more letters that are not function words, lowercased, sorted."""
    return sorted({w.lower() for w in words(text) if len(w) >= 4 and w.isalpha() and w.casefold() not in _STOPWORDS})


def _check_include(text, p):
    present = _folded_words(text)
    missing = [k for k in p["keywords"] if present[k.casefold()] == 0]
    return not missing, "all keywords present" if not missing else f"missing {', '.join(map(repr, missing))}"


def _measure_include(rng, text):
    candidates = _content_words(text)
    if not candidates:
        return None
    return {"keywords": rng.sample(candidates, min(len(candidates), rng.choice((1, 1, 2))))}


def _check_forbid(text, p):
    present = _folded_words(text)
    found = [k for k in p["forbidden"] if present[k.casefold()]]
    return not found, "no forbidden word" if not found else f"uses {', '.join(map(repr, found))}"


def _measure_forbid(rng, text):
    present = _folded_words(text)
    absent = [w for w in _FORBID_POOL if present[w] == 0]
    return {"forbidden": rng.sample(absent, min(len(absent), rng.choice((1, 2))))} if absent else None


def _check_frequency(text, p):
    n = _folded_words(text)[p["keyword"].casefold()]
    return n >= p["count"], f"{p['keyword']!r} appears {n} times (at least {p['count']})"


def _measure_frequency(rng, text):
    counts = _folded_words(text)
    repeated = [w for w in _content_words(text) if counts[w.casefold()] >= 2]
    if not repeated:
        return None
    word = rng.choice(repeated)
    return {"keyword": word, "count": rng.randint(2, min(counts[word.casefold()], 5))}


# ---- families: start and end -----------------------------------------------------------------
_FIRST_WORDS = "Honestly Often Here Most Picture Once Usually There Every Few".split()
_START_PHRASES = ("Here is my answer:", "Let me explain.", "Good question.", "To put it simply:", "Here goes:",
                  "In short:")
_END_PHRASES = ("That is all.", "I hope this helps.", "Thank you for reading.", "Those are my thoughts.",
                "And that is the whole story.", "Let me know what you think.")


def _check_first_word(text, p):
    found = words(text)[:1]
    first = found[0] if found else ""
    return first.casefold() == p["word"].casefold(), f"first word {first!r} (wanted {p['word']!r})"


def _measure_first_word(rng, text):
    found = words(text)[:1]
    return {"word": found[0]} if found and found[0].isalpha() else None


def _starts_with_phrase(text: str, phrase: str) -> bool:
    folded, wanted = _fold(text), _fold(phrase)
    if not folded.startswith(wanted):
        return False
    rest = folded[len(wanted):]
    return not (_WORD.match(wanted[-1:]) and _WORD.match(rest[:1]))  # "Here goes" must not match "Here goest"


def _check_start_phrase(text, p):
    ok = _starts_with_phrase(text, p["phrase"])
    return ok, f"starts with {p['phrase']!r}" if ok else f"does not start with {p['phrase']!r}"


def _measure_start_phrase(rng, text):
    first_line = text.strip().split("\n")[0]
    spans = list(_WORD.finditer(first_line))
    if not spans:
        return None
    phrase = first_line[:spans[min(len(spans), rng.randint(2, 4)) - 1].end()]
    return {"phrase": phrase} if '"' not in phrase else None


def _rewrite_start_phrase(text, p):
    return f"{p['phrase']} {text.strip()}"


def _check_end_phrase(text, p):
    folded, wanted = _fold(text), _fold(p["phrase"])
    before = folded[:len(folded) - len(wanted)]
    ok = folded.endswith(wanted) and not (_WORD.match(wanted[:1]) and _WORD.match(before[-1:]))
    return ok, f"ends with {p['phrase']!r}" if ok else f"does not end with {p['phrase']!r}"


def _measure_end_phrase(rng, text):
    last_line = text.strip().split("\n")[-1]
    spans = list(_WORD.finditer(last_line))
    if not spans:
        return None
    phrase = last_line[spans[-min(len(spans), rng.randint(2, 5))].start():].strip()
    return {"phrase": phrase} if '"' not in phrase else None


def _rewrite_end_phrase(text, p):
    body = text.strip()
    if "\n" in body:
        return f"{body}\n\n{p['phrase']}"
    return f"{_end_sentence(body) if _has_word(body) else body} {p['phrase']}"


# ---- families: formats -----------------------------------------------------------------------
_FENCE = re.compile(r"\A```[A-Za-z]*[ \t]*\n(.*)\n[ \t]*```\Z", re.DOTALL)


def _check_json(text, p):
    body = text.strip()
    fenced = _FENCE.match(body)
    try:
        value = json.loads(fenced.group(1) if fenced else body)
    except ValueError as err:
        return False, f"not JSON ({err.msg})"
    if not isinstance(value, dict) or not value:
        return False, f"JSON {type(value).__name__}, not a non-empty object"
    return True, f"a JSON object with {len(value)} key(s)"


def _rewrite_json(text, p):
    return json.dumps({"answer": text.strip()}, ensure_ascii=False)


def _check_quoted(text, p):
    body = text.strip()
    ok = len(body) >= 2 and (body[0], body[-1]) in (('"', '"'), ("\u201c", "\u201d")) and _has_word(body[1:-1])
    return ok, "wrapped in double quotes" if ok else "not wrapped in double quotes"


def _rewrite_quoted(text, p):
    return f'"{text.strip()}"'


_TITLE = re.compile(r"<<([^<>\n]*)>>")


def _check_title(text, p):
    lines = normalize_text(text).strip().split("\n")
    title = _TITLE.fullmatch(lines[0].strip())
    if not title or not _has_word(title.group(1)):
        return False, "first line is not a title in << >>"
    if not _has_word("\n".join(lines[1:])):
        return False, "nothing after the title"
    return True, f"title <<{title.group(1).strip()}>>"


def _rewrite_title(text, p):
    sentences = split_sentences(text)
    if not sentences:
        return None
    return f"<<{' '.join(_WORD.findall(sentences[0])[:5])}>>\n\n{text.strip()}"


_POSTSCRIPT = re.compile(r"^[ \t]*P\.[ \t]?S\.", re.IGNORECASE | re.MULTILINE)
_POSTSCRIPT_NOTES = ("Thank you for reading this far.", "I hope this was useful.", "There is always more to learn about this.",
                     "Feel free to ask a follow-up question.")


def _check_postscript(text, p):
    body = normalize_text(text).strip()
    found = list(_POSTSCRIPT.finditer(body))
    if not found:
        return False, 'no line starting with "P.S."'
    last = found[-1]
    if not _has_word(body[last.end():]) or not _has_word(body[:last.start()]):
        return False, "a P.S. needs text of its own and an answer before it"
    return True, "ends with a P.S."


def _rewrite_postscript(text, p):
    body = text.strip()
    note = _POSTSCRIPT_NOTES[zlib.crc32(body.encode("utf-8")) % len(_POSTSCRIPT_NOTES)]  # varied, yet deterministic
    return f"{body}\n\nP.S. {note}" if _has_word(body) else None


def _check_repeat(text, p):
    if p["request"] is None:
        raise BadInputError("repeat_request: the request to repeat is not bound; build the instruction with build_instruction()")
    folded, request = _fold(text), _fold(p["request"])
    if not folded.startswith(request):
        return False, "does not start with the request word for word"
    return _has_word(folded[len(request):]), "repeats the request, then answers"


def _rewrite_repeat(text, p):
    return f"{p['request'].strip()}\n\n{text.strip()}" if p["request"] is not None and _has_word(text) else None


# ---- the catalogue ---------------------------------------------------------------------------
def _positive(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _word_list(value) -> bool:
    return (isinstance(value, list) and 1 <= len(value) <= 3
            and all(isinstance(w, str) and _WORD.fullmatch(w) for w in value))


def _text(value) -> bool:
    return isinstance(value, str) and _has_word(value) and "\n" not in value


def _range_ok(p) -> str | None:
    return None if p["min_words"] < p["max_words"] else "min_words must be below max_words"


@dataclass(frozen=True, eq=False)
class Family:
    """One constraint family. `claims` name the parts of an answer the rule governs (two families
    claiming the same part cannot be combined); a "structure" family (counts sentences, paragraphs,
    items or sections) cannot be combined with one that `adds_text` (a title, a P.S., a phrase).
    `stage` orders rewrites when several apply: shortening, layout, words, additions, wrapping."""

    name: str
    kind: str
    params: dict[str, Callable[[object], bool]]
    check: Callable[[str, dict], tuple[bool, str]]
    sample: Callable[[random.Random], dict]
    wordings: dict[str, tuple[str, ...]]
    fields: Callable[[dict], dict] = dict
    measure: Callable[[random.Random, str], dict | None] | None = None
    rewrite: Callable[[str, dict], str | None] | None = None
    claims: frozenset[str] = frozenset()
    adds_text: bool = False
    stage: int = 50
    extra_check: Callable[[dict], str | None] = field(default=lambda p: None)


def _count_fields(key, singular, plural):
    return lambda p: {**p, **_counted(p[key], singular, plural)}


_FAMILY_LIST = [
    Family(
        "words_max", "length", {"max_words": _positive}, _check_words_max,
        lambda rng: {"max_words": rng.choice((20, 30, 40, 50, 60, 80, 100))},
        {"train": ("Answer in no more than {max_words} words.",
                   "Keep your answer to {max_words} words or fewer.",
                   "Use at most {max_words} words.",
                   "Your reply must not exceed {max_words} words.",
                   "Limit the answer to {max_words} words at the most.",
                   "Word limit: {max_words}.",
                   "Please stay within {max_words} words.",
                   "Make sure the response is {max_words} words or less.",
                   "I want a reply of {max_words} words or fewer.",
                   "Could you answer in {max_words} words at most?",
                   "({max_words}-word limit)",
                   "Cap the output at {max_words} words.",
                   "Be concise: the reply can run up to {max_words} words, never longer."),
         "test": ("Please keep it brief: {max_words} words maximum.",
                  "The whole text you write should be {max_words} words long or shorter.",
                  "Do not go beyond {max_words} words.")},
        measure=_measure_words_max, rewrite=lambda t, p: _trim_words(t, 1, p["max_words"]),
        claims=frozenset({"word_count"}), stage=10),
    Family(
        "words_min", "length", {"min_words": _positive}, _check_words_min,
        lambda rng: {"min_words": rng.choice((30, 40, 50, 60, 80, 100))},
        {"train": ("Write at least {min_words} words.",
                   "Your answer should be {min_words} words or longer.",
                   "Use no fewer than {min_words} words.",
                   "Make the reply at least {min_words} words long.",
                   "Minimum length: {min_words} words.",
                   "Please write no less than {min_words} words.",
                   "Make sure the response runs to at least {min_words} words.",
                   "I want a detailed reply of {min_words} words or longer.",
                   "Your response must reach a length of {min_words} words.",
                   "Could you stretch the answer to at least {min_words} words?",
                   "(at least {min_words} words)",
                   "Do not stop writing before the text has {min_words} words."),
         "test": ("Give a full answer of {min_words} words or more.",
                  "Aim for a minimum of {min_words} words.",
                  "It needs to contain {min_words} words at the very least.")},
        measure=_measure_words_min, claims=frozenset({"word_count"})),
    Family(
        "words_range", "length", {"min_words": _positive, "max_words": _positive}, _check_words_range,
        lambda rng: dict(zip(("min_words", "max_words"), rng.choice(_WORD_BANDS), strict=True)),
        {"train": (),
         "test": ("Write between {min_words} and {max_words} words.",
                  "Your answer should be no shorter than {min_words} words and no longer than {max_words} words.",
                  "Keep the length somewhere from {min_words} to {max_words} words.",
                  "Use a total of {min_words} to {max_words} words, both ends included.")},
        measure=_measure_words_range, rewrite=lambda t, p: _trim_words(t, p["min_words"], p["max_words"]),
        claims=frozenset({"word_count"}), stage=10, extra_check=_range_ok),
    Family(
        "sentences_exact", "length", {"num_sentences": _positive}, _check_sentences,
        lambda rng: {"num_sentences": rng.randint(1, 5)},
        {"train": ("Answer in exactly {n}.",
                   "Write exactly {w}, no more and no fewer.",
                   "Respond using exactly {n}.",
                   "Make your reply exactly {w} long.",
                   "Sentence count: exactly {count}.",
                   "Please use {w}, exactly that many.",
                   "Make sure your response is made of exactly {n}.",
                   "I want the reply to have exactly {w}.",
                   "Your response must contain {n}: not fewer, not more.",
                   "Could you keep the reply to exactly {w}?",
                   "(exactly {n})",
                   "Limit the output to {w}, and do not write fewer than that either."),
         "test": ("The answer should consist of precisely {n}.",
                  "Say it in exactly {w}.",
                  "I want {w} from you, not one more or less.")},
        fields=_count_fields("num_sentences", "sentence", "sentences"),
        measure=_measure_count("num_sentences", 1, 8, count_sentences), rewrite=_rewrite_sentences,
        claims=frozenset({"structure"}), stage=20),
    Family(
        "paragraphs", "length", {"num_paragraphs": _positive}, _check_paragraphs,
        lambda rng: {"num_paragraphs": rng.randint(2, 4)},
        {"train": ("Write exactly {n}, separated by blank lines.",
                   "Split your answer into {w} with an empty line between them.",
                   "Your answer must have exactly {n}; put a blank line between paragraphs.",
                   "Organise the reply as {w}, each separated from the next by one blank line.",
                   "Paragraph count: {count}, with a blank line between paragraphs.",
                   "Please write {w}, leaving a blank line between each pair of paragraphs.",
                   "Make sure the response is broken into exactly {n}, with empty lines separating them.",
                   "I want {count_word} paragraphs in the answer, each separated by an empty line.",
                   "Your response must be {count} paragraphs long; separate them with blank lines.",
                   "Could you lay the answer out as {w} with a blank line between them?",
                   "({n}, blank line between each)",
                   "Use exactly {count} blocks of text (paragraphs), each one set apart from the next by an empty line."),
         "test": ("Give exactly {n} and leave an empty line after each one except the last.",
                  "Structure the text as {w} divided by blank lines.",
                  "Use {n} in total, with blank lines in between.")},
        fields=_count_fields("num_paragraphs", "paragraph", "paragraphs"),
        measure=_measure_count("num_paragraphs", 2, 6, lambda t: len(paragraphs(t))), rewrite=_rewrite_paragraphs,
        claims=frozenset({"structure"}), stage=20),
    Family(
        "bullet_items", "length", {"num_bullets": _positive}, _check_bullets,
        lambda rng: {"num_bullets": rng.randint(2, 6)},
        {"train": ("Give your answer as exactly {n}.",
                   "Use exactly {w}, each on its own line starting with a dash.",
                   "Present the answer as a bulleted list of exactly {count} items.",
                   'Answer in exactly {n} (lines beginning with "- " or "* ").',
                   "Format: a bulleted list with exactly {count} entries.",
                   "Please answer with {w}, no more and no fewer.",
                   "Make sure the response consists of exactly {n}, each starting with a dash.",
                   "I want a bulleted reply: exactly {count_word} items.",
                   'Your response must list {count} points, each on a line that begins with a bullet such as "-".',
                   'Could you give {w} (one per line, each starting with "- ")?',
                   "(bulleted, {count} entries)",
                   "Break the answer into exactly {count_word} bullets; put each bullet on its own line."),
         "test": ("Put your answer in a list of {w}, exactly.",
                  "I need exactly {n} in the answer.",
                  "Reply with a bullet list that holds precisely {count_word} points.")},
        fields=_count_fields("num_bullets", "bullet point", "bullet points"),
        measure=_measure_count("num_bullets", 2, 10, lambda t: len(_bullets(t))),
        rewrite=_rewrite_bullets, claims=frozenset({"structure"}), stage=20),
    Family(
        "numbered_items", "length", {"num_items": _positive}, _check_numbered,
        lambda rng: {"num_items": rng.randint(3, 7)},
        {"train": ("Answer as a numbered list with exactly {count} items.",
                   "Give exactly {count_word} numbered points (1., 2., and so on).",
                   "Write a numbered list of exactly {w}.",
                   "Number your points from 1 to {count}, one per line.",
                   "Format: an enumerated list of {count} points, numbered 1 to {count}.",
                   "Please number your answer: exactly {count_word} entries, one per line.",
                   "Make sure the response is an enumerated list with exactly {n}.",
                   "I want exactly {count} numbered points, in order from 1.",
                   "Your response must be a numbered list containing {w}, counted from 1.",
                   "Could you list exactly {w}, numbering them 1., 2., 3. and so on?",
                   "({count} numbered items)",
                   "Lay out the answer as a list numbered 1 to {count}, one entry per line, with no extra items."),
         "test": ("Reply using a numbered list that has exactly {count} entries.",
                  "Make it a numbered list of {w}, no more, no fewer.",
                  "Structure the answer as {count} numbered lines, starting at 1.")},
        fields=_count_fields("num_items", "item", "items"),
        measure=_measure_count("num_items", 2, 10, _numbered_run),
        rewrite=_rewrite_numbered, claims=frozenset({"structure"}), stage=20),
    Family(
        "sections", "format", {"num_sections": _positive, "separator": lambda v: v in _SEPARATORS}, _check_sections,
        lambda rng: {"num_sections": rng.randint(2, 4), "separator": rng.choice(_SEPARATORS)},
        {"train": (),
         "test": ("Divide your answer into {count} sections, separated by a line containing only {separator}",
                  'Write {count_word} sections and put a line with just "{separator}" between each pair of sections.',
                  'Split the reply into exactly {count} parts, using "{separator}" on its own line as the divider.',
                  "Your answer needs {count_word} sections; mark each break between them with a line that says {separator}")},
        fields=_count_fields("num_sections", "section", "sections"),
        measure=_measure_sections, rewrite=_rewrite_sections, claims=frozenset({"structure"}), stage=20),
    Family(
        "lowercase", "case", {}, _check_lowercase, lambda rng: {},
        {"train": ("Write your whole answer in lowercase letters only.",
                   "Do not use any capital letters.",
                   "Use only lowercase letters in your reply, with no capitals at all.",
                   "Your entire answer should be in lowercase.",
                   "(all lowercase)",
                   "Please use small letters only, even at the start of a sentence.",
                   "Make sure there are no upper-case letters anywhere in the response.",
                   "I want the whole reply in lower case.",
                   "Your response must be written without a single capital letter.",
                   "Could you write everything in lowercase, including names and the first word of each sentence?",
                   "Lowercase only.",
                   "No capitalisation at all: every word in the output, even proper nouns, stays in lowercase."),
         "test": ("Keep every letter in lowercase; no capitals anywhere.",
                  "Capital letters are not allowed in what you write.",
                  "Type the answer entirely in small letters.")},
        rewrite=lambda t, p: t.lower() if any(map(_cased, t)) else None, claims=frozenset({"case"}), stage=70),
    Family(
        "uppercase", "case", {}, _check_uppercase, lambda rng: {},
        {"train": ("Write your entire answer in capital letters.",
                   "Use only uppercase letters.",
                   "Your whole reply must be written in all caps.",
                   "Answer in uppercase, with no lowercase letters at all.",
                   "(ALL CAPS)",
                   "Please write every word in upper-case letters.",
                   "Make sure the response contains no small letters at all.",
                   "I want the entire reply in capitals.",
                   "Your response must be in uppercase from the first letter to the last.",
                   "Could you type the whole answer with caps lock on?",
                   "Uppercase only.",
                   "Shout the answer: put every single letter of the output in its capital form, with no exceptions."),
         "test": ("Every letter you write should be a capital letter.",
                  "Respond in block capitals only.",
                  "Do not use any lowercase letters in the reply.")},
        rewrite=lambda t, p: t.upper() if any(map(_cased, t)) else None, claims=frozenset({"case"}), stage=70),
    Family(
        "capital_words", "case", {"relation": lambda v: v in ("at_least", "at_most"), "count": _positive},
        _check_capital_words,
        lambda rng: ({"relation": "at_least", "count": rng.randint(2, 5)} if rng.random() < 0.7
                     else {"relation": "at_most", "count": rng.randint(1, 3)}),
        {"train": (),
         "test": ("Write {relation_text} {n} entirely in capital letters.",
                  "Use fully capitalised words, like THIS, {relation_text} {count} times.",
                  "{relation_cap} {count_word} of your words should be written in all caps.",
                  "The number of words spelled completely in uppercase must be {relation_text} {count}.")},
        fields=lambda p: {**p, **_counted(p["count"], "word", "words"), "relation_text": p["relation"].replace("_", " "),
                          "relation_cap": p["relation"].replace("_", " ").capitalize()},
        measure=_measure_capital_words, rewrite=_rewrite_capital_words, claims=frozenset({"case"}), stage=30),
    Family(
        "no_commas", "punctuation", {}, _check_no_commas, lambda rng: {},
        {"train": ("Do not use any commas in your answer.",
                   "Avoid commas entirely.",
                   "Your reply must not contain a single comma.",
                   "Write without using commas.",
                   "(no commas)",
                   "Please keep commas out of your reply.",
                   "Make sure your response contains zero commas.",
                   "I want every sentence of the reply written without commas.",
                   "Your response must be free of commas; use full stops or other punctuation instead.",
                   "Could you answer without a single comma?",
                   "Comma-free text, please.",
                   "Do not put any commas in the output, not even in lists or between clauses."),
         "test": ("Leave out all commas.",
                  "Commas are not allowed anywhere in the text you write.",
                  "Make sure the answer has no commas in it.")},
        rewrite=_rewrite_no_commas, claims=frozenset({"commas"}), stage=30),
    Family(
        "end_mark", "punctuation", {"mark": lambda v: v in _MARK_NAMES}, _check_end_mark,
        lambda rng: {"mark": rng.choice(tuple(_MARK_NAMES))},
        {"train": ("End your answer with {mark_name}.",
                   "The very last character of your reply must be {mark_name}.",
                   "Finish the text with {mark_name} ({mark}).",
                   "Make sure your answer ends in {mark_name}.",
                   "Final character: {mark_name}.",
                   "Please finish on {mark_name}.",
                   "Make sure the response stops with {mark_name} and nothing after it.",
                   "I want the reply to end in {mark_name} ({mark}).",
                   "Your response must conclude with {mark_name} as its very last symbol.",
                   "Could you make the last character of the output {mark_name}?",
                   '(ending with "{mark}")',
                   "Whatever you write, the text has to end on {mark_name}, with no quotes, brackets or other characters after it."),
         "test": ("Close your answer with {mark_name}.",
                  'Your final character should be "{mark}".',
                  "Let the last thing you write be {mark_name}.")},
        fields=lambda p: {**p, "mark_name": _MARK_NAMES[p["mark"]]},
        measure=_measure_end_mark, rewrite=_rewrite_end_mark, claims=frozenset({"end"}), stage=50),
    Family(
        "keyword_include", "words", {"keywords": _word_list}, _check_include,
        lambda rng: {"keywords": rng.sample(_INCLUDE_POOL, rng.choice((1, 1, 2)))},
        {"train": ("Include the {word_noun} {keywords_text} in your answer.",
                   "Make sure to use the {word_noun} {keywords_text}.",
                   "Your reply must contain the {word_noun} {keywords_text}.",
                   "Mention the {word_noun} {keywords_text} somewhere in the answer.",
                   "Required {word_noun}: {keywords_text}.",
                   "Please use the following {word_noun} at least once: {keywords_text}.",
                   "Make sure your response contains {keywords_text}.",
                   "I want to see {keywords_text} somewhere in the reply.",
                   "Your response must mention {keywords_text}.",
                   "Could you include {keywords_text} in your text?",
                   "(must include {keywords_text})",
                   "Whatever else you write, the output has to contain {keywords_text}, spelled exactly as given (capitals do not matter)."),
         "test": ("Work the {word_noun} {keywords_text} into what you write.",
                  "Be sure your answer uses the {word_noun} {keywords_text}.",
                  "Somewhere in your reply, use the {word_noun} {keywords_text}.")},
        fields=lambda p: {**p, "keywords_text": _quoted_list(p["keywords"]),
                          "word_noun": "word" if len(p["keywords"]) == 1 else "words"},
        measure=_measure_include, claims=frozenset({"keywords"})),
    Family(
        "keyword_forbid", "words", {"forbidden": _word_list}, _check_forbid,
        lambda rng: {"forbidden": rng.sample(_FORBID_POOL, rng.choice((1, 2)))},
        {"train": ("Do not use the {word_noun} {forbidden_text}.",
                   "Avoid the {word_noun} {forbidden_text} in your answer.",
                   "Your reply must not contain the {word_noun} {forbidden_text}.",
                   "Never write the {word_noun} {forbidden_text}.",
                   "Banned {word_noun}: {forbidden_text}.",
                   "Please leave out {forbidden_text} entirely.",
                   "Make sure none of the following appears in the response: {forbidden_text}.",
                   "I want a reply free of the following {word_noun}: {forbidden_text}.",
                   "Your response must not include {forbidden_text} anywhere.",
                   "Could you do without {forbidden_text} in this answer?",
                   "(forbidden {word_noun}: {forbidden_text})",
                   "Find other ways to say it: the output may not use {forbidden_text}, not even as part of a hyphenated word."),
         "test": ("Stay away from the {word_noun} {forbidden_text}.",
                  "The {word_noun} {forbidden_text} must not appear anywhere in your text.",
                  "Answer without using the {word_noun} {forbidden_text}.")},
        fields=lambda p: {**p, "forbidden_text": _quoted_list(p["forbidden"]),
                          "word_noun": "word" if len(p["forbidden"]) == 1 else "words"},
        measure=_measure_forbid, claims=frozenset({"keywords"})),
    Family(
        "keyword_frequency", "words", {"keyword": lambda v: isinstance(v, str) and _WORD.fullmatch(v) is not None,
                                       "count": _positive}, _check_frequency,
        lambda rng: {"keyword": rng.choice(_FREQUENCY_POOL), "count": rng.randint(2, 4)},
        {"train": (),
         "test": ('Use the word "{keyword}" at least {count} times.',
                  'The word "{keyword}" should appear {count_word} times or more.',
                  'Repeat the word "{keyword}" no fewer than {count} times in your answer.',
                  'Make sure "{keyword}" occurs at least {count_word} times.')},
        fields=lambda p: {**p, **_counted(p["count"], "time", "times")},
        measure=_measure_frequency, claims=frozenset({"keywords"})),
    Family(
        "first_word", "start_end", {"word": lambda v: isinstance(v, str) and _WORD.fullmatch(v) is not None},
        _check_first_word, lambda rng: {"word": rng.choice(_FIRST_WORDS)},
        {"train": ('Start your answer with the word "{word}".',
                   'The first word of your reply must be "{word}".',
                   'Begin with the word "{word}".',
                   'Open your text with the word "{word}".',
                   'First word: "{word}".',
                   'Please use "{word}" as the opening word of your reply.',
                   'Make sure the response starts with "{word}" as its first word.',
                   'I want the reply to open on the word "{word}".',
                   'Your response must have "{word}" as its very first word.',
                   'Could you start your text with "{word}"?',
                   '(open with "{word}")',
                   'Nothing may come before "{word}": it has to be the first word of the answer.'),
         "test": ('Let "{word}" be the first word you write.',
                  'Your answer has to begin with the word "{word}".',
                  'Kick off the reply with the single word "{word}".')},
        measure=_measure_first_word, claims=frozenset({"start"})),
    Family(
        "start_phrase", "start_end", {"phrase": _text}, _check_start_phrase,
        lambda rng: {"phrase": rng.choice(_START_PHRASES)},
        {"train": ('Begin your answer with the exact phrase "{phrase}"',
                   'Start the reply with these words: "{phrase}"',
                   'The text you write must open with "{phrase}"',
                   'Your first words should be "{phrase}"',
                   'Opening words: "{phrase}"',
                   'Please start your response with "{phrase}"',
                   'Make sure the reply begins with "{phrase}"',
                   'I want the first words of the text to be "{phrase}"',
                   'Your response must start with the words "{phrase}"',
                   'Could you start with "{phrase}", then go on with the answer?',
                   '(start with "{phrase}")',
                   'Write the words "{phrase}" exactly as shown, and let the rest of the answer follow them.'),
         "test": ('Lead with the phrase "{phrase}" and then answer.',
                  'Put "{phrase}" at the very beginning of your reply.',
                  'Open with exactly "{phrase}" before anything else.')},
        measure=_measure_start_phrase, rewrite=_rewrite_start_phrase, claims=frozenset({"start"}), adds_text=True,
        stage=40),
    Family(
        "end_phrase", "start_end", {"phrase": _text}, _check_end_phrase,
        lambda rng: {"phrase": rng.choice(_END_PHRASES)},
        {"train": ('End your answer with the exact phrase "{phrase}"',
                   'Finish your reply with "{phrase}" and write nothing after it.',
                   'The last words of your text must be "{phrase}"',
                   'Close with the sentence "{phrase}"',
                   'Closing words: "{phrase}"',
                   'Please have the response end on the sentence "{phrase}"',
                   'Make sure the reply stops right after the words "{phrase}"',
                   'I want the text to finish on "{phrase}"',
                   'Your response must end in "{phrase}"',
                   'Could you sign off by writing "{phrase}" as the last thing?',
                   '(last words: "{phrase}")',
                   'Once the answer is complete, add "{phrase}" as its final sentence and stop there.'),
         "test": ('Wrap up with "{phrase}", with nothing following it.',
                  'Make "{phrase}" the final words of the answer.',
                  'Your reply should conclude with "{phrase}"')},
        measure=_measure_end_phrase, rewrite=_rewrite_end_phrase, claims=frozenset({"end"}), adds_text=True, stage=40),
    Family(
        "json_object", "format", {}, _check_json, lambda rng: {},
        {"train": ("Format your entire answer as a JSON object.",
                   "Reply with valid JSON only: a single object.",
                   "Wrap the whole reply in a JSON object.",
                   "Your output must be one JSON object and nothing else.",
                   "Output format: JSON object.",
                   "Please respond with nothing but a JSON object.",
                   "Make sure the response parses as a JSON object.",
                   "I want the whole reply to be machine-readable JSON: one object with at least one key.",
                   "Your response must be a valid JSON object with your answer stored under a key.",
                   "Could you put the answer into JSON form, as one object?",
                   "(JSON object only)",
                   'Encode the output as a JSON object, e.g. {{"answer": "..."}}, with no text before or after it.'),
         "test": ("Give the answer as a JSON object (a ```json code block is fine).",
                  "Return only a JSON object holding your answer.",
                  "Express your reply as a single valid JSON object.")},
        rewrite=_rewrite_json, claims=frozenset({"start", "end", "structure", "case"}), stage=60),
    Family(
        "quoted", "format", {}, _check_quoted, lambda rng: {},
        {"train": ("Put your whole answer inside double quotation marks.",
                   "Wrap the entire reply in double quotes.",
                   'Begin and end your text with a double quote character (").',
                   "Enclose everything you write in double quotation marks.",
                   "Wrapping: double quotes around the entire reply.",
                   "Please enclose the entire response in double quotes.",
                   "Make sure the output opens and closes with a double quotation mark.",
                   'I want the reply wrapped in quotation marks (") from start to finish.',
                   'Your response must be one quoted passage: a " at the very start and another at the very end.',
                   "Could you quote your whole answer, with a double quote mark at each end?",
                   "(in double quotes)",
                   'Treat the answer as a quotation: the first character of the output is " and so is the last one.'),
         "test": ("Surround your full answer with double quotes.",
                  'Your reply should start with " and end with ".',
                  "Place the complete answer between a pair of double quotation marks.")},
        rewrite=_rewrite_quoted, claims=frozenset({"start", "end"}), stage=60),
    Family(
        "title", "format", {}, _check_title, lambda rng: {},
        {"train": ("Give your answer a title wrapped in double angle brackets, like <<My Title>>, on the first line.",
                   "Start with a title line in the form <<title>>.",
                   "Put a title on the first line, enclosed in << and >>.",
                   "The first line must be a title inside double angular brackets, for example <<A Title>>.",
                   "Title first, formatted as <<Your Title>>; the answer goes below it.",
                   "Please put a title between << and >> at the top of your response.",
                   "Make sure the first line of the reply is a title wrapped in <<double angle brackets>>.",
                   "I want a headline on line one, written like <<A Headline>>, before the text.",
                   "Your response must begin with a title line such as <<Rivers of Europe>>.",
                   "Could you give the answer a <<title>> on its first line?",
                   "(title in << >> on the first line)",
                   "Name your answer: write a short title enclosed in double angular brackets, for example <<Morning Light>>, on the opening line, "
                   "and then start the text on the next line."),
         "test": ("Add a title in double angle brackets (<<like this>>) as the opening line.",
                  "Open with a title written as <<Title>>, then the answer.",
                  "Head your answer with a title surrounded by << >> on a line of its own.")},
        rewrite=_rewrite_title, claims=frozenset({"start"}), adds_text=True, stage=40),
    Family(
        "postscript", "format", {}, _check_postscript, lambda rng: {},
        {"train": ('At the end, add a postscript that starts with "P.S."',
                   'Finish with a postscript beginning "P.S."',
                   "Add a P.S. after the main answer.",
                   'Include a short postscript, starting with "P.S.", at the end of your reply.',
                   'Postscript required: end with a line starting "P.S."',
                   "Please add a P.S. below the main text.",
                   "Make sure the last part of the response is a P.S. note.",
                   "I want a postscript (P.S.) after the body of the reply.",
                   'Your response must close with a short postscript, written on its own line and starting with "P.S."',
                   "Could you tack a P.S. onto the end of your answer?",
                   "(end with a P.S.)",
                   "Once the main answer is done, leave a blank line and add a P.S. line with one more thought."),
         "test": ('Close with an extra note that begins with "P.S."',
                  'After your answer, write a postscript introduced by "P.S."',
                  'Remember to end with a postscript marked "P.S."')},
        rewrite=_rewrite_postscript, claims=frozenset({"end"}), adds_text=True, stage=40),
    Family(
        # The repeated request may hold commas or any word, so rules on those cannot be combined with it.
        "repeat_request", "repetition", {"request": lambda v: v is None or _has_word(v)}, _check_repeat,
        lambda rng: {"request": None},
        {"train": ("First repeat the request above word for word, leaving out this sentence, then give your answer.",
                   "Before answering, copy the request exactly as written (without this sentence).",
                   "Restate the request verbatim, not including this sentence, and then respond.",
                   "Begin your reply with the request repeated exactly, minus this sentence, then answer it.",
                   "Request first (minus this sentence), answer second.",
                   "Please copy out the request verbatim, leaving this sentence out, and then reply to it.",
                   "Make sure the response begins by restating everything asked above, word for word, except this sentence.",
                   "I want you to write out the request exactly (skip this sentence) before you answer it.",
                   "Your response must contain the request verbatim at the top, apart from this sentence, with the answer below it.",
                   "Could you first quote the request exactly as it stands (leave this sentence out) and then answer?",
                   "(repeat the request above, not this line, then answer)",
                   "Restate what was asked, copying every word of the request above except this sentence, and answer after that."),
         "test": ("Start by repeating the request above exactly, without this sentence, and only then answer.",
                  "Echo the request word for word (excluding this sentence) before giving your reply.",
                  "Your reply must open with an exact copy of the request, this sentence left out, followed by the answer.")},
        fields=lambda p: {}, rewrite=_rewrite_repeat, claims=frozenset({"start", "commas", "keywords"}), adds_text=True,
        stage=45),
]
FAMILIES: dict[str, Family] = {family.name: family for family in _FAMILY_LIST}
TRAINED_FAMILIES = tuple(name for name in FAMILIES if name not in HELD_OUT_FAMILIES)


# ---- constraints -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Constraint:
    """One worded rule: its family, parameters, the wording used and the text shown to the model."""

    family: str
    params: dict
    wording_id: str
    text: str


class CheckResult(NamedTuple):
    family: str
    passed: bool
    reason: str


def get_family(name: str, families: dict[str, Family] | None = None) -> Family:
    """The family called `name`; an unknown name is bad input listing the known ones."""
    families = FAMILIES if families is None else families
    if name not in families:
        raise BadInputError(f"unknown constraint family {name!r}; known families: {', '.join(families)}")
    return families[name]


def family_split(name: str) -> str:
    """"held_out" for a family kept out of training, else "trained"."""
    get_family(name)
    return "held_out" if name in HELD_OUT_FAMILIES else "trained"


def resolve_families(names, split: str = "train") -> tuple[str, ...]:
    """Check a user's list of family names (e.g. from a flag): each must exist, and a held-out family
    cannot be asked for with split="train". Raises BadInputError naming the offending family."""
    _check_split(split)
    resolved = []
    for name in names:
        get_family(name)
        if split == "train" and name in HELD_OUT_FAMILIES:
            raise BadInputError(f"constraint family {name!r} is held out of training (held out: "
                                f"{', '.join(HELD_OUT_FAMILIES)}); it may only be used by the test set")
        resolved.append(name)
    return tuple(dict.fromkeys(resolved))


def _check_split(split: str) -> None:
    if split not in WORDING_SPLITS:
        raise BadInputError(f"wording split must be one of {', '.join(WORDING_SPLITS)}, got {split!r}")


def compatible(*names: str) -> bool:
    """Whether these families can be asked for together without contradiction or ambiguity."""
    families = [get_family(n) for n in names]
    for i, a in enumerate(families):
        for b in families[i + 1:]:
            if a.name == b.name or a.claims & b.claims:
                return False
            if ("structure" in a.claims and b.adds_text) or ("structure" in b.claims and a.adds_text):
                return False
    return True


def _validate_params(family: Family, params) -> None:
    if not isinstance(params, dict) or set(params) != set(family.params):
        raise BadInputError(f"constraint {family.name}: params must have exactly the keys {sorted(family.params)}, "
                            f"got {params!r}")
    bad = [key for key, ok in family.params.items() if not ok(params[key])]
    problem = f"bad value for {', '.join(bad)}" if bad else family.extra_check(params)
    if problem:
        raise BadInputError(f"constraint {family.name}: {problem} in {params!r}")


def _make(family: Family, params: dict, split: str, index: int) -> Constraint:
    _validate_params(family, params)
    text = family.wordings[split][index].format(**family.fields(params))
    return Constraint(family.name, params, f"{family.name}.{split}{index + 1}", text)


def sample_constraint(family: str, rng: random.Random, response: str | None = None, split: str = "train",
                      request: str | None = None) -> Constraint | None:
    """A constraint of `family`, worded with one of its `split` ("train" or "test") wordings.

    Without `response`: fresh parameters (the test set, or a target for `rewrite`). With `response`:
    parameters that response already satisfies (its word-count band, its item count, a keyword it
    contains, its first word), or None when it satisfies none. `request` is the text a
    repeat_request constraint repeats; `build_instruction` binds it when it is not known yet.
    The draws (parameters, then wording) come from `rng` only, so a seed fixes the result.
    """
    fam = get_family(family)
    _check_split(split)
    if not fam.wordings[split]:
        raise BadInputError(f"constraint family {family!r} has no {split} wordings: it is held out of training "
                            f"(held out: {', '.join(HELD_OUT_FAMILIES)})")
    if response is None:
        params = fam.sample(rng)
    else:
        response = normalize_text(response)
        params = fam.measure(rng, response) if fam.measure else fam.sample(rng)
    if params is not None and "request" in fam.params:
        params = {**params, "request": request}
    if response is not None and (params is None or not fam.check(response, params)[0]):
        return None
    return _make(fam, params, split, rng.randrange(len(fam.wordings[split])))


def build_instruction(task: str, constraints: list[Constraint]) -> tuple[str, list[Constraint]]:
    """The task followed by the constraint texts, and the constraints with any repeat_request bound
    to the text before it (the task and the other constraints; the repeat wording itself comes last)."""
    ordered = [c for c in constraints if c.family != "repeat_request"] + [c for c in constraints if c.family == "repeat_request"]
    if len(ordered) - len({c.family for c in ordered}) > 0:
        raise BadInputError(f"one constraint per family, got {[c.family for c in constraints]}")
    request = " ".join([task.strip()] + [c.text for c in ordered if c.family != "repeat_request"])
    bound = [Constraint(c.family, {**c.params, "request": request}, c.wording_id, c.text) if c.family == "repeat_request"
             else c for c in ordered]
    return " ".join([request] + [c.text for c in bound if c.family == "repeat_request"]), bound


def _as_constraint(spec) -> Constraint:
    return spec if isinstance(spec, Constraint) else from_record(spec)


def check(spec, response) -> CheckResult:
    """Check one constraint (a Constraint or its record dict) against a response."""
    constraint = _as_constraint(spec)
    family = get_family(constraint.family)
    _validate_params(family, constraint.params)
    if not isinstance(response, str) or not response.strip():
        return CheckResult(constraint.family, False, "empty response")
    passed, reason = family.check(normalize_text(response), constraint.params)
    return CheckResult(constraint.family, bool(passed), reason)


def check_all(specs, response) -> list[CheckResult]:
    return [check(spec, response) for spec in specs]


def rewrite(spec, response: str) -> str | None:
    """The response changed, deterministically, to satisfy the constraint while keeping its content;
    unchanged (line breaks normalised) when it already does; None when the family has no rewrite or
    the response has too little material. A rewrite that fails its own checker is a bug and raises."""
    constraint = _as_constraint(spec)
    family = get_family(constraint.family)
    _validate_params(family, constraint.params)
    text = normalize_text(response)
    if family.check(text, constraint.params)[0]:
        return text
    if family.rewrite is None:
        return None
    result = family.rewrite(text, constraint.params)
    if result is not None and not family.check(normalize_text(result), constraint.params)[0]:
        raise RuntimeError(f"constraint family {family.name}: rewrite fails its own checker for {constraint.params!r}: "
                           f"{family.check(result, constraint.params)[1]}")
    return result


def rewrite_all(specs, response: str) -> str | None:
    """Apply each constraint's rewrite in stage order (shorten, lay out, words, additions, wrapping,
    case); None unless the result passes every constraint (some combinations undo each other)."""
    constraints = sorted(map(_as_constraint, specs), key=lambda c: get_family(c.family).stage)
    text = response
    for constraint in constraints:
        text = rewrite(constraint, text)
        if text is None:
            return None
    return text if all(result.passed for result in check_all(constraints, text)) else None


def to_record(constraint: Constraint) -> dict:
    """{family, params, wording_id, text}: the JSONL form."""
    return {"family": constraint.family, "params": dict(constraint.params), "wording_id": constraint.wording_id,
            "text": constraint.text}


def from_record(record) -> Constraint:
    """A Constraint from its JSONL form; an unknown family, wording id or bad params is bad input."""
    if not isinstance(record, dict) or not {"family", "params", "wording_id", "text"} <= set(record):
        raise BadInputError(f"a constraint record needs family, params, wording_id and text, got {record!r}")
    family = get_family(record["family"])
    match = re.fullmatch(rf"{re.escape(family.name)}\.(train|test)(\d+)", str(record["wording_id"]))
    if not match or not 1 <= int(match.group(2)) <= len(family.wordings[match.group(1)]):
        raise BadInputError(f"constraint {family.name}: unknown wording id {record['wording_id']!r}")
    _validate_params(family, record["params"])
    return Constraint(family.name, dict(record["params"]), record["wording_id"], str(record["text"]))


# ---- self-check ------------------------------------------------------------------------------
_PROBES = (
    "The river runs past the old mill. Children play on its banks, and the water sparkles in the sun!",
    "Here are some ideas:\n1. Plant a tree\n2) Walk to work\n- Reuse bags\n* Fix leaks\n\u2022 Turn off lights",
    "First paragraph about caf\u00e9 culture in Paris.\r\n\r\nSecond paragraph: the na\u00efve tourist orders 3.5 coffees, "
    "e.g. espresso.   \r\n",
    "Why is the sky blue? Sunlight scatters... Blue light scatters most, so we see blue. NASA explains it well.",
    "\u65e5\u672c\u8a9e \u306e \u6587 and \u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac words, \u0939\u093f\u0928\u094d"
    "\u0926\u0940 \u092d\u093e\u0937\u093e too. Stra\u00dfe!",
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen "
    "eighteen nineteen twenty twenty-one twenty-two",
)
_validated: set[tuple] = set()


def _family_problem(family: Family, held_out: bool) -> str | None:
    train, test = family.wordings.get("train", ()), family.wordings.get("test", ())
    if held_out and train:
        return "is held out but has training wordings"
    if not held_out and len(train) < MIN_TRAINING_WORDINGS:
        return f"has {len(train)} training wordings (at least {MIN_TRAINING_WORDINGS} needed)"
    if len(test) < (4 if held_out else 3):
        return f"has {len(test)} test wordings (at least {4 if held_out else 3} needed)"
    if {_fold(w) for w in train} & {_fold(w) for w in test}:
        return "shares a wording between training and test"
    rng = random.Random(f"validate:{family.name}")
    for split in ("train", "test"):
        for index in range(len(family.wordings[split])):
            try:
                _make(family, family.sample(rng) | ({"request": "Describe a river."} if "request" in family.params else {}),
                      split, index)
            except (KeyError, IndexError, ValueError) as err:
                return f"wording {family.name}.{split}{index + 1} does not render: {err!r}"
    for number, probe in enumerate(_PROBES, 1):
        text = normalize_text(probe)
        for _ in range(3):
            params = family.sample(rng)
            if "request" in params:
                params["request"] = "Describe a river."
            if family.rewrite is not None:
                result = family.rewrite(text, params)
                if result is not None and not family.check(normalize_text(result), params)[0]:
                    return f"rewrite fails its own checker on probe {number} with {params!r}"
            measured = family.measure(rng, text) if family.measure else None
            if measured is not None and not family.check(text, measured)[0]:
                return f"measured parameters {measured!r} fail its own checker on probe {number}"
    return None


def validate_catalogue(families: dict[str, Family] | None = None, held_out: tuple[str, ...] | None = None) -> None:
    """Refuse (BadInputError naming the family) a catalogue with a family whose wordings are missing
    (a trained family needs MIN_TRAINING_WORDINGS), shared between training and test or do not render,
    whose rewrite fails its own checker, or whose measured parameters fail it, on a fixed probe set.
    Cached for the default catalogue."""
    default = families is None
    families = FAMILIES if default else families
    held_out = HELD_OUT_FAMILIES if held_out is None else held_out
    key = (tuple(id(f) for f in families.values()), held_out)
    if default and key in _validated:
        return
    unknown = [name for name in held_out if name not in families]
    if unknown:
        raise BadInputError(f"constraint catalogue {CATALOGUE_VERSION}: held-out family {unknown[0]!r} is not in the catalogue")
    for name, family in families.items():
        problem = _family_problem(family, name in held_out)
        if problem:
            raise BadInputError(f"constraint catalogue {CATALOGUE_VERSION}: family {name!r} {problem}")
    if default:
        _validated.add(key)
