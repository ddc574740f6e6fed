"""The notebook (notebook.py): cells over one recurrent state, in process and through the engine.

Cell states equal one pass over the concatenated tokens; a generate cell equals the same
generation run alone; editing cell k re-runs k..n only and equals a fresh run bit for bit; a
saved notebook loaded and run again gives the same text; forks, keeping a branch, dropped states
and the memory cap.
"""

import pytest
import torch

from rwkv_playground import GenerationError, LoadError, generate
from rwkv_playground.notebook import Notebook, NotebookSession, RuntimeDriver, run_all
from rwkv_playground.sampling import SamplingSettings
from rwkv_playground.state import State


@pytest.fixture(scope="module")
def demo(loaded):
    return loaded.runtime, loaded.tokenizer


def settings(seed):
    return {**SamplingSettings(temperature=1.0, top_p=0.8, seed=seed).__dict__}


def make(runtime, cells):
    nb = Notebook(runtime.fingerprint)
    for kind, value in cells:
        if kind == "text":
            nb.add("text", source=value)
        else:
            nb.add("generate", settings=settings(value), max_tokens=20, stop=("\n\n",))
    return nb


CELLS = [("text", "ROMEO: Good night, good night!"), ("text", "\n\nJULIET:"), ("generate", 1),
         ("text", "\n\nROMEO: What say'st thou?\n\nJULIET:"), ("generate", 2)]


def test_cell_states_equal_one_pass_and_generations_equal_running_alone(demo):
    runtime, tok = demo
    nb = make(runtime, CELLS)
    report = run_all(nb, runtime, tok)
    assert report.cells_run == [0, 1, 2, 3, 4] and report.tokens_saved == 0
    tokens = []
    for i, cell in enumerate(nb.cells):
        tokens += cell.tokens
        assert cell.fresh and cell.state.token_count == len(tokens)
        _, expected = runtime.forward(tokens)
        for name, tensor in expected.tensors().items():
            assert torch.allclose(cell.state.tensors()[name], tensor, rtol=1e-4, atol=1e-4), (i, name)
    # a generate cell is exactly the same generation run alone from the state above it
    above = nb.cells[1]
    alone = generate(runtime, tok, [], state=above.state, logits=above.logits,
                     settings=SamplingSettings(**settings(1)), max_tokens=20, stop=("\n\n",))
    assert "".join(alone) == nb.cells[2].output and list(alone.tokens) == nb.cells[2].tokens
    assert nb.text().startswith("ROMEO: Good night, good night!\n\nJULIET:" + nb.cells[2].output)


def test_editing_a_cell_reruns_only_from_it_and_equals_a_fresh_run(demo):
    runtime, tok = demo
    nb = make(runtime, CELLS)
    run_all(nb, runtime, tok)
    kept = [c.output for c in nb.cells[:3]]
    nb.edit(3, source="\n\nROMEO: Wilt thou leave me so unsatisfied?\n\nJULIET:")
    assert [c.fresh for c in nb.cells] == [True, True, True, False, False]
    report = run_all(nb, runtime, tok)
    assert report.cells_run == [3, 4] and report.tokens_saved == nb.cells[2].state.token_count
    assert "2 tokens above" not in report.sentence() and "cells 4-5" in report.sentence()
    fresh = make(runtime, CELLS[:3] + [("text", "\n\nROMEO: Wilt thou leave me so unsatisfied?\n\nJULIET:"),
                                        ("generate", 2)])
    run_all(fresh, runtime, tok)
    assert [c.output for c in fresh.cells] == [c.output for c in nb.cells]
    assert [c.output for c in nb.cells[:3]] == kept
    assert torch.equal(fresh.cells[-1].state.aa, nb.cells[-1].state.aa)  # bit for bit
    assert run_all(nb, runtime, tok).cells_run == []  # nothing stale


def test_fork_keep_and_a_dropped_state(demo):
    runtime, tok = demo
    nb = make(runtime, CELLS)
    run_all(nb, runtime, tok)
    original = nb.cells[2].output
    branches = nb.fork(RuntimeDriver(runtime, tok), 2, [1, 7, 9])
    assert [b.seed for b in branches] == [1, 7, 9] and branches[0].output == original
    nb.keep(2, 2)
    assert nb.cells[2].output == branches[2].output and nb.cells[2].settings["seed"] == 9
    assert not nb.cells[3].fresh and not nb.cells[2].branches
    assert run_all(nb, runtime, tok).cells_run == [3, 4]
    outputs = [c.output for c in nb.cells]
    nb.drop_state(2)  # the memory budget took them: recomputed (same seed, same text) when needed
    nb.drop_state(3)
    nb.edit(4, max_tokens=20)
    report = run_all(nb, runtime, tok)
    assert report.cells_run == [2, 3, 4] and [c.output for c in nb.cells] == outputs
    with pytest.raises(GenerationError, match="Only a generate cell"):
        nb.fork(RuntimeDriver(runtime, tok), 0, [1])


