"""Plotly figure builders for RWKV-5/6/7's matrix state and the patching experiments: pure
functions of arrays -> go.Figure (testable without a browser)."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..inspector.matrix import matrix_half_life
from .figures import LAYOUT, _token_labels


def _mark(fig, selected, start, n):
    if selected is not None and start <= selected < start + n:
        fig.add_vline(x=selected - start, line=dict(color="red", width=1, dash="dot"))


def token_channel_heatmap(values: np.ndarray, token_texts, start: int, title: str, bar: str, selected=None,
                          colorscale="Viridis", zmid=None) -> go.Figure:
    """[n, C] per token and channel (decay, half-life, in-context rate, removal key)."""
    labels = _token_labels(token_texts, start)
    fig = go.Figure(go.Heatmap(z=values.T, x=labels, y=np.arange(values.shape[1]), colorscale=colorscale,
                               zmid=zmid, colorbar=dict(title=bar),
                               hovertemplate="%{x}<br>channel %{y}: %{z:.4g}<extra></extra>"))
    _mark(fig, selected, start, len(labels))
    fig.update_layout(title=title, **LAYOUT)
    fig.update_xaxes(title="token", type="category", tickangle=-60)
    fig.update_yaxes(title="channel (head h: h·N .. h·N + N - 1)")
    return fig


def rate_and_removal_key(a: np.ndarray, kk: np.ndarray, token_texts, start: int, layer: int, head: int,
                         selected=None) -> go.Figure:
    """RWKV-7 per token: the in-context learning rate a [n, C] of the layer and the removal key kk
    [n, N] of one head (unit length: the direction whose old value the token replaces)."""
    labels = _token_labels(token_texts, start)
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08, row_heights=[0.6, 0.4],
                        subplot_titles=(f"in-context learning rate a, every channel of layer {layer}",
                                        f"removal key kk of head {head} (unit vector per token)"))
    fig.add_trace(go.Heatmap(z=a.T, x=labels, colorscale="Viridis", zmin=0, zmax=1,
                             colorbar=dict(title="a", y=0.7, len=0.6),
                             hovertemplate="%{x}<br>channel %{y}: a %{z:.4g}<extra></extra>"), row=1, col=1)
    limit = float(np.abs(kk).max()) or 1.0
    fig.add_trace(go.Heatmap(z=kk.T, x=labels, colorscale="RdBu", zmid=0, zmin=-limit, zmax=limit,
                             colorbar=dict(title="kk", y=0.2, len=0.4),
                             hovertemplate="%{x}<br>key channel %{y}: kk %{z:.4g}<extra></extra>"), row=2, col=1)
    _mark(fig, selected, start, len(labels))
    fig.update_layout(title=f"Layer {layer}: how much each token overwrites (a) and where (kk: S ← S(w − kk·(a kk)ᵀ) + v kᵀ)",
                      **{**LAYOUT, "height": 620})
    fig.update_xaxes(type="category", tickangle=-60, row=2, col=1)
    fig.update_yaxes(title="channel", row=1, col=1)
    fig.update_yaxes(title="key j", row=2, col=1)
    return fig


def half_life_distribution(w: np.ndarray, layer: int) -> go.Figure:
    """The layer's half-lives over every token and channel (log axis), with the median."""
    life = matrix_half_life(w).reshape(-1)
    life = life[np.isfinite(life)]
    fig = go.Figure(go.Histogram(x=np.log10(np.maximum(life, 1e-6)), nbinsx=60, name="half-life",
                                 hovertemplate="log10 half-life %{x:.2f}: %{y} token-channels<extra></extra>"))
    median = float(np.median(life)) if life.size else float("nan")
    fig.update_layout(title=f"Layer {layer}: half-life -ln2/ln w over tokens × channels (median {median:.3g} tokens)",
                      **LAYOUT)
    fig.update_xaxes(title="log10 half-life (tokens)")
    fig.update_yaxes(title="token × channel count")
    return fig


def bonus_heatmap(bonus: np.ndarray, name: str) -> go.Figure:
    """[L, H, N]: u (v5/v6) or r_k (v7) per layer, channels grouped by head; `name` says which."""
    L, H, N = bonus.shape
    fig = go.Figure(go.Heatmap(z=bonus.reshape(L, H * N), colorscale="RdBu", zmid=0, colorbar=dict(title="value"),
                               hovertemplate="layer %{y}<br>channel %{x}<br>%{z:.4f}<extra></extra>"))
    for h in range(1, H):
        fig.add_vline(x=h * N - 0.5, line=dict(color="black", width=1))
    fig.update_layout(title=f"{name} per layer; heads separated by lines", **LAYOUT)
    fig.update_xaxes(title="channel")
    fig.update_yaxes(title="layer", dtick=1)
    return fig


