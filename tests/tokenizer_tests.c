/* ============================================================================
 * tests/tokenizer_tests.c - tests of tokenizer.c against the shared fixtures
 *
 * #included by test_all.c after gemma3.c, which provides g_pass, g_fail and
 * CHECK(cond, fmt, ...). Entry point: test_tokenizer(t, fixtures_dir), where
 * fixtures_dir holds cases.jsonl and chat.jsonl (fixtures/tokenizer/).
 * ========================================================================== */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Failures printed in full per test group; later ones only counted. */
#define TT_MAX_SHOWN 5

/* tokenizer_decode and chat_render as the checks below use them: the text, or NULL. */
static char *tt_decode(const Tokenizer *t, const int *ids, int n, size_t *len, char *err, size_t errsize)
{
    char *text;
    return tokenizer_decode(t, ids, n, &text, len, err, errsize) == 0 ? text : NULL;
}

static char *tt_render(const ChatMessage *m, int n, int gen, char *err, size_t errsize)
{
    char *text;
    return chat_render(m, n, gen, &text, err, errsize) == 0 ? text : NULL;
}

/* ============================================================================
 * A tiny JSON reader: just what the fixture files use. A cursor walks the
 * text; any syntax error sets ok = 0 and every later call is a no-op, so the
 * callers check once at the end.
 * ========================================================================== */

typedef struct {
    const char *p, *end;
    int ok;
} TtJson;

static void tt_ws(TtJson *j)
{
    while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r')) j->p++;
}

/* Consume character c (after whitespace); 1 if it was there. */
static int tt_eat(TtJson *j, char c)
{
    tt_ws(j);
    if (j->ok && j->p < j->end && *j->p == c) {
        j->p++;
        return 1;
    }
    return 0;
}

static void tt_expect(TtJson *j, char c)
{
    if (!tt_eat(j, c)) j->ok = 0;
}

static int tt_hex4(const char *p, unsigned *v)
{
    int i;
    *v = 0;
    for (i = 0; i < 4; i++) {
        char c = p[i];
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (d < 0) return 0;
        *v = *v << 4 | (unsigned)d;
    }
    return 1;
}

/* A string value, unescaped to UTF-8: malloc'd, NUL-terminated, length in
 * *len (the text may contain U+0000). NULL on error. */
static char *tt_string(TtJson *j, size_t *len)
{
    const char *q;
    char *s;
    size_t k = 0;
    tt_expect(j, '"');
    if (!j->ok) return NULL;
    /* the unescaped text is never longer than the escaped one */
    for (q = j->p; q < j->end && *q != '"'; q++)
        if (*q == '\\') q++;
    if (q >= j->end) {
        j->ok = 0;
        return NULL;
    }
    s = (char *)malloc((size_t)(q - j->p) + 1);
    if (!s) {
        j->ok = 0;
        return NULL;
    }
    while (j->p < q) {
        unsigned cp;
        char c = *j->p++;
        if (c != '\\') {
            s[k++] = c;
            continue;
        }
        c = *j->p++;
        switch (c) {
        case '"': s[k++] = '"'; continue;
        case '\\': s[k++] = '\\'; continue;
        case '/': s[k++] = '/'; continue;
        case 'b': s[k++] = '\b'; continue;
        case 'f': s[k++] = '\f'; continue;
        case 'n': s[k++] = '\n'; continue;
        case 'r': s[k++] = '\r'; continue;
        case 't': s[k++] = '\t'; continue;
        case 'u': break;
        default: goto bad;
        }
        if (q - j->p < 4 || !tt_hex4(j->p, &cp)) goto bad;
        j->p += 4;
        if (cp >= 0xD800 && cp <= 0xDBFF) { /* high surrogate: a low one must follow */
            unsigned lo;
            if (q - j->p < 6 || j->p[0] != '\\' || j->p[1] != 'u' || !tt_hex4(j->p + 2, &lo) || lo < 0xDC00 ||
                lo > 0xDFFF)
                goto bad;
            j->p += 6;
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
        } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
            goto bad;
        }
        /* "\uXXXX" is 6 chars and "\uXXXX\uXXXX" 12, UTF-8 is at most 3 and 4 */
        if (cp < 0x80) {
            s[k++] = (char)cp;
        } else if (cp < 0x800) {
            s[k++] = (char)(0xC0 | cp >> 6);
            s[k++] = (char)(0x80 | (cp & 0x3F));
        } else if (cp < 0x10000) {
            s[k++] = (char)(0xE0 | cp >> 12);
            s[k++] = (char)(0x80 | (cp >> 6 & 0x3F));
            s[k++] = (char)(0x80 | (cp & 0x3F));
        } else {
            s[k++] = (char)(0xF0 | cp >> 18);
            s[k++] = (char)(0x80 | (cp >> 12 & 0x3F));
            s[k++] = (char)(0x80 | (cp >> 6 & 0x3F));
            s[k++] = (char)(0x80 | (cp & 0x3F));
        }
    }
    j->p = q + 1;
    s[k] = 0;
    *len = k;
    return s;
