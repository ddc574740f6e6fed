"""RWKV-5/6/7 in every part of the engine: chat, blog, notebook, the scheduler's batching, state
files and the memory caps, on small random models with the World vocabulary (what G1 uses).

RWKV-4's vector views and knock-outs say in one sentence that they do not apply; the State
inspector's Matrix state and Patching tabs run here through their handlers.
"""

import numpy as np
import pytest
import torch

from rwkv_playground import GenerationError, LoadError, StateError
from rwkv_playground.blog import BlogSession
from rwkv_playground.chat import ChatSession, PRESETS, default_preset
from rwkv_playground.serving.engine import Engine
from rwkv_playground.models import by_name
from rwkv_playground.models.rwkv5 import RWKV5Config
from rwkv_playground.models.rwkv6 import RWKV6Config
from rwkv_playground.models.rwkv7 import RWKV7Config
from rwkv_playground.notebook import NotebookSession
from rwkv_playground.sampling import SamplingSettings
from rwkv_playground.state import State, StateLayout

WORLD = 65536
MODELS = {
    "rwkv5": RWKV5Config(2, 64, WORLD, 224, 2, 32),
    "rwkv6": RWKV6Config(2, 64, WORLD, 224, 2, 32, mix_lora=8, decay_lora=16),
    "rwkv7": RWKV7Config(2, 64, WORLD, 256, 2, 32, decay_lora=16, iclr_lora=16, value_lora=8, gate_lora=16),
}


def settings(seed=1):
    return SamplingSettings(temperature=1.0, top_p=0.8, seed=seed)


def run(stream):
    last = ""
    for last in stream:
        pass
    return last


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("matrix-models")
    paths = {}
    for n, (name, config) in enumerate(MODELS.items()):
        paths[name] = folder / f"tiny-{name}-world.pth"
        torch.save(by_name(name).random_weights(config, seed=30 + n, dtype=torch.bfloat16), paths[name])
    return paths


@pytest.fixture(scope="module", params=list(MODELS))
def matrix_engine(request, model_files):
    eng = Engine(models_dir=model_files[request.param].parent)
    eng.load(model_files[request.param])
    yield eng
    eng.scheduler.close()


def test_chat_turns_read_only_new_tokens_and_the_state_matches_the_history(matrix_engine):
    loaded = matrix_engine.require()
    assert default_preset(loaded.runtime.architecture, loaded.runtime.config.vocab_size) == "World / G1 (User / Assistant)"
    assert loaded.tokenizer.name.startswith("rwkv_vocab")  # the World vocabulary
    s = ChatSession(PRESETS["World / G1 (User / Assistant)"])
    run(s.send(matrix_engine, "Hello there.", settings(1), 12))
    run(s.send(matrix_engine, "And then?", settings(2), 12))
    first, second = s.turns
    assert second.stats["tokens_saved"] == first.state_after.token_count > 0
    enc = loaded.tokenizer.encode
    logits, state = loaded.runtime.forward(enc("User: Hello there.\n\nAssistant:") + first.reply_tokens
                                           + enc("\n\nUser: And then?\n\nAssistant:") + second.reply_tokens)
    assert torch.allclose(second.logits_after, logits, atol=1e-4)
    for name, tensor in state.tensors().items():
        assert torch.allclose(second.state_after.tensors()[name], tensor, atol=1e-4), name
    # the same seed from the same state gives the same reply
    again = run(s.regenerate(matrix_engine, settings(2), 12))
    assert again == second.reply


def test_blog_post_and_notebook_run(matrix_engine):
    loaded = matrix_engine.require()
    post = BlogSession()
    text = run(post.write(matrix_engine, "RNN memory", settings(3), max_tokens=20))
    assert isinstance(text, str) and post.tokens and post.state.architecture == loaded.runtime.architecture.name
    nb = NotebookSession(loaded.runtime.fingerprint)
    nb.notebook.add("text", source="User: Say something.\n\nAssistant:")
    nb.notebook.add("generate", max_tokens=8)
    from rwkv_playground.notebook import EngineDriver

    for _ in nb.notebook.run(EngineDriver(matrix_engine, nb)):
        pass
    assert nb.notebook.cells[1].state.wkv_state.shape[1:] == (loaded.runtime.config.n_head,) + (
        loaded.runtime.config.head_size,) * 2


