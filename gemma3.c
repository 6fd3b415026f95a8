/*
 * gemma3.c — Gemma 3 text model inference in one file of plain C.
 *
 * Reads a model file written by export.py (format: FORMAT.md), runs the Gemma 3
 * transformer exactly as Google's reference implementation (gemma_pytorch, float32)
 * does, and samples text. Sections, top to bottom:
 *
 *   1. model file: Config, Weights, loading and validation
 *   2. neural-net blocks: rmsnorm, matmul, rope, attention, gelu, forward
 *   3. sampler
 *   4. generation and chat
 *   5. the library: the functions of gemma3.h (and reading model files)
 *   6. the command line, on the library (not built with -DGEMMA3_NO_MAIN or -DTESTING)
 *
 * Policy: this file is the reference. It is plain portable C99 with no intrinsics and no
 * processor-specific code, so that it reads top to bottom and runs anywhere. The only
 * speed-ups in it are ones any compiler gives to plain loops (independent partial sums
 * that vectorise) and OpenMP threads over the rows of each matmul. Fast kernels for x86
 * (AVX2, AVX-512) live in kernels_x86.c, included at the very end where the compiler
 * targets them; the model code calls them through kernels_matmul and kernels_attention,
 * which say whether they did the work, and the plain loops here run otherwise. The tests
 * hold every kernel to these loops.
 *
 * Dependencies: libc, libm, optionally OpenMP. Build: make (the program), make lib (the
 * library: libgemma3.a, libgemma3.so; API in gemma3.h). Usage: ./gemma3 --help.
 */
#if !defined(_WIN32) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L
#define _DEFAULT_SOURCE /* glibc: also declare MADV_HUGEPAGE (used where it exists) */
#endif
#define _FILE_OFFSET_BITS 64 /* 32-bit hosts: stat and map files over 2 GiB */
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifndef GEMMA3_NO_MMAP
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#endif
/* OpenMP is optional: without it the pragma vanishes and loops run on one thread. */
#ifdef _OPENMP
#include <omp.h>
/* forward_batch starts the threads once a pass (PARALLEL_TEAM: at most nt of them; so does
 * argmax_parallel), and all of them run every step of the model. A step splits its loop
 * between them with FOR, which ends when all are done with it (BARRIER: a wait for all,
 * alone); ONE_THREAD runs a statement on one of them, the others waiting at its end.
 * Called outside such a team, as the tests do, the steps run whole on the calling thread. */
#define PRAGMA_(...) _Pragma(#__VA_ARGS__)
#define PARALLEL_TEAM(nt) PRAGMA_(omp parallel num_threads(nt))
#define FOR _Pragma("omp for schedule(static)")
#define BARRIER _Pragma("omp barrier")
#define ONE_THREAD _Pragma("omp single")
/* The most threads a team gets; inside one, how many it has and which is this */
static int max_threads(void) { return omp_get_max_threads(); }
#define THREAD_NUM() omp_get_thread_num()
#define TEAM_SIZE() omp_get_num_threads()
#else
#define PARALLEL_TEAM(nt)
#define FOR
#define BARRIER
#define ONE_THREAD
static int max_threads(void) { return 1; }
#define THREAD_NUM() 0
#define TEAM_SIZE() 1
#endif

#include "gemma3.h"
#include "tokenizer.c"
#define GGUF_BLOCKS_DOTS /* with the integer dot products of its blocks */
#include "gguf_blocks.c" /* GGUF's block formats (QK, QK_K, decoders, dots): FORMAT.md's dtypes >= 256 */

#define GEMMA3_FORMAT_VERSION 2 /* 2: q8_0/q4_0 rows keep their scales ahead of the quants */
#define GEMMA3_HEADER_SIZE 128
#define GEMMA3_DIR_ENTRY_SIZE 104
/* Prompt tokens per forward pass: each weight row is read from memory once per batch and
 * reused for all its tokens (larger batches gained nothing in `make bench`). */
#define PREFILL_BATCH 128

/* ------------------------------------------------------------------------- */
/* 1. model file                                                              */
/* ------------------------------------------------------------------------- */

/* Hyper-parameters, all read from the file header (HF config.json names). */
typedef struct {
    int vocab_size;        /* rows of the embedding table (262144 for 1B, 262208 for 4B+) */
    int dim;               /* hidden_size */
    int hidden_dim;        /* intermediate_size, the MLP width */
    int n_layers;          /* num_hidden_layers */
    int n_heads;           /* num_attention_heads (query heads) */
    int n_kv_heads;        /* num_key_value_heads (GQA: n_heads / n_kv_heads queries share one) */
    int head_dim;          /* head_dim; not always dim / n_heads */
    int window;            /* sliding_window: keys a local layer can see, itself included */
    int max_seq_len;       /* max_position_embeddings */
    int bos_id, eos_id, eot_id, sot_id; /* <bos>, <eos>, <end_of_turn>, <start_of_turn> */
    float query_pre_attn_scalar; /* attention scale is this^-0.5 (not head_dim^-0.5) */
    float norm_eps;        /* rms_norm_eps */
    float rope_theta;      /* RoPE base on global layers */
    float rope_local_theta;/* RoPE base on sliding-window layers (rope_local_base_freq) */
    float rope_factor;     /* linear RoPE scaling on global layers (1 = none, 8 for 4B+) */
    unsigned char *is_global; /* (n_layers) 1 = global attention, 0 = sliding window */
} Config;

enum { DT_F32 = 0, DT_BF16 = 1, DT_Q8_0 = 2, DT_Q4_0 = 3, DT_GGML = 256 };

/* Quantized weights: rows are cut into blocks of 32 weights, each with its own scale d
 * (an IEEE half, little-endian): q8_0 stores 32 int8 (w = d * q), q4_0 stores 16 bytes
 * of 4-bit values (byte j holds weight j in its low and weight j + 16 in its high
 * nibble; w = d * (nibble - 8)). A row keeps all its scales first, then all its quants:
 * the quants of neighbouring blocks are contiguous (one wide vector load covers several
 * blocks), and so are their scales (one instruction converts 8 or 16 of them).
 * (QK, 32, is gguf_blocks.c's.)
 *
 * dtype DT_GGML + t: rows of ggml type t's blocks exactly as a GGUF file holds them
 * (export.py --dtype gguf): gguf_blocks.c decodes them and multiplies them by int8
 * activations (two terms: quantize_residual); F16, which has no integer dot there, is
 * decoded and multiplied in float. */
static const GGMLType *ggml_of(int dtype) { return dtype >= DT_GGML ? ggml_type(dtype - DT_GGML) : NULL; }
#define Q8_0_BLOCK 34 /* bytes per block: scale + 32 quants */
#define Q4_0_BLOCK 18 /* bytes per block: scale + 16 bytes of nibbles */

static size_t row_bytes(int dtype, int cols) {
    switch (dtype) {
    case DT_F32: return (size_t)cols * 4;
    case DT_BF16: return (size_t)cols * 2;
    case DT_Q8_0: return (size_t)cols / QK * Q8_0_BLOCK;
    case DT_Q4_0: return (size_t)cols / QK * Q4_0_BLOCK;
    default: { const GGMLType *t = ggml_of(dtype); return (size_t)cols / t->block_values * t->block_bytes; }
    }
}

/* A weight matrix (out_features, in_features) in the file's dtype. */
typedef struct {
    const void *data;
    int dtype;
    int rows, cols;
} Matrix;

/* Per-layer weights; names follow HF's model.layers.N.* */
typedef struct {
    const float *input_norm;     /* input_layernorm.weight (dim) */
    Matrix wq;                   /* self_attn.q_proj (n_heads*head_dim, dim) */
    Matrix wk;                   /* self_attn.k_proj (n_kv_heads*head_dim, dim) */
    Matrix wv;                   /* self_attn.v_proj (n_kv_heads*head_dim, dim) */
    Matrix wo;                   /* self_attn.o_proj (dim, n_heads*head_dim) */
    const float *q_norm;         /* self_attn.q_norm.weight (head_dim) */
    const float *k_norm;         /* self_attn.k_norm.weight (head_dim) */
    const float *post_attn_norm; /* post_attention_layernorm.weight (dim) */
    const float *pre_ffn_norm;   /* pre_feedforward_layernorm.weight (dim) */
    const float *post_ffn_norm;  /* post_feedforward_layernorm.weight (dim) */
    Matrix w_gate;               /* mlp.gate_proj (hidden_dim, dim) */
    Matrix w_up;                 /* mlp.up_proj (hidden_dim, dim) */
    Matrix w_down;               /* mlp.down_proj (dim, hidden_dim) */
} LayerWeights;

typedef struct {
    Matrix embed;          /* embed_tokens (vocab_size, dim) */
    Matrix classifier;     /* lm_head (vocab_size, dim): the embedding table itself (tied), unless
                              the file has its own lm_head.weight (from a GGUF's output.weight) */
    LayerWeights *layers;  /* (n_layers) */
    const float *final_norm; /* norm.weight (dim) */
} Weights;

/* The loaded file: the bytes, and what we built from them. */
typedef struct {
    Config config;
    Weights weights;
    Tokenizer tokenizer;
    int has_tokenizer;
    unsigned char *data;   /* the whole file (mmap'd, read into memory, or the caller's bytes) */
    size_t size;
    int mapped;            /* 1 if data came from mmap */
    int owns_data;         /* 1 if data was allocated here (free it); 0 for the caller's bytes */
} Model;

/* Little-endian readers: the file is little-endian on every host. */
static uint32_t rd_u32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t rd_u64(const unsigned char *p) { return (uint64_t)rd_u32(p) | (uint64_t)rd_u32(p + 4) << 32; }
static float rd_f32(const unsigned char *p) {
    uint32_t u = rd_u32(p);
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static int host_is_big_endian(void) {
    const uint16_t one = 1;
    return *(const unsigned char *)&one == 0;
}

static void set_err(char *err, size_t errsize, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errsize, fmt, ap);
    va_end(ap);
}

/* s[0..n) (up to a NUL) for a one-line message: printable ASCII as is, any other byte as
 * \xNN, so a file's bytes cannot put a newline or a terminal escape in a message. out must
 * hold 4 * n + 1 bytes. */
static const char *printable(const unsigned char *s, size_t n, char *out) {
    char *o = out;
    for (size_t i = 0; i < n && s[i]; i++)
        if (s[i] >= 0x20 && s[i] < 0x7F) *o++ = (char)s[i];
        else o += sprintf(o, "\\x%02X", s[i]);
    *o = 0;
    return out;
}

/* The file's bytes into m->data and m->size, and back (mmap where there is one: section 5). */
static int read_file_bytes(Model *m, const char *path, char *err, size_t errsize);
static void release_file_bytes(Model *m);

/* Find tensor `name` in the directory, check its dtype/shape/bounds, return its data. */
static const void *find_tensor(Model *m, const char *name, int rows, int cols, int *dtype_out,
                               char *err, size_t errsize) {
    const unsigned char *h = m->data;
    uint32_t n = rd_u32(h + 88);
    const unsigned char *dir = m->data + rd_u64(h + 112);
    for (uint32_t i = 0; i < n; i++) {
        const unsigned char *e = dir + (size_t)i * GEMMA3_DIR_ENTRY_SIZE;
        if (strncmp((const char *)e, name, 64) != 0) continue;
        uint32_t dtype = rd_u32(e + 64), ndim = rd_u32(e + 68);
        uint32_t d0 = rd_u32(e + 72), d1 = rd_u32(e + 76);
        uint64_t off = rd_u64(e + 88), nbytes = rd_u64(e + 96);
        int want_ndim = cols > 0 ? 2 : 1;
        if ((int)ndim != want_ndim || d0 != (uint32_t)rows || (want_ndim == 2 && d1 != (uint32_t)cols)) {
            set_err(err, errsize, "tensor %s has shape [%u, %u], expected [%d, %d]", name, d0, d1, rows, cols);
            return NULL;
        }
        const GGMLType *gt = dtype > (uint32_t)INT_MAX ? NULL : ggml_of((int)dtype);
        if (dtype > DT_Q4_0 && !gt) {
            set_err(err, errsize, "tensor %s has unknown dtype %u", name, dtype);
            return NULL;
        }
        if ((dtype == DT_Q8_0 || dtype == DT_Q4_0) && cols % QK != 0) {
            set_err(err, errsize, "tensor %s: quantized rows must be a multiple of %d wide", name, QK);
            return NULL;
        }
        if (gt && want_ndim == 2 && cols % gt->block_values != 0) {
            set_err(err, errsize, "tensor %s: %s rows must be whole blocks of %d values", name, gt->name, gt->block_values);
            return NULL;
        }
        if (want_ndim == 1 && dtype != DT_F32) {
            set_err(err, errsize, "norm tensor %s must be f32", name);
            return NULL;
        }
        uint64_t need = (uint64_t)rows * row_bytes((int)dtype, cols > 0 ? cols : 1);
        uint64_t data_start = rd_u64(h + 112) + (uint64_t)n * GEMMA3_DIR_ENTRY_SIZE; /* tensors follow the directory */
        if (nbytes != need || off % 64 != 0 || off < data_start || off > m->size || nbytes > m->size - off) {
            set_err(err, errsize, "tensor %s: bad offset/size (%llu + %llu in a %zu-byte file whose tensors start at %llu)",
                    name, (unsigned long long)off, (unsigned long long)nbytes, m->size, (unsigned long long)data_start);
            return NULL;
        }
        if (dtype_out) *dtype_out = (int)dtype;
        return m->data + off;
    }
    set_err(err, errsize, "tensor %s is missing from the model file", name);
    return NULL;
}

static int load_matrix(Model *m, Matrix *out, const char *name, int rows, int cols, char *err, size_t errsize) {
    out->data = find_tensor(m, name, rows, cols, &out->dtype, err, errsize);
    out->rows = rows;
    out->cols = cols;
    return out->data ? 0 : -1;
}

static int load_norm(Model *m, const float **out, const char *name, int n, char *err, size_t errsize) {
    *out = find_tensor(m, name, n, 0, NULL, err, errsize);
    return *out ? 0 : -1;
}

/* On big-endian hosts, turn every tensor's elements into native byte order. */
static void swap_tensors_to_native(Model *m) {
    uint32_t n = rd_u32(m->data + 88);
    unsigned char *dir = m->data + rd_u64(m->data + 112);
    for (uint32_t i = 0; i < n; i++) {
        unsigned char *e = dir + (size_t)i * GEMMA3_DIR_ENTRY_SIZE;
        uint32_t dtype = rd_u32(e + 64);
        if (dtype == DT_Q8_0 || dtype == DT_Q4_0 || dtype >= DT_GGML) continue; /* read byte by byte: nothing to swap */
        size_t width = dtype == DT_F32 ? 4 : 2;
        unsigned char *p = m->data + rd_u64(e + 88), *end = p + rd_u64(e + 96);
        for (; p + width <= end; p += width)
            for (size_t a = 0, b = width - 1; a < b; a++, b--) {
                unsigned char t = p[a];
                p[a] = p[b];
                p[b] = t;
            }
    }
}

static void free_model(Model *m);

/* The names a Gemma 3 text model file may hold (NUL-padded to 64 bytes in the directory). */
static int known_tensor_name(const char *name, int n_layers) {
    static const char *const per_layer[] = {
        "input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
        "self_attn.v_proj.weight", "self_attn.o_proj.weight", "self_attn.q_norm.weight",
        "self_attn.k_norm.weight", "post_attention_layernorm.weight", "pre_feedforward_layernorm.weight",
        "post_feedforward_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
        "mlp.down_proj.weight", NULL};
    if (memchr(name, 0, 64) == NULL) return 0; /* not NUL-terminated */
    if (!strcmp(name, "embed_tokens.weight") || !strcmp(name, "norm.weight") || !strcmp(name, "lm_head.weight")) return 1;
    int layer, used = 0;
    if (sscanf(name, "layers.%d.%n", &layer, &used) != 1 || used == 0 || layer < 0 || layer >= n_layers) return 0;
    for (int i = 0; per_layer[i]; i++)
        if (!strcmp(name + used, per_layer[i])) return 1;
    return 0;
}

/* The header: magic, version, size, hyper-parameters (into m->config), section offsets and
 * the layer types. */
static int read_header(Model *m, const char *path, char *err, size_t errsize) {
    const unsigned char *h = m->data;
    Config *c = &m->config;
    if (memcmp(h, "GM3C", 4) != 0) {
        set_err(err, errsize, "%s is not a gemma3.c model file (bad magic; make one with export.py)", path);
        return GEMMA3_E_FORMAT;
    }
    if (rd_u32(h + 4) != GEMMA3_FORMAT_VERSION) {
        set_err(err, errsize, "%s has format version %u, this gemma3 reads version %d (re-export with export.py)",
                path, rd_u32(h + 4), GEMMA3_FORMAT_VERSION);
        return GEMMA3_E_FORMAT;
    }
    if (rd_u64(h + 8) != (uint64_t)m->size) {
        set_err(err, errsize, "%s is %zu bytes but its header says %llu (truncated or corrupt file)", path,
                m->size, (unsigned long long)rd_u64(h + 8));
        return GEMMA3_E_FORMAT;
    }
    uint32_t u[13];
    for (int i = 0; i < 13; i++) u[i] = rd_u32(h + 16 + 4 * i);
    for (int i = 0; i < 9; i++)
        if (u[i] == 0 || u[i] > (1u << 24)) {
            set_err(err, errsize, "%s: header field %d has implausible value %u", path, i, u[i]);
            return GEMMA3_E_FORMAT;
        }
    c->vocab_size = (int)u[0];
    c->dim = (int)u[1];
    c->hidden_dim = (int)u[2];
    c->n_layers = (int)u[3];
    c->n_heads = (int)u[4];
    c->n_kv_heads = (int)u[5];
    c->head_dim = (int)u[6];
    c->window = (int)u[7];
    c->max_seq_len = (int)u[8];
    c->bos_id = (int)u[9];
    c->eos_id = (int)u[10];
    c->eot_id = (int)u[11];
    c->sot_id = (int)u[12];
    c->query_pre_attn_scalar = rd_f32(h + 68);
    c->norm_eps = rd_f32(h + 72);
    c->rope_theta = rd_f32(h + 76);
    c->rope_local_theta = rd_f32(h + 80);
    c->rope_factor = rd_f32(h + 84);
    if (c->n_heads % c->n_kv_heads != 0 || c->head_dim % 2 != 0 || (uint64_t)u[4] * u[6] > (1u << 24) ||
        !(c->query_pre_attn_scalar > 0) ||
        !(c->norm_eps >= 0) || !(c->rope_theta > 0) || !(c->rope_local_theta > 0) || !(c->rope_factor > 0)) {
        set_err(err, errsize, "%s: inconsistent hyper-parameters in header", path);
        return GEMMA3_E_FORMAT;
    }
    uint64_t tok_off = rd_u64(h + 96), tok_size = rd_u64(h + 104), dir_off = rd_u64(h + 112);
    uint32_t n_tensors = rd_u32(h + 88);
    if (GEMMA3_HEADER_SIZE + (uint64_t)c->n_layers > m->size || dir_off > m->size ||
        (uint64_t)n_tensors * GEMMA3_DIR_ENTRY_SIZE > m->size - dir_off ||
        (tok_off && (tok_off > m->size || tok_size > m->size - tok_off))) {
        set_err(err, errsize, "%s: section offsets lie outside the file (corrupt header)", path);
        return GEMMA3_E_FORMAT;
    }
    c->is_global = malloc((size_t)c->n_layers);
    if (!c->is_global) { set_err(err, errsize, "out of memory"); return GEMMA3_E_NOMEM; }
    for (int l = 0; l < c->n_layers; l++) {
        unsigned char t = h[GEMMA3_HEADER_SIZE + l];
        if (t > 1) { set_err(err, errsize, "%s: layer %d has unknown attention type %u", path, l, t); return GEMMA3_E_FORMAT; }
        c->is_global[l] = t;
    }
    if (u[9] >= u[0] || u[10] >= u[0] || u[11] >= u[0] || u[12] >= u[0]) { /* unsigned: no top bit */
        set_err(err, errsize, "%s: special token ids out of range (<bos> %u, <eos> %u, <end_of_turn> %u, "
                "<start_of_turn> %u; the vocabulary has %u)", path, u[9], u[10], u[11], u[12], u[0]);
        return GEMMA3_E_FORMAT;
    }

    return 0;
}

