"""Bad inputs never end in a traceback: the matrix of issue 19's "Done when", and the engine's context check.

Every script runs as a command, as a user runs it, with one bad value at a time for each numeric
and path flag: negative, zero, out of range, wrong type, a missing file, a file of the wrong kind.
Each run must exit 2 (bad input) or 3 (refused), name the flag or the input in its message, print
no traceback, and have done no work (no generated record, no training step). Numeric flags fail
while parsing, before any model loads; the path cases use tiny files in tmp dirs and the tiny
random model, so a case that slips through ends quickly instead of running a pipeline.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import run_python_script, script_env

TEST_SET = "generate_test_instructions.py"
PILOT = "generate_stage1_pilot_data.py"
SCALE = "generate_stage1_scale_data.py"
TRAIN = "train_stage1_sft.py"
EVALUATE = "evaluate_stage1_sft.py"

# -- the matrix ------------------------------------------------------------------------------------
# Numeric flags: (flag, bad values). The kind of each value (negative, zero, out_of_range, wrong_type)
# is read off the value itself, for the test id.
_GENERATION = [
    *[(f"--{part}-{name}", values) for part in ("instruction", "response") for name, values in (
        ("temperature", ["-1", "nan", "abc"]),
        ("top-p", ["-0.1", "0", "1.5", "abc"]),
        ("repetition-penalty", ["-1", "0", "abc"]),
        ("max-new-tokens", ["-1", "0", "1.5"]))],
    ("--confidence-threshold", ["nan", "inf", "abc"]),
    ("--qc-runaway-rate-max", ["-0.1", "1.5", "abc"]),
    ("--qc-token-limit-rate-max", ["-0.1", "1.5"]),
    ("--qc-delimiter-leakage-max", ["-1", "0.5"]),
    ("--qc-median-response-tokens-max", ["-1", "0", "2.5"]),
    ("--qc-critic-acceptance-rate-min", ["-0.1", "1.5"]),
    ("--num-candidates", ["-1", "0", "1.5", "abc"]),
    ("--relevance-min", ["nan", "inf", "abc"]),
    ("--constraint-fraction", ["-0.1", "1.5", "abc"]),
    ("--generated-constraint-fraction", ["-0.1", "1.5", "abc"]),
    ("--constraint-variants", ["-1", "1.5", "abc"]),
    ("--constraint-families", ["nope", "words_range", ","]),  # unknown, held out of training, none
]
NUMERIC = {
    TEST_SET: [("--count", ["-1", "0", "4", "abc", "2.5"]), ("--seed", ["-1", "abc", "1.5"])],
    PILOT: [("--count", ["-1", "0", "abc"]), ("--seed", ["-1", "abc"]), ("--batch-size", ["-1", "0", "1.5"]),
            ("--max-rounds", ["-1", "0", "abc"]), ("--min-signal-auc", ["-0.1", "1.5", "abc"]), *_GENERATION],
    SCALE: [("--count", ["-1", "0", "abc"]), ("--num-shards", ["-1", "0", "abc"]), ("--seed", ["-1", "abc"]),
            ("--batch-size", ["-1", "0", "abc"]), ("--max-rounds", ["-1", "0", "abc"]), ("--shard-index", ["-1", "5", "abc"]),
            *_GENERATION],
    TRAIN: [("--epochs", ["-1", "0", "abc", "inf"]), ("--lr", ["-1", "0", "abc", "nan"]),
            ("--per-device-batch-size", ["-1", "0", "1.5"]), ("--grad-accum", ["-1", "0", "abc"]), ("--lora-r", ["-1", "0", "abc"]),
            ("--lora-alpha", ["-1", "0", "abc"]), ("--lora-dropout", ["-0.1", "1", "1.5", "abc"]),
            ("--val-fraction", ["-0.1", "1", "abc"]), ("--max-seq-length", ["-1", "0", "abc"]), ("--seed", ["-1", "abc"]),
            ("--save-steps", ["-1", "0", "abc"]), ("--save-total-limit", ["-1", "0", "abc"]),
            ("--logging-steps", ["-1", "0", "abc"]), ("--max-steps", ["-2", "0", "abc"]),
            ("--eval-steps", ["-1", "0", "abc"]), ("--eval-batch-size", ["-1", "0", "abc"]),
            ("--effective-batch-size", ["-1", "0", "abc"])],
    EVALUATE: [("--batch-size", ["-1", "0", "abc"]), ("--max-new-tokens", ["-1", "0", "1.5"]),
               ("--max-instruction-chars", ["-1", "0", "abc"]),
               ("--alpha", ["-0.1", "0", "1", "1.5", "abc"])],
}

# Path and name flags: (flag, name of a bad input made by the `bad` fixture, what the message must name).
# None for the last item means: the flag or the path itself.
PATHS = {
    TEST_SET: [("--output", "folder", None), ("--output", "under_a_file", None)],
    PILOT: [("--model", "missing", None), ("--model", "missing_relative", None), ("--model", "text.gguf", None),
            ("--model", "binary", None), ("--model", "empty_folder", None), ("--model", "weights_only", None),
            ("--dtype", "foo", "'foo'"), ("--output", "text", None), ("--output", "under_a_file", None)],
    SCALE: [("--pilot-manifest", "missing", None), ("--pilot-manifest", "folder", None), ("--pilot-manifest", "text", None),
            ("--pilot-manifest", "json_list", None), ("--pilot-manifest", "not_utf8", None),
            ("--exclude-test-set", "missing", None), ("--exclude-test-set", "folder", None),
            ("--exclude-test-set", "text", None), ("--model", "missing", None), ("--model", "text.gguf", None),
            ("--dtype", "foo", "'foo'"), ("--output", "folder", None), ("--output", "under_a_file", None)],
    TRAIN: [("--data", "missing", None), ("--data", "folder", None), ("--data", "vouched_text", None),
            ("--data", "vouched_json_list", None), ("--data-manifest", "missing", None), ("--data-manifest", "folder", None),
            ("--data-manifest", "text", None), ("--data-manifest", "json_list", None), ("--model", "missing", None),
            ("--model", "text.gguf", None), ("--model", "empty_folder", None), ("--output", "text", None)],
    EVALUATE: [("--sft-checkpoint", "missing", None), ("--sft-checkpoint", "text", None), ("--sft-checkpoint", "empty_folder", None),
               ("--reference-checkpoint", "missing", None), ("--reference-checkpoint", "text", None),
               ("--reference-checkpoint", "empty_folder", None),
               ("--test-set", "missing", None), ("--test-set", "folder", None), ("--test-set", "text", None),
               ("--test-set", "json_list", None), ("--test-set", "no_instruction", None),
               ("--test-set", "too_long_for_the_model", "huge-1"), ("--test-set", "five_mb_instruction", None),
               ("--training-data", "missing", None),
               ("--training-data", "folder", None), ("--base-model", "missing", None), ("--base-model", "text.gguf", None),
               ("--dtype", "foo", "'foo'"), ("--output", "text", None)],
}
NEEDS = {TEST_SET: set(), PILOT: {"model"}, SCALE: {"model", "pilot"}, TRAIN: {"model", "dataset"}, EVALUATE: {"adapter"}}


def _kind(value: str) -> str:
    try:
        number = float(value)
    except ValueError:
        return "wrong_type"
    return "negative" if number < 0 else "zero" if number == 0 else "out_of_range"


CASES = [pytest.param(script, flag, value, False, [flag], id=f"{script.split('.')[0]}:{flag}={value}:{_kind(value)}")
         for script, flags in NUMERIC.items() for flag, values in flags for value in values]
CASES += [pytest.param(script, flag, bad, True, [names] if names else [flag], id=f"{script.split('.')[0]}:{flag}={bad}")
          for script, flags in PATHS.items() for flag, bad, names in flags]


# -- fixtures: tiny inputs, each made once per module --------------------------------------------
@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_model_dir):
    """Bad inputs by name: missing paths, folders, and files of the wrong kind."""
    root = tmp_path_factory.mktemp("bad")
    made = {"missing": root / "absent" / "nothing.jsonl", "missing_relative": "./absent-model-folder",
            "folder": root / "a_folder", "empty_folder": root / "empty_folder", "text": root / "notes.txt",
            "text.gguf": root / "notes.gguf", "binary": root / "blob", "json_list": root / "list.json",
            "not_utf8": root / "latin1.json", "no_instruction": root / "no_instruction.jsonl",
            "too_long_for_the_model": root / "huge.jsonl", "five_mb_instruction": root / "five_mb.jsonl",
            "weights_only": root / "weights_only",
            "under_a_file": root / "notes.txt" / "out.jsonl", "foo": "foo"}
    made["folder"].mkdir()
    (made["folder"] / "inside.txt").write_text("x\n")
    made["empty_folder"].mkdir()
    made["text"].write_text("these are notes, not data\n")
    made["text.gguf"].write_text("these are notes, not a model\n")
    made["binary"].write_bytes(bytes(range(256)) * 16)
    made["json_list"].write_text("[1, 2, 3]\n")
    made["not_utf8"].write_bytes('{"stage": "pilot", "note": "caf\u00e9"}'.encode("latin-1"))
    made["no_instruction"].write_text(json.dumps({"id": "a", "prompt": "Say hi."}) + "\n")
    # Far past the tiny model's 512 positions: must be refused by rule, naming the record.
    made["too_long_for_the_model"].write_text(json.dumps({"id": "huge-1", "instruction": "Repeat this word. " * 2000}) + "\n")
    # The audit's case: a 5 MB instruction once tried to allocate 9 TB.
    made["five_mb_instruction"].write_text(json.dumps({"id": "big", "instruction": "a" * (5 << 20)}) + "\n")
    made["weights_only"].mkdir()
    (made["weights_only"] / "model.safetensors").write_bytes((tiny_model_dir / "model.safetensors").read_bytes())
    for name, content in (("vouched_text", b"plain notes, not JSON\n"), ("vouched_json_list", b"[1, 2]\n")):
        made[name] = _vouched_data(root / name, content)
    return made


def _vouched_data(folder: Path, content: bytes) -> Path:
    """A data file with a passing manifest beside it, so the training gate lets it through to the reader."""
    from utils.provenance_helper import sha256_file, write_manifest_atomic

    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "sft.jsonl"
    data.write_bytes(content)
    write_manifest_atomic(folder / "sft.manifest.json", {"stage": "pilot", "qc": {"passed": True, "failures": []},
                                                         "outputs": {"data": {"path": str(data), "sha256": sha256_file(data)}}})
    return data


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    records = [{"id": f"r{i}", "instruction": f"List {i % 4 + 2} colors.", "response": "red, blue, green"} for i in range(8)]
    return _vouched_data(tmp_path_factory.mktemp("dataset"), "".join(json.dumps(r) + "\n" for r in records).encode())


@pytest.fixture(scope="module")
def pilot(tmp_path_factory, tiny_model_dir, dataset):
    """A pilot manifest whose QC passed, with the current default config and the tiny model."""
    from utils.provenance_helper import create_session_manifest, write_manifest_atomic
    from utils.stage1_generation import Stage1Config

    folder = tmp_path_factory.mktemp("pilot")
    config = Stage1Config(max_rounds=1).as_dict()
    manifest = create_session_manifest("pilot", {"model": str(tiny_model_dir), "seed": config["seed"]}, outputs={"data": dataset},
                                       qc={"passed": True, "failures": []}, config=config,
                                       critic_signals={"trusted": ["relevance"], "rank_by": "relevance", "aucs": {"relevance": 0.9},
                                                       "min_auc": 0.75, "source": "probe"})
    return write_manifest_atomic(folder / "session_manifest.json", manifest)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model_dir, dataset):
    """A real adapter from the training script (one step), so evaluation gets past its adapter checks."""
    out = tmp_path_factory.mktemp("adapter") / "train"
    result = run_python_script(TRAIN, "--data", dataset, "--model", tiny_model_dir, "--output", out, "--max-steps", "1",
                               "--save-steps", "100", "--logging-steps", "1", "--grad-accum", "1", "--val-fraction", "0",
                               env=script_env(OMP_NUM_THREADS="1", STAGE1_CACHE_DIR=str(out.parent / "cache")), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    test_set = out.parent / "test.jsonl"
    test_set.write_text("".join(json.dumps({"id": f"t{i}", "instruction": f"Name {i + 2} animals."}) + "\n" for i in range(3)))
    return out / "final_adapter", test_set


def _valid_args(script: str, out: Path, request) -> list:
    """Arguments that make a valid, cheap run of `script`; the bad flag is appended after them."""
    get = request.getfixturevalue
    if script == TEST_SET:
        return ["--count", "5", "--output", out / "test.jsonl"]
    if script == PILOT:
        return ["--model", get("tiny_model_dir"), "--output", out / "pilot", "--count", "1", "--max-rounds", "1",
                "--batch-size", "2", "--no-progress"]
    if script == SCALE:
        return ["--pilot-manifest", get("pilot"), "--output", out / "scale" / "sft.jsonl", "--count", "2", "--num-shards", "1",
                "--max-rounds", "1", "--batch-size", "2", "--no-progress"]
    if script == TRAIN:
        return ["--data", get("dataset"), "--model", get("tiny_model_dir"), "--output", out / "train", "--max-steps", "1",
                "--save-steps", "100", "--logging-steps", "1", "--grad-accum", "1", "--val-fraction", "0"]
    adapter_dir, test_set = get("adapter")
    return ["--sft-checkpoint", adapter_dir, "--test-set", test_set, "--output", out / "eval", "--max-new-tokens", "2",
            "--batch-size", "2", "--no-progress"]


def _work_done(out: Path) -> list[str]:
    """Files that only exist once a stage did real work: generated records or a training checkpoint."""
    produced = [p for name in ("phase1_candidates.jsonl", "base_responses.jsonl", "sft_responses.jsonl")
                for p in out.rglob(name) if p.stat().st_size > 0]
    produced += list(out.rglob("checkpoint-*"))
    return [str(p) for p in produced]


@pytest.mark.parametrize("script,flag,value,is_path,names", CASES)
def test_bad_value_exits_2_or_3_naming_it(script, flag, value, is_path, names, tmp_path, request):
    out = tmp_path / "out"
    if is_path:
        value = request.getfixturevalue("bad")[value]
        names = names + [str(value)]  # a path case may name the flag or the path itself
    # A flag given twice: argparse keeps the last, so the bad value replaces the valid one.
    argv = [*_valid_args(script, out, request), flag, value]
    result = run_python_script(script, *argv, env=script_env(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                                                             STAGE1_CACHE_DIR=str(tmp_path / "cache")), timeout=300)
    stderr = result.stderr
    assert result.returncode in (2, 3), f"exit {result.returncode}\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    assert any(text in stderr for text in names), f"the message names none of {names}:\n{stderr[-2000:]}"
    assert _work_done(out) == [], "work was done before the bad value was refused"


def test_the_matrix_covers_every_numeric_and_path_flag_of_each_script():
    """A flag added to a script without a row here fails this test (each numeric or path flag needs its bad values)."""
    import importlib

    free_text = {"--lora-target-modules"}  # any string is a value; the training code checks the names
    for script in NUMERIC:
        parser = _parser_of(importlib.import_module(script[:-3]))
        covered = {flag for flag, _ in NUMERIC[script]} | {flag for flag, _, _ in PATHS[script]}
        # Switches take no value and `choices` flags are checked by argparse itself.
        flags = {option for action in parser._actions for option in action.option_strings
                 if option.startswith("--") and action.nargs != 0 and action.choices is None and option not in free_text}
        assert flags <= covered, f"{script}: flags without bad-input cases: {sorted(flags - covered)}"


def _parser_of(module):
    """The script's ArgumentParser, taken from parse_args by intercepting parse_args on it."""
    import argparse

    captured = {}
    original = argparse.ArgumentParser.parse_args

    def capture(self, *args, **kwargs):
        captured["parser"] = self
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = capture
    try:
        with pytest.raises(SystemExit):
            module.parse_args([])
    finally:
        argparse.ArgumentParser.parse_args = original
    return captured["parser"]


