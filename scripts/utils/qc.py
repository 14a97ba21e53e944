"""Quality control of generated pairs: the five rates, their thresholds, and the verdict.

Definitions (docs/qc_definitions.md says the same, with examples; tests pin them):
- judged records: every (instruction, response) pair that reached the pair critic, counted once
  per id (a record whose id appears again in the file is the same record: the first one counts).
- runaway_rate = judged records whose raw response is a repetition loop (`is_runaway`) / judged.
- token_limit_rate = judged records with finish_reason "length" / judged.
- delimiter_leakage = accepted records whose cleaned response still contains "instruction:" or
  "response:" (any case) - a count, not a rate.
- median_response_tokens = median of `n_response_tokens` (tokens of the cleaned response) over accepted records.
- critic_acceptance_rate = accepted by the pair critic / judged.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter

from .cli_validation import non_negative_int, positive_int, probability
from .completion_prompts import CompletionStylePrompts
from .records import unique_by_id

__all__ = ["QC_THRESHOLDS", "QC_THRESHOLD_RANGES", "is_runaway", "compute_qc", "format_qc_table", "RUNAWAY_NGRAM",
           "RUNAWAY_REPEATS"]

QC_THRESHOLDS = {
    "runaway_rate_max": 0.05,
    "token_limit_rate_max": 0.10,
    "delimiter_leakage_max": 0,
    "median_response_tokens_max": 40,
    "critic_acceptance_rate_min": 0.50,
}
# What each threshold may be set to (flags and values read back from a manifest alike).
QC_THRESHOLD_RANGES = {
    "runaway_rate_max": probability,
    "token_limit_rate_max": probability,
    "delimiter_leakage_max": non_negative_int,
    "median_response_tokens_max": positive_int,
    "critic_acceptance_rate_min": probability,
}
RUNAWAY_NGRAM = 3
RUNAWAY_REPEATS = 3
_WORD = re.compile(r"\w+")


def is_runaway(raw_response: str) -> bool:
    """A repetition loop: some word 3-gram occurs 3 or more times in the raw response."""
    words = _WORD.findall(raw_response.lower())
    grams = Counter(tuple(words[i:i + RUNAWAY_NGRAM]) for i in range(len(words) - RUNAWAY_NGRAM + 1))
    return any(count >= RUNAWAY_REPEATS for count in grams.values())


def _stats(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    return {"n": len(values), "mean": round(statistics.fmean(values), 4), "median": statistics.median(values),
            "min": min(values), "max": max(values)}


def compute_qc(judged: list[dict], thresholds: dict | None = None, phase_counts: dict | None = None) -> dict:
    """QC summary over judged pair records (fields: raw_response, response, finish_reason,
    n_response_tokens, pair_critic.accepted, pair_critic.margin); an id seen twice counts once."""
    limits = {**QC_THRESHOLDS, **(thresholds or {})}
    given = len(judged)
    judged = unique_by_id(judged)
    accepted = [r for r in judged if r["pair_critic"]["accepted"]]
    n = len(judged)
    rates = {
        "runaway_rate": sum(is_runaway(r["raw_response"]) for r in judged) / n if n else None,
        "token_limit_rate": sum(r["finish_reason"] == "length" for r in judged) / n if n else None,
        "delimiter_leakage": sum(CompletionStylePrompts.has_delimiter_leak(r["response"]) for r in accepted),
        "median_response_tokens": statistics.median([r["n_response_tokens"] for r in accepted]) if accepted else None,
        "critic_acceptance_rate": len(accepted) / n if n else None,
    }
    checks = {
        "runaway_rate": ("<", limits["runaway_rate_max"]),
        "token_limit_rate": ("<", limits["token_limit_rate_max"]),
        "delimiter_leakage": ("<=", limits["delimiter_leakage_max"]),
        "median_response_tokens": ("<", limits["median_response_tokens_max"]),
        "critic_acceptance_rate": (">=", limits["critic_acceptance_rate_min"]),
    }
    table, failures = {}, []
    for name, (op, limit) in checks.items():
        value = rates[name]
        ok = value is not None and {"<": value < limit, "<=": value <= limit, ">=": value >= limit}[op]
        table[name] = {"value": value, "op": op, "threshold": limit, "passed": ok}
        if not ok:
            failures.append(f"{name} = {value if value is None else round(value, 4)} (needs {op} {limit})")
    if not accepted:
        failures.append("no accepted records")
    return {
        "passed": not failures,
        "failures": failures,
        "rates": table,
        "counts": {"judged": n, "accepted": len(accepted), "duplicate_judged_ids_ignored": given - n, **(phase_counts or {})},
        "finish_reasons": dict(Counter(r["finish_reason"] for r in judged)),
        "token_stats": {"accepted_n_response_tokens": _stats([r["n_response_tokens"] for r in accepted]),
                        "judged_n_generated_tokens": _stats([r["n_generated_tokens"] for r in judged])},
        # Empty responses are rejected without asking the critic, so they have no margin.
        "margin_stats": {"pair_critic_all": _stats([r["pair_critic"]["margin"] for r in judged if r["pair_critic"].get("margin") is not None]),
                         "pair_critic_accepted": _stats([r["pair_critic"]["margin"] for r in accepted])},
        "thresholds": limits,
    }


def format_qc_table(qc: dict) -> str:
    lines = [f"{'rate':<26}{'value':>10}  {'gate':<10}{'ok':>4}"]
    for name, row in qc["rates"].items():
        value = "n/a" if row["value"] is None else (f"{row['value']:.3f}" if isinstance(row["value"], float) else str(row["value"]))
        lines.append(f"{name:<26}{value:>10}  {row['op'] + ' ' + str(row['threshold']):<10}{'yes' if row['passed'] else 'NO':>4}")
    lines.append(f"QC {'PASSED' if qc['passed'] else 'FAILED'}: {qc['counts']['accepted']} accepted of {qc['counts']['judged']} judged")
    return "\n".join(lines)
