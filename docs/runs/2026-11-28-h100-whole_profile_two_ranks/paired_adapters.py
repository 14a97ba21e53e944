"""Paired comparison of two adapters' answers on the same 200 test records, each as its run scored it:
    python paired_adapters.py ../2026-11-27-h100-rejection_sampler/sft_responses.jsonl sft_responses_p11.jsonl"""
import json
import sys

from scipy.stats import binomtest


def successes(path):
    return {r["id"]: (bool(r["score"]["success"]), r["instruction"]) for r in map(json.loads, open(path))}


a, b = successes(sys.argv[1]), successes(sys.argv[2])
shared = [k for k in a if k in b and a[k][1] == b[k][1]]
only_a = sum(a[k][0] and not b[k][0] for k in shared)
only_b = sum(b[k][0] and not a[k][0] for k in shared)
print(f"{len(shared)} shared records: {sum(a[k][0] for k in shared)} -> {sum(b[k][0] for k in shared)}, "
      f"+{only_b} -{only_a}, exact McNemar p = {binomtest(min(only_a, only_b), only_a + only_b).pvalue:.2f}")
