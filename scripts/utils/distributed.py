"""Data-parallel training under torchrun / accelerate launch: rank facts, one verdict on every rank,
rank-0 writes, the effective-batch rule, and what FSDP needs.

    launch = training_launch()          # RANK / WORLD_SIZE / LOCAL_RANK from torchrun or accelerate launch; one process otherwise
    launch.run(lambda: train(launch))   # with the process group up when WORLD_SIZE > 1 (accelerate's choice: NCCL on GPUs, gloo on CPUs)
    plan = launch.agree(lambda: check(args), "to start")     # inside train: every rank runs the step; one verdict for all
    launch.same_on_every_rank(str(plan.resume_from), "the checkpoint to resume from")
    rule = resolve_batch_rule(per_device=1, grad_accum=None, effective=8, world_size=2)   # grad_accum 4

One verdict: a step that refuses on one rank (exit 2/3, or a crash, exit 1) must not leave the other
ranks waiting in the next collective until the NCCL timeout. `agree` gathers every rank's outcome
after the step; where any rank failed, every rank raises, with the exit code and message of the
lowest failing rank (that rank re-raises its own error), so all ranks exit alike and none hangs.

Rank-0 writes: only rank 0 claims the output folder and writes the run identity, manifests, plot,
adapter and marker (the Trainer itself writes each rank's `rng_state_<rank>.pth` into a checkpoint,
which a resumed run needs). Steps that write run inside `agree` with `launch.is_main`, so the other
ranks wait for them and share their outcome.

The effective batch: `per_device_batch_size x grad_accum x world_size` examples per optimizer step.
With `effective` given, grad_accum is derived as effective / (per_device x world_size), which must
divide exactly (BadInputError naming the numbers otherwise); a grad_accum given as well must match.

FSDP (`accelerate launch --config_file configs/accelerate/fsdp_qlora.yaml`, which sets
ACCELERATE_USE_FSDP=true): the 4-bit weights are stored as bfloat16 (`quant_storage`, so FSDP can
shard them; the peft/bitsandbytes FSDP-QLoRA recipe), peft's k-bit preparation is skipped (its fp32
casts would mix dtypes inside FSDP's flat parameters), and the adapter is gathered from every rank
(`adapter_state_dict`, a collective) before rank 0 saves it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import timedelta

from .exit_codes import EXIT_FAILURE, BadInputError, Stage1Error
from .sharding import Launch, launch_from_env

__all__ = ["TrainingLaunch", "RankFailedError", "BatchRule", "training_launch", "resolve_batch_rule", "sync_stop_callback",
           "adapter_state_dict", "gpu_memory_gib", "FSDP_QUANT_STORAGE", "PROCESS_GROUP_TIMEOUT_S"]

FSDP_QUANT_STORAGE = "bfloat16"  # FSDP shards floating-point tensors only; bf16 also matches the compute dtype
PROCESS_GROUP_TIMEOUT_S = 1800  # the Trainer's own ddp_timeout default: a 32B base takes minutes to load on every rank


class RankFailedError(Stage1Error):
    """Another rank failed a step this rank passed: exit with that rank's code, naming it."""

    def __init__(self, exit_code: int, message: str):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class TrainingLaunch(Launch):
    """The scale stage's rank facts (`sharding.Launch`) plus whether accelerate launched FSDP."""

    fsdp: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def parallelism(self) -> str:
        return "fsdp" if self.fsdp else "ddp" if self.distributed else "single process"

    def as_dict(self) -> dict:
        return {"rank": self.rank, "world_size": self.world_size, "local_rank": self.local_rank, "launched": self.launched,
                "parallelism": self.parallelism}

    def device(self) -> str:
        """The loader's device: this rank's GPU (`cuda:LOCAL_RANK`, so a 4-bit base lands on device_map
        {"": LOCAL_RANK}, where accelerate's DDP wrapper expects it) when launched on CUDA, else "auto"."""
        import torch

        if self.launched and torch.cuda.is_available():
            if self.local_rank >= torch.cuda.device_count():
                raise BadInputError(f"LOCAL_RANK {self.local_rank} but only {torch.cuda.device_count()} GPU(s) visible")
            return f"cuda:{self.local_rank}"
        return "auto"

    def start(self, timeout_s: int = PROCESS_GROUP_TIMEOUT_S) -> None:
        """Bring up the process group now, before the Trainer would, so the checks before training can agree.

        accelerate's PartialState picks the backend (NCCL, or NCCL+gloo for FSDP with CPU offload) and
        sets this rank's GPU; the Trainer later reuses the group. Without CUDA it needs cpu=True, and
        the Trainer reads ACCELERATE_USE_CPU for the same: without it each CPU rank trains alone.
        """
        if not self.distributed:
            return
        import torch
        from accelerate import PartialState

        cpu = not torch.cuda.is_available()
        if cpu:
            os.environ.setdefault("ACCELERATE_USE_CPU", "true")
            # accelerate's own CPU device is cpu:RANK, which torch.load(map_location=...) cannot restore to when
            # the Trainer resumes a checkpoint's optimizer state ("don't know how to restore ... cpu:0")
            os.environ.setdefault("ACCELERATE_TORCH_DEVICE", "cpu")
        PartialState(cpu=cpu, timeout=timedelta(seconds=timeout_s))

    def run(self, body: Callable):
        """`body()` with the process group up (`start`). Where every rank ends alike (a return, or an error
        `agree` raised on every rank) the group ends with a barrier, then is destroyed: without the
        barrier a rank that tears down gloo while its peer still talks to it can abort at exit (seen
        here about once in ten two-rank refusals). Any other error leaves the group to the launcher
        (torchrun stops the other ranks): a peer still inside a collective would never reach the barrier."""
        self.start()
        try:
            result = body()
        except BaseException as err:
            if getattr(err, "raised_on_every_rank", False):
                self._finish()
            raise
        self._finish()
        return result

    def _finish(self) -> None:
        import torch.distributed as dist

        if self.distributed and dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def gather(self, value) -> list:
        """Every rank's `value`, in rank order (a collective: every rank must call it)."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def agree(self, step: Callable, what: str):
        """Run `step` on this rank, then share every rank's outcome (see the module docstring)."""
        error = None
        try:
            result = step()
        except Stage1Error as err:
            result, error, mine = None, err, (err.exit_code, str(err))
        except Exception as err:  # noqa: BLE001 - a crash on one rank must not leave the others waiting
            result, error, mine = None, err, (EXIT_FAILURE, f"{type(err).__name__}: {err}")
        else:
            mine = None
        if not self.distributed:
            if error is not None:
                raise error
            return result
        failed = [(rank, outcome) for rank, outcome in enumerate(self.gather(mine)) if outcome is not None]
        if not failed:
            return result
        first, (code, message) = failed[0]
        if first != self.rank:
            if error is not None:  # this rank failed too, differently: say so, then exit like the first
                print(f"[train] rank {self.rank}: {mine[1]}", file=sys.stderr, flush=True)
            error = RankFailedError(code, f"rank {first} of {self.world_size} failed {what}: {message}")
        error.raised_on_every_rank = True  # `run` may end the group: every rank stops here
        raise error

    def same_on_every_rank(self, value, what: str) -> None:
        """BadInputError on every rank when the ranks see different `value`s (an --output that is not on a
        filesystem every node shares shows each node other checkpoints)."""
        values = self.gather(value)
        if any(v != values[0] for v in values):
            shown = "; ".join(f"rank {rank}: {v}" for rank, v in enumerate(values))
            error = BadInputError(f"the ranks disagree on {what} ({shown}); every rank must see the same --output, "
                                  "data and model (a filesystem all nodes share)")
            error.raised_on_every_rank = True
            raise error


