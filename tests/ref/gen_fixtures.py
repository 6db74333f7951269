#!/usr/bin/python3
"""PyTorch reference fixtures for moe.h, built from the model reference in the top-level README.md alone.

Usage:

    /usr/bin/python3 tests/ref/gen_fixtures.py [outdir]

`outdir` defaults to the directory of this script (tests/ref/).  One safetensors file
`<case>.safetensors` is written per case (see CASES below and tests/ref/README.md for the tensor
list).  Needs only torch and numpy (the `safetensors` package is not used: the format of
the README model reference section 6 is written by hand).

Every model is an independent re-implementation of the README's model reference: dense / rmsnorm / layernorm / moe
layers, the topk / noisy_topk / switch / sigmoid / expert_choice / hash / soft / hierarchical routers (3.4-3.8), per-call top_k
and top_p, the selection-bias update, capacity with dropping and pass-through, linear /
mlp / swiglu experts, shared experts, the stacking and voting combines, the four auxiliary losses, the three task losses, gradient
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
VOTES = ("vote", "vote_majority")   # voting combines (README 3.4 step 6): no inference backward

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
    """n token ids per row -> their embeddings side by side (README 3.10)."""
    return {"kind": "embedding", "d_in": n, "d_out": n * d_embedding, "residual": False,
            "vocab_size": vocab_size, "d_embedding": d_embedding}


def moe(d_in, d_out=None, **kw):
    router = kw.get("router", "topk")
    experts = kw.get("experts", 4)
    expert = kw.get("expert", "mlp")
    d_hidden = kw.get("d_hidden", d_in)
    own = {"sigmoid": {"routed_scaling_factor": 1, "groups": 1, "top_k_groups": None, "bias_update_rate": 0},
           "hash": {"hash_seed": 0},
           "soft": {"slots_per_expert": 1, "soft_group_tokens": 0},
           "hierarchical": {"groups": 2, "top_k_groups": 1, "group_router": "topk", "expert_router": "topk"}}.get(router, {})
    extra = {}
    for f, default in own.items():
        extra[f] = kw.pop(f, default)
    if router == "sigmoid" and extra["top_k_groups"] is None:
        extra["top_k_groups"] = extra["groups"]
    max_top_k = kw.pop("max_top_k", None)
    combine = kw.pop("combine", "sum")
    d_expert_out = kw.pop("d_expert_out", None)
    default_k = 1 if router == "switch" else experts if expert == "gaussian" else min(2, experts)
    if router == "soft":
        default_k = experts                 # every token reaches every expert through the slots
    if router == "hierarchical":
        default_k = min(2, experts // extra["groups"])
    c = {
        "kind": "moe", "d_in": d_in, "d_out": d_in if d_out is None else d_out,
        "residual": kw.get("residual", False),
        "router": router, "experts": experts,
        "top_k": kw.get("top_k", default_k),
        "renormalize": kw.get("renormalize", router not in ("switch", "expert_choice", "hash", "soft")),
        "router_bias": kw.get("router_bias", False),
        "expert": expert, "d_hidden": d_hidden,
        "hidden_layers": kw.get("hidden_layers", 0 if expert == "linear" else 1),
        "activation": kw.get("activation", "relu"),
        "bias": kw.get("bias", expert not in ("swiglu", "geglu")),
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
    if combine != "sum":                    # written only where not the weighted sum (6.1)
        c["combine"] = combine
    if combine == "stack":
        c["d_expert_out"] = c["d_out"] if d_expert_out is None else d_expert_out
    return c


def expert_out(c):
    """Width of the routed experts' outputs: d_expert_out (stacking), else d_out."""
    return c.get("d_expert_out", c["d_out"])


def model_config(d_in, layers, loss, tasks=None, **opt):
    o = dict(OPTIMIZER)
    o.update(opt)
    cfg = {"format": "moe.h", "version": 1, "d_in": d_in, "loss": loss, "max_tokens": 256,
           "layers": layers, "optimizer": o}
    if tasks is not None:                   # multi-task loss (README section 4): [(loss, weight, d_out)]
        cfg["tasks"] = [{"loss": l, "weight": w, "d_out": n} for l, w, n in tasks]
    return cfg


