/* ============================================================================
 * tokenizer.c - Gemma 3 tokenizer and chat template
 *
 * Byte-exact with Hugging Face `tokenizers` (tokenizer.json of Gemma 3) for
 * encode(add_special_tokens=false) and decode(skip_special_tokens=false), and
 * with the chat_template of tokenizer_config.json. The behaviour being
 * reproduced is listed in fixtures/tokenizer/README.md. In short:
 *
 *   encode: 1. split the raw text on the added tokens (leftmost-longest,
 *              exact, case-sensitive, special or not);
 *           2. in each piece between them, " " -> U+2581 "▁" (the only
 *              normalisation), then BPE over the WHOLE piece as one word,
 *              merges applied lowest rank first;
 *           3. a character with no vocab entry becomes its UTF-8 bytes as
 *              <0xNN> tokens.
 *   decode: "▁" -> " " in every piece; runs of <0xNN> tokens are joined and
 *           must be valid UTF-8, otherwise each byte becomes U+FFFD.
 *
 * This file is #included by gemma3.c as one translation unit: everything is
 * static, there is no mutable global state, and only standard C99 headers are
 * used. The tokenizer section of the model file (FORMAT.md) is little-endian
 * and read byte by byte, so big-endian hosts work too.
 * ========================================================================== */

#include <limits.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Token types as stored in the section (FORMAT.md). */
enum {
    TOKTYPE_NORMAL  = 0,
    TOKTYPE_BYTE    = 1, /* byte-fallback piece <0xNN> */
    TOKTYPE_ADDED   = 2, /* added token, not special */
    TOKTYPE_SPECIAL = 3  /* added token, special */
};

/* One node of the added-token trie. Children form a singly linked sibling
 * list: only the '<' node has many children (about 30), so a linear scan is
 * cheaper than anything cleverer. The root's children are in root_child[]. */
typedef struct {
    int32_t child;   /* first child node, -1 if none */
    int32_t sibling; /* next sibling node, -1 if none */
    int32_t id;      /* added token ending here, -1 if none */
    unsigned char byte;
} TokTrieNode;

/* One slot of the merge table: the pair, its rank and its result live
 * together so a lookup costs one cache miss (the table is ~16 MB). */
typedef struct {
    int32_t left, right; /* the pair of ids */
    int32_t rank;        /* merge rank (priority, lower first); -1 = empty slot */
    int32_t merged;      /* id of left+right */
} TokMergeSlot;

typedef struct Tokenizer {
    int n_tokens;            /* vocab entries incl. added tokens (262,145) */
    int n_merges;            /* BPE merges; merge rank = index */
    int n_added;             /* added tokens (6,415) */
    size_t max_piece;        /* bytes of the longest piece */
    uint32_t *offs;          /* [n_tokens+1] piece i = blob[offs[i] .. offs[i+1]) */
    unsigned char *blob;     /* all pieces, raw UTF-8 with "▁" kept */
    unsigned char *type;     /* [n_tokens] TOKTYPE_* */

    /* piece -> id, open addressing, linear probing; slot = id or -1. Only used
     * for the initial one-character symbols of BPE and <0xNN>/<unk>. */
    int32_t *piece_slots;
    uint32_t piece_mask;     /* slot count - 1 (a power of two) */

    /* (left, right) -> merge, open addressing, linear probing */
    TokMergeSlot *merge_slots;
    uint32_t merge_mask;

    /* added-token trie (the root is implicit: root_child[]) */
    TokTrieNode *trie;
    int n_trie;
    int32_t root_child[256]; /* trie node for each first byte, -1 if none */

    int32_t ascii_id[128];   /* id of each one-byte character after
                                normalisation (' ' -> "▁"), -1 if none */
    int32_t byte_id[256];    /* id of <0xNN>, -1 if missing */
    int32_t unk_id;          /* id of <unk>, -1 if missing */
} Tokenizer;

/* ============================================================================
 * Small helpers
 * ========================================================================== */

static void tok_errf(char *err, size_t errsize, const char *fmt, ...)
{
    va_list ap;
    if (!err || errsize == 0) return;
    va_start(ap, fmt);
    vsnprintf(err, errsize, fmt, ap);
    va_end(ap);
}

/* Little-endian u32 from bytes, independent of host byte order and alignment. */
static uint32_t tok_rd32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static const unsigned char *tok_piece(const Tokenizer *t, int id, size_t *len)
{
    *len = t->offs[id + 1] - t->offs[id];
    return t->blob + t->offs[id];
}

/* Length of the well-formed UTF-8 sequence starting at s[0] (n >= 1 bytes
 * available): > 0 its length, 0 = a valid prefix that needs more bytes,
 * -1 = ill-formed. Exactly Unicode's definition (no overlongs, no surrogates,
 * nothing above U+10FFFF), which is what Rust's str (and so HF) accepts. */
static int tok_utf8_seq(const unsigned char *s, size_t n)
{
    unsigned char c = s[0], lo = 0x80, hi = 0xBF;
    int need, i;
    if (c < 0x80) return 1;
    if (c < 0xC2) return -1; /* stray continuation byte, or overlong C0/C1 */
    if (c < 0xE0) {
        need = 2;
    } else if (c < 0xF0) {
        need = 3;
        if (c == 0xE0) lo = 0xA0;      /* overlong */
        else if (c == 0xED) hi = 0x9F; /* surrogates */
    } else if (c < 0xF5) {
        need = 4;
        if (c == 0xF0) lo = 0x90;      /* overlong */
        else if (c == 0xF4) hi = 0x8F; /* above U+10FFFF */
    } else {
        return -1;
    }
    for (i = 1; i < need; i++) {
        unsigned char b;
        if ((size_t)i >= n) return 0;
        b = s[i];
        if (i == 1 ? (b < lo || b > hi) : (b < 0x80 || b > 0xBF)) return -1;
    }
    return need;
}

