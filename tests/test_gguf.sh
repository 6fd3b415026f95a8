#!/usr/bin/env bash
# GGUF import tests (tests/test_gguf.py) and export.py's own guarantees (tests/test_export.py)
# in a virtual environment holding the pinned gguf-py (llama.cpp's own GGUF reader and
# writer, the reference) and numpy. The venv is made on first use in tests/data/venv-gguf
# (git-ignored, kept across make clean); tests/install_deps.sh makes it too. export.py
# itself runs with the plain python3.
#
#   bash tests/test_gguf.sh [--real MODEL.gguf TOKENIZER.json]   run the tests
#   bash tests/test_gguf.sh --setup                               only make the venv
#
# Prints each script's lines, then the sum "N passed, N failed".
# Exit status: 0 all passed, 1 a check failed, 2 the venv could not be made (skip).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv=tests/data/venv-gguf
mkdir -p tests/build tests/data
if ! "$venv/bin/python" -c 'import gguf, numpy' 2>/dev/null; then
    echo "# making $venv (gguf==0.19.0, numpy==2.4.6)"
    rm -rf "$venv"
    if ! { python3 -m venv "$venv" && "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
            gguf==0.19.0 numpy==2.4.6; } >tests/build/venv-gguf.log 2>&1; then
        echo "# cannot make $venv (python3 -m venv needs python3-venv on Debian; pip needs PyPI): see tests/build/venv-gguf.log"
        exit 2
    fi
fi
[ "${1:-}" = "--setup" ] && exit 0
status=0 passed=0 failed=0
run_script() { # SCRIPT ARGS...: its lines, and its counts added to the sum
    "$venv/bin/python" "$@" > tests/build/test_gguf.part 2>&1 || status=1
    cat tests/build/test_gguf.part
    local last
    last=$(tail -n 1 tests/build/test_gguf.part)
    if [[ $last =~ ^([0-9]+)\ passed,\ ([0-9]+)\ failed$ ]]; then
        passed=$((passed + BASH_REMATCH[1])) failed=$((failed + BASH_REMATCH[2]))
    else
        echo "not ok - $1 did not finish (last line: $last)"
        failed=$((failed + 1)) status=1
    fi
}
run_script tests/test_gguf.py "$@"
run_script tests/test_export.py
run_script tests/test_make_gguf.py
rm -f tests/build/test_gguf.part
echo "$passed passed, $failed failed"
exit $status
