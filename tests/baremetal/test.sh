#!/usr/bin/env bash
# make test-baremetal: gemma3.c on a machine with no operating system. Builds
# tests/baremetal/firmware.c with the library (gemma3.c, -DGEMMA3_NO_MAIN) for RISC-V
# rv64gc with Debian's bare-metal toolchain and picolibc, the model's bytes linked into
# the image, runs it under qemu-system-riscv64 (`virt` board, semihosting for output and
# exit, a timeout so that it cannot hang) and checks it against the host:
#   1. the logits of the tiny fixture's 40 tokens (f32 export) equal the host's to 1e-6
#      of the largest logit, every argmax the same; it also says whether they are
#      bit-identical to the host's plain-C build;
#   1b. the same for a GGUF's own K-quant blocks (export.py --dtype gguf), against the
#      host's plain-C build;
#   2. a greedy continuation with the real Gemma 3 tokenizer (a small random model) is
#      the same text as the host's `./gemma3 -p ... -t 0`;
#   3. the RAM the image used (static, heap peak, stack peak) is reported.
# Installs its Debian packages on first use (gcc-riscv64-unknown-elf,
# picolibc-riscv64-unknown-elf, qemu-system-misc). Ends with "N passed, N failed".
set -uo pipefail
cd "$(dirname "$0")/../.."
W=tests/build/baremetal
mkdir -p "$W"
pass=0 fail=0
ok() { echo "ok - $1"; pass=$((pass + 1)); }
nok() { echo "not ok - $1"; fail=$((fail + 1)); }
finish() { echo "$pass passed, $fail failed"; [ "$fail" -eq 0 ]; exit $?; }

