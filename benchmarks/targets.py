"""The performance targets of the open kernel issues, checked against a run's rows.

One declarative list: each target names a case and pass of a suite, a metric and a
threshold. `report.write` appends the table to report.md when a run measured any of
the cases; `gpu_run.sh` prints it last. Re-check any results file with

    python -m benchmarks.targets bench-out/<time>     # a run folder, or its results.json

Metrics:
- "speedup": the suite's speed-up column (op: over the best SDPA backend timed in the
  same run; model: over HF transformers, or for Perceiver AR over plain PyTorch and,
  in generation, over generating without the cache), at least `threshold`.
- "peak ratio": peak memory over that of the same baseline row, at most `threshold`.
- "vs <case>": the provider's time on <case> over its time on this case (a mask that
  costs nothing gives 1.0), at least `threshold`.
- "us per call": the host suite's microseconds per call, at most `threshold`.
A target with a `baseline` provider measures its speed-up over that row instead (the
wide heads' "plain PyTorch" is the `naive` row), paired round by round.
A target on EVERY_CASE holds for every case of its suite and pass: the worst one is
reported (issue 22: auto within 3% of the best SDPA backend everywhere).
The kernel targets of issues 23-26 are the Triton rewrites': the
perceiver_kernels[triton untimed] row while they are untimed, the [triton] row once a
GPU run made them the timed kernels, or in runs without either the auto row where auto
ran Triton. Causal speed-ups are over the best SDPA backend that accepts the
lower-right causal bias: a backend that refuses it has no time, so it is no baseline.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import report

AUTO = "perceiver_kernels"
TRITON = "perceiver_kernels[triton]"
UNTIMED = "perceiver_kernels[triton untimed]"  # the Triton rewrites no GPU has timed yet


@dataclass(frozen=True)
class Target:
    issue: int
    case: str
    pass_name: str
    metric: str
    threshold: float
    suite: str = "op"
    provider: str = UNTIMED
    baseline: Optional[str] = None  # a provider to measure the speed-up over, instead of the suite's

    @property
    def at_most(self) -> bool:
        return self.metric in ("peak ratio", "us per call")


MODEL_CASE = "224x224 Fourier classifier"  # model_suite.GPU_CONFIG
FLOW_CASE = "368x496 optical flow"  # model_suite.flow_case(model_suite.FLOW_GPU)
EVERY_CASE = "every case"
TARGETS = [
    # 22: auto is within 3% of the best SDPA backend, or faster, on every op case (masked
    # ones included), and a Triton call costs the host no more than 25 us (SDPA's: 15).
    Target(22, EVERY_CASE, "forward", "speedup", 0.97, provider=AUTO),
    Target(22, EVERY_CASE, "forward+backward", "speedup", 0.97, provider=AUTO),
    Target(22, "call 1x1x16x16 d64", "host", "us per call", 25.0, suite="host", provider=TRITON),
    Target(22, "call 8x8x512x512 d64", "host", "us per call", 25.0, suite="host", provider=TRITON),
    Target(22, "dispatch", "host", "us per call", 5.0, suite="host", provider=AUTO),
    # 23: DECODE (H200, bf16, against the best SDPA backend in the same run).
    Target(23, "DEC-1", "forward", "speedup", 1.3),
    Target(23, "DEC O=1048576", "forward", "speedup", 1.3),
    *[Target(23, f"DEC O={o}", "forward", "speedup", 1.2) for o in (65_536, 262_144)],
    Target(23, "DEC-1 residual", "forward", "speedup", 1.6),
    Target(23, "DEC-1 d32", "forward", "speedup", 1.1),
    Target(23, "DEC-1 d128", "forward", "speedup", 1.1),
    Target(23, "DEC-2", "forward", "speedup", 1.0),
    Target(23, "DEC-1", "forward", "peak ratio", 1.0),
    # 24: ENCODE, masks, Perceiver AR's causal ENCODE.
    Target(24, "ENC-3", "forward", "speedup", 1.6),
    Target(24, "ENC-1", "forward", "speedup", 1.0),
    Target(24, "ENC-2", "forward", "speedup", 1.0),
    *[Target(24, f"ENC M={m}", "forward", "speedup", 1.0) for m in (16_384, 65_536, 262_144, 1_048_576)],
    Target(24, "ENC-1 d128", "forward", "speedup", 1.0),
    Target(24, "ENC-4", "forward", "speedup", 1.0),  # ENC-1 at head dim 32
    Target(24, "ENC-1 masked", "forward", "vs ENC-1", 0.9),
    Target(24, "ENC-1 masked", "forward", "speedup", 1.2),
    Target(24, "ENC-3 masked", "forward", "speedup", 6.0),
    Target(24, "AR-8k causal", "forward", "speedup", 1.2),
    Target(24, "AR-64k causal", "forward", "speedup", 1.2),
    # 25: the released models' wide heads, against plain PyTorch (the naive row) and SDPA ...
    Target(25, "IMG-261", "forward", "speedup", 5.0, baseline="naive"),
    Target(25, "IMG-261", "forward", "speedup", 9.0),
    Target(25, "IMG-322", "forward", "speedup", 4.0, baseline="naive"),
    Target(25, "FLOW-512 decode", "forward", "speedup", 2.0, baseline="naive"),
    Target(25, "IMG-261", "forward+backward", "speedup", 3.0, baseline="naive"),
    Target(25, "IMG-322", "forward+backward", "speedup", 2.5, baseline="naive"),
    Target(25, "FLOW-512 decode", "forward+backward", "speedup", 1.6, baseline="naive"),
    # ... and end to end (this package's model against HF's, same weights).
    Target(25, MODEL_CASE, "inference", "speedup", 6.0, suite="model", provider=AUTO),
    Target(25, MODEL_CASE, "training step", "speedup", 3.0, suite="model", provider=AUTO),
    Target(25, MODEL_CASE, "training step", "peak ratio", 0.5, suite="model", provider=AUTO),
    Target(25, FLOW_CASE, "inference", "speedup", 5.0, suite="model", provider=AUTO),
    # 26: training (forward + backward against the best SDPA backend), no more memory.
    Target(26, "ENC-1", "forward+backward", "speedup", 1.0),
    Target(26, "ENC-3", "forward+backward", "speedup", 1.4),
    Target(26, "ENC-3 masked", "forward+backward", "speedup", 3.0),
    Target(26, "DEC-1", "forward+backward", "speedup", 1.1),
    Target(26, "DEC-1 residual", "forward+backward", "speedup", 1.1),
    Target(26, "AR-8k causal", "forward+backward", "speedup", 1.0),
    *[Target(26, case, "forward+backward", "peak ratio", 1.0) for case in ("ENC-1", "ENC-3", "DEC-1")],
]


@dataclass
class Result:
    target: Target
    status: str  # PASS, FAIL, "not measured" or why the row has no figure
    measured: Optional[float] = None
    against: str = ""
    noisy: bool = False
    provider: str = ""  # of the row measured: the target's, or the auto row that ran its backend


def _find(rows: list[dict], suite: str, case: str, pass_name: str, provider: str) -> Optional[dict]:
    """The row of a target's provider, or of the provider that stands for it in this run
    (the timed Triton row for the untimed one, auto's row where auto ran Triton)."""
    matches = [row for row in rows if row.get("suite", "op") == suite and row["case"] == case
               and row.get("pass") == pass_name]
    standing_in = (UNTIMED, TRITON) if provider == UNTIMED else (provider,)
    for name in standing_in:
        row = next((row for row in matches if row["provider"] == name), None)
        if row is not None:
            return row
    if TRITON in standing_in:
        return next((row for row in matches if row["provider"] == AUTO
                     and str(row.get("path", "")).startswith("triton")), None)
    return None


def _by_name(rows: list[dict]) -> dict[tuple, dict]:
    return {(row.get("suite", "op"), row["case"], row.get("pass"), row["provider"]): row for row in rows}


def _check(target: Target, rows: list[dict]) -> Result:
    if target.case == EVERY_CASE:
        return _check_every_case(target, rows)
    row = _find(rows, target.suite, target.case, target.pass_name, target.provider)
    if row is None:
        return Result(target, "not measured")
    if row["status"] != "ok":
        return Result(target, row["status"], provider=row["provider"])
    noisy = bool(row.get("ratio_noisy"))
    if target.metric == "speedup" and target.baseline:
        base = _by_name(rows).get((target.suite, target.case, target.pass_name, target.baseline))
        if base is None or base["status"] != "ok":
            return Result(target, f"no {target.baseline} row", provider=row["provider"])
        measured, low, high = report.paired_speedup(row, base)
        against = base["provider"]
        noisy = not math.isnan(low) and max(measured - low, high - measured) / measured > report.RATIO_NOISE_LIMIT
    elif target.metric == "speedup":
        if row.get("speedup") is None:
            return Result(target, "no baseline", provider=row["provider"])
        measured, against = row["speedup"], row["baseline"]
    elif target.metric == "peak ratio":
        base = _by_name(rows).get((target.suite, target.case, target.pass_name, row.get("baseline")))
        if base is None or not row.get("peak_mib") or not base.get("peak_mib"):
            return Result(target, "no peak memory", provider=row["provider"])
        measured, against = row["peak_mib"] / base["peak_mib"], base["provider"]
    elif target.metric == "us per call":
        measured, against, noisy = row["median_ms"] * 1e3, "", False
    elif target.metric.startswith("vs "):
        other = _by_name(rows).get((target.suite, target.metric[3:], target.pass_name, row["provider"]))
        if other is None or other["status"] != "ok":
            return Result(target, "not measured", provider=row["provider"])
        measured, against, noisy = other["median_ms"] / row["median_ms"], "", False
    else:
        raise ValueError(f"unknown metric {target.metric!r}")
    passed = measured <= target.threshold if target.at_most else measured >= target.threshold
    return Result(target, "PASS" if passed else "FAIL", measured, against, noisy, row["provider"])


def _check_every_case(target: Target, rows: list[dict]) -> Result:
    """The worst speed-up of the provider over the suite's baseline among the pass's cases."""
    measured = [row for row in rows if row.get("suite", "op") == target.suite and row.get("pass") == target.pass_name
                and row["provider"] == target.provider and row.get("speedup") is not None]
    if not measured:
        return Result(target, "not measured")
    worst = min(measured, key=lambda row: row["speedup"])
    passed = worst["speedup"] >= target.threshold
    return Result(target, "PASS" if passed else "FAIL", worst["speedup"], f"worst: {worst['case']}, "
                  f"against {worst['baseline']}; {len(measured)} cases", bool(worst.get("ratio_noisy")),
                  worst["provider"])


def evaluate(rows: list[dict]) -> list[Result]:
    """Every target against rows already annotated by report.annotate_ratios."""
    return [_check(target, rows) for target in TARGETS]


def table(results: list[Result]) -> str:
    issues = ", ".join(str(issue) for issue in sorted({result.target.issue for result in results}))
    lines = [f"### Targets (issues {issues})", "",
             "| issue | case | pass | provider | metric | measured | target | result |",
             "|---|---|---|---|---|---|---|---|"]
    for result in results:
        target = result.target
        provider = target.provider
        if result.provider and result.provider != target.provider:
            provider += f" (its {result.provider} row)"
        sign = "<=" if target.at_most else ">="
        metric = target.metric + (f" ({result.against})" if result.against else "")
        unit = " us" if target.metric == "us per call" else "x"
        measured = "-" if result.measured is None else f"{result.measured:.2f}{unit}"
        status = result.status + (" (noisy)" if result.noisy else "")
        lines.append(f"| {target.issue} | {target.case} | {target.pass_name} | {provider} | {metric} | {measured} | "
                     f"{sign} {target.threshold:.2f}{unit} | {status} |")
    passed = sum(result.status == "PASS" for result in results)
    measured = sum(result.measured is not None for result in results)
    lines += ["", f"{passed} of {measured} measured targets pass ({len(results)} targets in all)."]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:

    parser = argparse.ArgumentParser(prog="python -m benchmarks.targets", description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a run folder of python -m benchmarks, or its results.json")
    args = parser.parse_args(argv)
    try:
        data = report.read_results(args.results)
    except ValueError as error:
        parser.error(str(error))
    rows = data["results"]
    report.annotate_ratios(rows)
    env = data["environment"]
    print(f"{env.get('device', 'unknown device')}, commit {env.get('commit', 'unknown')}, {env.get('date', '')}"
          + (f"\nincomplete run: {env['stopped']}" if env.get("stopped") else "") + "\n")
    print(table(evaluate(rows)))


if __name__ == "__main__":
    main()
