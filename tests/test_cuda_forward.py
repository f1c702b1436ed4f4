"""The CUDA C++ forward (perceiver_kernels._C): argument checks everywhere, kernels on a GPU.

Without a GPU (CI) the extension still builds, loads and checks every argument before
touching the device; the kernel tests are marked `gpu` and run the Triton forward's
case grid against the float64 reference.
"""

import re
from pathlib import Path

import pytest
import torch

import perceiver_kernels as pk
from perceiver_kernels import cuda_extension
from perceiver_kernels.backends.cuda_backend import NOT_YET_VALIDATED
from perceiver_kernels.cuda_launch import attention_forward, plan_forward
from tests.attention_cases import Case, assert_matches_reference, far_keys_inputs, make_inputs, nan_padding_inputs, strided_inputs
from tests.conftest import HAS_GPU
from tests.test_triton_forward import GRID

CSRC = Path(__file__).resolve().parents[1] / "csrc" / "attention"
BUILT = pk.build_info()["built"]
needs_extension = pytest.mark.skipif(not BUILT, reason="perceiver_kernels._C is not built (no nvcc)")
PATH_SPLITS = {"unsplit": 1, "split": 3}


def test_every_compiled_head_dim_pair_has_one_instantiation_file_per_dtype():
    macro = re.search(r"#define PK_FORWARD_HEAD_DIMS\(X\)(.*)", (CSRC / "forward.h").read_text()).group(1)
    pairs = {(int(qk), int(v)) for qk, v in re.findall(r"X\((\d+), (\d+)\)", macro)}
    files = {path.stem for path in (CSRC / "instantiations").glob("*.cu")}
    expected = {f"forward_{dtype}_{qk}x{v}" for dtype in ("fp16", "bf16", "fp32") for qk, v in pairs}
    assert files == expected
    if BUILT:
        assert set(pk.build_info()["forward_head_dims"]) == pairs


def _arguments(**overrides):
    """Arguments of _C.forward for a small fp16 problem; pointers are fake (never reached)."""
    arguments = dict(
        dtype="float16", device=0, stream=0,
        q=1 << 20, q_stride=(2048, 1024, 64, 1), k=1 << 21, k_stride=(2048, 1024, 64, 1),
        v=1 << 22, v_stride=(2048, 1024, 64, 1), key_padding=0, key_padding_stride=(),
        residual=0, residual_stride=(), out=1 << 23, out_stride=(2048, 64, 128, 1), lse=1 << 24,
        partial_out=0, partial_lse=0, batch=2, heads=2, num_queries=16, num_keys=16,
        head_dim_qk=64, head_dim_v=64, scale=0.125, num_splits=1, keys_per_split=16,
    )
    arguments.update(overrides)
    return arguments


@needs_extension
@pytest.mark.parametrize("overrides,message", [
    (dict(dtype="float64"), "dtype must be"),
    (dict(q_stride=(1, 2, 3)), "q_stride must hold 4"),
    (dict(head_dim_qk=200), "no compiled kernel serves head dims Dqk=200 Dv=64; compiled Dqk/Dv pairs"),
    (dict(head_dim_v=0), "head_dim_v must be in"),
    (dict(num_keys=0), "num_keys must be in"),
    (dict(batch=300, heads=300), r"batch \* heads must be at most 65535"),
    (dict(num_splits=2, keys_per_split=4), "must cover num_keys=16"),
    (dict(num_splits=3, keys_per_split=8), "each starting inside it"),
    (dict(num_splits=2, keys_per_split=8), "needs partial_out and partial_lse"),
    (dict(q=0), "q is a null pointer"),
    (dict(key_padding=1 << 25, key_padding_stride=(16,)), "key_padding_stride must hold 2"),
    (dict(scale=float("nan")), "scale must be finite"),
    (dict(scale=1e300), "scale must be finite in float32"),
])
def test_extension_checks_every_argument_before_touching_the_gpu(overrides, message):
    with pytest.raises(ValueError, match=message):
        cuda_extension.module().forward(**_arguments(**overrides))


