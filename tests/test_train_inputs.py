"""Bad input to train_stage1_sft.py is refused before any model loads, naming the flag, the file or
the line: numeric flags out of range, repeated ids, an --output that is a file, and manifests that
are not UTF-8 or not JSON objects (the read_manifest / require_upstream_manifest rule)."""

from __future__ import annotations

import json

import pytest

from test_train_sft import run_main, write_dataset


@pytest.mark.parametrize("flag,value", [
    ("--epochs", "0"), ("--lr", "0"), ("--lr", "-1"), ("--lr", "nan"), ("--per-device-batch-size", "0"),
    ("--grad-accum", "-2"), ("--lora-r", "0"), ("--lora-alpha", "x"), ("--lora-dropout", "1"), ("--val-fraction", "-0.1"),
    ("--val-fraction", "1"), ("--max-seq-length", "0"), ("--seed", "-1"), ("--save-steps", "0"),
    ("--save-total-limit", "0"), ("--logging-steps", "0"), ("--max-steps", "0"), ("--max-steps", "-2"),
])
def test_numeric_flags_are_checked_at_parse_time(flag, value, capsys):
    import train_stage1_sft as script

    with pytest.raises(SystemExit) as exc:
        script.parse_args([flag, value])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"argument {flag}:" in err and "expected" in err, err


def test_duplicate_ids_exit_2_naming_the_second_line(tmp_path, capsys):
    records = [{"id": "a", "instruction": "Say hi.", "response": "Hi."}, {"id": "b", "instruction": "Say bye.", "response": "Bye."},
               {"id": "a", "instruction": "Say yes.", "response": "Yes."}]
    data = write_dataset(tmp_path / "d", records=records)
    assert run_main(["--data", data, "--model", tmp_path / "no_such_model", "--output", tmp_path / "out"]) == 2
    assert f"{data}:3: duplicate id 'a' (first on line 1)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_output_that_is_a_file_exits_2_before_loading(tmp_path, capsys):
    data = write_dataset(tmp_path / "d")
    output = tmp_path / "out.txt"
    output.write_text("keep me")
    assert run_main(["--data", data, "--model", tmp_path / "no_such_model", "--output", output]) == 2
    assert f"--output {output}: exists and is not a folder" in capsys.readouterr().err and output.read_text() == "keep me"


@pytest.mark.parametrize("content", [b"[1, 2]\n", b'"text"\n', b"\xff\xfe{}", b"{not json"])
def test_malformed_data_manifest_is_a_refusal_naming_it(tmp_path, content, capsys):
    data = write_dataset(tmp_path / "d")
    manifest = tmp_path / "d" / "sft.manifest.json"
    manifest.write_bytes(content)
    assert run_main(["--data", data, "--model", tmp_path / "no_such_model", "--output", tmp_path / "out"]) == 3
    err = capsys.readouterr().err
    assert f"manifest {manifest} is unreadable" in err and "Traceback" not in err


def test_read_manifest_rule(tmp_path):
    from utils.exit_codes import BadInputError, RefusedError
    from utils.provenance_helper import read_manifest, require_upstream_manifest

    cases = {"list.json": (b"[]", "expected a JSON object, got list"), "latin1.json": (b'{"a": "\xe9"}', "not UTF-8"),
             "broken.json": (b"{", "not valid JSON")}
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(BadInputError, match=f"{name}: {message}"):  # read directly: bad input, exit 2
            read_manifest(path)
        with pytest.raises(RefusedError, match=f"manifest {path} is unreadable"):  # as an upstream record: exit 3
            require_upstream_manifest(path, "stage")
    outputs_not_objects = tmp_path / "outputs.json"
    outputs_not_objects.write_text(json.dumps({"qc": {"passed": True}, "outputs": {"data": "sft.jsonl"}}))
    with pytest.raises(RefusedError, match="is malformed: 'outputs' must map each role"):
        require_upstream_manifest(outputs_not_objects, "stage")
    failures_not_a_list = tmp_path / "failures.json"
    failures_not_a_list.write_text(json.dumps({"qc": {"passed": False, "failures": 3}}))
    with pytest.raises(RefusedError, match="did not pass its gate"):
        require_upstream_manifest(failures_not_a_list, "stage")
