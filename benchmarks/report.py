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


# What each suite's speed-up column compares against, per (case, pass).
BASELINES = {
    "op": ("best SDPA", lambda provider: provider.startswith("sdpa")),
    "scaling": ("Transformer", lambda provider: provider == "transformer"),
    "model": ("HF transformers", lambda provider: provider == "hf_transformers"),
}
SUITE_TITLES = {
    "op": "cross_attention (op)",
    "scaling": "Scaling with input size M (inference)",
    "model": "End-to-end Perceiver IO (model)",
}


def summary_table(rows: list[dict]) -> str:
    """Markdown, one section per suite: a line per (case, pass, provider) with the
    speed-up over the suite's baseline (the fastest baseline row of the same case and pass)."""
    sections = []
    for suite in dict.fromkeys(row.get("suite", "op") for row in rows):
        label, is_baseline = BASELINES[suite]
        suite_rows = [row for row in rows if row.get("suite", "op") == suite]
        baseline: dict[tuple, float] = {}
        for row in suite_rows:
            key = (row["case"], row.get("pass", ""))
            if is_baseline(row["provider"]) and row["status"] == "ok":
                baseline[key] = min(baseline.get(key, float("inf")), row["median_ms"])
        lines = [f"### {SUITE_TITLES[suite]}", "",
                 f"| case | pass | provider | ms | TFLOP/s | GB/s | % roofline | peak MiB | vs {label} | note |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for row in suite_rows:
            ok = row["status"] == "ok"
            key = (row["case"], row.get("pass", ""))
            speedup = baseline[key] / row["median_ms"] if ok and key in baseline else None
            note = row.get("path", "") if ok else row["status"]
            lines.append(
                f"| {row['case']} | {key[1]} | {row['provider']} | {_fmt(row.get('median_ms'), '.3f')} | "
                f"{_fmt(row.get('tflops'), '.2f')} | {_fmt(row.get('gbps'), '.0f')} | "
                f"{_fmt(row.get('roofline_pct'), '.0f')} | "
                f"{_fmt(row.get('peak_mib'), '.0f')} | {_fmt(speedup, '.2f') + 'x' if speedup else '-'} | {note} |"
            )
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


def write(out_dir: Path, env: dict, rows: list[dict]) -> str:
    """Writes results.json, report.md and the plots; returns the summary table."""
    from .plots import write_plots

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps({"environment": env, "results": rows}, indent=1))
    table = summary_table(rows)
    plots = write_plots(rows, out_dir, env["device"])
    ceilings = env["ceilings"]
    header = [
        f"# perceiver-kernels benchmark: {env['device']}",
        "",
        f"{env['date']}, commit {env['commit']}, torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}",
        f"`{env['command']}`",
        "",
        f"Ceilings measured in this run: matmul {ceilings['matmul_tflops']:.0f} TFLOP/s "
        f"({ceilings['matmul_dtype']}), copy {ceilings['copy_gbps']:.0f} GB/s. "
        "Times are medians; GB/s = minimum bytes (inputs read and outputs written once) / time; "
        "% roofline = max(FLOPs / matmul peak, minimum bytes / copy bandwidth) / time.",
        "",
    ]
    figures = "".join(f"\n![{name}]({name})\n" for name in plots)
    (out_dir / "report.md").write_text("\n".join(header) + table + "\n" + figures)
    return table
