"""The short table gpu_run.sh prints last: test counts, the benchmark's headline, the targets.

    python -m benchmarks.gpu_summary OUT_DIR

Reads what gpu_run.sh left in OUT_DIR (steps.tsv, tests-*.log, results.json), writes
OUT_DIR/summary.md and prints it. The device tool returns only the end of a command's
output, so everything that matters is here, the targets table last.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from . import report, targets

PYTEST_TOTALS = re.compile(r"^=*\s*(\d+ (passed|failed|error|errors|skipped).*) in [\d.]+s")
# The short summary's "FAILED <id>" lines, and the per-test lines of a verbose xdist run
# ("[gw3] [ 41%] FAILED <id>"), which name failures even when the step was stopped at its
# limit before the summary.
FAILURE_LINE = re.compile(r"^(?:\[gw\d+\] \[\s*\d+%\] )?(FAILED|ERROR) (\S+)|crashed while running '([^']+)'")
MAX_FAILURES_LISTED = 12


def _steps(out: Path) -> list[str]:
    path = out / "steps.tsv"
    if not path.exists():
        return []
    lines = ["| step | exit status | seconds |", "|---|---|---|"]
    for line in path.read_text().splitlines():
        name, status, seconds = line.split("\t")
        lines.append(f"| {name} | {status} | {seconds} |")
    return lines


def _tests(out: Path) -> list[str]:
    lines = []
    for log in sorted(out.glob("tests-*.log")):
        text = log.read_text(errors="replace").splitlines()
        totals = next((m.group(1) for line in reversed(text) if (m := PYTEST_TOTALS.match(line.strip()))),
                      "no pytest summary line (timed out or crashed: see the log)")
        failures = list(dict.fromkeys(m.group(2) or m.group(3) for line in text if (m := FAILURE_LINE.search(line))))
        lines.append(f"- `{log.name}`: {totals}")
        lines += [f"  - {name}" for name in failures[:MAX_FAILURES_LISTED]]
        if len(failures) > MAX_FAILURES_LISTED:
            lines.append(f"  - ... and {len(failures) - MAX_FAILURES_LISTED} more in the log")
    return lines


def _ms(row: dict | None) -> str:
    if row is None:
        return "-"
    if row["status"] != "ok":
        return row["status"][:30]
    return f"{row['median_ms']:.3f}"


def headline(rows: list[dict]) -> list[str]:
    """Per anchor case and pass: each of our providers and the best baseline, with the ratio."""
    ours = (targets.TRITON, targets.UNTIMED, "perceiver_kernels[cuda]", targets.AUTO)
    lines = ["| suite | case | pass | provider | ms | baseline | baseline ms | speed-up |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if row["provider"] not in ours or row.get("sweep"):
            continue
        if row["provider"] == targets.AUTO and row.get("suite", "op") == "op" and row.get(
                "path", "").startswith("triton") and any(
                other["provider"] == targets.TRITON and other["case"] == row["case"]
                and other.get("pass") == row.get("pass") for other in rows):
            continue  # auto ran Triton here: the [triton] row says the same
        base = next((other for other in rows if other["provider"] == row.get("baseline")
                     and other["case"] == row["case"] and other.get("pass") == row.get("pass")
                     and other.get("suite") == row.get("suite")), None)
        lines.append(f"| {row.get('suite', 'op')} | {row['case']} | {row.get('pass', '')} | {row['provider']} | "
                     f"{_ms(row)} | {row.get('baseline', '-')} | {_ms(base)} | {report.format_ratio(row)} |")
    return lines


def ab_table(rows: list[dict]) -> list[str]:
    """The A/B of the Triton rewrites: per case and pass, the timed kernels, the untimed
    rewrites and the best SDPA backend, with untimed over timed and over the best."""
    untimed = [row for row in rows if row["provider"] == targets.UNTIMED and row.get("suite", "op") == "op"]
    if not untimed:
        return []
    lines = ["A/B of the untimed Triton rewrites (ms; speed-ups are time ratios, above 1 = the rewrite is faster):",
             "", "| case | pass | timed | untimed | untimed vs timed | best SDPA | ms | untimed vs best | untimed runs |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in untimed:
        def other(provider):
            return next((o for o in rows if o["provider"] == provider and o["case"] == row["case"]
                         and o.get("pass") == row.get("pass") and o.get("suite", "op") == "op"), None)

        timed, base = other(targets.TRITON), other(row.get("baseline"))
        versus = (f"{timed['median_ms'] / row['median_ms']:.2f}x" if timed and timed["status"] == "ok"
                  and row["status"] == "ok" else "-")
        lines.append(f"| {row['case']} | {row.get('pass', '')} | {_ms(timed)} | {_ms(row)} | {versus} | "
                     f"{row.get('baseline', '-')} | {_ms(base)} | {report.format_ratio(row)} | "
                     f"{str(row.get('path', ''))[:70]} |")
    return lines + [""]


def summary(out: Path, ab: bool = False) -> str:
    """The summary of a gpu_run.sh folder, or (ab) of an ab_run.sh folder: its steps,
    tests and A/B table without the full run's headline and targets."""
    parts = [f"## GPU {'A/B' if ab else 'run'} summary ({out})", ""]
    parts += _steps(out) + [""]
    parts += ["Tests:"] + (_tests(out) or ["- no test logs"]) + [""]
    results = out / "results.json"
    if results.exists():
        data = json.loads(results.read_text())
        env, rows = data["environment"], data["results"]
        report.annotate_ratios(rows)
        parts += [f"Benchmark: {env['device']}, commit {env['commit']}, torch {env['torch']}, "
                  f"triton {env['triton']}, `{env['command']}`", ""]
        if env.get("stopped"):
            parts += [f"Incomplete: the benchmark was {env['stopped']}.", ""]
        parts += ab_table(rows)
        if not ab:
            parts += headline(rows) + ["", targets.table(targets.evaluate(rows))]
    else:
        parts.append("Benchmark: no results.json (see bench.log)")
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_summary", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the folder gpu_run.sh (or ab_run.sh) wrote")
    parser.add_argument("--ab", action="store_true", help="the short summary of an ab_run.sh folder")
    args = parser.parse_args(argv)
    text = summary(args.out, args.ab)
    (args.out / "summary.md").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
