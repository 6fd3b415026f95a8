/* gguf_dequant.c - dequantize the tensors of a GGUF file to float32 (or bf16).
 *
 *   gguf_dequant FILE.gguf < jobs > values
 *
 * Each line of stdin is one job: `OFFSET TYPE COUNT OUT SUB1`, with OFFSET the
 * absolute byte offset of the tensor's data in FILE, TYPE its ggml type number,
 * COUNT its number of values, OUT `f32` or `bf16`, SUB1 1 to subtract 1 from
 * every value (the norms, which llama.cpp's converter stores as 1 + w), else 0.
 * The values of each job go to stdout in order, little-endian, nothing between
 * jobs. Errors: one line on stderr, exit status 1; a NaN or infinity among the values
 * (or a value that rounds to infinity in bf16) is one, naming the value's index in its
 * tensor. export.py drives this.
 *
 * The float32 values are bit for bit those of gguf-py's `gguf.quants.dequantize`
 * (the numpy reference, gguf 0.19.0): every block type below does the same
 * float32 operations in the same order, half floats widen as numpy does
 * (subnormals exact, inf and NaN payloads kept), and the build turns off
 * multiply-add contraction (-ffp-contract=off in the Makefile), since a fused
 * d * q - m rounds once where numpy rounds twice. (For the same reason a 32-bit x86
 * build needs SSE arithmetic, -msse2 -mfpmath=sse: x87 keeps d * q in an 80-bit
 * register instead of rounding it to float32 before the subtraction.) Block layouts are those of
 * llama.cpp's ggml/src/ggml-common.h; every multi-byte field is read byte by
 * byte as little-endian, so the tool works on big-endian hosts too.
 *
 * C99, standard library only. */
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define QK 32   /* values per block of the "legacy" types (Q4_0 ... Q8_0, IQ4_NL) */
#define QK_K 256 /* values per super-block of the k-quants and IQ4_XS */

static const char *progname = "gguf_dequant";

static void die(const char *fmt, const char *arg) {
    fprintf(stderr, "%s: ", progname);
    fprintf(stderr, fmt, arg);
    fputc('\n', stderr);
    exit(1);
}

static uint16_t rd16(const unsigned char *p) { return (uint16_t)(p[0] | p[1] << 8); }
static uint32_t rd32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static float bits_to_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static uint32_t f32_to_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

/* IEEE half -> float, exactly as numpy's npy_halfbits_to_floatbits: subnormal
 * halves become normal floats, inf stays inf, a NaN keeps its sign and payload
 * (a signalling NaN stays signalling). */
static float f16(const unsigned char *p) {
    uint32_t h = rd16(p), sign = (h & 0x8000u) << 16, exp = h & 0x7c00u, man = h & 0x03ffu;
    if (exp == 0x7c00u) return bits_to_f32(sign | 0x7f800000u | man << 13); /* inf, NaN */
    if (exp != 0) return bits_to_f32(sign | ((exp >> 10) + 112) << 23 | man << 13);
    if (man == 0) return bits_to_f32(sign); /* +-0 */
    /* subnormal: shift the mantissa up until its leading 1 is the implicit bit */
    int e = 113;
    while (!(man & 0x0400u)) {
        man <<= 1;
        e--;
    }
    return bits_to_f32(sign | (uint32_t)e << 23 | (man & 0x03ffu) << 13);
}

/* The 16 values of IQ4_NL and IQ4_XS (kvalues_iq4nl in ggml-common.h). */
static const int8_t kvalues_iq4nl[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                         1,    13,   25,  38,  53,  69,  89,  113};

/* ---- one function per block type: b = the block's bytes, y = its values ---- */

/* F32: 4 bytes. */
static void dq_f32(const unsigned char *b, float *y) { y[0] = bits_to_f32(rd32(b)); }
/* F16: 2 bytes. */
static void dq_f16(const unsigned char *b, float *y) { y[0] = f16(b); }
/* BF16: 2 bytes, the top half of a float32. */
static void dq_bf16(const unsigned char *b, float *y) { y[0] = bits_to_f32((uint32_t)rd16(b) << 16); }

