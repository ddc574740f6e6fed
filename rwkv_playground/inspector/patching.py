"""Experiments that move state between runs, on every architecture (RWKV-4's vector state and
RWKV-5/6/7's matrix state alike; no Gradio, no plotting).

- **patching from a clean run**: two texts of the same length (clean, corrupted). Read the
  corrupted text; just after token `position`, restore a part of the state (a layer, a head's
  matrix, a group of channels) from the clean run, and read on. At every later token: how much of
  the clean prediction returned, recovery = (log p_patched - log p_corrupted) / (log p_clean -
  log p_corrupted) of the clean run's most likely token (1: all of it, 0: none), and the KL
  divergence from the clean distribution.
- **restore sweep** (the causal trace of the RWKV-4 paper, restoring instead of erasing): every
  layer restored after each of the `window` tokens before `target`, the recovery of the clean
  prediction at `target`; every row in one batch, read segment by segment.
- **remove a token**: subtract exactly one earlier token's contribution from a layer's memory
  (RWKV-5/6/7: its value times its decayed key, carried through every later transition; RWKV-4:
  its e^{k} v term and e^{k} weight) and read on.
- **blend**: interpolate the states of two texts after a token (alpha from 0 to 1) and read the
  next-token distribution and a short greedy continuation from each blend.
- **knock-outs of any part**: `patch(..., kind="erase")` empties a head's matrix, matrix rows or
  columns; `kind="decay"` sets the decay factor of a layer, a head or key channels to `decay` for
  every later token (1: the part keeps everything, 0: it forgets at once). The decay acts on the
  key index of the matrix: RWKV-5/6's rows, RWKV-7's columns.
- **two models on one text**: per-token surprisal, per-layer median half-life and every channel's
  half-life side by side.

Positions are token indices; "after position t" means after reading token t.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import GenerationError
from ..models import by_name
from ..models.common import Edits
from .knockouts import logits_chunk_len
from .recording import read_observed
from ..serving.scheduler import run_here
from ..state import EMPTY_PP, State

SCORE_BLOCK = 32  # positions scored at once from a batch's logits
MAX_COMPARE_FLOATS = 400_000_000  # decays kept to compare two models (as the inspector's recording: ~1.6 GB)


@dataclass(frozen=True)
class StatePart:
    """A part of one layer's state: the whole layer, one head's matrix (RWKV-5/6/7), or channels
    (RWKV-4: aa, bb, pp and both token shifts; RWKV-5/6/7: the token shifts and those rows or
    columns of every head's matrix: `axis` "rows" or "columns", in the matrix's own index order)."""

    layer: int
    head: int | None = None
    channels: tuple[int, ...] | None = None
    axis: str = "rows"

    @property
    def label(self) -> str:
        if self.head is not None:
            return f"L{self.layer} head {self.head}"
        if self.channels is not None:
            ch = self.channels
            span = f"{ch[0]}-{ch[-1]}" if len(ch) > 1 and list(ch) == list(range(ch[0], ch[-1] + 1)) else ",".join(map(str, ch[:6]))
            return f"L{self.layer} ch {span}"
        return f"L{self.layer}"

    def validate(self, state: State) -> None:
        L = state.n_layer
        if not 0 <= self.layer < L:
            raise GenerationError(f"Layer {self.layer} does not exist: this model has layers 0 to {L - 1}.")
        matrix = state.matrix_state
        if self.head is not None:
            if not matrix:
                raise GenerationError("This model's vector state has no heads: choose a layer or channels.")
            H = state.wkv_state.shape[-3]
            if not 0 <= self.head < H:
                raise GenerationError(f"Head {self.head} does not exist: this model has heads 0 to {H - 1}.")
        if self.channels is not None:
            limit = state.wkv_state.shape[-1] if matrix and self.axis in ("rows", "columns") else state.n_embd
            if not self.channels or min(self.channels) < 0 or max(self.channels) >= limit:
                raise GenerationError(f"Channels must be between 0 and {limit - 1}, and at least one.")
        if self.axis not in ("rows", "columns"):
            raise GenerationError("The axis of a matrix part is 'rows' or 'columns'.")

    def views(self, state: State) -> list[torch.Tensor]:
        """The tensors (views into a single-sequence state) this part covers."""
        i = self.layer
        if not state.matrix_state:
            if self.channels is None:
                return [getattr(state, n)[i] for n in ("att_x", "aa", "bb", "pp", "ffn_x")]
            ch = torch.tensor(self.channels)
            return [_IndexView(getattr(state, n)[i], ch) for n in ("att_x", "aa", "bb", "pp", "ffn_x")]
        if self.head is not None:
            return [state.wkv_state[i, self.head]]
        if self.channels is None:
            return [state.att_x[i], state.wkv_state[i], state.ffn_x[i]]
        ch = torch.tensor(self.channels)
        S = state.wkv_state[i]
        return [_IndexView(S, ch, dim=1 if self.axis == "rows" else 2)]

    def copy(self, target: State, source: State) -> None:
        """Set this part of `target` to `source`'s (both single-sequence states, same model)."""
        for t, s in zip(self.views(target), self.views(source)):
            t.copy_(s)

    def decay_mask(self, state: State) -> torch.Tensor:
        """Where this part's decay lives: [H, N] bool over (head, key channel) for RWKV-5/6/7, [C]
        for RWKV-4. The value axis (RWKV-5/6's columns, RWKV-7's rows) has no decay of its own."""
        if not state.matrix_state:
            mask = torch.zeros(state.n_embd, dtype=torch.bool)
            mask[list(self.channels) if self.channels is not None else slice(None)] = True
            return mask
        H, N = state.wkv_state.shape[-3], state.wkv_state.shape[-1]
        mask = torch.zeros(H, N, dtype=torch.bool)
        if self.head is not None:
            mask[self.head] = True
        elif self.channels is not None:
            arch = by_name(state.architecture)
            key_axis = arch.wkv.key_axis
            if self.axis != key_axis:
                raise GenerationError(f"The decay acts on the key channels, which are the matrix's {key_axis} in "
                                      f"{arch.title}: change the decay of {key_axis}, or erase {self.axis}.")
            mask[:, list(self.channels)] = True
        else:
            mask[:] = True
        return mask

    def erase(self, target: State) -> None:
        """Set this part to an empty memory (RWKV-4: aa = bb = 0, pp = empty; otherwise zeros)."""
        for n, t in zip(("att_x", "aa", "bb", "pp", "ffn_x"), self.views(target)):
            t.fill_(EMPTY_PP if not target.matrix_state and n == "pp" else 0.0)


