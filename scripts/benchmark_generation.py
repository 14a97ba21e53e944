"""Generation and critic-scoring throughput against the hardware's own limits, measured in one run.

    python scripts/benchmark_generation.py --output results/benchmark_generation.json            # GPU
    python scripts/benchmark_generation.py --models tiny --batch-sizes 1 4 --new-tokens 8 --prompt-tokens 16   # CPU smoke run
    python scripts/benchmark_generation.py --models qwen7b --measurements response   # the response phase's shape only

For each model and batch size, with a fixed prompt length and a fixed number of new tokens: tokens/s of
the project's engine (`GenerationEngine`) and of plain `model.generate` with the same settings, each also
as a fraction of the weight-bandwidth floor (weight bytes read per decode step / device copy bandwidth,
measured here), for the whole call and for its decode steps alone (the call minus a one-token call);
and critic scoring (`InstructionCritic.label_logprobs`) in prompts/s and as a fraction of the bf16 matmul
peak measured here. On a GPU the engine and the critic are also measured with `compile=True`
(`*_compiled` rows; the compilation happens in the untimed warm-up call). The response phase's own shape
(`response_shared` / `response_unshared` rows): the template's demonstrations (the real tokens for
`bundled`, random ones of the same length otherwise), then a short instruction, each instruction N times
(best-of-N), sampled with the pipeline's response settings, through the engine with and without
shared-prefix prefill, with their ratio from the same run. Models: `bundled` (gemma-3-270m), `qwen7b` (random-init, Qwen2.5-7B
shape, bf16), `tiny` (a 2-layer random model, for CPU runs). Prints a table last.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from utils.exit_codes import run_cli  # noqa: E402

QWEN7B_SHAPE = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                    num_key_value_heads=4, vocab_size=152064, max_position_embeddings=4096, rope_theta=1e6,
                    tie_word_embeddings=False)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["bundled", "qwen7b"], choices=["bundled", "qwen7b", "tiny"], help="models to measure")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 64, 256], help="batch sizes")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="fixed prompt length")
    parser.add_argument("--new-tokens", type=int, default=64, help="fixed number of generated tokens")
    parser.add_argument("--sampling-batch-sizes", nargs="+", type=int, default=[64], help="batch sizes also measured with sampling")
    parser.add_argument("--critic-prompts", type=int, default=64, help="prompts per critic scoring batch")
    parser.add_argument("--critic-tokens", type=int, default=160, help="critic prompt length")
    parser.add_argument("--runs", type=int, default=3, help="timed calls per measurement (after one warm-up); the median is kept")
    parser.add_argument("--measurements", nargs="+", default=["decode", "critic", "response"], choices=["decode", "critic", "response"],
                        help="decode: every decoding path by batch size; critic: critic scoring; response: the response phase's shape")
    parser.add_argument("--response-batch-sizes", nargs="+", type=int, default=[256],
                        help="rows per batch in the response measurement (instructions x candidates)")
    parser.add_argument("--candidates", type=int, default=4, help="candidates per instruction (N) in the response measurement")
    parser.add_argument("--response-new-tokens", type=int, default=256, help="new tokens per candidate in the response measurement")
    parser.add_argument("--instruction-tokens", type=int, default=16, help="tokens of each (random) instruction after the demonstrations")
    parser.add_argument("--prefix-tokens", type=int, default=None,
                        help="demonstration length for qwen7b/tiny (default: the response template's demonstrations, in the model's tokenizer)")
    parser.add_argument("--tiny-model", default=None, help="model folder measured as `tiny` (default: a 2-layer random model)")
    parser.add_argument("--output", type=Path, default=Path("results/benchmark_generation.json"), help="JSON output")
    return parser.parse_args(argv)


def _sync(torch):
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(torch, fn, repeats: int = 1, runs: int = 1) -> float:
    """Seconds per call: one warm-up call (allocations, kernel selection, graph capture), then the
    median over `runs` of the mean over `repeats` calls. With one timed call, plain `generate` on the
    7B shape at batch 64 measured 1,482 and 2,769 tok/s in two H100 runs."""
    import statistics

    fn()
    samples = []
    for _ in range(max(1, runs)):
        _sync(torch)
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        _sync(torch)
        samples.append((time.perf_counter() - start) / repeats)
    return statistics.median(samples)


def measure_hardware(torch, device: str) -> dict:
    n = (1 << 28) if device == "cuda" else (1 << 24)  # 512 MiB of bf16 on a GPU
    src = torch.empty(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    seconds = _timed(torch, lambda: dst.copy_(src), repeats=10)
    bandwidth = 2 * src.numel() * src.element_size() / seconds  # read + write
    size = 8192 if device == "cuda" else 512
    a = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    b = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    flops = 2 * size ** 3 / _timed(torch, lambda: a @ b, repeats=20)
    return {"copy_bandwidth_bytes_per_s": bandwidth, "matmul_bf16_flops_per_s": flops}


def build_model(name: str, device: str, tiny_model: str | None = None):
    import torch

    from utils.clean_model_loader import CleanModelLoader

    if name == "bundled" or (name == "tiny" and tiny_model):
        model, tokenizer, _ = CleanModelLoader(tiny_model if name == "tiny" else None, dtype="bfloat16" if device == "cuda" else None,
                                               run_sentinels=False).load()
        return model, tokenizer
    _, tokenizer, _ = CleanModelLoader(tokenizer_only=True).load()
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if name == "qwen7b":
        config, cls = Qwen2Config(**QWEN7B_SHAPE), Qwen2ForCausalLM
    else:
        config, cls = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=1024), LlamaForCausalLM
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = cls(config).to(dtype)  # random weights: throughput does not depend on their values
    model.eval()
    return model, tokenizer


def bench_model(name: str, args, hw: dict, device: str) -> list[dict]:
    import torch

    model, tokenizer = build_model(name, device, args.tiny_model)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    params_count = sum(p.numel() for p in model.parameters())
    vocab = model.config.vocab_size
    low = min(1000, vocab // 2)  # random prompt ids above the special tokens
    rows = []
    gen = torch.Generator().manual_seed(0)
    for batch in (args.batch_sizes if "decode" in args.measurements else []):
        prompts = torch.randint(low, min(vocab, 100000), (batch, args.prompt_tokens), generator=gen)
        floor = batch * hw["copy_bandwidth_bytes_per_s"] / weight_bytes  # tokens/s if each step reads all weights once
        items = [(f"p{i:04d}", prompts[i].tolist()) for i in range(batch)]
        sampling_too = batch in args.sampling_batch_sizes
        reference = None  # plain greedy `generate`'s tokens, which every greedy path is compared with
        for label, make in _paths(model, tokenizer, prompts, items, device, sampling_too):
            seconds = _timed(torch, make(args.new_tokens), runs=args.runs)
            greedy_rows = None
            if not label.endswith("_sampled"):
                tokens = _token_rows(make(args.new_tokens)(), args.prompt_tokens)
                reference = tokens if reference is None else reference
                greedy_rows = sum(a == b for a, b in zip(tokens, reference, strict=True)) / batch
            tps = batch * args.new_tokens / seconds
            # The decode steps alone: the whole call minus a call that stops after the first token
            # (prefill and its sampling), both timed here.
            prefill_seconds = _timed(torch, make(1), runs=args.runs)
            decode_tps = batch * (args.new_tokens - 1) / max(seconds - prefill_seconds, 1e-9)
            rows.append({"model": name, "path": label, "batch": batch, "tokens_per_s": round(tps, 1),
                         "fraction_of_bandwidth_floor": round(tps / floor, 4), "floor_tokens_per_s": round(floor, 1),
                         "prefill_s": round(prefill_seconds, 4), "decode_tokens_per_s": round(decode_tps, 1),
                         "decode_fraction_of_bandwidth_floor": round(decode_tps / floor, 4),
                         **({"greedy_rows_equal_plain": round(greedy_rows, 4)} if greedy_rows is not None else {})})
            print(json.dumps(rows[-1]), flush=True)
    if "response" in args.measurements:
        rows += bench_response(name, model, tokenizer, args, hw["copy_bandwidth_bytes_per_s"] / weight_bytes, device)
    if "critic" in args.measurements:
        rows += bench_critic(name, model, tokenizer, args, hw, device, params_count, gen)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def bench_critic(name: str, model, tokenizer, args, hw: dict, device: str, params_count: int, gen) -> list[dict]:
    import torch

    from utils.instruction_critic import InstructionCritic

    rows = []
    vocab = model.config.vocab_size
    low = min(1000, vocab // 2)
    critic_prompts = torch.randint(low, min(vocab, 100000), (args.critic_prompts, args.critic_tokens), generator=gen)
    # Matmul work: every layer for every token; the LM head only at the answer slot (logits_to_keep=1).
    embed = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight.numel()
    body = params_count - embed - (0 if model.config.tie_word_embeddings else head)
    for label, compiled in [("critic_scoring", False)] + ([("critic_scoring_compiled", True)] if device == "cuda" else []):
        critic = InstructionCritic(model, tokenizer, batch_size=args.critic_prompts, compile=compiled)
        seconds = _timed(torch, lambda critic=critic: critic._score_encoded([row.tolist() for row in critic_prompts]), runs=args.runs)
        flops = 2 * (body * args.critic_tokens + head) * args.critic_prompts / seconds
        rows.append({"model": name, "path": label, "batch": args.critic_prompts, "prompts_per_s": round(args.critic_prompts / seconds, 1),
                     "fraction_of_matmul_peak": round(flops / hw["matmul_bf16_flops_per_s"], 4)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def response_prompts(name: str, tokenizer, vocab: int, rows: int, args) -> tuple[list[tuple[str, list[int]]], int]:
    """(key, ids) for `rows` prompts, `args.candidates` copies of each instruction, and the prefix length."""
    import torch

    from utils.completion_prompts import CompletionStylePrompts
    from utils.prompt_guards import encode_prompt

    demonstrations = encode_prompt(tokenizer, CompletionStylePrompts.demonstration_prefix())
    gen = torch.Generator().manual_seed(1)
    low, high = min(1000, vocab // 2), min(vocab, 100000)  # random ids above the special tokens
    if name != "bundled":  # random weights: random demonstrations of the same length
        demonstrations = torch.randint(low, high, (args.prefix_tokens or len(demonstrations),), generator=gen).tolist()
    instructions = -(-rows // args.candidates)
    items = []
    for i in range(instructions):
        instruction = torch.randint(low, high, (args.instruction_tokens,), generator=gen).tolist()
        items += [(f"i{i:05d}-c{j}", demonstrations + instruction) for j in range(args.candidates)]
    return items[:rows], len(demonstrations)


def bench_response(name: str, model, tokenizer, args, floor_per_row: float, device: str) -> list[dict]:
    """The response phase's shape through the engine, with and without shared-prefix prefill, in one run."""
    import torch

    from utils.generation import GenerationEngine, SamplingParams
    from utils.stage1_generation import Stage1Config

    response = Stage1Config().response
    params = SamplingParams(response.temperature, response.top_p, response.repetition_penalty, args.response_new_tokens)
    rows = []
    for batch in args.response_batch_sizes:
        items, prefix = response_prompts(name, tokenizer, model.config.vocab_size, batch, args)
        measured = {}
        for label, share in (("response_unshared", False), ("response_shared", True)):
            engine = GenerationEngine(model, tokenizer, batch_size=batch, show_progress=False, share_prefix=share,
                                      compile=device == "cuda")  # the fastest path (the pipeline's --compile)
            engine.tokenizer = _NoEosTokenizer(tokenizer)
            make = lambda n, engine=engine, items=items: lambda: engine.generate_encoded(items, replace(params, max_new_tokens=n))
            seconds = _timed(torch, make(args.response_new_tokens), runs=args.runs)
            calls = 1 + max(1, args.runs)
            prefill_tokens, saved = engine.prefill_tokens // calls, engine.prefix_tokens_saved // calls
            prefill_seconds = _timed(torch, make(1), runs=args.runs)  # the call up to its first token
            tps = batch * args.response_new_tokens / seconds
            decode_tps = batch * (args.response_new_tokens - 1) / max(seconds - prefill_seconds, 1e-9)
            measured[label] = tps
            rows.append({"model": name, "path": label, "batch": batch, "candidates": args.candidates, "prefix_tokens": prefix,
                         "prompt_tokens": prefix + args.instruction_tokens, "new_tokens": args.response_new_tokens,
                         "tokens_per_s": round(tps, 1), "fraction_of_bandwidth_floor": round(tps / (batch * floor_per_row), 4),
                         "prefill_s": round(prefill_seconds, 4),
                         "decode_tokens_per_s": round(decode_tps, 1),
                         "decode_fraction_of_bandwidth_floor": round(decode_tps / (batch * floor_per_row), 4),
                         "prefill_tokens_per_call": prefill_tokens, "prefix_tokens_saved_per_call": saved})
            print(json.dumps(rows[-1]), flush=True)
        rows[-1]["shared_vs_unshared"] = round(measured["response_shared"] / measured["response_unshared"], 3)
    return rows


