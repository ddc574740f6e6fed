"""The State inspector's Experiments tab: knock-outs, causal trace, logit lens, memory probe.

Every experiment runs on the current recording's text (press Record first), through the engine's
scheduler (experiments.py does the work; this module only parses the controls, draws and exports).
The selected token of the inspector is the experiment's position: where a knock-out happens, the
token a causal trace explains, the token a memory probe marks.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from ..inspector import knockouts as experiments
from ..errors import GenerationError
from ..inspector.session import InspectorSession
from ..inspector.vector import half_life, require_vector_views
from . import figures
from .common import ControlGroup, ensure_session, friendly_error, parse_id_list, wire, with_notices

EXPERIMENTS = ["Knock-out", "Causal trace", "Logit lens", "Memory probe"]
CHANNEL_MODES = ["Channels listed", "Longest half-life (top k)", "Shortest half-life (top k)"]
KIND_CHOICES = [("erase the WKV memory (aa = bb = 0)", "erase"), ("zero the token-shift inputs", "shift"),
                ("set the decay (time_decay)", "decay")]
MAX_KNOCKOUTS = 64


def parse_ids(spec: str, limit: int, what: str) -> list[int]:
    """'all', '0-3', '1, 4' -> sorted unique ids below `limit`."""
    if (spec or "").strip().lower() in ("", "all"):
        return list(range(limit))
    out = sorted(i for i in parse_id_list(spec, what) if 0 <= i < limit)
    if not out:
        raise GenerationError(f"{what}: none of those exist (0 to {limit - 1}).")
    return out


def build_knockouts(rec, kind: str, layers: str, channel_mode: str, channels: str, top_k: int, position: int,
                    new_decay: float | None) -> list[experiments.Knockout]:
    """One knock-out per chosen layer, on the chosen channels of that layer."""
    chosen_layers = parse_ids(layers, rec.n_layer, "Layers")
    if len(chosen_layers) > MAX_KNOCKOUTS:
        raise GenerationError(f"At most {MAX_KNOCKOUTS} knock-outs at once.")
    out = []
    for layer in chosen_layers:
        if channel_mode == CHANNEL_MODES[0]:
            picked = tuple(parse_ids(channels, rec.n_embd, "Channels"))
        else:
            picked = experiments.channels_by(half_life(rec.time_decay[layer]), max(1, int(top_k)),
                                             largest=channel_mode == CHANNEL_MODES[1])
        out.append(experiments.Knockout(layer, picked, int(position), kind,
                                        float(new_decay) if kind == "decay" and new_decay is not None else None))
    return out


def export_files(name: str, figure, result) -> list[str]:
    """The figure as standalone HTML, the data as CSV and JSON."""
    folder = Path(tempfile.mkdtemp(prefix="rwkv-experiment-"))
    html = folder / f"{name}.html"
    html.write_text(figures.figures_to_html({figure.layout.title.text or name: figure}), encoding="utf-8")
    csv_path, json_path = folder / f"{name}.csv", folder / f"{name}.json"
    csv_path.write_text(result.to_csv(), encoding="utf-8")
    json_path.write_text(result.to_json(), encoding="utf-8")
    return [str(html), str(csv_path), str(json_path)]


def top_token(result, row: int, column: int) -> str:
    """A knock-out result's most likely next token (row 0: unedited) at one position, as code."""
    text = result.top_texts[row][column][0] if result.top_texts else str(int(result.top_ids[row, column, 0]))
    probability = result.top_probs[row, column, 0]
    return f"`{text!r}` {probability:.2f}"


def summary_markdown(experiment: str, result) -> str:
    if experiment == "Knock-out":
        rows = result.summary()
        order = sorted(range(len(rows)), key=lambda i: -rows[i]["mean_kl"])
        lines = []
        for i in order[:12]:
            r = rows[i]
            j = r["max_kl_position"] - result.start  # where it changed the prediction most
            before, after = top_token(result, 0, j), top_token(result, i + 1, j)
            change = r["mean_surprisal_change"]
            lines.append(f"| {r['knockout']} | {r['mean_kl']:.4f} | {r['max_kl']:.4f} at {r['max_kl_position']} | "
                         f"{before} → {after} | {'' if change != change else f'{change:+.3f}'} |")
        return ("| knock-out | mean KL | max KL | top next token there, before → after | mean Δ surprisal |\n"
                "|---|---|---|---|---|\n" + "\n".join(lines))
    if experiment == "Causal trace":
        rows = result.strongest(8)
        return ("Erasures that change the target most:\n\n| erased | before token | Δ log p |\n|---|---|---|\n"
                + "\n".join(f"| {r['group']} | {r['position']} {r['token']!r} | {r['delta_log_prob']:+.4f} |"
                            for r in rows))
    if experiment == "Memory probe":
        return "Median half-life per layer (tokens): " + ", ".join(
            f"L{i} {v:.3g}" for i, v in enumerate(result.median_half_life))
    return ""


@dataclass(frozen=True)
class KnockoutChoice:
    """The knock-out controls: what to do to which layers and channels."""
    kind: str = "erase"
    layers: str = "all"
    channel_mode: str = CHANNEL_MODES[1]
    channels: str = "0-31"
    top_k: int = 16
    new_decay: float | None = -8.0


