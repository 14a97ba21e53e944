"""The five generation phases shared by the pilot and every scale shard, their settings, and the one
function that turns a folder into a finished run (`generate_into_folder`).

1 the base model continues few-shot numbered lists (new instructions); 2 pre-filters (length, a
keyword blacklist of tasks a text model cannot do, non-text), duplicate removal against the whole
pool and the instruction critic; 3 `num_candidates` responses per instruction, generated with the
response template (`response_v4`: after hand-written demonstrations); 4 every candidate scored, the
critic signals proven on a probe (the pilot's first round), the best passing candidate judged
(`utils.response_selection`; a candidate of an instruction that asks for a list must be one,
`utils.list_answers`); 5 a list request's kept answer written one item per line, and a seeded
fraction of the other accepted pairs relabeled with verifiable constraints (`utils.constraint_data`); then QC.
Each phase appends typed records (`utils.records`) to its own JSONL in the folder, keyed by
candidate id, so a killed run resumes where it stopped with no record lost or written twice. Work
proceeds in rounds until `count` pairs are accepted (or `max_rounds` is reached); a round's size
depends only on earlier rounds. A pilot whose probe finds no discriminating signal stops after its
first round and fails its gate.

Settings: every default lives once, in `Stage1Config`. A named calibration (`utils.calibration`)
changes some of them for a model; a flag changes one more and is recorded as an override. The
flags, their allowed ranges and the check of values read back from a manifest all come from
`TUNABLE_SETTINGS` and `CONFIG_RANGES` below.

A folder belongs to one run: `run_config.json` records its configuration and the model's identity
(content hashes: `provenance_helper.model_identity`, not the name the model was given). A rerun
with the same resumes; any other is refused (exit 2) naming each field that differs, both values.
The folder is claimed only once the model has loaded, so a start that failed on a bad `--model`
or `--dtype` leaves nothing that would refuse the corrected rerun.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .cli_validation import Range, check_values, in_range, non_negative_int, positive_float, positive_int, probability
from .completion_prompts import (
    DEFAULT_RESPONSE_TEMPLATE,
    PROMPT_VERSIONS,
    RESPONSE_TEMPLATES,
    SEED_INSTRUCTIONS,
    CompletionStylePrompts,
    check_demonstrations,
    demonstrations_fingerprint,
)
from .constraint_data import (
    constrain_accepted,
    constraint_summary,
    family_names,
    generated_constraint_pass_rates,
    generated_constraints,
    selected_for_constraints,
)
from .constraints import CATALOGUE_VERSION, TRAINED_FAMILIES
from .critic_probe import DEFAULT_MIN_AUC
from .dedup import NearDuplicateIndex
from .exit_codes import BadInputError
from .generation import GenerationEngine, SamplingParams
from .instruction_critic import InstructionCritic
from .jsonl_io import JsonlAppender, check_output_file
from .list_answers import requested_list
from .prompt_guards import contains_chat_marker, encode_continuation
from .provenance_helper import MODEL_IDENTITY_KEYS, model_identity, read_manifest, same_model
from .qc import QC_THRESHOLD_RANGES, QC_THRESHOLDS, compute_qc
from .records import CandidateRecord, InstructionRecord, ResponseRecord, SFTExampleRecord, count_pairs, is_pair, unique_by_id, variant_id
from .response_selection import CriticSignals, candidate_key, judge_instructions, measure_signals, score_candidates

__all__ = ["Stage1Config", "PHASE_FILES", "SFT_DATA_FILE", "RUN_CONFIG_FILE", "BLACKLIST_KEYWORDS", "blacklisted_keyword",
           "prefilter_instruction", "run_stage1_generation", "generate_instruction_candidates", "filter_and_judge_instructions",
           "Setting", "TUNABLE_SETTINGS", "CONFIG_RANGES", "setting_value", "with_settings", "apply_flags", "pilot_config",
           "scale_config", "config_from_dict", "config_from_manifest", "add_generation_arguments", "DefaultsHelpFormatter",
           "describe_differences", "check_run_identity", "claim_output_dir", "check_output_path", "GenerationJob",
           "generate_into_folder"]

PHASE_FILES = {"candidates": "phase1_candidates.jsonl", "instructions": "phase2_instructions.jsonl",
               "responses": "phase3_responses.jsonl", "scored": "phase4_scored_responses.jsonl",
               "judged": "phase4_judged.jsonl", "constrained": "phase5_constrained.jsonl"}
SFT_DATA_FILE = "sft_data.jsonl"
RUN_CONFIG_FILE = "run_config.json"
_URL = re.compile(r"https?://|www\.|\.com\b", re.IGNORECASE)
# Self-Instruct's filter: tasks a text-only model cannot do (see or make images, sound, files, links,
# or act in a browser). Whole words with their inflections, so "photosynthesis" or "paragraph" pass.
BLACKLIST_KEYWORDS = ("image", "picture", "photo", "draw", "diagram", "chart", "graph", "video", "audio", "sound recording",
                      "file", "upload", "download", "attach", "URL", "link", "website", "go to", "click")
_BLACKLIST = re.compile(
    r"\b(images?|pictures?|photos?|photographs?|draw(?:s|ing|ings|n)?|diagrams?|charts?|graphs?|videos?|audio|"
    r"sound recordings?|files?|upload(?:s|ed|ing)?|download(?:s|ed|ing)?|attach(?:es|ed|ing|ment|ments)?|urls?|"
    r"links?|websites?|go to|click(?:s|ed|ing)?)\b", re.IGNORECASE)


@dataclass
class Stage1Config:
    """Every default of the generation stages (DESIGN.md's, from the source)."""

    count: int = 100
    seed: int = 42
    instruction: SamplingParams = field(default_factory=lambda: SamplingParams(0.7, 0.9, 1.1, 48))
    response_template: str = DEFAULT_RESPONSE_TEMPLATE
    # The source's 80-token cap was set for answers cut at a blank line; it follows the template
    # (RESPONSE_TEMPLATES[...].default_max_new_tokens) unless set.
    response: SamplingParams = field(default_factory=lambda: SamplingParams(
        0.3, 0.85, 1.15, RESPONSE_TEMPLATES[DEFAULT_RESPONSE_TEMPLATE].default_max_new_tokens))
    num_candidates: int = 1
    confidence_threshold: float = 1.0
    label_swap: bool = False
    relevance_min: float = 0.0
    min_signal_auc: float = DEFAULT_MIN_AUC
    constraint_fraction: float = 0.3
    generated_constraint_fraction: float = 0.3
    constraint_variants: int = 0
    list_answers: bool = True
    constraint_families: list = field(default_factory=lambda: list(TRAINED_FAMILIES))
    num_examples: int = 5
    min_words: int = 3
    max_words: int = 60
    near_duplicate_threshold: float = 0.7
    first_round_oversample: float = 3.0
    max_rounds: int = 6
    qc_thresholds: dict = field(default_factory=lambda: dict(QC_THRESHOLDS))

    def as_dict(self) -> dict:
        return asdict(self)


# -- settings: the one table behind the flags, calibrations, overrides and manifest checks ----
@dataclass(frozen=True)
class Setting:
    """A setting a flag or a calibration may change: where it sits in `Stage1Config.as_dict()`,
    what it may be (a Range; None: an on/off switch; a tuple: one of those names; or a checker
    with `problem`/`describe`, such as `constraint_data.family_names`) and what it does. A
    `pilot_only` setting has no flag in the scale stage (its effect is the pilot's verdict)."""

    path: tuple[str, ...]
    allowed: object
    help: str
    pilot_only: bool = False

    @property
    def name(self) -> str:
        """The flag's dest, and the key in a manifest's `overrides` and a calibration's `values`."""
        return f"qc_{self.path[1]}" if self.path[0] == "qc_thresholds" else "_".join(self.path)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


_SAMPLING_SETTINGS = {
    "temperature": (in_range(float, 0), "sampling temperature (0 = greedy decoding)"),
    "top_p": (in_range(float, 0, 1, low_open=True), "nucleus top-p"),
    "repetition_penalty": (positive_float, "repetition penalty (1 = none)"),
    "max_new_tokens": (positive_int, "token budget (using it all counts as a token-limit hit)"),
}
TUNABLE_SETTINGS = (
    *(Setting((part, name), allowed, f"{text} of {part}s") for part in ("instruction", "response")
      for name, (allowed, text) in _SAMPLING_SETTINGS.items()),
    Setting(("response_template",), tuple(RESPONSE_TEMPLATES),
            "how responses are generated: response_v4 (and the shorter response_v3) put hand-written demonstrations "
            "before the instruction (its answer ends at an end marker; lists and paragraphs survive), response_v2 is "
            "the bare prompt cut at a blank line; "
            "training and evaluation always use the bare prompt; changes the response token cap to the template's "
            "unless --response-max-new-tokens is given"),
    Setting(("num_candidates",), positive_int, "responses sampled per instruction; the best passing one is kept, all are saved"),
    Setting(("confidence_threshold",), in_range(float), "critic log-prob margin log P(A) - log P(B) needed to accept"),
    Setting(("label_swap",), None, "ask each instruction-critic item twice with A/B swapped and average the margins (the "
                                   "pair critic always asks both ways; its probe decides which reading is trusted)"),
    Setting(("relevance_min",), in_range(float), "per-token log p(response|instruction) - log p(response) a pair must "
                                                 "exceed, where relevance is a trusted signal"),
    Setting(("min_signal_auc",), probability, "probe ROC AUC a critic signal needs to accept or rank pairs", pilot_only=True),
    Setting(("constraint_fraction",), probability, "fraction of accepted pairs relabeled with verifiable constraints"),
    Setting(("generated_constraint_fraction",), probability,
            "fraction of accepted instructions answered under sampled constraints (candidates that fail a checker are "
            "rejected; the rest are relabeled at --constraint-fraction)"),
    Setting(("constraint_variants",), non_negative_int,
            "relabeled copies added per accepted pair (not the list answers or those answered under constraints), each with "
            "constraints drawn afresh: more constrained examples per family from the same answers (ids <pair id>~v<j>)"),
    Setting(("list_answers",), None, "an instruction that asks for a list gets one: its candidates that are neither a line list "
                                     "nor an inline enumeration are filtered (not_a_list), and the kept answer is written one item "
                                     "per line with the asked number of items, checked (constraint mode list_format)"),
    Setting(("constraint_families",), family_names, "constraint families the relabeling may use (trained families only)"),
    Setting(("max_rounds",), positive_int, "generation rounds allowed to reach the count"),
    *(Setting(("qc_thresholds", key), allowed, f"QC gate {key}") for key, allowed in QC_THRESHOLD_RANGES.items()),
)
_SETTINGS_BY_NAME = {setting.name: setting for setting in TUNABLE_SETTINGS}
# Every numeric field of a config, by dotted path: what a config read back from a manifest must satisfy.
CONFIG_RANGES = {
    **{".".join(s.path): s.allowed for s in TUNABLE_SETTINGS if isinstance(s.allowed, Range)},
    "count": positive_int, "seed": non_negative_int, "num_examples": positive_int, "min_words": positive_int,
    "max_words": positive_int, "near_duplicate_threshold": probability, "first_round_oversample": positive_float,
}


def setting_value(config: Stage1Config, setting: Setting):
    node = config.as_dict()
    for key in setting.path:
        node = node[key]
    return node


def with_settings(config: Stage1Config, values: dict) -> Stage1Config:
    """A copy of `config` with settings (by `Setting.name`) replaced."""
    data = config.as_dict()
    for name, value in values.items():
        *parents, leaf = _SETTINGS_BY_NAME[name].path
        node = data
        for key in parents:
            node = node[key]
        node[leaf] = value
    return config_from_dict(data)


def apply_flags(config: Stage1Config, args) -> tuple[Stage1Config, dict]:
    """`config` with every setting flag that was given; returns it and the overrides
    ({name: {"from": value before, "to": flag value}}) for flags that changed something.

    A new response template brings its own token cap unless the cap is given too (or was set to
    something other than the old template's): recorded as an override "because" of the template.
    """
    values, overrides = {}, {}
    for setting in TUNABLE_SETTINGS:
        value = getattr(args, setting.name, None)
        current = setting_value(config, setting)
        if value is not None and value != current:
            values[setting.name] = value
            overrides[setting.name] = {"from": current, "to": value}
    if "response_template" in values and "response_max_new_tokens" not in values:
        old_cap = RESPONSE_TEMPLATES[config.response_template].default_max_new_tokens
        new_cap = RESPONSE_TEMPLATES[values["response_template"]].default_max_new_tokens
        if config.response.max_new_tokens == old_cap != new_cap:
            values["response_max_new_tokens"] = new_cap
            overrides["response_max_new_tokens"] = {"from": old_cap, "to": new_cap, "because": "--response-template"}
    return with_settings(config, values), overrides


def pilot_config(args, calibration) -> tuple[Stage1Config, dict]:
    """The pilot's configuration: Stage1Config's defaults, the calibration's values over them, the flags over those."""
    base = with_settings(replace(Stage1Config(), count=args.count, seed=args.seed), calibration.values)
    return apply_flags(base, args)


def scale_config(pilot_manifest: dict, args, source: str) -> tuple[Stage1Config, dict]:
    """The scale stage's configuration: the pilot's validated one (checked like a flag would be),
    with --count, --seed when given, and the setting flags as recorded overrides. Pure: `args` is
    not changed."""
    base = config_from_manifest(pilot_manifest.get("config"), source)
    base = replace(base, count=args.count, seed=base.seed if args.seed is None else args.seed)
    return apply_flags(base, args)


def config_from_dict(data: dict) -> Stage1Config:
    data = dict(data)
    data["instruction"] = SamplingParams(**data["instruction"])
    data["response"] = SamplingParams(**data["response"])
    return Stage1Config(**data)


def config_from_manifest(data, source: str) -> Stage1Config:
    """A config read back from a manifest, refused (BadInputError, exit 2, naming `source` and the
    field) where a field is missing, unknown or outside the range its flag allows."""
    where = f"{source}: config"
    if not isinstance(data, dict):
        raise BadInputError(f"{where}: expected an object, got {type(data).__name__}")
    shapes = {"": (data, Stage1Config().as_dict())}
    for part in ("instruction", "response", "qc_thresholds"):
        if isinstance(data.get(part), dict):
            shapes[f"{part}."] = (data[part], Stage1Config().as_dict()[part])
    for prefix, (given, expected) in shapes.items():
        missing, unknown = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
        if missing or unknown:
            raise BadInputError(f"{where}: " + "; ".join(
                [f"missing field(s) {', '.join(prefix + k for k in missing)}"] * bool(missing) +
                [f"unknown field(s) {', '.join(prefix + k for k in unknown)}"] * bool(unknown)))
        for key, value in given.items():
            if isinstance(expected[key], dict) and not isinstance(value, dict):
                raise BadInputError(f"{where}: {prefix}{key}: expected an object, got {value!r}")
    if not isinstance(data["label_swap"], bool):
        raise BadInputError(f"{where}: label_swap: got {data['label_swap']!r}, expected true or false")
    if data["response_template"] not in RESPONSE_TEMPLATES:
        raise BadInputError(f"{where}: response_template: got {data['response_template']!r}, expected one of "
                            f"{', '.join(RESPONSE_TEMPLATES)}")
    problem = family_names.problem(data["constraint_families"])
    if problem:
        raise BadInputError(f"{where}: constraint_families: {problem}")
    flat = {path: _dotted(data, path) for path in CONFIG_RANGES}
    check_values(flat, CONFIG_RANGES, where)
    return config_from_dict(data)


def _dotted(data: dict, path: str):
    for key in path.split("."):
        data = data[key]
    return data


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where it is None: there the help says where the value comes from."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def add_generation_arguments(parser: argparse.ArgumentParser, inherited_from: str | None = None) -> None:
    """The tunable settings as flags, each checked against its range at parse time (exit 2 naming it).

    Every default is None, so an explicit flag can be told from a value taken elsewhere: from the
    calibration over Stage1Config (the pilot) or from `inherited_from` (the scale stage's pilot manifest).
    """
    defaults = Stage1Config()
    groups = {"generation": parser.add_argument_group("generation settings"),
              "qc": parser.add_argument_group("QC thresholds (the gate)")}
    for setting in TUNABLE_SETTINGS:
        if setting.pilot_only and inherited_from:
            continue
        group = groups["qc" if setting.path[0] == "qc_thresholds" else "generation"]
        default = setting_value(defaults, setting)
        shown = ",".join(default) if isinstance(default, list) else default
        source = inherited_from or f"{shown}, or the calibration's value"
        if setting.allowed is None:
            group.add_argument(setting.flag, action=argparse.BooleanOptionalAction, default=None,
                               help=f"{setting.help} (default: {source})")
        elif isinstance(setting.allowed, tuple):
            group.add_argument(setting.flag, choices=setting.allowed, default=None, help=f"{setting.help} (default: {source})")
        else:
            metavar = getattr(setting.allowed, "metavar", None) or setting.allowed.kind.__name__.upper()
            group.add_argument(setting.flag, type=setting.allowed, default=None, metavar=metavar,
                               help=f"{setting.help}; {setting.allowed.describe()} (default: {source})")
    parser.add_argument("--compile", action="store_true",
                        help="GPU only: torch.compile the decode step and the critic's forward pass; each new batch shape "
                             "first compiles (35-45 s on an H100), so it pays off on long runs of one model")


# -- the folder: checked early, claimed once the model has loaded -----------------------------
_ABSENT = object()


def _shown(value) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value, sort_keys=True)


