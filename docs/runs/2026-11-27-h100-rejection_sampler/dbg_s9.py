import sys, time, traceback, torch
sys.path.insert(0, "scripts")
from utils import static_decode as sd
B, V = 256, 152064
torch.manual_seed(0)
logits = (torch.randn(B, V, device="cuda") * 0.5).to(torch.bfloat16); seen = torch.randint(0, V, (B, 900), device="cuda")
def timed(name, f, *a):
    try:
        f(*a); torch.cuda.synchronize(); t = time.perf_counter()
        for _ in range(20): out = f(*a)
        torch.cuda.synchronize(); print(name, "ok", round((time.perf_counter() - t) / 20 * 1e3, 3), "ms", flush=True); return out
    except Exception as e:
        print(name, "FAILED", type(e).__name__, str(e)[:300], flush=True); pass
probs = torch.softmax(sd.process_scores(logits, seen, 1.15, 0.3), -1)
for K in (8, 4):
    u = torch.rand(B, K, device="cuda", dtype=torch.float64)
    torch._dynamo.reset()
    timed(f"K={K} full compiled", torch.compile(lambda l, s, u: sd._draw_from_nucleus(l, s, u, 1.15, 0.3, 0.85), dynamic=False), logits, seen, u)
    timed(f"K={K} softmax compiled", torch.compile(lambda l, s: torch.softmax(sd.process_scores(l, s, 1.15, 0.3), -1), dynamic=False), logits, seen)
    timed(f"K={K} draws compiled", torch.compile(sd.inverse_cdf_draws, dynamic=False), probs, u)
    out = timed(f"K={K} rejection compiled", torch.compile(lambda p, u: sd.nucleus_rejection_sample(p, u, 0.85), dynamic=False), probs, u)
    if out is not None: print("  missed rows", int(out[1].sum()))
    timed(f"K={K} eager full", lambda l, s, u: sd._draw_from_nucleus(l, s, u, 1.15, 0.3, 0.85), logits, seen, u)
# the old in-graph part plus the fallback, eager, for reference
def old(l, s):
    p = torch.softmax(sd.process_scores(l, s, 1.15, 0.3), -1)
    t, unc = sd._nucleus_sample(p, 512, 0.85)
    rows = unc.nonzero().squeeze(1); rp = p[rows]
    t2, unc2 = sd._nucleus_sample(rp, 8192, 0.85)
    return t, unc.sum(), unc2.sum()
r = timed("old eager (topk 512, then 8192 for uncovered rows; no sort)", old, logits, seen); print("  uncovered", [int(x) for x in r[1:]])
# exactness spot check: the two-level draws against one float64 cumulative sum
u = torch.rand(B, 8, device="cuda", dtype=torch.float64)
ref = torch.searchsorted(probs.cumsum(-1, dtype=torch.float64), u * probs.sum(-1, keepdim=True, dtype=torch.float64), right=True)
print("draws equal to one float64 cumsum:", float((sd.inverse_cdf_draws(probs, u) == ref).double().mean()))