bad:
    free(s);
    j->ok = 0;
    return NULL;
}

/* Read an object key and its ':'; the key is in buf (truncated to fit). */
static void tt_key(TtJson *j, char *buf, size_t size)
{
    size_t n = 0;
    char *k = tt_string(j, &n);
    buf[0] = 0;
    if (k) {
        if (n >= size) n = size - 1;
        memcpy(buf, k, n);
        buf[n] = 0;
        free(k);
    }
    tt_expect(j, ':');
}

static long tt_int(TtJson *j)
{
    long v = 0;
    int neg = 0, digits = 0;
    tt_ws(j);
    if (j->p < j->end && *j->p == '-') {
        neg = 1;
        j->p++;
    }
    for (; j->p < j->end && *j->p >= '0' && *j->p <= '9' && digits < 12; j->p++, digits++) v = v * 10 + (*j->p - '0');
    if (!digits) j->ok = 0;
    return neg ? -v : v;
}

/* An array of integers: malloc'd (never NULL when ok), count in *n. */
static int *tt_int_array(TtJson *j, int *n)
{
    int cap = 16, *a = (int *)malloc((size_t)cap * sizeof *a);
    *n = 0;
    if (!a) {
        j->ok = 0;
        return NULL;
    }
    tt_expect(j, '[');
    if (tt_eat(j, ']')) return a;
    while (j->ok) {
        if (*n == cap) {
            int *b = (int *)realloc(a, (size_t)(cap *= 2) * sizeof *a);
            if (!b) {
                j->ok = 0;
                break;
            }
            a = b;
        }
        a[(*n)++] = (int)tt_int(j);
        if (!tt_eat(j, ',')) break;
    }
    tt_expect(j, ']');
    return a;
}

/* true / false */
static int tt_bool(TtJson *j)
{
    tt_ws(j);
    if (j->end - j->p >= 4 && memcmp(j->p, "true", 4) == 0) {
        j->p += 4;
        return 1;
    }
    if (j->end - j->p >= 5 && memcmp(j->p, "false", 5) == 0) {
        j->p += 5;
        return 0;
    }
    j->ok = 0;
    return 0;
}

/* Skip any value (for keys we do not use). */
static void tt_skip(TtJson *j)
{
    size_t n;
    tt_ws(j);
    if (!j->ok || j->p >= j->end) {
        j->ok = 0;
        return;
    }
    if (*j->p == '"') {
        free(tt_string(j, &n));
    } else if (*j->p == '[' || *j->p == '{') {
        char close = *j->p == '[' ? ']' : '}';
        j->p++;
        if (tt_eat(j, close)) return;
        do {
            if (close == '}') {
                char key[8];
                tt_key(j, key, sizeof key);
            }
            tt_skip(j);
        } while (tt_eat(j, ','));
        tt_expect(j, close);
    } else if (*j->p == 't' || *j->p == 'f') {
        tt_bool(j);
    } else if (j->end - j->p >= 4 && memcmp(j->p, "null", 4) == 0) {
        j->p += 4;
    } else {
        tt_int(j);
        if (j->p < j->end && (*j->p == '.' || *j->p == 'e' || *j->p == 'E')) j->ok = 0; /* not needed */
    }
}

