"""The benchmark suite: end to end on tiny CPU sizes, FLOP counts against FlopCounterMode, reports."""

import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import perceiver
import perceiver_kernels as pk
from benchmarks import cli, compare, flops, harness, model_suite, op_suite, report, scaling_suite, targets
from benchmarks.report import summary_table


def counted(fn) -> int:
    """FLOPs FlopCounterMode sees, with SDPA decomposed into the matmuls it counts."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


TINY_AR = model_suite.ARConfig(seq_len=24, num_latents=6, dim=16, num_heads=2, num_layers=1, batch=2, new_tokens=3)
# 24 queries decoded 10 at a time: two full chunks and a short last one.
TINY_FLOW = model_suite.FlowConfig(height=4, width=6, num_latents=4, d_latents=16, num_self_attends_per_block=1,
                                   num_self_attention_heads=2, chunk_size=10)


@pytest.fixture
def few_rounds(monkeypatch):
    """Tiny cases settle in a few rounds: keep the suite's tests fast."""
    monkeypatch.setattr(harness, "CPU_DISCIPLINE", harness.Discipline(min_rounds=3, max_rounds=5, budget_s=0.05,
                                                                      target_ci=0.5))


def test_cli_writes_results_report_and_plots(tmp_path, monkeypatch, capsys, few_rounds):
    monkeypatch.setattr(op_suite, "CPU_SHAPES", [op_suite.Shape("tiny", 1, 2, 8, 64, 16, pad_fraction=0.25)])
    monkeypatch.setattr(op_suite, "CPU_SWEEP", op_suite.sweep_shapes(1, 2, 8, (32, 64), 16))
    monkeypatch.setattr(scaling_suite, "CPU_CONFIG", scaling_suite.ScalingConfig(16, 2, 4, 1, sizes=(16, 32)))
    monkeypatch.setattr(model_suite, "CPU_CONFIG", model_suite.ModelConfig(4, 4, 16, 1, 1, 2, batch=1, num_labels=3))
    monkeypatch.setattr(model_suite, "AR_CPU", TINY_AR)
    monkeypatch.setattr(model_suite, "FLOW_CPU", TINY_FLOW)
    cli.main(["--device", "cpu", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    env, rows = results["environment"], results["results"]
    assert env["torch"] and env["commit"] and env["ceilings"]["matmul_tflops"] > 0
    assert {row["suite"] for row in rows} == {"op", "scaling", "model", "host"}
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
        "perceiver_kernels", "hf_transformers", "perceiver_pytorch", "plain_pytorch", "perceiver_kernels, no cache"}
    report = (tmp_path / "report.md").read_text()
    assert "| tiny | forward | perceiver_kernels |" in report and "torch (scaled_dot_product_attention)" in report
    for plot in ("op.png", "sweep.png", "scaling.png"):
        assert f"![{plot}]({plot})" in report
        assert (tmp_path / plot).read_bytes()[:4] == b"\x89PNG"
    assert "| M=32 | inference | perceiver_io |" in capsys.readouterr().out


def test_a_run_stopped_by_sigterm_writes_the_rows_it_measured(tmp_path, monkeypatch, few_rounds):
    """gpu_run.sh stops the benchmark at its step limit with SIGTERM: what was measured
    until then must reach results.json and report.md, marked incomplete."""
    shapes = [op_suite.Shape("first", 1, 2, 8, 64, 16), op_suite.Shape("second", 1, 2, 8, 64, 16)]
    monkeypatch.setattr(op_suite, "CPU_SHAPES", shapes)
    monkeypatch.setattr(op_suite, "CPU_SWEEP", [])
    real_make_inputs = op_suite.make_inputs

    def make_inputs(shape, *args, **kwargs):
        if shape.name == "second":
            os.kill(os.getpid(), signal.SIGTERM)
        return real_make_inputs(shape, *args, **kwargs)

    monkeypatch.setattr(op_suite, "make_inputs", make_inputs)
    handler = signal.getsignal(signal.SIGTERM)
    cli.main(["--device", "cpu", "--suite", "op,host", "--out", str(tmp_path)])
    assert signal.getsignal(signal.SIGTERM) == handler
    results = json.loads((tmp_path / "results.json").read_text())
    assert "SIGTERM during case 2 of" in results["environment"]["stopped"]
    assert {(row["case"], row["pass"]) for row in results["results"]} == {("first", "forward")}
    assert "**Incomplete run**" in (tmp_path / "report.md").read_text()


def test_cli_rejects_unknown_suites():
    with pytest.raises(SystemExit):
        cli.main(["--suite", "op,speed"])


CEILINGS = {"matmul_tflops": 1.0, "matmul_dtype": "float32", "copy_gbps": 10.0}


def _host_row(provider, median_ms, case="dispatch"):
    return {"suite": "host", "pass": "host", "case": case, "provider": provider, "status": "ok",
            "median_ms": median_ms, "samples_ms": [median_ms] * 3}


@pytest.fixture
def fake_suites(monkeypatch):
    """Suites that measure nothing (two cases each) and the ceilings as constants: the
    command line's own behaviour in a fraction of a second. `calls` lists the suites run;
    `during` runs inside each case (after progress, before its rows are appended)."""
    calls, during = [], []

    def suite(name):
        def run_suite(device, size, ceilings, progress, rows):
            calls.append(name)
            for case in ("a", "b"):
                progress(f"{name} {case}")
                for hook in during:
                    hook(name, case)
                rows.append(_host_row("sdpa", 2.0, f"{name} {case}"))
                rows.append(_host_row("perceiver_kernels", 1.0, f"{name} {case}"))
            return rows

        return type("FakeSuite", (), {"cases": staticmethod(lambda device, size: ["a", "b"]),
                                      "run_suite": staticmethod(run_suite)})

    monkeypatch.setattr(cli, "SUITES", {name: suite(name) for name in ("one", "two")})
    monkeypatch.setattr(harness, "ceilings", lambda device: CEILINGS)
    return calls, during


def test_an_out_that_cannot_be_written_fails_before_anything_is_measured(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(harness, "ceilings", lambda device: pytest.fail("measured before checking --out"))
    blocker = tmp_path / "a file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--suite", "host", "--out", str(blocker / "out")])
    assert exit_info.value.code == 2
    assert f"error: --out {str(blocker / 'out')!r} is not a writable folder" in capsys.readouterr().err


