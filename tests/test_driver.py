"""scripts/run_stage1.sh end to end on the tiny trained model: every stage runs, the chain stops at
the first failed gate with that stage's exit code, and outputs land where it says."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ["bash", str(ROOT / "scripts" / "run_stage1.sh")]
STAGE2 = ["bash", str(ROOT / "scripts" / "run_stage2.sh")]


def _env(**extra):
    # The test's own interpreter stands in for .venv: the suite already runs inside it.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return {**os.environ, "PATH": path, "STAGE1_SKIP_INSTALL": "1", "OMP_NUM_THREADS": "1", **extra}


@pytest.mark.slow  # every stage end to end: 29-39 s measured
def test_driver_runs_every_stage_and_stops_at_the_failed_gate(trained_model_dir, tmp_path):
    from tiny_models import TRAINED_PIPELINE_FLAGS, TRAINED_PIPELINE_OVERRIDES

    # GEN_ARGS: the tiny model's critic signals need these to pass the probe (tests/tiny_models.py says why).
    # SCALE_RANKS=2: the scale stage runs as two torchrun ranks (CPU ranks here, one per GPU on a GPU host).
    env = _env(TEST_COUNT="10", PILOT_COUNT="6", SCALE_COUNT="12", SHARDS="2", EPOCHS="1", BATCH="8",
               GEN_ARGS=" ".join(TRAINED_PIPELINE_FLAGS), SCALE_RANKS="2")
    result = subprocess.run(DRIVER + ["--profile", "cpu", "--model", str(trained_model_dir), "--root", str(tmp_path), "--stage2"],
                            capture_output=True, text=True, env=env, timeout=900)
    out = result.stdout + result.stderr
    for stage in ("test set", "pilot", "scale", "train", "evaluate"):
        assert f"=== {stage}:" in out, out[-3000:]
    # The tiny model does not improve significantly, so the evaluation gate fails and the chain says so;
    # --stage2 continues only after every Stage 1 gate passed.
    assert result.returncode == 4 and "stopped at 'evaluate' (exit 4)" in out, out[-3000:]
    assert "[stage2]" not in out and not (tmp_path / "artifacts" / "stage2").exists()
    assert "=== scale: python -m torch.distributed.run --standalone --nproc-per-node 2 scripts/generate_stage1_scale_data.py" in out
    assert "rank 1: my shards are done; rank 0 merges" in out, out[-3000:]
    assert (tmp_path / "data" / "stage1_sft_data.manifest.json").exists()
    assert (tmp_path / "checkpoints" / "stage1_sft" / "final_adapter" / "TRAINING_SUCCESS").exists()
    assert (tmp_path / "results" / "sft_eval" / "evaluation_results.json").exists()
    # The driver adds no settings of its own: the pilot chose the calibration and recorded it (and GEN_ARGS).
    pilot = json.loads((tmp_path / "artifacts" / "pilot" / "session_manifest.json").read_text())
    assert pilot["calibration"]["name"] == "source" and pilot["calibration"]["chosen_by"].startswith("auto")
    assert pilot["overrides"] == TRAINED_PIPELINE_OVERRIDES


@pytest.mark.parametrize("flag", ["--model", "--profile", "--root"])
def test_driver_refuses_a_flag_without_its_value(flag, tmp_path):
    result = subprocess.run(DRIVER + [flag], capture_output=True, text=True, env=_env(), timeout=120, cwd=tmp_path)
    assert result.returncode == 2 and f"{flag} needs a value" in result.stderr, result.stderr


def test_stage2_driver_stops_at_the_pair_gate_without_a_stage1_run(tmp_path):
    result = subprocess.run(STAGE2 + ["--profile", "cpu", "--root", str(tmp_path)], capture_output=True, text=True, env=_env(),
                            timeout=300)
    out = result.stdout + result.stderr
    assert result.returncode == 3 and "stopped at 'pairs' (exit 3)" in out and "Stage 1 evaluation" in out, out[-2000:]
    assert "=== dpo" not in out and not (tmp_path / "artifacts" / "stage2").exists()
    bad = subprocess.run(STAGE2 + ["--profile", "tpu"], capture_output=True, text=True, env=_env(), timeout=120)
    assert bad.returncode == 2 and "--profile must be" in bad.stderr


@pytest.mark.slow  # pairs, DPO and the three-way evaluation through the driver: 30-60 s measured on 2 shared cores
def test_stage2_driver_chains_pairs_dpo_and_evaluation(trained_model_dir, tmp_path):
    from test_stage2_pairs import build_stage1_workspace

    build_stage1_workspace(tmp_path, trained_model_dir)  # a passed Stage 1 run in the driver's layout
    env = _env(S2_INSTRUCTIONS="4", S2_CANDIDATES="3", BATCH="8",
               S2_ARGS="--min-pairs 1 --max-new-tokens 24 --min-signal-margin 0.01 --constraint-fraction 0.5",
               DPO_ARGS="--max-steps 2 --grad-accum 1 --val-fraction 0 --logging-steps 1")
    result = subprocess.run(STAGE2 + ["--profile", "cpu", "--root", str(tmp_path)], capture_output=True, text=True, env=env, timeout=900)
    out = result.stdout + result.stderr
    for stage in ("pairs", "dpo", "evaluate"):
        assert f"=== {stage} finished with exit" in out, out[-3000:]
    assert result.returncode in (0, 4), out[-3000:]
    assert result.returncode == 0 or "stopped at 'evaluate' (exit 4)" in out
    assert (tmp_path / "checkpoints" / "stage2_dpo" / "final_adapter" / "TRAINING_SUCCESS").exists()
    results = json.loads((tmp_path / "results" / "stage2_eval" / "evaluation_results.json").read_text())
    assert results["gate_comparison"] == "adapter_vs_reference"
    assert results["models"]["reference"]["adapter_path"] == str(tmp_path / "checkpoints" / "stage1_sft" / "final_adapter")


@pytest.mark.parametrize("ranks", ["0", "two", "-1"])
def test_driver_refuses_a_bad_number_of_scale_ranks(ranks, tmp_path):
    result = subprocess.run(DRIVER + ["--profile", "cpu", "--root", str(tmp_path)], capture_output=True, text=True,
                            env=_env(SCALE_RANKS=ranks), timeout=120)
    assert result.returncode == 2 and f"SCALE_RANKS must be a whole number >= 1, got '{ranks}'" in result.stderr
    assert not (tmp_path / "data").exists()  # refused before the first stage


def test_driver_refuses_a_bad_quantization(tmp_path):
    result = subprocess.run(DRIVER + ["--profile", "gpu", "--root", str(tmp_path)], capture_output=True, text=True,
                            env=_env(QUANT="8bit", SCALE_RANKS="1"), timeout=120)
    assert result.returncode == 2 and "QUANT must be auto, 4bit or none, got '8bit'" in result.stderr
    assert not (tmp_path / "data").exists()


def test_driver_refuses_a_bad_graphs_value(tmp_path):
    result = subprocess.run(DRIVER + ["--profile", "gpu", "--root", str(tmp_path)], capture_output=True, text=True,
                            env=_env(GRAPHS="yes", SCALE_RANKS="1"), timeout=120)
    assert result.returncode == 2 and "GRAPHS must be 0 or 1, got 'yes'" in result.stderr
    assert not (tmp_path / "data").exists()


def test_driver_refuses_a_bad_profile(tmp_path):
    result = subprocess.run(DRIVER + ["--profile", "tpu", "--root", str(tmp_path)], capture_output=True, text=True,
                            env=_env(), timeout=120)
    assert result.returncode == 2 and "--profile must be" in result.stderr


def test_driver_reports_a_failed_stage_after_sourcing_the_installer(tmp_path):
    """Without STAGE1_SKIP_INSTALL the driver sources setup_env.sh; a failing stage must still be
    reported by name and code (an errexit leaking from the sourced file once ended it silently)."""
    env = {k: v for k, v in _env(TEST_COUNT="5").items() if k != "STAGE1_SKIP_INSTALL"}
    result = subprocess.run(DRIVER + ["--profile", "cpu", "--model", str(tmp_path / "missing.gguf"), "--root", str(tmp_path)],
                            capture_output=True, text=True, env=env, timeout=600)
    out = result.stdout + result.stderr
    assert result.returncode == 2 and "=== pilot finished with exit 2" in out and "stopped at 'pilot' (exit 2)" in out, out[-2000:]


@pytest.mark.parametrize("extra_args, env, lr, quantization, graphs", [
    ([], {}, "5e-4", "none", "1"), (["--model", "other.gguf"], {}, "2e-4", "auto", "0"),
    ([], {"LR": "1e-4", "QUANT": "4bit", "GRAPHS": "0"}, "1e-4", "4bit", "0"), (["--model", "other.gguf"], {"GRAPHS": "1"}, "2e-4", "auto", "1")])
def test_gpu_profile_defaults(extra_args, env, lr, quantization, graphs, tmp_path):
    """The gpu profile: best of 4 candidates in the pilot; lr 5e-4, LoRA on the 16-bit base and CUDA-graph training
    steps for the bundled model only (measured), the source's 2e-4, 4-bit QLoRA (auto) and eager steps for any other;
    LR, QUANT and GRAPHS for either. PILOT_COUNT=0 stops the chain at the pilot (exit 2)."""
    result = subprocess.run(DRIVER + ["--profile", "gpu", "--root", str(tmp_path), *extra_args], capture_output=True, text=True,
                            env=_env(TEST_COUNT="5", PILOT_COUNT="0", SCALE_RANKS="1", **env), timeout=300)
    out = result.stdout + result.stderr
    assert result.returncode == 2 and "stopped at 'pilot' (exit 2)" in out, out[-2000:]
    assert f"epochs=3 batch=256 lr={lr} quantization={quantization} cuda_graphs={graphs}" in out
    (pilot_line,) = [line for line in out.splitlines() if "=== pilot:" in line]
    assert pilot_line.endswith("--num-candidates 4")
