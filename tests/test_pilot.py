"""Pilot stage: generation engine, critic, QC definitions, and the pilot script end to end."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import BUNDLED_CACHE_DIR, run_python_script
from conftest import read_jsonl_lines as _lines
from tiny_models import TRAINED_PIPELINE_FLAGS, TRAINED_PIPELINE_OVERRIDES

ROOT = Path(__file__).resolve().parents[1]
PILOT = [sys.executable, str(ROOT / "scripts" / "generate_stage1_pilot_data.py")]
TINY, TINY_OVERRIDES = TRAINED_PIPELINE_FLAGS, TRAINED_PIPELINE_OVERRIDES


@pytest.fixture(scope="session")
def trained(trained_model_dir):
    from utils.clean_model_loader import CleanModelLoader

    model, tokenizer, _ = CleanModelLoader(str(trained_model_dir), run_sentinels=False).load()
    return model, tokenizer


def _run(args, **kwargs):
    return run_python_script(PILOT[1], *args, "--no-progress", **kwargs)


# -- engine ----------------------------------------------------------------------------------
def test_engine_stops_and_finish_reasons(trained):
    from utils.completion_prompts import CompletionStylePrompts as P
    from utils.generation import GenerationEngine, SamplingParams

    model, tokenizer = trained
    engine = GenerationEngine(model, tokenizer, batch_size=4, seed=1, show_progress=False)
    texts = ["Describe cats in one sentence.", "List two things about rain.", "Give a tip about bread."]
    items = [(f"k{i}", P.create_response_prompt(text)) for i, text in enumerate(texts)]
    stops = P.response_stop_strings()
    results = engine.generate(items, SamplingParams(0.0, 1.0, 1.0, 40), stops)
    assert sorted(r.key for r in results) == ["k0", "k1", "k2"]
    for result in results:
        assert result.finish_reason in {"stop", "eos", "length"}
        assert not any(stop in result.text for stop in stops)
        assert result.n_generated_tokens <= 40
    assert any(r.finish_reason == "stop" for r in results)  # this model learned to open a new block
    short = engine.generate(items, SamplingParams(0.0, 1.0, 1.0, 2), [])
    assert all(r.finish_reason == "length" and r.n_generated_tokens == 2 for r in short)


def test_engine_left_pads_and_batched_greedy_equals_single(trained):
    from utils.completion_prompts import CompletionStylePrompts as P
    from utils.generation import GenerationEngine, SamplingParams

    model, tokenizer = trained
    seen = []
    original = model.generate

    def spy(**kwargs):
        seen.append(kwargs["input_ids"].clone())
        return original(**kwargs)

    items = [("a", P.create_response_prompt("Name three facts about the moon.")), ("b", P.create_response_prompt("Give a tip."))]
    params = SamplingParams(0.0, 1.0, 1.0, 12)
    model.generate = spy
    try:
        batched = {r.key: r.text for r in GenerationEngine(model, tokenizer, batch_size=2, show_progress=False,
                                                           decode_loop="generate").generate(items, params)}
    finally:
        model.generate = original
    ids = seen[0]
    assert ids[1, 0].item() == tokenizer.pad_token_id and ids[1, -1].item() != tokenizer.pad_token_id  # left padding
    single = {r.key: r.text for r in GenerationEngine(model, tokenizer, batch_size=1, show_progress=False).generate(items, params)}
    assert batched == single


def test_engine_sampling_is_seeded(trained):
    from utils.completion_prompts import CompletionStylePrompts as P
    from utils.generation import GenerationEngine, SamplingParams

    model, tokenizer = trained
    items = [(f"k{i}", P.create_response_prompt("Describe rivers in one sentence.")) for i in range(4)]
    params = SamplingParams(1.0, 0.95, 1.0, 16)
    run = lambda seed: [r.text for r in GenerationEngine(model, tokenizer, batch_size=4, seed=seed, show_progress=False).generate(items, params)]
    assert run(3) == run(3)


@pytest.mark.parametrize("decode_loop", ["static", "generate"])
def test_engine_halves_batch_on_oom_without_losing_records(trained, decode_loop):
    from utils.completion_prompts import CompletionStylePrompts as P
    from utils.generation import GenerationEngine, SamplingParams

    model, tokenizer = trained
    original = model.forward

    def flaky(*args, **kwargs):
        if kwargs["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(*args, **kwargs)

    written = []
    model.forward = flaky
    try:
        engine = GenerationEngine(model, tokenizer, batch_size=8, show_progress=False, decode_loop=decode_loop)
        results = engine.generate([(f"k{i}", P.create_response_prompt(f"Task {i}")) for i in range(7)],
                                  SamplingParams(0.0, 1.0, 1.0, 4), on_result=written.append)
    finally:
        model.forward = original
    assert engine.batch_size == 2 and engine.oom_events == 2
    assert sorted(r.key for r in results) == sorted(r.key for r in written) == [f"k{i}" for i in range(7)]


# -- critic ----------------------------------------------------------------------------------
def test_critic_single_token_contract(trained, monkeypatch):
    from utils.completion_prompts import CompletionStylePrompts
    from utils.instruction_critic import InstructionCritic

    model, tokenizer = trained
    InstructionCritic(model, tokenizer)  # " A" and " B" are one token each here
    monkeypatch.setattr(CompletionStylePrompts, "critic_label_texts", staticmethod(lambda: (" A vote", " B")))
    from utils.exit_codes import EXIT_BAD_INPUT, BadInputError

    # A model-dependent check is bad input (exit 2) naming the label and how it tokenizes, not an assert.
    with pytest.raises(BadInputError, match=r"label ' A vote' is \d+ tokens .*pieces") as raised:
        InstructionCritic(model, tokenizer)
    assert raised.value.exit_code == EXIT_BAD_INPUT


def test_critic_margins_pinned_on_tiny_fixture(tiny_model_dir):
    """Stored values from the seeded random tiny model: a change in prompt text, label tokens,
    padding or the position read shows up here."""
    from utils.clean_model_loader import CleanModelLoader
    from utils.instruction_critic import InstructionCritic

    model, tokenizer, _ = CleanModelLoader(str(tiny_model_dir), run_sentinels=False).load()
    critic = InstructionCritic(model, tokenizer, batch_size=2)
    decisions = critic.critique_instructions_batch(["Name three colors.", "Explain rain briefly, please."])
    pair = critic.critique_pair("Name two planets.", "Mars and Venus.")
    got = [value for d in decisions + [pair] for value in (d["logp_a"], d["logp_b"])]
    expected = [value for row in PINNED_CRITIC_LOGPROBS for value in row]
    assert got == pytest.approx(expected, abs=2e-3)
    for d in decisions + [pair]:
        assert d["margin"] == pytest.approx(d["logp_a"] - d["logp_b"], abs=1e-5)
        assert d["accepted"] == (d["margin"] >= 1.0)
    # Batched and one-by-one give the same numbers (left padding reads the right position).
    alone = critic.critique_instruction("Explain rain briefly, please.")
    assert alone["logp_a"] == pytest.approx(decisions[1]["logp_a"], abs=1e-4)


PINNED_CRITIC_LOGPROBS = [(-4.386786, -4.815157), (-4.381223, -4.823249), (-4.412513, -4.788096)]


def test_critic_label_swap_averages_margins(trained):
    from utils.instruction_critic import InstructionCritic

    model, tokenizer = trained
    plain = InstructionCritic(model, tokenizer).critique_instruction("Describe cats in one sentence.")
    swapped = InstructionCritic(model, tokenizer, label_swap=True).critique_instruction("Describe cats in one sentence.")
    assert swapped["logp_a"] == pytest.approx(plain["logp_a"], abs=1e-5)
    expected = (plain["margin"] + swapped["swapped_margin"]) / 2
    assert swapped["margin"] == pytest.approx(expected, abs=1e-5) and swapped["label_swap"] is True


def test_critic_falls_back_when_the_compiled_forward_fails(trained, capsys):
    from utils.instruction_critic import InstructionCritic

    model, tokenizer = trained
    expected = InstructionCritic(model, tokenizer).label_logprobs(["Describe cats.", "Name a tree, please."])
    critic = InstructionCritic(model, tokenizer)

    def broken_compiled_forward(**kwargs):  # what a missing Triton/C++ toolchain looks like on first call
        raise RuntimeError("inductor: no working C++ compiler")

    critic.forward = broken_compiled_forward
    assert critic.label_logprobs(["Describe cats.", "Name a tree, please."]) == expected
    assert critic.forward is model and "torch.compile failed" in capsys.readouterr().out


def test_critic_never_truncates_the_answer_slot(trained):
    from utils.completion_prompts import CompletionStylePrompts as P
    from utils.instruction_critic import InstructionCritic
    from utils.prompt_guards import encode_prompt

    model, tokenizer = trained
    critic = InstructionCritic(model, tokenizer, max_prompt_tokens=40)
    ids = encode_prompt(tokenizer, P.create_instruction_critic_prompt("Describe cats in one sentence."))
    fitted = critic._fit(ids)
    assert len(fitted) == 40 and fitted[-10:] == ids[-10:]


# -- QC definitions --------------------------------------------------------------------------
def _rec(raw, response, reason="stop", n_tokens=10, accepted=True, margin=2.0):
    return {"raw_response": raw, "response": response, "finish_reason": reason, "n_response_tokens": n_tokens,
            "n_generated_tokens": n_tokens + 1, "accepted": accepted,
            "pair_critic": {"accepted": accepted, "margin": margin}}


def test_runaway_definition():
    from utils.qc import is_runaway

    assert is_runaway("the cat sat. the cat sat. the cat sat.")
    assert not is_runaway("the cat sat. the cat sat. a dog ran.")  # twice is not a loop
    assert not is_runaway("Paris is the capital of France.")


def test_qc_rates_on_hand_made_records():
    from utils.qc import compute_qc

    records = [
        _rec("a b c a b c a b c", "a b c", reason="length", n_tokens=30),  # runaway + token limit
        _rec(" Fine answer.", "Fine answer.", n_tokens=4),
        _rec(" Another one.", "Another one.", n_tokens=6, accepted=False, margin=-1.0),
        _rec(" Leaky Response: x", "Leaky Response: x", n_tokens=8),  # accepted but leaks
    ]
    qc = compute_qc(records)
    rates = {k: v["value"] for k, v in qc["rates"].items()}
    assert rates == {"runaway_rate": 0.25, "token_limit_rate": 0.25, "delimiter_leakage": 1,
                     "median_response_tokens": 8, "critic_acceptance_rate": 0.75}
    assert not qc["passed"] and any("delimiter_leakage" in f for f in qc["failures"])
    clean = compute_qc([_rec(" Good.", "Good.", n_tokens=3) for _ in range(20)])
    assert clean["passed"] and clean["failures"] == []
    assert compute_qc([])["passed"] is False
    # The verdict is the judged record's own `accepted` (the trusted signals'), not the A/B critic's.
    overruled = [{**_rec(" Good.", "Good.", n_tokens=3), "pair_critic": {"accepted": False, "margin": -5.0}}]
    assert compute_qc(overruled)["counts"]["accepted"] == 1
    # response_v3: the end marker left in a cleaned answer is leakage, and a multi-paragraph answer is not.
    v3 = compute_qc([_rec(" One.\n\nTwo.", "One.\n\nTwo."), _rec(" Three ### END", "Three ### END")])
    assert v3["rates"]["delimiter_leakage"]["value"] == 1


def test_qc_gates_of_the_new_recipe():
    from utils.qc import compute_qc, format_qc_table

    records = [_rec(" Good.", "Good.", n_tokens=3) for _ in range(4)]
    trusted = {"trusted": ["relevance"], "rank_by": "relevance", "aucs": {"ab_margin": 0.5, "relevance": 0.81}, "min_auc": 0.75,
               "source": "probe"}
    constraints = {"catalogue_version": "constraints_v1", "records": 4, "constrained": 2, "constrained_fraction": 0.5,
                   "checker_pass_rate": 1.0, "failed_ids": [], "per_family": {"lowercase": 2}, "modes": {"rewritten": 2},
                   "constraints_per_record": {1: 2}}
    qc = compute_qc(records, critic_signals=trusted, constraints=constraints)
    assert qc["passed"] and qc["rates"]["discriminating_signals"]["value"] == 1 and qc["rates"]["checker_pass_rate"]["passed"]
    table = format_qc_table(qc)
    assert "relevance                    0.810  trusted, ranks" in table and "ab_margin                    0.500  not discriminating" in table
    assert "constraints (constraints_v1): 2 of 4 records (0.500)" in table
    failing = compute_qc(records, critic_signals={**trusted, "trusted": [], "rank_by": None},
                         constraints={**constraints, "checker_pass_rate": 0.5})
    assert failing["failures"] == ["no critic signal discriminates on the probe set (needs AUC >= 0.75): ab_margin 0.5, relevance 0.81",
                                   "checker_pass_rate = 0.5 (needs == 1.0)"]
    vacuous = compute_qc(records, constraints={**constraints, "constrained": 0, "checker_pass_rate": None})
    assert vacuous["passed"] and vacuous["rates"]["checker_pass_rate"] == {"value": None, "op": "==", "threshold": 1.0, "passed": True}


def test_qc_counts_a_judged_record_duplicated_in_the_file_once():
    from utils.qc import compute_qc

    records = [{**_rec(" Good.", "Good.", n_tokens=3), "id": f"r00-{i:05d}"} for i in range(3)]
    rejected = {**_rec(" Off topic.", "Off topic.", accepted=False, margin=-2.0), "id": "r00-00003"}
    qc = compute_qc(records + [rejected, dict(rejected), dict(rejected)])  # one rejected pair written three times
    assert qc["counts"]["judged"] == 4 and qc["counts"]["accepted"] == 3
    assert qc["rates"]["critic_acceptance_rate"]["value"] == 0.75 and qc["counts"]["duplicate_judged_ids_ignored"] == 2


def test_prefilters_count_each_reason():
    from utils.stage1_generation import Stage1Config, prefilter_instruction

    config = Stage1Config()
    examples = ["Name three primary colors."]
    assert prefilter_instruction("Name two", "stop", examples, config) == "too_short"
    assert prefilter_instruction("Describe the sea in detail.", "length", examples, config) == "unfinished"
    assert prefilter_instruction("!!! ### $$$ %%% ^^^", "stop", examples, config) == "non_text"
    assert prefilter_instruction("Visit http://spam.example now please", "stop", examples, config) == "non_text"
    assert prefilter_instruction("name three primary colors.", "stop", examples, config) == "copy_of_example"
    assert prefilter_instruction("Tell me about <start_of_turn> things", "stop", examples, config) == "chat_marker"
    assert prefilter_instruction("Describe how a bicycle works.", "stop", examples, config) is None
    assert prefilter_instruction(" ".join(["word"] * 61), "stop", examples, config) == "too_long"


@pytest.mark.parametrize("text,keyword", [
    ("Draw a picture of a cat.", "Draw"), ("Describe the image below in detail.", "image"),
    ("Summarize the attached file for me.", "attached"), ("Go to the website and click the first link.", "Go to"),
    ("Make a chart of the sales figures.", "chart"), ("Listen to this sound recording and describe it.", "sound recording"),
    ("Upload your photos to the shared folder.", "Upload"), ("Explain what a URL is.", "URL"),
])
def test_blacklisted_tasks_are_dropped_naming_the_keyword(text, keyword):
    from utils.stage1_generation import Stage1Config, blacklisted_keyword, prefilter_instruction

    assert blacklisted_keyword(text) == keyword
    assert prefilter_instruction(text, "stop", [], Stage1Config()) in ("blacklisted_keyword", "non_text")


@pytest.mark.parametrize("text", ["Give a definition of photosynthesis.", "Write a paragraph about graphite.",
                                  "Describe your favourite drawer in the kitchen.", "Explain how profiles are built.",
                                  "Name a famous linker of railways."])
def test_the_blacklist_matches_whole_words_only(text):
    from utils.stage1_generation import Stage1Config, blacklisted_keyword, prefilter_instruction

    assert blacklisted_keyword(text) is None and prefilter_instruction(text, "stop", [], Stage1Config()) is None


def test_near_duplicate_index():
    from utils.dedup import NearDuplicateIndex

    index = NearDuplicateIndex(0.7)
    index.add("a", "Name three primary colors.")
    assert index.find("name three primary colors!") == ("exact", "a")
    assert index.find("Name three primary colors please.")[0] == "near"
    assert index.find("Explain how volcanoes erupt.") == ("new", None)


# -- the pilot end to end --------------------------------------------------------------------
@pytest.mark.slow  # one round of a 3-pair pilot
def test_answers_written_under_constraints_are_checked_end_to_end(trained_model_dir, tmp_path):
    """--generated-constraint-fraction 1: every instruction is answered with constraints appended, each
    candidate is checked, and one that misses is rejected for it (the tiny model misses them all)."""
    from utils.constraint_data import generated_constraints

    out = tmp_path / "pilot"
    done = _run(["--model", trained_model_dir, "--count", 3, "--output", out, "--batch-size", 8, "--max-rounds", 1,
                 *TINY, "--generated-constraint-fraction", 1])
    assert done.returncode in (0, 4), done.stderr[-2000:]
    manifest = json.loads((out / "session_manifest.json").read_text())
    accepted = {r["id"]: r["instruction"] for r in _lines(out / "phase2_instructions.jsonl") if r["accepted"]}
    scored = _lines(out / "phase4_scored_responses.jsonl")
    assert accepted and len(scored) == len(accepted)
    for record in scored:
        instruction, constraints = generated_constraints(42, record["instruction_id"], accepted[record["instruction_id"]],
                                                         manifest["config"]["constraint_families"])
        assert record["instruction"] == instruction and len(record["constraint_checks"]) == len(constraints)
        assert ("constraint_failed" in record["filter_reasons"]) == (not all(c["passed"] for c in record["constraint_checks"]))
    counts = manifest["phase_counts"]
    assert counts["generated_constraint_instructions"] == len(accepted)
    assert sum(counts["generated_constraint_candidates"].values()) == sum(len(r["constraint_checks"]) for r in scored)
    assert sum(counts["generated_constraint_passed"].values()) == sum(c["passed"] for r in scored for c in r["constraint_checks"])
    final = _lines(out / "sft_data.jsonl")
    assert all(r["constraint_mode"] == "generated" and all(c["passed"] for c in r["constraint_checks"]) for r in final)


@pytest.mark.slow  # 69-86 s measured (two pilot runs)
def test_pilot_end_to_end_exit_0_then_4(trained_model_dir, tmp_path):
    from utils.records import SFTExampleRecord, field_names

    out = tmp_path / "pilot"
    # --compile is GPU-only: on the CPU it must change nothing but the recorded arguments.
    done = _run(["--model", trained_model_dir, "--count", 6, "--output", out, "--batch-size", 8, "--compile", *TINY])
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = json.loads((out / "session_manifest.json").read_text())
    assert manifest["qc"]["passed"] is True and manifest["records"] == 6
    assert json.dumps(manifest).count('"compile": true') == 1
    records = _lines(out / "sft_data.jsonl")
    assert len(records) == 6 and len({r["id"] for r in records}) == 6
    for record in records:
        assert set(record) == set(field_names(SFTExampleRecord))
        assert record["prompt_version"] == "response_v4" and record["round"] == int(record["id"][1:3])
        assert record["pair_critic"]["prompt_version"] == "pair_critic_v1" and record["pair_critic"]["label_swap"] is True
        assert record["candidate_id"] == record["id"] + "-c0" and record["selection"]["candidates"] == 1
        assert record["relevance"]["relevance"] > 0 and record["relevance"]["n_tokens"] == record["n_response_tokens"] + 1 \
            or record["constraint_mode"] in ("rewritten", "list_format")  # the rewritten response is what n_response_tokens counts
    assert manifest["outputs"]["data"]["sha256"] and manifest["git_hash"] and manifest["outputs"]["probe"]["sha256"]
    assert manifest["prompt_versions"]["response_generation"] == "response_v4" and manifest["prompt_versions"]["response"] == "response_v2"
    assert manifest["critic_signals"]["source"] == "probe" and set(manifest["critic_signals"]["aucs"]) == {
        "ab_margin", "ab_margin_direct", "relevance", "relevance_total"}
    assert manifest["qc"]["critic_signals"] == manifest["critic_signals"]
    assert manifest["constraint_catalogue_version"] == "constraints_v2" and manifest["qc"]["constraints"]["checker_pass_rate"] in (1.0, None)
    assert manifest["config"]["response"]["max_new_tokens"] == 256 and manifest["config"]["num_candidates"] == 1
    strict = _run(["--model", trained_model_dir, "--count", 6, "--output", tmp_path / "strict", "--qc-median-response-tokens-max", 1, *TINY])
    assert strict.returncode == 4, strict.stderr[-2000:]
    failed = json.loads((tmp_path / "strict" / "session_manifest.json").read_text())
    assert failed["qc"]["passed"] is False and "median_response_tokens" in failed["qc"]["failures"][0]
    # Not the bundled model, so `auto` chose the source's values; the flags are overrides of them.
    assert manifest["calibration"]["name"] == "source" and manifest["calibration"]["chosen_by"].startswith("auto")
    assert manifest["overrides"] == TINY_OVERRIDES and manifest["config"]["confidence_threshold"] == -100.0
    assert failed["overrides"] == {**TINY_OVERRIDES, "qc_median_response_tokens_max": {"from": 40, "to": 1}}


@pytest.mark.slow  # two pilot runs on the tiny model
def test_pilot_fails_its_gate_when_no_critic_signal_discriminates(trained_model_dir, tmp_path):
    out = tmp_path / "pilot"
    done = _run(["--model", trained_model_dir, "--count", 6, "--output", out, "--min-signal-auc", "1.0"])
    assert done.returncode == 4, done.stderr[-2000:]
    manifest = json.loads((out / "session_manifest.json").read_text())
    assert manifest["qc"]["failures"][0].startswith("no critic signal discriminates on the probe set (needs AUC >= 1.0): ab_margin ")
    assert manifest["critic_signals"]["trusted"] == [] and (out / "probe.json").exists()
    assert _lines(out / "sft_data.jsonl") == [] and not (out / "phase4_judged.jsonl").read_text()
    assert "not discriminating" in done.stdout and manifest["qc"]["counts"]["candidates"] == 18  # the first round only
    probe = json.loads((out / "probe.json").read_text())
    assert probe["trusted"] == [] and probe["summary"]["kinds"]["matched"] == probe["pairs"] > 0


@pytest.mark.slow  # one pilot run with three candidates per instruction
def test_best_of_n_saves_every_candidate_and_says_which_won(trained_model_dir, tmp_path):
    out = tmp_path / "pilot"
    done = _run(["--model", trained_model_dir, "--count", 4, "--output", out, "--num-candidates", 3, "--constraint-fraction", 1.0,
                 *TINY])
    assert done.returncode == 0, done.stderr[-2000:]
    responses = _lines(out / "phase3_responses.jsonl")
    scored = _lines(out / "phase4_scored_responses.jsonl")
    judged = _lines(out / "phase4_judged.jsonl")
    assert len(responses) == len(scored) == 3 * len(judged) and {r["id"] for r in responses} == {r["id"] for r in scored}
    for record in judged:
        mine = [r for r in scored if r["instruction_id"] == record["id"]]
        assert sorted(r["candidate_index"] for r in mine) == [0, 1, 2]
        winner = next(r for r in mine if r["id"] == record["candidate_id"])
        assert (record["response"], record["signals"]) == (winner["response"], winner["signals"])
        assert record["selection"]["candidates"] == 3 and record["selection"]["winner_index"] == winner["candidate_index"]
        if record["accepted"]:
            rank = record["selection"]["ranked_by"]
            passing = [r for r in mine if not r["filter_reasons"]]
            assert winner["signals"][rank] == max(r["signals"][rank] for r in passing)
    # --constraint-fraction 1: every accepted pair was offered constraints; each constrained one passes its checkers.
    constrained = _lines(out / "phase5_constrained.jsonl")
    assert {r["id"] for r in constrained} == {r["id"] for r in judged if r["accepted"]}
    for record in _lines(out / "sft_data.jsonl"):
        if record["constraints"]:
            from utils.constraint_data import recheck

            assert all(c["passed"] for c in recheck(record["constraints"], record["response"]))
            assert record["instruction"].startswith(record["original_instruction"]) and record["constraint_mode"] in (
                "measured", "rewritten", "list_format")  # list_format: a list request answered as a list, the instruction as asked


@pytest.mark.slow  # 31-33 s measured
def test_pilot_refuses_a_different_configuration_in_the_same_folder(trained_model_dir, tmp_path):
    out = tmp_path / "pilot"
    assert _run(["--model", trained_model_dir, "--count", 4, "--output", out, *TINY]).returncode == 0
    again = _run(["--model", trained_model_dir, "--count", 4, "--output", out, "--response-temperature", 0.9, *TINY])
    # The refusal names each differing field, nested keys included, with both values.
    assert again.returncode == 2 and "different configuration (differs in: config.response.temperature: 0.3 -> 0.9)" in again.stderr


def _assert_complete_without_duplicates(out: Path, count: int):
    for name in ("phase1_candidates", "phase2_instructions", "phase3_responses", "phase4_scored_responses", "phase4_judged",
                 "phase5_constrained"):
        ids = [r["id"] for r in _lines(out / f"{name}.jsonl")]
        assert len(ids) == len(set(ids)), f"duplicate ids in {name}"
    responses = {r["id"] for r in _lines(out / "phase3_responses.jsonl")}
    scored = {r["id"] for r in _lines(out / "phase4_scored_responses.jsonl")}
    judged = {r["id"] for r in _lines(out / "phase4_judged.jsonl")}
    accepted = {r["id"] for r in _lines(out / "phase2_instructions.jsonl") if r["accepted"]}
    assert responses == scored and {key.rsplit("-c", 1)[0] for key in responses} == judged and judged <= accepted
    assert len(_lines(out / "sft_data.jsonl")) == count


@pytest.mark.slow  # 43-60 s measured
def test_pilot_resumes_after_a_kill_without_duplicates_or_gaps(trained_model_dir, tmp_path):
    out = tmp_path / "pilot"
    assert _run(["--model", trained_model_dir, "--count", 6, "--output", out, *TINY]).returncode == 0
    # Simulate a crash in phase 4: the last judged lines are lost, one torn half-line is left,
    # and the final data and manifest were never written.
    judged = (out / "phase4_judged.jsonl").read_text().splitlines(keepends=True)
    (out / "phase4_judged.jsonl").write_text("".join(judged[:-3]) + judged[-3][: len(judged[-3]) // 2])
    (out / "session_manifest.json").unlink()
    (out / "sft_data.jsonl").unlink()
    resumed = _run(["--model", trained_model_dir, "--count", 6, "--output", out, *TINY])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stdout and "torn last line" in resumed.stderr
    _assert_complete_without_duplicates(out, 6)


@pytest.mark.slow  # 53-125 s measured
def test_pilot_survives_a_real_sigkill(trained_model_dir, tmp_path):
    out = tmp_path / "pilot"
    proc = subprocess.Popen(PILOT + ["--model", str(trained_model_dir), "--count", "12", "--output", str(out), "--no-progress",
                                     "--batch-size", "2", *TINY], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    target = out / "phase3_responses.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if target.exists() and target.stat().st_size > 0:
            break
        time.sleep(0.02)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = _run(["--model", trained_model_dir, "--count", 12, "--output", out, "--batch-size", 2, *TINY])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_complete_without_duplicates(out, 12)


@pytest.mark.slow  # the real bundled model end to end
def test_pilot_on_the_real_bundled_model(tmp_path):
    """gemma-3-270m end to end with a tiny count and one round, with the calibration `auto` picks for
    it (the source's 1.0-nat critic threshold accepts nothing from a 270M model). QC may pass or
    fail on 8 pairs; what must hold is a finished run: exit 0 or 4, data, and a manifest."""
    out = tmp_path / "pilot"
    env = {**os.environ, "STAGE1_CACHE_DIR": str(BUNDLED_CACHE_DIR), "OMP_NUM_THREADS": "2"}
    result = subprocess.run(PILOT + ["--count", "8", "--max-rounds", "1", "--output", str(out), "--batch-size", "8", "--no-progress"],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=1800)
    assert result.returncode in (0, 4), result.stderr[-3000:]
    manifest = json.loads((out / "session_manifest.json").read_text())
    assert manifest["model_provenance"]["model_id"] == "gemma-3-270m" and manifest["model_provenance"]["sentinels"]["passed"]
    # No flags: the calibration measured for this model is chosen by its file hash, and recorded.
    assert manifest["calibration"]["name"] == "gemma-3-270m" and manifest["calibration"]["chosen_by"].startswith("auto")
    assert manifest["config"]["confidence_threshold"] == 0.0 and manifest["config"]["label_swap"] is True
    assert manifest["config"]["constraint_variants"] == 2
    assert manifest["qc"]["counts"]["candidates"] == 24 and manifest["qc"]["passed"] == (result.returncode == 0)
    records = _lines(out / "sft_data.jsonl")
    from utils.records import is_pair

    pairs = [r for r in records if is_pair(r["id"])]
    assert len(pairs) <= 8 and all(r["response"] for r in records)
    # the calibration's two relabeled variants per pair: each carries constraints
    assert len(records) <= 3 * len(pairs) and all(r["constraints"] for r in records if not is_pair(r["id"]))
    assert manifest["prompt_versions"]["response_generation"] == "response_v4" and "critic_signals" in manifest
    assert manifest["outputs"]["data"]["sha256"]
