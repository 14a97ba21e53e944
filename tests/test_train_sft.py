"""Stage 1 SFT training on the tiny random Llama (CPU): gate, loss mask, resume, NaN abort, SIGTERM.

Most runs call the script's main() in-process (one torch import for the module); the end-to-end
QLoRA run is a real subprocess. Torch runs on one thread: on a shared 2-core machine the tiny
matmuls are ~100x slower with 2 OpenMP threads fighting other processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_stage1_sft.py"
FAST = ["--max-steps", "2", "--save-steps", "100", "--logging-steps", "1", "--grad-accum", "2", "--val-fraction", "0.2"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """Every test here trains a tiny model."""


def write_dataset(folder: Path, n: int = 10, passed: bool = True, records=None, vouch_for: Path | None = None) -> Path:
    from utils.provenance_helper import sha256_file, write_manifest_atomic

    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "sft.jsonl"
    records = records if records is not None else [
        {"id": f"r{i}", "instruction": f"List {i % 4 + 2} colors.", "response": "red, blue" + ", green" * (i % 3)} for i in range(n)]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    target = vouch_for or data
    write_manifest_atomic(folder / "sft.manifest.json", {
        "stage": "pilot", "qc": {"passed": passed, "failures": [] if passed else ["runaway rate 0.2 >= 0.05"]},
        "outputs": {"data": {"path": str(target), "sha256": sha256_file(target) if target.exists() else "0" * 64}}})
    return data


def run_main(argv: list[str]) -> int:
    """The script's entry point in-process: returns the exit code run_cli would give."""
    import train_stage1_sft as script
    from utils.exit_codes import run_cli

    with pytest.raises(SystemExit) as exc:
        run_cli(lambda: script.main(script.parse_args([str(a) for a in argv])))
    return exc.value.code


def load_tiny(model_dir):
    from utils.clean_model_loader import CleanModelLoader

    return CleanModelLoader(str(model_dir), dtype="float32", run_sentinels=False).load()


def test_end_to_end_4bit_subprocess_and_adapter_changes_logits(tmp_path, tiny_model_dir):
    data = write_dataset(tmp_path / "data")
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STAGE1_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--data", str(data), "--model", str(tiny_model_dir), "--output", str(out),
                           "--quantization", "4bit", "--max-steps", "3", "--save-steps", "2", "--logging-steps", "1",
                           "--grad-accum", "2", "--val-fraction", "0.2", "--lr", "1e-2"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    marker = json.loads((out / "final_adapter" / "TRAINING_SUCCESS").read_text())
    manifest = json.loads((out / "training_manifest.json").read_text())
    from utils.provenance_helper import sha256_file

    assert marker["dataset_sha256"] == sha256_file(data) == manifest["dataset"]["sha256"]
    assert marker["data_manifest"].endswith("sft.manifest.json") and marker["quantization"] == "4bit"
    assert marker["model_identity"]["weights_fingerprint"] and "git_hash" in marker and marker["global_step"] == 3
    assert manifest["args"]["quantization_resolved"] == "4bit" and manifest["base_model_provenance"]["quantization"] == "bnb-nf4"
    assert [h["step"] for h in manifest["loss_history"]["train"]] == [1, 2, 3]
    assert manifest["final_eval_loss"] is not None and manifest["train_tokens"] > 0 and manifest["world_size"] == 1
    assert (out / "loss_curve.png").stat().st_size > 1000 and (out / "checkpoints" / "checkpoint-2" / "trainer_state.json").exists()

    import torch

    from utils.prompt_guards import encode_prompt
    from utils.sft_training import load_adapter

    model, tokenizer, _ = load_tiny(tiny_model_dir)
    ids = torch.tensor([encode_prompt(tokenizer, "List three colors.")], device=model.device)
    with torch.no_grad():
        base_logits = model(ids).logits.clone()
        tuned = load_adapter(model, out / "final_adapter")
        tuned.eval()
        tuned_logits = tuned(ids).logits
    assert (tuned_logits - base_logits).abs().max() > 1e-4


