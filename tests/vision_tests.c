/*
 * vision_tests.c — the image path of the 4B+ models (issue #34), included by test_all.c.
 *
 * Reference data: tests/fixtures/vision (tools/make_vision_fixtures.py: transformers'
 * Gemma3ForConditionalGeneration in float32 on tiny random checkpoints; see its README).
 */
#define VISION "tests/fixtures/vision"

/* The vision section's offset in a model file (header offset 120; 0: a text model). */
static uint64_t vision_offset(const char *bin) {
    unsigned char h[GEMMA3_HEADER_SIZE];
    FILE *f = fopen(bin, "rb");
    size_t got = f ? fread(h, 1, sizeof h, f) : 0;
    if (f) fclose(f);
    return got == sizeof h ? rd_u64(h + 120) : (uint64_t)-1;
}

/* The dtype of tensor `name` in a loaded model (-1 if it is not there). */
static int tensor_dtype(const Model *m, const char *name) {
    uint32_t n = rd_u32(m->data + 88);
    const unsigned char *dir = m->data + rd_u64(m->data + 112);
    for (uint32_t i = 0; i < n; i++)
        if (!strncmp((const char *)dir + (size_t)i * GEMMA3_DIR_ENTRY_SIZE, name, 64))
            return (int)rd_u32(dir + (size_t)i * GEMMA3_DIR_ENTRY_SIZE + 64);
    return -1;
}

static void test_vision_export(void) {
    printf("vision export: every checkpoint naming, every type, the vision section\n");
    /* The same weights under google/gemma-3-4b-it's, transformers 4.52-4.57's and
     * transformers 5's names (sharded, f32 source) export to the same bytes. */
    const char *shape = "--preset small --seed 5 --vision 28,14,64,80,2,4,4";
    CHECK(run("python3 tools/make_checkpoint.py " BUILD "/vis-nested %s --layout nested", shape) == 0, "make: %s", last_log());
    CHECK(run("python3 tools/make_checkpoint.py " BUILD "/vis-new %s --layout nested-new --shards 2 --dtype f32", shape) == 0,
          "make: %s", last_log());
    CHECK(run("python3 tools/make_checkpoint.py " BUILD "/vis-v5 %s --layout nested-v5 --shards 3", shape) == 0,
          "make: %s", last_log());
    const char *dirs[] = {"vis-nested", "vis-new", "vis-v5"};
    for (int i = 0; i < 3; i++)
        CHECK(run("python3 export.py " BUILD "/%s " BUILD "/%s.bin --dtype f32 -q", dirs[i], dirs[i]) == 0, "export %s: %s",
              dirs[i], last_log());
    int same1 = files_equal(BUILD "/vis-nested.bin", BUILD "/vis-new.bin");
    int same2 = files_equal(BUILD "/vis-nested.bin", BUILD "/vis-v5.bin");
    printf("  vision_tower.vision_model.* == model.vision_tower.vision_model.* (f32, 2 shards): %s; == vision_tower.* "
           "(transformers 5): %s\n", same1 ? "byte-identical" : "DIFFER", same2 ? "byte-identical" : "DIFFER");
    CHECK(same1 && same2, "the three namings of the vision tower export differently");

    /* transformers 5 writes the RoPE settings as rope_parameters (per layer type): mm2's
     * config so rewritten exports to the same bytes (its linear 8 on global layers kept) */
    CHECK(run("rm -rf " BUILD "/mm2-v5cfg && cp -r " VISION "/mm2 " BUILD "/mm2-v5cfg && python3 -c \"import json; "
              "p='" BUILD "/mm2-v5cfg/config.json'; c=json.load(open(p)); t=c['text_config']; "
              "t['rope_parameters']={'full_attention': {'rope_type': 'linear', 'factor': t.pop('rope_scaling')['factor'], "
              "'rope_theta': t.pop('rope_theta')}, 'sliding_attention': {'rope_type': 'default', "
              "'rope_theta': t.pop('rope_local_base_freq')}}; json.dump(c, open(p, 'w'))\" && python3 export.py " BUILD
              "/mm2-v5cfg " BUILD "/mm2-v5cfg.bin --dtype f32 -q") == 0, "v5 config: %s", last_log());

    /* --text-only leaves the image path out: the file is the text model's, as before */
    CHECK(run("python3 tools/make_checkpoint.py " BUILD "/vis-flat --preset small --seed 5") == 0, "make: %s", last_log());
    CHECK(run("python3 export.py " BUILD "/vis-flat " BUILD "/vis-flat.bin --dtype f32 -q && python3 export.py " BUILD
              "/vis-v5 " BUILD "/vis-text.bin --dtype f32 -q --text-only") == 0, "export: %s", last_log());
    CHECK(files_equal(BUILD "/vis-flat.bin", BUILD "/vis-text.bin") && vision_offset(BUILD "/vis-text.bin") == 0,
          "--text-only export differs from the text model's");

    /* The fixtures in every type: the vision section's sizes, matrices whose rows are not
     * whole blocks keep their type in q8_0 / q4_0 files */
    const char *types[] = {"f32", "bf16", "q8_0", "q4_0"};
    for (int i = 0; i < 4; i++) {
        char bin[256], err[512];
        snprintf(bin, sizeof bin, BUILD "/mm2-%s.bin", types[i]);
        CHECK(run("python3 export.py " VISION "/mm2 %s --dtype %s -q", bin, types[i]) == 0, "export mm2 %s: %s", types[i],
              last_log());
        Model m;
        if (load_model(&m, bin, err, sizeof err) != 0) { CHECK(0, "load %s: %s", bin, err); continue; }
        const struct VisionConfig *v = &m.config.vision;
        CHECK(m.config.has_vision && v->image_size == 112 && v->patch_size == 14 && v->dim == 64 && v->hidden_dim == 144 &&
              v->n_layers == 3 && v->n_heads == 4 && v->mm_tokens == 16 && v->n_patches == 64 && v->image_id == 310 &&
              v->boi_id == 300 && v->eoi_id == 301 && fabsf(v->norm_eps - 1e-6f) < 1e-12f && v->mean[1] == 0.5f &&
              v->std[2] == 0.5f, "%s: wrong vision section", bin);
        int lossless = i < 2 ? i : DT_BF16, packed = i < 2 ? i : i; /* f32 0, bf16 1, q8_0 2, q4_0 3 */
        CHECK(tensor_dtype(&m, "vision_tower.embeddings.patch_embedding.weight") == lossless &&
              tensor_dtype(&m, "vision_tower.encoder.layers.0.mlp.fc2.weight") == lossless &&
              tensor_dtype(&m, "vision_tower.encoder.layers.0.mlp.fc1.weight") == packed &&
              tensor_dtype(&m, "multi_modal_projector.mm_input_projection_weight") == packed,
              "%s: wrong tensor types", bin);
        free_model(&m);
    }
    printf("  mm2 in f32, bf16, q8_0, q4_0: vision sections read; 588- and 144-wide rows stay bf16 in q8_0 / q4_0\n");
    CHECK(files_equal(BUILD "/mm2-v5cfg.bin", BUILD "/mm2-f32.bin"), "a transformers 5 config (rope_parameters) "
          "exports differently");

    /* bad vision checkpoints and files: one line each */
    CHECK(run("rm -rf " BUILD "/vis-bad && cp -r " VISION "/mm1 " BUILD "/vis-bad && python3 -c \"import json; "
              "p='" BUILD "/vis-bad/config.json'; c=json.load(open(p)); c['vision_config']['num_hidden_layers']=3; "
              "json.dump(c, open(p, 'w'))\"") == 0, "setup: %s", last_log());
    expect_error("vision config with a layer too many", "missing vision tensor 'vision_tower.encoder.layers.2.",
                 "python3 export.py " BUILD "/vis-bad " BUILD "/vis-bad.bin");
    CHECK(run("python3 export.py " VISION "/mm1 " BUILD "/mm1-f32.bin --dtype f32 -q") == 0, "export mm1: %s", last_log());
    uint64_t voff = vision_offset(BUILD "/mm1-f32.bin");
    unsigned char five[4] = {5, 0, 0, 0}, big[4] = {0, 0, 0, 1}, off[8] = {0xf8, 0xff, 0xff, 0xff, 0, 0, 0, 0};
    write_patched(BUILD "/mm1-f32.bin", BUILD "/bad-vis-tokens.bin", (long)voff + 28, five, 4);
    write_patched(BUILD "/mm1-f32.bin", BUILD "/bad-vis-image-id.bin", (long)voff + 32, big, 4);
    write_patched(BUILD "/mm1-f32.bin", BUILD "/bad-vis-offset.bin", 120, off, 8);
    write_patched(BUILD "/mm1-f32.bin", BUILD "/bad-vis-none.bin", 120, "\0\0\0\0\0\0\0\0", 8);
    expect_error("5 image tokens (not a square)", "inconsistent vision parameters",
                 "./gemma3 " BUILD "/bad-vis-tokens.bin -p x");
    expect_error("image token id past the vocabulary", "image token ids out of range",
                 "./gemma3 " BUILD "/bad-vis-image-id.bin -p x");
    expect_error("vision section past the end", "vision section lies outside", "./gemma3 " BUILD "/bad-vis-offset.bin -p x");
    expect_error("vision tensors, no vision section", "unknown tensor 'vision_tower.",
                 "./gemma3 " BUILD "/bad-vis-none.bin -p x");
}

