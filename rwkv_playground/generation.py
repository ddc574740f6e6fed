"""Streaming text generation over a recurrent state.

    stream = generate(model, tokenizer, "Once upon a time", settings=SamplingSettings(seed=1))
    for piece in stream:          # text increments, never broken UTF-8
        print(piece, end="")
    stream.state                  # in sync with exactly prompt + stream.text
    stream.stats                  # prompt tokens / seconds, generated tokens, tokens/s, stop reason

Invariant: whatever ends the stream (max tokens, a stop string, end-of-text, `cancel`, or the
consumer closing the generator), `state` is the state after reading the prompt and then exactly
the text that was yielded. Stop strings are held back while they may still be forming, and a
stop string that starts inside a token is handled by re-reading the kept part of that token.
Prompts are read in chunks and the generator yields "" between chunks, so a consumer can
cancel a long prefill.
"""

from __future__ import annotations

import codecs
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from .errors import GenerationError
from .sampling import Sampler, SamplingSettings
from .state import State
from .tokenizer import Tokenizer

MAX_NEW_TOKENS = 100_000
MAX_PROMPT_TOKENS = 1_000_000


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    generation_seconds: float = 0.0
    stop_reason: str = ""  # "max_tokens" | "stop_string" | "end_of_text" | "stop_token" | "cancelled" | "closed"

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.generation_seconds if self.generation_seconds > 0 else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["prompt_tokens_per_second"] = round(self.prompt_tokens_per_second, 2)
        d["tokens_per_second"] = round(self.tokens_per_second, 2)
        return d


