"""RWKV-7 ("Goose", x070; the G1 models): the parameters and the math, written once.

Shapes: B batch, T tokens, C = n_embd, H heads of N = head_size (C = H * N), F = 4 C, and four
LoRA widths read from the checkpoint (decay Dw, in-context rate Da, value residual Dv, gate Dg:
64/64/32/128 at 0.1B-0.4B, 96/96/64/256 at 1.5B, ...). The state is two token shifts [C] and per
head one N x N matrix S[h] indexed [value i, key j] (the transpose of RWKV-5/6's).

Per token (the rwkv package's `RWKV_x070_TMix_one`):

    d = x_prev - x;  x_* = x + d * x_*                      # six static lerps (r, w, k, v, a, g)
    r, k, v = Wr x_r, Wk x_k, Wv x_v
    w = exp(-0.606531 * sigmoid(w0 + tanh(x_w W1) W2))       # decay in (0.545, 1) per channel
    a = sigmoid(a0 + (x_a A1) A2)                            # in-context learning rate
    g = sigmoid(x_g G1) G2                                   # the gate is a LoRA
    kk = normalize_per_head(k * k_k)                         # removal key, unit norm per head
    k = k * (1 + (a - 1) * k_a)                              # replacement key
    v = v + (v_first - v) * sigmoid(v0 + (x_v V1) V2)        # value residual (layer 0: v_first = v)
    S = S diag(w) - (S kk)(kk * a)^T + v k^T;  y = S r       # update first, then read
    y = GroupNorm_H(y) + (sum_per_head r * k * r_k) v        # r_k: the bonus' successor
    out = Wo (y * g)

The channel mix is `Wv relu(Wk (x + d * x_k))^2` (no receptance).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..wkv import WKV7
from .base import MatrixArchitecture, MatrixConfig, embedding_shape, head_shape, n_layer_of, require
from .common import MatrixBlock, MatrixStateLM, head_group_norm, squared_relu_ffn, token_shift

DECAY_SCALE = 0.606531  # exp(-0.5), as the rwkv package writes it: the decay is >= exp(-0.606531)
LERPS = ("r", "w", "k", "v", "a", "g")


@dataclass(frozen=True)
class RWKV7Config(MatrixConfig):
    decay_lora: int = 64   # w1 [C, Dw], w2 [Dw, C]
    iclr_lora: int = 64    # a1 [C, Da], a2 [Da, C]
    value_lora: int = 32   # v1 [C, Dv], v2 [Dv, C]
    gate_lora: int = 128   # g1 [C, Dg], g2 [Dg, C]

    def expected_shapes(self) -> dict[str, tuple]:
        return expected_shapes(self)


def lora_shapes(config: RWKV7Config) -> dict[str, tuple]:
    C = config.n_embd
    dims = {"w": config.decay_lora, "a": config.iclr_lora, "v": config.value_lora, "g": config.gate_lora}
    shapes = {}
    for name, D in dims.items():
        shapes[f"{name}1"], shapes[f"{name}2"] = (C, D), (D, C)
    return shapes


class TimeMix(nn.Module):
    def __init__(self, config: RWKV7Config, layer_id: int):
        super().__init__()
        C, H, N = config.n_embd, config.n_head, config.head_size
        self.n_head, self.head_size, self.layer_id = H, N, layer_id
        for m in LERPS:
            setattr(self, f"x_{m}", nn.Parameter(torch.empty(1, 1, C)))
        for name in ("w0", "a0", "v0", "k_k", "k_a"):
            setattr(self, name, nn.Parameter(torch.empty(1, 1, C)))
        for name, shape in lora_shapes(config).items():  # (layer 0 holds v0/v1/v2 but never uses them)
            setattr(self, name, nn.Parameter(torch.empty(shape)))
        self.r_k = nn.Parameter(torch.empty(H, N))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C)

    def decay(self, xw) -> torch.Tensor:
        """w_t: the memory's factor per token and channel, [B, T, C] in (0.545, 1)."""
        return torch.exp(-DECAY_SCALE * torch.sigmoid((self.w0 + torch.tanh(xw @ self.w1) @ self.w2).float()))

    def forward(self, x, previous_x, wkv_state, wkv, v_first, observe=None):
        """x: [B, T, C] the LN1 output; previous_x [B, C]; wkv_state [B, H, N, N] or None.
        v_first: layer 0's values [B, T, C] (None at layer 0, which returns its own for the layers
        above). Returns (out [B, T, C], the new wkv_state, v_first)."""
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        d = token_shift(x, previous_x) - x                                    # [B, T, C]
        xr, xw, xk, xv, xa, xg = (x + d * getattr(self, f"x_{m}") for m in LERPS)
        r, k, v = self.receptance(xr), self.key(xk), self.value(xv)          # [B, T, C]
        w = self.decay(xw)
        a = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)                 # [B, T, C]
        g = torch.sigmoid(xg @ self.g1) @ self.g2                             # [B, T, C]
        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1, p=2.0)      # [B, T, H, N]
        k = k * (1 + (a - 1) * self.k_a)
        if self.layer_id == 0:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)
        y, wkv_state = wkv.wkv7(r.view(B, T, H, N), w.view(B, T, H, N), k.view(B, T, H, N), v.view(B, T, H, N),
                                kk, a.view(B, T, H, N), wkv_state)            # [B, T, H, N]
        y = y.reshape(B, T, C)
        if observe is not None:
            for name, value in (("att_x", x), ("r", r), ("k", k), ("v", v), ("w", w), ("a", a),
                                ("kk", kk.reshape(B, T, C)), ("wkv", y)):
                observe(name, value)
        y = head_group_norm(y, H, self.ln_x.weight, self.ln_x.bias)
        bonus = (r * k * self.r_k.view(C)).view(B, T, H, N).sum(-1, keepdim=True) * v.view(B, T, H, N)
        y = y + bonus.view(B, T, C)
        return self.output(y * g), wkv_state, v_first


