#!/usr/bin/python3
"""Re-verifies the fixtures written by gen_fixtures.py.

Usage:

    /usr/bin/python3 tests/ref/check_fixtures.py [dir]        (default: this script's directory)

It shares no code with gen_fixtures.py.  For every `*.safetensors` in the directory it

1. reads the file with its own safetensors reader and checks the format (header length, header
   padded to a multiple of 8, offsets contiguous, every tensor the `moe.config` implies present
   with its shape, no other `layers.` tensor, the fixture tensor list complete);
2. rebuilds the model with a second, deliberately naive implementation of the model reference in the top-level README.md (token by
   token, expert by expert, written straight from the text) in float64 from the stored float32
   values, and compares y, loss, aux_loss, aux.<i>, stats, dx, grad.*, eval.y, eval.dx, eval.grad.*
   (gradients by autograd through the naive model);
3. checks those gradients by central finite differences on a few entries of every parameter
   tensor and of x, for both the training objective (task + aux) and the inference objective
   sum(eval.y * dy);
4. replays the five steps with torch.optim.AdamW (and torch.nn.utils.clip_grad_norm_ where
   clip_norm > 0; selection biases kept out of it and moved by the sign rule of README 3.5) and
   compares step<k>.loss, step<k>.aux_loss and step<k>.<param>.

Exit status 0 when every fixture passes.
"""

import glob
import json
import math
import os
import struct
import sys

import numpy as np
import torch

torch.set_default_dtype(torch.float64)

NP_DTYPES = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "I32": np.int32,
             "I64": np.int64}


def read_safetensors(path):
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0, "header length %d not a multiple of 8" % n
    header = json.loads(raw[8:8 + n].decode())
    meta = header.pop("__metadata__", {})
    data = raw[8 + n:]
    tensors, spans = {}, []
    for name, h in header.items():
        b, e = h["data_offsets"]
        spans.append((b, e))
        dt = np.dtype(NP_DTYPES[h["dtype"]]).newbyteorder("<")
        a = np.frombuffer(data[b:e], dtype=dt).reshape(h["shape"])
        assert a.nbytes == e - b
        tensors[name] = a.astype(a.dtype.newbyteorder("="))
    spans.sort()
    pos = 0
    for b, e in spans:
        assert b == pos, "gap/overlap in data"
        pos = e
    assert pos == len(data), "trailing data"
    return meta, tensors


# ----------------------------------------------------------------------------------------------
# Expected tensor names, from the config text

def slices(c):
    """Multi-task layer (README 3.9): tasks n, shared experts S, experts per task Et, input and
    output slices, slice widths D and O."""
    n = c["tasks"]
    S, Et = (c["experts"], c["task_experts"]) if c["kind"] == "multigate" else (0, 1)
    gin = {"single": 1, "tasks": n, "tasks_shared": n + 1}[c["task_input"]]
    gout = n + (1 if c.get("shared_output") else 0)
    return n, S, Et, gin, gout, c["d_in"] // gin, c["d_out"] // gout


def gate_members(c, g):
    """Gate g's experts as (bank prefix, index): a task gate its task's, then the shared ones; the
    shared gate every task expert, task by task, then the shared ones."""
    n, S, Et = slices(c)[:3]
    bank = "towers." if c["kind"] == "task_towers" else "task_experts."
    own = range(g * Et, (g + 1) * Et) if g < n else range(n * Et)
    return [(bank, e) for e in own] + [("experts.", j) for j in range(S)]


