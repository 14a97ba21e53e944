"""Paired evaluation: statistics tables, BH and method selection, the contamination check, the gate,
and the script end to end on a tiny random Llama with a random (non-zero) LoRA adapter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import run_python_script, script_env
from utils import evaluation as ev
from utils.exit_codes import BadInputError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "evaluate_stage1_sft.py"


def _pairs(type_name, both, base_only, sft_only, neither, prefix=None):
    prefix = prefix or type_name
    cells = [(True, True)] * both + [(True, False)] * base_only + [(False, True)] * sft_only + [(False, False)] * neither
    return [{"id": f"{prefix}-{i}", "type": type_name, "scored": True, "base_success": b, "sft_success": s}
            for i, (b, s) in enumerate(cells)]


# ---- statistics ------------------------------------------------------------------------------
def test_paired_statistics_per_type_bh_and_method_selection():
    from statsmodels.stats.multitest import multipletests
    from statsmodels.stats.proportion import proportion_confint

    pairs = (_pairs("factual", 5, 2, 30, 3) + _pairs("explanation", 4, 3, 5, 8) + _pairs("creative", 6, 0, 0, 4)
             + [{"id": "x1", "type": "benchmark", "scored": False, "base_success": False, "sft_success": False}])
    stats = ev.paired_statistics(pairs, alpha=0.01)
    factual, explanation, creative = (stats["per_type"][t] for t in ("factual", "explanation", "creative"))
    assert list(stats["per_type"]) == ["factual", "explanation", "creative"]  # TYPES order, unknown type left out
    assert factual["n_scored"] == 40 and factual["base"]["successes"] == 7 and factual["sft"]["successes"] == 35
    assert factual["mcnemar"]["method"] == "chi2_continuity_corrected" and factual["mcnemar"]["favours"] == "sft"
    assert explanation["mcnemar"]["method"] == "exact_binomial" and (explanation["mcnemar"]["b"], explanation["mcnemar"]["c"]) == (3, 5)
    assert creative["mcnemar"]["p_value"] == 1.0 and creative["cohens_h"] == 0.0
    assert factual["base"]["ci95"] == pytest.approx(list(proportion_confint(7, 40, method="wilson")))
    assert factual["cohens_h"] > 0.8
    raw = [stats["per_type"][t]["mcnemar"]["p_value"] for t in ("factual", "explanation", "creative")]
    reject, adjusted, _, _ = multipletests(raw, alpha=0.01, method="fdr_bh")
    mc = stats["multiple_comparisons"]
    assert mc["raw_p"] == raw and mc["adjusted"] == pytest.approx(list(adjusted)) and mc["reject"] == list(reject)
    assert factual["bh_adjusted_p"] == pytest.approx(adjusted[0]) and factual["bh_reject"] is True
    assert explanation["bh_reject"] is False
    overall = stats["overall"]
    assert overall["n_scored"] == 70 and (overall["mcnemar"]["b"], overall["mcnemar"]["c"]) == (5, 35)
    assert stats["unscored"] == {"n": 1, "by_type": {"benchmark": 1}, "ids": ["x1"]}
    assert "exact binomial when b + c < 25" in stats["mcnemar_method_rule"]


def test_gate_decision_rules():
    clean = {"found": False, "n_contaminated": 0, "overlaps": []}
    dirty = {"found": True, "n_contaminated": 1, "overlaps": [{"test_id": "t7"}]}
    strong = ev.paired_statistics(_pairs("factual", 5, 2, 30, 3), alpha=0.01)
    weak = ev.paired_statistics(_pairs("factual", 5, 3, 5, 3), alpha=0.01)
    worse = ev.paired_statistics(_pairs("factual", 5, 30, 2, 3), alpha=0.01)
    assert ev.gate_decision(strong, clean, 0.01, False)["passed"]
    assert not ev.gate_decision(weak, clean, 0.01, False)["passed"]
    assert any("SFT is not ahead" in r for r in ev.gate_decision(worse, clean, 0.01, False)["reasons"])
    blocked = ev.gate_decision(strong, dirty, 0.01, False)
    assert not blocked["passed"] and "t7" in blocked["reasons"][0]
    assert ev.gate_decision(strong, dirty, 0.01, True)["passed"]
    none_scored = ev.paired_statistics([{"id": "a", "type": None, "scored": False, "base_success": False, "sft_success": False}], 0.01)
    assert none_scored["overall"] is None and not ev.gate_decision(none_scored, clean, 0.01, False)["passed"]


def test_summary_and_plot(tmp_path):
    stats = ev.paired_statistics(_pairs("factual", 5, 2, 30, 3) + _pairs("list_generation", 1, 1, 2, 6), alpha=0.01)
    gate = ev.gate_decision(stats, {"found": False, "n_contaminated": 0, "overlaps": []}, 0.01, False)
    text = ev.format_summary(stats, gate, None, ["header line"])
    assert "header line" in text and "OVERALL" in text and "list_generation" in text and "GATE PASSED" in text
    assert "chi2cc" in text and "exact" in text
    png = ev.plot_success_rates(stats, tmp_path / "rates.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- contamination ---------------------------------------------------------------------------
TRAINING = [{"id": "tr1", "instruction": "What is the capital of France?"},
            {"id": "tr2", "instruction": "Write a short poem about the quiet blue ocean at night under the stars."},
            {"id": "tr3", "instruction": "Please tell me in detail how the heart pumps blood around the body today."}]


def test_contamination_exact_near_ngram_and_none():
    tests = [{"id": "t-exact", "instruction": "what is the CAPITAL of france"},
             {"id": "t-near", "instruction": "Write a short poem about the quiet blue ocean at night under the moon."},
             {"id": "t-ngram", "instruction": "Explain how the heart pumps blood around the body today, step by step, for a "
                                              "child who loves football and drawing pictures."},
             {"id": "t-clean", "instruction": "List five musical instruments."}]
    report = ev.check_contamination(tests, TRAINING)
    kinds = {o["test_id"]: {m["kind"]: m for m in o["matches"]} for o in report["overlaps"]}
    assert set(kinds) == {"t-exact", "t-near", "t-ngram"} and report["found"] and report["n_contaminated"] == 3
    assert kinds["t-exact"]["exact"]["training_id"] == "tr1"
    assert kinds["t-near"]["near"]["training_id"] == "tr2" and kinds["t-near"]["near"]["jaccard"] >= 0.7
    assert "exact" not in kinds["t-near"]
    assert set(kinds["t-ngram"]) == {"ngram"}  # low Jaccard, but 8 consecutive words shared
    assert kinds["t-ngram"]["ngram"]["shared_ngram"] == "how the heart pumps blood around the body"
    assert kinds["t-ngram"]["ngram"]["training_instruction"] == TRAINING[2]["instruction"]
    clean = ev.check_contamination(tests[3:], TRAINING)
    assert not clean["found"] and clean["overlaps"] == [] and clean["by_kind"] == {"exact": 0, "near": 0, "ngram": 0}


def test_load_test_records_ids_and_errors(tmp_path):
    good = tmp_path / "bench.jsonl"
    good.write_text(json.dumps({"instruction": "Say hi."}) + "\n\n" + json.dumps({"id": 7, "instruction": "Bye."}) + "\n")
    assert [r["id"] for r in ev.load_test_records(good)] == ["line-1", "7"]
    for name, lines, fragment in (("missing", [{"id": "a", "instruction": "x"}, {"id": "b", "prompt": "y"}], ":2: missing"),
                                  ("dup", [{"id": "a", "instruction": "x"}, {"id": "a", "instruction": "y"}], ":2: duplicate id"),
                                  ("meta", [{"id": "a", "type": "factual", "instruction": "x"}], ":1: ")):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in lines))
        with pytest.raises(BadInputError, match=f"{name}.jsonl{fragment}"):
            ev.load_test_records(path)


# ---- end to end ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return build_workspace(tmp_path_factory.mktemp("eval"))


def build_workspace(root):
    """A tiny base model, a random LoRA adapter with the training script's marker and manifest,
    its training data, and a test set of 10 typed records plus 2 of an unknown type."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tiny_models import build_tiny_model
    from utils.clean_model_loader import CleanModelLoader
    from utils.provenance_helper import create_artifact_metadata, create_session_manifest, sha256_file, write_manifest_atomic
    from utils.sft_training import adapter_file_hashes
    from utils.test_set import build_test_set

    model_dir = build_tiny_model(root / "tiny-base")
    data = root / "sft.jsonl"
    data.write_text("".join(json.dumps({"id": f"r{i}", "instruction": f"Name {i} kinds of cheese.", "response": "Brie."}) + "\n"
                            for i in range(6)))
    model, _, provenance = CleanModelLoader(str(model_dir), run_sentinels=False).load()
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj", "o_proj"],
                                                  init_lora_weights=False, task_type="CAUSAL_LM"))
    out = root / "stage1_sft"
    adapter = out / "final_adapter"
    peft_model.save_pretrained(adapter)
    manifest = create_session_manifest(
        "train_sft", {"model": str(model_dir), "data": str(data), "output": str(out)}, inputs={"data": data},
        outputs={"adapter_weights": adapter / "adapter_model.safetensors", "adapter_config": adapter / "adapter_config.json"},
        dataset={"path": str(data), "sha256": sha256_file(data)}, base_model_provenance=provenance)
    write_manifest_atomic(out / "training_manifest.json", manifest)
    marker = create_artifact_metadata("lora_adapter", "train_stage1_sft.py", model_name=provenance.get("model_id"),
                                      loader_provenance=provenance, dataset_sha256=sha256_file(data), dataset_path=str(data),
                                      data_manifest=str(root / "sft.manifest.json"),
                                      training_manifest=str(out / "training_manifest.json"), global_step=1,
                                      final_eval_loss=None, quantization="none",
                                      adapter_files_sha256=adapter_file_hashes(adapter))
    write_manifest_atomic(adapter / "TRAINING_SUCCESS", marker)
    test_set = root / "test.jsonl"
    records = build_test_set(count=10) + [{"instruction": "Translate 'cat' into French.", "type": "translation"},
                                          {"id": "bench-2", "instruction": "Summarize the plot of Hamlet."}]
    test_set.write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"root": root, "adapter": adapter, "test_set": test_set, "data": data, "records": records}


