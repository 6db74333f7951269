/* Multi-task models (MMoE, PLE, task towers, per-task losses): the tensors of README 3.9, the
   task losses and their report, save/load and configuration round trips, the same bits on 1 and 2
   threads, and exact error codes. Gradients are checked in test_grad.c, PyTorch parity in
   test_fixtures.c. */
#define MOE_IMPLEMENTATION
#include "../moe.h"
#include "test.h"

#ifndef TMP_DIR
#define TMP_DIR "build/tmp_multitask"
#endif

#define T_ROWS 24
#define D_IN 6

static moe_ctx ctx;

/* PLE: two levels (the first with the shared output), then towers; tasks: 3-class CE and MSE. */
static const moe_layer_desc ple_layers[] = {
    {.kind = MOE_LAYER_MULTIGATE, .n_tasks = 2, .n_experts = 2, .n_task_experts = 2, .shared_output = 1, .d_out = 3 * 5, .d_hidden = 8},
    {.kind = MOE_LAYER_MULTIGATE, .n_tasks = 2, .n_experts = 1, .n_task_experts = 1, .task_input = MOE_TASK_INPUT_TASKS_SHARED,
     .expert = MOE_EXPERT_SWIGLU, .d_hidden = 6},
    {.kind = MOE_LAYER_TASK_TOWERS, .n_tasks = 2, .d_hidden = 4, .d_out = 2 * 3},
    {.kind = MOE_LAYER_DENSE, .d_out = 4},
};

static moe_model_desc ple_desc(void) {
    moe_model_desc d;
    memset(&d, 0, sizeof d);
    d.d_in = D_IN;
    d.n_layers = 4;
    d.layers = ple_layers;
    d.max_tokens = T_ROWS;
    d.optimizer.lr = 1e-2f;
    d.n_tasks = 2;
    d.task_loss[0] = MOE_LOSS_CROSS_ENTROPY;
    d.task_loss[1] = MOE_LOSS_MSE;
    d.task_weight[1] = 0.5f;
    d.task_d_out[0] = 3;
    d.task_d_out[1] = 1;
    return d;
}

static float xs[T_ROWS * D_IN], ys[T_ROWS];
static int32_t labels[T_ROWS];
static moe_target tasks[2];
static moe_target target;

static void make_data(void) {
    int i;
    for (i = 0; i < T_ROWS * D_IN; i++) xs[i] = moe_rng_normal(3, 1, (uint64_t)i);
    for (i = 0; i < T_ROWS; i++) {
        labels[i] = (int32_t)(moe_rng_u64(3, 2, (uint64_t)i) % 3);
        ys[i] = xs[i * D_IN] - 0.5f * xs[i * D_IN + 1];
    }
    memset(tasks, 0, sizeof tasks);
    memset(&target, 0, sizeof target);
    tasks[0].labels = labels;
    tasks[1].values = ys;
    target.tasks = tasks;
}

static int test_tensors(void) {
    static const char *const names[] = {
        "layers.0.gates.0.weight", "layers.0.gates.1.weight", "layers.0.gates.2.weight",
        "layers.0.experts.fc0.weight", "layers.0.task_experts.fc1.bias", "layers.1.gates.0.weight",
        "layers.1.experts.w1.weight", "layers.1.task_experts.w2.weight", "layers.2.towers.fc0.weight", "layers.2.towers.fc1.bias"};
    static const int64_t shapes[][3] = {{4, 6, 1}, {4, 6, 1}, {6, 6, 1}, {2, 8, 6}, {4, 5, 1}, {2, 5, 1},
                                        {1, 6, 5}, {2, 5, 6}, {2, 4, 5}, {2, 3, 1}};
    moe_model_desc d = ple_desc();
    moe_model *m = NULL;
    moe_tensor t;
    size_t i;
    CHECK_OK(moe_model_create(&ctx, &d, &m), &ctx);
    if (!m) return 0;
    for (i = 0; i < sizeof names / sizeof names[0]; i++) {
        CHECK_OK(moe_model_find_tensor(m, names[i], &t), &ctx);
        CHECK(t.shape[0] == shapes[i][0] && t.shape[1] == shapes[i][1] && t.shape[2] == shapes[i][2], "%s: shape %lld %lld %lld",
              names[i], (long long)t.shape[0], (long long)t.shape[1], (long long)t.shape[2]);
    }
    /* the level-2 gates of the tasks mix one own and one shared expert; a gate over one expert has no tensor */
    CHECK_RESULT(moe_model_find_tensor(m, "layers.2.gates.0.weight", &t), MOE_ERR_INVALID_ARGUMENT, &ctx);
    {   /* a resolved desc resolves to itself */
        moe_model *again = NULL;
        moe_model_desc rd = *moe_model_get_desc(m);
        CHECK_OK(moe_model_create(&ctx, &rd, &again), &ctx);
        CHECK(again && moe_model_parameter_count(again) == moe_model_parameter_count(m), "re-created from its resolved desc");
        moe_model_destroy(again);
    }
    CHECK(moe_model_get_desc(m)->layers[0].d_in == D_IN && moe_model_get_desc(m)->layers[1].d_in == 15 &&
          moe_model_get_desc(m)->layers[1].d_out == 10 && moe_model_get_desc(m)->layers[2].d_hidden == 4, "resolved widths");
    moe_model_destroy(m);
    return 0;
}

