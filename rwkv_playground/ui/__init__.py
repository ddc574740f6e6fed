"""The Gradio app. Everything that imports gradio lives in this package; the engine never does.

    demo = create_app(engine)   # builds the UI, launches nothing (tests use this)

The UI and the OpenAI-compatible API are put together on one port by `rwkv_playground.server`.
"""

from __future__ import annotations

import importlib.util
import sys
from functools import partial

import gradio as gr

from ..blog import BlogSession
from ..chat import ChatSession
from ..inspector.session import InspectorSession
from ..notebook import NotebookSession
from . import blog_tab, chat_tab, inspector_tab, model_panel, notebook_tab
from .common import ensure_session

CSS = """
#chat-status, #blog-status { min-height: 1.5em; font-size: 0.9em; opacity: 0.85; }
"""


def _remember_absent_optional_modules() -> None:
    """Gradio tries `import matplotlib` around every event; when it is not installed, each try
    searches the whole import path again (~1 ms of file lookups, per event, per visitor). Record
    the absence once, as the import system's own negative entry (`sys.modules[name] = None`)."""
    for name in ("matplotlib",):
        if name not in sys.modules and importlib.util.find_spec(name) is None:
            sys.modules[name] = None


def forget_gradio_session(demo: gr.Blocks, session_hash: str) -> None:
    """Drop Gradio's own copy of a closed session's component values. Gradio keeps a closed
    session for an hour in case its tab reopens; each holds the outputs it was last sent (chat
    history, the inspector's figures: a megabyte or more), so a busy demo would keep every
    visitor of the last hour in memory. A visitor who closed the tab starts afresh instead."""
    holder = getattr(demo, "state_holder", None)
    if holder is None or not hasattr(holder, "session_data"):
        return
    with holder.lock:
        holder.session_data.pop(session_hash, None)
        getattr(holder, "time_last_used", {}).pop(session_hash, None)


VISITOR_STORAGE_KEY = "rwkv-playground-visitor"


def create_app(engine) -> gr.Blocks:
    _remember_absent_optional_modules()
    store = engine.store
    with gr.Blocks(title="RWKV Playground", analytics_enabled=False) as demo:
        gr.Markdown("## RWKV Playground — chat, long-form writing and a look inside the recurrent state")
        banner, info, model_choice = model_panel.build(engine)
        # The visitor's key to their saved work: random, made by the server, kept in this browser's
        # storage (encrypted with the store's secret, so a restart reads it back); never in a URL
        visitor_key = (gr.BrowserState(None, storage_key=VISITOR_STORAGE_KEY, secret=store.browser_secret())
                       if store is not None else None)
        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                chat = chat_tab.build(engine, visitor_key)
            with gr.Tab("Blog post", id="blog"):
                blog = blog_tab.build(engine, visitor_key)
            with gr.Tab("State inspector", id="inspector"):
                inspector_state, model_figures, figure_outputs = inspector_tab.build(engine, chat.session, blog.session)
            with gr.Tab("Notebook", id="notebook"):
                notebook = notebook_tab.build(engine, inspector_state)
        if store is not None:
            with gr.Accordion("Your saved work", open=False, elem_id="saved-work"):
                gr.Markdown("Your conversations, posts and notebooks are kept on this server under a random key "
                            "stored in this browser, so a reload, a new tab or a restart brings them back. "
                            f"Work idle for {store.retention_s / 86400:.0f} days is deleted.")
                with gr.Row():
                    confirm = gr.Checkbox(False, label="Yes, delete everything I saved here", elem_id="delete-confirm")
                    delete_all = gr.Button("Delete my data", variant="stop", elem_id="delete-my-data")
                deleted = gr.Markdown("", elem_id="delete-status")
        demo.load(model_figures, None, figure_outputs, api_visibility="private")
        # the panel's description and choice are the server's current ones (the model may have been switched)
        demo.load(partial(model_panel.on_visit, engine), None, [banner, info, model_choice], api_visibility="private")

        def sessions_of(request: gr.Request, visitor):
            """This visitor's sessions, known by the page's session id, bound to their saved work."""
            loaded = engine.current
            fingerprint = loaded.runtime.fingerprint if loaded is not None else ""
            made = [ensure_session(engine, None, factory, request)
                    for factory in (ChatSession, BlogSession, InspectorSession, lambda: NotebookSession(fingerprint))]
            for session in made:
                session.visitor = visitor
            return made

        def visit_outputs(key, made, notice=""):
            chat_s, blog_s, insp_s, nb_s = made
            values = (*chat.visit(chat_s, notice), *blog.visit(blog_s), insp_s, *notebook.visit(nb_s))
            return (key, *values) if store is not None else values

        def on_visit(key=None, request: gr.Request = None):
            """A page opened: this visitor's sessions, holding their newest saved work."""
            key, visitor, notice = engine.open_visitor(key)
            return visit_outputs(key, sessions_of(request, visitor), notice)

        def on_delete_all(confirmed, key, request: gr.Request = None):
            """Everything this visitor saved, removed from the store; the page starts empty."""
            if not confirmed:
                return (gr.skip(),) * len(outputs) + ("Tick the box first: this cannot be undone.",)
            key, visitor, _ = engine.open_visitor(key)
            visitor.delete_all()
            if request is not None:
                engine.close_visit(request.session_hash)
            return (*visit_outputs(key, sessions_of(request, visitor)), "Everything you had saved here is deleted.")

        def on_leave(request: gr.Request):
            """The tab was closed: stop what runs for this visitor and free what they kept."""
            if request:
                engine.close_visit(request.session_hash)
                forget_gradio_session(demo, request.session_hash)

        outputs = [*chat.visit_outputs, *blog.visit_outputs, inspector_state, *notebook.visit_outputs]
        if store is not None:
            outputs = [visitor_key, *outputs]
            # api "resume": a program (gradio_client) passes its key the way the page passes the browser's
            demo.load(on_visit, [visitor_key], outputs, api_name="resume")
            delete_all.click(on_delete_all, [confirm, visitor_key], [*outputs, deleted], api_name="delete_my_data")
        else:  # nothing to resume: the call makes the page's sessions, as its page load does
            demo.load(on_visit, None, outputs, api_name="resume")
        demo.unload(on_leave)
    return demo


def launch_options(host: str, port: int | None, share: bool, engine=None) -> dict:
    threads = 40 if engine is None else max(40, engine.event_concurrency() + 8)
    return {"server_name": host, "server_port": port, "share": share, "css": CSS, "max_threads": threads,
            "footer_links": ["api", "gradio"], "show_error": False}


def launch(demo: gr.Blocks, engine, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
           **options):
    """Queue and serve the app (app.py, the tests, Jupyter: `launch(demo, engine, inline=True,
    prevent_thread_lock=True)`). Model events run one at a time per event listener; the engine's
    scheduler batches the generations behind them. port None: the first free one from 7860."""
    demo.queue(default_concurrency_limit=1)
    return demo.launch(**{**launch_options(host, port, share, engine), **options})
