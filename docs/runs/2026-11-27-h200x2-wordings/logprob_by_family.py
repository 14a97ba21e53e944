# Run on the CPU after the lease: /tmp/r6/scale/data.jsonl is this run's data (scale_data_manifest.json); /tmp/r7/trainA is the retrained adapter (not kept here).
"""Per family: mean log p of the gold response's first 4 tokens and of the whole response, base vs adapter,
on single-constraint training records (probe C) and on unconstrained ones."""
import json, sys, collections, torch
sys.path.insert(0, "scripts")
from utils.clean_model_loader import CleanModelLoader
from utils.completion_prompts import CompletionStylePrompts as P
from utils.prompt_guards import encode_prompt, encode_continuation
from utils.sft_training import load_adapter
model, tok, prov = CleanModelLoader(None, dtype="float32").load()
model.eval()
rows = [json.loads(l) for l in open("/tmp/r6/scale/data.jsonl")]
want = {"uppercase", "lowercase", "quoted", "title", "postscript", "json_object", "words_max", "first_word", "end_phrase"}
picked = collections.defaultdict(list)
for r in rows:
    cs = r.get("constraints") or []
    if len(cs) == 1 and cs[0]["family"] in want and len(picked[cs[0]["family"]]) < 4:
        picked[cs[0]["family"]].append(r)
def score(m, r):
    p = encode_prompt(tok, P.create_response_prompt(r["instruction"])); c = encode_continuation(tok, P.format_completion(r["response"]))
    ids = torch.tensor([p + c]);
    with torch.no_grad(): lp = torch.log_softmax(m(ids).logits[0, len(p) - 1:-1].float(), -1)
    t = lp[torch.arange(len(c)), torch.tensor(c)]
    return t[:4].mean().item(), t.mean().item()
res = {}
for fam, rs in picked.items(): res[fam] = [score(model, r) for r in rs]
ad = load_adapter(model, "/tmp/r7/trainA/final_adapter"); ad.eval()
for fam, rs in picked.items():
    a = [score(ad, r) for r in rs]; b = res[fam]
    f = lambda xs, i: sum(x[i] for x in xs) / len(xs)
    print(f"{fam:13s} first4 base {f(b,0):6.2f} adapter {f(a,0):6.2f} | all base {f(b,1):6.2f} adapter {f(a,1):6.2f}  (n={len(rs)})", flush=True)
