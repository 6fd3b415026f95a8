/*
 * tests/test_api.c — the library through gemma3.h only, as a product links it: error paths,
 * open_memory against open_file, the caller's arena (no allocation after creation), rewind,
 * generation that stops early, chat turns, sessions on several threads.
 *
 *   test_api TOK_MODEL.bin             all of it (test_all runs it; make tsan, under TSan)
 *   test_api TOK_MODEL.bin --threads   only the sessions on threads
 *
 * TOK_MODEL.bin is tests/build/tok-model.bin: a small random model with the real Gemma 3
 * tokenizer (262,145 tokens) and a 262,144-row embedding table. It is linked with
 * -Wl,--wrap=malloc,--wrap=calloc,--wrap=realloc, so the library's allocations are counted.
 * Ends with "N passed, N failed".
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gemma3.h"

static int g_pass, g_fail;

#define CHECK(cond, ...)                                                   \
    do {                                                                   \
        if (cond) {                                                        \
            g_pass++;                                                      \
        } else {                                                           \
            g_fail++;                                                      \
            printf("  FAIL %s:%d: ", __FILE__, __LINE__);                  \
            printf(__VA_ARGS__);                                           \
            printf("\n");                                                  \
        }                                                                  \
    } while (0)

/* Allocation counting: every malloc/calloc/realloc of the library comes through here. */
void *__real_malloc(size_t n);
void *__real_calloc(size_t n, size_t size);
void *__real_realloc(void *p, size_t n);
static volatile long g_allocs; /* (only read while one thread runs) */
static volatile int g_counting;
static volatile long g_fail_in = -1; /* >= 0: that many allocations succeed, the next fails */
static int refuse(void) { return g_fail_in >= 0 && g_fail_in-- == 0; }
void *__wrap_malloc(size_t n) {
    if (g_counting) g_allocs++;
    return refuse() ? NULL : __real_malloc(n);
}
void *__wrap_calloc(size_t n, size_t size) {
    if (g_counting) g_allocs++;
    return refuse() ? NULL : __real_calloc(n, size);
}
void *__wrap_realloc(void *p, size_t n) {
    if (g_counting) g_allocs++;
    return refuse() ? NULL : __real_realloc(p, n);
}

/* An error came back as it should: the code, and a one-line message naming the problem. */
static void expect(const char *what, int rc, const gemma3_error *e, int code, const char *needle) {
    int ok = rc == code && e->code == code && e->message[0] && !strchr(e->message, '\n') &&
             (!needle || strstr(e->message, needle));
    CHECK(ok, "%s: got %d '%s', wanted %d and a line with '%s'", what, rc, e->message, code, needle ? needle : "");
    printf("  %-46s -> %d %s\n", what, rc, e->message);
}

static unsigned char *read_file(const char *path, size_t *size) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    rewind(f);
    unsigned char *p = malloc((size_t)n + 64);
    if (p && fread(p, 1, (size_t)n, f) != (size_t)n) { free(p); p = NULL; }
    fclose(f);
    *size = (size_t)n;
    return p;
}

static gemma3_options sampling(float temperature, unsigned seed, int context) {
    gemma3_options o = gemma3_default_options();
    o.temperature = temperature, o.seed = seed, o.context = context;
    return o;
}

/* Collects what gemma3_generate / gemma3_chat_turn deliver; stops after `stop_after` ids. */
typedef struct {
    int ids[512], n, stop_after;
    char text[8192];
    size_t len;
} Collect;

static int collect(const char *piece, size_t len, int id, void *user) {
    Collect *c = user;
    if (id >= 0 && c->n < 512) c->ids[c->n++] = id;
    if (c->len + len < sizeof c->text) memcpy(c->text + c->len, piece, len), c->len += len;
    return c->stop_after && c->n >= c->stop_after;
}

static const char *g_path;

/* Feed a prompt, then generate `steps` tokens with the given sampler: the ids. */
static int run_prompt(const gemma3_model *m, const gemma3_options *o, const char *prompt, int steps, Collect *out) {
    gemma3_session *s;
    gemma3_error e;
    int ids[64], n;
    memset(out, 0, sizeof *out);
    if (gemma3_session_new(m, o, &s, &e) != 0) return -1;
    ids[0] = gemma3_model_config(m).bos_id;
    n = gemma3_tokenize(m, prompt, strlen(prompt), ids + 1, 63, &e);
    int rc = n < 0 || n > 63 ? -1 : gemma3_feed(s, ids, n + 1, &e) < 0 ? -1 : gemma3_generate(s, steps, collect, out, &e);
    gemma3_session_free(s);
    return rc;
}

