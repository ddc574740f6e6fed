"""RWKV-4: the parameters and the math, written once.

Each module's `forward` is the paper's equations top to bottom, in sequence form over T tokens,
with the tensor shapes in comments (B batch, T tokens, C = n_embd, F = ffn_dim, V = vocab_size).
The same code trains the demo model (autograd, from an empty state) and reads prompts at
inference (from a given recurrent state). Nothing here is about where or how it runs:

- the runtime (`runtime.py`) swaps each `nn.Linear` for a stored one (bf16, int8, ... computed
  by the fastest kernel for the device) before inference;
- the WKV recurrence is the `wkv` operator passed to `forward` (`wkv.py`: a PyTorch reference,
  and compiled kernels with the same signature);
- what to observe (the inspector's recordings) is an argument of the call, never a hook.

The parameter names are BlinkDL's checkpoint keys (`emb.weight`, `blocks.N.att.time_decay`, ...),
so `state_dict()` is a BlinkDL checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from ..state import StateLayout
from ..wkv import WKVOperator, reference_wkv
from .base import Architecture, embedding_shape, n_layer_of, require
from .common import LN_EPS, RecurrentLM, squared_relu_ffn, token_shift


@dataclass(frozen=True)
class RWKVConfig:
    n_layer: int
    n_embd: int
    vocab_size: int
    ffn_dim: int

    @property
    def n_params(self) -> int:
        return sum(math.prod(shape) for shape in expected_shapes(self).values())


# One layer's slice of the recurrent state, each [B, C] float32 (the State's layout, in this order):
#   att_x  LN1 output of the previous token (time-mix token shift)
#   aa     WKV numerator, scaled by exp(-pp)
#   bb     WKV denominator, scaled by exp(-pp)
#   pp     the running maximum exponent
#   ffn_x  LN2 output of the previous token (channel-mix token shift)


class TimeMix(nn.Module):
    """The attention replacement: a decayed, bonus-weighted average of past values (WKV)."""

    def __init__(self, n_embd: int):
        super().__init__()
        self.time_decay = nn.Parameter(torch.empty(n_embd))  # w = -exp(time_decay): log decay per token
        self.time_first = nn.Parameter(torch.empty(n_embd))  # u: the current token's bonus
        self.time_mix_k = nn.Parameter(torch.empty(1, 1, n_embd))
        self.time_mix_v = nn.Parameter(torch.empty(1, 1, n_embd))
        self.time_mix_r = nn.Parameter(torch.empty(1, 1, n_embd))
        self.key = nn.Linear(n_embd, n_embd, bias=False)
        self.value = nn.Linear(n_embd, n_embd, bias=False)
        self.receptance = nn.Linear(n_embd, n_embd, bias=False)
        self.output = nn.Linear(n_embd, n_embd, bias=False)

    def forward(self, x, previous_x, wkv_state, wkv: WKVOperator, keep: int | None = None,
                observe: Callable[[str, torch.Tensor], None] | None = None, time_decay: torch.Tensor | None = None):
        """x: [B, T, C] the LN1 output; previous_x: [B, C] the LN1 output before x[:, 0].
        wkv_state: (aa, bb, pp) [B, C] each, or None (training: an empty state, none returned).
        keep: only the last `keep` positions' outputs are wanted (the state still reads all).
        time_decay: [B, C] used instead of the parameter for this call (the inspector's decay
        experiments; needs a WKV operator taking per-row w, as the reference does).
        Returns the output [B, T or keep, C] and the new (aa, bb, pp)."""
        xx = token_shift(x, previous_x)                                       # [B, T, C]
        k = self.key(torch.lerp(xx, x, self.time_mix_k))                      # [B, T, C]
        v = self.value(torch.lerp(xx, x, self.time_mix_v))                    # [B, T, C]
        decay = self.time_decay if time_decay is None else time_decay
        w = -torch.exp(decay.float())                                         # [C] (or [B, C]), < 0
        y, wkv_state = wkv(w, self.time_first.float(), k, v, wkv_state)       # [B, T, C]
        if observe is not None:
            for name, value in (("att_x", x), ("k", k), ("v", v), ("wkv", y)):
                observe(name, value)
        if keep is not None:
            x, xx, y = x[:, -keep:], xx[:, -keep:], y[:, -keep:]
        r = torch.sigmoid(self.receptance(torch.lerp(xx, x, self.time_mix_r)))  # [B, T', C]
        return self.output(r * y), wkv_state


class ChannelMix(nn.Module):
    """The feed-forward block: squared-ReLU MLP gated by a sigmoid receptance."""

    def __init__(self, n_embd: int, ffn_dim: int):
        super().__init__()
        self.time_mix_k = nn.Parameter(torch.empty(1, 1, n_embd))
        self.time_mix_r = nn.Parameter(torch.empty(1, 1, n_embd))
        self.key = nn.Linear(n_embd, ffn_dim, bias=False)
        self.receptance = nn.Linear(n_embd, n_embd, bias=False)
        self.value = nn.Linear(ffn_dim, n_embd, bias=False)

    def forward(self, x, previous_x, keep: int | None = None,
                observe: Callable[[str, torch.Tensor], None] | None = None):
        """x: [B, T, C] the LN2 output; previous_x: [B, C]. Returns [B, T or keep, C]."""
        if observe is not None:
            observe("ffn_x", x)
        xx = token_shift(x, previous_x)                                       # [B, T, C]
        if keep is not None:
            x, xx = x[:, -keep:], xx[:, -keep:]
        r = torch.sigmoid(self.receptance(torch.lerp(xx, x, self.time_mix_r)))      # [B, T', C]
        return r * squared_relu_ffn(self.key, self.value, torch.lerp(xx, x, self.time_mix_k))  # [B, T', C]


class Block(nn.Module):
    def __init__(self, layer_id: int, n_embd: int, ffn_dim: int):
        super().__init__()
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(n_embd, eps=LN_EPS)
        self.ln1 = nn.LayerNorm(n_embd, eps=LN_EPS)
        self.ln2 = nn.LayerNorm(n_embd, eps=LN_EPS)
        self.att = TimeMix(n_embd)
        self.ffn = ChannelMix(n_embd, ffn_dim)

    def forward(self, x, state: dict | None, wkv: WKVOperator, v_first=None, decay: torch.Tensor | None = None,
                last_only: bool = False, observe: Callable[[str, torch.Tensor], None] | None = None):
        """x: [B, T, C] the residual stream; state: {att_x, aa, bb, pp, ffn_x} [B, C] each, or None
        (training: an empty state). decay: time_decay [B, C] for this call (Edits; only the
        reference WKV takes a decay per row, so it runs then). v_first: passed through (RWKV-7's).
        Returns x after this block ([B, 1, C] with last_only), the layer's new state (None when
        training) and v_first."""
        B, T, C = x.shape
        if state is None:
            empty = x.new_zeros(B, C)
            previous_att, previous_ffn, wkv_state = empty, empty, None
        else:
            previous_att, previous_ffn, wkv_state = state["att_x"], state["ffn_x"], (state["aa"], state["bb"], state["pp"])
        if decay is not None:
            wkv = reference_wkv
        # last_only: the attention's output is needed at the last 2 positions only (the channel
        # mix's token shift reads the one before the last), the channel mix's at the last one.
        xa = self.ln1(x)                                                      # [B, T, C]
        att, wkv_state = self.att(xa, previous_att, wkv_state, wkv, keep=2 if last_only else None,
                                  observe=observe, time_decay=decay)
        x = x[:, T - att.shape[1]:] + att
        xf = self.ln2(x)
        ffn = self.ffn(xf, previous_ffn, keep=1 if last_only else None, observe=observe)
        x = x[:, x.shape[1] - ffn.shape[1]:] + ffn
        if observe is not None:
            observe("residual", x)
        if state is None:
            return x, None, v_first
        aa, bb, pp = wkv_state
        return x, {"att_x": xa[:, -1], "aa": aa, "bb": bb, "pp": pp, "ffn_x": xf[:, -1]}, v_first


class RWKV4(RecurrentLM):
    """An RWKV-4 language model (the layer loop: common.RecurrentLM.forward). Its parameters start
    uninitialised: for inference load a checkpoint with `rwkv_playground.load_runtime`; to train,
    load initial weights."""

    architecture = "rwkv4"
    reference_wkv = reference_wkv

    def __init__(self, config: RWKVConfig):
        super().__init__(config, [Block(i, config.n_embd, config.ffn_dim) for i in range(config.n_layer)])

    def state_layout(self) -> StateLayout:
        return StateLayout.vector(self.architecture, self.config.n_layer, self.config.n_embd)

    def fused_step(self, cpu_kernels, isa: str = "auto"):
        """The C++ one-token step over these weights, read by their checkpoint names."""
        named = {name: t.detach() for name, t in self.state_dict().items()}
        return cpu_kernels.StepWeights(named, self.config.n_layer, LN_EPS, isa)


# ---- the checkpoint layout --------------------------------------------------------------------

def expected_shapes(config: RWKVConfig) -> dict[str, tuple]:
    """Every key of a BlinkDL RWKV-4 checkpoint and its shape."""
    C, F, V = config.n_embd, config.ffn_dim, config.vocab_size
    shapes = {"emb.weight": (V, C), "blocks.0.ln0.weight": (C,), "blocks.0.ln0.bias": (C,)}
    for i in range(config.n_layer):
        p = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            shapes[p + ln + ".weight"] = (C,)
            shapes[p + ln + ".bias"] = (C,)
        shapes[p + "att.time_decay"] = (C,)
        shapes[p + "att.time_first"] = (C,)
        for m in ("k", "v", "r"):
            shapes[p + f"att.time_mix_{m}"] = (1, 1, C)
        for name in ("key", "value", "receptance", "output"):
            shapes[p + f"att.{name}.weight"] = (C, C)
        shapes[p + "ffn.time_mix_k"] = (1, 1, C)
        shapes[p + "ffn.time_mix_r"] = (1, 1, C)
        shapes[p + "ffn.key.weight"] = (F, C)
        shapes[p + "ffn.receptance.weight"] = (C, C)
        shapes[p + "ffn.value.weight"] = (C, F)
    shapes.update({"ln_out.weight": (C,), "ln_out.bias": (C,), "head.weight": (V, C)})
    return shapes


def init_random_weights(config: RWKVConfig, seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Random BlinkDL-format weights with realistic ranges (tests and benchmarks): time_decay spans
    about -5..3 across channels, time_first near log(0.3), time_mix in [0, 1]."""
    return dict(iter_random_weights(config, seed, dtype))


