/* gguf_quantize.c - quantize one tensor of a checkpoint into GGUF blocks.
 *
 *   gguf_quantize FILE OFFSET SRC ROWS COLS TYPE > blocks
 *
 * Reads ROWS x COLS values of type SRC (bf16, f16 or f32, little-endian) from FILE at
 * byte OFFSET, and writes them to stdout as ROWS rows of ggml TYPE: F32, F16, BF16, Q8_0,
 * Q4_0, Q5_0, Q4_K or Q6_K (COLS a multiple of the type's block: 32, or 256 for the
 * K-quants). Errors: one line on stderr, exit status 1. tools/make_gguf.py drives this to
 * write the GGUF files of the benchmarks without llama.cpp.
 *
 * Each quantizer follows ggml's reference one (ggml-quants.c, quantize_row_*_ref: what
 * llama-quantize uses without an importance matrix): the same search for the scales, the
 * same rounding, the same block layout (ggml-common.h; FORMAT.md). Float16 conversions
 * round to nearest even.
 *
 * C99, standard library only. */
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define QK 32    /* values per block of Q8_0, Q4_0, Q5_0 */
#define QK_K 256 /* values per super-block of Q4_K, Q6_K */

static void die(const char *msg, const char *arg) {
    fprintf(stderr, "gguf_quantize: %s%s\n", msg, arg);
    exit(1);
}

/* ---- float formats ------------------------------------------------------------------- */

static uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static float bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* float32 -> IEEE half, rounded to nearest even; overflow to infinity, NaN stays NaN. */
static uint16_t f32_to_f16(float f) {
    uint32_t u = f32_bits(f), sign = (u >> 16) & 0x8000u, mant = u & 0x7fffffu;
    int exp = (int)((u >> 23) & 0xff);
    if (exp == 0xff) return (uint16_t)(sign | 0x7c00u | (mant ? 0x200u : 0));
    int e = exp - 127 + 15;
    if (e >= 31) return (uint16_t)(sign | 0x7c00u);
    if (e <= 0) { /* a subnormal half (or zero): shift the implicit 1 in, round once */
        if (e < -10) return (uint16_t)sign;
        uint32_t m = mant | 0x800000u;
        int shift = 14 - e;
        uint32_t half = m >> shift, rest = m & ((1u << shift) - 1), mid = 1u << (shift - 1);
        if (rest > mid || (rest == mid && (half & 1))) half++;
        return (uint16_t)(sign | half);
    }
    uint32_t h = ((uint32_t)e << 10) | (mant >> 13), rest = mant & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1))) h++; /* a carry into the exponent is right */
    return (uint16_t)(sign | h);
}

static float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ffu;
    if (exp == 0x1f) return bits_f32(sign | 0x7f800000u | (mant << 13));
    if (exp == 0) return (sign ? -1.0f : 1.0f) * (float)mant * 0x1p-24f;
    return bits_f32(sign | ((exp + 112) << 23) | (mant << 13));
}

/* float32 -> bf16, rounded to nearest even; NaN stays a (quiet) NaN. */
static uint16_t f32_to_bf16(float f) {
    uint32_t u = f32_bits(f);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x7fffffu)) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }

/* ggml's rounding of the K-quant searches: to nearest, ties to even, for |x| < 2^22. */
static int nearest_int(float x) {
    float v = x + 12582912.f; /* 1.5 * 2^23: the integer lands in the low mantissa bits */
    return (int)(f32_bits(v) & 0x7fffffu) - 0x400000;
}

static int imin(int a, int b) { return a < b ? a : b; }
static int imax(int a, int b) { return a > b ? a : b; }

/* ---- 32-value blocks ---------------------------------------------------------------------- */

/* Q8_0, 34 bytes: half d; int8 q[32]. d = max|x| / 127, q = round(x / d). */
static void q8_0_block(const float *x, uint8_t *out) {
    float amax = 0;
    for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(x[j]));
    float d = amax / 127, id = d ? 1.0f / d : 0.0f;
    put16(out, f32_to_f16(d));
    for (int j = 0; j < QK; j++) out[2 + j] = (uint8_t)(int8_t)roundf(x[j] * id);
}

