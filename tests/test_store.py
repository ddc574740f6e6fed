"""The session store (store.py) and the sessions' documents: what a visitor wrote comes back from
the database with its states bit for bit; a restore reads only new tokens; a crash keeps the text
shown; the disk budget drops states, never text; retention; privacy between visitors and keys; a
store of a newer schema or not ours is refused with one sentence and left untouched."""

import hashlib
import os
import sqlite3
import time

import pytest
import torch

from rwkv_playground.blog import BlogSession
from rwkv_playground.chat import ChatSession
from rwkv_playground.notebook import EngineDriver, NotebookSession
from rwkv_playground.serving.store import SCHEMA_VERSION, SessionStore, StoreError, new_key

from test_chat_blog_sessions import run, settings


@pytest.fixture
def store(tmp_path):
    s = SessionStore.open(tmp_path / "data")
    yield s
    s.close()


def chat_with(engine, visitor, messages, seed=1, max_tokens=12):
    chat = engine.add_session(ChatSession())
    chat.visitor = visitor
    for i, message in enumerate(messages):
        run(chat.send(engine, message, settings(seed + i), max_tokens))
    return chat


def equal_states(a, b):
    return a.tensors().keys() == b.tensors().keys() and all(
        torch.equal(a.tensors()[k], b.tensors()[k]) for k in a.tensors())


def reopen(store, key, doc_id):
    visitor = store.visitor(key, create=False)
    return visitor, visitor.load(doc_id)


def test_a_chat_comes_back_with_its_states_and_reads_only_new_tokens(engine, loaded, store):
    key, visitor = store.new_visitor()
    chat = chat_with(engine, visitor, ["Good morrow, lady.", "What news?"])
    store.flush()
    visitor2, doc = reopen(store, key, chat.doc_id)
    assert doc.kind == "chat" and doc.title == "Good morrow, lady."
    back = engine.add_session(ChatSession())
    back.visitor = visitor2
    back.open_document(doc, loaded.tokenizer)
    assert [(t.user, t.reply, t.tokens()) for t in back.turns] == [(t.user, t.reply, t.tokens()) for t in chat.turns]
    assert all(t.state_after is None for t in back.turns)  # read back only when needed
    held = back.stored_state("1.after", back._digest(2))
    assert held is not None and equal_states(held[0], chat.turns[1].state_after)
    assert held[1] is None  # no logits kept: the next turn reads its message first
    # the next message reads only its own tokens, from the stored state, and writes what the
    # never-restarted session writes
    back.turns[1].drop_states()
    expected = run(chat.send(engine, "Farewell.", settings(7), 12))
    got = run(back.send(engine, "Farewell.", settings(7), 12))
    assert got == expected
    stats = back.turns[-1].stats
    assert stats["state_from_store"] and stats["tokens_saved"] == len(chat.history_tokens(2))
    assert "history_reread" not in stats and stats["prompt_tokens"] == len(back.turns[-1].prompt_tokens)
    assert equal_states(back.turns[-1].state_after, chat.turns[-1].state_after)


def test_states_dropped_from_memory_are_read_back_from_the_store(engine, loaded, store):
    _, visitor = store.new_visitor()
    chat = chat_with(engine, visitor, ["To be, or not to be?"])
    reference = chat.turns[0].state_after.clone()
    store.flush()
    chat.drop("turn 0")  # the memory budget's call
    assert chat.turns[0].state_after is None
    run(chat.send(engine, "Speak again.", settings(3), 8))
    assert chat.turns[1].stats.get("state_from_store") and "history_reread" not in chat.turns[1].stats
    assert equal_states(chat.turns[0].state_after, reference)
    # regenerate: from the stored state of the turn before, reading the message again
    store.flush()
    expected = chat.turns[1].reply
    for turn in chat.turns:
        turn.drop_states()
    run(chat.regenerate(engine, settings(3), 8))
    stats = chat.turns[1].stats
    assert stats["state_from_store"] and stats["tokens_saved"] == len(chat.history_tokens(1))
    assert stats["prompt_tokens"] == len(chat.turns[1].prompt_tokens) and chat.turns[1].reply == expected


def snapshot(store, tmp_path):
    """The database as a crash would leave it now (SQLite's backup: one consistent copy)."""
    store.flush()
    target = tmp_path / "crash" / "sessions.db"
    target.parent.mkdir(exist_ok=True)
    src, dst = sqlite3.connect(store.url_shown), sqlite3.connect(target)
    src.backup(dst)
    src.close(), dst.close()
    return SessionStore.open(target.parent)


