"""A generation request: read a prompt, then sample tokens until a limit or a stop.

    stream = generate(runtime, tokenizer, "Once upon a time", settings=SamplingSettings(seed=1))
    for piece in stream:          # text increments, never a broken UTF-8 character
        print(piece, end="")
    stream.state                  # in sync with exactly prompt + stream.text
    stream.stats                  # prompt tokens / seconds, generated tokens, tokens/s, stop reason

`Generation` holds the decoding logic only (sampler, stop strings, UTF-8 hold-back, the state it
owns); it never runs the model. Whoever drives it does: `generate()` below runs one Generation
alone (scripts, notebooks), and the app's scheduler runs many sessions' Generations together, one
batched step per token. Both feed it the same prompt chunks and the same one-token steps, so a
text never depends on who else was generating.

Invariant: whatever ends the stream (max tokens, a stop string, end-of-text, cancel, the consumer
going away), `state` is the state after reading the prompt and then exactly the text that was
released. Stop strings are held back while they may still be forming, and a stop string that
starts inside a token is handled by re-reading the kept part of that token.
"""

from __future__ import annotations

import bisect
import codecs
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
# Released text the consumer has not received yet can be taken back when it stops (the scheduler
# runs ahead of its consumers by a token or two); the state snapshots that allows are capped here.
MAX_UNSHOWN_SNAPSHOTS = 256


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    generation_seconds: float = 0.0
    stop_reason: str = ""  # "max_tokens" | "stop_string" | "end_of_text" | "stop_token" | "cancelled" | ...

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


@dataclass
class _Snapshot:
    """A clean point (no partial UTF-8 pending) to roll the state back to."""
    chars: int
    n_tokens: int
    state: State
    logits: torch.Tensor


