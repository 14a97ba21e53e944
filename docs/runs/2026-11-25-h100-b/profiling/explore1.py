"""Where does the engine's time go? Random 7B-shape and gemma-270m-shape models, current StaticDecoder."""
import json, os, sys, time
sys.path.insert(0, "scripts")
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Gemma3TextConfig, Gemma3ForCausalLM
from utils.static_decode import StaticDecoder, _register_decode_attention
from torch.profiler import profile, ProfilerActivity

OUT = os.environ.get("OUT", "/tmp")
QWEN = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
            num_key_value_heads=4, vocab_size=152064, max_position_embeddings=4096, rope_theta=1e6, tie_word_embeddings=False)

def sync(): torch.cuda.synchronize()
def now(): sync(); return time.perf_counter()

def build(name):
    if name == "qwen7b":
        cfg, cls = Qwen2Config(**QWEN), Qwen2ForCausalLM
    else:
        d = json.load(open("devrun/gemma_config.json")); d.pop("architectures", None); d.pop("dtype", None)
        cfg, cls = Gemma3TextConfig(**{k: v for k, v in d.items() if not k.startswith("_")}), Gemma3ForCausalLM
    cfg._attn_implementation = "sdpa"
    with torch.device("cuda"):
        m = cls(cfg).to(torch.bfloat16)
    return m.eval()

def top_kernels(prof, n=14):
    ev = [e for e in prof.key_averages() if e.device_time_total > 0]
    ev.sort(key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in ev)
    lines = [f"  total device {total/1000:.2f} ms"]
    for e in ev[:n]:
        lines.append(f"  {e.self_device_time_total/1000:8.2f} ms {e.count:6d}x  {e.key[:110]}")
    return "\n".join(lines)

def breakdown(model, name, batch, width=64, new=64):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 100000, (batch, width), generator=g).cuda()
    att = torch.ones_like(ids)
    res = {"model": name, "batch": batch}
    for rep in range(2):
        t0 = now()
        dec = StaticDecoder(model, ids, att, new, 0, {1}, 0.0, 1.0, 1.0)
        t1 = now()
        cfg = model.config; impl = cfg._attn_implementation
        with torch.no_grad():
            dec._prefill(); t2 = now()
            cfg._attn_implementation = _register_decode_attention()
            dec._eager_step(); t3 = now()
            step = dec._capture(); t4 = now()
            for _ in range(new - 3): step()
            t5 = now()
            cfg._attn_implementation = impl
        res[f"rep{rep}"] = dict(init_ms=(t1-t0)*1e3, prefill_ms=(t2-t1)*1e3, eager_step_ms=(t3-t2)*1e3,
                                capture_ms=(t4-t3)*1e3, replay_ms_per_step=(t5-t4)*1e3/(new-3), total_ms=(t5-t0)*1e3)
    # profile replays and prefill
    with torch.no_grad():
        dec = StaticDecoder(model, ids, att, new, 0, {1}, 0.0, 1.0, 1.0)
        with profile(activities=[ProfilerActivity.CUDA]) as p:
            dec._prefill(); sync()
        res["prefill_profile"] = top_kernels(p, 10)
        cfg._attn_implementation = _register_decode_attention()
        dec._eager_step(); step = dec._capture()
        for _ in range(5): step()
        sync()
        with profile(activities=[ProfilerActivity.CUDA]) as p:
            for _ in range(10): step()
            sync()
        cfg._attn_implementation = impl
        res["replay_profile_10_steps"] = top_kernels(p, 18)
    print(json.dumps({k: v for k, v in res.items() if "profile" not in k}), flush=True)
    print(res["prefill_profile"]); print(res["replay_profile_10_steps"], flush=True)
    return res

def gemm_bench(M):
    shapes = dict(q=(3584, 3584), k=(512, 3584), v=(512, 3584), o=(3584, 3584), gate=(18944, 3584), up=(18944, 3584),
                  down=(3584, 18944), qkv=(4608, 3584), gate_up=(37888, 3584))
    x = {K: torch.randn(M, K, dtype=torch.bfloat16, device="cuda") for K in (3584, 18944)}
    out = {}
    for n, (N, K) in shapes.items():
        w = torch.randn(N, K, dtype=torch.bfloat16, device="cuda")
        for _ in range(3): torch.nn.functional.linear(x[K], w)
        t = now()
        for _ in range(50): torch.nn.functional.linear(x[K], w)
        dt = (now() - t) / 50
        out[n] = dict(us=round(dt * 1e6, 1), GBps=round(N * K * 2 / dt / 1e9))
    sep = sum(out[n]["us"] for n in ("q", "k", "v", "o", "gate", "up", "down"))
    fused = out["qkv"]["us"] + out["o"]["us"] + out["gate_up"]["us"] + out["down"]["us"]
    print(json.dumps({"M": M, "per_layer_separate_us": round(sep, 1), "per_layer_fused_us": round(fused, 1),
                      "x28_separate_ms": round(sep * 28 / 1e3, 2), "x28_fused_ms": round(fused * 28 / 1e3, 2), **out}), flush=True)

def critic(model):
    ids = torch.randint(1000, 100000, (64, 160)).cuda()
    with torch.no_grad():
        for _ in range(2): model(input_ids=ids, logits_to_keep=1)
        t = now()
        for _ in range(5): model(input_ids=ids, logits_to_keep=1)
        dt = (now() - t) / 5
        with profile(activities=[ProfilerActivity.CUDA]) as p:
            model(input_ids=ids, logits_to_keep=1); sync()
    print(json.dumps({"critic_ms": dt * 1e3}))
    print(top_kernels(p, 16), flush=True)

if __name__ == "__main__":
    src = torch.empty(1 << 28, dtype=torch.bfloat16, device="cuda"); dst = torch.empty_like(src)
    dst.copy_(src); t = now()
    for _ in range(10): dst.copy_(src)
    print("copy GB/s", 2 * src.numel() * 2 * 10 / (now() - t) / 1e9); del src, dst
    for M in (1, 64, 256): gemm_bench(M)
    for name, batches in (("gemma", (64, 256)), ("qwen7b", (1, 64, 256))):
        m = build(name)
        print("weights GB", sum(p.numel() * p.element_size() for p in m.parameters()) / 1e9, flush=True)
        for b in batches: breakdown(m, name, b)
        critic(m)
        del m; torch.cuda.empty_cache()