def expected_params(cfg):
    out = {}
    for i, c in enumerate(cfg["layers"]):
        p = "layers.%d." % i
        D, O = c["d_in"], c["d_out"]
        if c["kind"] in ("multigate", "task_towers"):
            n, S, Et, gin, gout, D, O = slices(c)
            for g in range(gout):
                if len(gate_members(c, g)) > 1:
                    out[p + "gates.%d.weight" % g] = [len(gate_members(c, g)), D]
            groups = [("experts.", S, c["d_hidden"], O)] if S else []
            groups.append(("towers." if c["kind"] == "task_towers" else "task_experts.", n * Et, c["d_hidden"], O))
            groups = [gr for gr in groups if gr[1] > 0]
        elif c["kind"] == "dense":
            out[p + "weight"] = [O, D]
            if c["bias"]:
                out[p + "bias"] = [O]
        elif c["kind"] == "rmsnorm":
            out[p + "weight"] = [D]
        elif c["kind"] == "layernorm":
            out[p + "weight"] = [D]
            out[p + "bias"] = [D]
        elif c["kind"] == "embedding":
            out[p + "weight"] = [c["vocab_size"], c["d_embedding"]]
        if c["kind"] == "moe":
            E = c["experts"]
            if c["router"] == "soft":
                out[p + "router.weight"] = [E * c["slots_per_expert"], D]
            elif c["router"] == "hierarchical":
                G = c["groups"]
                out[p + "router.weight"] = [G, E // G, D]
                if c["router_bias"]:
                    out[p + "router.bias"] = [G, E // G]
                out[p + "router.group.weight"] = [G, D]
                if c["router_bias"]:
                    out[p + "router.group.bias"] = [G]
                if c["group_router"] == "noisy_topk":
                    out[p + "router.group.noise_weight"] = [G, D]
                if c["expert_router"] == "noisy_topk":
                    out[p + "router.noise_weight"] = [G, E // G, D]
            elif c["router"] != "hash":
                out[p + "router.weight"] = [E, D]
            if c["router_bias"] and c["router"] != "hierarchical":
                out[p + "router.bias"] = [E]
            if c["router"] == "noisy_topk":
                out[p + "router.noise_weight"] = [E, D]
            if c["router"] == "sigmoid":
                out[p + "router.selection_bias"] = [E]
            groups = [("experts.", E, c["d_hidden"], c.get("d_expert_out", O))]
            if c["shared_experts"]:
                groups.append(("shared.", c["shared_experts"], c["d_shared_hidden"], O))
            if c.get("combine") == "stack":
                out[p + "combine.weight"] = [O, E * c["d_expert_out"]]
                out[p + "combine.bias"] = [O]
        if c["kind"] in ("moe", "multigate", "task_towers"):
            for g, n, H, O in groups:
                q = p + g
                if c["expert"] == "linear":
                    out[q + "fc0.weight"] = [n, O, D]
                    if c["bias"]:
                        out[q + "fc0.bias"] = [n, O]
                elif c["expert"] in ("mlp", "gaussian"):
                    L = c["hidden_layers"]
                    dims = [D] + [H] * L + [2 * O if c["expert"] == "gaussian" else O]
                    for j in range(L + 1):
                        out[q + "fc%d.weight" % j] = [n, dims[j + 1], dims[j]]
                        if c["bias"]:
                            out[q + "fc%d.bias" % j] = [n, dims[j + 1]]
                else:
                    out[q + "w1.weight"] = [n, H, D]
                    out[q + "w3.weight"] = [n, H, D]
                    out[q + "w2.weight"] = [n, O, H]
                    if c["bias"]:
                        out[q + "w1.bias"] = [n, H]
                        out[q + "w3.bias"] = [n, H]
                        out[q + "w2.bias"] = [n, O]
    return out


def embeds(cfg):
    """x holds token ids (README 3.10)"""
    return cfg["layers"][0]["kind"] == "embedding"


def expected_fixture(cfg, T, present):
    shapes = dict(expected_params(cfg))
    if any(c["kind"] == "moe" and c["router"] == "hash" for c in cfg["layers"]) and not embeds(cfg):
        shapes["token_ids"] = [T]
    for n in ("call.top_k", "call.top_p"):     # optional per-call options
        if n in present:
            shapes[n] = [1]
    last = cfg["layers"][-1]
    d_in, d_out = cfg["d_in"], last["d_out"]
    shapes["x"] = [T, d_in]
    if "tasks" in cfg:
        for k, t in enumerate(cfg["tasks"]):
            if t["loss"] == "cross_entropy":
                shapes["task.%d.labels" % k] = [T]
            else:
                shapes["task.%d.target" % k] = [T, t["d_out"]]
    elif cfg["loss"] == "cross_entropy":
        shapes["labels"] = [T]
    else:
        shapes["target"] = [T, d_out]
    for n in ["y", "dy", "eval.y"]:   # Gaussian experts: the packed mixture E (1 + 2 d_out)
        shapes[n] = [T, last["experts"] * (1 + 2 * d_out) if last.get("expert") == "gaussian" else d_out]
    shapes["loss"] = shapes["aux_loss"] = [1]
    shapes["dx"] = [T, d_in]
    if not votes(cfg):                          # a vote has no inference backward: no eval.dx, eval.grad.*
        shapes["eval.dx"] = [T, d_in]
    for i, c in enumerate(cfg["layers"]):
        if c["kind"] == "moe":
            shapes["aux.%d" % i] = [4]
            shapes["stats.%d.tokens_per_expert" % i] = [c["experts"]]
            shapes["stats.%d.dropped_tokens" % i] = [1]
            if c["router"] == "noisy_topk":
                shapes["noise.%d" % i] = [T, c["experts"]]
            if c["router"] == "hierarchical":       # T*E expert noise, then T*G group noise
                shapes["noise.%d" % i] = [T * (c["experts"] + c["groups"])]
    for n, s in expected_params(cfg).items():
        shapes["grad." + n] = s
        if not votes(cfg):
            shapes["eval.grad." + n] = s
        for k in range(1, 6):
            shapes["step%d.%s" % (k, n)] = s
    for k in range(1, 6):
        shapes["step%d.loss" % k] = shapes["step%d.aux_loss" % k] = [1]
    return shapes


# ----------------------------------------------------------------------------------------------
# Naive model, token by token

def act(name, z):
    return {"identity": lambda v: v, "relu": torch.relu,
            "gelu": lambda v: 0.5 * v * (1 + torch.erf(v / math.sqrt(2))),
            "silu": lambda v: v / (1 + torch.exp(-v)), "tanh": torch.tanh,
            "sigmoid": lambda v: 1 / (1 + torch.exp(-v))}[name](z)


def softplus(z):
    return torch.where(z > 0, z + torch.log1p(torch.exp(-z)), torch.log1p(torch.exp(z)))


def expert(P, q, c, e, v):
    """Expert e of the stack at prefix q on one token v [D]."""
    b = c["bias"]
    if c["expert"] == "linear":
        return P[q + "fc0.weight"][e] @ v + (P[q + "fc0.bias"][e] if b else 0)
    if c["expert"] in ("mlp", "gaussian"):
        a = v
        L = c["hidden_layers"]
        for j in range(L):
            a = act(c["activation"], P[q + "fc%d.weight" % j][e] @ a
                    + (P[q + "fc%d.bias" % j][e] if b else 0))
        return P[q + "fc%d.weight" % L][e] @ a + (P[q + "fc%d.bias" % L][e] if b else 0)
    z1 = P[q + "w1.weight"][e] @ v + (P[q + "w1.bias"][e] if b else 0)
    z3 = P[q + "w3.weight"][e] @ v + (P[q + "w3.bias"][e] if b else 0)
    glu = {"swiglu": "silu", "geglu": "gelu"}[c["expert"]]
    return P[q + "w2.weight"][e] @ (act(glu, z1) * z3) + (P[q + "w2.bias"][e] if b else 0)


def cv2(v):
    m = sum(v) / len(v)
    var = sum((vi - m) ** 2 for vi in v) / len(v)
    return var / (m * m + 1e-10)


def votes(cfg):
    """A voting layer (README 3.4 step 6) makes the inference forward a vote: it has no backward."""
    return any(c.get("combine") in ("vote", "vote_majority") for c in cfg["layers"])


def combine(P, p, c, X, slots, keep, train=True):
    """Steps 5-6: slots[t] = [(expert, gate)], keep[t] = [kept?]; pass-through and shared experts."""
    Y, tokens_per_expert, dropped = [], [0] * c["experts"], 0
    E, O = c["experts"], c["d_out"]
    for t in range(len(X)):
        x = X[t]
        if c.get("combine") in ("vote", "vote_majority") and not train:
            # inference: every kept expert votes for its largest logit, the lower class on a tie
            count, weight = [0] * O, [0.0] * O
            for (e, g), kp in zip(slots[t], keep[t]):
                if kp:
                    f = [float(v) for v in expert(P, p + "experts.", c, e, x)]
                    best = 0
                    for j in range(1, O):
                        if f[j] > f[best]:
                            best = j
                    count[best] += 1
                    weight[best] += float(g)
                    tokens_per_expert[e] += 1
            if not any(keep[t]):
                dropped += 1
            G = sum(weight)
            if c["combine"] == "vote":
                Y.append(torch.tensor(weight))
            else:
                Y.append(torch.tensor([count[j] + (0.5 * weight[j] / G if G > 0 else 0.0) for j in range(O)]))
            continue
        if c["expert"] == "gaussian":          # README 3.6: (log pi | means | clamped log-stds)
            lp = [torch.tensor(-math.inf)] * E
            mu = [torch.zeros(O)] * E
            ls = [torch.zeros(O)] * E
            for (e, g), kp in zip(slots[t], keep[t]):
                f = expert(P, p + "experts.", c, e, x)
                lp[e] = torch.log(g)
                mu[e] = f[:O]
                ls[e] = torch.clamp(f[O:], -10.0, 10.0)
                tokens_per_expert[e] += 1
            Y.append(torch.cat([torch.stack(lp)] + mu + ls))
            continue
        routed = torch.zeros(c["d_out"])
        stack = c.get("combine") == "stack"
        parts = [torch.zeros(c.get("d_expert_out", 0))] * c["experts"]
        for (e, g), kp in zip(slots[t], keep[t]):
            if kp:
                if stack:
                    parts[e] = g * expert(P, p + "experts.", c, e, x)
                else:
                    routed = routed + g * expert(P, p + "experts.", c, e, x)
                tokens_per_expert[e] += 1
        if stack:                       # README: y = Wc [g_0 f_0(x), ..., g_E-1 f_E-1(x)] + bc
            routed = P[p + "combine.weight"] @ torch.cat(parts) + P[p + "combine.bias"]
        if not any(keep[t]):
            dropped += 1
            if not c["residual"] and c["d_out"] == c["d_in"]:
                routed = x + routed if stack else x
        y = x + routed if c["residual"] else routed
        for j in range(c["shared_experts"]):
            y = y + expert(P, p + "shared.", c, j, x)
        Y.append(y)
    return torch.stack(Y), tokens_per_expert, dropped


def splitmix(z):
    m = 2 ** 64 - 1
    z = (z + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def hash_experts(seed, layer, token_id, k, E):
    """README 3.5: draws c = 0, 1, ... of rng(seed, layer, id << 32 | c) mod E, repeats skipped."""
    got, draw = [], 0
    while len(got) < k:
        e = splitmix(splitmix(splitmix(seed) ^ layer) ^ (((token_id % 2 ** 32) << 32) | draw)) % E
        draw += 1
        if e not in got:
            got.append(e)
    return got


def moe_layer(P, i, c, X, train, noise, call):
    p = "layers.%d." % i
    T, E, D, O = len(X), c["experts"], c["d_in"], c["d_out"]
    router = c["router"]
    k = 1 if router == "switch" else (call.get("top_k") or c["top_k"])
    top_p = call.get("top_p", 0.0)
    if router in ("sigmoid", "expert_choice", "hash"):
        return other_router_layer(P, p, i, c, X, train, k, call)
    if router == "soft":
        return soft_layer(P, p, c, X)
    if router == "hierarchical":
        return hierarchical_layer(P, p, c, X, train, k, noise)
    cs, ss, hs, ps, chosen, gates = [], [], [], [], [], []
    for t in range(T):
        u = X[t]
        cl = P[p + "router.weight"] @ u + (P[p + "router.bias"] if c["router_bias"] else 0)
        if c["router"] == "noisy_topk":
            s = softplus(P[p + "router.noise_weight"] @ u)
            h = cl + noise[t] * s if train else cl
        else:
            s, h = None, cl
        pr = torch.exp(h - h.max())
        pr = pr / pr.sum()
        hv = [float(h[e]) for e in range(E)]
        ch = sorted(range(E), key=lambda e: (-hv[e], e))[:k]
        if top_p:                              # the shortest prefix whose probabilities reach top_p
            total, n = 0.0, 0
            while n < k and total < top_p:
                total += float(pr[ch[n]])
                n += 1
            ch = ch[:n]
        if c["renormalize"]:
            ex = [torch.exp(h[e] - h[ch[0]]) for e in ch]
            tot = sum(ex)
            g = [v / tot for v in ex]
        else:
            g = [pr[e] for e in ch]
        cs.append(cl); ss.append(s); hs.append(h); ps.append(pr); chosen.append(ch); gates.append(g)
    keep = [[True] * len(chosen[t]) for t in range(T)]
    if c["capacity_factor"] > 0:
        C = math.ceil(c["capacity_factor"] * T * k / E)
        held = [0] * E
        for sl in range(k):
            for t in range(T):
                if sl >= len(chosen[t]):
                    continue
                e = chosen[t][sl]
                if held[e] >= C:
                    keep[t][sl] = False
                else:
                    held[e] += 1
    Y, tokens_per_expert, dropped = combine(P, p, c, X, [list(zip(chosen[t], gates[t])) for t in range(T)], keep, train)
    load = [sum(ch.count(e) for ch in chosen) for e in range(E)]
    aux = [torch.zeros(()) for _ in range(4)]
    if train:
        if c["balance_loss"]:
            f = [load[e] / (T * k) for e in range(E)]
            Pm = [sum(ps[t][e] for t in range(T)) / T for e in range(E)]
            aux[0] = c["balance_loss"] * E * sum(f[e] * Pm[e] for e in range(E))
        if c["z_loss"]:
            aux[1] = c["z_loss"] * sum(torch.logsumexp(h, 0) ** 2 for h in hs) / T
        if c["importance_loss"]:
            I = [sum(gates[t][chosen[t].index(e)] if e in chosen[t] else torch.zeros(())
                     for t in range(T)) for e in range(E)]
            aux[2] = c["importance_loss"] * cv2(I)
        if c["load_loss"] and c["router"] == "noisy_topk" and k < E:
            load = [torch.zeros(()) for _ in range(E)]
            for t in range(T):
                h = hs[t]
                desc = sorted(range(E), key=lambda e: (-float(h[e]), e))
                th_in, th_out = h[desc[k]], h[desc[k - 1]]
                for e in range(E):
                    th = th_in if float(h[e]) > float(th_in) else th_out
                    z = (cs[t][e] - th) / ss[t][e]
                    load[e] = load[e] + 0.5 * (1 + torch.erf(z / math.sqrt(2)))
            aux[3] = c["load_loss"] * cv2(load)
    return Y, aux, (tokens_per_expert, dropped, load)


def other_router_layer(P, p, i, c, X, train, k, call):
    """Routers sigmoid, expert_choice and hash (README 3.5), token by token."""
    T, E, D, O = len(X), c["experts"], c["d_in"], c["d_out"]
    router = c["router"]
    slots = []                                 # per token: [(expert, gate)] in slot order
    hs, prs = [], []
    for t in range(T):
        if router == "hash":
            slots.append([(e, 1.0 / k) for e in hash_experts(c["hash_seed"], i, int(call["token_ids"][t]), k, E)])
            continue
        h = P[p + "router.weight"] @ X[t] + (P[p + "router.bias"] if c["router_bias"] else 0)
        hs.append(h)
        if router == "expert_choice":
            pr = torch.exp(h - h.max())
            prs.append(pr / pr.sum())
            continue
        sc = 1 / (1 + torch.exp(-h))
        q = [float(sc[e]) + float(P[p + "router.selection_bias"][e]) for e in range(E)]
        size = E // c["groups"]
        score = [sum(sorted(q[j * size:(j + 1) * size], reverse=True)[:2]) for j in range(c["groups"])]
        kept = sorted(range(c["groups"]), key=lambda j: (-score[j], j))[:c["top_k_groups"]]
        allowed = [e for e in range(E) if e // size in kept]
        ch = sorted(allowed, key=lambda e: (-q[e], e))[:k]
        tot = sum(sc[e] for e in ch)
        slots.append([(e, c["routed_scaling_factor"] * (sc[e] / tot if c["renormalize"] else sc[e])) for e in ch])
    load = [sum(1 for sl in slots for e, _ in sl if e == x) for x in range(E)]
    keep = [[True] * len(sl) for sl in slots]
    if router == "expert_choice":
        C = min(T, max(1, math.ceil(c["capacity_factor"] * T * k / E)))
        taken = [sorted(range(T), key=lambda t: (-float(prs[t][e]), t))[:C] for e in range(E)]
        slots = [[(e, prs[t][e]) for e in range(E) if t in taken[e]] for t in range(T)]
        keep = [[True] * len(sl) for sl in slots]
        load = [C] * E
    elif c["capacity_factor"] > 0:
        C = math.ceil(c["capacity_factor"] * T * k / E)
        held = [0] * E
        for sl in range(k):
            for t in range(T):
                if sl < len(slots[t]):
                    e = slots[t][sl][0]
                    keep[t][sl] = held[e] < C
                    held[e] += keep[t][sl]
    Y, tokens_per_expert, dropped = combine(P, p, c, X, slots, keep, train)
    aux = [torch.zeros(()) for _ in range(4)]
    if train and router == "expert_choice" and c["z_loss"]:
        aux[1] = c["z_loss"] * sum(torch.logsumexp(h, 0) ** 2 for h in hs) / T
    return Y, aux, (tokens_per_expert, dropped, load)


def softmax_list(vals):
    m = max(float(v) for v in vals)
    ex = [torch.exp(v - m) for v in vals]
    tot = sum(ex)
    return [v / tot for v in ex]


def soft_layer(P, p, c, X):
    """README 3.7, slot by slot: dispatch over a group's tokens, combine over a token's slots."""
    T, E, S = len(X), c["experts"], c["slots_per_expert"]
    L, m = E * S, c["soft_group_tokens"] or len(X)
    lg = [P[p + "router.weight"] @ X[t] for t in range(T)]
    Y = []
    for g0 in range(0, T, m):
        toks = list(range(g0, g0 + m))
        outs = []
        for j in range(L):
            w = softmax_list([lg[t][j] for t in toks])
            xs = sum(w[a] * X[t] for a, t in enumerate(toks))
            outs.append(expert(P, p + "experts.", c, j // S, xs))
        for t in toks:
            cmb = softmax_list([lg[t][j] for j in range(L)])
            y = sum(cmb[j] * outs[j] for j in range(L))
            Y.append(X[t] + y if c["residual"] else y)
    per = (T // m) * S
    return torch.stack(Y), [torch.zeros(()) for _ in range(4)], ([per] * E, 0, [per] * E)


def hierarchical_layer(P, p, c, X, train, k, noise):
    """README 3.7, token by token: groups by the group gate, then k experts inside each."""
    T, E, G, Kg = len(X), c["experts"], c["groups"], c["top_k_groups"]
    n, D = E // G, c["d_in"]
    slots, probs = [], []
    for t in range(T):
        u = X[t]
        a = P[p + "router.group.weight"] @ u + (P[p + "router.group.bias"] if c["router_bias"] else 0)
        if c["group_router"] == "noisy_topk" and train:
            a = a + noise[T * E + t * G:T * E + (t + 1) * G] * softplus(P[p + "router.group.noise_weight"] @ u)
        h = P[p + "router.weight"].reshape(E, D) @ u + (P[p + "router.bias"].reshape(E) if c["router_bias"] else 0)
        if c["expert_router"] == "noisy_topk" and train:
            h = h + noise[t * E:(t + 1) * E] * softplus(P[p + "router.noise_weight"].reshape(E, D) @ u)
        gp = softmax_list([a[q] for q in range(G)])
        pw = []
        for q in range(G):
            pw += softmax_list([h[e] for e in range(q * n, (q + 1) * n)])
        probs.append([gp[e // n] * pw[e] for e in range(E)])
        groups = sorted(range(G), key=lambda q: (-float(a[q]), q))[:Kg]
        gg = softmax_list([a[q] for q in groups]) if c["renormalize"] else [gp[q] for q in groups]
        sl = []
        for i, q in enumerate(groups):
            ch = sorted(range(q * n, (q + 1) * n), key=lambda e: (-float(h[e]), e))[:k]
            w = softmax_list([h[e] for e in ch]) if c["renormalize"] else [pw[e] for e in ch]
            sl += [(e, gg[i] * wj) for e, wj in zip(ch, w)]
        slots.append(sl)
    K = Kg * k
    keep = [[True] * K for _ in range(T)]
    if c["capacity_factor"] > 0:
        C = math.ceil(c["capacity_factor"] * T * K / E)
        held = [0] * E
        for s in range(K):
            for t in range(T):
                e = slots[t][s][0]
                keep[t][s] = held[e] < C
                held[e] += keep[t][s]
    Y, tokens_per_expert, dropped = combine(P, p, c, X, slots, keep, train)
    load = [sum(1 for sl in slots for e, _ in sl if e == x) for x in range(E)]
    aux = [torch.zeros(()) for _ in range(4)]
    if train and c["balance_loss"]:
        aux[0] = c["balance_loss"] * E * sum(load[e] / (T * K) * sum(probs[t][e] for t in range(T)) / T for e in range(E))
    if train and c["importance_loss"]:
        I = [sum(sum((g for e2, g in slots[t] if e2 == e), torch.zeros(())) for t in range(T)) for e in range(E)]
        aux[2] = c["importance_loss"] * cv2(I)
    return Y, aux, (tokens_per_expert, dropped, load)


def forward(cfg, P, x, train, noise, call):
    h, auxes, stats = x, {}, {}
    for i, c in enumerate(cfg["layers"]):
        p = "layers.%d." % i
        if c["kind"] == "dense":
            o = act(c["activation"], h @ P[p + "weight"].T + (P[p + "bias"] if c["bias"] else 0))
        elif c["kind"] == "rmsnorm":
            o = torch.stack([r / torch.sqrt((r * r).sum() / len(r) + c["eps"]) * P[p + "weight"]
                             for r in h])
        elif c["kind"] == "layernorm":
            rows = []
            for r in h:
                mu = r.sum() / len(r)
                var = ((r - mu) ** 2).sum() / len(r)
                rows.append((r - mu) / torch.sqrt(var + c["eps"]) * P[p + "weight"] + P[p + "bias"])
            o = torch.stack(rows)
        elif c["kind"] in ("multigate", "task_towers"):
            n, S, Et, gin, gout, D, O = slices(c)
            cs = dict(c, d_in=D, d_out=O)
            one = c["task_input"] == "single"
            rows = []
            for r in h:
                xs = [r[k * D:(k + 1) * D] for k in range(gin)]
                parts = []
                for g in range(gout):
                    mem = gate_members(c, g)
                    outs = [expert(P, p + b, cs, e, xs[0 if one else (n if b == "experts." else e // Et)]) for b, e in mem]
                    if len(mem) == 1:
                        parts.append(outs[0])
                    else:
                        z = P[p + "gates.%d.weight" % g] @ xs[0 if one else g]
                        w = torch.exp(z - z.max())
                        w = w / w.sum()
                        parts.append(sum(w[q] * outs[q] for q in range(len(mem))))
                rows.append(torch.cat(parts))
            o = torch.stack(rows)
        elif c["kind"] == "embedding":          # each row: the table rows of its ids, side by side
            o = torch.stack([torch.cat([P[p + "weight"][int(v)] for v in r]) for r in h])
        else:
            o, auxes[i], stats[i] = moe_layer(P, i, c, h, train, noise.get(i), call)
        if c["kind"] != "moe" and c["residual"]:
            o = h + o
        h = o
    return h, auxes, stats


def task_loss(kind, y, tgt, last):
    T = y.shape[0]
    if kind == "mixture_nll":                  # README 4, token by token, component by component
        E, O = last["experts"], last["d_out"]
        total = 0
        for t in range(T):
            terms = []
            for e in range(E):
                lv = y[t, e]
                for j in range(O):
                    mu, ls = y[t, E + e * O + j], y[t, E + E * O + e * O + j]
                    lv = lv - 0.5 * ((tgt[t, j] - mu) / torch.exp(ls)) ** 2 - ls - 0.5 * math.log(2 * math.pi)
                terms.append(lv)
            total = total - torch.logsumexp(torch.stack(terms), 0)
        return total / T
    if kind == "cross_entropy":
        return sum(torch.logsumexp(y[t], 0) - y[t, int(tgt[t])] for t in range(T)) / T
    if kind == "mse":
        return ((y - tgt) ** 2).sum() / y.numel()
    return (softplus(y) - tgt * y).sum() / y.numel()


def objectives(cfg, P, x, tgt, noise, call):
    y, auxes, stats = forward(cfg, P, x, True, noise, call)
    if "tasks" in cfg:      # README section 4: weighted sum over the output's task slices
        loss, off = torch.zeros(()), 0
        for t, tg in zip(cfg["tasks"], tgt):
            loss = loss + float(np.float32(t["weight"])) * task_loss(t["loss"], y[:, off:off + t["d_out"]], tg, None)
            off += t["d_out"]
    else:
        loss = task_loss(cfg["loss"], y, tgt, cfg["layers"][-1])
    aux = sum(sum(a) for a in auxes.values()) if auxes else torch.zeros(())
    return loss, aux, y, auxes, stats


# ----------------------------------------------------------------------------------------------

def close(name, got, want, rtol=2e-5, atol=2e-6):
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    err = np.abs(got - want) - (atol + rtol * np.abs(want))
    if got.size and err.max() > 0:
        j = int(err.argmax())
        raise AssertionError("%s mismatch at %d: %r vs %r" % (name, j, got.flat[j], want.flat[j]))


def check(path):
    meta, F = read_safetensors(path)
    cfg = json.loads(meta["moe.config"])
    T = F["x"].shape[0]
    shapes = expected_fixture(cfg, T, F)
    assert set(F) == set(shapes), (set(F) ^ set(shapes))
    for n, s in shapes.items():
        assert list(F[n].shape) == s, (n, F[n].shape, s)
        want = np.int32 if n in ("labels", "token_ids", "call.top_k") or n.endswith(".labels") else np.float32
        assert F[n].dtype == want, (n, F[n].dtype)
    names = list(expected_params(cfg))
    call = {}
    if "token_ids" in F:
        call["token_ids"] = [int(v) for v in F["token_ids"]]
    elif embeds(cfg):                           # README 3.5: each row's last id
        call["token_ids"] = [int(v) for v in F["x"][:, -1]]
    if "call.top_k" in F:
        call["top_k"] = int(F["call.top_k"][0])
    if "call.top_p" in F:
        call["top_p"] = float(F["call.top_p"][0])
    d = {n: torch.from_numpy(F[n].astype(np.float64)) for n in F if n not in ("labels", "token_ids", "call.top_k")}
    tgt = torch.from_numpy(F["labels"].astype(np.int64)) if "labels" in F else d.get("target")
    if "tasks" in cfg:
        tgt = [torch.from_numpy(F["task.%d.labels" % k].astype(np.int64)) if "task.%d.labels" % k in F
               else d["task.%d.target" % k] for k in range(len(cfg["tasks"]))]
    noise = {int(n.split(".")[1]): d[n] for n in d if n.startswith("noise.")}
    x0 = d["x"]
    P0 = {n: d[n] for n in names}

    def train_obj(P, x):
        l, a, *_ = objectives(cfg, P, x, tgt, noise, call)
        return l + a

    def eval_obj(P, x):
        return (forward(cfg, P, x, False, {}, call)[0] * d["dy"]).sum()

    # (2) forward values and autograd gradients of the naive model
    P = {n: v.clone().requires_grad_(True) for n, v in P0.items()}
    x = x0.clone().requires_grad_(True)
    loss, aux, y, auxes, stats = objectives(cfg, P, x, tgt, noise, call)
    gr = torch.autograd.grad(loss + aux, [x] + [P[n] for n in names], allow_unused=True)
    close("y", y.detach(), d["y"])
    close("loss", [float(loss)], d["loss"])
    close("aux_loss", [float(aux)], d["aux_loss"])
    for i, a in auxes.items():
        close("aux.%d" % i, [float(v) for v in a], d["aux.%d" % i])
        close("stats.%d.tokens_per_expert" % i, stats[i][0], d["stats.%d.tokens_per_expert" % i])
        close("stats.%d.dropped_tokens" % i, [stats[i][1]], d["stats.%d.dropped_tokens" % i])
    close("dx", torch.zeros_like(x0) if gr[0] is None else gr[0], d["dx"])
    for n, g in zip(names, gr[1:]):
        close("grad." + n, torch.zeros_like(P0[n]) if g is None else g, d["grad." + n])

    P = {n: v.clone().requires_grad_(True) for n, v in P0.items()}
    x = x0.clone().requires_grad_(True)
    ey = forward(cfg, P, x, False, {}, call)[0]
    close("eval.y", ey.detach(), d["eval.y"])
    if not votes(cfg):
        gr = torch.autograd.grad((ey * d["dy"]).sum(), [x] + [P[n] for n in names], allow_unused=True)
        close("eval.dx", torch.zeros_like(x0) if gr[0] is None else gr[0], d["eval.dx"])
        for n, g in zip(names, gr[1:]):
            close("eval.grad." + n, torch.zeros_like(P0[n]) if g is None else g, d["eval.grad." + n])

    # (3) finite differences on a few entries of every tensor
    rng = np.random.RandomState(0)
    eps = 1e-6
    nfd = 0
    for which, obj, prefix in [("train", train_obj, ""), ("eval", eval_obj, "eval.")][:1 if votes(cfg) else 2]:
        for n in ([] if embeds(cfg) else ["x"]) + names:   # token ids have no gradient
            base = x0 if n == "x" else P0[n]
            grad = d[prefix + ("dx" if n == "x" else "grad." + n)]
            for _ in range(3):
                j = rng.randint(base.numel())
                vals = []
                for sgn in (1, -1):
                    b = base.clone()
                    b.view(-1)[j] += sgn * eps
                    with torch.no_grad():
                        if n == "x":
                            vals.append(float(obj(P0, b)))
                        else:
                            Q = dict(P0)
                            Q[n] = b
                            vals.append(float(obj(Q, x0)))
                fd = (vals[0] - vals[1]) / (2 * eps)
                close("fd %s %s[%d]" % (which, n, j), [fd], [float(grad.view(-1)[j])],
                      rtol=1e-4, atol=1e-6)
                nfd += 1

    # (4) optimizer replay with torch.optim.AdamW
    o = cfg["optimizer"]
    assert o["kind"] == "adamw" and o["warmup_steps"] == 0 and o["total_steps"] == 0
    params = [P0[n].clone().requires_grad_(True) for n in names]
    # the selection biases are state: out of the optimizer, moved by the sign rule (README 3.5)
    opt = torch.optim.AdamW([q for n, q in zip(names, params) if not n.endswith("selection_bias")],
                            lr=o["lr"], betas=(o["beta1"], o["beta2"]), eps=o["eps"],
                            weight_decay=o["weight_decay"])
    clipped = 0
    for k in range(1, 6):
        opt.zero_grad()
        l, a, _, _, st = objectives(cfg, dict(zip(names, params)), x0, tgt, noise, call)
        close("step%d.loss" % k, [float(l)], d["step%d.loss" % k])
        close("step%d.aux_loss" % k, [float(a)], d["step%d.aux_loss" % k])
        (l + a).backward()
        for q in params:
            if q.grad is None:
                q.grad = torch.zeros_like(q)
        if o["clip_norm"] > 0:
            nrm = torch.nn.utils.clip_grad_norm_(params, o["clip_norm"])
            clipped += float(nrm) > o["clip_norm"]
        opt.step()
        with torch.no_grad():
            for n, q in zip(names, params):
                if n.endswith("router.selection_bias"):
                    i = int(n.split(".")[1])
                    load = st[i][2]
                    mean = sum(load) / len(load)
                    rate = float(np.float32(cfg["layers"][i]["bias_update_rate"]))
                    for e in range(len(load)):
                        step = rate if mean > load[e] else -rate if mean < load[e] else 0.0
                        q[e] = float(np.float32(float(q[e]) + step))
        for n, q in zip(names, params):
            close("step%d.%s" % (k, n), q.detach(), d["step%d.%s" % (k, n)], rtol=1e-5, atol=1e-6)
    return nfd, clipped


def main(argv):
    folder = argv[1] if len(argv) > 1 else os.path.dirname(os.path.abspath(__file__))
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    assert files, "no fixtures in " + folder
    bad = 0
    for f in files:
        try:
            nfd, clipped = check(f)
            print("ok    %-40s %4d finite differences%s" % (
                os.path.basename(f), nfd, ", clipped %d/5 steps" % clipped if clipped else ""))
        except Exception as e:   # report and go on
            bad += 1
            print("FAIL  %-40s %s: %s" % (os.path.basename(f), type(e).__name__, e))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
