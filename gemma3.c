/*
 * gemma3.c — Gemma 3 text model inference in one file of plain C.
 *
 * Reads a model file written by export.py (format: FORMAT.md), runs the Gemma 3
 * transformer exactly as Google's reference implementation (gemma_pytorch, float32)
 * does, and samples text. Sections, top to bottom:
 *
 *   1. model file: Config, Weights, loading and validation
 *   2. neural-net blocks: rmsnorm, matmul, rope, attention, gelu, forward
 *   2b. the image path (4B+): resize, the SigLIP vision tower, the projector
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
 * targets them; the model code calls them through kernels_matmul, kernels_attention and
 * kernels_attention_unmasked, which say whether they did the work, and the plain loops here
 * run otherwise. The tests hold every kernel to these loops.
 *
 * Dependencies: libc, libm, optionally OpenMP. Build: make (the program), make lib (the
 * library: libgemma3.a, libgemma3.so; API in gemma3.h). Usage: ./gemma3 --help.
 */
#if !defined(_WIN32) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L
#define _DEFAULT_SOURCE /* glibc: also declare MADV_HUGEPAGE (used where it exists) */
#if defined(__linux__)
#define _GNU_SOURCE /* O_TMPFILE (used where it exists) */
#endif
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
#if !defined(GEMMA3_NO_MMAP) || !defined(GEMMA3_NO_MAIN) /* mmap; the command line is a POSIX program */
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
    int has_vision;        /* 1: the file has the image path (4B+), in vision and Weights.vision */
    struct VisionConfig {  /* the image path's sizes (HF vision_config and Gemma3Config names) */
        int image_size;    /* image_size: the square every image is resized to (896) */
        int patch_size;    /* patch_size (14): the tower sees (image_size / patch_size)^2 patches */
        int channels;      /* num_channels (3) */
        int dim;           /* hidden_size of the tower (1152) */
        int hidden_dim;    /* intermediate_size, its MLP width (4304) */
        int n_layers;      /* num_hidden_layers (27) */
        int n_heads;       /* num_attention_heads (16; head_dim = dim / n_heads, 72) */
        int mm_tokens;     /* mm_tokens_per_image (256): soft tokens an image becomes */
        int image_id, boi_id, eoi_id; /* <image_soft_token>, <start_of_image>, <end_of_image> */
        float norm_eps;    /* layer_norm_eps: the LayerNorms and the projector's RMSNorm */
        float mean[3], std[3]; /* pixel normalization: (p / 255 - mean) / std per channel */
        int side;          /* derived: image_size / patch_size patches a side */
        int n_patches;     /* derived: side * side */
    } vision;
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

/* The vision tower's layers (SigLIP encoder, HF vision_tower.encoder.layers.N.*): pre-norm
 * LayerNorms with bias, attention and MLP with biases. D = vision.dim, F = vision.hidden_dim. */
typedef struct {
    const float *ln1_w, *ln1_b;  /* layer_norm1.weight, .bias (D) */
    Matrix wq, wk, wv, wo;       /* self_attn.q_proj, k_proj, v_proj, out_proj (D, D) */
    const float *bq, *bk, *bv, *bo; /* their biases (D) */
    const float *ln2_w, *ln2_b;  /* layer_norm2.weight, .bias (D) */
    Matrix fc1;                  /* mlp.fc1 (F, D) */
    const float *b1;             /* mlp.fc1.bias (F) */
    Matrix fc2;                  /* mlp.fc2 (D, F) */
    const float *b2;             /* mlp.fc2.bias (D) */
} VisionLayerWeights;

/* The tower (HF vision_tower.*) and the projector (multi_modal_projector.*). */
typedef struct {
    Matrix patch;          /* embeddings.patch_embedding (D, channels * patch^2): the conv as a matmul */
    const float *patch_bias; /* embeddings.patch_embedding.bias (D) */
    Matrix position;       /* embeddings.position_embedding (n_patches, D), learned */
    VisionLayerWeights *layers; /* (vision.n_layers) */
    const float *post_norm_w, *post_norm_b; /* post_layernorm (D) */
    const float *mm_norm;  /* multi_modal_projector.mm_soft_emb_norm (D): RMSNorm x (1 + w) */
    Matrix mm_proj;        /* multi_modal_projector.mm_input_projection_weight, stored transposed:
                              (text dim, D) */
} VisionWeights;

typedef struct {
    Matrix embed;          /* embed_tokens (vocab_size, dim) */
    Matrix classifier;     /* lm_head (vocab_size, dim): the embedding table itself (tied), unless
                              the file has its own lm_head.weight (from a GGUF's output.weight) */
    LayerWeights *layers;  /* (n_layers) */
    const float *final_norm; /* norm.weight (dim) */
    VisionWeights vision;  /* the image path, if config.has_vision */
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
    if (memcmp(h, "GGUF", 4) == 0) {
        set_err(err, errsize, "%s is a GGUF file: convert it first with python3 export.py %s OUT.bin --dtype q8_0", path,
                path);
        return GEMMA3_E_FORMAT;
    }
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

/* The names of the vision tower and projector (16 a layer, 7 more), and how many. */
static const char *const vision_layer_tensors[] = {
    "layer_norm1.weight", "layer_norm1.bias", "self_attn.q_proj.weight", "self_attn.q_proj.bias",
    "self_attn.k_proj.weight", "self_attn.k_proj.bias", "self_attn.v_proj.weight", "self_attn.v_proj.bias",
    "self_attn.out_proj.weight", "self_attn.out_proj.bias", "layer_norm2.weight", "layer_norm2.bias",
    "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias", NULL};
static const char *const vision_other_tensors[] = {
    "vision_tower.embeddings.patch_embedding.weight", "vision_tower.embeddings.patch_embedding.bias",
    "vision_tower.embeddings.position_embedding.weight", "vision_tower.post_layernorm.weight",
    "vision_tower.post_layernorm.bias", "multi_modal_projector.mm_soft_emb_norm.weight",
    "multi_modal_projector.mm_input_projection_weight", NULL};
#define VISION_TENSORS(n_layers) (7u + 16u * (uint32_t)(n_layers))

static int known_vision_name(const char *name, int n_layers) {
    if (memchr(name, 0, 64) == NULL) return 0;
    for (int i = 0; vision_other_tensors[i]; i++)
        if (!strcmp(name, vision_other_tensors[i])) return 1;
    int layer, used = 0;
    if (sscanf(name, "vision_tower.encoder.layers.%d.%n", &layer, &used) != 1 || used == 0 || layer < 0 ||
        layer >= n_layers)
        return 0;
    for (int i = 0; vision_layer_tensors[i]; i++)
        if (!strcmp(name + used, vision_layer_tensors[i])) return 1;
    return 0;
}

/* The vision section (FORMAT.md), where the header's offset 120 points (0: a text model):
 * the image path's sizes into c->vision, each checked. */
static int read_vision_section(Model *m, const char *path, char *err, size_t errsize) {
    Config *c = &m->config;
    struct VisionConfig *v = &c->vision;
    uint64_t off = rd_u64(m->data + 120);
    if (off == 0) return 0;
    if (off % 8 != 0 || off > m->size || m->size - off < 80) {
        set_err(err, errsize, "%s: the vision section lies outside the file (corrupt header)", path);
        return GEMMA3_E_FORMAT;
    }
    const unsigned char *p = m->data + off;
    uint32_t u[11];
    for (int i = 0; i < 11; i++) {
        u[i] = rd_u32(p + 4 * i);
        if (u[i] == 0 || u[i] > (1u << 24)) {
            set_err(err, errsize, "%s: vision field %d has implausible value %u", path, i, u[i]);
            return GEMMA3_E_FORMAT;
        }
    }
    v->image_size = (int)u[0], v->patch_size = (int)u[1], v->channels = (int)u[2], v->dim = (int)u[3];
    v->hidden_dim = (int)u[4], v->n_layers = (int)u[5], v->n_heads = (int)u[6], v->mm_tokens = (int)u[7];
    v->image_id = (int)u[8], v->boi_id = (int)u[9], v->eoi_id = (int)u[10];
    v->norm_eps = rd_f32(p + 44);
    int ok = v->norm_eps >= 0 && v->norm_eps < 1;
    for (int i = 0; i < 3; i++) {
        v->mean[i] = rd_f32(p + 48 + 4 * i), v->std[i] = rd_f32(p + 60 + 4 * i);
        ok &= fabsf(v->mean[i]) < 1e3f && v->std[i] > 1e-6f && v->std[i] < 1e3f;
    }
    v->side = v->image_size / v->patch_size;
    int pooled = (int)(sqrt((double)v->mm_tokens) + 0.5);
    if (!ok || v->channels != 3 || v->image_size % v->patch_size != 0 || v->side > 4096 ||
        v->dim % v->n_heads != 0 || pooled * pooled != v->mm_tokens || v->side % pooled != 0) {
        set_err(err, errsize, "%s: inconsistent vision parameters (image %d, patch %d, channels %d, hidden %d, "
                "heads %d, %d tokens an image)", path, v->image_size, v->patch_size, v->channels, v->dim,
                v->n_heads, v->mm_tokens);
        return GEMMA3_E_FORMAT;
    }
    v->n_patches = v->side * v->side;
    if (u[8] >= (uint32_t)c->vocab_size || u[9] >= (uint32_t)c->vocab_size || u[10] >= (uint32_t)c->vocab_size) {
        set_err(err, errsize, "%s: image token ids out of range (image %u, <start_of_image> %u, <end_of_image> %u; "
                "the vocabulary has %d)", path, u[8], u[9], u[10], c->vocab_size);
        return GEMMA3_E_FORMAT;
    }
    c->has_vision = 1;
    return 0;
}

/* The tower's and projector's weights, checked like the text model's. */
static int load_vision_weights(Model *m, char *err, size_t errsize) {
    const struct VisionConfig *v = &m->config.vision;
    VisionWeights *w = &m->weights.vision;
    const int D = v->dim, F = v->hidden_dim;
    if (load_matrix(m, &w->patch, "vision_tower.embeddings.patch_embedding.weight", D,
                    v->channels * v->patch_size * v->patch_size, err, errsize) ||
        load_norm(m, &w->patch_bias, "vision_tower.embeddings.patch_embedding.bias", D, err, errsize) ||
        load_matrix(m, &w->position, "vision_tower.embeddings.position_embedding.weight", v->n_patches, D, err, errsize) ||
        load_norm(m, &w->post_norm_w, "vision_tower.post_layernorm.weight", D, err, errsize) ||
        load_norm(m, &w->post_norm_b, "vision_tower.post_layernorm.bias", D, err, errsize) ||
        load_norm(m, &w->mm_norm, "multi_modal_projector.mm_soft_emb_norm.weight", D, err, errsize) ||
        load_matrix(m, &w->mm_proj, "multi_modal_projector.mm_input_projection_weight", m->config.dim, D, err, errsize))
        return GEMMA3_E_FORMAT;
    w->layers = calloc((size_t)v->n_layers, sizeof(VisionLayerWeights));
    if (!w->layers) { set_err(err, errsize, "out of memory"); return GEMMA3_E_NOMEM; }
    for (int l = 0; l < v->n_layers; l++) {
        VisionLayerWeights *L = &w->layers[l];
        char name[96]; /* (a name over 63 bytes is in no directory: find_tensor says it is missing) */
#define NAME(s) (snprintf(name, sizeof name, "vision_tower.encoder.layers.%d.%s", l, s), name)
        if (load_norm(m, &L->ln1_w, NAME("layer_norm1.weight"), D, err, errsize) ||
            load_norm(m, &L->ln1_b, NAME("layer_norm1.bias"), D, err, errsize) ||
            load_matrix(m, &L->wq, NAME("self_attn.q_proj.weight"), D, D, err, errsize) ||
            load_norm(m, &L->bq, NAME("self_attn.q_proj.bias"), D, err, errsize) ||
            load_matrix(m, &L->wk, NAME("self_attn.k_proj.weight"), D, D, err, errsize) ||
            load_norm(m, &L->bk, NAME("self_attn.k_proj.bias"), D, err, errsize) ||
            load_matrix(m, &L->wv, NAME("self_attn.v_proj.weight"), D, D, err, errsize) ||
            load_norm(m, &L->bv, NAME("self_attn.v_proj.bias"), D, err, errsize) ||
            load_matrix(m, &L->wo, NAME("self_attn.out_proj.weight"), D, D, err, errsize) ||
            load_norm(m, &L->bo, NAME("self_attn.out_proj.bias"), D, err, errsize) ||
            load_norm(m, &L->ln2_w, NAME("layer_norm2.weight"), D, err, errsize) ||
            load_norm(m, &L->ln2_b, NAME("layer_norm2.bias"), D, err, errsize) ||
            load_matrix(m, &L->fc1, NAME("mlp.fc1.weight"), F, D, err, errsize) ||
            load_norm(m, &L->b1, NAME("mlp.fc1.bias"), F, err, errsize) ||
            load_matrix(m, &L->fc2, NAME("mlp.fc2.weight"), D, F, err, errsize) ||
            load_norm(m, &L->b2, NAME("mlp.fc2.bias"), D, err, errsize))
            return GEMMA3_E_FORMAT;
#undef NAME
    }
    return 0;
}

/* The tensor directory: every entry must name a tensor of a Gemma 3 text model (or of its
 * image path, if the file has one), and all of them must be there. Sets *untied if the
 * file has its own classifier (lm_head.weight). */
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
        if (!known_tensor_name(name, c->n_layers) && !(c->has_vision && known_vision_name(name, c->vision.n_layers))) {
            char shown[4 * 64 + 1];
            set_err(err, errsize, "%s: unknown tensor '%s' in the model file", path,
                    printable((const unsigned char *)name, 64, shown));
            return GEMMA3_E_FORMAT;
        }
        *untied |= !strcmp(name, "lm_head.weight");
    }
    uint32_t expected = 2 + (uint32_t)*untied + 13u * (uint32_t)c->n_layers +
                        (c->has_vision ? VISION_TENSORS(c->vision.n_layers) : 0);
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
    if ((rc = read_header(m, name, err, errsize)) || (rc = read_vision_section(m, name, err, errsize)) ||
        (rc = check_directory(m, name, &untied, err, errsize)))
        return rc;
    if (host_is_big_endian()) swap_tensors_to_native(m); /* (m->data is writable there: ours) */
    if ((rc = load_weights(m, untied, err, errsize))) return rc;
    if (m->config.has_vision && (rc = load_vision_weights(m, err, errsize))) return rc;
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
    free(m->weights.vision.layers);
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
    int image_block;  /* 1: the batch is one image's soft tokens, which see each other both ways */
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
 * none) and lays it out at mem (unmasked_n: the tokens of the image tower's attention, in
 * heads of c->head_dim; 0 for the text model); the others say whether they did the call
 * (1), or left it to the plain loops that follow here (0). */