def state_matrix(S: np.ndarray, layer: int, head: int, token: int, token_text: str,
                 axes: tuple[str, str]) -> go.Figure:
    """A head's N x N state; axes names its (rows, columns): ("key j", "value i") in v5/v6."""
    rows, cols = axes
    limit = float(np.abs(S).max()) or 1.0
    fig = go.Figure(go.Heatmap(z=S, colorscale="RdBu", zmid=0, zmin=-limit, zmax=limit, colorbar=dict(title="S"),
                               hovertemplate=f"{rows} %{{y}}<br>{cols} %{{x}}<br>%{{z:.4g}}<extra></extra>"))
    fig.update_layout(title=f"Layer {layer}, head {head}: the state matrix after token {token} {token_text!r}",
                      **{**LAYOUT, "height": 480})
    fig.update_xaxes(title=cols)
    fig.update_yaxes(title=rows, autorange="reversed")
    return fig


def state_over_tokens(norm: np.ndarray, rank: np.ndarray, change: np.ndarray, token_texts, start: int,
                      layer: int, head: int, selected=None) -> go.Figure:
    labels = _token_labels(token_texts, start)
    fig = make_subplots(rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.05,
                        subplot_titles=("norm ||S||", "effective rank exp(H(σ))", "change per token"))
    for row, (y, name) in enumerate(((norm, "norm"), (rank, "effective rank"), (change, "change")), start=1):
        fig.add_trace(go.Scatter(x=labels, y=y, mode="lines+markers", name=name,
                                 hovertemplate=f"%{{x}}<br>{name} %{{y:.4g}}<extra></extra>"), row=row, col=1)
    _mark(fig, selected, start, len(labels))
    fig.update_layout(title=f"Layer {layer}, head {head}: the state over the text", showlegend=False,
                      **{**LAYOUT, "height": 560})
    fig.update_xaxes(type="category", tickangle=-60, row=3, col=1)
    return fig


def matrix_attention(alpha: np.ndarray, carried_norm: np.ndarray, token_texts, start: int, title: str) -> go.Figure:
    """alpha [n, n] signed weights (not a softmax); the first column: the norm of the output part
    carried in from before the window."""
    labels = _token_labels(token_texts, start)
    limit = float(np.abs(alpha).max()) or 1.0
    fig = make_subplots(rows=1, cols=2, column_widths=[0.06, 0.94], horizontal_spacing=0.02, shared_yaxes=True)
    fig.add_trace(go.Heatmap(z=carried_norm[:, None], x=["(memory before)"], y=labels, colorscale="Greys",
                             showscale=False, hovertemplate="output at %{y}<br>|carried-in part| %{z:.4g}<extra></extra>"),
                  row=1, col=1)
    fig.add_trace(go.Heatmap(z=alpha, x=labels, y=labels, colorscale="RdBu", zmid=0, zmin=-limit, zmax=limit,
                             colorbar=dict(title="α"),
                             hovertemplate="output at %{y}<br>weight of %{x}'s value: %{z:.4g}<extra></extra>"),
                  row=1, col=2)
    fig.update_layout(title=title, **{**LAYOUT, "height": 580})
    fig.update_xaxes(type="category", tickangle=-60, row=1, col=2)
    fig.update_yaxes(type="category", autorange="reversed", row=1, col=1)
    return fig


def patch_recovery(result) -> go.Figure:
    labels = _token_labels([result.token_texts[p] for p in result.positions], result.position)
    z = np.clip(np.nan_to_num(result.recovery, nan=0.0), -1.0, 2.0)
    fig = go.Figure(go.Heatmap(z=z, x=labels, y=result.labels, colorscale="RdBu", zmid=0, zmin=-1, zmax=1.5,
                               colorbar=dict(title="recovery"),
                               customdata=np.broadcast_to(np.array(result.clean_top_texts, dtype=object),
                                                          result.recovery.shape),
                               hovertemplate="restore %{y}<br>at %{x}: %{z:.3f} of the clean prediction "
                                             "%{customdata!r}<extra></extra>"))
    fig.update_layout(title=f"Restored from the clean run after token {result.position}: how much of the clean "
                            "prediction returns (1 = all)", **{**LAYOUT, "height": max(360, 26 * len(result.labels) + 200)})
    fig.update_xaxes(title="prediction after token", type="category", tickangle=-60)
    fig.update_yaxes(title="restored part", type="category", autorange="reversed")
    return fig


def restore_sweep_heatmap(sweep) -> go.Figure:
    labels = _token_labels([sweep.token_texts[p] for p in sweep.positions], sweep.positions[0])
    z = np.clip(np.nan_to_num(sweep.recovery, nan=0.0), -1.0, 2.0)
    fig = go.Figure(go.Heatmap(z=z, x=labels, y=sweep.labels, colorscale="Purples", zmin=0, zmax=1,
                               colorbar=dict(title="recovery"),
                               hovertemplate="restore %{y} after %{x}<br>recovery %{z:.3f}<extra></extra>"))
    fig.update_layout(title=f"Causal trace by restoring: p({sweep.answer_text!r}) after token {sweep.target} "
                            f"(clean {np.exp(sweep.clean_log_prob):.3f}, corrupted {np.exp(sweep.corrupt_log_prob):.3f})",
                      **{**LAYOUT, "height": max(360, 26 * len(sweep.labels) + 200)})
    fig.update_xaxes(title="restored just after reading", type="category", tickangle=-60)
    fig.update_yaxes(title="layer", type="category", autorange="reversed")
    return fig
