#!/usr/bin/env bash
# Installs what `make test` needs beyond a C compiler and python3, on Debian/Ubuntu:
# numpy for the independent reference forward (tests/ref_forward.py, run with
# /usr/bin/python3), npm to fetch the real tokenizer, and a venv with the pinned gguf-py
# and numpy for the GGUF import tests (tests/test_gguf.sh). Skips what is already there.
set -euo pipefail
need=()
command -v cc >/dev/null || need+=(gcc)
command -v make >/dev/null || need+=(make)
command -v python3 >/dev/null || need+=(python3)
/usr/bin/python3 -c 'import numpy' 2>/dev/null || need+=(python3-numpy)
command -v npm >/dev/null || need+=(npm)
command -v curl >/dev/null || need+=(curl)
command -v valgrind >/dev/null || need+=(valgrind)
# python3 -m venv (for tests/test_gguf.sh): Debian's python3 needs python3-venv for it
python3 -c 'import ensurepip' 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
bash "$(dirname "${BASH_SOURCE[0]}")/test_gguf.sh" --setup
