"""Does a critic signal tell good pairs from bad ones? A probe set from the pilot's own data, scored by ROC AUC.

A signal that cannot separate a pair from the same instruction answered with another pair's
response, with its answer cut in half, or with a looping answer, must not accept or rank
anything. The probe is built from accepted pairs only (no outside data), seeded, and every item
keeps the id of the pair it came from, so the manifest can say which pairs made the probe.

ROC AUC here is P(score(matched) > score(corrupted)) with ties counted half: the Mann-Whitney U
statistic of matched against corrupted scores divided by n_matched * n_corrupted (scipy).
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass

__all__ = ["PROBE_KINDS", "ProbeItem", "build_probe_set", "roc_auc", "summarize_signal", "summarize_signals",
           "DEFAULT_MIN_AUC"]

PROBE_KINDS = ("mismatched", "truncated", "looping")
DEFAULT_MIN_AUC = 0.75
_MIN_WORDS_TO_TRUNCATE = 4
_LOOP_REPEATS = 4
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class ProbeItem:
    id: str
    kind: str  # "matched" or one of PROBE_KINDS
    source_id: str
    instruction: str
    response: str

    def as_dict(self) -> dict:
        return asdict(self)


def _truncated(response: str) -> str | None:
    words = response.split()
    if len(words) < _MIN_WORDS_TO_TRUNCATE:
        return None
    return " ".join(words[: len(words) // 2])


def _looping(response: str) -> str:
    """The answer's first sentence (or first eight words) said again and again, as runaway text does."""
    first = _SENTENCE_END.split(response.strip(), maxsplit=1)[0]
    words = first.split()
    unit = " ".join(words[:8]) if len(words) > 8 else first
    return " ".join([unit] * _LOOP_REPEATS)


def build_probe_set(pairs: list[dict], seed: int, max_pairs: int | None = None) -> list[ProbeItem]:
    """Matched items and their three corruptions from `pairs` (dicts with id, instruction, response).

    Mismatched responses come from a seeded derangement (each pair takes the response of the next
    pair in a shuffled cycle), so no item is paired with its own answer; pairs whose responses are
    identical are skipped for that corruption since the "wrong" answer would be the right one.
    """
    usable = [p for p in sorted(pairs, key=lambda p: p["id"]) if p.get("response", "").strip()]
    rng = random.Random(f"probe:{seed}")
    rng.shuffle(usable)
    if max_pairs is not None:
        usable = usable[:max_pairs]
    items: list[ProbeItem] = []
    for index, pair in enumerate(usable):
        key, instruction, response = pair["id"], pair["instruction"], pair["response"]
        items.append(ProbeItem(f"{key}:matched", "matched", key, instruction, response))
        if len(usable) > 1:
            other = usable[(index + 1) % len(usable)]["response"]
            if other.strip() != response.strip():
                items.append(ProbeItem(f"{key}:mismatched", "mismatched", key, instruction, other))
        cut = _truncated(response)
        if cut is not None:
            items.append(ProbeItem(f"{key}:truncated", "truncated", key, instruction, cut))
        items.append(ProbeItem(f"{key}:looping", "looping", key, instruction, _looping(response)))
    return items


def roc_auc(positive: list[float], negative: list[float]) -> float | None:
    """P(a positive scores above a negative), ties half; None when either side is empty."""
    if not positive or not negative:
        return None
    from scipy.stats import mannwhitneyu

    statistic = mannwhitneyu(positive, negative, alternative="two-sided").statistic
    return float(statistic) / (len(positive) * len(negative))


def summarize_signal(items: list[ProbeItem], scores: list[float], min_auc: float = DEFAULT_MIN_AUC) -> dict:
    """AUC of matched against all corruptions together and against each kind; `discriminates` gates on the pooled one."""
    if len(items) != len(scores):
        raise ValueError(f"{len(items)} probe items but {len(scores)} scores")
    by_kind: dict[str, list[float]] = {}
    for item, score in zip(items, scores, strict=True):
        by_kind.setdefault(item.kind, []).append(float(score))
    matched = by_kind.get("matched", [])
    corrupted = [s for kind in PROBE_KINDS for s in by_kind.get(kind, [])]
    auc = roc_auc(matched, corrupted)
    return {
        "auc": None if auc is None else round(auc, 4),
        "auc_by_kind": {kind: (None if (a := roc_auc(matched, by_kind.get(kind, []))) is None else round(a, 4))
                        for kind in PROBE_KINDS},
        "n_matched": len(matched),
        "n_corrupted": len(corrupted),
        "min_auc": min_auc,
        "discriminates": auc is not None and auc >= min_auc,
    }


def summarize_signals(items: list[ProbeItem], scores_by_signal: dict[str, list[float]],
                      min_auc: float = DEFAULT_MIN_AUC) -> dict:
    signals = {name: summarize_signal(items, scores, min_auc) for name, scores in scores_by_signal.items()}
    return {"signals": signals, "discriminating": sorted(n for n, s in signals.items() if s["discriminates"]),
            "items": len(items), "kinds": {k: sum(i.kind == k for i in items) for k in ("matched", *PROBE_KINDS)}}
