"""Best-of-N responses: every candidate scored, each critic signal proven on a probe, the best passing one kept.

Phase 4 of the generation stages, in three steps:

1. `score_candidates`: each sampled response candidate (`<instruction id>-c<j>`) gets the cheap
   filters (empty, chat marker, repetition loop `qc.is_runaway`, token-limit hit, a leaked delimiter
   or end marker, failed constraint checks where its instruction carries constraints, no list where
   its instruction asks for one), the A/B pair critic asked both ways (one label-swapped critique
   gives both readings; skipped once the probe has found it untrusted), and the likelihood
   relevance (`InstructionCritic.relevance_scores`). Every candidate with its scores is written to
   its own phase file, which a later preference stage reads.
2. `measure_signals` (the pilot only): a probe set (`critic_probe.build_probe_set`) from the first
   round's pairs that passed the cheap filters (non-empty, no chat marker, not runaway; one per
   instruction), each signal's ROC AUC of matched against corrupted pairs, written to `probe.json`.
   A signal whose AUC is below `min_signal_auc` does not discriminate and is not used to accept or
   rank; a run where none discriminates stops there and fails its gate. A scale shard takes the
   pilot's verdict from its manifest (`signals_from_pilot_manifest`), never its own.
3. `judge_instructions`: per instruction, the candidates that pass the cheap filters and the rule of
   every trusted signal (A/B margins >= confidence_threshold, relevance > relevance_min), ranked by
   the trusted signal with the highest probe AUC (ties by candidate index); the winner is the judged
   pair. Where none passes, the judged pair is the first in the same order, rejected, with its reasons.

Signals: `ab_margin` (the label-swapped average margin), `ab_margin_direct` (logp_a - logp_b of the
item as asked), `relevance` (log p(y|x) - log p(y) per completion token) and `relevance_total` (the
same difference summed over the completion). The two relevance readings accept alike (per-token
relevance > relevance_min) and rank differently: the per-token one favours a short answer whose few
words echo its instruction (the probe's truncated answers), the total one does not (measured on the
bundled model, docs/measurements.md).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .completion_prompts import CompletionStylePrompts
from .critic_probe import build_probe_set, summarize_signals
from .exit_codes import RefusedError
from .prompt_guards import contains_chat_marker
from .qc import is_runaway
from .records import JudgedPairRecord, ScoredResponseRecord, unique_by_id

__all__ = ["SIGNALS", "PROBE_FILE", "PROBE_MAX_PAIRS", "PROBE_FILTERS", "CriticSignals", "candidate_key", "signal_values",
           "signal_passes", "filter_reasons", "score_candidates", "probe_pairs", "measure_signals",
           "signals_from_pilot_manifest", "choose", "judge_instructions"]

SIGNALS = ("ab_margin", "ab_margin_direct", "relevance", "relevance_total")
PROBE_FILE = "probe.json"
# Enough for a stable AUC (100 matched against up to 300 corrupted items) at a bounded cost: every
# corrupted item is one more label-swapped critique and relevance score.
PROBE_MAX_PAIRS = 100
# The cheap filters a pair must pass to enter the probe (the issue's: a probe of unfinished answers
# would measure the token limit, not the critic).
PROBE_FILTERS = ("empty_response", "chat_marker", "runaway")


@dataclass(frozen=True)
class CriticSignals:
    """Which signals may accept and rank pairs, and why: their probe AUCs against `min_auc`."""

    trusted: tuple[str, ...]
    rank_by: str | None
    aucs: dict
    min_auc: float
    source: str

    @classmethod
    def from_aucs(cls, aucs: dict, min_auc: float, source: str) -> CriticSignals:
        trusted = tuple(sorted(name for name, auc in aucs.items() if auc is not None and auc >= min_auc))
        rank_by = min(trusted, key=lambda name: (-aucs[name], name)) if trusted else None
        return cls(trusted, rank_by, dict(aucs), min_auc, source)

    def as_record(self) -> dict:
        return {"trusted": list(self.trusted), "rank_by": self.rank_by, "aucs": dict(self.aucs), "min_auc": self.min_auc,
                "source": self.source}

    def failure(self) -> str | None:
        """The gate's message when no signal discriminates, else None."""
        if self.trusted:
            return None
        shown = ", ".join(f"{name} {'n/a' if auc is None else f'{auc:.3f}'}" for name, auc in sorted(self.aucs.items()))
        return f"no critic signal discriminates on the probe set (needs AUC >= {self.min_auc}): {shown}"


def candidate_key(instruction_id: str, index: int) -> str:
    return f"{instruction_id}-c{index}"


def signal_values(pair_decision: dict | None, relevance: dict | None) -> dict:
    values = {}
    if pair_decision is not None:
        values["ab_margin"] = pair_decision["margin"]
        values["ab_margin_direct"] = round(pair_decision["logp_a"] - pair_decision["logp_b"], 6)
    if relevance is not None and relevance.get("relevance") is not None:
        values["relevance"] = relevance["relevance"]
        values["relevance_total"] = relevance["pmi"]
    return values


