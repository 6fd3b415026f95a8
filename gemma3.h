/*
 * gemma3.h — the gemma3.c library: Gemma 3 text models embedded in a C program.
 *
 * Build: `make lib` gives libgemma3.a and libgemma3.so (gemma3.c compiled with
 * -DGEMMA3_NO_MAIN); link with -lm (and -fopenmp if the library was built with OpenMP).
 * examples/chat.c is a whole program on this header.
 *
 * Errors. Every call that can fail takes an optional `gemma3_error *err` (NULL: no
 * message; gemma3_stream_*, which fail only on NULL arguments, take none) and returns a negative GEMMA3_E_* code on failure, 0 or a count on success;
 * on failure err->code is that code and err->message a one-line description. Nothing in
 * the library exits, aborts or prints. Bad input (a corrupt or truncated model, a token id
 * outside the model's vocabulary, invalid UTF-8, a full context) is refused, never read past.
 *
 * Ownership. The library never keeps a pointer the caller passed in, except the bytes
 * given to gemma3_open_memory and the arena given to gemma3_session_new, which must
 * outlive the model and the session. Everything the library returns a pointer to (the
 * logits) belongs to it and stays valid as documented at the call.
 *
 * Threads. A model is read-only once open: any number of sessions, on any threads, may
 * use one model at once, and the tokenizer calls may be made on it from any thread. A
 * session is not thread-safe: use each from one thread at a time. Sessions on different
 * threads give exactly the tokens they give one at a time. With OpenMP, a session's
 * forward pass runs on OpenMP's thread count at its creation (OMP_NUM_THREADS, or
 * omp_set_num_threads on the creating thread); without OpenMP, on the calling thread.
 *
 * Memory. gemma3_open_* allocates the model's tables (a few MB: the tokenizer, the layer
 * list). gemma3_session_new allocates the KV cache and the activations, or, with an arena,
 * carves them from it and allocates nothing. With an arena, gemma3_feed, gemma3_feed_logits,
 * gemma3_feed_image, gemma3_logits, gemma3_sample, gemma3_generate, gemma3_rewind,
 * gemma3_position, gemma3_set_sampling and gemma3_stream_* never allocate either. The calls that do:
 * gemma3_open_* (the model's tables), gemma3_session_new without an arena (the session's
 * block), gemma3_tokenize, gemma3_detokenize and gemma3_chat_render (temporary memory,
 * freed before they return), and gemma3_chat_turn (temporary memory, and the
 * conversation's text, kept until gemma3_session_free).
 */
#ifndef GEMMA3_H
#define GEMMA3_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Error codes (negative; 0 is success). */
enum {
    GEMMA3_E_ARG = -1,       /* a NULL or invalid argument */
    GEMMA3_E_IO = -2,        /* the model file cannot be opened or read */
    GEMMA3_E_FORMAT = -3,    /* the bytes are not a valid gemma3.c model (bad magic, truncated, ...) */
    GEMMA3_E_NOMEM = -4,     /* out of memory */
    GEMMA3_E_TOKEN = -5,     /* a token id outside [0, vocab_size) */
    GEMMA3_E_TEXT = -6,      /* text the tokenizer or chat template refuses (invalid UTF-8, roles) */
    GEMMA3_E_TOKENIZER = -7, /* the model file has no tokenizer */
    GEMMA3_E_CONTEXT = -8,   /* the session's context is full */
    GEMMA3_E_ARENA = -9,     /* the caller's arena is too small */
    GEMMA3_E_STATE = -10,    /* no logits to read or sample: nothing fed since the last sample */
    GEMMA3_E_NUMERIC = -11   /* the logits are NaN or infinite (such values in the weights) */
};

typedef struct {
    int code;          /* the GEMMA3_E_* of the failure */
    char message[256]; /* one line, NUL-terminated */
} gemma3_error;