class _IndexView:
    """Channels of a tensor along one dimension, assignable like a view (index_copy_)."""

    def __init__(self, tensor: torch.Tensor, index: torch.Tensor, dim: int = 0):
        self.tensor, self.index, self.dim = tensor, index, dim

    def copy_(self, other: "_IndexView") -> None:
        self.tensor.index_copy_(self.dim, self.index, other.tensor.index_select(other.dim, other.index))

    def fill_(self, value: float) -> None:
        self.tensor.index_fill_(self.dim, self.index, value)


def _check(runtime, *texts) -> list[list[int]]:
    out = []
    for tokens in texts:
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise GenerationError("There is no text to experiment on: type some text first.")
        if min(tokens) < 0 or max(tokens) >= runtime.config.vocab_size:
            raise GenerationError("The text has token ids this model does not know.")
        out.append(tokens)
    return out


def _texts(tokenizer, ids) -> list[str]:
    return [tokenizer.token_text(int(t)) for t in ids] if tokenizer else [str(int(t)) for t in ids]


def _recovery(lp_row, lp_corrupt, lp_clean):
    """(row - corrupted) / (clean - corrupted); NaN where the two runs agree (nothing to recover)."""
    gap = lp_clean - lp_corrupt
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(np.abs(gap) > 1e-6, (lp_row - lp_corrupt) / gap, np.nan)


# ---- patching from a clean run ---------------------------------------------------------------------

@dataclass
class PatchResult:
    """Rows: the corrupted run, then one per restored part. Columns: positions position .. T-1."""

    clean_tokens: list[int]
    corrupt_tokens: list[int]
    token_texts: list[str]  # the corrupted text's tokens
    position: int
    labels: list[str]
    clean_top: list[int]  # the clean run's most likely next token at each position
    clean_top_texts: list[str]
    log_prob: np.ndarray  # [K + 1, P] log p(clean top token) per row (row 0: corrupted, unpatched)
    clean_log_prob: np.ndarray  # [P]
    kl: np.ndarray  # [K + 1, P] KL(clean || row)
    recovery: np.ndarray  # [K, P]

    @property
    def positions(self) -> np.ndarray:
        return np.arange(self.position, len(self.corrupt_tokens))

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["part", "position", "token", "clean_top", "recovery", "kl_from_clean"])
        for k, label in enumerate(self.labels):
            for j, pos in enumerate(self.positions):
                writer.writerow([label, int(pos), self.token_texts[pos], self.clean_top_texts[j],
                                 f"{self.recovery[k, j]:.6g}", f"{self.kl[k + 1, j]:.6g}"])
        return out.getvalue()

    def to_json(self) -> str:
        return json.dumps({"position": self.position, "parts": self.labels, "positions": self.positions.tolist(),
                           "clean_top": self.clean_top, "recovery": _nan_to_none(self.recovery),
                           "kl_from_clean": self.kl.tolist(), "corrupted_kl": self.kl[0].tolist()})


