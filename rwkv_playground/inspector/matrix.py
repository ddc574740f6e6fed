"""Looking inside RWKV-5/6/7's matrix state: recordings per token, per-token decays, the state
matrices, and the exact effective attention per head (numpy; no plotting, no Gradio).

`record_matrix_task(runtime, tokenizer, tokens)` reads the text once through the engine (the
heavy matmuls in sequence mode) and keeps, per token and layer, the recurrence's inputs
(r, k, v, the decay factor w; v7's removal key kk and in-context rate a), its output before the
group norm, and the state after every token, replayed from the captured inputs by the reference
recurrence (`wkv.py`: the engine's float32 arithmetic; tested equal to the engine's states). The
full [T, L, H, N, N] states are summarised at record time (norm, change per token) and kept at
every CHECKPOINT_EVERY-th token; a view of one layer and head replays at most that many tokens.

Effective attention, exactly (the state is linear in the values):
  RWKV-7   S_t = S_{t-1} M_t + v_t k_t^T, M_t = diag(w_t) - kk_t (kk_t * a_t)^T, y_t = S_t r_t, so
           y_t = sum_{i<=t} alpha[t, i] v_i + S_init M_0 ... M_t r_t with
           alpha[t, i] = k_i^T M_{i+1} ... M_t r_t  (one scalar per head and token pair);
  RWKV-5/6 y_t = r_t^T (diag(u) k_t v_t^T + S_{t-1}), S_t = k_t v_t^T + diag(w_t) S_{t-1}, so
           alpha[t, t] = sum_j r_t u k_t, alpha[t, i<t] = sum_j r_t k_i prod_{m=i+1}^{t-1} w_m,
           and the carried-in memory is r_t^T diag(prod_{m<t} w_m) S_init.
The weights are not a softmax: they may be negative and need not sum to 1 (RWKV-7 removes what it
overwrites). RWKV-7 adds a bonus after the group norm, (sum_j r_t k_t r_k) v_t: shown beside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import GenerationError
from .recording import RecordedText, check_index, check_window, read_observed
from ..serving.scheduler import run_here
from ..state import State
from ..wkv import effective_attention

MAX_RECORD_FLOATS = 400_000_000  # as inspection.py: ~1.6 GB of float32 across the recorded arrays
CHECKPOINT_EVERY = 16
# recorded besides the recurrence's own inputs (the architecture's `wkv.inputs`)
TOKEN_NAMES = ("wkv", "att_x", "ffn_x")


@dataclass
class MatrixRecording(RecordedText):
    architecture: str  # the name of a matrix-state architecture (models.by_name)
    tokens: list[int]
    token_texts: list[str]
    n_head: int
    head_size: int
    arrays: dict  # name -> [T, L, C] float32: r, k, v, w (decay factor), wkv (before ln_x), att_x, ffn_x; kk, a (v7)
    bonus: np.ndarray  # [L, H, N]: u (v5/v6) or r_k (v7)
    checkpoints: np.ndarray  # [ceil(T / 16), L, H, N, N]: the state after tokens 15, 31, ...
    initial: dict  # the state before the first token: att_x, wkv_state, ffn_x [L, ...]
    state_norm: np.ndarray  # [T, L, H] Frobenius norm of each head's state after each token
    state_change: np.ndarray  # [T, L, H] ||S_t - S_{t-1}|| / max(||S_t||, ||S_{t-1}||)
    surprisal: np.ndarray  # [T]
    fingerprint: str
    initial_count: int = 0

    @property
    def n_layer(self) -> int:
        return self.arrays["k"].shape[1]

    @property
    def n_embd(self) -> int:
        return self.arrays["k"].shape[2]

    def nbytes(self) -> int:
        return (sum(a.nbytes for a in self.arrays.values()) + self.checkpoints.nbytes + self.state_norm.nbytes
                + self.state_change.nbytes + self.surprisal.nbytes)

    def head(self, name: str, layer: int, head: int) -> np.ndarray:
        """[T, N]: one head's slice of a recorded per-token array."""
        layer, head = self._check(layer, head)
        N = self.head_size
        return self.arrays[name][:, layer, head * N:(head + 1) * N]

    def _check(self, layer: int, head: int | None = None) -> tuple:
        """The layer (and head) as indices, or one sentence naming the range."""
        layer = check_index("Layer", layer, self.n_layer)
        return (layer,) if head is None else (layer, check_index("Head", head, self.n_head))

    # ---- decay -------------------------------------------------------------------------------
    def decay(self, layer: int) -> np.ndarray:
        """[T, C]: the factor each channel's memory is multiplied by at each token (v5: the same at every token)."""
        (layer,) = self._check(layer)
        return self.arrays["w"][:, layer]

    def half_life(self, layer: int) -> np.ndarray:
        """[T, C]: tokens until a channel's memory halves at that token's decay, -ln 2 / ln w."""
        return matrix_half_life(self.decay(layer))

    # ---- the state matrices ------------------------------------------------------------------
    def state_at(self, t: int, layer: int, head: int) -> np.ndarray:
        """The N x N state of one head after token t (v7: [value, key]; v5/v6: [key, value])."""
        t = check_index("Token", t, self.n_tokens)
        layer, head = self._check(layer, head)
        c = t // CHECKPOINT_EVERY
        start = c * CHECKPOINT_EVERY
        if t == start + CHECKPOINT_EVERY - 1:
            return self.checkpoints[c, layer, head].astype(np.float64)
        S = (self.initial["wkv_state"][layer, head] if c == 0 else self.checkpoints[c - 1, layer, head])
        states = replay_head(self, layer, head, start, t + 1, S)
        return states[-1]

    def states_of_head(self, layer: int, head: int, start: int = 0, end: int | None = None) -> np.ndarray:
        """[end - start, N, N] float32: one head's state after tokens start .. end-1 (default: every
        token), replayed from the checkpoint before `start`."""
        layer, head = self._check(layer, head)
        start, end = check_window(start, end, self.n_tokens)
        S = self.initial["wkv_state"][layer, head] if start == 0 else self.state_at(start - 1, layer, head)
        return replay_head(self, layer, head, start, end, S).astype(np.float32)

    def effective_rank(self, layer: int, head: int, start: int = 0, end: int | None = None) -> np.ndarray:
        """[end - start]: exp(entropy of the normalised singular values) of the head's state after
        each token of the window (default: every token)."""
        states = self.states_of_head(layer, head, start, end)
        s = np.linalg.svd(states, compute_uv=False).astype(np.float64)  # [n, N]
        p = s / np.maximum(s.sum(axis=1, keepdims=True), 1e-30)
        entropy = -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=1)
        return np.exp(entropy)

    def full_state_at(self, t: int) -> State:
        """The engine State after token t (all layers), e.g. to export it."""
        t = check_index("Token", t, self.n_tokens)
        L, H = self.n_layer, self.n_head
        matrices = np.stack([np.stack([self.state_at(t, layer, h) for h in range(H)]) for layer in range(L)])
        return State({"att_x": torch.from_numpy(np.ascontiguousarray(self.arrays["att_x"][t])),
                      "wkv_state": torch.from_numpy(matrices.astype(np.float32)),
                      "ffn_x": torch.from_numpy(np.ascontiguousarray(self.arrays["ffn_x"][t]))},
                     architecture=self.architecture, token_count=self.initial_count + t + 1,
                     fingerprint=self.fingerprint)

    # ---- effective attention -----------------------------------------------------------------
    def attention(self, layer: int, head: int, t_from: int = 0, t_to: int | None = None):
        """Exact effective attention of one head over tokens [t_from, t_to): (alpha [n, n], carried
        [n, N]) - alpha[j, i] the weight of token t_from + i's value in the output at t_from + j
        (zero above the diagonal), carried[j] the output part from the memory before t_from."""
        layer, head = self._check(layer, head)
        t_from, t_to = check_window(t_from, t_to, self.n_tokens)
        S0 = (self.initial["wkv_state"][layer, head] if t_from == 0
              else self.state_at(t_from - 1, layer, head))
        recurrence = self.arch.wkv
        x = self.inputs_of_head(layer, head, t_from, t_to)
        return effective_attention(recurrence, x, S0, self.bonus[layer, head].astype(np.float64))

    def bonus_term(self, layer: int, head: int) -> np.ndarray:
        """[T]: the per-token weight of the token's own value (RWKV-5/6: sum_j r_t u k_t, inside the
        recurrence; RWKV-7: sum_j r_t k_t r_k, added after the group norm)."""
        layer, head = self._check(layer, head)
        return self.arch.wkv.bonus_weight(self.head("r", layer, head), self.head("k", layer, head),
                                          self.bonus[layer, head][None])

    def inputs_of_head(self, layer: int, head: int, start: int, end: int) -> dict:
        """The recurrence's inputs of one head over tokens start .. end-1: {name: [n, N] float64}."""
        return {name: self.head(name, layer, head)[start:end].astype(np.float64) for name in self.arch.wkv.inputs}


