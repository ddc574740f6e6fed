"""State inspector tab: RWKV-4's decay w, bonus u and WKV accumulators, RWKV-5/6/7's matrix state,
token by token; the Patching and Experiments panels live in their own modules.

Recording happens once (Record, through the engine's scheduler); every slider move only slices
the recording and redraws. The slider handlers are module-level functions of the session (they
never reach the model); the ones that use the model or the visitor's session are methods of
`InspectorTab`; `build` lays out and wires.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import numpy as np

from ..errors import GenerationError
from ..inspector.session import InspectorSession
from ..inspector.vector import compare_states, effective_attention, model_decay_parameters
from ..inspector.matrix import MatrixRecording
from ..state import State
from . import experiments_panel, figures, matrix_figures, patching_panel
from .common import ControlGroup, ensure_session, friendly_error, parse_id_list, session_state, wire, with_notices

DEFAULT_TEXT = ("Romeo: But soft, what light through yonder window breaks?\n"
                "It is the east, and Juliet is the sun.\n\n"
                "Juliet: O Romeo, Romeo, wherefore art thou Romeo?")
MAX_CHANNELS = 128
SOURCES = ["Text below", "Current chat", "Current blog post"]


def parse_channels(spec: str, n_embd: int) -> list[int]:
    """'0-31', '3, 9, 12' or '5' -> channel ids (at most MAX_CHANNELS, within the model)."""
    out = [c for c in parse_id_list(spec, "Channels", "0-31") if 0 <= c < n_embd][:MAX_CHANNELS]
    return out or list(range(min(32, n_embd)))


def window(rec, token: int, size: int) -> tuple[int, int]:
    size = max(8, min(int(size), rec.n_tokens))
    start = max(0, min(int(token) - size // 2, rec.n_tokens - size))
    return start, min(start + size, rec.n_tokens)  # (a recording shorter than 8 tokens: all of it)


def spikes(rec, count: int = 12) -> list[tuple[str, int]]:
    s = np.nan_to_num(rec.surprisal, nan=-1)
    top = np.argsort(-s)[:count]
    return [(f"t={t} {rec.token_texts[t]!r} -log p={s[t]:.2f}", int(t)) for t in sorted(top) if s[t] >= 0]


def draw_views(rec, layer: int, token: int, channel_spec: str, size: int, head: int = 0):
    """All token-dependent figures (cheap slices of the recording): RWKV-4's seven, the token line,
    then the seven matrix-state figures (empty for the other kind of recording)."""
    if isinstance(rec, MatrixRecording):
        return draw_matrix_views(rec, layer, token, size, head)
    return (*draw_vector_views(rec, layer, token, channel_spec, size), *NO_MATRIX_VIEWS)


def draw_matrix_views(rec: MatrixRecording, layer: int, token: int, size: int, head: int):
    """RWKV-5/6/7: the per-token summary, the token line and the matrix-state figures."""
    layer = int(min(max(layer, 0), rec.n_layer - 1))
    head = int(min(max(head, 0), rec.n_head - 1))
    token = int(min(max(token, 0), rec.n_tokens - 1))
    start, end = window(rec, token, size)
    texts = rec.token_texts[start:end]
    N = rec.head_size
    summary = figures.token_summary(rec.surprisal[start:end], rec.state_change[start:end].mean(axis=2), texts,
                                    start, token)
    w = rec.decay(layer)
    decay = matrix_figures.token_channel_heatmap(
        w[start:end], texts, start, f"Layer {layer}: decay w per token and channel"
        + ("" if rec.arch.decay_per_token else f" (fixed in {rec.arch.title})"), "w", token)
    distribution = matrix_figures.half_life_distribution(w, layer)
    bonus = matrix_figures.bonus_heatmap(rec.bonus, rec.arch.bonus_label)
    if "a" in rec.arch.wkv.inputs:  # RWKV-7's in-context learning rate and removal key
        fourth = matrix_figures.rate_and_removal_key(rec.arrays["a"][start:end, layer],
                                                     rec.head("kk", layer, head)[start:end], texts, start,
                                                     layer, head, token)
    else:
        fourth = matrix_figures.token_channel_heatmap(
            np.log10(np.maximum(rec.half_life(layer)[start:end], 1e-6)), texts, start,
            f"Layer {layer}: half-life per token and channel (log10 tokens)", "log10 half-life", token)
    S = rec.state_at(token, layer, head)
    matrix = matrix_figures.state_matrix(S, layer, head, token, rec.token_texts[token], rec.arch.wkv.state_axes)
    rank = rec.effective_rank(layer, head, start, end)
    over = matrix_figures.state_over_tokens(rec.state_norm[start:end, layer, head], rank,
                                            rec.state_change[start:end, layer, head], texts, start, layer, head, token)
    alpha, carried = rec.attention(layer, head, start, end)
    attention = matrix_figures.matrix_attention(
        alpha, np.linalg.norm(carried, axis=1), texts, start,
        f"Layer {layer}, head {head}: exact effective attention (output = Σ α · value + carried-in memory)")
    at = (f"Token {token} of {rec.n_tokens}: {rec.token_texts[token]!r} · surprisal {rec.surprisal[token]:.2f} "
          f"nats · window {start}–{end - 1} · head {head} of {rec.n_head} (channels {head * N}–{head * N + N - 1})")
    empty = [gr.Plot()] * N_VIEWS
    empty[5] = summary
    return (*empty, at, decay, distribution, bonus, fourth, matrix, over, attention)


def draw_vector_views(rec, layer: int, token: int, channel_spec: str, size: int):
    """RWKV-4's figures."""
    layer = int(min(max(layer, 0), rec.n_layer - 1))
    token = int(min(max(token, 0), rec.n_tokens - 1))
    channels = parse_channels(channel_spec, rec.n_embd)
    start, end = window(rec, token, size)
    texts = rec.token_texts[start:end]
    value = rec.value_estimate(layer)[start:end][:, channels]
    mass = rec.log_mass(layer)[start:end][:, channels]
    pp = rec.pp[start:end, layer][:, channels]
    heat_value = figures.accumulator_heatmap(value, texts, start, channels, f"Layer {layer}: value estimate aa/bb",
                                             "aa/bb", token, zmid=0.0)
    heat_mass = figures.accumulator_heatmap(mass, texts, start, channels,
                                            f"Layer {layer}: memory mass pp + log bb", "log mass", token)
    heat_pp = figures.accumulator_heatmap(pp, texts, start, channels, f"Layer {layer}: pp (running max exponent)",
                                          "pp", token)
    shown = channels[:6]
    lines = figures.channel_lines(rec.value_estimate(layer)[start:end][:, shown], texts, start, shown,
                                  f"Layer {layer}: aa/bb of channels {shown} over the text", token)
    weights, prior = effective_attention(rec, layer, channels, start, end)
    attention = figures.attention_heatmap(weights, prior, texts, start,
                                          f"Layer {layer}, channels {channel_spec or 'default'}: exact effective attention")
    summary = figures.token_summary(rec.surprisal[start:end], rec.state_change()[start:end], texts, start, token)
    at_token = figures.state_at_token(rec.aa[token] / np.maximum(rec.bb[token], 1e-38), token, rec.token_texts[token])
    at = (f"Token {token} of {rec.n_tokens}: {rec.token_texts[token]!r} · surprisal "
          f"{rec.surprisal[token]:.2f} nats · window {start}–{end - 1}")
    return heat_value, heat_mass, heat_pp, lines, attention, summary, at_token, at


