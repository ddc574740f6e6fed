"""RWKV-6 ("Finch", x060): the parameters and the math, written once.

Shapes: B batch, T tokens, C = n_embd, H heads of N = head_size (C = H * N), F = ffn_dim,
D_mix / D_decay the widths of the two LoRAs (read from the checkpoint: 32 / 64 for 1.6B-3B,
64 / 128 for 7B-14B). The state is RWKV-5's: two token shifts [C] and per head S[h] [key, value].

What RWKV-6 adds to RWKV-5, per token (the rwkv package's `att_one_v6_0`):

    d = x_prev - x                                     # the token shift as a difference
    m_w, m_k, m_v, m_r, m_g = tanh((x + d*maa_x) W1) W2  # "ddlerp": five data-dependent mixes
    x_* = x + d * (time_maa_* + m_*)
    w_t = exp(-exp(time_decay + tanh(x_w Wd1) Wd2))    # a decay per token and channel
    y = r^T (diag(u) k v^T + S);  S = k v^T + diag(w_t) S;  out = Wo (GroupNorm_H(y) * silu(Wg x_g))

The channel mix mixes with `x + d * time_maa_{k,r}` and is otherwise RWKV-4's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import MatrixArchitecture, MatrixConfig, embedding_shape, head_shape, n_layer_of, require
from .common import MatrixBlock, MatrixStateLM, head_group_norm, squared_relu_ffn, token_shift
from ..errors import LoadError
from ..wkv import WKV5

MIXES = ("w", "k", "v", "r", "g")  # the order of the five ddlerp outputs in time_maa_w2


@dataclass(frozen=True)
class RWKV6Config(MatrixConfig):
    mix_lora: int = 32     # D_mix: time_maa_w1 [C, 5 D_mix], time_maa_w2 [5, D_mix, C]
    decay_lora: int = 64   # D_decay: time_decay_w1 [C, D_decay], time_decay_w2 [D_decay, C]

    def expected_shapes(self) -> dict[str, tuple]:
        return expected_shapes(self)


class TimeMix(nn.Module):
    def __init__(self, config: RWKV6Config):
        super().__init__()
        C, H, N = config.n_embd, config.n_head, config.head_size
        self.n_head, self.head_size = H, N
        self.time_maa_x = nn.Parameter(torch.empty(1, 1, C))
        for m in MIXES:
            setattr(self, f"time_maa_{m}", nn.Parameter(torch.empty(1, 1, C)))
        self.time_maa_w1 = nn.Parameter(torch.empty(C, 5 * config.mix_lora))
        self.time_maa_w2 = nn.Parameter(torch.empty(5, config.mix_lora, C))
        self.time_decay = nn.Parameter(torch.empty(1, 1, C))  # the decay's static part
        self.time_decay_w1 = nn.Parameter(torch.empty(C, config.decay_lora))
        self.time_decay_w2 = nn.Parameter(torch.empty(config.decay_lora, C))
        self.time_faaaa = nn.Parameter(torch.empty(H, N))  # u, the current token's bonus
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.gate = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C)

    def mixes(self, x, d):
        """The five ddlerp inputs x_w, x_k, x_v, x_r, x_g: [B, T, C] each."""
        B, T, C = x.shape
        xxx = x + d * self.time_maa_x
        lora = torch.tanh(xxx @ self.time_maa_w1).view(B * T, 5, -1).transpose(0, 1)  # [5, BT, D_mix]
        m = torch.bmm(lora, self.time_maa_w2).view(5, B, T, C)                       # [5, B, T, C]
        return [x + d * (getattr(self, f"time_maa_{name}") + m[i]) for i, name in enumerate(MIXES)]

    def decay(self, xw) -> torch.Tensor:
        """w_t: the memory's factor per token and channel, [B, T, C] in (0, 1)."""
        return torch.exp(-torch.exp(self.time_decay.float() + torch.tanh(xw @ self.time_decay_w1) @ self.time_decay_w2))

    def forward(self, x, previous_x, wkv_state, wkv, v_first, observe=None):
        """x: [B, T, C] the LN1 output; previous_x [B, C]; wkv_state [B, H, N, N] or None."""
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        d = token_shift(x, previous_x) - x                                    # [B, T, C]
        xw, xk, xv, xr, xg = self.mixes(x, d)
        r, k, v = self.receptance(xr), self.key(xk), self.value(xv)          # [B, T, C]
        w = self.decay(xw)
        y, wkv_state = wkv.wkv5(r.view(B, T, H, N), k.view(B, T, H, N), v.view(B, T, H, N),
                                w.view(B, T, H, N), self.time_faaaa.float(), wkv_state)
        y = y.reshape(B, T, C)
        if observe is not None:
            for name, value in (("att_x", x), ("r", r), ("k", k), ("v", v), ("w", w), ("wkv", y)):
                observe(name, value)
        y = head_group_norm(y, H, self.ln_x.weight, self.ln_x.bias) * F.silu(self.gate(xg))
        return self.output(y), wkv_state, v_first  # (v_first: RWKV-7 only, passed through)