/* ---- sessions on threads ---- */

typedef struct {
    const gemma3_model *m;
    unsigned seed;
    Collect got;
    int rc;
} Job;

static void *thread_main(void *arg) {
    Job *j = arg;
    gemma3_options o = sampling(1.0f, j->seed, 256);
    j->rc = run_prompt(j->m, &o, j->seed % 2 ? "Once upon a time" : "The weather today is", 24, &j->got);
    return NULL;
}

static void test_threads(const gemma3_model *m) {
    enum { N = 4 };
    Job alone[N], together[N];
    pthread_t t[N];
    printf("sessions on %d threads, one shared model\n", N);
    for (int i = 0; i < N; i++) {
        alone[i].m = together[i].m = m;
        alone[i].seed = together[i].seed = 100 + (unsigned)i;
        thread_main(&alone[i]);
    }
    for (int i = 0; i < N; i++) CHECK(pthread_create(&t[i], NULL, thread_main, &together[i]) == 0, "pthread_create");
    for (int i = 0; i < N; i++) pthread_join(t[i], NULL);
    int same = 1;
    for (int i = 0; i < N; i++)
        same &= alone[i].rc == 24 && together[i].rc == 24 && alone[i].got.n == together[i].got.n &&
                !memcmp(alone[i].got.ids, together[i].got.ids, sizeof alone[i].got.ids);
    CHECK(same, "sessions on threads gave other tokens than each alone");
    printf("  %d sessions x 24 tokens on threads == each alone: %s\n", N, same ? "yes" : "NO");
}

/* ---- error paths ---- */