def _paths(model, tokenizer, prompts, items, device: str, sampling_too: bool):
    """(label, make) for every decoding path: make(n) is a callable producing exactly n new tokens per row."""
    import torch

    from utils.generation import GenerationEngine, SamplingParams

    def plain(**sampling):
        return lambda n: lambda: model.generate(input_ids=prompts.to(device), attention_mask=torch.ones_like(prompts).to(device),
                                                max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0, **sampling)

    def engine(settings, **options):
        # One engine per path: it keeps its decoders (cache, captured graph) from call to call, as in a run.
        engine = GenerationEngine(model, tokenizer, batch_size=len(items), show_progress=False, **options)
        engine.tokenizer = _NoEosTokenizer(tokenizer)
        return lambda n: lambda: engine.generate_encoded(items, SamplingParams(*settings, n))

    greedy, sampled = (0.0, 1.0, 1.0), (0.7, 0.9, 1.1)  # sampled: the pipeline's penalty, temperature, top-p
    compiled = device == "cuda"  # the engine compiles on a GPU only
    paths = [("plain_generate", plain(do_sample=False)),
             ("engine_no_graph", engine(greedy, cuda_graph=False)),  # the static loop alone
             ("engine", engine(greedy))]
    paths += [("engine_compiled", engine(greedy, compile=True))] if compiled else []
    if sampling_too:
        paths += [("plain_generate_sampled", plain(do_sample=True, temperature=0.7, top_p=0.9, top_k=0, repetition_penalty=1.1)),
                  ("engine_sampled", engine(sampled))]
        paths += [("engine_compiled_sampled", engine(sampled, compile=True))] if compiled else []
    return paths


