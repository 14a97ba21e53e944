"""Wording-generalisation probe: the same tasks and constraints worded with a training wording (A)
and a test wording (B), plus constrained training records as they were trained (C)."""
import json, random, sys
sys.path.insert(0, "scripts")
from utils import constraints as C
tasks = sorted({json.loads(l)["task"] for l in open("/tmp/r6/data/test_instructions.jsonl") if json.loads(l).get("task")})
rng = random.Random(5)
fams = [f for f in C.TRAINED_FAMILIES]
out = {"A": [], "B": [], "C": []}
i = 0
for rep in range(4):
    for fam in fams:
        task = rng.choice(tasks)
        for split, key in (("train", "A"), ("test", "B")):
            c = C.sample_constraint(fam, random.Random(1000 + i), split=split)
            instruction, cons = C.build_instruction(task, [c])
            out[key].append({"id": f"{key}{i:03d}", "type": "instruction_following", "instruction": instruction, "task": task,
                             "constraints": [C.to_record(x) for x in cons], "constraint_split": "trained"})
        i += 1
data = [json.loads(l) for l in open("/tmp/r6/scale/data.jsonl")]
single = [r for r in data if r.get("constraints") and len(r["constraints"]) == 1 and r.get("constraint_mode") != "list_format"]
rng.shuffle(single)
for j, r in enumerate(single[:80]):
    out["C"].append({"id": f"C{j:03d}", "type": "instruction_following", "instruction": r["instruction"],
                     "constraints": r["constraints"], "constraint_split": "trained"})
with open(".device/probe/probe.jsonl", "w") as f:
    for key in "ABC":
        for r in out[key]:
            f.write(json.dumps(r) + "\n")
print({k: len(v) for k, v in out.items()})
print(out["A"][0]["instruction"]); print(out["B"][0]["instruction"]); print(out["C"][0]["instruction"])
