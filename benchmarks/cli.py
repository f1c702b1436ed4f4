"""Command line: python -m benchmarks [--size quick|full] [--device auto|cpu|cuda] [--out DIR]."""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

from . import harness, op_suite, report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--size", choices=("quick", "full"), default="quick",
                        help="quick: the headline shapes (GPU) / small shapes (CPU); full: every anchor shape")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default bench-out/<time>)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    out_dir = args.out or Path("bench-out") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")

    def progress(message: str) -> None:
        print(f"  {message}", file=sys.stderr, flush=True)

    print(f"measuring ceilings on {device} ...", file=sys.stderr)
    ceilings = harness.ceilings(device)
    rows = op_suite.run_suite(device, args.size, ceilings, progress)
    table = report.write(out_dir, report.environment(device, ceilings), rows)
    print(f"\nresults in {out_dir}/ (results.json, report.md)\n")
    print(table)
