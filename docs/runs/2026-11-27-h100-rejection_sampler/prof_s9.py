"""Session 9: the 7B shared response call with the compiled rejection sampler (no host check per step) against the
same sampler with the exact way's host check and re-sampling (the step's commit outside the graph)."""
import json, os, sys, time
from pathlib import Path
sys.path.insert(0, "scripts")
import torch
OUT = Path(os.environ["OUT_DIR"])
log = open(OUT / "prof_7b.txt", "a")
def say(*a):
    print(*a, flush=True); print(*a, file=log, flush=True)
import benchmark_generation as bg
from utils.generation import GenerationEngine, SamplingParams
from utils.stage1_generation import Stage1Config
from utils import static_decode as sd
args = bg.parse_args(["--models", "qwen7b", "--measurements", "response", "--runs", "1"])
model, tok = bg.build_model("qwen7b", "cuda", None)
items, prefix = bg.response_prompts("qwen7b", tok, model.config.vocab_size, 256, args)
response = Stage1Config().response
params = SamplingParams(response.temperature, response.top_p, response.repetition_penalty, 256)
exact_check = property(lambda self: not self.greedy and self.top_p < 1.0)
plain = sd.StaticDecoder._may_resample
for label in ("rejection, no host check", "rejection + host check per step", "rejection, no host check"):
    sd.StaticDecoder._may_resample = exact_check if "+" in label else plain
    engine = GenerationEngine(model, tok, batch_size=256, show_progress=False, compile=True)
    engine.tokenizer = bg._NoEosTokenizer(tok)
    engine.generate_encoded(items, params)
    times = []
    for _ in range(3):
        torch.cuda.synchronize(); t = time.perf_counter(); engine.generate_encoded(items, params); torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    say(f"shared 256 new tokens, {label}: {sorted(times)[1]:.3f} s (runs {[round(x, 3) for x in times]}); misses {engine.sampling_misses}")
