/* Checkpoints and refused steps: a run resumed from a checkpoint ends bit for bit where the
   uninterrupted run ends, also when the training process is killed with SIGKILL mid-run; a failed
   checkpoint save leaves the old file intact; a step that would make parameters or optimizer state
   non-finite changes nothing; malformed checkpoints are refused with exact codes. */
#if !defined(_WIN32)
#define _POSIX_C_SOURCE 200809L
#endif
#define MOE_IMPLEMENTATION
#include "../moe.h"
#include "test.h"

#if !defined(_WIN32)
#include <signal.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>
#define HAVE_FORK 1
#endif

#ifndef TMP_DIR
#define TMP_DIR "build/tmp_checkpoint"
#endif

#define SEED 1234
#define STEPS 40
#define BATCH 8

static moe_ctx ctx;
static const char *test_self;   /* this program, run again as the training child */
static char path_buf[4][512];
static int path_slot;

static const char *tmp(const char *name) {
    char *p = path_buf[path_slot++ & 3];
    snprintf(p, sizeof path_buf[0], "%s/%s", TMP_DIR, name);
    return p;
}

/* Every piece of training state that a checkpoint must carry: noisy routing and jitter (noise
   counters), a warm-up + cosine schedule (step), Adam moments. */
static const moe_layer_desc layers[] = {
    {.kind = MOE_LAYER_MOE, .d_out = 8, .router = MOE_ROUTER_NOISY_TOPK, .n_experts = 4, .top_k = 2, .jitter = 0.05f,
     .importance_loss = 0.1f, .load_loss = 0.1f, .n_shared_experts = 1},
    {.kind = MOE_LAYER_RMSNORM},
    {.kind = MOE_LAYER_MOE, .router = MOE_ROUTER_SWITCH, .n_experts = 3, .expert = MOE_EXPERT_SWIGLU, .residual = 1,
     .balance_loss = 0.01f, .z_loss = 0.001f, .jitter = 0.02f},
    {.kind = MOE_LAYER_DENSE, .d_out = 5},
};

static moe_model_desc model_desc(moe_optimizer_kind kind) {
    moe_model_desc d;
    memset(&d, 0, sizeof d);
    d.d_in = 6;
    d.n_layers = 4;
    d.layers = layers;
    d.max_tokens = BATCH;
    d.optimizer.kind = kind;
    d.optimizer.lr = 0.01f;
    d.optimizer.momentum = kind == MOE_OPTIMIZER_SGD ? 0.9f : 0.0f;
    d.optimizer.weight_decay = 0.01f;
    d.optimizer.clip_norm = 1.0f;
    d.optimizer.warmup_steps = 5;
    d.optimizer.total_steps = STEPS;
    d.optimizer.min_lr = 0.001f;
    return d;
}

/* The batch of step s: a pure function of s. */
static void batch_of(int64_t s, float *x, int32_t *labels) {
    int i;
    for (i = 0; i < BATCH * 6; i++) x[i] = 2.0f * moe_rng_uniform(7, (uint64_t)s, (uint64_t)i) - 1.0f;
    for (i = 0; i < BATCH; i++) labels[i] = (int32_t)(moe_rng_u64(8, (uint64_t)s, (uint64_t)i) % 5);
}

/* Train to STEPS from the checkpoint at ckpt if there is one (else from a fresh model), saving a
   checkpoint every `every` steps and telling notify_fd (>= 0) after each; then save the model to out. */
static int train_run(moe_optimizer_kind kind, const char *ckpt, int every, int notify_fd, const char *out) {
    moe_model *m = NULL;
    moe_model_desc d = model_desc(kind);
    FILE *probe = fopen(ckpt, "rb");
    int64_t s;
    float x[BATCH * 6];
    int32_t labels[BATCH];
    moe_result r;
    if (probe) { fclose(probe); r = moe_model_load_checkpoint(&ctx, ckpt, 0, &m); }
    else r = moe_model_create(&ctx, &d, &m);
    if (r != MOE_OK) { fprintf(stderr, "train_run: %s\n", moe_ctx_error(&ctx)); return 1; }
    for (s = moe_model_steps(m); s < STEPS; s++) {
        moe_target target = {labels, NULL, NULL};
        batch_of(s, x, labels);
        if (moe_model_train_step(m, x, &target, BATCH, NULL) != MOE_OK) { fprintf(stderr, "step %lld: %s\n", (long long)s, moe_ctx_error(&ctx)); break; }
        if ((s + 1) % every == 0) {
            if (moe_model_save_checkpoint(m, ckpt) != MOE_OK) { fprintf(stderr, "checkpoint: %s\n", moe_ctx_error(&ctx)); break; }
#ifdef HAVE_FORK
            if (notify_fd >= 0 && write(notify_fd, "c", 1) != 1) break;
#else
            (void)notify_fd;
#endif
        }
    }
    r = s == STEPS ? moe_model_save(m, out) : MOE_ERR_STATE;
    moe_model_destroy(m);
    return r != MOE_OK;
}

