"""Plotly figure builders: pure functions of arrays -> go.Figure (testable without a browser)."""

from __future__ import annotations

import numpy as np
import plotly.colors
import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots

from ..inspector.vector import decay_per_token, half_life

# Our figures' look is plotly_white, set as the process's default template: a figure takes the
# default when it is built (~1 ms), while naming a template in update_layout validates a copy of
# it every time (~20 ms a figure, about half of drawing the inspector's views).
pio.templates.default = "plotly_white"
LAYOUT = dict(margin=dict(l=60, r=20, t=50, b=50), height=420)


def _token_labels(texts: list[str], start: int) -> list[str]:
    # unique labels (plotly merges equal category names): "12 ␣the"
    return [f"{start + i} {t.replace(' ', '␣').replace(chr(10), '⏎')[:12]}" for i, t in enumerate(texts)]


def decay_spectrum(time_decay: np.ndarray) -> go.Figure:
    """The RWKV paper's Fig. 10: per layer, channels sorted by their per-token decay."""
    fig = go.Figure()
    decay = decay_per_token(time_decay)
    life = half_life(time_decay)
    n_layer, n_embd = time_decay.shape
    for layer in range(n_layer):
        order = np.argsort(decay[layer])
        custom = np.stack([order, time_decay[layer, order], life[layer, order]], axis=1)
        fig.add_trace(go.Scatter(
            x=np.arange(n_embd) / max(1, n_embd - 1), y=decay[layer, order], mode="lines", name=f"layer {layer}",
            customdata=custom,
            hovertemplate=(f"layer {layer}<br>channel %{{customdata[0]:.0f}}<br>time_decay %{{customdata[1]:.3f}}"
                           "<br>decay per token %{y:.4f}<br>half-life %{customdata[2]:.3g} tokens<extra></extra>")))
    fig.update_layout(title="Decay spectrum: exp(-exp(time_decay)) per channel, sorted", **LAYOUT)
    fig.update_xaxes(title="channel (sorted, fraction)")
    fig.update_yaxes(title="decay per token", range=[0, 1.02])
    return fig


def half_life_heatmap(time_decay: np.ndarray) -> go.Figure:
    life = half_life(time_decay)
    order = np.argsort(life, axis=1)
    sorted_life = np.take_along_axis(life, order, axis=1)
    raw = np.take_along_axis(time_decay, order, axis=1)
    custom = np.stack([order, raw, sorted_life], axis=2)
    fig = go.Figure(go.Heatmap(
        z=np.log10(np.maximum(sorted_life, 1e-6)), customdata=custom, colorscale="Viridis",
        colorbar=dict(title="log10 half-life"),
        hovertemplate=("layer %{y}<br>channel %{customdata[0]:.0f}<br>time_decay %{customdata[1]:.3f}"
                       "<br>half-life %{customdata[2]:.3g} tokens<extra></extra>")))
    fig.update_layout(title="Memory half-life ln2/exp(time_decay), channels sorted per layer (log scale)", **LAYOUT)
    fig.update_xaxes(title="channel rank within the layer")
    fig.update_yaxes(title="layer", dtick=1)
    return fig


def bonus_heatmap(time_first: np.ndarray) -> go.Figure:
    fig = go.Figure(go.Heatmap(z=time_first, colorscale="RdBu", zmid=0, colorbar=dict(title="u"),
                               hovertemplate="layer %{y}<br>channel %{x}<br>time_first u %{z:.3f}<extra></extra>"))
    fig.update_layout(title="Bonus u (time_first) per layer and channel", **LAYOUT)
    fig.update_xaxes(title="channel")
    fig.update_yaxes(title="layer", dtick=1)
    return fig


