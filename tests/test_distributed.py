"""Data-parallel training of the model layer: two gloo processes on the CPU, under DDP and
under FSDP2, take the same steps as one process over the whole batch.

The processes wrap the model and split each global batch with examples/distributed.py's
own functions; the reference is the plain model in this process. Per step the
gradients (FSDP's gathered from their shards) and, at the end, the parameters after
the optimizer's steps must match the reference to fp32 rounding.
"""

from __future__ import annotations

import dataclasses
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from examples import common, digits, distributed
from perceiver_kernels import kernel_launch, machine

WORLD_SIZE = 2
STEPS = 3
# Small enough that both strategies' runs take seconds; every kind of trained module
# is there (encoder, a processor layer, decoder, learned query, classifier).
CONFIG = dataclasses.replace(digits.DEFAULT, batch_size=16, num_latents=8, latent_dim=32, num_layers=1, num_heads=2)
# Generous for a loaded 2-core machine: the processes start torch (seconds each) and
# gloo rendezvous; a hung collective fails the test instead of hanging CI.
TIMEOUT_S = 150
# fp32 sums in a different order (halves of the batch, then the all-reduce) differ by
# up to ~1e-7 in gradients of up to ~0.2, and by up to ~3e-7 in the parameters.
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}
# The keys' biases have zero gradient in exact arithmetic (q.(k + b) adds the same
# q.b to every score of a query, which softmax ignores), so theirs is rounding noise
# (~1e-9), and Adam, dividing by the gradient's own size, turns that noise into steps
# of ~1e-2 lr that differ between the runs: their parameters are not compared.
NOISE_ONLY = ".key.bias"
NOISE_BOUND = 1e-7


def _batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    train_size = len(digits.load_digits(CONFIG.test_fraction)[1])
    return [torch.randint(0, train_size, (CONFIG.batch_size,), generator=generator) for _ in range(STEPS)]


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: FSDP2 holds shards as DTensors (gathering is a collective)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor.detach().clone()


