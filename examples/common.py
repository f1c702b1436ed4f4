"""Plumbing shared by the examples: arguments, device, progress, checkpoints, curves, the metrics line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

import torch
from tqdm import tqdm


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _usable_device(parser: argparse.ArgumentParser, name: str) -> torch.device:
    """The device, or an argparse error now rather than a crash at the first tensor."""
    try:
        device = pick_device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:  # unknown name; a backend torch lacks or cannot reach
        parser.error(f"--device {name!r} is not available here ({str(error).splitlines()[0]}); try cpu or auto")
    return device


def _check_writable(parser: argparse.ArgumentParser, out: Path) -> None:
    """Fails before training, not after it, when the results could not be saved."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out):
            pass
    except OSError as error:
        parser.error(f"--out {str(out)!r} is not a writable folder ({error.strerror or error})")


def parse_args(name: str, description: str, default_config, full_config,
               argv: list[str] | None = None, *,
               add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
               prog: str | None = None) -> tuple[argparse.Namespace, object, torch.device]:
    """--full picks the GPU-sized config; --steps / --batch-size override either.

    add_arguments adds an example's own options; prog replaces "python -m examples.<name>"
    in the usage line (a launcher such as torchrun).
    """
    parser = argparse.ArgumentParser(prog=prog or f"python -m examples.{name}", description=description)
    parser.add_argument("--full", action="store_true", help="the full-size run (meant for a GPU)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    parser.add_argument("--out", type=Path, default=Path("examples/out") / name, help="checkpoint, curve, metrics")
    parser.add_argument("--steps", type=_at_least_one, default=None, help="training steps (overrides the config)")
    parser.add_argument("--batch-size", type=_at_least_one, default=None, help="batch size (overrides the config)")
    parser.add_argument("--seed", type=int, default=0)
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    device = _usable_device(parser, args.device)
    _check_writable(parser, args.out)
    config = full_config if args.full else default_config
    overrides = {"steps": args.steps, "batch_size": args.batch_size}
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
    return args, config, device


def progress(iterable: Iterable, total: int, description: str) -> tqdm:
    return tqdm(iterable, total=total, desc=description, dynamic_ncols=True, leave=False)


def smoothed(values: list[float], window: int = 50) -> list[float]:
    out, running = [], 0.0
    for i, value in enumerate(values):
        running += value - (values[i - window] if i >= window else 0.0)
        out.append(running / min(i + 1, window))
    return out


def save_checkpoint(path: Path, model: torch.nn.Module, config, metrics: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": dataclasses.asdict(config), "state_dict": model.state_dict(), "metrics": metrics}, path)


def load_checkpoint(path: Path, config_class, build: Callable) -> tuple[torch.nn.Module, object]:
    """Rebuilds the model from the saved config and loads its weights (on the CPU)."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    config = config_class(**saved["config"])
    model = build(config)
    model.load_state_dict(saved["state_dict"])
    return model, config


def plot_curves(path: Path, curves: dict[str, tuple[list[int], list[float]]], title: str, ylabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for label, (steps, values) in curves.items():
        axis.plot(steps, values, label=label)
    axis.set_xlabel("step")
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.grid(True, alpha=0.3)
    axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        return False


def finish(name: str, out_dir: Path, metrics: dict, seconds: float, device: torch.device) -> str:
    """Writes metrics.json and returns the final metrics line (both without the loss history)."""
    metrics = {k: v for k, v in metrics.items() if k != "loss_history"}
    metrics = {**metrics, "seconds": round(seconds, 1), "device": str(device), "torch": torch.__version__}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    fields = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
    return f"RESULT {name}: {fields}"


def run_example(name: str, description: str, default_config, full_config, train: Callable) -> None:
    """The command line of every example: parse, train (timed), print the RESULT line."""
    args, config, device = parse_args(name, description, default_config, full_config)
    with Timer() as timer:
        metrics = train(config, args.out, device, seed=args.seed)
    print(finish(name, args.out, metrics, timer.seconds, device))
