"""The Triton launchers: split plans, the blocks every launch gets, TF32, and auto on a GPU.

The kernels' results are checked in tests/test_forward_contract.py and
tests/test_backward_contract.py; here is what the launchers decide.
"""

import pytest
import torch

import perceiver_kernels as pk
from perceiver_kernels import policy
from perceiver_kernels.problem import Problem
from perceiver_kernels.triton.forward import plan_splits
from tests.attention_cases import Case, assert_matches_reference, make_inputs
from tests.conftest import KERNEL_DEVICE
from tests.kernel_runners import _triton_forward


def gpu_problem(batch, heads, num_queries, num_keys, dtype=torch.bfloat16, dims=(64, 64)) -> Problem:
    return Problem(torch.device("cuda", 0), dtype, batch, heads, num_queries, num_keys, *dims)


def test_split_plan_fills_the_gpu(fake_gpu):
    fake_gpu("sm_90", 132)  # an H100
    enc3 = plan_splits(gpu_problem(1, 8, 256, 400_000))  # 16 programs unsplit
    enc1 = plan_splits(gpu_problem(8, 8, 256, 50_176))   # 128 programs unsplit
    dec1 = plan_splits(gpu_problem(8, 8, 50_176, 256))   # thousands of query tiles
    short = plan_splits(gpu_problem(1, 1, 64, 700))      # too few keys for a split to pay
    assert enc3.num_splits == 17
    assert enc1.num_splits == 3
    assert dec1.num_splits == 1
    assert short.num_splits == 1
    assert enc3.keys_per_split % 128 == 0 and enc3.keys_per_split * enc3.num_splits >= 400_000


def test_exact_fp32_splits_with_shorter_query_tiles(fake_gpu):
    """Exact fp32 dots keep operands in registers: 64-row tiles, so twice the programs."""
    fake_gpu("sm_90", 132)
    exact = plan_splits(gpu_problem(1, 8, 256, 400_000, torch.float32))  # 32 programs unsplit
    assert exact.query_tile_rows == 64 and exact.num_splits == 9
    assert plan_splits(gpu_problem(1, 8, 256, 400_000)).query_tile_rows == 128


@pytest.mark.parametrize("dtype, allow_tf32, block_dv", [
    ("float16", False, 64), ("bfloat16", False, 64),  # tensor cores: V block widened to the Q/K block
    ("float32", True, 64),                             # TF32 dots run on tensor cores too
    ("float32", False, 32),                            # exact fp32 on CUDA cores keeps its own width
])
def test_launches_widen_the_value_block_on_tensor_cores(dtype, allow_tf32, block_dv):
    """Dqk=40, Dv=24 (blocks 64 and 32) gave wrong results with 16-bit inputs on an H200
    (Triton 3.6) unless both blocks were 64: every kernel the launchers start for such
    inputs, forward and backward, ENCODE and DECODE, gets equal blocks on tensor cores."""
    from tests.triton_compile import CompileCase, record_launches

    for num_queries, num_keys in ((128, 4096), (4096, 128)):
        launches = record_launches(CompileCase(dtype, 40, 24, num_queries, num_keys), allow_tf32=allow_tf32)
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


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(8, 8, 256, 50_176), (1, 8, 256, 400_000), (2, 8, 20_000, 256)],
                         ids=["enc1", "enc3", "dec"])
def test_auto_on_perceiver_shapes(shape, dtype):
    """auto takes the kernels exactly where they were measured faster (policy), and
    whichever backend it takes is right."""
    batch, heads, nq, nk = shape
    case = Case(batch=batch, heads=heads, num_queries=nq, num_keys=nk, head_dim_qk=64, head_dim_v=64,
                dtype=dtype, mask=True, residual=True, transposed=True)
    inputs = make_inputs(case, "cuda")
    explanation = pk.explain(**inputs)
    assert explanation.chosen == ("torch" if policy.auto_declines("triton", explanation.problem) else "triton"), \
        str(explanation)
    out = pk.cross_attention(**inputs)
    assert_matches_reference(out[:, :, :64], {**inputs, "q": inputs["q"][:, :, :64],
                                              "residual": inputs["residual"][:, :, :64]})


@pytest.mark.gpu
def test_tf32_is_used_only_when_allowed():
    inputs = make_inputs(Case(num_queries=128, num_keys=4096, head_dim_qk=64, head_dim_v=64), "cuda")
    exact, _ = _triton_forward(inputs, num_splits=3)
    fast, _ = _triton_forward(inputs, num_splits=3, allow_tf32=True)
    assert_matches_reference(exact, inputs)
    assert not torch.equal(exact, fast)


def _encode_plan(problem: Problem, num_splits=None):
    from perceiver_kernels.triton import encode

    return encode.plan(problem, num_splits)


