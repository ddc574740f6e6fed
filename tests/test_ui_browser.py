"""Real-browser tests: Playwright drives Debian's Chromium (no browser download exists here).
They also take the README's screenshots (docs/screenshots/)."""

import shutil
import time
from pathlib import Path

import pytest

from conftest import MATRIX_CLEAN, free_port, paced, same_length_corruption, wait_until

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                 reason="Chromium is not installed (apt-get install chromium); .ci/run installs it"),
              pytest.mark.waiting, pytest.mark.xdist_group("browser")]  # one Chromium for the module, on one worker (pytest.ini)


@pytest.fixture(scope="module")
def page(app_url):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        context = browser.new_context(viewport={"width": 1280, "height": 1000})
        pg = context.new_page()
        outside = []
        pg.on("request", lambda r: outside.append(r.url) if not r.url.startswith(("http://127.0.0.1", "data:", "blob:")) else None)
        pg.goto(app_url)
        pg.locator("#chat-input textarea").wait_for(timeout=30000)
        yield pg
        assert outside == [], f"the page contacted other hosts: {outside[:3]}"
        browser.close()


PACE = {"on": True}


@pytest.fixture(scope="module", autouse=True)
def laptop_speed(engine):
    """Generation at ~40 tokens/s (a laptop CPU on a real model), so the browser can watch a
    reply stream and press Stop; the UI behaviour under test is the same at any speed."""
    with paced(engine, 0.025, when=lambda: PACE["on"]):
        yield


def set_number(page, elem_id, value):
    """Type into a number box until the page keeps the value. Right after an accordion opens,
    Gradio may still be mounting its contents and a first fill can land in an input that is then
    replaced (seen about one run in four): type again until the value stays."""
    box = page.locator(f"#{elem_id} input[type=number]")
    for _ in range(20):
        box.fill(str(value))
        box.blur()
        page.wait_for_timeout(150)
        if box.input_value() == str(value):
            page.wait_for_timeout(150)
            if box.input_value() == str(value):  # still there after the re-render window
                return
    raise AssertionError(f"#{elem_id} did not keep {value}: {box.input_value()!r}")


def bot_texts(page):
    return page.locator("#chatbot [data-testid='bot']").all_inner_texts()