def test_a_reply_cut_by_a_crash_comes_back_as_shown_and_interrupted(engine, loaded, store, tmp_path, monkeypatch):
    monkeypatch.setattr("rwkv_playground.serving.sessions.CHECKPOINT_INTERVAL_S", 0.0)
    key, visitor = store.new_visitor()
    chat = chat_with(engine, visitor, ["Hark, who goes there?"])
    stream = chat.send(engine, "Tell me a long tale.", settings(5), 60)
    shown = [next(stream) for _ in range(8)]
    crashed = snapshot(store, tmp_path)  # the server dies here
    stream.close()
    try:
        visitor2, doc = reopen(crashed, key, chat.doc_id)
        back = engine.add_session(ChatSession())
        back.visitor = visitor2
        back.open_document(doc, loaded.tokenizer)
        last = back.turns[-1]
        assert last.interrupted and last.complete and last.stats["interrupted"]
        assert last.reply in shown and last.reply  # the text that had been shown (within one save)
        assert [t.reply for t in back.turns[:1]] == [chat.turns[0].reply]
        # the page says what happened (not "as you left it")
        from rwkv_playground.ui.chat_tab import ChatTab

        status = ChatTab(engine).visit(back)[1]
        assert "stopped while writing the last reply" in status and "reads it again" in status
        # its state is rebuilt from that text: the first turn's state comes from the store, then
        # the interrupted turn's tokens are read once
        run(back.send(engine, "Go on.", settings(6), 8))
        stats = back.turns[-1].stats
        assert stats["state_from_store"] and stats["history_reread"] == len(last.tokens())
        fresh = loaded.runtime.forward(back.history_tokens())[1]
        assert torch.allclose(back.turns[-1].state_after.att_x, fresh.att_x, atol=1e-4)
    finally:
        crashed.close()


def test_blog_posts_and_their_state_come_back(engine, loaded, store):
    key, visitor = store.new_visitor()
    blog = engine.add_session(BlogSession())
    blog.visitor = visitor
    run(blog.write(engine, "Bob: Write about the sea.\n\nAlice: Sure, here is a blog post about the sea:\n\nTitle:",
                   settings(2), 20, title="the sea"))
    first = blog.doc_id
    run(blog.write(engine, "Bob: Write about the moon.\n\nAlice: Sure:\n\nTitle:", settings(3), 20, title="the moon"))
    store.flush()
    assert [d.title for d in visitor.documents("post")] == ["the moon", "the sea"]
    v2, doc = reopen(store, key, first)
    back = engine.add_session(BlogSession())
    back.visitor = v2
    back.open_document(doc, loaded.tokenizer)
    assert back.text.startswith("Title:") and back.state is None
    expected_tokens = list(back.tokens)
    run(back.continue_(engine, settings(4), 10))
    assert back.stats["prompt_tokens"] == 0  # nothing re-read: the state came from the store
    assert back.tokens[:len(expected_tokens)] == expected_tokens


def test_notebooks_come_back_with_their_states(engine, loaded, store):
    key, visitor = store.new_visitor()
    nb = engine.add_session(NotebookSession(loaded.runtime.fingerprint))
    nb.visitor = visitor
    nb.notebook.add("text", source="ROMEO: But soft!\n\nJULIET:")
    nb.notebook.add("generate", max_tokens=6)
    for _ in nb.notebook.run(EngineDriver(engine, nb)):
        pass
    nb.persist()
    store.flush()
    v2, doc = reopen(store, key, nb.doc_id)
    back = engine.add_session(NotebookSession(loaded.runtime.fingerprint))
    back.visitor = v2
    back.open_document(doc, loaded.runtime.fingerprint)
    assert [c.output for c in back.notebook.cells] == [c.output for c in nb.notebook.cells]
    assert all(c.fresh for c in back.notebook.cells)
    assert equal_states(back.notebook.cells[1].state, nb.notebook.cells[1].state)
    # a state the memory budget dropped comes back from the store (not recomputed)
    back.drop("cell 2")
    assert back.notebook.cells[1].state is None and back.restore_states() == 1
    assert equal_states(back.notebook.cells[1].state, nb.notebook.cells[1].state)
    # made with another model: opened read-only
    other = engine.add_session(NotebookSession("another-model"))
    other.open_document(doc, "another-model")
    assert other.notebook.read_only


