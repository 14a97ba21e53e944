"""Stage 2 DPO on the tiny random Llama (CPU): the gate, the Stage 1 adapter as both the starting point
and the reference, the saved adapter, resume after SIGTERM, NaN abort, and the resume checks.

The script's main runs in-process (one torch import for the module). The preference pairs and their
manifest are written here; test_stage2_pairs.py tests how real ones are made.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import run_main_in_process
from test_stage2_pairs import build_stage1_workspace

FAST = ["--max-steps", 2, "--grad-accum", 1, "--logging-steps", 1, "--save-steps", 1, "--val-fraction", 0.25, "--lr", 1e-3]


def write_pairs(folder: Path, stage1_adapter: Path, n: int = 8, passed: bool = True, adapter_hashes: dict | None = None) -> Path:
    """Pairs (a short on-task answer preferred to a rambling one) and a manifest as generate_stage2_preference_data.py writes it."""
    from utils.provenance_helper import create_session_manifest, write_manifest_atomic
    from utils.sft_training import adapter_file_hashes

    folder.mkdir(parents=True, exist_ok=True)
    pairs = folder / "preference_pairs.jsonl"
    pairs.write_text("".join(json.dumps({"id": f"st2-r00-{i:05d}:checker", "instruction": f"Name {i % 3 + 2} fruits.",
                                         "chosen": "Apples and pears.", "rejected": "I would like to write an article."}) + "\n"
                             for i in range(n)))
    write_manifest_atomic(folder / "session_manifest.json", create_session_manifest(
        "stage2_pairs", {}, outputs={"data": pairs}, qc={"passed": passed, "failures": [] if passed else ["pairs = 0 (needs >= 20)"]},
        stage1_adapter={"path": str(stage1_adapter), "files_sha256": adapter_hashes or adapter_file_hashes(stage1_adapter)}))
    return pairs


@pytest.fixture(scope="module")
def workspace(tiny_model_dir, tmp_path_factory, one_torch_thread):
    # lr 5e-2: a Stage 1 adapter far enough from the base that a base-model reference would show (see below).
    ws = build_stage1_workspace(tmp_path_factory.mktemp("dpo") / "ws", tiny_model_dir, lr=5e-2)
    return {**ws, "pairs": write_pairs(ws["root"] / "artifacts" / "stage2", ws["adapter"])}


def run(args):
    import train_stage2_dpo as script

    return run_main_in_process(script.main, script.parse_args, list(args))


def test_refuses_pairs_without_a_passing_manifest_or_from_another_adapter(workspace, tmp_path):
    out = tmp_path / "out"
    bare = tmp_path / "bare" / "preference_pairs.jsonl"
    bare.parent.mkdir()
    bare.write_text(workspace["pairs"].read_text())
    code, text = run(["--pairs", bare, "--output", out])
    assert code == 3 and "does not exist" in text, text
    failed = write_pairs(tmp_path / "failed", workspace["adapter"], passed=False)
    code, text = run(["--pairs", failed, "--output", out])
    assert code == 3 and "did not pass its gate" in text and "pairs = 0" in text, text
    other = write_pairs(tmp_path / "other", workspace["adapter"], adapter_hashes={"adapter_model.safetensors": "0" * 64})
    code, text = run(["--pairs", other, "--output", out])
    assert code == 3 and "not the Stage 1 adapter the pairs" in text, text
    assert not out.exists()



@pytest.mark.parametrize("flag,value", [
    ("--beta", "0"), ("--beta", "abc"), ("--lr", "-1"), ("--epochs", "0"), ("--per-device-batch-size", "0"), ("--grad-accum", "0"),
    ("--val-fraction", "1"), ("--max-length", "0"), ("--seed", "-1"), ("--save-steps", "0"), ("--max-steps", "0"),
    ("--quantization", "8bit"),
])
def test_bad_flags_exit_2_at_parse_time(flag, value, capsys):
    import train_stage2_dpo as script

    with pytest.raises(SystemExit) as exc:
        script.parse_args([flag, value])
    assert exc.value.code == 2 and f"argument {flag}:" in capsys.readouterr().err

def _chosen_logp(model, tokenizer) -> float:
    import torch

    from utils.completion_prompts import CompletionStylePrompts as P
    from utils.prompt_guards import encode_continuation, encode_prompt

    prompt = encode_prompt(tokenizer, P.create_response_prompt("Name 2 fruits."))
    answer = encode_continuation(tokenizer, P.format_completion("Apples and pears."))
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logps = torch.log_softmax(model(ids).logits[0, len(prompt) - 1:-1].float(), dim=-1)
    return float(logps.gather(-1, torch.tensor(answer).unsqueeze(-1)).sum())


def test_dpo_quantization_follows_the_stage1_adapter_on_cuda(monkeypatch):
    import torch

    from utils.dpo_training import resolve_dpo_quantization

    def trained_on(quantization):
        return {"run_identity": {"hyperparameters": {"quantization": quantization}}}

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_dpo_quantization("auto", trained_on("none")) == "none"
    assert resolve_dpo_quantization("auto", trained_on("4bit")) == "none"  # no CUDA: the source's CPU rule, whatever Stage 1 did
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_dpo_quantization("auto", trained_on("none")) == "none"
    assert resolve_dpo_quantization("auto", trained_on("4bit")) == "4bit"
    assert resolve_dpo_quantization("auto", None) == "4bit"  # an adapter copied away from its manifest: the source's QLoRA
    assert resolve_dpo_quantization("4bit", trained_on("none")) == "4bit"  # asked for explicitly


def test_two_steps_start_from_and_refer_to_the_stage1_adapter(workspace, tmp_path):
    from utils import evaluation as ev
    from utils.clean_model_loader import CleanModelLoader
    from utils.sft_training import adapter_file_hashes, load_adapter

    out = tmp_path / "dpo"
    code, text = run(["--pairs", workspace["pairs"], "--output", out, *FAST])
    assert code == 0, text
    manifest = json.loads((out / "training_manifest.json").read_text())
    # Step 1's batch is scored before any update: policy = reference exactly when the reference is the
    # Stage 1 adapter the policy starts from, so the loss is ln 2 and every reward 0 ...
    first = manifest["loss_history"]["train"][0]
    assert first["step"] == 1 and first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert manifest["metric_history"]["rewards/chosen"][0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-7)
    # ... which a base-model reference could not give: this Stage 1 adapter moves the chosen answer's log-prob.
    model, tokenizer, _ = CleanModelLoader(str(workspace["model"]), run_sentinels=False).load()
    base_logp = _chosen_logp(model, tokenizer)
    stage1_logp = _chosen_logp(load_adapter(model, workspace["adapter"]), tokenizer)
    assert abs(stage1_logp - base_logp) > 0.05
    assert [h["step"] for h in manifest["loss_history"]["train"]] == [1, 2] and manifest["final_eval_loss"] is not None
    assert manifest["args"]["beta"] == 0.1 and manifest["dpo_config"]["beta"] == 0.1 and manifest["dpo_config"]["loss_type"] == ["sigmoid"]
    # The kept adapter is the trained policy alone (no copy of the reference), readable by the evaluation.
    adapter = out / "final_adapter"
    assert not (adapter / "ref").exists() and (out / "dpo_curves.png").stat().st_size > 1000
    marker = json.loads((adapter / "TRAINING_SUCCESS").read_text())
    assert marker["adapter_files_sha256"] == adapter_file_hashes(adapter) and marker["script"] == "train_stage2_dpo.py"
    assert marker["reference_adapter"]["files_sha256"] == adapter_file_hashes(workspace["adapter"])
    trained = ev.read_adapter(adapter)
    assert ev.resolve_base_model(None, trained) == str(workspace["model"])
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == \
        json.loads((workspace["adapter"] / "adapter_config.json").read_text())["r"]
    assert (adapter / "adapter_model.safetensors").read_bytes() != (workspace["adapter"] / "adapter_model.safetensors").read_bytes()
    # A resume with another beta is refused, naming it; the finished run is left as it was.
    code, text = run(["--pairs", workspace["pairs"], "--output", out, *FAST, "--resume", "--beta", 0.5])
    assert code == 2 and "--beta: recorded 0.1, now 0.5" in text, text
    assert (adapter / "TRAINING_SUCCESS").exists()


def test_sigterm_saves_a_checkpoint_and_resume_finishes(workspace, tmp_path, monkeypatch):
    out = tmp_path / "dpo"
    monkeypatch.setenv("STAGE1_TEST_SIGTERM_AT_STEP", "1")
    code, text = run(["--pairs", workspace["pairs"], "--output", out, *FAST, "--save-steps", 100])
    assert code == 143, text
    assert (out / "checkpoints" / "checkpoint-1" / "trainer_state.json").exists() and not (out / "final_adapter").exists()
    monkeypatch.delenv("STAGE1_TEST_SIGTERM_AT_STEP")
    code, text = run(["--pairs", workspace["pairs"], "--output", out, *FAST, "--save-steps", 100, "--resume"])
    assert code == 0, text
    manifest = json.loads((out / "training_manifest.json").read_text())
    assert manifest["global_step"] == 2 and manifest["resumed_from"].endswith("checkpoint-1")
    assert (out / "final_adapter" / "TRAINING_SUCCESS").exists()


def test_nan_loss_stops_training(workspace, tmp_path, monkeypatch):
    monkeypatch.setenv("STAGE1_INJECT_NAN_AT_STEP", "1")
    code, text = run(["--pairs", workspace["pairs"], "--output", tmp_path / "dpo", *FAST])
    assert code == 1 and "nan" in text.lower(), text
    assert not (tmp_path / "dpo" / "final_adapter" / "TRAINING_SUCCESS").exists()
