"""The Gradio app. Everything that imports gradio lives in this package; the engine never does.

    demo = create_app(engine)   # builds the UI, launches nothing (tests use this)
"""

from __future__ import annotations

from functools import partial

import gradio as gr

from ..blog import BlogSession
from ..chat import ChatSession
from ..inspection import InspectorSession
from . import blog_tab, chat_tab, inspector_tab, model_panel
from .common import ensure_session

CSS = """
#chat-status, #blog-status { min-height: 1.5em; font-size: 0.9em; opacity: 0.85; }
"""


def create_app(engine) -> gr.Blocks:
    with gr.Blocks(title="RWKV Playground", analytics_enabled=False) as demo:
        gr.Markdown("## RWKV Playground — chat, long-form writing and a look inside the recurrent state")
        info = model_panel.build(engine)
        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                chat_state = chat_tab.build(engine)
            with gr.Tab("Blog post", id="blog"):
                blog_state = blog_tab.build(engine)
            with gr.Tab("State inspector", id="inspector"):
                inspector_state, model_figures, figure_outputs = inspector_tab.build(engine, chat_state, blog_state)
        demo.load(model_figures, None, figure_outputs, api_visibility="private")
        # the panel's description is the server's current one (the model may have been switched)
        demo.load(partial(model_panel.model_markdown, engine), None, [info], api_visibility="private")

        def on_visit(request: gr.Request):
            """A page opened: this visitor's sessions, known by the page's session id."""
            return tuple(ensure_session(engine, None, factory, request)
                         for factory in (ChatSession, BlogSession, InspectorSession))

        def on_leave(request: gr.Request):
            """The tab was closed: stop what runs for this visitor and free what they kept."""
            if request:
                engine.close_visit(request.session_hash)

        demo.load(on_visit, None, [chat_state, blog_state, inspector_state], api_visibility="private")
        demo.unload(on_leave)
    return demo


def launch_options(host: str, port: int, share: bool, engine=None) -> dict:
    threads = 40 if engine is None else max(40, engine.event_concurrency() + 8)
    return {"server_name": host, "server_port": port, "share": share, "css": CSS, "max_threads": threads,
            "footer_links": ["api", "gradio"], "show_error": False}
