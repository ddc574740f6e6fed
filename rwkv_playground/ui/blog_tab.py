"""Blog post / long-form tab: the seed's use case, thousands of tokens at constant memory.

Handlers are module-level functions of the engine and the inputs; `build` lays out and wires.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import gradio as gr

from ..blog import DEFAULT_TEMPLATE, OUTLINE_TEMPLATE, BlogSession, build_prompt
from .common import (ensure_session, friendly_error, sampling_controls, session_state, settings_from, stats_line,
                     stream, with_notices)


def markdown_file(text: str, topic: str) -> str:
    """The post as a .md file to download (a fresh temporary folder per file)."""
    slug = re.sub(r"[^a-z0-9]+", "-", (topic or "post").lower()).strip("-")[:40] or "post"
    path = Path(tempfile.mkdtemp(prefix="rwkv-blog-")) / f"{slug}.md"
    path.write_text(text, encoding="utf-8")
    return str(path)


def view(session: BlogSession, status: str, topic: str, final: bool = False):
    """The tab's outputs: the post, the status line, the session, the download (when finished)."""
    download = markdown_file(session.text, topic) if final and session.text else gr.DownloadButton()
    return session.text, status, session, download


def _run(session: BlogSession, make_stream, topic: str):
    yield from stream(session, make_stream, lambda status, final: view(session, status, topic, final),
                      lambda: "Done. " + stats_line(session.stats))


class BlogTab:
    """The Blog tab's event handlers: one method per event, each callable on its own (tests do)."""

    def __init__(self, engine):
        self.engine = engine

    def on_write(self, session, topic, audience, tone, key_points, outline_first, template, temperature, top_p,
                 top_k, presence_penalty, count_penalty, penalty_decay, max_tokens, seed, request: gr.Request = None):
        """Write a new post (or an outline, then each section from a fork of its state)."""
        session = ensure_session(self.engine, session, BlogSession, request)
        try:
            settings, max_tokens = settings_from(temperature, top_p, top_k, presence_penalty, count_penalty,
                                                 penalty_decay, max_tokens, seed)
            prompt = build_prompt(OUTLINE_TEMPLATE if outline_first else template, topic, audience, tone, key_points)
        except Exception as exc:
            yield view(session, friendly_error(exc), topic)
            return
        if outline_first:
            per_section = max(50, max_tokens // 6)
            make = lambda: session.write_with_outline(self.engine, prompt, settings, per_section)  # noqa: E731
        else:
            make = lambda: session.write(self.engine, prompt, settings, max_tokens)  # noqa: E731
        yield from _run(session, make, topic)

    def on_continue(self, session, topic, temperature, top_p, top_k, presence_penalty, count_penalty, penalty_decay,
                    max_tokens, seed, request: gr.Request = None):
        """Keep writing from the saved state."""
        session = ensure_session(self.engine, session, BlogSession, request)
        try:
            settings, max_tokens = settings_from(temperature, top_p, top_k, presence_penalty, count_penalty,
                                                 penalty_decay, max_tokens, seed)
        except Exception as exc:
            yield view(session, friendly_error(exc), topic)
            return
        yield from _run(session, lambda: session.continue_(self.engine, settings, max_tokens), topic)

    def on_stop(self, session, topic, request: gr.Request = None):
        session = ensure_session(self.engine, session, BlogSession, request)
        return view(session, with_notices(session, "Stopped. " + stats_line(session.stats)), topic, final=True)


def build(engine) -> gr.State:
    tab = BlogTab(engine)
    session = session_state(engine)
    with gr.Row():
        with gr.Column(scale=1):
            topic = gr.Textbox(label="Topic", placeholder="e.g. why recurrent networks are back",
                               elem_id="blog-topic")
            audience = gr.Textbox(label="Audience (optional)", elem_id="blog-audience")
            tone = gr.Textbox(label="Tone (optional)", placeholder="e.g. friendly, technical", elem_id="blog-tone")
            key_points = gr.Textbox(label="Key points (optional, one per line)", lines=3, elem_id="blog-points")
            outline_first = gr.Checkbox(False, label="Outline first, then each section from a fork of its state",
                                        elem_id="blog-outline")
            with gr.Accordion("Prompt template", open=False):
                template = gr.Textbox(DEFAULT_TEMPLATE, lines=4, label="Template ({topic}, {details})",
                                      elem_id="blog-template")
            sampling = sampling_controls("blog", temperature=1.0, top_p=0.7, presence=0.4, count=0.4,
                                         decay=0.996, max_tokens=1500)
        with gr.Column(scale=2):
            with gr.Row():
                write = gr.Button("Write", variant="primary", elem_id="blog-write")
                stop = gr.Button("Stop", variant="stop", elem_id="blog-stop")
                cont = gr.Button("Continue", elem_id="blog-continue")
                download = gr.DownloadButton("Download .md", elem_id="blog-download")
            status = gr.Markdown("", elem_id="blog-status")
            # line_breaks: the model's single newlines ("Title: ...\nIntroduction: ...") stay lines
            output = gr.Markdown("", elem_id="blog-output", height=560, line_breaks=True)

    model_events = dict(concurrency_id="model", concurrency_limit=engine.event_concurrency())
    outputs = [output, status, session, download]
    write_ev = write.click(tab.on_write,
                           [session, topic, audience, tone, key_points, outline_first, template, *sampling],
                           outputs, api_name="blog", **model_events)
    cont_ev = cont.click(tab.on_continue, [session, topic, *sampling], outputs, api_name="blog_continue",
                         **model_events)
    stop.click(None, None, None, cancels=[write_ev, cont_ev]).then(tab.on_stop, [session, topic], outputs,
                                                                  api_visibility="private")
    return session
