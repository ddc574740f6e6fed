"""Completions for programs (the OpenAI-compatible API, api.py): a request becomes Generations
on the engine's scheduler, batched with the browser visitors' ones, and a conversation that
extends an earlier one starts from the state kept after it.

    plan = chat_plan(loaded, messages=[("user", "Hello")], options=CompletionOptions(max_tokens=50))
    run = CompletionRun(engine, cache, plan)
    await run.start()                   # ServerBusy when the scheduler's queue is full
    async for event in run.events():    # RunEvent("text", choice, piece, logprobs=...) ... RunEvent("done", ...)
        ...
    run.usage                           # prompt / completion / cached token counts

**State reuse.** A prompt is a list of segments (a chat: the prompt text up to each reply, and
each reply), and it is always read segment by segment, each in chunks from its own start. So the
state at a segment boundary is a function of the segments before it only, and `PrefixCache`
keeps such states (after a prompt, and after a reply re-read as the client will send it back),
keyed by the exact token prefix. A request that extends a cached prefix reads only the rest,
and gets bit for bit what reading the whole conversation again gives (tests/test_api.py).

Async (asyncio) because its consumer is a web server's event loop; the model work itself runs
on the scheduler's thread, and nothing here blocks the loop.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import hashlib
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, Callable

import torch

from ..chat_format import REPLY_END, ChatFormat, fold_message, model_chat_format, reply_logits_hook, reply_stops
from ..errors import GenerationError
from ..generation import Generation
from ..sampling import SamplingSettings
from .scheduler import Ticket
from .sessions import followed_stream, streams_followed, update_interval
from ..state import State


class ServerBusy(GenerationError):
    """The scheduler's queue is full (the API answers 429 with Retry-After)."""


FINISH_REASONS = {"max_tokens": "length", "stop_string": "stop", "end_of_text": "stop", "stop_token": "stop"}


# ---- prompts ----------------------------------------------------------------------------------

def chat_segments(fmt: ChatFormat, messages: list[tuple[str, str]]) -> list[str]:
    """A conversation as the Chat tab would have read it, cut where a reply starts and ends:
    [prompt up to "Assistant:", " reply", "\\n\\nUser: ...\\n\\nAssistant:", ...]. System (and
    developer) messages are the scenario: a paragraph read where they stand."""
    segments: list[str] = []
    pending = ""

    def sep() -> str:
        return REPLY_END if (segments or pending) else ""

    for role, content in messages:
        text = fold_message(content)
        if role in ("system", "developer"):
            if text:
                pending += sep() + text
        elif role == "user":
            pending += sep() + f"{fmt.user}: {text}"
        elif role == "assistant":
            pending += sep() + f"{fmt.bot}:"
            segments.append(pending)
            pending = ""
            if text:
                segments.append(" " + text)
        else:
            raise GenerationError(f"Unknown message role '{role}'.")
    start = f" {fmt.reply_start.strip()}" if fmt.reply_start.strip() else ""
    segments.append(pending + sep() + f"{fmt.bot}:{start}")
    return segments


def reply_segment(fmt: ChatFormat, reply: str) -> str:
    """How a reply returned to the client comes back as its assistant message (chat_segments)."""
    text = fold_message(reply)
    return " " + text if text else ""


@dataclass
class CompletionOptions:
    max_tokens: int = 16
    settings: SamplingSettings = field(default_factory=SamplingSettings)
    stop: tuple[str, ...] = ()
    n: int = 1
    logprobs: int | None = None  # None: off; k: each token's log-probability and the k most likely
    logit_bias: dict[int, float] = field(default_factory=dict)
    scope: str = ""  # requests share cached states only within one scope (an API key, a user)


@dataclass
class CompletionPlan:
    """What to read and how to sample: built by chat_plan / text_plan."""
    segments: list[list[int]]  # prompt token ids, segment by segment
    options: CompletionOptions
    stop: tuple[str, ...]
    logits_hook: Callable[[int, torch.Tensor], None] | None
    banned: tuple[int, ...]
    fmt: ChatFormat | None = None  # chat: replies are kept in the cache as the next prompt's start

    @functools.cached_property
    def prompt_tokens(self) -> list[int]:  # (once: up to --api-max-prompt-tokens, read several times)
        return [t for ids in self.segments for t in ids]