class ChannelMix(nn.Module):
    def __init__(self, n_embd: int, ffn_dim: int):
        super().__init__()
        self.time_maa_k = nn.Parameter(torch.empty(1, 1, n_embd))
        self.time_maa_r = nn.Parameter(torch.empty(1, 1, n_embd))
        self.key = nn.Linear(n_embd, ffn_dim, bias=False)
        self.receptance = nn.Linear(n_embd, n_embd, bias=False)
        self.value = nn.Linear(ffn_dim, n_embd, bias=False)

    def forward(self, x, previous_x):
        """x: [B, T, C] the LN2 output; previous_x [B, C]. Returns [B, T, C]."""
        d = token_shift(x, previous_x) - x
        r = torch.sigmoid(self.receptance(x + d * self.time_maa_r))           # [B, T, C]
        return r * squared_relu_ffn(self.key, self.value, x + d * self.time_maa_k)


class RWKV6(MatrixStateLM):
    architecture = "rwkv6"
    fused_step_class = "RWKV6Step"

    def __init__(self, config: RWKV6Config):
        blocks = [MatrixBlock(i, config.n_embd, TimeMix(config), ChannelMix(config.n_embd, config.ffn_dim))
                  for i in range(config.n_layer)]
        super().__init__(config, blocks)


def expected_shapes(config: RWKV6Config) -> dict[str, tuple]:
    C, F_, V, H, N = config.n_embd, config.ffn_dim, config.vocab_size, config.n_head, config.head_size
    shapes = {"emb.weight": (V, C), "blocks.0.ln0.weight": (C,), "blocks.0.ln0.bias": (C,)}
    for i in range(config.n_layer):
        p = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            shapes[p + ln + ".weight"], shapes[p + ln + ".bias"] = (C,), (C,)
        for m in ("x",) + MIXES:
            shapes[p + f"att.time_maa_{m}"] = (1, 1, C)
        shapes[p + "att.time_maa_w1"] = (C, 5 * config.mix_lora)
        shapes[p + "att.time_maa_w2"] = (5, config.mix_lora, C)
        shapes[p + "att.time_decay"] = (1, 1, C)
        shapes[p + "att.time_decay_w1"] = (C, config.decay_lora)
        shapes[p + "att.time_decay_w2"] = (config.decay_lora, C)
        shapes[p + "att.time_faaaa"] = (H, N)
        for name in ("receptance", "key", "value", "gate", "output"):
            shapes[p + f"att.{name}.weight"] = (C, C)
        shapes[p + "att.ln_x.weight"], shapes[p + "att.ln_x.bias"] = (C,), (C,)
        shapes[p + "ffn.time_maa_k"], shapes[p + "ffn.time_maa_r"] = (1, 1, C), (1, 1, C)
        shapes[p + "ffn.key.weight"] = (F_, C)
        shapes[p + "ffn.receptance.weight"] = (C, C)
        shapes[p + "ffn.value.weight"] = (C, F_)
    shapes.update({"ln_out.weight": (C,), "ln_out.bias": (C,), "head.weight": (V, C)})
    return shapes


class RWKV6Architecture(MatrixArchitecture):
    name, title = "rwkv6", "RWKV-6"
    fp16_rescale = True
    fingerprint_keys = ("att.time_decay", "att.time_faaaa")
    lora_suffixes = ("att.time_maa_w1", "att.time_maa_w2", "att.time_decay_w1", "att.time_decay_w2")
    wkv = WKV5

    def bonus_of(self, attention_module) -> torch.Tensor:
        return attention_module.time_faaaa.reshape(attention_module.n_head, -1)

    def recognises(self, keys: set[str]) -> bool:
        return any(k.endswith("att.time_maa_x") for k in keys)

    def config_from(self, tensors: dict[str, torch.Tensor]) -> RWKV6Config:
        vocab_size, n_embd = embedding_shape(tensors)
        n_head, head_size = head_shape(tensors, "blocks.0.att.time_faaaa", n_embd)
        w1 = require(tensors, "blocks.0.att.time_maa_w1", dims=2)
        if w1.shape[1] % 5:
            raise LoadError(f"Key 'blocks.0.att.time_maa_w1' has shape {list(w1.shape)}: its width is not 5 LoRAs.")
        decay_w1 = require(tensors, "blocks.0.att.time_decay_w1", dims=2)
        ffn_key = require(tensors, "blocks.0.ffn.key.weight", dims=2)
        return RWKV6Config(n_layer=n_layer_of(tensors), n_embd=n_embd, vocab_size=vocab_size,
                           ffn_dim=int(ffn_key.shape[0]), n_head=n_head, head_size=head_size,
                           mix_lora=int(w1.shape[1]) // 5, decay_lora=int(decay_w1.shape[1]))

    def expected_shapes(self, config: RWKV6Config) -> dict[str, tuple]:
        return expected_shapes(config)

    def build(self, config: RWKV6Config) -> RWKV6:
        return RWKV6(config)

    def describe(self, config: RWKV6Config) -> dict:
        return {**super().describe(config), "lora": {"mix": config.mix_lora, "decay": config.decay_lora}}


ARCHITECTURE = RWKV6Architecture()
