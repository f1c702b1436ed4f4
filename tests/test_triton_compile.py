"""The Triton kernels compile for NVIDIA GPUs and fit them: checked without a GPU.

The interpreter runs the kernels' arithmetic but never their compiler. Here every
launch the launchers make (each dtype and head-dim pair, narrow and wide, ENCODE and
DECODE, forward and backward) is compiled to SASS for sm_80 and sm_90 by
tests/triton_compile.py in a subprocess (it needs TRITON_INTERPRET unset), with the
config each launch takes from perceiver_kernels/triton/configs.py (the measured table
and its heuristic, chosen for each target's shared memory) and with every config
autotuning would try on the anchor.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import HAS_GPU
from tests.triton_compile import (ALIGNED_WIDE_HEAD_DIMS, HEAD_DIMS, MISSING_INTERNALS_EXIT, SHARED_MEMORY_LIMIT,
                                  SUITES, WIDE_HEAD_DIMS)

pytestmark = pytest.mark.skipif(HAS_GPU, reason="on a GPU the kernel tests compile every kernel for real")

ROOT = Path(__file__).resolve().parent.parent
KERNELS = {"attention_fwd_kernel", "attention_fwd_split_kernel", "merge_splits_kernel", "attention_bwd_delta_kernel",
           "attention_bwd_dkdv_kernel", "attention_bwd_dq_kernel"}
NO_DOTS = {"merge_splits_kernel", "attention_bwd_delta_kernel", "attention_bwd_wide_delta_kernel"}
# Head dims above 256: the wide kernels (Delta sums a Dv above 256 in chunks).
WIDE_KERNELS = {"attention_fwd_wide_kernel", "attention_fwd_wide_split_kernel", "merge_splits_kernel",
                "attention_bwd_wide_dkdv_kernel", "attention_bwd_wide_dq_kernel"}
WIDE_DTYPES = ("bfloat16", "float32")


def _run_compile_check(shards: int = 2) -> list[dict]:
    """Records of `python -m tests.triton_compile` (every suite), in `shards` processes at once."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    processes = [subprocess.Popen([sys.executable, "-m", "tests.triton_compile", "--shard", f"{i}/{shards}"],
                                  cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i in range(shards)]
    records, skip = [], None
    for process in processes:
        out, err = process.communicate(timeout=1800)
        if process.returncode == MISSING_INTERNALS_EXIT:
            skip = err.strip().splitlines()[-1]
            continue
        assert process.returncode == 0, err[-4000:]
        records += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    if skip:
        pytest.skip(skip)
    return records


@pytest.fixture(scope="module")
def all_builds():
    """Every compile of every suite, each launch class compiled once (tests/triton_compile.py)."""
    return _run_compile_check()


def suite(records: list[dict], name: str) -> list[dict]:
    return [r for r in records if name in r["suites"]]


def of_case(record: dict, prefix: str) -> bool:
    """Whether a record serves a case whose label starts with `prefix` ("dtype Dqk/Dv ...")."""
    return any(label.startswith(prefix) for label in record["problems"])


def label(record: dict) -> str:
    return f"{record['problems'][0]} (+{len(record['problems']) - 1} cases) {record['kernel']} sm_{record['arch']} " \
           f"{record['config']}"


def failures(records: list[dict]) -> list[str]:
    return [f"{label(r)}: {r['error'][:600]}" for r in records if r["error"]]


@pytest.fixture(scope="module")
def table_config_builds(all_builds):
    return suite(all_builds, "table")


@pytest.fixture(scope="module")
def causal_builds(all_builds):
    return suite(all_builds, "causal")


@pytest.fixture(scope="module")
def wide_builds(all_builds):
    return suite(all_builds, "wide") + [r for r in suite(all_builds, "wide-causal") if "wide" not in r["suites"]]


@pytest.fixture(scope="module")
def tuned_anchor_builds(all_builds):
    return suite(all_builds, "tuned")


def test_every_launch_compiles_for_sm80_and_sm90_with_its_table_config(table_config_builds):
    assert not failures(table_config_builds), "\n".join(failures(table_config_builds))
    for dtype in SUITES["table"].dtypes:
        for dqk, dv in HEAD_DIMS:
            for arch in SHARED_MEMORY_LIMIT:
                built = {r["kernel"] for r in table_config_builds if of_case(r, f"{dtype} {dqk}/{dv} ")
                         and r["arch"] == arch}
                assert built == KERNELS, (dtype, dqk, dv, arch)


