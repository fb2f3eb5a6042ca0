#!/usr/bin/env bash
# Memory safety of every kernel on a real GPU, in one command:
#
#     bash tools/gpu_check.sh                 # every step (about 10-20 min on an H200)
#     bash tools/gpu_check.sh --quick         # fewer cases under the slow tools
#     bash tools/gpu_check.sh memcheck racecheck   # only these steps
#
# Steps (each runs tools/sanitizer_cases.py: every forward method, every backward method
# with deterministic False and True, and the fused kernel's counting build, on extreme
# and randomized cases, with CuPy arrays and CuPy's memory pool off under the sanitizer
# so that each array is its own allocation):
#   plain      the cases without a sanitizer, checked against the float64 reference
#   memcheck   compute-sanitizer --tool memcheck  (out-of-bounds and misaligned accesses)
#   racecheck  compute-sanitizer --tool racecheck (shared-memory races; quick case set)
#   synccheck  compute-sanitizer --tool synccheck (barrier misuse; quick case set)
#   initcheck  compute-sanitizer --tool initcheck (reads of uninitialised global memory)
#   pytest     the GPU-only tests: tests/dcn/test_big_tensors.py (an input past 2**31 elements,
#              a batch past 65535), then the robustness and fuzz tests on the GPU
#
# Logs go to ${OUT:-build}/gpu_check/: one <step>.log per step and summary.txt. The exit
# status is 0 only if every step that ran passed. Environment:
#   PYTHON              interpreter (default python3; it needs numba-cuda, cupy, numpy, pytest)
#   COMPUTE_SANITIZER   path of compute-sanitizer (default: PATH, then /usr/local/cuda*/bin)
#   STEP_TIMEOUT        seconds per step (default 1500; the device tool allows 600 s per command,
#                       so there run steps one by one: STEP_TIMEOUT=540 bash tools/gpu_check.sh memcheck)
#   SANITIZER_CASES_ARGS  extra arguments for tools/sanitizer_cases.py (e.g. "--only special")
#   GPU_CHECK_BACKEND   default cuda; "simulator" dry-runs the script's plumbing without a GPU
set -u -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LOGDIR=${OUT:-$ROOT/build}/gpu_check
mkdir -p "$LOGDIR"
SUMMARY=$LOGDIR/summary.txt
: > "$SUMMARY"

QUICK=""
STEPS=()
for arg in "$@"; do
  case $arg in
    --quick) QUICK="--quick" ;;
    plain|memcheck|racecheck|synccheck|initcheck|pytest) STEPS+=("$arg") ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $arg" >&2; exit 64 ;;
  esac
