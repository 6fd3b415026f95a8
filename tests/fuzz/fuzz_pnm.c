/* fuzz_pnm.c — libFuzzer harness: the binary PGM / PPM reader of --image (pnm_header,
 * pnm_to_8bit) on arbitrary bytes, and resize_image on every image it accepts.
 *
 * Seeds: tests/fuzz/pnm/ (small P5 and P6 images, 8- and 16-bit, with comments). Checks: a
 * refusal has a one-line message; an accepted header has a size in [1, MAX_IMAGE_SIDE], 1
 * or 3 channels, a maxval in [1, 65535] and its pixels inside the input; accepted pixels
 * resize to 28 x 28 values in [-1, 1] (mean and std 0.5). A broken property abort()s. */
#undef GEMMA3_NO_MAIN /* the reader is the command line's (section 6), whose modes go unused here */
#define TESTING
#pragma GCC diagnostic ignored "-Wunused-function"
#include "../../gemma3.c"

static VisionState vs;
static struct VisionConfig vc = {28, 14, 3, 16, 16, 1, 1, 1, 0, 0, 0, 1e-6f, {0.5f, 0.5f, 0.5f}, {0.5f, 0.5f, 0.5f}, 2, 4};

static void broken(const char *what, const char *err) {
    fprintf(stderr, "fuzz_pnm: %s%s%s\n", what, err ? ": " : "", err ? err : "");
    abort();
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    Config c;
    memset(&c, 0, sizeof c);
    c.dim = 16, c.vision = vc, c.has_vision = 1;
    unsigned char *mem = malloc(vision_state_bytes(&c) + 63);
    if (!mem) broken("out of memory", NULL);
    vision_state_layout(&vs, &c, mem + (64 - (uintptr_t)mem % 64) % 64);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    int w, h, ch, maxval;
    size_t at;
    char err[256] = "";
    if (pnm_header(data, size, &w, &h, &ch, &maxval, &at, err, sizeof err) != 0) {
        if (!err[0] || strchr(err, '\n')) broken("refused without a one-line message", err);
        return 0;
    }
    if (w < 1 || h < 1 || w > MAX_IMAGE_SIDE || h > MAX_IMAGE_SIDE || (ch != 1 && ch != 3) || maxval < 1 ||
        maxval > 65535 || at > size)
        broken("accepted a header out of range", NULL);
    size_t count = (size_t)w * h * ch, bytes = count * (maxval < 256 ? 1 : 2);
    if (size - at < bytes) return 0; /* truncated: read_image_file refuses it */
    unsigned char *px = malloc(count);
    if (!px) return 0;
    if (pnm_to_8bit(data + at, count, maxval, px, err, sizeof err) == 0) {
        resize_image(&vs, &vc, px, w, h, ch);
        for (int i = 0; i < 3 * 28 * 28; i++)
            if (!(vs.pixels[i] >= -1.0f && vs.pixels[i] <= 1.0f)) broken("a resized value outside [-1, 1]", NULL);
    } else if (!err[0] || strchr(err, '\n')) {
        broken("pixels refused without a one-line message", err);
    }
    free(px);
    return 0;
}