def bonus_vs_decay(time_decay: np.ndarray, time_first: np.ndarray) -> go.Figure:
    fig = go.Figure()
    for layer in range(time_decay.shape[0]):
        fig.add_trace(go.Scattergl(
            x=half_life(time_decay[layer]), y=time_first[layer], mode="markers", name=f"layer {layer}",
            marker=dict(size=4, opacity=0.6), customdata=np.arange(time_decay.shape[1]),
            hovertemplate=f"layer {layer}<br>channel %{{customdata}}<br>half-life %{{x:.3g}}<br>u %{{y:.3f}}<extra></extra>"))
    fig.update_layout(title="Bonus u against memory half-life, per channel", **LAYOUT)
    fig.update_xaxes(title="half-life (tokens, log)", type="log")
    fig.update_yaxes(title="time_first u")
    return fig


def accumulator_heatmap(values: np.ndarray, token_texts: list[str], start: int, channels: np.ndarray,
                        title: str, colorbar: str, selected: int | None = None, zmid: float | None = None) -> go.Figure:
    """values [T_window, n_channels] as a channels x tokens heatmap, x labelled with the tokens."""
    labels = _token_labels(token_texts, start)
    fig = go.Figure(go.Heatmap(
        z=values.T, x=labels, y=[str(c) for c in channels], colorscale="RdBu" if zmid is not None else "Viridis",
        zmid=zmid, colorbar=dict(title=colorbar),
        hovertemplate="token %{x}<br>channel %{y}<br>%{z:.4g}<extra></extra>"))
    if selected is not None and start <= selected < start + len(labels):
        fig.add_vline(x=selected - start, line=dict(color="black", width=2, dash="dot"))
    fig.update_layout(title=title, **LAYOUT)
    fig.update_xaxes(title="token", type="category", tickangle=-60)
    fig.update_yaxes(title="channel", type="category")
    return fig


def state_at_token(value: np.ndarray, token: int, token_text: str) -> go.Figure:
    """value [L, C]: every layer's value estimate aa/bb after one token."""
    fig = go.Figure(go.Heatmap(z=value, colorscale="RdBu", zmid=0, colorbar=dict(title="aa/bb"),
                               hovertemplate="layer %{y}<br>channel %{x}<br>aa/bb %{z:.4g}<extra></extra>"))
    fig.update_layout(title=f"State after token {token} ({token_text!r}): value estimate aa/bb, all layers",
                      **{**LAYOUT, "height": 300})
    fig.update_xaxes(title="channel")
    fig.update_yaxes(title="layer", dtick=1)
    return fig


def channel_lines(values: np.ndarray, token_texts: list[str], start: int, channels: list[int],
                  title: str, selected: int | None = None) -> go.Figure:
    labels = _token_labels(token_texts, start)
    fig = go.Figure()
    for idx, c in enumerate(channels):
        fig.add_trace(go.Scatter(x=labels, y=values[:, idx], mode="lines", name=f"channel {c}"))
    if selected is not None and start <= selected < start + len(labels):
        fig.add_vline(x=selected - start, line=dict(color="black", width=1, dash="dot"))
    fig.update_layout(title=title, **LAYOUT)
    fig.update_xaxes(title="token", type="category", tickangle=-60)
    return fig


def attention_heatmap(weights: np.ndarray, prior: np.ndarray, token_texts: list[str], start: int,
                      title: str) -> go.Figure:
    labels = _token_labels(token_texts, start)
    z = np.concatenate([prior[:, None], weights], axis=1)
    fig = go.Figure(go.Heatmap(
        z=z, x=["(memory before)"] + labels, y=labels, colorscale="Magma", reversescale=True,
        colorbar=dict(title="weight"), zmin=0,
        hovertemplate="output at %{y}<br>weight of %{x}: %{z:.4f}<extra></extra>"))
    fig.update_layout(title=title, **{**LAYOUT, "height": 560})
    fig.update_xaxes(title="token read (diagonal: the current token's bonus share)", type="category", tickangle=-60)
    fig.update_yaxes(title="output position", type="category", autorange="reversed")
    return fig


