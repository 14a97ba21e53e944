"""Quality control of generated pairs: the five rates, their thresholds, and the verdict.

Definitions (docs/qc_definitions.md says the same, with examples; tests pin them):
- judged records: one per instruction whose response candidates were all scored (the chosen
  candidate, or where none passed the first in rank order), counted once per id (a record whose id
  appears again in the file is the same record: the first one counts). `accepted` is the verdict.
- runaway_rate = judged records whose raw response is a repetition loop (`is_runaway`) / judged.
- token_limit_rate = judged records with finish_reason "length" (no end of answer within the cap) / judged.
- delimiter_leakage = accepted records whose cleaned response still contains "instruction:" or
  "response:" (any case) or the response_v3 end marker - a count, not a rate.
- median_response_tokens = median of `n_response_tokens` (tokens of the cleaned response) over accepted records.
- critic_acceptance_rate = accepted / judged.
- discriminating_signals = critic signals whose probe AUC reached the minimum (gate: >= 1), when given.
- checker_pass_rate = constrained final records that pass every one of their constraint checkers /
  constrained final records (gate: == 1.0; n/a and passing when no record is constrained), when given.
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


def compute_qc(judged: list[dict], thresholds: dict | None = None, phase_counts: dict | None = None,
               critic_signals: dict | None = None, constraints: dict | None = None, candidates: list[dict] | None = None) -> dict:
    """QC summary over judged pair records (fields: raw_response, response, finish_reason,
    n_response_tokens, accepted, pair_critic.margin); an id seen twice counts once.

    `critic_signals` (the probe verdict: trusted, aucs, min_auc) adds the discriminating-signals
    gate; `constraints` (`constraint_data.constraint_summary` of the final records) the checker
    pass-rate gate; `candidates` (every scored response candidate) adds their counts, not a gate."""
    limits = {**QC_THRESHOLDS, **(thresholds or {})}
    given = len(judged)
    judged = unique_by_id(judged)
    accepted = [r for r in judged if r["accepted"]]
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
    # Gates of the new recipe, each only where its input is given; neither is a flag: a signal that
    # does not discriminate and a constrained record its own checker rejects are never acceptable.
    vacuous = set()
    failures = []
    if critic_signals is not None:
        rates["discriminating_signals"] = len(critic_signals["trusted"])
        checks["discriminating_signals"] = (">=", 1)
        if not critic_signals["trusted"]:
            shown = ", ".join(f"{k} {'n/a' if v is None else round(v, 3)}" for k, v in sorted(critic_signals["aucs"].items()))
            failures.append(f"no critic signal discriminates on the probe set (needs AUC >= {critic_signals['min_auc']}): {shown}")
    if constraints is not None:
        rates["checker_pass_rate"] = constraints["checker_pass_rate"]
        checks["checker_pass_rate"] = ("==", 1.0)
        if constraints["checker_pass_rate"] is None:
            vacuous.add("checker_pass_rate")
    table = {}
    for name, (op, limit) in checks.items():
        value = rates[name]
        ok = name in vacuous or (value is not None and {"<": value < limit, "<=": value <= limit, ">=": value >= limit,
                                                         "==": value == limit}[op])
        table[name] = {"value": value, "op": op, "threshold": limit, "passed": ok}
        if not ok and not (name == "discriminating_signals" and failures):
            failures.append(f"{name} = {value if value is None else round(value, 4)} (needs {op} {limit})")
    if not accepted:
        failures.append("no accepted records")
    extra = {}
    if critic_signals is not None:
        extra["critic_signals"] = critic_signals
    if constraints is not None:
        extra["constraints"] = constraints
    if candidates is not None:
        extra["candidates"] = {"scored": len(candidates),
                               "runaway_rate": sum(bool(r["runaway"]) for r in candidates) / len(candidates) if candidates else None,
                               "token_limit_rate": sum(bool(r["token_limit"]) for r in candidates) / len(candidates) if candidates else None,
                               "filter_reasons": dict(Counter(x for r in candidates for x in r["filter_reasons"]))}
    return {
        "passed": not failures,
        "failures": failures,
        "rates": table,
        **extra,
        "counts": {"judged": n, "accepted": len(accepted), "duplicate_judged_ids_ignored": given - n, **(phase_counts or {})},
        "finish_reasons": dict(Counter(r["finish_reason"] for r in judged)),
        "token_stats": {"accepted_n_response_tokens": _stats([r["n_response_tokens"] for r in accepted]),
                        "judged_n_generated_tokens": _stats([r["n_generated_tokens"] for r in judged])},
        # Empty responses are rejected without asking the critic, so they have no margin.
        "margin_stats": {"pair_critic_all": _stats(_margins(judged)), "pair_critic_accepted": _stats(_margins(accepted))},
        "relevance_stats": {"all": _stats(_relevances(judged)), "accepted": _stats(_relevances(accepted))},
        "thresholds": limits,
    }


def _margins(records: list[dict]) -> list[float]:
    # Empty responses are rejected without asking the critic, so they have no margin.
    return [r["pair_critic"]["margin"] for r in records if (r.get("pair_critic") or {}).get("margin") is not None]


def _relevances(records: list[dict]) -> list[float]:
    return [r["relevance"]["relevance"] for r in records if (r.get("relevance") or {}).get("relevance") is not None]


def format_qc_table(qc: dict) -> str:
    lines = [f"{'rate':<26}{'value':>10}  {'gate':<10}{'ok':>4}"]
    for name, row in qc["rates"].items():
        value = "n/a" if row["value"] is None else (f"{row['value']:.3f}" if isinstance(row["value"], float) else str(row["value"]))
        lines.append(f"{name:<26}{value:>10}  {row['op'] + ' ' + str(row['threshold']):<10}{'yes' if row['passed'] else 'NO':>4}")
    signals = qc.get("critic_signals")
    if signals:
        lines.append(f"critic signals (probe ROC AUC, needs >= {signals['min_auc']}; {signals['source']}):")
        for name, auc in sorted(signals["aucs"].items()):
            verdict = "trusted" + (", ranks" if name == signals["rank_by"] else "") if name in signals["trusted"] else "not discriminating"
            lines.append(f"  {name:<24}{'n/a' if auc is None else f'{auc:.3f}':>10}  {verdict}")
    constraints = qc.get("constraints")
    if constraints and constraints["constrained"]:
        families = ", ".join(f"{k} {v}" for k, v in constraints["per_family"].items())
        lines.append(f"constraints ({constraints['catalogue_version']}): {constraints['constrained']} of {constraints['records']} "
                     f"records ({constraints['constrained_fraction']:.3f}), modes {constraints['modes']}; {families}")
    lines.append(f"QC {'PASSED' if qc['passed'] else 'FAILED'}: {qc['counts']['accepted']} accepted of {qc['counts']['judged']} judged")
    return "\n".join(lines)
