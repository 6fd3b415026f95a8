/*
 * firmware.c — gemma3.c on a machine with no operating system: a RISC-V (rv64gc) image
 * for qemu-system-riscv64's `virt` board, built with picolibc (tests/baremetal/test.sh).
 *
 * It is a program on the library (gemma3.h) and nothing else: the model's bytes are linked
 * into the image (model.S), the session's memory is one arena, and no threads, mmap or
 * file system are used by the library. The platform lives here, at the edge: where the
 * model is (model_start/model_end), how a result leaves the machine (semihosting: the
 * console and host files, which picolibc's stdio uses), how the machine stops
 * (semihost_exit), and how much stack was used (stack painting).
 *
 * Two modes, chosen when the image is built:
 *   LOGITS  feed the ids in ids.h and write the logits after each to the host file
 *           logits.f32 (float32, [n][vocab]): the host compares them with its own
 *   PROMPT  tokenize PROMPT, add <bos>, and print a greedy continuation of STEPS tokens
 * Then one line: the RAM it used (static, heap peak, stack peak), and exit status 0.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "gemma3.h"

extern const unsigned char model_start[], model_end[]; /* model.S */
extern char __heap_start[], __heap_end[], __stack[];    /* picolibc.ld */

/* Semihosting: a call to the debugger (here qemu) through an ebreak between two marker
 * instructions. SYS_EXIT (0x18) with ADP_Stopped_ApplicationExit ends qemu with `code`. */
static void semihost_exit(int code) {
    uint64_t args[2] = {0x20026, (uint64_t)code};
    register long a0 __asm__("a0") = 0x18;
    register void *a1 __asm__("a1") = args;
    __asm__ volatile(".option push\n.option norvc\nslli zero, zero, 0x1f\nebreak\nsrai zero, zero, 7\n.option pop"
                     : "+r"(a0) : "r"(a1) : "memory");
    for (;;) {}
}

static void fail(const char *what, const gemma3_error *err) {
    printf("firmware: %s: %s\n", what, err->message);
    fflush(stdout);
    semihost_exit(1);
}

/* The stack grows down from __stack to __heap_end: fill what is unused with a pattern now,
 * and find later how far down it was overwritten. */
#define PAINT 0xa5
static void paint_stack(void) {
    volatile char here;
    for (char *p = __heap_end; p < (char *)&here - 256; p++) *p = (char)PAINT;
}
static size_t stack_peak(void) {
    const char *p = __heap_end;
    while (p < __stack && (unsigned char)*p == PAINT) p++;
    return (size_t)(__stack - p);
}

static int print_piece(const char *piece, size_t len, int id, void *user) {
    (void)id, (void)user;
    fwrite(piece, 1, len, stdout);
    return 0;
}

#ifdef LOGITS
#include "ids.h" /* static const int ids[] = {...}; */
#endif

int main(void) {
    gemma3_error err;
    gemma3_model *model;
    gemma3_session *session;
    paint_stack();
    if (gemma3_open_memory(model_start, (size_t)(model_end - model_start), &model, &err) != 0) fail("open", &err);
    gemma3_config c = gemma3_model_config(model);
    gemma3_options opt = gemma3_default_options();
#ifdef LOGITS
    const int n = (int)(sizeof ids / sizeof ids[0]);
    opt.context = n;
#else
    int prompt[64];
    prompt[0] = c.bos_id;
    int n = gemma3_tokenize(model, PROMPT, strlen(PROMPT), prompt + 1, 63, &err);
    if (n < 0) fail("tokenize", &err);
    n += 1;
    opt.context = n + STEPS;
    opt.temperature = 0; /* greedy */
#endif
    int64_t bytes = gemma3_session_bytes(model, &opt, &err);
    if (bytes < 0) fail("session size", &err);
    opt.arena = malloc((size_t)bytes); /* the session's one block: nothing is allocated after this */
    opt.arena_size = (size_t)bytes;
    if (!opt.arena) { printf("firmware: no %lld bytes for the session\n", (long long)bytes); semihost_exit(1); }
    if (gemma3_session_new(model, &opt, &session, &err) != 0) fail("session", &err);
#ifdef LOGITS
    float *logits = malloc((size_t)n * (size_t)c.vocab_size * sizeof(float));
    if (!logits) { printf("firmware: no memory for the logits\n"); semihost_exit(1); }
    if (gemma3_feed_logits(session, ids, n, logits, NULL, &err) < 0) fail("feed", &err);
    FILE *f = fopen("logits.f32", "wb"); /* a file on the host, through semihosting */
    if (!f || fwrite(logits, sizeof(float) * (size_t)c.vocab_size, (size_t)n, f) != (size_t)n || fclose(f) != 0) {
        printf("firmware: cannot write logits.f32 on the host\n");
        semihost_exit(1);
    }
    printf("firmware: wrote the logits of %d tokens (vocab %d)\n", n, c.vocab_size);
#else
    if (gemma3_feed(session, prompt, n, &err) < 0) fail("feed", &err);
    if (gemma3_generate(session, STEPS, print_piece, NULL, &err) < 0) fail("generate", &err);
    printf("\n");
#endif
    size_t heap = (size_t)((char *)sbrk(0) - __heap_start); /* malloc takes from sbrk and keeps it */
    printf("firmware: RAM: session arena %lld bytes, heap peak %zu bytes, stack peak %zu bytes\n", (long long)bytes,
           heap, stack_peak());
    fflush(stdout);
    gemma3_session_free(session);
    gemma3_close(model);
    semihost_exit(0);
}
