"""The benchmark suite: end to end on tiny CPU sizes, FLOP counts against FlopCounterMode, reports."""

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import perceiver
import perceiver_kernels as pk
from benchmarks import cli, flops, model_suite, op_suite, scaling_suite
from benchmarks.report import summary_table


def counted(fn) -> int:
    """FLOPs FlopCounterMode sees, with SDPA decomposed into the matmuls it counts."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_cli_writes_results_report_and_plots(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(op_suite, "CPU_SHAPES", [op_suite.Shape("tiny", 1, 2, 8, 64, 16, masked=True)])
    monkeypatch.setattr(op_suite, "CPU_SWEEP", op_suite.sweep_shapes(1, 2, 8, (32, 64), 16))
    monkeypatch.setattr(scaling_suite, "CPU_CONFIG", scaling_suite.ScalingConfig(16, 2, 4, 1, sizes=(16, 32)))
    monkeypatch.setattr(model_suite, "CPU_CONFIG", model_suite.ModelConfig(4, 4, 16, 1, 1, 2, batch=1, num_labels=3))
    cli.main(["--device", "cpu", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    env, rows = results["environment"], results["results"]
    assert env["torch"] and env["commit"] and env["ceilings"]["matmul_tflops"] > 0
    assert {row["suite"] for row in rows} == {"op", "scaling", "model"}
    op_rows = [row for row in rows if row["suite"] == "op" and not row["sweep"]]
    assert {row["provider"] for row in op_rows} == {"perceiver_kernels", "naive", "sdpa"}
    assert {row["pass"] for row in op_rows} == {"forward", "forward+backward"}
    forward_flops = 4 * 2 * 8 * 64 * 16
    for row in rows:
        assert row["status"] == "ok" and row["median_ms"] > 0, row
    for row in op_rows:
        assert row["flops"] == (forward_flops if row["pass"] == "forward" else 3.5 * forward_flops)
        forward_bytes = 2 * (2 * 8 + 2 * 64) * 16 * 4  # B H (Nq read + written, Nk of k and v) d, fp32
        assert row["min_bytes"] == (forward_bytes if row["pass"] == "forward" else 3 * forward_bytes)
        assert row["gbps"] == pytest.approx(row["min_bytes"] / row["median_ms"] / 1e6)
    sweep_rows = [row for row in rows if row["suite"] == "op" and row["sweep"]]
    assert {(row["sweep"], row["Nq"], row["Nk"]) for row in sweep_rows} == {
        ("encode", 8, 32), ("encode", 8, 64), ("decode", 32, 8), ("decode", 64, 8)}
    assert {row["pass"] for row in sweep_rows} == {"forward"}
    assert {row["provider"] for row in rows if row["suite"] == "model"} == {
        "perceiver_kernels", "hf_transformers", "perceiver_pytorch"}
    report = (tmp_path / "report.md").read_text()
    assert "| tiny | forward | perceiver_kernels |" in report and "torch (scaled_dot_product_attention)" in report
    for plot in ("op.png", "sweep.png", "scaling.png"):
        assert f"![{plot}]({plot})" in report
        assert (tmp_path / plot).read_bytes()[:4] == b"\x89PNG"
    assert "| M=32 | inference | perceiver_io |" in capsys.readouterr().out


def test_cli_rejects_unknown_suites():
    with pytest.raises(SystemExit):
        cli.main(["--suite", "op,speed"])


def test_report_shows_failed_rows_and_missing_baselines():
    rows = [
        {"suite": "op", "case": "s", "pass": "forward", "provider": "sdpa-flash", "status": "unsupported: No kernel"},
        {"suite": "op", "case": "s", "pass": "forward", "provider": "naive", "status": "out of memory"},
        {"suite": "op", "case": "s", "pass": "forward", "provider": "perceiver_kernels", "status": "ok",
         "median_ms": 1.0, "tflops": 2.0, "roofline_pct": 50.0, "peak_mib": None, "path": "triton (split-KV)"},
        {"suite": "scaling", "case": "M=8", "pass": "inference", "provider": "transformer", "status": "out of memory"},
    ]
    table = summary_table(rows)
    assert "out of memory" in table and "unsupported: No kernel" in table and "triton (split-KV)" in table
    assert "### Scaling with input size M" in table
    assert "| s | forward | perceiver_kernels | 1.000 | 2.00 | - | 50 | - | - |" in table  # no baseline ran


def test_attention_flops_match_flop_counter_forward_and_backward():
    q, k, v = (torch.randn(2, 3, n, 16, requires_grad=True) for n in (5, 7, 7))
    expected = flops.attention(2, 3, 5, 7, 16)
    assert counted(lambda: pk.reference_attention(q, k, v)) == expected
    out = pk.reference_attention(q, k, v)
    # The reference keeps P, so its backward is 2x the forward; fused kernels recompute
    # Q K^T (another 0.5x), which is what BACKWARD_FACTOR counts.
    backward = counted(lambda: out.sum().backward())
    recompute_qk = flops.attention(2, 3, 5, 7, 16) / 2
    assert backward == 2 * expected and backward + recompute_qk == flops.BACKWARD_FACTOR * expected


def test_layer_and_model_flops_match_flop_counter():
    layer = perceiver.PerceiverLayer(24, 40, qk_channels=16, v_channels=32, num_heads=4, widening_factor=2)
    queries, inputs = torch.randn(2, 5, 24), torch.randn(2, 11, 40)
    assert counted(lambda: layer(queries, inputs)) == flops.perceiver_layer(2, 5, 11, 24, 40, 16, 32, 4, 2)

    encoder_layer = torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
    tokens = torch.randn(2, 9, 32)
    assert counted(lambda: encoder_layer(tokens)) == flops.transformer_encoder_layer(2, 9, 32, 4, 64)

    config = scaling_suite.ScalingConfig(16, 2, 4, 2, sizes=(32,), batch=1)
    stack = scaling_suite.perceiver_stack(config)
    assert counted(lambda: stack(torch.randn(1, 32, 16))) == scaling_suite.perceiver_flops(config, 32)

    small = model_suite.ModelConfig(8, 4, 16, 2, 2, 2, batch=2, num_labels=3)
    hf_model = model_suite.build_models(small)["hf_transformers"]
    assert counted(lambda: hf_model(inputs=torch.randn(2, 3, 8, 8))) == model_suite.model_flops(small)


def test_providers_named_in_bench_skip_providers_are_left_out(monkeypatch):
    cpu = torch.device("cpu")
    assert "naive" in op_suite.providers(cpu)
    monkeypatch.setenv("BENCH_SKIP_PROVIDERS", "naive, sdpa")
    assert set(op_suite.providers(cpu)) == {"perceiver_kernels"}


def test_gpu_cases_cover_every_anchor_and_the_sweeps_at_full_size():
    cuda = torch.device("cuda")  # cases() only plans: no GPU needed
    full = op_suite.cases(cuda, "full")
    names = {shape.name for shape, _ in full}
    assert {shape.name for shape in op_suite.GPU_SHAPES} <= names
    assert {"ENC-4", "ENC M=1048576", "DEC O=1048576"} <= names
    assert {shape.name for shape, backward in full if backward} == set(op_suite.BACKWARD_GPU)
    assert {shape.name for shape, _ in op_suite.cases(cuda, "quick")} == set(op_suite.QUICK_GPU)
