#!/bin/sh
# make code-size: what moe.h adds to a program. Builds tests/compile/minimal.c (load a model file
# held in memory, one forward) with -Os and -O2, stripped, without OpenMP, under each build option,
# and prints text+data bytes of `size` as a Markdown table (README "Build options" holds it).
# The empty program (int main(void) { return 0; }) built the same way is the baseline.
# Environment: CC (default cc).
set -u
cd "$(dirname "$0")/.." || exit 1
CC=${CC:-cc}
OUT=build/code_size
mkdir -p "$OUT"
command -v size > /dev/null 2>&1 || { echo "code_size: no size(1) (binutils)"; exit 1; }
printf 'int main(void) { return 0; }\n' > "$OUT/empty.c"

# bytes OPT DEFINES...: text+data of the stripped program; the empty one without DEFINES = "empty"
bytes() {
    opt=$1; shift
    src=tests/compile/minimal.c
    [ "${1:-}" = empty ] && { src=$OUT/empty.c; shift; }
    # shellcheck disable=SC2068
    $CC -std=c99 $opt -s $@ "$src" -o "$OUT/prog" -lm || return 1
    "$OUT/prog" || { echo "code_size: the program built with $opt $* fails" >&2; return 1; }
    size "$OUT/prog" | awk 'NR == 2 { print $1 + $2 }'
}

echo "| build | -Os | -O2 |"
echo "|---|---|---|"
printf '| empty program (baseline) | %s | %s |\n' "$(bytes -Os empty)" "$(bytes -O2 empty)"
for opts in "" "-DMOE_NO_TRAINING" "-DMOE_NO_STDIO" "-DMOE_NO_TRAINING -DMOE_NO_STDIO"; do
    label=$(echo "$opts" | sed 's/-D//g; s/ / + /')
    printf '| %s | %s | %s |\n' "${label:-no option}" "$(bytes -Os $opts)" "$(bytes -O2 $opts)"
done
