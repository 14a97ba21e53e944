"""Stage 2 DPO plumbing: preference examples, the DPOTrainer set-up with the Stage 1 adapter as the
reference, the curves, and the adapter that is kept.

The loss is TRL's (`DPOTrainer`, loss_type "sigmoid": the DPO paper's); nothing here computes it.

The reference: the Stage 1 adapter is loaded trainable under peft's "default" name and handed to
`DPOTrainer` without a `ref_model`. TRL 1.16 then copies it into a frozen adapter named "ref" and
computes the reference log-probabilities with "ref" active (`dpo_trainer.py`: "Re-training an
existing adapter: an initial copy is loaded under the name 'ref'"), so the policy starts as the
Stage 1 adapter and is pulled back towards it; the base model is never the reference. Only the
"default" adapter is saved as the result (`save_policy_adapter`).

Examples are pre-tokenized here, exactly as Stage 1 SFT tokenizes (`sft_training.build_sft_examples`):
    prompt_ids   = encode_prompt(the bare instruction/response block)   (BOS as the loader decided)
    chosen_ids   = encode_continuation(" " + chosen) + [eos]
    rejected_ids = encode_continuation(" " + rejected) + [eos]
TRL's own dataset preparation (which would tokenize text with the tokenizer's defaults and run the
chat-template checks) is skipped for such columns by `PretokenizedDPOTrainer`.
"""

from __future__ import annotations

from pathlib import Path

from .completion_prompts import CompletionStylePrompts
from .exit_codes import BadInputError
from .jsonl_io import read_keyed_text_records
from .prompt_guards import encode_continuation, encode_prompt

__all__ = ["PREFERENCE_FIELDS", "DPO_METRICS", "DPO_RUN_HYPERPARAMETERS", "DEFAULT_BETA", "DEFAULT_LR", "REFERENCE_ADAPTER",
           "POLICY_ADAPTER", "load_preference_records", "build_preference_examples", "build_dpo_config",
           "build_dpo_trainer", "save_policy_adapter", "plot_dpo_curves", "resolve_dpo_quantization"]

PREFERENCE_FIELDS = ("id", "instruction", "chosen", "rejected")
# The logged values kept per step beside the losses (TrainingGuardCallback metric_keys).
DPO_METRICS = ("rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected",
               "eval_rewards/margins", "eval_rewards/accuracies")
# The flags that change what a DPO run computes (compared on --resume, like Stage 1's RUN_HYPERPARAMETERS).
DPO_RUN_HYPERPARAMETERS = ("epochs", "lr", "beta", "per_device_batch_size", "grad_accum", "max_steps", "seed", "val_fraction",
                           "max_length", "quantization")
# beta 0.1: the DPO paper's value and TRL's default (the strength of the pull back to the reference).
# lr 5e-6: the DPO paper fine-tuned whole models at 1e-6 (Rafailov et al. 2023); a LoRA update needs a larger
# rate for the same step, and published LoRA/QLoRA DPO runs sit between 5e-6 and 5e-5, so this is the cautious
# end. Stage 1's SFT rate (2e-4) would move a DPO policy far from its reference within a few steps. Both are
# flags; the training manifest records them.
DEFAULT_BETA = 0.1
DEFAULT_LR = 5e-6
POLICY_ADAPTER = "default"  # peft's name for the adapter loaded first: the trained copy of the Stage 1 adapter
REFERENCE_ADAPTER = "ref"  # the frozen copy TRL makes of it


def resolve_dpo_quantization(requested: str, stage1_manifest: dict | None) -> str:
    """auto: on CUDA, the base the Stage 1 adapter was trained on (4-bit or 16-bit, from its training manifest), so
    DPO continues the adapter on the same weights (the gpu driver trains the bundled model on its 16-bit base);
    otherwise, and for an adapter without that record, `sft_training.resolve_quantization`."""
    import torch

    from .sft_training import resolve_quantization

    recorded = (((stage1_manifest or {}).get("run_identity") or {}).get("hyperparameters") or {}).get("quantization")
    if requested == "auto" and recorded in ("4bit", "none") and torch.cuda.is_available():
        return recorded
    return resolve_quantization(requested)


def load_preference_records(path) -> list[dict]:
    """Pairs with non-empty string instruction/chosen/rejected, chosen != rejected and a unique id;
    each keeps `_line`. Anything else is bad input naming file:line (exit 2)."""
    def same_sides(record):
        return "chosen and rejected are the same text" if record["chosen"].strip() == record["rejected"].strip() else None

    return read_keyed_text_records(path, PREFERENCE_FIELDS, PREFERENCE_FIELDS[1:], "no preference pairs", same_sides)