/* Copy the checkpoint src to dst with its configuration and/or state text replaced (NULL: kept),
   tensor `drop` left out and a short F32 [3] tensor `extra` added. */
static moe_result rewrite_checkpoint(const char *src, const char *dst, const char *config, const char *state, const char *drop, const char *extra) {
    moe_tensor_file *f = NULL;
    moe_tensor_writer *w = NULL;
    const int64_t short_shape = 3;
    int t;
    moe_result r = moe_tensor_file_read(&ctx, src, &f);
    if (r == MOE_OK) r = moe_tensor_writer_create(&ctx, &w);
    if (r == MOE_OK) r = moe_tensor_writer_metadata(w, "moe.config", config ? config : moe_tensor_file_metadata(f, "moe.config"));
    if (r == MOE_OK) r = moe_tensor_writer_metadata(w, "moe.checkpoint", state ? state : moe_tensor_file_metadata(f, "moe.checkpoint"));
    for (t = 0; r == MOE_OK && t < moe_tensor_file_count(f); t++) {
        const moe_file_tensor *ft = moe_tensor_file_get(f, t);
        if (drop && strcmp(ft->name, drop) == 0) continue;
        r = moe_tensor_writer_add(w, ft->name, ft->dtype, ft->ndim, ft->shape, ft->data);
    }
    if (r == MOE_OK && extra) r = moe_tensor_writer_add(w, extra, MOE_DTYPE_F32, 1, &short_shape, moe_tensor_file_get(f, 0)->data);
    if (r == MOE_OK) r = moe_tensor_writer_save(w, dst);
    moe_tensor_writer_destroy(w);
    moe_tensor_file_close(f);
    return r;
}

static const char *const kind_names[] = {"default", "sgd", "adam", "adamw"};

/* In one process: stop after k steps, resume from the checkpoint, compare with the straight run. */
static void resume_in_process(const void *arg) {
    moe_optimizer_kind kind = *(const moe_optimizer_kind *)arg;
    char straight[64], resumed[64], ckpt[64];
    snprintf(straight, sizeof straight, "straight_%s.safetensors", kind_names[kind]);
    snprintf(resumed, sizeof resumed, "resumed_%s.safetensors", kind_names[kind]);
    snprintf(ckpt, sizeof ckpt, "ckpt_%s.safetensors", kind_names[kind]);
    remove(tmp(ckpt));
    remove(tmp("none.ckpt"));
    CHECK(train_run(kind, tmp("none.ckpt"), STEPS + 1, -1, tmp(straight)) == 0, "uninterrupted run");
    {   /* run 13 steps and stop there, as a crash would */
        moe_model *m = NULL;
        moe_model_desc d = model_desc(kind);
        float x[BATCH * 6];
        int32_t labels[BATCH];
        int64_t s;
        CHECK_OK(moe_model_create(&ctx, &d, &m), &ctx);
        for (s = 0; m && s < 13; s++) {
            moe_target target = {labels, NULL, NULL};
            batch_of(s, x, labels);
            CHECK_OK(moe_model_train_step(m, x, &target, BATCH, NULL), &ctx);
        }
        CHECK_OK(moe_model_save_checkpoint(m, tmp(ckpt)), &ctx);
        moe_model_destroy(m);
    }
    CHECK(train_run(kind, tmp(ckpt), STEPS + 1, -1, tmp(resumed)) == 0, "resumed run");
    CHECK(test_same_files(tmp(straight), tmp(resumed)), "%s: the resumed run's model file equals the uninterrupted run's", kind_names[kind]);
}

/* A real crash: a child process trains with checkpoints every 3 steps and is killed with SIGKILL
   after it has written some; the run resumed from the last checkpoint ends byte-identical. */