/* 1 if s[0..n) is entirely well-formed UTF-8; otherwise 0 and *bad = offset
 * of the first byte that is not part of a well-formed sequence. */
static int tok_utf8_valid(const unsigned char *s, size_t n, size_t *bad)
{
    size_t i = 0;
    while (i < n) {
        int k;
        if (s[i] < 0x80) { i++; continue; } /* ASCII fast path */
        k = tok_utf8_seq(s + i, n - i);
        if (k <= 0) {
            if (bad) *bad = i;
            return 0;
        }
        i += (size_t)k;
    }
    return 1;
}

/* Code point of the well-formed sequence of length k at s. */
static uint32_t tok_utf8_cp(const unsigned char *s, int k)
{
    switch (k) {
    case 1: return s[0];
    case 2: return (uint32_t)(s[0] & 0x1F) << 6 | (s[1] & 0x3F);
    case 3: return (uint32_t)(s[0] & 0x0F) << 12 | (uint32_t)(s[1] & 0x3F) << 6 | (s[2] & 0x3F);
    default:
        return (uint32_t)(s[0] & 0x07) << 18 | (uint32_t)(s[1] & 0x3F) << 12 |
               (uint32_t)(s[2] & 0x3F) << 6 | (s[3] & 0x3F);
    }
}

/* Byte value of a byte-fallback piece, -1 if the piece is not one. This is
 * the test of HF's ByteFallback decoder, which looks at the string and not at
 * the token type: 6 bytes, "<0x" .. ">", and the middle two parse as base-16
 * (Rust's from_str_radix also takes a leading '+', so "<0x+F>" counts). */
static int tok_byte_piece(const unsigned char *p, size_t n)
{
    int h, l;
    if (n != 6 || p[0] != '<' || p[1] != '0' || p[2] != 'x' || p[5] != '>') return -1;
#define TOK_HEX(c) ((c) >= '0' && (c) <= '9' ? (c) - '0' : \
                    (c) >= 'a' && (c) <= 'f' ? (c) - 'a' + 10 : \
                    (c) >= 'A' && (c) <= 'F' ? (c) - 'A' + 10 : -1)
    h = p[3] == '+' ? 0 : TOK_HEX(p[3]);
    l = TOK_HEX(p[4]);
#undef TOK_HEX
    if (h < 0 || l < 0) return -1;
    return h * 16 + l;
}

/* U+2581 "▁", the normalised form of a space. */
static const unsigned char tok_lower_block[3] = { 0xE2, 0x96, 0x81 };

/* ============================================================================
 * Hash tables (built at init)
 * ========================================================================== */

/* FNV-1a: pieces are short, this is fast and spreads well enough. */
static uint32_t tok_hash_bytes(const unsigned char *s, size_t n)
{
    uint32_t h = 2166136261u;
    size_t i;
    for (i = 0; i < n; i++) h = (h ^ s[i]) * 16777619u;
    return h;
}

static uint32_t tok_hash_pair(uint32_t a, uint32_t b)
{
    uint32_t h = a * 0x9E3779B1u ^ (b + 0x7F4A7C15u) * 0x85EBCA77u;
    h ^= h >> 15;
    h *= 0x2C1B3C6Du;
    h ^= h >> 13;
    return h;
}

/* Smallest power of two >= 2*n (load factor <= 1/2), at least 16. */
static uint32_t tok_table_size(uint32_t n)
{
    uint32_t s = 16;
    while (s < 2 * (uint64_t)n) s <<= 1;
    return s;
}

static int32_t tok_piece_find(const Tokenizer *t, const unsigned char *s, size_t n)
{
    uint32_t h = tok_hash_bytes(s, n) & t->piece_mask;
    for (;; h = (h + 1) & t->piece_mask) {
        int32_t id = t->piece_slots[h];
        size_t pl;
        const unsigned char *p;
        if (id < 0) return -1;
        p = tok_piece(t, id, &pl);
        if (pl == n && memcmp(p, s, n) == 0) return id;
    }
}

/* The merge of (left, right), NULL if there is none. */
static const TokMergeSlot *tok_merge_find(const Tokenizer *t, int32_t left, int32_t right)
{
    uint32_t h = tok_hash_pair((uint32_t)left, (uint32_t)right) & t->merge_mask;
    for (;; h = (h + 1) & t->merge_mask) {
        const TokMergeSlot *m = &t->merge_slots[h];
        if (m->rank < 0) return NULL;
        if (m->left == left && m->right == right) return m;
    }
}

/* ============================================================================
 * Init / free
 * ========================================================================== */

static void tokenizer_free(Tokenizer *t)
{
    if (!t) return;
    free(t->offs);
    free(t->blob);
    free(t->type);
    free(t->piece_slots);
    free(t->merge_slots);
    free(t->trie);
    memset(t, 0, sizeof *t);
}

/* Add an added token to the trie. The node array was sized for the total
 * length of all added pieces, so it cannot overflow. */
static void tok_trie_insert(Tokenizer *t, const unsigned char *s, size_t n, int32_t id)
{
    int32_t node = t->root_child[s[0]];
    size_t i;
    if (node < 0) {
        node = t->n_trie++;
        t->trie[node].child = t->trie[node].sibling = t->trie[node].id = -1;
        t->trie[node].byte = s[0];
        t->root_child[s[0]] = node;
    }
    for (i = 1; i < n; i++) {
        int32_t c = t->trie[node].child;
        while (c >= 0 && t->trie[c].byte != s[i]) c = t->trie[c].sibling;
        if (c < 0) {
            c = t->n_trie++;
            t->trie[c].child = -1;
            t->trie[c].id = -1;
            t->trie[c].byte = s[i];
            t->trie[c].sibling = t->trie[node].child;
            t->trie[node].child = c;
        }
        node = c;
    }
    /* The same string twice: the first id wins, as with any exact matcher. */
    if (t->trie[node].id < 0) t->trie[node].id = id;
}

