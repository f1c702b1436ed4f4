"""PNG plots of a run (matplotlib, headless).

Every provider keeps its own marker and line style, so lines that coincide (on the
CPU our op runs SDPA) stay visible; missing figures are labelled, not drawn as zero;
memory axes are symmetric-log, so a measured 0 MiB sits at 0.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
LINES = ("-", "--", ":", "-.")
CPU_NOTE = ("CPU: cross_attention runs its torch backend (SDPA) here: perceiver_kernels and sdpa time the same kernel "
            "(with a mask ours also zeroes the padding keys first).")


def _style(index: int) -> dict:
    """Hollow markers of different shapes and sizes: coinciding points stay visible."""
    return {"marker": MARKERS[index % len(MARKERS)], "linestyle": LINES[index % len(LINES)],
            "markersize": 9 - 1.5 * (index % 3), "markerfacecolor": "none", "markeredgewidth": 1.5}


def _ok(rows: list[dict], suite: str) -> list[dict]:
    return [r for r in rows if r.get("suite") == suite and r.get("status") == "ok"]


def _note(figure, device_type: str) -> None:
    if device_type == "cpu":
        figure.text(0.5, 0.005, CPU_NOTE, ha="center", va="bottom", fontsize=8, style="italic")


def _save(figure, path: Path, device_type: str) -> None:
    figure.tight_layout(rect=(0, 0.04 if device_type == "cpu" else 0, 1, 1))
    _note(figure, device_type)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def scaling_plot(rows: list[dict], path: Path, device: str, device_type: str) -> bool:
    """Time and peak memory against M, log-log: linear (Perceiver IO) against quadratic."""
    data = _ok(rows, "scaling")
    if not data:
        return False
    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(11, 4.4))
    for i, provider in enumerate(sorted({r["provider"] for r in data})):
        points = sorted((r["M"], r["median_ms"], r.get("peak_mib")) for r in data if r["provider"] == provider)
        sizes = [p[0] for p in points]
        time_axis.plot(sizes, [p[1] for p in points], label=provider, **_style(i))
        memory = [(p[0], p[2]) for p in points if p[2] is not None]
        if memory:
            memory_axis.plot([m[0] for m in memory], [m[1] for m in memory], label=provider, **_style(i))
    time_axis.set_yscale("log")
    memory_axis.set_yscale("symlog", linthresh=1.0)
    memory_axis.set_ylim(bottom=0)
    for axis, label in ((time_axis, "median time (ms)"), (memory_axis, "peak memory added by a call (MiB)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("input size M (tokens)")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    figure.suptitle(f"Perceiver IO vs Transformer encoder, inference ({device})")
    _save(figure, path, device_type)
    return True


def op_plot(rows: list[dict], path: Path, device: str, device_type: str) -> bool:
    """Achieved TFLOP/s per anchor case and provider (grouped bars, 95% intervals as
    error bars); a provider without a figure gets a labelled gap."""
    anchors = [r for r in rows if r.get("suite") == "op" and not r.get("sweep")]
    if not any(r["status"] == "ok" for r in anchors):
        return False
    cases = list(dict.fromkeys(f"{r['case']}\n{r['pass']}" for r in anchors))
    providers = list(dict.fromkeys(r["provider"] for r in anchors))
    width = 0.8 / len(providers)
    figure, axis = plt.subplots(figsize=(max(8, 1.6 * len(cases)), 4.8))
    for i, provider in enumerate(providers):
        by_case = {f"{r['case']}\n{r['pass']}": r for r in anchors if r["provider"] == provider}
        label = provider
        for c, case in enumerate(cases):
            x = c + i * width
            row = by_case.get(case)
            if row is None or row["status"] != "ok":
                axis.text(x, 0, " n/a", rotation=90, ha="center", va="bottom", fontsize=6)
                continue
            tflops = row["tflops"]
            error = None
            if "ci_low_ms" in row:  # TFLOP/s at the ends of the time's interval
                error = [[tflops - tflops * row["median_ms"] / row["ci_high_ms"]],
                         [tflops * row["median_ms"] / row["ci_low_ms"] - tflops]]
            axis.bar(x, tflops, width, yerr=error, capsize=2, color=f"C{i}", hatch="//" if i % 2 else None,
                     label=label)
            label = None  # one legend entry per provider
    axis.set_xticks([c + 0.4 - width / 2 for c in range(len(cases))], cases, fontsize=8)
    axis.set_ylabel("TFLOP/s (higher is better)")
    axis.set_title(f"cross_attention against SDPA backends ({device})")
    axis.legend(fontsize=8)
    axis.grid(True, axis="y", alpha=0.3)
    _save(figure, path, device_type)
    return True


def sweep_plot(rows: list[dict], path: Path, device: str, device_type: str) -> bool:
    """Against the long side (ENCODE over M inputs, DECODE over O outputs): % of the
    roofline above, the speed-up over the best SDPA backend below."""
    data = [r for r in _ok(rows, "op") if r.get("sweep")]
    if not data:
        return False
    sweeps = (("encode", "Nk", "inputs M (keys)"), ("decode", "Nq", "outputs O (queries)"))
    figure, axes = plt.subplots(2, 2, figsize=(11, 7), sharex="col", height_ratios=(3, 2))
    providers = list(dict.fromkeys(r["provider"] for r in data))
    for column, (sweep, size_field, label) in enumerate(sweeps):
        top, bottom = axes[0][column], axes[1][column]
        points = [r for r in data if r["sweep"] == sweep]
        for i, provider in enumerate(providers):
            line = sorted((r[size_field], r["roofline_pct"], r.get("speedup")) for r in points
                          if r["provider"] == provider)
            if not line:
                continue
            top.plot([p[0] for p in line], [p[1] for p in line], label=provider, **_style(i))
            ratios = [(p[0], p[2]) for p in line if p[2] is not None]
            bottom.plot([p[0] for p in ratios], [p[1] for p in ratios], label=provider, **_style(i))
        top.set_title(sweep.upper())
        bottom.axhline(1.0, color="grey", linewidth=0.8)
        bottom.set_xlabel(label)
        for axis in (top, bottom):
            axis.set_xscale("log", base=2)
            axis.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("% of roofline (higher is better)")
    axes[1][0].set_ylabel("speed-up over best SDPA")
    axes[0][0].legend(fontsize=8)
    figure.suptitle(f"cross_attention forward across sizes ({device})")
    _save(figure, path, device_type)
    return True


def write_plots(rows: list[dict], out_dir: Path, device: str, device_type: str) -> list[str]:
    written = []
    for name, plot in (("op.png", op_plot), ("sweep.png", sweep_plot), ("scaling.png", scaling_plot)):
        if plot(rows, out_dir / name, device, device_type):
            written.append(name)
    return written