/* Whole file into memory, NUL-terminated; NULL if unreadable. */
static char *tt_read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    char *buf = NULL;
    long n;
    if (!f) return NULL;
    if (fseek(f, 0, SEEK_END) == 0 && (n = ftell(f)) >= 0 && fseek(f, 0, SEEK_SET) == 0 &&
        (buf = (char *)malloc((size_t)n + 1)) != NULL) {
        if (fread(buf, 1, (size_t)n, f) != (size_t)n) {
            free(buf);
            buf = NULL;
        } else {
            buf[n] = 0;
            *len = (size_t)n;
        }
    }
    fclose(f);
    return buf;
}

/* ============================================================================
 * Reporting
 * ========================================================================== */

/* One CHECK per case; after TT_MAX_SHOWN failures in a group, further ones
 * are only counted (a broken tokenizer would otherwise print 400 lines). */
static void tt_report(int ok, int *shown, const char *group, int line, const char *detail)
{
    if (ok || *shown < TT_MAX_SHOWN) {
        CHECK(ok, "tokenizer %s line %d: %s", group, line, detail);
        if (!ok && ++*shown == TT_MAX_SHOWN) printf("  (further %s failures are counted, not shown)\n", group);
    } else {
        g_fail++;
    }
}

/* Describe the first difference between two id sequences into buf. */
static void tt_diff_ids(char *buf, size_t size, const char *what, const int *got, int ngot, const int *want, int nwant)
{
    int i = 0;
    while (i < ngot && i < nwant && got[i] == want[i]) i++;
    snprintf(buf, size, "%s: %d ids, expected %d; first difference at index %d: got %d, expected %d", what, ngot,
             nwant, i, i < ngot ? got[i] : -1, i < nwant ? want[i] : -1);
}

/* Describe the first difference between two byte strings into buf. */
static void tt_diff_bytes(char *buf, size_t size, const char *what, const char *got, size_t ngot, const char *want,
                          size_t nwant)
{
    size_t i = 0;
    while (i < ngot && i < nwant && got[i] == want[i]) i++;
    snprintf(buf, size, "%s: %lu bytes, expected %lu; first difference at byte %lu: got 0x%02X, expected 0x%02X", what,
             (unsigned long)ngot, (unsigned long)nwant, (unsigned long)i, i < ngot ? (unsigned char)got[i] : 0,
             i < nwant ? (unsigned char)want[i] : 0);
}

/* encode(text) == want_ids; detail gets a description when not. */
static int tt_encode_matches(const Tokenizer *t, const char *text, size_t len, const int *want, int nwant,
                             char *detail, size_t dsize)
{
    char err[256] = "";
    int *ids = NULL, n = tokenizer_encode(t, text, len, &ids, err, sizeof err), ok;
    if (n < 0) {
        snprintf(detail, dsize, "encode failed: %s", err);
        return 0;
    }
    ok = n == nwant && (n == 0 || memcmp(ids, want, (size_t)n * sizeof *ids) == 0);
    if (!ok) tt_diff_ids(detail, dsize, "encode", ids, n, want, nwant);
    free(ids);
    return ok;
}

/* ============================================================================
 * Fixture files
 * ========================================================================== */

/* Read DIR/NAME whole and set up a reader on it; the caller frees the returned buffer. */
static char *tt_open_jsonl(const char *dir, const char *name, TtJson *j)
{
    char path[1024];
    size_t len = 0;
    char *buf;

    snprintf(path, sizeof path, "%s/%s", dir, name);
    buf = tt_read_file(path, &len);
    CHECK(buf != NULL, "tokenizer: cannot read %s", path);
    if (!buf) return NULL;
    j->p = buf;
    j->end = buf + len;
    j->ok = 1;
    return buf;
}

