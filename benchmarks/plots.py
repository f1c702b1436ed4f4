"""PNG plots of a run (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def _ok(rows: list[dict], suite: str) -> list[dict]:
    return [r for r in rows if r.get("suite") == suite and r.get("status") == "ok"]


def scaling_plot(rows: list[dict], path: Path, device: str) -> bool:
    """Time and peak memory against M, log-log: linear (Perceiver IO) against quadratic."""
    data = _ok(rows, "scaling")
    if not data:
        return False
    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    for provider in sorted({r["provider"] for r in data}):
        points = sorted((r["M"], r["median_ms"], r.get("peak_mib")) for r in data if r["provider"] == provider)
        sizes = [p[0] for p in points]
        time_axis.plot(sizes, [p[1] for p in points], marker="o", label=provider)
        if all(p[2] is not None for p in points):
            memory_axis.plot(sizes, [p[2] for p in points], marker="o", label=provider)
    for axis, label in ((time_axis, "median time (ms)"), (memory_axis, "peak memory (MiB)")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("input size M (tokens)")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    figure.suptitle(f"Perceiver IO vs Transformer encoder, inference ({device})")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def op_plot(rows: list[dict], path: Path, device: str) -> bool:
    """Achieved TFLOP/s per anchor case and provider (grouped bars)."""
    data = [r for r in _ok(rows, "op") if not r.get("sweep")]
    if not data:
        return False
    cases = list(dict.fromkeys(f"{r['case']}\n{r['pass']}" for r in data))
    providers = list(dict.fromkeys(r["provider"] for r in data))
    width = 0.8 / len(providers)
    figure, axis = plt.subplots(figsize=(max(8, 1.6 * len(cases)), 4.5))
    for i, provider in enumerate(providers):
        values = {f"{r['case']}\n{r['pass']}": r["tflops"] for r in data if r["provider"] == provider}
        axis.bar([c + i * width for c in range(len(cases))], [values.get(case, 0) for case in cases], width,
                 label=provider)
    axis.set_xticks([c + 0.4 - width / 2 for c in range(len(cases))], cases, fontsize=8)
    axis.set_ylabel("TFLOP/s (higher is better)")
    axis.set_title(f"cross_attention against SDPA backends ({device})")
    axis.legend(fontsize=8)
    axis.grid(True, axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def sweep_plot(rows: list[dict], path: Path, device: str) -> bool:
    """% of the roofline against the long side: ENCODE over M inputs, DECODE over O outputs."""
    data = [r for r in _ok(rows, "op") if r.get("sweep")]
    if not data:
        return False
    sweeps = (("encode", "Nk", "inputs M (keys)"), ("decode", "Nq", "outputs O (queries)"))
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for axis, (sweep, size_field, label) in zip(axes, sweeps):
        points = [r for r in data if r["sweep"] == sweep]
        for provider in dict.fromkeys(r["provider"] for r in points):
            line = sorted((r[size_field], r["roofline_pct"]) for r in points if r["provider"] == provider)
            axis.plot([p[0] for p in line], [p[1] for p in line], marker="o", label=provider)
        axis.set_xscale("log", base=2)
        axis.set_xlabel(label)
        axis.set_title(sweep.upper())
        axis.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("% of roofline (higher is better)")
    axes[0].legend(fontsize=8)
    figure.suptitle(f"cross_attention forward across sizes ({device})")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def write_plots(rows: list[dict], out_dir: Path, device: str) -> list[str]:
    written = []
    for name, plot in (("op.png", op_plot), ("sweep.png", sweep_plot), ("scaling.png", scaling_plot)):
        if plot(rows, out_dir / name, device):
            written.append(name)
    return written