/* The functions that can fail return 0 (or a count), or one of these. */
enum { TOK_BAD = -1, TOK_NOMEM = -2 };

static int tok_oom(char *err, size_t errsize)
{
    tok_errf(err, errsize, "tokenizer: out of memory");
    return TOK_NOMEM;
}

/* The pieces: offsets into the string blob (a copy, so the tokenizer does not depend on
 * the lifetime of the caller's buffer), token types, and the piece -> id hash table. */
static int tok_load_pieces(Tokenizer *t, const unsigned char *p_offs, const unsigned char *p_type,
                           const unsigned char *p_blob, uint64_t blob_size, char *err, size_t errsize)
{
    uint32_t i, n_tokens = (uint32_t)t->n_tokens;
    /* --- offsets and blob ------------------------------------------------ */
    t->offs = (uint32_t *)malloc(((size_t)n_tokens + 1) * sizeof *t->offs);
    if (!t->offs) return tok_oom(err, errsize);
    for (i = 0; i <= n_tokens; i++) {
        t->offs[i] = tok_rd32(p_offs + 4 * (size_t)i);
        if ((i > 0 && t->offs[i] < t->offs[i - 1]) || t->offs[i] > blob_size) {
            tok_errf(err, errsize, "tokenizer: piece offset %lu (%lu) is out of order or beyond the %llu-byte string blob",
                     (unsigned long)i, (unsigned long)t->offs[i], (unsigned long long)blob_size);
            return -1;
        }
    }
    /* trailing padding is ignored */
    for (i = 0; i < n_tokens; i++)
        if (t->offs[i + 1] - t->offs[i] > t->max_piece) t->max_piece = t->offs[i + 1] - t->offs[i];
    t->blob = (unsigned char *)malloc((size_t)t->offs[n_tokens] + 1);
    if (!t->blob) return tok_oom(err, errsize);
    memcpy(t->blob, p_blob, t->offs[n_tokens]);

    /* --- token types ------------------------------------------------------ */
    t->type = (unsigned char *)malloc(n_tokens);
    if (!t->type) return tok_oom(err, errsize);
    for (i = 0; i < n_tokens; i++) {
        t->type[i] = p_type[i];
        if (p_type[i] > TOKTYPE_SPECIAL) {
            tok_errf(err, errsize, "tokenizer: token %lu has unknown type %d", (unsigned long)i, p_type[i]);
            return -1;
        }
    }

    /* --- piece -> id table -------------------------------------------- */
    t->piece_mask = tok_table_size(n_tokens) - 1;
    t->piece_slots = (int32_t *)malloc(((size_t)t->piece_mask + 1) * sizeof(int32_t));
    if (!t->piece_slots) return tok_oom(err, errsize);
    memset(t->piece_slots, 0xFF, ((size_t)t->piece_mask + 1) * sizeof(int32_t)); /* all -1 */
    for (i = 0; i < n_tokens; i++) {
        size_t pl;
        const unsigned char *p = tok_piece(t, (int)i, &pl);
        uint32_t h;
        if (pl == 0) continue; /* id absent from tokenizer.json */
        for (h = tok_hash_bytes(p, pl) & t->piece_mask;; h = (h + 1) & t->piece_mask) {
            int32_t o = t->piece_slots[h];
            size_t ol;
            const unsigned char *op;
            if (o < 0) {
                t->piece_slots[h] = (int32_t)i;
                break;
            }
            op = tok_piece(t, o, &ol);
            if (ol == pl && memcmp(op, p, pl) == 0) break; /* duplicate: lowest id wins */
        }
    }
    for (i = 0; i < 128; i++) {
        unsigned char c = (unsigned char)i;
        t->ascii_id[i] = c == ' ' ? tok_piece_find(t, tok_lower_block, 3) : tok_piece_find(t, &c, 1);
    }
    for (i = 0; i < 256; i++) {
        char name[8];
        /* the exact spelling HF's BPE looks up: format!("<{:#04X}>", b) */
        snprintf(name, sizeof name, "<0x%02X>", (unsigned)i);
        t->byte_id[i] = tok_piece_find(t, (const unsigned char *)name, 6);
    }
    t->unk_id = tok_piece_find(t, (const unsigned char *)"<unk>", 5);

    return 0;
}