def training_launch(environ=None) -> TrainingLaunch:
    """Rank facts from torchrun / accelerate launch (the scale stage's parser), plus whether accelerate
    launched FSDP (ACCELERATE_USE_FSDP)."""
    env = os.environ if environ is None else environ
    launch = launch_from_env(env)
    fsdp = str(env.get("ACCELERATE_USE_FSDP", "false")).lower() in ("1", "true", "yes")
    return TrainingLaunch(**asdict(launch), fsdp=fsdp)


@dataclass(frozen=True)
class BatchRule:
    per_device_batch_size: int
    grad_accum: int
    world_size: int
    requested_effective_batch_size: int | None

    @property
    def effective_batch_size(self) -> int:
        return self.per_device_batch_size * self.grad_accum * self.world_size

    def as_dict(self) -> dict:
        return {"rule": "effective_batch_size = per_device_batch_size x grad_accum x world_size",
                "per_device_batch_size": self.per_device_batch_size, "grad_accum": self.grad_accum, "world_size": self.world_size,
                "effective_batch_size": self.effective_batch_size,
                "grad_accum_from": "--effective-batch-size" if self.requested_effective_batch_size else "--grad-accum"}


def resolve_batch_rule(per_device: int, grad_accum: int | None, effective: int | None, world_size: int,
                       default_grad_accum: int = 8) -> BatchRule:
    """The batch layout (see the module docstring); BadInputError names the numbers that do not fit."""
    if effective is None:
        return BatchRule(per_device, grad_accum or default_grad_accum, world_size, None)
    per_step = per_device * world_size
    if effective % per_step:
        raise BadInputError(f"--effective-batch-size {effective} is not a multiple of --per-device-batch-size {per_device} x "
                            f"world size {world_size} = {per_step}, so no whole --grad-accum gives it; choose an effective batch "
                            f"that is, or another per-device batch")
    derived = effective // per_step
    if grad_accum is not None and grad_accum != derived:
        raise BadInputError(f"--grad-accum {grad_accum} contradicts --effective-batch-size {effective}: with "
                            f"--per-device-batch-size {per_device} and world size {world_size} it needs --grad-accum {derived}; "
                            "pass one of the two")
    return BatchRule(per_device, derived, world_size, effective)


