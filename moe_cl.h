/* moe_cl.h - run moe.h models on any OpenCL 1.2 device: forward and training, with a CPU fallback.

   Version 0.1.0. MIT license (the text is at the end of moe.h).

   QUICK START
   -----------
   In the one file that implements moe.h:

       #define MOE_IMPLEMENTATION
       #include "moe.h"
       #define MOE_CL_IMPLEMENTATION
       #include "moe_cl.h"

   elsewhere just #include "moe.h" and "moe_cl.h". Build as for moe.h; nothing else is needed at
   link time: the OpenCL ICD loader (libOpenCL.so.1, OpenCL.dll, the macOS framework) is opened
   at run time, so the program starts on machines without OpenCL and runs on the CPU there.

       moe_cl_ctx *cl;
       moe_cl_model *dev;
       moe_cl_ctx_init(&ctx, NULL, &cl);              // never fails for lack of OpenCL
       if (moe_cl_ctx_fallback(cl)) printf("CPU: %s\n", moe_cl_ctx_reason(cl));
       moe_cl_model_upload(cl, model, &dev);          // weights and optimizer state to the device
       moe_cl_model_train_step(dev, x, &target, batch, &info);
       moe_cl_model_forward(dev, x, batch, y, NULL);
       moe_cl_model_download(dev);                    // back into model, e.g. to moe_model_save it
       moe_cl_model_destroy(dev);
       moe_cl_ctx_destroy(cl);

   BUILD OPTIONS (define before including)
   -------------
     MOE_CL_IMPLEMENTATION   the implementation, in the translation unit of MOE_IMPLEMENTATION
     MOE_CL_LINKED           include <CL/cl.h> and link -lOpenCL instead of loading at run time
                             (POSIX builds that load at run time may need -ldl on old C libraries)

   ENVIRONMENT (read by moe_cl_ctx_init when the desc field is left 0)
   -----------
     MOE_CL_DEVICE    "none": use the CPU; a number: that device in moe_cl_list_devices' order;
                      other text: the first device whose "platform / device" name contains it
                      (case-insensitive). Unset: the first GPU, else the first device.
     MOE_CL_LIBRARY   the ICD loader to open instead of the system's
     MOE_CL_CACHE     directory of the tile-size tuning cache (file moe_cl_tuning.txt)

   FALLBACK AND ERRORS
   -------------------
   moe_cl_ctx_init returns MOE_OK and a context in fallback mode when there is no OpenCL library,
   platform or usable device (or MOE_CL_DEVICE=none); moe_cl_ctx_reason says why, and every
   moe_cl_model_* call then runs the CPU model. With desc.require_device it fails instead, with
   MOE_ERR_UNSUPPORTED. A kernel build failure is MOE_ERR_DEVICE with the start of the build
   log in the message (all of it in moe_cl_build_log); device memory exhaustion is
   MOE_ERR_OUT_OF_MEMORY; other OpenCL errors are MOE_ERR_DEVICE naming the call and code.
   A layer the device does not run is MOE_ERR_UNSUPPORTED from the upload, naming the layer and
   the field. Nothing here aborts or prints.

   WHAT RUNS ON THE DEVICE
   -----------------------
   Dense, RMSNorm and LayerNorm layers; MoE layers with the routers top-k, noisy
   top-k, switch, sigmoid + selection bias, expert choice and hash, the balance, z, importance and
   load losses, linear, MLP and SwiGLU experts, shared experts; the per-call top_k, top_p,
   token_ids and router_noise options; the three losses; SGD, Adam and AdamW with clipping and the
   schedule. Random numbers the CPU draws from double-precision formulas (router jitter, the
   noisy router's normal noise) are drawn on the host from the same streams and uploaded per
   training forward; the hash router's integer generator runs on the device. Anything else
   (another layer kind, router, expert kind, activation, or a tensor of a name it does not know;
   int8 weights) is refused by the upload with MOE_ERR_UNSUPPORTED naming the layer
   and the field: the check is a whitelist, so kinds added to moe.h later stay on the CPU (today:
   soft and hierarchical routers, GeGLU and Gaussian experts, gated shared experts, the stacking
   and voting combines, multi-task layers and losses).
   moe_cl_model_quantize(dm, MOE_DTYPE_F16 or BF16) stores the expert weights as half or bfloat16
   for inference (half is read with the core vload_half, so no cl_khr_fp16 is needed; fp32
   accumulation); models moe_layer_quantize'd to bf16 upload as bf16.

   The device model is a copy: train it, then moe_cl_model_download to bring parameters,
   gradients and optimizer state back into the moe_model (to save it, or go on on the CPU).
   Parameters and optimizer state stay on the device between calls; each call copies x (and the
   targets) in and the outputs out. No allocation happens after upload.
   The OpenCL library, once opened, stays loaded until the process ends (drivers keep threads
   and state that do not survive being unloaded).

   SECTIONS (grep for the anchor)
   --------
     >>cl_api      the OpenCL types, constants and entry points used
     >>cl_loader   opening the ICD loader at run time
     >>cl_context  the kernel sources (one string per source line) and the context
     >>cl_build    building the kernels with the tile sizes
     >>cl_ctx_api  device choice, fallback, moe_cl_ctx_*
     >>cl_launch >>cl_gemm   kernel arguments; the one GEMM entry point
     >>cl_tuning   timing the tile candidates, the cache file
     >>cl_model >>cl_forward >>cl_backward >>cl_train   device models

   DETERMINISM AND TOLERANCES
   --------------------------
   No float atomics; every sum runs in a fixed order, so a device gives the same bits run to
   run. Against the CPU the order of summation differs (tiles, fused multiply-add), so results
   agree to rounding: tests/test_cl.c checks forward outputs to 1e-4 relative, gradients to
   2e-3 relative (plus 1e-4 of the tensor's largest gradient), parameters after three optimizer
   steps to 1e-3. A near-tie between two router logits can make the device and the CPU choose
   different experts.

   KERNELS
   -------
   OpenCL C 1.2 in string literals below (one source line per literal). The one GEMM kernel
   (NT, NN, TN; rows read through index lists; expert groups along rows or along k; bias and
   activation / SwiGLU / activation-gradient epilogues) serves every product, like moe.h's
   single GEMM entry point. It has two variants: local-memory tiles (GPUs) and a direct one
   with vector loads and a whole tile per work-item (CPU drivers such as PoCL; it keeps a
   transposed copy of the weights on the device to run x W^T as its fast NN loop). Tile sizes
   are -D options (TM TN TK RM RN, MOE_DIRECT), chosen when a context opens its device by timing
   a few candidates (about a second; kept in the context and, with a cache directory, in the
   file moe_cl_tuning.txt there), or given by moe_cl_desc.tiles.

   TIMING (benchmarks)
   -------------------
   moe_cl_layer_upload a moe_layer (or moe_cl_model_upload a one-layer model to time training
   steps), then time moe_cl_model_forward(dm, x, T, NULL, NULL), moe_cl_model_backward(dm, dy,
   dx, 0) or moe_cl_model_train_step(...), each followed by moe_cl_finish(cl): with y NULL
   nothing is read back. x and dy are copied in at each call.
*/
#ifndef MOE_CL_H_INCLUDED
#define MOE_CL_H_INCLUDED

#include "moe.h"
#if defined(MOE_NO_TRAINING) || defined(MOE_NO_STDIO)
#error "moe_cl.h needs the full moe.h: build it without MOE_NO_TRAINING and MOE_NO_STDIO"
#endif

#ifdef __cplusplus
extern "C" {
#endif

typedef struct moe_cl_desc {
    const char *device;        /* NULL: $MOE_CL_DEVICE, else the first GPU, else the first device */
    const char *library;       /* NULL: $MOE_CL_LIBRARY, else the system's ICD loader */
    const char *cache_dir;     /* NULL: $MOE_CL_CACHE, else the tuning result stays in memory; not created */
    const char *build_options; /* appended to the kernel build options (tile sizes are -DTM=..) */
    int require_device;        /* nonzero: fail instead of falling back to the CPU */
    int no_tuning;             /* nonzero: default tile sizes, no timing run */
    const char *tiles;         /* "TM TN TK RM RN DIRECT": these GEMM tiles, no timing run */
    int64_t max_device_bytes;  /* > 0: refuse uploads needing more device memory than this */
} moe_cl_desc;

typedef struct moe_cl_ctx moe_cl_ctx;
typedef struct moe_cl_model moe_cl_model;

/* A context on one device (or in fallback mode). ctx must outlive it; errors go to ctx. */
MOEDEF moe_result moe_cl_ctx_init(moe_ctx *ctx, const moe_cl_desc *desc /* NULL: defaults */, moe_cl_ctx **out);
MOEDEF void moe_cl_ctx_destroy(moe_cl_ctx *cl);
/* Nonzero when the context runs everything on the CPU; the reason is in moe_cl_ctx_reason. */
MOEDEF int moe_cl_ctx_fallback(const moe_cl_ctx *cl);
MOEDEF const char *moe_cl_ctx_reason(const moe_cl_ctx *cl);
/* "platform / device", or "cpu (fallback)" */
MOEDEF const char *moe_cl_device_name(const moe_cl_ctx *cl);
/* The kernel build log of the last build (may be empty). */
MOEDEF const char *moe_cl_build_log(const moe_cl_ctx *cl);
/* The tile sizes in use: "TM=64 TN=64 TK=16 RM=4 RN=4" */
MOEDEF const char *moe_cl_tiles(const moe_cl_ctx *cl);
/* Waits until everything queued has finished (for timing). */
MOEDEF moe_result moe_cl_finish(moe_cl_ctx *cl);
/* Lines "index: platform / device" of every OpenCL device into buf; returns the device count
   (0 when there is no OpenCL). library as in moe_cl_desc. */
MOEDEF int moe_cl_list_devices(const char *library, char *buf, size_t cap);

/* Copy a model to the device (parameters, optimizer state and step), with buffers for
   model->max_tokens rows. The model must outlive the device copy. */
MOEDEF moe_result moe_cl_model_upload(moe_cl_ctx *cl, moe_model *model, moe_cl_model **out);
/* One layer alone (e.g. for a benchmark), for layer->max_tokens rows: forward, backward,
   zero_grad, stats and download work on it; train_step returns MOE_ERR_STATE. */
MOEDEF moe_result moe_cl_layer_upload(moe_cl_ctx *cl, moe_layer *layer, moe_cl_model **out);
MOEDEF void moe_cl_model_destroy(moe_cl_model *dm);
/* Parameters, gradients, optimizer state and step back into the moe_model. */
MOEDEF moe_result moe_cl_model_download(moe_cl_model *dm);
/* As the moe_model_* calls of the same names. forward: y may be NULL (the output stays on
   the device; call moe_cl_finish before timing ends). */
MOEDEF moe_result moe_cl_model_forward(moe_cl_model *dm, const float *x, int64_t n_tokens, float *y, const moe_forward_opts *opts);
MOEDEF moe_result moe_cl_model_backward(moe_cl_model *dm, const float *dy, float *dx, int flags);
MOEDEF moe_result moe_cl_model_train_step(moe_cl_model *dm, const float *x, const moe_target *target, int64_t n_tokens, moe_step_info *info);
MOEDEF moe_result moe_cl_model_predict(moe_cl_model *dm, const float *x, int64_t n_tokens, int32_t *classes);
/* Inference with reduced-precision expert weights on the device, like moe_layer_quantize:
   MOE_DTYPE_F16 / MOE_DTYPE_BF16 keep a copy of every expert weight (routed and shared) as half /
   bfloat16, which forwards then read (fp32 accumulation; router, dense and norm layers stay
   fp32); MOE_DTYPE_F32 goes back to the fp32 weights. While one is on, backward and train_step
   return MOE_ERR_STATE. Call it again after training to refresh the copy. Other dtypes:
   MOE_ERR_UNSUPPORTED. Allocates the copy (device memory, 2 bytes per parameter) at the first
   call. Layers moe_layer_quantize'd to bf16 on the host upload in the bf16 form already. */
MOEDEF moe_result moe_cl_model_quantize(moe_cl_model *dm, moe_dtype dtype);
MOEDEF void moe_cl_model_zero_grad(moe_cl_model *dm);
/* Routing statistics of MoE layer `layer` from the last forward (tokens_per_expert points into dm). */
MOEDEF moe_result moe_cl_model_stats(moe_cl_model *dm, int layer, moe_stats *stats);

#ifdef __cplusplus
}
#endif
#endif /* MOE_CL_H_INCLUDED */

/* ========================================================================== */
/*                              IMPLEMENTATION                                */
/* ========================================================================== */
#ifdef MOE_CL_IMPLEMENTATION
#ifndef MOE_CL_IMPLEMENTATION_INCLUDED
#define MOE_CL_IMPLEMENTATION_INCLUDED

#ifndef MOE_IMPLEMENTATION_INCLUDED
#error "moe_cl.h: define MOE_CL_IMPLEMENTATION in the file that implements moe.h, after including it"
#endif

#include <time.h>

// >>cl_api ------------------------------------------------------------------
/* The OpenCL types and constants used here. MOE_CL_LINKED takes them from the headers;
   otherwise they are declared here (values from the OpenCL 1.2 specification) so no
   OpenCL header is needed to build. */
#ifdef MOE_CL_LINKED
#ifdef __APPLE__
#include <OpenCL/opencl.h>
#else
#ifndef CL_TARGET_OPENCL_VERSION
#define CL_TARGET_OPENCL_VERSION 120
#endif
#include <CL/cl.h>
#endif
typedef cl_int moe__cl_int;
typedef cl_uint moe__cl_uint;
typedef cl_ulong moe__cl_ulong;
typedef cl_bitfield moe__cl_bitfield;
typedef cl_platform_id moe__cl_platform;
typedef cl_device_id moe__cl_device;
typedef cl_context moe__cl_context;
typedef cl_command_queue moe__cl_queue;
typedef cl_mem moe__cl_mem;
typedef cl_program moe__cl_program;
typedef cl_kernel moe__cl_kernel;
typedef cl_event moe__cl_event;
typedef cl_context_properties moe__cl_props;
#define MOE__CL_API CL_API_CALL
#define MOE__CLA(api, name) ((void)(api), name)
#else
typedef int32_t moe__cl_int;
typedef uint32_t moe__cl_uint;
typedef uint64_t moe__cl_ulong;
typedef uint64_t moe__cl_bitfield;
typedef struct moe__cl_platform_s *moe__cl_platform;
typedef struct moe__cl_device_s *moe__cl_device;
typedef struct moe__cl_context_s *moe__cl_context;
typedef struct moe__cl_queue_s *moe__cl_queue;
typedef struct moe__cl_mem_s *moe__cl_mem;
typedef struct moe__cl_program_s *moe__cl_program;
typedef struct moe__cl_kernel_s *moe__cl_kernel;
typedef struct moe__cl_event_s *moe__cl_event;
typedef intptr_t moe__cl_props;
#if defined(_WIN32)
#define MOE__CL_API __stdcall
#else
#define MOE__CL_API
#endif
#define MOE__CLA(api, name) (api)->name
#endif
#define MOE__CLF(cl, name) MOE__CLA(&(cl)->api, name)

#define MOE__CL_SUCCESS 0
#define MOE__CL_DEVICE_NOT_FOUND (-1)
#define MOE__CL_MEM_OBJECT_ALLOCATION_FAILURE (-4)
#define MOE__CL_OUT_OF_RESOURCES (-5)
#define MOE__CL_OUT_OF_HOST_MEMORY (-6)
#define MOE__CL_BUILD_PROGRAM_FAILURE (-11)
#define MOE__CL_TRUE 1
#define MOE__CL_DEVICE_TYPE_CPU ((moe__cl_bitfield)1 << 1)
#define MOE__CL_DEVICE_TYPE_GPU ((moe__cl_bitfield)1 << 2)
#define MOE__CL_DEVICE_TYPE_ALL ((moe__cl_bitfield)0xFFFFFFFF)
#define MOE__CL_PLATFORM_NAME 0x0902
#define MOE__CL_DEVICE_TYPE 0x1000
#define MOE__CL_DEVICE_MAX_WORK_GROUP_SIZE 0x1004
#define MOE__CL_DEVICE_MAX_MEM_ALLOC_SIZE 0x1010
#define MOE__CL_DEVICE_GLOBAL_MEM_SIZE 0x101F
#define MOE__CL_DEVICE_LOCAL_MEM_SIZE 0x1023
#define MOE__CL_DEVICE_NAME 0x102B
#define MOE__CL_DRIVER_VERSION 0x102D
#define MOE__CL_PROGRAM_BUILD_LOG 0x1183
#define MOE__CL_MEM_READ_WRITE 1
#define MOE__CL_QUEUE_PROFILING_ENABLE ((moe__cl_bitfield)1 << 1)
#define MOE__CL_PROFILING_COMMAND_START 0x1282
#define MOE__CL_PROFILING_COMMAND_END 0x1283

#define MOE__CL_FUNCS(X) \
    X(moe__cl_int, clGetPlatformIDs, (moe__cl_uint, moe__cl_platform *, moe__cl_uint *)) \
    X(moe__cl_int, clGetPlatformInfo, (moe__cl_platform, moe__cl_uint, size_t, void *, size_t *)) \
    X(moe__cl_int, clGetDeviceIDs, (moe__cl_platform, moe__cl_bitfield, moe__cl_uint, moe__cl_device *, moe__cl_uint *)) \
    X(moe__cl_int, clGetDeviceInfo, (moe__cl_device, moe__cl_uint, size_t, void *, size_t *)) \
    X(moe__cl_context, clCreateContext, (const moe__cl_props *, moe__cl_uint, const moe__cl_device *, void (MOE__CL_API *)(const char *, const void *, size_t, void *), void *, moe__cl_int *)) \
    X(moe__cl_int, clReleaseContext, (moe__cl_context)) \
    X(moe__cl_queue, clCreateCommandQueue, (moe__cl_context, moe__cl_device, moe__cl_bitfield, moe__cl_int *)) \
    X(moe__cl_int, clReleaseCommandQueue, (moe__cl_queue)) \
    X(moe__cl_program, clCreateProgramWithSource, (moe__cl_context, moe__cl_uint, const char **, const size_t *, moe__cl_int *)) \
    X(moe__cl_int, clBuildProgram, (moe__cl_program, moe__cl_uint, const moe__cl_device *, const char *, void (MOE__CL_API *)(moe__cl_program, void *), void *)) \
    X(moe__cl_int, clGetProgramBuildInfo, (moe__cl_program, moe__cl_device, moe__cl_uint, size_t, void *, size_t *)) \
    X(moe__cl_int, clReleaseProgram, (moe__cl_program)) \
    X(moe__cl_kernel, clCreateKernel, (moe__cl_program, const char *, moe__cl_int *)) \
    X(moe__cl_int, clReleaseKernel, (moe__cl_kernel)) \
    X(moe__cl_int, clSetKernelArg, (moe__cl_kernel, moe__cl_uint, size_t, const void *)) \
    X(moe__cl_int, clEnqueueNDRangeKernel, (moe__cl_queue, moe__cl_kernel, moe__cl_uint, const size_t *, const size_t *, const size_t *, moe__cl_uint, const moe__cl_event *, moe__cl_event *)) \
    X(moe__cl_mem, clCreateBuffer, (moe__cl_context, moe__cl_bitfield, size_t, void *, moe__cl_int *)) \
    X(moe__cl_int, clReleaseMemObject, (moe__cl_mem)) \
    X(moe__cl_int, clEnqueueReadBuffer, (moe__cl_queue, moe__cl_mem, moe__cl_uint, size_t, size_t, void *, moe__cl_uint, const moe__cl_event *, moe__cl_event *)) \
    X(moe__cl_int, clEnqueueWriteBuffer, (moe__cl_queue, moe__cl_mem, moe__cl_uint, size_t, size_t, const void *, moe__cl_uint, const moe__cl_event *, moe__cl_event *)) \
    X(moe__cl_int, clEnqueueFillBuffer, (moe__cl_queue, moe__cl_mem, const void *, size_t, size_t, size_t, moe__cl_uint, const moe__cl_event *, moe__cl_event *)) \
    X(moe__cl_int, clEnqueueCopyBuffer, (moe__cl_queue, moe__cl_mem, moe__cl_mem, size_t, size_t, size_t, moe__cl_uint, const moe__cl_event *, moe__cl_event *)) \
    X(moe__cl_int, clFinish, (moe__cl_queue)) \
    X(moe__cl_int, clWaitForEvents, (moe__cl_uint, const moe__cl_event *)) \
    X(moe__cl_int, clGetEventProfilingInfo, (moe__cl_event, moe__cl_uint, size_t, void *, size_t *)) \
    X(moe__cl_int, clReleaseEvent, (moe__cl_event))

typedef struct moe__cl_api {
#define MOE__CL_FIELD(ret, name, args) ret (MOE__CL_API *name) args;
    MOE__CL_FUNCS(MOE__CL_FIELD)
#undef MOE__CL_FIELD
    void *lib;
} moe__cl_api;

// >>cl_loader ---------------------------------------------------------------
#ifndef MOE_CL_LINKED
#if defined(_WIN32)
#ifndef WIN32_LEAN_AND_MEAN
#define WIN32_LEAN_AND_MEAN
#endif
#include <windows.h>
static void *moe__cl_dlopen(const char *name) { return (void *)LoadLibraryA(name); }
static void *moe__cl_dlsym(void *lib, const char *name) {
    FARPROC p = GetProcAddress((HMODULE)lib, name);
    void *v;
    memcpy(&v, &p, sizeof v);
    return v;
}
static void moe__cl_dlclose(void *lib) { FreeLibrary((HMODULE)lib); }
static const char *const moe__cl_lib_names[] = { "OpenCL.dll", NULL };
#else
#include <dlfcn.h>
static void *moe__cl_dlopen(const char *name) { return dlopen(name, RTLD_NOW | RTLD_LOCAL); }
static void *moe__cl_dlsym(void *lib, const char *name) { return dlsym(lib, name); }
static void moe__cl_dlclose(void *lib) { dlclose(lib); }
#ifdef __APPLE__
static const char *const moe__cl_lib_names[] = { "/System/Library/Frameworks/OpenCL.framework/OpenCL", "libOpenCL.dylib", NULL };
#else
static const char *const moe__cl_lib_names[] = { "libOpenCL.so.1", "libOpenCL.so", NULL };
#endif
#endif
#endif

