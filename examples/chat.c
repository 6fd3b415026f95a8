/* examples/chat.c — a chat with a Gemma 3 model, embedded through gemma3.h.
 *
 *   make lib && cc -O2 -I. examples/chat.c libgemma3.a -lm -fopenmp -o chat
 *   ./chat MODEL.bin [seed [max_tokens [context]]] < messages.txt
 *
 * One user message per line of stdin; the reply streams to stdout, one line per turn. With
 * the same seed it prints what `gemma3 MODEL.bin --chat -s SEED` prints. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gemma3.h"

/* Each piece of the reply as it comes; returning nonzero would stop the reply. */
static int print_piece(const char *piece, size_t len, int id, void *user) {
    (void)id, (void)user;
    fwrite(piece, 1, len, stdout);
    fflush(stdout);
    return 0;
}

int main(int argc, char **argv) {
    gemma3_model *model;
    gemma3_session *session;
    gemma3_error err;
    if (argc < 2) {
        fprintf(stderr, "usage: %s MODEL.bin [seed [max_tokens [context]]] < messages.txt\n", argv[0]);
        return 1;
    }
    if (gemma3_open_file(argv[1], &model, &err) != 0) {
        fprintf(stderr, "chat: %s\n", err.message);
        return 1;
    }
    gemma3_options options = gemma3_default_options(); /* temperature 1, top-k 64, top-p 0.95 */
    options.seed = argc > 2 ? strtoull(argv[2], NULL, 10) : 1;
    int max_tokens = argc > 3 ? atoi(argv[3]) : 256;
    options.context = argc > 4 ? atoi(argv[4]) : 0; /* 0: min(the model's maximum, 8192) */
    if (gemma3_session_new(model, &options, &session, &err) != 0) {
        fprintf(stderr, "chat: %s\n", err.message);
        gemma3_close(model);
        return 1;
    }
    char line[4096];
    int status = 0;
    while (fgets(line, sizeof line, stdin)) {
        size_t len = strcspn(line, "\n");
        int rc = gemma3_chat_turn(session, line, len, max_tokens, print_piece, NULL, &err);
        if (rc == GEMMA3_E_CONTEXT) { /* the context is full: the conversation ends */
            printf("\n");
            fprintf(stderr, "chat: %s\n", err.message);
            status = 2;
            break;
        }
        if (rc < 0) { /* refused (e.g. invalid UTF-8): the conversation is as it was */
            fprintf(stderr, "chat: %s\n", err.message);
            status = 1;
            continue;
        }
        printf("\n");
    }
    gemma3_session_free(session);
    gemma3_close(model);
    return status;
}
