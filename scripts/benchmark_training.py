"""QLoRA training throughput: the project's batching options against the plain configuration, in one run.

    python scripts/benchmark_training.py --output results/benchmark_training.json                 # GPU: gemma-3-270m + 7B shape
    python scripts/benchmark_training.py --models tiny --steps 4 --warmup-steps 1 --output /tmp/bt.json   # CPU smoke run

For each model, the same seeded synthetic examples (prompt and completion lengths like the pipeline's
pairs, completion-only loss) train through `utils.sft_training` (TRL SFTTrainer, LoRA r16 all-linear,
4-bit NF4 where `--quantization 4bit`) once per configuration: `plain` (padded batches, no
padding-free, no packing), `padding_free` (each batch flattened with per-example position_ids) and
`packing` (TRL bfd packing). Tokens/s counts real (non-pad) tokens over the steps after
`--warmup-steps` (the first steps pay one-time kernel compilation). Models: `bundled`
(gemma-3-270m through the loader), `qwen7b` (random-init Qwen2.5-7B shape saved once under
`--scratch-dir`, then loaded like any folder), `tiny` (2 layers, for CPU runs). Prints a table last.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from utils.exit_codes import run_cli  # noqa: E402

CONFIGURATIONS = {"plain": dict(padding_free=False, packing=False), "padding_free": dict(padding_free=True, packing=False),
                  "packing": dict(padding_free=True, packing=True)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--models", nargs="+", default=["bundled", "qwen7b"], choices=["bundled", "qwen7b", "tiny"], help="models to measure")
    add("--configurations", nargs="+", default=list(CONFIGURATIONS), choices=list(CONFIGURATIONS), help="batching configurations")
    add("--quantization", choices=["auto", "4bit", "none"], default="auto", help="auto = 4bit with CUDA, none on a CPU")
    add("--batch-size", type=int, default=8, help="examples per micro-batch (gradient accumulation 1)")
    add("--steps", type=int, default=30, help="optimizer steps per configuration")
    add("--warmup-steps", type=int, default=5, help="leading steps left out of the timing")
    add("--max-seq-length", type=int, default=512, help="packing row length")
    add("--gradient-checkpointing", choices=["auto", "on", "off"], default="auto", help="as in train_stage1_sft.py")
    add("--tiny-model", default=None, help="model folder measured as `tiny` (default: a 2-layer random model)")
    add("--scratch-dir", type=Path, default=Path("/tmp/stage1_benchmark_training"), help="random-init model folder and trainer output")
    add("--output", type=Path, default=Path("results/benchmark_training.json"), help="JSON output")
    return parser.parse_args(argv)


def synthetic_examples(count: int, vocab: int, seed: int = 0) -> list[dict]:
    """Pre-tokenized prompt+completion examples with the pipeline's typical lengths (prompt ~15-45
    tokens, completion ~5-120); token values do not change the speed."""
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        prompt, completion = rng.randint(15, 45), rng.randint(5, 120)
        ids = [rng.randrange(min(1000, vocab // 2), vocab) for _ in range(prompt + completion)]
        examples.append({"input_ids": ids, "completion_mask": [0] * prompt + [1] * completion})
    return examples


def load_model(name: str, quantize: bool, scratch: Path, tiny_model: str | None = None):
    """Every model goes through `CleanModelLoader`, so the 4-bit path is the one training uses."""
    from utils.clean_model_loader import CleanModelLoader

    if name == "bundled":
        source = None
    elif name == "tiny" and tiny_model:
        source = tiny_model
    else:
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


class _Clock:
    """Wall time and TRL's running count of real tokens at the first timed step and at the last."""

    def __init__(self, warmup_steps: int):
        from transformers import TrainerCallback

        clock = self

        class Callback(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "num_tokens" in logs:
                    import torch

                    if torch.cuda.is_available():
                        torch.cuda.synchronize()
                    clock.marks.append((state.global_step, time.perf_counter(), float(logs["num_tokens"])))

        self.warmup_steps = warmup_steps
        self.marks: list[tuple[int, float, float]] = []
        self.callback = Callback()

    def tokens_per_second(self) -> tuple[float, int, float]:
        start = next(m for m in self.marks if m[0] >= self.warmup_steps)
        end = self.marks[-1]
        return (end[2] - start[2]) / (end[1] - start[1]), end[0] - start[0], end[2] - start[2]


def measure(model, tokenizer, examples: list[dict], label: str, args, checkpointing: bool) -> dict:
    from utils import sft_training as sft

    options = CONFIGURATIONS[label]
    settings = argparse.Namespace(epochs=1, lr=2e-4, per_device_batch_size=args.batch_size, grad_accum=1,
                                  max_steps=args.steps, save_steps=10 ** 9, save_total_limit=None, logging_steps=1, seed=0,
                                  max_seq_length=args.max_seq_length, packing=options["packing"])
    config = sft.build_sft_config(settings, args.scratch_dir / f"trainer_{label}", padding_free=options["padding_free"],
                                  has_eval=False, gradient_checkpointing=checkpointing)
    clock = _Clock(args.warmup_steps)
    trainer = sft.build_trainer(model, tokenizer, examples, [], config, sft.make_lora_config(), [clock.callback])
    trainer.train()
    rate, steps, tokens = clock.tokens_per_second()
    trainer.model.unload()  # the next configuration starts from the bare base model again
    return {"configuration": label, **options, "tokens_per_s": round(rate, 1), "timed_steps": steps, "timed_tokens": int(tokens)}


def main(args) -> int:
    import torch

    from utils import sft_training as sft
    from utils.provenance_helper import capture_environment, get_git_info, write_manifest_atomic

    quantize = args.quantization == "4bit" or (args.quantization == "auto" and torch.cuda.is_available())
    rows = []
    for name in args.models:
        model, tokenizer = load_model(name, quantize, args.scratch_dir, args.tiny_model)
        checkpointing = sft.resolve_gradient_checkpointing(args.gradient_checkpointing, model)
        if quantize:
            model = sft.prepare_quantized_model(model, checkpointing)
        examples = synthetic_examples(args.batch_size * (args.steps + 1), model.config.vocab_size)
        for label in args.configurations:
            row = {"model": name, "quantization": "bnb-nf4" if quantize else None, "gradient_checkpointing": checkpointing,
                   "batch_size": args.batch_size, **measure(model, tokenizer, examples, label, args, checkpointing)}
            plain = next((r["tokens_per_s"] for r in rows if r["model"] == name and r["configuration"] == "plain"), None)
            if plain:
                row["ratio_to_plain"] = round(row["tokens_per_s"] / plain, 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    write_manifest_atomic(args.output, {"rows": rows, "args": {k: str(v) for k, v in vars(args).items()},
                                        "environment": capture_environment(), **get_git_info()})
    print(f"\n{'model':<9}{'configuration':<15}{'tokens/s':>10}{'x plain':>9}{'timed steps':>13}")
    for row in rows:
        print(f"{row['model']:<9}{row['configuration']:<15}{row['tokens_per_s']:>10}{row.get('ratio_to_plain', ''):>9}{row['timed_steps']:>13}")
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
