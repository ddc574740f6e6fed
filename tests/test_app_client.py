"""The named API endpoints of a launched app, through gradio_client."""

import copy
import time

import pytest

from conftest import MATRIX_CLEAN, free_port, paced, same_length_corruption, serving

SAMPLING = [1.0, 0.7, 0, 0.4, 0.4, 0.996]  # temperature, top_p, top_k, presence, count, decay


@pytest.fixture(scope="module")
def client(app_url):
    from gradio_client import Client

    return Client(app_url, verbose=False)


def collect(job):
    return [copy.deepcopy(out) for out in job]


def bot_text(messages):
    content = messages[-1]["content"]
    if isinstance(content, list):
        content = "".join(part.get("text", "") for part in content)
    return content


def test_chat_streams_and_reuses_state(client, engine):
    with paced(engine, 0.02):
        outs = collect(client.submit("Good morrow, my lord.", "Bob", "Alice", "", *SAMPLING, 40, 3, api_name="/chat"))
    partial = {bot_text(o[0]) for o in outs if o[0]}
    assert len(partial) >= 3, "the reply should arrive in several increments"
    final_messages, final_status = outs[-1][0], outs[-1][1]
    assert final_messages[-2]["role"] == "user" and "tok/s" in final_status
    outs2 = collect(client.submit("And then?", "Bob", "Alice", "", *SAMPLING, 20, 4, api_name="/chat"))
    assert "reused from the state" in outs2[-1][1]
    assert len(outs2[-1][0]) == 4  # two turns, one per client session


def test_api_has_named_parameters_and_the_reply_alone(client):
    """The API speaks in names (not param_5 ... param_12), and a chat reply is the reply text:
    its statistics come as separate outputs."""
    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    chat = [p["parameter_name"] for p in api["/chat"]["parameters"]]
    assert chat == ["message", "user_name", "bot_name", "scenario", "temperature", "top_p", "top_k",
                    "presence_penalty", "count_penalty", "penalty_decay", "max_tokens", "seed", "reply_start", "key"]
    assert [p["parameter_name"] for p in api["/blog"]["parameters"]][:6] == [
        "topic", "audience", "tone", "key_points", "outline_first", "template"]
    for endpoint in api.values():
        assert not any(p["parameter_name"].startswith("param_") for p in endpoint["parameters"])
    messages, status, table, _ = client.predict("Speak, I pray.", "Bob", "Alice", "", *SAMPLING, 25, 9,
                                                api_name="/chat")
    reply = bot_text(messages)
    assert reply and "tok/s" not in reply and "<sub>" not in reply
    assert "tok/s" in status and table[-1]["generated_tokens"] >= 1  # the turn's statistics, on their own


def test_regenerate_undo_clear(client):
    collect(client.submit("Speak.", "Bob", "Alice", "", *SAMPLING, 15, 5, api_name="/chat"))
    regen = collect(client.submit(*SAMPLING, 15, 6, api_name="/regenerate"))
    assert "0 prompt tokens read" in regen[-1][1]
    undone = client.predict(api_name="/undo")
    assert "removed" in undone[1]
    cleared = client.predict(api_name="/clear")
    assert cleared[0] == []


def test_empty_message_only_hints(client):
    out = collect(client.submit("   ", "Bob", "Alice", "", *SAMPLING, 10, 1, api_name="/chat"))
    assert "Type a message" in out[-1][1]


def test_blog_post(client):
    template = "Bob: Can you help to write a blog-post about {topic}?{details}\n\nAlice: Sure, here is a blog post about {topic}:\n\nTitle:"
    outs = collect(client.submit("the sea", "sailors", "", "", False, template, *SAMPLING, 150, 2, api_name="/blog"))
    text, status, download = outs[-1][0], outs[-1][1], outs[-1][2]  # gr.State outputs are not sent
    assert text.startswith("Title:") and "150 generated" in status
    assert download and str(download).endswith(".md")