static void test_errors(const gemma3_model *m, const unsigned char *bytes, size_t size) {
    gemma3_error e;
    gemma3_model *bad = NULL;
    gemma3_session *s = NULL;
    gemma3_config c = gemma3_model_config(m);
    printf("errors: codes and one-line messages, no exit\n");
    expect("open_file(NULL)", gemma3_open_file(NULL, &bad, &e), &e, GEMMA3_E_ARG, NULL);
    expect("open_file of a missing file", gemma3_open_file("tests/build/no-such.bin", &bad, &e), &e, GEMMA3_E_IO,
           "cannot open");
    expect("open_file of a directory", gemma3_open_file("tests", &bad, &e), &e, GEMMA3_E_IO, "not a regular file");
    CHECK(gemma3_open_file(NULL, NULL, NULL) == GEMMA3_E_ARG, "a NULL error struct must be allowed");
    expect("open_memory(NULL)", gemma3_open_memory(NULL, 10, &bad, &e), &e, GEMMA3_E_ARG, NULL);
    expect("open_memory of 10 bytes", gemma3_open_memory(bytes, 10, &bad, &e), &e, GEMMA3_E_FORMAT, "too short");
    expect("open_memory of a truncated model", gemma3_open_memory(bytes, size / 2, &bad, &e), &e, GEMMA3_E_FORMAT,
           "truncated");
    expect("open_memory, misaligned", gemma3_open_memory(bytes + 1, size - 1, &bad, &e), &e, GEMMA3_E_ARG, "aligned");
    unsigned char *copy = malloc(size);
    memcpy(copy, bytes, size);
    memcpy(copy, "GM3X", 4);
    expect("open_memory, bad magic", gemma3_open_memory(copy, size, &bad, &e), &e, GEMMA3_E_FORMAT, "magic");
    memcpy(copy, "GGUF", 4);
    expect("open_memory of a GGUF", gemma3_open_memory(copy, size, &bad, &e), &e, GEMMA3_E_FORMAT,
           "is a GGUF file: convert it first with python3 export.py");
    memcpy(copy, bytes, size);
    copy[16 + 4 * 9 + 3] = 0x80; /* bos_id with its top bit set */
    expect("open_memory, bos id 0x80000002", gemma3_open_memory(copy, size, &bad, &e), &e, GEMMA3_E_FORMAT, "special");
    free(copy);
    CHECK(bad == NULL, "a failed open must leave *model NULL");

    expect("session_new(NULL model)", gemma3_session_new(NULL, NULL, &s, &e), &e, GEMMA3_E_ARG, NULL);
    gemma3_options o = sampling(1.0f, 1, c.max_context + 1);
    expect("session with a context over the maximum", gemma3_session_new(m, &o, &s, &e), &e, GEMMA3_E_ARG, "context");
    o = sampling(1.0f, 1, 64);
    o.system_prompt = "caf\xc3"; /* cut inside a character */
    expect("session with a system prompt of invalid UTF-8", gemma3_session_new(m, &o, &s, &e), &e, GEMMA3_E_TEXT,
           "the system prompt is not valid UTF-8 (byte 3)");
    o = sampling(-1.0f, 1, 64);
    expect("session with temperature -1", gemma3_session_new(m, &o, &s, &e), &e, GEMMA3_E_ARG, "temperature");
    CHECK(gemma3_session_bytes(NULL, NULL, &e) == GEMMA3_E_ARG, "session_bytes(NULL)");

    int ids[300];
    expect("tokenize '<image_soft_token>'", gemma3_tokenize(m, "a <image_soft_token>", 20, ids, 300, &e), &e,
           GEMMA3_E_TOKEN, "<image_soft_token>");
    expect("tokenize invalid UTF-8", gemma3_tokenize(m, "ab\xff", 3, ids, 300, &e), &e, GEMMA3_E_TEXT, "UTF-8");
    expect("tokenize(NULL text)", gemma3_tokenize(m, NULL, 3, ids, 300, &e), &e, GEMMA3_E_ARG, NULL);
    int big = c.vocab_size;
    expect("detokenize an id past the table", gemma3_detokenize(m, &big, 1, NULL, 0, &e), &e, GEMMA3_E_TOKEN, "262144");
    gemma3_message two_users[2] = {{"user", "a"}, {"user", "b"}};
    expect("chat_render, roles not alternating", gemma3_chat_render(two_users, 2, 1, NULL, 0, &e), &e, GEMMA3_E_TEXT,
           "alternate");

    o = sampling(0.0f, 1, 16);
    if (gemma3_session_new(m, &o, &s, &e) != 0) { CHECK(0, "session: %s", e.message); return; }
    CHECK(gemma3_logits(s, &e) == NULL && e.code == GEMMA3_E_STATE, "logits before any feed");
    expect("sample before any feed", gemma3_sample(s, &e), &e, GEMMA3_E_STATE, "feed");
    expect("generate before any feed", gemma3_generate(s, 4, NULL, NULL, &e), &e, GEMMA3_E_STATE, "feed");
    int bad_ids[3] = {2, c.vocab_size, 5}, neg[2] = {2, -1};
    expect("feed an id past the table", gemma3_feed(s, bad_ids, 3, &e), &e, GEMMA3_E_TOKEN, "262144");
    expect("feed id -1", gemma3_feed(s, neg, 2, &e), &e, GEMMA3_E_TOKEN, "-1");
    expect("feed(NULL ids)", gemma3_feed(s, NULL, 2, &e), &e, GEMMA3_E_ARG, NULL);
    CHECK(gemma3_position(s) == 0, "a refused feed must feed nothing (position %d)", gemma3_position(s));
    int many[17];
    for (int i = 0; i < 17; i++) many[i] = 2 + i;
    expect("feed 17 ids into a context of 16", gemma3_feed(s, many, 17, &e), &e, GEMMA3_E_CONTEXT, "context");
    expect("rewind past the position", gemma3_rewind(s, 3, &e), &e, GEMMA3_E_ARG, NULL);
    /* a context that fills while generating: the last token is delivered, not fed */
    Collect got;
    memset(&got, 0, sizeof got);
    CHECK(gemma3_feed(s, many, 10, &e) == 10, "feed 10: %s", e.message);
    int k = gemma3_generate(s, 50, collect, &got, &e);
    CHECK(gemma3_position(s) == 16 && gemma3_context(s) == 16 && k == 7,
          "generating into a full context: %d delivered, position %d (wanted 7 and 16)", k, gemma3_position(s));
    expect("generate with the context full", gemma3_generate(s, 5, NULL, NULL, &e), &e, GEMMA3_E_STATE, NULL);
    gemma3_session_free(s);
}

/* ---- open_memory, arena, rewind, early stop, chat ---- */

