"""The forward contract (docs/DESIGN.md), checked once for every kernel runner.

Every case compares against the float64 reference under the tolerance rule with the
outputs poisoned with NaN before the call, so an element a kernel forgets to write
fails. Runners (tests/kernel_runners.py): the Triton kernels in the interpreter and
the CUDA kernels in the host emulation on the CPU (CI), and both on a GPU (marked
`gpu`), which run exactly these cases (bfloat16 among their dtypes), plus the GPU-only
sizes at the end.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from tests.attention_cases import (Case, assert_matches_reference, far_keys_inputs, make_inputs, nan_padding_inputs,
                                   poison_padding, strided_inputs)
from tests.kernel_runners import FORWARD_RUNNERS

pytestmark = pytest.mark.usefixtures("poisoned_empty")

NUM_QUERIES = (1, 7, 64, 300)
NUM_KEYS = (1, 5, 129, 700)
HEAD_DIMS = ((16, 16), (40, 24), (64, 64), (100, 128), (128, 100))  # (Dqk, Dv), Dv != Dqk included
WIDE = 256  # head dims above it run on the wide kernels


def _grid(runner):
    """Every (Nq, Nk, head dims) with a mask that leaves some rows without keys, a residual
    and the transposed (B, L, H, D) layout. The dtype and (for rotating runners) the path
    take turns, so that each meets every Nq x Nk pair and every head dim (a GPU runner's
    turns include bfloat16, which the interpreter cannot run)."""
    shapes = list(itertools.product(NUM_QUERIES, NUM_KEYS, HEAD_DIMS))
    for i, (nq, nk, (dqk, dv)) in enumerate(shapes):
        turn = i + i // len(HEAD_DIMS)
        for dtype in (runner.dtypes[turn % len(runner.dtypes)],):
            if dtype == torch.float32 and runner.max_fp32_cells and nq * nk > runner.max_fp32_cells:
                dtype = torch.float16
            case = Case(batch=2, heads=2, num_queries=nq, num_keys=nk, head_dim_qk=dqk, head_dim_v=dv, dtype=dtype,
                        mask=True, residual=True, transposed=True)
            paths = [list(runner.paths)[(i // len(runner.dtypes)) % len(runner.paths)]] if runner.rotate_paths \
                else list(runner.paths)
            for path in paths:
                yield runner.param(case, path, id_suffix=f"-q{nq}-k{nk}-d{dqk}x{dv}-{str(dtype)[6:]}-{path}")


def _every_path(runner, dtypes=None):
    for dtype in dtypes or runner.dtypes:
        if dtype in runner.dtypes:
            yield runner.param(dtype, id_suffix=f"-{str(dtype)[6:]}")


def _per_runner(values_of):
    return [param for runner in FORWARD_RUNNERS for param in values_of(runner)]


def run_every_path(runner, inputs):
    """(path, (out, lse)) of every path the runner serves on these inputs; a runner that
    serves none of them (an untimed rewrite on a case it declines) skips the test."""
    served, skipped = 0, None
    for path, options in runner.paths.items():
        try:
            result = runner.run(inputs, **options)
        except pytest.skip.Exception as skip:
            skipped = skip
            continue
        served += 1
        yield path, result
    if not served and skipped is not None:
        raise skipped


@pytest.mark.parametrize("runner,case,path", _per_runner(_grid))
def test_grid_with_mask_residual_transposed(runner, case, path):
    inputs = make_inputs(case, runner.device)
    out, lse = runner.run(inputs, **runner.paths[path])
    assert_matches_reference(out, inputs, lse, runner.epsilon)
    assert out.transpose(1, 2).is_contiguous(), "the output is laid out as (B, Nq, H, Dv)"


@pytest.mark.parametrize("runner,dtype", _per_runner(lambda r: _every_path(r, (torch.float32, torch.float16))))
@pytest.mark.parametrize("num_queries,num_keys", [(7, 1100), (300, 129), (1, 5)])
def test_plain_contiguous_without_mask_or_residual(runner, dtype, num_queries, num_keys):
    inputs = make_inputs(Case(num_queries=num_queries, num_keys=num_keys, head_dim_qk=40, head_dim_v=24,
                              dtype=dtype), runner.device)
    for path, (out, lse) in run_every_path(runner, inputs):
        assert_matches_reference(out, inputs, lse, runner.epsilon)


def _head_dims(runner):
    for dims in runner.head_dims:
        for dtype in runner.dtypes:
            yield runner.param(dims, dtype, id_suffix=f"-d{dims[0]}x{dims[1]}-{str(dtype)[6:]}")


@pytest.mark.parametrize("runner,dims,dtype", _per_runner(_head_dims))
def test_head_dims_of_the_implementation(runner, dims, dtype):
    nq, nk = (40, 70) if dtype == torch.float32 and runner.max_fp32_cells else (150, 300)
    if max(dims) > WIDE:
        nq, nk = _wide_problem(runner, dtype)
    inputs = make_inputs(Case(num_queries=nq, num_keys=nk, head_dim_qk=dims[0], head_dim_v=dims[1], dtype=dtype,
                              mask=True), runner.device)
    for path, (out, lse) in run_every_path(runner, inputs):
        assert_matches_reference(out, inputs, lse, runner.epsilon)


@pytest.mark.parametrize("runner,dtype", _per_runner(_every_path))
def test_padding_keys_holding_nan_do_not_leak(runner, dtype):
    inputs, clean = nan_padding_inputs(Case(num_queries=70, num_keys=150, dtype=dtype), runner.device)
    for path, (out, _) in run_every_path(runner, inputs):
        assert_matches_reference(out, clean, epsilon=runner.epsilon)


@pytest.mark.parametrize("runner,dtype", _per_runner(lambda r: _every_path(r, (torch.float32, torch.float16))))
def test_arbitrary_strides(runner, dtype):
    inputs = strided_inputs(runner.device, dtype, num_queries=70)
    for path, (out, lse) in run_every_path(runner, inputs):
        assert_matches_reference(out, inputs, lse, runner.epsilon)


@pytest.mark.parametrize("runner", [r.param() for r in FORWARD_RUNNERS])
@pytest.mark.parametrize("num_splits", [2, 5, 9])
def test_splits_made_entirely_of_padding(runner, num_splits):
    case = Case(batch=3, num_queries=20, num_keys=700, head_dim_qk=32, head_dim_v=48, mask=True, residual=True,
                dtype=torch.float16)
    inputs = make_inputs(case, runner.device)
    mask = inputs["key_padding_mask"]
    mask[1, :400] = True  # batch 1: the first splits hold only padding
    mask[2, :] = False
    mask[2, 350:] = True  # batch 2: the last splits hold only padding
    out, lse = runner.run(inputs, num_splits=num_splits)
    assert_matches_reference(out, inputs, lse, runner.epsilon)


def variable_length_inputs(device, dtype=torch.float16, num_queries=20, num_keys=700) -> dict:
    """Masks as variable-length inputs make them: padding at the tail (batch 0), at both
    ends (batch 1), holes between kept keys (batch 2), a single kept key (batch 3); at
    the same fractions of any number of keys."""
    inputs = make_inputs(Case(batch=4, num_queries=num_queries, num_keys=num_keys, head_dim_qk=32, head_dim_v=48,
                              mask=True, residual=True, dtype=dtype), device)

    def at(key):  # the key at the place of `key` among 700
        return key * num_keys // 700

    mask = inputs["key_padding_mask"]
    mask[:] = True
    mask[0, :at(100)] = False
    mask[1, at(300):at(600)] = False
    mask[2, at(150):at(650):3] = False
    mask[3, at(433)] = False
    return inputs


@pytest.mark.parametrize("runner", [r.param() for r in FORWARD_RUNNERS])
@pytest.mark.parametrize("num_splits", [1, 4])
def test_variable_length_masks(runner, num_splits):
    inputs = variable_length_inputs(runner.device)
    out, lse = runner.run(inputs, num_splits=num_splits)
    assert_matches_reference(out, inputs, lse, runner.epsilon)


@pytest.mark.parametrize("runner,dtype", _per_runner(_every_path))
def test_rows_without_keys_give_exactly_the_residual_and_minus_inf_lse(runner, dtype):
    inputs = make_inputs(Case(num_queries=70, num_keys=150, mask=True, residual=True, dtype=dtype), runner.device)
    for path, (out, lse) in run_every_path(runner, inputs):
        torch.testing.assert_close(out[0], inputs["residual"][0], rtol=0, atol=0)  # batch 0: all keys padding
        assert torch.isneginf(lse[0]).all() and torch.isfinite(lse[1]).all()


CAUSAL_SHAPES = ((70, 70), (20, 700), (300, 129), (7, 1))


@pytest.mark.parametrize("runner,dtype", _per_runner(lambda r: _every_path(r, (torch.float32, torch.float16))
                                                     if r.causal else ()))
@pytest.mark.parametrize("num_queries,num_keys", CAUSAL_SHAPES)
@pytest.mark.parametrize("masked", [False, True])
def test_causal(runner, dtype, num_queries, num_keys, masked):
    """Bottom-right causal attention on every path: square, few queries over many keys,
    more queries than keys (the first Nq - Nk rows see no key: 0 + residual)."""
    inputs = make_inputs(Case(num_queries=num_queries, num_keys=num_keys, head_dim_qk=32, head_dim_v=48, dtype=dtype,
                              mask=masked, residual=True, transposed=True), runner.device)
    inputs["causal"] = True
    for path, (out, lse) in run_every_path(runner, inputs):
        assert_matches_reference(out, inputs, lse, runner.epsilon)


# ---- Wide heads: the kernels' wide paths (head dims above 256) ----

WIDE_RUNNERS = [r for r in FORWARD_RUNNERS if r.wide_head_dims]


def _wide_problem(runner, dtype) -> tuple[int, int]:
    """(Nq, Nk) of a wide case: the runner's, fewer where its fp32 kernel is slow."""
    if dtype == torch.float32 and runner.wide_head_problem_fp32:
        return runner.wide_head_problem_fp32
    num_queries, num_keys = runner.wide_head_problem or (150, 300)
    if dtype == torch.float32 and runner.max_fp32_cells and num_queries * num_keys > runner.max_fp32_cells:
        return 40, 150
    return num_queries, num_keys