def test_model_switch_refuses_paths_outside_the_folder(client, engine, app_model_path):
    """Two layers: the dropdown refuses unknown values, and Engine.resolve_choice (tested
    in-process) refuses any path outside the models folder."""
    from gradio_client.exceptions import AppError

    for bad in ("../../etc/passwd", "/etc/passwd"):
        with pytest.raises(AppError, match="not in the list of choices"):
            client.predict(bad, api_name="/load_model")
    try:
        info, status = client.predict("other-tiny.pth", api_name="/load_model")
        assert "Loaded other-tiny.pth" in status and "2 layers" in info
    finally:
        engine.load(app_model_path)  # later tests expect the demo model


def test_engine_errors_are_readable_messages_not_tracebacks():
    """An app whose engine has no model: every endpoint answers with one readable line."""
    from gradio_client import Client

    from rwkv_playground.serving.engine import Engine
    from rwkv_playground.ui import create_app, launch

    port = free_port()
    engine = Engine()
    demo = create_app(engine)
    launch(demo, engine, port=port, prevent_thread_lock=True, quiet=True)
    try:
        c = Client(f"http://127.0.0.1:{port}/", verbose=False)
        chat = collect(c.submit("Hello", "Bob", "Alice", "", *SAMPLING, 10, 1, api_name="/chat"))
        assert chat[-1][1] == "⚠ No model is loaded yet."
        blog = collect(c.submit("x", "", "", "", False, "{topic}", *SAMPLING, 10, 1, api_name="/blog"))
        assert blog[-1][1] == "⚠ No model is loaded yet."
        inspect = c.predict("Text below", "some text", 0, "0-31", 96, api_name="/inspect")
        assert inspect[0] == "⚠ No model is loaded yet."
        for out in (chat[-1][1], blog[-1][1], inspect[0]):
            assert "Traceback" not in out
    finally:
        demo.close()


def test_every_reply_shows_its_reading_and_writing_speed():
    from rwkv_playground.ui.common import stats_line

    line = stats_line({"prompt_tokens": 20, "prompt_tokens_per_second": 400.0, "generated_tokens": 53,
                       "tokens_per_second": 183.14, "tokens_saved": 0})
    assert line == "20 prompt tokens read (400 tok/s) · 53 generated · 183.1 tok/s"
    # Regenerate reads nothing: no reading speed to show
    assert stats_line({"prompt_tokens": 0, "prompt_tokens_per_second": 0.0, "generated_tokens": 5,
                       "tokens_per_second": 90.0}) == "0 prompt tokens read · 5 generated · 90.0 tok/s"


# ---- many visitors at once (loopback only) ------------------------------------------------------

def chat_alone(engine, message, seed, max_tokens):
    """The reply the same request gets with the model to itself (in-process, same sampling)."""
    from rwkv_playground.chat import ChatFormat, ChatSession
    from rwkv_playground.ui.common import Sampling

    settings, max_tokens = Sampling(*SAMPLING, max_tokens, seed).settings()
    session = ChatSession(ChatFormat("Bob", "Alice"))
    reply = ""
    for reply in session.send(engine, message, settings, max_tokens):
        pass
    return reply


def client_chat(url, message, seed, max_tokens):
    from gradio_client import Client

    messages, status, _, _ = Client(url, verbose=False).predict(message, "Bob", "Alice", "", *SAMPLING, max_tokens,
                                                                seed, api_name="/chat")
    return bot_text(messages), status


def test_eight_sessions_at_once_each_get_their_solo_reply(app_url, engine):
    from concurrent.futures import ThreadPoolExecutor

    requests = [(f"Good morrow, friend number {n}.", 100 + n, 30 + 5 * n) for n in range(8)]
    expected = [chat_alone(engine, *r) for r in requests]
    ticks = engine.scheduler.ticks
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda r: client_chat(app_url, *r), requests))
    assert [reply for reply, _ in got] == expected  # bit for bit: nobody's reply depends on the others
    assert all("tok/s" in status for _, status in got)
    assert engine.scheduler.ticks > ticks and max(engine.scheduler.batch_sizes) >= 2  # they shared steps