static void test_memory_and_arena(const gemma3_model *file_model, const unsigned char *bytes, size_t size) {
    gemma3_error e;
    gemma3_model *mem;
    printf("open_memory, arena, rewind, early stop\n");
    /* a buffer of the caller's, 64-byte aligned */
    unsigned char *aligned = (unsigned char *)bytes + (64 - (uintptr_t)bytes % 64) % 64;
    memmove(aligned, bytes, size);
    if (gemma3_open_memory(aligned, size, &mem, &e) != 0) { CHECK(0, "open_memory: %s", e.message); return; }
    gemma3_config c = gemma3_model_config(mem);
    int ids[40], n = gemma3_tokenize(mem, "The quick brown fox jumps over the lazy dog", 43, ids + 1, 39, &e);
    ids[0] = c.bos_id;
    n++;
    gemma3_options o = sampling(1.0f, 5, 256);
    gemma3_session *a, *b;
    gemma3_session_new(file_model, &o, &a, &e);
    gemma3_session_new(mem, &o, &b, &e);
    gemma3_feed(a, ids, n, &e);
    gemma3_feed(b, ids, n, &e);
    const float *la = gemma3_logits(a, &e), *lb = gemma3_logits(b, &e);
    CHECK(la && lb && !memcmp(la, lb, (size_t)c.vocab_size * sizeof(float)), "open_memory logits differ from open_file's");
    printf("  open_memory == open_file: the same logits, to the bit\n");
    gemma3_session_free(a);
    /* gemma3_feed_logits: every position's logits; the last row is gemma3_feed's */
    float *rows = malloc((size_t)n * c.vocab_size * sizeof(float));
    gemma3_session_new(mem, &o, &a, &e);
    int fed = gemma3_feed_logits(a, ids, n, rows, NULL, &e);
    const float *lf = gemma3_logits(a, &e);
    CHECK(fed == n && lf && !memcmp(rows + (size_t)(n - 1) * c.vocab_size, lb, (size_t)c.vocab_size * sizeof(float)) &&
              !memcmp(lf, lb, (size_t)c.vocab_size * sizeof(float)),
          "gemma3_feed_logits' last row differs from gemma3_feed's logits");
    gemma3_session_free(a);
    free(rows);

    /* the arena: session_bytes is enough, one byte less is refused, nothing is allocated */
    int64_t need = gemma3_session_bytes(mem, &o, &e);
    unsigned char *arena = malloc((size_t)need + 1);
    gemma3_session *s;
    o.arena = arena + 1, o.arena_size = (size_t)need - 1; /* misaligned on purpose */
    expect("arena one byte short", gemma3_session_new(mem, &o, &s, &e), &e, GEMMA3_E_ARENA, "arena");
    o.arena_size = (size_t)need;
    g_allocs = 0, g_counting = 1;
    int rc = gemma3_session_new(mem, &o, &s, &e);
    long at_creation = g_allocs;
    CHECK(rc == 0, "session in an arena of session_bytes: %s", e.message);
    if (rc != 0) { g_counting = 0; free(arena); gemma3_session_free(b); gemma3_close(mem); return; }
    Collect in_arena, on_heap;
    memset(&in_arena, 0, sizeof in_arena);
    memset(&on_heap, 0, sizeof on_heap);
    gemma3_feed(s, ids, n, &e);
    const float *ls = gemma3_logits(s, &e);
    int same_logits = ls && !memcmp(ls, lb, (size_t)c.vocab_size * sizeof(float));
    int first = gemma3_sample(s, &e);
    gemma3_feed(s, &first, 1, &e);
    gemma3_generate(s, 20, collect, &in_arena, &e);
    gemma3_rewind(s, n, &e);
    gemma3_generate(s, 5, NULL, NULL, &e);
    gemma3_set_sampling(s, &o, &e);
    g_counting = 0;
    printf("  arena of %lld bytes: %ld allocations at creation, %ld in feed/logits/sample/generate/rewind\n",
           (long long)need, at_creation, g_allocs - at_creation);
    CHECK(g_allocs == 0, "%ld allocations with an arena", g_allocs);
    int first_b = gemma3_sample(b, &e);
    gemma3_feed(b, &first_b, 1, &e);
    gemma3_generate(b, 20, collect, &on_heap, &e);
    CHECK(same_logits && first == first_b && in_arena.n == on_heap.n &&
              !memcmp(in_arena.ids, on_heap.ids, sizeof in_arena.ids),
          "a session in an arena gives other tokens than one on the heap");
    gemma3_session_free(s);
    gemma3_session_free(b);
    free(arena);

    /* rewind: the same logits as a fresh session fed the same prefix, to the bit, both
     * while the sliding rings still hold it and after they have moved on (re-fed) */
    o = sampling(0.0f, 1, 512);
    int long_ids[300];
    for (int i = 0; i < 300; i++) long_ids[i] = i == 0 ? c.bos_id : 1000 + 37 * i;
    gemma3_session_new(mem, &o, &s, &e);
    gemma3_session_new(mem, &o, &a, &e);
    const int points[] = {290, 200, 150, 30, 1};
    int rewound_ok = 1;
    for (int p = 0; p < 5; p++) {
        gemma3_rewind(s, 0, &e);
        gemma3_feed(s, long_ids, 300, &e);
        int pos = gemma3_rewind(s, points[p], &e);
        gemma3_rewind(a, 0, &e);
        gemma3_feed(a, long_ids, points[p], &e);
        const float *x = gemma3_logits(s, &e), *y = gemma3_logits(a, &e);
        rewound_ok &= pos == points[p] && x && y && !memcmp(x, y, (size_t)c.vocab_size * sizeof(float));
    }
    CHECK(rewound_ok, "rewind's logits differ from a fresh session's");
    /* and what comes after a rewind is what came the first time (greedy) */
    Collect g1, g2;
    memset(&g1, 0, sizeof g1);
    memset(&g2, 0, sizeof g2);
    gemma3_rewind(s, 0, &e);
    gemma3_feed(s, long_ids, 20, &e);
    gemma3_generate(s, 10, collect, &g1, &e);
    gemma3_rewind(s, 20, &e);
    gemma3_generate(s, 10, collect, &g2, &e);
    CHECK(g1.n == 10 && g2.n == 10 && !memcmp(g1.ids, g2.ids, sizeof g1.ids), "generation after a rewind differs");
    printf("  rewind to 290, 200, 150 (re-fed: the rings moved on), 30, 1 == a fresh session; generate again: %s\n",
           rewound_ok && !memcmp(g1.ids, g2.ids, sizeof g1.ids) ? "the same" : "DIFFERENT");
    /* early stop: the callback asks after 3 tokens */
    Collect stop;
    memset(&stop, 0, sizeof stop);
    stop.stop_after = 3;
    gemma3_rewind(s, 20, &e);
    int k = gemma3_generate(s, 10, collect, &stop, &e);
    CHECK(k == 3 && stop.n == 3 && gemma3_position(s) == 23 && !memcmp(stop.ids, g1.ids, 3 * sizeof(int)),
          "early stop: %d tokens, position %d (wanted 3, 23)", k, gemma3_position(s));
    printf("  a callback that stops after 3 tokens: %d delivered, position %d\n", k, gemma3_position(s));
    /* generation in pieces: 4 then 6 tokens == 10 at once; the logits after the 4 (and a feed
     * after them) == those of a session fed the prompt and the 4 ids */
    Collect p1, p2;
    memset(&p1, 0, sizeof p1);
    memset(&p2, 0, sizeof p2);
    gemma3_rewind(s, 20, &e);
    int k4 = gemma3_generate(s, 4, collect, &p1, &e);
    int pos4 = gemma3_position(s);
    gemma3_rewind(a, 0, &e);
    gemma3_feed(a, long_ids, 20, &e);
    gemma3_feed(a, g1.ids, 4, &e);
    const float *after4 = gemma3_logits(s, &e), *fed4 = gemma3_logits(a, &e);
    int same4 = after4 && fed4 && !memcmp(after4, fed4, (size_t)c.vocab_size * sizeof(float));
    int k6 = gemma3_generate(s, 6, collect, &p2, &e);
    CHECK(k4 == 4 && pos4 == 24 && k6 == 6 && same4 && !memcmp(p1.ids, g1.ids, 4 * sizeof(int)) &&
              !memcmp(p2.ids, g1.ids + 4, 6 * sizeof(int)),
          "generate 4 then 6 differs from 10 at once (%d, %d, position %d, logits %s)", k4, k6, pos4,
          same4 ? "same" : "differ");
    gemma3_rewind(s, 20, &e);
    gemma3_generate(s, 4, NULL, NULL, &e);
    gemma3_feed(s, long_ids + 100, 3, &e);
    gemma3_feed(a, long_ids + 100, 3, &e);
    const float *xs = gemma3_logits(s, &e), *xa = gemma3_logits(a, &e);
    CHECK(gemma3_position(s) == 27 && xs && xa && !memcmp(xs, xa, (size_t)c.vocab_size * sizeof(float)),
          "a feed after a generate differs from feeding the same ids");
    printf("  generate 4 then 6 == 10 at once; logits and a feed after it == a session fed the same ids\n");
    gemma3_session_free(a);
    gemma3_session_free(s);

    /* streaming pieces: a short buffer is refused without losing the stream's state */
    gemma3_stream st;
    char buf[64];
    int hello[2];
    memset(&st, 0, sizeof st);
    gemma3_tokenize(mem, " Hello", 6, hello, 2, &e);
    /* snprintf-style sizes: the count is what the whole result needs */
    int all3[3], one[1], k0 = gemma3_tokenize(mem, "Hello world again", 17, NULL, 0, &e);
    int k1 = gemma3_tokenize(mem, "Hello world again", 17, one, 1, &e), k3 = gemma3_tokenize(mem, "Hello world again", 17, all3, 3, &e);
    int d = gemma3_detokenize(mem, hello, 1, buf, 4, &e);
    gemma3_message msgs[1] = {{"user", "Hi"}};
    int r = gemma3_chat_render(msgs, 1, 1, buf + 8, 10, &e);
    CHECK(k0 == k1 && k1 == k3 && k3 >= 2 && one[0] == all3[0] && d == 6 && !strcmp(buf, " He") && r == 62 &&
              !strcmp(buf + 8, "<bos><sta"),
          "snprintf-style sizes: tokenize %d %d %d, detokenize %d '%s', chat_render %d", k0, k1, k3, d, buf, r);
    int need_len = gemma3_stream_put(mem, &st, hello[0], buf, 2);
    int got_len = gemma3_stream_put(mem, &st, hello[0], buf, sizeof buf);
    CHECK(need_len == 6 && got_len == 6 && !memcmp(buf, " Hello", 6), "stream_put: %d then %d", need_len, got_len);
    gemma3_close(mem);
}