def test_generations_batched_together_equal_their_solo_runs_bit_for_bit(matrix_engine):
    from rwkv_playground.generation import Generation, generate

    loaded = matrix_engine.require()

    def new(seed):
        return Generation(loaded.tokenizer, f"User: Count to {seed}.\n\nAssistant:", settings=settings(seed),
                          max_tokens=15, chunk_len=8, sampler_kernel=loaded.runtime.sampler_kernel)

    alone = []
    for seed in (1, 2, 3):
        gen = new(seed)
        "".join(generate.__globals__["Stream"](loaded.runtime, gen))
        alone.append((list(gen.tokens), gen.state))
    gens = [new(seed) for seed in (1, 2, 3)]
    tickets = [matrix_engine.scheduler.submit_generation(g) for g in gens]
    for t in tickets:
        t.wait(timeout=120)
    for (tokens, state), gen in zip(alone, gens):
        assert gen.tokens == tokens
        for name, tensor in state.tensors().items():
            assert torch.equal(gen.state.tensors()[name], tensor), name
    assert max(matrix_engine.scheduler.batch_sizes) >= 2


def test_state_files_round_trip_and_other_architectures_are_refused(matrix_engine, tmp_path, tiny_fp32):
    from rwkv_playground import load_runtime

    runtime = matrix_engine.require().runtime
    _, state = runtime.forward([1, 2, 3, 4])
    path = tmp_path / "matrix.safetensors"
    state.save(path)
    loaded = State.load(path, runtime=runtime)
    assert loaded.architecture == runtime.architecture.name and loaded.token_count == 4
    assert all(torch.equal(a, b) for a, b in zip(loaded.tensors().values(), state.tensors().values()))
    # an RWKV-4 state into this model, and this state into an RWKV-4 model: one sentence each
    v4 = load_runtime(tiny_fp32)
    _, v4_state = v4.forward([1, 2])
    v4_path = tmp_path / "v4.safetensors"
    v4_state.save(v4_path)
    with pytest.raises(StateError, match=f"from an RWKV-4 model; the loaded model is {runtime.architecture.title}"):
        State.load(v4_path, runtime=runtime)
    with pytest.raises(StateError, match=f"from an {runtime.architecture.title} model; the loaded model is RWKV-4"):
        State.load(path, runtime=v4)
    with pytest.raises(StateError):
        runtime.forward([1], v4_state)


def test_the_inspector_says_plainly_what_does_not_apply(matrix_engine):
    from rwkv_playground.inspector.knockouts import Knockout, knockouts
    from rwkv_playground.inspector import record

    loaded = matrix_engine.require()
    title = loaded.runtime.architecture.title
    with pytest.raises(GenerationError, match=rf"vector state \(aa, bb, pp\); {title}'s matrix state has its own"):
        record(loaded.runtime, loaded.tokenizer, [1, 2, 3])
    with pytest.raises(GenerationError, match="knock-outs, causal trace and logit lens read RWKV-4.s vector state"):
        knockouts(loaded.runtime, loaded.tokenizer, [1, 2, 3], [Knockout(layer=0, channels=(0,), position=1)])
    assert loaded.describe()["architecture"].startswith(title)


def test_a_7b_shape_rwkv7_state_keeps_the_caps():
    """G1 7.2B: 32 layers x 4096, 64 heads of 64: a state is 32 x (2 x 4096 + 64 x 64 x 64) floats =
    34.6 MB (13x an RWKV-4 7B state); 100 notebook cells of it stay within the notebook's cap."""
    layout = StateLayout.matrix("rwkv7", 32, 4096, 64, 64)
    assert layout.nbytes() == 32 * (2 * 4096 + 64 ** 3) * 4 == 34_603_008
    session = NotebookSession("f")
    for i in range(100):
        cell = session.notebook.add("text", source=f"line {i}\n")
        cell.state = State.empty(layout, fingerprint="f")
        cell.logits = torch.zeros(WORLD)
        cell.tokens = [1]
        cell.fresh = True
    assert session.memory_bytes() == 100 * (layout.nbytes() + WORLD * 4)
    limit = 256 << 20
    assert session.trim(limit) <= limit and session.memory_bytes() <= limit
    assert session.notebook.cells[-1].state is not None