def sync_stop_callback(guard, launch: TrainingLaunch):
    """A Trainer callback that stops every rank at the same step when any rank was asked to stop
    (SIGTERM sent to one process, or a scheduler signalling one node): a checkpoint save is a
    collective, and a rank that stops alone leaves the others waiting. Add it after
    `sft_training.TrainingGuardCallback` (`guard`), whose flag it shares: one max-reduce of one number
    per optimizer step, none in a single process."""
    from transformers import TrainerCallback

    class SyncStop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if not launch.distributed:
                return
            import torch
            import torch.distributed as dist

            flag = torch.tensor([1 if guard.stop_requested else 0], device=args.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and not guard.stop_requested:
                print(f"[train] rank {launch.rank}: another rank was asked to stop; saving and stopping with it",
                      file=sys.stderr, flush=True)
                guard.stop_requested, guard.stopped_at_step = True, state.global_step
                control.should_save = control.should_log = control.should_training_stop = True

    return SyncStop()


def adapter_state_dict(trainer):
    """Under FSDP the adapter is sharded over the ranks: gather it whole (every rank must call this) for
    rank 0 to save; None otherwise (the model on rank 0 holds the whole adapter)."""
    if not getattr(trainer, "is_fsdp_enabled", False):
        return None
    return trainer.accelerator.get_state_dict(trainer.model)  # FULL_STATE_DICT, offloaded to CPU, on rank 0 only


def gpu_memory_gib(launch: TrainingLaunch, reset_peak: bool = False) -> list[dict] | None:
    """Each rank's GPU memory in GiB, in rank order (a collective): {"allocated": now, "peak": the most
    allocated since the process started or the last reset}; `reset_peak` starts a new peak after reading
    (so the load's peak and the training's are told apart). None without CUDA."""
    import torch

    mine = None
    if torch.cuda.is_available():
        mine = {"allocated": round(torch.cuda.memory_allocated() / 2**30, 2), "peak": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
        if reset_peak:
            torch.cuda.reset_peak_memory_stats()
    values = launch.gather(mine)
    return None if all(v is None for v in values) else values