typedef struct gemma3_model gemma3_model;     /* opaque: an open model file */
typedef struct gemma3_session gemma3_session; /* opaque: a KV cache, position, sampler, chat */

/* ---- models ------------------------------------------------------------------------ */

/* Open the model file at `path` (made by export.py; FORMAT.md) and check all of it. The
 * bytes are mapped (mmap) where the host has it, else read into memory. On success
 * *model is the model (free it with gemma3_close) and 0 is returned.
 * Errors: GEMMA3_E_ARG, GEMMA3_E_IO, GEMMA3_E_FORMAT, GEMMA3_E_NOMEM. */
int gemma3_open_file(const char *path, gemma3_model **model, gemma3_error *err);

/* Open a model from `size` bytes at `data` the caller holds (a buffer, a flash or ROM
 * region, an array linked into the image): no copy, no file system, no mmap. The bytes
 * stay the caller's, are never written, and must outlive the model. Tensors are read in
 * place: `data` must be at least 4-byte aligned (GEMMA3_E_ARG otherwise; 64 is best, as
 * mmap gives). On a big-endian host the tensors must be byte-swapped, so there the bytes
 * are copied once into memory the model owns.
 * Errors: GEMMA3_E_ARG, GEMMA3_E_FORMAT, GEMMA3_E_NOMEM. */
int gemma3_open_memory(const void *data, size_t size, gemma3_model **model, gemma3_error *err);

/* Free a model (NULL is ignored). Every session on it must be freed first. */
void gemma3_close(gemma3_model *model);

/* What a model is, from its file header. */
typedef struct {
    int vocab_size;      /* rows of the embedding table: valid token ids are [0, vocab_size) */
    int dim;             /* hidden_size */
    int hidden_dim;      /* intermediate_size */
    int n_layers, n_heads, n_kv_heads, head_dim;
    int sliding_window;  /* keys a sliding-window layer sees */
    int max_context;     /* max_position_embeddings: the largest context a session can have */
    int bos_id, eos_id, eot_id, sot_id; /* <bos>, <eos>, <end_of_turn>, <start_of_turn> */
    int has_tokenizer;   /* 0: the tokenizer and chat calls return GEMMA3_E_TOKENIZER */
    int max_piece_bytes; /* a buffer this big always holds one gemma3_stream_put's output */
    int image_tokens;    /* soft tokens an image becomes (mm_tokens_per_image, 256); 0: a text
                            model (no image path in the file) */
    int image_size;      /* the square images are resized to (896) */
    int image_id, boi_id, eoi_id; /* <image_soft_token>, <start_of_image>, <end_of_image> */
} gemma3_config;

/* The model's configuration (a copy; all zeros if model is NULL). */
gemma3_config gemma3_model_config(const gemma3_model *model);

/* ---- tokenizer (models with has_tokenizer) ------------------------------------------- */

/* Token ids of the UTF-8 text[0..len) (no <bos> added; text may hold NUL bytes). Like
 * snprintf: writes at most `capacity` ids to `ids` (NULL with capacity 0 asks the size)
 * and returns how many the text has. Errors: GEMMA3_E_ARG, GEMMA3_E_TOKENIZER,
 * GEMMA3_E_TEXT (invalid UTF-8), GEMMA3_E_TOKEN (the text names an added token whose id
 * the model has no embedding for, e.g. "<image_soft_token>" with a 262,144-row table),
 * GEMMA3_E_NOMEM. */
int gemma3_tokenize(const gemma3_model *model, const char *text, size_t len, int *ids, int capacity,
                    gemma3_error *err);

/* The text of ids[0..n), as Hugging Face's decode. Like snprintf: writes at most
 * capacity - 1 bytes and a NUL to `text` (if capacity > 0) and returns the full length.
 * Errors: GEMMA3_E_ARG, GEMMA3_E_TOKENIZER, GEMMA3_E_TOKEN, GEMMA3_E_NOMEM. */
int gemma3_detokenize(const gemma3_model *model, const int *ids, int n, char *text, size_t capacity,
                      gemma3_error *err);