static int test_kill_and_resume(void) {
#ifdef HAVE_FORK
    int fds[2], status = 0, got = 0, attempt, kills = 0;
    char c, fd_text[16];
    pid_t pid;
    if (!test_self) return TEST_SKIP;
    remove(tmp("none.ckpt"));
    CHECK(train_run(MOE_OPTIMIZER_ADAMW, tmp("none.ckpt"), STEPS + 1, -1, tmp("straight_kill.safetensors")) == 0, "uninterrupted run");
    remove(tmp("kill.ckpt"));
    /* kill the run after its first checkpoints, then kill the resumed run too; a child that
       outran the kill (finished first) does not count, and the run starts over */
    for (attempt = 0; kills < 2 && attempt < 8; attempt++) {
        if (pipe(fds) != 0) return TEST_SKIP;
        snprintf(fd_text, sizeof fd_text, "%d", fds[1]);
        fflush(NULL);
        pid = fork();
        if (pid == 0) {
            /* a fresh process image: no OpenMP runtime state crosses the fork */
            execl(test_self, test_self, "--train-child", tmp("kill.ckpt"), fd_text, tmp("child_out.safetensors"), (char *)NULL);
            if (write(fds[1], "E", 1) != 1) _exit(126);  /* tell the parent the exec failed */
            _exit(127);
        }
        close(fds[1]);
        CHECK(pid > 0, "fork");
        if (pid <= 0) { close(fds[0]); return 0; }
        got = 0;
        c = 0;
        while (got < 2 && read(fds[0], &c, 1) == 1 && c != 'E') got++;  /* two more checkpoints written */
        kill(pid, SIGKILL);
        waitpid(pid, &status, 0);
        close(fds[0]);
        if (c == 'E') {  /* not this library's doing: e.g. qemu-user without binfmt_misc runs no foreign binary */
            printf("    this program cannot start itself again (exec of %s failed); no child to kill\n", test_self);
            return TEST_SKIP;
        }
        CHECK(got == 2, "attempt %d: the child reported %d checkpoints before it ended (status %d)", attempt, got, status);
        if (got != 2) break;
        if (WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) kills++;
        else remove(tmp("kill.ckpt"));
    }
    CHECK(kills == 2, "the training child was killed mid-run twice (%d kills in %d attempts)", kills, attempt);
    {
        moe_model *m = NULL;
        CHECK_OK(moe_model_load_checkpoint(&ctx, tmp("kill.ckpt"), 0, &m), &ctx);
        printf("    killed twice; resuming from step %lld of %d\n", (long long)moe_model_steps(m), STEPS);
        CHECK(m && moe_model_steps(m) > 0 && moe_model_steps(m) < STEPS, "the checkpoint is from mid-run");
        moe_model_destroy(m);
    }
    CHECK(train_run(MOE_OPTIMIZER_ADAMW, tmp("kill.ckpt"), 3, -1, tmp("resumed_kill.safetensors")) == 0, "resumed run");
    CHECK(test_same_files(tmp("straight_kill.safetensors"), tmp("resumed_kill.safetensors")), "the resumed run's model file equals the uninterrupted run's");
    return 0;
#else
    return TEST_SKIP;
#endif
}

/* A failed checkpoint save leaves the old checkpoint byte-identical; it loads and resumes as before. */
static int test_atomic_checkpoint(void) {
    moe_model *m = NULL, *back = NULL;
    moe_model_desc d = model_desc(MOE_OPTIMIZER_ADAM);
    float x[BATCH * 6];
    int32_t labels[BATCH];
    moe_target target = {labels, NULL, NULL};
    unsigned char *before, *after;
    size_t nb, na;
    CHECK_OK(moe_model_create(&ctx, &d, &m), &ctx);
    if (!m) return 0;
    batch_of(0, x, labels);
    CHECK_OK(moe_model_train_step(m, x, &target, BATCH, NULL), &ctx);
    CHECK_OK(moe_model_save_checkpoint(m, tmp("keep.ckpt")), &ctx);
    before = test_read_file(tmp("keep.ckpt"), &nb);
    CHECK_OK(moe_model_train_step(m, x, &target, BATCH, NULL), &ctx);
    /* the temporary file cannot be created: a directory sits where it would go */
    remove(tmp("keep.ckpt.tmp"));
    if (test_make_dir(tmp("keep.ckpt.tmp")) != 0) { free(before); moe_model_destroy(m); return TEST_SKIP; }
    CHECK_RESULT(moe_model_save_checkpoint(m, tmp("keep.ckpt")), MOE_ERR_IO, &ctx);
    after = test_read_file(tmp("keep.ckpt"), &na);
    CHECK(before && after && na == nb && memcmp(before, after, nb) == 0, "the old checkpoint is intact after a failed save");
    CHECK(TEST_RMDIR(tmp("keep.ckpt.tmp")) == 0, "cleanup");
    CHECK_OK(moe_model_load_checkpoint(&ctx, tmp("keep.ckpt"), 0, &back), &ctx);
    CHECK(back && moe_model_steps(back) == 1, "the old checkpoint still loads, at step 1");
    free(before);
    free(after);
    moe_model_destroy(back);
    moe_model_destroy(m);
    return 0;
}