def _wide_head_dims(runner):
    for dims in runner.wide_head_dims:
        for dtype in runner.dtypes:
            yield runner.param(dims, dtype, id_suffix=f"-d{dims[0]}x{dims[1]}-{str(dtype)[6:]}")


@pytest.mark.parametrize("runner,dims,dtype", [p for r in WIDE_RUNNERS for p in _wide_head_dims(r)])
@pytest.mark.parametrize("causal", [False, True])
def test_wide_heads_split_masked_residual_transposed(runner, dims, dtype, causal):
    """Every path (split-KV among them) with a mask, a residual and the transposed layout;
    causally also with more queries than keys (the first rows see no key, and the first
    query tiles none of the later splits)."""
    num_queries, num_keys = _wide_problem(runner, dtype)
    shapes = ((num_queries, num_keys), (num_keys // 2, num_queries)) if causal else ((num_queries, num_keys),)
    for nq, nk in shapes:
        inputs = make_inputs(Case(num_queries=nq, num_keys=nk, head_dim_qk=dims[0], head_dim_v=dims[1], dtype=dtype,
                                  mask=True, residual=True, transposed=True), runner.device)
        inputs["causal"] = causal
        for path, (out, lse) in run_every_path(runner, inputs):
            assert_matches_reference(out, inputs, lse, runner.epsilon)
            assert out.transpose(1, 2).is_contiguous(), "the output is laid out as (B, Nq, H, Dv)"


@pytest.mark.parametrize("runner,dtype", [p for r in WIDE_RUNNERS for p in _every_path(r)])
def test_wide_heads_ignore_nan_in_padding_keys(runner, dtype):
    num_queries, num_keys = _wide_problem(runner, dtype)
    inputs, clean = nan_padding_inputs(Case(num_queries=num_queries, num_keys=num_keys, head_dim_qk=261,
                                            head_dim_v=520, dtype=dtype), runner.device)
    for path, (out, lse) in run_every_path(runner, inputs):
        assert_matches_reference(out, clean, lse, runner.epsilon)


def wide_strided_inputs(device, dtype: torch.dtype, num_queries: int, num_keys: int) -> dict:
    """strided_inputs' layouts with wide heads (Dqk 261, Dv 520): a batch stride below the
    head stride (q), a channel stride of 2 (k), Dv as the slowest dimension of v, a
    transposed residual and a strided mask."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(3, 2, num_queries, 261, generator=g).to(device, dtype).transpose(0, 1)
    k = torch.randn(2, 3, num_keys, 522, generator=g).to(device, dtype)[..., ::2]
    v = torch.randn(2, 520, num_keys, 3, generator=g).to(device, dtype).permute(0, 3, 2, 1)
    residual = torch.randn(2, 3, 520, num_queries, generator=g).to(device, dtype).transpose(-1, -2)
    mask = (torch.rand(2, 2 * num_keys, generator=g) < 0.3).to(device)[:, ::2]
    return dict(q=q, k=k, v=v, key_padding_mask=mask, residual=residual, scale=None)


@pytest.mark.parametrize("runner,dtype", [p for r in WIDE_RUNNERS for p in _every_path(r)])
def test_wide_heads_with_arbitrary_strides(runner, dtype):
    inputs = wide_strided_inputs(runner.device, dtype, *_wide_problem(runner, dtype))
    for path, (out, lse) in run_every_path(runner, inputs):
        assert_matches_reference(out, inputs, lse, runner.epsilon)


@pytest.mark.parametrize("runner,dtype", _per_runner(lambda r: _every_path(r) if r.causal else ()))
@pytest.mark.parametrize("dims", [(32, 48), (261, 261)], ids=lambda dims: f"d{dims[0]}x{dims[1]}")
def test_causal_tile_crossing_the_diagonal_by_one_key(runner, dims, dtype):
    """Nk - Nq = 62: the key tile ending at key 63 (64-key tiles; with 32-key tiles the
    second) holds exactly one key that query 0 does not see, so it must be checked per
    (row, key) although all its other keys are visible to every row of the block."""
    inputs = make_inputs(Case(num_queries=20, num_keys=82, head_dim_qk=dims[0], head_dim_v=dims[1], dtype=dtype,
                              residual=True), runner.device)
    inputs["causal"] = True
    for path, (out, lse) in run_every_path(runner, inputs):
        assert_matches_reference(out, inputs, lse, runner.epsilon)


# ---- Wide heads stored at a multiple of 16 channels (the perceiver model layer's) ----

STORED_WIDE_RUNNERS = [r for r in FORWARD_RUNNERS if r.stored_wide_head_dims]


def _stored_wide_problem(runner, dtype) -> tuple[int, int]:
    """(Nq, Nk): two query tiles of 128 rows (the interpreter's exact fp32 takes 16-row
    tiles: fewer queries) over several key blocks, the last ones partial."""
    return (40, 100) if dtype == torch.float32 and not runner.gpu else (150, 100)


def _stored_wide_head_dims(runner):
    for dims in runner.stored_wide_head_dims:
        for dtype in runner.dtypes:
            yield runner.param(dims, dtype, id_suffix=f"-d{dims[0]}x{dims[1]}-{str(dtype)[6:]}")


@pytest.mark.parametrize("runner,dims,dtype", [p for r in STORED_WIDE_RUNNERS for p in _stored_wide_head_dims(r)])
@pytest.mark.parametrize("causal", [False, True])
def test_stored_wide_heads_split_masked_residual_transposed(runner, dims, dtype, causal):
    """Every path with a mask, a residual and the transposed layout (rows 16-byte aligned:
    TMA where the kernel uses it); causally also with more queries than keys."""
    num_queries, num_keys = _stored_wide_problem(runner, dtype)
    shapes = ((num_queries, num_keys), (num_keys // 2, num_queries)) if causal else ((num_queries, num_keys),)
    for nq, nk in shapes:
        inputs = make_inputs(Case(num_queries=nq, num_keys=nk, head_dim_qk=dims[0], head_dim_v=dims[1], dtype=dtype,
                                  mask=True, residual=True, transposed=True), runner.device)
        inputs["causal"] = causal
        for path, (out, lse) in run_every_path(runner, inputs):
            assert_matches_reference(out, inputs, lse, runner.epsilon)


@pytest.mark.parametrize("runner,dtype", [p for r in STORED_WIDE_RUNNERS for p in _every_path(r)])
@pytest.mark.parametrize("masked", [False, True])
def test_stored_wide_heads_ignore_nan_in_padding_keys_and_channels(runner, dtype, masked):
    """Rows of 272 channels stored at a stride of 288 whose last 16 channels hold NaN (a
    TMA box reaching past the head dim must read zeros there); with a mask, padding keys
    holding NaN in k and v."""
    num_queries, num_keys = _stored_wide_problem(runner, dtype)
    inputs, clean = nan_padding_inputs(Case(num_queries=num_queries, num_keys=num_keys, head_dim_qk=272,
                                            head_dim_v=272, dtype=dtype), runner.device)
    if not masked:
        inputs, clean = dict(clean, key_padding_mask=None), dict(clean, key_padding_mask=None)
    for name in "qkv":
        stored = torch.full((*clean[name].shape[:-1], 288), float("nan"), dtype=dtype, device=runner.device)
        stored[..., :272] = inputs[name]
        inputs[name] = stored[..., :272]
    for path, (out, lse) in run_every_path(runner, inputs):
        assert_matches_reference(out, clean, lse, runner.epsilon)


def stored_wide_strided_inputs(device, dtype: torch.dtype, num_queries: int, num_keys: int, tma: bool) -> dict:
    """Heads of 336/272 channels with unusual strides and a transposed residual. tma:
    every row 16-byte aligned (q with a batch stride below its head stride, k from a wider
    tensor, v a slice of a (B, Nk, H, 2 Dv) tensor) and no mask (with one the kernel reads
    v through pointers); else channel strides other than 1 (k every other channel of a
    wider tensor, v with Dv its slowest dimension), which only pointers can read, and a
    strided mask."""
    g = torch.Generator().manual_seed(7)
    q = torch.randn(3, 2, num_queries, 336, generator=g).to(device, dtype).transpose(0, 1)
    if tma:
        k = torch.randn(2, 3, num_keys, 352, generator=g).to(device, dtype)[..., :336]
        v = torch.randn(2, num_keys, 3, 544, generator=g).to(device, dtype)[..., 272:].transpose(1, 2)
    else:
        k = torch.randn(2, 3, num_keys, 672, generator=g).to(device, dtype)[..., ::2]
        v = torch.randn(2, 272, num_keys, 3, generator=g).to(device, dtype).permute(0, 3, 2, 1)
    residual = torch.randn(2, 3, 272, num_queries, generator=g).to(device, dtype).transpose(-1, -2)
    mask = None if tma else (torch.rand(2, 2 * num_keys, generator=g) < 0.3).to(device)[:, ::2]
    return dict(q=q, k=k, v=v, key_padding_mask=mask, residual=residual, scale=None)


@pytest.mark.parametrize("runner,dtype", [p for r in STORED_WIDE_RUNNERS for p in _every_path(r)])
@pytest.mark.parametrize("tma", [True, False], ids=["aligned-rows", "strided-channels"])
def test_stored_wide_heads_with_arbitrary_strides(runner, dtype, tma):
    inputs = stored_wide_strided_inputs(runner.device, dtype, *_stored_wide_problem(runner, dtype), tma)
    for path, (out, lse) in run_every_path(runner, inputs):
        assert_matches_reference(out, inputs, lse, runner.epsilon)


# ---- GPU-only sizes ----

GPU_RUNNERS = [r for r in FORWARD_RUNNERS if r.gpu]


@pytest.mark.parametrize("runner", [r.param() for r in GPU_RUNNERS])
def test_offsets_beyond_int32(runner):
    full, tail = far_keys_inputs()
    out, _ = runner.run(full)
    assert_matches_reference(out, tail, epsilon=runner.epsilon)


@pytest.mark.parametrize("runner,dtype", _per_runner(lambda r: _every_path(r, (torch.float16, torch.bfloat16))
                                                     if r.gpu else ()))
def test_decode_shape_with_many_query_tiles(runner, dtype):
    # 625 query tiles x 8 heads: the CUDA kernels keep K/V resident over several tiles.
    case = Case(batch=2, heads=4, num_queries=40_000, num_keys=300, head_dim_qk=64, head_dim_v=64, dtype=dtype,
                mask=True, residual=True, transposed=True)
    inputs = make_inputs(case, runner.device)
    out, lse = runner.run(inputs)
    assert_matches_reference(out, inputs, lse, runner.epsilon)


@pytest.mark.parametrize("runner,dtype", [p for r in WIDE_RUNNERS if r.gpu
                                          for p in _every_path(r, (torch.float16, torch.bfloat16))])
@pytest.mark.parametrize("shape", [(2, 1, 512, 20_000), (2, 1, 20_000, 512)], ids=["encode", "decode"])
@pytest.mark.parametrize("head_dim", [261, 322])
def test_wide_heads_on_encode_and_decode_shapes(runner, dtype, shape, head_dim):
    """The released models' wide heads on Perceiver IO shapes, many query tiles, default plans."""
    batch, heads, nq, nk = shape
    inputs = make_inputs(Case(batch=batch, heads=heads, num_queries=nq, num_keys=nk, head_dim_qk=head_dim,
                              head_dim_v=head_dim, dtype=dtype, mask=True, residual=True, transposed=True),
                         runner.device)
    out, lse = runner.run(inputs)
    assert_matches_reference(out, inputs, lse, runner.epsilon)


@pytest.mark.parametrize("runner,dtype", _per_runner(lambda r: _every_path(r, (torch.float16, torch.bfloat16))
                                                     if r.gpu and r.causal else ()))
def test_causal_square_attention_in_many_splits(runner, dtype):
    """Square causal attention cut into 32 splits of 256 keys: on an H100 or H200 the CUDA
    kernels keep each split's K/V resident over 7 query tiles a block, each tile walks
    only the key tiles it reaches, and splits past a block's reach stay empty."""
    case = Case(batch=2, heads=1, num_queries=8000, num_keys=8000, head_dim_qk=64, head_dim_v=64, dtype=dtype,
                mask=True, residual=True, transposed=True)
    inputs = make_inputs(case, runner.device)
    inputs["causal"] = True
    out, lse = runner.run(inputs, num_splits=32)
    assert_matches_reference(out, inputs, lse, runner.epsilon)


@pytest.mark.parametrize("runner", [r.param() for r in WIDE_RUNNERS if r.gpu])
def test_wide_heads_offsets_beyond_int32(runner):
    """K and V of 2^21 + 1000 keys x 1024 channels: element offsets pass 2^31; only the
    last 1000 keys are attended, so the answer is attention over just those."""
    full, tail = far_keys_inputs(heads=1, num_keys=2**21 + 1000, dim=1024)
    out, _ = runner.run(full)
    assert_matches_reference(out, tail, epsilon=runner.epsilon)


# ---- The untimed persistent DECODE forward (perceiver_kernels/triton/decode.py) ----

UNTIMED_RUNNERS = [r for r in FORWARD_RUNNERS if r.name.endswith("-untimed")]


def _off_alignment(x: torch.Tensor) -> torch.Tensor:
    """x's values and strides in memory that starts one element past 16-byte alignment
    (tensor descriptors refuse it)."""
    storage = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
    shifted = storage.as_strided(x.shape, x.stride(), storage_offset=1)
    shifted.copy_(x)
    return shifted


@pytest.mark.parametrize("runner,dtype", [p for r in UNTIMED_RUNNERS
                                          for p in _every_path(r, (torch.float16, torch.bfloat16))])
@pytest.mark.parametrize("num_keys", [256, 200])
@pytest.mark.parametrize("descriptors", [True, False], ids=["descriptors", "pointers"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_decode_programs_walk_query_tiles_across_heads(runner, dtype, num_keys, descriptors, causal, monkeypatch):
    """The persistent DECODE forward with more query tiles than programs: each program
    walks a contiguous range of tiles that crosses a head boundary (30 tiles of 32 rows
    in the interpreter over 4 programs, 5 to a head; on a GPU about 25 tiles of 128 rows
    per program), reloading K/V at the boundary; all keys in one block (256 exactly, or
    200 with slots past them masked; causally half as many, as the planner serves), a
    key padding mask (batch 0 all padding), a residual, the transposed layout,
    Q/residual/O through tensor descriptors, or through pointers when Q's memory is not
    16-byte aligned."""
    from perceiver_kernels.triton import decode, forward, variants
    from tests.kernel_runners import kernel_call

    num_queries = 150 if runner.device == "cpu" else 70_000
    num_keys = num_keys // 2 if causal else num_keys
    inputs = make_inputs(Case(batch=2, heads=3, num_queries=num_queries, num_keys=num_keys, head_dim_qk=32,
                              head_dim_v=48, dtype=dtype, mask=True, residual=True, transposed=True), runner.device)
    inputs["causal"] = causal
    if not descriptors:
        inputs["q"] = _off_alignment(inputs["q"])
    with variants.running(variants.UNTIMED):
        plan = forward.plan_forward(kernel_call(inputs).problem)
    assert isinstance(plan, decode.PersistentDecode), plan.describe(kernel_call(inputs).problem)
    assert plan.total_tiles > 2 * plan.programs, "each program walks several query tiles"
    made = []
    real_descriptor = decode._descriptor
    monkeypatch.setattr(decode, "_descriptor", lambda *args: made.append(args) or real_descriptor(*args))
    out, lse = runner.run(inputs)
    assert len(made) == (3 if descriptors else 0), "Q, residual and O through descriptors exactly when aligned"
    assert_matches_reference(out, inputs, lse, runner.epsilon)


# ---- The untimed ENCODE kernel (triton/encode.py): shapes the grid does not reach ----

def _sixteen_bits(runner):
    """The runner's 16-bit dtypes: float16, and bfloat16 on a GPU."""
    yield from _every_path(runner, (torch.float16, torch.bfloat16))


def suffix_masked_inputs(device, num_queries: int, num_keys: int, kept: tuple[int, ...], dtype=torch.float16,
                         causal: bool = False) -> dict:
    """Inputs with one batch element per entry of `kept`, whose first `kept` keys are
    kept and the rest padding (variable-length inputs); 0 leaves its rows without keys."""
    inputs = make_inputs(Case(batch=len(kept), heads=2, num_queries=num_queries, num_keys=num_keys, head_dim_qk=32,
                              head_dim_v=48, dtype=dtype, mask=True, residual=True, transposed=True), device)
    mask = inputs["key_padding_mask"]
    mask[:] = True
    for batch, length in enumerate(kept):
        mask[batch, :length] = False
    inputs["causal"] = causal
    return inputs


def _run_encode(runner, inputs: dict, num_splits=None):
    """runner.run on inputs the untimed ENCODE kernel serves (the untimed runners skip
    what no rewrite serves: this fails instead)."""
    from perceiver_kernels.triton import encode, forward, variants
    from tests.kernel_runners import kernel_call

    problem = kernel_call(inputs).problem
    with variants.running(variants.UNTIMED):
        plan = forward.plan_forward(problem, num_splits)
    assert isinstance(plan, encode.EncodeForward), plan.describe(problem)
    return runner.run(inputs, num_splits=num_splits)


@pytest.mark.parametrize("runner,dtype", [p for r in UNTIMED_RUNNERS for p in _sixteen_bits(r)])
@pytest.mark.parametrize("num_queries", [256, 200])
@pytest.mark.parametrize("num_splits", [None, 1, 5])
def test_encode_all_latents_in_one_program_with_suffix_masks(runner, dtype, num_queries, num_splits):
    """256 latents (one program holds them all) and 200 (56 rows of the program past
    the queries) over 2,500 keys: lengths ending inside a split, on a split boundary,
    all keys, none (rows without keys); whole splits of padding; NaN in padding."""
    inputs, clean = poison_padding(suffix_masked_inputs(runner.device, num_queries, 2500, (1100, 500, 2500, 0),
                                                      dtype))
    out, lse = _run_encode(runner, inputs, num_splits=num_splits)
    assert_matches_reference(out, clean, lse, runner.epsilon)


@pytest.mark.parametrize("runner,dtype", [p for r in UNTIMED_RUNNERS for p in _sixteen_bits(r)])
@pytest.mark.parametrize("num_keys", [1024, 1100])
def test_encode_without_mask_in_several_splits(runner, dtype, num_keys):
    """The single key loop that Hopper warp-specializes (16 bits, no mask): splits of
    whole tiles (1024 keys) and a last tile cut short (1100), unsplit and in several
    splits, with a negative scale (the kernel negates q)."""
    inputs = make_inputs(Case(batch=1, heads=2, num_queries=256, num_keys=num_keys, head_dim_qk=32, head_dim_v=32,
                              dtype=dtype, residual=True), runner.device)
    for num_splits, scale in ((None, None), (1, -0.3), (3, -0.3)):
        inputs["scale"] = scale
        out, lse = _run_encode(runner, inputs, num_splits=num_splits)
        assert_matches_reference(out, inputs, lse, runner.epsilon)


@pytest.mark.parametrize("runner,dtype", [p for r in UNTIMED_RUNNERS for p in _every_path(r)])
@pytest.mark.parametrize("masked", [False, True])
def test_encode_more_latents_than_one_program_holds(runner, dtype, masked):
    """300 latents: a head's queries in two programs walking the same keys (exact fp32:
    five), with a mask or without, causal or not, in several splits."""
    inputs = make_inputs(Case(batch=2, heads=1, num_queries=300, num_keys=1200, head_dim_qk=40, head_dim_v=24,
                              dtype=dtype, mask=masked, residual=True, transposed=True), runner.device)
    for causal, num_splits in ((False, None), (True, 3)):
        inputs["causal"] = causal
        out, lse = _run_encode(runner, inputs, num_splits=num_splits)
        assert_matches_reference(out, inputs, lse, runner.epsilon)


@pytest.mark.parametrize("runner,dtype", [p for r in UNTIMED_RUNNERS for p in _every_path(r)])
@pytest.mark.parametrize("masked", [False, True])
def test_encode_causal_with_as_few_keys_as_encode_takes(runner, dtype, masked):
    """Causal with Nk = 4 Nq (the closest to square that ENCODE serves): the diagonal
    runs through the last quarter of the keys, splits past a row's reach stay empty for
    it, and under a suffix mask rows see fewer keys still (0: none). 256 latents in
    16 bits (one program), 70 in exact fp32."""
    num_queries = 70 if dtype == torch.float32 else 256
    inputs = suffix_masked_inputs(runner.device, num_queries, 4 * num_queries,
                                  (4 * num_queries, 3 * num_queries + 10, 0), dtype, causal=True)
    if not masked:
        inputs["key_padding_mask"] = None
    for num_splits in (None, 3):
        out, lse = _run_encode(runner, inputs, num_splits=num_splits)
        assert_matches_reference(out, inputs, lse, runner.epsilon)


@pytest.mark.parametrize("runner,dtype", [p for r in UNTIMED_RUNNERS if r.gpu for p in _sixteen_bits(r)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("num_queries", [256, 1024])
def test_encode_at_perceiver_scale(runner, dtype, masked, num_queries):
    """Default plans on the GPU: splits in waves of its SMs (merged after programmatic
    dependent launch), TMA, the warp-specialized loop without a mask; 1,024 latents in
    four programs per head; suffix masks with NaN in the padding and a row without keys."""
    inputs = suffix_masked_inputs(runner.device, num_queries, 60_000, (60_000, 41_234, 0), dtype)
    inputs, clean = poison_padding(inputs)
    if not masked:
        inputs, clean = dict(clean, key_padding_mask=None), dict(clean, key_padding_mask=None)
    out, lse = _run_encode(runner, inputs)
    assert_matches_reference(out, clean, lse, runner.epsilon)
