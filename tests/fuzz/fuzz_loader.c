/* fuzz_loader.c — libFuzzer harness: gemma3_open_memory (gemma3.h only) on arbitrary
 * bytes, and on what opens, a session that runs.
 *
 * The seeds (`make fuzz` writes them: tests/build/fuzz/seeds-loader) are a 2-layer model
 * of 18 tokens with a 20-piece tokenizer, in f32, bf16, q8_0 and q4_0, and in bf16 with a
 * 14 px image path, so most mutations are of a valid file. A file that opens gets a session
 * of at most 8 tokens: ids fed (the last input byte picks greedy or sampled), logits read, a
 * 3 x 2 image fed where the file has the image path, a token sampled, a few generated, and
 * with a tokenizer, text tokenized and decoded and one chat turn. Checks: a refusal
 * has a code and a one-line message; sampled ids are in [0, vocab_size) (or the logits are
 * said to be NaN); no call fails
 * for a reason other than the ones gemma3.h gives it. A broken property abort()s. */
#define _POSIX_C_SOURCE 200112L /* posix_memalign */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../gemma3.h"

static void die(const char *what, const gemma3_error *err) {
    fprintf(stderr, "fuzz_loader: %s%s%s\n", what, err ? ": " : "", err ? err->message : "");
    abort();
}

static int one_line(const gemma3_error *err) { return err->message[0] && !strchr(err->message, '\n'); }

static int count_piece(const char *piece, size_t len, int id, void *user) {
    (void)piece, (void)len, (void)id;
    return ++*(int *)user >= 100;
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    gemma3_error err = {0, ""};
    gemma3_model *m = NULL;
    /* the bytes at a 64-byte boundary, as mmap gives them, and exactly `size` long */
    void *copy = NULL;
    if (size && posix_memalign(&copy, 64, size) != 0) return 0;
    if (size) memcpy(copy, data, size);
    int rc = gemma3_open_memory(copy ? copy : (const void *)"", size, &m, &err);
    if (rc != 0) {
        if (rc != GEMMA3_E_FORMAT && rc != GEMMA3_E_NOMEM) die("open: unexpected code", &err);
        if (err.code != rc || !one_line(&err)) die("open: refused without a one-line message", &err);
        free(copy);
        return 0;
    }
    gemma3_config c = gemma3_model_config(m);
    if (c.vocab_size <= 0 || c.bos_id < 0 || c.bos_id >= c.vocab_size || c.eos_id < 0 || c.eos_id >= c.vocab_size)
        die("open: a config with ids out of range", NULL);

    gemma3_options o = gemma3_default_options();
    o.context = c.max_context < 8 ? c.max_context : 8;
    unsigned char last = size ? data[size - 1] : 0;
    o.temperature = last & 1 ? 0.0f : 1.0f;
    o.top_k = last & 2 ? 0 : 3;
    o.top_p = last & 4 ? 1.0f : 0.9f;
    o.seed = last;
    o.images = c.image_tokens > 0; /* a file with the image path: its session takes images */
    gemma3_session *s = NULL;
    if (gemma3_session_new(m, &o, &s, &err) != 0) {
        if (err.code != GEMMA3_E_NOMEM) die("session_new failed", &err);
        gemma3_close(m);
        free(copy);
        return 0;
    }
    int ids[3] = {c.bos_id, (int)(last % (unsigned)c.vocab_size), c.vocab_size - 1};
    int n = o.context < 3 ? o.context : 3;
    for (int i = 0; c.image_tokens && i < 3; i++)
        if (ids[i] == c.image_id) ids[i] = c.bos_id; /* the image token is for gemma3_feed_image only */
    if (gemma3_feed(s, ids, n, &err) != n) die("feed failed", &err);
    if (!gemma3_logits(s, &err)) die("no logits after a feed", &err);
    int id = gemma3_sample(s, &err); /* GEMMA3_E_NUMERIC: NaN or infinite logits (such weights) */
    if (id != GEMMA3_E_NUMERIC && (id < 0 || id >= c.vocab_size)) die("sampled id out of range", &err);
    if (c.image_tokens) { /* a 3 x 2 gray image of the input's last bytes, where it fits */
        unsigned char px[6] = {last, 0, 255, (unsigned char)size, 7, (unsigned char)(last ^ 0x5a)};
        gemma3_image img = {px, 3, 2, 1};
        int before = gemma3_position(s), got = gemma3_feed_image(s, &img, NULL, &err);
        if (got >= 0 ? got != before + c.image_tokens : got != GEMMA3_E_CONTEXT && got != GEMMA3_E_NUMERIC)
            die("feed_image failed", &err);
        if (got >= 0 && gemma3_rewind(s, before, &err) != before) die("rewind to before the image failed", &err);
    }
    if (id == c.image_id && c.image_tokens) id = c.bos_id;
    if (id >= 0 && gemma3_position(s) < gemma3_context(s)) {
        if (gemma3_feed(s, &id, 1, &err) < 0) die("feed of a sampled id failed", &err);
        int pieces = 0, got = gemma3_generate(s, 3, count_piece, &pieces, &err);
        if ((got < 0 && got != GEMMA3_E_NUMERIC) || got > 3) die("generate: wrong count", &err);
    }
    if (gemma3_rewind(s, 1, &err) != 1) die("rewind failed", &err);
    if (c.has_tokenizer) {
        static const char text[] = "ab a\xc3\xa9<start_of_turn>c\xe2\x80\x94";
        int t[64];
        char back[256];
        int nt = gemma3_tokenize(m, text, sizeof text - 1, t, 64, &err);
        if (nt >= 0) {
            for (int i = 0; i < nt && i < 64; i++)
                if (t[i] < 0 || t[i] >= c.vocab_size) die("tokenize: id out of range", NULL);
            if (gemma3_detokenize(m, t, nt < 64 ? nt : 64, back, sizeof back, &err) < 0 && err.code != GEMMA3_E_TOKEN)
                die("detokenize failed", &err);
        } else if (err.code != GEMMA3_E_TOKEN && err.code != GEMMA3_E_TEXT) {
            die("tokenize failed", &err);
        }
        gemma3_stream st = {{0}, 0};
        char *piece = malloc((size_t)c.max_piece_bytes);
        for (int i = 0; i < c.vocab_size && i < 64; i++)
            if (gemma3_stream_put(m, &st, i, piece, (size_t)c.max_piece_bytes) > c.max_piece_bytes) die("stream: too long", NULL);
        gemma3_stream_flush(m, &st, piece, (size_t)c.max_piece_bytes);
        free(piece);
        gemma3_session *chat = NULL;
        gemma3_options co = o;
        co.system_prompt = "Be brief.";
        if (gemma3_session_new(m, &co, &chat, &err) == 0) {
            int pieces = 0;
            rc = gemma3_chat_turn(chat, "Hi", 2, 2, count_piece, &pieces, &err);
            if (rc < 0 && rc != GEMMA3_E_CONTEXT && rc != GEMMA3_E_TOKEN && rc != GEMMA3_E_TEXT && rc != GEMMA3_E_NUMERIC)
                die("chat_turn failed", &err);
            if (rc < 0 && !one_line(&err)) die("chat_turn: refused without a one-line message", &err);
            gemma3_session_free(chat);
        }
    }
    gemma3_session_free(s);
    gemma3_close(m);
    free(copy);
    return 0;
}
