"""An independent float64 numpy forward of RWKV-5.2, RWKV-6 and RWKV-7, one token at a time, from a
checkpoint's tensors (written from ../shared/docs/rwkv5-7.md section 3, not from the engine's code).
The inspector's views and experiments are tested against it; it is itself checked against the
engine (tests/test_matrix_inspection.py).

`forward(arch, weights, tokens, state=None, edit=None)` returns (logits [T, V], observations, state):
observations[name] is [T, L, C] for r, k, v, w (decay factor), wkv (the recurrence's output before
the group norm), and kk, a for v7; "S" is [T, L, H, N, N] (the state after each token; v7 [value,
key], v5/v6 [key, value]). state: {"att_x" [L, C], "S" [L, H, N, N], "ffn_x" [L, C]}.
edit(t, state) may change the state in place just after token t is read (patching tests);
decay_edit(t, layer, w) may return another decay factor [C] for token t in that layer.
"""

from __future__ import annotations

import numpy as np

LN_EPS, GN_EPS = 1e-5, 64e-5


def layer_norm(x, w, b, eps=LN_EPS):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def group_norm(y, H, w, b):
    g = y.reshape(H, -1)
    mu = g.mean(-1, keepdims=True)
    var = ((g - mu) ** 2).mean(-1, keepdims=True)
    return ((g - mu) / np.sqrt(var + GN_EPS)).reshape(-1) * w + b


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def silu(x):
    return x * sigmoid(x)


def n_layers(W):
    return 1 + max(int(k.split(".")[1]) for k in W if k.startswith("blocks."))


