"""The CUDA extension around its kernels: build, argument checks, head dims, plans.

The kernels' results are checked in tests/test_forward_contract.py (the host emulation
in CI, the GPU when there is one). Plans that depend on the GPU's size run through the
emulated extension, whose device N has N SMs.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import perceiver_kernels as pk
from perceiver_kernels import machine, policy
from perceiver_kernels.backends import BACKENDS
from perceiver_kernels.cuda import extension as cuda_extension
from perceiver_kernels.cuda.launch import plan_forward
from perceiver_kernels.problem import Problem
from tests import cuda_emulation
from tests.attention_cases import Case, assert_matches_reference, make_inputs
from tests.conftest import HAS_GPU
from tests.kernel_runners import CUDA_EMULATION, DTYPES, _cuda_forward

CSRC = Path(__file__).resolve().parents[1] / "csrc" / "attention"
BUILT = pk.build_info()["built"]
needs_extension = pytest.mark.skipif(not BUILT, reason="perceiver_kernels._C is not built (no nvcc)")
needs_emulation = pytest.mark.skipif(bool(cuda_emulation.unavailable()), reason=cuda_emulation.unavailable())


def test_every_compiled_head_dim_pair_has_one_instantiation_file_per_dtype():
    macro = re.search(r"#define PK_FORWARD_HEAD_DIMS\(X\)(.*)", (CSRC / "forward.h").read_text()).group(1)
    pairs = {(int(qk), int(v)) for qk, v in re.findall(r"X\((\d+), (\d+)\)", macro)}
    files = {path.stem for path in (CSRC / "instantiations").glob("*.cu")}
    expected = {f"forward_{dtype}_{qk}x{v}" for dtype in ("fp16", "bf16", "fp32") for qk, v in pairs}
    expected |= {f"forward_{dtype}_wide" for dtype in ("fp16", "bf16", "fp32")}  # the wide kernels
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
    (dict(head_dim_qk=1281), "no compiled kernel serves head dims Dqk=1281 Dv=64; compiled Dqk/Dv pairs"),
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


@pytest.mark.parametrize("extension", [
    pytest.param(cuda_extension.module, marks=needs_extension, id="built"),
    pytest.param(cuda_emulation.build, marks=needs_emulation, id="emulated"),
])
def test_extension_takes_causal_as_a_bool_only(extension):
    """pybind11 would otherwise turn anything with __bool__ (1, "no") into a flag."""
    with pytest.raises(TypeError, match="incompatible function arguments"):
        extension().forward(**_arguments(causal=1))


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
def test_head_dims_run_on_the_cheapest_compiled_pair_or_the_wide_kernels_or_are_refused_with_the_list():
    extension = cuda_extension.module()
    assert extension.forward_head_dims(16, 16) == (32, 32)
    assert extension.forward_head_dims(40, 24) == (64, 64)
    assert extension.forward_head_dims(32, 160) == (32, 160)
    assert extension.forward_head_dims(100, 128) == (128, 128)
    # No pair holds these: the wide kernels take them rounded up to a multiple of 16.
    assert extension.forward_head_dims(129, 8) == (144, 16)
    assert extension.forward_head_dims(261, 261) == (272, 272)
    assert extension.forward_head_dims(32, 1280) == (32, 1280)
    assert extension.forward_head_dims(1281, 16) is None
    assert pk.build_info()["forward_wide_head_dims"] == {
        "multiple": 16, "max": 1280, "value_channels_per_block": {"float32": 256, "float16": 512, "bfloat16": 512}}
    assert cuda_extension.head_dims_problem.__wrapped__(261, 261) == ""
    reason = cuda_extension.head_dims_problem.__wrapped__(16, 1281)
    assert "Dqk=16 Dv=1281" in reason and "32/96" in reason and "128/128" in reason


@needs_extension
@pytest.mark.parametrize("capability,archs,ok", [
    ((9, 0), "80,90a", True),
    ((8, 6), "80,90a", True),   # sm_80 code runs on 8.6
    ((8, 6), "90a", False),     # 90a runs on 9.0 only
    ((10, 0), "80", True),      # PTX of compute_80 is compiled at load time
    ((7, 5), "80,90a", False),  # no bf16 mma.sync
])
def test_architecture_check(monkeypatch, capability, archs, ok):
    monkeypatch.setattr(machine, "architecture", lambda device_type, index: "sm_{}{}".format(*capability))
    info = {**cuda_extension.build_info(), "cuda_archs": archs}
    monkeypatch.setattr(cuda_extension, "_build_info", lambda: info)
    reason = cuda_extension.architecture_problem.__wrapped__(0)
    assert (reason == "") == ok, reason
    if not ok:
        assert "compute capability" in reason or "PERCEIVER_KERNELS_CUDA_ARCHS" in reason


def _problem(batch, heads, num_queries, num_keys, dtype=torch.bfloat16, dims=(64, 64), device=("cuda", 0),
             **flags) -> Problem:
    return Problem(torch.device(*device), dtype, batch, heads, num_queries, num_keys, *dims, **flags)


@needs_emulation
def test_split_plan_counts_blocks_of_the_cuda_kernels(fake_gpu):
    """Query rows per block come from the extension (build_info), not a Python copy."""
    fake_gpu("sm_90", 132)
    extension = cuda_emulation.build()
    assert extension.build_info()["query_tile_rows"] == {"float32": 32, "float16": 64, "bfloat16": 64}

    def plan(*shape, dtype=torch.bfloat16):
        return plan_forward(_problem(*shape, dtype=dtype), extension=extension)

    assert plan(1, 8, 256, 400_000).num_splits == 9   # ENC-3: 32 blocks unsplit
    assert plan(8, 8, 256, 50_176).num_splits == 2    # ENC-1: 256 blocks
    assert plan(8, 8, 50_176, 256).num_splits == 1    # DEC-1
    plan = plan(1, 8, 256, 400_000, dtype=torch.float32)  # 64 blocks of 32 rows
    assert plan.num_splits == 5 and plan.keys_per_split % 128 == 0
    assert plan.num_splits * plan.keys_per_split >= 400_000


def test_auto_never_picks_the_slower_cuda_kernels_and_says_so():
    inputs = make_inputs(Case(), "cuda" if HAS_GPU else "cpu")
    explanation = pk.explain(inputs["q"], inputs["k"], inputs["v"])
    assert explanation.chosen != "cuda"
    if HAS_GPU and BUILT and policy.architecture_of(explanation.problem) in policy.MEASURED:
        assert any("auto does not choose the CUDA kernels" in reason for reason in explanation.refusals["cuda"])


@needs_emulation
def test_plans_of_the_anchor_shapes_on_an_h100():
    extension = cuda_emulation.build().with_multiprocessors(132)
    # DEC-1: K/V resident, each block running a share of 784 query tiles x 64 heads.
    dec1 = extension.plan(torch.bfloat16, 8, 8, 50_176, 256, (64, 64), 1, 256)
    assert dict(kv_resident=True, query_tiles_per_block=47, grid_x=17).items() <= dec1.items()
    # ENC-1 split in 2: too few query tiles to share; K/V stream.
    enc1 = extension.plan(torch.bfloat16, 8, 8, 256, 50_176, (64, 64), 2, 25_088)
    assert dict(kv_resident=False, query_tiles_per_block=1, grid_x=4).items() <= enc1.items()
    # 2048 latents' K/V (DEC-2) do not fit next to a second block: stream.
    dec2 = extension.plan(torch.bfloat16, 1, 8, 800_000, 2048, (64, 64), 1, 2048)
    assert not dec2["kv_resident"]


@needs_emulation
def test_resident_path_is_taken_on_one_sm():
    extension = cuda_emulation.build()
    assert extension.with_multiprocessors(1).plan(torch.float16, 2, 2, 300, 300, (64, 64), 1, 300)["kv_resident"]
    assert not extension.with_multiprocessors(132).plan(torch.float16, 2, 2, 300, 300, (64, 64), 1, 300)["kv_resident"]


@needs_emulation
def test_the_emulation_keeps_its_own_runtime_where_the_real_one_is_loaded_globally():
    """A CUDA build of torch loads libcudart globally. The emulated module's calls of the
    runtime must still reach emulator.cpp's stand-ins: on the H200 they reached the real
    runtime, which threw through pk_emulate_plan and aborted every test using the emulation."""
    runtimes = sorted(cuda_emulation.cuda_include_dir().parent.glob("lib*/libcudart.so*"))
    if not runtimes:
        pytest.skip("no libcudart.so beside the CUDA headers")
    script = (f"import ctypes; ctypes.CDLL({str(runtimes[0])!r}, mode=ctypes.RTLD_GLOBAL)\n"
              "import torch\n"
              "from tests import cuda_emulation\n"
              "plan = cuda_emulation.build().with_multiprocessors(1).plan(torch.float16, 2, 2, 300, 300, (64, 64), 1, 300)\n"
              "print(plan['kv_resident'])\n")
    run = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parent.parent,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["True"]  # the emulated GPU of one SM, not the machine's


@pytest.mark.usefixtures("poisoned_empty")
@needs_emulation
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], **dict(ids=lambda dtype: str(dtype)[6:]))
@pytest.mark.parametrize("num_splits", [1, 2])
def test_causal_with_resident_kv(dtype, num_splits):
    """Causal masking where blocks keep K/V resident over several query tiles (an
    emulated GPU of one SM). Unsplit, the first block's last tile reaches 219 of the
    500 keys, so the block loads only those, and its tiles walk different numbers of
    them (the first rows see none); in two splits of 256 keys, the second lies beyond
    the reach of the first five query tiles."""
    case = Case(num_queries=600, num_keys=500, head_dim_qk=24, head_dim_v=32, dtype=dtype, mask=True,
                residual=True, transposed=True)
    plan = plan_forward(_problem(2, 2, 600, 500, dtype, device=("cpu",)), num_splits,
                        extension=cuda_emulation.build())
    resident = cuda_emulation.build().with_multiprocessors(1).plan(dtype, 2, 2, 600, 500, (24, 32), plan.num_splits,
                                                                  plan.keys_per_split)
    assert plan.num_splits == num_splits
    assert resident["kv_resident"] and resident["query_tiles_per_block"] == (5 if num_splits == 1 else 10)
    inputs = make_inputs(case, "cpu")
    inputs["causal"] = True
    out, lse = _cuda_forward(inputs, num_splits=num_splits, multiprocessors=1)
    assert_matches_reference(out, inputs, lse, CUDA_EMULATION.epsilon)


@needs_emulation
def test_the_launcher_drives_the_binding_and_its_checks():
    """perceiver_kernels.cuda.launch through the binding compiled for the CPU: an input
    the kernels do not serve comes back as the binding's ValueError."""
    inputs = make_inputs(Case(num_queries=10, num_keys=20, head_dim_qk=1290, head_dim_v=16), "cpu")
    with pytest.raises(ValueError, match="no compiled kernel serves head dims Dqk=1290"):
        _cuda_forward(inputs)