/* Streaming decode: text for one token at a time, in whole UTF-8 characters (a character
 * split over byte tokens comes out when complete). Start with a zeroed gemma3_stream. */
typedef struct {
    unsigned char pending[8]; /* bytes of an unfinished character */
    int npending;
} gemma3_stream;

/* The text token `id` completes, into out[0..capacity): returns its length in bytes (0 is
 * common: part of a character, or a token without text). If that is more than capacity,
 * nothing is written and the stream is unchanged (config.max_piece_bytes always fits).
 * An id outside [0, vocab_size) gives nothing. Never allocates; GEMMA3_E_ARG on NULLs. */
int gemma3_stream_put(const gemma3_model *model, gemma3_stream *stream, int id, char *out, size_t capacity);

/* End of a stream: an unfinished character becomes U+FFFD per byte (at most 24 bytes). */
int gemma3_stream_flush(const gemma3_model *model, gemma3_stream *stream, char *out, size_t capacity);

/* One message of a conversation. role: "system" (first message only), "user" or
 * "assistant"; content: NUL-terminated UTF-8. */
typedef struct {
    const char *role;
    const char *content;
} gemma3_message;

/* The Gemma 3 chat template (tokenizer_config.json's, byte for byte) of msgs[0..n),
 * starting with "<bos>"; with add_generation_prompt, ending with "<start_of_turn>model\n".
 * Like snprintf: writes at most capacity - 1 bytes and a NUL, returns the full length.
 * Errors: GEMMA3_E_ARG, GEMMA3_E_TEXT (roles that do not alternate, invalid UTF-8),
 * GEMMA3_E_NOMEM. */
int gemma3_chat_render(const gemma3_message *msgs, int n, int add_generation_prompt, char *text, size_t capacity,
                       gemma3_error *err);

/* ---- sessions ------------------------------------------------------------------------ */

typedef struct {
    int context;          /* tokens the KV cache holds; 0: min(max_context, 8192) */
    float temperature;    /* 0: greedy (argmax) */
    int top_k;            /* keep the k most likely tokens; 0: off */
    float top_p;          /* nucleus: the smallest set with probability >= top_p; 1: off */
    float min_p;          /* drop tokens below min_p * p(most likely); 0: off */
    uint64_t seed;        /* the sampler's random seed: the same seed gives the same tokens */
    const char *system_prompt; /* gemma3_chat_turn: an optional system message (copied) */
    void *arena;          /* optional caller memory for the whole session (see gemma3_session_bytes) */
    size_t arena_size;
    int images;           /* 1: the session takes images (gemma3_feed_image; a model with
                             image_tokens): it also holds the vision tower's activations */
} gemma3_options;

/* The defaults: context 0, temperature 1, top_k 64, top_p 0.95, min_p 0, seed 0, no arena,
 * no images. */
gemma3_options gemma3_default_options(void);

/* Bytes of memory a session with these options needs (the arena size to give it), or a
 * negative error: GEMMA3_E_ARG (bad options, a context over max_context). */
int64_t gemma3_session_bytes(const gemma3_model *model, const gemma3_options *options, gemma3_error *err);

/* Create a session on `model`: its own KV cache, position 0, sampler. options NULL means
 * the defaults. With options->arena, everything is carved from it (arena_size must be at
 * least gemma3_session_bytes; any alignment) and nothing is allocated, now or later, by
 * the calls listed at the top. Errors: GEMMA3_E_ARG, GEMMA3_E_ARENA, GEMMA3_E_NOMEM,
 * GEMMA3_E_TEXT (a system prompt that is not valid UTF-8). */
int gemma3_session_new(const gemma3_model *model, const gemma3_options *options, gemma3_session **session,
                       gemma3_error *err);

/* Free a session (NULL is ignored). The arena, if any, is the caller's again. */
void gemma3_session_free(gemma3_session *session);

