#!/usr/bin/python3
"""Hugging Face MoE block fixtures for moe.h's importer (moe_layer_import_hf, `moe import`).

Usage:

    /usr/bin/python3 tests/ref/gen_hf.py [outdir]

For each case (mixtral, qwen2_moe, deepseek_v3) it writes, into `outdir` (default: tests/ref/hf/,
a folder of its own, so that the tools that walk tests/ref/*.safetensors never see these files):

    <case>.safetensors        a checkpoint fragment with the block under Hugging Face's names
                              (plus a few unrelated tensors the importer must skip)
    <case>.config.json        the model's config.json (the keys the block's equations read)
    <case>.io.safetensors     x [T, d] (F32), the block's output y [T, d], and for the objective
                              sum(y * dy) with the stored dy [T, d]: dx and grad.<name> for every
                              tensor of the block, <name> relative to the block prefix (all F32)

The blocks are written here from the models' published equations, not from moe.h or its README:

    Mixtral     p = softmax(x Wg^T); the top k of p, divided by their sum;
                y = sum_j p_j * w2_j(silu(w1_j x) * w3_j x)
    Qwen2-MoE   the same router, renormalised only with norm_topk_prob; plus
                sigmoid(x . shared_expert_gate) * shared_expert(x)
    DeepSeek-V3 s = sigmoid(x Wg^T); selection by s + e_score_correction_bias: groups ranked by the
                sum of their two largest biased scores, the topk_group best kept, then the top k
                experts of those; weights s (not biased) of the chosen, divided by their sum when
                norm_topk_prob, times routed_scaling_factor; plus shared_experts(x), one SwiGLU MLP
                of width n_shared_experts * moe_intermediate_size.

The mixtral case stores the expert weights in BF16, the qwen2_moe case its shared expert in F16;
the reference uses the rounded values. Everything is computed in float64. Tokens whose routing is
within MARGIN of a tie (k-th vs (k+1)-th selection key, or the group cut) are skipped, so a
float32 implementation makes the same choices. Deterministic: the same torch gives the same bytes.
The `safetensors` package is not used: the format is written by hand.
"""

import json
import os
import struct
import sys

import numpy as np
import torch

MARGIN = 1e-4


def save(path, tensors):
    """tensors: list of (name, dtype "F32" | "BF16" | "F16", float64 tensor). Returns the values as stored."""
    header, blobs, off, used = {}, [], 0, {}
    for name, dtype, t in tensors:
        t32 = t.to(torch.float32).contiguous()
        if dtype == "F32":
            raw, back = t32.numpy().tobytes(), t32
        elif dtype == "BF16":
            b = t32.to(torch.bfloat16)
            raw, back = b.view(torch.int16).numpy().tobytes(), b.to(torch.float32)
        elif dtype == "F16":
            h = t32.numpy().astype(np.float16)
            raw, back = h.tobytes(), torch.from_numpy(h.astype(np.float32))
        else:
            raise ValueError(dtype)
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
        used[name] = back.to(torch.float64)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for raw in blobs:
            f.write(raw)
    return used