/* The merges, in rank order, into the (left, right) -> rank hash table. */
static int tok_load_merges(Tokenizer *t, const unsigned char *p_merges, char *err, size_t errsize)
{
    uint32_t i, n_tokens = (uint32_t)t->n_tokens, n_merges = (uint32_t)t->n_merges;
    /* --- merges --------------------------------------------------------- */
    t->merge_mask = tok_table_size(n_merges) - 1;
    t->merge_slots = (TokMergeSlot *)malloc(((size_t)t->merge_mask + 1) * sizeof *t->merge_slots);
    if (!t->merge_slots) return tok_oom(err, errsize);
    for (i = 0; i <= t->merge_mask; i++) t->merge_slots[i].rank = -1;
    for (i = 0; i < n_merges; i++) {
        uint32_t a = tok_rd32(p_merges + 12 * (size_t)i);
        uint32_t b = tok_rd32(p_merges + 12 * (size_t)i + 4);
        uint32_t m = tok_rd32(p_merges + 12 * (size_t)i + 8);
        size_t al, bl, ml;
        const unsigned char *ap, *bp, *mp;
        uint32_t h;
        if (a >= n_tokens || b >= n_tokens || m >= n_tokens) {
            tok_errf(err, errsize, "tokenizer: merge %lu has an id out of range (%lu %lu -> %lu, n_tokens %lu)",
                     (unsigned long)i, (unsigned long)a, (unsigned long)b, (unsigned long)m,
                     (unsigned long)n_tokens);
            return -1;
        }
        /* A merge must produce the concatenation of its halves; checking it
         * is cheap and catches a section written against another vocab. */
        ap = tok_piece(t, (int)a, &al);
        bp = tok_piece(t, (int)b, &bl);
        mp = tok_piece(t, (int)m, &ml);
        if (al == 0 || bl == 0 || ml != al + bl || memcmp(mp, ap, al) != 0 || memcmp(mp + al, bp, bl) != 0) {
            tok_errf(err, errsize, "tokenizer: merge %lu: piece %lu is not piece %lu + piece %lu",
                     (unsigned long)i, (unsigned long)m, (unsigned long)a, (unsigned long)b);
            return -1;
        }
        for (h = tok_hash_pair(a, b) & t->merge_mask;; h = (h + 1) & t->merge_mask) {
            TokMergeSlot *slot = &t->merge_slots[h];
            /* A repeated pair keeps the LAST rank: HF builds a HashMap from
             * the merge list in order, so later entries overwrite. */
            if (slot->rank < 0 || (slot->left == (int32_t)a && slot->right == (int32_t)b)) {
                slot->left = (int32_t)a;
                slot->right = (int32_t)b;
                slot->rank = (int32_t)i;
                slot->merged = (int32_t)m;
                break;
            }
        }
    }

    return 0;
}

/* The added tokens, into the trie that finds them in raw text. */
static int tok_load_added(Tokenizer *t, const unsigned char *p_added, char *err, size_t errsize)
{
    uint32_t i, n_tokens = (uint32_t)t->n_tokens, n_added = (uint32_t)t->n_added;
    size_t trie_nodes = 1; /* +1: never malloc(0) */
    /* --- added tokens -> trie -------------------------------------------- */
    for (i = 0; i < 256; i++) t->root_child[i] = -1;
    for (i = 0; i < n_added; i++) {
        uint32_t id = tok_rd32(p_added + 4 * (size_t)i);
        if (id >= n_tokens) {
            tok_errf(err, errsize, "tokenizer: added token %lu has id %lu >= n_tokens %lu",
                     (unsigned long)i, (unsigned long)id, (unsigned long)n_tokens);
            return -1;
        }
        if (t->type[id] != TOKTYPE_ADDED && t->type[id] != TOKTYPE_SPECIAL) {
            tok_errf(err, errsize, "tokenizer: added token id %lu has type %d, expected 2 or 3",
                     (unsigned long)id, t->type[id]);
            return -1;
        }
        if (t->offs[id + 1] == t->offs[id]) {
            tok_errf(err, errsize, "tokenizer: added token id %lu has an empty piece", (unsigned long)id);
            return -1;
        }
        /* encode matches added tokens byte by byte on valid UTF-8 text: only a piece that is
         * whole characters matches at character boundaries (one that starts with a
         * continuation byte would split a character, and BPE would loop on the half) */
        if (!tok_utf8_valid(t->blob + t->offs[id], t->offs[id + 1] - t->offs[id], NULL)) {
            tok_errf(err, errsize, "tokenizer: added token id %lu is not valid UTF-8", (unsigned long)id);
            return -1;
        }
        trie_nodes += t->offs[id + 1] - t->offs[id];
    }
    t->trie = (TokTrieNode *)malloc(trie_nodes * sizeof *t->trie);
    if (!t->trie) return tok_oom(err, errsize);
    t->n_trie = 0;
    for (i = 0; i < n_added; i++) {
        uint32_t id = tok_rd32(p_added + 4 * (size_t)i);
        size_t pl;
        const unsigned char *p = tok_piece(t, (int)id, &pl);
        tok_trie_insert(t, p, pl, (int32_t)id);
    }
    return 0;
}

/* Reads the tokenizer section (FORMAT.md) of `size` bytes at sec. */
static int tokenizer_init(Tokenizer *t, const unsigned char *sec, size_t size, char *err, size_t errsize)
{
    uint32_t n_tokens, n_merges, n_added, reserved;
    uint64_t need, blob_size;
    int rc;
    const unsigned char *p_offs, *p_merges, *p_added, *p_type, *p_blob;

    memset(t, 0, sizeof *t);
    if (!sec || size < 16) {
        tok_errf(err, errsize, "tokenizer: section too small (%lu bytes)", (unsigned long)size);
        return -1;
    }
    n_tokens = tok_rd32(sec);
    n_merges = tok_rd32(sec + 4);
    n_added = tok_rd32(sec + 8);
    reserved = tok_rd32(sec + 12);
    if (reserved != 0) {
        tok_errf(err, errsize, "tokenizer: reserved header field is %lu, expected 0", (unsigned long)reserved);
        return -1;
    }
    /* Far above any real vocab (Gemma 3: 262,145 tokens, 514,906 merges) and
     * low enough that no table size or int id can overflow. */
    if (n_tokens == 0 || n_tokens > (1u << 26) || n_merges > (1u << 27) || n_added > n_tokens) {
        tok_errf(err, errsize, "tokenizer: implausible counts (n_tokens %lu, n_merges %lu, n_added %lu)",
                 (unsigned long)n_tokens, (unsigned long)n_merges, (unsigned long)n_added);
        return -1;
    }
    /* 64-bit arithmetic: every term is < 2^36, so this cannot overflow */
    need = 16 + 4 * ((uint64_t)n_tokens + 1) + 12 * (uint64_t)n_merges + 4 * (uint64_t)n_added + n_tokens;
    if (need > (uint64_t)size) {
        tok_errf(err, errsize, "tokenizer: section truncated (tables need %llu bytes, section has %lu)",
                 (unsigned long long)need, (unsigned long)size);
        return -1;
    }
    blob_size = (uint64_t)size - need;
    p_offs = sec + 16;
    p_merges = p_offs + 4 * ((size_t)n_tokens + 1);
    p_added = p_merges + 12 * (size_t)n_merges;
    p_type = p_added + 4 * (size_t)n_added;
    p_blob = p_type + n_tokens;

    t->n_tokens = (int)n_tokens;
    t->n_merges = (int)n_merges;
    t->n_added = (int)n_added;
    t->unk_id = -1;

    rc = tok_load_pieces(t, p_offs, p_type, p_blob, blob_size, err, errsize);
    if (rc == 0) rc = tok_load_merges(t, p_merges, err, errsize);
    if (rc == 0) rc = tok_load_added(t, p_added, err, errsize);
    if (rc != 0) tokenizer_free(t);
    return rc;
}