def test_visitors_reach_only_their_own_documents(engine, store):
    key_a, a = store.new_visitor()
    key_b, b = store.new_visitor()
    chat = chat_with(engine, a, ["A secret of mine."], max_tokens=4)
    store.flush()
    assert b.load(chat.doc_id) is None and b.documents("chat") == []
    assert b.state(chat.doc_id, "0.after", "anything") is None
    # B writing under A's document id changes nothing of A's
    intruder = chat_with(engine, b, ["Overwrite it."], max_tokens=4)
    intruder.doc_id = chat.doc_id
    intruder.persist()
    b.delete(chat.doc_id)
    b.rename(chat.doc_id, "mine now")
    store.flush()
    doc = a.load(chat.doc_id)
    assert doc.title == "A secret of mine." and doc.body["turns"][0]["user"] == "A secret of mine."
    for bad in ["", "short", key_a[:-1], key_a + "x", "!" * 43, None, 12345]:
        with pytest.raises(StoreError):
            store.visitor(bad)
    with pytest.raises(StoreError):
        store.visitor(new_key(), create=False)  # well formed, never minted here
    # the database holds no key, only its hash
    raw = b"".join(open(p, "rb").read() for p in (store.url_shown, store.url_shown + "-wal")
                   if os.path.exists(p))
    assert key_a.encode() not in raw and hashlib.sha256(key_a.encode()).hexdigest().encode() in raw


def test_the_engine_gives_a_forged_or_unknown_key_a_new_empty_workspace(engine, store):
    kept, engine.store = engine.store, store
    try:
        key, visitor, notice = engine.open_visitor(None)
        assert len(key) >= 22 and notice == "" and visitor.documents("chat") == []
        same_key, same, _ = engine.open_visitor(key)
        assert same_key == key and same.id == visitor.id
        for forged in [new_key(), "x" * 43, "short", key[:-2]]:
            new, other, notice = engine.open_visitor(forged)
            assert new != forged and other.id != visitor.id and "new, empty workspace" in notice
    finally:
        engine.store = kept


def test_the_disk_budget_drops_states_never_text(engine, loaded, tmp_path):
    store = SessionStore.open(tmp_path / "small", disk_budget_bytes=1)
    try:
        key, visitor = store.new_visitor()
        chats = [chat_with(engine, visitor, [f"Message number {i}."], max_tokens=4) for i in range(3)]
        store.flush()
        assert store.state_bytes() <= 1 and store.dropped_states > 0
        assert len(visitor.documents("chat")) == 3 and store.counts()["documents"] == 3
        back = engine.add_session(ChatSession())
        back.visitor = visitor
        back.open_document(visitor.load(chats[0].doc_id), loaded.tokenizer)
        run(back.send(engine, "Again.", settings(2), 4))
        assert back.turns[-1].stats["history_reread"] == len(chats[0].history_tokens())  # rebuilt from text
    finally:
        store.close()


def test_retention_and_delete_my_data(engine, store):
    key_a, a = store.new_visitor()
    key_b, b = store.new_visitor()
    chat_with(engine, a, ["Keep me."], max_tokens=3)
    chat_with(engine, b, ["Forget me."], max_tokens=3)
    store.flush()
    b.delete_all()
    assert b.documents("chat") == [] and len(a.documents("chat")) == 1
    assert store.expire(time.time() + 10 * 86400) == 0
    assert store.expire(time.time() + 31 * 86400) == 2  # both idle past the 30 days
    assert store.counts() == {"visitors": 0, "documents": 0, "states": 0}


def test_a_newer_schema_or_a_foreign_file_is_refused_and_left_untouched(tmp_path):
    folder = tmp_path / "newer"
    SessionStore.open(folder).close()
    db = folder / "sessions.db"
    con = sqlite3.connect(db)
    con.execute("UPDATE rwkv_meta SET value = ? WHERE name = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    con.commit(), con.close()
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    with pytest.raises(StoreError, match="newer RWKV Playground"):
        SessionStore.open(folder)
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "sessions.db").write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(StoreError, match="cannot be opened"):
        SessionStore.open(junk)
    assert (junk / "sessions.db").read_bytes() == b"this is not a database at all" * 100


def test_a_conversation_of_another_model_keeps_its_text_and_rereads(engine, loaded, store):
    key, visitor = store.new_visitor()
    chat = chat_with(engine, visitor, ["Who made thee?"], max_tokens=4)
    chat.model_fingerprint = "some-other-model"  # as if written with another model
    chat.persist()
    store.flush()
    doc = visitor.load(chat.doc_id)
    back = engine.add_session(ChatSession())
    back.visitor = visitor
    back.open_document(doc, loaded.tokenizer)
    run(back.send(engine, "Again.", settings(2), 4))
    assert "another model" in " ".join(back.notices)
    assert back.turns[0].reply == chat.turns[0].reply and back.turns[-1].stats["history_reread"] > 0
    # the status says why the history was read again: the model, not a dropped state
    from rwkv_playground.ui.common import stats_line

    assert "written with another model" in stats_line(back.turns[-1].stats)
    back.turns[-1].drop_states()
    back.turns[-1].state_after = None
    run(back.send(engine, "Once more.", settings(3), 4))
    line = stats_line(back.turns[-1].stats)
    assert "the saved state had been dropped" in line or "history tokens re-read" not in line


