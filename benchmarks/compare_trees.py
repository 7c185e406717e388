"""Compare PALLAS_FLASH tables of two source trees timed in one device call.

Issue 19 asks that the restructured kernels run as fast as the tree before it. Both trees'
``benchmarks/pallas_flash.py`` run in the same call, on the same card, interleaved
(old, new, old, new) so drift shows as the spread between a tree's two runs. This script reads
their JSON files and prints, per config and mode, each run's time and new / old (the mean of
each tree's runs), then writes the table beside them.

Usage: python3 benchmarks/compare_trees.py OUT_DIR old1.json,old2.json new1.json,new2.json
"""

import json
import os
import statistics
import sys
from typing import Any


def _times(paths: list[str]) -> tuple[str, dict[tuple[str, str], list[float]]]:
    device = ""
    times: dict[tuple[str, str], list[float]] = {}
    for path in paths:
        with open(path) as fh:
            data = json.load(fh)
        device = data["device"]
        for row in data["rows"]:
            if row["impl"] == "attnax pallas_flash" and "ms" in row and not row.get("tag"):
                times.setdefault((row["cfg"], row["mode"]), []).append(row["ms"])
    return device, times


def main() -> None:
    out_dir, old_arg, new_arg = sys.argv[1:4]
    device, old = _times(old_arg.split(","))
    _, new = _times(new_arg.split(","))
    rows: list[dict[str, Any]] = []
    print(f"{device}: PALLAS_FLASH, old tree vs new tree (ms; ratio = new mean / old mean)")
    print(f"{'config':28s} {'mode':8s} {'old runs':>17s} {'new runs':>17s} {'new/old':>8s}")
    for key in sorted(set(old) & set(new)):
        ratio = statistics.mean(new[key]) / statistics.mean(old[key])
        old_runs = " ".join(f"{t:.3f}" for t in old[key])
        new_runs = " ".join(f"{t:.3f}" for t in new[key])
        print(f"{key[0]:28s} {key[1]:8s} {old_runs:>17s} {new_runs:>17s} {ratio:8.3f}")
        rows.append(
            {"cfg": key[0], "mode": key[1], "old_ms": old[key], "new_ms": new[key],
             "new_over_old": round(ratio, 4)}
        )
    path = os.path.join(out_dir, "pallas_flash_restructure_h100.json")
    with open(path, "w") as fh:
        json.dump({"device": device, "rows": rows}, fh, indent=1)
    print("wrote", path, file=sys.stderr)


if __name__ == "__main__":
    main()