def _nan_to_none(a):
    return [[None if not math.isfinite(float(x)) else float(x) for x in row] for row in a]


def _read_rows(runtime, row_tokens: list[list[int]], rows: State, on_chunk, **options):
    """Read each row's tokens (all the same length) from the batched `rows`, advanced in place,
    a chunk of positions at a time: the logits held at once stay within MAX_BATCH_LOGITS however
    many rows, tokens and vocabulary (a G1 model's 65536 x 129 rows x 1000 tokens would be 34 GB).
    on_chunk(logits [B, n, V], offset) measures each chunk as it comes; yields the fraction read.
    options: runtime.forward's options (edits=Edits(...))."""
    tokens = torch.tensor(row_tokens, dtype=torch.long)
    T = tokens.shape[1]
    step = logits_chunk_len(runtime, tokens.shape[0])
    for a in range(0, T, step):
        b = min(T, a + step)
        logits, _ = runtime.forward(tokens[:, a:b], rows, full_output=True, inplace=True, **options)
        on_chunk(logits, a)
        yield b / T


def _decay_edits(runtime, parts: list[StatePart], state: State, factor: float, first_row: int = 1) -> dict:
    """{layer: decay rows} (models.common.Edits.decay) for a batch whose rows first_row.. are the
    parts, each with its decay factor set to `factor` (the rows before keep the model's own)."""
    arch = runtime.architecture
    B = len(parts) + first_row
    edits: dict[int, torch.Tensor] = {}
    for row, part in enumerate(parts, start=first_row):
        layer = edits.setdefault(part.layer, arch.decay_rows(runtime.model, part.layer, B))
        layer[row][part.decay_mask(state)] = arch.decay_value(factor)
    return edits


def patch_task(runtime, tokenizer, clean_tokens, corrupt_tokens, position: int, parts: list[StatePart],
               state: State | None = None, kind: str = "restore", decay: float | None = None):
    """Restore each part from the clean run just after `position` of the corrupted text (a
    scheduler task; returns a PatchResult). The clean reading, the corrupted one and every patched
    row read the rest as one batch, scored chunk by chunk. Knock-outs (pass the same text twice
    to measure them against the unedited reading: the KL row of each part): kind "erase" empties
    each part instead; kind "decay" sets each part's decay factor to `decay` (0 to 1) for every
    token after `position`."""
    if kind not in ("restore", "erase", "decay"):
        raise GenerationError("A patch restores, erases or changes the decay.")
    if kind == "decay" and (decay is None or not 0 <= float(decay) <= 1):
        raise GenerationError("A decay knock-out needs the new decay factor, between 0 (forget at once) and 1 "
                              "(keep everything).")
    clean, corrupt = _check(runtime, clean_tokens, corrupt_tokens)
    T = len(corrupt)
    if len(clean) != T:
        raise GenerationError(f"The clean and corrupted texts must have the same number of tokens "
                              f"({len(clean)} and {T}): patching compares them position by position.")
    if not 0 <= position < T:
        raise GenerationError(f"Position {position} is outside the text (0 to {T - 1}).")
    if not parts:
        raise GenerationError("Choose at least one part of the state to restore.")
    start = state.clone() if state is not None else runtime.new_state()
    for p in parts:
        p.validate(start)
    K1 = len(parts) + 1
    # batch rows: 0 the corrupted reading, 1 the clean one, 2.. the corrupted one with a part patched
    # (which reads as row 0 below the part's layer: those layers are computed once)
    decays = _decay_edits(runtime, parts, start, float(decay), first_row=2) if kind == "decay" else {}
    clean_after = start.clone()
    clean_last, _ = runtime.forward(clean[:position + 1], clean_after, inplace=True)
    yield 0.1, "Read the clean text up to the patch"
    base = start.clone()
    corrupt_last, _ = runtime.forward(corrupt[:position + 1], base, inplace=True)
    yield 0.2, "Read the corrupted text up to the patch"
    rows = State.stack([base, clean_after] + [base] * len(parts))
    for single, part in zip(rows.unbind_views()[2:], parts):
        if kind == "erase":
            part.erase(single)
        elif kind == "restore":
            part.copy(single, clean_after)
    P = T - position
    top = np.zeros(P, dtype=np.int64)  # the clean run's most likely next token
    clean_top_lp = np.zeros(P)
    row_lp = np.zeros((K1, P))
    kl = np.zeros((K1, P))

    measured = torch.tensor([0] + list(range(2, K1 + 1)))  # the corrupted rows: unpatched, then each part

    def score(log_p, cols):  # log_p [K1 + 1, n, V] float32, row 1 clean: the columns' measures, nothing kept
        clean_lp, log_p = log_p[1], log_p[measured]
        best = clean_lp.argmax(-1)
        top[cols] = best.numpy()
        clean_top_lp[cols] = clean_lp.gather(1, best[:, None])[:, 0].double().numpy()
        row_lp[:, cols] = log_p.gather(2, best.expand(K1, -1)[..., None])[..., 0].double().numpy()
        kl[:, cols] = (clean_lp.exp()[None] * (clean_lp[None] - log_p)).sum(-1).clamp_min(0).double().numpy()

    def score_chunk(logits, offset):  # blocks of positions: the [K1 + 1, block, V] work stays in cache
        for a in range(0, logits.shape[1], SCORE_BLOCK):
            b = min(logits.shape[1], a + SCORE_BLOCK)
            score(torch.log_softmax(logits[:, a:b].float(), -1), slice(offset + a + 1, offset + b + 1))

    # patching after `position` changes nothing at `position` itself
    first = torch.stack([corrupt_last, clean_last] + [corrupt_last] * len(parts))[:, None]
    score(torch.log_softmax(first.float(), -1), slice(0, 1))
    if position + 1 < T:
        rest = [corrupt[position + 1:], clean[position + 1:]] + [corrupt[position + 1:]] * len(parts)
        first_layers = [0, 0] + [p.layer for p in parts]
        for done in _read_rows(runtime, rest, rows, score_chunk, edits=Edits(decays, first_layers)):
            yield 0.2 + 0.75 * done, f"Read the rest of the text with each patch ({done:.0%})"
    recovery = _recovery(row_lp[1:], row_lp[:1], clean_top_lp[None])
    return PatchResult(clean_tokens=clean, corrupt_tokens=corrupt, token_texts=_texts(tokenizer, corrupt),
                       position=position, labels=[p.label for p in parts], clean_top=top.tolist(),
                       clean_top_texts=_texts(tokenizer, top.tolist()), log_prob=row_lp, clean_log_prob=clean_top_lp,
                       kl=kl, recovery=recovery)