def test_the_model_panel_lists_and_switches_among_architectures(model_files, world_tiny):
    eng = Engine(models_dir=model_files["rwkv7"].parent)
    try:
        names = eng.list_models()
        assert {p.name for p in model_files.values()} <= set(names)
        for name, path in model_files.items():
            eng.load(eng.resolve_choice(path.name))
            assert eng.current.runtime.architecture.name == name
        eng.load(world_tiny)
        assert eng.current.runtime.architecture.name == "rwkv4"
    finally:
        eng.scheduler.close()


def test_the_page_says_which_model_is_loaded_and_a_reload_ticks_it(model_files, app_model_path):
    """The banner names the model loaded now and, for the Shakespeare demo, what to expect and how
    to load G1; a page opened after a switch ticks the loaded model in the list, not the first one."""
    from rwkv_playground.ui.model_panel import model_banner, on_visit

    eng = Engine(models_dir=model_files["rwkv7"].parent)
    try:
        assert model_banner(eng).startswith("No model is loaded")
        eng.load(app_model_path)
        banner = model_banner(eng)
        assert "rwkv4-demo-shakespeare" in banner and "Shakespeare" in banner and "python app.py --model rwkv7-g1" in banner
        eng.load(eng.resolve_choice(model_files["rwkv6"].name))
        banner, _, choice = on_visit(eng)
        assert model_files["rwkv6"].name in banner and "demo" not in banner and "RWKV-6" in banner
        assert choice.value == model_files["rwkv6"].name
    finally:
        eng.scheduler.close()


def test_a_bad_file_of_a_new_architecture_keeps_the_current_model(model_files, tmp_path):
    eng = Engine(models_dir=tmp_path)
    try:
        eng.load(model_files["rwkv7"])
        weights = torch.load(model_files["rwkv7"], weights_only=True)
        del weights["blocks.1.att.k_a"]
        bad = tmp_path / "broken-v7.pth"
        torch.save(weights, bad)
        with pytest.raises(LoadError, match="missing key 'blocks.1.att.k_a'"):
            eng.load(bad)
        assert eng.current.runtime.architecture.name == "rwkv7"
    finally:
        eng.scheduler.close()


def test_g1_thinking_format_reads_the_reply_start_and_shows_it(matrix_engine):
    """G1's thinking style: the prompt ends "Assistant: <think" (its model cards), the reply shown
    starts with "<think", and the state holds exactly the prompt and the generated tokens."""
    loaded = matrix_engine.require()
    fmt = PRESETS["G1 thinking (Assistant: <think)"]
    assert fmt.turn_prompt("Why?", first=True) == "User: Why?\n\nAssistant: <think"
    s = ChatSession(fmt)
    reply = run(s.send(matrix_engine, "Why?", settings(5), 10))
    turn = s.turns[0]
    assert reply.startswith("<think") and turn.reply == reply
    assert turn.prompt_tokens == loaded.tokenizer.encode("User: Why?\n\nAssistant: <think")
    assert reply == ("<think" + loaded.tokenizer.decode(turn.reply_tokens)).strip()
    _, state = loaded.runtime.forward(turn.prompt_tokens + turn.reply_tokens)
    assert torch.allclose(turn.state_after.wkv_state, state.wkv_state, atol=1e-4)


def test_safetensors_files_load_and_the_panel_names_the_architecture(model_files, tmp_path):
    from safetensors.torch import save_file

    from rwkv_playground import load_runtime
    from rwkv_playground.ui.model_panel import model_markdown

    weights = torch.load(model_files["rwkv7"], weights_only=True)
    path = tmp_path / "g1-tiny.safetensors"
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path))
    from_pth, _ = load_runtime(model_files["rwkv7"]).forward([1, 2, 3])
    from_st, _ = load_runtime(path).forward([1, 2, 3])
    assert torch.equal(from_pth, from_st)
    eng = Engine(models_dir=tmp_path)
    try:
        eng.load(path)
        text = model_markdown(eng)
        assert "RWKV-7, 2 layers × 64 wide, 2 heads of 32" in text and "MB per conversation" in text
    finally:
        eng.scheduler.close()