/* A chat turn with a token the model has no row for is refused, and the conversation goes
 * on as if it had not been sent. */
static void test_chat(const gemma3_model *m) {
    gemma3_error e;
    gemma3_session *s, *t;
    gemma3_options o = sampling(1.0f, 9, 512);
    printf("chat turns\n");
    o.system_prompt = "Be brief.";
    gemma3_session_new(m, &o, &s, &e);
    gemma3_session_new(m, &o, &t, &e);
    Collect a1, a2, b1, b2;
    memset(&a1, 0, sizeof a1), memset(&a2, 0, sizeof a2), memset(&b1, 0, sizeof b1), memset(&b2, 0, sizeof b2);
    gemma3_chat_turn(s, "Hello there!", 12, 8, collect, &a1, &e);
    int pos = gemma3_position(s);
    expect("chat turn with '<image_soft_token>'", gemma3_chat_turn(s, "Look: <image_soft_token>", 24, 8, collect, &a2, &e),
           &e, GEMMA3_E_TOKEN, "<image_soft_token>");
    CHECK(gemma3_position(s) == pos && a2.n == 0, "a refused turn changed the session");
    expect("chat turn with invalid UTF-8", gemma3_chat_turn(s, "\xc3(", 2, 8, NULL, NULL, &e), &e, GEMMA3_E_TEXT, "UTF-8");
    gemma3_chat_turn(s, "And then?", 9, 8, collect, &a2, &e);
    gemma3_chat_turn(t, "Hello there!", 12, 8, collect, &b1, &e);
    gemma3_chat_turn(t, "And then?", 9, 8, collect, &b2, &e);
    CHECK(a1.n == b1.n && a2.n == b2.n && !memcmp(a1.ids, b1.ids, sizeof a1.ids) && !memcmp(a2.ids, b2.ids, sizeof a2.ids),
          "the conversation after a refused message differs from one without it");
    printf("  a refused message leaves the conversation as it was: the next reply is the same as without it\n");
    gemma3_session_free(s);
    gemma3_session_free(t);
    /* a context that fills: GEMMA3_E_CONTEXT */
    o = sampling(1.0f, 3, 48);
    gemma3_session_new(m, &o, &s, &e);
    int rc = 0, turns = 0;
    while (rc >= 0 && turns < 20) rc = gemma3_chat_turn(s, "Tell me a story about seven dragons.", 36, 12, NULL, NULL, &e), turns++;
    expect("chat until the context of 48 is full", rc, &e, GEMMA3_E_CONTEXT, "context");
    gemma3_session_free(s);
}