# ---- the restore sweep (causal trace) ----------------------------------------------------------------

@dataclass
class RestoreSweep:
    """recovery[g, j]: how much of the clean prediction at `target` returns when part g is restored
    from the clean run just after positions[j] of the corrupted text."""

    token_texts: list[str]
    target: int
    answer: int  # the clean run's most likely next token after `target`
    answer_text: str
    clean_log_prob: float
    corrupt_log_prob: float
    labels: list[str]
    positions: list[int]
    log_prob: np.ndarray  # [G, J]
    recovery: np.ndarray  # [G, J]

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["part", "position", "token", "log_prob_answer", "recovery"])
        for g, label in enumerate(self.labels):
            for j, pos in enumerate(self.positions):
                writer.writerow([label, pos, self.token_texts[pos], f"{self.log_prob[g, j]:.6g}",
                                 f"{self.recovery[g, j]:.6g}"])
        return out.getvalue()

    def to_json(self) -> str:
        return json.dumps({"target": self.target, "answer": self.answer, "answer_text": self.answer_text,
                           "clean_log_prob": self.clean_log_prob, "corrupt_log_prob": self.corrupt_log_prob,
                           "parts": self.labels, "positions": self.positions,
                           "recovery": _nan_to_none(self.recovery), "log_prob": self.log_prob.tolist()})


