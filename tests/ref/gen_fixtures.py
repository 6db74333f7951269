#!/usr/bin/python3
"""PyTorch reference fixtures for moe.h, built from the model reference in the top-level README.md alone.

Usage:

    /usr/bin/python3 tests/ref/gen_fixtures.py [outdir]

`outdir` defaults to the directory of this script (tests/ref/).  One safetensors file
`<case>.safetensors` is written per case (see CASES below and tests/ref/README.md for the tensor
list).  Needs only torch and numpy (the `safetensors` package is not used: the format of
the README model reference section 6 is written by hand).

Every model is an independent re-implementation of the README's model reference: dense / rmsnorm / layernorm / moe
layers, the topk / noisy_topk / switch / sigmoid / expert_choice / hash routers (3.4, 3.5), per-call top_k
and top_p, the selection-bias update, capacity with dropping and pass-through, linear /
mlp / swiglu experts, shared experts, the four auxiliary losses, the three task losses, gradient
clipping and AdamW.  Parameters and inputs are drawn in float32 (so the stored values are exactly
the ones used) and everything is then computed in float64.

The output is deterministic: the same torch build gives byte-identical files on every run.  Every
case is redrawn (next attempt seed) until all routing decisions in every forward pass the fixture
describes (training forward, inference forward, and the forwards of the five AdamW steps) have a
margin: consecutive sorted router logits among the top k+1 differ by more than MARGIN, and no relu
pre-activation is closer than RELU_MARGIN to 0.  That keeps a float32 implementation on the same
side of every discrete decision.
"""

import json
import math
import os
import struct
import sys
import zlib

import numpy as np
import torch

torch.set_default_dtype(torch.float64)

MARGIN = 1e-3        # minimum gap between consecutive top-(k+1) router logits
RELU_MARGIN = 1e-4   # minimum |z| of a relu input
# Routers of README 3.5 decide on scores in (0, 1) (sigmoid, softmax columns, cumulative
# probabilities), which crowd far more than logits: their boundaries need a gap of FINE_MARGIN,
# still 30 times the float32-vs-float64 differences of the scores after five steps (~1e-6).
FINE_MARGIN = 3e-5
STEPS = 5

OPTIMIZER = {"kind": "adamw", "lr": 0.01, "beta1": 0.9, "beta2": 0.999, "eps": 1e-08,
             "weight_decay": 0.01, "momentum": 0, "clip_norm": 0,
             "warmup_steps": 0, "total_steps": 0, "min_lr": 0}


class Retry(Exception):
    """A discrete decision (top-k order, relu sign) is too close to call: redraw the case."""


# ----------------------------------------------------------------------------------------------
# Config helpers (every field written with its default resolved, README model reference 6.1)

def dense(d_in, d_out, activation="identity", bias=True, residual=False):
    return {"kind": "dense", "d_in": d_in, "d_out": d_out, "activation": activation,
            "bias": bias, "residual": residual}


def norm(kind, d, eps=1e-5, residual=False):
    return {"kind": kind, "d_in": d, "d_out": d, "eps": eps, "residual": residual}


def embedding(n, vocab_size, d_embedding):
    """n token ids per row -> their embeddings side by side (README 3.6)."""
    return {"kind": "embedding", "d_in": n, "d_out": n * d_embedding, "residual": False,
            "vocab_size": vocab_size, "d_embedding": d_embedding}


def moe(d_in, d_out=None, **kw):
    router = kw.get("router", "topk")
    experts = kw.get("experts", 4)
    expert = kw.get("expert", "mlp")
    d_hidden = kw.get("d_hidden", d_in)
    own = {"sigmoid": {"routed_scaling_factor": 1, "groups": 1, "top_k_groups": None, "bias_update_rate": 0},
           "hash": {"hash_seed": 0}}.get(router, {})
    extra = {}
    for f, default in own.items():
        extra[f] = kw.pop(f, default)
    if router == "sigmoid" and extra["top_k_groups"] is None:
        extra["top_k_groups"] = extra["groups"]
    max_top_k = kw.pop("max_top_k", None)
    c = {
        "kind": "moe", "d_in": d_in, "d_out": d_in if d_out is None else d_out,
        "residual": kw.get("residual", False),
        "router": router, "experts": experts,
        "top_k": kw.get("top_k", 1 if router == "switch" else min(2, experts)),
        "renormalize": kw.get("renormalize", router not in ("switch", "expert_choice", "hash")),
        "router_bias": kw.get("router_bias", False),
        "expert": expert, "d_hidden": d_hidden,
        "hidden_layers": kw.get("hidden_layers", 0 if expert == "linear" else 1),
        "activation": kw.get("activation", "relu"),
        "bias": kw.get("bias", expert != "swiglu"),
        "shared_experts": kw.get("shared_experts", 0),
        "d_shared_hidden": kw.get("d_shared_hidden", d_hidden),
        "capacity_factor": kw.get("capacity_factor", {"switch": 1.25, "expert_choice": 1}.get(router, 0)),
        "jitter": 0,
        "balance_loss": kw.get("balance_loss", 0), "z_loss": kw.get("z_loss", 0),
        "importance_loss": kw.get("importance_loss", 0), "load_loss": kw.get("load_loss", 0),
    }
    unknown = set(kw) - set(c)
    assert not unknown, unknown
    if max_top_k is not None and max_top_k != c["top_k"]:
        c["max_top_k"] = max_top_k          # written only where it differs from top_k (6.1)
    c.update(extra)                         # a router's own fields, only for that router
    return c