/* The tensor directory: every entry must name a tensor of a Gemma 3 text model, and all of
 * them must be there. Sets *untied if the file has its own classifier (lm_head.weight). */
static int check_directory(const Model *m, const char *path, int *untied, char *err, size_t errsize) {
    const Config *c = &m->config;
    uint32_t n_tensors = rd_u32(m->data + 88);
    uint64_t dir_off = rd_u64(m->data + 112);
    /* Every tensor in the directory must be one we know: a stray name means a file
     * for some other model, and silently ignoring it would hide that. */
    const unsigned char *dir = m->data + dir_off;
    *untied = 0; /* lm_head.weight, the one optional tensor */
    for (uint32_t i = 0; i < n_tensors; i++) {
        const char *name = (const char *)dir + (size_t)i * GEMMA3_DIR_ENTRY_SIZE;
        if (!known_tensor_name(name, c->n_layers)) {
            char shown[4 * 64 + 1];
            set_err(err, errsize, "%s: unknown tensor '%s' in the model file", path,
                    printable((const unsigned char *)name, 64, shown));
            return GEMMA3_E_FORMAT;
        }
        *untied |= !strcmp(name, "lm_head.weight");
    }
    uint32_t expected = 2 + (uint32_t)*untied + 13u * (uint32_t)c->n_layers;
    if (n_tensors != expected) {
        set_err(err, errsize, "%s: %u tensors in the file, a %d-layer Gemma 3 has %u (unknown or missing tensors)",
                path, n_tensors, c->n_layers, expected);
        return GEMMA3_E_FORMAT;
    }
    return 0;
}

/* Point every Matrix and norm of m->weights at its tensor, checking shapes and bounds. */
static int load_weights(Model *m, int untied, char *err, size_t errsize) {
    const Config *c = &m->config;
    Weights *w = &m->weights;
    int D = c->dim, Q = c->n_heads * c->head_dim, KV = c->n_kv_heads * c->head_dim, F = c->hidden_dim;
    if (load_matrix(m, &w->embed, "embed_tokens.weight", c->vocab_size, D, err, errsize)) return GEMMA3_E_FORMAT;
    if (load_norm(m, &w->final_norm, "norm.weight", D, err, errsize)) return GEMMA3_E_FORMAT;
    w->classifier = w->embed;
    if (untied && load_matrix(m, &w->classifier, "lm_head.weight", c->vocab_size, D, err, errsize)) return GEMMA3_E_FORMAT;
    w->layers = calloc((size_t)c->n_layers, sizeof(LayerWeights));
    if (!w->layers) { set_err(err, errsize, "out of memory"); return GEMMA3_E_NOMEM; }
    for (int l = 0; l < c->n_layers; l++) {
        LayerWeights *L = &w->layers[l];
        char name[64];
#define NAME(s) (snprintf(name, sizeof name, "layers.%d.%s", l, s), name)
        if (load_norm(m, &L->input_norm, NAME("input_layernorm.weight"), D, err, errsize) ||
            load_matrix(m, &L->wq, NAME("self_attn.q_proj.weight"), Q, D, err, errsize) ||
            load_matrix(m, &L->wk, NAME("self_attn.k_proj.weight"), KV, D, err, errsize) ||
            load_matrix(m, &L->wv, NAME("self_attn.v_proj.weight"), KV, D, err, errsize) ||
            load_matrix(m, &L->wo, NAME("self_attn.o_proj.weight"), D, Q, err, errsize) ||
            load_norm(m, &L->q_norm, NAME("self_attn.q_norm.weight"), c->head_dim, err, errsize) ||
            load_norm(m, &L->k_norm, NAME("self_attn.k_norm.weight"), c->head_dim, err, errsize) ||
            load_norm(m, &L->post_attn_norm, NAME("post_attention_layernorm.weight"), D, err, errsize) ||
            load_norm(m, &L->pre_ffn_norm, NAME("pre_feedforward_layernorm.weight"), D, err, errsize) ||
            load_norm(m, &L->post_ffn_norm, NAME("post_feedforward_layernorm.weight"), D, err, errsize) ||
            load_matrix(m, &L->w_gate, NAME("mlp.gate_proj.weight"), F, D, err, errsize) ||
            load_matrix(m, &L->w_up, NAME("mlp.up_proj.weight"), F, D, err, errsize) ||
            load_matrix(m, &L->w_down, NAME("mlp.down_proj.weight"), D, F, err, errsize))
            return GEMMA3_E_FORMAT;
#undef NAME
    }

    return 0;
}

/* Validate the model in m->data[0..m->size) and build the model from it; `name` names it
 * in messages. On failure: GEMMA3_E_FORMAT or GEMMA3_E_NOMEM and a one-line message in err
 * (the caller frees m). */
static int open_model_bytes(Model *m, const char *name, char *err, size_t errsize) {
    int untied, rc;
    if (m->size < GEMMA3_HEADER_SIZE) {
        set_err(err, errsize, "%s: file too short (%zu bytes) to be a gemma3.c model", name, m->size);
        return GEMMA3_E_FORMAT;
    }
    if ((rc = read_header(m, name, err, errsize)) || (rc = check_directory(m, name, &untied, err, errsize))) return rc;
    if (host_is_big_endian()) swap_tensors_to_native(m); /* (m->data is writable there: ours) */
    if ((rc = load_weights(m, untied, err, errsize))) return rc;
    uint64_t tok_off = rd_u64(m->data + 96), tok_size = rd_u64(m->data + 104);
    if (tok_off) {
        char terr[200];
        if ((rc = tokenizer_init(&m->tokenizer, m->data + tok_off, (size_t)tok_size, terr, sizeof terr)) != 0) {
            if (rc == TOK_NOMEM) set_err(err, errsize, "out of memory for the tokenizer's tables");
            else set_err(err, errsize, "%s: bad tokenizer section: %s", name, terr);
            return rc == TOK_NOMEM ? GEMMA3_E_NOMEM : GEMMA3_E_FORMAT;
        }
        m->has_tokenizer = 1;
    }
    return 0;
}

/* Load and validate a model file. On failure: a one-line message in err, and
 * GEMMA3_E_IO (the file cannot be read), GEMMA3_E_FORMAT (not a valid model) or
 * GEMMA3_E_NOMEM. */
static int load_model(Model *m, const char *path, char *err, size_t errsize) {
    memset(m, 0, sizeof(*m));
    int rc = read_file_bytes(m, path, err, errsize);
    if (rc == 0) rc = open_model_bytes(m, path, err, errsize);
    if (rc) free_model(m);
    return rc;
}

static void free_model(Model *m) {
    if (m->has_tokenizer) tokenizer_free(&m->tokenizer);
    free(m->weights.layers);
    free(m->config.is_global);
    release_file_bytes(m);
    memset(m, 0, sizeof(*m));
}

/* ------------------------------------------------------------------------- */
/* 2. neural-net blocks                                                       */
/* ------------------------------------------------------------------------- */

/* Everything the forward pass needs, allocated once; nothing is allocated per token.
 * forward_batch() takes up to max_batch tokens at a time: a prompt is processed as a matrix,
 * so each weight row is read once per batch instead of once per token. */
typedef struct {
    int ctx;          /* context length the caches were sized for (-c) */
    int max_batch;    /* most tokens per forward_batch() call */
    int all_logits;   /* 1: logits of every token of a batch (for --logits); 0: the last only */
    float *x;         /* (max_batch, dim) the residual stream */
    float *xb;        /* (max_batch, dim) normed input of a sub-block */
    float *xb2;       /* (max_batch, dim) output of a sub-block */
    float *q;         /* (max_batch, n_heads * head_dim) */
    float *k, *v;     /* (max_batch, n_kv_heads * head_dim) keys and values of the batch */
    float *att_out;   /* (max_batch, n_heads * head_dim) attention output before o_proj */
    float *att;       /* (threads * n_heads, ctx) attention scores: each thread its own n_heads rows */
    float *hb, *hb2;  /* (max_batch, hidden_dim) MLP gate and up */
    float *logits;    /* (max_batch or 1, vocab_size) */
    int8_t *xq;       /* (max_batch, widest) a quantized matmul's x as int8 blocks of 32 */
    float *xq_scale;  /* (max_batch, widest / 32) their scales */
    int32_t *xq_sum;  /* (max_batch, widest / 32) their sums (q4_0's -8 offset) */
    int8_t *xr;       /* (max_batch, widest) GGUF block types: x - xq's values, as int8 blocks again */
    float *xr_scale;  /* (max_batch, widest / 32) their scales */
    int32_t *xr_sum;  /* (max_batch, widest / 32) their sums */
    int threads;      /* most threads a forward pass runs on (each has its own rows of att) */
    double team_secs[2]; /* a decode pass's time, smoothed: on all the threads, on one (pick_team) */
    int passes;       /* decode passes so far */
    int probed;       /* the pass that last tried one thread while all were best (0: none yet) */
    int crowded;      /* 1: in the last decode pass on all the threads, other programs had their cores */
    void *kernels;    /* the optional fast kernels' scratch (kernels_x86.c); NULL without them */
    float *rope_cos, *rope_sin; /* (2, max_batch, head_dim/2) local then global tables of the batch */
    float *inv_freq_local, *inv_freq_global; /* (head_dim/2) RoPE frequencies per layer type */
    float *hidden_dump; /* optional, (n_layers + 1, dim): the residual stream after the embedding
                           and after each layer of the last token, for --dump-hidden; NULL = off */
    /* KV cache, per layer. Global layers keep the whole context. Sliding layers keep a
     * ring of window + max_batch - 1 positions: a batch writes all its keys before its
     * queries read, and the extra max_batch - 1 slots keep every key that a query of the
     * batch still needs. Position p lives in slot p % cache_len[l]. */
    int *cache_len;       /* (n_layers) */
    float **key_cache;    /* (n_layers) -> (cache_len, n_kv_heads * head_dim) */
    float **value_cache;  /* (n_layers) -> (cache_len, n_kv_heads * head_dim) */
    void *arena;          /* the one allocation that holds all the buffers and caches above
                             (NULL: they are in a block the caller owns) */
} RunState;

/* The optional fast kernels (kernels_x86.c, included at the end of this file where the
 * compiler targets them). kernels_setup gives the bytes of scratch they need (0: there are
 * none) and lays it out at mem; the other two say whether they did the call (1), or left
 * it to the plain loops that follow here (0). */
static size_t kernels_setup(void *mem, const Config *c, int max_batch, int threads);
static int kernels_matmul(void *kernels, float *const out[], const Matrix *const W[], int count, const float *x, int n);
static int kernels_attention(void *kernels, float *out, float *att, size_t ctx, const float *q, const float *kc,
                             const float *vc, int KV, int s0, int span, int len, int hd, int nh, float scale);

/* Buffers cut one after another from a block (or, with base NULL, only their sizes added
 * up), each starting on a 64-byte boundary: the cache line, so that no vector load
 * straddles two lines. */
typedef struct {
    unsigned char *base;
    size_t used;
} Carve;

static void *carve(Carve *cv, size_t count, size_t size) {
    void *p = cv->base ? cv->base + cv->used : NULL;
    cv->used += (count * size + 63) / 64 * 64;
    return p;
}

/* Lay out the run state's buffers and caches in the block at base (64-byte aligned), or,
 * with base NULL, only add up their size: the bytes it returns. */
static size_t run_state_layout(RunState *s, const Config *c, int ctx, int max_batch, int all_logits, unsigned char *base) {
    memset(s, 0, sizeof(*s));
    if (max_batch > ctx) max_batch = ctx;
    s->ctx = ctx;
    s->max_batch = max_batch;
    s->threads = max_threads();
    s->all_logits = all_logits;
    size_t B = (size_t)max_batch, D = (size_t)c->dim, F = (size_t)c->hidden_dim, half = (size_t)c->head_dim / 2;
    size_t Q = (size_t)c->n_heads * c->head_dim, KV = (size_t)c->n_kv_heads * c->head_dim;
    size_t widest = F > Q ? F : Q;
    if (D > widest) widest = D;
    size_t kernel_bytes = kernels_setup(NULL, c, max_batch, s->threads);
    Carve cv = {base, 0};
    s->cache_len = carve(&cv, (size_t)c->n_layers, sizeof(int));
    s->key_cache = carve(&cv, (size_t)c->n_layers, sizeof(float *));
    s->value_cache = carve(&cv, (size_t)c->n_layers, sizeof(float *));
    s->x = carve(&cv, B * D, sizeof(float));
    s->xb = carve(&cv, B * D, sizeof(float));
    s->xb2 = carve(&cv, B * D, sizeof(float));
    s->q = carve(&cv, B * Q, sizeof(float));
    s->k = carve(&cv, B * KV, sizeof(float));
    s->v = carve(&cv, B * KV, sizeof(float));
    s->att_out = carve(&cv, B * Q, sizeof(float));
    s->att = carve(&cv, (size_t)s->threads * c->n_heads * (size_t)ctx, sizeof(float));
    s->hb = carve(&cv, B * F, sizeof(float));
    s->hb2 = carve(&cv, B * F, sizeof(float));
    s->logits = carve(&cv, (all_logits ? B : 1) * (size_t)c->vocab_size, sizeof(float));
    s->xq = carve(&cv, B * widest, 1);
    s->xq_scale = carve(&cv, B * (widest / 32 + 1), sizeof(float));
    s->xq_sum = carve(&cv, B * (widest / 32 + 1), sizeof(int32_t));
    s->xr = carve(&cv, B * widest, 1);
    s->xr_scale = carve(&cv, B * (widest / 32 + 1), sizeof(float));
    s->xr_sum = carve(&cv, B * (widest / 32 + 1), sizeof(int32_t));
    s->kernels = kernel_bytes ? carve(&cv, kernel_bytes, 1) : NULL;
    s->rope_cos = carve(&cv, 2 * B * half, sizeof(float));
    s->rope_sin = carve(&cv, 2 * B * half, sizeof(float));
    s->inv_freq_local = carve(&cv, half, sizeof(float));
    s->inv_freq_global = carve(&cv, half, sizeof(float));
    for (int l = 0; l < c->n_layers; l++) {
        /* sliding layers: a ring of window + max_batch - 1 positions (see RunState) */
        int ring = c->window + max_batch - 1, len = (!c->is_global[l] && ring < ctx) ? ring : ctx;
        float *kc = carve(&cv, (size_t)len * KV, sizeof(float)), *vc = carve(&cv, (size_t)len * KV, sizeof(float));
        if (base) s->cache_len[l] = len, s->key_cache[l] = kc, s->value_cache[l] = vc;
    }
    if (!base) return cv.used;
    if (s->kernels) kernels_setup(s->kernels, c, max_batch, s->threads);
    /* RoPE frequencies, computed once in float32 as the reference does:
     * inv_freq[i] = 1 / base^(2i / head_dim); linear scaling divides the global ones. */
    for (size_t i = 0; i < half; i++) {
        float e = (float)(2 * i) / (float)c->head_dim;
        s->inv_freq_local[i] = 1.0f / powf(c->rope_local_theta, e);
        s->inv_freq_global[i] = 1.0f / powf(c->rope_theta, e) / c->rope_factor;
    }
    return cv.used;
}

/* Bytes of memory a run state needs (build_run_state_in's block, 64-byte aligned). */
static size_t run_state_bytes(const Config *c, int ctx, int max_batch, int all_logits) {
    RunState sizing;
    return run_state_layout(&sizing, c, ctx, max_batch, all_logits, NULL);
}

/* A run state in the caller's block of run_state_bytes() bytes at mem (64-byte aligned). */
static void build_run_state_in(RunState *s, const Config *c, int ctx, int max_batch, int all_logits, void *mem) {
    memset(mem, 0, run_state_bytes(c, ctx, max_batch, all_logits));
    run_state_layout(s, c, ctx, max_batch, all_logits, mem);
}

/* Gemma's RMSNorm: x / sqrt(mean(x^2) + eps) * (1 + w). Checkpoints store w, not 1 + w. */
static void rmsnorm(float *out, const float *x, const float *w, int n, float eps) {
    /* sum of squares in double, as 16 partial sums (so it vectorises) added in a fixed order */
    double acc[16] = {0}, ss = 0.0;
    int i = 0;
    for (; i + 16 <= n; i += 16)
        for (int k = 0; k < 16; k++) acc[k] += (double)x[i + k] * x[i + k];
    for (; i < n; i++) ss += (double)x[i] * x[i];
    for (int k = 0; k < 8; k++) acc[k] += acc[k + 8];
    ss += ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    float scale = 1.0f / sqrtf((float)(ss / n) + eps);
    for (int i = 0; i < n; i++) out[i] = (x[i] * scale) * (1.0f + w[i]);
}

static float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16; /* bf16 is the high half of an f32 */
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* IEEE half -> float, for the block scales of q8_0 / q4_0 (portable: no _Float16). Moving
 * exponent and mantissa into place and multiplying by 2^112 re-biases the exponent
 * (15 -> 127) exactly, subnormals included, without a branch on the hot path. */
static float f16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)(h & 0x7fff) << 13;
    int special = (h & 0x7c00) == 0x7c00; /* inf / nan */
    float f;
    if (special) u |= 0x7f800000;
    memcpy(&f, &u, 4);
    if (!special) f *= 5.192296858534828e33f; /* 2^112 */
    return (h & 0x8000) ? -f : f;
}

static uint16_t rd_u16(const unsigned char *p) { return (uint16_t)(p[0] | p[1] << 8); }

