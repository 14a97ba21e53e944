"""Training --resume on the tiny random Llama (CPU): a refused resume changes nothing in --output, the
run identity is the model's content (not its name), hyperparameter changes are refused unless
allowed (and then recorded), and a resumed run's final_train_loss covers every step of the run.

One finished run (4 steps, checkpoints at 2 and 4, loss logged every 3 steps) is shared; each test
works on its own copy of that output folder.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from test_train_sft import run_main, write_dataset

# Logging every 3 steps while saving every 2: the checkpoint at step 2 holds a logged loss only
# because a save forces a log (the whole-run loss of a resumed run needs it).
RUN = ["--quantization", "none", "--max-steps", "4", "--save-steps", "2", "--logging-steps", "3", "--grad-accum", "2",
       "--val-fraction", "0.2", "--lr", "5e-2"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """Every test here trains a tiny model."""


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    from tiny_models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("other") / "tiny-other", seed=1)  # same tokenizer, other weights


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir):
    """A run trained to the end through the symlink `cur` -> the tiny model."""
    root = tmp_path_factory.mktemp("finished")
    data = write_dataset(root / "data")
    link = root / "cur"
    link.symlink_to(tiny_model_dir, target_is_directory=True)
    out = root / "out"
    assert run_main(["--data", data, "--model", link, "--output", out, *RUN]) == 0
    return {"data": data, "link": link, "target": tiny_model_dir, "out": out}


def snapshot(folder) -> dict:
    from utils.provenance_helper import sha256_file

    return {p.relative_to(folder).as_posix(): sha256_file(p) if p.is_file() else "folder" for p in sorted(folder.rglob("*"))}


def copy_run(finished_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished_run["out"], out)
    return out


def test_finished_run_records_model_identity_hyperparameters_and_adapter_hashes(finished_run, tiny_model_dir):
    from utils.sft_training import adapter_file_hashes

    out = finished_run["out"]
    identity = json.loads((out / "run_identity.json").read_text())
    assert identity["model_identity"]["weights_fingerprint"] and identity["hyperparameters"]["lr"] == 5e-2
    assert identity["hyperparameters"]["quantization"] == "none" and identity["hyperparameter_changes"] == []
    marker = json.loads((out / "final_adapter" / "TRAINING_SUCCESS").read_text())
    hashes = adapter_file_hashes(out / "final_adapter")
    assert marker["adapter_files_sha256"] == hashes and {"adapter_model.safetensors", "adapter_config.json"} <= set(hashes)
    assert "TRAINING_SUCCESS" not in hashes


@pytest.mark.parametrize("case", ["other_model", "other_weights_same_name", "other_dataset", "changed_hyperparameters",
                                  "identity_not_an_object"])
def test_refused_resume_changes_nothing_in_output(case, finished_run, other_model_dir, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path)
    data, model, extra = finished_run["data"], finished_run["link"], []
    if case == "other_model":
        model = other_model_dir
    elif case == "other_dataset":
        data = write_dataset(tmp_path / "other_data", n=12)
    elif case == "changed_hyperparameters":
        extra = ["--lr", "0.01", "--seed", "7", "--lora-r", "8"]
    elif case == "identity_not_an_object":
        (out / "run_identity.json").write_text("[]\n")
    before = snapshot(out)
    try:
        if case == "other_weights_same_name":  # the name the run was trained with now points at other weights
            model.unlink()
            model.symlink_to(other_model_dir, target_is_directory=True)
        code = run_main(["--data", data, "--model", model, "--output", out, *RUN, *extra, "--resume"])
    finally:
        if case == "other_weights_same_name":
            model.unlink()
            model.symlink_to(finished_run["target"], target_is_directory=True)
    err = capsys.readouterr().err
    expected = {"other_model": (3, "not on the model loaded now"), "other_weights_same_name": (3, "weights_fingerprint"),
                "other_dataset": (3, "not on this dataset"),
                "changed_hyperparameters": (2, "--lr: recorded 0.05, now 0.01; --seed: recorded 42, now 7; --lora-r: recorded 16, now 8"),
                "identity_not_an_object": (3, "run_identity.json: expected a JSON object")}[case]
    assert code == expected[0], err
    assert expected[1] in err
    assert snapshot(out) == before, "a refused resume must leave --output exactly as it was"


def test_resume_by_another_path_to_the_same_weights_and_whole_run_loss(finished_run, tiny_model_dir, tmp_path):
    """Killed after checkpoint-2 (simulated by removing what came later); resumed through a relative
    path to the same weights: the run continues, and final_train_loss equals the uninterrupted run's."""
    out = copy_run(finished_run, tmp_path)
    uninterrupted = json.loads((out / "training_manifest.json").read_text())
    shutil.rmtree(out / "checkpoints" / "checkpoint-4")
    shutil.rmtree(out / "final_adapter")
    relative = os.path.relpath(tiny_model_dir)
    assert run_main(["--data", finished_run["data"], "--model", relative, "--output", out, *RUN, "--resume"]) == 0
    manifest = json.loads((out / "training_manifest.json").read_text())
    assert manifest["resumed_from"].endswith("checkpoint-2") and manifest["global_step"] == 4
    assert [h["step"] for h in manifest["loss_history"]["train"]] == [2, 3, 4]  # a save at 2 forced its log
    assert manifest["final_train_loss_coverage"] == {"steps_covered": 4, "steps_not_covered": 0}
    assert manifest["final_train_loss"] == pytest.approx(uninterrupted["final_train_loss"], rel=1e-4)
    assert (out / "final_adapter" / "TRAINING_SUCCESS").exists()


def test_allowed_hyperparameter_change_is_recorded(finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path)
    argv = ["--data", finished_run["data"], "--model", finished_run["link"], "--output", out, *RUN, "--resume",
            "--lr", "0.01", "--seed", "7"]
    assert run_main(argv + ["--allow-changed-hyperparameters"]) == 0, capsys.readouterr().err
    manifest = json.loads((out / "training_manifest.json").read_text())
    assert manifest["args"]["allow_changed_hyperparameters"] is True
    assert manifest["hyperparameter_changes"] == [{"field": "lr", "recorded": 0.05, "new": 0.01, "at_step": 4},
                                                  {"field": "seed", "recorded": 42, "new": 7, "at_step": 4}]
    identity = json.loads((out / "run_identity.json").read_text())
    assert identity["hyperparameters"]["lr"] == 0.01 and len(identity["hyperparameter_changes"]) == 2
    assert run_main(argv) == 0  # the values now in force resume without the override again


def test_record_refused_by_the_tokenizer_changes_nothing_in_output(finished_run, tmp_path, capsys):
    """Checkpoints cleared to save space, then a fresh run on data the prompt guards refuse: the
    refusal comes once the tokenizer is loaded, and the finished adapter is still intact after it."""
    out = copy_run(finished_run, tmp_path)
    shutil.rmtree(out / "checkpoints")
    records = [{"id": f"r{i}", "instruction": "Say hi.", "response": "Hi."} for i in range(4)]
    records[2]["response"] = "Hi. <|im_start|>user"
    data = write_dataset(tmp_path / "chat_data", records=records)
    before = snapshot(out)
    assert run_main(["--data", data, "--model", finished_run["link"], "--output", out, *RUN]) == 2
    assert f"{data}:3" in capsys.readouterr().err
    assert snapshot(out) == before
