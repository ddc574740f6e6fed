"""Chat tab: streaming replies on a per-visitor recurrent state.

The handlers are methods of `ChatTab` (one per event, each callable on its own: the tests call
them); the format controls come as one `ChatFormat`, the sampling controls as one `Sampling`;
`build` only lays out the components and wires them. The chat's messages carry the replies
alone; each turn's statistics are shown beside them (the status line and the per-turn table) and
returned by the API as separate outputs.
"""

from __future__ import annotations


import time

import gradio as gr

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

from ..chat import PRESETS, ChatFormat, ChatSession, QueuedMessage, default_preset, model_chat_format
from . import documents
from .common import (ControlGroup, Sampling, SamplingControls, ensure_session, friendly_error, session_state,
                     stats_line, stats_notes, stream, wire, with_notices)

INTERRUPTED = "\n\n*(interrupted: the server stopped while writing this reply)*"
QUEUED = "\n\n*(queued: sent when the reply above is written; Stop hands it back)*"
QUEUE_POLL_S = 0.2


def messages_of(session: ChatSession) -> list[dict]:
    messages = []
    for turn in session.turns:
        messages.append({"role": "user", "content": turn.user})
        reply = turn.reply or ("…" if not turn.complete else "(no reply)")
        messages.append({"role": "assistant", "content": reply + (INTERRUPTED if turn.interrupted else "")})
    for queued in session.queued_messages:
        if not queued.sending:
            messages.append({"role": "user", "content": queued.text + QUEUED})
    return messages


def stats_table(session: ChatSession) -> list[dict]:
    """Each finished turn's statistics (shown in the UI, and returned by the API on their own)."""
    return [{"turn": number, **turn.stats} for number, turn in enumerate(session.turns, 1) if turn.complete]


STATS_COLUMNS = ["Turn", "Prompt tokens", "Prompt tok/s", "Generated", "tok/s", "Reused from the state",
                 "Stopped by", "Notes"]
STOP_REASONS = {"max_tokens": "max tokens", "stop_string": "a stop string", "end_of_text": "end of text",
                "stop_token": "a stop token", "cancelled": "Stop", "closed": "page closed"}


def stats_frame(table: list[dict] | None) -> dict:
    """The per-turn statistics (the JSON the API returns) as a table a person reads."""
    rows = []
    for stats in table or []:
        rows.append([stats.get("turn", ""), stats.get("prompt_tokens", 0),
                     round(stats.get("prompt_tokens_per_second") or 0.0), stats.get("generated_tokens", 0),
                     round(stats.get("tokens_per_second") or 0.0, 1), stats.get("tokens_saved", 0),
                     STOP_REASONS.get(stats.get("stop_reason", ""), stats.get("stop_reason", "")),
                     "; ".join(stats_notes(stats))])
    return {"headers": STATS_COLUMNS, "data": rows}


def last_stats(session: ChatSession) -> str:
    return stats_line(session.turns[-1].stats) if session.turns else ""


def view(session: ChatSession, status: str):
    """The tab's outputs for a session: messages, status line, per-turn statistics, session."""
    waiting = sum(1 for queued in session.queued_messages if not queued.sending)
    if waiting and not status.startswith("Queued"):  # the running reply's updates say it too
        status += f" · {waiting} message{'s' if waiting > 1 else ''} queued: sent when this reply ends"
    return messages_of(session), status, stats_table(session), session


def format_from(user_name: str, bot_name: str, scenario: str) -> ChatFormat:
    """The chat format the format controls describe (empty names: User / Assistant)."""
    return ChatFormat((user_name or "").strip() or "User", (bot_name or "").strip() or "Assistant", scenario or "")


def choose_preset(name):
    if name in PRESETS:
        return PRESETS[name].user, PRESETS[name].bot, PRESETS[name].reply_start
    return gr.Textbox(), gr.Textbox(), gr.Textbox()