def test_stop_under_load_ends_only_that_reply(app_url, engine):
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client

    requests = [(f"Speak of the sea, number {n}.", 200 + n, 40) for n in range(4)]
    expected = [chat_alone(engine, *r) for r in requests]
    stopper = Client(app_url, verbose=False)
    long_job = stopper.submit("Tell me the whole story, at length.", "Bob", "Alice", "", *SAMPLING, 3000, 7,
                              api_name="/chat")
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client_chat, app_url, *r) for r in requests]
        deadline = time.time() + 30
        while time.time() < deadline and not any(out[0] and len(bot_text(out[0])) > 20 for out in long_job.outputs()):
            time.sleep(0.05)
        long_job.cancel()
        got = [f.result(timeout=120) for f in futures]
    assert [reply for reply, _ in got] == expected


def test_a_model_switch_under_load_ends_running_replies_with_a_sentence(app_url, engine, app_model_path):
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client

    clients = [Client(app_url, verbose=False) for _ in range(3)]
    template = "Bob: Write about {topic}.{details}\n\nAlice: Here it is:\n\nTitle:"
    jobs = [c.submit(f"rivers {n}", "", "", "", False, template, *SAMPLING, 6000, n, api_name="/blog")
            for n, c in enumerate(clients)]  # long posts: still being written at the switch
    deadline = time.time() + 30
    while time.time() < deadline and not all(any(len(o[0]) > 50 for o in j.outputs()) for j in jobs):
        time.sleep(0.05)
    try:
        info, status = Client(app_url, verbose=False).predict("other-tiny.pth", api_name="/load_model")
        assert "Loaded other-tiny.pth" in status and "2 layers" in info
        with ThreadPoolExecutor(3) as pool:
            finals = list(pool.map(lambda j: j.result(timeout=60), jobs))
        for text, blog_status, _ in finals:
            assert blog_status.startswith("⚠ The model is being switched to other-tiny.pth")
            assert text.startswith("Title:") and len(text) > 50  # what was written stays
    finally:
        engine.load(app_model_path)  # later tests expect the demo model


def test_a_closed_api_client_frees_its_sessions_at_once(app_url, engine, monkeypatch):
    from gradio_client import Client

    # Gradio notices a closed client at its next heartbeat (15 s by default; read per connection):
    # the same behaviour at a 2 s heartbeat, for this client only (a short one for every page of a
    # loaded machine freed live pages' sessions)
    monkeypatch.setenv("GRADIO_HEARTBEAT_INTERVAL", "2")
    before = set(engine._visits)
    client = Client(app_url, verbose=False)
    client.predict("Hello there.", "Bob", "Alice", "", *SAMPLING, 10, 1, api_name="/chat")
    (visitor,) = set(engine._visits) - before
    (chat,) = engine._visits[visitor]
    assert chat.memory_bytes() > 0 and chat in engine.memory.sessions()
    client.close()  # its heartbeat ends: Gradio's unload, at the next heartbeat
    deadline = time.time() + 20
    while time.time() < deadline and visitor in engine._visits:
        time.sleep(0.1)
    assert visitor not in engine._visits and chat.memory_bytes() == 0 and chat not in engine.memory.sessions()