def test_the_inspector_tab_records_and_draws_the_matrix_state(matrix_engine):
    """Through the tab's handlers (in-process): Record gives a MatrixRecording, every matrix figure
    is drawn and consistent with it, the head slider moves the views, the state exports, and the
    Patching tab restores from the clean run."""
    from rwkv_playground.inspector import InspectorSession
    from rwkv_playground.inspector.matrix import MatrixRecording
    from rwkv_playground.ui import inspector_tab, patching_panel

    tab = inspector_tab.InspectorTab(matrix_engine)
    session = InspectorSession()
    text = "User: Hello there, how are you today?\n\nAssistant: Fine."
    *_, last = tab.on_record("Text below", text, None, None, session, inspector_tab.ViewChoice(1, "0-31", 96, 1))
    status, layer, token, head, spike, *rest = last
    assert "Recorded" in status and "heads of" in status, status
    rec = session.recording
    assert isinstance(rec, MatrixRecording)
    views = rest[:15]
    assert rest[15:19] == [None] * 4  # RWKV-4's decay / bonus figures are cleared, never left from another model
    decay, distribution, bonus, fourth, matrix, over, attention = views[8:15]
    t = rec.n_tokens - 1
    assert np.allclose(matrix.data[0].z, rec.state_at(t, 1, 1), atol=1e-6)
    assert decay.data[0].z.shape == (rec.n_embd, rec.n_tokens)
    assert attention.data[1].z.shape == (rec.n_tokens, rec.n_tokens)
    assert len(over.data) == 3 and bonus.data[0].z.shape == (rec.n_layer, rec.n_embd)
    assert views[5].data[1].z.shape == (rec.n_layer, rec.n_tokens)  # per-token summary
    if rec.architecture == "rwkv7":  # a of the layer, then the chosen head's removal key kk
        assert np.allclose(fourth.data[0].z, rec.arrays["a"][:, 1].T) and len(fourth.data) == 2
        assert np.allclose(fourth.data[1].z, rec.head("kk", 1, 1).T)
        assert np.allclose(np.linalg.norm(fourth.data[1].z, axis=0), 1, atol=1e-5)
    again = inspector_tab.on_view(session, 0, 3, "0-31", 16, 0)
    assert np.allclose(again[12].data[0].z, rec.state_at(3, 0, 0), atol=1e-6)
    path, message = inspector_tab.on_export(session, 3)
    exported = State.load(path, runtime=matrix_engine.require().runtime)
    assert torch.allclose(exported.wkv_state, rec.full_state_at(3).wkv_state)
    assert inspector_tab.on_html(session, 0, 3, "0-31", 16, 0).endswith(".html")
    panel = patching_panel.PatchingPanel(matrix_engine)
    corrupt = text.replace("today", "now")
    same_length = len(matrix_engine.require().tokenizer.encode(corrupt)) == rec.n_tokens
    Options = patching_panel.PatchOptions
    out = list(panel.on_run(session, patching_panel.ACTIONS[0], corrupt if same_length else text, 2,
                            Options(patching_panel.PARTS[1], "0", "0-3", "rows", 8, 0)))[-1]
    assert "done" in out[0], out[0]
    assert out[1].data[0].z.shape[0] == rec.n_head and len(out[3]) == 3
    out = list(panel.on_run(session, patching_panel.ACTIONS[2], "", 5,
                            Options(patching_panel.PARTS[0], "all", "", "rows", 8, 2)))[-1]
    assert "done" in out[0], out[0]
    out = list(panel.on_run(session, patching_panel.ACTIONS[4], "", 3,
                            Options(patching_panel.PARTS[1], "0", "", "rows", 8, 0)))[-1]
    assert "done" in out[0] and "mean KL" in out[2], out[0]
    key_axis = "columns" if rec.architecture == "rwkv7" else "rows"
    out = list(panel.on_run(session, patching_panel.ACTIONS[5], "", 3,
                            Options(patching_panel.PARTS[2], "0", "0-3", key_axis, 8, 0, None, 0.0)))[-1]
    assert "done" in out[0] and "decay set" in out[2] and out[1].data[0].z.max() > 0, out[0]
    value_axis = "rows" if key_axis == "columns" else "columns"
    out = list(panel.on_run(session, patching_panel.ACTIONS[5], "", 3,
                            Options(patching_panel.PARTS[2], "0", "0-3", value_axis, 8, 0, None, 0.0)))[-1]
    assert f"which are the matrix's {key_axis}" in out[0] and "Traceback" not in out[0], out[0]
    other = [name for name in matrix_engine.list_models() if name.endswith(".pth")]
    out = list(panel.on_run(session, patching_panel.ACTIONS[6], "", 3,
                            Options(patching_panel.PARTS[0], "all", "", "rows", 8, 0, other[0])))[-1]
    assert ("done" in out[0] and "mean surprisal" in out[2]) or "different vocabularies" in out[0], out[0]