def token_summary(surprisal: np.ndarray, change: np.ndarray, token_texts: list[str], start: int,
                  selected: int | None = None) -> go.Figure:
    """Surprisal bars with, per layer, how much the state changed at each token."""

    labels = _token_labels(token_texts, start)
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.4, 0.6], vertical_spacing=0.06,
                        subplot_titles=("surprisal -log p (nats)", "state change per layer (relative L2)"))
    fig.add_trace(go.Bar(x=labels, y=surprisal, name="surprisal",
                         hovertemplate="%{x}<br>-log p = %{y:.2f}<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Heatmap(z=change.T, x=labels, y=[f"L{i}" for i in range(change.shape[1])], colorscale="Viridis",
                             colorbar=dict(title="change", y=0.3, len=0.6), name="change",
                             hovertemplate="%{x}<br>%{y}: %{z:.3f}<extra></extra>"), row=2, col=1)
    if selected is not None and start <= selected < start + len(labels):
        fig.add_vline(x=selected - start, line=dict(color="red", width=1, dash="dot"))
    fig.update_layout(title="Per-token summary (click a token to select it)", showlegend=False,
                      **{**LAYOUT, "height": 480})
    fig.update_xaxes(type="category", tickangle=-60, row=2, col=1)
    return fig


def state_comparison(rows: list[dict]) -> go.Figure:
    fig = go.Figure()
    components = sorted({r["component"] for r in rows})
    for comp in components:
        sub = [r for r in rows if r["component"] == comp]
        fig.add_trace(go.Bar(x=[f"L{r['layer']}" for r in sub], y=[r["relative_l2"] for r in sub], name=comp,
                             customdata=[r["cosine"] for r in sub],
                             hovertemplate=comp + "<br>%{x}<br>relative L2 %{y:.4f}<br>cosine %{customdata:.4f}<extra></extra>"))
    fig.update_layout(title="State comparison: relative L2 distance per layer and component", barmode="group", **LAYOUT)
    fig.update_yaxes(title="relative L2")
    return fig


def figures_to_html(figures: dict[str, go.Figure]) -> str:
    """All figures in one standalone HTML page (plotly.js embedded: opens offline)."""
    parts = ["<html><head><meta charset='utf-8'><title>RWKV Playground - state inspector</title></head><body>"]
    first = True
    for name, fig in figures.items():
        parts.append(f"<h2>{name}</h2>")
        parts.append(fig.to_html(full_html=False, include_plotlyjs=True if first else False))
        first = False
    parts.append("</body></html>")
    return "\n".join(parts)


# ---- experiments (experiments.py) ------------------------------------------------------------
def knockout_effects(result) -> go.Figure:
    """Per knock-out, at every position from the first edit on: KL divergence of the next-token
    distribution, and the change in surprisal of the actual next token."""
    labels = _token_labels(result.token_texts[result.start:], result.start)
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=("KL(unedited ‖ knocked out) of the next-token distribution (nats)",
                                        "change in surprisal of the actual next token (nats; > 0: harder)"))
    change = result.surprisal_change()
    palette = plotly.colors.qualitative.Plotly
    for i, label in enumerate(result.labels):
        color = palette[i % len(palette)]  # the same colour for a knock-out in both panels
        top_before = [t[0] for t in result.top_texts[0]] if result.top_texts else result.top_ids[0, :, 0]
        top_after = [t[0] for t in result.top_texts[i + 1]] if result.top_texts else result.top_ids[i + 1, :, 0]
        custom = np.stack([np.asarray(top_before, dtype=object), np.asarray(top_after, dtype=object)], axis=1)
        fig.add_trace(go.Scatter(x=labels, y=result.kl[i], mode="lines", name=label, legendgroup=label,
                                 customdata=custom, line=dict(color=color),
                                 hovertemplate=(f"{label}<br>%{{x}}<br>KL %{{y:.4f}}<br>top before %{{customdata[0]}}"
                                                "<br>top after %{customdata[1]}<extra></extra>")), row=1, col=1)
        fig.add_trace(go.Scatter(x=labels, y=change[i], mode="lines", name=label, legendgroup=label, showlegend=False,
                                 line=dict(color=color),
                                 hovertemplate=f"{label}<br>%{{x}}<br>Δ surprisal %{{y:.3f}}<extra></extra>"),
                      row=2, col=1)
    fig.update_layout(title="Knock-outs: the effect on every later token", **{**LAYOUT, "height": 560})
    fig.update_xaxes(type="category", tickangle=-60, row=2, col=1)
    return fig