def _run(strategy: str | None, rank: int = 0, world_size: int = 1) -> dict:
    """STEPS optimizer steps; strategy None is the plain model in one process."""
    images, labels, _, _ = digits.load_digits(CONFIG.test_fraction)
    torch.manual_seed(0)
    plain = digits.build_model(CONFIG)
    # DDP wraps the module; fully_shard converts it in place: either way `plain`
    # names the parameters being trained.
    model = plain if strategy is None else distributed.shard(plain, strategy, torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=CONFIG.lr, weight_decay=CONFIG.weight_decay)
    gradients = []
    for batch in _batches():
        rows = distributed.local_slice(batch, rank, world_size)
        loss = distributed.loss_of(model, images[rows], labels[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        gradients.append({name: _full(p.grad) for name, p in plain.named_parameters()})
        optimizer.step()
    run = {"gradients": gradients, "parameters": {name: _full(p) for name, p in plain.named_parameters()}}
    if strategy is not None:
        # What the example evaluates and saves: the weights gathered into a plain model on process 0.
        gathered = distributed.gathered_model(model, CONFIG)
        run["gathered"] = None if gathered is None else gathered.state_dict()
    return run


def _worker(rank: int, folder: str) -> None:
    torch.set_num_threads(1)  # two processes on two cores
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=WORLD_SIZE,
                            timeout=timedelta(seconds=TIMEOUT_S))
    try:
        runs = {strategy: _run(strategy, rank, WORLD_SIZE) for strategy in distributed.STRATEGIES}
        # The example's whole training function, briefly, on the harder path.
        metrics = distributed.train(dataclasses.replace(CONFIG, steps=2), Path(folder) / "train", torch.device("cpu"),
                                    "fsdp", show_progress=False)
        assert (metrics is None) == (rank != 0), f"process {rank} returned {metrics}"
        if rank == 0:
            torch.save(runs, f"{folder}/runs.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """The folder the processes' results are in, once they have all finished."""
    folder = tmp_path_factory.mktemp("distributed")
    # A file store ("store" in folder): no port to find free, nothing left listening if a process dies.
    context = mp.start_processes(_worker, args=(str(folder),), nprocs=WORLD_SIZE, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                pytest.fail(f"the {WORLD_SIZE} training processes did not finish within {TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return folder


@pytest.fixture(scope="module")
def distributed_runs(run_folder) -> dict:
    return torch.load(run_folder / "runs.pt", weights_only=True)


@pytest.fixture(scope="module")
def reference() -> dict:
    return _run(None)


@pytest.mark.parametrize("strategy", distributed.STRATEGIES)
def test_gradients_equal_one_process_over_the_global_batch(strategy, distributed_runs, reference):
    run = distributed_runs[strategy]
    for step, (got, expected) in enumerate(zip(run["gradients"], reference["gradients"], strict=True)):
        assert got.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(
                got[name], expected[name], **TOLERANCE,
                msg=lambda m, step=step, name=name: f"{strategy}, step {step}, gradient of {name}: {m}")


@pytest.mark.parametrize("strategy", distributed.STRATEGIES)
def test_parameters_after_the_steps_equal_one_process(strategy, distributed_runs, reference):
    got, expected = distributed_runs[strategy]["parameters"], reference["parameters"]
    assert got.keys() == expected.keys()
    noise_only = [name for name in expected if name.endswith(NOISE_ONLY)]
    assert len(noise_only) == 3  # the encoder's, the processor layer's and the decoder's attention
    for name in noise_only:
        assert all(step[name].abs().max() < NOISE_BOUND for step in reference["gradients"]), name
    for name in set(expected) - set(noise_only):
        torch.testing.assert_close(got[name], expected[name], **TOLERANCE,
                                   msg=lambda m, name=name: f"{strategy}, parameter {name} after {STEPS} steps: {m}")


@pytest.mark.parametrize("strategy", distributed.STRATEGIES)
def test_process_zero_gathers_the_trained_weights_into_a_plain_model(strategy, distributed_runs):
    run = distributed_runs[strategy]
    assert run["gathered"].keys() == run["parameters"].keys()  # DDP's module. prefix dropped
    for name, parameter in run["parameters"].items():
        torch.testing.assert_close(run["gathered"][name], parameter, rtol=0, atol=0)


def test_training_saves_the_trained_weights_as_a_plain_checkpoint(run_folder):
    out = run_folder / "train"
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert saved["metrics"]["strategy"] == "fsdp" and saved["metrics"]["processes"] == WORLD_SIZE
    assert 0.0 <= saved["metrics"]["test_accuracy"] <= 1.0
    model, config = common.load_checkpoint(out / "checkpoint.pt", digits.DigitsConfig, digits.build_model)
    torch.manual_seed(0)  # train()'s seed: the weights it started from
    initial = digits.build_model(config).state_dict()
    unchanged = [name for name, weight in model.state_dict().items() if torch.equal(weight, initial[name])]
    assert not unchanged, f"not trained: {unchanged}"
    assert (out / "curve.png").read_bytes()[:4] == b"\x89PNG"


def test_the_split_plan_counts_the_multiprocessors_of_each_gpu(monkeypatch):
    """A process that drives two GPUs (or whose current device is not its tensors') plans
    each one's split-KV with that GPU's own SM count: the count is cached per device."""
    multiprocessors = {0: 132, 1: 16}
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: SimpleNamespace(multi_processor_count=multiprocessors[index]))
    machine.multiprocessors.cache_clear()
    try:
        # ENC-3's forward: 16 programs over 400,000 keys; 2 programs per SM wanted.
        chunks = [kernel_launch.plan_chunks(16, 400_000, torch.device("cuda", index))[0] for index in (0, 1, 0)]
    finally:
        machine.multiprocessors.cache_clear()  # no invented GPU left in the cache
    assert chunks == [17, 2, 17]  # ceil(2 * 132 / 16), 2 * 16 / 16, and GPU 0's again