def run_script(args, timeout=300):
    return run_python_script(SCRIPT, *args, "--no-progress", env=script_env(OMP_NUM_THREADS="1"), timeout=timeout)


def test_refuses_without_training_success_marker(workspace, tmp_path):
    adapter = tmp_path / "final_adapter"
    shutil.copytree(workspace["adapter"], adapter)
    (adapter / "TRAINING_SUCCESS").unlink()
    proc = run_script(["--sft-checkpoint", adapter, "--test-set", workspace["test_set"], "--output", tmp_path / "out"])
    assert proc.returncode == 3, proc.stderr
    assert "TRAINING_SUCCESS" in proc.stderr and not (tmp_path / "out").exists()


def test_bad_test_set_exits_2_naming_file_and_line(workspace, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "instruction": "Say hi."}) + "\n" + json.dumps({"id": "b", "question": "?"}) + "\n")
    proc = run_script(["--sft-checkpoint", workspace["adapter"], "--test-set", bad, "--output", tmp_path / "out"])
    assert proc.returncode == 2, proc.stderr
    assert f"{bad}:2: missing or empty 'instruction'" in proc.stderr


def test_end_to_end_outputs_unscored_resume_and_gate(workspace, tmp_path):
    out = tmp_path / "eval"
    common = ["--sft-checkpoint", workspace["adapter"], "--test-set", workspace["test_set"], "--output", out,
              "--max-new-tokens", "12", "--batch-size", "4"]
    proc = run_script(common)
    assert proc.returncode == 4, proc.stdout[-2000:] + proc.stderr[-3000:]  # a random adapter is no improvement
    assert "12 to generate" in proc.stdout
    for name in ("base_responses.jsonl", "sft_responses.jsonl", "evaluation_summary.txt", "success_rates.png",
                 "evaluation_results.json"):
        assert (out / name).is_file(), name
    base_rows = [json.loads(line) for line in (out / "base_responses.jsonl").read_text().splitlines()]
    sft_rows = [json.loads(line) for line in (out / "sft_responses.jsonl").read_text().splitlines()]
    assert len(base_rows) == len(sft_rows) == 12
    row = base_rows[0]
    assert {"id", "type", "instruction", "raw_response", "response", "was_cut", "finish_reason", "n_generated_tokens", "score",
            "prompt_version"} <= set(row) and "raw_output" not in row
    assert {r["id"] for r in base_rows} >= {"line-11", "bench-2"}
    assert [r["raw_response"] for r in sorted(base_rows, key=lambda r: r["id"])] != \
           [r["raw_response"] for r in sorted(sft_rows, key=lambda r: r["id"])]  # the adapter changes the output
    unknown = [r for r in sft_rows if r["id"] in ("line-11", "bench-2")]
    assert all(r["score"]["scored"] is False for r in unknown)

    results = json.loads((out / "evaluation_results.json").read_text())
    stats = results["statistics"]
    assert stats["n_records"] == 12 and stats["n_scored"] == 10
    assert stats["unscored"]["n"] == 2 and set(stats["unscored"]["ids"]) == {"line-11", "bench-2"}
    assert set(stats["per_type"]) == {"factual", "explanation", "list_generation", "instruction_following", "creative"}
    assert stats["multiple_comparisons"]["method"] == "benjamini_hochberg" and len(stats["multiple_comparisons"]["adjusted"]) == 5
    assert stats["overall"]["mcnemar"]["method"] in ("exact_binomial", "chi2_continuity_corrected")
    assert results["gate"]["passed"] is False and results["contamination"]["found"] is False
    assert results["decoding"]["temperature"] == 0.0 and results["decoding"]["max_new_tokens"] == 12
    assert results["decoding"]["answer_end"] == "block" and "\n\n" not in results["decoding"]["stop_strings"]
    from utils.provenance_helper import sha256_file

    sft_info = results["models"]["sft"]
    assert sft_info["adapter_weights_sha256"] == sha256_file(workspace["adapter"] / "adapter_model.safetensors")
    assert sft_info["training_success"]["dataset_sha256"] == sha256_file(workspace["data"])
    assert results["test_set"]["sha256"] == sha256_file(workspace["test_set"]) and results["models"]["base"]["provenance"]
    assert "git_hash" in results and results["outputs"]["sft_responses"]["sha256"] == sha256_file(out / "sft_responses.jsonl")
    summary = (out / "evaluation_summary.txt").read_text()
    assert "GATE FAILED" in summary and "unscored records" in summary

    # Rerun against training data holding a test instruction: nothing is generated again, and the
    # contamination is named and fails the gate.
    contaminated = tmp_path / "contaminated.jsonl"
    leaked = workspace["records"][0]["instruction"]
    contaminated.write_text(json.dumps({"id": "leak-1", "instruction": leaked.upper(), "response": "x"}) + "\n")
    before = {name: (out / name).read_text() for name in ("base_responses.jsonl", "sft_responses.jsonl")}
    proc = run_script(common + ["--training-data", contaminated])
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert "12 of 12 responses already on disk, 0 to generate" in proc.stdout
    assert {name: (out / name).read_text() for name in before} == before
    results = json.loads((out / "evaluation_results.json").read_text())
    overlap = results["contamination"]["overlaps"][0]
    assert results["contamination"]["found"] and overlap["test_id"] == workspace["records"][0]["id"]
    assert overlap["matches"][0] == {"kind": "exact", "training_id": "leak-1", "training_instruction": leaked.upper()}
    assert any("contamination" in reason for reason in results["gate"]["reasons"])
    assert results["training_data"]["matches_recorded"] is False and results["generation"]["sft"]["generated_now"] == 0


