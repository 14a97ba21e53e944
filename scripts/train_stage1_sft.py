"""Stage 1 SFT: QLoRA on the gated self-generated dataset, loss on response tokens only.

    python scripts/train_stage1_sft.py --data data/stage1_sft_data.jsonl --output checkpoints/stage1_sft

Refuses (exit 3, before any model is loaded) a dataset whose manifest is missing, failed QC, vouches
for another file or no longer matches the file's sha256. Bad records (a missing field, a repeated
id) exit 2 naming file:line. Writes <output>/run_identity.json once the model has loaded and every
check passed, then <output>/checkpoints/checkpoint-N, <output>/final_adapter,
<output>/training_manifest.json, <output>/loss_curve.png and, last, final_adapter/TRAINING_SUCCESS
(with the sha256 of every adapter file). A NaN/inf loss exits 1 naming the step; SIGTERM saves a
checkpoint and exits 143.

--resume continues from the newest complete checkpoint only where run_identity.json shows it was
trained on this dataset (exit 3 otherwise), this model by content hash, whatever path or name it is
given by (exit 3), and these hyperparameters (exit 2 naming each change, unless
--allow-changed-hyperparameters, which the manifest records). A refused run changes nothing in
--output.

Several GPUs, one rank per GPU holding the whole base (docs/scaling.md; FSDP: configs/accelerate/fsdp_qlora.yaml):
    torchrun --nproc-per-node 2 scripts/train_stage1_sft.py --per-device-batch-size 4 --effective-batch-size 8
    accelerate launch --config_file configs/accelerate/ddp.yaml scripts/train_stage1_sft.py --effective-batch-size 8
A refusal on any rank is the same refusal, same exit code, on every rank (utils.distributed); only rank 0
writes --output. The effective batch (per-device batch x --grad-accum x world size) is recorded in the
manifest; --effective-batch-size N derives --grad-accum = N / (per-device x world size), exit 2 where it
does not divide. --resume compares the effective batch, not its split: a run may resume on another
number of GPUs with the same effective batch.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from utils.cli_validation import add_training_run_flags, add_training_speed_flags, in_range, parse_training_args, positive_float, positive_int  # noqa: E402
from utils.exit_codes import EXIT_OK, BadInputError, RefusedError, run_cli  # noqa: E402

EXIT_SIGTERM = 143
DEFAULT_GRAD_ACCUM = 8  # the source's 1 x 8
SEED_RANGE = in_range(int, 0, 2**32 - 1)  # numpy's seed range, which the Trainer's set_seed uses
FRACTION_BELOW_ONE = in_range(float, 0, 1, high_open=True)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--data", type=Path, default=Path("data/stage1_sft_data.jsonl"), help="JSONL with id, instruction, response")
    add("--data-manifest", type=Path, default=None,
        help="manifest vouching for --data (default: <stem>.manifest.json, else session_manifest.json beside it)")
    add("--model", default=None, help="base model folder, .gguf file or hub id (default: bundled gemma-3-270m)")
    add("--output", type=Path, default=Path("checkpoints/stage1_sft"), help="output folder")
    add("--epochs", type=positive_float, default=3.0, help="training epochs")
    add("--lr", type=positive_float, default=2e-4, help="peak learning rate (AdamW, linear decay)")
    add("--per-device-batch-size", type=positive_int, default=1, help="examples per device per micro-batch")
    add("--grad-accum", type=positive_int, default=argparse.SUPPRESS,
        help=f"gradient accumulation steps (default {DEFAULT_GRAD_ACCUM}, or derived from --effective-batch-size)")
    add("--effective-batch-size", type=positive_int, default=None,
        help="examples per optimizer step over all ranks; derives --grad-accum = N / (per-device batch x world size), "
             "which must divide exactly (default: per-device batch x --grad-accum x world size, as given)")
    add("--lora-r", type=positive_int, default=16, help="LoRA rank")
    add("--lora-alpha", type=positive_int, default=16, help="LoRA alpha")
    add("--lora-dropout", type=FRACTION_BELOW_ONE, default=0.1, help="LoRA dropout")
    add("--lora-target-modules", default="all-linear", help="'all-linear' or a comma-separated list of module names")
    add("--val-fraction", type=FRACTION_BELOW_ONE, default=0.05,
        help="seeded validation split (at least 1 record when >= 2 records; 0: none)")
    add("--max-seq-length", type=positive_int, default=512, help="tokens per example (longer ones are cut at the end)")
    add("--seed", type=SEED_RANGE, default=42, help="seed for the split, LoRA init and data order")
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
    add_training_run_flags(add)
    add_training_speed_flags(add)
    args = parse_training_args(parser, argv)
    try:  # resolved here, so args.grad_accum is what every later step (and the manifest) reads
        args.grad_accum = batch_rule(args).grad_accum
    except BadInputError as err:
        parser.error(str(err))
    return args


def batch_rule(args):
    from utils.distributed import resolve_batch_rule, training_launch

    return resolve_batch_rule(args.per_device_batch_size, getattr(args, "grad_accum", None), args.effective_batch_size,
                              training_launch().world_size, DEFAULT_GRAD_ACCUM)


@dataclass
class TrainingRun:
    """What the outputs record about one run, gathered as main goes along."""

    data_sha: str
    manifest_path: Path
    data_manifest: dict
    quantization: str
    launch: object  # utils.distributed.TrainingLaunch
    rule: object  # utils.distributed.BatchRule
    plan: object = None  # sft_training.ResumePlan
    provenance: dict | None = None
    identity: dict | None = None
    facts: dict | None = None
    seconds: float = 0.0
    eval_loss: float | None = None
    gpu_memory: dict | None = None  # GiB per rank after the load and in training (CUDA only)


def gate(args) -> tuple[Path, dict]:
    from utils.provenance_helper import find_dataset_manifest, require_upstream_manifest

    manifest_path = args.data_manifest or find_dataset_manifest(args.data)
    if manifest_path is None:
        raise RefusedError(f"training data: no manifest found for {args.data} (looked for {args.data.stem}.manifest.json "
                           "and session_manifest.json beside it); run the pilot/scale stage or pass --data-manifest")
    return Path(manifest_path), require_upstream_manifest(manifest_path, "training data", expected_data=args.data)


def load_base_model(args, quantization: str, launch):
    """The whole base on this rank's GPU; under FSDP with the 4-bit weights stored as bf16 (shardable)."""
    from utils.clean_model_loader import CleanModelLoader
    from utils.distributed import FSDP_QUANT_STORAGE

    return CleanModelLoader(args.model, load_in_4bit=quantization == "4bit", allow_instruct_model=args.allow_instruct_model,
                            device=launch.device(), quant_storage=FSDP_QUANT_STORAGE if launch.fsdp and quantization == "4bit" else None).load()