/* A binary PPM (P6, maxval 255) of the fixtures: its pixels (malloc'd), or NULL. */
static unsigned char *read_fixture_ppm(const char *path, int *w, int *h) {
    FILE *f = fopen(path, "rb");
    int maxval = 0;
    unsigned char *px = NULL;
    if (f && fscanf(f, "P6 %d %d %d", w, h, &maxval) == 3 && maxval == 255 && fgetc(f) != EOF) {
        size_t n = (size_t)*w * *h * 3;
        px = malloc(n);
        if (px && fread(px, 1, n, f) != n) { free(px); px = NULL; }
    }
    if (f) fclose(f);
    return px;
}

/* max |got - ref| over n values against max |ref|; prints and checks it is within tol of
 * max(max|ref|, 1). */
static void check_close(const char *what, const float *got, const float *ref, long n, double tol) {
    double max_ref, d = max_abs_diff(got, ref, n, &max_ref);
    printf("  %-44s max|diff| %.3g (max|ref| %.3g)\n", what, d, max_ref);
    CHECK(d <= tol * (max_ref > 1 ? max_ref : 1), "%s: max|diff| %g > %g", what, d, tol);
}

/* The tower's and projector's outputs for a fixture's images against transformers'. */
static void check_encoder(const char *name, int n_images) {
    char bin[256], path[256], what[128], err[512];
    snprintf(bin, sizeof bin, BUILD "/%s-f32.bin", name); /* (exported by test_vision_export) */
    Model m;
    if (load_model(&m, bin, err, sizeof err) != 0) { CHECK(0, "load %s: %s", bin, err); return; }
    const struct VisionConfig *v = &m.config.vision;
    size_t bytes = vision_state_bytes(&m.config);
    unsigned char *mem = malloc(bytes + 63);
    VisionState vs;
    vision_state_layout(&vs, &m.config, mem + (64 - (uintptr_t)mem % 64) % 64);
    for (int k = 0; k < n_images; k++) {
        int w, h;
        long nv, np;
        snprintf(path, sizeof path, VISION "/%s/image-%d.ppm", name, k);
        unsigned char *px = read_fixture_ppm(path, &w, &h);
        snprintf(path, sizeof path, VISION "/%s/vision-%d.f32", name, k);
        float *ref_vision = read_f32_file(path, &nv);
        snprintf(path, sizeof path, VISION "/%s/projected-%d.f32", name, k);
        float *ref_proj = read_f32_file(path, &np);
        if (!px || !ref_vision || !ref_proj || nv != (long)v->n_patches * v->dim || np != (long)v->mm_tokens * m.config.dim) {
            CHECK(0, "%s: cannot read image %d or its references", name, k);
        } else {
            resize_image(&vs, v, px, w, h, 3);
            encode_image(&m, &vs);
            snprintf(what, sizeof what, "%s image %d: vision tower output", name, k);
            check_close(what, vs.x, ref_vision, nv, 1e-5);
            snprintf(what, sizeof what, "%s image %d: projector output", name, k);
            check_close(what, vs.soft, ref_proj, np, 1e-5);
        }
        free(px);
        free(ref_vision);
        free(ref_proj);
    }
    free(mem);
    free_model(&m);
}

/* The logits of every position of a fixture's ids (image tokens in place) through the
 * library: text with gemma3_feed_logits, each run of image tokens with gemma3_feed_image
 * (the fixture's image-K.ppm in order); then `steps` greedy ids into greedy (if not NULL). */