def _trainer(model_dir, tmp_path, *, padding_free: bool, batch_size: int = 2, packing: bool = False, max_len: int = 512):
    import train_stage1_sft as script
    from utils import sft_training as sft

    model, tokenizer, _ = load_tiny(model_dir)
    records = sft.load_sft_records(write_dataset(tmp_path / "data", n=4))
    examples, stats = sft.build_sft_examples(tokenizer, records, max_len)
    args = script.parse_args(["--epochs", "1", "--lr", "1e-3", "--per-device-batch-size", str(batch_size), "--grad-accum", "1",
                              "--save-steps", "10", "--logging-steps", "1", "--seed", "0", "--max-seq-length", str(max_len)]
                             + (["--packing"] if packing else []))
    config = sft.build_sft_config(args, tmp_path / "ckpt", padding_free=padding_free, has_eval=False, gradient_checkpointing=False)
    trainer = sft.build_trainer(model, tokenizer, examples, [], config, sft.make_lora_config())
    return trainer, tokenizer, records


def test_prompt_tokens_get_label_minus_100_and_eos_is_a_label(tmp_path, tiny_model_dir):
    from utils.completion_prompts import CompletionStylePrompts
    from utils.prompt_guards import encode_prompt

    trainer, tokenizer, records = _trainer(tiny_model_dir, tmp_path, padding_free=False)
    assert "completion_mask" not in trainer.train_dataset.column_names and "labels" in trainer.train_dataset.column_names
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])  # TRL keeps the order (no shuffle)
    for record, input_ids, labels, attention in zip(records[:3], batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True):
        prompt = encode_prompt(tokenizer, CompletionStylePrompts.create_response_prompt(record["instruction"]))
        n_prompt, n = len(prompt), int(attention.sum())
        assert input_ids[:n_prompt].tolist() == prompt
        assert (labels[:n_prompt] == -100).all(), "prompt positions must not be trained"
        assert (labels[n_prompt:n] == input_ids[n_prompt:n]).all(), "every response token is a label"
        assert labels[n - 1].item() == tokenizer.eos_token_id, "the EOS closing the response is a label"
        assert tokenizer.decode(input_ids[n_prompt:n - 1]) == CompletionStylePrompts.format_completion(record["response"])
        assert (labels[n:] == -100).all()