def test_encode_plan_holds_all_latents_and_fills_whole_waves(fake_gpu):
    """The untimed ENCODE kernel on an H100/H200 (132 SMs): 256 latents in one program,
    splits counted in waves (ENC-1: 64 heads x 2 = 128 programs, one wave; ENC-3: 8
    heads x 33 = 264, two full waves), no split where the programs fill the GPU alone
    (ENC-2: 16 heads x 8 query groups; ENC-1 d128: 64 heads x 2 groups of 128 rows)."""
    fake_gpu("sm_90", 132)
    enc1 = _encode_plan(gpu_problem(8, 8, 256, 50_176))
    enc3 = _encode_plan(gpu_problem(1, 8, 256, 400_000))
    enc2 = _encode_plan(gpu_problem(1, 16, 2048, 182_528))
    enc1_d128 = _encode_plan(gpu_problem(8, 8, 256, 50_176, dims=(128, 128)))
    ar64k = _encode_plan(gpu_problem(1, 8, 1024, 65_536)._replace(causal=True))
    assert (enc1.rows, enc1.groups, enc1.num_splits) == (256, 1, 2)
    assert (enc3.rows, enc3.groups, enc3.num_splits) == (256, 1, 33) and 8 * enc3.num_splits == 2 * 132
    assert (enc2.rows, enc2.groups, enc2.num_splits) == (256, 8, 1)
    assert (enc1_d128.rows, enc1_d128.groups, enc1_d128.num_splits) == (128, 2, 1)
    assert (ar64k.groups, ar64k.num_splits) == (4, 4)
    for plan in (enc1, enc3):
        assert plan.keys_per_split % 128 == 0 and plan.keys_per_split * plan.num_splits >= 50_176
        assert plan.dependent_launch and plan.constexprs[0]["LAUNCH_DEPENDENTS"]
    # Unmasked 16 bits on Hopper: the warp-specialized loop where descriptors run, whole
    # tiles where every split is (50,176 keys, 25,088 per split, are multiples of 64);
    # causal tiles are checked.
    pointers, descriptors = enc1.constexprs
    assert descriptors["WARP_SPECIALIZE"] and descriptors["WHOLE_TILES"] and descriptors["num_warps"] == 4
    assert not pointers["WARP_SPECIALIZE"] and not pointers["KV_DESCRIPTORS"]
    assert ar64k.constexprs[1]["WARP_SPECIALIZE"] and not ar64k.constexprs[1]["WHOLE_TILES"]
    text = enc3.describe(gpu_problem(1, 8, 256, 400_000))
    for words in ("all 256 queries of a head in one 256-row program", "33 splits", "264 programs on 132 SMs",
                  "programmatic dependent launch", "Q, K and V through tensor descriptors (TMA)", "warp-specialized"):
        assert words in text, text
    assert "adjacent 256-row programs" in enc2.describe(gpu_problem(1, 16, 2048, 182_528))


def test_encode_plan_where_warp_specialization_does_not_run(fake_gpu):
    """A mask (padding keys' V would need zeroing off the TMA path), exact fp32 (CUDA
    cores, 64-row programs), heads of 256 channels (too much shared memory), and an
    A100 (no TMA: pointers, 128 rows at most)."""
    fake_gpu("sm_90", 132)
    masked = _encode_plan(gpu_problem(8, 8, 256, 50_176)._replace(has_mask=True))
    exact = _encode_plan(gpu_problem(1, 8, 256, 400_000, torch.float32))
    wide = _encode_plan(gpu_problem(1, 8, 256, 400_000, dims=(256, 256)))
    for plan in (masked, exact, wide):
        assert not plan.constexprs[1]["WARP_SPECIALIZE"]
    assert masked.constexprs[1]["KV_DESCRIPTORS"] and wide.constexprs[1]["KV_DESCRIPTORS"]
    assert not exact.constexprs[1]["KV_DESCRIPTORS"]  # CUDA-core dots: pointers
    assert exact.rows == 64 and exact.groups == 4 and wide.rows == 64
    fake_gpu("sm_80", 108, 166_912)
    a100 = _encode_plan(gpu_problem(8, 8, 256, 50_176))
    assert a100.rows == 128 and not a100.dependent_launch
    assert not any(c["KV_DESCRIPTORS"] or c["WARP_SPECIALIZE"] for c in a100.constexprs)