class ChannelMix(nn.Module):
    def __init__(self, n_embd: int, ffn_dim: int):
        super().__init__()
        self.x_k = nn.Parameter(torch.empty(1, 1, n_embd))
        self.key = nn.Linear(n_embd, ffn_dim, bias=False)
        self.value = nn.Linear(ffn_dim, n_embd, bias=False)

    def forward(self, x, previous_x):
        """x: [B, T, C] the LN2 output; previous_x [B, C]. Returns [B, T, C]."""
        return squared_relu_ffn(self.key, self.value, x + (token_shift(x, previous_x) - x) * self.x_k)


class RWKV7(MatrixStateLM):
    architecture = "rwkv7"
    fused_step_class = "RWKV7Step"

    def __init__(self, config: RWKV7Config):
        blocks = [MatrixBlock(i, config.n_embd, TimeMix(config, i), ChannelMix(config.n_embd, config.ffn_dim))
                  for i in range(config.n_layer)]
        super().__init__(config, blocks)


def expected_shapes(config: RWKV7Config) -> dict[str, tuple]:
    C, F_, V, H, N = config.n_embd, config.ffn_dim, config.vocab_size, config.n_head, config.head_size
    shapes = {"emb.weight": (V, C), "blocks.0.ln0.weight": (C,), "blocks.0.ln0.bias": (C,)}
    loras = lora_shapes(config)
    for i in range(config.n_layer):
        p = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            shapes[p + ln + ".weight"], shapes[p + ln + ".bias"] = (C,), (C,)
        for m in LERPS:
            shapes[p + f"att.x_{m}"] = (1, 1, C)
        for name in ("w0", "a0", "v0", "k_k", "k_a"):
            shapes[p + f"att.{name}"] = (1, 1, C)
        for name, shape in loras.items():
            shapes[p + f"att.{name}"] = shape
        shapes[p + "att.r_k"] = (H, N)
        for name in ("receptance", "key", "value", "output"):
            shapes[p + f"att.{name}.weight"] = (C, C)
        shapes[p + "att.ln_x.weight"], shapes[p + "att.ln_x.bias"] = (C,), (C,)
        shapes[p + "ffn.x_k"] = (1, 1, C)
        shapes[p + "ffn.key.weight"] = (F_, C)
        shapes[p + "ffn.value.weight"] = (C, F_)
    shapes.update({"ln_out.weight": (C,), "ln_out.bias": (C,), "head.weight": (V, C)})
    return shapes


class RWKV7Architecture(MatrixArchitecture):
    name, title = "rwkv7", "RWKV-7"
    fingerprint_keys = ("att.w0", "att.r_k")
    lora_suffixes = tuple(f"att.{n}{i}" for n in "wavg" for i in (1, 2))
    wkv = WKV7
    bonus_label = "r_k (RWKV-7's bonus: (Σ r·k·r_k) v)"

    def bonus_of(self, attention_module) -> torch.Tensor:
        return attention_module.r_k.reshape(attention_module.n_head, -1)

    def recognises(self, keys: set[str]) -> bool:
        return any(k.endswith("att.r_k") for k in keys)

    def config_from(self, tensors: dict[str, torch.Tensor]) -> RWKV7Config:
        vocab_size, n_embd = embedding_shape(tensors)
        n_head, head_size = head_shape(tensors, "blocks.0.att.r_k", n_embd)
        width = {name: int(require(tensors, f"blocks.0.att.{name}1", dims=2).shape[1]) for name in "wavg"}
        ffn_key = require(tensors, "blocks.0.ffn.key.weight", dims=2)
        return RWKV7Config(n_layer=n_layer_of(tensors), n_embd=n_embd, vocab_size=vocab_size,
                           ffn_dim=int(ffn_key.shape[0]), n_head=n_head, head_size=head_size,
                           decay_lora=width["w"], iclr_lora=width["a"], value_lora=width["v"], gate_lora=width["g"])

    def expected_shapes(self, config: RWKV7Config) -> dict[str, tuple]:
        return expected_shapes(config)

    def build(self, config: RWKV7Config) -> RWKV7:
        return RWKV7(config)

    def describe(self, config: RWKV7Config) -> dict:
        return {**super().describe(config), "lora": {"decay": config.decay_lora, "iclr": config.iclr_lora,
                                                     "value": config.value_lora, "gate": config.gate_lora}}


ARCHITECTURE = RWKV7Architecture()