/* Change the sampler (temperature, top_k, top_p, min_p, seed; the rest of *options is
 * ignored). Errors: GEMMA3_E_ARG. */
int gemma3_set_sampling(gemma3_session *session, const gemma3_options *options, gemma3_error *err);

/* Feed ids[0..n) at the next positions (a prompt goes through in batches). Afterwards
 * gemma3_logits gives the logits after the last one. Returns the new position.
 * Errors: GEMMA3_E_ARG, GEMMA3_E_TOKEN (nothing is fed), GEMMA3_E_CONTEXT (the ids do
 * not fit: nothing is fed). */
int gemma3_feed(gemma3_session *session, const int *ids, int n, gemma3_error *err);

/* As gemma3_feed, and also write the logits after every one of the n ids to the caller's
 * logits[n][vocab_size], and, if hidden is not NULL, the residual stream after the
 * embedding and after each layer to hidden[n][n_layers + 1][dim] (for debugging). The
 * logits are those gemma3_feed gives, to the bit. Errors: those of gemma3_feed;
 * GEMMA3_E_ARG for NULL logits; GEMMA3_E_NUMERIC if a logit is NaN or infinite (the ids
 * are fed and the logits written all the same). */
int gemma3_feed_logits(gemma3_session *session, const int *ids, int n, float *logits, float *hidden,
                       gemma3_error *err);

/* The logits (vocab_size floats) after the last fed token. The array belongs to the
 * session: valid until its next call other than gemma3_logits/gemma3_position; NULL (and
 * GEMMA3_E_STATE in err) if nothing was fed since the last sample or rewind. */
const float *gemma3_logits(gemma3_session *session, gemma3_error *err);

/* Sample the next token from the logits with the session's sampler (this consumes them:
 * feed the token, or another, before the next sample). Returns the id, or GEMMA3_E_STATE,
 * GEMMA3_E_ARG, GEMMA3_E_NUMERIC (the largest logit, or with temperature > 0 any, is NaN
 * or infinite). The token is not fed. */
int gemma3_sample(gemma3_session *session, gemma3_error *err);

/* An image: 8-bit pixels, rows top to bottom, each pixel `channels` values (1 gray, 3 RGB). */
typedef struct {
    const unsigned char *pixels;
    int width, height, channels;
} gemma3_image;

/* Feed an image at the next positions: it becomes the model's image_tokens soft tokens
 * (resized to image_size x image_size as transformers' Gemma3ImageProcessor does, then
 * the vision tower, pooling and the projection to the text width), which stand where the
 * processor puts image_tokens <image_soft_token> ids and attend to each other both ways.
 * The text around it is the caller's to feed: the processor writes "\n\n<start_of_image>"
 * before it and "<end_of_image>\n\n" after. logits: NULL, or room for
 * image_tokens x vocab_size floats, the logits after each of its tokens. The session
 * must have been made with options.images. Returns the new position. Errors: GEMMA3_E_ARG
 * (a text model or a session without images; width or height not in [1, 8192], channels
 * not 1 or 3), GEMMA3_E_CONTEXT (its tokens do not fit: nothing is fed), GEMMA3_E_NUMERIC
 * (as gemma3_feed_logits). The other feeds refuse the image token id (GEMMA3_E_TOKEN), and
 * gemma3_rewind a position that would need an image fed again (GEMMA3_E_STATE). */
int gemma3_feed_image(gemma3_session *session, const gemma3_image *image, float *logits, gemma3_error *err);

/* Tokens in the KV cache: the position the next fed token takes. */
int gemma3_position(const gemma3_session *session);

/* The session's context: the most tokens its KV cache holds. */
int gemma3_context(const gemma3_session *session);

