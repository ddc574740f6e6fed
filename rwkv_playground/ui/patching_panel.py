"""The State inspector's Patching tab: restore parts of the state from a clean run, the restore
sweep (causal trace), remove a token, blend two texts. Every architecture (RWKV-4 included);
patching.py does the work through the engine's scheduler, this module parses, draws and exports.

The clean text is the recorded one (press Record first); the corrupted text is typed here and
must have the same number of tokens. The selected token (the Token slider) is where a restore
happens, or the token whose prediction the sweep explains, or where a token is removed.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
import numpy as np

from ..inspector import patching
from ..errors import GenerationError
from ..inspector.session import InspectorSession
from . import matrix_figures
from .common import ControlGroup, ensure_session, friendly_error, wire, with_notices
from .experiments_panel import export_files, parse_ids

ACTIONS = ["Restore from the clean run", "Restore sweep (causal trace)", "Remove a token", "Blend with the other text",
           "Knock out (erase) the parts", "Knock out (set the decay of) the parts", "Two models on the recorded text"]
# what each experiment does, and the controls it reads (the others are hidden while it is chosen)
HELP = {
    ACTIONS[0]: "Just after the selected token, put a part of the clean run's state into the corrupted reading and "
                "see how much of the clean prediction returns at every later token.",
    ACTIONS[1]: "Every part restored after each of the positions before the selected token (a causal trace).",
    ACTIONS[2]: "Subtract one earlier token's exact contribution from the memory, in the chosen layers.",
    ACTIONS[3]: "Mix the recorded text's states with the other text's.",
    ACTIONS[4]: "Erase parts (layers, heads, channels or matrix rows / columns) just after the selected token.",
    ACTIONS[5]: "Set the decay factor of parts for every later token (1 keeps everything, 0 forgets at once; the "
                "decay acts on the key channels: RWKV-5/6's rows, RWKV-7's columns).",
    ACTIONS[6]: "Surprisal and half-lives of another checkpoint on the recorded text.",
}
_PARTS_CONTROLS = ("parts", "layers", "channels", "axis")
USES = {ACTIONS[0]: ("text", *_PARTS_CONTROLS), ACTIONS[1]: ("text", *_PARTS_CONTROLS, "window"),
        ACTIONS[2]: ("layers", "removed"), ACTIONS[3]: ("text",), ACTIONS[4]: _PARTS_CONTROLS,
        ACTIONS[5]: (*_PARTS_CONTROLS, "decay"), ACTIONS[6]: ("other_model",)}
CONTROLS = ("text", "parts", "layers", "channels", "axis", "window", "removed", "other_model", "decay")
MAX_OTHER_MODEL_BYTES = 2 << 30  # the second model is loaded for the experiment and freed after
PARTS = ["each layer", "each head of the chosen layers", "channels of the chosen layers"]
DEFAULT_CORRUPT = ("Romeo: But soft, what light through yonder window breaks?\n"
                   "It is the east, and Romeo is the sun.\n\n"
                   "Juliet: O Romeo, Romeo, wherefore art thou Romeo?")


def build_parts(state, mode: str, layers: str, channels: str, axis: str) -> list[patching.StatePart]:
    L = state.n_layer
    chosen = parse_ids(layers, L, "Layers")
    if mode == PARTS[1]:
        if not state.matrix_state:
            raise GenerationError("This model's vector state has no heads: restore layers or channels.")
        H = state.wkv_state.shape[-3]
        parts = [patching.StatePart(layer, head=h) for layer in chosen for h in range(H)]
    elif mode == PARTS[2]:
        limit = state.wkv_state.shape[-1] if state.matrix_state else state.n_embd
        picked = tuple(parse_ids(channels, limit, "Channels"))
        parts = [patching.StatePart(layer, channels=picked, axis=axis) for layer in chosen]
    else:
        parts = [patching.StatePart(layer) for layer in chosen]
    if len(parts) > 128:
        raise GenerationError("At most 128 parts at once: choose fewer layers.")
    return parts


def summary(action: str, result) -> str:
    if action == ACTIONS[0]:
        mean = np.nanmean(np.where(np.isfinite(result.recovery), result.recovery, np.nan), axis=1)
        order = np.argsort(-np.nan_to_num(mean, nan=-9))
        rows = [f"| {result.labels[i]} | {mean[i]:.3f} | {result.kl[i + 1].mean():.4f} |" for i in order[:12]]
        return (f"Corrupted run: mean KL from clean {result.kl[0].mean():.4f} nats.\n\n"
                "| restored | mean recovery | mean KL from clean |\n|---|---|---|\n" + "\n".join(rows))
    if action == ACTIONS[1]:
        flat = np.nan_to_num(result.recovery, nan=-9)
        g, j = np.unravel_index(np.argsort(-flat, axis=None)[:6], flat.shape)
        return (f"Answer {result.answer_text!r}: clean p = {np.exp(result.clean_log_prob):.3f}, corrupted p = "
                f"{np.exp(result.corrupt_log_prob):.3f}. Strongest restores:\n\n| restored | after token | recovery |\n"
                "|---|---|---|\n" + "\n".join(f"| {result.labels[a]} | {result.positions[b]} "
                                            f"{result.token_texts[result.positions[b]]!r} | {result.recovery[a, b]:.3f} |"
                                            for a, b in zip(g, j)))
    if action == ACTIONS[2]:
        return (f"Removed token {result.removed} from layers {result.layers} at token {result.at - 1}: mean KL "
                f"{result.kl.mean() if result.kl.size else 0:.4f}, max {result.kl.max() if result.kl.size else 0:.4f} nats.")
    if action in (ACTIONS[4], ACTIONS[5]):
        rows = [f"| {label} | {result.kl[k + 1].mean():.4f} | {result.kl[k + 1].max():.4f} |"
                for k, label in enumerate(result.labels)]
        edited = "erased" if action == ACTIONS[4] else "decay set"
        return f"| {edited} | mean KL | max KL |\n|---|---|---|\n" + "\n".join(rows)
    if action == ACTIONS[6]:
        lines = [f"| {name} ({arch}) | {np.nanmean(s):.3f} | {', '.join(f'{h:.3g}' for h in lives)} |"
                 for name, arch, s, lives in zip(result.names, result.architectures, result.surprisal, result.half_life)]
        return "| model | mean surprisal | median half-life per layer (tokens) |\n|---|---|---|\n" + "\n".join(lines)
    return "| alpha | most likely next | p | greedy continuation |\n|---|---|---|---|\n" + "\n".join(
        f"| {a:g} | {t[0]!r} | {p[0]:.3f} | {c!r} |" for a, t, p, c in
        zip(result.alphas, result.top_texts, result.top_probs, result.continuations))


def removal_figure(result):
    import plotly.graph_objects as go

    from .figures import LAYOUT

    x = list(range(result.at, result.at + len(result.kl)))
    fig = go.Figure(go.Bar(x=x, y=result.kl, name="KL", hovertemplate="after token %{x}: KL %{y:.4f}<extra></extra>"))
    fig.update_layout(title=f"Token {result.removed} removed from the memory of layers {result.layers}: how the "
                            "prediction changes after", **LAYOUT)
    fig.update_xaxes(title="prediction after token")
    fig.update_yaxes(title="KL(original || removed), nats")
    return fig


def blend_figure(result):
    import plotly.graph_objects as go

    from .figures import LAYOUT

    fig = go.Figure([go.Scatter(x=result.alphas, y=result.kl_from_a, name="KL from text A", mode="lines+markers"),
                     go.Scatter(x=result.alphas, y=result.kl_from_b, name="KL from text B", mode="lines+markers")])
    fig.update_layout(title="Blended state (1 - α) A + α B: the next-token distribution moves from A to B", **LAYOUT)
    fig.update_xaxes(title="α")
    fig.update_yaxes(title="KL, nats")
    return fig


def knockout_figure(result, edit: str = "erased"):
    import plotly.graph_objects as go

    from .figures import LAYOUT, _token_labels

    labels = _token_labels([result.token_texts[p] for p in result.positions], result.position)
    fig = go.Figure(go.Heatmap(z=result.kl[1:], x=labels, y=result.labels, colorscale="Reds", zmin=0,
                               colorbar=dict(title="KL"),
                               hovertemplate=f"{edit} %{{y}}<br>at %{{x}}: KL %{{z:.4f}}<extra></extra>"))
    fig.update_layout(title=f"Parts {edit} after token {result.position}: KL from the unedited reading",
                      **{**LAYOUT, "height": max(360, 26 * len(result.labels) + 200)})
    fig.update_xaxes(type="category", tickangle=-60)
    fig.update_yaxes(type="category", autorange="reversed")
    return fig


def models_figure(result):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from .figures import LAYOUT, _token_labels

    names = [f"{n} ({a})" for n, a in zip(result.names, result.architectures)]
    fig = make_subplots(rows=3, cols=2, vertical_spacing=0.1, horizontal_spacing=0.08,
                        specs=[[{"colspan": 2}, None], [{"colspan": 2}, None], [{}, {}]],
                        row_heights=[0.3, 0.25, 0.45],
                        subplot_titles=("surprisal per token (nats)", "median half-life per layer (tokens, log)",
                                        *(f"half-life per channel: {n}" for n in names)))
    labels = _token_labels(result.token_texts, 0)
    for name, s, lives in zip(names, result.surprisal, result.half_life):
        fig.add_trace(go.Scatter(x=labels, y=s, mode="lines", name=name), row=1, col=1)
        fig.add_trace(go.Bar(x=[f"L{i}" for i in range(len(lives))], y=lives, name=f"{name} half-life"), row=2, col=1)
    # one colour scale for both models (log10 tokens), so the same colour is the same memory length
    logs = [np.log10(np.clip(h, 1e-3, 1e9)) for h in result.channel_half_life]
    if logs:
        low, high = min(float(x.min()) for x in logs), max(float(x.max()) for x in logs)
        for col, (name, z) in enumerate(zip(names, logs), start=1):
            fig.add_trace(go.Heatmap(z=z, zmin=low, zmax=high, colorscale="Viridis", showscale=col == 2,
                                     colorbar=dict(title="log10 half-life", y=0.22, len=0.45),
                                     hovertemplate=f"{name}<br>layer %{{y}}, channel %{{x}}: "
                                                   "log10 half-life %{z:.3g}<extra></extra>"), row=3, col=col)
            fig.update_xaxes(title="channel", row=3, col=col)
            fig.update_yaxes(title="layer", dtick=1, row=3, col=col)
    fig.update_yaxes(type="log", row=2, col=1)
    fig.update_xaxes(type="category", tickangle=-60, row=1, col=1)
    fig.update_layout(title="Two models on one text (half-lives: median over the text's tokens where the decay "
                            "depends on the token)", **{**LAYOUT, "height": 900})
    return fig


@dataclass(frozen=True)
class PatchOptions:
    """The Patching tab's controls under the experiment's name: which parts (of which layers,
    channels and matrix axis), the sweep's window, the removed token, the other model, the decay."""
    parts: str = PARTS[0]
    layers: str = "all"
    channels: str = "0-15"
    axis: str = "rows"
    window: int = 24
    removed: int = 0
    other_model: str | None = None
    decay: float | None = 1.0