def test_the_notebook_through_the_api_reruns_only_below_an_edit(client, engine):
    """The Notebook tab's endpoints: cells added, run, one edited and run again (only it and the
    cells below it, the kept state saving the rest), a fork kept; the text equals an in-process
    notebook of the same cells, bit for bit."""
    from gradio_client import Client

    from rwkv_playground.notebook import Notebook, run_all

    nb_client = Client(client.src, verbose=False)  # a visitor of its own
    api = nb_client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert [p["parameter_name"] for p in api["/notebook_add"]["parameters"]] == ["kind", "source", "seed", "max_tokens"]
    cells = [("text", "ROMEO: Good night, good night!\n\nJULIET:", 0, 0), ("generate", "", 5, 24),
             ("text", "\n\nROMEO: What say'st thou?\n\nJULIET:", 0, 0), ("generate", "", 6, 24)]
    for kind, source, seed, limit in cells:
        summary, status = nb_client.predict(kind, source, seed, limit, api_name="/notebook_add")
    assert len(summary) == 4 and status.startswith("Added a generate cell")
    outs = collect(nb_client.submit(-1, -1, api_name="/notebook_run"))
    live, summary, status = outs[-1]
    assert status.startswith("Ran cells 1-4") and all(c["fresh"] for c in summary)
    assert any(o[0] for o in outs[:-1])  # the running cell's text streamed
    summary, status = nb_client.predict(2, "\n\nROMEO: Wilt thou leave me so unsatisfied?\n\nJULIET:", 0, 0,
                                        api_name="/notebook_edit")
    assert "will run again" in status and [c["fresh"] for c in summary] == [True, True, False, False]
    live, summary, status = collect(nb_client.submit(-1, -1, api_name="/notebook_run"))[-1]
    tokens_above = summary[0]["tokens"] + summary[1]["tokens"]
    assert status.startswith("Ran cells 3-4") and f"{tokens_above} tokens above were not read again" in status

    loaded = engine.require()
    local = Notebook(loaded.runtime.fingerprint)
    for kind, source, seed, limit in cells:
        if kind == "text":
            local.add("text", source=source)
        else:
            local.add("generate", settings={**summary[1]["settings"], "seed": seed}, max_tokens=limit,
                      stop=tuple(summary[1]["stop"]))
    local.edit(2, source="\n\nROMEO: Wilt thou leave me so unsatisfied?\n\nJULIET:")
    run_all(local, loaded.runtime, loaded.tokenizer)
    assert [c["output"] for c in summary] == [c.output for c in local.cells]

    summary, status = nb_client.predict(3, api_name="/notebook_fork")
    branches = summary[3]["branches"]
    assert "3 continuations" in status and branches[0]["output"] == summary[3]["output"]
    summary, status = nb_client.predict(3, 1, api_name="/notebook_keep")
    assert summary[3]["output"] == branches[1]["output"] and summary[3]["settings"]["seed"] == branches[1]["seed"]
    summary, status = nb_client.predict("poem", "", 0, 0, api_name="/notebook_add")
    assert status.startswith("⚠") and "'text' or 'generate'" in status and len(summary) == 4
    nb_client.close()


def test_the_inspector_and_patching_through_the_api(app_url, engine):
    """Record through /inspect (now with a head parameter, ignored by RWKV-4), then /patching:
    restore each layer from the clean run, the restore sweep, and the errors a visitor can make,
    each as one sentence."""
    from rwkv_playground.ui.inspector_tab import DEFAULT_TEXT
    from rwkv_playground.ui.patching_panel import ACTIONS, DEFAULT_CORRUPT, PARTS

    from gradio_client import Client

    c = Client(app_url, verbose=False)  # a visitor of its own: its session holds the recording
    out = c.predict("Text below", DEFAULT_TEXT, 0, "0-31", 96, 0, api_name="/inspect")
    assert out[0].startswith("Recorded"), out[0]
    n = len(engine.require().tokenizer.encode(DEFAULT_TEXT))
    status, plot, table, files = c.predict(ACTIONS[0], DEFAULT_CORRUPT, 24, PARTS[0], "all", "0-15", "rows", 8, 0,
                                           api_name="/patching")
    assert "done" in status and "mean recovery" in table, status
    assert len(files) == 3 and plot is not None
    status, plot, table, files = c.predict(ACTIONS[1], DEFAULT_CORRUPT, n - 1, PARTS[0], "0-2", "0-15", "rows", 6,
                                           0, api_name="/patching")
    assert "done" in status and "Strongest restores" in table, status
    status, *_ = c.predict(ACTIONS[0], "too short", 3, PARTS[0], "all", "", "rows", 8, 0, api_name="/patching")
    assert status.startswith("⚠") and "same number of tokens" in status and "Traceback" not in status
    status, *_ = c.predict(ACTIONS[0], DEFAULT_CORRUPT, 3, PARTS[1], "all", "", "rows", 8, 0, api_name="/patching")
    assert "no heads" in status


