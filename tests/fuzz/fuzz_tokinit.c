/* fuzz_tokinit.c — libFuzzer harness: tokenizer_init on arbitrary tokenizer sections
 * (FORMAT.md), and on what it accepts, encode, decode and streaming.
 *
 * The seeds (`make fuzz` writes them: tests/build/fuzz/seeds-tokinit) are the sections of
 * tests/fuzz/tiny-tokenizer.json (20 pieces, 3 merges, byte fallback for A, é and one
 * byte of U+2014) and of a variant without byte pieces or <unk>. Checks: a refusal has a
 * one-line message; an accepted section encodes a few texts to ids in [0, n_tokens) (or
 * refuses them with a message), decodes every id, streams every id within tokenstream_max.
 * A broken property abort()s. */
#include "../../gemma3.c"

static void die(const char *what, const char *err) {
    fprintf(stderr, "fuzz_tokinit: %s%s%s\n", what, err ? ": " : "", err ? err : "");
    abort();
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static const char *const texts[] = {"ab a\xc3\xa9 c", "<start_of_turn>user\n<mask>ab<end_of_turn>\n", "   ",
                                        "A\xe2\x80\x94z\n\n", "<bos><bos"};
    Tokenizer t;
    char err[256] = "";
    if (size > 1 << 20) return 0;
    if (tokenizer_init(&t, data, size, err, sizeof err) != 0) {
        if (!err[0] || strchr(err, '\n')) die("refused without a one-line message", err);
        return 0;
    }
    for (size_t k = 0; k < sizeof texts / sizeof *texts; k++) {
        int *ids = NULL;
        err[0] = 0;
        int n = tokenizer_encode(&t, texts[k], strlen(texts[k]), &ids, err, sizeof err);
        if (n < 0) {
            if (!err[0] || strchr(err, '\n')) die("encode refused without a one-line message", err);
            continue;
        }
        for (int i = 0; i < n; i++)
            if (ids[i] < 0 || ids[i] >= t.n_tokens) die("encode gave an id out of range", NULL);
        size_t len;
        char *back;
        tokenizer_decode(&t, ids, n, &back, &len, err, sizeof err);
        if (!back) die("decode refused what encode gave", err);
        free(back);
        free(ids);
    }
    int n = t.n_tokens < 4096 ? t.n_tokens : 4096;
    int *all = calloc((size_t)n, sizeof(int));
    if (!all) die("out of memory", NULL);
    for (int i = 0; i < n; i++) all[i] = i;
    size_t len, cap = tokenstream_max(&t);
    char *text;
    tokenizer_decode(&t, all, n, &text, &len, err, sizeof err);
    if (!text) die("decode of every id refused", err);
    free(text);
    char *piece = malloc(cap);
    TokenStream ts = {{0}, 0};
    for (int i = 0; i < n; i++)
        if (tokenstream_piece(&t, &ts, i, piece, cap) > cap) die("tokenstream_piece: more than tokenstream_max", NULL);
    if (tokenstream_end(&t, &ts, piece, cap) > cap) die("tokenstream_end: more than tokenstream_max", NULL);
    free(piece);
    free(all);
    tokenizer_free(&t);
    return 0;
}
