/* fuzz_chat.c — libFuzzer harness: gemma3_chat_render (gemma3.h only) on conversations
 * split from the input.
 *
 * Input: byte 0 holds flags (bit 0: add_generation_prompt; bits 1-3: a capacity to
 * truncate to), then NUL-separated fields, alternately a role and a content. A role field
 * of one byte 0..3 means "system", "user", "assistant", "model"; any other field is the
 * role's own bytes. Checks: a rendering is refused (GEMMA3_E_TEXT, one non-empty line) or
 * starts with "<bos>", is valid UTF-8, ends with the generation prompt when asked, has the
 * same length at every capacity, and a short buffer holds its prefix, NUL-terminated.
 * Messages with invalid UTF-8 must be refused. A broken property abort()s. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../gemma3.h"

static void die(const char *what) {
    fprintf(stderr, "fuzz_chat: %s\n", what);
    abort();
}

/* 1 if s[0..n) is well-formed UTF-8 (Unicode's definition), as the renderer must require. */
static int utf8_ok(const unsigned char *s, size_t n) {
    for (size_t i = 0; i < n;) {
        unsigned char c = s[i];
        int need = c < 0x80 ? 1 : c < 0xC2 ? 0 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : c < 0xF5 ? 4 : 0;
        unsigned char lo = c == 0xE0 ? 0xA0 : c == 0xF0 ? 0x90 : 0x80, hi = c == 0xED ? 0x9F : c == 0xF4 ? 0x8F : 0xBF;
        if (!need || i + (size_t)need > n) return 0;
        for (int k = 1; k < need; k++)
            if (s[i + k] < (k == 1 ? lo : 0x80) || s[i + k] > (k == 1 ? hi : 0xBF)) return 0;
        i += (size_t)need;
    }
    return 1;
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static const char *const roles[] = {"system", "user", "assistant", "model"};
    if (size < 1 || size > 1 << 16) return 0;
    int add_gen = data[0] & 1;
    size_t small = (data[0] >> 1) & 7; /* 0..7: a capacity shorter than the text */
    /* a NUL-terminated copy of the fields */
    char *buf = malloc(size);
    memcpy(buf, data + 1, size - 1);
    buf[size - 1] = 0;
    int nfields = 1;
    for (size_t i = 0; i + 1 < size; i++) nfields += buf[i] == 0;
    int n = (nfields + 1) / 2;
    gemma3_message *msgs = calloc((size_t)n, sizeof *msgs);
    char *p = buf, *end = buf + size - 1;
    int valid = 1;
    for (int f = 0; f < 2 * n; f++) {
        const char *field = p <= end ? p : "";
        size_t len = strlen(field);
        if (p <= end) p += len + 1;
        if (f % 2 == 0) {
            msgs[f / 2].role = len == 1 && (unsigned char)field[0] < 4 ? roles[(unsigned char)field[0]] : field;
            if (len == 0) msgs[f / 2].role = "user";
        } else {
            msgs[f / 2].content = field;
        }
        valid &= utf8_ok((const unsigned char *)field, len);
    }

    gemma3_error err = {0, ""};
    int len = gemma3_chat_render(msgs, n, add_gen, NULL, 0, &err);
    if (len < 0) {
        if (len != GEMMA3_E_TEXT || err.code != len) die("refused with a code other than GEMMA3_E_TEXT");
        if (!err.message[0] || strchr(err.message, '\n')) { fprintf(stderr, "message: %s\n", err.message); die("refused without a one-line message"); }
    } else {
        if (!valid) die("invalid UTF-8 rendered");
        char *text = malloc((size_t)len + 1);
        if (gemma3_chat_render(msgs, n, add_gen, text, (size_t)len + 1, &err) != len) die("length differs with a buffer");
        if (strlen(text) != (size_t)len) die("the text holds a NUL or is not terminated");
        if (strncmp(text, "<bos>", 5) != 0) die("no <bos> at the start");
        if (!utf8_ok((const unsigned char *)text, (size_t)len)) die("rendering is not valid UTF-8");
        static const char gen[] = "<start_of_turn>model\n";
        if (add_gen && (len < (int)sizeof gen - 1 || strcmp(text + len - (sizeof gen - 1), gen) != 0))
            die("no generation prompt at the end");
        if (small < (size_t)len) {
            char shortbuf[8];
            memset(shortbuf, 'x', sizeof shortbuf);
            if (gemma3_chat_render(msgs, n, add_gen, shortbuf, small, &err) != len) die("length differs with a short buffer");
            if (small && (memcmp(shortbuf, text, small - 1) != 0 || shortbuf[small - 1] != 0)) die("short buffer: not the prefix + NUL");
            if (small < sizeof shortbuf && shortbuf[small] != 'x') die("short buffer: written past capacity");
        }
        free(text);
    }
    free(msgs);
    free(buf);
    return 0;
}