/* info.loss is the weighted sum of the task losses, each equal to its slice's own loss. */
static int test_task_losses(void) {
    moe_model_desc d = ple_desc();
    moe_model *m = NULL;
    moe_step_info info;
    float y[T_ROWS * 4], loss, dy[T_ROWS * 4];
    double ce = 0, mse = 0;
    int t, c, step;
    CHECK_OK(moe_model_create(&ctx, &d, &m), &ctx);
    if (!m) return 0;
    CHECK_OK(moe_model_forward(m, xs, T_ROWS, y, NULL), &ctx);
    CHECK_OK(moe_model_loss(m, &target, &loss, dy), &ctx);
    for (t = 0; t < T_ROWS; t++) {
        double mx = -1e30, s = 0, diff = (double)y[t * 4 + 3] - ys[t];
        for (c = 0; c < 3; c++) mx = y[t * 4 + c] > mx ? y[t * 4 + c] : mx;
        for (c = 0; c < 3; c++) s += exp(y[t * 4 + c] - mx);
        ce += mx + log(s) - y[t * 4 + labels[t]];
        mse += diff * diff;
        CHECK(fabs(dy[t * 4 + 3] - 0.5 * 2.0 * diff / T_ROWS) < 1e-6, "weighted MSE gradient, row %d", t);
    }
    ce /= T_ROWS;
    mse /= T_ROWS;
    CHECK(fabs(loss - (ce + 0.5 * mse)) < 1e-5 * (1 + fabs(loss)), "loss %.8g vs %.8g", (double)loss, ce + 0.5 * mse);
    CHECK_OK(moe_model_train_step(m, xs, &target, T_ROWS, &info), &ctx);
    CHECK(fabs(info.task_loss[0] - ce) < 1e-5 && fabs(info.task_loss[1] - mse) < 1e-5, "task losses %g %g vs %g %g",
          (double)info.task_loss[0], (double)info.task_loss[1], ce, mse);
    CHECK(info.loss == loss && info.task_loss[2] == 0.0f, "info.loss %g", (double)info.loss);
    for (step = 0; step < 150; step++) CHECK_OK(moe_model_train_step(m, xs, &target, T_ROWS, &info), &ctx);
    CHECK(info.task_loss[0] < 0.5 * ce && info.task_loss[1] < 0.5 * mse, "training lowers both tasks: %g %g (from %g %g)",
          (double)info.task_loss[0], (double)info.task_loss[1], ce, mse);
    moe_model_destroy(m);
    return 0;
}