/* Round to the nearest integer, ties to even (what lrintf does in the default rounding
 * mode), for |v| < 2^22: v + 1.5 * 2^23 is a float with no bits left for a fraction.
 * Plain adds, so the loop around it vectorises (an lrintf call per value did not). The
 * assignment rounds to float even where the FPU keeps more (C99 excess precision, x87). */
static inline float round_even(float v) {
    float t = v + 12582912.0f;
    return t - 12582912.0f;
}

/* Quantize activations x (n values, n % 32 == 0) to int8 blocks with a float scale, so the
 * quantized matmuls can multiply in integers: x ~ scale[b] * xq[32 b + i]. */
static void quantize_activations(int8_t *xq, float *scale, int32_t *sums, const float *x, int n) {
    for (int b = 0; b < n / QK; b++) {
        float amax = 0.0f;
        for (int i = 0; i < QK; i++) {
            float a = fabsf(x[b * QK + i]);
            amax = a > amax || a != a ? a : amax; /* a NaN stays: the block's scale is NaN */
        }
        float d = amax / 127.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
        scale[b] = d;
        int32_t sum = 0;
        for (int i = 0; i < QK; i++) {
            /* |x * inv| <= 127, except: NaN (NaN or inf in x), and +-inf where 1 / d overflows
             * (a block of subnormals): those must not reach the int8 conversion (undefined) */
            float q = round_even(x[b * QK + i] * inv);
            xq[b * QK + i] = (int8_t)(q >= -127.0f && q <= 127.0f ? q : q > 0.0f ? 127.0f : q < 0.0f ? -127.0f : 0.0f);
            sum += xq[b * QK + i];
        }
        sums[b] = sum;
    }
}

/* One row of W times x, per weight type. NACC independent partial sums let the compiler
 * vectorise without -ffast-math (several vector registers, so the adds do not wait on
 * each other), and keep the summation order the same on every machine and thread count. */
#define NACC 32

static float sum_partials(const float *a) { /* a fixed order: 32 -> 8 (vectorised) -> 1 */
    float t[8];
    for (int k = 0; k < 8; k++) t[k] = (a[k] + a[k + 8]) + (a[k + 16] + a[k + 24]);
    return ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
}

static float dot_f32(const float *w, const float *x, int n) {
    float acc[NACC] = {0};
    int j = 0;
    for (; j + NACC <= n; j += NACC)
        for (int k = 0; k < NACC; k++) acc[k] += w[j + k] * x[j + k];
    float tail = 0.0f;
    for (; j < n; j++) tail += w[j] * x[j];
    return sum_partials(acc) + tail;
}

static float dot_bf16(const uint16_t *w, const float *x, int n) {
    float acc[NACC] = {0};
    int j = 0;
    for (; j + NACC <= n; j += NACC)
        for (int k = 0; k < NACC; k++) acc[k] += bf16_to_f32(w[j + k]) * x[j + k];
    float tail = 0.0f;
    for (; j < n; j++) tail += bf16_to_f32(w[j]) * x[j];
    return sum_partials(acc) + tail;
}

/* Quantized rows times int8 activations: integer products within a block, then one
 * float multiply by the block's two scales (weight: a half; activation: a float).
 * A row holds its n/32 half scales first, then the quants of block 0, 1, ... (FORMAT.md). */
static float dot_q8_0(const unsigned char *w, const int8_t *xq, const float *xs, int n) {
    const int nb = n / QK;
    const int8_t *q = (const int8_t *)(w + 2 * nb);
    float sum = 0.0f;
    for (int b = 0; b < nb; b++) {
        int32_t isum = 0;
        for (int i = 0; i < QK; i++) isum += (int32_t)q[b * QK + i] * xq[b * QK + i];
        sum += f16_to_f32(rd_u16(w + 2 * b)) * xs[b] * (float)isum;
    }
    return sum;
}

static float dot_q4_0(const unsigned char *w, const int8_t *xq, const float *xs, const int32_t *xsum, int n) {
    const int nb = n / QK;
    const unsigned char *q = w + 2 * nb;
    float sum = 0.0f;
    for (int b = 0; b < nb; b++) {
        const unsigned char *qb = q + b * (QK / 2);
        const int8_t *x = xq + b * QK;
        /* sum (nibble - 8) * x = sum nibble * x - 8 * sum x; sum x comes with the activations */
        int32_t lo = 0, hi = 0;
        for (int i = 0; i < QK / 2; i++) lo += (int32_t)(qb[i] & 0x0f) * x[i];
        for (int i = 0; i < QK / 2; i++) hi += (int32_t)(qb[i] >> 4) * x[i + QK / 2];
        int32_t isum = lo + hi - 8 * xsum[b];
        sum += f16_to_f32(rd_u16(w + 2 * b)) * xs[b] * (float)isum;
    }
    return sum;
}

/* What quantize_activations left out, x - scale * xq, quantized the same way. The GGUF
 * block types multiply their weights by both: int8 activations alone moved the argmax of
 * the real 270M Q4_K_M's logits at 23 of 576 positions against its f32 export; with the
 * second term its activations carry about 15 bits, and only the weights' own rounding is
 * left. */
static void quantize_residual(int8_t *rq, float *rscale, int32_t *rsums, const float *x, const int8_t *xq,
                              const float *scale, int n) {
    for (int b = 0; b < n / QK; b++) {
        float r[QK];
        for (int i = 0; i < QK; i++) r[i] = x[b * QK + i] - scale[b] * (float)xq[b * QK + i];
        quantize_activations(rq + b * QK, rscale + b, rsums + b, r, QK);
    }
}

/* Token t of x (rows of cols floats) as int8 blocks, into row t of s->xq and its scales
 * (and, with residual, what they left out into row t of s->xr). */
static void quantize_token(RunState *s, const float *x, int t, int cols, int residual) {
    const size_t at = (size_t)t * cols, blocks = (size_t)t * (cols / QK);
    quantize_activations(s->xq + at, s->xq_scale + blocks, s->xq_sum + blocks, x + at, cols);
    if (residual)
        quantize_residual(s->xr + at, s->xr_scale + blocks, s->xr_sum + blocks, x + at, s->xq + at, s->xq_scale + blocks, cols);
}

/* The activations of a quantized matmul as int8 blocks, one row of blocks per token. */
static void quantize_batch(RunState *s, const float *x, int n, int cols, int residual) {
    FOR
    for (int t = 0; t < n; t++) quantize_token(s, x, t, cols, residual);
}

/* A row of ggml blocks that has no integer dot (F16): decoded QK_K values at a time and
 * multiplied in float. */
static float dot_decoded(const GGMLType *t, const unsigned char *w, const float *x, int n) {
    float buf[QK_K], sum = 0.0f;
    for (int j = 0; j < n; j += QK_K) {
        int len = n - j < QK_K ? n - j : QK_K; /* a multiple of the block's values */
        for (int k = 0; k < len; k += t->block_values, w += t->block_bytes) t->dequant(w, buf + k);
        sum += dot_f32(buf, x + j, len);
    }
    return sum;
}

/* out[t] = W x[t] for the n rows of x, with the plain loops: out (n, W.rows), x (n, W.cols).
 * Decode (n = 1) reads every weight byte once per token, so its speed is memory bandwidth;
 * prefill keeps a weight row in cache while it meets all n tokens of the batch. */
static void matmul_plain(float *out, const float *x, int n, const Matrix *W, RunState *s) {
    const int rows = W->rows, cols = W->cols, dtype = W->dtype;
    const size_t rb = row_bytes(dtype, cols);
    const unsigned char *base = W->data;
    const GGMLType *gt = ggml_of(dtype);
    const GGMLDot gdot = gt ? ggml_dot(gt->type) : NULL; /* a GGUF block type's integer dot */
    if (dtype == DT_Q8_0 || dtype == DT_Q4_0 || gdot) quantize_batch(s, x, n, cols, gdot != NULL);
    int i;
    FOR
    for (i = 0; i < rows; i++) {
        const unsigned char *w = base + (size_t)i * rb;
        for (int t = 0; t < n; t++) {
            const float *xt = x + (size_t)t * cols;
            const int8_t *xq = s->xq + (size_t)t * cols;
            const float *xs = s->xq_scale + (size_t)t * (cols / QK);
            const int32_t *xsum = s->xq_sum + (size_t)t * (cols / QK);
            const size_t at = (size_t)t * cols, blocks = (size_t)t * (cols / QK);
            float y;
            switch (dtype) {
            case DT_F32: y = dot_f32((const float *)w, xt, cols); break;
            case DT_BF16: y = dot_bf16((const uint16_t *)w, xt, cols); break;
            case DT_Q8_0: y = dot_q8_0(w, xq, xs, cols); break;
            case DT_Q4_0: y = dot_q4_0(w, xq, xs, xsum, cols); break;
            default: /* GGUF blocks: times x's two int8 terms, or decoded times x */
                y = gdot ? gdot(w, xq, xs, xsum, cols) + gdot(w, s->xr + at, s->xr_scale + blocks, s->xr_sum + blocks, cols)
                         : dot_decoded(gt, w, xt, cols);
                break;
            }
            out[(size_t)t * rows + i] = y;
        }
    }
}

/* out[i] = W[i] x for `count` matrices that read the same x (q/k/v; gate/up): the fast
 * kernels where the build has them and they take the shape, else the plain loops. All
 * threads of forward_batch's team call it, and it ends when all of them are done. */
static void matmul_many(int count, float *const out[], const Matrix *const W[], const float *x, int n, RunState *s) {
    if (kernels_matmul(s->kernels, out, W, count, x, n)) return;
    for (int i = 0; i < count; i++) matmul_plain(out[i], x, n, W[i], s);
}

static void matmul(float *out, const float *x, int n, const Matrix *W, RunState *s) {
    matmul_many(1, &out, &W, x, n, s);
}

/* Row `row` of a matrix as floats (the embedding lookup). */
static void matrix_row(float *out, const Matrix *W, int row) {
    const unsigned char *w = (const unsigned char *)W->data + (size_t)row * row_bytes(W->dtype, W->cols);
    int n = W->cols;
    if (W->dtype == DT_F32) {
        memcpy(out, w, (size_t)n * sizeof(float));
    } else if (W->dtype == DT_BF16) {
        for (int j = 0; j < n; j++) out[j] = bf16_to_f32(((const uint16_t *)w)[j]);
    } else if (W->dtype == DT_Q8_0) { /* n/32 half scales, then the int8 quants */
        const int8_t *q = (const int8_t *)(w + 2 * (n / QK));
        for (int j = 0; j < n; j++) out[j] = f16_to_f32(rd_u16(w + 2 * (j / QK))) * (float)q[j];
    } else if (W->dtype >= DT_GGML) { /* GGUF blocks, each decoded */
        const GGMLType *t = ggml_of(W->dtype);
        for (int j = 0; j < n; j += t->block_values, w += t->block_bytes) t->dequant(w, out + j);
    } else { /* q4_0: n/32 half scales, then 16 bytes of nibbles per block */
        const unsigned char *q = w + 2 * (n / QK);
        for (int b = 0; b < n / QK; b++, q += QK / 2) {
            float d = f16_to_f32(rd_u16(w + 2 * b));
            for (int i = 0; i < QK / 2; i++) {
                out[b * QK + i] = d * (float)((q[i] & 0x0f) - 8);
                out[b * QK + i + QK / 2] = d * (float)((q[i] >> 4) - 8);
            }
        }
    }
}

/* Rotate-half RoPE: element k pairs with k + head_dim/2 (not adjacent pairs). */
static void rope(float *vec, const float *cos_t, const float *sin_t, int head_dim) {
    int half = head_dim / 2;
    for (int i = 0; i < half; i++) {
        float a = vec[i], b = vec[i + half];
        vec[i] = a * cos_t[i] - b * sin_t[i];
        vec[i + half] = b * cos_t[i] + a * sin_t[i];
    }
}

/* cos/sin of pos * inv_freq for each position of the batch; float32 product as the reference. */
static void rope_angles(float *cos_out, float *sin_out, const float *inv_freq, int pos0, int n, int half) {
    for (int t = 0; t < n; t++)
        for (int i = 0; i < half; i++) {
            float angle = (float)(pos0 + t) * inv_freq[i];
            cos_out[t * half + i] = cosf(angle);
            sin_out[t * half + i] = sinf(angle);
        }
}

/* e^v in plain arithmetic that the compiler vectorises (a loop that calls libm's expf
 * makes one call per element, and GELU and softmax call it for every value).
 * v = n ln2 + r, with n an integer and |r| <= ln2/2; e^r from its Taylor series to r^7
 * (the rest is under 2^-27 of it); 2^n written straight into the exponent bits. v is
 * clamped to [-87, 88], where 2^n stays a normal float, and a NaN stays NaN. The tests
 * hold it to 2 ulp of expf over that range. */
static float exp_vec(float v) {
    v = v < -87.0f ? -87.0f : v > 88.0f ? 88.0f : v;
    float n = round_even(v * 1.44269504f);    /* v / ln2, to the nearest integer */
    float r = v - n * 0.693145751953125f;     /* ln2 in two parts: this one times n is exact */
    r = r - n * 1.428606765330187e-6f;
    float p = 1.0f + r * (1.0f + r * (1.0f / 2 + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720 + r * (1.0f / 5040)))))));
    /* n's integer from the low bits of n + 1.5 * 2^23, in unsigned arithmetic: no float-to-int
     * conversion, which would be undefined for a NaN (a NaN v gives a NaN p, and so out) */
    float big = n + 12582912.0f;
    uint32_t k, bits;
    memcpy(&k, &big, sizeof k);
    bits = (k - 0x4B400000u + 127u) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* The index of the largest of x[0..n) (the first, if several; NaNs are passed over).
 * Greedy decoding calls it on every token's 262144 logits, so blocks of 64 first get
 * their maximum in 16 lanes, a loop that vectorises (without a branch), and only a block
 * whose maximum beats the best so far is searched. */
static int argmax(const float *x, int n) {
    int best = 0, i = 0;
    float top = x[0];
    for (; i + 64 <= n; i += 64) {
        float m[16], block = -INFINITY;
        for (int k = 0; k < 16; k++) m[k] = -INFINITY;
        for (int j = i; j < i + 64; j += 16)
            for (int k = 0; k < 16; k++) m[k] = x[j + k] > m[k] ? x[j + k] : m[k];
        for (int k = 0; k < 16; k++) block = m[k] > block ? m[k] : block;
        if (block > top)
            for (int j = i; j < i + 64; j++)
                if (x[j] > top) { top = x[j]; best = j; }
    }
    for (; i < n; i++)
        if (x[i] > top) { top = x[i]; best = i; }
    return best;
}

/* softmax in place, in loops that vectorise: exp_vec, not libm's expf (a call per
 * element), and the sum in 16 partial sums added in a fixed order. Returns the sum, which
 * is NaN or infinite if any x is NaN or +infinity. */
static float softmax(float *x, int n) {
    float max = x[argmax(x, n)], part[16] = {0}, sum = 0.0f;
    int i = 0;
    for (; i + 16 <= n; i += 16)
        for (int k = 0; k < 16; k++) {
            x[i + k] = exp_vec(x[i + k] - max);
            part[k] += x[i + k];
        }
    for (; i < n; i++) {
        x[i] = exp_vec(x[i] - max);
        sum += x[i];
    }
    for (int k = 0; k < 8; k++) part[k] += part[k + 8];
    sum += ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
    for (i = 0; i < n; i++) x[i] /= sum;
    return sum;
}

/* 1 if no x is NaN or infinite: x * 0 is 0 for every other float, so the sum stays 0. */
static int all_finite(const float *x, size_t n) {
    float part[16] = {0}, sum = 0.0f;
    size_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int k = 0; k < 16; k++) part[k] += x[i + k] * 0.0f;
    for (; i < n; i++) sum += x[i] * 0.0f;
    for (int k = 0; k < 16; k++) sum += part[k];
    return sum == 0.0f;
}

/* GELU, tanh approximation (HF hidden_activation "gelu_pytorch_tanh"): 0.5 x (1 + tanh(u)) with
 * u = sqrt(2/pi) (x + 0.044715 x^3). Since 1 + tanh(u) = 2 / (1 + exp(-2u)), this is
 * x / (1 + exp(-2u)): the same function with one exp instead of tanh, and no
 * cancellation in 1 + tanh(u) for negative x. (Where exp(-2u) is clamped at e^88, the
 * true result is below 1e-37 in size; this gives about 1e-38 x.) */
static float gelu_tanh(float x) {
    float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
    return x / (1.0f + exp_vec(-2.0f * u));
}


/* Self-attention of the n batch tokens at positions pos0.. in layer l; their keys and
 * values are already in the cache. */
static void attention(RunState *s, const Config *c, int l, int pos0, int n) {
    int hd = c->head_dim, Q = c->n_heads * hd, KV = c->n_kv_heads * hd, len = s->cache_len[l];
    int group = c->n_heads / c->n_kv_heads; /* GQA: `group` query heads share one kv head */
    float scale = 1.0f / sqrtf(c->query_pre_attn_scalar);
    /* A job is one token and nh query heads of one group. A prompt takes the whole group:
     * each key and value row then comes into L1 once for all its heads, not once per
     * head. Decode splits the group only as far
     * as it takes to give every thread a job: 1B (4 heads, one kv head) on 2 threads takes
     * 2 heads a job, and each thread reads the layer's keys and values once, not twice. */
    int nh = group;
    if (n == 1)
        while (nh % 2 == 0 && c->n_heads / nh < s->threads) nh /= 2;
    const int jobs_per_token = c->n_heads / nh;
    int job;
    FOR /* (each thread has its own rows of scores) */
    for (job = 0; job < n * jobs_per_token; job++) {
        int t = job / jobs_per_token, h0 = job % jobs_per_token * nh, pos = pos0 + t, kvh = h0 / group;
        /* Sliding layers see keys j with pos - window < j <= pos; global layers all j <= pos. */
        int first = c->is_global[l] ? 0 : pos - c->window + 1;
        if (first < 0) first = 0;
        int span = pos - first + 1;
        const float *q = s->q + (size_t)t * Q + h0 * hd;          /* head h0 + g at q + g * hd */
        float *att = s->att + ((size_t)THREAD_NUM() * c->n_heads + h0) * s->ctx; /* head h0 + g's scores at att + g * ctx */
        const float *kc = s->key_cache[l] + kvh * hd, *vc = s->value_cache[l] + kvh * hd;
        float *out = s->att_out + (size_t)t * Q + h0 * hd; /* head h0 + g's at out + g * hd */
        if (kernels_attention(s->kernels, out, att, s->ctx, q, kc, vc, KV, first % len, span, len, hd, nh, scale))
            continue;
        for (int j = 0; j < span; j++) {
            const float *k = kc + (size_t)((first + j) % len) * KV;
            for (int g = 0; g < nh; g++) att[g * s->ctx + j] = dot_f32(k, q + g * hd, hd) * scale;
        }
        for (int g = 0; g < nh; g++) softmax(att + g * s->ctx, span);
        /* out = sum_j att[j] v_j, four values at a time: `out` is loaded and stored once per four */
        memset(out, 0, (size_t)nh * hd * sizeof(float));
        int j = 0;
        for (; j + 4 <= span; j += 4) {
            const float *restrict v0 = vc + (size_t)((first + j) % len) * KV;
            const float *restrict v1 = vc + (size_t)((first + j + 1) % len) * KV;
            const float *restrict v2 = vc + (size_t)((first + j + 2) % len) * KV;
            const float *restrict v3 = vc + (size_t)((first + j + 3) % len) * KV;
            for (int g = 0; g < nh; g++) {
                float *restrict o = out + g * hd; /* restrict: gcc -O3 vectorises */
                const float *a = att + g * s->ctx + j;
                float a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];
                for (int i = 0; i < hd; i++) o[i] += (a0 * v0[i] + a1 * v1[i]) + (a2 * v2[i] + a3 * v3[i]);
            }
        }
        for (; j < span; j++) {
            const float *restrict v = vc + (size_t)((first + j) % len) * KV;
            for (int g = 0; g < nh; g++) {
                float *restrict o = out + g * hd;
                float a = att[g * s->ctx + j];
                for (int i = 0; i < hd; i++) o[i] += a * v[i];
            }
        }
    }
}

