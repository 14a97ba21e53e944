"""The five generation phases shared by the pilot and every scale shard.

1 the base model continues few-shot numbered lists (new instructions); 2 pre-filters, duplicate
removal and the instruction critic; 3 responses in completion form; 4 the pair critic; 5 QC.
Each phase appends to its own JSONL in `out_dir`, keyed by candidate id, so a killed run resumes
where it stopped with no record lost or written twice. Work proceeds in rounds until `count`
pairs are accepted (or `max_rounds` is reached); a round's size depends only on earlier rounds.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .clean_model_loader import contains_chat_marker, encode_continuation
from .completion_prompts import PROMPT_VERSIONS, SEED_INSTRUCTIONS, CompletionStylePrompts
from .dedup import NearDuplicateIndex
from .generation import GenerationEngine, SamplingParams
from .instruction_critic import InstructionCritic
from .jsonl_io import JsonlAppender
from .qc import compute_qc

__all__ = ["Stage1Config", "run_stage1_generation", "prefilter_instruction", "PHASE_FILES"]

PHASE_FILES = {"candidates": "phase1_candidates.jsonl", "instructions": "phase2_instructions.jsonl",
               "responses": "phase3_responses.jsonl", "judged": "phase4_judged.jsonl"}
_URL = re.compile(r"https?://|www\.|\.com\b", re.IGNORECASE)


@dataclass
class Stage1Config:
    count: int = 100
    seed: int = 42
    instruction: SamplingParams = field(default_factory=lambda: SamplingParams(0.7, 0.9, 1.1, 48))
    response: SamplingParams = field(default_factory=lambda: SamplingParams(0.3, 0.85, 1.15, 80))
    confidence_threshold: float = 1.0
    label_swap: bool = False
    num_examples: int = 5
    min_words: int = 3
    max_words: int = 60
    near_duplicate_threshold: float = 0.7
    first_round_oversample: float = 3.0
    max_rounds: int = 6
    qc_thresholds: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


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
    if any(text.strip().lower() == ex.lower() for ex in examples):
        return "copy_of_example"
    return None


def _round_of(key: str) -> int:
    return int(key[1:3])


def run_stage1_generation(model, tokenizer, config: Stage1Config, out_dir: Path, batch_size: int = 16,
                          show_progress: bool = True, key_prefix: str = "", compile: bool = False) -> dict:
    """Run (or resume) the phases; returns {"final": records, "qc": summary, "phase_counts": counts}."""
    out_dir = Path(out_dir)
    prompts = CompletionStylePrompts
    engine = GenerationEngine(model, tokenizer, batch_size=batch_size, seed=config.seed, show_progress=show_progress,
                              compile=compile)
    critic = InstructionCritic(model, tokenizer, batch_size=batch_size, confidence_threshold=config.confidence_threshold,
                               label_swap=config.label_swap, show_progress=show_progress, compile=compile)
    files = {name: JsonlAppender(out_dir / file_name) for name, file_name in PHASE_FILES.items()}
    try:
        for round_index in range(config.max_rounds):
            earlier = [r for r in files["judged"].records if _round_of(r["id"][len(key_prefix):]) < round_index]
            accepted_before = sum(r["pair_critic"]["accepted"] for r in earlier)
            need = config.count - accepted_before
            if need <= 0:
                break
            earlier_candidates = sum(_round_of(r["id"][len(key_prefix):]) < round_index for r in files["candidates"].records)
            yield_so_far = accepted_before / earlier_candidates if earlier_candidates else 0.0
            # A round never asks for more than 12.5x what is missing, so a near-zero yield fails in
            # bounded time instead of generating thousands of candidates.
            factor = config.first_round_oversample if round_index == 0 else 1.25 / max(yield_so_far, 0.1)
            n_candidates = max(1, math.ceil(need * factor))
            keys = [f"{key_prefix}r{round_index:02d}-{i:05d}" for i in range(n_candidates)]
            _phase1(engine, files["candidates"], keys, config)
            _phase2(critic, files, keys, config, key_prefix)
            _phase3(engine, tokenizer, files, keys, config)
            _phase4(critic, files, keys, config)
    finally:
        for appender in files.values():
            appender.close()
    return _summarize(files, config, tokenizer)


def _phase1(engine: GenerationEngine, appender: JsonlAppender, keys: list[str], config: Stage1Config) -> None:
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
        appender.append({"id": result.key, "raw": result.text, "finish_reason": result.finish_reason,
                         "instruction": CompletionStylePrompts.clean_generated_instruction(result.text),
                         "examples": examples_by_key[result.key]})

    engine.generate(todo, config.instruction, stops, on_result=save, description="phase 1 instructions")


def _phase2(critic: InstructionCritic, files: dict, keys: list[str], config: Stage1Config, key_prefix: str) -> None:
    index = NearDuplicateIndex(config.near_duplicate_threshold)
    for i, text in enumerate(SEED_INSTRUCTIONS):
        index.add(f"seed-{i}", text)
    for record in sorted(files["instructions"].records, key=lambda r: r["id"]):
        if record["filter"] is None:
            index.add(record["id"], record["instruction"])
    candidates = {r["id"]: r for r in files["candidates"].records}
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
    decisions = dict(zip(survivors, critic.critique_instructions_batch([candidates[k]["instruction"] for k in survivors])))
    for key, reason in verdicts.items():
        decision = decisions.get(key)
        files["instructions"].append({"id": key, "instruction": candidates[key]["instruction"], "filter": reason,
                                      "instruction_critic": decision, "accepted": bool(decision and decision["accepted"])})


def _phase3(engine: GenerationEngine, tokenizer, files: dict, keys: list[str], config: Stage1Config) -> None:
    wanted = set(keys)
    accepted = {r["id"]: r["instruction"] for r in files["instructions"].records if r["accepted"] and r["id"] in wanted}
    todo = [(key, CompletionStylePrompts.create_response_prompt(text)) for key, text in sorted(accepted.items())
            if key not in files["responses"]]

    def save(result) -> None:
        cleaned = CompletionStylePrompts.clean_response(result.text)
        files["responses"].append({
            "id": result.key, "instruction": accepted[result.key], "raw_response": result.text,
            "response": cleaned.text, "cleaner_cut": cleaned.was_cut, "finish_reason": result.finish_reason,
            "n_generated_tokens": result.n_generated_tokens,
            "n_tokens": len(encode_continuation(tokenizer, CompletionStylePrompts.format_completion(cleaned.text))) if cleaned.text else 0})

    engine.generate(todo, config.response, CompletionStylePrompts.response_stop_strings(), on_result=save,
                    description="phase 3 responses")


def _phase4(critic: InstructionCritic, files: dict, keys: list[str], config: Stage1Config) -> None:
    wanted = set(keys)
    todo = [r for r in sorted(files["responses"].records, key=lambda r: r["id"]) if r["id"] in wanted and r["id"] not in files["judged"]]
    judged_pairs = [r for r in todo if r["response"] and not contains_chat_marker(r["response"])]
    decisions = dict(zip([r["id"] for r in judged_pairs],
                         critic.critique_pairs_batch([(r["instruction"], r["response"]) for r in judged_pairs])))
    instruction_decisions = {r["id"]: r["instruction_critic"] for r in files["instructions"].records}
    for record in todo:
        reason = "empty_response" if not record["response"] else "chat_marker"
        decision = decisions.get(record["id"]) or {"accepted": False, "margin": None, "reason": reason}
        files["judged"].append({**record, "instruction_critic": instruction_decisions.get(record["id"]), "pair_critic": decision})


def _summarize(files: dict, config: Stage1Config, tokenizer) -> dict:
    judged = sorted(files["judged"].records, key=lambda r: r["id"])
    instructions = files["instructions"].records
    phase_counts = {
        "candidates": len(files["candidates"].records),
        "prefilter_and_dedup": dict(Counter(r["filter"] or "passed" for r in instructions)),
        "instruction_critic_judged": sum(r["instruction_critic"] is not None for r in instructions),
        "instruction_critic_accepted": sum(r["accepted"] for r in instructions),
        "responses": len(files["responses"].records),
        "empty_responses": sum(not r["response"] for r in files["responses"].records),
    }
    judged_instr = phase_counts["instruction_critic_judged"]
    phase_counts["instruction_critic_acceptance_rate"] = phase_counts["instruction_critic_accepted"] / judged_instr if judged_instr else None
    qc = compute_qc(judged, config.qc_thresholds, phase_counts)
    accepted = [r for r in judged if r["pair_critic"]["accepted"]][: config.count]
    final = [{"id": r["id"], "instruction": r["instruction"], "response": r["response"], "raw_response": r["raw_response"],
              "finish_reason": r["finish_reason"], "n_tokens": r["n_tokens"], "n_generated_tokens": r["n_generated_tokens"],
              "instruction_critic": r["instruction_critic"], "pair_critic": r["pair_critic"],
              "generation": {"instruction": config.instruction.as_dict(), "response": config.response.as_dict()},
              "seed": config.seed, "prompt_versions": dict(PROMPT_VERSIONS)} for r in accepted]
    return {"final": final, "qc": qc, "phase_counts": phase_counts}


# -- command-line plumbing shared by the pilot and the scale script ---------------------------
_PARAM_FLAGS = (
    ("instruction", "temperature", 0.7, "sampling temperature for new instructions"),
    ("instruction", "top_p", 0.9, "nucleus top-p for new instructions"),
    ("instruction", "repetition_penalty", 1.1, "repetition penalty for new instructions"),
    ("instruction", "max_new_tokens", 48, "token budget of one new instruction"),
    ("response", "temperature", 0.3, "sampling temperature for responses"),
    ("response", "top_p", 0.85, "nucleus top-p for responses"),
    ("response", "repetition_penalty", 1.15, "repetition penalty for responses"),
    ("response", "max_new_tokens", 80, "token budget of one response (hitting it counts as a token-limit hit)"),
)
GENERATION_PARAMETER_NAMES = [f"{group}_{name}" for group, name, _, _ in _PARAM_FLAGS] + ["confidence_threshold"]
__all__ += ["add_generation_arguments", "config_from_args", "config_from_dict", "claim_output_dir", "GENERATION_PARAMETER_NAMES"]


def add_generation_arguments(parser, defaults_from_pilot: bool = False) -> None:
    """The nine tunable parameters (with DESIGN.md's defaults) and the QC thresholds.

    With `defaults_from_pilot`, every default is None so the caller can tell an explicit override
    from a value to take from the pilot manifest.
    """
    from .qc import QC_THRESHOLDS

    group = parser.add_argument_group("generation parameters")
    for part, name, default, help_text in _PARAM_FLAGS:
        kind = int if name == "max_new_tokens" else float
        group.add_argument(f"--{part}-{name.replace('_', '-')}", type=kind, default=None if defaults_from_pilot else default,
                           help=f"{help_text} (default {default}{', or the pilot' + chr(39) + 's' if defaults_from_pilot else ''})")
    group.add_argument("--confidence-threshold", type=float, default=None if defaults_from_pilot else 1.0,
                       help="critic log-prob margin log P(A) - log P(B) needed to accept (default 1.0)")
    parser.add_argument("--compile", action="store_true",
                        help="GPU only: torch.compile the decode step and the critic's forward pass; each new batch shape "
                             "first compiles (35-45 s on an H100), so it pays off on long runs of one model")
    qc = parser.add_argument_group("QC thresholds")
    for key, value in QC_THRESHOLDS.items():
        qc.add_argument(f"--qc-{key.replace('_', '-')}", type=type(value), default=None if defaults_from_pilot else value,
                        help=f"QC gate: {key} (default {value})")


def config_from_args(args, base: Stage1Config | None = None) -> tuple[Stage1Config, dict]:
    """Build the config; returns it and the parameters that the command line overrode on `base`."""
    from .qc import QC_THRESHOLDS

    config = base or Stage1Config()
    overrides = {}
    params = {"instruction": config.instruction.as_dict(), "response": config.response.as_dict()}
    for part, name, _, _ in _PARAM_FLAGS:
        value = getattr(args, f"{part}_{name}")
        if value is not None and value != params[part][name]:
            overrides[f"{part}_{name}"] = {"from": params[part][name], "to": value}
        if value is not None:
            params[part][name] = value
    threshold = config.confidence_threshold if args.confidence_threshold is None else args.confidence_threshold
    if threshold != config.confidence_threshold:
        overrides["confidence_threshold"] = {"from": config.confidence_threshold, "to": threshold}
    qc_thresholds = dict(config.qc_thresholds)
    for key in QC_THRESHOLDS:
        value = getattr(args, f"qc_{key}")
        if value is not None and value != qc_thresholds.get(key, QC_THRESHOLDS[key]):
            overrides[f"qc_{key}"] = {"from": qc_thresholds.get(key, QC_THRESHOLDS[key]), "to": value}
            qc_thresholds[key] = value
    new = Stage1Config(count=args.count, seed=args.seed, instruction=SamplingParams(**params["instruction"]),
                       response=SamplingParams(**params["response"]), confidence_threshold=threshold,
                       label_swap=args.label_swap, num_examples=config.num_examples, min_words=config.min_words,
                       max_words=config.max_words, near_duplicate_threshold=config.near_duplicate_threshold,
                       first_round_oversample=config.first_round_oversample, max_rounds=args.max_rounds,
                       qc_thresholds=qc_thresholds)
    return new, overrides


def config_from_dict(data: dict) -> Stage1Config:
    data = dict(data)
    data["instruction"] = SamplingParams(**data["instruction"])
    data["response"] = SamplingParams(**data["response"])
    return Stage1Config(**data)


def claim_output_dir(out_dir: Path, run_identity: dict) -> bool:
    """Record what this folder is being made with; refuse a different configuration.

    Returns True when the folder already held work of the same configuration (a resume).
    """
    import json

    from .exit_codes import BadInputError
    from .provenance_helper import write_manifest_atomic

    out_dir = Path(out_dir)
    path = out_dir / "run_config.json"
    if path.exists():
        existing = json.loads(path.read_text())
        if existing != json.loads(json.dumps(run_identity)):
            changed = sorted(k for k in set(existing) | set(run_identity) if existing.get(k) != json.loads(json.dumps(run_identity.get(k))))
            raise BadInputError(f"{out_dir} holds a run with a different configuration (differs in: {', '.join(changed)}); "
                                "use a new --output, or the same flags to resume")
        return True
    out_dir.mkdir(parents=True, exist_ok=True)
    write_manifest_atomic(path, run_identity)
    return False
