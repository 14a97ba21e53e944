"""Session 8, last lease: the bundled model's real response phase with the new engine (1,024 rows = 256 pilot
instructions x 4 candidates, batch 256, the pipeline's response settings and stop strings), with and without
moving the last live rows into a smaller decoder, in one process; a few answers printed."""
import json, os, sys, time, statistics
from pathlib import Path
sys.path.insert(0, "scripts")
import torch
OUT = Path(os.environ["OUT"])
log = open(OUT / "smoke.txt", "a")
def say(*a):
    print(*a, flush=True); print(*a, file=log, flush=True)
from utils.generation import GenerationEngine
from utils.stage1_generation import Stage1Config
from utils import static_decode as sd
from utils.clean_model_loader import CleanModelLoader
from utils.completion_prompts import CompletionStylePrompts as P

calls = []
orig_decode = sd.StaticDecoder.decode
def decode(self, ids, mask, stop_check=None):
    torch.cuda.synchronize(); t = time.perf_counter(); before = self.compacted_batches
    out = orig_decode(self, ids, mask, stop_check)
    torch.cuda.synchronize()
    calls.append(dict(width=self.width, seconds=round(time.perf_counter() - t, 3), compacted=self.compacted_batches - before,
                      prefill=self.last_prefill_tokens))
    return out
sd.StaticDecoder.decode = decode

t = time.perf_counter(); model, tok, _ = CleanModelLoader("/tmp/gemma.gguf", dtype="bfloat16").load(); say("load (converts)", round(time.perf_counter() - t, 1))
recs = [json.loads(l) for l in open(".device/pilotdata/sft_data.jsonl")]
instr = sorted({r["instruction"] for r in recs})[:256]
response = Stage1Config().response
stops = P.response_stop_strings("response_v4")
items = [(f"i{i:04d}-c{j}", P.create_generation_response_prompt(text, "response_v4")) for i, text in enumerate(instr) for j in range(4)]
factor = sd.COMPACTION_FACTOR
for label, compaction in (("compacting", factor), ("not compacting", 10**9), ("compacting", factor), ("not compacting", 10**9)):
    sd.COMPACTION_FACTOR = compaction
    engine = GenerationEngine(model, tok, batch_size=256, show_progress=False, seed=1)
    calls.clear()
    torch.cuda.synchronize(); t = time.perf_counter()
    res = engine.generate(items, response, stops)
    torch.cuda.synchronize(); wall = time.perf_counter() - t
    gen = [r.n_generated_tokens for r in res]
    say(f"{label}: {len(items)} rows wall {wall:.2f} s, generated tokens mean {statistics.mean(gen):.1f} median {statistics.median(gen)} max {max(gen)}; "
        f"finish {dict((k, sum(r.finish_reason == k for r in res)) for k in ('stop','eos','length'))}; prefill saved {engine.prefix_tokens_saved}")
    say("  calls", json.dumps(calls))
sd.COMPACTION_FACTOR = factor
for r in sorted(res, key=lambda r: r.key)[:12:3]:
    say(json.dumps({"key": r.key, "instruction": instr[int(r.key[1:5])], "text": r.text[:300], "reason": r.finish_reason}))