@needs_extension
def test_extension_refuses_host_memory_or_a_machine_without_gpu():
    x = torch.zeros(2, 2, 16, 64, dtype=torch.float16)
    out = torch.zeros(2, 16, 2, 64, dtype=torch.float16)
    lse = torch.zeros(2, 2, 16)
    arguments = _arguments(q=x.data_ptr(), k=x.data_ptr(), v=x.data_ptr(), out=out.data_ptr(), lse=lse.data_ptr())
    expected = (ValueError, "points to host memory") if HAS_GPU else (RuntimeError, "CUDA")
    with pytest.raises(expected[0], match=expected[1]):
        cuda_extension.module().forward(**arguments)


@needs_extension
def test_head_dims_run_on_the_cheapest_compiled_pair_or_are_refused_with_the_list():
    extension = cuda_extension.module()
    assert extension.forward_head_dims(16, 16) == (32, 32)
    assert extension.forward_head_dims(40, 24) == (64, 64)
    assert extension.forward_head_dims(32, 160) == (32, 160)
    assert extension.forward_head_dims(100, 128) == (128, 128)
    assert extension.forward_head_dims(129, 8) is None
    reason = cuda_extension.head_dims_problem.__wrapped__(261, 261)
    assert "Dqk=261 Dv=261" in reason and "32/96" in reason and "128/128" in reason


@needs_extension
@pytest.mark.parametrize("capability,archs,ok", [
    ((9, 0), "80,90a", True),
    ((8, 6), "80,90a", True),   # sm_80 code runs on 8.6
    ((8, 6), "90a", False),     # 90a runs on 9.0 only
    ((10, 0), "80", True),      # PTX of compute_80 is compiled at load time
    ((7, 5), "80,90a", False),  # no bf16 mma.sync
])
def test_architecture_check(monkeypatch, capability, archs, ok):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    extension = cuda_extension.module()
    info = {**extension.build_info(), "cuda_archs": archs}
    monkeypatch.setattr(cuda_extension, "module", lambda: type("Fake", (), {"build_info": staticmethod(lambda: info)}))
    reason = cuda_extension.architecture_problem.__wrapped__(0)
    assert (reason == "") == ok, reason
    if not ok:
        assert "compute capability" in reason or "PERCEIVER_KERNELS_CUDA_ARCHS" in reason


def test_split_plan_counts_blocks_of_the_cuda_kernels(monkeypatch):
    from perceiver_kernels import chunking

    monkeypatch.setattr(chunking, "multiprocessor_count", lambda device: 132)  # an H100
    gpu = torch.device("cuda", 0)
    assert plan_forward(1, 8, 256, 400_000, torch.bfloat16, gpu).num_splits == 9   # ENC-3: 32 blocks unsplit
    assert plan_forward(8, 8, 256, 50_176, torch.bfloat16, gpu).num_splits == 2    # ENC-1: 256 blocks
    assert plan_forward(8, 8, 50_176, 256, torch.bfloat16, gpu).num_splits == 1    # DEC-1
    plan = plan_forward(1, 8, 256, 400_000, torch.float32, gpu)                    # 64 blocks of 32 rows
    assert plan.num_splits == 5 and plan.keys_per_split % 128 == 0
    assert plan.num_splits * plan.keys_per_split >= 400_000


def test_auto_never_picks_the_unvalidated_kernels_and_says_so():
    inputs = make_inputs(Case(), "cuda" if HAS_GPU else "cpu")
    explanation = pk.explain(inputs["q"], inputs["k"], inputs["v"])
    assert explanation.chosen != "cuda"
    if HAS_GPU and BUILT:
        assert NOT_YET_VALIDATED in explanation.refusals["cuda"]


# ---- on a GPU: the kernels against the float64 reference ----


def run(inputs, path):
    scale = inputs["scale"] if inputs["scale"] is not None else inputs["q"].shape[-1] ** -0.5
    return attention_forward(inputs["q"], inputs["k"], inputs["v"], inputs["key_padding_mask"], inputs["residual"],
                             scale, num_splits=PATH_SPLITS[path])


gpu_with_extension = [pytest.mark.gpu, needs_extension]