/* cases.jsonl: {"text": str, "ids": [int], "decoded": str} per line. */
static void tt_cases(const Tokenizer *t, const char *dir)
{
    char detail[512];
    char *buf;
    int line = 0, shown = 0, ncases = 0;
    TtJson j;

    buf = tt_open_jsonl(dir, "cases.jsonl", &j);
    if (!buf) return;
    for (;;) {
        char *text = NULL, *decoded = NULL, key[32];
        size_t text_len = 0, dec_len = 0;
        int *ids = NULL, nids = 0, ok = 1, have_ids = 0;
        tt_ws(&j);
        if (j.p >= j.end) break;
        line++;
        tt_expect(&j, '{');
        if (!tt_eat(&j, '}')) {
            do {
                tt_key(&j, key, sizeof key);
                if (strcmp(key, "text") == 0 && !text) text = tt_string(&j, &text_len);
                else if (strcmp(key, "decoded") == 0 && !decoded) decoded = tt_string(&j, &dec_len);
                else if (strcmp(key, "ids") == 0 && !have_ids) {
                    ids = tt_int_array(&j, &nids);
                    have_ids = 1;
                } else tt_skip(&j);
            } while (j.ok && tt_eat(&j, ','));
            tt_expect(&j, '}');
        }
        if (!j.ok || !text || !decoded || !ids) {
            CHECK(0, "tokenizer cases.jsonl line %d: malformed fixture line", line);
            free(text);
            free(decoded);
            free(ids);
            break;
        }
        ncases++;
        detail[0] = 0;
        ok = tt_encode_matches(t, text, text_len, ids, nids, detail, sizeof detail);
        if (ok) {
            char err[256] = "";
            size_t out_len = 0;
            char *out = tt_decode(t, ids, nids, &out_len, err, sizeof err);
            if (!out) {
                snprintf(detail, sizeof detail, "decode failed: %s", err);
                ok = 0;
            } else if (out_len != dec_len || memcmp(out, decoded, dec_len) != 0) {
                tt_diff_bytes(detail, sizeof detail, "decode", out, out_len, decoded, dec_len);
                ok = 0;
            }
            free(out);
        }
        tt_report(ok, &shown, "cases.jsonl", line, detail);
        free(text);
        free(decoded);
        free(ids);
    }
    free(buf);
    CHECK(ncases > 0, "tokenizer: no cases in %s/cases.jsonl", dir);
}

/* One message of chat.jsonl as a string content. A list content is folded the
 * way the template would render it, so that chat_render (which takes strings)
 * sees an equivalent string: for the leading system message the template uses
 * content[0].text untrimmed; otherwise each text item is trimmed and each
 * image item becomes "<start_of_image>". That concatenation already starts
 * and ends trimmed, so chat_render's own trim leaves it alone. */
static char *tt_chat_content(TtJson *j, int is_first_system)
{
    size_t len = 0;
    char *acc;
    int item = 0;
    tt_ws(j);
    if (j->p < j->end && *j->p == '"') return tt_string(j, &len);
    acc = (char *)calloc(1, 1);
    tt_expect(j, '[');
    if (tt_eat(j, ']')) return acc;
    do {
        char key[16], type[16] = "", *text = NULL;
        size_t tl = 0;
        tt_expect(j, '{');
        do {
            tt_key(j, key, sizeof key);
            if (strcmp(key, "type") == 0) {
                char *v = tt_string(j, &tl);
                if (v) snprintf(type, sizeof type, "%s", v);
                free(v);
            } else if (strcmp(key, "text") == 0 && !text) {
                text = tt_string(j, &tl);
            } else {
                tt_skip(j);
            }
        } while (j->ok && tt_eat(j, ','));
        tt_expect(j, '}');
        if (acc && j->ok) {
            const char *add = "";
            size_t start = 0, addlen = 0, cur = strlen(acc);
            char *grown;
            if (is_first_system) {
                if (item == 0 && text) {
                    add = text;
                    addlen = strlen(text);
                }
            } else if (strcmp(type, "image") == 0) {
                add = "<start_of_image>";
                addlen = strlen(add);
            } else if (strcmp(type, "text") == 0 && text) {
                addlen = tok_trim((const unsigned char *)text, strlen(text), &start);
                add = text + start;
            }
            grown = (char *)realloc(acc, cur + addlen + 1);
            if (grown) {
                memcpy(grown + cur, add, addlen);
                grown[cur + addlen] = 0;
            } else {
                free(acc);
            }
            acc = grown;
        }
        free(text);
        item++;
    } while (j->ok && tt_eat(j, ','));
    tt_expect(j, ']');
    if (!acc) j->ok = 0;
    return acc;
}