done
[ ${#STEPS[@]} -eq 0 ] && STEPS=(plain memcheck racecheck synccheck initcheck pytest)

PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export DEFTNUMBA_BACKEND=${GPU_CHECK_BACKEND:-cuda} DEFTNUMBA_QUIET=1 PYTHONUNBUFFERED=1
TIMEOUT=${STEP_TIMEOUT:-1500}
# extra arguments for every tools/sanitizer_cases.py run, e.g. "--only special --random 2"
read -r -a CASE_ARGS <<< "${SANITIZER_CASES_ARGS:-}"

find_sanitizer() {
  if [ -n "${COMPUTE_SANITIZER:-}" ]; then echo "$COMPUTE_SANITIZER"; return; fi
  command -v compute-sanitizer 2>/dev/null && return
  for p in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer \
           /usr/local/cuda/compute-sanitizer/compute-sanitizer /opt/nvidia/*/compute-sanitizer/compute-sanitizer; do
    [ -x "$p" ] && { echo "$p"; return; }
  done
  "$PY" - <<'EOF' 2>/dev/null
import glob, os, site
for base in site.getsitepackages():
    for p in glob.glob(os.path.join(base, "nvidia", "**", "compute-sanitizer"), recursive=True):
        if os.path.isfile(p) and os.access(p, os.X_OK):
            print(p); raise SystemExit
EOF
}
SAN=$(find_sanitizer | head -1)

{
  echo "deftnumba gpu_check  $(date -u +%Y-%m-%dT%H:%M:%SZ)  commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not available"
  echo "python: $("$PY" -c 'import sys; print(sys.version.split()[0])' 2>&1)"
  "$PY" -m deftnumba info 2>&1 | sed 's/^/  /'
  echo "compute-sanitizer: ${SAN:-NOT FOUND} $([ -n "$SAN" ] && "$SAN" --version 2>/dev/null | tail -1)"
  echo "steps: ${STEPS[*]} ${QUICK:+(quick)}"
} | tee -a "$SUMMARY"

FAILED=0
record() {  # step status detail
  printf '%-10s %-12s %s\n' "$1" "$2" "$3" | tee -a "$SUMMARY"
  case $2 in PASS|SKIPPED) ;; *) FAILED=1 ;; esac
}

run_plain() {
  local log=$LOGDIR/plain.log
  timeout "$TIMEOUT" "$PY" "$ROOT/tools/sanitizer_cases.py" $QUICK --big --require-coverage "${CASE_ARGS[@]}" >"$log" 2>&1
  local rc=$?
  record plain "$( [ $rc -eq 0 ] && echo PASS || echo "FAIL(rc=$rc)")" "$(tail -1 "$log")"
}

run_tool() {  # tool [extra sanitizer args...]
  local tool=$1; shift
  local log=$LOGDIR/$tool.log
  if [ -z "$SAN" ]; then record "$tool" SKIPPED "compute-sanitizer not found (set COMPUTE_SANITIZER)"; FAILED=1; return; fi
  local cases=$QUICK
  case $tool in racecheck|synccheck|initcheck) cases="--quick" ;; esac
  # --no-check under the slow tools would hide nothing the plain step checks; keep the
  # reference check on: a wrong value under a sanitizer is still a failure.
  timeout "$TIMEOUT" "$SAN" --tool "$tool" --error-exitcode 86 --print-limit 200 \
      --launch-timeout 0 --target-processes all "$@" \
      "$PY" "$ROOT/tools/sanitizer_cases.py" $cases --no-pool "${CASE_ARGS[@]}" >"$log" 2>&1
  local rc=$?
  local summary
  summary=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Device not supported|error 999" "$log" | tail -1)
  if grep -qE "Device not supported|Target application returned an error|Error: No attachable process found" "$log" \
      && ! grep -q "ERROR SUMMARY" "$log"; then
    record "$tool" UNSUPPORTED "sanitizer could not run here: ${summary:-see $log}"
  elif [ $rc -eq 0 ]; then
    record "$tool" PASS "${summary:-no summary line}"
  elif [ $rc -eq 86 ]; then
    record "$tool" ERRORS "$summary (details in $log)"
  elif [ $rc -eq 124 ]; then
    record "$tool" TIMEOUT "after ${TIMEOUT}s (STEP_TIMEOUT); partial log in $log"
  else
    record "$tool" "FAIL(rc=$rc)" "$(tail -1 "$log")"
  fi
}

run_pytest() {
  local log=$LOGDIR/pytest.log
  timeout "$TIMEOUT" "$PY" -m pytest -p no:cacheprovider -q -rxs \
      "$ROOT/tests/dcn/test_big_tensors.py" "$ROOT/tests/dcn/test_robustness.py" "$ROOT/tests/dcn/test_fuzz.py" >"$log" 2>&1
  local rc=$?
  record pytest "$( [ $rc -eq 0 ] && echo PASS || echo "FAIL(rc=$rc)")" "$(grep -E '(passed|failed|error)' "$log" | tail -1)"
}

for step in "${STEPS[@]}"; do
  echo "--- $step  $(date -u +%H:%M:%S)" | tee -a "$SUMMARY"
  case $step in
    plain) run_plain ;;
    memcheck) run_tool memcheck --leak-check no ;;
    racecheck) run_tool racecheck --racecheck-report all ;;
    synccheck) run_tool synccheck ;;
    initcheck) run_tool initcheck ;;
    pytest) run_pytest ;;
  esac
done

echo "result: $([ $FAILED -eq 0 ] && echo 'ALL PASSED' || echo 'FAILURES (see above)')  logs: $LOGDIR" | tee -a "$SUMMARY"
exit $FAILED