def _token_rows(output, prompt_tokens: int) -> list[list[int]]:
    """New token ids per prompt, in prompt order, from `generate`'s tensor or the engine's results."""
    if isinstance(output, list):
        return [result.token_ids for result in sorted(output, key=lambda result: result.key)]
    return output[:, prompt_tokens:].tolist()


def _add_speedups(rows: list[dict]) -> None:
    """Each engine row against plain `generate` on the same model, batch and decoding mode (same run)."""
    plain = {(r["model"], r["batch"], r["path"].endswith("_sampled")): r["tokens_per_s"] for r in rows if r["path"].startswith("plain_generate")}
    for row in rows:
        if row["path"].startswith("engine"):
            base = plain.get((row["model"], row["batch"], row["path"].endswith("_sampled")))
            if base:
                row["speedup_vs_plain"] = round(row["tokens_per_s"] / base, 3)


class _NoEosTokenizer:
    """The engine's tokenizer with EOS switched off, so every sequence runs the fixed length."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.eos_token_id = None

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def main(args) -> int:
    import torch

    from utils.provenance_helper import capture_environment, get_git_info, write_manifest_atomic

    device = "cuda" if torch.cuda.is_available() else "cpu"
    hw = measure_hardware(torch, device)
    print(json.dumps(hw), flush=True)
    rows = [row for name in args.models for row in bench_model(name, args, hw, device)]
    _add_speedups(rows)
    write_manifest_atomic(args.output, {"hardware": hw, "rows": rows, "args": {k: str(v) for k, v in vars(args).items()},
                                        "environment": capture_environment(), **get_git_info()})
    print(f"\n{'model':<9}{'path':<26}{'batch':>6}{'tok/s or prompts/s':>20}{'fraction':>10}{'decode only':>12}{'x plain':>9}  of")
    for row in rows:
        rate = row.get("tokens_per_s", row.get("prompts_per_s"))
        frac = row.get("fraction_of_bandwidth_floor", row.get("fraction_of_matmul_peak"))
        decode = f"{row['decode_fraction_of_bandwidth_floor']:.3f}" if "decode_fraction_of_bandwidth_floor" in row else ""
        speedup = f"{row['speedup_vs_plain']:.2f}" if "speedup_vs_plain" in row else ""
        print(f"{row['model']:<9}{row['path']:<26}{row['batch']:>6}{rate:>20}{frac:>10.3f}{decode:>12}{speedup:>9}  "
              f"{'matmul peak' if 'prompts_per_s' in row else 'bandwidth floor'}")
    for row in rows:
        if "shared_vs_unshared" in row:
            print(f"{row['model']} response phase, batch {row['batch']} ({row['candidates']} candidates, {row['prefix_tokens']}-token "
                  f"demonstrations, {row['new_tokens']} new tokens): shared prefix {row['shared_vs_unshared']:.2f}x unshared "
                  f"({row['prefix_tokens_saved_per_call']} prefill tokens saved per call)")
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
