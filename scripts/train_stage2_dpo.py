"""Stage 2 DPO: TRL DPOTrainer on the gated preference pairs, continuing the Stage 1 adapter with itself as the reference.

    python scripts/train_stage2_dpo.py --pairs artifacts/stage2/preference_pairs.jsonl --output checkpoints/stage2_dpo

Refuses (exit 3, before any model loads) pairs whose manifest is missing, failed its QC gate, vouches
for another file or no longer matches it, and a Stage 1 adapter that is not the one the pairs were
made with (TRAINING_SUCCESS and file hashes). The base model (4-bit NF4 where CUDA is present) gets
the Stage 1 adapter loaded trainable; TRL's DPOTrainer keeps a frozen copy of it as the reference
(utils/dpo_training.py), so the first logged loss is ln 2 and the policy is pulled back towards
Stage 1, not towards the base. --beta (default 0.1) and --lr (default 5e-6) are documented there.
Writes <output>/run_identity.json once every check passed, <output>/checkpoints/checkpoint-N,
<output>/final_adapter (the trained adapter alone), <output>/training_manifest.json,
<output>/dpo_curves.png (loss and reward margin) and, last, final_adapter/TRAINING_SUCCESS. A NaN/inf
loss exits 1 naming the step; SIGTERM saves a checkpoint and exits 143; --resume continues from the
newest complete checkpoint under the same rules as train_stage1_sft.py (exit 3 for other pairs or
another model, exit 2 for changed hyperparameters unless --allow-changed-hyperparameters).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from utils.cli_validation import add_training_run_flags, in_range, parse_training_args, positive_float, positive_int  # noqa: E402
from utils.dpo_training import DEFAULT_BETA, DEFAULT_LR  # noqa: E402
from utils.exit_codes import EXIT_OK, BadInputError, RefusedError, run_cli  # noqa: E402

EXIT_SIGTERM = 143
FRACTION_BELOW_ONE = in_range(float, 0, 1, high_open=True)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--pairs", type=Path, default=Path("artifacts/stage2/preference_pairs.jsonl"), help="preference pairs (id, instruction, chosen, rejected)")
    add("--pairs-manifest", type=Path, default=None, help="manifest vouching for --pairs (default: session_manifest.json beside it)")
    add("--stage1-adapter", type=Path, default=None, help="the Stage 1 adapter to continue (default: the one the pairs were made with)")
    add("--model", default=None, help="base model (default: the one the Stage 1 adapter was trained on)")
    add("--output", type=Path, default=Path("checkpoints/stage2_dpo"), help="output folder")
    add("--beta", type=positive_float, default=DEFAULT_BETA, help="DPO beta: how strongly the policy is held to the Stage 1 reference")
    add("--lr", type=positive_float, default=DEFAULT_LR, help="peak learning rate (AdamW, linear decay)")
    add("--epochs", type=positive_float, default=1.0, help="training epochs")
    add("--per-device-batch-size", type=positive_int, default=1, help="pairs per device per micro-batch")
    add("--grad-accum", type=positive_int, default=8, help="gradient accumulation steps")
    add("--val-fraction", type=FRACTION_BELOW_ONE, default=0.05, help="seeded validation split (at least 1 pair when >= 2; 0: none)")
    add("--max-length", type=positive_int, default=512, help="tokens of prompt + response (longer ones are cut at the end)")
    add("--seed", type=in_range(int, 0, 2**32 - 1), default=42, help="seed for the split and data order")
    add("--quantization", choices=["auto", "4bit", "none"], default="auto",
        help="base weights: 4bit = bitsandbytes NF4 (QLoRA); auto = on CUDA the Stage 1 adapter's own (from its training "
             "manifest; else 4bit), none on a CPU-only machine")
    add("--gradient-checkpointing", choices=["auto", "on", "off"], default="auto",
        help="recompute activations in backward to save memory; auto = on for models of 1B+ parameters")
    add_training_run_flags(add)
    return parse_training_args(parser, argv)


@dataclass
class Upstream:
    pairs_sha: str
    manifest_path: Path
    manifest: dict
    stage1: object  # utils.evaluation.TrainedAdapter
    base_model: str | None


def gate(args) -> Upstream:
    """The pairs' manifest (QC passed, this file) and the Stage 1 adapter they were made with; exit 3 otherwise."""
    from utils import evaluation as ev
    from utils.provenance_helper import require_upstream_manifest, sha256_file

    manifest_path = args.pairs_manifest or args.pairs.parent / "session_manifest.json"
    manifest = require_upstream_manifest(manifest_path, "preference pairs", expected_data=args.pairs)
    recorded = manifest.get("stage1_adapter")
    if not isinstance(recorded, dict) or not isinstance(recorded.get("files_sha256"), dict):
        raise RefusedError(f"preference pairs: {manifest_path} records no Stage 1 adapter (not a generate_stage2_preference_data.py manifest?)")
    stage1 = ev.read_adapter(args.stage1_adapter or Path(recorded["path"]))
    if stage1.files_sha256 != recorded["files_sha256"]:
        raise RefusedError(f"{stage1.path} is not the Stage 1 adapter the pairs in {args.pairs} were made with (file hashes differ)")
    return Upstream(sha256_file(args.pairs), Path(manifest_path), manifest, stage1, ev.resolve_base_model(args.model, stage1))


