"""Notebook tab: a column of cells over one recurrent state (engine: notebook.py).

A text cell is read by the model; a generate cell writes (its own seed, token limit, sampling
settings). Each cell runs from the state the cell above left, and that state is kept, so editing a
cell re-runs it and the cells below only. The cells are drawn by `gr.render` from the visitor's
NotebookSession whenever `version` changes; handlers are methods of NotebookTab.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from ..errors import GenerationError
from ..inspector.session import InspectorSession
from ..notebook import EngineDriver, Notebook, NotebookSession, RunReport
from ..sampling import SamplingSettings
from ..serving.sessions import Session
from . import documents
from .common import ensure_session, friendly_error, session_state, with_notices

FORK_SEEDS = 3
DEFAULT_STOP = ("\n\n",)  # a new generate cell writes one paragraph (one speech, on the demo model)


def format_stops(stops) -> str:
    """Stop strings as one line a visitor can edit: comma-separated, line breaks and tabs shown as
    \\n and \\t (a backslash or comma inside a stop string is escaped with a backslash)."""
    return ", ".join(s.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace(",", "\\,")
                     for s in stops)


def parse_stops(text: str) -> tuple[str, ...]:
    """The inverse of format_stops: '\\n\\n, THE END' -> ('\\n\\n', 'THE END'). Spaces around the
    commas are separators, not part of a stop string."""
    out, current, chars = [], "", iter(text or "")
    for ch in chars:
        if ch == "\\":
            nxt = next(chars, "")
            current += {"n": "\n", "t": "\t"}.get(nxt, nxt)
        elif ch == ",":
            out.append(current.strip(" "))
            current = ""
        else:
            current += ch
    out.append(current.strip(" "))
    return tuple(s for s in out if s)


STARTER = "ROMEO: But soft, what light through yonder window breaks?\n\nJULIET:"


class NotebookTab:
    def __init__(self, engine):
        self.engine = engine

    def session(self, session, request=None) -> NotebookSession:
        loaded = self.engine.require()
        session = ensure_session(self.engine, session,
                                 lambda: NotebookSession(loaded.runtime.fingerprint), request)
        notebook = session.notebook
        if notebook.fingerprint != loaded.runtime.fingerprint and not notebook.read_only:
            notebook.fingerprint = loaded.runtime.fingerprint  # the model was switched: states are stale
            for i in range(len(notebook.cells)):
                notebook.drop_state(i)
            notebook.mark_stale(0)
        return session

    def limit(self) -> int:
        """A notebook keeps states up to a quarter of the server's memory budget."""
        return self.engine.settings.memory_budget_bytes // 4

    # ---- cell edits (no model work) -----------------------------------------------------------
    def on_add(self, kind, session, version, request: gr.Request = None):
        try:
            session = self.session(session, request)
            if kind == "generate":  # each new generate cell its own seed (1, 2, ...): forks and cells differ
                seed = 1 + sum(c.kind == "generate" for c in session.notebook.cells)
                session.notebook.add("generate", settings={**_default_settings(), "seed": seed}, stop=DEFAULT_STOP)
            else:
                session.notebook.add("text", source="" if session.notebook.cells else STARTER)
            session.persist()
            return session, version + 1, f"Added a {kind} cell ({len(session.notebook.cells)} cells)."
        except Exception as exc:
            return session, version, friendly_error(exc)

    def on_edit(self, session, index, version, **fields):
        """A cell's source, limit, stop strings or sampling settings changed: every changed field
        sticks and governs the cell's next run (it and the cells below run again)."""
        try:
            notebook = session.notebook
            cell = notebook.cell(index)
            settings = fields.pop("settings", None)
            changed = {k: v for k, v in fields.items() if v is not None and getattr(cell, k) != v}
            if settings is not None and any(cell.settings.get(k) != v for k, v in settings.items()):
                changed["settings"] = {**cell.settings, **settings}
            if not changed:
                return version, gr.Markdown()
            notebook.edit(index, **changed)
            session.persist()
            below = len(notebook.cells) - index
            return version + 1, f"Cell {index + 1} changed: it and the {below - 1} below it will run again."
        except Exception as exc:
            return version, friendly_error(exc)

    def on_delete(self, session, index, version):
        try:
            session.notebook.delete(index)
            session.persist()
            return version + 1, f"Deleted cell {index + 1}."
        except Exception as exc:
            return version, friendly_error(exc)

    def on_keep(self, session, index, branch, version):
        try:
            session.notebook.keep(index, branch)
            session.persist()
            return version + 1, f"Kept continuation {branch + 1} in cell {index + 1}; the cells below will run again."
        except Exception as exc:
            return version, friendly_error(exc)

    # ---- model work ---------------------------------------------------------------------------
    def on_run(self, session, version, upto=None, from_here=None, request: gr.Request = None):
        """Run what needs running (to `upto`, or from `from_here` to the end). Streams the running
        cell's text; outputs: status, live text, version."""
        try:
            session = self.session(session, request)
            notebook = session.notebook
            if from_here is not None:
                notebook.mark_stale(from_here)
            session.restore_states()  # states the memory budget dropped: from the store, not re-run
            report = RunReport()
            driver = EngineDriver(self.engine, session)
            trimmed = None
            for index, text in notebook.run(driver, upto=upto, report=report):
                if notebook.cells[index].fresh and trimmed != index:  # a cell done: keep within the cap
                    session.trim(self.limit(), keep=index)  # as it goes (a 200-cell run all included)
                    trimmed = index
                    session.pending = None
                    session.persist()  # each finished cell, with its state
                elif notebook.cells[index].kind == "generate":
                    session.pending = (index, text)
                    session.checkpoint()  # the text so far (a crash keeps what was shown)
                yield f"Running cell {index + 1}…", text, version
            session.trim(self.limit())
            session.pending = None
            session.persist()
            session.touch(self.engine)
            yield with_notices(session, report.sentence()), "", version + 1
        except Exception as exc:
            if isinstance(session, NotebookSession):
                session.pending = None
                session.persist()
            yield with_notices(session, friendly_error(exc)) if isinstance(session, Session) else friendly_error(exc), \
                "", version + 1

    def on_stop(self, session):
        """Stop the visitor's running cell (or fork) within one tick; the run's own handler then
        says where it stopped."""
        if isinstance(session, NotebookSession) and session.stop():
            return gr.skip()  # the run's handler writes the status once it has stopped
        return "Nothing is running."

    def on_fork(self, session, index, version, request: gr.Request = None):
        try:
            session = self.session(session, request)
            cell = session.notebook.cell(index)
            base = int(cell.settings.get("seed") or 0)
            seeds = [base] + [base + 1000 * k + 1 for k in range(1, FORK_SEEDS)]
            yield f"Writing {len(seeds)} continuations of cell {index + 1}…", version
            session.notebook.fork(EngineDriver(self.engine, session), index, seeds)
            session.trim(self.limit())
            session.persist()
            session.touch(self.engine)
            yield (f"Cell {index + 1}: {len(seeds)} continuations from the same state (seeds {seeds}); keep one.",
                   version + 1)
        except Exception as exc:
            yield friendly_error(exc), version + 1

    def on_inspect(self, session, inspector, index, request: gr.Request = None):
        """Record cell `index`'s text from the state before it into the visitor's State inspector."""
        try:
            notebook = session.notebook
            cell = notebook.cell(index)
            if not cell.fresh or not cell.tokens:
                raise GenerationError("Run the cell first (and give it some text).")
            before, _ = notebook.state_before(index)
            inspector = ensure_session(self.engine, inspector, InspectorSession, request)
            for _ in inspector.record(self.engine, cell.tokens, before):
                pass
            return inspector, (f"Recorded cell {index + 1} ({len(cell.tokens)} tokens, from the state above it): open "
                               "the State inspector tab and move a slider to see it.")
        except Exception as exc:
            return inspector, friendly_error(exc)

    def on_save_state(self, session, index):
        """Outputs: the state file (shown), status."""
        try:
            cell = session.notebook.cell(index)
            if cell.state is None or not cell.fresh:
                raise GenerationError("Run the cell first: its state is not computed.")
            path = Path(tempfile.mkdtemp(prefix="rwkv-state-")) / f"notebook-cell-{index + 1}.safetensors"
            cell.state.save(path, extra_metadata={"text": session.notebook.text(index)[-2000:]})
            return gr.File(value=str(path), visible=True), f"Saved the state after cell {index + 1}."
        except Exception as exc:
            return gr.File(), friendly_error(exc)

    # ---- files --------------------------------------------------------------------------------
    def on_save(self, session, include_states):
        try:
            if session is None or not session.notebook.cells:
                raise GenerationError("The notebook is empty.")
            folder = Path(tempfile.mkdtemp(prefix="rwkv-notebook-"))
            files = session.notebook.save(folder / "notebook.json", include_states=bool(include_states))
            return [str(f) for f in files], "Saved: open it again with Open."
        except Exception as exc:
            return None, friendly_error(exc)

    def on_open(self, session, file, read_only, version, request: gr.Request = None):
        try:
            session = self.session(session, request)
            if file is None:
                return session, version, gr.Markdown()
            paths = [f if isinstance(f, str) else f.name for f in (file if isinstance(file, list) else [file])]
            main = next((p for p in paths if p.endswith(".json")), None)
            if main is None:
                raise GenerationError("Choose the notebook's .json file (and its .states.safetensors, if saved).")
            states = next((p for p in paths if p.endswith(".states.safetensors")), None)
            if states:  # uploads land in separate folders: put the states beside the notebook
                target = Path(main).with_suffix(".states.safetensors")
                if Path(states) != target:
                    target.write_bytes(Path(states).read_bytes())
            notebook = Notebook.load(main, self.engine.require().runtime.fingerprint, read_only=bool(read_only))
            session.new_document(notebook.fingerprint)  # an opened file is a new notebook of the visitor's
            session.notebook = notebook
            session.persist()
            note = " (made with another model: read-only)" if session.notebook.read_only else ""
            return session, version + 1, f"Opened a notebook of {len(session.notebook.cells)} cells{note}."
        except Exception as exc:
            return session, version, friendly_error(exc)


    # ---- the visitor's notebooks (the session store) -------------------------------------------
    def notebooks(self, session):
        return documents.listing(session if isinstance(session, NotebookSession) else None, "notebook",
                                 "New notebook")

    def visit(self, session: NotebookSession, notice: str = ""):
        """Outputs: session, version (1: draw the cells), status, the list."""
        if session.visitor is not None and not session.notebook.cells:
            session.open_newest(self.engine.current)
        return session, 1, "", self.notebooks(session)

    def _fingerprint(self) -> str:
        loaded = self.engine.current
        return loaded.runtime.fingerprint if loaded is not None else ""

    def on_open_document(self, doc_id, session, version, request: gr.Request = None):
        try:
            session = self.session(session, request)
            if not doc_id or doc_id in (documents.NEW, session.doc_id):
                return session, version, gr.Markdown(), self.notebooks(session)
            if not session.open_stored(doc_id, self.engine.current):
                raise GenerationError("That notebook is not in your saved work.")
            note = " (made with another model: read-only)" if session.notebook.read_only else ""
            return session, version + 1, f"Opened “{session.title}”{note}.", self.notebooks(session)
        except Exception as exc:
            return session, version, friendly_error(exc), self.notebooks(session)

    def on_new_document(self, session, version, request: gr.Request = None):
        try:
            session = self.session(session, request)
            session.new_document(self._fingerprint())
            return session, version + 1, "A new notebook (your others are in the list).", self.notebooks(session)
        except Exception as exc:
            return session, version, friendly_error(exc), self.notebooks(session)

    def on_delete_document(self, session, version, request: gr.Request = None):
        try:
            session = self.session(session, request)
            if session.busy:
                raise GenerationError("The notebook is running: wait for it, or press Stop first.")
            session.delete_stored()
            session.new_document(self._fingerprint())
            session.open_newest(self.engine.current)
            return session, version + 1, "Notebook deleted.", self.notebooks(session)
        except Exception as exc:
            return session, version, friendly_error(exc), self.notebooks(session)

    # ---- the notebook's API (gradio_client): the same handlers, cells by index (0 = the first) ---
    def api_add(self, session, kind: str, source: str, seed: int, max_tokens: int, request: gr.Request = None):
        """Add a cell at the end: kind "text" (the model reads `source`) or "generate" (writes up to
        `max_tokens` with `seed`). Returns the notebook's cells and a status line."""
        try:
            session = self.session(session, request)
            if kind not in ("text", "generate"):
                raise GenerationError(f"A cell is 'text' or 'generate', not '{kind}'.")
            if kind == "text":
                session.notebook.add("text", source=source or "")
            else:
                session.notebook.add("generate", settings={**_default_settings(), "seed": int(seed)},
                                     max_tokens=int(max_tokens), stop=DEFAULT_STOP)
            return session, session.notebook.summary(), f"Added a {kind} cell ({len(session.notebook.cells)} cells)."
        except Exception as exc:
            return session, _summary(session), friendly_error(exc)

    def api_edit(self, session, index: int, source: str, seed: int, max_tokens: int, request: gr.Request = None):
        """Change cell `index`: its text (text cells), or its seed and token limit (generate cells).
        The cell and the cells below it run again at the next run."""
        try:
            session = self.session(session, request)
            cell = session.notebook.cell(int(index))
            fields = ({"source": source} if cell.kind == "text" else
                      {"max_tokens": int(max_tokens), "settings": {"seed": int(seed)}})
            _, status = self.on_edit(session, int(index), 0, **fields)
            return session, session.notebook.summary(), status if isinstance(status, str) else "Nothing changed."
        except Exception as exc:
            return session, _summary(session), friendly_error(exc)

    def api_run(self, session, upto: int, from_here: int, request: gr.Request = None):
        """Run what needs running: every stale cell (upto and from_here -1), up to cell `upto`, or
        from cell `from_here` to the end (re-running it even if up to date). Streams the running
        cell's text; the last update has the cells and the sentence of what was re-read and saved."""
        session = self.session(session, request)
        upto = None if upto is None or int(upto) < 0 else int(upto)
        from_here = None if from_here is None or int(from_here) < 0 else int(from_here)
        for status, live, _ in self.on_run(session, 0, upto=upto, from_here=from_here, request=request):
            yield session, live, _summary(session), status

    def api_fork(self, session, index: int, request: gr.Request = None):
        """Write FORK_SEEDS continuations of generate cell `index` from the same state (batched)."""
        session = self.session(session, request)
        *_, (status, _) = self.on_fork(session, int(index), 0, request)
        return session, session.notebook.summary(), status

    def api_keep(self, session, index: int, branch: int, request: gr.Request = None):
        """Make continuation `branch` (0 = the first) of cell `index` its output."""
        session = self.session(session, request)
        _, status = self.on_keep(session, int(index), int(branch), 0)
        return session, session.notebook.summary(), status