def test_the_table_configs_fit_the_shared_memory_of_every_target(table_config_builds):
    too_big = [f"{label(r)}: {r['shared_bytes']} bytes"
               for r in table_config_builds if not r["error"] and r["shared_bytes"] > SHARED_MEMORY_LIMIT[r["arch"]]]
    assert not too_big, "\n".join(too_big)


def test_on_hopper_16_bit_dots_are_wgmma_and_nothing_spills(table_config_builds):
    """sm_90: every 16-bit launch of a kernel with dot products runs them as warpgroup
    matrix instructions and keeps its tiles in registers. The one exception is by
    design: a backward with both heads wider than 128 takes 32-row blocks (64-row
    blocks, which wgmma needs, spill there) and runs on mma.sync."""
    for r in table_config_builds:
        if r["arch"] != 90 or not of_case(r, "float16") and not of_case(r, "bfloat16") or r["kernel"] in NO_DOTS:
            continue
        assert r["stack_bytes"] == 0, f"{label(r)} spills {r['stack_bytes']} bytes"
        dims = [int(d) for d in r["problems"][0].split()[1].split("/")]
        wide_backward = "bwd" in r["kernel"] and min(dims) > 128
        assert r["wgmma"] or wide_backward, f"{label(r)} has no wgmma"


def test_causal_launches_compile_and_on_hopper_use_wgmma_without_spills(causal_builds):
    assert not failures(causal_builds), "\n".join(failures(causal_builds))
    assert {r["kernel"] for r in causal_builds} >= {"attention_fwd_kernel", "attention_fwd_split_kernel",
                                                    "attention_bwd_dkdv_kernel", "attention_bwd_dq_kernel"}
    for r in causal_builds:
        if r["arch"] == 90 and of_case(r, "bfloat16") and r["kernel"] not in NO_DOTS:
            assert r["stack_bytes"] == 0 and r["wgmma"], label(r)


def test_wide_head_launches_compile_for_sm80_and_sm90_within_shared_memory(wide_builds):
    assert not failures(wide_builds), "\n".join(failures(wide_builds))
    for dtype in WIDE_DTYPES:
        for dqk, dv in WIDE_HEAD_DIMS:
            delta = "attention_bwd_wide_delta_kernel" if dv > 256 else "attention_bwd_delta_kernel"
            for arch in SHARED_MEMORY_LIMIT:
                built = [r for r in wide_builds if of_case(r, f"{dtype} {dqk}/{dv} ") and r["arch"] == arch]
                assert {r["kernel"] for r in built} == WIDE_KERNELS | {delta}, (dtype, dqk, dv, arch)
                if (dqk, dv) in SUITES["wide-causal"].head_dims:
                    assert any(any("+causal" in case for case in r["problems"]) for r in built)
                too_big = [r for r in built if r["shared_bytes"] > SHARED_MEMORY_LIMIT[arch]]
                assert not too_big, too_big


def test_wide_head_launches_do_not_spill_and_the_forward_uses_wgmma_on_hopper(wide_builds):
    """The wide kernels' tiles (triton/tiling.py, triton/configs.py) were chosen so that
    no launch spills, on either target, in any dtype, with rows of 261 elements (not
    16-byte aligned: every element is loaded with its own address) the tightest. The
    16-bit forward runs its dots on wgmma on sm_90; the backward's 32-row blocks (two
    256-channel accumulators) run on mma.sync."""
    for r in wide_builds:
        assert r["stack_bytes"] == 0, f"{label(r)} spills {r['stack_bytes']} bytes ({r['registers']} registers)"
        if r["arch"] == 90 and of_case(r, "bfloat16") and "fwd" in r["kernel"]:
            assert r["wgmma"], f"{label(r)} has no wgmma"


# The untimed ENCODE/DECODE backward in five products (kernels/attention_bwd_resident.py).
RESIDENT_BACKWARD = {"attention_bwd_encode_kernel", "attention_bwd_decode_kernel"}


@pytest.fixture(scope="module")
def resident_backward_builds(all_builds):
    return [r for r in all_builds if r["kernel"] in RESIDENT_BACKWARD | {"sum_chunks_kernel"}]