/* chat.jsonl: {"messages": [...], "add_generation_prompt": bool, "prompt": str, "ids": [int]} */
static void tt_chat(const Tokenizer *t, const char *dir)
{
    char detail[512];
    char *buf;
    int line = 0, shown = 0, ncases = 0;
    TtJson j;

    buf = tt_open_jsonl(dir, "chat.jsonl", &j);
    if (!buf) return;
    for (;;) {
        ChatMessage msgs[32];
        char *owned[64], *prompt = NULL, key[32];
        size_t prompt_len = 0;
        int nmsg = 0, nowned = 0, *ids = NULL, nids = 0, gen = 1, ok, i;
        tt_ws(&j);
        if (j.p >= j.end) break;
        line++;
        tt_expect(&j, '{');
        do {
            tt_key(&j, key, sizeof key);
            if (strcmp(key, "messages") == 0 && nmsg == 0) {
                tt_expect(&j, '[');
                if (!tt_eat(&j, ']')) {
                    do {
                        char *role = NULL, *content = NULL;
                        tt_expect(&j, '{');
                        do {
                            size_t l;
                            tt_key(&j, key, sizeof key);
                            if (strcmp(key, "role") == 0 && !role) role = tt_string(&j, &l);
                            else if (strcmp(key, "content") == 0 && !content)
                                content = tt_chat_content(&j, nmsg == 0 && role && strcmp(role, "system") == 0);
                            else tt_skip(&j);
                        } while (j.ok && tt_eat(&j, ','));
                        tt_expect(&j, '}');
                        if (role) owned[nowned++] = role;
                        if (content) owned[nowned++] = content;
                        if (!role || !content || nmsg == 32) j.ok = 0;
                        else {
                            msgs[nmsg].role = role;
                            msgs[nmsg].content = content;
                            nmsg++;
                        }
                    } while (j.ok && nowned < 62 && tt_eat(&j, ','));
                    tt_expect(&j, ']');
                }
            } else if (strcmp(key, "add_generation_prompt") == 0) {
                gen = tt_bool(&j);
            } else if (strcmp(key, "prompt") == 0 && !prompt) {
                prompt = tt_string(&j, &prompt_len);
            } else if (strcmp(key, "ids") == 0 && !ids) {
                ids = tt_int_array(&j, &nids);
            } else {
                tt_skip(&j);
            }
        } while (j.ok && tt_eat(&j, ','));
        tt_expect(&j, '}');
        if (!j.ok || !prompt || !ids || nmsg == 0) {
            CHECK(0, "tokenizer chat.jsonl line %d: malformed fixture line", line);
            for (i = 0; i < nowned; i++) free(owned[i]);
            free(prompt);
            free(ids);
            break;
        }
        ncases++;
        {
            char err[256] = "";
            char *got = tt_render(msgs, nmsg, gen, err, sizeof err);
            if (!got) {
                snprintf(detail, sizeof detail, "chat_render failed: %s", err);
                ok = 0;
            } else if (strlen(got) != prompt_len || memcmp(got, prompt, prompt_len) != 0) {
                tt_diff_bytes(detail, sizeof detail, "chat_render", got, strlen(got), prompt, prompt_len);
                ok = 0;
            } else {
                ok = tt_encode_matches(t, prompt, prompt_len, ids, nids, detail, sizeof detail);
            }
            free(got);
        }
        tt_report(ok, &shown, "chat.jsonl", line, detail);
        for (i = 0; i < nowned; i++) free(owned[i]);
        free(prompt);
        free(ids);
    }
    free(buf);
    CHECK(ncases > 0, "tokenizer: no cases in %s/chat.jsonl", dir);
}

/* ============================================================================
 * Behaviour tests that need no fixture file
 * ========================================================================== */

/* Long runs: one BPE word of thousands of symbols must work (and is fast
 * with the heap; a quadratic merge loop would crawl). */
