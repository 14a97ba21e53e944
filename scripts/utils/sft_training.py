"""SFT data preparation and trainer plumbing for Stage 1 QLoRA training (TRL SFTTrainer + peft).

Examples are pre-tokenized here, so TRL never tokenizes text itself:
    input_ids       = encode_prompt(prompt) + encode_continuation(" " + response) + [eos]
    completion_mask = 0 on the prompt tokens, 1 on the response tokens and the EOS
With `completion_only_loss=True` TRL 1.16 folds `completion_mask` into a `labels` column during
dataset preparation (-100 wherever the mask is 0) and drops the mask; its collator then only pads.

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
from pathlib import Path

from transformers import TrainerCallback

from .clean_model_loader import encode_continuation, encode_prompt
from .completion_prompts import CompletionStylePrompts
from .exit_codes import BadInputError, Stage1Error
from .jsonl_io import iter_jsonl

__all__ = [
    "REQUIRED_FIELDS", "NonFiniteLossError", "load_sft_records", "split_train_val", "build_sft_examples",
    "make_lora_config", "prepare_quantized_model", "resolve_gradient_checkpointing", "resolve_padding_free", "build_sft_config", "build_trainer",
    "TrainingGuardCallback", "install_sigterm_handler", "latest_complete_checkpoint", "plot_loss_curve",
    "load_adapter",
]

REQUIRED_FIELDS = ("id", "instruction", "response")
_PACKED_MASK_ATTENTION = {"sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3"}


class NonFiniteLossError(Stage1Error):
    """The loss (or the trained weights) became NaN/inf: training stops, exit 1."""


def load_sft_records(path) -> list[dict]:
    """Records with non-empty string `instruction`/`response` and an `id`; each keeps `_line`."""
    records = []
    for line, record in iter_jsonl(path):
        missing = [field for field in REQUIRED_FIELDS if field not in record]
        if missing:
            raise BadInputError(f"{path}:{line}: missing field(s) {', '.join(missing)}")
        for field in ("instruction", "response"):
            if not isinstance(record[field], str) or not record[field].strip():
                raise BadInputError(f"{path}:{line}: field '{field}' must be a non-empty string")
        records.append({**record, "_line": line})
    if not records:
        raise BadInputError(f"{path}: no records (empty dataset)")
    return records


def split_train_val(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """Seeded split; at least one validation record when there are >= 2 records and fraction > 0."""
    if fraction <= 0 or len(records) < 2:
        return list(records), []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = min(len(records) - 1, max(1, round(len(records) * fraction)))
    val_idx = set(order[:n_val])
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


def resolve_gradient_checkpointing(requested: str, model) -> bool:
    """auto: only for models of 1B+ parameters. A small model fits without it, and recomputing its
    forward pass adds a third round of kernel launches to steps that are launch-bound already."""
    if requested != "auto":
        return requested == "on"
    return sum(p.numel() for p in model.parameters()) >= GRADIENT_CHECKPOINTING_MIN_PARAMS


def prepare_quantized_model(model, gradient_checkpointing: bool = True):
    """peft's k-bit preparation (fp32 norms, input grads, optional gradient checkpointing) for a 4-bit base."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                           gradient_checkpointing_kwargs={"use_reentrant": False})


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


def build_sft_config(output_dir, *, epochs: float, lr: float, batch_size: int, grad_accum: int, max_steps: int,
                     save_steps: int, logging_steps: int, seed: int, padding_free: bool, packing: bool,
                     max_seq_length: int, has_eval: bool, save_total_limit: int | None = None,
                     gradient_checkpointing: bool = True):
    import torch
    from trl import SFTConfig

    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return SFTConfig(
        output_dir=str(output_dir), num_train_epochs=epochs, learning_rate=lr, per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size, gradient_accumulation_steps=grad_accum, max_steps=max_steps,
        save_strategy="steps", save_steps=save_steps, save_total_limit=save_total_limit, logging_steps=logging_steps,
        eval_strategy="steps" if has_eval else "no", eval_steps=save_steps if has_eval else None,
        seed=seed, data_seed=seed, bf16=bf16, fp16=False, report_to="none", logging_nan_inf_filter=False,
        completion_only_loss=True,  # pre-tokenized data: completion_mask -> labels -100 on the prompt
        padding_free=padding_free, packing=packing, packing_strategy="bfd",
        # examples are truncated in build_sft_examples; TRL refuses max_length with padding-free unless packing
        max_length=max_seq_length if packing else None,
        gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False})


def build_trainer(model, tokenizer, train_examples: list[dict], val_examples: list[dict], config, lora_config,
                  callbacks=()):
    from datasets import Dataset
    from trl import SFTTrainer

    val = Dataset.from_list(val_examples) if val_examples else None
    return SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(train_examples), eval_dataset=val,
                      processing_class=tokenizer, peft_config=lora_config, callbacks=list(callbacks))


class TrainingGuardCallback(TrainerCallback):
    """Stops on a non-finite loss, records loss history, and turns SIGTERM into save-then-stop."""

    def __init__(self):
        self.train_history, self.eval_history = [], []  # [{"step", "loss"}], [{"step", "eval_loss"}]
        self.stop_requested, self.stopped_at_step, self.num_tokens = False, None, 0
        self._nan_at = int(os.environ.get("STAGE1_INJECT_NAN_AT_STEP", "0") or 0)
        self._sigterm_at = int(os.environ.get("STAGE1_TEST_SIGTERM_AT_STEP", "0") or 0)

    def on_train_begin(self, args, state, control, **kwargs):
        state.compute_steps(args, state.max_steps)  # a resumed state carries the old run's intervals: use this run's
        self.train_history, self.eval_history = [], []
        for entry in state.log_history:  # a resumed run starts from the checkpoint's history
            self._record(entry, state, check=False)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
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
        if state.global_step >= state.max_steps:
            control.should_log = True  # the curve and the NaN check always see the last step
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
        if "num_tokens" in entry:
            self.num_tokens = int(entry["num_tokens"])


def install_sigterm_handler(guard: TrainingGuardCallback):
    """SIGTERM asks the trainer to save a checkpoint at the end of the current step and stop."""
    def handler(signum, frame):
        guard.stop_requested = True
        print("[train] SIGTERM: saving a checkpoint at the end of this step, then exiting 143", file=sys.stderr, flush=True)

    return signal.signal(signal.SIGTERM, handler)


def latest_complete_checkpoint(folder) -> Path | None:
    """Newest checkpoint-N whose trainer_state.json (written last by the Trainer) exists and parses."""
    def complete(path: Path) -> bool:
        try:
            return path.name.split("-")[-1].isdigit() and isinstance(json.loads((path / "trainer_state.json").read_text()), dict)
        except (OSError, json.JSONDecodeError):
            return False

    found = [path for path in Path(folder).glob("checkpoint-*") if complete(path)]
    return max(found, key=lambda path: int(path.name.split("-")[-1]), default=None)


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


def load_adapter(model, path):
    """A trained LoRA adapter on top of a base model from CleanModelLoader (the only adapter loader)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(path))