def iter_random_weights(config: RWKVConfig, seed: int = 0, dtype=torch.float32):
    """init_random_weights one tensor at a time, (key, tensor) in checkpoint order: a 14B model's
    weights can be written to a file without ever being in memory together."""
    g = torch.Generator().manual_seed(seed)
    C, L = config.n_embd, config.n_layer
    for key, shape in expected_shapes(config).items():
        name = key.split(".")[-1] if not key.endswith(".weight") else key.split(".")[-2]
        layer = int(key.split(".")[1]) if key.startswith("blocks.") else 0
        if key.endswith("time_decay"):
            ratio = layer / max(1, L - 1)
            pos = torch.arange(C, dtype=torch.float32) / max(1, C - 1)
            t = -5 + 8 * pos ** (0.7 + 1.3 * ratio) + 0.3 * torch.randn(C, generator=g)
        elif key.endswith("time_first"):
            t = math.log(0.3) + 0.5 * torch.randn(C, generator=g)
        elif "time_mix" in key:
            t = torch.rand(shape, generator=g)
        elif ".ln" in key or key.startswith("ln_out"):
            t = torch.ones(shape) if key.endswith("weight") else torch.zeros(shape)
            t = t + 0.05 * torch.randn(shape, generator=g)
        elif key == "emb.weight":
            t = torch.randn(shape, generator=g) * 0.1
        else:
            fan_in = shape[1]
            t = torch.randn(shape, generator=g) / math.sqrt(fan_in)
            if name == "output" or (name == "value" and ".ffn." in key):
                t = t * 0.5
        yield key, t.to(dtype)