def restore_sweep_task(runtime, tokenizer, clean_tokens, corrupt_tokens, target: int | None = None,
                       window: int = 32, parts: list[StatePart] | None = None, state: State | None = None):
    """Every part (default: each layer) restored after each of the `window` positions before
    `target` (default: the last token); one batch whose rows join as the corrupted reading passes
    their position, read segment by segment (a scheduler task; returns a RestoreSweep)."""
    clean, corrupt = _check(runtime, clean_tokens, corrupt_tokens)
    T = len(corrupt)
    if len(clean) != T:
        raise GenerationError(f"The clean and corrupted texts must have the same number of tokens "
                              f"({len(clean)} and {T}).")
    target = T - 1 if target is None else int(target)
    if not 1 <= target < T:
        raise GenerationError(f"The target must be one of positions 1 to {T - 1} (it needs a past).")
    start = state.clone() if state is not None else runtime.new_state()
    parts = parts or [StatePart(layer) for layer in range(runtime.config.n_layer)]
    for p in parts:
        p.validate(start)
    first = max(0, target - max(1, window))
    positions = list(range(first, target))
    # the clean run: its state after each window position, and its prediction at the target
    clean_state = start.clone()
    if first > 0:
        runtime.forward(clean[:first], clean_state, inplace=True)
    clean_after = []
    for pos in positions:
        runtime.forward([clean[pos]], clean_state, inplace=True)
        clean_after.append(clean_state.clone())
    clean_logits, _ = runtime.forward([clean[target]], clean_state)
    clean_lp = torch.log_softmax(clean_logits.double(), -1)
    answer = int(clean_lp.argmax())
    yield 0.2, "Read the clean text"
    base = start.clone()
    if first > 0:
        runtime.forward(corrupt[:first], base, inplace=True)
    rows: State | None = None
    n_rows = len(parts) * len(positions)
    log_prob = np.zeros(n_rows)
    corrupt_lp = None
    for j, pos in enumerate(positions):
        # the unpatched reading moves on by one token; then new rows restore each part after pos
        runtime.forward([corrupt[pos]], base, inplace=True)
        fresh = []
        for part in parts:
            row = base.clone()
            part.copy(row, clean_after[j])
            fresh.append(row)
        if rows is None:
            rows = State.stack(fresh)
        else:
            advance = corrupt[pos]  # rows already running read this token too
            runtime.forward(torch.tensor([[advance]] * rows.batch_size), rows, inplace=True)
            rows = State.stack(rows.unbind() + fresh)
        yield 0.2 + 0.7 * (j + 1) / len(positions), f"Restore sweep: position {j + 1} of {len(positions)}"
    # every row has read up to target - 1; the target token gives the prediction
    logits, _ = runtime.forward(torch.tensor([[corrupt[target]]] * rows.batch_size), rows, inplace=True)
    row_lp = torch.log_softmax(logits.double(), -1)[:, answer].numpy()
    corrupt_logits, _ = runtime.forward([corrupt[target]], base)
    corrupt_lp = float(torch.log_softmax(corrupt_logits.double(), -1)[answer])
    # rows were appended position by position, parts within each: [J, G] -> [G, J]
    log_prob = row_lp.reshape(len(positions), len(parts)).T.copy()
    recovery = _recovery(log_prob, corrupt_lp, float(clean_lp[answer]))
    return RestoreSweep(token_texts=_texts(tokenizer, corrupt), target=target, answer=answer,
                        answer_text=_texts(tokenizer, [answer])[0], clean_log_prob=float(clean_lp[answer]),
                        corrupt_log_prob=corrupt_lp, labels=[p.label for p in parts], positions=positions,
                        log_prob=log_prob, recovery=recovery)


# ---- remove one token from a layer's memory ---------------------------------------------------------

def token_contribution(runtime, tokens, token: int, upto: int, layer: int, state: State | None = None):
    """What token `token` added to layer `layer`'s WKV memory, as it stands after position `upto`:
    RWKV-5/6: (prod_{token<m<=upto} w_m * k) v^T per head; RWKV-7: v k^T M_{token+1} ... M_upto;
    RWKV-4: (e^{k} v, e^{k}) decayed by e^{(upto - token) w}, on the scale of pp. Returns tensors
    shaped like the layer's part of the state: {"wkv_state"} or {"aa", "bb"} (with "pp")."""
    if not 0 <= token <= upto < len(tokens):
        raise GenerationError("The removed token must come at or before the position it is removed at.")
    arch = runtime.architecture
    chunks: dict[str, list[torch.Tensor]] = {}

    def observe(i, name, value):  # called chunk by chunk of the reading
        if i == layer:
            chunks.setdefault(name, []).append(value[0].detach().double())

    start = state.clone() if state is not None else runtime.new_state()
    runtime.forward(tokens[:upto + 1], start, observe=observe)
    seen = {name: torch.cat(parts) for name, parts in chunks.items()}
    c = runtime.config
    if arch.matrix_state:
        recurrence = arch.wkv
        x = {n: seen[n].reshape(-1, c.n_head, c.head_size) for n in recurrence.inputs}  # [T, H, N]
        contrib = recurrence.write({n: x[n][token] for n in x})  # the token's own term, [H, N, N]
        for m in range(token + 1, upto + 1):  # carried through every later token's decay
            contrib = recurrence.decay_state(contrib, {n: x[n][m] for n in x})
        return {"wkv_state": contrib}
    # RWKV-4: the state holds (aa, bb) scaled by e^{-pp}; the token's term is e^{k + (upto - token) w}
    time_decay = -torch.exp(runtime.model.blocks[layer].att.time_decay.detach().double())
    k, v = seen["k"][token], seen["v"][token]
    return {"log_weight": k + (upto - token) * time_decay, "v": v}