static float *logits_with_images(const char *bin, const char *name, const int *ids, int n, int steps, int *greedy) {
    gemma3_model *m;
    gemma3_session *s;
    gemma3_error e;
    gemma3_options o = gemma3_default_options();
    o.context = n + steps, o.temperature = 0.0f, o.top_k = 0, o.top_p = 1.0f, o.images = 1;
    if (gemma3_open_file(bin, &m, &e) != 0) { printf("  %s\n", e.message); return NULL; }
    gemma3_config c = gemma3_model_config(m);
    float *logits = malloc((size_t)n * c.vocab_size * sizeof(float));
    int ok = logits && gemma3_session_new(m, &o, &s, &e) == 0, image = 0;
    for (int t = 0; ok && t < n;) {
        int run_len = 0;
        while (t + run_len < n && (ids[t + run_len] == c.image_id) == (ids[t] == c.image_id)) run_len++;
        float *out = logits + (size_t)t * c.vocab_size;
        if (ids[t] == c.image_id) {
            char path[256];
            int w, h;
            snprintf(path, sizeof path, VISION "/%s/image-%d.ppm", name, image++);
            unsigned char *px = read_fixture_ppm(path, &w, &h);
            gemma3_image img = {px, w, h, 3};
            ok = px && run_len == c.image_tokens && gemma3_feed_image(s, &img, out, &e) == t + run_len;
            free(px);
        } else {
            ok = gemma3_feed_logits(s, ids + t, run_len, out, NULL, &e) == t + run_len;
        }
        t += run_len;
    }
    if (ok && greedy) {
        int *next = greedy;
        ok = gemma3_generate(s, steps, keep_ids, &next, &e) == steps;
    }
    if (!ok) printf("  %s\n", e.message);
    if (logits && o.context) gemma3_session_free(ok || s ? s : NULL);
    gemma3_close(m);
    if (!ok) { free(logits); return NULL; }
    return logits;
}

/* Image + text logits and greedy ids of a fixture against transformers'. */
static void check_image_prompt(const char *name, const char *dtype, double tol) {
    char bin[256], path[256], what[128];
    snprintf(bin, sizeof bin, BUILD "/%s-%s.bin", name, dtype); /* (exported by test_vision_export) */
    int n, ng, greedy[16];
    long nref;
    snprintf(path, sizeof path, VISION "/%s/ids.txt", name);
    int *ids = read_ids(path, &n);
    snprintf(path, sizeof path, VISION "/%s/greedy.txt", name);
    int *want = read_ids(path, &ng);
    snprintf(path, sizeof path, VISION "/%s/logits.f32", name);
    float *ref = read_f32_file(path, &nref);
    float *got = ids && want && ng <= 16 ? logits_with_images(bin, name, ids, n, ng, greedy) : NULL;
    if (!got || !ref || nref % n) {
        CHECK(0, "%s %s: no logits to compare", name, dtype);
    } else {
        int V = (int)(nref / n);
        double max_ref, d = max_abs_diff(got, ref, nref, &max_ref);
        int same = argmax_rows_equal(got, ref, n, V), greedy_same = 1;
        for (int i = 0; i < ng; i++) greedy_same &= greedy[i] == want[i];
        snprintf(what, sizeof what, "%s %s, image + text logits", name, dtype);
        printf("  %-44s T=%-3d max|diff| %.3g (%.2g of max|logit| %.2f), argmax %d/%d, greedy %d %s\n", what, n, d,
               d / max_ref, max_ref, same, n, ng, greedy_same ? "equal" : "DIFFER");
        CHECK(d <= tol * max_ref, "%s: max|diff| %g > %g of max|logit| %g", what, d, tol, max_ref);
        CHECK(greedy_same || tol > 1e-4, "%s: greedy ids differ from transformers'", what);
    }
    free(ids);
    free(want);
    free(ref);
    free(got);
}

static void test_vision_model(void) {
    printf("vision model: tower, projector, image + text logits vs transformers (float32)\n");
    check_encoder("mm1", 1);
    check_encoder("mm2", 2);
    check_image_prompt("mm1", "f32", 1e-4);
    check_image_prompt("mm2", "f32", 1e-4);
    /* bf16 weights: the same values (x rounded to bf16 with the AVX512_BF16 tiles) */
    check_image_prompt("mm2", "bf16", BF16_ROUNDS ? BF16_DOT_MAX_REL_IMAGE : 1e-4);
    check_image_prompt("mm2", "q8_0", 5e-2);

    /* a text prompt on a multimodal file == the text model alone, to the bit */
    int ids[24], V1, V2;
    for (int i = 0; i < 24; i++) ids[i] = i == 0 ? 2 : (i * 37) % 290 + 3;
    CHECK(run("python3 export.py " VISION "/mm2 " BUILD "/mm2-text.bin --dtype f32 -q --text-only") == 0, "export: %s",
          last_log());
    float *a = model_logits(BUILD "/mm2-f32.bin", ids, 24, &V1), *b = model_logits(BUILD "/mm2-text.bin", ids, 24, &V2);
    int same = a && b && V1 == V2 && !memcmp(a, b, (size_t)24 * V1 * sizeof(float));
    printf("  text prompt on mm2 == mm2 --text-only: %s\n", same ? "bit-identical" : "DIFFER");
    CHECK(same, "a text prompt gives other logits on the multimodal file");
    free(a);
    free(b);
}