def test_untimed_resident_backward_compiles_for_sm80_and_sm90_without_spills(resident_backward_builds):
    """Every launch the planner makes (triton/resident_backward.py: tiles by a register
    estimate, declined where none fits) compiles for both targets within shared memory
    and without spilling, its resident tiles of 64 (4 warps), 128 and (sm_90) 256 rows
    all reached, in 16 bits and in exact fp32."""
    builds = resident_backward_builds
    assert not failures(builds), "\n".join(failures(builds))
    for kernel in RESIDENT_BACKWARD:
        for arch in SHARED_MEMORY_LIMIT:
            built = [r for r in builds if r["kernel"] == kernel and r["arch"] == arch]
            tiles = {r["config"]["BLOCK_RESIDENT"] for r in built if not of_case(r, "float32")}
            assert tiles == ({64, 128, 256} if arch == 90 else {64, 128}), (kernel, arch, tiles)
            assert any(of_case(r, "float32") for r in built) and any("+causal" in r["problems"][0] for r in built)
    for r in builds:
        assert r["stack_bytes"] == 0, f"{label(r)} spills {r['stack_bytes']} bytes ({r['registers']} registers)"
        assert r["shared_bytes"] <= SHARED_MEMORY_LIMIT[r["arch"]], f"{label(r)}: {r['shared_bytes']} bytes"


def test_untimed_resident_backward_runs_its_five_products_on_wgmma_on_hopper(resident_backward_builds):
    """sm_90, 16 bits: every product is a warpgroup MMA where both head-dim blocks have
    64 channels or more. The product formed transposed (rows: the head dim) has fewer
    rows than wgmma takes below that and runs on mma.sync; the others stay on wgmma."""
    for r in resident_backward_builds:
        if r["arch"] != 90 or of_case(r, "float32") or r["kernel"] not in RESIDENT_BACKWARD:
            continue
        dims = [int(d) for d in r["problems"][0].split()[1].split("/")]
        assert r["wgmma"], f"{label(r)} has no wgmma"
        assert r["dots_off_wgmma"] <= (0 if min(dims) >= 64 else 2), f"{label(r)}: {r['dots_off_wgmma']} off wgmma"


@pytest.fixture(scope="module")
def untimed_wide_builds(all_builds):
    """The untimed wide forward (triton/wide.py) as every suite launches it: the heads the
    model layer stores (suite untimed-wide: 272, 336, 512/256), 261 from zero-padded
    copies and 512/512 in two slices of Dv (suite untimed)."""
    return [r for r in all_builds if r["kernel"] == "wide_fwd_kernel"]


def test_untimed_wide_forward_compiles_without_spills_within_shared_memory(untimed_wide_builds):
    """Its tiles (triton/wide.py TILES, PRE_HOPPER_TILES, EXACT_FP32_TILES) were chosen so:
    every launch, with or without mask and residual, causal or not, split or not."""
    assert not failures(untimed_wide_builds), "\n".join(failures(untimed_wide_builds))
    for r in untimed_wide_builds:
        assert r["stack_bytes"] == 0, f"{label(r)} spills {r['stack_bytes']} bytes ({r['registers']} registers)"
        assert r["shared_bytes"] <= SHARED_MEMORY_LIMIT[r["arch"]], f"{label(r)}: {r['shared_bytes']} bytes"
    assert any(of_case(r, "float32 272/272 encode 128x4096+mask+residual+untimed+tf32") and r["wgmma"] and r["arch"] == 90
               for r in untimed_wide_builds)
    for dtype in SUITES["untimed-wide"].dtypes:
        for dqk, dv in ALIGNED_WIDE_HEAD_DIMS + ((261, 261), (512, 512)):
            for arch in SHARED_MEMORY_LIMIT:
                # sm_90: exact fp32 (CUDA-core dots) up to 336 channels, 16 bits up to 512; sm_80: 16
                # bits up to 272, Dv a multiple of 16.
                if arch == 90:
                    served = max(dqk, dv) <= (336 if dtype == "float32" else 512)
                else:
                    served = dtype != "float32" and max(dqk, dv) <= 272 and dv % 16 == 0
                built = [r for r in untimed_wide_builds if of_case(r, f"{dtype} {dqk}/{dv} ") and r["arch"] == arch]
                assert bool(built) == served, (dtype, dqk, dv, arch)


def test_untimed_wide_forward_runs_on_wgmma_and_tma_on_hopper(untimed_wide_builds):
    """sm_90: 16-bit and TF32 launches read by TMA (the 261-channel ones from their padded
    copies) and multiply on wgmma; sm_80 and exact fp32 (CUDA-core dots) read through
    pointers."""
    for r in untimed_wide_builds:
        tensor_cores = of_case(r, "float16") or of_case(r, "bfloat16") or "+tf32" in r["problems"][0]
        if r["arch"] == 90 and tensor_cores:
            assert r["wgmma"] and r["tma"], label(r)
        else:
            assert not r["tma"], label(r)