static void tt_long_runs(const Tokenizer *t)
{
    enum { N = 5000 };
    char *text = (char *)malloc(N), err[256] = "";
    int *ids = NULL, n, i, ok;
    size_t outlen = 0;
    char *back;
    if (!text) return;

    memset(text, 'a', N);
    n = tokenizer_encode(t, text, N, &ids, err, sizeof err);
    back = n > 0 ? tt_decode(t, ids, n, &outlen, err, sizeof err) : NULL;
    CHECK(n > 0 && n < N && back && outlen == N && memcmp(back, text, N) == 0,
          "tokenizer: 5000 x 'a' does not round-trip (n=%d, %s)", n, err);
    free(ids);
    free(back);

    /* 300 spaces: BPE makes "▁"x31 (167) nine times, then "▁"x21 (157) */
    memset(text, ' ', 300);
    n = tokenizer_encode(t, text, 300, &ids, err, sizeof err);
    ok = n == 10 && ids[9] == 157;
    for (i = 0; ok && i < 9; i++) ok = ids[i] == 167;
    CHECK(ok, "tokenizer: 300 spaces should be 9 x 167 + 157 (got %d ids)", n);
    free(ids);

    /* 5000 spaces: 161 x 167 then "▁"x9 (145) */
    memset(text, ' ', N);
    n = tokenizer_encode(t, text, N, &ids, err, sizeof err);
    ok = n == 162 && ids[161] == 145;
    for (i = 0; ok && i < 161; i++) ok = ids[i] == 167;
    CHECK(ok, "tokenizer: 5000 spaces should be 161 x 167 + 145 (got %d ids)", n);
    free(ids);

    /* 40 newlines: added tokens, leftmost-longest: 31 (137) + 9 (115) */
    memset(text, '\n', 40);
    n = tokenizer_encode(t, text, 40, &ids, err, sizeof err);
    CHECK(n == 2 && ids[0] == 137 && ids[1] == 115, "tokenizer: 40 newlines should be [137, 115] (got %d ids)", n);
    free(ids);
    free(text);
}

static void tt_invalid_utf8(const Tokenizer *t)
{
    static const char *bad[] = {
        "\xC3",                 /* truncated 2-byte */
        "ab\xE4\xBD",           /* truncated 3-byte at the end */
        "\xFF",                 /* never valid */
        "\x80x",                /* stray continuation */
        "\xC0\xAF",             /* overlong '/' */
        "\xE0\x80\xAF",         /* overlong */
        "\xED\xA0\x80",         /* surrogate U+D800 */
        "\xF4\x90\x80\x80",     /* above U+10FFFF */
        "<bos>\xF0\x9F\x98",    /* truncated after an added token */
    };
    size_t i;
    for (i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char err[256] = "";
        int dummy = 0, *ids = &dummy; /* must be reset to NULL */
        int n = tokenizer_encode(t, bad[i], strlen(bad[i]), &ids, err, sizeof err);
        CHECK(n == -1 && ids == NULL && err[0] != 0, "tokenizer: invalid UTF-8 #%lu not rejected (n=%d)",
              (unsigned long)i, n);
        if (n >= 0) free(ids);
    }
}

/* Everything written to f so far, as a string (f is a tmpfile). */
static size_t tt_stream_read(FILE *f, char *buf, size_t size)
{
    size_t n;
    fflush(f);
    rewind(f);
    n = fread(buf, 1, size - 1, f);
    buf[n] = 0;
    fseek(f, 0, SEEK_END);
    return n;
}

/* The streaming decoder writing to a FILE, on top of tokenizer.c's buffer form. */
static void tokenstream_put(const Tokenizer *t, TokenStream *s, int id, FILE *out)
{
    char buf[64];
    size_t n = tokenstream_piece(t, s, id, buf, sizeof buf);
    if (n <= sizeof buf) {
        fwrite(buf, 1, n, out);
    } else {
        char *big = (char *)malloc(n);
        if (big) fwrite(big, 1, tokenstream_piece(t, s, id, big, n), out);
        free(big);
    }
}

static void tokenstream_flush(const Tokenizer *t, TokenStream *s, FILE *out)
{
    char buf[32];
    fwrite(buf, 1, tokenstream_end(t, s, buf, sizeof buf), out);
}

