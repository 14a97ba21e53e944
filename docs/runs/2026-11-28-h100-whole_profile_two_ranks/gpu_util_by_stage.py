"""GPU utilization and memory by stage from nvidia-smi's samples (run on this machine after the lease):
    python gpu_util_by_stage.py gpu_samples_p11.txt 5 81 214 118 31
The stage windows are the driver's own stage seconds laid end to end from the first sample, so each boundary is
good to about a second."""
import sys
from datetime import datetime

rows = []
for line in open(sys.argv[1]):
    parts = [part.strip() for part in line.split(",")]
    if len(parts) == 3 and parts[1].isdigit():
        rows.append((datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f"), int(parts[1]), int(parts[2])))
start, edge = rows[0][0], 0.0
for name, seconds in zip(["test set", "pilot", "scale", "train", "evaluate"], map(float, sys.argv[2:]), strict=True):
    window = [(util, mib) for t, util, mib in rows if edge <= (t - start).total_seconds() < edge + seconds]
    print(f"{name:9s} samples {len(window):4d}  mean utilization {sum(u for u, _ in window) / len(window):5.1f}%  "
          f"max memory used {max(m for _, m in window) / 1024:5.1f} GiB")
    edge += seconds
