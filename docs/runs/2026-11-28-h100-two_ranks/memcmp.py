"""Peak RSS of the relevance scorer's per-token log-probabilities on one batch of logits shaped like the bundled model's
(64 rows x 32 kept positions x 262,144 vocabulary, bf16 = 1 GiB): the old way (float32 copy, float32 log-softmax) vs
the new (logsumexp a few rows at a time)."""
import resource
import sys

import torch

sys.path.insert(0, "scripts")
from utils.instruction_critic import LOGIT_BUDGET  # noqa: E402

torch.manual_seed(0)
rows, keep, vocab = 64, 32, 262144
logits = torch.randn(rows, keep + 1, vocab, dtype=torch.bfloat16)[:, :-1, :]
targets = torch.randint(0, vocab, (rows, keep))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if sys.argv[1] == "old":
    picked = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
else:
    at_once = max(1, LOGIT_BUDGET // (keep * vocab))
    picked = torch.cat([c.gather(-1, t.unsqueeze(-1)).squeeze(-1).float() - torch.logsumexp(c.float(), dim=-1)
                        for c, t in zip(logits.split(at_once), targets.split(at_once), strict=True)])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(f"{sys.argv[1]}: logits {logits.numel() * 2 / 2**30:.2f} GiB, peak RSS above them {(peak - base) / 2**20:.2f} GiB, "
      f"checksum {picked.double().sum().item():.4f}")