def test_the_experiments_tab_refuses_a_matrix_recording_in_one_sentence(matrix_engine):
    """Every experiment of the Experiments tab (the default knock-out on the longest half-lives,
    the memory probe, ...) on an RWKV-5/6/7 recording ends in one sentence naming where its
    experiments are, never an AttributeError (the tab once read rec.time_decay of a matrix recording)."""
    from rwkv_playground.inspector import InspectorSession
    from rwkv_playground.inspector.matrix import record_matrix
    from rwkv_playground.ui.experiments_panel import (CHANNEL_MODES, EXPERIMENTS, ExperimentsPanel, KnockoutChoice,
                                                      TraceChoice)

    loaded = matrix_engine.require()
    session = matrix_engine.add_session(InspectorSession())
    session.recording = record_matrix(loaded.runtime, loaded.tokenizer, loaded.tokenizer.encode("Hello there, friend."))
    title = loaded.runtime.architecture.title
    for experiment in EXPERIMENTS:
        outputs = list(ExperimentsPanel(matrix_engine).on_run(
            session, experiment, 2, KnockoutChoice("erase", "all", CHANNEL_MODES[1], "0-3", 4, -8.0), TraceChoice(4, 8)))
        status = outputs[-1][0]
        assert "went wrong" not in status and "Error" not in status, status
        assert f"read RWKV-4's vector state (aa, bb, pp); {title}'s matrix state has its own views" in status
        assert "Patching tab" in status and status.count(". ") == 0, status


def test_a_new_conversation_takes_the_loaded_models_chat_format(matrix_engine):
    """+ New (and a page opened on an empty conversation) follows the model loaded now: a World /
    G1 model's User / Assistant, not the Bob / Alice a session starts with (the format default was
    fixed when the page was built)."""
    from rwkv_playground.chat import ChatSession
    from rwkv_playground.ui.chat_tab import ChatTab

    tab = ChatTab(matrix_engine)
    session = matrix_engine.add_session(ChatSession())
    assert session.fmt.user == "Bob"
    new = tab.on_new(session)
    assert new[4:6] == ("User", "Assistant") and session.fmt.user == "User", new[4:6]
    fresh = matrix_engine.add_session(ChatSession())
    assert tab.visit(fresh)[4:6] == ("User", "Assistant")


def test_the_patching_panel_shows_only_the_controls_of_the_chosen_experiment():
    from rwkv_playground.ui.patching_panel import ACTIONS, CONTROLS, controls_for

    shown = {}
    for action in ACTIONS:
        sentence, *updates = controls_for(action)
        assert sentence and len(updates) == len(CONTROLS)
        shown[action] = {name for name, update in zip(CONTROLS, updates) if update["visible"]}
    assert shown["Blend with the other text"] == {"text"}
    assert shown["Two models on the recorded text"] == {"other_model"}
    assert shown["Remove a token"] == {"layers", "removed"}
    assert shown["Knock out (set the decay of) the parts"] == {"parts", "layers", "channels", "axis", "decay"}
    assert "window" in shown["Restore sweep (causal trace)"] and "decay" not in shown["Restore from the clean run"]
    assert set().union(*shown.values()) == set(CONTROLS)  # every control serves some experiment