/* Fill api from the loader; why (cap bytes) says what failed. Returns 0 on failure. */
static int moe__cl_load(moe__cl_api *api, const char *library, char *why, size_t cap) {
    memset(api, 0, sizeof *api);
#ifdef MOE_CL_LINKED
    (void)library; (void)why; (void)cap;
    api->lib = NULL;
    return 1;
#else
    {
        int i;
        const char *tried = library ? library : moe__cl_lib_names[0];
        if (!library) library = getenv("MOE_CL_LIBRARY");
        if (library && library[0]) {
            tried = library;
            api->lib = moe__cl_dlopen(library);
        } else {
            for (i = 0; moe__cl_lib_names[i] && !api->lib; i++) api->lib = moe__cl_dlopen(moe__cl_lib_names[i]);
        }
        if (!api->lib) {
            snprintf(why, cap, "no OpenCL library (could not open %s)", tried);
            return 0;
        }
#define MOE__CL_SYM(ret, name, args) \
        { void *sym = moe__cl_dlsym(api->lib, #name); \
          if (!sym) { snprintf(why, cap, "the OpenCL library lacks %s", #name); moe__cl_dlclose(api->lib); api->lib = NULL; return 0; } \
          memcpy(&api->name, &sym, sizeof sym); }
        MOE__CL_FUNCS(MOE__CL_SYM)
#undef MOE__CL_SYM
        return 1;
    }
#endif
}

/* The loader stays loaded once opened: OpenCL drivers keep threads and state that do not
   survive being unmapped, so only the process's end releases it (as most programs do). */
static void moe__cl_unload(moe__cl_api *api) {
    api->lib = NULL;
}

// >>cl_context --------------------------------------------------------------
#define MOE__CL_KERNELS(X) \
    X(gemm_nt) X(gemm_nn) X(gemm_tn) X(colsum) X(transpose) X(route_topk) X(dispatch_count) X(dispatch_scatter) \
    X(moe_sums) X(moe_combine) X(moe_dgate) X(swiglu_back) X(router_back) X(moe_dx) X(act_fwd) \
    X(act_back) X(add_to) X(norm_fwd) X(norm_wgrad) X(norm_dx) X(task_loss) X(sumsq) X(opt_step) X(shared_rows) X(mul) X(importance) X(dgate_add) \
    X(noisy_h) X(load_sums) X(noisy_back) X(route_sigmoid) X(sigmoid_back) X(bias_update) X(route_hash) X(dispatch_ec) X(to_half) X(to_bf16)

enum {
#define MOE__CL_KENUM(name) MOE__CLK_##name,
    MOE__CL_KERNELS(MOE__CL_KENUM)
#undef MOE__CL_KENUM
    MOE__CLK_COUNT
};

static const char *const moe__cl_kernel_names[] = {
#define MOE__CL_KNAME(name) #name,
    MOE__CL_KERNELS(MOE__CL_KNAME)
#undef MOE__CL_KNAME
};

/* The kernels, one source line per string: common helpers and the GEMM first (the tuning
   step builds those alone), then routing, combine, norms, losses and the optimizer. */
static const char *const moe__cl_source[] = {
    "/* moe_cl kernels: OpenCL C 1.2, fp32 accumulation, no float atomics, fixed summation order. */\n",
    "#ifdef cl_khr_fp64\n",
    "#pragma OPENCL EXTENSION cl_khr_fp64 : enable\n",
    "typedef double acc_t;\n",
    "#else\n",
    "typedef float acc_t;\n",
    "#endif\n",
    "#ifndef TM\n",
    "#define TM 64\n",
    "#endif\n",
    "#ifndef TN\n",
    "#define TN 64\n",
    "#endif\n",
    "#ifndef TK\n",
    "#define TK 16\n",
    "#endif\n",
    "#ifndef RM\n",
    "#define RM 4\n",
    "#endif\n",
    "#ifndef RN\n",
    "#define RN 4\n",
    "#endif\n",
    "#define WX (TN / RN)\n",
    "#define WY (TM / RM)\n",
    "#define WG (WX * WY)\n",
    "/* activation codes: moe_activation */\n",
    "#define ACT_RELU 2\n",
    "#define ACT_GELU 3\n",
    "#define ACT_SILU 4\n",
    "#define ACT_TANH 5\n",
    "#define ACT_SIGMOID 6\n",
    "float sigm(float z) {\n",
    "    if (z >= 0.0f) return 1.0f / (1.0f + exp(-z));\n",
    "    float e = exp(z);\n",
    "    return e / (1.0f + e);\n",
    "}\n",
    "float softplus_(float z) { return z > 20.0f ? z : log1p(exp(z)); }\n",
    "float act_f(int act, float z) {\n",
    "    if (act == ACT_RELU) return z > 0.0f ? z : 0.0f;\n",
    "    if (act == ACT_GELU) return 0.5f * z * (1.0f + erf(z * 0.70710678118654752f));\n",
    "    if (act == ACT_SILU) return z * sigm(z);\n",
    "    if (act == ACT_TANH) return tanh(z);\n",
    "    if (act == ACT_SIGMOID) return sigm(z);\n",
    "    return z;\n",
    "}\n",
    "float act_g(int act, float z) {\n",
    "    if (act == ACT_RELU) return z > 0.0f ? 1.0f : 0.0f;\n",
    "    if (act == ACT_GELU) return 0.5f * (1.0f + erf(z * 0.70710678118654752f)) + z * 0.39894228040143268f * exp(-0.5f * z * z);\n",
    "    if (act == ACT_SILU) { float s = sigm(z); return s * (1.0f + z * (1.0f - s)); }\n",
    "    if (act == ACT_TANH) { float t = tanh(z); return 1.0f - t * t; }\n",
    "    if (act == ACT_SIGMOID) { float s = sigm(z); return s * (1.0f - s); }\n",
    "    return 1.0f;\n",
    "}\n",
    "/* C = op(A) op(B) (+ C) (+ bias), one tile of TM x TN per work-group, RM x RN per work-item.\n",
    "   op 0 NT: C[i,j] = sum_k A(i,k) B(j,k); 1 NN: A(i,k) B(k,j); 2 TN: A(k,i) B(k,j).\n",
    "   Rows of A and B may be read through an index list. group_mode 1: groups[] are row offsets,\n",
    "   a work-group row tile lies inside one group g, B, bias and C move by g strides (experts);\n",
    "   group_mode 2: groups[] split K, get_group_id(2) is the group (per-expert weight gradients).\n",
    "   Epilogue epi: 1 D = act(C); 2 D = silu(Z) * C (SwiGLU); 3 C *= act'(Z). Each C element is\n",
    "   summed over k in increasing order by one work-item: results do not depend on the launch. */\n",
    "/* B_HALF / B_BF16 (more builds of the GEMM lines): B holds half values (vload_half is core\n",
    "   OpenCL, no extension needed) or bfloat16 bits, read as float; fp32 accumulation */\n",
    "#ifdef B_HALF\n",
    "#define BT half\n",
    "#define LDB(p, i) vload_half((i), (p))\n",
    "#elif defined(B_BF16)\n",
    "#define BT ushort\n",
    "#define LDB(p, i) as_float((uint)(p)[i] << 16)\n",
    "#else\n",
    "#define BT float\n",
    "#define LDB(p, i) (p)[i]\n",
    "#endif\n",
    "#define GEMM_ARGS int M, int N, int K, global const float *A, long a_off, int lda, global const int *arows, int use_ar, global const BT *B, long b_off, int ldb, global const int *brows, int use_br, long b_gstride, global float *C, long c_off, int ldc, long c_gstride, global const float *bias, long bias_off, int use_bias, long bias_gstride, global const int *groups, int group_mode, int n_groups, int accumulate, int epi, int act, global float *D, global const float *Z\n",
    "#define GEMM_PASS M, N, K, A, a_off, lda, arows, use_ar, B, b_off, ldb, brows, use_br, b_gstride, C, c_off, ldc, c_gstride, bias, bias_off, use_bias, bias_gstride, groups, group_mode, n_groups, accumulate, epi, act, D, Z\n",
    "#ifdef MOE_DIRECT\n",
    "/* Direct variant (CPU devices): no local memory; a work-item computes a whole TM x TN tile\n",
    "   in blocks of RM x RN, k in chunks of TK (the tile's panels of A and B stay in cache).\n",
    "   NT runs along k in float8 (8 partial sums added in a fixed tree at the end), NN and TN\n",
    "   along the RN output columns of a block. */\n",
    "#define CAT_(a, b) a##b\n",
    "#define CAT(a, b) CAT_(a, b)\n",
    "#define VECN CAT(float, RN)\n",
    "#define VLOADN CAT(vload, RN)\n",
    "#define VSTOREN CAT(vstore, RN)\n",
    "#define VLOADM CAT(vload, RM)\n",
    "#define VSTOREM CAT(vstore, RM)\n",
    "#ifdef B_HALF\n",
    "#define LDBN(p) CAT(vload_half, RN)(0, (p))\n",
    "#define LDB8(p) vload_half8(0, (p))\n",
    "#elif defined(B_BF16)\n",
    "#define LDBN(p) CAT(as_float, RN)(CAT(convert_uint, RN)(CAT(vload, RN)(0, (p))) << 16)\n",
    "#define LDB8(p) as_float8(convert_uint8(vload8(0, (p))) << 16)\n",
    "#else\n",
    "#define LDBN(p) VLOADN(0, (p))\n",
    "#define LDB8(p) vload8(0, (p))\n",
    "#endif\n",
    "float sum8(float8 v) { float4 h = v.lo + v.hi; float2 q = h.lo + h.hi; return q.x + q.y; }\n",
    "void gemm_block(const int op, GEMM_ARGS, int g, int m0, int m1, int j0, int k0, int k1, int first, int last) {\n",
    "    float s[RM][RN];\n",
    "    if (op == 0) {\n",
    "        global const float *ap[RM];\n",
    "        global const BT *bp[RN];\n",
    "        float8 acc[RM][RN];\n",
    "        int k = k0;\n",
    "        for (int i = 0; i < RM; i++) {\n",
    "            long r = min(m0 + i, m1 - 1);\n",
    "            ap[i] = A + (use_ar ? (long)arows[r] : r) * lda;\n",
    "        }\n",
    "        for (int j = 0; j < RN; j++) {\n",
    "            long r = min(j0 + j, N - 1);\n",
    "            bp[j] = B + (use_br ? (long)brows[r] : r) * ldb;\n",
    "        }\n",
    "        for (int i = 0; i < RM; i++)\n",
    "            for (int j = 0; j < RN; j++) acc[i][j] = (float8)(0.0f);\n",
    "        for (; k + 8 <= k1; k += 8) {\n",
    "            float8 a[RM], b[RN];\n",
    "            for (int i = 0; i < RM; i++) a[i] = vload8(0, ap[i] + k);\n",
    "            for (int j = 0; j < RN; j++) b[j] = LDB8(bp[j] + k);\n",
    "            for (int i = 0; i < RM; i++)\n",
    "                for (int j = 0; j < RN; j++) acc[i][j] = fma(a[i], b[j], acc[i][j]);\n",
    "        }\n",
    "        for (int i = 0; i < RM; i++)\n",
    "            for (int j = 0; j < RN; j++) s[i][j] = sum8(acc[i][j]);\n",
    "        for (; k < k1; k++)\n",
    "            for (int i = 0; i < RM; i++)\n",
    "                for (int j = 0; j < RN; j++) s[i][j] = fma(ap[i][k], LDB(bp[j], k), s[i][j]);\n",
    "    } else {\n",
    "        VECN acc[RM];\n",
    "        long ar[RM];\n",
    "        for (int i = 0; i < RM; i++) acc[i] = (VECN)(0.0f);\n",
    "        if (op == 1)\n",
    "            for (int i = 0; i < RM; i++) { long r = min(m0 + i, m1 - 1); ar[i] = (use_ar ? (long)arows[r] : r) * lda; }\n",
    "        if (j0 + RN <= N && op == 1) {\n",
    "            int k = k0;\n",
    "            for (; k + 4 <= k1; k += 4) {  /* four k at once: one vector load per row of A */\n",
    "                VECN b0 = LDBN(B + (use_br ? (long)brows[k] : k) * ldb + j0);\n",
    "                VECN b1 = LDBN(B + (use_br ? (long)brows[k + 1] : k + 1) * ldb + j0);\n",
    "                VECN b2 = LDBN(B + (use_br ? (long)brows[k + 2] : k + 2) * ldb + j0);\n",
    "                VECN b3 = LDBN(B + (use_br ? (long)brows[k + 3] : k + 3) * ldb + j0);\n",
    "                for (int i = 0; i < RM; i++) {\n",
    "                    float4 a = vload4(0, A + ar[i] + k);\n",
    "                    acc[i] = fma((VECN)(a.x), b0, acc[i]);\n",
    "                    acc[i] = fma((VECN)(a.y), b1, acc[i]);\n",
    "                    acc[i] = fma((VECN)(a.z), b2, acc[i]);\n",
    "                    acc[i] = fma((VECN)(a.w), b3, acc[i]);\n",
    "                }\n",
    "            }\n",
    "            for (; k < k1; k++) {\n",
    "                VECN b = LDBN(B + (use_br ? (long)brows[k] : k) * ldb + j0);\n",
    "                for (int i = 0; i < RM; i++) acc[i] = fma((VECN)(A[ar[i] + k]), b, acc[i]);\n",
    "            }\n",
    "        } else if (j0 + RN <= N && m0 + RM <= m1) {\n",
    "            int k = k0;\n",
    "            for (; k + 2 <= k1; k += 2) {  /* two k at once: one vector load per row of A */\n",
    "                VECN b0 = LDBN(B + (use_br ? (long)brows[k] : k) * ldb + j0);\n",
    "                VECN b1 = LDBN(B + (use_br ? (long)brows[k + 1] : k + 1) * ldb + j0);\n",
    "                float a0[RM], a1[RM];\n",
    "                VSTOREM(VLOADM(0, A + (use_ar ? (long)arows[k] : k) * lda + m0), 0, a0);\n",
    "                VSTOREM(VLOADM(0, A + (use_ar ? (long)arows[k + 1] : k + 1) * lda + m0), 0, a1);\n",
    "                for (int i = 0; i < RM; i++) acc[i] = fma((VECN)(a1[i]), b1, fma((VECN)(a0[i]), b0, acc[i]));\n",
    "            }\n",
    "            for (; k < k1; k++) {\n",
    "                VECN b = LDBN(B + (use_br ? (long)brows[k] : k) * ldb + j0);\n",
    "                global const float *arow = A + (use_ar ? (long)arows[k] : k) * lda + m0;\n",
    "                for (int i = 0; i < RM; i++) acc[i] = fma((VECN)(arow[i]), b, acc[i]);\n",
    "            }\n",
    "        } else {\n",
    "            for (int k = k0; k < k1; k++) {\n",
    "                long br = (use_br ? (long)brows[k] : k) * ldb + j0;\n",
    "                float t[RN];\n",
    "                VECN b;\n",
    "                for (int j = 0; j < RN; j++) t[j] = j0 + j < N ? LDB(B, br + j) : 0.0f;\n",
    "                b = VLOADN(0, t);\n",
    "                if (op == 1) {\n",
    "                    for (int i = 0; i < RM; i++) acc[i] = fma((VECN)(A[ar[i] + k]), b, acc[i]);\n",
    "                } else {\n",
    "                    global const float *arow = A + (use_ar ? (long)arows[k] : k) * lda;\n",
    "                    for (int i = 0; i < RM; i++) acc[i] = fma((VECN)(arow[min(m0 + i, m1 - 1)]), b, acc[i]);\n",
    "                }\n",
    "            }\n",
    "        }\n",
    "        for (int i = 0; i < RM; i++) {\n",
    "            float t[RN];\n",
    "            VSTOREN(acc[i], 0, t);\n",
    "            for (int j = 0; j < RN; j++) s[i][j] = t[j];\n",
    "        }\n",
    "    }\n",
    "    for (int i = 0; i < RM; i++) {\n",
    "        int r = m0 + i;\n",
    "        if (r >= m1) break;\n",
    "        for (int j = 0; j < RN; j++) {\n",
    "            int c = j0 + j;\n",
    "            long at = (long)r * ldc + c;\n",
    "            float v = s[i][j];\n",
    "            if (c >= N) break;\n",
    "            if (accumulate || !first) v = C[at] + v;\n",
    "            if (last) {\n",
    "                if (use_bias) v += bias[bias_off + (long)g * bias_gstride + c];\n",
    "                if (epi == 3) v *= act_g(act, Z[at]);\n",
    "            }\n",
    "            C[at] = v;\n",
    "            if (last && epi == 1) D[at] = act_f(act, v);\n",
    "            else if (last && epi == 2) D[at] = Z[at] * sigm(Z[at]) * v;\n",
    "        }\n",
    "    }\n",
    "}\n",
    "void gemm_body(const int op, GEMM_ARGS) {\n",
    "    int n0 = get_global_id(0) * TN, m0 = 0, m1 = M, k0 = 0, k1 = K, g = 0;\n",
    "    if (n0 >= N) return;\n",
    "    if (group_mode == 1) {\n",
    "        int by = get_global_id(1), found = 0;\n",
    "        for (g = 0; g < n_groups; g++) {\n",
    "            int st = groups[g], e = groups[g + 1], nt = (e - st + TM - 1) / TM;\n",
    "            if (by < nt) { m0 = st + by * TM; m1 = min(e, m0 + TM); found = 1; break; }\n",
    "            by -= nt;\n",
    "        }\n",
    "        if (!found) return;\n",
    "    } else {\n",
    "        m0 = get_global_id(1) * TM;\n",
    "        if (m0 >= M) return;\n",
    "        m1 = min(M, m0 + TM);\n",
    "        if (group_mode == 2) { g = get_global_id(2); k0 = groups[g]; k1 = groups[g + 1]; }\n",
    "    }\n",
    "    A += a_off;\n",
    "    B += b_off + (long)g * b_gstride;\n",
    "    C += c_off + (long)g * c_gstride;\n",
    "    if (epi) { D += c_off + (long)g * c_gstride; Z += c_off + (long)g * c_gstride; }\n",
    "    /* k in chunks of TK (the tile's panels of A and B stay in cache); C holds the partial sums */\n",
    "    for (int kb = k0; kb < k1 || kb == k0; kb += TK) {\n",
    "        int ke = min(k1, kb + TK);\n",
    "        for (int mi = m0; mi < m1; mi += RM)\n",
    "            for (int nj = n0; nj < min(N, n0 + TN); nj += RN)\n",
    "                gemm_block(op, GEMM_PASS, g, mi, min(m1, mi + RM), nj, kb, ke, kb == k0, ke >= k1);\n",
    "        if (ke >= k1) break;\n",
    "    }\n",
    "}\n",
    "kernel void gemm_nt(GEMM_ARGS) { gemm_body(0, GEMM_PASS); }\n",
    "kernel void gemm_nn(GEMM_ARGS) { gemm_body(1, GEMM_PASS); }\n",
    "kernel void gemm_tn(GEMM_ARGS) { gemm_body(2, GEMM_PASS); }\n",
    "#else\n",
    "void gemm_body(const int op, GEMM_ARGS, local float *As, local float *Bs) {\n",
    "    int tx = get_local_id(0), ty = get_local_id(1), lid = ty * WX + tx;\n",
    "    int n0 = get_group_id(0) * TN, m0 = 0, m1 = M, k0 = 0, k1 = K, g = 0;\n",
    "    float acc[RM][RN];\n",
    "    if (group_mode == 1) {\n",
    "        int by = get_group_id(1), found = 0;\n",
    "        for (g = 0; g < n_groups; g++) {\n",
    "            int s = groups[g], e = groups[g + 1], nt = (e - s + TM - 1) / TM;\n",
    "            if (by < nt) { m0 = s + by * TM; m1 = min(e, m0 + TM); found = 1; break; }\n",
    "            by -= nt;\n",
    "        }\n",
    "        if (!found) return;\n",
    "    } else {\n",
    "        m0 = get_group_id(1) * TM;\n",
    "        m1 = min(M, m0 + TM);\n",
    "        if (m0 >= M) return;\n",
    "        if (group_mode == 2) { g = get_group_id(2); k0 = groups[g]; k1 = groups[g + 1]; }\n",
    "    }\n",
    "    A += a_off;\n",
    "    B += b_off + (long)g * b_gstride;\n",
    "    C += c_off + (long)g * c_gstride;\n",
    "    if (epi) { D += c_off + (long)g * c_gstride; Z += c_off + (long)g * c_gstride; }\n",
    "    for (int i = 0; i < RM; i++)\n",
    "        for (int j = 0; j < RN; j++) acc[i][j] = 0.0f;\n",
    "    for (int kb = k0; kb < k1; kb += TK) {\n",
    "        for (int idx = lid; idx < TM * TK; idx += WG) {\n",
    "            int mm = op == 2 ? idx % TM : idx / TK, kk = op == 2 ? idx / TM : idx % TK;\n",
    "            int i = m0 + mm, k = kb + kk;\n",
    "            float v = 0.0f;\n",
    "            if (i < m1 && k < k1) {\n",
    "                long r = op == 2 ? k : i;\n",
    "                int c = op == 2 ? i : k;\n",
    "                if (use_ar) r = arows[r];\n",
    "                v = A[r * lda + c];\n",
    "            }\n",
    "            As[kk * TM + mm] = v;\n",
    "        }\n",
    "        for (int idx = lid; idx < TN * TK; idx += WG) {\n",
    "            int nn = op == 0 ? idx / TK : idx % TN, kk = op == 0 ? idx % TK : idx / TN;\n",
    "            int j = n0 + nn, k = kb + kk;\n",
    "            float v = 0.0f;\n",
    "            if (j < N && k < k1) {\n",
    "                long r = op == 0 ? j : k;\n",
    "                int c = op == 0 ? k : j;\n",
    "                if (use_br) r = brows[r];\n",
    "                v = LDB(B, r * ldb + c);\n",
    "            }\n",
    "            Bs[kk * TN + nn] = v;\n",
    "        }\n",
    "        barrier(CLK_LOCAL_MEM_FENCE);\n",
    "        for (int kk = 0; kk < TK; kk++) {\n",
    "            float a[RM], b[RN];\n",
    "            for (int i = 0; i < RM; i++) a[i] = As[kk * TM + ty + i * WY];\n",
    "            for (int j = 0; j < RN; j++) b[j] = Bs[kk * TN + tx + j * WX];\n",
    "            for (int i = 0; i < RM; i++)\n",
    "                for (int j = 0; j < RN; j++) acc[i][j] = fma(a[i], b[j], acc[i][j]);\n",
    "        }\n",
    "        barrier(CLK_LOCAL_MEM_FENCE);\n",
    "    }\n",
    "    for (int i = 0; i < RM; i++) {\n",
    "        int r = m0 + ty + i * WY;\n",
    "        if (r >= m1) continue;\n",
    "        for (int j = 0; j < RN; j++) {\n",
    "            int c = n0 + tx + j * WX;\n",
    "            long at = (long)r * ldc + c;\n",
    "            float v = acc[i][j];\n",
    "            if (c >= N) continue;\n",
    "            if (accumulate) v = C[at] + v;\n",
    "            if (use_bias) v += bias[bias_off + (long)g * bias_gstride + c];\n",
    "            if (epi == 3) v *= act_g(act, Z[at]);\n",
    "            C[at] = v;\n",
    "            if (epi == 1) D[at] = act_f(act, v);\n",
    "            else if (epi == 2) D[at] = Z[at] * sigm(Z[at]) * v;\n",
    "        }\n",
    "    }\n",
    "}\n",
    "kernel __attribute__((reqd_work_group_size(WX, WY, 1))) void gemm_nt(GEMM_ARGS) {\n",
    "    local float As[TK * TM], Bs[TK * TN];\n",
    "    gemm_body(0, GEMM_PASS, As, Bs);\n",
    "}\n",
    "kernel __attribute__((reqd_work_group_size(WX, WY, 1))) void gemm_nn(GEMM_ARGS) {\n",
    "    local float As[TK * TM], Bs[TK * TN];\n",
    "    gemm_body(1, GEMM_PASS, As, Bs);\n",
    "}\n",
    "kernel __attribute__((reqd_work_group_size(WX, WY, 1))) void gemm_tn(GEMM_ARGS) {\n",
    "    local float As[TK * TM], Bs[TK * TN];\n",
    "    gemm_body(2, GEMM_PASS, As, Bs);\n",
    "}\n",
    "#endif\n",
    "/* end of the GEMM lines */\n",
    "/* dst[g * dst_gstride + c] += sum of src rows of group g (all rows when n_groups is 0), in row order */\n",
    "kernel void colsum(int rows, int cols, global const float *src, int ld, global const int *groups, int n_groups, global float *dst, long dst_off, long dst_gstride) {\n",
    "    int c = get_global_id(0), g = get_global_id(1);\n",
    "    if (c >= cols) return;\n",
    "    int r0 = n_groups ? groups[g] : 0, r1 = n_groups ? groups[g + 1] : rows;\n",
    "    float s = 0.0f;\n",
    "    for (int r = r0; r < r1; r++) s += src[(long)r * ld + c];\n",
    "    dst[dst_off + (long)g * dst_gstride + c] += s;\n",
    "}\n",
    "/* dst = src transposed, for n stacked [rows, cols] matrices at offset off of both buffers */\n",
    "kernel void transpose(int n, int rows, int cols, global const float *src, global float *dst, long off) {\n",
    "    int c = get_global_id(0), r = get_global_id(1), b = get_global_id(2);\n",
    "    if (c >= cols || r >= rows || b >= n) return;\n",
    "    long base = off + (long)b * rows * cols;\n",
    "    dst[base + (long)c * rows + r] = src[base + (long)r * cols + c];\n",
    "}\n",
    "/* Expert order for selection: larger h first, ties to the lower index, NaN last. */\n",
    "int before(global const float *h, int a, int b) {\n",
    "    float ha = h[a] == h[a] ? h[a] : -FLT_MAX, hb = h[b] == h[b] ? h[b] : -FLT_MAX;\n",
    "    return ha > hb || (ha == hb && a < b);\n",
    "}\n",
    "/* idx[0..n) = the first n of the E items of h in that order */\n",
    "void top_n(global const float *h, int E, int n, global int *idx) {\n",
    "    for (int q = 0; q < n; q++) {\n",
    "        int best = -1;\n",
    "        for (int e = 0; e < E; e++) {\n",
    "            if (q > 0 && !before(h, idx[q - 1], e)) continue;\n",
    "            if (best < 0 || before(h, e, best)) best = e;\n",
    "        }\n",
    "        idx[q] = best;\n",
    "    }\n",
    "}\n",
    "/* One token per work-item: softmax, entropy, the k chosen experts, their gates. top_p > 0: only\n",
    "   the fewest leading slots whose probabilities reach top_p (the others: expert -1, gate 0).\n",
    "   want_thr: thr[2t] = the k-th expert, thr[2t+1] = the (k+1)-th (noisy top-k's load loss). */\n",
    "kernel void route_topk(int T, int E, int K, int renormalize, float top_p, int want_thr, global const float *hh, global float *pp, global float *lse, global float *entropy, global int *sel_all, global float *gate_all, global int *thr) {\n",
    "    int t = get_global_id(0), n = K;\n",
    "    if (t >= T) return;\n",
    "    global const float *h = hh + (long)t * E;\n",
    "    global float *p = pp + (long)t * E, *gate = gate_all + (long)t * K;\n",
    "    global int *sel = sel_all + (long)t * K;\n",
    "    float m = -FLT_MAX, s = 0.0f, ent = 0.0f;\n",
    "    for (int e = 0; e < E; e++) m = h[e] > m ? h[e] : m;\n",
    "    for (int e = 0; e < E; e++) { p[e] = exp(h[e] - m); s += p[e]; }\n",
    "    for (int e = 0; e < E; e++) p[e] /= s;\n",
    "    lse[t] = m + log(s);\n",
    "    for (int e = 0; e < E; e++)\n",
    "        if (p[e] > 0.0f) ent -= p[e] * log(p[e]);\n",
    "    entropy[t] = ent;\n",
    "    top_n(h, E, K, sel);\n",
    "    if (top_p > 0.0f) {\n",
    "        acc_t cum = 0;\n",
    "        for (n = 0; n < K && cum < (acc_t)top_p; n++) cum += (acc_t)p[sel[n]];\n",
    "    }\n",
    "    if (want_thr && K < E) {\n",
    "        int next = -1;\n",
    "        for (int e = 0; e < E; e++)\n",
    "            if (before(h, sel[K - 1], e) && (next < 0 || before(h, e, next))) next = e;\n",
    "        thr[2 * t] = sel[K - 1];\n",
    "        thr[2 * t + 1] = next;\n",
    "    }\n",
    "    if (renormalize) {\n",
    "        float top = h[sel[0]], sum = 0.0f;\n",
    "        for (int q = 0; q < n; q++) { gate[q] = exp(h[sel[q]] - top); sum += gate[q]; }\n",
    "        for (int q = 0; q < n; q++) gate[q] /= sum;\n",
    "    } else {\n",
    "        for (int q = 0; q < n; q++) gate[q] = p[sel[q]];\n",
    "    }\n",
    "    for (int q = n; q < K; q++) { sel[q] = -1; gate[q] = 0.0f; }\n",
    "}\n",
    "/* Sigmoid router (DeepSeek-V3), one token per work-item: p = sigmoid(clean); selection by\n",
    "   key = p + selection bias among the experts of the top_groups best of G groups (group score:\n",
    "   the sum of its two largest keys); gates p (over their sum when renormalize) times scale.\n",
    "   keys [T, E], gsc [T, G] and gsl [T, G] are scratch. */\n",
    "kernel void route_sigmoid(int T, int E, int K, int G, int top_groups, int renormalize, float scale, global const float *cc, global const float *prm, long bias_off, global float *pp, global float *keys, global float *gsc, global int *gsl, global float *lse, global float *entropy, global int *sel_all, global float *gate_all) {\n",
    "    int t = get_global_id(0), n = E / G;\n",
    "    if (t >= T) return;\n",
    "    global const float *c = cc + (long)t * E, *bias = prm + bias_off;\n",
    "    global float *p = pp + (long)t * E, *key = keys + (long)t * E, *gate = gate_all + (long)t * K;\n",
    "    global int *sel = sel_all + (long)t * K;\n",
    "    float sum = 0.0f, ent = 0.0f, s = 0.0f;\n",
    "    for (int e = 0; e < E; e++) { p[e] = sigm(c[e]); key[e] = p[e] + bias[e]; sum += p[e]; }\n",
    "    for (int e = 0; e < E; e++)\n",
    "        if (p[e] > 0.0f) ent -= p[e] / sum * log(p[e] / sum);\n",
    "    entropy[t] = ent;\n",
    "    lse[t] = 0.0f;\n",
    "    if (G > 1) {\n",
    "        global float *gs = gsc + (long)t * G;\n",
    "        global int *gsel = gsl + (long)t * G;\n",
    "        for (int q = 0; q < G; q++) {  /* gsel[0..1] hold the group's top two for now */\n",
    "            top_n(key + q * n, n, n < 2 ? 1 : 2, gsel);\n",
    "            gs[q] = key[q * n + gsel[0]] + (n < 2 ? 0.0f : key[q * n + gsel[1]]);\n",
    "        }\n",
    "        top_n(gs, G, top_groups, gsel);\n",
    "        for (int q = 0; q < G; q++) gs[q] = 0.0f;\n",
    "        for (int q = 0; q < top_groups; q++) gs[gsel[q]] = 1.0f;\n",
    "        for (int e = 0; e < E; e++)\n",
    "            if (gs[e / n] == 0.0f) key[e] = -INFINITY;\n",
    "    }\n",
    "    top_n(key, E, K, sel);\n",
    "    for (int q = 0; q < K; q++) s += p[sel[q]];\n",
    "    for (int q = 0; q < K; q++) gate[q] = (renormalize ? p[sel[q]] / s : p[sel[q]]) * scale;\n",
    "}\n",
    "/* dh for token t through the sigmoid router's gates: g_q = scale p_q / S (or scale p_q) */\n",
    "kernel void sigmoid_back(int T, int E, int K, int renormalize, float scale, global const float *pp, global const float *gate_all, global const float *dgate, global const int *sel_all, global float *dh_all) {\n",
    "    int t = get_global_id(0);\n",
    "    if (t >= T) return;\n",
    "    global const float *p = pp + (long)t * E, *gate = gate_all + (long)t * K, *dg = dgate + (long)t * K;\n",
    "    global const int *sel = sel_all + (long)t * K;\n",
    "    global float *dh = dh_all + (long)t * E;\n",
    "    float S = 0.0f, gs = 0.0f;\n",
    "    for (int e = 0; e < E; e++) dh[e] = 0.0f;\n",
    "    for (int q = 0; q < K; q++) { S += p[sel[q]]; gs += gate[q] * dg[q]; }\n",
    "    for (int q = 0; q < K; q++) dh[sel[q]] = renormalize ? (scale * dg[q] - gs) / S : scale * dg[q];\n",
    "    for (int e = 0; e < E; e++) dh[e] *= p[e] * (1.0f - p[e]);\n",
    "}\n",
    "/* aux-loss-free balance: b_e += rate * sign(mean load - load_e), in integers (exact) */\n",
    "kernel void bias_update(int E, float rate, global const int *chosen, global float *prm, long off) {\n",
    "    int e = get_global_id(0);\n",
    "    if (e >= E) return;\n",
    "    long sum = 0;\n",
    "    for (int f = 0; f < E; f++) sum += chosen[f];\n",
    "    long diff = sum - (long)chosen[e] * E;\n",
    "    prm[off + e] += diff > 0 ? rate : diff < 0 ? -rate : 0.0f;\n",
    "}\n",
    "/* moe.h's counter-based generator (splitmix64 finaliser, three rounds) */\n",
    "ulong mix64(ulong z) {\n",
    "    z += 0x9E3779B97F4A7C15UL;\n",
    "    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;\n",
    "    z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;\n",
    "    return z ^ (z >> 31);\n",
    "}\n",
    "/* Hash router: k distinct experts rng(seed, layer, id << 32 | c) mod E, c = 0, 1, ...; gates 1/k */\n",
    "kernel void route_hash(int T, int E, int K, uint seed, long layer, global const int *ids, global int *sel_all, global float *gate_all, global float *lse, global float *entropy) {\n",
    "    int t = get_global_id(0), n = 0;\n",
    "    if (t >= T) return;\n",
    "    global int *sel = sel_all + (long)t * K;\n",
    "    ulong id = (ulong)(uint)ids[t] << 32;\n",
    "    for (ulong c = 0; n < K; c++) {\n",
    "        int e = (int)(mix64(mix64(mix64((ulong)seed) ^ (ulong)layer) ^ (id | c)) % (ulong)E), seen = 0;\n",
    "        for (int q = 0; q < n; q++) seen |= sel[q] == e;\n",
    "        if (!seen) sel[n++] = e;\n",
    "    }\n",
    "    for (int q = 0; q < K; q++) gate_all[(long)t * K + q] = 1.0f / (float)K;\n",
    "    lse[t] = 0.0f;\n",
    "    entropy[t] = 0.0f;\n",
    "}\n",
    "/* Expert choice, one expert per work-item: its C tokens of largest p[., e] (ties: lower token),\n",
    "   rows e*C.. in token order; slot e of token t is expert e (pos -1: not taken), gate p[t, e]. */\n",
    "kernel void dispatch_ec(int T, int E, int C, global const float *p, global int *sel, global int *pos, global float *gate, global int *offsets, global int *row_token, global int *chosen, global int *kept) {\n",
    "    int e = get_global_id(0), n = 0, r = e * C;\n",
    "    if (e >= E) return;\n",
    "    global int *list = row_token + (long)e * C;  /* the best tokens so far, best first */\n",
    "    for (int t = 0; t < T; t++) {\n",
    "        float v = p[(long)t * E + e];\n",
    "        if (n == C && !(v > p[(long)list[C - 1] * E + e])) continue;\n",
    "        int j = n < C ? n++ : C - 1;\n",
    "        for (; j > 0 && v > p[(long)list[j - 1] * E + e]; j--) list[j] = list[j - 1];\n",
    "        list[j] = t;\n",
    "    }\n",
    "    for (int t = 0; t < T; t++) { long a = (long)t * E + e; pos[a] = -1; sel[a] = e; gate[a] = p[a]; }\n",
    "    for (int j = 0; j < C; j++) pos[(long)list[j] * E + e] = -2;\n",
    "    for (int t = 0; t < T; t++)\n",
    "        if (pos[(long)t * E + e] == -2) { row_token[r] = t; pos[(long)t * E + e] = r++; }\n",
    "    offsets[e + 1] = (e + 1) * C;\n",
    "    if (e == 0) offsets[0] = 0;\n",
    "    chosen[e] = kept[e] = C;\n",
    "}\n",
    "/* One expert per work-item: how many (token, slot) pairs chose it, and which fit its capacity\n",
    "   (slot-major, tokens ascending, as the CPU). pos = 0 kept, -1 dropped. */\n",
    "kernel void dispatch_count(int T, int E, int K, long cap, global const int *sel, global int *pos, global int *chosen, global int *kept) {\n",
    "    int e = get_global_id(0);\n",
    "    if (e >= E) return;\n",
    "    int c = 0, k = 0;\n",
    "    for (int q = 0; q < K; q++)\n",
    "        for (int t = 0; t < T; t++) {\n",
    "            int a = t * K + q;\n",
    "            if (sel[a] < 0 && e == 0) pos[a] = -1;  /* a slot top_p left empty */\n",
    "            if (sel[a] != e) continue;\n",
    "            c++;\n",
    "            if (cap && k >= cap) pos[a] = -1;\n",
    "            else { k++; pos[a] = 0; }\n",
    "        }\n",
    "    chosen[e] = c;\n",
    "    kept[e] = k;\n",
    "}\n",
    "/* Exclusive scan of the kept counts and a stable scatter: expert e's rows in token order. */\n",
    "kernel void dispatch_scatter(int T, int E, int K, global const int *sel, global int *pos, global const int *kept, global int *offsets, global int *row_token) {\n",
    "    int e = get_global_id(0);\n",
    "    if (e >= E) return;\n",
    "    int start = 0;\n",
    "    for (int f = 0; f < e; f++) start += kept[f];\n",
    "    offsets[e] = start;\n",
    "    if (e == E - 1) offsets[E] = start + kept[e];\n",
    "    int cursor = start;\n",
    "    for (int t = 0; t < T; t++)\n",
    "        for (int q = 0; q < K; q++) {\n",
    "            int a = t * K + q;\n",
    "            if (sel[a] != e || pos[a] < 0) continue;\n",
    "            pos[a] = cursor;\n",
    "            row_token[cursor++] = t;\n",
    "        }\n",
    "}\n",
    "/* Per-expert sums for the statistics and auxiliary losses: out[e] = sum_t p[t,e] (e < E),\n",
    "   out[E] = sum_t lse^2, out[E+1] = sum_t entropy. */\n",
    "kernel void moe_sums(int T, int E, global const float *p, global const float *lse, global const float *entropy, global float *out) {\n",
    "    int e = get_global_id(0);\n",
    "    acc_t s = 0;\n",
    "    if (e > E + 1) return;\n",
    "    for (int t = 0; t < T; t++) s += e < E ? p[(long)t * E + e] : e == E ? (acc_t)lse[t] * lse[t] : entropy[t];\n",
    "    out[e] = (float)s;\n",
    "}\n",
    "/* y[t, j] = (x[t, j] if residual or pass-through) + sum over slots of gate * expert output\n",
    "   + the shared experts' outputs (their rows are q * T + t) */\n",
    "kernel void moe_combine(int T, int Din, int O, int K, int residual, global const float *x, global const int *pos, global const float *gate, global const float *out, int n_shared, global const float *sh_out, global float *y) {\n",
    "    int j = get_global_id(0), t = get_global_id(1);\n",
    "    if (j >= O || t >= T) return;\n",
    "    int any = 0;\n",
    "    for (int q = 0; q < K; q++) any |= pos[t * K + q] >= 0;\n",
    "    float v = (residual || (!any && O == Din)) ? x[(long)t * Din + j] : 0.0f;\n",
    "    for (int q = 0; q < K; q++) {\n",
    "        int r = pos[t * K + q];\n",
    "        if (r >= 0) v += gate[t * K + q] * out[(long)r * O + j];\n",
    "    }\n",
    "    for (int q = 0; q < n_shared; q++) v += sh_out[((long)q * T + t) * O + j];\n",
    "    y[(long)t * O + j] = v;\n",
    "}\n",
    "/* Backward of the combine: dgate[t, q] = dy . out[row], dout[row] = gate * dy. */\n",
    "kernel void moe_dgate(int T, int O, int K, global const float *dy, global const int *pos, global const float *gate, global const float *out, global float *dout, global float *dgate) {\n",
    "    int a = get_global_id(0);\n",
    "    if (a >= T * K) return;\n",
    "    int r = pos[a], t = a / K;\n",
    "    if (r < 0) { dgate[a] = 0.0f; return; }\n",
    "    float acc = 0.0f, g = gate[a];\n",
    "    for (int j = 0; j < O; j++) {\n",
    "        float d = dy[(long)t * O + j];\n",
    "        acc += d * out[(long)r * O + j];\n",
    "        dout[(long)r * O + j] = g * d;\n",
    "    }\n",
    "    dgate[a] = acc;\n",
    "}\n",
    "/* SwiGLU backward at the gated product: da -> dz0, dz1 */\n",
    "kernel void swiglu_back(long n, global const float *da, global const float *z0, global const float *z1, global float *dz0, global float *dz1) {\n",
    "    long i = get_global_id(0);\n",
    "    if (i >= n) return;\n",
    "    float s = sigm(z0[i]);\n",
    "    dz0[i] = da[i] * z1[i] * s * (1.0f + z0[i] * (1.0f - s));\n",
    "    dz1[i] = da[i] * z0[i] * s;\n",
    "}\n",
    "/* dh for token t through the gates, the softmax and (aux) the balance and z losses. */\n",
    "kernel void router_back(int T, int E, int K, int renormalize, int aux, float bal_scale, float z_scale, global const float *pp, global const float *gate_all, global const float *dgate, global const int *sel_all, global const int *chosen, global const float *lse, global float *dh_all) {\n",
    "    int t = get_global_id(0);\n",
    "    if (t >= T) return;\n",
    "    global const float *p = pp + (long)t * E, *gate = gate_all + (long)t * K, *dg = dgate + (long)t * K;\n",
    "    global const int *sel = sel_all + (long)t * K;\n",
    "    global float *dh = dh_all + (long)t * E;\n",
    "    float dot = 0.0f;\n",
    "    for (int e = 0; e < E; e++) dh[e] = 0.0f;\n",
    "    if (!renormalize)\n",
    "        for (int q = 0; q < K; q++)\n",
    "            if (sel[q] >= 0) dh[sel[q]] += dg[q];\n",
    "    if (aux && bal_scale > 0.0f)\n",
    "        for (int e = 0; e < E; e++) dh[e] += bal_scale * (float)chosen[e];\n",
    "    for (int e = 0; e < E; e++) dot += p[e] * dh[e];\n",
    "    for (int e = 0; e < E; e++) dh[e] = p[e] * (dh[e] - dot);\n",
    "    if (renormalize) {\n",
    "        float gs = 0.0f;\n",
    "        for (int q = 0; q < K; q++) gs += gate[q] * dg[q];\n",
    "        for (int q = 0; q < K; q++)\n",
    "            if (sel[q] >= 0) dh[sel[q]] += gate[q] * (dg[q] - gs);\n",
    "    }\n",
    "    if (aux && z_scale > 0.0f) {\n",
    "        float c = z_scale * lse[t];\n",
    "        for (int e = 0; e < E; e++) dh[e] += c * p[e];\n",
    "    }\n",
    "}\n",
    "/* dx[t, j] = (dy if residual or pass-through) + sum over slots of dxr[row] + shared experts'\n",
    "   + dxu[t] (times the jitter factors when the router saw jittered inputs) */\n",
    "kernel void moe_dx(int T, int Din, int O, int K, int residual, global const float *dy, global const int *pos, global const float *dxr, global const float *dxu, int n_shared, global const float *sh_dxr, int jittered, global const float *jit, global float *dx) {\n",
    "    int j = get_global_id(0), t = get_global_id(1);\n",
    "    if (j >= Din || t >= T) return;\n",
    "    int any = 0;\n",
    "    for (int q = 0; q < K; q++) any |= pos[t * K + q] >= 0;\n",
    "    float v = (residual || (!any && O == Din)) ? dy[(long)t * O + j] : 0.0f;\n",
    "    for (int q = 0; q < K; q++) {\n",
    "        int r = pos[t * K + q];\n",
    "        if (r >= 0) v += dxr[(long)r * Din + j];\n",
    "    }\n",
    "    for (int q = 0; q < n_shared; q++) v += sh_dxr[((long)q * T + t) * Din + j];\n",
    "    dx[(long)t * Din + j] = v + (jittered ? dxu[(long)t * Din + j] * jit[(long)t * Din + j] : dxu[(long)t * Din + j]);\n",
    "}\n",
    "/* The shared experts' rows: expert q takes every token, rows q * T + t. */\n",
    "kernel void shared_rows(int T, int n, global int *offsets, global int *row_token) {\n",
    "    int a = get_global_id(0);\n",
    "    if (a <= n) offsets[a] = a * T;\n",
    "    if (a < n * T) row_token[a] = a % T;\n",
    "}\n",
    "/* importance[e] = sum of the gates of the (token, slot) pairs that chose e, in pair order */\n",
    "kernel void importance(int n_pairs, int E, global const int *sel, global const float *gate, global float *imp) {\n",
    "    int e = get_global_id(0);\n",
    "    if (e >= E) return;\n",
    "    float s = 0.0f;\n",
    "    for (int a = 0; a < n_pairs; a++)\n",
    "        if (sel[a] == e) s += gate[a];\n",
    "    imp[e] = s;\n",
    "}\n",
    "/* dgate[a] += g[sel[a]]: the importance loss's gradient at the gates */\n",
    "kernel void dgate_add(int n_pairs, global const int *sel, global const float *g, global float *dgate) {\n",
    "    int a = get_global_id(0);\n",
    "    if (a < n_pairs && sel[a] >= 0) dgate[a] += g[sel[a]];\n",
    "}\n",
    "/* Noisy top-k: h = clean + noise * softplus(raw) (noise 0 at inference) */\n",
    "kernel void noisy_h(long n, global const float *clean, global const float *raw, global const float *noise, global float *h) {\n",
    "    long i = get_global_id(0);\n",
    "    if (i < n) h[i] = clean[i] + noise[i] * softplus_(raw[i]);\n",
    "}\n",
    "float phi_cdf(float z) { return 0.5f * erfc(-z * 0.70710678118654752f); }\n",
    "float phi_pdf(float z) { return 0.39894228040143268f * exp(-0.5f * z * z); }\n",
    "/* the threshold of (t, e) for the load loss: the (k+1)-th h if e is in the top k, else the k-th */\n",
    "int load_thr(global const float *h, global const int *thr, int t, int E, int e) {\n",
    "    int in = thr[2 * t + 1];\n",
    "    return h[(long)t * E + e] > h[(long)t * E + in] ? in : thr[2 * t];\n",
    "}\n",
    "/* load[e] = sum over tokens (in order) of P(e stays in the top k with fresh noise) */\n",
    "kernel void load_sums(int T, int E, global const float *clean, global const float *raw, global const float *h, global const int *thr, global float *load) {\n",
    "    int e = get_global_id(0);\n",
    "    if (e >= E) return;\n",
    "    float s = 0.0f;\n",
    "    for (int t = 0; t < T; t++) {\n",
    "        long i = (long)t * E;\n",
    "        int j = load_thr(h, thr, t, E, e);\n",
    "        s += phi_cdf((clean[i + e] - h[i + j]) / softplus_(raw[i + e]));\n",
    "    }\n",
    "    load[e] = s;\n",
    "}\n",
    "/* Backward through the noisy gate for token t: dh (at h) becomes dclean in place, ds = dL/draw;\n",
    "   with want_load the load loss's gradient dload[E] too. */\n",
    "kernel void noisy_back(int T, int E, int want_load, global float *dh_all, global float *ds_all, global const float *noise, global const float *raw_all, global const float *clean_all, global const float *h_all, global const int *thr, global const float *dload) {\n",
    "    int t = get_global_id(0);\n",
    "    if (t >= T) return;\n",
    "    long o = (long)t * E;\n",
    "    global float *dc = dh_all + o, *ds = ds_all + o;\n",
    "    global const float *n = noise + o, *raw = raw_all + o, *clean = clean_all + o, *h = h_all + o;\n",
    "    for (int e = 0; e < E; e++) ds[e] = dc[e] * n[e];\n",
    "    if (want_load)\n",
    "        for (int e = 0; e < E; e++) {\n",
    "            int j = load_thr(h_all, thr, t, E, e);\n",
    "            float sd = softplus_(raw[e]), zv = (clean[e] - h[j]) / sd;\n",
    "            float c = dload[e] * phi_pdf(zv) / sd;\n",
    "            dc[e] += c;\n",
    "            ds[e] -= c * zv;\n",
    "            dc[j] -= c;\n",
    "            ds[j] -= c * n[j];\n",
    "        }\n",
    "    for (int e = 0; e < E; e++) ds[e] *= sigm(raw[e]);\n",
    "}\n",
    "/* dst[off + i] = src[off + i] rounded to half (to nearest even), i < n */\n",
    "kernel void to_half(long n, long off, global const float *src, global half *dst) {\n",
    "    long i = get_global_id(0);\n",
    "    if (i < n) vstore_half_rte(src[off + i], off + i, dst);\n",
    "}\n",
    "/* dst[off + i] = src[off + i] as bfloat16 (to nearest even; NaN stays NaN), as moe.h's */\n",
    "kernel void to_bf16(long n, long off, global const float *src, global ushort *dst) {\n",
    "    long i = get_global_id(0);\n",
    "    if (i >= n) return;\n",
    "    uint u = as_uint(src[off + i]);\n",
    "    dst[off + i] = (u & 0x7fffffffu) > 0x7f800000u ? (ushort)((u >> 16) | 0x40u) : (ushort)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);\n",
    "}\n",
    "/* y = act(z) (+ r: residual) */\n",
    "kernel void act_fwd(long n, int act, global const float *z, global float *y, global const float *r, int use_r) {\n",
    "    long i = get_global_id(0);\n",
    "    if (i >= n) return;\n",
    "    float v = act_f(act, z[i]);\n",
    "    y[i] = use_r ? v + r[i] : v;\n",
    "}\n",
    "/* dz = dy * act'(z) */\n",
    "kernel void act_back(long n, int act, global const float *z, global const float *dy, global float *dz) {\n",
    "    long i = get_global_id(0);\n",
    "    if (i < n) dz[i] = dy[i] * act_g(act, z[i]);\n",
    "}\n",
    "kernel void mul(long n, global const float *a, global const float *b, global float *c) {\n",
    "    long i = get_global_id(0);\n",
    "    if (i < n) c[i] = a[i] * b[i];\n",
    "}\n",
    "kernel void add_to(long n, global float *dst, global const float *src) {\n",
    "    long i = get_global_id(0);\n",
    "    if (i < n) dst[i] += src[i];\n",
    "}\n",
    "/* RMSNorm / LayerNorm forward, one token per work-item */\n",
    "kernel void norm_fwd(int T, int D, int layer_norm, int residual, float eps, global const float *x, global const float *prm, long w_off, long b_off, global float *mean, global float *rstd, global float *y) {\n",
    "    int t = get_global_id(0);\n",
    "    if (t >= T) return;\n",
    "    global const float *w = prm + w_off, *b = prm + b_off;\n",
    "    global const float *xt = x + (long)t * D;\n",
    "    acc_t mu = 0, var = 0;\n",
    "    if (layer_norm) {\n",
    "        for (int j = 0; j < D; j++) mu += xt[j];\n",
    "        mu /= (acc_t)D;\n",
    "    }\n",
    "    for (int j = 0; j < D; j++) var += ((acc_t)xt[j] - mu) * ((acc_t)xt[j] - mu);\n",
    "    var /= (acc_t)D;\n",
    "    float m = (float)mu, r = (float)(1.0 / sqrt(var + (acc_t)eps));\n",
    "    mean[t] = m;\n",
    "    rstd[t] = r;\n",
    "    for (int j = 0; j < D; j++) {\n",
    "        float v = (xt[j] - m) * r * w[j];\n",
    "        if (layer_norm) v += b[j];\n",
    "        y[(long)t * D + j] = residual ? xt[j] + v : v;\n",
    "    }\n",
    "}\n",
    "/* weight (and bias) gradients of a norm: one column per work-item, tokens in order */\n",
    "kernel void norm_wgrad(int T, int D, int layer_norm, global const float *x, global const float *dy, global const float *mean, global const float *rstd, global float *grads, long w_off, long b_off) {\n",
    "    int j = get_global_id(0);\n",
    "    if (j >= D) return;\n",
    "    global float *dw = grads + w_off, *db = grads + b_off;\n",
    "    float w = dw[j], bsum = layer_norm ? db[j] : 0.0f;\n",
    "    for (int s = 0; s < T; s++) {\n",
    "        float xhat = (x[(long)s * D + j] - mean[s]) * rstd[s], g = dy[(long)s * D + j];\n",
    "        w += g * xhat;\n",
    "        bsum += g;\n",
    "    }\n",
    "    dw[j] = w;\n",
    "    if (layer_norm) db[j] = bsum;\n",
    "}\n",
    "kernel void norm_dx(int T, int D, int layer_norm, int residual, global const float *x, global const float *dy, global const float *prm, long w_off, global const float *mean, global const float *rstd, global float *dx) {\n",
    "    int t = get_global_id(0);\n",
    "    if (t >= T) return;\n",
    "    global const float *w = prm + w_off;\n",
    "    global const float *xt = x + (long)t * D, *gt = dy + (long)t * D;\n",
    "    float m = mean[t], r = rstd[t];\n",
    "    acc_t sg = 0, sgx = 0;\n",
    "    for (int j = 0; j < D; j++) {\n",
    "        float gw = gt[j] * w[j];\n",
    "        sg += gw;\n",
    "        sgx += (acc_t)gw * (acc_t)((xt[j] - m) * r);\n",
    "    }\n",
    "    float mg = layer_norm ? (float)(sg / (acc_t)D) : 0.0f, mgx = (float)(sgx / (acc_t)D);\n",
    "    for (int j = 0; j < D; j++) {\n",
    "        float xhat = (xt[j] - m) * r, v = r * (gt[j] * w[j] - mg - xhat * mgx);\n",
    "        dx[(long)t * D + j] = residual ? v + gt[j] : v;\n",
    "    }\n",
    "}\n",
    "/* Task loss per token into tok[t] and dL/dy; kind: moe_loss (1 CE, 2 MSE, 3 BCE) */\n",
    "kernel void task_loss(int T, int C, int kind, global const float *y, global const int *labels, global const float *values, global float *tok, global float *dy) {\n",
    "    int t = get_global_id(0);\n",
    "    if (t >= T) return;\n",
    "    global const float *yt = y + (long)t * C;\n",
    "    global float *dyt = dy + (long)t * C;\n",
    "    acc_t lt = 0;\n",
    "    if (kind == 1) {\n",
    "        float m = -FLT_MAX, s = 0.0f, lse;\n",
    "        int label = labels[t];\n",
    "        for (int c = 0; c < C; c++) m = yt[c] > m ? yt[c] : m;\n",
    "        for (int c = 0; c < C; c++) s += exp(yt[c] - m);\n",
    "        lse = m + log(s);\n",
    "        lt = (acc_t)lse - (acc_t)yt[label];\n",
    "        for (int c = 0; c < C; c++) dyt[c] = (exp(yt[c] - lse) - (c == label ? 1.0f : 0.0f)) / (float)T;\n",
    "    } else {\n",
    "        global const float *tv = values + (long)t * C;\n",
    "        float scale = 1.0f / ((float)T * (float)C);\n",
    "        for (int c = 0; c < C; c++) {\n",
    "            float v = yt[c], q = tv[c];\n",
    "            if (kind == 2) { lt += (acc_t)(v - q) * (acc_t)(v - q); dyt[c] = 2.0f * (v - q) * scale; }\n",
    "            else { lt += (acc_t)(softplus_(v) - q * v); dyt[c] = (sigm(v) - q) * scale; }\n",
    "        }\n",
    "        lt /= (acc_t)C;\n",
    "    }\n",
    "    tok[t] = (float)lt;\n",
    "}\n",
    "/* sums of squares of fixed chunks of the gradient blob (summed in order on the host) */\n",
    "kernel void sumsq(long n, int chunk, global const float *g, global float *partial) {\n",
    "    long c = get_global_id(0), i0 = c * chunk, i1 = min(i0 + chunk, n);\n",
    "    if (i0 >= n) return;\n",
    "    acc_t s = 0;\n",
    "    for (long i = i0; i < i1; i++) s += (acc_t)g[i] * (acc_t)g[i];\n",
    "    partial[c] = (float)s;\n",
    "}\n",
    "/* SGD (kind 1) / Adam (2) / AdamW (3), moe_optimizer_step's formulas */\n",
    "kernel void opt_step(long n, int kind, float scale, float lr, float beta1, float beta2, float eps, float wd, float momentum, float b1c, float b2c_sqrt, int has_m, global float *params, global float *grads, global float *mm, global float *vv) {\n",
    "    long i = get_global_id(0);\n",
    "    if (i >= n) return;\n",
    "    float g = grads[i], p = params[i];\n",
    "    if (scale != 1.0f) { g *= scale; grads[i] = g; }\n",
    "    if (kind == 1) {\n",
    "        g += wd * p;\n",
    "        if (has_m) { mm[i] = momentum * mm[i] + g; g = mm[i]; }\n",
    "        params[i] = p - lr * g;\n",
    "    } else {\n",
    "        if (kind == 3) p *= 1.0f - lr * wd;\n",
    "        else g += wd * p;\n",
    "        float m = mm[i] = beta1 * mm[i] + (1.0f - beta1) * g;\n",
    "        float v = vv[i] = beta2 * vv[i] + (1.0f - beta2) * g * g;\n",
    "        params[i] = p - (lr / b1c) * m / (sqrt(v) / b2c_sqrt + eps);\n",
    "    }\n",
    "}\n",
};

/* GEMM tile sizes (the -D options): TM x TN of C per work-group, RM x RN per work-item, TK of
   k per local-memory step; direct: the variant without local memory (CPU devices). */
typedef struct moe__cl_tiles { int tm, tn, tk, rm, rn, direct; } moe__cl_tiles;

struct moe_cl_ctx {
    moe_ctx *ctx;
    int fallback;
    char reason[256];
    char name[256];
    char tiles_text[64];
    char *build_log;
    moe_cl_desc desc;
    moe__cl_api api;
    moe__cl_platform platform;
    moe__cl_device device;
    moe__cl_context context;
    moe__cl_queue queue;
    moe__cl_program program;
    moe__cl_kernel kernels[MOE__CLK_COUNT];
    moe__cl_program q_program[2];           /* the GEMM built with B_HALF / B_BF16, when a model asked for it */
    moe__cl_kernel q_kernels[2][3];         /* their gemm_nt, gemm_nn, gemm_tn */
    moe__cl_mem dummy;          /* bound to pointer arguments a kernel does not read */
    moe__cl_tiles tiles;
    moe__cl_ulong max_alloc, global_mem;
    moe__cl_bitfield type;
    size_t max_wg;
};

static const char *moe__cl_call_name(moe__cl_int err) {
    switch (err) {
    case -1: return "CL_DEVICE_NOT_FOUND";
    case -4: return "CL_MEM_OBJECT_ALLOCATION_FAILURE";
    case -5: return "CL_OUT_OF_RESOURCES";
    case -6: return "CL_OUT_OF_HOST_MEMORY";
    case -11: return "CL_BUILD_PROGRAM_FAILURE";
    case -30: return "CL_INVALID_VALUE";
    case -38: return "CL_INVALID_MEM_OBJECT";
    case -48: return "CL_INVALID_KERNEL";
    case -51: return "CL_INVALID_ARG_SIZE";
    case -52: return "CL_INVALID_KERNEL_ARGS";
    case -54: return "CL_INVALID_WORK_GROUP_SIZE";
    case -61: return "CL_INVALID_BUFFER_SIZE";
    default: return "OpenCL error";
    }
}

/* An OpenCL error as a moe_result: allocation failures are MOE_ERR_OUT_OF_MEMORY, the rest
   MOE_ERR_DEVICE (the device or its driver failed; MOE_ERR_UNSUPPORTED means "not supported"). */
static moe_result moe__cl_fail(moe_ctx *ctx, moe__cl_int err, const char *what) {
    moe_result code = (err == MOE__CL_MEM_OBJECT_ALLOCATION_FAILURE || err == MOE__CL_OUT_OF_RESOURCES ||
                       err == MOE__CL_OUT_OF_HOST_MEMORY) ? MOE_ERR_OUT_OF_MEMORY : MOE_ERR_DEVICE;
    return moe__fail(ctx, code, "OpenCL: %s failed: %s (%d)", what, moe__cl_call_name(err), (int)err);
}

#define MOE__CL_CHECK(cl, err, what) do { if ((err) != MOE__CL_SUCCESS) return moe__cl_fail((cl)->ctx, (err), (what)); } while (0)

static int moe__cl_lower(int c) { return c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c; }

static int moe__cl_contains(const char *hay, const char *needle) {
    size_t i, j, n = strlen(needle);
    for (i = 0; hay[i]; i++) {
        for (j = 0; j < n && hay[i + j] && moe__cl_lower(hay[i + j]) == moe__cl_lower(needle[j]); j++) {}
        if (j == n) return 1;
    }
    return n == 0;
}

#define MOE__CL_MAX_PLATFORMS 16
#define MOE__CL_MAX_DEVICES 64

/* Every device of every platform in order: index, handles and "platform / device" names.
   Returns the count (0 and a reason in why when there is none). */
typedef struct moe__cl_device_entry {
    moe__cl_platform platform;
    moe__cl_device device;
    moe__cl_bitfield type;
    char name[256];
} moe__cl_device_entry;

static int moe__cl_enumerate(moe__cl_api *api, moe__cl_device_entry *list, int cap, char *why, size_t why_cap) {
    moe__cl_platform platforms[MOE__CL_MAX_PLATFORMS];
    moe__cl_uint np = 0, p;
    int n = 0;
    moe__cl_int err;
    err = MOE__CLA(api, clGetPlatformIDs)(MOE__CL_MAX_PLATFORMS, platforms, &np);
    if (err != MOE__CL_SUCCESS || np == 0) {
        snprintf(why, why_cap, "no OpenCL platform (clGetPlatformIDs: %d platforms, code %d)", (int)np, (int)err);
        return 0;
    }
    for (p = 0; p < np && n < cap; p++) {
        moe__cl_device devices[MOE__CL_MAX_DEVICES];
        moe__cl_uint nd = 0, d;
        char pname[128] = "";
        MOE__CLA(api, clGetPlatformInfo)(platforms[p], MOE__CL_PLATFORM_NAME, sizeof pname - 1, pname, NULL);
        if (MOE__CLA(api, clGetDeviceIDs)(platforms[p], MOE__CL_DEVICE_TYPE_ALL, MOE__CL_MAX_DEVICES, devices, &nd) != MOE__CL_SUCCESS) continue;
        for (d = 0; d < nd && n < cap; d++) {
            char dname[128] = "";
            moe__cl_device_entry *e = &list[n++];
            MOE__CLA(api, clGetDeviceInfo)(devices[d], MOE__CL_DEVICE_NAME, sizeof dname - 1, dname, NULL);
            e->type = 0;
            MOE__CLA(api, clGetDeviceInfo)(devices[d], MOE__CL_DEVICE_TYPE, sizeof e->type, &e->type, NULL);
            e->platform = platforms[p];
            e->device = devices[d];
            snprintf(e->name, sizeof e->name, "%.120s / %.120s", pname, dname);
        }
    }
    if (n == 0) snprintf(why, why_cap, "no OpenCL device on %d platform(s)", (int)np);
    return n;
}

MOEDEF int moe_cl_list_devices(const char *library, char *buf, size_t cap) {
    moe__cl_api api;
    moe__cl_device_entry list[MOE__CL_MAX_DEVICES];
    char why[256];
    size_t used = 0;
    int n, i;
    if (buf && cap) buf[0] = 0;
    if (!moe__cl_load(&api, library, why, sizeof why)) return 0;
    n = moe__cl_enumerate(&api, list, MOE__CL_MAX_DEVICES, why, sizeof why);
    for (i = 0; i < n && buf && used < cap; i++) {
        int w = snprintf(buf + used, cap - used, "%d: %s\n", i, list[i].name);
        if (w < 0) break;
        used += (size_t)w;
    }
    moe__cl_unload(&api);
    return n;
}

// >>cl_build ----------------------------------------------------------------
/* before tuning: local-memory tiles on GPUs and accelerators, the direct variant on CPUs */
static const moe__cl_tiles moe__cl_default_tiles = { 64, 64, 16, 4, 4, 0 };
static const moe__cl_tiles moe__cl_default_cpu_tiles = { 32, 64, 1024, 8, 16, 1 };

static void moe__cl_tiles_text(const moe__cl_tiles *t, char *buf, size_t cap) {
    snprintf(buf, cap, "TM=%d TN=%d TK=%d RM=%d RN=%d%s", t->tm, t->tn, t->tk, t->rm, t->rn, t->direct ? " MOE_DIRECT" : "");
}

/* Build sources with the tile sizes and user options into *program; on failure the build log
   goes to cl->build_log and the start of it into the error message. */
static moe_result moe__cl_build(moe_cl_ctx *cl, const moe__cl_tiles *t, int gemm_only, const char *extra, moe__cl_program *program) {
    char options[1024];
    moe__cl_int err;
    moe__cl_program p;
    size_t log_size = 0;
    moe__cl_uint n = (moe__cl_uint)(sizeof moe__cl_source / sizeof moe__cl_source[0]), i;
    for (i = 0; gemm_only && i < n; i++)  /* the helpers and the GEMM: the lines before the marker */
        if (strcmp(moe__cl_source[i], "/* end of the GEMM lines */\n") == 0) n = i;
    snprintf(options, sizeof options, "-cl-std=CL1.2 -DTM=%d -DTN=%d -DTK=%d -DRM=%d -DRN=%d%s%s %s", t->tm, t->tn, t->tk,
             t->rm, t->rn, t->direct ? " -DMOE_DIRECT=1" : "", extra, cl->desc.build_options ? cl->desc.build_options : "");
    *program = NULL;
    p = MOE__CLF(cl, clCreateProgramWithSource)(cl->context, n, (const char **)moe__cl_source, NULL, &err);
    MOE__CL_CHECK(cl, err, "clCreateProgramWithSource");
    err = MOE__CLF(cl, clBuildProgram)(p, 1, &cl->device, options, NULL, NULL);
    moe__free(cl->ctx, cl->build_log);
    cl->build_log = NULL;
    if (MOE__CLF(cl, clGetProgramBuildInfo)(p, cl->device, MOE__CL_PROGRAM_BUILD_LOG, 0, NULL, &log_size) == MOE__CL_SUCCESS && log_size > 0 &&
        (cl->build_log = (char *)moe__malloc(cl->ctx, log_size + 1)) != NULL) {
        if (MOE__CLF(cl, clGetProgramBuildInfo)(p, cl->device, MOE__CL_PROGRAM_BUILD_LOG, log_size, cl->build_log, NULL) != MOE__CL_SUCCESS)
            log_size = 0;
        cl->build_log[log_size] = 0;
    }
    if (err != MOE__CL_SUCCESS) {
        MOE__CLF(cl, clReleaseProgram)(p);
        return moe__fail(cl->ctx, MOE_ERR_DEVICE, "OpenCL: kernel build failed (%d) with options \"%s\"; log: %.120s", (int)err,
                         options, cl->build_log ? cl->build_log : "(none)");
    }
    *program = p;
    return MOE_OK;
}

static moe_result moe__cl_make_kernels(moe_cl_ctx *cl, moe__cl_program p, int count, moe__cl_kernel *kernels) {
    int i;
    for (i = 0; i < count; i++) {
        moe__cl_int err;
        kernels[i] = MOE__CLF(cl, clCreateKernel)(p, moe__cl_kernel_names[i], &err);
        if (err != MOE__CL_SUCCESS) return moe__cl_fail(cl->ctx, err, moe__cl_kernel_names[i]);
    }
    return MOE_OK;
}

static void moe__cl_release_kernels(moe_cl_ctx *cl, moe__cl_kernel *kernels, int count) {
    int i;
    for (i = 0; i < count; i++)
        if (kernels[i]) { MOE__CLF(cl, clReleaseKernel)(kernels[i]); kernels[i] = NULL; }
}

static moe_result moe__cl_choose_tiles(moe_cl_ctx *cl);

// >>cl_ctx_api --------------------------------------------------------------
static moe_result moe__cl_open(moe_cl_ctx *cl) {
    moe__cl_device_entry list[MOE__CL_MAX_DEVICES];
    const char *want = cl->desc.device ? cl->desc.device : getenv("MOE_CL_DEVICE");
    int n, pick = -1, i;
    moe__cl_int err;
    moe__cl_props props[3];
    if (want && strcmp(want, "none") == 0) {
        snprintf(cl->reason, sizeof cl->reason, "device \"none\" asked for");
        return MOE_ERR_UNSUPPORTED;
    }
    if (!moe__cl_load(&cl->api, cl->desc.library, cl->reason, sizeof cl->reason)) return MOE_ERR_UNSUPPORTED;
    n = moe__cl_enumerate(&cl->api, list, MOE__CL_MAX_DEVICES, cl->reason, sizeof cl->reason);
    if (n == 0) return MOE_ERR_UNSUPPORTED;
    if (want && want[0]) {
        char *end;
        long idx = strtol(want, &end, 10);
        if (*end == 0) pick = idx >= 0 && idx < n ? (int)idx : -2;
        else for (i = 0; i < n && pick < 0; i++) if (moe__cl_contains(list[i].name, want)) pick = i;
        if (pick < 0) {
            snprintf(cl->reason, sizeof cl->reason, "no OpenCL device matches \"%.60s\" (%d device(s), first: %.120s)", want, n, list[0].name);
            return MOE_ERR_UNSUPPORTED;
        }
    } else {
        for (i = 0; i < n && pick < 0; i++) if (list[i].type & MOE__CL_DEVICE_TYPE_GPU) pick = i;
        if (pick < 0) pick = 0;
    }
    cl->platform = list[pick].platform;
    cl->device = list[pick].device;
    cl->type = list[pick].type;
    moe__strlcpy(cl->name, list[pick].name, sizeof cl->name);
    MOE__CLF(cl, clGetDeviceInfo)(cl->device, MOE__CL_DEVICE_MAX_MEM_ALLOC_SIZE, sizeof cl->max_alloc, &cl->max_alloc, NULL);
    MOE__CLF(cl, clGetDeviceInfo)(cl->device, MOE__CL_DEVICE_GLOBAL_MEM_SIZE, sizeof cl->global_mem, &cl->global_mem, NULL);
    MOE__CLF(cl, clGetDeviceInfo)(cl->device, MOE__CL_DEVICE_MAX_WORK_GROUP_SIZE, sizeof cl->max_wg, &cl->max_wg, NULL);
    props[0] = 0x1084; /* CL_CONTEXT_PLATFORM */
    props[1] = (moe__cl_props)cl->platform;
    props[2] = 0;
    cl->context = MOE__CLF(cl, clCreateContext)(props, 1, &cl->device, NULL, NULL, &err);
    if (err != MOE__CL_SUCCESS) {
        snprintf(cl->reason, sizeof cl->reason, "clCreateContext on %.180s failed (%d)", cl->name, (int)err);
        return MOE_ERR_UNSUPPORTED;
    }
    cl->queue = MOE__CLF(cl, clCreateCommandQueue)(cl->context, cl->device, 0, &err);
    if (err != MOE__CL_SUCCESS) {
        snprintf(cl->reason, sizeof cl->reason, "clCreateCommandQueue on %.180s failed (%d)", cl->name, (int)err);
        return MOE_ERR_UNSUPPORTED;
    }
    return MOE_OK;
}

static void moe__cl_close(moe_cl_ctx *cl) {
    int i;
    moe__cl_release_kernels(cl, cl->kernels, MOE__CLK_COUNT);
    for (i = 0; i < 2; i++) {
        moe__cl_release_kernels(cl, cl->q_kernels[i], 3);
        if (cl->q_program[i]) MOE__CLF(cl, clReleaseProgram)(cl->q_program[i]);
        cl->q_program[i] = NULL;
    }
    if (cl->dummy) MOE__CLF(cl, clReleaseMemObject)(cl->dummy);
    if (cl->program) MOE__CLF(cl, clReleaseProgram)(cl->program);
    if (cl->queue) MOE__CLF(cl, clReleaseCommandQueue)(cl->queue);
    if (cl->context) MOE__CLF(cl, clReleaseContext)(cl->context);
    cl->dummy = NULL; cl->program = NULL; cl->queue = NULL; cl->context = NULL;
    moe__cl_unload(&cl->api);
}

MOEDEF moe_result moe_cl_ctx_init(moe_ctx *ctx, const moe_cl_desc *desc, moe_cl_ctx **out) {
    moe_cl_ctx *cl;
    moe_result r;
    moe__cl_int err;
    if (!ctx || !out) return MOE_ERR_INVALID_ARGUMENT;
    *out = NULL;
    cl = (moe_cl_ctx *)moe__calloc(ctx, sizeof *cl);
    if (!cl) return moe__fail(ctx, MOE_ERR_OUT_OF_MEMORY, "OpenCL context");
    cl->ctx = ctx;
    if (desc) cl->desc = *desc;
    if (!cl->desc.cache_dir) cl->desc.cache_dir = getenv("MOE_CL_CACHE");
    r = moe__cl_open(cl);
    if (r == MOE_OK) {
        r = moe__cl_choose_tiles(cl);
        if (r == MOE_OK) r = moe__cl_build(cl, &cl->tiles, 0, "", &cl->program);
        if (r == MOE_OK) r = moe__cl_make_kernels(cl, cl->program, MOE__CLK_COUNT, cl->kernels);
        if (r == MOE_OK) {
            cl->dummy = MOE__CLF(cl, clCreateBuffer)(cl->context, MOE__CL_MEM_READ_WRITE, 64, NULL, &err);
            if (err != MOE__CL_SUCCESS) r = moe__cl_fail(ctx, err, "clCreateBuffer");
        }
        if (r != MOE_OK) {  /* a device that fails here is an error, not a fallback: the message says why */
            moe__cl_close(cl);
            moe__free(ctx, cl->build_log);
            moe__free(ctx, cl);
            return r;
        }
        moe__cl_tiles_text(&cl->tiles, cl->tiles_text, sizeof cl->tiles_text);
        *out = cl;
        return MOE_OK;
    }
    moe__cl_close(cl);
    if (cl->desc.require_device) {
        r = moe__fail(ctx, MOE_ERR_UNSUPPORTED, "OpenCL: %s", cl->reason);
        moe__free(ctx, cl);
        return r;
    }
    cl->fallback = 1;
    moe__strlcpy(cl->name, "cpu (fallback)", sizeof cl->name);
    if (ctx->log) {
        char msg[300];
        snprintf(msg, sizeof msg, "moe_cl: running on the CPU: %s", cl->reason);
        ctx->log(MOE_LOG_WARNING, msg, ctx->log_user);
    }
    *out = cl;
    return MOE_OK;
}

MOEDEF void moe_cl_ctx_destroy(moe_cl_ctx *cl) {
    if (!cl) return;
    moe__cl_close(cl);
    moe__free(cl->ctx, cl->build_log);
    moe__free(cl->ctx, cl);
}

MOEDEF int moe_cl_ctx_fallback(const moe_cl_ctx *cl) { return !cl || cl->fallback; }
MOEDEF const char *moe_cl_ctx_reason(const moe_cl_ctx *cl) { return cl ? cl->reason : "no context"; }
MOEDEF const char *moe_cl_device_name(const moe_cl_ctx *cl) { return cl ? cl->name : ""; }
MOEDEF const char *moe_cl_build_log(const moe_cl_ctx *cl) { return cl && cl->build_log ? cl->build_log : ""; }
MOEDEF const char *moe_cl_tiles(const moe_cl_ctx *cl) { return cl && !cl->fallback ? cl->tiles_text : ""; }

MOEDEF moe_result moe_cl_finish(moe_cl_ctx *cl) {
    if (!cl) return MOE_ERR_INVALID_ARGUMENT;
    if (cl->fallback) return MOE_OK;
    MOE__CL_CHECK(cl, MOE__CLF(cl, clFinish)(cl->queue), "clFinish");
    return MOE_OK;
}

// >>cl_launch ---------------------------------------------------------------
/* Kernel arguments in order; the first failure is kept and reported at launch. */
typedef struct moe__cl_args {
    moe_cl_ctx *cl;
    int kernel;
    moe__cl_kernel k;           /* cl->kernels[kernel], or the half-weight GEMM */
    moe__cl_uint n;
    moe__cl_int err;
} moe__cl_args;

static moe__cl_args moe__cl_begin(moe_cl_ctx *cl, int kernel) {
    moe__cl_args a;
    a.cl = cl; a.kernel = kernel; a.k = cl->kernels[kernel]; a.n = 0; a.err = MOE__CL_SUCCESS;
    return a;
}

static void moe__cl_arg(moe__cl_args *a, size_t size, const void *value) {
    moe__cl_int e = MOE__CLF(a->cl, clSetKernelArg)(a->k, a->n++, size, value);
    if (a->err == MOE__CL_SUCCESS) a->err = e;
}
static void moe__cl_int_arg(moe__cl_args *a, int64_t v) { int32_t x = (int32_t)v; moe__cl_arg(a, sizeof x, &x); }
static void moe__cl_long_arg(moe__cl_args *a, int64_t v) { moe__cl_arg(a, sizeof v, &v); }
static void moe__cl_float_arg(moe__cl_args *a, float v) { moe__cl_arg(a, sizeof v, &v); }
static void moe__cl_mem_arg(moe__cl_args *a, moe__cl_mem m) {
    if (!m) m = a->cl->dummy;
    moe__cl_arg(a, sizeof m, &m);
}

/* Enqueue over global sizes g0 x g1 x g2 (rounded up to the local size when one is given);
   ev (may be NULL) receives the launch's event. */
static moe_result moe__cl_run_event(moe__cl_args *a, int dims, size_t g0, size_t g1, size_t g2, const size_t *local, moe__cl_event *ev) {
    size_t global[3];
    moe__cl_int err;
    global[0] = g0 ? g0 : 1; global[1] = g1 ? g1 : 1; global[2] = g2 ? g2 : 1;
    if (a->err != MOE__CL_SUCCESS) return moe__cl_fail(a->cl->ctx, a->err, moe__cl_kernel_names[a->kernel]);
    if (local) {
        int d;
        for (d = 0; d < dims; d++) global[d] = (global[d] + local[d] - 1) / local[d] * local[d];
    }
    err = MOE__CLF(a->cl, clEnqueueNDRangeKernel)(a->cl->queue, a->k, (moe__cl_uint)dims, NULL, global, local, 0, NULL, ev);
    if (err != MOE__CL_SUCCESS) return moe__cl_fail(a->cl->ctx, err, moe__cl_kernel_names[a->kernel]);
    return MOE_OK;
}

static moe_result moe__cl_run(moe__cl_args *a, int dims, size_t g0, size_t g1, size_t g2, const size_t *local) {
    return moe__cl_run_event(a, dims, g0, g1, g2, local, NULL);
}

// >>cl_gemm -----------------------------------------------------------------
/* An operand: buffer, offset and leading dimension in floats, optional row index list,
   and the offset step from one group (expert) to the next. */
typedef struct moe__cl_mat {
    moe__cl_mem buf;
    int64_t off, ld;
    moe__cl_mem rows;
    int64_t gstride;
} moe__cl_mat;

typedef struct moe__cl_gemm {
    moe__gemm_op op;
    int64_t M, N, K;
    moe__cl_mat A, B, C;
    moe__cl_mem bias;           /* NULL: none */
    int64_t bias_off, bias_gstride;
    moe__cl_mem groups;         /* row offsets [n_groups + 1] */
    int group_mode;             /* 0 none, 1 groups split M (M: most rows), 2 groups split K */
    int n_groups;
    int accumulate;
    int epi, act;               /* 1 D = act(C); 2 D = silu(Z) * C; 3 C *= act'(Z) */
    moe__cl_mem D, Z;
    int b_q;                    /* B holds 16-bit values: 1 half (the B_HALF build), 2 bfloat16 (B_BF16) */
} moe__cl_gemm;

static moe__cl_mat moe__cl_mat_of(moe__cl_mem buf, int64_t off, int64_t ld) {
    moe__cl_mat m;
    m.buf = buf; m.off = off; m.ld = ld; m.rows = NULL; m.gstride = 0;
    return m;
}

static moe__cl_gemm moe__cl_gemm_make(moe__gemm_op op, int64_t M, int64_t N, int64_t K, moe__cl_mat A, moe__cl_mat B, moe__cl_mat C) {
    moe__cl_gemm g;
    memset(&g, 0, sizeof g);
    g.op = op; g.M = M; g.N = N; g.K = K; g.A = A; g.B = B; g.C = C;
    return g;
}

/* The one matrix-multiply entry point of the device (see the kernel's comment); ev may be NULL. */
static moe_result moe__cl_gemm_event(moe_cl_ctx *cl, const moe__cl_gemm *g, moe__cl_event *ev) {
    const moe__cl_tiles *t = &cl->tiles;
    int kernel = g->op == MOE__NT ? MOE__CLK_gemm_nt : g->op == MOE__NN ? MOE__CLK_gemm_nn : MOE__CLK_gemm_tn;
    moe__cl_args a = moe__cl_begin(cl, kernel);
    /* a TM x TN tile of C per work-group (tiled) or per work-item (direct) */
    if (g->b_q) a.k = cl->q_kernels[g->b_q - 1][kernel - MOE__CLK_gemm_nt];
    int64_t rows = t->tm, cols = t->tn;
    size_t local[3], tiles_m, tiles_n;
    if (g->M <= 0 || g->N <= 0) return MOE_OK;
    local[0] = t->direct ? 1 : (size_t)(t->tn / t->rn); local[1] = t->direct ? 1 : (size_t)(t->tm / t->rm); local[2] = 1;
    tiles_m = (size_t)((g->M + rows - 1) / rows) + (g->group_mode == 1 ? (size_t)g->n_groups : 0);
    tiles_n = (size_t)((g->N + cols - 1) / cols);
    moe__cl_int_arg(&a, g->M); moe__cl_int_arg(&a, g->N); moe__cl_int_arg(&a, g->K);
    moe__cl_mem_arg(&a, g->A.buf); moe__cl_long_arg(&a, g->A.off); moe__cl_int_arg(&a, g->A.ld);
    moe__cl_mem_arg(&a, g->A.rows); moe__cl_int_arg(&a, g->A.rows != NULL);
    moe__cl_mem_arg(&a, g->B.buf); moe__cl_long_arg(&a, g->B.off); moe__cl_int_arg(&a, g->B.ld);
    moe__cl_mem_arg(&a, g->B.rows); moe__cl_int_arg(&a, g->B.rows != NULL); moe__cl_long_arg(&a, g->B.gstride);
    moe__cl_mem_arg(&a, g->C.buf); moe__cl_long_arg(&a, g->C.off); moe__cl_int_arg(&a, g->C.ld); moe__cl_long_arg(&a, g->C.gstride);
    moe__cl_mem_arg(&a, g->bias); moe__cl_long_arg(&a, g->bias_off); moe__cl_int_arg(&a, g->bias != NULL); moe__cl_long_arg(&a, g->bias_gstride);
    moe__cl_mem_arg(&a, g->groups); moe__cl_int_arg(&a, g->group_mode); moe__cl_int_arg(&a, g->n_groups);
    moe__cl_int_arg(&a, g->accumulate); moe__cl_int_arg(&a, g->epi); moe__cl_int_arg(&a, g->act);
    moe__cl_mem_arg(&a, g->D); moe__cl_mem_arg(&a, g->Z);
    if (!t->direct) { tiles_n *= local[0]; tiles_m *= local[1]; }
    return moe__cl_run_event(&a, 3, tiles_n, tiles_m, g->group_mode == 2 ? (size_t)g->n_groups : 1, local, ev);
}

static moe_result moe__cl_gemm_run(moe_cl_ctx *cl, const moe__cl_gemm *g) { return moe__cl_gemm_event(cl, g, NULL); }

/* dst[g * gstride + c] += column sums of src's rows (of group g; all rows without groups). */
static moe_result moe__cl_colsum(moe_cl_ctx *cl, int64_t rows, int64_t cols, moe__cl_mem src, int64_t ld,
                                 moe__cl_mem groups, int n_groups, moe__cl_mem dst, int64_t dst_off, int64_t dst_gstride) {
    moe__cl_args a = moe__cl_begin(cl, MOE__CLK_colsum);
    moe__cl_int_arg(&a, rows); moe__cl_int_arg(&a, cols); moe__cl_mem_arg(&a, src); moe__cl_int_arg(&a, ld);
    moe__cl_mem_arg(&a, groups); moe__cl_int_arg(&a, n_groups); moe__cl_mem_arg(&a, dst);
    moe__cl_long_arg(&a, dst_off); moe__cl_long_arg(&a, dst_gstride);
    return moe__cl_run(&a, 2, (size_t)cols, (size_t)(n_groups ? n_groups : 1), 1, NULL);
}

// >>cl_tuning ---------------------------------------------------------------
/* Candidate GEMM tiles; a device takes the fastest on a 512^3 NN product that it can run. */
static const moe__cl_tiles moe__cl_candidates[] = {
    { 64, 64, 16, 4, 4, 0 }, { 32, 32, 16, 4, 4, 0 }, { 128, 64, 16, 8, 4, 0 }, { 64, 128, 8, 4, 8, 0 },
    { 32, 64, 1024, 8, 16, 1 }, { 32, 64, 256, 8, 16, 1 }, { 16, 64, 1024, 8, 16, 1 }, { 32, 128, 1024, 8, 16, 1 }, { 32, 32, 1024, 8, 8, 1 }
};
#define MOE__CL_N_CANDIDATES ((int)(sizeof moe__cl_candidates / sizeof moe__cl_candidates[0]))
#define MOE__CL_TUNE_N 512

/* "device name|driver" identifies a device in the cache file. */
static void moe__cl_device_key(moe_cl_ctx *cl, char *key, size_t cap) {
    char driver[128] = "";
    size_t i;
    MOE__CLF(cl, clGetDeviceInfo)(cl->device, MOE__CL_DRIVER_VERSION, sizeof driver - 1, driver, NULL);
    snprintf(key, cap, "%s|%s", cl->name, driver);
    for (i = 0; key[i]; i++) if (key[i] == '\n' || key[i] == '\r') key[i] = ' ';
}

/* Looks the key up in the cache file: lines "TM TN TK RM RN DIRECT key". */
static int moe__cl_cache_read(const char *path, const char *key, moe__cl_tiles *t) {
    char line[600];
    int found = 0;
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    while (!found && fgets(line, sizeof line, f)) {
        moe__cl_tiles c;
        int used = 0;
        size_t n = strlen(line);
        while (n && (line[n - 1] == '\n' || line[n - 1] == '\r')) line[--n] = 0;
        if (sscanf(line, "%d %d %d %d %d %d %n", &c.tm, &c.tn, &c.tk, &c.rm, &c.rn, &c.direct, &used) == 6 && strcmp(line + used, key) == 0) {
            *t = c;
            found = 1;
        }
    }
    fclose(f);
    return found;
}

/* Seconds of one gemm_nt run of the candidate on n x n x n, or a negative value when the
   device cannot build or run it. */
static double moe__cl_time_candidate(moe_cl_ctx *cl, const moe__cl_tiles *t, moe__cl_queue queue, moe__cl_mem a, moe__cl_mem c) {
    moe__cl_program p = NULL;
    moe__cl_kernel k[2] = { NULL, NULL };  /* gemm_nt, gemm_nn: the first two kernels */
    moe__cl_tiles saved = cl->tiles;
    moe__cl_kernel saved_kernel = cl->kernels[MOE__CLK_gemm_nn];
    moe__cl_queue saved_queue = cl->queue;
    double best = -1.0;
    int rep;
    char msg[sizeof cl->ctx->error];
    if ((size_t)((t->tm / t->rm) * (t->tn / t->rn)) > cl->max_wg) return -1.0;
    memcpy(msg, cl->ctx->error, sizeof msg);
    if (moe__cl_build(cl, t, 1, "", &p) != MOE_OK || moe__cl_make_kernels(cl, p, 2, k) != MOE_OK) {
        memcpy(cl->ctx->error, msg, sizeof msg);  /* an unbuildable candidate is not an error */
        moe__cl_release_kernels(cl, k, 2);
        if (p) MOE__CLF(cl, clReleaseProgram)(p);
        return -1.0;
    }
    cl->tiles = *t;
    cl->kernels[MOE__CLK_gemm_nn] = k[1];
    cl->queue = queue;
    for (rep = 0; rep < 4; rep++) {
        moe__cl_gemm g = moe__cl_gemm_make(MOE__NN, MOE__CL_TUNE_N, MOE__CL_TUNE_N, MOE__CL_TUNE_N, moe__cl_mat_of(a, 0, MOE__CL_TUNE_N),
                                           moe__cl_mat_of(a, 0, MOE__CL_TUNE_N), moe__cl_mat_of(c, 0, MOE__CL_TUNE_N));
        moe__cl_ulong t0 = 0, t1 = 0;
        moe__cl_event ev = NULL;
        double s;
        if (moe__cl_gemm_event(cl, &g, &ev) != MOE_OK || MOE__CLF(cl, clWaitForEvents)(1, &ev) != MOE__CL_SUCCESS ||
            MOE__CLF(cl, clGetEventProfilingInfo)(ev, MOE__CL_PROFILING_COMMAND_START, sizeof t0, &t0, NULL) != MOE__CL_SUCCESS ||
            MOE__CLF(cl, clGetEventProfilingInfo)(ev, MOE__CL_PROFILING_COMMAND_END, sizeof t1, &t1, NULL) != MOE__CL_SUCCESS) {
            if (ev) MOE__CLF(cl, clReleaseEvent)(ev);
            best = -1.0;
            break;
        }
        MOE__CLF(cl, clReleaseEvent)(ev);
        s = (double)(t1 - t0) * 1e-9;
        if (rep > 0 && (best < 0.0 || s < best)) best = s;  /* the first run warms up */
    }
    memcpy(cl->ctx->error, msg, sizeof msg);
    cl->tiles = saved;
    cl->kernels[MOE__CLK_gemm_nn] = saved_kernel;
    cl->queue = saved_queue;
    moe__cl_release_kernels(cl, k, 2);
    MOE__CLF(cl, clReleaseProgram)(p);
    return best;
}

/* Tile sizes for this device: the cache file's, else the fastest candidate (then cached). */
static moe_result moe__cl_choose_tiles(moe_cl_ctx *cl) {
    char key[400], path[1024];
    moe__cl_queue queue;
    moe__cl_mem a = NULL, c = NULL;
    moe__cl_int err;
    double best = -1.0;
    int i;
    cl->tiles = (cl->type & MOE__CL_DEVICE_TYPE_CPU) ? moe__cl_default_cpu_tiles : moe__cl_default_tiles;
    if (cl->desc.tiles) {
        moe__cl_tiles t;
        int rn_ok;
        if (sscanf(cl->desc.tiles, "%d %d %d %d %d %d", &t.tm, &t.tn, &t.tk, &t.rm, &t.rn, &t.direct) != 6 || t.tm < 1 || t.tn < 1 ||
            t.tk < 1 || t.rm < 1 || t.rn < 1 || t.tm % t.rm || t.tn % t.rn || (size_t)((t.tm / t.rm) * (t.tn / t.rn)) > cl->max_wg)
            return moe__fail(cl->ctx, MOE_ERR_INVALID_ARGUMENT, "OpenCL: tiles \"%s\" is not \"TM TN TK RM RN DIRECT\" with RM | TM, RN | TN "
                             "and (TM/RM)*(TN/RN) <= %zu", cl->desc.tiles, cl->max_wg);
        rn_ok = (t.rn == 2 || t.rn == 4 || t.rn == 8 || t.rn == 16) && (t.rm == 2 || t.rm == 4 || t.rm == 8 || t.rm == 16);
        if (t.direct && !rn_ok) return moe__fail(cl->ctx, MOE_ERR_INVALID_ARGUMENT, "OpenCL: the direct GEMM needs RM and RN of 2, 4, 8 or 16");
        t.direct = t.direct != 0;
        cl->tiles = t;
        return MOE_OK;
    }
    if (cl->desc.no_tuning) return MOE_OK;
    moe__cl_device_key(cl, key, sizeof key);
    path[0] = 0;
    if (cl->desc.cache_dir && cl->desc.cache_dir[0]) {
        snprintf(path, sizeof path, "%s/moe_cl_tuning.txt", cl->desc.cache_dir);
        if (moe__cl_cache_read(path, key, &cl->tiles)) return MOE_OK;
    }
    queue = MOE__CLF(cl, clCreateCommandQueue)(cl->context, cl->device, MOE__CL_QUEUE_PROFILING_ENABLE, &err);
    if (err != MOE__CL_SUCCESS) return MOE_OK;  /* no profiling: keep the defaults */
    a = MOE__CLF(cl, clCreateBuffer)(cl->context, MOE__CL_MEM_READ_WRITE, (size_t)MOE__CL_TUNE_N * MOE__CL_TUNE_N * sizeof(float), NULL, &err);
    if (err == MOE__CL_SUCCESS)
        c = MOE__CLF(cl, clCreateBuffer)(cl->context, MOE__CL_MEM_READ_WRITE, (size_t)MOE__CL_TUNE_N * MOE__CL_TUNE_N * sizeof(float), NULL, &err);
    if (err == MOE__CL_SUCCESS && (cl->dummy = MOE__CLF(cl, clCreateBuffer)(cl->context, MOE__CL_MEM_READ_WRITE, 64, NULL, &err)) != NULL) {
        float zero = 0.0f;
        MOE__CLF(cl, clEnqueueFillBuffer)(queue, a, &zero, sizeof zero, 0, (size_t)MOE__CL_TUNE_N * MOE__CL_TUNE_N * sizeof(float), 0, NULL, NULL);
        for (i = 0; i < MOE__CL_N_CANDIDATES; i++) {
            double s = moe__cl_time_candidate(cl, &moe__cl_candidates[i], queue, a, c);
            if (s > 0.0 && (best < 0.0 || s < best)) { best = s; cl->tiles = moe__cl_candidates[i]; }
        }
        MOE__CLF(cl, clReleaseMemObject)(cl->dummy);
        cl->dummy = NULL;
    }
    if (a) MOE__CLF(cl, clReleaseMemObject)(a);
    if (c) MOE__CLF(cl, clReleaseMemObject)(c);
    MOE__CLF(cl, clReleaseCommandQueue)(queue);
    if (path[0] && best > 0.0) {
        FILE *f = fopen(path, "a");
        if (f) {
            fprintf(f, "%d %d %d %d %d %d %s\n", cl->tiles.tm, cl->tiles.tn, cl->tiles.tk, cl->tiles.rm, cl->tiles.rn, cl->tiles.direct, key);
            fclose(f);
        }
    }
    return MOE_OK;
}

// >>cl_model ----------------------------------------------------------------
/* Device buffers of an expert bank (routed or shared), names as in moe__bank. */
typedef struct moe__cl_bank {
    moe__cl_mem offsets, row_token;   /* [n + 1], [rows] */
    moe__cl_mem bz[MOE__MAX_LINEARS], ba[MOE__MAX_LINEARS], bout, bdz[MOE__MAX_LINEARS], bda, bdxr;
} moe__cl_bank;

/* Device buffers of one layer, for max_tokens rows (names as in struct moe_layer). */
typedef struct moe__cl_layer {
    moe_layer *l;
    int64_t poff;               /* the layer's parameters in the model blob, in floats */
    moe__cl_mem out;            /* [T, d_out] */
    moe__cl_mem z, dz, mean, rstd;  /* dense [T, d_out]; norms [T] */
    moe__cl_mem clean, p, lse, entropy, sel, pos, gate, chosen, kept, sums;
    moe__cl_mem importance, dimportance;  /* [E] with the importance loss: sums of gates, gradient */
    moe__cl_mem raw, noise_n, h, dstd;    /* noisy top-k: [T, E] noise logits, noise, noisy logits, dL/draw */
    moe__cl_mem thr, load, dload;         /* noisy top-k: [T, 2] k-th / (k+1)-th expert; [E] load and its gradient */
    moe__cl_mem key, group_score, group_sel, bias_keep;  /* sigmoid: [T, E], [T, G] x 2 scratch; [E] */
    int call_k;                 /* experts per token of the last forward (moe_forward_opts.top_k) */
    int q;                      /* expert weights read from dm->wh: 0 no (fp32), 1 half, 2 bfloat16 */
    int64_t slots, rows;        /* routing slots per token (k; expert choice: E), routed expert rows */
    moe__cl_bank bank[2];
    moe__cl_mem dgate, dh, dxu;
    moe__cl_mem xr, jit;        /* jitter: [T, D] router input and its factors */
    moe__cl_mem u;              /* the router input of the last forward: x or xr */
    int64_t noise_step;         /* training forwards so far (the layer's random streams) */
    int64_t *kept_host;         /* [E] tokens_per_expert of the stats */
} moe__cl_layer;

struct moe_cl_model {
    moe_cl_ctx *cl;
    moe_model *model;           /* NULL for a layer uploaded alone */
    moe_layer *layer;           /* that layer */
    moe_layer *src;             /* the host layers: model->layers or layer */
    float *host_params, *host_grads;
    int64_t d_in, d_out;
    float *fallback_y;          /* a layer on the CPU: its output when the caller wants none */
    float *host_jit;            /* jitter factors on their way to the device */
    float *host_noise;          /* noisy top-k: the standard-normal draws on their way to the device */
    moe_ctx *ctx;
    int fallback;
    moe__cl_layer *layers;
    int n_layers;
    moe__cl_mem params, grads, m, v;
    moe__cl_mem wt;             /* direct GEMM: every weight matrix transposed, same offsets */
    moe__cl_mem wh;             /* 16-bit expert weights (half or bf16 per layer; as wt where wt is used) */
    int n_quantized;            /* layers whose forwards read wh: no training while > 0 */
    moe__cl_mem x, labels, values, dloss, tok, dbuf[2], partial;
    moe__cl_mem ids;            /* [T] token ids (hash routers) */
    moe__cl_mem *mems;          /* every buffer, to release */
    int n_mems, cap_mems;
    int64_t n_params, max_tokens, T, n_chunks, step, bytes;
    int has_forward;
    moe_result err;             /* first allocation failure of the upload */
    float *host_f;              /* scratch: outputs, per-token losses, norm partials, sums */
    int32_t *host_i;            /* scratch: routing slots, counts */
    int64_t *host_kept;
};

static moe__cl_mem moe__cl_buffer(moe_cl_model *dm, int64_t count, size_t elem) {
    moe_cl_ctx *cl = dm->cl;
    size_t bytes = (size_t)(count > 0 ? count : 1) * elem;
    moe__cl_int err;
    moe__cl_mem m;
    float zero = 0.0f;
    if (dm->err != MOE_OK) return NULL;
    if (dm->n_mems >= dm->cap_mems) {
        dm->err = moe__fail(dm->ctx, MOE_ERR_STATE, "OpenCL: more device buffers than planned (%d)", dm->n_mems);
        return NULL;
    }
    bytes = (bytes + 63) & ~(size_t)63;
    dm->bytes += (int64_t)bytes;
    if ((cl->desc.max_device_bytes > 0 && dm->bytes > cl->desc.max_device_bytes) || (cl->max_alloc && bytes > cl->max_alloc) ||
        (cl->global_mem && (moe__cl_ulong)dm->bytes > cl->global_mem)) {
        dm->err = moe__fail(dm->ctx, MOE_ERR_OUT_OF_MEMORY, "OpenCL: the model needs more device memory than %s allows (%lld bytes so far, one buffer %zu)",
                            cl->name, (long long)dm->bytes, bytes);
        return NULL;
    }
    m = MOE__CLF(cl, clCreateBuffer)(cl->context, MOE__CL_MEM_READ_WRITE, bytes, NULL, &err);
    if (err == MOE__CL_SUCCESS) {
        dm->mems[dm->n_mems++] = m;
        /* zeroed now: allocation failures show up here, and no buffer holds garbage */
        err = MOE__CLF(cl, clEnqueueFillBuffer)(cl->queue, m, &zero, sizeof zero, 0, bytes, 0, NULL, NULL);
    }
    if (err != MOE__CL_SUCCESS) {
        dm->err = moe__cl_fail(dm->ctx, err, "allocating device memory");
        return NULL;
    }
    return m;
}

static moe_result moe__cl_write(moe_cl_model *dm, moe__cl_mem m, const void *src, size_t bytes) {
    if (bytes == 0) return MOE_OK;
    MOE__CL_CHECK(dm->cl, MOE__CLF(dm->cl, clEnqueueWriteBuffer)(dm->cl->queue, m, MOE__CL_TRUE, 0, bytes, src, 0, NULL, NULL), "clEnqueueWriteBuffer");
    return MOE_OK;
}

static moe_result moe__cl_read(moe_cl_model *dm, moe__cl_mem m, size_t offset, void *dst, size_t bytes) {
    if (bytes == 0) return MOE_OK;
    MOE__CL_CHECK(dm->cl, MOE__CLF(dm->cl, clEnqueueReadBuffer)(dm->cl->queue, m, MOE__CL_TRUE, offset, bytes, dst, 0, NULL, NULL), "clEnqueueReadBuffer");
    return MOE_OK;
}

/* The tensor names the device knows for layer l (any other, e.g. of a layer kind or option
   added to moe.h later, keeps the layer on the CPU). */
static int moe__cl_known_tensor(const moe_layer *l, const char *name) {
    static const char *const parts[] = { "w1", "w2", "w3", "fc0", "fc1", "fc2", "fc3", "fc4", "fc5", "fc6", "fc7", "fc8", NULL };
    const char *dot;
    int i;
    if (l->d.kind != MOE_LAYER_MOE) return strcmp(name, "weight") == 0 || strcmp(name, "bias") == 0;
    if (strcmp(name, "router.weight") == 0 || strcmp(name, "router.bias") == 0) return 1;
    if (strcmp(name, "router.noise_weight") == 0) return l->d.router == MOE_ROUTER_NOISY_TOPK;
    if (strcmp(name, "router.selection_bias") == 0) return l->d.router == MOE_ROUTER_SIGMOID;
    if (strncmp(name, "experts.", 8) == 0) name += 8;
    else if (strncmp(name, "shared.", 7) == 0) name += 7;
    else return 0;
    dot = strchr(name, '.');
    if (!dot || (strcmp(dot, ".weight") != 0 && strcmp(dot, ".bias") != 0)) return 0;
    for (i = 0; parts[i]; i++)
        if (strlen(parts[i]) == (size_t)(dot - name) && strncmp(name, parts[i], (size_t)(dot - name)) == 0) return 1;
    return 0;
}

static const char *moe__cl_unknown_tensor(const moe_layer *l, char *why, size_t cap) {
    int i;
    for (i = 0; i < l->n_tensors; i++)
        if (!moe__cl_known_tensor(l, l->tensors[i].name)) {
            snprintf(why, cap, "tensor \"%s\"", l->tensors[i].name);
            return why;
        }
    return NULL;
}

/* Whitelist of what the device runs: NULL when layer i does, else why not (naming the field).
   Anything not listed here (a new layer kind, router, expert kind, activation, or an option
   that brings its own tensors) is refused rather than run wrongly. */
static const char *moe__cl_unsupported(const moe_layer *l, char *why, size_t cap) {
    const moe_layer_desc *d = &l->d;
    switch (d->kind) {
    case MOE_LAYER_DENSE: case MOE_LAYER_MOE: case MOE_LAYER_RMSNORM: case MOE_LAYER_LAYERNORM: break;
    case MOE_LAYER_MULTIGATE: case MOE_LAYER_TASK_TOWERS: return "a multi-task layer (multigate, task towers; field kind)";
    case MOE_LAYER_EMBEDDING: return "the embedding layer (field kind)";
    default: snprintf(why, cap, "kind %d (field kind)", (int)d->kind); return why;
    }
    if ((d->kind == MOE_LAYER_DENSE || (d->kind == MOE_LAYER_MOE && d->expert == MOE_EXPERT_MLP)) &&
        !(d->activation >= MOE_ACT_IDENTITY && d->activation <= MOE_ACT_SIGMOID)) {
        snprintf(why, cap, "activation %d (field activation)", (int)d->activation);
        return why;
    }
    if (d->kind != MOE_LAYER_MOE) return moe__cl_unknown_tensor(l, why, cap);
    switch (d->router) {
    case MOE_ROUTER_TOPK: case MOE_ROUTER_NOISY_TOPK: case MOE_ROUTER_SWITCH: case MOE_ROUTER_SIGMOID: case MOE_ROUTER_EXPERT_CHOICE:
    case MOE_ROUTER_HASH: break;
    default: snprintf(why, cap, "router %d (field router)", (int)d->router); return why;
    }
    switch (d->expert) {
    case MOE_EXPERT_LINEAR: case MOE_EXPERT_MLP: case MOE_EXPERT_SWIGLU: break;
    case MOE_EXPERT_GEGLU: return "GeGLU experts (field expert)";
    case MOE_EXPERT_GAUSSIAN: return "Gaussian experts (mixture density; field expert)";
    default: snprintf(why, cap, "expert kind %d (field expert)", (int)d->expert); return why;
    }
    /* options that bring no tensor of their own (or one the tensor check would not name) */
    if (d->shared_gate == MOE_FLAG_ON) return "gated shared experts (field shared_gate)";
    if (d->combine == MOE_COMBINE_STACK) return "the stacking combine (field combine)";
    if (d->combine != MOE_COMBINE_SUM && d->combine != MOE_COMBINE_DEFAULT) return "a voting combine (field combine)";
    if (l->wdtype != MOE_DTYPE_F32 && l->wdtype != MOE_DTYPE_BF16) return "int8 expert weights (moe_layer_quantize; the device takes f32 and bf16)";
    if (l->n_banks < 1 || l->n_banks > 2 || l->bank[0].n_linears > MOE__MAX_LINEARS) return "an expert bank layout it does not know";
    return moe__cl_unknown_tensor(l, why, cap);
}

static void moe__cl_layer_alloc(moe_cl_model *dm, moe__cl_layer *cl_l) {
    const moe_layer *l = cl_l->l;
    const moe_layer_desc *d = &l->d;
    int64_t T = dm->max_tokens;
    int j;
    cl_l->out = moe__cl_buffer(dm, T * d->d_out, sizeof(float));
    if (d->kind == MOE_LAYER_DENSE) {
        cl_l->z = moe__cl_buffer(dm, T * d->d_out, sizeof(float));
        cl_l->dz = moe__cl_buffer(dm, T * d->d_out, sizeof(float));
    } else if (d->kind == MOE_LAYER_RMSNORM || d->kind == MOE_LAYER_LAYERNORM) {
        cl_l->mean = moe__cl_buffer(dm, T, sizeof(float));
        cl_l->rstd = moe__cl_buffer(dm, T, sizeof(float));
    } else if (d->kind == MOE_LAYER_MOE) {
        int64_t E = d->n_experts, K = d->router == MOE_ROUTER_EXPERT_CHOICE ? E : d->max_top_k, G = d->n_groups, bi;
        cl_l->clean = moe__cl_buffer(dm, T * E, sizeof(float));
        cl_l->p = moe__cl_buffer(dm, T * E, sizeof(float));
        cl_l->lse = moe__cl_buffer(dm, T, sizeof(float));
        cl_l->entropy = moe__cl_buffer(dm, T, sizeof(float));
        cl_l->sel = moe__cl_buffer(dm, T * K, sizeof(int32_t));
        cl_l->pos = moe__cl_buffer(dm, T * K, sizeof(int32_t));
        cl_l->gate = moe__cl_buffer(dm, T * K, sizeof(float));
        cl_l->chosen = moe__cl_buffer(dm, E, sizeof(int32_t));
        cl_l->kept = moe__cl_buffer(dm, E, sizeof(int32_t));
        cl_l->sums = moe__cl_buffer(dm, E + 2, sizeof(float));
        cl_l->importance = d->importance_loss > 0.0f ? moe__cl_buffer(dm, E, sizeof(float)) : NULL;
        cl_l->dimportance = d->importance_loss > 0.0f ? moe__cl_buffer(dm, E, sizeof(float)) : NULL;
        if (d->router == MOE_ROUTER_SIGMOID) {
            cl_l->key = moe__cl_buffer(dm, T * E, sizeof(float));
            cl_l->group_score = G > 1 ? moe__cl_buffer(dm, T * G, sizeof(float)) : NULL;
            cl_l->group_sel = G > 1 ? moe__cl_buffer(dm, T * G, sizeof(int32_t)) : NULL;
            cl_l->bias_keep = moe__cl_buffer(dm, E, sizeof(float));
        }
        if (d->router == MOE_ROUTER_NOISY_TOPK) {
            cl_l->raw = moe__cl_buffer(dm, T * E, sizeof(float));
            cl_l->noise_n = moe__cl_buffer(dm, T * E, sizeof(float));
            cl_l->h = moe__cl_buffer(dm, T * E, sizeof(float));
            cl_l->dstd = moe__cl_buffer(dm, T * E, sizeof(float));
            cl_l->thr = moe__cl_buffer(dm, 2 * T, sizeof(int32_t));
            cl_l->load = moe__cl_buffer(dm, E, sizeof(float));
            cl_l->dload = moe__cl_buffer(dm, E, sizeof(float));
        }
        for (bi = 0; bi < l->n_banks; bi++) {
            const moe__bank *b = &l->bank[bi];
            moe__cl_bank *cb = &cl_l->bank[bi];
            int64_t R = b->max_rows, H = b->d_hidden;
            cb->offsets = moe__cl_buffer(dm, b->n + 1, sizeof(int32_t));
            cb->row_token = moe__cl_buffer(dm, R, sizeof(int32_t));
            if (b->kind == MOE_EXPERT_SWIGLU) {
                cb->bz[0] = moe__cl_buffer(dm, R * H, sizeof(float));
                cb->bz[1] = moe__cl_buffer(dm, R * H, sizeof(float));
                cb->ba[0] = moe__cl_buffer(dm, R * H, sizeof(float));
                cb->bda = moe__cl_buffer(dm, R * H, sizeof(float));
            } else {
                for (j = 0; j + 1 < b->n_linears; j++) {
                    cb->bz[j] = moe__cl_buffer(dm, R * H, sizeof(float));
                    cb->ba[j] = moe__cl_buffer(dm, R * H, sizeof(float));
                }
            }
            cb->bout = moe__cl_buffer(dm, R * d->d_out, sizeof(float));
            for (j = 0; j < b->n_linears; j++) cb->bdz[j] = moe__cl_buffer(dm, R * b->lin[j].out, sizeof(float));
            cb->bdxr = moe__cl_buffer(dm, R * d->d_in, sizeof(float));
        }
        cl_l->dgate = moe__cl_buffer(dm, T * K, sizeof(float));
        cl_l->dh = moe__cl_buffer(dm, T * E, sizeof(float));
        cl_l->dxu = moe__cl_buffer(dm, T * d->d_in, sizeof(float));
        if (d->jitter > 0.0f) {
            cl_l->xr = moe__cl_buffer(dm, T * d->d_in, sizeof(float));
            cl_l->jit = moe__cl_buffer(dm, T * d->d_in, sizeof(float));
        }
    }
}

/* The direct GEMM runs x W^T as x (W^T) with W^T stored: rebuild every transposed weight
   (after the upload and after each optimizer step). */
static moe_result moe__cl_transpose(moe_cl_model *dm, const moe_layer *l, const moe__linear *lin, int n) {
    moe__cl_args a = moe__cl_begin(dm->cl, MOE__CLK_transpose);
    moe__cl_int_arg(&a, n); moe__cl_int_arg(&a, lin->out); moe__cl_int_arg(&a, lin->in);
    moe__cl_mem_arg(&a, dm->params); moe__cl_mem_arg(&a, dm->wt); moe__cl_long_arg(&a, (l->params - dm->host_params) + lin->w);
    return moe__cl_run(&a, 3, (size_t)lin->in, (size_t)lin->out, (size_t)n, NULL);
}

static moe_result moe__cl_refresh_transposed(moe_cl_model *dm) {
    int i, j, b;
    if (!dm->wt) return MOE_OK;
    for (i = 0; i < dm->n_layers; i++) {
        const moe_layer *l = &dm->src[i];
        if (l->d.kind == MOE_LAYER_DENSE) MOE__TRY(moe__cl_transpose(dm, l, &l->lin, 1));
        if (l->d.kind != MOE_LAYER_MOE) continue;
        if (l->router.w >= 0) MOE__TRY(moe__cl_transpose(dm, l, &l->router, 1));
        if (l->d.router == MOE_ROUTER_NOISY_TOPK) MOE__TRY(moe__cl_transpose(dm, l, &l->noise, 1));
        for (b = 0; b < l->n_banks; b++)
            for (j = 0; j < l->bank[b].n_linears; j++) MOE__TRY(moe__cl_transpose(dm, l, &l->bank[b].lin[j], l->bank[b].n));
    }
    return MOE_OK;
}

/* A product with a weight matrix B [N, K] of the parameters: NT as is, or NN on the
   transposed copy [K, N] where the direct GEMM runs (its NN loop is the fast one). */
static moe_result moe__cl_weight_gemm(moe_cl_model *dm, const moe__cl_gemm *g) {
    moe__cl_gemm t = *g;
    if (dm->wt && g->op == MOE__NT) {
        t.op = MOE__NN;
        t.B.buf = dm->wt;
        t.B.ld = g->N;
    }
    if (t.b_q) t.B.buf = dm->wh;
    return moe__cl_gemm_run(dm->cl, &t);
}

MOEDEF void moe_cl_model_destroy(moe_cl_model *dm) {
    int i;
    moe_ctx *ctx;
    if (!dm) return;
    ctx = dm->ctx;
    for (i = 0; i < dm->n_mems; i++) MOE__CLF(dm->cl, clReleaseMemObject)(dm->mems[i]);
    moe__free(ctx, dm->mems);
    moe__free(ctx, dm->layers);
    moe__free(ctx, dm->host_f);
    moe__free(ctx, dm->host_i);
    moe__free(ctx, dm->host_kept);
    moe__free(ctx, dm->fallback_y);
    moe__free(ctx, dm->host_jit);
    moe__free(ctx, dm->host_noise);
    moe__free(ctx, dm);
}

static moe_result moe__cl_quantize_layer(moe_cl_model *dm, int i, int q);

/* A device copy of a model, or of one layer (model NULL: no optimizer, no loss). */
static moe_result moe__cl_upload(moe_cl_ctx *cl, moe_model *model, moe_layer *layer, moe_cl_model **out) {
    moe_cl_model *dm;
    moe_ctx *ctx;
    moe_optimizer *opt = model ? model->opt : NULL;
    int i;
    int64_t T, widest, host_f = 0, host_i = 0, kept_total = 0, jit = 0, noise = 0;
    moe_result r;
    *out = NULL;
    ctx = cl->ctx;
    dm = (moe_cl_model *)moe__calloc(ctx, sizeof *dm);
    if (!dm) return moe__fail(ctx, MOE_ERR_OUT_OF_MEMORY, "OpenCL model");
    dm->cl = cl;
    dm->model = model;
    dm->layer = layer;
    dm->src = model ? model->layers : layer;
    dm->n_layers = model ? model->n_layers : 1;
    dm->host_params = model ? model->params : layer->params;
    dm->host_grads = model ? model->grads : layer->grads;
    dm->n_params = model ? model->n_params : layer->n_params;
    dm->d_in = model ? model->desc.d_in : layer->d.d_in;
    dm->d_out = moe__layer_width(&dm->src[dm->n_layers - 1].d);
    T = model ? model->desc.max_tokens : layer->max_tokens;
    dm->max_tokens = T;
    dm->ctx = ctx;
    dm->fallback = cl->fallback;
    if (dm->fallback) {
        if (layer && !(dm->fallback_y = (float *)moe__malloc(ctx, (size_t)(T * dm->d_out) * sizeof(float)))) {
            moe__free(ctx, dm);
            return moe__fail(ctx, MOE_ERR_OUT_OF_MEMORY, "layer output");
        }
        *out = dm;
        return MOE_OK;
    }
    for (i = 0; i < dm->n_layers; i++) {
        char why[160];
        const char *what = moe__cl_unsupported(&dm->src[i], why, sizeof why);
        if (what) {
            moe__free(ctx, dm);
            return moe__fail(ctx, MOE_ERR_UNSUPPORTED, "OpenCL: layer %d uses %s, which moe_cl.h does not run on a device yet", i, what);
        }
    }
    if (model && model->desc.n_tasks > 0) {
        moe__free(ctx, dm);
        return moe__fail(ctx, MOE_ERR_UNSUPPORTED, "OpenCL: multi-task losses (n_tasks %d) run on the CPU model only", model->desc.n_tasks);
    }
    dm->n_chunks = (dm->n_params + MOE__CHUNK - 1) / MOE__CHUNK;
    dm->step = opt ? opt->step : 0;
    dm->cap_mems = 24 + dm->n_layers * (48 + 8 * MOE__MAX_LINEARS);  /* buffers of a layer: at most 34 + two banks of 29 */
    dm->mems = (moe__cl_mem *)moe__calloc(ctx, sizeof(moe__cl_mem) * (size_t)dm->cap_mems);
    dm->layers = (moe__cl_layer *)moe__calloc(ctx, sizeof(moe__cl_layer) * (size_t)dm->n_layers);
    widest = dm->d_in;
    host_f = moe__max64(T, dm->n_chunks);
    host_i = 1;
    for (i = 0; i < dm->n_layers; i++) {
        const moe_layer_desc *d = &dm->src[i].d;
        widest = moe__max64(widest, d->d_out);
        host_f = moe__max64(host_f, T * d->d_out);
        if (d->kind == MOE_LAYER_MOE && d->jitter > 0.0f) jit = moe__max64(jit, T * d->d_in);
        if (d->kind == MOE_LAYER_MOE && d->router == MOE_ROUTER_NOISY_TOPK) noise = moe__max64(noise, T * d->n_experts);
        if (d->kind == MOE_LAYER_MOE) {
            host_f = moe__max64(host_f, 3 * (int64_t)d->n_experts + 2);
            host_i = moe__max64(host_i, moe__max64(T * (d->router == MOE_ROUTER_EXPERT_CHOICE ? d->n_experts : d->max_top_k), 2 * (int64_t)d->n_experts));
            kept_total += d->n_experts;
        }
    }
    dm->host_f = (float *)moe__malloc(ctx, (size_t)host_f * sizeof(float));
    dm->host_i = (int32_t *)moe__malloc(ctx, (size_t)host_i * sizeof(int32_t));
    dm->host_kept = (int64_t *)moe__calloc(ctx, (size_t)(kept_total + 1) * sizeof(int64_t));
    dm->host_jit = jit ? (float *)moe__malloc(ctx, (size_t)jit * sizeof(float)) : NULL;
    dm->host_noise = noise ? (float *)moe__malloc(ctx, (size_t)noise * sizeof(float)) : NULL;
    if (!dm->mems || !dm->layers || !dm->host_f || !dm->host_i || !dm->host_kept || (jit && !dm->host_jit) || (noise && !dm->host_noise)) {
        moe_cl_model_destroy(dm);
        return moe__fail(ctx, MOE_ERR_OUT_OF_MEMORY, "OpenCL model tables");
    }
    dm->params = moe__cl_buffer(dm, dm->n_params, sizeof(float));
    dm->grads = moe__cl_buffer(dm, dm->n_params, sizeof(float));
    dm->m = opt && opt->m ? moe__cl_buffer(dm, dm->n_params, sizeof(float)) : NULL;
    dm->v = opt && opt->v ? moe__cl_buffer(dm, dm->n_params, sizeof(float)) : NULL;
    dm->wt = cl->tiles.direct ? moe__cl_buffer(dm, dm->n_params, sizeof(float)) : NULL;
    dm->x = moe__cl_buffer(dm, T * dm->d_in, sizeof(float));
    dm->labels = moe__cl_buffer(dm, T, sizeof(int32_t));
    dm->values = moe__cl_buffer(dm, T * dm->d_out, sizeof(float));
    dm->dloss = moe__cl_buffer(dm, T * dm->d_out, sizeof(float));
    dm->tok = moe__cl_buffer(dm, T, sizeof(float));
    dm->ids = moe__cl_buffer(dm, T, sizeof(int32_t));
    dm->dbuf[0] = moe__cl_buffer(dm, T * widest, sizeof(float));
    dm->dbuf[1] = moe__cl_buffer(dm, T * widest, sizeof(float));
    dm->partial = moe__cl_buffer(dm, dm->n_chunks, sizeof(float));
    kept_total = 0;
    for (i = 0; i < dm->n_layers; i++) {
        moe__cl_layer *cl_l = &dm->layers[i];
        cl_l->l = &dm->src[i];
        cl_l->poff = cl_l->l->params - dm->host_params;
        cl_l->noise_step = cl_l->l->noise_step;
        cl_l->call_k = cl_l->l->d.top_k;
        cl_l->kept_host = dm->host_kept + kept_total;
        if (cl_l->l->d.kind == MOE_LAYER_MOE) kept_total += cl_l->l->d.n_experts;
        moe__cl_layer_alloc(dm, cl_l);
    }
    r = dm->err;
    if (r == MOE_OK) r = moe__cl_write(dm, dm->params, dm->host_params, (size_t)dm->n_params * sizeof(float));
    if (r == MOE_OK && dm->m) r = moe__cl_write(dm, dm->m, opt->m, (size_t)dm->n_params * sizeof(float));
    if (r == MOE_OK && dm->v) r = moe__cl_write(dm, dm->v, opt->v, (size_t)dm->n_params * sizeof(float));
    if (r == MOE_OK) r = moe__cl_refresh_transposed(dm);
    for (i = 0; i < dm->n_layers && r == MOE_OK; i++)  /* moe_layer_quantize'd layers read bf16 here too */
        if (dm->src[i].wdtype == MOE_DTYPE_BF16) r = moe__cl_quantize_layer(dm, i, 2);
    if (r == MOE_OK) r = moe_cl_finish(cl);
    if (r != MOE_OK) {
        moe_cl_model_destroy(dm);
        return r;
    }
    *out = dm;
    return MOE_OK;
}

MOEDEF moe_result moe_cl_model_upload(moe_cl_ctx *cl, moe_model *model, moe_cl_model **out) {
    if (!cl || !model || !out) return MOE_ERR_INVALID_ARGUMENT;
    return moe__cl_upload(cl, model, NULL, out);
}

MOEDEF moe_result moe_cl_layer_upload(moe_cl_ctx *cl, moe_layer *layer, moe_cl_model **out) {
    if (!cl || !layer || !out) return MOE_ERR_INVALID_ARGUMENT;
    return moe__cl_upload(cl, NULL, layer, out);
}

MOEDEF moe_result moe_cl_model_download(moe_cl_model *dm) {
    size_t bytes;
    int i;
    if (!dm) return MOE_ERR_INVALID_ARGUMENT;
    if (dm->fallback) return MOE_OK;
    bytes = (size_t)dm->n_params * sizeof(float);
    MOE__TRY(moe__cl_read(dm, dm->params, 0, dm->host_params, bytes));
    MOE__TRY(moe__cl_read(dm, dm->grads, 0, dm->host_grads, bytes));
    if (dm->m) MOE__TRY(moe__cl_read(dm, dm->m, 0, dm->model->opt->m, bytes));
    if (dm->v) MOE__TRY(moe__cl_read(dm, dm->v, 0, dm->model->opt->v, bytes));
    if (dm->model) dm->model->opt->step = dm->step;
    for (i = 0; i < dm->n_layers; i++) dm->src[i].noise_step = dm->layers[i].noise_step;  /* the random streams go on from here */
    return MOE_OK;
}

// >>cl_forward --------------------------------------------------------------
static moe_result moe__cl_act(moe_cl_model *dm, int kernel, int64_t n, int act, moe__cl_mem a, moe__cl_mem b, moe__cl_mem c, int use_c) {
    moe__cl_args k = moe__cl_begin(dm->cl, kernel);
    moe__cl_long_arg(&k, n);
    if (kernel == MOE__CLK_add_to) {
        moe__cl_mem_arg(&k, a); moe__cl_mem_arg(&k, b);
    } else {
        moe__cl_int_arg(&k, act); moe__cl_mem_arg(&k, a); moe__cl_mem_arg(&k, b); moe__cl_mem_arg(&k, c);
        if (kernel == MOE__CLK_act_fwd) moe__cl_int_arg(&k, use_c);
    }
    return moe__cl_run(&k, 1, (size_t)n, 1, 1, NULL);
}

/* The expert network of bank bi (0 routed, 1 shared) over its rows, every expert in one launch
   per linear; the routed bank has at most T*k rows, the shared one n*T. */
static moe_result moe__cl_bank_forward(moe_cl_model *dm, moe__cl_layer *cl_l, int bi, moe__cl_mem x, int64_t T) {
    const moe_layer *l = cl_l->l;
    const moe__bank *b = &l->bank[bi];
    const moe__cl_bank *cb = &cl_l->bank[bi];
    int64_t rows = bi == 0 ? cl_l->rows : T * b->n;
    int j;
    for (j = 0; j < b->n_linears; j++) {
        const moe__linear *lin = &b->lin[j];
        int last = j == b->n_linears - 1;
        moe__cl_mat in = lin->input < 0 ? moe__cl_mat_of(x, 0, b->d_in) : moe__cl_mat_of(cb->ba[lin->input], 0, b->d_hidden);
        moe__cl_gemm g;
        if (lin->input < 0) in.rows = cb->row_token;
        g = moe__cl_gemm_make(MOE__NT, rows, lin->out, lin->in, in, moe__cl_mat_of(dm->params, cl_l->poff + lin->w, lin->in),
                              moe__cl_mat_of(last ? cb->bout : cb->bz[j], 0, lin->out));
        g.B.gstride = lin->out * lin->in;
        if (lin->b >= 0) { g.bias = dm->params; g.bias_off = cl_l->poff + lin->b; g.bias_gstride = lin->out; }
        g.groups = cb->offsets; g.group_mode = 1; g.n_groups = b->n;
        g.b_q = cl_l->q;
        if (!last && b->kind == MOE_EXPERT_SWIGLU && j == 1) { g.epi = 2; g.Z = cb->bz[0]; g.D = cb->ba[0]; }
        else if (!last && b->kind != MOE_EXPERT_SWIGLU) { g.epi = 1; g.act = (int)b->act; g.D = cb->ba[j]; }
        MOE__TRY(moe__cl_weight_gemm(dm, &g));
    }
    return MOE_OK;
}

/* Router input with jitter (training): x times 1 - jitter + 2 jitter U, U from the CPU's stream. */
static moe_result moe__cl_jitter(moe_cl_model *dm, moe__cl_layer *cl_l, moe__cl_mem x, int64_t T) {
    const moe_layer *l = cl_l->l;
    float jit = l->d.jitter;
    int64_t n = T * l->d.d_in, i;
    uint64_t stream = moe__stream(MOE__STREAM_JITTER, l->index, cl_l->noise_step);
    moe__cl_args a;
    for (i = 0; i < n; i++) dm->host_jit[i] = 1.0f - jit + 2.0f * jit * moe_rng_uniform(l->ctx->seed, stream, (uint64_t)i);
    MOE__TRY(moe__cl_write(dm, cl_l->jit, dm->host_jit, (size_t)n * sizeof(float)));
    a = moe__cl_begin(dm->cl, MOE__CLK_mul);
    moe__cl_long_arg(&a, n); moe__cl_mem_arg(&a, x); moe__cl_mem_arg(&a, cl_l->jit); moe__cl_mem_arg(&a, cl_l->xr);
    return moe__cl_run(&a, 1, (size_t)n, 1, 1, NULL);
}

/* Noisy top-k: raw = u Wn^T, the noise (drawn on the host from the CPU's stream, or the
   caller's; 0 at inference), h = clean + noise * softplus(raw). */
static moe_result moe__cl_noisy_forward(moe_cl_model *dm, moe__cl_layer *cl_l, int64_t T, int training, const float *noise) {
    const moe_layer *l = cl_l->l;
    int64_t E = l->d.n_experts, D = l->d.d_in, n = T * E, i;
    moe__cl_gemm g = moe__cl_gemm_make(MOE__NT, T, E, D, moe__cl_mat_of(cl_l->u, 0, D), moe__cl_mat_of(dm->params, cl_l->poff + l->noise.w, D),
                                       moe__cl_mat_of(cl_l->raw, 0, E));
    moe__cl_args a;
    MOE__TRY(moe__cl_weight_gemm(dm, &g));
    if (training) {
        uint64_t stream = moe__stream(MOE__STREAM_NOISE, l->index, cl_l->noise_step);
        if (!noise) {
            for (i = 0; i < n; i++) dm->host_noise[i] = moe_rng_normal(l->ctx->seed, stream, (uint64_t)i);
            noise = dm->host_noise;
        }
        MOE__TRY(moe__cl_write(dm, cl_l->noise_n, noise, (size_t)n * sizeof(float)));
    } else {
        float zero = 0.0f;
        MOE__CL_CHECK(dm->cl, MOE__CLF(dm->cl, clEnqueueFillBuffer)(dm->cl->queue, cl_l->noise_n, &zero, sizeof zero, 0, (size_t)n * sizeof(float), 0, NULL, NULL),
                      "clEnqueueFillBuffer");
    }
    a = moe__cl_begin(dm->cl, MOE__CLK_noisy_h);
    moe__cl_long_arg(&a, n); moe__cl_mem_arg(&a, cl_l->clean); moe__cl_mem_arg(&a, cl_l->raw); moe__cl_mem_arg(&a, cl_l->noise_n); moe__cl_mem_arg(&a, cl_l->h);
    return moe__cl_run(&a, 1, (size_t)n, 1, 1, NULL);
}

/* Router scores, the chosen experts and gates of every token, then the permutation by expert
   (offsets and row_token of the routed bank, pos of every slot, chosen / kept counts). */
static moe_result moe__cl_route(moe_cl_model *dm, moe__cl_layer *cl_l, int64_t T, int training, const float *noise, const moe_forward_opts *opts) {
    moe_cl_ctx *cl = dm->cl;
    const moe_layer *l = cl_l->l;
    const moe_layer_desc *d = &l->d;
    int64_t E = d->n_experts, K = cl_l->call_k, D = d->d_in, cap = 0;
    int noisy = d->router == MOE_ROUTER_NOISY_TOPK, ec = d->router == MOE_ROUTER_EXPERT_CHOICE;
    moe__cl_gemm g;
    moe__cl_args a;
    if (d->capacity_factor > 0.0f && !ec) cap = moe__capacity(d->capacity_factor, T, K, E);
    if (d->router == MOE_ROUTER_HASH) {
        MOE__TRY(moe__cl_write(dm, dm->ids, opts->token_ids, (size_t)T * sizeof(int32_t)));
        a = moe__cl_begin(cl, MOE__CLK_route_hash);
        moe__cl_int_arg(&a, T); moe__cl_int_arg(&a, E); moe__cl_int_arg(&a, K);
        { uint32_t seed = d->hash_seed; moe__cl_arg(&a, sizeof seed, &seed); }
        moe__cl_long_arg(&a, l->index); moe__cl_mem_arg(&a, dm->ids); moe__cl_mem_arg(&a, cl_l->sel); moe__cl_mem_arg(&a, cl_l->gate);
        moe__cl_mem_arg(&a, cl_l->lse); moe__cl_mem_arg(&a, cl_l->entropy);
        MOE__TRY(moe__cl_run(&a, 1, (size_t)T, 1, 1, NULL));
    } else {
        g = moe__cl_gemm_make(MOE__NT, T, E, D, moe__cl_mat_of(cl_l->u, 0, D), moe__cl_mat_of(dm->params, cl_l->poff + l->router.w, D),
                              moe__cl_mat_of(cl_l->clean, 0, E));
        if (l->router.b >= 0) { g.bias = dm->params; g.bias_off = cl_l->poff + l->router.b; }
        MOE__TRY(moe__cl_weight_gemm(dm, &g));
    }
    if (noisy) MOE__TRY(moe__cl_noisy_forward(dm, cl_l, T, training, noise));
    if (d->router == MOE_ROUTER_SIGMOID) {
        a = moe__cl_begin(cl, MOE__CLK_route_sigmoid);
        moe__cl_int_arg(&a, T); moe__cl_int_arg(&a, E); moe__cl_int_arg(&a, K); moe__cl_int_arg(&a, d->n_groups); moe__cl_int_arg(&a, d->top_k_groups);
        moe__cl_int_arg(&a, d->renormalize == MOE_FLAG_ON); moe__cl_float_arg(&a, d->routed_scaling_factor); moe__cl_mem_arg(&a, cl_l->clean);
        moe__cl_mem_arg(&a, dm->params); moe__cl_long_arg(&a, cl_l->poff + l->selection_bias); moe__cl_mem_arg(&a, cl_l->p);
        moe__cl_mem_arg(&a, cl_l->key); moe__cl_mem_arg(&a, cl_l->group_score); moe__cl_mem_arg(&a, cl_l->group_sel);
        moe__cl_mem_arg(&a, cl_l->lse); moe__cl_mem_arg(&a, cl_l->entropy); moe__cl_mem_arg(&a, cl_l->sel); moe__cl_mem_arg(&a, cl_l->gate);
        MOE__TRY(moe__cl_run(&a, 1, (size_t)T, 1, 1, NULL));
    } else if (d->router != MOE_ROUTER_HASH) {  /* softmax (and for token-choice routers the top k) */
        a = moe__cl_begin(cl, MOE__CLK_route_topk);
        moe__cl_int_arg(&a, T); moe__cl_int_arg(&a, E); moe__cl_int_arg(&a, ec ? 0 : K); moe__cl_int_arg(&a, !ec && d->renormalize == MOE_FLAG_ON);
        moe__cl_float_arg(&a, opts ? opts->top_p : 0.0f); moe__cl_int_arg(&a, noisy);
        moe__cl_mem_arg(&a, noisy ? cl_l->h : cl_l->clean); moe__cl_mem_arg(&a, cl_l->p); moe__cl_mem_arg(&a, cl_l->lse); moe__cl_mem_arg(&a, cl_l->entropy);
        moe__cl_mem_arg(&a, cl_l->sel); moe__cl_mem_arg(&a, cl_l->gate); moe__cl_mem_arg(&a, cl_l->thr);
        MOE__TRY(moe__cl_run(&a, 1, (size_t)T, 1, 1, NULL));
    }
    if (ec) {
        a = moe__cl_begin(cl, MOE__CLK_dispatch_ec);
        moe__cl_int_arg(&a, T); moe__cl_int_arg(&a, E); moe__cl_int_arg(&a, cl_l->rows / E); moe__cl_mem_arg(&a, cl_l->p);
        moe__cl_mem_arg(&a, cl_l->sel); moe__cl_mem_arg(&a, cl_l->pos); moe__cl_mem_arg(&a, cl_l->gate);
        moe__cl_mem_arg(&a, cl_l->bank[0].offsets); moe__cl_mem_arg(&a, cl_l->bank[0].row_token); moe__cl_mem_arg(&a, cl_l->chosen); moe__cl_mem_arg(&a, cl_l->kept);
        return moe__cl_run(&a, 1, (size_t)E, 1, 1, NULL);
    }
    a = moe__cl_begin(cl, MOE__CLK_dispatch_count);
    moe__cl_int_arg(&a, T); moe__cl_int_arg(&a, E); moe__cl_int_arg(&a, K); moe__cl_long_arg(&a, cap);
    moe__cl_mem_arg(&a, cl_l->sel); moe__cl_mem_arg(&a, cl_l->pos); moe__cl_mem_arg(&a, cl_l->chosen); moe__cl_mem_arg(&a, cl_l->kept);
    MOE__TRY(moe__cl_run(&a, 1, (size_t)E, 1, 1, NULL));
    a = moe__cl_begin(cl, MOE__CLK_dispatch_scatter);
    moe__cl_int_arg(&a, T); moe__cl_int_arg(&a, E); moe__cl_int_arg(&a, K);
    moe__cl_mem_arg(&a, cl_l->sel); moe__cl_mem_arg(&a, cl_l->pos); moe__cl_mem_arg(&a, cl_l->kept);
    moe__cl_mem_arg(&a, cl_l->bank[0].offsets); moe__cl_mem_arg(&a, cl_l->bank[0].row_token);
    return moe__cl_run(&a, 1, (size_t)E, 1, 1, NULL);
}

static moe_result moe__cl_moe_forward(moe_cl_model *dm, moe__cl_layer *cl_l, moe__cl_mem x, int64_t T, int training, const float *noise,
                                      const moe_forward_opts *opts) {
    moe_cl_ctx *cl = dm->cl;
    const moe_layer *l = cl_l->l;
    const moe_layer_desc *d = &l->d;
    int64_t E = d->n_experts, K, D = d->d_in, O = d->d_out, n_shared = l->n_banks > 1 ? l->bank[1].n : 0;
    int noisy = d->router == MOE_ROUTER_NOISY_TOPK, ec = d->router == MOE_ROUTER_EXPERT_CHOICE;
    moe__cl_args a;
    K = cl_l->call_k = opts && opts->top_k ? opts->top_k : d->top_k;
    cl_l->slots = ec ? E : K;
    cl_l->rows = ec ? E * moe__expert_choice_tokens(d, T, K) : T * K;
    cl_l->u = x;
    if (training && cl_l->xr) {
        MOE__TRY(moe__cl_jitter(dm, cl_l, x, T));
        cl_l->u = cl_l->xr;
    }
    MOE__TRY(moe__cl_route(dm, cl_l, T, training, noise, opts));
    a = moe__cl_begin(cl, MOE__CLK_moe_sums);
    moe__cl_int_arg(&a, T); moe__cl_int_arg(&a, E);
    moe__cl_mem_arg(&a, cl_l->p); moe__cl_mem_arg(&a, cl_l->lse); moe__cl_mem_arg(&a, cl_l->entropy); moe__cl_mem_arg(&a, cl_l->sums);
    MOE__TRY(moe__cl_run(&a, 1, (size_t)E + 2, 1, 1, NULL));
    if (cl_l->importance) {
        a = moe__cl_begin(cl, MOE__CLK_importance);
        moe__cl_int_arg(&a, T * K); moe__cl_int_arg(&a, E); moe__cl_mem_arg(&a, cl_l->sel); moe__cl_mem_arg(&a, cl_l->gate);
        moe__cl_mem_arg(&a, cl_l->importance);
        MOE__TRY(moe__cl_run(&a, 1, (size_t)E, 1, 1, NULL));
    }
    if (noisy && d->load_loss > 0.0f && K < E) {
        a = moe__cl_begin(cl, MOE__CLK_load_sums);
        moe__cl_int_arg(&a, T); moe__cl_int_arg(&a, E); moe__cl_mem_arg(&a, cl_l->clean); moe__cl_mem_arg(&a, cl_l->raw);
        moe__cl_mem_arg(&a, cl_l->h); moe__cl_mem_arg(&a, cl_l->thr); moe__cl_mem_arg(&a, cl_l->load);
        MOE__TRY(moe__cl_run(&a, 1, (size_t)E, 1, 1, NULL));
    }
    MOE__TRY(moe__cl_bank_forward(dm, cl_l, 0, x, T));
    if (l->n_banks > 1) {
        a = moe__cl_begin(cl, MOE__CLK_shared_rows);
        moe__cl_int_arg(&a, T); moe__cl_int_arg(&a, n_shared); moe__cl_mem_arg(&a, cl_l->bank[1].offsets); moe__cl_mem_arg(&a, cl_l->bank[1].row_token);
        MOE__TRY(moe__cl_run(&a, 1, (size_t)(T * n_shared + 1), 1, 1, NULL));
        MOE__TRY(moe__cl_bank_forward(dm, cl_l, 1, x, T));
    }
    a = moe__cl_begin(cl, MOE__CLK_moe_combine);
    moe__cl_int_arg(&a, T); moe__cl_int_arg(&a, D); moe__cl_int_arg(&a, O); moe__cl_int_arg(&a, cl_l->slots); moe__cl_int_arg(&a, d->residual);
    moe__cl_mem_arg(&a, x); moe__cl_mem_arg(&a, cl_l->pos); moe__cl_mem_arg(&a, cl_l->gate); moe__cl_mem_arg(&a, cl_l->bank[0].bout);
    moe__cl_int_arg(&a, n_shared); moe__cl_mem_arg(&a, cl_l->bank[1].bout); moe__cl_mem_arg(&a, cl_l->out);
    return moe__cl_run(&a, 2, (size_t)O, (size_t)T, 1, NULL);
}

static moe_result moe__cl_layer_forward(moe_cl_model *dm, moe__cl_layer *cl_l, moe__cl_mem x, int64_t T, int training, const float *noise,
                                        const moe_forward_opts *opts) {
    const moe_layer *l = cl_l->l;
    const moe_layer_desc *d = &l->d;
    if (d->kind == MOE_LAYER_DENSE) {
        moe__cl_gemm g = moe__cl_gemm_make(MOE__NT, T, d->d_out, d->d_in, moe__cl_mat_of(x, 0, d->d_in),
                                           moe__cl_mat_of(dm->params, cl_l->poff + l->lin.w, d->d_in), moe__cl_mat_of(cl_l->z, 0, d->d_out));
        if (l->lin.b >= 0) { g.bias = dm->params; g.bias_off = cl_l->poff + l->lin.b; }
        g.epi = 1; g.act = (int)d->activation; g.D = cl_l->out;
        MOE__TRY(moe__cl_weight_gemm(dm, &g));
        if (d->residual) MOE__TRY(moe__cl_act(dm, MOE__CLK_add_to, T * d->d_out, 0, cl_l->out, x, NULL, 0));
        return MOE_OK;
    }
    if (d->kind == MOE_LAYER_RMSNORM || d->kind == MOE_LAYER_LAYERNORM) {
        moe__cl_args a = moe__cl_begin(dm->cl, MOE__CLK_norm_fwd);
        moe__cl_int_arg(&a, T); moe__cl_int_arg(&a, d->d_in); moe__cl_int_arg(&a, d->kind == MOE_LAYER_LAYERNORM);
        moe__cl_int_arg(&a, d->residual); moe__cl_float_arg(&a, d->eps); moe__cl_mem_arg(&a, x); moe__cl_mem_arg(&a, dm->params);
        moe__cl_long_arg(&a, cl_l->poff + l->norm_w); moe__cl_long_arg(&a, l->norm_b >= 0 ? cl_l->poff + l->norm_b : 0);
        moe__cl_mem_arg(&a, cl_l->mean); moe__cl_mem_arg(&a, cl_l->rstd); moe__cl_mem_arg(&a, cl_l->out);
        return moe__cl_run(&a, 1, (size_t)T, 1, 1, NULL);
    }
    return moe__cl_moe_forward(dm, cl_l, x, T, training, noise, opts);
}

static moe_result moe__cl_check_call(moe_cl_model *dm, const float *x, int64_t T) {
    MOE__TRY(moe__check_tokens(dm->ctx, T, dm->max_tokens));
    if (!x) return moe__fail(dm->ctx, MOE_ERR_INVALID_ARGUMENT, "x is NULL");
    if (!moe__all_finite(x, T * dm->d_in)) return moe__fail(dm->ctx, MOE_ERR_NONFINITE, "x holds NaN or Inf");
    return MOE_OK;
}

/* opts: NULL, or the caller's (top_k, top_p, router_noise; training from the argument) */
static moe_result moe__cl_model_forward(moe_cl_model *dm, const float *x, int64_t T, int training, const moe_forward_opts *opts) {
    moe__cl_mem in = dm->x;
    int i;
    MOE__TRY(moe__cl_check_call(dm, x, T));
    for (i = 0; i < dm->n_layers; i++) MOE__TRY(moe__call_check(&dm->src[i], opts));
    dm->has_forward = 0;
    MOE__TRY(moe__cl_write(dm, dm->x, x, (size_t)(T * dm->d_in) * sizeof(float)));
    for (i = 0; i < dm->n_layers; i++) {
        const float *noise = opts && opts->router_noise ? opts->router_noise[i] : NULL;
        MOE__TRY(moe__cl_layer_forward(dm, &dm->layers[i], in, T, training, noise, opts));
        if (training) dm->layers[i].noise_step++;
        in = dm->layers[i].out;
    }
    dm->T = T;
    dm->has_forward = 1;
    return MOE_OK;
}

MOEDEF moe_result moe_cl_model_forward(moe_cl_model *dm, const float *x, int64_t n_tokens, float *y, const moe_forward_opts *opts) {
    if (!dm) return MOE_ERR_INVALID_ARGUMENT;
    if (dm->fallback)
        return dm->model ? moe_model_forward(dm->model, x, n_tokens, y, opts) : moe_layer_forward(dm->layer, x, n_tokens, y ? y : dm->fallback_y, opts);
    MOE__TRY(moe__cl_model_forward(dm, x, n_tokens, opts && opts->training, opts));
    if (y) return moe__cl_read(dm, dm->layers[dm->n_layers - 1].out, 0, y, (size_t)(n_tokens * dm->d_out) * sizeof(float));
    return MOE_OK;
}

MOEDEF moe_result moe_cl_model_predict(moe_cl_model *dm, const float *x, int64_t n_tokens, int32_t *classes) {
    int64_t t, c, C;
    if (!dm) return MOE_ERR_INVALID_ARGUMENT;
    if (dm->fallback && dm->model) return moe_model_predict(dm->model, x, n_tokens, classes);
    if (!classes) return moe__fail(dm->ctx, MOE_ERR_INVALID_ARGUMENT, "classes is NULL");
    C = dm->d_out;
    MOE__TRY(moe_cl_model_forward(dm, x, n_tokens, dm->fallback ? dm->fallback_y : dm->host_f, NULL));
    for (t = 0; t < n_tokens; t++) {
        const float *y = (dm->fallback ? dm->fallback_y : dm->host_f) + t * C;
        int64_t best = 0;
        for (c = 1; c < C; c++) if (y[c] > y[best]) best = c;
        classes[t] = (int32_t)best;
    }
    return MOE_OK;
}

#define MOE__CL_QUANTIZED "the device model holds reduced-precision expert weights (inference only); moe_cl_model_quantize(dm, MOE_DTYPE_F32) restores training"

/* Layer i's expert weights as 16-bit values in dm->wh (q 1 half, 2 bfloat16; 0: back to fp32),
   converted on the device from the layout the GEMM reads. */
static moe_result moe__cl_quantize_layer(moe_cl_model *dm, int i, int q) {
    static const char *const names[3] = { "gemm_nt", "gemm_nn", "gemm_tn" };
    moe_cl_ctx *cl = dm->cl;
    moe__cl_layer *cl_l = &dm->layers[i];
    const moe_layer *l = cl_l->l;
    int b, j;
    dm->n_quantized -= cl_l->q != 0;
    cl_l->q = 0;
    if (q == 0 || l->d.kind != MOE_LAYER_MOE) return MOE_OK;
    if (!cl->q_program[q - 1]) {
        moe_result r = moe__cl_build(cl, &cl->tiles, 1, q == 1 ? " -DB_HALF=1" : " -DB_BF16=1", &cl->q_program[q - 1]);
        for (j = 0; j < 3 && r == MOE_OK; j++) {
            moe__cl_int err;
            cl->q_kernels[q - 1][j] = MOE__CLF(cl, clCreateKernel)(cl->q_program[q - 1], names[j], &err);
            if (err != MOE__CL_SUCCESS) r = moe__cl_fail(dm->ctx, err, names[j]);
        }
        if (r != MOE_OK) {
            moe__cl_release_kernels(cl, cl->q_kernels[q - 1], 3);
            if (cl->q_program[q - 1]) MOE__CLF(cl, clReleaseProgram)(cl->q_program[q - 1]);
            cl->q_program[q - 1] = NULL;
            return r;
        }
    }
    if (!dm->wh) {
        dm->wh = moe__cl_buffer(dm, (dm->n_params + 1) / 2, sizeof(float));  /* n_params 16-bit values */
        if (!dm->wh) { moe_result r = dm->err; dm->err = MOE_OK; return r; }
    }
    for (b = 0; b < l->n_banks; b++)
        for (j = 0; j < l->bank[b].n_linears; j++) {
            const moe__linear *lin = &l->bank[b].lin[j];
            int64_t n = (int64_t)l->bank[b].n * lin->out * lin->in;
            moe__cl_args a = moe__cl_begin(cl, q == 1 ? MOE__CLK_to_half : MOE__CLK_to_bf16);
            moe__cl_long_arg(&a, n); moe__cl_long_arg(&a, cl_l->poff + lin->w); moe__cl_mem_arg(&a, dm->wt ? dm->wt : dm->params);
            moe__cl_mem_arg(&a, dm->wh);
            MOE__TRY(moe__cl_run(&a, 1, (size_t)n, 1, 1, NULL));
        }
    cl_l->q = q;
    dm->n_quantized++;
    return MOE_OK;
}

MOEDEF moe_result moe_cl_model_quantize(moe_cl_model *dm, moe_dtype dtype) {
    int i, q = dtype == MOE_DTYPE_F16 ? 1 : dtype == MOE_DTYPE_BF16 ? 2 : 0;
    if (!dm) return MOE_ERR_INVALID_ARGUMENT;
    if (dtype != MOE_DTYPE_F32 && !q)
        return moe__fail(dm->ctx, MOE_ERR_UNSUPPORTED, "OpenCL: expert weights on the device are f32, f16 or bf16 (dtype %d)", (int)dtype);
    if (dm->fallback) {
        if (dtype == MOE_DTYPE_F32) return MOE_OK;
        return moe__fail(dm->ctx, MOE_ERR_UNSUPPORTED, "reduced-precision weights on a device need an OpenCL device (this context runs on the CPU)");
    }
    for (i = 0; i < dm->n_layers; i++) MOE__TRY(moe__cl_quantize_layer(dm, i, q));
    return moe_cl_finish(dm->cl);
}

/* Statistics of MoE layer i as moe.h's moe__aux_forward computes them, from the device's
   per-expert counts and sums (read back here). */
static moe_result moe__cl_layer_stats(moe_cl_model *dm, int i, moe_stats *st) {
    moe__cl_layer *cl_l = &dm->layers[i];
    const moe_layer_desc *d = &cl_l->l->d;
    int64_t E = d->n_experts, K = cl_l->call_k, S = cl_l->slots, T = dm->T, e, t, q;
    float *sums = dm->host_f;
    int32_t *counts = dm->host_i;
    double mean = 0.0, var = 0.0;
    memset(st, 0, sizeof *st);
    MOE__TRY(moe__cl_read(dm, cl_l->sums, 0, sums, (size_t)(E + 2) * sizeof(float)));
    MOE__TRY(moe__cl_read(dm, cl_l->chosen, 0, counts, (size_t)E * sizeof(int32_t)));
    MOE__TRY(moe__cl_read(dm, cl_l->kept, 0, counts + E, (size_t)E * sizeof(int32_t)));
    st->n_experts = (int)E;
    st->top_k = (int)K;
    st->n_tokens = T;
    if (d->balance_loss > 0.0f) {
        double sum = 0.0;
        for (e = 0; e < E; e++) sum += ((double)counts[e] / (double)(T * K)) * ((double)sums[e] / (double)T);
        st->balance_loss = (float)((double)d->balance_loss * (double)E * sum);
    }
    if (d->z_loss > 0.0f) st->z_loss = (float)((double)d->z_loss * (double)sums[E] / (double)T);
    if (cl_l->importance) {
        MOE__TRY(moe__cl_read(dm, cl_l->importance, 0, sums + E + 2, (size_t)E * sizeof(float)));
        st->importance_loss = (float)((double)d->importance_loss * moe__cv2(sums + E + 2, E, NULL));
    }
    if (cl_l->load && d->load_loss > 0.0f && K < E) {
        MOE__TRY(moe__cl_read(dm, cl_l->load, 0, sums + 2 * E + 2, (size_t)E * sizeof(float)));
        st->load_loss = (float)((double)d->load_loss * moe__cv2(sums + 2 * E + 2, E, NULL));
    }
    st->aux_loss = st->balance_loss + st->z_loss + st->importance_loss + st->load_loss;
    st->router_entropy = (float)((double)sums[E + 1] / (double)T);
    for (e = 0; e < E; e++) {
        cl_l->kept_host[e] = counts[E + e];
        st->dropped_assignments += counts[e] - counts[E + e];
        mean += (double)counts[E + e];
    }
    mean /= (double)E;
    for (e = 0; e < E; e++) var += ((double)counts[E + e] - mean) * ((double)counts[E + e] - mean);
    var /= (double)E;
    st->load_cv = mean > 0.0 ? (float)(sqrt(var) / mean) : 0.0f;
    st->tokens_per_expert = cl_l->kept_host;
    if (st->dropped_assignments > 0 || d->router == MOE_ROUTER_EXPERT_CHOICE) {  /* tokens with no expert pass through */
        MOE__TRY(moe__cl_read(dm, cl_l->pos, 0, counts, (size_t)(T * S) * sizeof(int32_t)));
        for (t = 0; t < T; t++) {
            int any = 0;
            for (q = 0; q < S; q++) any |= counts[t * S + q] >= 0;
            st->dropped_tokens += !any;
        }
    }
    return MOE_OK;
}

MOEDEF moe_result moe_cl_model_stats(moe_cl_model *dm, int layer, moe_stats *stats) {
    if (!dm || !stats) return MOE_ERR_INVALID_ARGUMENT;
    if (dm->fallback) return dm->model ? moe_model_stats(dm->model, layer, stats) : moe_layer_stats(dm->layer, stats);
    memset(stats, 0, sizeof *stats);
    if (layer < 0 || layer >= dm->n_layers) return moe__fail(dm->ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d out of range", layer);
    if (dm->layers[layer].l->d.kind != MOE_LAYER_MOE) return moe__fail(dm->ctx, MOE_ERR_INVALID_ARGUMENT, "layer %d is not a MoE layer", layer);
    if (!dm->has_forward) return moe__fail(dm->ctx, MOE_ERR_STATE, "no forward yet");
    return moe__cl_layer_stats(dm, layer, stats);
}

// >>cl_backward -------------------------------------------------------------
/* Expert input-side gradients (dz of every linear, and dxr when want_dx), then weight gradients. */
static moe_result moe__cl_bank_backward(moe_cl_model *dm, moe__cl_layer *cl_l, int bi, moe__cl_mem x, int64_t T, int want_dx) {
    moe_cl_ctx *cl = dm->cl;
    const moe_layer *l = cl_l->l;
    const moe__bank *b = &l->bank[bi];
    const moe__cl_bank *cb = &cl_l->bank[bi];
    int64_t R = bi == 0 ? cl_l->rows : T * b->n, H = b->d_hidden, D = b->d_in;
    int j, last = b->n_linears - 1;
    moe__cl_gemm g;
    if (b->kind == MOE_EXPERT_SWIGLU) {
        const moe__linear *w2 = &b->lin[2];
        moe__cl_args a;
        int s;
        g = moe__cl_gemm_make(MOE__NN, R, H, w2->out, moe__cl_mat_of(cb->bdz[2], 0, w2->out), moe__cl_mat_of(dm->params, cl_l->poff + w2->w, H),
                              moe__cl_mat_of(cb->bda, 0, H));
        g.B.gstride = w2->out * H;
        g.groups = cb->offsets; g.group_mode = 1; g.n_groups = b->n;
        MOE__TRY(moe__cl_gemm_run(cl, &g));
        a = moe__cl_begin(cl, MOE__CLK_swiglu_back);
        moe__cl_long_arg(&a, R * H); moe__cl_mem_arg(&a, cb->bda); moe__cl_mem_arg(&a, cb->bz[0]); moe__cl_mem_arg(&a, cb->bz[1]);
        moe__cl_mem_arg(&a, cb->bdz[0]); moe__cl_mem_arg(&a, cb->bdz[1]);
        MOE__TRY(moe__cl_run(&a, 1, (size_t)(R * H), 1, 1, NULL));
        for (s = 0; s < 2 && want_dx; s++) {
            g = moe__cl_gemm_make(MOE__NN, R, D, H, moe__cl_mat_of(cb->bdz[s], 0, H), moe__cl_mat_of(dm->params, cl_l->poff + b->lin[s].w, D),
                                  moe__cl_mat_of(cb->bdxr, 0, D));
            g.B.gstride = H * D;
            g.groups = cb->offsets; g.group_mode = 1; g.n_groups = b->n;
            g.accumulate = s;
            MOE__TRY(moe__cl_gemm_run(cl, &g));
        }
    } else {
        for (j = last; j >= 0; j--) {
            const moe__linear *lin = &b->lin[j];
            if (j == 0 && !want_dx) break;
            g = moe__cl_gemm_make(MOE__NN, R, lin->in, lin->out, moe__cl_mat_of(cb->bdz[j], 0, lin->out),
                                  moe__cl_mat_of(dm->params, cl_l->poff + lin->w, lin->in), moe__cl_mat_of(j > 0 ? cb->bdz[j - 1] : cb->bdxr, 0, lin->in));
            g.B.gstride = lin->out * lin->in;
            g.groups = cb->offsets; g.group_mode = 1; g.n_groups = b->n;
            if (j > 0) { g.epi = 3; g.act = (int)b->act; g.Z = cb->bz[j - 1]; }
            MOE__TRY(moe__cl_gemm_run(cl, &g));
        }
    }
    for (j = 0; j <= last; j++) {
        const moe__linear *lin = &b->lin[j];
        moe__cl_mat in = lin->input < 0 ? moe__cl_mat_of(x, 0, D) : moe__cl_mat_of(cb->ba[lin->input], 0, H);
        if (lin->input < 0) in.rows = cb->row_token;
        g = moe__cl_gemm_make(MOE__TN, lin->out, lin->in, 0, moe__cl_mat_of(cb->bdz[j], 0, lin->out), in,
                              moe__cl_mat_of(dm->grads, cl_l->poff + lin->w, lin->in));
        g.C.gstride = lin->out * lin->in;
        g.groups = cb->offsets; g.group_mode = 2; g.n_groups = b->n;
        g.accumulate = 1;
        MOE__TRY(moe__cl_gemm_run(cl, &g));
        if (lin->b >= 0)
            MOE__TRY(moe__cl_colsum(cl, R, lin->out, cb->bdz[j], lin->out, cb->offsets, b->n, dm->grads, cl_l->poff + lin->b, lin->out));
    }
    return MOE_OK;
}

/* grad = coef * dCV^2(v)/dv for the E values of v, computed on the host (E numbers each way) */
static moe_result moe__cl_cv2_grad(moe_cl_model *dm, moe__cl_mem v, moe__cl_mem grad, int64_t E, float coef) {
    float *hv = dm->host_f, *hg = dm->host_f + E;
    int64_t e;
    MOE__TRY(moe__cl_read(dm, v, 0, hv, (size_t)E * sizeof(float)));
    moe__cv2(hv, E, hg);
    for (e = 0; e < E; e++) hg[e] *= coef;
    return moe__cl_write(dm, grad, hg, (size_t)E * sizeof(float));
}

/* dh at the router logits (through the gates, the softmax or sigmoid, the auxiliary losses and
   the noisy gate), then the router's weight gradients. */
static moe_result moe__cl_router_backward(moe_cl_model *dm, moe__cl_layer *cl_l, int64_t T, int aux, int want_load) {
    moe_cl_ctx *cl = dm->cl;
    const moe_layer *l = cl_l->l;
    const moe_layer_desc *d = &l->d;
    int64_t E = d->n_experts, K = cl_l->call_k, D = d->d_in;
    float bal_scale = aux && d->balance_loss > 0.0f ? d->balance_loss * (float)E / ((float)(T * K) * (float)T) : 0.0f;
    float z_scale = aux && d->z_loss > 0.0f ? 2.0f * d->z_loss / (float)T : 0.0f;
    moe__cl_args a;
    moe__cl_gemm g;
    if (d->router == MOE_ROUTER_SIGMOID) {
        a = moe__cl_begin(cl, MOE__CLK_sigmoid_back);
        moe__cl_int_arg(&a, T); moe__cl_int_arg(&a, E); moe__cl_int_arg(&a, K); moe__cl_int_arg(&a, d->renormalize == MOE_FLAG_ON);
        moe__cl_float_arg(&a, d->routed_scaling_factor);
    } else {
        a = moe__cl_begin(cl, MOE__CLK_router_back);
        moe__cl_int_arg(&a, T); moe__cl_int_arg(&a, E); moe__cl_int_arg(&a, cl_l->slots); moe__cl_int_arg(&a, d->renormalize == MOE_FLAG_ON);
        moe__cl_int_arg(&a, aux); moe__cl_float_arg(&a, bal_scale); moe__cl_float_arg(&a, z_scale);
    }
    moe__cl_mem_arg(&a, cl_l->p); moe__cl_mem_arg(&a, cl_l->gate); moe__cl_mem_arg(&a, cl_l->dgate); moe__cl_mem_arg(&a, cl_l->sel);
    if (d->router != MOE_ROUTER_SIGMOID) { moe__cl_mem_arg(&a, cl_l->chosen); moe__cl_mem_arg(&a, cl_l->lse); }
    moe__cl_mem_arg(&a, cl_l->dh);
    MOE__TRY(moe__cl_run(&a, 1, (size_t)T, 1, 1, NULL));
    if (cl_l->raw) {  /* noisy top-k: dh becomes dL/dclean, dstd = dL/draw */
        a = moe__cl_begin(cl, MOE__CLK_noisy_back);
        moe__cl_int_arg(&a, T); moe__cl_int_arg(&a, E); moe__cl_int_arg(&a, want_load); moe__cl_mem_arg(&a, cl_l->dh); moe__cl_mem_arg(&a, cl_l->dstd);
        moe__cl_mem_arg(&a, cl_l->noise_n); moe__cl_mem_arg(&a, cl_l->raw); moe__cl_mem_arg(&a, cl_l->clean); moe__cl_mem_arg(&a, cl_l->h);
        moe__cl_mem_arg(&a, cl_l->thr); moe__cl_mem_arg(&a, cl_l->dload);
        MOE__TRY(moe__cl_run(&a, 1, (size_t)T, 1, 1, NULL));
    }
    g = moe__cl_gemm_make(MOE__TN, E, D, T, moe__cl_mat_of(cl_l->dh, 0, E), moe__cl_mat_of(cl_l->u, 0, D), moe__cl_mat_of(dm->grads, cl_l->poff + l->router.w, D));
    g.accumulate = 1;
    MOE__TRY(moe__cl_gemm_run(cl, &g));
    if (l->router.b >= 0) MOE__TRY(moe__cl_colsum(cl, T, E, cl_l->dh, E, NULL, 0, dm->grads, cl_l->poff + l->router.b, 0));
    if (cl_l->raw) {
        g = moe__cl_gemm_make(MOE__TN, E, D, T, moe__cl_mat_of(cl_l->dstd, 0, E), moe__cl_mat_of(cl_l->u, 0, D), moe__cl_mat_of(dm->grads, cl_l->poff + l->noise.w, D));
        g.accumulate = 1;
        MOE__TRY(moe__cl_gemm_run(cl, &g));
    }
    return MOE_OK;
}

static moe_result moe__cl_moe_backward(moe_cl_model *dm, moe__cl_layer *cl_l, moe__cl_mem x, moe__cl_mem dy, moe__cl_mem dx, int64_t T, int flags) {
    moe_cl_ctx *cl = dm->cl;
    const moe_layer *l = cl_l->l;
    const moe_layer_desc *d = &l->d;
    int64_t E = d->n_experts, K = cl_l->slots, D = d->d_in, O = d->d_out;
    int aux = (flags & MOE_BACKWARD_AUX) != 0, noisy = cl_l->raw != NULL, want_load = noisy && aux && d->load_loss > 0.0f && cl_l->call_k < E;
    moe__cl_args a = moe__cl_begin(cl, MOE__CLK_moe_dgate);
    moe__cl_gemm g;
    moe__cl_int_arg(&a, T); moe__cl_int_arg(&a, O); moe__cl_int_arg(&a, K); moe__cl_mem_arg(&a, dy); moe__cl_mem_arg(&a, cl_l->pos);
    moe__cl_mem_arg(&a, cl_l->gate); moe__cl_mem_arg(&a, cl_l->bank[0].bout); moe__cl_mem_arg(&a, cl_l->bank[0].bdz[l->bank[0].n_linears - 1]);
    moe__cl_mem_arg(&a, cl_l->dgate);
    MOE__TRY(moe__cl_run(&a, 1, (size_t)(T * K), 1, 1, NULL));
    if (want_load) MOE__TRY(moe__cl_cv2_grad(dm, cl_l->load, cl_l->dload, E, d->load_loss));
    if (aux && cl_l->importance) {  /* the importance loss's gradient, added to the gates */
        MOE__TRY(moe__cl_cv2_grad(dm, cl_l->importance, cl_l->dimportance, E, d->importance_loss));
        a = moe__cl_begin(cl, MOE__CLK_dgate_add);
        moe__cl_int_arg(&a, T * K); moe__cl_mem_arg(&a, cl_l->sel); moe__cl_mem_arg(&a, cl_l->dimportance); moe__cl_mem_arg(&a, cl_l->dgate);
        MOE__TRY(moe__cl_run(&a, 1, (size_t)(T * K), 1, 1, NULL));
    }
    MOE__TRY(moe__cl_bank_backward(dm, cl_l, 0, x, T, dx != NULL));
    if (l->n_banks > 1) {  /* every shared expert's output gradient is dy */
        int64_t q;
        for (q = 0; q < l->bank[1].n; q++)
            MOE__CL_CHECK(cl, MOE__CLF(cl, clEnqueueCopyBuffer)(cl->queue, dy, cl_l->bank[1].bdz[l->bank[1].n_linears - 1], 0,
                                                               (size_t)(q * T * O) * sizeof(float), (size_t)(T * O) * sizeof(float), 0, NULL, NULL),
                          "clEnqueueCopyBuffer");
        MOE__TRY(moe__cl_bank_backward(dm, cl_l, 1, x, T, dx != NULL));
    }
    if (l->router.w < 0) {  /* the hash router has no parameters: the gradient stops at the gates */
        float zero = 0.0f;
        if (!dx) return MOE_OK;
        MOE__CL_CHECK(cl, MOE__CLF(cl, clEnqueueFillBuffer)(cl->queue, cl_l->dxu, &zero, sizeof zero, 0, (size_t)(T * D) * sizeof(float), 0, NULL, NULL),
                      "clEnqueueFillBuffer");
    } else {
        MOE__TRY(moe__cl_router_backward(dm, cl_l, T, aux, want_load));
        if (!dx) return MOE_OK;
        g = moe__cl_gemm_make(MOE__NN, T, D, E, moe__cl_mat_of(cl_l->dh, 0, E), moe__cl_mat_of(dm->params, cl_l->poff + l->router.w, D),
                              moe__cl_mat_of(cl_l->dxu, 0, D));
        MOE__TRY(moe__cl_gemm_run(cl, &g));
        if (noisy) {
            g = moe__cl_gemm_make(MOE__NN, T, D, E, moe__cl_mat_of(cl_l->dstd, 0, E), moe__cl_mat_of(dm->params, cl_l->poff + l->noise.w, D),
                                  moe__cl_mat_of(cl_l->dxu, 0, D));
            g.accumulate = 1;
            MOE__TRY(moe__cl_gemm_run(cl, &g));
        }
    }
    a = moe__cl_begin(cl, MOE__CLK_moe_dx);
    moe__cl_int_arg(&a, T); moe__cl_int_arg(&a, D); moe__cl_int_arg(&a, O); moe__cl_int_arg(&a, K); moe__cl_int_arg(&a, d->residual);
    moe__cl_mem_arg(&a, dy); moe__cl_mem_arg(&a, cl_l->pos); moe__cl_mem_arg(&a, cl_l->bank[0].bdxr); moe__cl_mem_arg(&a, cl_l->dxu);
    moe__cl_int_arg(&a, l->n_banks > 1 ? l->bank[1].n : 0); moe__cl_mem_arg(&a, cl_l->bank[1].bdxr);
    moe__cl_int_arg(&a, cl_l->u != x); moe__cl_mem_arg(&a, cl_l->jit); moe__cl_mem_arg(&a, dx);
    return moe__cl_run(&a, 2, (size_t)D, (size_t)T, 1, NULL);
}

static moe_result moe__cl_layer_backward(moe_cl_model *dm, moe__cl_layer *cl_l, moe__cl_mem x, moe__cl_mem dy, moe__cl_mem dx, int64_t T, int flags) {
    moe_cl_ctx *cl = dm->cl;
    const moe_layer *l = cl_l->l;
    const moe_layer_desc *d = &l->d;
    int64_t D = d->d_in, O = d->d_out;
    if (d->kind == MOE_LAYER_DENSE) {
        moe__cl_mem dz = dy;
        moe__cl_gemm g;
        if (d->activation != MOE_ACT_IDENTITY) {
            MOE__TRY(moe__cl_act(dm, MOE__CLK_act_back, T * O, (int)d->activation, cl_l->z, dy, cl_l->dz, 0));
            dz = cl_l->dz;
        }
        g = moe__cl_gemm_make(MOE__TN, O, D, T, moe__cl_mat_of(dz, 0, O), moe__cl_mat_of(x, 0, D), moe__cl_mat_of(dm->grads, cl_l->poff + l->lin.w, D));
        g.accumulate = 1;
        MOE__TRY(moe__cl_gemm_run(cl, &g));
        if (l->lin.b >= 0) MOE__TRY(moe__cl_colsum(cl, T, O, dz, O, NULL, 0, dm->grads, cl_l->poff + l->lin.b, 0));
        if (!dx) return MOE_OK;
        g = moe__cl_gemm_make(MOE__NN, T, D, O, moe__cl_mat_of(dz, 0, O), moe__cl_mat_of(dm->params, cl_l->poff + l->lin.w, D), moe__cl_mat_of(dx, 0, D));
        MOE__TRY(moe__cl_gemm_run(cl, &g));
        if (d->residual) MOE__TRY(moe__cl_act(dm, MOE__CLK_add_to, T * D, 0, dx, dy, NULL, 0));
        return MOE_OK;
    }
    if (d->kind == MOE_LAYER_RMSNORM || d->kind == MOE_LAYER_LAYERNORM) {
        int ln = d->kind == MOE_LAYER_LAYERNORM;
        moe__cl_args a = moe__cl_begin(cl, MOE__CLK_norm_wgrad);
        moe__cl_int_arg(&a, T); moe__cl_int_arg(&a, D); moe__cl_int_arg(&a, ln); moe__cl_mem_arg(&a, x); moe__cl_mem_arg(&a, dy);
        moe__cl_mem_arg(&a, cl_l->mean); moe__cl_mem_arg(&a, cl_l->rstd); moe__cl_mem_arg(&a, dm->grads);
        moe__cl_long_arg(&a, cl_l->poff + l->norm_w); moe__cl_long_arg(&a, ln ? cl_l->poff + l->norm_b : 0);
        MOE__TRY(moe__cl_run(&a, 1, (size_t)D, 1, 1, NULL));
        if (!dx) return MOE_OK;
        a = moe__cl_begin(cl, MOE__CLK_norm_dx);
        moe__cl_int_arg(&a, T); moe__cl_int_arg(&a, D); moe__cl_int_arg(&a, ln); moe__cl_int_arg(&a, d->residual); moe__cl_mem_arg(&a, x);
        moe__cl_mem_arg(&a, dy); moe__cl_mem_arg(&a, dm->params); moe__cl_long_arg(&a, cl_l->poff + l->norm_w);
        moe__cl_mem_arg(&a, cl_l->mean); moe__cl_mem_arg(&a, cl_l->rstd); moe__cl_mem_arg(&a, dx);
        return moe__cl_run(&a, 1, (size_t)T, 1, 1, NULL);
    }
    return moe__cl_moe_backward(dm, cl_l, x, dy, dx, T, flags);
}

/* Back-propagate the device buffer dy through every layer; layer 0's dx goes to dbuf[0] when wanted. */
static moe_result moe__cl_model_backward(moe_cl_model *dm, moe__cl_mem dy, int want_dx, int flags) {
    int i;
    for (i = dm->n_layers - 1; i >= 0; i--) {
        moe__cl_mem x = i > 0 ? dm->layers[i - 1].out : dm->x;
        moe__cl_mem dst = i > 0 || want_dx ? dm->dbuf[i & 1] : NULL;
        MOE__TRY(moe__cl_layer_backward(dm, &dm->layers[i], x, dy, dst, dm->T, flags));
        dy = dst;
    }
    return MOE_OK;
}

MOEDEF void moe_cl_model_zero_grad(moe_cl_model *dm) {
    float zero = 0.0f;
    if (!dm) return;
    if (dm->fallback) {
        if (dm->model) moe_model_zero_grad(dm->model);
        else memset(dm->host_grads, 0, (size_t)dm->n_params * sizeof(float));
        return;
    }
    MOE__CLF(dm->cl, clEnqueueFillBuffer)(dm->cl->queue, dm->grads, &zero, sizeof zero, 0, (size_t)dm->n_params * sizeof(float), 0, NULL, NULL);
}

MOEDEF moe_result moe_cl_model_backward(moe_cl_model *dm, const float *dy, float *dx, int flags) {
    int64_t T;
    if (!dm) return MOE_ERR_INVALID_ARGUMENT;
    if (dm->fallback) return dm->model ? moe_model_backward(dm->model, dy, dx, flags) : moe_layer_backward(dm->layer, dy, dx, flags);
    if (!dm->has_forward) return moe__fail(dm->ctx, MOE_ERR_STATE, "backward before any forward");
    if (dm->n_quantized) return moe__fail(dm->ctx, MOE_ERR_STATE, MOE__CL_QUANTIZED);
    if (!dy) return moe__fail(dm->ctx, MOE_ERR_INVALID_ARGUMENT, "dy is NULL");
    T = dm->T;
    MOE__TRY(moe__cl_write(dm, dm->dloss, dy, (size_t)(T * dm->d_out) * sizeof(float)));
    MOE__TRY(moe__cl_model_backward(dm, dm->dloss, dx != NULL, flags));
    if (dx) return moe__cl_read(dm, dm->dbuf[0], 0, dx, (size_t)(T * dm->d_in) * sizeof(float));
    return MOE_OK;
}

// >>cl_train ----------------------------------------------------------------
/* A refused training step draws the same noise and jitter when retried (as moe.h's model). */
static void moe__cl_rewind_noise(moe_cl_model *dm) {
    int i;
    for (i = 0; i < dm->n_layers; i++) dm->layers[i].noise_step--;
}

/* Sigmoid routers' selection biases are state, not parameters (as moe.h's model step): after == 0
   keeps them aside before the optimizer step; after == 1 puts them back and moves them by the
   aux-loss-free rule from the last forward's loads. */
static moe_result moe__cl_selection_bias(moe_cl_model *dm, int after) {
    moe_cl_ctx *cl = dm->cl;
    int i;
    for (i = 0; i < dm->n_layers; i++) {
        moe__cl_layer *cl_l = &dm->layers[i];
        const moe_layer *l = cl_l->l;
        size_t off = (size_t)(cl_l->poff + l->selection_bias) * sizeof(float), bytes = (size_t)l->d.n_experts * sizeof(float);
        moe__cl_args a;
        if (!cl_l->bias_keep) continue;
        MOE__CL_CHECK(cl, after ? MOE__CLF(cl, clEnqueueCopyBuffer)(cl->queue, cl_l->bias_keep, dm->params, 0, off, bytes, 0, NULL, NULL)
                                : MOE__CLF(cl, clEnqueueCopyBuffer)(cl->queue, dm->params, cl_l->bias_keep, off, 0, bytes, 0, NULL, NULL),
                      "clEnqueueCopyBuffer");
        if (!after || l->d.bias_update_rate == 0.0f) continue;
        a = moe__cl_begin(cl, MOE__CLK_bias_update);
        moe__cl_int_arg(&a, l->d.n_experts); moe__cl_float_arg(&a, l->d.bias_update_rate); moe__cl_mem_arg(&a, cl_l->chosen);
        moe__cl_mem_arg(&a, dm->params); moe__cl_long_arg(&a, cl_l->poff + l->selection_bias);
        MOE__TRY(moe__cl_run(&a, 1, (size_t)l->d.n_experts, 1, 1, NULL));
    }
    return MOE_OK;
}

MOEDEF moe_result moe_cl_model_train_step(moe_cl_model *dm, const float *x, const moe_target *target, int64_t n_tokens, moe_step_info *info) {
    moe_cl_ctx *cl;
    moe_model *model;
    const moe_optimizer_desc *od;
    moe_step_info si;
    moe__cl_args a;
    int64_t T = n_tokens, C, t, c;
    double sum = 0.0, sq = 0.0;
    float loss, aux = 0.0f, norm, scale = 1.0f, lr;
    int i;
    if (!dm) return MOE_ERR_INVALID_ARGUMENT;
    if (!dm->model) return moe__fail(dm->ctx, MOE_ERR_STATE, "a layer uploaded alone has no loss or optimizer: upload a model to train");
    if (dm->fallback) return moe_model_train_step(dm->model, x, target, n_tokens, info);
    if (dm->n_quantized) return moe__fail(dm->ctx, MOE_ERR_STATE, MOE__CL_QUANTIZED);
    cl = dm->cl;
    model = dm->model;
    od = &model->opt->d;
    C = moe_model_d_out(model);
    memset(&si, 0, sizeof si);
    MOE__TRY(moe__cl_check_call(dm, x, T));
    if (!target) return moe__fail(dm->ctx, MOE_ERR_INVALID_ARGUMENT, "target is NULL");
    if (model->desc.loss == MOE_LOSS_CROSS_ENTROPY) {
        if (!target->labels) return moe__fail(dm->ctx, MOE_ERR_INVALID_ARGUMENT, "cross-entropy needs target->labels");
        for (t = 0; t < T; t++)
            if (target->labels[t] < 0 || target->labels[t] >= C)
                return moe__fail(dm->ctx, MOE_ERR_INVALID_ARGUMENT, "label %d of row %lld is outside 0..%lld", (int)target->labels[t], (long long)t, (long long)(C - 1));
        MOE__TRY(moe__cl_write(dm, dm->labels, target->labels, (size_t)T * sizeof(int32_t)));
    } else {
        if (!target->values) return moe__fail(dm->ctx, MOE_ERR_INVALID_ARGUMENT, "this loss needs target->values");
        MOE__TRY(moe__cl_write(dm, dm->values, target->values, (size_t)(T * C) * sizeof(float)));
    }
    MOE__TRY(moe__cl_model_forward(dm, x, T, 1, NULL));
    a = moe__cl_begin(cl, MOE__CLK_task_loss);
    moe__cl_int_arg(&a, T); moe__cl_int_arg(&a, C); moe__cl_int_arg(&a, (int)model->desc.loss);
    moe__cl_mem_arg(&a, dm->layers[dm->n_layers - 1].out); moe__cl_mem_arg(&a, dm->labels); moe__cl_mem_arg(&a, dm->values);
    moe__cl_mem_arg(&a, dm->tok); moe__cl_mem_arg(&a, dm->dloss);
    MOE__TRY(moe__cl_run(&a, 1, (size_t)T, 1, 1, NULL));
    MOE__TRY(moe__cl_read(dm, dm->tok, 0, dm->host_f, (size_t)T * sizeof(float)));
    for (t = 0; t < T; t++) sum += dm->host_f[t];
    loss = (float)(sum / (double)T);
    for (i = 0; i < dm->n_layers; i++) {
        const moe_layer_desc *d = &dm->layers[i].l->d;
        if (d->kind == MOE_LAYER_MOE && (d->balance_loss > 0.0f || d->z_loss > 0.0f || d->importance_loss > 0.0f || d->load_loss > 0.0f)) {
            moe_stats st;
            MOE__TRY(moe__cl_layer_stats(dm, i, &st));
            aux += st.aux_loss;
        }
    }
    si.loss = loss;
    si.aux_loss = aux;
    si.step = dm->step;
    if (!moe__finite(loss) || !moe__finite(aux)) {
        moe__cl_rewind_noise(dm);
        if (info) *info = si;
        return moe__fail(dm->ctx, MOE_ERR_NONFINITE, "loss is not finite (loss %g, aux %g); parameters unchanged", (double)loss, (double)aux);
    }
    moe_cl_model_zero_grad(dm);
    MOE__TRY(moe__cl_model_backward(dm, dm->dloss, 0, MOE_BACKWARD_AUX));
    /* the optimizer: global norm from fixed chunks summed in order, then one update kernel */
    a = moe__cl_begin(cl, MOE__CLK_sumsq);
    moe__cl_long_arg(&a, dm->n_params); moe__cl_int_arg(&a, MOE__CHUNK); moe__cl_mem_arg(&a, dm->grads); moe__cl_mem_arg(&a, dm->partial);
    MOE__TRY(moe__cl_run(&a, 1, (size_t)dm->n_chunks, 1, 1, NULL));
    MOE__TRY(moe__cl_read(dm, dm->partial, 0, dm->host_f, (size_t)dm->n_chunks * sizeof(float)));
    for (c = 0; c < dm->n_chunks; c++) sq += dm->host_f[c];
    norm = (float)sqrt(sq);
    if (!moe__finite(norm)) {
        moe__cl_rewind_noise(dm);
        if (info) *info = si;
        return moe__fail(dm->ctx, MOE_ERR_NONFINITE, "gradient norm is not finite; parameters unchanged");
    }
    if (od->clip_norm > 0.0f) {
        float cf = od->clip_norm / (norm + 1e-6f);
        if (cf < 1.0f) scale = cf;
    }
    lr = moe_optimizer_lr(model->opt, dm->step);
    dm->step++;
    MOE__TRY(moe__cl_selection_bias(dm, 0));
    a = moe__cl_begin(cl, MOE__CLK_opt_step);
    moe__cl_long_arg(&a, dm->n_params); moe__cl_int_arg(&a, (int)od->kind); moe__cl_float_arg(&a, scale); moe__cl_float_arg(&a, lr);
    moe__cl_float_arg(&a, od->beta1); moe__cl_float_arg(&a, od->beta2); moe__cl_float_arg(&a, od->eps); moe__cl_float_arg(&a, od->weight_decay);
    moe__cl_float_arg(&a, od->momentum); moe__cl_float_arg(&a, 1.0f - (float)pow((double)od->beta1, (double)dm->step));
    moe__cl_float_arg(&a, (float)sqrt(1.0 - pow((double)od->beta2, (double)dm->step))); moe__cl_int_arg(&a, dm->m != NULL);
    moe__cl_mem_arg(&a, dm->params); moe__cl_mem_arg(&a, dm->grads); moe__cl_mem_arg(&a, dm->m); moe__cl_mem_arg(&a, dm->v);
    MOE__TRY(moe__cl_run(&a, 1, (size_t)dm->n_params, 1, 1, NULL));
    MOE__TRY(moe__cl_selection_bias(dm, 1));
    MOE__TRY(moe__cl_refresh_transposed(dm));
    si.grad_norm = norm;
    si.lr = lr;
    si.step = dm->step;
    if (info) *info = si;
    return MOE_OK;
}

#endif /* MOE_CL_IMPLEMENTATION_INCLUDED */
#endif /* MOE_CL_IMPLEMENTATION */
