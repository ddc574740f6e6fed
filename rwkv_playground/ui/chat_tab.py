"""Chat tab: streaming replies on a per-visitor recurrent state.

Each handler is a module-level function of the engine and the inputs (readable, callable from a
test); `build` only lays out the components and wires them. The chat's messages carry the replies
alone; each turn's statistics are shown beside them (the status line and the per-turn table) and
returned by the API as separate outputs.
"""

from __future__ import annotations


import gradio as gr

from ..chat import PRESETS, ChatFormat, ChatSession, default_preset
from .common import (ensure_session, friendly_error, sampling_controls, session_state, settings_from, stats_line,
                     stream, with_notices)

def messages_of(session: ChatSession) -> list[dict]:
    messages = []
    for turn in session.turns:
        messages.append({"role": "user", "content": turn.user})
        messages.append({"role": "assistant", "content": turn.reply or ("…" if not turn.complete else "(no reply)")})
    return messages


def stats_table(session: ChatSession) -> list[dict]:
    """Each finished turn's statistics (shown in the UI, and returned by the API on their own)."""
    return [{"turn": number, **turn.stats} for number, turn in enumerate(session.turns, 1) if turn.complete]


def last_stats(session: ChatSession) -> str:
    return stats_line(session.turns[-1].stats) if session.turns else ""


def view(session: ChatSession, status: str):
    """The tab's outputs for a session: messages, status line, per-turn statistics, session."""
    return messages_of(session), status, stats_table(session), session


def choose_preset(name):
    if name in PRESETS:
        return PRESETS[name].user, PRESETS[name].bot, PRESETS[name].reply_start
    return gr.Textbox(), gr.Textbox(), gr.Textbox()


class ChatTab:
    """The Chat tab's event handlers: one method per event, each callable on its own (tests do)."""

    def __init__(self, engine):
        self.engine = engine

    def on_send(self, message, session, user_name, bot_name, scenario, temperature, top_p, top_k,
                presence_penalty, count_penalty, penalty_decay, max_tokens, seed, reply_start="",
                request: gr.Request = None):
        """Send a message and stream the reply; the message box is emptied once it is taken."""
        session = ensure_session(self.engine, session, ChatSession, request)
        if not message or not message.strip():
            yield *view(session, "Type a message first, then press Enter or Send."), message
            return
        try:
            settings, max_tokens = settings_from(temperature, top_p, top_k, presence_penalty, count_penalty,
                                                 penalty_decay, max_tokens, seed)
        except Exception as exc:
            yield *view(session, friendly_error(exc)), message
            return
        session.fmt = ChatFormat(user_name.strip() or "User", bot_name.strip() or "Assistant", scenario or "",
                                 reply_start=reply_start or "")
        for outputs in stream(session, lambda: session.send(self.engine, message, settings, max_tokens),
                              lambda status, final: view(session, status), lambda: last_stats(session)):
            yield *outputs, ""

    def on_regenerate(self, session, temperature, top_p, top_k, presence_penalty, count_penalty, penalty_decay,
                      max_tokens, seed, request: gr.Request = None):
        """A new reply to the last message, from the state kept after reading it."""
        session = ensure_session(self.engine, session, ChatSession, request)
        try:
            settings, max_tokens = settings_from(temperature, top_p, top_k, presence_penalty, count_penalty,
                                                 penalty_decay, max_tokens, seed)
        except Exception as exc:
            yield view(session, friendly_error(exc))
            return
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
        """After Stop: the partial reply stays, and the state matches it."""
        session = ensure_session(self.engine, session, ChatSession, request)
        line = last_stats(session)
        return view(session, with_notices(session, "Stopped. " + line if line else "Stopped."))


def build(engine) -> gr.State:
    tab = ChatTab(engine)
    session = session_state(engine)
    loaded = engine.current
    first = (default_preset(loaded.runtime.architecture, loaded.runtime.config.vocab_size)
             if loaded is not None else list(PRESETS)[0])
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
        table = gr.JSON([], elem_id="chat-stats")
    sampling = sampling_controls("chat", temperature=1.0, top_p=0.5, presence=0.4, count=0.4, decay=0.996,
                                 max_tokens=200)

    model_events = dict(concurrency_id="model", concurrency_limit=engine.event_concurrency())
    shown = [chatbot, status, table, session]
    inputs = [message, session, user_name, bot_name, scenario, *sampling, reply_start]
    preset.change(choose_preset, [preset], [user_name, bot_name, reply_start], queue=False,
                  api_visibility="private")
    send_ev = send.click(tab.on_send, inputs, [*shown, message], api_name="chat", **model_events)
    submit_ev = message.submit(tab.on_send, inputs, [*shown, message], api_visibility="private",
                               **model_events)
    regen_ev = regenerate.click(tab.on_regenerate, [session, *sampling], shown, api_name="regenerate",
                                **model_events)
    stop.click(None, None, None, cancels=[send_ev, submit_ev, regen_ev]).then(
        tab.on_stop, [session], shown, api_visibility="private")
    undo.click(tab.on_undo, [session], shown, api_name="undo", queue=False)
    edit.click(tab.on_edit, [session], [*shown, message], api_visibility="private", queue=False)
    clear.click(tab.on_clear, [session], shown, api_name="clear", queue=False)
    return session
