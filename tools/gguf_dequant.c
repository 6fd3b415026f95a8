/* gguf_dequant.c - dequantize the tensors of a GGUF file to float32 (or bf16).
 *
 *   gguf_dequant FILE.gguf < jobs > values
 *
 * Each line of stdin is one job: `OFFSET TYPE COUNT OUT SUB1`, with OFFSET the
 * absolute byte offset of the tensor's data in FILE, TYPE its ggml type number,
 * COUNT its number of values, OUT `f32` or `bf16`, SUB1 1 to subtract 1 from
 * every value (the norms, which llama.cpp's converter stores as 1 + w), else 0.
 * The values of each job go to stdout in order, little-endian, nothing between
 * jobs. OUT `check` writes no values, only one zero byte once all of them are checked
 * (export.py --dtype gguf copies such a tensor's own bytes after that byte). Errors: one line on stderr, exit status 1; a NaN or infinity among the values
 * (or a value that rounds to infinity in bf16) is one, naming the value's index in its
 * tensor. export.py drives this.
 *
 * The float32 values are bit for bit those of gguf-py's `gguf.quants.dequantize`
 * (the numpy reference, gguf 0.19.0): the block decoders (../gguf_blocks.c, shared
 * with the engine) do the same float32 operations in the same order, and the build
 * turns off multiply-add contraction (-ffp-contract=off in the Makefile), since a
 * fused d * q - m rounds once where numpy rounds twice. (For the same reason a 32-bit
 * x86 build needs SSE arithmetic, -msse2 -mfpmath=sse: x87 keeps d * q in an 80-bit
 * register instead of rounding it to float32 before the subtraction.)
 *
 * C99, standard library only. */
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../gguf_blocks.c"

static const char *progname = "gguf_dequant";

static void die(const char *fmt, const char *arg) {
    fprintf(stderr, "%s: ", progname);
    fprintf(stderr, fmt, arg);
    fputc('\n', stderr);
    exit(1);
}

static uint32_t f32_to_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

/* float32 -> bf16 rounded to nearest even, NaN kept a (quiet) NaN: what export.py
 * and torch's .to(bfloat16) do. */
static uint16_t f32_to_bf16(float f) {
    uint32_t u = f32_to_bits(f);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu)) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

/* A NaN or infinity among the n values about to be written (first: the index of the first
 * in the tensor): refused, naming the value, since a model holding one computes NaN
 * logits. bf16: the rounded values, so a float32 above bf16's range is caught too. */
static void check_finite(const float *vals, size_t n, int bf16, long long first) {
    for (size_t i = 0; i < n; i++) {
        uint32_t u = f32_to_bits(vals[i]);
        int bad = (u & 0x7f800000u) == 0x7f800000u;
        if (!bad && bf16 && (f32_to_bf16(vals[i]) & 0x7f80u) == 0x7f80u) {
            char msg[96];
            snprintf(msg, sizeof msg, "value %lld (%g) rounds to infinity in bf16", first + (long long)i, (double)vals[i]);
            die("%s", msg);
        }
        if (bad) {
            char msg[96];
            snprintf(msg, sizeof msg, "value %lld is %s; a NaN or infinity cannot be exported", first + (long long)i,
                     (u & 0x007fffffu) ? "NaN" : (u >> 31) ? "-infinity" : "infinity");
            die("%s", msg);
        }
    }
}