def _hooks(*hooks):
    hooks = [h for h in hooks if h is not None]
    if not hooks:
        return None

    def run(step: int, logits: torch.Tensor) -> None:
        for hook in hooks:
            hook(step, logits)
    return run


def _bias_hook(bias: dict[int, float]):
    if not bias:
        return None
    ids = torch.tensor(list(bias), dtype=torch.long)
    values = torch.tensor(list(bias.values()), dtype=torch.float32)

    def add(step: int, logits: torch.Tensor) -> None:
        logits[ids] += values
    return add


def chat_plan(loaded, messages: list[tuple[str, str]], options: CompletionOptions) -> CompletionPlan:
    """A chat completion in the loaded model's chat format (the Chat tab's default for it)."""
    fmt = model_chat_format(loaded)
    segments = [loaded.tokenizer.encode(text) if text else [] for text in chat_segments(fmt, messages)]
    return CompletionPlan(segments, options, tuple(reply_stops(fmt)) + options.stop,
                          _hooks(reply_logits_hook(loaded.newline_id), _bias_hook(options.logit_bias)),
                          banned=(loaded.tokenizer.eos_id,), fmt=fmt)


def text_plan(loaded, prompt: str | list[int], options: CompletionOptions) -> CompletionPlan:
    """A plain completion of a text (or of token ids)."""
    ids = loaded.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
    return CompletionPlan([ids], options, options.stop, _bias_hook(options.logit_bias), banned=())


# ---- the cache of states at segment boundaries -------------------------------------------------

@dataclass
class _Entry:
    """The state after `n_tokens` tokens; or, deferred, the state `extra` tokens before it (a
    reply not re-read yet): a request that finds it reads those tokens first."""
    key: bytes
    n_tokens: int
    state: State
    logits: torch.Tensor
    extra: tuple[int, ...] = ()

    def nbytes(self) -> int:
        return self.state.nbytes() + self.logits.numel() * self.logits.element_size()


