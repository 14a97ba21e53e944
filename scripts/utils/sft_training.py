"""SFT data preparation and trainer plumbing for Stage 1 QLoRA training (TRL SFTTrainer + peft).

Examples are pre-tokenized here, so TRL never tokenizes text itself:
    input_ids       = encode_prompt(prompt) + encode_continuation(" " + response) + [eos]
    completion_mask = 0 on the prompt tokens, 1 on the response tokens and the EOS
With `completion_only_loss=True` TRL 1.16 folds `completion_mask` into a `labels` column during
dataset preparation (-100 wherever the mask is 0) and drops the mask; its collator then only pads.

Resuming: `<output>/run_identity.json` records what the checkpoints were trained from (the
dataset's sha256, the base model's `model_identity`, the `RUN_HYPERPARAMETERS`); `check_resume`
compares it with this run before anything in the output folder changes.

The finished adapter: `TRAINING_SUCCESS` carries the sha256 of every file in the adapter folder
(`adapter_file_hashes`), and `verify_adapter_files` is the one check of them.

Stage 2 DPO (`utils.dpo_training`, train_stage2_dpo.py) shares the loop pieces: the guard callback,
the SIGTERM wrapper, the resume checks, the adapter hashes and `load_adapter`.

Test hooks (read by `TrainingGuardCallback`, for tests only): STAGE1_INJECT_NAN_AT_STEP=N fills a
LoRA weight with NaN just before optimizer step N; STAGE1_TEST_SIGTERM_AT_STEP=N sends this process
SIGTERM at the end of step N.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerCallback

from .completion_prompts import CompletionStylePrompts
from .cuda_graph_training import PAD_MULTIPLE, cuda_graphs_problem, graphed_trainer_class
from .exit_codes import BadInputError, RefusedError, Stage1Error
from .jsonl_io import read_keyed_text_records
from .prompt_guards import encode_continuation, encode_prompt
from .provenance_helper import model_identity, read_manifest, same_model, sha256_file, write_manifest_atomic
from .records import base_pair_id

__all__ = [
    "REQUIRED_FIELDS", "NonFiniteLossError", "load_sft_records", "split_train_val", "build_sft_examples",
    "make_lora_config", "prepare_quantized_model", "set_cudnn_attention", "resolve_quantization", "resolve_gradient_checkpointing",
    "resolve_padding_free", "liger_kernel_problem", "build_sft_config", "build_trainer", "TrainingGuardCallback", "install_sigterm_handler",
    "train_with_sigterm_guard", "final_eval_loss",
    "latest_complete_checkpoint", "whole_run_train_loss", "plot_loss_curve", "load_adapter",
    "RUN_HYPERPARAMETERS", "RUN_IDENTITY_FILE", "MARKER_NAME", "ResumePlan", "run_hyperparameters", "check_resume",
    "check_resumed_model", "claim_output_folder", "adapter_file_hashes", "verify_adapter_files",
]

REQUIRED_FIELDS = ("id", "instruction", "response")
RUN_IDENTITY_FILE = "run_identity.json"
MARKER_NAME = "TRAINING_SUCCESS"
# The flags that change what a run computes (its data split, schedule, batches, adapter shape, base
# weights' precision). Checkpointing, logging, evaluation cadence, padding-free layout and kernels
# (torch.compile, Liger) are left out: they change speed and bookkeeping, not the result.
# `quantization` is compared as resolved ("auto" -> 4bit/none). `group_by_length` decides which
# examples share a batch, so a resumed epoch must keep it (else it skips other examples).
RUN_HYPERPARAMETERS = ("epochs", "lr", "per_device_batch_size", "grad_accum", "max_steps", "seed", "val_fraction",
                       "max_seq_length", "packing", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
                       "quantization", "group_by_length", "kbit_upcast")
# Hyperparameters added after runs were recorded: an older run_identity.json without them ran with these values.
_UNRECORDED_MEANS = {"group_by_length": False, "kbit_upcast": True}
_PACKED_MASK_ATTENTION = {"sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3"}


class NonFiniteLossError(Stage1Error):
    """The loss (or the trained weights) became NaN/inf: training stops, exit 1."""


def load_sft_records(path) -> list[dict]:
    """Records with non-empty string `instruction`/`response` and a unique `id`; each keeps `_line`.

    A repeated id (compared as text, as the test set does) is bad input naming the line of the
    second occurrence: ids are how records are traced back, so two records may not share one.
    """
    return read_keyed_text_records(path, REQUIRED_FIELDS, ("instruction", "response"), "no records (empty dataset)")


def split_train_val(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """Seeded split by accepted pair: a pair and its relabeled variants (`records.base_pair_id`) land on
    the same side, so the validation loss is never measured on an answer trained under other
    constraints. At least one validation pair when there are >= 2 pairs and fraction > 0; without
    variants, the same split as one record per pair."""
    groups: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        groups.setdefault(base_pair_id(record["id"]), []).append(i)
    if fraction <= 0 or len(groups) < 2:
        return list(records), []
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    n_val = min(len(order) - 1, max(1, round(len(order) * fraction)))
    val_idx = {i for group in order[:n_val] for i in group}
    return [r for i, r in enumerate(records) if i not in val_idx], [r for i, r in enumerate(records) if i in val_idx]


def build_sft_examples(tokenizer, records: list[dict], max_seq_length: int, source: str = "data") -> tuple[list[dict], dict]:
    """Pre-tokenized examples ({input_ids, completion_mask}) and counts; truncation keeps the start."""
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise BadInputError("the tokenizer has no EOS token; the model could not learn to stop")
    examples, dropped, truncated, completion_tokens = [], [], 0, 0
    for record in records:
        where = f"{source}:{record.get('_line', '?')}"
        try:
            prompt = encode_prompt(tokenizer, CompletionStylePrompts.create_response_prompt(record["instruction"]))
            completion = encode_continuation(tokenizer, CompletionStylePrompts.format_completion(record["response"])) + [eos_id]
        except BadInputError as err:
            raise BadInputError(f"{where}: {err}") from None
        ids, mask = prompt + completion, [0] * len(prompt) + [1] * len(completion)
        if len(ids) > max_seq_length:
            truncated += 1
            ids, mask = ids[:max_seq_length], mask[:max_seq_length]
        if not any(mask):
            dropped.append(where)
            continue
        completion_tokens += sum(mask)
        examples.append({"input_ids": ids, "completion_mask": mask})
    stats = {"records": len(records), "examples": len(examples), "truncated": truncated, "dropped_prompt_too_long": dropped,
             "tokens": sum(len(e["input_ids"]) for e in examples), "completion_tokens": completion_tokens}
    return examples, stats


def make_lora_config(r: int = 16, alpha: int = 16, dropout: float = 0.1, target_modules: str = "all-linear"):
    from peft import LoraConfig

    targets = target_modules if target_modules == "all-linear" else [m.strip() for m in target_modules.split(",") if m.strip()]
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")


GRADIENT_CHECKPOINTING_MIN_PARAMS = 1_000_000_000


def resolve_quantization(requested: str) -> str:
    """auto -> 4bit (bitsandbytes NF4) where CUDA is present, none on a CPU-only machine."""
    if requested != "auto":
        return requested
    import torch

    return "4bit" if torch.cuda.is_available() else "none"


def resolve_gradient_checkpointing(requested: str, model) -> bool:
    """auto: only for models of 1B+ parameters. A small model fits without it, and recomputing its
    forward pass adds a third round of kernel launches to steps that are launch-bound already."""
    if requested != "auto":
        return requested == "on"
    return sum(p.numel() for p in model.parameters()) >= GRADIENT_CHECKPOINTING_MIN_PARAMS


def prepare_quantized_model(model, gradient_checkpointing: bool = True, upcast: bool = True):
    """peft's k-bit preparation (frozen base, input grads, optional gradient checkpointing) for a 4-bit base.

    peft also casts every weight that is not 4-bit to float32: the norms and, on a model with tied
    embeddings such as gemma-3-270m, the 262k x 640 embedding that is also the output projection
    (168M of its 268M parameters). `upcast=False` casts them back to the dtype they were loaded in
    (exact: bf16 -> fp32 -> bf16 is lossless), which is what TRL's own k-bit preparation does since
    huggingface/trl#4457 ("results are the same and the memory consumption is reduced"); the LoRA
    weights are TRL's to cast (bf16 for a quantized base) either way.
    """
    from peft import prepare_model_for_kbit_training

    loaded = {id(p): p.dtype for p in model.parameters()}
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    if not upcast:
        for param in model.parameters():  # deduplicated: a tied weight is cast once
            if param.dtype != loaded.get(id(param), param.dtype):
                param.data = param.data.to(loaded[id(param)])
    return model


def liger_kernel_problem() -> str | None:
    """Why Liger kernels cannot run here (None when they can): the package, Triton and CUDA are all needed."""
    import importlib.util

    import torch

    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install liger-kernel; it is optional and not part of setup_env.sh)"
    if importlib.util.find_spec("triton") is None or not torch.cuda.is_available():
        return "Liger kernels are Triton GPU kernels: they need CUDA and Triton, and this machine has " + (
            "no Triton" if importlib.util.find_spec("triton") is None else "no CUDA device")
    return None


def resolve_padding_free(requested: bool | None, model, batch_size: int, packing: bool) -> tuple[bool, str]:
    """Whether to flatten each batch into one row with per-example position_ids, and why.

    Correct only where attention keeps the examples apart: FlashAttention reads TRL's cu_seq_lens;
    SDPA/eager/flex get a block-diagonal mask that transformers builds from the position_ids (only
    for models whose modeling code uses transformers' masking utilities). None = auto: on with
    CUDA, batches > 1 and flash attention; SDPA's masked path is slower than padding.
    """
    import torch

    impl = getattr(model.config, "_attn_implementation", None)
    module = sys.modules.get(type(model).__module__)
    supported = impl in _PACKED_MASK_ATTENTION and module is not None and hasattr(module, "create_causal_mask")
    if packing:
        return True, "packing (bfd) always runs padding-free in TRL"
    if requested is False:
        return False, "off (--no-padding-free)"
    if not supported:
        return False, f"off: attention {impl!r} of {type(model).__name__} cannot keep flattened examples apart; padded batches"
    if requested:
        return True, f"on (--padding-free, attention {impl})"
    # Measured on an H100 (docs/measurements.md): with SDPA the flattened row and its block-diagonal
    # mask ran 2.8x slower than padded batches, so auto uses it only where varlen flash kernels read it.
    if torch.cuda.is_available() and batch_size > 1 and str(impl).startswith("flash_attention"):
        return True, f"on (auto: CUDA, batch {batch_size}, attention {impl})"
    return False, f"off (auto: padded batches; padding-free pays only with flash attention and batch > 1, here {impl}, batch {batch_size})"


def set_cudnn_attention(enabled: bool) -> bool:
    """Whether PyTorch's attention may pick cuDNN's fused kernel (CUDA only; returns whether anything was set).

    On Hopper PyTorch prefers cuDNN for masked attention, and cuDNN builds an execution plan on the host for each new
    batch shape; padded training batches change shape almost every step. Measured on an H200 (docs/measurements.md,
    "Training speed"): the bundled model's 4-bit step went from 1,180 to 2,825 tokens/s without it. Process-wide, so
    it is set either way and a later run in the same process (the benchmark's rows) gets its own choice."""
    import torch

    if not torch.cuda.is_available():
        return False
    torch.backends.cuda.enable_cudnn_sdp(bool(enabled))
    return True


def build_sft_config(args, output_dir, *, padding_free: bool, has_eval: bool, gradient_checkpointing: bool):
    """TRL's SFTConfig from train_stage1_sft.py's arguments (epochs, lr, per_device_batch_size,
    grad_accum, max_steps, save_steps, save_total_limit, logging_steps, seed, packing,
    max_seq_length; and, where present, the speed flags of `add_training_speed_flags`: group_by_length,
    torch_compile ("off", "model" or "regional"), liger_kernel, cudnn_attention, eval_steps, eval_batch_size) and the values
    resolved once the model is loaded. A torch_compile other than "off" sets accelerate's dynamo environment
    variables for this process (dynamic shapes; regional compilation or not).

    A Liger request that cannot run here is bad input (exit 2). With several processes (WORLD_SIZE > 1),
    DDP is told that every trainable parameter gets a gradient: the LoRA weights all do, and otherwise
    it would search the graph for unused ones after every backward pass.
    """
    import torch
    from trl import SFTConfig

    liger = bool(getattr(args, "liger_kernel", False))
    problem = liger_kernel_problem() if liger else None
    if problem:
        raise BadInputError(f"--liger-kernel: {problem}")
    compile_mode = getattr(args, "torch_compile", "off") or "off"
    if compile_mode != "off":
        # accelerate reads these when the Trainer builds its dynamo plugin: shapes marked dynamic from the start (batch
        # lengths change every step; otherwise the second length recompiles), and "regional" compiles each decoder
        # layer class once instead of the whole model.
        os.environ["ACCELERATE_DYNAMO_USE_DYNAMIC"] = "1"
        os.environ["ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION"] = "1" if compile_mode == "regional" else "0"
    cuda_graphs = bool(getattr(args, "cuda_graphs", False))
    if cuda_graphs:
        problem = cuda_graphs_problem(gradient_checkpointing=gradient_checkpointing, padding_free=padding_free or args.packing,
                                      torch_compile=compile_mode, liger_kernel=liger)
        if problem:
            raise BadInputError(f"--cuda-graphs: {problem}")
    set_cudnn_attention(getattr(args, "cudnn_attention", True))
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    eval_steps = getattr(args, "eval_steps", None) or args.save_steps
    return SFTConfig(
        output_dir=str(output_dir), num_train_epochs=args.epochs, learning_rate=args.lr,
        per_device_train_batch_size=args.per_device_batch_size,
        per_device_eval_batch_size=getattr(args, "eval_batch_size", None) or args.per_device_batch_size,
        gradient_accumulation_steps=args.grad_accum, max_steps=args.max_steps, save_strategy="steps",
        save_steps=args.save_steps, save_total_limit=args.save_total_limit, logging_steps=args.logging_steps,
        eval_strategy="steps" if has_eval else "no", eval_steps=eval_steps if has_eval else None,
        train_sampling_strategy="group_by_length" if getattr(args, "group_by_length", False) else "random",
        torch_compile=compile_mode != "off", use_liger_kernel=liger,
        ddp_find_unused_parameters=False if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        seed=args.seed, data_seed=args.seed, bf16=bf16, fp16=False, report_to="none", logging_nan_inf_filter=False,
        completion_only_loss=True,  # pre-tokenized data: completion_mask -> labels -100 on the prompt
        padding_free=padding_free, packing=args.packing, packing_strategy="bfd",
        pad_to_multiple_of=PAD_MULTIPLE if cuda_graphs else None,  # graphs are per shape: let a few shapes repeat
        # A blocking copy of each batch would wait for the step before it: the host could not queue ahead of a replay.
        accelerator_config={"non_blocking": True} if cuda_graphs else None,
        # examples are truncated in build_sft_examples; TRL refuses max_length with padding-free unless packing
        max_length=args.max_seq_length if args.packing else None,
        gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False})


def build_trainer(model, tokenizer, train_examples: list[dict], val_examples: list[dict], config, lora_config,
                  callbacks=(), cuda_graphs: bool = False):
    """TRL's SFTTrainer; with `cuda_graphs`, one whose training steps replay CUDA graphs (utils.cuda_graph_training)."""
    from datasets import Dataset
    from trl import SFTTrainer

    trainer_class = graphed_trainer_class(SFTTrainer) if cuda_graphs else SFTTrainer
    val = Dataset.from_list(val_examples) if val_examples else None
    return trainer_class(model=model, args=config, train_dataset=Dataset.from_list(train_examples), eval_dataset=val,
                      processing_class=tokenizer, peft_config=lora_config, callbacks=list(callbacks))


class TrainingGuardCallback(TrainerCallback):
    """Stops on a non-finite loss, records loss history, and turns SIGTERM into save-then-stop.

    `metric_keys` names further logged values to keep per step in `metric_history` (DPO's
    "rewards/margins" and its "eval_" twin); only the losses stop training when not finite.
    """

    def __init__(self, metric_keys: tuple[str, ...] = ()):
        self.train_history, self.eval_history = [], []  # [{"step", "loss"}], [{"step", "eval_loss"}]
        self.metric_keys = tuple(metric_keys)
        self.metric_history: dict[str, list[dict]] = {key: [] for key in self.metric_keys}  # key -> [{"step", key}]
        self.stop_requested, self.stopped_at_step, self.num_tokens = False, None, 0
        self._nan_at = int(os.environ.get("STAGE1_INJECT_NAN_AT_STEP", "0") or 0)
        self._sigterm_at = int(os.environ.get("STAGE1_TEST_SIGTERM_AT_STEP", "0") or 0)

    def on_train_begin(self, args, state, control, **kwargs):
        state.compute_steps(args, state.max_steps)  # a resumed state carries the old run's intervals: use this run's
        self.train_history, self.eval_history = [], []
        self.metric_history = {key: [] for key in self.metric_keys}
        for entry in state.log_history:  # a resumed run starts from the checkpoint's history
            self._record(entry, state, check=False)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and not model.training:
            # Regional compilation (accelerate's compile_regions) trains a shallow copy of the model's outer
            # modules: after an evaluation, train() reaches the copy and the shared layers but not the original's
            # own flag, so TRL took every later step for evaluation (its metrics logged as eval_*, the train
            # tokens no longer counted). The layers already train; this only sets the outer flags back.
            model.train()
        if self._nan_at and state.global_step + 1 == self._nan_at and model is not None:
            import torch

            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self._sigterm_at and state.global_step == self._sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        if control.should_save and model is not None:  # never write a poisoned checkpoint
            import torch

            if not torch.stack([torch.isfinite(p).all() for p in model.parameters() if p.requires_grad]).all():
                raise NonFiniteLossError(f"trainable weights became NaN/inf by step {state.global_step}; stopped before "
                                         "saving that checkpoint (lower --lr, check the data)")
        if state.global_step >= state.max_steps or control.should_save:
            # The curve and the NaN check always see the last step, and every checkpoint carries the
            # loss of each step before it, so a resumed run's whole-run loss misses none.
            control.should_log = True
        if self.stop_requested:
            control.should_save = control.should_log = True
            control.should_training_stop = True
            self.stopped_at_step = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        self._record(dict(logs or {}, step=state.global_step), state, check=True)

    def _record(self, entry: dict, state, check: bool) -> None:
        step = entry.get("step", state.global_step)
        for key, history in (("loss", self.train_history), ("eval_loss", self.eval_history)):
            if key in entry:
                value = float(entry[key])
                if check and not math.isfinite(value):
                    raise NonFiniteLossError(f"{'training' if key == 'loss' else 'evaluation'} loss is {value} at step "
                                             f"{step} (logged every {state.logging_steps} step(s)); training stopped")
                history.append({"step": step, key: value})
        for key in self.metric_keys:
            if key in entry:
                self.metric_history[key].append({"step": step, key: float(entry[key])})
        if "num_tokens" in entry:
            self.num_tokens = int(entry["num_tokens"])


def install_sigterm_handler(guard: TrainingGuardCallback):
    """SIGTERM asks the trainer to save a checkpoint at the end of the current step and stop."""
    def handler(signum, frame):
        guard.stop_requested = True
        print("[train] SIGTERM: saving a checkpoint at the end of this step, then exiting 143", file=sys.stderr, flush=True)

    return signal.signal(signal.SIGTERM, handler)


def train_with_sigterm_guard(trainer, guard: TrainingGuardCallback, resume_from=None) -> float:
    """trainer.train() with SIGTERM turned into save-then-stop (see `guard.stop_requested`);
    returns the training seconds."""
    previous_handler = install_sigterm_handler(guard)
    start = time.time()
    try:
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    return result.metrics.get("train_runtime") or (time.time() - start)


def final_eval_loss(trainer, guard: TrainingGuardCallback, has_validation: bool) -> float | None:
    """The validation loss at the last step, reusing the evaluation a save on that step already ran."""
    last_eval = guard.eval_history[-1] if guard.eval_history else {}
    if last_eval.get("step") == trainer.state.global_step:
        return last_eval["eval_loss"]
    return trainer.evaluate().get("eval_loss") if has_validation else None


def latest_complete_checkpoint(folder) -> Path | None:
    """Newest checkpoint-N whose trainer_state.json (written last by the Trainer) exists and parses."""
    def complete(path: Path) -> bool:
        try:
            return path.name.split("-")[-1].isdigit() and isinstance(json.loads((path / "trainer_state.json").read_text()), dict)
        except (OSError, json.JSONDecodeError):
            return False

    found = [path for path in Path(folder).glob("checkpoint-*") if complete(path)]
    return max(found, key=lambda path: int(path.name.split("-")[-1]), default=None)


def whole_run_train_loss(train_history: list[dict], resume_step: int | None = None) -> dict:
    """Mean training loss per optimizer step over the whole run, resumed parts included.

    The Trainer's own `training_loss` sums only the steps run by this process (and divides that
    by the global step count). Each logged loss is the mean over the steps since the previous log,
    and logging restarts at the resume step, so the whole-run mean weights each logged loss by the
    steps it covers. Steps no log covers (a checkpoint saved between logs by an older version) are
    left out and counted in `steps_not_covered`.
    """
    total, covered, previous = 0.0, 0, 0
    for entry in sorted(train_history, key=lambda h: h["step"]):
        start = resume_step if resume_step and previous < resume_step < entry["step"] else previous
        total += entry["loss"] * (entry["step"] - start)
        covered += entry["step"] - start
        previous = entry["step"]
    return {"loss": total / covered if covered else None, "steps_covered": covered,
            "steps_not_covered": previous - covered}


def plot_loss_curve(train_history: list[dict], eval_history: list[dict], path, title: str = "Stage 1 SFT") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for history, key, style in ((train_history, "loss", "-"), (eval_history, "eval_loss", "o-")):
        if history:
            ax.plot([h["step"] for h in history], [h[key] for h in history], style, label="train loss" if key == "loss" else "eval loss")
    ax.set(xlabel="optimizer step", ylabel="loss (response tokens)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def load_adapter(model, path, adapter_name: str = "default", is_trainable: bool = False):
    """A trained LoRA adapter on top of a base model from CleanModelLoader (the only adapter loader).

    On a model that already carries adapters (a PeftModel) the new one is added under `adapter_name`
    and made the active one, so one loaded base can answer as several adapters in turn (the
    evaluation's reference adapter). `is_trainable` loads it for further training (Stage 2 DPO
    continues the Stage 1 adapter); otherwise it is frozen, in inference mode.
    """
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model.load_adapter(str(path), adapter_name=adapter_name, is_trainable=is_trainable)
        model.set_adapter(adapter_name)
        return model
    return PeftModel.from_pretrained(model, str(path), adapter_name=adapter_name, is_trainable=is_trainable)


def run_hyperparameters(args, quantization: str, names: tuple[str, ...] = RUN_HYPERPARAMETERS) -> dict:
    """The values of `names` (default `RUN_HYPERPARAMETERS`, Stage 1's) for this run (quantization as resolved)."""
    values = {name: getattr(args, name) for name in names if name != "quantization"}
    values["quantization"] = quantization
    return values


@dataclass(frozen=True)
class ResumePlan:
    """What `check_resume` found in the output folder: the checkpoint to resume from (or None),
    the run identity recorded there, and the hyperparameter changes this run was allowed to make."""

    output: Path
    resume_from: Path | None
    recorded: dict | None
    changes: list[dict]

    @property
    def resume_step(self) -> int | None:
        return int(self.resume_from.name.split("-")[-1]) if self.resume_from else None


def check_resume(output, resume: bool, data_sha: str, hyperparameters: dict, allow_changes: bool) -> ResumePlan:
    """Every refusal that needs no model, made before anything in `output` is touched.

    Checkpoints without --resume: exit 2. With --resume and a checkpoint, the run identity recorded
    beside it must parse and be complete (else exit 3), name this dataset (else exit 3), and hold
    the same hyperparameters (else exit 2 naming each changed flag with both values, unless
    `allow_changes`; the changes are returned so the manifest can record them). The base model is
    compared by `check_resumed_model` once it is loaded.
    """
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise BadInputError(f"--output {output}: exists and is not a folder")
    checkpoints = output / "checkpoints"
    resume_from = latest_complete_checkpoint(checkpoints) if checkpoints.is_dir() else None
    if resume_from is not None and not resume:
        raise BadInputError(f"{checkpoints} already holds {resume_from.name}; pass --resume to continue, or choose another --output")
    if resume_from is None:
        return ResumePlan(output, None, None, [])
    identity_path = output / RUN_IDENTITY_FILE
    try:
        recorded = read_manifest(identity_path)
    except (OSError, BadInputError) as err:
        raise RefusedError(f"--resume: cannot tell what {resume_from} was trained from: {identity_path} is missing or "
                           f"unreadable ({err}); use another --output") from None
    expected_types = {"dataset_sha256": str, "model_identity": dict, "hyperparameters": dict}
    missing = [key for key, kind in expected_types.items() if not isinstance(recorded.get(key), kind)]
    if missing:
        raise RefusedError(f"--resume: {identity_path} does not record {', '.join(missing)} (written by an older "
                           "version?), so its checkpoints cannot be shown to belong to this run; use another --output")
    if recorded["dataset_sha256"] != data_sha:
        raise RefusedError(f"--resume: {resume_from} was trained on dataset {recorded.get('dataset', '?')} (sha256 "
                           f"{recorded['dataset_sha256'][:12]}...), not on this dataset (sha256 {data_sha[:12]}...); "
                           "use another --output")
    before = recorded["hyperparameters"]
    recorded_value = {name: before.get(name, _UNRECORDED_MEANS.get(name, "(not recorded)")) for name in hyperparameters}
    changes = [{"field": name, "recorded": recorded_value[name], "new": value}
               for name, value in hyperparameters.items() if recorded_value[name] != value]
    if changes and not allow_changes:
        listed = "; ".join(f"--{c['field'].replace('_', '-')}: recorded {c['recorded']!r}, now {c['new']!r}" for c in changes)
        raise BadInputError(f"--resume: {resume_from} was trained with other hyperparameters ({listed}); rerun with the "
                            "recorded values, or pass --allow-changed-hyperparameters to continue with the new ones "
                            "(recorded in the manifest)")
    return ResumePlan(output, resume_from, recorded, changes)


def check_resumed_model(plan: ResumePlan, provenance: dict) -> None:
    """Refuse (exit 3) to resume checkpoints trained on other weights, whatever the model is called."""
    if plan.resume_from is None or same_model(plan.recorded["model_identity"], provenance):
        return
    recorded, loaded = model_identity(plan.recorded["model_identity"]), model_identity(provenance)
    differing = ", ".join(f"{key} {str(recorded[key])[:12]} != {str(loaded[key])[:12]}"
                          for key in ("file_sha256", "weights_fingerprint", "revision", "tokenizer_sha256")
                          if recorded[key] != loaded[key])
    raise RefusedError(f"--resume: {plan.resume_from} was trained on model {recorded['model_id']!r}, not on the model "
                       f"loaded now ({loaded['model_id']!r}: {differing or 'model id differs'}); use another --output")


def claim_output_folder(plan: ResumePlan, data_path, data_sha: str, provenance: dict, hyperparameters: dict) -> dict:
    """The first change to the output folder, made only after every check passed: the stale
    TRAINING_SUCCESS goes (it must not vouch for this run) and run_identity.json is (re)written.

    Allowed hyperparameter changes accumulate in `hyperparameter_changes`; `hyperparameters` holds
    the values now in force, so a later resume with the same new values needs no override again.
    """
    (plan.output / "final_adapter" / MARKER_NAME).unlink(missing_ok=True)
    earlier = (plan.recorded or {}).get("hyperparameter_changes") or []
    identity = {"dataset_sha256": data_sha, "dataset": str(data_path), "model_identity": model_identity(provenance),
                "hyperparameters": hyperparameters,
                "hyperparameter_changes": earlier + [{**change, "at_step": plan.resume_step} for change in plan.changes]}
    write_manifest_atomic(plan.output / RUN_IDENTITY_FILE, identity)
    return identity


def adapter_file_hashes(folder) -> dict[str, str]:
    """sha256 of every file under the adapter folder (relative POSIX path -> hex), the marker excepted."""
    folder = Path(folder)
    return {path.relative_to(folder).as_posix(): sha256_file(path)
            for path in sorted(folder.rglob("*")) if path.is_file() and path.name != MARKER_NAME}


def verify_adapter_files(folder, recorded) -> None:
    """Refuse (exit 3, naming the file) an adapter folder that is not what training wrote: a
    recorded file missing or changed, or a file that training did not write."""
    folder = Path(folder)
    marker = folder / MARKER_NAME
    if not isinstance(recorded, dict) or not recorded or not all(isinstance(v, str) for v in recorded.values()):
        raise RefusedError(f"{marker}: records no adapter file hashes (adapter_files_sha256), so the adapter cannot be "
                           "checked (written by an older version?); retrain")
    actual = adapter_file_hashes(folder)
    for name, sha in sorted(recorded.items()):
        if name not in actual:
            raise RefusedError(f"{folder / name}: recorded in {marker} but missing")
        if actual[name] != sha:
            raise RefusedError(f"{folder / name}: changed since training finished (sha256 {actual[name][:12]}... != "
                               f"recorded {sha[:12]}... in {marker})")
    extra = sorted(set(actual) - set(recorded))
    if extra:
        raise RefusedError(f"{folder / extra[0]}: not written by training (not in {marker}); remove it or retrain")