/* Q4_0, 18 bytes: half d; qs[16], value j in the low nibble of byte j, value j + 16 in the
 * high one; x = d (q - 8). d = the value of largest magnitude / -8, so it maps to q = 0. */
static void q4_0_block(const float *x, uint8_t *out) {
    float amax = 0, max = 0;
    for (int j = 0; j < QK; j++)
        if (amax < fabsf(x[j])) { amax = fabsf(x[j]); max = x[j]; }
    float d = max / -8, id = d ? 1.0f / d : 0.0f;
    put16(out, f32_to_f16(d));
    for (int j = 0; j < QK / 2; j++) {
        int a = imin(15, (int8_t)(x[j] * id + 8.5f)), b = imin(15, (int8_t)(x[j + QK / 2] * id + 8.5f));
        out[2 + j] = (uint8_t)(a | b << 4);
    }
}

/* Q5_0, 22 bytes: half d; uint32 qh (bit j: the fifth bit of value j); qs[16] as Q4_0;
 * x = d (q - 16). d = the value of largest magnitude / -16. */
static void q5_0_block(const float *x, uint8_t *out) {
    float amax = 0, max = 0;
    for (int j = 0; j < QK; j++)
        if (amax < fabsf(x[j])) { amax = fabsf(x[j]); max = x[j]; }
    float d = max / -16, id = d ? 1.0f / d : 0.0f;
    uint32_t qh = 0;
    put16(out, f32_to_f16(d));
    for (int j = 0; j < QK / 2; j++) {
        int a = imin(31, (int8_t)(x[j] * id + 16.5f)), b = imin(31, (int8_t)(x[j + QK / 2] * id + 16.5f));
        out[6 + j] = (uint8_t)((a & 15) | (b & 15) << 4);
        qh |= (uint32_t)(a >> 4) << j | (uint32_t)(b >> 4) << (j + QK / 2);
    }
    for (int k = 0; k < 4; k++) out[2 + k] = (uint8_t)(qh >> 8 * k);
}

/* ---- K-quants ------------------------------------------------------------------------------ */

/* The scale and min of n values for codes 0..nmax (x ~ scale * L - min, min >= 0 returned
 * in *the_min), ggml's make_qkx2_quants: start from the range, then try nstep + 1 other
 * scales around it, each with the least-squares scale and min of its codes, and keep the
 * one of least weighted squared error. */
