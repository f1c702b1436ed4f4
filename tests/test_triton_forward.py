"""The Triton forward kernels against the float64 reference.

On CPU they run in the Triton interpreter (tests/conftest.py), so shapes stay small.
Both kernel paths run every case: "tile" (one program per query tile, all keys; the
DECODE path) and "split" (split-KV with a merge; the ENCODE path).
"""

import itertools

import pytest
import torch

from perceiver_kernels.triton_launch import attention_forward, plan_forward
from tests.attention_cases import Case, assert_matches_reference, make_inputs, nan_padding_inputs, strided_inputs
from tests.conftest import KERNEL_DEVICE

NUM_QUERIES = (1, 7, 64, 300)
NUM_KEYS = (1, 5, 129, 1100)
HEAD_DIMS = ((16, 16), (40, 24), (64, 64), (100, 128), (128, 100))  # (Dqk, Dv), Dv != Dqk included
PATH_SPLITS = {"tile": 1, "split": 3}


def run(inputs, path, allow_tf32=False):
    return attention_forward(
        inputs["q"], inputs["k"], inputs["v"], inputs["key_padding_mask"], inputs["residual"],
        inputs["scale"] if inputs["scale"] is not None else inputs["q"].shape[-1] ** -0.5,
        allow_tf32, num_splits=PATH_SPLITS[path],
    )