/* Training, saving and loading: the same bits on 1 and 2 threads, the same config and outputs after a load. */
static int test_round_trip_threads(void) {
    moe_model_desc d = ple_desc();
    moe_model *m[2] = {NULL, NULL}, *back = NULL, *fresh = NULL;
    moe_ctx c[2];
    char path[256], json[4096], json2[4096];
    float y0[T_ROWS * 4], y1[T_ROWS * 4];
    int64_t n0, n1;
    int k, step;
    for (k = 0; k < 2; k++) {
        CHECK_OK(moe_ctx_init(&c[k], &(moe_ctx_desc){.seed = 5, .n_threads = k + 1}), &c[k]);
        CHECK_OK(moe_model_create(&c[k], &d, &m[k]), &c[k]);
        if (!m[k]) return 0;
        for (step = 0; step < 5; step++) CHECK_OK(moe_model_train_step(m[k], xs, &target, T_ROWS, NULL), &c[k]);
    }
    {
        const float *p0 = moe_model_params(m[0], &n0), *p1 = moe_model_params(m[1], &n1);
        CHECK(n0 == n1 && memcmp(p0, p1, sizeof(float) * (size_t)n0) == 0, "1 and 2 threads train the same bits");
    }
    snprintf(path, sizeof path, "%s/ple.safetensors", TMP_DIR);
    CHECK_OK(moe_model_save(m[1], path), &c[1]);
    CHECK_OK(moe_model_load(&ctx, path, 0, &back), &ctx);
    if (!back) { moe_model_destroy(m[0]); moe_model_destroy(m[1]); return 0; }
    CHECK_OK(moe_model_forward(m[1], xs, T_ROWS, y0, NULL), &c[1]);
    CHECK_OK(moe_model_forward(back, xs, T_ROWS, y1, NULL), &ctx);
    CHECK(memcmp(y0, y1, sizeof y0) == 0, "a loaded model computes the saved one's outputs");
    moe_model_config_json(m[1], json, sizeof json);
    moe_model_config_json(back, json2, sizeof json2);
    CHECK(strcmp(json, json2) == 0, "configurations differ:\n%s\n%s", json, json2);
    CHECK(strstr(json, "\"kind\":\"multigate\"") && strstr(json, "\"task_input\":\"tasks_shared\"") &&
          strstr(json, "\"kind\":\"task_towers\"") && strstr(json, "\"tasks\":[{\"loss\":\"cross_entropy\",\"weight\":1,\"d_out\":3}"),
          "config text: %s", json);
    CHECK(moe_model_get_desc(back)->n_tasks == 2 && moe_model_get_desc(back)->task_weight[1] == 0.5f &&
          moe_model_get_desc(back)->task_loss[1] == MOE_LOSS_MSE, "tasks read back");
    CHECK_OK(moe_model_from_config(&ctx, json, 0, &fresh), &ctx);
    if (fresh) {
        moe_model_config_json(fresh, json2, sizeof json2);
        CHECK(strcmp(json, json2) == 0, "from_config changes the configuration");
        CHECK(moe_model_parameter_count(fresh) == moe_model_parameter_count(back), "parameter counts");
    }
    moe_model_destroy(fresh);
    /* a checkpoint resumes bit for bit: 2 more steps on the saved model and on the reloaded one */
    moe_model_destroy(back);
    back = NULL;
    snprintf(path, sizeof path, "%s/ple.ckpt", TMP_DIR);
    CHECK_OK(moe_model_save_checkpoint(m[1], path), &c[1]);
    CHECK_OK(moe_model_load_checkpoint(&c[0], path, 0, &back), &c[0]);
    if (back) {
        for (step = 0; step < 2; step++) {
            CHECK_OK(moe_model_train_step(m[1], xs, &target, T_ROWS, NULL), &c[1]);
            CHECK_OK(moe_model_train_step(back, xs, &target, T_ROWS, NULL), &c[0]);
        }
        {
            const float *p0 = moe_model_params(back, &n0), *p1 = moe_model_params(m[1], &n1);
            CHECK(n0 == n1 && memcmp(p0, p1, sizeof(float) * (size_t)n0) == 0 && moe_model_steps(back) == 7,
                  "a resumed multi-task run trains the same bits");
        }
    }
    remove(path);
    snprintf(path, sizeof path, "%s/ple.safetensors", TMP_DIR);
    moe_model_destroy(back);
    moe_model_destroy(m[0]);
    moe_model_destroy(m[1]);
    remove(path);
    return 0;
}

