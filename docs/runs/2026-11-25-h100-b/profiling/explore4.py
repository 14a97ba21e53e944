import json, sys
sys.path.insert(0, "scripts"); sys.path.insert(0, "devrun")
import torch
from explore1 import build
from utils.static_decode import StaticDecoder

m = build("gemma")
ids = torch.randint(1000, 100000, (64, 64), generator=torch.Generator().manual_seed(0)).cuda(); att = torch.ones_like(ids)
def first_diff(a, b):
    d = (a != b).any(dim=0).nonzero()
    return int(d[0]) if len(d) else None
g = StaticDecoder(m, 64, 64, 32, 0, {1}, 0.0, 1.0, 1.0)
a = g.decode(ids, att); b = g.decode(ids, att)
c = StaticDecoder(m, 64, 64, 32, 0, {1}, 0.0, 1.0, 1.0).decode(ids, att)
print("greedy reused==fresh", torch.equal(a, b), "fresh==fresh", torch.equal(a, c), first_diff(a, b))
for temp, top_p in ((0.7, 0.9), (0.7, 1.0)):
    s = StaticDecoder(m, 64, 64, 32, 0, {1}, temp, top_p, 1.1)
    torch.manual_seed(3); r0 = torch.cuda.get_rng_state(); a = s.decode(ids, att); r1 = torch.cuda.get_rng_state()
    torch.manual_seed(3); b = s.decode(ids, att); r2 = torch.cuda.get_rng_state()
    torch.manual_seed(3); b2 = s.decode(ids, att)
    s2 = StaticDecoder(m, 64, 64, 32, 0, {1}, temp, top_p, 1.1); torch.manual_seed(3); c = s2.decode(ids, att)
    e = StaticDecoder(m, 64, 64, 32, 0, {1}, temp, top_p, 1.1, use_cuda_graph=False); torch.manual_seed(3); ee = e.decode(ids, att)
    print(json.dumps({"top_p": top_p, "fresh_vs_reused_first_diff_step": first_diff(a, b), "reused_vs_reused": torch.equal(b, b2),
                      "fresh_vs_fresh": torch.equal(a, c), "graph_vs_eager_first_diff": first_diff(a, ee),
                      "rng_after_fresh": r1.view(torch.int64).tolist(), "rng_after_reused": r2.view(torch.int64).tolist(), "rng_seeded": r0.view(torch.int64).tolist(),
                      "uncovered_any": bool(s.uncovered.any())}), flush=True)