def describe_differences(old, new, prefix: str = "") -> list[str]:
    """One "path: old -> new" line per differing leaf, nested keys joined by dots."""
    if isinstance(old, dict) and isinstance(new, dict):
        lines = []
        for key in sorted(set(old) | set(new), key=str):
            lines += describe_differences(old.get(key, _ABSENT), new.get(key, _ABSENT), f"{prefix}.{key}" if prefix else str(key))
        return lines
    return [] if old == new else [f"{prefix}: {_shown(old)} -> {_shown(new)}"]


def _model_differences(old, new) -> list[str]:
    old = model_identity(old if isinstance(old, dict) else {})
    new = model_identity(new if isinstance(new, dict) else {})
    if same_model(old, new):
        return []  # the same weights under another name or path: a resume
    keys = (*MODEL_IDENTITY_KEYS, "model_id")
    return describe_differences({k: old[k] for k in keys}, {k: new[k] for k in keys}, "model")


def check_run_identity(folder: Path, identity: dict) -> bool:
    """Whether `folder` already holds a run of this identity (a resume: True) or none (False);
    BadInputError naming every field that differs otherwise. Only the keys of `identity` are
    compared; "model" by `same_model` (content hashes)."""
    path = Path(folder) / RUN_CONFIG_FILE
    if not path.exists():
        return False
    try:
        existing = read_manifest(path)
    except (OSError, BadInputError) as err:
        raise BadInputError(f"{path} is unreadable ({err}); use a new --output") from None
    new = json.loads(json.dumps(identity))
    differences = []
    for key, value in new.items():
        if key == "model":
            differences += _model_differences(existing.get(key), value)
        else:
            differences += describe_differences(existing.get(key, _ABSENT), value, key)
    if differences:
        raise BadInputError(f"{folder} holds a run with a different configuration (differs in: {'; '.join(differences)}); "
                            "use a new --output, or the same settings and model to resume")
    return True