def wait_for_status(page, elem_id, words, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = page.locator(f"#{elem_id}").inner_text()
        if all(w in text for w in words):
            return text
        time.sleep(0.1)
    raise AssertionError(f"#{elem_id} never showed {words}: {page.locator(f'#{elem_id}').inner_text()!r}")


MESSAGE = "Good morrow, sweet lady. What news from the court?"


def seed_with_long_reply(engine, min_tokens=50):
    """The demo model often answers in one short line; find (in-process, same code path and the
    Chat tab's default sampling) a seed whose reply is long enough to watch it stream."""
    PACE["on"] = False  # searching in-process: full speed
    try:
        return _seed_search(engine, min_tokens)
    finally:
        PACE["on"] = True


def _seed_search(engine, min_tokens):
    from rwkv_playground.chat import ChatFormat, ChatSession
    from rwkv_playground.sampling import SamplingSettings

    for seed in range(1, 60):
        session = ChatSession(ChatFormat("Bob", "Alice"))
        settings = SamplingSettings(temperature=1.0, top_p=0.5, top_k=0, presence_penalty=0.4,
                                    count_penalty=0.4, penalty_decay=0.996, seed=seed)
        for _ in session.send(engine, MESSAGE, settings, 120):
            pass
        if len(session.turns[0].reply_tokens) >= min_tokens:
            return seed
    pytest.fail("no seed in 1..59 gives a reply of 50 tokens")


def test_chat_streams_then_stop_and_regenerate(page, engine):
    seed = seed_with_long_reply(engine)
    page.get_by_text("Sampling").first.click()
    set_number(page, "chat-max-tokens", 120)
    set_number(page, "chat-seed", seed)
    page.locator("#chat-input textarea").fill(MESSAGE)
    # every text the last reply shows, recorded in the page itself as it renders (polling from here
    # can miss a short stream on a loaded machine)
    page.evaluate("""() => {
        window.__replies = [];
        const record = () => {
            const bots = document.querySelectorAll("#chatbot [data-testid='bot']");
            const last = bots.length ? bots[bots.length - 1].innerText : "";
            if (last && window.__replies[window.__replies.length - 1] !== last) window.__replies.push(last);
        };
        new MutationObserver(record).observe(document.querySelector("#chatbot"),
                                             {subtree: true, childList: true, characterData: true});
    }""")
    page.locator("#chat-send").click()
    deadline = time.time() + 60
    while time.time() < deadline:
        status = page.locator("#chat-status").inner_text()
        if "tok/s" in status and "Generating" not in status:
            break
        time.sleep(0.05)
    seen = page.evaluate("() => window.__replies")
    assert len(seen) >= 3, f"expected a streamed reply, saw {seen}; status {page.locator('#chat-status').inner_text()!r}"
    assert seen[-1] == bot_texts(page)[-1]
    status = wait_for_status(page, "chat-status", ["generated", "tok/s"])
    assert "prompt tokens read" in status
    page.wait_for_timeout(500)
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "chat.png"), full_page=True)

    # Stop in the middle of a long reply: the partial reply stays, the status says so
    set_number(page, "chat-max-tokens", 2000)
    page.locator("#chat-input textarea").fill("Tell me the whole story of the two houses, at length.")
    page.locator("#chat-send").click()
    deadline = time.time() + 30
    while time.time() < deadline and "Generating" not in page.locator("#chat-status").inner_text():
        time.sleep(0.05)
    time.sleep(0.5)
    page.locator("#chat-stop").click()
    wait_for_status(page, "chat-status", ["Stopped"])
    stopped_reply = bot_texts(page)[-1]
    assert len(page.locator("#chatbot [data-testid='user']").all()) == 2

    # Regenerate: a new reply to the same message, from the saved state
    set_number(page, "chat-max-tokens", 60)
    set_number(page, "chat-seed", 11)
    page.locator("#chat-regenerate").click()
    wait_for_status(page, "chat-status", ["0 prompt tokens read", "generated"])
    assert bot_texts(page)[-1] != stopped_reply
    assert len(page.locator("#chatbot [data-testid='user']").all()) == 2


def test_blog_tab_writes_a_post(page, engine):
    page.get_by_role("tab", name="Blog post").click()
    page.locator("#blog-topic textarea, #blog-topic input").first.fill("the pleasures of a quiet garden")
    page.get_by_text("Sampling").last.click()
    set_number(page, "blog-max-tokens", 250)
    set_number(page, "blog-seed", 3)
    page.locator("#blog-write").click()
    status = wait_for_status(page, "blog-status", ["Done", "generated"], timeout=120)
    assert "250 generated" in status
    shown = page.locator("#blog-output").inner_text()
    assert shown.startswith("Title:")
    # the model's single line breaks stay line breaks (Markdown would join those lines)
    (post,) = [s.text for sessions in engine._visits.values() for s in sessions if getattr(s, "text", "")
               and s.text.startswith("Title:")]
    single_breaks = [line for before, line in zip(post.split("\n"), post.split("\n")[1:]) if before and line.strip()]
    assert single_breaks, post
    for line in single_breaks[:3]:
        assert "\n" + line.strip()[:20] in shown, line
    page.wait_for_timeout(500)
    page.screenshot(path=str(SHOTS / "blog.png"), full_page=True)
    page.get_by_role("tab", name="Chat").click()
    page.locator("#chat-input textarea").wait_for()


def test_inspector_records_and_token_slider_changes_views(page):
    page.get_by_role("tab", name="State inspector").click()
    page.locator("#insp-text textarea").fill("Romeo: But soft, what light through yonder window breaks?\n\n"
                                            "Juliet: O Romeo, Romeo, wherefore art thou Romeo?")
    page.locator("#insp-record").click()
    wait_for_status(page, "insp-status", ["Recorded", "tokens", "Move the sliders"], timeout=60)  # not a progress line
    page.locator("#insp-summary .gtitle").wait_for(timeout=20000)
    info_before = page.locator("#insp-token-info").inner_text()
    assert "Token" in info_before
    rng = page.locator("#insp-token input[type=range]")
    rng.focus()
    for _ in range(5):
        rng.press("ArrowLeft")
    select_token(page, 3)
    assert "window" in page.locator("#insp-token-info").inner_text()
    assert page.locator("#insp-token-info").inner_text() != info_before
    page.get_by_role("tab", name="WKV accumulators").click()
    wait_for_figure(page, "insp-plot", "value estimate", "heatmaplayer")
    page.wait_for_timeout(900)
    page.screenshot(path=str(SHOTS / "inspector.png"), full_page=True)


