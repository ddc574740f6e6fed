"""The recurrent state as a first-class object, for every architecture.

A state is a few named float32 tensors per layer, laid out by the architecture (`StateLayout`,
declared by each module of `models/`):

  RWKV-4       att_x, aa, bb, pp, ffn_x          each [n_layer, C]
               (aa / bb: the WKV numerator / denominator scaled by exp(-pp); pp starts at -1e30)
  RWKV-5/6/7   att_x [n_layer, C], wkv_state [n_layer, H, N, N], ffn_x [n_layer, C]
               (wkv_state: one N x N matrix per head; v5/v6 index it [key, value], v7 [value, key])

att_x / ffn_x are the LayerNorm outputs of the previous token (the token shifts). A batch adds a
leading B axis to every tensor. Memory is constant whatever the length of the text.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import LoadError, StateError

EMPTY_PP = -1e30
FORMAT_NAME = "rwkv-playground-state"
# RWKV-4's layout (files written before other architectures existed carry no architecture name)
RWKV4_COMPONENTS = ("att_x", "aa", "bb", "pp", "ffn_x")
MATRIX_COMPONENTS = ("att_x", "wkv_state", "ffn_x")


def _package_version() -> str:
    from .version import __version__

    return __version__


@dataclass(frozen=True)
class StateLayout:
    """What a model's state holds: per component, its shape per layer and its empty value."""
    architecture: str  # the name of the architecture (models.by_name)
    n_layer: int
    parts: tuple[tuple[str, tuple[int, ...], float], ...]  # (name, per-layer shape, fill)

    @classmethod
    def vector(cls, architecture: str, n_layer: int, n_embd: int) -> "StateLayout":
        """RWKV-4's layout: att_x, aa, bb, pp, ffn_x, each [C] per layer (pp starts at EMPTY_PP)."""
        fills = {"pp": EMPTY_PP}
        return cls(architecture, n_layer, tuple((n, (n_embd,), fills.get(n, 0.0)) for n in RWKV4_COMPONENTS))

    @classmethod
    def matrix(cls, architecture: str, n_layer: int, n_embd: int, n_head: int, head_size: int) -> "StateLayout":
        shapes = {"att_x": (n_embd,), "wkv_state": (n_head, head_size, head_size), "ffn_x": (n_embd,)}
        return cls(architecture, n_layer, tuple((n, shapes[n], 0.0) for n in MATRIX_COMPONENTS))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p[0] for p in self.parts)

    def nbytes(self) -> int:
        """Bytes of one sequence's state (float32)."""
        total = 0
        for _, shape, _ in self.parts:
            n = self.n_layer
            for d in shape:
                n *= d
            total += 4 * n
        return total