N_VIEWS = 7  # RWKV-4 figures returned by draw_views (then the token line, then the matrix figures)
NO_VIEWS = [gr.Plot()] * N_VIEWS
N_MATRIX_VIEWS = 7
NO_MATRIX_VIEWS = [gr.Plot()] * N_MATRIX_VIEWS
MATRIX_VIEW_NAMES = ["decay per token", "half-life distribution", "bonus", "in-context rate and removal key, or half-life",
                     "state matrix", "state over the text", "effective attention"]


def model_figures(runtime) -> tuple:
    if runtime.architecture.inspector_views != "vector":  # cleared: no figure outlives the model it came from
        return (None,) * 4
    td, tf = model_decay_parameters(runtime)
    return (figures.decay_spectrum(td), figures.half_life_heatmap(td), figures.bonus_heatmap(tf),
            figures.bonus_vs_decay(td, tf))


def tokens_to_record(source, text, chat_session, blog_session, tokenizer) -> list[int]:
    """The token ids the chosen source holds (exactly what the chat's / post's state read)."""
    if source == SOURCES[1]:
        if chat_session is None or not chat_session.turns:
            raise GenerationError("The chat is empty: send a message first (or record a text).")
        return chat_session.history_tokens()
    if source == SOURCES[2]:
        if blog_session is None or not blog_session.tokens:
            raise GenerationError("There is no blog post yet: write one first (or record a text).")
        return list(blog_session.tokens)
    if not text or not text.strip():
        raise GenerationError("Type a text to record first.")
    return tokenizer.encode(text)


