"""The benchmark CLI runs end to end on a tiny CPU shape and writes its files."""

import json

from benchmarks import cli, op_suite


def test_cli_writes_results_and_report(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(op_suite, "CPU_SHAPES", [op_suite.Shape("tiny", 1, 2, 8, 64, 16, masked=True)])
    cli.main(["--device", "cpu", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    env, rows = results["environment"], results["results"]
    assert env["torch"] and env["commit"] and env["ceilings"]["matmul_tflops"] > 0
    assert {row["provider"] for row in rows} == {"perceiver_kernels", "naive", "sdpa"}
    assert {row["pass"] for row in rows} == {"forward", "forward+backward"}
    forward_flops = 4 * 2 * 8 * 64 * 16
    for row in rows:
        assert row["status"] == "ok" and row["median_ms"] > 0
        assert row["flops"] == (forward_flops if row["pass"] == "forward" else 3.5 * forward_flops)
    report = (tmp_path / "report.md").read_text()
    assert "| tiny | forward | perceiver_kernels |" in report and "torch (scaled_dot_product_attention)" in report
    assert "| tiny | forward+backward | sdpa |" in capsys.readouterr().out


def test_report_shows_failed_rows():
    from benchmarks.report import summary_table

    rows = [
        {"shape": "s", "provider": "sdpa-flash", "status": "unsupported: No available kernel"},
        {"shape": "s", "provider": "naive", "status": "out of memory"},
        {"shape": "s", "provider": "perceiver_kernels", "status": "ok", "median_ms": 1.0, "tflops": 2.0,
         "roofline_pct": 50.0, "peak_mib": None, "path": "triton (split-KV)"},
    ]
    table = summary_table(rows)
    assert "out of memory" in table and "unsupported: No available kernel" in table and "triton (split-KV)" in table
