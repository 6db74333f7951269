# Counting and reporting shared by the test scripts (sourced, not run). The caller sets OUT, its
# output folder; LOG there collects the output of every step.
mkdir -p "$OUT"
LOG="$OUT/log.txt"
: > "$LOG"
WARN="-Wall -Wextra -Wpedantic -Werror"
C99="-std=c99 $WARN"

passed=0
failed=0
skipped=0
failures=""

ok()   { passed=$((passed + 1)); printf '  ok   %s\n' "$1"; }
bad()  { failed=$((failed + 1)); failures="$failures\n  $1"; printf '  FAIL %s\n' "$1"; }
skip() { skipped=$((skipped + 1)); printf '  skip %s (%s)\n' "$1" "$2"; }

# check NAME COMMAND...: one case, passes when the command exits 0; output goes to the log
check() {
    name=$1; shift
    if "$@" >> "$LOG" 2>&1; then ok "$name"; else bad "$name"; echo "    (see $LOG)"; fi
}

have() { command -v "$1" > /dev/null 2>&1; }

# run_result NAME OUTFILE COMMAND...: runs a test program (tests/test.h) with its output in
# OUTFILE and adds the cases of its last "RESULT passed=P failed=F skipped=S" line to the totals.
run_result() {
    name=$1; out=$2; shift 2
    timeout 600 "$@" > "$out" 2>&1
    rc=$?
    line=$(grep '^RESULT ' "$out" | tail -n 1)
    if [ -z "$line" ]; then
        bad "$name crashed or did not finish (exit $rc)"
        tail -n 15 "$out" | sed 's/^/    /'
        return
    fi
    p=$(echo "$line" | sed 's/.*passed=\([0-9]*\).*/\1/')
    f=$(echo "$line" | sed 's/.*failed=\([0-9]*\).*/\1/')
    s=$(echo "$line" | sed 's/.*skipped=\([0-9]*\).*/\1/')
    passed=$((passed + p)); failed=$((failed + f)); skipped=$((skipped + s))
    if [ "$f" -ne 0 ] || [ "$rc" -ne 0 ]; then
        [ "$f" -eq 0 ] && { failed=$((failed + 1)); }
        failures="$failures\n  $name"
        printf '  FAIL %-28s %s (exit %s)\n' "$name" "$line" "$rc"
        grep -E 'FAIL|failed|ERROR|runtime error' "$out" | head -n 20 | sed 's/^/    /'
    else
        printf '  ok   %-28s %s\n' "$name" "$line"
    fi
}

# the closing lines; the exit status says whether anything failed
finish() {
    echo
    if [ "$failed" -ne 0 ]; then printf 'failures:%b\n' "$failures"; fi
    echo "$passed passed, $failed failed, $skipped skipped"
    [ "$failed" -eq 0 ]
}