# -- the generation engine: prompts longer than the model's context -------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from utils.clean_model_loader import CleanModelLoader

    model, tokenizer, _ = CleanModelLoader(str(tiny_model_dir), run_sentinels=False).load()
    return model, tokenizer


@pytest.fixture
def engine(tiny):
    from utils.generation import GenerationEngine

    model, tokenizer = tiny
    return GenerationEngine(model, tokenizer, batch_size=4, show_progress=False)


def _forbid_batches(engine, monkeypatch):
    def no_batch(*args, **kwargs):
        raise AssertionError("a batch was built for a prompt that does not fit the context")

    monkeypatch.setattr(engine, "_generate_batch", no_batch)


def test_engine_refuses_a_prompt_longer_than_the_context_before_any_batch(engine, monkeypatch):
    from utils.exit_codes import BadInputError
    from utils.generation import SamplingParams, context_length

    assert context_length(engine.model) == 512
    _forbid_batches(engine, monkeypatch)
    seen = []
    items = [("short-1", "Name a color."), ("huge-7", "word " * 20000), ("short-2", "Name a fruit.")]
    with pytest.raises(BadInputError) as excinfo:
        engine.generate(items, SamplingParams(0.0, 1.0, 1.0, 16), on_result=seen.append)
    message = str(excinfo.value)
    n_tokens = len(engine.tokenizer.encode("word " * 20000, add_special_tokens=False)) + 1  # + BOS
    assert "'huge-7'" in message and f"{n_tokens} tokens" in message and "512" in message and "max_new_tokens 16" in message
    assert seen == []  # nothing generated for the records that did fit either


def test_engine_context_limit_counts_the_new_tokens(engine, monkeypatch):
    from utils.exit_codes import BadInputError
    from utils.generation import SamplingParams

    params = SamplingParams(0.0, 1.0, 1.0, 8)
    fits = [("edge", [5] * (512 - 8))]
    results = engine.generate_encoded(fits, params)
    assert [r.key for r in results] == ["edge"] and results[0].n_generated_tokens <= 8
    _forbid_batches(engine, monkeypatch)
    with pytest.raises(BadInputError, match=re.escape("'over' is 505 tokens; with max_new_tokens 8")):
        engine.generate_encoded([("over", [5] * (512 - 7))], params)


@pytest.mark.parametrize("max_new_tokens", [0, -3])
def test_engine_refuses_no_room_to_generate(engine, monkeypatch, max_new_tokens):
    from utils.exit_codes import BadInputError
    from utils.generation import SamplingParams

    _forbid_batches(engine, monkeypatch)
    with pytest.raises(BadInputError, match="max_new_tokens must be an integer >= 1"):
        engine.generate([("a", "Name a color.")], SamplingParams(0.0, 1.0, 1.0, max_new_tokens))