def on_view(session, layer, token, channels, window_size, head=0):
    if session is None or session.recording is None:
        return [*NO_VIEWS, with_notices(session, "Press Record first.") if session else "Press Record first.",
                *NO_MATRIX_VIEWS]
    try:
        return list(draw_views(session.recording, layer, token, channels, window_size, head))
    except Exception as exc:
        return [*NO_VIEWS, friendly_error(exc), *NO_MATRIX_VIEWS]


def on_spike(choice):
    return gr.Slider() if choice is None else gr.Slider(value=int(choice))


def on_export(session, token):
    rec = session.recording if session is not None else None
    if rec is None:
        return None, "Press Record first."
    t = int(min(max(int(token), 0), rec.n_tokens - 1))
    path = Path(tempfile.mkdtemp(prefix="rwkv-state-")) / f"state-token-{t}.safetensors"
    state = rec.full_state_at(t) if isinstance(rec, MatrixRecording) else rec.state_at(t)
    state.save(path, extra_metadata={"token_index": t, "text": "".join(rec.token_texts[:t + 1])[-2000:]})
    return str(path), f"Saved the state after token {t}."


def on_html(session, layer, token, channels, window_size, head=0):
    rec = session.recording if session is not None else None
    if rec is None:
        return None
    views = draw_views(rec, layer, token, channels, window_size, head)
    path = Path(tempfile.mkdtemp(prefix="rwkv-figs-")) / "rwkv-state-inspector.html"
    if isinstance(rec, MatrixRecording):
        figs = {"per-token summary": views[5], **dict(zip(MATRIX_VIEW_NAMES, views[N_VIEWS + 1:]))}
        path.write_text(figures.figures_to_html(figs), encoding="utf-8")
        return str(path)
    names = ["value estimate", "memory mass", "pp", "channels over the text", "effective attention",
             "per-token summary", "state at the selected token"]
    figs = dict(zip(names, views[:N_VIEWS]))
    figs.update({"decay spectrum": figures.decay_spectrum(rec.time_decay),
                 "half-life": figures.half_life_heatmap(rec.time_decay),
                 "bonus u": figures.bonus_heatmap(rec.time_first)})
    path.write_text(figures.figures_to_html(figs), encoding="utf-8")
    return str(path)


@dataclass(frozen=True)
class ViewChoice:
    """Where the views look: a layer, RWKV-4's channels, the window of tokens, a head (v5-7)."""
    layer: int = 0
    channels: str = "0-31"
    window_size: int = 96
    head: int = 0


