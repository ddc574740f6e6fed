"""Blog post / long-form tab: the seed's use case, thousands of tokens at constant memory."""

from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path

import gradio as gr

from ..blog import DEFAULT_TEMPLATE, OUTLINE_TEMPLATE, BlogSession, build_prompt
from ..engine import Engine
from .common import friendly_error, sampling_controls, settings_from, stats_line


def _new_session() -> BlogSession:
    # a factory, not the class: gr.State would treat a dataclass class as a value
    return BlogSession()


def _free(session: BlogSession) -> None:
    session.state = session.logits = session.last = None


def build(engine: Engine):
    session = gr.State(_new_session, time_to_live=6 * 3600, delete_callback=_free)
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
            output = gr.Markdown("", elem_id="blog-output", height=560)

    def markdown_file(text: str, topic_text: str) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", (topic_text or "post").lower()).strip("-")[:40] or "post"
        folder = Path(tempfile.mkdtemp(prefix="rwkv-blog-"))
        path = folder / f"{slug}.md"
        path.write_text(text, encoding="utf-8")
        return str(path)

    def stream(sess: BlogSession, make_stream, topic_text):
        last = 0.0
        try:
            loaded = engine.require()
            for text in make_stream(loaded):
                now = time.perf_counter()
                if now - last < 0.1:
                    continue
                last = now
                live = sess.last.stats if sess.last else None
                n = live.generated_tokens if live else 0
                speed = live.tokens_per_second if live else 0.0
                yield sess.text, f"Writing… {n} tokens · {speed:.1f} tok/s", sess, gr.DownloadButton()
            yield sess.text, "Done. " + stats_line(sess.stats), sess, markdown_file(sess.text, topic_text)
        except Exception as exc:
            yield sess.text, friendly_error(exc), sess, gr.DownloadButton()

    def on_write(sess, topic_text, aud, ton, points, outline, tmpl, *sampling_values):
        try:
            settings, max_tokens = settings_from(*sampling_values)
            prompt = build_prompt(OUTLINE_TEMPLATE if outline else tmpl, topic_text, aud, ton, points)
        except Exception as exc:
            yield sess.text, friendly_error(exc), sess, gr.DownloadButton()
            return
        if outline:
            per_section = max(50, max_tokens // 6)
            make = lambda loaded: sess.write_with_outline(loaded, prompt, settings, per_section)  # noqa: E731
        else:
            make = lambda loaded: sess.write(loaded, prompt, settings, max_tokens)  # noqa: E731
        yield from stream(sess, make, topic_text)

    def on_continue(sess, topic_text, *sampling_values):
        try:
            settings, max_tokens = settings_from(*sampling_values)
        except Exception as exc:
            yield sess.text, friendly_error(exc), sess, gr.DownloadButton()
            return
        yield from stream(sess, lambda loaded: sess.continue_(loaded, settings, max_tokens), topic_text)

    def on_stop(sess, topic_text):
        return sess.text, "Stopped. " + stats_line(sess.stats), sess, (markdown_file(sess.text, topic_text)
                                                                      if sess.text else gr.DownloadButton())

    outputs = [output, status, session, download]
    write_ev = write.click(on_write, [session, topic, audience, tone, key_points, outline_first, template, *sampling],
                          outputs, concurrency_id="model", api_name="blog")
    cont_ev = cont.click(on_continue, [session, topic, *sampling], outputs, concurrency_id="model",
                         api_name="blog_continue")
    stop.click(None, None, None, cancels=[write_ev, cont_ev]).then(on_stop, [session, topic], outputs,
                                                                  api_visibility="private")
    return session