def write_outputs(args, trainer, guard, up: Upstream, run: dict) -> Path:
    """The trained adapter, the curves, the training manifest and, last, the TRAINING_SUCCESS marker."""
    import shutil

    from utils import dpo_training as dpo
    from utils import sft_training as sft
    from utils.provenance_helper import create_artifact_metadata, create_session_manifest, write_manifest_atomic

    adapter_dir, provenance, plan = args.output / "final_adapter", run["provenance"], run["plan"]
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    dpo.save_policy_adapter(trainer.model, adapter_dir)
    files = sft.adapter_file_hashes(adapter_dir)
    curves = dpo.plot_dpo_curves(guard, args.output / "dpo_curves.png", title=f"Stage 2 DPO: {provenance.get('model_id')}")
    train_loss = sft.whole_run_train_loss(guard.train_history, plan.resume_step)
    reference = {"path": str(up.stage1.path), "files_sha256": up.stage1.files_sha256, "role": "starting point and DPO reference"}
    manifest = create_session_manifest(
        "train_dpo", {**vars(args), "model": up.base_model, "quantization_resolved": run["quantization"],
                      "pairs_manifest": str(up.manifest_path), "stage1_adapter": str(up.stage1.path)},
        inputs={"data": args.pairs, "data_manifest": up.manifest_path},
        outputs={"adapter_weights": adapter_dir / "adapter_model.safetensors", "adapter_config": adapter_dir / "adapter_config.json",
                 "curves": curves},
        adapter_files_sha256=files, reference_adapter=reference,
        dataset={"path": str(args.pairs), "sha256": up.pairs_sha, "manifest": str(up.manifest_path), "manifest_qc": up.manifest.get("qc"),
                 "train": run["stats"]["train"], "validation": run["stats"]["validation"]},
        base_model_provenance=provenance, run_identity=run["identity"], hyperparameter_changes=run["identity"]["hyperparameter_changes"],
        lora=up.stage1.manifest.get("lora") if up.stage1.manifest else None, dpo_config=trainer.args.to_dict(),
        loss_history={"train": guard.train_history, "eval": guard.eval_history}, metric_history=guard.metric_history,
        final_eval_loss=run["eval_loss"], final_train_loss=train_loss.pop("loss"), final_train_loss_coverage=train_loss,
        global_step=trainer.state.global_step, resumed_from=str(plan.resume_from) if plan.resume_from else None,
        train_seconds=round(run["seconds"], 2), world_size=int(os.environ.get("WORLD_SIZE", "1")))
    write_manifest_atomic(args.output / "training_manifest.json", manifest)
    marker = create_artifact_metadata(
        "lora_adapter", "train_stage2_dpo.py", model_name=provenance.get("model_id"), loader_provenance=provenance,
        dataset_sha256=up.pairs_sha, dataset_path=str(args.pairs), data_manifest=str(up.manifest_path),
        training_manifest=str(args.output / "training_manifest.json"), global_step=trainer.state.global_step,
        final_eval_loss=run["eval_loss"], quantization=run["quantization"], adapter_files_sha256=files, reference_adapter=reference)
    write_manifest_atomic(adapter_dir / sft.MARKER_NAME, marker)
    return adapter_dir