class InspectorTab:
    """The State inspector's handlers that use the model or the visitor's session (one method per event)."""

    def __init__(self, engine):
        self.engine = engine

    def on_record(self, source, text, chat_session, blog_session, session, view: "ViewChoice",
                  request: gr.Request = None):
        """Record the chosen text (progress while it runs), then draw every view at its last token.
        Outputs: status, layer slider, token slider, spike list, the views, the token line, the four
        model figures, session."""
        layer, channels, window_size, head = view.layer, view.channels, view.window_size, view.head
        session = ensure_session(self.engine, session, InspectorSession, request)
        unchanged = (gr.Slider(), gr.Slider(), gr.Slider(), gr.Dropdown(), *NO_VIEWS, gr.Markdown(), *NO_MATRIX_VIEWS,
                     *[gr.Plot()] * 4, session)
        try:
            loaded = self.engine.require()
            ids = tokens_to_record(source, text, chat_session, blog_session, loaded.tokenizer)
            for event in session.record(self.engine, ids):
                if event.kind == "progress":
                    yield (f"Recording… {event.value[1]}", *unchanged)
                elif event.kind == "queued":
                    yield (f"Waiting for the model: place {event.value} in the queue…", *unchanged)
            rec = session.recording
            layer = min(int(layer), rec.n_layer - 1)
            last = rec.n_tokens - 1
            matrix = isinstance(rec, MatrixRecording)
            head = min(int(head or 0), rec.n_head - 1) if matrix else 0
            views = draw_views(rec, layer, last, channels, window_size, head)
            heads = f" ({rec.n_head} heads of {rec.head_size}: see the Matrix state tab)" if matrix else ""
            status = (f"Recorded {rec.n_tokens} tokens × {rec.n_layer} layers × {rec.n_embd} channels{heads}. "
                      "Move the sliders: every view is a slice of this recording.")
            yield (with_notices(session, status), gr.Slider(maximum=rec.n_layer - 1, value=layer),
                   gr.Slider(maximum=last, value=last),
                   gr.Slider(maximum=max(1, rec.n_head - 1) if matrix else 1, value=head, interactive=matrix),
                   gr.Dropdown(choices=spikes(rec), value=None), *views,
                   *model_figures(loaded.runtime), session)
        except Exception as exc:
            yield (with_notices(session, friendly_error(exc)), *unchanged)

    def on_compare(self, session, token, file):
        if session is None or session.recording is None or file is None:
            return gr.Plot(), "Record a text and choose a state file to compare."
        try:
            if isinstance(session.recording, MatrixRecording):
                return gr.Plot(), ("Comparing state files reads RWKV-4's state; for RWKV-5/6/7 export the state "
                                   "and compare it in the Notebook, or use Patching.")
            other = State.load(file if isinstance(file, str) else file.name, runtime=self.engine.require().runtime)
            result = compare_states(session.recording.state_at(int(token)), other)
            rows = result["top_channels"][:8]
            table = "\n".join(f"| {r['component']} | {r['layer']} | {r['channel']} | {r['abs_diff']:.4g} |" for r in rows)
            return (figures.state_comparison(result["per_layer"]),
                    "Channels that differ most:\n\n| component | layer | channel | abs diff |\n|---|---|---|---|\n" + table)
        except Exception as exc:
            return gr.Plot(), friendly_error(exc)

    def on_load(self):
        """The model's decay / bonus views need no recording: drawn when the page opens."""
        loaded = self.engine.current
        return model_figures(loaded.runtime) if loaded is not None else (gr.Plot(),) * 4


