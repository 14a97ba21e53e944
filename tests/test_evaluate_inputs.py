"""What evaluate_stage1_sft.py refuses before it generates: a tampered adapter (every file is checked
against the sha256 list in TRAINING_SUCCESS, with or without the training manifest), malformed
markers and manifests (exit 3, file named), an --output that is a file, and test prompts too long
for the character limit or the model's context (exit 2, file:line and the limit)."""

from __future__ import annotations

import json
import shutil

import pytest

from test_evaluate import build_workspace, run_script
from utils import evaluation as ev
from utils.exit_codes import RefusedError


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return build_workspace(tmp_path_factory.mktemp("eval_inputs"))


def copy_adapter_alone(workspace, tmp_path):
    """The adapter folder copied away from its training manifest (the marker's path to it is gone)."""
    adapter = tmp_path / "elsewhere" / "final_adapter"
    shutil.copytree(workspace["adapter"], adapter)
    marker = json.loads((adapter / "TRAINING_SUCCESS").read_text())
    marker["training_manifest"] = str(tmp_path / "elsewhere" / "training_manifest.json")
    (adapter / "TRAINING_SUCCESS").write_text(json.dumps(marker))
    return adapter


def test_changed_adapter_config_exits_3_naming_it(workspace, tmp_path):
    run = tmp_path / "stage1_sft"
    shutil.copytree(workspace["adapter"].parent, run)
    config_path = run / "final_adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["lora_alpha"] = config["lora_alpha"] * 2
    config_path.write_text(json.dumps(config))
    proc = run_script(["--sft-checkpoint", run / "final_adapter", "--test-set", workspace["test_set"], "--output", tmp_path / "out"])
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert f"{config_path}: changed since training finished" in proc.stderr and not (tmp_path / "out").exists()


def test_adapter_away_from_its_manifest_is_still_checked(workspace, tmp_path):
    adapter = copy_adapter_alone(workspace, tmp_path)
    assert ev.read_adapter(adapter).manifest is None  # untouched, it is accepted without the manifest
    weights = adapter / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    proc = run_script(["--sft-checkpoint", adapter, "--test-set", workspace["test_set"], "--output", tmp_path / "out",
                       "--base-model", workspace["root"] / "tiny-base"])
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert f"{weights}: changed since training finished" in proc.stderr


def test_file_not_written_by_training_and_marker_without_hashes_are_refused(workspace, tmp_path):
    adapter = copy_adapter_alone(workspace, tmp_path)
    (adapter / "adapter_model.bin").write_bytes(b"other weights")
    with pytest.raises(RefusedError, match="adapter_model.bin: not written by training"):
        ev.read_adapter(adapter)
    (adapter / "adapter_model.bin").unlink()
    marker = json.loads((adapter / "TRAINING_SUCCESS").read_text())
    del marker["adapter_files_sha256"]
    (adapter / "TRAINING_SUCCESS").write_text(json.dumps(marker))
    with pytest.raises(RefusedError, match="records no adapter file hashes"):
        ev.read_adapter(adapter)


@pytest.mark.parametrize("target,content,message", [
    ("TRAINING_SUCCESS", b"[]", "expected a JSON object, got list"),
    ("TRAINING_SUCCESS", b"\xff\xfe{}", "not UTF-8"),
    ("TRAINING_SUCCESS", b'{"training_manifest": 7}', "field 'training_manifest' is int, expected str"),
    ("training_manifest.json", b'"a string"', "expected a JSON object, got str"),
    ("training_manifest.json", b'{"args": []}', "field 'args' is list, expected dict"),
])
def test_malformed_marker_or_manifest_is_refused_naming_it(workspace, tmp_path, target, content, message):
    run = tmp_path / "stage1_sft"
    shutil.copytree(workspace["adapter"].parent, run)
    adapter = run / "final_adapter"
    marker = json.loads((adapter / "TRAINING_SUCCESS").read_text())
    marker["training_manifest"] = str(run / "training_manifest.json")
    (adapter / "TRAINING_SUCCESS").write_text(json.dumps(marker))
    path = adapter / target if target == "TRAINING_SUCCESS" else run / target
    path.write_bytes(content)
    with pytest.raises(RefusedError) as err:
        ev.read_adapter(adapter)
    assert str(path) in str(err.value) and message in str(err.value)