/* A multigate layer on its own: the layer API, one shared input, MMoE defaults. */
static int test_layer_api(void) {
    moe_layer *l = NULL;
    float y[T_ROWS * 12], dy[T_ROWS * 12], dx[T_ROWS * D_IN];
    int i;
    CHECK_RESULT(moe_layer_create(&ctx, &(moe_layer_desc){.kind = MOE_LAYER_MULTIGATE}, T_ROWS, &l), MOE_ERR_SHAPE, &ctx);  /* no d_in */
    CHECK_OK(moe_layer_create(&ctx, &(moe_layer_desc){.kind = MOE_LAYER_MULTIGATE, .d_in = D_IN}, T_ROWS, &l), &ctx);
    if (!l) return 0;
    /* defaults: 2 tasks, 4 shared experts, each task's slice as wide as the input */
    CHECK(moe_layer_get_desc(l)->n_tasks == 2 && moe_layer_get_desc(l)->n_experts == 4 && moe_layer_get_desc(l)->d_out == 2 * D_IN &&
          moe_layer_get_desc(l)->task_input == MOE_TASK_INPUT_SINGLE && moe_layer_tensor_count(l) == 2 + 4,
          "defaults (%d tensors)", moe_layer_tensor_count(l));
    CHECK_OK(moe_layer_forward(l, xs, T_ROWS, y, NULL), &ctx);
    for (i = 0; i < T_ROWS * 12; i++) dy[i] = moe_rng_normal(3, 3, (uint64_t)i);
    CHECK_OK(moe_layer_backward(l, dy, dx, 0), &ctx);
    CHECK_RESULT(moe_layer_stats(l, &(moe_stats){0}), MOE_ERR_INVALID_ARGUMENT, &ctx);
    {   /* few rows take the decode path: the same outputs as inside a large batch, to rounding */
        float small[5 * 12];
        double worst = 0;
        CHECK_OK(moe_layer_forward(l, xs, T_ROWS, y, NULL), &ctx);
        CHECK_OK(moe_layer_forward(l, xs, 5, small, NULL), &ctx);
        for (i = 0; i < 5 * 12; i++) {  /* not fmax: aarch64 gcc 12.2 -O2 crashes vectorizing that reduction */
            double e = fabs(small[i] - y[i]) / (1e-6 + fabs(y[i]));
            if (!(e <= worst)) worst = e;  /* a NaN stays and fails the check */
        }
        CHECK(worst < 1e-4, "decode path differs by %g", worst);
    }
    moe_layer_destroy(l);
    return 0;
}

/* Top-k gates: the same parameters give other outputs than dense gates (the values themselves are
   checked against the reference in test_grad.c). */
static int test_top_k_gates(void) {
    moe_layer *dense = NULL, *top1 = NULL;
    float yd[T_ROWS * 12], y1[T_ROWS * 12];
    int64_t n;
    int i, matches = 0;
    CHECK_OK(moe_layer_create(&ctx, &(moe_layer_desc){.kind = MOE_LAYER_MULTIGATE, .d_in = D_IN, .n_experts = 3}, T_ROWS, &dense), &ctx);
    CHECK_OK(moe_layer_create(&ctx, &(moe_layer_desc){.kind = MOE_LAYER_MULTIGATE, .d_in = D_IN, .n_experts = 3, .top_k = 1}, T_ROWS, &top1), &ctx);
    if (!dense || !top1) { moe_layer_destroy(dense); moe_layer_destroy(top1); return 0; }
    {
        float *dst = moe_layer_params(top1, &n);
        memcpy(dst, moe_layer_params(dense, NULL), sizeof(float) * (size_t)n);
    }
    CHECK_OK(moe_layer_forward(dense, xs, T_ROWS, yd, NULL), &ctx);
    CHECK_OK(moe_layer_forward(top1, xs, T_ROWS, y1, NULL), &ctx);
    for (i = 0; i < T_ROWS * 12; i++) matches += yd[i] != y1[i];
    CHECK(matches > 0, "top-1 gates change the outputs");
    moe_layer_destroy(dense);
    moe_layer_destroy(top1);
    return 0;
}

