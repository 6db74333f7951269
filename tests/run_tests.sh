#!/bin/sh
# The whole test suite (make test): compile checks, then every tests/test_*.c built three ways —
# with OpenMP, without OpenMP, and under AddressSanitizer + UndefinedBehaviorSanitizer — plus the
# cross-build determinism check, the fuzz corpus replay (tests/fuzz/), the README quick start, the
# command-line tool and a bench smoke run.
# Ends with one line: "N passed, N failed, N skipped" (cases, summed over all builds).
# Environment: CC (default cc), CXX (default c++), TEST_CONFIGS (default "omp noomp asan").
set -u
cd "$(dirname "$0")/.." || exit 1

CC=${CC:-cc}
CXX=${CXX:-c++}
CONFIGS=${TEST_CONFIGS:-"omp noomp asan"}
OUT=build/tests
. tests/harness.sh

# flags per configuration
flags() {
    case $1 in
        omp)   echo "-O2 -fopenmp" ;;
        noomp) echo "-O2" ;;
        asan)  echo "-O1 -g -fopenmp -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer" ;;
    esac
}

# Every test program of every configuration is compiled up front, JOBS at a time, in the
# background while the compile checks below run (compiling moe.h dominates the suite's time).
JOBS=${TEST_JOBS:-$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)}
running=0
# bg_build NAME COMMAND...: NAME.log gets the output, NAME.rc the exit status
bg_build() {
    name=$1; shift
    ( "$@" > "$name.log" 2>&1; echo $? > "$name.rc" ) &
    running=$((running + 1))
    if [ "$running" -ge "$JOBS" ]; then wait; running=0; fi
}
# built NAME: the build's output goes to the log; true when it succeeded
built() { cat "$1.log" >> "$LOG" 2>/dev/null; [ "$(cat "$1.rc" 2>/dev/null)" = 0 ]; }
(
    for cfg in $CONFIGS; do
        mkdir -p "$OUT/$cfg"
        extra=""
        [ "$cfg" = asan ] && extra="-fsanitize=float-cast-overflow"
        for src in tests/test_*.c; do
            t=$(basename "$src" .c)
            libs=-lm
            [ "$t" = test_cl ] && libs="-lm -ldl"
            bg_build "$OUT/$cfg/$t" $CC -std=c99 $WARN $(flags "$cfg") -DTMP_DIR="\"$OUT/$cfg/tmp_$t\"" "$src" -o "$OUT/$cfg/$t" $libs
        done
        bg_build "$OUT/$cfg/fuzz_replay" $CC -std=c99 $WARN $(flags "$cfg") $extra -DMOE_FUZZ_REPLAY tests/fuzz/fuzz_load.c -o "$OUT/$cfg/fuzz_replay" -lm
        bg_build "$OUT/$cfg/moe" $CC -std=c99 $WARN $(flags "$cfg") examples/moe.c -o "$OUT/$cfg/moe" -lm
    done
    # the bench and the examples the later sections run
    bg_build "$OUT/bench_moe" $CC $C99 -O2 -fopenmp -DMOE_BENCH_CL bench/bench_moe.c -o "$OUT/bench_moe" -lm -ldl
    for e in digits embed mdn mmoe charlm; do
        bg_build "$OUT/$e" $CC $C99 -O2 -fopenmp examples/$e.c -o "$OUT/$e" -lm
    done
    wait
) &
pool=$!

echo "== compile checks"
check "C99 -Wpedantic -Werror (gcc-compatible $CC)" $CC $C99 -c tests/compile/impl.c -o "$OUT/impl.o"
check "C99 with OpenMP" $CC $C99 -fopenmp -c tests/compile/impl.c -o "$OUT/impl_omp.o"
check "C++11 -Werror" $CXX -std=c++11 -Wall -Wextra -Werror tests/compile/cpp.cpp -o "$OUT/cpp" -lm
check "C++11 program runs" "$OUT/cpp"
check "two-file link" $CC $C99 tests/compile/impl.c tests/compile/use.c -o "$OUT/link" -lm
check "two-file program runs" "$OUT/link"
check "MOE_STATIC in two files" $CC $C99 tests/compile/static_a.c tests/compile/static_b.c -o "$OUT/static" -lm
check "MOE_STATIC program runs" "$OUT/static"
check "MOE_MALLOC + MOE_FREE override" sh -c "$CC $C99 tests/compile/custom_malloc.c -o $OUT/custom_malloc -lm && $OUT/custom_malloc"
if $CC $C99 -c tests/compile/malloc_alone.c -o "$OUT/malloc_alone.o" >> "$LOG" 2>&1; then
    bad "MOE_MALLOC without MOE_FREE is refused"