class Generation:
    """An iterable stream of text increments; see the module docstring."""

    def __init__(self, model, tokenizer: Tokenizer, prompt, state: State | None = None,
                 settings: SamplingSettings | None = None, max_tokens: int = 200,
                 stop: tuple[str, ...] | list[str] = (), stop_tokens: tuple[int, ...] = (),
                 cancel: threading.Event | None = None,
                 logits_hook: Callable[[int, torch.Tensor], None] | None = None,
                 chunk_len: int | None = None, logits: torch.Tensor | None = None):
        if isinstance(prompt, str):
            prompt_tokens = tokenizer.encode(prompt) if prompt else []
        else:
            prompt_tokens = [int(t) for t in prompt]
        if not prompt_tokens and (state is None or logits is None):
            raise GenerationError("The prompt is empty: type something to start from.")
        if len(prompt_tokens) > MAX_PROMPT_TOKENS:
            raise GenerationError(f"The prompt is too long ({len(prompt_tokens)} tokens; at most {MAX_PROMPT_TOKENS}).")
        if not (1 <= int(max_tokens) <= MAX_NEW_TOKENS):
            raise GenerationError(f"max_tokens must be between 1 and {MAX_NEW_TOKENS} (got {max_tokens}).")
        if state is not None:
            model.check_state(state)
        self.model = model
        self.tokenizer = tokenizer
        self.prompt_tokens = prompt_tokens
        self.settings = (settings or SamplingSettings()).validate()
        self.max_tokens = int(max_tokens)
        self.stop = tuple(s for s in stop if s)
        self.stop_tokens = set(stop_tokens) | {tokenizer.eos_id}
        self.cancel = cancel or threading.Event()
        self.logits_hook = logits_hook
        self.chunk_len = chunk_len or model.chunk_len
        self.state: State | None = state.clone() if state is not None else None
        self.tokens: list[int] = []  # generated token ids (after a stop cut: the ones kept)
        self.text = ""  # exactly what was yielded
        self.stats = GenerationStats(prompt_tokens=len(prompt_tokens))
        # Logits after the state (what the next token is sampled from); kept in sync with it.
        self.last_logits: torch.Tensor | None = logits
        self.prompt_read = 0  # prompt tokens consumed (less than all only if cancelled in prefill)
        # The state and logits right after the prompt (None until it is fully read): what a chat
        # keeps to regenerate a reply without reading anything again.
        self.prompt_state: State | None = None
        self.prompt_logits: torch.Tensor | None = None
        self._active = None

    def __iter__(self):
        if self._active is not None:
            raise GenerationError("A Generation can be iterated only once.")
        self._active = self._run()
        return self._active

    def close(self) -> None:
        """End the stream now (as a consumer going away does); afterwards `state` matches `text`."""
        if self._active is not None:
            self._active.close()

    # The generator body. `self.state` is kept in sync with `self.text` in every exit path.
    def _run(self):
        model, tok = self.model, self.tokenizer
        stats = self.stats
        t0 = time.perf_counter()
        logits = None
        try:
            # ---- prefill, chunk by chunk, cancellable between chunks
            logits = self.last_logits
            if self.state is None:
                self.state = model.new_state()
            for start in range(0, len(self.prompt_tokens), self.chunk_len):
                if self.cancel.is_set():
                    stats.stop_reason = "cancelled"
                    return
                chunk = self.prompt_tokens[start:start + self.chunk_len]
                logits, self.state = model.forward(chunk, self.state, inplace=True)
                self.prompt_read += len(chunk)
                self.last_logits = logits
                stats.prompt_seconds = time.perf_counter() - t0
                yield ""
            stats.prompt_seconds = time.perf_counter() - t0
        except GeneratorExit:
            stats.stop_reason = "closed"
            return

        # ---- generation
        sampler = Sampler(self.settings, logits.shape[-1])
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        full_text = ""  # all decoded text so far (may run ahead of what was yielded)
        # Snapshots at clean points (no partial UTF-8 pending): (len(full_text), n_tokens, state)
        snapshots = [(0, 0, self.state.clone(), logits)]
        self.prompt_state, self.prompt_logits = snapshots[0][2], logits  # never modified: syncs clone it
        max_stop = max((len(s) for s in self.stop), default=0)
        emitted = 0
        t1 = time.perf_counter()
        stop_reason = "max_tokens"
        cut_at = None
        try:
            for step in range(self.max_tokens):
                if self.cancel.is_set():
                    stop_reason = "cancelled"
                    break
                if self.logits_hook is not None:
                    logits = logits.clone()
                    self.logits_hook(step, logits)
                token = sampler.sample(logits)
                if token in self.stop_tokens:
                    stop_reason = "end_of_text" if token == tok.eos_id else "stop_token"
                    break
                sampler.observe(token)
                self.tokens.append(token)
                logits, _ = model.forward([token], self.state, inplace=True)
                self.last_logits = logits
                stats.generated_tokens = len(self.tokens)
                full_text += decoder.decode(tok.decode_bytes([token]))
                pending = decoder.getstate()[0]
                if not pending:
                    snapshots.append((len(full_text), len(self.tokens), self.state.clone(), logits))
                    horizon = len(full_text) - max_stop - 1
                    while len(snapshots) > 1 and snapshots[1][0] <= horizon:
                        snapshots.pop(0)
                # stop strings: search only the region new text can complete
                if self.stop:
                    window_start = max(0, emitted - max_stop)
                    hits = [i for i in (full_text.find(s, window_start) for s in self.stop) if i >= 0]
                    if hits:
                        cut_at = min(hits)
                        stop_reason = "stop_string"
                        break
                safe = len(full_text) - self._held_back(full_text)
                if safe > emitted:
                    piece = full_text[emitted:safe]
                    emitted = safe
                    self.text += piece
                    stats.generation_seconds = time.perf_counter() - t1
                    yield piece
            # normal end: release held-back text (a partial stop string that never completed)
            if cut_at is None:
                cut_at = len(full_text) if not decoder.getstate()[0] else snapshots[-1][0]
            if cut_at > emitted:
                piece = full_text[emitted:cut_at]
                self._sync_state_to(cut_at, full_text, snapshots)
                self.text += piece
                emitted = cut_at
                stats.stop_reason = stop_reason
                stats.generation_seconds = time.perf_counter() - t1
                yield piece
            else:
                self._sync_state_to(emitted, full_text, snapshots)
            stats.stop_reason = stop_reason
        except GeneratorExit:
            # The consumer went away mid-stream: keep the state matching what it received.
            self._sync_state_to(emitted, full_text, snapshots)
            stats.stop_reason = "closed"
        finally:
            stats.generated_tokens = len(self.tokens)
            stats.generation_seconds = time.perf_counter() - t1

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of `text` that could still become a stop string."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def _sync_state_to(self, cut: int, full_text: str, snapshots) -> None:
        """Make self.state the state after exactly full_text[:cut] (from the nearest clean snapshot,
        re-reading the few characters between it and the cut)."""
        if cut == len(full_text) and snapshots[-1][0] == cut and snapshots[-1][1] == len(self.tokens):
            return  # already in sync
        base = None
        for snap in reversed(snapshots):
            if snap[0] <= cut:
                base = snap
                break
        if base is None:  # cannot happen: the first snapshot is at 0 and is kept while needed
            raise GenerationError("Internal error: no state snapshot before the stop position.")
        chars, n_tokens, state, logits = base
        state = state.clone()
        rest = full_text[chars:cut]
        del self.tokens[n_tokens:]
        if rest:
            extra = self.tokenizer.encode(rest)
            logits, state = self.model.forward(extra, state, inplace=True)
            self.tokens.extend(extra)
        self.state = state
        self.last_logits = logits


def generate(model, tokenizer, prompt, state=None, settings=None, **kwargs) -> Generation:
    """Start a streaming generation; see `Generation` for the options."""
    return Generation(model, tokenizer, prompt, state=state, settings=settings, **kwargs)