def remove_token(runtime, state: State, contribution: dict, layer: int) -> State:
    """A copy of `state` (single sequence) with the contribution subtracted from layer `layer`."""
    out = state.clone()
    if "wkv_state" in contribution:
        out.wkv_state[layer] -= contribution["wkv_state"].to(out.wkv_state.dtype)
        return out
    pp = out.pp[layer].double()
    scale = torch.exp(contribution["log_weight"] - pp)  # the token's weight on the state's scale
    out.aa[layer] = (out.aa[layer].double() - scale * contribution["v"]).float()
    out.bb[layer] = (out.bb[layer].double() - scale).clamp_min(0).float()
    return out


@dataclass
class RemovalResult:
    token_texts: list[str]
    removed: int
    at: int
    layers: list[int]
    kl: np.ndarray  # [P] KL(original || removed) of the next-token distribution, positions at .. T-1
    surprisal: np.ndarray  # [2, P] -log p(actual next token): original, removed (NaN at the end)
    top_texts: list[list[str]] = field(default_factory=list)  # [2][P] most likely next token

    def to_json(self) -> str:
        return json.dumps({"removed": self.removed, "at": self.at, "layers": self.layers, "kl": self.kl.tolist(),
                           "surprisal": _nan_to_none(self.surprisal), "top": self.top_texts})

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["position", "token", "kl", "surprisal_original", "surprisal_removed"])
        for j in range(len(self.kl)):
            writer.writerow([self.at + j, self.token_texts[self.at + j], f"{self.kl[j]:.6g}",
                             f"{self.surprisal[0, j]:.6g}", f"{self.surprisal[1, j]:.6g}"])
        return out.getvalue()


def remove_token_task(runtime, tokenizer, tokens, removed: int, at: int, layers: list[int] | None = None,
                      state: State | None = None):
    """Subtract token `removed`'s contribution from the chosen layers' memory just after position
    `at`, then read the rest of the text; compared with the unedited reading (returns a RemovalResult)."""
    (tokens,) = _check(runtime, tokens)
    T = len(tokens)
    if not 0 <= removed <= at < T:
        raise GenerationError(f"Remove a token at or before the position it is removed at (0 <= token <= at < {T}).")
    layers = list(range(runtime.config.n_layer)) if layers is None else [int(x) for x in layers]
    start = state.clone() if state is not None else runtime.new_state()
    for layer in layers:
        StatePart(layer).validate(start)
    original = start.clone()
    runtime.forward(tokens[:at + 1], original, inplace=True)
    edited = original
    for layer in layers:
        edited = remove_token(runtime, edited, token_contribution(runtime, tokens, removed, at, layer, state), layer)
    yield 0.5, "Removed the token"
    rows = State.stack([original, edited])
    P = T - at - 1
    kl = np.zeros(P)
    surprisal = np.full((2, P), np.nan)  # the last position has no next token to be surprised by
    top = np.zeros((2, P), dtype=np.int64)
    following = torch.tensor(tokens[at + 2:] + [0])

    def score(logits, offset):
        log_p = torch.log_softmax(logits.double(), -1)  # [2, n, V]
        cols = slice(offset, offset + log_p.shape[1])
        kl[cols] = (log_p[0].exp() * (log_p[0] - log_p[1])).sum(-1).clamp_min(0).numpy()
        surprisal[:, cols] = (-log_p.gather(2, following[cols].expand(2, -1)[..., None])[..., 0]).numpy()
        top[:, cols] = log_p.argmax(-1).numpy()

    if P:
        for done in _read_rows(runtime, [tokens[at + 1:]] * 2, rows, score):
            yield 0.5 + 0.45 * done, f"Read the rest of the text with and without the token ({done:.0%})"
        surprisal[:, -1] = np.nan
    return RemovalResult(token_texts=_texts(tokenizer, tokens), removed=removed, at=at + 1, layers=layers,
                         kl=kl, surprisal=surprisal, top_texts=[_texts(tokenizer, row.tolist()) for row in top])


# ---- blend two states -------------------------------------------------------------------------------

def blend_states(a: State, b: State, alpha: float) -> State:
    """(1 - alpha) a + alpha b. RWKV-4's (aa, bb, pp) are blended as the sums they stand for
    (aa e^{pp}, bb e^{pp}), on the larger of the two scales, so the blend is the same memory mixed."""
    if a.architecture != b.architecture or a.shapes() != b.shapes():
        raise GenerationError("These states come from different models.")
    out = a.clone()
    if a.matrix_state:
        for name, t in out.tensors().items():
            t.copy_((1 - alpha) * a.tensors()[name] + alpha * b.tensors()[name])
        return out
    for name in ("att_x", "ffn_x"):
        getattr(out, name).copy_((1 - alpha) * getattr(a, name) + alpha * getattr(b, name))
    pa, pb = a.pp.double(), b.pp.double()
    p = torch.maximum(pa, pb)
    ea, eb = (1 - alpha) * torch.exp(pa - p), alpha * torch.exp(pb - p)
    out.aa.copy_(ea * a.aa.double() + eb * b.aa.double())
    out.bb.copy_(ea * a.bb.double() + eb * b.bb.double())
    out.pp.copy_(p)
    return out