def test_save_load_and_run_all_gives_the_same_text(demo, tmp_path):
    runtime, tok = demo
    nb = make(runtime, CELLS)
    run_all(nb, runtime, tok)
    path = tmp_path / "scene.json"
    nb.save(path)
    again = Notebook.load(path, runtime.fingerprint)
    assert not any(c.fresh for c in again.cells)  # states are recomputed
    run_all(again, runtime, tok)
    assert [c.output for c in again.cells] == [c.output for c in nb.cells]
    assert torch.equal(again.cells[-1].state.aa, nb.cells[-1].state.aa)
    files = nb.save(tmp_path / "kept.json", include_states=True)
    assert files[1].name == "kept.states.safetensors"
    restored = Notebook.load(files[0], runtime.fingerprint)
    assert all(c.fresh for c in restored.cells) and run_all(restored, runtime, tok).cells_run == []
    assert torch.equal(restored.cells[-1].state.pp, nb.cells[-1].state.pp)
    with pytest.raises(LoadError, match="another model"):
        Notebook.load(path, "another-fingerprint")
    read_only = Notebook.load(path, "another-fingerprint", read_only=True)
    assert read_only.cells[2].output == nb.cells[2].output
    with pytest.raises(GenerationError, match="read-only"):
        run_all(read_only, runtime, tok)
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(LoadError, match="not a notebook"):
        Notebook.load(tmp_path / "junk.json", runtime.fingerprint)


def test_bad_cells_are_refused_in_one_sentence(demo):
    runtime, tok = demo
    nb = Notebook(runtime.fingerprint)
    with pytest.raises(GenerationError, match="empty"):
        run_all(nb, runtime, tok)
    nb.add("generate", settings=settings(1))
    with pytest.raises(GenerationError, match="add a text cell first"):
        run_all(nb, runtime, tok)
    with pytest.raises(GenerationError, match="'text' or 'generate'"):
        nb.add("poem")
    with pytest.raises(GenerationError, match="no cell 9"):
        nb.edit(8, source="x")


def test_200_cells_on_a_7b_shape_state_stay_within_the_cap():
    """Memory per notebook: 200 cells each keeping a 7B-shape state (32 x 4096) and its logits
    (vocab 50277) would be ~560 MB; the cap keeps it within the limit, the last cell's state kept."""
    session = NotebookSession("f")
    for i in range(200):
        cell = session.notebook.add("text", source=f"line {i}\n")
        cell.state = State.zeros(32, 4096, fingerprint="f")
        cell.logits = torch.zeros(50277)
        cell.tokens = list(range(1 + i % 7))
        cell.fresh = True
    per_cell = session.notebook.cells[0].nbytes()
    assert per_cell == 5 * 32 * 4096 * 4 + 50277 * 4 and session.memory_bytes() == 200 * per_cell
    limit = 64 << 20
    assert session.trim(limit) <= limit and session.memory_bytes() <= limit
    assert session.notebook.cells[-1].state is not None
    assert session.drop("cell 200").startswith("the kept state of notebook cell 200")


def test_the_notebook_tab_handlers_in_process(engine, tmp_path):
    """The Notebook tab's handlers on the demo model through the engine's scheduler: add, run,
    edit and re-run from the edit, fork and keep, inspect a cell, save a state, save and open."""
    from pathlib import Path

    from rwkv_playground.ui.notebook_tab import NotebookTab

    tab = NotebookTab(engine)
    session, version, status = tab.on_add("text", None, 0)
    assert isinstance(session, NotebookSession) and session.notebook.cells[0].source.startswith("ROMEO")
    session, version, _ = tab.on_add("generate", session, version)
    *_, (status, live, version) = tab.on_run(session, version)
    assert status.startswith("Ran cells 1-2") and session.notebook.cells[1].output
    first_output = session.notebook.cells[1].output
    version, status = tab.on_edit(session, 0, version, source="JULIET: Good night, good night!\n\nROMEO:")
    assert "will run again" in status and not session.notebook.cells[0].fresh
    *_, (status, _, version) = tab.on_run(session, version, upto=1)
    assert status.startswith("Ran cells 1-2")
    *_, (status, _, version) = tab.on_run(session, version)
    assert status.startswith("Nothing to run")
    *_, (status, version) = tab.on_fork(session, 1, version)
    branches = session.notebook.cells[1].branches
    assert "3 continuations" in status and len(branches) == 3
    assert branches[0].output == session.notebook.cells[1].output  # the cell's own seed comes first
    version, status = tab.on_keep(session, 1, 2, version)
    assert session.notebook.cells[1].output == branches[2].output
    inspector, status = tab.on_inspect(session, None, 0)
    assert inspector.recording.n_tokens == len(session.notebook.cells[0].tokens) and "Recorded cell 1" in status
    state_file, status = tab.on_save_state(session, 1)
    assert Path(state_file.value["path"]).exists() and state_file.visible
    files, status = tab.on_save(session, True)
    assert [Path(f).name for f in files] == ["notebook.json", "notebook.states.safetensors"]
    other, version, status = tab.on_open(None, files, False, version)
    assert status == "Opened a notebook of 2 cells." and all(c.fresh for c in other.notebook.cells)
    assert [c.output for c in other.notebook.cells] == [c.output for c in session.notebook.cells]
    assert first_output  # (the first run wrote something)
    for s in (session, other, inspector):
        engine.forget(s)


