"""Pieces every RWKV generation shares: LayerNorm eps, the token shift, the per-head GroupNorm,
the squared-ReLU feed-forward, the observer signature, an experiment's edits of one forward call,
and the one layer loop (`RecurrentLM.forward`) every architecture's model runs."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..state import State, StateLayout
from ..wkv import reference_matrix_wkv, with_decay

LN_EPS = 1e-5  # every LayerNorm (the fused C++ step receives it from here)
GROUP_NORM_EPS = 64e-5  # ln_x of v5/v6/v7: one group per head (as the rwkv package, rwkv.cpp, llama.cpp)
# fp16 storage: the output projections of layer i are stored divided by 2**(i // 6) and the
# residual stream is halved after every 6th layer, so activations stay in fp16's range (ChatRWKV).
FP16_RESCALE_EVERY = 6

# observe(layer, name, tensor [B, T, ...]): what a caller records of the internals, per call.
Observer = Callable[[int, str, torch.Tensor], None]
LayerObserver = Callable[[str, torch.Tensor], None]


def token_shift(x: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """[B, T, C] -> the previous token's values: `previous` [B, C] at t = 0, x[t - 1] after."""
    return torch.cat([previous.unsqueeze(1), x[:, :-1]], dim=1)


def head_group_norm(y: torch.Tensor, n_head: int, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """ln_x: [B, T, C] normalised per head (N = C / H channels each), fp32."""
    B, T, C = y.shape
    return F.group_norm(y.reshape(B * T, C).float(), n_head, weight, bias, eps=GROUP_NORM_EPS).reshape(B, T, C)


def squared_relu_ffn(key, value, kx: torch.Tensor) -> torch.Tensor:
    """value(relu(key(kx))^2): the feed-forward of every generation ([B, T, C] -> [B, T, C])."""
    return value(torch.square(torch.relu(key(kx))))


def observe_layer(observe: Observer | None, layer: int) -> LayerObserver | None:
    return None if observe is None else (lambda name, value: observe(layer, name, value))


@dataclass(frozen=True)
class Edits:
    """What an experiment changes in one forward call (`Runtime.forward(..., edits=Edits(...))`),
    applied by the architecture's block; the model's parameters are never touched.

      decay        {layer: [B, ...]}: that layer's decay, per row, at every token of the call. Its
                   unit is the architecture's own (`Architecture.decay_rows` / `decay_value`): RWKV-4's
                   time_decay [B, C] (the factor is e^{-e^{time_decay}}); RWKV-5/6/7's decay factor
                   [B, H, N], NaN where the model's own stays.
      first_layers [B]: row b reads exactly as row 0 below layer first_layers[b] (the same tokens,
                   state and decay there), so those layers are computed once (`BatchRows`).

    Erasing or restoring parts of a state between calls are edits of the `State` itself
    (patching.StatePart: erase, copy)."""
    decay: Mapping[int, torch.Tensor] = field(default_factory=dict)
    first_layers: Sequence[int] | None = None

    def __bool__(self) -> bool:
        return bool(self.decay) or self.first_layers is not None


NO_EDITS = Edits()


def stack_layers(layer_states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """[{name: [B, ...]} per layer] -> {name: [B, L, ...]}."""
    return {name: torch.stack([s[name] for s in layer_states], dim=1) for name in layer_states[0]}


class BatchRows:
    """A batch whose rows read exactly as row 0 below a layer of their own, computed once.

    An experiment that edits one layer's state (patching, knock-outs) leaves every layer below it
    as the unedited row 0 reads it: the same tokens into the same states. first_layers[b] is the
    first layer at which row b may differ (row 0's is 0); a layer computes only the rows that have
    joined by then, and a row joining takes row 0's residual stream (and carry) as it stands. The
    computed rows are kept sorted by their first layer, so at every layer they are a prefix of
    that order. BatchRows(None): every row at every layer (each method returns its input)."""

    def __init__(self, first_layers: Sequence[int] | None):
        self.first_layers = None if first_layers is None else torch.tensor([int(f) for f in first_layers])
        if self.first_layers is None:
            return
        self.order = torch.argsort(self.first_layers, stable=True)  # row 0 stays first (its first layer is 0)
        self.rank = torch.empty_like(self.order)
        self.rank[self.order] = torch.arange(len(self.order))
        self.sorted_first = self.first_layers[self.order].tolist()

    def count(self, layer: int) -> int:
        return bisect.bisect_right(self.sorted_first, layer)

    def take(self, t: torch.Tensor, layer: int) -> torch.Tensor:
        """[B, ...] in batch order -> the rows `layer` computes, in their order."""
        return t if self.first_layers is None else t[self.order[:self.count(layer)]]

    def widen(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """The rows computed below `layer` -> those computed at it: the rows joining copy row 0's."""
        if self.first_layers is None or x.shape[0] == self.count(layer):
            return x
        return torch.cat([x, x[:1].expand(self.count(layer) - x.shape[0], *x.shape[1:])])

    def put(self, t: torch.Tensor, layer: int) -> torch.Tensor:
        """The rows `layer` computed -> [B, ...] in batch order (the rows not joined yet: row 0's)."""
        if self.first_layers is None:
            return t
        return t[torch.where(self.first_layers <= layer, self.rank, 0)]

    def unsort(self, x: torch.Tensor) -> torch.Tensor:
        """Every row, computed in their order -> batch order."""
        return x if self.first_layers is None else x[self.rank]


# ---- the skeleton every generation shares (models/__init__.py: the protocol) ----------------------
#
#   x = LN0(emb[token])
#   for each layer:  x = x + TimeMix(LN1(x));  x = x + ChannelMix(LN2(x))
#   logits = head(LN_out(x))
#
# The per-architecture math lives in each module's Block / TimeMix / ChannelMix. A block is called
# as block(x, layer_state, wkv, v_first, decay=..., last_only=..., observe=...) and returns
# (x, new layer_state, v_first): v_first is what RWKV-7's layer 0 hands every later layer (its
# values, for the value residual), passed explicitly as flash-linear-attention's RWKV-7 layers do;
# the other generations pass it through untouched.

class RecurrentLM(nn.Module):
    """A language model over a recurrent State: the embedding, the blocks, the head, and the one
    layer loop (`forward`). Each architecture's module builds `self.blocks` from its own math."""

    architecture = ""  # the state's architecture name (models.by_name)
    reference_wkv = None  # the operator used when the caller gives none (wkv.py's reference)

    def __init__(self, config, blocks: list[nn.Module]):
        super().__init__()
        self.config = config
        # (parameters left uninitialised: weights come from a checkpoint or an init recipe; building
        # the model on the meta device stays free)
        self.emb = nn.Embedding(config.vocab_size, config.n_embd, _weight=torch.empty(config.vocab_size, config.n_embd))
        self.blocks = nn.ModuleList(blocks)
        self.ln_out = nn.LayerNorm(config.n_embd, eps=LN_EPS)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.rescale_every = 0  # set by a runtime storing fp16 weights pre-scaled (FP16_RESCALE_EVERY)

    def forward(self, tokens: torch.Tensor, state: State | None = None, wkv=None, last_only: bool = False,
                observe: Observer | None = None, edits: Edits = NO_EDITS):
        """tokens: [B, T] ids; state: a batched State (not modified) or None (training from an
        empty state). wkv: the recurrence operator (default: the reference). edits: an
        experiment's changes for this call (Edits; the caller guarantees what first_layers says:
        Runtime.forward checks it).
        Returns (logits [B, T, V] float32 ([B, V] with last_only), the State after the tokens
        (None when training))."""
        wkv = wkv or self.reference_wkv
        rows = BatchRows(edits.first_layers)
        x = self.blocks[0].ln0(self.emb(rows.take(tokens, 0)).float())      # [B, T, C]
        v_first = None
        new_layers = []
        for i, block in enumerate(self.blocks):
            x = rows.widen(x, i)
            v_first = None if v_first is None else rows.widen(v_first, i)
            layer_state = None if state is None else {n: rows.take(t[:, i], i) for n, t in state.tensors().items()}
            decay = edits.decay.get(i)
            x, layer_state, v_first = block(x, layer_state, wkv, v_first,
                                            decay=None if decay is None else rows.take(decay, i),
                                            last_only=last_only and i == len(self.blocks) - 1,
                                            observe=observe_layer(observe, i))
            new_layers.append(None if layer_state is None else {n: rows.put(t, i) for n, t in layer_state.items()})
            if self.rescale_every and (i + 1) % self.rescale_every == 0:
                x = x / 2
        x = rows.unsort(x)
        if last_only:
            x = x[:, -1]                                                      # [B, C]
        logits = self.head(self.ln_out(x))                                    # [B, (T,) V]
        if state is None:
            return logits, None
        return logits, State(stack_layers(new_layers), architecture=self.architecture)


class MatrixBlock(nn.Module):
    def __init__(self, layer_id: int, n_embd: int, att: nn.Module, ffn: nn.Module):
        super().__init__()
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(n_embd, eps=LN_EPS)
        self.ln1 = nn.LayerNorm(n_embd, eps=LN_EPS)
        self.ln2 = nn.LayerNorm(n_embd, eps=LN_EPS)
        self.att = att
        self.ffn = ffn

    def forward(self, x, layer_state: dict | None, wkv, v_first, decay: torch.Tensor | None = None,
                last_only: bool = False, observe: LayerObserver | None = None):
        """x: [B, T, C]. layer_state: {att_x [B, C], wkv_state [B, H, N, N], ffn_x [B, C]} or None
        (training: an empty state). decay [B, H, N]: the decay factor where not NaN (Edits).
        Returns x after the block, the layer's new state and v_first. (last_only: every position
        is computed; the caller keeps the last.)"""
        B, T, C = x.shape
        if layer_state is None:
            previous_att = previous_ffn = x.new_zeros(B, C)
            wkv_state = None
        else:
            previous_att, wkv_state, previous_ffn = (layer_state[n] for n in ("att_x", "wkv_state", "ffn_x"))
        if decay is not None:
            wkv = with_decay(wkv, decay)
        xa = self.ln1(x)                                                      # [B, T, C]
        att, wkv_state, v_first = self.att(xa, previous_att, wkv_state, wkv, v_first, observe=observe)
        x = x + att
        xf = self.ln2(x)
        if observe is not None:
            observe("ffn_x", xf)
        x = x + self.ffn(xf, previous_ffn)
        if observe is not None:
            observe("residual", x)
        return x, {"att_x": xa[:, -1], "wkv_state": wkv_state, "ffn_x": xf[:, -1]}, v_first


class MatrixStateLM(RecurrentLM):
    """An RWKV-5/6/7 language model; subclasses build `self.blocks` from their TimeMix / ChannelMix."""

    reference_wkv = reference_matrix_wkv
    fused_step_class = ""  # its architecture's C++ step (kernels/step_rwkv5.cpp ...): "RWKV5Step", ...

    def state_layout(self) -> StateLayout:
        c = self.config
        return StateLayout.matrix(self.architecture, c.n_layer, c.n_embd, c.n_head, c.head_size)

    def step_weights(self) -> dict[str, torch.Tensor]:
        """The weights the C++ step reads, by checkpoint name: LoRAs as [out, in] (their stored
        transposed memory, no copy); subclasses add what they precompute."""
        named = {name: t.detach() for name, t in self.state_dict().items()}
        return {name: (t.mT if t.dim() >= 2 and not t.is_contiguous() else t) for name, t in named.items()}

    def fused_step(self, cpu_kernels, isa: str = "auto"):
        c = self.config
        step_class = getattr(cpu_kernels, self.fused_step_class)
        return step_class(self.step_weights(), c.n_layer, c.n_head, c.head_size, LN_EPS, GROUP_NORM_EPS, isa)