def multitask(kind, d_in, tasks=2, task_input=None, d_out=None, **kw):
    """README 3.9: kind "multigate" (experts, task_experts, shared_output) or "task_towers"."""
    if task_input is None:
        task_input = "single" if kind == "multigate" else "tasks"
    gin = {"single": 1, "tasks": tasks, "tasks_shared": tasks + 1}[task_input]
    gout = tasks + (1 if kw.get("shared_output", False) else 0)
    D = d_in // gin
    expert = kw.get("expert", "mlp")
    c = {"kind": kind, "d_in": d_in, "d_out": gout * D if d_out is None else d_out, "residual": False,
         "tasks": tasks, "task_input": task_input}
    if kind == "multigate":
        c.update({"experts": kw.get("experts", 4), "task_experts": kw.get("task_experts", 0),
                  "shared_output": kw.get("shared_output", False)})
    c.update({"expert": expert, "d_hidden": kw.get("d_hidden", D),
              "hidden_layers": kw.get("hidden_layers", 0 if expert == "linear" else 1),
              "activation": kw.get("activation", "identity" if expert == "linear" else "silu" if expert == "swiglu" else "relu"),
              "bias": kw.get("bias", expert != "swiglu")})
    unknown = set(kw) - set(c)
    assert not unknown, unknown
    return c


def multitask_shape(c):
    """(n, S, Et, Gin, Gout, D, O) of a multi-task layer."""
    n = c["tasks"]
    S = c["experts"] if c["kind"] == "multigate" else 0
    Et = c["task_experts"] if c["kind"] == "multigate" else 1
    gin = {"single": 1, "tasks": n, "tasks_shared": n + 1}[c["task_input"]]
    gout = n + (1 if c.get("shared_output") else 0)
    return n, S, Et, gin, gout, c["d_in"] // gin, c["d_out"] // gout


def gate_lists(c):
    """README 3.9: per gate, its experts as (bank, index): task gate i = own experts then shared;
    shared gate = every task expert, task by task, then the shared ones."""
    n, S, Et, _, gout, _, _ = multitask_shape(c)
    lists = []
    for g in range(gout):
        own = [("task", g * Et + k) for k in range(Et)] if g < n else [("task", k) for k in range(n * Et)]
        lists.append(own + [("shared", j) for j in range(S)])
    return lists


# ----------------------------------------------------------------------------------------------
# Parameter names and shapes (README.md section 3, in its order)

