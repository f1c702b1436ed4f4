"""The compiled extension: built where nvcc exists, honest about what it can do."""

import shutil

import pytest
import torch

import perceiver_kernels as pk
from perceiver_kernels.cuda import extension as cuda_extension
from tests.attention_cases import Case, make_inputs
from tests.conftest import HAS_GPU


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc: the extension is not expected to be built")
def test_extension_was_built_with_nvcc_and_reports_its_build():
    info = pk.build_info()
    assert info["built"], info["reason"]
    assert info["cuda_version"].split(".")[0].isdigit()
    assert info["cuda_archs"] and all(arch[:2].isdigit() for arch in info["cuda_archs"].split(","))
    assert info["build_type"] and info["cudart_version"] > 0
    assert (32, 32) in info["forward_head_dims"] and (32, 160) in info["forward_head_dims"]
    assert set(info["query_tile_rows"]) == {"float32", "float16", "bfloat16"}
    assert info["max_batch_heads"] == 65535 and info["max_rows"] == 2**30


def test_build_info_without_extension_says_why(monkeypatch):
    monkeypatch.setattr(cuda_extension, "_load", lambda: (None, cuda_extension.NOT_BUILT))
    info = cuda_extension._build_info.__wrapped__()  # build_info() caches the real answer
    assert info == {"built": False, "reason": cuda_extension.NOT_BUILT}
    assert "nvcc" in info["reason"]


@pytest.mark.skipif(HAS_GPU or not pk.build_info()["built"], reason="checks a machine without a GPU")
def test_runtime_without_gpu_is_a_reason_not_a_crash():
    reason = cuda_extension.runtime_problem()
    assert reason and ("no CUDA device" in reason or "cannot start" in reason)


def test_cuda_backend_refuses_cpu_tensors_with_a_clear_error():
    inputs = make_inputs(Case(), "cpu")
    with pytest.raises(pk.BackendRefusedError, match="backend='cuda' cannot serve") as raised:
        pk.cross_attention(inputs["q"], inputs["k"], inputs["v"], backend="cuda")
    assert "need CUDA tensors" in str(raised.value) or "not built" in str(raised.value)


@pytest.mark.gpu
def test_extension_sees_the_gpu():
    assert cuda_extension.runtime_problem() == "" or not pk.build_info()["built"]
    if pk.build_info()["built"]:
        assert cuda_extension._load()[0].device_count() == torch.cuda.device_count()