/* The residual connection after a sub-block: x += post_norm(o) (o normed in place). */
static void add_normed(float *x, float *o, const float *post_norm, int n, float eps) {
    rmsnorm(o, o, post_norm, n, eps);
    for (int i = 0; i < n; i++) x[i] += o[i];
}

/* Decoder layer l on the n batch tokens in s->x (at positions pos0 ..), as HF's
 * Gemma3DecoderLayer / gemma_pytorch's Gemma2DecoderLayer. All threads of forward_batch's
 * team run it, each step split between them: per-token steps by token (decode's one token
 * on one thread, the others waiting), the matmuls by rows, attention by heads. */
static void decoder_layer(const Config *c, const LayerWeights *L, RunState *s, int l, int n, int pos0) {
    const int D = c->dim, hd = c->head_dim, half = hd / 2, F = c->hidden_dim;
    const int Q = c->n_heads * hd, KV = c->n_kv_heads * hd;

    /* attention block: norm, q/k/v projections */
    FOR
    for (int t = 0; t < n; t++) rmsnorm(s->xb + (size_t)t * D, s->x + (size_t)t * D, L->input_norm, D, c->norm_eps);
    float *const qkv_out[] = {s->q, s->k, s->v};
    const Matrix *const qkv[] = {&L->wq, &L->wk, &L->wv};
    matmul_many(3, qkv_out, qkv, s->xb, n, s);

    /* per-head q_norm / k_norm, then RoPE with this layer type's base */
    const float *cos_t = s->rope_cos + (c->is_global[l] ? (size_t)n * half : 0);
    const float *sin_t = s->rope_sin + (c->is_global[l] ? (size_t)n * half : 0);
    FOR
    for (int t = 0; t < n; t++) {
        for (int h = 0; h < c->n_heads; h++) {
            float *q = s->q + (size_t)t * Q + h * hd;
            rmsnorm(q, q, L->q_norm, hd, c->norm_eps);
            rope(q, cos_t + t * half, sin_t + t * half, hd);
        }
        for (int h = 0; h < c->n_kv_heads; h++) {
            float *k = s->k + (size_t)t * KV + h * hd;
            rmsnorm(k, k, L->k_norm, hd, c->norm_eps);
            rope(k, cos_t + t * half, sin_t + t * half, hd);
        }
        /* store this position's key and value in the cache */
        int slot = (pos0 + t) % s->cache_len[l];
        memcpy(s->key_cache[l] + (size_t)slot * KV, s->k + (size_t)t * KV, (size_t)KV * sizeof(float));
        memcpy(s->value_cache[l] + (size_t)slot * KV, s->v + (size_t)t * KV, (size_t)KV * sizeof(float));
    }

    attention(s, c, l, pos0, n);

    /* output projection, post-attention norm, residual */
    matmul(s->xb2, s->att_out, n, &L->wo, s);
    FOR
    for (int t = 0; t < n; t++) {
        add_normed(s->x + (size_t)t * D, s->xb2 + (size_t)t * D, L->post_attn_norm, D, c->norm_eps);
        rmsnorm(s->xb + (size_t)t * D, s->x + (size_t)t * D, L->pre_ffn_norm, D, c->norm_eps);
    }

    /* MLP block: down(gelu(gate(h)) * up(h)), pre- and post-norm, residual */
    float *const gate_up_out[] = {s->hb, s->hb2};
    const Matrix *const gate_up[] = {&L->w_gate, &L->w_up};
    matmul_many(2, gate_up_out, gate_up, s->xb, n, s);
    FOR
    for (int i = 0; i < n * F; i++) s->hb[i] = gelu_tanh(s->hb[i]) * s->hb2[i];
    matmul(s->xb2, s->hb, n, &L->w_down, s);
    FOR
    for (int t = 0; t < n; t++) add_normed(s->x + (size_t)t * D, s->xb2 + (size_t)t * D, L->post_ffn_norm, D, c->norm_eps);
}

/* Wall-clock seconds. Without a POSIX clock, CPU time: it does for the command line's
 * rates, not for pick_team, which then keeps all the threads. */
#if defined(CLOCK_MONOTONIC)
#define WALL_CLOCK 1
#else
#define WALL_CLOCK 0
#endif
static double now_seconds(void) {
#if WALL_CLOCK
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
#else
    return (double)clock() / CLOCKS_PER_SEC;
#endif
}

/* Seconds of CPU time the process has used, on all its threads. */
static double cpu_seconds(void) { return (double)clock() / CLOCKS_PER_SEC; }

/* How many threads the next pass runs on. A step of a layer ends when all the threads are
 * done with it, so when other programs keep the cores busy and a thread is off its core,
 * the others wait for it: decode on two busy cores ran several times slower on 2 threads
 * than on 1 (tools/bench_load.sh). So decode times its passes on each team size it runs
 * and keeps to the faster. It tries one thread after a pass on all of them whose threads
 * got under 3/4 of their cores' time (CPU time against wall time: other programs took the
 * rest), at most every 16th pass, and while on one thread it tries all of them every
 * 64th pass, to notice that the cores are free again. On free cores it never tries.
 * The results do not depend on it: every row and head is computed alike. */
static int pick_team(RunState *s, int decode) {
    const int all = s->threads;
    int best = s->team_secs[1] > 0 && s->team_secs[1] < s->team_secs[0] ? 1 : all;
    if (!decode || all == 1) return best;
    s->passes++;
    if (best == all && s->crowded && (s->probed == 0 || s->passes - s->probed >= 16)) {
        s->probed = s->passes;
        return 1;
    }
    return best == 1 && s->passes % 64 == 0 ? all : best;
}

/* A decode pass took `secs`, and the process `cpu_secs` of CPU time, on `team` threads. */
static void time_team(RunState *s, int team, double secs, double cpu_secs) {
    if (!WALL_CLOCK) return; /* CPU time cannot tell the team sizes apart */
    double *avg = &s->team_secs[team == s->threads ? 0 : 1];
    if (team == s->threads) s->crowded = cpu_secs < 0.75 * team * secs;
    *avg = *avg > 0 ? 0.75 * *avg + 0.25 * secs : secs;
}

/* Run n tokens (n <= max_batch) at positions pos0 .. pos0 + n - 1 through the model.
 * Returns the logits: of the last token, or of all n (rows of vocab_size) if all_logits;
 * NULL with classify 0, which skips the classifier (a prompt's batches but the last: their
 * logits are not read, and the classifier reads a quarter of the 1B weights). */
static float *forward_batch(const Model *m, RunState *s, const int *tokens, int n, int pos0, int classify) {
    const Config *c = &m->config;
    const Weights *w = &m->weights;
    const int D = c->dim, half = c->head_dim / 2;

    /* token embeddings, scaled by sqrt(hidden_size) computed in float32 */
    float normalizer = (float)sqrt((double)D);
    for (int t = 0; t < n; t++) {
        float *x = s->x + (size_t)t * D;
        matrix_row(x, &w->embed, tokens[t]);
        for (int i = 0; i < D; i++) x[i] *= normalizer;
    }
    if (s->hidden_dump) memcpy(s->hidden_dump, s->x + (size_t)(n - 1) * D, (size_t)D * sizeof(float));
    /* RoPE tables of this batch: [0] sliding layers' base, [1] global layers' (scaled) base */
    rope_angles(s->rope_cos, s->rope_sin, s->inv_freq_local, pos0, n, half);
    rope_angles(s->rope_cos + (size_t)n * half, s->rope_sin + (size_t)n * half, s->inv_freq_global, pos0, n, half);

    /* The threads start once here and run the layers together (see PARALLEL_TEAM): a start
     * per step would cost more than a wait at the end of one, and a 1B step has 157 steps. */
    const int first = s->all_logits ? 0 : n - 1; /* the tokens whose logits are wanted */
    const int team = pick_team(s, n == 1);
    const double start = now_seconds(), cpu_start = cpu_seconds();
    PARALLEL_TEAM(team) {
        for (int l = 0; l < c->n_layers; l++) {
            decoder_layer(c, &w->layers[l], s, l, n, pos0);
            if (s->hidden_dump) {
                ONE_THREAD
                memcpy(s->hidden_dump + (size_t)(l + 1) * D, s->x + (size_t)(n - 1) * D, (size_t)D * sizeof(float));
            }
        }
        if (classify) {
            /* final norm, then the classifier: the (unscaled) embedding table, tied, or lm_head */
            FOR
            for (int t = first; t < n; t++) rmsnorm(s->xb + (size_t)t * D, s->x + (size_t)t * D, w->final_norm, D, c->norm_eps);
            matmul(s->logits, s->xb + (size_t)first * D, n - first, &w->classifier, s);
        }
    }
    if (n == 1) time_team(s, team, now_seconds() - start, cpu_seconds() - cpu_start);
    return classify ? s->logits : NULL;
}

/* Feed ids[0..n) at positions pos0.. in batches; returns the logits of the last token
 * (or, with all_logits, of the last batch: row t of it is token n - nb + t). */
static float *forward_tokens(const Model *m, RunState *s, const int *ids, int n, int pos0) {
    float *logits = NULL;
    for (int done = 0; done < n; done += s->max_batch) {
        int nb = n - done < s->max_batch ? n - done : s->max_batch;
        logits = forward_batch(m, s, ids + done, nb, pos0 + done, done + nb == n);
    }
    return logits;
}

/* ------------------------------------------------------------------------- */
/* 3. sampler                                                                 */
/* ------------------------------------------------------------------------- */

typedef struct {
    int id;
    float p;
} ProbIndex;

typedef struct {
    int vocab_size;
    float temperature; /* 0 = greedy */
    int top_k;         /* keep the k most likely tokens (0 = off) */
    float top_p;       /* keep the smallest set with total probability >= top_p (1 = off) */
    float min_p;       /* drop tokens below min_p * p(most likely) (0 = off) */
    uint64_t rng;      /* xorshift64* state */
    ProbIndex *cand;   /* (vocab_size) candidate buffer, allocated once */
} Sampler;

static void set_sampler(Sampler *sp, float temperature, int top_k, float top_p, float min_p, uint64_t seed) {
    sp->temperature = temperature;
    sp->top_k = top_k;
    sp->top_p = top_p;
    sp->min_p = min_p;
    sp->rng = seed ? seed : 0x9E3779B97F4A7C15ull; /* xorshift state must not be 0 */
}

/* cand: vocab_size candidates of the caller's, or NULL to allocate them (free_sampler). */
static int build_sampler_in(Sampler *sp, int vocab_size, float temperature, int top_k, float top_p, float min_p,
                            uint64_t seed, ProbIndex *cand) {
    sp->vocab_size = vocab_size;
    set_sampler(sp, temperature, top_k, top_p, min_p, seed);
    sp->cand = cand;
    return sp->cand ? 0 : -1;
}

static float random_f32(uint64_t *state) { /* uniform in [0, 1) */
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return (float)((*state * 0x2545F4914F6CDD1Dull) >> 40) / 16777216.0f;
}

static int cmp_prob_desc(const void *a, const void *b) {
    const ProbIndex *x = a, *y = b;
    if (x->p != y->p) return x->p < y->p ? 1 : -1;
    return x->id - y->id;
}

/* Keep the k largest probabilities with a size-k min-heap: O(V log k), no full sort of V. */
static int select_top_k(ProbIndex *heap, const float *probs, int n, int k) {
    int size = 0;
    for (int i = 0; i < n; i++) {
        if (size == k && probs[i] <= heap[0].p) continue;
        int pos;
        if (size < k) { /* sift up */
            pos = size++;
            while (pos > 0 && heap[(pos - 1) / 2].p > probs[i]) { heap[pos] = heap[(pos - 1) / 2]; pos = (pos - 1) / 2; }
        } else { /* replace the root, sift down */
            pos = 0;
            for (;;) {
                int child = 2 * pos + 1;
                if (child >= size) break;
                if (child + 1 < size && heap[child + 1].p < heap[child].p) child++;
                if (heap[child].p >= probs[i]) break;
                heap[pos] = heap[child];
                pos = child;
            }
        }
        heap[pos].id = i;
        heap[pos].p = probs[i];
    }
    return size;
}

/* argmax over the vocabulary's logits in one part per thread, each in the cache of the
 * thread whose classifier rows wrote it: the same index as argmax. Each part is searched
 * from its first value that is not a NaN, as argmax would reach it: NaNs never win, and
 * on a tie the earlier part does. */
static int argmax_parallel(const float *x, int n) {
    enum { MAX_PARTS = 64 };
    int best_of[MAX_PARTS], parts = max_threads() < MAX_PARTS ? max_threads() : MAX_PARTS;
    if (parts < 2 || n < 65536 || isnan(x[0])) return argmax(x, n); /* (argmax stays at a NaN x[0]) */
    PARALLEL_TEAM(parts) {
        FOR
        for (int p = 0; p < parts; p++) {
            int lo = (int)((long long)n * p / parts), hi = (int)((long long)n * (p + 1) / parts), f = lo;
            while (f < hi && isnan(x[f])) f++;
            best_of[p] = f < hi ? f + argmax(x + f, hi - f) : -1;
        }
    }
    int best = best_of[0];
    for (int p = 1; p < parts; p++)
        if (best_of[p] >= 0 && x[best_of[p]] > x[best]) best = best_of[p];
    return best;
}

/* Sample the next token from logits (which are overwritten with probabilities).
 * Order, as in HF generate: temperature, softmax, top-k, top-p, min-p, draw. Returns -1
 * for logits no token can be drawn from: the largest is NaN or infinite (greedy), or the
 * softmax sum is (sampling), as NaN or infinity in the weights gives. */
static int sample(Sampler *sp, float *logits) {
    int V = sp->vocab_size;
    if (sp->temperature <= 0.0f) {
        int id = argmax_parallel(logits, V);
        return isfinite(logits[id]) ? id : -1;
    }
    for (int i = 0; i < V; i++) logits[i] /= sp->temperature;
    float sum = softmax(logits, V);
    if (!isfinite(sum) || !(sum > 0.0f)) return -1;
    float pmax = logits[argmax(logits, V)];

    int n;
    if (sp->top_k > 0 && sp->top_k < V) {
        n = select_top_k(sp->cand, logits, V, sp->top_k);
    } else {
        /* Tokens below (1 - top_p) / (V - 1) can never be inside the nucleus (all of them
         * together hold less than 1 - top_p), nor those under the min-p cut: skip them early. */
        float cut = sp->top_p < 1.0f ? (1.0f - sp->top_p) / (float)(V - 1) : 0.0f;
        if (sp->min_p * pmax > cut) cut = sp->min_p * pmax;
        n = 0;
        for (int i = 0; i < V; i++)
            if (logits[i] >= cut) { sp->cand[n].id = i; sp->cand[n].p = logits[i]; n++; }
    }
    qsort(sp->cand, (size_t)n, sizeof(ProbIndex), cmp_prob_desc);

    float total = 0.0f;
    int keep = 0;
    for (; keep < n; keep++) {
        if (keep > 0 && sp->cand[keep].p < sp->min_p * pmax) break;
        total += sp->cand[keep].p;
        if (total >= sp->top_p) { keep++; break; }
    }
    float r = random_f32(&sp->rng) * total, acc = 0.0f;
    for (int i = 0; i < keep; i++) {
        acc += sp->cand[i].p;
        if (r < acc) return sp->cand[i].id;
    }
    return sp->cand[keep > 0 ? keep - 1 : 0].id; /* rounding fell off the end */
}


/* ------------------------------------------------------------------------- */
/* 4. generation and chat                                                     */
/* ------------------------------------------------------------------------- */

static int is_stop_token(const Config *c, int id) { return id == c->eos_id || id == c->eot_id; }

/* Token ids enter the model here (fed, or from the tokenizer): each must have a row in the
 * embedding table. A tokenizer can hold ids beyond it (Gemma 3 1B's tokenizer has 262,145
 * tokens, its table 262,144 rows: "<image_soft_token>" is 262,144). 0, or -1 and a message
 * naming the first bad id (and its piece, where the tokenizer has one). */
static int check_ids(const Model *m, const int *ids, int n, char *err, size_t errsize) {
    int V = m->config.vocab_size;
    for (int i = 0; i < n; i++) {
        if (ids[i] >= 0 && ids[i] < V) continue;
        size_t pl = 0;
        const unsigned char *p = NULL;
        if (m->has_tokenizer && ids[i] >= 0 && ids[i] < m->tokenizer.n_tokens) p = tok_piece(&m->tokenizer, ids[i], &pl);
        char shown[4 * 64 + 1] = "";
        if (p) printable(p, pl < 64 ? pl : 64, shown);
        set_err(err, errsize, "token %d%s%s%s (at %d) is outside the model's vocabulary [0, %d): its embedding "
                "table has no row for it", ids[i], p ? " '" : "", shown, p ? "'" : "", i, V);
        return -1;
    }
    return 0;
}

/* Where generated tokens go: the caller's function, with each token's text. */
typedef struct {
    gemma3_piece_fn fn; /* NULL: nowhere */
    void *user;
    char *buf;          /* room for one token's text (tokenstream_max bytes); NULL without a tokenizer */
    size_t cap;
} Emit;

/* A chat: the conversation so far, and its ids (positions 0..n_hist).
 * Every turn renders the whole conversation with the Gemma 3 chat template, tokenizes
 * it, and feeds only what the cache does not hold yet, so a turn costs its own tokens,
 * while the model sees exactly what HF's apply_chat_template would give it. A session's
 * hist is every id it was fed, chat or not (gemma3_rewind re-feeds from it). */