GUIDED_TEXT = ("ROMEO: Good night, good night! Parting is such sweet sorrow,\n"
               "That I shall say good night till it be morrow.\n\n"
               "JULIET: Sleep dwell upon thine eyes, peace in thy breast!")  # README's guided example


def select_token(page, position):
    """Type the Token slider's number until the inspector shows that token and the slider keeps it.
    Right after Record the slider is re-rendered with its new maximum, and the record event's
    completion can set it to the last token once more just after its last update arrived (seen: an
    experiment then ran at token 47): type again until the value stays."""
    box = page.locator("#insp-token input[type=number]")
    for _ in range(20):
        box.fill(str(position))
        box.press("Enter")
        deadline = time.time() + 2
        while time.time() < deadline:
            if f"Token {position} " in page.locator("#insp-token-info").inner_text():
                page.wait_for_timeout(400)  # past a late completion of the Record event
                if box.input_value() == str(position) and f"Token {position} " in page.locator(
                        "#insp-token-info").inner_text():
                    return
                break
            time.sleep(0.1)
    raise AssertionError(f"the inspector never showed token {position}: "
                         f"{page.locator('#insp-token-info').inner_text()!r}")


def run_experiment(page, name):
    page.locator("#exp-kind").get_by_label(name, exact=True).check()
    page.locator("#exp-run").click()
    status = wait_for_status(page, "exp-status", [f"{name} done"], timeout=60)
    assert "⚠" not in status
    files = page.locator("#exp-files").inner_text()
    assert all(suffix in files for suffix in (".html", ".csv", ".json")), files


def wait_for_figure(page, elem_id, title, layer, timeout=20):
    """Until the plot shows the new figure: its title and at least one trace of its kind. (Read
    from the DOM, not by visibility: once, after a long suite, Playwright kept a drawn figure's
    first layer "hidden" for 20 s while the page showed it.)"""
    deadline = time.time() + timeout
    while time.time() < deadline:
        titles = page.locator(f"#{elem_id} .gtitle").all_text_contents()
        if any(title in t for t in titles) and page.locator(f"#{elem_id} .{layer} > *").count() > 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"#{elem_id} never drew {title!r}: titles {page.locator(f'#{elem_id} .gtitle').all_text_contents()}")


def test_experiments_tab_knockout_memory_probe_and_causal_trace(page, engine):
    """The README's guided example, clicked through: record a dialogue, erase every layer's memory
    right after the speaker's name, follow the name's weight, trace a token; screenshots for the README."""
    page.get_by_role("tab", name="State inspector").click()
    page.locator("#insp-text textarea").fill(GUIDED_TEXT)
    page.locator("#insp-record").click()
    wait_for_status(page, "insp-status", ["Recorded", "tokens", "Move the sliders"], timeout=60)  # not a progress line
    page.get_by_role("tab", name="Experiments").click()
    select_token(page, 4)  # ' Good': the state right after "ROMEO:" is edited
    page.locator("#exp-channel-mode input").click()
    page.get_by_role("option", name="Channels listed").click()
    page.locator("#exp-channels textarea").fill("0-255")
    run_experiment(page, "Knock-out")
    wait_for_figure(page, "exp-plot", "Knock-outs", "scatterlayer")
    assert "L5 ch 0-255 @4 erase" in page.locator("#exp-summary").inner_text()
    page.wait_for_timeout(600)
    page.locator("#exp-plot").screenshot(path=str(SHOTS / "experiment-knockout.png"))
    select_token(page, 2)  # the name's last token
    run_experiment(page, "Memory probe")
    wait_for_figure(page, "exp-plot", "Memory probe", "scatterlayer")
    page.wait_for_timeout(600)
    page.locator("#exp-plot").screenshot(path=str(SHOTS / "experiment-memory-probe.png"))
    ids = engine.require().tokenizer.encode(GUIDED_TEXT)
    target = [engine.require().tokenizer.token_text(t) for t in ids].index("ET")  # JUL|I|ET
    select_token(page, target)
    run_experiment(page, "Causal trace")
    wait_for_figure(page, "exp-plot", "Causal trace", "heatmaplayer")
    page.wait_for_timeout(600)
    page.locator("#exp-plot").screenshot(path=str(SHOTS / "experiment-causal-trace.png"))