def test_padding_free_keeps_mask_and_matches_padded_loss(tmp_path, tiny_model_dir):
    """Flattened batches on the CPU (SDPA): transformers builds a block-diagonal mask from position_ids."""
    import torch

    losses, logits = {}, {}
    for padding_free in (False, True):
        trainer, tokenizer, _ = _trainer(tiny_model_dir, tmp_path / str(padding_free), padding_free=padding_free)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
        batch = {k: v.to(trainer.model.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        trainer.model.eval()
        with torch.no_grad():
            losses[padding_free] = trainer.compute_loss(trainer.model, dict(batch)).item()
            if padding_free:
                assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
                assert (batch["labels"] == tokenizer.eos_token_id).sum() == 3
                logits[True] = trainer.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
                leaky = trainer.model(input_ids=batch["input_ids"]).logits[0]  # one long sequence: examples see each other
            else:
                lengths = batch["attention_mask"].sum(dim=1).tolist()
                logits[False] = torch.cat([trainer.model(input_ids=batch["input_ids"][i:i + 1, :n]).logits[0]
                                           for i, n in enumerate(lengths)])
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    assert (logits[True] - logits[False]).abs().max() < 1e-4
    assert (leaky - logits[False]).abs().max() > 1e-2  # the check above would notice cross-example attention


def test_packing_keeps_the_loss_mask(tmp_path, tiny_model_dir):
    from utils.completion_prompts import CompletionStylePrompts
    from utils.prompt_guards import encode_continuation

    trainer, tokenizer, records = _trainer(tiny_model_dir, tmp_path, padding_free=False, packing=True, max_len=128)
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    assert len(rows) < len(records) and all(len(r["input_ids"]) <= 128 for r in rows)  # several examples per row
    batch = trainer.data_collator(rows)
    trained = int((batch["labels"] != -100).sum())
    expected = sum(len(encode_continuation(tokenizer, CompletionStylePrompts.format_completion(r["response"]))) + 1 for r in records)
    assert trained == expected and int((batch["labels"] == tokenizer.eos_token_id).sum()) == len(records)


def test_padding_free_auto_needs_flash_attention(tiny_model_dir):
    from utils.sft_training import resolve_padding_free

    model, _, _ = load_tiny(tiny_model_dir)
    assert resolve_padding_free(None, model, 8, packing=False)[0] is False  # sdpa: padded batches are faster
    assert resolve_padding_free(None, model, 1, packing=False)[0] is False
    assert resolve_padding_free(True, model, 8, packing=False)[0] is True  # sdpa + position_ids: block-diagonal mask
    assert resolve_padding_free(False, model, 8, packing=True)[0] is True


def test_gradient_checkpointing_auto_only_for_large_models(tiny_model_dir):
    from utils.sft_training import resolve_gradient_checkpointing

    model, _, _ = load_tiny(tiny_model_dir)
    assert resolve_gradient_checkpointing("auto", model) is False  # a few thousand parameters
    assert resolve_gradient_checkpointing("on", model) is True and resolve_gradient_checkpointing("off", model) is False


@pytest.mark.parametrize("case", ["missing", "failed", "modified", "other_file"])
def test_gate_refuses_before_loading_a_model(tmp_path, case, capsys):
    other = tmp_path / "d" / "other.jsonl"
    if case == "other_file":
        other.parent.mkdir(parents=True)
        other.write_text(json.dumps({"id": "o", "instruction": "Say hi.", "response": "Hi."}) + "\n")
    data = write_dataset(tmp_path / "d", passed=case != "failed", vouch_for=other if case == "other_file" else None)
    if case == "missing":
        (tmp_path / "d" / "sft.manifest.json").unlink()
    if case == "modified":
        with data.open("a") as handle:
            handle.write(json.dumps({"id": "x", "instruction": "Add one.", "response": "One."}) + "\n")
    code = run_main(["--data", data, "--model", tmp_path / "no_such_model", "--output", tmp_path / "out"])
    err = capsys.readouterr().err
    assert code == 3, err
    expected = {"missing": "no manifest found", "failed": "runaway rate", "modified": "changed since", "other_file": "vouches for"}
    assert expected[case] in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("content,needle", [("", "empty dataset"), ('{"id": "a", "instruction": "Hi."}\n', ":1: missing field(s) response")])
def test_bad_data_exits_2_naming_file_and_line(tmp_path, content, needle, capsys):
    from utils.provenance_helper import sha256_file, write_manifest_atomic

    data = tmp_path / "sft.jsonl"
    data.write_text(content)
    write_manifest_atomic(tmp_path / "sft.manifest.json", {"qc": {"passed": True, "failures": []},
                                                          "outputs": {"data": {"path": str(data), "sha256": sha256_file(data)}}})
    assert run_main(["--data", data, "--model", tmp_path / "no_such_model", "--output", tmp_path / "out"]) == 2
    err = capsys.readouterr().err
    assert needle in err and str(data) in err


def test_sigterm_saves_checkpoint_then_resume_continues_from_it(tmp_path, tiny_model_dir, monkeypatch, capsys):
    data = write_dataset(tmp_path / "data")
    out = tmp_path / "out"
    argv = ["--data", data, "--model", tiny_model_dir, "--output", out, "--quantization", "none", "--max-steps", "4",
            "--save-steps", "3", "--logging-steps", "1", "--grad-accum", "2", "--val-fraction", "0.2"]
    monkeypatch.setenv("STAGE1_TEST_SIGTERM_AT_STEP", "2")
    assert run_main(argv) == 143
    assert "SIGTERM" in capsys.readouterr().err
    state = json.loads((out / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and not (out / "final_adapter" / "TRAINING_SUCCESS").exists()
    monkeypatch.delenv("STAGE1_TEST_SIGTERM_AT_STEP")

    assert run_main(argv) == 2  # checkpoints present and no --resume: refuse to start over silently
    assert run_main(argv + ["--resume"]) == 0
    manifest = json.loads((out / "training_manifest.json").read_text())
    assert manifest["resumed_from"].endswith("checkpoint-2") and manifest["global_step"] == 4
    assert [h["step"] for h in manifest["loss_history"]["train"]] == [1, 2, 3, 4]  # history carried across the resume
    assert json.loads((out / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4
    assert (out / "final_adapter" / "TRAINING_SUCCESS").exists()


def test_resume_refuses_a_different_dataset(tmp_path, tiny_model_dir, capsys):
    from utils.provenance_helper import write_manifest_atomic

    data = write_dataset(tmp_path / "data")
    out = tmp_path / "out"
    (out / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoints" / "checkpoint-2" / "trainer_state.json").write_text("{}")
    write_manifest_atomic(out / "run_identity.json", {"dataset_sha256": "f" * 64, "dataset": "old.jsonl",
                                                      "model_identity": {}, "hyperparameters": {}})
    assert run_main(["--data", data, "--model", tiny_model_dir, "--output", out, "--resume", *FAST]) == 3
    assert "was trained on dataset old.jsonl (sha256 ffffffffffff...), not on this dataset" in capsys.readouterr().err


def test_split_keeps_a_pair_and_its_variants_on_one_side():
    import random

    from utils.records import base_pair_id
    from utils.sft_training import split_train_val

    plain = [{"id": f"r{i:03d}"} for i in range(50)]
    train, val = split_train_val(plain, 0.2, 7)
    # without variants: the split of one record per pair (a seeded shuffle of the positions)
    order = list(range(50))
    random.Random(7).shuffle(order)
    assert {r["id"] for r in val} == {f"r{i:03d}" for i in order[:10]} and len(train) == 40
    with_variants = [r for i in range(50) for r in [{"id": f"r{i:03d}"}] + [{"id": f"r{i:03d}~v{j}"} for j in (1, 2)][: i % 3]]
    train, val = split_train_val(with_variants, 0.2, 7)
    val_pairs = {base_pair_id(r["id"]) for r in val}
    assert val_pairs == {f"r{i:03d}" for i in order[:10]}  # the same pairs as without variants
    assert not val_pairs & {base_pair_id(r["id"]) for r in train} and len(train) + len(val) == len(with_variants)


def test_latest_complete_checkpoint_skips_incomplete(tmp_path):
    from utils.sft_training import latest_complete_checkpoint

    for step, state in ((2, "{}"), (4, "{}"), (6, None), (8, "{trunc")):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if state is not None:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    assert latest_complete_checkpoint(tmp_path).name == "checkpoint-4"


def test_nan_loss_exits_1_naming_the_step(tmp_path, tiny_model_dir, monkeypatch, capsys):
    data = write_dataset(tmp_path / "data")
    monkeypatch.setenv("STAGE1_INJECT_NAN_AT_STEP", "2")
    code = run_main(["--data", data, "--model", tiny_model_dir, "--output", tmp_path / "out", "--quantization", "none",
                     "--max-steps", "4", "--save-steps", "100", "--logging-steps", "1", "--grad-accum", "2"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "training loss is nan at step 2" in err
    assert not (tmp_path / "out" / "final_adapter" / "TRAINING_SUCCESS").exists()


def test_speed_flags_are_recorded_in_the_manifest_and_the_sft_config(tmp_path, tiny_model_dir, capsys):
    data = write_dataset(tmp_path / "data")
    out = tmp_path / "out"
    assert run_main(["--data", data, "--model", tiny_model_dir, "--output", out, "--quantization", "none", "--group-by-length",
                     "--eval-steps", "1", "--eval-batch-size", "4", *FAST]) == 0, capsys.readouterr().err
    manifest = json.loads((out / "training_manifest.json").read_text())
    args, config = manifest["args"], manifest["sft_config"]
    assert args["group_by_length"] is True and args["eval_steps"] == 1 and args["eval_batch_size"] == 4
    assert args["kbit_upcast"] is True and args["torch_compile"] == "off" and args["liger_kernel"] is False
    assert config["train_sampling_strategy"] == "group_by_length" and config["eval_steps"] == 1
    assert config["per_device_eval_batch_size"] == 4 and config["torch_compile"] is False
    assert [h["step"] for h in manifest["loss_history"]["eval"]] == [1, 2]  # every step, not every --save-steps
    identity = json.loads((out / "run_identity.json").read_text())
    assert identity["hyperparameters"]["group_by_length"] is True


@pytest.mark.slow  # compiles the tiny model: ~45 s
def test_regional_compilation_keeps_counting_train_tokens_after_an_evaluation(tmp_path, tiny_model_dir):
    """accelerate's regional compilation trains a shallow copy of the model's outer modules; after the first
    evaluation the original's own flag stayed in eval mode, so TRL logged every later step as eval_* and stopped
    counting train tokens (a 2 x H200 run recorded 56,536 of ~1.08 M). The guard sets the flag back."""
    data = write_dataset(tmp_path / "data", n=24)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STAGE1_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--data", str(data), "--model", str(tiny_model_dir), "--output", str(out),
                           "--quantization", "none", "--per-device-batch-size", "4", "--max-steps", "6", "--logging-steps", "1",
                           "--save-steps", "2", "--eval-steps", "2", "--val-fraction", "0.2", "--torch-compile", "regional"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train_logs = [line for line in proc.stdout.splitlines() + proc.stderr.splitlines() if "'loss':" in line]
    assert len(train_logs) >= 6 and not any("eval_num_tokens" in line for line in train_logs)
    manifest = json.loads((out / "training_manifest.json").read_text())
    # 6 steps x 4 examples is more than the 19 training examples: more than one epoch's tokens
    assert manifest["train_tokens"] > manifest["dataset"]["train"]["tokens"] > 0