static size_t kernels_setup(void *mem, const Config *c, int max_batch, int threads, int unmasked_n);
static int kernels_matmul(void *kernels, float *const out[], const Matrix *const W[], int count, const float *x, int n);
static int kernels_attention(void *kernels, float *out, float *att, size_t ctx, const float *q, const float *kc,
                             const float *vc, int KV, int s0, int span, int len, int hd, int nh, float scale);
static int kernels_attention_unmasked(void *kernels, float *out, const float *q, const float *k, const float *v, int n,
                                      int D, int hd, float scale);

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
    size_t kernel_bytes = kernels_setup(NULL, c, max_batch, s->threads, 0);
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
    if (s->kernels) kernels_setup(s->kernels, c, max_batch, s->threads, 0);
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
        /* Sliding layers see keys j with pos - window < j <= pos; global layers all j <= pos.
         * An image's tokens also see the later ones of their image (the batch): as
         * transformers 5 masks them, AND(sliding window, OR(causal, same image)). */
        int first = c->is_global[l] ? 0 : pos - c->window + 1;
        if (first < 0) first = 0;
        int last = s->image_block ? pos0 + n - 1 : pos, span = last - first + 1;
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

    /* token embeddings, scaled by sqrt(hidden_size) computed in float32 (tokens NULL: the
     * caller has put an image's soft tokens in s->x, which are not scaled) */
    float normalizer = (float)sqrt((double)D);
    for (int t = 0; tokens && t < n; t++) {
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
/* 2b. the image path (4B+): resize, the SigLIP vision tower, the projector   */
/* ------------------------------------------------------------------------- */

/* An image becomes image_size x image_size pixels, cut into patch_size squares: N patches.
 * The tower (HF SiglipVisionTransformer) embeds each patch (the convolution is a matmul
 * over the patches' pixels), adds a learned position embedding, and runs num_hidden_layers
 * pre-norm encoder layers in which every patch attends to every other; a final LayerNorm.
 * The projector (HF Gemma3MultiModalProjector) averages k x k squares of patches into
 * mm_tokens_per_image tokens, RMSNorms them (x (1 + w)) and projects them to the text
 * width. Those soft tokens take the places of the image tokens in the prompt, where they
 * attend to each other both ways (attention's image_block). Every size is from the file. */

#define VISION_BATCH 256      /* patches a matmul takes at a time (the activations' scratch) */
#define MAX_IMAGE_SIDE 8192   /* the widest or tallest image gemma3 resizes */
#define RESIZE_BITS 22        /* fixed-point resize weights, as Pillow's (32 - 8 - 2) */

/* Everything the image path needs, allocated once with the session (vision_state_layout);
 * D, F the tower's widths, N its patches, S the image size, T mm_tokens_per_image. */
typedef struct {
    float *pixels;     /* (3, S, S) the image, resized and normalized */
    float *x;          /* (N, D) the tower's residual stream; its output at the end */
    float *xb;         /* (N, max(D, 3 P P)) normed input of a sub-block; the patches at the start */
    float *q, *k, *v;  /* (N, D) */
    float *att_out;    /* (N, D) attention output before out_proj */
    float *hb;         /* (N, F) MLP hidden */
    float *att;        /* (threads, N) each thread's attention scores */
    float *pooled;     /* (T, D) the pooled patches */
    float *soft;       /* (T, text dim) the image's soft tokens */
    int32_t *coef_x, *coef_y; /* (S, taps) resize weights per output column / row */
    int *first_x, *first_y;   /* (S) the first input column / row each output one reads */
    int *taps_x, *taps_y;     /* (S) how many it reads */
    int64_t *acc;      /* (S, 3) a resized output row, before rounding */
    unsigned char *row;/* (S, 3) one input row resized across, rounded to 8 bits as Pillow does */
    int max_taps;      /* room in coef_* per output pixel */
    RunState mm;       /* only the matmul scratch (xq; kernels, with the attention's) sized for the tower */
} VisionState;

/* The tower's widths as a Config, for sizing the kernels' scratch (kernels_setup reads dim,
 * hidden_dim, n_heads * head_dim: the widest row a matmul of the image path multiplies;
 * head_dim: the attention's heads). */
static Config vision_widths(const Config *c) {
    const struct VisionConfig *v = &c->vision;
    Config w;
    memset(&w, 0, sizeof w);
    int patch = v->channels * v->patch_size * v->patch_size;
    w.dim = v->dim;
    w.hidden_dim = v->hidden_dim > patch ? v->hidden_dim : patch;
    w.n_heads = v->n_heads, w.head_dim = v->dim / v->n_heads;
    return w;
}

/* Most input pixels one output pixel of the resize reads: bilinear's support is one
 * input pixel either side when enlarging, in / S when shrinking. */
static int resize_max_taps(int S) { return 2 * ((MAX_IMAGE_SIDE + S - 1) / S) + 3; }

/* Lay out a vision state in the block at base (64-byte aligned), or with base NULL only
 * add up its size. */
static size_t vision_state_layout(VisionState *vs, const Config *c, unsigned char *base) {
    const struct VisionConfig *v = &c->vision;
    memset(vs, 0, sizeof(*vs));
    Config w = vision_widths(c);
    size_t N = (size_t)v->n_patches, D = (size_t)v->dim, F = (size_t)v->hidden_dim, S = (size_t)v->image_size;
    size_t T = (size_t)v->mm_tokens, widest = (size_t)w.hidden_dim > D ? (size_t)w.hidden_dim : D;
    size_t patch = (size_t)v->channels * v->patch_size * v->patch_size, B = N < VISION_BATCH ? N : VISION_BATCH;
    int threads = max_threads();
    size_t kernel_bytes = kernels_setup(NULL, &w, (int)B, threads, (int)N);
    Carve cv = {base, 0};
    vs->max_taps = resize_max_taps(v->image_size);
    vs->pixels = carve(&cv, 3 * S * S, sizeof(float));
    vs->x = carve(&cv, N * D, sizeof(float));
    vs->xb = carve(&cv, N * (patch > D ? patch : D), sizeof(float));
    vs->q = carve(&cv, N * D, sizeof(float));
    vs->k = carve(&cv, N * D, sizeof(float));
    vs->v = carve(&cv, N * D, sizeof(float));
    vs->att_out = carve(&cv, N * D, sizeof(float));
    vs->hb = carve(&cv, N * F, sizeof(float));
    vs->att = carve(&cv, (size_t)threads * N, sizeof(float));
    vs->pooled = carve(&cv, T * D, sizeof(float));
    vs->soft = carve(&cv, T * (size_t)c->dim, sizeof(float));
    vs->coef_x = carve(&cv, S * (size_t)vs->max_taps, sizeof(int32_t));
    vs->coef_y = carve(&cv, S * (size_t)vs->max_taps, sizeof(int32_t));
    vs->first_x = carve(&cv, S, sizeof(int));
    vs->first_y = carve(&cv, S, sizeof(int));
    vs->taps_x = carve(&cv, S, sizeof(int));
    vs->taps_y = carve(&cv, S, sizeof(int));
    vs->acc = carve(&cv, S * 3, sizeof(int64_t));
    vs->row = carve(&cv, S * 3, 1);
    vs->mm.threads = threads;
    vs->mm.max_batch = (int)B;
    vs->mm.xq = carve(&cv, B * widest, 1);
    vs->mm.xq_scale = carve(&cv, B * (widest / 32 + 1), sizeof(float));
    vs->mm.xq_sum = carve(&cv, B * (widest / 32 + 1), sizeof(int32_t));
    vs->mm.kernels = kernel_bytes ? carve(&cv, kernel_bytes, 1) : NULL;
    if (base && vs->mm.kernels) kernels_setup(vs->mm.kernels, &w, (int)B, threads, (int)N);
    return cv.used;
}

static size_t vision_state_bytes(const Config *c) {
    VisionState sizing;
    return vision_state_layout(&sizing, c, NULL);
}

/* ---- resize: as transformers' Gemma3ImageProcessor (torchvision's antialiased bilinear
 * on 8-bit pixels, which follows Pillow's: separable, across then down, each pass rounded
 * to 8 bits) ---- */

/* The fixed-point weights by which output pixels 0..out-1 read input pixels 0..in-1:
 * output i reads taps[i] inputs from first[i], weight coef[i * max_taps + j] / 2^22
 * (Pillow's precompute_coeffs: a triangle as wide as the scale when shrinking). */
static void resize_coefficients(int in, int out, int max_taps, int32_t *coef, int *first, int *taps) {
    double scale = (double)in / out, filterscale = scale < 1.0 ? 1.0 : scale;
    for (int i = 0; i < out; i++) {
        double center = (i + 0.5) * scale, sum = 0.0;
        int lo = (int)(center - filterscale + 0.5), hi = (int)(center + filterscale + 0.5);
        if (lo < 0) lo = 0;
        if (hi > in) hi = in;
        if (hi - lo > max_taps) hi = lo + max_taps; /* (never, for in <= MAX_IMAGE_SIDE) */
        for (int j = lo; j < hi; j++) {
            double t = fabs((j - center + 0.5) / filterscale);
            sum += t < 1.0 ? 1.0 - t : 0.0;
        }
        first[i] = lo, taps[i] = hi - lo;
        for (int j = lo; j < hi; j++) {
            double t = fabs((j - center + 0.5) / filterscale), k = (t < 1.0 ? 1.0 - t : 0.0) / sum;
            coef[(size_t)i * max_taps + (j - lo)] = (int32_t)floor(k * (1 << RESIZE_BITS) + 0.5);
        }
    }
}

/* A fixed-point sum back to 8 bits: rounded, clamped to 0..255. */
static unsigned char clip8(int64_t acc) {
    int64_t v = (acc + (1 << (RESIZE_BITS - 1))) / (1 << RESIZE_BITS); /* acc >= 0: weights are */
    return (unsigned char)(v > 255 ? 255 : v);
}

/* Resize an image (w x h, channels 1 or 3, 8-bit, row by row) to S x S and normalize it
 * into vs->pixels, (3, S, S): (p - 255 mean) / (255 std), the processor's rescale and
 * normalize in one step. A gray image is the same in all three channels. Each output row
 * resizes the input rows it reads across first, so no image-sized buffer is needed. */
static void resize_image(VisionState *vs, const struct VisionConfig *v, const unsigned char *px, int w, int h, int ch) {
    const int S = v->image_size, T = vs->max_taps;
    resize_coefficients(w, S, T, vs->coef_x, vs->first_x, vs->taps_x);
    resize_coefficients(h, S, T, vs->coef_y, vs->first_y, vs->taps_y);
    for (int oy = 0; oy < S; oy++) {
        memset(vs->acc, 0, (size_t)S * 3 * sizeof(int64_t));
        for (int j = 0; j < vs->taps_y[oy]; j++) {
            const unsigned char *in = px + (size_t)(vs->first_y[oy] + j) * w * ch;
            for (int ox = 0; ox < S; ox++) { /* across, rounded to 8 bits */
                const unsigned char *p = in + (size_t)vs->first_x[ox] * ch;
                const int32_t *k = vs->coef_x + (size_t)ox * T;
                for (int c = 0; c < ch; c++) {
                    int64_t a = 0;
                    for (int i = 0; i < vs->taps_x[ox]; i++) a += (int64_t)p[(size_t)i * ch + c] * k[i];
                    vs->row[ox * 3 + c] = clip8(a);
                }
            }
            int64_t wy = vs->coef_y[(size_t)oy * T + j];
            for (int ox = 0; ox < S; ox++)
                for (int c = 0; c < ch; c++) vs->acc[ox * 3 + c] += vs->row[ox * 3 + c] * wy;
        }
        for (int c = 0; c < 3; c++) {
            float mean = v->mean[c] * 255.0f, std = v->std[c] * 255.0f;
            float *out = vs->pixels + ((size_t)c * S + oy) * S;
            for (int ox = 0; ox < S; ox++) out[ox] = ((float)clip8(vs->acc[ox * 3 + (ch == 1 ? 0 : c)]) - mean) / std;
        }
    }
}

/* ---- the tower and the projector ---- */

/* SigLIP's LayerNorm: (x - mean) / sqrt(var + eps) * w + b, the statistics in double. */
static void layernorm(float *out, const float *x, const float *w, const float *b, int n, float eps) {
    double sum = 0.0, sq = 0.0;
    for (int i = 0; i < n; i++) sum += x[i];
    double mean = sum / n;
    for (int i = 0; i < n; i++) sq += (x[i] - mean) * (x[i] - mean);
    float m = (float)mean, scale = (float)(1.0 / sqrt(sq / n + eps));
    for (int i = 0; i < n; i++) out[i] = (x[i] - m) * scale * w[i] + b[i];
}

/* out = x W^T + b for the n rows of x (VISION_BATCH rows a matmul). All threads of the
 * team call it. */
static void vision_linear(float *out, const float *x, int n, const Matrix *W, const float *b, RunState *mm) {
    for (int r = 0; r < n; r += mm->max_batch) {
        int nb = n - r < mm->max_batch ? n - r : mm->max_batch;
        matmul(out + (size_t)r * W->rows, x + (size_t)r * W->cols, nb, W, mm);
    }
    if (!b) return;
    FOR
    for (int t = 0; t < n; t++)
        for (int i = 0; i < W->rows; i++) out[(size_t)t * W->rows + i] += b[i];
}

/* Every patch attends to every patch, per head: softmax(q k^T / sqrt(head_dim)) v. The
 * fast kernels where the build has them, else these loops. */
static void vision_attention(VisionState *vs, const struct VisionConfig *v) {
    const int N = v->n_patches, D = v->dim, hd = v->dim / v->n_heads;
    const float scale = 1.0f / sqrtf((float)hd);
    if (kernels_attention_unmasked(vs->mm.kernels, vs->att_out, vs->q, vs->k, vs->v, N, D, hd, scale)) return;
    int job;
    FOR
    for (job = 0; job < N * v->n_heads; job++) { /* head-major: a thread's queries of one head share its keys in cache */
        int h = job / N, i = job % N;
        float *att = vs->att + (size_t)THREAD_NUM() * N;
        const float *q = vs->q + (size_t)i * D + h * hd;
        for (int j = 0; j < N; j++) att[j] = dot_f32(vs->k + (size_t)j * D + h * hd, q, hd) * scale;
        softmax(att, N);
        float *restrict out = vs->att_out + (size_t)i * D + h * hd;
        memset(out, 0, (size_t)hd * sizeof(float));
        for (int j = 0; j < N; j++) {
            const float *restrict val = vs->v + (size_t)j * D + h * hd;
            for (int e = 0; e < hd; e++) out[e] += att[j] * val[e];
        }
    }
}

/* One encoder layer (HF SiglipEncoderLayer) on the N patches in vs->x. */
static void vision_layer(const struct VisionConfig *v, const VisionLayerWeights *L, VisionState *vs) {
    const int N = v->n_patches, D = v->dim, F = v->hidden_dim;
    FOR
    for (int t = 0; t < N; t++) layernorm(vs->xb + (size_t)t * D, vs->x + (size_t)t * D, L->ln1_w, L->ln1_b, D, v->norm_eps);
    vision_linear(vs->q, vs->xb, N, &L->wq, L->bq, &vs->mm);
    vision_linear(vs->k, vs->xb, N, &L->wk, L->bk, &vs->mm);
    vision_linear(vs->v, vs->xb, N, &L->wv, L->bv, &vs->mm);
    vision_attention(vs, v);
    vision_linear(vs->q, vs->att_out, N, &L->wo, L->bo, &vs->mm); /* (q is free again) */
    FOR
    for (int t = 0; t < N; t++) {
        float *x = vs->x + (size_t)t * D;
        for (int i = 0; i < D; i++) x[i] += vs->q[(size_t)t * D + i];
        layernorm(vs->xb + (size_t)t * D, x, L->ln2_w, L->ln2_b, D, v->norm_eps);
    }
    vision_linear(vs->hb, vs->xb, N, &L->fc1, L->b1, &vs->mm);
    FOR
    for (size_t i = 0; i < (size_t)N * F; i++) vs->hb[i] = gelu_tanh(vs->hb[i]);
    vision_linear(vs->q, vs->hb, N, &L->fc2, L->b2, &vs->mm);
    FOR
    for (size_t i = 0; i < (size_t)N * D; i++) vs->x[i] += vs->q[i];
}

/* The image in vs->pixels through the tower (its output in vs->x, (N, D)) and the
 * projector (the image's soft tokens in vs->soft, (mm_tokens, text dim)). */
static void encode_image(const Model *m, VisionState *vs) {
    const struct VisionConfig *v = &m->config.vision;
    const VisionWeights *w = &m->weights.vision;
    const int N = v->n_patches, D = v->dim, P = v->patch_size, S = v->image_size, side = v->side;
    const int patch = v->channels * P * P, pooled = (int)(sqrt((double)v->mm_tokens) + 0.5), k = side / pooled;
    PARALLEL_TEAM(vs->mm.threads) {
        /* patch embedding: each patch's pixels in (channel, y, x) order, times the kernel */
        FOR
        for (int p = 0; p < N; p++) {
            float *row = vs->xb + (size_t)p * patch;
            int y0 = p / side * P, x0 = p % side * P;
            for (int c = 0; c < v->channels; c++)
                for (int y = 0; y < P; y++)
                    memcpy(row + (c * P + y) * P, vs->pixels + ((size_t)c * S + y0 + y) * S + x0, (size_t)P * sizeof(float));
        }
        vision_linear(vs->q, vs->xb, N, &w->patch, w->patch_bias, &vs->mm);
        FOR
        for (int p = 0; p < N; p++) { /* + the learned position embedding */
            float *x = vs->x + (size_t)p * D;
            matrix_row(x, &w->position, p);
            for (int i = 0; i < D; i++) x[i] += vs->q[(size_t)p * D + i];
        }
        for (int l = 0; l < v->n_layers; l++) vision_layer(v, &w->layers[l], vs);
        FOR
        for (int p = 0; p < N; p++) layernorm(vs->x + (size_t)p * D, vs->x + (size_t)p * D, w->post_norm_w, w->post_norm_b, D, v->norm_eps);

        /* projector: k x k average pooling, RMSNorm (1 + w), projection to the text width */
        FOR
        for (int t = 0; t < v->mm_tokens; t++) {
            float *out = vs->pooled + (size_t)t * D;
            int ty = t / pooled, tx = t % pooled;
            memset(out, 0, (size_t)D * sizeof(float));
            for (int dy = 0; dy < k; dy++)
                for (int dx = 0; dx < k; dx++) {
                    const float *x = vs->x + ((size_t)(ty * k + dy) * side + tx * k + dx) * D;
                    for (int i = 0; i < D; i++) out[i] += x[i];
                }
            for (int i = 0; i < D; i++) out[i] /= (float)(k * k);
            rmsnorm(out, out, w->mm_norm, D, v->norm_eps);
        }
        vision_linear(vs->soft, vs->pooled, v->mm_tokens, &w->mm_proj, NULL, &vs->mm);
    }
}

/* Feed an image's n soft tokens (rows of emb) at positions pos0.. as one block: they see
 * each other both ways, as transformers masks one image's tokens. n <= s->max_batch. */
static float *forward_image_tokens(const Model *m, RunState *s, const float *emb, int n, int pos0) {
    memcpy(s->x, emb, (size_t)n * m->config.dim * sizeof(float));
    s->image_block = 1;
    float *logits = forward_batch(m, s, NULL, n, pos0, 1);
    s->image_block = 0;
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

/* check_ids for ids fed as text: in a model with the image path, the image token stands
 * for an image's soft tokens and only gemma3_feed_image (--image) feeds it. */
static int check_text_ids(const Model *m, const int *ids, int n, char *err, size_t errsize) {
    if (check_ids(m, ids, n, err, errsize) != 0) return -1;
    for (int i = 0; m->config.has_vision && i < n; i++)
        if (ids[i] == m->config.vision.image_id) {
            set_err(err, errsize, "token %d (at %d) is the image token <image_soft_token>, which stands for an image's "
                    "soft tokens: give the image instead (--image, gemma3_feed_image)", ids[i], i);
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
    VisionState *vision; /* a session with images: every <start_of_image> of the conversation
                            stands for an image (chat_turn expands it); NULL: text only */
    const gemma3_image *images; /* the images of the message chat_turn adds, in order */
    int n_images;
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

/* text[0..len) with every <start_of_image> expanded as transformers' Gemma3Processor
 * expands it: "\n\n<start_of_image>", `tokens` x "<image_soft_token>", "<end_of_image>\n\n".
 * A malloc'd, NUL-terminated string (its length in *out_len), or NULL: out of memory. */
static char *expand_image_markers(const char *text, size_t len, int tokens, size_t *out_len) {
    static const char boi[] = "<start_of_image>", soft[] = "<image_soft_token>", eoi[] = "<end_of_image>";
    const size_t kb = sizeof boi - 1, ks = sizeof soft - 1, ke = sizeof eoi - 1, one = 2 + kb + tokens * ks + ke + 2;
    size_t markers = 0;
    for (size_t i = 0; i + kb <= len; i++) markers += !memcmp(text + i, boi, kb);
    char *out = malloc(len + markers * one + 1), *q = out;
    if (!out) return NULL;
    for (size_t i = 0; i < len;) {
        if (len - i >= kb && !memcmp(text + i, boi, kb)) {
            memcpy(q, "\n\n", 2), q += 2;
            memcpy(q, boi, kb), q += kb;
            for (int t = 0; t < tokens; t++) memcpy(q, soft, ks), q += ks;
            memcpy(q, eoi, ke), q += ke;
            memcpy(q, "\n\n", 2), q += 2;
            i += kb;
        } else {
            *q++ = text[i++];
        }
    }
    *q = 0;
    *out_len = (size_t)(q - out);
    return out;
}

/* The ids a chat turn is to feed, ids[keep..n), hold exactly the new message's images: each
 * a whole run of image tokens. 0, or -1 and a message. */
static int check_chat_images(const Config *c, const Chat *ch, const int *ids, int keep, int n, char *err, size_t errsize) {
    int runs = 0, T = c->vision.mm_tokens, id = c->vision.image_id;
    if (keep > 0 && keep < n && ids[keep] == id && ids[keep - 1] == id) runs = -1; /* starts inside an image */
    for (int t = keep; runs >= 0 && t < n;) {
        int len = 0;
        while (t + len < n && ids[t + len] == id) len++;
        if (len && len != T) runs = -1;
        else runs += len > 0;
        t += len ? len : 1;
    }
    if (runs == ch->n_images) return 0;
    set_err(err, errsize, runs >= 0 && runs < ch->n_images
            ? "the message has fewer <start_of_image> than images"
            : "the cache no longer holds the conversation's earlier images, or the message has more <start_of_image> "
              "than images (a new session can take it)");
    return -1;
}

/* feed_pending for a conversation with images: runs of image tokens are the chat's new
 * images, in order (check_chat_images made sure), the rest text. */
static float *feed_pending_images(const Model *m, RunState *s, Chat *ch) {
    const struct VisionConfig *v = &m->config.vision;
    float *logits = NULL;
    int image = 0;
    for (int t = ch->n_cached; t < ch->n_hist;) {
        int len = 0, is_image = ch->hist[t] == v->image_id;
        while (t + len < ch->n_hist && (ch->hist[t + len] == v->image_id) == is_image) len++;
        if (is_image) {
            const gemma3_image *img = &ch->images[image++];
            resize_image(ch->vision, v, img->pixels, img->width, img->height, img->channels);
            encode_image(m, ch->vision);
            logits = forward_image_tokens(m, s, ch->vision->soft, len, t);
        } else {
            logits = forward_tokens(m, s, ch->hist + t, len, t);
        }
        t += len;
    }
    ch->n_cached = ch->n_hist;
    return logits;
}

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
    size_t text_len;
    int *ids = NULL, n = chat_render(ch->msgs, ch->n_msgs, 1, &text, err, errsize);
    if (n == 0) text_len = strlen(text);
    if (n == 0 && ch->vision) { /* images: the processor's expansion of every <start_of_image> */
        char *expanded = expand_image_markers(text, text_len, c->vision.mm_tokens, &text_len);
        free(text);
        if (!(text = expanded)) { set_err(err, errsize, "out of memory"); n = TOK_NOMEM; }
    }
    if (n == 0) n = tokenizer_encode(&m->tokenizer, text, text_len, &ids, err, errsize);
    free(text);
    if (n < 0) { chat_pop(ch); return tok_error_code(n, GEMMA3_E_TEXT); }
    if ((ch->vision ? check_ids : check_text_ids)(m, ids, n, err, errsize) != 0) { free(ids); chat_pop(ch); return GEMMA3_E_TOKEN; }
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
    if (ch->vision && check_chat_images(c, ch, ids, keep, n, err, errsize) != 0) {
        free(ids);
        chat_pop(ch);
        return GEMMA3_E_STATE;
    }
    memcpy(ch->hist, ids, (size_t)n * sizeof(int));
    free(ids);
    ch->n_hist = ch->prompt_len = n;
    ch->n_cached = keep;
    ch->fed = n - keep;
    float *logits = ch->vision ? feed_pending_images(m, s, ch) : feed_pending(m, s, ch);

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
    VisionState *vision; /* the image path's activations (options.images), or NULL */
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
    if (c->has_vision) {
        k.image_tokens = c->vision.mm_tokens, k.image_size = c->vision.image_size;
        k.image_id = c->vision.image_id, k.boi_id = c->vision.boi_id, k.eoi_id = c->vision.eoi_id;
    }
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
    /* with images a batch takes a whole image: its tokens attend to each other */
    int images = o->images && c->has_vision, batch = images && c->vision.mm_tokens > PREFILL_BATCH ? c->vision.mm_tokens
                                                                                                 : PREFILL_BATCH;
    Carve cv = {base, 0};
    gemma3_session *S = carve(&cv, 1, sizeof(gemma3_session));
    void *rs = carve(&cv, run_state_bytes(c, ctx, batch, 0), 1);
    VisionState *vs = images ? carve(&cv, 1, sizeof(VisionState)) : NULL;
    void *vmem = images ? carve(&cv, vision_state_bytes(c), 1) : NULL;
    ProbIndex *cand = carve(&cv, (size_t)c->vocab_size, sizeof(ProbIndex));
    int *hist = carve(&cv, (size_t)ctx, sizeof(int));
    char *piece = carve(&cv, piece_cap, 1);
    char *sys = carve(&cv, sys_len, 1);
    if (!base) return cv.used;
    memset(S, 0, sizeof(*S));
    S->model = m;
    build_run_state_in(&S->state, c, ctx, batch, 0, rs);
    if (images) {
        vision_state_layout(vs, c, vmem);
        S->vision = S->chat.vision = vs;
    }
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
    size_t bad; /* refused here, not as "message 0" of every turn */
    if (o.system_prompt && !tok_utf8_valid((const unsigned char *)o.system_prompt, strlen(o.system_prompt), &bad))
        return fail(err, GEMMA3_E_TEXT, "the system prompt is not valid UTF-8 (byte %zu)", bad);
    if (o.images && !model->m.config.has_vision)
        return fail(err, GEMMA3_E_ARG, "options.images: the model has no image path (a text model, or exported with "
                    "--text-only)");
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
    if (check_text_ids(S->model, ids, n, msg, sizeof msg) != 0) return fail(err, GEMMA3_E_TOKEN, "%s", msg);
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

int gemma3_feed_image(gemma3_session *session, const gemma3_image *image, float *logits, gemma3_error *err) {
    gemma3_session *S = session;
    if (!S || !image) return fail(err, GEMMA3_E_ARG, "gemma3_feed_image: NULL session or image");
    const Model *m = S->model;
    const Config *c = &m->config;
    if (!c->has_vision)
        return fail(err, GEMMA3_E_ARG, "the model has no image path (a text model, or exported with --text-only)");
    if (!S->vision) return fail(err, GEMMA3_E_ARG, "the session was made without images (options.images)");
    if (!image->pixels || image->width < 1 || image->height < 1 || image->width > MAX_IMAGE_SIDE ||
        image->height > MAX_IMAGE_SIDE || (image->channels != 1 && image->channels != 3))
        return fail(err, GEMMA3_E_ARG, "an image of %d x %d pixels, %d channels: width and height must be in [1, %d], "
                    "channels 1 or 3", image->width, image->height, image->channels, MAX_IMAGE_SIDE);
    const int T = c->vision.mm_tokens, pos = S->chat.n_hist;
    const size_t V = (size_t)c->vocab_size;
    if (T > S->state.ctx - pos)
        return fail(err, GEMMA3_E_CONTEXT, "an image's %d tokens do not fit: %d of the context's %d are used", T, pos,
                    S->state.ctx);
    RunState *s = &S->state;
    feed_pending(m, s, &S->chat); /* a token gemma3_generate left */
    resize_image(S->vision, &c->vision, image->pixels, image->width, image->height, image->channels);
    encode_image(m, S->vision);
    float *own_logits = s->logits;
    if (logits) s->all_logits = 1, s->logits = logits; /* all T rows, straight into the caller's */
    forward_image_tokens(m, s, S->vision->soft, T, pos);
    s->all_logits = 0;
    s->logits = own_logits;
    if (logits) memcpy(own_logits, logits + (size_t)(T - 1) * V, V * sizeof(float));
    for (int i = 0; i < T; i++) S->chat.hist[pos + i] = c->vision.image_id;
    S->chat.n_hist = S->chat.n_cached = pos + T;
    S->logits = own_logits;
    S->owed = 0;
    if (!all_finite(logits ? logits : own_logits, logits ? (size_t)T * V : V))
        return fail(err, GEMMA3_E_NUMERIC, "%s", NOT_NUMBERS);
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
    const Config *c = &S->model->config;
    if (c->has_vision && keep == pos - 1 && S->chat.hist[keep] == c->vision.image_id &&
        (pos == S->chat.n_hist || S->chat.hist[pos] != c->vision.image_id)) {
        /* right after an image: its tokens stay in the cache, but its logits cannot be had again */
        S->chat.n_hist = S->chat.n_cached = pos;
        S->logits = NULL;
        S->owed = 0;
        return pos;
    }
    for (int i = keep; c->has_vision && i < pos; i++)
        if (S->chat.hist[i] == c->vision.image_id)
            return fail(err, GEMMA3_E_STATE, "gemma3_rewind: going back to %d would feed the image at %d again, and "
                        "the session does not keep images (rewind to before it and feed it again)", pos, i);
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

static int chat_turn_session(gemma3_session *S, const char *user_text, size_t len, int max_tokens,
                             gemma3_piece_fn callback, void *user, gemma3_error *err);

int gemma3_chat_turn(gemma3_session *session, const char *user_text, size_t len, int max_tokens,
                     gemma3_piece_fn callback, void *user, gemma3_error *err) {
    return gemma3_chat_turn_images(session, user_text, len, NULL, 0, max_tokens, callback, user, err);
}

/* Where text[0..len) holds `s`: the offset, or -1 (text may hold NUL bytes). */
static long find_text(const char *text, size_t len, const char *s) {
    size_t k = strlen(s);
    for (size_t i = 0; i + k <= len; i++)
        if (!memcmp(text + i, s, k)) return (long)i;
    return -1;
}

/* The number of times text[0..len) holds s. */
static int count_text(const char *text, size_t len, const char *s) {
    int n = 0;
    for (long at = 0, k; (k = find_text(text + at, len - (size_t)at, s)) >= 0; at += k + (long)strlen(s)) n++;
    return n;
}

int gemma3_chat_turn_images(gemma3_session *session, const char *user_text, size_t len, const gemma3_image *images,
                            int n_images, int max_tokens, gemma3_piece_fn callback, void *user, gemma3_error *err) {
    static const char boi[] = "<start_of_image>";
    gemma3_session *S = session;
    if (S && S->vision && len && user_text) { /* the message's images: checked before anything changes */
        if (find_text(user_text, len, "<image_soft_token>") >= 0)
            return fail(err, GEMMA3_E_TOKEN, "the message holds <image_soft_token>, which stands for an image's soft "
                        "tokens: attach the image instead");
        int markers = count_text(user_text, len, boi);
        if (markers && markers != n_images)
            return fail(err, GEMMA3_E_ARG, "the message has %d <start_of_image> and %d images: one each (or none in the "
                        "text: the images go first)", markers, n_images);
    }
    if (n_images && (!S || !S->vision))
        return fail(err, GEMMA3_E_ARG, "images in a chat need a session made with options.images (and a model with the "
                    "image path)");
    for (int i = 0; i < n_images; i++) {
        const gemma3_image *im = &images[i];
        if (!im->pixels || im->width < 1 || im->height < 1 || im->width > MAX_IMAGE_SIDE ||
            im->height > MAX_IMAGE_SIDE || (im->channels != 1 && im->channels != 3))
            return fail(err, GEMMA3_E_ARG, "image %d: %d x %d pixels, %d channels: width and height must be in [1, %d], "
                        "channels 1 or 3", i, im->width, im->height, im->channels, MAX_IMAGE_SIDE);
    }
    char *with_markers = NULL; /* the images ahead of the text, as the chat template puts them */
    if (n_images && (!len || !user_text || count_text(user_text, len, boi) == 0)) {
        while (len && (*user_text == ' ' || *user_text == '\n' || *user_text == '\t' || *user_text == '\r'))
            user_text++, len--;
        size_t kb = sizeof boi - 1;
        if (!(with_markers = malloc((size_t)n_images * kb + len + 1))) return fail(err, GEMMA3_E_NOMEM, "out of memory");
        for (int i = 0; i < n_images; i++) memcpy(with_markers + i * kb, boi, kb);
        if (len) memcpy(with_markers + n_images * kb, user_text, len);
        user_text = with_markers, len += (size_t)n_images * kb;
    }
    if (S) S->chat.images = images, S->chat.n_images = n_images;
    int rc = chat_turn_session(S, user_text, len, max_tokens, callback, user, err);
    if (S) S->chat.images = NULL, S->chat.n_images = 0;
    free(with_markers);
    return rc;
}

/* gemma3_chat_turn's work, once the images are in place. */
static int chat_turn_session(gemma3_session *S, const char *user_text, size_t len, int max_tokens,
                             gemma3_piece_fn callback, void *user, gemma3_error *err) {
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
/* A POSIX program (files, links, FIFOs, signals); the library above needs only C99. */
#ifndef GEMMA3_NO_MAIN

static int isatty_stderr(void) { return isatty(2); /* progress lines only on a terminal */ }

/* The most bytes one text input may hold: a prompt (-p, -f), a --perplexity text, a --chat
 * line, --encode's or --decode's stdin, a --logits token file. They are read in pieces and
 * refused once past it, so that an endless input (a device, a pipe) cannot take all memory. */
#define TEXT_LIMIT_MIB 64
#define TEXT_LIMIT ((size_t)TEXT_LIMIT_MIB << 20)

/* fgetc that gives EOF once *count passes TEXT_LIMIT (then *count > TEXT_LIMIT). */
static int counted_getc(FILE *f, size_t *count) { return ++*count > TEXT_LIMIT ? EOF : fgetc(f); }

/* Read whitespace-separated token ids from a stream (`name` for messages); every id must
 * be < vocab_size. The --logits file and --decode's stdin both come through here. */
static int read_id_stream(FILE *f, const char *name, int vocab_size, int **ids_out, int *n_out, char *err,
                          size_t errsize) {
    int cap = 256, n = 0, *ids = malloc((size_t)cap * sizeof(int)), ch = 0;
    size_t bytes = 0;
    while (ids && ch != EOF) {
        /* one word: decimal digits, ended by white space or the end; anything else is refused
         * (a NUL or a letter inside an id must not pass as part of a number): named by the
         * word where it is printable, else by its byte */
        long v = 0;
        int digits = 0;
        char word[24]; /* its first digits, for the message */
        while ((ch = counted_getc(f, &bytes)) != EOF && isspace(ch)) {}
        int bad = 0; /* a byte that is not a digit: the first that is not printable, else 1 */
        for (; ch != EOF && !isspace(ch); ch = counted_getc(f, &bytes)) {
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
    if (ferror(f) || bytes > TEXT_LIMIT) {
        if (bytes > TEXT_LIMIT) set_err(err, errsize, "%s is larger than %d MiB, the limit for a text input", name, TEXT_LIMIT_MIB);
        else set_err(err, errsize, "cannot read %s: %s", name, strerror(errno));
        free(ids);
        return -1;
    }
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

/* A block scale too large for a half: the largest half, 65504, with the sign that maps the
 * value of largest magnitude to the negative quants (which reach one step further), as long
 * as the quants still reach the block's values at that scale (a Q8_0 GGUF's -128 does). */
#define HALF_MAX_BITS 0x7bff
#define HALF_MAX 65504.0f

/* One row of finite floats to q8_0: per block of 32, d = max|x| / 127 and q = round(x / d);
 * the row's n/32 scales go first, then its quants. Returns the first block whose values are
 * out of q8_0's reach (|x| from 128.5 x 65504 = 8.42e6 on), or -1. */
static int quantize_row_q8_0(unsigned char *out, const float *x, int n) {
    int8_t *q = (int8_t *)(out + 2 * (n / QK));
    for (int b = 0; b < n / QK; b++) {
        float amax = 0.0f, max = 0.0f;
        for (int i = 0; i < QK; i++) amax = fmaxf(amax, fabsf(x[b * QK + i]));
        for (int i = 0; i < QK; i++) if (fabsf(x[b * QK + i]) == amax) max = x[b * QK + i];
        float d = amax / 127.0f;
        uint16_t h = f32_to_f16(d);
        if ((h & 0x7c00) == 0x7c00) h = max > 0.0f ? 0x8000 | HALF_MAX_BITS : HALF_MAX_BITS, d = max > 0.0f ? -HALF_MAX : HALF_MAX;
        float inv = d != 0.0f ? 1.0f / d : 0.0f;
        wr_u16(out + 2 * b, h);
        for (int i = 0; i < QK; i++) {
            long v = lrintf(x[b * QK + i] * inv);
            if (v < -128 || v > 127) return b;
            q[b * QK + i] = (int8_t)v;
        }
    }
    return -1;
}

/* One row of finite floats to q4_0: per block of 32, the value of largest magnitude maps to
 * -8 exactly, d = that value / -8, nibble = clamp(round(x / d) + 8, 0, 15); weights i and
 * i + 16 share byte i (low, high nibble). The row's scales first, then its nibbles. Returns
 * the first block whose values are out of q4_0's reach (|x| from 8.5 x 65504 = 5.57e5 on), or -1. */
static int quantize_row_q4_0(unsigned char *out, const float *x, int n) {
    unsigned char *q = out + 2 * (n / QK);
    for (int b = 0; b < n / QK; b++, q += QK / 2) {
        float max = 0.0f;
        for (int i = 0; i < QK; i++) if (fabsf(x[b * QK + i]) > fabsf(max)) max = x[b * QK + i];
        float d = max / -8.0f;
        uint16_t h = f32_to_f16(d);
        if ((h & 0x7c00) == 0x7c00) h = (uint16_t)(HALF_MAX_BITS | (h & 0x8000)), d = h & 0x8000 ? -HALF_MAX : HALF_MAX;
        float inv = d != 0.0f ? 1.0f / d : 0.0f;
        if (lrintf(max * inv) < -8) return b;
        wr_u16(out + 2 * b, h);
        for (int i = 0; i < QK / 2; i++) {
            int lo = (int)lrintf(x[b * QK + i] * inv) + 8, hi = (int)lrintf(x[b * QK + i + QK / 2] * inv) + 8;
            lo = lo < 0 ? 0 : lo > 15 ? 15 : lo;
            hi = hi < 0 ? 0 : hi > 15 ? 15 : hi;
            q[i] = (unsigned char)(lo | hi << 4);
        }
    }
    return -1;
}

/* Why row r of tensor `name` (r -1: a vector) cannot be quantized, into err (0 if it can): a value that is
 * not a number (it would turn into zeros or an infinite scale unnoticed), or a block out
 * of the type's reach (`block`, from quantize_row_*: its scale would be an infinite half,
 * and every run of the file would fail). */
static int unquantizable_row(const char *name, const float *row, int cols, int r, int block, const char *type,
                             char *err, size_t errsize) {
    if (!all_finite(row, (size_t)cols)) {
        int i = 0;
        while (isfinite(row[i])) i++;
        char where[48] = "";
        if (r >= 0) snprintf(where, sizeof where, " (row %d, column %d)", r, i);
        set_err(err, errsize, "%.64s: element %llu%s is %s: refusing to quantize a broken tensor", name,
                (unsigned long long)(r > 0 ? r : 0) * (unsigned long long)cols + (unsigned long long)i, where,
                isnan(row[i]) ? "NaN" : "infinite");
        return -1;
    }
    if (block >= 0) {
        float amax = 0.0f;
        for (int i = block * QK; i < (block + 1) * QK; i++) amax = fmaxf(amax, fabsf(row[i]));
        set_err(err, errsize, "%.64s: row %d holds %g, out of %s's reach (a half scale: |w| up to %s); "
                "keep this model in bf16 or f32", name, r, amax, type, type[1] == '8' ? "8.42e6" : "5.57e5");
        return -1;
    }
    return 0;
}

/* A matrix of the image path whose rows are not whole blocks of 32 (the 14 x 14 x 3 patch
 * embedding, SigLIP's 4304-wide fc2) keeps its f32 / bf16 type in a quantized file. */
static int keeps_type(const unsigned char *entry, uint32_t cols) {
    return cols % QK != 0 && (!strncmp((const char *)entry, "vision_tower.", 13) ||
                              !strncmp((const char *)entry, "multi_modal_projector.", 22));
}

/* Such a matrix, little-endian whatever the host (in memory it is host order). */
static int write_kept_matrix(FILE *f, const unsigned char *entry, const void *data) {
    uint64_t count = (uint64_t)rd_u32(entry + 72) * rd_u32(entry + 76);
    if (rd_u32(entry + 64) == DT_F32) return write_f32_le(f, data, (int)count);
    const uint16_t *h = data;
    for (uint64_t i = 0; i < count; i++) {
        unsigned char b[2];
        wr_u16(b, h[i]);
        if (fwrite(b, 1, 2, f) != 2) return -1;
    }
    return 0;
}

/* --quantize: write to f (out_name in messages) a copy of model file `m` whose matrices are
 * q8_0 or q4_0 (norms stay f32). Header, layer types and tokenizer are copied byte for byte;
 * the tensor directory gets the new dtypes, sizes and offsets. It writes in order, never
 * seeking (f may be a pipe). export.py --dtype q8_0|q4_0 calls this. */
static int quantize_model(const Model *m, FILE *f, const char *out_name, int dtype, char *err, size_t errsize) {
    const unsigned char *h = m->data;
    uint64_t dir_off = rd_u64(h + 112);
    uint32_t n = rd_u32(h + 88);
    size_t dir_size = (size_t)n * GEMMA3_DIR_ENTRY_SIZE;
    unsigned char *dir = malloc(dir_size);
    int widest = 1; /* the longest row of any matrix */
    for (uint32_t i = 0; i < n; i++) {
        int cols = (int)rd_u32(m->data + dir_off + (size_t)i * GEMMA3_DIR_ENTRY_SIZE + 76);
        if (cols > widest) widest = cols;
    }
    float *row = malloc((size_t)widest * sizeof(float));
    if (!dir || !row) {
        set_err(err, errsize, "out of memory");
        goto fail;
    }
    memcpy(dir, m->data + dir_off, dir_size);
    /* lay out the tensors: same order, 64-byte aligned */
    uint64_t pos = (dir_off + dir_size + 63) / 64 * 64;
    for (uint32_t i = 0; i < n; i++) {
        unsigned char *e = dir + (size_t)i * GEMMA3_DIR_ENTRY_SIZE;
        uint32_t ndim = rd_u32(e + 68), rows = rd_u32(e + 72), cols = rd_u32(e + 76);
        uint64_t nbytes = rd_u64(e + 96);
        if (ndim == 2 && keeps_type(e, cols)) {
            /* stays as it is */
        } else if (ndim == 2) {
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
            if (unquantizable_row((const char *)e, (const float *)src, (int)rd_u32(e + 72), -1, -1, "", err, errsize))
                goto fail;
            if (write_f32_le(f, (const float *)src, (int)rd_u32(e + 72)) != 0) goto write_fail;
            written += rd_u64(e + 96);
            continue;
        }
        if (keeps_type(e, (uint32_t)rd_u32(e + 76))) {
            if (write_kept_matrix(f, e, src) != 0) goto write_fail;
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
            int block = !all_finite(row, (size_t)W->cols) ? -1
                        : dtype == DT_Q8_0 ? quantize_row_q8_0(qrow, row, W->cols) : quantize_row_q4_0(qrow, row, W->cols);
            if (unquantizable_row(name, row, W->cols, r, block, dtype == DT_Q8_0 ? "q8_0" : "q4_0", err, errsize)) {
                free(qrow);
                goto fail;
            }
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
    return 0;
write_fail:
    set_err(err, errsize, "cannot write %s: %s", out_name, strerror(errno));
fail:
    free(dir);
    free(row);
    return -1;
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
        "                       (export.py --dtype q8_0|q4_0 runs this for you); refuses NaN or\n"
        "                       infinite weights and |w| past a block's reach (8.4e6 / 5.6e5)\n"
        "  --encode             read UTF-8 text on stdin, print its token ids (no <bos>) on one line\n"
        "  --decode             read token ids on stdin, print the text\n"
        "  --chat               interactive multi-turn chat with the Gemma 3 chat template, one user\n"
        "                       message per line of stdin, Ctrl-D to end, Ctrl-C to stop a reply;\n"
        "                       with -p or -f: answer that one message and exit\n"
        "  --system TEXT        (--chat) system prompt, folded into the first user turn\n"
        "  --image FILE         (Gemma 3 4B+) an image, binary PPM or PGM; several in order.\n"
        "                       -p, -f: each <start_of_image> in the prompt (or, with none, the\n"
        "                       start) takes the next image, expanded as the processor does;\n"
        "                       --logits: IN.txt holds each image's tokens in place; --chat: the\n"
        "                       first message's images, and a line \"/image FILE\" attaches one\n"
        "                       to the next message\n"
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
        "files: an output is written as OUT.partial and renamed to OUT when whole (through a\n"
        "  symlink to its target); a FIFO or character device, or - (stdout), is written as a\n"
        "  stream. Refused: an output that is an input or the other output, --quantize over a\n"
        "  non-model file. Errors, SIGINT, SIGTERM and SIGHUP remove OUT.partial (exit 128 +\n"
        "  signal); a SIGKILL leaves at most one (Linux; elsewhere --logits with --dump-hidden\n"
        "  may leave two), which the same command run again replaces. Text inputs (-p, -f,\n"
        "  --perplexity, a --chat line, stdin, a --logits file): at most 64 MiB each.\n"
        "\n"
        "threads: set OMP_NUM_THREADS. Model files are made by export.py (see README.md).\n");
}

/* The .partial files this run is writing (see "output files" below): die and the signal
 * handler remove them. */
static char *volatile g_partial[2];

static void die(const char *fmt, ...) {
    va_list ap;
    fprintf(stderr, "gemma3: error: ");
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    for (int i = 0; i < 2; i++)
        if (g_partial[i]) unlink(g_partial[i]);
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

/* All of a stream (`what` in messages), at most TEXT_LIMIT bytes (text may contain NUL
 * bytes, so keep the length). */
static char *read_all(FILE *f, const char *what, size_t *len) {
    size_t cap = 4096, n = 0, got;
    char *buf = malloc(cap);
    while (buf && (got = fread(buf + n, 1, cap - n, f)) > 0) {
        n += got;
        if (n > TEXT_LIMIT) die("%s is larger than %d MiB, the limit for a text input", what, TEXT_LIMIT_MIB);
        if (n == cap) { /* grow, up to one byte past the limit */
            cap = cap * 2 > TEXT_LIMIT + 1 ? TEXT_LIMIT + 1 : cap * 2;
            char *grown = realloc(buf, cap);
            if (!grown) free(buf);
            buf = grown;
        }
    }
    if (!buf) die("out of memory reading %s", what);
    if (ferror(f)) die("cannot read %s: %s", what, strerror(errno));
    *len = n;
    return buf;
}

/* The bytes of a text file (`what` names it in errors). */
static char *read_text_file(const char *what, const char *path, size_t *len) {
    char name[512];
    snprintf(name, sizeof name, "%s %s", what, path);
    FILE *f = fopen(path, "rb");
    if (!f) die("cannot open %s: %s", name, strerror(errno));
    char *text = read_all(f, name, len);
    fclose(f);
    return text;
}

/* One line of stdin, line `number`, without its newline, into *line (malloc'd) and *len: 1,
 * or 0 at the end of input. A line past TEXT_LIMIT or a read error ends the program. */
static int read_line(FILE *in, int number, char **line, size_t *len) {
    size_t cap = 256, n = 0;
    char *buf = malloc(cap);
    int ch = 0;
    while (buf && (ch = fgetc(in)) != EOF && ch != '\n') {
        if (n == TEXT_LIMIT) die("stdin: line %d is longer than %d MiB, the limit for a message", number, TEXT_LIMIT_MIB);
        if (n + 1 == cap) {
            char *grown = realloc(buf, cap *= 2);
            if (!grown) free(buf);
            buf = grown;
            if (!buf) break;
        }
        buf[n++] = (char)ch;
    }
    if (!buf) die("out of memory reading line %d of stdin", number);
    if (ferror(in)) die("cannot read stdin: %s", strerror(errno));
    if (ch == EOF && n == 0) { free(buf); return 0; }
    buf[n] = 0;
    *line = buf;
    *len = n;
    return 1;
}

/* What the command line asked for. */
typedef struct {
    const char *model_path;
    const char *prompt; /* -p, or the text of -f (any bytes: prompt_len says how many) */
    size_t prompt_len;
    char *prompt_file_text;
    const char *logits_in, *logits_out, *hidden_out, *ppl_path, *quant_type, *quant_out, *system_prompt;
    const char **images; /* --image files, in order (n_images of them) */
    int n_images;
    int encode, decode, chat, top_n, steps, top_k, ctx;
    float temperature, top_p, min_p;
    uint64_t seed;
} Options;

/* ---- output files ----
 * --quantize, --logits and --dump-hidden write where the user pointed and replace nothing
 * else. A regular file, or a new name, is written as TARGET.partial in its directory and
 * renamed to TARGET when whole, TARGET being the file a symlink leads to (the link stays a
 * link). A FIFO or character device is written in place, as a stream. Anything else is
 * refused, and so is an output that is an input of the run or another output. "-" is
 * stdout, a stream. A run that fails, or gets SIGINT, SIGTERM or SIGHUP, removes its
 * .partial files (and exits with status 128 + the signal); one killed outright leaves at
 * most one (--dump-hidden's, beside --logits', is written with no name until the first
 * is in place, where the system can: Linux's O_TMPFILE), and the same command run again
 * replaces it. */
typedef struct {
    const char *name; /* as given (for messages) */
    char *target;     /* the file it names: symlinks followed, in a canonical directory ("-": stdout) */
    char *partial;    /* target.partial, written first (NULL for a stream) */
    int unnamed;      /* the .partial is written as a file with no name yet (O_TMPFILE) */
    int exists;       /* the target exists, as st */
    struct stat st;
    FILE *f;
    char *buf;        /* f's buffer */
} Output;

static Output g_out[2]; /* slot 0: --quantize's or --logits' OUT, 1: --dump-hidden's */

static char *join_path(const char *dir, size_t dir_len, const char *name) {
    size_t n = strlen(name);
    char *p = malloc(dir_len + n + 2);
    if (!p) die("out of memory");
    memcpy(p, dir, dir_len);
    p[dir_len] = '/';
    memcpy(p + dir_len + 1, name, n + 1);
    return p;
}

/* The file `path` names, with its symlinks followed, as an absolute path in a canonical
 * directory; it need not exist. NULL (errno set) when its directory does not exist. */
static char *output_target(const char *path) {
    char *p = realpath(path, NULL), link[4096];
    if (p || errno != ENOENT) return p;
    if (!(p = dup_bytes(path, strlen(path)))) die("out of memory");
    struct stat st;
    for (int hops = 0; lstat(p, &st) == 0 && S_ISLNK(st.st_mode); hops++) { /* a link to nothing yet */
        ssize_t n = hops < 40 ? readlink(p, link, sizeof link) : -1;
        if (n < 0 || n == (ssize_t)sizeof link) {
            errno = hops == 40 ? ELOOP : n < 0 ? errno : ENAMETOOLONG;
            free(p);
            return NULL;
        }
        link[n] = 0;
        char *slash = strrchr(p, '/'), *next = link[0] == '/' || !slash ? dup_bytes(link, (size_t)n)
                                                                          : join_path(p, (size_t)(slash - p), link);
        free(p);
        if (!(p = next)) die("out of memory");
    }
    char *slash = strrchr(p, '/'), *dir;
    if (slash) {
        *slash = 0;
        dir = realpath(slash == p ? "/" : p, NULL);
    } else {
        dir = realpath(".", NULL);
    }
    char *target = dir ? join_path(dir, strlen(dir), slash ? slash + 1 : p) : NULL;
    free(dir);
    free(p);
    return target;
}

/* The checks made before anything is read or written: where output `slot` goes, and
 * whether it may be written there. */
static void plan_output(int slot, const char *name, int is_model) {
    Output *o = &g_out[slot];
    o->name = name;
    if (!strcmp(name, "-")) { /* stdout, as it is */
        if (!(o->target = dup_bytes(name, 1))) die("out of memory");
        o->exists = fstat(STDOUT_FILENO, &o->st) == 0;
        return;
    }
    if (!(o->target = output_target(name))) die("cannot write %s: %s", name, strerror(errno));
    o->exists = stat(o->target, &o->st) == 0;
    if (o->exists && S_ISDIR(o->st.st_mode)) die("%s is a directory: give a file name", name);
    if (o->exists && !S_ISREG(o->st.st_mode) && !S_ISFIFO(o->st.st_mode) && !S_ISCHR(o->st.st_mode))
        die("%s is not a regular file, FIFO or character device: give a file name", name);
    if (o->exists && !S_ISREG(o->st.st_mode)) return; /* a stream, written in place */
    size_t len = strlen(o->target);
    if (!(o->partial = malloc(len + sizeof ".partial"))) die("out of memory");
    memcpy(o->partial, o->target, len);
    memcpy(o->partial + len, ".partial", sizeof ".partial");
    if (is_model && o->exists) { /* --quantize replaces a model file, nothing else */
        char magic[4] = {0};
        FILE *f = fopen(o->target, "rb");
        if (!f) die("cannot read %s (to see that it is a model file): %s", name, strerror(errno));
        size_t got = fread(magic, 1, 4, f);
        fclose(f);
        if (got != 4 || memcmp(magic, "GM3C", 4) != 0)
            die("%s exists and is not a gemma3.c model file (no GM3C magic): remove it or give another name", name);
    }
}

/* Whether output o is the file at path (a file the run reads). */
static int is_file(const Output *o, const char *path) {
    struct stat st;
    if (o->exists && stat(path, &st) == 0) return o->st.st_dev == st.st_dev && o->st.st_ino == st.st_ino;
    char *real = realpath(path, NULL);
    int same = real && !strcmp(real, o->target);
    free(real);
    return same;
}

/* Refuse outputs that are inputs of the run, or each other, or whose .partial is. */
static void check_outputs(const char *const out_names[2], const char *const inputs[], const char *const input_kinds[],
                          int quantize) {
    for (int i = 0; i < 2; i++)
        if (out_names[i]) plan_output(i, out_names[i], quantize);
    for (int i = 0; i < 2; i++) {
        const Output *o = &g_out[i];
        if (!o->name) continue;
        for (int k = 0; input_kinds[k]; k++) {
            if (!inputs[k]) continue;
            if (is_file(o, inputs[k])) die("%s is the %s itself: give the output another name", o->name, input_kinds[k]);
            char *real = realpath(inputs[k], NULL);
            int clash = o->partial && real && !strcmp(real, o->partial);
            free(real);
            if (clash)
                die("%s.partial, where %s is written first, is the %s itself: give the output another name", o->name,
                    o->name, input_kinds[k]);
        }
    }
    const Output *a = &g_out[0], *b = &g_out[1];
    if (a->name && b->name) {
        if (!strcmp(a->target, b->target) || (a->exists && b->exists && a->st.st_dev == b->st.st_dev &&
                                                a->st.st_ino == b->st.st_ino))
            die("--logits and --dump-hidden both write %s: give them different names", b->name);
        for (int i = 0; i < 2; i++) {
            const Output *o = &g_out[i], *other = &g_out[1 - i];
            if (o->partial && (!strcmp(o->partial, other->target) || (other->partial && !strcmp(o->partial, other->partial))))
                die("%s is where %s is written until it is whole: give the outputs other names", other->name, o->name);
        }
    }
}

/* SIGINT, SIGTERM or SIGHUP while outputs are written: remove the .partial files, exit
 * 128 + the signal (unlink and _exit are async-signal-safe). */
static void on_fatal_signal(int sig) {
    for (int i = 0; i < 2; i++)
        if (g_partial[i]) unlink(g_partial[i]);
    _exit(128 + sig);
}

static void catch_fatal_signals(void) {
    static const int sigs[] = {SIGINT, SIGTERM, SIGHUP};
    for (int i = 0; i < 3; i++)
        if (signal(sigs[i], on_fatal_signal) == SIG_IGN) signal(sigs[i], SIG_IGN); /* nohup, background jobs */
}

/* A second .partial, as a file in its directory that has no name yet (named in
 * finish_outputs, once the first output is in place), or -1 where the system cannot. */
static int open_unnamed(Output *o) {
#ifdef O_TMPFILE
    char *slash = strrchr(o->target, '/');
    *slash = 0; /* (target is absolute) */
    int fd = open(slash == o->target ? "/" : o->target, O_TMPFILE | O_WRONLY, 0666);
    *slash = '/';
    o->unnamed = fd >= 0;
    return fd;
#else
    (void)o;
    return -1;
#endif
}

/* Give the unnamed file of output o its .partial name (Linux: a link to /proc's name of
 * the open file; as root, to the descriptor itself). */
static void name_unnamed(Output *o) {
#ifdef O_TMPFILE
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fileno(o->f));
    if (linkat(AT_FDCWD, path, AT_FDCWD, o->partial, AT_SYMLINK_FOLLOW) != 0 &&
        linkat(fileno(o->f), "", AT_FDCWD, o->partial, AT_EMPTY_PATH) != 0)
        die("cannot write %s: %s (giving its finished file a name)", o->name, strerror(errno));
    g_partial[o - g_out] = o->partial;
#else
    (void)o;
#endif
}

/* Open output `slot` for writing: its .partial (a stale one from a killed run is removed
 * first, and nothing at that name is followed) with the mode of the file it replaces, or
 * the stream itself. */
static FILE *open_output(int slot) {
    Output *o = &g_out[slot];
    int fd;
    catch_fatal_signals();
    if (o->partial) {
        if (unlink(o->partial) != 0 && errno != ENOENT) die("cannot write %s: %s", o->partial, strerror(errno));
        fd = slot == 1 && g_out[0].partial ? open_unnamed(o) : -1;
        if (fd < 0) {
            g_partial[slot] = o->partial;
            fd = open(o->partial, O_WRONLY | O_CREAT | O_EXCL, 0666);
        }
        if (fd >= 0 && o->exists) (void)fchmod(fd, o->st.st_mode & 07777);
    } else {
        signal(SIGPIPE, SIG_IGN); /* a reader that goes away is a write error, reported, not a silent death */
        fd = !strcmp(o->target, "-") ? dup(STDOUT_FILENO) : open(o->target, O_WRONLY);
    }
    if (fd < 0 || !(o->f = fdopen(fd, "wb"))) die("cannot write %s: %s", o->name, strerror(errno));
    /* Write in whole 4 MiB pieces at 4 MiB offsets (stdio writes a full buffer at once):
     * Linux then caches a new model file in 2 MiB pages where the filesystem can (large
     * folios), and gemma3 maps it with 2 MiB pages (see read_file_bytes). The buffer is
     * ours: glibc ignores setvbuf's size when it is to allocate the buffer itself. */
    size_t size = (size_t)4 << 20;
    if ((o->buf = malloc(size))) setvbuf(o->f, o->buf, _IOFBF, size);
    return o->f;
}

/* A write to output `slot` failed: say why (the .partial files go in die). */
static void write_failed(int slot) { die("cannot write %s: %s", g_out[slot].name, strerror(errno)); }

/* The outputs are written: flush them all, then give each its name (none is renamed if
 * another could not be written). An unnamed .partial gets its name after the other output
 * is in place. */
static void finish_outputs(void) {
    for (int i = 0; i < 2; i++) {
        Output *o = &g_out[i];
        if (o->f && (fflush(o->f) != 0 || ferror(o->f))) write_failed(i);
    }
    for (int i = 0; i < 2; i++) {
        Output *o = &g_out[i];
        if (o->unnamed) name_unnamed(o);
        if (o->f && fclose(o->f) != 0) write_failed(i);
        o->f = NULL;
        free(o->buf);
        if (o->partial && rename(o->partial, o->target) != 0) write_failed(i);
        g_partial[i] = NULL;
        free(o->partial);
        free(o->target);
        memset(o, 0, sizeof *o);
    }
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
        else if (!strcmp(a, "--image")) {
            if (i + 1 >= argc) die("--image needs a file (binary PPM or PGM)");
            if (!o->images && !(o->images = calloc((size_t)argc, sizeof(char *)))) die("out of memory");
            o->images[o->n_images++] = argv[++i];
        } else if (!strcmp(a, "--quantize") || !strcmp(a, "--logits")) {
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
    else if (o->prompt && (o->prompt_len = strlen(o->prompt)) > TEXT_LIMIT)
        die("the prompt is larger than %d MiB, the limit for a text input", TEXT_LIMIT_MIB);
    int modes = o->encode + o->decode + o->chat + (o->logits_in != NULL) + (o->prompt != NULL && !o->chat) +
                (o->ppl_path != NULL) + (o->quant_type != NULL);
    if (modes > 1) die("choose one of -p/-f, --chat, --logits, --perplexity, --encode, --decode, --quantize");
    if (modes == 0)
        die("nothing to do: give -p PROMPT, -f FILE, --chat, --logits, --perplexity, --encode, --decode or --quantize (see --help)");
    if ((o->top_n || o->hidden_out) && !o->logits_in) die("--top and --dump-hidden go with --logits");
    if (o->system_prompt && !o->chat) die("--system goes with --chat");
    if (o->n_images && !o->chat && !o->prompt && !o->logits_in) die("--image goes with -p, -f, --logits or --chat");
    if (o->n_images && o->hidden_out) die("--dump-hidden does not take --image");
    if (o->top_n && o->logits_out && !strcmp(o->logits_out, "-")) die("--top prints on stdout: give --logits a file, not -");
    const char *outputs[2] = {o->quant_out ? o->quant_out : o->logits_out, o->hidden_out};
    /* the inputs no output may be: the model, the token file, the text file, each image */
    const char **inputs = malloc((4 + (size_t)o->n_images) * sizeof *inputs);
    const char **kinds = malloc((4 + (size_t)o->n_images) * sizeof *kinds);
    if (!inputs || !kinds) die("out of memory");
    inputs[0] = o->model_path, inputs[1] = o->logits_in, inputs[2] = o->ppl_path;
    kinds[0] = "model file", kinds[1] = "token file", kinds[2] = "text file";
    for (int i = 0; i < o->n_images; i++) inputs[3 + i] = o->images[i], kinds[3 + i] = "image file";
    inputs[3 + o->n_images] = NULL, kinds[3 + o->n_images] = NULL;
    check_outputs(outputs, inputs, kinds, o->quant_out != NULL);
    free(inputs);
    free(kinds);
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
    opt.images = o->n_images > 0;
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
    char *text = read_all(stdin, "stdin", &len);
    int *ids = malloc((len + 1) * sizeof(int));
    if (!ids) die("out of memory");
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
    if (read_id_stream(stdin, "stdin", gemma3_model_config(m).vocab_size, &ids, &n, err, sizeof err) != 0)
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

/* ---- images on the command line: binary PGM / PPM files, the processor's prompt ---- */

#define PNM_HEADER_MAX 4096 /* a PNM header (comments included) longer than this is refused */

/* Skip whitespace and # comments in a PNM header; the next number (at most 9 digits). */
static int pnm_number(const unsigned char *p, size_t n, size_t *at, long *value) {
    for (;;) {
        while (*at < n && (p[*at] == ' ' || p[*at] == '\t' || p[*at] == '\n' || p[*at] == '\r' || p[*at] == '\v' ||
                           p[*at] == '\f'))
            (*at)++;
        if (*at < n && p[*at] == '#')
            while (*at < n && p[*at] != '\n') (*at)++;
        else
            break;
    }
    long v = 0;
    int digits = 0;
    while (*at < n && p[*at] >= '0' && p[*at] <= '9' && digits < 10) v = v * 10 + (p[(*at)++] - '0'), digits++;
    if (digits == 0 || digits == 10) return -1;
    *value = v;
    return 0;
}

/* The header of a binary PGM (P5: gray) or PPM (P6: RGB) at p[0..n): its size, channels,
 * maxval and the offset of its pixels. 0, or -1 and a message naming the problem. */
static int pnm_header(const unsigned char *p, size_t n, int *w, int *h, int *channels, int *maxval, size_t *pixels_at,
                      char *err, size_t errsize) {
    long v[3];
    size_t at = 2;
    if (n < 2 || p[0] != 'P' || (p[1] != '5' && p[1] != '6')) {
        set_err(err, errsize, "not a binary PGM or PPM image (it starts P5 or P6; convert other formats first)");
        return -1;
    }
    for (int i = 0; i < 3; i++)
        if (pnm_number(p, n, &at, &v[i]) != 0) {
            set_err(err, errsize, "malformed %s header: no %s", p[1] == '5' ? "PGM" : "PPM",
                    i == 0 ? "width" : i == 1 ? "height" : "maxval");
            return -1;
        }
    if (at >= n || !(p[at] == ' ' || p[at] == '\t' || p[at] == '\n' || p[at] == '\r')) {
        set_err(err, errsize, "malformed header: no whitespace before the pixels");
        return -1;
    }
    if (v[0] < 1 || v[1] < 1 || v[0] > MAX_IMAGE_SIDE || v[1] > MAX_IMAGE_SIDE) {
        set_err(err, errsize, "the image is %ld x %ld pixels: width and height must be in [1, %d]", v[0], v[1],
                MAX_IMAGE_SIDE);
        return -1;
    }
    if (v[2] < 1 || v[2] > 65535) {
        set_err(err, errsize, "maxval %ld is not in [1, 65535]", v[2]);
        return -1;
    }
    *w = (int)v[0], *h = (int)v[1], *channels = p[1] == '5' ? 1 : 3, *maxval = (int)v[2], *pixels_at = at + 1;
    return 0;
}

/* The raw samples of a PNM (one byte each for maxval < 256, else two, big-endian) as 8-bit
 * pixels: p * 255 / maxval, rounded; a sample above maxval is an error. */
static int pnm_to_8bit(const unsigned char *raw, size_t count, int maxval, unsigned char *out, char *err, size_t errsize) {
    for (size_t i = 0; i < count; i++) {
        long s = maxval < 256 ? raw[i] : (long)raw[2 * i] << 8 | raw[2 * i + 1];
        if (s > maxval) {
            set_err(err, errsize, "sample %zu is %ld, above the maxval %d", i, s, maxval);
            return -1;
        }
        out[i] = (unsigned char)((s * 255 + maxval / 2) / maxval);
    }
    return 0;
}

/* A binary PGM / PPM file as 8-bit pixels (img->pixels malloc'd: the caller frees it). Reads
 * only the header and the pixels it announces: nothing else of the file is held. */
static int read_image_file(const char *path, gemma3_image *img, char *err, size_t errsize) {
    char msg[256];
    unsigned char head[PNM_HEADER_MAX];
    FILE *f = fopen(path, "rb");
    if (!f) { set_err(err, errsize, "cannot open image %s: %s", path, strerror(errno)); return -1; }
    size_t got = fread(head, 1, sizeof head, f), at;
    int w, h, ch, maxval;
    if (pnm_header(head, got, &w, &h, &ch, &maxval, &at, msg, sizeof msg) != 0) {
        fclose(f);
        set_err(err, errsize, "image %s: %s%s", path, msg,
                got == sizeof head && strstr(msg, "malformed") ? " (or a header over 4096 bytes)" : "");
        return -1;
    }
    size_t count = (size_t)w * h * ch, bytes = count * (maxval < 256 ? 1 : 2);
    unsigned char *raw = malloc(bytes), *px = malloc(count);
    size_t have = got - at < bytes ? got - at : bytes;
    if (!raw || !px) {
        fclose(f), free(raw), free(px);
        set_err(err, errsize, "out of memory for image %s (%d x %d)", path, w, h);
        return -1;
    }
    memcpy(raw, head + at, have);
    have += fread(raw + have, 1, bytes - have, f);
    fclose(f);
    if (have < bytes) {
        set_err(err, errsize, "image %s is truncated: %zu bytes of pixels, its header says %d x %d x %d = %zu", path, have,
                w, h, ch, bytes);
        free(raw), free(px);
        return -1;
    }
    int rc = pnm_to_8bit(raw, count, maxval, px, msg, sizeof msg);
    free(raw);
    if (rc) { set_err(err, errsize, "image %s: %s", path, msg); free(px); return -1; }
    img->pixels = px, img->width = w, img->height = h, img->channels = ch;
    return 0;
}

/* --chat's "/image FILE": read it and add it to the next message's images; a file it cannot
 * read is one error line, and the chat goes on. */
static int attach_image(gemma3_image **images, int *n, const char *path) {
    char err[600];
    gemma3_image img, *grown;
    if (read_image_file(path, &img, err, sizeof err) != 0) {
        fprintf(stderr, "gemma3: error: %s (not attached)\n", err);
        return -1;
    }
    if (!(grown = realloc(*images, (size_t)(*n + 1) * sizeof(gemma3_image)))) die("out of memory");
    grown[(*n)++] = img;
    *images = grown;
    fprintf(stderr, "(%s: %d x %d, attached to the next message)\n", path, img.width, img.height);
    return 0;
}

/* Every --image, read, in order (or die: also for a model without the image path). */
static gemma3_image *read_images(const gemma3_model *m, const Options *o) {
    char err[600];
    if (!gemma3_model_config(m).image_tokens)
        die("%s has no image path (a text model, or exported with --text-only): --image needs Gemma 3 4B, 12B or 27B",
            o->model_path);
    gemma3_image *images = calloc((size_t)o->n_images, sizeof(gemma3_image));
    if (!images) die("out of memory");
    for (int i = 0; i < o->n_images; i++)
        if (read_image_file(o->images[i], &images[i], err, sizeof err) != 0) die("%s", err);
    return images;
}

static void free_images(gemma3_image *images, int n) {
    for (int i = 0; images && i < n; i++) free((void *)images[i].pixels);
    free(images);
}

/* The prompt as transformers' Gemma3Processor builds it: every <start_of_image> in the text
 * (or, if it has none, one per image ahead of the text) becomes "\n\n<start_of_image>",
 * mm_tokens_per_image <image_soft_token>, "<end_of_image>\n\n"; then <bos> and the ids of
 * the whole (so newlines merge with the text's as the processor's tokenizer merges them). */
static int *image_prompt_ids(const gemma3_model *m, const Options *o, int *n_out) {
    gemma3_config c = gemma3_model_config(m);
    const char *boi = "<start_of_image>", *soft = "<image_soft_token>", *eoi = "<end_of_image>";
    const char *text = o->prompt;
    size_t len = o->prompt_len, kb = strlen(boi);
    if (find_text(text, len, soft) >= 0)
        die("the prompt holds %s, which stands for an image's soft tokens: put %s where an image goes and give it "
            "with --image", soft, boi);
    int markers = count_text(text, len, boi);
    if (markers && markers != o->n_images)
        die("the prompt has %d %s, and %d --image are given: one each (or none in the prompt: the images go first)",
            markers, boi, o->n_images);
    /* the ids the three markers must be, checked against the tokenizer */
    const char *names[3] = {boi, soft, eoi};
    int want[3] = {c.boi_id, c.image_id, c.eoi_id};
    for (int i = 0; i < 3; i++) {
        int id, k = gemma3_tokenize(m, names[i], strlen(names[i]), &id, 1, NULL);
        if (k != 1 || id != want[i]) die("the tokenizer does not make %s the model's id %d", names[i], want[i]);
    }
    /* the text, after one <start_of_image> per image if it has none; then expanded */
    size_t lead = markers ? 0 : (size_t)o->n_images * kb, out_len;
    char *full = malloc(lead + len + 1);
    if (!full) die("out of memory");
    for (size_t i = 0; i < lead; i += kb) memcpy(full + i, boi, kb);
    memcpy(full + lead, text, len);
    char *out = expand_image_markers(full, lead + len, c.image_tokens, &out_len);
    if (!out) die("out of memory");
    free(full);
    int *ids = encode_with_bos(m, "prompt", out, out_len, n_out);
    free(out);
    return ids;
}

/* Where --logits rows go: the file (and the --top table). */
typedef struct {
    const gemma3_model *m;
    const Options *o;
    const int *ids;
    FILE *f;
    ProbIndex *buf;
} LogitRows;

static void write_logit_rows(const float *logits, int t0, int nb, void *user) {
    LogitRows *r = user;
    size_t V = (size_t)gemma3_model_config(r->m).vocab_size;
    for (int t = 0; t < nb; t++) {
        if (r->o->top_n) print_top(r->m, logits + (size_t)t * V, t0 + t, r->ids[t0 + t], r->o->top_n, r->buf, stdout);
        if (write_f32_le(r->f, logits + (size_t)t * V, (int)V) != 0) write_failed(0);
    }
}

/* Feed ids[0..n), whose runs of image tokens stand for images[0..n_images) in order: the
 * text with gemma3_feed, each image with gemma3_feed_image. With rows, all the logits:
 * through buf (room for `chunk` >= image_tokens rows), to rows(logits, first position,
 * count, user). Dies where the runs do not match the images. Returns the seconds the
 * images took (resize, tower, projector, their tokens). */
static double feed_with_images(gemma3_session *s, const gemma3_model *m, const int *ids, int n, const gemma3_image *images,
                             int n_images, const char *what, float *buf, int chunk,
                             void (*rows)(const float *, int, int, void *), void *user) {
    gemma3_error e;
    gemma3_config c = gemma3_model_config(m);
    int image = 0;
    double image_s = 0;
    for (int t = 0; t < n;) {
        int is_image = ids[t] == c.image_id, len = 0;
        while (t + len < n && (ids[t + len] == c.image_id) == is_image && (is_image || len < chunk || !rows)) len++;
        if (is_image && len != c.image_tokens)
            die("%s: %d image tokens at %d, an image is %d", what, len, t, c.image_tokens);
        if (is_image && image == n_images) die("%s: more runs of image tokens than --image given (%d)", what, n_images);
        double t0 = now_seconds();
        int rc = is_image ? gemma3_feed_image(s, &images[image++], rows ? buf : NULL, &e)
                 : rows   ? gemma3_feed_logits(s, ids + t, len, buf, NULL, &e)
                          : gemma3_feed(s, ids + t, len, &e);
        if (is_image) image_s += now_seconds() - t0;
        if (rc < 0) die("%s", e.message);
        if (rows) rows(buf, t, len, user);
        t += len;
    }
    if (image != n_images) die("%s: image tokens for %d image(s), and %d --image", what, image, n_images);
    return image_s;
}

/* -p / -f with --image: the prompt built as the processor builds it, the images fed where
 * it puts their tokens, then generation as without images. */
static int run_generate_images(const gemma3_model *m, const Options *o) {
    gemma3_error e;
    gemma3_config c = gemma3_model_config(m);
    int n, ctx = context_length(o, &c);
    gemma3_image *images = read_images(m, o);
    int *ids = image_prompt_ids(m, o, &n);
    if (n >= ctx) die("the prompt is %d tokens with its images, the context only %d (raise -c)", n, ctx);
    gemma3_session *s = new_session(m, o, ctx);
    double t0 = now_seconds();
    double image_s = feed_with_images(s, m, ids, n, images, o->n_images, "the prompt", NULL, 0, NULL, NULL);
    double t1 = now_seconds();
    int generated = gemma3_generate(s, o->steps, print_piece, NULL, &e);
    if (generated < 0) die("%s", e.message);
    printf("\n");
    fprintf(stderr, "prompt %d tokens with %d image%s, %.2f s (the images %.2f s); generated %d tokens, %.1f tok/s\n", n,
            o->n_images, o->n_images == 1 ? "" : "s", t1 - t0, image_s, generated,
            generated / (now_seconds() - t1 > 0 ? now_seconds() - t1 : 1e-9));
    free(ids);
    free_images(images, o->n_images);
    gemma3_session_free(s);
    return 0;
}

/* --logits' token ids (n of them), and the context to run them in: -c, else the file's length. */
static int *read_logits_ids(const Options *o, const gemma3_config *c, int *n, int *ctx) {
    char err[512];
    int *ids;
    if (read_token_file(o->logits_in, c->vocab_size, &ids, n, err, sizeof err) != 0) die("%s", err);
    Options sized = *o;
    if (!sized.ctx) sized.ctx = *n;
    *ctx = context_length(&sized, c);
    if (*n > *ctx) die("%s has %d tokens, more than the context of %d (-c)", o->logits_in, *n, *ctx);
    return ids;
}

/* --logits with --image: the ids already hold each image's tokens (as input_ids do). */
static int run_logits_images(const gemma3_model *m, const Options *o) {
    gemma3_config c = gemma3_model_config(m);
    int n, ctx, *ids = read_logits_ids(o, &c, &n, &ctx);
    gemma3_image *images = read_images(m, o);
    gemma3_session *s = new_session(m, o, ctx);
    int chunk = c.image_tokens > PREFILL_BATCH ? c.image_tokens : PREFILL_BATCH;
    float *buf = malloc((size_t)chunk * c.vocab_size * sizeof(float));
    LogitRows rows = {m, o, ids, NULL, o->top_n ? malloc((size_t)o->top_n * sizeof(ProbIndex)) : NULL};
    if (!buf || (o->top_n && !rows.buf)) die("out of memory");
    rows.f = open_output(0);
    double image_s = feed_with_images(s, m, ids, n, images, o->n_images, o->logits_in, buf, chunk, write_logit_rows, &rows);
    finish_outputs();
    fprintf(stderr, "%d image%s in %.2f s (resize, vision tower, projector, %d tokens each)\n", o->n_images,
            o->n_images == 1 ? "" : "s", image_s, c.image_tokens);
    free(rows.buf);
    free(buf);
    free(ids);
    free_images(images, o->n_images);
    gemma3_session_free(s);
    return 0;
}

/* --logits: the ids through the model in batches, as a prompt is; the logits of every
 * position to a file, row-major [T][vocab]. Optionally also the top-N table (stdout) and
 * the hidden state after every layer, [T][n_layers + 1][dim]. */
static int run_logits(const gemma3_model *m, const Options *o) {
    if (o->n_images) return run_logits_images(m, o);
    gemma3_error e;
    gemma3_config c = gemma3_model_config(m);
    int n, ctx, *ids = read_logits_ids(o, &c, &n, &ctx);
    gemma3_session *s = new_session(m, o, ctx);
    FILE *f = open_output(0), *fh = o->hidden_out ? open_output(1) : NULL;
    size_t V = (size_t)c.vocab_size, H = (size_t)(c.n_layers + 1) * c.dim;
    int chunk = PREFILL_BATCH;
    float *logits = malloc((size_t)chunk * V * sizeof(float)), *hidden = fh ? malloc((size_t)chunk * H * sizeof(float)) : NULL;
    ProbIndex *buf = o->top_n ? malloc((size_t)o->top_n * sizeof(ProbIndex)) : NULL;
    if (!logits || (fh && !hidden) || (o->top_n && !buf)) die("out of memory");
    for (int done = 0; done < n; done += chunk) {
        int nb = n - done < chunk ? n - done : chunk;
        if (gemma3_feed_logits(s, ids + done, nb, logits, hidden, &e) < 0) die("%s", e.message);
        if (fh && write_f32_le(fh, hidden, (int)(nb * H)) != 0) write_failed(1);
        for (int t = 0; t < nb; t++) {
            const float *row = logits + (size_t)t * V;
            if (o->top_n) print_top(m, row, done + t, ids[done + t], o->top_n, buf, stdout);
            if (write_f32_le(f, row, (int)V) != 0) write_failed(0);
        }
    }
    finish_outputs();
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
    int status = 0, number = 0, interactive = isatty(0) && !o->prompt; /* a prompt on a terminal */
    /* --image: the images of the first message; then a line "/image FILE" attaches one to the next */
    gemma3_image *pending = o->n_images ? read_images(m, o) : NULL;
    int n_pending = o->n_images;
    gemma3_session *s = new_session(m, o, context_length(o, &c));
    void (*inherited)(int) = signal(SIGINT, SIG_IGN);
    signal(SIGINT, inherited);
    for (;;) {
        size_t len = o->prompt_len;
        char *line;
        if (o->prompt) {
            line = dup_bytes(o->prompt, len);
        } else {
            if (interactive) { fprintf(stderr, "> "); fflush(stderr); }
            if (!read_line(stdin, ++number, &line, &len)) { /* end of input (Ctrl-D) */
                if (interactive) fputc('\n', stderr);
                break;
            }
            if (len == 0) { free(line); continue; } /* an empty line is no message */
        }
        if (!line) die("out of memory");
        if (o->n_images && len > 7 && !memcmp(line, "/image ", 7)) {
            if (attach_image(&pending, &n_pending, line + 7) != 0) status = 1;
            free(line);
            continue;
        }
        g_interrupted = 0;
        if (inherited != SIG_IGN) signal(SIGINT, on_interrupt);
        int rc = gemma3_chat_turn_images(s, line, len, pending, n_pending, o->steps, chat_piece, NULL, &e);
        free_images(pending, n_pending); /* (a refused message takes its images with it) */
        pending = NULL, n_pending = 0;
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
        if (rc < 0 && (o->prompt || (rc != GEMMA3_E_TOKEN && rc != GEMMA3_E_TEXT && rc != GEMMA3_E_ARG &&
                                     rc != GEMMA3_E_STATE)))
            die("%s", e.message);
        if (rc < 0) { /* refused: the conversation is as it was */
            fprintf(stderr, "gemma3: error: %s (message refused)\n", e.message);
            status = 1;
            continue;
        }
        printf("\n");
        fflush(stdout);
        if (o->prompt) break;
    }
    free_images(pending, n_pending); /* attached after the last message */
    gemma3_session_free(s);
    return status;
}

/* -p / -f: <bos>, the prompt, then up to -n sampled tokens, streamed to stdout. */
static int run_generate(const gemma3_model *m, const Options *o) {
    if (o->n_images) return run_generate_images(m, o);
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
    if (quantize_model(&model, open_output(0), o->quant_out, dtype, err, sizeof err) != 0) die("%s", err);
    finish_outputs();
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
    free(o.images);
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
static size_t kernels_setup(void *mem, const Config *c, int max_batch, int threads, int unmasked_n) {
    (void)mem, (void)c, (void)max_batch, (void)threads, (void)unmasked_n;
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
#ifndef HAVE_KERNELS_ATTENTION_UNMASKED
static int kernels_attention_unmasked(void *kernels, float *out, const float *q, const float *k, const float *v, int n,
                                      int D, int hd, float scale) {
    (void)kernels, (void)out, (void)q, (void)k, (void)v, (void)n, (void)D, (void)hd, (void)scale;
    return 0;
}
#endif