class ChatTab:
    """The Chat tab's event handlers: one method per event, each callable on its own (tests do)."""

    def __init__(self, engine):
        self.engine = engine

    def on_send(self, message, session, fmt: ChatFormat, sampling: Sampling, reply_start: str = "", key=None,
                request: gr.Request = None):
        """Send a message and stream the reply; the message box is emptied once it is taken.
        `fmt`: the format controls' chat format (format_from), whose reply starts with
        `reply_start` (its own input: API clients send it after the sampling values); `key`: the
        visitor's (the browser's storage), for a process that never saw their page."""
        session = ensure_session(self.engine, session, ChatSession, request, key)
        if not message or not message.strip():
            yield *view(session, "Type a message first, then press Enter or Send."), message
            return
        try:
            settings, max_tokens = sampling.settings()
        except Exception as exc:
            yield *view(session, friendly_error(exc)), message
            return
        # Every message goes through the session's queue, so a message typed while a reply is
        # written waits for it (shown as queued) instead of being lost, and two never start at once.
        entry = QueuedMessage(message)
        session.queued_messages.append(entry)

        def waiting() -> bool:  # still queued (not handed back by Stop) behind a reply or a message
            return entry in session.queued_messages and (session.busy or session.queued_messages[0] is not entry)

        box = ""  # the box is emptied once, when the message is taken: later updates leave what
        try:      # the visitor types meanwhile alone
            if waiting():
                yield *view(session, "Queued: your message is sent when the reply being written ends "
                                     "(Stop hands it back)."), box
                box = gr.skip()
                while waiting():
                    time.sleep(QUEUE_POLL_S)
                    yield (gr.skip(),) * 5  # nothing changes; a pause where Stop can cancel this event
                if entry not in session.queued_messages:  # Stop handed it back
                    return
            entry.sending = True
            session.fmt = replace(fmt, reply_start=reply_start or "")
            session.controls = sampling.values()
            for outputs in stream(session, lambda: session.send(self.engine, message, settings, max_tokens),
                                  lambda status, final: view(session, status), lambda: last_stats(session)):
                yield *outputs, box
                box = gr.skip()
        finally:
            if entry in session.queued_messages:
                session.queued_messages.remove(entry)

    def on_regenerate(self, session, sampling: Sampling, key=None, request: gr.Request = None):
        """A new reply to the last message, from the state kept after reading it."""
        session = ensure_session(self.engine, session, ChatSession, request, key)
        try:
            settings, max_tokens = sampling.settings()
        except Exception as exc:
            yield view(session, friendly_error(exc))
            return
        session.controls = sampling.values()
        yield from stream(session, lambda: session.regenerate(self.engine, settings, max_tokens),
                          lambda status, final: view(session, status), lambda: last_stats(session))

    def on_undo(self, session, request: gr.Request = None):
        session = ensure_session(self.engine, session, ChatSession, request)
        try:
            session.undo()
        except Exception as exc:
            return view(session, friendly_error(exc))
        return view(session, with_notices(session, "Last turn removed; the state is back to before it."))

    def on_edit(self, session, request: gr.Request = None):
        session = ensure_session(self.engine, session, ChatSession, request)
        try:
            last = session.undo()
        except Exception as exc:
            return *view(session, friendly_error(exc)), gr.Textbox()
        if last is None:
            return *view(session, "Nothing to edit yet."), gr.Textbox()
        return *view(session, "Edit your last message and send it again."), last

    def on_clear(self, session, request: gr.Request = None):
        session = ensure_session(self.engine, session, ChatSession, request)
        try:
            session.clear()
        except Exception as exc:
            return view(session, friendly_error(exc))
        return view(session, "Conversation cleared.")

    def on_stop(self, session, request: gr.Request = None):
        """After Stop: the partial reply stays, and the state matches it; messages still queued
        behind it come back to the message box."""
        session = ensure_session(self.engine, session, ChatSession, request)
        unsent = [q.text for q in session.queued_messages if not q.sending]
        session.queued_messages.clear()
        line = last_stats(session)
        status = "Stopped. " + line if line else "Stopped."
        if unsent:
            status += " Your queued message is back in the box." if len(unsent) == 1 else \
                f" Your {len(unsent)} queued messages are back in the box."
        return *view(session, with_notices(session, status)), "\n\n".join(unsent) if unsent else gr.skip()

    # ---- the visitor's conversations (the session store) ---------------------------------------
    def conversations(self, session):
        return documents.listing(session, "chat", "New conversation")

    def listed(self, session):
        """After an event: the list (a new name, a new date) and the Name box (a first message
        names the conversation)."""
        return self.conversations(session), session.title if session is not None else ""

    def opened(self, session: ChatSession, status: str):
        """Outputs after another conversation is held: the view, its format, the list, its name."""
        fmt = session.fmt
        return (*view(session, with_notices(session, status)), fmt.user, fmt.bot, fmt.scenario, fmt.reply_start,
                self.conversations(session), session.title, *SamplingControls.update(session.controls))

    def visit(self, session: ChatSession, notice: str = ""):
        """A page opened: hold the visitor's newest conversation (the outputs of `opened`)."""
        if session.visitor is not None and not session.turns:
            session.open_newest(self.engine.current)
        if not session.turns:
            self._model_format(session)
        if notice:
            session.notices.append(notice)
        if session.turns and session.turns[-1].interrupted:
            status = ("The server stopped while writing the last reply: it is kept as far as it was saved (marked "
                      "interrupted), and your next message reads it again.")
        else:
            status = "Welcome back: your conversation is as you left it." if session.turns else ""
        return self.opened(session, status)

    def on_open(self, doc_id, session, request: gr.Request = None):
        session = ensure_session(self.engine, session, ChatSession, request)
        if not doc_id or doc_id in (documents.NEW, session.doc_id):
            return self.opened(session, "")
        try:
            if not session.open_stored(doc_id, self.engine.current):
                return self.opened(session, "That conversation is not in your saved work.")
        except Exception as exc:
            return self.opened(session, friendly_error(exc))
        return self.opened(session, f"Opened “{session.title}”.")

    def on_new(self, session, request: gr.Request = None):
        session = ensure_session(self.engine, session, ChatSession, request)
        try:
            session.new_document()
        except Exception as exc:
            return self.opened(session, friendly_error(exc))
        self._model_format(session)
        return self.opened(session, "A new conversation: the others are in the list.")

    def _model_format(self, session: ChatSession) -> None:
        """An empty conversation takes the loaded model's own chat format (World / G1: User /
        Assistant; Raven and the demo model: Bob / Alice), whatever model the page started with."""
        loaded = self.engine.current
        if loaded is not None:
            session.fmt = model_chat_format(loaded)

    def on_rename(self, title, session, request: gr.Request = None):
        session = ensure_session(self.engine, session, ChatSession, request)
        title = " ".join((title or "").split())[:60]
        if not title:
            return self.opened(session, "Type a name first.")
        session.title = title
        if session.visitor is not None and session.stored:
            session.visitor.rename(session.doc_id, title)
            session.visitor.store.flush()
        return self.opened(session, f"Renamed to “{title}”.")

    def on_delete(self, session, request: gr.Request = None):
        """Delete the conversation held now; the newest other one (or a new one) is held next."""
        session = ensure_session(self.engine, session, ChatSession, request)
        if session.busy:
            return self.opened(session, "A reply is being written: wait for it, or press Stop first.")
        session.delete_stored()
        session.new_document()
        session.open_newest(self.engine.current)
        return self.opened(session, "Conversation deleted.")

    def on_export(self, session, request: gr.Request = None):
        """The conversation as Markdown and JSON files."""
        session = ensure_session(self.engine, session, ChatSession, request)
        if not session.turns:
            return gr.File(value=None, visible=False), "Nothing to export yet."
        files = documents.export_files(session.title or "conversation", session.export_markdown(),
                                       session.export_json())
        state, turn = session.latest_state()
        if state is None:
            return gr.File(value=files, visible=True), "Exported as Markdown and JSON."
        path = Path(files[0]).with_suffix(f".state-after-turn-{turn + 1}.safetensors")
        state.save(path, extra_metadata={"conversation": session.title, "turns": turn + 1})
        return (gr.File(value=[*files, str(path)], visible=True),
                f"Exported as Markdown and JSON, with the state after turn {turn + 1} (open it in the State inspector).")