def signal_passes(name: str, values: dict, config) -> bool:
    """A signal's own acceptance rule, on a candidate's signal values."""
    if name in ("relevance", "relevance_total"):
        value, limit = values.get("relevance"), config.relevance_min
        return value is not None and value > limit
    value = values.get(name)
    return value is not None and value >= config.confidence_threshold


def filter_reasons(record: dict, constraint_checks: list[dict] | None = None, not_a_list: bool = False) -> list[str]:
    """The cheap filters a response candidate fails, in a fixed order (empty when it passes them all);
    `not_a_list`: its instruction asks for a list and the answer cannot be made one (`utils.list_answers`)."""
    reasons = []
    if not record["response"]:
        reasons.append("empty_response")
    if contains_chat_marker(record["response"]):
        reasons.append("chat_marker")
    if is_runaway(record["raw_response"]):
        reasons.append("runaway")
    if record["finish_reason"] == "length":
        reasons.append("token_limit")
    if CompletionStylePrompts.has_delimiter_leak(record["response"]):
        reasons.append("delimiter_leak")
    if constraint_checks is not None and not all(check["passed"] for check in constraint_checks):
        reasons.append("constraint_failed")
    if not_a_list:
        reasons.append("not_a_list")
    return reasons


def _records(appender) -> list[dict]:
    return unique_by_id(appender.records)


def score_candidates(critic, files: dict, instruction_keys, config, constraints_by_instruction: dict | None = None,
                     list_requests: dict | None = None, pair_critic: bool = True) -> None:
    """Score every response candidate of `instruction_keys` not scored yet (files["responses"] ->
    files["scored"]). `constraints_by_instruction` maps an instruction id to the constraints (record
    form) its answers must satisfy (the instructions answered under constraints); `list_requests`
    maps an instruction id to the list it asks for (`list_answers.ListRequest`): a candidate that
    cannot be made that list is filtered. `pair_critic=False` skips the A/B critique (where the
    probe did not trust it, it decides nothing and was the largest cost of the phase)."""
    from .constraint_data import recheck
    from .list_answers import list_answer

    wanted, list_requests = set(instruction_keys), list_requests or {}
    todo = [r for r in sorted(_records(files["responses"]), key=lambda r: r["id"])
            if r["instruction_id"] in wanted and r["id"] not in files["scored"]]
    # The critic cannot read an empty answer or encode a chat marker: such candidates get no scores.
    scorable = [r for r in todo if r["response"] and not contains_chat_marker(r["response"])]
    pairs = [(r["instruction"], r["response"]) for r in scorable]
    critiques = critic.critique_pairs_batch(pairs, label_swap=True) if pair_critic else [None] * len(pairs)
    decisions = dict(zip([r["id"] for r in scorable], critiques, strict=True))
    relevance = dict(zip([r["id"] for r in scorable], critic.relevance_scores(pairs), strict=True))
    for record in todo:
        constraints = (constraints_by_instruction or {}).get(record["instruction_id"])
        checks = recheck(constraints, record["response"]) if constraints else None
        request = list_requests.get(record["instruction_id"])
        not_a_list = request is not None and list_answer(request, record["response"]) is None
        decision, scores = decisions.get(record["id"]), relevance.get(record["id"])
        files["scored"].append(ScoredResponseRecord.from_record(
            record, pair_critic=decision, relevance=scores, signals=signal_values(decision, scores),
            runaway=is_runaway(record["raw_response"]), token_limit=record["finish_reason"] == "length",
            constraint_checks=checks, filter_reasons=filter_reasons(record, checks, not_a_list)).to_dict())


def probe_pairs(scored: list[dict], round_index: int = 0) -> list[dict]:
    """One pair per instruction of `round_index` (its first candidate that passes PROBE_FILTERS)."""
    pairs = {}
    for record in sorted(scored, key=lambda r: (r["instruction_id"], r["candidate_index"])):
        if record["round"] != round_index or record["instruction_id"] in pairs:
            continue
        if not set(record["filter_reasons"]) & set(PROBE_FILTERS):
            pairs[record["instruction_id"]] = {"id": record["instruction_id"], "instruction": record["instruction"],
                                               "response": record["response"], "signals": record["signals"]}
    return [pairs[key] for key in sorted(pairs)]


def _probe_scores(critic, items, pairs: list[dict]) -> dict[str, list[float]]:
    """Each signal's score per probe item; matched items reuse their candidate's scores (the same pair)."""
    known = {pair["id"]: pair["signals"] for pair in pairs}
    fresh = [item for item in items if item.kind != "matched"]
    asked = [(item.instruction, item.response) for item in fresh]
    decisions = critic.critique_pairs_batch(asked, label_swap=True) if asked else []
    relevance = critic.relevance_scores(asked) if asked else []
    computed = {item.id: signal_values(d, r) for item, d, r in zip(fresh, decisions, relevance, strict=True)}
    scores = {name: [] for name in SIGNALS}
    for item in items:
        values = known[item.source_id] if item.kind == "matched" else computed[item.id]
        for name in SIGNALS:
            value = values.get(name)
            # A pair a signal cannot score ranks below every scored one.
            scores[name].append(-math.inf if value is None else float(value))
    return scores