typedef struct {
    ChatMessage *msgs; /* role/content strings are owned (malloc'd) */
    int n_msgs, cap_msgs;
    int *hist;         /* (ctx) the conversation's ids, in position order */
    int n_hist;
    int n_cached;      /* hist[0..n_cached) are in the KV cache; a last sampled id may not be yet */
    int own_hist;      /* 1: hist is the chat's own allocation (free_chat frees it); 0: a session's */
    int prompt_len;    /* ids of the last rendered prompt (before the model's reply) */
    int fed;           /* of those, how many the last turn had to run (the rest were cached) */
} Chat;

static void free_chat(Chat *ch) {
    for (int i = 0; i < ch->n_msgs; i++) {
        free((char *)ch->msgs[i].role);
        free((char *)ch->msgs[i].content);
    }
    free(ch->msgs);
    if (ch->own_hist) free(ch->hist);
    memset(ch, 0, sizeof(*ch));
}

static char *dup_bytes(const char *p, size_t n) {
    char *d = malloc(n + 1);
    if (d) { memcpy(d, p, n); d[n] = 0; }
    return d;
}

static int chat_push(Chat *ch, const char *role, const char *content, size_t len) {
    if (ch->n_msgs == ch->cap_msgs) {
        int cap = ch->cap_msgs ? 2 * ch->cap_msgs : 8;
        ChatMessage *grown = realloc(ch->msgs, (size_t)cap * sizeof(ChatMessage));
        if (!grown) return -1;
        ch->msgs = grown;
        ch->cap_msgs = cap;
    }
    char *r = dup_bytes(role, strlen(role)), *c = dup_bytes(content, len);
    if (!r || !c) { free(r); free(c); return -1; }
    ch->msgs[ch->n_msgs].role = r;
    ch->msgs[ch->n_msgs].content = c;
    ch->n_msgs++;
    return 0;
}

static void chat_pop(Chat *ch) {
    ch->n_msgs--;
    free((char *)ch->msgs[ch->n_msgs].role);
    free((char *)ch->msgs[ch->n_msgs].content);
}

/* Can the cache, which holds positions 0..n_hist-1, go back to `keep` and take new tokens
 * from there? That needs the keys of positions keep - window + 1 .. keep - 1 still in each
 * sliding ring, i.e. not yet overwritten by positions up to n_hist - 1. If not, the ids
 * must be fed again from 0. */
static int cache_holds(const Config *c, const RunState *s, int n_hist, int keep) {
    for (int l = 0; l < c->n_layers; l++) {
        int oldest = keep - c->window + 1 > 0 ? keep - c->window + 1 : 0;
        if (n_hist > s->cache_len[l] && oldest + s->cache_len[l] <= n_hist - 1) return 0;
    }
    return 1;
}

/* Feed the ids of ch->hist that the KV cache does not hold yet; returns their logits.
 * (Generation leaves its last sampled id unfed, so a run that ends there does not pay a
 * forward pass for logits no one reads: whoever goes on feeds it first.) */
static float *feed_pending(const Model *m, RunState *s, Chat *ch) {
    float *logits = forward_tokens(m, s, ch->hist + ch->n_cached, ch->n_hist - ch->n_cached, ch->n_cached);
    ch->n_cached = ch->n_hist;
    return logits;
}

/* Sample up to `steps` tokens from *logits, adding each to the end of ch->hist (fed before
 * the next sample, so the last one stays pending), and give each to `out`. Stops at
 * <eos>/<end_of_turn> (neither given nor added), after a token whose call returns nonzero,
 * when the context is full (that token is given, not added; *status GEMMA3_E_CONTEXT), or
 * at logits that are not numbers (*status GEMMA3_E_NUMERIC). *logits ends NULL (consumed).
 * Returns the number of tokens given. */
static int generate_tokens(const Model *m, RunState *s, Sampler *sp, Chat *ch, float **logits, int steps,
                           const Emit *out, int *status) {
    TokenStream ts = {{0}, 0};
    int given = 0, stop = 0;
    *status = 0;
    while (given < steps && !stop) {
        if (ch->n_cached < ch->n_hist) *logits = feed_pending(m, s, ch);
        if (!*logits) break;
        int next = sample(sp, *logits);
        *logits = NULL;
        if (next < 0) { *status = GEMMA3_E_NUMERIC; break; }
        if (is_stop_token(&m->config, next)) break;
        given++;
        if (out && out->fn) {
            size_t len = out->buf ? tokenstream_piece(&m->tokenizer, &ts, next, out->buf, out->cap) : 0;
            stop = out->fn(out->buf ? out->buf : "", len, next, out->user);
        }
        if (ch->n_hist >= s->ctx) { *status = GEMMA3_E_CONTEXT; break; }
        ch->hist[ch->n_hist++] = next; /* fed at the top of the next round, if there is one */
    }
    if (out && out->fn && out->buf) { /* the bytes of an unfinished character, as U+FFFD */
        size_t len = tokenstream_end(&m->tokenizer, &ts, out->buf, out->cap);
        if (len) out->fn(out->buf, len, -1, out->user);
    }
    return given;
}

/* A tokenizer failure (TOK_BAD, TOK_NOMEM) as a library error code: `bad` for TOK_BAD. */
static int tok_error_code(int rc, int bad) { return rc == TOK_NOMEM ? GEMMA3_E_NOMEM : bad; }

enum { CHAT_OK = 0, CHAT_FULL = GEMMA3_E_CONTEXT };
#define NOT_NUMBERS "the logits are NaN or infinite: the model's weights hold such values, or overflow"

/* One exchange: add the user's message, feed the new prompt ids, stream the model's reply
 * to `out` (if not NULL) and add it to the conversation. CHAT_OK, or a GEMMA3_E_* code
 * with a message: the message is then not added and the cache is left as it was, except
 * CHAT_FULL after part of a reply (the context filled up while generating it), which
 * keeps that part as the reply. */
static int chat_turn(const Model *m, RunState *s, Sampler *sp, Chat *ch, const char *user, size_t len, int steps,
                     const Emit *out, char *err, size_t errsize) {
    const Config *c = &m->config;
    if (chat_push(ch, "user", user, len) != 0) { set_err(err, errsize, "out of memory"); return GEMMA3_E_NOMEM; }
    char *text;
    int *ids = NULL, n = chat_render(ch->msgs, ch->n_msgs, 1, &text, err, errsize);
    if (n == 0) n = tokenizer_encode(&m->tokenizer, text, strlen(text), &ids, err, errsize);
    free(text);
    if (n < 0) { chat_pop(ch); return tok_error_code(n, GEMMA3_E_TEXT); }
    if (check_ids(m, ids, n, err, errsize) != 0) { free(ids); chat_pop(ch); return GEMMA3_E_TOKEN; }
    if (n >= s->ctx) {
        set_err(err, errsize, "the conversation is %d tokens with this message, the context holds %d", n, s->ctx);
        free(ids);
        chat_pop(ch);
        return CHAT_FULL;
    }
    /* Reuse the cache for the longest common prefix, if the sliding rings still hold what
     * it needs; otherwise start over (rare: it needs a reply that tokenizes differently
     * when rendered as text). */
    int keep = 0;
    while (keep < ch->n_cached && keep < n && ch->hist[keep] == ids[keep]) keep++;
    if (keep == n) keep = n - 1; /* need fresh logits for the last id */
    if (!cache_holds(c, s, ch->n_cached, keep)) keep = 0;
    memcpy(ch->hist, ids, (size_t)n * sizeof(int));
    free(ids);
    ch->n_hist = ch->prompt_len = n;
    ch->n_cached = keep;
    ch->fed = n - keep;
    float *logits = feed_pending(m, s, ch);

    /* the model's reply: sampled ids go into the cache as they are generated */
    int rc;
    generate_tokens(m, s, sp, ch, &logits, steps, out, &rc);
    if (rc == CHAT_FULL) set_err(err, errsize, "the context of %d tokens is full", s->ctx);
    if (rc == GEMMA3_E_NUMERIC) set_err(err, errsize, "%s", NOT_NUMBERS);
    size_t reply_len;
    char *reply;
    int drc = tokenizer_decode(&m->tokenizer, ch->hist + ch->prompt_len, ch->n_hist - ch->prompt_len, &reply,
                               &reply_len, err, errsize);
    if (drc) return tok_error_code(drc, GEMMA3_E_TOKEN); /* an id with no piece (4B+: 262,145..262,207) */
    if (chat_push(ch, "assistant", reply, reply_len) != 0) {
        free(reply);
        set_err(err, errsize, "out of memory");
        return GEMMA3_E_NOMEM;
    }
    free(reply);
    return rc;
}

/* ------------------------------------------------------------------------- */
/* 5. the library: gemma3.h's functions                                       */
/* ------------------------------------------------------------------------- */

/* Every failure of the library goes out through here: a code, and a message if the caller
 * gave somewhere to put it. */
static int fail(gemma3_error *e, int code, const char *fmt, ...) {
    if (e) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(e->message, sizeof e->message, fmt, ap);
        va_end(ap);
        e->code = code;
    }
    return code;
}

struct gemma3_model {
    Model m;
};

struct gemma3_session {
    const Model *model;
    RunState state;   /* the KV cache and activations */
    Sampler sampler;
    Chat chat;        /* the conversation, and chat.hist[0..n_hist): every id fed, or pending */
    float *logits;    /* after the last fed token; NULL when there are none (consumed by a sample) */
    int owed;         /* 1: gemma3_generate left its last token pending, and its logits are owed */
    char *piece;      /* room for one streamed token's text (NULL without a tokenizer) */
    size_t piece_cap;
    char *system;     /* the system prompt (a copy), or NULL */
    void *own;        /* the block this session allocated; NULL: it lives in the caller's arena */
};

/* Get the file's bytes: mmap where we can (pages load on demand and are shared),
 * otherwise malloc + fread. (With no file system, gemma3_open_memory takes the bytes.) */
static int read_file_bytes(Model *m, const char *path, char *err, size_t errsize) {
#ifndef GEMMA3_NO_MMAP
    if (!host_is_big_endian()) {
        int fd = open(path, O_RDONLY);
        struct stat st;
        if (fd < 0) { set_err(err, errsize, "cannot open %s: %s", path, strerror(errno)); return GEMMA3_E_IO; }
        if (fstat(fd, &st) != 0) {
            set_err(err, errsize, "cannot stat %s: %s", path, strerror(errno));
            close(fd);
            return GEMMA3_E_IO;
        }
        if (!S_ISREG(st.st_mode)) {
            set_err(err, errsize, "%s is not a regular file", path);
            close(fd);
            return GEMMA3_E_IO;
        }
        if ((uintmax_t)st.st_size > (uintmax_t)SIZE_MAX) {
            set_err(err, errsize, "%s is too large for this 32-bit build", path);
            close(fd);
            return GEMMA3_E_IO;
        }
        m->size = (size_t)st.st_size;
        if (m->size < GEMMA3_HEADER_SIZE) {
            set_err(err, errsize, "%s: file too short (%zu bytes) to be a gemma3.c model", path, m->size);
            close(fd);
            return GEMMA3_E_FORMAT;
        }
        void *p = mmap(NULL, m->size, PROT_READ, MAP_PRIVATE, fd, 0);
        close(fd);
        if (p == MAP_FAILED) { set_err(err, errsize, "cannot mmap %s: %s", path, strerror(errno)); return GEMMA3_E_IO; }
        m->data = p;
        m->mapped = 1;
#ifdef MADV_HUGEPAGE
        /* Linux: ask for 2 MiB pages. Decode streams every weight once per token, and
         * with 4 KiB pages that is a TLB miss every 4 KiB. It helps when the pages are
         * read from disk; pages already cached stay as they were (why the writers write
         * in aligned 4 MiB pieces). Filesystems without large folios ignore it. */
        (void)madvise(p, m->size, MADV_HUGEPAGE);
#endif
        return 0;
    }
#endif
    /* Fallback, and always on big-endian hosts, where tensors are byte-swapped in place. */
    FILE *f = fopen(path, "rb");
    if (!f) { set_err(err, errsize, "cannot open %s: %s", path, strerror(errno)); return GEMMA3_E_IO; }
    if (fseek(f, 0, SEEK_END) != 0) { set_err(err, errsize, "cannot seek in %s", path); fclose(f); return GEMMA3_E_IO; }
    long end = ftell(f); /* plain C: a long, so at most 2 GiB on 32-bit hosts */
    if (end < 0) {
        set_err(err, errsize, "cannot determine the size of %s (over 2 GiB on a 32-bit build?)", path);
        fclose(f);
        return GEMMA3_E_IO;
    }
    if (end < GEMMA3_HEADER_SIZE) {
        set_err(err, errsize, "%s: file too short (%ld bytes) to be a gemma3.c model", path, end);
        fclose(f);
        return GEMMA3_E_FORMAT;
    }
    rewind(f);
    m->size = (size_t)end;
    m->data = malloc(m->size);
    m->owns_data = 1;
    if (!m->data) { set_err(err, errsize, "out of memory reading %s (%zu bytes)", path, m->size); fclose(f); return GEMMA3_E_NOMEM; }
    if (fread(m->data, 1, m->size, f) != m->size) {
        set_err(err, errsize, "read error on %s", path);
        fclose(f);
        return GEMMA3_E_IO;
    }
    fclose(f);
    m->mapped = 0;
    return 0;
}

/* Give back what read_file_bytes took (bytes the caller gave stay the caller's). */
static void release_file_bytes(Model *m) {
#ifndef GEMMA3_NO_MMAP
    if (m->mapped) munmap(m->data, m->size);
#endif
    if (m->owns_data) free(m->data);
}

int gemma3_open_file(const char *path, gemma3_model **model, gemma3_error *err) {
    char msg[256];
    int rc;
    if (!path || !model) return fail(err, GEMMA3_E_ARG, "gemma3_open_file: NULL path or model");
    *model = NULL;
    gemma3_model *g = calloc(1, sizeof(*g));
    if (!g) return fail(err, GEMMA3_E_NOMEM, "out of memory");
    if ((rc = load_model(&g->m, path, msg, sizeof msg)) != 0) {
        free(g);
        return fail(err, rc, "%s", msg);
    }
    *model = g;
    return 0;
}

int gemma3_open_memory(const void *data, size_t size, gemma3_model **model, gemma3_error *err) {
    char msg[256];
    if (!data || !model) return fail(err, GEMMA3_E_ARG, "gemma3_open_memory: NULL data or model");
    *model = NULL;
    if ((uintptr_t)data % 4 != 0) return fail(err, GEMMA3_E_ARG, "gemma3_open_memory: the bytes must be 4-byte aligned");
    gemma3_model *g = calloc(1, sizeof(*g));
    if (!g) return fail(err, GEMMA3_E_NOMEM, "out of memory");
    g->m.data = (unsigned char *)(uintptr_t)data; /* read only, unless copied below */
    g->m.size = size;
    if (host_is_big_endian() && size >= GEMMA3_HEADER_SIZE) { /* tensors are swapped in place: a copy of ours */
        if (!(g->m.data = malloc(size))) { free(g); return fail(err, GEMMA3_E_NOMEM, "out of memory (%zu bytes)", size); }
        memcpy(g->m.data, data, size);
        g->m.owns_data = 1;
    }
    int rc = open_model_bytes(&g->m, "the model in memory", msg, sizeof msg);
    if (rc != 0) {
        free_model(&g->m);
        free(g);
        return fail(err, rc, "%s", msg);
    }
    *model = g;
    return 0;
}

void gemma3_close(gemma3_model *model) {
    if (!model) return;
    free_model(&model->m);
    free(model);
}

gemma3_config gemma3_model_config(const gemma3_model *model) {
    gemma3_config k;
    memset(&k, 0, sizeof k);
    if (!model) return k;
    const Config *c = &model->m.config;
    k.vocab_size = c->vocab_size, k.dim = c->dim, k.hidden_dim = c->hidden_dim, k.n_layers = c->n_layers;
    k.n_heads = c->n_heads, k.n_kv_heads = c->n_kv_heads, k.head_dim = c->head_dim, k.sliding_window = c->window;
    k.max_context = c->max_seq_len;
    k.bos_id = c->bos_id, k.eos_id = c->eos_id, k.eot_id = c->eot_id, k.sot_id = c->sot_id;
    k.has_tokenizer = model->m.has_tokenizer;
    k.max_piece_bytes = model->m.has_tokenizer ? (int)tokenstream_max(&model->m.tokenizer) : 0;
    return k;
}

/* ---- tokenizer ---- */

static int no_tokenizer(gemma3_error *err) {
    return fail(err, GEMMA3_E_TOKENIZER, "the model file has no tokenizer (export it from a directory with "
                "tokenizer.json)");
}

int gemma3_tokenize(const gemma3_model *model, const char *text, size_t len, int *ids, int capacity,
                    gemma3_error *err) {
    char msg[256];
    int *all;
    if (!model || (len && !text) || capacity < 0 || (capacity && !ids))
        return fail(err, GEMMA3_E_ARG, "gemma3_tokenize: NULL model, text or ids, or capacity < 0");
    if (!model->m.has_tokenizer) return no_tokenizer(err);
    int n = tokenizer_encode(&model->m.tokenizer, text, len, &all, msg, sizeof msg);
    if (n < 0) return fail(err, tok_error_code(n, GEMMA3_E_TEXT), "%s", msg);
    if (check_ids(&model->m, all, n, msg, sizeof msg) != 0) {
        free(all);
        return fail(err, GEMMA3_E_TOKEN, "%s", msg);
    }
    if (capacity) memcpy(ids, all, (size_t)(n < capacity ? n : capacity) * sizeof(int));
    free(all);
    return n;
}

int gemma3_detokenize(const gemma3_model *model, const int *ids, int n, char *text, size_t capacity,
                      gemma3_error *err) {
    char msg[256];
    size_t len;
    if (!model || n < 0 || (n && !ids) || (capacity && !text))
        return fail(err, GEMMA3_E_ARG, "gemma3_detokenize: NULL model, ids or text, or n < 0");
    if (!model->m.has_tokenizer) return no_tokenizer(err);
    if (check_ids(&model->m, ids, n, msg, sizeof msg) != 0) return fail(err, GEMMA3_E_TOKEN, "%s", msg);
    char *out;
    int rc = tokenizer_decode(&model->m.tokenizer, ids, n, &out, &len, msg, sizeof msg);
    if (rc) return fail(err, tok_error_code(rc, GEMMA3_E_TOKEN), "%s", msg);
    if (len > INT_MAX) { free(out); return fail(err, GEMMA3_E_ARG, "gemma3_detokenize: the text is over 2 GB"); }
    if (capacity) {
        size_t k = len < capacity - 1 ? len : capacity - 1;
        memcpy(text, out, k);
        text[k] = 0;
    }
    free(out);
    return (int)len;
}

int gemma3_stream_put(const gemma3_model *model, gemma3_stream *stream, int id, char *out, size_t capacity) {
    if (!model || !stream || (capacity && !out)) return GEMMA3_E_ARG;
    if (!model->m.has_tokenizer || id < 0 || id >= model->m.config.vocab_size) return 0;
    TokenStream ts;
    memcpy(ts.pending, stream->pending, sizeof ts.pending);
    ts.npending = stream->npending;
    size_t len = tokenstream_piece(&model->m.tokenizer, &ts, id, out, capacity);
    memcpy(stream->pending, ts.pending, sizeof ts.pending);
    stream->npending = ts.npending;
    return (int)len;
}