/* A checkpoint is a model file; a model file is not a checkpoint; bad state is refused. */
static int test_checkpoint_errors(void) {
    moe_model *m = NULL, *back = NULL;
    moe_model_desc d = model_desc(MOE_OPTIMIZER_ADAMW);
    moe_ctx other;
    float x[BATCH * 6];
    int32_t labels[BATCH];
    moe_target target = {labels, NULL, NULL};
    CHECK_OK(moe_model_create(&ctx, &d, &m), &ctx);
    if (!m) return 0;
    batch_of(0, x, labels);
    CHECK_OK(moe_model_train_step(m, x, &target, BATCH, NULL), &ctx);
    CHECK_OK(moe_model_save_checkpoint(m, tmp("e.ckpt")), &ctx);
    CHECK_OK(moe_model_save(m, tmp("e.safetensors")), &ctx);
    CHECK_OK(moe_model_load(&ctx, tmp("e.ckpt"), 0, &back), &ctx);
    CHECK(back && moe_model_steps(back) == 0, "a checkpoint read as a model file has fresh optimizer state");
    moe_model_destroy(back);
    back = NULL;
    CHECK_RESULT(moe_model_load_checkpoint(&ctx, tmp("e.safetensors"), 0, &back), MOE_ERR_FORMAT, &ctx);
    CHECK(back == NULL, "no model on failure");
    moe_ctx_init(&other, &(moe_ctx_desc){.seed = SEED + 1});
    CHECK_RESULT(moe_model_load_checkpoint(&other, tmp("e.ckpt"), 0, &back), MOE_ERR_INVALID_ARGUMENT, &other);
    CHECK(strstr(moe_ctx_error(&other), "seed") != NULL, "the message names the seed: %s", moe_ctx_error(&other));
    /* the checkpoint with one piece of state changed at a time */
    {
        static const struct { const char *state; const char *drop; const char *extra; moe_result code; } cases[] = {
            {"{\"version\":1,\"step\":1,\"seed\":\"1234\",\"noise_steps\":[1,1,1,1]}", NULL, NULL, MOE_OK},
            {"{\"version\":2,\"step\":1,\"seed\":\"1234\",\"noise_steps\":[1,1,1,1]}", NULL, NULL, MOE_ERR_UNSUPPORTED},
            {"{\"version\":1,\"step\":-1,\"seed\":\"1234\",\"noise_steps\":[1,1,1,1]}", NULL, NULL, MOE_ERR_FORMAT},
            {"{\"version\":1,\"step\":1,\"seed\":1234,\"noise_steps\":[1,1,1,1]}", NULL, NULL, MOE_ERR_FORMAT},
            {"{\"version\":1,\"step\":1,\"seed\":\"99999999999999999999\",\"noise_steps\":[1,1,1,1]}", NULL, NULL, MOE_ERR_FORMAT},
            {"{\"version\":1,\"step\":1,\"seed\":\"1234\",\"noise_steps\":[1,1,1]}", NULL, NULL, MOE_ERR_FORMAT},
            {"{\"version\":1,\"step\":1,\"seed\":\"1234\",\"noise_steps\":[1,1,1,-1]}", NULL, NULL, MOE_ERR_FORMAT},
            {NULL, "optimizer.v", NULL, MOE_ERR_FORMAT},
            {NULL, "optimizer.m", "optimizer.m", MOE_ERR_FORMAT},
            {NULL, NULL, "optimizer.x", MOE_OK},
            {"[1]", NULL, NULL, MOE_ERR_FORMAT},
        };
        int i;
        for (i = 0; i < (int)(sizeof cases / sizeof cases[0]); i++) {
            CHECK_OK(rewrite_checkpoint(tmp("e.ckpt"), tmp("bad.ckpt"), NULL, cases[i].state, cases[i].drop, cases[i].extra), &ctx);
            CHECK_RESULT(moe_model_load_checkpoint(&ctx, tmp("bad.ckpt"), 0, &back), cases[i].code, &ctx);
            if (cases[i].code == MOE_OK) CHECK(back && moe_model_steps(back) == 1, "case %d: step 1", i);
            else CHECK(back == NULL, "case %d: no model on failure", i);
            moe_model_destroy(back);
            back = NULL;
        }
    }
    moe_model_destroy(m);
    return 0;
}