def claim_output_dir(folder: Path, identity: dict) -> bool:
    """Record what `folder` is being made with, or check it against what it was made with.
    Returns True when the folder already held work of the same identity (a resume)."""
    from .provenance_helper import write_manifest_atomic

    if check_run_identity(folder, identity):
        return True
    Path(folder).mkdir(parents=True, exist_ok=True)
    write_manifest_atomic(Path(folder) / RUN_CONFIG_FILE, identity)
    return False


def check_output_path(path: Path, flag: str, kind: str) -> None:
    """BadInputError (exit 2) now, before any work, for an output that could never be written as
    `kind` ("file" or "folder"): a folder where a file goes, a file where a folder goes, or a
    path below a file."""
    path = Path(path)
    if kind == "folder" and path.exists():
        if not path.is_dir():
            raise BadInputError(f"{flag} {path} is a file; it must name a folder")
        return
    try:
        check_output_file(path)  # for a folder not made yet: that each existing parent is a folder
    except BadInputError as err:
        raise BadInputError(f"{flag} {err}") from None


# -- one run into one folder: the pilot's, or one scale shard's --------------------------------
@dataclass(frozen=True)
class GenerationJob:
    stage: str  # the manifest's "stage": "pilot" or "scale_shard"
    folder: Path
    config: Stage1Config
    manifest_name: str
    log_prefix: str
    key_prefix: str = ""
    inputs: dict = field(default_factory=dict)  # role -> path, hashed into the manifest
    manifest_extra: dict = field(default_factory=dict)  # calibration, overrides, shard facts, ...
    # A scale shard's: the pilot's verdict on its critic signals. None: the run measures its own (the pilot).
    critic_signals: CriticSignals | None = None

    def identity(self, provenance: dict) -> dict:
        """What the folder's run is: its config, the model's identity and dtype, its key prefix, and
        the critic signals it was given (a pilot rerun with another verdict cannot finish its shards)."""
        identity = {"config": self.config.as_dict(), "model": model_identity(provenance), "dtype": provenance.get("dtype"),
                    "key_prefix": self.key_prefix}
        if self.critic_signals is not None:
            identity["critic_signals"] = {"trusted": list(self.critic_signals.trusted), "rank_by": self.critic_signals.rank_by}
        return identity


