"""Training speed options (issue 18): the flags, the SFTConfig they build, the resume rule for them, the
bf16 embedding of a 4-bit base without peft's upcast, and the training benchmark's own helpers."""

from __future__ import annotations

import argparse
import json

import pytest

from conftest import run_python_script

FAST = ["--max-steps", "2", "--save-steps", "100", "--logging-steps", "1", "--grad-accum", "2", "--val-fraction", "0.2"]


def _parse(argv):
    import train_stage1_sft as script

    return script.parse_args([str(a) for a in argv])


def _config(args, tmp_path, has_eval=True):
    from utils import sft_training as sft

    return sft.build_sft_config(args, tmp_path / "ckpt", padding_free=False, has_eval=has_eval, gradient_checkpointing=False)


def test_defaults_keep_todays_training_config(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = _parse(["--save-steps", "25", "--per-device-batch-size", "8"])
    assert (args.kbit_upcast, args.group_by_length, args.torch_compile, args.liger_kernel) == (True, False, "off", False)
    assert args.cudnn_attention is True
    assert args.eval_steps is None and args.eval_batch_size is None
    config = _config(args, tmp_path)
    assert config.train_sampling_strategy == "random" and config.torch_compile is False and config.use_liger_kernel is False
    assert config.eval_steps == 25 and config.per_device_eval_batch_size == 8 and config.ddp_find_unused_parameters is None


def test_speed_flags_reach_the_sft_config(tmp_path, monkeypatch):
    import os

    monkeypatch.setenv("WORLD_SIZE", "2")  # a data-parallel rank: every LoRA weight gets a gradient, no graph search
    for name in ("ACCELERATE_DYNAMO_USE_DYNAMIC", "ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION"):
        monkeypatch.setenv(name, "unset")  # restored after the test: build_sft_config writes them
    args = _parse(["--group-by-length", "--torch-compile", "regional", "--no-kbit-upcast", "--eval-steps", "7", "--eval-batch-size", "32"])
    assert args.kbit_upcast is False
    config = _config(args, tmp_path)
    assert config.train_sampling_strategy == "group_by_length" and config.torch_compile is True
    assert config.eval_steps == 7 and config.per_device_eval_batch_size == 32 and config.ddp_find_unused_parameters is False
    assert (os.environ["ACCELERATE_DYNAMO_USE_DYNAMIC"], os.environ["ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION"]) == ("1", "1")
    config = _config(_parse(["--torch-compile", "model"]), tmp_path, has_eval=False)
    assert config.torch_compile is True and config.eval_steps is None
    assert os.environ["ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION"] == "0"


def test_cudnn_attention_flag_switches_pytorchs_cudnn_attention_on_cuda_only(tmp_path, monkeypatch):
    import torch

    from utils import sft_training as sft

    assert _parse(["--no-cudnn-attention"]).cudnn_attention is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert sft.set_cudnn_attention(False) is False and torch.backends.cuda.cudnn_sdp_enabled()  # no CUDA: nothing touched
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    try:
        assert sft.set_cudnn_attention(False) is True and not torch.backends.cuda.cudnn_sdp_enabled()
        assert sft.set_cudnn_attention(True) is True and torch.backends.cuda.cudnn_sdp_enabled()  # a later run's own choice
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)


@pytest.mark.parametrize("argv,needle", [(["--eval-steps", "0"], "--eval-steps"), (["--eval-batch-size", "-1"], "--eval-batch-size"),
                                         (["--kbit-upcast", "no"], "unrecognized arguments"), (["--torch-compile", "yes"], "invalid choice")])
def test_bad_speed_flag_values_exit_2(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        _parse(argv)
    assert exc.value.code == 2 and needle in capsys.readouterr().err


def test_liger_flag_exits_2_where_liger_cannot_run(capsys):
    from utils.sft_training import liger_kernel_problem

    problem = liger_kernel_problem()
    if problem is None:
        pytest.skip("liger-kernel runs on this machine (CUDA, Triton and the package present)")
    with pytest.raises(SystemExit) as exc:
        _parse(["--liger-kernel"])
    assert exc.value.code == 2 and f"argument --liger-kernel: {problem}" in capsys.readouterr().err


def test_liger_problem_names_what_is_missing(monkeypatch, tmp_path):
    import importlib.util

    import torch

    from utils import sft_training as sft
    from utils.exit_codes import BadInputError

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "liger_kernel" else real_find_spec(name, *a))
    assert "liger-kernel is not installed" in sft.liger_kernel_problem()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())  # package and Triton present ...
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # ... but no GPU
    assert sft.liger_kernel_problem().endswith("no CUDA device")
    args = argparse.Namespace(**{**vars(_parse([])), "liger_kernel": True})  # a caller that skips the parser's check
    with pytest.raises(BadInputError, match="--liger-kernel: .*no CUDA device"):
        _config(args, tmp_path)


