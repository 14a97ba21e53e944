"""Exact and near-duplicate detection for instructions, shared by the pilot and the scale merge.

Near duplicates: Jaccard similarity of word unigram+bigram sets >= threshold (0.7 by default,
Self-Instruct's ROUGE-L cut-off). MinHash LSH (datasketch) finds candidates in sub-linear time so
15k+ instructions are not compared pairwise; every candidate is then confirmed with the exact
Jaccard, so the decision does not depend on hashing luck.
"""

from __future__ import annotations

import re

__all__ = ["normalize_instruction", "shingles", "jaccard", "NearDuplicateIndex"]

_WORD = re.compile(r"[a-z0-9]+")


def normalize_instruction(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


def shingles(text: str) -> set[str]:
    words = _WORD.findall(text.lower())
    return set(words) | {f"{a} {b}" for a, b in zip(words, words[1:])}


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