def generate_into_folder(job: GenerationJob, loaded: tuple, args, *, batch_size: int, show_progress: bool,
                         compile: bool = False) -> dict:
    """Claim the folder, run (or resume) the phases, write the accepted pairs and then the manifest.

    `loaded` is the loader's (model, tokenizer, provenance). Returns {"qc", "records", "data_path",
    "manifest_path"}.
    """
    from .jsonl_io import write_jsonl_atomic
    from .provenance_helper import create_session_manifest, write_manifest_atomic
    from .qc import format_qc_table

    model, tokenizer, provenance = loaded
    folder, config = Path(job.folder), job.config
    if RESPONSE_TEMPLATES[config.response_template].demonstrations:
        check_demonstrations(tokenizer, config.response_template)  # before the folder is claimed: a refused start leaves nothing behind
    resumed = claim_output_dir(folder, job.identity(provenance))
    print(f"{job.log_prefix} {'resuming' if resumed else 'starting'} ({config.count} pairs, seed {config.seed}) in {folder}",
          flush=True)
    manifest_path = folder / job.manifest_name
    manifest_path.unlink(missing_ok=True)  # a manifest on disk vouches for the data beside it, which is about to change
    start = time.time()
    result = run_stage1_generation(model, tokenizer, config, folder, batch_size=batch_size, show_progress=show_progress,
                                   key_prefix=job.key_prefix, compile=compile, critic_signals=job.critic_signals)
    data_path = folder / SFT_DATA_FILE
    write_jsonl_atomic(data_path, result["final"])
    qc = result["qc"]
    pairs = count_pairs(result["final"])
    if pairs < config.count:
        qc["shortfall"] = f"{pairs} accepted of {config.count} asked after {config.max_rounds} rounds"
    outputs = {"data": data_path, "judged": folder / PHASE_FILES["judged"], "scored_responses": folder / PHASE_FILES["scored"]}
    if (folder / "probe.json").exists():
        outputs["probe"] = folder / "probe.json"
    prompt_versions = {**PROMPT_VERSIONS, "response_generation": config.response_template}
    if RESPONSE_TEMPLATES[config.response_template].demonstrations:
        prompt_versions["demonstrations_sha256"] = demonstrations_fingerprint(config.response_template)
    manifest = create_session_manifest(
        job.stage, args, outputs=outputs, inputs=job.inputs, qc=qc, config=config.as_dict(), prompt_versions=prompt_versions,
        model_provenance=provenance, phase_counts=result["phase_counts"], wall_seconds=round(time.time() - start, 1),
        resumed=resumed, records=len(result["final"]), critic_signals=result["critic_signals"],
        phase_seconds=result["phase_seconds"], phase_peak_gpu_gib=result["phase_peak_gpu_gib"],
        constraint_catalogue_version=CATALOGUE_VERSION, **job.manifest_extra)
    write_manifest_atomic(manifest_path, manifest)
    print(format_qc_table(qc))
    counts = result["phase_counts"]
    if counts["generated_constraint_candidates"]:
        print(f"answered under constraints: {counts['generated_constraint_instructions']} instructions; candidates passing per family: "
              + ", ".join(f"{family} {counts['generated_constraint_passed'][family]}/{n}"
                          for family, n in counts["generated_constraint_candidates"].items()))
    return {"qc": qc, "records": len(result["final"]), "data_path": data_path, "manifest_path": manifest_path}


