/* Writes the seed corpus of fuzz_load.c into a directory: small model files of every layer kind,
   router and expert kind, checkpoints, bare configurations, and malformed files (each a case the
   loader must refuse before it allocates). Inputs the fuzzer found are merged in next to them
   (README, "What the reader guarantees").
     cc -std=c99 tests/fuzz/gen_corpus.c -lm -o build/gen_corpus && build/gen_corpus tests/fuzz/corpus */
#define MOE_IMPLEMENTATION
#include "../../moe.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static moe_ctx ctx;
static const char *dir;

static const char *path_of(const char *name) {
    static char p[1024];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    return p;
}

static void write_bytes(const char *name, const void *data, size_t n) {
    FILE *fp = fopen(path_of(name), "wb");
    if (!fp || fwrite(data, 1, n, fp) != n) { fprintf(stderr, "cannot write %s\n", name); exit(1); }
    fclose(fp);
}

/* A safetensors file from a header text and n data bytes (the length prefix is computed). */
static void write_raw(const char *name, const char *header, const void *data, size_t n) {
    size_t h = strlen(header), i;
    unsigned char *b = (unsigned char *)calloc(8 + h + n + 1, 1);
    for (i = 0; i < 8; i++) b[i] = (unsigned char)((uint64_t)h >> (8 * i));
    memcpy(b + 8, header, h);
    if (n) memcpy(b + 8 + h, data, n);
    write_bytes(name, b, 8 + h + n);
    free(b);
}

static moe_model *model_of(int64_t d_in, const moe_layer_desc *layers, int n, moe_loss loss, moe_optimizer_kind opt) {
    moe_model *m = NULL;
    moe_model_desc d;
    memset(&d, 0, sizeof d);
    d.d_in = d_in;
    d.n_layers = n;
    d.layers = layers;
    d.loss = loss;
    d.max_tokens = 4;
    d.optimizer.kind = opt;
    d.optimizer.momentum = opt == MOE_OPTIMIZER_SGD ? 0.5f : 0.0f;
    if (moe_model_create(&ctx, &d, &m) != MOE_OK) { fprintf(stderr, "%s\n", moe_ctx_error(&ctx)); exit(1); }
    return m;
}

static void train(moe_model *m, int steps) {
    float x[4 * 8];
    int32_t labels[4] = {0, 1, 0, 1};
    float y[4 * 8];
    moe_target t;
    int i, s;
    t.labels = labels;
    t.values = y;
    for (i = 0; i < 32; i++) { x[i] = (float)((i * 7) % 5) - 2.0f; y[i] = (float)(i % 2); }
    for (s = 0; s < steps; s++) moe_model_train_step(m, x, &t, 4, NULL);
}

static void save(moe_model *m, const char *name, int checkpoint) {
    if ((checkpoint ? moe_model_save_checkpoint(m, path_of(name)) : moe_model_save(m, path_of(name))) != MOE_OK) {
        fprintf(stderr, "%s\n", moe_ctx_error(&ctx));
        exit(1);
    }
}

static void save_config(moe_model *m, const char *name) {
    char buf[4096];
    size_t n = moe_model_config_json(m, buf, sizeof buf);
    write_bytes(name, buf, n);
}

