"""Model panel: what is loaded, switching among checkpoints of the models folder, downloads."""

from __future__ import annotations

import gradio as gr

from ..engine import KNOWN_CHECKPOINTS, Engine
from .common import friendly_error


def model_markdown(engine: Engine) -> str:
    if engine.current is None:
        return "**No model loaded.**"
    i = engine.current.describe()
    wkv = {"cpu": "C++ kernel", "cuda": "CUDA kernel", "reference": "PyTorch reference"}.get(i["wkv"], i["wkv"])
    note = f"<br>⚠ {engine.current.model.wkv_note}" if engine.current.model.wkv_note else ""
    return (f"**{i['name']}** — {i['n_layer']} layers × {i['n_embd']} wide, vocab {i['vocab_size']:,}, "
            f"{i['parameters'] / 1e6:.1f} M parameters · {i['dtype']} on {i['device']} · WKV: {wkv} · "
            f"tokenizer: {i['tokenizer']}{note}")


def build(engine: Engine):
    with gr.Accordion("Model", open=False, elem_id="model-panel"):
        info = gr.Markdown(model_markdown(engine), elem_id="model-info")
        names = engine.list_models()
        current = engine.current.name if engine.current and engine.current.name in names else None
        with gr.Row():
            choice = gr.Dropdown(names, value=current,
                                 label="Checkpoint (models folder)", elem_id="model-choice", scale=3)
            load_btn = gr.Button("Load", elem_id="model-load", scale=1)
            refresh_btn = gr.Button("↻ Refresh list", elem_id="model-refresh", scale=1)
        with gr.Row():
            known = gr.Dropdown(list(KNOWN_CHECKPOINTS), label="Download a released RWKV-4 checkpoint",
                                elem_id="model-known", scale=3)
            download_btn = gr.Button("Download", elem_id="model-download", scale=1)
        status = gr.Markdown("", elem_id="model-status")

    def load(name, progress=gr.Progress()):
        if not name:
            return model_markdown(engine), "Choose a checkpoint first."
        try:
            path = engine.resolve_choice(name)
            engine.load(path, progress=lambda msg, frac: progress(frac, desc=msg))
            return model_markdown(engine), f"Loaded {name}. Conversations started with another model are reset."
        except Exception as exc:  # shown, never raised into a traceback
            return model_markdown(engine), friendly_error(exc)

    def refresh():
        return gr.Dropdown(choices=engine.list_models())

    def download(label, progress=gr.Progress(track_tqdm=True)):  # shows huggingface_hub's own bar
        if not label:
            return gr.Dropdown(), "Choose a checkpoint to download."
        try:
            name = engine.download(label, progress=lambda msg, frac: progress(frac, desc=msg))
            return gr.Dropdown(choices=engine.list_models(), value=name), f"Downloaded {name}: press Load."
        except Exception as exc:
            return gr.Dropdown(), friendly_error(exc)

    load_btn.click(load, [choice], [info, status], concurrency_id="model", api_name="load_model")
    refresh_btn.click(refresh, None, [choice], queue=False, api_visibility="private")
    download_btn.click(download, [known], [choice, status], api_name="download_model")
    return info