else
    ok "MOE_MALLOC without MOE_FREE is refused"
fi
# MOE_NO_TRAINING (inference only) and MOE_NO_STDIO (memory buffers only), alone and together
for opts in -DMOE_NO_TRAINING -DMOE_NO_STDIO "-DMOE_NO_TRAINING -DMOE_NO_STDIO"; do
    check "$opts: the minimal program as C99 and C++11 -Wpedantic -Werror, runs" sh -c \
        "$CC $C99 $opts tests/compile/minimal.c -o $OUT/minimal -lm && $OUT/minimal &&
         $CXX -x c++ -std=c++11 -Wall -Wextra -Werror $opts tests/compile/minimal.c -o $OUT/minimal_cpp -lm && $OUT/minimal_cpp"
done
check "MOE_NO_STDIO: no <stdio.h>, no stdio function referenced" sh -c \
    "$CC $C99 -c tests/compile/no_stdio.c -o $OUT/no_stdio.o && ! nm -u $OUT/no_stdio.o | grep -E 'printf|fopen|fclose|fread|fwrite|fseek|ftell|fflush|fileno|rename|remove'"
if $CC $C99 -c tests/compile/training_call.c -o "$OUT/training_call.o" >> "$LOG" 2>&1 &&
   ! $CC $C99 -DMOE_NO_TRAINING -c tests/compile/training_call.c -o "$OUT/training_call.o" >> "$LOG" 2>&1; then
    ok "MOE_NO_TRAINING: a training call does not compile"
else
    bad "MOE_NO_TRAINING: a training call does not compile"
fi
# the reduced builds load, run, predict, report and quantize bit for bit as the full build
digests=""
for opts in "" -DMOE_NO_TRAINING -DMOE_NO_STDIO "-DMOE_NO_TRAINING -DMOE_NO_STDIO"; do
    tag=$(echo "x$opts" | tr -d ' -')
    mkdir -p "$OUT/tmp_embed_$tag"
    $CC $C99 -O2 -fopenmp $opts -DTMP_DIR="\"$OUT/tmp_embed_$tag\"" tests/test_embed.c -o "$OUT/embed_$tag" -lm >> "$LOG" 2>&1 &&
        "$OUT/embed_$tag" "$OUT/embed_$tag.digest" >> "$LOG" 2>&1 && digests="$digests $OUT/embed_$tag.digest"
