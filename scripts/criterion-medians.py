#!/usr/bin/env python3
"""Print criterion's median estimates as a markdown table.

Usage: scripts/criterion-medians.py [CRITERION_DIR] [GROUP ...]
CRITERION_DIR defaults to target/criterion. Medians come from each
benchmark's new/estimates.json (median.point_estimate, in ns).
"""
import json
import pathlib
import sys


def fmt(ns: float) -> str:
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.2f} µs"
    return f"{ns:.2f} ns"


def main() -> None:
    root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "target/criterion")
    groups = set(sys.argv[2:])
    print("| benchmark | median |")
    print("|---|---:|")
    for estimates in sorted(root.glob("**/new/estimates.json")):
        bench = estimates.parent.parent.relative_to(root)
        if groups and bench.parts[0] not in groups:
            continue
        median = json.loads(estimates.read_text())["median"]["point_estimate"]
        # criterion stores names with '/' replaced by '_' in directories;
        # benchmark.json keeps the real id.
        meta = estimates.parent / "benchmark.json"
        name = json.loads(meta.read_text())["full_id"] if meta.exists() else str(bench)
        print(f"| {name} | {fmt(median)} |")


if __name__ == "__main__":
    main()
