#!/usr/bin/env bash
# tests/cross.sh — `make test-cross`: gemma3.c gives the fixture's logits on other CPUs.
#
# Builds gemma3.c natively and with Debian's cross compilers (static, no OpenMP), runs the
# foreign builds under qemu-user, and compares `--logits` on the tiny fixture: f32 and bf16
# exports against tests/fixtures/tiny/logits.f32 within max|diff| <= 1e-4 * max|ref|, q8_0 and
# q4_0 exports against the native build within 1e-2 (see compare below); a Q4_K GGUF kept
# as it is (--dtype gguf) against the native build within 1e-3; and the image path:
# tests/fixtures/vision/mm2 (f32, two images) against transformers' logits within 1e-4.
#
# Targets, one per kind of machine (the first that is installed or installable is used):
#   native          the host (x86-64 here): with OpenMP, without, and -DGEMMA3_NO_MMAP
#   64-bit LE       aarch64        (x86_64 on an aarch64 host)
#   32-bit          i686, else armhf                    (+ a -DGEMMA3_NO_MMAP build)
#   big-endian      s390x, else ppc64
# A build that prints compiler warnings counts as a failure (its warnings are shown).
#
# Installs what is missing with apt-get (Debian/Ubuntu; root or sudo), once: later runs find
# everything and install nothing. CROSS_NO_INSTALL=1 forbids installing. Work files go to
# tests/build/cross/. CROSS_TARGETS="armhf ppc64" picks the foreign targets instead.
# Ends with "N passed, N failed"; exits 1 if anything failed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

OUT=tests/build/cross
FIX=tests/fixtures/tiny
VIS=tests/fixtures/vision/mm2
WARN="-std=c99 -Wall -Wextra -pedantic"
OPT="-O2"
RUN_TIMEOUT=300 # seconds per emulated run; the slowest (i686) takes about 2 s

npass=0
nfail=0
pass() { npass=$((npass + 1)); }
fail() { nfail=$((nfail + 1)); }
die() { echo "cross.sh: $*" >&2; echo "0 passed, 1 failed"; exit 2; }

# --- what each target needs -----------------------------------------------------------
# name -> "gnu-triplet qemu-name gcc-package libc-package endianness bits"
target_info() {
    case "$1" in
        aarch64) echo "aarch64-linux-gnu aarch64 gcc-aarch64-linux-gnu libc6-dev-arm64-cross little 64" ;;
        x86_64) echo "x86_64-linux-gnu x86_64 gcc-x86-64-linux-gnu libc6-dev-amd64-cross little 64" ;;
        i686) echo "i686-linux-gnu i386 gcc-i686-linux-gnu libc6-dev-i386-cross little 32" ;;
        armhf) echo "arm-linux-gnueabihf arm gcc-arm-linux-gnueabihf libc6-dev-armhf-cross little 32" ;;
        s390x) echo "s390x-linux-gnu s390x gcc-s390x-linux-gnu libc6-dev-s390x-cross big 64" ;;
        ppc64) echo "powerpc64-linux-gnu ppc64 gcc-powerpc64-linux-gnu libc6-dev-ppc64-cross big 64" ;;
        *) return 1 ;;
    esac
}

# The qemu-user binary for a qemu name, from qemu-user or qemu-user-static; empty if none.
qemu_for() {
    if command -v "qemu-$1" >/dev/null 2>&1; then echo "qemu-$1"
    elif command -v "qemu-$1-static" >/dev/null 2>&1; then echo "qemu-$1-static"
    fi
}

# 0 if the target's compiler, static libc and emulator are all installed.
target_present() {
    local triplet qemu gccpkg libcpkg endian bits
    read -r triplet qemu gccpkg libcpkg endian bits < <(target_info "$1")
    command -v "$triplet-gcc" >/dev/null 2>&1 && [ -f "/usr/$triplet/lib/libc.a" ] && [ -n "$(qemu_for "$qemu")" ]
}

# The packages a target still lacks (qemu-user only if no qemu-user(-static) binary exists).
target_missing_pkgs() {
    local triplet qemu gccpkg libcpkg endian bits
    read -r triplet qemu gccpkg libcpkg endian bits < <(target_info "$1")
    command -v "$triplet-gcc" >/dev/null 2>&1 || echo "$gccpkg"
    [ -f "/usr/$triplet/lib/libc.a" ] || echo "$libcpkg"
    [ -n "$(qemu_for "$qemu")" ] || echo qemu-user
}

