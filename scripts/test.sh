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

# Sanitized run.  libpython has no frame pointers, so unwind slowly to see whole stacks; the
# leak report is filtered by scripts/check_leaks.py: interpreter and NumPy exit-time leaks
# pass, anything allocated under vramguard._native fails.
logdir=$(mktemp -d)
asan=$(gcc -print-file-name=libasan.so)
set +e
LD_PRELOAD="$asan" PYTHONMALLOC=malloc \
ASAN_OPTIONS="detect_leaks=1:fast_unwind_on_malloc=0:malloc_context_size=40:log_path=$logdir/asan:exitcode=0:detect_odr_violation=0:alloc_dealloc_mismatch=0:new_delete_type_mismatch=0:abort_on_error=0:halt_on_error=1" \
UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$logdir/ubsan" \
VRAMGUARD_SANITIZED=1 \
  "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
"$venv/bin/python" scripts/check_leaks.py "$logdir" || rc=1
exit $rc
