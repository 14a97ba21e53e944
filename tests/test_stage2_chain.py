"""The whole Stage 2 chain on the trained tiny model: the real Stage 1 evaluation, preference pairs,
two DPO steps, and the three-way evaluation (Stage 2 adapter vs Stage 1 adapter vs base).

The tiny model's Stage 1 adapter cannot pass the real evaluation gate (exit 4), so its results file
is marked passed after it ran, standing in for a Stage 1 run that passed; everything else is as a
user runs it.
"""

from __future__ import annotations

import json

import pytest

from conftest import read_jsonl_lines, run_python_script, script_env
from test_stage2_pairs import TINY, build_stage1_workspace


def _run(script, *args):
    return run_python_script(script, *args, env=script_env(OMP_NUM_THREADS="1"), timeout=900)


@pytest.mark.slow  # pairs, DPO and two evaluations end to end: 40-90 s on 2 shared cores
def test_the_whole_stage2_chain(trained_model_dir, tmp_path):
    from utils.provenance_helper import write_manifest_atomic
    from utils.sft_training import adapter_file_hashes

    ws = build_stage1_workspace(tmp_path, trained_model_dir)
    decoding = ["--max-new-tokens", 16, "--batch-size", 8, "--no-progress"]
    stage1_eval = tmp_path / "results" / "sft_eval"
    done = _run("evaluate_stage1_sft.py", "--sft-checkpoint", ws["adapter"], "--test-set", ws["test_set"], "--output", stage1_eval, *decoding)
    assert done.returncode in (0, 4), done.stderr[-3000:]
    results = json.loads((stage1_eval / "evaluation_results.json").read_text())
    write_manifest_atomic(stage1_eval / "evaluation_results.json", {**results, "gate": {**results["gate"], "passed": True}})

    pairs = tmp_path / "artifacts" / "stage2"
    done = _run("generate_stage2_preference_data.py", "--stage1-evaluation", stage1_eval / "evaluation_results.json", "--output", pairs, *TINY)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    dpo = tmp_path / "checkpoints" / "stage2_dpo"
    done = _run("train_stage2_dpo.py", "--pairs", pairs / "preference_pairs.jsonl", "--output", dpo, "--max-steps", 2, "--grad-accum", 1,
                "--logging-steps", 1, "--val-fraction", 0, "--lr", 1e-3)
    assert done.returncode == 0, done.stderr[-3000:]
    training = json.loads((dpo / "training_manifest.json").read_text())
    assert training["global_step"] == 2 and training["loss_history"]["train"][0]["loss"] == pytest.approx(0.693147, abs=1e-5)

    stage2_eval = tmp_path / "results" / "stage2_eval"
    done = _run("evaluate_stage1_sft.py", "--sft-checkpoint", dpo / "final_adapter", "--reference-checkpoint", ws["adapter"],
                "--test-set", ws["test_set"], "--output", stage2_eval, *decoding)
    assert done.returncode in (0, 4), done.stderr[-3000:]
    results = json.loads((stage2_eval / "evaluation_results.json").read_text())
    assert set(results["comparisons"]) == {"adapter_vs_base", "adapter_vs_reference", "reference_vs_base"}
    assert results["gate"] == results["comparisons"]["adapter_vs_reference"]["gate"] and results["gate_comparison"] == "adapter_vs_reference"
    assert results["gate"]["passed"] == (done.returncode == 0) and results["gate"]["compared"] == {"first": "reference", "second": "adapter"}
    for comparison in results["comparisons"].values():
        assert comparison["statistics"]["overall"]["n_scored"] == 10 and len(comparison["statistics"]["multiple_comparisons"]["raw_p"]) == 5
    # Both adapters' provenance, and the reference really is the Stage 1 adapter: its greedy answers are
    # the ones the Stage 1 evaluation got from it, and the base answers are the same base answers.
    models = results["models"]
    assert models["reference"]["adapter_files_sha256"] == adapter_file_hashes(ws["adapter"])
    assert models["sft"]["training_success"]["script"] == "train_stage2_dpo.py"
    assert models["sft"]["training_success"]["reference_adapter"]["files_sha256"] == adapter_file_hashes(ws["adapter"])
    answers = {name: {r["id"]: r["raw_response"] for r in read_jsonl_lines(folder / f"{side}_responses.jsonl")}
               for name, folder, side in (("stage1", stage1_eval, "sft"), ("reference", stage2_eval, "reference"),
                                          ("base1", stage1_eval, "base"), ("base2", stage2_eval, "base"))}
    assert answers["reference"] == answers["stage1"] and answers["base2"] == answers["base1"]
    assert results["outputs"]["reference_responses"]["sha256"] and "reference_training_data" in results
    summary = (stage2_eval / "evaluation_summary.txt").read_text()
    assert "three-way" in summary and "adapter vs reference:" in summary and "reference vs base:" in summary
