"""Session 8 profile: the 7B response shape (shared/unshared, kernel table of the shared decode) and the bundled
model's real response phase (steps per batch, resample counts, kernel table, batch 256 vs 512)."""
import json, os, sys, time, statistics
from dataclasses import replace
from pathlib import Path
sys.path.insert(0, "scripts")
import torch
OUT = Path(os.environ["OUT"]); part = sys.argv[1]
log = open(OUT / f"prof_{part}.txt", "a")
def say(*a):
    print(*a, flush=True); print(*a, file=log, flush=True)
import benchmark_generation as bg
from utils.generation import GenerationEngine, SamplingParams
from utils.stage1_generation import Stage1Config
from utils import static_decode as sd

calls = []
orig_decode = sd.StaticDecoder.decode
def decode(self, ids, mask, stop_check=None):
    torch.cuda.synchronize(); t = time.perf_counter()
    out = orig_decode(self, ids, mask, stop_check)
    torch.cuda.synchronize()
    calls.append(dict(batch=self.batch, width=self.width, prefix=self.prefix_length, steps=int(self.step_index.item()),
                      seconds=round(time.perf_counter() - t, 3), prefill=self.last_prefill_tokens))
    return out
sd.StaticDecoder.decode = decode
resamples = [0]
orig_rs = sd.StaticDecoder._full_sort_resample
def rs(self, *a):
    resamples[0] += 1; return orig_rs(self, *a)
sd.StaticDecoder._full_sort_resample = rs

def kernel_table(fn, name, rows=35):
    from torch.profiler import profile, ProfilerActivity
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter(); fn(); torch.cuda.synchronize(); wall = time.perf_counter() - t
    events = prof.key_averages()
    total = sum(e.self_device_time_total for e in events) / 1e3
    say(f"== {name}: wall {wall*1e3:.1f} ms, kernel time {total:.1f} ms")
    say(events.table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=70))

if part == "7b":
    args = bg.parse_args(["--models", "qwen7b", "--measurements", "response", "--runs", "2"])
    model, tok = bg.build_model("qwen7b", "cuda", None)
    t = time.perf_counter()

    rows = bg.bench_response("qwen7b", model, tok, args, 1.0, "cuda")
    for r in rows: say(json.dumps(r))
    say("calls", json.dumps(calls[-4:]))
    items, prefix = bg.response_prompts("qwen7b", tok, model.config.vocab_size, 256, args)
    response = Stage1Config().response
    params = SamplingParams(response.temperature, response.top_p, response.repetition_penalty, 32)
    engine = GenerationEngine(model, tok, batch_size=256, show_progress=False, compile=True)
    engine.tokenizer = bg._NoEosTokenizer(tok)
    engine.generate_encoded(items, params)
    resamples[0] = 0
    kernel_table(lambda: engine.generate_encoded(items, params), "7B shared, 32 new tokens (prefill + 31 steps)")
    say("resamples", resamples[0])
else:
    from utils.clean_model_loader import CleanModelLoader
    from utils.completion_prompts import CompletionStylePrompts as P
    t = time.perf_counter(); model, tok, _ = CleanModelLoader("/tmp/gemma.gguf", dtype="bfloat16").load(); say("load (converts)", round(time.perf_counter() - t, 1))
    t = time.perf_counter(); model, tok, _ = CleanModelLoader("/tmp/gemma.gguf", dtype="bfloat16").load(); say("load again", round(time.perf_counter() - t, 1))
    recs = [json.loads(l) for l in open(".device/pilotdata/sft_data.jsonl")]
    instr = sorted({r["instruction"] for r in recs})[:256]
    response = Stage1Config().response
    stops = P.response_stop_strings("response_v4")
    items = [(f"i{i:04d}-c{j}", P.create_generation_response_prompt(text, "response_v4")) for i, text in enumerate(instr) for j in range(4)]
    for batch in (256, 512, 256):
        engine = GenerationEngine(model, tok, batch_size=batch, show_progress=False, seed=1)
        calls.clear(); resamples[0] = 0
        torch.cuda.synchronize(); t = time.perf_counter()
        res = engine.generate(items, response, stops)
        torch.cuda.synchronize(); wall = time.perf_counter() - t
        gen = [r.n_generated_tokens for r in res]
        say(f"batch {batch}: {len(items)} rows wall {wall:.1f} s, generated tokens mean {statistics.mean(gen):.1f} median {statistics.median(gen)} max {max(gen)}; "
            f"finish {dict((k, sum(r.finish_reason == k for r in res)) for k in ('stop','eos','length'))}; resamples {resamples[0]}")
        say(" calls", json.dumps(calls))
    engine = GenerationEngine(model, tok, batch_size=256, show_progress=False, seed=1)
    batch_items = items[:256]
    engine.generate(batch_items, response, stops)
    kernel_table(lambda: engine.generate(batch_items, response, stops), "bundled response batch 256 (real prompts, stops)")
    say(" calls", json.dumps(calls[-1:]))
    # the step alone without stop checks: 64 fixed tokens
    eng2 = GenerationEngine(model, tok, batch_size=256, show_progress=False, seed=1)
    eng2.tokenizer = bg._NoEosTokenizer(tok)
    p64 = replace(response, max_new_tokens=64)
    eng2.generate(batch_items, p64)
    kernel_table(lambda: eng2.generate(batch_items, p64), "bundled 64 fixed tokens, batch 256, no stop strings", rows=25)
