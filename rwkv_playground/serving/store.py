"""The session store: what visitors wrote (conversations, posts, notebooks) and the states after
them, kept across reloads and restarts. Knows nothing of Gradio.

    store = SessionStore.open("~/.local/share/rwkv-playground")       # SQLite, WAL
    store = SessionStore.open("postgresql+psycopg://user@host/db")     # several processes
    visitor = store.visitor(key)          # a key minted by new_key(); refused if malformed
    visitor.save(doc)                      # a Document: its text (JSON body) and its states
    visitor.documents("chat")              # newest first

SQL goes through SQLAlchemy Core (one code path for SQLite and PostgreSQL). A visitor is known by
the SHA-256 of their key (the key itself is never stored or logged), and every query is filtered
by it, so a key reaches its own documents only. States are kept as state files (safetensors bytes
with the model's fingerprint) under a disk budget: past it the least recently used states are
dropped (they can be rebuilt by reading the text again), never a document. Visitors idle for the
retention period are deleted whole. Writes go through one writer thread, so saving a turn never
waits for the disk; `flush()` waits for them.
"""

from __future__ import annotations

import hashlib
from array import array
import itertools
import json
import logging
import os
import queue
import re
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import sqlalchemy as sa
import torch

from ..errors import PlaygroundError
from ..state import State

log = logging.getLogger("rwkv_playground.store")

SCHEMA_VERSION = 1
KINDS = ("chat", "post", "notebook")
KEY_BYTES = 32  # 256 random bits: secrets.token_urlsafe(32) -> 43 characters
KEY_PATTERN = re.compile(r"[A-Za-z0-9_-]{43}")
DEFAULT_DISK_BUDGET = 2 << 30
DEFAULT_RETENTION_DAYS = 30.0
MAX_DOCUMENTS_PER_KIND = 1000  # per visitor and kind: past it a new one is refused (never an old one dropped)
MAX_BODY_BYTES = 16 << 20
EXPIRY_INTERVAL_S = 3600.0
BUDGET_RESUM = 32  # state writes between two sums of the states' bytes from the table  # how often the writer thread deletes visitors idle past the retention


class StoreError(PlaygroundError):
    """The store cannot be opened or used (one sentence for the operator or the visitor)."""


def default_data_dir() -> Path:
    """$XDG_DATA_HOME/rwkv-playground (~/.local/share/rwkv-playground)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "rwkv-playground"


def new_key() -> str:
    return secrets.token_urlsafe(KEY_BYTES)


def key_id(key: str) -> str:
    return hashlib.sha256(key.encode("ascii")).hexdigest()


class RunningDigest:
    """tokens_digest of a growing token list, one pass: the digest after each piece read."""

    def __init__(self, fingerprint: str):
        self._hash = hashlib.blake2b(fingerprint.encode(), digest_size=16)

    def update(self, tokens: list[int]) -> "RunningDigest":
        self._hash.update(array("q", tokens).tobytes())
        return self

    def hexdigest(self) -> str:
        return self._hash.hexdigest()  # the hash goes on: later updates extend it


def tokens_digest(fingerprint: str, tokens: list[int]) -> str:
    """What a state has read: the model and the exact tokens (a stored state is used only for it)."""
    return RunningDigest(fingerprint).update(tokens).hexdigest()


def redact_url(url: str) -> str:
    """A database URL without its password (for messages and logs)."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL at all: say nothing of it
        return "(the database URL)"


metadata = sa.MetaData()
meta_table = sa.Table("rwkv_meta", metadata, sa.Column("name", sa.String(64), primary_key=True),
                      sa.Column("value", sa.Text, nullable=False))
visitors_table = sa.Table("rwkv_visitors", metadata, sa.Column("id", sa.String(64), primary_key=True),
                          sa.Column("created", sa.Float, nullable=False), sa.Column("seen", sa.Float, nullable=False))
