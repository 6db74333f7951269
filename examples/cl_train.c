/* cl_train.c - the digits demo trained on an OpenCL device with moe_cl.h.

   make && ./build/cl_train          same options as ./build/digits (--help)
   MOE_CL_DEVICE=1 ./build/cl_train  another device (see the README, "OpenCL (moe_cl.h)")

   The data, split, model, optimizer, epochs and output are examples/digits.c's: this file
   compiles digits.c itself, with the five moe_model_* calls its training and evaluation make
   sent to a device copy of the model. The weights live on the device for the whole run and
   come back once, to be saved. Without an OpenCL device it says why and trains on the CPU,
   exactly as build/digits does. On a device the sums run in another order than on the CPU,
   so the losses and the final test_accuracy agree with `make demo` closely, not to the bit. */
#define _POSIX_C_SOURCE 200809L /* as digits.c: isatty, fileno */

#include <stdio.h>

#define MOE_IMPLEMENTATION
#include "../moe.h"
#define MOE_CL_IMPLEMENTATION
#include "../moe_cl.h"

static moe_ctx cl_errors;          /* the OpenCL context's messages */
static moe_cl_ctx *device;
static moe_cl_model *device_model; /* made at the first call, from the model digits.c built */

static moe_result on_device(moe_model *model) {
    moe_result r = MOE_OK;
    if (!device_model && (r = moe_cl_model_upload(device, model, &device_model)) != MOE_OK)
        fprintf(stderr, "cl_train: %s\n", moe_ctx_error(&cl_errors));
    return r;
}

/* Prints the device's message for a failed call; returns the result. */
static moe_result report(moe_result r) {
    if (r != MOE_OK) fprintf(stderr, "cl_train: %s\n", moe_ctx_error(&cl_errors));
    return r;
}

static moe_result cl_train_step(moe_model *model, const float *x, const moe_target *target, int64_t n, moe_step_info *info) {
    moe_result r = on_device(model);
    return r != MOE_OK ? r : report(moe_cl_model_train_step(device_model, x, target, n, info));
}

static moe_result cl_predict(moe_model *model, const float *x, int64_t n, int32_t *classes) {
    moe_result r = on_device(model);
    return r != MOE_OK ? r : report(moe_cl_model_predict(device_model, x, n, classes));
}

static moe_result cl_forward(moe_model *model, const float *x, int64_t n, float *y, const moe_forward_opts *opts) {
    moe_result r = on_device(model);
    return r != MOE_OK ? r : report(moe_cl_model_forward(device_model, x, n, y, opts));
}

static moe_result cl_stats(const moe_model *model, int layer, moe_stats *stats) {
    (void)model;
    return report(moe_cl_model_stats(device_model, layer, stats));
}

/* the trained weights come back from the device here, once */
static moe_result cl_save(moe_model *model, const char *path) {
    moe_result r = on_device(model);
    if (r == MOE_OK) r = report(moe_cl_model_download(device_model));
    return r != MOE_OK ? r : moe_model_save(model, path);
}

#define moe_model_train_step cl_train_step
#define moe_model_predict cl_predict
#define moe_model_forward cl_forward
#define moe_model_stats cl_stats
#define moe_model_save cl_save
#define main digits_main
#include "digits.c"
#undef main
#undef moe_model_save
#undef moe_model_stats
#undef moe_model_forward
#undef moe_model_predict
#undef moe_model_train_step

int main(int argc, char **argv) {
    /* build/cl_train.safetensors unless the command line says otherwise (a later --out wins) */
    char *args[260];
    int status, i, n = 0;
    if (argc > 256) {
        fprintf(stderr, "cl_train: too many arguments\n");
        return 2;
    }
    args[n++] = argv[0];
    args[n++] = (char *)"--out";
    args[n++] = (char *)"build/cl_train.safetensors";
    for (i = 1; i < argc; i++) args[n++] = argv[i];
    args[n] = NULL;
    moe_ctx_init(&cl_errors, NULL);
    if (moe_cl_ctx_init(&cl_errors, NULL, &device) != MOE_OK) {  /* a device that is there but fails */
        fprintf(stderr, "cl_train: %s\n", moe_ctx_error(&cl_errors));
        return 1;
    }
    if (moe_cl_ctx_fallback(device))
        printf("OpenCL: no device, training on the CPU (%s)\n", moe_cl_ctx_reason(device));
    else
        printf("OpenCL device: %s (GEMM tiles %s)\n", moe_cl_device_name(device), moe_cl_tiles(device));
    status = digits_main(n, args);
    moe_cl_model_destroy(device_model);
    moe_cl_ctx_destroy(device);
    return status;
}
