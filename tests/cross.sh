#!/bin/sh
# make cross: moe.h on other platforms and compilers. Each part is skipped, with the reason, when
# its toolchain is missing (Debian package names in brackets):
#   compilers  gcc and clang each build every test (C99 -Wpedantic -Werror, OpenMP), the examples
#              and the C++11 test (-Wpedantic -Werror), and run them
#   i686       32-bit x86 [gcc-i686-linux-gnu libc6-dev-i386-cross, or gcc-multilib for gcc -m32;
#              g++-i686-linux-gnu adds a C++11 compile, likewise g++-aarch64-linux-gnu below],
#              run natively: once with x87 float math (plain C kernels), once with -msse2
#              -mfpmath=sse (vector kernels and the AVX2 dispatch)
#   windows    x86_64-w64-mingw32-gcc [gcc-mingw-w64-x86-64, g++-mingw-w64-x86-64 for C++]; the
#              tests run under wine64 [wine64] when it can run a program here, else they only build
#   aarch64    aarch64-linux-gnu-gcc [gcc-aarch64-linux-gnu libc6-dev-arm64-cross] and qemu-aarch64
#              [qemu-user]: portable kernels only, the x86 dispatch compiled out
# Every target runs the suite's test programs with OpenMP on (tests/test_cli.c too where a POSIX
# shell can run the tool), and checks that its OpenMP and no-OpenMP builds train bit-identical
# models. Ends with one line: "N passed, N failed, N skipped".
# Environment: CROSS_PARTS (default "compilers i686 windows aarch64"), CROSS_TESTS (test names
# without the test_ prefix, e.g. "core gemm cli"; default every tests/test_*.c).
set -u
cd "$(dirname "$0")/.." || exit 1

PARTS=${CROSS_PARTS:-"compilers i686 windows aarch64"}
OUT=build/cross
. tests/harness.sh
CXX11="-std=c++11 $WARN"
if [ -n "${CROSS_TESTS:-}" ]; then
    TESTS=""
    for t in $CROSS_TESTS; do TESTS="$TESTS test_$t"; done
else
    TESTS=$(for f in tests/test_*.c; do basename "$f" .c; done | tr '\n' ' ')
fi