def causal_trace_heatmap(trace) -> go.Figure:
    labels = _token_labels([trace.token_texts[p] for p in trace.positions], trace.positions[0])
    limit = float(np.abs(trace.delta).max()) or 1.0
    fig = go.Figure(go.Heatmap(
        z=trace.delta, x=labels, y=trace.group_labels, colorscale="RdBu", zmid=0, zmin=-limit, zmax=limit,
        colorbar=dict(title="Δ log p"),
        hovertemplate="erase %{y} before %{x}<br>Δ log p(target) = %{z:.4f}<extra></extra>"))
    target = trace.token_texts[trace.target].replace("\n", "⏎")
    fig.update_layout(title=f"Causal trace of token {trace.target} {target!r} (log p = {trace.base_log_prob:.2f}): "
                            "which erasures change it", **{**LAYOUT, "height": max(420, 18 * len(trace.groups) + 160)})
    fig.update_xaxes(title="erased just before reading", type="category", tickangle=-60)
    fig.update_yaxes(title="layer, channel group", type="category", autorange="reversed")
    return fig


def logit_lens_heatmap(lens, start: int = 0, end: int | None = None) -> go.Figure:
    end = len(lens.tokens) if end is None else end
    labels = _token_labels(lens.token_texts[start:end], start)
    top = (np.asarray(lens.top_texts, dtype=object)[:, start:end] if lens.top_texts
           else lens.top_ids[:, start:end].astype(str))
    shown = np.vectorize(lambda t: t.replace("\n", "⏎")[:8])(top) if top.size else top
    custom = np.stack([top, lens.top_probs[:, start:end]], axis=2)
    fig = go.Figure(go.Heatmap(
        z=lens.next_token_probs[:, start:end], x=labels, y=[f"after L{i}" for i in range(lens.top_ids.shape[0])],
        text=shown, texttemplate="%{text}", textfont=dict(size=9), customdata=custom, colorscale="Viridis",
        zmin=0, zmax=1, colorbar=dict(title="p(next)"),
        hovertemplate=("%{y}, %{x}<br>p(actual next token) = %{z:.3f}<br>top: %{customdata[0]!r} "
                       "(%{customdata[1]:.3f})<extra></extra>")))
    fig.update_layout(title="Logit lens: each layer's residual read by ln_out + head (cell text: its top token)",
                      **{**LAYOUT, "height": max(420, 40 * lens.top_ids.shape[0] + 160)})
    fig.update_xaxes(type="category", tickangle=-60)
    fig.update_yaxes(type="category")
    return fig


def memory_probe_lines(probe) -> go.Figure:
    fig = go.Figure()
    later = np.arange(1, probe.measured.shape[1] + 1)
    for layer in range(probe.measured.shape[0]):
        color = f"hsl({int(300 * layer / max(1, probe.measured.shape[0] - 1))},70%,45%)"
        fig.add_trace(go.Scatter(x=later, y=probe.measured[layer], mode="lines+markers", name=f"layer {layer} measured",
                                 line=dict(color=color), legendgroup=str(layer),
                                 hovertemplate=f"layer {layer}<br>%{{x}} tokens later<br>weight %{{y:.4g}}<extra></extra>"))
        fig.add_trace(go.Scatter(x=later, y=probe.predicted[layer], mode="lines", name=f"layer {layer} decay only",
                                 line=dict(color=color, dash="dash"), legendgroup=str(layer),
                                 hovertemplate=(f"layer {layer} (decay only; median half-life "
                                                f"{probe.median_half_life[layer]:.3g})<br>%{{x}} tokens later"
                                                "<br>weight %{y:.4g}<extra></extra>")))
    token = probe.token_text.replace("\n", "⏎")
    fig.update_layout(title=f"Memory probe: how token {probe.position} {token!r} fades (solid: measured, dashed: "
                            "decay alone)", **LAYOUT)
    fig.update_xaxes(title="tokens later")
    fig.update_yaxes(title="effective attention weight (mean over channels)", type="log")
    return fig
