"""Paired base-vs-SFT evaluation: test-set reading, statistics tables, the gate, the train/test
contamination check, the summary text and the success-rate plot.

Statistics (all from `stats`, i.e. statsmodels): per type and overall, n scored, successes, rate and
Wilson 95% CI for each model; McNemar on the paired outcomes (exact binomial when the discordant
pairs b + c < 25, else chi-square with continuity correction; the method is stored with each test);
Cohen's h (positive = SFT ahead); Benjamini-Hochberg over the per-type McNemar p-values at the gate
alpha. Records of a type without a scorer are generated and saved but sit outside every table.

Gate: overall McNemar p < alpha with more SFT-only than base-only successes (c > b), and no
train/test contamination unless it is explicitly allowed.

Contamination rule: a test instruction is contaminated when some SFT training instruction
  exact  is equal to it after `normalize_instruction` (lowercase, words only), or
  near   has Jaccard >= 0.7 of word unigram+bigram `shingles` (candidates from a MinHash
         `NearDuplicateIndex` built on the training set, each confirmed with the exact Jaccard), or
  ngram  shares a run of 8 consecutive normalized words with it (the usual 8-gram
         benchmark-leak test; instructions shorter than 8 words can only match exact/near).
Every match is listed with both ids and texts; the first match per kind per test record is kept.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .dedup import OVERLAP_JACCARD, OVERLAP_NGRAM, OverlapIndex
from .exit_codes import BadInputError
from .jsonl_io import iter_jsonl
from .stats import EXACT_DISCORDANT_THRESHOLD, benjamini_hochberg, cohens_h, mcnemar_test, wilson_ci
from .test_set import TYPES, score_response

__all__ = [
    "CONTAMINATION_JACCARD", "CONTAMINATION_NGRAM", "CI_ALPHA", "load_test_records", "load_training_instructions",
    "check_contamination", "paired_table", "paired_statistics", "gate_decision", "format_summary",
    "plot_success_rates",
]

CONTAMINATION_JACCARD = OVERLAP_JACCARD
CONTAMINATION_NGRAM = OVERLAP_NGRAM
CI_ALPHA = 0.05  # the Wilson intervals are 95% whatever the gate alpha


def load_test_records(path) -> list[dict]:
    """Records with a non-empty `instruction`; `id` defaults to "line-<n>" (ids kept as strings).

    Duplicate ids, a missing instruction or a known type without its scorer metadata is bad input
    naming file:line (exit 2).
    """
    records, lines = [], {}
    for line, record in iter_jsonl(path):
        instruction = record.get("instruction")
        if not isinstance(instruction, str) or not instruction.strip():
            raise BadInputError(f"{path}:{line}: missing or empty 'instruction' field")
        record = {**record, "id": str(record.get("id", f"line-{line}"))}
        if record["id"] in lines:
            raise BadInputError(f"{path}:{line}: duplicate id {record['id']!r} (first on line {lines[record['id']]})")
        lines[record["id"]] = line
        try:
            score_response(record, "probe")  # a known type without its metadata fails here, not mid-run
        except BadInputError as err:
            raise BadInputError(f"{path}:{line}: {err}") from None
        records.append(record)
    if not records:
        raise BadInputError(f"{path}: no records")
    return records


def load_training_instructions(path) -> list[dict]:
    """[{id, instruction}] of an SFT dataset; ids default to "line-<n>"."""
    rows = []
    for line, record in iter_jsonl(path):
        if not isinstance(record.get("instruction"), str):
            raise BadInputError(f"{path}:{line}: missing 'instruction' field")
        rows.append({"id": str(record.get("id", f"line-{line}")), "instruction": record["instruction"]})
    return rows


def check_contamination(test_records: list[dict], training_records: list[dict],
                        threshold: float = CONTAMINATION_JACCARD, ngram: int = CONTAMINATION_NGRAM) -> dict:
    """Every test instruction against every training instruction (see the module docstring)."""
    index = OverlapIndex(training_records, threshold, ngram)
    overlaps = []
    for record in test_records:
        matches = [{"kind": m.pop("kind"), "training_id": m.pop("id"), **m} for m in index.matches(record["instruction"])]
        for match in matches:
            match["training_instruction"] = index.texts[match["training_id"]]
        if matches:
            overlaps.append({"test_id": record["id"], "test_instruction": record["instruction"], "matches": matches})
    kinds = Counter(m["kind"] for o in overlaps for m in o["matches"])
    return {"rule": f"exact after normalize_instruction, or Jaccard(shingles) >= {threshold}, or a shared "
                    f"{ngram}-gram of normalized words", "jaccard_threshold": threshold, "ngram": ngram,
            "n_test": len(test_records), "n_training": len(training_records), "found": bool(overlaps),
            "n_contaminated": len(overlaps), "by_kind": {k: kinds.get(k, 0) for k in ("exact", "near", "ngram")},
            "overlaps": overlaps}


def _side(successes: int, n: int) -> dict:
    low, high = wilson_ci(successes, n, alpha=CI_ALPHA)
    return {"successes": successes, "rate": successes / n, "ci95": [low, high]}


def paired_table(base: list[bool], sft: list[bool]) -> dict:
    """One row of the report from paired outcomes (index i = the same test record)."""
    n = len(base)
    if n == 0:
        raise BadInputError("paired_table: no scored pairs")
    base_side, sft_side = _side(sum(map(bool, base)), n), _side(sum(map(bool, sft)), n)
    return {"n_scored": n, "base": base_side, "sft": sft_side, "difference": sft_side["rate"] - base_side["rate"],
            "mcnemar": mcnemar_test(base, sft), "cohens_h": cohens_h(sft_side["rate"], base_side["rate"])}


def paired_statistics(pairs: list[dict], alpha: float) -> dict:
    """`pairs`: [{id, type, scored, base_success, sft_success}] -> overall, per-type and BH tables."""
    scored = [p for p in pairs if p["scored"]]
    types = [t for t in TYPES if any(p["type"] == t for p in scored)]
    types += sorted({p["type"] for p in scored} - set(types), key=str)
    per_type = {t: paired_table([p["base_success"] for p in scored if p["type"] == t],
                                [p["sft_success"] for p in scored if p["type"] == t]) for t in types}
    bh = benjamini_hochberg([per_type[t]["mcnemar"]["p_value"] for t in types], alpha=alpha)
    for t, adjusted, reject in zip(types, bh["adjusted"], bh["reject"]):
        per_type[t].update(bh_adjusted_p=adjusted, bh_reject=reject)
    unscored = [p for p in pairs if not p["scored"]]
    return {
        "overall": paired_table([p["base_success"] for p in scored], [p["sft_success"] for p in scored]) if scored else None,
        "per_type": per_type,
        "multiple_comparisons": {"method": "benjamini_hochberg", "family": "per-type McNemar p-values", "alpha": alpha,
                                 "types": types, "raw_p": [per_type[t]["mcnemar"]["p_value"] for t in types], **bh},
        "mcnemar_method_rule": f"exact binomial when b + c < {EXACT_DISCORDANT_THRESHOLD}, else chi-square with "
                               "continuity correction (statsmodels)",
        "ci": "Wilson score interval, 95%",
        "n_records": len(pairs), "n_scored": len(scored),
        "unscored": {"n": len(unscored), "by_type": dict(Counter(str(p["type"] or "(none)") for p in unscored)),
                     "ids": [p["id"] for p in unscored]},
    }


def gate_decision(statistics: dict, contamination: dict | None, alpha: float, allow_contamination: bool) -> dict:
    """Pass iff overall McNemar p < alpha in favour of SFT and no disallowed contamination."""
    reasons, overall = [], statistics.get("overall")
    if overall is None:
        reasons.append("no scored records: nothing to test")
    else:
        test = overall["mcnemar"]
        if test["favours"] != "sft":
            reasons.append(f"SFT is not ahead (base-only b={test['b']}, SFT-only c={test['c']})")
        if not test["p_value"] < alpha:
            reasons.append(f"overall McNemar p={test['p_value']:.4g} ({test['method']}) is not < alpha {alpha}")
    if contamination is None:
        reasons.append("contamination check not run")
    elif contamination["found"] and not allow_contamination:
        ids = ", ".join(o["test_id"] for o in contamination["overlaps"][:20])
        reasons.append(f"train/test contamination: {contamination['n_contaminated']} test instruction(s) overlap the "
                       f"SFT training data ({ids}{', ...' if contamination['n_contaminated'] > 20 else ''})")
    return {"passed": not reasons, "alpha": alpha, "allow_contamination": allow_contamination, "reasons": reasons,
            "rule": "overall McNemar p < alpha with SFT-only successes > base-only successes, and no train/test "
                    "contamination unless --allow-contamination"}


def _fmt_side(side: dict, n: int) -> str:
    low, high = side["ci95"]
    return f"{side['successes']:>3}/{n:<3} {side['rate']:6.1%} [{low:5.1%},{high:6.1%}]"


def format_summary(statistics: dict, gate: dict, contamination: dict | None, header: list[str] = ()) -> str:
    """The human-readable report written to evaluation_summary.txt."""
    lines = list(header)
    columns = f"{'type':<22} {'base':<27} {'sft':<27} {'b':>3} {'c':>3} {'p (McNemar)':>12} {'method':<8} {'p BH':>8} {'h':>6}"
    lines += ["", columns, "-" * len(columns)]
    rows = [(t, row) for t, row in statistics["per_type"].items()] + [("OVERALL", statistics["overall"])]
    for name, row in rows:
        if row is None:
            lines.append(f"{name:<22} (no scored records)")
            continue
        test, n = row["mcnemar"], row["n_scored"]
        method = "exact" if test["method"] == "exact_binomial" else "chi2cc"
        bh = f"{row['bh_adjusted_p']:8.4f}" if "bh_adjusted_p" in row else f"{'-':>8}"
        lines.append(f"{name:<22} {_fmt_side(row['base'], n):<27} {_fmt_side(row['sft'], n):<27} {test['b']:>3} "
                     f"{test['c']:>3} {test['p_value']:12.4g} {method:<8} {bh} {row['cohens_h']:6.3f}")
    unscored = statistics["unscored"]
    lines += ["", f"rates with Wilson 95% CIs; b = base-only successes, c = SFT-only successes; "
                  f"{statistics['mcnemar_method_rule']}; BH = Benjamini-Hochberg over the per-type tests; h = Cohen's h",
              f"unscored records (no scorer for their type; generated and saved): {unscored['n']} {unscored['by_type'] or ''}"]
    if contamination is not None:
        lines.append(f"contamination ({contamination['rule']}): {contamination['n_contaminated']} of "
                     f"{contamination['n_test']} test instructions vs {contamination['n_training']} training instructions")
        for overlap in contamination["overlaps"]:
            for match in overlap["matches"]:
                lines.append(f"  {overlap['test_id']} [{match['kind']}] {overlap['test_instruction']!r} ~ "
                             f"{match['training_id']} {match['training_instruction']!r}")
    lines += ["", f"GATE {'PASSED' if gate['passed'] else 'FAILED'} ({gate['rule']}; alpha {gate['alpha']})"]
    lines += [f"  - {reason}" for reason in gate["reasons"]]
    return "\n".join(lines) + "\n"


def plot_success_rates(statistics: dict, path, title: str = "Stage 1 SFT evaluation") -> Path:
    """Grouped bars per type (and overall): base vs SFT success rate with Wilson 95% error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(statistics["per_type"].items()) + ([("overall", statistics["overall"])] if statistics["overall"] else [])
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(rows) + 2), 4.5))
    width = 0.38
    for offset, side, colour in ((-width / 2, "base", "#8c8c8c"), (width / 2, "sft", "#1f77b4")):
        rates = [row[side]["rate"] for _, row in rows]
        errors = [[row[side]["rate"] - row[side]["ci95"][0] for _, row in rows],
                  [row[side]["ci95"][1] - row[side]["rate"] for _, row in rows]]
        ax.bar([i + offset for i in range(len(rows))], rates, width, yerr=errors, capsize=4, color=colour,
               label="base" if side == "base" else "base + SFT adapter")
    ax.set_xticks(range(len(rows)), [f"{name}\n(n={row['n_scored']})" for name, row in rows], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("success rate (Wilson 95% CI)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
