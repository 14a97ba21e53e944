"""Stage 2 preference pairs: the gate (a passing Stage 1 evaluation), pair formation and corruption
rules, QC and its gate, resume after a kill, on the trained tiny model.

`build_stage1_workspace` makes what Stage 2 stands on, quickly: a pilot manifest and its SFT data, a
Stage 1 adapter trained by train_stage1_sft.py for two steps, a test set, and a Stage 1 evaluation
results file. The tiny model cannot pass the real evaluation gate, so the results file is written
here with the fields evaluate_stage1_sft.py writes (test_stage2_chain.py runs the real evaluation
and marks its gate passed instead).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import read_jsonl_lines, run_main_in_process, run_python_script, script_env

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "generate_stage2_preference_data.py"
# Small and fast on the tiny model; --min-pairs 1 because a handful of instructions makes few pairs.
TINY = ["--num-instructions", 4, "--num-candidates", 3, "--batch-size", 8, "--max-new-tokens", 24, "--min-pairs", 1,
        "--constraint-fraction", 0.5, "--corrupted-pairs", "--min-signal-margin", 0.01, "--no-progress"]
STAGE1_TASKS = ["Describe cats in one sentence.", "Name three facts about rivers.", "List two things about the moon.",
                "Explain why trees matter.", "Give a tip about bread.", "Write a short line about rain."]


def build_stage1_workspace(root: Path, model_dir: Path, lr: float = 1e-3) -> dict:
    """A finished Stage 1 run in run_stage1.sh's layout under `root`: pilot manifest + SFT data, a Stage 1
    adapter (train_stage1_sft.py, 2 steps at `lr`), the test set and a passing evaluation results file."""
    import train_stage1_sft
    from utils.provenance_helper import create_session_manifest, write_manifest_atomic
    from utils.response_selection import SIGNALS
    from utils.stage1_generation import Stage1Config
    from utils.test_set import build_test_set

    pilot = root / "artifacts" / "pilot"
    pilot.mkdir(parents=True)
    data = pilot / "sft_data.jsonl"
    data.write_text("".join(json.dumps({"id": f"r00-{i:05d}", "instruction": task, "response": "They are common and well known."}) + "\n"
                            for i, task in enumerate(STAGE1_TASKS)))
    # The trained tiny model's settings (tests/tiny_models.py TRAINED_PIPELINE_FLAGS) and a probe verdict trusting every signal.
    config = dataclasses.replace(Stage1Config(), confidence_threshold=-100.0, min_signal_auc=0.0)
    signals = {"trusted": sorted(SIGNALS), "rank_by": "relevance_total", "aucs": {name: 0.9 for name in SIGNALS}, "min_auc": 0.75,
               "source": "probe"}
    write_manifest_atomic(pilot / "session_manifest.json", create_session_manifest(
        "pilot", {"model": str(model_dir)}, outputs={"data": data}, qc={"passed": True, "failures": []}, config=config.as_dict(),
        critic_signals=signals))
    code, out = run_main_in_process(train_stage1_sft.main, train_stage1_sft.parse_args, [
        "--data", data, "--model", model_dir, "--output", root / "checkpoints" / "stage1_sft", "--max-steps", 2, "--grad-accum", 1,
        "--val-fraction", 0, "--lr", lr, "--logging-steps", 1])
    assert code == 0, out
    adapter = root / "checkpoints" / "stage1_sft" / "final_adapter"
    test_set = root / "data" / "test_instructions.jsonl"
    test_set.parent.mkdir(parents=True)
    test_set.write_text("".join(json.dumps(r) + "\n" for r in build_test_set(count=10)))
    evaluation = write_evaluation(root / "results" / "sft_eval", adapter, test_set, passed=True)
    return {"root": root, "model": model_dir, "pilot": pilot / "session_manifest.json", "data": data, "adapter": adapter,
            "test_set": test_set, "evaluation": evaluation}


def write_evaluation(folder: Path, adapter: Path, test_set: Path, passed: bool) -> Path:
    """An evaluation_results.json with the fields evaluate_stage1_sft.py writes and Stage 2 reads."""
    from utils.provenance_helper import create_session_manifest, sha256_file, write_manifest_atomic
    from utils.sft_training import adapter_file_hashes

    folder.mkdir(parents=True, exist_ok=True)
    summary = folder / "evaluation_summary.txt"
    summary.write_text(f"GATE {'PASSED' if passed else 'FAILED'}\n")
    results = create_session_manifest(
        "evaluate_sft", {}, outputs={"summary": summary},
        gate={"passed": passed, "reasons": [] if passed else ["overall McNemar p=0.5 is not < alpha 0.01"]},
        test_set={"path": str(test_set), "sha256": sha256_file(test_set)},
        models={"sft": {"adapter_path": str(adapter), "adapter_files_sha256": adapter_file_hashes(adapter)}})
    write_manifest_atomic(folder / "evaluation_results.json", results)
    return folder / "evaluation_results.json"


@pytest.fixture(scope="module")
def stage1(trained_model_dir, tmp_path_factory, one_torch_thread):
    return build_stage1_workspace(tmp_path_factory.mktemp("stage2") / "ws", trained_model_dir)


def run_stage2(args, **kwargs):
    return run_python_script(SCRIPT, *args, env=script_env(OMP_NUM_THREADS="1"), **kwargs)


@pytest.fixture(scope="module")
def finished(stage1, tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs") / "stage2"
    done = run_stage2(["--stage1-evaluation", stage1["evaluation"], "--output", out, *TINY], timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {"out": out, "stdout": done.stdout, "manifest": json.loads((out / "session_manifest.json").read_text())}


# ---- the gate: nothing loads without a passing Stage 1 evaluation ----------------------------------
def run_in_process(args):
    import generate_stage2_preference_data as script

    return run_main_in_process(script.main, script.parse_args, [*map(str, args), "--no-progress"])


def test_refuses_without_a_stage1_evaluation(tmp_path):
    code, out = run_in_process(["--stage1-evaluation", tmp_path / "missing.json", "--output", tmp_path / "out"])
    assert code == 3 and "Stage 1 evaluation" in out and "does not exist" in out, out
    assert not (tmp_path / "out").exists()


def test_refuses_a_failed_stage1_evaluation(stage1, tmp_path):
    failed = write_evaluation(tmp_path / "eval", stage1["adapter"], stage1["test_set"], passed=False)
    code, out = run_in_process(["--stage1-evaluation", failed, "--output", tmp_path / "out"])
    assert code == 3 and "did not pass its gate (gate.passed is False)" in out, out
    assert not (tmp_path / "out").exists()


def test_refuses_an_adapter_or_test_set_other_than_the_evaluated_ones(stage1, tmp_path):
    import shutil

    other = tmp_path / "other_adapter"
    shutil.copytree(stage1["adapter"], other)
    (other / "adapter_config.json").write_text((other / "adapter_config.json").read_text() + " ")
    code, out = run_in_process(["--stage1-evaluation", stage1["evaluation"], "--stage1-adapter", other, "--output", tmp_path / "out"])
    assert code == 3 and "changed since training finished" in out, out  # the marker's hashes no longer match
    test_set = tmp_path / "test.jsonl"
    shutil.copy(stage1["test_set"], test_set)
    evaluation = write_evaluation(tmp_path / "eval", stage1["adapter"], test_set, passed=True)
    test_set.write_text(test_set.read_text() + json.dumps({"id": "extra", "instruction": "Say hi."}) + "\n")
    code, out = run_in_process(["--stage1-evaluation", evaluation, "--output", tmp_path / "out"])
    assert code == 3 and "missing or changed" in out, out
    assert not (tmp_path / "out").exists()



@pytest.mark.parametrize("flag,value", [
    ("--num-instructions", "0"), ("--num-candidates", "1"), ("--seed", "-1"), ("--temperature", "0"), ("--top-p", "0"),
    ("--top-p", "1.5"), ("--repetition-penalty", "0"), ("--max-new-tokens", "0"), ("--constraint-fraction", "1.5"),
    ("--constraint-families", "words_range"), ("--constraint-families", "nonsense"), ("--signals", "loudness"),
    ("--min-signal-margin", "-1"), ("--min-pairs", "0"), ("--max-length-ratio", "0"), ("--min-length-ratio", "abc"),
    ("--batch-size", "0"),
])
def test_bad_flags_exit_2_at_parse_time(flag, value, capsys):
    import generate_stage2_preference_data as script

    with pytest.raises(SystemExit) as exc:
        script.parse_args([flag, value])
    assert exc.value.code == 2 and f"argument {flag}:" in capsys.readouterr().err

# ---- pair formation, corruption, QC (no model) ------------------------------------------------------
def _candidate(key: str, response: str, tokens: int, *, checks=None, filters=(), **signals) -> dict:
    return {"id": key, "candidate_index": int(key.rsplit("c", 1)[1]), "response": response, "n_response_tokens": tokens,
            "signals": signals, "constraint_checks": checks, "filter_reasons": list(filters), "finish_reason": "stop"}


def _instruction(constraints=()) -> dict:
    return {"id": "st2-r00-00001", "round": 0, "task": "Describe rain.", "instruction": "Describe rain." + " X" * bool(constraints),
            "constraints": list(constraints), "excluded": False, "overlaps": []}


def test_checker_pair_prefers_clean_candidates_closest_in_length():
    from utils.preference_pairs import checker_pair

    ok, bad = [{"family": "lowercase", "passed": True, "reason": ""}], [{"family": "lowercase", "passed": False, "reason": ""}]
    instruction = _instruction([{"family": "lowercase", "params": {}, "wording_id": "lowercase.train1", "text": "X"}])
    candidates = [_candidate("a-c0", "rain falls.", 10, checks=ok), _candidate("a-c1", "Rain falls down today.", 30, checks=bad),
                  _candidate("a-c2", "Rain falls.", 11, checks=bad), _candidate("a-c3", "rain", 9, checks=ok, filters=["runaway"])]
    pair, outcome = checker_pair(instruction, candidates, seed=7)
    assert outcome == "formed" and (pair["chosen_id"], pair["rejected_id"]) == ("a-c0", "a-c2")  # 10 vs 11 tokens, not 10 vs 30
    assert pair["margin"] == 1.0 and pair["margin_kind"] == "constraints_passed" and "fails lowercase" in pair["reason"]
    assert pair["chosen_scores"]["constraints_passed"] == 1.0 and pair["rejected_scores"]["constraints_passed"] == 0.0
    assert pair["id"] == "st2-r00-00001:checker" and pair["length_ratio"] == pytest.approx(10 / 11, abs=1e-6)
    assert checker_pair(instruction, candidates[1:3], seed=7) == (None, "no clean passing candidate")
    assert checker_pair(_instruction(), candidates, seed=7) == (None, "unconstrained")


def test_signal_pair_needs_the_margin_and_passing_constraints():
    from utils.preference_pairs import signal_pair

    candidates = [_candidate("a-c0", "One.", 10, relevance_total=5.0), _candidate("a-c1", "Two.", 12, relevance_total=2.0),
                  _candidate("a-c2", "Three.", 40, relevance_total=0.5), _candidate("a-c3", "Four.", 10, filters=["token_limit"],
                                                                                   relevance_total=-9.0)]
    pair, outcome = signal_pair(_instruction(), candidates, "relevance_total", 1.0, seed=7)
    # c0-c1 (3.0 apart, 10 vs 12 tokens) beats c0-c2 (4.5 apart, 10 vs 40): length first; the unclean c3 never plays.
    assert outcome == "formed" and (pair["chosen_id"], pair["rejected_id"]) == ("a-c0", "a-c1") and pair["margin"] == 3.0
    assert pair["source"] == "signal" and pair["signal"] == "relevance_total" and pair["id"].endswith(":signal-relevance_total")
    assert signal_pair(_instruction(), candidates, "relevance_total", 10.0, seed=7) == (None, "no two candidates 10.0 apart")
    assert signal_pair(_instruction(), candidates[:1], "relevance_total", 1.0, seed=7)[0] is None


def _passing_text(family: str) -> tuple[str, list[dict]]:
    """A response that passes one constraint of `family` (and a second, compatible one where the family allows)."""
    import random

    from utils.constraints import build_instruction, compatible, rewrite_all, sample_constraint, to_record

    base = ("Rivers carry water from the hills to the sea. They shape wide valleys over long years. "
            "Many towns grew beside them and people still fish there.")
    other = sample_constraint("end_mark", random.Random(0), response=base, split="train")  # "." measured: base passes it
    for seed in range(20):
        for measured in (False, True):  # a fresh target the catalogue rewrites to, else one the text already meets
            first = sample_constraint(family, random.Random(seed), response=base if measured else None, split="train")
            if first is None:
                continue
            _, bound = build_instruction("Describe rivers.", [first, other] if compatible(family, "end_mark") else [first])
            text = rewrite_all(bound, base)
            if text is not None:
                return text, [to_record(c) for c in bound]
    raise AssertionError(f"no passing text for {family}")


@pytest.mark.parametrize("family", ["words_max", "words_min", "sentences_exact", "paragraphs", "bullet_items", "numbered_items",
                                    "lowercase", "uppercase", "no_commas", "end_mark", "keyword_include", "keyword_forbid",
                                    "first_word", "start_phrase", "end_phrase", "json_object", "quoted", "title", "postscript",
                                    "repeat_request"])
def test_corruption_breaks_exactly_the_target_constraint(family):
    from utils.constraint_data import recheck
    from utils.constraints import TRAINED_FAMILIES
    from utils.preference_pairs import corrupt_response

    assert family in TRAINED_FAMILIES
    text, constraints = _passing_text(family)
    assert all(c["passed"] for c in recheck(constraints, text))
    corruption = corrupt_response(text, constraints)
    assert corruption is not None, (family, text)
    failed = [c["family"] for c in recheck(constraints, corruption.text) if not c["passed"]]
    assert failed == corruption.broken and len(failed) == 1, (family, corruption)  # one broken, the others kept
    assert corruption.text != text and corruption == corrupt_response(text, constraints)  # deterministic


def test_corrupted_copy_is_written_once_then_paired_with_its_source(tmp_path, tiny_model_dir):
    """Phase 5 and 6 on made-up scored candidates: the tiny model's answers rarely pass a constraint, so the
    script's own run seldom reaches a corrupted pair."""
    from collections import Counter

    from utils.clean_model_loader import CleanModelLoader
    from utils.constraint_data import recheck
    from utils.jsonl_io import JsonlAppender
    from utils.preference_pairs import Stage2Config, _add_corrupted, _form_pairs
    from utils.response_selection import CriticSignals

    _, tokenizer, _ = CleanModelLoader(str(tiny_model_dir), run_sentinels=False).load()
    rule = {"family": "no_commas", "params": {}, "wording_id": "no_commas.train1", "text": "Do not use any commas in your answer."}
    instruction = {**_instruction([rule]), "id": "st2-r00-00001"}
    passing, failing = "Rain falls from grey clouds and wets the streets.", "Rain falls, and the streets get wet."
    candidates = [_candidate(f"st2-r00-00001-c{i}", text, 12, checks=recheck([rule], text), relevance_total=value)
                  for i, (text, value) in enumerate(((passing, 3.0), (failing, 1.0)))]
    candidates = [{**c, "instruction_id": "st2-r00-00001", "round": 0, "finish_reason": "stop"} for c in candidates]
    files = {name: JsonlAppender(tmp_path / f"{name}.jsonl") for name in ("corrupted_responses", "corrupted_scored", "pairs")}
    signals = CriticSignals.from_aucs({"relevance_total": 0.9}, 0.75, "probe")
    for _ in range(2):  # a rerun writes nothing twice
        _add_corrupted(files, tokenizer, [instruction], {"st2-r00-00001": candidates}, signals)
    copies = files["corrupted_responses"].records
    assert [c["id"] for c in copies] == ["st2-r00-00001-c0-corrupt"] and copies[0]["response"] == "Rain, falls from grey clouds and wets the streets."
    assert copies[0]["prompt_version"] == "rule_corruption_v1" and copies[0]["n_generated_tokens"] == 0
    scored = {**copies[0], "signals": {"relevance_total": 2.9}, "constraint_checks": recheck([rule], copies[0]["response"]),
              "filter_reasons": ["constraint_failed"]}
    files["corrupted_scored"].append(scored)
    config = Stage2Config(seed=7, num_instructions=1, num_candidates=2, instruction_settings={}, response={}, constraint_fraction=1.0,
                          signals=["relevance_total"], min_signal_margin=1.0, corrupted_pairs=True)
    outcomes = Counter()
    _form_pairs(files, [instruction], {"st2-r00-00001": candidates}, config, signals, outcomes)
    pairs = {p["id"]: p for p in files["pairs"].records}
    assert set(pairs) == {"st2-r00-00001:checker", "st2-r00-00001:corrupted"}, outcomes
    corrupted = pairs["st2-r00-00001:corrupted"]
    assert (corrupted["chosen"], corrupted["rejected"]) == (passing, scored["response"]) and corrupted["margin"] == 1.0
    assert corrupted["corruption"] == {"operation": "comma_after_first_word", "broken": ["no_commas"]}
    assert "comma_after_first_word" in corrupted["reason"] and corrupted["rejected_scores"]["constraints_passed"] == 0.0
    # The signal pair would need two candidates that both pass the constraint: the failing one cannot play.
    assert outcomes["signal-relevance_total: fewer than two eligible candidates"] == 1
    for appender in files.values():
        appender.close()


