"""The RWKV-4 recurrent state as a first-class object.

Per layer, five float32 vectors of size n_embd (ChatRWKV's layout, named):
  att_x  - LN1 output of the previous token (time-mix token shift)
  aa, bb - numerator / denominator of the WKV average, both scaled by exp(-pp)
  pp     - the running maximum exponent (starts at -1e30: "no memory yet")
  ffn_x  - LN2 output of the previous token (channel-mix token shift)
Each tensor is [n_layer, n_embd] for one sequence, or [B, n_layer, n_embd] for a batch.
Memory is O(n_layer * n_embd) whatever the length of the text.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import LoadError, StateError

COMPONENTS = ("att_x", "aa", "bb", "pp", "ffn_x")
EMPTY_PP = -1e30
FORMAT_NAME = "rwkv-playground-state"


def _package_version() -> str:
    from . import __version__

    return __version__


@dataclass
class State:
    att_x: torch.Tensor
    aa: torch.Tensor
    bb: torch.Tensor
    pp: torch.Tensor
    ffn_x: torch.Tensor
    # Tokens consumed so far: an int for one sequence, a list of ints for a batch.
    token_count: int | list[int] = 0
    # Fingerprint of the model that produced this state ("" if unknown).
    fingerprint: str = ""
    metadata: dict = field(default_factory=dict)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def zeros(cls, n_layer: int, n_embd: int, batch: int | None = None, device="cpu", fingerprint: str = ""):
        shape = (n_layer, n_embd) if batch is None else (batch, n_layer, n_embd)
        z = lambda: torch.zeros(shape, dtype=torch.float32, device=device)  # noqa: E731
        pp = torch.full(shape, EMPTY_PP, dtype=torch.float32, device=device)
        count = 0 if batch is None else [0] * batch
        return cls(z(), z(), z(), pp, z(), token_count=count, fingerprint=fingerprint)

    # ---- shape --------------------------------------------------------------------------------
    @property
    def is_batched(self) -> bool:
        return self.aa.dim() == 3

    @property
    def batch_size(self) -> int | None:
        return self.aa.shape[0] if self.is_batched else None

    @property
    def n_layer(self) -> int:
        return self.aa.shape[-2]

    @property
    def n_embd(self) -> int:
        return self.aa.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.aa.device

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in COMPONENTS}

    def _replace(self, fn, token_count=None) -> "State":
        return State(
            **{name: fn(t) for name, t in self.tensors().items()},
            token_count=list(self.token_count) if token_count is None and isinstance(self.token_count, list)
            else (self.token_count if token_count is None else token_count),
            fingerprint=self.fingerprint,
            metadata=dict(self.metadata),
        )

    def clone(self) -> "State":
        return self._replace(lambda t: t.clone())

    def to(self, device) -> "State":
        return self._replace(lambda t: t.to(device))

    def assign(self, other: "State") -> None:
        """Copy other's tensors into this state's own memory (views of it see the change)."""
        for name in COMPONENTS:
            getattr(self, name).copy_(getattr(other, name))

    def as_batch(self) -> "State":
        """A one-row batched view ([1, L, C]) of a single-sequence state, sharing its memory."""
        return State(**{name: t.unsqueeze(0) for name, t in self.tensors().items()},
                     token_count=[int(self.token_count)], fingerprint=self.fingerprint)

    def single(self) -> "State":
        """The single-sequence view of a one-row batched state."""
        count = self.token_count[0] if isinstance(self.token_count, list) else self.token_count
        return State(**{name: t[0] for name, t in self.tensors().items()}, token_count=int(count),
                     fingerprint=self.fingerprint)

    def unbind_views(self) -> list["State"]:
        """The rows of a batched state as single-sequence states sharing its memory."""
        return [State(**{name: t[b] for name, t in self.tensors().items()}, token_count=int(self.token_count[b]),
                      fingerprint=self.fingerprint) for b in range(self.batch_size)]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    # ---- batching -----------------------------------------------------------------------------
    @classmethod
    def stack(cls, states: list["State"]) -> "State":
        """Batch several single-sequence states into one [B, L, C] state."""
        if not states:
            raise StateError("Cannot batch an empty list of states.")
        first = states[0]
        for s in states:
            if s.is_batched:
                raise StateError("State.stack takes single-sequence states.")
            if (s.n_layer, s.n_embd) != (first.n_layer, first.n_embd):
                raise StateError("Cannot batch states of different shapes.")
            if s.fingerprint and first.fingerprint and s.fingerprint != first.fingerprint:
                raise StateError("Cannot batch states from different models.")
        return State(
            **{name: torch.stack([getattr(s, name) for s in states]) for name in COMPONENTS},
            token_count=[int(s.token_count) for s in states],
            fingerprint=first.fingerprint,
        )

    def unbind(self) -> list["State"]:
        """Split a batched state into single-sequence states."""
        if not self.is_batched:
            return [self]
        return [
            State(
                **{name: getattr(self, name)[b].clone() for name in COMPONENTS},
                token_count=self.token_count[b],
                fingerprint=self.fingerprint,
            )
            for b in range(self.batch_size)
        ]

    # ---- comparisons (the (aa, bb, pp) triple is only defined up to a common scale) ------------
    def value_estimate(self) -> torch.Tensor:
        """aa / bb: the decayed weighted average of past values each channel holds."""
        return self.aa / self.bb.clamp_min(1e-38)

    def log_mass(self) -> torch.Tensor:
        """pp + log(bb): the log of the total (decayed) weight of the memory."""
        return self.pp + torch.log(self.bb.clamp_min(1e-38))

    # ---- files --------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, extra_metadata: dict | None = None) -> None:
        """Write the state to a .safetensors file with metadata (model fingerprint, shape, ...)."""
        from safetensors.torch import save_file

        meta = {
            "format": FORMAT_NAME,
            "fingerprint": self.fingerprint,
            "n_layer": str(self.n_layer),
            "n_embd": str(self.n_embd),
            "token_count": json.dumps(self.token_count),
            "package_version": _package_version(),
        }
        if extra_metadata:
            meta["extra"] = json.dumps(extra_metadata)
        tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in self.tensors().items()}
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike, runtime=None, device="cpu") -> "State":
        """Read a state file; with `runtime`, refuse a state of another shape or model fingerprint."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise LoadError(f"State file not found: {path}")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
            raise LoadError(f"{path.name} is not a readable state file ({exc}).") from None
        if meta.get("format") != FORMAT_NAME or set(tensors) != set(COMPONENTS):
            raise LoadError(f"{path.name} is not an RWKV Playground state file.")
        shapes = {t.shape for t in tensors.values()}
        if len(shapes) != 1:
            raise LoadError(f"{path.name} is corrupt: its components have different shapes.")
        state = cls(
            **{k: t.to(device) for k, t in tensors.items()},
            token_count=json.loads(meta.get("token_count", "0")),
            fingerprint=meta.get("fingerprint", ""),
            metadata=json.loads(meta["extra"]) if "extra" in meta else {},
        )
        if runtime is not None:
            runtime.check_state(state)
        return state