class PrefixCache:
    """States after exact token prefixes, least recently used first out; at most `max_entries`,
    and accounted in the server's memory budget (memory.Accounted: it drops the largest entries
    when memory runs short)."""

    kind = "api-cache"
    busy = False  # (entries are never in use: a run copies the state it starts from)

    def __init__(self, max_entries: int = 64):
        self.max_entries = max(0, int(max_entries))
        self.last_active = time.monotonic()
        self.budget = None
        self._entries: collections.OrderedDict[bytes, _Entry] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.fingerprint = ""

    @staticmethod
    def boundary_keys(scope: str, fingerprint: str, segments: list[list[int]]):
        """[(tokens so far, key)] after each segment, shortest first, and the running digest
        (extend it with `extended_key` for a segment that follows)."""
        digest = hashlib.blake2b(f"{scope}\0{fingerprint}\0".encode(), digest_size=20)
        keys, n = [], 0
        for ids in segments:
            if ids:
                n += len(ids)
                keys.append((n, PrefixCache.extended_key(digest, ids)))
        return keys, digest

    @staticmethod
    def extended_key(digest, ids: list[int]) -> bytes:
        """Feeds `ids` into the running digest; the key of the prefix so far."""
        digest.update(torch.tensor(ids, dtype=torch.int32).numpy().tobytes())
        return digest.copy().digest()

    def for_model(self, fingerprint: str) -> None:
        """States mean something only to the model that made them: a new model empties the cache."""
        with self._lock:
            if fingerprint != self.fingerprint:
                self._entries.clear()
                self.fingerprint = fingerprint

    def longest(self, keys: list[tuple[int, bytes]]) -> _Entry | None:
        """The entry of the longest of these prefixes that is kept (entries are never modified:
        a deferred one is replaced when its tokens are read)."""
        with self._lock:
            for _, key in reversed(keys):
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    return entry
        return None

    def put(self, entry: _Entry, engine=None, replace_deferred: bool = False) -> None:
        if self.max_entries == 0:
            return
        with self._lock:
            old = self._entries.get(entry.key)
            if old is not None and not (replace_deferred and old.extra):
                return
            self._entries[entry.key] = entry
            self._entries.move_to_end(entry.key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        self.last_active = time.monotonic()
        if engine is not None:
            engine.memory.enforce(keep=self)

    def deferred(self, key: bytes) -> _Entry | None:
        with self._lock:
            entry = self._entries.get(key)
        return entry if entry is not None and entry.extra else None

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    # ---- memory.Accounted
    def memory_items(self) -> list[tuple[str, int]]:
        with self._lock:
            return [(key.hex(), e.nbytes()) for key, e in self._entries.items()]

    def drop(self, key: str) -> str:
        with self._lock:
            self._entries.pop(bytes.fromhex(key), None)
        return "a kept API conversation state"

    def tell(self, sentence: str) -> None:
        pass  # (nobody reads the cache's notices)

    def release(self) -> None:
        self.clear()


# ---- a run --------------------------------------------------------------------------------------

@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class ChoiceResult:
    index: int
    text: str = ""
    finish_reason: str | None = None
    logprobs: list = field(default_factory=list)  # (id, logprob, [(id, logprob)]) per token
    generation: Generation | None = None


class _Wakeup:
    """Wakes an asyncio task from the scheduler's thread, only while it waits (`wait`): a stream
    that is pausing between two pieces is not woken for every token of every stream."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.event = asyncio.Event()
        self._armed = False
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            if not self._armed:
                return
            self._armed = False
        self.loop.call_soon_threadsafe(self.event.set)

    def arm(self) -> None:
        """Before draining the tickets: an event that lands from now on wakes `wait`."""
        self.event.clear()
        with self._lock:
            self._armed = True

    async def wait(self) -> None:
        await self.event.wait()


@dataclass(frozen=True)
class RunEvent:
    """What a run's consumer receives: released text of a choice, or its end."""
    kind: str  # "text" | "done"
    index: int  # the choice
    text: str = ""  # "text": the piece released
    finish_reason: str | None = None  # "done": "stop" | "length" | ...
    logprobs: list = field(default_factory=list)  # (token, logprob, top) entries new with this event


class CompletionRun:
    """One API request on the scheduler: its cache lookup, its n choices, its usage."""

    UPDATE_INTERVAL_S = 0.02  # a stream's pieces come at most this often (more streams: less often)

    def __init__(self, engine, cache: PrefixCache, plan: CompletionPlan):
        self.engine = engine
        self.cache = cache
        self.plan = plan
        self.loaded = engine.require()
        self.usage = Usage(prompt_tokens=len(plan.prompt_tokens))
        self.choices = [ChoiceResult(i) for i in range(plan.options.n)]
        self._tickets: list[Ticket] = []
        self._wakeup: _Wakeup | None = None
        self._keys: list[tuple[int, bytes]] = []
        self._digest = None  # the digest of the whole prompt (a reply's key extends it)

    # ---- starting
    async def start(self) -> None:
        """Look the prompt up in the cache and submit the work; raises ServerBusy or
        GenerationError (the request is refused, nothing ran)."""
        if not self.plan.prompt_tokens:
            raise GenerationError("The prompt is empty: there is nothing to continue.")
        vocab = self.loaded.runtime.config.vocab_size
        if max(self.plan.prompt_tokens) >= vocab or min(self.plan.prompt_tokens) < 0:
            raise GenerationError(f"Token ids must be between 0 and {vocab - 1}.")
        self._wakeup = _Wakeup()
        fingerprint = self.loaded.runtime.fingerprint
        self._keys, self._digest = PrefixCache.boundary_keys(self.plan.options.scope, fingerprint,
                                                             self.plan.segments)
        self.cache.for_model(fingerprint)
        entry = self.cache.longest(self._keys)
        state, logits, extra = (entry.state, entry.logits, list(entry.extra)) if entry else (None, None, [])
        kept = entry.n_tokens if entry is not None else 0
        base_tokens = kept - len(extra)
        self.usage.cached_tokens = base_tokens
        rest, breaks = self._rest_after(kept)
        if extra:  # a reply kept as the tokens to read after the state before it
            rest, breaks = extra + rest, [len(extra)] + [b + len(extra) for b in breaks]
        if self.plan.options.n == 1:
            self._submit([self._generation(0, rest, breaks, state, logits)])
        else:  # read the prompt once, then every choice from a copy of its state
            if rest:
                state, logits = await self._prefill(rest, breaks, state, logits)
                self._keep_prompt_state(state, logits)
            self._submit([self._generation(i, [], (), state, logits) for i in range(self.plan.options.n)])

    def _keep_prompt_state(self, state, logits) -> None:
        if state is not None and self.usage.cached_tokens < self.usage.prompt_tokens:
            self.cache.put(_Entry(self._keys[-1][1], self.usage.prompt_tokens, state, logits), self.engine,
                           replace_deferred=True)

    def _rest_after(self, n_tokens: int) -> tuple[list[int], list[int]]:
        rest, breaks, position = [], [], 0
        for ids in self.plan.segments:
            if position >= n_tokens:
                rest += ids
                breaks.append(len(rest))
            position += len(ids)
        return rest, breaks

    def _generation(self, index: int, prompt: list[int], breaks, state, logits) -> Generation:
        options, runtime = self.plan.options, self.loaded.runtime
        settings = options.settings
        if settings.seed is not None and index > 0:  # choice 0 is what n = 1 gives for this seed
            settings = replace(settings, seed=(settings.seed, index))
        settings = settings.banning(self.plan.banned)
        gen = Generation(self.loaded.tokenizer, prompt, state=state, logits=logits, settings=settings,
                         max_tokens=options.max_tokens, stop=self.plan.stop, logits_hook=self.plan.logits_hook,
                         chunk_len=runtime.chunk_len, sampler_kernel=runtime.sampler_kernel,
                         logprobs=options.logprobs, prompt_breaks=breaks)
        self.choices[index].generation = gen
        return gen

    def _submit(self, generations: list[Generation]) -> None:
        for gen in generations:
            ticket = self.engine.scheduler.submit_generation(gen, label="api")
            ticket.consumed_chars = 0
            ticket.waker = self._wakeup
            self._tickets.append(ticket)
            if ticket.refused:
                self.cancel()
                raise ServerBusy(ticket.error)

    async def _prefill(self, tokens: list[int], breaks: list[int], state, logits):
        scheduler = self.engine.scheduler

        def read(runtime):
            return (yield from read_segments(runtime, scheduler.observer, state, logits, tokens, breaks))

        if not tokens:
            return state, logits
        ticket = scheduler.submit_task(read, label="api")
        ticket.waker = self._wakeup
        self._tickets.append(ticket)
        if ticket.refused:
            raise ServerBusy(ticket.error)
        try:
            while True:
                self._wakeup.arm()
                if ticket.finished.is_set():
                    break
                await self._wakeup.wait()
        finally:  # (cancelled: the request went away while its prompt was read)
            if not ticket.finished.is_set():
                ticket.cancel("closed")
        self._tickets.remove(ticket)
        if ticket.error is not None:
            raise GenerationError(ticket.error)
        return ticket.result

    # ---- following
    async def events(self) -> AsyncIterator["RunEvent"]:
        """RunEvent("text", index, piece, logprobs=new entries) as text is released,
        RunEvent("done", index, finish_reason=..., logprobs=...) per choice; raises
        GenerationError if a choice fails.
        Text that arrives together comes as one piece, and pieces come at most every
        `update_interval` (shared with the browser's streams), so sixteen streams do not cost the
        web server and its clients a message per token each on the cores the model runs on."""
        tickets = dict(enumerate(self._tickets))
        sent_logprobs = [0] * len(tickets)
        loop = asyncio.get_running_loop()
        last = 0.0
        try:
            with followed_stream():
                while tickets:
                    wait = update_interval(self.UPDATE_INTERVAL_S, streams_followed()) - (loop.time() - last)
                    if wait > 0:
                        await asyncio.sleep(wait)
                    self._wakeup.arm()
                    pieces: dict[int, str] = {}
                    ended: list[int] = []
                    for index, ticket in list(tickets.items()):
                        while True:
                            try:
                                event = ticket.events.get_nowait()
                            except queue.Empty:
                                break
                            if event.kind == "text":
                                ticket.consumed_chars += len(event.value)
                                pieces[index] = pieces.get(index, "") + event.value
                            elif event.kind == "done":
                                ended.append(index)
                                break
                            elif event.kind == "error":
                                raise GenerationError(event.value)
                    for index, piece in pieces.items():
                        choice = self.choices[index]
                        choice.text += piece
                        entries = []
                        if self.plan.options.logprobs is not None:
                            released = choice.generation.released_logprobs(len(choice.text))
                            entries = released[sent_logprobs[index]:]
                            sent_logprobs[index] = len(released)
                        yield RunEvent("text", index, text=piece, logprobs=entries)
                    for index in ended:
                        del tickets[index]
                        choice = self.choices[index]
                        gen = choice.generation
                        choice.text = gen.text
                        choice.finish_reason = FINISH_REASONS.get(gen.stats.stop_reason, "stop")
                        choice.logprobs = gen.released_logprobs()
                        yield RunEvent("done", index, finish_reason=choice.finish_reason,
                                       logprobs=choice.logprobs[sent_logprobs[index]:])
                    if pieces or ended:
                        last = loop.time()
                    elif tickets:
                        await self._wakeup.wait()
            self._finished()
        finally:
            self.cancel()

    def cancel(self) -> None:
        """The client went away (or the request failed): end every choice within a tick."""
        for ticket in self._tickets:
            if not ticket.finished.is_set():
                ticket.cancel("closed")

    def _finished(self) -> None:
        self.usage.completion_tokens = sum(c.generation.sampled for c in self.choices)
        if self.plan.options.n == 1:  # the state after the prompt, from its generation
            first = self.choices[0].generation
            self._keep_prompt_state(first.prompt_state, first.prompt_logits)
        if self.plan.fmt is not None:
            for choice in self.choices:
                self._keep_reply(choice)

    def _keep_reply(self, choice: ChoiceResult) -> None:
        """Keep the reply as the client will send it back (reply_segment) after the state after
        the prompt: the conversation's next request reads only its new turn once the reply is
        re-read, which the scheduler does when it is otherwise idle (before that, the next request
        reads the reply itself: the same tokens from the same state, the same result)."""
        gen = choice.generation
        if gen.prompt_state is None or not gen.text.strip():
            return
        reply_ids = self.loaded.tokenizer.encode(reply_segment(self.plan.fmt, gen.text))
        key = PrefixCache.extended_key(self._digest.copy(), reply_ids)
        n_tokens = self.usage.prompt_tokens + len(reply_ids)
        cache, engine, scheduler = self.cache, self.engine, self.engine.scheduler
        cache.put(_Entry(key, n_tokens, gen.prompt_state, gen.prompt_logits, tuple(reply_ids)), engine)

        def reread(runtime):
            entry = cache.deferred(key)
            if entry is None:  # dropped, or read by a request meanwhile
                return
            extra = list(entry.extra)
            work, out = yield from read_segments(runtime, scheduler.observer, entry.state, entry.logits, extra,
                                                 [len(extra)])
            cache.put(_Entry(key, n_tokens, work, out), engine, replace_deferred=True)

        scheduler.submit_background(reread)


def read_segments(runtime, observer, state: State | None, logits, tokens: list[int], breaks: list[int]):
    """A scheduler task's body: read `tokens` into a copy of `state` (None: an empty one), each
    segment (ending at each of `breaks`) in chunks from its own start, as a Generation with these
    prompt breaks reads them; one chunk per piece. Returns (state, logits)."""
    work = state.clone() if state is not None else runtime.new_state()
    out, start = logits, 0
    for end in breaks:
        for at in range(start, end, runtime.chunk_len):
            chunk = tokens[at:min(at + runtime.chunk_len, end)]
            out, _ = runtime.forward(chunk, work, inplace=True)
            observer.prompt_tokens(len(chunk))
            yield None
        start = end
    return work, out


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
