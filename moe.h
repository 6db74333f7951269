/* moe.h - Mixture-of-Experts neural networks in one C header: build, train, run, save.

   Version 0.1.0. MIT license (at the end of this file). No dependency but libc and libm;
   OpenMP is optional. C99 or C++11.

   QUICK START
   -----------
   In exactly one C or C++ file:

       #define MOE_IMPLEMENTATION
       #include "moe.h"

   everywhere else just #include "moe.h". Build with `cc -O2 -fopenmp app.c -lm`.

       moe_ctx ctx;
       moe_ctx_init(&ctx, &(moe_ctx_desc){ .seed = 42 });
       moe_layer_desc layers[] = {
           { .kind = MOE_LAYER_MOE, .d_out = 64, .n_experts = 4, .top_k = 2, .balance_loss = 0.01f },
           { .kind = MOE_LAYER_DENSE, .d_out = 10 },
       };
       moe_model *model;
       if (moe_model_create(&ctx, &(moe_model_desc){ .d_in = 64, .n_layers = 2, .layers = layers },
                            &model) != MOE_OK)
           puts(moe_ctx_error(&ctx));
       moe_model_train_step(model, x, &(moe_target){ .labels = labels }, batch, &info);
       moe_model_predict(model, x, batch, classes);
       moe_model_save(model, "model.safetensors");
       moe_model_destroy(model);

   README.md has a complete program (compiled by the tests) and the model reference: the exact
   math of every layer, router and loss, and the file format, precise enough to rebuild a model
   in PyTorch.

   BUILD OPTIONS (define before including)
   -------------
     MOE_IMPLEMENTATION         compile the implementation into this file (one file only)
     MOE_STATIC                 every function static: a private copy per file
     MOEDEF                     linkage of every public declaration (default extern)
     MOE_MALLOC(size, user)     default allocator; define together with MOE_FREE(ptr, user) or
     MOE_FREE(ptr, user)        neither (#error otherwise). moe_ctx_desc.allocator overrides both.
     MOE_ASSERT(c)              internal invariants only (default assert(); off under NDEBUG)
     MOE_MAX_BYTES              refuse models/arenas larger than this up front (default 64 TiB;
                                2 GiB where size_t has 32 bits)
     MOE_NO_VECTOR_EXTENSIONS   plain C kernels even on GCC/Clang (implied by x87 float math)
     MOE_NO_TRAINING            inference only: no backward, loss, optimizer, gradients or checkpoints
                                (their API is not declared); the same inference bits as a full build
     MOE_NO_STDIO               no <stdio.h>: files only from and to memory (the *_memory functions);
                                the path functions are not declared. Combines with MOE_NO_TRAINING
     -fopenmp (_OPENMP)         threads; without OpenMP everything runs on the calling thread

   SECTIONS (grep for the anchor; the first hit is the API, the second the implementation)
   --------
     >>result  >>enums  >>ctx  >>layer  >>optimizer  >>model  >>safetensors  >>rng   (API)
     >>build        configuration, includes, threading macros
     >>memory       aligned allocation through the context's allocator, arena carving
     >>gemm         the one matrix-multiply entry point: packed kernels + plain reference twin
     >>ops          activations, softmax, column sums
     >>dense >>norm dense layers, RMSNorm, LayerNorm: forward and backward
     >>embedding    token ids -> rows of a table (first layer of a model): forward and backward
     >>routing      every router (softmax top-k, sigmoid + bias, expert choice, hash, hierarchical), top-p, gates,
                    capacity, the deterministic counting sort, aux losses
     >>moe_forward  grouped expert computation over (expert, row-tile) tiles, weighted combine; soft MoE
     >>moe_backward expert, weight and router gradients
     >>multigate    multi-task layers (MMoE, PLE levels, task towers): experts on input slices, softmax gates
     >>layer_api >>loss >>optimizer >>model
     >>json >>safetensors >>model_config >>model_io   files
     >>hf_import    one MoE block of a Hugging Face checkpoint (Mixtral, Qwen2-MoE, DeepSeek-V3)

   DEFAULTS (every desc field left 0 means its default)
   --------
     moe_ctx_desc       n_threads all OpenMP threads; seed 0; allocator MOE_MALLOC/MOE_FREE
     moe_layer_desc     kind dense; d_in the previous layer's width; d_out d_in; activation
                        identity (dense) / relu (MLP experts); bias on (SwiGLU, GeGLU experts: off);
                        eps 1e-5; n_experts 4; top_k 2 (switch: 1; Gaussian experts: n_experts);
                        router top-k; expert MLP;
                        d_hidden d_in; n_hidden_layers 1; d_shared_hidden d_hidden; renormalize
                        on (switch, expert choice, hash: off); router_bias off; capacity_factor
                        1.25 for switch, 1 for expert choice, else 0 = unlimited; jitter and every
                        aux-loss coefficient 0 (off); max_top_k top_k; sigmoid router:
                        routed_scaling_factor 1, n_groups 1, top_k_groups n_groups,
                        bias_update_rate 0 (off); hash_seed 0; shared_gate off; combine weighted sum;
                        d_expert_out d_out; expert GeGLU: gelu exact (erf), bias off; soft router:
                        top_k n_experts, slots_per_expert 1, soft_group_tokens 0 (the whole call is
                        one group); hierarchical router: n_groups 2 (1 if n_experts is odd),
                        top_k_groups 1, top_k min(2, n_experts / n_groups) per chosen group,
                        group_router and expert_router topk; multigate / task towers: n_tasks 2,
                        n_experts 4 (towers: none), n_task_experts 0 (towers: 1), task_input single
                        (towers: tasks), top_k 0 (dense gates), d_out = output slices * input slice width,
                        d_hidden the slice width;
                        embedding: vocab_size required, d_embedding d_out / d_in
     moe_forward_opts   NULL or all zero: inference, the layers' top_k, no top_p, no token ids
     moe_model_desc     loss cross-entropy (mixture NLL when the last layer has Gaussian experts);
                        max_tokens 256; optimizer as below; n_tasks 0 (one task); with tasks:
                        task_loss = loss, task_weight 1, task_d_out = d_out / n_tasks
     moe_optimizer_desc AdamW; lr 1e-3; beta1 0.9; beta2 0.999; eps 1e-8; everything else 0
     moe_hf_desc        arch from config.json's model_type, else the tensor names; prefix the
                        lowest-numbered MoE block; top_k, norm_topk_prob, groups and scaling
                        from config.json (README "Importing Hugging Face MoE blocks")
   (Consequence: a field cannot be set to exactly 0 where 0 means a non-zero default, e.g. lr.)

   MEMORY
   ------
   A model allocates at creation: its parameter blob (parameters and gradients, one layout),
   the optimizer's state in the same layout, and one activation arena sized for max_tokens rows.
   forward, backward, loss, train_step and the optimizer step never allocate. Buffers are
   64-byte aligned. moe_ctx needs no allocation at all: it lives where you declare it. Every
   allocation goes through the context's allocator; on failure the call returns
   MOE_ERR_OUT_OF_MEMORY and leaves nothing allocated. Loading and saving files allocate; a
   loader allocates a model only once the file holds every tensor its configuration implies, so
   what it allocates is backed by the file's bytes, except the activation arena (max_tokens,
   bounded by MOE_MAX_BYTES). README "What the reader guarantees" has the measured bound.
   Caller-owned memory: moe_model_memory_size says how many bytes a model file held in memory
   needs for max_tokens; moe_model_init_memory places the model in your block (aligned to
   MOE_MEMORY_ALIGN) without allocating anything; destroy then frees nothing. README "Build
   options" has the details and the code size of each build option.

   ERRORS
   ------
   Every fallible call returns moe_result: MOE_OK (0) or a negative MOE_ERR_* code;
   moe_result_string() names the code and moe_ctx_error(ctx) holds a message naming the culprit
   (layer, field, tensor, file). The optional log callback receives the same message. moe.h
   never aborts, exits or prints; MOE_ASSERT guards internal invariants, never input. A failed
   call changes nothing the caller can see: out-pointers are NULL, files keep their old
   contents (saves write a temporary file and rename it), a train_step whose loss or gradients
   are not finite, or whose update would make a parameter or optimizer moment NaN or Inf,
   returns MOE_ERR_NONFINITE with parameters, optimizer state and noise counters untouched.

   THREADING
   ---------
   Work is split by what it writes, reductions run in a fixed order, and no atomics touch
   floats: results are bitwise identical for any n_threads and with OpenMP off (same binary
   flags). Small loops stay on the calling thread. A context, model or layer is used by one
   thread at a time; separate models may run concurrently. moe.h never calls
   omp_set_num_threads; n_threads applies to its own parallel regions only.

   CONVENTIONS
   -----------
   Row-major. Activations are [T, d]: T tokens (rows) by d features. Linear weights are
   [out, in] and y = x W^T + b, as torch.nn.Linear; stacked experts are [E, out, in]. Sizes are
   int64_t. Backward accumulates into gradient buffers (moe_model_zero_grad clears them).
   The input x of a forward must stay valid and unchanged until the matching backward.
   Model files are safetensors with the configuration in __metadata__["moe.config"].
*/
#ifndef MOE_H_INCLUDED
#define MOE_H_INCLUDED

#include <stddef.h>
#include <stdint.h>

#define MOE_VERSION_MAJOR 0
#define MOE_VERSION_MINOR 1
#define MOE_VERSION_PATCH 0
#define MOE_VERSION_STRING "0.1.0"
/* one number that grows with every release: 10000*major + 100*minor + patch */
#define MOE_VERSION (MOE_VERSION_MAJOR * 10000 + MOE_VERSION_MINOR * 100 + MOE_VERSION_PATCH)
/* version of the "moe.config" JSON stored in model files (README "Model files") */
#define MOE_FORMAT_VERSION 1

#if defined(__GNUC__) || defined(__clang__)
#define MOE__MAYBE_UNUSED __attribute__((unused))
#else
#define MOE__MAYBE_UNUSED
#endif

#ifndef MOEDEF
#ifdef MOE_STATIC
#define MOEDEF static MOE__MAYBE_UNUSED
#else
#define MOEDEF extern
#endif
#endif

#ifdef __cplusplus
extern "C" {
#endif

// >>result ------------------------------------------------------------------
/* Every fallible call returns one of these; details are in moe_ctx_error(). */
#define MOE_RESULT_LIST(X) \
    X(MOE_OK,                    0, "ok") \
    X(MOE_ERR_INVALID_ARGUMENT, -1, "invalid argument") \
    X(MOE_ERR_SHAPE,            -2, "shape or size mismatch") \
    X(MOE_ERR_OUT_OF_MEMORY,    -3, "out of memory") \
    X(MOE_ERR_IO,               -4, "file could not be read or written") \
    X(MOE_ERR_FORMAT,           -5, "malformed or unsupported file") \
    X(MOE_ERR_UNSUPPORTED,      -6, "unsupported configuration") \
    X(MOE_ERR_NONFINITE,        -7, "non-finite value") \
    X(MOE_ERR_TOO_MANY_TOKENS,  -8, "more tokens than max_tokens") \
    X(MOE_ERR_STATE,            -9, "call out of order") \
    X(MOE_ERR_DEVICE,          -10, "accelerator device failure")

typedef enum moe_result {
#define MOE__RESULT_ENUM(name, value, text) name = value,
    MOE_RESULT_LIST(MOE__RESULT_ENUM)
#undef MOE__RESULT_ENUM
    MOE_RESULT_MIN = -10
} moe_result;

/* Fixed text for a result code ("unknown result" for values not in the list). */
MOEDEF const char *moe_result_string(moe_result result);
/* "0.1.0" */
MOEDEF const char *moe_version(void);

// >>enums -------------------------------------------------------------------
/* Value 0 of every enum means "the default"; the defaults are listed in the manual. */
typedef enum moe_flag {
    MOE_FLAG_DEFAULT = 0,
    MOE_FLAG_ON,
    MOE_FLAG_OFF,
    MOE_FLAG_COUNT
} moe_flag;

typedef enum moe_layer_kind {
    MOE_LAYER_DEFAULT = 0,  /* dense */
    MOE_LAYER_DENSE,        /* y = act(x W^T + b) */
    MOE_LAYER_MOE,          /* mixture of experts */
    MOE_LAYER_RMSNORM,      /* y = x / sqrt(mean(x^2) + eps) * w */
    MOE_LAYER_LAYERNORM,    /* y = (x - mean) / sqrt(var + eps) * w + b */
    MOE_LAYER_MULTIGATE,    /* multi-task: MMoE (one softmax gate per task over shared experts) or a PLE level */
    MOE_LAYER_TASK_TOWERS,  /* multi-task: one independent expert network per task slice (block-diagonal) */
    MOE_LAYER_EMBEDDING,    /* x [T, n] token ids -> y [T, n * d_embedding]: the rows W[id] side by side */
    MOE_LAYER_COUNT
} moe_layer_kind;

/* Most tasks of a multi-task layer or model. */
#define MOE_MAX_TASKS 8

/* Layout of the input of a multi-task layer [T, d_in]: one representation, or one slice of
   width d_in / groups per task (then the shared slice), as a previous multi-task layer writes them. */
typedef enum moe_task_input {
    MOE_TASK_INPUT_DEFAULT = 0, /* multigate: single; task towers: tasks */
    MOE_TASK_INPUT_SINGLE,      /* x [T, D] read by every expert and gate */
    MOE_TASK_INPUT_TASKS,       /* [T, n_tasks * D]: task i's experts and gate read slice i */
    MOE_TASK_INPUT_TASKS_SHARED,/* [T, (n_tasks + 1) * D]: the last slice feeds shared experts and the shared gate */
    MOE_TASK_INPUT_COUNT
} moe_task_input;

typedef enum moe_activation {
    MOE_ACT_DEFAULT = 0,    /* identity for dense layers, relu for MLP experts */
    MOE_ACT_IDENTITY,
    MOE_ACT_RELU,
    MOE_ACT_GELU,           /* exact: x * Phi(x) with erf */
    MOE_ACT_SILU,           /* x * sigmoid(x) */
    MOE_ACT_TANH,
    MOE_ACT_SIGMOID,
    MOE_ACT_COUNT
} moe_activation;

typedef enum moe_router {
    MOE_ROUTER_DEFAULT = 0, /* top-k */
    MOE_ROUTER_TOPK,        /* softmax, keep k, optional renormalise; k = E is the dense soft mixture */
    MOE_ROUTER_NOISY_TOPK,  /* Shazeer 2017: trainable softplus noise while training */
    MOE_ROUTER_SWITCH,      /* top-1 with a capacity factor; overflow tokens are dropped */
    MOE_ROUTER_SIGMOID,     /* DeepSeek-V3: sigmoid scores, selection bias (aux-loss-free balance), group-limited top-k */
    MOE_ROUTER_EXPERT_CHOICE, /* Zhou 2022: each expert takes its top-C tokens by softmax score */
    MOE_ROUTER_HASH,        /* k experts from a fixed hash of the token id, gates 1/k; no parameters */
    MOE_ROUTER_SOFT,        /* Puigcerver 2023 soft MoE: slots mix the tokens of a group, softmax dispatch and combine */
    MOE_ROUTER_HIERARCHICAL, /* Shazeer 2017 B: a gate over n_groups groups, then a gate inside each chosen group */
    MOE_ROUTER_COUNT
} moe_router;

typedef enum moe_expert {
    MOE_EXPERT_DEFAULT = 0, /* MLP */
    MOE_EXPERT_LINEAR,      /* x W^T + b */
    MOE_EXPERT_MLP,         /* linear -> act (-> linear -> act)* -> linear */
    MOE_EXPERT_SWIGLU,      /* w2(silu(w1 x) * (w3 x)) */
    MOE_EXPERT_GAUSSIAN,    /* mixture density: MLP whose last linear gives a mean and a log-std per output;
                               the layer outputs (log pi [E] | means [E, d_out] | log-stds [E, d_out]) */
    MOE_EXPERT_GEGLU,       /* w2(gelu(w1 x) * (w3 x)), gelu exact (erf); tensors as SwiGLU */
    MOE_EXPERT_COUNT
} moe_expert;

/* How a MoE layer turns its experts' outputs into y (README model reference 3.4, step 6). */
typedef enum moe_combine {
    MOE_COMBINE_DEFAULT = 0,   /* weighted sum */
    MOE_COMBINE_SUM,           /* y = sum over chosen experts of gate * expert(x) */
    MOE_COMBINE_STACK,         /* y = W [gate_0 f_0(x), ..., gate_E-1 f_E-1(x)] + b: a learned output linear over
                                  the concatenated gated outputs (zeros for experts not chosen) */
    MOE_COMBINE_VOTE,          /* classification: training forwards give the weighted sum of the experts' logits;
                                  inference y[c] = sum of the gates of the chosen experts whose argmax is c */
    MOE_COMBINE_VOTE_MAJORITY, /* as VOTE, but inference y[c] = the number of those experts, ties between classes
                                  broken by the gate sums: y[c] = count_c + 0.5 * gates_c / sum of gates */
    MOE_COMBINE_COUNT
} moe_combine;

typedef enum moe_loss {
    MOE_LOSS_DEFAULT = 0,   /* cross-entropy */
    MOE_LOSS_CROSS_ENTROPY, /* softmax cross-entropy on int32 class labels, mean over tokens */
    MOE_LOSS_MSE,           /* mean over all elements of (y - target)^2 */
    MOE_LOSS_BCE,           /* binary cross-entropy on logits, mean over all elements */
    MOE_LOSS_MIXTURE_NLL,   /* -log sum_e pi_e N(y; mu_e, sigma_e^2) of a Gaussian-expert last layer, mean over tokens */
    MOE_LOSS_COUNT
} moe_loss;

typedef enum moe_optimizer_kind {
    MOE_OPTIMIZER_DEFAULT = 0, /* AdamW */
    MOE_OPTIMIZER_SGD,         /* with optional momentum */
    MOE_OPTIMIZER_ADAM,        /* weight decay, if any, is added to the gradient */
    MOE_OPTIMIZER_ADAMW,       /* decoupled weight decay */
    MOE_OPTIMIZER_COUNT
} moe_optimizer_kind;

typedef enum moe_kernels {
    MOE_KERNELS_DEFAULT = 0,   /* the fastest kernels this CPU runs */
    MOE_KERNELS_REFERENCE,     /* plain loops: slow, obviously correct; for tests */
    MOE_KERNELS_AVX2,          /* the AVX2+FMA kernels even where AVX-512 is there (MOE_ERR_UNSUPPORTED
                                  where the CPU or the build has none): to time or test them */
    MOE_KERNELS_PORTABLE,      /* the portable C kernels, as on a CPU without AVX2 or another architecture */
    MOE_KERNELS_COUNT
} moe_kernels;

/* Element types of tensors in files, and of reduced-precision expert weights. */
typedef enum moe_dtype {
    MOE_DTYPE_F32 = 0,
    MOE_DTYPE_F64,
    MOE_DTYPE_F16,
    MOE_DTYPE_BF16,
    MOE_DTYPE_I64,
    MOE_DTYPE_I32,
    MOE_DTYPE_U8,
    MOE_DTYPE_I8,
    MOE_DTYPE_COUNT
} moe_dtype;

typedef enum moe_log_level {
    MOE_LOG_ERROR = 1,
    MOE_LOG_WARNING,
    MOE_LOG_INFO
} moe_log_level;

// >>ctx ---------------------------------------------------------------------
/* Run-time allocator. alloc returns memory aligned for any C type (or NULL);
   moe.h aligns its own buffers to 64 bytes on top of that. */
typedef struct moe_allocator {
    void *(*alloc)(size_t size, void *user);
    void (*free)(void *ptr, void *user);
    void *user;
} moe_allocator;

typedef void (*moe_log_fn)(moe_log_level level, const char *message, void *user);

typedef struct moe_ctx_desc {
    int n_threads;             /* 0: all OpenMP threads (1 without OpenMP); results never depend on it */
    uint64_t seed;             /* initialisation and noise are pure functions of this seed */
    moe_allocator allocator;   /* both functions NULL: MOE_MALLOC / MOE_FREE */
    moe_log_fn log;            /* NULL: silent */
    void *log_user;
    moe_kernels kernels;       /* MOE_KERNELS_REFERENCE selects the plain twins of every kernel */
} moe_ctx_desc;

/* Lives wherever the caller puts it (stack, static, heap); no allocation of its own.
   The fields are filled by moe_ctx_init; treat them as read-only. */
typedef struct moe_ctx {
    int n_threads;
    uint64_t seed;
    moe_allocator allocator;
    moe_log_fn log;
    void *log_user;
    moe_kernels kernels;
    char error[256];           /* last error text: read it with moe_ctx_error() */
} moe_ctx;

MOEDEF moe_result moe_ctx_init(moe_ctx *ctx, const moe_ctx_desc *desc /* NULL: defaults */);
MOEDEF const char *moe_ctx_error(const moe_ctx *ctx);
/* The kernels the context's layers run: "avx512", "avx2", "generic" (portable C) or "reference". */
MOEDEF const char *moe_ctx_kernels(const moe_ctx *ctx);

// >>layer -------------------------------------------------------------------
/* A layer. All-zero fields mean defaults (listed in the manual, "Defaults"). */
typedef struct moe_layer_desc {
    moe_layer_kind kind;
    int64_t d_in;              /* input width; 0 inside a model: the previous layer's output width */
    int64_t d_out;             /* output width; 0: d_in (norm layers always keep d_in; Gaussian
                                  experts: the modelled dimensions, the output is E (1 + 2 d_out)) */
    moe_activation activation; /* dense: on the output; MLP experts: on every hidden layer */
    moe_flag bias;             /* biases of dense and expert linears (default on; SwiGLU, GeGLU: off) */
    int residual;              /* nonzero: y = x + layer(x); needs d_out == d_in */
    float eps;                 /* norm layers: added to the variance (default 1e-5) */

    /* MoE layers */
    int n_experts;             /* E (default 4) */
    int top_k;                 /* k, 1..E (default 2, or E if E < 2; switch: 1; Gaussian experts: E); multigate: experts each gate keeps (default 0: all) */
    moe_router router;
    moe_expert expert;
    int64_t d_hidden;          /* expert hidden width (default d_in) */
    int n_hidden_layers;       /* MLP experts: hidden layers (default 1) */
    int n_shared_experts;      /* always-on experts added with weight 1 (default 0) */
    int64_t d_shared_hidden;   /* their hidden width (default d_hidden) */
    moe_flag renormalize;      /* top-k gates sum to 1 (default on; switch: off) */
    moe_flag router_bias;      /* router linear has a bias (default off) */
    float capacity_factor;     /* > 0: each expert takes at most ceil(cf*T*k/E) tokens
                                  (default 1.25 for switch, 0 = unlimited otherwise) */
    float jitter;              /* training only: router input times U(1-jitter, 1+jitter) */
    float balance_loss;        /* coefficient of the Switch/GShard load-balancing loss */
    float z_loss;              /* coefficient of the router z-loss */
    float importance_loss;     /* noisy top-k: coefficient of CV^2(importance) */
    float load_loss;           /* noisy top-k: coefficient of CV^2(load) */
    int max_top_k;             /* most experts per token a forward may ask for (moe_forward_opts.top_k;
                                  default top_k); sizes the routing buffers */
    /* sigmoid router */
    float routed_scaling_factor; /* gates times this (default 1) */
    int n_groups;              /* experts in n_groups equal groups; > 1: group-limited selection (default 1) */
    int top_k_groups;          /* groups a token may choose from (default n_groups) */
    float bias_update_rate;    /* gamma of the selection-bias update after each optimizer step (default 0: off) */
    /* hash router */
    uint32_t hash_seed;        /* mixed with the token id and the layer index (default 0) */
    /* shared experts */
    moe_flag shared_gate;      /* on: shared expert q's output times sigmoid(x . g_q), g = "shared.gate.weight"
                                  [n_shared_experts, d_in] (Qwen2-MoE; default off) */
    /* combine */
    moe_combine combine;       /* how expert outputs make y (default: weighted sum) */
    int64_t d_expert_out;      /* routed experts' output width (default d_out; other than d_out only with
                                  MOE_COMBINE_STACK, whose combine.weight is [d_out, n_experts * d_expert_out]) */
    /* soft router */
    int slots_per_expert;      /* S: slots each expert processes per group (default 1) */
    int64_t soft_group_tokens; /* tokens per group; a call's T must be a multiple (default 0: the whole call is one group) */
    /* hierarchical router (n_groups groups, top_k_groups chosen, top_k experts inside each chosen group) */
    moe_router group_router;   /* first-level gate: MOE_ROUTER_TOPK (default) or MOE_ROUTER_NOISY_TOPK */
    moe_router expert_router;  /* second-level gate inside a group: MOE_ROUTER_TOPK (default) or MOE_ROUTER_NOISY_TOPK */
    /* multi-task layers (multigate: n_experts are the shared experts; expert, d_hidden,
       n_hidden_layers, activation and bias describe every expert and tower) */
    int n_tasks;               /* tasks, 1..MOE_MAX_TASKS (default 2) */
    int n_task_experts;        /* multigate: experts of each task (PLE; default 0: MMoE) */
    moe_task_input task_input; /* layout of the input (default: multigate single, task towers tasks) */
    int shared_output;         /* multigate: nonzero also outputs the shared representation (PLE levels before the last) */
    /* embedding layers: d_in = n token ids per row (integers stored as floats), d_out = n * d_embedding */
    int64_t vocab_size;        /* ids are 0..vocab_size-1 (required; at most 2^24, exact in a float) */
    int64_t d_embedding;       /* width of one token's embedding (default d_out / d_in; one of the two is required) */
} moe_layer_desc;

typedef struct moe_layer moe_layer;

/* Options of one forward call; NULL means all defaults (inference). */
typedef struct moe_forward_opts {
    int training;              /* nonzero: router noise and jitter are on */
    /* Noisy top-k layers only, while training: the standard-normal noise to use,
       indexed [layer][T * E] (model) or [0][T * E] (single layer); a NULL array or
       entry draws it from the context's seed instead. Hierarchical layers take
       T * E + T * n_groups values: the expert noise [T, E], then the group noise [T, n_groups]. */
    const float *const *router_noise;
    int top_k;                 /* experts per token for this call: 0 = the layer's top_k; 1..max_top_k
                                  (expert choice: the k of its capacity) */
    float top_p;               /* 0 = off; 0 < p <= 1 (routers topk, noisy_topk, switch): per token keep the
                                  fewest highest-probability experts whose probabilities sum to >= p, at most k */
    const int32_t *token_ids;  /* [T] token ids for hash routers (required by them; ignored otherwise). A model
                                  whose layer 0 is an embedding uses each row's last id when this is NULL */
} moe_forward_opts;

#ifndef MOE_NO_TRAINING
/* Flags of moe_layer_backward / moe_model_backward */
#define MOE_BACKWARD_AUX 1     /* add the gradients of the layers' auxiliary losses */
#endif

/* Routing statistics of the last forward of a MoE layer. */
typedef struct moe_stats {
    int n_experts;
    int top_k;
    int64_t n_tokens;
    const int64_t *tokens_per_expert; /* [n_experts] kept assignments; valid until the next forward */
    float load_cv;             /* std / mean of tokens_per_expert */
    int64_t dropped_assignments; /* (token, expert) choices over capacity */
    int64_t dropped_tokens;    /* tokens with no expert left: they pass through */
    float router_entropy;      /* mean over tokens of -sum p log p of the router softmax */
    float balance_loss;        /* each aux loss times its coefficient */
    float z_loss;
    float importance_loss;
    float load_loss;
    float aux_loss;            /* sum of the four above */
} moe_stats;

/* Tensor of a layer or model: a view into the parameter blob. */
typedef struct moe_tensor {
    const char *name;          /* "layers.0.experts.w1.weight" (model), "experts.w1.weight" (layer) */
    int ndim;
    int64_t shape[4];
    int64_t offset;            /* in floats, into the parameter blob */
    int64_t size;              /* elements */
    float *data;
    float *grad;
} moe_tensor;

MOEDEF moe_result moe_layer_create(moe_ctx *ctx, const moe_layer_desc *desc, int64_t max_tokens, moe_layer **out);
MOEDEF void moe_layer_destroy(moe_layer *layer);
/* x [T, d_in] -> y [T, d_out] (Gaussian experts: [T, E (1 + 2 d_out)]). x and y must stay untouched
   until the matching backward. */
MOEDEF moe_result moe_layer_forward(moe_layer *layer, const float *x, int64_t n_tokens, float *y, const moe_forward_opts *opts);
#ifndef MOE_NO_TRAINING
/* dy [T, d_out] -> dx [T, d_in] (overwritten; NULL: not wanted). Parameter gradients accumulate. */
MOEDEF moe_result moe_layer_backward(moe_layer *layer, const float *dy, float *dx, int flags);
MOEDEF float *moe_layer_grads(moe_layer *layer, int64_t *n_params);
#endif
MOEDEF moe_result moe_layer_stats(const moe_layer *layer, moe_stats *stats);
MOEDEF const moe_layer_desc *moe_layer_get_desc(const moe_layer *layer); /* defaults filled in */
MOEDEF float *moe_layer_params(moe_layer *layer, int64_t *n_params);
MOEDEF int moe_layer_tensor_count(const moe_layer *layer);
MOEDEF moe_result moe_layer_tensor(moe_layer *layer, int index, moe_tensor *tensor);
/* Inference with reduced-precision expert weights: snapshot the expert weights of a MoE layer
   as MOE_DTYPE_BF16 or MOE_DTYPE_I8 (int8 with one float scale per 32 weights); forwards then
   read those. MOE_DTYPE_F32 drops the snapshot. While one is held, backward returns
   MOE_ERR_STATE. Allocates (once, here); other layer kinds accept the call and ignore it. */
MOEDEF moe_result moe_layer_quantize(moe_layer *layer, moe_dtype dtype);
/* Batched inference with packed weights: enable != 0 copies the f32 expert weights into the
   panel layout the matrix kernels read, so forwards of more than a few tokens skip repacking
   them (results bitwise the same as without); 0 frees the copy. Uses as much memory again as
   the expert weights; allocates here only. A training forward or moe_layer_quantize drops it;
   after changing weights through tensor pointers, call it again. Reduced-precision layers and
   other layer kinds accept the call and pack nothing. */
MOEDEF moe_result moe_layer_pack(moe_layer *layer, int enable);
#ifndef MOE_NO_TRAINING
/* Sigmoid router: the aux-loss-free selection-bias update from the load of the last forward,
   b_e += bias_update_rate * sign(mean load - load_e). moe_model_optimizer_step and
   moe_model_train_step do this themselves; call it after your own optimizer step on a standalone
   layer (and keep that optimizer off "router.selection_bias"). Other layers: no-op. */
MOEDEF moe_result moe_layer_update_bias(moe_layer *layer);
#endif

/* Mixture density (MOE_EXPERT_GAUSSIAN): a layer with E experts and d_out outputs emits, per
   token, the packed mixture (log pi [E] | means [E, d_out] | log-stds [E, d_out]), E (1 + 2 d_out)
   floats. Components the router did not choose (top_k < E) have log pi = -inf. Log-stds are
   clamped to [MOE_MIXTURE_LOG_STD_MIN, MOE_MIXTURE_LOG_STD_MAX]. README "Gaussian experts". */
#define MOE_MIXTURE_LOG_STD_MIN (-10.0f)
#define MOE_MIXTURE_LOG_STD_MAX 10.0f
/* mixture [T, E (1 + 2 d_out)] -> out [T, d_out]: the mixture mean sum_e pi_e mu_e. */
MOEDEF moe_result moe_mixture_mean(moe_ctx *ctx, const float *mixture, int64_t n_tokens, int n_components, int64_t d_out, float *out);
/* -> out [T, d_out]: the mean of the component with the largest pi (ties: the lower index). */
MOEDEF moe_result moe_mixture_top_mean(moe_ctx *ctx, const float *mixture, int64_t n_tokens, int n_components, int64_t d_out, float *out);
/* -> out [T, d_out]: one draw from each token's mixture, a pure function of (ctx seed, draw, token):
   the same arguments give the same samples; another `draw` gives fresh ones. */
MOEDEF moe_result moe_mixture_sample(moe_ctx *ctx, const float *mixture, int64_t n_tokens, int n_components, int64_t d_out,
                                     uint64_t draw, float *out);

// >>optimizer ---------------------------------------------------------------
typedef struct moe_optimizer_desc {
    moe_optimizer_kind kind;
    float lr;                  /* peak learning rate (default 1e-3) */
    float beta1, beta2;        /* Adam(W) (defaults 0.9, 0.999) */
    float eps;                 /* Adam(W) (default 1e-8) */
    float weight_decay;        /* default 0 */
    float momentum;            /* SGD (default 0) */
    float clip_norm;           /* > 0: clip gradients to this global L2 norm */
    int64_t warmup_steps;      /* linear warm-up from lr/warmup_steps to lr */
    int64_t total_steps;       /* > 0: cosine decay from lr to min_lr over the steps after warm-up */
    float min_lr;
} moe_optimizer_desc;

#ifndef MOE_NO_TRAINING
/* Optimizer state over a flat blob of n parameters. */
typedef struct moe_optimizer moe_optimizer;

typedef struct moe_step_info {
    float loss;                /* task loss (without auxiliary losses) */
    float aux_loss;            /* sum over layers of their auxiliary losses */
    float grad_norm;           /* global L2 norm before clipping */
    float lr;                  /* learning rate used by this step */
    int64_t step;              /* steps taken so far, this one included */
    float task_loss[MOE_MAX_TASKS]; /* multi-task models: each task's loss, unweighted (loss is their weighted sum) */
} moe_step_info;

MOEDEF moe_result moe_optimizer_create(moe_ctx *ctx, const moe_optimizer_desc *desc, int64_t n_params, moe_optimizer **out);
MOEDEF void moe_optimizer_destroy(moe_optimizer *opt);
/* The learning rate the schedule gives for a step (0-based). */
MOEDEF float moe_optimizer_lr(const moe_optimizer *opt, int64_t step);
/* Clip (if asked), then update params from grads. grads are scaled in place by clipping.
   MOE_ERR_NONFINITE, with params, grads and the state untouched, when the gradients are not finite
   or the update would make a parameter or moment NaN or Inf (e.g. a far too large lr). */
MOEDEF moe_result moe_optimizer_step(moe_optimizer *opt, float *params, float *grads, moe_step_info *info);
MOEDEF int64_t moe_optimizer_steps(const moe_optimizer *opt);
#endif /* MOE_NO_TRAINING */

// >>model -------------------------------------------------------------------
typedef struct moe_model_desc {
    int64_t d_in;              /* input width */
    int n_layers;
    const moe_layer_desc *layers;
    moe_loss loss;
    int64_t max_tokens;        /* most rows per call (default 256); sizes the activation arena */
    moe_optimizer_desc optimizer;
    /* multi-task models: the output [T, d_out] is n_tasks slices side by side, each with its own
       loss and target; the training loss is sum_i task_weight[i] * loss_i */
    int n_tasks;               /* 0: one task (loss above) */
    moe_loss task_loss[MOE_MAX_TASKS];   /* default: loss */
    float task_weight[MOE_MAX_TASKS];    /* > 0 (default 1) */
    int64_t task_d_out[MOE_MAX_TASKS];   /* slice widths summing to d_out (default d_out / n_tasks each) */
} moe_model_desc;

typedef struct moe_model moe_model;

#ifndef MOE_NO_TRAINING
/* Training targets: labels for cross-entropy, values [T, d_out] for MSE and BCE, values [T, d_out of
   the Gaussian-expert last layer] (not the packed width) for the mixture NLL. */
typedef struct moe_target {
    const int32_t *labels;
    const float *values;
    const struct moe_target *tasks; /* multi-task models: [n_tasks] targets, task i's values [T, task_d_out[i]] */
} moe_target;
#endif

MOEDEF moe_result moe_model_create(moe_ctx *ctx, const moe_model_desc *desc, moe_model **out);
MOEDEF void moe_model_destroy(moe_model *model);
MOEDEF const moe_model_desc *moe_model_get_desc(const moe_model *model); /* defaults filled in */
MOEDEF int64_t moe_model_d_out(const moe_model *model);

/* x [T, d_in] -> y [T, d_out] (y may be NULL: read the output with moe_model_output). */
MOEDEF moe_result moe_model_forward(moe_model *model, const float *x, int64_t n_tokens, float *y, const moe_forward_opts *opts);
MOEDEF const float *moe_model_output(const moe_model *model);
#ifndef MOE_NO_TRAINING
/* After a forward: the task loss against target, and its gradient dL/dy into dy (NULL: not wanted). */
MOEDEF moe_result moe_model_loss(moe_model *model, const moe_target *target, float *loss, float *dy);
/* After a forward: back-propagate dy [T, d_out]; dx [T, d_in] may be NULL. Gradients accumulate. */
MOEDEF moe_result moe_model_backward(moe_model *model, const float *dy, float *dx, int flags);
MOEDEF void moe_model_zero_grad(moe_model *model);
/* Clip and update with the model's optimizer. */
MOEDEF moe_result moe_model_optimizer_step(moe_model *model, moe_step_info *info);
/* Optimizer steps taken so far (a model loaded from a checkpoint continues the count). */
MOEDEF int64_t moe_model_steps(const moe_model *model);
/* forward (training) + loss + aux losses + backward + update. info may be NULL. */
MOEDEF moe_result moe_model_train_step(moe_model *model, const float *x, const moe_target *target, int64_t n_tokens, moe_step_info *info);
MOEDEF float *moe_model_grads(moe_model *model, int64_t *n_params);
#endif /* MOE_NO_TRAINING */
/* Argmax class per row (cross-entropy models) or per-row argmax of the outputs. */
MOEDEF moe_result moe_model_predict(moe_model *model, const float *x, int64_t n_tokens, int32_t *classes);
/* Routing statistics of MoE layer `layer` from the last forward. */
MOEDEF moe_result moe_model_stats(const moe_model *model, int layer, moe_stats *stats);
/* moe_layer_quantize on every MoE layer; training calls return MOE_ERR_STATE while quantized. */
MOEDEF moe_result moe_model_quantize(moe_model *model, moe_dtype dtype);
/* moe_layer_pack on every layer (MOE_ERR_STATE for a model in caller memory). */
MOEDEF moe_result moe_model_pack(moe_model *model, int enable);

/* The parameter blob and its length in floats; tensors start 64-byte aligned, so the blob holds
   a little padding between them (zeros): moe_model_parameter_count gives the parameters. */
MOEDEF float *moe_model_params(moe_model *model, int64_t *n_params);
MOEDEF int64_t moe_model_parameter_count(const moe_model *model);
MOEDEF int moe_model_tensor_count(const moe_model *model);
MOEDEF moe_result moe_model_tensor(moe_model *model, int index, moe_tensor *tensor);
MOEDEF moe_result moe_model_find_tensor(moe_model *model, const char *name, moe_tensor *tensor);

/* Model files: safetensors with the configuration in __metadata__["moe.config"].
   Saving writes a temporary file next to `path`, then renames it over `path`. */
#ifndef MOE_NO_STDIO
MOEDEF moe_result moe_model_save(moe_model *model, const char *path);
#endif
/* The model file's bytes into buf (cap bytes); *size gets the file's size in bytes. buf NULL:
   only the size. cap < *size: MOE_ERR_OUT_OF_MEMORY and buf untouched. */
MOEDEF moe_result moe_model_save_memory(moe_model *model, void *buf, size_t cap, size_t *size);
/* A new model (fresh parameters from the context's seed) from a "moe.config" JSON text
   (README.md (Model reference) section 6.1). max_tokens 0: the text's value, else 256. */
MOEDEF moe_result moe_model_from_config(moe_ctx *ctx, const char *json, int64_t max_tokens, moe_model **out);
/* The model's configuration as "moe.config" JSON text into buf (cap bytes, NUL included).
   Returns the text's length; when it is >= cap the text was cut. */
MOEDEF size_t moe_model_config_json(const moe_model *model, char *buf, size_t cap);
/* max_tokens 0: the value stored in the file. */
#ifndef MOE_NO_STDIO
MOEDEF moe_result moe_model_load(moe_ctx *ctx, const char *path, int64_t max_tokens, moe_model **out);
#endif
MOEDEF moe_result moe_model_load_memory(moe_ctx *ctx, const void *data, size_t size, int64_t max_tokens, moe_model **out);
/* Caller-owned memory ("size / init into this memory / run"): moe_model_memory_size gives the
   bytes a model loaded from the file in data needs for max_tokens (0: the file's value) and the
   context's n_threads; it loads the model once through the context's allocator to measure, and
   frees it again. moe_model_init_memory then loads it into `memory` (aligned to
   MOE_MEMORY_ALIGN bytes, memory_size bytes) without any other allocation: the model, its
   activations and the loader's temporary tables all live there. Forward, predict and stats then
   run as usual; moe_model_destroy frees nothing (the memory is the caller's, and free to reuse
   after the model is no longer used) and moe_model_quantize returns MOE_ERR_STATE (quantize the
   file instead). Too small: MOE_ERR_OUT_OF_MEMORY; misaligned: MOE_ERR_INVALID_ARGUMENT. */
#define MOE_MEMORY_ALIGN 16
MOEDEF moe_result moe_model_memory_size(moe_ctx *ctx, const void *data, size_t size, int64_t max_tokens, size_t *bytes);
MOEDEF moe_result moe_model_init_memory(moe_ctx *ctx, const void *data, size_t size, int64_t max_tokens, void *memory,
                                        size_t memory_size, moe_model **out);
#ifndef MOE_NO_TRAINING
/* Checkpoints: a model file plus the optimizer's state (moments, step) and every layer's noise
   counter (README "Checkpoints"). A model loaded from one trains on bit for bit as the model that
   saved it would have; the context must have the seed the checkpoint was written with. A
   checkpoint is also a model file (moe_model_load reads its parameters). Saves are atomic. */
#ifndef MOE_NO_STDIO
MOEDEF moe_result moe_model_save_checkpoint(moe_model *model, const char *path);
MOEDEF moe_result moe_model_load_checkpoint(moe_ctx *ctx, const char *path, int64_t max_tokens, moe_model **out);
#endif
MOEDEF moe_result moe_model_save_checkpoint_memory(moe_model *model, void *buf, size_t cap, size_t *size);
MOEDEF moe_result moe_model_load_checkpoint_memory(moe_ctx *ctx, const void *data, size_t size, int64_t max_tokens, moe_model **out);
#endif /* MOE_NO_TRAINING */

// >>safetensors -------------------------------------------------------------
/* A safetensors file in memory, for reading inputs and writing outputs of any kind. */

typedef struct moe_file_tensor {
    char name[128];
    moe_dtype dtype;
    int ndim;
    int64_t shape[8];
    const void *data;          /* points into the file's bytes (unaligned in general) */
    size_t nbytes;
} moe_file_tensor;

typedef struct moe_tensor_file moe_tensor_file;

#ifndef MOE_NO_STDIO
MOEDEF moe_result moe_tensor_file_read(moe_ctx *ctx, const char *path, moe_tensor_file **out);
#endif
/* data must outlive the file object; it is not copied. */
MOEDEF moe_result moe_tensor_file_parse(moe_ctx *ctx, const void *data, size_t size, moe_tensor_file **out);
MOEDEF void moe_tensor_file_close(moe_tensor_file *file);
MOEDEF int moe_tensor_file_count(const moe_tensor_file *file);
MOEDEF const moe_file_tensor *moe_tensor_file_get(const moe_tensor_file *file, int index);
MOEDEF const moe_file_tensor *moe_tensor_file_find(const moe_tensor_file *file, const char *name);
/* The value of a __metadata__ key, or NULL. */
MOEDEF const char *moe_tensor_file_metadata(const moe_tensor_file *file, const char *key);
/* Copy a tensor's elements as float (any float dtype, I32, I64, U8, I8); count must equal its size. */
MOEDEF moe_result moe_file_tensor_to_f32(moe_ctx *ctx, const moe_file_tensor *tensor, float *out, int64_t count);
MOEDEF moe_result moe_file_tensor_to_i32(moe_ctx *ctx, const moe_file_tensor *tensor, int32_t *out, int64_t count);

/* Writer: add tensors (their data is referenced, not copied, until moe_tensor_writer_save). */
typedef struct moe_tensor_writer moe_tensor_writer;
MOEDEF moe_result moe_tensor_writer_create(moe_ctx *ctx, moe_tensor_writer **out);
MOEDEF moe_result moe_tensor_writer_add(moe_tensor_writer *writer, const char *name, moe_dtype dtype, int ndim, const int64_t *shape, const void *data);
MOEDEF moe_result moe_tensor_writer_metadata(moe_tensor_writer *writer, const char *key, const char *value);
/* Atomic: temporary file, then rename. */
#ifndef MOE_NO_STDIO
MOEDEF moe_result moe_tensor_writer_save(moe_tensor_writer *writer, const char *path);
#endif
/* The file's bytes into buf (cap bytes); *size gets the file's size. buf NULL: only the size.
   cap < *size: MOE_ERR_OUT_OF_MEMORY and buf untouched. */
MOEDEF moe_result moe_tensor_writer_save_memory(moe_tensor_writer *writer, void *buf, size_t cap, size_t *size);
MOEDEF void moe_tensor_writer_destroy(moe_tensor_writer *writer);

// >>hf_import ---------------------------------------------------------------
/* One MoE block of a Hugging Face checkpoint (per-expert tensor names) as a moe.h MoE layer:
   Mixtral, Qwen2-MoE (gated shared expert) and DeepSeek-V3 (sigmoid scores, correction bias,
   groups, shared experts). README "Importing Hugging Face MoE blocks" has the name mapping. */
typedef enum moe_hf_arch {
    MOE_HF_ARCH_DEFAULT = 0,   /* config.json's "model_type", else guessed from the block's tensor names */
    MOE_HF_MIXTRAL,            /* block_sparse_moe.gate, experts.<e>.w1/w2/w3 */
    MOE_HF_QWEN2_MOE,          /* mlp.gate, experts.<e>.gate_proj/up_proj/down_proj, shared_expert(_gate) */
    MOE_HF_DEEPSEEK_V3,        /* mlp.gate (+ e_score_correction_bias), experts.<e>.*, shared_experts.* */
    MOE_HF_ARCH_COUNT
} moe_hf_arch;

typedef struct moe_hf_desc {
    moe_hf_arch arch;
    const char *config_json;   /* text of the model's config.json, or NULL (then top_k must be given) */
    const char *prefix;        /* the block's name prefix, "model.layers.3.mlp.", or a decoder layer's,
                                  "model.layers.3." (NULL: the lowest-numbered MoE block in the file) */
    /* override config.json (0: its value) */
    int top_k;                 /* num_experts_per_tok */
    moe_flag norm_topk_prob;   /* renormalise the k gates (default: config.json's, else off for
                                  Qwen2-MoE, on for DeepSeek-V3; Mixtral: on) */
    int n_groups;              /* DeepSeek-V3 n_group (default: config, else 1) */
    int top_k_groups;          /* DeepSeek-V3 topk_group (default: config, else n_groups) */
    float routed_scaling_factor; /* DeepSeek-V3 (default: config, else 1) */
} moe_hf_desc;

/* A standalone MoE layer holding the block (d_in = d_out = hidden size, SwiGLU experts). Every
   tensor is checked (present, 2-D/1-D shape as the block implies, F32/F16/BF16/F64) before
   anything is allocated. desc NULL: all defaults. */
MOEDEF moe_result moe_layer_import_hf(moe_ctx *ctx, const moe_tensor_file *file, const moe_hf_desc *desc, int64_t max_tokens, moe_layer **out);
/* The same block as a one-layer model (loss MSE, default optimizer), ready for moe_model_save. */
MOEDEF moe_result moe_model_import_hf(moe_ctx *ctx, const moe_tensor_file *file, const moe_hf_desc *desc, int64_t max_tokens, moe_model **out);

// >>rng ---------------------------------------------------------------------
/* Counter-based random numbers: pure functions of (seed, stream, counter). */
MOEDEF uint64_t moe_rng_u64(uint64_t seed, uint64_t stream, uint64_t counter);
MOEDEF float moe_rng_uniform(uint64_t seed, uint64_t stream, uint64_t counter);  /* [0, 1) */
MOEDEF float moe_rng_normal(uint64_t seed, uint64_t stream, uint64_t counter);   /* N(0, 1) */

#ifdef __cplusplus
}
#endif
#endif /* MOE_H_INCLUDED */

/* ========================================================================== */
/*                              IMPLEMENTATION                                */
/* ========================================================================== */
#ifdef MOE_IMPLEMENTATION
#ifndef MOE_IMPLEMENTATION_INCLUDED
#define MOE_IMPLEMENTATION_INCLUDED

// >>build -------------------------------------------------------------------
#include <errno.h>
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#ifndef MOE_NO_STDIO
#include <stdio.h>
#endif
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(MOE_MALLOC) && defined(MOE_FREE)
#elif !defined(MOE_MALLOC) && !defined(MOE_FREE)
#define MOE_MALLOC(size, user) ((void)(user), malloc(size))
#define MOE_FREE(ptr, user) ((void)(user), free(ptr))
#else
#error "moe.h: define both MOE_MALLOC and MOE_FREE, or neither"
#endif

#ifndef MOE_ASSERT
#ifdef NDEBUG
#define MOE_ASSERT(c) ((void)0)
#else
#include <assert.h>
#define MOE_ASSERT(c) assert(c)
#endif
#endif

/* x87 float math (32-bit x86 without -mfpmath=sse) evaluates in long double, which GCC will not
   mix with float vectors: such targets get the plain C kernels. */
#if defined(__FLT_EVAL_METHOD__) && __FLT_EVAL_METHOD__ != 0 && !defined(MOE_NO_VECTOR_EXTENSIONS)
#define MOE_NO_VECTOR_EXTENSIONS
#endif

#if defined(__GNUC__) || defined(__clang__)
#define MOE__RESTRICT __restrict__
#else
#define MOE__RESTRICT
#endif

#ifdef _OPENMP
#define MOE__PRAGMA(x) _Pragma(#x)
/* Threads split the loop by what they write; each iteration's result never depends on the split. */
/* `work` estimates the loop's cost in flops: waking threads costs more than a small loop gains. */
#define MOE__PARALLEL_MIN_WORK 100000.0
#define MOE__PARALLEL_FOR(nt, work) MOE__PRAGMA(omp parallel for num_threads(nt) schedule(static) if((nt) > 1 && (double)(work) >= MOE__PARALLEL_MIN_WORK))
#define MOE__PARALLEL_FOR_DYNAMIC(nt, work) MOE__PRAGMA(omp parallel for num_threads(nt) schedule(dynamic, 1) if((nt) > 1 && (double)(work) >= MOE__PARALLEL_MIN_WORK))
#define MOE__THREAD_ID() omp_get_thread_num()
#else
#define MOE__PARALLEL_FOR(nt, work) (void)(nt);
#define MOE__PARALLEL_FOR_DYNAMIC(nt, work) (void)(nt);
#define MOE__THREAD_ID() 0
#endif

#define MOE__ALIGN 64
#ifndef MOE_MAX_BYTES
#if SIZE_MAX > 0xFFFFFFFFu
#define MOE_MAX_BYTES ((size_t)1 << 46)   /* refuse models or arenas larger than this (64 TiB) up front */
#else
#define MOE_MAX_BYTES ((size_t)1 << 31)   /* 32-bit address space: 2 GiB */
#endif
#endif
#define MOE__MAX_BYTES ((size_t)MOE_MAX_BYTES)
#ifdef MOE_NO_TRAINING
#define MOE__BLOBS 1                /* parameter blob: the parameters only */
#else
#define MOE__BLOBS 2                /* parameter blob: the parameters, then their gradients */
#endif
#define MOE__MAX_LINEARS 9          /* MLP experts: up to 8 hidden layers */
#define MOE__MAX_TENSORS 48         /* per layer: router weight, bias, noise weight (or 9 multi-task gates) + two banks of 9 linears with biases */
#define MOE__NAME_MAX 64

static size_t moe__strlcpy(char *dst, const char *src, size_t cap) {
    size_t n = strlen(src);
    if (cap) {
        size_t m = n < cap - 1 ? n : cap - 1;
        memcpy(dst, src, m);
        dst[m] = 0;
    }
    return n;
}

/* dst = a + b + c, cut to cap bytes (names built from short fixed parts never are). */
static void moe__concat(char *dst, size_t cap, const char *a, const char *b, const char *c) {
    size_t n = moe__strlcpy(dst, a, cap);
    if (n < cap) n += moe__strlcpy(dst + n, b, cap - n);
    if (n < cap) moe__strlcpy(dst + n, c, cap - n);
}

/* The formatter of every message and text moe.h writes, so that no build needs <stdio.h>: the
   subset of vsnprintf that moe.h uses (flags '-' '0', width, precision and '*'; lengths l, ll, z;
   conversions d i u x c s g %; %g precision up to 17), with the same result, cut to cap bytes.
   %g is exact: the double's decimal expansion is computed digit by digit, then rounded half to
   even as glibc does. Returns the length the full text has (as vsnprintf). */
typedef struct moe__out { char *buf; size_t cap, len; } moe__out;

static void moe__out_char(moe__out *o, char c) {
    if (o->len + 1 < o->cap) o->buf[o->len] = c;
    o->len++;
}

static void moe__out_field(moe__out *o, const char *s, size_t n, int width, int left, char pad) {
    size_t i, w = width > 0 ? (size_t)width : 0;
    int sign = pad == '0' && n > 0 && s[0] == '-';
    if (sign) { moe__out_char(o, '-'); s++; n--; w = w ? w - 1 : 0; }
    if (!left) for (i = n; i < w; i++) moe__out_char(o, pad);
    for (i = 0; i < n; i++) moe__out_char(o, s[i]);
    if (left) for (i = n; i < w; i++) moe__out_char(o, ' ');
}

/* %.<prec>g of v into s (at least 32 bytes); returns the length. */
static size_t moe__format_g(char *s, double v, int prec) {
    unsigned char d[1120];      /* decimal digits of the mantissa times 2^e or 5^-e, least significant first */
    size_t nd = 0, i, at = 0, lo;
    int e, x, exp10, P = prec < 0 ? 6 : prec == 0 ? 1 : prec > 17 ? 17 : prec, k;
    uint64_t m;
    if (signbit(v)) { s[at++] = '-'; v = -v; }
    if (v != v) { memcpy(s + at, "nan", 4); return at + 3; }
    if (v > DBL_MAX) { memcpy(s + at, "inf", 4); return at + 3; }
    if (v == 0) { s[at++] = '0'; s[at] = 0; return at; }
    m = (uint64_t)ldexp(frexp(v, &e), 53);
    e -= 53;
    for (; m; m /= 10) d[nd++] = (unsigned char)(m % 10);
    exp10 = e < 0 ? e : 0;
    for (; e != 0; e += e > 0 ? -1 : 1) {   /* times 2, or times 5 with the point moved left */
        unsigned carry = 0, f = e > 0 ? 2u : 5u;
        for (i = 0; i < nd; i++) { unsigned t = d[i] * f + carry; d[i] = (unsigned char)(t % 10); carry = t / 10; }
        if (carry) d[nd++] = (unsigned char)carry;
    }
    x = (int)nd - 1 + exp10;    /* decimal exponent of the first digit */
    lo = nd > (size_t)P ? nd - (size_t)P : 0;   /* d[lo..nd-1] are kept */
    if (lo > 0) {
        int up = d[lo - 1] > 5, tie = d[lo - 1] == 5;
        for (i = 0; tie && i + 1 < lo; i++) if (d[i]) { up = 1; tie = 0; }
        if (tie) up = d[lo] & 1;
        for (i = lo; up && i < nd; i++) { if (d[i] == 9) d[i] = 0; else { d[i]++; up = 0; } }
        if (up) { d[nd - 1] = 1; x++; }  /* 99.9 -> 100: the kept digits become 1 followed by zeros */
    }
    {
        char dig[24];
        int n = 0, q;
        for (i = nd; i > lo && n < P; i--) dig[n++] = (char)('0' + d[i - 1]);
        while (n < P) dig[n++] = '0';
        while (n > 1 && dig[n - 1] == '0') n--;   /* %g drops trailing zeros */
        if (x < P && x >= -4) {
            if (x < 0) {
                s[at++] = '0'; s[at++] = '.';
                for (q = 0; q < -x - 1; q++) s[at++] = '0';
                for (q = 0; q < n; q++) s[at++] = dig[q];
            } else {
                for (q = 0; q <= x; q++) s[at++] = q < n ? dig[q] : '0';
                if (n > x + 1) { s[at++] = '.'; for (q = x + 1; q < n; q++) s[at++] = dig[q]; }
            }
        } else {
            s[at++] = dig[0];
            if (n > 1) { s[at++] = '.'; for (q = 1; q < n; q++) s[at++] = dig[q]; }
            s[at++] = 'e'; s[at++] = x < 0 ? '-' : '+';
            k = x < 0 ? -x : x;
            if (k >= 100) s[at++] = (char)('0' + k / 100);
            s[at++] = (char)('0' + k / 10 % 10); s[at++] = (char)('0' + k % 10);
        }
    }
    s[at] = 0;
    return at;
}

static size_t moe__vformat(char *buf, size_t cap, const char *fmt, va_list ap) {
    moe__out o;
    o.buf = buf; o.cap = cap; o.len = 0;
    for (; *fmt; fmt++) {
        char tmp[48], pad = ' ', conv;
        int left = 0, width = 0, prec = -1, lng = 0;
        if (*fmt != '%') { moe__out_char(&o, *fmt); continue; }
        for (fmt++; *fmt == '-' || *fmt == '0'; fmt++) { if (*fmt == '-') left = 1; else pad = '0'; }
        if (*fmt == '*') { width = va_arg(ap, int); fmt++; }
        for (; *fmt >= '0' && *fmt <= '9'; fmt++) width = width * 10 + (*fmt - '0');
        if (*fmt == '.') {
            prec = 0;
            if (*++fmt == '*') { prec = va_arg(ap, int); fmt++; }
            else for (; *fmt >= '0' && *fmt <= '9'; fmt++) prec = prec * 10 + (*fmt - '0');
        }
        if (left) pad = ' ';
        if (*fmt == 'z') { lng = 3; fmt++; }
        else if (*fmt == 'l') { lng = 1; if (*++fmt == 'l') { lng = 2; fmt++; } }
        conv = *fmt;
        if (!conv) break;
        if (conv == 's') {
            const char *s = va_arg(ap, const char *);
            size_t n = 0;
            if (!s) s = "(null)";
            while (s[n] && (prec < 0 || n < (size_t)prec)) n++;
            moe__out_field(&o, s, n, width, left, ' ');
        } else if (conv == 'g') {
            moe__out_field(&o, tmp, moe__format_g(tmp, va_arg(ap, double), prec), width, left, pad);
        } else if (conv == 'c') {
            tmp[0] = (char)va_arg(ap, int);
            moe__out_field(&o, tmp, 1, width, left, ' ');
        } else if (conv == 'd' || conv == 'i' || conv == 'u' || conv == 'x') {
            uint64_t u;
            int neg = 0, base = conv == 'x' ? 16 : 10;
            size_t n = sizeof tmp;
            if (conv == 'd' || conv == 'i') {
                int64_t s = lng == 2 ? (int64_t)va_arg(ap, long long) : lng == 1 ? (int64_t)va_arg(ap, long)
                          : lng == 3 ? (int64_t)va_arg(ap, size_t) : (int64_t)va_arg(ap, int);
                neg = s < 0;
                u = neg ? 0 - (uint64_t)s : (uint64_t)s;
            } else {
                u = lng == 2 ? (uint64_t)va_arg(ap, unsigned long long) : lng == 1 ? (uint64_t)va_arg(ap, unsigned long)
                  : lng == 3 ? (uint64_t)va_arg(ap, size_t) : (uint64_t)va_arg(ap, unsigned);
            }
            do { tmp[--n] = "0123456789abcdef"[u % (unsigned)base]; u /= (unsigned)base; } while (u);
            if (neg) tmp[--n] = '-';
            moe__out_field(&o, tmp + n, sizeof tmp - n, width, left, pad);
        } else {
            moe__out_char(&o, conv);   /* "%%", and anything moe.h does not use, verbatim */
        }
    }
    if (cap) o.buf[o.len < cap ? o.len : cap - 1] = 0;
    return o.len;
}

static size_t moe__format(char *buf, size_t cap, const char *fmt, ...) {
    size_t n;
    va_list ap;
    va_start(ap, fmt);
    n = moe__vformat(buf, cap, fmt, ap);
    va_end(ap);
    return n;
}

// >>result ------------------------------------------------------------------
MOEDEF const char *moe_result_string(moe_result result) {
    switch (result) {
#define MOE__RESULT_CASE(name, value, text) case name: return text;
    MOE_RESULT_LIST(MOE__RESULT_CASE)
#undef MOE__RESULT_CASE
    default: return "unknown result";
    }
}

MOEDEF const char *moe_version(void) { return MOE_VERSION_STRING; }

static const char *moe__result_name(moe_result result) {
    switch (result) {
#define MOE__RESULT_NAME(name, value, text) case name: return #name;
    MOE_RESULT_LIST(MOE__RESULT_NAME)
#undef MOE__RESULT_NAME
    default: return "MOE_ERR_?";
    }
}

/* Record an error in the context (text + log callback) and return its code. */
static moe_result moe__fail(moe_ctx *ctx, moe_result code, const char *fmt, ...) {
    if (ctx) {
        va_list ap;
        size_t n = moe__format(ctx->error, sizeof ctx->error, "%s: ", moe__result_name(code));
        if (n >= sizeof ctx->error) n = 0;
        va_start(ap, fmt);
        moe__vformat(ctx->error + n, sizeof ctx->error - n, fmt, ap);
        va_end(ap);
        if (ctx->log) ctx->log(MOE_LOG_ERROR, ctx->error, ctx->log_user);
    }
    return code;
}

#if !defined(MOE_NO_STDIO) || !defined(MOE_NO_TRAINING)
/* Re-raise the context's last error with "prefix: " in front of its text (e.g. a file name). */
static moe_result moe__fail_prefix(moe_ctx *ctx, moe_result code, const char *prefix) {
    char msg[sizeof ctx->error];
    const char *rest = strstr(ctx->error, ": ");
    moe__strlcpy(msg, rest ? rest + 2 : ctx->error, sizeof msg);
    return moe__fail(ctx, code, "%s: %s", prefix, msg);
}
#endif

#define MOE__TRY(expr) do { moe_result moe__r = (expr); if (moe__r != MOE_OK) return moe__r; } while (0)

// >>ctx ---------------------------------------------------------------------
static int moe__have_avx2(void);

MOEDEF moe_result moe_ctx_init(moe_ctx *ctx, const moe_ctx_desc *desc) {
    moe_ctx_desc d;
    if (!ctx) return MOE_ERR_INVALID_ARGUMENT;
    memset(&d, 0, sizeof d);
    if (desc) d = *desc;
    memset(ctx, 0, sizeof *ctx);
    if ((d.allocator.alloc == NULL) != (d.allocator.free == NULL))
        return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "allocator needs both alloc and free, or neither");
    if (d.n_threads < 0) return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "n_threads is %d", d.n_threads);
    if ((int)d.kernels < 0 || d.kernels >= MOE_KERNELS_COUNT)
        return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "unknown kernels %d", (int)d.kernels);
    if (d.kernels == MOE_KERNELS_AVX2 && !moe__have_avx2())
        return moe__fail(ctx, MOE_ERR_UNSUPPORTED, "MOE_KERNELS_AVX2: this CPU or build has no AVX2+FMA kernels");
#ifdef _OPENMP
    ctx->n_threads = d.n_threads ? d.n_threads : omp_get_max_threads();
#else
    ctx->n_threads = 1;
#endif
    if (ctx->n_threads < 1) ctx->n_threads = 1;
    ctx->seed = d.seed;
    ctx->allocator = d.allocator;
    ctx->log = d.log;
    ctx->log_user = d.log_user;
    ctx->kernels = d.kernels;
    return MOE_OK;
}

MOEDEF const char *moe_ctx_error(const moe_ctx *ctx) { return ctx ? ctx->error : ""; }

// >>memory ------------------------------------------------------------------
/* 64-byte aligned allocation through the context's allocator; the raw pointer sits just below. */
static void *moe__malloc(moe_ctx *ctx, size_t size) {
    size_t total;
    void *raw;
    uintptr_t p;
    if (size > SIZE_MAX - MOE__ALIGN - sizeof(void *)) return NULL;
    total = size + MOE__ALIGN + sizeof(void *);
    raw = ctx->allocator.alloc ? ctx->allocator.alloc(total, ctx->allocator.user)
                               : MOE_MALLOC(total, ctx->allocator.user);
    if (!raw) return NULL;
    p = ((uintptr_t)raw + sizeof(void *) + MOE__ALIGN - 1) & ~(uintptr_t)(MOE__ALIGN - 1);
    ((void **)p)[-1] = raw;
    return (void *)p;
}

static void moe__free(moe_ctx *ctx, void *ptr) {
    void *raw;
    if (!ptr) return;
    raw = ((void **)ptr)[-1];
    if (ctx->allocator.free) ctx->allocator.free(raw, ctx->allocator.user);
    else MOE_FREE(raw, ctx->allocator.user);
}

static void *moe__calloc(moe_ctx *ctx, size_t size) {
    void *p = moe__malloc(ctx, size);
    if (p) memset(p, 0, size);
    return p;
}

/* Bump carving of one block: a sizing pass with base == NULL, then the real pass. */
typedef struct moe__carver {
    char *base;
    size_t used;
    int overflow;
} moe__carver;

static void *moe__carve(moe__carver *c, size_t count, size_t elem) {
    size_t bytes, at;
    if (elem && count > (SIZE_MAX / 2) / elem) { c->overflow = 1; return NULL; }
    bytes = (count * elem + MOE__ALIGN - 1) & ~(size_t)(MOE__ALIGN - 1);
    at = c->used;
    if (bytes > SIZE_MAX / 2 - at) { c->overflow = 1; return NULL; }
    c->used += bytes;
    return c->base ? c->base + at : NULL;
}

#define MOE__CARVE(c, type, count) ((type *)moe__carve((c), (size_t)(count), sizeof(type)))

// >>rng ---------------------------------------------------------------------
static uint64_t moe__mix64(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

MOEDEF uint64_t moe_rng_u64(uint64_t seed, uint64_t stream, uint64_t counter) {
    return moe__mix64(moe__mix64(moe__mix64(seed) ^ stream) ^ counter);
}

MOEDEF float moe_rng_uniform(uint64_t seed, uint64_t stream, uint64_t counter) {
    return (float)(moe_rng_u64(seed, stream, counter) >> 40) * (1.0f / 16777216.0f);
}

/* Box-Muller on two 24-bit uniforms taken from one 64-bit draw. */
MOEDEF float moe_rng_normal(uint64_t seed, uint64_t stream, uint64_t counter) {
    uint64_t r = moe_rng_u64(seed, stream, counter);
    double u1 = ((double)(r >> 40) + 1.0) * (1.0 / 16777216.0);  /* (0, 1] */
    double u2 = (double)((r >> 16) & 0xFFFFFF) * (1.0 / 16777216.0);
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

/* Stream ids: what the numbers are for, which layer, which step. */
enum { MOE__STREAM_INIT = 1, MOE__STREAM_NOISE = 2, MOE__STREAM_JITTER = 3 };
static uint64_t moe__stream(int purpose, int64_t index, int64_t step) {
    return ((uint64_t)purpose << 56) ^ ((uint64_t)index << 40) ^ (uint64_t)step;
}

// >>util --------------------------------------------------------------------
static int64_t moe__min64(int64_t a, int64_t b) { return a < b ? a : b; }
static int64_t moe__max64(int64_t a, int64_t b) { return a > b ? a : b; }

static int moe__finite(float v) { return v == v && v - v == 0.0f; }

static int moe__all_finite(const float *x, int64_t n) {
    int64_t i;
    float acc = 0.0f;
    for (i = 0; i < n; i++) acc += x[i] * 0.0f;  /* NaN or Inf anywhere makes acc NaN */
    return acc == 0.0f;
}


// >>gemm --------------------------------------------------------------------
/* The one matrix-multiply entry point. Three layouts cover every product of the
   MoE layer (W is [out, in] as in torch.nn.Linear):
     MOE__NT  C[i,j] = sum_k A(i,k) B(j,k)   forward          y  = x  W^T
     MOE__NN  C[i,j] = sum_k A(i,k) B(k,j)   input gradient   dx = dy W
     MOE__TN  C[i,j] = sum_k A(k,i) B(k,j)   weight gradient  dW = dy^T x
   Any operand row may be read through an index (rows != NULL), so experts read
   their tokens through the routing permutation without a gathered copy. A SwiGLU pair
   (pair = 1, MOE__NT) multiplies A by two weights at once: B into C and B2 into C2,
   interleaved in every packed panel so the epilogue sees z1 and z3 of the same element.
   When a block of C is complete the epilogue (moe__epi) runs on it while it is in cache.
   Each C element is summed over k in blocks of MOE__KC in increasing k, whatever the
   tiling or thread count: results are bitwise reproducible. */
typedef enum moe__gemm_op { MOE__NT, MOE__NN, MOE__TN } moe__gemm_op;

/* Elementwise work on a finished block; out/in buffers share C's layout (ldc). */
typedef enum moe__epi {
    MOE__EPI_NONE,
    MOE__EPI_ACT,          /* out0 = act(C)                                   a  = act(z)          */
    MOE__EPI_SWIGLU,       /* out0 = silu(C) * C2                             a  = silu(z1) * z3   */
    MOE__EPI_ACT_GRAD,     /* C *= act'(in0)                                  dz = da * act'(z)    */
    MOE__EPI_SWIGLU_GRAD,  /* out0 = C * in1 * silu'(in0); out1 = C * silu(in0)   dz1, dz3 from da */
    MOE__EPI_GEGLU,        /* out0 = gelu(C) * C2                             a  = gelu(z1) * z3   */
    MOE__EPI_GEGLU_GRAD    /* out0 = C * in1 * gelu'(in0); out1 = C * gelu(in0)   dz1, dz3 from da */
} moe__epi;

typedef struct moe__mat {
    const float *data;
    int64_t ld;                 /* elements between rows */
    const int32_t *rows;        /* NULL: row r is data + r*ld; else data + rows[r]*ld */
    /* reduced-precision weights (B of MOE__NT only; data is NULL): bf16, or int8 times
       scale[r * groups + k / 32] */
    const uint16_t *bf16;
    const int8_t *q8;
    const float *scale;
    int64_t groups;
} moe__mat;

typedef struct moe__gemm {
    moe__gemm_op op;
    int64_t M, N, K;
    moe__mat A, B, B2;          /* B2: the second weight of a pair */
    const float *Bp;            /* MOE__NT: B (and B2) already packed, full-depth panels, or NULL */
    float *C, *C2;
    int64_t ldc;
    int accumulate;             /* C += product; else C = product */
    int pair;
    const float *bias, *bias2;  /* [N] added to every row (bias2: to C2), or NULL */
    moe__epi epi;
    moe_activation act;
    float *out0, *out1;
    const float *in0, *in1;
    int c_transient;            /* only the epilogue's outputs are kept: C (and C2) may stay in a per-tile scratch */
} moe__gemm;

/* C[MR, NR] (+)= A panel x B panel over kc; columns 0..NR/2 go to lo, NR/2..NR to hi. */
typedef void (*moe__micro_fn)(int64_t kc, const float *A, const float *B, float *lo, float *hi, int64_t ldc, int accumulate);

/* dst[k * ld + i] = src[i][k] for i < n, zeros for n <= i < W: packing's transposing copy. */
typedef void (*moe__pack_fn)(const float *const *src, int64_t n, int64_t W, int64_t ld, int64_t kc, float *dst);
/* The straight copy of packing, into panels of W columns, kc rows each, row by row of the source:
   dst[q W kc + k W + j] = src[k][c0 + q W + j] while q W + j < n, zeros to the last panel's end */
typedef void (*moe__pack_n_fn)(const float *const *src, int64_t c0, int64_t n, int64_t W, int64_t kc, float *dst);
/* a[j] = silu(z1[j]) * z3[j] */
typedef void (*moe__swiglu_fn)(const float *z1, const float *z3, float *a, int64_t n);
/* its gradient: dz1 = da z3 silu'(z1), dz3 = da silu(z1) */
typedef void (*moe__swiglu_grad_fn)(const float *da, const float *z1, const float *z3, float *dz1, float *dz3, int64_t n);
struct moe__mat;
/* out[r] = row j of W . x[r] for r < m (the decode path) */
typedef void (*moe__dot_fn)(const struct moe__mat *W, int64_t j, const float *const *x, int m, int64_t K, float *out);
/* out[r] = row j of int8 W . x[r], x[r] in int16 with one scale per group of MOE__QGROUP
   (moe__quant_row, scales xs[r]): exact integer sums per group, each times its two scales (the
   decode path of int8 weights) */
typedef void (*moe__dot_q8_fn)(const struct moe__mat *W, int64_t j, const int16_t *const *xq, const float *const *xs, int m, int64_t K, float *out);
/* out[r] = row j of bf16 W . (xh[r] + xl[r]), x[r] split into two bf16 halves (moe__split_bf16) */
typedef void (*moe__dot_bf16_fn)(const struct moe__mat *W, int64_t j, const uint16_t *const *xh, const uint16_t *const *xl, int m, int64_t K, float *out);
/* y[j] += a x[j]: a multiply, then an add (the bits of the plain loop, which C99 compiles uncontracted) */
typedef void (*moe__axpy_fn)(float *y, float a, const float *x, int64_t n);
/* returns sum_j g[j] o[j]; d[j] = a g[j] */
typedef float (*moe__gate_grad_fn)(const float *g, const float *o, float a, float *d, int64_t n);

typedef struct moe__kernel {
    moe__micro_fn micro;
    moe__pack_fn pack_t;
    moe__pack_n_fn pack_n;
    moe__swiglu_fn swiglu;
    moe__swiglu_grad_fn swiglu_grad;
    moe__dot_fn dot;
    moe__swiglu_fn geglu;       /* a[j] = gelu(z1[j]) * z3[j] */
    moe__swiglu_grad_fn geglu_grad;
    moe__axpy_fn axpy;
    moe__gate_grad_fn gate_grad;
    int mr, nr;
    const char *name;
    moe__dot_q8_fn dot_q8;
    moe__dot_bf16_fn dot_bf16;  /* NULL: bf16 weights take dot with f32 activations */
    /* Grows the table by a whole cache line (16 + 48 bytes) over its earlier size. Grown by 16, 32
       or 48 bytes, f32 decode ran 8-16% slower in bench_moe on the test CPU (alternating runs):
       what mattered was moe_layer's size modulo 64, i.e. where the heap objects allocated after
       it fall (48 bytes at the end of moe_layer did as well as here), not the input's alignment
       (copying the input rows to aligned rows did not help); which object it is, is not known.
       Measured again with the 8-lane decode dot: 3-9% slower with 16, 32 or 48 bytes less. */
    void *reserved[6];
} moe__kernel;

/* Execution resources: threads, per-thread packing scratch, the kernel for this CPU. */
typedef struct moe__exec {
    moe_ctx *ctx;
    int n_threads;
    float *scratch;             /* n_threads * moe__scratch_floats(a_rows) floats */
    int64_t a_rows;             /* rows of A one thread packs at once (moe__scratch_rows) */
    moe__kernel kernel;         /* chosen once from the CPU's features (moe__exec_init) */
} moe__exec;

#define MOE__KC 256             /* depth of a packed block */
#define MOE__NB 512             /* packed B columns per block (a pair: 256 of each weight) */
#define MOE__MR_MAX 12
#define MOE__NR_MAX 32
#define MOE__MB_MAX (64 * MOE__MR_MAX)   /* rows of A packed at once: a whole tile of the grouped schedule */

/* Packing scratch of one thread that packs up to a_rows rows of A at once. */
static size_t moe__scratch_floats(int64_t a_rows) {
    return (size_t)(MOE__KC * MOE__NB + a_rows * MOE__KC + MOE__MR_MAX * MOE__NR_MAX + MOE__NR_MAX * MOE__KC);
}

static float moe__sigmoid(float z);
static float moe__act(moe_activation act, float z);
static float moe__act_grad(moe_activation act, float z);

static moe__mat moe__mat_of(const float *data, int64_t ld) {
    moe__mat m;
    memset(&m, 0, sizeof m);
    m.data = data; m.ld = ld;
    return m;
}

static const float *moe__row(const moe__mat *m, int64_t r) {
    return m->data + (m->rows ? (int64_t)m->rows[r] : r) * m->ld;
}

#define MOE__QGROUP 32          /* int8 weights: one scale per this many weights of a row */

static float moe__bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Round to nearest even; NaN stays NaN. */
static uint16_t moe__float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* Elements k0..k0+n of row r of a matrix of any precision, as floats. */
static void moe__mat_load(const moe__mat *m, int64_t r, int64_t k0, int64_t n, float *dst) {
    int64_t k;
    if (m->bf16) {
        const uint16_t *src = m->bf16 + r * m->ld + k0;
        for (k = 0; k < n; k++) dst[k] = moe__bf16_to_float(src[k]);
    } else if (m->q8) {
        const int8_t *src = m->q8 + r * m->ld;
        const float *sc = m->scale + r * m->groups;
        for (k = k0; k < k0 + n; k++) dst[k - k0] = (float)src[k] * sc[k / MOE__QGROUP];
    } else {
        memcpy(dst, moe__row(m, r) + k0, (size_t)n * sizeof(float));
    }
}

static moe__mat moe__mat_rows(const float *data, int64_t ld, const int32_t *rows) {
    moe__mat m = moe__mat_of(data, ld);
    m.rows = rows;
    return m;
}


static moe__gemm moe__gemm_make(moe__gemm_op op, int64_t M, int64_t N, int64_t K, moe__mat A, moe__mat B,
                                float *C, int64_t ldc, int accumulate, const float *bias) {
    moe__gemm g;
    memset(&g, 0, sizeof g);
    g.op = op; g.M = M; g.N = N; g.K = K; g.A = A; g.B = B;
    g.C = C; g.ldc = ldc; g.accumulate = accumulate; g.bias = bias;
    return g;
}

static moe__kernel moe__kernel_generic(void);

static void moe__swiglu_rows(const float *z1, const float *z3, float *a, int64_t n) {
    int64_t j;
    for (j = 0; j < n; j++) a[j] = z1[j] * moe__sigmoid(z1[j]) * z3[j];
}

static void moe__swiglu_grad_rows(const float *da, const float *z1, const float *z3, float *dz1, float *dz3, int64_t n) {
    int64_t j;
    for (j = 0; j < n; j++) {
        float s = moe__sigmoid(z1[j]);
        dz1[j] = da[j] * z3[j] * s * (1.0f + z1[j] * (1.0f - s));
        dz3[j] = da[j] * z1[j] * s;
    }
}

static void moe__geglu_rows(const float *z1, const float *z3, float *a, int64_t n) {
    int64_t j;
    for (j = 0; j < n; j++) a[j] = moe__act(MOE_ACT_GELU, z1[j]) * z3[j];
}

static void moe__geglu_grad_rows(const float *da, const float *z1, const float *z3, float *dz1, float *dz3, int64_t n) {
    int64_t j;
    for (j = 0; j < n; j++) {
        dz1[j] = da[j] * z3[j] * moe__act_grad(MOE_ACT_GELU, z1[j]);
        dz3[j] = da[j] * moe__act(MOE_ACT_GELU, z1[j]);
    }
}

/* Bias, then the epilogue, on rows r0..r1 and columns c0..c1 of a finished C whose element
   (r0, c0) is at c (of C2 at c2), rows cld apart: C itself, or a tile's scratch. */
static void moe__gemm_finish_at(const moe__gemm *g, const moe__kernel *kn, int64_t r0, int64_t r1, int64_t c0, int64_t c1, float *c,
                                float *c2, int64_t cld) {
    int64_t i, j, ld = g->ldc, n = c1 - c0;
    for (i = r0; i < r1; i++, c += cld, c2 = c2 ? c2 + cld : NULL) {
        const float *in0 = g->in0 ? g->in0 + i * ld + c0 : NULL, *in1 = g->in1 ? g->in1 + i * ld + c0 : NULL;
        float *out0 = g->out0 ? g->out0 + i * ld + c0 : NULL, *out1 = g->out1 ? g->out1 + i * ld + c0 : NULL;
        if (g->bias) for (j = 0; j < n; j++) c[j] += g->bias[c0 + j];
        if (c2 && g->bias2) for (j = 0; j < n; j++) c2[j] += g->bias2[c0 + j];
        switch (g->epi) {
        case MOE__EPI_ACT:
            for (j = 0; j < n; j++) out0[j] = moe__act(g->act, c[j]);
            break;
        case MOE__EPI_SWIGLU: kn->swiglu(c, c2, out0, n); break;
        case MOE__EPI_ACT_GRAD:
            for (j = 0; j < n; j++) c[j] *= moe__act_grad(g->act, in0[j]);
            break;
        case MOE__EPI_SWIGLU_GRAD: kn->swiglu_grad(c, in0, in1, out0, out1, n); break;
        case MOE__EPI_GEGLU: kn->geglu(c, c2, out0, n); break;
        case MOE__EPI_GEGLU_GRAD: kn->geglu_grad(c, in0, in1, out0, out1, n); break;
        default: break;
        }
    }
}

static void moe__gemm_finish(const moe__gemm *g, const moe__kernel *kn, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
    moe__gemm_finish_at(g, kn, r0, r1, c0, c1, g->C + r0 * g->ldc + c0, g->pair ? g->C2 + r0 * g->ldc + c0 : NULL, g->ldc);
}

/* Plain twin: obviously correct, used by MOE_KERNELS_REFERENCE and the tests. */
static void moe__gemm_block_reference(const moe__gemm *g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
    int64_t i, j, k;
    int half;
    for (half = 0; half <= g->pair; half++) {
        const moe__mat *B = half ? &g->B2 : &g->B;
        float *C = half ? g->C2 : g->C;
        for (i = m0; i < m1; i++) {
            for (j = n0; j < n1; j++) {
                float s = 0.0f;
                for (k = 0; k < g->K; k++) {
                    float a = g->op == MOE__TN ? moe__row(&g->A, k)[i] : moe__row(&g->A, i)[k];
                    float b;
                    if (g->op == MOE__NT) moe__mat_load(B, j, k, 1, &b);
                    else b = moe__row(B, k)[j];
                    s += a * b;
                }
                if (g->accumulate) s += C[i * g->ldc + j];
                C[i * g->ldc + j] = s;
            }
        }
    }
    {
        moe__kernel plain = moe__kernel_generic();
        moe__gemm_finish(g, &plain, m0, m1, n0, n1);
    }
}

/* dst[k * ld + i] = src[i][k] for n rows, zeros for rows n..W: the transposing copy of packing,
   k outer so the stores are contiguous and each source line stays in L1. */
static void moe__pack_t(const float *const *src, int64_t n, int64_t W, int64_t ld, int64_t kc, float *MOE__RESTRICT dst) {
    int64_t k, i;
    for (k = 0; k < kc; k++) {
        float *d = dst + k * ld;
        for (i = 0; i < n; i++) d[i] = src[i][k];
        for (; i < W; i++) d[i] = 0.0f;
    }
}

static void moe__pack_n(const float *const *src, int64_t c0, int64_t n, int64_t W, int64_t kc, float *MOE__RESTRICT dst) {
    int64_t k, q, j;
    for (k = 0; k < kc; k++) {
        const float *s = src[k] + c0;
        for (q = 0; q < n; q += W) {
            float *d = dst + q * kc + k * W;
            int64_t m = moe__min64(W, n - q);
            for (j = 0; j < m; j++) d[j] = s[q + j];
            for (; j < W; j++) d[j] = 0.0f;
        }
    }
}

/* Row pointers of kc rows of m from row r0 on. */
static void moe__row_ptrs(const moe__mat *m, int64_t r0, int64_t kc, const float **dst) {
    int64_t k;
    for (k = 0; k < kc; k++) dst[k] = moe__row(m, r0 + k);
}

/* Pack A(m0.., kb..) into MR-row panels: panel p holds kc rows of MR values. */
static void moe__pack_a(const moe__kernel *kn, const moe__gemm *g, int64_t MR, int64_t m0, int64_t mc, int64_t kb, int64_t kc, float *MOE__RESTRICT ap) {
    const float *src[MOE__KC];
    int64_t p, i;
    if (g->op == MOE__TN) {  /* every panel row by row: each source row is read once, in order */
        moe__row_ptrs(&g->A, kb, kc, src);
        kn->pack_n(src, m0, mc, MR, kc, ap);
        return;
    }
    for (p = 0; p < mc; p += MR) {
        int64_t mr = moe__min64(MR, mc - p);
        for (i = 0; i < mr; i++) src[i] = moe__row(&g->A, m0 + p + i) + kb;
        kn->pack_t(src, mr, MR, MR, kc, ap + p * kc);
    }
}

/* Columns j0..j0+w of B (or B2) into columns 0..w of an NR-wide panel of kc rows, zeros up to W. */
static void moe__pack_b_cols(const moe__kernel *kn, const moe__gemm *g, const moe__mat *B, int64_t NR, int64_t W, int64_t j0, int64_t w, int64_t kb,
                             int64_t kc, float *MOE__RESTRICT dst, float *rowbuf) {
    const float *src[MOE__KC > MOE__NR_MAX ? MOE__KC : MOE__NR_MAX];
    int64_t j;
    if (g->op == MOE__NT && !B->data) {
        for (j = 0; j < w; j++) {
            moe__mat_load(B, j0 + j, kb, kc, rowbuf + j * kc);
            src[j] = rowbuf + j * kc;
        }
        kn->pack_t(src, w, W, NR, kc, dst);
    } else if (g->op == MOE__NT) {
        for (j = 0; j < w; j++) src[j] = moe__row(B, j0 + j) + kb;
        kn->pack_t(src, w, W, NR, kc, dst);
    } else {  /* W == NR: no pairs here */
        moe__row_ptrs(B, kb, kc, src);
        kn->pack_n(src, j0, w, W, kc, dst);
    }
}

/* Pack B for columns n0..n0+nc into panels of PW columns (a pair: PW of B, then PW of B2), panel
   q at bp + q * pstride (NR * kc in the scratch, as the straight copies of MOE__NN and MOE__TN always
   lay it; NR * K for the full-depth panels of moe_layer_pack). */
static void moe__pack_b(const moe__kernel *kn, const moe__gemm *g, int64_t NR, int64_t PW, int64_t n0, int64_t nc, int64_t kb, int64_t kc,
                        float *MOE__RESTRICT bp, int64_t pstride, float *rowbuf) {
    int64_t p;
    if (g->op != MOE__NT) {  /* every panel row by row, as in moe__pack_a */
        const float *src[MOE__KC];
        moe__row_ptrs(&g->B, kb, kc, src);
        kn->pack_n(src, n0, nc, NR, kc, bp);
        return;
    }
    for (p = 0; p < nc; p += PW) {
        int64_t w = moe__min64(PW, nc - p);
        float *dst = bp + (p / PW) * pstride;
        moe__pack_b_cols(kn, g, &g->B, NR, PW, n0 + p, w, kb, kc, dst, rowbuf);
        if (g->pair) moe__pack_b_cols(kn, g, &g->B2, NR, PW, n0 + p, w, kb, kc, dst + PW, rowbuf);
    }
}

/* A partial micro-tile (mr rows, wlo + whi columns) through a full-size temporary. */
static void moe__micro_edge(const moe__kernel *kn, int64_t kc, const float *A, const float *B, float *lo, float *hi, int64_t ldc,
                            int accumulate, int64_t mr, int64_t wlo, int64_t whi, float *tmp) {
    int64_t NR = kn->nr, half = NR / 2, i, j;
    for (i = 0; i < kn->mr; i++)
        for (j = 0; j < NR; j++) {
            int in_lo = j < half && j < wlo, in_hi = j >= half && j - half < whi;
            tmp[i * NR + j] = (accumulate && i < mr && (in_lo || in_hi)) ? (j < half ? lo[i * ldc + j] : hi[i * ldc + j - half]) : 0.0f;
        }
    kn->micro(kc, A, B, tmp, tmp + half, NR, accumulate);
    for (i = 0; i < mr; i++) {
        for (j = 0; j < wlo; j++) lo[i * ldc + j] = tmp[i * NR + j];
        for (j = 0; j < whi; j++) hi[i * ldc + j] = tmp[i * NR + half + j];
    }
}

#if defined(__GNUC__) || defined(__clang__)
#define MOE__PREFETCH_W(p) __builtin_prefetch((p), 1, 3)
#define MOE__PREFETCH_R(p) __builtin_prefetch((p), 0, 3)
#else
#define MOE__PREFETCH_W(p) (void)(p)
#define MOE__PREFETCH_R(p) (void)(p)
#endif

/* The C rows a micro-kernel is about to add into, requested for writing as it starts: the load at
   its end then finds them in cache instead of waiting on memory (a weight gradient's C comes from
   DRAM every time; measured: 2-5% more of peak for the whole training step). */
static void moe__prefetch_tile(const float *lo, const float *hi, int64_t mr, int64_t ldc) {
    int64_t i;
    for (i = 0; i < mr; i++) {
        MOE__PREFETCH_W(lo + i * ldc);
        MOE__PREFETCH_W(hi + i * ldc);
    }
}

/* The epilogue's operands of rows r..r+mr, columns c..c+w (ldc apart), requested as the tile's last
   product starts, so the epilogue that follows finds them in cache: saved activations it reads
   (in0, in1) and rows it writes (out0, out1) are each one or two lines per row, scattered over
   rows that no hardware prefetcher follows. */
static void moe__prefetch_epi(const moe__gemm *g, int64_t r, int64_t mr, int64_t c, int64_t w) {
    int64_t i, ld = g->ldc, off, last = w - 1;
    for (i = 0; i < mr; i++) {
        off = (r + i) * ld + c;
        if (g->in0) { MOE__PREFETCH_R(g->in0 + off); MOE__PREFETCH_R(g->in0 + off + last); }
        if (g->in1) { MOE__PREFETCH_R(g->in1 + off); MOE__PREFETCH_R(g->in1 + off + last); }
        if (g->out0) { MOE__PREFETCH_W(g->out0 + off); MOE__PREFETCH_W(g->out0 + off + last); }
        if (g->out1) { MOE__PREFETCH_W(g->out1 + off); MOE__PREFETCH_W(g->out1 + off + last); }
    }
}

/* Loop order: for each row block (up to MOE__MB_MAX rows) and each depth block, A is packed once
   and serves every column block of the call, so a call over many columns packs A once; B is packed
   per (column block, depth block) into L2 and its panels stream past an A panel held in L1. */
static void moe__gemm_block_fast(const moe__exec *ex, const moe__gemm *g, int64_t m0, int64_t m1, int64_t n0, int64_t n1, float *scratch) {
    const moe__kernel *kn = &ex->kernel;
    int64_t MR = kn->mr, NR = kn->nr, half = NR / 2, PW = g->pair ? half : NR;
    int64_t NB = g->pair ? MOE__NB / 2 : MOE__NB, MB = (ex->a_rows / MR) * MR, ldc = g->ldc;
    float *bp = scratch, *ap = scratch + MOE__KC * MOE__NB, *tmp = ap + ex->a_rows * MOE__KC, *rowbuf = tmp + MOE__MR_MAX * MOE__NR_MAX;
    int64_t nb, kb, mb, ip, jp, i, j;
    int prepacked = g->Bp != NULL && n0 % PW == 0;
    /* One depth block and only the epilogue's output kept: each micro-tile's C goes to a scratch
       tile in L1 (partial tiles too: the panels are zero-padded), and C is never written. */
    int transient = g->c_transient && g->epi != MOE__EPI_NONE && !g->accumulate && g->K <= MOE__KC;
    if (g->K == 0) {
        int half_i;
        for (half_i = 0; half_i <= g->pair; half_i++)
            for (i = m0; i < m1; i++)
                for (j = n0; j < n1; j++) {
                    float *c = (half_i ? g->C2 : g->C) + i * ldc + j;
                    if (!g->accumulate) *c = 0.0f;
                }
        moe__gemm_finish(g, kn, m0, m1, n0, n1);
        return;
    }
    for (mb = m0; mb < m1; mb += MB) {
        int64_t mc = moe__min64(MB, m1 - mb);
        for (kb = 0; kb < g->K; kb += MOE__KC) {
            int64_t kc = moe__min64(MOE__KC, g->K - kb);
            int accumulate = kb > 0 || g->accumulate, last = kb + kc >= g->K;
            moe__pack_a(kn, g, MR, mb, mc, kb, kc, ap);
            for (nb = n0; nb < n1; nb += NB) {
                int64_t nc = moe__min64(NB, n1 - nb);
                if (!prepacked) moe__pack_b(kn, g, NR, PW, nb, nc, kb, kc, bp, NR * kc, rowbuf);
                for (ip = 0; ip < mc; ip += MR) {
                    int64_t mr = moe__min64(MR, mc - ip), row = mb + ip;
                    for (jp = 0; jp < nc; jp += PW) {
                        int64_t w = moe__min64(PW, nc - jp), col = nb + jp;
                        float *lo = g->C + row * ldc + col, *hi = g->pair ? g->C2 + row * ldc + col : lo + half;
                        const float *a = ap + ip * kc;
                        const float *b = prepacked ? g->Bp + ((nb + jp) / PW) * NR * g->K + kb * NR : bp + (jp / PW) * NR * kc;
                        if (last && g->epi != MOE__EPI_NONE) moe__prefetch_epi(g, row, mr, col, w);
                        if (transient) {
                            kn->micro(kc, a, b, tmp, tmp + half, NR, 0);
                            moe__gemm_finish_at(g, kn, row, row + mr, col, col + w, tmp, g->pair ? tmp + half : NULL, NR);
                            continue;
                        }
                        if (mr == MR && w == PW) {
                            if (accumulate) moe__prefetch_tile(lo, hi, MR, ldc);
                            kn->micro(kc, a, b, lo, hi, ldc, accumulate);
                        }
                        else if (g->pair)
                            moe__micro_edge(kn, kc, a, b, lo, hi, ldc, accumulate, mr, w, w, tmp);
                        else
                            moe__micro_edge(kn, kc, a, b, lo, hi, ldc, accumulate, mr, moe__min64(w, half), moe__max64(0, w - half), tmp);
                        if (last) moe__gemm_finish(g, kn, row, row + mr, col, col + w);
                    }
                }
            }
        }
    }
}

/* One block of C on the calling thread. */
static void moe__gemm_block(const moe__exec *ex, const moe__gemm *g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
    if (m1 <= m0 || n1 <= n0) return;
    if (ex->ctx->kernels == MOE_KERNELS_REFERENCE)
        moe__gemm_block_reference(g, m0, m1, n0, n1);
    else
        moe__gemm_block_fast(ex, g, m0, m1, n0, n1, ex->scratch + (size_t)MOE__THREAD_ID() * moe__scratch_floats(ex->a_rows));
}

/* Columns per scheduled block: one packed block. */
static int64_t moe__gemm_cols(const moe__gemm *g) { return g->pair ? MOE__NB / 2 : MOE__NB; }

/* A whole product, tiled over the threads. */
static void moe__gemm_run(const moe__exec *ex, const moe__gemm *g) {
    int64_t rows = 4 * (int64_t)ex->kernel.mr, cols = moe__gemm_cols(g);
    int64_t tm = (g->M + rows - 1) / rows, tn = (g->N + cols - 1) / cols;
    int64_t n = tm * tn, t;
    if (g->M <= 0 || g->N <= 0) return;
    MOE__PARALLEL_FOR_DYNAMIC(ex->n_threads, (double)g->M * (double)g->N * (double)g->K)
    for (t = 0; t < n; t++) {
        int64_t m0 = (t / tn) * rows, n0 = (t % tn) * cols;
        moe__gemm_block(ex, g, m0, moe__min64(m0 + rows, g->M), n0, moe__min64(n0 + cols, g->N));
    }
}

/* Micro-kernels: plain C (GCC/Clang vector extensions where available), AVX2+FMA, AVX-512. */
#if (defined(__GNUC__) || defined(__clang__)) && !defined(MOE_NO_VECTOR_EXTENSIONS)
typedef float moe__v8 __attribute__((vector_size(32)));
static void moe__micro_generic(int64_t kc, const float *MOE__RESTRICT A, const float *MOE__RESTRICT B, float *lo, float *hi,
                               int64_t ldc, int accumulate) {
    moe__v8 c[4][2], b[2], t;
    int64_t k;
    int i;
    memset(c, 0, sizeof c);
    for (k = 0; k < kc; k++) {
        const float *a = A + k * 4;
        memcpy(b, B + k * 16, sizeof b);
        for (i = 0; i < 4; i++) { c[i][0] += a[i] * b[0]; c[i][1] += a[i] * b[1]; }
    }
    for (i = 0; i < 4; i++) {
        if (accumulate) {
            memcpy(&t, lo + i * ldc, sizeof t); c[i][0] += t;
            memcpy(&t, hi + i * ldc, sizeof t); c[i][1] += t;
        }
        memcpy(lo + i * ldc, &c[i][0], sizeof t);
        memcpy(hi + i * ldc, &c[i][1], sizeof t);
    }
}
#else
static void moe__micro_generic(int64_t kc, const float *MOE__RESTRICT A, const float *MOE__RESTRICT B, float *lo, float *hi,
                               int64_t ldc, int accumulate) {
    float acc[4][16];
    int64_t k, i, j;
    for (i = 0; i < 4; i++)
        for (j = 0; j < 16; j++) acc[i][j] = 0.0f;
    for (k = 0; k < kc; k++)
        for (i = 0; i < 4; i++)
            for (j = 0; j < 16; j++) acc[i][j] += A[k * 4 + i] * B[k * 16 + j];
    for (i = 0; i < 4; i++)
        for (j = 0; j < 16; j++) {
            float *c = j < 8 ? lo + i * ldc + j : hi + i * ldc + j - 8;
            *c = accumulate ? *c + acc[i][j] : acc[i][j];
        }
}
#endif

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__)) && !defined(MOE_NO_VECTOR_EXTENSIONS)
#define MOE__HAVE_X86_DISPATCH 1
#include <immintrin.h>
/* The compilers that know AVX512-VNNI (GCC 8, clang 6) and AVX512_BF16 (GCC 10, clang 9) */
#if defined(__clang__)
#if __clang_major__ >= 6
#define MOE__HAVE_VNNI 1
#endif
#if __clang_major__ >= 9
#define MOE__HAVE_AVX512BF16 1
#endif
#else
#if __GNUC__ >= 8
#define MOE__HAVE_VNNI 1
#endif
#if __GNUC__ >= 10
#define MOE__HAVE_AVX512BF16 1
#endif
#endif

/* One register-blocked micro-kernel per instruction set: ROWS(X) lists its MR rows, V is the
   vector type of W floats (NR = 2W), P the intrinsic prefix. Accumulators stay in registers. */
#define MOE__VCAT(a, b) a##b
#define MOE__VCAT2(a, b) MOE__VCAT(a, b)
#define MOE__VOP(op) MOE__VCAT2(MOE__P, op)
#define MOE__MICRO_DECL(i) MOE__V c##i##l = MOE__VOP(_setzero_ps)(), c##i##h = MOE__VOP(_setzero_ps)();
#define MOE__MICRO_FMA(i) { MOE__V ai = MOE__VOP(_set1_ps)(a[i]); c##i##l = MOE__VOP(_fmadd_ps)(ai, b0, c##i##l); c##i##h = MOE__VOP(_fmadd_ps)(ai, b1, c##i##h); }
#define MOE__MICRO_STORE(i)                                                                           \
    if (accumulate) { c##i##l = MOE__VOP(_add_ps)(c##i##l, MOE__VOP(_loadu_ps)(lo + i * ldc));                      \
                      c##i##h = MOE__VOP(_add_ps)(c##i##h, MOE__VOP(_loadu_ps)(hi + i * ldc)); }                    \
    MOE__VOP(_storeu_ps)(lo + i * ldc, c##i##l); MOE__VOP(_storeu_ps)(hi + i * ldc, c##i##h);
#define MOE__MICRO_BODY(ROWS, MR, W)                                                                  \
    int64_t k;                                                                                        \
    ROWS(MOE__MICRO_DECL)                                                                             \
    for (k = 0; k < kc; k++) {                                                                        \
        const float *a = A + k * (MR);                                                                \
        MOE__V b0 = MOE__VOP(_loadu_ps)(B + k * 2 * (W)), b1 = MOE__VOP(_loadu_ps)(B + k * 2 * (W) + (W));               \
        ROWS(MOE__MICRO_FMA)                                                                          \
    }                                                                                                 \
    ROWS(MOE__MICRO_STORE)

#define MOE__ROWS6(X) X(0) X(1) X(2) X(3) X(4) X(5)
#define MOE__ROWS12(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)

#define MOE__DEFINE_MICRO(name, isa, ROWS, MR, W)                                                    \
    __attribute__((target(isa))) static void name(int64_t kc, const float *MOE__RESTRICT A,           \
                                                  const float *MOE__RESTRICT B, float *lo, float *hi, \
                                                  int64_t ldc, int accumulate) {                      \
        MOE__MICRO_BODY(ROWS, MR, W)                                                                  \
    }

/* 6 x 16: 12 accumulators in ymm registers; 12 x 32: 24 accumulators in zmm registers. */
#define MOE__V __m256
#define MOE__P _mm256
MOE__DEFINE_MICRO(moe__micro_avx2, "avx2,fma", MOE__ROWS6, 6, 8)
#undef MOE__V
#undef MOE__P
#define MOE__V __m512
#define MOE__P _mm512
MOE__DEFINE_MICRO(moe__micro_avx512, "avx512f", MOE__ROWS12, 12, 16)
#undef MOE__V
#undef MOE__P

static uint32_t moe__lanes(int64_t n) { return n >= 16 ? 0xFFFFu : n <= 0 ? 0u : (1u << n) - 1u; }

/* moe__pack_n with masked 16-wide copies. */
__attribute__((target("avx512f")))
static void moe__pack_n_avx512(const float *const *src, int64_t c0, int64_t n, int64_t W, int64_t kc, float *dst) {
    int64_t k, q, j;
    for (k = 0; k < kc; k++) {
        const float *s = src[k] + c0;
        for (q = 0; q < n; q += W) {
            float *d = dst + q * kc + k * W;
            for (j = 0; j < W; j += 16)
                _mm512_mask_storeu_ps(d + j, (__mmask16)moe__lanes(W - j), _mm512_maskz_loadu_ps((__mmask16)moe__lanes(n - q - j), s + q + j));
        }
    }
}

/* The 8 x 8 block r0..r7 (rows) transposed into r0..r7 (columns), in named ymm registers: 24
   shuffles per 64 floats, nothing spilled (a 16 x 16 zmm version through an array ran 2.7 times
   slower on L2-resident data). */
#define MOE__TRANSPOSE8(r0, r1, r2, r3, r4, r5, r6, r7)                                                   \
    {                                                                                                     \
        __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);                          \
        __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);                          \
        __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);                          \
        __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);                          \
        __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);                \
        __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);                \
        __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);                \
        __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);                \
        r0 = _mm256_permute2f128_ps(u0, u4, 0x20); r1 = _mm256_permute2f128_ps(u1, u5, 0x20);             \
        r2 = _mm256_permute2f128_ps(u2, u6, 0x20); r3 = _mm256_permute2f128_ps(u3, u7, 0x20);             \
        r4 = _mm256_permute2f128_ps(u0, u4, 0x31); r5 = _mm256_permute2f128_ps(u1, u5, 0x31);             \
        r6 = _mm256_permute2f128_ps(u2, u6, 0x31); r7 = _mm256_permute2f128_ps(u3, u7, 0x31);             \
    }

/* A whole 8 x 8 block: floats k0..k0+8 of rows s[0..8] into rows 0..8 (ld apart) of d. */
#define MOE__PACK_T8(s, k0, d, ld)                                                                        \
    {                                                                                                     \
        const float *const *s8 = (s);                                                                     \
        float *d8 = (d);                                                                                  \
        __m256 q0 = _mm256_loadu_ps(s8[0] + (k0)), q1 = _mm256_loadu_ps(s8[1] + (k0));                    \
        __m256 q2 = _mm256_loadu_ps(s8[2] + (k0)), q3 = _mm256_loadu_ps(s8[3] + (k0));                    \
        __m256 q4 = _mm256_loadu_ps(s8[4] + (k0)), q5 = _mm256_loadu_ps(s8[5] + (k0));                    \
        __m256 q6 = _mm256_loadu_ps(s8[6] + (k0)), q7 = _mm256_loadu_ps(s8[7] + (k0));                    \
        MOE__TRANSPOSE8(q0, q1, q2, q3, q4, q5, q6, q7)                                                   \
        _mm256_storeu_ps(d8, q0); _mm256_storeu_ps(d8 + (ld), q1);                                        \
        _mm256_storeu_ps(d8 + 2 * (ld), q2); _mm256_storeu_ps(d8 + 3 * (ld), q3);                         \
        _mm256_storeu_ps(d8 + 4 * (ld), q4); _mm256_storeu_ps(d8 + 5 * (ld), q5);                         \
        _mm256_storeu_ps(d8 + 6 * (ld), q6); _mm256_storeu_ps(d8 + 7 * (ld), q7);                         \
    }

/* moe__pack_t in 8 x 8 blocks through registers; partial blocks (fewer rows, a shorter depth, a
   panel narrower than 8) through masks, absent rows as zeros. */
__attribute__((target("avx512f,avx512vl")))
static void moe__pack_t_avx512(const float *const *src, int64_t n, int64_t W, int64_t ld, int64_t kc, float *dst) {
    int64_t i0, k0, k;
    for (i0 = 0; i0 < W; i0 += 8) {
        int64_t rows = moe__min64(moe__max64(n - i0, 0), 8);
        __mmask8 wm = (__mmask8)moe__lanes(W - i0);
        const float *s[8];
        for (k = 0; k < 8; k++) s[k] = src[i0 + (k < rows ? k : 0)];
        for (k0 = 0; k0 < kc; k0 += 8) {
            int64_t kn = moe__min64(8, kc - k0);
            float *d = dst + k0 * ld + i0;
            if (rows == 8 && kn == 8 && wm == 0xFF) {
                MOE__PACK_T8(s, k0, d, ld)
            } else {
                __mmask8 km = (__mmask8)moe__lanes(kn);
                __m256 r0, r1, r2, r3, r4, r5, r6, r7, c[8];
#define MOE__PACK_ROW(i) r##i = rows > i ? _mm256_maskz_loadu_ps(km, s[i] + k0) : _mm256_setzero_ps();
                MOE__PACK_ROW(0) MOE__PACK_ROW(1) MOE__PACK_ROW(2) MOE__PACK_ROW(3) MOE__PACK_ROW(4) MOE__PACK_ROW(5) MOE__PACK_ROW(6) MOE__PACK_ROW(7)
#undef MOE__PACK_ROW
                MOE__TRANSPOSE8(r0, r1, r2, r3, r4, r5, r6, r7)
                c[0] = r0; c[1] = r1; c[2] = r2; c[3] = r3; c[4] = r4; c[5] = r5; c[6] = r6; c[7] = r7;
                for (k = 0; k < kn; k++) _mm256_mask_storeu_ps(d + k * ld, wm, c[k]);
            }
        }
    }
}

/* moe__pack_t for panel columns i0..i1 and depths k0..k1 only. */
static void moe__pack_t_part(const float *const *src, int64_t n, int64_t i0, int64_t i1, int64_t k0, int64_t k1, int64_t ld, float *dst) {
    int64_t k, i;
    for (k = k0; k < k1; k++)
        for (i = i0; i < i1; i++) dst[k * ld + i] = i < n ? src[i][k] : 0.0f;
}

/* moe__pack_t in 8 x 8 blocks through registers where whole; the rest element by element. */
__attribute__((target("avx2,fma")))
static void moe__pack_t_avx2(const float *const *src, int64_t n, int64_t W, int64_t ld, int64_t kc, float *dst) {
    int64_t i0, k0 = 0;
    for (i0 = 0; i0 < W; i0 += 8) {
        int64_t i1 = moe__min64(i0 + 8, W);
        if (i1 - i0 < 8 || n - i0 < 8) {
            moe__pack_t_part(src, n, i0, i1, 0, kc, ld, dst);
            continue;
        }
        for (k0 = 0; k0 + 8 <= kc; k0 += 8) {
            MOE__PACK_T8(src + i0, k0, dst + k0 * ld + i0, ld)
        }
        moe__pack_t_part(src, n, i0, i1, k0, kc, ld, dst);
    }
}

/* The shared part of e^x: x clamped to [-87, 88], n = round(x / ln2), r = x - n ln2 (|r| <= ln2 / 2),
   p = e^r by the degree-6 Taylor polynomial in Horner form (relative error about 2e-7); the caller
   scales p by 2^n. PFX is the intrinsics' prefix (_mm512, _mm256), ROUND its round-to-integer. */
#define MOE__EXP_CORE(PFX, ROUND, x, n, r, p)                                                             \
    x = PFX##_max_ps(PFX##_min_ps(x, PFX##_set1_ps(88.0f)), PFX##_set1_ps(-87.0f));                       \
    n = ROUND(PFX##_mul_ps(x, PFX##_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); \
    r = PFX##_fnmadd_ps(n, PFX##_set1_ps(0.693147180559945309f), x);                                      \
    p = PFX##_set1_ps(1.0f / 720.0f);                                                                     \
    p = PFX##_fmadd_ps(p, r, PFX##_set1_ps(1.0f / 120.0f));                                               \
    p = PFX##_fmadd_ps(p, r, PFX##_set1_ps(1.0f / 24.0f));                                                \
    p = PFX##_fmadd_ps(p, r, PFX##_set1_ps(1.0f / 6.0f));                                                 \
    p = PFX##_fmadd_ps(p, r, PFX##_set1_ps(0.5f));                                                        \
    p = PFX##_fmadd_ps(p, r, PFX##_set1_ps(1.0f));                                                        \
    p = PFX##_fmadd_ps(p, r, PFX##_set1_ps(1.0f));

/* e^x for x in [-87, 88]: 2^n * p(r), |r| <= ln2 / 2, degree-6 Taylor-like polynomial
   (relative error about 2e-7); inputs outside are clamped. */
__attribute__((target("avx512f")))
static __m512 moe__exp_avx512(__m512 x) {
    __m512 n, r, p;
    MOE__EXP_CORE(_mm512, _mm512_roundscale_ps, x, n, r, p)
    return _mm512_scalef_ps(p, n);
}

__attribute__((target("avx512f")))
static __m512 moe__sigmoid_avx512(__m512 x) {
    __m512 one = _mm512_set1_ps(1.0f);
    return _mm512_div_ps(one, _mm512_add_ps(one, moe__exp_avx512(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

/* The Chebyshev coefficients of Numerical Recipes' erfcc, highest power first. */
static const float moe__erfc_fit[10] = {0.17087277f, -0.82215223f, 1.48851587f, -1.13520398f, 0.27886807f,
                                        -0.18628806f, 0.09678418f, 0.37409196f, 1.00002368f, -1.26551223f};

/* Phi(z) = 0.5 erfc(-z / sqrt 2), erfc(u) = t exp(P(t) - u^2), t = 1 / (1 + u / 2): the Chebyshev fit of
   Numerical Recipes' erfcc (relative error below 1.2e-7 for every u >= 0). */
__attribute__((target("avx512f")))
static __m512 moe__phi_avx512(__m512 z) {
    const float *c = moe__erfc_fit;
    __m512 one = _mm512_set1_ps(1.0f), half = _mm512_set1_ps(0.5f);
    __m512 u = _mm512_mul_ps(_mm512_abs_ps(z), _mm512_set1_ps(0.70710678118654752f));
    __m512 t = _mm512_div_ps(one, _mm512_fmadd_ps(half, u, one)), p = _mm512_set1_ps(c[0]), q;
    int i;
    for (i = 1; i < 10; i++) p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(c[i]));
    q = _mm512_mul_ps(half, _mm512_mul_ps(t, moe__exp_avx512(_mm512_fnmadd_ps(u, u, p))));  /* Phi(-|z|) */
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_GE_OQ), q, _mm512_sub_ps(one, q));
}

/* a = z1 * s(z1) * z3 with s = sigmoid (SwiGLU: silu) or Phi (GeGLU: gelu) */
__attribute__((target("avx512f")))
static void moe__glu_avx512(const float *z1, const float *z3, float *a, int64_t n, int gelu) {
    int64_t j;
    for (j = 0; j < n; j += 16) {
        __mmask16 m = (__mmask16)moe__lanes(n - j);
        __m512 x = _mm512_maskz_loadu_ps(m, z1 + j), y = _mm512_maskz_loadu_ps(m, z3 + j);
        _mm512_mask_storeu_ps(a + j, m, _mm512_mul_ps(_mm512_mul_ps(x, gelu ? moe__phi_avx512(x) : moe__sigmoid_avx512(x)), y));
    }
}

/* moe__swiglu_SFX and moe__geglu_SFX: the kernel-table entries over moe__glu_SFX */
#define MOE__GLU_ENTRIES(SFX, ISA)                                                                        \
    __attribute__((target(ISA))) static void moe__swiglu_##SFX(const float *z1, const float *z3, float *a, int64_t n) { \
        moe__glu_##SFX(z1, z3, a, n, 0);                                                                  \
    }                                                                                                     \
    __attribute__((target(ISA))) static void moe__geglu_##SFX(const float *z1, const float *z3, float *a, int64_t n) { \
        moe__glu_##SFX(z1, z3, a, n, 1);                                                                  \
    }
MOE__GLU_ENTRIES(avx512, "avx512f")

__attribute__((target("avx512f")))
static void moe__swiglu_grad_avx512(const float *da, const float *z1, const float *z3, float *dz1, float *dz3, int64_t n) {
    __m512 one = _mm512_set1_ps(1.0f);
    int64_t j;
    for (j = 0; j < n; j += 16) {
        __mmask16 m = (__mmask16)moe__lanes(n - j);
        __m512 g = _mm512_maskz_loadu_ps(m, da + j), x = _mm512_maskz_loadu_ps(m, z1 + j), y = _mm512_maskz_loadu_ps(m, z3 + j);
        __m512 s = moe__sigmoid_avx512(x), gs = _mm512_mul_ps(g, s);
        __m512 d1 = _mm512_mul_ps(_mm512_mul_ps(gs, y), _mm512_add_ps(one, _mm512_mul_ps(x, _mm512_sub_ps(one, s))));
        _mm512_mask_storeu_ps(dz1 + j, m, d1);
        _mm512_mask_storeu_ps(dz3 + j, m, _mm512_mul_ps(gs, x));
    }
}

/* gelu'(z) = Phi(z) + z phi(z), phi(z) = exp(-z^2 / 2) / sqrt(2 pi) */
__attribute__((target("avx512f")))
static void moe__geglu_grad_avx512(const float *da, const float *z1, const float *z3, float *dz1, float *dz3, int64_t n) {
    int64_t j;
    for (j = 0; j < n; j += 16) {
        __mmask16 m = (__mmask16)moe__lanes(n - j);
        __m512 g = _mm512_maskz_loadu_ps(m, da + j), x = _mm512_maskz_loadu_ps(m, z1 + j), y = _mm512_maskz_loadu_ps(m, z3 + j);
        __m512 P = moe__phi_avx512(x), gp = _mm512_mul_ps(g, P);
        __m512 pdf = _mm512_mul_ps(_mm512_set1_ps(0.39894228040143268f), moe__exp_avx512(_mm512_mul_ps(_mm512_set1_ps(-0.5f), _mm512_mul_ps(x, x))));
        _mm512_mask_storeu_ps(dz1 + j, m, _mm512_mul_ps(_mm512_mul_ps(g, y), _mm512_fmadd_ps(x, pdf, P)));
        _mm512_mask_storeu_ps(dz3 + j, m, _mm512_mul_ps(gp, x));
    }
}
#endif

/* Few tokens (inference, T <= MOE__DECODE_TOKENS): every expert's rows against each weight row
   in turn, so each needed weight is read once; threads split the weight rows. */
#define MOE__DECODE_TOKENS 8
#define MOE__DECODE_ROWS 32     /* weight rows per decode tile: one group of quantized activations */
#if MOE__DECODE_ROWS != MOE__QGROUP
#error "a decode tile's outputs must be one group of the next stage's quantized input"
#endif

/* out[r] = sum_k W(j, k) x_r[k] for r < m, in 16 interleaved partial sums over k. */
static void moe__axpy(float *MOE__RESTRICT y, float a, const float *MOE__RESTRICT x, int64_t n) {
    int64_t j;
    for (j = 0; j < n; j++) y[j] += a * x[j];
}

static float moe__gate_grad(const float *g, const float *o, float a, float *MOE__RESTRICT d, int64_t n) {
    float acc = 0.0f;
    int64_t j;
    for (j = 0; j < n; j++) { acc += g[j] * o[j]; d[j] = a * g[j]; }
    return acc;
}

static void moe__dot_rows(const moe__mat *W, int64_t j, const float *const *x, int m, int64_t K, float *out) {
    float w[256], acc[MOE__DECODE_TOKENS][16];
    int64_t k0, k;
    int r, q;
    memset(acc, 0, sizeof acc);
    for (k0 = 0; k0 < K; k0 += 256) {
        int64_t n = moe__min64(256, K - k0);
        moe__mat_load(W, j, k0, n, w);
        for (r = 0; r < m; r++)
            for (k = 0; k < n; k++) acc[r][k % 16] += w[k] * x[r][k0 + k];
    }
    for (r = 0; r < m; r++) {
        float s = 0.0f;
        for (q = 0; q < 16; q++) s += acc[r][q];
        out[r] = s;
    }
}

/* x[0..n) (one group, n <= MOE__QGROUP) in int16: q = x 32767 / max|x|, rounded half away from
   zero (an error of at most 1/65534 of the group's largest, next to int8 weights' 1/254); returns
   the scale max|x| / 32767. A NaN becomes 0; an infinity makes the scale infinite (the dot NaN). */
static float moe__quant_group(const float *x, int64_t n, int16_t *q) {
    float amax = 0.0f, inv;
    int64_t k;
    for (k = 0; k < n; k++) amax = fabsf(x[k]) > amax ? fabsf(x[k]) : amax;
    inv = amax > 0.0f && amax <= FLT_MAX ? 32767.0f / amax : 0.0f;
    for (k = 0; k < n; k++) {
        float v = x[k] * inv;
        int32_t i = v >= 0.0f ? (int32_t)(v + 0.5f) : v < 0.0f ? -(int32_t)(0.5f - v) : 0;
        q[k] = (int16_t)(i > 32767 ? 32767 : i < -32767 ? -32767 : i);
    }
    return amax / 32767.0f;
}

/* A row of K activations, group by group (scales s[K / MOE__QGROUP rounded up]). */
static void moe__quant_row(const float *x, int64_t K, int16_t *q, float *s) {
    int64_t k0;
    for (k0 = 0; k0 < K; k0 += MOE__QGROUP) s[k0 / MOE__QGROUP] = moe__quant_group(x + k0, moe__min64(MOE__QGROUP, K - k0), q + k0);
}

/* One group's products summed, exact in 32 bits: 32 127 32767 < 2^31. */
static int32_t moe__q8_group_sum(const int8_t *w, const int16_t *x, int64_t n) {
    int32_t s = 0;
    int64_t k;
    for (k = 0; k < n; k++) s += (int32_t)w[k] * x[k];
    return s;
}

static void moe__dot_q8(const moe__mat *W, int64_t j, const int16_t *const *xq, const float *const *xs, int m, int64_t K, float *out) {
    const int8_t *w = W->q8 + j * W->ld;
    const float *sw = W->scale + j * W->groups;
    int r;
    for (r = 0; r < m; r++) {
        float acc = 0.0f;
        int64_t k0;
        for (k0 = 0; k0 < K; k0 += MOE__QGROUP)
            acc += (float)moe__q8_group_sum(w + k0, xq[r] + k0, moe__min64(MOE__QGROUP, K - k0)) * (sw[k0 / MOE__QGROUP] * xs[r][k0 / MOE__QGROUP]);
        out[r] = acc;
    }
}

/* x = hi + lo + (an error below 2^-16 |x|): hi = bf16(x), lo = bf16(x - hi), both rounded to
   nearest even. Against bf16 weights the two products are exact in f32, so a dot over the halves
   has f32 activations' accuracy (an infinite x gives a NaN lo, and a NaN dot). */
static void moe__split_bf16(const float *x, int64_t n, uint16_t *hi, uint16_t *lo) {
    int64_t k;
    for (k = 0; k < n; k++) {
        hi[k] = moe__float_to_bf16(x[k]);
        lo[k] = moe__float_to_bf16(x[k] - moe__bf16_to_float(hi[k]));
    }
}

#ifdef MOE__HAVE_X86_DISPATCH
/* ROWS(LOAD) on row j of W, with w (and sc) set for W's encoding: bf16, int8 (with its scales) or f32. */
#define MOE__DOT_ENCODINGS(ROWS, LOAD_BF16, LOAD_Q8, LOAD_F32)                                        \
    if (W->bf16) {                                                                                    \
        const uint16_t *w = W->bf16 + j * W->ld;                                                      \
        ROWS(LOAD_BF16)                                                                               \
    } else if (W->q8) {                                                                               \
        const int8_t *w = W->q8 + j * W->ld;                                                          \
        const float *sc = W->scale + j * W->groups;                                                   \
        ROWS(LOAD_Q8)                                                                                 \
    } else {                                                                                          \
        const float *w = moe__row(W, j);                                                              \
        ROWS(LOAD_F32)                                                                                \
    }

__attribute__((target("avx512f")))
static void moe__axpy_avx512(float *y, float a, const float *x, int64_t n) {
    __m512 va = _mm512_set1_ps(a);
    int64_t j;
    for (j = 0; j < n; j += 16) {
        __mmask16 m = (__mmask16)moe__lanes(n - j);
        _mm512_mask_storeu_ps(y + j, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, y + j), _mm512_mul_ps(va, _mm512_maskz_loadu_ps(m, x + j))));
    }
}

/* The sum in 16 lanes, then reduced: other bits than the plain loop's, the same for any threads. */
__attribute__((target("avx512f")))
static float moe__gate_grad_avx512(const float *g, const float *o, float a, float *d, int64_t n) {
    __m512 va = _mm512_set1_ps(a), acc = _mm512_setzero_ps();
    int64_t j;
    for (j = 0; j < n; j += 16) {
        __mmask16 m = (__mmask16)moe__lanes(n - j);
        __m512 vg = _mm512_maskz_loadu_ps(m, g + j);
        acc = _mm512_fmadd_ps(vg, _mm512_maskz_loadu_ps(m, o + j), acc);
        _mm512_mask_storeu_ps(d + j, m, _mm512_mul_ps(va, vg));
    }
    return _mm512_reduce_add_ps(acc);
}

#ifdef MOE__HAVE_VNNI
/* AVX512-VNNI: a group (32 weights, widened to 16 bits) per register, vpdpwssd summing pairs of
   products exactly into 16 lanes; each group's lanes times its two scales, into two accumulators
   by turns. Tokens two at a time, each group of weights loaded once for both (a row is read from
   memory at the pace of one pass, not of one pass per token); an odd last token alone. */
#define MOE__VNNI_LOADW(g, n)                                                                         \
    __mmask32 gm = (n) >= 32 ? ~(__mmask32)0 : ((__mmask32)1 << (n)) - 1;                             \
    __m512i vw = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(gm, w + (g) * MOE__QGROUP));
#define MOE__VNNI_TOKEN(g, t, acc)                                                                    \
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpwssd_epi32(_mm512_setzero_si512(),               \
                                                                 _mm512_maskz_loadu_epi16(gm, xq[t] + (g) * MOE__QGROUP), vw)), \
                          _mm512_set1_ps(sw[g] * xs[t][g]), acc);
#define MOE__VNNI_GROUP(g, n, acc) { MOE__VNNI_LOADW(g, n) MOE__VNNI_TOKEN(g, r, acc) }
#define MOE__VNNI_GROUP2(g, n, acc, bcc) { MOE__VNNI_LOADW(g, n) MOE__VNNI_TOKEN(g, r, acc) MOE__VNNI_TOKEN(g, r + 1, bcc) }

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
static void moe__dot_q8_vnni(const moe__mat *W, int64_t j, const int16_t *const *xq, const float *const *xs, int m, int64_t K, float *out) {
    const int8_t *w = W->q8 + j * W->ld;
    const float *sw = W->scale + j * W->groups;
    int64_t G = K / MOE__QGROUP, g;
    int r;
    for (r = 0; r + 2 <= m; r += 2) {
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
        for (g = 0; g + 2 <= G; g += 2) {
            MOE__VNNI_GROUP2(g, 32, a0, b0)
            MOE__VNNI_GROUP2(g + 1, 32, a1, b1)
        }
        for (; g * MOE__QGROUP < K; g++) MOE__VNNI_GROUP2(g, moe__min64(32, K - g * MOE__QGROUP), a0, b0)
        out[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
        out[r + 1] = _mm512_reduce_add_ps(_mm512_add_ps(b0, b1));
    }
    if (r < m) {
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        for (g = 0; g + 2 <= G; g += 2) {
            MOE__VNNI_GROUP(g, 32, a0)
            MOE__VNNI_GROUP(g + 1, 32, a1)
        }
        for (; g * MOE__QGROUP < K; g++) MOE__VNNI_GROUP(g, moe__min64(32, K - g * MOE__QGROUP), a0)
        out[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    }
}

#endif

#endif

#ifdef MOE__HAVE_X86_DISPATCH
/* AVX2+FMA twins of the vector kernels above (CPUs without AVX-512): 8 lanes, tails through
   maskload/maskstore, whose masked lanes read as zeros and are not written. */
__attribute__((target("avx2")))
static __m256i moe__mask8(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)moe__min64(moe__max64(n, 0), 8)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* e^x as moe__exp_avx512: the same clamp and polynomial; 2^n through the exponent bits */
__attribute__((target("avx2,fma")))
static __m256 moe__exp_avx2(__m256 x) {
    __m256 n, r, p;
    MOE__EXP_CORE(_mm256, _mm256_round_ps, x, n, r, p)
    /* n in [-126, 127]: 2^n is the float with biased exponent n + 127 */
    return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23)));
}

__attribute__((target("avx2,fma")))
static __m256 moe__sigmoid_avx2(__m256 x) {
    __m256 one = _mm256_set1_ps(1.0f);
    return _mm256_div_ps(one, _mm256_add_ps(one, moe__exp_avx2(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}

/* Phi(z) as moe__phi_avx512 */
__attribute__((target("avx2,fma")))
static __m256 moe__phi_avx2(__m256 z) {
    const float *c = moe__erfc_fit;
    __m256 one = _mm256_set1_ps(1.0f), half = _mm256_set1_ps(0.5f);
    __m256 u = _mm256_mul_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), z), _mm256_set1_ps(0.70710678118654752f));
    __m256 t = _mm256_div_ps(one, _mm256_fmadd_ps(half, u, one)), p = _mm256_set1_ps(c[0]), q;
    int i;
    for (i = 1; i < 10; i++) p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(c[i]));
    q = _mm256_mul_ps(half, _mm256_mul_ps(t, moe__exp_avx2(_mm256_fnmadd_ps(u, u, p))));  /* Phi(-|z|) */
    return _mm256_blendv_ps(q, _mm256_sub_ps(one, q), _mm256_cmp_ps(z, _mm256_setzero_ps(), _CMP_GE_OQ));
}

/* a = z1 * s(z1) * z3 with s = sigmoid (SwiGLU: silu) or Phi (GeGLU: gelu) */
__attribute__((target("avx2,fma")))
static void moe__glu_avx2(const float *z1, const float *z3, float *a, int64_t n, int gelu) {
    int64_t j;
    for (j = 0; j < n; j += 8) {
        __m256i m = moe__mask8(n - j);
        __m256 x = _mm256_maskload_ps(z1 + j, m), y = _mm256_maskload_ps(z3 + j, m);
        _mm256_maskstore_ps(a + j, m, _mm256_mul_ps(_mm256_mul_ps(x, gelu ? moe__phi_avx2(x) : moe__sigmoid_avx2(x)), y));
    }
}

MOE__GLU_ENTRIES(avx2, "avx2,fma")

/* gelu'(z) = Phi(z) + z phi(z), as moe__geglu_grad_avx512 */
__attribute__((target("avx2,fma")))
static void moe__geglu_grad_avx2(const float *da, const float *z1, const float *z3, float *dz1, float *dz3, int64_t n) {
    int64_t j;
    for (j = 0; j < n; j += 8) {
        __m256i m = moe__mask8(n - j);
        __m256 g = _mm256_maskload_ps(da + j, m), x = _mm256_maskload_ps(z1 + j, m), y = _mm256_maskload_ps(z3 + j, m);
        __m256 P = moe__phi_avx2(x), pdf = _mm256_mul_ps(_mm256_set1_ps(0.39894228040143268f), moe__exp_avx2(_mm256_mul_ps(_mm256_set1_ps(-0.5f), _mm256_mul_ps(x, x))));
        _mm256_maskstore_ps(dz1 + j, m, _mm256_mul_ps(_mm256_mul_ps(g, y), _mm256_fmadd_ps(x, pdf, P)));
        _mm256_maskstore_ps(dz3 + j, m, _mm256_mul_ps(_mm256_mul_ps(g, P), x));
    }
}

__attribute__((target("avx2,fma")))
static void moe__swiglu_grad_avx2(const float *da, const float *z1, const float *z3, float *dz1, float *dz3, int64_t n) {
    __m256 one = _mm256_set1_ps(1.0f);
    int64_t j;
    for (j = 0; j < n; j += 8) {
        __m256i m = moe__mask8(n - j);
        __m256 g = _mm256_maskload_ps(da + j, m), x = _mm256_maskload_ps(z1 + j, m), y = _mm256_maskload_ps(z3 + j, m);
        __m256 sg = moe__sigmoid_avx2(x), gs = _mm256_mul_ps(g, sg);
        __m256 d1 = _mm256_mul_ps(_mm256_mul_ps(gs, y), _mm256_add_ps(one, _mm256_mul_ps(x, _mm256_sub_ps(one, sg))));
        _mm256_maskstore_ps(dz1 + j, m, d1);
        _mm256_maskstore_ps(dz3 + j, m, _mm256_mul_ps(gs, x));
    }
}

__attribute__((target("avx2")))
static void moe__axpy_avx2(float *y, float a, const float *x, int64_t n) {
    __m256 va = _mm256_set1_ps(a);
    int64_t j;
    for (j = 0; j < n; j += 8) {
        __m256i m = moe__mask8(n - j);
        _mm256_maskstore_ps(y + j, m, _mm256_add_ps(_mm256_maskload_ps(y + j, m), _mm256_mul_ps(va, _mm256_maskload_ps(x + j, m))));
    }
}

__attribute__((target("avx2")))
static float moe__hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* The sum in 8 lanes, then reduced (as moe__gate_grad_avx512 in 16). */
__attribute__((target("avx2,fma")))
static float moe__gate_grad_avx2(const float *g, const float *o, float a, float *d, int64_t n) {
    __m256 va = _mm256_set1_ps(a), acc = _mm256_setzero_ps();
    int64_t j;
    for (j = 0; j < n; j += 8) {
        __m256i m = moe__mask8(n - j);
        __m256 vg = _mm256_maskload_ps(g + j, m);
        acc = _mm256_fmadd_ps(vg, _mm256_maskload_ps(o + j, m), acc);
        _mm256_maskstore_ps(d + j, m, _mm256_mul_ps(va, vg));
    }
    return moe__hsum8(acc);
}

/* 8 weights of row w from k0 as floats */
#define MOE__LOAD8_F32(w, k0) _mm256_loadu_ps((const float *)(w) + (k0))
#define MOE__LOAD8_BF16(w, k0) \
    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)(w) + (k0)))), 16))
#define MOE__LOAD8_Q8(w, k0) \
    _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)(w) + (k0))))), \
                  _mm256_set1_ps(sc[(k0) / MOE__QGROUP]))

/* out[r] = w . x[r] over K: four 8-lane accumulators over 32 weights, then one over 8, then the
   last K % 8 weights (tail, already floats) one by one. */
#define MOE__DOT_ROWS8(LOAD)                                                                          \
    for (r = 0; r < m; r++) {                                                                         \
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps(); \
        const float *xr = x[r];                                                                       \
        int64_t k0 = 0;                                                                               \
        float sum;                                                                                    \
        for (; k0 + 32 <= K; k0 += 32) {                                                              \
            a0 = _mm256_fmadd_ps(LOAD(w, k0), _mm256_loadu_ps(xr + k0), a0);                          \
            a1 = _mm256_fmadd_ps(LOAD(w, k0 + 8), _mm256_loadu_ps(xr + k0 + 8), a1);                  \
            a2 = _mm256_fmadd_ps(LOAD(w, k0 + 16), _mm256_loadu_ps(xr + k0 + 16), a2);                \
            a3 = _mm256_fmadd_ps(LOAD(w, k0 + 24), _mm256_loadu_ps(xr + k0 + 24), a3);                \
        }                                                                                             \
        for (; k0 + 8 <= K; k0 += 8) a0 = _mm256_fmadd_ps(LOAD(w, k0), _mm256_loadu_ps(xr + k0), a0); \
        sum = moe__hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));                \
        for (; k0 < K; k0++) sum += tail[k0 - K8] * xr[k0];                                           \
        out[r] = sum;                                                                                 \
    }

__attribute__((target("avx2,fma")))
static void moe__dot_rows_avx2(const moe__mat *W, int64_t j, const float *const *x, int m, int64_t K, float *out) {
    int64_t K8 = K / 8 * 8;
    float tail[8];
    int r;
    if (K8 < K) moe__mat_load(W, j, K8, K - K8, tail);
    MOE__DOT_ENCODINGS(MOE__DOT_ROWS8, MOE__LOAD8_BF16, MOE__LOAD8_Q8, MOE__LOAD8_F32)
}

/* One group (32 weights) per step: weights widened to 16 bits, vpmaddwd summing pairs of products
   exactly; a last group shorter than 32 in plain C. */
__attribute__((target("avx2,fma")))
static void moe__dot_q8_avx2(const moe__mat *W, int64_t j, const int16_t *const *xq, const float *const *xs, int m, int64_t K, float *out) {
    const int8_t *w = W->q8 + j * W->ld;
    const float *sw = W->scale + j * W->groups;
    int64_t K32 = K / 32 * 32, k0;
    int r;
    for (r = 0; r < m; r++) {
        const int16_t *xr = xq[r];
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        float last = 0.0f;
        for (k0 = 0; k0 < K32; k0 += 32) {
            __m256i lo = _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + k0))), _mm256_loadu_si256((const __m256i *)(xr + k0)));
            __m256i hi = _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + k0 + 16))), _mm256_loadu_si256((const __m256i *)(xr + k0 + 16)));
            __m256 p = _mm256_cvtepi32_ps(_mm256_add_epi32(lo, hi)), sc = _mm256_set1_ps(sw[k0 / 32] * xs[r][k0 / 32]);
            if (k0 & 32) a1 = _mm256_fmadd_ps(p, sc, a1);
            else a0 = _mm256_fmadd_ps(p, sc, a0);
        }
        if (K32 < K) last = (float)moe__q8_group_sum(w + K32, xr + K32, K - K32) * (sw[K32 / 32] * xs[r][K32 / 32]);
        out[r] = moe__hsum8(_mm256_add_ps(a0, a1)) + last;
    }
}

#ifdef MOE__HAVE_AVX512BF16
/* AVX512_BF16: vdpbf16ps sums pairs of bf16 products (exact in f32) into the lanes, the high and
   low halves of the activations into their own accumulators. Tokens two at a time as
   moe__dot_q8_vnni, 32 weights a step in 16 lanes; an odd last token alone, 16 weights a load in 8
   lanes (AVX512VL): for one token, 256-bit loads ran 4-11% faster than 512-bit ones on Zen 4 (as
   the f32 dot), while two tokens a weight load keep the wider registers (6% faster at 8 tokens). */
#define MOE__BF16_LOAD(p, k0, km) ((__m512bh)_mm512_maskz_loadu_epi16((km), (p) + (k0)))
#define MOE__BF16_TOKEN(t, k0, km, vw, hi, lo) \
    hi = _mm512_dpbf16_ps(hi, MOE__BF16_LOAD(xh[t], k0, km), vw); lo = _mm512_dpbf16_ps(lo, MOE__BF16_LOAD(xl[t], k0, km), vw);
#define MOE__BF16_LOAD8(p, k0, km) ((__m256bh)_mm256_maskz_loadu_epi16((km), (p) + (k0)))
#define MOE__BF16_TOKEN8(k0, km, vw, hi, lo) \
    hi = _mm256_dpbf16_ps(hi, MOE__BF16_LOAD8(xh[r], k0, km), vw); lo = _mm256_dpbf16_ps(lo, MOE__BF16_LOAD8(xl[r], k0, km), vw);

__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
static void moe__dot_bf16_avx512(const moe__mat *W, int64_t j, const uint16_t *const *xh, const uint16_t *const *xl, int m, int64_t K, float *out) {
    const uint16_t *w = W->bf16 + j * W->ld;
    const __mmask32 all = ~(__mmask32)0;
    const __mmask16 all8 = (__mmask16)0xFFFF;
    int64_t k0;
    int r;
    for (r = 0; r + 2 <= m; r += 2) {
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
        for (k0 = 0; k0 < K; k0 += 32) {
            int64_t n = moe__min64(32, K - k0);
            __mmask32 km = n == 32 ? all : ((__mmask32)1 << n) - 1;
            __m512bh vw = MOE__BF16_LOAD(w, k0, km);
            MOE__BF16_TOKEN(r, k0, km, vw, a0, a1)
            MOE__BF16_TOKEN(r + 1, k0, km, vw, b0, b1)
        }
        out[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
        out[r + 1] = _mm512_reduce_add_ps(_mm512_add_ps(b0, b1));
    }
    if (r < m) {
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
        for (k0 = 0; k0 + 32 <= K; k0 += 32) {
            __m256bh w0 = MOE__BF16_LOAD8(w, k0, all8), w1 = MOE__BF16_LOAD8(w, k0 + 16, all8);
            MOE__BF16_TOKEN8(k0, all8, w0, a0, a1)
            MOE__BF16_TOKEN8(k0 + 16, all8, w1, a2, a3)
        }
        for (; k0 < K; k0 += 16) {
            int64_t n = moe__min64(16, K - k0);
            __mmask16 km = n == 16 ? all8 : (__mmask16)((1u << n) - 1);
            __m256bh vw = MOE__BF16_LOAD8(w, k0, km);
            MOE__BF16_TOKEN8(k0, km, vw, a0, a1)
        }
        out[r] = moe__hsum8(_mm256_add_ps(_mm256_add_ps(a0, a2), _mm256_add_ps(a1, a3)));
    }
}
#endif
#endif

static moe__kernel moe__kernel_make(moe__micro_fn micro, int mr, int nr, const char *name) {
    moe__kernel k;
    k.micro = micro; k.pack_t = moe__pack_t; k.pack_n = moe__pack_n; k.swiglu = moe__swiglu_rows; k.swiglu_grad = moe__swiglu_grad_rows; k.dot = moe__dot_rows;
    k.dot_q8 = moe__dot_q8; k.dot_bf16 = NULL; k.geglu = moe__geglu_rows; k.geglu_grad = moe__geglu_grad_rows; k.axpy = moe__axpy; k.gate_grad = moe__gate_grad;
    k.mr = mr; k.nr = nr; k.name = name;
    return k;
}

static moe__kernel moe__kernel_generic(void) { return moe__kernel_make(moe__micro_generic, 4, 16, "generic"); }

#ifdef MOE__HAVE_X86_DISPATCH
/* The vector functions every x86 family has, named moe__<op>_SFX. Both families take the 8-lane
   f32 / widening decode dot: memory-bound, it ran 4-15% faster than a 16-lane loop on an AVX-512
   CPU (Zen 4; with software prefetch too, and at any alignment of the activations). */
#define MOE__VECTOR_OPS(k, SFX)                                                                           \
    k.pack_t = moe__pack_t_##SFX; k.swiglu = moe__swiglu_##SFX; k.swiglu_grad = moe__swiglu_grad_##SFX;   \
    k.geglu = moe__geglu_##SFX; k.geglu_grad = moe__geglu_grad_##SFX; k.dot = moe__dot_rows_avx2;         \
    k.axpy = moe__axpy_##SFX; k.gate_grad = moe__gate_grad_##SFX; k.dot_q8 = moe__dot_q8_avx2;

static moe__kernel moe__kernel_avx2(void) {
    moe__kernel k = moe__kernel_make(moe__micro_avx2, 6, 16, "avx2");
    MOE__VECTOR_OPS(k, avx2)
    return k;
}

static moe__kernel moe__kernel_avx512(void) {
    moe__kernel k = moe__kernel_make(moe__micro_avx512, 12, 32, "avx512");
    MOE__VECTOR_OPS(k, avx512)
    k.pack_n = moe__pack_n_avx512;
    __builtin_cpu_init();
#ifdef MOE__HAVE_VNNI
    if (__builtin_cpu_supports("avx512vnni")) k.dot_q8 = moe__dot_q8_vnni;
#endif
#ifdef MOE__HAVE_AVX512BF16
    if (__builtin_cpu_supports("avx512bf16")) k.dot_bf16 = moe__dot_bf16_avx512;
#endif
    return k;
}
#endif

/* Whether this CPU and build run the AVX2+FMA kernels. */
static int moe__have_avx2(void) {
#ifdef MOE__HAVE_X86_DISPATCH
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

/* The fastest kernel this CPU runs. */
static moe__kernel moe__kernel_select(void) {
#ifdef MOE__HAVE_X86_DISPATCH
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
        return moe__kernel_avx512();
    if (moe__have_avx2()) return moe__kernel_avx2();
#endif
    return moe__kernel_generic();
}

/* The kernel a context asks for (moe_ctx_init has checked that this CPU runs it). */
static moe__kernel moe__kernel_for(moe_kernels kernels) {
#ifdef MOE__HAVE_X86_DISPATCH
    if (kernels == MOE_KERNELS_AVX2) return moe__kernel_avx2();
#endif
    if (kernels == MOE_KERNELS_PORTABLE) return moe__kernel_generic();
    return moe__kernel_select();
}

MOEDEF const char *moe_ctx_kernels(const moe_ctx *ctx) {
    if (!ctx) return "";
    return ctx->kernels == MOE_KERNELS_REFERENCE ? "reference" : moe__kernel_for(ctx->kernels).name;
}

static void moe__exec_init(moe__exec *ex, moe_ctx *ctx, float *scratch, int64_t a_rows) {
    ex->ctx = ctx;
    ex->n_threads = ctx->n_threads;
    ex->scratch = scratch;
    ex->a_rows = a_rows;
    ex->kernel = moe__kernel_for(ctx->kernels);
}

// >>ops ---------------------------------------------------------------------
static float moe__sigmoid(float z) {
    if (z >= 0.0f) return 1.0f / (1.0f + expf(-z));
    {
        float e = expf(z);
        return e / (1.0f + e);
    }
}

static float moe__softplus(float z) { return z > 20.0f ? z : log1pf(expf(z)); }

static float moe__act(moe_activation act, float z) {
    switch (act) {
    case MOE_ACT_RELU: return z > 0.0f ? z : 0.0f;
    case MOE_ACT_GELU: return 0.5f * z * (1.0f + erff(z * 0.70710678118654752f));
    case MOE_ACT_SILU: return z * moe__sigmoid(z);
    case MOE_ACT_TANH: return tanhf(z);
    case MOE_ACT_SIGMOID: return moe__sigmoid(z);
    default: return z;
    }
}

/* d act / dz at z */
static float moe__act_grad(moe_activation act, float z) {
    switch (act) {
    case MOE_ACT_RELU: return z > 0.0f ? 1.0f : 0.0f;
    case MOE_ACT_GELU:
        return 0.5f * (1.0f + erff(z * 0.70710678118654752f)) + z * 0.39894228040143268f * expf(-0.5f * z * z);
    case MOE_ACT_SILU: {
        float s = moe__sigmoid(z);
        return s * (1.0f + z * (1.0f - s));
    }
    case MOE_ACT_TANH: {
        float t = tanhf(z);
        return 1.0f - t * t;
    }
    case MOE_ACT_SIGMOID: {
        float s = moe__sigmoid(z);
        return s * (1.0f - s);
    }
    default: return 1.0f;
    }
}

/* y[i] = act(z[i]) for rows r0..r1 of width n */
static void moe__act_rows(moe_activation act, const float *z, float *y, int64_t n) {
    int64_t i;
    if (act == MOE_ACT_IDENTITY) {
        if (y != z) memcpy(y, z, (size_t)n * sizeof(float));
        return;
    }
    for (i = 0; i < n; i++) y[i] = moe__act(act, z[i]);
}

/* In place: softmax of one row; returns logsumexp. */
static float moe__softmax_row(const float *x, float *p, int64_t n) {
    float m = -FLT_MAX, s = 0.0f;
    int64_t i;
    for (i = 0; i < n; i++) m = x[i] > m ? x[i] : m;
    for (i = 0; i < n; i++) { p[i] = expf(x[i] - m); s += p[i]; }
    for (i = 0; i < n; i++) p[i] /= s;
    return m + logf(s);
}

/* Standard normal CDF and density. */
static float moe__phi_cdf(float z) { return 0.5f * erfcf(-z * 0.70710678118654752f); }
#ifndef MOE_NO_TRAINING
static float moe__phi_pdf(float z) { return 0.39894228040143268f * expf(-0.5f * z * z); }

/* Column sums: out[j] += sum_r m[r, j] for r in 0..rows, in row order; split by columns. */
static void moe__colsum_acc(const moe__exec *ex, const float *m, int64_t rows, int64_t cols, int64_t ld, float *out) {
    int64_t nb = (cols + 63) / 64, b;
    MOE__PARALLEL_FOR(ex->n_threads, (double)rows * (double)cols)
    for (b = 0; b < nb; b++) {
        int64_t j0 = b * 64, j1 = moe__min64(j0 + 64, cols), r, j;
        for (r = 0; r < rows; r++) {
            const float *row = m + r * ld;
            for (j = j0; j < j1; j++) out[j] += row[j];
        }
    }
}
#endif /* MOE_NO_TRAINING */

// >>layer -------------------------------------------------------------------
enum { MOE__INIT_UNIFORM, MOE__INIT_ONES, MOE__INIT_ZEROS, MOE__INIT_NORMAL };

typedef struct moe__tdef {
    char name[MOE__NAME_MAX];   /* relative to the layer: "experts.w1.weight" */
    int ndim;
    int64_t shape[4];
    int64_t offset, size;       /* floats, within the layer's parameters */
    int init;
    float bound;                /* MOE__INIT_UNIFORM: U(-bound, bound) */
} moe__tdef;

/* A linear map, stacked over the experts of a bank: W [n, out, in], b [n, out]. */
typedef struct moe__linear {
    int64_t in, out;
    int64_t w, b;               /* offsets into the layer's parameters; b < 0: no bias */
    int input;                  /* -1: the layer input (gathered rows); else index of the activation it reads */
} moe__linear;

/* A set of experts of one kind: the routed experts, or the shared experts. */
typedef struct moe__bank {
    int n;
    moe_expert kind;
    moe_activation act;
    int n_linears;              /* mlp: hidden_layers + 1 (fc0..fcL); swiglu: 3 (w1, w3, w2) */
    moe__linear lin[MOE__MAX_LINEARS];
    int64_t d_in, d_hidden, d_out, max_rows;
    /* forward: saved for backward */
    int64_t *offsets;           /* [n + 1]: rows offsets[e]..offsets[e+1] belong to expert e */
    int32_t *row_token;         /* [max_rows]: the input row each sorted row reads */
    float *z[MOE__MAX_LINEARS]; /* [max_rows, d_hidden] pre-activations of the hidden linears */
    float *a[MOE__MAX_LINEARS]; /* [max_rows, d_hidden] activations fed to the next linear */
    float *out;                 /* [max_rows, d_out] expert outputs, ungated */
    /* backward scratch */
    float *dz[MOE__MAX_LINEARS];/* [max_rows, out_j] gradient at each linear's output */
    float *da;                  /* [max_rows, d_hidden] swiglu: gradient at the gated product */
    float *dxr;                 /* [max_rows, d_in] gradient at the gathered inputs */
    moe__mat qw[MOE__MAX_LINEARS]; /* moe_layer_quantize: each linear's [n * out, in] weights, reduced */
    /* reduced weights, decode path: each stage's input rows in int16 with scales (int8 weights,
       moe__quant_row) or as two bf16 halves, hi then lo (bf16 weights, where the kernel has
       dot_bf16), stage s reading xq[s % 2] while its tiles write the next stage's into the other */
    int16_t *xq[2];             /* [q_rows, q_stride] */
    float *xs[2];               /* int8: [q_rows, q_ld / MOE__QGROUP rounded up] */
    int64_t q_rows, q_ld, q_stride;
    int qact;                   /* this forward's decode reads xq (its rows fit) */
} moe__bank;

/* A unit of grouped work, one block of one product of one expert: rows r0..r1 and columns
   c0..c1 of its output. Forward and input-gradient tiles count rows in the bank's sorted rows;
   weight-gradient tiles count the linear's output rows. */
enum { MOE__TILE_FORWARD, MOE__TILE_INPUT_GRAD, MOE__TILE_WEIGHT_GRAD, MOE__TILE_DECODE };

typedef struct moe__tile {
    int32_t bank, expert, linear, kind;
    int64_t r0, r1, c0, c1;
    double cost;                /* flops */
} moe__tile;

#define MOE__TILE_ROWS 768      /* most rows per forward / input-gradient tile */
#define MOE__WTILE_ROWS 768     /* most output rows per weight-gradient tile */

struct moe_layer {
    moe_ctx *ctx;
    moe_layer_desc d;           /* defaults resolved */
    int index;                  /* position in the model: random streams, noise slot */
    int64_t max_tokens;
    float *params, *grads;      /* this layer's slice */
    int64_t n_params;
    int n_tensors;
    moe__tdef tensors[MOE__MAX_TENSORS];
    moe__exec ex;

    moe__linear lin;            /* dense */
    int64_t norm_w, norm_b;     /* norms (b < 0: rmsnorm) */

    moe__linear router, noise;  /* MoE router [E, D] (+ bias) and noise weights [E, D] */
    moe__bank bank[2];          /* routed experts, shared experts */
    int n_banks;
    int64_t capacity;           /* 0: unlimited */

    /* forward state */
    const float *x;
    float *y;
    int64_t T;
    int training, has_forward;
    int z_transient;            /* this forward's expert GEMMs may skip storing pre-activations */
    int z_stale;                /* they did: backward recomputes them first (moe__restore_z) */
    const float *stage_x;       /* the input rows of the expert stages of the last forward */
    int64_t noise_step;         /* training forwards so far: selects the noise */
    int64_t forward_step;       /* noise_step of the last forward (its jitter is redrawn in backward) */
    const float *u;             /* router input of the last forward: x, or xr with jitter */

    /* saved buffers */
    float *z;                   /* dense: [T, d_out] pre-activation */
    float *mean, *rstd;         /* norms: [T] */
    float *xr;                  /* [T, D] jittered router input (NULL without jitter) */
    float *clean, *raw, *noise_n, *h, *p; /* [T, E] */
    float *lse, *entropy;       /* [T] */
    int32_t *sel, *pos;         /* [T*k]: chosen expert, sorted row (-1: dropped) */
    float *gate;                /* [T*k] */
    int32_t *thr_in, *thr_out;  /* [T] expert holding the (k+1)-th / k-th largest h */
    int32_t *passthrough;       /* [T] */
    int64_t *chosen, *kept;     /* [E] before / after capacity */
    int64_t *chosen_cursor;     /* [E] counting-sort cursor */
    float *importance, *load;   /* [E] */
    moe__tile *tiles;           /* the current step's tiles over all experts */
    int64_t n_tiles, max_tiles;
    moe_stats stats;

    /* backward scratch */
    float *dz_dense;            /* [T, d_out] */
    float *dgate;               /* [T*k] */
    float *dh, *dclean, *dstd;  /* [T, E] */
    float *dxu;                 /* [T, D] */
    float *dimportance, *dload; /* [E] dCV^2 of importance and load */

    void *own;                  /* standalone layer: the one block it allocated */
    moe_dtype wdtype;           /* expert weights forwards read: F32 (the parameters), BF16 or I8 */
    void *qblock;               /* the reduced copies (moe_layer_quantize) */
    float *wpack;               /* moe_layer_pack: forward weights in the kernel's panel layout */
    int64_t wpack_off[2][MOE__MAX_LINEARS]; /* floats before forward stage s of bank b */

    /* routers beyond softmax top-k, per-call k and top-p */
    int64_t slots;              /* (token, slot) entries per token in sel/pos/gate: the call's k; expert choice: E */
    int call_k;                 /* k of the last forward */
    float call_top_p;           /* top_p of the last forward (0: off) */
    const int32_t *token_ids;   /* hash router: ids of the last forward's tokens */
    int64_t selection_bias;     /* sigmoid: offset of router.selection_bias [E]; else -1 */
    float *key;                 /* sigmoid: [T, E] scores plus selection bias, groups masked */
    float *group_score;         /* sigmoid with groups: [T, n_groups] */
    int32_t *group_sel;         /* sigmoid with groups: [T, n_groups] */
    float *bias_keep;           /* sigmoid: [E] the selection bias held across an optimizer step */
    int64_t shared_gate_w;      /* shared_gate: offset of shared.gate.weight [S, D]; else -1 */
    float *shared_gate_v;       /* shared_gate: [T, S] sigmoid(x g_q^T) of the last forward */
    float *dshared_gate;        /* shared_gate: [T, S] gradient at the gate logits */

    /* combines beyond the weighted sum */
    moe__linear combine;        /* stack: combine.weight [d_out, E * d_expert_out], combine.bias [d_out] */
    float *cat;                 /* stack: [T, E * d_expert_out] the concatenated gated expert outputs */
    float *dcat;                /* stack: [T, E * d_expert_out] its gradient */
    int voted;                  /* vote: the last forward voted (inference), so it has no backward */

    /* soft router (logits in clean, dL in dh: [T, E*S]) */
    int64_t soft_groups;        /* groups of the last forward: T / soft_group_tokens */
    float *soft_combine, *dispatch; /* [T, E*S] softmax over a token's slots / over a group's tokens per slot */
    float *slot_x;              /* [groups * E * S, D] slot inputs, group-major (row g*E*S + e*S + s) */
    int32_t *slot_row;          /* [groups * E * S] the expert-bank row of each slot (inverse of row_token) */
    float *ddispatch;           /* backward: [T, E*S] */
    /* hierarchical router (expert-level logits in clean/raw/h as for noisy top-k, [T, E]) */
    moe__linear group_router, group_noise; /* [G, D] (+ bias [G]); noise weights [G, D] (group_noise.w < 0: none) */
    float *gclean, *graw, *gnoise, *gh, *gp; /* [T, G] group logits, noise logits, noise, noisy logits, softmax */
    float *pw;                  /* [T, E] softmax inside each group (l->p holds the product gp * pw) */
    float *ggate;               /* [T, top_k_groups] gates of the chosen groups (chosen groups in group_sel) */
    float *dgh, *dgclean, *dgstd; /* backward: [T, G] */
    float *dggate;              /* backward: [T, top_k_groups] */

    /* multi-task layers: the shared experts and the task experts (or towers) are banks; every
       expert takes all T tokens, expert e of a bank holding rows e*T..(e+1)*T */
    int mg_shared_bank, mg_task_bank; /* index into bank[]; -1: none */
    int mg_gates;               /* one gate per task, then the shared gate when shared_output */
    int64_t mg_gate_w[MOE_MAX_TASKS + 1];     /* offset of gates.<g>.weight [width, D]; -1: a gate over one expert (weight 1) */
    int64_t mg_gate_width[MOE_MAX_TASKS + 1]; /* experts gate g mixes */
    int64_t mg_gate_col[MOE_MAX_TASKS + 1];   /* first column of gate g in mg_p */
    int64_t mg_cols;            /* sum of the gate widths */
    float *mg_p;                /* [T, mg_cols] gate probabilities */
    float *mg_dp;               /* [T, mg_cols] backward: gradient at the gate probabilities, then logits */

    int64_t embedding;          /* embedding layers: offset of "weight" [vocab_size, d_embedding] */
};

/* Gated experts w2(act(w1 x) * (w3 x)): SwiGLU and GeGLU share tensors, stages and buffers. */
static int moe__glu_kind(moe_expert kind) { return kind == MOE_EXPERT_SWIGLU || kind == MOE_EXPERT_GEGLU; }

static int moe__expert_noisy(const moe_layer_desc *d) {
    return d->router == MOE_ROUTER_NOISY_TOPK || (d->router == MOE_ROUTER_HIERARCHICAL && d->expert_router == MOE_ROUTER_NOISY_TOPK);
}

/* Routing entries per token in sel/pos/gate for a call with k: hierarchical top_k_groups * k, expert choice E. */
static int64_t moe__slots_for(const moe_layer_desc *d, int64_t k) {
    return d->router == MOE_ROUTER_EXPERT_CHOICE || d->router == MOE_ROUTER_SOFT ? d->n_experts
         : d->router == MOE_ROUTER_HIERARCHICAL ? (int64_t)d->top_k_groups * k : k;
}

/* Soft router: slots per expert and group, and groups of a call of T tokens. */
static int64_t moe__soft_slots(const moe_layer_desc *d) { return (int64_t)d->n_experts * d->slots_per_expert; }
static int64_t moe__soft_groups(const moe_layer_desc *d, int64_t T) { return d->soft_group_tokens > 0 ? T / d->soft_group_tokens : 1; }

static int moe__flag(moe_flag f, int def) { return f == MOE_FLAG_DEFAULT ? def : f == MOE_FLAG_ON; }

static int moe__dims_ok(int64_t a) { return a > 0 && a <= ((int64_t)1 << 31); }

/* Width of a layer's output: d_out, or for Gaussian experts the packed mixture E (1 + 2 d_out). */
static int64_t moe__layer_width(const moe_layer_desc *d) {
    return d->kind == MOE_LAYER_MOE && d->expert == MOE_EXPERT_GAUSSIAN ? (int64_t)d->n_experts * (1 + 2 * d->d_out) : d->d_out;
}

/* Soft and hierarchical routers: their own fields; the sigmoid router's must stay 0. */
static moe_result moe__router_resolve_soft_hierarchical(moe_ctx *ctx, moe_layer_desc *d, int where) {
    if (d->routed_scaling_factor != 0.0f || d->bias_update_rate != 0.0f || (d->router == MOE_ROUTER_SOFT && (d->n_groups != 0 || d->top_k_groups != 0)))
        return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: routed_scaling_factor and bias_update_rate belong to the sigmoid router; n_groups and top_k_groups to the sigmoid and hierarchical routers", where);
    if (d->router == MOE_ROUTER_SOFT) {
        if (d->slots_per_expert == 0) d->slots_per_expert = 1;
        if (d->slots_per_expert < 1 || (int64_t)d->slots_per_expert * d->n_experts > ((int64_t)1 << 20))
            return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: slots_per_expert %d must be >= 1 with n_experts * slots_per_expert <= 2^20", where, d->slots_per_expert);
        if (d->soft_group_tokens < 0 || d->soft_group_tokens > ((int64_t)1 << 28))
            return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: soft_group_tokens %lld out of range 0..2^28", where, (long long)d->soft_group_tokens);
        if (d->balance_loss > 0.0f || d->z_loss > 0.0f || d->importance_loss > 0.0f || d->load_loss > 0.0f)
            return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: the soft router takes no auxiliary losses (every slot is filled: it balances by construction)", where);
        if (d->router_bias == MOE_FLAG_ON || d->jitter > 0.0f || d->capacity_factor > 0.0f || d->n_shared_experts > 0)
            return moe__fail(ctx, MOE_ERR_UNSUPPORTED, "layer %d: the soft router takes no router_bias, jitter, capacity_factor or shared experts", where);
        d->renormalize = MOE_FLAG_OFF;
        return MOE_OK;
    }
    if (d->group_router == MOE_ROUTER_DEFAULT) d->group_router = MOE_ROUTER_TOPK;
    if (d->expert_router == MOE_ROUTER_DEFAULT) d->expert_router = MOE_ROUTER_TOPK;
    if ((d->group_router != MOE_ROUTER_TOPK && d->group_router != MOE_ROUTER_NOISY_TOPK) ||
        (d->expert_router != MOE_ROUTER_TOPK && d->expert_router != MOE_ROUTER_NOISY_TOPK))
        return moe__fail(ctx, MOE_ERR_UNSUPPORTED, "layer %d: group_router and expert_router of a hierarchical router may be topk or noisy_topk (got %d, %d)",
                         where, (int)d->group_router, (int)d->expert_router);
    if (d->top_k_groups == 0) d->top_k_groups = 1;
    if (d->top_k_groups < 1 || d->top_k_groups > d->n_groups || d->max_top_k > d->n_experts / d->n_groups)
        return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: top_k_groups %d must be in 1..n_groups (%d) and max_top_k %d at most the %d experts of a group",
                         where, d->top_k_groups, d->n_groups, d->max_top_k, d->n_experts / d->n_groups);
    if (d->z_loss > 0.0f || d->load_loss > 0.0f)
        return moe__fail(ctx, MOE_ERR_UNSUPPORTED, "layer %d: the hierarchical router takes balance_loss and importance_loss (not z_loss or load_loss)", where);
    return MOE_OK;
}

/* The router-specific fields of a MoE desc whose common fields are resolved. */
static moe_result moe__router_resolve(moe_ctx *ctx, moe_layer_desc *d, int where) {
    int sigmoid = d->router == MOE_ROUTER_SIGMOID, ec = d->router == MOE_ROUTER_EXPERT_CHOICE, hash = d->router == MOE_ROUTER_HASH;
    if (d->max_top_k == 0) d->max_top_k = d->top_k;
    if (d->max_top_k < d->top_k || d->max_top_k > d->n_experts || (d->router == MOE_ROUTER_SWITCH && d->max_top_k != 1))
        return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: max_top_k %d must be in top_k (%d)..n_experts (%d)", where, d->max_top_k, d->top_k, d->n_experts);
    if (ec) {
        /* gates are the scores themselves; C = ceil(capacity_factor * T * k / E) tokens per expert */
        d->renormalize = MOE_FLAG_OFF;
        if (d->capacity_factor == 0.0f) d->capacity_factor = 1.0f;
        if (d->balance_loss > 0.0f || d->importance_loss > 0.0f || d->load_loss > 0.0f)
            return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: the expert-choice router balances by construction; of the aux losses only z_loss applies", where);
    }
    if ((sigmoid || hash) && (d->balance_loss > 0.0f || d->z_loss > 0.0f || d->importance_loss > 0.0f || d->load_loss > 0.0f))
        return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: the %s router takes no auxiliary losses", where, sigmoid ? "sigmoid" : "hash");
    if (hash) {
        if (d->router_bias == MOE_FLAG_ON || d->jitter > 0.0f)
            return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: the hash router has no router weights (router_bias, jitter)", where);
        d->renormalize = MOE_FLAG_OFF;
    }
    if (!hash) d->hash_seed = 0;
    if (d->router != MOE_ROUTER_SOFT && (d->slots_per_expert != 0 || d->soft_group_tokens != 0))
        return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: slots_per_expert and soft_group_tokens belong to the soft router", where);
    if (d->router != MOE_ROUTER_HIERARCHICAL && (d->group_router != MOE_ROUTER_DEFAULT || d->expert_router != MOE_ROUTER_DEFAULT))
        return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: group_router and expert_router belong to the hierarchical router", where);
    if (d->router == MOE_ROUTER_SOFT || d->router == MOE_ROUTER_HIERARCHICAL) return moe__router_resolve_soft_hierarchical(ctx, d, where);
    if (!sigmoid) {
        if (d->routed_scaling_factor != 0.0f || d->n_groups != 0 || d->top_k_groups != 0 || d->bias_update_rate != 0.0f)
            return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: routed_scaling_factor, n_groups, top_k_groups and bias_update_rate belong to the sigmoid router (n_groups and top_k_groups also to the hierarchical router)", where);
        return MOE_OK;
    }
    if (d->routed_scaling_factor == 0.0f) d->routed_scaling_factor = 1.0f;
    if (d->n_groups == 0) d->n_groups = 1;
    if (d->top_k_groups == 0) d->top_k_groups = d->n_groups;
    if (!(d->routed_scaling_factor > 0.0f) || !moe__finite(d->routed_scaling_factor) || !(d->bias_update_rate >= 0.0f) || !moe__finite(d->bias_update_rate))
        return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: routed_scaling_factor must be > 0 and bias_update_rate >= 0", where);
    if (d->n_groups < 1 || d->n_experts % d->n_groups != 0 || d->top_k_groups < 1 || d->top_k_groups > d->n_groups ||
        (int64_t)d->top_k_groups * (d->n_experts / d->n_groups) < d->max_top_k)
        return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: n_groups %d must divide n_experts %d, and top_k_groups %d groups must hold max_top_k %d experts",
                         where, d->n_groups, d->n_experts, d->top_k_groups, d->max_top_k);
    return MOE_OK;
}

static int moe__vote_combine(moe_combine c) { return c == MOE_COMBINE_VOTE || c == MOE_COMBINE_VOTE_MAJORITY; }

/* The combine fields of a MoE desc whose other fields are resolved. */
static moe_result moe__combine_resolve(moe_ctx *ctx, moe_layer_desc *d, int where) {
    if ((int)d->combine < 0 || d->combine >= MOE_COMBINE_COUNT)
        return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: unknown combine %d", where, (int)d->combine);
    if (d->combine == MOE_COMBINE_DEFAULT) d->combine = MOE_COMBINE_SUM;
    if (d->d_expert_out == 0) d->d_expert_out = d->d_out;
    if (!moe__dims_ok(d->d_expert_out))
        return moe__fail(ctx, MOE_ERR_SHAPE, "layer %d: d_expert_out %lld out of range", where, (long long)d->d_expert_out);
    if (d->combine != MOE_COMBINE_STACK && d->d_expert_out != d->d_out)
        return moe__fail(ctx, MOE_ERR_SHAPE, "layer %d: d_expert_out %lld differs from d_out %lld; only the stacking combine allows that", where,
                         (long long)d->d_expert_out, (long long)d->d_out);
    if (d->combine != MOE_COMBINE_SUM && d->n_shared_experts > 0)
        return moe__fail(ctx, MOE_ERR_UNSUPPORTED, "layer %d: shared experts need the weighted-sum combine", where);
    if (d->combine != MOE_COMBINE_SUM && d->router == MOE_ROUTER_SOFT)
        return moe__fail(ctx, MOE_ERR_UNSUPPORTED, "layer %d: the soft router combines through its slots: it takes only the weighted-sum combine", where);
    if (moe__vote_combine(d->combine) && d->residual)
        return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: a voting layer outputs votes; it cannot be residual", where);
    return MOE_OK;
}

/* Expert capacity for T tokens choosing k of E experts: ceil(cf * T * k / E), at least 1. */
static int64_t moe__capacity(float capacity_factor, int64_t T, int64_t k, int64_t E) {
    double c = ceil((double)capacity_factor * (double)T * (double)k / (double)E);
    return c < 1.0 ? 1 : c > (double)T ? T : (int64_t)c;  /* no expert gets more than T rows anyway */
}

/* Expert choice: tokens per expert, C = the capacity, at most T. */
static int64_t moe__expert_choice_tokens(const moe_layer_desc *d, int64_t T, int64_t k) {
    return moe__min64(T, moe__capacity(d->capacity_factor, T, k, d->n_experts));
}

/* The expert fields (kind, hidden width, hidden layers, activation, bias) of a MoE or multi-task desc. */
static moe_result moe__expert_resolve(moe_ctx *ctx, moe_layer_desc *d, int64_t default_hidden, int where) {
    if ((int)d->expert < 0 || d->expert >= MOE_EXPERT_COUNT)
        return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: unknown expert kind %d", where, (int)d->expert);
    if (d->expert == MOE_EXPERT_DEFAULT) d->expert = MOE_EXPERT_MLP;
    if (d->d_hidden == 0) d->d_hidden = default_hidden;
    if (!moe__dims_ok(d->d_hidden))
        return moe__fail(ctx, MOE_ERR_SHAPE, "layer %d: d_hidden %lld out of range", where, (long long)d->d_hidden);
    if (d->expert == MOE_EXPERT_LINEAR) d->n_hidden_layers = 0;
    else if (moe__glu_kind(d->expert)) d->n_hidden_layers = 1;
    else if (d->n_hidden_layers == 0) d->n_hidden_layers = 1;
    if (d->n_hidden_layers < 0 || d->n_hidden_layers > MOE__MAX_LINEARS - 1)
        return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: n_hidden_layers %d out of range 1..%d", where, d->n_hidden_layers, MOE__MAX_LINEARS - 1);
    /* linear experts have no activation, SwiGLU's is silu, GeGLU's gelu: the field is ignored for them */
    if (d->activation == MOE_ACT_DEFAULT) d->activation = MOE_ACT_RELU;
    if (d->expert == MOE_EXPERT_SWIGLU) d->activation = MOE_ACT_SILU;
    if (d->expert == MOE_EXPERT_GEGLU) d->activation = MOE_ACT_GELU;
    if (d->expert == MOE_EXPERT_LINEAR) d->activation = MOE_ACT_IDENTITY;
    d->bias = moe__flag(d->bias, !moe__glu_kind(d->expert)) ? MOE_FLAG_ON : MOE_FLAG_OFF;
    return MOE_OK;
}

static int moe__is_multitask(moe_layer_kind k) { return k == MOE_LAYER_MULTIGATE || k == MOE_LAYER_TASK_TOWERS; }

/* Slices of a multi-task layer's input and output. */
static int moe__task_groups_in(const moe_layer_desc *d) {
    return d->task_input == MOE_TASK_INPUT_TASKS ? d->n_tasks : d->task_input == MOE_TASK_INPUT_TASKS_SHARED ? d->n_tasks + 1 : 1;
}
static int moe__task_groups_out(const moe_layer_desc *d) { return d->n_tasks + (d->shared_output ? 1 : 0); }

/* Multi-task layers: tasks, experts, input and output slices. d_in is resolved. */
static moe_result moe__multitask_resolve(moe_ctx *ctx, moe_layer_desc *d, int where) {
    int towers = d->kind == MOE_LAYER_TASK_TOWERS, gin, gout;
    int64_t D;
    if (d->n_tasks == 0) d->n_tasks = 2;
    if (d->n_tasks < 1 || d->n_tasks > MOE_MAX_TASKS)
        return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: n_tasks %d out of range 1..%d", where, d->n_tasks, MOE_MAX_TASKS);
    if ((int)d->task_input < 0 || d->task_input >= MOE_TASK_INPUT_COUNT)
        return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: unknown task_input %d", where, (int)d->task_input);
    if (d->task_input == MOE_TASK_INPUT_DEFAULT) d->task_input = towers ? MOE_TASK_INPUT_TASKS : MOE_TASK_INPUT_SINGLE;
    d->shared_output = d->shared_output ? 1 : 0;
    if (d->expert == MOE_EXPERT_GAUSSIAN)
        return moe__fail(ctx, MOE_ERR_UNSUPPORTED, "layer %d: Gaussian experts belong to moe layers (a mixture density head), not to multi-task layers", where);
    if (towers) {
        if (d->n_experts != 0 || (d->n_task_experts != 0 && d->n_task_experts != 1) || d->shared_output || d->top_k != 0)
            return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: task towers have one network per task (no n_experts, n_task_experts, shared_output, top_k)", where);
        if (d->task_input == MOE_TASK_INPUT_TASKS_SHARED)
            return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: task towers read a single input or task slices, not a shared slice", where);
        d->n_task_experts = 1;
    } else {
        if (d->n_experts == 0) d->n_experts = 4;
        if (d->n_experts < 1 || d->n_experts > 256 || d->n_task_experts < 0 || d->n_task_experts > 256)
            return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: n_experts %d (1..256) or n_task_experts %d (0..256) out of range", where,
                             d->n_experts, d->n_task_experts);
        if (d->task_input == MOE_TASK_INPUT_TASKS)
            return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: shared experts need a single input or a shared slice (task_input tasks_shared)", where);
        if (d->top_k < 0 || d->top_k > 65536)
            return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: top_k %d of the gates must be >= 0 (0: dense gates)", where, d->top_k);
    }
    if (d->residual) return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: multi-task layers are not residual", where);
    gin = moe__task_groups_in(d);
    gout = moe__task_groups_out(d);
    if (d->d_in % gin != 0)
        return moe__fail(ctx, MOE_ERR_SHAPE, "layer %d: d_in %lld is not %d equal slices", where, (long long)d->d_in, gin);
    D = d->d_in / gin;
    if (d->d_out == 0) d->d_out = gout * D;
    if (!moe__dims_ok(d->d_out) || d->d_out % gout != 0)
        return moe__fail(ctx, MOE_ERR_SHAPE, "layer %d: d_out %lld must be %d equal slices", where, (long long)d->d_out, gout);
    return MOE_OK;
}

/* Fill defaults and validate. prev_width: the previous layer's output (0 if none). */
static moe_result moe__layer_resolve(moe_ctx *ctx, const moe_layer_desc *in, int64_t prev_width, int where, moe_layer_desc *out) {
    moe_layer_desc d = *in;
    if ((int)d.kind < 0 || d.kind >= MOE_LAYER_COUNT)
        return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: unknown kind %d", where, (int)d.kind);
    if (d.kind == MOE_LAYER_DEFAULT) d.kind = MOE_LAYER_DENSE;
    if (d.d_in == 0) d.d_in = prev_width;
    if (prev_width && d.d_in != prev_width)
        return moe__fail(ctx, MOE_ERR_SHAPE, "layer %d: d_in %lld but the previous width is %lld", where, (long long)d.d_in, (long long)prev_width);
    if (!moe__dims_ok(d.d_in))
        return moe__fail(ctx, MOE_ERR_SHAPE, "layer %d: d_in %lld out of range", where, (long long)d.d_in);
    if (d.kind == MOE_LAYER_RMSNORM || d.kind == MOE_LAYER_LAYERNORM) {
        if (d.d_out && d.d_out != d.d_in)
            return moe__fail(ctx, MOE_ERR_SHAPE, "layer %d: a norm layer keeps its width (d_out %lld, d_in %lld)", where, (long long)d.d_out, (long long)d.d_in);
        if (d.eps == 0.0f) d.eps = 1e-5f;
        if (!(d.eps > 0.0f) || !moe__finite(d.eps))
            return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: eps must be > 0", where);
    }
    if (moe__is_multitask(d.kind)) MOE__TRY(moe__multitask_resolve(ctx, &d, where));
    if (d.kind == MOE_LAYER_EMBEDDING) {
        if (d.vocab_size < 1 || d.vocab_size > ((int64_t)1 << 24))
            return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: vocab_size %lld out of range 1..2^24", where, (long long)d.vocab_size);
        if (d.d_embedding == 0 && d.d_out > 0 && d.d_out % d.d_in == 0) d.d_embedding = d.d_out / d.d_in;
        if (!moe__dims_ok(d.d_embedding))
            return moe__fail(ctx, MOE_ERR_SHAPE, "layer %d: d_embedding %lld out of range (set it, or d_out = d_in * d_embedding)", where, (long long)d.d_embedding);
        if (d.d_embedding > ((int64_t)1 << 31) / d.d_in || (d.d_out && d.d_out != d.d_in * d.d_embedding))
            return moe__fail(ctx, MOE_ERR_SHAPE, "layer %d: d_out %lld must be d_in %lld * d_embedding %lld", where, (long long)d.d_out,
                             (long long)d.d_in, (long long)d.d_embedding);
        if (d.residual) return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: an embedding layer has no residual", where);
        d.d_out = d.d_in * d.d_embedding;
    } else {
        d.vocab_size = 0;
        d.d_embedding = 0;
    }
    if (d.d_out == 0) d.d_out = d.d_in;
    if (!moe__dims_ok(d.d_out))
        return moe__fail(ctx, MOE_ERR_SHAPE, "layer %d: d_out %lld out of range", where, (long long)d.d_out);
    if (d.residual && d.d_out != d.d_in)
        return moe__fail(ctx, MOE_ERR_SHAPE, "layer %d: residual needs d_out == d_in (%lld, %lld)", where, (long long)d.d_out, (long long)d.d_in);
    d.residual = d.residual ? 1 : 0;
    if ((int)d.activation < 0 || d.activation >= MOE_ACT_COUNT)
        return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: unknown activation %d", where, (int)d.activation);
    if ((int)d.bias < 0 || d.bias >= MOE_FLAG_COUNT || (int)d.renormalize < 0 || d.renormalize >= MOE_FLAG_COUNT ||
        (int)d.router_bias < 0 || d.router_bias >= MOE_FLAG_COUNT || (int)d.shared_gate < 0 || d.shared_gate >= MOE_FLAG_COUNT)
        return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: a moe_flag field is out of range", where);
    if (d.kind == MOE_LAYER_DENSE) {
        if (d.activation == MOE_ACT_DEFAULT) d.activation = MOE_ACT_IDENTITY;
        d.bias = moe__flag(d.bias, 1) ? MOE_FLAG_ON : MOE_FLAG_OFF;
    }
    if (d.kind == MOE_LAYER_MOE) {
        if ((int)d.router < 0 || d.router >= MOE_ROUTER_COUNT)
            return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: unknown router %d", where, (int)d.router);
        if (d.router == MOE_ROUTER_DEFAULT) d.router = MOE_ROUTER_TOPK;
        if (d.n_experts == 0) d.n_experts = 4;
        if (d.n_experts < 1 || d.n_experts > 65536)
            return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: n_experts %d out of range 1..65536", where, d.n_experts);
        if (d.router == MOE_ROUTER_SWITCH) {
            if (d.top_k != 0 && d.top_k != 1)
                return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: the switch router has top_k 1 (got %d)", where, d.top_k);
            d.top_k = 1;
        }
        if (d.router == MOE_ROUTER_SOFT) {  /* every token reaches every expert through the slots */
            if ((d.top_k != 0 && d.top_k != d.n_experts) || (d.max_top_k != 0 && d.max_top_k != d.n_experts))
                return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: the soft router has no top_k (every token reaches all %d experts through the slots): leave top_k and max_top_k 0", where, d.n_experts);
            d.top_k = d.n_experts;
        }
        if (d.router == MOE_ROUTER_HIERARCHICAL) {  /* top_k counts the experts chosen inside each chosen group */
            if (d.n_groups == 0) d.n_groups = d.n_experts % 2 == 0 ? 2 : 1;
            if (d.n_groups < 1 || d.n_experts % d.n_groups != 0)
                return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: n_groups %d must divide n_experts %d", where, d.n_groups, d.n_experts);
            if (d.top_k == 0) d.top_k = d.n_experts / d.n_groups < 2 ? d.n_experts / d.n_groups : 2;
            if (d.top_k < 1 || d.top_k > d.n_experts / d.n_groups)
                return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: top_k %d must be in 1..%d, the experts of one group", where, d.top_k, d.n_experts / d.n_groups);
        }
        if (d.top_k == 0) d.top_k = d.expert == MOE_EXPERT_GAUSSIAN || d.n_experts < 2 ? d.n_experts : 2;
        if (d.top_k < 1 || d.top_k > d.n_experts)
            return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: top_k %d must be in 1..n_experts (%d)", where, d.top_k, d.n_experts);
        MOE__TRY(moe__expert_resolve(ctx, &d, d.d_in, where));
        if (d.n_shared_experts < 0 || d.n_shared_experts > 64)
            return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: n_shared_experts %d out of range 0..64", where, d.n_shared_experts);
        if (d.d_shared_hidden == 0) d.d_shared_hidden = d.d_hidden;
        if (!moe__dims_ok(d.d_shared_hidden))
            return moe__fail(ctx, MOE_ERR_SHAPE, "layer %d: d_shared_hidden out of range", where);
        d.shared_gate = moe__flag(d.shared_gate, 0) ? MOE_FLAG_ON : MOE_FLAG_OFF;
        if (d.shared_gate == MOE_FLAG_ON && d.n_shared_experts == 0)
            return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: shared_gate needs n_shared_experts > 0", where);
        d.renormalize = moe__flag(d.renormalize, d.router != MOE_ROUTER_SWITCH) ? MOE_FLAG_ON : MOE_FLAG_OFF;
        d.router_bias = moe__flag(d.router_bias, 0) ? MOE_FLAG_ON : MOE_FLAG_OFF;
        if (d.capacity_factor == 0.0f && d.router == MOE_ROUTER_SWITCH) d.capacity_factor = 1.25f;
        if (!(d.capacity_factor >= 0.0f) || !moe__finite(d.capacity_factor))
            return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: capacity_factor must be >= 0", where);
        if (!(d.jitter >= 0.0f && d.jitter < 1.0f))
            return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: jitter must be in [0, 1)", where);
        if (!(d.balance_loss >= 0.0f) || !(d.z_loss >= 0.0f) || !(d.importance_loss >= 0.0f) || !(d.load_loss >= 0.0f) ||
            !moe__finite(d.balance_loss) || !moe__finite(d.z_loss) || !moe__finite(d.importance_loss) || !moe__finite(d.load_loss))
            return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: auxiliary loss coefficients must be finite and >= 0", where);
        if (d.expert == MOE_EXPERT_GAUSSIAN) {
            /* the layer's output is a mixture density, not a sum: nothing may be added to it or dropped from it */
            if (d.router != MOE_ROUTER_TOPK)
                return moe__fail(ctx, MOE_ERR_UNSUPPORTED, "layer %d: Gaussian experts take the softmax top-k router", where);
            if (d.n_shared_experts || d.residual || d.capacity_factor > 0.0f || d.renormalize == MOE_FLAG_OFF ||
                d.combine > MOE_COMBINE_SUM || (d.d_expert_out && d.d_expert_out != d.d_out))
                return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: Gaussian experts take no shared experts, residual, capacity_factor, renormalize off, combine or d_expert_out", where);
            if (!moe__dims_ok(moe__layer_width(&d)))
                return moe__fail(ctx, MOE_ERR_SHAPE, "layer %d: the mixture output E (1 + 2 d_out) is too wide", where);
        }
        MOE__TRY(moe__router_resolve(ctx, &d, where));
        MOE__TRY(moe__combine_resolve(ctx, &d, where));
    } else {
        /* fields of other kinds are not part of this layer */
        int multitask = moe__is_multitask(d.kind);
        if (!multitask) { d.n_experts = 0; d.expert = MOE_EXPERT_DEFAULT; d.d_hidden = 0; d.n_hidden_layers = 0; }
        else MOE__TRY(moe__expert_resolve(ctx, &d, d.d_in / moe__task_groups_in(&d), where));
        if (d.kind != MOE_LAYER_MULTIGATE) d.top_k = 0;
        d.router = MOE_ROUTER_DEFAULT; d.n_shared_experts = 0; d.d_shared_hidden = 0;
        d.renormalize = MOE_FLAG_DEFAULT; d.router_bias = MOE_FLAG_DEFAULT; d.capacity_factor = 0.0f;
        d.jitter = 0.0f; d.balance_loss = d.z_loss = d.importance_loss = d.load_loss = 0.0f;
        d.max_top_k = 0; d.routed_scaling_factor = 0.0f; d.n_groups = 0; d.top_k_groups = 0; d.bias_update_rate = 0.0f; d.hash_seed = 0;
        d.shared_gate = MOE_FLAG_DEFAULT;
        d.combine = MOE_COMBINE_DEFAULT; d.d_expert_out = 0;
        d.slots_per_expert = 0; d.soft_group_tokens = 0; d.group_router = MOE_ROUTER_DEFAULT; d.expert_router = MOE_ROUTER_DEFAULT;
        if (d.kind != MOE_LAYER_DENSE && !multitask) { d.activation = MOE_ACT_DEFAULT; d.bias = MOE_FLAG_DEFAULT; }
    }
    if (!moe__is_multitask(d.kind)) { d.n_tasks = 0; d.n_task_experts = 0; d.task_input = MOE_TASK_INPUT_DEFAULT; d.shared_output = 0; }
    if (d.kind != MOE_LAYER_RMSNORM && d.kind != MOE_LAYER_LAYERNORM) d.eps = 0.0f;
    {   /* parameter counts far beyond any machine would overflow the offsets: refuse them here */
        double w = (double)moe__max64(moe__max64(moe__max64(d.d_in, d.d_out), moe__max64(d.d_hidden, d.d_shared_hidden)), d.d_expert_out);
        double est = d.kind == MOE_LAYER_MOE ? (double)(d.n_experts + d.n_shared_experts + 1) * (double)(d.n_hidden_layers + 3) * w * w +
                                                   (double)d.n_experts * (double)d.slots_per_expert * w  /* soft router: Phi */
                   : moe__is_multitask(d.kind) ? (double)(d.n_experts + d.n_tasks * d.n_task_experts + d.n_tasks + 1) * (double)(d.n_hidden_layers + 3) * w * w
                   : d.kind == MOE_LAYER_EMBEDDING ? (double)d.vocab_size * (double)d.d_embedding
                                             : (double)d.d_in * (double)d.d_out + 2.0 * w;
        if (d.combine == MOE_COMBINE_STACK) est += (double)d.n_experts * (double)d.d_expert_out * (double)d.d_out;
        if (est > (double)MOE__MAX_BYTES / 8.0)
            return moe__fail(ctx, MOE_ERR_OUT_OF_MEMORY, "layer %d: about %.3g parameters: too large", where, est);
    }
    *out = d;
    return MOE_OK;
}

static int64_t moe__add_tensor(moe_layer *l, const char *name, int ndim, int64_t s0, int64_t s1, int64_t s2, int init, float bound) {
    moe__tdef *t = &l->tensors[l->n_tensors++];
    MOE_ASSERT(l->n_tensors <= MOE__MAX_TENSORS);
    moe__strlcpy(t->name, name, sizeof t->name);
    t->ndim = ndim;
    t->shape[0] = s0; t->shape[1] = s1; t->shape[2] = s2; t->shape[3] = 1;
    t->size = s0 * (ndim > 1 ? s1 : 1) * (ndim > 2 ? s2 : 1);
    t->offset = l->n_params;
    t->init = init;
    t->bound = bound;
    l->n_params += (t->size + 15) & ~(int64_t)15;  /* every tensor starts 64-byte aligned */
    return t->offset;
}

/* Register a (stacked) linear: "<prefix>.weight" [n, out, in] and "<prefix>.bias" [n, out].
   n == 0: a plain linear [out, in]. */
static moe__linear moe__add_linear(moe_layer *l, const char *prefix, int n, int64_t in, int64_t out, int bias, int init_bias) {
    char name[MOE__NAME_MAX];
    float bound = 1.0f / sqrtf((float)in);
    moe__linear lin;
    lin.in = in; lin.out = out; lin.input = -1;
    moe__concat(name, sizeof name, prefix, prefix[0] ? "." : "", "weight");
    lin.w = n ? moe__add_tensor(l, name, 3, n, out, in, MOE__INIT_UNIFORM, bound)
              : moe__add_tensor(l, name, 2, out, in, 0, MOE__INIT_UNIFORM, bound);
    lin.b = -1;
    if (bias) {
        moe__concat(name, sizeof name, prefix, prefix[0] ? "." : "", "bias");
        lin.b = n ? moe__add_tensor(l, name, 2, n, out, 0, init_bias, bound)
                  : moe__add_tensor(l, name, 1, out, 0, 0, init_bias, bound);
    }
    return lin;
}

static void moe__bank_plan(moe_layer *l, moe__bank *b, const char *prefix, int n, int64_t in, int64_t hidden, int64_t out, int64_t max_rows) {
    const moe_layer_desc *d = &l->d;
    char name[MOE__NAME_MAX];
    int j, bias = d->bias == MOE_FLAG_ON;
    memset(b, 0, sizeof *b);
    b->n = n;
    b->kind = d->expert;
    b->act = d->activation;
    b->d_in = in;
    b->d_hidden = hidden;
    b->d_out = out;
    b->max_rows = max_rows;
    if (moe__glu_kind(d->expert)) {
        b->n_linears = 3;
        moe__format(name, sizeof name, "%s.w1", prefix);
        b->lin[0] = moe__add_linear(l, name, n, in, hidden, bias, MOE__INIT_UNIFORM);
        moe__format(name, sizeof name, "%s.w3", prefix);
        b->lin[1] = moe__add_linear(l, name, n, in, hidden, bias, MOE__INIT_UNIFORM);
        moe__format(name, sizeof name, "%s.w2", prefix);
        b->lin[2] = moe__add_linear(l, name, n, hidden, out, bias, MOE__INIT_UNIFORM);
        b->lin[2].input = 0;
    } else {
        int L = d->n_hidden_layers;
        b->n_linears = L + 1;
        for (j = 0; j <= L; j++) {
            int64_t a = j == 0 ? in : hidden, z = j == L ? out : hidden;
            moe__format(name, sizeof name, "%s.fc%d", prefix, j);
            b->lin[j] = moe__add_linear(l, name, n, a, z, bias, MOE__INIT_UNIFORM);
            b->lin[j].input = j - 1;
        }
    }
}

/* Multi-task layers: gates (task gates mix their own task's experts, then the shared ones; the
   shared gate mixes every task expert, task by task, then the shared ones), then the banks. */
static void moe__multitask_plan(moe_layer *l) {
    const moe_layer_desc *d = &l->d;
    int gin = moe__task_groups_in(d), gout = moe__task_groups_out(d), g;
    int64_t D = d->d_in / gin, O = d->d_out / gout, T = l->max_tokens, n_task = (int64_t)d->n_tasks * d->n_task_experts;
    int64_t S = d->kind == MOE_LAYER_MULTIGATE ? d->n_experts : 0;
    char name[MOE__NAME_MAX];
    l->mg_gates = gout;
    l->mg_cols = 0;
    for (g = 0; g < gout; g++) {
        int64_t n = (g < d->n_tasks ? d->n_task_experts : n_task) + S;
        l->mg_gate_width[g] = n;
        l->mg_gate_col[g] = l->mg_cols;
        l->mg_cols += n;
        l->mg_gate_w[g] = -1;
        if (n > 1) {
            moe__format(name, sizeof name, "gates.%d.weight", g);
            l->mg_gate_w[g] = moe__add_tensor(l, name, 2, n, D, 0, MOE__INIT_UNIFORM, 1.0f / sqrtf((float)D));
        }
    }
    l->mg_shared_bank = l->mg_task_bank = -1;
    if (S > 0) {
        l->mg_shared_bank = l->n_banks++;
        moe__bank_plan(l, &l->bank[l->mg_shared_bank], "experts", (int)S, D, d->d_hidden, O, S * T);
    }
    if (n_task > 0) {
        l->mg_task_bank = l->n_banks++;
        moe__bank_plan(l, &l->bank[l->mg_task_bank], d->kind == MOE_LAYER_TASK_TOWERS ? "towers" : "task_experts", (int)n_task, D,
                       d->d_hidden, O, n_task * T);
    }
}

/* Tensors, parameter count and weight-gradient tiles; called once the desc is resolved. */
static void moe__layer_plan(moe_layer *l) {
    const moe_layer_desc *d = &l->d;
    l->n_tensors = 0;
    l->n_params = 0;
    l->n_banks = 0;
    l->shared_gate_w = -1;
    switch (d->kind) {
    case MOE_LAYER_DENSE:
        l->lin = moe__add_linear(l, "", 0, d->d_in, d->d_out, d->bias == MOE_FLAG_ON, MOE__INIT_UNIFORM);
        break;
    case MOE_LAYER_RMSNORM:
    case MOE_LAYER_LAYERNORM:
        l->norm_w = moe__add_tensor(l, "weight", 1, d->d_in, 0, 0, MOE__INIT_ONES, 0.0f);
        l->norm_b = d->kind == MOE_LAYER_LAYERNORM ? moe__add_tensor(l, "bias", 1, d->d_in, 0, 0, MOE__INIT_ZEROS, 0.0f) : -1;
        break;
    case MOE_LAYER_EMBEDDING:  /* N(0, 1) as torch.nn.Embedding */
        l->embedding = moe__add_tensor(l, "weight", 2, d->vocab_size, d->d_embedding, 0, MOE__INIT_NORMAL, 1.0f);
        break;
    case MOE_LAYER_MOE: {
        int64_t T = l->max_tokens;
        int64_t rows = T * d->max_top_k;
        memset(&l->router, 0, sizeof l->router);
        l->router.w = l->router.b = -1;
        l->group_router.w = l->group_router.b = l->group_noise.w = -1;
        if (d->router == MOE_ROUTER_SOFT) {  /* Phi [E*S, D]; random, so that the slots of one expert differ */
            l->router = moe__add_linear(l, "router", 0, d->d_in, moe__soft_slots(d), 0, MOE__INIT_ZEROS);  /* weights U(+-1/sqrt(D)) */
            rows = moe__soft_slots(d) * moe__max64(1, moe__soft_groups(d, T));
        } else if (d->router == MOE_ROUTER_HIERARCHICAL) {  /* router.weight [G, E/G, D] is [E, D] in memory */
            int G = d->n_groups;
            l->router = moe__add_linear(l, "router", G, d->d_in, d->n_experts / G, d->router_bias == MOE_FLAG_ON, MOE__INIT_ZEROS);
            l->group_router = moe__add_linear(l, "router.group", 0, d->d_in, G, d->router_bias == MOE_FLAG_ON, MOE__INIT_ZEROS);
            if (d->group_router == MOE_ROUTER_NOISY_TOPK) {
                l->group_noise = l->group_router;
                l->group_noise.b = -1;
                l->group_noise.w = moe__add_tensor(l, "router.group.noise_weight", 2, G, d->d_in, 0, MOE__INIT_ZEROS, 0.0f);
            }
            rows = T * moe__slots_for(d, d->max_top_k);
        } else if (d->router != MOE_ROUTER_HASH)
            l->router = moe__add_linear(l, "router", 0, d->d_in, d->n_experts, d->router_bias == MOE_FLAG_ON, MOE__INIT_ZEROS);
        l->selection_bias = d->router == MOE_ROUTER_SIGMOID ? moe__add_tensor(l, "router.selection_bias", 1, d->n_experts, 0, 0, MOE__INIT_ZEROS, 0.0f) : -1;
        if (d->router == MOE_ROUTER_EXPERT_CHOICE) rows = d->n_experts * moe__expert_choice_tokens(d, T, d->max_top_k);
        if (moe__expert_noisy(d)) {
            l->noise.in = d->d_in; l->noise.out = d->n_experts; l->noise.b = -1; l->noise.input = -1;
            l->noise.w = d->router == MOE_ROUTER_HIERARCHICAL
                       ? moe__add_tensor(l, "router.noise_weight", 3, d->n_groups, d->n_experts / d->n_groups, d->d_in, MOE__INIT_ZEROS, 0.0f)
                       : moe__add_tensor(l, "router.noise_weight", 2, d->n_experts, d->d_in, 0, MOE__INIT_ZEROS, 0.0f);
        }
        moe__bank_plan(l, &l->bank[0], "experts", d->n_experts, d->d_in, d->d_hidden,
                       d->expert == MOE_EXPERT_GAUSSIAN ? 2 * d->d_expert_out : d->d_expert_out, rows);  /* Gaussian: mean | raw log-std */
        l->n_banks = 1;
        if (d->n_shared_experts > 0) {
            moe__bank_plan(l, &l->bank[1], "shared", d->n_shared_experts, d->d_in, d->d_shared_hidden, d->d_out, T * d->n_shared_experts);
            l->n_banks = 2;
            if (d->shared_gate == MOE_FLAG_ON)
                l->shared_gate_w = moe__add_tensor(l, "shared.gate.weight", 2, d->n_shared_experts, d->d_in, 0, MOE__INIT_UNIFORM,
                                                   1.0f / sqrtf((float)d->d_in));
        }
        memset(&l->combine, 0, sizeof l->combine);
        l->combine.w = l->combine.b = -1;
        if (d->combine == MOE_COMBINE_STACK)
            l->combine = moe__add_linear(l, "combine", 0, (int64_t)d->n_experts * d->d_expert_out, d->d_out, 1, MOE__INIT_UNIFORM);
        break;
    }
    case MOE_LAYER_MULTIGATE:
    case MOE_LAYER_TASK_TOWERS:
        moe__multitask_plan(l);
        break;
    default: break;
    }
}

/* Upper bound of the tiles of any one step (moe__plan_* below never exceed it). */
static int64_t moe__max_tiles(const moe_layer *l) {
    int64_t n = 0;
    int b, j;
    for (b = 0; b < l->n_banks; b++) {
        const moe__bank *k = &l->bank[b];
        for (j = 0; j < k->n_linears; j++) {
            const moe__linear *lin = &k->lin[j];
            int64_t wide = moe__max64(lin->in, lin->out);
            n += (k->max_rows / 8 + k->n) * (wide / (MOE__NB / 2) + 1);
            n += (int64_t)k->n * (lin->out / MOE__WTILE_ROWS + 1) * (lin->in / MOE__NB + 1);
            n += (int64_t)k->n * (lin->out / MOE__DECODE_ROWS + 1);
        }
    }
    return n + 1;
}

static void moe__banks_carve(moe_layer *l, moe__carver *saved, moe__carver *scratch);

/* Assign every activation buffer for max_tokens. Called with NULL bases to size. */
static void moe__layer_carve(moe_layer *l, moe__carver *saved, moe__carver *scratch) {
    const moe_layer_desc *d = &l->d;
    int64_t T = l->max_tokens;
    switch (d->kind) {
    case MOE_LAYER_DENSE:
        l->z = MOE__CARVE(saved, float, T * d->d_out);
#ifndef MOE_NO_TRAINING
        l->dz_dense = MOE__CARVE(scratch, float, T * d->d_out);
#endif
        break;
    case MOE_LAYER_RMSNORM:
    case MOE_LAYER_LAYERNORM:
        l->mean = MOE__CARVE(saved, float, T);
        l->rstd = MOE__CARVE(saved, float, T);
        break;
    case MOE_LAYER_MOE: {
        int64_t E = d->n_experts, K = moe__slots_for(d, d->max_top_k), D = d->d_in;
        int noisy = moe__expert_noisy(d), sigmoid = d->router == MOE_ROUTER_SIGMOID;
        int64_t L = d->router == MOE_ROUTER_SOFT ? moe__soft_slots(d) : E;  /* router logits per token */
        int hier = d->router == MOE_ROUTER_HIERARCHICAL, gnoisy = hier && d->group_router == MOE_ROUTER_NOISY_TOPK;
        int64_t G = hier ? d->n_groups : 0;
        l->key = sigmoid ? MOE__CARVE(saved, float, T * E) : NULL;
        l->group_score = sigmoid && d->n_groups > 1 ? MOE__CARVE(saved, float, T * d->n_groups) : NULL;
        l->group_sel = (sigmoid && d->n_groups > 1) || hier ? MOE__CARVE(saved, int32_t, T * d->n_groups) : NULL;
        l->bias_keep = sigmoid ? MOE__CARVE(saved, float, E) : NULL;
        l->shared_gate_v = l->shared_gate_w >= 0 ? MOE__CARVE(saved, float, T * d->n_shared_experts) : NULL;
        l->dshared_gate = l->shared_gate_w >= 0 ? MOE__CARVE(scratch, float, T * d->n_shared_experts) : NULL;
        l->xr = d->jitter > 0.0f ? MOE__CARVE(saved, float, T * D) : NULL;
        l->clean = MOE__CARVE(saved, float, T * L);
        l->raw = noisy ? MOE__CARVE(saved, float, T * E) : NULL;
        l->noise_n = noisy ? MOE__CARVE(saved, float, T * E) : NULL;
        l->h = noisy ? MOE__CARVE(saved, float, T * E) : l->clean;
        l->p = MOE__CARVE(saved, float, T * E);
        l->lse = MOE__CARVE(saved, float, T);
        l->entropy = MOE__CARVE(saved, float, T);
        l->sel = MOE__CARVE(saved, int32_t, T * K);
        l->pos = MOE__CARVE(saved, int32_t, T * K);
        l->gate = MOE__CARVE(saved, float, T * K);
        l->thr_in = MOE__CARVE(saved, int32_t, T);
        l->thr_out = MOE__CARVE(saved, int32_t, T);
        l->passthrough = MOE__CARVE(saved, int32_t, T);
        l->chosen = MOE__CARVE(saved, int64_t, E);
        l->kept = MOE__CARVE(saved, int64_t, E);
        l->chosen_cursor = MOE__CARVE(saved, int64_t, E);
        l->importance = MOE__CARVE(saved, float, E);
        l->load = MOE__CARVE(saved, float, E);
        moe__banks_carve(l, saved, scratch);
#ifndef MOE_NO_TRAINING
        l->dgate = MOE__CARVE(scratch, float, T * K);
        l->dh = MOE__CARVE(scratch, float, T * L);
        l->dclean = noisy ? MOE__CARVE(scratch, float, T * E) : l->dh;
        l->dstd = noisy ? MOE__CARVE(scratch, float, T * E) : NULL;
        l->dxu = MOE__CARVE(scratch, float, T * D);
        l->dimportance = MOE__CARVE(scratch, float, E);
        l->dload = MOE__CARVE(scratch, float, E);
#else
        (void)scratch;
#endif
        if (d->combine == MOE_COMBINE_STACK) {  /* T * E * d_expert_out may pass int64 at absurd sizes: then the carver refuses */
            size_t ncat = (double)T * (double)E * (double)d->d_expert_out > (double)MOE__MAX_BYTES ? SIZE_MAX : (size_t)(T * E * d->d_expert_out);
            l->cat = MOE__CARVE(saved, float, ncat);
#ifndef MOE_NO_TRAINING
            l->dcat = MOE__CARVE(scratch, float, ncat);
#endif
        }
        if (d->router == MOE_ROUTER_SOFT) {
            l->soft_combine = MOE__CARVE(saved, float, T * L);
            l->dispatch = MOE__CARVE(saved, float, T * L);
            l->slot_x = MOE__CARVE(saved, float, l->bank[0].max_rows * D);
            l->slot_row = MOE__CARVE(saved, int32_t, l->bank[0].max_rows);
#ifndef MOE_NO_TRAINING
            l->ddispatch = MOE__CARVE(scratch, float, T * L);
#endif
        }
        if (hier) {
            l->gclean = MOE__CARVE(saved, float, T * G);
            l->graw = gnoisy ? MOE__CARVE(saved, float, T * G) : NULL;
            l->gnoise = gnoisy ? MOE__CARVE(saved, float, T * G) : NULL;
            l->gh = gnoisy ? MOE__CARVE(saved, float, T * G) : l->gclean;
            l->gp = MOE__CARVE(saved, float, T * G);
            l->pw = MOE__CARVE(saved, float, T * E);
            l->ggate = MOE__CARVE(saved, float, T * d->top_k_groups);
#ifndef MOE_NO_TRAINING
            l->dgh = MOE__CARVE(scratch, float, T * G);
            l->dgclean = gnoisy ? MOE__CARVE(scratch, float, T * G) : l->dgh;
            l->dgstd = gnoisy ? MOE__CARVE(scratch, float, T * G) : NULL;
            l->dggate = MOE__CARVE(scratch, float, T * d->top_k_groups);
#endif
        }
        break;
    }
    case MOE_LAYER_MULTIGATE:
    case MOE_LAYER_TASK_TOWERS:
        l->mg_p = MOE__CARVE(saved, float, T * l->mg_cols);
        moe__banks_carve(l, saved, scratch);
        l->mg_dp = MOE__CARVE(scratch, float, T * l->mg_cols);
        break;
    default: break;
    }
}

/* The tiles and every bank's buffers. */
static void moe__banks_carve(moe_layer *l, moe__carver *saved, moe__carver *scratch) {
    int b, j;
    l->max_tiles = moe__max_tiles(l);
    l->tiles = MOE__CARVE(saved, moe__tile, l->max_tiles);
    for (b = 0; b < l->n_banks; b++) {
        moe__bank *k = &l->bank[b];
        int64_t R = k->max_rows;
        k->offsets = MOE__CARVE(saved, int64_t, k->n + 1);
        k->row_token = MOE__CARVE(saved, int32_t, R);
        if (moe__glu_kind(k->kind)) {
            k->z[0] = MOE__CARVE(saved, float, R * k->d_hidden);   /* x W1^T + b1 */
            k->z[1] = MOE__CARVE(saved, float, R * k->d_hidden);   /* x W3^T + b3 */
            k->a[0] = MOE__CARVE(saved, float, R * k->d_hidden);   /* act(z0) * z1 */
        } else {
            for (j = 0; j + 1 < k->n_linears; j++) {
                k->z[j] = MOE__CARVE(saved, float, R * k->d_hidden);
                k->a[j] = MOE__CARVE(saved, float, R * k->d_hidden);
            }
        }
        k->out = MOE__CARVE(saved, float, R * k->d_out);
#ifndef MOE_NO_TRAINING
        for (j = 0; j < k->n_linears; j++) k->dz[j] = MOE__CARVE(scratch, float, R * k->lin[j].out);
        k->da = moe__glu_kind(k->kind) ? MOE__CARVE(scratch, float, R * k->d_hidden) : NULL;
        k->dxr = MOE__CARVE(scratch, float, R * k->d_in);
#else
        (void)scratch;
#endif
    }
}

/* Deterministic initialisation: element i of tensor `stream` draws from (seed, stream, i). */
static void moe__layer_init_params(moe_layer *l, int64_t stream_base) {
    int t;
    for (t = 0; t < l->n_tensors; t++) {
        const moe__tdef *td = &l->tensors[t];
        float *p = l->params + td->offset;
        uint64_t stream = moe__stream(MOE__STREAM_INIT, 0, stream_base + t);
        int64_t i;
        for (i = 0; i < td->size; i++) {
            if (td->init == MOE__INIT_ONES) p[i] = 1.0f;
            else if (td->init == MOE__INIT_ZEROS) p[i] = 0.0f;
            else if (td->init == MOE__INIT_NORMAL) p[i] = moe_rng_normal(l->ctx->seed, stream, (uint64_t)i) * td->bound;
            else p[i] = (2.0f * moe_rng_uniform(l->ctx->seed, stream, (uint64_t)i) - 1.0f) * td->bound;
        }
    }
}

static float *moe__w(const moe_layer *l, int64_t off) { return l->params + off; }
#ifndef MOE_NO_TRAINING
static float *moe__g(const moe_layer *l, int64_t off) { return l->grads + off; }
#endif

// >>dense -------------------------------------------------------------------
/* x [T, d_in] -> y [T, d_out]; saves z = x W^T + b. */
static void moe__dense_forward(moe_layer *l, const float *x, int64_t T, float *y) {
    const moe_layer_desc *d = &l->d;
    int64_t O = d->d_out, D = d->d_in, t;
    moe__gemm g = moe__gemm_make(MOE__NT, T, O, D, moe__mat_of(x, D), moe__mat_of(moe__w(l, l->lin.w), D),
                                 l->z, O, 0, l->lin.b >= 0 ? moe__w(l, l->lin.b) : NULL);
    moe__gemm_run(&l->ex, &g);
    MOE__PARALLEL_FOR(l->ex.n_threads, (double)T * (double)O * 8.0)
    for (t = 0; t < T; t++) {
        int64_t j;
        moe__act_rows(d->activation, l->z + t * O, y + t * O, O);
        if (d->residual) for (j = 0; j < O; j++) y[t * O + j] += x[t * D + j];
    }
}

#ifndef MOE_NO_TRAINING
static void moe__dense_backward(moe_layer *l, const float *dy, float *dx) {
    const moe_layer_desc *d = &l->d;
    int64_t O = d->d_out, D = d->d_in, T = l->T, t;
    const float *dz = dy;
    moe__gemm g;
    if (d->activation != MOE_ACT_IDENTITY) {
        MOE__PARALLEL_FOR(l->ex.n_threads, (double)T * (double)O * 8.0)
        for (t = 0; t < T; t++) {
            int64_t j;
            for (j = 0; j < O; j++) l->dz_dense[t * O + j] = dy[t * O + j] * moe__act_grad(d->activation, l->z[t * O + j]);
        }
        dz = l->dz_dense;
    }
    g = moe__gemm_make(MOE__TN, O, D, T, moe__mat_of(dz, O), moe__mat_of(l->x, D), moe__g(l, l->lin.w), D, 1, NULL);
    moe__gemm_run(&l->ex, &g);
    if (l->lin.b >= 0) moe__colsum_acc(&l->ex, dz, T, O, O, moe__g(l, l->lin.b));
    if (dx) {
        g = moe__gemm_make(MOE__NN, T, D, O, moe__mat_of(dz, O), moe__mat_of(moe__w(l, l->lin.w), D), dx, D, 0, NULL);
        moe__gemm_run(&l->ex, &g);
        if (d->residual) {
            MOE__PARALLEL_FOR(l->ex.n_threads, (double)T * (double)D)
            for (t = 0; t < T; t++) {
                int64_t j;
                for (j = 0; j < D; j++) dx[t * D + j] += dy[t * O + j];
            }
        }
    }
}
#endif /* MOE_NO_TRAINING */

// >>norm --------------------------------------------------------------------
static void moe__norm_forward(moe_layer *l, const float *x, int64_t T, float *y) {
    const moe_layer_desc *d = &l->d;
    int64_t D = d->d_in, t;
    int layer_norm = d->kind == MOE_LAYER_LAYERNORM;
    const float *w = moe__w(l, l->norm_w), *bias = layer_norm ? moe__w(l, l->norm_b) : NULL;
    MOE__PARALLEL_FOR(l->ex.n_threads, (double)T * (double)D * 8.0)
    for (t = 0; t < T; t++) {
        const float *xt = x + t * D;
        float *yt = y + t * D;
        double mean = 0.0, var = 0.0;
        float m, r;
        int64_t j;
        if (layer_norm) {
            for (j = 0; j < D; j++) mean += xt[j];
            mean /= (double)D;
        }
        for (j = 0; j < D; j++) var += ((double)xt[j] - mean) * ((double)xt[j] - mean);
        var /= (double)D;
        m = (float)mean;
        r = (float)(1.0 / sqrt(var + (double)d->eps));
        l->mean[t] = m;
        l->rstd[t] = r;
        for (j = 0; j < D; j++) {
            float v = (xt[j] - m) * r * w[j];
            if (bias) v += bias[j];
            yt[j] = d->residual ? xt[j] + v : v;
        }
    }
}

#ifndef MOE_NO_TRAINING
static void moe__norm_backward(moe_layer *l, const float *dy, float *dx) {
    const moe_layer_desc *d = &l->d;
    int64_t D = d->d_in, T = l->T, t, cb, nb = (D + 63) / 64;
    int layer_norm = d->kind == MOE_LAYER_LAYERNORM;
    const float *w = moe__w(l, l->norm_w), *x = l->x;
    float *dw = moe__g(l, l->norm_w), *db = layer_norm ? moe__g(l, l->norm_b) : NULL;
    /* parameter gradients: split by column, tokens in order */
    MOE__PARALLEL_FOR(l->ex.n_threads, (double)T * (double)D * 4.0)
    for (cb = 0; cb < nb; cb++) {
        int64_t j0 = cb * 64, j1 = moe__min64(j0 + 64, D), s, j;
        for (s = 0; s < T; s++)
            for (j = j0; j < j1; j++) {
                float xhat = (x[s * D + j] - l->mean[s]) * l->rstd[s];
                dw[j] += dy[s * D + j] * xhat;
                if (db) db[j] += dy[s * D + j];
            }
    }
    if (!dx) return;
    MOE__PARALLEL_FOR(l->ex.n_threads, (double)T * (double)D * 8.0)
    for (t = 0; t < T; t++) {
        const float *xt = x + t * D, *gt = dy + t * D;
        float m = l->mean[t], r = l->rstd[t];
        double sum_g = 0.0, sum_gx = 0.0;
        float mg, mgx;
        int64_t j;
        for (j = 0; j < D; j++) {
            float gw = gt[j] * w[j];
            sum_g += gw;
            sum_gx += (double)gw * (double)((xt[j] - m) * r);
        }
        mg = layer_norm ? (float)(sum_g / (double)D) : 0.0f;
        mgx = (float)(sum_gx / (double)D);
        for (j = 0; j < D; j++) {
            float xhat = (xt[j] - m) * r;
            float v = r * (gt[j] * w[j] - mg - xhat * mgx);
            dx[t * D + j] = d->residual ? v + gt[j] : v;
        }
    }
}
#endif /* MOE_NO_TRAINING */

// >>embedding ---------------------------------------------------------------
/* Every x of a [T, n] block is a token id: an integer in 0..vocab_size-1. */
static moe_result moe__embedding_check(const moe_layer *l, const float *x, int64_t T) {
    int64_t n = l->d.d_in, i;
    for (i = 0; i < T * n; i++) {
        float v = x[i];
        if (!(v >= 0.0f && v < (float)l->d.vocab_size && v == floorf(v)))
            return moe__fail(l->ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: x[%lld, %lld] = %g is not a token id (an integer in 0..%lld)", l->index,
                             (long long)(i / n), (long long)(i % n), (double)v, (long long)l->d.vocab_size - 1);
    }
    return MOE_OK;
}

/* x [T, n] ids (checked) -> y [T, n * De]: y[t, p*De + j] = W[x[t, p], j]. */
static void moe__embedding_forward(moe_layer *l, const float *x, int64_t T, float *y) {
    int64_t n = l->d.d_in, De = l->d.d_embedding, t;
    const float *w = moe__w(l, l->embedding);
    MOE__PARALLEL_FOR(l->ex.n_threads, (double)T * (double)n * (double)De)
    for (t = 0; t < T; t++) {
        int64_t p;
        for (p = 0; p < n; p++) memcpy(y + (t * n + p) * De, w + (int64_t)x[t * n + p] * De, (size_t)De * sizeof(float));
    }
}

#ifndef MOE_NO_TRAINING
/* dW[id] += dy rows. Threads split the vocabulary (what they write) and each scans every token in
   order, so every row sums in token order for any thread count. Ids have no gradient: dx = 0. */
static void moe__embedding_backward(moe_layer *l, const float *dy, float *dx) {
    int64_t n = l->d.d_in, De = l->d.d_embedding, V = l->d.vocab_size, T = l->T, nb, b;
    const float *x = l->x;
    float *g = moe__g(l, l->embedding);
    nb = moe__min64(V, (int64_t)l->ex.n_threads);
    MOE__PARALLEL_FOR(l->ex.n_threads, (double)T * (double)n * (double)De)
    for (b = 0; b < nb; b++) {
        int64_t v0 = V * b / nb, v1 = V * (b + 1) / nb, i, j;
        for (i = 0; i < T * n; i++) {
            int64_t id = (int64_t)x[i];
            if (id < v0 || id >= v1) continue;
            for (j = 0; j < De; j++) g[id * De + j] += dy[i * De + j];
        }
    }
    if (dx) memset(dx, 0, (size_t)(T * n) * sizeof(float));
}
#endif /* MOE_NO_TRAINING */

// >>routing -----------------------------------------------------------------
/* Order of experts for selection: larger h first, ties to the lower index; NaN sorts last. */
static int moe__before(const float *h, int32_t a, int32_t b) {
    float ha = h[a] == h[a] ? h[a] : -FLT_MAX, hb = h[b] == h[b] ? h[b] : -FLT_MAX;
    return ha > hb || (ha == hb && a < b);
}

/* idx[0..n) = the first n experts in that order (-1 past E): one pass, each expert that beats
   the last kept one inserted in place. No scratch. */
static void moe__top_n(const float *h, int64_t E, int n, int32_t *idx) {
    int s, count = 0;
    int32_t e;
    for (e = 0; e < (int32_t)E; e++) {
        if (count == n && (n == 0 || !moe__before(h, e, idx[n - 1]))) continue;
        s = count < n ? count++ : n - 1;
        for (; s > 0 && moe__before(h, e, idx[s - 1]); s--) idx[s] = idx[s - 1];
        idx[s] = e;
    }
    for (s = count; s < n; s++) idx[s] = -1;
}

/* Softmax of token t's logits h into p, with its logsumexp and entropy. */
static void moe__route_softmax(moe_layer *l, int64_t t) {
    int64_t E = l->d.n_experts, e;
    const float *p = l->p + t * E;
    float ent = 0.0f;
    l->lse[t] = moe__softmax_row(l->h + t * E, l->p + t * E, E);
    for (e = 0; e < E; e++)
        if (p[e] > 0.0f) ent -= p[e] * logf(p[e]);
    l->entropy[t] = ent;
}

/* Sigmoid router: scores p = sigmoid(c); selection by p + selection bias among the experts of the
   top_k_groups best groups (group score: sum of its two largest biased scores); key holds the
   biased scores with the experts of other groups at -inf. */
static void moe__route_sigmoid(moe_layer *l, int64_t t, int K) {
    const moe_layer_desc *d = &l->d;
    int64_t E = d->n_experts, G = d->n_groups, n = E / G, e, q;
    const float *c = l->clean + t * E, *bias = moe__w(l, l->selection_bias);
    float *p = l->p + t * E, *key = l->key + t * E, sum = 0.0f, ent = 0.0f;
    for (e = 0; e < E; e++) { p[e] = moe__sigmoid(c[e]); key[e] = p[e] + bias[e]; sum += p[e]; }
    for (e = 0; e < E; e++)
        if (p[e] > 0.0f) ent -= p[e] / sum * logf(p[e] / sum);
    l->entropy[t] = ent;
    l->lse[t] = 0.0f;
    if (G > 1) {
        float *gs = l->group_score + t * G;
        int32_t *gsel = l->group_sel + t * G, top2[2];
        for (q = 0; q < G; q++) {
            moe__top_n(key + q * n, n, n < 2 ? 1 : 2, top2);
            gs[q] = key[q * n + top2[0]] + (n < 2 ? 0.0f : key[q * n + top2[1]]);
        }
        moe__top_n(gs, G, d->top_k_groups, gsel);
        for (q = 0; q < G; q++) gs[q] = 0.0f;   /* from here on gs marks the kept groups */
        for (q = 0; q < d->top_k_groups; q++) gs[gsel[q]] = 1.0f;
        for (e = 0; e < E; e++)
            if (gs[e / n] == 0.0f) key[e] = -INFINITY;
    }
    moe__top_n(key, E, K, l->sel + t * l->slots);
}

/* Hash router: k distinct experts e = moe_rng_u64(hash_seed, layer, id << 32 | c) mod E for draws
   c = 0, 1, ... (a repeat is skipped). */
static void moe__route_hash(moe_layer *l, int64_t t, int K) {
    int64_t E = l->d.n_experts, c;
    int32_t *sel = l->sel + t * l->slots;
    uint64_t id = (uint64_t)(uint32_t)l->token_ids[t] << 32;
    int n = 0, s, seen;
    for (c = 0; n < K; c++) {
        int32_t e = (int32_t)(moe_rng_u64(l->d.hash_seed, (uint64_t)l->index, id | (uint64_t)c) % (uint64_t)E);
        for (seen = 0, s = 0; s < n; s++) seen |= sel[s] == e;
        if (!seen) sel[n++] = e;
    }
    l->entropy[t] = 0.0f;
    l->lse[t] = 0.0f;
}

/* Gates of the chosen entries sel[0..n) of a softmax p over logits h: renormalised over the chosen
   (a softmax of their logits) or the probabilities themselves. */
static void moe__chosen_gates(const float *h, const float *p, const int32_t *sel, int64_t n, int renormalize, float *gate) {
    int64_t s;
    float sum = 0.0f;
    if (!renormalize) {
        for (s = 0; s < n; s++) gate[s] = p[sel[s]];
        return;
    }
    for (s = 0; s < n; s++) { gate[s] = expf(h[sel[s]] - h[sel[0]]); sum += gate[s]; }
    for (s = 0; s < n; s++) gate[s] /= sum;
}

/* Hierarchical router, token t: softmax gp over the group logits gh and the top_k_groups best
   groups; inside every group a softmax pw over its experts' logits (l->p = gp * pw, the
   probability of each expert); in each chosen group, best first, the k best experts. Gate = gate
   of the group * gate inside it, each renormalised over its level's choice when renormalize is on. */
static void moe__route_hierarchical(moe_layer *l, int64_t t) {
    const moe_layer_desc *d = &l->d;
    int64_t E = d->n_experts, G = d->n_groups, n = E / G, K = l->call_k, Kg = d->top_k_groups, e, q, i, j;
    int renorm = d->renormalize == MOE_FLAG_ON;
    const float *h = l->h + t * E, *gh = l->gh + t * G;
    float *gp = l->gp + t * G, *pw = l->pw + t * E, *p = l->p + t * E, *gg = l->ggate + t * Kg, *gate = l->gate + t * l->slots;
    float ent = 0.0f;
    int32_t *gsel = l->group_sel + t * G, *sel = l->sel + t * l->slots;
    moe__softmax_row(gh, gp, G);
    moe__top_n(gh, G, (int)Kg, gsel);
    moe__chosen_gates(gh, gp, gsel, Kg, renorm, gg);
    for (q = 0; q < G; q++) moe__softmax_row(h + q * n, pw + q * n, n);
    for (e = 0; e < E; e++) {
        p[e] = gp[e / n] * pw[e];
        if (p[e] > 0.0f) ent -= p[e] * logf(p[e]);
    }
    l->entropy[t] = ent;
    l->lse[t] = 0.0f;
    for (i = 0; i < Kg; i++) {
        int64_t base = (int64_t)gsel[i] * n;
        moe__top_n(h + base, n, (int)K, sel + i * K);
        moe__chosen_gates(h + base, pw + base, sel + i * K, K, renorm, gate + i * K);
        for (j = 0; j < K; j++) { sel[i * K + j] += (int32_t)base; gate[i * K + j] *= gg[i]; }
    }
}

/* Router scores, the k chosen experts of token t (unused slots: -1) and their gates. */
static void moe__route_token(moe_layer *l, int64_t t) {
    const moe_layer_desc *d = &l->d;
    int64_t E = d->n_experts, e;
    int K = l->call_k, s, n = K;
    const float *h = l->h + t * E, *p = l->p + t * E;
    float *gate = l->gate + t * l->slots;
    int32_t *sel = l->sel + t * l->slots;
    if (d->router == MOE_ROUTER_EXPERT_CHOICE) { moe__route_softmax(l, t); return; }  /* experts choose in dispatch */
    if (d->router == MOE_ROUTER_HIERARCHICAL) { moe__route_hierarchical(l, t); return; }
    if (d->router == MOE_ROUTER_HASH) {
        moe__route_hash(l, t, K);
        for (s = 0; s < K; s++) gate[s] = 1.0f / (float)K;
        return;
    }
    if (d->router == MOE_ROUTER_SIGMOID) {
        float sum = 0.0f;
        moe__route_sigmoid(l, t, K);
        for (s = 0; s < K; s++) sum += p[sel[s]];
        for (s = 0; s < K; s++)
            gate[s] = (d->renormalize == MOE_FLAG_ON ? p[sel[s]] / sum : p[sel[s]]) * d->routed_scaling_factor;
        return;
    }
    moe__route_softmax(l, t);
    moe__top_n(h, E, K, sel);
    if (l->call_top_p > 0.0f) {  /* the fewest leading slots whose probabilities reach top_p */
        double cum = 0.0;
        for (n = 0; n < K && cum < (double)l->call_top_p; n++) cum += (double)p[sel[n]];
    }
    if (d->router == MOE_ROUTER_NOISY_TOPK && K < E) {
        int32_t next = -1;
        for (e = 0; e < E; e++)
            if (moe__before(h, sel[K - 1], (int32_t)e) && (next < 0 || moe__before(h, (int32_t)e, next))) next = (int32_t)e;
        l->thr_out[t] = sel[K - 1];
        l->thr_in[t] = next;
    }
    moe__chosen_gates(h, p, sel, n, d->renormalize == MOE_FLAG_ON, gate);
    for (s = n; s < K; s++) { sel[s] = -1; gate[s] = 0.0f; }
}

/* Expert choice: expert e takes the C tokens with the largest p[., e] (ties: lower token first);
   rows are token-ordered within the expert. Slot e of token t is expert e (pos -1: not taken). */
static void moe__dispatch_expert_choice(moe_layer *l, int64_t T) {
    int64_t E = l->d.n_experts, C = moe__expert_choice_tokens(&l->d, T, l->call_k), e;
    moe__bank *b = &l->bank[0];
    const float *p = l->p;
    l->capacity = C;
    MOE__PARALLEL_FOR(l->ex.n_threads, (double)T * (double)C)
    for (e = 0; e < E; e++) {
        int32_t *list = b->row_token + e * C;  /* the best tokens so far, best first */
        int64_t n = 0, t, j, r = e * C;
        for (t = 0; t < T; t++) {
            float v = p[t * E + e];
            if (n == C && !(v > p[(int64_t)list[C - 1] * E + e])) continue;
            j = n < C ? n++ : C - 1;
            for (; j > 0 && v > p[(int64_t)list[j - 1] * E + e]; j--) list[j] = list[j - 1];
            list[j] = (int32_t)t;
        }
        for (t = 0; t < T; t++) { l->pos[t * E + e] = -1; l->sel[t * E + e] = (int32_t)e; l->gate[t * E + e] = p[t * E + e]; }
        for (j = 0; j < C; j++) l->pos[(int64_t)list[j] * E + e] = -2;
        for (t = 0; t < T; t++)
            if (l->pos[t * E + e] == -2) { b->row_token[r] = (int32_t)t; l->pos[t * E + e] = (int32_t)r++; }
        b->offsets[e + 1] = (e + 1) * C;
        l->chosen[e] = l->kept[e] = C;
    }
    b->offsets[0] = 0;
}

/* Capacity, then a stable counting sort of the kept (token, expert) pairs by expert. */
static void moe__dispatch(moe_layer *l, int64_t T) {
    const moe_layer_desc *d = &l->d;
    int64_t E = d->n_experts, K = l->slots, a, t, s, e;
    moe__bank *b = &l->bank[0];
    int64_t cap = 0;
    if (d->router == MOE_ROUTER_EXPERT_CHOICE) {
        moe__dispatch_expert_choice(l, T);
    } else {
        if (d->capacity_factor > 0.0f) cap = moe__capacity(d->capacity_factor, T, K, E);
        l->capacity = cap;
        for (e = 0; e < E; e++) { l->chosen[e] = 0; l->kept[e] = 0; }
        for (a = 0; a < T * K; a++)
            if (l->sel[a] >= 0) l->chosen[l->sel[a]]++;
        for (s = 0; s < K; s++)
            for (t = 0; t < T; t++) {
                a = t * K + s;
                e = l->sel[a];
                if (e < 0 || (cap && l->kept[e] >= cap)) l->pos[a] = -1;
                else { l->kept[e]++; l->pos[a] = 0; }
            }
        b->offsets[0] = 0;
        for (e = 0; e < E; e++) b->offsets[e + 1] = b->offsets[e] + l->kept[e];
        for (e = 0; e < E; e++) l->chosen_cursor[e] = b->offsets[e];
    }
    for (t = 0; t < T; t++) {
        int any = 0;
        for (s = 0; s < K; s++) {
            a = t * K + s;
            if (l->pos[a] < 0) continue;
            any = 1;
            if (d->router == MOE_ROUTER_EXPERT_CHOICE) continue;
            e = l->sel[a];
            l->pos[a] = (int32_t)l->chosen_cursor[e]++;
            b->row_token[l->pos[a]] = (int32_t)t;
        }
        l->passthrough[t] = !any;
    }
    if (l->n_banks > 1) {
        moe__bank *sh = &l->bank[1];
        int64_t j;
        for (j = 0; j <= sh->n; j++) sh->offsets[j] = j * T;
        for (a = 0; a < sh->n * T; a++) sh->row_token[a] = (int32_t)(a % T);
    }
}

/* CV^2 = var / (mean^2 + 1e-10) with the population variance; grad (may be NULL) gets dCV^2/dv. */
static double moe__cv2(const float *v, int64_t n, float *grad) {
    double mean = 0.0, var = 0.0, den, cv2;
    int64_t i;
    for (i = 0; i < n; i++) mean += v[i];
    mean /= (double)n;
    for (i = 0; i < n; i++) var += ((double)v[i] - mean) * ((double)v[i] - mean);
    var /= (double)n;
    den = mean * mean + 1e-10;
    cv2 = var / den;
    if (grad)
        for (i = 0; i < n; i++)
            grad[i] = (float)(((2.0 / (double)n) * ((double)v[i] - mean) * den - var * 2.0 * mean / (double)n) / (den * den));
    return cv2;
}

/* Which threshold applies to (t, e) for the load loss, and the normalised margin. */
static int32_t moe__load_threshold(const moe_layer *l, int64_t t, int64_t e) {
    const float *h = l->h + t * l->d.n_experts;
    return h[e] > h[l->thr_in[t]] ? l->thr_in[t] : l->thr_out[t];
}

/* Auxiliary losses and routing statistics; sums run in a fixed order. */
static void moe__aux_forward(moe_layer *l, int64_t T) {
    const moe_layer_desc *d = &l->d;
    int64_t E = d->n_experts, K = l->call_k, t, e, a;
    int64_t KS = l->slots;      /* (token, expert) entries per token: the balance loss's denominator */
    moe_stats *st = &l->stats;
    double sum, mean, var;
    memset(st, 0, sizeof *st);
    st->n_experts = (int)E;
    st->top_k = (int)K;
    st->n_tokens = T;
    st->tokens_per_expert = l->kept;
    if (d->balance_loss > 0.0f) {
        sum = 0.0;
        for (e = 0; e < E; e++) {
            double P = 0.0;
            for (t = 0; t < T; t++) P += l->p[t * E + e];
            sum += ((double)l->chosen[e] / (double)(T * KS)) * (P / (double)T);
        }
        st->balance_loss = (float)((double)d->balance_loss * (double)E * sum);
    }
    if (d->z_loss > 0.0f) {
        sum = 0.0;
        for (t = 0; t < T; t++) sum += (double)l->lse[t] * (double)l->lse[t];
        st->z_loss = (float)((double)d->z_loss * sum / (double)T);
    }
    if (d->importance_loss > 0.0f) {
        for (e = 0; e < E; e++) l->importance[e] = 0.0f;
        for (a = 0; a < T * l->slots; a++)
            if (l->sel[a] >= 0) l->importance[l->sel[a]] += l->gate[a];
        st->importance_loss = (float)((double)d->importance_loss * moe__cv2(l->importance, E, NULL));
    }
    if (d->load_loss > 0.0f && K < E && d->router == MOE_ROUTER_NOISY_TOPK) {
        for (e = 0; e < E; e++) l->load[e] = 0.0f;
        for (t = 0; t < T; t++)
            for (e = 0; e < E; e++) {
                int32_t j = moe__load_threshold(l, t, e);
                float sd = moe__softplus(l->raw[t * E + e]);
                l->load[e] += moe__phi_cdf((l->clean[t * E + e] - l->h[t * E + j]) / sd);
            }
        st->load_loss = (float)((double)d->load_loss * moe__cv2(l->load, E, NULL));
    }
    st->aux_loss = st->balance_loss + st->z_loss + st->importance_loss + st->load_loss;
    sum = 0.0;
    for (t = 0; t < T; t++) sum += l->entropy[t];
    st->router_entropy = (float)(sum / (double)T);
    mean = 0.0;
    for (e = 0; e < E; e++) mean += (double)l->kept[e];
    mean /= (double)E;
    var = 0.0;
    for (e = 0; e < E; e++) var += ((double)l->kept[e] - mean) * ((double)l->kept[e] - mean);
    var /= (double)E;
    st->load_cv = mean > 0.0 ? (float)(sqrt(var) / mean) : 0.0f;
    for (e = 0; e < E; e++) st->dropped_assignments += l->chosen[e] - l->kept[e];
    for (t = 0; t < T; t++) st->dropped_tokens += l->passthrough[t];
}

// >>moe_forward -------------------------------------------------------------
/* The A operand of a linear: the layer input through the bank's row permutation, or the
   activation of the previous linear; rows from r0 on. */
static moe__mat moe__bank_in(const moe__bank *b, const moe__linear *lin, const float *x, int64_t r0) {
    return lin->input < 0 ? moe__mat_rows(x, b->d_in, b->row_token + r0) : moe__mat_of(b->a[lin->input] + r0 * b->d_hidden, b->d_hidden);
}

static const float *moe__expert_w(const moe_layer *l, const moe__linear *lin, int64_t e) { return moe__w(l, lin->w) + e * lin->out * lin->in; }
static const float *moe__expert_b(const moe_layer *l, const moe__linear *lin, int64_t e) { return lin->b >= 0 ? moe__w(l, lin->b) + e * lin->out : NULL; }

/* The weights forwards read for linear j of expert e: the parameters, or their reduced copy. */
static moe__mat moe__expert_weights(const moe_layer *l, const moe__bank *b, int j, int64_t e) {
    const moe__linear *lin = &b->lin[j];
    moe__mat m = b->qw[j];
    if (l->wdtype == MOE_DTYPE_F32) return moe__mat_of(moe__expert_w(l, lin, e), lin->in);
    if (m.bf16) {
        m.bf16 += e * lin->out * lin->in;
    } else {
        m.q8 += e * lin->out * lin->in;
        m.scale += e * lin->out * m.groups;
    }
    return m;
}

/* Forward stages: SwiGLU / GeGLU w1 paired with w3, then w2; MLP one stage per linear. */
static int moe__bank_stages(const moe__bank *b) { return moe__glu_kind(b->kind) ? 2 : b->n_linears; }
static int moe__stage_linear(const moe__bank *b, int s) { return moe__glu_kind(b->kind) && s == 1 ? 2 : s; }

/* Floats per expert of forward stage s of bank b in the packed layout of kernel kn (moe_layer_pack):
   panels of PW output columns (a pair: PW of each weight side by side), each all K deep, NR wide. */
static int64_t moe__pack_stage_floats(const moe__bank *b, int s, const moe__kernel *kn) {
    const moe__linear *lin = &b->lin[moe__stage_linear(b, s)];
    int64_t PW = moe__glu_kind(b->kind) && s == 0 ? kn->nr / 2 : kn->nr;
    return (lin->out + PW - 1) / PW * kn->nr * lin->in;
}

/* Forward stage s for rows r0..r1 of expert e (the product's rows count from r0). */
static moe__gemm moe__forward_gemm(const moe_layer *l, const moe__bank *b, int64_t e, int s, int64_t r0, int64_t r1, const float *x) {
    const moe__linear *lin = &b->lin[moe__stage_linear(b, s)];
    int64_t H = b->d_hidden;
    int last = s == moe__bank_stages(b) - 1;
    moe__gemm g = moe__gemm_make(MOE__NT, r1 - r0, lin->out, lin->in, moe__bank_in(b, lin, x, r0),
                                 moe__expert_weights(l, b, moe__stage_linear(b, s), e), last ? b->out + r0 * b->d_out : b->z[s] + r0 * H,
                                 lin->out, 0, moe__expert_b(l, lin, e));
    if (l->wpack) {
        int bi = (int)(b - l->bank);
        g.Bp = l->wpack + l->wpack_off[bi][s] + e * moe__pack_stage_floats(b, s, &l->ex.kernel);
    }
    if (last) return g;
    if (moe__glu_kind(b->kind)) {
        g.pair = 1;
        g.B2 = moe__expert_weights(l, b, 1, e);
        g.C2 = b->z[1] + r0 * H;
        g.bias2 = moe__expert_b(l, &b->lin[1], e);
        g.epi = b->kind == MOE_EXPERT_GEGLU ? MOE__EPI_GEGLU : MOE__EPI_SWIGLU;
    } else {
        g.epi = MOE__EPI_ACT;
        g.act = b->act;
    }
    g.out0 = b->a[s] + r0 * H;
    g.c_transient = l->z_transient;
    return g;
}

#ifndef MOE_NO_TRAINING
/* Backward steps: SwiGLU w2, then w1 and w3 together; MLP one step per linear, last first. */
static int moe__bank_back_steps(const moe__bank *b) { return moe__bank_stages(b); }
static int moe__back_linear(const moe__bank *b, int q) { return moe__glu_kind(b->kind) ? (q == 0 ? 2 : 0) : b->n_linears - 1 - q; }

/* Gradient at the input of linear j for rows r0..r1 of expert e: dz[j] W_j, then through the
   previous activation (SwiGLU w2: into dz1, dz3); for j = 0 into dxr (second: the w3 half). */
static moe__gemm moe__input_grad_gemm(const moe_layer *l, const moe__bank *b, int64_t e, int j, int second, int64_t r0, int64_t r1) {
    const moe__linear *lin = &b->lin[second ? 1 : j];
    int64_t H = b->d_hidden, ldz = lin->out;
    moe__gemm g = moe__gemm_make(MOE__NN, r1 - r0, lin->in, lin->out, moe__mat_of(b->dz[second ? 1 : j] + r0 * ldz, ldz),
                                 moe__mat_of(moe__expert_w(l, lin, e), lin->in), NULL, lin->in, second, NULL);
    if (moe__glu_kind(b->kind) && j == 2) {
        g.C = b->da + r0 * H;
        g.c_transient = 1;  /* da only feeds the epilogue */
        g.epi = b->kind == MOE_EXPERT_GEGLU ? MOE__EPI_GEGLU_GRAD : MOE__EPI_SWIGLU_GRAD;
        g.in0 = b->z[0] + r0 * H; g.in1 = b->z[1] + r0 * H;
        g.out0 = b->dz[0] + r0 * H; g.out1 = b->dz[1] + r0 * H;
    } else if (j > 0) {
        g.C = b->dz[j - 1] + r0 * H;
        g.epi = MOE__EPI_ACT_GRAD;
        g.act = b->act;
        g.in0 = b->z[j - 1] + r0 * H;
    } else {
        g.C = b->dxr + r0 * b->d_in;
    }
    return g;
}

/* dW_j[e] += dz_j^T in_j over output rows r0..r1, columns c0..c1; db_j on the first column block. */
static void moe__weight_grad_tile(const moe_layer *l, const moe__bank *b, const moe__tile *t, const float *x) {
    const moe__linear *lin = &b->lin[t->linear];
    int64_t e = t->expert, base = b->offsets[e], n = b->offsets[e + 1] - base, o, r;
    const float *dz = b->dz[t->linear] + base * lin->out;
    moe__gemm g = moe__gemm_make(MOE__TN, lin->out, lin->in, n, moe__mat_of(dz, lin->out), moe__bank_in(b, lin, x, base),
                                 moe__g(l, lin->w) + e * lin->out * lin->in, lin->in, 1, NULL);
    moe__gemm_block(&l->ex, &g, t->r0, t->r1, t->c0, t->c1);
    if (lin->b >= 0 && t->c0 == 0) {
        float *gb = moe__g(l, lin->b) + e * lin->out;
        for (o = t->r0; o < t->r1; o++) {
            float s = 0.0f;
            for (r = 0; r < n; r++) s += dz[r * lin->out + o];
            gb[o] += s;
        }
    }
}
#endif /* MOE_NO_TRAINING */

static void moe__decode_tile(const moe_layer *l, const moe__tile *t, const float *x);

static void moe__run_tile(const moe_layer *l, const moe__tile *t, const float *x) {
    const moe__bank *b = &l->bank[t->bank];
    moe__gemm g;
    switch (t->kind) {
    case MOE__TILE_FORWARD:
        g = moe__forward_gemm(l, b, t->expert, t->linear, t->r0, t->r1, x);
        moe__gemm_block(&l->ex, &g, 0, t->r1 - t->r0, t->c0, t->c1);
        break;
#ifndef MOE_NO_TRAINING
    case MOE__TILE_INPUT_GRAD:
        g = moe__input_grad_gemm(l, b, t->expert, t->linear, 0, t->r0, t->r1);
        moe__gemm_block(&l->ex, &g, 0, t->r1 - t->r0, t->c0, t->c1);
        if (moe__glu_kind(b->kind) && t->linear == 0) {
            g = moe__input_grad_gemm(l, b, t->expert, 0, 1, t->r0, t->r1);
            moe__gemm_block(&l->ex, &g, 0, t->r1 - t->r0, t->c0, t->c1);
        }
        break;
    case MOE__TILE_WEIGHT_GRAD:
        moe__weight_grad_tile(l, b, t, x);
        break;
#endif
    default:
        moe__decode_tile(l, t, x);
        break;
    }
}

static void moe__add_tile(moe_layer *l, int b, int64_t e, int j, int kind, int64_t r0, int64_t r1, int64_t c0, int64_t c1, double depth) {
    moe__tile *t = &l->tiles[l->n_tiles++];
    MOE_ASSERT(l->n_tiles <= l->max_tiles);
    t->bank = b; t->expert = (int32_t)e; t->linear = j; t->kind = kind;
    t->r0 = r0; t->r1 = r1; t->c0 = c0; t->c1 = c1;
    t->cost = 2.0 * (double)(r1 - r0) * (double)(c1 - c0) * depth;
}

/* Rows of every expert of bank b in as few chunks of at most `rows` (a multiple of MOE__MR_MAX) as
   there can be, of equal size in whole micro-panels (530 rows: one tile, not 512 + 18, which would
   pack the expert's weights twice), times column blocks of `cols`. */
static void moe__plan_rows(moe_layer *l, int b, int j, int kind, int64_t N, int64_t cols, double depth, int64_t rows) {
    const moe__bank *k = &l->bank[b];
    int64_t e, r, c;
    for (e = 0; e < k->n; e++) {
        int64_t n = k->offsets[e + 1] - k->offsets[e], pieces = (n + rows - 1) / rows;
        int64_t chunk = pieces ? ((n + pieces - 1) / pieces + MOE__MR_MAX - 1) / MOE__MR_MAX * MOE__MR_MAX : rows;
        for (r = k->offsets[e]; r < k->offsets[e + 1]; r += chunk)
            for (c = 0; c < N; c += cols)
                moe__add_tile(l, b, e, j, kind, r, moe__min64(r + chunk, k->offsets[e + 1]), c, moe__min64(c + cols, N), depth);
    }
}

#ifndef MOE_NO_TRAINING
static void moe__plan_weights(moe_layer *l, int b, int j) {
    const moe__bank *k = &l->bank[b];
    const moe__linear *lin = &k->lin[j];
    int64_t e, r, c;
    for (e = 0; e < k->n; e++) {
        int64_t n = k->offsets[e + 1] - k->offsets[e];
        if (n == 0) continue;
        for (r = 0; r < lin->out; r += MOE__WTILE_ROWS)
            for (c = 0; c < lin->in; c += MOE__NB)
                moe__add_tile(l, b, e, j, MOE__TILE_WEIGHT_GRAD, r, moe__min64(r + MOE__WTILE_ROWS, lin->out), c,
                              moe__min64(c + MOE__NB, lin->in), (double)n);
    }
}
#endif /* MOE_NO_TRAINING */

static int moe__tile_cmp(const void *pa, const void *pb) {
    const moe__tile *a = (const moe__tile *)pa, *b = (const moe__tile *)pb;
    if (a->bank != b->bank) return a->bank - b->bank;
    if (a->expert != b->expert) return a->expert - b->expert;
    if (a->linear != b->linear) return a->linear - b->linear;
    if (a->kind != b->kind) return a->kind - b->kind;
    if (a->r0 != b->r0) return a->r0 < b->r0 ? -1 : 1;
    return a->c0 < b->c0 ? -1 : a->c0 > b->c0;
}

/* The tiles of one step over all experts (forward stage, or backward step with want_dx),
   rows split finer while there are too few tiles to keep every thread busy, in order of bank,
   expert, product, rows and columns (moe__run_step joins neighbouring column blocks). */
static double moe__plan_step(moe_layer *l, int backward, int q, int want_dx) {
    int64_t rows = MOE__TILE_ROWS;
    double total = 0.0;
    int64_t i;
    for (;;) {
        int b;
        l->n_tiles = 0;
        for (b = 0; b < l->n_banks; b++) {
            const moe__bank *k = &l->bank[b];
            if (!backward) {
                const moe__linear *lin = &k->lin[moe__stage_linear(k, q)];
                int pair = moe__glu_kind(k->kind) && q == 0;
                moe__plan_rows(l, b, q, MOE__TILE_FORWARD, lin->out, pair ? MOE__NB / 2 : MOE__NB,
                               (double)lin->in * (pair ? 2.0 : 1.0), rows);
            } else {
#ifndef MOE_NO_TRAINING
                int j = moe__back_linear(k, q), two = moe__glu_kind(k->kind) && j == 0;
                if (j > 0 || want_dx)
                    moe__plan_rows(l, b, j, MOE__TILE_INPUT_GRAD, k->lin[j].in, MOE__NB, (double)k->lin[j].out * (two ? 2.0 : 1.0), rows);
                moe__plan_weights(l, b, j);
                if (two) moe__plan_weights(l, b, 1);
#else
                (void)want_dx;
#endif
            }
        }
        if (l->n_tiles >= 4 * (int64_t)l->ex.n_threads || rows <= 64) break;
        rows /= 2;
    }
    qsort(l->tiles, (size_t)l->n_tiles, sizeof *l->tiles, moe__tile_cmp);
    for (i = 0; i < l->n_tiles; i++) total += l->tiles[i].cost;
    return total;
}

/* Decode tile: weight rows c0..c1 of forward stage `linear` of one expert, for all its rows. */
static void moe__decode_tile(const moe_layer *l, const moe__tile *t, const float *x) {
    const moe__bank *b = &l->bank[t->bank];
    int s = t->linear, j = moe__stage_linear(b, s), last = s == moe__bank_stages(b) - 1, pair = moe__glu_kind(b->kind) && s == 0;
    const moe__linear *lin = &b->lin[j];
    int64_t e = t->expert, r0 = b->offsets[e], H = b->d_hidden, o, ld = lin->out;
    int m = (int)(b->offsets[e + 1] - r0), r;
    const float *in[MOE__DECODE_TOKENS];
    const float *bias = moe__expert_b(l, lin, e), *bias2 = pair ? moe__expert_b(l, &b->lin[1], e) : NULL;
    moe__mat W = moe__expert_weights(l, b, j, e), W2 = pair ? moe__expert_weights(l, b, 1, e) : W;
    float v[MOE__DECODE_TOKENS], v2[MOE__DECODE_TOKENS];
    float *dst = last ? b->out + r0 * b->d_out : b->z[s] + r0 * H;
    const int16_t *qin[MOE__DECODE_TOKENS];
    const uint16_t *qhi[MOE__DECODE_TOKENS], *qlo[MOE__DECODE_TOKENS];
    const float *qsc[MOE__DECODE_TOKENS];
    int64_t qg = (b->q_ld + MOE__QGROUP - 1) / MOE__QGROUP;
    int q8 = l->wdtype == MOE_DTYPE_I8;
    for (r = 0; r < m; r++) {
        moe__mat a = moe__bank_in(b, lin, x, r0);
        in[r] = moe__row(&a, r);
        if (b->qact) {
            qin[r] = b->xq[s % 2] + (r0 + r) * b->q_stride;
            qhi[r] = (const uint16_t *)qin[r]; qlo[r] = qhi[r] + b->q_ld;
            if (q8) qsc[r] = b->xs[s % 2] + (r0 + r) * qg;
        }
    }
    for (o = t->c0; o < t->c1; o++) {
        if (b->qact && q8) {
            l->ex.kernel.dot_q8(&W, o, qin, qsc, m, lin->in, v);
            if (pair) l->ex.kernel.dot_q8(&W2, o, qin, qsc, m, lin->in, v2);
        } else if (b->qact) {
            l->ex.kernel.dot_bf16(&W, o, qhi, qlo, m, lin->in, v);
            if (pair) l->ex.kernel.dot_bf16(&W2, o, qhi, qlo, m, lin->in, v2);
        } else {
            l->ex.kernel.dot(&W, o, in, m, lin->in, v);
            if (pair) l->ex.kernel.dot(&W2, o, in, m, lin->in, v2);
        }
        for (r = 0; r < m; r++) {
            float z = v[r] + (bias ? bias[o] : 0.0f);
            dst[r * ld + o] = z;
            if (pair) {
                float z3 = v2[r] + (bias2 ? bias2[o] : 0.0f);
                b->z[1][(r0 + r) * H + o] = z3;
                b->a[0][(r0 + r) * H + o] = moe__act(b->act, z) * z3;  /* silu or gelu: as the epilogue */
            } else if (!last) {
                b->a[s][(r0 + r) * H + o] = moe__act(b->act, z);
            }
        }
    }
    /* the next stage's input: these columns are one group (tiles of MOE__DECODE_ROWS = MOE__QGROUP) */
    if (b->qact && !last)
        for (r = 0; r < m; r++) {
            const float *act = b->a[pair ? 0 : s] + (r0 + r) * H + t->c0;
            int16_t *row = b->xq[(s + 1) % 2] + (r0 + r) * b->q_stride + t->c0;
            if (q8) b->xs[(s + 1) % 2][(r0 + r) * qg + t->c0 / MOE__QGROUP] = moe__quant_group(act, t->c1 - t->c0, row);
            else moe__split_bf16(act, t->c1 - t->c0, (uint16_t *)row, (uint16_t *)row + b->q_ld);
        }
}

/* Reduced weights on the decode path: the first stage's input rows in int16 or bf16 halves (later
   stages' are written by the tiles before them), where the bank's rows fit the buffers. */
static void moe__decode_quant_inputs(moe_layer *l, const float *x) {
    int b;
    for (b = 0; b < l->n_banks; b++) {
        moe__bank *k = &l->bank[b];
        int64_t rows = k->offsets[k->n], qg = (k->q_ld + MOE__QGROUP - 1) / MOE__QGROUP, r;
        moe__mat in = moe__bank_in(k, &k->lin[0], x, 0);
        k->qact = (l->wdtype == MOE_DTYPE_I8 || (l->wdtype == MOE_DTYPE_BF16 && l->ex.kernel.dot_bf16)) && k->xq[0] && rows <= k->q_rows;
        for (r = 0; k->qact && r < rows; r++) {
            int16_t *row = k->xq[0] + r * k->q_stride;
            if (l->wdtype == MOE_DTYPE_I8) moe__quant_row(moe__row(&in, r), k->d_in, row, k->xs[0] + r * qg);
            else moe__split_bf16(moe__row(&in, r), k->d_in, (uint16_t *)row, (uint16_t *)row + k->q_ld);
        }
    }
}

/* Decode tiles of forward stage q: every expert with rows, weight rows in blocks. */
static double moe__plan_decode(moe_layer *l, int q) {
    double total = 0.0;
    int b;
    l->n_tiles = 0;
    for (b = 0; b < l->n_banks; b++) {
        const moe__bank *k = &l->bank[b];
        const moe__linear *lin = &k->lin[moe__stage_linear(k, q)];
        int64_t e, c;
        for (e = 0; e < k->n; e++) {
            int64_t m = k->offsets[e + 1] - k->offsets[e];
            if (m == 0) continue;
            for (c = 0; c < lin->out; c += MOE__DECODE_ROWS) {
                moe__add_tile(l, b, e, q, MOE__TILE_DECODE, k->offsets[e], k->offsets[e + 1], c, moe__min64(c + MOE__DECODE_ROWS, lin->out),
                              (double)lin->in);
                total += l->tiles[l->n_tiles - 1].cost;
            }
        }
    }
    return total;
}

/* Inference on few tokens takes the decode path; its plain twin is the reference GEMM. */
static int moe__use_decode(const moe_layer *l, int64_t T) {
    return !l->training && T <= MOE__DECODE_TOKENS && l->ctx->kernels != MOE_KERNELS_REFERENCE;
}

/* Whether tile b continues tile a: the same product and rows, the next columns. */
static int moe__tile_joins(const moe__tile *a, const moe__tile *b) {
    return a->kind != MOE__TILE_DECODE && a->kind == b->kind && a->bank == b->bank && a->expert == b->expert &&
           a->linear == b->linear && a->r0 == b->r0 && a->r1 == b->r1 && a->c1 == b->c0;
}

/* Tiles i0..i1 on the calling thread; a run of joining tiles is one call, which packs A once. */
static void moe__run_tiles(const moe_layer *l, int64_t i0, int64_t i1, const float *x) {
    while (i0 < i1) {
        moe__tile t = l->tiles[i0];
        int64_t j = i0 + 1;
        while (j < i1 && moe__tile_joins(&l->tiles[j - 1], &l->tiles[j])) t.c1 = l->tiles[j++].c1;
        moe__run_tile(l, &t, x);
        i0 = j;
    }
}

/* Run the planned tiles over the threads; each writes only its own block. Threads claim runs of
   consecutive tiles, large first and shrinking (a quarter of each thread's share of what is left),
   so neighbouring column blocks of one expert mostly share a packed A while the last claims, single
   tiles, balance the threads (also when one of them is held up). */
static void moe__run_step(moe_layer *l, double work, const float *x) {
#ifdef _OPENMP
    int64_t next = 0, n = l->n_tiles;
    int nt = l->ex.n_threads;
    MOE__PRAGMA(omp parallel num_threads(nt) if(nt > 1 && work >= MOE__PARALLEL_MIN_WORK))
    {
        int64_t i0, i1;
        for (;;) {
            MOE__PRAGMA(omp critical(moe_tile_claim))
            {
                i0 = next;
                i1 = moe__min64(n, i0 + moe__max64(1, (n - i0) / (4 * (int64_t)omp_get_num_threads())));
                next = i1;
            }
            if (i0 >= n) break;
            moe__run_tiles(l, i0, i1, x);
        }
    }
#else
    (void)work;
    moe__run_tiles(l, 0, l->n_tiles, x);
#endif
}

/* Every forward stage of the experts over input rows x (decode: the matrix-vector path for few
   tokens). An inference forward keeps only the activations, not the pre-activations the GLU or
   MLP epilogue reads them from (each tile's stay in a scratch: less memory traffic); should a
   backward follow it, moe__restore_z computes them again, bit for bit as a training forward. */
static void moe__run_stages(moe_layer *l, int64_t T, const float *x, int decode) {
    int q, n = moe__bank_stages(&l->bank[0]);
    decode = decode && moe__use_decode(l, T);
    if (decode) moe__decode_quant_inputs(l, x);
    l->stage_x = x;
    l->z_transient = !l->training && !decode;
    l->z_stale = l->z_transient && n > 1;
    for (q = 0; q < n; q++) moe__run_step(l, decode ? moe__plan_decode(l, q) : moe__plan_step(l, 0, q, 0), x);
}

#ifndef MOE_NO_TRAINING
static void moe__restore_z(moe_layer *l) {
    int q;
    if (!l->z_stale) return;
    l->z_transient = 0;
    for (q = 0; q + 1 < moe__bank_stages(&l->bank[0]); q++) moe__run_step(l, moe__plan_step(l, 0, q, 0), l->stage_x);
    l->z_stale = 0;
}
#endif

static float moe__clamp_log_std(float v) {
    return v < MOE_MIXTURE_LOG_STD_MIN ? MOE_MIXTURE_LOG_STD_MIN : v > MOE_MIXTURE_LOG_STD_MAX ? MOE_MIXTURE_LOG_STD_MAX : v;
}

/* Gaussian experts: y [T, E (1 + 2 O)] = (log pi | means | log-stds). log pi of a chosen expert is the
   log of its renormalised gate, computed from the logits; unchosen experts get -inf, mean and log-std 0. */
static void moe__gaussian_pack(moe_layer *l, int64_t T, float *y) {
    int64_t E = l->d.n_experts, K = l->slots, O = l->d.d_out, W = E * (1 + 2 * O), t;
    const moe__bank *b = &l->bank[0];
    MOE__PARALLEL_FOR(l->ex.n_threads, (double)T * (double)W * 2.0)
    for (t = 0; t < T; t++) {
        float *yt = y + t * W, m, sum = 0.0f, lz;
        const float *h = l->h + t * E;
        const int32_t *sel = l->sel + t * K, *pos = l->pos + t * K;
        int64_t s, j;
        for (j = 0; j < E; j++) yt[j] = -INFINITY;
        for (j = E; j < W; j++) yt[j] = 0.0f;
        m = h[sel[0]];  /* slot 0 holds the largest logit */
        for (s = 0; s < K; s++)
            if (sel[s] >= 0) sum += expf(h[sel[s]] - m);
        lz = logf(sum);
        for (s = 0; s < K; s++) {
            int64_t e = sel[s];
            const float *o;
            if (e < 0) continue;
            o = b->out + (int64_t)pos[s] * 2 * O;
            yt[e] = (h[e] - m) - lz;
            for (j = 0; j < O; j++) {
                yt[E + e * O + j] = o[j];
                yt[E + E * O + e * O + j] = moe__clamp_log_std(o[O + j]);
            }
        }
    }
}

static int64_t moe__argmax(const float *v, int64_t n) {
    int64_t i, best = 0;
    for (i = 1; i < n; i++)
        if (v[i] > v[best]) best = i;
    return best;
}

/* Stacking: cat[t, e De + j] = gate * f_e(x_t)[j] (zeros for experts not chosen), then
   y = cat Wc^T + bc, on top of x for residual layers and pass-through tokens. */
static void moe__stack_forward(moe_layer *l, const float *x, int64_t T, float *y) {
    const moe_layer_desc *d = &l->d;
    int64_t K = l->slots, De = d->d_expert_out, W = d->n_experts * De, D = d->d_in, O = d->d_out, t;
    moe__gemm g;
    MOE__PARALLEL_FOR(l->ex.n_threads, (double)T * (double)(W + O))
    for (t = 0; t < T; t++) {
        float *ct = l->cat + t * W, *yt = y + t * O;
        const float *xt = x + t * D;
        int64_t s, j;
        int pass = l->passthrough[t] && !d->residual && O == D;
        memset(ct, 0, (size_t)W * sizeof(float));
        for (s = 0; s < K; s++) {
            int32_t r = l->pos[t * K + s];
            float gw = l->gate[t * K + s], *dst;
            const float *o;
            if (r < 0) continue;
            o = l->bank[0].out + (int64_t)r * De;
            dst = ct + (int64_t)l->sel[t * K + s] * De;
            for (j = 0; j < De; j++) dst[j] = gw * o[j];
        }
        for (j = 0; j < O; j++) yt[j] = (d->residual || pass) ? xt[j] : 0.0f;
    }
    g = moe__gemm_make(MOE__NT, T, O, W, moe__mat_of(l->cat, W), moe__mat_of(moe__w(l, l->combine.w), W), y, O, 1, moe__w(l, l->combine.b));
    moe__gemm_run(&l->ex, &g);
}

/* Voting (inference): every chosen expert votes for the argmax of its logits (ties: the lower
   class). VOTE: y[c] = sum of the voters' gates; VOTE_MAJORITY: y[c] = count_c + 0.5 * gates_c / G. */
static void moe__vote_forward(moe_layer *l, int64_t T, float *y) {
    const moe_layer_desc *d = &l->d;
    int64_t K = l->slots, O = d->d_out, t;
    int majority = d->combine == MOE_COMBINE_VOTE_MAJORITY;
    MOE__PARALLEL_FOR(l->ex.n_threads, (double)T * (double)O * (double)K)
    for (t = 0; t < T; t++) {
        float *yt = y + t * O, total = 0.0f;
        int64_t s, c;
        memset(yt, 0, (size_t)O * sizeof(float));
        for (s = 0; s < K; s++) {
            int32_t r = l->pos[t * K + s];
            if (r < 0) continue;
            yt[moe__argmax(l->bank[0].out + (int64_t)r * O, O)] += l->gate[t * K + s];
            total += l->gate[t * K + s];
        }
        if (!majority) continue;
        for (c = 0; c < O; c++) yt[c] = total > 0.0f ? 0.5f * yt[c] / total : 0.0f;
        for (s = 0; s < K; s++) {
            int32_t r = l->pos[t * K + s];
            if (r >= 0) yt[moe__argmax(l->bank[0].out + (int64_t)r * O, O)] += 1.0f;
        }
    }
}

/* Soft router: slot j = e*S + s of group g is row e*G*S + g*S + s of the expert bank. */
static int64_t moe__soft_row(int64_t G, int64_t S, int64_t g, int64_t j) { return (j / S) * G * S + g * S + j % S; }

/* Soft MoE (Puigcerver 2023) over G groups of m tokens: logits L = x Phi^T [T, E*S]; combine
   weights C = softmax of each token's row; dispatch weights D = softmax of each slot's column over
   the tokens of its group; slot inputs X~ = D^T x per group; expert e runs its S slots of every
   group as its rows of the grouped GEMM; y_t = sum_j C[t, j] Y~[g(t), j] (+ x_t with residual). */
static void moe__soft_forward(moe_layer *l, const float *x, int64_t T, float *y) {
    const moe_layer_desc *d = &l->d;
    int64_t E = d->n_experts, S = d->slots_per_expert, L = E * S, D = d->d_in, O = d->d_out, G = moe__soft_groups(d, T), m = T / G, t, i, e;
    moe__bank *b = &l->bank[0];
    moe__gemm g = moe__gemm_make(MOE__NT, T, L, D, moe__mat_of(x, D), moe__mat_of(moe__w(l, l->router.w), D), l->clean, L, 0, NULL);
    moe__gemm_run(&l->ex, &g);
    l->soft_groups = G;
    MOE__PARALLEL_FOR(l->ex.n_threads, (double)T * (double)L * 20.0)
    for (t = 0; t < T; t++) {
        const float *c = l->soft_combine + t * L;
        float ent = 0.0f;
        int64_t j;
        l->lse[t] = moe__softmax_row(l->clean + t * L, l->soft_combine + t * L, L);
        for (j = 0; j < L; j++)
            if (c[j] > 0.0f) ent -= c[j] * logf(c[j]);
        l->entropy[t] = ent;
    }
    MOE__PARALLEL_FOR(l->ex.n_threads, (double)T * (double)L * 20.0)
    for (i = 0; i < G * L; i++) {  /* dispatch weights: softmax of slot j's column over group g's tokens */
        int64_t t0 = (i / L) * m, k;
        float mx = -FLT_MAX, sum = 0.0f, *dw = l->dispatch + t0 * L + i % L;
        const float *lg = l->clean + t0 * L + i % L;
        for (k = 0; k < m; k++) mx = lg[k * L] > mx ? lg[k * L] : mx;
        for (k = 0; k < m; k++) { dw[k * L] = expf(lg[k * L] - mx); sum += dw[k * L]; }
        for (k = 0; k < m; k++) dw[k * L] /= sum;
    }
    for (i = 0; i < G; i++) {  /* slot inputs of group i: Dw^T x */
        g = moe__gemm_make(MOE__TN, L, D, m, moe__mat_of(l->dispatch + i * m * L, L), moe__mat_of(x + i * m * D, D), l->slot_x + i * L * D, D, 0, NULL);
        moe__gemm_run(&l->ex, &g);
    }
    b->offsets[0] = 0;
    for (e = 0; e < E; e++) { b->offsets[e + 1] = (e + 1) * G * S; l->chosen[e] = l->kept[e] = G * S; }
    for (i = 0; i < G * L; i++) {
        l->slot_row[i] = (int32_t)moe__soft_row(G, S, i / L, i % L);
        b->row_token[l->slot_row[i]] = (int32_t)i;
    }
    for (t = 0; t < T; t++) l->passthrough[t] = 0;
    moe__aux_forward(l, T);
    moe__run_stages(l, T, l->slot_x, 0);
    if (d->residual) memcpy(y, x, (size_t)(T * O) * sizeof(float));
    for (i = 0; i < G; i++) {  /* y of group i (+= with residual): C Y~, the slots' rows gathered */
        g = moe__gemm_make(MOE__NN, m, O, L, moe__mat_of(l->soft_combine + i * m * L, L), moe__mat_rows(b->out, O, l->slot_row + i * L),
                           y + i * m * O, O, d->residual, NULL);
        moe__gemm_run(&l->ex, &g);
    }
}

/* Hierarchical router: group logits gclean = u Wg^T (+ bg) [T, G]; with a noisy group gate also
   gh = gclean + n * softplus(u Wgn^T), n standard normal while training (router_noise[T*E + i]). */
static void moe__group_logits(moe_layer *l, const float *u, int64_t T, const float *noise) {
    int64_t G = l->d.n_groups, D = l->d.d_in, E = l->d.n_experts, i;
    moe__gemm g = moe__gemm_make(MOE__NT, T, G, D, moe__mat_of(u, D), moe__mat_of(moe__w(l, l->group_router.w), D), l->gclean, G, 0,
                                 l->group_router.b >= 0 ? moe__w(l, l->group_router.b) : NULL);
    uint64_t stream = moe__stream(MOE__STREAM_NOISE, l->index, l->noise_step);
    moe__gemm_run(&l->ex, &g);
    if (l->group_noise.w < 0) return;
    g = moe__gemm_make(MOE__NT, T, G, D, moe__mat_of(u, D), moe__mat_of(moe__w(l, l->group_noise.w), D), l->graw, G, 0, NULL);
    moe__gemm_run(&l->ex, &g);
    for (i = 0; i < T * G; i++) {
        float n = !l->training ? 0.0f : noise ? noise[T * E + i] : moe_rng_normal(l->ctx->seed, stream, (uint64_t)(T * E + i));
        l->gnoise[i] = n;
        l->gh[i] = l->gclean[i] + n * moe__softplus(l->graw[i]);
    }
}

static void moe__moe_forward(moe_layer *l, const float *x, int64_t T, float *y, const float *noise) {
    const moe_layer_desc *d = &l->d;
    int64_t E = d->n_experts, K = l->slots, D = d->d_in, O = d->d_out, t, i;
    int noisy = moe__expert_noisy(d);
    const float *u = x;
    moe__gemm g;
    if (d->router == MOE_ROUTER_SOFT) { moe__soft_forward(l, x, T, y); return; }
    /* 1. router logits (the hash router has none) */
    if (l->xr) {
        if (l->training) {
            uint64_t stream = moe__stream(MOE__STREAM_JITTER, l->index, l->noise_step);
            MOE__PARALLEL_FOR(l->ex.n_threads, (double)T * (double)D * 20.0)
            for (t = 0; t < T; t++) {
                int64_t j;
                for (j = 0; j < D; j++)
                    l->xr[t * D + j] = x[t * D + j] * (1.0f - d->jitter + 2.0f * d->jitter * moe_rng_uniform(l->ctx->seed, stream, (uint64_t)(t * D + j)));
            }
            u = l->xr;
        }
    }
    if (l->router.w >= 0) {
        g = moe__gemm_make(MOE__NT, T, E, D, moe__mat_of(u, D), moe__mat_of(moe__w(l, l->router.w), D), l->clean, E, 0,
                           l->router.b >= 0 ? moe__w(l, l->router.b) : NULL);
        moe__gemm_run(&l->ex, &g);
    }
    if (noisy) {
        uint64_t stream = moe__stream(MOE__STREAM_NOISE, l->index, l->noise_step);
        g = moe__gemm_make(MOE__NT, T, E, D, moe__mat_of(u, D), moe__mat_of(moe__w(l, l->noise.w), D), l->raw, E, 0, NULL);
        moe__gemm_run(&l->ex, &g);
        for (i = 0; i < T * E; i++) {
            float n = !l->training ? 0.0f : noise ? noise[i] : moe_rng_normal(l->ctx->seed, stream, (uint64_t)i);
            l->noise_n[i] = n;
            l->h[i] = l->clean[i] + n * moe__softplus(l->raw[i]);
        }
    }
    if (d->router == MOE_ROUTER_HIERARCHICAL) moe__group_logits(l, u, T, noise);
    l->u = u;
    /* 2-3. softmax, top-k, gates */
    MOE__PARALLEL_FOR(l->ex.n_threads, (double)T * (double)E * (double)(K + 20))
    for (t = 0; t < T; t++) moe__route_token(l, t);
    /* 4. capacity and the permutation */
    moe__dispatch(l, T);
    moe__aux_forward(l, T);
    /* 5. every expert's rows, stage by stage, in tiles over all experts */
    moe__run_stages(l, T, x, 1);
    /* shared-expert gates sigmoid(x G^T) [T, S] */
    if (l->shared_gate_v) {
        int64_t S = d->n_shared_experts;
        g = moe__gemm_make(MOE__NT, T, S, D, moe__mat_of(x, D), moe__mat_of(moe__w(l, l->shared_gate_w), D), l->shared_gate_v, S, 0, NULL);
        moe__gemm_run(&l->ex, &g);
        for (i = 0; i < T * S; i++) l->shared_gate_v[i] = moe__sigmoid(l->shared_gate_v[i]);
    }
    if (d->expert == MOE_EXPERT_GAUSSIAN) { moe__gaussian_pack(l, T, y); return; }
    /* 6. combine in slot order, then shared experts */
    l->voted = moe__vote_combine(d->combine) && !l->training;
    if (d->combine == MOE_COMBINE_STACK) { moe__stack_forward(l, x, T, y); return; }
    if (l->voted) { moe__vote_forward(l, T, y); return; }
    MOE__PARALLEL_FOR(l->ex.n_threads, (double)T * (double)O * (double)(K + l->n_banks))
    for (t = 0; t < T; t++) {
        float *yt = y + t * O;
        const float *xt = x + t * D;
        int64_t s, j, q;
        int pass = l->passthrough[t] && !d->residual && O == D;
        for (j = 0; j < O; j++) yt[j] = (d->residual || pass) ? xt[j] : 0.0f;
        for (s = 0; s < K; s++) {
            int32_t r = l->pos[t * K + s];
            float gw = l->gate[t * K + s];
            const float *o;
            if (r < 0) continue;
            o = l->bank[0].out + (int64_t)r * O;
            l->ex.kernel.axpy(yt, gw, o, O);
        }
        if (l->n_banks > 1)
            for (q = 0; q < l->bank[1].n; q++) {
                const float *o = l->bank[1].out + (q * T + t) * O;
                float gq = l->shared_gate_v ? l->shared_gate_v[t * l->bank[1].n + q] : 1.0f;
                l->ex.kernel.axpy(yt, gq, o, O);
            }
    }
}

#ifndef MOE_NO_TRAINING
// >>moe_backward ------------------------------------------------------------
/* Noisy gate h = c + n softplus(raw): dc = dh, d raw = dh n sigmoid(raw). */
static void moe__noise_backward(const float *dh, const float *n, const float *raw, int64_t count, float *dc, float *draw) {
    int64_t i;
    for (i = 0; i < count; i++) { dc[i] = dh[i]; draw[i] = dh[i] * n[i] * moe__sigmoid(raw[i]); }
}

/* Hierarchical router, token t: from dgate to the expert logits (dh, through each group's softmax)
   and the group logits (dgh), with the balance loss on p = gp * pw; then through the noise. */
static void moe__router_backward_hierarchical(moe_layer *l, int64_t t, int aux, float bal_scale) {
    const moe_layer_desc *d = &l->d;
    int64_t E = d->n_experts, G = d->n_groups, n = E / G, K = l->call_k, Kg = d->top_k_groups, e, q, i, j;
    int renorm = d->renormalize == MOE_FLAG_ON;
    const float *gp = l->gp + t * G, *pw = l->pw + t * E, *gg = l->ggate + t * Kg, *dg = l->dgate + t * l->slots;
    const int32_t *gsel = l->group_sel + t * G, *sel = l->sel + t * l->slots;
    float *dh = l->dh + t * E, *dgl = l->dgh + t * G, *dgg = l->dggate + t * Kg, dot;
    for (e = 0; e < E; e++) dh[e] = 0.0f;
    for (q = 0; q < G; q++) dgl[q] = 0.0f;
    /* gate = gg_i * gw_ij: the chosen groups' gate gradients; without renormalising, gradients at pw and gp */
    for (i = 0; i < Kg; i++) {
        float S = 0.0f;
        dgg[i] = 0.0f;
        for (j = 0; j < K; j++) S += pw[sel[i * K + j]];
        for (j = 0; j < K; j++) {
            e = sel[i * K + j];
            dgg[i] += dg[i * K + j] * (renorm ? pw[e] / S : pw[e]);
            if (!renorm) dh[e] += dg[i * K + j] * gg[i];
        }
        if (!renorm) dgl[gsel[i]] += dgg[i];
    }
    if (aux && d->balance_loss > 0.0f)
        for (e = 0; e < E; e++) {
            float c = bal_scale * (float)l->chosen[e];
            dh[e] += c * gp[e / n];
            dgl[e / n] += c * pw[e];
        }
    /* through the softmax inside every group and the softmax over the groups */
    for (q = 0; q < G; q++) {
        for (dot = 0.0f, e = q * n; e < (q + 1) * n; e++) dot += pw[e] * dh[e];
        for (e = q * n; e < (q + 1) * n; e++) dh[e] = pw[e] * (dh[e] - dot);
    }
    for (dot = 0.0f, q = 0; q < G; q++) dot += gp[q] * dgl[q];
    for (q = 0; q < G; q++) dgl[q] = gp[q] * (dgl[q] - dot);
    if (renorm) {  /* gates renormalised over the chosen: softmaxes of the chosen logits */
        for (i = 0; i < Kg; i++) {
            float S = 0.0f, gs = 0.0f;
            for (j = 0; j < K; j++) S += pw[sel[i * K + j]];
            for (j = 0; j < K; j++) gs += pw[sel[i * K + j]] / S * dg[i * K + j] * gg[i];
            for (j = 0; j < K; j++) dh[sel[i * K + j]] += pw[sel[i * K + j]] / S * (dg[i * K + j] * gg[i] - gs);
        }
        for (dot = 0.0f, i = 0; i < Kg; i++) dot += gg[i] * dgg[i];
        for (i = 0; i < Kg; i++) dgl[gsel[i]] += gg[i] * (dgg[i] - dot);
    }
    if (moe__expert_noisy(d)) moe__noise_backward(dh, l->noise_n + t * E, l->raw + t * E, E, l->dclean + t * E, l->dstd + t * E);
    if (l->group_noise.w >= 0) moe__noise_backward(dgl, l->gnoise + t * G, l->graw + t * G, G, l->dgclean + t * G, l->dgstd + t * G);
}

/* dh for token t: through the gates, the softmax and (with aux) the auxiliary losses. */
static void moe__router_backward_token(moe_layer *l, int64_t t, int aux, float bal_scale) {
    const moe_layer_desc *d = &l->d;
    int64_t E = d->n_experts, K = l->slots, e, s;
    const float *p = l->p + t * E;
    const float *gate = l->gate + t * K, *dg = l->dgate + t * K;
    const int32_t *sel = l->sel + t * K;
    float *dh = l->dh + t * E;
    float dot = 0.0f;
    if (d->router == MOE_ROUTER_HIERARCHICAL) { moe__router_backward_hierarchical(l, t, aux, bal_scale); return; }
    for (e = 0; e < E; e++) dh[e] = 0.0f;
    if (d->router == MOE_ROUTER_SIGMOID) {
        /* g_s = c p_s / S (S = sum of the chosen p; renormalize off: g_s = c p_s); dc = dp * p (1 - p) */
        float S = 0.0f, gs = 0.0f;
        for (s = 0; s < K; s++) { S += p[sel[s]]; gs += gate[s] * dg[s]; }
        for (s = 0; s < K; s++)
            dh[sel[s]] = d->renormalize == MOE_FLAG_ON ? (d->routed_scaling_factor * dg[s] - gs) / S : d->routed_scaling_factor * dg[s];
        for (e = 0; e < E; e++) dh[e] *= p[e] * (1.0f - p[e]);
        return;
    }
    if (d->renormalize != MOE_FLAG_ON)
        for (s = 0; s < K; s++)
            if (sel[s] >= 0) dh[sel[s]] += dg[s];
    if (aux && d->balance_loss > 0.0f)
        for (e = 0; e < E; e++) dh[e] += bal_scale * (float)l->chosen[e];
    for (e = 0; e < E; e++) dot += p[e] * dh[e];
    for (e = 0; e < E; e++) dh[e] = p[e] * (dh[e] - dot);
    if (d->renormalize == MOE_FLAG_ON) {
        /* Gaussian experts: dg is the gradient at log g, and d log g_s / dh = onehot_s - g */
        int lg = d->expert == MOE_EXPERT_GAUSSIAN;
        float gs = 0.0f;
        for (s = 0; s < K; s++) gs += lg ? dg[s] : gate[s] * dg[s];
        for (s = 0; s < K; s++)
            if (sel[s] >= 0) dh[sel[s]] += lg ? dg[s] - gate[s] * gs : gate[s] * (dg[s] - gs);
    }
    if (aux && d->z_loss > 0.0f) {
        float c = 2.0f * d->z_loss * l->lse[t] / (float)l->T;
        for (e = 0; e < E; e++) dh[e] += c * p[e];
    }
    if (d->router == MOE_ROUTER_NOISY_TOPK) {
        float *dc = l->dclean + t * E, *ds = l->dstd + t * E;
        const float *n = l->noise_n + t * E, *raw = l->raw + t * E, *clean = l->clean + t * E, *h = l->h + t * E;
        for (e = 0; e < E; e++) { dc[e] = dh[e]; ds[e] = dh[e] * n[e]; }
        if (aux && d->load_loss > 0.0f && K < E) {
            for (e = 0; e < E; e++) {
                int32_t j = moe__load_threshold(l, t, e);
                float sd = moe__softplus(raw[e]), zv = (clean[e] - h[j]) / sd;
                float c = l->dload[e] * moe__phi_pdf(zv) / sd;
                dc[e] += c;
                ds[e] -= c * zv;
                dc[j] -= c;
                ds[j] -= c * n[j];
            }
        }
        for (e = 0; e < E; e++) ds[e] *= moe__sigmoid(raw[e]);  /* softplus' = sigmoid */
    }
}

/* Gaussian experts: dy [T, E (1 + 2 O)] into dgate (at log g of each chosen expert) and the expert
   outputs' gradient (mean | log-std, zero where the clamp moved the log-std, as torch.clamp). */
static void moe__gaussian_unpack_grad(moe_layer *l, const float *dy) {
    int64_t T = l->T, E = l->d.n_experts, K = l->slots, O = l->d.d_out, W = E * (1 + 2 * O), t;
    moe__bank *b = &l->bank[0];
    MOE__PARALLEL_FOR(l->ex.n_threads, (double)T * (double)W * 2.0)
    for (t = 0; t < T; t++) {
        const float *dyt = dy + t * W;
        int64_t s, j;
        for (s = 0; s < K; s++) {
            int64_t e = l->sel[t * K + s], r = l->pos[t * K + s];
            const float *o;
            float *dout;
            if (e < 0 || r < 0) { l->dgate[t * K + s] = 0.0f; continue; }
            o = b->out + r * 2 * O;
            dout = b->dz[b->n_linears - 1] + r * 2 * O;
            l->dgate[t * K + s] = dyt[e];
            for (j = 0; j < O; j++) {
                float v = o[O + j];
                dout[j] = dyt[E + e * O + j];
                dout[O + j] = v >= MOE_MIXTURE_LOG_STD_MIN && v <= MOE_MIXTURE_LOG_STD_MAX ? dyt[E + E * O + e * O + j] : 0.0f;
            }
        }
    }
}

/* Hierarchical router: gradients of the group gate's weights (dx NULL) or its part of dxu. */
static void moe__group_backward(moe_layer *l, float *dxu) {
    int64_t T = l->T, G = l->d.n_groups, D = l->d.d_in;
    moe__gemm g;
    if (!dxu) {
        g = moe__gemm_make(MOE__TN, G, D, T, moe__mat_of(l->dgclean, G), moe__mat_of(l->u, D), moe__g(l, l->group_router.w), D, 1, NULL);
        moe__gemm_run(&l->ex, &g);
        if (l->group_router.b >= 0) moe__colsum_acc(&l->ex, l->dgclean, T, G, G, moe__g(l, l->group_router.b));
        if (l->group_noise.w < 0) return;
        g = moe__gemm_make(MOE__TN, G, D, T, moe__mat_of(l->dgstd, G), moe__mat_of(l->u, D), moe__g(l, l->group_noise.w), D, 1, NULL);
        moe__gemm_run(&l->ex, &g);
        return;
    }
    g = moe__gemm_make(MOE__NN, T, D, G, moe__mat_of(l->dgclean, G), moe__mat_of(moe__w(l, l->group_router.w), D), dxu, D, 1, NULL);
    moe__gemm_run(&l->ex, &g);
    if (l->group_noise.w < 0) return;
    g = moe__gemm_make(MOE__NN, T, D, G, moe__mat_of(l->dgstd, G), moe__mat_of(moe__w(l, l->group_noise.w), D), dxu, D, 1, NULL);
    moe__gemm_run(&l->ex, &g);
}

/* Soft router backward: dY~ = C^T dy per group; dC and dD through their softmaxes into the logits'
   gradient dh [T, E*S]; the experts down to the slot inputs (dX~ in dxr); dPhi = dh^T x;
   dx = dh Phi + Dw dX~ (+ dy with residual). Every product is a GEMM with the slots' rows gathered. */
static void moe__soft_backward(moe_layer *l, const float *dy, float *dx) {
    const moe_layer_desc *d = &l->d;
    int64_t E = d->n_experts, S = d->slots_per_expert, L = E * S, D = d->d_in, O = d->d_out, T = l->T, G = l->soft_groups, m = T / G, t, i, e;
    const float *x = l->x;
    moe__bank *b = &l->bank[0];
    float *dout = b->dz[b->n_linears - 1];
    moe__gemm g;
    int q;
    for (i = 0; i < G; i++) {
        for (e = 0; e < E; e++) {  /* expert e's S slot rows of group i: their combine columns^T dy */
            g = moe__gemm_make(MOE__TN, S, O, m, moe__mat_of(l->soft_combine + i * m * L + e * S, L), moe__mat_of(dy + i * m * O, O),
                               dout + (e * G * S + i * S) * O, O, 0, NULL);
            moe__gemm_run(&l->ex, &g);
        }
        g = moe__gemm_make(MOE__NT, m, L, O, moe__mat_of(dy + i * m * O, O), moe__mat_rows(b->out, O, l->slot_row + i * L), l->dh + i * m * L, L, 0, NULL);
        moe__gemm_run(&l->ex, &g);  /* dC */
    }
    MOE__PARALLEL_FOR(l->ex.n_threads, (double)T * (double)L * 4.0)
    for (t = 0; t < T; t++) {
        const float *c = l->soft_combine + t * L;
        float *dl = l->dh + t * L, dot = 0.0f;
        int64_t j;
        for (j = 0; j < L; j++) dot += c[j] * dl[j];
        for (j = 0; j < L; j++) dl[j] = c[j] * (dl[j] - dot);
    }
    for (q = 0; q < moe__bank_back_steps(b); q++) moe__run_step(l, moe__plan_step(l, 1, q, 1), l->slot_x);
    for (i = 0; i < G; i++) {  /* dD = x dX~^T */
        g = moe__gemm_make(MOE__NT, m, L, D, moe__mat_of(x + i * m * D, D), moe__mat_rows(b->dxr, D, l->slot_row + i * L), l->ddispatch + i * m * L, L, 0, NULL);
        moe__gemm_run(&l->ex, &g);
    }
    MOE__PARALLEL_FOR(l->ex.n_threads, (double)T * (double)L * 4.0)
    for (i = 0; i < G * L; i++) {  /* through the column softmax of slot j over group g's tokens */
        int64_t t0 = (i / L) * m, a0 = t0 * L + i % L, k;
        float dot = 0.0f;
        for (k = 0; k < m; k++) dot += l->dispatch[a0 + k * L] * l->ddispatch[a0 + k * L];
        for (k = 0; k < m; k++) l->dh[a0 + k * L] += l->dispatch[a0 + k * L] * (l->ddispatch[a0 + k * L] - dot);
    }
    g = moe__gemm_make(MOE__TN, L, D, T, moe__mat_of(l->dh, L), moe__mat_of(x, D), moe__g(l, l->router.w), D, 1, NULL);
    moe__gemm_run(&l->ex, &g);
    if (!dx) return;
    g = moe__gemm_make(MOE__NN, T, D, L, moe__mat_of(l->dh, L), moe__mat_of(moe__w(l, l->router.w), D), dx, D, 0, NULL);
    moe__gemm_run(&l->ex, &g);
    for (i = 0; i < G; i++) {
        g = moe__gemm_make(MOE__NN, m, D, L, moe__mat_of(l->dispatch + i * m * L, L), moe__mat_rows(b->dxr, D, l->slot_row + i * L), dx + i * m * D, D, 1, NULL);
        moe__gemm_run(&l->ex, &g);
    }
    if (d->residual)
        for (i = 0; i < T * D; i++) dx[i] += dy[i];
}

static void moe__moe_backward(moe_layer *l, const float *dy, float *dx, int flags) {
    const moe_layer_desc *d = &l->d;
    int64_t T = l->T, E = d->n_experts, K = l->slots, D = d->d_in, O = d->d_out, t, i;
    int aux = (flags & MOE_BACKWARD_AUX) != 0, noisy = moe__expert_noisy(d), routed = l->router.w >= 0, q;
    moe__bank *rb = &l->bank[0];
    float bal_scale = d->balance_loss * (float)E / ((float)(T * l->slots) * (float)T);
    int64_t Wy = moe__layer_width(d);  /* width of y and dy */
    int64_t De = rb->d_out, W = E * De;  /* expert output width; stack: width of the concatenation */
    int stack = d->combine == MOE_COMBINE_STACK;
    moe__gemm g;
    if (d->router == MOE_ROUTER_SOFT) { moe__soft_backward(l, dy, dx); return; }
    if (stack) {  /* dWc += dy^T cat, dbc += sum dy, dcat = dy Wc */
        g = moe__gemm_make(MOE__TN, O, W, T, moe__mat_of(dy, O), moe__mat_of(l->cat, W), moe__g(l, l->combine.w), W, 1, NULL);
        moe__gemm_run(&l->ex, &g);
        moe__colsum_acc(&l->ex, dy, T, O, O, moe__g(l, l->combine.b));
        g = moe__gemm_make(MOE__NN, T, W, O, moe__mat_of(dy, O), moe__mat_of(moe__w(l, l->combine.w), W), l->dcat, W, 0, NULL);
        moe__gemm_run(&l->ex, &g);
    }
    /* gradients at the gates and at the expert outputs */
    if (d->expert == MOE_EXPERT_GAUSSIAN) moe__gaussian_unpack_grad(l, dy);
    else {
        MOE__PARALLEL_FOR(l->ex.n_threads, (double)T * (double)O * (double)(2 * K + 1))
        for (t = 0; t < T; t++) {
            const float *dyt = dy + t * O;
            int64_t s, q;
            for (s = 0; s < K; s++) {
                int32_t r = l->pos[t * K + s];
                float gw = l->gate[t * K + s];
                float *dout;
                const float *o, *dsrc;
                if (r < 0) { l->dgate[t * K + s] = 0.0f; continue; }
                o = rb->out + (int64_t)r * De;
                dout = rb->dz[rb->n_linears - 1] + (int64_t)r * De;
                dsrc = stack ? l->dcat + t * W + (int64_t)l->sel[t * K + s] * De : dyt;  /* gradient at gate * f_e(x_t) */
                l->dgate[t * K + s] = l->ex.kernel.gate_grad(dsrc, o, gw, dout, De);
            }
            if (l->n_banks > 1)
                for (q = 0; q < l->bank[1].n; q++) {
                    float *dout = l->bank[1].dz[l->bank[1].n_linears - 1] + (q * T + t) * O;
                    const float *o = l->bank[1].out + (q * T + t) * O;
                    int64_t S = l->bank[1].n;
                    float gq, acc = 0.0f;
                    if (!l->shared_gate_v) { memcpy(dout, dyt, (size_t)O * sizeof(float)); continue; }
                    gq = l->shared_gate_v[t * S + q];
                    acc = l->ex.kernel.gate_grad(dyt, o, gq, dout, O);
                    l->dshared_gate[t * S + q] = acc * gq * (1.0f - gq);  /* sigmoid' = g (1 - g) */
                }
        }
    }
    if (aux && d->importance_loss > 0.0f) {
        moe__cv2(l->importance, E, l->dimportance);
        for (i = 0; i < T * K; i++)
            if (l->sel[i] >= 0)  /* Gaussian experts: dgate is at log g, so times g */
                l->dgate[i] += d->importance_loss * l->dimportance[l->sel[i]] * (d->expert == MOE_EXPERT_GAUSSIAN ? l->gate[i] : 1.0f);
    }
    if (aux && d->load_loss > 0.0f && l->call_k < E && noisy) {
        moe__cv2(l->load, E, l->dload);
        for (i = 0; i < E; i++) l->dload[i] *= d->load_loss;
    }
    /* experts: step by step from the output, input-side and weight gradients in one schedule */
    for (q = 0; q < moe__bank_back_steps(rb); q++) moe__run_step(l, moe__plan_step(l, 1, q, dx != NULL), l->x);
    /* router (the hash router has no parameters: its gradient stops at the gates) */
    if (routed) {
        MOE__PARALLEL_FOR(l->ex.n_threads, (double)T * (double)E * (double)(K + 20))
        for (t = 0; t < T; t++) moe__router_backward_token(l, t, aux, bal_scale);
        g = moe__gemm_make(MOE__TN, E, D, T, moe__mat_of(l->dclean, E), moe__mat_of(l->u, D), moe__g(l, l->router.w), D, 1, NULL);
        moe__gemm_run(&l->ex, &g);
    }
    if (l->router.b >= 0) moe__colsum_acc(&l->ex, l->dclean, T, E, E, moe__g(l, l->router.b));
    if (noisy) {
        g = moe__gemm_make(MOE__TN, E, D, T, moe__mat_of(l->dstd, E), moe__mat_of(l->u, D), moe__g(l, l->noise.w), D, 1, NULL);
        moe__gemm_run(&l->ex, &g);
    }
    if (l->shared_gate_v) {  /* the gates read x itself, never the jittered router input */
        g = moe__gemm_make(MOE__TN, d->n_shared_experts, D, T, moe__mat_of(l->dshared_gate, d->n_shared_experts), moe__mat_of(l->x, D),
                           moe__g(l, l->shared_gate_w), D, 1, NULL);
        moe__gemm_run(&l->ex, &g);
    }
    if (d->router == MOE_ROUTER_HIERARCHICAL) moe__group_backward(l, NULL);
    if (!dx) return;
    if (routed) {
        g = moe__gemm_make(MOE__NN, T, D, E, moe__mat_of(l->dclean, E), moe__mat_of(moe__w(l, l->router.w), D), l->dxu, D, 0, NULL);
        moe__gemm_run(&l->ex, &g);
    } else {
        memset(l->dxu, 0, (size_t)(T * D) * sizeof(float));
    }
    if (noisy) {
        g = moe__gemm_make(MOE__NN, T, D, E, moe__mat_of(l->dstd, E), moe__mat_of(moe__w(l, l->noise.w), D), l->dxu, D, 1, NULL);
        moe__gemm_run(&l->ex, &g);
    }
    if (d->router == MOE_ROUTER_HIERARCHICAL) moe__group_backward(l, l->dxu);
    {
        uint64_t stream = moe__stream(MOE__STREAM_JITTER, l->index, l->forward_step);
        int jitter = l->u != l->x;
        MOE__PARALLEL_FOR(l->ex.n_threads, (double)T * (double)D * (double)(K + 3))
        for (t = 0; t < T; t++) {
            float *dxt = dx + t * D;
            const float *dyt = dy + t * Wy;
            int64_t s, j, q;
            int pass = l->passthrough[t] && !d->residual && O == D;
            for (j = 0; j < D; j++) dxt[j] = (d->residual || pass) ? dyt[j] : 0.0f;
            for (s = 0; s < K; s++) {
                int32_t r = l->pos[t * K + s];
                const float *v;
                if (r < 0) continue;
                v = rb->dxr + (int64_t)r * D;
                for (j = 0; j < D; j++) dxt[j] += v[j];
            }
            if (l->n_banks > 1)
                for (q = 0; q < l->bank[1].n; q++) {
                    const float *v = l->bank[1].dxr + (q * T + t) * D;
                    for (j = 0; j < D; j++) dxt[j] += v[j];
                    if (l->shared_gate_v) {
                        const float *gw = moe__w(l, l->shared_gate_w) + q * D;
                        float c = l->dshared_gate[t * l->bank[1].n + q];
                        for (j = 0; j < D; j++) dxt[j] += c * gw[j];
                    }
                }
            for (j = 0; j < D; j++) {
                float v = l->dxu[t * D + j];
                if (jitter) v *= 1.0f - d->jitter + 2.0f * d->jitter * moe_rng_uniform(l->ctx->seed, stream, (uint64_t)(t * D + j));
                dxt[j] += v;
            }
        }
    }
}
#endif /* MOE_NO_TRAINING */

// >>multigate ---------------------------------------------------------------
/* Multi-task layers (MMoE, PLE levels, task towers). Every expert takes every token; gate g of
   token t mixes its experts' outputs with softmax(x_slice W_g^T) (README "multigate"). */

/* Input slice that gate g reads. */
static int moe__mg_gate_slice(const moe_layer *l, int g) {
    return l->d.task_input == MOE_TASK_INPUT_SINGLE ? 0 : g;   /* the shared gate is g = n_tasks: the shared slice */
}

/* Input slice that expert e of bank b reads. */
static int moe__mg_expert_slice(const moe_layer *l, int b, int64_t e) {
    if (l->d.task_input == MOE_TASK_INPUT_SINGLE) return 0;
    return b == l->mg_task_bank ? (int)(e / l->d.n_task_experts) : l->d.n_tasks;
}

/* Expert behind column c of gate g: its bank and index. */
static int64_t moe__mg_expert(const moe_layer *l, int g, int64_t c, int *bank) {
    int64_t own = g < l->d.n_tasks ? l->d.n_task_experts : (int64_t)l->d.n_tasks * l->d.n_task_experts;
    if (c < own) {
        *bank = l->mg_task_bank;
        return g < l->d.n_tasks ? (int64_t)g * l->d.n_task_experts + c : c;
    }
    *bank = l->mg_shared_bank;
    return c - own;
}

/* In place: logits z [n] -> gates. Dense: softmax. top_k in 1..n-1: the k largest logits (ties to
   the lower index) get the softmax over those k, the others 0. Backward needs nothing more: the
   gradient p (dp - sum p dp) vanishes where p = 0 and is the k-way softmax's elsewhere. */
static void moe__mg_gate_row(float *z, int64_t n, int64_t top_k) {
    int64_t c, q;
    if (top_k <= 0 || top_k >= n) { moe__softmax_row(z, z, n); return; }
    {
        float kth = 0.0f, m = -FLT_MAX, s = 0.0f;
        int64_t last = -1;
        /* the k-th largest (value, index) pair: count how many pairs precede each entry */
        for (c = 0; c < n; c++) {
            int64_t ahead = 0;
            for (q = 0; q < n; q++) ahead += z[q] > z[c] || (z[q] == z[c] && q < c);
            if (ahead == top_k - 1) { kth = z[c]; last = c; }
        }
        for (c = 0; c < n; c++) m = z[c] > m ? z[c] : m;
        for (c = 0; c < n; c++) {
            int keep = z[c] > kth || (z[c] == kth && c <= last);
            z[c] = keep ? expf(z[c] - m) : 0.0f;
            s += z[c];
        }
        for (c = 0; c < n; c++) z[c] /= s;
    }
}

/* x [T, gin * D] -> y [T, gout * O]. */
static void moe__multitask_forward(moe_layer *l, const float *x, int64_t T, float *y) {
    const moe_layer_desc *d = &l->d;
    int gin = moe__task_groups_in(d), gout = moe__task_groups_out(d), g, b;
    int64_t D = d->d_in / gin, O = d->d_out / gout, C = l->mg_cols, t;
    /* expert e of a bank owns rows e*T..(e+1)*T; row t reads row t*gin + slice of x viewed as [T*gin, D] */
    for (b = 0; b < l->n_banks; b++) {
        moe__bank *k = &l->bank[b];
        int64_t e;
        for (e = 0; e <= k->n; e++) k->offsets[e] = e * T;
        for (e = 0; e < k->n; e++) {
            int sl = moe__mg_expert_slice(l, b, e);
            for (t = 0; t < T; t++) k->row_token[e * T + t] = (int32_t)(t * gin + sl);
        }
    }
    moe__run_stages(l, T, x, 1);
    for (g = 0; g < l->mg_gates; g++) {
        int64_t n = l->mg_gate_width[g], col = l->mg_gate_col[g];
        if (l->mg_gate_w[g] < 0) {
            for (t = 0; t < T; t++) l->mg_p[t * C + col] = 1.0f;
        } else {
            moe__gemm gm = moe__gemm_make(MOE__NT, T, n, D, moe__mat_of(x + moe__mg_gate_slice(l, g) * D, gin * D),
                                          moe__mat_of(moe__w(l, l->mg_gate_w[g]), D), l->mg_p + col, C, 0, NULL);
            moe__gemm_run(&l->ex, &gm);
            for (t = 0; t < T; t++) moe__mg_gate_row(l->mg_p + t * C + col, n, d->top_k);
        }
    }
    /* y[t, g-th slice] = sum over gate g's columns c of p * expert output, in column order */
    MOE__PARALLEL_FOR(l->ex.n_threads, (double)T * (double)C * (double)O)
    for (t = 0; t < T; t++) {
        int gg;
        for (gg = 0; gg < gout; gg++) {
            float *yt = y + t * d->d_out + gg * O;
            int64_t c, j;
            for (j = 0; j < O; j++) yt[j] = 0.0f;
            for (c = 0; c < l->mg_gate_width[gg]; c++) {
                int bk;
                int64_t e = moe__mg_expert(l, gg, c, &bk);
                float p = l->mg_p[t * C + l->mg_gate_col[gg] + c];
                const float *o = l->bank[bk].out + (e * T + t) * O;
                for (j = 0; j < O; j++) yt[j] += p * o[j];
            }
        }
    }
}

#ifndef MOE_NO_TRAINING
static void moe__multitask_backward(moe_layer *l, const float *dy, float *dx) {
    const moe_layer_desc *d = &l->d;
    int gin = moe__task_groups_in(d), gout = moe__task_groups_out(d), g, q;
    int64_t D = d->d_in / gin, O = d->d_out / gout, C = l->mg_cols, T = l->T, t;
    moe__gemm gm;
    /* gradients at the expert outputs (summed over the gates in order) and at the gate logits */
    MOE__PARALLEL_FOR(l->ex.n_threads, (double)T * (double)C * (double)O * 2.0)
    for (t = 0; t < T; t++) {
        int b, gg;
        int64_t e, c, j;
        for (b = 0; b < l->n_banks; b++) {
            moe__bank *k = &l->bank[b];
            for (e = 0; e < k->n; e++) memset(k->dz[k->n_linears - 1] + (e * T + t) * O, 0, (size_t)O * sizeof(float));
        }
        for (gg = 0; gg < gout; gg++) {
            const float *dyt = dy + t * d->d_out + gg * O;
            float *p = l->mg_p + t * C + l->mg_gate_col[gg], *dp = l->mg_dp + t * C + l->mg_gate_col[gg], dot = 0.0f;
            for (c = 0; c < l->mg_gate_width[gg]; c++) {
                int bk;
                moe__bank *k;
                const float *o;
                float *dz, acc = 0.0f;
                e = moe__mg_expert(l, gg, c, &bk);
                k = &l->bank[bk];
                o = k->out + (e * T + t) * O;
                dz = k->dz[k->n_linears - 1] + (e * T + t) * O;
                for (j = 0; j < O; j++) { acc += dyt[j] * o[j]; dz[j] += p[c] * dyt[j]; }
                dp[c] = acc;
            }
            for (c = 0; c < l->mg_gate_width[gg]; c++) dot += p[c] * dp[c];
            for (c = 0; c < l->mg_gate_width[gg]; c++) dp[c] = p[c] * (dp[c] - dot);
        }
    }
    for (q = 0; q < moe__bank_back_steps(&l->bank[0]); q++) moe__run_step(l, moe__plan_step(l, 1, q, dx != NULL), l->x);
    for (g = 0; g < l->mg_gates; g++) {
        if (l->mg_gate_w[g] < 0) continue;
        gm = moe__gemm_make(MOE__TN, l->mg_gate_width[g], D, T, moe__mat_of(l->mg_dp + l->mg_gate_col[g], C),
                            moe__mat_of(l->x + moe__mg_gate_slice(l, g) * D, gin * D), moe__g(l, l->mg_gate_w[g]), D, 1, NULL);
        moe__gemm_run(&l->ex, &gm);
    }
    if (!dx) return;
    MOE__PARALLEL_FOR(l->ex.n_threads, (double)T * (double)d->d_in * 2.0)
    for (t = 0; t < T; t++) {
        int b;
        int64_t e, j;
        for (j = 0; j < d->d_in; j++) dx[t * d->d_in + j] = 0.0f;
        for (b = 0; b < l->n_banks; b++) {
            const moe__bank *k = &l->bank[b];
            for (e = 0; e < k->n; e++) {
                float *dxt = dx + t * d->d_in + moe__mg_expert_slice(l, b, e) * D;
                const float *v = k->dxr + (e * T + t) * D;
                for (j = 0; j < D; j++) dxt[j] += v[j];
            }
        }
    }
    for (g = 0; g < l->mg_gates; g++) {
        if (l->mg_gate_w[g] < 0) continue;
        gm = moe__gemm_make(MOE__NN, T, D, l->mg_gate_width[g], moe__mat_of(l->mg_dp + l->mg_gate_col[g], C),
                            moe__mat_of(moe__w(l, l->mg_gate_w[g]), D), dx + moe__mg_gate_slice(l, g) * D, gin * D, 1, NULL);
        moe__gemm_run(&l->ex, &gm);
    }
}
#endif /* MOE_NO_TRAINING */

// >>layer_api ---------------------------------------------------------------
/* The per-call routing options of a forward, checked for layer l before anything runs. */
static moe_result moe__call_check(moe_layer *l, const moe_forward_opts *o) {
    const moe_layer_desc *d = &l->d;
    int k = o && o->top_k ? o->top_k : d->top_k;
    float top_p = o ? o->top_p : 0.0f;
    if (d->kind != MOE_LAYER_MOE) return MOE_OK;
    if (k < 1 || k > d->max_top_k)
        return moe__fail(l->ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: top_k %d of the call must be in 1..max_top_k (%d)", l->index, k, d->max_top_k);
    if (top_p != 0.0f && !(top_p > 0.0f && top_p <= 1.0f))
        return moe__fail(l->ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: top_p must be in (0, 1] (0: off)", l->index);
    if (top_p != 0.0f && d->router != MOE_ROUTER_TOPK && d->router != MOE_ROUTER_NOISY_TOPK && d->router != MOE_ROUTER_SWITCH)
        return moe__fail(l->ctx, MOE_ERR_UNSUPPORTED, "layer %d: top_p needs a softmax token-choice router (topk, noisy_topk, switch)", l->index);
    if (d->router == MOE_ROUTER_SOFT && k != d->n_experts)
        return moe__fail(l->ctx, MOE_ERR_UNSUPPORTED, "layer %d: the soft router has no per-call top_k (every token reaches every expert)", l->index);
    if (d->router == MOE_ROUTER_HASH && !(o && o->token_ids))
        return moe__fail(l->ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: the hash router needs moe_forward_opts.token_ids", l->index);
    return MOE_OK;
}

/* Soft router: a call's tokens must fill whole groups. */
static moe_result moe__group_check(moe_layer *l, int64_t T) {
    int64_t m = l->d.soft_group_tokens;
    if (l->d.kind == MOE_LAYER_MOE && l->d.router == MOE_ROUTER_SOFT && m > 0 && T % m != 0)
        return moe__fail(l->ctx, MOE_ERR_SHAPE, "layer %d: n_tokens %lld is not a multiple of soft_group_tokens %lld", l->index, (long long)T, (long long)m);
    return MOE_OK;
}

static void moe__layer_drop_pack(moe_layer *l);

static void moe__layer_forward_impl(moe_layer *l, const float *x, int64_t T, float *y, int training, const float *noise,
                                    const moe_forward_opts *o) {
    l->call_k = o && o->top_k ? o->top_k : l->d.top_k;
    l->call_top_p = o ? o->top_p : 0.0f;
    l->token_ids = o ? o->token_ids : NULL;
    l->slots = moe__slots_for(&l->d, l->call_k);
    l->x = x;
    l->y = y;
    l->T = T;
    l->training = training;
    if (training) moe__layer_drop_pack(l);  /* the weights are about to change */
    l->forward_step = l->noise_step;
    l->u = x;
    switch (l->d.kind) {
    case MOE_LAYER_DENSE: moe__dense_forward(l, x, T, y); break;
    case MOE_LAYER_RMSNORM:
    case MOE_LAYER_LAYERNORM: moe__norm_forward(l, x, T, y); break;
    case MOE_LAYER_MOE: moe__moe_forward(l, x, T, y, noise); break;
    case MOE_LAYER_MULTIGATE:
    case MOE_LAYER_TASK_TOWERS: moe__multitask_forward(l, x, T, y); break;
    case MOE_LAYER_EMBEDDING: moe__embedding_forward(l, x, T, y); break;
    default: break;
    }
    if (training) l->noise_step++;
    l->has_forward = 1;
}

#ifndef MOE_NO_TRAINING
static void moe__layer_backward_impl(moe_layer *l, const float *dy, float *dx, int flags) {
    moe__restore_z(l);
    switch (l->d.kind) {
    case MOE_LAYER_DENSE: moe__dense_backward(l, dy, dx); break;
    case MOE_LAYER_RMSNORM:
    case MOE_LAYER_LAYERNORM: moe__norm_backward(l, dy, dx); break;
    case MOE_LAYER_MOE: moe__moe_backward(l, dy, dx, flags); break;
    case MOE_LAYER_MULTIGATE:
    case MOE_LAYER_TASK_TOWERS: moe__multitask_backward(l, dy, dx); break;
    case MOE_LAYER_EMBEDDING: moe__embedding_backward(l, dy, dx); break;
    default: break;
    }
}
#endif /* MOE_NO_TRAINING */

static moe_result moe__check_tokens(moe_ctx *ctx, int64_t T, int64_t max_tokens) {
    if (T < 1) return moe__fail(ctx, MOE_ERR_SHAPE, "n_tokens is %lld; it must be at least 1", (long long)T);
    if (T > max_tokens)
        return moe__fail(ctx, MOE_ERR_TOO_MANY_TOKENS, "n_tokens %lld exceeds max_tokens %lld", (long long)T, (long long)max_tokens);
    return MOE_OK;
}

/* Sizes of one layer's memory for its resolved desc and max_tokens. */
static moe_result moe__layer_sizes(moe_layer *l, size_t *saved, size_t *scratch) {
    moe__carver a = {NULL, 0, 0}, b = {NULL, 0, 0};
    if (moe__is_multitask(l->d.kind) && l->max_tokens * moe__task_groups_in(&l->d) > INT32_MAX)   /* row indices are int32 */
        return moe__fail(l->ctx, MOE_ERR_OUT_OF_MEMORY, "layer %d: max_tokens %lld times %d input slices is too many rows", l->index,
                         (long long)l->max_tokens, moe__task_groups_in(&l->d));
    moe__layer_carve(l, &a, &b);
    if (a.overflow || b.overflow)
        return moe__fail(l->ctx, MOE_ERR_OUT_OF_MEMORY, "layer %d: activation memory for max_tokens %lld overflows", l->index, (long long)l->max_tokens);
    *saved = a.used;
    *scratch = b.used;
    return MOE_OK;
}

static moe_result moe__check_max_tokens(moe_ctx *ctx, int64_t *max_tokens) {
    if (*max_tokens == 0) *max_tokens = 256;
    if (*max_tokens < 1 || *max_tokens > ((int64_t)1 << 28))
        return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "max_tokens %lld out of range 1..2^28", (long long)*max_tokens);
    return MOE_OK;
}

/* Rows of A the packing scratch holds: a whole tile of this layer's grouped schedule (its expert
   rows; with training, a weight gradient's output rows), at least a plain GEMM's row block. */
static int64_t moe__scratch_rows(const moe_layer *l) {
    int64_t need = 4 * MOE__MR_MAX;
    int b, j;
    for (b = 0; b < l->n_banks; b++) {
        need = moe__max64(need, moe__min64(MOE__TILE_ROWS, l->bank[b].max_rows));
#ifndef MOE_NO_TRAINING
        for (j = 0; j < l->bank[b].n_linears; j++) need = moe__max64(need, moe__min64(MOE__WTILE_ROWS, l->bank[b].lin[j].out));
#else
        (void)j;
#endif
    }
    return moe__min64(MOE__MB_MAX, (need + MOE__MR_MAX - 1) / MOE__MR_MAX * MOE__MR_MAX);
}

MOEDEF moe_result moe_layer_create(moe_ctx *ctx, const moe_layer_desc *desc, int64_t max_tokens, moe_layer **out) {
    moe_layer *l;
    moe_layer_desc d;
    size_t saved = 0, scratch = 0, pbytes, total;
    moe__carver a, b;
    char *block;
    if (!ctx || !out) return MOE_ERR_INVALID_ARGUMENT;
    *out = NULL;
    if (!desc) return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "desc is NULL");
    MOE__TRY(moe__check_max_tokens(ctx, &max_tokens));
    MOE__TRY(moe__layer_resolve(ctx, desc, 0, 0, &d));
    l = (moe_layer *)moe__calloc(ctx, sizeof *l);
    if (!l) return moe__fail(ctx, MOE_ERR_OUT_OF_MEMORY, "layer struct");
    l->ctx = ctx;
    l->d = d;
    l->max_tokens = max_tokens;
    moe__layer_plan(l);
    if (moe__layer_sizes(l, &saved, &scratch) != MOE_OK) { moe__free(ctx, l); return MOE_ERR_OUT_OF_MEMORY; }
    pbytes = (size_t)l->n_params * sizeof(float);
    total = MOE__BLOBS * pbytes + saved + scratch + (size_t)ctx->n_threads * moe__scratch_floats(moe__scratch_rows(l)) * sizeof(float);
    block = (char *)moe__malloc(ctx, total);
    if (!block) { moe__free(ctx, l); return moe__fail(ctx, MOE_ERR_OUT_OF_MEMORY, "layer memory (%zu bytes)", total); }
    l->own = block;
    l->params = (float *)block;
    l->grads = MOE__BLOBS > 1 ? (float *)(block + pbytes) : NULL;
    a.base = block + MOE__BLOBS * pbytes; a.used = 0; a.overflow = 0;
    b.base = block + MOE__BLOBS * pbytes + saved; b.used = 0; b.overflow = 0;
    moe__layer_carve(l, &a, &b);
    moe__exec_init(&l->ex, ctx, (float *)(block + MOE__BLOBS * pbytes + saved + scratch), moe__scratch_rows(l));
    memset(l->params, 0, MOE__BLOBS * pbytes);  /* the padding between tensors too */
    moe__layer_init_params(l, 0);
    *out = l;
    return MOE_OK;
}

static void moe__layer_drop_quant(moe_layer *l);

MOEDEF void moe_layer_destroy(moe_layer *layer) {
    if (!layer) return;
    moe__layer_drop_quant(layer);
    moe__layer_drop_pack(layer);
    moe__free(layer->ctx, layer->own);
    moe__free(layer->ctx, layer);
}

/* Reduced-precision weights serve inference only. */
static moe_result moe__check_trainable(const moe_layer *l) {
#ifdef MOE_NO_TRAINING
    return moe__fail(l->ctx, MOE_ERR_UNSUPPORTED, "layer %d: built with MOE_NO_TRAINING: inference only (moe_forward_opts.training)", l->index);
#endif
    if (l->wdtype == MOE_DTYPE_F32) return MOE_OK;
    return moe__fail(l->ctx, MOE_ERR_STATE, "layer %d holds reduced-precision weights (inference only); moe_layer_quantize(layer, MOE_DTYPE_F32) restores training", l->index);
}

#ifndef MOE_NO_TRAINING
/* A vote has no gradient: backward follows a training forward of a voting layer. */
static moe_result moe__check_backward(const moe_layer *l) {
    MOE__TRY(moe__check_trainable(l));
    if (!l->voted) return MOE_OK;
    return moe__fail(l->ctx, MOE_ERR_STATE, "layer %d votes at inference, which has no gradient; backward needs a training forward (moe_forward_opts.training)", l->index);
}
#endif /* MOE_NO_TRAINING */

MOEDEF moe_result moe_layer_forward(moe_layer *l, const float *x, int64_t n_tokens, float *y, const moe_forward_opts *opts) {
    if (!l) return MOE_ERR_INVALID_ARGUMENT;
    if (!x || !y) return moe__fail(l->ctx, MOE_ERR_INVALID_ARGUMENT, "x and y must not be NULL");
    MOE__TRY(moe__check_tokens(l->ctx, n_tokens, l->max_tokens));
    if (!moe__all_finite(x, n_tokens * l->d.d_in)) return moe__fail(l->ctx, MOE_ERR_NONFINITE, "x holds NaN or Inf");
    if (l->d.kind == MOE_LAYER_EMBEDDING) MOE__TRY(moe__embedding_check(l, x, n_tokens));
    if (opts && opts->training) MOE__TRY(moe__check_trainable(l));
    MOE__TRY(moe__call_check(l, opts));
    MOE__TRY(moe__group_check(l, n_tokens));
    moe__layer_forward_impl(l, x, n_tokens, y, opts && opts->training,
                            opts && opts->router_noise ? opts->router_noise[0] : NULL, opts);
    return MOE_OK;
}

#ifndef MOE_NO_TRAINING
MOEDEF moe_result moe_layer_backward(moe_layer *l, const float *dy, float *dx, int flags) {
    if (!l) return MOE_ERR_INVALID_ARGUMENT;
    if (!l->has_forward) return moe__fail(l->ctx, MOE_ERR_STATE, "backward before any forward");
    if (!dy) return moe__fail(l->ctx, MOE_ERR_INVALID_ARGUMENT, "dy is NULL");
    MOE__TRY(moe__check_backward(l));
    moe__layer_backward_impl(l, dy, dx, flags);
    return MOE_OK;
}
#endif /* MOE_NO_TRAINING */

MOEDEF moe_result moe_layer_pack(moe_layer *l, int enable) {
    const moe__kernel *kn;
    int64_t total = 0, e;
    float *block;
    int b, s;
    if (!l) return MOE_ERR_INVALID_ARGUMENT;
    moe__layer_drop_pack(l);
    if (!enable || l->n_banks == 0 || l->wdtype != MOE_DTYPE_F32) return MOE_OK;
    kn = &l->ex.kernel;
    for (b = 0; b < l->n_banks; b++)
        for (s = 0; s < moe__bank_stages(&l->bank[b]); s++) {
            l->wpack_off[b][s] = total;
            total += l->bank[b].n * moe__pack_stage_floats(&l->bank[b], s, kn);
        }
    block = (float *)moe__malloc(l->ctx, (size_t)total * sizeof(float));
    if (!block) return moe__fail(l->ctx, MOE_ERR_OUT_OF_MEMORY, "layer %d: %lld bytes for packed weights", l->index, (long long)total * 4);
    for (b = 0; b < l->n_banks; b++)
        for (s = 0; s < moe__bank_stages(&l->bank[b]); s++)
            for (e = 0; e < l->bank[b].n; e++) {
                moe__gemm g = moe__forward_gemm(l, &l->bank[b], e, s, 0, 0, NULL);
                float *dst = block + l->wpack_off[b][s] + e * moe__pack_stage_floats(&l->bank[b], s, kn);
                int64_t kb;
                for (kb = 0; kb < g.K; kb += MOE__KC)
                    moe__pack_b(kn, &g, kn->nr, g.pair ? kn->nr / 2 : kn->nr, 0, g.N, kb, moe__min64(MOE__KC, g.K - kb), dst + kb * kn->nr,
                                kn->nr * g.K, NULL);
            }
    l->wpack = block;
    return MOE_OK;
}

static void moe__layer_drop_pack(moe_layer *l) {
    if (!l->wpack) return;
    moe__free(l->ctx, l->wpack);
    l->wpack = NULL;
}

static void moe__layer_drop_quant(moe_layer *l) {
    int b, j;
    if (!l->qblock) return;
    moe__free(l->ctx, l->qblock);
    l->qblock = NULL;
    l->wdtype = MOE_DTYPE_F32;
    for (b = 0; b < 2; b++)
        for (j = 0; j < MOE__MAX_LINEARS; j++) memset(&l->bank[b].qw[j], 0, sizeof l->bank[b].qw[j]);
}

/* Bytes of the reduced copies (NULL base: size only), carved in order. */
static size_t moe__quant_carve(moe_layer *l, moe_dtype dtype, char *base) {
    moe__carver c;
    int b, j;
    c.base = base; c.used = 0; c.overflow = 0;
    for (b = 0; b < l->n_banks; b++) {
        moe__bank *k = &l->bank[b];
        for (j = 0; j < k->n_linears; j++) {
            const moe__linear *lin = &k->lin[j];
            int64_t rows = (int64_t)k->n * lin->out;
            moe__mat *m = &k->qw[j];
            memset(m, 0, sizeof *m);
            m->ld = lin->in;
            m->groups = (lin->in + MOE__QGROUP - 1) / MOE__QGROUP;
            if (dtype == MOE_DTYPE_BF16) {
                m->bf16 = MOE__CARVE(&c, uint16_t, rows * lin->in);
            } else {
                m->q8 = MOE__CARVE(&c, int8_t, rows * lin->in);
                m->scale = MOE__CARVE(&c, float, rows * m->groups);
            }
        }
        k->q_rows = dtype == MOE_DTYPE_I8 || l->ex.kernel.dot_bf16 ? moe__min64(k->max_rows, (int64_t)MOE__DECODE_TOKENS * k->n) : 0;
        k->q_ld = moe__max64(k->d_in, k->d_hidden);
        k->q_stride = dtype == MOE_DTYPE_I8 ? k->q_ld : 2 * k->q_ld;
        for (j = 0; j < 2; j++) {
            k->xq[j] = k->q_rows ? MOE__CARVE(&c, int16_t, k->q_rows * k->q_stride) : NULL;
            k->xs[j] = k->q_rows && dtype == MOE_DTYPE_I8 ? MOE__CARVE(&c, float, k->q_rows * ((k->q_ld + MOE__QGROUP - 1) / MOE__QGROUP)) : NULL;
        }
    }
    return c.used;
}

/* Row r of w [rows, in] into bf16, or int8 with one scale per MOE__QGROUP weights (max |w| / 127). */
static void moe__quantize_row(const moe__mat *m, int64_t r, const float *w) {
    int64_t k, g;
    if (m->bf16) {
        uint16_t *dst = (uint16_t *)m->bf16 + r * m->ld;
        for (k = 0; k < m->ld; k++) dst[k] = moe__float_to_bf16(w[k]);
        return;
    }
    for (g = 0; g < m->groups; g++) {
        int64_t k0 = g * MOE__QGROUP, k1 = moe__min64(k0 + MOE__QGROUP, m->ld);
        int8_t *dst = (int8_t *)m->q8 + r * m->ld;
        float amax = 0.0f, scale, inv;
        for (k = k0; k < k1; k++) amax = fabsf(w[k]) > amax ? fabsf(w[k]) : amax;
        scale = amax / 127.0f;
        inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        ((float *)m->scale)[r * m->groups + g] = scale;
        for (k = k0; k < k1; k++) {
            float q = roundf(w[k] * inv);
            dst[k] = (int8_t)(q > 127.0f ? 127 : q < -127.0f ? -127 : (int)q);
        }
    }
}

MOEDEF moe_result moe_layer_quantize(moe_layer *l, moe_dtype dtype) {
    size_t bytes;
    char *block;
    int b, j;
    if (!l) return MOE_ERR_INVALID_ARGUMENT;
    if (dtype != MOE_DTYPE_F32 && dtype != MOE_DTYPE_BF16 && dtype != MOE_DTYPE_I8)
        return moe__fail(l->ctx, MOE_ERR_INVALID_ARGUMENT, "dtype %d: expert weights are MOE_DTYPE_F32, MOE_DTYPE_BF16 or MOE_DTYPE_I8", (int)dtype);
    if (l->d.kind != MOE_LAYER_MOE) return MOE_OK;
    if (!moe__all_finite(l->params, l->n_params))
        return moe__fail(l->ctx, MOE_ERR_NONFINITE, "layer %d: parameters hold NaN or Inf; nothing quantized", l->index);
    moe__layer_drop_quant(l);
    moe__layer_drop_pack(l);
    if (dtype == MOE_DTYPE_F32) return MOE_OK;
    bytes = moe__quant_carve(l, dtype, NULL);
    block = (char *)moe__malloc(l->ctx, bytes);
    if (!block) {
        moe__layer_drop_quant(l);
        return moe__fail(l->ctx, MOE_ERR_OUT_OF_MEMORY, "layer %d: %zu bytes for reduced-precision weights", l->index, bytes);
    }
    moe__quant_carve(l, dtype, block);
    for (b = 0; b < l->n_banks; b++)
        for (j = 0; j < l->bank[b].n_linears; j++) {
            const moe__linear *lin = &l->bank[b].lin[j];
            int64_t r;
            for (r = 0; r < (int64_t)l->bank[b].n * lin->out; r++) moe__quantize_row(&l->bank[b].qw[j], r, moe__w(l, lin->w) + r * lin->in);
        }
    l->qblock = block;
    l->wdtype = dtype;
    return MOE_OK;
}

#ifndef MOE_NO_TRAINING
/* Sigmoid router: b_e += rate * sign(mean load - load_e), load = assignments of the last forward
   before capacity. */
static void moe__update_selection_bias(moe_layer *l) {
    int64_t E = l->d.n_experts, e;
    float *b = moe__w(l, l->selection_bias);
    double mean = 0.0;
    if (l->selection_bias < 0 || !l->has_forward || l->d.bias_update_rate == 0.0f) return;
    for (e = 0; e < E; e++) mean += (double)l->chosen[e];
    mean /= (double)E;
    for (e = 0; e < E; e++) {
        double diff = mean - (double)l->chosen[e];
        b[e] += diff > 0.0 ? l->d.bias_update_rate : diff < 0.0 ? -l->d.bias_update_rate : 0.0f;
    }
}

MOEDEF moe_result moe_layer_update_bias(moe_layer *l) {
    if (!l) return MOE_ERR_INVALID_ARGUMENT;
    if (l->selection_bias >= 0 && !l->has_forward) return moe__fail(l->ctx, MOE_ERR_STATE, "selection-bias update before any forward");
    moe__update_selection_bias(l);
    return MOE_OK;
}
#endif /* MOE_NO_TRAINING */

static moe_result moe__stats_of(const moe_layer *l, moe_stats *stats) {
    memset(stats, 0, sizeof *stats);
    if (l->d.kind != MOE_LAYER_MOE) return moe__fail(l->ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d is not a MoE layer", l->index);
    if (!l->has_forward) return moe__fail(l->ctx, MOE_ERR_STATE, "no forward yet");
    *stats = l->stats;
    return MOE_OK;
}

MOEDEF moe_result moe_layer_stats(const moe_layer *layer, moe_stats *stats) {
    if (!layer || !stats) return MOE_ERR_INVALID_ARGUMENT;
    return moe__stats_of(layer, stats);
}

MOEDEF const moe_layer_desc *moe_layer_get_desc(const moe_layer *layer) { return layer ? &layer->d : NULL; }

MOEDEF float *moe_layer_params(moe_layer *layer, int64_t *n_params) {
    if (n_params) *n_params = layer ? layer->n_params : 0;
    return layer ? layer->params : NULL;
}

#ifndef MOE_NO_TRAINING
MOEDEF float *moe_layer_grads(moe_layer *layer, int64_t *n_params) {
    if (n_params) *n_params = layer ? layer->n_params : 0;
    return layer ? layer->grads : NULL;
}
#endif /* MOE_NO_TRAINING */

MOEDEF int moe_layer_tensor_count(const moe_layer *layer) { return layer ? layer->n_tensors : 0; }

static void moe__tensor_view(moe_layer *l, int i, const char *name, moe_tensor *t) {
    const moe__tdef *td = &l->tensors[i];
    int k;
    t->name = name;
    t->ndim = td->ndim;
    for (k = 0; k < 4; k++) t->shape[k] = k < td->ndim ? td->shape[k] : 1;
    t->offset = td->offset;
    t->size = td->size;
    t->data = l->params + td->offset;
    t->grad = l->grads ? l->grads + td->offset : NULL;
}

MOEDEF moe_result moe_layer_tensor(moe_layer *layer, int index, moe_tensor *tensor) {
    if (!layer || !tensor) return MOE_ERR_INVALID_ARGUMENT;
    if (index < 0 || index >= layer->n_tensors) return moe__fail(layer->ctx, MOE_ERR_INVALID_ARGUMENT, "tensor index %d out of range", index);
    moe__tensor_view(layer, index, layer->tensors[index].name, tensor);
    return MOE_OK;
}

#ifndef MOE_NO_TRAINING
// >>loss --------------------------------------------------------------------
/* Task loss of y [T, C] (rows ld apart; dy the same) against target [T, C]; dy (may be NULL) gets
   dLoss/dy times `scale`. Per-token losses go to tok[T] and are summed in order. */
static moe_result moe__loss(moe_ctx *ctx, const moe__exec *ex, moe_loss kind, const float *y, int64_t T, int64_t C, int64_t ld,
                            const moe_target *target, float *tok, float *dy, float scale_dy, float *loss) {
    int64_t t;
    double sum = 0.0;
    if (!target) return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "target is NULL");
    if (kind == MOE_LOSS_CROSS_ENTROPY) {
        if (!target->labels) return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "cross-entropy needs target->labels");
        for (t = 0; t < T; t++)
            if (target->labels[t] < 0 || target->labels[t] >= C)
                return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "label %d of row %lld is outside 0..%lld", (int)target->labels[t], (long long)t, (long long)(C - 1));
    } else if (!target->values) {
        return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "this loss needs target->values");
    }
    MOE__PARALLEL_FOR(ex->n_threads, (double)T * (double)C * 10.0)
    for (t = 0; t < T; t++) {
        const float *yt = y + t * ld;
        float *dyt = dy ? dy + t * ld : NULL;
        double lt = 0.0;
        int64_t c;
        if (kind == MOE_LOSS_CROSS_ENTROPY) {
            float m = -FLT_MAX, s = 0.0f, lse;
            int32_t label = target->labels[t];
            for (c = 0; c < C; c++) m = yt[c] > m ? yt[c] : m;
            for (c = 0; c < C; c++) s += expf(yt[c] - m);
            lse = m + logf(s);
            lt = (double)lse - (double)yt[label];
            if (dyt)
                for (c = 0; c < C; c++) dyt[c] = (expf(yt[c] - lse) - (c == label ? 1.0f : 0.0f)) / (float)T * scale_dy;
        } else {
            const float *tv = target->values + t * C;
            float scale = 1.0f / ((float)T * (float)C) * scale_dy;
            for (c = 0; c < C; c++) {
                float v = yt[c], q = tv[c];
                if (kind == MOE_LOSS_MSE) {
                    lt += (double)(v - q) * (double)(v - q);
                    if (dyt) dyt[c] = 2.0f * (v - q) * scale;
                } else {
                    lt += (double)(moe__softplus(v) - q * v);
                    if (dyt) dyt[c] = (moe__sigmoid(v) - q) * scale;
                }
            }
            lt /= (double)C;
        }
        tok[t] = (float)lt;
    }
    for (t = 0; t < T; t++) sum += tok[t];
    *loss = (float)(sum / (double)T);
    return MOE_OK;
}
#endif /* MOE_NO_TRAINING */

#ifndef MOE_NO_TRAINING
/* Log of component e's density at v [O] (mu, s: its means and log-stds, each [O]). */
static double moe__gaussian_log_density(const float *v, const float *mu, const float *s, int64_t O) {
    double acc = 0.0;
    int64_t j;
    for (j = 0; j < O; j++) {
        double z = ((double)v[j] - (double)mu[j]) * exp(-(double)s[j]);
        acc += -0.5 * z * z - (double)s[j] - 0.9189385332046727;  /* log sqrt(2 pi) */
    }
    return acc;
}
#endif /* MOE_NO_TRAINING */

/* log sum_e exp(lp_e) over the components with lp_e > -inf (there is always one). */
static double moe__mixture_lse(const float *lp, int64_t E) {
    double m = -HUGE_VAL, sum = 0.0;
    int64_t e;
    for (e = 0; e < E; e++) m = lp[e] > m ? lp[e] : m;
    for (e = 0; e < E; e++) sum += exp((double)lp[e] - m);
    return m + log(sum);
}

#ifndef MOE_NO_TRAINING
/* Gaussian-mixture NLL of y [T, E (1 + 2 O)] = (log pi | means | log-stds) against values [T, O]:
   tok[t] = -log sum_e pi_e N(v; mu_e, diag sigma_e^2), by log-sum-exp; dy (may be NULL) gets
   dLoss/dy: with responsibilities r_e, -r_e / T at log pi, -r_e z / sigma / T at the means and
   -r_e (z^2 - 1) / T at the log-stds (z = (v - mu) / sigma); unchosen components (log pi = -inf) 0. */
static moe_result moe__mixture_nll(moe_ctx *ctx, const moe__exec *ex, const float *y, int64_t T, int64_t E, int64_t O,
                                   const moe_target *target, float *tok, float *dy, float *loss) {
    int64_t W = E * (1 + 2 * O), t;
    double sum = 0.0;
    if (!target) return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "target is NULL");
    if (!target->values) return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "the mixture NLL needs target->values [T, %lld]", (long long)O);
    MOE__PARALLEL_FOR(ex->n_threads, (double)T * (double)W * 20.0)
    for (t = 0; t < T; t++) {
        const float *yt = y + t * W, *v = target->values + t * O;
        float *dyt = dy ? dy + t * W : NULL;
        double m = -HUGE_VAL, acc = 0.0, lse;
        int64_t e, j;
        for (e = 0; e < E; e++) {  /* online log-sum-exp over the components */
            double le;
            if (yt[e] == -INFINITY) continue;
            le = (double)yt[e] + moe__gaussian_log_density(v, yt + E + e * O, yt + E + E * O + e * O, O);
            if (le > m) { acc = acc * exp(m - le) + 1.0; m = le; }
            else acc += exp(le - m);
        }
        lse = m + log(acc);
        tok[t] = (float)-lse;
        if (!dyt) continue;
        for (e = 0; e < W; e++) dyt[e] = 0.0f;
        for (e = 0; e < E; e++) {
            const float *mu = yt + E + e * O, *s = yt + E + E * O + e * O;
            double r;
            if (yt[e] == -INFINITY) continue;
            r = exp((double)yt[e] + moe__gaussian_log_density(v, mu, s, O) - lse) / (double)T;
            dyt[e] = (float)-r;
            for (j = 0; j < O; j++) {
                double is = exp(-(double)s[j]), z = ((double)v[j] - (double)mu[j]) * is;
                dyt[E + e * O + j] = (float)(-r * z * is);
                dyt[E + E * O + e * O + j] = (float)(-r * (z * z - 1.0));
            }
        }
    }
    for (t = 0; t < T; t++) sum += tok[t];
    *loss = (float)(sum / (double)T);
    return MOE_OK;
}
#endif /* MOE_NO_TRAINING */

/* Arguments of the mixture helpers: sizes, and every token with a component to use. */
static moe_result moe__mixture_check(moe_ctx *ctx, const float *mixture, int64_t T, int E, int64_t O, const float *out) {
    int64_t W = (int64_t)E * (1 + 2 * O), t, e;
    if (!ctx) return MOE_ERR_INVALID_ARGUMENT;
    if (!mixture || !out) return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "mixture and out must not be NULL");
    if (T < 1 || E < 1 || !moe__dims_ok(O) || !moe__dims_ok((int64_t)E * (1 + 2 * O)))
        return moe__fail(ctx, MOE_ERR_SHAPE, "mixture of %lld tokens, %d components, d_out %lld: each must be at least 1", (long long)T, E, (long long)O);
    for (t = 0; t < T; t++) {
        int any = 0;
        for (e = 0; e < E; e++) any |= mixture[t * W + e] > -INFINITY && mixture[t * W + e] <= FLT_MAX;
        if (!any) return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "mixture token %lld has no component with a finite log pi", (long long)t);
    }
    return MOE_OK;
}

/* out[t] = sum_e softmax(log pi)_e mu_e (mode 0), or the mean of the largest log pi (mode 1). */
static moe_result moe__mixture_point(moe_ctx *ctx, const float *mixture, int64_t T, int E, int64_t O, float *out, int mode) {
    int64_t W = (int64_t)E * (1 + 2 * O), t, e, j;
    MOE__TRY(moe__mixture_check(ctx, mixture, T, E, O, out));
    for (t = 0; t < T; t++) {
        const float *yt = mixture + t * W;
        float *ot = out + t * O;
        int64_t best = 0;
        double lse = moe__mixture_lse(yt, E);
        for (e = 1; e < E; e++)
            if (yt[e] > yt[best]) best = e;
        for (j = 0; j < O; j++) ot[j] = mode ? yt[E + best * O + j] : 0.0f;
        for (e = 0; e < E && !mode; e++) {
            float w = (float)exp((double)yt[e] - lse);
            for (j = 0; j < O; j++) ot[j] += w * yt[E + e * O + j];
        }
    }
    return MOE_OK;
}

MOEDEF moe_result moe_mixture_mean(moe_ctx *ctx, const float *mixture, int64_t n_tokens, int n_components, int64_t d_out, float *out) {
    return moe__mixture_point(ctx, mixture, n_tokens, n_components, d_out, out, 0);
}

MOEDEF moe_result moe_mixture_top_mean(moe_ctx *ctx, const float *mixture, int64_t n_tokens, int n_components, int64_t d_out, float *out) {
    return moe__mixture_point(ctx, mixture, n_tokens, n_components, d_out, out, 1);
}

enum { MOE__STREAM_MIXTURE_SAMPLE = 12 };

/* stream = 12 << 56 xor draw. Token t draws u = uniform(seed, stream, t (O + 1)) for the component (the first whose cumulative
   pi exceeds u, in index order) and normal(seed, stream, t (O + 1) + 1 + j) for dimension j. */
MOEDEF moe_result moe_mixture_sample(moe_ctx *ctx, const float *mixture, int64_t n_tokens, int n_components, int64_t d_out,
                                     uint64_t draw, float *out) {
    int64_t E = n_components, O = d_out, W, t, e, j;
    uint64_t stream = ((uint64_t)MOE__STREAM_MIXTURE_SAMPLE << 56) ^ draw;
    MOE__TRY(moe__mixture_check(ctx, mixture, n_tokens, n_components, d_out, out));
    W = E * (1 + 2 * O);
    for (t = 0; t < n_tokens; t++) {
        const float *yt = mixture + t * W;
        uint64_t c0 = (uint64_t)t * (uint64_t)(O + 1);
        double u = (double)moe_rng_uniform(ctx->seed, stream, c0), lse = moe__mixture_lse(yt, E), cum = 0.0;
        int64_t pick = -1;
        for (e = 0; e < E; e++) {
            if (yt[e] == -INFINITY) continue;
            pick = e;  /* rounding can leave the sum a hair under u: the last component then */
            cum += exp((double)yt[e] - lse);
            if (u < cum) break;
        }
        for (j = 0; j < O; j++)
            out[t * O + j] = yt[E + pick * O + j] + expf(yt[E + E * O + pick * O + j]) * moe_rng_normal(ctx->seed, stream, c0 + 1 + (uint64_t)j);
    }
    return MOE_OK;
}

// >>optimizer ---------------------------------------------------------------
#ifndef MOE_NO_TRAINING
struct moe_optimizer {
    moe_ctx *ctx;
    moe_optimizer_desc d;
    int64_t n;
    float *m, *v;               /* same layout as the parameters */
    double *partial;            /* per-chunk sums of squares */
    int64_t n_chunks;
    int64_t step;
};

#define MOE__CHUNK 8192
#endif /* MOE_NO_TRAINING */

static moe_result moe__optimizer_resolve(moe_ctx *ctx, const moe_optimizer_desc *in, moe_optimizer_desc *out) {
    moe_optimizer_desc d = *in;
    if ((int)d.kind < 0 || d.kind >= MOE_OPTIMIZER_COUNT) return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "unknown optimizer %d", (int)d.kind);
    if (d.kind == MOE_OPTIMIZER_DEFAULT) d.kind = MOE_OPTIMIZER_ADAMW;
    if (d.lr == 0.0f) d.lr = 1e-3f;
    if (d.beta1 == 0.0f) d.beta1 = 0.9f;
    if (d.beta2 == 0.0f) d.beta2 = 0.999f;
    if (d.eps == 0.0f) d.eps = 1e-8f;
    if (!(d.lr > 0.0f) || !moe__finite(d.lr) || !(d.beta1 > 0.0f && d.beta1 < 1.0f) || !(d.beta2 > 0.0f && d.beta2 < 1.0f) ||
        !(d.eps > 0.0f) || !(d.weight_decay >= 0.0f) || !(d.momentum >= 0.0f && d.momentum < 1.0f) || !(d.clip_norm >= 0.0f) ||
        d.warmup_steps < 0 || d.total_steps < 0 || !(d.min_lr >= 0.0f) || !moe__finite(d.weight_decay) || !moe__finite(d.clip_norm) ||
        !moe__finite(d.min_lr))
        return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "optimizer settings out of range");
    *out = d;
    return MOE_OK;
}

#ifndef MOE_NO_TRAINING
MOEDEF moe_result moe_optimizer_create(moe_ctx *ctx, const moe_optimizer_desc *desc, int64_t n_params, moe_optimizer **out) {
    moe_optimizer *o;
    moe_optimizer_desc d, zero;
    size_t state;
    if (!ctx || !out) return MOE_ERR_INVALID_ARGUMENT;
    *out = NULL;
    memset(&zero, 0, sizeof zero);
    MOE__TRY(moe__optimizer_resolve(ctx, desc ? desc : &zero, &d));
    if (n_params < 0) return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "n_params < 0");
    o = (moe_optimizer *)moe__calloc(ctx, sizeof *o);
    if (!o) return moe__fail(ctx, MOE_ERR_OUT_OF_MEMORY, "optimizer");
    o->ctx = ctx;
    o->d = d;
    o->n = n_params;
    o->n_chunks = (n_params + MOE__CHUNK - 1) / MOE__CHUNK;
    state = d.kind == MOE_OPTIMIZER_SGD ? (d.momentum > 0.0f ? 1 : 0) : 2;
    o->partial = (double *)moe__calloc(ctx, (size_t)(o->n_chunks + 1) * sizeof(double));
    o->m = state >= 1 ? (float *)moe__calloc(ctx, (size_t)(n_params + 1) * sizeof(float)) : NULL;
    o->v = state >= 2 ? (float *)moe__calloc(ctx, (size_t)(n_params + 1) * sizeof(float)) : NULL;
    if (!o->partial || (state >= 1 && !o->m) || (state >= 2 && !o->v)) {
        moe_optimizer_destroy(o);
        return moe__fail(ctx, MOE_ERR_OUT_OF_MEMORY, "optimizer state for %lld parameters", (long long)n_params);
    }
    *out = o;
    return MOE_OK;
}

MOEDEF void moe_optimizer_destroy(moe_optimizer *o) {
    if (!o) return;
    moe__free(o->ctx, o->m);
    moe__free(o->ctx, o->v);
    moe__free(o->ctx, o->partial);
    moe__free(o->ctx, o);
}

MOEDEF float moe_optimizer_lr(const moe_optimizer *o, int64_t i) {
    const moe_optimizer_desc *d;
    if (!o) return 0.0f;
    d = &o->d;
    if (d->warmup_steps > 0 && i < d->warmup_steps) return d->lr * (float)(i + 1) / (float)d->warmup_steps;
    if (d->total_steps > 0) {
        double q = (double)(i - d->warmup_steps) / (double)moe__max64(1, d->total_steps - d->warmup_steps);
        if (q > 1.0) q = 1.0;
        if (q < 0.0) q = 0.0;
        return (float)((double)d->min_lr + 0.5 * ((double)d->lr - (double)d->min_lr) * (1.0 + cos(3.14159265358979323846 * q)));
    }
    return d->lr;
}

MOEDEF int64_t moe_optimizer_steps(const moe_optimizer *o) { return o ? o->step : 0; }

/* Apply (write != 0) or only try (write == 0) the update of chunk c. Both passes run the same
   arithmetic, so a step whose try finds every new parameter and moment finite writes finite values.
   Returns nonzero when the chunk would hold a NaN or Inf. */
static int moe__optimizer_chunk(moe_optimizer *o, float *params, float *grads, int64_t c, float scale, float lr,
                                float b1c, float b2c_sqrt, int write) {
    const moe_optimizer_desc *d = &o->d;
    int64_t i, i1 = moe__min64((c + 1) * MOE__CHUNK, o->n);
    float wd = d->weight_decay, acc = 0.0f, bound = fabsf(lr / b1c) / d->eps;
    int kind = (int)d->kind;
    for (i = c * MOE__CHUNK; i < i1; i++) {
        float g = grads[i], p = params[i], m = o->m ? o->m[i] : 0.0f, v = o->v ? o->v[i] : 0.0f, gs;
        if (scale != 1.0f) g *= scale;
        gs = g;
        if (kind == MOE_OPTIMIZER_SGD) {
            g += wd * p;
            if (o->m) { m = d->momentum * m + g; g = m; }
            p = p - lr * g;
        } else {
            if (kind == MOE_OPTIMIZER_ADAMW) p *= 1.0f - lr * wd;
            else g += wd * p;
            m = d->beta1 * m + (1.0f - d->beta1) * g;
            v = d->beta2 * v + (1.0f - d->beta2) * g * g;
            /* the try pass skips the square root and division where a bound already shows the new
               parameter finite: |p'| <= |p| + |lr / b1c| |m| / eps */
            if (!write && fabsf(p) + bound * fabsf(m) < 1e37f && v - v == 0.0f) continue;
            p = p - (lr / b1c) * m / (sqrtf(v) / b2c_sqrt + d->eps);
        }
        if (!write) { acc += p * 0.0f + m * 0.0f + v * 0.0f; continue; }  /* NaN or Inf anywhere makes acc NaN */
        grads[i] = gs;
        params[i] = p;
        if (o->m) o->m[i] = m;
        if (o->v) o->v[i] = v;
    }
    return acc != 0.0f;
}

MOEDEF moe_result moe_optimizer_step(moe_optimizer *o, float *params, float *grads, moe_step_info *info) {
    const moe_optimizer_desc *d;
    int64_t c, n, bad = 0;
    double sq = 0.0;
    float norm, scale = 1.0f, lr, b1c, b2c_sqrt;
    if (!o) return MOE_ERR_INVALID_ARGUMENT;
    if (!params || !grads) return moe__fail(o->ctx, MOE_ERR_INVALID_ARGUMENT, "params and grads must not be NULL");
    d = &o->d;
    n = o->n;
    /* global norm: fixed chunks summed in order, whatever the thread count */
    MOE__PARALLEL_FOR(o->ctx->n_threads, (double)n * 4.0)
    for (c = 0; c < o->n_chunks; c++) {
        int64_t i, i1 = moe__min64((c + 1) * MOE__CHUNK, n);
        double s = 0.0;
        for (i = c * MOE__CHUNK; i < i1; i++) s += (double)grads[i] * (double)grads[i];
        o->partial[c] = s;
    }
    for (c = 0; c < o->n_chunks; c++) sq += o->partial[c];
    norm = (float)sqrt(sq);
    if (!moe__finite(norm)) return moe__fail(o->ctx, MOE_ERR_NONFINITE, "gradient norm is not finite; parameters unchanged");
    if (d->clip_norm > 0.0f) {  /* as torch.nn.utils.clip_grad_norm_: scale by min(1, clip / (norm + 1e-6)) */
        float c = d->clip_norm / (norm + 1e-6f);
        if (c < 1.0f) scale = c;
    }
    lr = moe_optimizer_lr(o, o->step);
    b1c = 1.0f - (float)pow((double)d->beta1, (double)(o->step + 1));
    b2c_sqrt = (float)sqrt(1.0 - pow((double)d->beta2, (double)(o->step + 1)));
    /* try first: an update that would leave a NaN or Inf in a parameter or moment changes nothing */
    MOE__PARALLEL_FOR(o->ctx->n_threads, (double)n * 8.0)
    for (c = 0; c < o->n_chunks; c++) o->partial[c] = moe__optimizer_chunk(o, params, grads, c, scale, lr, b1c, b2c_sqrt, 0);
    for (c = 0; c < o->n_chunks; c++) bad += o->partial[c] != 0.0;
    if (bad) return moe__fail(o->ctx, MOE_ERR_NONFINITE, "the update (lr %g) would make parameters or optimizer state non-finite; nothing changed", (double)lr);
    MOE__PARALLEL_FOR(o->ctx->n_threads, (double)n * 8.0)
    for (c = 0; c < o->n_chunks; c++) moe__optimizer_chunk(o, params, grads, c, scale, lr, b1c, b2c_sqrt, 1);
    o->step++;
    if (info) {
        info->grad_norm = norm;
        info->lr = lr;
        info->step = o->step;
    }
    return MOE_OK;
}
#endif /* MOE_NO_TRAINING */

// >>model -------------------------------------------------------------------
typedef struct moe__model_tensor {
    char name[MOE__NAME_MAX + 24];
    int layer, index;
} moe__model_tensor;

struct moe_model {
    moe_ctx *ctx;
    moe_model_desc desc;        /* resolved; desc.layers points at layer_descs */
    moe_layer_desc *layer_descs;
    moe_layer *layers;
    int n_layers;
    float *params, *grads;
    int64_t n_params;
    struct moe_optimizer *opt;  /* NULL under MOE_NO_TRAINING */
    moe__model_tensor *tensors;
    int n_tensors;
    void *arena;
    float **outs;               /* [n_layers] each [max_tokens, d_out of the layer] */
    float *dbuf[2];             /* backward ping-pong, [max_tokens, widest] */
    float *dloss;               /* [max_tokens, d_out] */
    float *tok;                 /* [max_tokens] per-token losses */
    moe__exec ex;
    const float *x;
    int64_t T;
    int has_forward;
    float task_loss[MOE_MAX_TASKS]; /* multi-task models: each task's loss of the last moe_model_loss */
    void *memory;               /* moe_model_init_memory: the caller's memory holding all of the model */
    int32_t *token_ids;         /* [max_tokens] ids for hash routers taken from an embedding input */
};

MOEDEF void moe_model_destroy(moe_model *m) {
    moe_ctx *ctx;
    int i;
    if (!m || m->memory) return;  /* in caller memory: nothing of it is ours to free */
    ctx = m->ctx;
    for (i = 0; m->layers && i < m->n_layers; i++) {
        moe__layer_drop_quant(&m->layers[i]);
        moe__layer_drop_pack(&m->layers[i]);
    }
#ifndef MOE_NO_TRAINING
    moe_optimizer_destroy(m->opt);
#endif
    moe__free(ctx, m->arena);
    moe__free(ctx, m->params);
    moe__free(ctx, m->tensors);
    moe__free(ctx, m->outs);
    moe__free(ctx, m->layers);
    moe__free(ctx, m->layer_descs);
    moe__free(ctx, m);
}

/* Multi-task fields: losses and weights (the widths need the last layer: moe__task_widths). */
static moe_result moe__tasks_resolve(moe_ctx *ctx, moe_model_desc *d) {
    int i;
    if (d->n_tasks < 0 || d->n_tasks > MOE_MAX_TASKS)
        return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "n_tasks %d out of range 0..%d", d->n_tasks, MOE_MAX_TASKS);
    for (i = 0; i < MOE_MAX_TASKS; i++) {
        if (i >= d->n_tasks) {
            d->task_loss[i] = MOE_LOSS_DEFAULT; d->task_weight[i] = 0.0f; d->task_d_out[i] = 0;
            continue;
        }
        if ((int)d->task_loss[i] < 0 || d->task_loss[i] >= MOE_LOSS_COUNT) return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "task %d: unknown loss %d", i, (int)d->task_loss[i]);
        if (d->task_loss[i] == MOE_LOSS_DEFAULT) d->task_loss[i] = d->loss;
        if (d->task_weight[i] == 0.0f) d->task_weight[i] = 1.0f;
        if (!(d->task_weight[i] > 0.0f) || !moe__finite(d->task_weight[i]))
            return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "task %d: task_weight must be finite and > 0", i);
    }
    return MOE_OK;
}

/* Slice widths: all 0 splits d_out evenly; otherwise each >= 1 and they sum to d_out. */
static moe_result moe__task_widths(moe_ctx *ctx, moe_model_desc *d, int64_t d_out) {
    int64_t sum = 0;
    int i, given = 0;
    if (d->n_tasks == 0) return MOE_OK;
    for (i = 0; i < d->n_tasks; i++) given |= d->task_d_out[i] != 0;
    if (!given) {
        if (d_out % d->n_tasks != 0) return moe__fail(ctx, MOE_ERR_SHAPE, "d_out %lld does not split into %d equal task slices", (long long)d_out, d->n_tasks);
        for (i = 0; i < d->n_tasks; i++) d->task_d_out[i] = d_out / d->n_tasks;
    }
    for (i = 0; i < d->n_tasks; i++) {
        if (d->task_d_out[i] < 1 || d->task_d_out[i] > d_out)
            return moe__fail(ctx, MOE_ERR_SHAPE, "task %d: task_d_out %lld out of range 1..%lld", i, (long long)d->task_d_out[i], (long long)d_out);
        sum += d->task_d_out[i];
    }
    if (sum != d_out) return moe__fail(ctx, MOE_ERR_SHAPE, "task_d_out sums to %lld but the model's d_out is %lld", (long long)sum, (long long)d_out);
    return MOE_OK;
}

static moe_result moe__model_resolve(moe_ctx *ctx, const moe_model_desc *in, moe_model_desc *out) {
    moe_model_desc d = *in;
    if (d.n_layers < 1 || d.n_layers > 4096 || !d.layers)
        return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "a model needs 1..4096 layers (n_layers %d)", d.n_layers);
    if (!moe__dims_ok(d.d_in)) return moe__fail(ctx, MOE_ERR_SHAPE, "d_in %lld out of range", (long long)d.d_in);
    if ((int)d.loss < 0 || d.loss >= MOE_LOSS_COUNT) return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "unknown loss %d", (int)d.loss);
    if (d.loss == MOE_LOSS_DEFAULT) d.loss = MOE_LOSS_CROSS_ENTROPY;
    MOE__TRY(moe__tasks_resolve(ctx, &d));
    MOE__TRY(moe__check_max_tokens(ctx, &d.max_tokens));
    MOE__TRY(moe__optimizer_resolve(ctx, &d.optimizer, &d.optimizer));
    *out = d;
    return MOE_OK;
}

MOEDEF moe_result moe_model_create(moe_ctx *ctx, const moe_model_desc *desc, moe_model **out) {
    moe_model *m;
    moe_model_desc d;
    int i, t, nt = 0;
    int64_t prev, widest, T, stream = 0, a_rows = 4 * MOE__MR_MAX;
    size_t saved = 0, scratch = 0, total;
    moe__carver sv, sc;
    char *block;
    moe_result r;
    if (!ctx || !out) return MOE_ERR_INVALID_ARGUMENT;
    *out = NULL;
    if (!desc) return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "desc is NULL");
    MOE__TRY(moe__model_resolve(ctx, desc, &d));
    m = (moe_model *)moe__calloc(ctx, sizeof *m);
    if (!m) return moe__fail(ctx, MOE_ERR_OUT_OF_MEMORY, "model struct");
    m->ctx = ctx;
    m->n_layers = d.n_layers;
    m->layer_descs = (moe_layer_desc *)moe__calloc(ctx, sizeof(moe_layer_desc) * (size_t)d.n_layers);
    m->layers = (moe_layer *)moe__calloc(ctx, sizeof(moe_layer) * (size_t)d.n_layers);
    m->outs = (float **)moe__calloc(ctx, sizeof(float *) * (size_t)d.n_layers);
    if (!m->layer_descs || !m->layers || !m->outs) { r = moe__fail(ctx, MOE_ERR_OUT_OF_MEMORY, "model tables"); goto fail; }
    T = d.max_tokens;
    prev = d.d_in;
    widest = d.d_in;
    for (i = 0; i < d.n_layers; i++) {
        moe_layer *l = &m->layers[i];
        size_t a = 0, b = 0;
        r = moe__layer_resolve(ctx, &d.layers[i], prev, i, &m->layer_descs[i]);
        if (r != MOE_OK) goto fail;
        if (i > 0 && m->layer_descs[i].kind == MOE_LAYER_EMBEDDING) {
            r = moe__fail(ctx, MOE_ERR_UNSUPPORTED, "layer %d: an embedding layer reads token ids: it must be the first layer", i);
            goto fail;
        }
        l->ctx = ctx;
        l->d = m->layer_descs[i];
        l->index = i;
        l->max_tokens = T;
        moe__layer_plan(l);
        r = moe__layer_sizes(l, &a, &b);
        if (r != MOE_OK) goto fail;
        if (a > MOE__MAX_BYTES || saved > MOE__MAX_BYTES) { r = moe__fail(ctx, MOE_ERR_OUT_OF_MEMORY, "layer %d: activations too large", i); goto fail; }
        saved += a;
        scratch = b > scratch ? b : scratch;
        m->n_params += l->n_params;
        nt += l->n_tensors;
        prev = moe__layer_width(&l->d);
        widest = moe__max64(widest, prev);
    }
    {
        const moe_layer_desc *last = &m->layer_descs[d.n_layers - 1];
        int mixture = last->kind == MOE_LAYER_MOE && last->expert == MOE_EXPERT_GAUSSIAN;
        if (mixture && desc->loss == MOE_LOSS_DEFAULT) d.loss = MOE_LOSS_MIXTURE_NLL;
        if ((d.loss == MOE_LOSS_MIXTURE_NLL) != mixture) {
            r = moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, mixture ? "the last layer has Gaussian experts: its loss is mixture_nll"
                                                                 : "the mixture_nll loss needs a last layer with Gaussian experts");
            goto fail;
        }
    }
    r = moe__task_widths(ctx, &d, prev);
    if (r != MOE_OK) goto fail;
    d.layers = m->layer_descs;
    m->desc = d;
    /* the activation arena: saved activations | shared scratch | outputs and model buffers */
    for (i = 0; i < d.n_layers; i++) a_rows = moe__max64(a_rows, moe__scratch_rows(&m->layers[i]));
    {
        moe__carver rest;
        int pass;
        block = NULL;
        for (pass = 0; pass < 2; pass++) {
            rest.base = block ? block + saved + scratch : NULL; rest.used = 0; rest.overflow = 0;
            for (i = 0; i < d.n_layers; i++) m->outs[i] = MOE__CARVE(&rest, float, T * moe__layer_width(&m->layers[i].d));
#ifndef MOE_NO_TRAINING
            m->dbuf[0] = MOE__CARVE(&rest, float, T * widest);
            m->dbuf[1] = MOE__CARVE(&rest, float, T * widest);
            m->dloss = MOE__CARVE(&rest, float, T * prev);
            m->tok = MOE__CARVE(&rest, float, T);
#endif
            m->token_ids = MOE__CARVE(&rest, int32_t, T);
            m->ex.scratch = MOE__CARVE(&rest, float, (size_t)ctx->n_threads * moe__scratch_floats(a_rows));
            if (pass == 0) {
                total = saved + scratch + rest.used;
                if (rest.overflow || total < rest.used || total > MOE__MAX_BYTES || m->n_params > (int64_t)(MOE__MAX_BYTES / 8)) {
                    r = moe__fail(ctx, MOE_ERR_OUT_OF_MEMORY, "%lld parameters and %.3g bytes of activations for max_tokens %lld: too large",
                                  (long long)m->n_params, (double)saved + (double)scratch + (double)rest.used, (long long)T);
                    goto fail;
                }
                block = (char *)moe__malloc(ctx, total);
                if (!block) { r = moe__fail(ctx, MOE_ERR_OUT_OF_MEMORY, "activation arena (%zu bytes)", total); goto fail; }
                m->arena = block;
            }
        }
    }
    /* parameters and gradients: one blob of 2 * n_params floats (MOE_NO_TRAINING: no gradients) */
    m->params = (float *)moe__calloc(ctx, (size_t)m->n_params * MOE__BLOBS * sizeof(float) + MOE__ALIGN);
    m->tensors = (moe__model_tensor *)moe__calloc(ctx, sizeof(moe__model_tensor) * (size_t)(nt + 1));
    if (!m->params || !m->tensors) { r = moe__fail(ctx, MOE_ERR_OUT_OF_MEMORY, "parameters (%lld floats)", (long long)m->n_params); goto fail; }
    m->grads = MOE__BLOBS > 1 ? m->params + m->n_params : NULL;
    sv.base = block; sv.used = 0; sv.overflow = 0;
    sc.base = block + saved; sc.used = 0; sc.overflow = 0;
    moe__exec_init(&m->ex, ctx, m->ex.scratch, a_rows);
    {
        int64_t off = 0;
        for (i = 0; i < d.n_layers; i++) {
            moe_layer *l = &m->layers[i];
            moe__carver lsc = sc;  /* every layer's scratch starts at the same place */
            l->params = m->params + off;
            l->grads = m->grads + off;
            l->ex = m->ex;
            moe__layer_carve(l, &sv, &lsc);
                    moe__layer_init_params(l, stream);
            stream += l->n_tensors;
            for (t = 0; t < l->n_tensors; t++) {
                moe__model_tensor *mt = &m->tensors[m->n_tensors++];
                char head[24];
                moe__format(head, sizeof head, "layers.%d.", i);
                moe__concat(mt->name, sizeof mt->name, head, l->tensors[t].name, "");
                mt->layer = i;
                mt->index = t;
            }
            off += l->n_params;
        }
    }
#ifndef MOE_NO_TRAINING
    r = moe_optimizer_create(ctx, &d.optimizer, m->n_params, &m->opt);
    if (r != MOE_OK) goto fail;
#endif
    *out = m;
    return MOE_OK;
fail:
    moe_model_destroy(m);
    return r;
}

MOEDEF const moe_model_desc *moe_model_get_desc(const moe_model *model) { return model ? &model->desc : NULL; }

MOEDEF int64_t moe_model_d_out(const moe_model *model) {
    return model ? moe__layer_width(&model->layers[model->n_layers - 1].d) : 0;
}

static moe_result moe__model_forward(moe_model *m, const float *x, int64_t T, const moe_forward_opts *opts) {
    const float *in = x;
    moe_forward_opts with_ids;
    int i;
    MOE__TRY(moe__check_tokens(m->ctx, T, m->desc.max_tokens));
    if (!x) return moe__fail(m->ctx, MOE_ERR_INVALID_ARGUMENT, "x is NULL");
    if (!moe__all_finite(x, T * m->desc.d_in)) return moe__fail(m->ctx, MOE_ERR_NONFINITE, "x holds NaN or Inf");
    if (m->layers[0].d.kind == MOE_LAYER_EMBEDDING) {
        MOE__TRY(moe__embedding_check(&m->layers[0], x, T));
        if (!(opts && opts->token_ids)) {  /* hash routers: the id of each row's last position */
            int64_t n = m->desc.d_in, t;
            for (t = 0; t < T; t++) m->token_ids[t] = (int32_t)x[t * n + n - 1];
            memset(&with_ids, 0, sizeof with_ids);
            if (opts) with_ids = *opts;
            with_ids.token_ids = m->token_ids;
            opts = &with_ids;
        }
    }
    for (i = 0; i < m->n_layers; i++) {
        if (opts && opts->training) MOE__TRY(moe__check_trainable(&m->layers[i]));
        MOE__TRY(moe__call_check(&m->layers[i], opts));
        MOE__TRY(moe__group_check(&m->layers[i], T));
    }
    m->has_forward = 0;
    for (i = 0; i < m->n_layers; i++) {
        const float *noise = opts && opts->router_noise ? opts->router_noise[i] : NULL;
        moe__layer_forward_impl(&m->layers[i], in, T, m->outs[i], opts && opts->training, noise, opts);
        in = m->outs[i];
    }
    m->x = x;
    m->T = T;
    m->has_forward = 1;
    return MOE_OK;
}

MOEDEF moe_result moe_model_forward(moe_model *m, const float *x, int64_t n_tokens, float *y, const moe_forward_opts *opts) {
    if (!m) return MOE_ERR_INVALID_ARGUMENT;
    MOE__TRY(moe__model_forward(m, x, n_tokens, opts));
    if (y) memcpy(y, m->outs[m->n_layers - 1], (size_t)(n_tokens * moe_model_d_out(m)) * sizeof(float));
    return MOE_OK;
}

MOEDEF const float *moe_model_output(const moe_model *m) {
    return m && m->has_forward ? m->outs[m->n_layers - 1] : NULL;
}

#ifndef MOE_NO_TRAINING
/* Multi-task models: task i's loss on its slice of the output, times its weight, summed in task order. */
static moe_result moe__task_losses(moe_model *m, const moe_target *target, float *loss, float *dy) {
    const moe_model_desc *d = &m->desc;
    int64_t W = moe_model_d_out(m), off = 0;
    double total = 0.0;
    int i;
    if (!target || !target->tasks) return moe__fail(m->ctx, MOE_ERR_INVALID_ARGUMENT, "a multi-task model needs target->tasks [%d]", d->n_tasks);
    for (i = 0; i < d->n_tasks; i++) {
        float li = 0.0f;
        moe_result r = moe__loss(m->ctx, &m->ex, d->task_loss[i], m->outs[m->n_layers - 1] + off, m->T, d->task_d_out[i], W, &target->tasks[i],
                                 m->tok, dy ? dy + off : NULL, d->task_weight[i], &li);
        if (r != MOE_OK) {
            char head[24];
            moe__format(head, sizeof head, "task %d", i);
            return moe__fail_prefix(m->ctx, r, head);
        }
        m->task_loss[i] = li;
        total += (double)d->task_weight[i] * (double)li;
        off += d->task_d_out[i];
    }
    *loss = (float)total;
    return MOE_OK;
}

MOEDEF moe_result moe_model_loss(moe_model *m, const moe_target *target, float *loss, float *dy) {
    float l = 0.0f;
    if (!m) return MOE_ERR_INVALID_ARGUMENT;
    if (!m->has_forward) return moe__fail(m->ctx, MOE_ERR_STATE, "loss before any forward");
    if (m->desc.n_tasks > 0) MOE__TRY(moe__task_losses(m, target, &l, dy));
    else if (m->desc.loss == MOE_LOSS_MIXTURE_NLL) {
        const moe_layer_desc *d = &m->layers[m->n_layers - 1].d;
        MOE__TRY(moe__mixture_nll(m->ctx, &m->ex, m->outs[m->n_layers - 1], m->T, d->n_experts, d->d_out, target, m->tok, dy, &l));
    } else {
        MOE__TRY(moe__loss(m->ctx, &m->ex, m->desc.loss, m->outs[m->n_layers - 1], m->T, moe_model_d_out(m), moe_model_d_out(m), target, m->tok, dy, 1.0f, &l));
    }
    if (loss) *loss = l;
    return MOE_OK;
}

MOEDEF moe_result moe_model_backward(moe_model *m, const float *dy, float *dx, int flags) {
    int i;
    if (!m) return MOE_ERR_INVALID_ARGUMENT;
    if (!m->has_forward) return moe__fail(m->ctx, MOE_ERR_STATE, "backward before any forward");
    if (!dy) return moe__fail(m->ctx, MOE_ERR_INVALID_ARGUMENT, "dy is NULL");
    for (i = 0; i < m->n_layers; i++) MOE__TRY(moe__check_backward(&m->layers[i]));
    for (i = m->n_layers - 1; i >= 0; i--) {
        float *dst = i > 0 ? m->dbuf[i & 1] : dx;
        moe__layer_backward_impl(&m->layers[i], dy, dst, flags);
        dy = dst;
    }
    return MOE_OK;
}

MOEDEF void moe_model_zero_grad(moe_model *m) {
    if (m) memset(m->grads, 0, (size_t)m->n_params * sizeof(float));
}

/* The optimizer step, with every selection bias held out of it (it is state, not a parameter:
   no weight decay) and then moved by the aux-loss-free rule. */
static moe_result moe__model_step(moe_model *m, moe_step_info *info) {
    moe_result r;
    int i;
    for (i = 0; i < m->n_layers; i++) {
        moe_layer *l = &m->layers[i];
        if (l->bias_keep) memcpy(l->bias_keep, moe__w(l, l->selection_bias), (size_t)l->d.n_experts * sizeof(float));
    }
    r = moe_optimizer_step(m->opt, m->params, m->grads, info);
    for (i = 0; i < m->n_layers; i++) {
        moe_layer *l = &m->layers[i];
        if (!l->bias_keep) continue;
        memcpy(moe__w(l, l->selection_bias), l->bias_keep, (size_t)l->d.n_experts * sizeof(float));
        if (r == MOE_OK) moe__update_selection_bias(l);
    }
    return r;
}

MOEDEF moe_result moe_model_optimizer_step(moe_model *m, moe_step_info *info) {
    if (!m) return MOE_ERR_INVALID_ARGUMENT;
    return moe__model_step(m, info);
}

MOEDEF int64_t moe_model_steps(const moe_model *m) { return m ? moe_optimizer_steps(m->opt) : 0; }

static float moe__model_aux(const moe_model *m) {
    float aux = 0.0f;
    int i;
    for (i = 0; i < m->n_layers; i++)
        if (m->layers[i].d.kind == MOE_LAYER_MOE) aux += m->layers[i].stats.aux_loss;
    return aux;
}

/* A refused training step draws its noise again when retried: every layer's counter goes back. */
static moe_result moe__model_refuse_step(moe_model *m, moe_result r) {
    int i;
    for (i = 0; i < m->n_layers; i++) m->layers[i].noise_step = m->layers[i].forward_step;
    return r;
}

MOEDEF moe_result moe_model_train_step(moe_model *m, const float *x, const moe_target *target, int64_t n_tokens, moe_step_info *info) {
    moe_forward_opts opts;
    moe_step_info si;
    float loss, aux;
    moe_result r;
    if (!m) return MOE_ERR_INVALID_ARGUMENT;
    memset(&opts, 0, sizeof opts);
    memset(&si, 0, sizeof si);
    opts.training = 1;
    MOE__TRY(moe__model_forward(m, x, n_tokens, &opts));
    r = moe_model_loss(m, target, &loss, m->dloss);
    if (r != MOE_OK) return moe__model_refuse_step(m, r);
    aux = moe__model_aux(m);
    si.loss = loss;
    si.aux_loss = aux;
    si.step = moe_optimizer_steps(m->opt);
    if (m->desc.n_tasks > 0) memcpy(si.task_loss, m->task_loss, sizeof si.task_loss);
    if (!moe__finite(loss) || !moe__finite(aux)) {
        if (info) *info = si;
        return moe__model_refuse_step(m, moe__fail(m->ctx, MOE_ERR_NONFINITE, "loss is not finite (loss %g, aux %g); parameters unchanged", (double)loss, (double)aux));
    }
    moe_model_zero_grad(m);
    r = moe_model_backward(m, m->dloss, NULL, MOE_BACKWARD_AUX);
    if (r == MOE_OK) r = moe__model_step(m, &si);
    si.loss = loss;
    si.aux_loss = aux;
    memcpy(si.task_loss, m->task_loss, sizeof si.task_loss);
    if (info) *info = si;
    return r == MOE_OK ? r : moe__model_refuse_step(m, r);
}
#endif /* MOE_NO_TRAINING */

MOEDEF moe_result moe_model_predict(moe_model *m, const float *x, int64_t n_tokens, int32_t *classes) {
    int64_t t, C;
    const float *y;
    if (!m) return MOE_ERR_INVALID_ARGUMENT;
    if (!classes) return moe__fail(m->ctx, MOE_ERR_INVALID_ARGUMENT, "classes is NULL");
    MOE__TRY(moe__model_forward(m, x, n_tokens, NULL));
    y = m->outs[m->n_layers - 1];
    C = moe_model_d_out(m);
    for (t = 0; t < n_tokens; t++) {
        int64_t c, best = 0;
        for (c = 1; c < C; c++)
            if (y[t * C + c] > y[t * C + best]) best = c;
        classes[t] = (int32_t)best;
    }
    return MOE_OK;
}

MOEDEF moe_result moe_model_stats(const moe_model *m, int layer, moe_stats *stats) {
    if (!m || !stats) return MOE_ERR_INVALID_ARGUMENT;
    memset(stats, 0, sizeof *stats);
    if (layer < 0 || layer >= m->n_layers) return moe__fail(m->ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d out of range", layer);
    return moe__stats_of(&m->layers[layer], stats);
}

MOEDEF moe_result moe_model_quantize(moe_model *m, moe_dtype dtype) {
    int i;
    if (!m) return MOE_ERR_INVALID_ARGUMENT;
    if (m->memory) return moe__fail(m->ctx, MOE_ERR_STATE, "a model in caller memory keeps the weights of its file (quantize the file instead)");
    for (i = 0; i < m->n_layers; i++) MOE__TRY(moe_layer_quantize(&m->layers[i], dtype));
    return MOE_OK;
}

MOEDEF moe_result moe_model_pack(moe_model *m, int enable) {
    int i;
    if (!m) return MOE_ERR_INVALID_ARGUMENT;
    if (m->memory && enable) return moe__fail(m->ctx, MOE_ERR_STATE, "a model in caller memory allocates nothing: it cannot hold packed weights");
    for (i = 0; i < m->n_layers; i++) MOE__TRY(moe_layer_pack(&m->layers[i], enable));
    return MOE_OK;
}

MOEDEF float *moe_model_params(moe_model *m, int64_t *n_params) {
    if (n_params) *n_params = m ? m->n_params : 0;
    return m ? m->params : NULL;
}

#ifndef MOE_NO_TRAINING
MOEDEF float *moe_model_grads(moe_model *m, int64_t *n_params) {
    if (n_params) *n_params = m ? m->n_params : 0;
    return m ? m->grads : NULL;
}
#endif /* MOE_NO_TRAINING */

MOEDEF int moe_model_tensor_count(const moe_model *m) { return m ? m->n_tensors : 0; }

MOEDEF int64_t moe_model_parameter_count(const moe_model *m) {
    int64_t n = 0;
    int i;
    for (i = 0; m && i < m->n_tensors; i++) n += m->layers[m->tensors[i].layer].tensors[m->tensors[i].index].size;
    return n;
}

MOEDEF moe_result moe_model_tensor(moe_model *m, int index, moe_tensor *tensor) {
    const moe__model_tensor *mt;
    moe_layer *l;
    if (!m || !tensor) return MOE_ERR_INVALID_ARGUMENT;
    if (index < 0 || index >= m->n_tensors) return moe__fail(m->ctx, MOE_ERR_INVALID_ARGUMENT, "tensor index %d out of range", index);
    mt = &m->tensors[index];
    l = &m->layers[mt->layer];
    moe__tensor_view(l, mt->index, mt->name, tensor);
    tensor->offset = (l->params - m->params) + l->tensors[mt->index].offset;
    return MOE_OK;
}

MOEDEF moe_result moe_model_find_tensor(moe_model *m, const char *name, moe_tensor *tensor) {
    int i;
    if (!m || !name || !tensor) return MOE_ERR_INVALID_ARGUMENT;
    for (i = 0; i < m->n_tensors; i++)
        if (strcmp(m->tensors[i].name, name) == 0) return moe_model_tensor(m, i, tensor);
    return moe__fail(m->ctx, MOE_ERR_INVALID_ARGUMENT, "no tensor named \"%s\"", name);
}

// >>json --------------------------------------------------------------------
/* A strict JSON parser into a flat token array (no allocation beyond one array
   whose size is bounded by the text's length) and a string builder for writing. */
enum { MOE__J_OBJECT, MOE__J_ARRAY, MOE__J_STRING, MOE__J_NUMBER, MOE__J_TRUE, MOE__J_FALSE, MOE__J_NULL };

typedef struct moe__jtok {
    int type;
    int32_t count;              /* object: members; array: elements */
    size_t start, end;          /* string: the raw bytes between the quotes; others: the text */
    int32_t next;               /* index of the first token after this value */
} moe__jtok;

typedef struct moe__json {
    const char *s;
    size_t len, at;
    moe__jtok *tok;
    int32_t n, cap;
    int depth;
    const char *err;
} moe__json;

#define MOE__JSON_MAX_DEPTH 32

static void moe__json_ws(moe__json *j) {
    while (j->at < j->len && (j->s[j->at] == ' ' || j->s[j->at] == '\t' || j->s[j->at] == '\n' || j->s[j->at] == '\r')) j->at++;
}

static int32_t moe__json_new(moe__json *j, int type, size_t start) {
    moe__jtok *t;
    if (j->n >= j->cap) { j->err = "too many values"; return -1; }
    t = &j->tok[j->n];
    t->type = type; t->count = 0; t->start = start; t->end = start; t->next = j->n + 1;
    return j->n++;
}

static int moe__hex(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static int moe__json_string_tok(moe__json *j) {
    int32_t t;
    j->at++;  /* opening quote */
    t = moe__json_new(j, MOE__J_STRING, j->at);
    if (t < 0) return 0;
    while (j->at < j->len) {
        unsigned char c = (unsigned char)j->s[j->at];
        if (c == '"') { j->tok[t].end = j->at++; return 1; }
        if (c < 0x20) { j->err = "control character in string"; return 0; }
        if (c == '\\') {
            char e;
            if (++j->at >= j->len) break;
            e = j->s[j->at];
            if (e == 'u') {
                int k;
                for (k = 1; k <= 4; k++)
                    if (j->at + (size_t)k >= j->len || moe__hex(j->s[j->at + (size_t)k]) < 0) { j->err = "bad \\u escape"; return 0; }
                j->at += 4;
            } else if (!strchr("\"\\/bfnrt", e) || e == 0) {
                j->err = "bad escape"; return 0;
            }
        }
        j->at++;
    }
    j->err = "unterminated string";
    return 0;
}

static int moe__json_value(moe__json *j);

static int moe__json_number_tok(moe__json *j) {
    size_t p = j->at;
    int32_t t;
    if (p < j->len && j->s[p] == '-') p++;
    if (p >= j->len || !(j->s[p] >= '0' && j->s[p] <= '9')) { j->err = "bad number"; return 0; }
    if (j->s[p] == '0') p++;
    else while (p < j->len && j->s[p] >= '0' && j->s[p] <= '9') p++;
    if (p < j->len && j->s[p] == '.') {
        p++;
        if (p >= j->len || !(j->s[p] >= '0' && j->s[p] <= '9')) { j->err = "bad number"; return 0; }
        while (p < j->len && j->s[p] >= '0' && j->s[p] <= '9') p++;
    }
    if (p < j->len && (j->s[p] == 'e' || j->s[p] == 'E')) {
        p++;
        if (p < j->len && (j->s[p] == '+' || j->s[p] == '-')) p++;
        if (p >= j->len || !(j->s[p] >= '0' && j->s[p] <= '9')) { j->err = "bad number"; return 0; }
        while (p < j->len && j->s[p] >= '0' && j->s[p] <= '9') p++;
    }
    t = moe__json_new(j, MOE__J_NUMBER, j->at);
    if (t < 0) return 0;
    j->tok[t].end = p;
    j->at = p;
    return 1;
}

static int moe__json_container(moe__json *j, int object) {
    int32_t t = moe__json_new(j, object ? MOE__J_OBJECT : MOE__J_ARRAY, j->at);
    char close = object ? '}' : ']';
    if (t < 0) return 0;
    if (++j->depth > MOE__JSON_MAX_DEPTH) { j->err = "nested too deeply"; return 0; }
    j->at++;
    moe__json_ws(j);
    if (j->at < j->len && j->s[j->at] == close) {
        j->at++;
    } else {
        for (;;) {
            moe__json_ws(j);
            if (object) {
                if (j->at >= j->len || j->s[j->at] != '"') { j->err = "expected a key"; return 0; }
                if (!moe__json_string_tok(j)) return 0;
                moe__json_ws(j);
                if (j->at >= j->len || j->s[j->at] != ':') { j->err = "expected ':'"; return 0; }
                j->at++;
            }
            if (!moe__json_value(j)) return 0;
            j->tok[t].count++;
            moe__json_ws(j);
            if (j->at < j->len && j->s[j->at] == ',') { j->at++; continue; }
            if (j->at < j->len && j->s[j->at] == close) { j->at++; break; }
            j->err = object ? "expected ',' or '}'" : "expected ',' or ']'";
            return 0;
        }
    }
    j->depth--;
    j->tok[t].end = j->at;
    j->tok[t].next = j->n;
    return 1;
}

static int moe__json_literal(moe__json *j, const char *word, int type) {
    size_t n = strlen(word);
    int32_t t;
    if (j->len - j->at < n || memcmp(j->s + j->at, word, n) != 0) { j->err = "unexpected character"; return 0; }
    t = moe__json_new(j, type, j->at);
    if (t < 0) return 0;
    j->at += n;
    j->tok[t].end = j->at;
    return 1;
}

static int moe__json_value(moe__json *j) {
    char c;
    moe__json_ws(j);
    if (j->at >= j->len) { j->err = "unexpected end"; return 0; }
    c = j->s[j->at];
    if (c == '{') return moe__json_container(j, 1);
    if (c == '[') return moe__json_container(j, 0);
    if (c == '"') return moe__json_string_tok(j);
    if (c == 't') return moe__json_literal(j, "true", MOE__J_TRUE);
    if (c == 'f') return moe__json_literal(j, "false", MOE__J_FALSE);
    if (c == 'n') return moe__json_literal(j, "null", MOE__J_NULL);
    return moe__json_number_tok(j);
}

/* Parse text[0..len) completely; tokens are allocated from ctx and freed by moe__json_free. */
static moe_result moe__json_parse(moe_ctx *ctx, const char *text, size_t len, moe__json *j, const char *what) {
    memset(j, 0, sizeof *j);
    j->s = text;
    j->len = len;
    if (len > (size_t)INT32_MAX / 2) return moe__fail(ctx, MOE_ERR_FORMAT, "%s: JSON text too long", what);
    j->cap = (int32_t)(len / 2 + 2);  /* every value takes at least one character and one separator */
    j->tok = (moe__jtok *)moe__malloc(ctx, sizeof(moe__jtok) * (size_t)j->cap);
    if (!j->tok) return moe__fail(ctx, MOE_ERR_OUT_OF_MEMORY, "%s: JSON tokens", what);
    if (moe__json_value(j)) {
        moe__json_ws(j);
        if (j->at == j->len) return MOE_OK;
        j->err = "trailing characters";
    }
    {
        moe_result r = moe__fail(ctx, MOE_ERR_FORMAT, "%s: invalid JSON at byte %zu: %s", what, j->at, j->err ? j->err : "?");
        moe__free(ctx, j->tok);
        j->tok = NULL;
        return r;
    }
}

static void moe__json_free(moe_ctx *ctx, moe__json *j) { moe__free(ctx, j->tok); j->tok = NULL; }

static void moe__put_utf8(char *out, size_t *n, uint32_t cp) {
    if (cp < 0x80) out[(*n)++] = (char)cp;
    else if (cp < 0x800) { out[(*n)++] = (char)(0xC0 | (cp >> 6)); out[(*n)++] = (char)(0x80 | (cp & 0x3F)); }
    else if (cp < 0x10000) { out[(*n)++] = (char)(0xE0 | (cp >> 12)); out[(*n)++] = (char)(0x80 | ((cp >> 6) & 0x3F)); out[(*n)++] = (char)(0x80 | (cp & 0x3F)); }
    else { out[(*n)++] = (char)(0xF0 | (cp >> 18)); out[(*n)++] = (char)(0x80 | ((cp >> 12) & 0x3F)); out[(*n)++] = (char)(0x80 | ((cp >> 6) & 0x3F)); out[(*n)++] = (char)(0x80 | (cp & 0x3F)); }
}

/* Decode a string token into out (cap bytes incl. NUL). Returns its length, or -1 if it does not fit
   or holds a NUL. The decoded text is never longer than the raw text. */
static int64_t moe__json_str(const moe__json *j, int32_t t, char *out, size_t cap) {
    const moe__jtok *k = &j->tok[t];
    size_t i = k->start, n = 0;
    if (k->type != MOE__J_STRING) return -1;
    while (i < k->end) {
        char c = j->s[i++];
        if (n + 5 > cap) return -1;
        if (c != '\\') { out[n++] = c; continue; }
        c = j->s[i++];
        switch (c) {
        case 'b': out[n++] = '\b'; break;
        case 'f': out[n++] = '\f'; break;
        case 'n': out[n++] = '\n'; break;
        case 'r': out[n++] = '\r'; break;
        case 't': out[n++] = '\t'; break;
        case 'u': {
            uint32_t cp = 0;
            int q;
            for (q = 0; q < 4; q++) cp = cp * 16 + (uint32_t)moe__hex(j->s[i++]);
            if (cp >= 0xD800 && cp < 0xDC00 && i + 6 <= k->end && j->s[i] == '\\' && j->s[i + 1] == 'u') {
                uint32_t lo = 0;
                for (q = 0; q < 4; q++) lo = lo * 16 + (uint32_t)moe__hex(j->s[i + 2 + (size_t)q]);
                if (lo >= 0xDC00 && lo < 0xE000) { cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00); i += 6; }
            }
            if (cp == 0) return -1;
            moe__put_utf8(out, &n, cp);
            break;
        }
        default: out[n++] = c; break;
        }
    }
    if (n >= cap) return -1;
    out[n] = 0;
    return (int64_t)n;
}

static int moe__json_eq(const moe__json *j, int32_t t, const char *lit) {
    const moe__jtok *k = &j->tok[t];
    size_t n = strlen(lit);
    return k->type == MOE__J_STRING && k->end - k->start == n && memcmp(j->s + k->start, lit, n) == 0;
}

/* A JSON number as double, without the C locale's help (strtod honours LC_NUMERIC). */
static int moe__json_double(const moe__json *j, int32_t t, double *out) {
    const moe__jtok *k = &j->tok[t];
    size_t i = k->start;
    double mant = 0.0;
    int neg = 0, eneg = 0, digits = 0;
    long exp10 = 0, e = 0;
    if (k->type != MOE__J_NUMBER) return 0;
    if (j->s[i] == '-') { neg = 1; i++; }
    for (; i < k->end && j->s[i] >= '0' && j->s[i] <= '9'; i++) {
        if (digits < 19) { mant = mant * 10.0 + (j->s[i] - '0'); if (mant > 0.0) digits++; }
        else exp10++;
    }
    if (i < k->end && j->s[i] == '.')
        for (i++; i < k->end && j->s[i] >= '0' && j->s[i] <= '9'; i++)
            if (digits < 19) { mant = mant * 10.0 + (j->s[i] - '0'); exp10--; if (mant > 0.0) digits++; }
    if (i < k->end && (j->s[i] == 'e' || j->s[i] == 'E')) {
        i++;
        if (j->s[i] == '+' || j->s[i] == '-') eneg = j->s[i++] == '-';
        for (; i < k->end; i++) if (e < 100000) e = e * 10 + (j->s[i] - '0');
    }
    exp10 += eneg ? -e : e;
    if (mant == 0.0) *out = 0.0;
    else if (exp10 > 400) *out = HUGE_VAL;
    else if (exp10 < -400) *out = 0.0;
    else if (exp10 < 0) *out = mant / pow(10.0, (double)-exp10);
    else *out = mant * pow(10.0, (double)exp10);
    if (neg) *out = -*out;
    return 1;
}

static int moe__json_int(const moe__json *j, int32_t t, int64_t *out) {
    const moe__jtok *k = &j->tok[t];
    size_t i = k->start;
    int neg = 0;
    uint64_t v = 0;
    if (k->type != MOE__J_NUMBER) return 0;
    if (j->s[i] == '-') { neg = 1; i++; }
    for (; i < k->end; i++) {
        char c = j->s[i];
        if (c < '0' || c > '9') return 0;  /* fraction or exponent */
        if (v > (uint64_t)INT64_MAX / 10) return 0;
        v = v * 10 + (uint64_t)(c - '0');
        if (v > (uint64_t)INT64_MAX) return 0;
    }
    *out = neg ? -(int64_t)v : (int64_t)v;
    return 1;
}

/* Growing text buffer for writing JSON. */
typedef struct moe__sb {
    moe_ctx *ctx;
    char *buf;
    size_t len, cap;
    int oom;
} moe__sb;

static void moe__sb_put(moe__sb *b, const char *s, size_t n) {
    if (b->oom) return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        char *nb;
        while (cap < b->len + n + 1) cap *= 2;
        nb = (char *)moe__malloc(b->ctx, cap);
        if (!nb) { b->oom = 1; return; }
        if (b->buf) { memcpy(nb, b->buf, b->len); moe__free(b->ctx, b->buf); }
        b->buf = nb;
        b->cap = cap;
    }
    memcpy(b->buf + b->len, s, n);
    b->len += n;
    b->buf[b->len] = 0;
}

static void moe__sb_str(moe__sb *b, const char *s) { moe__sb_put(b, s, strlen(s)); }

static void moe__sb_printf(moe__sb *b, const char *fmt, ...) {
    char tmp[128];
    size_t n;
    va_list ap;
    va_start(ap, fmt);
    n = moe__vformat(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    moe__sb_put(b, tmp, n < sizeof tmp ? n : sizeof tmp - 1);
}

/* Shortest-safe float text: 9 significant digits round-trip every float; the decimal point is
   forced to '.' whatever LC_NUMERIC says. */
static void moe__sb_float(moe__sb *b, float v) {
    char tmp[48];
    int i;
    if (!moe__finite(v)) { moe__sb_str(b, "0"); return; }
    for (i = 6; i <= 9; i++) {  /* the shortest of 6..9 significant digits that reads back as v */
        moe__format(tmp, sizeof tmp, "%.*g", i, (double)v);
        if ((float)strtod(tmp, NULL) == v) break;
    }
    for (i = 0; tmp[i]; i++)
        if (!((tmp[i] >= '0' && tmp[i] <= '9') || tmp[i] == '-' || tmp[i] == '+' || tmp[i] == 'e')) tmp[i] = '.';
    moe__sb_str(b, tmp);
}

static void moe__sb_json_string(moe__sb *b, const char *s) {
    moe__sb_put(b, "\"", 1);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') { char e[2]; e[0] = '\\'; e[1] = (char)c; moe__sb_put(b, e, 2); }
        else if (c < 0x20) moe__sb_printf(b, "\\u%04x", c);
        else moe__sb_put(b, s, 1);
    }
    moe__sb_put(b, "\"", 1);
}

// >>safetensors -------------------------------------------------------------
static const char *const moe__dtype_names[MOE_DTYPE_COUNT] = {"F32", "F64", "F16", "BF16", "I64", "I32", "U8", "I8"};
static const size_t moe__dtype_sizes[MOE_DTYPE_COUNT] = {4, 8, 2, 2, 8, 4, 1, 1};

typedef struct moe__meta { char *key, *value; } moe__meta;

struct moe_tensor_file {
    moe_ctx *ctx;
    const unsigned char *bytes;
    size_t size;
    void *owned;                /* the file's bytes when read from disk */
    moe_file_tensor *tensors;
    int count;
    moe__meta *meta;
    int n_meta;
    char *pool;                 /* decoded metadata strings */
};

static uint64_t moe__le64(const unsigned char *p) {
    uint64_t v = 0;
    int i;
    for (i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

MOEDEF void moe_tensor_file_close(moe_tensor_file *f) {
    moe_ctx *ctx;
    if (!f) return;
    ctx = f->ctx;
    moe__free(ctx, f->tensors);
    moe__free(ctx, f->meta);
    moe__free(ctx, f->pool);
    moe__free(ctx, f->owned);
    moe__free(ctx, f);
}

/* One tensor entry {"dtype":..,"shape":[..],"data_offsets":[b,e]}. */
static moe_result moe__st_entry(moe_ctx *ctx, const moe__json *j, int32_t v, size_t data_size, moe_file_tensor *t, size_t *begin_out) {
    int32_t k = v + 1, m;
    int have_dtype = 0, have_shape = 0, have_off = 0;
    int64_t begin = 0, end = 0;
    uint64_t elems = 1;
    if (j->tok[v].type != MOE__J_OBJECT) return moe__fail(ctx, MOE_ERR_FORMAT, "tensor \"%s\": entry is not an object", t->name);
    for (m = 0; m < j->tok[v].count; m++) {
        int32_t val = k + 1;
        if (moe__json_eq(j, k, "dtype")) {
            int q;
            char name[16];
            if (moe__json_str(j, val, name, sizeof name) < 0) return moe__fail(ctx, MOE_ERR_FORMAT, "tensor \"%s\": bad dtype", t->name);
            for (q = 0; q < MOE_DTYPE_COUNT; q++) if (strcmp(name, moe__dtype_names[q]) == 0) break;
            if (q == MOE_DTYPE_COUNT) return moe__fail(ctx, MOE_ERR_FORMAT, "tensor \"%s\": unsupported dtype %s", t->name, name);
            t->dtype = (moe_dtype)q;
            have_dtype = 1;
        } else if (moe__json_eq(j, k, "shape")) {
            int32_t e = val + 1, q;
            if (j->tok[val].type != MOE__J_ARRAY || j->tok[val].count > 8)
                return moe__fail(ctx, MOE_ERR_FORMAT, "tensor \"%s\": shape must be an array of at most 8 sizes", t->name);
            t->ndim = j->tok[val].count;
            for (q = 0; q < t->ndim; q++, e = j->tok[e].next) {
                int64_t s;
                if (!moe__json_int(j, e, &s) || s < 0 || s > ((int64_t)1 << 40))
                    return moe__fail(ctx, MOE_ERR_FORMAT, "tensor \"%s\": bad size in shape", t->name);
                t->shape[q] = s;
                if (s && elems > ((uint64_t)1 << 62) / (uint64_t)s) return moe__fail(ctx, MOE_ERR_FORMAT, "tensor \"%s\": shape too large", t->name);
                elems *= (uint64_t)s;
            }
            have_shape = 1;
        } else if (moe__json_eq(j, k, "data_offsets")) {
            int32_t e = val + 1;
            if (j->tok[val].type != MOE__J_ARRAY || j->tok[val].count != 2 || !moe__json_int(j, e, &begin) ||
                !moe__json_int(j, j->tok[e].next, &end))
                return moe__fail(ctx, MOE_ERR_FORMAT, "tensor \"%s\": data_offsets must be [begin, end]", t->name);
            have_off = 1;
        }
        k = j->tok[val].next;
    }
    if (!have_dtype || !have_shape || !have_off) return moe__fail(ctx, MOE_ERR_FORMAT, "tensor \"%s\": needs dtype, shape and data_offsets", t->name);
    if (begin < 0 || end < begin || (uint64_t)end > (uint64_t)data_size)
        return moe__fail(ctx, MOE_ERR_FORMAT, "tensor \"%s\": data_offsets [%lld, %lld] outside the %zu data bytes", t->name, (long long)begin, (long long)end, data_size);
    if (elems > ((uint64_t)1 << 62) / moe__dtype_sizes[t->dtype] || (uint64_t)(end - begin) != elems * moe__dtype_sizes[t->dtype])
        return moe__fail(ctx, MOE_ERR_FORMAT, "tensor \"%s\": %lld bytes do not match its shape and dtype", t->name, (long long)(end - begin));
    t->nbytes = (size_t)(end - begin);
    *begin_out = (size_t)begin;
    return MOE_OK;
}

MOEDEF moe_result moe_tensor_file_parse(moe_ctx *ctx, const void *data, size_t size, moe_tensor_file **out) {
    const unsigned char *b = (const unsigned char *)data;
    moe_tensor_file *f;
    moe__json j;
    uint64_t hlen;
    size_t data_size, pool_used = 0, begin = 0;
    int32_t k;
    int m, q;
    moe_result r;
    if (!ctx || !out) return MOE_ERR_INVALID_ARGUMENT;
    *out = NULL;
    if (!data && size) return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "data is NULL");
    if (size < 8) return moe__fail(ctx, MOE_ERR_FORMAT, "%zu bytes: a safetensors file has at least 8", size);
    hlen = moe__le64(b);
    if (hlen > size - 8) return moe__fail(ctx, MOE_ERR_FORMAT, "header length %llu exceeds the %zu bytes that follow", (unsigned long long)hlen, size - 8);
    if (hlen < 2 || hlen > 100000000u) return moe__fail(ctx, MOE_ERR_FORMAT, "header length %llu out of range", (unsigned long long)hlen);
    data_size = size - 8 - (size_t)hlen;
    MOE__TRY(moe__json_parse(ctx, (const char *)b + 8, (size_t)hlen, &j, "safetensors header"));
    if (j.tok[0].type != MOE__J_OBJECT) { moe__json_free(ctx, &j); return moe__fail(ctx, MOE_ERR_FORMAT, "safetensors header is not a JSON object"); }
    f = (moe_tensor_file *)moe__calloc(ctx, sizeof *f);
    if (!f) { moe__json_free(ctx, &j); return moe__fail(ctx, MOE_ERR_OUT_OF_MEMORY, "tensor file"); }
    f->ctx = ctx;
    f->bytes = b;
    f->size = size;
    f->tensors = (moe_file_tensor *)moe__calloc(ctx, sizeof(moe_file_tensor) * (size_t)(j.tok[0].count + 1));
    f->pool = (char *)moe__malloc(ctx, (size_t)hlen + 1);
    if (!f->tensors || !f->pool) { r = moe__fail(ctx, MOE_ERR_OUT_OF_MEMORY, "tensor table"); goto fail; }
    k = 1;
    for (m = 0; m < j.tok[0].count; m++) {
        int32_t val = k + 1;
        if (moe__json_eq(&j, k, "__metadata__")) {
            int32_t e = val + 1;
            int c;
            if (j.tok[val].type != MOE__J_OBJECT || f->meta) { r = moe__fail(ctx, MOE_ERR_FORMAT, "__metadata__ must be one object of strings"); goto fail; }
            f->meta = (moe__meta *)moe__calloc(ctx, sizeof(moe__meta) * (size_t)(j.tok[val].count + 1));
            if (!f->meta) { r = moe__fail(ctx, MOE_ERR_OUT_OF_MEMORY, "metadata"); goto fail; }
            for (c = 0; c < j.tok[val].count; c++) {
                int64_t n1, n2;
                if (j.tok[e + 1].type != MOE__J_STRING) { r = moe__fail(ctx, MOE_ERR_FORMAT, "__metadata__ values must be strings"); goto fail; }
                n1 = moe__json_str(&j, e, f->pool + pool_used, (size_t)hlen + 1 - pool_used);
                if (n1 < 0) { r = moe__fail(ctx, MOE_ERR_FORMAT, "bad metadata key"); goto fail; }
                f->meta[c].key = f->pool + pool_used;
                pool_used += (size_t)n1 + 1;
                n2 = moe__json_str(&j, e + 1, f->pool + pool_used, (size_t)hlen + 1 - pool_used);
                if (n2 < 0) { r = moe__fail(ctx, MOE_ERR_FORMAT, "bad metadata value"); goto fail; }
                f->meta[c].value = f->pool + pool_used;
                pool_used += (size_t)n2 + 1;
                e = j.tok[e + 1].next;
            }
            f->n_meta = j.tok[val].count;
        } else {
            moe_file_tensor *t = &f->tensors[f->count];
            if (moe__json_str(&j, k, t->name, sizeof t->name) <= 0) { r = moe__fail(ctx, MOE_ERR_FORMAT, "tensor name empty or longer than %d bytes", (int)sizeof t->name - 1); goto fail; }
            for (q = 0; q < f->count; q++)
                if (strcmp(f->tensors[q].name, t->name) == 0) { r = moe__fail(ctx, MOE_ERR_FORMAT, "tensor \"%s\" appears twice", t->name); goto fail; }
            r = moe__st_entry(ctx, &j, val, data_size, t, &begin);
            if (r != MOE_OK) goto fail;
            t->data = b + 8 + (size_t)hlen + begin;
            f->count++;
        }
        k = j.tok[val].next;
    }
    moe__json_free(ctx, &j);
    *out = f;
    return MOE_OK;
fail:
    moe__json_free(ctx, &j);
    moe_tensor_file_close(f);
    return r;
}

#ifndef MOE_NO_STDIO
/* Bytes in an open file, or -1. ftell's long has 32 bits on Windows: files over 2 GiB need _ftelli64. */
static int64_t moe__file_size(FILE *fp) {
    int64_t len;
#if defined(_WIN32)
    if (_fseeki64(fp, 0, SEEK_END) != 0) return -1;
    len = (int64_t)_ftelli64(fp);
    if (_fseeki64(fp, 0, SEEK_SET) != 0) return -1;
#else
    if (fseek(fp, 0, SEEK_END) != 0) return -1;
    len = (int64_t)ftell(fp);
    if (fseek(fp, 0, SEEK_SET) != 0) return -1;
#endif
    return len;
}

MOEDEF moe_result moe_tensor_file_read(moe_ctx *ctx, const char *path, moe_tensor_file **out) {
    FILE *fp;
    int64_t len;
    void *buf;
    moe_result r;
    if (!ctx || !out) return MOE_ERR_INVALID_ARGUMENT;
    *out = NULL;
    if (!path) return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "path is NULL");
    fp = fopen(path, "rb");
    if (!fp) return moe__fail(ctx, MOE_ERR_IO, "cannot open %s: %s", path, strerror(errno));
    /* a directory opens and "sizes" to LONG_MAX on some systems, but has no first byte */
    if ((len = moe__file_size(fp)) < 0 || (len > 0 && (fgetc(fp) == EOF || fseek(fp, 0, SEEK_SET) != 0))) {
        fclose(fp);
        return moe__fail(ctx, MOE_ERR_IO, "cannot size or read %s", path);
    }
    buf = (uint64_t)len < SIZE_MAX ? moe__malloc(ctx, (size_t)len + 1) : NULL;
    if (!buf) { fclose(fp); return moe__fail(ctx, MOE_ERR_OUT_OF_MEMORY, "%s: %lld bytes", path, (long long)len); }
    if (len > 0 && fread(buf, 1, (size_t)len, fp) != (size_t)len) {
        fclose(fp);
        moe__free(ctx, buf);
        return moe__fail(ctx, MOE_ERR_IO, "cannot read %s", path);
    }
    fclose(fp);
    r = moe_tensor_file_parse(ctx, buf, (size_t)len, out);
    if (r != MOE_OK) {
        moe__free(ctx, buf);
        return moe__fail_prefix(ctx, r, path);
    }
    (*out)->owned = buf;
    return MOE_OK;
}
#endif /* MOE_NO_STDIO */

MOEDEF int moe_tensor_file_count(const moe_tensor_file *f) { return f ? f->count : 0; }

MOEDEF const moe_file_tensor *moe_tensor_file_get(const moe_tensor_file *f, int index) {
    return f && index >= 0 && index < f->count ? &f->tensors[index] : NULL;
}

MOEDEF const moe_file_tensor *moe_tensor_file_find(const moe_tensor_file *f, const char *name) {
    int i;
    if (!f || !name) return NULL;
    for (i = 0; i < f->count; i++)
        if (strcmp(f->tensors[i].name, name) == 0) return &f->tensors[i];
    return NULL;
}

MOEDEF const char *moe_tensor_file_metadata(const moe_tensor_file *f, const char *key) {
    int i;
    if (!f || !key) return NULL;
    for (i = 0; i < f->n_meta; i++)
        if (strcmp(f->meta[i].key, key) == 0) return f->meta[i].value;
    return NULL;
}

static int64_t moe__tensor_elems(const moe_file_tensor *t) {
    int64_t n = 1;
    int i;
    for (i = 0; i < t->ndim; i++) n *= t->shape[i];
    return n;
}

static float moe__half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31, e = (h >> 10) & 0x1F, m = h & 0x3FF, bits;
    float f;
    if (e == 0) {
        f = ldexpf((float)m, -24);
        return sign ? -f : f;
    }
    if (e == 31) bits = sign | 0x7F800000u | (m << 13);
    else bits = sign | ((e + 112) << 23) | (m << 13);
    memcpy(&f, &bits, 4);
    return f;
}

/* Element i of a little-endian tensor of any dtype, as double. */
static double moe__file_elem(const moe_file_tensor *t, int64_t i) {
    const unsigned char *p = (const unsigned char *)t->data + (size_t)i * moe__dtype_sizes[t->dtype];
    uint64_t v = 0;
    size_t n = moe__dtype_sizes[t->dtype], q;
    for (q = n; q > 0; q--) v = (v << 8) | p[q - 1];
    switch (t->dtype) {
    case MOE_DTYPE_F32: { uint32_t u = (uint32_t)v; float f; memcpy(&f, &u, 4); return f; }
    case MOE_DTYPE_F64: { double d; memcpy(&d, &v, 8); return d; }
    case MOE_DTYPE_F16: return moe__half_to_float((uint16_t)v);
    case MOE_DTYPE_BF16: { uint32_t u = (uint32_t)v << 16; float f; memcpy(&f, &u, 4); return f; }
    case MOE_DTYPE_I64: return (double)(int64_t)v;
    case MOE_DTYPE_I32: return (double)(int32_t)(uint32_t)v;
    case MOE_DTYPE_U8: return (double)(uint8_t)v;
    case MOE_DTYPE_I8: return (double)(int8_t)(uint8_t)v;
    default: return 0.0;
    }
}

MOEDEF moe_result moe_file_tensor_to_f32(moe_ctx *ctx, const moe_file_tensor *t, float *out, int64_t count) {
    int64_t i;
    if (!ctx || !t || (!out && count)) return MOE_ERR_INVALID_ARGUMENT;
    if (moe__tensor_elems(t) != count)
        return moe__fail(ctx, MOE_ERR_SHAPE, "tensor \"%s\" has %lld elements, expected %lld", t->name, (long long)moe__tensor_elems(t), (long long)count);
    for (i = 0; i < count; i++) out[i] = (float)moe__file_elem(t, i);
    return MOE_OK;
}

MOEDEF moe_result moe_file_tensor_to_i32(moe_ctx *ctx, const moe_file_tensor *t, int32_t *out, int64_t count) {
    int64_t i;
    if (!ctx || !t || (!out && count)) return MOE_ERR_INVALID_ARGUMENT;
    if (t->dtype != MOE_DTYPE_I32 && t->dtype != MOE_DTYPE_I64 && t->dtype != MOE_DTYPE_U8 && t->dtype != MOE_DTYPE_I8)
        return moe__fail(ctx, MOE_ERR_FORMAT, "tensor \"%s\" is %s, not an integer type", t->name, moe__dtype_names[t->dtype]);
    if (moe__tensor_elems(t) != count)
        return moe__fail(ctx, MOE_ERR_SHAPE, "tensor \"%s\" has %lld elements, expected %lld", t->name, (long long)moe__tensor_elems(t), (long long)count);
    for (i = 0; i < count; i++) {
        double v = moe__file_elem(t, i);
        if (v < -2147483648.0 || v > 2147483647.0) return moe__fail(ctx, MOE_ERR_FORMAT, "tensor \"%s\": value out of int32 range", t->name);
        out[i] = (int32_t)v;
    }
    return MOE_OK;
}

/* ---- writer ---- */
typedef struct moe__wentry {
    char name[128];
    moe_dtype dtype;
    int ndim;
    int64_t shape[8];
    const void *data;
    size_t nbytes;
} moe__wentry;

struct moe_tensor_writer {
    moe_ctx *ctx;
    moe__wentry *entries;
    int count, cap;
    moe__sb meta;               /* the members of "__metadata__", already JSON */
};

MOEDEF moe_result moe_tensor_writer_create(moe_ctx *ctx, moe_tensor_writer **out) {
    moe_tensor_writer *w;
    if (!ctx || !out) return MOE_ERR_INVALID_ARGUMENT;
    *out = NULL;
    w = (moe_tensor_writer *)moe__calloc(ctx, sizeof *w);
    if (!w) return moe__fail(ctx, MOE_ERR_OUT_OF_MEMORY, "tensor writer");
    w->ctx = ctx;
    w->meta.ctx = ctx;
    *out = w;
    return MOE_OK;
}

MOEDEF void moe_tensor_writer_destroy(moe_tensor_writer *w) {
    if (!w) return;
    moe__free(w->ctx, w->entries);
    moe__free(w->ctx, w->meta.buf);
    moe__free(w->ctx, w);
}

MOEDEF moe_result moe_tensor_writer_add(moe_tensor_writer *w, const char *name, moe_dtype dtype, int ndim, const int64_t *shape, const void *data) {
    moe__wentry *e;
    uint64_t n = 1;
    int i;
    if (!w) return MOE_ERR_INVALID_ARGUMENT;
    if (!name || !name[0] || strlen(name) >= sizeof e->name || strcmp(name, "__metadata__") == 0)
        return moe__fail(w->ctx, MOE_ERR_INVALID_ARGUMENT, "tensor name must have 1..127 bytes and not be __metadata__");
    if ((int)dtype < 0 || dtype >= MOE_DTYPE_COUNT || ndim < 0 || ndim > 8 || (ndim && !shape))
        return moe__fail(w->ctx, MOE_ERR_INVALID_ARGUMENT, "tensor \"%s\": bad dtype or shape", name);
    for (i = 0; i < ndim; i++) {
        if (shape[i] < 0 || (shape[i] && n > ((uint64_t)1 << 50) / (uint64_t)shape[i]))
            return moe__fail(w->ctx, MOE_ERR_INVALID_ARGUMENT, "tensor \"%s\": bad shape", name);
        n *= (uint64_t)shape[i];
    }
    if (n && !data) return moe__fail(w->ctx, MOE_ERR_INVALID_ARGUMENT, "tensor \"%s\": data is NULL", name);
    for (i = 0; i < w->count; i++)
        if (strcmp(w->entries[i].name, name) == 0) return moe__fail(w->ctx, MOE_ERR_INVALID_ARGUMENT, "tensor \"%s\" added twice", name);
    if (w->count == w->cap) {
        int cap = w->cap ? w->cap * 2 : 16;
        moe__wentry *ne = (moe__wentry *)moe__malloc(w->ctx, sizeof(moe__wentry) * (size_t)cap);
        if (!ne) return moe__fail(w->ctx, MOE_ERR_OUT_OF_MEMORY, "tensor writer entries");
        if (w->entries) { memcpy(ne, w->entries, sizeof(moe__wentry) * (size_t)w->count); moe__free(w->ctx, w->entries); }
        w->entries = ne;
        w->cap = cap;
    }
    e = &w->entries[w->count++];
    memset(e, 0, sizeof *e);
    moe__strlcpy(e->name, name, sizeof e->name);
    e->dtype = dtype;
    e->ndim = ndim;
    for (i = 0; i < ndim; i++) e->shape[i] = shape[i];
    e->data = data;
    e->nbytes = (size_t)n * moe__dtype_sizes[dtype];
    return MOE_OK;
}

MOEDEF moe_result moe_tensor_writer_metadata(moe_tensor_writer *w, const char *key, const char *value) {
    if (!w) return MOE_ERR_INVALID_ARGUMENT;
    if (!key || !value) return moe__fail(w->ctx, MOE_ERR_INVALID_ARGUMENT, "metadata key and value must not be NULL");
    if (w->meta.len) moe__sb_str(&w->meta, ",");
    moe__sb_json_string(&w->meta, key);
    moe__sb_str(&w->meta, ":");
    moe__sb_json_string(&w->meta, value);
    if (w->meta.oom) return moe__fail(w->ctx, MOE_ERR_OUT_OF_MEMORY, "metadata");
    return MOE_OK;
}

/* The bytes of a file go to a sink: an open file or a caller's buffer. */
typedef struct moe__sink {
    int (*put)(void *to, const void *data, size_t n);   /* 1: written */
    void *to;
} moe__sink;

/* Write a little-endian copy of n elements of size sz. */
static int moe__write_le(const moe__sink *sink, const void *data, size_t nbytes, size_t sz) {
    const uint16_t one = 1;
    unsigned char little;
    memcpy(&little, &one, 1);
    if (little || sz == 1) return sink->put(sink->to, data, nbytes);
    {
        unsigned char buf[4096];
        const unsigned char *p = (const unsigned char *)data;
        size_t done = 0;
        while (done < nbytes) {
            size_t n = nbytes - done < sizeof buf ? nbytes - done : sizeof buf, i, q;
            for (i = 0; i < n; i += sz)
                for (q = 0; q < sz; q++) buf[i + q] = p[done + i + sz - 1 - q];
            if (!sink->put(sink->to, buf, n)) return 0;
            done += n;
        }
        return 1;
    }
}

/* The JSON header (padded to 8 bytes) into h, and the file's size in bytes. */
static moe_result moe__writer_header(moe_tensor_writer *w, moe__sb *h, size_t *total) {
    size_t off = 0, pad;
    int i;
    memset(h, 0, sizeof *h);
    h->ctx = w->ctx;
    moe__sb_str(h, "{");
    if (w->meta.len) {
        moe__sb_str(h, "\"__metadata__\":{");
        moe__sb_put(h, w->meta.buf, w->meta.len);
        moe__sb_str(h, "}");
    }
    for (i = 0; i < w->count; i++) {
        const moe__wentry *e = &w->entries[i];
        int q;
        if (i || w->meta.len) moe__sb_str(h, ",");
        moe__sb_json_string(h, e->name);
        moe__sb_printf(h, ":{\"dtype\":\"%s\",\"shape\":[", moe__dtype_names[e->dtype]);
        for (q = 0; q < e->ndim; q++) moe__sb_printf(h, "%s%lld", q ? "," : "", (long long)e->shape[q]);
        moe__sb_printf(h, "],\"data_offsets\":[%llu,%llu]}", (unsigned long long)off, (unsigned long long)(off + e->nbytes));
        off += e->nbytes;
    }
    moe__sb_str(h, "}");
    pad = (8 - h->len % 8) % 8;
    while (pad--) moe__sb_str(h, " ");
    if (h->oom) { moe__free(w->ctx, h->buf); h->buf = NULL; return moe__fail(w->ctx, MOE_ERR_OUT_OF_MEMORY, "safetensors header"); }
    *total = 8 + h->len + off;
    return MOE_OK;
}

/* length, header, tensors */
static int moe__writer_emit(const moe_tensor_writer *w, const moe__sb *h, const moe__sink *sink) {
    unsigned char len8[8];
    uint64_t hl = h->len;
    int i, ok;
    for (i = 0; i < 8; i++) len8[i] = (unsigned char)(hl >> (8 * i));
    ok = sink->put(sink->to, len8, 8) && sink->put(sink->to, h->buf, h->len);
    for (i = 0; ok && i < w->count; i++)
        ok = moe__write_le(sink, w->entries[i].data, w->entries[i].nbytes, moe__dtype_sizes[w->entries[i].dtype]);
    return ok;
}

static int moe__put_memory(void *to, const void *data, size_t n) {
    unsigned char **at = (unsigned char **)to;
    if (n) memcpy(*at, data, n);
    *at += n;
    return 1;
}

MOEDEF moe_result moe_tensor_writer_save_memory(moe_tensor_writer *w, void *buf, size_t cap, size_t *size) {
    moe__sb h;
    moe__sink sink;
    unsigned char *at = (unsigned char *)buf;
    size_t total = 0;
    if (!w) return MOE_ERR_INVALID_ARGUMENT;
    if (!size) return moe__fail(w->ctx, MOE_ERR_INVALID_ARGUMENT, "size is NULL");
    MOE__TRY(moe__writer_header(w, &h, &total));
    *size = total;
    if (buf && cap >= total) {
        sink.put = moe__put_memory;
        sink.to = &at;
        moe__writer_emit(w, &h, &sink);
    }
    moe__free(w->ctx, h.buf);
    if (buf && cap < total)
        return moe__fail(w->ctx, MOE_ERR_OUT_OF_MEMORY, "the file needs %zu bytes, the buffer holds %zu", total, cap);
    return MOE_OK;
}

#ifndef MOE_NO_STDIO
#if defined(_WIN32)
#ifndef WIN32_LEAN_AND_MEAN
#define WIN32_LEAN_AND_MEAN
#endif
#include <windows.h>
static int moe__replace_file(const char *from, const char *to) { return MoveFileExA(from, to, MOVEFILE_REPLACE_EXISTING | MOVEFILE_WRITE_THROUGH) ? 0 : -1; }
static int moe__sync_file(FILE *fp) { (void)fp; return 0; }
#else
static int moe__replace_file(const char *from, const char *to) { return rename(from, to); }
#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif
#if defined(__APPLE__) || (defined(_POSIX_C_SOURCE) && _POSIX_C_SOURCE >= 200112L) || defined(_DEFAULT_SOURCE) || defined(_GNU_SOURCE) || defined(_BSD_SOURCE)
/* flush the data to the device before the rename makes it the file */
static int moe__sync_file(FILE *fp) { return fsync(fileno(fp)); }
#else
static int moe__sync_file(FILE *fp) { (void)fp; return 0; }
#endif
#endif

static int moe__put_file(void *to, const void *data, size_t n) { return fwrite(data, 1, n, (FILE *)to) == n; }

MOEDEF moe_result moe_tensor_writer_save(moe_tensor_writer *w, const char *path) {
    moe__sb h;
    moe__sink sink;
    char tmp[4096];
    size_t total;
    FILE *fp;
    int ok;
    if (!w) return MOE_ERR_INVALID_ARGUMENT;
    if (!path || strlen(path) + 5 > sizeof tmp) return moe__fail(w->ctx, MOE_ERR_INVALID_ARGUMENT, "path is NULL or too long");
    MOE__TRY(moe__writer_header(w, &h, &total));
    moe__format(tmp, sizeof tmp, "%s.tmp", path);
    fp = fopen(tmp, "wb");
    if (!fp) { moe__free(w->ctx, h.buf); return moe__fail(w->ctx, MOE_ERR_IO, "cannot create %s; %s is unchanged", tmp, path); }
    sink.put = moe__put_file;
    sink.to = fp;
    ok = moe__writer_emit(w, &h, &sink);
    ok = ok && fflush(fp) == 0 && moe__sync_file(fp) == 0;
    ok = (fclose(fp) == 0) && ok;
    moe__free(w->ctx, h.buf);
    if (!ok) {
        remove(tmp);
        return moe__fail(w->ctx, MOE_ERR_IO, "writing %s failed; %s is unchanged", tmp, path);
    }
    if (moe__replace_file(tmp, path) != 0) {
        remove(tmp);
        return moe__fail(w->ctx, MOE_ERR_IO, "cannot rename %s to %s; %s is unchanged", tmp, path, path);
    }
    return MOE_OK;
}
#endif /* MOE_NO_STDIO */

// >>model_config ------------------------------------------------------------
static const char *const moe__kind_names[] = {"", "dense", "moe", "rmsnorm", "layernorm", "multigate", "task_towers", "embedding"};
static const char *const moe__task_input_names[] = {"", "single", "tasks", "tasks_shared"};
static const char *const moe__act_names[] = {"", "identity", "relu", "gelu", "silu", "tanh", "sigmoid"};
static const char *const moe__router_names[] = {"", "topk", "noisy_topk", "switch", "sigmoid", "expert_choice", "hash", "soft", "hierarchical"};
static const char *const moe__expert_names[] = {"", "linear", "mlp", "swiglu", "gaussian", "geglu"};
static const char *const moe__loss_names[] = {"", "cross_entropy", "mse", "bce", "mixture_nll"};
static const char *const moe__combine_names[] = {"", "sum", "stack", "vote", "vote_majority"};
static const char *const moe__opt_names[] = {"", "sgd", "adam", "adamw"};

static void moe__config_write(const moe_model *m, moe__sb *b) {
    const moe_model_desc *d = &m->desc;
    const moe_optimizer_desc *o = &d->optimizer;
    int i;
    moe__sb_printf(b, "{\"format\":\"moe.h\",\"version\":%d,\"d_in\":%lld,\"loss\":\"%s\",\"max_tokens\":%lld,\"layers\":[",
                   MOE_FORMAT_VERSION, (long long)d->d_in, moe__loss_names[d->loss], (long long)d->max_tokens);
    for (i = 0; i < d->n_layers; i++) {
        const moe_layer_desc *l = &d->layers[i];
        moe__sb_printf(b, "%s{\"kind\":\"%s\",\"d_in\":%lld,\"d_out\":%lld,\"residual\":%s", i ? "," : "", moe__kind_names[l->kind],
                       (long long)l->d_in, (long long)l->d_out, l->residual ? "true" : "false");
        if (l->kind == MOE_LAYER_DENSE)
            moe__sb_printf(b, ",\"activation\":\"%s\",\"bias\":%s", moe__act_names[l->activation], l->bias == MOE_FLAG_ON ? "true" : "false");
        if (l->kind == MOE_LAYER_RMSNORM || l->kind == MOE_LAYER_LAYERNORM) {
            moe__sb_str(b, ",\"eps\":");
            moe__sb_float(b, l->eps);
        }
        if (l->kind == MOE_LAYER_EMBEDDING)
            moe__sb_printf(b, ",\"vocab_size\":%lld,\"d_embedding\":%lld", (long long)l->vocab_size, (long long)l->d_embedding);
        if (l->kind == MOE_LAYER_MOE) {
            moe__sb_printf(b, ",\"router\":\"%s\",\"experts\":%d,\"top_k\":%d,\"renormalize\":%s,\"router_bias\":%s",
                           moe__router_names[l->router], l->n_experts, l->top_k, l->renormalize == MOE_FLAG_ON ? "true" : "false",
                           l->router_bias == MOE_FLAG_ON ? "true" : "false");
            moe__sb_printf(b, ",\"expert\":\"%s\",\"d_hidden\":%lld,\"hidden_layers\":%d,\"activation\":\"%s\",\"bias\":%s",
                           moe__expert_names[l->expert], (long long)l->d_hidden, l->n_hidden_layers, moe__act_names[l->activation],
                           l->bias == MOE_FLAG_ON ? "true" : "false");
            moe__sb_printf(b, ",\"shared_experts\":%d,\"d_shared_hidden\":%lld", l->n_shared_experts, (long long)l->d_shared_hidden);
            moe__sb_str(b, ",\"capacity_factor\":"); moe__sb_float(b, l->capacity_factor);
            moe__sb_str(b, ",\"jitter\":"); moe__sb_float(b, l->jitter);
            moe__sb_str(b, ",\"balance_loss\":"); moe__sb_float(b, l->balance_loss);
            moe__sb_str(b, ",\"z_loss\":"); moe__sb_float(b, l->z_loss);
            moe__sb_str(b, ",\"importance_loss\":"); moe__sb_float(b, l->importance_loss);
            moe__sb_str(b, ",\"load_loss\":"); moe__sb_float(b, l->load_loss);
            /* fields of newer routers are written where they apply, so older files read the same */
            if (l->max_top_k != l->top_k) moe__sb_printf(b, ",\"max_top_k\":%d", l->max_top_k);
            if (l->router == MOE_ROUTER_SIGMOID) {
                moe__sb_str(b, ",\"routed_scaling_factor\":"); moe__sb_float(b, l->routed_scaling_factor);
                moe__sb_printf(b, ",\"groups\":%d,\"top_k_groups\":%d,\"bias_update_rate\":", l->n_groups, l->top_k_groups);
                moe__sb_float(b, l->bias_update_rate);
            }
            if (l->router == MOE_ROUTER_HASH) moe__sb_printf(b, ",\"hash_seed\":%lu", (unsigned long)l->hash_seed);
            if (l->shared_gate == MOE_FLAG_ON) moe__sb_str(b, ",\"shared_gate\":true");
            if (l->combine != MOE_COMBINE_SUM) moe__sb_printf(b, ",\"combine\":\"%s\"", moe__combine_names[l->combine]);
            if (l->combine == MOE_COMBINE_STACK) moe__sb_printf(b, ",\"d_expert_out\":%lld", (long long)l->d_expert_out);
            if (l->router == MOE_ROUTER_SOFT)
                moe__sb_printf(b, ",\"slots_per_expert\":%d,\"soft_group_tokens\":%lld", l->slots_per_expert, (long long)l->soft_group_tokens);
            if (l->router == MOE_ROUTER_HIERARCHICAL)
                moe__sb_printf(b, ",\"groups\":%d,\"top_k_groups\":%d,\"group_router\":\"%s\",\"expert_router\":\"%s\"", l->n_groups, l->top_k_groups,
                               moe__router_names[l->group_router], moe__router_names[l->expert_router]);
        }
        if (moe__is_multitask(l->kind)) {
            moe__sb_printf(b, ",\"tasks\":%d,\"task_input\":\"%s\"", l->n_tasks, moe__task_input_names[l->task_input]);
            if (l->kind == MOE_LAYER_MULTIGATE)
                moe__sb_printf(b, ",\"experts\":%d,\"task_experts\":%d,\"shared_output\":%s,\"top_k\":%d", l->n_experts, l->n_task_experts,
                               l->shared_output ? "true" : "false", l->top_k);
            moe__sb_printf(b, ",\"expert\":\"%s\",\"d_hidden\":%lld,\"hidden_layers\":%d,\"activation\":\"%s\",\"bias\":%s",
                           moe__expert_names[l->expert], (long long)l->d_hidden, l->n_hidden_layers, moe__act_names[l->activation],
                           l->bias == MOE_FLAG_ON ? "true" : "false");
        }
        moe__sb_str(b, "}");
    }
    if (d->n_tasks > 0) {
        moe__sb_str(b, "],\"tasks\":[");
        for (i = 0; i < d->n_tasks; i++) {
            moe__sb_printf(b, "%s{\"loss\":\"%s\",\"weight\":", i ? "," : "", moe__loss_names[d->task_loss[i]]);
            moe__sb_float(b, d->task_weight[i]);
            moe__sb_printf(b, ",\"d_out\":%lld}", (long long)d->task_d_out[i]);
        }
    }
    moe__sb_printf(b, "],\"optimizer\":{\"kind\":\"%s\",\"lr\":", moe__opt_names[o->kind]);
    moe__sb_float(b, o->lr);
    moe__sb_str(b, ",\"beta1\":"); moe__sb_float(b, o->beta1);
    moe__sb_str(b, ",\"beta2\":"); moe__sb_float(b, o->beta2);
    moe__sb_str(b, ",\"eps\":"); moe__sb_float(b, o->eps);
    moe__sb_str(b, ",\"weight_decay\":"); moe__sb_float(b, o->weight_decay);
    moe__sb_str(b, ",\"momentum\":"); moe__sb_float(b, o->momentum);
    moe__sb_str(b, ",\"clip_norm\":"); moe__sb_float(b, o->clip_norm);
    moe__sb_printf(b, ",\"warmup_steps\":%lld,\"total_steps\":%lld,\"min_lr\":", (long long)o->warmup_steps, (long long)o->total_steps);
    moe__sb_float(b, o->min_lr);
    moe__sb_str(b, "}}");
}

/* Reading the configuration: each field names its slot in the desc. */
enum { MOE__F_INT, MOE__F_I64, MOE__F_FLOAT, MOE__F_BOOL, MOE__F_FLAG, MOE__F_ENUM, MOE__F_U32 };

typedef struct moe__field {
    const char *name;
    int type;
    size_t offset;
    const char *const *names;   /* MOE__F_ENUM */
    int n_names;
    unsigned kinds;             /* layer kinds it belongs to: bit (1 << kind) */
} moe__field;

#define MOE__K_ALL (((1u << MOE_LAYER_COUNT) - 1u) & ~1u)  /* every kind but the default */
#define MOE__K_DENSE (1u << MOE_LAYER_DENSE)
#define MOE__K_MOE (1u << MOE_LAYER_MOE)
#define MOE__K_NORM ((1u << MOE_LAYER_RMSNORM) | (1u << MOE_LAYER_LAYERNORM))
#define MOE__K_EMBEDDING (1u << MOE_LAYER_EMBEDDING)
#define MOE__K_MG (1u << MOE_LAYER_MULTIGATE)
#define MOE__K_MT (MOE__K_MG | (1u << MOE_LAYER_TASK_TOWERS))
#define MOE__LF(name, type, field, names, n, kinds) {name, type, offsetof(moe_layer_desc, field), names, n, kinds}

static const moe__field moe__layer_fields[] = {
    MOE__LF("d_in", MOE__F_I64, d_in, NULL, 0, MOE__K_ALL),
    MOE__LF("d_out", MOE__F_I64, d_out, NULL, 0, MOE__K_ALL),
    MOE__LF("residual", MOE__F_BOOL, residual, NULL, 0, MOE__K_ALL),
    MOE__LF("activation", MOE__F_ENUM, activation, moe__act_names, MOE_ACT_COUNT, MOE__K_DENSE | MOE__K_MOE | MOE__K_MT),
    MOE__LF("bias", MOE__F_FLAG, bias, NULL, 0, MOE__K_DENSE | MOE__K_MOE | MOE__K_MT),
    MOE__LF("eps", MOE__F_FLOAT, eps, NULL, 0, MOE__K_NORM),
    MOE__LF("router", MOE__F_ENUM, router, moe__router_names, MOE_ROUTER_COUNT, MOE__K_MOE),
    MOE__LF("experts", MOE__F_INT, n_experts, NULL, 0, MOE__K_MOE | MOE__K_MG),
    MOE__LF("top_k", MOE__F_INT, top_k, NULL, 0, MOE__K_MOE | MOE__K_MG),
    MOE__LF("renormalize", MOE__F_FLAG, renormalize, NULL, 0, MOE__K_MOE),
    MOE__LF("router_bias", MOE__F_FLAG, router_bias, NULL, 0, MOE__K_MOE),
    MOE__LF("expert", MOE__F_ENUM, expert, moe__expert_names, MOE_EXPERT_COUNT, MOE__K_MOE | MOE__K_MT),
    MOE__LF("d_hidden", MOE__F_I64, d_hidden, NULL, 0, MOE__K_MOE | MOE__K_MT),
    MOE__LF("hidden_layers", MOE__F_INT, n_hidden_layers, NULL, 0, MOE__K_MOE | MOE__K_MT),
    MOE__LF("shared_experts", MOE__F_INT, n_shared_experts, NULL, 0, MOE__K_MOE),
    MOE__LF("d_shared_hidden", MOE__F_I64, d_shared_hidden, NULL, 0, MOE__K_MOE),
    MOE__LF("capacity_factor", MOE__F_FLOAT, capacity_factor, NULL, 0, MOE__K_MOE),
    MOE__LF("jitter", MOE__F_FLOAT, jitter, NULL, 0, MOE__K_MOE),
    MOE__LF("balance_loss", MOE__F_FLOAT, balance_loss, NULL, 0, MOE__K_MOE),
    MOE__LF("z_loss", MOE__F_FLOAT, z_loss, NULL, 0, MOE__K_MOE),
    MOE__LF("importance_loss", MOE__F_FLOAT, importance_loss, NULL, 0, MOE__K_MOE),
    MOE__LF("load_loss", MOE__F_FLOAT, load_loss, NULL, 0, MOE__K_MOE),
    MOE__LF("max_top_k", MOE__F_INT, max_top_k, NULL, 0, MOE__K_MOE),
    MOE__LF("routed_scaling_factor", MOE__F_FLOAT, routed_scaling_factor, NULL, 0, MOE__K_MOE),
    MOE__LF("groups", MOE__F_INT, n_groups, NULL, 0, MOE__K_MOE),
    MOE__LF("top_k_groups", MOE__F_INT, top_k_groups, NULL, 0, MOE__K_MOE),
    MOE__LF("bias_update_rate", MOE__F_FLOAT, bias_update_rate, NULL, 0, MOE__K_MOE),
    MOE__LF("hash_seed", MOE__F_U32, hash_seed, NULL, 0, MOE__K_MOE),
    MOE__LF("shared_gate", MOE__F_FLAG, shared_gate, NULL, 0, MOE__K_MOE),
    MOE__LF("combine", MOE__F_ENUM, combine, moe__combine_names, MOE_COMBINE_COUNT, MOE__K_MOE),
    MOE__LF("d_expert_out", MOE__F_I64, d_expert_out, NULL, 0, MOE__K_MOE),
    MOE__LF("slots_per_expert", MOE__F_INT, slots_per_expert, NULL, 0, MOE__K_MOE),
    MOE__LF("soft_group_tokens", MOE__F_I64, soft_group_tokens, NULL, 0, MOE__K_MOE),
    MOE__LF("group_router", MOE__F_ENUM, group_router, moe__router_names, MOE_ROUTER_COUNT, MOE__K_MOE),
    MOE__LF("expert_router", MOE__F_ENUM, expert_router, moe__router_names, MOE_ROUTER_COUNT, MOE__K_MOE),
    MOE__LF("tasks", MOE__F_INT, n_tasks, NULL, 0, MOE__K_MT),
    MOE__LF("task_input", MOE__F_ENUM, task_input, moe__task_input_names, MOE_TASK_INPUT_COUNT, MOE__K_MT),
    MOE__LF("task_experts", MOE__F_INT, n_task_experts, NULL, 0, MOE__K_MG),
    MOE__LF("shared_output", MOE__F_BOOL, shared_output, NULL, 0, MOE__K_MG),
    MOE__LF("vocab_size", MOE__F_I64, vocab_size, NULL, 0, MOE__K_EMBEDDING),
    MOE__LF("d_embedding", MOE__F_I64, d_embedding, NULL, 0, MOE__K_EMBEDDING),
};

/* One entry of the model's "tasks" array. */
typedef struct moe__task_config {
    moe_loss loss;
    float weight;
    int64_t d_out;
} moe__task_config;

#define MOE__TF(name, type, field, names, n) {name, type, offsetof(moe__task_config, field), names, n, 0}
static const moe__field moe__task_fields[] = {
    MOE__TF("loss", MOE__F_ENUM, loss, moe__loss_names, MOE_LOSS_COUNT),
    MOE__TF("weight", MOE__F_FLOAT, weight, NULL, 0),
    MOE__TF("d_out", MOE__F_I64, d_out, NULL, 0),
};

#define MOE__OF(name, type, field, names, n) {name, type, offsetof(moe_optimizer_desc, field), names, n, 0}
static const moe__field moe__opt_fields[] = {
    MOE__OF("kind", MOE__F_ENUM, kind, moe__opt_names, MOE_OPTIMIZER_COUNT),
    MOE__OF("lr", MOE__F_FLOAT, lr, NULL, 0),
    MOE__OF("beta1", MOE__F_FLOAT, beta1, NULL, 0),
    MOE__OF("beta2", MOE__F_FLOAT, beta2, NULL, 0),
    MOE__OF("eps", MOE__F_FLOAT, eps, NULL, 0),
    MOE__OF("weight_decay", MOE__F_FLOAT, weight_decay, NULL, 0),
    MOE__OF("momentum", MOE__F_FLOAT, momentum, NULL, 0),
    MOE__OF("clip_norm", MOE__F_FLOAT, clip_norm, NULL, 0),
    MOE__OF("warmup_steps", MOE__F_I64, warmup_steps, NULL, 0),
    MOE__OF("total_steps", MOE__F_I64, total_steps, NULL, 0),
    MOE__OF("min_lr", MOE__F_FLOAT, min_lr, NULL, 0),
};

/* Store the value token v into the field f of the struct at base. */
static moe_result moe__field_set(moe_ctx *ctx, const moe__json *j, int32_t v, const moe__field *f, void *base, const char *where) {
    char *p = (char *)base + f->offset;
    int64_t iv;
    double dv;
    switch (f->type) {
    case MOE__F_INT:
        if (!moe__json_int(j, v, &iv) || iv < INT_MIN || iv > INT_MAX) break;
        *(int *)(void *)p = (int)iv;
        return MOE_OK;
    case MOE__F_I64:
        if (!moe__json_int(j, v, &iv)) break;
        *(int64_t *)(void *)p = iv;
        return MOE_OK;
    case MOE__F_U32:
        if (!moe__json_int(j, v, &iv) || iv < 0 || iv > (int64_t)UINT32_MAX) break;
        *(uint32_t *)(void *)p = (uint32_t)iv;
        return MOE_OK;
    case MOE__F_FLOAT:
        if (!moe__json_double(j, v, &dv) || !(dv >= -FLT_MAX && dv <= FLT_MAX)) break;
        *(float *)(void *)p = (float)dv;
        return MOE_OK;
    case MOE__F_BOOL:
    case MOE__F_FLAG:
        if (j->tok[v].type != MOE__J_TRUE && j->tok[v].type != MOE__J_FALSE) break;
        if (f->type == MOE__F_BOOL) *(int *)(void *)p = j->tok[v].type == MOE__J_TRUE;
        else *(moe_flag *)(void *)p = j->tok[v].type == MOE__J_TRUE ? MOE_FLAG_ON : MOE_FLAG_OFF;
        return MOE_OK;
    case MOE__F_ENUM: {
        int q;
        for (q = 1; q < f->n_names; q++)
            if (moe__json_eq(j, v, f->names[q])) { *(int *)(void *)p = q; return MOE_OK; }
        break;
    }
    default: break;
    }
    return moe__fail(ctx, MOE_ERR_FORMAT, "moe.config: %s: bad value for \"%s\"", where, f->name);
}

static moe_result moe__fields_read(moe_ctx *ctx, const moe__json *j, int32_t obj, const moe__field *fields, int n_fields,
                                   unsigned kind_bit, void *base, const char *where, int skip_kind) {
    int32_t k = obj + 1;
    int m, q;
    char key[64];
    for (m = 0; m < j->tok[obj].count; m++) {
        int32_t v = k + 1;
        if (moe__json_str(j, k, key, sizeof key) < 0) return moe__fail(ctx, MOE_ERR_FORMAT, "moe.config: %s: bad key", where);
        if (!(skip_kind && strcmp(key, "kind") == 0)) {
            for (q = 0; q < n_fields; q++)
                if (strcmp(key, fields[q].name) == 0 && (!kind_bit || (fields[q].kinds & kind_bit))) break;
            if (q == n_fields) return moe__fail(ctx, MOE_ERR_FORMAT, "moe.config: %s: unknown field \"%s\"", where, key);
            MOE__TRY(moe__field_set(ctx, j, v, &fields[q], base, where));
        }
        k = j->tok[v].next;
    }
    return MOE_OK;
}

static int32_t moe__json_member(const moe__json *j, int32_t obj, const char *key) {
    int32_t k = obj + 1;
    int m;
    if (j->tok[obj].type != MOE__J_OBJECT) return -1;
    for (m = 0; m < j->tok[obj].count; m++) {
        if (moe__json_eq(j, k, key)) return k + 1;
        k = j->tok[k + 1].next;
    }
    return -1;
}

/* Parse moe.config into desc; layers are allocated and returned in *layers_out. */
static moe_result moe__config_read(moe_ctx *ctx, const char *text, moe_model_desc *desc, moe_layer_desc **layers_out) {
    moe__json j;
    int32_t v, arr, e;
    int64_t iv;
    int i;
    moe_layer_desc *layers = NULL;
    moe_result r;
    char where[32];
    *layers_out = NULL;
    memset(desc, 0, sizeof *desc);
    MOE__TRY(moe__json_parse(ctx, text, strlen(text), &j, "moe.config"));
    r = MOE_ERR_FORMAT;
    if (j.tok[0].type != MOE__J_OBJECT) { moe__fail(ctx, r, "moe.config is not a JSON object"); goto done; }
    v = moe__json_member(&j, 0, "format");
    if (v < 0 || !moe__json_eq(&j, v, "moe.h")) { moe__fail(ctx, r, "moe.config: \"format\" must be \"moe.h\""); goto done; }
    v = moe__json_member(&j, 0, "version");
    if (v < 0 || !moe__json_int(&j, v, &iv) || iv < 1) { moe__fail(ctx, r, "moe.config: missing or bad \"version\""); goto done; }
    if (iv > MOE_FORMAT_VERSION) {
        r = moe__fail(ctx, MOE_ERR_UNSUPPORTED, "moe.config version %lld is newer than this moe.h reads (%d)", (long long)iv, MOE_FORMAT_VERSION);
        goto done;
    }
    v = moe__json_member(&j, 0, "d_in");
    if (v < 0 || !moe__json_int(&j, v, &desc->d_in)) { moe__fail(ctx, r, "moe.config: missing or bad \"d_in\""); goto done; }
    arr = moe__json_member(&j, 0, "layers");
    if (arr < 0 || j.tok[arr].type != MOE__J_ARRAY || j.tok[arr].count < 1 || j.tok[arr].count > 4096) {
        moe__fail(ctx, r, "moe.config: \"layers\" must be an array of 1..4096 layers"); goto done;
    }
    layers = (moe_layer_desc *)moe__calloc(ctx, sizeof(moe_layer_desc) * (size_t)j.tok[arr].count);
    if (!layers) { r = moe__fail(ctx, MOE_ERR_OUT_OF_MEMORY, "moe.config layers"); goto done; }
    e = arr + 1;
    for (i = 0; i < j.tok[arr].count; i++, e = j.tok[e].next) {
        int32_t kv = moe__json_member(&j, e, "kind");
        int q;
        moe__format(where, sizeof where, "layer %d", i);
        if (kv < 0) { moe__fail(ctx, r, "moe.config: %s: needs a \"kind\"", where); goto done; }
        for (q = 1; q < MOE_LAYER_COUNT; q++) if (moe__json_eq(&j, kv, moe__kind_names[q])) break;
        if (q == MOE_LAYER_COUNT) { moe__fail(ctx, r, "moe.config: %s: unknown kind", where); goto done; }
        layers[i].kind = (moe_layer_kind)q;
        if (moe__fields_read(ctx, &j, e, moe__layer_fields, (int)(sizeof moe__layer_fields / sizeof moe__layer_fields[0]), 1u << q,
                             &layers[i], where, 1) != MOE_OK) goto done;
    }
    {
        int32_t k = 1;
        int m;
        char key[32];
        for (m = 0; m < j.tok[0].count; m++) {
            int32_t val = k + 1;
            if (moe__json_str(&j, k, key, sizeof key) < 0) { moe__fail(ctx, r, "moe.config: bad key"); goto done; }
            if (strcmp(key, "loss") == 0) {
                for (i = 1; i < MOE_LOSS_COUNT; i++) if (moe__json_eq(&j, val, moe__loss_names[i])) break;
                if (i == MOE_LOSS_COUNT) { moe__fail(ctx, r, "moe.config: unknown loss"); goto done; }
                desc->loss = (moe_loss)i;
            } else if (strcmp(key, "tasks") == 0) {
                int32_t te = val + 1;
                if (j.tok[val].type != MOE__J_ARRAY || j.tok[val].count < 1 || j.tok[val].count > MOE_MAX_TASKS) {
                    moe__fail(ctx, r, "moe.config: \"tasks\" must be an array of 1..%d tasks", MOE_MAX_TASKS); goto done;
                }
                desc->n_tasks = j.tok[val].count;
                for (i = 0; i < desc->n_tasks; i++, te = j.tok[te].next) {
                    moe__task_config tc;
                    memset(&tc, 0, sizeof tc);
                    moe__format(where, sizeof where, "task %d", i);
                    if (j.tok[te].type != MOE__J_OBJECT) { moe__fail(ctx, r, "moe.config: %s must be an object", where); goto done; }
                    if (moe__fields_read(ctx, &j, te, moe__task_fields, (int)(sizeof moe__task_fields / sizeof moe__task_fields[0]), 0,
                                         &tc, where, 0) != MOE_OK) goto done;
                    desc->task_loss[i] = tc.loss; desc->task_weight[i] = tc.weight; desc->task_d_out[i] = tc.d_out;
                }
            } else if (strcmp(key, "max_tokens") == 0) {
                if (!moe__json_int(&j, val, &desc->max_tokens)) { moe__fail(ctx, r, "moe.config: bad max_tokens"); goto done; }
            } else if (strcmp(key, "optimizer") == 0) {
                if (j.tok[val].type != MOE__J_OBJECT) { moe__fail(ctx, r, "moe.config: optimizer must be an object"); goto done; }
                if (moe__fields_read(ctx, &j, val, moe__opt_fields, (int)(sizeof moe__opt_fields / sizeof moe__opt_fields[0]), 0,
                                     &desc->optimizer, "optimizer", 0) != MOE_OK) goto done;
            } else if (strcmp(key, "format") && strcmp(key, "version") && strcmp(key, "d_in") && strcmp(key, "layers")) {
                moe__fail(ctx, r, "moe.config: unknown field \"%s\"", key);
                goto done;
            }
            k = j.tok[val].next;
        }
    }
    desc->n_layers = j.tok[arr].count;
    desc->layers = layers;
    *layers_out = layers;
    layers = NULL;
    r = MOE_OK;
done:
    moe__free(ctx, layers);
    moe__json_free(ctx, &j);
    return r;
}

// >>model_io ----------------------------------------------------------------
static moe_result moe__config_string(moe_model *m, moe__sb *b) {
    memset(b, 0, sizeof *b);
    b->ctx = m->ctx;
    moe__config_write(m, b);
    if (b->oom) { moe__free(m->ctx, b->buf); return moe__fail(m->ctx, MOE_ERR_OUT_OF_MEMORY, "config text"); }
    return MOE_OK;
}

MOEDEF moe_result moe_model_from_config(moe_ctx *ctx, const char *json, int64_t max_tokens, moe_model **out) {
    moe_model_desc desc;
    moe_layer_desc *layers = NULL;
    moe_result r;
    if (!ctx || !out) return MOE_ERR_INVALID_ARGUMENT;
    *out = NULL;
    if (!json) return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "json is NULL");
    MOE__TRY(moe__config_read(ctx, json, &desc, &layers));
    if (max_tokens) desc.max_tokens = max_tokens;
    r = moe_model_create(ctx, &desc, out);
    moe__free(ctx, layers);
    return r;
}

MOEDEF size_t moe_model_config_json(const moe_model *m, char *buf, size_t cap) {
    moe__sb b;
    size_t n;
    if (!m) return 0;
    memset(&b, 0, sizeof b);
    b.ctx = m->ctx;
    moe__config_write(m, &b);
    if (b.oom) { moe__free(m->ctx, b.buf); if (buf && cap) buf[0] = 0; return 0; }
    n = b.len;
    if (buf && cap) moe__strlcpy(buf, b.buf, cap);
    moe__free(m->ctx, b.buf);
    return n;
}

/* "layers.<i>.<name>": the name a model gives tensor `name` of layer i. */
static void moe__model_tensor_name(char *out, size_t cap, int layer, const char *name) {
    char head[24];
    moe__format(head, sizeof head, "layers.%d.", layer);
    moe__concat(out, cap, head, name, "");
}

/* Before the model is allocated: every tensor the configuration implies is in the file with its
   exact shape and a float dtype, and the file has no other "layers." tensor. So the parameters,
   gradients and optimizer state a model of this configuration allocates are backed by the file's
   own bytes, whatever sizes the configuration claims. */
/* "<weight>_scale": the int8 scales of a weight in files, [n, out, groups]. */
static void moe__scale_name(char *out, size_t cap, const char *weight) { moe__concat(out, cap, weight, "_scale", ""); }

/* Whether layer tensor `index` is the stacked weight of a routed or shared expert linear. */
static int moe__is_expert_weight(const moe_layer *l, int index) {
    int b, j;
    for (b = 0; b < l->n_banks; b++)
        for (j = 0; j < l->bank[b].n_linears; j++)
            if (l->bank[b].lin[j].w == l->tensors[index].offset) return 1;
    return 0;
}

static moe_result moe__file_matches_config(moe_ctx *ctx, const moe_model_desc *desc, const moe_tensor_file *f) {
    moe_model_desc d;
    moe_layer *l;
    unsigned char *seen;        /* [file tensors]: implied by the configuration */
    int64_t prev;
    int i, t, q, n = moe_tensor_file_count(f);
    moe_result r = MOE_OK;
    MOE__TRY(moe__model_resolve(ctx, desc, &d));
    l = (moe_layer *)moe__malloc(ctx, sizeof *l);  /* one layer's plan at a time */
    seen = (unsigned char *)moe__calloc(ctx, (size_t)n + 1);
    if (!l || !seen) { r = moe__fail(ctx, MOE_ERR_OUT_OF_MEMORY, "layer plan"); goto done; }
    prev = d.d_in;
    for (i = 0; r == MOE_OK && i < d.n_layers; i++) {
        memset(l, 0, sizeof *l);
        r = moe__layer_resolve(ctx, &d.layers[i], prev, i, &l->d);
        if (r != MOE_OK) break;
        l->ctx = ctx;
        l->index = i;
        l->max_tokens = 1;
        moe__layer_plan(l);
        for (t = 0; r == MOE_OK && t < l->n_tensors; t++) {
            const moe__tdef *td = &l->tensors[t];
            const moe_file_tensor *ft;
            char name[MOE__NAME_MAX + 24];
            moe__model_tensor_name(name, sizeof name, i, td->name);
            ft = moe_tensor_file_find(f, name);
            if (!ft) { r = moe__fail(ctx, MOE_ERR_FORMAT, "tensor \"%s\" is missing", name); break; }
            seen[ft - moe_tensor_file_get(f, 0)] = 1;
            if (ft->dtype == MOE_DTYPE_I8 && td->ndim == 3 && moe__is_expert_weight(l, t)) {
                /* int8 expert weights: their scales [n, out, groups] come along */
                char scale[MOE__NAME_MAX + 56];
                const moe_file_tensor *sc;
                moe__scale_name(scale, sizeof scale, name);
                sc = moe_tensor_file_find(f, scale);
                if (!sc || sc->dtype != MOE_DTYPE_F32 || sc->ndim != 3 || sc->shape[0] != td->shape[0] || sc->shape[1] != td->shape[1] ||
                    sc->shape[2] != (td->shape[2] + MOE__QGROUP - 1) / MOE__QGROUP)
                    r = moe__fail(ctx, MOE_ERR_FORMAT, "int8 tensor \"%s\" needs \"%s\", F32 [%lld, %lld, %lld]", name, scale,
                                  (long long)td->shape[0], (long long)td->shape[1], (long long)((td->shape[2] + MOE__QGROUP - 1) / MOE__QGROUP));
                else
                    seen[sc - moe_tensor_file_get(f, 0)] = 1;
            } else if (ft->dtype != MOE_DTYPE_F32 && ft->dtype != MOE_DTYPE_F64 && ft->dtype != MOE_DTYPE_F16 && ft->dtype != MOE_DTYPE_BF16)
                r = moe__fail(ctx, MOE_ERR_FORMAT, "tensor \"%s\" is %s; parameters must be a float type", name, moe__dtype_names[ft->dtype]);
            else if (ft->ndim != td->ndim)
                r = moe__fail(ctx, MOE_ERR_SHAPE, "tensor \"%s\" has %d dimensions, expected %d", name, ft->ndim, td->ndim);
            for (q = 0; r == MOE_OK && q < td->ndim; q++)
                if (ft->shape[q] != td->shape[q])
                    r = moe__fail(ctx, MOE_ERR_SHAPE, "tensor \"%s\" dimension %d is %lld, expected %lld", name, q, (long long)ft->shape[q], (long long)td->shape[q]);
        }
        prev = moe__layer_width(&l->d);
    }
    for (i = 0; r == MOE_OK && i < n; i++)
        if (!seen[i] && strncmp(moe_tensor_file_get(f, i)->name, "layers.", 7) == 0)
            r = moe__fail(ctx, MOE_ERR_FORMAT, "tensor \"%s\" is not part of this model's configuration", moe_tensor_file_get(f, i)->name);
done:
    moe__free(ctx, seen);
    moe__free(ctx, l);
    return r;
}

#ifndef MOE_NO_TRAINING
/* Checkpoint contents beyond the model file: the optimizer's moments as tensors of the parameters
   back to back (model tensor order, no padding), and a metadata entry with the step counters. */
static const char *const moe__moment_names[2] = {"optimizer.m", "optimizer.v"};

static float *moe__moment(const moe_model *m, int which) { return which ? m->opt->v : m->opt->m; }

/* Copy a moment between the optimizer's blob layout and the packed layout of the file. */
static void moe__moment_pack(moe_model *m, float *blob, float *packed, int to_packed) {
    int64_t at = 0;
    int i;
    for (i = 0; i < m->n_tensors; i++) {
        moe_tensor t;
        moe_model_tensor(m, i, &t);
        if (to_packed) memcpy(packed + at, blob + t.offset, (size_t)t.size * sizeof(float));
        else memcpy(blob + t.offset, packed + at, (size_t)t.size * sizeof(float));
        at += t.size;
    }
}
#endif /* MOE_NO_TRAINING */

/* The reduced copy (moe_layer_quantize) of layer tensor `index`, or NULL: expert weights only. */
static const moe__mat *moe__tensor_quant(const moe_layer *l, int index) {
    int b, j;
    if (l->wdtype == MOE_DTYPE_F32) return NULL;
    for (b = 0; b < l->n_banks; b++)
        for (j = 0; j < l->bank[b].n_linears; j++)
            if (l->bank[b].lin[j].w == l->tensors[index].offset) return &l->bank[b].qw[j];
    return NULL;
}

/* The model (checkpoint: and its training state) as a file at path, or into buf when size is not
   NULL (buf NULL: only the size). */
static moe_result moe__model_write(moe_model *m, int checkpoint, const char *path, void *buf, size_t cap, size_t *size) {
    moe_tensor_writer *w = NULL;
    moe__sb cfg, state;
    float *packed = NULL;
    int64_t count = moe_model_parameter_count(m);
    moe_result r;
    int i;
    if (!m) return MOE_ERR_INVALID_ARGUMENT;
    if (!path && !size) return moe__fail(m->ctx, MOE_ERR_INVALID_ARGUMENT, "%s is NULL", buf ? "size" : "path");
    MOE__TRY(moe__config_string(m, &cfg));
    memset(&state, 0, sizeof state);
    state.ctx = m->ctx;
    r = moe_tensor_writer_create(m->ctx, &w);
    if (r == MOE_OK) r = moe_tensor_writer_metadata(w, "format", "pt");
    if (r == MOE_OK) r = moe_tensor_writer_metadata(w, "moe.config", cfg.buf);
    for (i = 0; r == MOE_OK && i < m->n_layers && m->layers[i].wdtype == MOE_DTYPE_F32; i++) {}
    if (r == MOE_OK && i < m->n_layers) {
        if (checkpoint) r = moe__fail(m->ctx, MOE_ERR_STATE, "layer %d holds reduced-precision weights: checkpoints are for training", i);
        else r = moe_tensor_writer_metadata(w, "moe.weights", "reduced");
    }
    for (i = 0; r == MOE_OK && i < m->n_tensors; i++) {
        moe_tensor t;
        const moe__mat *q;
        r = moe_model_tensor(m, i, &t);
        q = r == MOE_OK ? moe__tensor_quant(&m->layers[m->tensors[i].layer], m->tensors[i].index) : NULL;
        if (r != MOE_OK) break;
        if (q && q->bf16) {
            r = moe_tensor_writer_add(w, t.name, MOE_DTYPE_BF16, t.ndim, t.shape, q->bf16);
        } else if (q) {
            char scale[MOE__NAME_MAX + 32];
            int64_t shape[3];
            shape[0] = t.shape[0]; shape[1] = t.shape[1]; shape[2] = q->groups;
            moe__scale_name(scale, sizeof scale, t.name);
            r = moe_tensor_writer_add(w, t.name, MOE_DTYPE_I8, t.ndim, t.shape, q->q8);
            if (r == MOE_OK) r = moe_tensor_writer_add(w, scale, MOE_DTYPE_F32, 3, shape, q->scale);
        } else {
            r = moe_tensor_writer_add(w, t.name, MOE_DTYPE_F32, t.ndim, t.shape, t.data);
        }
    }
#ifndef MOE_NO_TRAINING
    if (r == MOE_OK && checkpoint) {
        moe__sb_printf(&state, "{\"version\":1,\"step\":%lld,\"seed\":\"%llu\",\"noise_steps\":[", (long long)m->opt->step,
                       (unsigned long long)m->ctx->seed);
        for (i = 0; i < m->n_layers; i++) moe__sb_printf(&state, "%s%lld", i ? "," : "", (long long)m->layers[i].noise_step);
        moe__sb_str(&state, "]}");
        if (state.oom) r = moe__fail(m->ctx, MOE_ERR_OUT_OF_MEMORY, "checkpoint state");
        if (r == MOE_OK) r = moe_tensor_writer_metadata(w, "moe.checkpoint", state.buf);
        packed = (float *)moe__malloc(m->ctx, 2 * (size_t)count * sizeof(float) + 1);
        if (r == MOE_OK && !packed) r = moe__fail(m->ctx, MOE_ERR_OUT_OF_MEMORY, "optimizer state (%lld floats)", (long long)count);
        for (i = 0; r == MOE_OK && i < 2; i++)
            if (moe__moment(m, i)) {
                moe__moment_pack(m, moe__moment(m, i), packed + i * count, 1);
                r = moe_tensor_writer_add(w, moe__moment_names[i], MOE_DTYPE_F32, 1, &count, packed + i * count);
            }
    }
#else
    (void)count;
#endif
#ifndef MOE_NO_STDIO
    if (r == MOE_OK && !size) r = moe_tensor_writer_save(w, path);
#endif
    if (r == MOE_OK && size) r = moe_tensor_writer_save_memory(w, buf, cap, size);
    moe_tensor_writer_destroy(w);
    moe__free(m->ctx, packed);
    moe__free(m->ctx, state.buf);
    moe__free(m->ctx, cfg.buf);
    return r;
}

#ifndef MOE_NO_STDIO
MOEDEF moe_result moe_model_save(moe_model *m, const char *path) { return moe__model_write(m, 0, path, NULL, 0, NULL); }
#endif

MOEDEF moe_result moe_model_save_memory(moe_model *m, void *buf, size_t cap, size_t *size) {
    if (m && !size) return moe__fail(m->ctx, MOE_ERR_INVALID_ARGUMENT, "size is NULL");
    return moe__model_write(m, 0, NULL, buf, cap, size);
}

#ifndef MOE_NO_TRAINING
#ifndef MOE_NO_STDIO
MOEDEF moe_result moe_model_save_checkpoint(moe_model *m, const char *path) { return moe__model_write(m, 1, path, NULL, 0, NULL); }
#endif

MOEDEF moe_result moe_model_save_checkpoint_memory(moe_model *m, void *buf, size_t cap, size_t *size) {
    if (m && !size) return moe__fail(m->ctx, MOE_ERR_INVALID_ARGUMENT, "size is NULL");
    return moe__model_write(m, 1, NULL, buf, cap, size);
}

/* Restore the optimizer's moments and step and every layer's noise counter from a checkpoint. */
static moe_result moe__checkpoint_restore(moe_ctx *ctx, const moe_tensor_file *f, moe_model *m) {
    const char *text = moe_tensor_file_metadata(f, "moe.checkpoint");
    moe__json j;
    int32_t v, e;
    int64_t step, iv, count = moe_model_parameter_count(m), k;
    uint64_t seed = 0;
    float *packed = NULL;
    char digits[24];
    int i;
    moe_result r = MOE_ERR_FORMAT;
    if (!text) return moe__fail(ctx, MOE_ERR_FORMAT, "no \"moe.checkpoint\" in the file's __metadata__: a model file, not a checkpoint");
    MOE__TRY(moe__json_parse(ctx, text, strlen(text), &j, "moe.checkpoint"));
    v = moe__json_member(&j, 0, "version");
    if (v < 0 || !moe__json_int(&j, v, &iv) || iv < 1) { moe__fail(ctx, r, "moe.checkpoint: missing or bad \"version\""); goto done; }
    if (iv > 1) { r = moe__fail(ctx, MOE_ERR_UNSUPPORTED, "moe.checkpoint version %lld is newer than this moe.h reads (1)", (long long)iv); goto done; }
    v = moe__json_member(&j, 0, "step");
    if (v < 0 || !moe__json_int(&j, v, &step) || step < 0) { moe__fail(ctx, r, "moe.checkpoint: missing or bad \"step\""); goto done; }
    v = moe__json_member(&j, 0, "seed");  /* a string: JSON numbers do not hold every uint64 */
    if (v < 0 || moe__json_str(&j, v, digits, sizeof digits) < 1) { moe__fail(ctx, r, "moe.checkpoint: missing or bad \"seed\""); goto done; }
    for (i = 0; digits[i]; i++) {
        if (digits[i] < '0' || digits[i] > '9' || seed > (UINT64_MAX - (uint64_t)(digits[i] - '0')) / 10) {
            moe__fail(ctx, r, "moe.checkpoint: \"seed\" is not an unsigned 64-bit decimal");
            goto done;
        }
        seed = seed * 10 + (uint64_t)(digits[i] - '0');
    }
    if (seed != ctx->seed) {
        r = moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "the checkpoint was written with seed %llu, the context has seed %llu: the noise would differ",
                      (unsigned long long)seed, (unsigned long long)ctx->seed);
        goto done;
    }
    v = moe__json_member(&j, 0, "noise_steps");
    if (v < 0 || j.tok[v].type != MOE__J_ARRAY || j.tok[v].count != m->n_layers) {
        moe__fail(ctx, r, "moe.checkpoint: \"noise_steps\" must list one counter per layer (%d)", m->n_layers);
        goto done;
    }
    for (i = 0, e = v + 1; i < m->n_layers; i++, e = j.tok[e].next) {
        if (!moe__json_int(&j, e, &iv) || iv < 0) { moe__fail(ctx, r, "moe.checkpoint: bad noise_steps[%d]", i); goto done; }
        m->layers[i].noise_step = m->layers[i].forward_step = iv;
    }
    packed = (float *)moe__malloc(ctx, (size_t)count * sizeof(float) + 1);
    if (!packed) { r = moe__fail(ctx, MOE_ERR_OUT_OF_MEMORY, "optimizer state (%lld floats)", (long long)count); goto done; }
    for (i = 0; i < 2; i++) {
        const moe_file_tensor *ft = moe_tensor_file_find(f, moe__moment_names[i]);
        float *blob = moe__moment(m, i);
        if (!blob != !ft) {
            moe__fail(ctx, r, "tensor \"%s\" %s", moe__moment_names[i], ft ? "is not used by this optimizer" : "is missing");
            goto done;
        }
        if (!ft) continue;
        if (ft->dtype != MOE_DTYPE_F32 || ft->ndim != 1 || ft->shape[0] != count) {
            moe__fail(ctx, r, "tensor \"%s\" must be F32 [%lld]", moe__moment_names[i], (long long)count);
            goto done;
        }
        moe_file_tensor_to_f32(ctx, ft, packed, count);
        for (k = 0; k < count; k++)
            if (!moe__finite(packed[k]) || (i == 1 && packed[k] < 0.0f)) {
                moe__fail(ctx, r, "tensor \"%s\" element %lld is %g", moe__moment_names[i], (long long)k, (double)packed[k]);
                goto done;
            }
        moe__moment_pack(m, blob, packed, 0);
    }
    m->opt->step = step;
    r = MOE_OK;
done:
    moe__free(ctx, packed);
    moe__json_free(ctx, &j);
    return r;
}

#endif /* MOE_NO_TRAINING */

/* A parameter from its file tensor: any float type, or int8 times its scales. */
static moe_result moe__load_param(moe_ctx *ctx, const moe_tensor_file *f, moe_tensor *t) {
    const moe_file_tensor *ft = moe_tensor_file_find(f, t->name), *sc;
    char scale[MOE__NAME_MAX + 56];
    int64_t i, groups;
    if (ft->dtype != MOE_DTYPE_I8) return moe_file_tensor_to_f32(ctx, ft, t->data, t->size);
    moe__scale_name(scale, sizeof scale, t->name);
    sc = moe_tensor_file_find(f, scale);
    groups = sc->shape[2];
    for (i = 0; i < t->size; i++) {
        int64_t row = i / t->shape[2], k = i % t->shape[2];
        float s;
        memcpy(&s, (const char *)sc->data + (size_t)(row * groups + k / MOE__QGROUP) * sizeof(float), sizeof s);
        t->data[i] = (float)((const int8_t *)ft->data)[i] * s;
    }
    return MOE_OK;
}

/* In a file saved with reduced-precision weights (__metadata__ "moe.weights"), a MoE layer whose
   expert weights are all bf16, or all int8, keeps exactly those as its reduced copy: the loaded
   model runs inference as the saved one did. */
static moe_result moe__load_quant(const moe_tensor_file *f, moe_layer *l) {
    moe_dtype dtype = MOE_DTYPE_COUNT;
    int t, b, j;
    if (!moe_tensor_file_metadata(f, "moe.weights")) return MOE_OK;
    for (t = 0; t < l->n_tensors; t++) {
        char name[MOE__NAME_MAX + 24];
        const moe_file_tensor *ft;
        if (!moe__is_expert_weight(l, t)) continue;
        moe__model_tensor_name(name, sizeof name, l->index, l->tensors[t].name);
        ft = moe_tensor_file_find(f, name);
        if (ft->dtype != MOE_DTYPE_BF16 && ft->dtype != MOE_DTYPE_I8) return MOE_OK;
        if (dtype != MOE_DTYPE_COUNT && dtype != ft->dtype) return MOE_OK;
        dtype = ft->dtype;
    }
    if (dtype == MOE_DTYPE_COUNT) return MOE_OK;
    MOE__TRY(moe_layer_quantize(l, dtype));
    if (dtype == MOE_DTYPE_BF16) return MOE_OK;  /* bf16 values round-trip exactly */
    for (b = 0; b < l->n_banks; b++)
        for (j = 0; j < l->bank[b].n_linears; j++) {
            const moe__linear *lin = &l->bank[b].lin[j];
            moe__mat *q = &l->bank[b].qw[j];
            char name[MOE__NAME_MAX + 24], scale[MOE__NAME_MAX + 56];
            const moe_file_tensor *ft, *sc;
            for (t = 0; t < l->n_tensors && l->tensors[t].offset != lin->w; t++) {}
            moe__model_tensor_name(name, sizeof name, l->index, l->tensors[t].name);
            moe__scale_name(scale, sizeof scale, name);
            ft = moe_tensor_file_find(f, name);
            sc = moe_tensor_file_find(f, scale);
            memcpy((int8_t *)q->q8, ft->data, (size_t)(l->bank[b].n * lin->out * lin->in));
            memcpy((float *)q->scale, sc->data, (size_t)(l->bank[b].n * lin->out * q->groups) * sizeof(float));
        }
    return MOE_OK;
}

static moe_result moe__model_from_file(moe_ctx *ctx, const moe_tensor_file *f, int64_t max_tokens, int checkpoint, moe_model **out) {
    const char *cfg = moe_tensor_file_metadata(f, "moe.config");
    moe_model_desc desc;
    moe_layer_desc *layers = NULL;
    moe_model *m = NULL;
    moe_result r;
    int i;
    if (!cfg) return moe__fail(ctx, MOE_ERR_FORMAT, "no \"moe.config\" in the file's __metadata__");
    MOE__TRY(moe__config_read(ctx, cfg, &desc, &layers));
    if (max_tokens) desc.max_tokens = max_tokens;
    r = moe__file_matches_config(ctx, &desc, f);
    if (r == MOE_OK) r = moe_model_create(ctx, &desc, &m);
    moe__free(ctx, layers);
    if (r != MOE_OK) return r;
    for (i = 0; i < m->n_tensors; i++) {
        moe_tensor t;
        moe_model_tensor(m, i, &t);
        r = moe__load_param(ctx, f, &t);
        if (r == MOE_OK && !moe__all_finite(t.data, t.size)) r = moe__fail(ctx, MOE_ERR_FORMAT, "tensor \"%s\" holds NaN or Inf", t.name);
        if (r != MOE_OK) goto fail;
    }
    for (i = 0; i < m->n_layers; i++)
        if ((r = moe__load_quant(f, &m->layers[i])) != MOE_OK) goto fail;
#ifndef MOE_NO_TRAINING
    if (checkpoint && (r = moe__checkpoint_restore(ctx, f, m)) != MOE_OK) goto fail;
#else
    (void)checkpoint;
#endif
    *out = m;
    return MOE_OK;
fail:
    moe_model_destroy(m);
    return r;
}

static moe_result moe__model_load_memory(moe_ctx *ctx, const void *data, size_t size, int64_t max_tokens, int checkpoint, moe_model **out) {
    moe_tensor_file *f;
    moe_result r;
    if (!ctx || !out) return MOE_ERR_INVALID_ARGUMENT;
    *out = NULL;
    MOE__TRY(moe_tensor_file_parse(ctx, data, size, &f));
    r = moe__model_from_file(ctx, f, max_tokens, checkpoint, out);
    moe_tensor_file_close(f);
    return r;
}

#ifndef MOE_NO_STDIO
static moe_result moe__model_load(moe_ctx *ctx, const char *path, int64_t max_tokens, int checkpoint, moe_model **out) {
    moe_tensor_file *f;
    moe_result r;
    if (!ctx || !out) return MOE_ERR_INVALID_ARGUMENT;
    *out = NULL;
    MOE__TRY(moe_tensor_file_read(ctx, path, &f));
    r = moe__model_from_file(ctx, f, max_tokens, checkpoint, out);
    if (r != MOE_OK) moe__fail_prefix(ctx, r, path);
    moe_tensor_file_close(f);
    return r;
}

MOEDEF moe_result moe_model_load(moe_ctx *ctx, const char *path, int64_t max_tokens, moe_model **out) {
    return moe__model_load(ctx, path, max_tokens, 0, out);
}

#ifndef MOE_NO_TRAINING
MOEDEF moe_result moe_model_load_checkpoint(moe_ctx *ctx, const char *path, int64_t max_tokens, moe_model **out) {
    return moe__model_load(ctx, path, max_tokens, 1, out);
}
#endif
#endif /* MOE_NO_STDIO */

MOEDEF moe_result moe_model_load_memory(moe_ctx *ctx, const void *data, size_t size, int64_t max_tokens, moe_model **out) {
    return moe__model_load_memory(ctx, data, size, max_tokens, 0, out);
}

/* Caller-owned memory: a load whose allocations are carved one after the other from one block.
   A free of the latest allocation gives its bytes back (the loader's temporary tables mostly go
   so), any other free is a no-op. Measuring runs the very same load on the context's allocator
   and replays the offsets, so the peak it reports is the block that load needs. */
typedef struct moe__bump {
    char *base;                 /* NULL: measuring (each allocation also comes from `backing`) */
    size_t cap, used, peak, last;
    void *last_ptr;
    int exhausted;              /* a request did not fit into cap */
    moe_allocator backing;
} moe__bump;

#define MOE__BUMP_ALIGN 16

static void *moe__bump_alloc(size_t size, void *user) {
    moe__bump *b = (moe__bump *)user;
    size_t at = (b->used + MOE__BUMP_ALIGN - 1) & ~(size_t)(MOE__BUMP_ALIGN - 1);
    void *p;
    if (size > SIZE_MAX / 2 || at > SIZE_MAX / 2 - size) return NULL;
    if (b->base) {
        if (at + size > b->cap) { b->exhausted = 1; return NULL; }
        p = b->base + at;
    } else {
        p = b->backing.alloc ? b->backing.alloc(size, b->backing.user) : MOE_MALLOC(size, b->backing.user);
        if (!p) return NULL;
    }
    b->last = at;
    b->last_ptr = p;
    b->used = at + size;
    if (b->used > b->peak) b->peak = b->used;
    return p;
}

static void moe__bump_free(void *ptr, void *user) {
    moe__bump *b = (moe__bump *)user;
    if (!ptr) return;
    if (ptr == b->last_ptr) { b->used = b->last; b->last_ptr = NULL; }
    if (!b->base) {
        if (b->backing.free) b->backing.free(ptr, b->backing.user);
        else MOE_FREE(ptr, b->backing.user);
    }
}

/* Load from data through a bump allocator over memory (NULL: measure); the model, if any, is
   then moved over to ctx. */
static moe_result moe__model_load_bump(moe_ctx *ctx, const void *data, size_t size, int64_t max_tokens, moe__bump *b, moe_model **out) {
    moe_ctx inner = *ctx;
    moe_model *m = NULL;
    moe_result r;
    int i;
    b->backing = ctx->allocator;
    inner.allocator.alloc = moe__bump_alloc;
    inner.allocator.free = moe__bump_free;
    inner.allocator.user = b;
    r = moe__model_load_memory(&inner, data, size, max_tokens, 0, &m);
    if (r != MOE_OK) {
        memcpy(ctx->error, inner.error, sizeof ctx->error);
        return r;
    }
    if (!b->base) {             /* measured: give everything back */
        moe_model_destroy(m);
        return MOE_OK;
    }
    m->ctx = ctx;
    m->ex.ctx = ctx;
    for (i = 0; i < m->n_layers; i++) { m->layers[i].ctx = ctx; m->layers[i].ex.ctx = ctx; }
#ifndef MOE_NO_TRAINING
    m->opt->ctx = ctx;
#endif
    m->memory = b->base;
    *out = m;
    return MOE_OK;
}

MOEDEF moe_result moe_model_memory_size(moe_ctx *ctx, const void *data, size_t size, int64_t max_tokens, size_t *bytes) {
    moe__bump b;
    moe_model *unused = NULL;
    if (!ctx || !bytes) return MOE_ERR_INVALID_ARGUMENT;
    *bytes = 0;
    memset(&b, 0, sizeof b);
    MOE__TRY(moe__model_load_bump(ctx, data, size, max_tokens, &b, &unused));
    *bytes = b.peak;
    return MOE_OK;
}

MOEDEF moe_result moe_model_init_memory(moe_ctx *ctx, const void *data, size_t size, int64_t max_tokens, void *memory,
                                        size_t memory_size, moe_model **out) {
    moe__bump b;
    moe_result r;
    if (!ctx || !out) return MOE_ERR_INVALID_ARGUMENT;
    *out = NULL;
    if (!memory) return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "memory is NULL");
    if ((uintptr_t)memory % MOE_MEMORY_ALIGN != 0)
        return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "memory is not aligned to MOE_MEMORY_ALIGN (%d bytes)", MOE_MEMORY_ALIGN);
    memset(&b, 0, sizeof b);
    b.base = (char *)memory;
    b.cap = memory_size;
    r = moe__model_load_bump(ctx, data, size, max_tokens, &b, out);
    if (r == MOE_ERR_OUT_OF_MEMORY && b.exhausted)
        return moe__fail(ctx, r, "memory of %zu bytes is too small for this model and max_tokens (moe_model_memory_size says how much)", memory_size);
    return r;
}

#ifndef MOE_NO_TRAINING
MOEDEF moe_result moe_model_load_checkpoint_memory(moe_ctx *ctx, const void *data, size_t size, int64_t max_tokens, moe_model **out) {
    return moe__model_load_memory(ctx, data, size, max_tokens, 1, out);
}
#endif /* MOE_NO_TRAINING */

// >>hf_import ---------------------------------------------------------------
/* A Hugging Face MoE block: its architecture, tensor-name prefix and the moe.h layer for it. */
typedef struct moe__hf_block {
    moe_hf_arch arch;
    char prefix[160];
    moe_layer_desc d;
} moe__hf_block;

static const char *const moe__hf_arch_names[] = {"", "mixtral", "qwen2_moe", "deepseek_v3"};

/* HF names of the gate (w1), up (w3) and down (w2) projections */
static const char *moe__hf_proj(moe_hf_arch arch, int j) {
    static const char *const mixtral[3] = {"w1", "w3", "w2"}, *const glu[3] = {"gate_proj", "up_proj", "down_proj"};
    return arch == MOE_HF_MIXTRAL ? mixtral[j] : glu[j];
}

static int moe__ends_with(const char *s, size_t n, const char *suffix) {
    size_t m = strlen(suffix);
    return n >= m && memcmp(s + n - m, suffix, m) == 0;
}

/* The file's tensor named prefix + printf(fmt, ...), its name left in name[256]. */
static const moe_file_tensor *moe__hf_get(const moe_tensor_file *f, char *name, const char *prefix, const char *fmt, ...) {
    va_list ap;
    size_t n = moe__strlcpy(name, prefix, 256);
    if (n >= 256) return NULL;
    va_start(ap, fmt);
    moe__vformat(name + n, 256 - n, fmt, ap);
    va_end(ap);
    return moe_tensor_file_find(f, name);
}

/* The block prefix: the one asked for (itself, or a decoder layer's + "block_sparse_moe." or
   "mlp."), else the lowest-numbered P with a 2-D P"gate.weight" and P"experts.0.<gate proj>". */
static moe_result moe__hf_prefix(moe_ctx *ctx, const moe_tensor_file *f, const char *want, char *out) {
    static const char *const subs[3] = {"", "block_sparse_moe.", "mlp."};
    char name[256];
    int i, q, best = INT_MAX;
    out[0] = 0;
    if (want) {
        if (strlen(want) >= 128) return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "prefix \"%.40s...\" too long", want);
        for (q = 0; q < 3; q++)
            if (moe__hf_get(f, name, want, "%sgate.weight", subs[q])) { moe__concat(out, 160, want, subs[q], ""); return MOE_OK; }
        return moe__fail(ctx, MOE_ERR_FORMAT, "no MoE block at \"%s\": no %sgate.weight, %sblock_sparse_moe.gate.weight or %smlp.gate.weight",
                         want, want, want, want);
    }
    for (i = 0; i < moe_tensor_file_count(f); i++) {
        const moe_file_tensor *t = moe_tensor_file_get(f, i);
        size_t n = strlen(t->name);
        char p[160];
        const char *lp;
        long layer = 0;
        if (t->ndim != 2 || !moe__ends_with(t->name, n, "gate.weight")) continue;
        n -= strlen("gate.weight");
        if (n >= 128) continue;
        memcpy(p, t->name, n);
        p[n] = 0;
        if (!moe__ends_with(p, n, "block_sparse_moe.") && !moe__ends_with(p, n, "mlp.")) continue;
        if (!moe__hf_get(f, name, p, "experts.0.w1.weight") && !moe__hf_get(f, name, p, "experts.0.gate_proj.weight")) continue;
        lp = strstr(p, "layers.");
        if (lp) layer = strtol(lp + 7, NULL, 10);
        if (layer < 0 || layer >= INT_MAX) layer = INT_MAX - 1;
        if ((int)layer < best) { best = (int)layer; memcpy(out, p, n + 1); }
    }
    if (!out[0]) return moe__fail(ctx, MOE_ERR_FORMAT, "no MoE block in the file (a P\"gate.weight\" [E, d] with P\"experts.0.w1.weight\" or P\"experts.0.gate_proj.weight\")");
    return MOE_OK;
}

/* config.json members: 1 found (value in *v), 0 absent, -1 present with another type */
static int moe__hf_cfg_num(const moe__json *j, const char *key, double *v) {
    int32_t t = j->tok ? moe__json_member(j, 0, key) : -1;
    if (t < 0 || j->tok[t].type == MOE__J_NULL) return 0;
    return moe__json_double(j, t, v) ? 1 : -1;
}

static int moe__hf_cfg_bool(const moe__json *j, const char *key, int *v) {
    int32_t t = j->tok ? moe__json_member(j, 0, key) : -1;
    if (t < 0 || j->tok[t].type == MOE__J_NULL) return 0;
    if (j->tok[t].type != MOE__J_TRUE && j->tok[t].type != MOE__J_FALSE) return -1;
    *v = j->tok[t].type == MOE__J_TRUE;
    return 1;
}

/* A whole number in lo..hi from config.json: 1 found, 0 absent; failure sets the error. */
static int moe__hf_cfg_int(moe_ctx *ctx, const moe__json *j, const char *key, int64_t lo, int64_t hi, int64_t *v, moe_result *r) {
    double x;
    int got = moe__hf_cfg_num(j, key, &x);
    if (got == 0) return 0;
    if (got < 0 || x != floor(x) || x < (double)lo || x > (double)hi) {
        *r = moe__fail(ctx, MOE_ERR_FORMAT, "config.json: \"%s\" must be a whole number in %lld..%lld", key, (long long)lo, (long long)hi);
        return -1;
    }
    *v = (int64_t)x;
    return 1;
}

/* config.json's size `key`, if given, must equal what the tensors say. */
static moe_result moe__hf_cfg_size(moe_ctx *ctx, const moe__json *j, const char *key, int64_t value, const char *what) {
    int64_t v;
    moe_result r = MOE_OK;
    int got = moe__hf_cfg_int(ctx, j, key, 1, INT64_C(1) << 40, &v, &r);
    if (got < 0) return r;
    if (got && v != value)
        return moe__fail(ctx, MOE_ERR_SHAPE, "config.json: \"%s\" is %lld but %s gives %lld", key, (long long)v, what, (long long)value);
    return MOE_OK;
}

/* config.json's string `key`, if given, must be `want`. */
static moe_result moe__hf_cfg_is(moe_ctx *ctx, const moe__json *j, const char *key, const char *want) {
    int32_t t = j->tok ? moe__json_member(j, 0, key) : -1;
    if (t >= 0 && j->tok[t].type != MOE__J_NULL && !moe__json_eq(j, t, want))
        return moe__fail(ctx, MOE_ERR_UNSUPPORTED, "config.json: \"%s\" must be \"%s\" for this import", key, want);
    return MOE_OK;
}

static moe_result moe__hf_plan_json(moe_ctx *ctx, const moe_tensor_file *f, const moe_hf_desc *hd, const moe__json *j, moe__hf_block *b) {
    static const char *const experts_key[4] = {"", "num_local_experts", "num_experts", "n_routed_experts"};
    moe_layer_desc *d = &b->d;
    moe_hf_arch arch = hd->arch;
    const moe_file_tensor *g, *w1, *sw1;
    const char *P = b->prefix;
    char name[256], what[300];
    int64_t E, D, H, v;
    moe_result r = MOE_OK;
    int got, norm, q;
    double x;
    if ((int)arch < 0 || arch >= MOE_HF_ARCH_COUNT) return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "unknown arch %d", (int)arch);
    if ((int)hd->norm_topk_prob < 0 || hd->norm_topk_prob >= MOE_FLAG_COUNT) return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "norm_topk_prob out of range");
    if (j->tok && j->tok[0].type != MOE__J_OBJECT) return moe__fail(ctx, MOE_ERR_FORMAT, "config.json is not a JSON object");
    if (arch == MOE_HF_ARCH_DEFAULT && j->tok && moe__json_member(j, 0, "model_type") >= 0) {
        int32_t t = moe__json_member(j, 0, "model_type");
        for (q = 1; q < MOE_HF_ARCH_COUNT; q++)
            if (moe__json_eq(j, t, moe__hf_arch_names[q])) arch = (moe_hf_arch)q;
        if (moe__json_eq(j, t, "qwen3_moe")) arch = MOE_HF_QWEN2_MOE;  /* the same block without the shared expert */
        if (arch == MOE_HF_ARCH_DEFAULT)
            return moe__fail(ctx, MOE_ERR_UNSUPPORTED, "config.json: model_type is not mixtral, qwen2_moe, qwen3_moe or deepseek_v3");
    }
    MOE__TRY(moe__hf_prefix(ctx, f, hd->prefix, b->prefix));
    if (arch == MOE_HF_ARCH_DEFAULT)
        arch = moe__hf_get(f, name, P, "experts.0.w1.weight") ? MOE_HF_MIXTRAL
             : moe__hf_get(f, name, P, "gate.e_score_correction_bias") || moe__hf_get(f, name, P, "shared_experts.gate_proj.weight") ? MOE_HF_DEEPSEEK_V3
             : MOE_HF_QWEN2_MOE;
    b->arch = arch;
    /* sizes from the tensors */
    g = moe__hf_get(f, name, P, "gate.weight");
    if (g->ndim != 2 || g->shape[0] < 1 || g->shape[0] > 65536 || g->shape[1] < 1)
        return moe__fail(ctx, MOE_ERR_SHAPE, "tensor \"%s\": a router [n_experts <= 65536, hidden] expected", name);
    E = g->shape[0];
    D = g->shape[1];
    w1 = moe__hf_get(f, name, P, "experts.0.%s.weight", moe__hf_proj(arch, 0));
    if (!w1) return moe__fail(ctx, MOE_ERR_FORMAT, "no tensor \"%s\" in the file", name);
    if (w1->ndim != 2) return moe__fail(ctx, MOE_ERR_SHAPE, "tensor \"%s\": 2-D [intermediate, hidden] expected", name);
    H = w1->shape[0];
    sw1 = arch == MOE_HF_MIXTRAL ? NULL : moe__hf_get(f, name, P, "%s.gate_proj.weight", arch == MOE_HF_QWEN2_MOE ? "shared_expert" : "shared_experts");
    if (sw1 && sw1->ndim != 2) return moe__fail(ctx, MOE_ERR_SHAPE, "tensor \"%s\": 2-D [intermediate, hidden] expected", name);
    /* config.json: checks and hyper-parameters; desc fields override */
    moe__format(what, sizeof what, "%sgate.weight", P);
    MOE__TRY(moe__hf_cfg_is(ctx, j, "hidden_act", "silu"));
    MOE__TRY(moe__hf_cfg_size(ctx, j, experts_key[arch], E, what));
    MOE__TRY(moe__hf_cfg_size(ctx, j, "hidden_size", D, what));
    moe__format(what, sizeof what, "%sexperts.0.%s.weight", P, moe__hf_proj(arch, 0));
    MOE__TRY(moe__hf_cfg_size(ctx, j, arch == MOE_HF_MIXTRAL ? "intermediate_size" : "moe_intermediate_size", H, what));
    if (arch != MOE_HF_MIXTRAL) {  /* a shared-expert size in config.json needs the tensors, of that width */
        const char *key = arch == MOE_HF_QWEN2_MOE ? "shared_expert_intermediate_size" : "n_shared_experts";
        v = 0;
        if ((got = moe__hf_cfg_int(ctx, j, key, 0, arch == MOE_HF_QWEN2_MOE ? INT64_C(1) << 40 : 65536, &v, &r)) < 0) return r;
        if (arch == MOE_HF_DEEPSEEK_V3) v *= H;  /* H < file bytes: no overflow */
        if (got && v > 0 && !sw1)
            return moe__fail(ctx, MOE_ERR_FORMAT, "config.json has %s but the file has no tensor \"%s\"", key, name);
        if (got && sw1 && v != sw1->shape[0])
            return moe__fail(ctx, MOE_ERR_SHAPE, "config.json: %s gives shared experts %lld wide, the file %lld", key, (long long)v, (long long)sw1->shape[0]);
    }
    if (arch == MOE_HF_DEEPSEEK_V3) {
        MOE__TRY(moe__hf_cfg_is(ctx, j, "scoring_func", "sigmoid"));
        MOE__TRY(moe__hf_cfg_is(ctx, j, "topk_method", "noaux_tc"));
    }
    memset(d, 0, sizeof *d);
    d->kind = MOE_LAYER_MOE;
    d->d_in = d->d_out = D;
    d->n_experts = (int)E;
    d->expert = MOE_EXPERT_SWIGLU;
    d->d_hidden = H;
    d->router = arch == MOE_HF_DEEPSEEK_V3 ? MOE_ROUTER_SIGMOID : MOE_ROUTER_TOPK;
    d->top_k = hd->top_k;
    if (!d->top_k) {
        got = moe__hf_cfg_int(ctx, j, "num_experts_per_tok", 1, E, &v, &r);
        if (got < 0) return r;
        if (!got) return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "top_k: set moe_hf_desc.top_k or give a config.json with num_experts_per_tok");
        d->top_k = (int)v;
    }
    norm = arch != MOE_HF_QWEN2_MOE;
    if (arch != MOE_HF_MIXTRAL && (got = moe__hf_cfg_bool(j, "norm_topk_prob", &norm)) < 0)
        return moe__fail(ctx, MOE_ERR_FORMAT, "config.json: \"norm_topk_prob\" must be true or false");
    if (hd->norm_topk_prob != MOE_FLAG_DEFAULT) norm = hd->norm_topk_prob == MOE_FLAG_ON;
    d->renormalize = norm ? MOE_FLAG_ON : MOE_FLAG_OFF;
    if (sw1) {
        d->n_shared_experts = 1;
        d->d_shared_hidden = sw1->shape[0];
        if (arch == MOE_HF_QWEN2_MOE) d->shared_gate = MOE_FLAG_ON;
    }
    if (arch == MOE_HF_DEEPSEEK_V3) {
        d->n_groups = hd->n_groups;
        if (!d->n_groups && (got = moe__hf_cfg_int(ctx, j, "n_group", 1, E, &v, &r)) != 0) { if (got < 0) return r; d->n_groups = (int)v; }
        d->top_k_groups = hd->top_k_groups;
        if (!d->top_k_groups && (got = moe__hf_cfg_int(ctx, j, "topk_group", 1, E, &v, &r)) != 0) { if (got < 0) return r; d->top_k_groups = (int)v; }
        d->routed_scaling_factor = hd->routed_scaling_factor;
        if (d->routed_scaling_factor == 0.0f && (got = moe__hf_cfg_num(j, "routed_scaling_factor", &x)) != 0) {
            if (got < 0 || !(x > 0.0 && x <= FLT_MAX)) return moe__fail(ctx, MOE_ERR_FORMAT, "config.json: \"routed_scaling_factor\" must be a number > 0");
            d->routed_scaling_factor = (float)x;
        }
    } else if (hd->n_groups || hd->top_k_groups || hd->routed_scaling_factor != 0.0f) {
        return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "n_groups, top_k_groups and routed_scaling_factor belong to deepseek_v3 blocks");
    }
    return MOE_OK;
}

static moe_result moe__hf_plan(moe_ctx *ctx, const moe_tensor_file *f, const moe_hf_desc *hd, moe__hf_block *b) {
    moe__json j;
    moe_result r;
    memset(&j, 0, sizeof j);
    memset(b, 0, sizeof *b);
    if (hd->config_json) MOE__TRY(moe__json_parse(ctx, hd->config_json, strlen(hd->config_json), &j, "config.json"));
    r = moe__hf_plan_json(ctx, f, hd, &j, b);
    moe__json_free(ctx, &j);
    return r;
}

/* Check the file's tensor `name` is a float [rows, cols] (cols 0: [rows]); with a layer, convert
   it into row block `index` of the layer's tensor `ours`. */
static moe_result moe__hf_tensor(moe_ctx *ctx, const moe_tensor_file *f, const char *name, int64_t rows, int64_t cols,
                                 moe_layer *l, const char *ours, int64_t index) {
    const moe_file_tensor *t = moe_tensor_file_find(f, name);
    int64_t n = rows * (cols ? cols : 1);
    int i;
    if (!t) return moe__fail(ctx, MOE_ERR_FORMAT, "no tensor \"%s\" in the file", name);
    if (t->dtype != MOE_DTYPE_F32 && t->dtype != MOE_DTYPE_F16 && t->dtype != MOE_DTYPE_BF16 && t->dtype != MOE_DTYPE_F64)
        return moe__fail(ctx, MOE_ERR_FORMAT, "tensor \"%s\" is %s: F32, F16, BF16 or F64 expected", name, moe__dtype_names[t->dtype]);
    if (t->ndim != (cols ? 2 : 1) || t->shape[0] != rows || (cols && t->shape[1] != cols)) {
        if (cols) return moe__fail(ctx, MOE_ERR_SHAPE, "tensor \"%s\": shape [%lld, %lld] expected", name, (long long)rows, (long long)cols);
        return moe__fail(ctx, MOE_ERR_SHAPE, "tensor \"%s\": shape [%lld] expected", name, (long long)rows);
    }
    if (!l) return MOE_OK;
    for (i = 0; i < l->n_tensors; i++)
        if (strcmp(l->tensors[i].name, ours) == 0) return moe_file_tensor_to_f32(ctx, t, l->params + l->tensors[i].offset + index * n, n);
    MOE_ASSERT(0);
    return moe__fail(ctx, MOE_ERR_STATE, "no layer tensor %s", ours);
}

/* Every tensor of the block: checked (l NULL) or copied into layer l. */
static moe_result moe__hf_walk(moe_ctx *ctx, const moe_tensor_file *f, const moe__hf_block *b, moe_layer *l) {
    static const char *const routed[3] = {"experts.w1.weight", "experts.w3.weight", "experts.w2.weight"};
    static const char *const shared[3] = {"shared.w1.weight", "shared.w3.weight", "shared.w2.weight"};
    const moe_layer_desc *d = &b->d;
    const char *P = b->prefix;
    int64_t E = d->n_experts, D = d->d_in, H = d->d_hidden, S = d->d_shared_hidden, e;
    char name[256];
    int j;
    moe__hf_get(f, name, P, "gate.weight");
    MOE__TRY(moe__hf_tensor(ctx, f, name, E, D, l, "router.weight", 0));
    if (b->arch == MOE_HF_DEEPSEEK_V3) {
        moe__hf_get(f, name, P, "gate.e_score_correction_bias");
        MOE__TRY(moe__hf_tensor(ctx, f, name, E, 0, l, "router.selection_bias", 0));
    }
    for (e = 0; e < E; e++)
        for (j = 0; j < 3; j++) {
            moe__hf_get(f, name, P, "experts.%lld.%s.weight", (long long)e, moe__hf_proj(b->arch, j));
            MOE__TRY(moe__hf_tensor(ctx, f, name, j < 2 ? H : D, j < 2 ? D : H, l, routed[j], e));
        }
    if (d->n_shared_experts) {
        for (j = 0; j < 3; j++) {
            moe__hf_get(f, name, P, "%s.%s.weight", b->arch == MOE_HF_QWEN2_MOE ? "shared_expert" : "shared_experts", moe__hf_proj(b->arch, j));
            MOE__TRY(moe__hf_tensor(ctx, f, name, j < 2 ? S : D, j < 2 ? D : S, l, shared[j], 0));
        }
        if (d->shared_gate == MOE_FLAG_ON) {
            moe__hf_get(f, name, P, "shared_expert_gate.weight");
            MOE__TRY(moe__hf_tensor(ctx, f, name, 1, D, l, "shared.gate.weight", 0));
        }
    }
    return MOE_OK;
}

/* Plan and check every tensor before anything is allocated. */
static moe_result moe__hf_prepare(moe_ctx *ctx, const moe_tensor_file *f, const moe_hf_desc *hd, moe__hf_block *b) {
    moe_hf_desc zero;
    moe_layer_desc resolved;
    if (!f) return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "file is NULL");
    if (!hd) { memset(&zero, 0, sizeof zero); hd = &zero; }
    MOE__TRY(moe__hf_plan(ctx, f, hd, b));
    MOE__TRY(moe__layer_resolve(ctx, &b->d, 0, 0, &resolved));
    return moe__hf_walk(ctx, f, b, NULL);
}

MOEDEF moe_result moe_layer_import_hf(moe_ctx *ctx, const moe_tensor_file *file, const moe_hf_desc *desc, int64_t max_tokens, moe_layer **out) {
    moe__hf_block b;
    moe_layer *l = NULL;
    moe_result r;
    if (!ctx || !out) return MOE_ERR_INVALID_ARGUMENT;
    *out = NULL;
    MOE__TRY(moe__hf_prepare(ctx, file, desc, &b));
    MOE__TRY(moe_layer_create(ctx, &b.d, max_tokens, &l));
    r = moe__hf_walk(ctx, file, &b, l);
    if (r != MOE_OK) { moe_layer_destroy(l); return r; }
    *out = l;
    return MOE_OK;
}

MOEDEF moe_result moe_model_import_hf(moe_ctx *ctx, const moe_tensor_file *file, const moe_hf_desc *desc, int64_t max_tokens, moe_model **out) {
    moe__hf_block b;
    moe_model_desc md;
    moe_model *m = NULL;
    moe_result r;
    if (!ctx || !out) return MOE_ERR_INVALID_ARGUMENT;
    *out = NULL;
    MOE__TRY(moe__hf_prepare(ctx, file, desc, &b));
    memset(&md, 0, sizeof md);
    md.d_in = b.d.d_in;
    md.n_layers = 1;
    md.layers = &b.d;
    md.loss = MOE_LOSS_MSE;
    md.max_tokens = max_tokens;
    MOE__TRY(moe_model_create(ctx, &md, &m));
    r = moe__hf_walk(ctx, file, &b, &m->layers[0]);
    if (r != MOE_OK) { moe_model_destroy(m); return r; }
    *out = m;
    return MOE_OK;
}

#endif /* MOE_IMPLEMENTATION_INCLUDED */
#endif /* MOE_IMPLEMENTATION */

/*
------------------------------------------------------------------------------
This software is available under the MIT License.
------------------------------------------------------------------------------
Copyright (c) 2026 the moe.h authors

Permission is hereby granted, free of charge, to any person obtaining a copy of
this software and associated documentation files (the "Software"), to deal in
the Software without restriction, including without limitation the rights to
use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies
of the Software, and to permit persons to whom the Software is furnished to do
so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
------------------------------------------------------------------------------
*/