/* The library's image call refuses what it cannot take, and sessions count its memory. */
static void test_vision_api(void) {
    printf("vision library: gemma3_feed_image's errors, session bytes\n");
    gemma3_model *m, *text;
    gemma3_session *s, *plain, *none;
    gemma3_error e;
    if (gemma3_open_file(BUILD "/mm1-f32.bin", &m, &e) != 0 || gemma3_open_file(BUILD "/vis-flat.bin", &text, &e) != 0) {
        CHECK(0, "open: %s", e.message);
        return;
    }
    gemma3_options o = gemma3_default_options();
    o.context = 64;
    int64_t bytes_text = gemma3_session_bytes(m, &o, &e);
    CHECK(gemma3_session_new(m, &o, &plain, &e) == 0, "session: %s", e.message);
    o.images = 1;
    int64_t bytes_image = gemma3_session_bytes(m, &o, &e);
    CHECK(gemma3_session_new(m, &o, &s, &e) == 0, "session with images: %s", e.message);
    printf("  mm1 session bytes, 64-token context: %lld text only, %lld with images\n", (long long)bytes_text,
           (long long)bytes_image);
    CHECK(bytes_image > bytes_text, "a session with images costs no more");
    CHECK(gemma3_session_new(text, &o, &none, &e) == GEMMA3_E_ARG && strstr(e.message, "no image path"),
          "images on a text model: %s", e.message);
    unsigned char px[3 * 5 * 7] = {0};
    gemma3_image img = {px, 5, 7, 3}, wide = {px, 100000, 1, 3}, four = {px, 5, 7, 4};
    int ids[3] = {2, 310, 5};
    CHECK(gemma3_feed(s, ids, 3, &e) == GEMMA3_E_TOKEN && strstr(e.message, "image token"), "image id fed as text: %s",
          e.message);
    CHECK(gemma3_feed_image(plain, &img, NULL, &e) == GEMMA3_E_ARG && strstr(e.message, "without images"),
          "image in a text session: %s", e.message);
    CHECK(gemma3_feed_image(s, &wide, NULL, &e) == GEMMA3_E_ARG && strstr(e.message, "100000 x 1"), "wide image: %s",
          e.message);
    CHECK(gemma3_feed_image(s, &four, NULL, &e) == GEMMA3_E_ARG, "4 channels: %s", e.message);
    CHECK(gemma3_feed(s, ids, 1, &e) == 1 && gemma3_feed_image(s, &img, NULL, &e) == 5 && gemma3_feed(s, ids + 2, 1, &e) == 6,
          "a gray-black 5 x 7 image: %s", e.message);
    CHECK(gemma3_rewind(s, 4, &e) == GEMMA3_E_STATE && gemma3_position(s) == 6, "rewind into the image: %s", e.message);
    CHECK(gemma3_rewind(s, 5, &e) == 5 && gemma3_logits(s, NULL) == NULL && gemma3_feed(s, ids + 2, 1, &e) == 6,
          "rewind to right after the image (no logits there), feed on: %s", e.message);
    CHECK(gemma3_rewind(s, 1, &e) == 1 && gemma3_logits(s, NULL) != NULL, "rewind before the image: %s", e.message);
    CHECK(gemma3_rewind(s, 58, &e) == GEMMA3_E_ARG, "rewind forward");
    for (int i = 0; i < 15; i++) gemma3_feed_image(s, &img, NULL, NULL);
    CHECK(gemma3_position(s) == 61 && gemma3_feed_image(s, &img, NULL, &e) == GEMMA3_E_CONTEXT && gemma3_position(s) == 61,
          "an image past the context: %s", e.message);
    gemma3_session_free(s);
    gemma3_session_free(plain);
    gemma3_close(m);
    gemma3_close(text);

    /* the image path's activations on the 4B shape (SigLIP 896 px: 4096 patches x 1152) */
    Config c4;
    memset(&c4, 0, sizeof c4);
    c4.dim = 2560, c4.has_vision = 1;
    struct VisionConfig v4 = {896, 14, 3, 1152, 4304, 27, 16, 256, 262144, 255999, 256000, 1e-6f,
                              {0.5f, 0.5f, 0.5f}, {0.5f, 0.5f, 0.5f}, 64, 4096};
    c4.vision = v4;
    printf("  image path activations on the 4B shape: %.1f MB (%d threads)\n", vision_state_bytes(&c4) / 1e6,
           max_threads());
    /* a whole 4B-shape session at the default 8192-token context, without and with images */
    Model m4;
    memset(&m4, 0, sizeof m4);
    unsigned char global[34];
    for (int l = 0; l < 34; l++) global[l] = (l + 1) % 6 == 0;
    Config t4 = {262208, 2560, 10240, 34, 8, 4, 256, 1024, 131072, 2, 1, 106, 105, 256.0f, 1e-6f, 1e6f, 1e4f, 8.0f,
                 global, 1, v4};
    m4.config = t4;
    gemma3_options o4 = gemma3_default_options();
    o4.context = 8192;
    size_t plain4 = session_layout(NULL, &m4, &o4, 8192, NULL);
    o4.images = 1;
    size_t image4 = session_layout(NULL, &m4, &o4, 8192, NULL);
    printf("  4B-shape session, 8192-token context: %.1f MB text only, %.1f MB with images (+%.1f MB)\n", plain4 / 1e6,
           image4 / 1e6, (image4 - plain4) / 1e6);
    CHECK(image4 > plain4 + vision_state_bytes(&c4), "a 4B session with images does not hold the tower's activations");
}

/* The C resize (read_image_file, resize_image) against Gemma3ImageProcessor's pixel values
 * on odd-sized images: within one 8-bit level (2 / 255 after the normalization). */
static void test_vision_resize(void) {
    printf("vision input: PPM/PGM reader and resize vs Gemma3ImageProcessor (torchvision)\n");
    FILE *cases = fopen(VISION "/resize/cases.txt", "r");
    char file[128], pixfile[128], path[300], err[600];
    int size, n_cases = 0;
    double worst = 0;
    long off_by_one = 0, total = 0;
    while (cases && fscanf(cases, "%127s %d %127s", file, &size, pixfile) == 3) {
        gemma3_image img;
        snprintf(path, sizeof path, VISION "/resize/%s", file);
        if (read_image_file(path, &img, err, sizeof err) != 0) { CHECK(0, "%s", err); continue; }
        Config c;
        memset(&c, 0, sizeof c);
        struct VisionConfig v = {size, 14, 3, 16, 16, 1, 1, 1, 0, 0, 0, 1e-6f, {0.5f, 0.5f, 0.5f}, {0.5f, 0.5f, 0.5f},
                                 size / 14, (size / 14) * (size / 14)};
        c.dim = 16, c.vision = v, c.has_vision = 1;
        unsigned char *mem = malloc(vision_state_bytes(&c) + 63);
        VisionState vs;
        vision_state_layout(&vs, &c, mem + (64 - (uintptr_t)mem % 64) % 64);
        resize_image(&vs, &c.vision, img.pixels, img.width, img.height, img.channels);
        long nref;
        snprintf(path, sizeof path, VISION "/resize/%s", pixfile);
        float *ref = read_f32_file(path, &nref);
        if (ref && nref == 3L * size * size) {
            double max_ref, d = max_abs_diff(vs.pixels, ref, nref, &max_ref);
            for (long i = 0; i < nref; i++) off_by_one += fabsf(vs.pixels[i] - ref[i]) > 1e-6f;
            total += nref;
            printf("  %-16s %3d x %-3d %s -> %3d: max|diff| %.4f (%.2f levels of 255)\n", file, img.width, img.height,
                   img.channels == 1 ? "gray" : "RGB ", size, d, d * 127.5);
            CHECK(d <= 2.0 / 255 + 1e-6, "%s: resize differs from the processor's by %g", file, d);
            if (d > worst) worst = d;
            n_cases++;
        } else {
            CHECK(0, "cannot read %s", path);
        }
        free(ref);
        free(mem);
        free((void *)img.pixels);
    }
    if (cases) fclose(cases);
    CHECK(n_cases == 6, "%d resize cases read, expected 6", n_cases);
    printf("  %d images: %ld of %ld values differ, by at most %.2f levels\n", n_cases, off_by_one, total, worst * 127.5);
}