# 0 if apt can install every package in "$@" (each has a candidate version).
apt_has() {
    local p cand
    for p in "$@"; do
        cand=$(apt-cache policy "$p" 2>/dev/null | awk '/Candidate:/ {print $2}')
        [ -n "$cand" ] && [ "$cand" != "(none)" ] || return 1
    done
}

# --- choose the targets, install what is missing --------------------------------------
host=$(uname -m)
case "$host" in
    x86_64 | amd64) host=x86_64 ;;
    aarch64 | arm64) host=aarch64 ;;
esac
slots=("aarch64 x86_64" "i686 armhf" "s390x ppc64")
slot_names=("64-bit little-endian" "32-bit" "big-endian")
# CROSS_TARGETS="armhf ppc64" tests exactly those foreign targets instead.
if [ -n "${CROSS_TARGETS:-}" ]; then
    slots=()
    slot_names=()
    for t in $CROSS_TARGETS; do
        target_info "$t" >/dev/null || die "unknown target '$t' in CROSS_TARGETS (known: aarch64 x86_64 i686 armhf s390x ppc64)"
        slots+=("$t")
        slot_names+=("$t")
    done
fi

# Pass 1: a slot is settled by the first candidate already installed (and not the host).
chosen=()
unsettled=0
for i in "${!slots[@]}"; do
    chosen[i]=""
    for t in ${slots[i]}; do
        [ "$t" = "$host" ] && continue
        if target_present "$t"; then chosen[i]=$t; break; fi
    done
    [ -z "${chosen[i]}" ] && unsettled=1
done

