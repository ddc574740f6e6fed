"""Sampling with ChatRWKV's semantics, fast enough for a 50k-65k vocabulary on a laptop CPU.

Order of operations (as `rwkv.utils.PIPELINE`):
  1. banned tokens -> -inf; for every *generated* token t:
     logits[t] -= presence_penalty + count[t] * count_penalty
  2. softmax; keep the smallest set of most-probable tokens whose mass reaches top_p
     (every token whose probability equals the cut-off value is kept, as the reference does)
  3. keep only the top_k most probable (if top_k > 0)
  4. probabilities ** (1 / temperature), renormalise, draw with the sampler's own seeded RNG
  5. after the draw: count *= penalty_decay, then count[new token] += 1
The reference sorts all 50k probabilities every token (3-5 ms). `sample_logits` below (numpy)
sorts only the tokens above a threshold that provably contains the top-p set (exact); when the
CPU kernels are loaded, kernels/sampling_cpu.cpp does the same selection without sorting (a
mass-weighted quickselect) and is used instead; tests hold the two to the same token.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from .errors import GenerationError


@dataclass
class SamplingSettings:
    temperature: float = 1.0
    top_p: float = 0.7
    top_k: int = 0
    presence_penalty: float = 0.2  # ChatRWKV alpha_presence
    count_penalty: float = 0.2  # ChatRWKV alpha_frequency
    penalty_decay: float = 0.996
    banned_tokens: tuple[int, ...] = ()
    seed: int | None = None

    def banning(self, token_ids) -> "SamplingSettings":
        """These settings with `token_ids` banned as well (a chat reply never ends the text)."""
        return replace(self, banned_tokens=tuple(self.banned_tokens) + tuple(token_ids))

    def validate(self) -> "SamplingSettings":
        if not (self.temperature >= 0):
            raise GenerationError("Temperature must be 0 or more (0 means always the most likely token).")
        if not (0.0 <= self.top_p <= 1.0):
            raise GenerationError("top_p must be between 0 and 1.")
        if self.top_k < 0:
            raise GenerationError("top_k must be 0 (off) or a positive number.")
        if not (0.0 <= self.penalty_decay <= 1.0):
            raise GenerationError("The penalty decay must be between 0 and 1.")
        return self


_NARROW = 512  # try to confine the top-p set to this many tokens before sorting


def sample_logits(logits: np.ndarray, temperature: float, top_p: float, top_k: int,
                  rng: np.random.Generator, kernel=None) -> int:
    """Draw one token id from float32 logits [V] (penalties already applied).
    kernel: the CPU kernel module (its sample_top_p gives the same token for the same draw)."""
    if temperature == 0 or top_p == 0 or top_k == 1:
        return int(np.argmax(logits))
    uniform = rng.random()  # one draw per token, whichever path runs: seeds reproduce across both
    if kernel is not None:
        token = kernel.sample_top_p(torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32)),
                                    float(temperature), float(top_p), int(top_k), uniform)
        if token >= 0:
            return int(token)
    shifted = torch.from_numpy(logits - logits.max())
    weights = torch.exp(shifted).numpy()  # unnormalised probabilities (max = 1); torch's exp is SIMD
    total = float(weights.sum(dtype=np.float64))
    target = top_p * total
    # Tokens below tau hold less than (1 - top_p) of the mass together, so the top-p set is
    # always inside {weights >= tau}: only that set needs sorting. Exact, not an approximation.
    tau = np.float32((1.0 - top_p) * total / weights.shape[0])  # compared in float32 (as the kernel)
    candidates = np.flatnonzero(weights >= tau) if tau > 0 else np.flatnonzero(weights > 0)
    kept = weights[candidates]
    if top_p < 1.0 and len(kept) > _NARROW:
        # Same argument, tighter: if the _NARROW largest already reach top_p, the set is among them.
        threshold = np.partition(kept, len(kept) - _NARROW)[len(kept) - _NARROW]
        inside = kept >= threshold
        if kept[inside].sum(dtype=np.float64) >= target:
            candidates, kept = candidates[inside], kept[inside]
    if top_p < 1.0:
        descending = -np.sort(-kept)
        cumulative = np.cumsum(descending, dtype=np.float64)
        reach = min(int(np.searchsorted(cumulative, target)), len(descending) - 1)
        # every token at least as probable as the cut-off stays (ties included, as the reference)
        inside = kept >= descending[reach]
        candidates, kept = candidates[inside], kept[inside]
    if 0 < top_k < len(kept):
        # the k most probable; among ties at the k-th value the lowest ids; then back in id order
        top = np.sort(np.argsort(-kept, kind="stable")[:top_k])
        candidates, kept = candidates[top], kept[top]
    kept = kept.astype(np.float64)
    if temperature != 1.0:
        kept = kept ** (1.0 / temperature)
    cdf = np.cumsum(kept)
    pick = min(int(np.searchsorted(cdf, uniform * cdf[-1], side="right")), len(cdf) - 1)
    return int(candidates[pick])


def sample_probs(probs: torch.Tensor, temperature: float, top_p: float, top_k: int,
                 rng: np.random.Generator) -> int:
    """Same as sample_logits, from a probability vector."""
    probs = probs.detach().to("cpu", torch.float32).numpy()
    with np.errstate(divide="ignore"):
        return sample_logits(np.log(probs), temperature, top_p, top_k, rng)


class Sampler:
    """Stateful sampler: remembers generated-token counts for the penalties, and its own RNG.
    kernel: the compiled CPU module whose sample_top_p replaces the numpy path (same tokens), or
    None; which one runs is the runtime's "sampler" backend choice."""

    def __init__(self, settings: SamplingSettings, vocab_size: int, kernel=None):
        self.settings = settings.validate()
        self.vocab_size = vocab_size
        self._kernel = kernel
        self.rng = np.random.default_rng(self.settings.seed)
        # Penalties touch only tokens generated so far: keep them sparse (ids and decayed counts).
        self._slot: dict[int, int] = {}
        self._ids = np.zeros(0, dtype=np.int64)
        self._counts = np.zeros(0, dtype=np.float32)
        self._ban = np.array(sorted(set(self.settings.banned_tokens)), dtype=np.int64)

    @property
    def counts(self) -> dict[int, float]:
        return {int(i): float(c) for i, c in zip(self._ids, self._counts)}

    def adjust_logits(self, logits) -> np.ndarray:
        """Bans and penalties; returns a new float32 numpy array."""
        s = self.settings
        if isinstance(logits, torch.Tensor):
            logits = logits.detach().to("cpu", torch.float32).numpy()
        logits = np.array(logits, dtype=np.float32, copy=True)
        if self._ban.size:
            logits[self._ban] = -np.inf
        if self._ids.size and (s.presence_penalty or s.count_penalty):
            logits[self._ids] -= s.presence_penalty + self._counts * s.count_penalty
        return logits

    def sample(self, logits) -> int:
        s = self.settings
        adjusted = self.adjust_logits(logits)
        top = adjusted.max()  # NaN anywhere makes it NaN
        if np.isnan(top) or top == np.inf:
            raise GenerationError("The model produced NaN or infinite logits (a corrupt checkpoint, or fp16 "
                                  "overflow): nothing can be sampled.")
        if top == -np.inf:
            raise GenerationError("Every token is banned or impossible: nothing can be sampled.")
        return sample_logits(adjusted, s.temperature, s.top_p, s.top_k, self.rng, self._kernel)

    def observe(self, token_id: int) -> None:
        """Record a generated token (decay old counts first, as the reference does)."""
        self._counts *= self.settings.penalty_decay
        slot = self._slot.get(token_id)
        if slot is None:
            self._slot[token_id] = len(self._ids)
            self._ids = np.append(self._ids, token_id)
            self._counts = np.append(self._counts, np.float32(1.0))
        else:
            self._counts[slot] += 1.0
