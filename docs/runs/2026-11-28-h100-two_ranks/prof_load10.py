"""Profile one CleanModelLoader().load() (with sentinels, as the pipeline loads) and print where it went."""
import cProfile
import io
import pstats
import sys
import time

sys.path.insert(0, "scripts")
t0 = time.time()
import torch  # noqa: E402

t1 = time.time()
torch.zeros(1).cuda()
t2 = time.time()
from utils.clean_model_loader import CleanModelLoader  # noqa: E402

prof = cProfile.Profile()
prof.enable()
model, tok, prov = CleanModelLoader().load()
prof.disable()
print(f"import torch {t1 - t0:.2f} s; cuda init {t2 - t1:.2f} s; load_seconds {prov['load_seconds']}")
for key in ("cumulative", "tottime"):
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats(key).print_stats(45)
    print(out.getvalue())