@pytest.mark.parametrize("path", PATH_SPLITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", GRID[::2], ids=lambda c: f"q{c.num_queries}-k{c.num_keys}-d{c.head_dim_qk}x{c.head_dim_v}")
@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.gpu
@needs_extension
def test_grid_with_mask_residual_transposed(case, dtype, path):
    inputs = make_inputs(Case(**{**case.__dict__, "dtype": dtype}), "cuda")
    out, lse = run(inputs, path)
    assert_matches_reference(out, inputs, lse)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dims", [(32, 32), (64, 64), (128, 128), (32, 96), (32, 160), (8, 8), (64, 120), (24, 7)])
@pytest.mark.gpu
@needs_extension
def test_every_compiled_pair_and_an_odd_dv(dims, dtype, poisoned_empty):
    # Dv = 7 is odd: the epilogue stores channels one by one instead of in pairs.
    case = Case(batch=2, heads=3, num_queries=300, num_keys=200, head_dim_qk=dims[0], head_dim_v=dims[1],
                dtype=dtype, mask=True)
    inputs = make_inputs(case, "cuda")
    for path in PATH_SPLITS:
        out, lse = run(inputs, path)
        assert_matches_reference(out, inputs, lse)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.gpu
@needs_extension
def test_decode_shape_runs_several_query_tiles_over_resident_kv(dtype, poisoned_empty):
    # 625 query tiles x 8 heads: enough work for blocks of 4+ tiles that keep K/V on chip.
    case = Case(batch=2, heads=4, num_queries=40_000, num_keys=300, head_dim_qk=64, head_dim_v=64, dtype=dtype,
                mask=True, residual=True, transposed=True)
    inputs = make_inputs(case, "cuda")
    out, lse = run(inputs, "unsplit")
    assert_matches_reference(out, inputs, lse)


@pytest.mark.gpu
@needs_extension
def test_padding_keys_holding_nan_do_not_leak(poisoned_empty):
    for dtype in (torch.float32, torch.bfloat16):
        inputs, clean = nan_padding_inputs(Case(num_queries=70, num_keys=200, dtype=dtype), "cuda")
        for path in PATH_SPLITS:
            out, _ = run(inputs, path)
            assert_matches_reference(out, clean)


@pytest.mark.gpu
@needs_extension
def test_arbitrary_strides_take_the_element_wise_path(poisoned_empty):
    for dtype in (torch.float32, torch.float16):
        inputs = strided_inputs("cuda", dtype, num_queries=133)
        for path in PATH_SPLITS:
            out, lse = run(inputs, path)
            assert_matches_reference(out, inputs, lse)


@pytest.mark.gpu
@needs_extension
def test_offsets_beyond_int32():
    full, tail = far_keys_inputs()
    out, _ = attention_forward(full["q"], full["k"], full["v"], full["key_padding_mask"], None, full["scale"])
    assert_matches_reference(out, tail)


@pytest.mark.gpu
@needs_extension
def test_explicit_backend_trains_through_the_triton_backward():
    from tests.test_triton_backward import assert_gradients_match

    case = Case(num_queries=100, num_keys=700, head_dim_qk=32, head_dim_v=96, dtype=torch.bfloat16, mask=True,
                residual=True)
    inputs = make_inputs(case, "cuda")
    leaves = {name: inputs[name].detach().requires_grad_() for name in ("q", "k", "v", "residual")}
    out = pk.cross_attention(leaves["q"], leaves["k"], leaves["v"], key_padding_mask=inputs["key_padding_mask"],
                             residual=leaves["residual"], backend="cuda")
    dout = torch.randn_like(out)
    out.backward(dout)
    assert_gradients_match({name: leaves[name].grad for name in "qkv"}, inputs, dout)
    torch.testing.assert_close(leaves["residual"].grad, dout, rtol=0, atol=0)


@pytest.mark.gpu
@needs_extension
def test_custom_op_passes_opcheck():
    inputs = make_inputs(Case(num_queries=70, num_keys=300, dtype=torch.float16, mask=True, residual=True), "cuda")
    args = (inputs["q"], inputs["k"], inputs["v"], inputs["key_padding_mask"], inputs["residual"], 0.25)
    torch.library.opcheck(torch.ops.perceiver_kernels.cuda_forward.default, args,
                          test_utils=("test_schema", "test_faketensor"))