def _pair(key: str, chosen_tokens: int, rejected_tokens: int, chosen: str = "a", rejected: str = "b", source: str = "checker") -> dict:
    return {"id": key, "instruction_id": key.split(":")[0], "instruction": "Do it.", "source": source, "signal": None,
            "chosen": chosen, "rejected": rejected, "n_chosen_tokens": chosen_tokens, "n_rejected_tokens": rejected_tokens,
            "margin": 1.0, "margin_kind": "constraints_passed"}


def test_pair_qc_gate_bounds_length_ratio_and_counts_duplicates():
    from utils.preference_pairs import dedupe_pairs, pair_qc

    balanced = [_pair(f"i{i}:checker", 10, 10, chosen=f"c{i}") for i in range(3)]
    qc = pair_qc(balanced, {"min_pairs": 3})
    assert qc["passed"] and qc["pairs_per_source"] == {"checker": 3} and qc["length_ratio"]["all"]["median"] == 1.0
    longer = [_pair(f"i{i}:checker", 20, 10, chosen=f"c{i}") for i in range(3)]
    failed = pair_qc(longer, {"min_pairs": 3})
    assert not failed["passed"] and failed["failures"] == ["median_length_ratio_max = 2.0 (needs <= 1.5)"]
    assert failed["chosen_longer_share"] == 1.0
    shorter = pair_qc([_pair(f"i{i}:checker", 5, 10, chosen=f"c{i}") for i in range(3)], {"min_pairs": 3})
    assert shorter["failures"] == ["median_length_ratio_min = 0.5 (needs >= 0.6667)"]
    assert pair_qc(balanced, {"min_pairs": 4})["failures"] == ["pairs = 3 (needs >= 4)"]
    repeated = balanced + [{**balanced[0], "id": "i9:signal-ab_margin", "source": "signal", "signal": "ab_margin"}]
    assert pair_qc(repeated, {"min_pairs": 1})["failures"] == ["duplicate_pairs = 1 (needs == 0)"]
    kept, removed = dedupe_pairs(repeated)
    assert removed == 1 and [p["id"] for p in kept] == ["i0:checker", "i1:checker", "i2:checker"]
    same = pair_qc([_pair("i0:checker", 10, 10, chosen="x", rejected="x ")], {"min_pairs": 1})
    assert same["failures"] == ["identical_sides = 1 (needs == 0)"]


