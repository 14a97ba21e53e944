"""Decoder reuse and torch.compile of the decode step, on random 7B-shape / gemma-270m-shape models."""
import json, os, statistics, sys, time
sys.path.insert(0, "scripts"); sys.path.insert(0, "devrun")
import torch
from explore1 import build, now
from utils.static_decode import StaticDecoder

def timed(fn, runs=3):
    out = []
    for _ in range(runs):
        t = now(); fn(); out.append(now() - t)
    return statistics.median(out) * 1e3

def run(model, name, batch, width=64, new=64):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 100000, (batch, width), generator=g).cuda(); att = torch.ones_like(ids)
    mk = lambda n=new, **kw: StaticDecoder(model, batch, width, n, 0, {1}, 0.0, 1.0, 1.0, **kw)
    r = {"model": name, "batch": batch}
    t = now(); d = mk(); base_out = d.decode(ids, att); r["fresh_first_ms"] = (now() - t) * 1e3
    r["reuse_ms"] = timed(lambda: d.decode(ids, att))
    p = mk(1); p.decode(ids, att); r["prefill_only_ms"] = timed(lambda: p.decode(ids, att))
    del d, p
    t = now(); c = mk(compile_forward=True); comp_out = c.decode(ids, att); r["compiled_first_ms"] = (now() - t) * 1e3
    r["compile_failed"] = StaticDecoder.compile_failed
    r["compiled_reuse_ms"] = timed(lambda: c.decode(ids, att))
    r["compiled_rows_equal_uncompiled"] = int((comp_out == base_out).all(dim=1).sum())
    r["compiled_first_token_mismatch_step_min"] = int(((comp_out != base_out).float().argmax(dim=1)).min()) if not torch.equal(comp_out, base_out) else None
    del c
    # sampling: fresh vs reused decoder under the same seed
    s1 = StaticDecoder(model, batch, width, new, 0, {1}, 0.7, 0.9, 1.1)
    torch.manual_seed(5); a = s1.decode(ids, att)
    torch.manual_seed(5); b = s1.decode(ids, att)
    s2 = StaticDecoder(model, batch, width, new, 0, {1}, 0.7, 0.9, 1.1)
    torch.manual_seed(5); c2 = s2.decode(ids, att)
    r["sampled_reuse_equals_fresh"] = bool(torch.equal(a, b)) and bool(torch.equal(a, c2))
    r["sampled_reuse_ms"] = timed(lambda: s1.decode(ids, att))
    r["decode_ms_per_step_reuse"] = (r["reuse_ms"] - r["prefill_only_ms"]) / (new - 1)
    r["decode_ms_per_step_compiled"] = (r["compiled_reuse_ms"] - r["prefill_only_ms"]) / (new - 1)
    print(json.dumps(r), flush=True)

def critic(model, name):
    ids = torch.randint(1000, 100000, (64, 160)).cuda()
    with torch.no_grad():
        f = lambda m: m(input_ids=ids, logits_to_keep=1).logits
        f(model); eager = timed(lambda: f(model), 5)
        cm = torch.compile(model, dynamic=False)
        t = now(); f(cm); first = (now() - t) * 1e3
        comp = timed(lambda: f(cm), 5)
    print(json.dumps({"model": name, "critic_eager_ms": eager, "critic_compiled_first_ms": first, "critic_compiled_ms": comp}), flush=True)

if __name__ == "__main__":
    for name, batches in (("gemma", (64, 256)), ("qwen7b", (64, 256))):
        m = build(name)
        for b in batches: run(m, name, b)
        critic(m, name)
        del m; torch.cuda.empty_cache()
