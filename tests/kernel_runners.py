"""The kernel implementations behind the op, as runners of one contract.

tests/test_forward_contract.py and tests/test_backward_contract.py state what every
kernel must do (docs/DESIGN.md, "The op contract"); a runner is one way to execute a
kernel on validated inputs:

- triton-interpreter: the Triton kernels in Triton's interpreter on the CPU (CI);
- cuda-emulation: the CUDA extension's real sources compiled for the CPU
  (tests/cuda_emulation/), driven through the real launcher (CI);
- triton-gpu, cuda-gpu: the same kernels on a GPU (marked `gpu`);
- triton-interpreter-untimed, triton-gpu-untimed: the Triton rewrites no GPU has timed
  yet (perceiver_kernels/triton/variants.py), on the cases one of them serves; the
  others skip, since the timed kernels run them and have their own runners.

A runner declares its device, the dtypes it is tested in, its paths (the plans it
forces: unsplit, split-KV, resident K/V...), whether a case visits every path or one
in turn (slow runners), and its tolerances. A new kernel path adds a runner here and
gets the whole contract.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import pytest
import torch

from tests.attention_cases import EPSILON
from tests.conftest import HAS_GPU

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def kernel_call(inputs: dict, allow_tf32: bool = False):
    """The validated call of the op's inputs (a tests/attention_cases dict, which may
    carry "causal"), as the op hands it to a kernel (no gradients recorded)."""
    from perceiver_kernels.problem import validate

    with torch.no_grad():
        call = validate(inputs["q"], inputs["k"], inputs["v"], inputs["key_padding_mask"], inputs["residual"],
                        inputs["scale"], causal=inputs.get("causal", False))
    tf32 = allow_tf32 and call.q.dtype == torch.float32
    return call._replace(problem=call.problem._replace(tf32=tf32))


def _triton_forward(inputs: dict, num_splits: Optional[int] = None, allow_tf32: bool = False):
    from perceiver_kernels.triton.forward import run_forward

    return run_forward(kernel_call(inputs, allow_tf32), num_splits=num_splits)


def _untimed(plan, timed_kind, what: str):
    """Skips the case unless an untimed rewrite serves it."""
    if isinstance(plan, timed_kind):
        pytest.skip(f"no untimed Triton {what} serves this case (the timed kernels' runners run it)")


def _triton_untimed_forward(inputs: dict, num_splits: Optional[int] = None):
    from perceiver_kernels.triton import forward, variants

    call = kernel_call(inputs)
    with variants.running(variants.UNTIMED):
        _untimed(forward.plan_forward(call.problem, num_splits), forward.TiledForward, "forward")
        return forward.run_forward(call, num_splits=num_splits)


def _cuda_forward(inputs: dict, num_splits: Optional[int] = None, multiprocessors: Optional[int] = None):
    from perceiver_kernels.cuda.launch import run_forward

    extension = None
    if inputs["q"].device.type == "cpu":
        from tests import cuda_emulation

        extension = cuda_emulation.build()
        if multiprocessors is not None:
            extension = extension.with_multiprocessors(multiprocessors)
    return run_forward(kernel_call(inputs), num_splits=num_splits, extension=extension)


def _triton_interpreter_unavailable() -> str:
    from perceiver_kernels.triton.kernels.common import INTERPRETED

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
    # Head-dim pairs above 256 the wide-head cases run (none: no wide path), and their
    # (Nq, Nk) where the default is too slow (the interpreted wide kernels walk every
    # head dim chunk by chunk, once per slice).
    wide_head_dims: tuple[tuple[int, int], ...] = ()
    wide_head_problem: Optional[tuple[int, int]] = None
    wide_head_problem_fp32: Optional[tuple[int, int]] = None  # the same in float32, where that is slower
    # Wide head-dim pairs at a multiple of 16 channels, as the perceiver model layer stores
    # them (perceiver/padding.py): the paths that read such rows by TMA.
    stored_wide_head_dims: tuple[tuple[int, int], ...] = ()
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
    """One backward implementation: gradients(inputs, dout, num_chunks) -> {q, k, v}."""

    name: str
    device: str
    forward: ForwardRunner  # the forward whose out and lse the backward takes
    dtypes: tuple[torch.dtype, ...]
    gpu: bool = False
    epsilon: dict = field(default_factory=lambda: dict(EPSILON))
    variant: str = "timed"  # of perceiver_kernels/triton/variants.py

    def gradients(self, inputs: dict, dout: torch.Tensor, num_chunks: Optional[int]) -> dict:
        """Kernel gradients of q, k, v; as in the kernel backends' training, the residual
        is added outside the kernels, so the backward sees the attention alone."""
        from perceiver_kernels.triton import backward, variants

        attention_inputs = {**inputs, "residual": None}
        call = kernel_call(attention_inputs)
        with variants.running(self.variant):
            if self.variant == variants.UNTIMED:
                _untimed(backward.plan_backward(call.problem, num_chunks), backward.TwoKernelBackward, "backward")
            out, lse = self.forward.run(attention_inputs)
            return dict(zip("qkv", backward.run_backward(call, dout, out, lse, num_chunks=num_chunks)))

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

# Wide heads: not 16-byte aligned, Dv in three slices (261); Dv in ten slices over a
# narrow Dqk (32/1280); a wide Dqk summed in chunks beside a narrow Dv (1280/24).
TRITON_WIDE_HEAD_DIMS = ((261, 261), (32, 1280), (1280, 24))

TRITON_INTERPRETER = ForwardRunner(
    name="triton-interpreter", device="cpu", run=_triton_forward,
    dtypes=(torch.float32, torch.float16),  # a bf16 tl.dot returns garbage in the interpreter
    paths=TRITON_PATHS, unavailable=_triton_interpreter_unavailable, head_dims=TRITON_HEAD_DIMS, causal=True,
    wide_head_dims=TRITON_WIDE_HEAD_DIMS,
    wide_head_problem=(70, 100),  # 3 query tiles and 4 key blocks, the last ones partial
    # Exact fp32 takes 16-row tiles, and every one walks the head dims in chunks per slice:
    # 2 tiles and 3 key blocks, the last ones partial (a d1024 case took 132 s at 70 x 100).
    wide_head_problem_fp32=(20, 40),
    # Larger float32 cases of the grid run in float16 (the slowest of the backward: a
    # minute each at 300 x 700; the GPU runner keeps them in float32).
    max_fp32_cells=64 * 700,
)
TRITON_GPU = ForwardRunner(
    name="triton-gpu", device="cuda", run=_triton_forward, dtypes=DTYPES, paths=TRITON_PATHS, gpu=True,
    head_dims=TRITON_HEAD_DIMS, causal=True, wide_head_dims=TRITON_WIDE_HEAD_DIMS,
)

# The untimed wide forward (triton/wide.py) on heads stored at a multiple of 16: Q.K^T in
# two chunks and Dv in two (272) or three (336), Dqk != Dv (512/256), Dv in two slices
# of 256 (272/512).
STORED_WIDE_HEAD_DIMS = ((272, 272), (336, 336), (512, 256), (272, 512))

# The Triton rewrites: the timed kernels' runners, run where a rewrite serves.
TRITON_INTERPRETER_UNTIMED = replace(
    TRITON_INTERPRETER, name="triton-interpreter-untimed", run=_triton_untimed_forward,
    stored_wide_head_dims=STORED_WIDE_HEAD_DIMS,
)
TRITON_GPU_UNTIMED = replace(
    TRITON_GPU, name="triton-gpu-untimed", run=_triton_untimed_forward, stored_wide_head_dims=STORED_WIDE_HEAD_DIMS,
)

# The compiled pairs, a dim padded up to one (24/7) and an odd Dv (stores channel by channel),
# and the wide kernels: a dim that is no multiple of 16 (261 runs as 272, the query tile
# resident in shared memory), Dqk != Dv with Dv cut into three slices (32/1280), Q
# streamed beside K (512/512), and both at once (1024/1024: two slices).
CUDA_HEAD_DIMS = ((32, 32), (64, 64), (32, 96), (32, 160), (128, 128), (24, 7), (64, 120),
                  (261, 261), (32, 1280), (512, 512), (1024, 1024))
# A GPU also runs the released models' other wide heads and the largest.
CUDA_GPU_HEAD_DIMS = CUDA_HEAD_DIMS + ((322, 322), (64, 512), (1280, 1280))
# Wide heads: the query tile resident with element-wise loads (261, rows not 16-byte
# aligned); Q streamed beside K, Dv in two slices (three in fp32), cp.async loads
# (520/600); an odd Dv stored channel by channel (100/333).
CUDA_WIDE_HEAD_DIMS = ((261, 261), (520, 600), (100, 333))
CUDA_EMULATION = ForwardRunner(
    name="cuda-emulation", device="cpu", run=_cuda_forward, dtypes=DTYPES,
    # The paths a GPU takes, forced on small problems: K/V streamed unsplit, split-KV
    # with a merge, and (on an emulated GPU of one SM, so that blocks get several query
    # tiles) K/V resident in shared memory.
    paths={"stream": dict(num_splits=1), "split": dict(num_splits=3),
           "resident": dict(num_splits=1, multiprocessors=1)},
    rotate_paths=True, unavailable=_cuda_emulation_unavailable, head_dims=CUDA_HEAD_DIMS,
    max_fp32_cells=64 * 129, causal=True, wide_head_dims=CUDA_WIDE_HEAD_DIMS, wide_head_problem=(70, 300),
)
CUDA_GPU = ForwardRunner(
    name="cuda-gpu", device="cuda", run=_cuda_forward, dtypes=DTYPES,
    paths={"unsplit": dict(num_splits=1), "split": dict(num_splits=3)}, gpu=True,
    unavailable=_cuda_gpu_unavailable, head_dims=CUDA_GPU_HEAD_DIMS, causal=True,
    wide_head_dims=CUDA_WIDE_HEAD_DIMS, wide_head_problem=(70, 300),
)

FORWARD_RUNNERS = (TRITON_INTERPRETER, TRITON_INTERPRETER_UNTIMED, CUDA_EMULATION, TRITON_GPU, TRITON_GPU_UNTIMED,
                   CUDA_GPU)

BACKWARD_RUNNERS = (
    BackwardRunner(name="triton-interpreter", device="cpu", forward=TRITON_INTERPRETER,
                   dtypes=TRITON_INTERPRETER.dtypes),
    BackwardRunner(name="triton-interpreter-untimed", device="cpu", forward=TRITON_INTERPRETER,
                   dtypes=TRITON_INTERPRETER.dtypes, variant="untimed"),
    BackwardRunner(name="triton-gpu", device="cuda", forward=TRITON_GPU, dtypes=DTYPES, gpu=True),
    BackwardRunner(name="triton-gpu-untimed", device="cuda", forward=TRITON_GPU, dtypes=DTYPES, gpu=True,
                   variant="untimed"),
    # The CUDA backend trains through the Triton backward from the CUDA forward's lse.
    BackwardRunner(name="cuda-gpu+triton", device="cuda", forward=CUDA_GPU, dtypes=DTYPES, gpu=True),
)