def test_schema_migrations_run_once_in_order(tmp_path, monkeypatch):
    """A store of an older schema is brought up to this one at open, step by step, once."""
    import rwkv_playground.serving.store as store_module

    folder = tmp_path / "old"
    SessionStore.open(folder).close()  # schema 1
    ran = []

    def add_column(conn):
        ran.append(2)
        conn.exec_driver_sql("ALTER TABLE rwkv_documents ADD COLUMN pinned INTEGER DEFAULT 0")

    monkeypatch.setattr(store_module, "SCHEMA_VERSION", 2)
    monkeypatch.setitem(store_module.MIGRATIONS, 2, add_column)
    upgraded = SessionStore.open(folder)
    assert ran == [2] and upgraded.schema_version() == 2
    upgraded.close()
    SessionStore.open(folder).close()
    assert ran == [2]  # not again


def test_no_store_keeps_nothing_beyond_the_tab(engine):
    """--no-store: no store, no key in the browser, no resume endpoint; the page works as before."""
    import app
    from rwkv_playground.serving.engine import Engine
    from rwkv_playground.ui import create_app

    assert app.open_store(app.parse_args(["--no-store"])) is None
    ephemeral = Engine()
    ephemeral.scheduler.loaded = engine.current  # the same model, no store
    try:
        demo = create_app(ephemeral)
        config = demo.get_config_file()
        assert not any(c.get("type") == "browserstate" for c in config["components"])
        resume = next(d for d in config["dependencies"] if d.get("api_name") == "resume")
        assert resume["inputs"] == []  # no key to pass
        assert ephemeral.open_visitor(None) == (None, None, "")
    finally:
        ephemeral.scheduler.loaded = None


def test_a_visitor_past_the_list_limit_is_told_and_loses_nothing(engine, store, monkeypatch):
    monkeypatch.setattr("rwkv_playground.serving.store.MAX_DOCUMENTS_PER_KIND", 2)
    _, visitor = store.new_visitor()
    kept = [chat_with(engine, visitor, [f"Matter {i}."], max_tokens=3) for i in range(2)]
    refused = chat_with(engine, visitor, ["A third matter."], max_tokens=3)
    store.flush()
    assert {d.id for d in visitor.documents("chat")} == {c.doc_id for c in kept}  # the old ones stay
    refused.persist()
    assert any("delete some to keep new ones" in n for n in refused.notices)


def test_the_next_visit_opens_the_document_last_opened_and_alike_titles_are_told_apart(engine, store):
    """Open an older conversation, rename it, reload: the page opens that one (not the one written
    last). Two documents of the same title, written in the same second, are listed apart."""
    from rwkv_playground.ui import documents

    key, visitor = store.new_visitor()
    older = chat_with(engine, visitor, ["A first talk."], max_tokens=4)
    time.sleep(0.01)
    newer = chat_with(engine, visitor, ["A first talk."], max_tokens=4)  # the same title
    store.flush()
    page = engine.add_session(ChatSession())
    page.visitor = visitor
    assert page.open_newest(engine.current) and page.doc_id == newer.doc_id
    labels = [label for label, _ in documents.choices(page, "chat", "New")]
    assert len(labels) == 2 and len(set(labels)) == 2, labels
    assert page.open_stored(older.doc_id, engine.current)
    visitor.rename(older.doc_id, "Renamed")
    store.flush()
    reload = engine.add_session(ChatSession())
    reload.visitor = store.visitor(key, create=False)
    assert reload.open_newest(engine.current) and reload.doc_id == older.doc_id and reload.title == "Renamed"


def test_checkpoints_queued_behind_a_newer_one_are_skipped(engine, store):
    """A stream's text is saved every CHECKPOINT_INTERVAL_S; when the writer falls behind, only the
    newest text of a document is written (the page's text a second before a crash comes back, not
    one queued seconds earlier)."""
    import threading

    import sqlalchemy as sa

    from rwkv_playground.serving.sessions import CHECKPOINT_INTERVAL_S

    assert CHECKPOINT_INTERVAL_S <= 0.5
    key, visitor = store.new_visitor()
    chat = chat_with(engine, visitor, ["Speak."], max_tokens=4)
    store.flush()
    updates = []
    sa.event.listen(store.db, "before_cursor_execute",
                    lambda conn, cursor, statement, *rest: updates.append(statement)
                    if statement.startswith("UPDATE rwkv_documents") else None)
    gate = threading.Event()
    store.submit(lambda conn: gate.wait(10))  # the writer is busy
    for n in range(5):
        chat.turns[0].reply = f"text {n}"
        chat.persist(with_states=False)
    gate.set()
    store.flush()
    assert visitor.load(chat.doc_id).body["turns"][0]["reply"] == "text 4"
    assert len(updates) == 1, updates
