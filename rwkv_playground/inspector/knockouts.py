"""Experiments on the recurrent state: what does a part of it *do*? (no Gradio, no plotting)

An RNN's whole past is a fixed-size state, so an experiment is cheap: edit the state (or the decay)
at one position and read the rest of the text again. Every function here is exact (no sampling)
and has a `*_task` form for the scheduler (a generator yielding (fraction, message), returning the
result) beside a direct form for scripts and notebooks (`scheduler.run_here`).

- knock-outs: per layer and channels, erase the WKV memory (aa = bb = 0, pp = empty), zero the
  token-shift inputs (att_x, ffn_x), or set the decay, just before the token at `position` is read;
  all of them, plus the unedited text, run as one batch. Measured at every later position: KL
  divergence of the next-token distribution, top tokens, surprisal of the actual next token.
- causal trace: for one target token, the erasures of (layer, channel group) at each earlier
  position, batched per position; the change in the target's log-probability.
- logit lens: the residual stream after each layer through ln_out + head.
- memory probe: how one token's effective attention weight fades, per layer, against the decay
  the parameters alone predict.

Positions are token indices into the text. "After position t" means after reading token t: the
distribution there predicts token t + 1.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..errors import GenerationError
from ..models.common import Edits
from .vector import half_life, require_inspector
from ..serving.scheduler import run_here
from ..state import EMPTY_PP, State

KINDS = ("erase", "shift", "decay")
MAX_BATCH_LOGITS = 16 << 20  # logits held at once (rows x tokens x vocab): 64 MB in float32


@dataclass(frozen=True)
class Knockout:
    """One edit: `kind` applied to `channels` of `layer` just before token `position` is read.
    erase: the WKV memory of those channels (aa = bb = 0, pp = empty); shift: their token-shift
    inputs (att_x and ffn_x) set to 0; decay: their time_decay set to `time_decay` from then on."""

    layer: int
    channels: tuple[int, ...]
    position: int
    kind: str = "erase"
    time_decay: float | None = None

    @property
    def label(self) -> str:
        ch = self.channels
        span = (f"{ch[0]}-{ch[-1]}" if len(ch) > 1 and list(ch) == list(range(ch[0], ch[-1] + 1))
                else ",".join(map(str, ch[:6])) + ("…" if len(ch) > 6 else ""))
        extra = f" to {self.time_decay:g}" if self.kind == "decay" else ""
        return f"L{self.layer} ch {span} @{self.position} {self.kind}{extra}"

    def validate(self, n_layer: int, n_embd: int, n_tokens: int) -> None:
        if self.kind not in KINDS:
            raise GenerationError(f"Unknown knock-out '{self.kind}': choose erase, shift or decay.")
        if not 0 <= self.layer < n_layer:
            raise GenerationError(f"Layer {self.layer} does not exist: this model has layers 0 to {n_layer - 1}.")
        if not self.channels or min(self.channels) < 0 or max(self.channels) >= n_embd:
            raise GenerationError(f"Channels must be between 0 and {n_embd - 1}, and at least one.")
        if not 0 <= self.position < n_tokens:
            raise GenerationError(f"Position {self.position} is outside the text (0 to {n_tokens - 1}).")
        if self.kind == "decay" and (self.time_decay is None or not math.isfinite(self.time_decay)):
            raise GenerationError("A decay knock-out needs the new time_decay value (a finite number).")


def channels_by(measure: np.ndarray, k: int, largest: bool = True) -> tuple[int, ...]:
    """The top-k channels by a per-channel measure (e.g. half-life of one layer)."""
    order = np.argsort(-measure if largest else measure, kind="stable")
    return tuple(int(c) for c in sorted(order[:k]))


def apply_state_edit(state: State, knockout: Knockout) -> None:
    """Edit one sequence's state ([L, C] tensors) in place: erase or shift (decay is not a state edit)."""
    layer, channels = knockout.layer, torch.tensor(knockout.channels, dtype=torch.long)
    if knockout.kind == "erase":
        state.aa[layer, channels] = 0.0
        state.bb[layer, channels] = 0.0
        state.pp[layer, channels] = EMPTY_PP
    elif knockout.kind == "shift":
        state.att_x[layer, channels] = 0.0
        state.ffn_x[layer, channels] = 0.0


