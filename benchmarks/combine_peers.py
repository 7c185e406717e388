"""Join a pallas_flash.py JSON and a torch_peers.py JSON of the same device call into one table
of ratios (peer time / attnax time) per config and mode.

Usage::

    python benchmarks/combine_peers.py OUT.json NOTE ATTNAX.json TORCH.json [ATTNAX.json TORCH.json ...]

Each pair must come from one call on one GPU; a config found in several pairs takes the last
pair's rows, and each row names the files it came from.
"""

import json
import sys
from typing import Any


def combine(pairs: list[tuple[str, str]]) -> dict[tuple[str, str], dict[str, Any]]:
    table: dict[tuple[str, str], dict[str, Any]] = {}
    for ours_path, torch_path in pairs:
        ours = json.load(open(ours_path))["rows"]
        torch = json.load(open(torch_path))["rows"]
        found: dict[tuple[str, str], dict[str, Any]] = {}
        for row in ours:
            if "ms" not in row or "sweep" in row.get("tag", ""):
                continue
            key = (row["cfg"], row["mode"])
            entry = found.setdefault(key, {"cfg": row["cfg"], "mode": row["mode"]})
            name = {"attnax pallas_flash": "attnax", "cudnn": "cudnn",
                    "cudnn dense-mask": "cudnn_dense_mask", "jax pallas mha": "jax_mha"}[row["impl"]]
            entry[name + "_ms"] = row["ms"]
        for row in torch:
            if "ms" not in row:
                continue
            impl, mode = row["impl"].rsplit(" ", 1)
            key = (row["cfg"], mode)
            if key in found:
                found[key][impl.replace(" ", "_") + "_ms"] = round(row["ms"], 4)
        for key, entry in found.items():
            if "attnax_ms" not in entry:
                continue
            for peer in ("torch_flex", "jax_mha", "cudnn", "cudnn_dense_mask", "torch_sdpa"):
                if peer + "_ms" in entry:
                    entry["speedup_vs_" + peer] = round(entry[peer + "_ms"] / entry["attnax_ms"], 3)
            entry["sources"] = [ours_path.rsplit("/", 1)[-1], torch_path.rsplit("/", 1)[-1]]
            table[key] = entry
    return table


def main() -> None:
    out, note, *paths = sys.argv[1:]
    pairs = list(zip(paths[::2], paths[1::2], strict=True))
    device = json.load(open(pairs[0][0]))["device"]
    rows = list(combine(pairs).values())
    for row in rows:
        print(f"{row['cfg']:26s} {row['mode']:8s} vs Flex {row.get('speedup_vs_torch_flex', 0):.3f}")
    with open(out, "w") as fh:
        json.dump({"device": device, "note": note, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