/* Write `bytes` to path (a test image). */
static void write_bytes(const char *path, const void *bytes, size_t n) {
    FILE *f = fopen(path, "wb");
    if (f) fwrite(bytes, 1, n, f), fclose(f);
}

/* The command line: --image with -p (the prompt as the processor builds it) and --logits,
 * and every bad input a one-line error. */
static void test_vision_cli(void) {
    printf("vision command line: --image with --logits and -p; bad images and prompts\n");
    /* --logits IDS OUT --image ... (ids with the image tokens in place) == transformers */
    CHECK(run("./gemma3 " BUILD "/mm2-f32.bin --logits " VISION "/mm2/ids.txt " BUILD "/mm2-cli.f32 --image " VISION
              "/mm2/image-0.ppm --image " VISION "/mm2/image-1.ppm") == 0, "--logits --image: %s", last_log());
    long na, nb;
    float *a = read_f32_file(BUILD "/mm2-cli.f32", &na), *b = read_f32_file(VISION "/mm2/logits.f32", &nb);
    if (a && b && na == nb) {
        double max_ref, d = max_abs_diff(a, b, na, &max_ref);
        printf("  %-44s max|diff| %.3g (%.2g of max|logit|)\n", "mm2 --logits --image x 2 vs transformers", d, d / max_ref);
        CHECK(d <= 1e-4 * max_ref, "--logits --image: max|diff| %g", d);
    } else {
        CHECK(0, "--logits --image: no logits to compare");
    }
    free(a);
    free(b);

    /* bad images */
    const char *mm = BUILD "/mm1-f32.bin", *ids = VISION "/mm1/ids.txt", *img = VISION "/mm1/image-0.ppm";
    write_bytes(BUILD "/img-truncated.ppm", "P6\n4 4\n255\nabcdef", 17);
    write_bytes(BUILD "/img-huge.ppm", "P6\n100000 100000\n255\n\0\0\0", 25);
    write_bytes(BUILD "/img-malformed.ppm", "P6\n12 x\n255\n", 13);
    write_bytes(BUILD "/img-ascii.ppm", "P3\n1 1\n255\n0 0 0\n", 18);
    write_bytes(BUILD "/img-maxval.pgm", "P5\n1 1\n0\n\0", 11);
    write_bytes(BUILD "/img-sample.pgm", "P5\n1 1\n300\n\x01\x2d", 14);
    expect_error("truncated PPM", "is truncated: 6 bytes of pixels, its header says 4 x 4 x 3 = 48",
                 "./gemma3 %s --logits %s " BUILD "/o.f32 --image " BUILD "/img-truncated.ppm", mm, ids);
    expect_error("100000 x 100000 PPM header", "100000 x 100000 pixels: width and height must be in [1, 8192]",
                 "./gemma3 %s --logits %s " BUILD "/o.f32 --image " BUILD "/img-huge.ppm", mm, ids);
    expect_error("malformed PPM header", "malformed PPM header: no height",
                 "./gemma3 %s --logits %s " BUILD "/o.f32 --image " BUILD "/img-malformed.ppm", mm, ids);
    expect_error("ASCII PPM (P3)", "not a binary PGM or PPM",
                 "./gemma3 %s --logits %s " BUILD "/o.f32 --image " BUILD "/img-ascii.ppm", mm, ids);
    expect_error("maxval 0", "maxval 0 is not in [1, 65535]",
                 "./gemma3 %s --logits %s " BUILD "/o.f32 --image " BUILD "/img-maxval.pgm", mm, ids);
    expect_error("16-bit sample above maxval", "sample 0 is 301, above the maxval 300",
                 "./gemma3 %s --logits %s " BUILD "/o.f32 --image " BUILD "/img-sample.pgm", mm, ids);
    expect_error("missing image file", "cannot open image " BUILD "/nope.ppm",
                 "./gemma3 %s --logits %s " BUILD "/o.f32 --image " BUILD "/nope.ppm", mm, ids);
    CHECK(run("test ! -e " BUILD "/o.f32 && test ! -e " BUILD "/o.f32.partial") == 0, "a failed run left an output");

    /* image tokens that do not match the images */
    FILE *f = fopen(BUILD "/ids-3img.txt", "w");
    if (f) fprintf(f, "2 5 108 300 310 310 310 301 108 7\n"), fclose(f);
    f = fopen(BUILD "/ids-2runs.txt", "w");
    if (f) fprintf(f, "2 300 310 310 310 310 301 300 310 310 310 310 301\n"), fclose(f);
    expect_error("3 image tokens where an image is 4", "3 image tokens at 4, an image is 4",
                 "./gemma3 %s --logits " BUILD "/ids-3img.txt " BUILD "/o.f32 --image %s", mm, img);
    expect_error("two images' tokens, one --image", "more runs of image tokens than --image given (1)",
                 "./gemma3 %s --logits " BUILD "/ids-2runs.txt " BUILD "/o.f32 --image %s", mm, img);
    expect_error("one image's tokens, two --image", "image tokens for 1 image(s), and 2 --image",
                 "./gemma3 %s --logits %s " BUILD "/o.f32 --image %s --image %s", mm, ids, img, img);
    expect_error("image tokens without --image", "is the image token <image_soft_token>",
                 "./gemma3 %s --logits %s " BUILD "/o.f32", mm, ids);
    expect_error("--image for a text model", "has no image path",
                 "./gemma3 " BUILD "/vis-flat.bin --logits %s " BUILD "/o.f32 --image %s", ids, img);
    expect_error("--image with --perplexity", "--image goes with -p, -f, --logits or --chat",
                 "./gemma3 %s --perplexity %s --image %s", mm, ids, img);
    expect_error("--image with --dump-hidden", "--dump-hidden does not take --image",
                 "./gemma3 %s --logits %s " BUILD "/o.f32 --dump-hidden " BUILD "/h.f32 --image %s", mm, ids, img);

    /* -p with images: a model with the real tokenizer (its image token ids are the real ones) */
    if (access("tests/data/tokenizer.json", R_OK) != 0) { skip("-p --image (no tests/data/tokenizer.json)"); return; }
    CHECK(run("python3 tools/make_checkpoint.py " BUILD "/mm-tok --layout nested --vocab 262208 --hidden 32 --inter 64 "
              "--layers 2 --heads 2 --kv-heads 1 --head-dim 16 --qpas 16 --window 4 --pattern 2 --max-pos 4096 "
              "--vision 28,14,32,48,1,2,4 --tokenizer tests/data/tokenizer.json --fast-random --seed 3 && python3 export.py "
              BUILD "/mm-tok " BUILD "/mm-tok.bin --dtype bf16 -q") == 0, "make mm-tok: %s", last_log());
    const char *tok = BUILD "/mm-tok.bin", *i0 = VISION "/resize/a-37x23.ppm", *i1 = VISION "/resize/e-29x31.pgm";
    expect_error("<image_soft_token> typed in -p", "the prompt holds <image_soft_token>",
                 "./gemma3 %s -p 'look <image_soft_token>' --image %s", tok, i0);
    expect_error("<image_soft_token> typed, no image", "is the image token <image_soft_token>",
                 "./gemma3 %s -p 'look <image_soft_token>' -n 1", tok);
    expect_error("2 <start_of_image>, 1 --image", "the prompt has 2 <start_of_image>, and 1 --image",
                 "./gemma3 %s -p 'a <start_of_image> b <start_of_image>' --image %s", tok, i0);
    /* The prompt the processor builds for 'Compare<start_of_image>with<start_of_image>.' and
     * two images, fed through the library; its greedy text == the command line's. */
    gemma3_model *m;
    gemma3_error e;
    if (gemma3_open_file(tok, &m, &e) != 0) { CHECK(0, "open: %s", e.message); return; }
    gemma3_config c = gemma3_model_config(m);
    char text[1024] = "Compare\n\n<start_of_image>";
    for (int i = 0; i < 2; i++) {
        for (int t = 0; t < c.image_tokens; t++) strcat(text, "<image_soft_token>");
        strcat(text, i ? "<end_of_image>\n\n." : "<end_of_image>\n\nwith\n\n<start_of_image>");
    }
    int pids[128], n = gemma3_tokenize(m, text, strlen(text), pids + 1, 127, &e) + 1;
    pids[0] = c.bos_id;
    int where = 0;
    for (int i = 0; i < n; i++) where += pids[i] == c.boi_id || pids[i] == c.eoi_id || pids[i] == 108;
    CHECK(where == 8, "the expanded prompt has %d of <start_of_image>, <end_of_image>, \\n\\n (want 8)", where);
    gemma3_options o = gemma3_default_options();
    o.context = 64, o.temperature = 0.0f, o.images = 1;
    gemma3_session *s;
    char want[512] = "";
    if (gemma3_session_new(m, &o, &s, &e) == 0) {
        gemma3_image imgs[2];
        char err2[600];
        int ok = read_image_file(i0, &imgs[0], err2, sizeof err2) == 0 && read_image_file(i1, &imgs[1], err2, sizeof err2) == 0;
        int image = 0;
        for (int t = 0; ok && t < n;) {
            int len = 0, is_image = pids[t] == c.image_id;
            while (t + len < n && (pids[t + len] == c.image_id) == is_image) len++;
            ok = (is_image ? gemma3_feed_image(s, &imgs[image++], NULL, &e) : gemma3_feed(s, pids + t, len, &e)) == t + len;
            t += len;
        }
        int gen[8], *next = gen, k = ok ? gemma3_generate(s, 8, keep_ids, &next, &e) : -1;
        if (k > 0) gemma3_detokenize(m, gen, k, want, sizeof want, &e);
        CHECK(k > 0, "library greedy with images: %s", e.message);
        free((void *)imgs[0].pixels);
        free((void *)imgs[1].pixels);
        gemma3_session_free(s);
    }
    gemma3_close(m);
    CHECK(run("./gemma3 %s -p 'Compare<start_of_image>with<start_of_image>.' --image %s --image %s -n 8 -t 0 > " BUILD
              "/mm-tok.out", tok, i0, i1) == 0, "-p --image: %s", last_log());
    size_t len;
    FILE *g = fopen(BUILD "/mm-tok.out", "rb");
    char got[600] = "";
    len = g ? fread(got, 1, sizeof got - 1, g) : 0;
    if (g) fclose(g);
    got[len] = 0;
    if (len && got[len - 1] == '\n') got[len - 1] = 0;
    printf("  -p 'Compare<start_of_image>with<start_of_image>.' + 2 images: %d ids, greedy text %s the library's\n", n,
           strcmp(got, want) ? "DIFFERS from" : "equals");
    CHECK(!strcmp(got, want) && want[0], "-p --image gave '%s', the library '%s'", got, want);
}

