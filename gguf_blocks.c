/* gguf_blocks.c - the block formats of GGUF (ggml) tensor types, in one place.
 *
 * One decode function per type turns one block's bytes into its float32 values, doing
 * the same float32 operations in the same order as gguf-py's `gguf.quants.dequantize`
 * (the numpy reference, gguf 0.19.0), so that a build without multiply-add contraction
 * (-ffp-contract=off; C99 mode in gcc, explicit in clang) gives its values bit for bit.
 * Half floats widen as numpy does (subnormals exact, inf and NaN payloads kept). Block
 * layouts are those of llama.cpp's ggml/src/ggml-common.h; every multi-byte field is read
 * byte by byte as little-endian, so the decoders work on any host. The value tables
 * (IQ4_NL's and FP4's values, the i-quant grids) are data, in gguf_tables.c.
 *
 * The table ggml_types maps a ggml type number (enum ggml_type in ggml.h) to its name,
 * values and bytes per block, and decoder. Shared by tools/gguf_dequant.c (export.py's
 * dequantizer) and the engine. C99, standard library only; every name starts with gguf_
 * or ggml_ (or is a decoder, dq_*), so the file can be included beside other code. */
#include <stdint.h>
#include <string.h>

#define QK 32   /* values per block of the "legacy" types (Q4_0 ... Q8_0, IQ4_NL) */
#define QK_K 256 /* values per super-block of the k-quants and IQ4_XS */

static uint16_t gguf_rd16(const unsigned char *p) { return (uint16_t)(p[0] | p[1] << 8); }
static uint32_t gguf_rd32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static float gguf_bits_to_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
/* IEEE half -> float, exactly as numpy's npy_halfbits_to_floatbits: subnormal
 * halves become normal floats, inf stays inf, a NaN keeps its sign and payload
 * (a signalling NaN stays signalling). */
static float gguf_f16(const unsigned char *p) {
    uint32_t h = gguf_rd16(p), sign = (h & 0x8000u) << 16, exp = h & 0x7c00u, man = h & 0x03ffu;
    if (exp == 0x7c00u) return gguf_bits_to_f32(sign | 0x7f800000u | man << 13); /* inf, NaN */
    if (exp != 0) return gguf_bits_to_f32(sign | ((exp >> 10) + 112) << 23 | man << 13);
    if (man == 0) return gguf_bits_to_f32(sign); /* +-0 */
    /* subnormal: shift the mantissa up until its leading 1 is the implicit bit */
    int e = 113;
    while (!(man & 0x0400u)) {
        man <<= 1;
        e--;
    }
    return gguf_bits_to_f32(sign | (uint32_t)e << 23 | (man & 0x03ffu) << 13);
}

/* The value tables (IQ4_NL's and MXFP4's values, the i-quant grids): data only, written
 * from gguf-py's by tools/gguf_tables.py, kept apart because the grids are 4,608 entries. */
#include "gguf_tables.c"

/* ---- one function per block type: b = the block's bytes, y = its values ---- */

/* F32: 4 bytes. */
static void dq_f32(const unsigned char *b, float *y) { y[0] = gguf_bits_to_f32(gguf_rd32(b)); }
/* F16: 2 bytes. */
static void dq_f16(const unsigned char *b, float *y) { y[0] = gguf_f16(b); }
/* BF16: 2 bytes, the top half of a float32. */
static void dq_bf16(const unsigned char *b, float *y) { y[0] = gguf_bits_to_f32((uint32_t)gguf_rd16(b) << 16); }

/* Q4_0, 18 bytes: half d; 16 bytes qs, value j in the low nibble of qs[j],
 * value j + 16 in the high nibble. y = d * (nibble - 8). */
static void dq_q4_0(const unsigned char *b, float *y) {
    float d = gguf_f16(b);
    for (int j = 0; j < QK / 2; j++) {
        y[j] = d * (float)((b[2 + j] & 0x0f) - 8);
        y[j + QK / 2] = d * (float)((b[2 + j] >> 4) - 8);
    }
}

/* Q4_1, 20 bytes: half d, half m, 16 bytes qs as Q4_0. y = d * nibble + m. */
static void dq_q4_1(const unsigned char *b, float *y) {
    float d = gguf_f16(b), m = gguf_f16(b + 2);
    for (int j = 0; j < QK / 2; j++) {
        y[j] = d * (float)(b[4 + j] & 0x0f) + m;
        y[j + QK / 2] = d * (float)(b[4 + j] >> 4) + m;
    }
}

/* Q5_0, 22 bytes: half d; u32 qh (bit j = fifth bit of value j); 16 bytes qs
 * as Q4_0. y = d * (q - 16). */
