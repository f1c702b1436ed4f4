"""Results files of a run: results.json (every figure with its context) and report.md."""

from __future__ import annotations

import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch


def environment(device: torch.device, ceilings: dict) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    import perceiver_kernels as pk

    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks", *sys.argv[1:]]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "perceiver_kernels_build": pk.build_info(),
        "ceilings": ceilings,
    }


def _fmt(value, spec):
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def summary_table(rows: list[dict]) -> str:
    """Markdown: one line per (shape, provider), with the speed-up over the best SDPA backend."""
    best_sdpa: dict[tuple, float] = {}
    for row in rows:
        key = (row["shape"], row.get("pass", "forward"))
        if row["provider"].startswith("sdpa") and row["status"] == "ok":
            best_sdpa[key] = min(best_sdpa.get(key, float("inf")), row["median_ms"])
    lines = ["| shape | pass | provider | ms | TFLOP/s | % roofline | peak MiB | vs best SDPA | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ok = row["status"] == "ok"
        key = (row["shape"], row.get("pass", "forward"))
        speedup = best_sdpa[key] / row["median_ms"] if ok and key in best_sdpa else None
        note = row.get("path", "") if ok else row["status"]
        lines.append(
            f"| {row['shape']} | {key[1]} | {row['provider']} | {_fmt(row.get('median_ms'), '.3f')} | "
            f"{_fmt(row.get('tflops'), '.1f')} | {_fmt(row.get('roofline_pct'), '.0f')} | "
            f"{_fmt(row.get('peak_mib'), '.0f')} | {_fmt(speedup, '.2f') + 'x' if speedup else '-'} | {note} |"
        )
    return "\n".join(lines)


def write(out_dir: Path, env: dict, rows: list[dict]) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps({"environment": env, "results": rows}, indent=1))
    table = summary_table(rows)
    ceilings = env["ceilings"]
    header = [
        f"# perceiver-kernels benchmark: {env['device']}",
        "",
        f"{env['date']}, commit {env['commit']}, torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}",
        f"`{env['command']}`",
        "",
        f"Ceilings measured in this run: matmul {ceilings['matmul_tflops']:.0f} TFLOP/s "
        f"({ceilings['matmul_dtype']}), copy {ceilings['copy_gbps']:.0f} GB/s. "
        "Times are medians; % roofline = max(FLOPs / matmul peak, minimum bytes / copy bandwidth) / time.",
        "",
    ]
    (out_dir / "report.md").write_text("\n".join(header) + table + "\n")
    return table