/* ============================================================================
 * Encode: added-token split
 * ========================================================================== */

/* Longest added token that starts at s[0] (n >= 1 bytes): its id, with its
 * byte length in *mlen; -1 if none starts here. */
static int32_t tok_added_match(const Tokenizer *t, const unsigned char *s, size_t n, size_t *mlen)
{
    int32_t node = t->root_child[s[0]], best = -1;
    size_t i = 1;
    while (node >= 0) {
        if (t->trie[node].id >= 0) {
            best = t->trie[node].id;
            *mlen = i;
        }
        if (i == n) break;
        node = t->trie[node].child;
        while (node >= 0 && t->trie[node].byte != s[i]) node = t->trie[node].sibling;
        i++;
    }
    return best;
}

/* ============================================================================
 * Encode: BPE over one word
 *
 * Symbols are a doubly linked list over an array (a merged-away symbol stays
 * in place, marked dead), and candidate merges sit in a binary min-heap keyed
 * by (rank, position). That is the algorithm of HF's Rust BPE (same
 * tie-break: lowest rank, then leftmost), in O(n log n).
 *
 * A popped candidate is stale if either of its symbols has changed since it
 * was pushed. Symbols only ever grow to the right, and a longer string is a
 * different id, so "same position, same left id, same right id" proves the
 * pair is unchanged; comparing ids saves a hash lookup per pop.
 * ========================================================================== */

typedef struct {
    int32_t id;   /* current token id */
    int32_t prev; /* previous live symbol, -1 at the start */
    int32_t next; /* next live symbol, -1 at the end */
    int32_t live; /* 0 once merged into its left neighbour */
} TokSym;

typedef struct {
    int32_t rank;   /* merge rank = priority (lower first) */
    int32_t pos;    /* index of the left symbol */
    int32_t left;   /* ids of the pair when pushed, to detect staleness */
    int32_t right;
} TokCand;

/* Scratch space of one encode call, grown to the longest word seen. */
typedef struct {
    TokSym *sym;
    TokCand *heap;
    size_t cap; /* symbols that fit; the heap holds 3*cap */
} TokWork;

static int tok_cand_less(TokCand a, TokCand b)
{
    return a.rank < b.rank || (a.rank == b.rank && a.pos < b.pos);
}

static void tok_heap_push(TokCand *h, size_t *n, TokCand c)
{
    size_t i = (*n)++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!tok_cand_less(c, h[parent])) break;
        h[i] = h[parent];
        i = parent;
    }
    h[i] = c;
}

static TokCand tok_heap_pop(TokCand *h, size_t *n)
{
    TokCand top = h[0], last = h[--*n];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= *n) break;
        if (c + 1 < *n && tok_cand_less(h[c + 1], h[c])) c++;
        if (!tok_cand_less(h[c], last)) break;
        h[i] = h[c];
        i = c;
    }
    if (*n > 0) h[i] = last;
    return top;
}

/* Push the merge candidate for the pair starting at symbol pos, if any. */
static void tok_push_pair(const Tokenizer *t, TokWork *w, size_t *nheap, int32_t pos)
{
    int32_t next = w->sym[pos].next;
    const TokMergeSlot *m;
    if (next < 0) return;
    m = tok_merge_find(t, w->sym[pos].id, w->sym[next].id);
    if (m) {
        TokCand c;
        c.rank = m->rank;
        c.pos = pos;
        c.left = m->left;
        c.right = m->right;
        tok_heap_push(w->heap, nheap, c);
    }
}

/* BPE-encode one word s[0..n) (raw text; the " " -> "▁" normalisation is done
 * here, per character) and append its ids to out[*nout]. The text is known to
 * be valid UTF-8. Returns 0, or -1 with a message. */
