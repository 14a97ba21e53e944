"""Stage 1 SFT: QLoRA on the gated self-generated dataset, loss on response tokens only.

    python scripts/train_stage1_sft.py --data data/stage1_sft_data.jsonl --output checkpoints/stage1_sft

Refuses (exit 3, before any model is loaded) a dataset whose manifest is missing, failed QC, vouches
for another file or no longer matches the file's sha256. Bad records exit 2 naming file:line.
Writes <output>/checkpoints/checkpoint-N (resume with --resume), <output>/final_adapter,
<output>/training_manifest.json, <output>/loss_curve.png and, last, final_adapter/TRAINING_SUCCESS.
A NaN/inf loss exits 1 naming the step; SIGTERM saves a checkpoint and exits 143.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from utils.exit_codes import EXIT_OK, BadInputError, RefusedError, run_cli  # noqa: E402

EXIT_SIGTERM = 143


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--data", type=Path, default=Path("data/stage1_sft_data.jsonl"), help="JSONL with id, instruction, response")
    add("--data-manifest", type=Path, default=None,
        help="manifest vouching for --data (default: <stem>.manifest.json, else session_manifest.json beside it)")
    add("--model", default=None, help="base model folder, .gguf file or hub id (default: bundled gemma-3-270m)")
    add("--output", type=Path, default=Path("checkpoints/stage1_sft"), help="output folder")
    add("--epochs", type=float, default=3, help="training epochs")
    add("--lr", type=float, default=2e-4, help="peak learning rate (AdamW, linear decay)")
    add("--per-device-batch-size", type=int, default=1, help="examples per device per micro-batch")
    add("--grad-accum", type=int, default=8, help="gradient accumulation steps")
    add("--lora-r", type=int, default=16, help="LoRA rank")
    add("--lora-alpha", type=int, default=16, help="LoRA alpha")
    add("--lora-dropout", type=float, default=0.1, help="LoRA dropout")
    add("--lora-target-modules", default="all-linear", help="'all-linear' or a comma-separated list of module names")
    add("--val-fraction", type=float, default=0.05, help="seeded validation split (at least 1 record when >= 2 records)")
    add("--max-seq-length", type=int, default=512, help="tokens per example (longer ones are cut at the end)")
    add("--seed", type=int, default=42, help="seed for the split, LoRA init and data order")
    add("--quantization", choices=["auto", "4bit", "none"], default="auto",
        help="base weights: 4bit = bitsandbytes NF4 (QLoRA); auto = 4bit where CUDA is present, none on a CPU-only machine")
    add("--4bit", dest="quantization", action="store_const", const="4bit", default=argparse.SUPPRESS, help="same as --quantization 4bit")
    add("--no-4bit", dest="quantization", action="store_const", const="none", default=argparse.SUPPRESS, help="same as --quantization none")
    add("--padding-free", action=argparse.BooleanOptionalAction, default=None,
        help="flatten each batch into one row with per-example position_ids (default auto: on with CUDA and "
             "batch > 1 where the attention supports it; else padded batches)")
    add("--gradient-checkpointing", choices=["auto", "on", "off"], default="auto",
        help="recompute activations in backward to save memory; auto = on for models of 1B+ parameters")
    add("--packing", action="store_true", help="pack examples into --max-seq-length rows (TRL bfd; loss mask kept; implies padding-free)")
    add("--resume", action="store_true", help="continue from the newest complete checkpoint in <output>/checkpoints")
    add("--save-steps", type=int, default=100, help="checkpoint (and eval) every N optimizer steps")
    add("--save-total-limit", type=int, default=3, help="checkpoints kept on disk")
    add("--logging-steps", type=int, default=10, help="log (and NaN-check) the loss every N optimizer steps")
    add("--max-steps", type=int, default=-1, help="stop after N optimizer steps (-1: run --epochs)")
    add("--allow-instruct-model", action="store_true", help="override the loader's instruct-model refusal (recorded)")
    args = parser.parse_args(argv)
    positive = ("epochs", "lr", "per_device_batch_size", "grad_accum", "lora_r", "lora_alpha", "max_seq_length",
                "save_steps", "logging_steps", "save_total_limit")
    bad = [name for name in positive if getattr(args, name) <= 0]
    if bad or not 0 <= args.val_fraction < 1 or not 0 <= args.lora_dropout < 1:
        raise BadInputError(f"bad value(s): {', '.join('--' + b.replace('_', '-') for b in bad) or '--val-fraction/--lora-dropout'}")
    return args


def gate(args) -> tuple[Path, dict]:
    from utils.provenance_helper import find_dataset_manifest, require_upstream_manifest

    manifest_path = args.data_manifest or find_dataset_manifest(args.data)
    if manifest_path is None:
        raise RefusedError(f"training data: no manifest found for {args.data} (looked for {args.data.stem}.manifest.json "
                           "and session_manifest.json beside it); run the pilot/scale stage or pass --data-manifest")
    return Path(manifest_path), require_upstream_manifest(manifest_path, "training data", expected_data=args.data)


def main(args: argparse.Namespace) -> int:
    manifest_path, data_manifest = gate(args)  # exit 3 before anything is loaded
    from utils.provenance_helper import (create_artifact_metadata, create_session_manifest, read_manifest, sha256_file,
                                  write_manifest_atomic)

    data_sha = sha256_file(args.data)
    import torch

    from utils.clean_model_loader import CleanModelLoader
    from utils import sft_training as sft

    records = sft.load_sft_records(args.data)
    ckpt_dir, adapter_dir = args.output / "checkpoints", args.output / "final_adapter"
    resume_from = sft.latest_complete_checkpoint(ckpt_dir) if ckpt_dir.exists() else None
    if resume_from is not None and not args.resume:
        raise BadInputError(f"{ckpt_dir} already holds {resume_from.name}; pass --resume to continue, or choose another --output")
    if args.resume:
        print(f"[train] {'resuming from ' + str(resume_from) if resume_from else 'no complete checkpoint; starting fresh'}", flush=True)
    (adapter_dir / "TRAINING_SUCCESS").unlink(missing_ok=True)  # a stale marker must not vouch for this run
    identity_path = args.output / "run_identity.json"
    if resume_from is not None and identity_path.exists():
        recorded = read_manifest(identity_path)
        if recorded.get("dataset_sha256") != data_sha or recorded.get("model") != args.model:
            raise RefusedError(f"--resume: {resume_from} was trained on dataset {recorded.get('dataset_sha256', '?')[:12]}... "
                               f"with model {recorded.get('model')!r}, not on this dataset/model; use another --output")
    write_manifest_atomic(identity_path, {"dataset_sha256": data_sha, "dataset": str(args.data), "model": args.model})

    quantization = args.quantization if args.quantization != "auto" else ("4bit" if torch.cuda.is_available() else "none")
    model, tokenizer, provenance = CleanModelLoader(args.model, load_in_4bit=quantization == "4bit",
                                                    allow_instruct_model=args.allow_instruct_model).load()
    checkpointing = sft.resolve_gradient_checkpointing(args.gradient_checkpointing, model)
    if quantization == "4bit":
        model = sft.prepare_quantized_model(model, checkpointing)
    train_records, val_records = sft.split_train_val(records, args.val_fraction, args.seed)
    train_examples, train_stats = sft.build_sft_examples(tokenizer, train_records, args.max_seq_length, str(args.data))
    val_examples, val_stats = sft.build_sft_examples(tokenizer, val_records, args.max_seq_length, str(args.data))
    if not train_examples:
        raise BadInputError(f"{args.data}: no training example fits --max-seq-length {args.max_seq_length}")
    padding_free, padding_note = sft.resolve_padding_free(args.padding_free, model, args.per_device_batch_size, args.packing)
    print(f"[train] {len(train_examples)} train / {len(val_examples)} validation examples; quantization {quantization}; "
          f"padding-free {padding_note}; gradient checkpointing {'on' if checkpointing else 'off'}", flush=True)

    config = sft.build_sft_config(
        ckpt_dir, epochs=args.epochs, lr=args.lr, batch_size=args.per_device_batch_size, grad_accum=args.grad_accum,
        max_steps=args.max_steps, save_steps=args.save_steps, logging_steps=args.logging_steps, seed=args.seed,
        padding_free=padding_free, packing=args.packing, max_seq_length=args.max_seq_length,
        has_eval=bool(val_examples), save_total_limit=args.save_total_limit, gradient_checkpointing=checkpointing)
    lora_config = sft.make_lora_config(args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules)
    guard = sft.TrainingGuardCallback()
    trainer = sft.build_trainer(model, tokenizer, train_examples, val_examples, config, lora_config, [guard])
    previous_handler = sft.install_sigterm_handler(guard)
    start = time.time()
    try:
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    if guard.stop_requested:
        print(f"[train] stopped by SIGTERM; checkpoint saved at step {guard.stopped_at_step} in {ckpt_dir}; "
              "rerun with --resume", file=sys.stderr, flush=True)
        return EXIT_SIGTERM
    train_seconds = result.metrics.get("train_runtime") or (time.time() - start)
    last_eval = guard.eval_history[-1] if guard.eval_history else {}
    if last_eval.get("step") == trainer.state.global_step:  # the last save step already evaluated
        eval_metrics = {"eval_loss": last_eval["eval_loss"]}
    else:
        eval_metrics = trainer.evaluate() if val_examples else {}
    if not trainer.is_world_process_zero():
        return EXIT_OK

    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    trainer.model.save_pretrained(adapter_dir)
    curve = sft.plot_loss_curve(guard.train_history, guard.eval_history, args.output / "loss_curve.png",
                                title=f"Stage 1 SFT: {provenance.get('model_id')}")
    resolved = {**vars(args), "quantization_resolved": quantization, "padding_free_resolved": padding_free,
                "padding_free_reason": padding_note, "data_manifest": str(manifest_path)}
    manifest = create_session_manifest(
        "train_sft", resolved, inputs={"data": args.data, "data_manifest": manifest_path},
        outputs={"adapter_weights": adapter_dir / "adapter_model.safetensors", "adapter_config": adapter_dir / "adapter_config.json",
                 "loss_curve": curve},
        dataset={"path": str(args.data), "sha256": data_sha, "manifest": str(manifest_path),
                 "manifest_qc": data_manifest.get("qc"), "train": train_stats, "validation": val_stats},
        base_model_provenance=provenance,
        lora={"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout, "target_modules": args.lora_target_modules},
        sft_config=config.to_dict(),
        loss_history={"train": guard.train_history, "eval": guard.eval_history},
        final_eval_loss=eval_metrics.get("eval_loss"), final_train_loss=result.training_loss,
        global_step=trainer.state.global_step, resumed_from=str(resume_from) if resume_from else None,
        train_tokens=guard.num_tokens, train_seconds=round(train_seconds, 2),
        tokens_per_second=round(guard.num_tokens / train_seconds, 1) if train_seconds > 0 else None,
        world_size=int(os.environ.get("WORLD_SIZE", "1")))
    write_manifest_atomic(args.output / "training_manifest.json", manifest)
    marker = create_artifact_metadata(
        "lora_adapter", "train_stage1_sft.py", model_name=provenance.get("model_id"), loader_provenance=provenance,
        dataset_sha256=data_sha, dataset_path=str(args.data), data_manifest=str(manifest_path),
        training_manifest=str(args.output / "training_manifest.json"), global_step=trainer.state.global_step,
        final_eval_loss=eval_metrics.get("eval_loss"), quantization=quantization)
    write_manifest_atomic(adapter_dir / "TRAINING_SUCCESS", marker)
    print(f"[train] done: {trainer.state.global_step} steps, eval loss {eval_metrics.get('eval_loss')}; adapter in {adapter_dir}")
    return EXIT_OK


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
