"""Two runs side by side: does each speed-up agree within a tolerance?

    python -m benchmarks.compare RUN_A RUN_B [--tolerance 0.10]

RUN_A and RUN_B are run folders (the bench-out/<time> a run prints) or their
results.json. A row counts when both runs measured it and neither flagged its ratio
noisy; the baseline rows (1.00x by definition) are left out. Below the table: each run
that did not finish (stopped, or cut off while it ran), the rows that only one run
has, and the rows that one run has without a ratio (with their status). Exit status 1
when a counted ratio differs by more than the tolerance (relative to the first run's),
so the check can be scripted; 2 when a run cannot be read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .report import annotate_ratios, read_results

# Rows listed per kind below the table; a run stopped early lacks most of them.
MAX_LISTED = 20


def _rows(data: dict) -> dict[tuple, dict]:
    rows = data["results"]
    annotate_ratios(rows)
    return {(row.get("suite", "op"), row["case"], row.get("pass", ""), row["provider"]): row for row in rows}


def _ratio(row: dict) -> bool:
    """Whether the row has a speed-up to compare (a baseline's is 1.00x by definition)."""
    return row.get("speedup") is not None and row.get("baseline") != row["provider"]


def _state(row: dict) -> str:
    if _ratio(row):
        return f"{row['speedup']:.2f}x"
    return row["status"] if row["status"] != "ok" else "no baseline timed"


def _listed(title: str, keys: list[tuple], describe=lambda key: "", note: str = "") -> list[str]:
    if not keys:
        return []
    lines = ["", f"{title} ({len(keys)}{note}):"]
    lines += [f"- {' | '.join(key)}{describe(key)}" for key in keys[:MAX_LISTED]]
    if len(keys) > MAX_LISTED:
        lines.append(f"- ... and {len(keys) - MAX_LISTED} more")
    return lines


def compare(first: Path, second: Path, tolerance: float) -> tuple[str, int]:
    """(a markdown table and what the runs do not share, the number of counted ratios
    outside the tolerance). A run that cannot be read raises ValueError (one line)."""
    runs = {"A": read_results(first), "B": read_results(second)}
    a, b = (_rows(data) for data in runs.values())
    lines = ["| suite | case | pass | provider | run A | run B | difference | counted |", "|---|---|---|---|---|---|---|---|"]
    outside = counted = 0
    for key in [key for key in a if key in b and _ratio(a[key]) and _ratio(b[key])]:
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
    for label, path in zip(runs, (first, second)):
        stopped = runs[label]["environment"].get("stopped")
        if stopped:
            lines += ["", f"Run {label} ({path}) is incomplete: {stopped}."]
    for label, other, mine, theirs in (("A", "B", a, b), ("B", "A", b, a)):
        why = f"; run {other} did not finish" if runs[other]["environment"].get("stopped") else ""
        lines += _listed(f"Rows of run {label} that run {other} lacks", [key for key in mine if key not in theirs],
                         note=why)
    one_sided = [key for key in a if key in b and _ratio(a[key]) != _ratio(b[key])
                 and a[key].get("baseline") != key[3] != b[key].get("baseline")]
    lines += _listed("Rows with a ratio in one run only", one_sided,
                     lambda key: f" (run A: {_state(a[key])}, run B: {_state(b[key])})")
    return "\n".join(lines), outside


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__.splitlines()[0])
    parser.add_argument("first", type=Path, help="run A: a run folder of python -m benchmarks, or its results.json")
    parser.add_argument("second", type=Path, help="run B: likewise")
    parser.add_argument("--tolerance", type=float, default=0.10, help="largest relative difference (default 0.10)")
    args = parser.parse_args(argv)
    try:
        table, outside = compare(args.first, args.second, args.tolerance)
    except ValueError as error:
        parser.error(str(error))
    print(table)
    sys.exit(1 if outside else 0)


if __name__ == "__main__":
    main()
