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

static void test_vision(void) {
    test_vision_export();
}