# wanted TEST: whether tests/TEST.c is among the programs to run
wanted() { case " $TESTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

now() { date +%s; }
TIMINGS=""
timed() { TIMINGS="$TIMINGS\n  $1: $(($(now) - $2)) s"; }

# Link flags that make a cross-built program find the cross toolchain's loader and libraries
# (Debian installs them under /usr/TRIPLET/lib), so it runs without a sysroot option.
cross_link() {
    loader=$($1 -print-file-name="$2")
    case $loader in /*) ;; *) return 0 ;; esac
    loader=$(readlink -f "$loader")
    echo "-Wl,--dynamic-linker=$loader -Wl,-rpath,$(dirname "$loader")"
}

# suite TARGET "CC" "FLAGS" "LINK" EXE "RUNNER": every test program built warning-free with
# OpenMP and run through RUNNER ("-" only builds them); then the determinism test without
# OpenMP, whose digest must equal the OpenMP build's.
suite() {
    tgt=$1; cc=$2; flags=$3; link=$4; exe=$5; runner=$6
    dir=$OUT/$tgt
    mkdir -p "$dir"
    rm -f "$dir"/*.digest
    for t in $TESTS; do
        [ "$t" = test_cli ] && continue   # cli() builds and runs it with the tool
        # shellcheck disable=SC2086
        if ! $cc $C99 $flags -fopenmp -DTMP_DIR="\"$dir/tmp_$t\"" "tests/$t.c" -o "$dir/$t$exe" $link -lm >> "$LOG" 2>&1; then
            bad "$tgt/$t does not compile"
            continue
        fi
        if [ "$runner" = - ]; then ok "$tgt/$t compiles"; continue; fi
        args=""
        [ "$t" = test_determinism ] && args="$dir/omp.digest"
        # shellcheck disable=SC2086
        run_result "$tgt/$t" "$dir/$t.out" $runner "$dir/$t$exe" $args
    done
    wanted test_determinism || return
    [ "$runner" = - ] && return
    # shellcheck disable=SC2086
    if $cc $C99 $flags -DTMP_DIR="\"$dir/tmp_noomp\"" tests/test_determinism.c -o "$dir/determinism_noomp$exe" $link -lm >> "$LOG" 2>&1 &&
       $runner "$dir/determinism_noomp$exe" "$dir/noomp.digest" >> "$LOG" 2>&1 &&
       cmp -s "$dir/omp.digest" "$dir/noomp.digest"; then
        ok "$tgt: OpenMP and no-OpenMP builds train bit-identical models"
    else
        bad "$tgt: OpenMP and no-OpenMP builds differ or do not run"
    fi
}

# cli TARGET "CC" "FLAGS" "LINK" "RUNNER": the command-line tool and its test, both built for the
# target; the test runs the tool through a POSIX shell, so a wrapper script puts RUNNER in front.
cli() {
    tgt=$1; cc=$2; flags=$3; link=$4; runner=$5
    wanted test_cli || return
    dir=$OUT/$tgt
    # shellcheck disable=SC2086
    if ! $cc $C99 $flags -fopenmp examples/moe.c -o "$dir/moe" $link -lm >> "$LOG" 2>&1 ||
       ! $cc $C99 $flags -fopenmp tests/test_cli.c -o "$dir/test_cli" $link -lm >> "$LOG" 2>&1; then
        bad "$tgt: build/moe or test_cli does not compile"
        return
    fi
    tool="$dir/moe"
    if [ -n "$runner" ]; then
        tool="$dir/moe.sh"
        printf '#!/bin/sh\nexec %s "%s" "$@"\n' "$runner" "$PWD/$dir/moe" > "$tool"
        chmod +x "$tool"
    fi
    mkdir -p "$dir/tmp_cli"
    # shellcheck disable=SC2086
    run_result "$tgt/test_cli" "$dir/test_cli.out" $runner "$dir/test_cli" "$tool" "$dir/tmp_cli"
}

# runs CC "FLAGS" "LINK" RUNNER...: whether a program built so runs here
runs() {
    cc=$1; flags=$2; link=$3; shift 3
    printf '#include <stdio.h>\nint main(void) { puts("hello"); return 0; }\n' > "$OUT/hello.c"
    # shellcheck disable=SC2086
    $cc $flags "$OUT/hello.c" -o "$OUT/hello.bin" $link >> "$LOG" 2>&1 && "$@" "$OUT/hello.bin" 2>> "$LOG" | grep -q hello
}

# compiles_moe TARGET "CC" "FLAGS": the implementation alone, with and without OpenMP, and as
# C++11 with the matching g++ when it is installed
compiles_moe() {
    # shellcheck disable=SC2086
    check "$1: moe.h C99 -Wpedantic -Werror" $2 $C99 $3 -c tests/compile/impl.c -o "$OUT/$1_impl.o"
    # shellcheck disable=SC2086
    check "$1: moe.h C99 -Wpedantic -Werror with OpenMP" $2 $C99 $3 -fopenmp -c tests/compile/impl.c -o "$OUT/$1_impl_omp.o"
    cxx=$(echo "$2" | sed 's/gcc\( \|$\)/g++\1/')
    if have ${cxx%% *}; then
        # shellcheck disable=SC2086
        check "$1: moe.h C++11 -Wpedantic -Werror" $cxx $CXX11 $3 -fopenmp -c tests/compile/cpp.cpp -o "$OUT/$1_cpp.o"
    else
        skip "$1: C++11" "no ${cxx%% *}"
    fi
}

# x86_dispatch CC "FLAGS": prints 1 when moe.h compiles the x86 AVX2 dispatch for this target
x86_dispatch() {
    # shellcheck disable=SC2086
    printf '#define MOE_IMPLEMENTATION\n#include "moe.h"\n' | $1 $2 -std=c99 -I. -E -dM -x c - 2>> "$LOG" |
        grep -c '^#define MOE__HAVE_X86_DISPATCH'
}

part_compilers() {
    for pair in gcc:g++ clang:clang++; do
        cc=${pair%%:*}; cxx=${pair#*:}
        if ! have "$cc" || ! have "$cxx"; then skip "$cc" "$cc or $cxx not installed"; continue; fi
        if ! runs "$cc" "-fopenmp" "" env; then skip "$cc" "$cc -fopenmp cannot build a program (for clang: libomp-dev)"; continue; fi
        echo "== $cc: every test and example (C99), the C++11 test"
        t0=$(now)
        check "$cc: C++11 -Wpedantic -Werror" $cxx $CXX11 tests/compile/cpp.cpp -o "$OUT/cpp_$cc" -lm
        check "$cc: C++11 program runs" "$OUT/cpp_$cc"
        mkdir -p "$OUT/$cc"
        for ex in examples/*.c; do
            check "$cc: $ex -Werror" $cc $C99 -O2 -fopenmp "$ex" -o "$OUT/$cc/$(basename "$ex" .c)" -lm
        done
        suite "$cc" "$cc" "-O2" "" "" ""
        cli "$cc" "$cc" "-O2" "" ""
        timed "$cc" "$t0"
    done
    # clang fuses a*b+c into FMAs by default (-ffp-contract=on), gcc in C99 mode does not: with
    # fusing off, the two compilers must agree bit for bit
    if [ -f "$OUT/gcc/omp.digest" ] && [ -f "$OUT/clang/omp.digest" ]; then
        if clang $C99 -O2 -fopenmp -ffp-contract=off -DTMP_DIR="\"$OUT/clang/tmp_nofma\"" tests/test_determinism.c \
               -o "$OUT/clang/determinism_nofma" -lm >> "$LOG" 2>&1 &&
           "$OUT/clang/determinism_nofma" "$OUT/clang/nofma.digest" >> "$LOG" 2>&1 &&
           cmp -s "$OUT/gcc/omp.digest" "$OUT/clang/nofma.digest"; then
            ok "gcc and clang -ffp-contract=off train bit-identical models"
        else
            bad "gcc and clang -ffp-contract=off train different models (or do not run)"
        fi
    fi
}

part_i686() {
    if have i686-linux-gnu-gcc; then
        cc=i686-linux-gnu-gcc
        link=$(cross_link $cc ld-linux.so.2)
    elif have gcc && runs "gcc -m32" "" "" true; then
        cc="gcc -m32"
        link=""
    else
        skip "i686" "no 32-bit x86 compiler: apt-get install gcc-i686-linux-gnu libc6-dev-i386-cross (or gcc-multilib)"
        return
    fi
    runner=""
    if ! runs "$cc" "" "$link" env; then
        if have qemu-i386 && runs "$cc" "" "$link" qemu-i386; then runner=qemu-i386
        else runner=-; fi
    fi
    echo "== i686 ($cc${runner:+, through $runner})"
    t0=$(now)
    compiles_moe i686 "$cc" ""
    check "i686: x87 float math gets the plain C kernels" test "$(x86_dispatch "$cc" "")" = 0
    check "i686 -mfpmath=sse: the AVX2 dispatch is compiled" test "$(x86_dispatch "$cc" "-msse2 -mfpmath=sse")" = 1
    [ "$runner" = - ] && skip "i686 test runs" "32-bit programs cannot run on this machine; built only"
    suite i686 "$cc" "-O2" "$link" "" "$runner"
    timed "i686 (x87)" "$t0"
    t0=$(now)
    suite i686-sse "$cc" "-O2 -msse2 -mfpmath=sse" "$link" "" "$runner"
    [ "$runner" != - ] && cli i686-sse "$cc" "-O2 -msse2 -mfpmath=sse" "$link" "$runner"
    timed "i686 (SSE)" "$t0"
}

part_windows() {
    cc=x86_64-w64-mingw32-gcc
    if ! have $cc; then skip "windows" "no MinGW-w64: apt-get install gcc-mingw-w64-x86-64"; return; fi
    echo "== windows (MinGW-w64)"
    t0=$(now)
    compiles_moe windows $cc ""
    have x86_64-w64-mingw32-g++ && check "windows: C++11 program links" x86_64-w64-mingw32-g++ $CXX11 -static tests/compile/cpp.cpp -o "$OUT/cpp.exe"
    mkdir -p "$OUT/windows"
    for ex in examples/*.c; do
        check "windows: $ex -Werror" $cc $C99 -O2 -fopenmp -static "$ex" -o "$OUT/windows/$(basename "$ex" .c).exe"
    done
    wine=""
    for w in wine64 /usr/lib/wine/wine64 wine; do have $w && { wine=$w; break; }; done
    # a private wine prefix inside build/; the first start creates it (about 15 s)
    export WINEPREFIX="$PWD/$OUT/wine" WINEDEBUG=-all WINEDLLOVERRIDES="mscoree,mshtml="
    runner=-
    if [ -z "$wine" ]; then
        skip "windows test runs" "no wine64 (apt-get install wine64); built only"
    elif runs "$cc" "-static" "" $wine; then
        runner=$wine
        [ -f "$OUT/cpp.exe" ] && check "windows: C++11 program runs" $wine "$OUT/cpp.exe"
    else
        skip "windows test runs" "$wine cannot run a program here (see $LOG); built only"
    fi
    # static: the MinGW runtime DLLs (libgomp, winpthread) need not be on wine's path
    suite windows $cc "-O2 -static" "" .exe "$runner"
    wanted test_cli && skip "windows/test_cli" "it drives the tool through a POSIX shell"
    timed "windows" "$t0"
}

part_aarch64() {
    cc=aarch64-linux-gnu-gcc
    if ! have $cc; then skip "aarch64" "no cross compiler: apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user"; return; fi
    link=$(cross_link $cc ld-linux-aarch64.so.1)
    runner=-
    if runs $cc "" "$link" env; then runner=""          # binfmt_misc runs it directly
    elif have qemu-aarch64 && runs $cc "" "$link" qemu-aarch64; then runner=qemu-aarch64
    fi
    echo "== aarch64${runner:+ (through $runner)}"
    t0=$(now)
    compiles_moe aarch64 $cc ""
    check "aarch64: the x86 dispatch is compiled out" test "$(x86_dispatch $cc "")" = 0
    [ "$runner" = - ] && skip "aarch64 test runs" "no qemu-aarch64 (apt-get install qemu-user); built only"
    suite aarch64 $cc "-O2" "$link" "" "$runner"
    [ "$runner" != - ] && cli aarch64 $cc "-O2" "$link" "$runner"
    timed "aarch64" "$t0"
}

# the host compiler must see the dispatch, or the checks above that it is absent prove nothing
if [ "$(uname -m)" = x86_64 ] && have cc; then
    check "host x86-64: the AVX2 dispatch is compiled" test "$(x86_dispatch cc "")" = 1
fi
for part in $PARTS; do
    case $part in
        compilers|i686|windows|aarch64) "part_$part" ;;
        *) bad "unknown part $part (compilers, i686, windows, aarch64)" ;;
    esac
done

printf '\ntimes:%b\n' "$TIMINGS"
finish
