#!/usr/bin/env bash
# GGUF import tests (tests/test_gguf.py) in a virtual environment holding the pinned
# gguf-py (llama.cpp's own GGUF reader and writer, the reference) and numpy. The venv is
# made on first use in tests/data/venv-gguf (git-ignored, kept across make clean);
# tests/install_deps.sh makes it too. export.py itself runs with the plain python3.
#
#   bash tests/test_gguf.sh [--real MODEL.gguf TOKENIZER.json]   run the tests
#   bash tests/test_gguf.sh --setup                               only make the venv
#
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
exec "$venv/bin/python" tests/test_gguf.py "$@"