int gemma3_stream_flush(const gemma3_model *model, gemma3_stream *stream, char *out, size_t capacity) {
    if (!model || !stream || (capacity && !out)) return GEMMA3_E_ARG;
    if (!model->m.has_tokenizer) return 0;
    TokenStream ts;
    memcpy(ts.pending, stream->pending, sizeof ts.pending);
    ts.npending = stream->npending;
    size_t len = tokenstream_end(&model->m.tokenizer, &ts, out, capacity);
    stream->npending = ts.npending;
    return (int)len;
}

int gemma3_chat_render(const gemma3_message *msgs, int n, int add_generation_prompt, char *text, size_t capacity,
                       gemma3_error *err) {
    char msg[256];
    if (!msgs || n <= 0 || (capacity && !text)) return fail(err, GEMMA3_E_ARG, "gemma3_chat_render: no messages");
    ChatMessage *cm = malloc((size_t)n * sizeof(ChatMessage));
    if (!cm) return fail(err, GEMMA3_E_NOMEM, "out of memory");
    for (int i = 0; i < n; i++) cm[i].role = msgs[i].role, cm[i].content = msgs[i].content;
    char *out;
    int rc = chat_render(cm, n, add_generation_prompt, &out, msg, sizeof msg);
    free(cm);
    if (rc) return fail(err, tok_error_code(rc, GEMMA3_E_TEXT), "%s", msg);
    size_t len = strlen(out);
    if (len > INT_MAX) { free(out); return fail(err, GEMMA3_E_ARG, "gemma3_chat_render: the text is over 2 GB"); }
    if (capacity) {
        size_t k = len < capacity - 1 ? len : capacity - 1;
        memcpy(text, out, k);
        text[k] = 0;
    }
    free(out);
    return (int)len;
}

/* ---- sessions ---- */

gemma3_options gemma3_default_options(void) {
    gemma3_options o;
    memset(&o, 0, sizeof o);
    o.temperature = 1.0f, o.top_k = 64, o.top_p = 0.95f;
    return o;
}

static int check_sampling(const gemma3_options *o, gemma3_error *err) {
    if (!(o->temperature >= 0.0f) || o->top_k < 0 || !(o->top_p >= 0.0f && o->top_p <= 1.0f) ||
        !(o->min_p >= 0.0f && o->min_p <= 1.0f))
        return fail(err, GEMMA3_E_ARG, "sampling options out of range (temperature >= 0, top_k >= 0, top_p and "
                    "min_p in [0, 1])");
    return 0;
}

/* The session's context for these options, or a negative error. */
static int session_context(const Model *m, const gemma3_options *o, gemma3_error *err) {
    int max = m->config.max_seq_len, ctx = o->context ? o->context : max < 8192 ? max : 8192;
    if (ctx < 1 || ctx > max)
        return fail(err, GEMMA3_E_ARG, "context %d is not in [1, %d] (the model's max_position_embeddings)", ctx, max);
    return ctx;
}

/* Lay a session out in the block at base (64-byte aligned), or with base NULL only add up
 * its size: the session, its run state, the sampler's candidates, the token history, a
 * piece buffer, the system prompt. */
static size_t session_layout(gemma3_session **out, const Model *m, const gemma3_options *o, int ctx,
                             unsigned char *base) {
    const Config *c = &m->config;
    size_t piece_cap = m->has_tokenizer ? tokenstream_max(&m->tokenizer) : 0;
    size_t sys_len = o->system_prompt ? strlen(o->system_prompt) + 1 : 0;
    Carve cv = {base, 0};
    gemma3_session *S = carve(&cv, 1, sizeof(gemma3_session));
    void *rs = carve(&cv, run_state_bytes(c, ctx, PREFILL_BATCH, 0), 1);
    ProbIndex *cand = carve(&cv, (size_t)c->vocab_size, sizeof(ProbIndex));
    int *hist = carve(&cv, (size_t)ctx, sizeof(int));
    char *piece = carve(&cv, piece_cap, 1);
    char *sys = carve(&cv, sys_len, 1);
    if (!base) return cv.used;
    memset(S, 0, sizeof(*S));
    S->model = m;
    build_run_state_in(&S->state, c, ctx, PREFILL_BATCH, 0, rs);
    build_sampler_in(&S->sampler, c->vocab_size, o->temperature, o->top_k, o->top_p, o->min_p, o->seed, cand);
    S->chat.hist = hist;
    S->piece = piece_cap ? piece : NULL;
    S->piece_cap = piece_cap;
    if (sys_len) S->system = memcpy(sys, o->system_prompt, sys_len);
    *out = S;
    return cv.used;
}

int64_t gemma3_session_bytes(const gemma3_model *model, const gemma3_options *options, gemma3_error *err) {
    gemma3_options o = options ? *options : gemma3_default_options();
    if (!model) return fail(err, GEMMA3_E_ARG, "gemma3_session_bytes: NULL model");
    int ctx = session_context(&model->m, &o, err);
    if (ctx < 0) return ctx;
    return (int64_t)session_layout(NULL, &model->m, &o, ctx, NULL) + 63; /* + 63: any alignment */
}

int gemma3_session_new(const gemma3_model *model, const gemma3_options *options, gemma3_session **session,
                       gemma3_error *err) {
    gemma3_options o = options ? *options : gemma3_default_options();
    if (!model || !session) return fail(err, GEMMA3_E_ARG, "gemma3_session_new: NULL model or session");
    *session = NULL;
    int ctx = session_context(&model->m, &o, err);
    if (ctx < 0) return ctx;
    if (check_sampling(&o, err)) return GEMMA3_E_ARG;
    size_t need = session_layout(NULL, &model->m, &o, ctx, NULL) + 63;
    unsigned char *block = o.arena;
    void *own = NULL;
    if (block && o.arena_size < need)
        return fail(err, GEMMA3_E_ARENA, "the arena has %zu bytes, a session of %d tokens needs %zu", o.arena_size,
                    ctx, need);
    if (!block && !(block = own = malloc(need)))
        return fail(err, GEMMA3_E_NOMEM, "out of memory for a %d-token context (%zu bytes)", ctx, need);
    session_layout(session, &model->m, &o, ctx, block + (64 - (uintptr_t)block % 64) % 64);
    (*session)->own = own;
    return 0;
}

void gemma3_session_free(gemma3_session *session) {
    if (!session) return;
    void *own = session->own;
    free_chat(&session->chat); /* the messages (hist is in the block) */
    free(own);
}

int gemma3_set_sampling(gemma3_session *session, const gemma3_options *options, gemma3_error *err) {
    if (!session || !options) return fail(err, GEMMA3_E_ARG, "gemma3_set_sampling: NULL session or options");
    if (check_sampling(options, err)) return GEMMA3_E_ARG;
    set_sampler(&session->sampler, options->temperature, options->top_k, options->top_p, options->min_p, options->seed);
    return 0;
}

/* The checks of gemma3_feed and gemma3_feed_logits: 0, or the error. */
static int check_feed(gemma3_session *S, const int *ids, int n, gemma3_error *err) {
    char msg[256];
    if (!S || n < 0 || (n && !ids)) return fail(err, GEMMA3_E_ARG, "feed: NULL session or ids, or n < 0");
    if (check_ids(S->model, ids, n, msg, sizeof msg) != 0) return fail(err, GEMMA3_E_TOKEN, "%s", msg);
    if (n > S->state.ctx - S->chat.n_hist)
        return fail(err, GEMMA3_E_CONTEXT, "%d more tokens do not fit: %d of the context's %d are used", n,
                    S->chat.n_hist, S->state.ctx);
    return 0;
}

/* The session's logits, computing those a gemma3_generate owes (see feed_pending). */
static float *session_logits(gemma3_session *S) {
    if (S->owed) S->logits = feed_pending(S->model, &S->state, &S->chat);
    S->owed = 0;
    return S->logits;
}

int gemma3_feed(gemma3_session *session, const int *ids, int n, gemma3_error *err) {
    gemma3_session *S = session;
    int rc = check_feed(S, ids, n, err);
    if (rc || n == 0) return rc ? rc : S->chat.n_hist;
    memcpy(S->chat.hist + S->chat.n_hist, ids, (size_t)n * sizeof(int)); /* after any pending id */
    S->chat.n_hist += n;
    S->logits = feed_pending(S->model, &S->state, &S->chat);
    S->owed = 0;
    return S->chat.n_hist;
}

int gemma3_feed_logits(gemma3_session *session, const int *ids, int n, float *logits, float *hidden,
                       gemma3_error *err) {
    gemma3_session *S = session;
    int rc = check_feed(S, ids, n, err);
    if (rc || n == 0) return rc ? rc : S->chat.n_hist;
    if (!logits) return fail(err, GEMMA3_E_ARG, "gemma3_feed_logits: NULL logits");
    const Config *c = &S->model->config;
    RunState *s = &S->state;
    feed_pending(S->model, s, &S->chat);
    size_t V = (size_t)c->vocab_size, H = (size_t)(c->n_layers + 1) * c->dim;
    /* The batches write their logits straight into the caller's rows; the hidden states
     * are those of a batch's last token, so with them the batches are single tokens. */
    float *own_logits = s->logits;
    int step = hidden ? 1 : s->max_batch, pos = S->chat.n_hist;
    s->all_logits = 1;
    for (int done = 0; done < n; done += step) {
        int nb = n - done < step ? n - done : step;
        s->logits = logits + (size_t)done * V;
        s->hidden_dump = hidden ? hidden + (size_t)done * H : NULL;
        forward_batch(S->model, s, ids + done, nb, pos + done, 1);
    }
    s->all_logits = 0;
    s->logits = own_logits;
    s->hidden_dump = NULL;
    memcpy(own_logits, logits + (size_t)(n - 1) * V, V * sizeof(float));
    memcpy(S->chat.hist + pos, ids, (size_t)n * sizeof(int));
    S->chat.n_hist = S->chat.n_cached = pos + n;
    S->logits = own_logits;
    S->owed = 0;
    if (!all_finite(logits, (size_t)n * V)) return fail(err, GEMMA3_E_NUMERIC, "%s", NOT_NUMBERS);
    return S->chat.n_hist;
}

const float *gemma3_logits(gemma3_session *session, gemma3_error *err) {
    if (!session) { fail(err, GEMMA3_E_ARG, "gemma3_logits: NULL session"); return NULL; }
    if (!session_logits(session)) fail(err, GEMMA3_E_STATE, "no logits: feed a token first (a sample consumes them)");
    return session->logits;
}

int gemma3_sample(gemma3_session *session, gemma3_error *err) {
    if (!session) return fail(err, GEMMA3_E_ARG, "gemma3_sample: NULL session");
    if (!session_logits(session)) return fail(err, GEMMA3_E_STATE, "no logits to sample: feed a token first");
    int id = sample(&session->sampler, session->logits);
    session->logits = NULL;
    return id < 0 ? fail(err, GEMMA3_E_NUMERIC, "%s", NOT_NUMBERS) : id;
}

int gemma3_position(const gemma3_session *session) { return session ? session->chat.n_hist : 0; }

int gemma3_context(const gemma3_session *session) { return session ? session->state.ctx : 0; }

int gemma3_rewind(gemma3_session *session, int pos, gemma3_error *err) {
    gemma3_session *S = session;
    if (!S || pos < 0 || pos > S->chat.n_hist)
        return fail(err, GEMMA3_E_ARG, "gemma3_rewind: position %d is not in [0, %d]", pos, S ? S->chat.n_hist : 0);
    /* keep the cache up to pos - 1 and feed the token at pos - 1 again for its logits */
    int keep = pos > 0 ? pos - 1 : 0;
    if (keep > S->chat.n_cached) keep = S->chat.n_cached;
    if (!cache_holds(&S->model->config, &S->state, S->chat.n_cached, keep)) keep = 0;
    S->chat.n_hist = pos;
    S->chat.n_cached = keep;
    S->logits = feed_pending(S->model, &S->state, &S->chat);
    S->owed = 0;
    return pos;
}

int gemma3_generate(gemma3_session *session, int max_tokens, gemma3_piece_fn callback, void *user,
                    gemma3_error *err) {
    gemma3_session *S = session;
    int status;
    if (!S || max_tokens < 0) return fail(err, GEMMA3_E_ARG, "gemma3_generate: NULL session or max_tokens < 0");
    if (!session_logits(S)) return fail(err, GEMMA3_E_STATE, "no logits to generate from: feed a prompt first");
    Emit out = {callback, user, S->piece, S->piece_cap};
    int given = generate_tokens(S->model, &S->state, &S->sampler, &S->chat, &S->logits, max_tokens, &out, &status);
    S->owed = S->chat.n_cached < S->chat.n_hist;
    return status == GEMMA3_E_NUMERIC ? fail(err, status, "%s", NOT_NUMBERS) : given;
}

int gemma3_chat_turn(gemma3_session *session, const char *user_text, size_t len, int max_tokens,
                     gemma3_piece_fn callback, void *user, gemma3_error *err) {
    gemma3_session *S = session;
    char msg[256];
    if (!S || (len && !user_text) || max_tokens < 0)
        return fail(err, GEMMA3_E_ARG, "gemma3_chat_turn: NULL session or text, or max_tokens < 0");
    if (!S->model->has_tokenizer) return no_tokenizer(err);
    if (S->system && S->chat.n_msgs == 0 && chat_push(&S->chat, "system", S->system, strlen(S->system)) != 0)
        return fail(err, GEMMA3_E_NOMEM, "out of memory");
    Emit out = {callback, user, S->piece, S->piece_cap};
    int rc = chat_turn(S->model, &S->state, &S->sampler, &S->chat, user_text ? user_text : "", len, max_tokens, &out,
                       msg, sizeof msg);
    S->logits = NULL; /* (the turn's last logits were consumed or not kept; a pending id is fed by what comes next) */
    S->owed = 0;
    if (rc != CHAT_OK) return fail(err, rc, "%s", msg);
    return S->chat.n_hist - S->chat.prompt_len;
}

/* ------------------------------------------------------------------------- */
/* 6. the command line: the gemma3 program, on the library above              */
/* ------------------------------------------------------------------------- */
#ifndef GEMMA3_NO_MAIN

static int isatty_stderr(void) {
#ifndef GEMMA3_NO_MMAP
    return isatty(2); /* POSIX builds: progress lines only on a terminal */
#else
    return 0;
#endif
}

/* Read whitespace-separated token ids from a stream (`name` for messages); every id must
 * be < vocab_size. The --logits file and --decode's stdin both come through here. */
static int read_id_stream(FILE *f, const char *name, int vocab_size, int **ids_out, int *n_out, char *err,
                          size_t errsize) {
    int cap = 256, n = 0, *ids = malloc((size_t)cap * sizeof(int)), ch = 0;
    while (ids && ch != EOF) {
        /* one word: decimal digits, ended by white space or the end; anything else is refused
         * (a NUL or a letter inside an id must not pass as part of a number): named by the
         * word where it is printable, else by its byte */
        long v = 0;
        int digits = 0;
        char word[24]; /* its first digits, for the message */
        while ((ch = fgetc(f)) != EOF && isspace(ch)) {}
        int bad = 0; /* a byte that is not a digit: the first that is not printable, else 1 */
        for (; ch != EOF && !isspace(ch); ch = fgetc(f)) {
            if ((ch < '0' || ch > '9') && !bad) bad = ch > 0x20 && ch < 0x7f ? 1 : 0x100 | ch;
            if (!bad && v < vocab_size) v = 10 * v + (ch - '0'); /* v stops growing once it is out of range */
            if (digits < (int)sizeof word - 4) word[digits] = (char)ch, word[digits + 1] = 0;
            else memcpy(word + sizeof word - 4, "...", 4);
            digits++;
            if (bad > 1) break;
        }
        if (bad > 1) {
            set_err(err, errsize, "%s: token %d holds the byte 0x%02x, not a token id in [0, %d)", name, n + 1, bad & 0xff,
                    vocab_size);
            free(ids);
            return -1;
        }
        if (digits == 0) break;
        if (bad || v >= vocab_size) {
            set_err(err, errsize, "%s: token %d is '%s', not a token id in [0, %d)", name, n + 1, word, vocab_size);
            free(ids);
            return -1;
        }
        if (n == cap) {
            int *grown = realloc(ids, (size_t)(cap *= 2) * sizeof(int));
            if (!grown) { free(ids); ids = NULL; break; }
            ids = grown;
        }
        ids[n++] = (int)v;
    }
    if (!ids) { set_err(err, errsize, "out of memory reading %s", name); return -1; }
    if (ferror(f)) { set_err(err, errsize, "read error on %s", name); free(ids); return -1; }
    *ids_out = ids;
    *n_out = n;
    return 0;
}

/* The --logits token file: as above, and it must hold at least one id. */
static int read_token_file(const char *path, int vocab_size, int **ids_out, int *n_out, char *err, size_t errsize) {
    FILE *f = fopen(path, "r");
    if (!f) { set_err(err, errsize, "cannot open %s: %s", path, strerror(errno)); return -1; }
    int rc = read_id_stream(f, path, vocab_size, ids_out, n_out, err, errsize);
    fclose(f);
    if (rc == 0 && *n_out == 0) {
        set_err(err, errsize, "%s holds no token ids", path);
        free(*ids_out);
        rc = -1;
    }
    return rc;
}

/* Write floats as little-endian float32, whatever the host. */
static int write_f32_le(FILE *f, const float *x, int n) {
    for (int i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, &x[i], 4);
        unsigned char b[4] = {(unsigned char)u, (unsigned char)(u >> 8), (unsigned char)(u >> 16),
                              (unsigned char)(u >> 24)};
        if (fwrite(b, 1, 4, f) != 4) return -1;
    }
    return 0;
}

/* log(sum exp(x)), in double, shifted by the max so nothing overflows. */
static double log_sum_exp(const float *x, int n) {
    double max = x[argmax(x, n)], z = 0.0;
    for (int i = 0; i < n; i++) z += exp((double)x[i] - max);
    return max + log(z);
}

/* Negative log-likelihood of `target` under `logits` (log-softmax in double). */
static double token_nll(const float *logits, int V, int target) { return log_sum_exp(logits, V) - logits[target]; }

/* Print the `top` most likely next tokens after position `pos` (for --top): what an
 * engine author diffs against. */
