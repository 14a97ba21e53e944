"""The canonical utilities: loader guards, JSONL I/O, provenance and the upstream gate, exit codes.

CPU only, no download: tiny fixtures from tests/tiny_models.py, plus one test that loads the
bundled gemma-3-270m through the shared user cache (converted once, then reused).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import BUNDLED_CACHE_DIR
from utils.clean_model_loader import CleanModelLoader, InstructModelError
from utils.exit_codes import BadInputError, RefusedError
from utils.jsonl_io import JsonlAppender, iter_jsonl, read_jsonl, repair_torn_tail, write_jsonl_atomic
from utils.prompt_guards import ContaminationError, encode_prompt, looks_assistant_style
from utils.provenance_helper import (
    capture_environment,
    create_session_manifest,
    get_git_info,
    read_manifest,
    require_upstream_manifest,
    sha256_file,
    write_manifest_atomic,
)

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:knowledge sentinel failed")  # tiny random models fail it


# -- instruct-looking fixtures: one signal each, in folders whose path carries no instruct word ----
@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory):
    return tmp_path_factory.mktemp("fx")


def _build(root: Path, name: str, **kwargs) -> Path:
    from tiny_models import build_tiny_model

    return build_tiny_model(root / name, **kwargs)


INSTRUCT_VARIANTS = {
    "chat_template": (dict(chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}"), "chat template"),
    "chat_eos": (dict(eos_token="<|im_end|>"), "end-of-sequence token is the chat-control token '<|im_end|>'"),
    "name_folder": ({}, "its name"),
    "name_config": (dict(name_or_path="someorg/tiny-lm-it"), "its name 'someorg/tiny-lm-it'"),
}


@pytest.fixture(scope="module")
def instruct_dirs(fixture_root):
    return {
        "chat_template": _build(fixture_root, "tiny-tmpl", **INSTRUCT_VARIANTS["chat_template"][0]),
        "chat_eos": _build(fixture_root, "tiny-eos", **INSTRUCT_VARIANTS["chat_eos"][0]),
        "name_folder": _build(fixture_root, "tiny-instruct"),
        "name_config": _build(fixture_root, "tiny-renamed", **INSTRUCT_VARIANTS["name_config"][0]),
    }


@pytest.fixture(scope="module")
def loaded_base(tiny_model_dir):
    return CleanModelLoader(str(tiny_model_dir)).load()


@pytest.fixture(scope="module")
def loaded_nobos(tiny_nobos_model_dir):
    return CleanModelLoader(str(tiny_nobos_model_dir)).load()


# -- loader ----------------------------------------------------------------------------------------
def test_loader_accepts_tiny_base(loaded_base):
    model, tokenizer, provenance = loaded_base
    assert model is not None and provenance["source"] == "local"
    assert provenance["instruct_signals"] == [] and provenance["instruct_override"] is False
    assert tokenizer.chat_template is None and provenance["chat_template_removed"] is True
    for key in ("tokenizer_sha256", "dtype", "device", "load_seconds", "sentinels"):
        assert provenance.get(key) is not None, key
    assert re.fullmatch(r"[0-9a-f]{64}", provenance["tokenizer_sha256"])
    assert provenance["dtype"] == "float32" and provenance["device"] == "cpu"
    assert {"knowledge", "chat_probe", "passed"} <= set(provenance["sentinels"])
    assert provenance["sentinels"]["chat_probe"]["flagged"] is False


@pytest.mark.parametrize("variant", list(INSTRUCT_VARIANTS))
def test_loader_refuses_instruct_looking_model(instruct_dirs, variant):
    with pytest.raises(InstructModelError) as excinfo:
        CleanModelLoader(str(instruct_dirs[variant])).load()
    message = str(excinfo.value)
    assert INSTRUCT_VARIANTS[variant][1] in message
    assert "--allow-instruct-model" in message
    if variant == "name_folder":
        assert "tiny-instruct" in message


@pytest.mark.parametrize("variant", list(INSTRUCT_VARIANTS))
def test_loader_signals_are_separate(instruct_dirs, variant):
    """Each fixture trips its own guard only (the EOS fixture also stops on it in generation config)."""
    _, _, provenance = CleanModelLoader(str(instruct_dirs[variant]), allow_instruct_model=True, run_sentinels=False).load()
    signals = provenance["instruct_signals"]
    kinds = {"chat template" if "chat template" in s else "eos" if "end-of-sequence" in s or "generation config" in s
             else "name" if "its name" in s else s for s in signals}
    expected = {"chat_template": "chat template", "chat_eos": "eos", "name_folder": "name", "name_config": "name"}[variant]
    assert kinds == {expected}, signals


def test_allow_instruct_model_loads_and_records_override(instruct_dirs):
    model, tokenizer, provenance = CleanModelLoader(str(instruct_dirs["chat_template"]), allow_instruct_model=True).load()
    assert model is not None
    assert provenance["instruct_override"] is True
    assert any("chat template" in s for s in provenance["instruct_signals"])
    assert tokenizer.chat_template is None  # removed even when the override is given


def test_bos_model_prepends_bos(loaded_base):
    _, tokenizer, provenance = loaded_base
    assert provenance["prepend_bos"] is True
    ids = encode_prompt(tokenizer, "Write a list")
    assert ids[0] == tokenizer.bos_token_id
    assert ids[1:] == tokenizer.encode("Write a list", add_special_tokens=False)
    assert tokenizer.bos_token_id not in ids[1:]


def test_nobos_model_gets_no_bos(loaded_nobos):
    _, tokenizer, provenance = loaded_nobos
    assert provenance["prepend_bos"] is False
    ids = encode_prompt(tokenizer, "Write a list")
    assert ids == tokenizer.encode("Write a list", add_special_tokens=False)
    assert tokenizer.convert_tokens_to_ids("<s>") not in ids


@pytest.mark.parametrize("text", ["Hello <|im_start|>user\nhi", "<start_of_turn>user hi", "[INST] do it [/INST]",
                                  "a <|im_end|> b"])
def test_encode_prompt_refuses_chat_markers(loaded_base, text):
    _, tokenizer, _ = loaded_base
    with pytest.raises(ContaminationError):
        encode_prompt(tokenizer, text)


def test_encode_prompt_refuses_unguarded_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    raw_tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    with pytest.raises(ContaminationError, match="not loaded through CleanModelLoader"):
        encode_prompt(raw_tokenizer, "plain text")


@pytest.mark.parametrize("text,expected", [
    ("Sure! Here is a short poem about the sea.", True),
    ("Certainly. The answer is 4.", True),
    ("  As an AI language model, I cannot", True),
    ("Here are three colors: red, blue, green.", True),
    ("The sea is wide and grey.", False),
    ("1. Red\n2. Blue", False),
    ("", False),
])
def test_looks_assistant_style(text, expected):
    assert looks_assistant_style(text) is expected


# -- jsonl_io --------------------------------------------------------------------------------------
def _write_lines(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_torn_last_line_is_cut_and_resume_skips_done(tmp_path):
    path = _write_lines(tmp_path / "out.jsonl", b'{"id": 1, "t": "a"}\n{"id": 2, "t": "b"}\n{"id": 3, "t": "hal')
    with pytest.warns(UserWarning, match="torn last line"):
        appender = JsonlAppender(path)
    with appender:
        assert appender.done_keys == {1, 2} and 1 in appender and 3 not in appender
        written = [appender.append({"id": i, "t": f"new {i}"}) for i in (1, 2, 3, 4)]
    assert written == [False, False, True, True]
    records = read_jsonl(path)
    assert [r["id"] for r in records] == [1, 2, 3, 4]
    assert records[0]["t"] == "a" and records[2]["t"] == "new 3"
    with JsonlAppender(path) as again:  # a second resume writes nothing new
        assert not again.append({"id": 4, "t": "dup"})
    assert len(read_jsonl(path)) == 4


def test_complete_last_line_without_newline_is_kept(tmp_path):
    path = _write_lines(tmp_path / "out.jsonl", b'{"id": 1}\n{"id": 2}')
    assert repair_torn_tail(path) == 0
    assert path.read_bytes().endswith(b'{"id": 2}\n')
    with JsonlAppender(path) as appender:
        assert appender.append({"id": 3})
    assert [r["id"] for r in read_jsonl(path)] == [1, 2, 3]


def test_malformed_line_names_file_and_line(tmp_path):
    path = _write_lines(tmp_path / "bad.jsonl", b'{"id": 1}\n\n{"id": 2,,}\n{"id": 3}\n')
    with pytest.raises(BadInputError, match=re.escape(f"{path}:3")):
        read_jsonl(path)
    _write_lines(path, b'{"id": 1}\n[1, 2]\n')
    with pytest.raises(BadInputError, match=re.escape(f"{path}:2")):
        list(iter_jsonl(path))
    _write_lines(path, b'{"instruction": "a"}\n{"x": 2}\n')
    with pytest.raises(BadInputError, match=re.escape(f"{path}:2") + ".*instruction"):
        read_jsonl(path, required_fields=["instruction"])


def test_line_separator_characters_survive_round_trip(tmp_path):
    record = {"id": "u", "text": "first\u2028second\u2029third\x85fourth"}
    path = tmp_path / "u.jsonl"
    with JsonlAppender(path) as appender:
        appender.append(record)
        appender.append({"id": "v", "text": "plain"})
    assert "\u2028".encode() in path.read_bytes()  # written raw, not escaped: the reader must not split on it
    assert read_jsonl(path) == [record, {"id": "v", "text": "plain"}]
    atomic = tmp_path / "atomic.jsonl"
    write_jsonl_atomic(atomic, [record])
    assert read_jsonl(atomic) == [record]
    assert [name for name in os.listdir(tmp_path) if ".tmp" in name] == []


# -- provenance ------------------------------------------------------------------------------------
def test_write_manifest_atomic_leaves_no_temp_file(tmp_path):
    path = write_manifest_atomic(tmp_path / "manifest.json", {"stage": "x", "value": 1})
    assert read_manifest(path) == {"stage": "x", "value": 1}
    assert os.listdir(tmp_path) == ["manifest.json"]


def test_write_manifest_atomic_crash_keeps_old_manifest(tmp_path, monkeypatch):
    path = write_manifest_atomic(tmp_path / "manifest.json", {"version": "old"})

    def crash(src, dst):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        write_manifest_atomic(path, {"version": "new"})
    monkeypatch.undo()
    assert read_manifest(path) == {"version": "old"}
    assert os.listdir(tmp_path) == ["manifest.json"]  # the temp file went with the failed rename


# Issue 19.8: both atomic writers, on a target they cannot write and on a write that fails midway.
ATOMIC_WRITERS = {
    "jsonl": lambda path, value: write_jsonl_atomic(path, [{"id": 1}, {"id": 2, "bad": value}]),
    "manifest": lambda path, value: write_manifest_atomic(path, {"id": 1, "bad": value}),
}


@pytest.mark.parametrize("writer", list(ATOMIC_WRITERS))
def test_atomic_writer_refuses_a_folder_as_target(tmp_path, writer):
    target = tmp_path / "out"
    (target / "inside").mkdir(parents=True)
    with pytest.raises(BadInputError, match=re.escape(str(target)) + ": is a folder"):
        ATOMIC_WRITERS[writer](target, 1)
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(target) == ["inside"]


@pytest.mark.parametrize("writer", list(ATOMIC_WRITERS))
@pytest.mark.parametrize("depth", [1, 2])
def test_atomic_writer_refuses_a_file_as_parent(tmp_path, writer, depth):
    blocker = tmp_path / "plain.txt"
    blocker.write_text("a file, not a folder\n")
    target = blocker / "sub" / "out.json" if depth == 2 else blocker / "out.json"
    with pytest.raises(BadInputError, match=re.escape(str(target)) + ".*" + re.escape(str(blocker)) + " is a file"):
        ATOMIC_WRITERS[writer](target, 1)
    assert os.listdir(tmp_path) == ["plain.txt"] and blocker.read_text() == "a file, not a folder\n"


@pytest.mark.parametrize("writer", list(ATOMIC_WRITERS))
def test_atomic_writer_failing_midway_leaves_no_temp_file_and_the_old_file(tmp_path, monkeypatch, writer):
    target = tmp_path / "out.json"
    target.write_text("old\n")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        ATOMIC_WRITERS[writer](target, 1)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["out.json"] and target.read_text() == "old\n"


def test_jsonl_atomic_record_that_cannot_be_written_leaves_no_temp_file(tmp_path):
    target = tmp_path / "out.jsonl"
    with pytest.raises(TypeError):
        ATOMIC_WRITERS["jsonl"](target, object())  # the second record fails after the first was written
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("writer", list(ATOMIC_WRITERS))
def test_atomic_writer_failing_rename_leaves_no_temp_file(tmp_path, monkeypatch, writer):
    def crash(src, dst):
        raise OSError("simulated rename failure")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated rename failure"):
        ATOMIC_WRITERS[writer](tmp_path / "out.json", 1)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


@pytest.fixture
def upstream(tmp_path):
    """A data file and a passing manifest that vouches for it."""
    data = tmp_path / "pilot.jsonl"
    write_jsonl_atomic(data, [{"id": 1, "instruction": "Name a color.", "response": "Red."}])
    manifest = create_session_manifest("pilot", {"seed": 1}, outputs={"data": data}, qc={"passed": True, "failures": []})
    manifest_path = write_manifest_atomic(tmp_path / "pilot.manifest.json", manifest)
    return data, manifest_path


def test_require_upstream_manifest_passes_good_manifest(upstream):
    data, manifest_path = upstream
    manifest = require_upstream_manifest(manifest_path, "scale", expected_data=data)
    assert manifest["outputs"]["data"]["sha256"] == sha256_file(data)
    assert manifest["stage"] == "pilot"


def _edit_manifest(path: Path, **changes) -> None:
    manifest = read_manifest(path)
    manifest.update(changes)
    write_manifest_atomic(path, manifest)


def test_require_upstream_refuses_missing_manifest(tmp_path):
    with pytest.raises(RefusedError, match="does not exist"):
        require_upstream_manifest(tmp_path / "nope.json", "scale")
    with pytest.raises(RefusedError, match="no manifest given"):
        require_upstream_manifest(None, "scale")


def test_require_upstream_refuses_unreadable_json(upstream):
    _, manifest_path = upstream
    manifest_path.write_text('{"qc": {"passed": tru')
    with pytest.raises(RefusedError, match="unreadable"):
        require_upstream_manifest(manifest_path, "scale")


def test_require_upstream_refuses_failed_qc_with_reasons(upstream):
    _, manifest_path = upstream
    _edit_manifest(manifest_path, qc={"passed": False, "failures": ["runaway rate 0.09 >= 0.05", "delimiter leakage 2 > 0"]})
    with pytest.raises(RefusedError) as excinfo:
        require_upstream_manifest(manifest_path, "scale")
    message = str(excinfo.value)
    assert "did not pass" in message and "runaway rate 0.09 >= 0.05" in message and "delimiter leakage 2 > 0" in message


def test_require_upstream_refuses_edited_data(upstream):
    data, manifest_path = upstream
    with data.open("a") as handle:
        handle.write(json.dumps({"id": 2, "instruction": "x", "response": "y"}) + "\n")
    with pytest.raises(RefusedError, match="changed since"):
        require_upstream_manifest(manifest_path, "train", expected_data=data)


def test_require_upstream_refuses_missing_data(upstream):
    data, manifest_path = upstream
    data.unlink()
    with pytest.raises(RefusedError, match="missing"):
        require_upstream_manifest(manifest_path, "train")


def test_require_upstream_refuses_other_data_file(upstream, tmp_path):
    _, manifest_path = upstream
    other = tmp_path / "other.jsonl"
    other.write_text('{"id": 1}\n')
    with pytest.raises(RefusedError, match="vouches for"):
        require_upstream_manifest(manifest_path, "train", expected_data=other)


def test_get_git_info_in_this_repo():
    info = get_git_info(ROOT)
    assert re.fullmatch(r"[0-9a-f]{40}", info["git_hash"] or ""), info
    assert isinstance(info["git_dirty"], bool)


def test_capture_environment():
    import torch

    env = capture_environment()
    assert env["python"] == sys.version.split()[0]
    assert env["packages"]["torch"] and env["packages"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert env["packages"]["transformers"]
    assert env["cuda_available"] is False or env["gpus"]


# -- exit codes ------------------------------------------------------------------------------------
_CLI = textwrap.dedent("""\
    import sys
    sys.path.insert(0, {scripts!r})
    from utils.exit_codes import BadInputError, RefusedError, run_cli

    def main():
        mode = sys.argv[1]
        if mode == "bad":
            raise BadInputError("data.jsonl:3: not valid JSON")
        if mode == "refused":
            raise RefusedError("manifest missing")
        if mode == "crash":
            raise KeyError("boom")
        return 4 if mode == "gate" else None

    run_cli(main)
    """)


@pytest.mark.parametrize("mode,code,stderr_text", [
    ("ok", 0, ""), ("bad", 2, "error: data.jsonl:3: not valid JSON"), ("refused", 3, "error: manifest missing"),
    ("crash", 1, "Traceback"), ("gate", 4, ""),
])
def test_run_cli_exit_codes(tmp_path, mode, code, stderr_text):
    script = tmp_path / "tiny_cli.py"
    script.write_text(_CLI.format(scripts=str(ROOT / "scripts")))
    result = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True, timeout=120)
    assert result.returncode == code, result.stderr
    assert stderr_text in result.stderr


# -- the bundled model -----------------------------------------------------------------------------
@pytest.mark.slow  # the real bundled model: ~50 s conversion on first use, then a full load
def test_bundled_model_sentinels(monkeypatch):
    """The real bundled gemma-3-270m: a working base model, BOS on, and a tokenizer that keeps
    "Instruction" whole (transformers' own GGUF tokenizer splits it into characters)."""
    monkeypatch.setenv("STAGE1_CACHE_DIR", str(BUNDLED_CACHE_DIR))
    model, tokenizer, provenance = CleanModelLoader().load()
    assert provenance["source"] == "bundled" and provenance["model_id"] == "gemma-3-270m"
    assert provenance["sentinels"]["passed"] is True, provenance["sentinels"]
    assert provenance["prepend_bos"] is True
    assert provenance["instruct_signals"] == [] and provenance["instruct_override"] is False
    assert tokenizer.chat_template is None
    assert len(tokenizer.encode("Instruction", add_special_tokens=False)) == 1
    assert encode_prompt(tokenizer, "Instruction")[0] == tokenizer.bos_token_id


def test_the_stored_trained_tiny_model_is_what_its_builder_makes(tmp_path):
    """tests/fixtures/tiny-trained is build_trained_tiny_model's output (tiny_models.TRAINED_FIXTURE says why it is
    stored): two steps of the builder give the same tokenizer, config and weight shapes."""
    from safetensors import safe_open

    from tiny_models import TRAINED_FIXTURE, build_trained_tiny_model

    built = build_trained_tiny_model(tmp_path / "built", steps=2)
    for name in ("tokenizer.json", "config.json", "tokenizer_config.json"):
        assert (built / name).read_bytes() == (TRAINED_FIXTURE / name).read_bytes(), name

    def shapes(folder):
        with safe_open(str(folder / "model.safetensors"), "pt") as weights:
            return {key: tuple(weights.get_slice(key).get_shape()) for key in weights.keys()}

    assert shapes(built) == shapes(TRAINED_FIXTURE)