def tokenize_examples(args, tokenizer, records: list[dict]) -> dict:
    """Seeded train/validation split, pre-tokenized; a record the prompt guards refuse exits 2 (file:line)."""
    from utils import sft_training as sft

    train_records, val_records = sft.split_train_val(records, args.val_fraction, args.seed)
    train_examples, train_stats = sft.build_sft_examples(tokenizer, train_records, args.max_seq_length, str(args.data))
    val_examples, val_stats = sft.build_sft_examples(tokenizer, val_records, args.max_seq_length, str(args.data))
    if not train_examples:
        raise BadInputError(f"{args.data}: no training example fits --max-seq-length {args.max_seq_length}")
    return {"train": train_examples, "validation": val_examples, "stats": {"train": train_stats, "validation": val_stats}}


def build_trainer(args, model, tokenizer, examples: dict, quantization: str, launch):
    """The trainer, its guard callbacks and the facts the manifest records about the run's layout."""
    from utils import sft_training as sft
    from utils.distributed import sync_stop_callback

    checkpointing = sft.resolve_gradient_checkpointing(args.gradient_checkpointing, model)
    if quantization == "4bit" and not launch.fsdp:  # FSDP: peft's fp32 casts would mix dtypes in FSDP's flat parameters
        model = sft.prepare_quantized_model(model, checkpointing, upcast=args.kbit_upcast)
    train_examples, val_examples = examples["train"], examples["validation"]
    padding_free, padding_note = sft.resolve_padding_free(args.padding_free, model, args.per_device_batch_size, args.packing)
    print(f"[train] {len(train_examples)} train / {len(val_examples)} validation examples; quantization {quantization}; "
          f"padding-free {padding_note}; gradient checkpointing {'on' if checkpointing else 'off'}", flush=True)
    config = sft.build_sft_config(args, args.output / "checkpoints", padding_free=padding_free,
                                  has_eval=bool(val_examples), gradient_checkpointing=checkpointing)
    lora_config = sft.make_lora_config(args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules)
    guard = sft.TrainingGuardCallback()
    trainer = sft.build_trainer(model, tokenizer, train_examples, val_examples, config, lora_config,
                                [guard, sync_stop_callback(guard, launch)], cuda_graphs=args.cuda_graphs)
    facts = {**examples["stats"], "padding_free": padding_free, "padding_free_reason": padding_note}
    return trainer, guard, facts