# ---- the script end to end on the trained tiny model ------------------------------------------------
def _ids(path: Path) -> list[str]:
    return [r["id"] for r in read_jsonl_lines(path)]


def test_run_writes_typed_records_pairs_with_reasons_and_a_manifest(stage1, finished):
    from utils.constraints import TRAINED_FAMILIES
    from utils.preference_pairs import PHASE_FILES
    from utils.provenance_helper import sha256_file
    from utils.records import RECORD_KINDS, field_names

    out, manifest = finished["out"], finished["manifest"]
    kinds = {"selected": "preference instruction", "responses": "response", "scored": "scored response",
             "pairs": "preference pair", "corrupted_scored": "scored response"}
    for name, kind in kinds.items():
        for record in read_jsonl_lines(out / PHASE_FILES[name]):
            assert set(record) == set(field_names(RECORD_KINDS[kind])), name
    for name in PHASE_FILES:
        ids = _ids(out / PHASE_FILES[name])
        assert len(ids) == len(set(ids)), f"duplicate ids in {name}"
    selected = read_jsonl_lines(out / PHASE_FILES["selected"])
    used = {r["id"] for r in selected if not r["excluded"]}
    answered = {r["instruction_id"] for r in read_jsonl_lines(out / PHASE_FILES["responses"])}
    assert answered <= used and len(answered) == 4
    # A fresh instruction that overlaps a Stage 1 training instruction or a test one is excluded, never answered.
    for record in selected:
        assert record["excluded"] == bool(record["overlaps"])
        assert record["id"].startswith("st2-r") and (not record["constraints"] or record["instruction"].startswith(record["task"]))
    # Constraints only from the trained families, in training wordings (the held-out ones measure generalisation).
    constraints = [c for r in selected for c in r["constraints"]]
    assert constraints and all(c["family"] in TRAINED_FAMILIES and ".train" in c["wording_id"] for c in constraints)
    pairs = read_jsonl_lines(out / "preference_pairs.jsonl")
    assert pairs and manifest["records"] == len(pairs) and manifest["qc"]["passed"] is True
    for pair in pairs:
        assert pair["source"] in ("checker", "signal", "corrupted") and pair["reason"] and pair["margin"] > 0
        assert pair["chosen"] != pair["rejected"] and pair["instruction_id"] in answered
        assert {"signals", "constraint_checks", "filter_reasons", "n_response_tokens"} <= set(pair["chosen_scores"]) & set(pair["rejected_scores"])
        assert not pair["chosen_scores"]["filter_reasons"] or pair["chosen_scores"]["filter_reasons"] == []
    assert manifest["outputs"]["data"]["sha256"] == sha256_file(out / "preference_pairs.jsonl")
    assert manifest["stage1_adapter"]["path"] == str(stage1["adapter"]) and manifest["critic_signals"]["trusted"]
    assert manifest["config"]["seed"] == 7 and manifest["config"]["instruction_settings"]["seed"] == 7  # not the pilot's 42
    assert set(manifest["inputs"]) == {"stage1_evaluation", "pilot_manifest", "test_set", "stage1_training_data"}
    assert "git_hash" in manifest and manifest["environment"]["packages"]["trl"]
    qc = manifest["qc"]
    assert set(qc["pairs_per_source"]) <= {"checker", "corrupted", "signal:relevance_total", "signal:ab_margin"}
    assert sum(qc["pairs_per_source"].values()) == len(pairs) and "PAIR QC PASSED" in finished["stdout"]


