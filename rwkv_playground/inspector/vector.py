"""RWKV-4's vector state seen from inside: recordings per token, decays, half-lives, effective attention.

`record(runtime, tokenizer, tokens)` runs the text once and keeps, for every token and layer, the
WKV inputs (k, v), the WKV output, the token-shift vectors and the state (aa, bb, pp) *after*
that token (observed through the `observe` argument of Runtime.forward). The state is obtained
by replaying the WKV recurrence over the captured k, v - the
same float32 arithmetic as the engine's RNN step, so it equals the engine's state after each
token (tested) - while the heavy matmuls run once in sequence mode. Every view is then a cheap
slice of these arrays (numpy, no torch, no plotting here).

Effective attention (closed form for RWKV-4): in channel c at position t, token i < t has weight
e^{(t-1-i)w + k_i} / D_t, the current token e^{u + k_t} / D_t, and the memory carried in from
before the recording e^{t w + pp_0 + log bb_0} / D_t; the weights sum to 1 and
sum(weight * v) = wkv_t.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import GenerationError
from ..serving.scheduler import run_here
from ..state import State
from .recording import RecordedText, check_index, check_window, read_observed

MAX_RECORD_FLOATS = 400_000_000  # ~1.6 GB of float32 across all recorded arrays


@dataclass
class Recording(RecordedText):
    tokens: list[int]
    token_texts: list[str]
    time_decay: np.ndarray  # [L, C] raw parameter
    time_first: np.ndarray  # [L, C]
    k: np.ndarray  # [T, L, C]
    v: np.ndarray
    wkv: np.ndarray  # WKV output at each token
    aa: np.ndarray  # state after each token
    bb: np.ndarray
    pp: np.ndarray
    att_x: np.ndarray
    ffn_x: np.ndarray
    initial: dict  # the state before the first token: {"aa", "bb", "pp", "att_x", "ffn_x"} [L, C]
    surprisal: np.ndarray  # [T]: -log p(token_t | tokens before it); NaN for the first token
    fingerprint: str
    initial_count: int = 0  # tokens the starting state had already read
    architecture: str = ""  # the architecture that made it (models.by_name), set by record_task

    @property
    def n_layer(self) -> int:
        return self.k.shape[1]

    @property
    def n_embd(self) -> int:
        return self.k.shape[2]

    # ---- derived views (cheap slices) ----------------------------------------------------------
    def value_estimate(self, layer: int) -> np.ndarray:
        """aa / bb per token: [T, C]."""
        layer = check_index("Layer", layer, self.n_layer)
        return self.aa[:, layer] / np.maximum(self.bb[:, layer], 1e-38)

    def log_mass(self, layer: int) -> np.ndarray:
        """pp + log bb per token: [T, C]."""
        layer = check_index("Layer", layer, self.n_layer)
        return self.pp[:, layer] + np.log(np.maximum(self.bb[:, layer], 1e-38))

    def state_at(self, t: int) -> State:
        """The engine State after token t (e.g. to export it)."""
        t = check_index("Token", t, self.n_tokens)

        def pick(a):
            return torch.from_numpy(np.ascontiguousarray(a[t]))
        return State(att_x=pick(self.att_x), aa=pick(self.aa), bb=pick(self.bb), pp=pick(self.pp),
                     ffn_x=pick(self.ffn_x), token_count=int(self.initial_count) + t + 1,
                     fingerprint=self.fingerprint)

    def nbytes(self) -> int:
        arrays = [self.k, self.v, self.wkv, self.aa, self.bb, self.pp, self.att_x, self.ffn_x, self.surprisal]
        return sum(a.nbytes for a in arrays)

    def state_change(self) -> np.ndarray:
        """[T, L]: relative L2 change of each layer's state at each token, on the invariant parts
        (value estimate aa/bb, the two token-shift vectors). Computed once, then cached."""
        cached = self.__dict__.get("_state_change")
        if cached is None:
            cached = self.__dict__["_state_change"] = self._compute_state_change()
        return cached

    def _compute_state_change(self) -> np.ndarray:
        init_value = self.initial["aa"] / np.maximum(self.initial["bb"], 1e-38)
        value = self.aa / np.maximum(self.bb, 1e-38)
        parts_now = np.concatenate([value, self.att_x, self.ffn_x], axis=2)  # [T, L, 3C]
        prev0 = np.concatenate([init_value, self.initial["att_x"], self.initial["ffn_x"]], axis=1)[None]
        parts_prev = np.concatenate([prev0, parts_now[:-1]], axis=0)
        diff = np.linalg.norm(parts_now - parts_prev, axis=2)
        scale = np.maximum(np.linalg.norm(parts_prev, axis=2), np.linalg.norm(parts_now, axis=2))
        return diff / np.maximum(scale, 1e-12)


def decay_per_token(time_decay: np.ndarray) -> np.ndarray:
    """exp(-exp(time_decay)): the factor each channel's memory is multiplied by per token."""
    return np.exp(-np.exp(time_decay.astype(np.float64)))


