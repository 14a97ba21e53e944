"""The scale stage's rank split across "nodes" and after a killed rank, on the CPU.

Two nodes are simulated by two torchrun launches on this machine (`--nnodes 2 --node-rank 0/1
--nproc-per-node 1`) that meet through a c10d rendezvous on localhost: each launch holds one rank,
as on a cluster. The scale stage needs no process group for that (its ranks share nothing but
files: rank 0 waits for the other ranks' shard manifests, then merges), so the rendezvous only
hands out RANK and WORLD_SIZE; across real nodes the output must be on a filesystem both see.

Both tests compare with the merge of the same shards made by one process (same seeds), byte for
byte. `pilot_manifest` (test_scale.py's, imported so pytest shares its definition by name here) runs
the pilot once per module that uses it; like every test that needs it, these are slow.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import read_jsonl_lines
from test_scale import pilot_manifest  # noqa: F401 - the fixture, by name

ROOT = Path(__file__).resolve().parents[1]
SCALE = ROOT / "scripts" / "generate_stage1_scale_data.py"
# --batch-size 1: many small generation batches, so a killed rank stops part-way through a phase
FLAGS = ["--count", "8", "--num-shards", "2", "--batch-size", "1", "--no-progress"]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def env(tmp: Path) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    return {**clean, "OMP_NUM_THREADS": "1", "STAGE1_CACHE_DIR": str(tmp / "cache")}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scale_command(pilot, output) -> list[str]:
    return [str(SCALE), "--pilot-manifest", str(pilot), "--output", str(output), *FLAGS]


@pytest.fixture(scope="module")
def one_process_merge(pilot_manifest, tmp_path_factory):  # noqa: F811 - the imported fixture
    root = tmp_path_factory.mktemp("one_process")
    result = subprocess.run([sys.executable, *scale_command(pilot_manifest, root / "data.jsonl")], capture_output=True, text=True,
                            cwd=ROOT, env=env(root), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return (root / "data.jsonl").read_bytes()


def test_two_nodes_through_a_c10d_rendezvous_split_the_shards_and_merge_like_one_process(pilot_manifest, one_process_merge,  # noqa: F811
                                                                                       tmp_path):
    output, port = tmp_path / "data.jsonl", free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
                               "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}",
                               "--rdzv-id", "multinode-test", *scale_command(pilot_manifest, output)],
                              cwd=ROOT, env=env(tmp_path), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for node in (0, 1)]
    try:
        logs = [node.communicate(timeout=600)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    assert [node.returncode for node in nodes] == [0, 0], [log[-3000:] for log in logs]
    both = "".join(logs)
    assert both.count("[scale] merged 2 shards") == 1 and both.count("rank 1: my shards are done; rank 0 merges") == 1
    launches = [json.loads((output.parent / "data_shards" / f"shard_{i:03d}" / "shard_manifest.json").read_text())["rank"]
                for i in range(2)]
    assert sorted((r["rank"], r["world_size"], r["launched"]) for r in launches) == [(0, 2, True), (1, 2, True)]
    assert output.read_bytes() == one_process_merge


def _rank_1_pid(launcher_pid: int) -> int | None:
    import psutil

    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == "1":
                return child.pid
        except psutil.Error:
            continue
    return None


def test_a_rank_killed_mid_shard_resumes_on_rerun_with_no_record_lost_or_repeated(pilot_manifest, one_process_merge, tmp_path):  # noqa: F811
    output = tmp_path / "data.jsonl"
    shard1 = tmp_path / "data_shards" / "shard_001"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *scale_command(pilot_manifest, output)]
    first = subprocess.Popen(torchrun, cwd=ROOT, env=env(tmp_path), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    killed_at, deadline = None, time.time() + 600
    try:
        while first.poll() is None and killed_at is None and time.time() < deadline:
            responses = shard1 / "phase3_responses.jsonl"
            if responses.exists() and responses.read_bytes().count(b"\n") >= 1:  # rank 1 is answering its instructions
                pid = _rank_1_pid(first.pid)
                if pid is not None:
                    killed_at = {"manifest": (shard1 / "shard_manifest.json").exists(), "data": (shard1 / "sft_data.jsonl").exists()}
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)
        log = first.communicate(timeout=600)[0]
    finally:
        if first.poll() is None:
            first.kill()
    assert killed_at == {"manifest": False, "data": False}, f"rank 1 was not killed mid-shard: {killed_at}\n{log[-3000:]}"
    assert first.returncode != 0 and "SIGKILL" in log  # torchrun tears the job down
    assert not output.exists()

    rerun = subprocess.run(torchrun, cwd=ROOT, env=env(tmp_path), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "shard 1: resuming" in rerun.stdout and rerun.stdout.count("[scale] merged 2 shards") == 1
    for index in range(2):
        folder = tmp_path / "data_shards" / f"shard_{index:03d}"
        for phase in folder.glob("phase*.jsonl"):
            ids = [record["id"] for record in read_jsonl_lines(phase)]
            assert len(ids) == len(set(ids)), f"{phase.name}: a record written twice"
        assert len(read_jsonl_lines(folder / "sft_data.jsonl")) == 4  # its whole share: nothing lost
    assert output.read_bytes() == one_process_merge