/* Greedy ids after a chat rendering of msgs (images in place of each <start_of_image>),
 * fed by hand through a fresh session: what a chat turn with images must give. */
static int chat_by_hand(gemma3_model *m, const gemma3_message *msgs, int n_msgs, const gemma3_image *imgs, int steps,
                        int *out) {
    gemma3_config c = gemma3_model_config(m);
    gemma3_error e;
    char text[8192];
    if (gemma3_chat_render(msgs, n_msgs, 1, text, sizeof text, &e) < 0) return -1;
    size_t len;
    char *full = expand_image_markers(text, strlen(text), c.image_tokens, &len);
    int ids[2048], n = gemma3_tokenize(m, full, len, ids, 2048, &e), image = 0, got = -1;
    free(full);
    gemma3_options o = gemma3_default_options();
    o.context = 512, o.temperature = 0.0f, o.images = 1;
    gemma3_session *s;
    if (n < 0 || gemma3_session_new(m, &o, &s, &e) != 0) return -1;
    int ok = 1;
    for (int t = 0; ok && t < n;) {
        int k = 0, is_image = ids[t] == c.image_id;
        while (t + k < n && (ids[t + k] == c.image_id) == is_image) k++;
        ok = (is_image ? gemma3_feed_image(s, &imgs[image++], NULL, &e) : gemma3_feed(s, ids + t, k, &e)) == t + k;
        t += k;
    }
    int *next = out;
    if (ok) got = gemma3_generate(s, steps, keep_ids, &next, &e);
    gemma3_session_free(s);
    return got;
}

