"""A pilot or shard folder belongs to one run: resumed only with the same settings and the same model
(by content hashes, not by the name given), and claimed only once the model has loaded."""

import json
import os
from pathlib import Path

import pytest

from conftest import run_main_in_process, run_python_script
from tiny_models import TRAINED_PIPELINE_FLAGS

ROOT = Path(__file__).resolve().parents[1]


def _pilot(*args):
    return run_python_script("generate_stage1_pilot_data.py", *args, "--no-progress", *TRAINED_PIPELINE_FLAGS)


def _simulate_a_kill(folder: Path, manifest_name: str = "session_manifest.json") -> None:
    """What kill -9 in phase 4 leaves: no manifest, no data, the judged file cut short."""
    (folder / manifest_name).unlink()
    (folder / "sft_data.jsonl").unlink()
    judged = (folder / "phase4_judged.jsonl").read_bytes().split(b"\n")
    (folder / "phase4_judged.jsonl").write_bytes(judged[0] + b"\n")


def _phase_files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("phase*.jsonl"))}


def test_a_symlink_repointed_at_other_weights_is_refused(trained_model_dir, tiny_model_dir, tmp_path):
    link, out = tmp_path / "cur", tmp_path / "pilot"
    link.symlink_to(trained_model_dir, target_is_directory=True)
    first = _pilot("--model", link, "--count", 4, "--output", out)
    assert first.returncode == 0, first.stderr[-2000:]
    _simulate_a_kill(out)
    before = _phase_files(out)
    link.unlink()
    link.symlink_to(tiny_model_dir, target_is_directory=True)
    again = _pilot("--model", link, "--count", 4, "--output", out)
    # Same --model string, other weights: phases 1-3 of one model must not be finished by another.
    assert again.returncode == 2, again.stdout[-2000:] + again.stderr[-2000:]
    assert "different configuration" in again.stderr and "model.weights_fingerprint" in again.stderr
    assert _phase_files(out) == before and not (out / "session_manifest.json").exists()


def test_the_same_model_by_a_relative_path_resumes(trained_model_dir, tmp_path):
    out = tmp_path / "pilot"
    assert _pilot("--model", Path(trained_model_dir).resolve(), "--count", 4, "--output", out).returncode == 0
    _simulate_a_kill(out)
    relative = os.path.relpath(trained_model_dir, ROOT)  # the scripts run with cwd=ROOT
    again = _pilot("--model", relative, "--count", 4, "--output", out)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "[pilot] resuming" in again.stdout
    assert json.loads((out / "session_manifest.json").read_text())["resumed"] is True


@pytest.mark.parametrize("bad", [["--model", "{tmp}/no-such-model"], ["--dtype", "foo"]])
def test_a_failed_start_does_not_claim_the_folder(trained_model_dir, tmp_path, bad):
    out = tmp_path / "pilot"
    bad = [part.replace("{tmp}", str(tmp_path)) for part in bad]
    model = [] if bad[0] == "--model" else ["--model", trained_model_dir]
    failed = _pilot(*model, *bad, "--count", 4, "--output", out)
    assert failed.returncode != 0
    assert not (out / "run_config.json").exists()
    fixed = _pilot("--model", trained_model_dir, "--count", 4, "--output", out)
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    assert "[pilot] starting" in fixed.stdout


def test_a_shard_resumed_with_other_weights_is_refused(trained_model_dir, tiny_model_dir, tmp_path):
    from generate_stage1_scale_data import main, parse_args

    link = tmp_path / "cur"
    link.symlink_to(trained_model_dir, target_is_directory=True)
    assert _pilot("--model", link, "--count", 4, "--output", tmp_path / "pilot").returncode == 0
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(var, None)

    def scale():
        argv = ["--pilot-manifest", str(tmp_path / "pilot" / "session_manifest.json"), "--output", str(tmp_path / "data.jsonl"),
                "--count", "2", "--num-shards", "1", "--batch-size", "8", "--no-progress", "--no-merge", "--model", str(link)]
        return run_main_in_process(main, parse_args, argv)

    code, out = scale()
    assert code == 0, out
    shard = tmp_path / "data_shards" / "shard_000"
    assert json.loads((shard / "shard_manifest.json").read_text())["overrides"] == {}  # the pilot's own model
    _simulate_a_kill(shard, "shard_manifest.json")
    link.unlink()
    link.symlink_to(tiny_model_dir, target_is_directory=True)
    code, out = scale()
    assert code == 2 and "different configuration" in out and "model.weights_fingerprint" in out, out
    assert not (shard / "shard_manifest.json").exists()