def _grid():
    # Every (Nq, Nk, head dims) combination, each with a mask that leaves some rows
    # without keys, a residual and the transposed (B, L, H, D) layout; the dtype
    # alternates so that both fp32 and fp16 see every Nq x Nk pair and every head dim.
    for i, (nq, nk, (dqk, dv)) in enumerate(itertools.product(NUM_QUERIES, NUM_KEYS, HEAD_DIMS)):
        dtype = (torch.float32, torch.float16)[(i + i // len(HEAD_DIMS)) % 2]
        yield Case(batch=2, heads=2, num_queries=nq, num_keys=nk, head_dim_qk=dqk, head_dim_v=dv,
                   dtype=dtype, mask=True, residual=True, transposed=True)


GRID = list(_grid())


@pytest.mark.parametrize("path", PATH_SPLITS)
@pytest.mark.parametrize("case", GRID, ids=lambda c: f"q{c.num_queries}-k{c.num_keys}-d{c.head_dim_qk}x{c.head_dim_v}-{str(c.dtype)[6:]}")
def test_grid_with_mask_residual_transposed(case, path, poisoned_empty):
    inputs = make_inputs(case, KERNEL_DEVICE)
    out, lse = run(inputs, path)
    assert_matches_reference(out, inputs, lse)


@pytest.mark.parametrize("path", PATH_SPLITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_queries,num_keys", [(7, 1100), (300, 129), (1, 5)])
def test_plain_contiguous_without_mask_or_residual(num_queries, num_keys, dtype, path, poisoned_empty):
    case = Case(num_queries=num_queries, num_keys=num_keys, head_dim_qk=40, head_dim_v=24, dtype=dtype)
    inputs = make_inputs(case, KERNEL_DEVICE)
    out, lse = run(inputs, path)
    assert_matches_reference(out, inputs, lse)


@pytest.mark.parametrize("num_splits", [2, 5, 9])
def test_split_counts_and_chunks_that_are_entirely_padding(num_splits, poisoned_empty):
    case = Case(batch=3, num_queries=20, num_keys=700, head_dim_qk=32, head_dim_v=48, mask=True, residual=True)
    inputs = make_inputs(case, KERNEL_DEVICE)
    mask = inputs["key_padding_mask"]
    mask[1, :400] = True  # batch 1: the first chunks hold only padding
    mask[2, :] = False
    mask[2, 350:] = True  # batch 2: the last chunks hold only padding
    out, lse = attention_forward(inputs["q"], inputs["k"], inputs["v"], mask, inputs["residual"], 0.25, False,
                                 num_splits=num_splits)
    inputs["scale"] = 0.25
    assert_matches_reference(out, inputs, lse)


def test_all_padding_gives_zero_plus_residual_and_minus_inf_lse(poisoned_empty):
    case = Case(num_queries=9, num_keys=300, mask=True, residual=True)
    inputs = make_inputs(case, KERNEL_DEVICE)
    for path in PATH_SPLITS:
        out, lse = run(inputs, path)
        torch.testing.assert_close(out[0], inputs["residual"][0], rtol=0, atol=0)
        assert torch.isneginf(lse[0]).all() and torch.isfinite(lse[1]).all()


def test_padding_keys_holding_nan_do_not_leak(poisoned_empty):
    inputs, clean = nan_padding_inputs(Case(num_queries=5, num_keys=200), KERNEL_DEVICE)
    for path in PATH_SPLITS:
        out, _ = run(inputs, path)
        assert not out.isnan().any()
        assert_matches_reference(out, clean)


def test_arbitrary_strides(poisoned_empty):
    inputs = strided_inputs(KERNEL_DEVICE, torch.float32, num_queries=33)
    for path in PATH_SPLITS:
        out, lse = run(inputs, path)
        assert_matches_reference(out, inputs, lse)


def test_output_layout_makes_head_merge_free():
    inputs = make_inputs(Case(num_queries=10, num_keys=20, head_dim_v=24), KERNEL_DEVICE)
    out, _ = run(inputs, "tile")
    merged = out.transpose(1, 2).reshape(2, 10, 2 * 24)
    assert merged.data_ptr() == out.data_ptr() and merged.is_contiguous()


def test_split_plan_fills_the_gpu(monkeypatch):
    from perceiver_kernels import chunking

    monkeypatch.setattr(chunking, "multiprocessor_count", lambda device: 132)  # an H100
    gpu = torch.device("cuda", 0)
    enc3 = plan_forward(1, 8, 256, 400_000, 64, 64, gpu)  # 16 programs unsplit
    enc1 = plan_forward(8, 8, 256, 50_176, 64, 64, gpu)   # 128 programs unsplit
    dec1 = plan_forward(8, 8, 50_176, 256, 64, 64, gpu)   # thousands of query tiles
    short = plan_forward(1, 1, 64, 700, 64, 64, gpu)      # too few keys for a split to pay
    assert enc3.num_splits == 17
    assert enc1.num_splits == 3
    assert dec1.num_splits == 1
    assert short.num_splits == 1
    assert enc3.keys_per_split % 128 == 0 and enc3.keys_per_split * enc3.num_splits >= 400_000


def test_exact_fp32_splits_with_shorter_query_tiles(monkeypatch):
    """Exact fp32 dots keep operands in registers: 64-row tiles, so twice the programs."""
    from perceiver_kernels import chunking

    monkeypatch.setattr(chunking, "multiprocessor_count", lambda device: 132)
    gpu = torch.device("cuda", 0)
    exact = plan_forward(1, 8, 256, 400_000, 64, 64, gpu, exact_fp32=True)  # 32 programs unsplit
    assert exact.query_tile_rows == 64 and exact.num_splits == 9
    assert plan_forward(1, 8, 256, 400_000, 64, 64, gpu).query_tile_rows == 128


@pytest.mark.parametrize("dtype, allow_tf32, block_dv", [
    ("float16", False, 64), ("bfloat16", False, 64),  # tensor cores: V block widened to the Q/K block
    ("float32", True, 64),                             # TF32 dots run on tensor cores too
    ("float32", False, 32),                            # exact fp32 on CUDA cores keeps its own width
])
def test_launches_widen_the_value_block_on_tensor_cores(dtype, allow_tf32, block_dv):
    """Dqk=40, Dv=24 (blocks 64 and 32) gave wrong results with 16-bit inputs on an H200
    (Triton 3.6) unless both blocks were 64: every kernel the launchers start for such
    inputs, forward and backward, ENCODE and DECODE, gets equal blocks on tensor cores."""
    from tests.triton_compile import Problem, record_launches

    for num_queries, num_keys in ((128, 4096), (4096, 128)):
        launches = record_launches(Problem(dtype, 40, 24, num_queries, num_keys), allow_tf32=allow_tf32)
        assert len(launches) >= 3
        for kernel, _, kwargs in launches:
            assert kwargs["BLOCK_DV"] == block_dv, kernel
            assert kwargs.get("BLOCK_DQK", 64) == 64, kernel


def test_chained_dots_reproducer_runs_and_is_right_in_the_interpreter():
    """The reproducer of the Hopper head-dim bug must itself be trustworthy: in the
    interpreter (exact numpy dots) every case is right."""
    from tests import repro_chained_dots

    if KERNEL_DEVICE != "cpu":
        pytest.skip("on a GPU the reproducer tests the installed Triton, not itself")
    assert repro_chained_dots.main(["--dtypes", "float16", "--device", "cpu"]) == 0