@dataclass
class KnockoutResult:
    """Effects of each knock-out at positions start .. T-1 (row 0 of every array: the unedited text)."""

    tokens: list[int]
    token_texts: list[str]
    start: int
    labels: list[str]  # one per knock-out (the unedited run is not listed)
    knockouts: list[Knockout]
    kl: np.ndarray  # [K, P] KL(unedited || knocked out) of the next-token distribution, nats
    surprisal: np.ndarray  # [K + 1, P] -log p(actual next token); NaN at the last position
    top_ids: np.ndarray  # [K + 1, P, top_k]
    top_probs: np.ndarray  # [K + 1, P, top_k]
    top_texts: list[list[list[str]]] = field(default_factory=list)

    @property
    def positions(self) -> np.ndarray:
        return np.arange(self.start, len(self.tokens))

    def surprisal_change(self) -> np.ndarray:
        """[K, P]: surprisal with the knock-out minus without (positive: the text got harder)."""
        return self.surprisal[1:] - self.surprisal[:1]

    def summary(self) -> list[dict]:
        """One row per knock-out: mean and max KL, mean surprisal change, where it peaks."""
        rows = []
        change = self.surprisal_change()
        for i, label in enumerate(self.labels):
            kl = self.kl[i]
            rows.append({"knockout": label, "mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
                         "max_kl_position": int(self.start + kl.argmax()),
                         "mean_surprisal_change": float(np.nanmean(change[i])) if len(kl) > 1 else float("nan")})
        return rows

    def to_csv(self) -> str:
        """Long format: knock-out, position, token, KL, surprisal before/after, top token before/after."""
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["knockout", "position", "token", "kl", "surprisal_before", "surprisal_after",
                         "top_before", "top_after"])
        for i, label in enumerate(self.labels):
            for j, pos in enumerate(self.positions):
                writer.writerow([label, int(pos), self.token_texts[pos], f"{self.kl[i, j]:.6g}",
                                 f"{self.surprisal[0, j]:.6g}", f"{self.surprisal[i + 1, j]:.6g}",
                                 self.top_texts[0][j][0] if self.top_texts else int(self.top_ids[0, j, 0]),
                                 self.top_texts[i + 1][j][0] if self.top_texts else int(self.top_ids[i + 1, j, 0])])
        return out.getvalue()

    def to_json(self) -> str:
        return json.dumps({"tokens": self.tokens, "token_texts": self.token_texts, "start": self.start,
                           "knockouts": [asdict(k) for k in self.knockouts], "labels": self.labels,
                           "kl": self.kl.tolist(), "surprisal": _nan_to_none(self.surprisal),
                           "top_ids": self.top_ids.tolist(), "top_probs": self.top_probs.tolist(),
                           "summary": [{k: _finite_or_none(v) for k, v in row.items()} for row in self.summary()]},
                          allow_nan=False)