static int tok_bpe_word(const Tokenizer *t, TokWork *w, const unsigned char *s, size_t n,
                        int *out, size_t *nout, char *err, size_t errsize)
{
    size_t i = 0, nheap = 0;
    int32_t nsym = 0, k;

    /* Every symbol covers at least one input byte, so n symbols suffice. */
    if (n > w->cap) {
        TokSym *ns = (TokSym *)realloc(w->sym, n * sizeof *ns);
        TokCand *nh;
        if (ns) w->sym = ns;
        nh = ns ? (TokCand *)realloc(w->heap, 3 * n * sizeof *nh) : NULL;
        if (!nh) return tok_oom(err, errsize);
        w->heap = nh;
        w->cap = n;
    }

    /* 1. One symbol per character; byte fallback for unknown characters. */
    while (i < n) {
        const unsigned char *c = s + i; /* the character after normalisation */
        size_t cl = 1, at = i;
        int32_t id;
        if (s[i] < 0x80) {
            id = t->ascii_id[s[i]];
            if (s[i] == ' ') {
                c = tok_lower_block;
                cl = 3;
            }
            i++;
        } else {
            cl = (size_t)tok_utf8_seq(s + i, n - i);
            id = tok_piece_find(t, c, cl);
            i += cl;
        }
        if (id >= 0) {
            w->sym[nsym++].id = id;
            continue;
        }
        /* No piece for this character: its bytes as <0xNN> if all exist... */
        {
            size_t j;
            for (j = 0; j < cl && t->byte_id[c[j]] >= 0; j++) ;
            if (j == cl) {
                for (j = 0; j < cl; j++) w->sym[nsym++].id = t->byte_id[c[j]];
                continue;
            }
        }
        /* ...else <unk>, fused with a preceding <unk> (fuse_unk). Never
         * happens with Gemma 3, which has all 256 byte pieces. */
        if (t->unk_id < 0) {
            tok_errf(err, errsize, "tokenizer: character at byte %lu has no piece and there is no <unk>",
                     (unsigned long)at);
            return -1;
        }
        if (nsym == 0 || w->sym[nsym - 1].id != t->unk_id) w->sym[nsym++].id = t->unk_id;
    }
    for (k = 0; k < nsym; k++) {
        w->sym[k].prev = k - 1;
        w->sym[k].next = k + 1 < nsym ? k + 1 : -1;
        w->sym[k].live = 1;
    }

    /* 2. Apply merges, lowest rank first. */
    for (k = 0; k + 1 < nsym; k++) tok_push_pair(t, w, &nheap, k);
    while (nheap > 0) {
        TokCand c = tok_heap_pop(w->heap, &nheap);
        TokSym *left = &w->sym[c.pos];
        int32_t right = left->next;
        if (!left->live || right < 0 || left->id != c.left || w->sym[right].id != c.right) continue; /* stale */
        left->id = tok_merge_find(t, c.left, c.right)->merged;
        left->next = w->sym[right].next;
        w->sym[right].live = 0;
        if (left->next >= 0) w->sym[left->next].prev = c.pos;
        if (left->prev >= 0) tok_push_pair(t, w, &nheap, left->prev);
        tok_push_pair(t, w, &nheap, c.pos);
    }

    /* 3. Emit the surviving symbols. */
    for (k = nsym > 0 ? 0 : -1; k >= 0; k = w->sym[k].next) out[(*nout)++] = w->sym[k].id;
    return 0;
}

/* ============================================================================
 * Encode: public entry point
 * ========================================================================== */

/* The ids of text[0..len) into *ids (malloc'd): their count, or TOK_BAD / TOK_NOMEM. */
static int tokenizer_encode(const Tokenizer *t, const char *text, size_t len, int **ids, char *err, size_t errsize)
{
    const unsigned char *s = (const unsigned char *)text;
    size_t i = 0, seg = 0, nout = 0, bad = 0;
    int *out, rc;
    TokWork w;

    *ids = NULL;
    if (len > (size_t)(INT_MAX / 4)) {
        tok_errf(err, errsize, "tokenizer: text too long (%lu bytes)", (unsigned long)len);
        return -1;
    }
    if (len > 0 && !text) {
        tok_errf(err, errsize, "tokenizer: NULL text");
        return -1;
    }
    if (!tok_utf8_valid(s, len, &bad)) {
        tok_errf(err, errsize, "tokenizer: invalid UTF-8 at byte %lu of %lu", (unsigned long)bad,
                 (unsigned long)len);
        return -1;
    }
    /* Each token covers at least one input byte. */
    out = (int *)malloc((len + 1) * sizeof *out);
    if (!out) return tok_oom(err, errsize);
    memset(&w, 0, sizeof w);

    /* Added tokens first, on the raw text; the stretches between them are
     * single BPE words. An added token's first byte is never a UTF-8
     * continuation byte, so stepping byte by byte cannot match mid-character. */
    while (i < len) {
        size_t mlen = 0;
        int32_t id = t->root_child[s[i]] >= 0 ? tok_added_match(t, s + i, len - i, &mlen) : -1;
        if (id < 0) {
            i++;
            continue;
        }
        if (i > seg && (rc = tok_bpe_word(t, &w, s + seg, i - seg, out, &nout, err, errsize)) != 0) goto fail;
        out[nout++] = id;
        i += mlen;
        seg = i;
    }
    if (len > seg && (rc = tok_bpe_word(t, &w, s + seg, len - seg, out, &nout, err, errsize)) != 0) goto fail;

    free(w.sym);
    free(w.heap);
    *ids = out;
    return (int)nout;

fail:
    free(w.sym);
    free(w.heap);
    free(out);
    return rc;
}

/* ============================================================================
 * Decode
 * ========================================================================== */

/* Copy piece p[0..n) to dst with every "▁" turned into " "; returns bytes written. */
static size_t tok_copy_unblock(unsigned char *dst, const unsigned char *p, size_t n)
{
    size_t i = 0, k = 0;
    while (i < n) {
        if (p[i] == 0xE2 && i + 2 < n && p[i + 1] == 0x96 && p[i + 2] == 0x81) {
            dst[k++] = ' ';
            i += 3;
        } else {
            dst[k++] = p[i++];
        }
    }
    return k;
}

/* A finished run of byte-fallback bytes sits at out[start..end). HF keeps it
 * if it is valid UTF-8 as a whole, else replaces EACH byte by U+FFFD (Rust's
 * ByteFallback decoder; not one per maximal subpart as TextDecoder would).
 * Returns the new end. There is room: each byte came from a 6-byte piece. */