def test_encode_plan_declines_what_it_does_not_serve_and_honours_forced_splits(fake_gpu):
    fake_gpu("sm_90", 132)
    assert _encode_plan(gpu_problem(8, 8, 50_176, 256)) is None        # DECODE
    assert _encode_plan(gpu_problem(1, 8, 4096, 400_000)) is None      # more latents than ENCODE's
    assert _encode_plan(gpu_problem(1, 8, 256, 800)) is None           # Nk < 4 Nq: not ENCODE
    assert _encode_plan(gpu_problem(1, 8, 256, 50_176, dims=(512, 512))) is None  # wide heads
    assert _encode_plan(gpu_problem(1, 8, 256, 50_176, torch.float32)._replace(tf32=True)) is None
    for forced in (1, 3):
        assert _encode_plan(gpu_problem(8, 8, 256, 50_176), forced).num_splits == forced


def test_descriptors_need_aligned_rows_and_contiguous_channels():
    from perceiver_kernels.triton.descriptors import device_descriptors_fit

    contiguous = torch.zeros(2, 3, 100, 64, dtype=torch.bfloat16)
    transposed_40 = torch.zeros(2, 100, 3, 40, dtype=torch.float16).transpose(1, 2)   # rows of 3 x 80 bytes
    transposed_100 = torch.zeros(2, 100, 3, 100, dtype=torch.float16).transpose(1, 2)  # 200-byte head stride
    every_other = torch.zeros(2, 3, 100, 128, dtype=torch.float16)[..., ::2]
    assert device_descriptors_fit(contiguous, transposed_40)
    assert not device_descriptors_fit(contiguous, transposed_100)
    assert not device_descriptors_fit(every_other)
    assert device_descriptors_fit(torch.zeros(1, 1, 100, 8, dtype=torch.float16)[:, :, 1:])  # 16-byte rows, offset base
    assert not device_descriptors_fit(torch.zeros(1, 1, 100, 8, dtype=torch.float16)[:, :, :, 1:])


def test_untimed_backward_plans_of_the_benchmark_shapes(fake_gpu):
    """The ENCODE/DECODE backward (triton/resident_backward.py) on an H100/H200's 132 SMs:
    256 resident rows in one tile, blocks as long as the registers allow, as many
    programs per head as fill the SMs with few partials; AR and self-attention,
    DECODE at head dim 128 over 256 keys (its accumulators alone would spill) and TF32
    stay with the two-kernel backward."""
    from perceiver_kernels.triton.resident_backward import plan_decode, plan_encode

    fake_gpu("sm_90", 132)

    def tiles(plan):
        return plan.constexprs["BLOCK_RESIDENT"], plan.constexprs["BLOCK_INNER"], plan.constexprs["num_warps"]

    enc1, enc3 = plan_encode(gpu_problem(8, 8, 256, 50_176)), plan_encode(gpu_problem(1, 8, 256, 400_000))
    dec1 = plan_decode(gpu_problem(8, 8, 50_176, 256))
    assert tiles(enc1) == tiles(enc3) == (256, 32, 8) and tiles(dec1) == (256, 16, 8)
    assert enc1.chunks == 2 and dec1.chunks == 2  # 128 programs on 132 SMs
    assert enc3.chunks == 16  # 128 programs; 33 (264, two waves) would gain under 3%
    assert enc1.per_chunk * enc1.chunks >= 50_176 and enc1.per_chunk % 32 == 0
    assert tiles(plan_encode(gpu_problem(8, 8, 64, 50_176))) == (64, 64, 4)
    assert plan_encode(gpu_problem(8, 8, 256, 50_176, dims=(128, 128))) is not None
    assert plan_decode(gpu_problem(8, 8, 50_176, 256, dims=(128, 128))) is None
    for declined in (gpu_problem(4, 8, 1024, 8192), gpu_problem(8, 8, 1024, 1024), gpu_problem(8, 8, 257, 50_176),
                     gpu_problem(8, 8, 256, 256), gpu_problem(1, 1, 512, 50_176, dims=(261, 261)),
                     gpu_problem(8, 8, 256, 50_176, torch.float32)._replace(tf32=True)):
        assert plan_encode(declined) is None and plan_decode(declined) is None, declined
    # A forced count is honoured whatever the blocks: programs past the last write zeros.
    assert plan_encode(gpu_problem(1, 1, 7, 100), 3).chunks == 3


# ---- The untimed wide forward (triton/wide.py) ----


