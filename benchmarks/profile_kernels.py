"""Hardware counters of our kernels on one op case: a driver to run under Nsight Compute,
and the summary of what it recorded.

    ncu --clock-control none --profile-from-start off --section SpeedOfLight \\
        --section WarpStateStats --section ComputeWorkloadAnalysis --csv --page raw \\
        python -m benchmarks.profile_kernels run --case DEC-1 --provider untimed > dec1-untimed.csv
    python -m benchmarks.profile_kernels summary dec1-*.csv

`run` builds the op suite's inputs of one case, calls the op three times to compile and
warm it, then once more between cudaProfilerStart and cudaProfilerStop, so ncu profiles
exactly the kernels of one warm call (forward, or with --backward forward and backward).
`summary` prints, per file and kernel: its time, DRAM and SM throughput (% of peak), the
busiest tensor pipe, and the warp stall reasons that cost the most cycles. Metric names
are matched by pattern, so the summary reads what this ncu version's sections report.
"""

from __future__ import annotations

import argparse
import csv
import re
from pathlib import Path

PROVIDERS = {"triton": ("triton", "timed"), "untimed": ("triton", "untimed"), "auto": ("auto", "timed")}

DURATION = "gpu__time_duration.sum"
DRAM = "dram__throughput.avg.pct_of_peak_sustained_elapsed"
SM = "sm__throughput.avg.pct_of_peak_sustained_elapsed"
TENSOR_PIPE = re.compile(r"pipe_tensor.*pct_of_peak_sustained_active")
STALL = re.compile(r"^smsp__average_warps?_(?:latency_)?issue_stalled_(\w+?)_per_issue_active\.ratio$")
STALLS_SHOWN = 3


def run(case_name: str, provider: str, backward: bool) -> None:
    import torch

    from perceiver_kernels.triton import variants

    from . import op_suite

    shapes = {shape.name: shape for shape in op_suite.GPU_SHAPES + op_suite.GPU_SWEEP}
    if case_name not in shapes:
        raise SystemExit(f"--case must be one of the op suite's GPU cases, got {case_name!r}")
    backend, variant = PROVIDERS[provider]
    device = torch.device("cuda")
    inputs = op_suite.make_inputs(shapes[case_name], device, torch.bfloat16)
    call = op_suite._timed_call(op_suite._ours(backend), inputs, backward)
    with variants.running(variant):
        for _ in range(3):
            call()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        call()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()


TO_MICROSECONDS = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3, "second": 1e6}


def _table(path: Path) -> tuple[dict, list[dict]]:
    """ncu's raw CSV: a header of metric names, a row of their units, then a row per kernel
    (its ID a number); lines before the header (the program's own output) are skipped."""
    if not path.is_file():
        return {}, []
    records = list(csv.reader(line for line in path.read_text(errors="replace").splitlines()
                              if line.startswith('"')))
    if not records:
        return {}, []
    header, units, kernels = records[0], {}, []
    for values in records[1:]:
        record = dict(zip(header, values))
        if record.get("ID", "").isdigit():
            kernels.append(record)
        elif not units:
            units = record
    return units, kernels


def _number(text) -> float | None:
    try:
        return float(str(text).replace(",", ""))
    except ValueError:
        return None


def _show(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def summarize(paths: list[Path]) -> str:
    lines = ["| file | kernel | us | DRAM % | SM % | tensor pipe % | top stalls (cycles per issue) |",
             "|---|---|---|---|---|---|---|"]
    for path in paths:
        units, kernels = _table(path)
        if not kernels:
            lines.append(f"| {path.stem} | no kernel recorded (see the file) | | | | | |")
        for kernel in kernels:
            duration = _number(kernel.get(DURATION))
            scale = TO_MICROSECONDS.get(units.get(DURATION, "nsecond"), 1e-3)
            tensor = max((value for name, text in kernel.items()
                          if TENSOR_PIPE.search(name) and (value := _number(text)) is not None), default=None)
            stalls = sorted(((value, match.group(1)) for name, text in kernel.items()
                             if (match := STALL.match(name)) and (value := _number(text)) is not None),
                            reverse=True)[:STALLS_SHOWN]
            name = re.sub(r"\(.*", "", kernel.get("Kernel Name", "?"))[:48]
            lines.append(f"| {path.stem} | {name} | {_show(None if duration is None else duration * scale)} | "
                         f"{_show(_number(kernel.get(DRAM)))} | {_show(_number(kernel.get(SM)))} | {_show(tensor)} | "
                         + ", ".join(f"{reason} {value:.2f}" for value, reason in stalls) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_kernels", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    driver = commands.add_parser("run", help="one warm call of a case between cudaProfilerStart/Stop")
    driver.add_argument("--case", required=True, help="an op suite GPU case, e.g. DEC-1")
    driver.add_argument("--provider", choices=sorted(PROVIDERS), default="untimed",
                        help="triton: the timed Triton kernels; untimed: the rewrites; auto: what auto runs")
    driver.add_argument("--backward", action="store_true", help="forward and backward")
    summary = commands.add_parser("summary", help="the table of ncu CSV files written by runs")
    summary.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    if args.command == "run":
        run(args.case, args.provider, args.backward)
    else:
        print(summarize(args.files))


if __name__ == "__main__":
    main()