/* Forget every token from position `pos` on (0 <= pos <= position). The session keeps the
 * ids it was fed, so where a sliding-window layer's ring no longer holds what position
 * `pos` needs, it re-feeds them from 0 (correct, slower). The logits are then those after
 * token pos - 1 (none at 0, nor right after an image). Errors: GEMMA3_E_ARG; GEMMA3_E_STATE
 * where that would feed an image's tokens again (into an image, or a ring that no longer
 * holds what follows one): the session keeps no images. */
int gemma3_rewind(gemma3_session *session, int pos, gemma3_error *err);

/* Called with each generated token's text (UTF-8, whole characters; len may be 0; not
 * NUL-terminated) and id; a nonzero return stops the generation after this token. If the
 * text ends inside a character, one last call with id -1 gives its bytes as U+FFFD. */
typedef int (*gemma3_piece_fn)(const char *piece, size_t len, int id, void *user);

/* Sample up to max_tokens tokens from the logits, feeding each back (the last one when the
 * session next needs it: a run that ends here pays no forward pass for it). Stops at <eos> or
 * <end_of_turn> (neither delivered nor fed; the logits are then consumed), after a token
 * whose callback returns nonzero, or when the context is full (the token that did not fit
 * is delivered, not fed; the position then equals gemma3_context). Returns the number of
 * tokens delivered. Errors: GEMMA3_E_ARG, GEMMA3_E_STATE (no logits: feed a prompt
 * first), GEMMA3_E_NUMERIC (as gemma3_sample; what was delivered before stays fed).
 * callback may be NULL; pieces are empty for a model without a tokenizer. */
int gemma3_generate(gemma3_session *session, int max_tokens, gemma3_piece_fn callback, void *user,
                    gemma3_error *err);

/* One chat exchange: add the user's message user_text[0..len) (UTF-8) to the session's
 * conversation, render the whole conversation with the chat template, feed only the ids
 * the KV cache does not hold yet, and generate the reply (as gemma3_generate, at most
 * max_tokens), which joins the conversation. The command line's --chat is this.
 * Returns the reply's token count. Errors: GEMMA3_E_TOKENIZER, GEMMA3_E_TEXT,
 * GEMMA3_E_TOKEN (the message holds an added token the model has no embedding for),
 * GEMMA3_E_NOMEM, GEMMA3_E_CONTEXT: in each of these the message is refused and the
 * conversation and cache are as they were; except GEMMA3_E_CONTEXT after part of a reply
 * (the context filled while generating): that part is kept as the reply, and likewise
 * with GEMMA3_E_NUMERIC (NaN or infinite logits, as gemma3_sample). Afterwards the
 * session has no logits (GEMMA3_E_STATE). gemma3_feed and gemma3_rewind do not change the
 * conversation: the next turn feeds whatever its rendering needs beyond the common prefix.
 * A new conversation needs a new session. */
int gemma3_chat_turn(gemma3_session *session, const char *user_text, size_t len, int max_tokens,
                     gemma3_piece_fn callback, void *user, gemma3_error *err);

/* As gemma3_chat_turn, with images in the user's message (a session made with
 * options.images): each <start_of_image> in user_text takes the next of images[0..n_images),
 * or, with none in the text, the images go ahead of it (as the chat template renders a
 * message of images, then text); the processor's expansion of every <start_of_image> is
 * what the model sees, and only the new message's images are encoded (the earlier ones stay
 * in the cache). In such a session gemma3_chat_turn is this with no images. Errors: those
 * of gemma3_chat_turn; GEMMA3_E_ARG (images without an image session, markers that do not
 * match the images, a bad image), GEMMA3_E_TOKEN (<image_soft_token> in the text),
 * GEMMA3_E_STATE (the cache no longer holds the conversation's earlier images: a new
 * session takes it). The message is refused and nothing changes in each. */
int gemma3_chat_turn_images(gemma3_session *session, const char *user_text, size_t len, const gemma3_image *images,
                            int n_images, int max_tokens, gemma3_piece_fn callback, void *user, gemma3_error *err);

#ifdef __cplusplus
}
#endif
#endif /* GEMMA3_H */