@dataclass
class BlendResult:
    alphas: list[float]
    top_texts: list[list[str]]  # [A][top_k]
    top_probs: np.ndarray  # [A, top_k]
    continuations: list[str]  # greedy, one per alpha
    kl_from_a: np.ndarray  # [A]
    kl_from_b: np.ndarray  # [A]

    def to_json(self) -> str:
        return json.dumps({"alphas": self.alphas, "top": self.top_texts, "top_probs": self.top_probs.tolist(),
                           "continuations": self.continuations, "kl_from_a": self.kl_from_a.tolist(),
                           "kl_from_b": self.kl_from_b.tolist()})

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["alpha", "top_token", "top_prob", "kl_from_a", "kl_from_b", "continuation"])
        for i, alpha in enumerate(self.alphas):
            writer.writerow([alpha, self.top_texts[i][0], f"{self.top_probs[i, 0]:.6g}",
                             f"{self.kl_from_a[i]:.6g}", f"{self.kl_from_b[i]:.6g}", self.continuations[i]])
        return out.getvalue()


def blend_task(runtime, tokenizer, tokens_a, tokens_b, alphas=(0, 0.25, 0.5, 0.75, 1.0), continuation: int = 12,
               top_k: int = 5):
    """Read both texts, blend their states at their last token for each alpha, and read the
    next-token distribution and a greedy continuation of each blend (as one batch)."""
    a, b = _check(runtime, tokens_a, tokens_b)
    alphas = [float(x) for x in alphas]
    if not alphas or any(not 0 <= x <= 1 for x in alphas):
        raise GenerationError("Blend weights must be between 0 and 1.")
    logits_a, state_a = runtime.forward(a)
    logits_b, state_b = runtime.forward(b)
    # the next-token distribution of a state needs a token read from it; the blends read the last
    # token of text a from the states before it (so alpha = 0 is text a exactly, alpha = 1 is b's
    # memory read with a's last token)
    _, before_a = runtime.forward(a[:-1]) if len(a) > 1 else (None, runtime.new_state())
    _, before_b = runtime.forward(b[:-1]) if len(b) > 1 else (None, runtime.new_state())
    rows = State.stack([blend_states(before_a, before_b, x) for x in alphas])
    yield 0.3, "Blended the states"
    last = a[-1]
    ids = [[last]] * len(alphas)
    generated = [[] for _ in alphas]
    first_lp = None
    for step in range(continuation + 1):
        logits, _ = runtime.forward(torch.tensor(ids), rows, inplace=True)
        lp = torch.log_softmax(logits.double(), -1)
        if first_lp is None:
            first_lp = lp
        nxt = lp.argmax(-1).tolist()
        if step < continuation:
            for g, t in zip(generated, nxt):
                g.append(t)
        ids = [[t] for t in nxt]
        yield 0.3 + 0.7 * (step + 1) / (continuation + 1), f"Blend: token {step + 1}"
    lp_a = torch.log_softmax(logits_a.double(), -1)
    lp_b = torch.log_softmax(logits_b.double(), -1)
    kl_a = (lp_a.exp()[None] * (lp_a[None] - first_lp)).sum(-1).clamp_min(0).numpy()
    kl_b = (lp_b.exp()[None] * (lp_b[None] - first_lp)).sum(-1).clamp_min(0).numpy()
    values, top = torch.topk(first_lp, top_k, dim=-1)
    decode = (lambda ids_: tokenizer.decode(ids_)) if tokenizer else (lambda ids_: " ".join(map(str, ids_)))
    return BlendResult(alphas=alphas, top_texts=[_texts(tokenizer, row) for row in top.tolist()],
                       top_probs=values.exp().numpy(), continuations=[decode(g) for g in generated],
                       kl_from_a=kl_a, kl_from_b=kl_b)


def patch(runtime, tokenizer, clean, corrupt, position, parts, state=None, kind="restore", decay=None) -> PatchResult:
    return run_here(patch_task(runtime, tokenizer, clean, corrupt, position, parts, state, kind, decay))


def restore_sweep(runtime, tokenizer, clean, corrupt, target=None, window=32, parts=None, state=None) -> RestoreSweep:
    return run_here(restore_sweep_task(runtime, tokenizer, clean, corrupt, target, window, parts, state))


def remove_token_experiment(runtime, tokenizer, tokens, removed, at, layers=None, state=None) -> RemovalResult:
    return run_here(remove_token_task(runtime, tokenizer, tokens, removed, at, layers, state))


