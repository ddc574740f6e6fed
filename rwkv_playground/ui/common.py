"""Helpers shared by the tabs: sampling controls, readable errors, stats lines."""

from __future__ import annotations

import logging

import gradio as gr

from ..errors import PlaygroundError
from ..sampling import SamplingSettings

log = logging.getLogger("rwkv_playground.ui")
MAX_TOKENS_CAP = 8192  # per request from the browser; the engine's own limit is higher


def sampling_controls(prefix: str, temperature=1.0, top_p=0.7, presence=0.4, count=0.4, decay=0.996,
                      max_tokens=300, max_tokens_cap=MAX_TOKENS_CAP):
    """The sampling sliders of a tab, in a fixed order (see settings_from)."""
    with gr.Accordion("Sampling", open=False):
        with gr.Row():
            t = gr.Slider(0.0, 3.0, value=temperature, step=0.05, label="Temperature",
                          info="0 = always the most likely token", elem_id=f"{prefix}-temperature")
            p = gr.Slider(0.0, 1.0, value=top_p, step=0.01, label="Top-p", elem_id=f"{prefix}-top-p")
            k = gr.Slider(0, 200, value=0, step=1, label="Top-k (0 = off)", elem_id=f"{prefix}-top-k")
        with gr.Row():
            pres = gr.Slider(0.0, 2.0, value=presence, step=0.05, label="Presence penalty",
                             elem_id=f"{prefix}-presence")
            cnt = gr.Slider(0.0, 2.0, value=count, step=0.05, label="Count penalty", elem_id=f"{prefix}-count")
            dec = gr.Slider(0.9, 1.0, value=decay, step=0.001, label="Penalty decay", elem_id=f"{prefix}-decay")
        with gr.Row():
            mx = gr.Slider(1, max_tokens_cap, value=max_tokens, step=1, label="Max tokens",
                           elem_id=f"{prefix}-max-tokens")
            seed = gr.Number(value=-1, precision=0, label="Seed (-1 = random)", elem_id=f"{prefix}-seed")
    return [t, p, k, pres, cnt, dec, mx, seed]


def settings_from(temperature, top_p, top_k, presence, count, decay, max_tokens, seed):
    settings = SamplingSettings(temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
                                presence_penalty=float(presence), count_penalty=float(count),
                                penalty_decay=float(decay),
                                seed=None if seed is None or int(seed) < 0 else int(seed))
    settings.validate()
    max_tokens = max(1, min(int(max_tokens), MAX_TOKENS_CAP))  # the browser's value is only a wish
    return settings, max_tokens


def friendly_error(exc: BaseException) -> str:
    """One readable line for the UI; the traceback goes to the server log only."""
    if isinstance(exc, PlaygroundError):
        return f"⚠ {exc}"
    log.exception("Unexpected error in a UI handler", exc_info=exc)
    first = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"⚠ Something went wrong ({type(exc).__name__}{': ' + first if first else ''}). Details are in the server log."


def stats_line(stats: dict) -> str:
    if not stats:
        return ""
    parts = []
    if "prompt_tokens" in stats:
        read = f"{stats['prompt_tokens']} prompt tokens read"
        if stats["prompt_tokens"] > 1 and stats.get("prompt_tokens_per_second"):
            read += f" ({stats['prompt_tokens_per_second']:.0f} tok/s)"
        parts.append(read)
    if "generated_tokens" in stats:
        parts.append(f"{stats['generated_tokens']} generated")
    if stats.get("tokens_per_second"):
        parts.append(f"{stats['tokens_per_second']:.1f} tok/s")
    if stats.get("tokens_saved"):
        parts.append(f"{stats['tokens_saved']} history tokens reused from the state (not re-read)")
    if stats.get("stop_reason") in ("cancelled", "closed"):
        parts.append("stopped")
    return " · ".join(parts)