def build(engine, visitor_key=None) -> SimpleNamespace:
    """Returns the tab's session state, and what a page visit fills in (visit, visit_outputs).
    `visitor_key`: the page's BrowserState holding the visitor's key (with a store)."""
    tab = ChatTab(engine)
    key_input = [visitor_key] if visitor_key is not None else []
    session = session_state(engine)
    loaded = engine.current
    first = (default_preset(loaded.runtime.architecture, loaded.runtime.config.vocab_size)
             if loaded is not None else list(PRESETS)[0])
    with gr.Row(visible=engine.store is not None, elem_id="chat-documents"):
        conversations = gr.Dropdown([], allow_custom_value=True, label="Conversation", elem_id="chat-conversations", scale=3,
                                    info="Your conversations, kept across reloads and restarts")
        title = gr.Textbox(label="Name", elem_id="chat-title", scale=2)
        with gr.Column(scale=1, min_width=120):
            new = gr.Button("+ New", size="sm", elem_id="chat-new")
            rename = gr.Button("Rename", size="sm", elem_id="chat-rename")
        with gr.Column(scale=1, min_width=120):
            export = gr.Button("Export", size="sm", elem_id="chat-export")
            delete = gr.Button("Delete", size="sm", variant="stop", elem_id="chat-delete")
    exported = gr.File(label="Exported conversation", file_count="multiple", visible=False, elem_id="chat-exported")
    with gr.Row():
        preset = gr.Dropdown(list(PRESETS) + ["Custom"], value=first, label="Format",
                             elem_id="chat-format", scale=2)
        user_name = gr.Textbox(PRESETS[first].user, label="Your name", elem_id="chat-user", scale=1)
        bot_name = gr.Textbox(PRESETS[first].bot, label="Model's name", elem_id="chat-bot", scale=1)
        reply_start = gr.Textbox(PRESETS[first].reply_start, label="Reply starts with (G1 thinking: <think)",
                                 elem_id="chat-reply-start", scale=1)
    scenario = gr.Textbox("", label="Scenario (read once, before the first message)", lines=2,
                          elem_id="chat-scenario", placeholder="e.g. The following is a conversation between ...")
    chatbot = gr.Chatbot(elem_id="chatbot", height=420, label="Chat")
    with gr.Row():
        message = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, lines=1,
                             elem_id="chat-input", scale=6)
        send = gr.Button("Send", variant="primary", elem_id="chat-send", scale=1)
        stop = gr.Button("Stop", variant="stop", elem_id="chat-stop", scale=1)
    with gr.Row():
        regenerate = gr.Button("↻ Regenerate", elem_id="chat-regenerate")
        undo = gr.Button("↶ Undo last turn", elem_id="chat-undo")
        edit = gr.Button("✎ Edit last message", elem_id="chat-edit")
        clear = gr.Button("✕ Clear", elem_id="chat-clear")
    status = gr.Markdown("", elem_id="chat-status")
    with gr.Accordion("Statistics per turn", open=False):
        # the API returns each turn's statistics as JSON (this hidden output); people read the table
        table = gr.JSON([], elem_id="chat-stats", visible=False)
        table_view = gr.Dataframe(stats_frame([]), interactive=False, elem_id="chat-stats-table", wrap=True)
    sampling = SamplingControls("chat", temperature=1.0, top_p=0.5, presence=0.4, count=0.4, decay=0.996,
                                max_tokens=200)
    chat_format = ControlGroup([user_name, bot_name, scenario], format_from)

    model_events = dict(concurrency_id="model", concurrency_limit=engine.event_concurrency())
    shown = [chatbot, status, table, session]
    send_fn = wire(tab.on_send, message, session, chat_format, sampling, reply_start, *key_input)
    preset.change(choose_preset, [preset], [user_name, bot_name, reply_start], queue=False,
                  api_visibility="private")
    send_ev = send.click(*send_fn, [*shown, message], api_name="chat", **model_events)
    submit_ev = message.submit(*send_fn, [*shown, message], api_visibility="private", **model_events)
    regen_ev = regenerate.click(*wire(tab.on_regenerate, session, sampling, *key_input), shown,
                                api_name="regenerate", **model_events)
    stop_ev = stop.click(None, None, None, cancels=[send_ev, submit_ev, regen_ev]).then(
        tab.on_stop, [session], [*shown, message], api_visibility="private")
    undo_ev = undo.click(tab.on_undo, [session], shown, api_name="undo", queue=False)
    edit_ev = edit.click(tab.on_edit, [session], [*shown, message], api_visibility="private", queue=False)
    clear_ev = clear.click(tab.on_clear, [session], shown, api_name="clear", queue=False)
    for event in (send_ev, submit_ev, regen_ev, stop_ev, undo_ev, edit_ev, clear_ev):  # a new name, a new date
        event.then(tab.listed, [session], [conversations, title], queue=False, api_visibility="private")
    table.change(stats_frame, [table], [table_view], queue=False, api_visibility="private")

    opened = [*shown, user_name, bot_name, scenario, reply_start, conversations, title, *sampling]
    conversations.input(tab.on_open, [conversations, session], opened, api_name="chat_open", queue=False)
    new.click(tab.on_new, [session], opened, api_name="chat_new", queue=False)
    rename.click(tab.on_rename, [title, session], opened, api_name="chat_rename", queue=False)
    delete.click(tab.on_delete, [session], opened, api_name="chat_delete", queue=False)
    export.click(tab.on_export, [session], [exported, status], api_name="chat_export", queue=False)
    return SimpleNamespace(session=session, visit=tab.visit, visit_outputs=opened)