def test_every_tuned_config_of_the_anchor_compiles_and_one_per_kernel_does_not_spill(tuned_anchor_builds):
    assert not failures(tuned_anchor_builds), "\n".join(failures(tuned_anchor_builds))
    configs = {r["kernel"]: set() for r in tuned_anchor_builds}
    for r in tuned_anchor_builds:
        configs[r["kernel"]].add(json.dumps(r["config"], sort_keys=True))
    assert len(configs["attention_fwd_kernel"]) > 10 and len(configs["attention_bwd_dq_kernel"]) > 4
    for kernel in configs:
        clean = [r for r in tuned_anchor_builds if r["kernel"] == kernel and r["stack_bytes"] == 0
                 and r["shared_bytes"] <= SHARED_MEMORY_LIMIT[90]]
        assert clean, f"every tuned config of {kernel} spills registers or overflows shared memory"


def test_each_launch_class_is_compiled_once(all_builds):
    """The suites share launch classes (the causal suite's and the tuned anchor's table
    configs, ENCODE and DECODE twins); each is compiled once and serves them all."""
    keys = [(r["kernel"], r["arch"], json.dumps(r["config"], sort_keys=True), tuple(r["problems"]))
            for r in all_builds]
    assert len(keys) == len(set(keys))
    assert any(len(r["suites"]) > 1 for r in all_builds)