def uniform(g, shape, bound):
    return (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * bound


def swiglu(x, w1, w3, w2):
    a = x @ w1.T
    return (a * torch.sigmoid(a) * (x @ w3.T)) @ w2.T


def gap_ok(keys, k):
    """The k-th and (k+1)-th largest keys differ by more than MARGIN."""
    v = torch.sort(keys, descending=True).values
    return k >= len(v) or float(v[k - 1] - v[k]) > MARGIN


def softmax_block(x, W, experts, k, norm):
    p = torch.softmax(x @ W["gate"].T, dim=-1)
    rows, ok = [], []
    for t in range(x.shape[0]):
        ok.append(gap_ok(p[t].detach(), k))
        val, idx = torch.topk(p[t], k)
        if norm:
            val = val / val.sum()
        rows.append(sum(val[j] * swiglu(x[t], *experts[int(idx[j])]) for j in range(k)))
    return torch.stack(rows), ok


def deepseek_block(x, W, experts, k, n_group, topk_group, norm, scale):
    s = torch.sigmoid(x @ W["gate"].T)
    biased = (s + W["bias"]).detach()  # the selection keys: they choose, they carry no gradient
    E = s.shape[1]
    rows, ok = [], []
    for t in range(x.shape[0]):
        groups = biased[t].view(n_group, E // n_group)
        gscore = torch.topk(groups, 2, dim=-1).values.sum(-1)
        keep = torch.topk(gscore, topk_group).indices
        mask = torch.full((E,), float("-inf"), dtype=torch.float64)
        for gi in keep.tolist():
            mask[gi * (E // n_group):(gi + 1) * (E // n_group)] = 0.0
        key = biased[t] + mask
        ok.append(gap_ok(gscore, topk_group) and gap_ok(key, k))
        idx = torch.topk(key, k).indices
        w = s[t][idx]
        if norm:
            w = w / (w.sum() + 1e-20)
        w = w * scale
        rows.append(sum(w[j] * swiglu(x[t], *experts[int(idx[j])]) for j in range(k)))
    return torch.stack(rows), ok


def pick_tokens(make_x, block, T):
    """T input rows whose routing has margin (drawn in batches, kept in order)."""
    rows, outs = [], []
    while len(rows) < T:
        x = make_x()
        y, ok = block(x)
        for t in range(x.shape[0]):
            if ok[t] and len(rows) < T:
                rows.append(x[t])
                outs.append(y[t])
    return torch.stack(rows), torch.stack(outs)


def case_mixtral(g):
    d, h, E, k, T, layer = 8, 12, 4, 2, 10, 1
    P = "model.layers.%d.block_sparse_moe." % layer
    tensors = [("model.embed_tokens.weight", "F32", uniform(g, (5, d), 1.0)),
               ("model.layers.%d.input_layernorm.weight" % layer, "F32", torch.ones(d, dtype=torch.float64)),
               (P + "gate.weight", "F32", uniform(g, (E, d), 1.0))]
    for e in range(E):
        for name, shape in (("w1", (h, d)), ("w2", (d, h)), ("w3", (h, d))):
            tensors.append((P + "experts.%d.%s.weight" % (e, name), "BF16", uniform(g, shape, shape[1] ** -0.5)))
    config = {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "hidden_size": d,
              "intermediate_size": h, "num_local_experts": E, "num_experts_per_tok": k, "hidden_act": "silu",
              "num_hidden_layers": 2, "rope_scaling": None, "router_jitter_noise": 0.0}
    return tensors, config, P, (d, T), lambda W: (
        lambda x: softmax_block(x, {"gate": W[P + "gate.weight"]},
                                [tuple(W[P + "experts.%d.%s.weight" % (e, n)] for n in ("w1", "w3", "w2")) for e in range(E)], k, True))


def case_qwen2_moe(g):
    d, h, hs, E, k, T, layer = 8, 6, 10, 6, 2, 10, 0
    P = "model.layers.%d.mlp." % layer
    tensors = [(P + "gate.weight", "F32", uniform(g, (E, d), 1.0))]
    for e in range(E):
        for name, shape in (("gate_proj", (h, d)), ("up_proj", (h, d)), ("down_proj", (d, h))):
            tensors.append((P + "experts.%d.%s.weight" % (e, name), "F32", uniform(g, shape, shape[1] ** -0.5)))
    for name, shape in (("gate_proj", (hs, d)), ("up_proj", (hs, d)), ("down_proj", (d, hs))):
        tensors.append((P + "shared_expert.%s.weight" % name, "F16", uniform(g, shape, shape[1] ** -0.5)))
    tensors.append((P + "shared_expert_gate.weight", "F32", uniform(g, (1, d), 1.0)))
    tensors.append(("model.norm.weight", "F32", torch.ones(d, dtype=torch.float64)))
    config = {"model_type": "qwen2_moe", "hidden_size": d, "moe_intermediate_size": h,
              "shared_expert_intermediate_size": hs, "num_experts": E, "num_experts_per_tok": k,
              "norm_topk_prob": False, "hidden_act": "silu", "decoder_sparse_step": 1, "mlp_only_layers": []}

    def block(W):
        def run(x):
            y, ok = softmax_block(x, {"gate": W[P + "gate.weight"]},
                                  [tuple(W[P + "experts.%d.%s.weight" % (e, n)] for n in ("gate_proj", "up_proj", "down_proj"))
                                   for e in range(E)], k, False)
            shared = swiglu(x, *(W[P + "shared_expert.%s.weight" % n] for n in ("gate_proj", "up_proj", "down_proj")))
            return y + torch.sigmoid(x @ W[P + "shared_expert_gate.weight"].T) * shared, ok
        return run
    return tensors, config, P, (d, T), block


def case_deepseek_v3(g):
    d, h, E, k, T, n_group, topk_group, n_shared, scale = 8, 4, 8, 2, 12, 4, 2, 2, 2.5
    P = "model.layers.1.mlp."
    tensors = []
    for name, shape in (("gate_proj", (16, d)), ("up_proj", (16, d)), ("down_proj", (d, 16))):  # layer 0: dense MLP
        tensors.append(("model.layers.0.mlp.%s.weight" % name, "F32", uniform(g, shape, shape[1] ** -0.5)))
    tensors.append((P + "gate.weight", "F32", uniform(g, (E, d), 1.0)))
    tensors.append((P + "gate.e_score_correction_bias", "F32", uniform(g, (E,), 0.3)))
    for e in range(E):
        for name, shape in (("gate_proj", (h, d)), ("up_proj", (h, d)), ("down_proj", (d, h))):
            tensors.append((P + "experts.%d.%s.weight" % (e, name), "F32", uniform(g, shape, shape[1] ** -0.5)))
    hs = n_shared * h
    for name, shape in (("gate_proj", (hs, d)), ("up_proj", (hs, d)), ("down_proj", (d, hs))):
        tensors.append((P + "shared_experts.%s.weight" % name, "F32", uniform(g, shape, shape[1] ** -0.5)))
    config = {"model_type": "deepseek_v3", "hidden_size": d, "moe_intermediate_size": h, "intermediate_size": 16,
              "n_routed_experts": E, "num_experts_per_tok": k, "n_group": n_group, "topk_group": topk_group,
              "norm_topk_prob": True, "routed_scaling_factor": scale, "n_shared_experts": n_shared,
              "first_k_dense_replace": 1, "moe_layer_freq": 1, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
              "hidden_act": "silu"}

    def block(W):
        def run(x):
            y, ok = deepseek_block(x, {"gate": W[P + "gate.weight"], "bias": W[P + "gate.e_score_correction_bias"]},
                                   [tuple(W[P + "experts.%d.%s.weight" % (e, n)] for n in ("gate_proj", "up_proj", "down_proj"))
                                    for e in range(E)], k, n_group, topk_group, True, scale)
            return y + swiglu(x, *(W[P + "shared_experts.%s.weight" % n] for n in ("gate_proj", "up_proj", "down_proj"))), ok
        return run
    return tensors, config, P, (d, T), block


CASES = [("mixtral", case_mixtral), ("qwen2_moe", case_qwen2_moe), ("deepseek_v3", case_deepseek_v3)]


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf")
    for i, (name, make) in enumerate(CASES):
        g = torch.Generator().manual_seed(1000 + i)
        tensors, config, prefix, (d, T), block = make(g)
        W = save(os.path.join(out, "%s.safetensors" % name), tensors)
        with open(os.path.join(out, "%s.config.json" % name), "w") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
        run = block(W)
        # inputs are float32 values, so the C side reads exactly these
        with torch.no_grad():
            x, _ = pick_tokens(lambda: uniform(g, (2 * T, d), 2.0).to(torch.float32).to(torch.float64), run, T)
        dy = uniform(g, (T, d), 1.0).to(torch.float32).to(torch.float64)
        x.requires_grad_(True)
        for t in W.values():
            t.requires_grad_(True)
        y, _ = run(x)
        (y * dy).sum().backward()
        io = [("x", "F32", x.detach()), ("y", "F32", y.detach()), ("dy", "F32", dy), ("dx", "F32", x.grad)]
        io += [("grad." + n[len(prefix):], "F32", t.grad if t.grad is not None else torch.zeros_like(t))
               for n, t in W.items() if n.startswith(prefix)]
        save(os.path.join(out, "%s.io.safetensors" % name), io)
        print("%s: block %s, T=%d, |y|max=%.3f" % (name, prefix, T, float(y.abs().max())))


if __name__ == "__main__":
    main()