# Pass 2: for the rest, the first candidate apt can install.
if [ "$unsettled" = 1 ]; then
    [ "${CROSS_NO_INSTALL:-0}" = 1 ] && die "cross toolchains missing and CROSS_NO_INSTALL=1; run without it to install them"
    command -v apt-get >/dev/null 2>&1 || die "cross toolchains missing and no apt-get here: install a cross gcc + static libc + qemu-user for aarch64, i686 (or armhf) and s390x (or ppc64)"
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || die "installing cross toolchains needs root (or sudo)"
        SUDO=sudo
    fi
    echo "cross.sh: apt-get update"
    $SUDO apt-get update -qq || die "apt-get update failed"
    need=()
    for i in "${!slots[@]}"; do
        [ -n "${chosen[i]}" ] && continue
        for t in ${slots[i]}; do
            [ "$t" = "$host" ] && continue
            read -r -a miss < <(target_missing_pkgs "$t" | tr '\n' ' ')
            if apt_has "${miss[@]}"; then
                chosen[i]=$t
                need+=("${miss[@]}")
                break
            fi
            echo "cross.sh: $t: apt has no candidate for some of: ${miss[*]}; trying the next ${slot_names[i]} target"
        done
        [ -z "${chosen[i]}" ] && echo "cross.sh: no installable ${slot_names[i]} target among: ${slots[i]}"
    done
    if [ ${#need[@]} -gt 0 ]; then
        # qemu-user may be listed by more than one target: install each package once.
        mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
        echo "cross.sh: installing: ${need[*]}"
        if ! DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${need[@]}" \
            >"/tmp/cross-apt.$$.log" 2>&1; then
            tail -20 "/tmp/cross-apt.$$.log" >&2
            die "apt-get install ${need[*]} failed (log above)"
        fi
        rm -f "/tmp/cross-apt.$$.log"
    fi
fi

mkdir -p "$OUT" || die "cannot create $OUT"

# --- export the fixture once, natively -------------------------------------------------
command -v python3 >/dev/null 2>&1 || die "python3 is needed to export the fixture"
# q8_0 / q4_0 are made by the native gemma3 (export.py runs make if needed)
for dt in f32 bf16 q8_0 q4_0; do
    python3 export.py "$FIX" "$OUT/tiny-$dt.bin" --dtype "$dt" -q || die "export.py --dtype $dt failed"
done
python3 export.py "$VIS" "$OUT/mm2-f32.bin" --dtype f32 -q || die "export.py of $VIS failed"
# A GGUF's own K-quant blocks, kept (--dtype gguf): a random 3-layer Q4_K file written with
# gguf-py (tests/test_gguf.sh's venv). gemma3 reads the blocks byte by byte, so a big-endian
# host runs them as they are. Its logits are compared with the native build's.
KEPT=""
if bash tests/test_gguf.sh --setup >"$OUT/venv.log" 2>&1 &&
    tests/data/venv-gguf/bin/python -c "import sys; sys.path.insert(0, 'tests'); import test_gguf as t
t.make_gguf('$OUT/q4_k.gguf', t.T.Q4_K, sane=True, seed=3)" >"$OUT/make-gguf.log" 2>&1 &&
    python3 export.py "$OUT/q4_k.gguf" "$OUT/tiny-gguf.bin" --dtype gguf -q; then
    KEPT=gguf
    echo "2 300 301 302 5 290 291 292 293" >"$OUT/kept-tokens.txt"
else
    echo "cross.sh: cannot make the Q4_K GGUF (gguf-py venv: $OUT/venv.log, $OUT/make-gguf.log)"
    fail
fi

# --- compare logits: python3 standard library only ------------------------------------
# Prints "max|diff| D = R of max|ref| M" and exits 0 if R <= 1e-4 (and every value is finite).
# The reference is the fixture for f32/bf16, and the first native build's output for the
# quantized files (their error against the fixture is tested by make test). Quantized
# logits get a looser bound, 1e-2: activations are rounded to int8 on the fly, and a
# last-bit difference in libm (expf, tanhf) between targets can move one value across a
# rounding boundary (seen: 0.3 % on i686 and s390x, 0 on aarch64).
compare() {
    python3 - "$1" "$2" "$3" <<'EOF'
import math, struct, sys
got_b, ref_b = open(sys.argv[1], "rb").read(), open(sys.argv[2], "rb").read()
if len(got_b) != len(ref_b):
    print("wrong size: %d bytes, expected %d" % (len(got_b), len(ref_b)))
    sys.exit(1)
n = len(ref_b) // 4
got, ref = struct.unpack("<%df" % n, got_b), struct.unpack("<%df" % n, ref_b)
bad = sum(1 for g in got if not math.isfinite(g))
if bad:
    print("%d non-finite values" % bad)
    sys.exit(1)
ref_max = max(abs(r) for r in ref)
diff = max(abs(g - r) for g, r in zip(got, ref))
rel = diff / ref_max
print("max|diff| %.3g = %.3g of max|ref| %.4g" % (diff, rel, ref_max))
sys.exit(0 if rel <= float(sys.argv[3]) else 1)
EOF
}

# build NAME COMPILER "EXTRA FLAGS": compile gemma3.c to $OUT/gemma3-NAME; one result line.
build() {
    local name=$1 cc=$2 extra=$3 log="$OUT/build-$1.log"
    # shellcheck disable=SC2086 # flags are deliberately word-split
    if ! "$cc" $WARN $OPT $extra -o "$OUT/gemma3-$name" gemma3.c -lm >"$log" 2>&1; then
        printf '%-22s %-5s %s\n' "$name" build "FAIL (compile error):"
        sed 's/^/    /' "$log"
        fail
        return 1
    fi
    local nwarn
    nwarn=$(grep -c 'warning:' "$log")
    if [ "$nwarn" -gt 0 ]; then
        printf '%-22s %-5s %s\n' "$name" build "FAIL ($nwarn compiler warnings):"
        sed 's/^/    /' "$log"
        fail
    else
        printf '%-22s %-5s %s\n' "$name" build "PASS ($cc${extra:+ $extra}, no warnings)"
        pass
    fi
    return 0
}

# run NAME "EMULATOR": --logits with both exports; one result line each.
run() {
    local name=$1 emu=$2 dt out err msg ref tol tokens
    for dt in f32 bf16 q8_0 q4_0 $KEPT; do
        out="$OUT/logits-$name-$dt.f32"
        ref="$FIX/logits.f32" tol=1e-4 tokens="$FIX/tokens.txt"
        case $dt in q*) ref="$OUT/logits-$host-native-omp-$dt.f32" tol=1e-2 ;; esac
        # the kept blocks multiply x as two int8 terms (x, and what its rounding left out):
        # a last-bit difference in x moves no logit by more than that second term's rounding
        [ "$dt" = gguf ] && ref="$OUT/logits-$host-native-omp-$dt.f32" tol=1e-3 tokens="$OUT/kept-tokens.txt"
        err="$OUT/run-$name-$dt.err"
        rm -f "$out"
        # shellcheck disable=SC2086 # an empty emulator vanishes
        if ! timeout "$RUN_TIMEOUT" $emu "$OUT/gemma3-$name" "$OUT/tiny-$dt.bin" \
            --logits "$tokens" "$out" >/dev/null 2>"$err"; then
            printf '%-22s %-5s %s\n' "$name" "$dt" "FAIL (gemma3 exited with an error):"
            tail -5 "$err" | sed 's/^/    /'
            fail
            continue
        fi
        if msg=$(compare "$out" "$ref" "$tol"); then
            printf '%-22s %-5s %-52s PASS\n' "$name" "$dt" "$msg"
            pass
        else
            printf '%-22s %-5s %-52s FAIL\n' "$name" "$dt" "$msg"
            fail
        fi
    done
    # the image path: resize, vision tower, projector, image tokens (two images)
    out="$OUT/logits-$name-mm2.f32" err="$OUT/run-$name-mm2.err"
    rm -f "$out"
    # shellcheck disable=SC2086
    if ! timeout "$RUN_TIMEOUT" $emu "$OUT/gemma3-$name" "$OUT/mm2-f32.bin" --logits "$VIS/ids.txt" "$out" \
        --image "$VIS/image-0.ppm" --image "$VIS/image-1.ppm" >/dev/null 2>"$err"; then
        printf '%-22s %-5s %s\n' "$name" image "FAIL (gemma3 exited with an error):"
        tail -5 "$err" | sed 's/^/    /'
        fail
    elif msg=$(compare "$out" "$VIS/logits.f32" 1e-4); then
        printf '%-22s %-5s %-52s PASS\n' "$name" image "$msg"
        pass
    else
        printf '%-22s %-5s %-52s FAIL\n' "$name" image "$msg"
        fail
    fi
}

# --- native ------------------------------------------------------------------------------
NATIVE_CC=${CC:-cc}
command -v "$NATIVE_CC" >/dev/null 2>&1 || die "no native C compiler ($NATIVE_CC)"
echo "host: $host; fixture: $FIX (T=40, vocab=512); limit max|diff| <= 1e-4 of max|ref|"
build "$host-native-omp" "$NATIVE_CC" "-fopenmp" && run "$host-native-omp" ""
build "$host-native" "$NATIVE_CC" "" && run "$host-native" ""
build "$host-native-nommap" "$NATIVE_CC" "-DGEMMA3_NO_MMAP" && run "$host-native-nommap" ""

# --- foreign targets, static, under qemu-user --------------------------------------------
for i in "${!slots[@]}"; do
    t=${chosen[i]}
    if [ -z "$t" ]; then
        printf '%-22s %-5s %s\n' "(${slot_names[i]})" - "FAIL: no toolchain for any of: ${slots[i]}"
        fail
        continue
    fi
    if ! target_present "$t"; then
        printf '%-22s %-5s %s\n' "$t" - "FAIL: toolchain incomplete, missing: $(target_missing_pkgs "$t" | tr '\n' ' ')"
        fail
        continue
    fi
    read -r triplet qemu gccpkg libcpkg endian bits < <(target_info "$t")
    emu=$(qemu_for "$qemu")
    echo "$t: ${bits}-bit ${endian}-endian, $triplet-gcc -static, $emu"
    build "$t" "$triplet-gcc" "-static" && run "$t" "$emu"
    # The read-into-memory loader on a foreign target: the 32-bit one, where the
    # mmap build would otherwise take the mmap path (big-endian hosts always read).
    if [ "$bits" = 32 ]; then
        build "$t-nommap" "$triplet-gcc" "-static -DGEMMA3_NO_MMAP" && run "$t-nommap" "$emu"
    fi
done

echo "$npass passed, $nfail failed"
[ "$nfail" -eq 0 ]
