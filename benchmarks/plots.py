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
    """Achieved TFLOP/s per case and provider (grouped bars)."""
    data = _ok(rows, "op")
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


def write_plots(rows: list[dict], out_dir: Path, device: str) -> list[str]:
    written = []
    for name, plot in (("op.png", op_plot), ("scaling.png", scaling_plot)):
        if plot(rows, out_dir / name, device):
            written.append(name)
    return written
