/* moe - the command-line tool of moe.h: inspect, create, run, differentiate and train models.

     build/moe info MODEL [--json]
     build/moe init CONFIG.json OUT [--seed S]
     build/moe forward MODEL IN OUT [--threads N] [--top-k K] [--top-p P]
     build/moe backward MODEL IN OUT [--threads N] [--top-k K] [--top-p P]
     build/moe train MODEL DATA OUT [--epochs N] [--batch N] [--lr X] [--seed S] [--threads N]
                     [--checkpoint PATH [--every N]]
     build/moe import HF.safetensors OUT [--arch mixtral|qwen2_moe|deepseek_v3] [--config config.json]
                      [--layer N | --prefix P] [--top-k K]

   MODEL, IN, DATA and OUT are safetensors files (README.md (Model reference) sections 6 and 7):
   - forward:  IN holds x [T, d_in] (any float dtype); OUT gets y [T, d_out] (F32). Inference mode.
               IN may hold token_ids [T] (integer; hash routers need them, except behind an
               embedding first layer, whose x holds token ids: they then take each row's last
               id). --top-k and --top-p are moe_forward_opts.top_k and .top_p.
   - backward: IN holds x and dy [T, d_out]; OUT gets y, dx [T, d_in] and grad.<name> for every
               tensor of the model: the gradients of sum(y * dy) at inference, without aux losses.
   - train:    DATA holds x and either labels [N] (I32 or I64, cross_entropy models) or y [N, d_out]
               (float, mse and bce models; mixture_nll: y [N, d_out of the Gaussian-expert last
               layer], the target, not the packed mixture). OUT is MODEL with the trained parameters; its
               configuration (optimizer settings and max_tokens included) is MODEL's.
               --checkpoint PATH saves a checkpoint every N steps (--every; default: every
               epoch) and, when PATH exists, resumes from it: the same command line then ends
               with the same OUT as a run that was never interrupted.
   - import:   one MoE block of a Hugging Face checkpoint (README "Importing Hugging Face MoE
               blocks") as a one-layer model file: d_in = d_out = the hidden size, loss mse.
               --layer N: the block of decoder layer N; default: the lowest-numbered one.
   Errors go to stderr and give exit status 1; a malformed command line gives status 2.

   Build: make build/moe   (or: cc -std=c99 -O2 -fopenmp examples/moe.c -lm -o build/moe) */
#define MOE_IMPLEMENTATION
#include "../moe.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define EXIT_USAGE 2

/* ---- command line ------------------------------------------------------------------------ */
enum {
    OPT_EPOCHS = 1 << 0,
    OPT_BATCH = 1 << 1,
    OPT_LR = 1 << 2,
    OPT_SEED = 1 << 3,
    OPT_THREADS = 1 << 4,
    OPT_JSON = 1 << 5,
    OPT_TOP_K = 1 << 6,
    OPT_TOP_P = 1 << 7,
    OPT_CHECKPOINT = 1 << 8,
    OPT_EVERY = 1 << 9,
    OPT_DTYPE = 1 << 10,
    OPT_ARCH = 1 << 11,
    OPT_CONFIG = 1 << 12,
    OPT_LAYER = 1 << 13,
    OPT_PREFIX = 1 << 14
};

typedef struct options {
    const char *args[3];        /* positional arguments after the command */
    int n_args;
    unsigned given;             /* OPT_* bits of the options on the command line */
    int64_t epochs, batch;
    float lr;
    uint64_t seed;
    int threads;                /* 0: all OpenMP threads */
    int top_k;                  /* 0: each layer's top_k */
    float top_p;                /* 0: off */
    const char *checkpoint;     /* train: checkpoint file (NULL: none) */
    int64_t every;              /* train: steps between checkpoints (0: one epoch) */
    moe_dtype dtype;            /* quantize: MOE_DTYPE_BF16 or MOE_DTYPE_I8 */
    moe_hf_arch arch;           /* import: 0 = from config.json or the tensor names */
    const char *config;         /* import: config.json path (NULL: none) */
    int64_t layer;              /* import: decoder layer */
    const char *prefix;         /* import: block prefix (NULL: --layer, else the first block) */
} options;

/* What every command gets: the library context and the command's name for messages. */
typedef struct tool {
    moe_ctx ctx;
    const char *command;
    const options *opt;
} tool;

typedef struct command {
    const char *name;
    int n_args;
    unsigned options;           /* OPT_* bits it accepts */
    int (*run)(tool *t);
    const char *usage;
    const char *summary;
} command;

static int run_info(tool *t);
static int run_init(tool *t);
static int run_forward(tool *t);
static int run_backward(tool *t);
static int run_train(tool *t);
static int run_quantize(tool *t);
static int run_import(tool *t);

static const command commands[] = {
    {"info", 1, OPT_JSON, run_info, "info MODEL [--json]",
     "print the configuration, parameter count and tensors (--json: the moe.config text)"},
    {"init", 2, OPT_SEED, run_init, "init CONFIG.json OUT [--seed S]",
     "create a model with fresh parameters from a moe.config JSON file"},
    {"forward", 3, OPT_THREADS | OPT_TOP_K | OPT_TOP_P, run_forward, "forward MODEL IN OUT [--threads N] [--top-k K] [--top-p P]",
     "IN: x [T, d_in]; OUT: y [T, d_out] (inference)"},
    {"backward", 3, OPT_THREADS | OPT_TOP_K | OPT_TOP_P, run_backward, "backward MODEL IN OUT [--threads N] [--top-k K] [--top-p P]",
     "IN: x, dy [T, d_out]; OUT: y, dx, grad.<name> of sum(y * dy) (inference, no aux losses)"},
    {"train", 3, OPT_EPOCHS | OPT_BATCH | OPT_LR | OPT_SEED | OPT_THREADS | OPT_CHECKPOINT | OPT_EVERY, run_train,
     "train MODEL DATA OUT [--epochs N] [--batch N] [--lr X] [--seed S] [--threads N] [--checkpoint PATH [--every N]]",
     "DATA: x and labels (cross_entropy) or y (mse, bce); one line per epoch; saves OUT;\n"
     "      --checkpoint: save one every N steps (default every epoch), resume from it when it exists"},
    {"quantize", 2, OPT_DTYPE, run_quantize, "quantize MODEL OUT --dtype bf16|q8",
     "OUT: MODEL with its expert weights in bf16, or int8 with one scale per 32 (inference only)"},
    {"import", 2, OPT_ARCH | OPT_CONFIG | OPT_LAYER | OPT_PREFIX | OPT_TOP_K, run_import,
     "import HF.safetensors OUT [--arch mixtral|qwen2_moe|deepseek_v3] [--config config.json] [--layer N | --prefix P] [--top-k K]",
     "OUT: a one-layer model holding one MoE block of a Hugging Face checkpoint (default: the first)"},
};
#define N_COMMANDS (int)(sizeof commands / sizeof commands[0])