def test_resume_refuses_responses_made_with_other_settings(tmp_path):
    path = tmp_path / "base_responses.jsonl"
    path.write_text(json.dumps({"id": "a", "instruction": "Say hi.", "generation_key": "old"}) + "\n")
    records = [{"id": "a", "instruction": "Say hi."}]
    with pytest.raises(BadInputError, match="another model, adapter, prompt, decoding or instruction"):
        ev.generate_responses("base", None, records, path, None, "new")


def test_constraint_breakdown_reports_trained_and_held_out_families_separately():
    from utils.evaluation import constraint_breakdown, format_summary, gate_decision, paired_statistics
    from utils.test_set import build_test_set

    records = build_test_set(count=50, seed=5)  # 10 per type; instruction_following alternates trained / held out
    constrained = [r for r in records if r["type"] == "instruction_following"]
    assert {r["constraint_split"] for r in constrained} == {"trained", "held_out"}
    # SFT succeeds on every trained-family record and fails every held-out one; base fails all.
    pairs = [{"id": r["id"], "type": r["type"], "scored": True, "base_success": False,
              "sft_success": r.get("constraint_split") == "trained"} for r in records]
    breakdown = constraint_breakdown(records, pairs)
    trained, held_out = breakdown["by_split"]["trained"], breakdown["by_split"]["held_out"]
    n_trained = sum(r["constraint_split"] == "trained" for r in constrained)
    assert trained["n_scored"] == n_trained and trained["sft"]["successes"] == n_trained
    assert held_out["sft"]["successes"] == 0 and held_out["n_scored"] == len(constrained) - n_trained
    families = {c["family"] for r in constrained for c in r["constraints"]}
    assert set(breakdown["by_family"]) == families
    assert sum(row["n"] for row in breakdown["by_family"].values()) == sum(len(r["constraints"]) for r in constrained)
    statistics = paired_statistics(pairs, alpha=0.01)
    statistics["constraint_families"] = breakdown
    summary = format_summary(statistics, gate_decision(statistics, None, 0.01, False), None)
    assert "held_out" in summary and "trained" in summary
    # A test set without constrained records (an outside benchmark) has no breakdown.
    plain = [{"id": "x1", "type": "factual", "instruction": "q"}]
    assert constraint_breakdown(plain, [{"id": "x1", "type": "factual", "scored": True, "base_success": 1, "sft_success": 0}]) is None