class Generation:
    """One request's decoding. The driver's loop (see `generate` and scheduler.py):

        while (chunk := gen.next_prompt_chunk()) is not None:
            logits = run chunk on gen.state in place; gen.prompt_chunk_read(logits)
        while (token := gen.next_token()) is not None:
            logits = one step of [token] on gen.state in place; gen.token_read(logits)
        gen.finish(runtime)       # syncs the state to the released text
    """

    def __init__(self, tokenizer: Tokenizer, prompt, state: State | None = None, logits: torch.Tensor | None = None,
                 settings: SamplingSettings | None = None, max_tokens: int = 200,
                 stop: tuple[str, ...] | list[str] = (), stop_tokens: tuple[int, ...] = (),
                 logits_hook: Callable[[int, torch.Tensor], None] | None = None,
                 chunk_len: int = 512, sampler_kernel=None, logprobs: int | None = None,
                 prompt_breaks: tuple[int, ...] | list[int] = ()):
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
        self.tokenizer = tokenizer
        self.prompt_tokens = prompt_tokens
        self.settings = (settings or SamplingSettings()).validate()
        self.max_tokens = int(max_tokens)
        self.stop = tuple(s for s in stop if s)
        self.stop_tokens = set(stop_tokens) | {tokenizer.eos_id}
        self.logits_hook = logits_hook
        self.chunk_len = int(chunk_len)
        # positions a prompt chunk never crosses (the API reads a conversation message by message,
        # so that a state kept at a message boundary is bit for bit the one a fresh read gives)
        self.prompt_breaks = sorted({int(b) for b in prompt_breaks if 0 < int(b) < len(prompt_tokens)})
        self.sampler_kernel = sampler_kernel
        # None: no log-probabilities; k >= 0: each sampled token's, with the k most likely
        self.logprobs = None if logprobs is None else int(logprobs)
        self.sampled = 0  # tokens drawn (a stop string's tokens included; `tokens` keeps what stays)
        # per sampled token: (id, log-probability, [(id, log-probability)] * k) of the distribution
        # it was drawn from, after the logits hook and before penalties, temperature and top-p
        self.token_logprobs: list[tuple[int, float, list[tuple[int, float]]]] = []
        self.token_ends: list[int] = []  # per sampled token: length of the decoded text after it
        # The state this generation owns and advances (None: the driver starts an empty one).
        self.state: State | None = state.clone() if state is not None else None
        self.last_logits: torch.Tensor | None = logits  # what the next token is sampled from
        self.tokens: list[int] = []  # generated ids (after a stop cut: the ones kept)
        self.text = ""  # exactly what was released
        self.stats = GenerationStats(prompt_tokens=len(prompt_tokens))
        self.prompt_read = 0  # prompt tokens consumed
        # The state and logits right after the prompt (None until it is read): what a chat keeps
        # to regenerate a reply without reading anything again. Never modified afterwards.
        self.prompt_state: State | None = None
        self.prompt_logits: torch.Tensor | None = None
        self.finished = False
        # Characters of `text` the consumer has received, when a driver runs ahead of it (the
        # scheduler); None: everything released counts as received. A stop keeps only these.
        self.shown: int | None = None
        self._stop_reason = ""
        self._t0: float | None = None  # when reading started (not when the request was queued)
        self._t1: float | None = None
        self._sampler: Sampler | None = None
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._full_text = ""  # everything decoded (may run ahead of what was released)
        self._emitted = 0
        self._cut_at: int | None = None
        self._snapshots: list[_Snapshot] = []
        self._max_stop = max((len(s) for s in self.stop), default=0)

    # ---- the driver's side ----------------------------------------------------------------------
    @property
    def reading_prompt(self) -> bool:
        return self.prompt_state is None and not self._stop_reason

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop at the next chunk or token (the driver then calls finish)."""
        if not self._stop_reason:
            self._stop_reason = reason

    def next_prompt_chunk(self) -> list[int] | None:
        """The next slice of the prompt to read into `state`, or None once it is read (or cancelled)."""
        if self._stop_reason or self.prompt_state is not None:
            return None
        if self._t0 is None:
            self._t0 = time.perf_counter()
        if self.prompt_read < len(self.prompt_tokens):
            return self.prompt_tokens[self.prompt_read:self._chunk_end()]
        self._prompt_done()
        return None

    def _chunk_end(self) -> int:
        end = min(self.prompt_read + self.chunk_len, len(self.prompt_tokens))
        at = bisect.bisect_right(self.prompt_breaks, self.prompt_read)
        return min(end, self.prompt_breaks[at]) if at < len(self.prompt_breaks) else end

    def prompt_chunk_read(self, logits: torch.Tensor) -> None:
        self.prompt_read = self._chunk_end()
        self.last_logits = logits
        self.stats.prompt_seconds = time.perf_counter() - self._t0

    def _prompt_done(self) -> None:
        self.stats.prompt_seconds = time.perf_counter() - self._t0
        self.prompt_state, self.prompt_logits = self.state.clone(), self.last_logits
        self._snapshots = [_Snapshot(0, 0, self.prompt_state, self.last_logits)]
        self._sampler = Sampler(self.settings, self.last_logits.shape[-1], kernel=self.sampler_kernel)
        self._t1 = time.perf_counter()

    def next_token(self) -> int | None:
        """Sample the next token from `last_logits`, or None when the generation is over."""
        if self.prompt_state is None:
            self.next_prompt_chunk()
            if self.prompt_state is None:
                return None
        if self._stop_reason or self._cut_at is not None:
            return None
        step = len(self.tokens)
        if step >= self.max_tokens:
            self._stop_reason = "max_tokens"
            return None
        logits = self.last_logits
        if self.logits_hook is not None:
            logits = logits.clone()
            self.logits_hook(step, logits)
        token = self._sampler.sample(logits)
        if token in self.stop_tokens:
            self._stop_reason = "end_of_text" if token == self.tokenizer.eos_id else "stop_token"
            return None
        self._sampler.observe(token)
        self.tokens.append(token)
        self.sampled += 1
        if self.logprobs is not None:
            self.token_logprobs.append(_logprobs_of(logits, token, self.logprobs))
        return token

    def released_logprobs(self, chars: int | None = None) -> list[tuple[int, float, list[tuple[int, float]]]]:
        """The log-probabilities of the sampled tokens whose text lies within the first `chars`
        characters released (default: all of `text`); a token a stop string cut is left out."""
        limit = len(self.text) if chars is None else chars
        ends = self.token_ends
        return self.token_logprobs[:bisect.bisect_right(ends, limit, 0, min(len(ends), len(self.token_logprobs)))]

    def token_read(self, logits: torch.Tensor) -> str:
        """After the driver stepped `state` with the last token: returns the text now released."""
        self.last_logits = logits
        self.stats.generated_tokens = len(self.tokens)
        self._full_text += self._decoder.decode(self.tokenizer.decode_bytes([self.tokens[-1]]))
        self.token_ends.append(len(self._full_text))
        if not self._decoder.getstate()[0]:  # a clean point: nothing pending
            self._snapshots.append(_Snapshot(len(self._full_text), len(self.tokens), self.state.clone(), logits))
            # keep the last snapshot before any text that may still be cut: a forming stop
            # string, and text the consumer has not received yet
            keep_from = len(self._full_text) - self._max_stop - 1
            if self.shown is not None:
                keep_from = min(keep_from, self.shown)
            while len(self._snapshots) > 1 and (self._snapshots[1].chars <= keep_from
                                                or len(self._snapshots) > MAX_UNSHOWN_SNAPSHOTS):
                self._snapshots.pop(0)
        if self.stop:  # search only the region new text can complete
            window_start = max(0, self._emitted - self._max_stop)
            hits = [i for i in (self._full_text.find(s, window_start) for s in self.stop) if i >= 0]
            if hits:
                self._cut_at = min(hits)
                self._stop_reason = "stop_string"
                return ""
        safe = len(self._full_text) - self._held_back(self._full_text)
        self.stats.generation_seconds = time.perf_counter() - self._t1
        return self._release(safe)

    def finish(self, runtime) -> str:
        """End the generation: the state is synced to the released text (re-reading at most the
        few characters after the last clean point); returns the last piece of text released."""
        if self.finished:
            return ""
        self.finished = True
        reason = self._stop_reason or "max_tokens"
        if self.prompt_state is None:  # ended while reading the prompt
            self.stats.stop_reason = reason
            return ""
        if self._cut_at is None:
            if reason in ("cancelled", "closed", "error", "model_switched"):
                # what was shown stays; nothing held back is released, nothing unseen is kept
                shown = self._emitted if self.shown is None else min(self._emitted, self.shown)
                self._cut_at = max(shown, self._snapshots[0].chars)  # (at most MAX_UNSHOWN_SNAPSHOTS back)
            else:  # a held-back prefix of a stop string that never completed is released
                self._cut_at = len(self._full_text) if not self._decoder.getstate()[0] else self._snapshots[-1].chars
        if self._cut_at < self._emitted:  # released but never received: taken back
            self.text, self._emitted = self._full_text[:self._cut_at], self._cut_at
        piece = self._release(self._cut_at) if self._cut_at > self._emitted else ""
        self._sync_state_to(self._cut_at, runtime)
        self.stats.stop_reason = reason
        self.stats.generated_tokens = len(self.tokens)
        if self._t1 is not None:
            self.stats.generation_seconds = time.perf_counter() - self._t1
        self._snapshots = []
        return piece

    # ---- internals ---------------------------------------------------------------------------------
    def _release(self, upto: int) -> str:
        if upto <= self._emitted:
            return ""
        piece = self._full_text[self._emitted:upto]
        self._emitted = upto
        self.text += piece
        return piece

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of `text` that could still become a stop string."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def _sync_state_to(self, cut: int, runtime) -> None:
        """Make `state` the state after exactly full_text[:cut]: from the nearest clean snapshot,
        re-reading the few characters between it and the cut."""
        last = self._snapshots[-1]
        if cut == len(self._full_text) and last.chars == cut and last.n_tokens == len(self.tokens):
            return  # already in sync
        base = next((s for s in reversed(self._snapshots) if s.chars <= cut), None)
        if base is None:  # cannot happen: the first snapshot is at 0 and is kept while needed
            raise GenerationError("Internal error: no state snapshot before the stop position.")
        state, logits = base.state.clone(), base.logits
        rest = self._full_text[base.chars:cut]
        del self.tokens[base.n_tokens:]
        if rest:
            extra = self.tokenizer.encode(rest)
            logits, state = runtime.forward(extra, state, inplace=True)
            self.tokens.extend(extra)
        self.state, self.last_logits = state, logits


def _logprobs_of(logits: torch.Tensor, token: int, k: int) -> tuple[int, float, list[tuple[int, float]]]:
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    top = []
    if k > 0:
        values, ids = torch.topk(log_probs, min(k, log_probs.shape[-1]))
        top = list(zip(ids.tolist(), values.tolist()))
    return token, float(log_probs[token]), top


class Stream:
    """A Generation driven by the calling thread, alone on the model (scripts, notebooks, tests).
    Iterating yields text increments ("" between prompt chunks, so a consumer can stop a long
    prompt); closing the iterator ends the generation with the state in sync."""

    def __init__(self, runtime, generation: Generation):
        self.runtime = runtime
        self.generation = generation
        self._active = None

    def __iter__(self):
        if self._active is not None:
            raise GenerationError("A generation can be iterated only once.")
        self._active = self._run()
        return self._active

    def close(self) -> None:
        if self._active is not None:
            self._active.close()

    def cancel(self) -> None:
        self.generation.cancel()

    def __getattr__(self, name):  # state, stats, text, tokens, last_logits, prompt_state, ...
        return getattr(self.generation, name)

    def _run(self):
        gen, runtime = self.generation, self.runtime
        if gen.state is None:
            gen.state = runtime.new_state()
        try:
            while (chunk := gen.next_prompt_chunk()) is not None:
                logits, _ = runtime.forward(chunk, gen.state, inplace=True)
                gen.prompt_chunk_read(logits)
                yield ""
            while (token := gen.next_token()) is not None:
                logits = runtime.step([token], [gen.state])[0]
                piece = gen.token_read(logits)
                if piece:
                    yield piece
        except GeneratorExit:  # the consumer went away: keep the state matching what it received
            gen.cancel("closed")
            gen.finish(runtime)
            return
        except BaseException:
            gen.cancel("error")
            gen.finish(runtime)
            raise
        piece = gen.finish(runtime)
        if piece:
            yield piece


def generate(runtime, tokenizer, prompt, state: State | None = None, settings: SamplingSettings | None = None,
             **options) -> Stream:
    """Start a streaming generation on `runtime` alone; options are Generation's (max_tokens,
    stop, stop_tokens, logits, logits_hook, chunk_len)."""
    if state is not None:
        runtime.check_state(state)
    options.setdefault("chunk_len", runtime.chunk_len)
    options.setdefault("sampler_kernel", runtime.sampler_kernel)
    return Stream(runtime, Generation(tokenizer, prompt, state=state, settings=settings, **options))
