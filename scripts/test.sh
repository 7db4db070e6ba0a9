#!/usr/bin/env bash
# Install vramguard and its test dependencies into a venv and run the test suite.
#   bash scripts/test.sh              plain build in .venv
#   bash scripts/test.sh --sanitize   ASan + UBSan build in .venv-asan; fails on any sanitizer
#                                     error and on any leak with a frame in vramguard._native
# Extra arguments after the mode go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=plain
if [ "${1:-}" = "--sanitize" ]; then mode=sanitize; shift; fi
venv=.venv
[ "$mode" = sanitize ] && venv=.venv-asan
PY=${PYTHON:-python3}

[ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check "setuptools>=64" wheel "numpy>=2" \
    "pytest>=7" "hypothesis>=6" "pillow>=9" "aiohttp>=3.9"
# torch (CPU) for the GC-hook, adapter and tiler tests; they skip with a reason without it.
"$venv/bin/pip" install -q --disable-pip-version-check "torch==2.13.0" 2>/dev/null \
  || echo "vramguard: torch not installed; torch tests will be skipped"

export VRAMGUARD_WERROR=1
if [ "$mode" = sanitize ]; then
  export VRAMGUARD_SANITIZE=address,undefined
fi
rm -rf build
"$venv/bin/pip" install -q --disable-pip-version-check --no-build-isolation --no-deps --force-reinstall .

if [ "$mode" = plain ]; then
  exec "$venv/bin/python" -m pytest -q "$@"
fi

# Sanitized run, in two passes.
# A. The whole suite under ASan + UBSan: any memory error or undefined behaviour halts it.
#    Leak checking is off here: attributing leaks needs slow unwinding (libpython has no frame
#    pointers), which makes a Python test suite 10-50x slower.
# B. scripts/leak_exercise.py drives every C entry point, good and bad input, many rounds,
#    with full stacks and LeakSanitizer on; scripts/check_leaks.py fails on any leak with a
#    frame in vramguard (the interpreter's and NumPy's exit-time leaks pass) and on any
#    sanitizer report.
logdir=$(mktemp -d)
asan=$(gcc -print-file-name=libasan.so)
# libstdc++ preloaded right after libasan: ASan resolves its __cxa_throw interceptor at start-up,
# and without the C++ runtime loaded by then the first C++ exception (torch raising on a meta
# tensor) aborts with "CHECK failed: real___cxa_throw != 0".
asan="$asan $(gcc -print-file-name=libstdc++.so)"
common="detect_odr_violation=0:alloc_dealloc_mismatch=0:new_delete_type_mismatch=0:halt_on_error=1"
set +e
LD_PRELOAD="$asan" PYTHONMALLOC=malloc \
ASAN_OPTIONS="detect_leaks=0:$common" \
UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
VRAMGUARD_SANITIZED=1 \
  "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
rc=$?
LD_PRELOAD="$asan" PYTHONMALLOC=malloc \
ASAN_OPTIONS="detect_leaks=1:fast_unwind_on_malloc=0:malloc_context_size=40:log_path=$logdir/asan:exitcode=0:$common" \
UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$logdir/ubsan" \
  "$venv/bin/python" scripts/leak_exercise.py || rc=1
set -e
"$venv/bin/python" scripts/check_leaks.py "$logdir" || rc=1
exit $rc
