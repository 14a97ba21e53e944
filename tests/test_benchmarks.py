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
                                              "--critic-prompts", 4, "--critic-tokens", 16, "--runs", 2, "--output", out])
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


def test_training_benchmark_compares_with_plain_in_4bit(tmp_path, trained_model_dir):
    out = tmp_path / "training.json"
    result = _run("benchmark_training.py", ["--models", "tiny", "--tiny-model", trained_model_dir, "--quantization", "4bit",
                                            "--configurations", "plain", "padding_free", "--steps", 3, "--warmup-steps", 1,
                                            "--batch-size", 4, "--scratch-dir", tmp_path / "scratch", "--output", out])
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [row["configuration"] for row in rows] == ["plain", "padding_free"]
    assert all(row["quantization"] == "bnb-nf4" and row["tokens_per_s"] > 0 and row["timed_steps"] == 2 for row in rows)
    assert rows[1]["ratio_to_plain"] == round(rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"], 3)