def build(engine, chat_state, blog_state):
    """Returns (the session state, the page-load function, its outputs)."""
    tab = InspectorTab(engine)
    session = session_state(engine)
    with gr.Row():
        source = gr.Radio(SOURCES, value=SOURCES[0], label="Record", elem_id="insp-source")
        record_btn = gr.Button("Record", variant="primary", elem_id="insp-record")
    text = gr.Textbox(DEFAULT_TEXT, lines=4, label="Text", elem_id="insp-text")
    status = gr.Markdown("Type a text (or pick the current chat / blog post) and press Record.", elem_id="insp-status")
    # the loaded model's layers and heads from the start, so an API call may pick any before its
    # first Record (which sets the ranges of the model then loaded)
    config = engine.current.runtime.config if engine.current is not None else None
    last_layer = max(1, config.n_layer - 1) if config else 1
    last_head = max(1, getattr(config, "n_head", 1) - 1) if config else 1
    with gr.Row():
        layer = gr.Slider(0, last_layer, value=0, step=1, label="Layer", elem_id="insp-layer")
        token = gr.Slider(0, 1, value=0, step=1, label="Token", elem_id="insp-token")
        size = gr.Slider(16, 512, value=96, step=8, label="Window (tokens)", elem_id="insp-window")
        head = gr.Slider(0, last_head, value=0, step=1, label="Head (RWKV-5/6/7)", elem_id="insp-head")
        channel_spec = gr.Textbox("0-31", label="Channels (e.g. 0-31 or 3,7,9)", elem_id="insp-channels")
    with gr.Row():
        spike = gr.Dropdown([], label="Jump to a surprising token", elem_id="insp-spike")
        token_info = gr.Markdown("", elem_id="insp-token-info")
    with gr.Tabs():
        with gr.Tab("Per-token summary"):
            summary_plot = gr.Plot(elem_id="insp-summary")
        with gr.Tab("WKV accumulators"):
            gr.Markdown("RWKV-4's vector state (aa, bb, pp per channel); RWKV-5/6/7 keep a matrix per head: "
                        "see the Matrix state tab.")
            at_token_plot = gr.Plot(elem_id="insp-at-token")
            value_plot = gr.Plot(elem_id="insp-plot")
            lines_plot = gr.Plot(elem_id="insp-lines")
            mass_plot = gr.Plot(elem_id="insp-mass")
            pp_plot = gr.Plot(elem_id="insp-pp")
        with gr.Tab("Effective attention"):
            gr.Markdown("RWKV-4's attention in closed form, per channel; RWKV-5/6/7's exact attention per head "
                        "is in the Matrix state tab.")
            attention_plot = gr.Plot(elem_id="insp-attention")
        with gr.Tab("Matrix state (RWKV-5/6/7)"):
            gr.Markdown("For RWKV-5/6/7, which keep one N × N matrix per head (RWKV-4's vector state is in the WKV "
                        "accumulators tab). The head slider above picks the head; the attention is "
                        "exact (the state is linear in the values) and signed: RWKV-7 removes what it overwrites.")
            m_attention = gr.Plot(elem_id="insp-m-attention")
            m_matrix = gr.Plot(elem_id="insp-m-matrix")
            m_over = gr.Plot(elem_id="insp-m-over")
            m_decay = gr.Plot(elem_id="insp-m-decay")
            m_fourth = gr.Plot(elem_id="insp-m-rate")
            m_distribution = gr.Plot(elem_id="insp-m-halflife")
            m_bonus = gr.Plot(elem_id="insp-m-bonus")
        with gr.Tab("Patching"):
            patching_panel.build(engine, session, token)
        with gr.Tab("Experiments"):
            experiments_panel.build(engine, session, token)
        with gr.Tab("Decay and bonus"):
            gr.Markdown("RWKV-4's time_decay and time_first; RWKV-5/6/7's decay, half-lives and bonus are in "
                        "the Matrix state tab.")
            decay_plot = gr.Plot(elem_id="insp-decay")
            life_plot = gr.Plot(elem_id="insp-halflife")
            bonus_plot = gr.Plot(elem_id="insp-bonus")
            bonus_scatter = gr.Plot(elem_id="insp-bonus-vs-decay")
        with gr.Tab("State files"):
            with gr.Row():
                export_btn = gr.Button("Export the state at the selected token", elem_id="insp-export")
                export_file = gr.File(label="State file (.safetensors)", elem_id="insp-export-file")
            with gr.Row():
                upload = gr.File(label="Load a state file to compare with the selected token",
                                 file_types=[".safetensors"], elem_id="insp-upload")
                compare_plot = gr.Plot(elem_id="insp-compare")
            compare_md = gr.Markdown("", elem_id="insp-compare-text")
            html_btn = gr.Button("Save all figures as HTML", elem_id="insp-html")
            html_file = gr.File(label="Figures (standalone HTML)", elem_id="insp-html-file")

    view_outputs = [value_plot, mass_plot, pp_plot, lines_plot, attention_plot, summary_plot, at_token_plot,
                    token_info, m_decay, m_distribution, m_bonus, m_fourth, m_matrix, m_over, m_attention]
    model_plots = [decay_plot, life_plot, bonus_plot, bonus_scatter]
    view_choice = ControlGroup([layer, channel_spec, size, head], ViewChoice)
    record_btn.click(*wire(tab.on_record, source, text, chat_state, blog_state, session, view_choice),
                     [status, layer, token, head, spike, *view_outputs, *model_plots, session], api_name="inspect",
                     concurrency_id="model", concurrency_limit=engine.event_concurrency())
    view_inputs = [session, layer, token, channel_spec, size, head]
    for control in (layer, token, size, head):
        control.release(on_view, view_inputs, view_outputs, concurrency_limit=None, api_visibility="private")
    for control in (token, head):
        control.input(on_view, view_inputs, view_outputs, concurrency_limit=None, trigger_mode="always_last",
                      api_visibility="private")
    channel_spec.submit(on_view, view_inputs, view_outputs, concurrency_limit=None, api_visibility="private")
    spike.change(on_spike, [spike], [token], queue=False, api_visibility="private").then(
        on_view, view_inputs, view_outputs, concurrency_limit=None, api_visibility="private")
    export_btn.click(on_export, [session, token], [export_file, status], api_visibility="private")
    upload.change(tab.on_compare, [session, token, upload], [compare_plot, compare_md],
                  api_visibility="private")
    html_btn.click(on_html, view_inputs, [html_file], api_visibility="private")
    return session, tab.on_load, model_plots