def model_config(d_in, layers, loss, **opt):
    o = dict(OPTIMIZER)
    o.update(opt)
    return {"format": "moe.h", "version": 1, "d_in": d_in, "loss": loss, "max_tokens": 256,
            "layers": layers, "optimizer": o}


# ----------------------------------------------------------------------------------------------
# Parameter names and shapes (README.md section 3, in its order)

def expert_shapes(prefix, c, n, hidden):
    """Stacked expert tensors for n experts of kind c['expert'] with hidden width `hidden`."""
    D, O, kind = c["d_in"], c["d_out"], c["expert"]
    out = []
    if kind == "linear":
        out.append((prefix + "fc0.weight", [n, O, D], D))
        if c["bias"]:
            out.append((prefix + "fc0.bias", [n, O], D))
    elif kind == "mlp":
        L = c["hidden_layers"]
        for j in range(L + 1):
            fan_in = D if j == 0 else hidden
            fan_out = O if j == L else hidden
            out.append((prefix + "fc%d.weight" % j, [n, fan_out, fan_in], fan_in))
            if c["bias"]:
                out.append((prefix + "fc%d.bias" % j, [n, fan_out], fan_in))
    elif kind == "swiglu":
        out.append((prefix + "w1.weight", [n, hidden, D], D))
        out.append((prefix + "w3.weight", [n, hidden, D], D))
        out.append((prefix + "w2.weight", [n, O, hidden], hidden))
        if c["bias"]:
            out.append((prefix + "w1.bias", [n, hidden], D))
            out.append((prefix + "w3.bias", [n, hidden], D))
            out.append((prefix + "w2.bias", [n, O], hidden))
    else:
        raise ValueError(kind)
    return out


def param_specs(cfg):
    """[(name, shape, init kind, fan_in)] for every tensor the config implies."""
    specs = []
    for i, c in enumerate(cfg["layers"]):
        p = "layers.%d." % i
        if c["kind"] == "dense":
            specs.append((p + "weight", [c["d_out"], c["d_in"]], "lin", c["d_in"]))
            if c["bias"]:
                specs.append((p + "bias", [c["d_out"]], "lin", c["d_in"]))
        elif c["kind"] == "rmsnorm":
            specs.append((p + "weight", [c["d_in"]], "normw", 0))
        elif c["kind"] == "layernorm":
            specs.append((p + "weight", [c["d_in"]], "normw", 0))
            specs.append((p + "bias", [c["d_in"]], "normb", 0))
        elif c["kind"] == "embedding":
            specs.append((p + "weight", [c["vocab_size"], c["d_embedding"]], "emb", 0))
        elif c["kind"] == "moe":
            E, D = c["experts"], c["d_in"]
            if c["router"] != "hash":
                specs.append((p + "router.weight", [E, D], "router", D))
            if c["router_bias"]:
                specs.append((p + "router.bias", [E], "routerb", D))
            if c["router"] == "noisy_topk":
                specs.append((p + "router.noise_weight", [E, D], "lin", D))
            if c["router"] == "sigmoid":
                specs.append((p + "router.selection_bias", [E], "selb", 0))
            for name, shape, fan in expert_shapes(p + "experts.", c, E, c["d_hidden"]):
                specs.append((name, shape, "lin", fan))
            if c["shared_experts"] > 0:
                for name, shape, fan in expert_shapes(p + "shared.", c, c["shared_experts"],
                                                      c["d_shared_hidden"]):
                    specs.append((name, shape, "lin", fan))
        else:
            raise ValueError(c["kind"])
    return specs


def init_params(cfg, g):
    params = {}
    for name, shape, kind, fan in param_specs(cfg):
        u = torch.rand(shape, generator=g, dtype=torch.float32) * 2 - 1   # U(-1, 1)
        if kind == "lin":
            t = u / math.sqrt(fan)
        elif kind == "router":
            t = u * (2.0 / math.sqrt(fan))      # wider router: well separated logits
        elif kind == "routerb":
            t = u * 0.5
        elif kind == "normw":
            t = 1 + 0.4 * u
        elif kind == "normb":
            t = 0.3 * u
        elif kind == "selb":
            t = 0.1 * u                         # a selection bias that changes some choices
        elif kind == "emb":
            t = u
        params[name] = t.to(torch.float32).double()
    return params


# ----------------------------------------------------------------------------------------------
# The model (README.md sections 2-4)

class Checks:
    """Collects the closeness of discrete decisions."""

    def __init__(self):
        self.min_gap = math.inf
        self.min_fine_gap = math.inf
        self.min_relu = math.inf

    def verify(self):
        if self.min_gap <= MARGIN or self.min_relu <= RELU_MARGIN or self.min_fine_gap <= FINE_MARGIN:
            raise Retry("gap %g fine gap %g relu %g" % (self.min_gap, self.min_fine_gap, self.min_relu))