def edit_cell_text(page, index, text):
    """Type a text cell's source and leave the box: the edit is taken on blur."""
    box = page.locator(f"#nb-cell-{index}-text textarea")
    box.fill(text)
    box.blur()
    wait_for_status(page, "nb-status", [f"Cell {index + 1} changed"], timeout=20)


def add_cell(page, kind, count):
    page.locator(f"#nb-add-{kind}").click()
    wait_for_status(page, "nb-status", [f"Added a {kind} cell ({count} cells)"], timeout=20)
    page.locator(f"#nb-cell-{count - 1}-text textarea").wait_for(timeout=20000)


def test_notebook_tab_add_edit_rerun_and_fork(page):
    """Cells over one state, clicked through: add text and generate cells, run all, edit the third
    cell and run again (only it and the one below run), fork the last cell and keep a branch;
    the README's screenshot."""
    page.get_by_role("tab", name="Notebook").click()
    add_cell(page, "text", 1)
    assert "ROMEO" in page.locator("#nb-cell-0-text textarea").input_value()  # the starter text
    add_cell(page, "generate", 2)
    limit = page.locator("#nb-cell-1-max input")
    assert limit.is_editable() and page.locator("#nb-cell-1-seed input").is_editable()  # not drawn disabled
    limit.fill("48")  # (a new generate cell writes 60)
    limit.blur()
    wait_for_status(page, "nb-status", ["Cell 2 changed"], timeout=20)
    add_cell(page, "text", 3)
    edit_cell_text(page, 2, "\n\nROMEO: What say'st thou, sweet?\n\nJULIET:")
    add_cell(page, "generate", 4)
    page.locator("#nb-run-all").click()
    status = wait_for_status(page, "nb-status", ["Ran cells 1-4"], timeout=90)
    assert "0 tokens above" in status
    wait_for_status(page, "nb-cell-3-head", ["up to date"], timeout=20)  # the cells drawn again
    first_output = page.locator("#nb-cell-1-text textarea").input_value()
    assert first_output

    edit_cell_text(page, 2, "\n\nROMEO: Wilt thou leave me so unsatisfied?\n\nJULIET:")
    wait_for_status(page, "nb-cell-3-head", ["needs a run"], timeout=20)  # drawn again after the edit
    assert "needs a run" in page.locator("#nb-cell-2-head").inner_text()
    assert "up to date" in page.locator("#nb-cell-1-head").inner_text()
    page.locator("#nb-run-all").click()
    status = wait_for_status(page, "nb-status", ["Ran cells 3-4", "not read again"], timeout=90)
    assert "0 tokens above" not in status
    wait_for_status(page, "nb-cell-3-head", ["up to date"], timeout=20)
    assert page.locator("#nb-cell-1-text textarea").input_value() == first_output  # above the edit: kept

    page.locator("#nb-cell-3-fork").click()
    wait_for_status(page, "nb-status", ["Cell 4: 3 continuations"], timeout=90)
    page.locator("#nb-cell-3-branch-2 textarea").wait_for(timeout=20000)
    branch = page.locator("#nb-cell-3-branch-1 textarea").input_value()
    page.wait_for_timeout(500)
    page.screenshot(path=str(SHOTS / "notebook.png"), full_page=True)
    page.locator("#nb-cell-3-keep-1").click()
    wait_for_status(page, "nb-status", ["Kept continuation 2 in cell 4"], timeout=20)
    deadline = time.time() + 10
    while time.time() < deadline and page.locator("#nb-cell-3-text textarea").input_value() != branch:
        time.sleep(0.1)
    assert page.locator("#nb-cell-3-text textarea").input_value() == branch
    assert page.locator("#nb-cell-3-branches").count() == 0


