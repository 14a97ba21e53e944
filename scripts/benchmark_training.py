"""QLoRA training throughput: today's training step against each speed option, in one run, with MFU and losses.

    python scripts/benchmark_training.py --models bundled --output results/bt/benchmark_training.json --profile plain   # GPU
    python scripts/benchmark_training.py --models tiny --steps 4 --warmup-steps 1 --output /tmp/bt.json   # CPU smoke run

For each model, the same seeded synthetic examples (prompt and completion lengths like the pipeline's pairs,
completion-only loss) train through `utils.sft_training` as train_stage1_sft.py does (TRL SFTTrainer, LoRA r16
all-linear, per-device batch --batch-size x accumulation 1, lr 2e-4, one epoch of exactly --steps steps, the guard
callback), once per configuration; each is the training flag of the same name on top of `plain`:

  plain            today's step: 4-bit NF4 base prepared by peft (non-4-bit weights in fp32), padded batches in
                   random order, eager PyTorch, loss logged (a GPU sync) every 10 steps
  padding_free     --padding-free: each batch flattened into one row (block-diagonal mask with SDPA)
  packing          --packing: TRL bfd packing (more examples per step: NOT the same semantics)
  no_upcast        --no-kbit-upcast: embedding/output projection and norms stay bf16
  group_by_length  --group-by-length: batches of similar lengths, less padding
  rare_logging     --logging-steps = --steps: one loss fetch per run instead of one per 10 steps
  torch_compile    --torch-compile model: the whole model, dynamic shapes (the warm-up steps pay the compilation:
                   see warmup_s)
  compile_regional --torch-compile regional: each decoder layer class compiled once (accelerate), dynamic shapes
  liger            --liger-kernel (needs CUDA and the optional liger-kernel; skipped with the reason otherwise)
  lora_16bit       --quantization none: LoRA on the 16-bit base (a comparison; QLoRA stays the default)
  fast             no_upcast + group_by_length + compile_regional: the options that keep the semantics and combine (Liger under compile failed)
  eager_16bit      lora_16bit + group_by_length + liger: no compilation to wait for
  fast_16bit       lora_16bit + group_by_length + compile_regional
  no_cudnn_attention  --no-cudnn-attention: attention without cuDNN's per-shape execution plans
  lean_16bit       lora_16bit + group_by_length + no_cudnn_attention: nothing to compile, nothing optional to install
  lean_compiled    lean_16bit + compile_regional
  graphed_16bit    lean_16bit + --cuda-graphs: each batch shape's forward and backward replayed from a CUDA graph
                   (batches padded to a multiple of 64 tokens; needs CUDA, skipped with the reason otherwise)
  graphed_4bit     group_by_length + no_cudnn_attention + --cuda-graphs on the 4-bit base

Per row: tokens/s of real (non-pad) tokens over the steps after --warmup-steps (TRL's own count), the warm-up's
seconds, the padded share of the timed batches, MFU, the mean training loss, the evaluation loss on
--eval-examples held-out examples in one batch (so batching does not change its value: options that keep the math
should match plain closely) and that evaluation's seconds (the second of two: the first may compile), peak
memory; `x plain` compares with `plain` of the same run. An untimed run of the first configuration goes first,
so one-time costs (bitsandbytes' Triton kernels, cuBLAS, the allocator) fall on no row. group_by_length sorts each
group of --steps/4 batches longest first; with --steps = 4 x --warmup-steps (the defaults) the warm-up is exactly
the first group and the timed steps are three whole groups (`length_groups_aligned`), else its ratio is biased.

MFU = tokens/s x FLOPs per token / peak. FLOPs per real token = 4N + 6L: the frozen base's forward (2N) and the
backward through its activations (2N), N = every matmul weight of the base including the output projection
(embedding lookups are no matmul; attention scores, < 2% at these lengths, are left out), plus LoRA's forward,
backward and weight gradients (6L, L = LoRA parameters). TRL's fused LM head projects only completion positions
on CUDA, so this counts more work than runs. Peak: --peak-tflops, else the bf16 dense peak of the device by name
(PEAK_BF16_TFLOPS: H100 SXM 989; none on a CPU).

--profile CONFIG: one more short run of that configuration under torch.profiler (--warmup-steps skipped, then
--profile-steps recorded) writes <output stem>_profile_<model>_<config>.txt beside --output (top ops by device and by
CPU time, kernel launches and syncs per step, device-busy share) and a summary under "profiles" in the JSON.
Configurations that use Liger run last (Liger patches transformers' modelling code for the rest of the process);
a failed configuration is recorded with its error and the run goes on (exit 1 at the end).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from utils.cli_validation import non_negative_int, positive_float, positive_int  # noqa: E402
from utils.exit_codes import run_cli  # noqa: E402

OPTIONS = dict(padding_free=False, packing=False, kbit_upcast=True, group_by_length=False, rare_logging=False,
               torch_compile="off", liger_kernel=False, quantization=None, cudnn_attention=True, cuda_graphs=False)
CONFIGURATIONS = {"plain": {}, "padding_free": dict(padding_free=True), "packing": dict(padding_free=True, packing=True),
                  "no_upcast": dict(kbit_upcast=False), "group_by_length": dict(group_by_length=True),
                  "rare_logging": dict(rare_logging=True), "torch_compile": dict(torch_compile="model"),
                  "compile_regional": dict(torch_compile="regional"), "liger": dict(liger_kernel=True), "lora_16bit": dict(quantization="none"),
                  # Liger stays out: its RMSNorm inside a compiled region failed (dynamo AssertionError, H200, 2026-11-27).
                  "fast": dict(kbit_upcast=False, group_by_length=True, torch_compile="regional"),
                  "eager_16bit": dict(quantization="none", group_by_length=True, liger_kernel=True),
                  "fast_16bit": dict(quantization="none", group_by_length=True, torch_compile="regional"),
                  "no_cudnn_attention": dict(cudnn_attention=False),
                  "lean_16bit": dict(quantization="none", group_by_length=True, cudnn_attention=False),
                  "lean_compiled": dict(quantization="none", group_by_length=True, cudnn_attention=False, torch_compile="regional"),
                  "graphed_16bit": dict(quantization="none", group_by_length=True, cudnn_attention=False, cuda_graphs=True),
                  "graphed_4bit": dict(group_by_length=True, cudnn_attention=False, cuda_graphs=True)}
DEFAULT_CONFIGURATIONS = [name for name in CONFIGURATIONS if name not in ("padding_free", "packing")]
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))
_LAUNCHES = {"cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx"}
_SYNCS = {"cudaStreamSynchronize", "cudaEventSynchronize"}  # not cudaDeviceSynchronize: the benchmark's own time marks


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--models", nargs="+", default=["bundled", "qwen7b"], choices=["bundled", "qwen7b", "tiny"], help="models to measure")
    add("--configurations", nargs="+", default=DEFAULT_CONFIGURATIONS, choices=list(CONFIGURATIONS), help="configurations (see above)")
    add("--quantization", choices=["auto", "4bit", "none"], default="auto", help="base weights of every configuration but "
        "lora_16bit: auto = 4bit with CUDA, none on a CPU")
    add("--batch-size", type=positive_int, default=8, help="examples per micro-batch (gradient accumulation 1)")
    add("--steps", type=positive_int, default=32, help="optimizer steps per configuration (one epoch of batch-size x steps examples)")
    add("--warmup-steps", type=non_negative_int, default=8, help="leading steps left out of the timing (4 x this = --steps "
        "keeps group_by_length unbiased)")
    add("--prompt-tokens", nargs=2, type=positive_int, default=[15, 45], metavar=("MIN", "MAX"), help="synthetic prompt lengths")
    add("--completion-tokens", nargs=2, type=positive_int, default=[5, 120], metavar=("MIN", "MAX"), help="synthetic completion lengths")
    add("--eval-examples", type=positive_int, default=97, help="held-out examples evaluated (in one batch) after each configuration")
    add("--max-seq-length", type=positive_int, default=512, help="packing row length")
    add("--gradient-checkpointing", choices=["auto", "on", "off"], default="auto", help="as in train_stage1_sft.py")
    add("--peak-tflops", type=positive_float, default=None, help="bf16 dense peak for MFU (default: by device name)")
    add("--profile", choices=list(CONFIGURATIONS), default=None, help="also profile this configuration (torch.profiler)")
    add("--profile-steps", type=positive_int, default=5, help="steps recorded by --profile")
    add("--bundled-model", default=None, help="model measured as `bundled` (default: the loader's bundled gemma-3-270m)")
    add("--tiny-model", default=None, help="model folder measured as `tiny` (default: a 2-layer random model)")
    add("--scratch-dir", type=Path, default=Path("/tmp/stage1_benchmark_training"), help="random-init model folder and trainer output")
    add("--output", type=Path, default=Path("results/benchmark_training.json"), help="JSON output (rewritten after every row)")
    args = parser.parse_args(argv)
    if args.warmup_steps >= args.steps:
        parser.error(f"argument --warmup-steps: {args.warmup_steps} leaves no timed step of --steps {args.steps}")
    for flag in ("prompt_tokens", "completion_tokens"):
        if getattr(args, flag)[0] > getattr(args, flag)[1]:
            parser.error(f"argument --{flag.replace('_', '-')}: MIN {getattr(args, flag)[0]} > MAX {getattr(args, flag)[1]}")
    return args


def synthetic_examples(count: int, vocab: int, seed: int = 0, prompt=(15, 45), completion=(5, 120)) -> list[dict]:
    """Pre-tokenized prompt+completion examples with the pipeline's typical lengths; token values do not change the speed."""
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        n_prompt, n_completion = rng.randint(*prompt), rng.randint(*completion)
        ids = [rng.randrange(min(1000, vocab // 2), vocab) for _ in range(n_prompt + n_completion)]
        examples.append({"input_ids": ids, "completion_mask": [0] * n_prompt + [1] * n_completion})
    return examples


def load_model(name: str, quantize: bool, scratch: Path, tiny_model: str | None = None, bundled_model: str | None = None):
    """Every model goes through `CleanModelLoader`, so the 4-bit path is the one training uses."""
    from utils.clean_model_loader import CleanModelLoader

    source = {"bundled": bundled_model, "tiny": tiny_model}.get(name)
    if source is None and name != "bundled":
        source = str(_random_model_folder(name, scratch / name))
    model, tokenizer, _ = CleanModelLoader(source, load_in_4bit=quantize, run_sentinels=False).load()
    return model, tokenizer


def _random_model_folder(name: str, folder: Path) -> Path:
    """A random-init model saved once, with a small byte-level BPE tokenizer (only its special
    tokens matter: the examples are token ids already)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from benchmark_generation import QWEN7B_SHAPE

    if (folder / "config.json").exists():
        return folder
    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    backend.train_from_iterator(["a random model for throughput only"], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    special = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if name == "qwen7b":
        config, cls = Qwen2Config(**QWEN7B_SHAPE, **special), Qwen2ForCausalLM
    else:
        config, cls = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=2048, **special), LlamaForCausalLM
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = cls(config).to(torch.bfloat16)
    partial = folder.with_name(folder.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(folder)  # a killed save never looks complete
    return folder


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class _StepClock:
    """Wall time, TRL's running count of real tokens and the collator's padded count at the start, after the
    warm-up steps and after the last step; it syncs the GPU at those marks only (no per-step sync)."""

    def __init__(self, warmup_steps: int, profile_steps: int = 0):
        import torch
        from transformers import TrainerCallback

        clock, self.trainer, self.padded, self.marks, self.profiler = self, None, [], {}, None
        if profile_steps:  # skip the warm-up, one profiler warm-up step, then the recorded steps
            activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.profiler = torch.profiler.profile(activities=activities, schedule=torch.profiler.schedule(
                wait=warmup_steps, warmup=1, active=profile_steps, repeat=1))
        start, end = (warmup_steps + 1, warmup_steps + 1 + profile_steps) if profile_steps else (warmup_steps, None)

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                clock._mark("begin")
                if clock.profiler:
                    clock.profiler.start()

            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == start:  # marked before the profiler's step: its sync is not recorded
                    clock._mark("timed")
                if state.global_step == (end or state.max_steps):
                    clock._mark("end")
                if clock.profiler:
                    clock.profiler.step()

            def on_train_end(self, args, state, control, **kwargs):
                if clock.profiler:
                    clock.profiler.stop()

        self.callback = Callback()

    def _mark(self, name: str):
        _sync()
        count = getattr(self.trainer, "count_pending_tokens", None)  # --cuda-graphs sums the count on the device
        self.marks[name] = (time.perf_counter(), float(count() if count else getattr(self.trainer, "_total_train_tokens", 0)))

    def count_padded(self, collator):
        def counting(features):
            batch = collator(features)
            self.padded.append(int(batch["input_ids"].numel()))  # per batch, in step order, on the CPU: no sync
            return batch
        return counting

    def timed(self, warmup_steps: int, steps: int) -> tuple[float, float, float]:
        """(seconds, real tokens, padded tokens) of the steps after the warm-up. The padded count is taken by
        batch index: the data loader collates a batch ahead of the step that uses it."""
        (t0, tok0), (t1, tok1) = self.marks["timed"], self.marks["end"]
        return t1 - t0, tok1 - tok0, sum(self.padded[warmup_steps:steps])


def peak_tflops(args, environment: dict) -> tuple[float | None, str]:
    """(peak bf16 TFLOP/s for MFU, device name); the name comes from the provenance helper's environment capture."""
    device = (environment.get("gpus") or ["cpu"])[0]
    if args.peak_tflops:
        return args.peak_tflops, device
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS if key in device), None), device


def matmul_parameters(model) -> int:
    """Weights of every nn.Linear of the bare base (bitsandbytes' Linear4bit is one), output projection included."""
    import torch

    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))