# ---- The wide kernels' plans: head dims beyond the compiled pairs ----

@needs_emulation
def test_wide_plans_fit_the_shared_memory_of_every_sm80_gpu():
    """Every head-dim pair the wide kernels take, in every dtype, fits the 99 KiB that
    sm_86/sm_89 allow a block; dims run rounded up to a multiple of 16, Dv in equal slices."""
    extension = cuda_emulation.build().with_multiprocessors(132)
    served = 0
    for dtype in DTYPES:
        for dqk in range(1, 1281, 13):
            for dv in range(1, 1281, 17):
                plan = extension.plan(dtype, 1, 2, 256, 4096, (dqk, dv), 1, 4096)
                if not plan["wide"]:
                    continue
                served += 1
                assert plan["shared_bytes"] <= 99 * 1024, (dtype, dqk, dv, plan)
                slices, width = plan["value_slices"], plan["slice_channels"]
                assert slices * width >= dv and (slices - 1) * width < dv, (dtype, dqk, dv, plan)
                assert plan["grid_x"] == slices * (256 // (32 if dtype == torch.float32 else 64))
    assert served > 3 * 6000


@needs_emulation
@pytest.mark.parametrize("dtype,dims,expected", [
    # 261 runs as 272, its query tile resident; Dv 272 in one slice of two warps' 144 channels.
    (torch.bfloat16, (261, 261), dict(value_slices=1, slice_channels=288, q_resident=True, threads=256)),
    (torch.float16, (32, 1280), dict(value_slices=3, slice_channels=448, q_resident=True)),
    (torch.float16, (512, 512), dict(value_slices=1, slice_channels=512, q_resident=False)),
    (torch.bfloat16, (1024, 1024), dict(value_slices=2, slice_channels=512, q_resident=False)),
    (torch.float32, (261, 261), dict(value_slices=2, slice_channels=160, threads=128)),
    (torch.float32, (1024, 1024), dict(value_slices=4, slice_channels=256)),
])
def test_wide_plans_of_the_perceiver_heads(dtype, dims, expected):
    plan = cuda_emulation.build().with_multiprocessors(132).plan(dtype, 8, 1, 512, 50_176, dims, 2, 25_088)
    assert plan["wide"] and not plan["kv_resident"] and plan["query_tiles_per_block"] == 1
    assert expected.items() <= plan.items()
    assert cuda_emulation.build().forward_head_dims(*dims) == tuple(16 * -(-d // 16) for d in dims)


@needs_extension
@pytest.mark.parametrize("dims,grad,refused", [
    ((261, 261), False, ""),
    ((261, 261), True, ""),
    ((1024, 1024), True, ""),
    ((64, 64), True, ""),
    ((1281, 64), False, "wide kernels take any head dims up to 1280"),
    ((1281, 64), True, "gradients come from the triton backward: head dims up to 1280"),
])
def test_wide_heads_run_forward_and_training_through_the_triton_backward(monkeypatch, dims, grad, refused):
    """The CUDA backend declares the Triton backward as its own: training takes what that
    backward takes, and says so where it does not."""
    from perceiver_kernels.triton import backend as triton_backend

    monkeypatch.setattr(cuda_extension, "architecture_problem", lambda index: "")
    monkeypatch.setattr(cuda_extension, "runtime_problem", lambda: "")
    monkeypatch.setattr(triton_backend, "_machine_refusal", lambda device_type: "")
    cuda = BACKENDS["cuda"]
    assert cuda.backward is BACKENDS["triton"].backward
    reasons = cuda.refusals(_problem(2, 1, 512, 50_176, torch.float16, dims, requires_grad=grad))
    if refused:
        assert any(refused in reason for reason in reasons), reasons
    else:
        assert reasons == []