static void print_top(const gemma3_model *m, const float *logits, int pos, int input_id, int top, ProbIndex *buf,
                      FILE *out) {
    gemma3_config c = gemma3_model_config(m);
    int V = c.vocab_size;
    double lse = log_sum_exp(logits, V);
    int n = select_top_k(buf, logits, V, top); /* by logit: same order as by probability */
    qsort(buf, (size_t)n, sizeof(ProbIndex), cmp_prob_desc);
    fprintf(out, "pos %d input %d\n", pos, input_id);
    for (int r = 0; r < n; r++) {
        int id = buf[r].id;
        fprintf(out, "  %2d  %7d  %12.6f  %.6e  ", r + 1, id, logits[id], exp((double)logits[id] - lse));
        if (c.has_tokenizer) { /* the piece, quoted, with control bytes escaped */
            char small[256], *piece = small;
            int len = gemma3_detokenize(m, &id, 1, small, sizeof small, NULL);
            if (len >= (int)sizeof small && !(piece = malloc((size_t)len + 1))) len = 0;
            if (piece != small) gemma3_detokenize(m, &id, 1, piece, (size_t)len + 1, NULL);
            fputc('"', out);
            for (int i = 0; i < len; i++) {
                unsigned char ch = (unsigned char)piece[i];
                if (ch == '"' || ch == '\\') fprintf(out, "\\%c", ch);
                else if (ch < 0x20 || ch == 0x7f) fprintf(out, "\\x%02x", ch);
                else fputc(ch, out);
            }
            fputc('"', out);
            if (piece != small) free(piece);
        }
        fputc('\n', out);
    }
}

/* --perplexity: score every token of ids[1..n) given the ones before it, `chunk` tokens
 * at a time (logits: chunk x vocab floats). A text longer than the session's context is
 * scored in windows of that many tokens that each start with <bos> and overlap by half,
 * so every token after the first window is scored with at least context/2 tokens of
 * history. The mean NLL goes to *mean, per-token NLLs to nll_out[0..n-1) (if not NULL). */
static int perplexity(gemma3_session *s, const gemma3_model *m, const int *ids, int n, int chunk, double *mean,
                      double *nll_out, gemma3_error *err) {
    gemma3_config c = gemma3_model_config(m);
    int ctx = gemma3_context(s), V = c.vocab_size, rc = 0;
    int scored = 0; /* ids[1..scored] have been scored */
    double total = 0.0;
    int *window = malloc((size_t)ctx * sizeof(int));
    float *logits = malloc((size_t)chunk * V * sizeof(float));
    if (!window || !logits) rc = fail(err, GEMMA3_E_NOMEM, "out of memory");
    for (int start = 0; rc == 0 && scored < n - 1; start += ctx / 2 > 0 ? ctx / 2 : 1) {
        /* the window: <bos>, then ids[start + 1 ..], at most ctx tokens */
        int len = n - start < ctx ? n - start : ctx;
        window[0] = c.bos_id;
        memcpy(window + 1, ids + start + 1, (size_t)(len - 1) * sizeof(int));
        gemma3_rewind(s, 0, NULL);
        for (int done = 0; rc == 0 && done < len - 1; done += chunk) {
            int nb = len - 1 - done < chunk ? len - 1 - done : chunk;
            if ((rc = gemma3_feed_logits(s, window + done, nb, logits, NULL, err)) < 0) break;
            rc = 0;
            for (int t = 0; t < nb; t++) {
                int target = start + done + t + 1; /* index in ids of the token predicted here */
                if (target <= scored) continue;     /* already scored with more history */
                double nll = token_nll(logits + (size_t)t * V, V, ids[target]);
                if (nll_out) nll_out[target - 1] = nll;
                total += nll;
                scored = target;
            }
        }
    }
    free(window);
    free(logits);
    *mean = total / (n - 1);
    return rc;
}

/* --quantize writes a copy of a model file with q8_0 / q4_0 matrices: the one mode that
 * works on the file itself rather than through the library. */

/* float -> IEEE half, round to nearest even (the q8_0 / q4_0 block scales). */
static uint16_t f32_to_f16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000, a = u & 0x7fffffff;
    if (a >= 0x7f800000) return (uint16_t)(sign | 0x7c00 | (a > 0x7f800000 ? 0x200 : 0)); /* inf / nan */
    if (a >= 0x477ff000) return (uint16_t)(sign | 0x7c00);                                 /* overflow */
    if (a < 0x38800000) { /* subnormal half: shift the mantissa (with its implicit 1) into place */
        if (a < 0x33000000) return (uint16_t)sign;
        uint32_t m = (a & 0x7fffff) | 0x800000;
        int shift = 126 - (int)(a >> 23); /* 14..24 */
        uint32_t q = m >> shift, rest = m & ((1u << shift) - 1), halfway = 1u << (shift - 1);
        if (rest > halfway || (rest == halfway && (q & 1))) q++;
        return (uint16_t)(sign | q);
    }
    uint32_t h = ((a >> 13) - (112u << 10)), rest = a & 0x1fff;
    if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) h++;
    return (uint16_t)(sign | h);
}

static void wr_u16(unsigned char *p, uint16_t v) { p[0] = (unsigned char)v; p[1] = (unsigned char)(v >> 8); }
static void wr_u32(unsigned char *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i)); }
static void wr_u64(unsigned char *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i)); }

/* One row of floats to q8_0: per block of 32, d = max|x| / 127 and q = round(x / d); the
 * row's n/32 scales go first, then its quants. */
static void quantize_row_q8_0(unsigned char *out, const float *x, int n) {
    int8_t *q = (int8_t *)(out + 2 * (n / QK));
    for (int b = 0; b < n / QK; b++) {
        float amax = 0.0f;
        for (int i = 0; i < QK; i++) amax = fmaxf(amax, fabsf(x[b * QK + i]));
        float d = amax / 127.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
        wr_u16(out + 2 * b, f32_to_f16(d));
        for (int i = 0; i < QK; i++) q[b * QK + i] = (int8_t)lrintf(x[b * QK + i] * inv);
    }
}

/* One row of floats to q4_0: per block of 32, the value of largest magnitude maps to -8
 * exactly, d = that value / -8, nibble = clamp(round(x / d) + 8, 0, 15); weights i and
 * i + 16 share byte i (low, high nibble). The row's scales first, then its nibbles. */
static void quantize_row_q4_0(unsigned char *out, const float *x, int n) {
    unsigned char *q = out + 2 * (n / QK);
    for (int b = 0; b < n / QK; b++, q += QK / 2) {
        float max = 0.0f;
        for (int i = 0; i < QK; i++) if (fabsf(x[b * QK + i]) > fabsf(max)) max = x[b * QK + i];
        float d = max / -8.0f, inv = d != 0.0f ? 1.0f / d : 0.0f;
        wr_u16(out + 2 * b, f32_to_f16(d));
        for (int i = 0; i < QK / 2; i++) {
            int lo = (int)lrintf(x[b * QK + i] * inv) + 8, hi = (int)lrintf(x[b * QK + i + QK / 2] * inv) + 8;
            lo = lo < 0 ? 0 : lo > 15 ? 15 : lo;
            hi = hi < 0 ? 0 : hi > 15 ? 15 : hi;
            q[i] = (unsigned char)(lo | hi << 4);
        }
    }
}

/* --quantize: write a copy of model file `m` whose matrices are q8_0 or q4_0 (norms stay
 * f32). Header, layer types and tokenizer are copied byte for byte; the tensor directory
 * gets the new dtypes, sizes and offsets. export.py --dtype q8_0|q4_0 calls this. */
static int quantize_model(const Model *m, const char *out_path, int dtype, char *err, size_t errsize) {
    const unsigned char *h = m->data;
    uint64_t dir_off = rd_u64(h + 112);
    uint32_t n = rd_u32(h + 88);
    size_t dir_size = (size_t)n * GEMMA3_DIR_ENTRY_SIZE;
    unsigned char *dir = malloc(dir_size);
    const Config *c = &m->config;
    int widest = c->dim > c->hidden_dim ? c->dim : c->hidden_dim;
    if (c->n_heads * c->head_dim > widest) widest = c->n_heads * c->head_dim;
    float *row = malloc((size_t)widest * sizeof(float));
    /* Write in whole 4 MiB pieces at 4 MiB offsets (stdio writes a full buffer at once):
     * Linux then caches the new file in 2 MiB pages where the filesystem can (large
     * folios), and gemma3 maps it with 2 MiB pages (see read_file_bytes). The buffer is
     * ours: glibc ignores setvbuf's size when it is to allocate the buffer itself. */
    size_t obuf_size = (size_t)4 << 20;
    char *obuf = malloc(obuf_size);
    FILE *f = fopen(out_path, "wb");
    if (!dir || !row || !obuf || !f) {
        set_err(err, errsize, f ? "out of memory" : "cannot write %s: %s", out_path, strerror(errno));
        goto fail;
    }
    setvbuf(f, obuf, _IOFBF, obuf_size);
    memcpy(dir, m->data + dir_off, dir_size);
    /* lay out the tensors: same order, 64-byte aligned */
    uint64_t pos = (dir_off + dir_size + 63) / 64 * 64;
    for (uint32_t i = 0; i < n; i++) {
        unsigned char *e = dir + (size_t)i * GEMMA3_DIR_ENTRY_SIZE;
        uint32_t ndim = rd_u32(e + 68), rows = rd_u32(e + 72), cols = rd_u32(e + 76);
        uint64_t nbytes = rd_u64(e + 96);
        if (ndim == 2) {
            if (cols % QK != 0) { set_err(err, errsize, "%.64s: %u columns is not a multiple of %d", (const char *)e, cols, QK); goto fail; }
            wr_u32(e + 64, (uint32_t)dtype);
            nbytes = (uint64_t)rows * row_bytes(dtype, (int)cols);
            wr_u64(e + 96, nbytes);
        }
        wr_u64(e + 88, pos);
        pos = (pos + nbytes + 63) / 64 * 64;
    }
    unsigned char head[GEMMA3_HEADER_SIZE];
    memcpy(head, h, sizeof head);
    wr_u64(head + 8, pos); /* file size */
    if (fwrite(head, 1, sizeof head, f) != sizeof head ||
        fwrite(h + GEMMA3_HEADER_SIZE, 1, (size_t)dir_off - GEMMA3_HEADER_SIZE, f) != (size_t)dir_off - GEMMA3_HEADER_SIZE ||
        fwrite(dir, 1, dir_size, f) != dir_size)
        goto write_fail;
    uint64_t written = dir_off + dir_size; /* bytes so far (no ftell: it is a long, 32 bits on some hosts) */
    for (uint32_t i = 0; i < n; i++) {
        const unsigned char *e = dir + (size_t)i * GEMMA3_DIR_ENTRY_SIZE;
        const unsigned char *src = m->data + rd_u64(m->data + dir_off + (size_t)i * GEMMA3_DIR_ENTRY_SIZE + 88);
        uint64_t off = rd_u64(e + 88);
        for (; written < off; written++) if (fputc(0, f) == EOF) goto write_fail; /* alignment */
        if (rd_u32(e + 68) == 1) { /* a norm: stays f32 (in memory it is host order) */
            if (write_f32_le(f, (const float *)src, (int)rd_u32(e + 72)) != 0) goto write_fail;
            written += rd_u64(e + 96);
            continue;
        }
        const char *name = (const char *)e;
        Matrix source = {src, (int)rd_u32(m->data + dir_off + (size_t)i * GEMMA3_DIR_ENTRY_SIZE + 64),
                         (int)rd_u32(e + 72), (int)rd_u32(e + 76)};
        const Matrix *W = &source;
        size_t rb = row_bytes(dtype, W->cols);
        unsigned char *qrow = malloc(rb);
        if (!qrow) { set_err(err, errsize, "out of memory"); goto fail; }
        for (int r = 0; r < W->rows; r++) {
            matrix_row(row, W, r);
            if (dtype == DT_Q8_0) quantize_row_q8_0(qrow, row, W->cols);
            else quantize_row_q4_0(qrow, row, W->cols);
            if (fwrite(qrow, 1, rb, f) != rb) { free(qrow); goto write_fail; }
            written += rb;
        }
        free(qrow);
        if (isatty_stderr()) fprintf(stderr, "\r  quantizing %3u/%u %-48.64s", i + 1, n, name);
    }
    for (; written < pos; written++) if (fputc(0, f) == EOF) goto write_fail;
    if (isatty_stderr()) fprintf(stderr, "\n");
    free(dir);
    free(row);
    int closed = fclose(f); /* flushes the buffer: free it only after */
    free(obuf);
    if (closed != 0) { set_err(err, errsize, "write error on %s", out_path); return -1; }
    return 0;
write_fail:
    set_err(err, errsize, "write error on %s", out_path);
fail:
    free(dir);
    free(row);
    if (f) fclose(f);
    free(obuf);
    return -1;
}

/* Read one line (without its newline) of any length; NULL at end of input. */
static char *read_line(FILE *in, size_t *len) {
    size_t cap = 256, n = 0;
    char *buf = malloc(cap);
    int ch;
    while (buf && (ch = fgetc(in)) != EOF && ch != '\n') {
        if (n + 1 == cap) {
            char *grown = realloc(buf, cap *= 2);
            if (!grown) { free(buf); return NULL; }
            buf = grown;
        }
        buf[n++] = (char)ch;
    }
    if (!buf || (ch == EOF && n == 0)) { free(buf); return NULL; }
    buf[n] = 0;
    *len = n;
    return buf;
}


static void usage(FILE *f) {
    fprintf(f,
        "usage: gemma3 MODEL.bin [mode] [options]\n"
        "\n"
        "modes (default: generate from -p):\n"
        "  -p PROMPT            generate a continuation of PROMPT (<bos> is added, nothing else)\n"
        "  -f FILE              the same with the text of FILE as the prompt (for long prompts)\n"
        "  --logits IN.txt OUT.f32\n"
        "                       run the whitespace-separated token ids in IN.txt (no <bos> added)\n"
        "                       and write float32 little-endian logits, row-major [T][vocab]\n"
        "    --top N            also print the N most likely next tokens of every position\n"
        "                       (rank, id, logit, probability, piece) on stdout\n"
        "    --dump-hidden OUT  also write the residual stream after the embedding and after every\n"
        "                       layer: float32 little-endian [T][n_layers + 1][hidden_size]\n"
        "  --perplexity FILE    tokenize FILE (<bos> added), print the mean negative log-likelihood\n"
        "                       and perplexity; texts longer than -c are scored in windows of -c\n"
        "                       tokens overlapping by half\n"
        "  --quantize q8_0|q4_0 OUT.bin\n"
        "                       write a copy of MODEL.bin with int8 / int4 matrices in blocks of 32\n"
        "                       (export.py --dtype q8_0|q4_0 runs this for you)\n"
        "  --encode             read UTF-8 text on stdin, print its token ids (no <bos>) on one line\n"
        "  --decode             read token ids on stdin, print the text\n"
        "  --chat               interactive multi-turn chat with the Gemma 3 chat template, one user\n"
        "                       message per line of stdin, Ctrl-D to end, Ctrl-C to stop a reply;\n"
        "                       with -p or -f: answer that one message and exit\n"
        "  --system TEXT        (--chat) system prompt, folded into the first user turn\n"
        "\n"
        "options:\n"
        "  -n N                 tokens to generate (default 256)\n"
        "  -t T                 temperature (default 1.0; 0 = greedy)\n"
        "  -k K                 top-k (default 64; 0 = off)\n"
        "  --top-p P            top-p / nucleus (default 0.95; 1 = off)\n"
        "  --min-p P            min-p, relative to the most likely token (default 0 = off)\n"
        "  -s SEED              random seed (default: time); same seed, same text\n"
        "  -c N                 context length (default: min(max_position_embeddings, 8192);\n"
        "                       --logits: the number of tokens)\n"
        "  -h, --help           this help\n"
        "\n"
        "threads: set OMP_NUM_THREADS. Model files are made by export.py (see README.md).\n");
}

/* Output files are written under NAME.partial and renamed when whole, so that a failed or
 * interrupted run leaves nothing under NAME; die removes the .partial files of this run. */
static char *g_partial[2];

static void die(const char *fmt, ...) {
    va_list ap;
    fprintf(stderr, "gemma3: error: ");
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    for (int i = 0; i < 2; i++)
        if (g_partial[i]) remove(g_partial[i]);
    exit(1);
}

static long parse_int(const char *flag, const char *s, long lo, long hi) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (!*s || *end || errno || v < lo || v > hi) die("%s needs an integer in [%ld, %ld], got '%s'", flag, lo, hi, s);
    return v;
}

static float parse_float(const char *flag, const char *s, float lo, float hi) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (!*s || *end || errno || !(v >= lo && v <= hi)) die("%s needs a number in [%g, %g], got '%s'", flag, lo, hi, s);
    return (float)v;
}

/* Read all of a stream into memory (text may contain NUL bytes, so keep the length). */
static char *read_all(FILE *f, size_t *len) {
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    size_t got;
    while (buf && (got = fread(buf + n, 1, cap - n, f)) > 0) {
        n += got;
        if (n == cap) {
            char *grown = realloc(buf, cap *= 2);
            if (!grown) { free(buf); return NULL; }
            buf = grown;
        }
    }
    *len = n;
    return buf;
}

/* The bytes of a text file (`what` names it in errors). */
static char *read_text_file(const char *what, const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) die("cannot open %s %s: %s", what, path, strerror(errno));
    char *text = read_all(f, len);
    int bad = ferror(f);
    fclose(f);
    if (!text || bad) die("cannot read %s %s", what, path);
    return text;
}

/* What the command line asked for. */
typedef struct {
    const char *model_path;
    const char *prompt; /* -p, or the text of -f (any bytes: prompt_len says how many) */
    size_t prompt_len;
    char *prompt_file_text;
    const char *logits_in, *logits_out, *hidden_out, *ppl_path, *quant_type, *quant_out, *system_prompt;
    int encode, decode, chat, top_n, steps, top_k, ctx;
    float temperature, top_p, min_p;
    uint64_t seed;
} Options;

/* Whether paths a and b name the same file (b need not exist yet): writing an output over
 * the model would truncate it while it is read. */
static int same_file(const char *a, const char *b) {
#ifndef GEMMA3_NO_MMAP
    struct stat sa, sb;
    if (stat(a, &sa) == 0 && stat(b, &sb) == 0) return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
#endif
    return strcmp(a, b) == 0;
}

static int takes_value(const char *opt) {
    static const char *const with_value[] = {"-p", "-f", "-n", "-t", "-k", "--top-p", "--min-p", "-s", "-c", "--system",
                                              "--top", "--dump-hidden", "--perplexity", NULL};
    for (int i = 0; with_value[i]; i++)
        if (!strcmp(opt, with_value[i])) return 1;
    return 0;
}