/* Optimizer level: a step whose update overflows is refused with params and grads bit for bit as
   they were, and the state too: the next good step matches an optimizer that never saw it. */
static void refused_update(const void *arg) {
    moe_optimizer_kind kind = *(const moe_optimizer_kind *)arg;
    enum { N = 20000 };  /* more than one chunk */
    moe_optimizer_desc od;
    moe_optimizer *a = NULL, *b = NULL;
    static float pa[N], pb[N], g[N], ga[N], p0[N], g0[N];
    moe_step_info info;
    int i, s;
    memset(&od, 0, sizeof od);
    od.kind = kind;
    od.lr = kind == MOE_OPTIMIZER_SGD ? 1e20f : 1e-2f;  /* SGD: only the bad step may overflow */
    od.momentum = kind == MOE_OPTIMIZER_SGD ? 0.9f : 0.0f;
    od.weight_decay = kind == MOE_OPTIMIZER_SGD ? 0.0f : 0.01f;
    CHECK_OK(moe_optimizer_create(&ctx, &od, N, &a), &ctx);
    CHECK_OK(moe_optimizer_create(&ctx, &od, N, &b), &ctx);
    if (!a || !b) { moe_optimizer_destroy(a); moe_optimizer_destroy(b); return; }
    for (i = 0; i < N; i++) pa[i] = pb[i] = moe_rng_uniform(3, 0, (uint64_t)i) - 0.5f;
    for (s = 0; s < 3; s++) {
        for (i = 0; i < N; i++) g[i] = 1e-9f * (moe_rng_uniform(3, 1 + (uint64_t)s, (uint64_t)i) - 0.5f);
        memcpy(ga, g, sizeof g);
        CHECK_OK(moe_optimizer_step(a, pa, ga, NULL), &ctx);
        memcpy(ga, g, sizeof g);
        CHECK_OK(moe_optimizer_step(b, pb, ga, NULL), &ctx);
    }
    /* finite gradients (finite norm) whose update is not: v = (1 - beta2) g^2 or lr * g overflows */
    for (i = 0; i < N; i++) ga[i] = 1e-3f;
    ga[N - 7] = 3e37f;
    memcpy(p0, pa, sizeof pa);
    memcpy(g0, ga, sizeof ga);
    CHECK_RESULT(moe_optimizer_step(a, pa, ga, &info), MOE_ERR_NONFINITE, &ctx);
    CHECK(memcmp(p0, pa, sizeof pa) == 0, "%s: parameters bit for bit unchanged", kind_names[kind]);
    CHECK(memcmp(g0, ga, sizeof ga) == 0, "%s: gradients bit for bit unchanged", kind_names[kind]);
    CHECK(moe_optimizer_steps(a) == 3, "%s: the step count stays 3 (%lld)", kind_names[kind], (long long)moe_optimizer_steps(a));
    for (i = 0; i < N; i++) g[i] = 1e-9f * (moe_rng_uniform(3, 9, (uint64_t)i) - 0.5f);
    memcpy(ga, g, sizeof g);
    CHECK_OK(moe_optimizer_step(a, pa, ga, NULL), &ctx);
    memcpy(ga, g, sizeof g);
    CHECK_OK(moe_optimizer_step(b, pb, ga, NULL), &ctx);
    CHECK(memcmp(pa, pb, sizeof pa) == 0, "%s: the next step matches an optimizer that never saw the refused one", kind_names[kind]);
    moe_optimizer_destroy(a);
    moe_optimizer_destroy(b);
}