static void tt_stream(const Tokenizer *t)
{
    /* U+20000 has no piece: bytes F0 A0 80 80 = ids 478 398 366 366 */
    static const int cjk[4] = { 478, 398, 366, 366 };
    FILE *f = tmpfile();
    TokenStream s;
    char buf[64], err[256] = "";
    int i, ok = 1, *ids = NULL, n;
    if (!f) {
        printf("  (tmpfile() failed: streaming decode not tested)\n");
        return;
    }
    memset(&s, 0, sizeof s);
    for (i = 0; i < 3; i++) {
        tokenstream_put(t, &s, cjk[i], f);
        if (tt_stream_read(f, buf, sizeof buf) != 0) ok = 0;
    }
    CHECK(ok, "tokenizer stream: wrote bytes of an unfinished character");
    tokenstream_put(t, &s, cjk[3], f);
    CHECK(tt_stream_read(f, buf, sizeof buf) == 4 && memcmp(buf, "\xF0\xA0\x80\x80", 4) == 0,
          "tokenizer stream: completed character not written");

    /* "▁Hello" prints " Hello"; a stray lead byte then a normal token gives
     * U+FFFD before it; an impossible byte gives U+FFFD at once. */
    n = tokenizer_encode(t, " Hello", 6, &ids, err, sizeof err);
    CHECK(n == 1, "tokenizer stream: ' Hello' should be one token (got %d)", n);
    if (n == 1) tokenstream_put(t, &s, ids[0], f);
    free(ids);
    tokenstream_put(t, &s, 238 + 0xE4, f);
    tokenstream_put(t, &s, 2, f); /* <bos> */
    tokenstream_put(t, &s, 238 + 0xFF, f);
    tokenstream_put(t, &s, 238 + 0xC3, f);
    tokenstream_flush(t, &s, f);
    n = (int)tt_stream_read(f, buf, sizeof buf);
    CHECK(n == 4 + 6 + 3 + 5 + 3 + 3 &&
              memcmp(buf, "\xF0\xA0\x80\x80 Hello\xEF\xBF\xBD<bos>\xEF\xBF\xBD\xEF\xBF\xBD", (size_t)n) == 0,
          "tokenizer stream: got %d bytes \"%s\"", n, buf);
    fclose(f);
}

static void tt_decode_edges(const Tokenizer *t)
{
    char err[256] = "";
    size_t len = 99;
    /* an invalid byte run decodes as one U+FFFD per byte (HF Rust) */
    static const int run[3] = { 238 + 0xF0, 238 + 0xA0, 107 };
    int bad = t->n_tokens;
    char *s = tt_decode(t, run, 3, &len, err, sizeof err);
    CHECK(s && len == 7 && memcmp(s, "\xEF\xBF\xBD\xEF\xBF\xBD\n", 7) == 0,
          "tokenizer: invalid byte run should decode to 2 x U+FFFD");
    free(s);
    s = tt_decode(t, &bad, 1, &len, err, sizeof err);
    CHECK(s == NULL && err[0] != 0, "tokenizer: out-of-range id not rejected by decode");
    free(s);
    s = tt_decode(t, NULL, 0, &len, err, sizeof err);
    CHECK(s && len == 0 && s[0] == 0, "tokenizer: decode of no ids should be an empty string");
    free(s);
}

static void tt_chat_errors(void)
{
    ChatMessage m[3];
    char err[256] = "", *s;
    m[0].role = "user";
    m[0].content = "a";
    m[1].role = "user";
    m[1].content = "b";
    s = tt_render(m, 2, 1, err, sizeof err);
    CHECK(s == NULL && err[0], "chat: user, user should be rejected");
    free(s);
    m[0].role = "system";
    m[0].content = "s";
    m[1].role = "assistant";
    m[1].content = "b";
    s = tt_render(m, 2, 1, err, sizeof err);
    CHECK(s == NULL && err[0], "chat: system, assistant should be rejected");
    free(s);
    /* trim uses Unicode whitespace (NBSP, ideographic space), like Python strip */
    m[0].role = "user";
    m[0].content = "\xC2\xA0 x \xE3\x80\x80\n";
    s = tt_render(m, 1, 0, err, sizeof err);
    CHECK(s && strcmp(s, "<bos><start_of_turn>user\nx<end_of_turn>\n") == 0, "chat: Unicode trim / no gen prompt");
    free(s);
    s = tt_render(m, 0, 1, err, sizeof err);
    CHECK(s == NULL && err[0], "chat: no messages should be rejected");
    free(s);
}

/* Store v little-endian at buf[n]; returns n + 4. */
static size_t tt_put32(unsigned char *buf, size_t n, uint32_t v)
{
    buf[n] = (unsigned char)v;
    buf[n + 1] = (unsigned char)(v >> 8);
    buf[n + 2] = (unsigned char)(v >> 16);
    buf[n + 3] = (unsigned char)(v >> 24);
    return n + 4;
}

