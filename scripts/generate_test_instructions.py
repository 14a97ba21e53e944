"""Write the held-out test instructions (five types, with scorer metadata) used by the paired evaluation.

    python scripts/generate_test_instructions.py --count 200 --seed 999 --output data/test_instructions.jsonl

The JSONL is written atomically with sorted keys, so the same --count and --seed give a
byte-identical file; `<stem>.manifest.json` beside it (written last) records its sha256 and the QC.
Exit 0 on success, 2 on a bad flag (--count below 5, a negative --seed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from utils.cli_validation import in_range, non_negative_int  # noqa: E402
from utils.exit_codes import EXIT_GATE_FAILED, EXIT_OK, run_cli  # noqa: E402

MIN_COUNT = 5  # one instruction of each of the five types


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--count", type=in_range(int, MIN_COUNT), default=200, help="test instructions to write (at least 5, one per type)")
    parser.add_argument("--seed", type=non_negative_int, default=999, help="seed of the private random.Random that picks templates")
    parser.add_argument("--output", type=Path, default=Path("data/test_instructions.jsonl"), help="output JSONL file")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    from utils.constraints import CATALOGUE_VERSION, HELD_OUT_FAMILIES, TRAINED_FAMILIES
    from utils.jsonl_io import write_jsonl_atomic
    from utils.provenance_helper import create_session_manifest, write_manifest_atomic
    from utils.test_set import build_test_set, check_test_set

    records = build_test_set(count=args.count, seed=args.seed)
    qc = check_test_set(records)
    write_jsonl_atomic(args.output, records)
    manifest_path = args.output.with_name(f"{args.output.stem}.manifest.json")
    manifest = create_session_manifest("test_instructions", args, outputs={"data": args.output}, qc=qc,
                                       records=len(records), counts_by_type=qc["counts_by_type"],
                                       constraint_catalogue={"version": CATALOGUE_VERSION, "held_out_families": list(HELD_OUT_FAMILIES),
                                                             "trained_families": list(TRAINED_FAMILIES)})
    write_manifest_atomic(manifest_path, manifest)
    for type_name, n in qc["counts_by_type"].items():
        print(f"  {type_name:<22} {n:>4}")
    print(f"  instruction_following by family split: {qc['instruction_following_by_split']} (catalogue {CATALOGUE_VERSION})")
    print(f"[test-set] {len(records)} instructions (seed {args.seed}) in {args.output}; manifest {manifest_path}")
    if not qc["passed"]:
        print(f"[test-set] QC failed: {'; '.join(qc['failures'])}", file=sys.stderr)
        return EXIT_GATE_FAILED
    return EXIT_OK


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
