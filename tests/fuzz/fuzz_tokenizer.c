/* fuzz_tokenizer.c — libFuzzer harness: the real Gemma 3 tokenizer on arbitrary bytes.
 *
 * The tokenizer section (FORMAT.md) comes from GEMMA3_FUZZ_TOKENIZER (default
 * tests/build/fuzz/tokenizer.sec, which `make fuzz` writes from tests/data/tokenizer.json).
 * Each input is used three ways:
 *   - encoded: every id in [0, n_tokens); if the bytes are valid UTF-8, decode(encode(s))
 *     is s with every U+2581 "▁" read as a space (as the round-trip tests of test_all.c);
 *     if not, the encoder refuses it naming UTF-8;
 *   - read as little-endian 32-bit ids and decoded: ids in range give text no longer than
 *     the pieces' total, ids out of range are refused;
 *   - streamed through tokenstream_piece/tokenstream_end: never more than tokenstream_max
 *     bytes per call.
 * A broken property abort()s, which libFuzzer reports as a crash. */
#include "../../gemma3.c"

static Tokenizer tok;

static void die(const char *what) {
    fprintf(stderr, "fuzz_tokenizer: %s\n", what);
    abort();
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    const char *path = getenv("GEMMA3_FUZZ_TOKENIZER");
    if (!path) path = "tests/build/fuzz/tokenizer.sec";
    FILE *f = fopen(path, "rb");
    if (!f) { fprintf(stderr, "fuzz_tokenizer: cannot open %s (make fuzz writes it)\n", path); exit(1); }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    rewind(f);
    unsigned char *sec = malloc((size_t)n);
    char err[256];
    if (!sec || fread(sec, 1, (size_t)n, f) != (size_t)n) { fprintf(stderr, "fuzz_tokenizer: cannot read %s\n", path); exit(1); }
    fclose(f);
    if (tokenizer_init(&tok, sec, (size_t)n, err, sizeof err) != 0) { fprintf(stderr, "fuzz_tokenizer: %s\n", err); exit(1); }
    free(sec);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char err[256];
    int *ids = NULL;
    size_t outlen;

    /* 1. encode, then decode back */
    int n = tokenizer_encode(&tok, (const char *)data, size, &ids, err, sizeof err);
    if (n < 0) {
        if (tok_utf8_valid(data, size, NULL)) die("valid UTF-8 refused by encode");
        if (!strstr(err, "UTF-8")) die("invalid UTF-8 refused without saying so");
    } else {
        if ((size_t)n > size) die("more ids than bytes");
        for (int i = 0; i < n; i++)
            if (ids[i] < 0 || ids[i] >= tok.n_tokens) die("encode gave an id out of range");
        char *back;
        tokenizer_decode(&tok, ids, n, &back, &outlen, err, sizeof err);
        if (!back) die("decode refused what encode gave");
        /* the text with each U+2581 as a space */
        char *want = malloc(size + 1);
        size_t w = 0;
        for (size_t i = 0; i < size;) {
            if (i + 2 < size + 0 && data[i] == 0xE2 && data[i + 1] == 0x96 && data[i + 2] == 0x81) want[w++] = ' ', i += 3;
            else want[w++] = (char)data[i++];
        }
        if (outlen != w || memcmp(back, want, w) != 0) die("decode(encode(s)) != s");
        free(want);
        free(back);
        free(ids);
    }

    /* 2. the bytes as ids: decode and stream */
    int nid = (int)(size / 4);
    int *raw = malloc((size_t)(nid ? nid : 1) * sizeof(int));
    int in_range = 1;
    size_t total = 0;
    for (int i = 0; i < nid; i++) {
        uint32_t u = (uint32_t)data[4 * i] | (uint32_t)data[4 * i + 1] << 8 | (uint32_t)data[4 * i + 2] << 16 |
                     (uint32_t)data[4 * i + 3] << 24;
        /* mostly in range (so the decoder is reached), sometimes not */
        raw[i] = (u & 0x80000000u) ? (int)u : (int)(u % (uint32_t)(tok.n_tokens + 16));
        if (raw[i] < 0 || raw[i] >= tok.n_tokens) in_range = 0;
        else total += tok.offs[raw[i] + 1] - tok.offs[raw[i]];
    }
    char *text;
    tokenizer_decode(&tok, raw, nid, &text, &outlen, err, sizeof err);
    if (in_range != (text != NULL)) die("decode: wrong verdict on the ids' range");
    if (text && (outlen > total || strlen(text) > outlen)) die("decode: text longer than its pieces");
    free(text);

    size_t cap = tokenstream_max(&tok);
    char *piece = malloc(cap);
    TokenStream ts = {{0}, 0};
    for (int i = 0; i < nid; i++) {
        size_t k = tokenstream_piece(&tok, &ts, raw[i], piece, cap);
        if (k > cap) die("tokenstream_piece: more than tokenstream_max");
        if (i % 7 == 3) { /* a too-small buffer: nothing written, the stream unchanged */
            TokenStream before = ts;
            size_t need = tokenstream_piece(&tok, &ts, raw[i], piece, 1);
            if (need > 1 && (ts.npending != before.npending || memcmp(ts.pending, before.pending, sizeof ts.pending)))
                die("tokenstream_piece: a short buffer changed the stream");
        }
    }
    if (tokenstream_end(&tok, &ts, piece, cap) > cap) die("tokenstream_end: more than tokenstream_max");
    free(piece);
    free(raw);
    return 0;
}