# -- the phases --------------------------------------------------------------------------------
def blacklisted_keyword(text: str) -> str | None:
    """The first blacklisted word of `text` (as written there), or None."""
    match = _BLACKLIST.search(text)
    return match.group(0) if match else None


def prefilter_instruction(text: str, finish_reason: str, examples: list[str], config: Stage1Config) -> str | None:
    """The reason a candidate is dropped before the critic, or None if it passes."""
    words = text.split()
    if finish_reason == "length":
        return "unfinished"
    if len(words) < config.min_words:
        return "too_short"
    if len(words) > config.max_words:
        return "too_long"
    letters = sum(ch.isalpha() for ch in text)
    if letters < 0.6 * len(text.replace(" ", "")) or not text[0].isalnum() or _URL.search(text):
        return "non_text"
    if CompletionStylePrompts.has_delimiter_leak(text):
        return "contains_delimiter"
    if contains_chat_marker(text):
        return "chat_marker"
    if blacklisted_keyword(text):
        return "blacklisted_keyword"
    if any(text.strip().lower() == ex.lower() for ex in examples):
        return "copy_of_example"
    return None


def run_stage1_generation(model, tokenizer, config: Stage1Config, out_dir: Path, batch_size: int = 16,
                          show_progress: bool = True, key_prefix: str = "", compile: bool = False,
                          critic_signals: CriticSignals | None = None) -> dict:
    """Run (or resume) the phases; returns {"final": SFT example dicts, "qc": summary, "phase_counts": counts,
    "critic_signals": the verdict used}. Without `critic_signals` (the pilot) the first round's probe decides them."""
    import torch

    out_dir = Path(out_dir)
    engine = GenerationEngine(model, tokenizer, batch_size=batch_size, seed=config.seed, show_progress=show_progress,
                              compile=compile)
    critic = InstructionCritic(model, tokenizer, batch_size=batch_size, confidence_threshold=config.confidence_threshold,
                               label_swap=config.label_swap, show_progress=show_progress, compile=compile)
    files = {name: JsonlAppender(out_dir / file_name) for name, file_name in PHASE_FILES.items()}
    phase_seconds: dict[str, float] = {}
    phase_peak_gib: dict[str, float] = {}
    gpu = model.device if getattr(model, "device", None) is not None and model.device.type == "cuda" else None

    @contextlib.contextmanager
    def timed(phase: str):
        if gpu is not None:
            torch.cuda.reset_peak_memory_stats(gpu)
        start = time.perf_counter()
        try:
            yield
        finally:
            phase_seconds[phase] = phase_seconds.get(phase, 0.0) + time.perf_counter() - start
            if gpu is not None:  # what a process sharing the GPU has to leave room for
                peak = torch.cuda.max_memory_reserved(gpu) / 2**30
                phase_peak_gib[phase] = max(phase_peak_gib.get(phase, 0.0), peak)

    try:
        for round_index in range(config.max_rounds):
            accepted_before = sum(r["accepted"] for r in _records(files["judged"]) if r["round"] < round_index)
            need = config.count - accepted_before
            if need <= 0:
                break
            earlier_candidates = sum(r["round"] < round_index for r in _records(files["candidates"]))
            yield_so_far = accepted_before / earlier_candidates if earlier_candidates else 0.0
            # A round never asks for more than 12.5x what is missing, so a near-zero yield fails in
            # bounded time instead of generating thousands of candidates.
            factor = config.first_round_oversample if round_index == 0 else 1.25 / max(yield_so_far, 0.1)
            n_candidates = max(1, math.ceil(need * factor))
            keys = [f"{key_prefix}r{round_index:02d}-{i:05d}" for i in range(n_candidates)]
            with timed("instructions"):
                generate_instruction_candidates(engine, files["candidates"], keys, round_index, config)
            with timed("instruction_filters_and_critic"):
                filter_and_judge_instructions(critic, files, keys, config)
            generated = _generated_constraints(files, keys, config)
            list_requests = _list_requests(files, keys, config, generated)
            with timed("responses"):
                _phase3(engine, tokenizer, files, keys, config, generated)
            with timed("response_scoring"):
                # Until the probe has spoken (the pilot's first round) every signal is computed; after it, an
                # untrusted A/B critic decides nothing, so it is not asked.
                ask_pair_critic = critic_signals is None or any(name.startswith("ab_") for name in critic_signals.trusted)
                score_candidates(critic, files, keys, config, {key: constraints for key, (_, _, constraints) in generated.items()},
                                 list_requests, pair_critic=ask_pair_critic)
            if critic_signals is None:
                with timed("probe"):
                    critic_signals = measure_signals(critic, out_dir, _records(files["scored"]), config)
                print(f"[probe] critic signal AUCs {critic_signals.aucs}; trusted: {list(critic_signals.trusted) or 'none'}",
                      flush=True)
            if not critic_signals.trusted:
                break  # nothing may accept a pair: the gate fails with the probe's verdict
            with timed("judging_and_constraints"):
                judge_instructions(files, keys, critic_signals, config)
                constrain_accepted(files, keys, config, tokenizer, generated, list_requests)
    finally:
        for appender in files.values():
            appender.close()
        # The kept decoders reference the engine through their stop check, so without this their KV caches and graph
        # pools would wait for a garbage collection while the next shard in this process runs (docs/measurements.md,
        # "Two scale ranks on one GPU").
        engine.release()
    summary = _summarize(files, config, critic_signals)
    # Seconds of this invocation only (a resumed run counts what it did itself); where a stage's time goes.
    summary["phase_seconds"] = {name: round(seconds, 1) for name, seconds in phase_seconds.items()}
    summary["phase_peak_gpu_gib"] = {name: round(gib, 2) for name, gib in phase_peak_gib.items()}
    summary["phase_counts"].update(prefill_tokens=engine.prefill_tokens, prefill_tokens_saved_by_shared_prefix=engine.prefix_tokens_saved,
                                   sampling_misses=engine.sampling_misses)
    return summary


