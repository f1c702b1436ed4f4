"""Results files of a run: results.json (every figure with its context) and report.md."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

from . import harness

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# A speed-up whose 95% interval reaches further than this from it is flagged "noisy".
# Half the 10% two runs should agree within: the interval covers one run's sampling
# error, not the load changing between runs.
RATIO_NOISE_LIMIT = 0.05


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, cwd=PROJECT_ROOT,
                          check=True).stdout.strip()


def project_commit() -> tuple[str, Optional[bool]]:
    """(commit, whether tracked files differ from it) of this project's own checkout.

    PERCEIVER_KERNELS_COMMIT, where set (gpu_run.sh's caller sets it), wins: the copy on
    a GPU machine carried a .git of an older commit, which stamped the first runs of
    2026-12-01 with it. Otherwise git answers, but only when its top level is this
    project's root (a copy without .git inside another repository must not take that
    repository's commit); else "unknown"."""
    if os.environ.get("PERCEIVER_KERNELS_COMMIT"):
        return os.environ["PERCEIVER_KERNELS_COMMIT"], None
    try:
        if Path(_git("rev-parse", "--show-toplevel")).resolve() == PROJECT_ROOT:
            dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
            return _git("rev-parse", "--short", "HEAD"), dirty
    except (OSError, subprocess.CalledProcessError):
        pass
    return "unknown", None


def environment(device: torch.device, ceilings: dict, size: str = "quick",
                load_at_start: Optional[tuple[float, float, float]] = None, steady_allocator: bool = False) -> dict:
    commit, dirty = project_commit()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    import perceiver_kernels as pk

    discipline = harness.discipline_for(device)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "uncommitted_changes": dirty,
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks", *sys.argv[1:]]),
        "size": size,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "perceiver_kernels_build": pk.build_info(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": load_at_start,
        "load_average_at_end": harness.load_average(),
        "timing": {"clock": harness.clock_name(device), "steady_cpu_allocator": steady_allocator, "min_rounds": discipline.min_rounds, "max_rounds": discipline.max_rounds,
                   "budget_s_per_case": discipline.budget_s, "target_ci": discipline.target_ci,
                   "ratio_noise_limit": RATIO_NOISE_LIMIT},
        "ceilings": ceilings,
    }


def _fmt(value, spec):
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


# What each suite's speed-up column compares against, per (case, pass).
BASELINES = {
    "op": ("best SDPA", lambda provider: provider.startswith("sdpa")),
    "scaling": ("Transformer", lambda provider: provider == "transformer"),
    # Perceiver IO against HF; Perceiver AR's training step against plain PyTorch, its
    # generation against itself without the cache.
    "model": ("baseline", lambda provider: provider in ("hf_transformers", "plain_pytorch",
                                                        "perceiver_kernels, no cache")),
    "host": ("SDPA", lambda provider: provider == "sdpa"),
}
SUITE_TITLES = {
    "op": "cross_attention (op)",
    "scaling": "Scaling with input size M (inference)",
    "model": "End-to-end models (model; baseline: HF transformers, or for Perceiver AR plain PyTorch / no cache)",
    "host": "Host cost per call (ms; validation and dispatch, whole small calls)",
}


def paired_speedup(row: dict, base: dict) -> tuple[float, float, float]:
    """(speed-up, 95% interval) of `row` over `base`: round by round where both carry
    their samples (providers of a case are timed interleaved, so round i of each ran
    under the same load), else from the two medians and their intervals (older results)."""
    if len(row.get("samples_ms") or ()) == len(base.get("samples_ms") or ()) > 0:
        ratios = [b / r for b, r in zip(base["samples_ms"], row["samples_ms"])]
        low, high = harness.median_interval(ratios)
        return statistics.median(ratios), low, high
    speedup = base["median_ms"] / row["median_ms"]
    if "ci_low_ms" in row and "ci_low_ms" in base:
        return speedup, base["ci_low_ms"] / row["ci_high_ms"], base["ci_high_ms"] / row["ci_low_ms"]
    return speedup, math.nan, math.nan


def annotate_ratios(rows: list[dict]) -> None:
    """Adds to every measured row its speed-up over its suite's baseline (the fastest
    baseline row of the same case and pass), the speed-up's 95% interval, and
    `ratio_noisy` where that interval reaches more than RATIO_NOISE_LIMIT from it."""
    baseline: dict[tuple, dict] = {}
    for row in rows:
        key = (row.get("suite", "op"), row["case"], row.get("pass", ""))
        if BASELINES[key[0]][1](row["provider"]) and row["status"] == "ok":
            if key not in baseline or row["median_ms"] < baseline[key]["median_ms"]:
                baseline[key] = row
    for row in rows:
        base = baseline.get((row.get("suite", "op"), row["case"], row.get("pass", "")))
        if row["status"] != "ok" or base is None:
            continue
        row["baseline"] = base["provider"]
        if base is row:
            row["speedup"] = row["speedup_low"] = row["speedup_high"] = 1.0
            row["ratio_noisy"] = False
            continue
        speedup, low, high = paired_speedup(row, base)
        row["speedup"] = speedup
        if not math.isnan(low):
            row["speedup_low"], row["speedup_high"] = low, high
            row["ratio_noisy"] = max(speedup - low, high - speedup) / speedup > RATIO_NOISE_LIMIT


def format_ratio(row: dict) -> str:
    if row.get("speedup") is None:
        return "-"
    return f"{row['speedup']:.2f}x" + (" noisy" if row.get("ratio_noisy") else "")


def _note(row: dict) -> str:
    if row["status"] != "ok":
        return row["status"]
    padding = ""
    if row.get("pad_fraction"):
        padding = f"pads {row['pad_fraction']:.0%} of keys ({row['padded_keys']} in all)"
    return "; ".join(part for part in (padding, row.get("path", "")) if part)


def summary_table(rows: list[dict]) -> str:
    """Markdown, one section per suite: a line per (case, pass, provider) with its
    spread (± half the interquartile range) and its speed-up over the suite's baseline."""
    sections = []
    for suite in dict.fromkeys(row.get("suite", "op") for row in rows):
        label, _ = BASELINES[suite]
        lines = [f"### {SUITE_TITLES[suite]}", "",
                 f"| case | pass | provider | ms | ± % | TFLOP/s | GB/s | % roofline | peak MiB | vs {label} | note |",
                 "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in rows:
            if row.get("suite", "op") != suite:
                continue
            lines.append(
                f"| {row['case']} | {row.get('pass', '')} | {row['provider']} | {_fmt(row.get('median_ms'), '.3f')} | "
                f"{_fmt(row.get('spread_pct'), '.1f')} | {_fmt(row.get('tflops'), '.3f')} | "
                f"{_fmt(row.get('gbps'), '.1f')} | {_fmt(row.get('roofline_pct'), '.0f')} | "
                f"{_fmt(row.get('peak_mib'), '.1f')} | {format_ratio(row)} | {_note(row)} |"
            )
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


def _commit_line(env: dict) -> str:
    changes = env.get("uncommitted_changes")
    return env["commit"] + (" with uncommitted changes" if changes else "")


def header(env: dict) -> list[str]:
    ceilings = env["ceilings"]
    lines = [
        f"# perceiver-kernels benchmark: {env['device']}",
        "",
        f"{env['date']}, commit {_commit_line(env)}, torch {env['torch']} (CUDA {env['cuda']}), "
        f"triton {env['triton']}, Python {env['python']}",
        f"`{env['command']}`",
        "",
        f"Ceilings measured in this run: matmul {ceilings['matmul_tflops']:.4g} TFLOP/s "
        f"({ceilings['matmul_dtype']}), copy {ceilings['copy_gbps']:.4g} GB/s. "
        "The providers of a case are timed interleaved, round by round; times are medians, ± is half the "
        "interquartile range in % of the median; a speed-up is the median over rounds of the baseline's time "
        "over the row's, marked noisy when its 95% interval reaches more than "
        f"{RATIO_NOISE_LIMIT:.0%} from it. GB/s = minimum bytes (inputs read and outputs "
        "written once) / time; % roofline = max(FLOPs / matmul peak, minimum bytes / copy bandwidth) / time.",
    ]
    if env.get("stopped"):
        lines += ["", f"**Incomplete run**: {env['stopped']}."]
    if env.get("device_type", "cuda") == "cpu":
        lines += [
            "",
            f"CPU run with {env['cpu_threads']} thread(s) of {env['cpu_count']} cores, timed by "
            f"{env['timing']['clock']}"
            f"{', freed memory kept for reuse (no page faults timed)' if env['timing'].get('steady_cpu_allocator') else ''}"
            " (load average at the start "
            f"{', '.join(f'{x:.2f}' for x in env['load_average_at_start'] or ())}, at the end "
            f"{', '.join(f'{x:.2f}' for x in env['load_average_at_end'] or ())}). On the CPU `cross_attention` "
            "runs its torch backend, which is SDPA: without a mask perceiver_kernels and sdpa time the same kernel and "
            "their ratio shows only the noise; with a mask ours first zeroes the padding keys of k and v (so NaN in "
            "padding cannot leak), which costs a pass over them. The kernels run on GPUs.",
        ]
    return lines + [""]


# What results.json says while the run that writes it has not finished: what a run
# killed outright (SIGKILL) leaves behind.
UNFINISHED = "cut off before it finished (killed, or still running): the rows are what it measured until then"


class Results(list):
    """The rows of a run, each written to OUT/results.json as it is measured.

    Created before anything is measured, so that an --out that cannot be written fails
    at once (OSError). The suites append rows one at a time or a case's at once (+=);
    each is written over the file's closing brackets, followed by them again, so the
    file is valid JSON after every row (benchmarks.compare and benchmarks.targets read
    it) without rewriting what came before. Until finish() its environment says that
    the run did not finish."""

    CLOSING = b"\n]}\n"

    def __init__(self, out_dir: Path):
        super().__init__()
        self.path = out_dir / "results.json"
        self.finished = False
        self.write_error: Optional[OSError] = None
        out_dir.mkdir(parents=True, exist_ok=True)
        self.begin({})

    def begin(self, env: dict) -> None:
        """Starts the file over with the run's environment, before any row."""
        header = json.dumps({"environment": {**env, "stopped": UNFINISHED}, "results": []})
        self.path.write_bytes(header[:-2].encode() + self.CLOSING)

    def append(self, row: dict) -> None:
        super().append(row)
        if self.write_error is not None:
            return
        try:
            with self.path.open("r+b") as file:
                file.seek(-len(self.CLOSING), os.SEEK_END)
                file.write((",\n" if len(self) > 1 else "\n").encode() + json.dumps(row).encode() + self.CLOSING)
        except OSError as error:
            # The run goes on (a full disk must not end it): finish() or keep() writes
            # every row at the end.
            self.write_error = error

    def extend(self, rows) -> None:
        for row in rows:
            self.append(row)

    def __iadd__(self, rows):
        self.extend(rows)
        return self

    def finish(self, env: dict, path: Optional[Path] = None) -> Path:
        """Writes the whole file again (to `path`, default results.json) with the final
        environment and the rows as annotate_ratios left them; returns where. Written
        beside and then renamed, so that a failed write leaves the rows written so far."""
        path = path or self.path
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps({"environment": env, "results": list(self)}, indent=1))
        partial.replace(path)
        self.finished = self.finished or path == self.path
        return path

    def keep(self, env: dict) -> Path:
        """Where the results are once writing the report failed: results.json if it was
        written in full, else a copy in the temporary folder, else results.json as it
        stands (every row written, the environment of the start)."""
        if self.finished:
            return self.path
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        try:
            return self.finish(env, Path(tempfile.gettempdir()) / f"perceiver-benchmark-{stamp}-results.json")
        except OSError:
            return self.path


def read_results(path: Path) -> dict:
    """A results.json written by python -m benchmarks, given it or its run folder; a
    ValueError with a one-line reason otherwise."""
    file = path / "results.json" if path.is_dir() else path
    if not file.exists():
        where = f"the folder {str(path)!r} has no results.json" if path.is_dir() else f"{str(path)!r} does not exist"
        raise ValueError(f"{where} (give a run folder of python -m benchmarks or its results.json)")
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{str(file)!r} is not a readable results.json ({error})") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise ValueError(f"{str(file)!r} is not a results.json of python -m benchmarks (no list of results)")
    data.setdefault("environment", {})
    return data


def write(results: Results, env: dict) -> str:
    """Writes results.json in full (the rows annotated with their ratios), report.md
    and the plots beside it; returns the summary table (followed by the targets table
    when the run measured any target's case)."""
    from . import targets
    from .plots import write_plots

    out_dir = results.path.parent
    annotate_ratios(results)
    results.finish(env)
    table = summary_table(results)
    checked = targets.evaluate(results)
    if any(result.status != "not measured" for result in checked):
        table += "\n\n" + targets.table(checked)
    plots = write_plots(results, out_dir, env["device"], env.get("device_type", "cuda"))
    figures = "".join(f"\n![{name}]({name})\n" for name in plots)
    (out_dir / "report.md").write_text("\n".join(header(env)) + table + "\n" + figures)
    return table