def half_life(time_decay: np.ndarray) -> np.ndarray:
    """ln 2 / exp(time_decay): tokens until a channel's memory of a token has halved."""
    return math.log(2) / np.exp(time_decay.astype(np.float64))


def model_decay_parameters(runtime) -> tuple[np.ndarray, np.ndarray]:
    """time_decay and time_first of every layer: [L, C] each (RWKV-4)."""
    require_inspector(runtime, "The decay and bonus views")
    blocks = runtime.model.blocks
    td = np.stack([b.att.time_decay.detach().float().cpu().numpy() for b in blocks])
    tf = np.stack([b.att.time_first.detach().float().cpu().numpy() for b in blocks])
    return td, tf


class _Recorder:
    """The observer passed to Runtime.forward: copies k, v, wkv and the token-shift inputs of every
    layer into preallocated [T, L, C] arrays, chunk after chunk."""

    NAMES = ("k", "v", "wkv", "att_x", "ffn_x")

    def __init__(self, T: int, L: int, C: int):
        self.store = {n: np.empty((T, L, C), dtype=np.float32) for n in self.NAMES}
        self.offset = 0  # where the current chunk starts

    def __call__(self, layer: int, name: str, value: torch.Tensor) -> None:
        if name in self.store:
            chunk = value[0].detach().float().cpu().numpy()
            self.store[name][self.offset:self.offset + chunk.shape[0], layer] = chunk


def require_vector_views(arch, what: str = "The State inspector's vector views", verb: str = "read") -> None:
    """These views and experiments read RWKV-4's vector state; say so plainly for other
    architectures, in one sentence (`what` + `verb`: "The decay and bonus views" "read")."""
    if arch.inspector_views != "vector":
        raise GenerationError(
            f"{what} {verb} RWKV-4's vector state (aa, bb, pp); {arch.title}'s matrix state has its own views "
            "in the Matrix state tab and its own experiments in the Patching tab (restore, knock-outs, "
            "token removal, blend).")


def require_inspector(runtime, what: str = "The State inspector's vector views", verb: str = "read") -> None:
    require_vector_views(runtime.architecture, what, verb)


def record_task(runtime, tokenizer, tokens: list[int], state: State | None = None):
    """The recording as a task for the scheduler: a generator reading one chunk per next()
    (yielding (fraction, message)), whose return value is the Recording."""
    require_inspector(runtime)
    if not tokens:
        raise GenerationError("There is no text to record: type some text first.")
    L, C = runtime.config.n_layer, runtime.config.n_embd
    T = len(tokens)
    if 7 * T * L * C > MAX_RECORD_FLOATS:
        limit = MAX_RECORD_FLOATS // (7 * L * C)
        raise GenerationError(f"That text is {T} tokens; this model can record at most {limit} tokens at a time.")
    recorder = _Recorder(T, L, C)
    initial, initial_count, surprisal = yield from read_observed(runtime, tokens, state, recorder)

    store = recorder.store
    td, tf = model_decay_parameters(runtime)
    aa, bb, pp = _replay_wkv(-np.exp(td.astype(np.float32)), tf.astype(np.float32), store["k"], store["v"],
                             initial["aa"], initial["bb"], initial["pp"])
    return Recording(tokens=list(tokens), token_texts=[tokenizer.token_text(t) for t in tokens],
                     time_decay=td, time_first=tf, k=store["k"], v=store["v"], wkv=store["wkv"],
                     aa=aa, bb=bb, pp=pp, att_x=store["att_x"], ffn_x=store["ffn_x"], initial=initial,
                     surprisal=surprisal, fingerprint=runtime.fingerprint, initial_count=initial_count,
                     architecture=runtime.architecture.name)


def record(runtime, tokenizer, tokens: list[int], state: State | None = None) -> Recording:
    """Run `tokens` from `state` (default: empty) and record everything per token (the calling
    thread runs the model: scripts and notebooks; the app goes through its scheduler)."""
    return run_here(record_task(runtime, tokenizer, tokens, state))


