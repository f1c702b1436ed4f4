#!/usr/bin/env bash
# One call on a GPU machine without network, inside 9 minutes (a GPU window is 15
# minutes in all, machine start included, and one command runs at most 10):
#
#   step          what                                                      expected  limit
#   install       pip install -e . offline, CUDA extension for sm_90a          25 s    120 s
#   repro         tests/repro_chained_dots.py: does this Triton compute          5 s     60 s
#                 16-bit chained dots with BLOCK_DQK > BLOCK_DV right (exit 1: affected)
#   repro-kernels the same for the op's kernels launched without the workaround  10 s     60 s
#   cuda-tests    the CUDA C++ kernel tests (-n 4)          } side by side      30 s    240 s
#   triton-tests  the Triton kernel tests (-n 12)           }                   70 s    240 s
#   bench         python -m benchmarks --suite op,model,host --size quick,   ~180 s    300 s
#                 table kernel configs (PERCEIVER_KERNELS_AUTOTUNE=0, the default);
#                 stopped at its limit, it still writes the rows it measured
#   summary       the table printed last: steps, test counts and failures, the
#                 benchmark's headline, the open issues' targets (benchmarks/targets.py)
#
# Every step stops at its limit and the whole call at DEADLINE_S (530 s). A kernel that
# faults breaks its process's CUDA context, so each test worker checks its context after
# every test and exits when it is broken; pytest-xdist replaces the worker and the
# remaining tests still run (benchmarks/pytest_fault_isolation.py). The benchmark times
# backend="cuda" only when the CUDA tests passed. Clocks and power limits are left alone.
#
#   PERCEIVER_KERNELS_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_run.sh OUT_DIR
#   DRY_RUN=1 bash benchmarks/gpu_run.sh OUT_DIR    # print the steps, run only the summary
#
# The commit must be passed where the copy on the GPU machine has no .git. OUT_DIR ends
# with at most 8 files: summary.md, results.json, report.md, op.png (copy these into
# benchmarks/results/<date>-<device>/ and commit them), tests-cuda.log, tests-triton.log,
# bench.log, and logs.tar.gz with the rest (install log, nvidia-smi, build info, JUnit
# XML, benchmark progress, step times). Overrides: KERNEL_TESTS, KERNEL_SELECT, CUDA_TESTS, CUDA_SELECT,
# TEST_WORKERS, BENCH_SUITES, BENCH_SIZE, BENCH_OP_CASES (the op suite's cases, by name),
# PERCEIVER_KERNELS_CUDA_ARCHS, MAX_JOBS.
set -uo pipefail
OUT=${1:?usage: bash benchmarks/gpu_run.sh OUT_DIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PERCEIVER_KERNELS_AUTOTUNE=0
DRY_RUN=${DRY_RUN:-0}
DEADLINE_S=${DEADLINE_S:-530}
# The kernel tests (the contract suites' GPU runners, tests/kernel_runners.py, and the
# launchers' tests), split by kernel family with -k: the CUDA C++ runners' ids say cuda.
KERNEL_FILES="tests/test_forward_contract.py tests/test_backward_contract.py tests/test_triton_launch.py
  tests/test_cuda_extension.py tests/test_training.py tests/test_op.py tests/test_build.py tests/test_policy.py"
CUDA_TESTS=${CUDA_TESTS:-$KERNEL_FILES}
CUDA_SELECT=${CUDA_SELECT:-cuda}
KERNEL_TESTS=${KERNEL_TESTS:-$KERNEL_FILES}
KERNEL_SELECT=${KERNEL_SELECT:-not cuda}
TEST_WORKERS=${TEST_WORKERS:-12}
KEEP="summary.md results.json report.md op.png tests-cuda.log tests-triton.log bench.log logs.tar.gz"

# shellcheck source=benchmarks/gpu_common.sh
source benchmarks/gpu_common.sh

rm -f "$OUT/steps.tsv"
require_gpu
install_package

# Whether this Triton has the bug the launchers work around (triton/tiling.head_dim_blocks).
run repro 60 "$OUT/extra/repro.log" python -m tests.repro_chained_dots
# And whether the op's own kernels still need it (their own process: the bug faulted).
run repro-kernels 60 "$OUT/extra/repro-kernels.log" python -m tests.repro_chained_dots --full-kernel

# Both test sets at once: the CUDA tests need few workers, the Triton tests many.
# shellcheck disable=SC2046,SC2086  # word splitting of the worker options and file lists is meant
run cuda-tests 240 "$OUT/tests-cuda.log" "${PYTEST[@]}" $(workers 4) $CUDA_TESTS -k "$CUDA_SELECT" \
  --junitxml="$OUT/extra/junit-cuda.xml" &
cuda_pid=$!
# shellcheck disable=SC2046,SC2086
run triton-tests 240 "$OUT/tests-triton.log" "${PYTEST[@]}" $(workers "$TEST_WORKERS") $KERNEL_TESTS -k "$KERNEL_SELECT" \
  --junitxml="$OUT/extra/junit-triton.xml"
wait $cuda_pid
cuda_status=$?

if [ "$cuda_status" != 0 ]; then
  echo "CUDA kernel tests did not pass (exit $cuda_status): the benchmark leaves backend='cuda' out"
  export BENCH_SKIP_PROVIDERS="perceiver_kernels[cuda]"
fi
run bench 300 "$OUT/bench.log" python -m benchmarks --suite "${BENCH_SUITES:-op,model,host}" --size "${BENCH_SIZE:-quick}" \
  --out "$OUT/bench"
for file in results.json report.md op.png; do
  [ -f "$OUT/bench/$file" ] && mv "$OUT/bench/$file" "$OUT/$file"
done

python -m benchmarks.gpu_summary "$OUT" > "$OUT/extra/summary.out" 2>&1 || tail -20 "$OUT/extra/summary.out"
failed_steps=$(awk -F'\t' '$2 != "0" && $2 != "dry run"' "$OUT/steps.tsv" | wc -l)
# Everything beyond the kept files goes into one archive.
archive "$KEEP"
cat "$OUT/summary.md" 2> /dev/null || echo "no summary (its error is above and in logs.tar.gz)"
exit $((failed_steps > 0))