def _records(appender: JsonlAppender) -> list[dict]:
    return unique_by_id(appender.records)


def generate_instruction_candidates(engine: GenerationEngine, appender: JsonlAppender, keys: list[str], round_index: int,
                                    config: Stage1Config) -> None:
    """Phase 1: a candidate instruction for each key not on disk yet, from a seeded few-shot list (Stage 2 reuses it)."""
    todo, examples_by_key = [], {}
    for key in keys:
        if key in appender:
            continue
        prompt, examples = CompletionStylePrompts.create_instruction_generation_prompt(
            random.Random(f"{config.seed}:{key}"), config.num_examples)
        examples_by_key[key] = examples
        todo.append((key, prompt))
    stops = CompletionStylePrompts.instruction_stop_strings(config.num_examples)

    def save(result) -> None:
        appender.append(CandidateRecord(
            id=result.key, round=round_index, raw_instruction=result.text,
            instruction=CompletionStylePrompts.clean_generated_instruction(result.text), finish_reason=result.finish_reason,
            n_generated_tokens=result.n_generated_tokens, examples=examples_by_key[result.key],
            prompt_version=PROMPT_VERSIONS["instruction_generation"]).to_dict())

    engine.generate(todo, config.instruction, stops, on_result=save, description="phase 1 instructions")