/* Chat turns with images (gemma3_chat_turn_images, --chat's /image) == the conversation's
 * rendering fed by hand; the second turn feeds only what is new. */
static void test_vision_chat(void) {
    printf("vision chat: images in --chat messages\n");
    if (access(BUILD "/mm-tok.bin", R_OK) != 0) { skip("chat with images (no mm-tok.bin: no tokenizer.json)"); return; }
    gemma3_model *m;
    gemma3_error e;
    if (gemma3_open_file(BUILD "/mm-tok.bin", &m, &e) != 0) { CHECK(0, "open: %s", e.message); return; }
    gemma3_image imgs[2];
    char err[600];
    if (read_image_file(VISION "/resize/a-37x23.ppm", &imgs[0], err, sizeof err) ||
        read_image_file(VISION "/resize/e-29x31.pgm", &imgs[1], err, sizeof err)) {
        CHECK(0, "%s", err);
        return;
    }
    gemma3_options o = gemma3_default_options();
    o.context = 512, o.temperature = 0.0f, o.images = 1;
    gemma3_session *s;
    CHECK(gemma3_session_new(m, &o, &s, &e) == 0, "session: %s", e.message);
    int r1[8], r2[8], h1[8], h2[8], *next = r1;
    int n1 = gemma3_chat_turn_images(s, "Describe the image.", 19, imgs, 1, 6, keep_ids, &next, &e);
    char reply1[512] = "";
    if (n1 > 0) gemma3_detokenize(m, r1, n1, reply1, sizeof reply1, &e);
    gemma3_message turn1[] = {{"user", "<start_of_image>Describe the image."}};
    int k1 = chat_by_hand(m, turn1, 1, imgs, 6, h1);
    int same1 = n1 > 0 && n1 == k1 && !memcmp(r1, h1, (size_t)n1 * sizeof(int));
    int before = gemma3_position(s);
    next = r2;
    int n2 = gemma3_chat_turn_images(s, "And <start_of_image> this one?", 30, imgs + 1, 1, 6, keep_ids, &next, &e);
    int fed = s->chat.fed, total = s->chat.prompt_len;
    gemma3_message turn2[] = {{"user", "<start_of_image>Describe the image."}, {"model", reply1},
                              {"user", "And <start_of_image> this one?"}};
    int k2 = chat_by_hand(m, turn2, 3, imgs, 6, h2);
    int same2 = n2 > 0 && n2 == k2 && !memcmp(r2, h2, (size_t)n2 * sizeof(int));
    printf("  turn 1 (image first): %d ids %s; turn 2 (image in the text): %d ids %s, fed %d of %d prompt ids\n", n1,
           same1 ? "== by hand" : "DIFFER", n2, same2 ? "== by hand" : "DIFFER", fed, total);
    CHECK(same1 && same2, "chat with images differs from the rendering fed by hand");
    CHECK(fed < total - before / 2 && fed > gemma3_model_config(m).image_tokens, "turn 2 fed %d of %d", fed, total);
    /* refusals: nothing changes */
    int pos = gemma3_position(s);
    CHECK(gemma3_chat_turn_images(s, "two <start_of_image><start_of_image>", 37, imgs, 1, 4, NULL, NULL, &e) ==
              GEMMA3_E_ARG, "2 markers, 1 image: %s", e.message);
    CHECK(gemma3_chat_turn_images(s, "x <image_soft_token>", 20, NULL, 0, 4, NULL, NULL, &e) == GEMMA3_E_TOKEN,
          "typed image token: %s", e.message);
    CHECK(gemma3_chat_turn(s, "a <start_of_image> without an image", 35, 4, NULL, NULL, &e) == GEMMA3_E_ARG,
          "marker without image: %s", e.message);
    CHECK(gemma3_position(s) == pos, "a refused message changed the session");
    gemma3_session_free(s);
    o.images = 0;
    CHECK(gemma3_session_new(m, &o, &s, &e) == 0 &&
              gemma3_chat_turn_images(s, "hi", 2, imgs, 1, 4, NULL, NULL, &e) == GEMMA3_E_ARG,
          "images in a text session: %s", e.message);
    gemma3_session_free(s);
    free((void *)imgs[0].pixels);
    free((void *)imgs[1].pixels);
    gemma3_close(m);
    /* --chat: --image for the first message, "/image FILE" for a later one, a bad file refused */
    FILE *f = fopen(BUILD "/chat-images.txt", "w");
    if (f) fprintf(f, "Describe the image.\n/image " BUILD "/nope.ppm\n/image " VISION "/resize/e-29x31.pgm\n"
                      "And <start_of_image> this one?\n"), fclose(f);
    int rc = run("./gemma3 " BUILD "/mm-tok.bin --chat --image " VISION "/resize/a-37x23.ppm -n 6 -t 0 -c 512 < " BUILD
                 "/chat-images.txt > " BUILD "/chat-images.out");
    char want[1200], got[1200] = "";
    snprintf(want, sizeof want, "%s\n", reply1);
    FILE *g = fopen(BUILD "/chat-images.out", "r");
    size_t len = g ? fread(got, 1, sizeof got - 1, g) : 0;
    if (g) fclose(g);
    got[len] = 0;
    CHECK(rc == 1 && !strncmp(got, want, strlen(want)) && strstr(last_log(), "cannot open image"),
          "--chat with images: exit %d, output '%s', log %s", rc, got, last_log());
    printf("  --chat --image, /image: first reply == the library's, a missing file refused (exit %d)\n", rc);
}

/* export.py MODEL.gguf --mmproj MMPROJ.gguf: mm2 written as llama.cpp lays it out (text GGUF
 * + mmproj GGUF, by tests/make_mmproj_gguf.py with gguf-py) against transformers' logits. */