/* Build a tiny section by hand and check that init accepts it and rejects
 * corrupted copies with a message instead of crashing. Vocab: "a" "b" "ab"
 * "<x>"(added), merge a+b -> ab. */
static void tt_corrupt_sections(void)
{
    unsigned char sec[256];
    size_t n = 0, i;
    /* pieces 0 "a", 1 "b", 2 "ab", 3 "<x>" laid end to end */
    static const char pieces[] = "a" "b" "ab" "<x>";
    static const uint32_t offs[5] = { 0, 1, 2, 4, 7 };
    uint32_t hdr[4] = { 4, 1, 1, 0 }, mer[3] = { 0, 1, 2 }, added = 3;
    unsigned char types[4] = { 0, 0, 0, 2 };
    Tokenizer t;
    char err[256];
    int *ids = NULL, k;
    for (i = 0; i < 4; i++) n = tt_put32(sec, n, hdr[i]);
    for (i = 0; i < 5; i++) n = tt_put32(sec, n, offs[i]);
    for (i = 0; i < 3; i++) n = tt_put32(sec, n, mer[i]);
    n = tt_put32(sec, n, added);
    memcpy(sec + n, types, 4);
    n += 4;
    memcpy(sec + n, pieces, 7);
    n += 7;

    err[0] = 0;
    k = tokenizer_init(&t, sec, n, err, sizeof err);
    CHECK(k == 0, "tokenizer: tiny section rejected: %s", err);
    if (k == 0) {
        k = tokenizer_encode(&t, "ab<x>ba", 7, &ids, err, sizeof err);
        CHECK(k == 4 && ids[0] == 2 && ids[1] == 3 && ids[2] == 1 && ids[3] == 0,
              "tokenizer: tiny section encode wrong (n=%d)", k);
        free(ids);
        /* 'c' has no piece and there are no byte pieces or <unk>: an error */
        k = tokenizer_encode(&t, "c", 1, &ids, err, sizeof err);
        CHECK(k == -1 && ids == NULL, "tokenizer: unknown char without fallback should fail");
        tokenizer_free(&t);
    }
    /* each corruption: (byte offset, new value) */
    {
        static const struct { size_t at; unsigned char v; const char *what; } bad[] = {
            { 0, 200, "n_tokens too big" },     { 4, 9, "n_merges too big" },
            { 8, 9, "n_added > n_tokens" },      { 12, 1, "reserved != 0" },
            { 20, 3, "offsets not monotone" },   { 32, 99, "offset past blob" },
            { 36, 7, "merge id out of range" },  { 44, 1, "merge not a concatenation" },
            { 48, 9, "added id out of range" },  { 55, 0, "added token with normal type" },
            { 54, 7, "unknown token type" },     { 48, 0, "added token with normal type (id 0)" },
        };
        unsigned char copy[256];
        for (i = 0; i < sizeof bad / sizeof bad[0]; i++) {
            memcpy(copy, sec, n);
            copy[bad[i].at] = bad[i].v;
            err[0] = 0;
            k = tokenizer_init(&t, copy, n, err, sizeof err);
            CHECK(k == -1 && err[0] != 0, "tokenizer: corrupt section (%s) accepted", bad[i].what);
            if (k == 0) tokenizer_free(&t);
        }
        for (i = 0; i < n; i++) { /* every truncation */
            k = tokenizer_init(&t, sec, i, err, sizeof err);
            if (k == 0) tokenizer_free(&t);
            if (k != -1) break;
        }
        CHECK(i == n, "tokenizer: section truncated to %lu bytes accepted", (unsigned long)i);
    }
}

/* ============================================================================
 * Entry point
 * ========================================================================== */

static void test_tokenizer(const Tokenizer *t, const char *fixtures_dir)
{
    tt_cases(t, fixtures_dir);
    tt_chat(t, fixtures_dir);
    tt_long_runs(t);
    tt_invalid_utf8(t);
    tt_stream(t);
    tt_decode_edges(t);
    tt_chat_errors();
    tt_corrupt_sections();
}