int main(int argc, char **argv) {
    static const moe_layer_desc dense[] = {{.kind = MOE_LAYER_DENSE, .d_out = 2, .activation = MOE_ACT_TANH}};
    static const moe_layer_desc norms[] = {{.kind = MOE_LAYER_RMSNORM}, {.kind = MOE_LAYER_LAYERNORM, .residual = 1},
                                           {.kind = MOE_LAYER_DENSE, .d_out = 2, .bias = MOE_FLAG_OFF}};
    static const moe_layer_desc topk[] = {{.kind = MOE_LAYER_MOE, .n_experts = 3, .top_k = 2, .d_hidden = 2, .n_hidden_layers = 2,
                                           .activation = MOE_ACT_GELU, .n_shared_experts = 1, .router_bias = MOE_FLAG_ON,
                                           .balance_loss = 0.01f, .z_loss = 0.001f},
                                          {.kind = MOE_LAYER_DENSE, .d_out = 2}};
    static const moe_layer_desc noisy[] = {{.kind = MOE_LAYER_MOE, .router = MOE_ROUTER_NOISY_TOPK, .n_experts = 4, .top_k = 1,
                                            .expert = MOE_EXPERT_LINEAR, .jitter = 0.1f, .importance_loss = 0.1f, .load_loss = 0.1f}};
    static const moe_layer_desc sw[] = {{.kind = MOE_LAYER_MOE, .router = MOE_ROUTER_SWITCH, .n_experts = 2, .expert = MOE_EXPERT_SWIGLU,
                                         .d_hidden = 3, .capacity_factor = 1.0f, .residual = 1},
                                        {.kind = MOE_LAYER_RMSNORM}};
    static const moe_layer_desc ple[] = {{.kind = MOE_LAYER_MULTIGATE, .n_tasks = 2, .n_experts = 1, .n_task_experts = 1, .shared_output = 1,
                                          .d_out = 3 * 2, .d_hidden = 2},
                                         {.kind = MOE_LAYER_MULTIGATE, .n_tasks = 2, .n_experts = 2, .task_input = MOE_TASK_INPUT_TASKS_SHARED,
                                          .expert = MOE_EXPERT_SWIGLU, .d_hidden = 2},
                                         {.kind = MOE_LAYER_TASK_TOWERS, .n_tasks = 2, .expert = MOE_EXPERT_LINEAR, .d_out = 2}};
    moe_model *m;
    if (argc != 2) { fprintf(stderr, "usage: gen_corpus DIR\n"); return 2; }
    dir = argv[1];
    moe_ctx_init(&ctx, &(moe_ctx_desc){.seed = 7});

    m = model_of(3, dense, 1, MOE_LOSS_MSE, MOE_OPTIMIZER_SGD);
    save(m, "dense.safetensors", 0);
    save_config(m, "dense.json");
    train(m, 2);
    save(m, "dense_sgd.ckpt", 1);
    moe_model_destroy(m);

    m = model_of(3, norms, 3, MOE_LOSS_BCE, MOE_OPTIMIZER_ADAM);
    save(m, "norms.safetensors", 0);
    moe_model_destroy(m);

    m = model_of(3, topk, 2, MOE_LOSS_CROSS_ENTROPY, MOE_OPTIMIZER_ADAMW);
    save(m, "moe_topk_mlp.safetensors", 0);
    save_config(m, "moe_topk_mlp.json");
    train(m, 3);
    save(m, "moe_topk_mlp_adamw.ckpt", 1);
    moe_model_destroy(m);

    m = model_of(2, noisy, 1, MOE_LOSS_MSE, MOE_OPTIMIZER_ADAMW);
    save(m, "moe_noisy_linear.safetensors", 0);
    train(m, 2);
    save(m, "moe_noisy_linear.ckpt", 1);
    moe_model_destroy(m);

    m = model_of(2, sw, 2, MOE_LOSS_MSE, MOE_OPTIMIZER_SGD);
    save(m, "moe_switch_swiglu.safetensors", 0);
    save_config(m, "moe_switch_swiglu.json");
    moe_model_destroy(m);

    /* multi-task: PLE levels, towers and two task losses */
    {
        moe_model_desc d;
        memset(&d, 0, sizeof d);
        d.d_in = 3; d.n_layers = 3; d.layers = ple; d.max_tokens = 4;
        d.n_tasks = 2; d.task_loss[0] = MOE_LOSS_BCE; d.task_loss[1] = MOE_LOSS_MSE; d.task_weight[1] = 0.5f;
        if (moe_model_create(&ctx, &d, &m) != MOE_OK) { fprintf(stderr, "%s\n", moe_ctx_error(&ctx)); return 1; }
        save(m, "multitask_ple.safetensors", 0);
        save_config(m, "multitask_ple.json");
        moe_model_destroy(m);
    }

    /* PyTorch-style dtypes: BF16 and F16 weights, an extra tensor outside layers. */
    {
        const char *cfg = "{\\\"format\\\":\\\"moe.h\\\",\\\"version\\\":1,\\\"d_in\\\":2,\\\"layers\\\":[{\\\"kind\\\":\\\"dense\\\",\\\"d_out\\\":1}]}";
        char header[1024];
        unsigned char data[4 + 2 + 8] = {0x80, 0x3f, 0x00, 0xc0, 0x00, 0x3c, 1, 2, 3, 4, 5, 6, 7, 8};
        snprintf(header, sizeof header,
                 "{\"__metadata__\":{\"moe.config\":\"%s\"},\"layers.0.weight\":{\"dtype\":\"BF16\",\"shape\":[1,2],\"data_offsets\":[0,4]},"
                 "\"layers.0.bias\":{\"dtype\":\"F16\",\"shape\":[1],\"data_offsets\":[4,6]},\"other\":{\"dtype\":\"U8\",\"shape\":[2,4],\"data_offsets\":[6,14]}}", cfg);
        write_raw("foreign_dtypes.safetensors", header, data, sizeof data);
        /* the configuration claims a huge layer; its tensors are tiny: refused before any allocation */
        snprintf(header, sizeof header,
                 "{\"__metadata__\":{\"moe.config\":\"{\\\"format\\\":\\\"moe.h\\\",\\\"version\\\":1,\\\"d_in\\\":2,\\\"max_tokens\\\":268435456,"
                 "\\\"layers\\\":[{\\\"kind\\\":\\\"dense\\\",\\\"d_out\\\":500000}]}\"},"
                 "\"layers.0.weight\":{\"dtype\":\"F16\",\"shape\":[1,2],\"data_offsets\":[0,4]}}");
        write_raw("bad_huge_config.safetensors", header, data, 4);
        /* a shape of 2^40 elements over 4 bytes of data */
        snprintf(header, sizeof header, "{\"layers.0.weight\":{\"dtype\":\"F32\",\"shape\":[1099511627776],\"data_offsets\":[0,4]}}");
        write_raw("bad_shape.safetensors", header, data, 4);
        /* NaN parameters */
        {
            unsigned char nan[12] = {0, 0, 0xc0, 0x7f, 0, 0, 0x80, 0x3f, 0, 0, 0, 0};
            snprintf(header, sizeof header,
                     "{\"__metadata__\":{\"moe.config\":\"%s\"},\"layers.0.weight\":{\"dtype\":\"F32\",\"shape\":[1,2],\"data_offsets\":[0,8]},"
                     "\"layers.0.bias\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}", cfg);
            write_raw("bad_nan.safetensors", header, nan, sizeof nan);
        }
        /* a header length beyond the file, deep nesting, and a checkpoint state that lies */
        {
            unsigned char b[16] = {0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, '{', '}'};
            write_bytes("bad_header_length.safetensors", b, 10);
        }
        write_raw("bad_nesting.safetensors", "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]", NULL, 0);
        snprintf(header, sizeof header,
                 "{\"__metadata__\":{\"moe.config\":\"%s\",\"moe.checkpoint\":\"{\\\"version\\\":1,\\\"step\\\":5,\\\"seed\\\":\\\"7\\\",\\\"noise_steps\\\":[5]}\"},"
                 "\"layers.0.weight\":{\"dtype\":\"BF16\",\"shape\":[1,2],\"data_offsets\":[0,4]},"
                 "\"layers.0.bias\":{\"dtype\":\"F16\",\"shape\":[1],\"data_offsets\":[4,6]},"
                 "\"optimizer.m\":{\"dtype\":\"F32\",\"shape\":[1099511627776],\"data_offsets\":[6,14]}}", cfg);
        write_raw("bad_checkpoint_moments.ckpt", header, data, sizeof data);
    }
    return 0;
}
