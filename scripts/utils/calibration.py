"""Named calibrations: the settings a particular model needs where the source's do not fit it.

The source's parameters and QC thresholds (DESIGN.md) were set for a 32B base model. A model far
from that can need other values to produce any data at all; those values are a named calibration,
chosen by the model's identity (`--calibration auto`) or by name, recorded in the pilot manifest
(name, how it was chosen, each value and the reason for it, and the settings measured for it but
deliberately left at their defaults, with the measurement: `kept`) and inherited by the scale stage
through that manifest. A flag given on the command line still wins over a calibrated value and is
recorded as an override.

    calibration, chosen_by = choose_calibration("auto", provenance)
    config = with_settings(Stage1Config(), calibration.values)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .clean_model_loader import BUNDLED_MODEL_NAME, BUNDLED_SHA256

__all__ = ["Calibration", "CALIBRATIONS", "CALIBRATION_CHOICES", "choose_calibration"]


@dataclass(frozen=True)
class Calibration:
    name: str
    description: str
    # setting name (the flag's dest, as in a manifest's `overrides`) -> value, and why it is that value
    values: dict = field(default_factory=dict)
    reasons: dict = field(default_factory=dict)
    # setting name -> why its default stays for this model (a measurement, not an assumption)
    kept: dict = field(default_factory=dict)
    # `auto` picks this calibration for a model whose loaded file has this sha256
    model_file_sha256: str | None = None

    def as_record(self, chosen_by: str) -> dict:
        return {"name": self.name, "chosen_by": chosen_by, "description": self.description,
                "values": dict(self.values), "reasons": dict(self.reasons), "kept": dict(self.kept)}


SOURCE = Calibration(
    name="source",
    description="the source's parameters and QC thresholds (DESIGN.md), set for a 32B base model; nothing changed",
)

# Measured on the bundled model; the runs behind each figure are in docs/measurements.md ("Pilot iterations").
GEMMA_3_270M = Calibration(
    name=BUNDLED_MODEL_NAME,
    description="the bundled gemma-3-270m base model (268M parameters)",
    values={
        "confidence_threshold": 0.0,
        "label_swap": True,
        "qc_token_limit_rate_max": 0.4,
        "qc_critic_acceptance_rate_min": 0.3,
        "qc_runaway_rate_max": 0.1,
        "qc_median_response_tokens_max": 80,
        "constraint_variants": 2,
    },
    reasons={
        "confidence_threshold": "its A/B margins sit within +-0.3 nats (iteration 0: within +-0.5, 0 of 18 accepted at "
                                "1.0), so the source's 1.0-nat threshold accepts nothing; 0 keeps the pairs it prefers",
        "label_swap": "asking each item again with the letters traded and averaging cancels its constant preference "
                      "for one letter",
        "qc_token_limit_rate_max": "its answers are long: 0.348 hit the 80-token limit at CPU size (iteration 1), "
                                   "0.174-0.196 at GPU sizes, against the source's < 0.10 (response_v2; response_v3 "
                                   "answers end at the end marker: 1 of 32 hit its 256 tokens on a CPU, so the gate "
                                   "binds only a response_v2 run, such as the ablation of the old recipe)",
        "qc_critic_acceptance_rate_min": "its pair critic accepted 0.478 at CPU size (iteration 1) against the source's "
                                         ">= 0.50; 0.72-0.76 at GPU sizes",
        "qc_runaway_rate_max": "0.020-0.031 over 600-5,800 pairs on a GPU, but a handful of pairs at CPU sizes: 3 of 48 "
                               "(0.062) failed the source's < 0.05 on a CPU run",
        "qc_median_response_tokens_max": "response_v3's answers had a median of 15 tokens (1,954 pairs, H100) and its adapter "
                                         "answered 'explain ...' in one sentence (explanation 9 -> 4 of 40); response_v4's "
                                         "demonstrations, written to fix that, have a median of 36.5 tokens of this model, so "
                                         "the source's < 40 would fail a run whose answers are as long as its own "
                                         "demonstrations; 80 still fails one whose typical answer runs to the 256-token cap",
        "constraint_variants": "with its ~40-115 constrained pairs per family it learned few rules (trained-family "
                               "instruction_following 3 of 20); two relabeled copies of each answer (5,362 records from "
                               "1,960 pairs, 2 x H200) raised the adapter 85 -> 106 of 200 at lr 2e-4 (p = 0.004) and "
                               "102 -> 121 at lr 5e-4 (p = 0.013), trained families 1 -> 10 of 20 against the base",
    },
    kept={
        "min_signal_auc": "the issue's 0.75 stays: on a probe of 32 of its response_v3 pairs (CPU) the summed relevance "
                          "reached 0.81 (mismatched 0.99, truncated 0.73, looping 0.70), the per-token relevance 0.72 "
                          "(truncated 0.32), the A/B margins 0.45-0.47; with ~30 pairs the AUC's standard error is about "
                          "0.05, so a CPU-sized pilot can still find no signal above 0.75",
        "relevance_min": "0 stays: all 32 of its own pairs scored above it (the lowest 0.06 nats per token) and 14 of "
                         "the 32 mismatched probe pairs at or below it; ranking, not this floor, is where relevance acts",
    },
    model_file_sha256=BUNDLED_SHA256,
)

CALIBRATIONS = {c.name: c for c in (SOURCE, GEMMA_3_270M)}
CALIBRATION_CHOICES = ("auto", *CALIBRATIONS)


def choose_calibration(requested: str, provenance: dict) -> tuple[Calibration, str]:
    """(calibration, how it was chosen). `auto` decides by the loaded model's file hash, never its name,
    so the bundled GGUF named by any path gets its calibration and a renamed other model does not."""
    if requested != "auto":
        return CALIBRATIONS[requested], f"named by --calibration {requested}"
    file_sha = (provenance or {}).get("file_sha256")
    for calibration in CALIBRATIONS.values():
        if file_sha and calibration.model_file_sha256 == file_sha:
            return calibration, f"auto: the model's file sha256 {file_sha[:12]}... is {calibration.description}"
    return SOURCE, "auto: no named calibration is measured for this model (by its file sha256), so the source's values apply"
