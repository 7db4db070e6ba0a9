#!/usr/bin/env bash
# The one command to run on a machine with an NVIDIA GPU (torch with CUDA installed; no network
# needed: nothing is downloaded, the machine's own python, torch and numpy are used):
#
#   bash scripts/gpu_check.sh                      build, GPU tests, every GPU bench, one report
#   bash scripts/gpu_check.sh --only tests,snapshot    just those steps (facts always run)
#   bash scripts/gpu_check.sh --skip gc --budget 300   leave a step out, a shorter time budget
#   bash scripts/gpu_check.sh --cpu-smoke          no GPU: GPU steps skipped with the reason, the
#                                                  CPU-runnable parts exercised, report written
#   bash scripts/gpu_check.sh --help               steps, options, what each bench measures
#
# Report: $OUT/gpu_report.md + $OUT/gpu_report.json (JSON lines) + gpu_check_logs.txt when OUT
# is set, else in the current folder.  The whole run fits the --budget (default 530 s, under the
# device machine's 10-minute limit per command); every step has its own time limit, and a
# failing or timed-out step is recorded without stopping the rest.
# Python: $PYTHON, else python3 (on the device machines the python3 that holds torch).
set -u
here="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for c in python3 python; do
    if command -v "$c" >/dev/null 2>&1; then PY="$c"; break; fi
  done
fi
if [ -z "$PY" ]; then
  echo "gpu_check: no python3 on PATH (set PYTHON=/path/to/python)" >&2
  exit 2
fi
exec "$PY" "$here/bench/gpu_check.py" "$@"