def _finite_or_none(value):
    """JSON has no NaN: an undefined number (e.g. no next token to score) is null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _nan_to_none(a: np.ndarray):
    return [[_finite_or_none(float(x)) for x in row] for row in a]


def _check_tokens(runtime, tokens) -> list[int]:
    require_inspector(runtime, "The Experiments tab's knock-outs, causal trace and logit lens")
    tokens = [int(t) for t in tokens]
    if not tokens:
        raise GenerationError("There is no text to experiment on: type some text first.")
    if min(tokens) < 0 or max(tokens) >= runtime.config.vocab_size:
        raise GenerationError("The text has token ids this model does not know.")
    return tokens


def _texts(tokenizer, ids) -> list[str]:
    """Token ids as text (their decimal ids when there is no tokenizer)."""
    return [tokenizer.token_text(int(t)) for t in ids] if tokenizer else [str(int(t)) for t in ids]


def logits_chunk_len(runtime, rows: int) -> int:
    """Tokens per batched read of `rows` rows that keeps their logits within MAX_BATCH_LOGITS."""
    return max(1, min(runtime.chunk_len, MAX_BATCH_LOGITS // max(1, rows * runtime.config.vocab_size)))


def knockout_task(runtime, tokenizer, tokens, knockouts: list[Knockout], state: State | None = None,
                  top_k: int = 5):
    """The knock-out experiment as a scheduler task (see module docstring); returns a KnockoutResult."""
    tokens = _check_tokens(runtime, tokens)
    c = runtime.config
    if not knockouts:
        raise GenerationError("Choose at least one knock-out.")
    for k in knockouts:
        k.validate(c.n_layer, c.n_embd, len(tokens))
    T, K = len(tokens), len(knockouts)
    start = min(k.position for k in knockouts)
    base = state.clone() if state is not None else runtime.new_state()
    if start > 0:  # the text before the first edit is the same for every row: read it once
        _, base = runtime.forward(tokens[:start], base, inplace=True)
        yield start / T, f"Read {start} tokens before the first knock-out"
    rows = State.stack([base] * (K + 1))  # row 0: unedited; advanced in place, so its row views stay valid
    single_rows = rows.unbind_views()
    decays = {}  # layer -> [K + 1, C] time_decay per row, for the layers some row changes
    P = T - start
    kl = np.zeros((K, P), dtype=np.float64)
    surprisal = np.full((K + 1, P), np.nan, dtype=np.float64)
    top_ids = np.zeros((K + 1, P, top_k), dtype=np.int64)
    top_probs = np.zeros((K + 1, P, top_k), dtype=np.float64)
    # segments between the positions where some row is edited; chunks within them
    cuts = sorted({k.position for k in knockouts} | {T})
    step = logits_chunk_len(runtime, K + 1)
    first_layers = [0] + [k.layer for k in knockouts]  # a row reads as row 0 below the layer it edits
    done = 0
    for seg_start, seg_end in zip(cuts[:-1], cuts[1:]):
        for row, k in enumerate(knockouts, start=1):
            if k.position != seg_start:
                continue
            if k.kind == "decay":
                layer = decays.setdefault(k.layer, runtime.architecture.decay_rows(runtime.model, k.layer, K + 1))
                layer[row, list(k.channels)] = float(k.time_decay)
            else:
                apply_state_edit(single_rows[row], k)
        for a in range(seg_start, seg_end, step):
            b = min(seg_end, a + step)
            batch = torch.tensor([tokens[a:b]] * (K + 1))
            logits, _ = runtime.forward(batch, rows, full_output=True, inplace=True,
                                        edits=Edits(decays, first_layers))           # [K+1, n, V]
            log_p = torch.log_softmax(logits.double(), dim=-1)
            p0 = log_p[0].exp()
            cols = slice(a - start, b - start)
            kl[:, cols] = (p0[None] * (log_p[:1] - log_p[1:])).sum(-1).clamp_min(0).numpy()
            if b < T or b - a > 1:
                nxt = torch.tensor(tokens[a + 1:b + 1])                                # next tokens
                n = len(nxt)
                surprisal[:, a - start:a - start + n] = (-log_p[:, :n].gather(2, nxt.expand(K + 1, n)[..., None])[..., 0]
                                                         ).numpy()
            values, ids = torch.topk(log_p, top_k, dim=-1)
            top_ids[:, cols], top_probs[:, cols] = ids.numpy(), values.exp().numpy()
            done += b - a
            yield (start + done) / T, f"Knock-outs: {start + done} of {T} tokens"
    top_texts = [[_texts(tokenizer, pos) for pos in row] for row in top_ids] if tokenizer else []
    return KnockoutResult(tokens=tokens, token_texts=_texts(tokenizer, tokens), start=start,
                          labels=[k.label for k in knockouts], knockouts=list(knockouts), kl=kl, surprisal=surprisal,
                          top_ids=top_ids, top_probs=top_probs, top_texts=top_texts)


@dataclass
class CausalTrace:
    """delta[g, j]: change in log p(target token) when channel group g (layer, channels) is erased
    just before token positions[j] is read (negative: the erasure hurt the prediction)."""

    tokens: list[int]
    token_texts: list[str]
    target: int  # the token whose probability is traced (predicted after position target - 1)
    base_log_prob: float
    groups: list[tuple[int, tuple[int, int]]]  # (layer, (first channel, last channel + 1))
    positions: list[int]
    delta: np.ndarray  # [G, J]

    @property
    def group_labels(self) -> list[str]:
        return [f"L{layer} ch {a}-{b - 1}" for layer, (a, b) in self.groups]

    def strongest(self, n: int = 10) -> list[dict]:
        order = np.argsort(self.delta, axis=None)[:n]
        return [{"group": self.group_labels[g], "position": self.positions[j], "token": self.token_texts[self.positions[j]],
                 "delta_log_prob": float(self.delta[g, j])}
                for g, j in zip(*np.unravel_index(order, self.delta.shape))]

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["group", "position", "token", "delta_log_prob"])
        for g, label in enumerate(self.group_labels):
            for j, pos in enumerate(self.positions):
                writer.writerow([label, pos, self.token_texts[pos], f"{self.delta[g, j]:.6g}"])
        return out.getvalue()

    def to_json(self) -> str:
        return json.dumps({"tokens": self.tokens, "token_texts": self.token_texts, "target": self.target,
                           "base_log_prob": self.base_log_prob, "groups": self.group_labels,
                           "positions": self.positions, "delta_log_prob": self.delta.tolist()})


def channel_groups(n_layer: int, n_embd: int, groups_per_layer: int) -> list[tuple[int, tuple[int, int]]]:
    """Every layer's channels cut into `groups_per_layer` contiguous groups."""
    edges = np.linspace(0, n_embd, groups_per_layer + 1).round().astype(int)
    return [(layer, (int(a), int(b))) for layer in range(n_layer) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def causal_trace_task(runtime, tokenizer, tokens, target: int, groups_per_layer: int = 4, window: int = 32,
                      state: State | None = None):
    """Erase each (layer, channel group) before each of the `window` positions before `target` and
    measure log p(tokens[target]); one batched pass per position. Returns a CausalTrace."""
    tokens = _check_tokens(runtime, tokens)
    if not 1 <= target < len(tokens):
        raise GenerationError(f"The traced token must be one of positions 1 to {len(tokens) - 1} (it needs a past).")
    c = runtime.config
    groups = channel_groups(c.n_layer, c.n_embd, max(1, min(groups_per_layer, c.n_embd)))
    first = max(0, target - max(1, window))
    positions = list(range(first, target))
    current = state.clone() if state is not None else runtime.new_state()
    if first > 0:
        _, current = runtime.forward(tokens[:first], current, inplace=True)
    base_logits, _ = runtime.forward(tokens[first:target], current)
    want = tokens[target]
    base = float(torch.log_softmax(base_logits.double(), -1)[want])
    delta = np.zeros((len(groups), len(positions)))
    for j, pos in enumerate(positions):
        rows = State.stack([current] * len(groups))
        for single, (layer, (a, b)) in zip(rows.unbind_views(), groups):
            apply_state_edit(single, Knockout(layer, tuple(range(a, b)), pos))
        logits, _ = runtime.forward(torch.tensor([tokens[pos:target]] * len(groups)), rows, inplace=True)  # [G, V]
        delta[:, j] = (torch.log_softmax(logits.double(), -1)[:, want] - base).numpy()
        _, current = runtime.forward(tokens[pos:pos + 1], current, inplace=True)  # the unedited state moves on
        yield (j + 1) / len(positions), f"Causal trace: position {j + 1} of {len(positions)}"
    return CausalTrace(tokens=tokens, token_texts=_texts(tokenizer, tokens), target=target, base_log_prob=base,
                       groups=groups, positions=positions, delta=delta)


@dataclass
class LogitLens:
    """The residual stream after each layer read by the final ln_out + head, at every position."""

    tokens: list[int]
    token_texts: list[str]
    top_ids: np.ndarray  # [L, T] most likely next token per layer
    top_probs: np.ndarray  # [L, T]
    next_token_probs: np.ndarray  # [L, T] probability of the actual next token (NaN at the last position)
    top_texts: list[list[str]] = field(default_factory=list)

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["layer", "position", "token", "top_token", "top_prob", "next_token_prob"])
        for layer in range(self.top_ids.shape[0]):
            for t, text in enumerate(self.token_texts):
                writer.writerow([layer, t, text, self.top_texts[layer][t] if self.top_texts else int(self.top_ids[layer, t]),
                                 f"{self.top_probs[layer, t]:.6g}", f"{self.next_token_probs[layer, t]:.6g}"])
        return out.getvalue()

    def to_json(self) -> str:
        return json.dumps({"tokens": self.tokens, "token_texts": self.token_texts, "top_ids": self.top_ids.tolist(),
                           "top_probs": self.top_probs.tolist(), "next_token_probs": _nan_to_none(self.next_token_probs)})


