"""RWKV-5 ("Eagle"): 5.0, 5.1 and 5.2, the parameters and the math, written once.

Shapes: B batch, T tokens, C = n_embd, H heads of N = head_size channels (C = H * N), F = ffn_dim.
The state per layer is the two token shifts [C] and one N x N matrix per head, S[h] indexed
[key j, value i]. Per head, for one token (the rwkv package's `att_one_v5*`):

    r, k, v = Wr xr, Wk xk, Wv xv            # RWKV-4-style lerps of this token and the last; no sigmoid on r
    y = r^T (diag(u) k v^T + S)              # read the memory plus the current token's bonus u
    S = k v^T + diag(w) S                    # then decay it: w = exp(-exp(time_decay)), fixed per channel
    out = Wo (GroupNorm_H(y) * silu(Wg xg))  # 5.0 has no gate

The sub-versions differ only in shapes (told apart by keys, as the rwkv package does):
  5.0  time_decay [H], time_first [H] (the log of u), no gate
  5.1  as 5.0 plus the gate (`gate.weight`, `time_mix_g`)
  5.2  time_decay [H, N], time_faaaa [H, N] (u itself), gate  -- the released "Eagle" World models
The channel mix is RWKV-4's (rwkv4.ChannelMix).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import LoadError
from ..wkv import WKV5
from .base import MatrixArchitecture, MatrixConfig, embedding_shape, head_shape, n_layer_of, require
from .common import MatrixBlock, MatrixStateLM, head_group_norm, token_shift
from .rwkv4 import ChannelMix


@dataclass(frozen=True)
class RWKV5Config(MatrixConfig):
    subversion: str = "5.2"  # "5.0" | "5.1" | "5.2"
    bonus_key: str = "time_faaaa"  # "time_faaaa" (u as stored) or "time_first" (log u)

    def expected_shapes(self) -> dict[str, tuple]:
        return expected_shapes(self)

    @property
    def gated(self) -> bool:
        return self.subversion != "5.0"

    @property
    def per_channel(self) -> bool:
        """5.2: decay and bonus per channel [H, N]; 5.0/5.1: one per head [H]."""
        return self.subversion == "5.2"


class TimeMix(nn.Module):
    def __init__(self, config: RWKV5Config):
        super().__init__()
        C, H, N = config.n_embd, config.n_head, config.head_size
        self.n_head, self.head_size, self.gated = H, N, config.gated
        per_head = (H, N) if config.per_channel else (H,)
        self.time_decay = nn.Parameter(torch.empty(per_head))  # w = exp(-exp(time_decay))
        self.bonus_is_log = config.bonus_key == "time_first"
        self.register_parameter(config.bonus_key, nn.Parameter(torch.empty(per_head)))  # u (or log u)
        self.time_mix_k = nn.Parameter(torch.empty(1, 1, C))
        self.time_mix_v = nn.Parameter(torch.empty(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.empty(1, 1, C))
        if self.gated:
            self.time_mix_g = nn.Parameter(torch.empty(1, 1, C))
            self.gate = nn.Linear(C, C, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C)

    def decay(self) -> torch.Tensor:
        """The per-token factor of the memory, [H, N] in (0, 1)."""
        w = torch.exp(-torch.exp(self.time_decay.float()))
        return w.reshape(self.n_head, -1).expand(self.n_head, self.head_size)

    def bonus(self) -> torch.Tensor:
        """u: the current token's weight, [H, N]."""
        u = (self.time_first if self.bonus_is_log else self.time_faaaa).float()
        u = torch.exp(u) if self.bonus_is_log else u
        return u.reshape(self.n_head, -1).expand(self.n_head, self.head_size)

    def forward(self, x, previous_x, wkv_state, wkv, v_first, observe=None):
        """x: [B, T, C] the LN1 output; previous_x [B, C]; wkv_state [B, H, N, N] or None."""
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        xx = token_shift(x, previous_x)                                       # [B, T, C]
        r = self.receptance(torch.lerp(xx, x, self.time_mix_r))               # [B, T, C]
        k = self.key(torch.lerp(xx, x, self.time_mix_k))
        v = self.value(torch.lerp(xx, x, self.time_mix_v))
        w = self.decay().expand(B, T, H, N)                                   # [B, T, H, N]
        y, wkv_state = wkv.wkv5(r.view(B, T, H, N), k.view(B, T, H, N), v.view(B, T, H, N), w,
                                self.bonus(), wkv_state)                      # [B, T, H, N]
        y = y.reshape(B, T, C)
        if observe is not None:
            for name, value in (("att_x", x), ("r", r), ("k", k), ("v", v), ("w", w.reshape(B, T, C)), ("wkv", y)):
                observe(name, value)
        y = head_group_norm(y, H, self.ln_x.weight, self.ln_x.bias)
        if self.gated:
            y = y * F.silu(self.gate(torch.lerp(xx, x, self.time_mix_g)))
        return self.output(y), wkv_state, v_first  # (v_first: RWKV-7 only, passed through)