def graph_counts(trainer) -> dict | None:
    """--cuda-graphs: shapes captured, steps replayed and steps run eagerly (None without the flag)."""
    step = getattr(trainer, "graphed_step", None)
    return dict(step.counts) if step is not None else None


def write_outputs(args, trainer, guard, run: TrainingRun, adapter_state=None) -> Path:
    """Adapter, loss curve, training manifest and, last, the TRAINING_SUCCESS marker (rank 0 only).
    `adapter_state`: the adapter gathered from every FSDP rank (utils.distributed.adapter_state_dict)."""
    import shutil

    from utils import sft_training as sft
    from utils.provenance_helper import create_artifact_metadata, create_session_manifest, write_manifest_atomic

    adapter_dir, provenance, plan, facts = args.output / "final_adapter", run.provenance, run.plan, run.facts
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    if adapter_state is None:
        trainer.model.save_pretrained(adapter_dir)
    else:
        trainer.accelerator.unwrap_model(trainer.model).save_pretrained(adapter_dir, state_dict=adapter_state)
    adapter_files = sft.adapter_file_hashes(adapter_dir)
    curve = sft.plot_loss_curve(guard.train_history, guard.eval_history, args.output / "loss_curve.png",
                                title=f"Stage 1 SFT: {provenance.get('model_id')}")
    train_loss = sft.whole_run_train_loss(guard.train_history, plan.resume_step)
    resolved = {**vars(args), "quantization_resolved": run.quantization, "padding_free_resolved": facts["padding_free"],
                "padding_free_reason": facts["padding_free_reason"], "data_manifest": str(run.manifest_path)}
    manifest = create_session_manifest(
        "train_sft", resolved, inputs={"data": args.data, "data_manifest": run.manifest_path},
        outputs={"adapter_weights": adapter_dir / "adapter_model.safetensors", "adapter_config": adapter_dir / "adapter_config.json",
                 "loss_curve": curve},
        adapter_files_sha256=adapter_files,
        dataset={"path": str(args.data), "sha256": run.data_sha, "manifest": str(run.manifest_path),
                 "manifest_qc": run.data_manifest.get("qc"), "train": facts["train"], "validation": facts["validation"]},
        base_model_provenance=provenance, run_identity=run.identity,
        hyperparameter_changes=run.identity["hyperparameter_changes"],
        lora={"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout, "target_modules": args.lora_target_modules},
        sft_config=trainer.args.to_dict(),
        loss_history={"train": guard.train_history, "eval": guard.eval_history},
        final_eval_loss=run.eval_loss, final_train_loss=train_loss.pop("loss"), final_train_loss_coverage=train_loss,
        global_step=trainer.state.global_step, resumed_from=str(plan.resume_from) if plan.resume_from else None,
        train_tokens=guard.num_tokens, train_seconds=round(run.seconds, 2),
        tokens_per_second=round(guard.num_tokens / run.seconds, 1) if run.seconds > 0 else None,
        world_size=run.launch.world_size, effective_batch_size=run.rule.effective_batch_size, batch_rule=run.rule.as_dict(),
        launch=run.launch.as_dict(), gpu_memory_gib_per_rank=run.gpu_memory, cuda_graph_steps=graph_counts(trainer))
    write_manifest_atomic(args.output / "training_manifest.json", manifest)
    marker = create_artifact_metadata(
        "lora_adapter", "train_stage1_sft.py", model_name=provenance.get("model_id"), loader_provenance=provenance,
        dataset_sha256=run.data_sha, dataset_path=str(args.data), data_manifest=str(run.manifest_path),
        training_manifest=str(args.output / "training_manifest.json"), global_step=trainer.state.global_step,
        final_eval_loss=run.eval_loss, quantization=run.quantization, adapter_files_sha256=adapter_files,
        world_size=run.launch.world_size, effective_batch_size=run.rule.effective_batch_size)
    write_manifest_atomic(adapter_dir / sft.MARKER_NAME, marker)
    return adapter_dir


def prepare(args, launch) -> tuple:
    """Every check that can refuse, before anything in --output changes (run on every rank)."""
    manifest_path, data_manifest = gate(args)  # exit 3 before anything is loaded
    from utils import sft_training as sft
    from utils.provenance_helper import sha256_file

    run = TrainingRun(sha256_file(args.data), manifest_path, data_manifest, sft.resolve_quantization(args.quantization), launch,
                      batch_rule(args))
    records = sft.load_sft_records(args.data)  # exit 2 naming file:line
    # The effective batch, not its split over ranks and accumulation, is what a resume must keep.
    names = tuple(name for name in sft.RUN_HYPERPARAMETERS if name not in ("per_device_batch_size", "grad_accum"))
    hyperparameters = {**sft.run_hyperparameters(args, run.quantization, names), "effective_batch_size": run.rule.effective_batch_size}
    run.plan = sft.check_resume(args.output, args.resume, run.data_sha, hyperparameters, args.allow_changed_hyperparameters)
    model, tokenizer, run.provenance = load_base_model(args, run.quantization, launch)
    sft.check_resumed_model(run.plan, run.provenance)  # exit 3: other weights, whatever they are called
    examples = tokenize_examples(args, tokenizer, records)  # the last refusal (exit 2): it needs the tokenizer
    return run, hyperparameters, model, tokenizer, examples


def main(args: argparse.Namespace) -> int:
    from utils.distributed import training_launch

    launch = training_launch()
    return launch.run(lambda: train(args, launch))


def train(args, launch) -> int:
    from utils import sft_training as sft
    from utils.distributed import adapter_state_dict, gpu_memory_gib

    run, hyperparameters, model, tokenizer, examples = launch.agree(lambda: prepare(args, launch), "the checks before training")
    launch.same_on_every_rank((run.data_sha, str(run.plan.resume_from)), "the dataset and the checkpoint to resume from")
    run.gpu_memory = {"load": gpu_memory_gib(launch, reset_peak=True)}  # every rank holds the whole base here, FSDP too
    if args.resume and launch.is_main:
        print(f"[train] {'resuming from ' + str(run.plan.resume_from) if run.plan.resume_from else 'no complete checkpoint; starting fresh'}",
              flush=True)
    if launch.is_main:
        print(f"[train] {launch.world_size} rank(s), {launch.parallelism}; effective batch {run.rule.effective_batch_size} = "
              f"{run.rule.per_device_batch_size} per device x {run.rule.grad_accum} accumulated x {run.rule.world_size}", flush=True)
    run.identity = launch.agree(  # the first write, by rank 0 alone; the other ranks wait for it
        lambda: sft.claim_output_folder(run.plan, args.data, run.data_sha, run.provenance, hyperparameters) if launch.is_main else None,
        "to claim --output")

    trainer, guard, run.facts = build_trainer(args, model, tokenizer, examples, run.quantization, launch)
    run.seconds = sft.train_with_sigterm_guard(trainer, guard, run.plan.resume_from)
    if guard.stop_requested:
        print(f"[train] stopped by SIGTERM; checkpoint saved at step {guard.stopped_at_step} in {args.output / 'checkpoints'}; "
              "rerun with --resume", file=sys.stderr, flush=True)
        return EXIT_SIGTERM
    run.eval_loss = sft.final_eval_loss(trainer, guard, has_validation=bool(run.facts["validation"]["examples"]))
    adapter_state = adapter_state_dict(trainer)  # collectives: every rank
    run.gpu_memory["training"] = gpu_memory_gib(launch)
    adapter_dir = launch.agree(lambda: write_outputs(args, trainer, guard, run, adapter_state) if launch.is_main else None,
                               "to write the outputs")
    if launch.is_main:
        graphs = graph_counts(trainer)
        print(f"[train] done: {trainer.state.global_step} steps, eval loss {run.eval_loss}; adapter in {adapter_dir}"
              + (f"; CUDA graphs: {graphs['captured']} shapes captured, {graphs['replayed']} steps replayed, "
                 f"{graphs['eager']} eager" if graphs else ""))
    return EXIT_OK


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
