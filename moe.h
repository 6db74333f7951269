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
     >>routing      every router (softmax top-k, sigmoid + bias, expert choice, hash), top-p, gates,
                    capacity, the deterministic counting sort, aux losses
     >>moe_forward  grouped expert computation over (expert, row-tile) tiles, weighted combine
     >>moe_backward expert, weight and router gradients
     >>layer_api >>loss >>optimizer >>model
     >>json >>safetensors >>model_config >>model_io   files

   DEFAULTS (every desc field left 0 means its default)
   --------
     moe_ctx_desc       n_threads all OpenMP threads; seed 0; allocator MOE_MALLOC/MOE_FREE
     moe_layer_desc     kind dense; d_in the previous layer's width; d_out d_in; activation
                        identity (dense) / relu (MLP experts); bias on (SwiGLU experts: off);
                        eps 1e-5; n_experts 4; top_k 2 (switch: 1); router top-k; expert MLP;
                        d_hidden d_in; n_hidden_layers 1; d_shared_hidden d_hidden; renormalize
                        on (switch, expert choice, hash: off); router_bias off; capacity_factor
                        1.25 for switch, 1 for expert choice, else 0 = unlimited; jitter and every
                        aux-loss coefficient 0 (off); max_top_k top_k; sigmoid router:
                        routed_scaling_factor 1, n_groups 1, top_k_groups n_groups,
                        bias_update_rate 0 (off); hash_seed 0; embedding: vocab_size required,
                        d_embedding d_out / d_in
     moe_forward_opts   NULL or all zero: inference, the layers' top_k, no top_p, no token ids
     moe_model_desc     loss cross-entropy; max_tokens 256; optimizer as below
     moe_optimizer_desc AdamW; lr 1e-3; beta1 0.9; beta2 0.999; eps 1e-8; everything else 0
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
    X(MOE_ERR_STATE,            -9, "call out of order")

typedef enum moe_result {
#define MOE__RESULT_ENUM(name, value, text) name = value,
    MOE_RESULT_LIST(MOE__RESULT_ENUM)
#undef MOE__RESULT_ENUM
    MOE_RESULT_MIN = -9
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
    MOE_LAYER_EMBEDDING,    /* x [T, n] token ids -> y [T, n * d_embedding]: the rows W[id] side by side */
    MOE_LAYER_COUNT
} moe_layer_kind;

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
    MOE_ROUTER_COUNT
} moe_router;

typedef enum moe_expert {
    MOE_EXPERT_DEFAULT = 0, /* MLP */
    MOE_EXPERT_LINEAR,      /* x W^T + b */
    MOE_EXPERT_MLP,         /* linear -> act (-> linear -> act)* -> linear */
    MOE_EXPERT_SWIGLU,      /* w2(silu(w1 x) * (w3 x)) */
    MOE_EXPERT_COUNT
} moe_expert;

typedef enum moe_loss {
    MOE_LOSS_DEFAULT = 0,   /* cross-entropy */
    MOE_LOSS_CROSS_ENTROPY, /* softmax cross-entropy on int32 class labels, mean over tokens */
    MOE_LOSS_MSE,           /* mean over all elements of (y - target)^2 */
    MOE_LOSS_BCE,           /* binary cross-entropy on logits, mean over all elements */
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

// >>layer -------------------------------------------------------------------
/* A layer. All-zero fields mean defaults (listed in the manual, "Defaults"). */
typedef struct moe_layer_desc {
    moe_layer_kind kind;
    int64_t d_in;              /* input width; 0 inside a model: the previous layer's output width */
    int64_t d_out;             /* output width; 0: d_in (norm layers always keep d_in) */
    moe_activation activation; /* dense: on the output; MLP experts: on every hidden layer */
    moe_flag bias;             /* biases of dense and expert linears (default on; SwiGLU: off) */
    int residual;              /* nonzero: y = x + layer(x); needs d_out == d_in */
    float eps;                 /* norm layers: added to the variance (default 1e-5) */

    /* MoE layers */
    int n_experts;             /* E (default 4) */
    int top_k;                 /* k, 1..E (default 2, or E if E < 2; switch: 1) */
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
       entry draws it from the context's seed instead. */
    const float *const *router_noise;
    int top_k;                 /* experts per token for this call: 0 = the layer's top_k; 1..max_top_k
                                  (expert choice: the k of its capacity) */
    float top_p;               /* 0 = off; 0 < p <= 1 (routers topk, noisy_topk, switch): per token keep the
                                  fewest highest-probability experts whose probabilities sum to >= p, at most k */
    const int32_t *token_ids;  /* [T] token ids for hash routers (required by them; ignored otherwise). A model
                                  whose layer 0 is an embedding uses each row's last id when this is NULL */
} moe_forward_opts;

/* Flags of moe_layer_backward / moe_model_backward */
#define MOE_BACKWARD_AUX 1     /* add the gradients of the layers' auxiliary losses */

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
/* x [T, d_in] -> y [T, d_out]. x and y must stay untouched until the matching backward. */
MOEDEF moe_result moe_layer_forward(moe_layer *layer, const float *x, int64_t n_tokens, float *y, const moe_forward_opts *opts);
/* dy [T, d_out] -> dx [T, d_in] (overwritten; NULL: not wanted). Parameter gradients accumulate. */
MOEDEF moe_result moe_layer_backward(moe_layer *layer, const float *dy, float *dx, int flags);
MOEDEF moe_result moe_layer_stats(const moe_layer *layer, moe_stats *stats);
MOEDEF const moe_layer_desc *moe_layer_get_desc(const moe_layer *layer); /* defaults filled in */
MOEDEF float *moe_layer_params(moe_layer *layer, int64_t *n_params);
MOEDEF float *moe_layer_grads(moe_layer *layer, int64_t *n_params);
MOEDEF int moe_layer_tensor_count(const moe_layer *layer);
MOEDEF moe_result moe_layer_tensor(moe_layer *layer, int index, moe_tensor *tensor);
/* Inference with reduced-precision expert weights: snapshot the expert weights of a MoE layer
   as MOE_DTYPE_BF16 or MOE_DTYPE_I8 (int8 with one float scale per 32 weights); forwards then
   read those. MOE_DTYPE_F32 drops the snapshot. While one is held, backward returns
   MOE_ERR_STATE. Allocates (once, here); other layer kinds accept the call and ignore it. */
MOEDEF moe_result moe_layer_quantize(moe_layer *layer, moe_dtype dtype);
/* Sigmoid router: the aux-loss-free selection-bias update from the load of the last forward,
   b_e += bias_update_rate * sign(mean load - load_e). moe_model_optimizer_step and
   moe_model_train_step do this themselves; call it after your own optimizer step on a standalone
   layer (and keep that optimizer off "router.selection_bias"). Other layers: no-op. */
MOEDEF moe_result moe_layer_update_bias(moe_layer *layer);

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

/* Optimizer state over a flat blob of n parameters. */
typedef struct moe_optimizer moe_optimizer;

typedef struct moe_step_info {
    float loss;                /* task loss (without auxiliary losses) */
    float aux_loss;            /* sum over layers of their auxiliary losses */
    float grad_norm;           /* global L2 norm before clipping */
    float lr;                  /* learning rate used by this step */
    int64_t step;              /* steps taken so far, this one included */
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

// >>model -------------------------------------------------------------------
typedef struct moe_model_desc {
    int64_t d_in;              /* input width */
    int n_layers;
    const moe_layer_desc *layers;
    moe_loss loss;
    int64_t max_tokens;        /* most rows per call (default 256); sizes the activation arena */
    moe_optimizer_desc optimizer;
} moe_model_desc;

typedef struct moe_model moe_model;

/* Training targets: labels for cross-entropy, values [T, d_out] for MSE and BCE. */
typedef struct moe_target {
    const int32_t *labels;
    const float *values;
} moe_target;

MOEDEF moe_result moe_model_create(moe_ctx *ctx, const moe_model_desc *desc, moe_model **out);
MOEDEF void moe_model_destroy(moe_model *model);
MOEDEF const moe_model_desc *moe_model_get_desc(const moe_model *model); /* defaults filled in */
MOEDEF int64_t moe_model_d_out(const moe_model *model);

/* x [T, d_in] -> y [T, d_out] (y may be NULL: read the output with moe_model_output). */
MOEDEF moe_result moe_model_forward(moe_model *model, const float *x, int64_t n_tokens, float *y, const moe_forward_opts *opts);
MOEDEF const float *moe_model_output(const moe_model *model);
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
/* Argmax class per row (cross-entropy models) or per-row argmax of the outputs. */
MOEDEF moe_result moe_model_predict(moe_model *model, const float *x, int64_t n_tokens, int32_t *classes);
/* Routing statistics of MoE layer `layer` from the last forward. */
MOEDEF moe_result moe_model_stats(const moe_model *model, int layer, moe_stats *stats);
/* moe_layer_quantize on every MoE layer; training calls return MOE_ERR_STATE while quantized. */
MOEDEF moe_result moe_model_quantize(moe_model *model, moe_dtype dtype);

/* The parameter blob and its length in floats; tensors start 64-byte aligned, so the blob holds
   a little padding between them (zeros): moe_model_parameter_count gives the parameters. */
MOEDEF float *moe_model_params(moe_model *model, int64_t *n_params);
MOEDEF int64_t moe_model_parameter_count(const moe_model *model);
MOEDEF float *moe_model_grads(moe_model *model, int64_t *n_params);
MOEDEF int moe_model_tensor_count(const moe_model *model);
MOEDEF moe_result moe_model_tensor(moe_model *model, int index, moe_tensor *tensor);
MOEDEF moe_result moe_model_find_tensor(moe_model *model, const char *name, moe_tensor *tensor);

/* Model files: safetensors with the configuration in __metadata__["moe.config"].
   Saving writes a temporary file next to `path`, then renames it over `path`. */
MOEDEF moe_result moe_model_save(moe_model *model, const char *path);
/* A new model (fresh parameters from the context's seed) from a "moe.config" JSON text
   (README.md (Model reference) section 6.1). max_tokens 0: the text's value, else 256. */
MOEDEF moe_result moe_model_from_config(moe_ctx *ctx, const char *json, int64_t max_tokens, moe_model **out);
/* The model's configuration as "moe.config" JSON text into buf (cap bytes, NUL included).
   Returns the text's length; when it is >= cap the text was cut. */
MOEDEF size_t moe_model_config_json(const moe_model *model, char *buf, size_t cap);
/* max_tokens 0: the value stored in the file. */
MOEDEF moe_result moe_model_load(moe_ctx *ctx, const char *path, int64_t max_tokens, moe_model **out);
MOEDEF moe_result moe_model_load_memory(moe_ctx *ctx, const void *data, size_t size, int64_t max_tokens, moe_model **out);
/* Checkpoints: a model file plus the optimizer's state (moments, step) and every layer's noise
   counter (README "Checkpoints"). A model loaded from one trains on bit for bit as the model that
   saved it would have; the context must have the seed the checkpoint was written with. A
   checkpoint is also a model file (moe_model_load reads its parameters). Saves are atomic. */
MOEDEF moe_result moe_model_save_checkpoint(moe_model *model, const char *path);
MOEDEF moe_result moe_model_load_checkpoint(moe_ctx *ctx, const char *path, int64_t max_tokens, moe_model **out);
MOEDEF moe_result moe_model_load_checkpoint_memory(moe_ctx *ctx, const void *data, size_t size, int64_t max_tokens, moe_model **out);

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

MOEDEF moe_result moe_tensor_file_read(moe_ctx *ctx, const char *path, moe_tensor_file **out);
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
MOEDEF moe_result moe_tensor_writer_save(moe_tensor_writer *writer, const char *path);
MOEDEF void moe_tensor_writer_destroy(moe_tensor_writer *writer);

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
#include <stdio.h>
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
#define MOE__MAX_LINEARS 9          /* MLP experts: up to 8 hidden layers */
#define MOE__MAX_TENSORS 40         /* per layer: router weight, bias, noise weight + two banks of 9 linears with biases */
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
        int n = snprintf(ctx->error, sizeof ctx->error, "%s: ", moe__result_name(code));
        if (n < 0 || n >= (int)sizeof ctx->error) n = 0;
        va_start(ap, fmt);
        vsnprintf(ctx->error + n, sizeof ctx->error - (size_t)n, fmt, ap);
        va_end(ap);
        if (ctx->log) ctx->log(MOE_LOG_ERROR, ctx->error, ctx->log_user);
    }
    return code;
}