def test_malformed_marker_exits_3_without_a_traceback(workspace, tmp_path):
    adapter = copy_adapter_alone(workspace, tmp_path)
    (adapter / "TRAINING_SUCCESS").write_text("[1, 2]")
    proc = run_script(["--sft-checkpoint", adapter, "--test-set", workspace["test_set"], "--output", tmp_path / "out"])
    assert proc.returncode == 3 and "TRAINING_SUCCESS" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_output_that_is_a_file_exits_2_before_anything_is_read(workspace, tmp_path):
    output = tmp_path / "results.txt"
    output.write_text("keep me")
    proc = run_script(["--sft-checkpoint", workspace["adapter"], "--test-set", workspace["test_set"], "--output", output])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"--output {output}: exists and is not a folder" in proc.stderr and "[eval]" not in proc.stdout
    assert output.read_text() == "keep me"


def test_huge_instruction_exits_2_naming_line_and_limit_before_loading(workspace, tmp_path):
    test_set = tmp_path / "huge.jsonl"
    test_set.write_text(json.dumps({"id": "ok", "instruction": "Say hi."}) + "\n"
                        + json.dumps({"id": "huge", "instruction": "word " * 1_000_000}) + "\n")
    proc = run_script(["--sft-checkpoint", workspace["adapter"], "--test-set", test_set, "--output", tmp_path / "out"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{test_set}:2: instruction is 5,000,000 characters, over the limit of 100,000 (--max-instruction-chars)" in proc.stderr
    assert "[loader]" not in proc.stdout and not (tmp_path / "out").exists()


def test_prompt_longer_than_the_context_exits_2_before_generating(workspace, tmp_path):
    test_set = tmp_path / "long.jsonl"  # the tiny model's context is 512 positions
    test_set.write_text(json.dumps({"id": "ok", "instruction": "Say hi."}) + "\n"
                        + json.dumps({"id": "long", "instruction": "word " * 120}) + "\n")
    proc = run_script(["--sft-checkpoint", workspace["adapter"], "--test-set", test_set, "--output", tmp_path / "out"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{test_set}:2 (id long)" in proc.stderr and "context of 512 tokens" in proc.stderr
    assert not (tmp_path / "out").exists()  # refused before any response file was started


def test_base_identity_is_decided_by_content_hashes():
    trained = {"source": "local", "model_id": "/abs/models/base", "weights_fingerprint": "w1", "tokenizer_sha256": "t1"}
    same_by_another_path = {**trained, "model_id": "models/base"}
    assert ev.check_base_identity(same_by_another_path, {"model_identity": trained})["matches"]
    with pytest.raises(RefusedError, match="weights_fingerprint"):
        ev.check_base_identity({**trained, "weights_fingerprint": "w2"}, {"model_identity": trained})
    assert ev.model_key(same_by_another_path) == ev.model_key(trained)  # resumed response files match too


@pytest.mark.parametrize("flag,value", [("--batch-size", "0"), ("--batch-size", "x"), ("--max-new-tokens", "0"),
                                        ("--max-new-tokens", "-3"), ("--alpha", "0"), ("--alpha", "1.5"), ("--alpha", "inf"),
                                        ("--max-instruction-chars", "0"), ("--dtype", "foo")])
def test_flags_are_checked_at_parse_time(flag, value, capsys):
    import evaluate_stage1_sft as script

    with pytest.raises(SystemExit) as exc:
        script.parse_args([flag, value])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"argument {flag}:" in err, err