def filter_and_judge_instructions(critic: InstructionCritic, files: dict, keys: list[str], config: Stage1Config) -> None:
    """Phase 2: the cheap filters, near-duplicates against the pool, then the instruction critic (Stage 2 reuses it)."""
    index = NearDuplicateIndex(config.near_duplicate_threshold)
    for i, text in enumerate(SEED_INSTRUCTIONS):
        index.add(f"seed-{i}", text)
    for record in sorted(_records(files["instructions"]), key=lambda r: r["id"]):
        if record["filter"] is None:
            index.add(record["id"], record["instruction"])
    candidates = {r["id"]: r for r in _records(files["candidates"])}
    survivors, verdicts = [], {}
    for key in keys:  # in id order, so "first one wins" is deterministic
        if key in files["instructions"] or key not in candidates:
            continue
        cand = candidates[key]
        reason = prefilter_instruction(cand["instruction"], cand["finish_reason"], cand["examples"], config)
        if reason is None:
            kind, match = index.find(cand["instruction"])
            if kind != "new":
                reason = "copy_of_seed" if match.startswith("seed-") else f"{kind}_duplicate"
        verdicts[key] = reason
        if reason is None:
            index.add(key, cand["instruction"])
            survivors.append(key)
    judged = critic.critique_instructions_batch([candidates[k]["instruction"] for k in survivors])
    decisions = dict(zip(survivors, judged, strict=True))
    for key, reason in verdicts.items():
        decision = decisions.get(key)
        files["instructions"].append(InstructionRecord(
            id=key, round=candidates[key]["round"], instruction=candidates[key]["instruction"], filter=reason,
            instruction_critic=decision, accepted=bool(decision and decision["accepted"])).to_dict())


def _generated_constraints(files: dict, keys: list[str], config: Stage1Config) -> dict[str, tuple[str, str, list[dict]]]:
    """Accepted instruction id -> (its task, the constrained instruction, the constraints its answers are
    written under) for the chosen fraction; recomputed from the seed and ids alone, so every phase and a resumed run agree."""
    wanted = set(keys)
    chosen = {}
    for record in _records(files["instructions"]):
        key = record["id"]
        if record["accepted"] and key in wanted and selected_for_constraints(
                config.seed, f"generated:{key}", config.generated_constraint_fraction):
            drawn = generated_constraints(config.seed, key, record["instruction"], config.constraint_families)
            if drawn is not None:
                chosen[key] = (record["instruction"], *drawn)
    return chosen


def _list_requests(files: dict, keys: list[str], config: Stage1Config, generated: dict) -> dict:
    """Accepted instruction id -> the list it asks for (`list_answers.requested_list`), where
    `list_answers` is on; instructions answered under sampled constraints keep only those."""
    if not config.list_answers:
        return {}
    wanted, requests = set(keys), {}
    for record in _records(files["instructions"]):
        if record["accepted"] and record["id"] in wanted and record["id"] not in generated:
            request = requested_list(record["instruction"])
            if request is not None:
                requests[record["id"]] = request
    return requests


