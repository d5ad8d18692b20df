"""Read a kernels-*.json written by benchmarks/kernels.py and check the issue's GPU targets.

    python benchmarks/check_targets.py benchmarks/results/kernels-cuda-*.json

Targets (H100/H200, n >= 1e7): perturb and zo_update at >= 85% of the measured copy bandwidth and
>= 3x faster than the per-tensor baseline; AdamW >= 1.0x torch.optim.AdamW(fused=True).
Prints one line per check; exits 1 if any fails.
"""

import argparse
import json
import sys

CHECKS = [  # (op, field, minimum)
    ("perturb", "fraction_of_copy", 0.85),
    ("perturb", "speedup_vs_baseline", 3.0),
    ("zo_update", "fraction_of_copy", 0.85),
    ("zo_update", "speedup_vs_baseline", 3.0),
    ("adamw", "speedup_vs_baseline", 1.0),
]


def main(paths):
    ok = True
    for path in paths:
        data = json.load(open(path))
        print(f"{path}: {data['device']}")
        for op, field, minimum in CHECKS:
            for r in (
                r
                for r in data["rows"]
                if r["op"] == op
                and r["n"] >= 10**7
                and (field != "speedup_vs_baseline" or op == "adamw" or r["baseline"].startswith("per-tensor"))
            ):
                passed = r[field] is not None and r[field] >= minimum
                ok &= passed
                verdict = "PASS" if passed else "FAIL"
                print(f"  {verdict} {op:<10} n={r['n']:<10} {field} = {r[field]:.2f} (target >= {minimum})")
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="kernels-cuda-*.json files written by benchmarks/kernels.py")
    sys.exit(main(parser.parse_args().paths))