def test_each_row_reaches_results_json_as_it_is_measured(tmp_path, fake_suites):
    calls, during = fake_suites
    seen = []

    def read_file(name, case):
        seen.append(report.read_results(tmp_path))  # the run folder, as compare and targets take it

    during.append(read_file)
    cli.main(["--suite", "one", "--out", str(tmp_path)])
    first, second = seen
    assert first["results"] == [] and first["environment"]["ceilings"] == CEILINGS
    assert first["environment"]["stopped"] == report.UNFINISHED  # what a run killed outright leaves
    assert [(row["case"], row["provider"]) for row in second["results"]] == [
        ("one a", "sdpa"), ("one a", "perceiver_kernels")]
    final = json.loads((tmp_path / "results.json").read_text())
    assert "stopped" not in final["environment"] and len(final["results"]) == 4
    assert final["results"][1]["speedup"] == 2.0  # annotated in the final write


def test_a_report_that_cannot_be_written_keeps_the_results_and_says_so_in_one_line(tmp_path, monkeypatch,
                                                                                   fake_suites):
    from benchmarks import plots

    monkeypatch.setattr(plots, "write_plots", lambda *args: (_ for _ in ()).throw(OSError(28, "No space left")))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--suite", "one", "--out", str(tmp_path)])
    message = exit_info.value.code  # sys.exit(message): printed on stderr, exit status 1
    assert isinstance(message, str) and "\n" not in message
    assert message.endswith(f"failed (OSError: [Errno 28] No space left); the measurements are in "
                            f"{tmp_path / 'results.json'}")
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["results"]) == 4 and "stopped" not in results["environment"]


def test_results_go_to_a_named_fallback_when_the_out_folder_goes_away(tmp_path, monkeypatch, fake_suites):
    calls, during = fake_suites
    out, fallback = tmp_path / "out", tmp_path / "tmp"
    fallback.mkdir()
    monkeypatch.setattr(report.tempfile, "gettempdir", lambda: str(fallback))

    def remove_out(name, case):
        if case == "b":  # the rows of case a are written; those of case b cannot be
            shutil.rmtree(out)
            out.write_text("not a folder any more")

    during.append(remove_out)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--suite", "one", "--out", str(out)])
    (kept,) = fallback.glob("perceiver-benchmark-*-results.json")
    assert exit_info.value.code.endswith(f"the measurements are in {kept}")
    assert len(json.loads(kept.read_text())["results"]) == 4


