"""Statistics for the paired base-vs-SFT evaluation, all delegated to statsmodels.

Nothing here re-derives a formula: every number comes from a statsmodels routine so that the
reported intervals and p-values are the ones a reviewer gets by calling the library directly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from statsmodels.stats.contingency_tables import mcnemar as _sm_mcnemar
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import proportion_confint, proportion_effectsize

from .exit_codes import BadInputError

__all__ = [
    "EXACT_DISCORDANT_THRESHOLD",
    "wilson_ci",
    "mcnemar_table",
    "mcnemar_from_table",
    "mcnemar_test",
    "cohens_h",
    "benjamini_hochberg",
]

# Below this many discordant pairs the chi-square approximation to McNemar is poor, so the exact
# binomial test is used instead (the usual b + c < 25 rule of thumb).
EXACT_DISCORDANT_THRESHOLD = 25


def wilson_ci(successes: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson score interval for successes/n; n = 0 has no interval and is refused."""
    if n <= 0 or not 0 <= successes <= n:
        raise BadInputError(f"wilson_ci: need 0 <= successes <= n and n > 0, got {successes}/{n}")
    low, high = proportion_confint(successes, n, alpha=alpha, method="wilson")
    return float(low), float(high)


def mcnemar_table(base_success: Sequence[bool], sft_success: Sequence[bool]) -> list[list[int]]:
    """[[both, base_only], [sft_only, neither]] from paired per-item outcomes."""
    if len(base_success) != len(sft_success):
        raise BadInputError(f"mcnemar: unpaired outcomes ({len(base_success)} base vs {len(sft_success)} sft)")
    pairs = list(zip(map(bool, base_success), map(bool, sft_success), strict=True))
    return [
        [sum(b and s for b, s in pairs), sum(b and not s for b, s in pairs)],
        [sum(s and not b for b, s in pairs), sum(not b and not s for b, s in pairs)],
    ]


def mcnemar_from_table(table: Sequence[Sequence[int]], exact: bool) -> dict:
    """McNemar on a 2x2 table, exact binomial or continuity-corrected chi-square as asked.

    Rows are base (success, failure), columns sft (success, failure), so b = base-only successes
    and c = sft-only successes. With no discordant pairs there is no evidence either way: the
    chi-square statistic is undefined there, so p = 1 is reported for both variants.
    """
    table = [[int(x) for x in row] for row in table]
    if len(table) != 2 or any(len(row) != 2 for row in table) or any(x < 0 for row in table for x in row):
        raise BadInputError(f"mcnemar: expected a 2x2 table of non-negative counts, got {table}")
    b, c = table[0][1], table[1][0]
    method = "exact_binomial" if exact else "chi2_continuity_corrected"
    if b + c == 0:
        statistic, p_value = (0.0, 1.0)
    else:
        result = _sm_mcnemar(table, exact=exact, correction=True)
        statistic, p_value = float(result.statistic), float(result.pvalue)
    favours = "sft" if c > b else "base" if b > c else "tie"
    return {"table": table, "b": b, "c": c, "statistic": statistic, "p_value": p_value,
            "method": method, "favours": favours}


def mcnemar_test(base_success: Sequence[bool], sft_success: Sequence[bool]) -> dict:
    """Paired McNemar test; exact when b + c < EXACT_DISCORDANT_THRESHOLD, else corrected chi-square."""
    table = mcnemar_table(base_success, sft_success)
    discordant = table[0][1] + table[1][0]
    return mcnemar_from_table(table, exact=discordant < EXACT_DISCORDANT_THRESHOLD)


def cohens_h(p_sft: float, p_base: float) -> float:
    """Cohen's h for two proportions; positive when SFT's success rate is the higher one."""
    for name, p in (("p_sft", p_sft), ("p_base", p_base)):
        if not 0.0 <= p <= 1.0 or math.isnan(p):
            raise BadInputError(f"cohens_h: {name} must be a proportion in [0, 1], got {p}")
    return float(proportion_effectsize(p_sft, p_base))


def benjamini_hochberg(pvalues: Sequence[float], alpha: float = 0.05) -> dict:
    """Benjamini-Hochberg FDR control: {"adjusted": [...], "reject": [...], "alpha": alpha}.

    An empty family has nothing to adjust; statsmodels would fail on it, so it is answered here.
    """
    pvalues = [float(p) for p in pvalues]
    if not pvalues:
        return {"adjusted": [], "reject": [], "alpha": alpha}
    reject, adjusted, _, _ = multipletests(pvalues, alpha=alpha, method="fdr_bh")
    return {"adjusted": [float(p) for p in adjusted], "reject": [bool(r) for r in reject], "alpha": alpha}