static void test_vision_mmproj(void) {
    printf("vision from GGUF: export.py MODEL.gguf --mmproj MMPROJ.gguf\n");
    int rc = run("bash tests/test_gguf.sh --setup");
    if (rc == 2) { skip("--mmproj (no gguf-py venv)"); return; }
    CHECK(rc == 0, "venv: %s", last_log());
    const char *py = "tests/data/venv-gguf/bin/python tests/make_mmproj_gguf.py " VISION "/mm2 ";
    CHECK(run("%s" BUILD "/mm2-text.gguf " BUILD "/mm2-mmproj.gguf && %s" BUILD "/mm2-text16.gguf " BUILD
              "/mm2-mmproj16.gguf --f16", py, py) == 0, "make GGUFs: %s", last_log());
    const char *out[2] = {BUILD "/mm2-gguf.bin", BUILD "/mm2-gguf16.bin"};
    CHECK(run("python3 export.py " BUILD "/mm2-text.gguf %s --dtype f32 -q --mmproj " BUILD "/mm2-mmproj.gguf && "
              "python3 export.py " BUILD "/mm2-text16.gguf %s --dtype bf16 -q --mmproj " BUILD "/mm2-mmproj16.gguf",
              out[0], out[1]) == 0, "export --mmproj: %s", last_log());
    for (int i = 0; i < 2; i++) {
        CHECK(run("./gemma3 %s --logits " VISION "/mm2/ids.txt " BUILD "/mm2-gguf.f32 --image " VISION
                  "/mm2/image-0.ppm --image " VISION "/mm2/image-1.ppm", out[i]) == 0, "--logits: %s", last_log());
        long na, nb;
        float *a = read_f32_file(BUILD "/mm2-gguf.f32", &na), *b = read_f32_file(VISION "/mm2/logits.f32", &nb);
        /* (bf16 weights are exact in F16 too; the F16 file is exported to bf16) */
        double tol = i && BF16_ROUNDS ? BF16_DOT_MAX_REL_IMAGE : 1e-4;
        if (a && b && na == nb) {
            double max_ref, d = max_abs_diff(a, b, na, &max_ref);
            printf("  mm2 as %s GGUF + mmproj vs transformers: max|diff| %.3g (%.2g of max|logit|)\n",
                   i ? "F16" : "F32", d, d / max_ref);
            CHECK(d <= tol * max_ref, "--mmproj %d: max|diff| %g", i, d);
        } else {
            CHECK(0, "--mmproj: no logits to compare");
        }
        free(a);
        free(b);
    }
    expect_error("--mmproj with a Hugging Face directory", "--mmproj goes with a GGUF model file",
                 "python3 export.py " VISION "/mm2 " BUILD "/x.bin --mmproj " BUILD "/mm2-mmproj.gguf");
    expect_error("--mmproj that is a text GGUF", "not a Gemma 3 mmproj file",
                 "python3 export.py " BUILD "/mm2-text.gguf " BUILD "/x.bin -q --mmproj " BUILD "/mm2-text.gguf");
}

/* vision_attention: the AVX2 and AVX-512 kernels (where built) against the plain loops, on
 * random q, k, v in shapes no tile divides: 81 and 100 patches (blocks of 24 queries, tiles
 * of 6 and 4, panels of 64 keys all end part-way), head_dim 72 (the tower's: 4.5 AVX-512
 * vectors), 40 and 100 (7: 4 + 3 a tile), with the team's threads sharing the work. */
static void test_vision_attention(void) {
    printf("vision attention: AVX2 and AVX-512 vs plain loops\n");
    const int shapes[][3] = {{9, 2, 72}, {10, 3, 40}, {9, 3, 100}}; /* patches a side, heads, head_dim */
    uint64_t seed = 17;
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
        Config c = {0};
        struct VisionConfig *v = &c.vision;
        c.dim = 8;
        v->side = shapes[i][0], v->n_patches = v->side * v->side, v->patch_size = 14, v->image_size = v->side * 14;
        v->channels = 3, v->n_heads = shapes[i][1], v->dim = v->n_heads * shapes[i][2], v->hidden_dim = v->dim, v->mm_tokens = 1;
        size_t n = (size_t)v->n_patches * v->dim, bytes = vision_state_bytes(&c);
        unsigned char *mem = calloc(bytes + 63, 1);
        float *out[3] = {0};
        double worst[3] = {0};
        VisionState vs;
        vision_state_layout(&vs, &c, mem + (64 - (uintptr_t)mem % 64) % 64);
        for (size_t k = 0; k < n; k++) {
            vs.q[k] = 6 * random_f32(&seed) - 3; /* scores up to about 10: a peaked softmax */
            vs.k[k] = 2 * random_f32(&seed) - 1;
            vs.v[k] = 2 * random_f32(&seed) - 1;
        }
        int top = kernel_level(&vs.mm);
        for (int level = 0; level <= top && level < 3; level++) { /* 0: plain, 1: AVX2, 2: AVX-512 (as built) */
            set_kernel_level(&vs.mm, level);
            memset(vs.att_out, 0, n * sizeof(float));
            PARALLEL_TEAM(vs.mm.threads) { vision_attention(&vs, v); }
            out[level] = malloc(n * sizeof(float));
            memcpy(out[level], vs.att_out, n * sizeof(float));
        }
        double max_ref = 0;
        for (size_t k = 0; k < n; k++) max_ref = fmax(max_ref, fabs(out[0][k]));
        for (int level = 1; level < 3; level++)
            for (size_t k = 0; out[level] && k < n; k++) worst[level] = fmax(worst[level], fabs(out[level][k] - out[0][k]));
        printf("  %3d patches, %d heads of %3d: max|diff| vs plain: AVX2 %s%.3g, AVX-512 %s%.3g (max %.3g)\n", v->n_patches,
               v->n_heads, shapes[i][2], out[1] ? "" : "(not built) ", worst[1], out[2] ? "" : "(not built) ", worst[2], max_ref);
        CHECK(max_ref > 0.1 && worst[1] <= 2e-6 && worst[2] <= 2e-6, "vision attention: the kernels differ from the plain loops by %g, %g",
              worst[1], worst[2]); /* (v within +-1) */
        /* both kernels add each sum in the same order: the same bytes */
        CHECK(!out[1] || !out[2] || !memcmp(out[1], out[2], n * sizeof(float)), "vision attention: AVX2 and AVX-512 differ");
        for (int level = 0; level < 3; level++) free(out[level]);
        free(mem);
    }
}

static void test_vision(void) {
    test_vision_attention();
    test_vision_export();
    test_vision_model();
    test_vision_api();
    test_vision_resize();
    test_vision_cli();
    test_vision_chat();
    test_vision_mmproj();
}