static float qkx2(int n, int nmax, const float *x, const float *w, uint8_t *L, float *the_min,
                  float rmin, float rdelta, int nstep) {
    uint8_t aux[32];
    float min = x[0], max = x[0], sum_w = w[0], sum_x = w[0] * x[0];
    for (int i = 1; i < n; i++) {
        if (x[i] < min) min = x[i];
        if (x[i] > max) max = x[i];
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if (min > 0) min = 0;
    if (max == min) {
        memset(L, 0, (size_t)n);
        *the_min = -min;
        return 0.f;
    }
    float iscale = nmax / (max - min), scale = 1 / iscale, best = 0;
    for (int i = 0; i < n; i++) {
        L[i] = (uint8_t)imax(0, imin(nmax, nearest_int(iscale * (x[i] - min))));
        float diff = scale * L[i] + min - x[i];
        best += w[i] * (diff * diff);
    }
    for (int is = 0; is <= nstep; is++) {
        iscale = (rmin + rdelta * is + nmax) / (max - min);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < n; i++) {
            int l = imax(0, imin(nmax, nearest_int(iscale * (x[i] - min))));
            aux[i] = (uint8_t)l;
            sum_l += w[i] * l;
            sum_l2 += w[i] * l * l;
            sum_xl += w[i] * l * x[i];
        }
        float D = sum_w * sum_l2 - sum_l * sum_l;
        if (D > 0) {
            float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
            float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
            if (this_min > 0) {
                this_min = 0;
                this_scale = sum_xl / sum_l2;
            }
            float err = 0;
            for (int i = 0; i < n; i++) {
                float diff = this_scale * aux[i] + this_min - x[i];
                err += w[i] * (diff * diff);
            }
            if (err < best) {
                memcpy(L, aux, (size_t)n);
                best = err;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    *the_min = -min;
    return scale;
}

/* Q4_K, 144 bytes: half d; half dmin; scales[12]; qs[128]. Eight sub-blocks of 32 values,
 * each with a 6-bit scale sc and min m: x = d sc q - dmin m, q in 0..15. scales[12]: sub-
 * blocks 0-3 in the low 6 bits of bytes 0-3 (sc) and 4-7 (m); 4-7 in the nibbles of bytes
 * 8-11 (sc low, m high), their top 2 bits in the top 2 bits of bytes 0-3 (sc) and 4-7 (m).
 * qs: 64 values per 32 bytes, the first 32 in the low nibbles, the next 32 in the high. */
static void q4_k_block(const float *x, uint8_t *out) {
    uint8_t L[QK_K], sc6[8], m6[8];
    float w[32], scales[8], mins[8], max_scale = 0, max_min = 0;
    for (int j = 0; j < 8; j++) {
        const float *xs = x + 32 * j;
        float sum_x2 = 0;
        for (int l = 0; l < 32; l++) sum_x2 += xs[l] * xs[l];
        float av_x = sqrtf(sum_x2 / 32);
        for (int l = 0; l < 32; l++) w[l] = av_x + fabsf(xs[l]);
        scales[j] = qkx2(32, 15, xs, w, L + 32 * j, &mins[j], -1.f, 0.1f, 20);
        if (scales[j] > max_scale) max_scale = scales[j];
        if (mins[j] > max_min) max_min = mins[j];
    }
    float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f, inv_min = max_min > 0 ? 63.f / max_min : 0.f;
    uint8_t *s = out + 4;
    memset(s, 0, 12);
    for (int j = 0; j < 8; j++) {
        /* ggml stores nearest_int's result in a uint8_t before the MIN: the same here */
        sc6[j] = (uint8_t)imin(63, (uint8_t)nearest_int(inv_scale * scales[j]));
        m6[j] = (uint8_t)imin(63, (uint8_t)nearest_int(inv_min * mins[j]));
        if (j < 4) {
            s[j] = sc6[j];
            s[j + 4] = m6[j];
        } else {
            s[j + 4] = (uint8_t)((sc6[j] & 15) | (m6[j] & 15) << 4);
            s[j - 4] |= (uint8_t)((sc6[j] >> 4) << 6);
            s[j] |= (uint8_t)((m6[j] >> 4) << 6);
        }
    }
    uint16_t d16 = f32_to_f16(max_scale / 63.f), dmin16 = f32_to_f16(max_min / 63.f);
    put16(out, d16);
    put16(out + 2, dmin16);
    /* the codes again, against the scales as stored */
    for (int j = 0; j < 8; j++) {
        float d = f16_to_f32(d16) * sc6[j];
        if (!d) continue;
        float dm = f16_to_f32(dmin16) * m6[j];
        for (int i = 0; i < 32; i++) L[32 * j + i] = (uint8_t)imax(0, imin(15, nearest_int((x[32 * j + i] + dm) / d)));
    }
    uint8_t *q = out + 16;
    for (int j = 0; j < QK_K; j += 64, q += 32)
        for (int l = 0; l < 32; l++) q[l] = (uint8_t)(L[j + l] | L[j + l + 32] << 4);
}

/* The scale of n values for signed codes -nmax..nmax-1, ggml's make_qx_quants with its
 * weights x^2 (rmse_type 1): from the value of largest magnitude, then 18 scales around it,
 * each with its least-squares fit, keeping the best. Codes + nmax go to L. */
static float qx(int n, int nmax, const float *x, int8_t *L) {
    float max = 0, amax = 0;
    for (int i = 0; i < n; i++)
        if (fabsf(x[i]) > amax) { amax = fabsf(x[i]); max = x[i]; }
    if (amax < 1e-15f) { /* ggml's GROUP_MAX_EPS: all zero */
        memset(L, 0, (size_t)n);
        return 0.f;
    }
    float iscale = -nmax / max, sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; i++) {
        int l = imax(-nmax, imin(nmax - 1, nearest_int(iscale * x[i])));
        L[i] = (int8_t)(l + nmax);
        float w = x[i] * x[i];
        sumlx += w * x[i] * l;
        suml2 += w * l * l;
    }
    float scale = suml2 ? sumlx / suml2 : 0.0f, best = scale * sumlx;
    for (int is = -9; is <= 9; is++) {
        if (is == 0) continue;
        iscale = -(nmax + 0.1f * is) / max;
        sumlx = suml2 = 0;
        for (int i = 0; i < n; i++) {
            int l = imax(-nmax, imin(nmax - 1, nearest_int(iscale * x[i])));
            float w = x[i] * x[i];
            sumlx += w * x[i] * l;
            suml2 += w * l * l;
        }
        if (suml2 > 0 && sumlx * sumlx > best * suml2) {
            for (int i = 0; i < n; i++) L[i] = (int8_t)(nmax + imax(-nmax, imin(nmax - 1, nearest_int(iscale * x[i]))));
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    return scale;
}

/* Q6_K, 210 bytes: ql[128] (low 4 bits); qh[64] (high 2 bits); int8 scales[16]; half d.
 * Sixteen sub-blocks of 16 values: x = d scale (q - 32), q in 0..63. Per 128 values, ql
 * holds values l and l + 64 in the nibbles of byte l, values l + 32 and l + 96 in byte
 * l + 32 (l < 32), and qh byte l their top bits: l, l + 32, l + 64, l + 96 from bit 0 up. */
static void q6_k_block(const float *x, uint8_t *out) {
    int8_t L[QK_K];
    float scales[16], max_scale = 0, max_abs = 0;
    for (int ib = 0; ib < 16; ib++) {
        scales[ib] = qx(16, 32, x + 16 * ib, L + 16 * ib);
        if (fabsf(scales[ib]) > max_abs) { max_abs = fabsf(scales[ib]); max_scale = scales[ib]; }
    }
    memset(out, 0, 210);
    if (max_abs < 1e-15f) return; /* all zero: d = 0 */
    float iscale = -128.f / max_scale;
    uint16_t d16 = f32_to_f16(1 / iscale);
    int8_t *sc = (int8_t *)(out + 192);
    put16(out + 208, d16);
    for (int ib = 0; ib < 16; ib++) sc[ib] = (int8_t)imin(127, nearest_int(iscale * scales[ib]));
    for (int j = 0; j < 16; j++) {
        float d = f16_to_f32(d16) * sc[j];
        if (!d) continue;
        for (int i = 0; i < 16; i++) L[16 * j + i] = (int8_t)(imax(-32, imin(31, nearest_int(x[16 * j + i] / d))) + 32);
    }
    uint8_t *ql = out, *qh = out + 128;
    for (int j = 0; j < QK_K; j += 128, ql += 64, qh += 32)
        for (int l = 0; l < 32; l++) {
            const int8_t *v = L + j + l;
            ql[l] = (uint8_t)((v[0] & 15) | (v[64] & 15) << 4);
            ql[l + 32] = (uint8_t)((v[32] & 15) | (v[96] & 15) << 4);
            qh[l] = (uint8_t)((v[0] >> 4) | (v[32] >> 4) << 2 | (v[64] >> 4) << 4 | (v[96] >> 4) << 6);
        }
}

/* ---- types, rows, main --------------------------------------------------------------------- */

typedef struct {
    const char *name;
    int block, bytes;                           /* values and bytes per block */
    void (*quantize)(const float *, uint8_t *); /* one block; NULL for the float types */
} Type;

static const Type TYPES[] = {
    {"F32", 1, 4, NULL},          {"F16", 1, 2, NULL},          {"BF16", 1, 2, NULL},
    {"Q8_0", QK, 34, q8_0_block}, {"Q4_0", QK, 18, q4_0_block}, {"Q5_0", QK, 22, q5_0_block},
    {"Q4_K", QK_K, 144, q4_k_block}, {"Q6_K", QK_K, 210, q6_k_block},
};

/* One row of n values in type t into out. */
static void quantize_row(const Type *t, const float *x, long n, uint8_t *out) {
    long i;
    if (t->quantize) {
        for (i = 0; i < n; i += t->block) t->quantize(x + i, out + i / t->block * t->bytes);
    } else if (t->bytes == 4) {
        for (i = 0; i < n; i++) {
            uint32_t u = f32_bits(x[i]);
            for (int k = 0; k < 4; k++) out[4 * i + k] = (uint8_t)(u >> 8 * k);
        }
    } else {
        for (i = 0; i < n; i++) put16(out + 2 * i, t->name[0] == 'F' ? f32_to_f16(x[i]) : f32_to_bf16(x[i]));
    }
}

static long parse_count(const char *s, const char *what) {
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || *end || end == s || v < 0 || v > 0x7fffffffLL) die("bad ", what);
    return (long)v;
}

int main(int argc, char **argv) {
    if (argc != 7) die("usage: gguf_quantize FILE OFFSET bf16|f16|f32 ROWS COLS TYPE > blocks", "");
    char *end;
    errno = 0;
    long long offset = strtoll(argv[2], &end, 10);
    if (errno || *end || end == argv[2] || offset < 0) die("bad OFFSET ", argv[2]);
    int src = !strcmp(argv[3], "f32") ? 4 : !strcmp(argv[3], "bf16") ? 2 : !strcmp(argv[3], "f16") ? 1 : 0;
    if (!src) die("SRC must be bf16, f16 or f32, not ", argv[3]);
    long rows = parse_count(argv[4], "ROWS"), cols = parse_count(argv[5], "COLS");
    const Type *t = NULL;
    for (size_t i = 0; i < sizeof TYPES / sizeof TYPES[0]; i++)
        if (!strcmp(argv[6], TYPES[i].name)) t = &TYPES[i];
    if (!t) die("unknown TYPE ", argv[6]);
    if (cols == 0 || cols % t->block) die("COLS must be a positive multiple of the block of ", t->name);

    FILE *f = fopen(argv[1], "rb");
    if (!f) die("cannot open ", argv[1]);
    if (fseek(f, (long)offset, SEEK_SET) != 0) die("cannot seek in ", argv[1]);
    size_t in_bytes = (size_t)cols * (size_t)(src == 4 ? 4 : 2), out_bytes = (size_t)(cols / t->block) * (size_t)t->bytes;
    uint8_t *in = malloc(in_bytes), *out = malloc(out_bytes);
    float *x = malloc((size_t)cols * sizeof(float));
    if (!in || !out || !x) die("out of memory", "");
    for (long r = 0; r < rows; r++) {
        if (fread(in, 1, in_bytes, f) != in_bytes) die("file ends inside the tensor: ", argv[1]);
        for (long i = 0; i < cols; i++) {
            const uint8_t *p = in + (size_t)i * (src == 4 ? 4 : 2);
            if (src == 4) x[i] = bits_f32((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24);
            else if (src == 2) x[i] = bits_f32((uint32_t)(p[0] | p[1] << 8) << 16);
            else x[i] = f16_to_f32((uint16_t)(p[0] | p[1] << 8));
            if (!isfinite(x[i])) die("a value is not finite in ", argv[1]);
        }
        quantize_row(t, x, cols, out);
        if (fwrite(out, 1, out_bytes, stdout) != out_bytes) die("cannot write the blocks", "");
    }
    if (fflush(stdout) != 0) die("cannot write the blocks", "");
    fclose(f);
    free(in);
    free(out);
    free(x);
    return 0;
}