/* Re-raise the context's last error with "prefix: " in front of its text (e.g. a file name). */
static moe_result moe__fail_prefix(moe_ctx *ctx, moe_result code, const char *prefix) {
    char msg[sizeof ctx->error];
    const char *rest = strstr(ctx->error, ": ");
    moe__strlcpy(msg, rest ? rest + 2 : ctx->error, sizeof msg);
    return moe__fail(ctx, code, "%s: %s", prefix, msg);
}

#define MOE__TRY(expr) do { moe_result moe__r = (expr); if (moe__r != MOE_OK) return moe__r; } while (0)

// >>ctx ---------------------------------------------------------------------
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
    MOE__EPI_SWIGLU_GRAD   /* out0 = C * in1 * silu'(in0); out1 = C * silu(in0)   dz1, dz3 from da */
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
    float *C, *C2;
    int64_t ldc;
    int accumulate;             /* C += product; else C = product */
    int pair;
    const float *bias, *bias2;  /* [N] added to every row (bias2: to C2), or NULL */
    moe__epi epi;
    moe_activation act;
    float *out0, *out1;
    const float *in0, *in1;
} moe__gemm;

/* C[MR, NR] (+)= A panel x B panel over kc; columns 0..NR/2 go to lo, NR/2..NR to hi. */
typedef void (*moe__micro_fn)(int64_t kc, const float *A, const float *B, float *lo, float *hi, int64_t ldc, int accumulate);

/* dst[k * ld + i] = src[i][k] for i < n, zeros for n <= i < W: packing's transposing copy. */
typedef void (*moe__pack_fn)(const float *const *src, int64_t n, int64_t W, int64_t ld, int64_t kc, float *dst);
/* a[j] = silu(z1[j]) * z3[j] */
typedef void (*moe__swiglu_fn)(const float *z1, const float *z3, float *a, int64_t n);
/* its gradient: dz1 = da z3 silu'(z1), dz3 = da silu(z1) */
typedef void (*moe__swiglu_grad_fn)(const float *da, const float *z1, const float *z3, float *dz1, float *dz3, int64_t n);
struct moe__mat;
/* out[r] = row j of W . x[r] for r < m (the decode path) */
typedef void (*moe__dot_fn)(const struct moe__mat *W, int64_t j, const float *const *x, int m, int64_t K, float *out);

typedef struct moe__kernel {
    moe__micro_fn micro;
    moe__pack_fn pack_t;
    moe__swiglu_fn swiglu;
    moe__swiglu_grad_fn swiglu_grad;
    moe__dot_fn dot;
    int mr, nr;
    const char *name;
} moe__kernel;

/* Execution resources: threads, per-thread packing scratch, the kernel for this CPU. */
typedef struct moe__exec {
    moe_ctx *ctx;
    int n_threads;
    float *scratch;             /* n_threads * MOE__GEMM_SCRATCH floats */
    moe__kernel kernel;         /* chosen once from the CPU's features (moe__exec_init) */
} moe__exec;

#define MOE__KC 256             /* depth of a packed block */
#define MOE__NB 512             /* packed B columns per block (a pair: 256 of each weight) */
#define MOE__MR_MAX 12
#define MOE__NR_MAX 32
#define MOE__MB_MAX (16 * MOE__MR_MAX)
#define MOE__GEMM_SCRATCH (MOE__KC * MOE__NB + MOE__MB_MAX * MOE__KC + MOE__MR_MAX * MOE__NR_MAX + MOE__NR_MAX * MOE__KC)

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