def test_ctrl_c_keeps_what_was_measured_as_sigterm_does(tmp_path, fake_suites):
    calls, during = fake_suites

    def interrupt(name, case):
        if case == "b":
            raise KeyboardInterrupt

    during.append(interrupt)
    cli.main(["--suite", "one", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["environment"]["stopped"].startswith("stopped by Ctrl-C during case 2 of 2")
    assert [row["case"] for row in results["results"]] == ["one a", "one a"]


def test_a_suite_named_twice_runs_once_and_the_help_names_every_suite(tmp_path, capsys, fake_suites):
    calls, _ = fake_suites
    cli.main(["--suite", "one,two,one", "--out", str(tmp_path)])
    assert calls == ["one", "two"]
    assert "/4, " in capsys.readouterr().err  # the progress counts each case once


def test_the_usage_line_names_every_suite(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    usage = capsys.readouterr().out.split("\n\n")[0]
    assert f"[--suite {','.join(cli.SUITES)}]" in " ".join(usage.split())
    assert set(cli.SUITES) == {"op", "scaling", "model", "host"}


def test_progress_estimates_the_time_left_from_the_cases_done(capsys):
    now = [100.0]
    progress = cli.Progress(4, clock=lambda: now[0])
    progress("first")
    now[0] += 20.0
    progress("second")  # one case done in 20 s: three to go
    now[0] += 280.0
    progress("third")  # two done in 300 s: two to go
    text = " ".join(capsys.readouterr().err.split())
    assert "1/4, time left known after the first case: first" in text
    assert "2/4, about 60 s left: second" in text and "3/4, about 5 min left: third" in text


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
    assert "| s | forward | perceiver_kernels | 1.000 | - | 2.000 | - | 50 | - | - |" in table  # no baseline ran


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
    hf_model = model_suite.build_models(small)[0]["hf_transformers"]
    assert counted(lambda: hf_model(inputs=torch.randn(2, 3, 8, 8))) == model_suite.model_flops(small)


def test_providers_named_in_bench_skip_providers_are_left_out(monkeypatch):
    cpu = torch.device("cpu")
    assert "naive" in op_suite.providers(cpu)
    monkeypatch.setenv("BENCH_SKIP_PROVIDERS", "naive, sdpa")
    assert set(op_suite.providers(cpu)) == {"perceiver_kernels"}


def test_bench_op_cases_keeps_the_cases_it_names_and_refuses_unknown_names(monkeypatch):
    cuda = torch.device("cuda")  # cases() only plans: no GPU needed
    monkeypatch.setenv("BENCH_OP_CASES", "IMG-261, ENC-3")
    assert [(shape.name, backward) for shape, backward in op_suite.cases(cuda, "full")] == [
        ("ENC-3", False), ("IMG-261", False), ("ENC-3", True), ("IMG-261", True)]
    monkeypatch.setenv("BENCH_OP_CASES", "IMG-261,ENC-7")
    with pytest.raises(ValueError, match="ENC-7"):
        op_suite.cases(cuda, "full")


def test_gpu_cases_cover_every_anchor_and_the_sweeps_at_full_size():
    cuda = torch.device("cuda")  # cases() only plans: no GPU needed
    full = op_suite.cases(cuda, "full")
    names = {shape.name for shape, _ in full}
    assert {shape.name for shape in op_suite.GPU_SHAPES} <= names
    assert {"ENC-4", "ENC M=1048576", "DEC O=1048576"} <= names
    assert {shape.name for shape, backward in full if backward} == set(op_suite.BACKWARD_GPU)
    assert {shape.name for shape, _ in op_suite.cases(cuda, "quick")} == set(op_suite.QUICK_GPU)


def test_every_op_target_is_a_case_and_pass_a_full_gpu_run_measures():
    planned = {(shape.name, "forward+backward" if backward else "forward")
               for shape, backward in op_suite.cases(torch.device("cuda"), "full")}
    for target in targets.TARGETS:
        if target.suite == "op" and target.case != targets.EVERY_CASE:
            assert (target.case, target.pass_name) in planned, target
            if target.metric.startswith("vs "):
                assert (target.metric[3:], target.pass_name) in planned, target
    wide = {s.name: s for s in op_suite.GPU_SHAPES if s.name in op_suite.WIDE_GPU}
    assert sorted(s.head_dim for s in wide.values()) == [261, 322, 512] and all(s.heads == 1 for s in wide.values())


def test_a_residual_case_adds_the_residual_in_every_provider_and_counts_its_read(few_rounds, monkeypatch):
    shape = op_suite.Shape("tiny residual", 1, 2, 40, 8, 16, residual=True)
    cpu = torch.device("cpu")
    inputs = op_suite.make_inputs(shape, cpu, torch.float32)
    assert inputs["residual"].shape == inputs["q"].shape
    expected = pk.reference_attention(inputs["q"], inputs["k"], inputs["v"], residual=inputs["residual"],
                                      upcast=True).float()
    for name, provider in op_suite.providers(cpu).items():
        torch.testing.assert_close(provider(inputs), expected, rtol=1e-5, atol=1e-5, msg=name)
    plain = op_suite.Shape("tiny", 1, 2, 40, 8, 16)
    assert shape.min_bytes(4, False) - plain.min_bytes(4, False) == 1 * 2 * 40 * 16 * 4
    monkeypatch.setattr(op_suite, "CPU_SHAPES", [shape])
    monkeypatch.setattr(op_suite, "CPU_SWEEP", [])
    rows = op_suite.run_suite(cpu, "quick", {"matmul_tflops": 1.0, "copy_gbps": 10.0}, lambda message: None)
    assert {row["pass"] for row in rows} == {"forward", "forward+backward"}
    assert all(row["status"] == "ok" and row["residual"] for row in rows)


def test_providers_of_a_case_are_interleaved_in_rotating_order_and_refusals_reported():
    calls = []

    def provider(name):
        return lambda: calls.append(name)

    def refusing():
        raise RuntimeError("No available kernel.\nmore text")

    discipline = harness.Discipline(min_rounds=4, max_rounds=4, budget_s=10.0, target_ci=0.0)
    results = harness.measure_case({"a": provider("a"), "b": provider("b"), "c": provider("c"), "x": refusing},
                                   torch.device("cpu"), discipline)
    assert results["x"] == {"status": "unsupported: No available kernel."}
    rounds = calls[6:]  # each provider: a warm-up and a peak-memory call first
    # On the CPU each timed call follows an untimed one of the same provider.
    assert rounds[::2] == rounds[1::2] == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    for name in "abc":
        assert results[name]["status"] == "ok" and results[name]["samples"] == 4
        assert results[name]["ci_low_ms"] <= results[name]["median_ms"] <= results[name]["ci_high_ms"]


def test_median_interval_is_the_whole_range_for_few_samples_and_narrows_with_more():
    assert harness.median_interval([5.0, 1.0, 3.0]) == (1.0, 5.0)
    samples = [float(i) for i in range(100)]
    low, high = harness.median_interval(samples)
    assert (low, high) == (39.0, 60.0)  # ranks 40 and 61 of 100: the binomial 95% interval of the median
    timing = harness.Timing.of(samples)
    assert timing.median_ms == 49.5 and timing.samples == 100
    assert timing.spread_pct == pytest.approx(100 * (74.25 - 24.75) / 2 / 49.5)


def _timed_row(provider, median, low, high, case="c"):
    return {"suite": "op", "case": case, "pass": "forward", "provider": provider, "status": "ok",
            "median_ms": median, "ci_low_ms": low, "ci_high_ms": high}


def test_ratios_carry_intervals_and_a_noisy_flag_in_the_json_and_the_table():
    rows = [_timed_row("sdpa-a", 2.0, 1.98, 2.02), _timed_row("sdpa-b", 3.0, 2.9, 3.1),
            _timed_row("perceiver_kernels", 1.0, 0.99, 1.01), _timed_row("naive", 4.0, 2.0, 6.0)]
    report.annotate_ratios(rows)
    sdpa_a, sdpa_b, ours, naive = rows
    assert sdpa_a["speedup"] == 1.0 and sdpa_a["ratio_noisy"] is False and ours["baseline"] == "sdpa-a"
    assert ours["speedup"] == 2.0 and ours["speedup_low"] == pytest.approx(1.98 / 1.01)
    assert ours["ratio_noisy"] is False and naive["ratio_noisy"] is True
    table = summary_table(rows)
    assert "| 2.00x |" in table and "| 0.50x noisy |" in table


def test_masked_cases_pad_the_stated_fraction_of_every_batch_element():
    for batch in (1, 3):
        shape = op_suite.Shape("m", batch, 2, 4, 40, 8, pad_fraction=0.25)
        mask = op_suite.make_inputs(shape, torch.device("cpu"), torch.float32)["mask"]
        assert mask.shape == (batch, 40) and (mask.sum(dim=1) == 10).all() and mask[:, 30:].all()
    assert all(s.pad_fraction == op_suite.PAD_FRACTION == 0.25 for s in op_suite.GPU_SHAPES if s.masked)
    assert {s.name for s in op_suite.GPU_SHAPES if s.masked} == {"ENC-1 masked", "ENC-3 masked"}


def test_full_size_on_the_cpu_runs_larger_shapes():
    cpu = torch.device("cpu")
    largest = {size: max(s.num_keys * s.num_queries for s, _ in op_suite.cases(cpu, size)) for size in ("quick", "full")}
    assert largest["full"] > largest["quick"]
    assert max(scaling_suite.config_for(cpu, "full").sizes) > max(scaling_suite.config_for(cpu, "quick").sizes)
    assert model_suite.config_for(cpu, "full").image_size > model_suite.config_for(cpu, "quick").image_size


def test_commit_stamp_comes_only_from_the_projects_own_checkout(tmp_path, monkeypatch):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)  # an enclosing repository
    copy = tmp_path / "copy-without-git"
    copy.mkdir()
    monkeypatch.setattr(report, "PROJECT_ROOT", copy)
    monkeypatch.delenv("PERCEIVER_KERNELS_COMMIT", raising=False)
    assert report.project_commit() == ("unknown", None)
    monkeypatch.setenv("PERCEIVER_KERNELS_COMMIT", "f249052")
    assert report.project_commit() == ("f249052", None)
    monkeypatch.setattr(report, "PROJECT_ROOT", tmp_path)  # a checkout with its own .git: the caller still wins
    assert report.project_commit() == ("f249052", None)


def test_missing_comparison_packages_get_a_row_that_says_so(monkeypatch, few_rounds):
    monkeypatch.setitem(sys.modules, "perceiver_pytorch", None)  # import fails as when not installed
    monkeypatch.setattr(model_suite, "CPU_CONFIG", model_suite.ModelConfig(4, 4, 16, 1, 1, 2, batch=1, num_labels=3))
    monkeypatch.setattr(model_suite, "AR_CPU", TINY_AR)
    monkeypatch.setattr(model_suite, "FLOW_CPU", TINY_FLOW)
    rows = model_suite.run_suite(torch.device("cpu"), "quick", {}, lambda message: None)
    status = {(row["pass"], row["provider"]): row["status"] for row in rows}
    assert status[("inference", "perceiver_pytorch")] == "not installed: perceiver-pytorch"
    assert status[("training step", "perceiver_kernels")] == "ok"
    assert {row["status"] for row in rows if row["case"] == model_suite.flow_case(TINY_FLOW)} == {"ok"}


def test_cli_records_the_thread_setting_and_rejects_bad_arguments(tmp_path, monkeypatch, few_rounds):
    monkeypatch.setattr(op_suite, "CPU_SHAPES", [])
    monkeypatch.setattr(op_suite, "CPU_SWEEP", op_suite.sweep_shapes(1, 1, 4, (16,), 8))
    monkeypatch.setattr(harness, "ceilings", lambda device: {"matmul_tflops": 1.0, "matmul_dtype": "float32",
                                                             "copy_gbps": 10.0})
    threads = torch.get_num_threads()
    try:
        cli.main(["--suite", "op", "--threads", "2", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    env = json.loads((tmp_path / "results.json").read_text())["environment"]
    assert env["cpu_threads"] == 2 and env["timing"]["clock"] == "wall clock" and env["size"] == "quick"
    assert env["timing"]["steady_cpu_allocator"] == (sys.platform == "linux")  # glibc's mallopt took
    for bad in (["--threads", "0"], ["--device", "nonsense"]):
        with pytest.raises(SystemExit):
            cli.main(bad)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            cli.main(["--device", "cuda"])


def _op_row(case, pass_name, provider, median, peak=None, path=""):
    return {"suite": "op", "case": case, "pass": pass_name, "provider": provider, "status": "ok",
            "median_ms": median, "peak_mib": peak, "path": path}


def test_target_rows_name_the_provider_measured_and_the_baseline_of_their_speedup():
    """The rewrites' targets read the untimed row, or the timed row that stands for it;
    the wide heads' speed-ups over plain PyTorch read the naive row."""
    rows = [_op_row("IMG-261", "forward", provider, median)
            for provider, median in (("sdpa-math", 3.0), ("naive", 2.5), ("perceiver_kernels[triton]", 2.0))]
    report.annotate_ratios(rows)
    lines = [line for line in targets.table(targets.evaluate(rows)).splitlines() if "| IMG-261 | forward |" in line]
    standing_in = "perceiver_kernels[triton untimed] (its perceiver_kernels[triton] row)"
    assert lines == [
        f"| 25 | IMG-261 | forward | {standing_in} | speedup (naive) | 1.25x | >= 5.00x | FAIL |",
        f"| 25 | IMG-261 | forward | {standing_in} | speedup (sdpa-math) | 1.50x | >= 9.00x | FAIL |"]
    rows.append(_op_row("IMG-261", "forward", "perceiver_kernels[triton untimed]", 0.25))
    report.annotate_ratios(rows)
    lines = [line for line in targets.table(targets.evaluate(rows)).splitlines() if "| IMG-261 | forward |" in line]
    assert lines[0] == ("| 25 | IMG-261 | forward | perceiver_kernels[triton untimed] | speedup (naive) | 10.00x | "
                        ">= 5.00x | PASS |")


def test_the_every_case_target_reports_the_worst_case_of_auto():
    rows = [_op_row(case, "forward", provider, median) for case, provider, median in (
        ("ENC-1", "sdpa-cudnn_attention", 1.0), ("ENC-1", "perceiver_kernels", 0.99),
        ("DEC-1", "sdpa-cudnn_attention", 1.0), ("DEC-1", "perceiver_kernels", 1.05))]
    report.annotate_ratios(rows)
    (result,) = [r for r in targets.evaluate(rows) if r.target.case == targets.EVERY_CASE
                 and r.target.pass_name == "forward"]
    assert result.status == "FAIL" and result.measured == pytest.approx(1 / 1.05)
    assert result.against.startswith("worst: DEC-1") and "2 cases" in result.against


def test_targets_pass_fail_and_say_what_was_not_measured():
    rows = [
        _op_row("ENC-1", "forward", "sdpa-cudnn_attention", 1.0),
        _op_row("ENC-1", "forward", "perceiver_kernels[triton]", 0.8, path="triton (split-KV)"),
        _op_row("ENC-1 masked", "forward", "perceiver_kernels[triton]", 0.85),
        _op_row("ENC-3", "forward", "sdpa-flash_attention", 1.0),
        _op_row("ENC-3", "forward", "perceiver_kernels", 0.5, path="triton (split-KV)"),  # an auto row that ran Triton
        _op_row("DEC-1", "forward+backward", "sdpa-cudnn_attention", 3.0, peak=1600.0),
        _op_row("DEC-1", "forward+backward", "perceiver_kernels[triton]", 6.0, peak=2768.0),
    ]
    report.annotate_ratios(rows)
    results = {(r.target.case, r.target.pass_name, r.target.metric): r for r in targets.evaluate(rows)}
    enc1 = results[("ENC-1", "forward", "speedup")]
    assert (enc1.status, enc1.measured, enc1.against) == ("PASS", pytest.approx(1.25), "sdpa-cudnn_attention")
    assert results[("ENC-3", "forward", "speedup")].status == "PASS"  # 2.0x >= 1.6x through the auto row
    masked = results[("ENC-1 masked", "forward", "vs ENC-1")]
    assert masked.status == "PASS" and masked.measured == pytest.approx(0.8 / 0.85)
    peak = results[("DEC-1", "forward+backward", "peak ratio")]
    assert peak.status == "FAIL" and peak.measured == pytest.approx(2768 / 1600)
    assert results[("ENC-2", "forward", "speedup")].status == "not measured"
    text = targets.table(targets.evaluate(rows))
    assert ("| 24 | ENC-1 | forward | perceiver_kernels[triton untimed] (its perceiver_kernels[triton] row) | "
            "speedup (sdpa-cudnn_attention) | 1.25x | >= 1.00x | PASS |") in text
    assert ("| 24 | ENC-3 | forward | perceiver_kernels[triton untimed] (its perceiver_kernels row) "
            "| speedup (sdpa-flash_attention) | 2.00x | >= 1.60x | PASS |") in text
    assert ("| 26 | DEC-1 | forward+backward | perceiver_kernels[triton untimed] (its perceiver_kernels[triton] row) "
            "| peak ratio (sdpa-cudnn_attention) | 1.73x | <= 1.00x | FAIL |") in text
    assert "4 of 6 measured targets pass" in text  # the four above and auto on every case (ENC-3: 2.0x)


REPO = Path(__file__).resolve().parent.parent
H200_RECORD = REPO / "benchmarks" / "results" / "2026-11-30-h200"


def test_gpu_run_plan_keeps_at_most_8_files_and_prints_the_targets_last(tmp_path):
    out = tmp_path / "out"
    (out / "bench").mkdir(parents=True)
    # What the GPU steps would leave: the committed H200 run's results and test logs.
    for name in ("results.json", "report.md", "op.png"):
        shutil.copy(H200_RECORD / name, out / "bench" / name)
    (out / "bench" / "sweep.png").write_bytes(b"png")
    (out / "tests-cuda.log").write_text("....\n294 passed in 27.33s\n")
    (out / "tests-triton.log").write_text(
        "[gw2] [ 50%] FAILED tests/test_triton_forward.py::test_verbose[1]\n"  # named before the summary
        "FAILED tests/test_triton_forward.py::test_plain[40x24] - AssertionError\n"
        "FAILED tests/test_triton_gpu.py::test_grid[3] - worker 'gw1' crashed while running 'x'\n"
        "3 failed, 402 passed, 5 skipped, 33 warnings in 69.86s (0:01:09)\n")
    (out / "bench.log").write_text("table\n")
    run = subprocess.run(["bash", "benchmarks/gpu_run.sh", str(out)], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "DRY_RUN": "1"}, timeout=120)
    assert run.returncode == 0, run.stderr
    steps = [line.split(" (")[0] for line in run.stdout.splitlines() if line.startswith("== ")]
    assert sorted(steps) == ["== bench", "== cuda-tests", "== install", "== repro", "== repro-kernels",
                             "== triton-tests"]
    assert "-p benchmarks.pytest_fault_isolation" in run.stdout and "--max-worker-restart" in run.stdout
    files = {path.name for path in out.iterdir()}
    assert files == {"summary.md", "results.json", "report.md", "op.png", "tests-cuda.log", "tests-triton.log",
                     "bench.log", "logs.tar.gz"}
    with tarfile.open(out / "logs.tar.gz") as archive:
        assert {"bench/sweep.png", "steps.tsv"} <= set(archive.getnames())
    summary = (out / "summary.md").read_text()
    assert run.stdout.rstrip().endswith(summary.rstrip())
    from benchmarks import targets

    rows = json.loads((H200_RECORD / "results.json").read_text())["results"]
    report.annotate_ratios(rows)
    results = targets.evaluate(rows)
    passed, measured = (sum(r.status == "PASS" for r in results), sum(r.measured is not None for r in results))
    assert measured > 10
    assert summary.rstrip().endswith(
        f"{passed} of {measured} measured targets pass ({len(targets.TARGETS)} targets in all).")
    assert "294 passed" in summary and "tests/test_triton_forward.py::test_plain[40x24]" in summary
    assert "tests/test_triton_forward.py::test_verbose[1]" in summary
    assert "| op | ENC-1 | forward | perceiver_kernels | 0.993 | sdpa-cudnn_attention | 0.504 | 0.51x |" in summary


def test_the_output_folders_the_docs_name_are_ignored_by_git():
    """gpu-out/ is what the README's gpu_run.sh commands write, bench-out/ and examples/out/
    the defaults of the benchmark and the examples."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    for path in ("gpu-out/summary.md", "bench-out/20261201-120000/results.json", "examples/out/digits/curve.png"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO).returncode == 0, path


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_gpu_run_without_a_gpu_fails_fast_and_says_why(tmp_path):
    run = subprocess.run(["bash", "benchmarks/gpu_run.sh", str(tmp_path)], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 2 and "no CUDA GPU here" in run.stderr


FAULTING_TESTS = '''
import os

import pytest


def test_fault():
    os.environ["SIMULATED_FAULT"] = "1"  # as a sticky CUDA error: every later test in this process fails
    assert False, "the kernel faulted"


@pytest.mark.parametrize("i", range(8))
def test_after(i):
    assert "SIMULATED_FAULT" not in os.environ
'''
SIMULATED_CHECK = '''
import os

from benchmarks import pytest_fault_isolation

pytest_fault_isolation.CHECKS.append(lambda: "simulated illegal memory access" if os.environ.get("SIMULATED_FAULT") else "")
'''


def _run_pytest(folder, *args):
    # Without the installed plugins a pytest process starts in well under a second. The
    # variables of an xdist worker running this test must not make the inner run think it
    # is one.
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_XDIST")}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-p", "benchmarks.pytest_fault_isolation", *args, str(folder)],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**env, "PYTHONPATH": str(REPO), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})


def test_a_fault_ends_only_its_worker_and_the_tests_after_it_still_pass(tmp_path):
    pytest.importorskip("xdist")
    (tmp_path / "conftest.py").write_text(SIMULATED_CHECK)
    (tmp_path / "test_faulting.py").write_text(FAULTING_TESTS)
    run = _run_pytest(tmp_path, "-p", "xdist", "-n", "2", "--max-worker-restart", "4")
    # The node id carries the folder's path relative to the rootdir from pytest 9.2 on.
    assert "8 passed" in run.stdout and re.search(r"crashed while running '[^']*test_faulting.py::test_fault'",
                                                  run.stdout)
    assert "test_after" not in run.stdout.split("short test summary info")[-1]


def test_without_xdist_a_fault_stops_the_run_and_says_why(tmp_path):
    (tmp_path / "conftest.py").write_text(SIMULATED_CHECK)
    (tmp_path / "test_faulting.py").write_text(FAULTING_TESTS)
    run = _run_pytest(tmp_path)
    assert "1 failed" in run.stdout and "left the process unusable (simulated illegal memory access)" in run.stdout


def test_speedups_are_paired_round_by_round_so_load_shared_by_a_round_cancels():
    load = [1.0, 3.0] * 10  # every other round the machine is three times slower for both
    base = {**_timed_row("sdpa", 4.0, 2.0, 6.0), "samples_ms": [2.0 * x for x in load]}
    ours = {**_timed_row("perceiver_kernels", 2.0, 1.0, 3.0), "samples_ms": [1.0 * x for x in load]}
    report.annotate_ratios([base, ours])
    assert ours["speedup"] == ours["speedup_low"] == ours["speedup_high"] == 2.0 and not ours["ratio_noisy"]
    jumpy = {**ours, "samples_ms": [3.0, 1.0] * 10, "provider": "naive"}  # load out of step with the baseline's
    report.annotate_ratios([base, jumpy])
    assert jumpy["ratio_noisy"]


def test_compare_counts_unflagged_ratios_outside_the_tolerance(tmp_path):
    def run(path, ours, naive_noisy_ms):
        rows = [_timed_row("sdpa", 2.0, 1.99, 2.01), _timed_row("perceiver_kernels", ours, ours - 0.01, ours + 0.01),
                _timed_row("naive", 4.0, 4.0 - naive_noisy_ms, 4.0 + naive_noisy_ms)]
        path.write_text(json.dumps({"environment": {}, "results": rows}))
        return path

    a = run(tmp_path / "a.json", 1.0, 2.0)
    table, outside = compare.compare(a, run(tmp_path / "b.json", 1.05, 1.0), 0.10)
    assert outside == 0 and "1 of 1 counted ratios agree within 10% (1 flagged noisy in either run)." in table
    _, outside = compare.compare(a, run(tmp_path / "c.json", 1.25, 1.0), 0.10)
    assert outside == 1


def _run_folder(folder, rows, **environment):
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps({"environment": environment, "results": rows}))
    return folder


def test_compare_takes_run_folders_and_names_the_rows_one_run_lacks(tmp_path, capsys):
    full = [_timed_row("sdpa", 2.0, 1.99, 2.01, case=case) for case in ("c", "d", "e")] + [
        _timed_row("perceiver_kernels", 1.0, 0.99, 1.01, case=case) for case in ("c", "d", "e")]
    a = _run_folder(tmp_path / "A", full)
    b_rows = [row for row in full if row["case"] != "e"] + [_timed_row("naive", 4.0, 3.99, 4.01)]
    b_rows[-2] = {**b_rows[-2], "status": "out of memory"}  # ours on d
    stopped = "stopped by signal SIGTERM during case 3 of 3: the rows are what it measured before"
    b = _run_folder(tmp_path / "B", b_rows, stopped=stopped)
    with pytest.raises(SystemExit) as exit_info:
        compare.main([str(a), str(b)])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "| op | c | forward | perceiver_kernels | 2.00x | 2.00x | +0.0% | yes |" in out
    assert f"Run B ({b}) is incomplete: {stopped}." in out
    assert ("Rows of run A that run B lacks (2; run B did not finish):\n- op | e | forward | sdpa\n"
            "- op | e | forward | perceiver_kernels") in out
    assert "Rows of run B that run A lacks (1):\n- op | c | forward | naive" in out
    assert ("Rows with a ratio in one run only (1):\n"
            "- op | d | forward | perceiver_kernels (run A: 2.00x, run B: out of memory)") in out
    table, _ = compare.compare(a / "results.json", b / "results.json", 0.10)  # the files themselves, as before
    assert table == out.rstrip("\n").replace(f"({b})", f"({b / 'results.json'})")


@pytest.mark.parametrize("make, reason", [
    (lambda tmp: tmp / "missing", "'{}' does not exist (give a run folder of python -m benchmarks or its "
                                  "results.json)"),
    (lambda tmp: tmp, "the folder '{}' has no results.json"),
    (lambda tmp: (tmp / "x.json").write_text("{") and tmp / "x.json", "'{}' is not a readable results.json"),
    (lambda tmp: (tmp / "x.json").write_text("[]") and tmp / "x.json", "'{}' is not a results.json of python -m"),
])
def test_compare_and_targets_refuse_what_is_not_a_run_in_one_line(tmp_path, capsys, make, reason):
    bad = make(tmp_path)
    good = _run_folder(tmp_path / "good", [_timed_row("sdpa", 2.0, 1.99, 2.01)])
    for main, argv in ((compare.main, [str(good), str(bad)]), (targets.main, [str(bad)])):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "Traceback" not in err
        (line,) = [line for line in err.splitlines() if "error:" in line]
        assert reason.format(bad) in line


def test_host_suite_times_dispatch_per_call_and_checks_its_target(few_rounds):
    from benchmarks import host_suite, report, targets

    rows = host_suite.run_suite(torch.device("cpu"), "quick", {}, lambda message: None)
    dispatch = [row for row in rows if row["case"] == "dispatch"]
    assert {row["provider"] for row in dispatch} == {"perceiver_kernels", "perceiver_kernels[torch]"}
    assert all(row["status"] == "ok" and 0 < row["us_per_call"] < 1e4 for row in dispatch)
    (launch_path,) = [row for row in rows if row["case"] == host_suite.LAUNCH_PATH]
    assert launch_path["status"] == "ok" and dispatch[0]["us_per_call"] < launch_path["us_per_call"] < 1e4
    from perceiver_kernels.triton import configs

    assert not any(isinstance(getattr(module, name), host_suite._NoLaunch) for name, module in configs.MODULES.items())
    report.annotate_ratios(rows)
    (result,) = [r for r in targets.evaluate(rows) if r.target.suite == "host" and r.measured is not None]
    assert result.target.case == "dispatch" and result.status in ("PASS", "FAIL")
    assert "us" in targets.table([result])


def test_causal_shapes_produce_rows_with_the_visible_flops_and_every_provider_masks_bottom_right(few_rounds,
                                                                                               monkeypatch):
    pair = op_suite.causal_pair("tiny AR", 1, 2, 8, 32, 16)
    assert [shape.causal for shape in pair] == [False, True] and pair[1].name == "tiny AR causal"
    cpu = torch.device("cpu")
    inputs = op_suite.make_inputs(pair[1], cpu, torch.float32)
    expected = pk.reference_attention(inputs["q"], inputs["k"], inputs["v"], causal=True, upcast=True).float()
    for name, provider in op_suite.providers(cpu).items():
        torch.testing.assert_close(provider(inputs), expected, rtol=1e-5, atol=1e-5, msg=name)
    monkeypatch.setattr(op_suite, "CPU_SHAPES", pair)
    monkeypatch.setattr(op_suite, "CPU_SWEEP", [])
    rows = op_suite.run_suite(cpu, "quick", {"matmul_tflops": 1.0, "copy_gbps": 10.0}, lambda message: None)
    assert {(row["case"], row["pass"], row["provider"]) for row in rows} == {
        (case, pass_name, provider) for case in ("tiny AR", "tiny AR causal")
        for pass_name in ("forward", "forward+backward") for provider in ("perceiver_kernels", "naive", "sdpa")}
    assert all(row["status"] == "ok" and row["causal"] == row["case"].endswith("causal") for row in rows)
    flops_of = {(row["case"], row["pass"]): row["flops"] for row in rows}
    visible = 8 * (32 - 8) + 8 * 9 // 2  # the last 8 x 8 block keeps its lower triangle
    assert flops_of[("tiny AR causal", "forward")] == 4 * 2 * visible * 16
    assert flops_of[("tiny AR", "forward")] == 4 * 2 * 8 * 32 * 16


@pytest.mark.parametrize("queries, keys", [(8, 32), (16, 16), (20, 12), (1, 5)])
def test_visible_pairs_count_what_the_causal_mask_leaves(queries, keys):
    from perceiver_kernels.reference import causal_hidden

    shape = op_suite.Shape("s", 1, 1, queries, keys, 8, causal=True)
    assert shape.visible_pairs == int((~causal_hidden(queries, keys, "cpu")).sum())


def test_a_causal_shape_with_key_padding_is_refused():
    with pytest.raises(ValueError, match="causal"):
        op_suite.Shape("s", 1, 1, 8, 32, 8, pad_fraction=0.25, causal=True)


def test_gpu_runs_measure_the_perceiver_ar_pairs_forward_and_backward():
    cuda = torch.device("cuda")  # cases() only plans: no GPU needed
    for size in ("quick", "full"):
        planned = {(shape.name, backward) for shape, backward in op_suite.cases(cuda, size)}
        for name in ("AR-8k", "AR-8k causal", "AR-1k self", "AR-1k self causal"):
            assert {(name, False), (name, True)} <= planned
    assert {("AR-64k causal", False), ("AR-64k causal", True)} <= {
        (shape.name, backward) for shape, backward in op_suite.cases(cuda, "full")}
    for target in targets.TARGETS:
        if target.issue == 17 and target.suite == "op":
            assert (target.case, target.pass_name == "forward+backward") in {
                (shape.name, backward) for shape, backward in op_suite.cases(cuda, "full")}
            if target.metric.startswith("vs "):
                assert target.metric[3:] + " causal" == target.case


def test_causal_targets_take_only_sdpa_backends_that_accept_the_mask_and_compare_with_the_unmasked_shape():
    rows = [
        {**_op_row("AR-8k causal", "forward", "sdpa-flash_attention", None), "status": "unsupported: no causal bias"},
        _op_row("AR-8k causal", "forward", "sdpa-efficient_attention", 2.0),
        _op_row("AR-8k causal", "forward", "perceiver_kernels[triton]", 0.8),
        _op_row("AR-8k", "forward", "perceiver_kernels[triton]", 0.9),
        _op_row("AR-1k self causal", "forward", "perceiver_kernels[triton]", 0.7),
        _op_row("AR-1k self", "forward", "perceiver_kernels[triton]", 1.0),
    ]
    report.annotate_ratios(rows)
    results = {(r.target.case, r.target.pass_name, r.target.metric): r for r in targets.evaluate(rows)}
    speedup = results[("AR-8k causal", "forward", "speedup")]
    assert (speedup.status, speedup.measured, speedup.against) == ("PASS", 2.5, "sdpa-efficient_attention")


def test_plain_pytorch_perceiver_ar_gives_the_loss_and_gradients_of_perceiver_ar():
    torch.manual_seed(0)
    ours, plain = model_suite.build_perceiver_ar(TINY_AR)
    windows = torch.randint(0, TINY_AR.vocab_size, (3, TINY_AR.seq_len + 1))
    loss, plain_loss = (model_suite.perceiver_ar_loss(model, windows, TINY_AR.num_latents) for model in (ours, plain))
    torch.testing.assert_close(plain_loss, loss, rtol=1e-6, atol=1e-6)
    loss.backward()
    plain_loss.backward()
    plain_parameters = dict(plain.named_parameters())
    assert set(plain_parameters) == {name for name, _ in ours.named_parameters()}
    for name, parameter in ours.named_parameters():
        torch.testing.assert_close(plain_parameters[name].grad, parameter.grad, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():  # a changed weight changes both: the twin reads every parameter
        ours.layers[0].attention.key.weight.add_(0.5)
    plain.load_state_dict(ours.state_dict())
    changed = model_suite.perceiver_ar_loss(ours, windows, TINY_AR.num_latents)
    assert changed != loss
    torch.testing.assert_close(model_suite.perceiver_ar_loss(plain, windows, TINY_AR.num_latents), changed)


def test_perceiver_ar_flops_count_the_visible_attention_and_every_dense_layer():
    config = TINY_AR
    _, plain = model_suite.build_perceiver_ar(config)
    tokens = torch.randint(0, config.vocab_size, (config.batch, config.seq_len))
    # Counted on the plain twin (SDPA's causal bias cannot be created under
    # FlopCounterMode in torch 2.13), whose explicit matmuls compute the full score
    # matrices; the analytic count has only the pairs the causal masks leave visible.
    n, length, head_dim = config.num_latents, config.seq_len, config.dim // config.num_heads
    hidden_pairs = (1 + config.num_layers) * n * (n - 1) // 2
    hidden_flops = flops.attention(config.batch, config.num_heads, 1, hidden_pairs, head_dim)
    assert counted(lambda: plain(tokens)) == model_suite.perceiver_ar_flops(config) + hidden_flops


def test_model_suite_times_perceiver_ar_training_against_plain_pytorch_and_generation_against_no_cache(
        few_rounds, monkeypatch):
    monkeypatch.setattr(model_suite, "AR_CPU", TINY_AR)
    rows = model_suite.perceiver_ar_rows(torch.device("cpu"), "quick", lambda message: None)
    report.annotate_ratios(rows)
    by_pass = {(row["pass"], row["provider"]): row for row in rows}
    assert set(by_pass) == {("training step", "perceiver_kernels"), ("training step", "plain_pytorch"),
                            ("generation", "perceiver_kernels"), ("generation", "perceiver_kernels, no cache")}
    assert all(row["status"] == "ok" and row["case"] == "Perceiver AR L=24 N=6" for row in rows)
    assert by_pass[("training step", "perceiver_kernels")]["baseline"] == "plain_pytorch"
    assert by_pass[("generation", "perceiver_kernels")]["baseline"] == "perceiver_kernels, no cache"
    assert by_pass[("generation", "perceiver_kernels")]["ms_per_token"] > 0
    assert model_suite.cases(torch.device("cpu"), "quick")[-2:] == list(model_suite.AR_PASSES)


@pytest.fixture
def decoded_chunks(monkeypatch):
    """The chunk_size each call of a PerceiverDecoder got, and the queries of each chunk it decoded."""
    seen = {"chunk_size": [], "queries": []}
    decoder_forward = perceiver.PerceiverDecoder.forward
    layer_forward_projected = perceiver.PerceiverLayer.forward_projected

    def forward(self, latents, queries, index=None, chunk_size=None):
        seen["chunk_size"].append(chunk_size)
        return decoder_forward(self, latents, queries, index=index, chunk_size=chunk_size)

    def forward_projected(self, queries, *args, **kwargs):
        seen["queries"].append(queries.shape[1])
        return layer_forward_projected(self, queries, *args, **kwargs)

    monkeypatch.setattr(perceiver.PerceiverDecoder, "forward", forward)
    monkeypatch.setattr(perceiver.PerceiverLayer, "forward_projected", forward_projected)
    return seen


def test_converted_optical_flow_model_gives_hfs_flow_decoding_in_chunks(decoded_chunks):
    torch.manual_seed(0)
    models, missing = model_suite.build_flow_models(TINY_FLOW)
    assert not missing
    frames = model_suite.flow_inputs(TINY_FLOW, torch.device("cpu"))
    assert frames.shape == (1, 2, 27, 4, 6)  # two frames of 3x3 patches of RGB pixels
    with torch.no_grad():
        ours, hf = (model_suite.flow_call(frames, TINY_FLOW.chunk_size, name, models[name].eval())
                    for name in ("perceiver_kernels", "hf_transformers"))
    assert hf.shape == ours.shape == (1, 4, 6, 2)
    torch.testing.assert_close(ours, hf, rtol=1e-4, atol=1e-4 * hf.abs().max().item())  # flows are / 100
    assert decoded_chunks == {"chunk_size": [10], "queries": [10, 10, 4]}
    for name, model in models.items():  # counted with grad: FlopCounterMode's module tracker needs it
        call = functools.partial(model_suite.flow_call, frames, TINY_FLOW.chunk_size, name, model)
        assert counted(call) == model_suite.flow_flops(TINY_FLOW, stored_heads=name == "perceiver_kernels"), name


def test_model_suite_times_optical_flow_against_hf_with_the_chunked_decode(few_rounds, monkeypatch, decoded_chunks):
    assert targets.FLOW_CASE == model_suite.flow_case(model_suite.FLOW_GPU)  # the target names the GPU case
    assert model_suite.FLOW_GPU.height * model_suite.FLOW_GPU.width == 182_528
    assert model_suite.FLOW_PASS in model_suite.cases(torch.device("cpu"), "quick")
    cpu = torch.device("cpu")
    assert model_suite.flow_config_for(cpu, "quick") == model_suite.FLOW_CPU
    assert model_suite.flow_config_for(cpu, "full").height > model_suite.FLOW_CPU.height
    monkeypatch.setattr(model_suite, "FLOW_CPU", TINY_FLOW)
    rows = model_suite.flow_rows(cpu, "quick", lambda message: None)
    report.annotate_ratios(rows)
    assert [row["provider"] for row in rows] == ["perceiver_kernels", "hf_transformers"]
    for row in rows:
        assert row["status"] == "ok" and row["suite"] == "model" and row["pass"] == "inference", row
        assert (row["case"], row["queries"], row["chunk_size"]) == ("4x6 optical flow", 24, 10)
        assert row["flops"] == model_suite.flow_flops(TINY_FLOW) and row["peak_mib"] is not None
        assert row["baseline"] == "hf_transformers"
    # Every call of ours (warm-up, peak memory and the timed rounds) decoded in chunks.
    assert decoded_chunks["chunk_size"] and set(decoded_chunks["chunk_size"]) == {10}
    assert set(decoded_chunks["queries"]) == {10, 4}
    # The same rows at the GPU's case name meet the flow targets: speed-up and peak ratio against HF.
    at_gpu_case = [{**row, "case": targets.FLOW_CASE, "peak_mib": peak}
                   for row, peak in zip(rows, (100.0, 400.0), strict=True)]
    found = {result.target.metric: result for result in targets.evaluate(at_gpu_case)
             if result.target.case == targets.FLOW_CASE}
    assert found["speedup"].measured == rows[0]["speedup"] and found["speedup"].status in ("PASS", "FAIL")
    assert found["speedup"].target.threshold == 5.0 and found["speedup"].against == "hf_transformers"


def test_ab_run_plan_times_the_untimed_rewrites_and_prints_their_counters_last(tmp_path):
    """ab_run.sh (DRY_RUN): its steps, at most 8 files, the A/B table (timed against
    untimed against the best SDPA backend) and the ncu table at the end of its output."""
    out = tmp_path / "out"
    (out / "bench").mkdir(parents=True)
    rows = [dict(suite="op", case="DEC-1", provider=provider, status="ok", median_ms=ms, samples_ms=[ms] * 5,
                 path=path, **{"pass": "forward"})
            for provider, ms, path in (("perceiver_kernels[triton]", 0.76, "triton (one program per tile)"),
                                       ("perceiver_kernels[triton untimed]", 0.38, "triton (persistent DECODE)"),
                                       ("sdpa-cudnn_attention", 0.585, ""))]
    environment = dict(device="H200", commit="abc", torch="2.11", triton="3.6", command="x", date="today")
    (out / "bench" / "results.json").write_text(json.dumps({"environment": environment, "results": rows}))
    (out / "ncu").mkdir()
    (out / "ncu" / "DEC-1-untimed.csv").write_text(
        '"ID","Kernel Name","gpu__time_duration.sum","dram__throughput.avg.pct_of_peak_sustained_elapsed",'
        '"sm__throughput.avg.pct_of_peak_sustained_elapsed",'
        '"smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio"\n'
        '"","","usecond","%","%","ratio"\n"0","decode_fwd_kernel(ptr)","380.5","81.0","40.0","3.2"\n')
    run = subprocess.run(["bash", "benchmarks/ab_run.sh", str(out)], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "DRY_RUN": "1"}, timeout=120)
    assert run.returncode == 0, run.stderr
    steps = [line.split(" (")[0] for line in run.stdout.splitlines() if line.startswith("== ")]
    assert steps[:3] == ["== install", "== tests", "== bench"] and all(s.startswith("== ncu") for s in steps[3:])
    assert len({path.name for path in out.iterdir()}) <= 8
    summary = (out / "summary.md").read_text()
    assert "| DEC-1 | forward | 0.760 | 0.380 | 2.00x | sdpa-cudnn_attention | 0.585 | 1.54x" in summary
    assert "Targets" not in summary  # the full run's tables stay out of the short one
    assert run.stdout.rstrip().splitlines()[-1].startswith("| DEC-1-untimed | decode_fwd_kernel | 380.5 | 81.0")
    assert "long_scoreboard 3.20" in run.stdout
