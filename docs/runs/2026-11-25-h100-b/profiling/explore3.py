"""Same run: a new decoder per call (capture every call) vs one decoder reused, final code."""
import json, statistics, sys
sys.path.insert(0, "scripts"); sys.path.insert(0, "devrun")
import torch
from explore1 import build, now
from utils.static_decode import StaticDecoder

def med(fn, runs=3):
    fn(); out = []
    for _ in range(runs):
        t = now(); fn(); out.append(now() - t)
    return statistics.median(out) * 1e3

for name in ("gemma", "qwen7b"):
    m = build(name)
    for batch in (64, 256):
        ids = torch.randint(1000, 100000, (batch, 64), generator=torch.Generator().manual_seed(0)).cuda(); att = torch.ones_like(ids)
        mk = lambda: StaticDecoder(m, batch, 64, 64, 0, {1}, 0.0, 1.0, 1.0)
        fresh = med(lambda: mk().decode(ids, att))
        d = mk(); reused = med(lambda: d.decode(ids, att))
        s = StaticDecoder(m, batch, 64, 64, 0, {1}, 0.7, 0.9, 1.1)
        torch.manual_seed(3); a = s.decode(ids, att); torch.manual_seed(3); b = s.decode(ids, att)
        s2 = StaticDecoder(m, batch, 64, 64, 0, {1}, 0.7, 0.9, 1.1); torch.manual_seed(3); c = s2.decode(ids, att)
        print(json.dumps({"model": name, "batch": batch, "new_decoder_per_call_ms": round(fresh, 1), "reused_decoder_ms": round(reused, 1),
                          "speedup": round(fresh / reused, 3), "sampled_reused_equals_new": bool(torch.equal(a, b) and torch.equal(a, c))}), flush=True)
    del m; torch.cuda.empty_cache()
