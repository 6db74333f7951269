#!/bin/sh
# make cmake-check: the CMake package and moe.pc as users consume them, all offline. The consumer
# project in tests/cmake/ is built and run three ways: add_subdirectory of this checkout,
# FetchContent of a tarball of it (file:// URL), and find_package after `cmake --install` into a
# temporary prefix; then a plain compile with `pkg-config --cflags --libs moe` from that prefix,
# and the examples built with MOE_BUILD_EXAMPLES. Skipped when cmake is missing.
# Ends with one line: "N passed, N failed, N skipped".
set -u
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
OUT=$ROOT/build/cmake-check
rm -rf "$OUT"
. tests/harness.sh

GEN=""
have ninja && GEN="-G Ninja"

# consume NAME OPENMP CMAKE-ARGS...: configure, build and run the consumer; OPENMP (1 or 0) says
# whether its programs must be built with OpenMP
consume() {
    how=$1; omp=$2; shift 2
    b=$OUT/consumer-$(echo "$how" | tr -c 'A-Za-z0-9\n' _)
    # shellcheck disable=SC2086
    if ! cmake $GEN -S tests/cmake -B "$b" -DCMAKE_BUILD_TYPE=Release "$@" >> "$LOG" 2>&1 ||
       ! cmake --build "$b" >> "$LOG" 2>&1; then
        bad "$how: the consumer does not configure or build (see $LOG)"
        return
    fi
    check "$how: C program runs (openmp=$omp)" sh -c "'$b/consumer' | tee -a '$LOG' | grep -q 'C ok openmp=$omp'"
    check "$how: C++ program runs (openmp=$omp)" sh -c "'$b/consumer_cpp' | tee -a '$LOG' | grep -q 'C++ ok openmp=$omp'"
    check "$how: moe::moe_cl program runs" "$b/consumer_cl"
}

if ! have cmake; then
    skip "cmake-check" "cmake not installed (apt-get install cmake)"
    finish
    exit $?
fi
echo "== CMake $(cmake --version | sed -n '1s/.* //p')"

consume add_subdirectory 1 -DMOE_CONSUME=subdirectory -DMOE_SOURCE="$ROOT"

# the files a release tarball holds: everything git tracks or would track
git ls-files --cached --others --exclude-standard > "$OUT/files.txt" 2>> "$LOG" || find . -path ./build -prune -o -type f -print > "$OUT/files.txt"
if tar czf "$OUT/moe.tar.gz" -T "$OUT/files.txt" >> "$LOG" 2>&1; then
    consume FetchContent 1 -DMOE_CONSUME=fetchcontent -DMOE_URL="file://$OUT/moe.tar.gz"
else
    bad "FetchContent: cannot pack the checkout"
fi

prefix=$OUT/prefix
# shellcheck disable=SC2086
if cmake $GEN -S . -B "$OUT/moe" -DCMAKE_BUILD_TYPE=Release -DMOE_BUILD_EXAMPLES=ON >> "$LOG" 2>&1 &&
   cmake --build "$OUT/moe" >> "$LOG" 2>&1 &&
   cmake --install "$OUT/moe" --prefix "$prefix" >> "$LOG" 2>&1; then
    ok "install: the examples build and install into a temporary prefix"
    check "install: the moe tool runs" sh -c "'$OUT/moe/moe' 2>&1 | grep -q 'usage'"
    consume find_package 1 -DMOE_CONSUME=package -DCMAKE_PREFIX_PATH="$prefix"
    consume "find_package, MOE_OPENMP=OFF" 0 -DMOE_CONSUME=package -DCMAKE_PREFIX_PATH="$prefix" -DMOE_OPENMP=OFF
    if have pkg-config; then
        pc="env PKG_CONFIG_PATH=$prefix/share/pkgconfig pkg-config"
        check "pkg-config: moe.pc is found with the version of moe.h" sh -c \
            "test \"\$($pc --modversion moe)\" = \"\$(sed -n 's/^#define MOE_VERSION_STRING \"\\(.*\\)\"/\\1/p' moe.h)\""
        check "pkg-config: cc \$(pkg-config --cflags --libs moe) builds and runs the consumer" sh -c \
            "cd '$OUT' && cc -std=c99 '$ROOT/tests/cmake/consumer.c' \$($pc --cflags --libs moe) -o consumer-pc && ./consumer-pc | grep -q 'C ok openmp=1'"
    else
        skip "pkg-config" "pkg-config not installed"
    fi
else
    bad "install: moe does not configure, build or install (see $LOG)"
fi

finish