@dataclass(frozen=True)
class TraceChoice:
    """The causal trace's controls: channel groups per layer, tokens back from the traced one."""
    groups: int = 4
    window: int = 8


class ExperimentsPanel:
    def __init__(self, engine):
        self.engine = engine

    def on_run(self, session, experiment, position, knockout: "KnockoutChoice", trace: "TraceChoice",
               request: gr.Request = None):
        """Outputs: status, figure, summary, export files."""
        kind, layers, channel_mode, channels = knockout.kind, knockout.layers, knockout.channel_mode, knockout.channels
        top_k, new_decay, groups, trace_window = knockout.top_k, knockout.new_decay, trace.groups, trace.window
        session = ensure_session(self.engine, session, InspectorSession, request)
        unchanged = (gr.Plot(), gr.Markdown(), gr.File())
        try:
            rec = session.recording
            if rec is None:
                raise GenerationError("Press Record first: experiments run on the recorded text.")
            require_vector_views(rec.arch, "The Experiments tab's knock-outs, causal trace, logit lens and memory "
                                 "probe")
            position = int(min(max(int(position or 0), 0), rec.n_tokens - 1))
            tokenizer = self.engine.require().tokenizer
            if experiment == "Memory probe":  # the recording has everything: no model run
                result = experiments.memory_probe(rec, position)
                session.keep_experiment(self.engine, result)
                fig = figures.memory_probe_lines(result)
            else:
                if experiment == "Knock-out":
                    chosen = build_knockouts(rec, kind, layers, channel_mode, channels, top_k, position, new_decay)
                    task = lambda runtime: experiments.knockout_task(runtime, tokenizer, rec.tokens, chosen)  # noqa: E731
                elif experiment == "Causal trace":
                    task = lambda runtime: experiments.causal_trace_task(  # noqa: E731
                        runtime, tokenizer, rec.tokens, position, int(groups), int(trace_window))
                else:
                    task = lambda runtime: experiments.logit_lens_task(runtime, tokenizer, rec.tokens)  # noqa: E731
                for event in session.run_experiment(self.engine, task, label=experiment.lower()):
                    if event.kind == "progress":
                        yield (f"{experiment}… {event.value[1]}", *unchanged)
                    elif event.kind == "queued":
                        yield (f"Waiting for the model: place {event.value} in the queue…", *unchanged)
                result = session.experiment
                if result is None:
                    raise GenerationError("The experiment was stopped.")
                fig = {"Knock-out": figures.knockout_effects, "Causal trace": figures.causal_trace_heatmap,
                       "Logit lens": figures.logit_lens_heatmap}[experiment](result)
            name = experiment.lower().replace(" ", "-").replace("knock-out", "knockout")
            status = f"{experiment} done on {rec.n_tokens} tokens. Export: figure (HTML), data (CSV, JSON)."
            yield (with_notices(session, status), fig, summary_markdown(experiment, result),
                   export_files(name, fig, result))
        except Exception as exc:
            yield (with_notices(session, friendly_error(exc)), *unchanged)


def build(engine, session, token_slider):
    """The Experiments tab's controls (inside the inspector's tabs); `token_slider` is the position."""
    panel = ExperimentsPanel(engine)
    gr.Markdown("Experiments on the recorded text, at the **selected token** (the Token slider above): a "
                "knock-out edits the state just before that token is read; a causal trace explains that token; "
                "a memory probe follows it. Exact: no sampling.")
    with gr.Row():
        experiment = gr.Radio(EXPERIMENTS, value=EXPERIMENTS[0], label="Experiment", elem_id="exp-kind")
        run_btn = gr.Button("Run experiment", variant="primary", elem_id="exp-run")
    with gr.Row():
        kind = gr.Dropdown(KIND_CHOICES, value="erase", label="Knock-out", elem_id="exp-edit")
        layers = gr.Textbox("all", label="Layers (one knock-out each: all, 0-3, 1,4)", elem_id="exp-layers")
        channel_mode = gr.Dropdown(CHANNEL_MODES, value=CHANNEL_MODES[1], label="Channels", elem_id="exp-channel-mode")
        channels = gr.Textbox("0-31", label="Channels listed", elem_id="exp-channels")
        top_k = gr.Number(16, precision=0, label="top k", elem_id="exp-topk")
        new_decay = gr.Number(-8.0, label="new time_decay (decay)", elem_id="exp-decay")
    with gr.Row():
        groups = gr.Slider(1, 16, value=4, step=1, label="Causal trace: channel groups per layer", elem_id="exp-groups")
        trace_window = gr.Slider(1, 128, value=24, step=1, label="Causal trace: positions before the token",
                                 elem_id="exp-window")
    status = gr.Markdown("", elem_id="exp-status")
    plot = gr.Plot(elem_id="exp-plot")
    summary = gr.Markdown("", elem_id="exp-summary")
    files = gr.File(label="Export (figure HTML, CSV, JSON)", file_count="multiple", elem_id="exp-files")
    knockout = ControlGroup([kind, layers, channel_mode, channels, top_k, new_decay], KnockoutChoice)
    trace = ControlGroup([groups, trace_window], TraceChoice)
    run_btn.click(*wire(panel.on_run, session, experiment, token_slider, knockout, trace),
                  [status, plot, summary, files], api_name="experiment", concurrency_id="model", concurrency_limit=engine.event_concurrency())
