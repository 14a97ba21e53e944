"""CleanModelLoader on bad sources: one BadInputError line naming the source, never a traceback.

Issue 19.7: a --model path that does not exist, a file that is not GGUF, an empty folder, weights
without config.json, an unknown --dtype, and a hub id the hub cannot provide. Tiny fixtures in
tmp dirs; the hub case runs offline (HF_HUB_OFFLINE=1), so it needs no network and fails fast.
"""

from __future__ import annotations

import shutil
import uuid

import pytest

from conftest import run_python_script, script_env
from utils.clean_model_loader import DTYPE_NAMES, CleanModelLoader, _looks_like_path, cache_root
from utils.exit_codes import BadInputError


def _load(source, **kwargs):
    return CleanModelLoader(str(source), run_sentinels=False, **kwargs).load()


@pytest.mark.parametrize("name", ["./absent-model", "/definitely/not/here", "a/b/c", "weights.safetensors", "model.gguf",
                                  "folder/", "..\\up"])
def test_missing_path_is_a_bad_input(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)  # relative names resolve in an empty folder
    with pytest.raises(BadInputError, match="no such file or folder") as excinfo:
        _load(name)
    assert name in str(excinfo.value)


def test_missing_home_path_is_a_bad_input():
    name = f"~/absent-model-{uuid.uuid4().hex}"
    with pytest.raises(BadInputError, match="no such file or folder") as excinfo:
        _load(name)
    assert name in str(excinfo.value)


@pytest.mark.parametrize("name,is_path", [("gpt2", False), ("Qwen/Qwen2.5-32B", False), ("org/name_v1.0", False),
                                          ("./gpt2", True), ("~/m", True), ("/m", True), ("a/b/c", True),
                                          ("x.gguf", True), ("org--x/y", True), ("bad name", True)])
def test_hub_id_or_path(name, is_path):
    assert _looks_like_path(name) is is_path


def test_unreachable_hub_id_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = f"no-such-org-{uuid.uuid4().hex[:8]}/no-such-model"
    with pytest.raises(BadInputError) as excinfo:
        _load(name, tokenizer_only=True)
    message = str(excinfo.value)
    assert name in message and "hub" in message and "\n" not in message


@pytest.mark.parametrize("content", [b"just some notes, not a model\n", bytes(range(256)) * 8, b""],
                         ids=["text", "binary", "empty"])
@pytest.mark.parametrize("file_name", ["notes.gguf", "blob.bin", "weights"])
def test_file_that_is_not_gguf(tmp_path, content, file_name):
    path = tmp_path / file_name
    path.write_bytes(content)
    with pytest.raises(BadInputError, match="not a GGUF file") as excinfo:
        _load(path)
    assert str(path) in str(excinfo.value)


def test_gguf_magic_with_garbage_is_a_bad_input_and_leaves_no_conversion(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(BadInputError, match="not a readable GGUF file") as excinfo:
        _load(path)
    assert str(path) in str(excinfo.value)
    converted = cache_root() / "converted"
    assert not converted.exists() or list(converted.iterdir()) == []  # no half-written temp folder in the cache


def test_empty_folder(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(BadInputError, match="is empty") as excinfo:
        _load(folder)
    assert str(folder) in str(excinfo.value)


def test_weights_without_config(tmp_path, tiny_model_dir):
    folder = tmp_path / "weights-only"
    folder.mkdir()
    shutil.copy(tiny_model_dir / "model.safetensors", folder)
    with pytest.raises(BadInputError, match="no config.json") as excinfo:
        _load(folder)
    assert str(folder) in str(excinfo.value) and "model.safetensors" in str(excinfo.value)


def test_folder_holding_a_gguf_points_at_the_file(tmp_path):
    folder = tmp_path / "gguf-folder"
    folder.mkdir()
    (folder / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(BadInputError, match="pass .*model.gguf"):
        _load(folder)


def test_config_without_weights(tmp_path, tiny_model_dir):
    folder = tmp_path / "no-weights"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(BadInputError, match="no weights") as excinfo:
        _load(folder)
    assert str(folder) in str(excinfo.value)
    _, tokenizer, _ = _load(folder, tokenizer_only=True)  # a tokenizer alone needs no weights
    assert tokenizer.stage1_guard is not None


@pytest.mark.parametrize("config_text", ["{not json", "[1, 2]"])
def test_config_that_is_not_a_json_object(tmp_path, tiny_model_dir, config_text):
    folder = tmp_path / "bad-config"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "config.json").write_text(config_text)
    with pytest.raises(BadInputError, match="config.json"):
        _load(folder)


def test_folder_whose_files_transformers_cannot_read(tmp_path, tiny_model_dir):
    folder = tmp_path / "corrupt-weights"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(BadInputError, match="cannot load its weights") as excinfo:
        _load(folder)
    assert str(folder) in str(excinfo.value)


@pytest.mark.parametrize("dtype", ["foo", "float", "torch.float32", "int8"])
def test_unknown_dtype_is_refused_before_anything_loads(dtype):
    with pytest.raises(BadInputError) as excinfo:
        CleanModelLoader("/definitely/not/here", dtype=dtype)  # the constructor alone: no path is looked at
    message = str(excinfo.value)
    assert repr(dtype) in message and all(name in message for name in DTYPE_NAMES)


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
def test_allowed_dtypes_load(tiny_model_dir, dtype):
    model, _, provenance = _load(tiny_model_dir, dtype=dtype)
    assert provenance["dtype"] == dtype and str(next(model.parameters()).dtype) == f"torch.{dtype}"


def test_a_script_reports_a_bad_model_in_one_line(tmp_path):
    """The loader's error reaches the user through run_cli: exit 2, the path named, no traceback."""
    notes = tmp_path / "notes.gguf"
    notes.write_text("meeting notes\n")
    result = run_python_script("generate_stage1_pilot_data.py", "--model", notes, "--output", tmp_path / "out",
                               "--count", "1", "--no-progress", env=script_env(STAGE1_CACHE_DIR=str(tmp_path / "cache")), timeout=300)
    assert result.returncode == 2, result.stderr
    assert str(notes) in result.stderr and "not a GGUF file" in result.stderr
    assert "Traceback" not in result.stderr