# ---- the protocol (models/__init__.py) ----------------------------------------------------------

class RWKV4Architecture(Architecture):
    name, title, recurrence = "rwkv4", "RWKV-4", "wkv4"
    fp16_rescale = True
    fingerprint_keys = ("att.time_decay", "att.time_first")

    def recognises(self, keys: set[str]) -> bool:
        return any(k.endswith("att.time_first") for k in keys) and any(k.endswith("att.time_mix_k") for k in keys)

    def config_from(self, tensors: dict[str, torch.Tensor]) -> RWKVConfig:
        vocab_size, n_embd = embedding_shape(tensors)
        ffn_key = require(tensors, "blocks.0.ffn.key.weight")
        return RWKVConfig(n_layer=n_layer_of(tensors), n_embd=n_embd, vocab_size=vocab_size, ffn_dim=ffn_key.shape[0])

    def expected_shapes(self, config: RWKVConfig) -> dict[str, tuple]:
        return expected_shapes(config)

    def build(self, config: RWKVConfig) -> RWKV4:
        return RWKV4(config)

    def random_weights(self, config: RWKVConfig, seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
        return init_random_weights(config, seed, dtype)

    def decay_rows(self, model, layer: int, batch: int) -> torch.Tensor:
        return model.blocks[layer].att.time_decay.detach().float().expand(batch, -1).clone()

    def decay_value(self, factor: float) -> float:
        # the factor per token is e^{-e^{time_decay}}: 1 and 0 are time_decay -inf and +inf; +-40
        # give the same factors in float32 and stay finite
        return min(40.0, max(-40.0, math.log(-math.log(min(max(factor, 1e-300), 1 - 1e-16)))))


ARCHITECTURE = RWKV4Architecture()