def _phase3(engine: GenerationEngine, tokenizer, files: dict, keys: list[str], config: Stage1Config,
            generated: dict[str, tuple[str, str, list[dict]]]) -> None:
    """`num_candidates` responses per accepted instruction, each its own record (`<id>-c<j>`); an
    instruction in `generated` is answered with its constraints appended."""
    wanted = set(keys)
    template = config.response_template
    accepted = {r["id"]: r for r in _records(files["instructions"]) if r["accepted"] and r["id"] in wanted}
    for key, (_, instruction, _) in generated.items():
        accepted[key] = {**accepted[key], "instruction": instruction}
    owner, todo = {}, []
    for key, record in sorted(accepted.items()):
        prompt = CompletionStylePrompts.create_generation_response_prompt(record["instruction"], template)
        for index in range(config.num_candidates):
            candidate = candidate_key(key, index)
            owner[candidate] = (key, index)
            if candidate not in files["responses"]:
                todo.append((candidate, prompt))

    def save(result) -> None:
        cleaned = CompletionStylePrompts.clean_response(result.text, template)
        n_response_tokens = len(encode_continuation(tokenizer, CompletionStylePrompts.format_completion(cleaned.text))) if cleaned.text else 0
        key, index = owner[result.key]
        instruction = accepted[key]
        files["responses"].append(ResponseRecord(
            id=result.key, instruction_id=key, candidate_index=index, round=instruction["round"],
            instruction=instruction["instruction"], raw_response=result.text, response=cleaned.text, was_cut=cleaned.was_cut,
            finish_reason=result.finish_reason, n_generated_tokens=result.n_generated_tokens,
            n_response_tokens=n_response_tokens, prompt_version=template).to_dict())

    # Each candidate is sampled from its own key's seed, so the candidates of one instruction differ.
    engine.generate(todo, config.response, CompletionStylePrompts.response_stop_strings(template), on_result=save,
                    description="phase 3 responses")


def _summarize(files: dict, config: Stage1Config, critic_signals: CriticSignals | None) -> dict:
    judged = sorted(_records(files["judged"]), key=lambda r: r["id"])
    instructions = _records(files["instructions"])
    responses = _records(files["responses"])
    scored = _records(files["scored"])
    constrained = {r["id"]: r for r in _records(files["constrained"])}
    all_keys = [r["id"] for r in instructions]
    phase_counts = {
        "candidates": len(_records(files["candidates"])),
        "prefilter_and_dedup": dict(Counter(r["filter"] or "passed" for r in instructions)),
        "blacklisted_keywords": dict(Counter(blacklisted_keyword(r["instruction"]).lower() for r in instructions
                                             if r["filter"] == "blacklisted_keyword")),
        "instruction_critic_judged": sum(r["instruction_critic"] is not None for r in instructions),
        "instruction_critic_accepted": sum(r["accepted"] for r in instructions),
        "responses": len(responses),
        "empty_responses": sum(not r["response"] for r in responses),
        "response_candidates_scored": len(scored),
        "response_candidate_filters": dict(Counter(reason for r in scored for reason in r["filter_reasons"])),
        "judged_rejection_reasons": dict(Counter(reason for r in judged for reason in r["rejection_reasons"])),
        "constraint_selected": sum(is_pair(key) for key in constrained),
        "constraint_unconstrainable": sum(not r["constraints"] for key, r in constrained.items() if is_pair(key)),
        "constraint_variants": sum(bool(r["constraints"]) for key, r in constrained.items() if not is_pair(key)),
        "generated_constraint_instructions": len({r["instruction_id"] for r in scored if r.get("constraint_checks")}),
        "list_request_instructions": len(_list_requests(files, all_keys, config, _generated_constraints(files, all_keys, config))),
        "list_format_pairs": sum(r["constraint_mode"] == "list_format" for r in constrained.values()),
    }
    checks = generated_constraint_pass_rates(scored)
    phase_counts.update(generated_constraint_candidates=checks["candidates"], generated_constraint_passed=checks["passed"])
    judged_instr = phase_counts["instruction_critic_judged"]
    phase_counts["instruction_critic_acceptance_rate"] = phase_counts["instruction_critic_accepted"] / judged_instr if judged_instr else None
    generation = {"instruction": config.instruction.as_dict(), "response": config.response.as_dict()}
    accepted = [r for r in judged if r["accepted"]][: config.count]
    final = []
    for pair in accepted:
        final.append(SFTExampleRecord.from_judged(pair, constrained.get(pair["id"]), generation, config.seed).to_dict())
        for index in range(1, config.constraint_variants + 1):
            variant = constrained.get(variant_id(pair["id"], index))
            if variant and variant["constraints"]:  # a variant no constraint fitted would repeat the pair
                final.append(SFTExampleRecord.from_judged({**pair, "id": variant["id"]}, variant, generation, config.seed).to_dict())
    signals = critic_signals.as_record() if critic_signals is not None else None
    qc = compute_qc(judged, config.qc_thresholds, phase_counts, critic_signals=signals, constraints=constraint_summary(final),
                    candidates=scored)
    return {"final": final, "qc": qc, "phase_counts": phase_counts, "critic_signals": signals}
