"""Data-parallel Stage 1 training on the CPU (gloo): two ranks under torchrun train one adapter that only
rank 0 writes, the effective-batch rule, one verdict for every rank (same exit code, no rank left
waiting), a stop on one rank stopping both, and resume across world sizes.

Ranks are real processes: torchrun (`python -m torch.distributed.run`) where the launcher is the
point, and two plain processes with the variables torchrun sets (RANK, WORLD_SIZE, MASTER_ADDR, ...)
where each rank's own exit code must be seen: torchrun reports any failing rank as its own exit 1.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from test_train_sft import run_main, write_dataset

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_stage1_sft.py"
# LoRA dropout 0: no per-rank random masks, so one process and two ranks compute the same steps
FAST = ["--quantization", "none", "--logging-steps", "1", "--per-device-batch-size", "1", "--val-fraction", "0.2", "--lr", "1e-2",
        "--lora-dropout", "0"]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU",
               "ACCELERATE_USE_FSDP")

# Installed in rank 1 (and, to show that the detector sees writes, rank 0) through PYTHONPATH: an
# audit hook logs every file opened for writing, renamed, removed or made under AUDIT_ROOT.
# C-level writers (safetensors, torch.save to a path) raise no audit event, but each of them writes
# beside a Python-level write (adapter_config.json, trainer_state.json) or makes its folder first.
AUDIT_SITECUSTOMIZE = '''
import os, sys
if os.environ.get("AUDIT_LOG"):
    _root = os.path.realpath(os.environ["AUDIT_ROOT"])
    _log = open(os.environ["AUDIT_LOG"] + ".rank" + os.environ.get("RANK", "-"), "a", buffering=1)
    _log.write("hook\\tinstalled\\n")
    _WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    def _hook(event, args):
        paths = []
        if event == "open":
            path, mode, flags = args
            if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & _WRITE:
                paths = [path]
        elif event in ("os.rename", "os.replace", "os.link", "os.symlink"):
            paths = list(args[:2])
        elif event in ("os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.truncate"):
            paths = [args[0]]
        for path in paths:
            if isinstance(path, (str, bytes, os.PathLike)):
                full = os.path.realpath(os.fsdecode(path))
                if full == _root or full.startswith(_root + os.sep):
                    _log.write(event + "\\t" + os.path.relpath(full, _root) + "\\n")
    sys.addaudithook(_hook)
'''


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(args, env, nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), str(SCRIPT),
                           *map(str, args)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)


def two_ranks(command: list[str], env: dict, rank_env: dict | None = None, timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """Rank 0 and rank 1 as plain processes (torchrun's variables), each exit code kept; a rank that hangs fails the test."""
    port, procs = free_port(), []
    for rank in range(2):
        launch = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                  "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, *map(str, command)], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, env={**env, **launch, **(rank_env or {}).get(rank, {})}))
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return results


# -- the effective-batch rule ------------------------------------------------------------------------
def test_effective_batch_rule_derives_grad_accum_and_names_the_numbers_that_do_not_fit():
    from utils.distributed import resolve_batch_rule
    from utils.exit_codes import BadInputError

    assert resolve_batch_rule(1, None, None, 1).as_dict()["effective_batch_size"] == 8  # the source's 1 x 8
    assert resolve_batch_rule(2, 3, None, 4).effective_batch_size == 24  # as given
    rule = resolve_batch_rule(1, None, 8, 2)
    assert (rule.grad_accum, rule.effective_batch_size, rule.as_dict()["grad_accum_from"]) == (4, 8, "--effective-batch-size")
    assert resolve_batch_rule(8, None, 8, 1).grad_accum == 1 and resolve_batch_rule(2, 2, 8, 2).grad_accum == 2
    with pytest.raises(BadInputError, match=r"--effective-batch-size 8 is not a multiple of --per-device-batch-size 3 x world size 2 = 6"):
        resolve_batch_rule(3, None, 8, 2)
    with pytest.raises(BadInputError, match=r"--grad-accum 8 contradicts --effective-batch-size 8: .* needs --grad-accum 4"):
        resolve_batch_rule(1, 8, 8, 2)


def test_parse_args_resolves_grad_accum_from_the_world_size(monkeypatch, capsys):
    import train_stage1_sft as script

    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    assert script.parse_args([]).grad_accum == 8
    assert script.parse_args(["--effective-batch-size", "8", "--per-device-batch-size", "2"]).grad_accum == 4
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert script.parse_args(["--effective-batch-size", "8"]).grad_accum == 2
    with pytest.raises(SystemExit) as exc:
        script.parse_args(["--effective-batch-size", "6"])
    assert exc.value.code == 2 and "--per-device-batch-size 1 x world size 4 = 4" in capsys.readouterr().err


# -- one verdict on every rank --------------------------------------------------------------------
AGREE_SNIPPET = """
import sys
sys.path.insert(0, {scripts!r})
from utils.distributed import training_launch
from utils.exit_codes import RefusedError, run_cli

def steps(launch):
    def step():
        if launch.rank == {failing}:
            {failure}
        return "ok"
    assert launch.agree(step, "the test step") == "ok"
    launch.same_on_every_rank({seen}, "the test value")
    print("passed both", flush=True)

launch = training_launch()
run_cli(lambda: launch.run(lambda: steps(launch)))  # as train_stage1_sft.main
"""


@pytest.mark.parametrize("case, failing, failure, seen, code, message", [
    ("refusal on rank 1", 1, "raise RefusedError('no manifest here')", "1", 3, "rank 1 of 2 failed the test step: no manifest here"),
    ("crash on rank 0", 0, "raise ValueError('a bug')", "1", 1, "rank 0 of 2 failed the test step: ValueError: a bug"),
    ("ranks see different files", -1, "pass", "launch.rank", 2, "the ranks disagree on the test value (rank 0: 0; rank 1: 1)"),
])
def test_a_step_failing_on_one_rank_fails_every_rank_with_its_exit_code(case, failing, failure, seen, code, message, tmp_path):
    snippet = tmp_path / "agree.py"
    snippet.write_text(AGREE_SNIPPET.format(scripts=str(ROOT / "scripts"), failing=failing, failure=failure, seen=seen))
    results = two_ranks([snippet], clean_env())
    assert [r.returncode for r in results] == [code, code], [r.stderr[-2000:] for r in results]
    assert not any("passed both" in r.stdout for r in results)
    others = [r for rank, r in enumerate(results) if rank != failing]
    assert all(message in r.stderr for r in others), [r.stderr[-2000:] for r in others]


def test_a_training_refusal_under_two_ranks_exits_3_on_both_and_writes_nothing(tmp_path, tiny_model_dir):
    data = write_dataset(tmp_path / "data", n=12, passed=False)
    out = tmp_path / "out"
    results = two_ranks([SCRIPT, "--data", data, "--model", tiny_model_dir, "--output", out, "--max-steps", "2", *FAST],
                        clean_env(STAGE1_CACHE_DIR=str(tmp_path / "cache")))
    assert [r.returncode for r in results] == [3, 3], [r.stderr[-2000:] for r in results]
    assert "did not pass its gate" in results[0].stderr and "rank 0 of 2 failed the checks before training" in results[1].stderr
    assert not out.exists()


# -- two ranks train one adapter -----------------------------------------------------------------
@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, tiny_model_dir):
    """torchrun, 2 CPU ranks, effective batch 4 (1 per device x 2 accumulated x 2 ranks), every write audited per rank."""
    root = tmp_path_factory.mktemp("ddp")
    data, out, hooks = write_dataset(root / "data", n=12), root / "out", root / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(AUDIT_SITECUSTOMIZE)
    env = clean_env(STAGE1_CACHE_DIR=str(root / "cache"), PYTHONPATH=str(hooks), AUDIT_LOG=str(root / "writes"), AUDIT_ROOT=str(out))
    result = torchrun(["--data", data, "--model", tiny_model_dir, "--output", out, "--max-steps", "4", "--save-steps", "2",
                       "--effective-batch-size", "4", *FAST], env)
    writes = {rank: (root / f"writes.rank{rank}").read_text().splitlines() for rank in range(2)}
    return {"result": result, "data": data, "out": out, "writes": writes, "model": tiny_model_dir}


