"""Training across processes: the digits classifier under DistributedDataParallel or FSDP2.

The model and task of examples.digits, launched with torchrun, one process per GPU
(nccl, process i on cuda:i) or processes on the CPU (gloo):

    torchrun --nproc-per-node 2 -m examples.distributed                      # CPU, DDP
    torchrun --nproc-per-node 2 -m examples.distributed --strategy fsdp      # CPU, FSDP2
    torchrun --nproc-per-node 8 -m examples.distributed --full --device cuda  # a GPU each

--batch-size is the global batch. Every process draws the same batch from the same
seed and trains on its own contiguous slice of it, so a step of N processes is the
step of one process over the whole batch (tests/test_distributed.py checks that the
gradients and parameters agree). FSDP2 (torch.distributed.fsdp.fully_shard) shards
the encoder, each processor layer and the decoder as units, then the rest at the root.
Process 0 gathers the trained weights into a plain model: it evaluates that, saves the
checkpoint (loadable with examples.digits.build_model) and prints the RESULT line.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from . import common, digits

STRATEGIES = ("ddp", "fsdp")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--strategy", choices=STRATEGIES, default="ddp",
                        help="ddp (replicated weights, all-reduced gradients) or fsdp (FSDP2: sharded weights, "
                             "gradients and optimizer state)")


def process_device(requested: torch.device, local_rank: int) -> torch.device:
    """The device of this process: the CPU, or the GPU numbered by its local rank."""
    if requested.type != "cuda":
        return requested
    if requested.index is not None:
        raise SystemExit(f"--device {requested}: pass cuda without an index; process i of a node uses cuda:i")
    if local_rank >= torch.cuda.device_count():
        raise SystemExit(f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}")
    return torch.device("cuda", local_rank)


def shard(model: nn.Module, strategy: str, device: torch.device) -> nn.Module:
    """The model wrapped for data-parallel training over the default process group."""
    if strategy == "ddp":
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # Units whose forward is called through nn.Module.__call__: FSDP gathers a unit's
    # weights in its forward hook. The decoder calls its layer's project_kv and
    # forward_projected directly, so the decoder is one unit as a whole.
    for unit in (model.encoder, *model.processor.layers, model.decoder):
        fully_shard(unit, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def local_slice(global_batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This process's equal, contiguous share of the global batch."""
    if len(global_batch) % world_size:
        raise ValueError(f"the global batch ({len(global_batch)}) must divide among {world_size} processes")
    return global_batch.chunk(world_size)[rank]


def loss_of(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # The mean over this process's share; DDP and FSDP average the gradients over the
    # processes, which with equal shares is the gradient of the global batch's mean.
    return F.cross_entropy(model(images), labels, label_smoothing=0.05)


def gathered_model(model: nn.Module, config: digits.DigitsConfig) -> nn.Module | None:
    """The trained weights in a plain model on process 0's CPU (None elsewhere); every process must call it."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    if dist.get_rank() != 0:
        return None
    plain = digits.build_model(config)
    plain.load_state_dict(state)
    return plain


def train(config: digits.DigitsConfig, out_dir: Path, device: torch.device, strategy: str, seed: int = 0,
          show_progress: bool = True) -> dict | None:
    """Trains on every process; returns the metrics on process 0 and None on the others."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    # The same seed everywhere: FSDP2 keeps each process's slice of its own initial
    # weights, so they must be the same weights (DDP would broadcast process 0's).
    torch.manual_seed(seed)
    batches = torch.Generator().manual_seed(seed)
    train_images, train_labels, test_images, test_labels = digits.load_digits(config.test_fraction)
    model = shard(digits.build_model(config).to(device), strategy, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=config.steps, pct_start=0.1)
    losses = []
    steps = range(config.steps)
    model.train()
    for _ in (common.progress(steps, config.steps, f"{strategy} x{world_size}")
              if show_progress and rank == 0 else steps):
        rows = local_slice(torch.randint(0, len(train_labels), (config.batch_size,), generator=batches),
                           rank, world_size)
        loss = loss_of(model, train_images[rows].to(device), train_labels[rows].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.detach())
    # One collective for the whole curve: the global batch's loss is the mean of the shares'.
    history = torch.stack(losses)
    dist.all_reduce(history)
    plain = gathered_model(model, config)
    if plain is None:
        return None
    losses = (history / world_size).tolist()
    metrics = {
        "strategy": strategy,
        "processes": world_size,
        "test_accuracy": digits.accuracy(plain, test_images, test_labels, "cpu"),
        "train_accuracy": digits.accuracy(plain, train_images, train_labels, "cpu"),
        "chance": 1 / digits.NUM_CLASSES,
        "test_images": len(test_labels),
        "loss_history": losses,
    }
    printable = {k: v for k, v in metrics.items() if k != "loss_history"}
    common.save_checkpoint(out_dir / "checkpoint.pt", plain, config, printable)
    common.plot_curves(out_dir / "curve.png", {"training loss (smoothed)": (list(range(len(losses))),
                                                                           common.smoothed(losses))},
                       f"Perceiver IO on digits, {strategy.upper()} over {world_size} processes", "cross-entropy")
    return metrics


def main() -> None:
    if "LOCAL_RANK" not in os.environ:
        raise SystemExit("launch with torchrun, e.g. torchrun --nproc-per-node 2 -m examples.distributed")
    args, config, requested = common.parse_args("distributed", __doc__, digits.DEFAULT, digits.FULL,
                                                add_arguments=add_arguments,
                                                prog="torchrun --nproc-per-node N -m examples.distributed")
    world_size = int(os.environ["WORLD_SIZE"])
    if config.batch_size % world_size:
        raise SystemExit(f"--batch-size {config.batch_size} (the global batch) must divide among {world_size} "
                         "processes")
    device = process_device(requested, int(os.environ["LOCAL_RANK"]))
    if device.type == "cuda":
        # Before any collective: NCCL and the kernels' launches use the current device.
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        with common.Timer() as timer:
            metrics = train(config, args.out, device, args.strategy, seed=args.seed)
        if metrics is not None:
            print(common.finish("distributed", args.out, metrics, timer.seconds, device))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