static size_t tok_close_byte_run(unsigned char *out, size_t start, size_t end)
{
    size_t k, nb = end - start;
    if (tok_utf8_valid(out + start, nb, NULL)) return end;
    for (k = 0; k < nb; k++) {
        out[start + 3 * k] = 0xEF;
        out[start + 3 * k + 1] = 0xBF;
        out[start + 3 * k + 2] = 0xBD;
    }
    return start + 3 * nb;
}

/* The text of ids[0..n) into *text (malloc'd, NUL-terminated; its length in *outlen):
 * 0, or TOK_BAD / TOK_NOMEM. */
static int tokenizer_decode(const Tokenizer *t, const int *ids, int n, char **text, size_t *outlen, char *err,
                            size_t errsize)
{
    size_t cap = 1, k = 0, run = 0;
    int i, in_run = 0;
    unsigned char *out;

    *text = NULL;
    if (outlen) *outlen = 0;
    if (n < 0 || (n > 0 && !ids)) {
        tok_errf(err, errsize, "tokenizer: bad id array");
        return TOK_BAD;
    }
    /* Output never exceeds the pieces' total length ("▁" shrinks 3 -> 1, a
     * 6-byte <0xNN> piece gives at most 3 bytes), so size it up front. */
    for (i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= t->n_tokens) {
            tok_errf(err, errsize, "tokenizer: token id %d at position %d is out of range [0, %d)", ids[i], i,
                     t->n_tokens);
            return TOK_BAD;
        }
        cap += t->offs[ids[i] + 1] - t->offs[ids[i]];
    }
    out = (unsigned char *)malloc(cap);
    if (!out) return tok_oom(err, errsize);
    for (i = 0; i < n; i++) {
        size_t pl;
        const unsigned char *p = tok_piece(t, ids[i], &pl);
        int b = tok_byte_piece(p, pl);
        if (b >= 0) {
            if (!in_run) {
                run = k;
                in_run = 1;
            }
            out[k++] = (unsigned char)b;
            continue;
        }
        if (in_run) {
            k = tok_close_byte_run(out, run, k);
            in_run = 0;
        }
        k += tok_copy_unblock(out + k, p, pl);
    }
    if (in_run) k = tok_close_byte_run(out, run, k);
    out[k] = 0;
    if (outlen) *outlen = k;
    *text = (char *)out;
    return 0;
}

/* ============================================================================
 * Streaming decode (for printing tokens as they are generated)
 * ========================================================================== */

typedef struct {
    unsigned char pending[8]; /* byte-fallback bytes of an unfinished character */
    int npending;
} TokenStream;

/* The most bytes tokenstream_piece writes for one id: an unfinished character given up
 * (at most 4 bytes, each as U+FFFD) and then the longest piece. */
static size_t tokenstream_max(const Tokenizer *t)
{
    return 12 + t->max_piece;
}

/* Writes the U+FFFD of each pending byte to out (which has room); returns the length. */
static size_t tok_put_fffd(const TokenStream *s, unsigned char *out)
{
    int i, n = s->npending > 0 && s->npending <= (int)sizeof s->pending ? s->npending : 0;
    for (i = 0; i < n; i++) memcpy(out + 3 * i, "\xEF\xBF\xBD", 3);
    return 3 * (size_t)n;
}

/* Feed one id; the text it completes goes to out[0..cap), and its length is returned.
 * Whole characters are written; bytes of byte-fallback tokens wait in s->pending until
 * they complete a character. A byte run that can no longer become valid UTF-8 is
 * written as one U+FFFD per byte (as HF Rust does for an invalid run; only a valid prefix
 * already written cannot be taken back, so a run that goes bad late differs from the
 * batch decode). Out-of-range ids give nothing. If the text needs more than cap bytes
 * (tokenstream_max always fits), nothing is written and the stream is unchanged: the
 * length needed is returned. */
static size_t tokenstream_piece(const Tokenizer *t, TokenStream *s, int id, char *out, size_t cap)
{
    unsigned char *o = (unsigned char *)out;
    size_t pl, k;
    const unsigned char *p;
    int b;
    if (id < 0 || id >= t->n_tokens) return 0;
    if (s->npending < 0 || s->npending >= (int)sizeof s->pending) s->npending = 0; /* corrupt state */
    p = tok_piece(t, id, &pl);
    b = tok_byte_piece(p, pl);
    if (b >= 0) {
        TokenStream next = *s;
        int r;
        next.pending[next.npending++] = (unsigned char)b;
        r = tok_utf8_seq(next.pending, (size_t)next.npending);
        if (r == 0) { /* a valid prefix: wait for more */
            *s = next;
            return 0;
        }
        k = r > 0 ? (size_t)r : 3 * (size_t)next.npending;
        if (k > cap) return k;
        if (r > 0) memcpy(o, next.pending, k);
        else tok_put_fffd(&next, o);
        s->npending = 0;
        return k;
    }
    /* a normal piece: the pending bytes given up, then the piece with "▁" as " " */
    k = 3 * (size_t)s->npending;
    {
        size_t i, need = k;
        for (i = 0; i < pl; i++, need++)
            if (p[i] == 0xE2 && i + 2 < pl && p[i + 1] == 0x96 && p[i + 2] == 0x81) i += 2;
        if (need > cap) return need;
    }
    tok_put_fffd(s, o);
    s->npending = 0;
    return k + tok_copy_unblock(o + k, p, pl);
}

/* End of stream (or before printing something else): an unfinished character becomes
 * U+FFFD per byte, as in a batch decode. Returns the length; as above if cap is short. */
static size_t tokenstream_end(const Tokenizer *t, TokenStream *s, char *out, size_t cap)
{
    size_t k = s->npending > 0 && s->npending <= (int)sizeof s->pending ? 3 * (size_t)s->npending : 0;
    (void)t;
    if (k > cap) return k;
    tok_put_fffd(s, (unsigned char *)out);
    s->npending = 0;
    return k;
}