class RWKV5(MatrixStateLM):
    architecture = "rwkv5"
    fused_step_class = "RWKV5Step"

    def __init__(self, config: RWKV5Config):
        blocks = [MatrixBlock(i, config.n_embd, TimeMix(config), ChannelMix(config.n_embd, config.ffn_dim))
                  for i in range(config.n_layer)]
        super().__init__(config, blocks)

    def step_weights(self) -> dict[str, torch.Tensor]:
        """Plus each layer's decay factor and bonus per channel, [C] (whatever the sub-version stores)."""
        named = super().step_weights()
        for i, block in enumerate(self.blocks):
            named[f"blocks.{i}.att.decay_factor"] = block.att.decay().reshape(-1).contiguous()
            named[f"blocks.{i}.att.bonus"] = block.att.bonus().reshape(-1).contiguous()
        return named


def expected_shapes(config: RWKV5Config) -> dict[str, tuple]:
    C, F_, V, H, N = config.n_embd, config.ffn_dim, config.vocab_size, config.n_head, config.head_size
    per_head = (H, N) if config.per_channel else (H,)
    shapes = {"emb.weight": (V, C), "blocks.0.ln0.weight": (C,), "blocks.0.ln0.bias": (C,)}
    for i in range(config.n_layer):
        p = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            shapes[p + ln + ".weight"], shapes[p + ln + ".bias"] = (C,), (C,)
        shapes[p + "att.time_decay"] = per_head
        shapes[p + f"att.{config.bonus_key}"] = per_head
        for m in ("k", "v", "r") + (("g",) if config.gated else ()):
            shapes[p + f"att.time_mix_{m}"] = (1, 1, C)
        for name in ("receptance", "key", "value") + (("gate",) if config.gated else ()) + ("output",):
            shapes[p + f"att.{name}.weight"] = (C, C)
        shapes[p + "att.ln_x.weight"], shapes[p + "att.ln_x.bias"] = (C,), (C,)
        shapes[p + "ffn.time_mix_k"], shapes[p + "ffn.time_mix_r"] = (1, 1, C), (1, 1, C)
        shapes[p + "ffn.key.weight"] = (F_, C)
        shapes[p + "ffn.receptance.weight"] = (C, C)
        shapes[p + "ffn.value.weight"] = (C, F_)
    shapes.update({"ln_out.weight": (C,), "ln_out.bias": (C,), "head.weight": (V, C)})
    return shapes


def subversion_of_keys(tensors: dict[str, torch.Tensor]) -> str:
    """5.0 / 5.1 / 5.2, as the rwkv package tells them: a gate -> 5.1; a 2-D time_decay -> 5.2."""
    decay = tensors.get("blocks.0.att.time_decay")
    if decay is not None and decay.dim() >= 2 and decay.shape[-1] > 1:
        return "5.2"
    return "5.1" if "blocks.0.att.gate.weight" in tensors else "5.0"


class RWKV5Architecture(MatrixArchitecture):
    name, title = "rwkv5", "RWKV-5"
    fp16_rescale = True
    fingerprint_keys = ("att.time_decay", "att.ln_x.weight")
    wkv = WKV5
    decay_per_token = False

    def bonus_of(self, attention_module) -> torch.Tensor:
        return attention_module.bonus()

    def recognises(self, keys: set[str]) -> bool:
        return any(k.endswith(("att.ln_x.weight", "att.time_faaaa")) for k in keys) and not any(
            k.endswith(("att.time_maa_x", "att.r_k")) for k in keys)

    def config_from(self, tensors: dict[str, torch.Tensor]) -> RWKV5Config:
        vocab_size, n_embd = embedding_shape(tensors)
        sub = subversion_of_keys(tensors)
        bonus_key = "time_faaaa" if "blocks.0.att.time_faaaa" in tensors else "time_first"
        require(tensors, f"blocks.0.att.{bonus_key}")
        n_head, head_size = head_shape(tensors, "blocks.0.att.time_decay", n_embd)
        if sub != "5.2":
            decay = tensors["blocks.0.att.time_decay"]
            if decay.dim() != 1:
                raise LoadError(f"Key 'blocks.0.att.time_decay' has shape {list(decay.shape)}, expected [n_head] "
                                f"(RWKV-{sub}) or [n_head, head_size] (RWKV-5.2).")
        ffn_key = require(tensors, "blocks.0.ffn.key.weight", dims=2)
        return RWKV5Config(n_layer=n_layer_of(tensors), n_embd=n_embd, vocab_size=vocab_size,
                           ffn_dim=int(ffn_key.shape[0]), n_head=n_head, head_size=head_size, subversion=sub,
                           bonus_key=bonus_key)

    def expected_shapes(self, config: RWKV5Config) -> dict[str, tuple]:
        return expected_shapes(config)

    def build(self, config: RWKV5Config) -> RWKV5:
        return RWKV5(config)

    def describe(self, config: RWKV5Config) -> dict:
        return {**super().describe(config), "architecture": f"RWKV-{config.subversion}"}


ARCHITECTURE = RWKV5Architecture()
