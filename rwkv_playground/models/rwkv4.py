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
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn as nn

from ..state import State, StateLayout
from ..wkv import WKVOperator, reference_wkv
from . import Architecture, embedding_shape, n_layer_of, require
from .common import LN_EPS, BatchRows, Observer, squared_relu_ffn, token_shift


@dataclass(frozen=True)
class RWKVConfig:
    n_layer: int
    n_embd: int
    vocab_size: int
    ffn_dim: int

    @property
    def n_params(self) -> int:
        return sum(math.prod(shape) for shape in expected_shapes(self).values())


class LayerState(NamedTuple):
    """One layer's slice of the recurrent state, each [B, C] float32."""
    att_x: torch.Tensor  # LN1 output of the previous token (time-mix token shift)
    aa: torch.Tensor  # WKV numerator, scaled by exp(-pp)
    bb: torch.Tensor  # WKV denominator, scaled by exp(-pp)
    pp: torch.Tensor  # the running maximum exponent
    ffn_x: torch.Tensor  # LN2 output of the previous token (channel-mix token shift)


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

    def forward(self, x, state: LayerState | None, wkv: WKVOperator, last_only: bool = False,
                observe: Callable[[str, torch.Tensor], None] | None = None, time_decay: torch.Tensor | None = None):
        """x: [B, T, C] the residual stream. Returns it after this block ([B, 1, C] with
        last_only) and the layer's new state (None when training from an empty state)."""
        B, T, C = x.shape
        if state is None:
            empty = x.new_zeros(B, C)
            previous_att, previous_ffn, wkv_state = empty, empty, None
        else:
            previous_att, previous_ffn, wkv_state = state.att_x, state.ffn_x, (state.aa, state.bb, state.pp)
        # last_only: the attention's output is needed at the last 2 positions only (the channel
        # mix's token shift reads the one before the last), the channel mix's at the last one.
        xa = self.ln1(x)                                                      # [B, T, C]
        att, wkv_state = self.att(xa, previous_att, wkv_state, wkv, keep=2 if last_only else None,
                                  observe=observe, time_decay=time_decay)
        x = x[:, T - att.shape[1]:] + att
        xf = self.ln2(x)
        ffn = self.ffn(xf, previous_ffn, keep=1 if last_only else None, observe=observe)
        x = x[:, x.shape[1] - ffn.shape[1]:] + ffn
        if observe is not None:
            observe("residual", x)
        if state is None:
            return x, None
        return x, LayerState(xa[:, -1], *wkv_state, xf[:, -1])


class RWKV4(nn.Module):
    """An RWKV-4 language model. Its parameters start uninitialised: for inference load a
    checkpoint with `rwkv_playground.load_runtime`; to train, load initial weights."""

    def __init__(self, config: RWKVConfig):
        super().__init__()
        self.config = config
        # (like every parameter here, left uninitialised: weights come from a checkpoint or an
        # init recipe; also keeps building the model on the meta device free)
        self.emb = nn.Embedding(config.vocab_size, config.n_embd,
                                _weight=torch.empty(config.vocab_size, config.n_embd))
        self.blocks = nn.ModuleList(Block(i, config.n_embd, config.ffn_dim) for i in range(config.n_layer))
        self.ln_out = nn.LayerNorm(config.n_embd, eps=LN_EPS)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Set by a runtime that stores weights pre-scaled for fp16 (see FP16_RESCALE_EVERY).
        self.rescale_every = 0

    def state_layout(self) -> StateLayout:
        return StateLayout.rwkv4(self.config.n_layer, self.config.n_embd)

    def fused_step(self, cpu_kernels, isa: str = "auto"):
        """The C++ one-token step over these weights, read by their checkpoint names."""
        named = {name: t.detach() for name, t in self.state_dict().items()}
        return cpu_kernels.StepWeights(named, self.config.n_layer, LN_EPS, isa)

    def forward(self, tokens: torch.Tensor, state: State | None = None, wkv: WKVOperator = reference_wkv,
                last_only: bool = False, observe: Observer | None = None,
                time_decay: dict[int, torch.Tensor] | None = None, first_layers: Sequence[int] | None = None):
        """tokens: [B, T] ids. state: a batched State ([B, L, C] tensors, not modified) to start
        from, or None to train from an empty state. time_decay: {layer: [B, C]} replacing those
        layers' decay for this call only (an experiment's edit; the parameters stay as they are).
        first_layers: rows computed from their own layer on (common.BatchRows).
        Returns (logits [B, T, V] float32 ([B, V] with last_only), the State after the tokens
        (None when training))."""
        rows = BatchRows(first_layers)
        x = self.blocks[0].ln0(self.emb(rows.take(tokens, 0)).float())      # [B, T, C]
        new_layers = []
        for i, block in enumerate(self.blocks):
            x = rows.widen(x, i)
            layer_state = None if state is None else LayerState(*(rows.take(t[:, i], i) for t in state.tensors().values()))
            observe_layer = None if observe is None else (lambda name, value, i=i: observe(i, name, value))
            layer_decay = None if time_decay is None or i not in time_decay else rows.take(time_decay[i], i)
            x, layer_state = block(x, layer_state, wkv, last_only=last_only and i == len(self.blocks) - 1,
                                   observe=observe_layer, time_decay=layer_decay)
            new_layers.append(None if layer_state is None else LayerState(*(rows.put(t, i) for t in layer_state)))
            if self.rescale_every and (i + 1) % self.rescale_every == 0:
                x = x / 2
        x = rows.unsort(x)
        if last_only:
            x = x[:, -1]                                                      # [B, C]
        logits = self.head(self.ln_out(x))                                    # [B, (T,) V]
        if state is None:
            return logits, None
        new_state = State({name: torch.stack(parts, dim=1) for name, parts in zip(LayerState._fields, zip(*new_layers))},
                          architecture="rwkv4")
        return logits, new_state


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


ARCHITECTURE = RWKV4Architecture()