documents_table = sa.Table(
    "rwkv_documents", metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("visitor", sa.String(64), nullable=False, index=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("title", sa.Text, nullable=False),
    sa.Column("fingerprint", sa.String(128), nullable=False),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("updated", sa.Float, nullable=False),
    sa.Column("body", sa.Text, nullable=False))
states_table = sa.Table(
    "rwkv_states", metadata,
    sa.Column("document", sa.String(32), primary_key=True),
    sa.Column("slot", sa.String(64), primary_key=True),
    sa.Column("visitor", sa.String(64), nullable=False, index=True),
    sa.Column("digest", sa.String(64), nullable=False),
    sa.Column("fingerprint", sa.String(128), nullable=False),
    sa.Column("nbytes", sa.BigInteger, nullable=False),
    sa.Column("used", sa.Float, nullable=False, index=True),
    sa.Column("data", sa.LargeBinary, nullable=False))

# The statements of every save, built once (constructing a statement costs more Python than
# SQLite takes to run it; the writer thread shares the interpreter with the model's thread).
_b = sa.bindparam
UPDATE_DOCUMENT = documents_table.update().where(
    documents_table.c.id == _b("b_id"), documents_table.c.visitor == _b("b_visitor")).values(
    title=_b("b_title"), fingerprint=_b("b_fingerprint"), updated=_b("b_updated"), body=_b("b_body"))
DOCUMENT_EXISTS = sa.select(documents_table.c.id).where(documents_table.c.id == _b("b_id"))
INSERT_DOCUMENT = documents_table.insert().values(
    id=_b("b_id"), visitor=_b("b_visitor"), kind=_b("b_kind"), title=_b("b_title"), fingerprint=_b("b_fingerprint"),
    created=_b("b_created"), updated=_b("b_updated"), body=_b("b_body"))
UPDATE_SEEN = visitors_table.update().where(visitors_table.c.id == _b("b_id")).values(seen=_b("b_seen"))
SLOTS_OF_DOCUMENT = sa.select(states_table.c.slot, states_table.c.digest).where(
    states_table.c.document == _b("b_document"), states_table.c.visitor == _b("b_visitor"))
DELETE_SLOT = states_table.delete().where(
    states_table.c.document == _b("b_document"), states_table.c.visitor == _b("b_visitor"),
    states_table.c.slot == _b("b_slot"))
INSERT_STATE = states_table.insert().values(
    document=_b("b_document"), slot=_b("b_slot"), visitor=_b("b_visitor"), digest=_b("b_digest"),
    fingerprint=_b("b_fingerprint"), nbytes=_b("b_nbytes"), used=_b("b_used"), data=_b("b_data"))
COUNT_DOCUMENTS = sa.select(sa.func.count()).select_from(documents_table).where(
    documents_table.c.visitor == _b("b_visitor"), documents_table.c.kind == _b("b_kind"))
STATE_BYTES = sa.select(sa.func.coalesce(sa.func.sum(states_table.c.nbytes), 0))

# schema version -> the statements that bring a store of the version before it up to it
MIGRATIONS: dict[int, Callable[[sa.Connection], None]] = {}


@dataclass
class Document:
    """One conversation, post or notebook: its text as a JSON body, and the states to keep.

    `slots` names every state the document wants kept (slot -> digest of what it read); `states`
    holds the ones in memory now (slot -> (State, logits)): a slot missing from `states` keeps its
    stored copy (the server's memory budget may have dropped it from memory only)."""

    kind: str
    body: dict
    title: str = ""
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    fingerprint: str = ""
    slots: dict[str, str] = field(default_factory=dict)
    states: dict[str, tuple[State, torch.Tensor | None]] = field(default_factory=dict)
    updated: float = 0.0


@dataclass(frozen=True)
class DocumentInfo:
    id: str
    kind: str
    title: str
    fingerprint: str
    updated: float


class SessionStore:
    """The database behind every visitor's documents (see the module's docstring)."""

    def __init__(self, url: str, disk_budget_bytes: int = DEFAULT_DISK_BUDGET,
                 retention_days: float = DEFAULT_RETENTION_DAYS, location: str = ""):
        self.url_shown = location or redact_url(url)
        self.disk_budget_bytes = int(disk_budget_bytes)
        self.retention_s = float(retention_days) * 86400
        self.sqlite = url.startswith("sqlite")
        try:
            kwargs = {"connect_args": {"timeout": 30, "check_same_thread": False}} if self.sqlite else {
                "pool_pre_ping": True}
            self.db = sa.create_engine(url, **kwargs)
            if self.sqlite:
                sa.event.listen(self.db, "connect", _sqlite_pragmas)
            self._prepare()
        except StoreError:
            raise
        except ImportError as exc:  # the database's driver (PostgreSQL: psycopg) is not installed
            raise StoreError(f"The session store {self.url_shown} needs the {exc.name or 'database'} package "
                             "(PostgreSQL: pip install 'psycopg[binary]').") from None
        except sa.exc.SQLAlchemyError as exc:
            raise StoreError(f"The session store {self.url_shown} cannot be opened: "
                             f"{str(exc.orig if getattr(exc, 'orig', None) else exc).splitlines()[0]}") from None
        self.dropped_states = 0  # states dropped to keep the disk budget (tests, the log)
        self._state_total: int | None = None  # the writer's running estimate of the states' bytes
        self._writes_since_sum = BUDGET_RESUM  # sum the table at the first state write
        self._writes: queue.Queue = queue.Queue()
        self._writer = threading.Thread(target=self._write_loop, name="rwkv-store-writer", daemon=True)
        self._writer.start()
        self._closed = False

    @classmethod
    def open(cls, where: str | os.PathLike | None = None, **options) -> "SessionStore":
        """A folder (SQLite file `sessions.db` inside, made if missing) or a database URL."""
        where = str(where) if where is not None else str(default_data_dir())
        if "://" in where:
            if where.startswith("postgresql://"):  # the maintained driver, psycopg 3
                where = "postgresql+psycopg://" + where[len("postgresql://"):]
            return cls(where, **options)
        folder = Path(where).expanduser()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"The data folder {folder} cannot be made ({exc.strerror}).") from None
        path = folder / "sessions.db"
        return cls(f"sqlite:///{path}", location=str(path), **options)

    # ---- schema ------------------------------------------------------------------------------
    def _prepare(self) -> None:
        with self.db.begin() as conn:
            tables = set(sa.inspect(conn).get_table_names())
            if "rwkv_meta" not in tables:  # a new store (another application's tables are left alone)
                metadata.create_all(conn)
                conn.execute(meta_table.insert(), [{"name": "schema_version", "value": str(SCHEMA_VERSION)},
                                                   {"name": "browser_secret", "value": secrets.token_urlsafe(32)}])
                return
            version = conn.execute(sa.select(meta_table.c.value).where(meta_table.c.name == "schema_version")).scalar()
            try:
                version = int(version)
            except (TypeError, ValueError):
                raise StoreError(f"The session store {self.url_shown} is not an RWKV Playground store "
                                 "(it has no schema version); start with another --data-dir.") from None
            if version > SCHEMA_VERSION:
                raise StoreError(f"The session store {self.url_shown} was written by a newer RWKV Playground "
                                 f"(schema {version}; this version reads up to {SCHEMA_VERSION}): upgrade the app, "
                                 "or start with another --data-dir. Nothing in it was changed.")
            for step in range(version + 1, SCHEMA_VERSION + 1):
                MIGRATIONS[step](conn)
                conn.execute(meta_table.update().where(meta_table.c.name == "schema_version").values(value=str(step)))

    def schema_version(self) -> int:
        with self.db.connect() as conn:
            return int(conn.execute(sa.select(meta_table.c.value).where(meta_table.c.name == "schema_version")).scalar())

    def browser_secret(self) -> str:
        """The secret Gradio encrypts the visitor's key with in the browser: kept in the store, so
        a restart (or another process on the same database) reads the same browsers' keys."""
        with self.db.connect() as conn:
            return conn.execute(sa.select(meta_table.c.value).where(meta_table.c.name == "browser_secret")).scalar()

    # ---- visitors ----------------------------------------------------------------------------
    def visitor(self, key: str | None, create: bool = True) -> "Visitor":
        """The visitor a key names. A malformed key raises StoreError; with create=False an
        unknown one does too (a key the server never minted, or one whose data expired)."""
        if not isinstance(key, str) or not KEY_PATTERN.fullmatch(key):
            raise StoreError("That visitor key is not one this server makes.")
        vid = key_id(key)
        now = time.time()
        with self.db.begin() as conn:
            found = conn.execute(sa.select(visitors_table.c.id).where(visitors_table.c.id == vid)).first()
            if found is None:
                if not create:
                    raise StoreError("No data is stored for that visitor key.")
                conn.execute(visitors_table.insert().values(id=vid, created=now, seen=now))
            else:
                conn.execute(visitors_table.update().where(visitors_table.c.id == vid).values(seen=now))
        return Visitor(self, vid)

    def new_visitor(self) -> tuple[str, "Visitor"]:
        key = new_key()
        return key, self.visitor(key)

    # ---- writes (one writer thread) ------------------------------------------------------------
    def submit(self, write: Callable[[sa.Connection], None]) -> None:
        if self._closed:
            raise StoreError("The session store is closed.")
        self._writes.put(write)

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until every write submitted so far is committed."""
        done = threading.Event()
        self._writes.put(done)
        done.wait(timeout)

    def _write_loop(self) -> None:
        last_expiry = 0.0
        while True:
            if time.monotonic() - last_expiry >= EXPIRY_INTERVAL_S:  # retention, from this thread
                last_expiry = time.monotonic()
                try:
                    gone = self.expire()
                    if gone:
                        log.info("Deleted the saved work of %d visitors idle past the retention period", gone)
                except Exception:  # noqa: BLE001
                    log.exception("The retention sweep failed")
            try:
                write = self._writes.get(timeout=EXPIRY_INTERVAL_S)
            except queue.Empty:
                continue
            if write is None:
                return
            if isinstance(write, threading.Event):
                write.set()
                continue
            try:
                with self.db.begin() as conn:
                    write(conn)
            except Exception:  # noqa: BLE001 - one failed write must not stop the others
                log.exception("A session store write failed (%s)", self.url_shown)

    def close(self) -> None:
        if not self._closed:
            self.flush()
            self._closed = True
            self._writes.put(None)
            self._writer.join(timeout=10)
            self.db.dispose()

    # ---- upkeep --------------------------------------------------------------------------------
    def state_bytes(self) -> int:
        with self.db.connect() as conn:
            return int(conn.execute(STATE_BYTES).scalar())

    def _enforce_budget(self, conn: sa.Connection, added: int = 0) -> None:
        """Drop the least recently used states until they fit the disk budget. The total is kept
        as a running estimate, summed again from the table every BUDGET_RESUM writes (other
        processes on the same database write too) and whenever the estimate passes the budget."""
        self._writes_since_sum += 1
        self._state_total = (self._state_total or 0) + added
        if self._writes_since_sum < BUDGET_RESUM and self._state_total <= self.disk_budget_bytes:
            return
        self._writes_since_sum = 0
        total = self._state_total = int(conn.execute(STATE_BYTES).scalar())
        if total <= self.disk_budget_bytes:
            return
        rows = conn.execute(sa.select(states_table.c.document, states_table.c.slot, states_table.c.nbytes)
                            .order_by(states_table.c.used)).all()
        for document, slot, nbytes in rows:
            if total <= self.disk_budget_bytes:
                break
            conn.execute(states_table.delete().where(states_table.c.document == document,
                                                     states_table.c.slot == slot))
            total -= nbytes
            self.dropped_states += 1
        self._state_total = total

    def expire(self, now: float | None = None) -> int:
        """Delete the visitors idle past the retention period, with everything of theirs."""
        cutoff = (now or time.time()) - self.retention_s
        with self.db.begin() as conn:
            gone = [r[0] for r in conn.execute(sa.select(visitors_table.c.id).where(visitors_table.c.seen < cutoff))]
            for vid in gone:
                _delete_visitor(conn, vid)
        return len(gone)

    def counts(self) -> dict:
        with self.db.connect() as conn:
            return {name: int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar())
                    for name, table in (("visitors", visitors_table), ("documents", documents_table),
                                        ("states", states_table))}


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")  # WAL: a crash loses no committed transaction
    cursor.close()


def _delete_visitor(conn: sa.Connection, vid: str) -> None:
    conn.execute(states_table.delete().where(states_table.c.visitor == vid))
    conn.execute(documents_table.delete().where(documents_table.c.visitor == vid))
    conn.execute(visitors_table.delete().where(visitors_table.c.id == vid))


def state_blob(state: State, logits: torch.Tensor | None) -> bytes:
    return state.to_bytes({"logits": logits} if logits is not None else None)


def len_of(write: tuple) -> int:
    """The bytes a queued state write will add (the blob's size, before it is made)."""
    _, _, state, logits = write
    return state.nbytes() + (logits.numel() * 4 if logits is not None else 0)


class Visitor:
    """One visitor's documents. Every query is filtered by the visitor's id."""

    def __init__(self, store: SessionStore, vid: str):
        self.store, self.id = store, vid
        # (doc, slot) -> digest of the state written (same digest: same model, same tokens, same state)
        self._written: dict[tuple[str, str], str] = {}
        self._refused = ""  # a save the writer refused, for the visitor
        self._lock = threading.Lock()
        # doc id -> the newest save of it handed to the writer: an older text-only checkpoint still
        # queued behind it is skipped (a loaded writer must not fall seconds behind a stream)
        self._newest_save: dict[str, int] = {}
        self._saves = itertools.count(1)

    def documents(self, kind: str) -> list[DocumentInfo]:
        t = documents_table
        with self.store.db.connect() as conn:
            rows = conn.execute(sa.select(t.c.id, t.c.kind, t.c.title, t.c.fingerprint, t.c.updated)
                                .where(t.c.visitor == self.id, t.c.kind == kind).order_by(t.c.updated.desc())).all()
        return [DocumentInfo(*row) for row in rows]

    def load(self, doc_id: str) -> Document | None:
        """A document of this visitor (None if there is none with that id for them)."""
        t = documents_table
        with self.store.db.connect() as conn:
            row = conn.execute(sa.select(t.c.kind, t.c.title, t.c.fingerprint, t.c.updated, t.c.body)
                               .where(t.c.visitor == self.id, t.c.id == str(doc_id))).first()
            if row is None:
                return None
            slots = dict(conn.execute(sa.select(states_table.c.slot, states_table.c.digest)
                                      .where(states_table.c.visitor == self.id,
                                             states_table.c.document == str(doc_id))).all())
        kind, title, fingerprint, updated, body = row
        try:
            body = json.loads(body)
        except ValueError:
            body = {}
        return Document(kind, body, title, str(doc_id), fingerprint, slots=slots, updated=updated)

    def state(self, doc_id: str, slot: str, digest: str) -> tuple[State, torch.Tensor | None] | None:
        """A stored state of this visitor's document, if it read exactly what `digest` says."""
        self.store.flush()
        t = states_table
        with self.store.db.begin() as conn:
            row = conn.execute(sa.select(t.c.digest, t.c.data).where(t.c.visitor == self.id, t.c.document == doc_id,
                                                                     t.c.slot == slot)).first()
            if row is None or row[0] != digest:
                return None
            conn.execute(t.update().where(t.c.document == doc_id, t.c.slot == slot).values(used=time.time()))
        try:
            state, extra = State.from_bytes(bytes(row[1]), name="a stored state")
        except PlaygroundError:
            log.warning("A stored state could not be read back; it is rebuilt from the text instead")
            return None
        with self._lock:
            self._written[(doc_id, slot)] = digest
        return state, extra.get("logits")

    def save(self, doc: Document, with_states: bool = True) -> None:
        """Queue the document's text (and, with_states, its new states) for the writer thread."""
        if doc.kind not in KINDS:
            raise StoreError(f"Unknown document kind {doc.kind!r}.")
        body = json.dumps(doc.body, ensure_ascii=False)
        if len(body) > MAX_BODY_BYTES:
            raise StoreError("This document is too long to keep (over 16 MB of text).")
        vid, now, title = self.id, time.time(), (doc.title or "Untitled")[:200]
        refused = self.take_refusal()
        if refused:
            raise StoreError(refused)
        writes: list[tuple[str, str, State, torch.Tensor | None]] = []
        deletes: list[str] = []
        if with_states:
            with self._lock:
                for slot, digest in doc.slots.items():
                    held = doc.states.get(slot)
                    if held is not None and self._written.get((doc.id, slot)) != digest:
                        writes.append((slot, digest, held[0], held[1]))
                        self._written[(doc.id, slot)] = digest
                for (d, slot) in list(self._written):
                    if d == doc.id and slot not in doc.slots:
                        deletes.append(slot)
                        del self._written[(d, slot)]
            slots = dict(doc.slots)
        with self._lock:
            number = self._newest_save[doc.id] = next(self._saves)

        def write(conn: sa.Connection) -> None:
            if not with_states and self._newest_save.get(doc.id) != number:
                return  # a newer save of this document is queued: this checkpoint's text is older
            values = dict(b_id=doc.id, b_visitor=vid, b_title=title, b_fingerprint=doc.fingerprint, b_updated=now,
                          b_body=body)
            if conn.execute(UPDATE_DOCUMENT, values).rowcount == 0:
                if conn.execute(DOCUMENT_EXISTS, {"b_id": doc.id}).first() is not None:
                    return  # another visitor's id: never written over
                # a visitor's list stays a list: past the limit a new document is refused (the
                # visitor is told at their next save), never an old one dropped
                count = conn.execute(COUNT_DOCUMENTS, {"b_visitor": vid, "b_kind": doc.kind}).scalar()
                if count >= MAX_DOCUMENTS_PER_KIND:
                    with self._lock:
                        self._refused = f"You have {count} saved {doc.kind}s: delete some to keep new ones."
                    return
                conn.execute(INSERT_DOCUMENT, {**values, "b_kind": doc.kind, "b_created": now})
            if not with_states:  # a checkpoint while streaming: the text only
                return
            conn.execute(UPDATE_SEEN, {"b_id": vid, "b_seen": now})
            key = {"b_document": doc.id, "b_visitor": vid}
            stale = [slot for slot, digest in conn.execute(SLOTS_OF_DOCUMENT, key) if slots.get(slot) != digest]
            for slot in set(stale) | set(deletes) | {w[0] for w in writes}:
                conn.execute(DELETE_SLOT, {**key, "b_slot": slot})
            for slot, digest, state, logits in writes:
                data = state_blob(state, logits)
                conn.execute(INSERT_STATE, {**key, "b_slot": slot, "b_digest": digest, "b_fingerprint": state.fingerprint,
                                            "b_nbytes": len(data), "b_used": now, "b_data": data})
            if writes:
                self.store._enforce_budget(conn, sum(len_of(w) for w in writes))

        self.store.submit(write)

    def take_refusal(self) -> str:
        """The sentence of a save the writer refused (a list past MAX_DOCUMENTS_PER_KIND), once."""
        with self._lock:
            refused, self._refused = self._refused, ""
        return refused

    def touch(self, doc_id: str) -> None:
        """The document was opened: it becomes the visitor's most recent of its kind (listed first,
        and what their next visit opens)."""
        vid, now = self.id, time.time()

        def write(conn):
            t = documents_table
            conn.execute(t.update().where(t.c.id == doc_id, t.c.visitor == vid).values(updated=now))
        self.store.submit(write)

    def rename(self, doc_id: str, title: str) -> None:
        title = " ".join(str(title).split())[:200] or "Untitled"
        vid, now = self.id, time.time()

        def write(conn):
            t = documents_table
            conn.execute(t.update().where(t.c.id == doc_id, t.c.visitor == vid).values(title=title, updated=now))
            body = conn.execute(sa.select(t.c.body).where(t.c.id == doc_id, t.c.visitor == vid)).scalar()
            if body is not None:  # the body carries the title too (exports)
                data = json.loads(body)
                data["title"] = title
                conn.execute(t.update().where(t.c.id == doc_id, t.c.visitor == vid)
                             .values(body=json.dumps(data, ensure_ascii=False)))
        self.store.submit(write)

    def delete(self, doc_id: str) -> None:
        vid = self.id
        with self._lock:
            for key in [k for k in self._written if k[0] == doc_id]:
                del self._written[key]

        def write(conn):
            conn.execute(states_table.delete().where(states_table.c.document == doc_id,
                                                     states_table.c.visitor == vid))
            conn.execute(documents_table.delete().where(documents_table.c.id == doc_id,
                                                        documents_table.c.visitor == vid))
        self.store.submit(write)

    def delete_all(self) -> None:
        """Everything of this visitor, gone from the store (the key stays usable, empty)."""
        vid, now = self.id, time.time()
        with self._lock:
            self._written.clear()

        def write(conn):
            _delete_visitor(conn, vid)
            conn.execute(visitors_table.insert().values(id=vid, created=now, seen=now))
        self.store.submit(write)
        self.store.flush()