/* Bias, then the epilogue, on rows r0..r1 and columns c0..c1 of a finished C. */
static void moe__gemm_finish(const moe__gemm *g, const moe__kernel *kn, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
    int64_t i, j, ld = g->ldc;
    for (i = r0; i < r1; i++) {
        float *c = g->C + i * ld, *c2 = g->pair ? g->C2 + i * ld : NULL;
        if (g->bias) for (j = c0; j < c1; j++) c[j] += g->bias[j];
        if (c2 && g->bias2) for (j = c0; j < c1; j++) c2[j] += g->bias2[j];
        switch (g->epi) {
        case MOE__EPI_ACT:
            for (j = c0; j < c1; j++) g->out0[i * ld + j] = moe__act(g->act, c[j]);
            break;
        case MOE__EPI_SWIGLU:
            kn->swiglu(c + c0, c2 + c0, g->out0 + i * ld + c0, c1 - c0);
            break;
        case MOE__EPI_ACT_GRAD:
            for (j = c0; j < c1; j++) c[j] *= moe__act_grad(g->act, g->in0[i * ld + j]);
            break;
        case MOE__EPI_SWIGLU_GRAD:
            kn->swiglu_grad(c + c0, g->in0 + i * ld + c0, g->in1 + i * ld + c0, g->out0 + i * ld + c0, g->out1 + i * ld + c0, c1 - c0);
            break;
        default: break;
        }
    }
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

/* Pack A(m0.., kb..) into MR-row panels: panel p holds kc rows of MR values. */
static void moe__pack_a(const moe__kernel *kn, const moe__gemm *g, int64_t MR, int64_t m0, int64_t mc, int64_t kb, int64_t kc, float *MOE__RESTRICT ap) {
    const float *src[MOE__MR_MAX];
    int64_t p, i, k;
    for (p = 0; p < mc; p += MR) {
        int64_t mr = moe__min64(MR, mc - p);
        float *dst = ap + p * kc;
        if (g->op == MOE__TN) {
            for (k = 0; k < kc; k++) {
                memcpy(dst + k * MR, moe__row(&g->A, kb + k) + m0 + p, (size_t)mr * sizeof(float));
                if (mr < MR) memset(dst + k * MR + mr, 0, (size_t)(MR - mr) * sizeof(float));
            }
        } else {
            for (i = 0; i < mr; i++) src[i] = moe__row(&g->A, m0 + p + i) + kb;
            kn->pack_t(src, mr, MR, MR, kc, dst);
        }
    }
}

/* Columns j0..j0+w of B (or B2) into columns 0..w of an NR-wide panel of kc rows, zeros up to W. */
static void moe__pack_b_cols(const moe__kernel *kn, const moe__gemm *g, const moe__mat *B, int64_t NR, int64_t W, int64_t j0, int64_t w, int64_t kb,
                             int64_t kc, float *MOE__RESTRICT dst, float *rowbuf) {
    const float *src[MOE__NR_MAX];
    int64_t j, k;
    if (g->op == MOE__NT && !B->data) {
        for (j = 0; j < w; j++) {
            moe__mat_load(B, j0 + j, kb, kc, rowbuf + j * kc);
            src[j] = rowbuf + j * kc;
        }
        kn->pack_t(src, w, W, NR, kc, dst);
    } else if (g->op == MOE__NT) {
        for (j = 0; j < w; j++) src[j] = moe__row(B, j0 + j) + kb;
        kn->pack_t(src, w, W, NR, kc, dst);
    } else {
        for (k = 0; k < kc; k++) {
            memcpy(dst + k * NR, moe__row(B, kb + k) + j0, (size_t)w * sizeof(float));
            if (w < W) memset(dst + k * NR + w, 0, (size_t)(W - w) * sizeof(float));
        }
    }
}

/* Pack B for columns n0..n0+nc into panels of PW columns (a pair: PW of B, then PW of B2). */
static void moe__pack_b(const moe__kernel *kn, const moe__gemm *g, int64_t NR, int64_t PW, int64_t n0, int64_t nc, int64_t kb, int64_t kc,
                        float *MOE__RESTRICT bp, float *rowbuf) {
    int64_t p;
    for (p = 0; p < nc; p += PW) {
        int64_t w = moe__min64(PW, nc - p);
        float *dst = bp + (p / PW) * NR * kc;
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

static void moe__gemm_block_fast(const moe__exec *ex, const moe__gemm *g, int64_t m0, int64_t m1, int64_t n0, int64_t n1, float *scratch) {
    const moe__kernel *kn = &ex->kernel;
    int64_t MR = kn->mr, NR = kn->nr, half = NR / 2, PW = g->pair ? half : NR;
    int64_t NB = g->pair ? MOE__NB / 2 : MOE__NB, MB = 16 * MR, ldc = g->ldc;
    float *bp = scratch, *ap = scratch + MOE__KC * MOE__NB, *tmp = ap + MOE__MB_MAX * MOE__KC, *rowbuf = tmp + MOE__MR_MAX * MOE__NR_MAX;
    int64_t nb, kb, mb, ip, jp, i, j;
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
    for (nb = n0; nb < n1; nb += NB) {
        int64_t nc = moe__min64(NB, n1 - nb);
        for (kb = 0; kb < g->K; kb += MOE__KC) {
            int64_t kc = moe__min64(MOE__KC, g->K - kb);
            int accumulate = kb > 0 || g->accumulate, last = kb + kc >= g->K;
            moe__pack_b(kn, g, NR, PW, nb, nc, kb, kc, bp, rowbuf);
            for (mb = m0; mb < m1; mb += MB) {
                int64_t mc = moe__min64(MB, m1 - mb);
                moe__pack_a(kn, g, MR, mb, mc, kb, kc, ap);
                for (ip = 0; ip < mc; ip += MR) {
                    int64_t mr = moe__min64(MR, mc - ip), row = mb + ip;
                    for (jp = 0; jp < nc; jp += PW) {
                        int64_t w = moe__min64(PW, nc - jp), col = nb + jp;
                        float *lo = g->C + row * ldc + col, *hi = g->pair ? g->C2 + row * ldc + col : lo + half;
                        const float *a = ap + ip * kc, *b = bp + (jp / PW) * NR * kc;
                        if (mr == MR && w == PW)
                            kn->micro(kc, a, b, lo, hi, ldc, accumulate);
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
        moe__gemm_block_fast(ex, g, m0, m1, n0, n1, ex->scratch + (size_t)MOE__THREAD_ID() * MOE__GEMM_SCRATCH);
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

/* r[q] becomes column q of the 16 x 16 block r. */
__attribute__((target("avx512f")))
static void moe__transpose16(__m512 *r) {
    __m512 t[16];
    int i, j;
    for (i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (i = 0; i < 4; i++) {
        r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
        r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (i = 0; i < 2; i++)
        for (j = 0; j < 4; j++) {
            t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
            t[8 * i + 4 + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0xDD);
        }
    for (j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
        r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xDD);
    }
}

static uint32_t moe__lanes(int64_t n) { return n >= 16 ? 0xFFFFu : (1u << n) - 1u; }

/* moe__pack_t in 16 x 16 blocks through registers. */
__attribute__((target("avx512f")))
static void moe__pack_t_avx512(const float *const *src, int64_t n, int64_t W, int64_t ld, int64_t kc, float *dst) {
    int64_t i0, k0, i, k;
    for (i0 = 0; i0 < W; i0 += 16) {
        __mmask16 wm = (__mmask16)moe__lanes(W - i0);
        int64_t rows = moe__min64(moe__max64(n - i0, 0), 16);
        for (k0 = 0; k0 < kc; k0 += 16) {
            int64_t kn = moe__min64(16, kc - k0);
            __mmask16 km = (__mmask16)moe__lanes(kn);
            __m512 r[16];
            for (i = 0; i < 16; i++) r[i] = i < rows ? _mm512_maskz_loadu_ps(km, src[i0 + i] + k0) : _mm512_setzero_ps();
            moe__transpose16(r);
            for (k = 0; k < kn; k++) _mm512_mask_storeu_ps(dst + (k0 + k) * ld + i0, wm, r[k]);
        }
    }
}

/* e^x for x in [-87, 88]: 2^n * p(r), |r| <= ln2 / 2, degree-6 Taylor-like polynomial
   (relative error about 2e-7); inputs outside are clamped. */
__attribute__((target("avx512f")))
static __m512 moe__exp_avx512(__m512 x) {
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f), ln2 = _mm512_set1_ps(0.693147180559945309f);
    __m512 n, r, p;
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-87.0f));
    n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm512_fnmadd_ps(n, ln2, x);
    p = _mm512_set1_ps(1.0f / 720.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

__attribute__((target("avx512f")))
static __m512 moe__sigmoid_avx512(__m512 x) {
    __m512 one = _mm512_set1_ps(1.0f);
    return _mm512_div_ps(one, _mm512_add_ps(one, moe__exp_avx512(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

__attribute__((target("avx512f")))
static void moe__swiglu_avx512(const float *z1, const float *z3, float *a, int64_t n) {
    int64_t j;
    for (j = 0; j < n; j += 16) {
        __mmask16 m = (__mmask16)moe__lanes(n - j);
        __m512 x = _mm512_maskz_loadu_ps(m, z1 + j), y = _mm512_maskz_loadu_ps(m, z3 + j);
        _mm512_mask_storeu_ps(a + j, m, _mm512_mul_ps(_mm512_mul_ps(x, moe__sigmoid_avx512(x)), y));
    }
}

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
#endif

/* Few tokens (inference, T <= MOE__DECODE_TOKENS): every expert's rows against each weight row
   in turn, so each needed weight is read once; threads split the weight rows. */
#define MOE__DECODE_TOKENS 8
#define MOE__DECODE_ROWS 32     /* weight rows per decode tile */

/* out[r] = sum_k W(j, k) x_r[k] for r < m, in 16 interleaved partial sums over k. */
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

#ifdef MOE__HAVE_X86_DISPATCH
/* 16 weights of row w (f32, bf16 or int8 times its group's scale) from k0 as floats, masked to n. */
#define MOE__LOAD16_F32(w, k0, n) _mm512_maskz_loadu_ps((__mmask16)moe__lanes(n), (const float *)(w) + (k0))
#define MOE__LOAD16_BF16(w, k0, n) \
    _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16((__mmask16)moe__lanes(n), (const uint16_t *)(w) + (k0))), 16))
#define MOE__LOAD16_Q8(w, k0, n) \
    _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8((__mmask16)moe__lanes(n), (const int8_t *)(w) + (k0)))), \
                  _mm512_set1_ps(sc[(k0) / MOE__QGROUP]))

/* out[r] = w . x[r] over K with four vector accumulators, for one weight encoding. */
#define MOE__DOT_ROWS(LOAD)                                                                           \
    for (r = 0; r < m; r++) {                                                                         \
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps(); \
        const float *xr = x[r];                                                                       \
        int64_t k0 = 0;                                                                               \
        for (; k0 + 64 <= K; k0 += 64) {                                                              \
            a0 = _mm512_fmadd_ps(LOAD(w, k0, 16), _mm512_loadu_ps(xr + k0), a0);                      \
            a1 = _mm512_fmadd_ps(LOAD(w, k0 + 16, 16), _mm512_loadu_ps(xr + k0 + 16), a1);            \
            a2 = _mm512_fmadd_ps(LOAD(w, k0 + 32, 16), _mm512_loadu_ps(xr + k0 + 32), a2);            \
            a3 = _mm512_fmadd_ps(LOAD(w, k0 + 48, 16), _mm512_loadu_ps(xr + k0 + 48), a3);            \
        }                                                                                             \
        for (; k0 < K; k0 += 16) {                                                                    \
            int64_t n = moe__min64(16, K - k0);                                                       \
            a0 = _mm512_fmadd_ps(LOAD(w, k0, n), _mm512_maskz_loadu_ps((__mmask16)moe__lanes(n), xr + k0), a0); \
        }                                                                                             \
        out[r] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));   \
    }

__attribute__((target("avx512f,avx512bw,avx512vl")))
static void moe__dot_rows_avx512(const moe__mat *W, int64_t j, const float *const *x, int m, int64_t K, float *out) {
    int r;
    if (W->bf16) {
        const uint16_t *w = W->bf16 + j * W->ld;
        MOE__DOT_ROWS(MOE__LOAD16_BF16)
    } else if (W->q8) {
        const int8_t *w = W->q8 + j * W->ld;
        const float *sc = W->scale + j * W->groups;
        MOE__DOT_ROWS(MOE__LOAD16_Q8)
    } else {
        const float *w = moe__row(W, j);
        MOE__DOT_ROWS(MOE__LOAD16_F32)
    }
}
#endif

static moe__kernel moe__kernel_make(moe__micro_fn micro, int mr, int nr, const char *name) {
    moe__kernel k;
    k.micro = micro; k.pack_t = moe__pack_t; k.swiglu = moe__swiglu_rows; k.swiglu_grad = moe__swiglu_grad_rows; k.dot = moe__dot_rows;
    k.mr = mr; k.nr = nr; k.name = name;
    return k;
}

static moe__kernel moe__kernel_generic(void) { return moe__kernel_make(moe__micro_generic, 4, 16, "generic"); }

/* The fastest kernel this CPU runs. */
static moe__kernel moe__kernel_select(void) {
#ifdef MOE__HAVE_X86_DISPATCH
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")) {
        moe__kernel k = moe__kernel_make(moe__micro_avx512, 12, 32, "avx512");
        k.pack_t = moe__pack_t_avx512;
        k.swiglu = moe__swiglu_avx512;
        k.swiglu_grad = moe__swiglu_grad_avx512;
        k.dot = moe__dot_rows_avx512;
        return k;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return moe__kernel_make(moe__micro_avx2, 6, 16, "avx2");
#endif
    return moe__kernel_generic();
}

static void moe__exec_init(moe__exec *ex, moe_ctx *ctx, float *scratch) {
    ex->ctx = ctx;
    ex->n_threads = ctx->n_threads;
    ex->scratch = scratch;
    ex->kernel = moe__kernel_select();
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
} moe__bank;

/* A unit of grouped work, one block of one product of one expert: rows r0..r1 and columns
   c0..c1 of its output. Forward and input-gradient tiles count rows in the bank's sorted rows;
   weight-gradient tiles count the linear's output rows. */
enum { MOE__TILE_FORWARD, MOE__TILE_INPUT_GRAD, MOE__TILE_WEIGHT_GRAD, MOE__TILE_DECODE };

typedef struct moe__tile {
    int32_t bank, expert, linear, kind;
    int64_t r0, r1, c0, c1;
    double cost;                /* flops: the schedule starts the largest tiles first */
} moe__tile;

#define MOE__TILE_ROWS 512      /* most rows per forward / input-gradient tile */
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
    int64_t embedding;          /* embedding layers: offset of "weight" [vocab_size, d_embedding] */
};

static int moe__flag(moe_flag f, int def) { return f == MOE_FLAG_DEFAULT ? def : f == MOE_FLAG_ON; }

static int moe__dims_ok(int64_t a) { return a > 0 && a <= ((int64_t)1 << 31); }

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
    if (!sigmoid) {
        if (d->routed_scaling_factor != 0.0f || d->n_groups != 0 || d->top_k_groups != 0 || d->bias_update_rate != 0.0f)
            return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: routed_scaling_factor, n_groups, top_k_groups and bias_update_rate belong to the sigmoid router", where);
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

/* Expert capacity for T tokens choosing k of E experts: ceil(cf * T * k / E), at least 1. */
static int64_t moe__capacity(float capacity_factor, int64_t T, int64_t k, int64_t E) {
    double c = ceil((double)capacity_factor * (double)T * (double)k / (double)E);
    return c < 1.0 ? 1 : c > (double)T ? T : (int64_t)c;  /* no expert gets more than T rows anyway */
}

/* Expert choice: tokens per expert, C = the capacity, at most T. */
static int64_t moe__expert_choice_tokens(const moe_layer_desc *d, int64_t T, int64_t k) {
    return moe__min64(T, moe__capacity(d->capacity_factor, T, k, d->n_experts));
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
        (int)d.router_bias < 0 || d.router_bias >= MOE_FLAG_COUNT)
        return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: a moe_flag field is out of range", where);
    if (d.kind == MOE_LAYER_DENSE) {
        if (d.activation == MOE_ACT_DEFAULT) d.activation = MOE_ACT_IDENTITY;
        d.bias = moe__flag(d.bias, 1) ? MOE_FLAG_ON : MOE_FLAG_OFF;
    }
    if (d.kind == MOE_LAYER_MOE) {
        if ((int)d.router < 0 || d.router >= MOE_ROUTER_COUNT)
            return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: unknown router %d", where, (int)d.router);
        if ((int)d.expert < 0 || d.expert >= MOE_EXPERT_COUNT)
            return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: unknown expert kind %d", where, (int)d.expert);
        if (d.router == MOE_ROUTER_DEFAULT) d.router = MOE_ROUTER_TOPK;
        if (d.expert == MOE_EXPERT_DEFAULT) d.expert = MOE_EXPERT_MLP;
        if (d.n_experts == 0) d.n_experts = 4;
        if (d.n_experts < 1 || d.n_experts > 65536)
            return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: n_experts %d out of range 1..65536", where, d.n_experts);
        if (d.router == MOE_ROUTER_SWITCH) {
            if (d.top_k != 0 && d.top_k != 1)
                return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: the switch router has top_k 1 (got %d)", where, d.top_k);
            d.top_k = 1;
        }
        if (d.top_k == 0) d.top_k = d.n_experts < 2 ? d.n_experts : 2;
        if (d.top_k < 1 || d.top_k > d.n_experts)
            return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: top_k %d must be in 1..n_experts (%d)", where, d.top_k, d.n_experts);
        if (d.d_hidden == 0) d.d_hidden = d.d_in;
        if (!moe__dims_ok(d.d_hidden))
            return moe__fail(ctx, MOE_ERR_SHAPE, "layer %d: d_hidden %lld out of range", where, (long long)d.d_hidden);
        if (d.expert == MOE_EXPERT_LINEAR) d.n_hidden_layers = 0;
        else if (d.expert == MOE_EXPERT_SWIGLU) d.n_hidden_layers = 1;
        else if (d.n_hidden_layers == 0) d.n_hidden_layers = 1;
        if (d.n_hidden_layers < 0 || d.n_hidden_layers > MOE__MAX_LINEARS - 1)
            return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: n_hidden_layers %d out of range 1..%d", where, d.n_hidden_layers, MOE__MAX_LINEARS - 1);
        /* linear experts have no activation and SwiGLU's is silu: the field is ignored for them */
        if (d.activation == MOE_ACT_DEFAULT) d.activation = MOE_ACT_RELU;
        if (d.expert == MOE_EXPERT_SWIGLU) d.activation = MOE_ACT_SILU;
        if (d.expert == MOE_EXPERT_LINEAR) d.activation = MOE_ACT_IDENTITY;
        d.bias = moe__flag(d.bias, d.expert != MOE_EXPERT_SWIGLU) ? MOE_FLAG_ON : MOE_FLAG_OFF;
        if (d.n_shared_experts < 0 || d.n_shared_experts > 64)
            return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: n_shared_experts %d out of range 0..64", where, d.n_shared_experts);
        if (d.d_shared_hidden == 0) d.d_shared_hidden = d.d_hidden;
        if (!moe__dims_ok(d.d_shared_hidden))
            return moe__fail(ctx, MOE_ERR_SHAPE, "layer %d: d_shared_hidden out of range", where);
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
        MOE__TRY(moe__router_resolve(ctx, &d, where));
    } else {
        /* fields of other kinds are not part of this layer */
        d.n_experts = 0; d.top_k = 0; d.router = MOE_ROUTER_DEFAULT; d.expert = MOE_EXPERT_DEFAULT;
        d.d_hidden = 0; d.n_hidden_layers = 0; d.n_shared_experts = 0; d.d_shared_hidden = 0;
        d.renormalize = MOE_FLAG_DEFAULT; d.router_bias = MOE_FLAG_DEFAULT; d.capacity_factor = 0.0f;
        d.jitter = 0.0f; d.balance_loss = d.z_loss = d.importance_loss = d.load_loss = 0.0f;
        d.max_top_k = 0; d.routed_scaling_factor = 0.0f; d.n_groups = 0; d.top_k_groups = 0; d.bias_update_rate = 0.0f; d.hash_seed = 0;
        if (d.kind != MOE_LAYER_DENSE) { d.activation = MOE_ACT_DEFAULT; d.bias = MOE_FLAG_DEFAULT; }
    }
    if (d.kind != MOE_LAYER_RMSNORM && d.kind != MOE_LAYER_LAYERNORM) d.eps = 0.0f;
    {   /* parameter counts far beyond any machine would overflow the offsets: refuse them here */
        double w = (double)moe__max64(moe__max64(d.d_in, d.d_out), moe__max64(d.d_hidden, d.d_shared_hidden));
        double est = d.kind == MOE_LAYER_MOE ? (double)(d.n_experts + d.n_shared_experts + 1) * (double)(d.n_hidden_layers + 3) * w * w
                   : d.kind == MOE_LAYER_EMBEDDING ? (double)d.vocab_size * (double)d.d_embedding
                                             : (double)d.d_in * (double)d.d_out + 2.0 * w;
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

static void moe__bank_plan(moe_layer *l, moe__bank *b, const char *prefix, int n, int64_t hidden, int64_t max_rows) {
    const moe_layer_desc *d = &l->d;
    char name[MOE__NAME_MAX];
    int j, bias = d->bias == MOE_FLAG_ON;
    memset(b, 0, sizeof *b);
    b->n = n;
    b->kind = d->expert;
    b->act = d->activation;
    b->d_in = d->d_in;
    b->d_hidden = hidden;
    b->d_out = d->d_out;
    b->max_rows = max_rows;
    if (d->expert == MOE_EXPERT_SWIGLU) {
        b->n_linears = 3;
        snprintf(name, sizeof name, "%s.w1", prefix);
        b->lin[0] = moe__add_linear(l, name, n, d->d_in, hidden, bias, MOE__INIT_UNIFORM);
        snprintf(name, sizeof name, "%s.w3", prefix);
        b->lin[1] = moe__add_linear(l, name, n, d->d_in, hidden, bias, MOE__INIT_UNIFORM);
        snprintf(name, sizeof name, "%s.w2", prefix);
        b->lin[2] = moe__add_linear(l, name, n, hidden, d->d_out, bias, MOE__INIT_UNIFORM);
        b->lin[2].input = 0;
    } else {
        int L = d->n_hidden_layers;
        b->n_linears = L + 1;
        for (j = 0; j <= L; j++) {
            int64_t in = j == 0 ? d->d_in : hidden, out = j == L ? d->d_out : hidden;
            snprintf(name, sizeof name, "%s.fc%d", prefix, j);
            b->lin[j] = moe__add_linear(l, name, n, in, out, bias, MOE__INIT_UNIFORM);
            b->lin[j].input = j - 1;
        }
    }
}

/* Tensors, parameter count and weight-gradient tiles; called once the desc is resolved. */
static void moe__layer_plan(moe_layer *l) {
    const moe_layer_desc *d = &l->d;
    l->n_tensors = 0;
    l->n_params = 0;
    l->n_banks = 0;
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
        if (d->router != MOE_ROUTER_HASH)
            l->router = moe__add_linear(l, "router", 0, d->d_in, d->n_experts, d->router_bias == MOE_FLAG_ON, MOE__INIT_ZEROS);
        l->selection_bias = d->router == MOE_ROUTER_SIGMOID ? moe__add_tensor(l, "router.selection_bias", 1, d->n_experts, 0, 0, MOE__INIT_ZEROS, 0.0f) : -1;
        if (d->router == MOE_ROUTER_EXPERT_CHOICE) rows = d->n_experts * moe__expert_choice_tokens(d, T, d->max_top_k);
        if (d->router == MOE_ROUTER_NOISY_TOPK) {
            l->noise.in = d->d_in; l->noise.out = d->n_experts; l->noise.b = -1; l->noise.input = -1;
            l->noise.w = moe__add_tensor(l, "router.noise_weight", 2, d->n_experts, d->d_in, 0, MOE__INIT_ZEROS, 0.0f);
        }
        moe__bank_plan(l, &l->bank[0], "experts", d->n_experts, d->d_hidden, rows);
        l->n_banks = 1;
        if (d->n_shared_experts > 0) {
            moe__bank_plan(l, &l->bank[1], "shared", d->n_shared_experts, d->d_shared_hidden, T * d->n_shared_experts);
            l->n_banks = 2;
        }
        break;
    }
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

/* Assign every activation buffer for max_tokens. Called with NULL bases to size. */
static void moe__layer_carve(moe_layer *l, moe__carver *saved, moe__carver *scratch) {
    const moe_layer_desc *d = &l->d;
    int64_t T = l->max_tokens;
    int b, j;
    switch (d->kind) {
    case MOE_LAYER_DENSE:
        l->z = MOE__CARVE(saved, float, T * d->d_out);
        l->dz_dense = MOE__CARVE(scratch, float, T * d->d_out);
        break;
    case MOE_LAYER_RMSNORM:
    case MOE_LAYER_LAYERNORM:
        l->mean = MOE__CARVE(saved, float, T);
        l->rstd = MOE__CARVE(saved, float, T);
        break;
    case MOE_LAYER_MOE: {
        int64_t E = d->n_experts, K = d->router == MOE_ROUTER_EXPERT_CHOICE ? E : d->max_top_k, D = d->d_in;
        int noisy = d->router == MOE_ROUTER_NOISY_TOPK, sigmoid = d->router == MOE_ROUTER_SIGMOID;
        l->key = sigmoid ? MOE__CARVE(saved, float, T * E) : NULL;
        l->group_score = sigmoid && d->n_groups > 1 ? MOE__CARVE(saved, float, T * d->n_groups) : NULL;
        l->group_sel = sigmoid && d->n_groups > 1 ? MOE__CARVE(saved, int32_t, T * d->n_groups) : NULL;
        l->bias_keep = sigmoid ? MOE__CARVE(saved, float, E) : NULL;
        l->xr = d->jitter > 0.0f ? MOE__CARVE(saved, float, T * D) : NULL;
        l->clean = MOE__CARVE(saved, float, T * E);
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
        l->max_tiles = moe__max_tiles(l);
        l->tiles = MOE__CARVE(saved, moe__tile, l->max_tiles);
        for (b = 0; b < l->n_banks; b++) {
            moe__bank *k = &l->bank[b];
            int64_t R = k->max_rows;
            k->offsets = MOE__CARVE(saved, int64_t, k->n + 1);
            k->row_token = MOE__CARVE(saved, int32_t, R);
            if (k->kind == MOE_EXPERT_SWIGLU) {
                k->z[0] = MOE__CARVE(saved, float, R * k->d_hidden);   /* x W1^T + b1 */
                k->z[1] = MOE__CARVE(saved, float, R * k->d_hidden);   /* x W3^T + b3 */
                k->a[0] = MOE__CARVE(saved, float, R * k->d_hidden);   /* silu(z0) * z1 */
            } else {
                for (j = 0; j + 1 < k->n_linears; j++) {
                    k->z[j] = MOE__CARVE(saved, float, R * k->d_hidden);
                    k->a[j] = MOE__CARVE(saved, float, R * k->d_hidden);
                }
            }
            k->out = MOE__CARVE(saved, float, R * k->d_out);
            for (j = 0; j < k->n_linears; j++) k->dz[j] = MOE__CARVE(scratch, float, R * k->lin[j].out);
            k->da = k->kind == MOE_EXPERT_SWIGLU ? MOE__CARVE(scratch, float, R * k->d_hidden) : NULL;
            k->dxr = MOE__CARVE(scratch, float, R * k->d_in);
        }
        l->dgate = MOE__CARVE(scratch, float, T * K);
        l->dh = MOE__CARVE(scratch, float, T * E);
        l->dclean = noisy ? MOE__CARVE(scratch, float, T * E) : l->dh;
        l->dstd = noisy ? MOE__CARVE(scratch, float, T * E) : NULL;
        l->dxu = MOE__CARVE(scratch, float, T * D);
        l->dimportance = MOE__CARVE(scratch, float, E);
        l->dload = MOE__CARVE(scratch, float, E);
        break;
    }
    default: break;
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
static float *moe__g(const moe_layer *l, int64_t off) { return l->grads + off; }

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

// >>routing -----------------------------------------------------------------
/* Order of experts for selection: larger h first, ties to the lower index; NaN sorts last. */
static int moe__before(const float *h, int32_t a, int32_t b) {
    float ha = h[a] == h[a] ? h[a] : -FLT_MAX, hb = h[b] == h[b] ? h[b] : -FLT_MAX;
    return ha > hb || (ha == hb && a < b);
}

/* idx[0..n) = the first n experts in that order. O(n E), no scratch. */
static void moe__top_n(const float *h, int64_t E, int n, int32_t *idx) {
    int s;
    int32_t e;
    for (s = 0; s < n; s++) {
        int32_t best = -1;
        for (e = 0; e < (int32_t)E; e++) {
            if (s > 0 && !moe__before(h, idx[s - 1], e)) continue;
            if (best < 0 || moe__before(h, e, best)) best = e;
        }
        idx[s] = best;
    }
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

/* Router scores, the k chosen experts of token t (unused slots: -1) and their gates. */
static void moe__route_token(moe_layer *l, int64_t t) {
    const moe_layer_desc *d = &l->d;
    int64_t E = d->n_experts, e;
    int K = l->call_k, s, n = K;
    const float *h = l->h + t * E, *p = l->p + t * E;
    float *gate = l->gate + t * l->slots;
    int32_t *sel = l->sel + t * l->slots;
    if (d->router == MOE_ROUTER_EXPERT_CHOICE) { moe__route_softmax(l, t); return; }  /* experts choose in dispatch */
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
    if (d->renormalize == MOE_FLAG_ON) {
        float m = h[sel[0]], sum = 0.0f;
        for (s = 0; s < n; s++) { gate[s] = expf(h[sel[s]] - m); sum += gate[s]; }
        for (s = 0; s < n; s++) gate[s] /= sum;
    } else {
        for (s = 0; s < n; s++) gate[s] = p[sel[s]];
    }
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
            sum += ((double)l->chosen[e] / (double)(T * K)) * (P / (double)T);
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

/* Forward stages: SwiGLU w1 paired with w3, then w2; MLP one stage per linear. */
static int moe__bank_stages(const moe__bank *b) { return b->kind == MOE_EXPERT_SWIGLU ? 2 : b->n_linears; }
static int moe__stage_linear(const moe__bank *b, int s) { return b->kind == MOE_EXPERT_SWIGLU && s == 1 ? 2 : s; }

/* Forward stage s for rows r0..r1 of expert e (the product's rows count from r0). */
static moe__gemm moe__forward_gemm(const moe_layer *l, const moe__bank *b, int64_t e, int s, int64_t r0, int64_t r1, const float *x) {
    const moe__linear *lin = &b->lin[moe__stage_linear(b, s)];
    int64_t H = b->d_hidden;
    int last = s == moe__bank_stages(b) - 1;
    moe__gemm g = moe__gemm_make(MOE__NT, r1 - r0, lin->out, lin->in, moe__bank_in(b, lin, x, r0),
                                 moe__expert_weights(l, b, moe__stage_linear(b, s), e), last ? b->out + r0 * b->d_out : b->z[s] + r0 * H,
                                 lin->out, 0, moe__expert_b(l, lin, e));
    if (last) return g;
    if (b->kind == MOE_EXPERT_SWIGLU) {
        g.pair = 1;
        g.B2 = moe__expert_weights(l, b, 1, e);
        g.C2 = b->z[1] + r0 * H;
        g.bias2 = moe__expert_b(l, &b->lin[1], e);
        g.epi = MOE__EPI_SWIGLU;
    } else {
        g.epi = MOE__EPI_ACT;
        g.act = b->act;
    }
    g.out0 = b->a[s] + r0 * H;
    return g;
}

/* Backward steps: SwiGLU w2, then w1 and w3 together; MLP one step per linear, last first. */
static int moe__bank_back_steps(const moe__bank *b) { return moe__bank_stages(b); }
static int moe__back_linear(const moe__bank *b, int q) { return b->kind == MOE_EXPERT_SWIGLU ? (q == 0 ? 2 : 0) : b->n_linears - 1 - q; }

/* Gradient at the input of linear j for rows r0..r1 of expert e: dz[j] W_j, then through the
   previous activation (SwiGLU w2: into dz1, dz3); for j = 0 into dxr (second: the w3 half). */
static moe__gemm moe__input_grad_gemm(const moe_layer *l, const moe__bank *b, int64_t e, int j, int second, int64_t r0, int64_t r1) {
    const moe__linear *lin = &b->lin[second ? 1 : j];
    int64_t H = b->d_hidden, ldz = lin->out;
    moe__gemm g = moe__gemm_make(MOE__NN, r1 - r0, lin->in, lin->out, moe__mat_of(b->dz[second ? 1 : j] + r0 * ldz, ldz),
                                 moe__mat_of(moe__expert_w(l, lin, e), lin->in), NULL, lin->in, second, NULL);
    if (b->kind == MOE_EXPERT_SWIGLU && j == 2) {
        g.C = b->da + r0 * H;
        g.epi = MOE__EPI_SWIGLU_GRAD;
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

static void moe__decode_tile(const moe_layer *l, const moe__tile *t, const float *x);

static void moe__run_tile(const moe_layer *l, const moe__tile *t, const float *x) {
    const moe__bank *b = &l->bank[t->bank];
    moe__gemm g;
    switch (t->kind) {
    case MOE__TILE_FORWARD:
        g = moe__forward_gemm(l, b, t->expert, t->linear, t->r0, t->r1, x);
        moe__gemm_block(&l->ex, &g, 0, t->r1 - t->r0, t->c0, t->c1);
        break;
    case MOE__TILE_INPUT_GRAD:
        g = moe__input_grad_gemm(l, b, t->expert, t->linear, 0, t->r0, t->r1);
        moe__gemm_block(&l->ex, &g, 0, t->r1 - t->r0, t->c0, t->c1);
        if (b->kind == MOE_EXPERT_SWIGLU && t->linear == 0) {
            g = moe__input_grad_gemm(l, b, t->expert, 0, 1, t->r0, t->r1);
            moe__gemm_block(&l->ex, &g, 0, t->r1 - t->r0, t->c0, t->c1);
        }
        break;
    case MOE__TILE_WEIGHT_GRAD:
        moe__weight_grad_tile(l, b, t, x);
        break;
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

/* Rows of every expert of bank b in chunks of `rows`, times column blocks of `cols`. */
static void moe__plan_rows(moe_layer *l, int b, int j, int kind, int64_t N, int64_t cols, double depth, int64_t rows) {
    const moe__bank *k = &l->bank[b];
    int64_t e, r, c;
    for (e = 0; e < k->n; e++)
        for (r = k->offsets[e]; r < k->offsets[e + 1]; r += rows)
            for (c = 0; c < N; c += cols)
                moe__add_tile(l, b, e, j, kind, r, moe__min64(r + rows, k->offsets[e + 1]), c, moe__min64(c + cols, N), depth);
}

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

static int moe__tile_cmp(const void *pa, const void *pb) {
    const moe__tile *a = (const moe__tile *)pa, *b = (const moe__tile *)pb;
    if (a->cost != b->cost) return a->cost > b->cost ? -1 : 1;
    if (a->bank != b->bank) return a->bank - b->bank;
    if (a->expert != b->expert) return a->expert - b->expert;
    if (a->linear != b->linear) return a->linear - b->linear;
    if (a->kind != b->kind) return a->kind - b->kind;
    if (a->r0 != b->r0) return a->r0 < b->r0 ? -1 : 1;
    return a->c0 < b->c0 ? -1 : a->c0 > b->c0;
}

/* The tiles of one step over all experts (forward stage, or backward step with want_dx),
   rows split finer while there are too few tiles to keep every thread busy, the largest first. */
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
                int pair = k->kind == MOE_EXPERT_SWIGLU && q == 0;
                moe__plan_rows(l, b, q, MOE__TILE_FORWARD, lin->out, pair ? MOE__NB / 2 : MOE__NB,
                               (double)lin->in * (pair ? 2.0 : 1.0), rows);
            } else {
                int j = moe__back_linear(k, q), two = k->kind == MOE_EXPERT_SWIGLU && j == 0;
                if (j > 0 || want_dx)
                    moe__plan_rows(l, b, j, MOE__TILE_INPUT_GRAD, k->lin[j].in, MOE__NB, (double)k->lin[j].out * (two ? 2.0 : 1.0), rows);
                moe__plan_weights(l, b, j);
                if (two) moe__plan_weights(l, b, 1);
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
    int s = t->linear, j = moe__stage_linear(b, s), last = s == moe__bank_stages(b) - 1, pair = b->kind == MOE_EXPERT_SWIGLU && s == 0;
    const moe__linear *lin = &b->lin[j];
    int64_t e = t->expert, r0 = b->offsets[e], H = b->d_hidden, o, ld = lin->out;
    int m = (int)(b->offsets[e + 1] - r0), r;
    const float *in[MOE__DECODE_TOKENS];
    const float *bias = moe__expert_b(l, lin, e), *bias2 = pair ? moe__expert_b(l, &b->lin[1], e) : NULL;
    moe__mat W = moe__expert_weights(l, b, j, e), W2 = pair ? moe__expert_weights(l, b, 1, e) : W;
    float v[MOE__DECODE_TOKENS], v2[MOE__DECODE_TOKENS];
    float *dst = last ? b->out + r0 * b->d_out : b->z[s] + r0 * H;
    for (r = 0; r < m; r++) {
        moe__mat a = moe__bank_in(b, lin, x, r0);
        in[r] = moe__row(&a, r);
    }
    for (o = t->c0; o < t->c1; o++) {
        l->ex.kernel.dot(&W, o, in, m, lin->in, v);
        if (pair) l->ex.kernel.dot(&W2, o, in, m, lin->in, v2);
        for (r = 0; r < m; r++) {
            float z = v[r] + (bias ? bias[o] : 0.0f);
            dst[r * ld + o] = z;
            if (pair) {
                float z3 = v2[r] + (bias2 ? bias2[o] : 0.0f);
                b->z[1][(r0 + r) * H + o] = z3;
                b->a[0][(r0 + r) * H + o] = z * moe__sigmoid(z) * z3;
            } else if (!last) {
                b->a[s][(r0 + r) * H + o] = moe__act(b->act, z);
            }
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

/* Run the planned tiles over the threads; each writes only its own block. */
static void moe__run_step(moe_layer *l, double work, const float *x) {
    int64_t i;
    (void)work;
    MOE__PARALLEL_FOR_DYNAMIC(l->ex.n_threads, work)
    for (i = 0; i < l->n_tiles; i++) moe__run_tile(l, &l->tiles[i], x);
}

static void moe__moe_forward(moe_layer *l, const float *x, int64_t T, float *y, const float *noise) {
    const moe_layer_desc *d = &l->d;
    int64_t E = d->n_experts, K = l->slots, D = d->d_in, O = d->d_out, t, i;
    int q;
    int noisy = d->router == MOE_ROUTER_NOISY_TOPK;
    const float *u = x;
    moe__gemm g;
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
    l->u = u;
    /* 2-3. softmax, top-k, gates */
    MOE__PARALLEL_FOR(l->ex.n_threads, (double)T * (double)E * (double)(K + 20))
    for (t = 0; t < T; t++) moe__route_token(l, t);
    /* 4. capacity and the permutation */
    moe__dispatch(l, T);
    moe__aux_forward(l, T);
    /* 5. every expert's rows, stage by stage, in tiles over all experts */
    for (q = 0; q < moe__bank_stages(&l->bank[0]); q++)
        moe__run_step(l, moe__use_decode(l, T) ? moe__plan_decode(l, q) : moe__plan_step(l, 0, q, 0), x);
    /* 6. combine in slot order, then shared experts */
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
            for (j = 0; j < O; j++) yt[j] += gw * o[j];
        }
        if (l->n_banks > 1)
            for (q = 0; q < l->bank[1].n; q++) {
                const float *o = l->bank[1].out + (q * T + t) * O;
                for (j = 0; j < O; j++) yt[j] += o[j];
            }
    }
}

// >>moe_backward ------------------------------------------------------------
/* dh for token t: through the gates, the softmax and (with aux) the auxiliary losses. */
static void moe__router_backward_token(moe_layer *l, int64_t t, int aux, float bal_scale) {
    const moe_layer_desc *d = &l->d;
    int64_t E = d->n_experts, K = l->slots, e, s;
    const float *p = l->p + t * E;
    const float *gate = l->gate + t * K, *dg = l->dgate + t * K;
    const int32_t *sel = l->sel + t * K;
    float *dh = l->dh + t * E;
    float dot = 0.0f;
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
        float gs = 0.0f;
        for (s = 0; s < K; s++) gs += gate[s] * dg[s];
        for (s = 0; s < K; s++)
            if (sel[s] >= 0) dh[sel[s]] += gate[s] * (dg[s] - gs);
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

static void moe__moe_backward(moe_layer *l, const float *dy, float *dx, int flags) {
    const moe_layer_desc *d = &l->d;
    int64_t T = l->T, E = d->n_experts, K = l->slots, D = d->d_in, O = d->d_out, t, i;
    int aux = (flags & MOE_BACKWARD_AUX) != 0, noisy = d->router == MOE_ROUTER_NOISY_TOPK, routed = l->router.w >= 0, q;
    moe__bank *rb = &l->bank[0];
    float bal_scale = d->balance_loss * (float)E / ((float)(T * l->call_k) * (float)T);
    moe__gemm g;
    /* gradients at the gates and at the expert outputs */
    MOE__PARALLEL_FOR(l->ex.n_threads, (double)T * (double)O * (double)(2 * K + 1))
    for (t = 0; t < T; t++) {
        const float *dyt = dy + t * O;
        int64_t s, j, q;
        for (s = 0; s < K; s++) {
            int32_t r = l->pos[t * K + s];
            float acc = 0.0f, gw = l->gate[t * K + s];
            float *dout;
            const float *o;
            if (r < 0) { l->dgate[t * K + s] = 0.0f; continue; }
            o = rb->out + (int64_t)r * O;
            dout = rb->dz[rb->n_linears - 1] + (int64_t)r * O;
            for (j = 0; j < O; j++) { acc += dyt[j] * o[j]; dout[j] = gw * dyt[j]; }
            l->dgate[t * K + s] = acc;
        }
        if (l->n_banks > 1)
            for (q = 0; q < l->bank[1].n; q++)
                memcpy(l->bank[1].dz[l->bank[1].n_linears - 1] + (q * T + t) * O, dyt, (size_t)O * sizeof(float));
    }
    if (aux && d->importance_loss > 0.0f) {
        moe__cv2(l->importance, E, l->dimportance);
        for (i = 0; i < T * K; i++)
            if (l->sel[i] >= 0) l->dgate[i] += d->importance_loss * l->dimportance[l->sel[i]];
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
    {
        uint64_t stream = moe__stream(MOE__STREAM_JITTER, l->index, l->forward_step);
        int jitter = l->u != l->x;
        MOE__PARALLEL_FOR(l->ex.n_threads, (double)T * (double)D * (double)(K + 3))
        for (t = 0; t < T; t++) {
            float *dxt = dx + t * D;
            const float *dyt = dy + t * O;
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
                }
            for (j = 0; j < D; j++) {
                float v = l->dxu[t * D + j];
                if (jitter) v *= 1.0f - d->jitter + 2.0f * d->jitter * moe_rng_uniform(l->ctx->seed, stream, (uint64_t)(t * D + j));
                dxt[j] += v;
            }
        }
    }
}

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
    if (d->router == MOE_ROUTER_HASH && !(o && o->token_ids))
        return moe__fail(l->ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d: the hash router needs moe_forward_opts.token_ids", l->index);
    return MOE_OK;
}

static void moe__layer_forward_impl(moe_layer *l, const float *x, int64_t T, float *y, int training, const float *noise,
                                    const moe_forward_opts *o) {
    l->call_k = o && o->top_k ? o->top_k : l->d.top_k;
    l->call_top_p = o ? o->top_p : 0.0f;
    l->token_ids = o ? o->token_ids : NULL;
    l->slots = l->d.router == MOE_ROUTER_EXPERT_CHOICE ? l->d.n_experts : l->call_k;
    l->x = x;
    l->y = y;
    l->T = T;
    l->training = training;
    l->forward_step = l->noise_step;
    l->u = x;
    switch (l->d.kind) {
    case MOE_LAYER_DENSE: moe__dense_forward(l, x, T, y); break;
    case MOE_LAYER_RMSNORM:
    case MOE_LAYER_LAYERNORM: moe__norm_forward(l, x, T, y); break;
    case MOE_LAYER_MOE: moe__moe_forward(l, x, T, y, noise); break;
    case MOE_LAYER_EMBEDDING: moe__embedding_forward(l, x, T, y); break;
    default: break;
    }
    if (training) l->noise_step++;
    l->has_forward = 1;
}

static void moe__layer_backward_impl(moe_layer *l, const float *dy, float *dx, int flags) {
    switch (l->d.kind) {
    case MOE_LAYER_DENSE: moe__dense_backward(l, dy, dx); break;
    case MOE_LAYER_RMSNORM:
    case MOE_LAYER_LAYERNORM: moe__norm_backward(l, dy, dx); break;
    case MOE_LAYER_MOE: moe__moe_backward(l, dy, dx, flags); break;
    case MOE_LAYER_EMBEDDING: moe__embedding_backward(l, dy, dx); break;
    default: break;
    }
}

static moe_result moe__check_tokens(moe_ctx *ctx, int64_t T, int64_t max_tokens) {
    if (T < 1) return moe__fail(ctx, MOE_ERR_SHAPE, "n_tokens is %lld; it must be at least 1", (long long)T);
    if (T > max_tokens)
        return moe__fail(ctx, MOE_ERR_TOO_MANY_TOKENS, "n_tokens %lld exceeds max_tokens %lld", (long long)T, (long long)max_tokens);
    return MOE_OK;
}

/* Sizes of one layer's memory for its resolved desc and max_tokens. */
static moe_result moe__layer_sizes(moe_layer *l, size_t *saved, size_t *scratch) {
    moe__carver a = {NULL, 0, 0}, b = {NULL, 0, 0};
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
    total = 2 * pbytes + saved + scratch + (size_t)ctx->n_threads * MOE__GEMM_SCRATCH * sizeof(float);
    block = (char *)moe__malloc(ctx, total);
    if (!block) { moe__free(ctx, l); return moe__fail(ctx, MOE_ERR_OUT_OF_MEMORY, "layer memory (%zu bytes)", total); }
    l->own = block;
    l->params = (float *)block;
    l->grads = (float *)(block + pbytes);
    a.base = block + 2 * pbytes; a.used = 0; a.overflow = 0;
    b.base = block + 2 * pbytes + saved; b.used = 0; b.overflow = 0;
    moe__layer_carve(l, &a, &b);
    moe__exec_init(&l->ex, ctx, (float *)(block + 2 * pbytes + saved + scratch));
    memset(l->params, 0, 2 * pbytes);  /* the padding between tensors too */
    moe__layer_init_params(l, 0);
    *out = l;
    return MOE_OK;
}

static void moe__layer_drop_quant(moe_layer *l);

MOEDEF void moe_layer_destroy(moe_layer *layer) {
    if (!layer) return;
    moe__layer_drop_quant(layer);
    moe__free(layer->ctx, layer->own);
    moe__free(layer->ctx, layer);
}

/* Reduced-precision weights serve inference only. */
static moe_result moe__check_trainable(const moe_layer *l) {
    if (l->wdtype == MOE_DTYPE_F32) return MOE_OK;
    return moe__fail(l->ctx, MOE_ERR_STATE, "layer %d holds reduced-precision weights (inference only); moe_layer_quantize(layer, MOE_DTYPE_F32) restores training", l->index);
}

MOEDEF moe_result moe_layer_forward(moe_layer *l, const float *x, int64_t n_tokens, float *y, const moe_forward_opts *opts) {
    if (!l) return MOE_ERR_INVALID_ARGUMENT;
    if (!x || !y) return moe__fail(l->ctx, MOE_ERR_INVALID_ARGUMENT, "x and y must not be NULL");
    MOE__TRY(moe__check_tokens(l->ctx, n_tokens, l->max_tokens));
    if (!moe__all_finite(x, n_tokens * l->d.d_in)) return moe__fail(l->ctx, MOE_ERR_NONFINITE, "x holds NaN or Inf");
    if (l->d.kind == MOE_LAYER_EMBEDDING) MOE__TRY(moe__embedding_check(l, x, n_tokens));
    if (opts && opts->training) MOE__TRY(moe__check_trainable(l));
    MOE__TRY(moe__call_check(l, opts));
    moe__layer_forward_impl(l, x, n_tokens, y, opts && opts->training,
                            opts && opts->router_noise ? opts->router_noise[0] : NULL, opts);
    return MOE_OK;
}

MOEDEF moe_result moe_layer_backward(moe_layer *l, const float *dy, float *dx, int flags) {
    if (!l) return MOE_ERR_INVALID_ARGUMENT;
    if (!l->has_forward) return moe__fail(l->ctx, MOE_ERR_STATE, "backward before any forward");
    if (!dy) return moe__fail(l->ctx, MOE_ERR_INVALID_ARGUMENT, "dy is NULL");
    MOE__TRY(moe__check_trainable(l));
    moe__layer_backward_impl(l, dy, dx, flags);
    return MOE_OK;
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

MOEDEF float *moe_layer_grads(moe_layer *layer, int64_t *n_params) {
    if (n_params) *n_params = layer ? layer->n_params : 0;
    return layer ? layer->grads : NULL;
}

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
    t->grad = l->grads + td->offset;
}

MOEDEF moe_result moe_layer_tensor(moe_layer *layer, int index, moe_tensor *tensor) {
    if (!layer || !tensor) return MOE_ERR_INVALID_ARGUMENT;
    if (index < 0 || index >= layer->n_tensors) return moe__fail(layer->ctx, MOE_ERR_INVALID_ARGUMENT, "tensor index %d out of range", index);
    moe__tensor_view(layer, index, layer->tensors[index].name, tensor);
    return MOE_OK;
}

// >>loss --------------------------------------------------------------------
/* Task loss of y [T, C] against target; dy (may be NULL) gets dLoss/dy. Per-token losses go
   to tok[T] and are summed in order. */
static moe_result moe__loss(moe_ctx *ctx, const moe__exec *ex, moe_loss kind, const float *y, int64_t T, int64_t C,
                            const moe_target *target, float *tok, float *dy, float *loss) {
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
        const float *yt = y + t * C;
        float *dyt = dy ? dy + t * C : NULL;
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
                for (c = 0; c < C; c++) dyt[c] = (expf(yt[c] - lse) - (c == label ? 1.0f : 0.0f)) / (float)T;
        } else {
            const float *tv = target->values + t * C;
            float scale = 1.0f / ((float)T * (float)C);
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

// >>optimizer ---------------------------------------------------------------
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
    moe_optimizer *opt;
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
    int32_t *token_ids;         /* [max_tokens] ids for hash routers taken from an embedding input */
};

MOEDEF void moe_model_destroy(moe_model *m) {
    moe_ctx *ctx;
    int i;
    if (!m) return;
    ctx = m->ctx;
    for (i = 0; m->layers && i < m->n_layers; i++) moe__layer_drop_quant(&m->layers[i]);
    moe_optimizer_destroy(m->opt);
    moe__free(ctx, m->arena);
    moe__free(ctx, m->params);
    moe__free(ctx, m->tensors);
    moe__free(ctx, m->outs);
    moe__free(ctx, m->layers);
    moe__free(ctx, m->layer_descs);
    moe__free(ctx, m);
}

static moe_result moe__model_resolve(moe_ctx *ctx, const moe_model_desc *in, moe_model_desc *out) {
    moe_model_desc d = *in;
    if (d.n_layers < 1 || d.n_layers > 4096 || !d.layers)
        return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "a model needs 1..4096 layers (n_layers %d)", d.n_layers);
    if (!moe__dims_ok(d.d_in)) return moe__fail(ctx, MOE_ERR_SHAPE, "d_in %lld out of range", (long long)d.d_in);
    if ((int)d.loss < 0 || d.loss >= MOE_LOSS_COUNT) return moe__fail(ctx, MOE_ERR_INVALID_ARGUMENT, "unknown loss %d", (int)d.loss);
    if (d.loss == MOE_LOSS_DEFAULT) d.loss = MOE_LOSS_CROSS_ENTROPY;
    MOE__TRY(moe__check_max_tokens(ctx, &d.max_tokens));
    MOE__TRY(moe__optimizer_resolve(ctx, &d.optimizer, &d.optimizer));
    *out = d;
    return MOE_OK;
}

MOEDEF moe_result moe_model_create(moe_ctx *ctx, const moe_model_desc *desc, moe_model **out) {
    moe_model *m;
    moe_model_desc d;
    int i, t, nt = 0;
    int64_t prev, widest, T, stream = 0;
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
        prev = l->d.d_out;
        widest = moe__max64(widest, prev);
    }
    d.layers = m->layer_descs;
    m->desc = d;
    /* the activation arena: saved activations | shared scratch | outputs and model buffers */
    {
        moe__carver rest;
        int pass;
        block = NULL;
        for (pass = 0; pass < 2; pass++) {
            rest.base = block ? block + saved + scratch : NULL; rest.used = 0; rest.overflow = 0;
            for (i = 0; i < d.n_layers; i++) m->outs[i] = MOE__CARVE(&rest, float, T * m->layers[i].d.d_out);
            m->dbuf[0] = MOE__CARVE(&rest, float, T * widest);
            m->dbuf[1] = MOE__CARVE(&rest, float, T * widest);
            m->dloss = MOE__CARVE(&rest, float, T * prev);
            m->tok = MOE__CARVE(&rest, float, T);
            m->token_ids = MOE__CARVE(&rest, int32_t, T);
            m->ex.scratch = MOE__CARVE(&rest, float, (size_t)ctx->n_threads * MOE__GEMM_SCRATCH);
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
    /* parameters and gradients: one blob of 2 * n_params floats */
    m->params = (float *)moe__calloc(ctx, (size_t)m->n_params * 2 * sizeof(float) + MOE__ALIGN);
    m->tensors = (moe__model_tensor *)moe__calloc(ctx, sizeof(moe__model_tensor) * (size_t)(nt + 1));
    if (!m->params || !m->tensors) { r = moe__fail(ctx, MOE_ERR_OUT_OF_MEMORY, "parameters (%lld floats)", (long long)m->n_params); goto fail; }
    m->grads = m->params + m->n_params;
    sv.base = block; sv.used = 0; sv.overflow = 0;
    sc.base = block + saved; sc.used = 0; sc.overflow = 0;
    moe__exec_init(&m->ex, ctx, m->ex.scratch);
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
                snprintf(head, sizeof head, "layers.%d.", i);
                moe__concat(mt->name, sizeof mt->name, head, l->tensors[t].name, "");
                mt->layer = i;
                mt->index = t;
            }
            off += l->n_params;
        }
    }
    r = moe_optimizer_create(ctx, &d.optimizer, m->n_params, &m->opt);
    if (r != MOE_OK) goto fail;
    *out = m;
    return MOE_OK;
fail:
    moe_model_destroy(m);
    return r;
}

MOEDEF const moe_model_desc *moe_model_get_desc(const moe_model *model) { return model ? &model->desc : NULL; }

MOEDEF int64_t moe_model_d_out(const moe_model *model) {
    return model ? model->layers[model->n_layers - 1].d.d_out : 0;
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

MOEDEF moe_result moe_model_loss(moe_model *m, const moe_target *target, float *loss, float *dy) {
    float l = 0.0f;
    if (!m) return MOE_ERR_INVALID_ARGUMENT;
    if (!m->has_forward) return moe__fail(m->ctx, MOE_ERR_STATE, "loss before any forward");
    MOE__TRY(moe__loss(m->ctx, &m->ex, m->desc.loss, m->outs[m->n_layers - 1], m->T, moe_model_d_out(m), target, m->tok, dy, &l));
    if (loss) *loss = l;
    return MOE_OK;
}

MOEDEF moe_result moe_model_backward(moe_model *m, const float *dy, float *dx, int flags) {
    int i;
    if (!m) return MOE_ERR_INVALID_ARGUMENT;
    if (!m->has_forward) return moe__fail(m->ctx, MOE_ERR_STATE, "backward before any forward");
    if (!dy) return moe__fail(m->ctx, MOE_ERR_INVALID_ARGUMENT, "dy is NULL");
    for (i = 0; i < m->n_layers; i++) MOE__TRY(moe__check_trainable(&m->layers[i]));
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
    if (!moe__finite(loss) || !moe__finite(aux)) {
        if (info) *info = si;
        return moe__model_refuse_step(m, moe__fail(m->ctx, MOE_ERR_NONFINITE, "loss is not finite (loss %g, aux %g); parameters unchanged", (double)loss, (double)aux));
    }
    moe_model_zero_grad(m);
    r = moe_model_backward(m, m->dloss, NULL, MOE_BACKWARD_AUX);
    if (r == MOE_OK) r = moe__model_step(m, &si);
    si.loss = loss;
    si.aux_loss = aux;
    if (info) *info = si;
    return r == MOE_OK ? r : moe__model_refuse_step(m, r);
}

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
    for (i = 0; i < m->n_layers; i++) MOE__TRY(moe_layer_quantize(&m->layers[i], dtype));
    return MOE_OK;
}

MOEDEF float *moe_model_params(moe_model *m, int64_t *n_params) {
    if (n_params) *n_params = m ? m->n_params : 0;
    return m ? m->params : NULL;
}

MOEDEF float *moe_model_grads(moe_model *m, int64_t *n_params) {
    if (n_params) *n_params = m ? m->n_params : 0;
    return m ? m->grads : NULL;
}

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
    int n;
    va_list ap;
    va_start(ap, fmt);
    n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n > 0) moe__sb_put(b, tmp, (size_t)(n < (int)sizeof tmp ? n : (int)sizeof tmp - 1));
}

/* Shortest-safe float text: 9 significant digits round-trip every float; the decimal point is
   forced to '.' whatever LC_NUMERIC says. */
static void moe__sb_float(moe__sb *b, float v) {
    char tmp[48];
    int i;
    if (!moe__finite(v)) { moe__sb_str(b, "0"); return; }
    for (i = 6; i <= 9; i++) {  /* the shortest of 6..9 significant digits that reads back as v */
        snprintf(tmp, sizeof tmp, "%.*g", i, (double)v);
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

/* Write a little-endian copy of n elements of size sz. */
static int moe__write_le(FILE *fp, const void *data, size_t nbytes, size_t sz) {
    const uint16_t one = 1;
    unsigned char little;
    memcpy(&little, &one, 1);
    if (little || sz == 1) return fwrite(data, 1, nbytes, fp) == nbytes;
    {
        unsigned char buf[4096];
        const unsigned char *p = (const unsigned char *)data;
        size_t done = 0;
        while (done < nbytes) {
            size_t n = nbytes - done < sizeof buf ? nbytes - done : sizeof buf, i, q;
            for (i = 0; i < n; i += sz)
                for (q = 0; q < sz; q++) buf[i + q] = p[done + i + sz - 1 - q];
            if (fwrite(buf, 1, n, fp) != n) return 0;
            done += n;
        }
        return 1;
    }
}

MOEDEF moe_result moe_tensor_writer_save(moe_tensor_writer *w, const char *path) {
    moe__sb h;
    char tmp[4096];
    unsigned char len8[8];
    size_t off = 0, pad;
    uint64_t hl;
    FILE *fp;
    int i, ok;
    if (!w) return MOE_ERR_INVALID_ARGUMENT;
    if (!path || strlen(path) + 5 > sizeof tmp) return moe__fail(w->ctx, MOE_ERR_INVALID_ARGUMENT, "path is NULL or too long");
    memset(&h, 0, sizeof h);
    h.ctx = w->ctx;
    moe__sb_str(&h, "{");
    if (w->meta.len) {
        moe__sb_str(&h, "\"__metadata__\":{");
        moe__sb_put(&h, w->meta.buf, w->meta.len);
        moe__sb_str(&h, "}");
    }
    for (i = 0; i < w->count; i++) {
        const moe__wentry *e = &w->entries[i];
        int q;
        if (i || w->meta.len) moe__sb_str(&h, ",");
        moe__sb_json_string(&h, e->name);
        moe__sb_printf(&h, ":{\"dtype\":\"%s\",\"shape\":[", moe__dtype_names[e->dtype]);
        for (q = 0; q < e->ndim; q++) moe__sb_printf(&h, "%s%lld", q ? "," : "", (long long)e->shape[q]);
        moe__sb_printf(&h, "],\"data_offsets\":[%llu,%llu]}", (unsigned long long)off, (unsigned long long)(off + e->nbytes));
        off += e->nbytes;
    }
    moe__sb_str(&h, "}");
    pad = (8 - h.len % 8) % 8;
    while (pad--) moe__sb_str(&h, " ");
    if (h.oom) { moe__free(w->ctx, h.buf); return moe__fail(w->ctx, MOE_ERR_OUT_OF_MEMORY, "safetensors header"); }
    hl = h.len;
    for (i = 0; i < 8; i++) len8[i] = (unsigned char)(hl >> (8 * i));
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    fp = fopen(tmp, "wb");
    if (!fp) { moe__free(w->ctx, h.buf); return moe__fail(w->ctx, MOE_ERR_IO, "cannot create %s; %s is unchanged", tmp, path); }
    ok = fwrite(len8, 1, 8, fp) == 8 && fwrite(h.buf, 1, h.len, fp) == h.len;
    for (i = 0; ok && i < w->count; i++)
        ok = moe__write_le(fp, w->entries[i].data, w->entries[i].nbytes, moe__dtype_sizes[w->entries[i].dtype]);
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

// >>model_config ------------------------------------------------------------
static const char *const moe__kind_names[] = {"", "dense", "moe", "rmsnorm", "layernorm", "embedding"};
static const char *const moe__act_names[] = {"", "identity", "relu", "gelu", "silu", "tanh", "sigmoid"};
static const char *const moe__router_names[] = {"", "topk", "noisy_topk", "switch", "sigmoid", "expert_choice", "hash"};
static const char *const moe__expert_names[] = {"", "linear", "mlp", "swiglu"};
static const char *const moe__loss_names[] = {"", "cross_entropy", "mse", "bce"};
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
        }
        moe__sb_str(b, "}");
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
#define MOE__LF(name, type, field, names, n, kinds) {name, type, offsetof(moe_layer_desc, field), names, n, kinds}

static const moe__field moe__layer_fields[] = {
    MOE__LF("d_in", MOE__F_I64, d_in, NULL, 0, MOE__K_ALL),
    MOE__LF("d_out", MOE__F_I64, d_out, NULL, 0, MOE__K_ALL),
    MOE__LF("residual", MOE__F_BOOL, residual, NULL, 0, MOE__K_ALL),
    MOE__LF("activation", MOE__F_ENUM, activation, moe__act_names, MOE_ACT_COUNT, MOE__K_DENSE | MOE__K_MOE),
    MOE__LF("bias", MOE__F_FLAG, bias, NULL, 0, MOE__K_DENSE | MOE__K_MOE),
    MOE__LF("eps", MOE__F_FLOAT, eps, NULL, 0, MOE__K_NORM),
    MOE__LF("router", MOE__F_ENUM, router, moe__router_names, MOE_ROUTER_COUNT, MOE__K_MOE),
    MOE__LF("experts", MOE__F_INT, n_experts, NULL, 0, MOE__K_MOE),
    MOE__LF("top_k", MOE__F_INT, top_k, NULL, 0, MOE__K_MOE),
    MOE__LF("renormalize", MOE__F_FLAG, renormalize, NULL, 0, MOE__K_MOE),
    MOE__LF("router_bias", MOE__F_FLAG, router_bias, NULL, 0, MOE__K_MOE),
    MOE__LF("expert", MOE__F_ENUM, expert, moe__expert_names, MOE_EXPERT_COUNT, MOE__K_MOE),
    MOE__LF("d_hidden", MOE__F_I64, d_hidden, NULL, 0, MOE__K_MOE),
    MOE__LF("hidden_layers", MOE__F_INT, n_hidden_layers, NULL, 0, MOE__K_MOE),
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
    MOE__LF("vocab_size", MOE__F_I64, vocab_size, NULL, 0, MOE__K_EMBEDDING),
    MOE__LF("d_embedding", MOE__F_I64, d_embedding, NULL, 0, MOE__K_EMBEDDING),
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
        snprintf(where, sizeof where, "layer %d", i);
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
    snprintf(head, sizeof head, "layers.%d.", layer);
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
        prev = l->d.d_out;
    }
    for (i = 0; r == MOE_OK && i < n; i++)
        if (!seen[i] && strncmp(moe_tensor_file_get(f, i)->name, "layers.", 7) == 0)
            r = moe__fail(ctx, MOE_ERR_FORMAT, "tensor \"%s\" is not part of this model's configuration", moe_tensor_file_get(f, i)->name);
done:
    moe__free(ctx, seen);
    moe__free(ctx, l);
    return r;
}

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

/* The reduced copy (moe_layer_quantize) of layer tensor `index`, or NULL: expert weights only. */
static const moe__mat *moe__tensor_quant(const moe_layer *l, int index) {
    int b, j;
    if (l->wdtype == MOE_DTYPE_F32) return NULL;
    for (b = 0; b < l->n_banks; b++)
        for (j = 0; j < l->bank[b].n_linears; j++)
            if (l->bank[b].lin[j].w == l->tensors[index].offset) return &l->bank[b].qw[j];
    return NULL;
}

static moe_result moe__model_write(moe_model *m, const char *path, int checkpoint) {
    moe_tensor_writer *w = NULL;
    moe__sb cfg, state;
    float *packed = NULL;
    int64_t count = moe_model_parameter_count(m);
    moe_result r;
    int i;
    if (!m) return MOE_ERR_INVALID_ARGUMENT;
    if (!path) return moe__fail(m->ctx, MOE_ERR_INVALID_ARGUMENT, "path is NULL");
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
    if (r == MOE_OK) r = moe_tensor_writer_save(w, path);
    moe_tensor_writer_destroy(w);
    moe__free(m->ctx, packed);
    moe__free(m->ctx, state.buf);
    moe__free(m->ctx, cfg.buf);
    return r;
}

MOEDEF moe_result moe_model_save(moe_model *m, const char *path) { return moe__model_write(m, path, 0); }

MOEDEF moe_result moe_model_save_checkpoint(moe_model *m, const char *path) { return moe__model_write(m, path, 1); }

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
    if (checkpoint && (r = moe__checkpoint_restore(ctx, f, m)) != MOE_OK) goto fail;
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

MOEDEF moe_result moe_model_load_memory(moe_ctx *ctx, const void *data, size_t size, int64_t max_tokens, moe_model **out) {
    return moe__model_load_memory(ctx, data, size, max_tokens, 0, out);
}

MOEDEF moe_result moe_model_load(moe_ctx *ctx, const char *path, int64_t max_tokens, moe_model **out) {
    return moe__model_load(ctx, path, max_tokens, 0, out);
}

MOEDEF moe_result moe_model_load_checkpoint_memory(moe_ctx *ctx, const void *data, size_t size, int64_t max_tokens, moe_model **out) {
    return moe__model_load_memory(ctx, data, size, max_tokens, 1, out);
}

MOEDEF moe_result moe_model_load_checkpoint(moe_ctx *ctx, const char *path, int64_t max_tokens, moe_model **out) {
    return moe__model_load(ctx, path, max_tokens, 1, out);
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