def softplus(z):
    return torch.clamp(z, min=0) + torch.log1p(torch.exp(-torch.abs(z)))


def activation(name, z, chk):
    if name == "identity":
        return z
    if name == "relu":
        if chk is not None and z.numel():
            chk.min_relu = min(chk.min_relu, z.detach().abs().min().item())
        return torch.relu(z)
    if name == "gelu":
        return 0.5 * z * (1 + torch.erf(z / math.sqrt(2.0)))
    if name == "silu":
        return z * torch.sigmoid(z)
    if name == "tanh":
        return torch.tanh(z)
    if name == "sigmoid":
        return torch.sigmoid(z)
    raise ValueError(name)


def experts_forward(P, prefix, c, x, chk):
    """Every expert of the stack on every token: [n, T, O]."""
    kind, bias = c["expert"], c["bias"]
    if kind == "linear":
        y = torch.einsum("td,eod->eto", x, P[prefix + "fc0.weight"])
        if bias:
            y = y + P[prefix + "fc0.bias"][:, None, :]
        return y
    if kind == "mlp":
        L = c["hidden_layers"]
        a = torch.einsum("td,ehd->eth", x, P[prefix + "fc0.weight"])
        if bias:
            a = a + P[prefix + "fc0.bias"][:, None, :]
        a = activation(c["activation"], a, chk)
        for j in range(1, L + 1):
            a = torch.einsum("eth,egh->etg", a, P[prefix + "fc%d.weight" % j])
            if bias:
                a = a + P[prefix + "fc%d.bias" % j][:, None, :]
            if j < L:
                a = activation(c["activation"], a, chk)
        return a
    if kind == "swiglu":
        a1 = torch.einsum("td,ehd->eth", x, P[prefix + "w1.weight"])
        a3 = torch.einsum("td,ehd->eth", x, P[prefix + "w3.weight"])
        if bias:
            a1 = a1 + P[prefix + "w1.bias"][:, None, :]
            a3 = a3 + P[prefix + "w3.bias"][:, None, :]
        y = torch.einsum("eth,eoh->eto", activation("silu", a1, None) * a3, P[prefix + "w2.weight"])
        if bias:
            y = y + P[prefix + "w2.bias"][:, None, :]
        return y
    raise ValueError(kind)


def cv2(v):
    mean = v.mean()
    var = ((v - mean) ** 2).mean()          # population variance (divide by E)
    return var / (mean * mean + 1e-10)


def Phi(z):
    return 0.5 * (1 + torch.erf(z / math.sqrt(2.0)))


U64 = (1 << 64) - 1


def mix64(z):
    """README 3.5, hash router: the splitmix64 finaliser, modulo 2^64."""
    z = (z + 0x9E3779B97F4A7C15) & U64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & U64
    return z ^ (z >> 31)


def hash_rng(seed, stream, counter):
    return mix64(mix64(mix64(seed) ^ stream) ^ counter)


def gap_check(chk, vals, fine=True):
    """Consecutive values of a descending list must be (FINE_)MARGIN apart (a decision between them)."""
    v = [float(a) for a in vals]
    for a, b in zip(v, v[1:]):
        if a != -math.inf and b != -math.inf:
            if fine:
                chk.min_fine_gap = min(chk.min_fine_gap, a - b)
            else:
                chk.min_gap = min(chk.min_gap, a - b)