def expert_shapes(prefix, c, n, hidden, O):
    """Stacked expert tensors for n experts of kind c['expert'], hidden width `hidden`, output O."""
    D, kind = c["d_in"], c["expert"]
    out = []
    if kind == "linear":
        out.append((prefix + "fc0.weight", [n, O, D], D))
        if c["bias"]:
            out.append((prefix + "fc0.bias", [n, O], D))
    elif kind in ("mlp", "gaussian"):
        L = c["hidden_layers"]
        for j in range(L + 1):
            fan_in = D if j == 0 else hidden
            fan_out = (2 * O if kind == "gaussian" else O) if j == L else hidden   # gaussian: mean | log-std
            out.append((prefix + "fc%d.weight" % j, [n, fan_out, fan_in], fan_in))
            if c["bias"]:
                out.append((prefix + "fc%d.bias" % j, [n, fan_out], fan_in))
    elif kind in ("swiglu", "geglu"):
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
            if c["router"] == "soft":
                specs.append((p + "router.weight", [E * c["slots_per_expert"], D], "lin", D))
            elif c["router"] == "hierarchical":
                G = c["groups"]
                specs.append((p + "router.weight", [G, E // G, D], "router", D))
                if c["router_bias"]:
                    specs.append((p + "router.bias", [G, E // G], "routerb", D))
                specs.append((p + "router.group.weight", [G, D], "router", D))
                if c["router_bias"]:
                    specs.append((p + "router.group.bias", [G], "routerb", D))
                if c["group_router"] == "noisy_topk":
                    specs.append((p + "router.group.noise_weight", [G, D], "lin", D))
                if c["expert_router"] == "noisy_topk":
                    specs.append((p + "router.noise_weight", [G, E // G, D], "lin", D))
            elif c["router"] != "hash":
                specs.append((p + "router.weight", [E, D], "router", D))
            if c["router_bias"] and c["router"] != "hierarchical":
                specs.append((p + "router.bias", [E], "routerb", D))
            if c["router"] == "noisy_topk":
                specs.append((p + "router.noise_weight", [E, D], "lin", D))
            if c["router"] == "sigmoid":
                specs.append((p + "router.selection_bias", [E], "selb", 0))
            for name, shape, fan in expert_shapes(p + "experts.", c, E, c["d_hidden"], expert_out(c)):
                specs.append((name, shape, "lin", fan))
            if c["shared_experts"] > 0:
                for name, shape, fan in expert_shapes(p + "shared.", c, c["shared_experts"],
                                                      c["d_shared_hidden"], c["d_out"]):
                    specs.append((name, shape, "lin", fan))
            if c.get("combine") == "stack":
                W = E * c["d_expert_out"]
                specs.append((p + "combine.weight", [c["d_out"], W], "lin", W))
                specs.append((p + "combine.bias", [c["d_out"]], "lin", W))
        elif c["kind"] in ("multigate", "task_towers"):
            n, S, Et, gin, gout, D, O = multitask_shape(c)
            for g, lst in enumerate(gate_lists(c)):
                if len(lst) > 1:
                    specs.append((p + "gates.%d.weight" % g, [len(lst), D], "router", D))
            cs = dict(c, d_in=D, d_out=O)
            if S > 0:
                for name, shape, fan in expert_shapes(p + "experts.", cs, S, c["d_hidden"], O):
                    specs.append((name, shape, "lin", fan))
            bank = "towers." if c["kind"] == "task_towers" else "task_experts."
            if n * Et > 0:
                for name, shape, fan in expert_shapes(p + bank, cs, n * Et, c["d_hidden"], O):
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
    if kind in ("mlp", "gaussian"):
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
    if kind in ("swiglu", "geglu"):
        a1 = torch.einsum("td,ehd->eth", x, P[prefix + "w1.weight"])
        a3 = torch.einsum("td,ehd->eth", x, P[prefix + "w3.weight"])
        if bias:
            a1 = a1 + P[prefix + "w1.bias"][:, None, :]
            a3 = a3 + P[prefix + "w3.bias"][:, None, :]
        act = "silu" if kind == "swiglu" else "gelu"
        y = torch.einsum("eth,eoh->eto", activation(act, a1, None) * a3, P[prefix + "w2.weight"])
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


def soft_forward(P, p, c, x, chk):
    """README soft router: slots mix the tokens of a group; slot j belongs to expert j // S."""
    T, D = x.shape
    E, O, S = c["experts"], c["d_out"], c["slots_per_expert"]
    L = E * S
    m = c["soft_group_tokens"] or T
    G = T // m
    logits = x @ P[p + "router.weight"].T                     # [T, E*S]
    comb = torch.softmax(logits, dim=1)                         # over a token's slots
    disp = torch.softmax(logits.reshape(G, m, L), dim=1)        # over a group's tokens
    xs = torch.einsum("gml,gmd->gld", disp, x.reshape(G, m, D)).reshape(G * L, D)
    fx = experts_forward(P, p + "experts.", c, xs, chk).reshape(E, G, L, O)
    owner = torch.arange(L) // S
    ys = fx[owner, :, torch.arange(L)]                          # [L, G, O]: slot j through expert j // S
    y = torch.einsum("gml,lgo->gmo", comb.reshape(G, m, L), ys).reshape(T, O)
    if c["residual"]:
        y = x + y
    zero = torch.zeros(())
    per = torch.full((E,), float(G * S))
    return y, [zero, zero, zero, zero], {"tokens_per_expert": per, "dropped_tokens": 0.0, "capacity": None, "load": per}


def moe_forward(P, p, c, x, train, noise, chk, call, layer):
    """Returns (y, [balance, z, importance, load] (coefficients applied), stats dict)."""
    T, D = x.shape
    E, O, router = c["experts"], c["d_out"], c["router"]
    k = call.get("top_k") or c["top_k"]
    top_p = call.get("top_p", 0)
    if router == "switch":
        k = 1
    if router == "soft":
        return soft_forward(P, p, c, x, chk)
    hier = router == "hierarchical"
    noise_g = None
    if hier and noise is not None:                              # [T*E expert noise, then T*G group noise]
        noise, noise_g = noise[:T * E].reshape(T, E), noise[T * E:].reshape(T, c["groups"])
    # step 1: router logits (jitter is 0 in every fixture, so u = x); none for the hash router
    u = x
    cl = s = probs = None
    if router != "hash":
        cl = u @ P[p + "router.weight"].reshape(E, D).T
        if c["router_bias"]:
            cl = cl + P[p + "router.bias"].reshape(E)
    if router == "noisy_topk" or (hier and c["expert_router"] == "noisy_topk"):
        s = softplus(u @ P[p + "router.noise_weight"].reshape(E, D).T)
        h = cl + noise * s if train else cl
    else:
        h = cl
    ec = router == "expert_choice"
    slots = E if ec else c["top_k_groups"] * k if hier else k
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
    elif hier:
        # README hierarchical router: group gate over groups, then a gate inside each chosen group
        G, Kg = c["groups"], c["top_k_groups"]
        gn = E // G
        a = u @ P[p + "router.group.weight"].T
        if c["router_bias"]:
            a = a + P[p + "router.group.bias"]
        if c["group_router"] == "noisy_topk" and train:
            a = a + noise_g * softplus(u @ P[p + "router.group.noise_weight"].T)
        gp = torch.softmax(a, dim=1)
        pw = torch.softmax(h.reshape(T, G, gn), dim=2)
        probs = (gp[:, :, None] * pw).reshape(T, E)
        ad, hd = a.detach(), h.detach()
        rows = []
        for t in range(T):
            gorder = torch.sort(ad[t], descending=True, stable=True).indices
            if Kg < G:
                gap_check(chk, ad[t, gorder[:Kg + 1]], fine=False)
            chosen = gorder[:Kg]
            gg = torch.softmax(a[t, chosen], dim=0) if c["renormalize"] else gp[t, chosen]
            row = []
            for i, q in enumerate(chosen.tolist()):
                order = torch.sort(hd[t, q * gn:(q + 1) * gn], descending=True, stable=True).indices
                if k < gn:
                    gap_check(chk, hd[t, q * gn + order[:k + 1]], fine=False)
                e_t = q * gn + order[:k]
                sel[t, i * k:(i + 1) * k] = e_t
                gw = torch.softmax(h[t, e_t], dim=0) if c["renormalize"] else pw[t, q, order[:k]]
                row.append(gg[i] * gw)
            rows.append(torch.cat(row))
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
        cap = math.ceil(c["capacity_factor"] * T * slots / E)
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
    fx = experts_forward(P, p + "experts.", c, x, chk)          # [E, T, O] (gaussian: [E, T, 2 O]; stack: [E, T, d_expert_out])
    ar = torch.arange(T)
    stack = c.get("combine") == "stack"
    if c["expert"] == "gaussian":
        # README 3.6: y = (log pi [E] | means [E, O] | log-stds [E, O]); unchosen: -inf, 0, 0
        logpi = torch.full((T, E), -math.inf)
        mean = torch.zeros(T, E, O)
        logstd = torch.zeros(T, E, O)
        for t in range(T):
            for si in range(slots):
                e = int(sel[t, si])
                if e < 0:
                    continue
                logpi[t, e] = torch.log(gates[t, si])
                mean[t, e] = fx[e, t, :O]
                ls = fx[e, t, O:]
                chk.min_fine_gap = min(chk.min_fine_gap, float((ls.detach().abs() - 10).abs().min()))
                logstd[t, e] = torch.clamp(ls, -10, 10)
        y = torch.cat([logpi, mean.reshape(T, E * O), logstd.reshape(T, E * O)], dim=1)
    if c["expert"] != "gaussian":
        if stack:                               # gated outputs side by side, then the output linear
            G = torch.zeros(T, E)
            for si in range(slots):
                w = gates[:, si] * keep[:, si].double()
                G = G + w[:, None] * torch.nn.functional.one_hot(sel[:, si].clamp(min=0), E).double()
            cat = (G.T[:, :, None] * fx).permute(1, 0, 2).reshape(T, -1)
            routed = cat @ P[p + "combine.weight"].T + P[p + "combine.bias"]
        elif c.get("combine") in VOTES and not train:
            # inference vote: each kept expert votes for its argmax class (ties: lower class);
            # weighted: y[c] = gates of c's voters; majority: n_c + 0.5 G_c / G
            routed = torch.zeros(T, O)
            for t in range(T):
                n_c, g_c, total = torch.zeros(O), torch.zeros(O), 0.0
                for si in range(slots):
                    if not keep[t, si]:
                        continue
                    lg = fx[int(sel[t, si]), t].detach()
                    order = torch.sort(lg, descending=True, stable=True).indices
                    gap_check(chk, lg[order[:2]], fine=False)      # which class the expert votes for
                    v = int(order[0])
                    n_c[v] += 1
                    g_c[v] += float(gates[t, si])
                    total += float(gates[t, si])
                if c["combine"] == "vote":
                    routed[t] = g_c
                else:
                    routed[t] = n_c + (0.5 * g_c / total if total > 0 else 0)
        else:
            routed = torch.zeros(T, O)
            for si in range(slots):
                w = gates[:, si] * keep[:, si].double()
                routed = routed + w[:, None] * fx[sel[:, si].clamp(min=0), ar]
        if not c["residual"] and O == D and not (c.get("combine") in VOTES and not train):
            # pass-through; stacking adds x to the output linear (for such a token, its bias)
            routed = torch.where(dropped[:, None], x + routed if stack else x, routed)
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
            f = load / (T * slots)
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


def multitask_forward(P, p, c, h, chk):
    """README 3.9: experts on their slices, a softmax gate per output slice, slices side by side."""
    n, S, Et, gin, gout, D, O = multitask_shape(c)
    single = c["task_input"] == "single"
    xs = [h[:, i * D:(i + 1) * D] for i in range(gin)]
    cs = dict(c, d_in=D, d_out=O)
    outs = {}
    bank = "towers." if c["kind"] == "task_towers" else "task_experts."
    for k in range(n * Et):         # task expert i*Et + j reads slice i
        W = {q[len(p + bank):]: v[k:k + 1] for q, v in P.items() if q.startswith(p + bank)}
        outs[("task", k)] = experts_forward({"x." + q: v for q, v in W.items()}, "x.", cs,
                                            xs[0 if single else k // Et], chk)[0]
    for j in range(S):              # shared experts read the shared slice
        W = {q[len(p + "experts."):]: v[j:j + 1] for q, v in P.items() if q.startswith(p + "experts.")}
        outs[("shared", j)] = experts_forward({"x." + q: v for q, v in W.items()}, "x.", cs,
                                              xs[0 if single else n], chk)[0]
    ys = []
    for g, lst in enumerate(gate_lists(c)):
        if len(lst) == 1:
            ys.append(outs[lst[0]])
            continue
        gate = torch.softmax(xs[0 if single else g] @ P[p + "gates.%d.weight" % g].T, dim=1)
        ys.append(sum(gate[:, q:q + 1] * outs[e] for q, e in enumerate(lst)))
    return torch.cat(ys, dim=1)


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
        elif kind in ("multigate", "task_towers"):
            out = multitask_forward(P, p, c, h, chk)
        if kind != "moe" and c["residual"]:
            out = h + out
        h = out
    return h, auxes, stats


def task_loss(kind, y, target, last=None):
    if kind == "mixture_nll":
        # README 4: -log sum_e pi_e N(target; mu_e, diag sigma_e^2), mean over tokens
        E, O = last["experts"], last["d_out"]
        logpi, mu = y[:, :E], y[:, E:E + E * O].reshape(-1, E, O)
        ls = y[:, E + E * O:].reshape(-1, E, O)
        z = (target[:, None, :] - mu) * torch.exp(-ls)
        logn = (-0.5 * z * z - ls - 0.5 * math.log(2 * math.pi)).sum(dim=2)
        return -torch.logsumexp(logpi + logn, dim=1).mean()
    if kind == "cross_entropy":
        return (torch.logsumexp(y, dim=1) - y.gather(1, target[:, None].long())[:, 0]).mean()
    if kind == "mse":
        return ((y - target) ** 2).mean()
    if kind == "bce":
        return (softplus(y) - target * y).mean()
    raise ValueError(kind)


def train_objective(cfg, P, x, target, noises, chk, call=None):
    y, auxes, stats = model_forward(cfg, P, x, True, noises, chk, call)
    if "tasks" in cfg:                      # README section 4: sum_i w_i * loss_i on the output's slices
        loss, off = torch.zeros(()), 0
        for t, tgt in zip(cfg["tasks"], target):
            loss = loss + float(np.float32(t["weight"])) * task_loss(t["loss"], y[:, off:off + t["d_out"]], tgt)
            off += t["d_out"]
    else:
        loss = task_loss(cfg["loss"], y, target, cfg["layers"][-1])
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
    if layers[0]["kind"] == "embedding":    # token ids (README 3.10)
        x = torch.randint(0, layers[0]["vocab_size"], (T, d_in), generator=g).double()
    if "tasks" in cfg:
        target = []
        for t in cfg["tasks"]:
            if t["loss"] == "cross_entropy":
                target.append(torch.randint(0, t["d_out"], (T,), generator=g).to(torch.int32))
            elif t["loss"] == "mse":
                target.append(torch.randn(T, t["d_out"], generator=g, dtype=torch.float32).double())
            else:
                target.append(torch.rand(T, t["d_out"], generator=g, dtype=torch.float32).double())
    elif cfg["loss"] == "cross_entropy":
        target = torch.randint(0, d_out, (T,), generator=g).to(torch.int32)
    elif cfg["loss"] in ("mse", "mixture_nll"):
        target = torch.randn(T, d_out, generator=g, dtype=torch.float32).double()
    else:
        target = torch.rand(T, d_out, generator=g, dtype=torch.float32).double()
    noises = {i: torch.randn(T, c["experts"], generator=g, dtype=torch.float32).double()
              for i, c in enumerate(layers) if c["kind"] == "moe" and c["router"] == "noisy_topk"}
    for i, c in enumerate(layers):          # hierarchical: T*E expert noise, then T*G group noise, flat
        if c["kind"] == "moe" and c["router"] == "hierarchical":
            noises[i] = torch.randn(T * (c["experts"] + c["groups"]), generator=g, dtype=torch.float32).double()
    last = layers[-1]
    width = last["experts"] * (1 + 2 * d_out) if last.get("expert") == "gaussian" else d_out
    dy = torch.randn(T, width, generator=g, dtype=torch.float32).double()
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

    # inference forward + backward of sum(y * dy), no aux.  A model with a voting layer has no
    # inference backward (the library refuses it): only its inference forward is stored.
    votes = any(c.get("combine") in VOTES for c in layers)
    P = {n: v.clone().requires_grad_(True) for n, v in P0.items()}
    xg = x.clone().requires_grad_(True)
    ey, _, estats = model_forward(cfg, P, xg, False, {}, chk, call)
    if not votes:
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
    if "tasks" in cfg:
        for i, (t, tgt) in enumerate(zip(cfg["tasks"], target)):
            if t["loss"] == "cross_entropy":
                out["task.%d.labels" % i] = tgt.numpy().astype(np.int32)
            else:
                out["task.%d.target" % i] = f32(tgt)
    elif cfg["loss"] == "cross_entropy":
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
    if not votes:
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


def check_vote(info):
    check_adam_safe(info)
    require(info["eval_stats"][1]["dropped_tokens"] >= 1, "the voting layer drops no token at inference")


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
    # multi-task layers and losses (README 3.9, section 4)
    ("mmoe_ple_tasks",
     model_config(8, [multitask("multigate", 8, tasks=2, experts=2, task_experts=1, shared_output=True,
                                d_out=3 * 6, d_hidden=7, activation="gelu"),
                      multitask("multigate", 18, tasks=2, experts=3, task_input="tasks_shared",
                                d_out=2 * 5, expert="swiglu", d_hidden=6),
                      multitask("task_towers", 10, tasks=2, d_out=2 * 2, d_hidden=4, activation="tanh")],
                  "mse", tasks=[("cross_entropy", 1.0, 2), ("mse", 0.5, 2)]),
     16, None),
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
    # soft and hierarchical routers (README 3.7, 3.8)
    ("soft_slots_groups",
     model_config(10, [moe(10, 8, router="soft", experts=3, slots_per_expert=2, soft_group_tokens=6,
                           expert="mlp", d_hidden=8, activation="gelu"),
                       moe(8, 8, router="soft", experts=2, expert="swiglu", d_hidden=6, residual=True),
                       dense(8, 4)], "cross_entropy"),
     18, check_adam_safe),
    ("hierarchical_noisy",
     model_config(10, [moe(10, 8, router="hierarchical", experts=8, groups=4, top_k_groups=2, top_k=1,
                           group_router="noisy_topk", expert_router="noisy_topk", router_bias=True,
                           expert="mlp", d_hidden=8, activation="tanh", balance_loss=0.01,
                           importance_loss=0.05),
                       moe(8, 8, router="hierarchical", experts=6, groups=2, top_k_groups=2, top_k=3,
                           renormalize=False, expert="linear", residual=True, shared_experts=1,
                           balance_loss=0.01),
                       dense(8, 4)], "cross_entropy"),
     20, check_adam_safe),
    ("hash_tokens",
     model_config(10, [moe(10, 8, router="hash", experts=5, top_k=2, hash_seed=123456789,
                           expert="mlp", d_hidden=8, shared_experts=1),
                       moe(8, 8, router="hash", experts=3, top_k=1, capacity_factor=0.5,
                           expert="linear"),
                       dense(8, 4)], "cross_entropy"),
     20, check_dropped),
    # mixture density (README 3.6, loss mixture_nll of README 4)
    ("gaussian_mixture",
     model_config(6, [dense(6, 10, "tanh"),
                      moe(10, 2, router="topk", experts=3, expert="gaussian", d_hidden=8,
                          activation="tanh", balance_loss=0.01, z_loss=0.001)], "mixture_nll"),
     16, None),
    # GeGLU experts
    ("topk2_geglu_bias",
     model_config(10, [moe(10, 8, router="topk", experts=4, top_k=2, expert="geglu", d_hidden=12,
                           bias=True, shared_experts=1, d_shared_hidden=6, balance_loss=0.01),
                       dense(8, 4)], "cross_entropy"),
     16, None),
    # stacking combine (the second layer drops tokens: pass-through plus the output linear)
    ("stack_combine",
     model_config(10, [moe(10, 8, router="topk", experts=4, top_k=2, expert="mlp", d_hidden=8,
                           activation="tanh", combine="stack", d_expert_out=5, balance_loss=0.01),
                       moe(8, 8, router="switch", experts=3, expert="linear", capacity_factor=0.5,
                           combine="stack", d_expert_out=3),
                       dense(8, 4)], "cross_entropy"),
     16, check_dropped),
    # voting combines (README 3.4 step 6): training forwards are the gated sum; at inference the
    # first layer's weighted votes feed the second layer, whose majority votes (capacity drops some
    # voters and whole tokens: zeros) are the output.  No eval.dx / eval.grad.* (no inference backward).
    ("vote_combine",
     model_config(10, [moe(10, 6, router="topk", experts=4, top_k=2, expert="mlp", d_hidden=8,
                           activation="tanh", combine="vote", balance_loss=0.01),
                       moe(6, 5, router="topk", experts=3, top_k=2, expert="linear", capacity_factor=0.5,
                           combine="vote_majority", z_loss=0.001)], "cross_entropy"),
     16, check_vote),
    # README 3.10: token ids -> embedding; the hash layer takes each row's last id
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