need=()
command -v riscv64-unknown-elf-gcc >/dev/null || need+=(gcc-riscv64-unknown-elf)
[ -f /usr/lib/picolibc/riscv64-unknown-elf/picolibc.specs ] || need+=(picolibc-riscv64-unknown-elf)
command -v qemu-system-riscv64 >/dev/null || need+=(qemu-system-misc)
if [ ${#need[@]} -gt 0 ]; then
    echo "# installing ${need[*]}"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
    { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"; } \
        >"$W/apt.log" 2>&1 || { nok "install ${need[*]} (see $W/apt.log)"; finish; }
fi

# The image's memory map: tests/baremetal/firmware.ld.
CC=riscv64-unknown-elf-gcc
CFLAGS=(--specs=picolibc.specs --oslib=semihost -march=rv64gc -mabi=lp64d -mcmodel=medany -std=c99 -O2
        -Wall -Wextra -DGEMMA3_NO_MAIN -DGEMMA3_NO_MMAP -I. -I"$W")
LDFLAGS=(-T tests/baremetal/firmware.ld)
QEMU=(timeout 300 qemu-system-riscv64 -machine virt -m 256M -display none -monitor none -serial none -bios none
      -semihosting-config enable=on,target=native)
firmware() { # NAME MODEL_FILE EXTRA_CFLAGS...: build $W/NAME.elf
    local name=$1 model=$2
    shift 2
    "$CC" "${CFLAGS[@]}" "$@" -DMODEL_FILE="\"$model\"" -o "$W/$name.elf" tests/baremetal/firmware.c \
        tests/baremetal/model.S gemma3.c "${LDFLAGS[@]}" -lm >"$W/$name-build.log" 2>&1
}
run_firmware() { # NAME: run $W/NAME.elf in $W; its console (semihosting: qemu's stderr) to $W/NAME.out
    (cd "$W" && "${QEMU[@]}" -kernel "$1.elf" >"$1.out" 2>&1)
}

make -s gemma3 >/dev/null || { nok "host build"; finish; }
cc -std=c99 -O2 -DGEMMA3_NO_SIMD -o "$W/gemma3-plain" gemma3.c -lm || { nok "host plain-C build"; finish; }

# ---- 1. logits of the tiny fixture
python3 export.py tests/fixtures/tiny "$W/tiny-f32.bin" --dtype f32 -q || { nok "export the tiny fixture"; finish; }
./gemma3 "$W/tiny-f32.bin" --logits tests/fixtures/tiny/tokens.txt "$W/host.f32" &&
    "$W/gemma3-plain" "$W/tiny-f32.bin" --logits tests/fixtures/tiny/tokens.txt "$W/host-plain.f32" ||
    { nok "host logits"; finish; }
{ printf 'static const int ids[] = {'; tr -s ' \n' ',,' <tests/fixtures/tiny/tokens.txt | sed 's/,$//'; printf '};\n'; } >"$W/ids.h"
rm -f "$W/logits.f32"
if firmware logits "$PWD/$W/tiny-f32.bin" -DLOGITS; then ok "firmware builds (riscv64, picolibc, logits mode)"
else nok "firmware builds: $(head -5 "$W/logits-build.log")"; finish; fi
if run_firmware logits; then ok "firmware runs under qemu-system-riscv64 and exits 0: $(head -1 "$W/logits.out")"
else nok "firmware run: $(head -5 "$W/logits.out")"; fi
python3 - "$W/logits.f32" "$W/host.f32" "$W/host-plain.f32" <<'EOF'
import struct, sys
def load(p):
    try:
        b = open(p, "rb").read()
    except OSError:
        return None
    return struct.unpack(f"<{len(b) // 4}f", b)
fw, host, plain = (load(p) for p in sys.argv[1:4])
def ok(c, what):
    print(("ok - " if c else "not ok - ") + what)
if not fw or not host or len(fw) != len(host):
    ok(False, "firmware logits: %s values, host %s" % (fw and len(fw), host and len(host)))
    sys.exit()
n, V = 40, len(host) // 40
top = max(abs(v) for v in host)
d = max(abs(a - b) for a, b in zip(fw, host))
am = sum(max(range(V), key=lambda j: fw[t * V + j]) == max(range(V), key=lambda j: host[t * V + j]) for t in range(n))
ok(d <= 1e-6 * top and am == n, f"firmware logits vs host: max|diff| {d:.3g} = {d / top:.2g} of max|logit| {top:.3g}, "
   f"argmax {am}/{n} equal (bound 1e-6)")
same = sum(struct.pack("<f", a) == struct.pack("<f", b) for a, b in zip(fw, plain))
dp = max(abs(a - b) for a, b in zip(fw, plain))
print(f"# vs the host's plain-C build: {same}/{len(fw)} logits bit-identical, max|diff| {dp:.3g}")
EOF

# ---- 1b. logits of a GGUF's own K-quant blocks, kept (--dtype gguf): a random 3-layer Q4_K
# file written with gguf-py (tests/test_gguf.sh's venv), as tests/cross.sh makes it. The
# firmware multiplies the blocks with gguf_blocks.c's plain loops; the reference is the
# host's plain-C build. Activations are rounded to int8 on the fly, so a last-bit difference
# in libm (expf, tanhf) between the two can move a value across a rounding step: the bound
# is 1e-2, as cross.sh's for quantized files.
if bash tests/test_gguf.sh --setup >"$W/venv.log" 2>&1 &&
    tests/data/venv-gguf/bin/python -c "import sys; sys.path.insert(0, 'tests'); import test_gguf as t
t.make_gguf('$W/q4_k.gguf', t.T.Q4_K, sane=True, seed=3)" >"$W/make-gguf.log" 2>&1 &&
    python3 export.py "$W/q4_k.gguf" "$W/kept.bin" --dtype gguf -q >>"$W/make-gguf.log" 2>&1; then
    echo "2 300 301 302 5 290 291 292 293" >"$W/kept-tokens.txt"
    "$W/gemma3-plain" "$W/kept.bin" --logits "$W/kept-tokens.txt" "$W/kept-host.f32" || nok "host logits of the kept Q4_K file"
    { printf 'static const int ids[] = {'; tr -s ' \n' ',,' <"$W/kept-tokens.txt" | sed 's/,$//'; printf '};\n'; } >"$W/ids.h"
    rm -f "$W/logits.f32"
    if firmware kept "$PWD/$W/kept.bin" -DLOGITS; then ok "firmware builds (kept Q4_K GGUF blocks, logits mode)"
    else nok "firmware builds: $(head -5 "$W/kept-build.log")"; fi
    run_firmware kept || nok "firmware run (kept Q4_K): $(head -5 "$W/kept.out")"
    python3 - "$W/logits.f32" "$W/kept-host.f32" <<'EOF'
import struct, sys
def load(p):
    try:
        b = open(p, "rb").read()
    except OSError:
        return None
    return struct.unpack(f"<{len(b) // 4}f", b)
fw, host = (load(p) for p in sys.argv[1:3])
def ok(c, what):
    print(("ok - " if c else "not ok - ") + what)
if not fw or not host or len(fw) != len(host):
    ok(False, "firmware logits of the kept Q4_K file: %s values, host %s" % (fw and len(fw), host and len(host)))
    sys.exit()
n = 9
V = len(host) // n
top = max(abs(v) for v in host)
d = max(abs(a - b) for a, b in zip(fw, host))
am = sum(max(range(V), key=lambda j: fw[t * V + j]) == max(range(V), key=lambda j: host[t * V + j]) for t in range(n))
same = sum(struct.pack("<f", a) == struct.pack("<f", b) for a, b in zip(fw, host))
ok(d <= 1e-2 * top and am == n, f"firmware logits of the kept Q4_K file vs host plain C: max|diff| {d:.3g} = "
   f"{d / top:.2g} of max|logit| {top:.3g}, argmax {am}/{n} equal, {same}/{len(fw)} bit-identical (bound 1e-2)")
EOF
else
    nok "make the kept Q4_K file (gguf-py venv: $W/venv.log, $W/make-gguf.log)"
fi

# ---- 2. a greedy continuation with the real tokenizer
PROMPT="The capital of France is"
STEPS=16
if [ ! -f tests/data/tokenizer.json ]; then bash tests/fetch_tokenizer.sh >"$W/fetch.log" 2>&1 || true; fi
if [ ! -f tests/data/tokenizer.json ]; then nok "the real tokenizer (bash tests/fetch_tokenizer.sh: see $W/fetch.log)"; finish; fi
if [ ! -f "$W/tok-model.bin" ]; then
    python3 tools/make_checkpoint.py "$W/tok-ckpt" --vocab 262144 --hidden 32 --inter 64 --layers 3 --heads 2 \
        --kv-heads 1 --head-dim 16 --qpas 16 --window 6 --pattern 3 --max-pos 4096 --fast-random --seed 9 \
        --tokenizer tests/data/tokenizer.json >"$W/tok.log" 2>&1 &&
        python3 export.py "$W/tok-ckpt" "$W/tok-model.bin" --dtype bf16 -q >>"$W/tok.log" 2>&1 ||
        { nok "make the real-tokenizer model (see $W/tok.log)"; finish; }
fi
./gemma3 "$W/tok-model.bin" -p "$PROMPT" -n $STEPS -t 0 >"$W/host-text.out" 2>/dev/null || { nok "host generation"; finish; }
if firmware text "$PWD/$W/tok-model.bin" -DPROMPT="\"$PROMPT\"" -DSTEPS=$STEPS; then ok "firmware builds (prompt mode, real tokenizer)"
else nok "firmware builds: $(head -5 "$W/text-build.log")"; finish; fi
run_firmware text || nok "firmware run: $(head -5 "$W/text.out")"
sed '/^firmware: RAM:/,$d' "$W/text.out" >"$W/fw-text.out" # the text: all before the RAM line
if cmp -s "$W/fw-text.out" "$W/host-text.out"; then ok "greedy text from the firmware is the host's: $(head -c 80 "$W/host-text.out")"
else nok "greedy text differs: firmware '$(head -c 80 "$W/fw-text.out")', host '$(head -c 80 "$W/host-text.out")'"; fi

# ---- 3. the RAM the images used
for name in logits kept text; do
    [ -f "$W/$name.elf" ] || continue
    static=$(riscv64-unknown-elf-size -A "$W/$name.elf" | awk '$1 == ".data" || $1 == ".bss" || $1 == ".tdata" || $1 == ".tbss" { s += $2 } END { print s + 0 }')
    text=$(riscv64-unknown-elf-size -A "$W/$name.elf" | awk '$1 == ".text" || $1 == ".init" { s += $2 } END { print s + 0 }')
    model=$(wc -c <"$W/$(case $name in logits) echo tiny-f32 ;; kept) echo kept ;; *) echo tok-model ;; esac).bin" | tr -d ' ')
    echo "# $name image: code and read-only data $text bytes (the model file $model of them, in flash or ROM);" \
        "static RAM (.data + .bss) $static bytes; $(grep 'RAM:' "$W/$name.out" | sed 's/^firmware: RAM: //')"
done
finish