/* Out of memory: each call below runs again and again with its 1st, 2nd, ... allocation
 * failing, until it makes no more; every failure must be GEMMA3_E_NOMEM with a message
 * (not another code, not a crash; nothing leaked: ASan's leak check in make asan). */
typedef struct {
    gemma3_model *m;
    const unsigned char *bytes;
    size_t size;
} OomCtx;

static int oom_call(int which, OomCtx *x, gemma3_error *e) {
    gemma3_model *m2 = NULL;
    gemma3_session *s = NULL;
    gemma3_message msgs[2] = {{"system", "Be brief."}, {"user", "Hello there"}};
    int ids[64], hello[3] = {2, 9259, 1902}, rc;
    char text[256];
    switch (which) {
    case 0: rc = gemma3_open_file(g_path, &m2, e); break;
    case 1: rc = gemma3_open_memory(x->bytes, x->size, &m2, e); break;
    case 2: return gemma3_tokenize(x->m, "Hello <start_of_turn> world", 27, ids, 64, e);
    case 3: return gemma3_detokenize(x->m, hello, 3, text, sizeof text, e);
    case 4: return gemma3_chat_render(msgs, 2, 1, text, sizeof text, e);
    case 5: rc = gemma3_session_new(x->m, NULL, &s, e); break;
    default: { /* a chat turn, on a session made before the allocations start failing */
        long fail_in = g_fail_in;
        gemma3_options o = gemma3_default_options();
        o.context = 256, o.temperature = 0.0f;
        g_fail_in = -1;
        if (gemma3_session_new(x->m, &o, &s, e) != 0) return -100;
        g_fail_in = fail_in;
        rc = gemma3_chat_turn(s, "Hello there", 11, 4, NULL, NULL, e);
    }
    }
    gemma3_close(m2);
    gemma3_session_free(s);
    return rc;
}