def logit_lens_task(runtime, tokenizer, tokens, state: State | None = None):
    """Observe the residual after every layer, chunk by chunk; returns a LogitLens."""
    tokens = _check_tokens(runtime, tokens)
    L, T = runtime.config.n_layer, len(tokens)
    top_ids = np.zeros((L, T), dtype=np.int64)
    top_probs = np.zeros((L, T))
    next_probs = np.full((L, T), np.nan)
    model = runtime.model
    current = state.clone() if state is not None else runtime.new_state()
    step = logits_chunk_len(runtime, L)
    for a in range(0, T, step):
        b = min(T, a + step)
        residuals = {}

        def observe(layer, name, value, residuals=residuals):
            if name == "residual":
                residuals[layer] = value[0].detach()

        _, current = runtime.forward(tokens[a:b], current, full_output=True, inplace=True, observe=observe)
        with torch.no_grad():
            stream = torch.stack([residuals[layer] for layer in range(L)])     # [L, n, C]
            if model.rescale_every:  # fp16 storage halves the stream every few layers: undo it
                stream = stream.float() * torch.tensor([2.0 ** (layer // model.rescale_every) for layer in range(L)],
                                                       device=stream.device)[:, None, None]
            log_p = torch.log_softmax(model.head(model.ln_out(stream)).double(), -1)  # [L, n, V]
        values, ids = log_p.max(-1)
        top_ids[:, a:b], top_probs[:, a:b] = ids.cpu().numpy(), values.exp().cpu().numpy()
        nxt = torch.tensor(tokens[a + 1:b + 1], device=log_p.device)
        n = len(nxt)
        if n:
            next_probs[:, a:a + n] = log_p[:, :n].gather(2, nxt.expand(L, n)[..., None])[..., 0].exp().cpu().numpy()
        yield b / T, f"Logit lens: {b} of {T} tokens"
    top_texts = [_texts(tokenizer, row) for row in top_ids] if tokenizer else []
    return LogitLens(tokens=tokens, token_texts=_texts(tokenizer, tokens), top_ids=top_ids, top_probs=top_probs,
                     next_token_probs=next_probs, top_texts=top_texts)


@dataclass
class MemoryProbe:
    """How the weight of the token at `position` in the WKV output fades at the following tokens.

    measured[l, h]: its effective attention weight (averaged over channels) in layer l's output
    h + 1 tokens later, from the recording; predicted[l, h]: the weight one token later decayed by
    the parameters alone, mean_c weight_1(c) * exp(h * w_c). The two part where the rest of the
    text changes the memory's total: new tokens take a share (faster fading), or the memory's
    other contents decay faster than this token's (it then holds a larger share)."""

    position: int
    token_text: str
    measured: np.ndarray  # [L, H]
    predicted: np.ndarray  # [L, H]
    median_half_life: np.ndarray  # [L] tokens, from the decay parameters

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["layer", "tokens_later", "measured_weight", "predicted_by_decay"])
        for layer in range(self.measured.shape[0]):
            for h in range(self.measured.shape[1]):
                writer.writerow([layer, h + 1, f"{self.measured[layer, h]:.6g}", f"{self.predicted[layer, h]:.6g}"])
        return out.getvalue()

    def to_json(self) -> str:
        return json.dumps({"position": self.position, "token": self.token_text, "measured": self.measured.tolist(),
                           "predicted": self.predicted.tolist(), "median_half_life": self.median_half_life.tolist()})


def token_weight_per_channel(rec, layer: int, position: int) -> np.ndarray:
    """[H, C] float64: the weight of token `position` in layer's WKV output at each later token,
    channel by channel (closed form from the recording; see inspection.effective_attention)."""
    w = -np.exp(rec.time_decay[layer].astype(np.float64))                      # [C]
    u = rec.time_first[layer].astype(np.float64)
    k = rec.k[:, layer].astype(np.float64)                                     # [T, C]
    later = np.arange(position + 1, rec.n_tokens)                              # output positions t
    if len(later) == 0:
        return np.zeros((0, w.shape[0]))
    # the memory entering t is the state after t - 1: log of its mass e^pp * bb
    mass = rec.pp[later - 1, layer].astype(np.float64) + np.log(np.maximum(rec.bb[later - 1, layer].astype(np.float64),
                                                                             1e-300))
    log_denominator = np.logaddexp(mass, u + k[later])                        # [H, C]
    log_numerator = (later - 1 - position)[:, None] * w[None] + k[position][None]
    return np.exp(log_numerator - log_denominator)


def memory_probe(rec, position: int, horizon: int | None = None) -> MemoryProbe:
    """The memory probe for a marked token of a Recording (inspection.record)."""
    if not 0 <= position < rec.n_tokens - 1:
        raise GenerationError("Mark a token that has at least one token after it.")
    H = rec.n_tokens - 1 - position if horizon is None else max(1, min(horizon, rec.n_tokens - 1 - position))
    L = rec.n_layer
    measured, predicted = np.zeros((L, H)), np.zeros((L, H))
    for layer in range(L):
        weights = token_weight_per_channel(rec, layer, position)[:H]          # [H, C]
        measured[layer] = weights.mean(axis=1)
        w = -np.exp(rec.time_decay[layer].astype(np.float64))
        predicted[layer] = (weights[0][None] * np.exp(np.arange(H)[:, None] * w[None])).mean(axis=1)
    return MemoryProbe(position=position, token_text=rec.token_texts[position], measured=measured,
                       predicted=predicted, median_half_life=np.median(half_life(rec.time_decay), axis=1))


def knockouts(runtime, tokenizer, tokens, knockout_list, state=None, top_k=5) -> KnockoutResult:
    return run_here(knockout_task(runtime, tokenizer, tokens, knockout_list, state, top_k))


def causal_trace(runtime, tokenizer, tokens, target, groups_per_layer=4, window=32, state=None) -> CausalTrace:
    return run_here(causal_trace_task(runtime, tokenizer, tokens, target, groups_per_layer, window, state))


def logit_lens(runtime, tokenizer, tokens, state=None) -> LogitLens:
    return run_here(logit_lens_task(runtime, tokenizer, tokens, state))