def moe_forward(P, p, c, x, train, noise, chk, call, layer):
    """Returns (y, [balance, z, importance, load] (coefficients applied), stats dict)."""
    T, D = x.shape
    E, O, router = c["experts"], c["d_out"], c["router"]
    k = call.get("top_k") or c["top_k"]
    top_p = call.get("top_p", 0)
    if router == "switch":
        k = 1
    # step 1: router logits (jitter is 0 in every fixture, so u = x); none for the hash router
    u = x
    cl = s = probs = None
    if router != "hash":
        cl = u @ P[p + "router.weight"].T
        if c["router_bias"]:
            cl = cl + P[p + "router.bias"]
    if router == "noisy_topk":
        s = softplus(u @ P[p + "router.noise_weight"].T)
        h = cl + noise * s if train else cl
    else:
        h = cl
    ec = router == "expert_choice"
    slots = E if ec else k
    sel = torch.full((T, slots), -1, dtype=torch.long)          # -1: slot not chosen
    gates = torch.zeros(T, slots)
    if router in ("topk", "noisy_topk", "switch"):
        # step 2: selection (descending h, ties to lower index: stable sort); top_p keeps a prefix
        probs = torch.softmax(h, dim=1)
        hd = h.detach()
        order = torch.sort(hd, dim=1, descending=True, stable=True).indices
        if k < E or c["capacity_factor"] > 0:
            for t in range(T):
                gap_check(chk, hd[t, order[t, :min(k + 1, E)]], fine=False)
        n = [k] * T
        if top_p:
            pd = probs.detach()
            for t in range(T):
                cum, m = 0.0, 0
                while m < k and cum < top_p:
                    cum += float(pd[t, order[t, m]])
                    m += 1
                    chk.min_fine_gap = min(chk.min_fine_gap, abs(cum - top_p))
                n[t] = m
        # step 3: gates over the kept slots
        rows = []
        for t in range(T):
            e_t = order[t, :n[t]]
            sel[t, :n[t]] = e_t
            g_t = torch.softmax(h[t, e_t], dim=0) if c["renormalize"] else probs[t, e_t]
            rows.append(torch.cat([g_t, torch.zeros(slots - n[t])]))
        gates = torch.stack(rows)
    elif router == "sigmoid":
        sc = torch.sigmoid(cl)
        key = sc.detach() + P[p + "router.selection_bias"].detach()
        G, tkg = c["groups"], c["top_k_groups"]
        gn = E // G
        rows = []
        for t in range(T):
            q = key[t].clone()
            if G > 1:
                gscore = []
                for j in range(G):
                    grp = torch.sort(q[j * gn:(j + 1) * gn], descending=True, stable=True).values
                    gap_check(chk, grp[1:3])        # which two make the group score
                    gscore.append(float(grp[:2].sum()))
                gs = torch.tensor(gscore)
                gorder = torch.sort(gs, descending=True, stable=True).indices
                gap_check(chk, gs[gorder[tkg - 1:tkg + 1]])  # which groups are kept
                for j in gorder[tkg:].tolist():
                    q[j * gn:(j + 1) * gn] = -math.inf
            order = torch.sort(q, descending=True, stable=True).indices
            gap_check(chk, q[order[k - 1:k + 1]])      # which experts are chosen
            e_t = order[:k]
            sel[t] = e_t
            chosen = sc[t, e_t]
            g_t = chosen / chosen.sum() if c["renormalize"] else chosen
            rows.append(c["routed_scaling_factor"] * g_t)
        gates = torch.stack(rows)
    elif ec:
        probs = torch.softmax(h, dim=1)
        for t in range(T):
            sel[t] = torch.arange(E)
        gates = probs
    elif router == "hash":
        ids = call["token_ids"]
        for t in range(T):
            v = (int(ids[t]) & 0xFFFFFFFF) << 32
            got, cnt = [], 0
            while len(got) < k:
                e = hash_rng(c["hash_seed"], layer, v | cnt) % E
                cnt += 1
                if e not in got:
                    got.append(e)
            sel[t] = torch.tensor(got)
        gates = torch.full((T, slots), 1.0 / k)
    else:
        raise ValueError(router)
    load = torch.zeros(E)                                       # chosen slots per expert, before capacity
    if not ec:
        for e in sel[sel >= 0].tolist():
            load[e] += 1
    # step 4: capacity (expert choice: each expert takes its C best tokens instead)
    keep = sel >= 0
    cap = None
    if ec:
        cap = min(T, max(1, math.ceil(c["capacity_factor"] * T * k / E)))
        keep = torch.zeros(T, E, dtype=torch.bool)
        pd = probs.detach()
        for e in range(E):
            order = torch.sort(pd[:, e], descending=True, stable=True).indices
            gap_check(chk, pd[order[cap - 1:cap + 1], e])  # which tokens the expert takes
            keep[order[:cap], e] = True
        load[:] = cap
    elif c["capacity_factor"] > 0:
        cap = math.ceil(c["capacity_factor"] * T * k / E)
        held = [0] * E
        for si in range(slots):
            for t in range(T):
                e = int(sel[t, si])
                if e < 0:
                    continue
                if held[e] >= cap:
                    keep[t, si] = False
                else:
                    held[e] += 1
    dropped = ~keep.any(dim=1)                                  # [T]
    kept_per_expert = torch.zeros(E)
    for si in range(slots):
        for t in range(T):
            if keep[t, si]:
                kept_per_expert[int(sel[t, si])] += 1
    # step 5/6: experts and combine
    fx = experts_forward(P, p + "experts.", c, x, chk)          # [E, T, O]
    ar = torch.arange(T)
    routed = torch.zeros(T, O)
    for si in range(slots):
        w = gates[:, si] * keep[:, si].double()
        routed = routed + w[:, None] * fx[sel[:, si].clamp(min=0), ar]
    if not c["residual"] and O == D:
        routed = torch.where(dropped[:, None], x, routed)       # pass-through
    y = x + routed if c["residual"] else routed
    if c["shared_experts"] > 0:
        sx = experts_forward(P, p + "shared.", c, x, chk)       # [S, T, O]
        for j in range(c["shared_experts"]):
            y = y + sx[j]
    # auxiliary losses (routers sigmoid and hash take none; expert choice only z)
    zero = torch.zeros(())
    aux = [zero, zero, zero, zero]
    if train and router not in ("sigmoid", "hash"):
        if c["balance_loss"]:
            f = load / (T * k)
            aux[0] = c["balance_loss"] * E * (f * probs.mean(dim=0)).sum()
        if c["z_loss"]:
            aux[1] = c["z_loss"] * (torch.logsumexp(h, dim=1) ** 2).mean()
        if c["importance_loss"]:
            G = torch.zeros(T, E).scatter_add(1, sel.clamp(min=0), gates * (sel >= 0).double())
            aux[2] = c["importance_loss"] * cv2(G.sum(dim=0))
        if c["load_loss"] and router == "noisy_topk" and k < E:
            hd = h.detach()
            order = torch.sort(hd, dim=1, descending=True, stable=True).indices
            top = h.gather(1, order[:, :k + 1])                 # with gradient
            th_in, th_out = top[:, k:k + 1], top[:, k - 1:k]
            is_in = hd > th_in.detach()
            theta = torch.where(is_in, th_in, th_out)
            Pte = Phi((cl - theta) / s)
            aux[3] = c["load_loss"] * cv2(Pte.sum(dim=0))
    stats = {"tokens_per_expert": kept_per_expert, "dropped_tokens": float(dropped.sum()),
             "capacity": cap, "load": load}
    return y, aux, stats