def measure(label: str, options: dict, base, tokenizer, data: dict, args, checkpointing: bool, clock: _StepClock,
            timed: bool = True) -> dict:
    """Train one configuration on `base` (its LoRA is unloaded again after) and, for a timed row, evaluate it."""
    import torch
    import transformers

    from utils import sft_training as sft

    settings = argparse.Namespace(epochs=1, lr=2e-4, per_device_batch_size=args.batch_size, grad_accum=1, max_steps=args.steps,
                                  save_steps=10 ** 9, save_total_limit=None, seed=0, max_seq_length=args.max_seq_length,
                                  logging_steps=args.steps if options["rare_logging"] else 10, packing=options["packing"],
                                  group_by_length=options["group_by_length"], torch_compile=options["torch_compile"],
                                  liger_kernel=options["liger_kernel"], cudnn_attention=options["cudnn_attention"],
                                  cuda_graphs=options["cuda_graphs"], eval_steps=None, eval_batch_size=len(data["eval"]))
    config = sft.build_sft_config(settings, args.scratch_dir / f"trainer_{label}", padding_free=options["padding_free"],
                                  has_eval=False, gradient_checkpointing=checkpointing)
    transformers.set_seed(0)  # TRL initialises LoRA before the Trainer seeds: every configuration starts from the same adapter
    trainer = sft.build_trainer(base, tokenizer, data["train"], data["eval"], config, sft.make_lora_config(),
                                [sft.TrainingGuardCallback(), clock.callback], cuda_graphs=options["cuda_graphs"])
    clock.trainer, trainer.data_collator = trainer, clock.count_padded(trainer.data_collator)
    lora = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    try:
        train_loss = trainer.train().training_loss
        if not timed:
            return {}
        timings = []
        for _ in range(2):  # the first evaluation may compile a new shape
            _sync()
            start = time.perf_counter()
            eval_loss = trainer.evaluate()["eval_loss"]
            _sync()
            timings.append(time.perf_counter() - start)
        seconds, tokens, padded = clock.timed(args.warmup_steps, args.steps)
        aligned = {"length_groups_aligned": args.steps == 4 * args.warmup_steps <= 200} if options["group_by_length"] else {}
        return {"tokens_per_s": round(tokens / seconds, 1), "timed_steps": args.steps - args.warmup_steps, "timed_tokens": int(tokens),
                **aligned,
                "padding_share": round(1 - tokens / padded, 3) if padded else None,
                "warmup_s": round(clock.marks["timed"][0] - clock.marks["begin"][0], 2), "lora_parameters": lora,
                "train_loss": round(train_loss, 5), "eval_loss": round(eval_loss, 5), "eval_s": round(timings[-1], 3),
                "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None}
    finally:
        trainer.model.unload()  # the next configuration on this base starts from the bare base model again


def write_profile(clock: _StepClock, path: Path, steps: int) -> dict:
    """The recorded steps' top ops (by device time where there is a device, and by CPU time) and per-step counts."""
    from torch.autograd import DeviceType

    averages = clock.profiler.key_averages()
    wall = (clock.marks["end"][0] - clock.marks["timed"][0]) / steps
    # Device time is summed over the device-side events only (kernels, copies), as the profiler's own table total is.
    device_us = sum(e.self_device_time_total for e in averages if e.device_type == DeviceType.CUDA and not e.is_user_annotation)
    summary = {"steps": steps, "wall_s_per_step": round(wall, 4), "device_kernel_s_per_step": round(device_us / 1e6 / steps, 4),
               "device_busy_share": round(device_us / 1e6 / steps / wall, 3) if device_us else None,
               "kernel_launches_per_step": sum(e.count for e in averages if e.key in _LAUNCHES) / steps,
               "syncs_per_step": sum(e.count for e in averages if e.key in _SYNCS) / steps,
               "item_calls_per_step": sum(e.count for e in averages if e.key == "aten::_local_scalar_dense") / steps}
    tables = [(key, averages.table(sort_by=key, row_limit=40, max_name_column_width=90))
              for key in (["self_cuda_time_total"] if device_us else []) + ["self_cpu_time_total", "cpu_time_total"]]
    path.write_text(json.dumps(summary, indent=2) + "\n" + "".join(f"\n=== top ops by {key} ({steps} steps)\n{table}\n" for key, table in tables))
    return summary


def plan(labels: list[str], profile: str | None, warmup: bool) -> list[tuple[str, str]]:
    """(configuration, mode) in run order. Mode `warmup`: an untimed first run of the first configuration, so that
    one-time costs (bitsandbytes' Triton kernels, cuBLAS, the allocator) do not fall on whichever row comes first;
    `timed`: a row; `profile`: the --profile run, right after that configuration's row (or last in its group).
    Liger's rows come last: Liger patches transformers for the rest of the process."""
    uses_liger = {label: bool(CONFIGURATIONS[label].get("liger_kernel")) for label in [*labels, profile] if label}
    runs = []
    for group in (False, True):
        members = [label for label in labels if uses_liger[label] == group]
        for label in members:
            runs.append((label, "timed"))
            if label == profile:
                runs.append((label, "profile"))
        if profile and uses_liger[profile] == group and profile not in members:
            runs.append((profile, "profile"))
    if warmup and labels:
        runs.insert(0, (next((label for label in labels if not uses_liger[label]), labels[0]), "warmup"))
    return runs


def _base_key(label: str, env: dict) -> tuple[bool, bool]:
    """(4-bit, upcast by peft) of the base model a configuration trains on; a 16-bit base is never upcast."""
    options = {**OPTIONS, **CONFIGURATIONS[label]}
    quantized = env["quantize"] if options["quantization"] is None else options["quantization"] == "4bit"
    return quantized, quantized and options["kbit_upcast"]


def run_model(name: str, args, env: dict, rows: list, profiles: list, save) -> None:
    """Every planned configuration on one model; a base (4-bit with or without upcast, or 16-bit) is loaded once
    and kept while a later configuration still needs it (on CUDA; a base Liger patched is never reused).
    rare_logging computes what plain does, so equal losses in the two rows show that reuse carries nothing over."""
    import torch

    from utils import sft_training as sft

    runs, bases, data = plan(args.configurations, args.profile, args.warmup_steps > 0), {}, None
    for index, (label, mode) in enumerate(runs):
        options, note = {**OPTIONS, **CONFIGURATIONS[label]}, None
        reason = env["graphs_problem"] if options["cuda_graphs"] else None
        if options["liger_kernel"] and env["liger_problem"]:
            if set(CONFIGURATIONS[label]) == {"liger_kernel"}:
                reason = env["liger_problem"]
            else:
                options["liger_kernel"], note = False, f"without Liger: {env['liger_problem']}"
        if reason:
            if mode != "warmup":
                print(f"[skip] {name} {label}{' profile' if mode == 'profile' else ''}: {reason}", flush=True)
                (profiles if mode == "profile" else rows).append({"model": name, "configuration": label, "skipped": reason})
            continue
        key = _base_key(label, env)
        quantized, needed, model, checkpointing = key[0], {_base_key(later, env) for later, _ in runs[index:]}, None, None
        for stale in [k for k in bases if k not in needed]:
            del bases[stale]
        gc.collect()
        profiled = mode == "profile"
        steps = {"warmup": args.warmup_steps, "profile": args.warmup_steps + 1 + args.profile_steps}.get(mode, args.steps)
        clock = _StepClock(args.warmup_steps if mode != "warmup" else 0, args.profile_steps if profiled else 0)
        precision = getattr(torch.backends, "fp32_precision", None)  # torch_compile turns TF32 on for the process
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        try:
            if key not in bases:
                model, tokenizer = load_model(name, quantized, args.scratch_dir, args.tiny_model, args.bundled_model)
                checkpointing = sft.resolve_gradient_checkpointing(args.gradient_checkpointing, model)
                if quantized:
                    model = sft.prepare_quantized_model(model, checkpointing, upcast=key[1])
                bases[key] = (model, tokenizer, checkpointing, matmul_parameters(model))
            model, tokenizer, checkpointing, n_matmul = bases[key]
            if data is None:
                vocab, lengths = model.config.vocab_size, dict(prompt=args.prompt_tokens, completion=args.completion_tokens)
                data = {"train": synthetic_examples(args.batch_size * args.steps, vocab, 0, **lengths),
                        "eval": synthetic_examples(args.eval_examples, vocab, 1, **lengths)}
            run_args = argparse.Namespace(**{**vars(args), "steps": steps})
            result = measure(label, options, model, tokenizer, data, run_args, checkpointing, clock, timed=mode == "timed")
        except Exception as err:  # noqa: BLE001 - one configuration failing must not cost the others' measurements
            traceback.print_exc()
            result = {"error": f"{type(err).__name__}: {err}"}
        finally:
            if precision is not None:
                torch.backends.fp32_precision = precision
            if options["torch_compile"] != "off":
                torch._dynamo.reset()
            if options["liger_kernel"] or (quantized and not torch.cuda.is_available()):
                bases.pop(key, None)  # Liger patched it; bitsandbytes' CPU path repacks 4-bit weights when evaluating
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if mode == "warmup" and "error" in result:
            rows.append({"model": name, "configuration": f"warmup ({label})", **result})
        if mode == "warmup":
            continue
        if profiled:
            if "error" not in result:
                path = args.output.with_name(f"{args.output.stem}_profile_{name}_{label}.txt")
                profiles.append({"model": name, "configuration": label, "file": path.name, **write_profile(clock, path, args.profile_steps)})
                print(json.dumps(profiles[-1]), flush=True)
            else:
                profiles.append({"model": name, "configuration": label, **result})
            save(False)
            continue
        row = {"model": name, "configuration": label, "quantization": "bnb-nf4" if quantized else None,
               **{k: v for k, v in options.items() if k != "quantization"}, "kbit_upcast": key[1], "gradient_checkpointing": checkpointing,
               "batch_size": args.batch_size, **({"note": note} if note else {}), **result}
        if "tokens_per_s" in result:
            row["flops_per_token"] = 4 * n_matmul + 6 * result["lora_parameters"]
            row["mfu"] = round(result["tokens_per_s"] * row["flops_per_token"] / (env["peak"] * 1e12), 5) if env["peak"] else None
            plain = next((r for r in rows if r["model"] == name and r["configuration"] == "plain" and "tokens_per_s" in r), None)
            if plain:
                row["ratio_to_plain"] = round(result["tokens_per_s"] / plain["tokens_per_s"], 3)
                row["eval_loss_vs_plain"] = round(result["eval_loss"] / plain["eval_loss"] - 1, 4)
        rows.append(row)
        print(json.dumps(row), flush=True)
        save(False)


def main(args) -> int:
    import torch

    from utils import sft_training as sft
    from utils.cuda_graph_training import cuda_graphs_device_problem
    from utils.provenance_helper import capture_environment, get_git_info, write_manifest_atomic

    environment, git = capture_environment(), get_git_info()
    peak, device = peak_tflops(args, environment)
    env = {"quantize": args.quantization == "4bit" or (args.quantization == "auto" and torch.cuda.is_available()),
           "peak": peak, "liger_problem": sft.liger_kernel_problem(),
           "graphs_problem": cuda_graphs_device_problem()}
    rows, profiles = [], []
    args.output.parent.mkdir(parents=True, exist_ok=True)

    def save(complete: bool) -> None:
        write_manifest_atomic(args.output, {"complete": complete, "device": device, "peak_bf16_tflops": peak, "rows": rows,
                                            "profiles": profiles, "args": {k: str(v) for k, v in vars(args).items()},
                                            "environment": environment, **git})

    for name in args.models:
        run_model(name, args, env, rows, profiles, save)
    save(True)
    print(f"\n{device}, peak {peak} TFLOP/s bf16\n{'model':<9}{'configuration':<17}{'tokens/s':>10}{'x plain':>9}{'MFU':>9}"
          f"{'train loss':>12}{'eval loss':>11}{'eval s':>8}{'warm-up s':>11}{'padding':>9}{'peak GB':>9}")
    for row in rows:
        if "tokens_per_s" not in row:
            print(f"{row['model']:<9}{row['configuration']:<17}  {row.get('skipped') or row.get('error')}")
            continue
        mfu = f"{row['mfu']:.4f}" if row["mfu"] is not None else "-"
        print(f"{row['model']:<9}{row['configuration']:<17}{row['tokens_per_s']:>10}{row.get('ratio_to_plain', ''):>9}{mfu:>9}"
              f"{row['train_loss']:>12}{row['eval_loss']:>11}{row['eval_s']:>8}{row['warmup_s']:>11}{row['padding_share']!s:>9}"
              f"{row['peak_memory_gb']!s:>9}")
    failed = [f"{r['model']} {r['configuration']}" for r in rows + profiles if "error" in r]
    if failed:
        print(f"error: configuration(s) failed: {', '.join(failed)} (tracebacks above; the others are in {args.output})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
