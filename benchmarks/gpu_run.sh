#!/usr/bin/env bash
# Everything a GPU machine without network needs, in one call: install the project
# offline, build the CUDA extension for sm_90a, run the test suite on the GPU, run the
# full benchmark suite, write every log and result into OUT_DIR and print a short
# table last.
#
#   bash benchmarks/gpu_run.sh OUT_DIR                 # install, tests, benchmarks
#   STAGES="install bench" bash benchmarks/gpu_run.sh OUT_DIR
#
# STAGES splits the work over calls when one call has a time limit (the install is
# needed once per machine). BENCH_SUITES (default op,scaling,model) and BENCH_SIZE
# (default full) pick the benchmarks. The CUDA C++ kernels are tested first in their
# own process; the benchmarks time backend="cuda" only when those tests (or, in a
# bench-only call, a smoke test of them) passed. Copy OUT_DIR/bench into
# benchmarks/results/<date>-<device>/ and commit it.
set -uo pipefail
OUT=${1:?usage: bash benchmarks/gpu_run.sh OUT_DIR}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

step() { echo "== $* ($(date -u +%H:%M:%S))"; }

STAGES=${STAGES:-install tests bench}
has() { [[ " $STAGES " == *" $1 "* ]]; }
tests_rc=skipped
cuda_tests_rc=skipped
bench_rc=skipped

if has install; then
step "install (offline, extension for sm_90a)"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
if ! PERCEIVER_KERNELS_FORCE_CUDA=1 PERCEIVER_KERNELS_CUDA_ARCHS="${PERCEIVER_KERNELS_CUDA_ARCHS:-90a}" \
     MAX_JOBS="${MAX_JOBS:-16}" python -m pip install --no-build-isolation --no-deps -v -e . > "$OUT/install.log" 2>&1; then
  tail -40 "$OUT/install.log"; echo "install failed"; exit 1
fi
python -c "import perceiver_kernels as pk, torch, triton; print(pk.build_info()); print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
  | tee "$OUT/build_info.txt"
fi

if has tests; then
# The CUDA C++ kernels first and in their own process: a kernel that faults takes
# its CUDA context down, and the other tests must still run.
step "CUDA C++ kernel tests"
timeout "${CUDA_TEST_TIMEOUT:-150}" python -m pytest -q -rs --maxfail=20 tests/test_cuda_forward.py \
  > "$OUT/tests_cuda.log" 2>&1
cuda_tests_rc=$?
tail -15 "$OUT/tests_cuda.log"
step "the other tests on the GPU (one kernel config per shape: tuning is the benchmark's job)"
PERCEIVER_KERNELS_AUTOTUNE=0 timeout "${TEST_TIMEOUT:-330}" python -m pytest -q -rs --maxfail=20 --durations=15 \
  --ignore=tests/test_cuda_forward.py > "$OUT/tests.log" 2>&1
tests_rc=$?
tail -25 "$OUT/tests.log"
fi

if has bench; then
if [ "$cuda_tests_rc" = skipped ]; then
  step "CUDA C++ kernel smoke test (decides whether the benchmarks time them)"
  timeout 120 python -m pytest -q -x tests/test_cuda_forward.py -k "decode_shape or every_compiled_pair" \
    > "$OUT/tests_cuda_smoke.log" 2>&1
  cuda_tests_rc=$?
fi
if [ "$cuda_tests_rc" != 0 ]; then
  echo "CUDA kernel tests failed: the benchmarks leave backend='cuda' out"
  export BENCH_SKIP_PROVIDERS="perceiver_kernels[cuda]"
fi
step "benchmarks (${BENCH_SUITES:-op,scaling,model}, ${BENCH_SIZE:-full})"
timeout "${BENCH_TIMEOUT:-480}" python -m benchmarks --suite "${BENCH_SUITES:-op,scaling,model}" \
  --size "${BENCH_SIZE:-full}" --out "$OUT/bench" > "$OUT/bench.log" 2> "$OUT/bench.progress"
bench_rc=$?
tail -5 "$OUT/bench.progress"
fi

step "summary"
echo "CUDA kernel tests: $cuda_tests_rc   other tests: $tests_rc   benchmarks: $bench_rc"
[ -f "$OUT/tests_cuda.log" ] && grep -E "passed|failed" "$OUT/tests_cuda.log" | tail -1
[ -f "$OUT/tests.log" ] && grep -E "passed|failed" "$OUT/tests.log" | tail -1
[ -f "$OUT/bench.log" ] && cat "$OUT/bench.log"