def model_forward(cfg, P, x, train, noises, chk, call=None):
    """Returns y, {layer: aux list}, {layer: stats}."""
    auxes, stats = {}, {}
    h = x
    for i, c in enumerate(cfg["layers"]):
        p = "layers.%d." % i
        kind = c["kind"]
        if kind == "dense":
            z = h @ P[p + "weight"].T
            if c["bias"]:
                z = z + P[p + "bias"]
            out = activation(c["activation"], z, chk)
        elif kind == "rmsnorm":
            out = h / torch.sqrt((h * h).mean(dim=1, keepdim=True) + c["eps"]) * P[p + "weight"]
        elif kind == "layernorm":
            mu = h.mean(dim=1, keepdim=True)
            var = ((h - mu) ** 2).mean(dim=1, keepdim=True)
            out = (h - mu) / torch.sqrt(var + c["eps"]) * P[p + "weight"] + P[p + "bias"]
        elif kind == "embedding":
            # ids stored as floats; their rows side by side: nn.Embedding, then one row per token
            out = torch.nn.functional.embedding(h.detach().long(), P[p + "weight"]).reshape(h.shape[0], -1)
        elif kind == "moe":
            out, auxes[i], stats[i] = moe_forward(P, p, c, h, train, noises.get(i), chk, call or {}, i)
        if kind != "moe" and c["residual"]:
            out = h + out
        h = out
    return h, auxes, stats


def task_loss(kind, y, target):
    if kind == "cross_entropy":
        return (torch.logsumexp(y, dim=1) - y.gather(1, target[:, None].long())[:, 0]).mean()
    if kind == "mse":
        return ((y - target) ** 2).mean()
    if kind == "bce":
        return (softplus(y) - target * y).mean()
    raise ValueError(kind)


def train_objective(cfg, P, x, target, noises, chk, call=None):
    y, auxes, stats = model_forward(cfg, P, x, True, noises, chk, call)
    loss = task_loss(cfg["loss"], y, target)
    aux_total = torch.zeros(())
    for i in sorted(auxes):
        for a in auxes[i]:
            aux_total = aux_total + a
    return loss, aux_total, y, auxes, stats


def lr_at(o, i):
    """Schedule for 0-based step i (README.md section 5)."""
    lr, w, tot = o["lr"], o["warmup_steps"], o["total_steps"]
    if i < w:
        return lr * (i + 1) / w
    if tot > 0:
        q = min(1.0, (i - w) / max(1, tot - w))
        return o["min_lr"] + 0.5 * (lr - o["min_lr"]) * (1 + math.cos(math.pi * q))
    return lr


# ----------------------------------------------------------------------------------------------
# safetensors writer (the README model reference section 6)

DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.int32): "I32"}


