"""The one owner of the model: every use of it goes through the scheduler's worker thread.

Work arrives as tickets:
  - generations (chat replies, regenerations, blog posts, continuations, outline sections):
    prompts are read in chunks between ticks; once reading is done, every active generation
    advances together: each tick is ONE batched one-token step (`Runtime.step`) over all of them,
    each row with its own state, sampler, seed, penalties, stop strings and token limit;
  - tasks (inspector recordings, experiments, notebook text cells): a function of the runtime
    that returns a generator; each `next()` is one bounded piece of model work (a chunk), run
    between ticks like a prompt chunk, so a long recording never freezes the others;
  - model switches: every running and waiting ticket ends with one sentence, the old model is
    released, then the new one is built.

Per loop iteration the worker runs prompt chunks (round robin, up to one chunk's worth of tokens:
several short prompts, or one long chunk) or one task piece, then one batched step. Each
generation gets the same chunks and the same row arithmetic as when it runs alone
(`generation.generate`), so its text never depends on who else is using the model. Past
`max_active` generations, requests wait in a queue of at most `max_queue`, and their tickets
report their place in it. Background work (`submit_background`) runs only when nothing else does.
"""

from __future__ import annotations

import gc
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from ..errors import GenerationError, PlaygroundError
from ..generation import Generation

log = logging.getLogger(__name__)


@dataclass
class SchedulerSettings:
    max_active: int = 16  # generations advancing together (the batch of a tick)
    max_queue: int = 64  # requests waiting beyond those; more are refused with a message
    idle_wait_s: float = 0.5  # how long the worker sleeps when there is nothing to do


@dataclass
class Event:
    """What a ticket's consumer receives: kind is "queued" (value: place in the queue, 1 = next),
    "started", "text" (value: released text), "progress" (value: (fraction, message)), "done"
    (value: the result) or "error" (value: the message)."""
    kind: str
    value: Any = None


def run_here(task: Iterator) -> Any:
    """Drive a task's generator (see Scheduler.submit_task) to its end in the calling thread and
    return its result: scripts and notebooks, where nobody else shares the model."""
    while True:
        try:
            next(task)
        except StopIteration as done:
            return done.value


class Ticket:
    """A request to the scheduler, as its consumer sees it: iterate the events, or wait()."""

    def __init__(self, kind: str, label: str = ""):
        self.kind = kind
        self.label = label
        self.events: queue.Queue[Event] = queue.Queue()
        self.finished = threading.Event()
        self.result: Any = None
        self.error: str | None = None
        self.position: int | None = None  # place in the queue while waiting (1 = next)
        # characters of text its consumer has received (None: not counted); a generation that is
        # stopped keeps exactly these
        self.consumed_chars: int | None = None
        self.refused = False  # the queue was full: the request never ran (the API answers 429)
        self.submitted_at = time.monotonic()
        # Called on the worker thread after every event (an asyncio consumer's wake-up; it must
        # only schedule work, never do it)
        self.waker: Callable[[], None] | None = None
        self._cancel_reason: str | None = None

    def cancel(self, reason: str = "cancelled") -> None:
        """Ask for the request to end within one tick (it keeps what it produced so far)."""
        if self._cancel_reason is None:
            self._cancel_reason = reason

    @property
    def cancelled(self) -> bool:
        return self._cancel_reason is not None

    def __iter__(self) -> Iterator[Event]:
        while True:
            event = self.events.get()
            yield event
            if event.kind in ("done", "error"):
                return

    def coalesced(self, interval: float | Callable[[], float]) -> Iterator[Event]:
        """The events, at most one batch per `interval` seconds (a number, or a function asked
        before each batch): the text that arrived meanwhile comes as one "text" event; the end
        comes at once, whatever the interval."""
        last = 0.0
        while True:
            wait = interval() if callable(interval) else interval
            if wait > 0:
                self.finished.wait(max(0.0, last + wait - time.monotonic()))
                last = time.monotonic()
            batch = [self.events.get()]
            while batch[-1].kind not in ("done", "error"):
                try:
                    batch.append(self.events.get_nowait())
                except queue.Empty:
                    break
            text = "".join(e.value for e in batch if e.kind == "text")
            for event in batch:
                if event.kind == "text":
                    if text:
                        yield Event("text", text)
                        text = ""
                    continue
                yield event
                if event.kind in ("done", "error"):
                    return

    def wait(self, timeout: float | None = None):
        """Block until the request ended; returns its result or raises its error."""
        if not self.finished.wait(timeout):
            raise TimeoutError("The request did not finish in time.")
        if self.error is not None:
            raise GenerationError(self.error)
        return self.result

    # ---- the worker's side
    def _emit(self, kind: str, value: Any = None) -> None:
        self.events.put(Event(kind, value))
        if self.waker is not None:
            self.waker()

    def _finish(self, result: Any = None, error: str | None = None) -> None:
        self.result, self.error = result, error
        self.finished.set()
        self._emit("error", error) if error is not None else self._emit("done", result)