static void parse_args(Options *o, int argc, char **argv) {
    const char *prompt_file = NULL;
    memset(o, 0, sizeof(*o));
    o->steps = 256, o->top_k = 64, o->temperature = 1.0f, o->top_p = 0.95f, o->seed = (uint64_t)time(NULL);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) { usage(stdout); exit(0); }
        else if (!strcmp(a, "--encode")) o->encode = 1;
        else if (!strcmp(a, "--decode")) o->decode = 1;
        else if (!strcmp(a, "--chat")) o->chat = 1;
        else if (!strcmp(a, "--quantize") || !strcmp(a, "--logits")) {
            int q = a[2] == 'q';
            if (i + 2 >= argc) die(q ? "--quantize needs two arguments: q8_0|q4_0 OUT.bin" : "--logits needs two arguments: TOKENS.txt OUT.f32");
            *(q ? &o->quant_type : &o->logits_in) = argv[++i];
            *(q ? &o->quant_out : &o->logits_out) = argv[++i];
            if (q && strcmp(o->quant_type, "q8_0") && strcmp(o->quant_type, "q4_0"))
                die("--quantize: unknown type '%s' (q8_0 or q4_0)", o->quant_type);
        } else if (takes_value(a)) {
            if (i + 1 >= argc) die("%s needs a value (see --help)", a);
            const char *v = argv[++i];
            if (!strcmp(a, "-p")) o->prompt = v;
            else if (!strcmp(a, "-f")) prompt_file = v;
            else if (!strcmp(a, "-n")) o->steps = (int)parse_int(a, v, 0, 1L << 30);
            else if (!strcmp(a, "-t")) o->temperature = parse_float(a, v, 0.0f, 100.0f);
            else if (!strcmp(a, "-k")) o->top_k = (int)parse_int(a, v, 0, 1L << 30);
            else if (!strcmp(a, "--top-p")) o->top_p = parse_float(a, v, 0.0f, 1.0f);
            else if (!strcmp(a, "--min-p")) o->min_p = parse_float(a, v, 0.0f, 1.0f);
            else if (!strcmp(a, "-s")) o->seed = (uint64_t)parse_int(a, v, 0, 0x7fffffffL);
            else if (!strcmp(a, "-c")) o->ctx = (int)parse_int(a, v, 1, 1L << 30);
            else if (!strcmp(a, "--system")) o->system_prompt = v;
            else if (!strcmp(a, "--top")) o->top_n = (int)parse_int(a, v, 1, 1000000);
            else if (!strcmp(a, "--dump-hidden")) o->hidden_out = v;
            else o->ppl_path = v; /* --perplexity */
        }
        else if (a[0] == '-' && a[1] != '\0') die("unknown option %s (see --help)", a);
        else if (!o->model_path) o->model_path = a;
        else die("unexpected argument '%s' (see --help)", a);
    }
    if (!o->model_path) { usage(stderr); exit(1); }
    if (prompt_file && o->prompt) die("-p and -f both give the prompt: choose one");
    if (prompt_file) o->prompt = o->prompt_file_text = read_text_file("prompt file", prompt_file, &o->prompt_len);
    else if (o->prompt) o->prompt_len = strlen(o->prompt);
    int modes = o->encode + o->decode + o->chat + (o->logits_in != NULL) + (o->prompt != NULL && !o->chat) +
                (o->ppl_path != NULL) + (o->quant_type != NULL);
    if (modes > 1) die("choose one of -p/-f, --chat, --logits, --perplexity, --encode, --decode, --quantize");
    if (modes == 0)
        die("nothing to do: give -p PROMPT, -f FILE, --chat, --logits, --perplexity, --encode, --decode or --quantize (see --help)");
    if ((o->top_n || o->hidden_out) && !o->logits_in) die("--top and --dump-hidden go with --logits");
    if (o->system_prompt && !o->chat) die("--system goes with --chat");
    const char *outputs[] = {o->quant_out, o->logits_out, o->hidden_out};
    for (int i = 0; i < 3; i++)
        if (outputs[i] && same_file(o->model_path, outputs[i]))
            die("%s is the model file itself: give the output another name", outputs[i]);
}

/* The name output `slot` (0 or 1) is written under until it is whole: path.partial. */
static const char *partial_name(int slot, const char *path, const char *model_path) {
    size_t len = strlen(path);
    if (!(g_partial[slot] = malloc(len + 9))) die("out of memory");
    memcpy(g_partial[slot], path, len);
    memcpy(g_partial[slot] + len, ".partial", 9);
    if (same_file(model_path, g_partial[slot])) {
        free(g_partial[slot]);
        g_partial[slot] = NULL;
        die("%s.partial, where %s is written first, is the model file itself: give the output another name", path, path);
    }
    return g_partial[slot];
}

/* The output is whole: give it its name. */
static void keep_output(int slot, const char *path) {
    if (rename(g_partial[slot], path) != 0) die("cannot write %s: %s", path, strerror(errno));
    free(g_partial[slot]);
    g_partial[slot] = NULL;
}

/* The context to size the caches for: -c, else min(max_position_embeddings, 8192). */
static int context_length(const Options *o, const gemma3_config *c) {
    int ctx = o->ctx ? o->ctx : c->max_context < 8192 ? c->max_context : 8192;
    if (ctx > c->max_context) die("context %d exceeds the model's max_position_embeddings %d", ctx, c->max_context);
    return ctx;
}

/* A session of `ctx` tokens with the command line's sampler. */
static gemma3_session *new_session(const gemma3_model *m, const Options *o, int ctx) {
    gemma3_options opt = gemma3_default_options();
    gemma3_session *s;
    gemma3_error e;
    opt.context = ctx;
    opt.temperature = o->temperature, opt.top_k = o->top_k, opt.top_p = o->top_p, opt.min_p = o->min_p;
    opt.seed = o->seed;
    opt.system_prompt = o->system_prompt;
    if (gemma3_session_new(m, &opt, &s, &e) != 0) die("%s", e.message);
    return s;
}

/* <bos> and then the ids of text. */
static int *encode_with_bos(const gemma3_model *m, const char *what, const char *text, size_t len, int *n_out) {
    gemma3_error e;
    int *ids = malloc((len + 2) * sizeof(int)); /* a token covers at least one byte */
    if (!ids) die("out of memory");
    int n = gemma3_tokenize(m, text, len, ids + 1, (int)(len + 1), &e);
    if (n < 0) die("%s: %s", what, e.message);
    ids[0] = gemma3_model_config(m).bos_id;
    *n_out = n + 1;
    return ids;
}

/* The generated text goes to stdout as it comes. */
static int print_piece(const char *piece, size_t len, int id, void *user) {
    (void)id, (void)user;
    fwrite(piece, 1, len, stdout);
    fflush(stdout);
    return 0;
}

/* Ctrl-C during a chat reply stops the reply, which joins the conversation as far as it
 * got, and the chat goes on; at the prompt, or a second time, it ends the program (unless
 * SIGINT was ignored when gemma3 started, as for a background job: then it stays so). */
static volatile sig_atomic_t g_interrupted;

static void on_interrupt(int sig) {
    g_interrupted = 1;
    signal(sig, SIG_DFL);
}

static int chat_piece(const char *piece, size_t len, int id, void *user) {
    print_piece(piece, len, id, user);
    return g_interrupted; /* nonzero: the reply stops after this token */
}

static int run_encode(const gemma3_model *m) {
    gemma3_error e;
    size_t len;
    char *text = read_all(stdin, &len);
    int *ids = text ? malloc((len + 1) * sizeof(int)) : NULL;
    if (!ids) die("out of memory reading stdin");
    int n = gemma3_tokenize(m, text, len, ids, (int)(len + 1), &e);
    if (n < 0) die("%s", e.message);
    for (int i = 0; i < n; i++) printf(i ? " %d" : "%d", ids[i]);
    printf("\n");
    free(ids);
    free(text);
    return 0;
}

static int run_decode(const gemma3_model *m) {
    char err[512];
    gemma3_error e;
    int *ids, n;
    if (read_id_stream(stdin, "--decode", gemma3_model_config(m).vocab_size, &ids, &n, err, sizeof err) != 0)
        die("%s", err);
    int len = gemma3_detokenize(m, ids, n, NULL, 0, &e);
    char *text = len >= 0 ? malloc((size_t)len + 1) : NULL;
    if (len < 0) die("%s", e.message);
    if (!text) die("out of memory");
    gemma3_detokenize(m, ids, n, text, (size_t)len + 1, &e);
    fwrite(text, 1, (size_t)len, stdout);
    free(text);
    free(ids);
    return 0;
}

/* --logits: the ids through the model in batches, as a prompt is; the logits of every
 * position to a file, row-major [T][vocab]. Optionally also the top-N table (stdout) and
 * the hidden state after every layer, [T][n_layers + 1][dim]. */
static int run_logits(const gemma3_model *m, const Options *o) {
    char err[512];
    gemma3_error e;
    gemma3_config c = gemma3_model_config(m);
    int *ids, n;
    if (read_token_file(o->logits_in, c.vocab_size, &ids, &n, err, sizeof err) != 0) die("%s", err);
    Options sized = *o;
    if (!sized.ctx) sized.ctx = n; /* --logits: the context is the file's tokens */
    int ctx = context_length(&sized, &c);
    if (n > ctx) die("%s has %d tokens, more than the context of %d (-c)", o->logits_in, n, ctx);
    gemma3_session *s = new_session(m, o, ctx);
    FILE *f = fopen(partial_name(0, o->logits_out, o->model_path), "wb"), *fh = NULL;
    if (!f) die("cannot write %s: %s", o->logits_out, strerror(errno));
    if (o->hidden_out && !(fh = fopen(partial_name(1, o->hidden_out, o->model_path), "wb")))
        die("cannot write %s: %s", o->hidden_out, strerror(errno));
    size_t V = (size_t)c.vocab_size, H = (size_t)(c.n_layers + 1) * c.dim;
    int chunk = PREFILL_BATCH;
    float *logits = malloc((size_t)chunk * V * sizeof(float)), *hidden = fh ? malloc((size_t)chunk * H * sizeof(float)) : NULL;
    ProbIndex *buf = o->top_n ? malloc((size_t)o->top_n * sizeof(ProbIndex)) : NULL;
    if (!logits || (fh && !hidden) || (o->top_n && !buf)) die("out of memory");
    for (int done = 0; done < n; done += chunk) {
        int nb = n - done < chunk ? n - done : chunk;
        if (gemma3_feed_logits(s, ids + done, nb, logits, hidden, &e) < 0) die("%s", e.message);
        if (fh && write_f32_le(fh, hidden, (int)(nb * H)) != 0) die("write error on %s", o->hidden_out);
        for (int t = 0; t < nb; t++) {
            const float *row = logits + (size_t)t * V;
            if (o->top_n) print_top(m, row, done + t, ids[done + t], o->top_n, buf, stdout);
            if (write_f32_le(f, row, (int)V) != 0) die("write error on %s", o->logits_out);
        }
    }
    if (fh && fclose(fh) != 0) die("write error on %s", o->hidden_out);
    if (fclose(f) != 0) die("write error on %s", o->logits_out);
    if (fh) keep_output(1, o->hidden_out);
    keep_output(0, o->logits_out);
    free(buf);
    free(hidden);
    free(logits);
    free(ids);
    gemma3_session_free(s);
    return 0;
}

static int run_perplexity(const gemma3_model *m, const Options *o) {
    gemma3_error e;
    gemma3_config c = gemma3_model_config(m);
    size_t len;
    int n, ctx = context_length(o, &c);
    char *text = read_text_file("text file", o->ppl_path, &len);
    int *ids = encode_with_bos(m, o->ppl_path, text, len, &n);
    free(text);
    if (n < 2) die("%s has no tokens to score", o->ppl_path);
    if (ctx < 2) die("--perplexity needs a context of at least 2 tokens");
    if (ctx > n) ctx = n;
    double *nll = malloc((size_t)n * sizeof(double)), mean, worst = 0.0;
    if (!nll) die("out of memory");
    gemma3_session *s = new_session(m, o, ctx);
    double t0 = now_seconds();
    if (perplexity(s, m, ids, n, PREFILL_BATCH, &mean, nll, &e) != 0) die("%s", e.message);
    for (int i = 0; i < n - 1; i++) worst = nll[i] > worst ? nll[i] : worst;
    printf("%s: %d tokens scored (windows of %d), mean NLL %.6f nats/token, perplexity %.4f, worst token NLL %.3f\n",
           o->ppl_path, n - 1, ctx, mean, exp(mean), worst);
    fprintf(stderr, "scored in %.1f s\n", now_seconds() - t0);
    free(ids);
    free(nll);
    gemma3_session_free(s);
    return 0;
}

/* --chat: one user message per line of stdin (or the one message of -p / -f). A message
 * the model cannot take (invalid UTF-8, a token it has no embedding for) is refused with
 * one line on stderr and the conversation goes on without it (exit status 1 at the end). */
static int run_chat(const gemma3_model *m, const Options *o) {
    gemma3_error e;
    gemma3_config c = gemma3_model_config(m);
    int status = 0, interactive = 0;
    gemma3_session *s = new_session(m, o, context_length(o, &c));
#ifndef GEMMA3_NO_MMAP
    interactive = isatty(0) && !o->prompt; /* POSIX builds: show a prompt on a terminal */
#endif
    void (*inherited)(int) = signal(SIGINT, SIG_IGN);
    signal(SIGINT, inherited);
    for (;;) {
        size_t len = o->prompt_len;
        char *line;
        if (o->prompt) {
            line = dup_bytes(o->prompt, len);
        } else {
            if (interactive) { fprintf(stderr, "> "); fflush(stderr); }
            if (!(line = read_line(stdin, &len))) { /* end of input (Ctrl-D) */
                if (interactive) fputc('\n', stderr);
                break;
            }
            if (len == 0) { free(line); continue; } /* an empty line is no message */
        }
        if (!line) die("out of memory");
        g_interrupted = 0;
        if (inherited != SIG_IGN) signal(SIGINT, on_interrupt);
        int rc = gemma3_chat_turn(s, line, len, o->steps, chat_piece, NULL, &e);
        if (inherited != SIG_IGN) signal(SIGINT, inherited);
        free(line);
        if (g_interrupted && rc >= 0) fprintf(stderr, " [stopped]");
        if (rc == GEMMA3_E_CONTEXT) {
            printf("\n");
            fflush(stdout);
            fprintf(stderr, "gemma3: %s (-c); the conversation ends here (start again with a larger -c)\n", e.message);
            status = 2;
            break;
        }
        if (rc < 0 && (o->prompt || (rc != GEMMA3_E_TOKEN && rc != GEMMA3_E_TEXT))) die("%s", e.message);
        if (rc < 0) { /* refused: the conversation is as it was */
            fprintf(stderr, "gemma3: error: %s (message refused)\n", e.message);
            status = 1;
            continue;
        }
        printf("\n");
        fflush(stdout);
        if (o->prompt) break;
    }
    gemma3_session_free(s);
    return status;
}

/* -p / -f: <bos>, the prompt, then up to -n sampled tokens, streamed to stdout. */
static int run_generate(const gemma3_model *m, const Options *o) {
    gemma3_error e;
    gemma3_config c = gemma3_model_config(m);
    int n, ctx = context_length(o, &c);
    int *ids = encode_with_bos(m, "prompt", o->prompt, o->prompt_len, &n);
    if (n >= ctx) die("the prompt is %d tokens, the context only %d (raise -c)", n, ctx);
    gemma3_session *s = new_session(m, o, ctx);
    double t0 = now_seconds();
    if (gemma3_feed(s, ids, n, &e) < 0) die("%s", e.message);
    double t1 = now_seconds();
    int generated = gemma3_generate(s, o->steps, print_piece, NULL, &e);
    if (generated < 0) die("%s", e.message);
    double prefill_s = t1 - t0, decode_s = now_seconds() - t1;
    printf("\n");
    fprintf(stderr, "prompt %d tokens, %.1f tok/s; generated %d tokens, %.1f tok/s\n", n,
            n / (prefill_s > 0 ? prefill_s : 1e-9), generated, generated / (decode_s > 0 ? decode_s : 1e-9));
    if (n + generated >= ctx) fprintf(stderr, "gemma3: note: stopped at the end of the %d-token context (-c)\n", ctx);
    free(ids);
    gemma3_session_free(s);
    return 0;
}

/* --quantize works on the model file itself (not a library call). */
static int run_quantize(const Options *o) {
    char err[512];
    Model model;
    if (load_model(&model, o->model_path, err, sizeof err) != 0) die("%s", err);
    int dtype = !strcmp(o->quant_type, "q8_0") ? DT_Q8_0 : DT_Q4_0, from = model.weights.embed.dtype;
    if (from == DT_Q8_0 || from == DT_Q4_0 || from >= DT_GGML)
        fprintf(stderr, "gemma3: note: %s is already %s: its quantized values are quantized again (export from the "
                "original checkpoint for the best %s)\n", o->model_path,
                from == DT_Q8_0 ? "q8_0" : from == DT_Q4_0 ? "q4_0" : "quantized (GGUF blocks)", o->quant_type);
    if (quantize_model(&model, partial_name(0, o->quant_out, o->model_path), dtype, err, sizeof err) != 0)
        die("%s", err);
    keep_output(0, o->quant_out);
    free_model(&model);
    return 0;
}

#ifndef TESTING
int main(int argc, char **argv) {
    Options o;
    gemma3_model *model;
    gemma3_error e;
    int status;
    parse_args(&o, argc, argv);
    if (o.quant_type) return run_quantize(&o);
    if (gemma3_open_file(o.model_path, &model, &e) != 0) die("%s", e.message);
    if (!o.logits_in && !gemma3_model_config(model).has_tokenizer)
        die("%s has no tokenizer (export it from a directory with tokenizer.json); --logits works without one", o.model_path);
    if (o.encode) status = run_encode(model);
    else if (o.decode) status = run_decode(model);
    else if (o.logits_in) status = run_logits(model, &o);
    else if (o.ppl_path) status = run_perplexity(model, &o);
    else if (o.chat) status = run_chat(model, &o);
    else status = run_generate(model, &o);
    free(o.prompt_file_text);
    gemma3_close(model);
    if (fflush(stdout) != 0 || ferror(stdout)) die("write error on stdout: %s", strerror(errno));
    return status;
}
#endif /* TESTING */
#endif /* GEMMA3_NO_MAIN */




/* ------------------------------------------------------------------------- */
/* 7. optional fast kernels                                                   */
/* ------------------------------------------------------------------------- */
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && defined(__GNUC__) && !defined(GEMMA3_NO_SIMD)
#include "kernels_x86.c"
#endif
/* What the target has no kernels for goes to the plain loops. */
#ifndef HAVE_KERNELS_MATMUL
static size_t kernels_setup(void *mem, const Config *c, int max_batch, int threads) {
    (void)mem, (void)c, (void)max_batch, (void)threads;
    return 0;
}
static int kernels_matmul(void *kernels, float *const out[], const Matrix *const W[], int count, const float *x, int n) {
    (void)kernels, (void)out, (void)W, (void)count, (void)x, (void)n;
    return 0;
}
#endif
#ifndef HAVE_KERNELS_ATTENTION
static int kernels_attention(void *kernels, float *out, float *att, size_t ctx, const float *q, const float *kc,
                             const float *vc, int KV, int s0, int span, int len, int hd, int nh, float scale) {
    (void)kernels, (void)out, (void)att, (void)ctx, (void)q, (void)kc, (void)vc, (void)KV, (void)s0, (void)span;
    (void)len, (void)hd, (void)nh, (void)scale;
    return 0;
}
#endif
