#!/usr/bin/env bash
# Everything a session with a lent GPU should run, in steps that each fit one
# 10-minute device call. Each step writes its logs and results under $OUT (or
# ./build/gpu_session) and prints a short summary last.
#
#   bash tools/gpu_session.sh tests      # whole suite on real CUDA, incl. torchvision cross-checks (~5-8 min)
#   bash tools/gpu_session.sh bench      # layer benchmark suite -> CSV + charts (~4-6 min)
#   bash tools/gpu_session.sh train      # fully-DCN ResNet-50 training-step benchmark (~3-5 min)
#   bash tools/gpu_session.sh sanitize   # compute-sanitizer memcheck + racecheck, quick cases (~5-8 min)
#   bash tools/gpu_session.sh notebooks  # run the three notebooks live (~2-4 min)
#
# The run times above are estimates: nothing here has run on a GPU yet.
# The device copy of the repo may have no .git: pass DEFTNUMBA_COMMIT=<sha> so CSVs
# record the commit. Afterwards copy $OUT's CSV/PNG files into data/bench/<op>/ (bench: dcn/,
# train: training/) and commit.
set -u -o pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUTDIR=${OUT:-$ROOT/build/gpu_session}
mkdir -p "$OUTDIR"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" DEFTNUMBA_BACKEND=cuda DEFTNUMBA_QUIET=1 PYTHONUNBUFFERED=1
export DEFTNUMBA_COMMIT=${DEFTNUMBA_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
PY=${PYTHON:-python3}

step=${1:-}
case $step in
  tests)
    "$PY" -m deftnumba info | tee "$OUTDIR/info.txt"
    # -o addopts: the GPU image may lack nbmake; notebooks have their own step.
    "$PY" -m pytest -o addopts="-ra" -p no:cacheprovider -n 8 -q tests 2>&1 | tee "$OUTDIR/pytest-cuda.log"
    rc=$?
    # torchvision agreement with per-case errors printed (-s), one process.
    "$PY" -m pytest -o addopts="-ra" -p no:cacheprovider -q -s tests/dcn/test_torchvision.py 2>&1 \
      | grep -E "rel. error|passed|failed" | tee "$OUTDIR/torchvision-agreement.txt"
    exit $rc ;;
  bench)
    "$PY" -m deftnumba bench --quiet --out "$OUTDIR" --max-minutes 8 2>&1 | tee "$OUTDIR/bench.log" ;;
  train)
    "$PY" -m deftnumba bench --training --quiet --out "$OUTDIR" 2>&1 | tee "$OUTDIR/train.log" ;;
  sanitize)
    STEP_TIMEOUT=270 bash tools/gpu_check.sh --quick memcheck racecheck ;;
  notebooks)
    for nb in notebooks/0*.py; do
      echo "== $nb"; MPLBACKEND=Agg timeout 300 "$PY" "$nb" > "$OUTDIR/$(basename "$nb" .py).log" 2>&1
      echo "exit $?"
    done ;;
  *)
    sed -n '2,16p' "$0"; exit 64 ;;
esac