/* Dequantize one tensor: COUNT values of type T at OFFSET in f, to out. */
static void run_job(FILE *f, long long file_size, long long offset, const GGMLType *t, long long count,
                    int bf16, int sub1, int check_only, const char *path) {
    enum { CHUNK_BLOCKS = 4096 };
    static unsigned char in[CHUNK_BLOCKS * 210 + 64];
    static float vals[CHUNK_BLOCKS * QK_K];
    static unsigned char out[CHUNK_BLOCKS * QK_K * 4];
    if (count <= 0 || count % t->block_values) die("job: count is not a positive multiple of the block size (%s)", t->name);
    long long n_blocks = count / t->block_values;
    if (offset < 0 || offset > file_size || n_blocks > (file_size - offset) / t->block_bytes)
        die("tensor data lies past the end of %s", path);
    if (offset > LONG_MAX || fseek(f, (long)offset, SEEK_SET) != 0) die("cannot seek in %s", path);
    int chunk = (int)(sizeof in / (size_t)t->block_bytes);
    if (chunk * t->block_values > CHUNK_BLOCKS * QK_K) chunk = CHUNK_BLOCKS * QK_K / t->block_values;
    long long done = 0; /* values written so far */
    while (n_blocks > 0) {
        int nb = n_blocks < chunk ? (int)n_blocks : chunk;
        size_t nbytes = (size_t)nb * (size_t)t->block_bytes, nv = (size_t)nb * (size_t)t->block_values;
        if (fread(in, 1, nbytes, f) != nbytes) die("short read from %s (truncated file?)", path);
        for (int i = 0; i < nb; i++) t->dequant(in + (size_t)i * t->block_bytes, vals + (size_t)i * t->block_values);
        /* the norms: stored as 1 + w, wanted w; one float32 subtraction */
        if (sub1)
            for (size_t i = 0; i < nv; i++) vals[i] = vals[i] - 1.0f;
        check_finite(vals, nv, bf16, done);
        done += (long long)nv;
        n_blocks -= nb;
        if (check_only) continue;
        size_t outbytes;
        if (bf16) {
            for (size_t i = 0; i < nv; i++) {
                uint16_t h = f32_to_bf16(vals[i]);
                out[2 * i] = (unsigned char)(h & 0xff);
                out[2 * i + 1] = (unsigned char)(h >> 8);
            }
            outbytes = 2 * nv;
        } else {
            for (size_t i = 0; i < nv; i++) {
                uint32_t u = f32_to_bits(vals[i]);
                out[4 * i] = (unsigned char)(u & 0xff);
                out[4 * i + 1] = (unsigned char)(u >> 8 & 0xff);
                out[4 * i + 2] = (unsigned char)(u >> 16 & 0xff);
                out[4 * i + 3] = (unsigned char)(u >> 24);
            }
            outbytes = 4 * nv;
        }
        if (fwrite(out, 1, outbytes, stdout) != outbytes) die("cannot write to stdout (%s)", strerror(errno));
    }
    if (check_only && putchar(0) == EOF) die("cannot write to stdout (%s)", strerror(errno));
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s FILE.gguf < jobs   (one job a line: OFFSET TYPE COUNT f32|bf16|check SUB1)\n", progname);
        return 2;
    }
    const char *path = argv[1];
    FILE *f = fopen(path, "rb");
    if (!f) die("cannot open %s", path);
    if (fseek(f, 0, SEEK_END) != 0) die("cannot seek in %s", path);
    long long file_size = ftell(f);
    if (file_size < 0) die("cannot tell the size of %s", path);
    char line[256];
    while (fgets(line, sizeof line, stdin)) {
        long long offset, count;
        int type, sub1;
        char out[8];
        if (sscanf(line, "%lld %d %lld %7s %d", &offset, &type, &count, out, &sub1) != 5 ||
            (strcmp(out, "f32") && strcmp(out, "bf16") && strcmp(out, "check")))
            die("bad job line: %s", line);
        const GGMLType *t = ggml_type(type);
        if (!t) {
            char num[16];
            snprintf(num, sizeof num, "%d", type);
            die("unsupported ggml type %s", num);
        }
        run_job(f, file_size, offset, t, count, out[0] == 'b', sub1 != 0, out[0] == 'c', path);
    }
    if (fflush(stdout) != 0) die("cannot write to stdout (%s)", strerror(errno));
    fclose(f);
    return 0;
}