class PatchingPanel:
    def __init__(self, engine):
        self.engine = engine

    def other_runtime(self, name: str):
        from ..runtime import load_runtime

        if not name:
            raise GenerationError("Choose the other model first.")
        path = self.engine.resolve_choice(name)
        if path.stat().st_size > MAX_OTHER_MODEL_BYTES:
            raise GenerationError("The other model is too large to load beside this one for an experiment (2 GB at most).")
        return load_runtime(path, dtype="fp32")

    def on_run(self, session, action, corrupt_text, position, options: "PatchOptions", request: gr.Request = None):
        """Outputs: status, figure, summary, export files."""
        mode, layers, channels, axis = options.parts, options.layers, options.channels, options.axis
        window, removed, other_model, decay = options.window, options.removed, options.other_model, options.decay
        session = ensure_session(self.engine, session, InspectorSession, request)
        unchanged = (gr.Plot(), gr.Markdown(), gr.File())
        try:
            rec = session.recording
            if rec is None:
                raise GenerationError("Press Record first: the recorded text is the clean run.")
            loaded = self.engine.require()
            tokenizer = loaded.tokenizer
            clean = list(rec.tokens)
            other = tokenizer.encode(corrupt_text or "")
            position = int(min(max(int(position or 0), 0), len(clean) - 1))
            empty = loaded.runtime.new_state()
            if action == ACTIONS[0]:
                parts = build_parts(empty, mode, layers, channels, axis)
                task = lambda rt: patching.patch_task(rt, tokenizer, clean, other, position, parts)  # noqa: E731
                draw = matrix_figures.patch_recovery
            elif action == ACTIONS[1]:
                parts = build_parts(empty, mode, layers, channels, axis)
                task = lambda rt: patching.restore_sweep_task(  # noqa: E731
                    rt, tokenizer, clean, other, max(1, position), int(window), parts)
                draw = matrix_figures.restore_sweep_heatmap
            elif action == ACTIONS[2]:
                chosen = parse_ids(layers, empty.n_layer, "Layers")
                task = lambda rt: patching.remove_token_task(rt, tokenizer, clean, int(removed), position, chosen)  # noqa: E731
                draw = removal_figure
            elif action == ACTIONS[3]:
                task = lambda rt: patching.blend_task(rt, tokenizer, clean, other)  # noqa: E731
                draw = blend_figure
            elif action == ACTIONS[4]:
                parts = build_parts(empty, mode, layers, channels, axis)
                task = lambda rt: patching.patch_task(rt, tokenizer, clean, clean, position, parts,  # noqa: E731
                                                      kind="erase")
                draw = knockout_figure
            elif action == ACTIONS[5]:
                parts = build_parts(empty, mode, layers, channels, axis)
                factor = float(1.0 if decay is None else decay)
                task = lambda rt: patching.patch_task(rt, tokenizer, clean, clean, position, parts,  # noqa: E731
                                                      kind="decay", decay=factor)
                draw = lambda result: knockout_figure(result, f"decay set to {factor:g}")  # noqa: E731
            else:
                second = self.other_runtime(other_model)
                names = (loaded.name, str(other_model))
                task = lambda rt: patching.compare_models_task(rt, second, tokenizer, clean, names)  # noqa: E731
                draw = models_figure
            for event in session.run_experiment(self.engine, task, label="patching"):
                if event.kind == "progress":
                    yield (f"{action}… {event.value[1]}", *unchanged)
                elif event.kind == "queued":
                    yield (f"Waiting for the model: place {event.value} in the queue…", *unchanged)
            result = session.experiment
            if result is None:
                raise GenerationError("The experiment was stopped.")
            fig = draw(result)
            name = ["restore", "restore-sweep", "remove-token", "blend", "erase", "decay", "two-models"][ACTIONS.index(action)]
            yield (with_notices(session, f"{action}: done. Export: figure (HTML), data (CSV, JSON)."), fig,
                   summary(action, result), export_files(name, fig, result))
        except Exception as exc:
            yield (with_notices(session, friendly_error(exc)), *unchanged)