/* Model level: resumed with a weight decay far too large, the first step is refused and the
   whole training state (parameters, moments, step, noise counters) is byte for byte as before.
   With Adam's coupled decay the second moment gets (1 - beta2) (g + 1e30 p)^2, above FLT_MAX in
   exact arithmetic for any parameter above 1e-9 in size (the RMSNorm gains are near 1), so every
   float evaluation refuses it. (A huge lr is no such step: with lr 3e38, lr / b1c overflows in a
   float intermediate but not in x87's 80-bit registers, and the new parameter is finite.) */
static int test_refused_train_step(void) {
    moe_model *m = NULL, *x_model = NULL;
    moe_model_desc d = model_desc(MOE_OPTIMIZER_ADAM);
    float x[BATCH * 6];
    int32_t labels[BATCH];
    moe_target target = {labels, NULL, NULL};
    char config[4096], *wd, *end;
    int s;
    CHECK_OK(moe_model_create(&ctx, &d, &m), &ctx);
    if (!m) return 0;
    for (s = 0; s < 3; s++) {
        batch_of(s, x, labels);
        CHECK_OK(moe_model_train_step(m, x, &target, BATCH, NULL), &ctx);
    }
    CHECK_OK(moe_model_save_checkpoint(m, tmp("calm.ckpt")), &ctx);
    CHECK(moe_model_config_json(m, config, sizeof config) < sizeof config, "config fits");
    moe_model_destroy(m);
    wd = strstr(config, "\"optimizer\"");
    wd = wd ? strstr(wd, "\"weight_decay\":") : NULL;
    CHECK(wd != NULL, "the configuration has an optimizer weight_decay");
    if (!wd) return 0;
    end = strchr(wd, ',');
    {
        char huge[4096];
        snprintf(huge, sizeof huge, "%.*s\"weight_decay\":1e30%s", (int)(wd - config), config, end);
        CHECK_OK(rewrite_checkpoint(tmp("calm.ckpt"), tmp("wild.ckpt"), huge, NULL, NULL, NULL), &ctx);
    }
    CHECK_OK(moe_model_load_checkpoint(&ctx, tmp("wild.ckpt"), 0, &x_model), &ctx);
    if (!x_model) return 0;
    CHECK_OK(moe_model_save_checkpoint(x_model, tmp("before.ckpt")), &ctx);
    batch_of(3, x, labels);
    CHECK_RESULT(moe_model_train_step(x_model, x, &target, BATCH, NULL), MOE_ERR_NONFINITE, &ctx);
    CHECK(strstr(moe_ctx_error(&ctx), "the update") != NULL, "refused by the optimizer, after forward and backward: %s", moe_ctx_error(&ctx));
    CHECK_OK(moe_model_save_checkpoint(x_model, tmp("after.ckpt")), &ctx);
    CHECK(test_same_files(tmp("before.ckpt"), tmp("after.ckpt")), "the refused step left parameters, moments, step and noise counters as they were");
    moe_model_destroy(x_model);
    return 0;
}

#ifdef HAVE_FORK
/* --train-child CKPT FD OUT: the process the kill test kills. */
static int train_child(char **argv) {
    return train_run(MOE_OPTIMIZER_ADAMW, argv[0], 3, atoi(argv[1]), argv[2]);
}
#endif

int main(int argc, char **argv) {
    static const moe_optimizer_kind kinds[] = {MOE_OPTIMIZER_SGD, MOE_OPTIMIZER_ADAM, MOE_OPTIMIZER_ADAMW};
    int i;
    moe_ctx_init(&ctx, &(moe_ctx_desc){.seed = SEED});
#ifdef HAVE_FORK
    if (argc == 5 && strcmp(argv[1], "--train-child") == 0) return train_child(argv + 2);
#endif
    test_self = argc > 0 ? argv[0] : NULL;
    printf("test_checkpoint\n");
    if (test_make_dir(TMP_DIR) != 0) return 1;
    for (i = 0; i < 3; i++) {
        char label[64];
        snprintf(label, sizeof label, "resume_in_process_%s", kind_names[kinds[i]]);
        RUN_NAMED(label, resume_in_process, &kinds[i]);
    }
    for (i = 0; i < 3; i++) {
        char label[64];
        snprintf(label, sizeof label, "refused_update_%s", kind_names[kinds[i]]);
        RUN_NAMED(label, refused_update, &kinds[i]);
    }
    RUN(test_refused_train_step);
    RUN(test_kill_and_resume);
    RUN(test_atomic_checkpoint);
    RUN(test_checkpoint_errors);
    TEST_END();
}