def empty_state(W, H):
    L, C = n_layers(W), W["emb.weight"].shape[1]
    return {"att_x": np.zeros((L, C)), "S": np.zeros((L, H, C // H, C // H)), "ffn_x": np.zeros((L, C))}


def forward(arch, weights, tokens, n_head, state=None, edit=None, decay_edit=None):
    W = {k: v.double().numpy().squeeze() if v.dim() == 3 else v.double().numpy() for k, v in weights.items()}
    L, H = n_layers(W), n_head
    C = W["emb.weight"].shape[1]
    N = C // H
    st = {k: v.astype(np.float64).copy() for k, v in (state or empty_state(W, H)).items()}
    names = ["r", "k", "v", "w", "wkv"] + (["kk", "a"] if arch == "rwkv7" else [])
    obs = {n: np.zeros((len(tokens), L, C)) for n in names}
    obs["S"] = np.zeros((len(tokens), L, H, N, N))
    logits = []
    for t, token in enumerate(tokens):
        x = layer_norm(W["emb.weight"][token], W["blocks.0.ln0.weight"], W["blocks.0.ln0.bias"])
        v_first = None
        for i in range(L):
            p = f"blocks.{i}."
            xa = layer_norm(x, W[p + "ln1.weight"], W[p + "ln1.bias"])
            prev = st["att_x"][i]
            S = st["S"][i]
            fix = (lambda w, t=t, i=i: decay_edit(t, i, w)) if decay_edit else (lambda w: w)
            if arch == "rwkv7":
                out, S, v_first, seen = _tmix_v7(W, p, xa, prev, S, H, N, v_first, i, fix)
            elif arch == "rwkv6":
                out, S, seen = _tmix_v6(W, p, xa, prev, S, H, N, fix)
            else:
                out, S, seen = _tmix_v5(W, p, xa, prev, S, H, N, fix)
            for n in names:
                obs[n][t, i] = seen[n]
            st["att_x"][i], st["S"][i] = xa, S
            obs["S"][t, i] = S
            x = x + out
            xf = layer_norm(x, W[p + "ln2.weight"], W[p + "ln2.bias"])
            x = x + _cmix(W, p, xf, st["ffn_x"][i], arch)
            st["ffn_x"][i] = xf
        if edit is not None:
            edit(t, st)
        logits.append(W["head.weight"] @ layer_norm(x, W["ln_out.weight"], W["ln_out.bias"]))
    return np.stack(logits), obs, st


def _cmix(W, p, x, prev, arch):
    if arch == "rwkv7":
        xk = x + (prev - x) * W[p + "ffn.x_k"]
        return W[p + "ffn.value.weight"] @ np.maximum(W[p + "ffn.key.weight"] @ xk, 0) ** 2
    if arch == "rwkv6":
        xk = x + (prev - x) * W[p + "ffn.time_maa_k"]
        xr = x + (prev - x) * W[p + "ffn.time_maa_r"]
    else:
        xk = prev + W[p + "ffn.time_mix_k"] * (x - prev)
        xr = prev + W[p + "ffn.time_mix_r"] * (x - prev)
    kv = W[p + "ffn.value.weight"] @ np.maximum(W[p + "ffn.key.weight"] @ xk, 0) ** 2
    return sigmoid(W[p + "ffn.receptance.weight"] @ xr) * kv


def _read_decay_v5(S, r, k, v, w, u, H, N):
    """y = r^T (diag(u) k v^T + S); S <- k v^T + diag(w) S, per head, S [key, value]."""
    y = np.zeros(H * N)
    S = S.copy()
    for h in range(H):
        sl = slice(h * N, (h + 1) * N)
        kv = np.outer(k[sl], v[sl])
        y[sl] = r[sl] @ (u[h][:, None] * kv + S[h])
        S[h] = kv + w[sl][:, None] * S[h]
    return y, S


def _tmix_v5(W, p, x, prev, S, H, N, fix):
    mix = lambda name: prev + W[p + f"att.time_mix_{name}"] * (x - prev)  # noqa: E731
    r, k, v = (W[p + f"att.{n}.weight"] @ mix(n[0]) for n in ("receptance", "key", "value"))
    w = np.exp(-np.exp(W[p + "att.time_decay"])).reshape(-1)
    w = fix(np.broadcast_to(w, (H * N,)) if w.size == H * N else np.repeat(w, N))
    u = W[p + "att.time_faaaa"].reshape(H, N)
    y, S = _read_decay_v5(S, r, k, v, w, u, H, N)
    g = silu(W[p + "att.gate.weight"] @ mix("g"))
    out = W[p + "att.output.weight"] @ (group_norm(y, H, W[p + "att.ln_x.weight"], W[p + "att.ln_x.bias"]) * g)
    return out, S, {"r": r, "k": k, "v": v, "w": w, "wkv": y}


def _tmix_v6(W, p, x, prev, S, H, N, fix):
    d = prev - x
    xxx = x + d * W[p + "att.time_maa_x"]
    lora = np.tanh(xxx @ W[p + "att.time_maa_w1"]).reshape(5, -1)
    m = {name: lora[j] @ W[p + "att.time_maa_w2"][j] for j, name in enumerate("wkvrg")}
    xs = {name: x + d * (W[p + f"att.time_maa_{name}"] + m[name]) for name in "wkvrg"}
    r = W[p + "att.receptance.weight"] @ xs["r"]
    k = W[p + "att.key.weight"] @ xs["k"]
    v = W[p + "att.value.weight"] @ xs["v"]
    w = np.exp(-np.exp(W[p + "att.time_decay"] + np.tanh(xs["w"] @ W[p + "att.time_decay_w1"])
                       @ W[p + "att.time_decay_w2"]))
    w = fix(w)
    y, S = _read_decay_v5(S, r, k, v, w, W[p + "att.time_faaaa"].reshape(H, N), H, N)
    g = silu(W[p + "att.gate.weight"] @ xs["g"])
    out = W[p + "att.output.weight"] @ (group_norm(y, H, W[p + "att.ln_x.weight"], W[p + "att.ln_x.bias"]) * g)
    return out, S, {"r": r, "k": k, "v": v, "w": w, "wkv": y}


def _tmix_v7(W, p, x, prev, S, H, N, v_first, layer, fix):
    d = prev - x
    xs = {m: x + d * W[p + f"att.x_{m}"] for m in "rwkvag"}
    r = W[p + "att.receptance.weight"] @ xs["r"]
    k = W[p + "att.key.weight"] @ xs["k"]
    v = W[p + "att.value.weight"] @ xs["v"]
    w = fix(np.exp(-0.606531 * sigmoid(W[p + "att.w0"] + np.tanh(xs["w"] @ W[p + "att.w1"]) @ W[p + "att.w2"])))
    a = sigmoid(W[p + "att.a0"] + (xs["a"] @ W[p + "att.a1"]) @ W[p + "att.a2"])
    g = sigmoid(xs["g"] @ W[p + "att.g1"]) @ W[p + "att.g2"]
    kk = (k * W[p + "att.k_k"]).reshape(H, N)
    kk = (kk / np.maximum(np.linalg.norm(kk, axis=1, keepdims=True), 1e-12)).reshape(-1)
    k = k * (1 + (a - 1) * W[p + "att.k_a"])
    if layer == 0:
        v_first = v
    else:
        v = v + (v_first - v) * sigmoid(W[p + "att.v0"] + (xs["v"] @ W[p + "att.v1"]) @ W[p + "att.v2"])
    S = S.copy()
    y = np.zeros(H * N)
    for h in range(H):
        sl = slice(h * N, (h + 1) * N)
        S[h] = S[h] * w[sl][None] - np.outer(S[h] @ kk[sl], kk[sl] * a[sl]) + np.outer(v[sl], k[sl])
        y[sl] = S[h] @ r[sl]
    r_k = W[p + "att.r_k"].reshape(H, N)
    bonus = np.concatenate([(r[h * N:(h + 1) * N] * k[h * N:(h + 1) * N] * r_k[h]).sum() * v[h * N:(h + 1) * N]
                            for h in range(H)])
    out = W[p + "att.output.weight"] @ ((group_norm(y, H, W[p + "att.ln_x.weight"], W[p + "att.ln_x.bias"])
                                        + bonus) * g)
    return out, S, v_first, {"r": r, "k": k, "v": v, "w": w, "wkv": y, "kk": kk, "a": a}
