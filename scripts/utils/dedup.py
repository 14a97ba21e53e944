"""Exact and near-duplicate detection for instructions, shared by the pilot and the scale merge.

Near duplicates: Jaccard similarity of word unigram+bigram sets >= threshold (0.7 by default,
Self-Instruct's ROUGE-L cut-off). MinHash LSH (datasketch) finds candidates in sub-linear time so
15k+ instructions are not compared pairwise; every candidate is then confirmed with the exact
Jaccard, so the decision does not depend on hashing luck.
"""

from __future__ import annotations

import re

__all__ = ["normalize_instruction", "shingles", "jaccard", "word_ngrams", "NearDuplicateIndex", "OverlapIndex",
           "OVERLAP_JACCARD", "OVERLAP_NGRAM"]

OVERLAP_JACCARD = 0.7
OVERLAP_NGRAM = 8

_WORD = re.compile(r"[a-z0-9]+")


def normalize_instruction(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


def shingles(text: str) -> set[str]:
    words = _WORD.findall(text.lower())
    return set(words) | {f"{a} {b}" for a, b in zip(words, words[1:], strict=False)}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class NearDuplicateIndex:
    def __init__(self, threshold: float = 0.7, num_perm: int = 128, seed: int = 1):
        from datasketch import MinHashLSH

        self.threshold = threshold
        self.num_perm = num_perm
        self.seed = seed
        # The LSH band threshold sits below the real one so that true matches are not missed.
        self._lsh = MinHashLSH(threshold=max(0.3, threshold - 0.2), num_perm=num_perm)
        self._shingles: dict[str, set[str]] = {}
        self._exact: dict[str, str] = {}

    def _minhash(self, items: set[str]):
        from datasketch import MinHash

        mh = MinHash(num_perm=self.num_perm, seed=self.seed)
        for item in sorted(items):
            mh.update(item.encode("utf-8"))
        return mh

    def find(self, text: str) -> tuple[str, str | None]:
        """("exact", key) or ("near", key) for the first match already indexed, else ("new", None)."""
        norm = normalize_instruction(text)
        if norm in self._exact:
            return "exact", self._exact[norm]
        items = shingles(text)
        for key in sorted(self._lsh.query(self._minhash(items))):
            if jaccard(items, self._shingles[key]) >= self.threshold:
                return "near", key
        return "new", None

    def add(self, key: str, text: str) -> None:
        items = shingles(text)
        self._exact.setdefault(normalize_instruction(text), key)
        if key not in self._shingles:
            self._shingles[key] = items
            self._lsh.insert(key, self._minhash(items))


def word_ngrams(text: str, n: int = OVERLAP_NGRAM) -> set[str]:
    words = normalize_instruction(text).split()
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


class OverlapIndex:
    """The train/test overlap rule over a set of reference instructions: exact after
    `normalize_instruction`, near (Jaccard of shingles >= threshold, MinHash candidates confirmed
    exactly), or a shared run of `ngram` normalized words. The relation is symmetric, so the same
    index serves the evaluation's contamination check and the scale stage's held-out filter."""

    def __init__(self, records: list[dict], threshold: float = OVERLAP_JACCARD, ngram: int = OVERLAP_NGRAM):
        self.threshold, self.ngram = threshold, ngram
        self.texts = {row["id"]: row["instruction"] for row in records}
        self._near, self._exact, self._grams = NearDuplicateIndex(threshold=threshold), {}, {}
        for row in records:
            self._near.add(row["id"], row["instruction"])
            self._exact.setdefault(normalize_instruction(row["instruction"]), row["id"])
            for gram in word_ngrams(row["instruction"], ngram):
                self._grams.setdefault(gram, row["id"])

    def matches(self, text: str) -> list[dict]:
        """The first match of each kind: {"kind", "id", ...}; empty when the text overlaps nothing."""
        found = []
        if normalize_instruction(text) in self._exact:
            found.append({"kind": "exact", "id": self._exact[normalize_instruction(text)]})
        kind, key = self._near.find(text)
        if kind == "near":
            found.append({"kind": "near", "id": key, "jaccard": round(jaccard(shingles(text), shingles(self.texts[key])), 4)})
        shared = sorted(g for g in word_ngrams(text, self.ngram) if g in self._grams)
        if shared:
            found.append({"kind": "ngram", "id": self._grams[shared[0]], "shared_ngram": shared[0], "n_shared_ngrams": len(shared)})
        return found