#define DEFAULT_EPOCHS 10
#define DEFAULT_BATCH 32

static void print_usage(FILE *out) {
    int i;
    fprintf(out, "moe %s - Mixture-of-Experts models from the command line\n\nusage:\n", moe_version());
    for (i = 0; i < N_COMMANDS; i++) fprintf(out, "  moe %s\n      %s\n", commands[i].usage, commands[i].summary);
    fprintf(out, "  moe help\n\n"
                 "Files are safetensors. train: --epochs %d, --batch %d, --lr from MODEL's optimizer, --seed 0\n"
                 "(shuffling and router noise); --threads 0 uses every OpenMP thread.\n",
            DEFAULT_EPOCHS, DEFAULT_BATCH);
}

static int usage_error(const char *fmt, ...) {
    va_list ap;
    fputs("moe: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputs("\n(run \"moe help\" for usage)\n", stderr);
    return EXIT_USAGE;
}

/* Whole-string integer in [lo, hi]. */
static int parse_int(const char *s, int64_t lo, int64_t hi, int64_t *out) {
    char *end;
    long long v;
    errno = 0;
    v = strtoll(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) return 0;
    *out = (int64_t)v;
    return 1;
}

/* Whole-string number in (0, hi]. */
static int parse_positive(const char *s, double hi, float *out) {
    char *end;
    double v;
    errno = 0;
    v = strtod(s, &end);
    if (errno || end == s || *end || !(v > 0.0 && v <= hi)) return 0;
    *out = (float)v;
    return 1;
}

static int parse_options(const command *c, int argc, char **argv, options *o) {
    static const struct { const char *name; unsigned bit; } names[] = {
        {"--epochs", OPT_EPOCHS}, {"--batch", OPT_BATCH}, {"--lr", OPT_LR},
        {"--seed", OPT_SEED}, {"--threads", OPT_THREADS}, {"--json", OPT_JSON},
        {"--top-k", OPT_TOP_K}, {"--top-p", OPT_TOP_P},
        {"--checkpoint", OPT_CHECKPOINT}, {"--every", OPT_EVERY}, {"--dtype", OPT_DTYPE},
        {"--arch", OPT_ARCH}, {"--config", OPT_CONFIG}, {"--layer", OPT_LAYER}, {"--prefix", OPT_PREFIX},
    };
    int i, q;
    memset(o, 0, sizeof *o);
    o->epochs = DEFAULT_EPOCHS;
    o->batch = DEFAULT_BATCH;
    for (i = 0; i < argc; i++) {
        const char *a = argv[i], *value;
        unsigned bit = 0;
        int64_t v;
        if (strncmp(a, "--", 2) != 0) {
            if (o->n_args == c->n_args) return usage_error("%s: too many arguments (at \"%s\")", c->name, a);
            o->args[o->n_args++] = a;
            continue;
        }
        for (q = 0; q < (int)(sizeof names / sizeof names[0]); q++)
            if (strcmp(a, names[q].name) == 0) bit = names[q].bit;
        if (!bit) return usage_error("%s: unknown option %s", c->name, a);
        if (!(bit & c->options)) return usage_error("%s does not take %s", c->name, a);
        o->given |= bit;
        if (bit == OPT_JSON) continue;
        if (i + 1 == argc) return usage_error("%s: %s needs a value", c->name, a);
        value = argv[++i];
        if (bit == OPT_EPOCHS) {
            if (!parse_int(value, 1, INT64_C(1) << 40, &o->epochs)) return usage_error("--epochs: \"%s\" is not a positive integer", value);
        } else if (bit == OPT_BATCH) {
            if (!parse_int(value, 1, INT64_C(1) << 28, &o->batch)) return usage_error("--batch: \"%s\" is not in 1..2^28", value);
        } else if (bit == OPT_CHECKPOINT) {
            if (!value[0]) return usage_error("--checkpoint needs a file name");
            o->checkpoint = value;
        } else if (bit == OPT_DTYPE) {
            if (strcmp(value, "bf16") == 0) o->dtype = MOE_DTYPE_BF16;
            else if (strcmp(value, "q8") == 0) o->dtype = MOE_DTYPE_I8;
            else return usage_error("--dtype: \"%s\" is not bf16 or q8", value);
        } else if (bit == OPT_ARCH) {
            if (strcmp(value, "mixtral") == 0) o->arch = MOE_HF_MIXTRAL;
            else if (strcmp(value, "qwen2_moe") == 0) o->arch = MOE_HF_QWEN2_MOE;
            else if (strcmp(value, "deepseek_v3") == 0) o->arch = MOE_HF_DEEPSEEK_V3;
            else return usage_error("--arch: \"%s\" is not mixtral, qwen2_moe or deepseek_v3", value);
        } else if (bit == OPT_CONFIG || bit == OPT_PREFIX) {
            if (!value[0]) return usage_error("%s needs a value", a);
            if (bit == OPT_CONFIG) o->config = value;
            else o->prefix = value;
        } else if (bit == OPT_LAYER) {
            if (!parse_int(value, 0, INT64_C(1) << 30, &o->layer)) return usage_error("--layer: \"%s\" is not in 0..2^30", value);
        } else if (bit == OPT_EVERY) {
            if (!parse_int(value, 1, INT64_C(1) << 40, &o->every)) return usage_error("--every: \"%s\" is not a positive integer", value);
        } else if (bit == OPT_THREADS) {
            if (!parse_int(value, 0, 4096, &v)) return usage_error("--threads: \"%s\" is not in 0..4096", value);
            o->threads = (int)v;
        } else if (bit == OPT_TOP_K) {
            if (!parse_int(value, 1, 65536, &v)) return usage_error("--top-k: \"%s\" is not in 1..65536", value);
            o->top_k = (int)v;
        } else if (bit == OPT_TOP_P) {
            if (!parse_positive(value, 1.0, &o->top_p)) return usage_error("--top-p: \"%s\" is not in (0, 1]", value);
        } else if (bit == OPT_SEED) {
            char *end;
            errno = 0;
            o->seed = (uint64_t)strtoull(value, &end, 10);
            if (errno || end == value || *end || value[0] == '-') return usage_error("--seed: \"%s\" is not an unsigned integer", value);
        } else {
            if (!parse_positive(value, 1e6, &o->lr)) return usage_error("--lr: \"%s\" is not a positive number", value);
        }
    }
    if (o->n_args != c->n_args) return usage_error("usage: moe %s", c->usage);
    if ((o->given & OPT_EVERY) && !(o->given & OPT_CHECKPOINT)) return usage_error("--every needs --checkpoint");
    if ((o->given & OPT_LAYER) && (o->given & OPT_PREFIX)) return usage_error("give --layer or --prefix, not both");
    return 0;
}

/* ---- helpers ------------------------------------------------------------------------------- */
/* Print "moe COMMAND: message" to stderr; returns the exit status 1. */
static int fail(const tool *t, const char *fmt, ...) {
    va_list ap;
    fprintf(stderr, "moe %s: ", t->command);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    return 1;
}

/* A library call on a file failed: what we were doing, then the context's error text
   (which names the file itself in most cases). */
static int fail_lib(const tool *t, const char *doing, const char *path) {
    const char *error = moe_ctx_error(&t->ctx);
    if (strstr(error, path)) return fail(t, "%s: %s", doing, error);
    return fail(t, "%s %s: %s", doing, path, error);
}

/* n floats, or NULL (with a message) when they cannot be had. */
static float *alloc_floats(const tool *t, int64_t n) {
    float *p = NULL;
    if (n >= 0 && (uint64_t)n <= SIZE_MAX / sizeof(float)) p = (float *)malloc((size_t)(n ? n : 1) * sizeof(float));
    if (!p) fail(t, "out of memory (%lld floats)", (long long)n);
    return p;
}

static const char *dtype_name(moe_dtype d) {
    static const char *const names[MOE_DTYPE_COUNT] = {"F32", "F64", "F16", "BF16", "I64", "I32", "U8", "I8"};
    return (int)d >= 0 && d < MOE_DTYPE_COUNT ? names[d] : "?";
}

static int is_float_dtype(moe_dtype d) {
    return d == MOE_DTYPE_F32 || d == MOE_DTYPE_F64 || d == MOE_DTYPE_F16 || d == MOE_DTYPE_BF16;
}

/* The 2-D float tensor `name` of file f with `cols` columns (and `rows` rows when rows >= 0),
   converted to a new F32 array; *rows_out gets its row count. NULL (with a message) otherwise. */
static float *read_matrix(tool *t, const moe_tensor_file *f, const char *path, const char *name, int64_t rows, int64_t cols,
                          int64_t *rows_out) {
    const moe_file_tensor *ft = moe_tensor_file_find(f, name);
    float *data;
    if (!ft) { fail(t, "%s: no tensor \"%s\"", path, name); return NULL; }
    if (!is_float_dtype(ft->dtype)) {
        fail(t, "%s: tensor \"%s\" is %s; expected a float type (F32, F64, F16, BF16)", path, name, dtype_name(ft->dtype));
        return NULL;
    }
    if (ft->ndim != 2) { fail(t, "%s: tensor \"%s\" has %d dimensions; expected 2 ([rows, %lld])", path, name, ft->ndim, (long long)cols); return NULL; }
    if (ft->shape[1] != cols || (rows >= 0 && ft->shape[0] != rows)) {
        if (rows >= 0)
            fail(t, "%s: tensor \"%s\" is [%lld, %lld]; expected [%lld, %lld]", path, name, (long long)ft->shape[0],
                 (long long)ft->shape[1], (long long)rows, (long long)cols);
        else
            fail(t, "%s: tensor \"%s\" is [%lld, %lld]; expected %lld columns", path, name, (long long)ft->shape[0],
                 (long long)ft->shape[1], (long long)cols);
        return NULL;
    }
    if (ft->shape[0] == 0) { fail(t, "%s: tensor \"%s\" has no rows", path, name); return NULL; }
    data = alloc_floats(t, ft->shape[0] * cols);
    if (!data) return NULL;
    if (moe_file_tensor_to_f32(&t->ctx, ft, data, ft->shape[0] * cols) != MOE_OK) {
        fail_lib(t, "reading tensor from", path);
        free(data);
        return NULL;
    }
    if (rows_out) *rows_out = ft->shape[0];
    return data;
}

/* Rows of x in an input file, checked before the model is loaded (its max_tokens is that count). */
static int count_rows(tool *t, const moe_tensor_file *f, const char *path, int64_t *rows) {
    const moe_file_tensor *x = moe_tensor_file_find(f, "x");
    if (!x) return fail(t, "%s: no tensor \"x\"", path);
    if (x->ndim != 2) return fail(t, "%s: tensor \"x\" has %d dimensions; expected 2 ([T, d_in])", path, x->ndim);
    if (x->shape[0] < 1) return fail(t, "%s: tensor \"x\" has no rows", path);
    *rows = x->shape[0];
    return 0;
}

static int save_writer(tool *t, moe_tensor_writer *w, const char *path) {
    if (moe_tensor_writer_save(w, path) != MOE_OK) return fail_lib(t, "cannot write", path);
    return 0;
}

/* ---- info ---------------------------------------------------------------------------------- */
static const char *name_of(const char *const *names, int count, int value) {
    return value >= 0 && value < count ? names[value] : "?";
}

static const char *const kind_names[] = {"default", "dense", "moe", "rmsnorm", "layernorm", "multigate", "task_towers", "embedding"};
static const char *const task_input_names[] = {"default", "single", "tasks", "tasks_shared"};
static const char *const act_names[] = {"default", "identity", "relu", "gelu", "silu", "tanh", "sigmoid"};
static const char *const router_names[] = {"default", "topk", "noisy_topk", "switch", "sigmoid", "expert_choice", "hash", "soft", "hierarchical"};
static const char *const expert_names[] = {"default", "linear", "mlp", "swiglu", "gaussian", "geglu"};
static const char *const loss_names[] = {"default", "cross_entropy", "mse", "bce", "mixture_nll"};
static const char *const combine_names[] = {"default", "sum", "stack", "vote", "vote_majority"};
static const char *const optimizer_names[] = {"default", "sgd", "adam", "adamw"};
#define NAME(table, value) name_of(table, (int)(sizeof table / sizeof table[0]), (int)(value))

static void print_layer(int i, const moe_layer_desc *l) {
    printf("  %-3d %-9s %lld -> %lld%s\n", i, NAME(kind_names, l->kind), (long long)l->d_in, (long long)l->d_out,
           l->residual ? " (residual)" : "");
    if (l->kind == MOE_LAYER_DENSE) {
        printf("        activation %s, bias %s\n", NAME(act_names, l->activation), l->bias == MOE_FLAG_ON ? "yes" : "no");
    } else if (l->kind == MOE_LAYER_RMSNORM || l->kind == MOE_LAYER_LAYERNORM) {
        printf("        eps %g\n", (double)l->eps);
    } else if (l->kind == MOE_LAYER_EMBEDDING) {
        printf("        vocab_size %lld, d_embedding %lld (x holds %lld token ids per row)\n", (long long)l->vocab_size,
               (long long)l->d_embedding, (long long)l->d_in);
    } else if (l->kind == MOE_LAYER_MOE) {
        printf("        router %s: %d experts, top_k %d, renormalize %s, router bias %s, capacity_factor %g, jitter %g\n",
               NAME(router_names, l->router), l->n_experts, l->top_k, l->renormalize == MOE_FLAG_ON ? "yes" : "no",
               l->router_bias == MOE_FLAG_ON ? "yes" : "no", (double)l->capacity_factor, (double)l->jitter);
        if (l->expert == MOE_EXPERT_LINEAR)
            printf("        experts linear: bias %s\n", l->bias == MOE_FLAG_ON ? "yes" : "no");
        else if (l->expert == MOE_EXPERT_SWIGLU || l->expert == MOE_EXPERT_GEGLU)
            printf("        experts %s: d_hidden %lld, bias %s\n", NAME(expert_names, l->expert), (long long)l->d_hidden,
                   l->bias == MOE_FLAG_ON ? "yes" : "no");
        else
            printf("        experts %s: d_hidden %lld, hidden_layers %d, activation %s, bias %s\n", NAME(expert_names, l->expert),
                   (long long)l->d_hidden, l->n_hidden_layers, NAME(act_names, l->activation), l->bias == MOE_FLAG_ON ? "yes" : "no");
        if (l->expert == MOE_EXPERT_GAUSSIAN)
            printf("        mixture density: output (log pi | means | log-stds) of width %lld\n", (long long)l->n_experts * (1 + 2 * l->d_out));
        if (l->router == MOE_ROUTER_SIGMOID)
            printf("        routed_scaling_factor %g, groups %d (top %d), bias_update_rate %g\n", (double)l->routed_scaling_factor,
                   l->n_groups, l->top_k_groups, (double)l->bias_update_rate);
        if (l->router == MOE_ROUTER_HASH) printf("        hash_seed %lu\n", (unsigned long)l->hash_seed);
        if (l->router == MOE_ROUTER_SOFT)
            printf("        slots_per_expert %d, soft_group_tokens %lld\n", l->slots_per_expert, (long long)l->soft_group_tokens);
        if (l->router == MOE_ROUTER_HIERARCHICAL)
            printf("        groups %d (top %d), group_router %s, expert_router %s\n", l->n_groups, l->top_k_groups,
                   NAME(router_names, l->group_router), NAME(router_names, l->expert_router));
        if (l->max_top_k != l->top_k) printf("        max_top_k %d\n", l->max_top_k);
        if (l->combine == MOE_COMBINE_STACK)
            printf("        combine stack: d_expert_out %lld\n", (long long)l->d_expert_out);
        else if (l->combine != MOE_COMBINE_SUM)
            printf("        combine %s\n", NAME(combine_names, l->combine));
        if (l->n_shared_experts > 0)
            printf("        shared experts %d: d_shared_hidden %lld%s\n", l->n_shared_experts, (long long)l->d_shared_hidden,
                   l->shared_gate == MOE_FLAG_ON ? ", gated by sigmoid(x . shared.gate)" : "");
        printf("        aux losses: balance %g, z %g, importance %g, load %g\n", (double)l->balance_loss, (double)l->z_loss,
               (double)l->importance_loss, (double)l->load_loss);
    } else if (l->kind == MOE_LAYER_MULTIGATE || l->kind == MOE_LAYER_TASK_TOWERS) {
        if (l->kind == MOE_LAYER_MULTIGATE)
            printf("        %d tasks, %d shared experts, %d experts per task, task_input %s, shared output %s\n", l->n_tasks, l->n_experts,
                   l->n_task_experts, NAME(task_input_names, l->task_input), l->shared_output ? "yes" : "no");
        else
            printf("        %d tasks, task_input %s\n", l->n_tasks, NAME(task_input_names, l->task_input));
        printf("        %s %s: d_hidden %lld, hidden_layers %d, activation %s, bias %s\n", l->kind == MOE_LAYER_MULTIGATE ? "experts" : "towers",
               NAME(expert_names, l->expert), (long long)l->d_hidden, l->n_hidden_layers, NAME(act_names, l->activation),
               l->bias == MOE_FLAG_ON ? "yes" : "no");
    }
}

static int run_info(tool *t) {
    const char *path = t->opt->args[0];
    moe_model *m = NULL;
    const moe_model_desc *d;
    const moe_optimizer_desc *o;
    int64_t n_params;
    int i, q;
    if (moe_model_load(&t->ctx, path, 0, &m) != MOE_OK) return fail_lib(t, "cannot load model", path);
    if (t->opt->given & OPT_JSON) {
        size_t n = moe_model_config_json(m, NULL, 0);
        char *text = (char *)malloc(n + 1);
        if (!text) { moe_model_destroy(m); return fail(t, "out of memory"); }
        moe_model_config_json(m, text, n + 1);
        printf("%s\n", text);
        free(text);
        moe_model_destroy(m);
        return 0;
    }
    d = moe_model_get_desc(m);
    o = &d->optimizer;
    n_params = moe_model_parameter_count(m);
    printf("model      %s\n", path);
    printf("d_in       %lld\n", (long long)d->d_in);
    printf("d_out      %lld\n", (long long)moe_model_d_out(m));
    printf("loss       %s\n", NAME(loss_names, d->loss));
    for (i = 0; i < d->n_tasks; i++)
        printf("task %-5d %s, weight %g, d_out %lld\n", i, NAME(loss_names, d->task_loss[i]), (double)d->task_weight[i], (long long)d->task_d_out[i]);
    printf("max_tokens %lld\n", (long long)d->max_tokens);
    printf("layers     %d\n", d->n_layers);
    for (i = 0; i < d->n_layers; i++) print_layer(i, &d->layers[i]);
    printf("optimizer  %s: lr %g, beta1 %g, beta2 %g, eps %g, weight_decay %g, momentum %g, clip_norm %g,\n"
           "           warmup_steps %lld, total_steps %lld, min_lr %g\n",
           NAME(optimizer_names, o->kind), (double)o->lr, (double)o->beta1, (double)o->beta2, (double)o->eps,
           (double)o->weight_decay, (double)o->momentum, (double)o->clip_norm, (long long)o->warmup_steps,
           (long long)o->total_steps, (double)o->min_lr);
    printf("parameters %lld\n", (long long)n_params);
    printf("tensors    %d\n", moe_model_tensor_count(m));
    for (i = 0; i < moe_model_tensor_count(m); i++) {
        moe_tensor tt;
        moe_model_tensor(m, i, &tt);
        printf("  %-40s [", tt.name);
        for (q = 0; q < tt.ndim; q++) printf("%s%lld", q ? ", " : "", (long long)tt.shape[q]);
        printf("]\n");
    }
    moe_model_destroy(m);
    return 0;
}

/* ---- init ---------------------------------------------------------------------------------- */
/* The whole file as a NUL-terminated string (NULL with a message on failure). */
static char *read_text(tool *t, const char *path) {
    FILE *fp = fopen(path, "rb");
    char *text = NULL;
    long len;
    if (!fp) { fail(t, "cannot open %s: %s", path, strerror(errno)); return NULL; }
    if (fseek(fp, 0, SEEK_END) == 0 && (len = ftell(fp)) >= 0 && fseek(fp, 0, SEEK_SET) == 0) {
        text = (char *)malloc((size_t)len + 1);
        if (text && fread(text, 1, (size_t)len, fp) == (size_t)len) {
            text[len] = 0;
        } else {
            free(text);
            text = NULL;
        }
    }
    fclose(fp);
    if (!text) fail(t, "cannot read %s", path);
    return text;
}

static int run_init(tool *t) {
    const char *config_path = t->opt->args[0], *out_path = t->opt->args[1];
    char *json = read_text(t, config_path);
    moe_model *m = NULL;
    int64_t n_params;
    int rc;
    if (!json) return 1;
    if (moe_model_from_config(&t->ctx, json, 0, &m) != MOE_OK) {
        rc = fail_lib(t, "bad configuration in", config_path);
    } else if (moe_model_save(m, out_path) != MOE_OK) {
        rc = fail_lib(t, "cannot write", out_path);
    } else {
        n_params = moe_model_parameter_count(m);
        printf("%s: %lld parameters\n", out_path, (long long)n_params);
        rc = 0;
    }
    moe_model_destroy(m);
    free(json);
    return rc;
}

static int run_quantize(tool *t) {
    const char *in_path = t->opt->args[0], *out_path = t->opt->args[1];
    moe_model *m = NULL;
    int rc = 0;
    if (!(t->opt->given & OPT_DTYPE)) return usage_error("quantize needs --dtype bf16 or --dtype q8");
    if (moe_model_load(&t->ctx, in_path, 0, &m) != MOE_OK) return fail_lib(t, "cannot load", in_path);
    if (moe_model_quantize(m, t->opt->dtype) != MOE_OK) rc = fail_lib(t, "cannot quantize", in_path);
    else if (moe_model_save(m, out_path) != MOE_OK) rc = fail_lib(t, "cannot write", out_path);
    else printf("%s: expert weights in %s\n", out_path, t->opt->dtype == MOE_DTYPE_BF16 ? "bf16" : "int8 (q8)");
    moe_model_destroy(m);
    return rc;
}

static int run_import(tool *t) {
    const char *src = t->opt->args[0], *out_path = t->opt->args[1];
    moe_tensor_file *f = NULL;
    moe_model *m = NULL;
    moe_hf_desc hd;
    char prefix[64], *json = NULL;
    int rc = 0;
    memset(&hd, 0, sizeof hd);
    hd.arch = t->opt->arch;
    hd.top_k = t->opt->top_k;
    hd.prefix = t->opt->prefix;
    if (t->opt->given & OPT_LAYER) {
        snprintf(prefix, sizeof prefix, "model.layers.%lld.", (long long)t->opt->layer);
        hd.prefix = prefix;
    }
    if (t->opt->config && !(json = read_text(t, t->opt->config))) return 1;
    hd.config_json = json;
    if (moe_tensor_file_read(&t->ctx, src, &f) != MOE_OK) rc = fail_lib(t, "cannot read", src);
    else if (moe_model_import_hf(&t->ctx, f, &hd, 0, &m) != MOE_OK) rc = fail_lib(t, "cannot import a block of", src);
    else if (moe_model_save(m, out_path) != MOE_OK) rc = fail_lib(t, "cannot write", out_path);
    else {
        const moe_layer_desc *d = &moe_model_get_desc(m)->layers[0];
        printf("%s: d %lld, %d experts, top %d (%s router%s), SwiGLU width %lld", out_path, (long long)d->d_in, d->n_experts,
               d->top_k, d->router == MOE_ROUTER_SIGMOID ? "sigmoid" : "softmax", d->renormalize == MOE_FLAG_ON ? ", renormalised" : "",
               (long long)d->d_hidden);
        if (d->router == MOE_ROUTER_SIGMOID)
            printf(", groups %d/%d, scale %g", d->top_k_groups, d->n_groups, (double)d->routed_scaling_factor);
        if (d->n_shared_experts) printf(", shared expert width %lld%s", (long long)d->d_shared_hidden, d->shared_gate == MOE_FLAG_ON ? " (gated)" : "");
        printf("; %lld parameters\n", (long long)moe_model_parameter_count(m));
    }
    moe_model_destroy(m);
    moe_tensor_file_close(f);
    free(json);
    return rc;
}

/* ---- forward and backward ------------------------------------------------------------------ */
/* Shared by forward and backward: read IN, load MODEL for its T rows, run the inference forward,
   and (backward) the backward of sum(y * dy); then write OUT. */
static int run_pass(tool *t, int backward) {
    const char *model_path = t->opt->args[0], *in_path = t->opt->args[1], *out_path = t->opt->args[2];
    moe_tensor_file *in = NULL;
    moe_model *m = NULL;
    moe_tensor_writer *w = NULL;
    float *x = NULL, *y = NULL, *dy = NULL, *dx = NULL;
    int32_t *ids = NULL;
    const moe_file_tensor *tid;
    moe_forward_opts opts;
    int64_t T = 0, d_in, d_out, y_shape[2], dx_shape[2];
    int rc = 1, i;
    if (moe_tensor_file_read(&t->ctx, in_path, &in) != MOE_OK) { fail_lib(t, "cannot read input", in_path); goto done; }
    if (count_rows(t, in, in_path, &T)) goto done;
    if (moe_model_load(&t->ctx, model_path, T, &m) != MOE_OK) { fail_lib(t, "cannot load model", model_path); goto done; }
    d_in = moe_model_get_desc(m)->d_in;
    d_out = moe_model_d_out(m);
    if (!(x = read_matrix(t, in, in_path, "x", T, d_in, NULL))) goto done;
    if (backward && !(dy = read_matrix(t, in, in_path, "dy", T, d_out, NULL))) goto done;
    if (!(y = alloc_floats(t, T * d_out))) goto done;
    memset(&opts, 0, sizeof opts);
    opts.top_k = t->opt->top_k;
    opts.top_p = t->opt->top_p;
    if ((tid = moe_tensor_file_find(in, "token_ids")) != NULL) {  /* for hash routers */
        if (tid->ndim != 1 || tid->shape[0] != T) { fail(t, "%s: tensor \"token_ids\" must be [%lld]", in_path, (long long)T); goto done; }
        if (!(ids = (int32_t *)malloc(sizeof(int32_t) * (size_t)T))) { fail(t, "out of memory"); goto done; }
        if (moe_file_tensor_to_i32(&t->ctx, tid, ids, T) != MOE_OK) { fail_lib(t, "reading token_ids from", in_path); goto done; }
        opts.token_ids = ids;
    }
    if (moe_model_forward(m, x, T, y, &opts) != MOE_OK) { fail(t, "forward failed: %s", moe_ctx_error(&t->ctx)); goto done; }
    if (moe_tensor_writer_create(&t->ctx, &w) != MOE_OK) { fail(t, "%s", moe_ctx_error(&t->ctx)); goto done; }
    y_shape[0] = T;
    y_shape[1] = d_out;
    if (moe_tensor_writer_add(w, "y", MOE_DTYPE_F32, 2, y_shape, y) != MOE_OK) goto writer_failed;
    if (backward) {
        int n = moe_model_tensor_count(m);
        if (!(dx = alloc_floats(t, T * d_in))) goto done;
        moe_model_zero_grad(m);
        if (moe_model_backward(m, dy, dx, 0) != MOE_OK) { fail(t, "backward failed: %s", moe_ctx_error(&t->ctx)); goto done; }
        dx_shape[0] = T;
        dx_shape[1] = d_in;
        if (moe_tensor_writer_add(w, "dx", MOE_DTYPE_F32, 2, dx_shape, dx) != MOE_OK) goto writer_failed;
        for (i = 0; i < n; i++) {
            moe_tensor tt;
            char name[160];     /* the writer copies the name, and references the data until the save */
            moe_model_tensor(m, i, &tt);
            snprintf(name, sizeof name, "grad.%s", tt.name);
            if (moe_tensor_writer_add(w, name, MOE_DTYPE_F32, tt.ndim, tt.shape, tt.grad) != MOE_OK) goto writer_failed;
        }
    }
    rc = save_writer(t, w, out_path);
    goto done;
writer_failed:
    fail(t, "%s", moe_ctx_error(&t->ctx));
done:
    moe_tensor_writer_destroy(w);
    moe_model_destroy(m);
    moe_tensor_file_close(in);
    free(x);
    free(y);
    free(dy);
    free(dx);
    free(ids);
    return rc;
}

static int run_forward(tool *t) { return run_pass(t, 0); }
static int run_backward(tool *t) { return run_pass(t, 1); }

/* ---- train --------------------------------------------------------------------------------- */
typedef struct dataset {
    int64_t n, d_in, d_out;
    float *x;                   /* [n, d_in] */
    int32_t *labels;            /* [n], cross_entropy */
    float *y;                   /* [n, d_out], mse and bce */
} dataset;

static int read_dataset(tool *t, const char *path, const moe_model *m, dataset *data) {
    const moe_model_desc *d = moe_model_get_desc(m);
    moe_tensor_file *f = NULL;
    const moe_file_tensor *lt;
    int64_t i;
    int rc = 1;
    data->d_in = d->d_in;
    data->d_out = moe_model_d_out(m);
    if (d->loss == MOE_LOSS_MIXTURE_NLL) data->d_out = d->layers[d->n_layers - 1].d_out;  /* y is the target, not the mixture */
    if (moe_tensor_file_read(&t->ctx, path, &f) != MOE_OK) return fail_lib(t, "cannot read data", path);
    if (!(data->x = read_matrix(t, f, path, "x", -1, data->d_in, &data->n))) goto done;
    if (d->loss != MOE_LOSS_CROSS_ENTROPY) {
        if (!moe_tensor_file_find(f, "y")) { fail(t, "%s: a %s model trains on a tensor \"y\" [N, %lld]", path, NAME(loss_names, d->loss), (long long)data->d_out); goto done; }
        if (!(data->y = read_matrix(t, f, path, "y", data->n, data->d_out, NULL))) goto done;
        rc = 0;
        goto done;
    }
    lt = moe_tensor_file_find(f, "labels");
    if (!lt) { fail(t, "%s: a cross_entropy model trains on a tensor \"labels\" [N] (I32 or I64)", path); goto done; }
    if (lt->dtype != MOE_DTYPE_I32 && lt->dtype != MOE_DTYPE_I64) {
        fail(t, "%s: tensor \"labels\" is %s; expected I32 or I64", path, dtype_name(lt->dtype));
        goto done;
    }
    if (lt->ndim != 1 || lt->shape[0] != data->n) {
        fail(t, "%s: tensor \"labels\" must be [%lld], one label per row of x", path, (long long)data->n);
        goto done;
    }
    data->labels = (int32_t *)malloc(sizeof(int32_t) * (size_t)data->n);
    if (!data->labels) { fail(t, "out of memory"); goto done; }
    if (moe_file_tensor_to_i32(&t->ctx, lt, data->labels, data->n) != MOE_OK) { fail_lib(t, "reading labels from", path); goto done; }
    for (i = 0; i < data->n; i++)
        if (data->labels[i] < 0 || data->labels[i] >= data->d_out) {
            fail(t, "%s: label %d of row %lld is outside 0..%lld", path, (int)data->labels[i], (long long)i, (long long)(data->d_out - 1));
            goto done;
        }
    rc = 0;
done:
    moe_tensor_file_close(f);
    return rc;
}

static void free_dataset(dataset *data) {
    free(data->x);
    free(data->labels);
    free(data->y);
}

/* Replace the training model m by the checkpoint at path when that file exists; it must hold the
   same configuration (MODEL's, with this run's --batch and --lr). */
static int resume(tool *t, const char *path, moe_model **m) {
    moe_model *ck = NULL;
    char a[8192], b[8192];
    FILE *probe = fopen(path, "rb");
    if (!probe) return 0;
    fclose(probe);
    if (moe_model_load_checkpoint(&t->ctx, path, moe_model_get_desc(*m)->max_tokens, &ck) != MOE_OK)
        return fail_lib(t, "cannot resume from checkpoint", path);
    if (moe_model_config_json(*m, a, sizeof a) >= sizeof a || moe_model_config_json(ck, b, sizeof b) >= sizeof b || strcmp(a, b) != 0) {
        moe_model_destroy(ck);
        return fail(t, "checkpoint %s belongs to another model or other --lr/--batch settings", path);
    }
    moe_model_destroy(*m);
    *m = ck;
    printf("resumed from %s at step %lld\n", path, (long long)moe_model_steps(ck));
    return 0;
}

/* Fisher-Yates shuffle, a pure function of (seed, epoch). */
static void shuffle(int64_t *order, int64_t n, uint64_t seed, int64_t epoch) {
    int64_t i;
    for (i = n - 1; i > 0; i--) {
        int64_t j = (int64_t)(moe_rng_u64(seed, (uint64_t)epoch, (uint64_t)i) % (uint64_t)(i + 1)), s = order[i];
        order[i] = order[j];
        order[j] = s;
    }
}

static int run_train(tool *t) {
    const options *o = t->opt;
    const char *model_path = o->args[0], *data_path = o->args[1], *out_path = o->args[2];
    moe_model *saved = NULL, *m = NULL;
    moe_model_desc desc;
    dataset data;
    int64_t *order = NULL, n_params, batch, epoch, i, c, step = 0, first_step, every;
    float *xb = NULL, *yb = NULL;
    int32_t *lb = NULL;
    int classify, rc = 1;
    memset(&data, 0, sizeof data);
    /* `saved` keeps MODEL's configuration for OUT; `m` trains with max_tokens = batch and --lr */
    if (moe_model_load(&t->ctx, model_path, 0, &saved) != MOE_OK) return fail_lib(t, "cannot load model", model_path);
    if (read_dataset(t, data_path, saved, &data)) goto done;
    classify = data.labels != NULL;
    batch = o->batch < data.n ? o->batch : data.n;
    desc = *moe_model_get_desc(saved);
    desc.max_tokens = batch;
    if (o->given & OPT_LR) desc.optimizer.lr = o->lr;
    if (moe_model_create(&t->ctx, &desc, &m) != MOE_OK) { fail(t, "cannot build the training model: %s", moe_ctx_error(&t->ctx)); goto done; }
    {
        int64_t n_saved;
        float *src = moe_model_params(saved, &n_saved), *dst = moe_model_params(m, &n_params);
        if (n_saved != n_params) { fail(t, "internal error: the training model has %lld parameters, MODEL %lld", (long long)n_params, (long long)n_saved); goto done; }
        memcpy(dst, src, sizeof(float) * (size_t)n_params);
    }
    if (o->checkpoint && resume(t, o->checkpoint, &m)) goto done;
    first_step = moe_model_steps(m);  /* steps before it were taken by the run that wrote the checkpoint */
    every = o->every ? o->every : (data.n + batch - 1) / batch;
    order = (int64_t *)malloc(sizeof(int64_t) * (size_t)data.n);
    lb = (int32_t *)malloc(sizeof(int32_t) * (size_t)batch);
    xb = alloc_floats(t, batch * data.d_in);
    yb = alloc_floats(t, batch * data.d_out);
    if (!order || !lb || !xb || !yb) { fail(t, "out of memory"); goto done; }
    for (i = 0; i < data.n; i++) order[i] = i;
    for (epoch = 1; epoch <= o->epochs; epoch++) {
        double loss_sum = 0.0, aux_sum = 0.0;
        int64_t correct = 0, start, seen = 0;
        shuffle(order, data.n, o->seed, epoch);
        for (start = 0; start < data.n; start += batch, step++) {
            int64_t rows = data.n - start < batch ? data.n - start : batch;
            moe_target target;
            moe_step_info info;
            if (step < first_step) continue;
            for (i = 0; i < rows; i++) {
                int64_t r = order[start + i];
                memcpy(xb + i * data.d_in, data.x + r * data.d_in, sizeof(float) * (size_t)data.d_in);
                if (classify) lb[i] = data.labels[r];
                else memcpy(yb + i * data.d_out, data.y + r * data.d_out, sizeof(float) * (size_t)data.d_out);
            }
            target.labels = classify ? lb : NULL;
            target.values = classify ? NULL : yb;
            if (moe_model_train_step(m, xb, &target, rows, &info) != MOE_OK) {
                fail(t, "epoch %lld, rows %lld..%lld: %s", (long long)epoch, (long long)start, (long long)(start + rows - 1), moe_ctx_error(&t->ctx));
                goto done;
            }
            loss_sum += (double)info.loss * (double)rows;
            aux_sum += (double)info.aux_loss * (double)rows;
            seen += rows;
            if (classify) {
                /* accuracy of the training forward of this step, before its update */
                const float *out = moe_model_output(m);
                for (i = 0; i < rows; i++) {
                    int64_t best = 0;
                    for (c = 1; c < data.d_out; c++)
                        if (out[i * data.d_out + c] > out[i * data.d_out + best]) best = c;
                    correct += best == lb[i];
                }
            }
            if (o->checkpoint && (step + 1) % every == 0 && moe_model_save_checkpoint(m, o->checkpoint) != MOE_OK) {
                fail_lib(t, "cannot write checkpoint", o->checkpoint);
                goto done;
            }
        }
        if (!seen) continue;  /* the whole epoch was done before the checkpoint */
        /* the means are over the rows this run trained (all of them unless it resumed mid-epoch) */
        printf("epoch=%lld loss=%.6f aux=%.6f", (long long)epoch, loss_sum / (double)seen, aux_sum / (double)seen);
        if (classify) printf(" accuracy=%.4f", (double)correct / (double)seen);
        printf("\n");
        fflush(stdout);
    }
    memcpy(moe_model_params(saved, NULL), moe_model_params(m, NULL), sizeof(float) * (size_t)n_params);
    if (moe_model_save(saved, out_path) != MOE_OK) { fail_lib(t, "cannot write", out_path); goto done; }
    rc = 0;
done:
    free_dataset(&data);
    free(order);
    free(lb);
    free(xb);
    free(yb);
    moe_model_destroy(m);
    moe_model_destroy(saved);
    return rc;
}

/* ---- main ---------------------------------------------------------------------------------- */
int main(int argc, char **argv) {
    const command *c = NULL;
    options opt;
    moe_ctx_desc cd;
    tool t;
    int i;
    if (argc < 2 || strcmp(argv[1], "help") == 0 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
        print_usage(stdout);
        return 0;
    }
    for (i = 0; i < N_COMMANDS; i++)
        if (strcmp(argv[1], commands[i].name) == 0) c = &commands[i];
    if (!c) return usage_error("unknown command \"%s\"", argv[1]);
    if (parse_options(c, argc - 2, argv + 2, &opt)) return EXIT_USAGE;
    memset(&cd, 0, sizeof cd);
    cd.n_threads = opt.threads;
    cd.seed = opt.seed;
    t.command = c->name;
    t.opt = &opt;
    if (moe_ctx_init(&t.ctx, &cd) != MOE_OK) return fail(&t, "%s", moe_ctx_error(&t.ctx));
    return c->run(&t);
}