/* ============================================================================
 * Chat template
 *
 * The Gemma 3 chat_template of tokenizer_config.json, for string contents:
 *
 *   <bos>
 *   if messages[0] is system: prefix = its content (untrimmed) + "\n\n",
 *                             and it is not rendered as a turn
 *   for each remaining message i (from 0): role must be "user" iff i is
 *     even; "assistant" is renamed "model", any other role is kept as is;
 *     "<start_of_turn>" role "\n" [prefix if i == 0] trim(content)
 *     "<end_of_turn>\n"
 *   if add_generation_prompt: "<start_of_turn>model\n"
 *
 * trim is Jinja's, i.e. Python's str.strip(): Unicode whitespace at both
 * ends. (@huggingface/jinja uses JS trim(), which also strips U+FEFF but not
 * U+001C..U+001F or U+0085; no fixture has those characters at an edge.)
 * ========================================================================== */

typedef struct {
    const char *role;    /* "system", "user" or "assistant" */
    const char *content; /* UTF-8, NUL-terminated */
} ChatMessage;

/* Python's str.isspace() set. */
static int tok_is_space(uint32_t c)
{
    return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 ||
           c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F ||
           c == 0x205F || c == 0x3000;
}

/* Trim Unicode whitespace from both ends of the valid UTF-8 s[0..n):
 * *start and the returned length delimit what is left. */
static size_t tok_trim(const unsigned char *s, size_t n, size_t *start)
{
    size_t a = 0, b = n;
    while (a < b) {
        int k = tok_utf8_seq(s + a, b - a);
        if (k <= 0 || !tok_is_space(tok_utf8_cp(s + a, k))) break;
        a += (size_t)k;
    }
    while (b > a) {
        size_t c = b - 1;
        int k;
        while (c > a && (s[c] & 0xC0) == 0x80) c--; /* back to the lead byte */
        k = tok_utf8_seq(s + c, b - c);
        if (k <= 0 || (size_t)k != b - c || !tok_is_space(tok_utf8_cp(s + c, k))) break;
        b = c;
    }
    *start = a;
    return b - a;
}

/* The conversation msgs[0..n) in the chat template, into *text (malloc'd): 0, or TOK_BAD
 * (roles out of order, invalid UTF-8) / TOK_NOMEM. */
static int chat_render(const ChatMessage *msgs, int n, int add_generation_prompt, char **text, char *err, size_t errsize)
{
    static const char bos[] = "<bos>", sot[] = "<start_of_turn>", eot[] = "<end_of_turn>\n",
                      gen[] = "<start_of_turn>model\n";
    const char *prefix = "";
    size_t cap, k = 0, bad;
    int i, first = 0;
    char *out;

    *text = NULL;
    if (n <= 0 || !msgs) {
        tok_errf(err, errsize, "chat: no messages");
        return TOK_BAD;
    }
    cap = sizeof bos + sizeof gen;
    for (i = 0; i < n; i++) {
        size_t rl, cl;
        if (!msgs[i].role || !msgs[i].content) {
            tok_errf(err, errsize, "chat: message %d has no role or no content", i);
            return TOK_BAD;
        }
        rl = strlen(msgs[i].role);
        cl = strlen(msgs[i].content);
        if (!tok_utf8_valid((const unsigned char *)msgs[i].role, rl, &bad) ||
            !tok_utf8_valid((const unsigned char *)msgs[i].content, cl, &bad)) {
            tok_errf(err, errsize, "chat: message %d is not valid UTF-8", i);
            return TOK_BAD;
        }
        /* a system content can be copied twice at most (prefix, never a turn) */
        cap += sizeof sot + rl + 2 + cl + sizeof eot + 4;
    }
    if (strcmp(msgs[0].role, "system") == 0) {
        prefix = msgs[0].content;
        first = 1;
    }
    for (i = first; i < n; i++) {
        int is_user = strcmp(msgs[i].role, "user") == 0, shown = 0;
        if (is_user != ((i - first) % 2 == 0)) {
            /* the role is the caller's text: named up to its first control character, so
             * the message stays one line */
            while (shown < 40 && (unsigned char)msgs[i].role[shown] >= 0x20 && msgs[i].role[shown] != 0x7F) shown++;
            tok_errf(err, errsize,
                     "chat: conversation roles must alternate user/assistant/user/... after an optional "
                     "system message (message %d is \"%.*s\"%s)", i, shown, msgs[i].role,
                     msgs[i].role[shown] ? "..." : "");
            return TOK_BAD;
        }
    }
    out = (char *)malloc(cap);
    if (!out) {
        tok_errf(err, errsize, "chat: out of memory");
        return TOK_NOMEM;
    }

#define CHAT_PUT(p, len) (memcpy(out + k, (p), (len)), k += (len))
    CHAT_PUT(bos, sizeof bos - 1);
    for (i = first; i < n; i++) {
        const char *role = strcmp(msgs[i].role, "assistant") == 0 ? "model" : msgs[i].role;
        size_t a, tl = tok_trim((const unsigned char *)msgs[i].content, strlen(msgs[i].content), &a);
        CHAT_PUT(sot, sizeof sot - 1);
        CHAT_PUT(role, strlen(role));
        CHAT_PUT("\n", 1);
        if (i == first && first) {
            CHAT_PUT(prefix, strlen(prefix));
            CHAT_PUT("\n\n", 2);
        }
        CHAT_PUT(msgs[i].content + a, tl);
        CHAT_PUT(eot, sizeof eot - 1);
    }
    if (add_generation_prompt) CHAT_PUT(gen, sizeof gen - 1);
#undef CHAT_PUT
    out[k] = 0;
    *text = out;
    return 0;
}