def measure_signals(critic, folder: Path, scored: list[dict], config) -> CriticSignals:
    """The probe of this run (read back from `folder/probe.json` when a resumed run made it already)."""
    from .provenance_helper import write_manifest_atomic

    path = Path(folder) / PROBE_FILE
    if path.exists():
        saved = json.loads(path.read_text(encoding="utf-8"))
        return CriticSignals.from_aucs(saved["aucs"], config.min_signal_auc, "probe")
    pairs = probe_pairs(scored)
    items = build_probe_set(pairs, seed=config.seed, max_pairs=PROBE_MAX_PAIRS)
    scores = _probe_scores(critic, items, pairs) if items else {name: [] for name in SIGNALS}
    summary = summarize_signals(items, scores, config.min_signal_auc)
    aucs = {name: summary["signals"][name]["auc"] for name in SIGNALS}
    signals = CriticSignals.from_aucs(aucs, config.min_signal_auc, "probe")
    write_manifest_atomic(path, {
        "seed": config.seed, "min_auc": config.min_signal_auc, "source_round": 0, "pairs": len(pairs), "aucs": aucs,
        "summary": summary, **signals.as_record(),
        "items": [{**item.as_dict(), "scores": {name: (None if math.isinf(scores[name][i]) else scores[name][i])
                                                for name in SIGNALS}} for i, item in enumerate(items)]})
    return signals


def signals_from_pilot_manifest(manifest: dict, source: str) -> CriticSignals:
    """The pilot's verdict on its critic signals; RefusedError (exit 3) where the manifest has none
    or an unusable one (a pilot of an older version, or an edited manifest)."""
    record = manifest.get("critic_signals")
    try:
        aucs, min_auc, trusted = record["aucs"], record["min_auc"], record["trusted"]
        signals = CriticSignals.from_aucs(aucs, min_auc, f"pilot manifest {source}")
        usable = set(aucs) <= set(SIGNALS) and list(signals.trusted) == sorted(trusted) and signals.trusted
    except (KeyError, TypeError, ValueError):
        usable = False
    if not usable:
        raise RefusedError(f"scale: {source} holds no usable critic signal verdict (critic_signals: {record!r}); "
                           "rerun the pilot with this version of the pipeline")
    return signals


def choose(candidates: list[dict], signals: CriticSignals, config) -> tuple[dict, bool, list[str], dict]:
    """(winner, accepted, its rejection reasons, selection facts) among one instruction's scored candidates."""
    verdicts = []
    for record in sorted(candidates, key=lambda r: r["candidate_index"]):
        reasons = list(record["filter_reasons"])
        if record["pair_critic"] is not None or record["relevance"] is not None:
            reasons += [f"low_{name}" for name in signals.trusted if not signal_passes(name, record["signals"], config)]
        verdicts.append((record, reasons))

    def rank(verdict):
        record, reasons = verdict
        value = record["signals"].get(signals.rank_by) if signals.rank_by else None
        return (bool(reasons), -(value if value is not None else -math.inf), record["candidate_index"])

    winner, reasons = min(verdicts, key=rank)
    passing = sum(not r for _, r in verdicts)
    if reasons:
        why = "no candidate passed: " + "; ".join(f"c{r['candidate_index']} {', '.join(rs)}" for r, rs in verdicts)
    elif len(verdicts) == 1:
        why = "the only candidate, passed"
    else:
        why = f"best of {passing} passing (of {len(verdicts)}) by {signals.rank_by}"
    selection = {"candidates": len(verdicts), "passing": passing, "winner_index": winner["candidate_index"],
                 "ranked_by": signals.rank_by, "trusted_signals": list(signals.trusted), "reason": why}
    return winner, not reasons, reasons, selection


def judge_instructions(files: dict, instruction_keys, signals: CriticSignals, config) -> None:
    """One judged pair per accepted instruction of `instruction_keys` whose candidates are all scored."""
    wanted = set(instruction_keys)
    instructions = {r["id"]: r for r in _records(files["instructions"]) if r["id"] in wanted and r["accepted"]}
    by_instruction: dict[str, list[dict]] = {}
    for record in _records(files["scored"]):
        if record["instruction_id"] in instructions:
            by_instruction.setdefault(record["instruction_id"], []).append(record)
    for key in sorted(instructions):
        candidates = by_instruction.get(key, [])
        if key in files["judged"] or len(candidates) < config.num_candidates:
            continue
        winner, accepted, reasons, selection = choose(candidates, signals, config)
        files["judged"].append(JudgedPairRecord.from_record(
            winner, id=key, instruction_critic=instructions[key]["instruction_critic"], candidate_id=winner["id"],
            selection=selection, accepted=accepted, rejection_reasons=reasons).to_dict())