def test_closing_the_tab_frees_that_visitors_sessions(app_url, engine, page):
    """Gradio's unload: the page's chat state is released at once (not after the session TTL)."""
    before = set(engine._visits)
    other = page.context.new_page()
    other.goto(app_url)
    other.locator("#chat-input textarea").wait_for(timeout=30000)
    deadline = time.time() + 10
    while time.time() < deadline and not set(engine._visits) - before:
        time.sleep(0.05)
    (visitor,) = set(engine._visits) - before
    chat = engine._visits[visitor][0]
    PACE["on"] = False
    try:
        other.locator("#chat-input textarea").fill("Good morrow.")
        other.locator("#chat-send").click()
        wait_for_status(other, "chat-status", ["generated"])
    finally:
        PACE["on"] = True
    assert chat.turns and chat.memory_bytes() > 0 and chat in engine.memory.sessions()
    other.close()
    deadline = time.time() + 20
    while time.time() < deadline and visitor in engine._visits:
        time.sleep(0.1)
    assert visitor not in engine._visits
    assert chat.memory_bytes() == 0 and chat not in engine.memory.sessions()


def test_an_api_stream_and_a_browser_chat_at_once(page, app_url, engine):
    """A program streams from /v1/completions while a visitor chats in Chromium: both are served
    in the same ticks, and the program gets the tokens it gets alone."""
    import concurrent.futures
    import json

    import httpx

    # long enough (1000 tokens at the module's 40 tokens/s) for any chat reply to fit inside it
    body = {"model": "rwkv4-demo-shakespeare", "prompt": "HAMLET:", "max_tokens": 1000, "seed": 8,
            "logit_bias": {"0": -100}}

    def api_text(stream: bool) -> str:
        if not stream:
            return httpx.post(app_url + "v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
        text = ""
        with httpx.stream("POST", app_url + "v1/completions", json={**body, "stream": True}, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["text"]
        return text

    PACE["on"] = False
    try:
        alone = api_text(stream=False)
    finally:
        PACE["on"] = True
    visitor = page.context.new_page()
    try:
        visitor.goto(app_url)
        visitor.locator("#chat-input textarea").wait_for(timeout=30000)
        ticks_before = engine.scheduler.ticks
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            program = pool.submit(api_text, True)
            assert wait_until(lambda: engine.scheduler.status()["generating"])
            visitor.locator("#chat-input textarea").fill("Good morrow, my lord.")
            visitor.locator("#chat-send").click()
            wait_for_status(visitor, "chat-status", ["generated", "tok/s"])
            chatted_while_streaming = not program.done()
            assert program.result() == alone
        assert chatted_while_streaming, "the browser's reply came while the API stream ran"
        assert visitor.locator("#chatbot [data-testid='bot']").all_inner_texts()[-1].strip()
        sizes = list(engine.scheduler.batch_sizes)[-(engine.scheduler.ticks - ticks_before):]
        assert 2 in sizes, "the two generations shared ticks"
    finally:
        visitor.close()



def user_texts(page):
    return page.locator("#chatbot [data-testid='user']").all_inner_texts()


def test_a_reload_brings_the_conversation_back(page, engine):
    """The visitor's key lives in the browser's storage: a reload shows the same conversation, in
    the list, and the next message reads only its own tokens."""
    PACE["on"] = False
    try:
        page.get_by_role("tab", name="Chat").click()
        page.locator("#chat-new").click()
        wait_for_status(page, "chat-status", ["A new conversation"])
        page.locator("#chat-input textarea").fill("Good morrow, kind sir. How fares the king?")
        page.locator("#chat-send").click()
        wait_for_status(page, "chat-status", ["generated", "tok/s"])
        users, bots = user_texts(page), bot_texts(page)
        engine.store.flush()
        page.reload()
        page.locator("#chat-input textarea").wait_for(timeout=30000)
        assert wait_until(lambda: user_texts(page) == users, timeout=20), user_texts(page)
        assert bot_texts(page) == bots
        assert "Good morrow, kind sir" in page.locator("#chat-conversations input").input_value()
        page.locator("#chat-input textarea").fill("And the queen?")
        page.locator("#chat-send").click()
        status = wait_for_status(page, "chat-status", ["generated", "tok/s"])
        assert "reused from the state" in status and "re-read" not in status.replace("(not re-read)", "")
    finally:
        PACE["on"] = True


def test_a_server_killed_mid_reply_comes_back_in_the_browser(tmp_path, engine, app_model_path, page):
    """SIGKILL in the middle of a reply; the server restarts on the same data folder and port; a
    reload in the same browser shows the first turn as it was and the cut reply as interrupted,
    with the text that had been shown."""
    import signal

    from test_saved_work import replies_in_process, start_app

    first, second = "Good morrow, sweet lady.", "Tell me all the news of Verona, I pray thee."

    def conversation(seed):  # the Chat tab's default sampling (top_p 0.5), in this process
        return replies_in_process(engine, [1, seed], [30, 200], messages=[first, second], top_p=0.5)

    PACE["on"] = False
    try:
        seed = next((s for s in range(1, 80) if len(conversation(s).turns[1].reply_tokens) >= 40), None)
        assert seed is not None
        expected = conversation(seed)
    finally:
        PACE["on"] = True
    data, port = tmp_path / "data", free_port()
    url = f"http://127.0.0.1:{port}/"
    procs = [start_app(data, port, app_model_path, 0.05, tmp_path / "app.log")]
    context = page.context.browser.new_context(viewport={"width": 1280, "height": 1000})  # its own storage
    try:
        pg = context.new_page()
        pg.goto(url)
        pg.locator("#chat-input textarea").wait_for(timeout=30000)
        pg.get_by_text("Sampling").first.click()
        set_number(pg, "chat-max-tokens", 30)
        set_number(pg, "chat-seed", 1)
        pg.locator("#chat-input textarea").fill(first)
        pg.locator("#chat-send").click()
        wait_for_status(pg, "chat-status", ["generated", "tok/s"])
        assert bot_texts(pg) == [expected.turns[0].reply]
        set_number(pg, "chat-max-tokens", 200)
        set_number(pg, "chat-seed", seed)
        pg.locator("#chat-input textarea").fill(second)
        pg.locator("#chat-send").click()
        assert wait_until(lambda: len(bot_texts(pg)) == 2 and len(bot_texts(pg)[-1].split()) >= 4, timeout=60)
        time.sleep(1.2)  # past one more save of the text so far
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(timeout=30)
        shown = bot_texts(pg)[-1].strip()

        procs.append(start_app(data, port, app_model_path, 0.0, tmp_path / "app.log"))
        for attempt in range(3):  # the page's own reconnection to the dead server may abort one reload
            try:
                pg.reload()
                break
            except Exception as exc:  # playwright's Error: net::ERR_ABORTED
                if attempt == 2 or "ERR_ABORTED" not in str(exc):
                    raise
                time.sleep(1.0)
        pg.locator("#chat-input textarea").wait_for(timeout=30000)
        assert wait_until(lambda: len(user_texts(pg)) == 2, timeout=30), user_texts(pg)
        assert [u.strip() for u in user_texts(pg)] == [first, second]
        replies = bot_texts(pg)
        assert replies[0].strip() == expected.turns[0].reply
        assert "interrupted" in replies[1]
        partial = replies[1].split("(interrupted")[0].strip()
        full = expected.turns[1].reply
        assert partial and full.startswith(partial) and full.startswith(shown) and len(partial) < len(full)
        pg.screenshot(path=str(SHOTS / "chat-after-restart.png"), full_page=False)
        # the first turn's state came back from the store: the next message reads only the cut
        # reply and itself, not the first turn
        pg.locator("#chat-input textarea").fill("Go on.")
        pg.locator("#chat-send").click()
        status = wait_for_status(pg, "chat-status", ["generated", "tok/s"])
        assert "read back from your saved work" in status
        assert f"{len(expected.history_tokens(1))} history tokens reused" in status
    finally:
        context.close()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)


def test_the_matrix_inspector_and_patching_on_the_rwkv7_demo(page):
    """The RWKV-7 demo model in its own app: Record draws the Matrix state tab (exact attention per
    head, the state matrix), the head slider moves it, and the Patching tab restores from the
    clean run and sweeps layers x positions; screenshots for the README."""
    from rwkv_playground.serving.engine import DEMO_CHECKPOINTS, Engine
    from rwkv_playground.ui import create_app, launch

    engine7 = Engine()
    loaded = engine7.load(DEMO_CHECKPOINTS[1])
    corrupt = same_length_corruption(loaded.tokenizer, MATRIX_CLEAN)
    port = free_port()
    demo = create_app(engine7)
    launch(demo, engine7, port=port, prevent_thread_lock=True, quiet=True)
    pg = page.context.new_page()
    try:
        pg.goto(f"http://127.0.0.1:{port}/")
        pg.locator("#chat-input textarea").wait_for(timeout=30000)
        pg.get_by_role("tab", name="State inspector").click()
        pg.locator("#insp-text textarea").fill(MATRIX_CLEAN)
        pg.locator("#insp-record").click()
        status = wait_for_status(pg, "insp-status", ["Recorded", "heads of", "Move the sliders"], timeout=60)
        assert "⚠" not in status
        pg.get_by_role("tab", name="Matrix state (RWKV-5/6/7)").click()
        wait_for_figure(pg, "insp-m-attention", "exact effective attention", "heatmaplayer")
        wait_for_figure(pg, "insp-m-matrix", "the state matrix after token", "heatmaplayer")
        box = pg.locator("#insp-head input[type=number]")
        box.fill("2")
        box.press("Enter")
        wait_for_figure(pg, "insp-m-matrix", "head 2: the state matrix", "heatmaplayer")
        pg.wait_for_timeout(600)
        pg.locator("#insp-m-attention").screenshot(path=str(SHOTS / "matrix-attention.png"))
        pg.locator("#insp-m-matrix").screenshot(path=str(SHOTS / "matrix-state.png"))
        pg.get_by_role("tab", name="Patching").click()
        pg.locator("#patch-text textarea").fill(corrupt)
        select_token(pg, 2)  # the state right after the name's first tokens
        pg.locator("#patch-run").click()
        status = wait_for_status(pg, "patch-status", ["done"], timeout=60)
        assert "⚠" not in status, status
        wait_for_figure(pg, "patch-plot", "Restored from the clean run", "heatmaplayer")
        assert "mean recovery" in pg.locator("#patch-summary").inner_text()
        files = pg.locator("#patch-files").inner_text()
        assert all(s in files for s in (".html", ".csv", ".json")), files
        pg.wait_for_timeout(600)
        pg.locator("#patch-plot").screenshot(path=str(SHOTS / "patching-restore.png"))
        select_token(pg, len(loaded.tokenizer.encode(MATRIX_CLEAN)) - 1)
        pg.locator("#patch-action").get_by_label("Restore sweep (causal trace)", exact=True).check()
        pg.locator("#patch-run").click()
        status = wait_for_status(pg, "patch-status", ["Restore sweep (causal trace): done"], timeout=90)
        wait_for_figure(pg, "patch-plot", "Causal trace by restoring", "heatmaplayer")
        pg.wait_for_timeout(600)
        pg.locator("#patch-plot").screenshot(path=str(SHOTS / "patching-sweep.png"))
        # a decay knock-out of RWKV-7's key channels (the matrix's columns): forget at once
        select_token(pg, 3)
        pg.locator("#patch-action").get_by_label("Knock out (set the decay of) the parts", exact=True).check()
        pg.locator("#patch-parts input").click()
        pg.get_by_role("option", name="channels of the chosen layers").click()
        pg.locator("#patch-axis input").click()
        pg.get_by_role("option", name="columns").click()
        pg.locator("#patch-decay input").fill("0")
        pg.locator("#patch-run").click()
        wait_for_status(pg, "patch-status", ["Knock out (set the decay of) the parts: done"], timeout=90)
        wait_for_figure(pg, "patch-plot", "decay set to 0", "heatmaplayer")
        assert "decay set" in pg.locator("#patch-summary").inner_text()
    finally:
        pg.close()
        demo.close()
        engine7.scheduler.close()
