"""Model panel: what is loaded and how it runs, switching among the models folder's checkpoints,
downloads. Locked (shown, not changeable) for public deployments."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import gradio as gr

from ..serving.engine import DEMO_CHECKPOINTS, KNOWN_CHECKPOINTS
from .common import friendly_error

BACKEND_NAMES = {"cpu": "C++", "cuda": "CUDA", "reference": "PyTorch reference"}


def model_markdown(engine) -> str:
    loaded = engine.current
    if loaded is None:
        return "**No model loaded.** Choose a checkpoint and press Load."
    i = loaded.describe()
    step = i["step"]
    step = step.replace("cpu", "fused C++", 1) if step.startswith("cpu") else BACKEND_NAMES.get(step, step)
    notes = "".join(f"<br>⚠ {note}" for note in i["notes"])
    gemm = {"native": "native bf16 GEMM", "upcast": "fp32 GEMM on converted weights"}.get(i["gemm"], i["gemm"] + " GEMM")
    if i["gemm_reason"]:
        gemm += f" ({i['gemm_reason']})"
    s = engine.scheduler.status()
    heads = f", {i['n_head']} heads of {i['head_size']}" if "n_head" in i else ""
    state = f" · state {i['state_bytes'] / 1e6:.2f} MB per conversation"
    return (f"**{i['name']}** — {i['architecture']}, {i['n_layer']} layers × {i['n_embd']} wide{heads}, "
            f"vocab {i['vocab_size']:,}, "
            f"{i['parameters'] / 1e6:.1f} M parameters · {i['dtype']} on {i['device']} · tokenizer: {i['tokenizer']}"
            f"{state}"
            f"<br>Backends: WKV {BACKEND_NAMES.get(i['wkv'], i['wkv'])} · one-token step {step} · "
            f"sampler {BACKEND_NAMES.get(i['sampler'], i['sampler'])} · SIMD {i['simd']}"
            f"<br>Prompts: read in chunks of {i['chunk_len']} tokens, {gemm}"
            f"<br>Serving: up to {s['max_active']} generations at once, {s['max_queue']} waiting"
            + notes)


def on_load(engine, name, progress=gr.Progress()):
    if engine.settings.lock_models:
        return model_markdown(engine), "The model is fixed on this server."
    if not name:
        return model_markdown(engine), "Choose a checkpoint first."
    try:
        path = engine.resolve_choice(name)
        engine.load(path, progress=lambda msg, frac: progress(frac, desc=msg))
        return model_markdown(engine), f"Loaded {name}. Conversations started with another model start over."
    except Exception as exc:  # shown, never raised into a traceback
        return model_markdown(engine), friendly_error(exc)


def on_selftest(engine):
    """Every kernel against its reference on this machine (python -m rwkv_playground.selftest),
    run by the scheduler like any model work."""
    from ..selftest import run, table

    ticket = engine.scheduler.submit_task(lambda runtime: run(), label="self-test")
    try:
        rows = ticket.wait()
    except Exception as exc:
        return friendly_error(exc)
    bad = [r for r in rows if not r.ok]
    verdict = (f"**All {len(rows)} checks passed.**" if not bad else
               f"**{len(bad)} of {len(rows)} checks failed**: please attach this table to a bug report.")
    return verdict + "\n\n" + table(rows)


def on_refresh(engine):
    return gr.Dropdown(choices=engine.list_models())


def on_download(engine, label, progress=gr.Progress(track_tqdm=True)):  # shows huggingface_hub's own bar
    if engine.settings.lock_models:
        return gr.Dropdown(), "The model is fixed on this server."
    if not label:
        return gr.Dropdown(), "Choose a checkpoint to download."
    try:
        name = engine.download(label, progress=lambda msg, frac: progress(frac, desc=msg))
        return gr.Dropdown(choices=engine.list_models(), value=name), f"Downloaded {name}: press Load."
    except Exception as exc:
        return gr.Dropdown(), friendly_error(exc)


G1_HINT = ("For an assistant that follows instructions, load a G1 model: "
           "`python app.py --model rwkv7-g1a-0.4b-20250905-ctx4096.pth` (or put it in `--models-dir` and "
           "pick it under **Model** below).")


def model_banner(engine) -> str:
    """One line at the top of the page: the model loaded now and what to expect of it."""
    loaded = engine.current
    if loaded is None:
        return "No model is loaded: open **Model** below and load one."
    i = loaded.describe()
    line = f"Model: **{Path(i['name']).name}** ({i['architecture']}, {i['parameters'] / 1e6:,.0f} M parameters)."
    if Path(i["name"]).stem in {p.stem for p in DEMO_CHECKPOINTS}:
        line += (" A tiny demo trained by this project on Shakespeare's plays: it continues text in their "
                 "style (names, speeches) and does not follow instructions, so a chat or a blog post reads "
                 "like a play. " + G1_HINT)
    return line


def current_choice(engine, names: list[str]) -> str | None:
    return engine.current.name if engine.current and engine.current.name in names else None


def on_visit(engine):
    """A page opened: the banner and the panel show the model loaded now (it may have been
    switched since the server started), and the list ticks it."""
    names = engine.list_models()
    return model_banner(engine), model_markdown(engine), gr.Dropdown(choices=names, value=current_choice(engine, names))


def build(engine):
    locked = engine.settings.lock_models
    banner = gr.Markdown(model_banner(engine), elem_id="model-banner")
    with gr.Accordion("Model", open=False, elem_id="model-panel"):
        info = gr.Markdown(model_markdown(engine), elem_id="model-info")
        names = engine.list_models()
        current = current_choice(engine, names)
        with gr.Row(visible=not locked):
            choice = gr.Dropdown(names, value=current, label="Checkpoint (models folder)", elem_id="model-choice",
                                 scale=3)
            load_btn = gr.Button("Load", elem_id="model-load", scale=1)
            refresh_btn = gr.Button("↻ Refresh list", elem_id="model-refresh", scale=1)
        with gr.Row(visible=not locked):
            known = gr.Dropdown(list(KNOWN_CHECKPOINTS), label="Download a released RWKV-4 checkpoint",
                                elem_id="model-known", scale=3)
            download_btn = gr.Button("Download", elem_id="model-download", scale=1)
        status = gr.Markdown("The model is fixed on this server (public deployment)." if locked else "",
                             elem_id="model-status")
        with gr.Accordion("Self-test: every kernel against its reference on this machine", open=False):
            selftest_btn = gr.Button("Run the self-test", elem_id="model-selftest")
            selftest_out = gr.Markdown("", elem_id="model-selftest-result")
    selftest_btn.click(partial(on_selftest, engine), None, [selftest_out], api_name="selftest",
                       concurrency_id="selftest", concurrency_limit=1)
    if not locked:
        load_btn.click(partial(on_load, engine), [choice], [info, status], api_name="load_model",
                       concurrency_id="switch", concurrency_limit=1).then(
            partial(model_banner, engine), None, [banner], queue=False, api_visibility="private")
        refresh_btn.click(partial(on_refresh, engine), None, [choice], queue=False, api_visibility="private")
        download_btn.click(partial(on_download, engine), [known], [choice, status], api_name="download_model",
                           concurrency_id="switch", concurrency_limit=1)
    return banner, info, choice
