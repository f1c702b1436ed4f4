"""Command line: python -m benchmarks [--suite op,scaling,model,host] [--size quick|full] [--device ...] [--threads N] [--out DIR].

Run it from the repository root (benchmarks/ is a folder there, not an installed package)."""

from __future__ import annotations

import argparse
import datetime
import signal
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from . import harness, host_suite, model_suite, op_suite, report, scaling_suite

SUITES = {"op": op_suite, "scaling": scaling_suite, "model": model_suite, "host": host_suite}


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


class Progress:
    """A one-line progress bar on stderr: [#####.....] done/total, the time left, the case
    being measured. The time left assumes the cases to come take as long on average as
    those done so far: rough, as a model case takes longer than an op case."""

    def __init__(self, total: int, clock: Callable[[], float] = time.monotonic):
        self.total = total
        self.done = 0
        self.clock = clock
        self.start = clock()

    def time_left(self) -> str:
        finished = self.done - 1  # the case starting now is not
        if finished < 1:
            return "time left known after the first case"
        left = (self.clock() - self.start) / finished * (max(self.total, self.done) - finished)
        return f"about {_duration(left)} left"

    def __call__(self, message: str) -> None:
        self.done += 1
        total = max(self.total, self.done)
        filled = int(20 * self.done / total)
        end = "\n" if not sys.stderr.isatty() else ""
        print(f"\r[{'#' * filled}{'.' * (20 - filled)}] {self.done}/{total}, {self.time_left()}: {message:<40}",
              end=end, file=sys.stderr, flush=True)


class Stopped(Exception):
    """SIGTERM arrived (gpu_run.sh's step limit, or a user): the run writes what it measured."""


def _stop(signum, frame):
    raise Stopped(f"stopped by signal {signal.Signals(signum).name}")


def _count_cases(device: torch.device, size: str, suites: list[str]) -> int:
    """The cases to measure (each times all its providers interleaved), for the progress bar."""
    return sum(len(SUITES[name].cases(device, size)) for name in suites)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--suite", default=",".join(SUITES), metavar=",".join(SUITES),
                        help=f"comma-separated suites among {', '.join(SUITES)} (default: all; each runs once)")
    parser.add_argument("--size", choices=("quick", "full"), default="quick",
                        help="GPU: quick = the headline anchors, full = every anchor and the sweeps; "
                             "CPU: scaled-down shapes, full = larger ones (several times longer)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=None,
                        help=f"CPU threads for torch (default {harness.default_cpu_threads()} on the CPU; "
                             "recorded in the report)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default bench-out/<time>)")
    args = parser.parse_args(argv)

    suites = list(dict.fromkeys(name.strip() for name in args.suite.split(",") if name.strip()))
    unknown = [name for name in suites if name not in SUITES]
    if unknown or not suites:
        parser.error(f"--suite takes names among {', '.join(SUITES)}, got {args.suite!r}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    try:
        device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                              "cpu" if args.device == "auto" else args.device)
    except RuntimeError as error:
        parser.error(f"--device: {error}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA GPU is available here")
    out_dir = args.out or Path("bench-out") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    try:
        rows = report.Results(out_dir)
    except OSError as error:
        parser.error(f"--out {str(out_dir)!r} is not a writable folder ({error.strerror or error})")
    if device.type == "cpu" or args.threads is not None:
        harness.set_cpu_threads(args.threads or harness.default_cpu_threads())
    steady_allocator = device.type == "cpu" and harness.steady_cpu_allocator()

    load_at_start = harness.load_average()
    print(f"measuring ceilings on {device} ({torch.get_num_threads()} CPU threads) ...", file=sys.stderr)
    ceilings = harness.ceilings(device)
    rows.begin(report.environment(device, ceilings, args.size, load_at_start, steady_allocator))
    progress = Progress(_count_cases(device, args.size, suites))
    stopped = ""
    previous_handler = signal.signal(signal.SIGTERM, _stop)
    try:
        for name in suites:
            SUITES[name].run_suite(device, args.size, ceilings, progress, rows)
    except (Stopped, KeyboardInterrupt) as stop:
        how = str(stop) if isinstance(stop, Stopped) else "stopped by Ctrl-C"
        stopped = f"{how} during case {progress.done} of {progress.total}: the rows are what it measured before"
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    print(file=sys.stderr)
    env = report.environment(device, ceilings, args.size, load_at_start, steady_allocator)
    if stopped:
        env["stopped"] = stopped
        print(f"\nbenchmark {stopped}", file=sys.stderr)
    try:
        table = report.write(rows, env)
    except Exception as error:  # whatever failed (a full disk, a plot), the measurements are kept
        reason = (str(error).splitlines() or [""])[0]
        sys.exit(f"benchmark: writing the report into {out_dir}/ failed ({type(error).__name__}: {reason}); "
                 f"the measurements are in {rows.keep(env)}")
    print(f"\nresults in {out_dir}/ (results.json, report.md, plots)\n")
    print(table)
