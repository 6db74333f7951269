#!/usr/bin/env python3
"""Times a Mixtral-style PyTorch MoE block against build/bench_moe on the same shapes.

    /usr/bin/python3 bench/compare_torch.py [--threads N] [--shapes edge fine ...]
                                            [--modes fwd train] [--runs N] [--pairs N]

The PyTorch block follows the published Mixtral sparse-MoE equations, fp32: router linear ->
softmax (fp32) -> top-k -> renormalise -> for each expert e the rows that chose it,
w2(silu(w1 x) * w3 x) times their routing weight, index_add_ into the output. A training step is
the forward plus backward of (y * dy).sum() with respect to x and every parameter.

For each shape and mode the script alternates: time PyTorch (one warm-up, median of --runs),
then run build/bench_moe for the same shape, mode and thread count as a subprocess and read
its ms; --pairs times. Each side's figure is the median over the pairs; speedup =
torch_ms / moe_ms. Output: one key=value line per shape and mode, then a markdown table.

Fair setup: the script re-executes itself with OPENBLAS_CORETYPE unset (a setting of some
environments that makes OpenBLAS use slower kernels than the CPU supports) and
OMP_WAIT_POLICY=PASSIVE (PyTorch's idle OpenMP threads otherwise spin on the cores the other
threads need). bench_moe runs with the environment the script was started with.
Needs torch (Debian: python3-torch, with libopenblas0-pthread: without it Debian's torch runs
its matmuls on the unoptimized reference BLAS) and a built build/bench_moe (make build/bench_moe).
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

SHAPES = {  # name: (T, d, h, E, k), as in bench/bench_moe.c
    "edge": (512, 256, 512, 8, 2),
    "mixtral-small": (2048, 1024, 2816, 8, 2),
    "fine": (2048, 512, 256, 64, 8),
    "decode": (1, 1024, 2816, 8, 2),
}
SAVED_WAIT_POLICY = "COMPARE_TORCH_SAVED_OMP_WAIT_POLICY"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reexec_if_needed():
    """Restart with the fair environment; remembers the original OMP_WAIT_POLICY for bench_moe."""
    env = os.environ
    if "OPENBLAS_CORETYPE" not in env and env.get("OMP_WAIT_POLICY") == "PASSIVE" and SAVED_WAIT_POLICY in env:
        return
    new = dict(env)
    new.pop("OPENBLAS_CORETYPE", None)
    new.setdefault(SAVED_WAIT_POLICY, env.get("OMP_WAIT_POLICY", ""))
    new["OMP_WAIT_POLICY"] = "PASSIVE"
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable] + sys.argv, new)


def bench_env():
    env = dict(os.environ)
    saved = env.pop(SAVED_WAIT_POLICY, "")
    if saved:
        env["OMP_WAIT_POLICY"] = saved
    else:
        env.pop("OMP_WAIT_POLICY", None)
    return env


def make_block(torch, d, h, n_experts, top_k):
    nn = torch.nn
    F = torch.nn.functional

    class Expert(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = nn.Linear(d, h, bias=False)
            self.w3 = nn.Linear(d, h, bias=False)
            self.w2 = nn.Linear(h, d, bias=False)

        def forward(self, x):
            return self.w2(F.silu(self.w1(x)) * self.w3(x))

    class SparseMoeBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(d, n_experts, bias=False)
            self.experts = nn.ModuleList(Expert() for _ in range(n_experts))

        def forward(self, x):  # x [T, d]
            logits = self.gate(x)
            probs = F.softmax(logits, dim=1, dtype=torch.float)
            weights, selected = torch.topk(probs, top_k, dim=-1)
            weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
            out = torch.zeros_like(x)
            for e in range(n_experts):
                token, slot = torch.where(selected == e)
                if token.numel() == 0:
                    continue
                rows = self.experts[e](x[token]) * weights[token, slot, None]
                out.index_add_(0, token, rows)
            return out

    return SparseMoeBlock()


def time_torch(torch, shape, train, runs):
    T, d, h, E, k = SHAPES[shape]
    gen = torch.Generator().manual_seed(1)
    block = make_block(torch, d, h, E, k)
    with torch.no_grad():  # spread tokens over experts, as bench_moe does
        block.gate.weight.uniform_(-0.1, 0.1, generator=gen)
    x = torch.rand(T, d, generator=gen) * 2 - 1
    dy = torch.rand(T, d, generator=gen) * 2 - 1

    def step():
        if train:
            block.zero_grad(set_to_none=True)
            xg = x.detach().requires_grad_(True)
            t0 = time.perf_counter()
            ((block(xg) * dy).sum()).backward()
            return time.perf_counter() - t0
        with torch.no_grad():
            t0 = time.perf_counter()
            block(x)
            return time.perf_counter() - t0

    step()  # warm-up
    return 1e3 * statistics.median(step() for _ in range(runs))


def matmul_gflops(torch):
    """A 1024^3 matmul: tells whether torch's BLAS is an optimized one."""
    a, b = torch.rand(1024, 1024), torch.rand(1024, 1024)
    a @ b
    t0 = time.perf_counter()
    for _ in range(5):
        a @ b
    return 5 * 2 * 1024 ** 3 / (time.perf_counter() - t0) / 1e9


