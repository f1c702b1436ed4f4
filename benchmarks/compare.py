"""Two runs side by side: does each speed-up agree within a tolerance?

    python -m benchmarks.compare RUN_A/results.json RUN_B/results.json [--tolerance 0.10]

A row counts when both runs measured it and neither flagged its ratio noisy; the
baseline rows (1.00x by definition) are left out. Exit status 1 when a counted ratio
differs by more than the tolerance (relative to the first run's), so the check can be
scripted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .report import annotate_ratios


def _ratios(path: Path) -> dict[tuple, dict]:
    rows = json.loads(path.read_text())["results"]
    annotate_ratios(rows)
    return {(row.get("suite", "op"), row["case"], row.get("pass", ""), row["provider"]): row for row in rows
            if row.get("speedup") is not None and row.get("baseline") != row["provider"]}


def compare(first: Path, second: Path, tolerance: float) -> tuple[str, int]:
    """(a markdown table, the number of counted ratios outside the tolerance)."""
    a, b = _ratios(first), _ratios(second)
    lines = ["| suite | case | pass | provider | run A | run B | difference | counted |", "|---|---|---|---|---|---|---|---|"]
    outside = counted = 0
    for key in [key for key in a if key in b]:
        ra, rb = a[key], b[key]
        difference = rb["speedup"] / ra["speedup"] - 1
        noisy = ra.get("ratio_noisy") or rb.get("ratio_noisy")
        verdict = "no (noisy)" if noisy else "yes"
        if not noisy:
            counted += 1
            if abs(difference) > tolerance:
                outside += 1
                verdict = f"yes: OUTSIDE {tolerance:.0%}"
        lines.append(f"| {' | '.join(key)} | {ra['speedup']:.2f}x | {rb['speedup']:.2f}x | {difference:+.1%} | {verdict} |")
    lines += ["", f"{counted - outside} of {counted} counted ratios agree within {tolerance:.0%} "
                  f"({len(lines) - 2 - counted} flagged noisy in either run)."]
    return "\n".join(lines), outside


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__.splitlines()[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    parser.add_argument("--tolerance", type=float, default=0.10, help="largest relative difference (default 0.10)")
    args = parser.parse_args(argv)
    table, outside = compare(args.first, args.second, args.tolerance)
    print(table)
    sys.exit(1 if outside else 0)


if __name__ == "__main__":
    main()