static void dq_q5_0(const unsigned char *b, float *y) {
    float d = gguf_f16(b);
    uint32_t qh = gguf_rd32(b + 2);
    for (int j = 0; j < QK / 2; j++) {
        int lo = (b[6 + j] & 0x0f) | (int)((qh >> j) & 1) << 4;
        int hi = (b[6 + j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4;
        y[j] = d * (float)(lo - 16);
        y[j + QK / 2] = d * (float)(hi - 16);
    }
}

/* Q5_1, 24 bytes: half d, half m, u32 qh, 16 bytes qs. y = d * q + m. */
static void dq_q5_1(const unsigned char *b, float *y) {
    float d = gguf_f16(b), m = gguf_f16(b + 2);
    uint32_t qh = gguf_rd32(b + 4);
    for (int j = 0; j < QK / 2; j++) {
        int lo = (b[8 + j] & 0x0f) | (int)((qh >> j) & 1) << 4;
        int hi = (b[8 + j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4;
        y[j] = d * (float)lo + m;
        y[j + QK / 2] = d * (float)hi + m;
    }
}

/* Q8_0, 34 bytes: half d, 32 int8 q. y = q * d. */
static void dq_q8_0(const unsigned char *b, float *y) {
    float d = gguf_f16(b);
    for (int j = 0; j < QK; j++) y[j] = (float)(int8_t)b[2 + j] * d;
}

/* Q2_K, 84 bytes: scales[16] (low nibble: scale, high nibble: min, one pair per
 * 16 values); qs[64], 2 bits per value; half d; half dmin. Value i = 128h + 32s + l
 * (h < 2, s < 4, l < 32) is bits 2s..2s+1 of qs[32h + l].
 * y = (d * scale) * q - (dmin * min). */
static void dq_q2_k(const unsigned char *b, float *y) {
    const unsigned char *sc = b, *qs = b + 16;
    float d = gguf_f16(b + 80), dmin = gguf_f16(b + 82);
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
    float d = gguf_f16(b + 108);
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
static void gguf_scale_min_k4(const unsigned char *q, int j, int *sc, int *m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0x0f) | (q[j - 4] >> 6) << 4;
        *m = (q[j + 4] >> 4) | (q[j] >> 6) << 4;
    }
}

/* Q4_K, 144 bytes: half d; half dmin; scales[12] (gguf_scale_min_k4); qs[128]. Eight
 * groups of 32 values: group g = 2k + n takes the low (n = 0) or high (n = 1)
 * nibbles of qs[32k .. 32k + 31]. y = (d * scale) * q - (dmin * min). */
static void dq_q4_k(const unsigned char *b, float *y) {
    float d = gguf_f16(b), dmin = gguf_f16(b + 2);
    const unsigned char *qs = b + 16;
    for (int g = 0; g < 8; g++) {
        int sc, m;
        gguf_scale_min_k4(b + 4, g, &sc, &m);
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
    float d = gguf_f16(b), dmin = gguf_f16(b + 2);
    const unsigned char *qh = b + 16, *qs = b + 48;
    for (int g = 0; g < 8; g++) {
        int sc, m;
        gguf_scale_min_k4(b + 4, g, &sc, &m);
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
    float d = gguf_f16(b + 208);
    for (int i = 0; i < QK_K; i++) {
        int h = i / 128, r = i % 128;
        int lo = (ql[64 * h + r % 64] >> (4 * (r / 64))) & 0x0f;
        int hi = (qh[32 * h + r % 32] >> (2 * (r / 32))) & 0x03;
        y[i] = (d * (float)(int8_t)sc[i / 16]) * (float)((lo | hi << 4) - 32);
    }
}

/* IQ4_NL, 18 bytes: half d; qs[16] as Q4_0, each nibble an index into
 * gguf_kvalues_iq4nl. y = d * kvalues[nibble]. */
static void dq_iq4_nl(const unsigned char *b, float *y) {
    float d = gguf_f16(b);
    for (int j = 0; j < QK / 2; j++) {
        y[j] = d * (float)gguf_kvalues_iq4nl[b[2 + j] & 0x0f];
        y[j + QK / 2] = d * (float)gguf_kvalues_iq4nl[b[2 + j] >> 4];
    }
}

/* IQ4_XS, 136 bytes: half d; u16 scales_h (2 bits per group); scales_l[4] (a
 * nibble per group); qs[128]. Eight groups of 32: scale g = (nibble g % 2 of
 * scales_l[g / 2] | bits 2g..2g+1 of scales_h << 4) - 32; the group's values are
 * the low nibbles of qs[16g .. 16g + 15], then their high nibbles.
 * y = (d * scale) * kvalues[nibble]. */
static void dq_iq4_xs(const unsigned char *b, float *y) {
    float d = gguf_f16(b);
    unsigned scales_h = gguf_rd16(b + 2);
    const unsigned char *scales_l = b + 4, *qs = b + 8;
    for (int g = 0; g < 8; g++) {
        int lo = (scales_l[g / 2] >> (4 * (g % 2))) & 0x0f;
        int hi = (int)(scales_h >> (2 * g)) & 0x03;
        float dl = d * (float)((lo | hi << 4) - 32);
        for (int l = 0; l < 16; l++) {
            y[32 * g + l] = dl * (float)gguf_kvalues_iq4nl[qs[16 * g + l] & 0x0f];
            y[32 * g + l + 16] = dl * (float)gguf_kvalues_iq4nl[qs[16 * g + l] >> 4];
        }
    }
}

/* ---- the i-quants: values are points of a fixed grid (gguf_tables.c), times a scale ---- */

/* Coordinate j of point idx of a grid whose points hold 2-bit codes (IQ1, IQ2). */
static float gguf_grid2(const uint16_t *grid, const float *coords, unsigned idx, int j) {
    return coords[(grid[idx] >> (2 * j)) & 3];
}
/* Coordinate j of point idx of a grid whose points hold 4-bit codes (IQ3). */
static float gguf_grid4(const uint16_t *grid, const float *coords, unsigned idx, int j) {
    return coords[(grid[idx] >> (4 * j)) & 15];
}
/* The 8 signs of 8 values from a 7-bit index: its 7 bits, and an eighth that makes the
 * number of minus signs even (ksigns_iq2xs in ggml-common.h). Bit j set: value j negative. */
static unsigned gguf_ksigns(unsigned i) {
    unsigned odd = 0;
    for (int k = 0; k < 7; k++) odd ^= (i >> k) & 1;
    return i | odd << 7;
}
/* +1 or -1 from sign bit j of s, to multiply by, as gguf-py does. (On a NaN scale the
 * NaN's sign bit is left open: IEEE does not define it, and compilers and numpy differ.) */
static float gguf_sign(unsigned s, int j) { return (s >> j) & 1 ? -1.0f : 1.0f; }

/* IQ2_XXS, 66 bytes: half d; then per 32 values 8 bytes: four grid indices (bytes 0..3,
 * each a point of gguf_iq2xxs_grid: 8 values) and a u32 holding four 7-bit sign indices
 * (bits 7k..7k+6, for the values of index k) and a scale s (bits 28..31).
 * y = d * (0.5 + s) * 0.25 * grid * sign. */
static void dq_iq2_xxs(const unsigned char *b, float *y) {
    float d = gguf_f16(b);
    for (int g = 0; g < 8; g++, y += 32) {
        const unsigned char *q = b + 2 + 8 * g;
        uint32_t aux = gguf_rd32(q + 4);
        float db = d * (0.5f + (float)(aux >> 28)) * 0.25f;
        for (int k = 0; k < 4; k++) {
            unsigned signs = gguf_ksigns((aux >> (7 * k)) & 127);
            for (int j = 0; j < 8; j++)
                y[8 * k + j] = db * gguf_grid2(gguf_iq2xxs_grid, gguf_iq2_coords, q[k], j) * gguf_sign(signs, j);
        }
    }
}

/* IQ2_XS, 74 bytes: half d; 32 u16, one per 8 values: grid index (bits 0..8, a point of
 * gguf_iq2xs_grid) and 7-bit sign index (bits 9..15); scales[8], a nibble s per 16 values
 * (low nibble first). y = d * (0.5 + s) * 0.25 * grid * sign. */
static void dq_iq2_xs(const unsigned char *b, float *y) {
    float d = gguf_f16(b);
    const unsigned char *sc = b + 66;
    for (int k = 0; k < 32; k++, y += 8) {
        unsigned q = gguf_rd16(b + 2 + 2 * k), signs = gguf_ksigns(q >> 9);
        int s = (sc[k / 4] >> (4 * (k / 2 % 2))) & 15;
        float db = d * (0.5f + (float)s) * 0.25f;
        for (int j = 0; j < 8; j++) y[j] = db * gguf_grid2(gguf_iq2xs_grid, gguf_iq2_coords, q & 511, j) * gguf_sign(signs, j);
    }
}

/* IQ2_S, 82 bytes: half d; qs[32], the low 8 bits of a grid index per 8 values (a point of
 * gguf_iq2s_grid); signs[32], one bit per value (bit j of signs[k]: value 8k + j); qh[8],
 * the high 2 bits of index k at bits 2(k % 4) of qh[k / 4]; scales[8], a nibble s per 16
 * values. y = d * (0.5 + s) * 0.25 * grid * sign. */
static void dq_iq2_s(const unsigned char *b, float *y) {
    float d = gguf_f16(b);
    const unsigned char *qs = b + 2, *signs = b + 34, *qh = b + 66, *sc = b + 74;
    for (int k = 0; k < 32; k++, y += 8) {
        unsigned idx = qs[k] | ((qh[k / 4] >> (2 * (k % 4))) & 3u) << 8;
        int s = (sc[k / 4] >> (4 * (k / 2 % 2))) & 15;
        float db = d * (0.5f + (float)s) * 0.25f;
        for (int j = 0; j < 8; j++) y[j] = db * gguf_grid2(gguf_iq2s_grid, gguf_iq2_coords, idx, j) * gguf_sign(signs[k], j);
    }
}

/* IQ3_XXS, 98 bytes: half d; qs[64], a grid index per 4 values (a point of
 * gguf_iq3xxs_grid); then a u32 per 32 values: four 7-bit sign indices (bits 7k..7k+6,
 * for its values 8k .. 8k + 7) and a scale s (bits 28..31).
 * y = d * (0.5 + s) * 0.5 * grid * sign. */
static void dq_iq3_xxs(const unsigned char *b, float *y) {
    float d = gguf_f16(b);
    const unsigned char *qs = b + 2;
    for (int g = 0; g < 8; g++, y += 32) {
        uint32_t aux = gguf_rd32(b + 66 + 4 * g);
        float db = d * (0.5f + (float)(aux >> 28)) * 0.5f;
        for (int k = 0; k < 4; k++) {
            unsigned signs = gguf_ksigns((aux >> (7 * k)) & 127);
            for (int j = 0; j < 8; j++)
                y[8 * k + j] = db * gguf_grid4(gguf_iq3xxs_grid, gguf_iq3xxs_coords, qs[8 * g + 2 * k + j / 4], j % 4) *
                               gguf_sign(signs, j);
        }
    }
}

/* IQ3_S, 110 bytes: half d; qs[64], the low 8 bits of a grid index per 4 values (a point
 * of gguf_iq3s_grid); qh[8], the ninth bit of index k at bit k % 8 of qh[k / 8];
 * signs[32], one bit per value (value v: bit v % 8 of signs[v / 8]); scales[4], a nibble
 * s per 32 values. y = d * (1 + 2s) * grid * sign. */
static void dq_iq3_s(const unsigned char *b, float *y) {
    float d = gguf_f16(b);
    const unsigned char *qs = b + 2, *qh = b + 66, *signs = b + 74, *sc = b + 106;
    for (int v = 0; v < QK_K; v++) {
        int k = v / 4;
        unsigned idx = qs[k] | ((qh[k / 8] >> (k % 8)) & 1u) << 8;
        int s = (sc[v / 64] >> (4 * (v / 32 % 2))) & 15;
        float db = d * (float)(1 + 2 * s);
        y[v] = db * gguf_grid4(gguf_iq3s_grid, gguf_iq3s_coords, idx, v % 4) * gguf_sign(signs[v / 8], v % 8);
    }
}

/* IQ1_S and IQ1_M values sit off the grid's -1/0/+1 points by +-1/8. */
#define GGUF_IQ1_DELTA 0.125f

/* IQ1_S, 50 bytes: half d; qs[32], the low 8 bits of a grid index per 8 values (a point
 * of gguf_iq1s_grid); then a u16 per 32 values: the high 3 bits of its four indices
 * (bits 3k..3k+2), a scale s (bits 12..14) and the sign of delta (bit 15: minus).
 * y = d * (2s + 1) * (grid + delta). */
static void dq_iq1_s(const unsigned char *b, float *y) {
    float d = gguf_f16(b);
    const unsigned char *qs = b + 2;
    for (int g = 0; g < 8; g++) {
        unsigned qh = gguf_rd16(b + 34 + 2 * g);
        float dl = d * (float)(2 * ((qh >> 12) & 7) + 1);
        float delta = qh & 0x8000 ? -GGUF_IQ1_DELTA : GGUF_IQ1_DELTA;
        for (int k = 0; k < 4; k++, y += 8) {
            unsigned idx = qs[4 * g + k] | ((qh >> (3 * k)) & 7) << 8;
            for (int j = 0; j < 8; j++) y[j] = dl * (gguf_grid2(gguf_iq1s_grid, gguf_iq1_coords, idx, j) + delta);
        }
    }
}

/* IQ1_M, 56 bytes: qs[32], the low 8 bits of a grid index per 8 values (gguf_iq1s_grid);
 * qh[16], a nibble per 8 values (low nibble first): the high 3 bits of the index, and bit 3
 * the sign of delta (set: minus); scales: four u16 holding a 3-bit scale s per 16 values
 * (scale i at bits 3(i % 4) of word i / 4) and, in their top nibbles (word 0 lowest), the
 * half d. y = d * (2s + 1) * (grid + delta). */
static void dq_iq1_m(const unsigned char *b, float *y) {
    const unsigned char *qs = b, *qh = b + 32;
    unsigned sc[4];
    for (int w = 0; w < 4; w++) sc[w] = gguf_rd16(b + 48 + 2 * w);
    unsigned char dh[2];
    unsigned dbits = sc[0] >> 12 | (sc[1] >> 8 & 0x00f0) | (sc[2] >> 4 & 0x0f00) | (sc[3] & 0xf000);
    dh[0] = (unsigned char)(dbits & 0xff);
    dh[1] = (unsigned char)(dbits >> 8);
    float d = gguf_f16(dh);
    for (int k = 0; k < 32; k++, y += 8) {
        int i = k / 2; /* the scale's index: one per 16 values */
        float dl = d * (float)(2 * ((sc[i / 4] >> (3 * (i % 4))) & 7) + 1);
        unsigned nib = (qh[k / 2] >> (4 * (k % 2))) & 15;
        unsigned idx = qs[k] | (nib & 7) << 8;
        float delta = nib & 8 ? -GGUF_IQ1_DELTA : GGUF_IQ1_DELTA;
        for (int j = 0; j < 8; j++) y[j] = dl * (gguf_grid2(gguf_iq1s_grid, gguf_iq1_coords, idx, j) + delta);
    }
}

/* ---- ternary and FP4 types ---- */

/* TQ1_0, 54 bytes: qs[48]; qh[4]; half d. Each byte holds base-3 digits (5 in qs, 4 in
 * qh), stored as ceil(number * 256 / 243) so that digit n of byte q is the top bits of
 * (uint8)(q * 3^n) * 3. Value 32n + j: digit n of qs[j] (j < 32); 160 + 16n + j: digit n
 * of qs[32 + j] (j < 16); 240 + 4n + j: digit n of qh[j]. y = d * (digit - 1). */
static void dq_tq1_0(const unsigned char *b, float *y) {
    static const unsigned char pow3[5] = {1, 3, 9, 27, 81};
    float d = gguf_f16(b + 52);
    for (int i = 0; i < QK_K; i++) {
        int q, n;
        if (i < 160) q = b[i % 32], n = i / 32;
        else if (i < 240) q = b[32 + (i - 160) % 16], n = (i - 160) / 16;
        else q = b[48 + (i - 240) % 4], n = (i - 240) / 4;
        unsigned char t = (unsigned char)(q * pow3[n]);
        y[i] = d * (float)(((t * 3) >> 8) - 1);
    }
}

/* TQ2_0, 66 bytes: qs[64], 2 bits per value; half d. Value 128h + 32n + l is bits
 * 2n..2n+1 of qs[32h + l]. y = d * (q - 1). */
static void dq_tq2_0(const unsigned char *b, float *y) {
    float d = gguf_f16(b + 64);
    for (int i = 0; i < QK_K; i++) {
        int h = i / 128, n = (i % 128) / 32, l = i % 32;
        y[i] = d * (float)(((b[32 * h + l] >> (2 * n)) & 3) - 1);
    }
}

/* MXFP4's E8M0 block scale, halved (the FP4 values are doubled): 2^(e - 128), built from
 * its bits (ggml_e8m0_to_fp32_half): e < 2 gives a subnormal float, e = 255 is 2^127. */
static float gguf_e8m0_half(unsigned e) {
    return gguf_bits_to_f32(e < 2 ? 0x00200000u << e : (e - 1) << 23);
}

/* MXFP4, 17 bytes: E8M0 exponent e; qs[16], FP4 codes: value j the low nibble of qs[j],
 * value 16 + j the high one. y = 2^(e - 128) * kvalues_mxfp4[code]. */
static void dq_mxfp4(const unsigned char *b, float *y) {
    float d = gguf_e8m0_half(b[0]);
    for (int j = 0; j < QK / 2; j++) {
        y[j] = d * (float)gguf_kvalues_mxfp4[b[1 + j] & 0x0f];
        y[j + QK / 2] = d * (float)gguf_kvalues_mxfp4[b[1 + j] >> 4];
    }
}

/* NVFP4's unsigned E4M3 scale (4 exponent bits e, bias 7, 3 mantissa bits m; bit 7
 * ignored), halved: (1 + m/8) * 2^(e - 7), built from its float32 bits; e = 0 is
 * subnormal, m * 2^-9; 0x00 and 0x7f give 0. Every step is exact in float32. */
static float gguf_ue4m3_half(unsigned x) {
    unsigned e = (x >> 3) & 15, m = x & 7;
    if (x == 0 || x == 0x7f) return 0.0f;
    float v = e == 0 ? (float)m / 512.0f : gguf_bits_to_f32((e + 120) << 23 | m << 20);
    return v * 0.5f;
}

/* NVFP4, 36 bytes, 64 values: four UE4M3 scales d_s (one per 16 values); qs[32], FP4
 * codes as MXFP4's: value 16s + j is the low nibble of qs[8s + j] (j < 8), value
 * 16s + 8 + j its high nibble. y = d_s * kvalues_mxfp4[code]. */
static void dq_nvfp4(const unsigned char *b, float *y) {
    for (int s = 0; s < 4; s++, y += 16) {
        float d = gguf_ue4m3_half(b[s]);
        for (int j = 0; j < 8; j++) {
            y[j] = d * (float)gguf_kvalues_mxfp4[b[4 + 8 * s + j] & 0x0f];
            y[j + 8] = d * (float)gguf_kvalues_mxfp4[b[4 + 8 * s + j] >> 4];
        }
    }
}

/* ggml type numbers (enum ggml_type in ggml.h), block sizes in values and bytes. */
typedef struct {
    int type;
    const char *name;
    int block_values, block_bytes;
    void (*dequant)(const unsigned char *, float *);
} GGMLType;

static const GGMLType ggml_types[] = {
    {0, "F32", 1, 4, dq_f32},          {1, "F16", 1, 2, dq_f16},
    {2, "Q4_0", QK, 18, dq_q4_0},      {3, "Q4_1", QK, 20, dq_q4_1},
    {6, "Q5_0", QK, 22, dq_q5_0},      {7, "Q5_1", QK, 24, dq_q5_1},
    {8, "Q8_0", QK, 34, dq_q8_0},      {10, "Q2_K", QK_K, 84, dq_q2_k},
    {11, "Q3_K", QK_K, 110, dq_q3_k},  {12, "Q4_K", QK_K, 144, dq_q4_k},
    {13, "Q5_K", QK_K, 176, dq_q5_k},  {14, "Q6_K", QK_K, 210, dq_q6_k},
    {16, "IQ2_XXS", QK_K, 66, dq_iq2_xxs}, {17, "IQ2_XS", QK_K, 74, dq_iq2_xs},
    {18, "IQ3_XXS", QK_K, 98, dq_iq3_xxs}, {19, "IQ1_S", QK_K, 50, dq_iq1_s},
    {20, "IQ4_NL", QK, 18, dq_iq4_nl},     {21, "IQ3_S", QK_K, 110, dq_iq3_s},
    {22, "IQ2_S", QK_K, 82, dq_iq2_s},     {23, "IQ4_XS", QK_K, 136, dq_iq4_xs},
    {29, "IQ1_M", QK_K, 56, dq_iq1_m},     {30, "BF16", 1, 2, dq_bf16},
    {34, "TQ1_0", QK_K, 54, dq_tq1_0},     {35, "TQ2_0", QK_K, 66, dq_tq2_0},
    {39, "MXFP4", QK, 17, dq_mxfp4},       {40, "NVFP4", 64, 36, dq_nvfp4},
};

/* The type with ggml number `type`, or NULL when it is not one of the above. */
static const GGMLType *ggml_type(int type) {
    for (size_t i = 0; i < sizeof ggml_types / sizeof ggml_types[0]; i++)
        if (ggml_types[i].type == type) return &ggml_types[i];
    return NULL;
}

/* ------------------------------------------------------------------------- */
/* Dot products of a row of blocks with int8 activations (the engine's; a file that
 * includes this one defines GGUF_BLOCKS_DOTS to get them).
 *
 * The activations come as gemma3.c's quantize_activations makes them: blocks of 32
 * values x ~ xs[b] * xq[32 b + i], with xsum[b] the sum of block b's 32 int8 values.
 * Every weight block here covers whole activation blocks (32 or 256 values), so for
 * each block of 32 activations a function multiplies the weights' integer codes by xq
 * in int32 (per group of 16 or 32 weights that share a scale), combines the groups
 * with their integer (sub-)scales where it can, and only then goes to float: the
 * block's scales (and mins) times xs[b]. Its result equals the decoded weights (dq_*)
 * times xs[b] * xq up to float rounding; test_all.c checks that. The SIMD kernels
 * (kernels_x86.c) compute the same integer sums. n: values in the row, a multiple of
 * the block's values. F16 has none: the engine decodes it and multiplies in float. (The
 * engine calls a dot twice per row: with x's int8 blocks and with their rounding error's.) */
#ifdef GGUF_BLOCKS_DOTS

/* sum of a[i] * x[i], i < 16, for 4-bit (or smaller) codes a */
static int32_t gguf_idot16(const int8_t *a, const int8_t *x) {
    int32_t s = 0;
    for (int i = 0; i < 16; i++) s += (int32_t)a[i] * x[i];
    return s;
}

/* Q4_0: (d xs) * (sum nibble x - 8 sum x) */
static float gguf_dot_q4_0(const unsigned char *w, const int8_t *xq, const float *xs, const int32_t *xsum, int n) {
    float sum = 0.0f;
    for (int b = 0; b < n / QK; b++, w += 18) {
        const int8_t *x = xq + QK * b;
        int32_t s = 0;
        for (int j = 0; j < QK / 2; j++) s += (int32_t)(w[2 + j] & 0x0f) * x[j] + (int32_t)(w[2 + j] >> 4) * x[j + 16];
        sum += gguf_f16(w) * xs[b] * (float)(s - 8 * xsum[b]);
    }
    return sum;
}

/* Q4_1: xs (d sum nibble x + m sum x) */
static float gguf_dot_q4_1(const unsigned char *w, const int8_t *xq, const float *xs, const int32_t *xsum, int n) {
    float sum = 0.0f;
    for (int b = 0; b < n / QK; b++, w += 20) {
        const int8_t *x = xq + QK * b;
        int32_t s = 0;
        for (int j = 0; j < QK / 2; j++) s += (int32_t)(w[4 + j] & 0x0f) * x[j] + (int32_t)(w[4 + j] >> 4) * x[j + 16];
        sum += xs[b] * (gguf_f16(w) * (float)s + gguf_f16(w + 2) * (float)xsum[b]);
    }
    return sum;
}

/* The 32 five-bit codes of a Q5_0 / Q5_1 block: low nibbles from qs, fifth bits from qh. */
static void gguf_q5_codes(const unsigned char *qh4, const unsigned char *qs, int8_t *q) {
    uint32_t qh = gguf_rd32(qh4);
    for (int j = 0; j < QK / 2; j++) {
        q[j] = (int8_t)((qs[j] & 0x0f) | ((qh >> j) & 1) << 4);
        q[j + 16] = (int8_t)((qs[j] >> 4) | ((qh >> (j + 16)) & 1) << 4);
    }
}

/* Q5_0: (d xs) * (sum q x - 16 sum x) */
static float gguf_dot_q5_0(const unsigned char *w, const int8_t *xq, const float *xs, const int32_t *xsum, int n) {
    float sum = 0.0f;
    for (int b = 0; b < n / QK; b++, w += 22) {
        int8_t q[QK];
        gguf_q5_codes(w + 2, w + 6, q);
        int32_t s = gguf_idot16(q, xq + QK * b) + gguf_idot16(q + 16, xq + QK * b + 16);
        sum += gguf_f16(w) * xs[b] * (float)(s - 16 * xsum[b]);
    }
    return sum;
}

/* Q5_1: xs (d sum q x + m sum x) */
static float gguf_dot_q5_1(const unsigned char *w, const int8_t *xq, const float *xs, const int32_t *xsum, int n) {
    float sum = 0.0f;
    for (int b = 0; b < n / QK; b++, w += 24) {
        int8_t q[QK];
        gguf_q5_codes(w + 4, w + 8, q);
        int32_t s = gguf_idot16(q, xq + QK * b) + gguf_idot16(q + 16, xq + QK * b + 16);
        sum += xs[b] * (gguf_f16(w) * (float)s + gguf_f16(w + 2) * (float)xsum[b]);
    }
    return sum;
}

/* Q8_0: (d xs) * sum q x */
static float gguf_dot_q8_0(const unsigned char *w, const int8_t *xq, const float *xs, const int32_t *xsum, int n) {
    float sum = 0.0f;
    (void)xsum;
    for (int b = 0; b < n / QK; b++, w += 34) {
        int32_t s = gguf_idot16((const int8_t *)w + 2, xq + QK * b) + gguf_idot16((const int8_t *)w + 18, xq + QK * b + 16);
        sum += gguf_f16(w) * xs[b] * (float)s;
    }
    return sum;
}

/* Q2_K: per 32 values, two groups of 16 with 4-bit scale sc and min m:
 * xs (d (sc0 sum q x + sc1 ...) - dmin (m0 sum x + m1 ...)), sums over each 16. */
static float gguf_dot_q2_k(const unsigned char *w, const int8_t *xq, const float *xs, const int32_t *xsum, int n) {
    float sum = 0.0f;
    (void)xsum;
    for (int s0 = 0; s0 < n / QK_K; s0++, w += 84) {
        float d = gguf_f16(w + 80), dmin = gguf_f16(w + 82);
        for (int g = 0; g < 8; g++) { /* values 32g .. 32g + 31: bits 2(g % 4) of qs[32(g / 4) + l] */
            const int b = 8 * s0 + g;
            const int8_t *x = xq + QK * b;
            int8_t q[QK];
            for (int l = 0; l < QK; l++) q[l] = (int8_t)((w[16 + 32 * (g / 4) + l] >> (2 * (g % 4))) & 3);
            int32_t sc = 0, mn = 0;
            for (int h = 0; h < 2; h++) {
                int32_t sx = 0;
                for (int l = 0; l < 16; l++) sx += x[16 * h + l];
                sc += (w[2 * g + h] & 0x0f) * gguf_idot16(q + 16 * h, x + 16 * h);
                mn += (w[2 * g + h] >> 4) * sx;
            }
            sum += xs[b] * (d * (float)sc - dmin * (float)mn);
        }
    }
    return sum;
}

/* Q3_K: per 16 values a signed 6-bit scale; codes low - (high bit clear ? 4 : 0) in -4..3.
 * (d xs) * sum over the two groups of scale * sum q x. */
static float gguf_dot_q3_k(const unsigned char *w, const int8_t *xq, const float *xs, const int32_t *xsum, int n) {
    float sum = 0.0f;
    (void)xsum;
    for (int s0 = 0; s0 < n / QK_K; s0++, w += 110) {
        const unsigned char *hm = w, *qs = w + 32, *sc = w + 96;
        float d = gguf_f16(w + 108);
        for (int g = 0; g < 8; g++) {
            const int b = 8 * s0 + g, h = g / 4, s = g % 4;
            int8_t q[QK];
            for (int l = 0; l < QK; l++)
                q[l] = (int8_t)(((qs[32 * h + l] >> (2 * s)) & 3) - (((hm[l] >> (4 * h + s)) & 1) ? 0 : 4));
            int32_t acc = 0;
            for (int k = 0; k < 2; k++) {
                int j = 2 * g + k;
                int scale = (((sc[j % 8] >> (4 * (j / 8))) & 0x0f) | ((sc[8 + j % 4] >> (2 * (j / 4))) & 0x03) << 4) - 32;
                acc += scale * gguf_idot16(q + 16 * k, xq + QK * b + 16 * k);
            }
            sum += d * xs[b] * (float)acc;
        }
    }
    return sum;
}

/* Q4_K / Q5_K: per 32 values a 6-bit scale and min: xs (d sc sum q x - dmin m sum x).
 * qh: Q5_K's fifth bits (NULL for Q4_K). */
static float gguf_dot_k4(const unsigned char *w, const unsigned char *qh, const unsigned char *qs, const int8_t *xq,
                         const float *xs, const int32_t *xsum, int s0) {
    float d = gguf_f16(w), dmin = gguf_f16(w + 2), sum = 0.0f;
    for (int g = 0; g < 8; g++) {
        const int b = 8 * s0 + g;
        int sc, m;
        gguf_scale_min_k4(w + 4, g, &sc, &m);
        int8_t q[QK];
        for (int l = 0; l < QK; l++)
            q[l] = (int8_t)(((qs[32 * (g / 2) + l] >> (4 * (g % 2))) & 0x0f) | (qh ? ((qh[l] >> g) & 1) << 4 : 0));
        int32_t s = gguf_idot16(q, xq + QK * b) + gguf_idot16(q + 16, xq + QK * b + 16);
        sum += xs[b] * (d * (float)(sc * s) - dmin * (float)(m * xsum[b]));
    }
    return sum;
}

static float gguf_dot_q4_k(const unsigned char *w, const int8_t *xq, const float *xs, const int32_t *xsum, int n) {
    float sum = 0.0f;
    for (int s0 = 0; s0 < n / QK_K; s0++, w += 144) sum += gguf_dot_k4(w, NULL, w + 16, xq, xs, xsum, s0);
    return sum;
}

static float gguf_dot_q5_k(const unsigned char *w, const int8_t *xq, const float *xs, const int32_t *xsum, int n) {
    float sum = 0.0f;
    for (int s0 = 0; s0 < n / QK_K; s0++, w += 176) sum += gguf_dot_k4(w, w + 16, w + 48, xq, xs, xsum, s0);
    return sum;
}

/* Q6_K: per 16 values a signed 8-bit scale; codes q - 32 in -32..31.
 * (d xs) * (sc0 sum (q - 32) x + sc1 ...). */
static float gguf_dot_q6_k(const unsigned char *w, const int8_t *xq, const float *xs, const int32_t *xsum, int n) {
    float sum = 0.0f;
    (void)xsum;
    for (int s0 = 0; s0 < n / QK_K; s0++, w += 210) {
        const unsigned char *ql = w, *qh = w + 128;
        const signed char *sc = (const signed char *)(w + 192);
        float d = gguf_f16(w + 208);
        for (int g = 0; g < 8; g++) { /* values 32g + l: r = 32(g % 4) + l of half h = g / 4 */
            const int b = 8 * s0 + g, h = g / 4;
            int8_t q[QK];
            for (int l = 0; l < QK; l++) {
                int r = 32 * (g % 4) + l;
                int lo = (ql[64 * h + r % 64] >> (4 * (r / 64))) & 0x0f, hi = (qh[32 * h + r % 32] >> (2 * (r / 32))) & 0x03;
                q[l] = (int8_t)((lo | hi << 4) - 32);
            }
            int32_t acc = sc[2 * g] * gguf_idot16(q, xq + QK * b) + sc[2 * g + 1] * gguf_idot16(q + 16, xq + QK * b + 16);
            sum += d * xs[b] * (float)acc;
        }
    }
    return sum;
}

/* IQ4_NL: (d xs) * sum kvalues[nibble] x */
static float gguf_dot_iq4_nl(const unsigned char *w, const int8_t *xq, const float *xs, const int32_t *xsum, int n) {
    float sum = 0.0f;
    (void)xsum;
    for (int b = 0; b < n / QK; b++, w += 18) {
        const int8_t *x = xq + QK * b;
        int32_t s = 0;
        for (int j = 0; j < QK / 2; j++)
            s += gguf_kvalues_iq4nl[w[2 + j] & 0x0f] * x[j] + gguf_kvalues_iq4nl[w[2 + j] >> 4] * x[j + 16];
        sum += gguf_f16(w) * xs[b] * (float)s;
    }
    return sum;
}

/* IQ4_XS: per 32 values a 6-bit scale - 32: xs d (scale sum kvalues[nibble] x) */
static float gguf_dot_iq4_xs(const unsigned char *w, const int8_t *xq, const float *xs, const int32_t *xsum, int n) {
    float sum = 0.0f;
    (void)xsum;
    for (int s0 = 0; s0 < n / QK_K; s0++, w += 136) {
        float d = gguf_f16(w);
        unsigned scales_h = gguf_rd16(w + 2);
        for (int g = 0; g < 8; g++) {
            const int b = 8 * s0 + g;
            const int8_t *x = xq + QK * b;
            int ls = (((w[4 + g / 2] >> (4 * (g % 2))) & 0x0f) | (int)((scales_h >> (2 * g)) & 0x03) << 4) - 32;
            int32_t s = 0;
            for (int l = 0; l < 16; l++)
                s += gguf_kvalues_iq4nl[w[8 + 16 * g + l] & 0x0f] * x[l] + gguf_kvalues_iq4nl[w[8 + 16 * g + l] >> 4] * x[l + 16];
            sum += d * xs[b] * (float)(ls * s);
        }
    }
    return sum;
}

/* The integer dot of ggml type `type`, or NULL where there is none (decode in float). */
typedef float (*GGMLDot)(const unsigned char *, const int8_t *, const float *, const int32_t *, int);
static GGMLDot ggml_dot(int type) {
    static const struct { int type; GGMLDot dot; } dots[] = {
        {2, gguf_dot_q4_0},   {3, gguf_dot_q4_1},   {6, gguf_dot_q5_0},   {7, gguf_dot_q5_1},
        {8, gguf_dot_q8_0},   {10, gguf_dot_q2_k},  {11, gguf_dot_q3_k},  {12, gguf_dot_q4_k},
        {13, gguf_dot_q5_k},  {14, gguf_dot_q6_k},  {20, gguf_dot_iq4_nl}, {23, gguf_dot_iq4_xs},
    };
    for (size_t i = 0; i < sizeof dots / sizeof dots[0]; i++)
        if (dots[i].type == type) return dots[i].dot;
    return NULL;
}
#endif /* GGUF_BLOCKS_DOTS */
