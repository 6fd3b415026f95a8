/* mlx_dequant.c - dequantize the packed matrices of an MLX checkpoint to float32 (or bf16).
 *
 *   mlx_dequant FILE0.safetensors [FILE1 ...] < jobs > values
 *
 * Each line of stdin is one matrix:
 *
 *   MODE ROWS COLS BITS GROUP OUT W_FILE W_OFF S_FILE S_OFF S_TYPE B_FILE B_OFF B_TYPE
 *
 * MODE is mlx's quantization mode (affine, mxfp4, nvfp4, mxfp8), ROWS x COLS the matrix's
 * logical shape, BITS the bits per value, GROUP the values per scale, OUT f32 or bf16.
 * W_*: the packed weight (uint32 words), S_*: the scales, B_*: the biases (affine only;
 * "-1 0 -" for the other modes); *_FILE is the index of a file among the arguments,
 * *_OFF the absolute byte offset of the tensor's data in it, *_TYPE its element type:
 * bf16, f16 or f32 (affine), e8m0 (mxfp4, mxfp8), e4m3 (nvfp4). The values of each job go
 * to stdout row by row, little-endian, nothing between jobs. Errors: one line on stderr,
 * exit status 1. export.py checks every shape first and drives this.
 *
 * The layout is what mlx.core.quantize writes (mlx 0.32): a row of COLS values is one
 * little-endian bit stream, value j in bits j*BITS .. j*BITS + BITS - 1 of the row's bytes
 * (so 3-, 5- and 6-bit values straddle the 32-bit words); group g of the row is values
 * g*GROUP .. g*GROUP + GROUP - 1 and shares scale s (and, affine, bias b):
 *
 *   affine  value = s * q + b, in float32, s and b widened from their stored type first
 *   mxfp4   value = fp4(q) * 2^(s - 127)     (fp4: E2M1, 4 bits; groups of 32)
 *   nvfp4   value = fp4(q) * fp8(s)          (fp8: E4M3, 8 bits; groups of 16)
 *   mxfp8   value = fp8(q) * 2^(s - 127)     (groups of 32)
 *
 * That is what MLX's quantized matmul computes with, and bit for bit what mx.dequantize
 * returns in float32 (given float32 scales and biases in mode affine: on bf16 ones it rounds
 * the result to bf16). The build turns off multiply-add contraction (-ffp-contract=off in
 * the Makefile): a fused s * q + b rounds once where mlx rounds twice. (For the same reason a
 * 32-bit x86 build needs SSE arithmetic, -msse2 -mfpmath=sse: x87 keeps s * q in an 80-bit
 * register instead of rounding it to float32 before the addition.) The other modes'
 * products are exact in float32 (at most 6 significant bits, none below 2^-136) unless they
 * overflow to inf, as mlx's do; an E8M0 scale of 255 is inf (mlx's reading; the OCP format
 * calls it NaN).
 *
 * C99, standard library only; every multi-byte field is read byte by byte as
 * little-endian, so the tool works on big-endian hosts too. */
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_FILES 4096

static const char *progname = "mlx_dequant";

static void die(const char *fmt, const char *arg) {
    fprintf(stderr, "%s: ", progname);
    fprintf(stderr, fmt, arg);
    fputc('\n', stderr);
    exit(1);
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

/* IEEE half -> float, exact (subnormal halves become normal floats, inf and NaN kept). */
static float f16_to_f32(uint32_t h) {
    uint32_t sign = (h & 0x8000u) << 16, exp = h & 0x7c00u, man = h & 0x03ffu;
    if (exp == 0x7c00u) return bits_to_f32(sign | 0x7f800000u | man << 13); /* inf, NaN */
    if (exp != 0) return bits_to_f32(sign | ((exp >> 10) + 112) << 23 | man << 13);
    if (man == 0) return bits_to_f32(sign); /* +-0 */
    int e = 113; /* subnormal: shift the mantissa up until its leading 1 is the implicit bit */
    while (!(man & 0x0400u)) {
        man <<= 1;
        e--;
    }
    return bits_to_f32(sign | (uint32_t)e << 23 | (man & 0x03ffu) << 13);
}

/* float32 -> bf16 rounded to nearest even, NaN kept a (quiet) NaN: what export.py does. */
static uint16_t f32_to_bf16(float f) {
    uint32_t u = f32_to_bits(f);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu)) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

/* FP8 E4M3 (OCP; nvfp4's scales, mxfp8's values): sign, 4 exponent bits (bias 7), 3
 * mantissa bits; no infinities, S.1111.111 is NaN; exponent 0 is subnormal, m * 2^-9. */
static float e4m3(unsigned c) {
    unsigned e = (c >> 3) & 15, m = c & 7;
    float mag;
    if (e == 15 && m == 7) return bits_to_f32(0x7fc00000u | (uint32_t)(c & 0x80) << 24);
    if (e == 0) mag = (float)m / 512.0f;
    else mag = bits_to_f32((e + 120u) << 23 | m << 20); /* (1 + m/8) * 2^(e - 7) */
    return c & 0x80 ? -mag : mag;
}

