"""Both benchmarks run end to end as commands on the CPU (tiny model) and write complete JSON."""

import json
import subprocess
from pathlib import Path

import pytest

from conftest import run_python_script

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, args: list) -> subprocess.CompletedProcess:
    return run_python_script(script, *args)


@pytest.mark.slow  # 24 s and more measured
def test_generation_benchmark_measures_every_path(tmp_path, trained_model_dir):
    out = tmp_path / "generation.json"
    result = _run("benchmark_generation.py", ["--models", "tiny", "--tiny-model", trained_model_dir, "--batch-sizes", 1, 4,
                                              "--sampling-batch-sizes", 4, "--new-tokens", 6, "--prompt-tokens", 12,
                                              "--critic-prompts", 4, "--critic-tokens", 16, "--runs", 2, "--output", out,
                                              "--measurements", "decode", "critic"])
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    paths = {(row["path"], row["batch"]) for row in rows}
    assert paths == {("plain_generate", 1), ("engine_no_graph", 1), ("engine", 1), ("plain_generate", 4),
                     ("engine_no_graph", 4), ("engine", 4), ("plain_generate_sampled", 4), ("engine_sampled", 4),
                     ("critic_scoring", 4)}
    for row in rows:
        assert row.get("tokens_per_s", row.get("prompts_per_s")) > 0
        if row["path"].startswith("engine"):
            assert row["speedup_vs_plain"] > 0
        if "tokens_per_s" in row:  # the decode steps alone: the call minus its one-token version
            # Both timings come from one noisy run, so only their presence is checked, not an order.
            assert row["prefill_s"] > 0
            assert row["decode_tokens_per_s"] > 0 and row["decode_fraction_of_bandwidth_floor"] > 0
        if row["path"] in ("plain_generate", "engine_no_graph", "engine"):  # float32 on the CPU: the same tokens
            assert row["greedy_rows_equal_plain"] == 1.0
    assert "x plain" in result.stdout  # the table is printed last


def test_generation_benchmark_measures_the_response_shape_with_and_without_sharing(tmp_path, trained_model_dir):
    out = tmp_path / "response.json"
    result = _run("benchmark_generation.py", ["--models", "tiny", "--tiny-model", trained_model_dir, "--measurements", "response",
                                              "--response-batch-sizes", 8, "--candidates", 4, "--response-new-tokens", 6,
                                              "--instruction-tokens", 4, "--prefix-tokens", 40, "--runs", 1, "--output", out])
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(row["path"], row["batch"], row["prompt_tokens"]) for row in rows] == [("response_unshared", 8, 44), ("response_shared", 8, 44)]
    unshared, shared = rows
    # 8 rows behind one 40-token prefix, 2 instructions x 4 candidates: 7 of the prefix's copies and 6 of the
    # instructions' (4 tokens each) not prefilled, per call.
    assert (unshared["prefix_tokens_saved_per_call"], shared["prefix_tokens_saved_per_call"]) == (0, 7 * 40 + 6 * 4)
    assert shared["prefill_tokens_per_call"] + shared["prefix_tokens_saved_per_call"] == unshared["prefill_tokens_per_call"] == 8 * 44
    assert shared["shared_vs_unshared"] == pytest.approx(shared["tokens_per_s"] / unshared["tokens_per_s"], rel=0.01)
    assert "shared prefix" in result.stdout


def test_response_prompts_are_the_demonstrations_then_n_copies_of_each_instruction(trained_model_dir):
    from benchmark_generation import parse_args, response_prompts
    from utils.clean_model_loader import CleanModelLoader
    from utils.completion_prompts import CompletionStylePrompts
    from utils.prompt_guards import encode_prompt

    _, tokenizer, _ = CleanModelLoader(str(trained_model_dir), tokenizer_only=True).load()
    demonstrations = encode_prompt(tokenizer, CompletionStylePrompts.demonstration_prefix())
    args = parse_args(["--candidates", "3", "--instruction-tokens", "5"])
    for name in ("bundled", "tiny"):  # the real demonstration tokens; random ones of the same length
        items, prefix = response_prompts(name, tokenizer, len(tokenizer), 7, args)
        assert prefix == len(demonstrations) and len(items) == 7 and len({key for key, _ in items}) == 7
        assert all(len(ids) == prefix + 5 and ids[:prefix] == items[0][1][:prefix] for _, ids in items)
        assert (items[0][1][:prefix] == demonstrations) == (name == "bundled")
        assert items[0][1] == items[2][1] != items[3][1]  # three candidates of each instruction


def test_training_benchmark_compares_with_plain_in_4bit(tmp_path, trained_model_dir):
    out = tmp_path / "training.json"
    result = _run("benchmark_training.py", ["--models", "tiny", "--tiny-model", trained_model_dir, "--quantization", "4bit",
                                            "--configurations", "plain", "padding_free", "--steps", 3, "--warmup-steps", 1,
                                            "--batch-size", 4, "--eval-examples", 4, "--scratch-dir", tmp_path / "scratch", "--output", out])
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert report["complete"] is True and [row["configuration"] for row in rows] == ["plain", "padding_free"]
    assert all(row["quantization"] == "bnb-nf4" and row["tokens_per_s"] > 0 and row["timed_steps"] == 2 for row in rows)
    assert rows[1]["ratio_to_plain"] == round(rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"], 3)
    assert rows[1]["eval_loss_vs_plain"] == round(rows[1]["eval_loss"] / rows[0]["eval_loss"] - 1, 4)
    assert rows[0]["padding_share"] > 0 == rows[1]["padding_share"]  # padded batches vs one flattened row
    assert all(row["mfu"] is None and row["flops_per_token"] > 0 for row in rows)  # no known peak on a CPU