static void test_out_of_memory(gemma3_model *m, const unsigned char *bytes, size_t size) {
    static const char *const names[] = {"open_file", "open_memory", "tokenize", "detokenize", "chat_render",
                                        "session_new", "chat_turn"};
    OomCtx x = {m, bytes, size};
    printf("out of memory: every allocation of a call failing in turn\n");
    for (int which = 0; which < 7; which++) {
        int k, wrong = 0, rc = 0;
        gemma3_error e;
        for (k = 0; k < 10000; k++) {
            memset(&e, 0, sizeof e);
            g_fail_in = k;
            rc = oom_call(which, &x, &e);
            int failed_one = g_fail_in < 0;
            g_fail_in = -1;
            if (!failed_one) break; /* the call made fewer than k + 1 allocations */
            if (rc < 0 && (rc != GEMMA3_E_NOMEM || e.code != rc || !e.message[0])) {
                if (!wrong) printf("  %s, allocation %d failing: %d '%s'\n", names[which], k + 1, rc, e.message);
                wrong++;
            }
        }
        CHECK(wrong == 0 && rc >= 0, "%s: %d failed allocations gave another code than GEMMA3_E_NOMEM (and then %d)",
              names[which], wrong, rc);
        printf("  %-12s %4d allocations, each failing -> GEMMA3_E_NOMEM; then %s\n", names[which], k,
               rc >= 0 ? "success" : "FAILED");
    }
}

int main(int argc, char **argv) {
    gemma3_model *m;
    gemma3_error e;
    size_t size;
    if (argc < 2) { printf("usage: test_api TOK_MODEL.bin [--threads]\n"); return 2; }
    g_path = argv[1];
    if (gemma3_open_file(g_path, &m, &e) != 0) { printf("  %s\n0 passed, 1 failed\n", e.message); return 1; }
    if (argc > 2 && !strcmp(argv[2], "--threads")) {
        test_threads(m);
    } else {
        unsigned char *bytes = read_file(g_path, &size);
        if (!bytes) { printf("cannot read %s\n0 passed, 1 failed\n", g_path); return 1; }
        test_errors(m, bytes, size);
        test_out_of_memory(m, bytes, size);
        test_memory_and_arena(m, bytes, size);
        test_chat(m);
        test_threads(m);
        free(bytes);
    }
    gemma3_close(m);
    printf("%d passed, %d failed\n", g_pass, g_fail);
    return g_fail ? 1 : 0;
}
