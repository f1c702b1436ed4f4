#!/usr/bin/env bash
# The short GPU A/B: the Triton rewrites no GPU has timed yet (perceiver_kernels/triton/
# variants.py, "untimed") against the timed kernels and every SDPA backend on a handful
# of cases, with their GPU tests first and Nsight Compute counters last, in one call of
# about 5 minutes, so a 15-minute GPU window allows a fix and a rerun (gpu_run.sh is the
# full run):
#
#   step     what                                                          expected  limit
#   install  pip install -e . offline, CUDA extension for sm_90a               25 s   120 s
#   tests    the contract's untimed GPU runners (-n 12): correctness first     60 s   150 s
#   bench    python -m benchmarks --suite op --size full on AB_CASES           100 s   150 s
#   ncu      ncu --clock-control none on one warm call per AB_PROFILE entry     60 s   120 s
#   summary  timed against untimed against the best SDPA per case, the tests' failures,
#            then the ncu table (time, DRAM and SM throughput, tensor pipe, top stalls)
#
#   PERCEIVER_KERNELS_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/ab_run.sh OUT_DIR
#   DRY_RUN=1 bash benchmarks/ab_run.sh OUT_DIR    # print the steps, run only the summary
#
# Overrides: AB_CASES (op cases, by name), AB_PROFILE ("case:provider[:backward] ...",
# providers triton, untimed, auto), AB_TESTS=0 (skip the tests), DEADLINE_S.
# OUT_DIR ends with summary.md, results.json, tests-untimed.log, ncu.md and logs.tar.gz.
set -uo pipefail
OUT=${1:?usage: bash benchmarks/ab_run.sh OUT_DIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PERCEIVER_KERNELS_AUTOTUNE=0
DRY_RUN=${DRY_RUN:-0}
DEADLINE_S=${DEADLINE_S:-330}
AB_CASES=${AB_CASES:-ENC-1,ENC-3,ENC-3 masked,DEC-1,DEC-1 residual,DEC-2,ENC-1 d128,DEC-1 d128,IMG-261,AR-8k causal}
AB_PROFILE=${AB_PROFILE:-DEC-1:triton DEC-1:untimed ENC-1:triton ENC-1:untimed}
KEEP="summary.md results.json tests-untimed.log ncu.md logs.tar.gz"

# shellcheck source=benchmarks/gpu_common.sh
source benchmarks/gpu_common.sh

rm -f "$OUT/steps.tsv"
require_gpu
install_package

if [ "${AB_TESTS:-1}" = 1 ]; then
  # shellcheck disable=SC2046  # word splitting of the worker options is meant
  run tests 150 "$OUT/tests-untimed.log" "${PYTEST[@]}" $(workers 12) tests/test_forward_contract.py \
    tests/test_backward_contract.py -k "untimed"
fi
BENCH_OP_CASES="$AB_CASES" BENCH_SKIP_PROVIDERS="naive,perceiver_kernels[cuda]" \
  run bench 150 "$OUT/extra/bench.log" python -m benchmarks --suite op --size full --out "$OUT/bench"
[ -f "$OUT/bench/results.json" ] && mv "$OUT/bench/results.json" "$OUT/results.json"

mkdir -p "$OUT/ncu"
if [ "$DRY_RUN" = 1 ] || command -v ncu > /dev/null; then
  for entry in $AB_PROFILE; do
    IFS=: read -r case provider pass <<< "$entry"
    name="${case// /_}-$provider${pass:+-$pass}"
    run "ncu $entry" 60 "$OUT/ncu/$name.csv" ncu --clock-control none --profile-from-start off \
      --section SpeedOfLight --section WarpStateStats --section ComputeWorkloadAnalysis --csv --page raw \
      python -m benchmarks.profile_kernels run --case "$case" --provider "$provider" ${pass:+--backward}
  done
  python -m benchmarks.profile_kernels summary "$OUT"/ncu/*.csv > "$OUT/ncu.md" 2>&1
else
  echo "ncu is not on PATH: no counters" > "$OUT/ncu.md"
fi

python -m benchmarks.gpu_summary --ab "$OUT" > "$OUT/extra/summary.out" 2>&1 || tail -20 "$OUT/extra/summary.out"
failed_steps=$(awk -F'\t' '$2 != "0" && $2 != "dry run"' "$OUT/steps.tsv" | wc -l)
archive "$KEEP"
cat "$OUT/summary.md" 2> /dev/null || echo "no summary (its error is above and in logs.tar.gz)"
cat "$OUT/ncu.md" 2> /dev/null
exit $((failed_steps > 0))