@pytest.fixture(scope="module")
def v7_app():
    """The app on the shipped RWKV-7 demo model (the RWKV-4 demo is its "other model")."""
    from rwkv_playground.serving.engine import DEMO_CHECKPOINTS, Engine

    engine7 = Engine()
    engine7.load(DEMO_CHECKPOINTS[1])
    try:
        with serving(engine7) as server:
            yield server.url, engine7
    finally:
        engine7.scheduler.close()


def test_the_matrix_inspector_and_patching_through_the_api_on_the_rwkv7_demo(v7_app):
    """/inspect records the matrix state (head parameter), then /patching runs each experiment on
    the RWKV-7 demo: restore per head, the sweep, remove a token, erase and decay knock-outs of key
    channels, blend, two models (against the RWKV-4 demo); a wrong axis is one sentence."""
    from gradio_client import Client

    from rwkv_playground.serving.engine import DEMO_CHECKPOINTS
    from rwkv_playground.ui.patching_panel import ACTIONS, PARTS

    url, engine7 = v7_app
    tokenizer = engine7.require().tokenizer
    corrupt = same_length_corruption(tokenizer, MATRIX_CLEAN)
    n = len(tokenizer.encode(MATRIX_CLEAN))
    c = Client(url, verbose=False)
    out = c.predict("Text below", MATRIX_CLEAN, 2, "0-31", 96, 1, api_name="/inspect")
    assert out[0].startswith("Recorded") and "heads of" in out[0], out[0]

    def run(action, text, position, parts=PARTS[0], layers="all", channels="0-15", axis="rows", removed=0,
            other=None, decay=1.0):
        return c.predict(action, text, position, parts, layers, channels, axis, 8, removed, other, decay,
                         api_name="/patching")

    status, plot, table, files = run(ACTIONS[0], corrupt, 1, parts=PARTS[1], layers="0-1")
    assert "done" in status and "mean recovery" in table and "head" in table, status
    assert len(files) == 3 and plot is not None
    status, _, table, _ = run(ACTIONS[1], corrupt, n - 1)
    assert "done" in status and "Strongest restores" in table, status
    status, _, table, _ = run(ACTIONS[2], "", n - 1, removed=1)
    assert "done" in status and "Removed token 1" in table, status
    status, _, table, _ = run(ACTIONS[4], "", 3, parts=PARTS[2], channels="0-7", axis="rows")
    assert "done" in status and "erased" in table, status
    status, _, table, _ = run(ACTIONS[5], "", 3, parts=PARTS[2], channels="0-7", axis="columns", decay=0.0)
    assert "done" in status and "decay set" in table, status
    status, *_ = run(ACTIONS[5], "", 3, parts=PARTS[2], channels="0-7", axis="rows", decay=0.0)
    assert status.startswith("⚠") and "key channels, which are the matrix's columns" in status, status
    status, _, table, _ = run(ACTIONS[3], corrupt, 0)
    assert "done" in status and "greedy continuation" in table, status
    other = next(name for name in engine7.list_models() if DEMO_CHECKPOINTS[0].name in name)
    status, plot, table, _ = run(ACTIONS[6], "", 0, other=other)
    assert "done" in status and "RWKV-4" in table and "RWKV-7" in table, status