static int test_errors(void) {
    moe_layer_desc bad[2];
    moe_model_desc d = ple_desc();
    moe_model *m = NULL;
    moe_target no_tasks;
    int32_t wrong[T_ROWS];
    int i;
    memset(bad, 0, sizeof bad);
    bad[0].kind = MOE_LAYER_MULTIGATE; bad[0].d_in = 6; bad[0].n_tasks = MOE_MAX_TASKS + 1;
    CHECK_RESULT(moe_layer_create(&ctx, &bad[0], 8, NULL), MOE_ERR_INVALID_ARGUMENT, &ctx);
    CHECK_RESULT(moe_layer_create(&ctx, &bad[0], 8, (moe_layer **)&m), MOE_ERR_INVALID_ARGUMENT, &ctx);
    bad[0].n_tasks = 2; bad[0].task_input = MOE_TASK_INPUT_TASKS;   /* shared experts need a shared slice */
    CHECK_RESULT(moe_layer_create(&ctx, &bad[0], 8, (moe_layer **)&m), MOE_ERR_INVALID_ARGUMENT, &ctx);
    bad[0].task_input = MOE_TASK_INPUT_TASKS_SHARED;                 /* 6 is not 3 slices of ... it is; 7 is not */
    bad[0].d_in = 7;
    CHECK_RESULT(moe_layer_create(&ctx, &bad[0], 8, (moe_layer **)&m), MOE_ERR_SHAPE, &ctx);
    bad[0].d_in = 6; bad[0].d_out = 5;                                /* 5 is not 2 equal task slices */
    CHECK_RESULT(moe_layer_create(&ctx, &bad[0], 8, (moe_layer **)&m), MOE_ERR_SHAPE, &ctx);
    bad[0].d_out = 0; bad[0].residual = 1;
    CHECK_RESULT(moe_layer_create(&ctx, &bad[0], 8, (moe_layer **)&m), MOE_ERR_INVALID_ARGUMENT, &ctx);
    bad[0].residual = 0; bad[0].top_k = -1;
    CHECK_RESULT(moe_layer_create(&ctx, &bad[0], 8, (moe_layer **)&m), MOE_ERR_INVALID_ARGUMENT, &ctx);
    memset(bad, 0, sizeof bad);
    bad[0].kind = MOE_LAYER_TASK_TOWERS; bad[0].d_in = 6; bad[0].n_experts = 2;
    CHECK_RESULT(moe_layer_create(&ctx, &bad[0], 8, (moe_layer **)&m), MOE_ERR_INVALID_ARGUMENT, &ctx);
    bad[0].n_experts = 0; bad[0].top_k = 1;
    CHECK_RESULT(moe_layer_create(&ctx, &bad[0], 8, (moe_layer **)&m), MOE_ERR_INVALID_ARGUMENT, &ctx);
    bad[0].top_k = 0; bad[0].task_input = MOE_TASK_INPUT_TASKS_SHARED;
    CHECK_RESULT(moe_layer_create(&ctx, &bad[0], 8, (moe_layer **)&m), MOE_ERR_INVALID_ARGUMENT, &ctx);
    bad[0].task_input = (moe_task_input)9;
    CHECK_RESULT(moe_layer_create(&ctx, &bad[0], 8, (moe_layer **)&m), MOE_ERR_INVALID_ARGUMENT, &ctx);
    CHECK(m == NULL, "no layer on failure");
    /* model: task widths, weights, losses */
    d.task_d_out[1] = 2;
    CHECK_RESULT(moe_model_create(&ctx, &d, &m), MOE_ERR_SHAPE, &ctx);
    d = ple_desc(); d.task_weight[0] = -1.0f;
    CHECK_RESULT(moe_model_create(&ctx, &d, &m), MOE_ERR_INVALID_ARGUMENT, &ctx);
    d = ple_desc(); d.task_loss[1] = MOE_LOSS_COUNT;
    CHECK_RESULT(moe_model_create(&ctx, &d, &m), MOE_ERR_INVALID_ARGUMENT, &ctx);
    d = ple_desc(); d.n_tasks = 3; d.task_d_out[2] = 0; d.task_d_out[0] = d.task_d_out[1] = 0;   /* 4 outputs: not 3 equal slices */
    CHECK_RESULT(moe_model_create(&ctx, &d, &m), MOE_ERR_SHAPE, &ctx);
    d = ple_desc(); d.n_tasks = -1;
    CHECK_RESULT(moe_model_create(&ctx, &d, &m), MOE_ERR_INVALID_ARGUMENT, &ctx);
    /* targets: the tasks array, and each task's labels */
    d = ple_desc();
    CHECK_OK(moe_model_create(&ctx, &d, &m), &ctx);
    if (!m) return 0;
    memset(&no_tasks, 0, sizeof no_tasks);
    no_tasks.labels = labels;
    CHECK_RESULT(moe_model_train_step(m, xs, &no_tasks, T_ROWS, NULL), MOE_ERR_INVALID_ARGUMENT, &ctx);
    CHECK(strstr(moe_ctx_error(&ctx), "target->tasks") != NULL, "message: %s", moe_ctx_error(&ctx));
    for (i = 0; i < T_ROWS; i++) wrong[i] = 3;   /* task 0 has 3 classes */
    tasks[0].labels = wrong;
    CHECK_RESULT(moe_model_train_step(m, xs, &target, T_ROWS, NULL), MOE_ERR_INVALID_ARGUMENT, &ctx);
    CHECK(strstr(moe_ctx_error(&ctx), "task 0: label 3") != NULL, "message: %s", moe_ctx_error(&ctx));
    tasks[0].labels = labels;
    tasks[1].values = NULL;
    CHECK_RESULT(moe_model_train_step(m, xs, &target, T_ROWS, NULL), MOE_ERR_INVALID_ARGUMENT, &ctx);
    tasks[1].values = ys;
    CHECK(moe_model_steps(m) == 0, "refused steps change nothing");
    moe_model_destroy(m);
    m = NULL;
    /* configuration: fields of another kind, bad task entries */
    CHECK_RESULT(moe_model_from_config(&ctx, "{\"format\":\"moe.h\",\"version\":1,\"d_in\":4,\"layers\":[{\"kind\":\"task_towers\",\"task_experts\":2}]}", 0, &m),
                 MOE_ERR_FORMAT, &ctx);
    CHECK_RESULT(moe_model_from_config(&ctx, "{\"format\":\"moe.h\",\"version\":1,\"d_in\":4,\"layers\":[{\"kind\":\"dense\",\"tasks\":2}]}", 0, &m),
                 MOE_ERR_FORMAT, &ctx);
    CHECK_RESULT(moe_model_from_config(&ctx, "{\"format\":\"moe.h\",\"version\":1,\"d_in\":4,\"layers\":[{\"kind\":\"multigate\",\"task_input\":\"both\"}]}", 0, &m),
                 MOE_ERR_FORMAT, &ctx);
    CHECK_RESULT(moe_model_from_config(&ctx, "{\"format\":\"moe.h\",\"version\":1,\"d_in\":4,\"layers\":[{\"kind\":\"dense\"}],\"tasks\":[{\"loss\":\"mse\",\"gain\":2}]}", 0, &m),
                 MOE_ERR_FORMAT, &ctx);
    CHECK_RESULT(moe_model_from_config(&ctx, "{\"format\":\"moe.h\",\"version\":1,\"d_in\":4,\"layers\":[{\"kind\":\"dense\"}],\"tasks\":[]}", 0, &m),
                 MOE_ERR_FORMAT, &ctx);
    CHECK_OK(moe_model_from_config(&ctx, "{\"format\":\"moe.h\",\"version\":1,\"d_in\":4,\"layers\":[{\"kind\":\"multigate\",\"tasks\":2,\"experts\":3}],"
                                         "\"tasks\":[{\"loss\":\"mse\"},{\"loss\":\"bce\",\"weight\":2}]}", 0, &m), &ctx);
    CHECK(m && moe_model_d_out(m) == 8 && moe_model_get_desc(m)->task_d_out[1] == 4 && moe_model_get_desc(m)->task_weight[0] == 1.0f,
          "defaults from a configuration");
    moe_model_destroy(m);
    return 0;
}

int main(void) {
    printf("test_multitask\n");
    if (test_make_dir(TMP_DIR) != 0) return 1;
    moe_ctx_init(&ctx, &(moe_ctx_desc){.seed = 1});
    make_data();
    RUN(test_tensors);
    RUN(test_task_losses);
    RUN(test_round_trip_threads);
    RUN(test_layer_api);
    RUN(test_top_k_gates);
    RUN(test_errors);
    TEST_END();
}
