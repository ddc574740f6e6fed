"""What every visitor's session object shares: the notices the visitor should read, following a
generation through the scheduler, Stop, and the document it keeps in the session store.

Many visitors share one server, so nothing a session keeps may grow without bound: a session is
an `Accounted` object of the memory budget (memory.py): it reports what it holds
(`memory_items`), and the budget drops the largest objects of idle sessions first once the total
passes the limit. The session keeps a sentence saying what was dropped, shown to the visitor when
they come back; what was dropped is rebuilt by re-reading tokens where that is possible (chat,
blog), or asked for again (a recording).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
import weakref
from typing import Iterator

from ..errors import GenerationError, PlaygroundError
from ..generation import Generation
from .memory import MemoryBudget  # noqa: F401  (re-exported: its home was this module)
from .scheduler import Event, Ticket

log = logging.getLogger("rwkv_playground.sessions")
# While a reply streams, its text so far is saved this often (text only: a crash loses at most
# this much of what was shown; the states are saved when the reply ends).
CHECKPOINT_INTERVAL_S = 0.5

# Updates handed to all the streams being followed, together, per second at most. One browser
# needs ~20 a second, but 16 visitors streaming at once need not 320: every update costs the web
# server a re-render of that visitor's outputs, on the same cores the model runs on. Past a few
# streams each gets fewer updates (16 at once: 5 a second each); the text is the same.
TOTAL_UPDATES_PER_SECOND = 80
_streams = {"count": 0}
_streams_lock = threading.Lock()


def streams_followed() -> int:
    """How many tickets sessions are following now (all visitors)."""
    return _streams["count"]


class followed_stream:
    """Counts a stream being followed (a session's ticket, an API response) in streams_followed()."""

    def __enter__(self):
        with _streams_lock:
            _streams["count"] += 1

    def __exit__(self, *exc):
        with _streams_lock:
            _streams["count"] -= 1


def update_interval(base: float, streams: int) -> float:
    """Seconds between two updates of one stream: `base` (0: every event), longer once `streams`
    together would pass TOTAL_UPDATES_PER_SECOND."""
    return 0.0 if base <= 0 else max(base, streams / TOTAL_UPDATES_PER_SECOND)


class Session:
    """Base of the chat, blog, inspector and notebook sessions."""

    kind = "session"

    def __init__(self):
        self.notices: list[str] = []  # sentences for the visitor (e.g. what was dropped, and why)
        self.live: Generation | None = None  # the generation streaming now (for live counts)
        self.waiting: int | None = None  # place in the scheduler's queue while waiting
        self.busy = False  # a request of this session is running
        # Seconds between two updates handed to the consumer (0: every event at once). A browser
        # needs ~20 a second; fewer wake-ups of the consumer's thread leave the model's thread
        # the interpreter lock (with many visitors, per-token wake-ups slowed every tick).
        self.update_interval = 0.0
        self.last_active = time.monotonic()
        self.budget: weakref.ref | None = None  # the MemoryBudget accounting this session
        self._tickets: set[Ticket] = set()
        # The session store (store.Visitor) keeping this visitor's work, and the id of the document
        # this session holds (None: nothing is kept beyond this process, e.g. --no-store)
        self.visitor = None
        self.doc_id = uuid.uuid4().hex
        self.title = ""
        self.stored = False  # the store holds this document (so an emptied one is saved too)
        self._checkpointed = 0.0

    # ---- the session store
    # The kind of document this session holds (store.KINDS; "" for none). A session with a kind
    # defines open_from(doc, loaded): hold that stored document (`loaded`: the engine's model or None).
    store_kind = ""

    def open_stored(self, doc_id: str, loaded) -> bool:
        """Hold the visitor's document `doc_id`; False if they have no such document of this kind."""
        if self.visitor is None or not self.store_kind:
            return False
        doc = self.visitor.load(doc_id)
        if doc is None or doc.kind != self.store_kind:
            return False
        self.open_from(doc, loaded)
        self.visitor.touch(doc_id)  # what a reload reopens (the newest) is what the visitor had open
        self.visitor.store.flush()
        return True

    def delete_stored(self) -> None:
        """Remove the document held now from the store (if it is there); the caller holds another."""
        if self.visitor is not None and self.stored:
            self.visitor.delete(self.doc_id)
            self.visitor.store.flush()

    def open_newest(self, loaded) -> bool:
        """Hold the visitor's newest document of this session's kind, if they have one."""
        if self.visitor is None or not self.store_kind:
            return False
        docs = self.visitor.documents(self.store_kind)
        doc = self.visitor.load(docs[0].id) if docs else None
        if doc is None:
            return False
        self.open_from(doc, loaded)
        return True

    def document(self, with_states: bool = True):
        """This session's work as a store.Document (None: nothing to keep yet); with_states=False:
        its text only (no state slots: what a checkpoint while streaming saves)."""
        return None

    def persist(self, with_states: bool = True) -> None:
        """Hand the document to the store (its writer thread commits it); text only with
        with_states=False. A store that fails is told to the visitor, never raised."""
        if self.visitor is None:
            return
        try:
            doc = self.document(with_states)
            if doc is not None:
                self.visitor.save(doc, with_states=with_states)
        except PlaygroundError as exc:
            self.notices.append(f"Your work could not be saved: {exc}")
        except Exception:  # noqa: BLE001 - saving must never break the visitor's stream
            log.exception("Saving a %s document failed", self.kind)
            self.notices.append("Your work could not be saved (the server log says why).")

    def checkpoint(self) -> None:
        """While streaming: save the text so far, at most every CHECKPOINT_INTERVAL_S."""
        now = time.monotonic()
        if self.visitor is not None and now - self._checkpointed >= CHECKPOINT_INTERVAL_S:
            self._checkpointed = now
            self.persist(with_states=False)

    def stored_state(self, slot: str, digest: str):
        """(state, logits) of this session's document from the store, or None."""
        if self.visitor is None:
            return None
        try:
            return self.visitor.state(self.doc_id, slot, digest)
        except Exception:  # noqa: BLE001 - a store that fails means re-reading, not an error
            log.exception("Reading a stored state failed")
            return None

    # ---- memory accounting
    def memory_items(self) -> list[tuple[str, int]]:
        """(key, bytes) of every droppable object this session keeps."""
        return []

    def drop(self, key: str) -> str:
        """Free one object; returns what was dropped, as a phrase for the visitor."""
        raise KeyError(key)

    def release(self) -> None:
        """Free everything droppable (the visitor is gone)."""
        for key, _ in self.memory_items():
            self.drop(key)

    def memory_bytes(self) -> int:
        return sum(n for _, n in self.memory_items())

    def touch(self, engine=None) -> None:
        """Record activity; after a request that kept new objects, let the budget act."""
        self.last_active = time.monotonic()
        if engine is not None:
            engine.memory.enforce(keep=self)

    def tell(self, sentence: str) -> None:
        """A sentence for the visitor, shown with their next update (what the budget dropped, ...)."""
        self.notices.append(sentence)

    def configure(self, settings) -> None:
        """Take the server's serving settings (engine.ServingSettings) when the engine adds the
        session; sessions that keep per-turn states read their limits here."""

    def take_notices(self) -> list[str]:
        notices, self.notices = self.notices, []
        return notices

    def close(self) -> None:
        """The visitor left (tab closed, session expired): stop what still runs for them."""
        self._cancel_tickets("closed")

    def stop(self) -> bool:
        """The visitor pressed Stop: end what runs for them within one tick (what was produced
        stays, in sync with its state). Returns whether anything was running."""
        return self._cancel_tickets("cancelled")

    def _cancel_tickets(self, reason: str) -> bool:
        tickets = list(self._tickets)
        for ticket in tickets:
            ticket.cancel(reason)
        return bool(tickets)

    # ---- requests
    def follow(self, ticket: Ticket) -> Iterator[Event]:
        """A ticket's events; an early close (Stop, a closed tab) cancels the request and waits for
        it to end (within one scheduler tick), so what it produced is in a consistent state."""
        self._tickets.add(ticket)
        ticket.consumed_chars = 0
        try:
            with followed_stream():
                for event in ticket.coalesced(lambda: update_interval(self.update_interval, streams_followed())):
                    if event.kind == "queued":
                        self.waiting = event.value
                    elif event.kind in ("started", "text", "progress"):
                        self.waiting = None
                    elif event.kind == "error":
                        raise GenerationError(event.value)
                    if event.kind == "text":  # counted before it is handed on: a close lands after it
                        ticket.consumed_chars += len(event.value)
                    yield event
        finally:
            if not ticket.finished.is_set():
                ticket.cancel("closed")
                ticket.finished.wait()
            self._tickets.discard(ticket)
            self.waiting = None


def forget_session(session: Session | None) -> None:
    """The visitor left: stop what runs for them, free what they kept, leave the budget.
    (A plain function of the session: Gradio deep-copies its State's delete_callback into every
    page config, so it must not reach the engine and its model.)"""
    if session is None:
        return
    session.close()
    session.release()
    budget = session.budget() if session.budget is not None else None
    if budget is not None:
        budget.remove(session)


def follow_generation(session: Session, engine, generation: Generation) -> Iterator[str]:
    """Run `generation` through the engine's scheduler, yielding the text received so far after
    each event (the worker may already be a token ahead: what counts is what was received). On
    return (normal, error or early close) generation.state is in sync with generation.text, which
    is exactly the text received."""
    if session.busy:
        raise GenerationError("This session is already generating: wait for it to finish, or press Stop.")
    session.busy, session.live = True, generation
    session.last_active = time.monotonic()
    received = ""
    try:
        for event in session.follow(engine.scheduler.submit_generation(generation, label=session.kind)):
            if event.kind == "text":
                received += event.value
            yield received
    finally:
        session.busy, session.live = False, None


def run_task(session: Session, engine, task, label: str = "") -> Iterator[Event]:
    """Run a model task (see Scheduler.submit_task) for this session, yielding its events; the
    last one is "done" with the result."""
    if session.busy:
        raise GenerationError("This session is already using the model: wait for it to finish, or press Stop.")
    session.busy = True
    session.last_active = time.monotonic()
    try:
        yield from session.follow(engine.scheduler.submit_task(task, label=label or session.kind))
    finally:
        session.busy = False