def _summary(session) -> list[dict]:
    return session.notebook.summary() if isinstance(session, NotebookSession) else []


def _default_settings() -> dict:
    return asdict(SamplingSettings(temperature=1.0, top_p=0.8, presence_penalty=0.4, count_penalty=0.4, seed=1))


def build(engine, inspector_state):
    """Returns the notebook's session state."""
    tab = NotebookTab(engine)
    session = session_state(engine)
    version = gr.State(0)
    gr.Markdown("Cells over one recurrent state: each runs from the state the cell above left (kept), so "
                "editing a cell re-runs only it and the cells below.")
    with gr.Row(visible=engine.store is not None, elem_id="nb-documents"):
        notebooks = gr.Dropdown([], allow_custom_value=True, label="Notebook", elem_id="nb-notebooks", scale=4,
                                info="Your notebooks, kept across reloads and restarts")
        new_notebook = gr.Button("+ New notebook", size="sm", elem_id="nb-new", scale=1)
        delete_notebook = gr.Button("Delete", size="sm", variant="stop", elem_id="nb-delete", scale=1)
    with gr.Row():
        add_text = gr.Button("+ Text cell", elem_id="nb-add-text")
        add_gen = gr.Button("+ Generate cell", elem_id="nb-add-generate")
        run_all = gr.Button("Run all", variant="primary", elem_id="nb-run-all")
        stop = gr.Button("Stop", variant="stop", elem_id="nb-stop")
    status = gr.Markdown("", elem_id="nb-status")
    live = gr.Textbox(label="Running", lines=2, interactive=False, elem_id="nb-live")

    # one render at a time, app-wide: renders of several page loads at once mutated Gradio's shared
    # config while another copied it ("dictionary changed size during iteration"); a render is short
    @gr.render(inputs=[session, version], concurrency_limit=1, concurrency_id="notebook-render")
    def cells(nb_session, _version):
        if nb_session is None or not nb_session.notebook.cells:
            gr.Markdown("Add a text cell to start.", elem_id="nb-empty")
            return
        notebook = nb_session.notebook
        for i, cell in enumerate(notebook.cells):
            mark = "✓ up to date" if cell.fresh else "● needs a run"
            with gr.Group(elem_id=f"nb-cell-{i}"):
                gr.Markdown(f"**[{i + 1}] {cell.kind}** · {mark} · {len(cell.tokens)} tokens",
                            elem_id=f"nb-cell-{i}-head")
                if cell.kind == "text":
                    box = gr.Textbox(cell.source, lines=2, show_label=False, interactive=not notebook.read_only,
                                     elem_id=f"nb-cell-{i}-text")
                    box.blur(lambda s, v, text, i=i: tab.on_edit(s, i, v, source=text), [session, version, box],
                             [version, status], api_visibility="private")
                else:
                    gr.Textbox(cell.output, lines=3, show_label=False, interactive=False, elem_id=f"nb-cell-{i}-text")
                    editable = not notebook.read_only  # (inside gr.render Gradio would draw them disabled)
                    with gr.Row():
                        seed = gr.Number(cell.settings.get("seed") or 0, precision=0, label="seed",
                                         interactive=editable, elem_id=f"nb-cell-{i}-seed")
                        limit = gr.Number(cell.max_tokens, precision=0, label="max tokens", interactive=editable,
                                          elem_id=f"nb-cell-{i}-max")
                        temp = gr.Number(cell.settings.get("temperature", 1.0), label="temperature",
                                         interactive=editable, elem_id=f"nb-cell-{i}-temperature")
                        top_p = gr.Number(cell.settings.get("top_p", 0.8), label="top_p", interactive=editable,
                                          elem_id=f"nb-cell-{i}-top-p")
                        stop_at = gr.Textbox(format_stops(cell.stop), label="stop at (comma-separated; \\n = line break)",
                                             interactive=editable, elem_id=f"nb-cell-{i}-stop")
                    for control in (seed, limit, temp, top_p, stop_at):
                        control.blur(lambda s, v, sd, mx, t, p, st, i=i: tab.on_edit(
                            s, i, v, max_tokens=int(mx), stop=parse_stops(st),
                            settings={"seed": int(sd), "temperature": float(t), "top_p": float(p)}),
                            [session, version, seed, limit, temp, top_p, stop_at], [version, status],
                            api_visibility="private")
                with gr.Row():
                    run = gr.Button("Run", size="sm", elem_id=f"nb-cell-{i}-run")
                    run_from = gr.Button("Run from here", size="sm", elem_id=f"nb-cell-{i}-run-from")
                    if cell.kind == "generate":
                        fork = gr.Button(f"Fork ×{FORK_SEEDS}", size="sm", elem_id=f"nb-cell-{i}-fork")
                        fork.click(lambda s, v, i=i: (yield from tab.on_fork(s, i, v)), [session, version],
                                   [status, version], concurrency_id="model",
                                   concurrency_limit=engine.event_concurrency(), api_visibility="private")
                    inspect = gr.Button("Inspect", size="sm", elem_id=f"nb-cell-{i}-inspect")
                    save_state = gr.Button("Save state", size="sm", elem_id=f"nb-cell-{i}-save-state")
                    delete = gr.Button("Delete", size="sm", variant="stop", elem_id=f"nb-cell-{i}-delete")
                state_file = gr.File(visible=False, elem_id=f"nb-cell-{i}-state-file")
                run.click(lambda s, v, i=i: (yield from tab.on_run(s, v, upto=i)), [session, version],
                          [status, live, version], concurrency_id="model", concurrency_limit=engine.event_concurrency(),
                          api_visibility="private")
                run_from.click(lambda s, v, i=i: (yield from tab.on_run(s, v, from_here=i)), [session, version],
                               [status, live, version], concurrency_id="model",
                               concurrency_limit=engine.event_concurrency(), api_visibility="private")
                inspect.click(lambda s, insp, i=i: tab.on_inspect(s, insp, i), [session, inspector_state],
                              [inspector_state, status], concurrency_id="model",
                              concurrency_limit=engine.event_concurrency(), api_visibility="private")
                save_state.click(lambda s, i=i: tab.on_save_state(s, i), [session], [state_file, status],
                                 api_visibility="private")
                delete.click(lambda s, v, i=i: tab.on_delete(s, i, v), [session, version], [version, status],
                             api_visibility="private")
                if cell.branches:
                    with gr.Row(elem_id=f"nb-cell-{i}-branches"):
                        for b, branch in enumerate(cell.branches):
                            with gr.Column():
                                gr.Textbox(branch.output, lines=4, label=f"seed {branch.seed}", interactive=False,
                                           elem_id=f"nb-cell-{i}-branch-{b}")
                                keep = gr.Button("Keep", size="sm", elem_id=f"nb-cell-{i}-keep-{b}")
                                keep.click(lambda s, v, i=i, b=b: tab.on_keep(s, i, b, v), [session, version],
                                           [version, status], api_visibility="private")

    with gr.Row():
        include_states = gr.Checkbox(False, label="Save the states too (else they are recomputed on open)")
        save_btn = gr.Button("Save notebook", elem_id="nb-save")
        saved = gr.File(label="Notebook file", file_count="multiple", elem_id="nb-saved")
    with gr.Row():
        read_only = gr.Checkbox(False, label="Open read-only if made with another model")
        upload = gr.File(label="Open a notebook (.json, with its .states.safetensors if saved)", file_count="multiple",
                         file_types=[".json", ".safetensors"], elem_id="nb-open")

    # The notebook's API for gradio_client (no UI of its own: the cells' buttons call the same handlers)
    with gr.Row(visible=False):
        api_kind, api_source = gr.Textbox(label="kind"), gr.Textbox(label="source")
        api_index, api_branch = gr.Number(0, precision=0, label="index"), gr.Number(0, precision=0, label="branch")
        api_upto, api_from = gr.Number(-1, precision=0, label="upto"), gr.Number(-1, precision=0, label="from_here")
        api_seed, api_max = gr.Number(1, precision=0, label="seed"), gr.Number(60, precision=0, label="max_tokens")
        api_cells, api_status, api_live = gr.JSON(label="cells"), gr.Textbox(label="status"), gr.Textbox(label="text")
        api_button = gr.Button("api")
    model_work = dict(concurrency_id="model", concurrency_limit=engine.event_concurrency())
    api_button.click(tab.api_add, [session, api_kind, api_source, api_seed, api_max], [session, api_cells, api_status],
                     api_name="notebook_add")
    api_button.click(tab.api_edit, [session, api_index, api_source, api_seed, api_max],
                     [session, api_cells, api_status], api_name="notebook_edit")
    api_button.click(tab.api_run, [session, api_upto, api_from], [session, api_live, api_cells, api_status],
                     api_name="notebook_run", **model_work)
    api_button.click(tab.api_fork, [session, api_index], [session, api_cells, api_status], api_name="notebook_fork",
                     **model_work)
    api_button.click(tab.api_keep, [session, api_index, api_branch], [session, api_cells, api_status],
                     api_name="notebook_keep")

    add_text.click(partial(tab.on_add, "text"), [session, version], [session, version, status],
                   api_visibility="private")
    add_gen.click(partial(tab.on_add, "generate"), [session, version], [session, version, status],
                  api_visibility="private")
    run_all_ev = run_all.click(lambda s, v: (yield from tab.on_run(s, v)), [session, version], [status, live, version],
                  concurrency_id="model", concurrency_limit=engine.event_concurrency(), api_visibility="private")
    save_btn.click(tab.on_save, [session, include_states], [saved, status], api_visibility="private")
    # Stop reaches the running cell through its session (the cells' Run buttons are drawn by gr.render,
    # so there is no event to cancel here): the scheduler ends it within one tick, and its handler,
    # still running, shows where it stopped.
    stop.click(tab.on_stop, [session], [status], queue=False, api_name="notebook_stop")
    upload.upload(tab.on_open, [session, upload, read_only, version], [session, version, status],
                  api_visibility="private").then(tab.notebooks, [session], [notebooks], queue=False,
                                                 api_visibility="private")
    listed = [session, version, status, notebooks]
    notebooks.input(tab.on_open_document, [notebooks, session, version], listed, api_name="notebook_open",
                    queue=False)
    new_notebook.click(tab.on_new_document, [session, version], listed, api_name="notebook_new", queue=False)
    delete_notebook.click(tab.on_delete_document, [session, version], listed, api_name="notebook_delete",
                          queue=False)
    run_all_ev.then(tab.notebooks, [session], [notebooks], queue=False, api_visibility="private")
    return SimpleNamespace(session=session, visit=tab.visit, visit_outputs=listed)
