#!/usr/bin/env bash
# The image path's speed on the Gemma 3 4B shape (random weights): one image resized to
# 896 x 896, through the SigLIP tower (4,096 patches, 27 layers 1,152 wide, MLP 4,304),
# the projector, and its 256 soft tokens into a one-layer text model of the 4B width
# (2,560). Prints a Markdown table on stdout (progress on stderr). Not a test: numbers
# depend on the machine and its load and are never asserted. make bench runs it after
# tools/bench.sh.
#
#   bash tools/bench_image.sh [--quick]    --quick: a 224 px, 2-layer tower (seconds)
#
# Environment (defaults in brackets):
#   DTYPES="bf16 q8_0"   export.py --dtype values to measure
#   REPEAT=1             runs per type; the fastest is kept
#   OMP_NUM_THREADS      threads                                   [all cores]
#   GEMMA3=./gemma3      binary to measure (default: `make gemma3` first)
#   BENCH_DIR=tests/build/bench   cache of the checkpoint and exported files
#
# The time is gemma3's own ("N images in X s" of --logits --image on stderr): from the
# 8-bit pixels to the image's tokens in the KV cache, without process start or loading.
# The 4B-shape checkpoint (tools/make_checkpoint.py --vision, seed 1) takes about 0.8 GB
# (bf16), each export as much again.
set -euo pipefail
cd "$(dirname "$0")/.."
quick=0
[ "${1:-}" = --quick ] && quick=1
DTYPES=${DTYPES:-bf16 q8_0}
REPEAT=${REPEAT:-1}
BENCH_DIR=${BENCH_DIR:-tests/build/bench}
if [ -z "${GEMMA3:-}" ]; then make -s gemma3 >&2; GEMMA3=./gemma3; fi
mkdir -p "$BENCH_DIR"

if [ $quick = 1 ]; then name=vision-quick vision=224,14,1152,4304,2,16,256; else name=vision-4b vision=896,14,1152,4304,27,16,256; fi
ck="$BENCH_DIR/$name"
if [ ! -s "$ck/model.safetensors" ]; then
    echo "making the random checkpoint $ck ..." >&2
    python3 tools/make_checkpoint.py "$ck" --layout nested --vocab 512 --hidden 2560 --inter 256 --layers 1 \
        --heads 8 --kv-heads 4 --head-dim 256 --qpas 256 --window 1024 --pattern 6 --rope-scaling 8 \
        --vision "$vision" --image-tokens 510,508,509 --fast-random --seed 1 >&2
fi
# the ids of one image as the processor writes them: \n\n <start_of_image> 256 x image <end_of_image> \n\n
ids="$BENCH_DIR/$name.ids"
python3 -c "print(' '.join(['2', '108', '508'] + ['510'] * 256 + ['509', '108']))" > "$ids"
# a 1280 x 960 photo-sized image (resized to the tower's size like any other)
img="$BENCH_DIR/image-1280x960.ppm"
[ -s "$img" ] || python3 -c "
import sys
w, h = 1280, 960
row = lambda y: bytes((x * 7 + y * 3 + c * 50) % 256 for x in range(w) for c in range(3))
sys.stdout.buffer.write(b'P6\n%d %d\n255\n' % (w, h) + b''.join(row(y) for y in range(h)))" > "$img"

threads=${OMP_NUM_THREADS:-$(nproc 2> /dev/null || echo 1)}
echo "| type | file | image (1280 x 960 -> ${vision%%,*} px), s | threads |"
echo "|---|---:|---:|---:|"
for dt in $DTYPES; do
    bin="$BENCH_DIR/$name-$dt.bin"
    if [ ! -s "$bin" ] || [ export.py -nt "$bin" ]; then
        echo "exporting $dt ..." >&2
        python3 export.py "$ck" "$bin" --dtype "$dt" -q || { echo "| $dt | export failed | | |"; continue; }
    fi
    best=
    for _ in $(seq "$REPEAT"); do
        line=$("$GEMMA3" "$bin" --logits "$ids" "$BENCH_DIR/$name.f32" --image "$img" 2>&1 >/dev/null | grep ' images\? in ')
        s=$(echo "$line" | sed -E 's/.* in ([0-9.]+) s.*/\1/')
        echo "  $dt: $line" >&2
        if [ -z "$best" ] || python3 -c "import sys; sys.exit(not $s < $best)"; then best=$s; fi
    done
    size=$(python3 -c "import os; print('%.2f GB' % (os.path.getsize('$bin') / 1e9))")
    echo "| $dt | $size | $best | $threads |"
done