def test_group_by_length_is_compared_on_resume_and_older_records_mean_the_defaults(tmp_path):
    from utils import sft_training as sft
    from utils.exit_codes import BadInputError
    from utils.provenance_helper import write_manifest_atomic

    out = tmp_path / "out"
    (out / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoints" / "checkpoint-2" / "trainer_state.json").write_text("{}")
    today = sft.run_hyperparameters(_parse([]), "none")
    assert today["group_by_length"] is False and today["kbit_upcast"] is True
    older = {k: v for k, v in today.items() if k not in ("group_by_length", "kbit_upcast")}  # written before these flags existed
    write_manifest_atomic(out / sft.RUN_IDENTITY_FILE, {"dataset_sha256": "a" * 64, "model_identity": {}, "hyperparameters": older})
    assert sft.check_resume(out, True, "a" * 64, today, allow_changes=False).changes == []
    grouped = sft.run_hyperparameters(_parse(["--group-by-length"]), "none")
    with pytest.raises(BadInputError, match="--group-by-length: recorded False, now True"):
        sft.check_resume(out, True, "a" * 64, grouped, allow_changes=False)


def test_no_upcast_keeps_the_tied_embedding_in_bf16(tiny_model_dir):
    """peft's k-bit preparation casts the embedding that is also the output projection to float32; without the
    upcast it stays bf16, tied, and bit-identical to the loaded weights (the cast back is lossless)."""
    import torch

    from utils.clean_model_loader import CleanModelLoader
    from utils.sft_training import prepare_quantized_model

    prepared = {}
    for upcast in (True, False):
        model, _, _ = CleanModelLoader(str(tiny_model_dir), load_in_4bit=True, dtype="bfloat16", run_sentinels=False).load()
        loaded = model.get_input_embeddings().weight.detach().clone()
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight and loaded.dtype == torch.bfloat16
        model = prepare_quantized_model(model, gradient_checkpointing=False, upcast=upcast)
        head = model.get_output_embeddings().weight
        assert head is model.get_input_embeddings().weight and not head.requires_grad
        prepared[upcast] = {str(p.dtype) for p in model.parameters() if type(p).__name__ != "Params4bit"}
        if not upcast:
            assert head.dtype == torch.bfloat16 and torch.equal(head, loaded)
    assert prepared == {True: {"torch.float32"}, False: {"torch.bfloat16"}}


def test_benchmark_plan_warms_up_first_runs_liger_last_and_profiles_in_place():
    from benchmark_training import plan

    assert plan(["liger", "plain", "fast", "no_upcast"], "plain", warmup=True) == [
        ("plain", "warmup"), ("plain", "timed"), ("plain", "profile"), ("fast", "timed"), ("no_upcast", "timed"), ("liger", "timed")]
    assert plan(["liger", "fast", "plain"], "fast", warmup=False) == [("fast", "timed"), ("fast", "profile"), ("plain", "timed"),
                                                                       ("liger", "timed")]
    assert plan(["no_upcast", "liger"], "plain", warmup=False) == [("no_upcast", "timed"), ("plain", "profile"), ("liger", "timed")]


def _llama_matmul_weights(model_dir) -> int:
    """q, k, v, o, gate, up, down of every layer and the (tied) output projection, from config.json."""
    c = json.loads((model_dir / "config.json").read_text())
    d, kv = c["hidden_size"], c["num_key_value_heads"] * c["hidden_size"] // c["num_attention_heads"]
    return c["num_hidden_layers"] * (2 * d * d + 2 * d * kv + 3 * d * c["intermediate_size"]) + c["vocab_size"] * d


def test_benchmark_counts_every_linear_weight_including_the_output_projection(tiny_model_dir):
    from benchmark_training import matmul_parameters
    from utils.clean_model_loader import CleanModelLoader

    for quantized in (False, True):  # bitsandbytes' Linear4bit counts at its logical size
        model, _, _ = CleanModelLoader(str(tiny_model_dir), load_in_4bit=quantized, run_sentinels=False).load()
        assert matmul_parameters(model) == _llama_matmul_weights(tiny_model_dir)


def test_benchmark_refuses_a_warmup_that_leaves_no_timed_step(tmp_path):
    result = run_python_script("benchmark_training.py", "--steps", 4, "--warmup-steps", 4, "--output", tmp_path / "x.json")
    assert result.returncode == 2 and "leaves no timed step" in result.stderr


def _benchmark(tmp_path, trained_model_dir, configurations, *extra):
    out = tmp_path / "bt" / "training.json"
    result = run_python_script("benchmark_training.py", "--models", "tiny", "--tiny-model", trained_model_dir, "--quantization", "4bit",
                               "--configurations", *configurations, "--steps", 4, "--warmup-steps", 1, "--batch-size", 4,
                               "--eval-examples", 6, "--scratch-dir", tmp_path / "scratch", "--output", out, *extra,
                               env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    return result, out


@pytest.mark.slow  # 50-75 s on 2 shared cores: eleven trainer runs
def test_benchmark_runs_every_cpu_configuration_and_profiles_one(tmp_path, trained_model_dir):
    configurations = ["plain", "padding_free", "packing", "no_upcast", "group_by_length", "rare_logging", "liger", "lora_16bit",
                      "no_cudnn_attention", "lean_16bit", "graphed_16bit"]
    result, out = _benchmark(tmp_path, trained_model_dir, configurations, "--profile", "plain", "--profile-steps", 2)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {row["configuration"]: row for row in report["rows"]}
    assert report["complete"] is True and set(rows) == set(configurations)
    assert "liger-kernel" in rows["liger"]["skipped"] and "[skip] tiny liger" in result.stdout
    assert "need a CUDA device" in rows["graphed_16bit"]["skipped"] and "[skip] tiny graphed_16bit" in result.stdout
    for label, row in rows.items():
        if label in ("liger", "graphed_16bit"):
            continue
        assert row["tokens_per_s"] > 0 and row["timed_steps"] == 3 and 0 <= row["padding_share"] < 1 and row["eval_s"] > 0
        assert row["flops_per_token"] == 4 * _llama_matmul_weights(trained_model_dir) + 6 * row["lora_parameters"]
        assert row["mfu"] is None  # no peak known for a CPU
    assert rows["lora_16bit"]["quantization"] is None and rows["plain"]["quantization"] == "bnb-nf4"
    assert rows["padding_free"]["padding_share"] == 0 and rows["group_by_length"]["length_groups_aligned"] is True
    # The same examples and math give the same losses: exactly where only the logging differs (so the reused base
    # carried nothing over from earlier rows), within float noise for the flattened batch.
    assert (rows["rare_logging"]["train_loss"], rows["rare_logging"]["eval_loss"]) == (rows["plain"]["train_loss"], rows["plain"]["eval_loss"])
    # No cuDNN on a CPU: the flag is recorded and changes nothing.
    assert rows["no_cudnn_attention"]["cudnn_attention"] is False and rows["plain"]["cudnn_attention"] is True
    no_cudnn = rows["no_cudnn_attention"]
    assert (no_cudnn["train_loss"], no_cudnn["eval_loss"]) == (rows["plain"]["train_loss"], rows["plain"]["eval_loss"])
    lean = rows["lean_16bit"]
    assert (lean["quantization"], lean["group_by_length"], lean["cudnn_attention"], lean["torch_compile"]) == (None, True, False, "off")
    assert abs(rows["no_upcast"]["eval_loss_vs_plain"]) < 1e-3 and abs(rows["padding_free"]["eval_loss_vs_plain"]) < 1e-3
    profile = report["profiles"][0]
    assert profile["configuration"] == "plain" and profile["steps"] == 2 and profile["wall_s_per_step"] > 0
    text = (out.parent / profile["file"]).read_text()
    assert "top ops by self_cpu_time_total" in text and "aten::mm" in text


@pytest.mark.slow  # 3-4 min on 2 shared cores: inductor compiles the tiny model three times
def test_benchmark_compiled_configurations_run_on_the_cpu(tmp_path, trained_model_dir):
    result, out = _benchmark(tmp_path, trained_model_dir, ["plain", "torch_compile", "compile_regional", "fast", "lean_compiled"])
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["configuration"]: row for row in json.loads(out.read_text())["rows"]}
    assert (rows["torch_compile"]["torch_compile"], rows["compile_regional"]["torch_compile"]) == ("model", "regional")
    assert rows["fast"]["kbit_upcast"] is False and rows["fast"]["group_by_length"] is True and rows["fast"]["torch_compile"] == "regional"
    assert rows["fast"]["liger_kernel"] is False and not rows["fast"].get("note")
    lean = rows["lean_compiled"]
    assert (lean["quantization"], lean["cudnn_attention"], lean["torch_compile"]) == (None, False, "regional") and lean["tokens_per_s"] > 0
    for label in ("torch_compile", "compile_regional"):  # compiled kernels, the same math
        assert rows[label]["tokens_per_s"] > 0 and abs(rows[label]["eval_loss_vs_plain"]) < 1e-3