def controls_for(action: str):
    """The chosen experiment's sentence, and only the controls it reads."""
    uses = USES.get(action, CONTROLS)
    return (HELP.get(action, ""), *[gr.update(visible=name in uses) for name in CONTROLS])


def build(engine, session, token_slider):
    panel = PatchingPanel(engine)
    gr.Markdown("The **recorded text is the clean run**; the corrupted text has the same number of tokens.")
    with gr.Row():
        action = gr.Radio(ACTIONS, value=ACTIONS[0], label="Experiment", elem_id="patch-action")
        run_btn = gr.Button("Run", variant="primary", elem_id="patch-run")
    explained = gr.Markdown(HELP[ACTIONS[0]], elem_id="patch-help")
    shown = USES[ACTIONS[0]]
    corrupt = gr.Textbox(DEFAULT_CORRUPT, lines=3, label="Corrupted text (or the other text, for Blend)",
                         elem_id="patch-text", visible="text" in shown)
    with gr.Row():
        mode = gr.Dropdown(PARTS, value=PARTS[0], label="Parts", elem_id="patch-parts", visible="parts" in shown)
        layers = gr.Textbox("all", label="Layers (all, 0-3, 1,4)", elem_id="patch-layers", visible="layers" in shown)
        channels = gr.Textbox("0-15", label="Channels (or matrix rows / columns)", elem_id="patch-channels",
                              visible="channels" in shown)
        axis = gr.Dropdown(["rows", "columns"], value="rows", label="Matrix axis", elem_id="patch-axis",
                           visible="axis" in shown)
        window = gr.Slider(1, 128, value=24, step=1, label="Positions before the token", elem_id="patch-window",
                           visible="window" in shown)
        removed = gr.Number(0, precision=0, label="Token index to remove", elem_id="patch-removed",
                            visible="removed" in shown)
        other_model = gr.Dropdown(engine.list_models(), label="The other checkpoint", elem_id="patch-other-model",
                                  visible="other_model" in shown)
        decay = gr.Number(1.0, minimum=0, maximum=1, label="Decay factor (0 to 1)", elem_id="patch-decay",
                          visible="decay" in shown)
    status = gr.Markdown("", elem_id="patch-status")
    plot = gr.Plot(elem_id="patch-plot")
    table = gr.Markdown("", elem_id="patch-summary")
    files = gr.File(label="Export (figure HTML, CSV, JSON)", file_count="multiple", elem_id="patch-files")
    options = ControlGroup([mode, layers, channels, axis, window, removed, other_model, decay], PatchOptions)
    action.change(controls_for, [action], [explained, corrupt, mode, layers, channels, axis, window, removed,
                                           other_model, decay], queue=False, api_visibility="private")
    run_btn.click(*wire(panel.on_run, session, action, corrupt, token_slider, options),
                  [status, plot, table, files], api_name="patching", concurrency_id="model",
                  concurrency_limit=engine.event_concurrency())