/* Q4_0, 18 bytes: half d; 16 bytes qs, value j in the low nibble of qs[j],
 * value j + 16 in the high nibble. y = d * (nibble - 8). */
static void dq_q4_0(const unsigned char *b, float *y) {
    float d = f16(b);
    for (int j = 0; j < QK / 2; j++) {
        y[j] = d * (float)((b[2 + j] & 0x0f) - 8);
        y[j + QK / 2] = d * (float)((b[2 + j] >> 4) - 8);
    }
}

/* Q4_1, 20 bytes: half d, half m, 16 bytes qs as Q4_0. y = d * nibble + m. */
static void dq_q4_1(const unsigned char *b, float *y) {
    float d = f16(b), m = f16(b + 2);
    for (int j = 0; j < QK / 2; j++) {
        y[j] = d * (float)(b[4 + j] & 0x0f) + m;
        y[j + QK / 2] = d * (float)(b[4 + j] >> 4) + m;
    }
}

/* Q5_0, 22 bytes: half d; u32 qh (bit j = fifth bit of value j); 16 bytes qs
 * as Q4_0. y = d * (q - 16). */
static void dq_q5_0(const unsigned char *b, float *y) {
    float d = f16(b);
    uint32_t qh = rd32(b + 2);
    for (int j = 0; j < QK / 2; j++) {
        int lo = (b[6 + j] & 0x0f) | (int)((qh >> j) & 1) << 4;
        int hi = (b[6 + j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4;
        y[j] = d * (float)(lo - 16);
        y[j + QK / 2] = d * (float)(hi - 16);
    }
}

/* Q5_1, 24 bytes: half d, half m, u32 qh, 16 bytes qs. y = d * q + m. */
static void dq_q5_1(const unsigned char *b, float *y) {
    float d = f16(b), m = f16(b + 2);
    uint32_t qh = rd32(b + 4);
    for (int j = 0; j < QK / 2; j++) {
        int lo = (b[8 + j] & 0x0f) | (int)((qh >> j) & 1) << 4;
        int hi = (b[8 + j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4;
        y[j] = d * (float)lo + m;
        y[j + QK / 2] = d * (float)hi + m;
    }
}

/* Q8_0, 34 bytes: half d, 32 int8 q. y = q * d. */
static void dq_q8_0(const unsigned char *b, float *y) {
    float d = f16(b);
    for (int j = 0; j < QK; j++) y[j] = (float)(int8_t)b[2 + j] * d;
}

/* Q2_K, 84 bytes: scales[16] (low nibble: scale, high nibble: min, one pair per
 * 16 values); qs[64], 2 bits per value; half d; half dmin. Value i = 128h + 32s + l
 * (h < 2, s < 4, l < 32) is bits 2s..2s+1 of qs[32h + l].
 * y = (d * scale) * q - (dmin * min). */
static void dq_q2_k(const unsigned char *b, float *y) {
    const unsigned char *sc = b, *qs = b + 16;
    float d = f16(b + 80), dmin = f16(b + 82);
    for (int i = 0; i < QK_K; i++) {
        int h = i / 128, s = (i % 128) / 32, l = i % 32, g = i / 16;
        float dl = d * (float)(sc[g] & 0x0f), ml = dmin * (float)(sc[g] >> 4);
        int q = (qs[32 * h + l] >> (2 * s)) & 3;
        y[i] = dl * (float)q - ml;
    }
}

/* Q3_K, 110 bytes: hmask[32]; qs[64], low 2 bits as Q2_K; scales[12], sixteen
 * 6-bit scales; half d. Value i = 128h + 32s + l has low bits 2s..2s+1 of
 * qs[32h + l] and high bit 4h + s of hmask[l]; q = low - (high bit clear ? 4 : 0).
 * Scale j (one per 16 values): low 4 bits from byte j % 8 of scales (low nibble
 * for j < 8, high for j >= 8), top 2 bits from bits 2(j / 4)..+1 of scales[8 + j % 4],
 * minus 32. y = (d * scale) * q. */
static void dq_q3_k(const unsigned char *b, float *y) {
    const unsigned char *hm = b, *qs = b + 32, *sc = b + 96;
    float d = f16(b + 108);
    float dl[16];
    for (int j = 0; j < 16; j++) {
        int lo = (sc[j % 8] >> (4 * (j / 8))) & 0x0f;
        int hi = (sc[8 + j % 4] >> (2 * (j / 4))) & 0x03;
        dl[j] = d * (float)((lo | hi << 4) - 32);
    }
    for (int i = 0; i < QK_K; i++) {
        int h = i / 128, s = (i % 128) / 32, l = i % 32;
        int low = (qs[32 * h + l] >> (2 * s)) & 3;
        int high = (hm[l] >> (4 * h + s)) & 1;
        y[i] = dl[i / 16] * (float)(low - (high ? 0 : 4));
    }
}

/* The 6-bit scales and mins of Q4_K and Q5_K, eight of each packed in 12 bytes
 * (get_scale_min_k4 in ggml-quants.c): j < 4: scale = q[j] & 63, min = q[j + 4] & 63;
 * j >= 4: scale = (q[j + 4] & 15) | (q[j - 4] >> 6) << 4,
 *         min   = (q[j + 4] >> 4) | (q[j] >> 6) << 4. */
static void scale_min_k4(const unsigned char *q, int j, int *sc, int *m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0x0f) | (q[j - 4] >> 6) << 4;
        *m = (q[j + 4] >> 4) | (q[j] >> 6) << 4;
    }
}

/* Q4_K, 144 bytes: half d; half dmin; scales[12] (scale_min_k4); qs[128]. Eight
 * groups of 32 values: group g = 2k + n takes the low (n = 0) or high (n = 1)
 * nibbles of qs[32k .. 32k + 31]. y = (d * scale) * q - (dmin * min). */
static void dq_q4_k(const unsigned char *b, float *y) {
    float d = f16(b), dmin = f16(b + 2);
    const unsigned char *qs = b + 16;
    for (int g = 0; g < 8; g++) {
        int sc, m;
        scale_min_k4(b + 4, g, &sc, &m);
        float dl = d * (float)sc, ml = dmin * (float)m;
        for (int l = 0; l < 32; l++) {
            int q = (qs[32 * (g / 2) + l] >> (4 * (g % 2))) & 0x0f;
            y[32 * g + l] = dl * (float)q - ml;
        }
    }
}

/* Q5_K, 176 bytes: half d; half dmin; scales[12]; qh[32]; qs[128]. As Q4_K,
 * plus a fifth bit: bit g of qh[l] for value 32g + l. */
static void dq_q5_k(const unsigned char *b, float *y) {
    float d = f16(b), dmin = f16(b + 2);
    const unsigned char *qh = b + 16, *qs = b + 48;
    for (int g = 0; g < 8; g++) {
        int sc, m;
        scale_min_k4(b + 4, g, &sc, &m);
        float dl = d * (float)sc, ml = dmin * (float)m;
        for (int l = 0; l < 32; l++) {
            int q = ((qs[32 * (g / 2) + l] >> (4 * (g % 2))) & 0x0f) | ((qh[l] >> g) & 1) << 4;
            y[32 * g + l] = dl * (float)q - ml;
        }
    }
}

/* Q6_K, 210 bytes: ql[128] (low 4 bits); qh[64] (high 2 bits); int8 scales[16]
 * (one per 16 values); half d. Value i = 128h + r (r < 128): low bits from
 * nibble r / 64 of ql[64h + r % 64], high bits 2(r / 32)..+1 of qh[32h + r % 32].
 * y = (d * scale) * (q - 32). */
static void dq_q6_k(const unsigned char *b, float *y) {
    const unsigned char *ql = b, *qh = b + 128;
    const unsigned char *sc = b + 192;
    float d = f16(b + 208);
    for (int i = 0; i < QK_K; i++) {
        int h = i / 128, r = i % 128;
        int lo = (ql[64 * h + r % 64] >> (4 * (r / 64))) & 0x0f;
        int hi = (qh[32 * h + r % 32] >> (2 * (r / 32))) & 0x03;
        y[i] = (d * (float)(int8_t)sc[i / 16]) * (float)((lo | hi << 4) - 32);
    }
}

/* IQ4_NL, 18 bytes: half d; qs[16] as Q4_0, each nibble an index into
 * kvalues_iq4nl. y = d * kvalues[nibble]. */
static void dq_iq4_nl(const unsigned char *b, float *y) {
    float d = f16(b);
    for (int j = 0; j < QK / 2; j++) {
        y[j] = d * (float)kvalues_iq4nl[b[2 + j] & 0x0f];
        y[j + QK / 2] = d * (float)kvalues_iq4nl[b[2 + j] >> 4];
    }
}

/* IQ4_XS, 136 bytes: half d; u16 scales_h (2 bits per group); scales_l[4] (a
 * nibble per group); qs[128]. Eight groups of 32: scale g = (nibble g % 2 of
 * scales_l[g / 2] | bits 2g..2g+1 of scales_h << 4) - 32; the group's values are
 * the low nibbles of qs[16g .. 16g + 15], then their high nibbles.
 * y = (d * scale) * kvalues[nibble]. */
static void dq_iq4_xs(const unsigned char *b, float *y) {
    float d = f16(b);
    unsigned scales_h = rd16(b + 2);
    const unsigned char *scales_l = b + 4, *qs = b + 8;
    for (int g = 0; g < 8; g++) {
        int lo = (scales_l[g / 2] >> (4 * (g % 2))) & 0x0f;
        int hi = (int)(scales_h >> (2 * g)) & 0x03;
        float dl = d * (float)((lo | hi << 4) - 32);
        for (int l = 0; l < 16; l++) {
            y[32 * g + l] = dl * (float)kvalues_iq4nl[qs[16 * g + l] & 0x0f];
            y[32 * g + l + 16] = dl * (float)kvalues_iq4nl[qs[16 * g + l] >> 4];
        }
    }
}

/* ggml type numbers (enum ggml_type in ggml.h), block sizes in values and bytes. */
typedef struct {
    int type;
    const char *name;
    int block_values, block_bytes;
    void (*dequant)(const unsigned char *, float *);
} BlockType;

static const BlockType block_types[] = {
    {0, "F32", 1, 4, dq_f32},          {1, "F16", 1, 2, dq_f16},
    {2, "Q4_0", QK, 18, dq_q4_0},      {3, "Q4_1", QK, 20, dq_q4_1},
    {6, "Q5_0", QK, 22, dq_q5_0},      {7, "Q5_1", QK, 24, dq_q5_1},
    {8, "Q8_0", QK, 34, dq_q8_0},      {10, "Q2_K", QK_K, 84, dq_q2_k},
    {11, "Q3_K", QK_K, 110, dq_q3_k},  {12, "Q4_K", QK_K, 144, dq_q4_k},
    {13, "Q5_K", QK_K, 176, dq_q5_k},  {14, "Q6_K", QK_K, 210, dq_q6_k},
    {20, "IQ4_NL", QK, 18, dq_iq4_nl}, {23, "IQ4_XS", QK_K, 136, dq_iq4_xs},
    {30, "BF16", 1, 2, dq_bf16},
};

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
static void run_job(FILE *f, long long file_size, long long offset, const BlockType *t, long long count,
                    int bf16, int sub1, const char *path) {
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
        n_blocks -= nb;
    }
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s FILE.gguf < jobs   (one job a line: OFFSET TYPE COUNT f32|bf16 SUB1)\n", progname);
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
            (strcmp(out, "f32") && strcmp(out, "bf16")))
            die("bad job line: %s", line);
        const BlockType *t = NULL;
        for (size_t i = 0; i < sizeof block_types / sizeof block_types[0]; i++)
            if (block_types[i].type == type) t = &block_types[i];
        if (!t) {
            char num[16];
            snprintf(num, sizeof num, "%d", type);
            die("unsupported ggml type %s", num);
        }
        run_job(f, file_size, offset, t, count, out[0] == 'b', sub1 != 0, path);
    }
    if (fflush(stdout) != 0) die("cannot write to stdout (%s)", strerror(errno));
    fclose(f);
    return 0;
}