def test_stop_in_a_generate_cell_keeps_its_text_in_sync_and_ends_the_run(engine):
    """Stop while a cell writes (through the scheduler, as the app runs it): the run ends there,
    the cell keeps the text written so far and its state read exactly that text, the cells below
    do not run; running again writes the cell whole, as a run that was never stopped."""
    from conftest import paced

    from rwkv_playground.notebook import EngineDriver, RunReport

    loaded = engine.require()
    session = engine.add_session(NotebookSession(loaded.runtime.fingerprint))
    nb = session.notebook
    nb.add("text", source="ROMEO: Good night, good night!\n\nJULIET:")
    nb.add("generate", settings=settings(3), max_tokens=80)
    nb.add("text", source="\n\nROMEO:")
    report, stopped = RunReport(), []
    with paced(engine, 0.01):
        for index, text in nb.run(EngineDriver(engine, session), report=report):
            if index == 1 and len(text) > 10 and not stopped:
                stopped.append(session.stop())
    assert stopped == [True]
    cell = nb.cells[1]
    assert report.stopped == 1 and report.sentence().startswith("Stopped in cell 2")
    assert 0 < len(cell.tokens) < 80 and not cell.fresh and nb.cells[2].state is None
    assert cell.output == loaded.tokenizer.decode(cell.tokens)
    _, expected = loaded.runtime.forward(nb.cells[0].tokens + cell.tokens)
    assert torch.allclose(cell.state.aa, expected.aa, atol=1e-4) and cell.state.token_count == expected.token_count
    assert not session.stop()  # nothing runs now
    report = RunReport()
    for _ in nb.run(EngineDriver(engine, session), report=report):
        pass
    assert report.cells_run == [1, 2] and report.stopped is None and len(nb.cells[1].tokens) == 80
    whole = make(loaded.runtime, [("text", "ROMEO: Good night, good night!\n\nJULIET:"), ("generate", 3)])
    whole.cells[1].max_tokens, whole.cells[1].stop = 80, ()
    run_all(whole, loaded.runtime, loaded.tokenizer)
    assert whole.cells[1].tokens == nb.cells[1].tokens  # the same seed writes the same text
    engine.forget(session)


@pytest.mark.parametrize("stops", [(), ("\n\n",), ("\n\n", "THE END"), ("a,b", "c\\d", "\tx"), ("\nBob:",)])
def test_stop_strings_round_trip_through_the_cells_text_box(stops):
    from rwkv_playground.ui.notebook_tab import format_stops, parse_stops

    shown = format_stops(stops)
    assert "\n" not in shown and "\t" not in shown  # one editable line
    assert parse_stops(shown) == stops


def test_a_generate_cells_settings_edited_together_all_stick(engine):
    """The cell editor sends the limit, the stop strings and the sampling settings in one edit (its
    boxes' blur): each changed field sticks and governs the next run (a max-tokens change was
    dropped whenever the settings came along, which was always)."""
    from rwkv_playground.ui.notebook_tab import NotebookTab

    tab = NotebookTab(engine)
    session, version, _ = tab.on_add("text", None, 0)
    session, version, _ = tab.on_add("generate", session, version)
    cell = session.notebook.cells[1]
    settings = {"seed": int(cell.settings.get("seed") or 0), "temperature": float(cell.settings.get("temperature", 1.0)),
                "top_p": float(cell.settings.get("top_p", 0.8))}
    version, status = tab.on_edit(session, 1, version, max_tokens=7, stop=["QQQ"], settings=settings)
    assert "will run again" in status, status
    assert (cell.max_tokens, tuple(cell.stop)) == (7, ("QQQ",))  # kept although the settings did not change
    version, status = tab.on_edit(session, 1, version, max_tokens=5, stop=["QQQ"], settings={**settings, "seed": 11})
    assert (cell.max_tokens, cell.settings["seed"]) == (5, 11)
    *_, (status, _, version) = tab.on_run(session, version)
    assert status.startswith("Ran cells 1-2") and 0 < len(cell.tokens) <= 5  # the limit governs the run