class _Job:
    def __init__(self, ticket: Ticket):
        self.ticket = ticket


class _GenerationJob(_Job):
    def __init__(self, ticket: Ticket, generation: Generation):
        super().__init__(ticket)
        self.generation = generation


class _TaskJob(_Job):
    def __init__(self, ticket: Ticket, task: Callable[[Any], Any]):
        super().__init__(ticket)
        self.task = task
        self.iterator = None


class _SwitchJob(_Job):
    def __init__(self, ticket: Ticket, build: Callable[[Callable[[str, float], None]], Any], announcement: str):
        super().__init__(ticket)
        self.build = build
        self.announcement = announcement
        self.preflight: Callable[[], None] | None = None


class SchedulerObserver:
    """What the scheduler reports as it works (metrics.py counts it); called on the worker thread."""

    def admitted(self, kind: str, waited_s: float) -> None: ...

    def tick(self, batch_size: int) -> None: ...

    def prompt_tokens(self, n: int) -> None: ...

    def generated_tokens(self, n: int) -> None: ...


class Scheduler:
    """Owns the loaded model (an object with a `.runtime`) and runs every request on one thread."""

    def __init__(self, settings: SchedulerSettings | None = None):
        self.settings = settings or SchedulerSettings()
        self.observer = SchedulerObserver()
        self.loaded = None  # the engine's LoadedModel; only the worker replaces it
        self._lock = threading.Condition()
        self._waiting: deque[_Job] = deque()
        self._generations: list[_GenerationJob] = []
        self._tasks: list[_TaskJob] = []
        self._rotation = 0
        # work done only when nothing else waits or runs (a piece at a time): results worth having,
        # never worth slowing anyone for (the API's conversation states, completions.py)
        self._background: deque[Callable[[Any], Iterator]] = deque(maxlen=256)
        self._background_iterator: Iterator | None = None
        self._stopping = False
        self.ticks = 0  # batched steps run (tests and benchmarks read these)
        self.batch_sizes: deque[int] = deque(maxlen=1000)
        self._thread = threading.Thread(target=self._run, name="rwkv-scheduler", daemon=True)
        self._thread.start()

    # ---- submitting ---------------------------------------------------------------------------
    def submit_generation(self, generation: Generation, label: str = "") -> Ticket:
        return self._submit(_GenerationJob(Ticket("generation", label), generation))

    def submit_task(self, task: Callable[[Any], Any], label: str = "") -> Ticket:
        """task(runtime) returns a generator (each next() one bounded piece of work, yielding
        (fraction, message) or None; its return value is the result) or a plain result."""
        return self._submit(_TaskJob(Ticket("task", label), task))

    def submit_background(self, task: Callable[[Any], Iterator]) -> None:
        """task(runtime) returns a generator run one piece at a time while the model is otherwise
        idle; it may never run (a model switch drops it, and at most 256 wait: the oldest go)."""
        with self._lock:
            self._background.append(task)
            self._lock.notify_all()

    def switch_model(self, build: Callable[[Callable[[str, float], None]], Any], announcement: str,
                     preflight: Callable[[], None] | None = None) -> Ticket:
        """preflight() (checks that cannot fail later, e.g. reading the checkpoint's index) runs
        first: if it raises, nothing changes. Then everything ends (each consumer is told
        `announcement`), the model is released, and build(progress) makes the new LoadedModel on
        the worker thread. Not limited by the queue."""
        job = _SwitchJob(Ticket("switch", announcement), build, announcement)
        job.preflight = preflight
        with self._lock:
            self._waiting.appendleft(job)
            self._lock.notify_all()
        return job.ticket

    def _submit(self, job: _Job) -> Ticket:
        with self._lock:
            if len(self._waiting) >= self.settings.max_queue:
                job.ticket.refused = True
                job.ticket._finish(error=f"The server is busy ({len(self._waiting)} requests are waiting): "
                                         "try again in a minute.")
                return job.ticket
            self._waiting.append(job)
            self._update_positions()
            self._lock.notify_all()
        return job.ticket

    def status(self) -> dict:
        with self._lock:
            return {"generating": len(self._generations), "tasks": len(self._tasks), "waiting": len(self._waiting),
                    "background": len(self._background) + (self._background_iterator is not None),
                    "max_active": self.settings.max_active, "max_queue": self.settings.max_queue}

    def close(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        self._thread.join(timeout=10)

    # ---- the worker -----------------------------------------------------------------------------
    def _update_positions(self) -> None:
        for place, job in enumerate(self._waiting, 1):
            if job.ticket.position != place:
                job.ticket.position = place
                job.ticket._emit("queued", place)

    def _admit(self) -> _SwitchJob | None:
        """Move waiting jobs into the active sets while there is room; a switch is returned."""
        with self._lock:
            while not (self._waiting or self._generations or self._tasks or self._stopping
                       or ((self._background or self._background_iterator) and self.loaded is not None)):
                self._lock.wait(self.settings.idle_wait_s)
            admitted = False
            while self._waiting:
                job = self._waiting[0]
                if isinstance(job, _SwitchJob):
                    self._waiting.popleft()
                    return job
                if len(self._generations) + len(self._tasks) >= self.settings.max_active:
                    break
                self._waiting.popleft()
                job.ticket.position = None
                self.observer.admitted(job.ticket.kind, time.monotonic() - job.ticket.submitted_at)
                (self._generations if isinstance(job, _GenerationJob) else self._tasks).append(job)
                admitted = True
            if admitted:
                self._update_positions()
        return None

    def _run(self) -> None:
        while True:
            try:
                switch = self._admit()
                if self._stopping:
                    self._end_all("The server is shutting down.")
                    return
                if switch is not None:
                    self._switch(switch)
                    continue
                self._cancel_requested()
                self._one_piece()
                self._one_step()
                self._background_piece()
            except Exception as exc:  # never let the worker die: fail what is running, go on
                log.exception("scheduler error")
                self._end_all(f"Internal error ({type(exc).__name__}: {exc}).")

    def _runtime(self):
        if self.loaded is None:
            raise GenerationError("No model is loaded yet.")
        return self.loaded.runtime

    def _cancel_requested(self) -> None:
        for job in list(self._generations):
            job.generation.shown = job.ticket.consumed_chars
            if job.ticket.cancelled:
                job.generation.cancel(job.ticket._cancel_reason)
        for job in list(self._tasks):
            if job.ticket.cancelled:
                if job.iterator is not None:
                    job.iterator.close()
                self._tasks.remove(job)
                job.ticket._finish(error="Stopped.")

    def _one_piece(self) -> None:
        """Prompt chunks or one task piece, taking turns among the jobs that need one, before the
        next tick: short prompts (a chat turn: tens of tokens) are read several per tick up to one
        chunk's worth of tokens, so sixteen visitors arriving together start generating in the
        same tick instead of one more per tick; a long prompt or a task piece is one per tick."""
        candidates = [j for j in self._generations if j.generation.reading_prompt] + self._tasks
        if not candidates:
            return
        budget = self.loaded.runtime.chunk_len if self.loaded is not None else 0
        for _ in range(len(candidates)):
            self._rotation = (self._rotation + 1) % len(candidates)
            job = candidates[self._rotation]
            if isinstance(job, _GenerationJob):
                before = job.generation.prompt_read
                self._prompt_chunk(job)
                budget -= max(1, job.generation.prompt_read - before)
            else:
                self._task_piece(job)
                budget = 0
            if budget <= 0:
                return

    def _prompt_chunk(self, job: _GenerationJob) -> None:
        gen = job.generation
        try:
            runtime = self._runtime()
            if gen.state is None:
                gen.state = runtime.new_state()
                job.ticket._emit("started")
            else:
                runtime.check_state(gen.state)
            chunk = gen.next_prompt_chunk()
            if chunk is not None:
                logits, _ = runtime.forward(chunk, gen.state, inplace=True)
                gen.prompt_chunk_read(logits)
                self.observer.prompt_tokens(len(chunk))
                gen.next_prompt_chunk()  # marks the prompt read once the last chunk is in
        except Exception as exc:
            self._fail_generation(job, exc)

    def _task_piece(self, job: _TaskJob) -> None:
        try:
            if job.iterator is None:
                job.ticket._emit("started")
                out = job.task(self._runtime())
                if not hasattr(out, "__next__"):
                    self._tasks.remove(job)
                    job.ticket._finish(result=out)
                    return
                job.iterator = out
            progress = next(job.iterator)
            if progress is not None:
                job.ticket._emit("progress", progress)
        except StopIteration as done:
            self._tasks.remove(job)
            job.ticket._finish(result=done.value)
        except Exception as exc:
            self._tasks.remove(job)
            job.ticket._finish(error=_message(exc))

    def _one_step(self) -> None:
        """One batched one-token step for every generation past its prompt."""
        rows: list[_GenerationJob] = []
        tokens: list[int] = []
        for job in [j for j in self._generations if not j.generation.reading_prompt]:
            try:
                token = job.generation.next_token()
            except Exception as exc:
                self._fail_generation(job, exc)
                continue
            if token is None:
                self._finish_generation(job)
            else:
                rows.append(job)
                tokens.append(token)
        if not rows:
            return
        try:
            logits = self._runtime().step(tokens, [job.generation.state for job in rows])
        except Exception as exc:  # a failed batch fails its rows; it cannot be attributed to one
            for job in rows:
                self._fail_generation(job, exc)
            return
        self.ticks += 1
        self.batch_sizes.append(len(rows))
        self.observer.tick(len(rows))
        self.observer.generated_tokens(len(rows))
        for b, job in enumerate(rows):
            piece = job.generation.token_read(logits[b].clone())
            if piece:
                job.ticket._emit("text", piece)

    def _background_piece(self) -> None:
        with self._lock:
            if self._waiting or self._generations or self._tasks or self.loaded is None:
                return
            if self._background_iterator is None:
                if not self._background:
                    return
                task = self._background.popleft()
            else:
                task = None
        try:
            if task is not None:
                self._background_iterator = task(self.loaded.runtime)
            next(self._background_iterator)
        except StopIteration:
            self._background_iterator = None
        except Exception:
            log.exception("background task failed")
            self._background_iterator = None

    def _drop_background(self) -> None:
        with self._lock:
            self._background.clear()
            iterator, self._background_iterator = self._background_iterator, None
        if iterator is not None and hasattr(iterator, "close"):
            iterator.close()

    def _finish_generation(self, job: _GenerationJob) -> None:
        self._generations.remove(job)
        try:
            piece = job.generation.finish(self._runtime())
            if piece:
                job.ticket._emit("text", piece)
            job.ticket._finish(result=job.generation)
        except Exception as exc:
            job.ticket._finish(error=_message(exc))

    def _fail_generation(self, job: _GenerationJob, exc: Exception) -> None:
        if not isinstance(exc, PlaygroundError):
            log.exception("generation failed", exc_info=exc)
        gen = job.generation
        gen.cancel("error")
        try:
            if self.loaded is not None and gen.state is not None:
                gen.finish(self.loaded.runtime)  # keep the state in sync with what was shown
        except Exception:  # the error below is the one to report
            log.exception("could not sync the state after an error")
        if job in self._generations:
            self._generations.remove(job)
        job.ticket._finish(error=_message(exc))

    def _end_all(self, message: str) -> None:
        with self._lock:
            jobs = list(self._waiting) + self._generations + self._tasks
            self._waiting.clear()
        self._generations, self._tasks = [], []
        for job in jobs:
            if isinstance(job, _GenerationJob):
                job.generation.cancel("model_switched")
                try:
                    if self.loaded is not None and job.generation.state is not None:
                        job.generation.finish(self.loaded.runtime)
                except Exception:
                    log.exception("could not sync a state while ending it")
            elif isinstance(job, _TaskJob) and job.iterator is not None:
                job.iterator.close()
            if not job.ticket.finished.is_set():
                job.ticket._finish(error=message)

    def _switch(self, job: _SwitchJob) -> None:
        if job.preflight is not None:
            try:
                job.preflight()
            except Exception as exc:  # the current model stays
                job.ticket._finish(error=_message(exc))
                return
        self._end_all(job.announcement)
        self._drop_background()
        self.loaded = None
        gc.collect()  # the old model's memory is released before the new one is built
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        t0 = time.perf_counter()
        try:
            self.loaded = job.build(lambda message, fraction: job.ticket._emit("progress", (fraction, message)))
        except Exception as exc:
            job.ticket._finish(error=_message(exc))
            return
        log.info("model switched in %.1f s", time.perf_counter() - t0)
        job.ticket._finish(result=self.loaded)


def _message(exc: BaseException) -> str:
    if isinstance(exc, PlaygroundError):
        return str(exc)
    return f"Something went wrong ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})."