def test_rerun_resumes_refuses_other_settings_and_gates_on_qc(stage1, finished):
    out = finished["out"]
    before = (out / "preference_pairs.jsonl").read_bytes()
    # A stricter gate on the same data: nothing is generated again, QC fails, exit 4, the manifest says why.
    again = run_stage2(["--stage1-evaluation", stage1["evaluation"], "--output", out, *TINY, "--min-pairs", 1000], timeout=600)
    assert again.returncode == 4, again.stderr[-2000:]
    assert "resuming" in again.stdout and (out / "preference_pairs.jsonl").read_bytes() == before
    manifest = json.loads((out / "session_manifest.json").read_text())
    assert manifest["qc"]["passed"] is False and manifest["qc"]["failures"][0].startswith("pairs = ")
    other = run_stage2(["--stage1-evaluation", stage1["evaluation"], "--output", out, *TINY, "--num-candidates", 2], timeout=600)
    assert other.returncode == 2 and "config.num_candidates: 3 -> 2" in other.stderr, other.stderr[-2000:]


def test_a_killed_run_resumes_without_duplicates(stage1, finished, tmp_path):
    """A crash mid-run: the last lines of two phase files lost (one torn), the dataset and manifest never
    written. The rerun completes with every record once and the same pairs as the run that never broke."""
    import shutil

    from utils.preference_pairs import PHASE_FILES

    out = tmp_path / "stage2"
    shutil.copytree(finished["out"], out)
    for name in ("scored", "pairs"):
        lines = (out / PHASE_FILES[name]).read_text().splitlines(keepends=True)
        (out / PHASE_FILES[name]).write_text("".join(lines[:-2]) + lines[-2][: len(lines[-2]) // 2])
    (out / "session_manifest.json").unlink()
    (out / "preference_pairs.jsonl").unlink()
    resumed = run_stage2(["--stage1-evaluation", stage1["evaluation"], "--output", out, *TINY], timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stdout and "torn last line" in resumed.stderr
    for name in PHASE_FILES:
        ids = _ids(out / PHASE_FILES[name])
        assert len(ids) == len(set(ids)) and set(ids) == set(_ids(finished["out"] / PHASE_FILES[name])), name
    # The same pairs; the re-scored candidates' scores may differ in the last digits (other batch padding).
    resumed_pairs, original = (read_jsonl_lines(folder / "preference_pairs.jsonl") for folder in (out, finished["out"]))
    assert [(p["id"], p["chosen"], p["rejected"]) for p in resumed_pairs] == [(p["id"], p["chosen"], p["rejected"]) for p in original]
    assert [p["margin"] for p in resumed_pairs] == pytest.approx([p["margin"] for p in original], rel=1e-3, abs=1e-3)


def test_a_sigkilled_run_resumes(stage1, finished, tmp_path):
    out = tmp_path / "stage2"
    command = [sys.executable, str(SCRIPT), "--stage1-evaluation", str(stage1["evaluation"]), "--output", str(out), *map(str, TINY)]
    proc = subprocess.Popen(command, cwd=ROOT, env=script_env(OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    target, deadline = out / "phase4_responses.jsonl", time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (target.exists() and target.stat().st_size > 0):
        time.sleep(0.02)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "session_manifest.json").exists()
    resumed = run_stage2(["--stage1-evaluation", stage1["evaluation"], "--output", out, *TINY], timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for name in ("phase4_responses.jsonl", "phase4_scored_responses.jsonl", "phase6_pairs.jsonl"):
        ids = _ids(out / name)
        assert len(ids) == len(set(ids)), name
    assert len({r["instruction_id"] for r in read_jsonl_lines(out / "phase4_scored_responses.jsonl")}) == 4
    # Wherever the kill fell (between batches or inside one), each candidate was sampled from its own seed: the
    # resumed run wrote the uninterrupted run's candidates, and so its pairs.
    responses = {folder: {r["id"]: r["raw_response"] for r in read_jsonl_lines(folder / "phase4_responses.jsonl")}
                 for folder in (out, finished["out"])}
    assert responses[out] == responses[finished["out"]]
    resumed_pairs, original = (read_jsonl_lines(folder / "preference_pairs.jsonl") for folder in (out, finished["out"]))
    assert [(p["id"], p["chosen"], p["rejected"]) for p in resumed_pairs] == [(p["id"], p["chosen"], p["rejected"]) for p in original]


def test_a_run_killed_inside_a_response_batch_writes_what_the_unbroken_run_wrote(stage1, finished, tmp_path):
    """A crash after the first candidate of a batch (of 8) was written: the rerun batches the candidates left from
    another first record, and each is sampled from its own seed, so it writes the unbroken run's candidates."""
    import shutil

    from utils.preference_pairs import PHASE_FILES

    out = tmp_path / "stage2"
    shutil.copytree(finished["out"], out)
    lines = (out / PHASE_FILES["responses"]).read_text().splitlines(keepends=True)
    (out / PHASE_FILES["responses"]).write_text(lines[0] + lines[1][: len(lines[1]) // 2])
    for name in ("scored", "corrupted_responses", "corrupted_scored", "pairs"):
        (out / PHASE_FILES[name]).unlink()
    (out / "session_manifest.json").unlink()
    (out / "preference_pairs.jsonl").unlink()
    resumed = run_stage2(["--stage1-evaluation", stage1["evaluation"], "--output", out, *TINY], timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    responses = {folder: {r["id"]: r["raw_response"] for r in read_jsonl_lines(folder / PHASE_FILES["responses"])}
                 for folder in (out, finished["out"])}
    assert len(responses[out]) == len(lines) == 12 and responses[out] == responses[finished["out"]]
    resumed_pairs, original = (read_jsonl_lines(folder / "preference_pairs.jsonl") for folder in (out, finished["out"]))
    assert [(p["id"], p["chosen"], p["rejected"]) for p in resumed_pairs] == [(p["id"], p["chosen"], p["rejected"]) for p in original]