def build_preference_examples(tokenizer, records: list[dict], max_length: int, source: str = "pairs") -> tuple[list[dict], dict]:
    """Pre-tokenized {prompt_ids, chosen_ids, rejected_ids} and counts. A pair whose prompt alone
    fills `max_length` is dropped (listed by file:line); a longer completion is cut by TRL's collator
    at `max_length` (keep_start), counted here as `truncated`."""
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise BadInputError("the tokenizer has no EOS token; a preference for stopping could not be learned")
    examples, dropped, truncated = [], [], 0
    for record in records:
        where = f"{source}:{record.get('_line', '?')}"
        try:
            prompt = encode_prompt(tokenizer, CompletionStylePrompts.create_response_prompt(record["instruction"]))
            chosen, rejected = (encode_continuation(tokenizer, CompletionStylePrompts.format_completion(record[side])) + [eos_id]
                                for side in ("chosen", "rejected"))
        except BadInputError as err:
            raise BadInputError(f"{where}: {err}") from None
        if len(prompt) >= max_length:
            dropped.append(where)
            continue
        truncated += len(prompt) + max(len(chosen), len(rejected)) > max_length
        examples.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    stats = {"records": len(records), "examples": len(examples), "truncated": truncated, "dropped_prompt_too_long": dropped,
             "chosen_tokens": sum(len(e["chosen_ids"]) for e in examples),
             "rejected_tokens": sum(len(e["rejected_ids"]) for e in examples)}
    return examples, stats


def build_dpo_config(args, output_dir, *, has_eval: bool, gradient_checkpointing: bool):
    """TRL's DPOConfig from train_stage2_dpo.py's arguments (epochs, lr, beta, per_device_batch_size,
    grad_accum, max_steps, save_steps, save_total_limit, logging_steps, seed, max_length)."""
    import torch
    from trl import DPOConfig

    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return DPOConfig(
        output_dir=str(output_dir), num_train_epochs=args.epochs, learning_rate=args.lr, beta=args.beta,
        loss_type=["sigmoid"], per_device_train_batch_size=args.per_device_batch_size,
        per_device_eval_batch_size=args.per_device_batch_size, gradient_accumulation_steps=args.grad_accum,
        max_steps=args.max_steps, save_strategy="steps", save_steps=args.save_steps, save_total_limit=args.save_total_limit,
        logging_steps=args.logging_steps, eval_strategy="steps" if has_eval else "no",
        eval_steps=args.save_steps if has_eval else None, seed=args.seed, data_seed=args.seed, bf16=bf16, fp16=False,
        report_to="none", logging_nan_inf_filter=False, max_length=args.max_length, truncation_mode="keep_start",
        disable_dropout=True,  # the policy and its reference must score a pair alike at step 0
        gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False})


def _trainer_class():
    from trl import DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        """DPOTrainer for examples this module tokenized: TRL's preparation (prompt extraction, EOS
        text, its own tokenizer call) is skipped where the columns are already token ids."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(dataset.column_names):
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    return PretokenizedDPOTrainer


def build_dpo_trainer(model, tokenizer, train_examples: list[dict], val_examples: list[dict], config, callbacks=()):
    """The trainer for a PeftModel whose "default" adapter is the (trainable) Stage 1 adapter; no
    ref_model and no peft_config, so TRL makes the frozen "ref" copy (see the module docstring)."""
    from datasets import Dataset

    val = Dataset.from_list(val_examples) if val_examples else None
    trainer = _trainer_class()(model=model, args=config, train_dataset=Dataset.from_list(train_examples), eval_dataset=val,
                               processing_class=tokenizer, callbacks=list(callbacks))
    if REFERENCE_ADAPTER not in trainer.model.peft_config:  # TRL skips the copy for some peft set-ups: never silently
        raise RuntimeError("DPOTrainer made no frozen 'ref' copy of the Stage 1 adapter; the reference would be the base model")
    return trainer


def save_policy_adapter(model, folder) -> Path:
    """The trained adapter only (peft's "default"), as a standalone adapter folder; the frozen
    reference copy stays out of it."""
    model.save_pretrained(str(folder), selected_adapters=[POLICY_ADAPTER])
    return Path(folder)


def plot_dpo_curves(guard, path, title: str = "Stage 2 DPO") -> Path:
    """Two panels: the DPO loss (train, eval) and the reward margin (train, eval) per optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, margin_ax) = plt.subplots(1, 2, figsize=(11, 4))
    panels = ((loss_ax, ((guard.train_history, "loss", "-", "train"), (guard.eval_history, "eval_loss", "o-", "eval")),
               "DPO loss (ln 2 = no preference yet)"),
              (margin_ax, ((guard.metric_history.get("rewards/margins", []), "rewards/margins", "-", "train"),
                           (guard.metric_history.get("eval_rewards/margins", []), "eval_rewards/margins", "o-", "eval")),
               "reward margin: beta * (chosen - rejected log-ratio)"))
    for ax, series, ylabel in panels:
        for history, key, style, label in series:
            if history:
                ax.plot([h["step"] for h in history], [h[key] for h in history], style, label=label)
        ax.set(xlabel="optimizer step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
