"""Scale stage: the pilot gate, shard planning and seeds, the rank split, resume/skip, the merge
(determinism, cross-shard dedup, QC recomputed), overrides, and torchrun with two CPU ranks."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import read_jsonl_lines as _lines
from conftest import run_main_in_process
from tiny_models import TRAINED_PIPELINE_FLAGS

ROOT = Path(__file__).resolve().parents[1]
PILOT = ROOT / "scripts" / "generate_stage1_pilot_data.py"
SCALE = ROOT / "scripts" / "generate_stage1_scale_data.py"
OVERRIDE_FLAGS = ["--response-temperature", "0.25", "--qc-median-response-tokens-max", "45"]
OVERRIDES = {"response_temperature": {"from": 0.3, "to": 0.25}, "qc_median_response_tokens_max": {"from": 40, "to": 45}}


def _sha(path):
    from utils.provenance_helper import sha256_file

    return sha256_file(path)


@pytest.fixture(scope="session")
def pilot_manifest(tmp_path_factory, trained_model_dir):
    base = tmp_path_factory.mktemp("scale_pilot")
    model = trained_model_dir
    env = {**os.environ, "STAGE1_CACHE_DIR": str(base / "cache")}
    # --constraint-fraction 0.5: enough constrained pairs in a run this small for the merge tests to see some.
    result = subprocess.run([sys.executable, str(PILOT), "--model", str(model), "--count", "6", "--output", str(base / "pilot"),
                             "--no-progress", "--constraint-fraction", "0.5", *TRAINED_PIPELINE_FLAGS], capture_output=True,
                            text=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return base / "pilot" / "session_manifest.json"


def scale(pilot, output, *flags):
    """Run the script's main in this process (saves a torch import per run); (exit code, stdout)."""
    from generate_stage1_scale_data import main, parse_args

    return run_main_in_process(main, parse_args, ["--pilot-manifest", pilot, "--output", output, "--count", "4",
                                                  "--num-shards", "2", "--batch-size", "8", "--no-progress", *flags])


