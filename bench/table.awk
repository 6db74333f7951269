# table.awk - checks the key=value lines of bench_moe and prints them as a markdown table.
#   awk -f bench/table.awk build/bench.txt
#   awk -v expect=N -f bench/table.awk out.txt   also require exactly N measurement lines
# Exits 1 (after naming the line) when a line lacks a key or a number is not finite,
# or a check failed.
function number(key, line) {
    if (!(key in kv) || kv[key] !~ /^[0-9]+(\.[0-9]*)?([eE][-+]?[0-9]+)?$/) {
        printf "table.awk: line %d: %s is missing or not a finite number: %s\n", NR, key, line > "/dev/stderr"
        bad = 1
        return 0
    }
    return kv[key] + 0
}
function need(key, line) {
    if (!(key in kv) || kv[key] == "") {
        printf "table.awk: line %d: no %s: %s\n", NR, key, line > "/dev/stderr"
        bad = 1
    }
}
# kv[key] = value for every key=value word; skipped= takes the rest of the line
function parse(line,   i, n, w, eq) {
    split("", kv)
    n = split(line, w, " ")
    for (i = 1; i <= n; i++) {
        eq = index(w[i], "=")
        if (eq < 2) continue
        if (substr(w[i], 1, eq - 1) == "skipped") { kv["skipped"] = substr(line, index(line, "skipped=") + 8); break }
        kv[substr(w[i], 1, eq - 1)] = substr(w[i], eq + 1)
    }
}
/^machine=/ {
    parse($0); need("cores", $0); need("isa", $0)
    machine = sprintf("%s, %s cores, %s", kv["machine"], kv["cores"], kv["isa"])
    if ("kernels" in kv) machine = machine ", kernels " kv["kernels"]
    next
}
/^peak_gflops_1t=/ {
    parse($0)
    peak = sprintf("fp32 FMA peak %.1f GFLOP/s on 1 thread, %.1f on %s", number("peak_gflops_1t", $0), number("peak_gflops", $0), kv["threads"])
    next
}
/^mem_read_gbps=/ {
    parse($0)
    mem = sprintf("memory read %.1f GB/s", number("mem_read_gbps", $0))
    next
}
/^shape=/ {
    parse($0)
    need("mode", $0); need("backend", $0); need("dtype", $0); need("threads", $0)
    rows++
    if ("skipped" in kv) {
        row[rows] = sprintf("| %s | %s | %s | skipped: %s | | | |", kv["shape"], kv["mode"], kv["dtype"], kv["skipped"])
        next
    }
    ms = number("ms", $0); gf = number("gflops", $0); pct = number("peak_pct", $0)
    if (ms <= 0) { printf "table.awk: line %d: ms must be positive\n", NR > "/dev/stderr"; bad = 1 }
    gb = ""
    if (kv["shape"] == "decode" && kv["mode"] == "fwd")
        gb = sprintf("%.1f (%.0f%% of read bw)", number("gbps", $0), number("bw_pct", $0))
    if ("check" in kv && kv["check"] != "ok") {
        printf "table.awk: line %d: check failed: %s\n", NR, $0 > "/dev/stderr"
        bad = 1
    }
    row[rows] = sprintf("| %s | %s | %s | %.2f | %.1f | %.1f | %s |", kv["shape"], kv["mode"], kv["dtype"], ms, gf, pct, gb)
    next
}
END {
    if (machine == "" || peak == "" || mem == "") { print "table.awk: machine, peak or memory line missing" > "/dev/stderr"; bad = 1 }
    if (expect != "" && rows != expect + 0) { printf "table.awk: %d measurement lines, expected %d\n", rows, expect > "/dev/stderr"; bad = 1 }
    printf "\n%s; %s; %s\n\n", machine, peak, mem
    print "| shape | mode | dtype | ms | GFLOP/s | % peak | GB/s |"
    print "|---|---|---|---|---|---|---|"
    for (i = 1; i <= rows; i++) print row[i]
    exit bad
}
