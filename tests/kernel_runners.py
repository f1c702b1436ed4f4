"""The kernel implementations behind the op, as runners of one contract.

tests/test_forward_contract.py and tests/test_backward_contract.py state what every
kernel must do (docs/DESIGN.md, "The op contract"); a runner is one way to execute a
kernel on validated inputs:

- triton-interpreter: the Triton kernels in Triton's interpreter on the CPU (CI);
- cuda-emulation: the CUDA extension's real sources compiled for the CPU
  (tests/cuda_emulation/), driven through the real launcher (CI);
- triton-gpu, cuda-gpu: the same kernels on a GPU (marked `gpu`).

A runner declares its device, the dtypes it is tested in, its paths (the plans it
forces: unsplit, split-KV, resident K/V...), whether a case visits every path or one
in turn (slow runners), and its tolerances. A new kernel path adds a runner here and
gets the whole contract.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import pytest
import torch

from tests.attention_cases import EPSILON
from tests.conftest import HAS_GPU

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _scale(inputs: dict) -> float:
    return inputs["scale"] if inputs["scale"] is not None else inputs["q"].shape[-1] ** -0.5


def _triton_forward(inputs: dict, num_splits: Optional[int] = None, allow_tf32: bool = False):
    from perceiver_kernels.triton_launch import run_triton_forward

    return run_triton_forward(inputs["q"], inputs["k"], inputs["v"], inputs["key_padding_mask"], inputs["residual"],
                              _scale(inputs), allow_tf32, num_splits=num_splits, causal=inputs.get("causal", False))


def _cuda_forward(inputs: dict, num_splits: Optional[int] = None, multiprocessors: Optional[int] = None):
    from perceiver_kernels.cuda_launch import run_cuda_forward

    extension = None
    if inputs["q"].device.type == "cpu":
        from tests import cuda_emulation

        extension = cuda_emulation.build()
        if multiprocessors is not None:
            extension = extension.with_multiprocessors(multiprocessors)
    return run_cuda_forward(inputs["q"], inputs["k"], inputs["v"], inputs["key_padding_mask"], inputs["residual"],
                            _scale(inputs), num_splits=num_splits, extension=extension,
                            causal=inputs.get("causal", False))


def _triton_interpreter_unavailable() -> str:
    from perceiver_kernels.kernels.common import INTERPRETED

    return "" if INTERPRETED else "the Triton interpreter is off (TRITON_INTERPRET is unset)"


def _cuda_emulation_unavailable() -> str:
    from tests import cuda_emulation

    return cuda_emulation.unavailable()


def _cuda_gpu_unavailable() -> str:
    import perceiver_kernels as pk

    return "" if pk.build_info()["built"] else "perceiver_kernels._C is not built (no nvcc)"


@dataclass(frozen=True)
class ForwardRunner:
    """One forward implementation: run(inputs, **path options) -> (out, lse)."""

    name: str
    device: str
    run: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    dtypes: tuple[torch.dtype, ...]
    # Path name -> options of run(). A case visits every path, or one in turn when the
    # runner is slow (rotate_paths); every path still meets every dtype and shape class.
    paths: dict[str, dict]
    rotate_paths: bool = False
    gpu: bool = False
    unavailable: Callable[[], str] = lambda: ""
    # Head-dim pairs this implementation must get right beyond the shared grid.
    head_dims: tuple[tuple[int, int], ...] = ()
    epsilon: dict = field(default_factory=lambda: dict(EPSILON))
    # Largest Nq * Nk of a float32 case (the emulated fp32 kernel is slow).
    max_fp32_cells: Optional[int] = None
    # (Nq, Nk) of the head-dim cases above 256, where the default is too slow (the
    # interpreted wide kernels walk every head dim chunk by chunk, once per slice).
    wide_head_problem: Optional[tuple[int, int]] = None
    causal: bool = False  # runs cross_attention's causal=True (inputs["causal"])

    def marks(self) -> list:
        reason = self.unavailable() if (self.gpu == HAS_GPU) else ""
        marks = [pytest.mark.gpu] if self.gpu else []
        if not self.gpu and HAS_GPU:
            marks.append(pytest.mark.skip(reason="a CPU runner; its GPU twin runs here"))
        elif reason:
            marks.append(pytest.mark.skip(reason=reason))
        return marks

    def param(self, *values, id_suffix: str = ""):
        return pytest.param(self, *values, marks=self.marks(), id=f"{self.name}{id_suffix}")


@dataclass(frozen=True)
class BackwardRunner:
    """One backward implementation: gradients(inputs, dout, num_chunks, fuse_residual) -> {q, k, v}."""

    name: str
    device: str
    forward: ForwardRunner  # the forward whose out and lse the backward takes
    dtypes: tuple[torch.dtype, ...]
    gpu: bool = False
    epsilon: dict = field(default_factory=lambda: dict(EPSILON))
    # PERCEIVER_KERNELS_BACKWARD: "two-kernel" (the default: the general kernels
    # everywhere) or "fused" (the fused kernels on the asymmetric shapes, the general
    # ones elsewhere).
    variant: str = "two-kernel"
    grid_every: int = 1  # the contract grid's cases this runner takes (every n-th)

    def gradients(self, inputs: dict, dout: torch.Tensor, num_chunks: Optional[int],
                  fuse_residual: bool = False) -> dict:
        """Kernel gradients; like the kernel backends in training, the residual is not
        fused unless asked (direct callers of the op may fuse it and train)."""
        from perceiver_kernels.triton_launch import run_triton_backward

        residual = inputs["residual"] if fuse_residual else None
        forward_inputs = {**inputs, "residual": residual}
        out, lse = self.forward.run(forward_inputs)
        args = (inputs["q"], inputs["k"], inputs["v"], inputs["key_padding_mask"], residual)
        previous = os.environ.get("PERCEIVER_KERNELS_BACKWARD")
        os.environ["PERCEIVER_KERNELS_BACKWARD"] = self.variant
        try:
            grads = run_triton_backward(dout, *args, out, lse, _scale(inputs), False, num_chunks=num_chunks,
                                        causal=inputs.get("causal", False))
        finally:
            if previous is None:
                del os.environ["PERCEIVER_KERNELS_BACKWARD"]
            else:
                os.environ["PERCEIVER_KERNELS_BACKWARD"] = previous
        return dict(zip("qkv", grads))

    def marks(self) -> list:
        return self.forward.marks()

    def param(self, *values, id_suffix: str = ""):
        return pytest.param(self, *values, marks=self.marks(), id=f"{self.name}{id_suffix}")


TRITON_PATHS = {"tile": dict(num_splits=1), "split": dict(num_splits=3)}
# Narrow pairs (each dim padded to a power of two), then the wide kernels: the released
# models' heads (261: Fourier image encoder, not 16-byte aligned; 322: conv and optical
# flow; 512, 1024), Dv cut into ten slices over a 32-channel Dqk (32/1280), and a wide
# Dqk summed in chunks beside a narrow Dv (1280/24).
TRITON_HEAD_DIMS = ((16, 16), (32, 32), (64, 64), (128, 128), (256, 256), (32, 160), (40, 24), (8, 200),
                    (261, 261), (322, 322), (512, 512), (1024, 1024), (32, 1280), (1280, 24))

TRITON_INTERPRETER = ForwardRunner(
    name="triton-interpreter", device="cpu", run=_triton_forward,
    dtypes=(torch.float32, torch.float16),  # a bf16 tl.dot returns garbage in the interpreter
    paths=TRITON_PATHS, unavailable=_triton_interpreter_unavailable, head_dims=TRITON_HEAD_DIMS, causal=True,
    wide_head_problem=(70, 100),  # 3 query tiles and 4 key blocks, the last ones partial
)
TRITON_GPU = ForwardRunner(
    name="triton-gpu", device="cuda", run=_triton_forward, dtypes=DTYPES, paths=TRITON_PATHS, gpu=True,
    head_dims=TRITON_HEAD_DIMS, causal=True,
)

# The compiled pairs, a dim padded up to one (24/7) and an odd Dv (stores channel by channel),
# and the wide kernels: a dim that is no multiple of 16 (261 runs as 272, the query tile
# resident in shared memory), Dqk != Dv with Dv cut into three slices (32/1280), Q
# streamed beside K (512/512), and both at once (1024/1024: two slices).
CUDA_HEAD_DIMS = ((32, 32), (64, 64), (32, 96), (32, 160), (128, 128), (24, 7), (64, 120),
                  (261, 261), (32, 1280), (512, 512), (1024, 1024))
# A GPU also runs the released models' other wide heads and the largest.
CUDA_GPU_HEAD_DIMS = CUDA_HEAD_DIMS + ((322, 322), (64, 512), (1280, 1280))
CUDA_EMULATION = ForwardRunner(
    name="cuda-emulation", device="cpu", run=_cuda_forward, dtypes=DTYPES,
    # The paths a GPU takes, forced on small problems: K/V streamed unsplit, split-KV
    # with a merge, and (on an emulated GPU of one SM, so that blocks get several query
    # tiles) K/V resident in shared memory.
    paths={"stream": dict(num_splits=1), "split": dict(num_splits=3),
           "resident": dict(num_splits=1, multiprocessors=1)},
    rotate_paths=True, unavailable=_cuda_emulation_unavailable, head_dims=CUDA_HEAD_DIMS,
    max_fp32_cells=64 * 129, causal=True,
)
CUDA_GPU = ForwardRunner(
    name="cuda-gpu", device="cuda", run=_cuda_forward, dtypes=DTYPES,
    paths={"unsplit": dict(num_splits=1), "split": dict(num_splits=3)}, gpu=True,
    unavailable=_cuda_gpu_unavailable, head_dims=CUDA_GPU_HEAD_DIMS, causal=True,
)

FORWARD_RUNNERS = (TRITON_INTERPRETER, CUDA_EMULATION, TRITON_GPU, CUDA_GPU)

BACKWARD_RUNNERS = (
    BackwardRunner(name="triton-interpreter", device="cpu", forward=TRITON_INTERPRETER,
                   dtypes=TRITON_INTERPRETER.dtypes),
    # The fused kernels (PERCEIVER_KERNELS_BACKWARD=fused; slower on the H200, kept
    # selectable) on a third of the grid.
    BackwardRunner(name="triton-interpreter-fused", device="cpu", forward=TRITON_INTERPRETER,
                   dtypes=TRITON_INTERPRETER.dtypes, variant="fused", grid_every=3),
    BackwardRunner(name="triton-gpu", device="cuda", forward=TRITON_GPU, dtypes=DTYPES, gpu=True),
    BackwardRunner(name="triton-gpu-fused", device="cuda", forward=TRITON_GPU, dtypes=DTYPES, gpu=True,
                   variant="fused", grid_every=3),
    # The CUDA backend trains through the Triton backward from the CUDA forward's lse.
    BackwardRunner(name="cuda-gpu+triton", device="cuda", forward=CUDA_GPU, dtypes=DTYPES, gpu=True),
)