def matrix_half_life(w: np.ndarray) -> np.ndarray:
    """-ln 2 / ln w for a decay factor w in (0, 1): tokens until a memory halves (inf at w = 1)."""
    w = np.asarray(w, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return -math.log(2) / np.log(np.clip(w, 1e-300, 1.0))


def replay_head(rec: MatrixRecording, layer: int, head: int, start: int, end: int, S) -> np.ndarray:
    """[end - start, N, N] float64: one head's states after tokens start .. end-1 from S (the state
    before `start`), by the recurrence of the recording's architecture."""
    recurrence = rec.arch.wkv
    x = rec.inputs_of_head(layer, head, start, end)
    S = np.array(S, dtype=np.float64)
    out = np.empty((end - start, *S.shape))
    for i in range(end - start):
        S = recurrence.transition(S, {name: values[i] for name, values in x.items()})
        out[i] = S
    return out


def model_matrix_parameters(runtime) -> np.ndarray:
    """[L, H, N]: the bonus of every layer and head (u of v5/v6, r_k of v7)."""
    arch, c = runtime.architecture, runtime.config
    rows = [arch.bonus_of(block.att).detach().float().reshape(c.n_head, c.head_size) for block in runtime.model.blocks]
    return torch.stack(rows).cpu().numpy()


class _MatrixRecorder:
    """The observer passed to Runtime.forward: copies the recurrence's inputs and output of every
    layer into preallocated [T, L, C] arrays, chunk after chunk."""

    def __init__(self, names, T: int, L: int, C: int):
        self.store = {n: np.empty((T, L, C), dtype=np.float32) for n in names}
        self.offset = 0

    def __call__(self, layer: int, name: str, value: torch.Tensor) -> None:
        target = self.store.get(name)
        if target is not None:
            chunk = value[0].detach().float().cpu().reshape(value.shape[1], -1).numpy()
            target[self.offset:self.offset + chunk.shape[0], layer] = chunk


def record_matrix_task(runtime, tokenizer, tokens: list[int], state: State | None = None):
    """The recording as a scheduler task (yields (fraction, message), returns a MatrixRecording)."""
    arch = runtime.architecture
    if not arch.matrix_state:
        raise GenerationError(f"This recording reads a matrix state; {arch.title} has its own recording.")
    if not tokens:
        raise GenerationError("There is no text to record: type some text first.")
    c = runtime.config
    L, C, H, N = c.n_layer, c.n_embd, c.n_head, c.head_size
    T = len(tokens)
    names = arch.wkv.inputs + TOKEN_NAMES
    per_token = len(names) * L * C + 2 * L * H
    if T * per_token + (T // CHECKPOINT_EVERY + 1) * L * H * N * N > MAX_RECORD_FLOATS:
        limit = MAX_RECORD_FLOATS // (per_token + L * H * N * N // CHECKPOINT_EVERY + 1)
        raise GenerationError(f"That text is {T} tokens; this model can record at most {limit} tokens at a time.")
    recorder = _MatrixRecorder(names, T, L, C)
    initial, initial_count, surprisal = yield from read_observed(runtime, tokens, state, recorder, progress_share=0.8)
    store = recorder.store
    checkpoints, norms, change = _replay_all(arch.wkv, store, initial["wkv_state"], H, N)
    yield 1.0, "Replayed the states"
    return MatrixRecording(architecture=arch.name, tokens=list(tokens), token_texts=[tokenizer.token_text(t) for t in tokens],
                           n_head=H, head_size=N, arrays=store, bonus=model_matrix_parameters(runtime),
                           checkpoints=checkpoints, initial=initial, state_norm=norms, state_change=change,
                           surprisal=surprisal, fingerprint=runtime.fingerprint, initial_count=initial_count)


def _replay_all(recurrence, store, S0, H, N):
    """Every layer's states after every token by the reference recurrence (layers as the batch,
    float32 as the engine), summarised as they pass: checkpoints, norms and change per token (the
    states themselves, [L, T, H, N, N], are never all held)."""
    T, L, _ = store["k"].shape

    def heads(name):  # [T, L, C] -> [L, T, H, N]
        return torch.from_numpy(np.ascontiguousarray(store[name].transpose(1, 0, 2))).reshape(L, T, H, N)

    S_init = torch.from_numpy(np.ascontiguousarray(S0)).float()
    norms = torch.empty(T, L, H)
    diff = torch.empty(T, L, H)
    checkpoints = torch.empty(T // CHECKPOINT_EVERY, L, H, N, N)
    previous = {"S": S_init, "norm": torch.linalg.matrix_norm(S_init)}

    def summarise(t, S):
        norms[t] = norm = torch.linalg.matrix_norm(S)
        diff[t] = torch.linalg.matrix_norm(S - previous["S"]) / torch.maximum(norm, previous["norm"]).clamp_min(1e-12)
        previous["S"], previous["norm"] = S, norm
        if (t + 1) % CHECKPOINT_EVERY == 0:
            checkpoints[t // CHECKPOINT_EVERY] = S

    recurrence.run({name: heads(name) for name in recurrence.inputs}, S_init, each_state=summarise)
    return checkpoints.numpy(), norms.numpy(), diff.numpy()


def record_matrix(runtime, tokenizer, tokens: list[int], state: State | None = None) -> MatrixRecording:
    """Run `tokens` and record everything per token (scripts and notebooks; the app uses the scheduler)."""
    return run_here(record_matrix_task(runtime, tokenizer, tokens, state))