def _replay_wkv(w, u, k, v, aa0, bb0, pp0):
    """The state after each token from the captured k, v [T, L, C]: the reference WKV with the
    layers as its batch (float32, the engine's RNN-step arithmetic). Returns aa, bb, pp [T, L, C]."""
    from ..wkv import wkv_reference

    def batch_first(a):
        return torch.from_numpy(np.ascontiguousarray(a.transpose(1, 0, 2)))

    *_, (aa, bb, pp) = wkv_reference(torch.from_numpy(w), torch.from_numpy(u), batch_first(k), batch_first(v),
                                     torch.from_numpy(aa0), torch.from_numpy(bb0), torch.from_numpy(pp0),
                                     return_states=True)
    return tuple(np.ascontiguousarray(t.numpy().transpose(1, 0, 2)) for t in (aa, bb, pp))


def effective_attention(rec: Recording, layer: int, channels, t_from: int = 0, t_to: int | None = None):
    """Weights of every earlier token in the WKV output, averaged over `channels`.

    Returns (weights [n, n + 1], prior [n]) for positions t in [t_from, t_to): weights[j, i] is
    the weight of token t_from + i in the output at t_from + j (zero above the diagonal; the
    diagonal is the current token's bonus share), and prior[j] the share of the memory carried in
    from before t_from (the initial state, or tokens before the window). Rows sum to 1.
    """
    layer = check_index("Layer", layer, rec.n_layer)
    channels = np.atleast_1d(np.asarray(channels, dtype=np.int64))
    if channels.size == 0 or channels.min() < 0 or channels.max() >= rec.n_embd:
        raise GenerationError(f"Channels must be between 0 and {rec.n_embd - 1}, and at least one.")
    t_from, t_to = check_window(t_from, t_to, rec.n_tokens)
    n = t_to - t_from
    w = -np.exp(rec.time_decay[layer, channels].astype(np.float64))  # [c]
    u = rec.time_first[layer, channels].astype(np.float64)
    k = rec.k[t_from:t_to, layer][:, channels].astype(np.float64)  # [n, c]
    if t_from == 0:
        prior_log = rec.initial["pp"][layer, channels].astype(np.float64) + np.log(
            np.maximum(rec.initial["bb"][layer, channels].astype(np.float64), 1e-300))
    else:
        prior_log = rec.pp[t_from - 1, layer, channels].astype(np.float64) + np.log(
            np.maximum(rec.bb[t_from - 1, layer, channels].astype(np.float64), 1e-300))
    j = np.arange(n)[:, None, None]
    i = np.arange(n)[None, :, None]
    # exponent of token i in the output at j: (j-1-i)w + k_i for i < j, u + k_j for i = j
    expo = np.where(i < j, (j - 1 - i) * w[None, None, :] + k[None, :, :],
                    np.where(i == j, u[None, None, :] + k[:, None, :], -np.inf))
    prior_expo = j[:, 0, :] * w[None, :] + prior_log[None, :]  # carried-in memory, decayed j steps
    top = np.maximum(expo.max(axis=1), prior_expo)  # [n, c]
    weights = np.exp(expo - top[:, None, :])
    prior = np.exp(prior_expo - top)
    total = weights.sum(axis=1) + prior
    weights = weights / total[:, None, :]
    prior = prior / total
    return weights.mean(axis=2), prior.mean(axis=1)


def compare_states(a: State, b: State) -> dict:
    """Per layer and component: cosine similarity and relative L2 distance, plus the channels that
    differ most. aa/bb and pp+log bb are compared instead of the raw (non-unique) triple."""
    if (a.n_layer, a.n_embd) != (b.n_layer, b.n_embd):
        raise GenerationError("These states come from models of different shapes.")
    views = {
        "att_x": (a.att_x, b.att_x), "ffn_x": (a.ffn_x, b.ffn_x),
        "value (aa/bb)": (a.value_estimate(), b.value_estimate()),
        "memory mass (pp+log bb)": (a.log_mass(), b.log_mass()),
    }
    rows = []
    top = []
    for name, (x, y) in views.items():
        x, y = x.float().cpu(), y.float().cpu()
        for layer in range(a.n_layer):
            xa, ya = x[layer], y[layer]
            cos = float(torch.nn.functional.cosine_similarity(xa, ya, dim=0))
            rel = float((xa - ya).norm() / max(float(xa.norm()), float(ya.norm()), 1e-12))
            rows.append({"component": name, "layer": layer, "cosine": round(cos, 6), "relative_l2": round(rel, 6)})
            diff = (xa - ya).abs()
            for c in torch.topk(diff, min(3, diff.numel())).indices.tolist():
                top.append({"component": name, "layer": layer, "channel": c, "abs_diff": float(diff[c])})
    top.sort(key=lambda r: -r["abs_diff"])
    return {"per_layer": rows, "top_channels": top[:20]}