def test_the_compile_check_reports_what_the_interpreter_accepts(tmp_path):
    """A global that is not a tl.constexpr runs in the interpreter but fails to compile:
    the check must report it as an error, not pass."""
    kernel_file = tmp_path / "broken_kernel.py"
    kernel_file.write_text(
        "import triton\nimport triton.language as tl\n\n"
        "SCALE: tl.constexpr = 2.0\n\n\n"
        "@triton.jit\ndef scale_kernel(X, n, BLOCK: tl.constexpr):\n"
        "    offs = tl.arange(0, BLOCK)\n"
        "    tl.store(X + offs, tl.load(X + offs, mask=offs < n) * SCALE, mask=offs < n)\n"
    )
    script = (
        "import json, sys, torch\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "from broken_kernel import scale_kernel\n"
        "from tests.triton_compile import CompileCase, compile_launch\n"
        "case = CompileCase('float32', 16, 16, 1, 1)\n"
        "args, kwargs = (torch.zeros(16), 16), {'BLOCK': 16}\n"
        "print(json.dumps([compile_launch(scale_kernel, args, kwargs, 90, case).error]))\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (error,) = json.loads(result.stdout.splitlines()[-1])
    assert error and "constexpr" in error


# The untimed persistent DECODE forward (kernels/decode_fwd.py), compiled by the
# "untimed" suite (128 keys, causal or not, every dtype and head dim) and the "decode"
# suite (64 and 256 keys, with and without mask and residual, causal or not).
DECODE = "decode_fwd_kernel"


@pytest.fixture(scope="module")
def decode_builds(all_builds):
    return [r for r in all_builds if r["kernel"] == DECODE]


def test_untimed_decode_compiles_for_sm90_in_16_bits_without_spills(decode_builds):
    """decode.choose_tiles runs it on sm_90 in 16 bits only (sm_80's mma.sync would hold
    the resident keys in registers; float32 takes the timed kernels), where every launch
    compiles within shared memory, spills nothing and stores K and V to shared memory
    outside the tile loop (dot_loop_stores)."""
    assert decode_builds
    assert not failures(decode_builds), "\n".join(failures(decode_builds))
    assert {r["arch"] for r in decode_builds} == {90}
    assert not any(of_case(r, "float32") for r in decode_builds)
    for r in decode_builds:
        assert r["stack_bytes"] == 0, f"{label(r)} spills {r['stack_bytes']} bytes ({r['registers']} registers)"
        assert r["shared_bytes"] <= SHARED_MEMORY_LIMIT[90], f"{label(r)}: {r['shared_bytes']} bytes"
        assert r["dot_loop_stores"] == 0, f"{label(r)} stores dot operands to shared memory inside the tile loop"


def test_untimed_decode_uses_wgmma_and_tma_and_serves_its_key_blocks(decode_builds):
    """Both dots on wgmma; Q, residual and O through TMA (the check's tensors are
    aligned); one resident block of 64 keys at every narrow head dim, 128 keys up to
    Dv 128, 256 keys up to Dv 64 where both head dims are multiples of 16; causally
    half as many keys per block (64 at Dv 128, 128 at Dv 64)."""
    for r in decode_builds:
        assert r["wgmma"], f"{label(r)} has no wgmma"
        assert r["tma"], f"{label(r)} has no TMA"

    def served(prefix: str) -> bool:
        return any(of_case(r, prefix) for r in decode_builds)

    for dtype in ("bfloat16",):  # the suites' 16 bits (fp16 compiled to the same registers)
        for dqk, dv in HEAD_DIMS + ((40, 24),):
            assert served(f"{dtype} {dqk}/{dv} decode 4096x64+mask+residual+untimed"), (dtype, dqk, dv)
        for dqk, dv in ((16, 16), (32, 32), (64, 64), (48, 48)):
            for extras in ("+mask+residual+untimed", "+untimed"):
                assert served(f"{dtype} {dqk}/{dv} decode 4096x256{extras}"), (dtype, dqk, dv, extras)
        for dqk, dv in ((64, 64), (128, 128)):
            assert served(f"{dtype} {dqk}/{dv} decode 4096x128+mask+residual+untimed"), (dtype, dqk, dv)
            assert served(f"{dtype} {dqk}/{dv} decode 4096x64+mask+residual+causal+untimed"), (dtype, dqk, dv)
        assert served(f"{dtype} 64/64 decode 4096x128+mask+residual+causal+untimed")


# The untimed ENCODE kernel (triton/encode.py): its launches in the untimed suite (128
# latents, every dtype and head dim) and the encode suites (256 latents in one program,
# 1,024 in four; with a mask and without).
ENCODE_SUITES = ("untimed", "encode", "encode-unsplit")


@pytest.fixture(scope="module")
def encode_builds(all_builds):
    return [r for r in all_builds if r["kernel"] == "encode_fwd_kernel" and set(r["suites"]) & set(ENCODE_SUITES)]


def test_untimed_encode_compiles_for_sm80_and_sm90_without_spills(encode_builds):
    assert not failures(encode_builds), "\n".join(failures(encode_builds))
    spills = [f"{label(r)}: {r['stack_bytes']} bytes" for r in encode_builds if r["stack_bytes"]]
    assert not spills, "\n".join(spills)
    too_big = [label(r) for r in encode_builds if r["shared_bytes"] > SHARED_MEMORY_LIMIT[r["arch"]]]
    assert not too_big, "\n".join(too_big)
    untimed = SUITES["untimed"]
    for dtype in untimed.dtypes:
        for dqk, dv in (dims for dims in untimed.head_dims if max(dims) <= 256):
            for arch in SHARED_MEMORY_LIMIT:
                assert any(of_case(r, f"{dtype} {dqk}/{dv} encode") and r["arch"] == arch for r in encode_builds), \
                    (dtype, dqk, dv, arch)


def test_untimed_encode_on_hopper_uses_wgmma_tma_and_warp_specialization(encode_builds):
    """sm_90: 16-bit dots on wgmma, K/V (and Q) through TMA (the check's tensors are
    contiguous), all 256 latents in one program at head dim 64, and the key loop
    warp-specialized exactly where the planner asks for it: 16 bits without a mask,
    head dims up to 128. Before Hopper: pointers, mma.sync."""
    hopper = [r for r in encode_builds if r["arch"] == 90]
    sixteen_bits = [r for r in hopper if of_case(r, "float16") or of_case(r, "bfloat16")]
    assert sixteen_bits and all(r["wgmma"] and r["tma"] for r in sixteen_bits), \
        [label(r) for r in sixteen_bits if not (r["wgmma"] and r["tma"])]
    assert any(r["config"]["BLOCK_M"] == 256 for r in sixteen_bits if of_case(r, "bfloat16 64/64 encode 256x8192"))
    for r in sixteen_bits:
        dims = [int(d) for d in r["problems"][0].split()[1].split("/")]
        expected = "+mask" not in r["problems"][0] and max(dims) <= 128
        assert r["warp_specialized"] == expected, label(r)
    assert any(r["warp_specialized"] and "+causal" in r["problems"][0] for r in sixteen_bits)
    assert not any(r["tma"] or r["wgmma"] or r["warp_specialized"] for r in encode_builds if r["arch"] == 80)


def test_untimed_encode_merge_waits_for_the_split_kernel_on_hopper(all_builds):
    """The merge after the ENCODE kernel's splits is launched with programmatic
    dependent launch on sm_90 (it waits on griddepcontrol) and not before."""
    merges = [r for r in all_builds if r["kernel"] == "merge_splits_kernel" and set(r["suites"]) & {"encode"}]
    assert not failures(merges), "\n".join(failures(merges))
    assert any(r["arch"] == 90 and r["grid_dependency"] for r in merges)
    assert not any(r["arch"] == 80 and r["grid_dependency"] for r in merges)
    splits = [r for r in all_builds if r["kernel"] == "encode_fwd_kernel" and "encode" in r["suites"]]
    assert any(r["arch"] == 90 and r["grid_dependency"] for r in splits)