def blend(runtime, tokenizer, tokens_a, tokens_b, alphas=(0, 0.25, 0.5, 0.75, 1.0), continuation=12) -> BlendResult:
    return run_here(blend_task(runtime, tokenizer, tokens_a, tokens_b, alphas, continuation))


# ---- two models on one text ---------------------------------------------------------------------------

@dataclass
class ModelComparison:
    """Two checkpoints on the same tokens: per-token surprisal, per-layer median half-life and the
    half-life of every channel (median over the text's tokens where the decay depends on the token)."""

    names: list[str]
    architectures: list[str]
    token_texts: list[str]
    surprisal: np.ndarray  # [2, T] -log p(token t | before); NaN at t = 0
    half_life: list[list[float]]  # per model, per layer: median over channels (and tokens when data-dependent)
    channel_half_life: list[np.ndarray] = field(default_factory=list)  # per model [L, C] tokens

    def to_json(self) -> str:
        return json.dumps({"names": self.names, "architectures": self.architectures, "tokens": self.token_texts,
                           "surprisal": _nan_to_none(self.surprisal), "median_half_life": self.half_life,
                           "channel_half_life": [_nan_to_none(h) for h in self.channel_half_life]})

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["position", "token", f"surprisal_{self.names[0]}", f"surprisal_{self.names[1]}"])
        for t, text in enumerate(self.token_texts):
            writer.writerow([t, text, f"{self.surprisal[0, t]:.6g}", f"{self.surprisal[1, t]:.6g}"])
        return out.getvalue()


def _surprisal_and_half_lives(runtime, tokens, progress_start: float, progress_share: float):
    """-log p of each token given the ones before, every layer's median half-life and every
    channel's (over the text's tokens where the decay depends on them), read chunk by chunk (a
    generator yielding progress, as inspection.read_observed)."""
    decays: dict[int, list[torch.Tensor]] = {}  # RWKV-5/6/7: the decay factor per token and channel

    def observe(layer, name, value):
        if name == "w":
            decays.setdefault(layer, []).append(value[0].detach().float())

    c = runtime.config
    if runtime.architecture.matrix_state and c.n_layer * len(tokens) * c.n_embd > MAX_COMPARE_FLOATS:
        most = MAX_COMPARE_FLOATS // (c.n_layer * c.n_embd)
        raise GenerationError(f"The text is too long to compare the decays of this model over: at most {most} "
                              f"tokens ({len(tokens)} given).")
    _, _, surprisal = yield from read_observed(runtime, tokens, None, observe, progress_share, progress_start)
    if decays:
        lives, per_channel = [], []
        for i in sorted(decays):  # one layer's [T, C] half-lives at a time
            h = -math.log(2) / torch.log(torch.cat(decays.pop(i)).double().clamp(1e-300, 1 - 1e-16))
            lives.append(float(torch.median(h)))
            ordered = h.sort(dim=0).values  # the median over tokens as numpy takes it (torch.quantile caps its size)
            per_channel.append((ordered[(len(h) - 1) // 2] + ordered[len(h) // 2]) / 2)
        channels = torch.stack(per_channel)
    else:  # RWKV-4: ln 2 / exp(time_decay), per channel
        channels = torch.stack([math.log(2) / torch.exp(b.att.time_decay.detach().double()) for b in runtime.model.blocks])
        lives = [float(torch.median(h)) for h in channels]
    return surprisal, lives, channels.numpy()


def compare_models_task(runtime_a, runtime_b, tokenizer, tokens, names=("model A", "model B")):
    """Both models read the same tokens (they must share a vocabulary); returns a ModelComparison."""
    (tokens,) = _check(runtime_a, tokens)
    if runtime_a.config.vocab_size != runtime_b.config.vocab_size:
        raise GenerationError("The two models have different vocabularies: compare models that share a tokenizer.")
    rows, lives, channels = [], [], []
    for i, runtime in enumerate((runtime_a, runtime_b)):
        s, h, c = yield from _surprisal_and_half_lives(runtime, tokens, i / 2, 1 / 2)
        rows.append(s)
        lives.append(h)
        channels.append(c)
        yield (i + 1) / 2, f"Read the text with {names[i]}"
    return ModelComparison(names=list(names), architectures=[r.architecture.title for r in (runtime_a, runtime_b)],
                           token_texts=_texts(tokenizer, tokens), surprisal=np.stack(rows), half_life=lives,
                           channel_half_life=channels)


def compare_models(runtime_a, runtime_b, tokenizer, tokens, names=("model A", "model B")) -> ModelComparison:
    return run_here(compare_models_task(runtime_a, runtime_b, tokenizer, tokens, names))