done
set -- $digests
if [ $# -eq 4 ] && cmp -s "$1" "$2" && cmp -s "$1" "$3" && cmp -s "$1" "$4"; then
    ok "MOE_NO_TRAINING / MOE_NO_STDIO builds: inference bit-identical to the full build"
else
    bad "MOE_NO_TRAINING / MOE_NO_STDIO builds: inference bit-identical to the full build (see $LOG)"
fi
check "plain C kernels (MOE_NO_VECTOR_EXTENSIONS) match the reference" sh -c \
    "$CC $C99 -O2 -DMOE_NO_VECTOR_EXTENSIONS -DTMP_DIR='\"$OUT\"' tests/test_gemm.c -o $OUT/gemm_plain -lm && $OUT/gemm_plain"
check "plain C MoE kernels, decode and reduced weights (MOE_NO_VECTOR_EXTENSIONS)" sh -c \
    "$CC $C99 -O2 -DMOE_NO_VECTOR_EXTENSIONS tests/test_kernels.c -o $OUT/kernels_plain -lm && $OUT/kernels_plain"
# moe_cl.h: C++, and linked to libOpenCL where the OpenCL headers are installed
check "moe_cl.h C++11 -Werror" sh -c "$CXX -std=c++11 -Wall -Wextra -Werror tests/compile/cl_cpp.cpp -o $OUT/cl_cpp -lm -ldl && $OUT/cl_cpp"
if printf '#include <CL/cl.h>\nint main(void) { return clGetPlatformIDs(0, 0, 0) == 1; }\n' |
   $CC -x c - -o "$OUT/cl_probe" -lOpenCL > /dev/null 2>&1; then
    check "moe_cl.h with MOE_CL_LINKED (-lOpenCL)" sh -c \
        "$CC $C99 -O2 -DMOE_CL_LINKED -DTMP_DIR='\"$OUT\"' tests/test_cl.c -o $OUT/test_cl_linked -lm -lOpenCL && $OUT/test_cl_linked"
else
    skip "moe_cl.h with MOE_CL_LINKED" "no OpenCL headers or libOpenCL to link"
fi
if have clang; then
    check "clang C99 -Werror" clang $C99 -c tests/compile/impl.c -o "$OUT/impl_clang.o"
    check "clang C++11 -Werror" clang++ -std=c++11 -Wall -Wextra -Werror -c tests/compile/cpp.cpp -o "$OUT/cpp_clang.o"
else
    skip "clang builds" "clang not installed"
fi


# run_test CONFIG BINARY ARGS...: adds the program's RESULT line to the totals
run_test() {
    cfg=$1; bin=$2; shift 2
    ASAN_OPTIONS=allocator_may_return_null=1:detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
        run_result "$cfg/$(basename "$bin")" "$OUT/$cfg/$(basename "$bin").out" "$bin" "$@"
}

wait "$pool"
for cfg in $CONFIGS; do
    echo "== $cfg: $(flags "$cfg")"
    mkdir -p "$OUT/$cfg"
    for src in tests/test_*.c; do
        t=$(basename "$src" .c)
        [ "$t" = test_cli ] && continue
        if ! built "$OUT/$cfg/$t"; then
            bad "$cfg/$t does not compile"
            continue
        fi
        mkdir -p "$OUT/$cfg/tmp_$t"
        if [ "$t" = test_determinism ]; then
            run_test "$cfg" "$OUT/$cfg/$t" "$OUT/$cfg/determinism.digest"
        else
            run_test "$cfg" "$OUT/$cfg/$t"
        fi
    done
    # the fuzz target's corpus, replayed through the loaders (tests/fuzz/fuzz_load.c: allocation bounds, leaks);
    # gcc's UBSan leaves out float-to-integer overflow, which clang's (used by make fuzz) checks
    if built "$OUT/$cfg/fuzz_replay"; then
        run_test "$cfg" "$OUT/$cfg/fuzz_replay" tests/fuzz/corpus
    else
        bad "$cfg/fuzz_replay does not compile"
    fi
    # the command-line tool, built the same way
    if [ -f tests/test_cli.c ] && [ -f examples/moe.c ]; then
        if built "$OUT/$cfg/moe" && built "$OUT/$cfg/test_cli"; then
            mkdir -p "$OUT/$cfg/tmp_cli"
            run_test "$cfg" "$OUT/$cfg/test_cli" "$OUT/$cfg/moe" "$OUT/$cfg/tmp_cli"
        else
            bad "$cfg: build/moe or test_cli does not compile"
        fi
    fi
done

echo "== across builds"
if [ -f "$OUT/omp/determinism.digest" ] && [ -f "$OUT/noomp/determinism.digest" ]; then
    if cmp -s "$OUT/omp/determinism.digest" "$OUT/noomp/determinism.digest"; then
        ok "OpenMP and no-OpenMP builds train bit-identical models"
    else
        bad "OpenMP and no-OpenMP builds differ: $(cat "$OUT/omp/determinism.digest") vs $(cat "$OUT/noomp/determinism.digest")"
    fi
else
    skip "OpenMP vs no-OpenMP digest" "needs both the omp and noomp configurations"
fi

echo "== bench"
# a fast run of build/bench_moe: the edge shape checked against the reference kernels (CPU, its
# forward also with packed weights, and
# the OpenCL device when there is one), decode with bf16 weights, every line well formed
if built "$OUT/bench_moe"; then
    ok "bench_moe compiles"
    check "bench_moe --shape edge --mode all --check" sh -c \
        "timeout 300 $OUT/bench_moe --shape edge --mode all --runs 1 --check > $OUT/bench_edge.txt && awk -v expect=3 -f bench/table.awk $OUT/bench_edge.txt"
    check "bench_moe --shape decode --dtype bf16" sh -c \
        "timeout 300 $OUT/bench_moe --shape decode --dtype bf16 --runs 1 > $OUT/bench_decode.txt && awk -v expect=1 -f bench/table.awk $OUT/bench_decode.txt"
    check "bench_moe --backend cl (a device, or a skipped line)" sh -c \
        "timeout 300 $OUT/bench_moe --backend cl --shape edge --mode fwd --runs 1 --check > $OUT/bench_cl.txt && awk -v expect=1 -f bench/table.awk $OUT/bench_cl.txt"
    if "$OUT/bench_moe" --shape nosuch > /dev/null 2>&1; [ $? -eq 2 ]; then
        ok "bench_moe refuses a bad flag with status 2"
    else
        bad "bench_moe refuses a bad flag with status 2"
    fi
else
    bad "bench_moe compiles"
fi

echo "== OpenCL without a platform"
# the ICD loader with no vendor files (ocl-icd reads OCL_ICD_VENDORS): the device cases must skip
if [ -x "$OUT/noomp/test_cl" ]; then
    OCL_ICD_VENDORS=/nonexistent "$OUT/noomp/test_cl" > "$OUT/cl_no_platform.out" 2>&1
    if grep -q '^no OpenCL device' "$OUT/cl_no_platform.out"; then
        check "test_cl reports its device cases skipped without a platform" \
            grep -q '^RESULT passed=[0-9]* failed=0 skipped=[1-9]' "$OUT/cl_no_platform.out"
    else
        skip "test_cl without a platform" "this OpenCL loader ignores OCL_ICD_VENDORS"
    fi
else
    skip "test_cl without a platform" "needs the noomp configuration"
fi

echo "== embedding example"
# examples/embed.c on a one-epoch digits model: runs its game loop without touching the heap
if built "$OUT/digits" && built "$OUT/embed" &&
   "$OUT/digits" --epochs 1 --threads 1 --out "$OUT/embed_model.safetensors" --svg "$OUT/digits_routing.svg" >> "$LOG" 2>&1; then
    check "digits: the routing heatmap is an SVG with a cell per (expert, digit)" sh -c \
        "grep -q '^<svg ' $OUT/digits_routing.svg && [ \$(grep -c '^<rect x=' $OUT/digits_routing.svg) -eq 40 ] && tail -n 1 $OUT/digits_routing.svg | grep -q '^</svg>'"
    check "embed: 2000 frames with k changing per call, heap_allocations=0" sh -c \
        "$OUT/embed $OUT/embed_model.safetensors --frames 2000 > $OUT/embed.txt && grep -q '^heap_allocations=0$' $OUT/embed.txt && grep -q '^latency_p99_us=' $OUT/embed.txt"
else
    bad "embed: build the example and a model for it"
fi

echo "== mixture density example"
# examples/mdn.c, shortened: every result line, an SVG, and a mixture NLL clearly below the
# single-Gaussian reading of the MSE network (which cannot represent the three branches)
if built "$OUT/mdn"; then
    check "mdn: 60 epochs, test_nll at least 0.3 below the single-Gaussian baseline, SVG written" sh -c \
        "$OUT/mdn $OUT/mdn.svg --epochs 60 > $OUT/mdn.txt && for k in test_nll test_nll_gaussian_baseline test_mse_baseline test_mse_mixture_mean test_mse_top_mean; do grep -q \"^\$k=\" $OUT/mdn.txt || exit 1; done && awk -F= '/^test_nll=/ { n = \$2 } /^test_nll_gaussian_baseline=/ { b = \$2 } END { exit !(n != \"\" && b != \"\" && n < b - 0.3) }' $OUT/mdn.txt && grep -q '</svg>' $OUT/mdn.svg"
else
    bad "mdn: build the example"
fi

echo "== multi-task example"
# examples/mmoe.c on a small run: one line per model and correlation, every MSE a finite number
if built "$OUT/mmoe"; then
    check "mmoe: shared-bottom, MMoE and PLE lines at two correlations" sh -c \
        "$OUT/mmoe --corr 0.3,0.9 --epochs 1 --train 1024 > $OUT/mmoe.txt && [ \$(grep -c '^corr=0\.[39]0 model=[a-z_]* task0_mse=[0-9.]* task1_mse=[0-9.]* ' $OUT/mmoe.txt) -eq 6 ]"
else
    bad "mmoe: build the example"
fi

echo "== character language model example"
# examples/charlm.c on the first 8,000 characters, one epoch, both routers: it must print its
# metrics, and the same seed must sample the same text on 1 and 2 threads
if built "$OUT/charlm"; then
    check "charlm: smoke run (topk) prints val_bpc= and val_bpc_dense=" sh -c \
        "$OUT/charlm --max-chars 8000 --epochs 1 --batch 64 --length 60 --threads 2 --out $OUT/charlm.safetensors > $OUT/charlm.txt && grep -q '^val_bpc=[0-9]' $OUT/charlm.txt && grep -q '^val_bpc_dense=[0-9]' $OUT/charlm.txt"
    check "charlm: hash router, 1 and 2 threads give the same bits" sh -c \
        "$OUT/charlm --router hash --no-dense --max-chars 8000 --epochs 1 --batch 64 --length 60 --threads 1 --out '' > $OUT/charlm1.txt && $OUT/charlm --router hash --no-dense --max-chars 8000 --epochs 1 --batch 64 --length 60 --threads 2 --out '' > $OUT/charlm2.txt && grep -v 'threads\\|seconds\\| s$' $OUT/charlm1.txt > $OUT/charlm1.cmp && grep -v 'threads\\|seconds\\| s$' $OUT/charlm2.txt > $OUT/charlm2.cmp && cmp $OUT/charlm1.cmp $OUT/charlm2.cmp && grep -q '^val_bpc=' $OUT/charlm1.txt"
    check "charlm: refuses a prompt character outside the vocabulary" sh -c \
        "! $OUT/charlm --max-chars 8000 --epochs 1 --no-dense --out '' --prompt \"\$(printf 'caf\\303\\251')\" > /dev/null 2>&1"
else
    bad "charlm compiles"
fi

echo "== README quick start"
if sed -n '/<!-- quickstart -->/,/<!-- \/quickstart -->/p' README.md | sed '1,2d;$d' | sed '$d' > "$OUT/quickstart.c" && [ -s "$OUT/quickstart.c" ]; then
    check "README quick start compiles" $CC $C99 -O2 -fopenmp "$OUT/quickstart.c" -I. -o "$OUT/quickstart" -lm
    check "README quick start runs" sh -c "cd $OUT && ./quickstart"
else
    bad "README.md has no quick start between <!-- quickstart --> markers"
fi

# the README's Hugging Face import fragment, inside a function that declares what it uses (compiled only: it names a checkpoint)
{
    echo '#define MOE_IMPLEMENTATION'
    echo '#include "moe.h"'
    echo 'int main(void) {'
    echo '    moe_ctx ctx; const char *config_text = NULL;'
    echo '    moe_ctx_init(&ctx, NULL);'
    sed -n '/<!-- hf_import -->/,/<!-- \/hf_import -->/p' README.md | sed '1,2d;$d' | sed '$d'
    echo '    moe_layer_destroy(block);'
    echo '    return 0;'
    echo '}'
} > "$OUT/readme_hf_import.c"
check "README Hugging Face import fragment compiles" $CC $C99 -Wall -Werror -I. -c "$OUT/readme_hf_import.c" -o "$OUT/readme_hf_import.o"

# the fragment in moe.h's manual, inside a function that declares what it uses
{
    echo '#define MOE_IMPLEMENTATION'
    echo '#include "moe.h"'
    echo '#include <stdio.h>'
    echo 'int main(void) {'
    echo '    float x[32 * 64] = {0}; int32_t labels[32] = {0}, classes[32]; int64_t batch = 32; moe_step_info info;'
    sed -n '1,80p' moe.h | sed -n '/^       moe_ctx ctx;/,/^       moe_model_destroy(model);/p'
    echo '    return 0;'
    echo '}'
} > "$OUT/manual_quickstart.c"
check "moe.h manual quick start compiles and runs" sh -c "$CC $C99 -Wno-unused-variable -I. $OUT/manual_quickstart.c -o $OUT/manual_quickstart -lm && cd $OUT && ./manual_quickstart"

# the fragment in moe_cl.h's manual, the same way (on the CPU fallback when there is no OpenCL)
{
    echo '#define MOE_IMPLEMENTATION'
    echo '#include "moe.h"'
    echo '#define MOE_CL_IMPLEMENTATION'
    echo '#include "moe_cl.h"'
    echo '#include <stdio.h>'
    echo 'int main(void) {'
    echo '    moe_ctx ctx; moe_model *model; moe_layer_desc layers[1] = {{ .kind = MOE_LAYER_MOE }};'
    echo '    float x[4 * 8] = {0}, y[4 * 8] = {0}; moe_target target = { NULL, y, NULL }; int64_t batch = 4; moe_step_info info;'
    echo '    moe_ctx_init(&ctx, NULL);'
    echo '    if (moe_model_create(&ctx, &(moe_model_desc){ .d_in = 8, .n_layers = 1, .layers = layers, .loss = MOE_LOSS_MSE }, &model) != MOE_OK) return 1;'
    sed -n '1,40p' moe_cl.h | sed -n '/^       moe_cl_ctx \*cl;/,/^       moe_cl_ctx_destroy(cl);/p'
    echo '    moe_model_destroy(model);'
    echo '    return 0;'
    echo '}'
} > "$OUT/manual_cl.c"
check "moe_cl.h manual quick start compiles and runs" sh -c "$CC $C99 -Wno-unused-result -I. $OUT/manual_cl.c -o $OUT/manual_cl -lm -ldl && $OUT/manual_cl"


finish