def save_safetensors(path, tensors, metadata):
    header, blobs, off = {"__metadata__": metadata}, [], 0
    for name, a in tensors.items():
        a = np.ascontiguousarray(a)
        b = a.astype(a.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": DTYPES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        f.write(b"".join(blobs))


def f32(t):
    return t.detach().to(torch.float32).contiguous().numpy()


# ----------------------------------------------------------------------------------------------
# One case

def build_case(name, cfg, T, seed, check=None, call_opts=None):
    """Draws, computes and returns (tensors dict, info dict) for one case. call_opts: the per-call
    top_k / top_p of every forward (README 3.5)."""
    g = torch.Generator().manual_seed(seed)
    layers = cfg["layers"]
    d_in, d_out = cfg["d_in"], layers[-1]["d_out"]
    P0 = init_params(cfg, g)
    x = torch.randn(T, d_in, generator=g, dtype=torch.float32).double()
    if layers[0]["kind"] == "embedding":    # token ids (README 3.6)
        x = torch.randint(0, layers[0]["vocab_size"], (T, d_in), generator=g).double()
    if cfg["loss"] == "cross_entropy":
        target = torch.randint(0, d_out, (T,), generator=g).to(torch.int32)
    elif cfg["loss"] == "mse":
        target = torch.randn(T, d_out, generator=g, dtype=torch.float32).double()
    else:
        target = torch.rand(T, d_out, generator=g, dtype=torch.float32).double()
    noises = {i: torch.randn(T, c["experts"], generator=g, dtype=torch.float32).double()
              for i, c in enumerate(layers) if c["kind"] == "moe" and c["router"] == "noisy_topk"}
    dy = torch.randn(T, d_out, generator=g, dtype=torch.float32).double()
    call = dict(call_opts or {})
    if layers[0]["kind"] == "embedding":
        call["token_ids"] = x[:, -1].to(torch.int32)   # README 3.5: a model's own ids, not stored
    elif any(c["kind"] == "moe" and c["router"] == "hash" for c in layers):
        call["token_ids"] = torch.randint(-1000, 100000, (T,), generator=g).to(torch.int32)
    names = list(P0)
    chk = Checks()

    # training forward + backward of task loss + aux
    P = {n: v.clone().requires_grad_(True) for n, v in P0.items()}
    xg = x.clone().requires_grad_(True)
    loss, aux_total, y, auxes, stats = train_objective(cfg, P, xg, target, noises, chk, call)
    grads = torch.autograd.grad(loss + aux_total, [xg] + [P[n] for n in names], allow_unused=True)
    dx = grads[0] if grads[0] is not None else torch.zeros_like(x)   # token ids: no gradient
    grad = {n: (gr if gr is not None else torch.zeros_like(P0[n])) for n, gr in zip(names, grads[1:])}

    # inference forward + backward of sum(y * dy), no aux
    P = {n: v.clone().requires_grad_(True) for n, v in P0.items()}
    xg = x.clone().requires_grad_(True)
    ey, _, estats = model_forward(cfg, P, xg, False, {}, chk, call)
    egrads = torch.autograd.grad((ey * dy).sum(), [xg] + [P[n] for n in names],
                                 allow_unused=True)
    edx = egrads[0] if egrads[0] is not None else torch.zeros_like(x)
    egrad = {n: (gr if gr is not None else torch.zeros_like(P0[n]))
             for n, gr in zip(names, egrads[1:])}

    # five AdamW steps on the same batch
    o = cfg["optimizer"]
    assert o["kind"] == "adamw"
    theta = {n: v.clone() for n, v in P0.items()}
    m = {n: torch.zeros_like(v) for n, v in P0.items()}
    v2 = {n: torch.zeros_like(v) for n, v in P0.items()}
    steps, clipped, min_step_grad = [], [], math.inf
    for t in range(1, STEPS + 1):
        P = {n: val.clone().requires_grad_(True) for n, val in theta.items()}
        sl, sa, _, _, sst = train_objective(cfg, P, x, target, noises, chk, call)
        gs = {n: (gr if gr is not None else torch.zeros_like(P0[n]))
              for n, gr in zip(names, torch.autograd.grad(sl + sa, [P[n] for n in names], allow_unused=True))}
        if o["clip_norm"] > 0:
            nrm = math.sqrt(sum(float((gv * gv).sum()) for gv in gs.values()))
            clipped.append(nrm > o["clip_norm"])
            if nrm > o["clip_norm"]:
                sc = o["clip_norm"] / (nrm + 1e-6)
                gs = {n: gv * sc for n, gv in gs.items()}
        for gv in gs.values():              # smallest nonzero |gradient|: Adam divides by it
            nz = gv.abs()[gv != 0]
            if nz.numel():
                min_step_grad = min(min_step_grad, float(nz.min()))
        lr = lr_at(o, t - 1)
        b1, b2 = o["beta1"], o["beta2"]
        for n in names:
            if n.endswith(".router.selection_bias"):
                continue                    # state, not a parameter: the optimizer leaves it alone
            gv = gs[n]
            theta[n] = theta[n] * (1 - lr * o["weight_decay"])
            m[n] = b1 * m[n] + (1 - b1) * gv
            v2[n] = b2 * v2[n] + (1 - b2) * gv * gv
            denom = v2[n].sqrt() / math.sqrt(1 - b2 ** t) + o["eps"]
            theta[n] = theta[n] - (lr / (1 - b1 ** t)) * m[n] / denom
        for i, c in enumerate(layers):      # then the aux-loss-free update from this step's load
            if c["kind"] == "moe" and c["router"] == "sigmoid":
                ld = sst[i]["load"]
                b = theta["layers.%d.router.selection_bias" % i]
                theta["layers.%d.router.selection_bias" % i] = (
                    b + float(np.float32(c["bias_update_rate"])) * torch.sign(ld.mean() - ld)).to(torch.float32).double()
        steps.append((sl.detach(), sa.detach(), {n: val.clone() for n, val in theta.items()}))
    # the last update's parameters are stored too: check their routing margins as well
    train_objective(cfg, {n: val for n, val in theta.items()}, x, target, noises, chk, call)

    chk.verify()
    for i, st in stats.items():       # routing that exercises more than one expert
        require(int((st["tokens_per_expert"] > 0).sum()) >= min(2, layers[i]["experts"]),
                "layer %d uses a single expert" % i)
    info = {"stats": stats, "eval_stats": estats, "clipped": clipped, "min_step_grad": min_step_grad}
    if check is not None:
        check(info)

    # assemble the file, in a fixed order
    out = {}
    for n in names:
        out[n] = f32(P0[n])
    out["x"] = f32(x)
    if cfg["loss"] == "cross_entropy":
        out["labels"] = target.numpy().astype(np.int32)
    else:
        out["target"] = f32(target)
    for i in sorted(noises):
        out["noise.%d" % i] = f32(noises[i])
    if "token_ids" in call and layers[0]["kind"] != "embedding":
        out["token_ids"] = call["token_ids"].numpy().astype(np.int32)
    if call.get("top_k"):
        out["call.top_k"] = np.array([call["top_k"]], dtype=np.int32)
    if call.get("top_p"):
        out["call.top_p"] = np.array([call["top_p"]], dtype=np.float32)
    out["y"] = f32(y)
    out["loss"] = f32(loss.reshape(1))
    out["aux_loss"] = f32(aux_total.reshape(1))
    for i in sorted(auxes):
        out["aux.%d" % i] = f32(torch.stack(auxes[i]).detach())
    for i in sorted(stats):
        out["stats.%d.tokens_per_expert" % i] = f32(stats[i]["tokens_per_expert"])
        out["stats.%d.dropped_tokens" % i] = f32(torch.tensor([stats[i]["dropped_tokens"]]))
    out["dx"] = f32(dx)
    for n in names:
        out["grad." + n] = f32(grad[n])
    out["dy"] = f32(dy)
    out["eval.y"] = f32(ey)
    out["eval.dx"] = f32(edx)
    for n in names:
        out["eval.grad." + n] = f32(egrad[n])
    for k, (sl, sa, th) in enumerate(steps, 1):
        out["step%d.loss" % k] = f32(sl.reshape(1))
        out["step%d.aux_loss" % k] = f32(sa.reshape(1))
        for n in names:
            out["step%d.%s" % (k, n)] = f32(th[n])
    return out, info


# ----------------------------------------------------------------------------------------------
# Cases

def require(cond, msg):
    if not cond:
        raise Retry(msg)


def check_clipped(info):
    require(all(info["clipped"]), "clip_norm must clip on every step: %s" % info["clipped"])


def check_switch(info):
    for i, st in info["stats"].items():
        require(st["dropped_tokens"] >= 1, "layer %d drops no token" % i)
        require(float(st["tokens_per_expert"].max()) == st["capacity"], "layer %d: no full expert" % i)


def check_dropped(info):
    for i, st in info["stats"].items():
        if info["stats"][i]["capacity"]:
            require(st["dropped_tokens"] >= 1, "layer %d drops no token" % i)


def check_bias_moves(info):
    check_adam_safe(info)
    require(any(float(st["load"].std()) > 0 for st in info["stats"].values()), "the load is balanced already")


def check_adam_safe(info):
    """A gradient near 0 but not 0 (float32 rounding decides its size) makes Adam's step unstable."""
    require(info["min_step_grad"] >= 1e-7, "a step gradient is %g" % info["min_step_grad"])


def check_some_drop(info):
    check_adam_safe(info)
    require(any(st["dropped_tokens"] >= 1 for st in info["stats"].values()), "no token dropped")


def check_top_p(info):
    check_adam_safe(info)
    require(any(st["capacity"] is None and float(st["load"].sum()) < 20 * 3 for st in info["stats"].values()),
            "top_p keeps every slot")


CASES = [
    # name, config, T, check
    ("dense_mlp",
     model_config(12, [dense(12, 16, "gelu"), norm("layernorm", 16),
                       dense(16, 16, "silu", residual=True), norm("rmsnorm", 16, eps=1e-3),
                       dense(16, 5)], "cross_entropy", clip_norm=0.05),
     16, check_clipped),
    ("dense_mse",
     model_config(10, [dense(10, 14, "tanh"), dense(14, 14, "sigmoid", bias=False),
                       dense(14, 3)], "mse"),
     16, None),
    ("dense_bce",
     model_config(10, [dense(10, 12, "relu"), dense(12, 12, "tanh", residual=True),
                       norm("rmsnorm", 12, residual=True), dense(12, 4, bias=False)], "bce"),
     16, None),
    ("topk2_swiglu_shared",
     model_config(12, [moe(12, 14, router="topk", experts=4, top_k=2, renormalize=True,
                           expert="swiglu", d_hidden=10, shared_experts=1, d_shared_hidden=6,
                           balance_loss=0.01, z_loss=0.001),
                       dense(14, 5)], "cross_entropy"),
     20, None),
    ("soft_mixture_mlp",
     model_config(10, [moe(10, 6, router="topk", experts=4, top_k=4, renormalize=True,
                           expert="mlp", d_hidden=12, hidden_layers=2, activation="gelu",
                           bias=True, importance_loss=0.05, z_loss=0.001)], "mse"),
     16, None),
    ("switch_capacity",
     model_config(12, [moe(12, 12, router="switch", experts=4, residual=True, expert="mlp",
                           d_hidden=8, activation="silu", capacity_factor=0.75,
                           balance_loss=0.01),
                       moe(12, 12, router="switch", experts=4, residual=False, expert="linear",
                           router_bias=True, capacity_factor=0.75, balance_loss=0.01,
                           z_loss=0.001),
                       dense(12, 5)], "cross_entropy"),
     24, check_switch),
    ("noisy_topk",
     model_config(12, [moe(12, 10, router="noisy_topk", experts=6, top_k=2, router_bias=True,
                           expert="mlp", d_hidden=8, activation="relu",
                           balance_loss=0.01, z_loss=0.001, importance_loss=0.1,
                           load_loss=0.1),
                       dense(10, 5)], "cross_entropy"),
     24, None),
    ("topk_norenorm_aux",
     model_config(10, [moe(10, 6, router="topk", experts=5, top_k=3, renormalize=False,
                           router_bias=True, expert="linear", balance_loss=0.02, z_loss=0.002,
                           importance_loss=0.1, load_loss=0.1)], "bce"),
     20, None),
    # extra cases
    ("noisy_capacity_passthrough",
     model_config(10, [moe(10, 10, router="noisy_topk", experts=4, top_k=2, expert="swiglu",
                           d_hidden=8, bias=True, shared_experts=2, d_shared_hidden=6,
                           capacity_factor=0.5, balance_loss=0.01, importance_loss=0.05,
                           load_loss=0.05),
                       norm("layernorm", 10),
                       moe(10, 10, router="noisy_topk", experts=3, top_k=1, renormalize=False,
                           expert="linear", residual=True, load_loss=0.1, z_loss=0.001),
                       dense(10, 4)], "cross_entropy"),
     20, check_dropped),
    ("topk1_mlp3_residual",
     model_config(8, [dense(8, 12, "tanh"),
                      moe(12, 12, router="topk", experts=3, top_k=1, residual=True,
                          expert="mlp", d_hidden=6, hidden_layers=3, activation="tanh",
                          bias=False, balance_loss=0.01, importance_loss=0.02),
                      norm("rmsnorm", 12), dense(12, 3)], "mse", clip_norm=0.3),
     12, None),
    # routers of README 3.5
    ("sigmoid_groups_bias",
     model_config(12, [moe(12, 10, router="sigmoid", experts=8, top_k=2, groups=4, top_k_groups=2,
                           routed_scaling_factor=2.5, bias_update_rate=0.03125, expert="swiglu",
                           d_hidden=8, shared_experts=1, d_shared_hidden=6, router_bias=True),
                       moe(10, 10, router="sigmoid", experts=4, top_k=2, renormalize=False,
                           expert="linear", capacity_factor=0.75, bias_update_rate=0.0625),
                       dense(10, 5)], "cross_entropy"),
     16, check_bias_moves),
    ("expert_choice",
     model_config(10, [moe(10, 10, router="expert_choice", experts=4, top_k=2, expert="mlp",
                           d_hidden=8, activation="tanh", z_loss=0.001),
                       moe(10, 10, router="expert_choice", experts=4, top_k=1, capacity_factor=0.5,
                           expert="linear"),
                       dense(10, 4)], "cross_entropy"),
     20, check_some_drop),
    ("call_top_k_top_p",
     model_config(10, [moe(10, 8, router="topk", experts=6, top_k=2, max_top_k=4, expert="mlp",
                           d_hidden=8, activation="gelu", balance_loss=0.01, z_loss=0.001,
                           importance_loss=0.05),
                       moe(8, 8, router="noisy_topk", experts=4, top_k=2, max_top_k=3,
                           renormalize=False, expert="linear", load_loss=0.1, residual=True),
                       dense(8, 3)], "mse"),
     20, check_top_p, {"top_k": 3, "top_p": 0.75}),
    ("hash_tokens",
     model_config(10, [moe(10, 8, router="hash", experts=5, top_k=2, hash_seed=123456789,
                           expert="mlp", d_hidden=8, shared_experts=1),
                       moe(8, 8, router="hash", experts=3, top_k=1, capacity_factor=0.5,
                           expert="linear"),
                       dense(8, 4)], "cross_entropy"),
     20, check_dropped),
    # README 3.6: token ids -> embedding; the hash layer takes each row's last id
    ("embedding_hash",
     model_config(3, [embedding(3, 7, 4),
                      moe(12, 8, router="hash", experts=4, top_k=2, hash_seed=77, expert="mlp",
                          d_hidden=8, activation="tanh"),
                      moe(8, 8, router="topk", experts=3, top_k=2, expert="linear", residual=True,
                          balance_loss=0.01),
                      dense(8, 7)], "cross_entropy"),
     24, None),
]


def case_seed(name, attempt):
    return (zlib.crc32(name.encode()) * 1000 + attempt) % (2 ** 62)


def main(argv):
    outdir = argv[1] if len(argv) > 1 else os.path.dirname(os.path.abspath(__file__))
    os.makedirs(outdir, exist_ok=True)
    for name, cfg, T, check, *call in CASES:
        for attempt in range(200):
            try:
                tensors, info = build_case(name, cfg, T, case_seed(name, attempt), check, *call)
                break
            except Retry as e:
                last = e
        else:
            raise RuntimeError("%s: no acceptable draw (%s)" % (name, last))
        path = os.path.join(outdir, name + ".safetensors")
        save_safetensors(path, tensors, {"moe.config": json.dumps(cfg)})
        st = "; ".join("layer %d: kept/expert %s dropped %d" % (
            i, [int(v) for v in s["tokens_per_expert"]], s["dropped_tokens"])
            for i, s in sorted(info["stats"].items()))
        print("%-28s attempt %3d  %7d bytes  loss %.6f  %s" % (
            name, attempt, os.path.getsize(path), float(tensors["loss"][0]), st))


if __name__ == "__main__":
    main(sys.argv)