/* FP4 E2M1 (mxfp4's and nvfp4's values): sign, then 0, 0.5, 1, 1.5, 2, 3, 4, 6. */
static float e2m1(unsigned c) {
    static const float mag[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
    return c & 8 ? -mag[c & 7] : mag[c & 7];
}

/* E8M0 (the mx modes' scales): 2^(s - 127), exactly; 0 gives 2^-127 (a subnormal float),
 * 255 inf, as mlx reads them. */
static float e8m0(unsigned s) {
    if (s == 0) return bits_to_f32(0x00400000u);
    return bits_to_f32((uint32_t)s << 23); /* 255: 0x7f800000, inf */
}

/* The scales' and biases' stored types. */
typedef enum { T_BF16, T_F16, T_F32, T_E8M0, T_E4M3 } ScaleType;

static int type_size(ScaleType t) { return t == T_F32 ? 4 : t == T_BF16 || t == T_F16 ? 2 : 1; }

/* One stored scale or bias of type t at p, as float32 (exactly). */
static float load_scale(const unsigned char *p, ScaleType t) {
    switch (t) {
    case T_BF16: return bits_to_f32((uint32_t)(p[0] | p[1] << 8) << 16);
    case T_F16: return f16_to_f32((uint32_t)(p[0] | p[1] << 8));
    case T_E8M0: return e8m0(p[0]);
    case T_E4M3: return e4m3(p[0]);
    default: return bits_to_f32((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24);
    }
}

static int parse_type(const char *s, ScaleType *t) {
    static const char *const names[] = {"bf16", "f16", "f32", "e8m0", "e4m3"};
    for (int i = 0; i < 5; i++)
        if (!strcmp(s, names[i])) {
            *t = (ScaleType)i;
            return 0;
        }
    return -1;
}

/* The modes, with the bits, group size and scale type mlx allows each (0: any). */
typedef enum { AFFINE, MXFP4, NVFP4, MXFP8 } Mode;
static const struct {
    const char *name;
    int bits, group;
    ScaleType scale;
} modes[] = {{"affine", 0, 0, T_F32}, {"mxfp4", 4, 32, T_E8M0}, {"nvfp4", 4, 16, T_E4M3}, {"mxfp8", 8, 32, T_E8M0}};

/* The files named on the command line, opened once, with their sizes. */
typedef struct {
    FILE *f;
    long long size;
    const char *path;
} Input;

/* Read n bytes at offset of in into buf, checking they lie inside the file. */
static void read_at(const Input *in, long long offset, unsigned char *buf, size_t n) {
    if (offset < 0 || offset > in->size || (long long)n > in->size - offset)
        die("tensor data lies past the end of %s (truncated file?)", in->path);
    if (offset > LONG_MAX || fseek(in->f, (long)offset, SEEK_SET) != 0) die("cannot seek in %s", in->path);
    if (fread(buf, 1, n, in->f) != n) die("short read from %s (truncated file?)", in->path);
}

/* Value j of a row packed as a little-endian bit stream of `bits`-bit values. The row
 * buffer has one spare zero byte, so a value in the last byte may read one past it. */
static unsigned unpack(const unsigned char *row, long long j, int bits) {
    long long p = j * bits;
    unsigned two = (unsigned)row[p >> 3] | (unsigned)row[(p >> 3) + 1] << 8;
    return (two >> (p & 7)) & ((1u << bits) - 1u);
}

/* A job's fields, as read from its line. */
typedef struct {
    Mode mode;
    int wfile, sfile, bfile; /* bfile -1: no biases */
    long long woff, soff, boff;
    ScaleType stype, btype;
    long long rows, cols;
    int bits, group, out_bf16;
} Job;

/* Value k of a row: its packed bits q, with its group's scale (and bias), per the mode. */
static float value(const Job *j, unsigned q, float scale, float bias) {
    switch (j->mode) {
    case AFFINE: {
        float prod = scale * (float)q; /* rounded to float32 before the addition, as mlx does */
        return prod + bias;
    }
    case MXFP4:
    case NVFP4: return e2m1(q) * scale;
    default: return e4m3(q) * scale;
    }
}

/* Dequantize one matrix, row after row, to stdout. */
static void run_job(const Input *inputs, const Job *j) {
    long long n_groups = j->cols / j->group;
    size_t wbytes = (size_t)(j->cols * j->bits / 8), sbytes = (size_t)n_groups * (size_t)type_size(j->stype),
           bbytes = j->bfile >= 0 ? (size_t)n_groups * (size_t)type_size(j->btype) : 1;
    size_t obytes = (size_t)j->cols * (j->out_bf16 ? 2 : 4);
    unsigned char *w = calloc(wbytes + 1, 1), *s = malloc(sbytes), *b = calloc(bbytes, 1), *out = malloc(obytes);
    if (!w || !s || !b || !out) die("out of memory for a row of %s", "the matrix");
    for (long long r = 0; r < j->rows; r++) {
        read_at(&inputs[j->wfile], j->woff + r * (long long)wbytes, w, wbytes);
        read_at(&inputs[j->sfile], j->soff + r * (long long)sbytes, s, sbytes);
        if (j->bfile >= 0) read_at(&inputs[j->bfile], j->boff + r * (long long)bbytes, b, bbytes);
        for (long long g = 0; g < n_groups; g++) {
            float scale = load_scale(s + g * type_size(j->stype), j->stype);
            float bias = j->bfile >= 0 ? load_scale(b + g * type_size(j->btype), j->btype) : 0.0f;
            for (long long k = g * j->group; k < (g + 1) * j->group; k++) {
                float y = value(j, unpack(w, k, j->bits), scale, bias);
                if (j->out_bf16) {
                    uint16_t h = f32_to_bf16(y);
                    out[2 * k] = (unsigned char)(h & 0xff);
                    out[2 * k + 1] = (unsigned char)(h >> 8);
                } else {
                    uint32_t u = f32_to_bits(y);
                    out[4 * k] = (unsigned char)(u & 0xff);
                    out[4 * k + 1] = (unsigned char)(u >> 8 & 0xff);
                    out[4 * k + 2] = (unsigned char)(u >> 16 & 0xff);
                    out[4 * k + 3] = (unsigned char)(u >> 24);
                }
            }
        }
        if (fwrite(out, 1, obytes, stdout) != obytes) die("cannot write to stdout (%s)", strerror(errno));
    }
    free(w);
    free(s);
    free(b);
    free(out);
}

/* Parse and check one job line against the files it names. */
static Job parse_job(const char *line, int n_inputs) {
    Job j;
    char mode[8], out[8], st[8], bt[8];
    if (sscanf(line, "%7s %lld %lld %d %d %7s %d %lld %d %lld %7s %d %lld %7s", mode, &j.rows, &j.cols, &j.bits,
               &j.group, out, &j.wfile, &j.woff, &j.sfile, &j.soff, st, &j.bfile, &j.boff, bt) != 14 ||
        parse_type(st, &j.stype) || (strcmp(out, "f32") && strcmp(out, "bf16")))
        die("bad job line: %s", line);
    int m = 0;
    while (m < 4 && strcmp(mode, modes[m].name)) m++;
    if (m == 4) die("bad job line (unknown mode): %s", line);
    j.mode = (Mode)m;
    j.out_bf16 = out[0] == 'b';
    if (j.mode == AFFINE ? (j.bits < 1 || j.bits > 8 || j.bits == 7 || j.stype > T_F32 || j.bfile < 0 ||
                            parse_type(bt, &j.btype) || j.btype > T_F32)
                         : (j.bits != modes[m].bits || j.group != modes[m].group || j.stype != modes[m].scale ||
                            j.bfile != -1))
        die("bad job line (bits, group size or types that the mode does not have): %s", line);
    if (j.wfile < 0 || j.wfile >= n_inputs || j.sfile < 0 || j.sfile >= n_inputs || j.bfile >= n_inputs)
        die("job names a file that is not an argument: %s", line);
    if (j.group < 1 || j.rows < 1 || j.cols < 1 || j.cols > (1 << 24) || j.cols % j.group || j.cols * j.bits % 32)
        die("bad job line (the groups or the 32-bit words do not divide the row): %s", line);
    return j;
}

int main(int argc, char **argv) {
    if (argc < 2 || argc - 1 > MAX_FILES) {
        fprintf(stderr, "usage: %s FILE.safetensors... < jobs   (one job a line: MODE ROWS COLS BITS GROUP "
                        "f32|bf16 W_FILE W_OFF S_FILE S_OFF S_TYPE B_FILE B_OFF B_TYPE)\n", progname);
        return 2;
    }
    int n_inputs = argc - 1;
    Input *inputs = calloc((size_t)n_inputs, sizeof *inputs);
    if (!inputs) die("out of memory for %s", "the file list");
    for (int i = 0; i < n_inputs; i++) {
        inputs[i].path = argv[i + 1];
        inputs[i].f = fopen(argv[i + 1], "rb");
        if (!inputs[i].f) die("cannot open %s", argv[i + 1]);
        if (fseek(inputs[i].f, 0, SEEK_END) != 0) die("cannot seek in %s", argv[i + 1]);
        inputs[i].size = ftell(inputs[i].f);
        if (inputs[i].size < 0) die("cannot tell the size of %s", argv[i + 1]);
    }
    char line[512];
    while (fgets(line, sizeof line, stdin)) {
        Job j = parse_job(line, n_inputs);
        run_job(inputs, &j);
    }
    if (fflush(stdout) != 0) die("cannot write to stdout (%s)", strerror(errno));
    for (int i = 0; i < n_inputs; i++) fclose(inputs[i].f);
    free(inputs);
    return 0;
}