def test_two_ranks_train_one_adapter_and_record_the_effective_batch(ddp_run):
    result, out = ddp_run["result"], ddp_run["out"]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("[train] done: 4 steps") == 1
    manifest = json.loads((out / "training_manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["effective_batch_size"] == 4
    assert manifest["batch_rule"] == {"rule": "effective_batch_size = per_device_batch_size x grad_accum x world_size",
                                      "per_device_batch_size": 1, "grad_accum": 2, "world_size": 2, "effective_batch_size": 4,
                                      "grad_accum_from": "--effective-batch-size"}
    assert manifest["launch"]["parallelism"] == "ddp" and manifest["sft_config"]["gradient_accumulation_steps"] == 2
    # DDP, not two ranks training alone: each step counts the tokens of both ranks' examples, 4 examples a step
    assert manifest["global_step"] == 4 and [h["step"] for h in manifest["loss_history"]["train"]] == [1, 2, 3, 4]
    assert manifest["train_tokens"] > 0 and manifest["final_eval_loss"] is not None
    assert sorted(p.name for p in (out / "checkpoints" / "checkpoint-4").glob("rng_state*")) == ["rng_state_0.pth", "rng_state_1.pth"]
    identity = json.loads((out / "run_identity.json").read_text())
    assert identity["hyperparameters"]["effective_batch_size"] == 4 and "grad_accum" not in identity["hyperparameters"]


def test_only_rank_0_writes_the_outputs(ddp_run):
    assert ddp_run["result"].returncode == 0
    rank0, rank1 = ddp_run["writes"][0], ddp_run["writes"][1]
    assert rank0[0] == rank1[0] == "hook\tinstalled"
    written0 = {line.split("\t")[1] for line in rank0[1:]}
    assert {"run_identity.json", "training_manifest.json", "loss_curve.png", "final_adapter/TRAINING_SUCCESS",
            "final_adapter/adapter_config.json"} <= written0  # the detector sees rank 0's writes
    # rank 1 only makes the checkpoint folder it puts its RNG state in (the Trainer's per-rank file)
    assert all(line.split("\t")[0] == "os.mkdir" and line.split("\t")[1].startswith("checkpoints/checkpoint-") for line in rank1[1:]), rank1


def test_the_two_rank_adapter_loads_back_and_its_marker_verifies(ddp_run):
    import torch

    from test_train_sft import load_tiny
    from utils.prompt_guards import encode_prompt
    from utils.sft_training import MARKER_NAME, load_adapter, verify_adapter_files

    assert ddp_run["result"].returncode == 0
    adapter = ddp_run["out"] / "final_adapter"
    marker = json.loads((adapter / MARKER_NAME).read_text())
    verify_adapter_files(adapter, marker["adapter_files_sha256"])
    assert marker["world_size"] == 2 and marker["effective_batch_size"] == 4
    model, tokenizer, _ = load_tiny(ddp_run["model"])
    ids = torch.tensor([encode_prompt(tokenizer, "List three colors.")])
    with torch.no_grad():
        base = model(ids).logits.clone()
        tuned = load_adapter(model, adapter)
        tuned.eval()
        assert (tuned(ids).logits - base).abs().max() > 1e-4


def test_one_process_with_the_same_effective_batch_takes_the_same_steps(ddp_run, tmp_path):
    """1 per device x 4 accumulated on one process against 1 x 2 x 2 ranks: each optimizer step covers the same
    examples of the seeded order, and the loss is averaged over all their tokens, so the losses agree."""
    assert ddp_run["result"].returncode == 0
    out = tmp_path / "out"
    assert run_main(["--data", ddp_run["data"], "--model", ddp_run["model"], "--output", out, "--max-steps", "4", "--save-steps", "2",
                     "--effective-batch-size", "4", *FAST]) == 0
    one, two = (json.loads((folder / "training_manifest.json").read_text()) for folder in (out, ddp_run["out"]))
    assert (one["world_size"], one["batch_rule"]["grad_accum"]) == (1, 4)
    assert one["train_tokens"] == two["train_tokens"]
    assert [h["loss"] for h in one["loss_history"]["train"]] == pytest.approx([h["loss"] for h in two["loss_history"]["train"]], rel=1e-4)


def test_accelerate_launch_with_the_ddp_config_trains_the_same_adapter_as_torchrun(ddp_run, tmp_path):
    """configs/accelerate/ddp.yaml as shipped (a GPU config; on this CPU the ranks fall back to gloo): the same
    flags and seeds give the same adapter, byte for byte, as the torchrun run."""
    assert ddp_run["result"].returncode == 0
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", ROOT / "configs" / "accelerate" / "ddp.yaml",
                             "--main_process_port", str(free_port()), SCRIPT, "--data", ddp_run["data"], "--model", ddp_run["model"],
                             "--output", out, "--max-steps", "4", "--save-steps", "2", "--effective-batch-size", "4", *FAST],
                            capture_output=True, text=True, cwd=ROOT, env=clean_env(STAGE1_CACHE_DIR=str(tmp_path / "cache")), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    manifest = json.loads((out / "training_manifest.json").read_text())
    assert (manifest["world_size"], manifest["effective_batch_size"], manifest["launch"]["parallelism"]) == (2, 4, "ddp")
    adapter = "final_adapter/adapter_model.safetensors"
    assert (out / adapter).read_bytes() == (ddp_run["out"] / adapter).read_bytes()


def test_a_two_rank_checkpoint_resumes_on_one_process_with_the_same_effective_batch(ddp_run, tmp_path, capsys):
    """Killed after checkpoint-2 (simulated by removing what came later): the same effective batch on
    another world size resumes; another effective batch is refused (exit 2)."""
    import shutil

    assert ddp_run["result"].returncode == 0
    out = tmp_path / "out"
    shutil.copytree(ddp_run["out"], out)
    shutil.rmtree(out / "checkpoints" / "checkpoint-4")
    shutil.rmtree(out / "final_adapter")
    argv = ["--data", ddp_run["data"], "--model", ddp_run["model"], "--output", out, "--save-steps", "2", "--max-steps", "4", *FAST,
            "--resume"]
    assert run_main([*argv, "--effective-batch-size", "2"]) == 2
    assert "--effective-batch-size: recorded 4, now 2" in capsys.readouterr().err
    assert run_main([*argv, "--effective-batch-size", "4"]) == 0, capsys.readouterr().err
    manifest = json.loads((out / "training_manifest.json").read_text())
    assert manifest["resumed_from"].endswith("checkpoint-2") and manifest["global_step"] == 4
    assert (manifest["world_size"], manifest["batch_rule"]["grad_accum"], manifest["effective_batch_size"]) == (1, 4, 4)


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_both_at_one_checkpoint_and_both_resume(tmp_path, tiny_model_dir):
    """SIGTERM reaches rank 1 only (its test hook): both ranks save checkpoint-1 and exit 143; the rerun
    with --resume continues from it on both ranks."""
    data, out = write_dataset(tmp_path / "data", n=12), tmp_path / "out"
    env = clean_env(STAGE1_CACHE_DIR=str(tmp_path / "cache"))
    command = [SCRIPT, "--data", data, "--model", tiny_model_dir, "--output", out, "--max-steps", "3", "--save-steps", "100",
               "--effective-batch-size", "4", *FAST, "--resume"]
    stopped = two_ranks(command, env, rank_env={1: {"STAGE1_TEST_SIGTERM_AT_STEP": "1"}})
    assert [r.returncode for r in stopped] == [143, 143], [r.stderr[-2000:] for r in stopped]
    assert "another rank was asked to stop" in stopped[0].stderr
    assert [p.name for p in (out / "checkpoints").glob("checkpoint-*")] == ["checkpoint-1"]
    resumed = two_ranks(command, env)
    assert [r.returncode for r in resumed] == [0, 0], [r.stderr[-2000:] for r in resumed]
    manifest = json.loads((out / "training_manifest.json").read_text())
    assert manifest["resumed_from"].endswith("checkpoint-1") and manifest["global_step"] == 3 and manifest["world_size"] == 2


# -- FSDP's loader setting (the FSDP run itself needs CUDA: accelerate refuses FSDP on a CPU) -------------
def test_quant_storage_packs_the_4bit_weights_in_bf16_with_the_same_outputs(tiny_model_dir):
    import torch

    from utils.clean_model_loader import CleanModelLoader
    from utils.exit_codes import BadInputError

    packed, _, provenance = CleanModelLoader(str(tiny_model_dir), load_in_4bit=True, quant_storage="bfloat16", run_sentinels=False).load()
    plain, _, _ = CleanModelLoader(str(tiny_model_dir), load_in_4bit=True, run_sentinels=False).load()
    weight = packed.model.layers[0].self_attn.q_proj.weight
    assert type(weight).__name__ == "Params4bit" and weight.dtype == torch.bfloat16  # floating point: FSDP can shard it
    assert plain.model.layers[0].self_attn.q_proj.weight.dtype == torch.uint8 and provenance["quant_storage"] == "bfloat16"
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(packed(ids).logits, plain(ids).logits)
    with pytest.raises(BadInputError, match="needs load_in_4bit"):
        CleanModelLoader(str(tiny_model_dir), quant_storage="bfloat16")


def test_an_fsdp_launch_is_recognised_from_accelerates_variable():
    from utils.distributed import training_launch

    launch = training_launch({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "ACCELERATE_USE_FSDP": "true"})
    assert (launch.fsdp, launch.parallelism, launch.is_main, launch.distributed) == (True, "fsdp", False, True)
    assert training_launch({"RANK": "0", "WORLD_SIZE": "2"}).parallelism == "ddp" and training_launch({}).parallelism == "single process"