def time_bench(bench, shape, train, threads, runs, dtype="f32"):
    cmd = [bench, "--shape", shape, "--mode", "train" if train else "fwd", "--threads", str(threads),
           "--dtype", dtype, "--runs", str(runs)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=bench_env())
    if res.returncode != 0:
        raise SystemExit("compare_torch: %s failed (%d): %s" % (" ".join(cmd), res.returncode, res.stderr.strip()))
    for line in res.stdout.splitlines():
        if line.startswith("shape="):
            kv = dict(w.split("=", 1) for w in line.split() if "=" in w)
            if "ms" not in kv:
                raise SystemExit("compare_torch: bench_moe measured nothing: " + line)
            return float(kv["ms"])
    raise SystemExit("compare_torch: no measurement in the output of " + " ".join(cmd))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    ap.add_argument("--modes", nargs="+", choices=["fwd", "train"], default=["fwd", "train"])
    ap.add_argument("--runs", type=int, default=5, help="timed runs per measurement (median)")
    ap.add_argument("--pairs", type=int, default=3, help="alternations of PyTorch and bench_moe")
    ap.add_argument("--bench", default=os.path.join(ROOT, "build", "bench_moe"))
    args = ap.parse_args()
    if args.threads < 1 or args.runs < 1 or args.pairs < 1:
        ap.error("--threads, --runs and --pairs must be at least 1")
    reexec_if_needed()
    try:
        import torch
    except ImportError:
        print("compare_torch: skipped=torch is not installed (Debian: apt-get install python3-torch)")
        return 0
    if not os.access(args.bench, os.X_OK):
        raise SystemExit("compare_torch: %s not found: run make build/bench_moe" % args.bench)
    torch.set_num_threads(args.threads)
    print("torch=%s threads=%d runs=%d pairs=%d OMP_WAIT_POLICY=%s OPENBLAS_CORETYPE=%s"
          % (torch.__version__, args.threads, args.runs, args.pairs, os.environ.get("OMP_WAIT_POLICY"),
             os.environ.get("OPENBLAS_CORETYPE", "unset")), flush=True)
    gflops = matmul_gflops(torch)
    print("torch_matmul_gflops=%.1f" % gflops, flush=True)
    if gflops < 20:
        print("compare_torch: warning: torch's matmul is slow: it may run on the reference BLAS "
              "(Debian: apt-get install libopenblas0-pthread)", file=sys.stderr)
    rows = []
    for shape in args.shapes:
        for mode in args.modes:
            train = mode == "train"
            packed = not train and shape != "decode"  # also f32 weights packed once (moe_layer_pack)
            torch_ms, moe_ms, packed_ms = [], [], []
            for _ in range(args.pairs):
                torch_ms.append(time_torch(torch, shape, train, args.runs))
                moe_ms.append(time_bench(args.bench, shape, train, args.threads, args.runs))
                if packed:
                    packed_ms.append(time_bench(args.bench, shape, train, args.threads, args.runs, "f32p"))
            t, m = statistics.median(torch_ms), statistics.median(moe_ms)
            p = statistics.median(packed_ms) if packed else None
            extra = " moe_packed_ms=%.3f speedup_packed=%.3f" % (p, t / p) if packed else ""
            print("shape=%s mode=%s threads=%d torch_ms=%.3f moe_ms=%.3f speedup=%.3f%s"
                  % (shape, mode, args.threads, t, m, t / m, extra), flush=True)
            rows.append((shape, mode, t, m, p))
    print("\n| shape | mode | PyTorch ms | moe.h ms | speedup | packed weights ms | speedup |\n|---|---|---|---|---|---|---|")
    for shape, mode, t, m, p in rows:
        tail = "%.2f | %.2fx" % (p, t / p) if p else "— | —"
        print("| %s | %s | %.2f | %.2f | %.2fx | %s |" % (shape, mode, t, m, t / m, tail))
    return 0


if __name__ == "__main__":
    sys.exit(main())
