"""The CUDA C++ kernels run on the CPU: their real source, compiled by g++ with the warp
instructions emulated (tests/cuda_emulation/), against the float64 reference.

This is how CI checks the kernels' arithmetic (fragment layouts, lane addressing,
masking, online softmax, split partials and merge, resident K/V, strides) without a
GPU. It does not model asynchronous copies, timing or the GPU's memory model; the
`gpu`-marked tests in test_cuda_forward.py run the same kernels on a GPU.
"""

import itertools
import shutil

import pytest
import torch

from tests import cuda_emulation
from tests.attention_cases import Case, assert_matches_reference, make_inputs, nan_padding_inputs, strided_inputs

pytestmark = pytest.mark.skipif(
    shutil.which("g++") is None or cuda_emulation.cuda_include_dir() is None,
    reason="needs g++ and the CUDA toolkit's headers",
)

# The paths a GPU takes, forced on small problems: K/V streamed unsplit, split-KV with
# a merge, and (on an emulated GPU of one SM, so that blocks get several query tiles)
# K/V resident in shared memory.
PATHS = {
    "stream": dict(num_splits=1),
    "split": dict(num_splits=3),
    "resident": dict(num_splits=1, multiprocessors=1),
}
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    return cuda_emulation.build(tmp_path_factory.mktemp("cuda_emulation"))


def run(emulator, inputs, path="stream", **choices):
    q = inputs["q"]
    scale = inputs["scale"] if inputs["scale"] is not None else q.shape[-1] ** -0.5
    return cuda_emulation.forward(emulator, q, inputs["k"], inputs["v"], inputs["key_padding_mask"],
                                  inputs["residual"], scale, **{**PATHS[path], **choices})


def _grid():
    # Every (Nq, Nk, head dims) combination once; the dtype and the path rotate so that
    # every dtype meets every path. Dims are the Triton grid's: all served by padding
    # up to a compiled pair except 64/64 and 128/128, which are exact.
    shapes = itertools.product((1, 7, 64, 300), (1, 5, 129, 300), ((16, 16), (40, 24), (64, 64), (100, 128), (128, 100)))
    for i, (nq, nk, (dqk, dv)) in enumerate(shapes):
        dtype = DTYPES[i % 3]
        if dtype == torch.float32 and nq * nk > 64 * 129:
            dtype = torch.float16  # the emulated fp32 kernel is slow; small fp32 cases suffice
        yield Case(batch=2, heads=2, num_queries=nq, num_keys=nk, head_dim_qk=dqk, head_dim_v=dv, dtype=dtype,
                   mask=True, residual=True, transposed=True), tuple(PATHS)[(i // 3) % 3]


GRID = list(_grid())


@pytest.mark.parametrize("case,path", GRID, ids=lambda x: x if isinstance(x, str) else
                         f"q{x.num_queries}-k{x.num_keys}-d{x.head_dim_qk}x{x.head_dim_v}-{str(x.dtype)[6:]}")
def test_grid_with_mask_residual_transposed(emulator, case, path, poisoned_empty):
    inputs = make_inputs(case, "cpu")
    out, lse = run(emulator, inputs, path)
    assert_matches_reference(out, inputs, lse)


@pytest.mark.parametrize("dims", [(32, 32), (64, 64), (32, 96), (32, 160), (128, 128), (24, 7)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_compiled_pair_contiguous(emulator, dims, dtype, poisoned_empty):
    nq, nk = (40, 70) if dtype == torch.float32 else (300, 150)
    inputs = make_inputs(Case(batch=2, heads=2, num_queries=nq, num_keys=nk, head_dim_qk=dims[0], head_dim_v=dims[1],
                              dtype=dtype, mask=True), "cpu")
    for path in PATHS:
        out, lse = run(emulator, inputs, path)
        assert_matches_reference(out, inputs, lse)


def test_plans_of_the_anchor_shapes_on_an_h100(emulator):
    # DEC-1: K/V resident, each block running a share of 784 query tiles x 64 heads.
    dec1 = cuda_emulation.plan(emulator, torch.bfloat16, 8, 8, 50_176, 256, (64, 64), 1, 256, 132)
    assert dec1 == dict(kv_resident=True, query_tiles_per_block=47, grid_x=17)
    # ENC-1 split in 2: too few query tiles to share; K/V stream.
    enc1 = cuda_emulation.plan(emulator, torch.bfloat16, 8, 8, 256, 50_176, (64, 64), 2, 25_088, 132)
    assert enc1 == dict(kv_resident=False, query_tiles_per_block=1, grid_x=4)
    # 2048 latents' K/V (DEC-2) do not fit next to a second block: stream.
    dec2 = cuda_emulation.plan(emulator, torch.bfloat16, 1, 8, 800_000, 2048, (64, 64), 1, 2048, 132)
    assert not dec2["kv_resident"]


def test_resident_path_is_taken_on_one_sm(emulator):
    assert cuda_emulation.plan(emulator, torch.float16, 2, 2, 300, 300, (64, 64), 1, 300, 1)["kv_resident"]
    assert not cuda_emulation.plan(emulator, torch.float16, 2, 2, 300, 300, (64, 64), 1, 300, 132)["kv_resident"]


def test_checks_of_run_forward(emulator):
    inputs = make_inputs(Case(num_queries=10, num_keys=20, head_dim_qk=200, head_dim_v=16), "cpu")
    with pytest.raises(RuntimeError, match="no compiled kernel serves head dims Dqk=200"):
        run(emulator, inputs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_padding_keys_holding_nan_do_not_leak(emulator, dtype, poisoned_empty):
    inputs, clean = nan_padding_inputs(Case(num_queries=70, num_keys=150, dtype=dtype), "cpu")
    for path in PATHS:
        out, _ = run(emulator, inputs, path)
        assert_matches_reference(out, clean)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_arbitrary_strides(emulator, dtype, poisoned_empty):
    inputs = strided_inputs("cpu", dtype, num_queries=70)
    for path in PATHS:
        out, lse = run(emulator, inputs, path)
        assert_matches_reference(out, inputs, lse)


def test_splits_made_entirely_of_padding(emulator, poisoned_empty):
    case = Case(batch=3, num_queries=20, num_keys=700, head_dim_qk=32, head_dim_v=48, mask=True, residual=True,
                dtype=torch.float16)
    inputs = make_inputs(case, "cpu")
    mask = inputs["key_padding_mask"]
    mask[1, :400] = True  # batch 1: the first splits hold only padding
    mask[2, :] = False
    mask[2, 350:] = True  # batch 2: the last splits hold only padding
    for num_splits in (2, 5, 9):
        out, lse = run(emulator, inputs, num_splits=num_splits)
        assert_matches_reference(out, inputs, lse)


def test_all_padding_rows_give_exactly_the_residual_and_minus_inf_lse(emulator, poisoned_empty):
    inputs = make_inputs(Case(num_queries=300, num_keys=150, mask=True, residual=True, dtype=torch.bfloat16), "cpu")
    for path in PATHS:
        out, lse = run(emulator, inputs, path)
        torch.testing.assert_close(out[0], inputs["residual"][0], rtol=0, atol=0)
        assert torch.isneginf(lse[0]).all() and torch.isfinite(lse[1]).all()
