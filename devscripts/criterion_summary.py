#!/usr/bin/env python3
"""Median and spread of each criterion benchmark of `cargo bench -p gpupool`, as a Markdown table.

Reads criterion's own records (target/criterion/<group>/<function>/<size>/new/sample.json and
benchmark.json): per sample, time / iterations is one figure per iteration (one allocate +
drop pair; in the throughput benchmarks, one pair on each thread); the table gives their
median, minimum and maximum over the samples, criterion's median absolute deviation, and for
the throughput benchmarks the same as pairs per second over all threads.

    cargo bench -p gpupool && python3 devscripts/criterion_summary.py [target/criterion]
"""

import json
import pathlib
import statistics
import sys


def ns(value):
    """A time per operation in the unit that suits it."""
    if value < 1e3:
        return f"{value:.1f} ns"
    if value < 1e6:
        return f"{value / 1e3:.2f} µs"
    return f"{value / 1e6:.2f} ms"


def rate(value):
    """Operations per second as M/s or k/s."""
    if value >= 1e6:
        return f"{value / 1e6:.1f} M/s"
    if value >= 1e3:
        return f"{value / 1e3:.0f} k/s"
    return f"{value:.0f} /s"


def main():
    root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "target/criterion")
    rows = []
    for sample_path in sorted(root.glob("**/new/sample.json")):
        directory = sample_path.parent
        benchmark = json.loads((directory / "benchmark.json").read_text())
        sample = json.loads(sample_path.read_text())
        estimates = json.loads((directory / "estimates.json").read_text())
        per_op = [t / i for t, i in zip(sample["times"], sample["iters"])]
        median = statistics.median(per_op)
        mad = estimates["median_abs_dev"]["point_estimate"]
        elements = (benchmark.get("throughput") or {}).get("Elements", 1)
        row = [
            benchmark["full_id"],
            f"{ns(median)} [{ns(min(per_op))} – {ns(max(per_op))}]",
            f"± {ns(mad)}",
            f"{len(per_op)}",
        ]
        if elements > 1:
            rates = sorted(elements * 1e9 / t for t in per_op)
            row.append(
                f"{rate(elements * 1e9 / median)} [{rate(rates[0])} – {rate(rates[-1])}]"
            )
        else:
            row.append("")
        rows.append(row)
    print("| benchmark | time per iteration: median [min – max] | MAD | samples "
          "| pairs per second over all threads: median [min – max] |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
