"""The protocol every architecture answers (`Architecture`), what RWKV-5/6/7 share of it, and the
shape helpers every architecture reads its checkpoint with. The registry is the package
(`models/__init__.py`)."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from ..errors import LoadError


class Architecture(ABC):
    """One RWKV generation: how its checkpoints look and which module runs them."""

    name = ""            # "rwkv4": also the architecture of its states
    title = ""           # "RWKV-4": shown to users
    recurrence = ""      # which operator family its forward takes ("wkv4" | "matrix")
    # the built model also answers: state_layout() -> StateLayout, and fused_step(cpu_kernels) ->
    # the C++ one-token step over its weights (kernels/step_rwkv4.cpp ... step_rwkv7.cpp), whose .step(tokens, *state
    # components as lists of [L, ...] tensors, in layout order) advances the states in place
    fp16_rescale = False  # stores output projections pre-divided for fp16 (see FP16_RESCALE_EVERY)
    world_releases_only = False  # every released model uses the World vocabulary and User/Assistant
    # per-layer keys (after "blocks.N.") hashed into the model fingerprint
    fingerprint_keys: tuple[str, ...] = ()
    # LoRA matrices used as `x @ W` ([in, out]): the runtime stores them transposed in memory
    # (the same values, a transposed view), so the fused step streams their rows like any matvec
    lora_suffixes: tuple[str, ...] = ()
    # What the state and the inspector make of this architecture (the inspector, patching, the
    # notebook and the UI ask these instead of testing the architecture's name):
    matrix_state = False  # one N x N matrix per head (State.wkv_state) instead of RWKV-4's aa / bb / pp
    wkv = None           # the matrix recurrence, one token at a time (wkv.WKV5 / wkv.WKV7), for the
    #                      inspector's replay and exact attention and patching's token removal
    decay_per_token = True  # the decay depends on the token (False: RWKV-5's fixed decay)
    bonus_label = ""     # what the inspector calls the bonus
    # the inspector's views: "vector" (RWKV-4's accumulators, attention in closed form and the
    # Experiments tab) or "matrix" (the Matrix state tab); patching runs on every architecture
    inspector_views = "vector"

    @abstractmethod
    def decay_rows(self, model, layer: int, batch: int) -> torch.Tensor:
        """One layer's decay as an edit holds it (models.common.Edits.decay), [batch, ...], every row
        the model's own: an experiment then sets the parts it changes (RWKV-4: time_decay [B, C];
        RWKV-5/6/7: the decay factor [B, H, N], NaN meaning the model's own)."""

    @abstractmethod
    def decay_value(self, factor: float) -> float:
        """The value an edit holds for a decay factor in [0, 1] (the memory kept per token)."""

    @abstractmethod
    def recognises(self, keys: set[str]) -> bool:
        ...

    @abstractmethod
    def config_from(self, tensors: dict[str, torch.Tensor]):
        ...

    @abstractmethod
    def expected_shapes(self, config) -> dict[str, tuple]:
        ...

    @abstractmethod
    def build(self, config) -> torch.nn.Module:
        ...

    @abstractmethod
    def random_weights(self, config, seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
        """Random weights in realistic ranges (tests, benchmarks)."""

    def describe(self, config) -> dict:
        """What the model panel and `Runtime.describe()` show beyond layers x width."""
        return {"architecture": self.title}

    def __repr__(self) -> str:
        return f"<architecture {self.title}>"




# ---- shape helpers the architectures share ------------------------------------------------------

def n_layer_of(tensors: dict[str, torch.Tensor]) -> int:
    layer_ids = {int(k.split(".")[1]) for k in tensors if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    if not layer_ids:
        raise LoadError("The checkpoint has no 'blocks.N.*' keys.")
    return max(layer_ids) + 1


def embedding_shape(tensors: dict[str, torch.Tensor]) -> tuple[int, int]:
    emb = require(tensors, "emb.weight")
    if emb.dim() != 2:
        raise LoadError(f"Key 'emb.weight' has shape {list(emb.shape)}, expected [vocab, n_embd].")
    vocab_size, n_embd = emb.shape
    if vocab_size == 0 or n_embd == 0:
        raise LoadError(f"Key 'emb.weight' has shape {list(emb.shape)}: the model has an empty vocabulary or width.")
    return int(vocab_size), int(n_embd)


class MissingKey(LoadError):
    def __init__(self, key: str):
        super().__init__(f"The checkpoint is missing key '{key}'.")
        self.key = key


def require(tensors: dict[str, torch.Tensor], key: str, dims: int | None = None) -> torch.Tensor:
    if key not in tensors:
        raise MissingKey(key)
    t = tensors[key]
    if dims is not None and t.dim() != dims:
        raise LoadError(f"Key '{key}' has shape {list(t.shape)}, expected {dims} dimensions.")
    return t


def head_shape(tensors: dict[str, torch.Tensor], key: str, n_embd: int) -> tuple[int, int]:
    """(n_head, head_size) from a [H, N] tensor (or [H] with N = C / H)."""
    t = require(tensors, key)
    shape = [d for d in t.shape if d != 1] if t.dim() > 2 else list(t.shape)
    if len(shape) == 2:
        H, N = shape
    elif len(shape) == 1:
        H, N = shape[0], n_embd // max(1, shape[0])
    else:
        raise LoadError(f"Key '{key}' has shape {list(t.shape)}, expected [n_head, head_size].")
    if H <= 0 or H * N != n_embd:
        raise LoadError(f"Key '{key}' has shape {list(t.shape)}: {H} heads do not divide the width {n_embd}.")
    return int(H), int(N)


@dataclass(frozen=True)
class MatrixConfig:
    """The dimensions every RWKV-5/6/7 model has (each read from the checkpoint's shapes); each
    architecture's config adds its own (sub-version, LoRA widths)."""
    n_layer: int
    n_embd: int
    vocab_size: int
    ffn_dim: int
    n_head: int
    head_size: int

    @property
    def n_params(self) -> int:
        # expected_shapes(): every key of the checkpoint and its shape, defined by each
        # architecture's config (RWKV5Config, RWKV6Config, RWKV7Config)
        return sum(math.prod(s) for s in self.expected_shapes().values())


class MatrixArchitecture(Architecture):
    """What RWKV-5, 6 and 7 share of the protocol."""
    recurrence = "matrix"
    world_releases_only = True
    matrix_state = True
    inspector_views = "matrix"
    bonus_label = "bonus u (the current token's weight)"

    @abstractmethod
    def bonus_of(self, attention_module) -> torch.Tensor:
        """The bonus of one layer's time mix as the inspector shows it, [H, N]."""

    def decay_rows(self, model, layer: int, batch: int) -> torch.Tensor:
        c = model.config
        return torch.full((batch, c.n_head, c.head_size), float("nan"))

    def decay_value(self, factor: float) -> float:
        return float(factor)

    def random_weights(self, config, seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
        from .random_init import random_weights

        return random_weights(self.expected_shapes(config), config, seed, dtype)

    def describe(self, config) -> dict:
        return {"architecture": self.title, "n_head": config.n_head, "head_size": config.head_size}