class State:
    """A recurrent state: named tensors (`state.att_x`, `state.wkv_state`, ...; see the module
    docstring), the tokens it has read, and the fingerprint of the model that made it."""

    def __init__(self, tensors: dict[str, torch.Tensor] | None = None, *, token_count: int | list[int] = 0,
                 fingerprint: str = "", metadata: dict | None = None, architecture: str | None = None,
                 **named: torch.Tensor):
        parts = dict(tensors) if tensors is not None else {}
        parts.update(named)
        if "att_x" not in parts:
            raise StateError("A state needs at least its token-shift tensor 'att_x'.")
        object.__setattr__(self, "_parts", parts)
        # Tokens consumed so far: an int for one sequence, a list of ints for a batch.
        self.token_count = token_count
        # Fingerprint of the model that produced this state ("" if unknown).
        self.fingerprint = fingerprint
        self.metadata = dict(metadata or {})
        # the name of the architecture that made it (models.by_name); "" when unknown (a state file
        # from before RWKV-5 carries none): a runtime whose layout it fits adopts it (check_state)
        self.architecture = architecture or ""

    def __getattr__(self, name: str):
        parts = self.__dict__.get("_parts")
        if parts is not None and name in parts:
            return parts[name]
        raise AttributeError(f"this state has no component '{name}'")

    def __setattr__(self, name, value):
        parts = self.__dict__.get("_parts")
        if parts is not None and name in parts:
            parts[name] = value
        else:
            object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{n}={list(t.shape)}" for n, t in self._parts.items())
        return f"State({self.architecture or '?'}: {shapes}, token_count={self.token_count})"

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def empty(cls, layout: StateLayout, batch: int | None = None, device="cpu", fingerprint: str = "") -> "State":
        lead = (layout.n_layer,) if batch is None else (batch, layout.n_layer)
        tensors = {name: torch.full(lead + shape, fill, dtype=torch.float32, device=device)
                   for name, shape, fill in layout.parts}
        count = 0 if batch is None else [0] * batch
        return cls(tensors, token_count=count, fingerprint=fingerprint, architecture=layout.architecture)

    @classmethod
    def zeros(cls, n_layer: int, n_embd: int, batch: int | None = None, device="cpu", fingerprint: str = ""):
        """An empty vector state of RWKV-4's layout, its architecture left to the runtime that
        reads it (other architectures: `State.empty(model.state_layout())`)."""
        return cls.empty(StateLayout.vector("", n_layer, n_embd), batch, device, fingerprint)

    # ---- shape --------------------------------------------------------------------------------
    @property
    def matrix_state(self) -> bool:
        """One N x N matrix per head (RWKV-5/6/7's wkv_state) rather than RWKV-4's aa / bb / pp."""
        return "wkv_state" in self._parts

    @property
    def is_batched(self) -> bool:
        return self.att_x.dim() == 3

    @property
    def batch_size(self) -> int | None:
        return self.att_x.shape[0] if self.is_batched else None

    @property
    def n_layer(self) -> int:
        return self.att_x.shape[-2]

    @property
    def n_embd(self) -> int:
        return self.att_x.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.att_x.device

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self._parts)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Each component's shape for one sequence ([n_layer, ...])."""
        skip = 1 if self.is_batched else 0
        return {n: tuple(t.shape[skip:]) for n, t in self._parts.items()}

    def _derive(self, tensors: dict[str, torch.Tensor], token_count) -> "State":
        return State(tensors, token_count=token_count, fingerprint=self.fingerprint,
                     metadata=dict(self.metadata), architecture=self.architecture)

    def _replace(self, fn) -> "State":
        count = list(self.token_count) if isinstance(self.token_count, list) else self.token_count
        return self._derive({name: fn(t) for name, t in self._parts.items()}, count)

    def clone(self) -> "State":
        return self._replace(lambda t: t.clone())

    def to(self, device) -> "State":
        return self._replace(lambda t: t.to(device))

    def assign(self, other: "State") -> None:
        """Copy other's tensors into this state's own memory (views of it see the change)."""
        for name, t in self._parts.items():
            t.copy_(getattr(other, name))

    def as_batch(self) -> "State":
        """A one-row batched view ([1, L, ...]) of a single-sequence state, sharing its memory."""
        return self._derive({name: t.unsqueeze(0) for name, t in self._parts.items()}, [int(self.token_count)])

    def single(self) -> "State":
        """The single-sequence view of a one-row batched state."""
        count = self.token_count[0] if isinstance(self.token_count, list) else self.token_count
        return self._derive({name: t[0] for name, t in self._parts.items()}, int(count))

    def unbind_views(self) -> list["State"]:
        """The rows of a batched state as single-sequence states sharing its memory."""
        return [self._derive({name: t[b] for name, t in self._parts.items()}, int(self.token_count[b]))
                for b in range(self.batch_size)]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._parts.values())

    # ---- batching -----------------------------------------------------------------------------
    @classmethod
    def stack(cls, states: list["State"]) -> "State":
        """Batch several single-sequence states into one [B, L, ...] state."""
        if not states:
            raise StateError("Cannot batch an empty list of states.")
        first = states[0]
        for s in states:
            if s.is_batched:
                raise StateError("State.stack takes single-sequence states.")
            if s.architecture != first.architecture or s.shapes() != first.shapes():
                raise StateError("Cannot batch states of different shapes.")
            if s.fingerprint and first.fingerprint and s.fingerprint != first.fingerprint:
                raise StateError("Cannot batch states from different models.")
        return State({name: torch.stack([getattr(s, name) for s in states]) for name in first._parts},
                     token_count=[int(s.token_count) for s in states], fingerprint=first.fingerprint,
                     architecture=first.architecture)

    def unbind(self) -> list["State"]:
        """Split a batched state into single-sequence states."""
        if not self.is_batched:
            return [self]
        return [State({name: t[b].clone() for name, t in self._parts.items()}, token_count=self.token_count[b],
                      fingerprint=self.fingerprint, architecture=self.architecture)
                for b in range(self.batch_size)]

    # ---- RWKV-4 comparisons (the (aa, bb, pp) triple is only defined up to a common scale) -----
    def value_estimate(self) -> torch.Tensor:
        """aa / bb: the decayed weighted average of past values each channel holds (RWKV-4)."""
        return self.aa / self.bb.clamp_min(1e-38)

    def log_mass(self) -> torch.Tensor:
        """pp + log(bb): the log of the total (decayed) weight of the memory (RWKV-4)."""
        return self.pp + torch.log(self.bb.clamp_min(1e-38))

    # ---- files --------------------------------------------------------------------------------
    def _file_parts(self, extra_metadata: dict | None) -> tuple[dict, dict]:
        meta = {
            "format": FORMAT_NAME,
            "architecture": self.architecture,
            "fingerprint": self.fingerprint,
            "n_layer": str(self.n_layer),
            "n_embd": str(self.n_embd),
            "token_count": json.dumps(self.token_count),
            "package_version": _package_version(),
        }
        if extra_metadata:
            meta["extra"] = json.dumps(extra_metadata)
        tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in self._parts.items()}
        return tensors, meta

    def save(self, path: str | os.PathLike, extra_metadata: dict | None = None) -> None:
        """Write the state to a .safetensors file with metadata (model fingerprint, shape, ...)."""
        from safetensors.torch import save_file

        tensors, meta = self._file_parts(extra_metadata)
        save_file(tensors, str(path), metadata=meta)

    def to_bytes(self, extra_tensors: dict[str, torch.Tensor] | None = None) -> bytes:
        """The state file's bytes (the session store keeps these), with optional extra tensors
        beside the state's (e.g. the logits after it), named `extra.<name>`."""
        from safetensors.torch import save

        tensors, meta = self._file_parts(None)
        for name, t in (extra_tensors or {}).items():
            tensors[f"extra.{name}"] = t.detach().to("cpu", torch.float32).contiguous()
        return save(tensors, metadata=meta)

    @classmethod
    def from_bytes(cls, data: bytes, runtime=None, name: str = "the state") -> tuple["State", dict]:
        """The inverse of to_bytes: (state, {name: extra tensor})."""
        from safetensors import SafetensorError
        from safetensors.torch import load

        try:
            tensors = load(bytes(data))
            meta = _metadata_of(bytes(data))
        except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
            raise LoadError(f"{name} is not a readable state file ({exc}).") from None
        extra = {k[len("extra."):]: tensors.pop(k) for k in list(tensors) if k.startswith("extra.")}
        return cls._from_parts(tensors, meta, name, runtime), extra

    @classmethod
    def load(cls, path: str | os.PathLike, runtime=None, device="cpu") -> "State":
        """Read a state file; with `runtime`, refuse a state of another architecture, shape or model."""
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
        return cls._from_parts(tensors, meta, path.name, runtime, device)

    @classmethod
    def _from_parts(cls, tensors: dict, meta: dict, name: str, runtime=None, device="cpu") -> "State":
        """A state from a state file's tensors and metadata, every shape checked first."""
        architecture = meta.get("architecture", "")  # (none in files from before RWKV-5)
        matrix = "wkv_state" in tensors
        expected = MATRIX_COMPONENTS if matrix else RWKV4_COMPONENTS
        if meta.get("format") != FORMAT_NAME or set(tensors) != set(expected):
            raise LoadError(f"{name} is not an RWKV Playground state file.")
        if any(t.dtype != torch.float32 for t in tensors.values()):
            raise LoadError(f"{name} is corrupt: a state holds float32 tensors.")
        leads = {tuple(t.shape[:1]) for t in tensors.values()}
        widths = {tensors[n].shape for n in expected if n != "wkv_state"}
        if len(leads) != 1 or len(widths) != 1 or tensors["att_x"].dim() != 2:
            raise LoadError(f"{name} is corrupt: its components have different shapes.")
        if matrix:
            L, C = tensors["att_x"].shape
            S = tensors["wkv_state"]
            if S.dim() != 4 or S.shape[2] != S.shape[3] or S.shape[1] * S.shape[2] != C:
                raise LoadError(f"{name} is corrupt: its matrix state does not fit its width.")
        state = cls(
            {k: tensors[k].to(device) for k in expected},
            token_count=json.loads(meta.get("token_count", "0")),
            fingerprint=meta.get("fingerprint", ""),
            metadata=json.loads(meta["extra"]) if "extra" in meta else {},
            architecture=architecture,
        )
        if runtime is not None:
            runtime.check_state(state)
        return state


def _metadata_of(data: bytes) -> dict:
    """The metadata of safetensors bytes (the format: an 8-byte header length, then JSON)."""
    length = int.from_bytes(data[:8], "little")
    if length <= 0 or length > len(data) - 8:
        raise ValueError("the header does not fit the data")
    return json.loads(data[8:8 + length]).get("__metadata__") or {}
