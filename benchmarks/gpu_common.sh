# Shared by gpu_run.sh and ab_run.sh (sourced, not run): steps with limits, the test
# command with fault isolation, the GPU check and the offline install. The sourcing
# script sets OUT, DEADLINE_S and DRY_RUN first.

# run NAME LIMIT_S LOG COMMAND...: one step, stopped at its limit (or at the deadline),
# its exit status and seconds appended to steps.tsv; under DRY_RUN only printed.
run() {
  local name=$1 limit=$2 log=$3 start=$SECONDS status
  shift 3
  local left=$((DEADLINE_S - SECONDS))
  (( limit > left )) && limit=$left
  echo "== $name (limit ${limit} s, $(date -u +%H:%M:%S)): $*"
  if [ "$DRY_RUN" = 1 ]; then
    printf '%s\t%s\t%s\n' "$name" "dry run" 0 >> "$OUT/steps.tsv"
    return 0
  fi
  if (( limit < 10 )); then
    printf '%s\t%s\t%s\n' "$name" "skipped: deadline" 0 >> "$OUT/steps.tsv"
    return 124
  fi
  timeout -k 10 "$limit" "$@" > "$log" 2>&1
  status=$?
  printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" >> "$OUT/steps.tsv"
  return $status
}

# Tests run in parallel processes with fault isolation. Without pytest-xdist they run
# in one process each, which stops (and says why) at a broken CUDA context. Verbose: a
# line per test, so that a step stopped at its limit still names its failures.
PYTEST=(python -m pytest -v -rf -p no:benchmark -p no:cacheprovider -p benchmarks.pytest_fault_isolation)
if python -c "import xdist" 2> /dev/null; then
  workers() { echo "-n $1 --max-worker-restart 40"; }
else
  echo "pytest-xdist is missing: each test set runs in one process"
  workers() { :; }
fi

# require_gpu: exits 2 without a CUDA GPU (DRY_RUN prints the steps anywhere).
require_gpu() {
  if [ "$DRY_RUN" != 1 ] && ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "$(basename "$0"): no CUDA GPU here; it needs one (DRY_RUN=1 prints its steps)" >&2
    exit 2
  fi
}

# install_package: the package with its CUDA extension (sm_90a by default), offline; then what
# was built, with the versions, into $OUT/extra/build_info.txt.
install_package() {
  mkdir -p "$OUT/extra"
  [ "$DRY_RUN" = 1 ] || nvidia-smi > "$OUT/extra/nvidia-smi.txt" 2>&1
  if ! PERCEIVER_KERNELS_FORCE_CUDA=1 PERCEIVER_KERNELS_CUDA_ARCHS="${PERCEIVER_KERNELS_CUDA_ARCHS:-90a}" \
       MAX_JOBS="${MAX_JOBS:-16}" run install 120 "$OUT/extra/install.log" \
       python -m pip install --no-build-isolation --no-deps -v -e .; then
    tail -30 "$OUT/extra/install.log"
    echo "install failed: nothing else can run"
  fi
  [ "$DRY_RUN" = 1 ] || python -c "import perceiver_kernels as pk, torch, triton; print(pk.build_info()); print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
    > "$OUT/extra/build_info.txt" 2>&1
}

# archive KEEP: everything in $OUT beyond the files named in KEEP goes into logs.tar.gz.
archive() {
  local keep=" $1 "
  (
    cd "$OUT" || exit 1
    extras=()
    for entry in *; do
      [[ "$keep" == *" $entry "* ]] || extras+=("$entry")
    done
    if (( ${#extras[@]} )); then
      tar -czf logs.tar.gz "${extras[@]}" && rm -rf "${extras[@]}"
    fi
  )
}