def test_wide_plans_of_the_released_models_heads(fake_gpu):
    """On an H200: the padded heads in one program each, every score computed once, split
    so that the programs fill the 132 SMs once; Dv = 512 in two slices of 256; heads it
    does not serve left to the timed kernels."""
    from perceiver_kernels.triton import wide

    fake_gpu("sm_90", 132)
    img_261 = wide.plan(gpu_problem(8, 1, 512, 50_176, dims=(272, 272)))
    assert (img_261.qk_chunks, img_261.v_chunks, img_261.slices) == ((256, 16, 0), (256, 16, 0), 1)
    assert img_261.tile.block_m == 128 and img_261.split.num_splits == 4  # 32 tiles x 4 = 128 programs
    img_322 = wide.plan(gpu_problem(8, 1, 512, 50_176, dims=(336, 336)))
    assert img_322.v_chunks == (256, 64, 16) and img_322.split.num_splits == 4
    flow = wide.plan(gpu_problem(1, 1, 182_528, 2048, dims=(512, 512)))
    assert (flow.qk_chunks, flow.v_chunks, flow.slices, flow.split.num_splits) == ((256, 256, 0), (256, 0, 0), 2, 1)
    assert (flow.tile.block_m, flow.tile.block_n) == (64, 32)  # 128 x 32 with Q of 512 channels outgrows SMEM
    described = img_261.describe(gpu_problem(8, 1, 512, 50_176, dims=(272, 272)))
    assert "each score computed once" in described and "256 + 16" in described and "TMA" in described
    assert "once per slice" in flow.describe(gpu_problem(1, 1, 182_528, 2048, dims=(512, 512)))
    for dims in ((64, 64), (256, 256), (32, 1280), (1280, 24), (520, 600)):
        assert wide.plan(gpu_problem(8, 1, 512, 50_176, dims=dims)) is None, dims
    unaligned = wide.plan(gpu_problem(8, 1, 512, 50_176, dims=(261, 322)))
    assert unaligned.padded_widths == (272, 336)
    assert "one zero-padded copy of q and k to 272 channels and v to 336" in unaligned.describe(
        gpu_problem(8, 1, 512, 50_176, dims=(261, 322)))


def test_wide_plans_fit_the_shared_memory_of_each_gpu_and_decline_what_spills(fake_gpu):
    """Hopper serves every head up to 512 channels in 16 bits, by TMA, and exact fp32
    (CUDA-core dots) up to 336; sm_80 (mma.sync holds the query tile in registers) only
    16-bit heads up to 272 channels: what compiled without spilling."""
    from perceiver_kernels.triton import wide

    served = {}
    for arch, shared_memory in (("sm_80", 166_912), ("sm_90", 232_448)):
        fake_gpu(arch, 108, shared_memory)
        for dims in ((272, 272), (336, 336), (512, 512), (512, 256)):
            for dtype, tf32 in ((torch.bfloat16, False), (torch.float32, True), (torch.float32, False)):
                problem = gpu_problem(2, 4, 4096, 4096, dtype, dims)._replace(tf32=tf32)
                chosen = wide.plan(problem)
                kind = "exact" if problem.exact_fp32 else "tf32" if tf32 else "16-bit"
                served[arch, kind, dims] = chosen is not None
                if chosen is None:
                    continue
                stored_qk, stored_v = sum(chosen.qk_chunks), sum(chosen.v_chunks)
                assert wide.shared_memory_bytes(chosen.tile, stored_qk, stored_v, dtype.itemsize) <= shared_memory
                assert chosen.tma == (arch == "sm_90" and not problem.exact_fp32)
    every = ((272, 272), (336, 336), (512, 512), (512, 256))
    assert [served["sm_90", "16-bit", dims] for dims in every] == [True] * 4
    assert [served["sm_80", "16-bit", dims] for dims in every] == [True, False, False, False]
    assert [served["sm_90", "exact", dims] for dims in every] == [True, True, False, False]
    assert not any(served["sm_80", "exact", dims] for dims in every)
    # TF32: up to 272 channels on sm_90; fp32 tiles of 272 channels outgrow sm_80's shared memory.
    assert [served["sm_90", "tf32", dims] for dims in every] == [True, False, False, False]
    assert not any(served["sm_80", "tf32", dims] for dims in every)


@pytest.mark.parametrize("dims", [(272, 272), (261, 261), (336, 512)])
def test_wide_launches_read_rows_by_tma_on_hopper(dims):
    """On sm_90 q and k (and v without a mask) go through TMA descriptors, rows of 261
    channels from their zero-padded copies; on sm_80 (which serves heads of multiples of
    16 up to 272 channels) everything through pointers."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    from tests.triton_compile import CompileCase, record_launches

    for arch in (80, 90) if max(dims) <= 272 and dims[1] % 16 == 0 else (90,):
        for masked in (False, True):
            case = CompileCase("bfloat16", *dims, 128, 4096, masked=masked, variant="untimed")
            launches = [(args, kwargs) for kernel, args, kwargs in record_launches(case, arch=arch)
                        if kernel.__name__ == "wide_fwd_kernel"]
            assert launches
            for args, kwargs in launches:
                descriptors = [isinstance(a, TensorDescriptor) for a in args[:9]]
                expected = arch == 90
                assert kwargs["USE_TMA"] == expected
                assert descriptors == [expected] * 6 + [expected and not masked] * 3