@pytest.fixture(scope="module")
def scale_run(pilot_manifest, tmp_path_factory):
    """Shard 0 alone, then a simulated kill of shard 0, then every shard (resume + merge)."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(var, None)
    output = tmp_path_factory.mktemp("scale") / "data.jsonl"
    shard0 = output.parent / "data_shards" / "shard_000"
    first = scale(pilot_manifest, output, "--shard-index", "0", *OVERRIDE_FLAGS)
    first_manifest = json.loads((shard0 / "shard_manifest.json").read_text())
    merged_after_first = output.exists()
    # a kill mid-shard: no manifest, no data, phase 3/4 files cut (one torn line)
    (shard0 / "shard_manifest.json").unlink()
    (shard0 / "sft_data.jsonl").unlink()
    judged = (shard0 / "phase4_judged.jsonl").read_bytes().split(b"\n")
    (shard0 / "phase4_judged.jsonl").write_bytes(judged[0] + b"\n" + judged[1][:25])
    responses = (shard0 / "phase3_responses.jsonl").read_bytes().split(b"\n")
    (shard0 / "phase3_responses.jsonl").write_bytes(b"\n".join(responses[:2]) + b"\n")
    second = scale(pilot_manifest, output, *OVERRIDE_FLAGS)
    return {"output": output, "pilot": pilot_manifest, "first": first, "second": second, "first_manifest": first_manifest,
            "merged_after_first": merged_after_first, "shards": [shard0, output.parent / "data_shards" / "shard_001"]}


# -- units --------------------------------------------------------------------------------------
def test_plan_even_split_and_shard_seed_rule(tmp_path):
    from utils.exit_codes import BadInputError
    from utils.sharding import plan_shards, shard_seed

    specs = plan_shards(10, 3, 7, tmp_path / "out" / "set.jsonl")
    assert [s.count for s in specs] == [4, 3, 3]
    assert [s.seed for s in specs] == [7000, 7001, 7002] == [shard_seed(7, i) for i in range(3)]
    assert [s.key_prefix for s in specs] == ["s000-", "s001-", "s002-"]
    assert specs[2].folder == tmp_path / "out" / "set_shards" / "shard_002"
    assert sum(s.count for s in plan_shards(15000, 7, 42, tmp_path / "x.jsonl")) == 15000
    for count, shards in ((2, 3), (0, 1), (5000, 1001)):
        with pytest.raises(BadInputError):
            plan_shards(count, shards, 1, tmp_path / "x.jsonl")


def test_rank_split():
    from utils.exit_codes import BadInputError
    from utils.sharding import launch_from_env, select_shards

    assert launch_from_env({}).launched is False
    launch = launch_from_env({"RANK": "1", "WORLD_SIZE": "3", "LOCAL_RANK": "1"})
    assert (launch.rank, launch.world_size, launch.local_rank, launch.launched) == (1, 3, 1, True)
    parts = [select_shards(10, None, rank, 3) for rank in range(3)]
    assert parts == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert select_shards(10, None) == list(range(10))
    assert [select_shards(10, [7, 2, 5], rank, 2) for rank in range(2)] == [[2, 7], [5]]  # explicit indices split by position
    assert select_shards(10, [3, 3]) == [3]
    with pytest.raises(BadInputError):
        select_shards(4, [4])
    with pytest.raises(BadInputError):
        launch_from_env({"RANK": "3", "WORLD_SIZE": "2"})
    assert launch_from_env({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}).local_world_size == 4
    with pytest.raises(BadInputError, match="LOCAL_RANK 4 is not within LOCAL_WORLD_SIZE 4"):
        launch_from_env({"RANK": "4", "WORLD_SIZE": "8", "LOCAL_RANK": "4", "LOCAL_WORLD_SIZE": "4"})


def test_ranks_sharing_a_gpu_split_its_memory_evenly():
    from utils.sharding import SHARED_GPU_MEMORY, gpu_share

    assert [gpu_share(rank, 4, 4) for rank in range(4)] == [(0, 1.0), (1, 1.0), (2, 1.0), (3, 1.0)]
    assert [gpu_share(rank, 2, 1) for rank in range(2)] == [(0, SHARED_GPU_MEMORY / 2)] * 2
    # 5 ranks on 2 GPUs: GPU 0 takes ranks 0, 2, 4 and GPU 1 ranks 1, 3.
    assert [gpu_share(rank, 5, 2) for rank in range(5)] == [(0, SHARED_GPU_MEMORY / 3), (1, SHARED_GPU_MEMORY / 2)] * 2 + [
        (0, SHARED_GPU_MEMORY / 3)]
    assert gpu_share(0, 1, 8) == (0, 1.0)


def test_a_rank_sharing_its_gpu_holds_its_allocator_to_its_part(monkeypatch, capsys):
    import torch

    from utils.sharding import SHARED_GPU_MEMORY, Launch, claim_gpu

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda gpu: calls.append(("device", gpu)))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda part, gpu: calls.append(("part", part, gpu)))
    assert claim_gpu(Launch()) == "auto" and calls == []  # not launched: the loader places the model
    assert claim_gpu(Launch(1, 2, 1, True, 2)) == "cuda:0"
    assert calls == [("device", 0), ("part", SHARED_GPU_MEMORY / 2, 0)]
    assert "GPU 0 is shared; this rank holds at most 47% of its memory" in capsys.readouterr().out
    calls.clear()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert claim_gpu(Launch(1, 2, 1, True, 2)) == "cuda:1" and calls == [("device", 1)]  # a GPU of its own: no cap


def test_merge_records_first_wins_and_truncates():
    from utils.sharding import merge_records, sum_phase_counts

    shards = [[{"id": "s000-b", "instruction": "Name three facts about the moon."},
               {"id": "s000-a", "instruction": "Describe rain in one sentence."}],
              [{"id": "s001-a", "instruction": "describe RAIN in one sentence"},
               {"id": "s001-b", "instruction": "Name three facts about the moon today."},
               {"id": "s001-c", "instruction": "Give a tip about bread."}]]
    kept, removed = merge_records(shards, 0.7)
    assert [r["id"] for r in kept] == ["s000-a", "s000-b", "s001-c"]
    assert removed == [{"id": "s001-a", "shard": 1, "kind": "exact", "duplicate_of": "s000-a"},
                       {"id": "s001-b", "shard": 1, "kind": "near", "duplicate_of": "s000-b"}]
    assert [r["id"] for r in merge_records(shards, 0.7, count=2)[0]] == ["s000-a", "s000-b"]
    total = sum_phase_counts([{"candidates": 3, "prefilter_and_dedup": {"passed": 2, "too_short": 1}, "instruction_critic_judged": 2,
                               "instruction_critic_accepted": 1, "instruction_critic_acceptance_rate": 0.5},
                              {"candidates": 2, "prefilter_and_dedup": {"passed": 2}, "instruction_critic_judged": 2,
                               "instruction_critic_accepted": 2}])
    assert total == {"candidates": 5, "prefilter_and_dedup": {"passed": 4, "too_short": 1}, "instruction_critic_judged": 4,
                     "instruction_critic_accepted": 3, "instruction_critic_acceptance_rate": 0.75}


# -- the pilot gate -------------------------------------------------------------------------------
def test_gate_refusals_exit_3(pilot_manifest, tmp_path):
    result = subprocess.run([sys.executable, str(SCALE), "--pilot-manifest", str(tmp_path / "missing.json"), "--output",
                             str(tmp_path / "d.jsonl")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 3 and "does not exist" in result.stderr
    failed = shutil.copytree(pilot_manifest.parent, tmp_path / "failed")
    manifest = json.loads((failed / "session_manifest.json").read_text())
    manifest["qc"].update(passed=False, failures=["critic_acceptance_rate = 0.2 (needs >= 0.5)"])
    (failed / "session_manifest.json").write_text(json.dumps(manifest))
    code, out = scale(failed / "session_manifest.json", tmp_path / "d.jsonl")
    assert code == 3 and "did not pass its gate" in out and "critic_acceptance_rate" in out
    edited = shutil.copytree(pilot_manifest.parent, tmp_path / "edited")
    manifest = json.loads((edited / "session_manifest.json").read_text())
    manifest["outputs"]["data"]["path"] = str(edited / "sft_data.jsonl")
    (edited / "session_manifest.json").write_text(json.dumps(manifest))
    code, out = scale(edited / "session_manifest.json", tmp_path / "d.jsonl", "--merge")
    assert code == 3 and "cannot merge: shard(s) not complete: 0 (absent), 1 (absent)" in out  # gate passed; no shards yet
    with (edited / "sft_data.jsonl").open("a") as handle:
        handle.write(json.dumps({"id": "x", "instruction": "planted", "response": "planted"}) + "\n")
    code, out = scale(edited / "session_manifest.json", tmp_path / "d.jsonl")
    assert code == 3 and "changed since" in out
    assert not list(tmp_path.glob("d_shards/shard_*"))


# -- running, resuming, skipping, merging ----------------------------------------------------------
def test_partial_run_then_resume_after_kill_end_to_end(scale_run):
    code, out = scale_run["first"]
    assert code == 0 and "1 of 2 shards complete" in out and not scale_run["merged_after_first"]
    assert scale_run["first_manifest"]["shard"]["seed"] == 42000 and scale_run["first_manifest"]["resumed"] is False
    code, out = scale_run["second"]
    assert code == 0, out
    assert "shard 0: resuming" in out and "shard 1: starting" in out and "merged 2 shards" in out
    for index, folder in enumerate(scale_run["shards"]):
        manifest = json.loads((folder / "shard_manifest.json").read_text())
        assert manifest["resumed"] is (index == 0) and manifest["shard"]["seed"] == 42000 + index
        assert manifest["outputs"]["data"]["sha256"] == _sha(folder / "sft_data.jsonl")
        judged_ids = [r["id"] for r in _lines(folder / "phase4_judged.jsonl")]
        assert len(judged_ids) == len(set(judged_ids)) and all(i.startswith(f"s{index:03d}-") for i in judged_ids)
        records = _lines(folder / "sft_data.jsonl")
        assert len(records) == 2 and all(r["seed"] == 42000 + index for r in records)
    merged = _lines(scale_run["output"])
    assert len(merged) == len({r["id"] for r in merged}) and [r["id"] for r in merged] == sorted(r["id"] for r in merged)


def test_complete_shards_are_skipped_without_loading_a_model(scale_run, monkeypatch):
    from utils.clean_model_loader import CleanModelLoader

    def refuse(self):
        raise AssertionError("a complete shard must not load the model")

    monkeypatch.setattr(CleanModelLoader, "load", refuse)
    before = [(f / "shard_manifest.json").read_bytes() for f in scale_run["shards"]]
    code, out = scale(scale_run["pilot"], scale_run["output"], *OVERRIDE_FLAGS, "--no-merge")
    assert code == 0 and out.count("complete, skipped") == 2
    assert [(f / "shard_manifest.json").read_bytes() for f in scale_run["shards"]] == before


def test_merge_is_deterministic_and_passes_the_training_gate(scale_run):
    from utils.provenance_helper import find_dataset_manifest, require_upstream_manifest

    output = scale_run["output"]
    first = output.read_bytes()
    for _ in range(2):
        assert scale(scale_run["pilot"], output, *OVERRIDE_FLAGS, "--merge")[0] == 0
        assert output.read_bytes() == first
    manifest_path = find_dataset_manifest(output)
    assert manifest_path == output.with_name("data.manifest.json")
    manifest = require_upstream_manifest(manifest_path, "train", expected_data=output)
    assert manifest["stage"] == "scale" and manifest["records"] == len(_lines(output))
    assert manifest["inputs"]["pilot_manifest"]["sha256"] == _sha(scale_run["pilot"])
    assert [s["manifest_sha256"] for s in manifest["shards"]] == [_sha(f / "shard_manifest.json") for f in scale_run["shards"]]
    assert [s["seed"] for s in manifest["shards"]] == [42000, 42001] and manifest["base_seed"] == 42
    judged = sum(len(_lines(f / "phase4_judged.jsonl")) for f in scale_run["shards"])
    assert manifest["qc"]["counts"]["judged"] == judged - len(manifest["dedup"]["removed"])


def test_overrides_recorded_everywhere_and_enforced(scale_run):
    manifests = [json.loads((f / "shard_manifest.json").read_text()) for f in scale_run["shards"]]
    manifests.append(json.loads(scale_run["output"].with_name("data.manifest.json").read_text()))
    for manifest in manifests:
        assert manifest["overrides"] == OVERRIDES
        assert manifest["config"]["response"]["temperature"] == 0.25 and manifest["config"]["qc_thresholds"]["median_response_tokens_max"] == 45
        assert manifest["config"]["instruction"]["temperature"] == 0.7  # the rest comes from the pilot
    assert all(r["generation"]["response"]["temperature"] == 0.25 for r in _lines(scale_run["output"]))
    # Shards were made with the overrides: both refusals name each differing field with both values.
    differences = "config.qc_thresholds.median_response_tokens_max: 45 -> 40; config.response.temperature: 0.25 -> 0.3"
    code, out = scale(scale_run["pilot"], scale_run["output"], "--merge")
    assert code == 3 and f"different configuration (differs in: {differences})" in out
    code, out = scale(scale_run["pilot"], scale_run["output"], "--no-merge")
    assert code == 2 and f"different configuration (differs in: {differences})" in out
    pilot = json.loads(scale_run["pilot"].read_text())
    assert all(m["calibration"] == pilot["calibration"] and m["calibration"]["name"] == "source" for m in manifests)


def _temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp." in p.name]


@pytest.mark.parametrize("where", ["existing folder", "below a file"])
def test_a_bad_output_path_is_refused_before_any_shard_runs(pilot_manifest, tmp_path, where):
    if where == "existing folder":
        output = tmp_path / "data.jsonl"
        output.mkdir()
    else:
        (tmp_path / "notes.txt").write_text("a file, not a folder\n")
        output = tmp_path / "notes.txt" / "data.jsonl"
    code, out = scale(pilot_manifest, output)
    assert code == 2 and f"--output {output}" in out, out
    assert "[scale] shard" not in out  # refused before the first shard, not at the merge after the last
    assert not (tmp_path / "data_shards").exists() and not _temp_files(tmp_path)


def test_pilot_manifest_values_out_of_range_are_refused_naming_the_field(pilot_manifest, tmp_path):
    edited = shutil.copytree(pilot_manifest.parent, tmp_path / "pilot")
    manifest = json.loads((edited / "session_manifest.json").read_text())
    manifest["config"]["response"]["top_p"] = 2.0
    manifest["outputs"]["data"]["path"] = str(edited / "sft_data.jsonl")
    manifest["outputs"]["judged"]["path"] = str(edited / "phase4_judged.jsonl")
    (edited / "session_manifest.json").write_text(json.dumps(manifest))
    code, out = scale(edited / "session_manifest.json", tmp_path / "d.jsonl")
    assert code == 2 and f"{edited / 'session_manifest.json'}: config: response.top_p: got 2.0, expected a number in (0, 1]" in out
    assert not (tmp_path / "d_shards").exists()


def test_cross_shard_duplicates_removed_and_qc_recomputed(scale_run, tmp_path):
    from utils.jsonl_io import write_jsonl_atomic

    copy = shutil.copytree(scale_run["output"].parent / "data_shards", tmp_path / "data_shards")
    first = _lines(copy / "shard_000" / "sft_data.jsonl")
    shard1 = copy / "shard_001"
    records = _lines(shard1 / "sft_data.jsonl")
    # A constrained pair is deduplicated by its task (the instruction before the constraint texts).
    task = lambda record: record.get("original_instruction") or record["instruction"]  # noqa: E731
    planted = {records[0]["id"]: task(first[0]), records[1]["id"]: task(first[1]).rstrip(".") + " today."}

    def plant(row):
        if row["id"] not in planted:
            return row
        changed = {**row, "instruction": planted[row["id"]]}
        if row.get("original_instruction"):
            changed["original_instruction"] = planted[row["id"]]
        return changed

    for name in ("sft_data.jsonl", "phase4_judged.jsonl"):
        write_jsonl_atomic(shard1 / name, [plant(r) for r in _lines(shard1 / name)])
    manifest = json.loads((shard1 / "shard_manifest.json").read_text())
    for role, name in (("data", "sft_data.jsonl"), ("judged", "phase4_judged.jsonl")):
        manifest["outputs"][role]["sha256"] = _sha(shard1 / name)
    (shard1 / "shard_manifest.json").write_text(json.dumps(manifest))
    output = tmp_path / "data.jsonl"
    code, out = scale(scale_run["pilot"], output, *OVERRIDE_FLAGS, "--merge")
    assert code in (0, 4), out
    merged = json.loads(output.with_name("data.manifest.json").read_text())
    removed = {r["id"]: r for r in merged["dedup"]["removed"]}
    exact_id, near_id = list(planted)
    assert removed[exact_id]["kind"] == "exact" and removed[exact_id]["duplicate_of"] == first[0]["id"]
    assert removed[near_id]["kind"] == "near" and removed[near_id]["shard"] == 1
    assert merged["dedup"]["exact_removed"] + merged["dedup"]["near_removed"] == len(removed)
    ids = [r["id"] for r in _lines(output)]
    assert exact_id not in ids and near_id not in ids and len(ids) == 4 - len(removed)
    assert "shortfall" in merged["qc"]
    judged = sum(len(_lines(copy / s / "phase4_judged.jsonl")) for s in ("shard_000", "shard_001"))
    assert merged["qc"]["counts"]["judged"] == judged - len(removed)
    assert merged["qc"]["counts"]["cross_shard_exact_duplicates"] == merged["dedup"]["exact_removed"]


def test_merge_checks_a_constrained_pairs_task_against_the_test_set_and_dedups_by_it():
    from utils.dedup import OverlapIndex
    from utils.sharding import merge_records

    constrained = {"id": "s000-a", "instruction": "Name three primary colors. Use at most 20 words. Write in lowercase only.",
                   "original_instruction": "Name three primary colors."}
    same_task = {"id": "s001-a", "instruction": "Name three primary colors. End your answer with a question mark.",
                 "original_instruction": "Name three primary colors."}
    kept, removed = merge_records([[constrained], [same_task]], 0.7)
    assert [r["id"] for r in kept] == ["s000-a"] and removed[0]["kind"] == "exact" and removed[0]["duplicate_of"] == "s000-a"
    held_out = OverlapIndex([{"id": "t9", "instruction": "name three primary colors"}])
    kept, removed = merge_records([[constrained]], 0.7, held_out=held_out)
    assert kept == [] and removed == [{"id": "s000-a", "shard": 0, "kind": "held_out_overlap", "test_id": "t9", "match": "exact"}]


def test_shards_use_the_pilots_critic_signals_and_constrained_records_pass_their_checkers(scale_run):
    from utils.constraint_data import recheck

    pilot = json.loads(scale_run["pilot"].read_text())
    merged = json.loads(scale_run["output"].with_name("data.manifest.json").read_text())
    for folder in scale_run["shards"]:
        shard = json.loads((folder / "shard_manifest.json").read_text())
        assert not (folder / "probe.json").exists()  # a shard never measures its own
        assert shard["critic_signals"]["trusted"] == pilot["critic_signals"]["trusted"]
        assert shard["critic_signals"]["source"] == f"pilot manifest {scale_run['pilot']}"
        judged = _lines(folder / "phase4_judged.jsonl")
        assert all(r["selection"]["trusted_signals"] == pilot["critic_signals"]["trusted"] for r in judged)
    assert merged["critic_signals"]["trusted"] == pilot["critic_signals"]["trusted"]
    assert merged["constraint_catalogue_version"] == "constraints_v2"
    records = _lines(scale_run["output"])
    constrained = [r for r in records if r["constraints"]]
    assert merged["qc"]["constraints"]["constrained"] == len(constrained)
    assert merged["qc"]["rates"]["checker_pass_rate"]["passed"]
    for record in constrained:
        assert all(c["passed"] for c in recheck(record["constraints"], record["response"]))


def test_a_constrained_record_edited_to_fail_its_checker_fails_the_merged_gate(scale_run, tmp_path):
    import random

    from utils.constraints import sample_constraint, to_record
    from utils.jsonl_io import write_jsonl_atomic

    copy = shutil.copytree(scale_run["output"].parent / "data_shards", tmp_path / "data_shards")
    shard0 = copy / "shard_000"
    rows = _lines(shard0 / "sft_data.jsonl")
    upper = to_record(sample_constraint("uppercase", random.Random(0)))
    rows[0] = {**rows[0], "constraints": [upper], "response": "not upper at all"}
    write_jsonl_atomic(shard0 / "sft_data.jsonl", rows)
    manifest = json.loads((shard0 / "shard_manifest.json").read_text())
    manifest["outputs"]["data"]["sha256"] = _sha(shard0 / "sft_data.jsonl")
    (shard0 / "shard_manifest.json").write_text(json.dumps(manifest))
    code, out = scale(scale_run["pilot"], tmp_path / "data.jsonl", *OVERRIDE_FLAGS, "--merge")
    assert code == 4 and "checker_pass_rate" in out, out
    merged = json.loads((tmp_path / "data.manifest.json").read_text())
    assert rows[0]["id"] in merged["qc"]["constraints"]["failed_ids"]


def test_merge_refuses_shards_made_with_another_critic_verdict(scale_run, tmp_path):
    copy = shutil.copytree(scale_run["output"].parent / "data_shards", tmp_path / "data_shards")
    manifest = json.loads((copy / "shard_001" / "shard_manifest.json").read_text())
    manifest["critic_signals"]["trusted"] = ["mystery"]
    (copy / "shard_001" / "shard_manifest.json").write_text(json.dumps(manifest))
    code, out = scale(scale_run["pilot"], tmp_path / "data.jsonl", *OVERRIDE_FLAGS, "--merge")
    assert code == 3 and "shard 1 was made trusting ['mystery']" in out


def test_scale_refuses_a_pilot_manifest_without_a_critic_verdict(pilot_manifest, tmp_path):
    edited = shutil.copytree(pilot_manifest.parent, tmp_path / "pilot")
    manifest = json.loads((edited / "session_manifest.json").read_text())
    del manifest["critic_signals"]
    manifest["outputs"]["data"]["path"] = str(edited / "sft_data.jsonl")
    (edited / "session_manifest.json").write_text(json.dumps(manifest))
    code, out = scale(edited / "session_manifest.json", tmp_path / "d.jsonl")
    assert code == 3 and "no usable critic signal verdict" in out and not (tmp_path / "d_shards").exists()


def test_a_test_set_overlapping_a_demonstration_is_refused_before_any_shard(pilot_manifest, tmp_path):
    from utils.completion_prompts import RESPONSE_DEMONSTRATIONS

    test_set = tmp_path / "test.jsonl"
    test_set.write_text(json.dumps({"id": "t1", "instruction": RESPONSE_DEMONSTRATIONS[3][0]}) + "\n")
    code, out = scale(pilot_manifest, tmp_path / "d.jsonl", "--exclude-test-set", test_set)
    assert code == 2 and "overlap the response_v4 demonstrations" in out and "demonstration 4" in out and "'t1' (exact)" in out
    assert not (tmp_path / "d_shards").exists()
    # The bare template puts no demonstration in any prompt: the same test set is fine then.
    code, out = scale(pilot_manifest, tmp_path / "d.jsonl", "--exclude-test-set", test_set, "--response-template", "response_v2",
                      "--no-merge", "--shard-index", "0", "--max-rounds", "1")
    assert code == 0 and "demonstrations" not in out and "shard 0: starting" in out


def test_merge_drops_pairs_overlapping_the_held_out_test_set(scale_run, tmp_path):
    from utils.dedup import OverlapIndex
    from utils.sharding import merge_records

    shards = [[{"id": "s000-a", "instruction": "How many hours are in a day?"},
               {"id": "s000-b", "instruction": "Write a short poem about the sea at night in winter please."}],
              [{"id": "s001-a", "instruction": "Give a tip about bread."}]]
    held_out = OverlapIndex([{"id": "t1", "instruction": "how many hours are in a day"},
                             {"id": "t2", "instruction": "Please write a short poem about the sea at night in winter."}])
    kept, removed = merge_records(shards, 0.7, held_out=held_out)
    assert [r["id"] for r in kept] == ["s001-a"]
    assert removed == [{"id": "s000-a", "shard": 0, "kind": "held_out_overlap", "test_id": "t1", "match": "exact"},
                       {"id": "s000-b", "shard": 0, "kind": "held_out_overlap", "test_id": "t2", "match": "near"}]

    # End to end: a test set holding one merged instruction removes exactly that pair, and the manifest says so.
    output = scale_run["output"]
    victim = _lines(output)[0]
    test_set = tmp_path / "test.jsonl"
    test_set.write_text(json.dumps({"id": "held-1", "instruction": victim["instruction"].upper()}) + "\n")
    decontaminated = tmp_path / "data.jsonl"
    shutil.copytree(output.parent / "data_shards", tmp_path / "data_shards")
    code, out = scale(scale_run["pilot"], decontaminated, *OVERRIDE_FLAGS, "--merge", "--exclude-test-set", test_set)
    assert code in (0, 4), out
    manifest = json.loads(decontaminated.with_name("data.manifest.json").read_text())
    assert manifest["dedup"]["held_out_overlaps_removed"] == 1
    assert manifest["inputs"]["excluded_test_set"]["sha256"] == _sha(test_set)
    assert victim["id"] not in {r["id"] for r in _lines(decontaminated)}


def test_edited_shard_data_is_rederived(scale_run, tmp_path):
    copy = shutil.copytree(scale_run["output"].parent / "data_shards", tmp_path / "data_shards")
    original = (copy / "shard_001" / "sft_data.jsonl").read_bytes()
    (copy / "shard_001" / "sft_data.jsonl").write_bytes(original + b'{"id": "x", "instruction": "i", "response": "r"}\n')
    code, out = scale(scale_run["pilot"], tmp_path / "data.jsonl", *OVERRIDE_FLAGS, "--no-merge")
    assert code == 0 and "shard 1: files changed" in out and "shard 0: complete, skipped" in out
    assert (copy / "shard_001" / "sft_data.jsonl").read_bytes() == original  # re-derived from the phase files



def test_merge_refuses_shards_from_different_models(scale_run, tmp_path):
    copy = shutil.copytree(scale_run["output"].parent / "data_shards", tmp_path / "data_shards")
    manifest = json.loads((copy / "shard_001" / "shard_manifest.json").read_text())
    manifest["model_provenance"]["weights_fingerprint"] = "0" * 64
    (copy / "shard_001" / "shard_manifest.json").write_text(json.dumps(manifest))
    code, out = scale(scale_run["pilot"], tmp_path / "data.jsonl", *OVERRIDE_FLAGS, "--merge")
    assert code == 3 and "different model" in out and not (tmp_path / "data.jsonl").exists()

# -- torchrun ---------------------------------------------------------------------------------------
def test_torchrun_two_cpu_ranks_split_shards_and_merge_once(pilot_manifest, tmp_path):
    from utils.provenance_helper import require_upstream_manifest

    output = tmp_path / "data.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(SCALE),
                             "--pilot-manifest", str(pilot_manifest), "--output", str(output), "--count", "4", "--num-shards", "3",
                             "--batch-size", "8", "--no-progress"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((tmp_path / "data_shards" / f"shard_{i:03d}" / "shard_manifest.json").read_text())["rank"] for i in range(3)]
    assert [(r["rank"], r["world_size"], r["launched"]) for r in ranks] == [(0, 2, True), (1, 2, True), (0, 2, True)]
    assert [(r["local_world_size"], r["gpu_memory_fraction"]) for r in ranks] == [(2, None)] * 3  # CPU ranks: no GPU to share
    assert result.stdout.count("[scale] merged 3 shards") == 1 and "rank 1: my shards are done" in result.stdout
    manifest = require_upstream_manifest(output.with_name("data.manifest.json"), "train", expected_data=output)
    assert [s["count"] for s in manifest["shards"]] == [2, 1, 1] and manifest["overrides"] == {}


def test_merge_keeps_variants_with_their_pair_and_counts_pairs():
    from utils.sharding import merge_records

    shards = [[{"id": "s000-a~v1", "instruction": "Describe rain in one sentence. Use all capitals.",
                "original_instruction": "Describe rain in one sentence."},
               {"id": "s000-a", "instruction": "Describe rain in one sentence."},
               {"id": "s000-b", "instruction": "Give a tip about bread."}],
              [{"id": "s001-a", "instruction": "describe RAIN in one sentence"},
               {"id": "s001-a~v1", "instruction": "describe RAIN in one sentence. End with a question mark.",
                "original_instruction": "describe RAIN in one sentence"},
               {"id": "s001-c", "instruction": "Name three facts about the moon."}]]
    kept, removed = merge_records(shards, 0.7)
    # the variant is not a duplicate of its own pair; that of a removed pair goes with it
    assert [r["id"] for r in kept] == ["s000-a", "s000-a~v1", "s000-b", "s001-c"]
    assert [(r["id"], r["kind"]) for r in removed] == [("s001-a", "exact"), ("s001-a~v1", "variant_of_removed")]
    assert [r["id"] for r in merge_records(shards, 0.7, count=1)[0]] == ["s000-a", "s000-a~v1"]


def test_constraint_variants_end_to_end(pilot_manifest, tmp_path):
    from utils.constraint_data import recheck
    from utils.records import base_pair_id

    output = tmp_path / "data.jsonl"
    code, out = scale(pilot_manifest, output, "--constraint-variants", "2")
    assert code == 0, out
    records = _lines(output)
    manifest = json.loads(output.with_name("data.manifest.json").read_text())
    pairs = [r for r in records if base_pair_id(r["id"]) == r["id"]]
    variants = [r for r in records if base_pair_id(r["id"]) != r["id"]]
    # --count counts pairs, not variants: 4 asked, less the pairs the merge removed as duplicates across shards.
    dedup = manifest["dedup"]
    removed_pairs = dedup["exact_removed"] + dedup["near_removed"] + dedup["held_out_overlaps_removed"]
    assert manifest["pairs"] == len(pairs) == 4 - removed_pairs >= 2 and manifest["records"] == len(records)
    removed = {r["id"] for r in dedup["removed"] if r["kind"] != "variant_of_removed"}
    assert {r["duplicate_of"] for r in dedup["removed"] if r["kind"] == "variant_of_removed"} <= removed  # variants go with their pair
    assert manifest["overrides"]["constraint_variants"] == {"from": 0, "to": 2} and variants
    assert f"{len(pairs)} pairs and {len(variants)} relabeled variants" in out
    by_id = {r["id"]: r for r in records}
    for variant in variants:
        pair = by_id[base_pair_id(variant["id"])]  # never without its pair
        assert records.index(pair) < records.index(variant)
        assert variant["original_instruction"] == (pair["original_instruction"] or pair["instruction"])
        assert variant["constraints"] and all(c["passed"] for c in recheck(variant["constraints"], variant["response"]))
    assert manifest["qc"]["constraints"]["constrained"] == sum(bool(r["constraints"]) for r in records)
    # phase 5 relabels every accepted pair of a shard, also those past the count the merge keeps
    assert manifest["qc"]["counts"]["constraint_variants"] >= len(variants)
