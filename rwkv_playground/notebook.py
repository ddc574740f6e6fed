"""A notebook: a column of cells over one recurrent state (no Gradio here).

A cell is either text the model reads, or a generation (its own sampling settings, seed, token
limit and stop strings) whose output the model has read too. Each cell runs from the state left by
the cell above, and the state (and logits) after every cell is kept: editing cell k re-runs cells
k..n only, starting from the state kept after cell k-1. An RNN makes this cheap: a kept state is a
few vectors per layer whatever the length of the text above it.

Who runs the model is a *driver*: `RuntimeDriver` (the calling thread, alone on the model: scripts,
Jupyter) or the app's scheduler (`EngineDriver`, ui/notebook_tab.py). Both read text in chunks and
step generations token by token the same way, so a notebook gives the same text for the same seeds
either way, bit for bit.

Files: `Notebook.save` writes JSON (cells, settings, seeds, outputs, the model's fingerprint);
states are recomputed on load unless saved with `include_states=True` (a .safetensors file beside).
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file

from .errors import GenerationError, LoadError
from .generation import Generation, Stream
from .sampling import SamplingSettings
from .serving.sessions import Session, follow_generation, run_task
from .state import State
from .serving.store import Document, RunningDigest, StoreError

FORMAT = "rwkv-playground-notebook"
VERSION = 1
KINDS = ("text", "generate")
MAX_CELLS = 1000


@dataclass
class Branch:
    """One continuation of a generate cell from the same state (see Notebook.fork)."""

    seed: int
    output: str
    tokens: list[int]
    state: State
    logits: torch.Tensor


@dataclass
class Cell:
    kind: str  # "text" | "generate"
    source: str = ""  # text cells: what the model reads
    settings: dict = field(default_factory=lambda: asdict(SamplingSettings()))  # generate cells (seed included)
    max_tokens: int = 60
    stop: tuple[str, ...] = ()
    output: str = ""  # generate cells: what was written (and read into the state)
    tokens: list[int] = field(default_factory=list)  # what this cell added to the state
    state: State | None = None  # after this cell (None: not run, or dropped to save memory)
    logits: torch.Tensor | None = None
    fresh: bool = False  # output and state follow from the current cells above and this one
    branches: list[Branch] = field(default_factory=list)

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise GenerationError(f"A cell is 'text' or 'generate', not '{self.kind}'.")
        if self.kind == "generate":
            SamplingSettings(**self.settings).validate()
            if not 1 <= int(self.max_tokens) <= 100_000:
                raise GenerationError("A generate cell writes between 1 and 100000 tokens.")

    def nbytes(self) -> int:
        size = self.state.nbytes() if self.state is not None else 0
        size += self.logits.numel() * 4 if self.logits is not None else 0
        return size + sum(b.state.nbytes() + b.logits.numel() * 4 for b in self.branches)

    def as_dict(self) -> dict:
        return {"kind": self.kind, "source": self.source, "settings": dict(self.settings),
                "max_tokens": int(self.max_tokens), "stop": list(self.stop), "output": self.output}


@dataclass
class RunReport:
    """What a run did: the cells it ran, tokens the model processed, tokens the kept states saved."""

    cells_run: list[int] = field(default_factory=list)
    tokens_read: int = 0
    tokens_saved: int = 0
    stopped: int | None = None  # the cell a Stop ended the run in

    def sentence(self) -> str:
        if self.stopped is not None:
            return (f"Stopped in cell {self.stopped + 1}: its text so far is kept (and is what its state read); "
                    "run it again to write it whole.")
        if not self.cells_run:
            return "Nothing to run: every cell is up to date."
        first, last = self.cells_run[0] + 1, self.cells_run[-1] + 1
        cells = f"cell {first}" if first == last else f"cells {first}-{last}"
        return (f"Ran {cells}: {self.tokens_read} tokens read or written; {self.tokens_saved} tokens above were "
                "not read again (kept state).")


def read_task(runtime, tokens: list[int], state: State | None):
    """Read tokens from a state (a copy) in chunks, as a scheduler task: yields (fraction, message),
    returns (logits after the last token, the state after it)."""
    current = state.clone() if state is not None else runtime.new_state()
    logits = None
    for start in range(0, len(tokens), runtime.chunk_len):
        chunk = tokens[start:start + runtime.chunk_len]
        logits, current = runtime.forward(chunk, current, inplace=True)
        yield (start + len(chunk)) / len(tokens), f"Read {start + len(chunk)} of {len(tokens)} tokens"
    return logits, current


class RuntimeDriver:
    """Runs a notebook on a runtime in the calling thread (scripts, Jupyter)."""

    def __init__(self, runtime, tokenizer):
        self.runtime, self.tokenizer = runtime, tokenizer
        self.sampler_kernel = runtime.sampler_kernel

    def read(self, tokens, state):
        return (yield from read_task(self.runtime, tokens, state))

    def generate(self, generation: Generation):
        """Yields the text so far."""
        for piece in Stream(self.runtime, generation):
            if piece:
                yield generation.text

    def generate_many(self, generations: list[Generation]) -> None:
        for gen in generations:
            for _ in Stream(self.runtime, gen):
                pass


class EngineDriver:
    """Runs a notebook through the engine's scheduler, for one visitor's session: reading and
    generating interleave with everyone else's work, and a fork's continuations run batched."""

    def __init__(self, engine, session: Session):
        loaded = engine.require()
        self.engine, self.session = engine, session
        self.tokenizer, self.sampler_kernel = loaded.tokenizer, loaded.runtime.sampler_kernel

    def read(self, tokens, state):
        """Yields progress; returns (logits, state), or None when Stop ended the reading."""
        result = None
        for event in run_task(self.session, self.engine, lambda runtime: read_task(runtime, tokens, state),
                              label="notebook"):
            if event.kind == "progress":
                yield event.value
            elif event.kind == "done":
                result = event.value
        return result

    def generate(self, generation: Generation):
        yield from follow_generation(self.session, self.engine, generation)

    def generate_many(self, generations: list[Generation]) -> None:
        tickets = [self.engine.scheduler.submit_generation(g, label="notebook fork") for g in generations]
        for ticket in tickets:
            for _ in self.session.follow(ticket):
                pass


class Notebook:
    def __init__(self, fingerprint: str = ""):
        self.cells: list[Cell] = []
        self.fingerprint = fingerprint
        self.read_only = False  # opened from a file made for another model

    # ---- editing (never runs the model) -------------------------------------------------------
    def add(self, kind: str = "text", index: int | None = None, **fields) -> Cell:
        if len(self.cells) >= MAX_CELLS:
            raise GenerationError(f"A notebook holds at most {MAX_CELLS} cells.")
        cell = Cell(kind, **fields)
        cell.validate()
        index = len(self.cells) if index is None else max(0, min(int(index), len(self.cells)))
        self.cells.insert(index, cell)
        self.mark_stale(index)
        return cell

    def edit(self, index: int, **fields) -> None:
        """Change a cell (source, settings, max_tokens, stop, kind): it and every cell below must run again."""
        cell = self.cell(index)
        for name, value in fields.items():
            if name not in ("kind", "source", "settings", "max_tokens", "stop"):
                raise GenerationError(f"A cell has no '{name}'.")
            setattr(cell, name, tuple(value) if name == "stop" else value)
        cell.validate()
        self.mark_stale(index)

    def delete(self, index: int) -> None:
        self.cell(index)
        del self.cells[index]
        self.mark_stale(index)

    def mark_stale(self, index: int) -> None:
        for cell in self.cells[index:]:
            cell.fresh = False
            cell.branches = []

    def cell(self, index: int) -> Cell:
        """Cell `index` (0 = the first), or one sentence saying there is no such cell."""
        if not 0 <= int(index) < len(self.cells):
            raise GenerationError(f"There is no cell {int(index) + 1} (the notebook has {len(self.cells)}).")
        return self.cells[int(index)]

    # ---- state ------------------------------------------------------------------------------------
    def text(self, upto: int | None = None) -> str:
        """The whole text the state has read, cell after cell."""
        cells = self.cells if upto is None else self.cells[:upto + 1]
        return "".join(c.source if c.kind == "text" else c.output for c in cells)

    def state_before(self, index: int) -> tuple[State | None, torch.Tensor | None]:
        if index == 0:
            return None, None
        above = self.cells[index - 1]
        return above.state, above.logits

    def memory_items(self) -> list[tuple[str, int]]:
        return [(f"cell {i + 1}", c.nbytes()) for i, c in enumerate(self.cells) if c.nbytes()]

    def summary(self) -> list[dict]:
        """The cells as plain data (the app's API, notebooks, tests): text, settings, whether each is
        up to date, the tokens it added, whether its state is kept, and its branches."""
        return [{**c.as_dict(), "index": i, "fresh": c.fresh, "tokens": len(c.tokens), "state_kept": c.state is not None,
                 "branches": [{"seed": b.seed, "output": b.output} for b in c.branches]}
                for i, c in enumerate(self.cells)]

    def drop_state(self, index: int) -> None:
        """Free a kept state (the memory budget's call); it is recomputed when needed."""
        cell = self.cells[index]
        cell.state, cell.logits, cell.branches = None, None, []

    # ---- running ----------------------------------------------------------------------------------
    def run(self, driver, upto: int | None = None, report: RunReport | None = None) -> Iterator[tuple[int, str]]:
        """Run every cell that needs it, from the first stale one down to `upto` (default: the last).
        Yields (cell index, its text so far) while it runs; the report says what ran."""
        if self.read_only:
            raise GenerationError("This notebook was made with another model: it is open read-only.")
        if not self.cells:
            raise GenerationError("The notebook is empty: add a cell first.")
        upto = len(self.cells) - 1 if upto is None else int(upto)
        self.cell(upto)
        report = report if report is not None else RunReport()
        start = next((i for i in range(upto + 1) if not self.cells[i].fresh), None)
        if start is None:
            return
        # a dropped state above: restart at the last cell whose state is still kept
        while start > 0 and self.cells[start - 1].state is None:
            start -= 1
            self.cells[start].fresh = False
        before, _ = self.state_before(start)
        report.tokens_saved = before.token_count if before is not None else 0
        for i in range(start, upto + 1):
            yield from self._run_cell(driver, i, report)
            if report.stopped is not None:
                break

    def _run_cell(self, driver, index: int, report: RunReport):
        cell = self.cells[index]
        state, logits = self.state_before(index)
        if cell.kind == "text":
            cell.tokens = driver.tokenizer.encode(cell.source) if cell.source else []
            if cell.tokens:
                result = yield from _relay(index, cell.source, driver.read(cell.tokens, state))
                if result is None:  # stopped while reading: the cell has no state yet
                    cell.state, cell.logits, report.stopped = None, None, index
                    return
                cell.logits, cell.state = result
            else:  # an empty text cell passes the state on
                cell.state, cell.logits = state, logits
            report.tokens_read += len(cell.tokens)
        else:
            if logits is None:
                raise GenerationError(f"Cell {index + 1} writes from the text above it: add a text cell first.")
            gen = self._generation(driver, cell, state, logits, cell.settings.get("seed"))
            for text in driver.generate(gen):
                yield index, text
            cell.output, cell.tokens, cell.state, cell.logits = gen.text, list(gen.tokens), gen.state, gen.last_logits
            report.tokens_read += len(gen.tokens)
            if gen.stats.stop_reason in ("cancelled", "closed", "model_switched"):  # Stop: keep the partial text, in sync
                report.stopped = index  # with its state; the cell stays to be run again
                yield index, cell.output
                return
        cell.fresh, cell.branches = True, []
        report.cells_run.append(index)
        for below in self.cells[index + 1:]:
            below.fresh = False
        yield index, cell.source if cell.kind == "text" else cell.output

    @staticmethod
    def _generation(driver, cell: Cell, state, logits, seed) -> Generation:
        settings = SamplingSettings(**{**cell.settings, "seed": seed})
        return Generation(driver.tokenizer, [], state=state, logits=logits, settings=settings,
                          max_tokens=int(cell.max_tokens), stop=tuple(cell.stop),
                          sampler_kernel=getattr(driver, "sampler_kernel", None))

    def fork(self, driver, index: int, seeds: list[int]) -> list[Branch]:
        """Continuations of generate cell `index` from the same state, one per seed (run together
        when the driver batches them). Shown side by side; `keep` makes one the cell's output."""
        cell = self.cell(index)
        if cell.kind != "generate":
            raise GenerationError("Only a generate cell can be forked.")
        if not seeds or len(seeds) > 8:
            raise GenerationError("Fork into 1 to 8 continuations.")
        if index > 0 and not self.cells[index - 1].fresh or self.state_before(index)[1] is None:
            for _ in self.run(driver, upto=index - 1 if index > 0 else 0):
                pass
        state, logits = self.state_before(index)
        gens = [self._generation(driver, cell, state, logits, int(seed)) for seed in seeds]
        driver.generate_many(gens)
        cell.branches = [Branch(int(s), g.text, list(g.tokens), g.state, g.last_logits) for s, g in zip(seeds, gens)]
        return cell.branches

    def keep(self, index: int, branch: int) -> None:
        """Make a branch the cell's output (its seed becomes the cell's); the cells below run again."""
        cell = self.cell(index)
        if not 0 <= branch < len(cell.branches):
            raise GenerationError("There is no such branch.")
        chosen = cell.branches[branch]
        cell.settings = {**cell.settings, "seed": chosen.seed}
        cell.output, cell.tokens, cell.state, cell.logits = chosen.output, chosen.tokens, chosen.state, chosen.logits
        cell.fresh, cell.branches = True, []
        for below in self.cells[index + 1:]:
            below.fresh = False
            below.branches = []

    # ---- files ------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, include_states: bool = False) -> list[Path]:
        """JSON of the cells (and with include_states, their states in a .safetensors file beside)."""
        path = Path(path)
        data = {"format": FORMAT, "version": VERSION, "model_fingerprint": self.fingerprint,
                "cells": [c.as_dict() for c in self.cells]}
        path.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")
        written = [path]
        if include_states:
            tensors = {}
            for i, c in enumerate(self.cells):
                if c.state is not None and c.fresh:
                    tensors.update({f"{i}.{name}": t.contiguous() for name, t in c.state.tensors().items()})
                    tensors[f"{i}.logits"] = c.logits.float().contiguous()
                    tensors[f"{i}.tokens"] = torch.tensor(c.tokens + [c.state.token_count], dtype=torch.long)
            states = path.with_suffix(".states.safetensors")
            save_file(tensors, str(states), metadata={"format": FORMAT, "fingerprint": self.fingerprint})
            written.append(states)
        return written

    @classmethod
    def load(cls, path: str | os.PathLike, fingerprint: str, read_only: bool = False) -> "Notebook":
        """Open a notebook file for the model with `fingerprint`. A notebook made for another model
        is refused with one sentence, or opened read-only (outputs shown, nothing runs)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") != FORMAT:
                raise ValueError("not a notebook")
            cells = [Cell(c["kind"], source=c.get("source", ""), settings=dict(c.get("settings") or {}),
                          max_tokens=int(c.get("max_tokens", 60)), stop=tuple(c.get("stop", ())),
                          output=c.get("output", "")) for c in data["cells"]]
            for c in cells:
                c.settings = asdict(SamplingSettings(**c.settings))
                c.validate()
        except (OSError, ValueError, KeyError, TypeError, GenerationError) as exc:
            raise LoadError(f"{path.name} is not a notebook file of this app ({exc}).") from None
        notebook = cls(fingerprint)
        notebook.cells = cells
        if data.get("model_fingerprint") and fingerprint and data["model_fingerprint"] != fingerprint:
            if not read_only:
                raise LoadError(f"{path.name} was made with another model: load that model, or open it read-only.")
            notebook.read_only = True
            return notebook
        states = path.with_suffix(".states.safetensors")
        if states.exists():
            notebook._restore_states(states)
        return notebook

    def _restore_states(self, path: Path) -> None:
        tensors = load_file(str(path))
        for i, cell in enumerate(self.cells):
            if f"{i}.aa" not in tensors:
                break
            *tokens, count = tensors[f"{i}.tokens"].tolist()
            parts = {name: tensors[f"{i}.{name}"] for name in ("att_x", "aa", "bb", "pp", "ffn_x")}
            cell.state = State(**parts, token_count=int(count), fingerprint=self.fingerprint)
            cell.logits, cell.tokens, cell.fresh = tensors[f"{i}.logits"], tokens, True


class NotebookSession(Session):
    """One visitor's notebook in the app. Its kept states are accounted in the memory budget and
    capped per notebook (`trim`): past the cap, the states cheapest to recompute go first."""

    kind = "notebook"

    def __init__(self, fingerprint: str = ""):
        super().__init__()
        self.notebook = Notebook(fingerprint)
        self.pending: tuple[int, str] | None = None  # while a generate cell runs: (its index, its text so far)

    # ---- the session store (sessions.Session) ------------------------------------------------
    def document(self, with_states: bool = True) -> Document | None:
        notebook = self.notebook
        if not notebook.cells and not self.stored:
            return None
        cells, slots, states, digest = [], {}, {}, RunningDigest(notebook.fingerprint)
        for i, cell in enumerate(notebook.cells):
            data = {**cell.as_dict(), "tokens": list(cell.tokens), "fresh": cell.fresh}
            if self.pending is not None and self.pending[0] == i:
                data.update(output=self.pending[1], fresh=False, interrupted=True)
            cells.append(data)
            if with_states and cell.fresh and data["fresh"]:
                slots[f"cell {i}"] = digest.update(cell.tokens).hexdigest()
                if cell.state is not None:
                    states[f"cell {i}"] = (cell.state, cell.logits)
        if not self.title:
            first = next((c.source for c in notebook.cells if c.kind == "text" and c.source.strip()), "")
            self.title = " ".join(first.split())[:60]
        self.stored = True
        return Document("notebook", {"version": 1, "title": self.title, "cells": cells},
                        self.title or "Untitled notebook", self.doc_id, notebook.fingerprint, slots, states)

    def open_document(self, doc: Document, fingerprint: str) -> None:
        """Hold a stored notebook, with the states the store kept for it (a notebook made with
        another model opens read-only). A cell a crash cut comes back with its text so far, to be
        run again."""
        if self.busy:
            raise GenerationError("The notebook is running: wait for it, or press Stop first.")
        try:
            cells = []
            for c in doc.body["cells"]:
                cell = Cell(str(c["kind"]), source=str(c.get("source", "")), settings=dict(c.get("settings") or {}),
                            max_tokens=int(c.get("max_tokens", 60)), stop=tuple(c.get("stop", ())),
                            output=str(c.get("output", "")), tokens=[int(t) for t in c.get("tokens", [])],
                            fresh=bool(c.get("fresh")))
                cell.settings = asdict(SamplingSettings(**cell.settings))
                cell.validate()
                cells.append(cell)
        except (KeyError, TypeError, ValueError, AttributeError, GenerationError) as exc:
            raise StoreError(f"That notebook could not be read back ({type(exc).__name__}).") from None
        notebook = Notebook(doc.fingerprint or fingerprint)
        notebook.cells = cells
        self.notebook, self.doc_id, self.title, self.stored, self.pending = notebook, doc.id, doc.title, True, None
        if doc.fingerprint and fingerprint and doc.fingerprint != fingerprint:
            notebook.read_only = True
            return
        for i, cell in enumerate(cells):
            if not cell.fresh:
                notebook.mark_stale(i)
                break
        self.restore_states()

    def restore_states(self) -> int:
        """Read back from the store the states of up-to-date cells that memory does not hold (not
        run yet since a visit, or dropped by the memory budget); returns how many came back."""
        if self.visitor is None or self.notebook.read_only:
            return 0
        digest, restored = RunningDigest(self.notebook.fingerprint), 0
        for i, cell in enumerate(self.notebook.cells):
            if not cell.fresh:
                break
            digest.update(cell.tokens)
            if cell.state is None:
                held = self.stored_state(f"cell {i}", digest.hexdigest())
                if held is not None:
                    cell.state, cell.logits = held
                    restored += 1
        return restored

    store_kind = "notebook"

    def open_from(self, doc: Document, loaded) -> None:
        self.open_document(doc, loaded.runtime.fingerprint if loaded is not None else "")

    def new_document(self, fingerprint: str) -> None:
        if self.busy:
            raise GenerationError("The notebook is running: wait for it, or press Stop first.")
        self.notebook, self.title, self.stored, self.pending = Notebook(fingerprint), "", False, None
        self.doc_id = uuid.uuid4().hex

    def memory_items(self) -> list[tuple[str, int]]:
        return self.notebook.memory_items()

    def drop(self, key: str) -> str:
        index = int(key.split()[1]) - 1
        self.notebook.drop_state(index)
        return f"the kept state of notebook cell {index + 1} (it is recomputed when needed)"

    def trim(self, limit_bytes: int, keep: int | None = None) -> int:
        """Drop kept states until the notebook holds at most limit_bytes: branches first, then the
        states whose cells are cheapest to run again (fewest tokens); the state of cell `keep`
        (default: the last cell; during a run, the cell just run, which the next one reads) stays.
        Returns the bytes kept."""
        cells = self.notebook.cells
        keep = len(cells) - 1 if keep is None else keep
        total = sum(c.nbytes() for c in cells)
        for cell in cells:
            if total <= limit_bytes:
                return total
            for branch in cell.branches:
                total -= branch.state.nbytes() + branch.logits.numel() * 4
            cell.branches = []
        for i in sorted((i for i in range(len(cells)) if i != keep), key=lambda i: len(cells[i].tokens)):
            if total <= limit_bytes:
                break
            total -= cells[i].nbytes()
            self.notebook.drop_state(i)
        return total


def _relay(index: int, text: str, task):
    """Yield (index, text) for each step of a task generator; return the task's result."""
    while True:
        try:
            next(task)
        except StopIteration as done:
            return done.value
        yield index, text


def run_all(notebook: Notebook, runtime, tokenizer) -> RunReport:
    """Run every cell that needs it on `runtime` in the calling thread; returns the report."""
    report = RunReport()
    for _ in notebook.run(RuntimeDriver(runtime, tokenizer), report=report):
        pass
    return report