def main(args: argparse.Namespace) -> int:
    up = gate(args)  # exit 3 before anything is loaded
    from utils import dpo_training as dpo
    from utils import evaluation as ev
    from utils import sft_training as sft
    from utils.clean_model_loader import CleanModelLoader
    from utils.sft_training import load_adapter

    quantization = dpo.resolve_dpo_quantization(args.quantization, up.stage1.manifest)
    records = dpo.load_preference_records(args.pairs)  # exit 2 naming file:line
    hyperparameters = sft.run_hyperparameters(args, quantization, dpo.DPO_RUN_HYPERPARAMETERS)
    plan = sft.check_resume(args.output, args.resume, up.pairs_sha, hyperparameters, args.allow_changed_hyperparameters)
    if args.resume:
        print(f"[dpo] {'resuming from ' + str(plan.resume_from) if plan.resume_from else 'no complete checkpoint; starting fresh'}", flush=True)
    model, tokenizer, provenance = CleanModelLoader(up.base_model, load_in_4bit=quantization == "4bit",
                                                    allow_instruct_model=args.allow_instruct_model).load()
    ev.check_base_identity(provenance, up.stage1.marker)  # exit 3: not the base the Stage 1 adapter was trained on
    sft.check_resumed_model(plan, provenance)
    train_records, val_records = sft.split_train_val(records, args.val_fraction, args.seed)
    train, train_stats = dpo.build_preference_examples(tokenizer, train_records, args.max_length, str(args.pairs))
    val, val_stats = dpo.build_preference_examples(tokenizer, val_records, args.max_length, str(args.pairs))
    if not train:
        raise BadInputError(f"{args.pairs}: no pair fits --max-length {args.max_length}")
    identity = sft.claim_output_folder(plan, args.pairs, up.pairs_sha, provenance, hyperparameters)  # the first write

    checkpointing = sft.resolve_gradient_checkpointing(args.gradient_checkpointing, model)
    if quantization == "4bit":
        model = sft.prepare_quantized_model(model, checkpointing)
    policy = load_adapter(model, up.stage1.path, is_trainable=True)  # the policy: Stage 1's adapter, trainable
    print(f"[dpo] {len(train)} train / {len(val)} validation pairs; beta {args.beta}, lr {args.lr}; quantization {quantization}; "
          f"starting from and referenced to {up.stage1.path}", flush=True)
    config = dpo.build_dpo_config(args, args.output / "checkpoints", has_eval=bool(val), gradient_checkpointing=checkpointing)
    guard = sft.TrainingGuardCallback(metric_keys=dpo.DPO_METRICS)
    trainer = dpo.build_dpo_trainer(policy, tokenizer, train, val, config, [guard])
    seconds = sft.train_with_sigterm_guard(trainer, guard, plan.resume_from)
    if guard.stop_requested:
        print(f"[dpo] stopped by SIGTERM; checkpoint saved at step {guard.stopped_at_step} in {args.output / 'checkpoints'}; "
              "rerun with --resume", file=sys.stderr, flush=True)
        return EXIT_SIGTERM
    eval_loss = sft.final_eval_loss(trainer, guard, has_validation=bool(val))
    if not trainer.is_world_process_zero():
        return EXIT_OK
    run = {"provenance": provenance, "plan": plan, "quantization": quantization, "identity": identity, "seconds": seconds,
           "eval_loss": eval_loss, "stats": {"train": train_stats, "validation": val_stats}}
    adapter_dir = write_outputs(args, trainer, guard, up, run)
    margins = guard.metric_history.get("rewards/margins") or [{}]
    print(f"[dpo] done: {trainer.state.global_step} steps, eval loss {eval_loss}, last reward margin "
          f"{margins[-1].get('rewards/margins')}; adapter in {adapter_dir}")
    return EXIT_OK


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
