"""Blog post / long-form tab: the seed's use case, thousands of tokens at constant memory.

The handlers are methods of `BlogTab` (one per event, each callable on its own: the tests call
them); the form above Write comes as one `Brief`, the sampling controls as one `Sampling`; `build`
lays out and wires.
"""

from __future__ import annotations

import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from types import SimpleNamespace

import gradio as gr

from ..blog import DEFAULT_TEMPLATE, OUTLINE_TEMPLATE, BlogSession, build_prompt
from . import documents
from .common import (ControlGroup, Sampling, SamplingControls, ensure_session, friendly_error, session_state,
                     stats_line, stream, wire, with_notices)


STOP_SETTLE_S = 3.0
FORM = ("audience", "tone", "key_points", "outline_first", "template")  # kept with a post, besides its topic


@dataclass(frozen=True)
class Brief:
    """What the post is to be: the form above the Write button (handed to on_write as one object)."""
    audience: str = ""
    tone: str = ""
    key_points: str = ""
    outline_first: bool = False
    template: str = DEFAULT_TEMPLATE

    def prompt(self, topic: str) -> str:
        return build_prompt(OUTLINE_TEMPLATE if self.outline_first else self.template, topic, self.audience,
                            self.tone, self.key_points)

    def values(self) -> dict:
        return {"audience": self.audience, "tone": self.tone, "key_points": self.key_points,
                "outline_first": bool(self.outline_first), "template": self.template}


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

    def on_write(self, session, topic, brief: Brief, sampling: Sampling, key=None, request: gr.Request = None):
        """Write a new post (or an outline, then each section from a fork of its state)."""
        session = ensure_session(self.engine, session, BlogSession, request, key)
        try:
            settings, max_tokens = sampling.settings()
            prompt = brief.prompt(topic)
        except Exception as exc:
            yield view(session, friendly_error(exc), topic)
            return
        session.controls = {**brief.values(), **sampling.values()}
        if brief.outline_first:
            per_section = max(50, max_tokens // 6)
            make = lambda: session.write_with_outline(self.engine, prompt, settings, per_section,  # noqa: E731
                                                      title=topic)
        else:
            make = lambda: session.write(self.engine, prompt, settings, max_tokens, title=topic)  # noqa: E731
        yield from _run(session, make, topic)

    def on_continue(self, session, topic, sampling: Sampling, key=None, request: gr.Request = None):
        """Keep writing from the saved state."""
        session = ensure_session(self.engine, session, BlogSession, request, key)
        try:
            settings, max_tokens = sampling.settings()
        except Exception as exc:
            yield view(session, friendly_error(exc), topic)
            return
        yield from _run(session, lambda: session.continue_(self.engine, settings, max_tokens), topic)

    def on_stop(self, session, topic, request: gr.Request = None):
        """After Stop (the run's event is cancelled first): the statistics of the run it stopped,
        once that run has ended, or a sentence saying nothing was being written."""
        session = ensure_session(self.engine, session, BlogSession, request)
        deadline = time.monotonic() + STOP_SETTLE_S
        while session.busy and time.monotonic() < deadline:  # the cancelled stream ends at its next step
            time.sleep(0.02)
        if session.busy:
            status = "Stopping… the model ends this run at its next step."
        elif session.stats.get("stop_reason") in ("cancelled", "closed"):
            status = "Stopped. " + stats_line(session.stats)
        else:
            status = "Nothing was being written."
        return view(session, with_notices(session, status), topic, final=True)

    # ---- the visitor's posts (the session store) -------------------------------------------------
    def posts(self, session):
        return documents.listing(session, "post", "New post")

    def opened(self, session: BlogSession, status: str):
        """Outputs after another post is held: the post, status, session, download, list, topic."""
        if session.interrupted and not status:
            status = ("The server stopped while this post was being written: it is as shown then; Continue "
                      "reads it once and goes on.")
        form = [session.controls.get(name, gr.skip()) for name in FORM]
        return (*view(session, with_notices(session, status), session.title, final=True), self.posts(session),
                session.title, *form, *SamplingControls.update(session.controls))

    def visit(self, session: BlogSession, notice: str = ""):
        if session.visitor is not None and not session.text:
            session.open_newest(self.engine.current)
        return self.opened(session, "")

    def on_open(self, doc_id, session, request: gr.Request = None):
        session = ensure_session(self.engine, session, BlogSession, request)
        if not doc_id or doc_id in (documents.NEW, session.doc_id):
            return self.opened(session, "")
        try:
            if not session.open_stored(doc_id, self.engine.current):
                return self.opened(session, "That post is not in your saved work.")
        except Exception as exc:
            return self.opened(session, friendly_error(exc))
        return self.opened(session, f"Opened “{session.title}”: Continue goes on from its state.")

    def on_new(self, session, request: gr.Request = None):
        session = ensure_session(self.engine, session, BlogSession, request)
        try:
            session.new_document()
        except Exception as exc:
            return self.opened(session, friendly_error(exc))
        return self.opened(session, "A new post: type a topic and press Write (your other posts are in the list).")

    def on_delete(self, session, request: gr.Request = None):
        session = ensure_session(self.engine, session, BlogSession, request)
        if session.busy:
            return self.opened(session, "A post is being written: wait for it, or press Stop first.")
        session.delete_stored()
        session.new_document()
        session.open_newest(self.engine.current)
        return self.opened(session, "Post deleted.")


def build(engine, visitor_key=None) -> SimpleNamespace:
    """Returns the tab's session state, and what a page visit fills in (visit, visit_outputs)."""
    tab = BlogTab(engine)
    key_input = [visitor_key] if visitor_key is not None else []
    session = session_state(engine)
    with gr.Row(visible=engine.store is not None, elem_id="blog-documents"):
        posts = gr.Dropdown([], allow_custom_value=True, label="Post", elem_id="blog-posts", scale=4,
                            info="Your posts, kept across reloads and restarts")
        new = gr.Button("+ New post", size="sm", elem_id="blog-new", scale=1)
        delete = gr.Button("Delete", size="sm", variant="stop", elem_id="blog-delete", scale=1)
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
            sampling = SamplingControls("blog", temperature=1.0, top_p=0.7, presence=0.4, count=0.4,
                                        decay=0.996, max_tokens=1500)
            brief = ControlGroup([audience, tone, key_points, outline_first, template], Brief)
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
    write_ev = write.click(*wire(tab.on_write, session, topic, brief, sampling, *key_input), outputs, api_name="blog",
                           **model_events)
    cont_ev = cont.click(*wire(tab.on_continue, session, topic, sampling, *key_input), outputs,
                         api_name="blog_continue", **model_events)
    stop_ev = stop.click(None, None, None, cancels=[write_ev, cont_ev]).then(tab.on_stop, [session, topic], outputs,
                                                                            api_visibility="private")
    for event in (write_ev, cont_ev, stop_ev):
        event.then(tab.posts, [session], [posts], queue=False, api_visibility="private")
    opened = [*outputs, posts, topic, audience, tone, key_points, outline_first, template, *sampling]
    posts.input(tab.on_open, [posts, session], opened, api_name="blog_open", queue=False)
    new.click(tab.on_new, [session], opened, api_name="blog_new", queue=False)
    delete.click(tab.on_delete, [session], opened, api_name="blog_delete", queue=False)
    return SimpleNamespace(session=session, visit=tab.visit, visit_outputs=opened)
