"""Chat tab: streaming replies on a per-session recurrent state."""

from __future__ import annotations

import time

import gradio as gr

from ..chat import PRESETS, ChatFormat, ChatSession
from ..engine import Engine
from .common import friendly_error, sampling_controls, settings_from, stats_line

SESSION_TTL_S = 6 * 3600  # idle sessions (and their states) are freed after this


def to_messages(session: ChatSession) -> list[dict]:
    messages = []
    for turn in session.turns:
        messages.append({"role": "user", "content": turn.user})
        content = turn.reply or ("…" if not turn.complete else "(no reply)")
        line = stats_line(turn.stats) if turn.complete else ""
        messages.append({"role": "assistant", "content": content + (f"\n\n<sub>{line}</sub>" if line else "")})
    return messages


def _new_session() -> ChatSession:
    # a factory, not the class: gr.State would treat a dataclass class as a value
    return ChatSession()


def _free(session: ChatSession) -> None:
    session.clear()


def build(engine: Engine):
    session = gr.State(_new_session, time_to_live=SESSION_TTL_S, delete_callback=_free)
    with gr.Row():
        preset = gr.Dropdown(list(PRESETS) + ["Custom"], value=list(PRESETS)[0], label="Format",
                             elem_id="chat-format", scale=2)
        user_name = gr.Textbox("Bob", label="Your name", elem_id="chat-user", scale=1)
        bot_name = gr.Textbox("Alice", label="Model's name", elem_id="chat-bot", scale=1)
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
    sampling = sampling_controls("chat", temperature=1.0, top_p=0.5, presence=0.4, count=0.4, decay=0.996,
                                 max_tokens=200)

    def choose_preset(name):
        if name in PRESETS:
            return PRESETS[name].user, PRESETS[name].bot
        return gr.Textbox(), gr.Textbox()

    def stream(sess: ChatSession, make_stream):
        """Drive a session stream and render it; errors become a status line, never a traceback."""
        last = 0.0
        try:
            loaded = engine.require()
            for text in make_stream(loaded):
                now = time.perf_counter()
                if now - last < 0.05 and text:  # the browser needs no more than ~20 updates a second
                    continue
                last = now
                live = sess.live.stats if sess.live else None
                n = live.generated_tokens if live else 0
                speed = live.tokens_per_second if live else 0.0
                yield to_messages(sess), f"Generating… {n} tokens, {speed:.1f} tok/s", sess
            turn = sess.turns[-1] if sess.turns else None
            yield to_messages(sess), stats_line(turn.stats) if turn else "", sess
        except Exception as exc:
            yield to_messages(sess), friendly_error(exc), sess

    def on_send(text, sess, user, bot, scen, *sampling_values):
        if not text or not text.strip():
            yield to_messages(sess), "Type a message first, then press Enter or Send.", sess, text
            return
        try:
            settings, max_tokens = settings_from(*sampling_values)
        except Exception as exc:
            yield to_messages(sess), friendly_error(exc), sess, text
            return
        sess.fmt = ChatFormat(user.strip() or "User", bot.strip() or "Assistant", scen or "")
        for messages, stat, s in stream(sess, lambda loaded: sess.send(loaded, text, settings, max_tokens)):
            yield messages, stat, s, ""

    def on_regenerate(sess, *sampling_values):
        try:
            settings, max_tokens = settings_from(*sampling_values)
        except Exception as exc:
            yield to_messages(sess), friendly_error(exc), sess
            return
        yield from stream(sess, lambda loaded: sess.regenerate(loaded, settings, max_tokens))

    def on_undo(sess):
        sess.undo()
        return to_messages(sess), "Last turn removed; the state is back to before it.", sess

    def on_edit(sess):
        last = sess.undo()
        if last is None:
            return to_messages(sess), "Nothing to edit yet.", sess, gr.Textbox()
        return to_messages(sess), "Edit your last message and send it again.", sess, last

    def on_clear(sess):
        sess.clear()
        return [], "Conversation cleared.", sess

    def on_stop(sess):
        turn = sess.turns[-1] if sess.turns else None
        return to_messages(sess), ("Stopped. " + stats_line(turn.stats)) if turn else "Stopped.", sess

    preset.change(choose_preset, [preset], [user_name, bot_name], queue=False, api_visibility="private")
    inputs = [message, session, user_name, bot_name, scenario, *sampling]
    outputs = [chatbot, status, session, message]
    send_ev = send.click(on_send, inputs, outputs, concurrency_id="model", api_name="chat")
    submit_ev = message.submit(on_send, inputs, outputs, concurrency_id="model", api_visibility="private")
    regen_ev = regenerate.click(on_regenerate, [session, *sampling], [chatbot, status, session],
                                concurrency_id="model", api_name="regenerate")
    stop.click(None, None, None, cancels=[send_ev, submit_ev, regen_ev]).then(
        on_stop, [session], [chatbot, status, session], api_visibility="private")
    undo.click(on_undo, [session], [chatbot, status, session], concurrency_id="model", api_name="undo")
    edit.click(on_edit, [session], [chatbot, status, session, message], concurrency_id="model",
               api_visibility="private")
    clear.click(on_clear, [session], [chatbot, status, session], concurrency_id="model", api_name="clear")
    return session
