"""What the tabs share about a visitor's saved documents (conversations, posts, notebooks): the
list to pick from, opening the newest one at a visit, and exports. The store itself is the
engine's (store.py); this only turns it into Gradio updates."""

from __future__ import annotations

import json
import re
import tempfile
import time
from pathlib import Path

import gradio as gr

from ..serving.sessions import Session

NEW = "new"  # the list's value for a document not saved yet


def choices(session: Session | None, kind: str, unsaved_label: str) -> list[tuple[str, str]]:
    """(label, id) of the visitor's documents of `kind`, newest first; the one held now is
    listed (as new) even before anything of it was saved."""
    if session is None or session.visitor is None:
        return []
    docs = session.visitor.documents(kind)
    items, seen = [], {}
    for d in docs:  # the title and the time to the second; documents still alike get a number
        label = f"{d.title} · {time.strftime('%d %b %H:%M:%S', time.localtime(d.updated))}"
        seen[label] = seen.get(label, 0) + 1
        items.append((label if seen[label] == 1 else f"{label} ({seen[label]})", d.id))
    if not any(d.id == session.doc_id for d in docs):
        items.insert(0, (unsaved_label, NEW))
    return items


def listing(session: Session | None, kind: str, unsaved_label: str):
    """The document list as a Dropdown update, with the session's document selected."""
    items = choices(session, kind, unsaved_label)
    ids = {i for _, i in items}
    value = session.doc_id if session is not None and session.doc_id in ids else (NEW if items else None)
    return gr.Dropdown(choices=items, value=value)


def export_files(stem: str, markdown: str, data: dict) -> list[str]:
    """A document as a Markdown and a JSON file to download (a fresh temporary folder)."""
    slug = re.sub(r"[^a-z0-9]+", "-", (stem or "document").lower()).strip("-")[:40] or "document"
    folder = Path(tempfile.mkdtemp(prefix="rwkv-export-"))
    md, js = folder / f"{slug}.md", folder / f"{slug}.json"
    md.write_text(markdown, encoding="utf-8")
    js.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")
    return [str(md), str(js)]
