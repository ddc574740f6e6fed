"""Saved work through the app's own API (gradio_client): a visitor's key brings back their
conversations in another client; conversations are listed, renamed, exported, deleted; another
key sees nothing of them; and a server killed with SIGKILL in the middle of a reply comes back on
the same data folder with every earlier turn and state bit for bit, the reply in flight as an
interrupted reply with the text shown, and the next message reading only what it must."""

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, free_port

SAMPLING = [1.0, 0.7, 0, 0.4, 0.4, 0.996]  # temperature, top_p, top_k, presence, count, decay
INTERRUPTED = "*(interrupted: the server stopped while writing this reply)*"


def text_of(message):
    content = message["content"]
    if isinstance(content, list):
        content = "".join(part.get("text", "") for part in content)
    return content


def chat(client, message, max_tokens, seed):
    return client.predict(message, "Bob", "Alice", "", *SAMPLING, max_tokens, seed, "", api_name="/chat")


def exported_state(client):
    files, status = client.predict(api_name="/chat_export")
    paths = files["value"] if isinstance(files, dict) else files
    state = [p for p in paths if str(p).endswith(".safetensors")]
    assert state, status
    return load_file(state[0])


@pytest.fixture
def client_at(app_url):
    from gradio_client import Client

    return lambda: Client(app_url, verbose=False)


def test_a_key_brings_the_conversations_back_and_reaches_only_its_own(client_at, engine):
    first = client_at()
    key = first.predict(None, api_name="/resume")[0]
    assert isinstance(key, str) and len(key) >= 43
    chat(first, "Good morrow, my lord.", 12, 1)
    messages = chat(first, "What news?", 12, 2)[0]
    engine.store.flush()

    again = client_at()  # another tab, a reload, a browser restart: the same key
    resumed = again.predict(key, api_name="/resume")
    assert resumed[0] == key and [text_of(m) for m in resumed[1]] == [text_of(m) for m in messages]
    assert "as you left it" in resumed[2]
    assert list(resumed[16:18]) == [12, 2]  # its sampling controls as last used (max tokens, seed)
    out = chat(again, "Farewell.", 8, 3)
    assert "read back from your saved work" in out[1] and "history tokens re-read" not in out[1]

    # the list: a new conversation, renamed; the first one is still there and opens
    listed = again.predict(api_name="/chat_new")
    assert listed[0] == [] and listed[7]["value"] == "new"
    chat(again, "A second matter.", 6, 4)
    renamed = again.predict("Second matter", api_name="/chat_rename")
    choices = {label.split(" · ")[0]: value for label, value in renamed[7]["choices"]}
    assert set(choices) == {"Second matter", "Good morrow, my lord."}
    opened = again.predict(choices["Good morrow, my lord."], api_name="/chat_open")
    assert len(opened[0]) == 6 and text_of(opened[0][0]) == "Good morrow, my lord."
    exported = again.predict(api_name="/chat_export")[0]
    paths = exported["value"] if isinstance(exported, dict) else exported
    markdown = Path([p for p in paths if str(p).endswith(".md")][0]).read_text()
    assert "**Bob:** Good morrow, my lord." in markdown and "**Bob:** Farewell." in markdown

    # another visitor (a new key, a forged key) sees none of it
    stranger = client_at()
    other = stranger.predict(None, api_name="/resume")
    assert other[0] != key and other[1] == [] and not any(
        v != "new" for _, v in other[8]["choices"])
    forged = client_at().predict(key[:-1] + ("A" if key[-1] != "A" else "B"), api_name="/resume")
    assert forged[0] != key and forged[1] == [] and "new, empty workspace" in forged[2]
    refused = stranger.predict(choices["Good morrow, my lord."], api_name="/chat_open")
    assert refused[0] == [] and "not in your saved work" in refused[1]

    # delete one, then everything
    gone = again.predict(api_name="/chat_delete")
    assert "deleted" in gone[1]
    assert len(again.predict(api_name="/chat_new")[7]["choices"]) == 2  # the other one, and "new"
    refused = again.predict(False, key, api_name="/delete_my_data")
    assert "Tick the box" in refused[-1]
    wiped = again.predict(True, key, api_name="/delete_my_data")
    assert wiped[0] == key and wiped[1] == [] and "deleted" in wiped[-1]
    engine.store.flush()
    assert client_at().predict(key, api_name="/resume")[1] == []


# ---- a real process, killed -----------------------------------------------------------------
def start_app(data_dir: Path, port: int, model: Path, pace: float, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PACED_STEP_S": str(pace), "GRADIO_ANALYTICS_ENABLED": "False",
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "paced_app.py"), "--model", str(model),
                             "--data-dir", str(data_dir), "--port", str(port), "--no-api"],
                            cwd=ROOT, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the app exited ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/gradio_api/info", timeout=2)
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    pytest.fail(f"the app did not start within 120 s: {log.read_text()[-2000:]}")


@pytest.fixture
def processes():
    started = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


MESSAGES = ["Good morrow, sweet lady.", "What news from the court?", "Tell me all, I pray thee."]


def replies_in_process(engine, seeds, max_tokens, messages=MESSAGES, top_p=0.7):
    """The same conversation in this process (same model, same code, the app's sampling with
    `top_p`): the ChatSession, with each turn's reply and tokens."""
    from rwkv_playground.chat import ChatFormat, ChatSession
    from rwkv_playground.sampling import SamplingSettings

    session = ChatSession(ChatFormat("Bob", "Alice"))
    for message, seed, limit in zip(messages, seeds, max_tokens):
        settings = SamplingSettings(temperature=1.0, top_p=top_p, top_k=0, presence_penalty=0.4, count_penalty=0.4,
                                    penalty_decay=0.996, seed=seed)
        for _ in session.send(engine, message, settings, limit):
            pass
    return session


def test_sigkill_mid_reply_then_restart_loses_only_the_reply_in_flight(tmp_path, engine, app_model_path,
                                                                      processes):
    from gradio_client import Client

    limits = [16, 16, 200]
    seed = next((s for s in range(1, 80)
                 if len(replies_in_process(engine, [1, 2, s], limits).turns[2].reply_tokens) >= 40), None)
    assert seed is not None, "no seed gives the third reply 40 tokens"
    expected = replies_in_process(engine, [1, 2, seed], limits)

    data, port = tmp_path / "data", free_port()
    processes.append(start_app(data, port, app_model_path, 0.05, tmp_path / "app.log"))
    url = f"http://127.0.0.1:{port}/"
    client = Client(url, verbose=False)
    key = client.predict(None, api_name="/resume")[0]
    before = [chat(client, m, n, s) for m, n, s in zip(MESSAGES[:2], limits[:2], [1, 2])][-1][0]
    assert [text_of(m) for m in before[1::2]] == [t.reply for t in expected.turns[:2]]
    state_before = exported_state(client)

    job = client.submit(MESSAGES[2], "Bob", "Alice", "", *SAMPLING, limits[2], seed, "", api_name="/chat")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        outs = job.outputs()
        if outs and len(outs[-1][0]) == 6 and len(text_of(outs[-1][0][-1]).split()) >= 4:
            break
        time.sleep(0.05)
    time.sleep(1.2)  # past one more save of the text so far
    processes[0].send_signal(signal.SIGKILL)
    processes[0].wait(timeout=30)
    shown = text_of(job.outputs()[-1][0][-1])
    assert not job.done() or job.status().code.name != "FINISHED" or shown != expected.turns[2].reply

    processes.append(start_app(data, port, app_model_path, 0.0, tmp_path / "app.log"))
    again = Client(url, verbose=False)
    resumed = again.predict(key, api_name="/resume")
    messages = resumed[1]
    assert [text_of(m) for m in messages[:4]] == [text_of(m) for m in before]
    assert text_of(messages[4]) == MESSAGES[2] and text_of(messages[5]).endswith(INTERRUPTED)
    partial = text_of(messages[5])[:-len(INTERRUPTED)].strip()
    full = expected.turns[2].reply
    assert partial and full.startswith(partial) and full.startswith(shown)
    assert len(partial) < len(full)  # cut, not finished
    # every earlier state, bit for bit
    state_after = exported_state(again)
    assert state_after.keys() == state_before.keys()
    assert all(torch.equal(state_after[k], state_before[k]) for k in state_before)
    # the next message: the second turn's state from the store, the interrupted turn read once
    out = chat(again, "Go on.", 8, 5)
    last = out[2][-1]
    assert last["state_from_store"] and last["tokens_saved"] == len(expected.history_tokens(2))
    assert 0 < last["history_reread"] < 200


def test_a_process_that_never_saw_the_page_takes_over_with_the_key(client_at, engine):
    """What a failover looks like to the process that takes over: a /chat call for a session it
    never saw, with the visitor's key (the browser sends it with every message): the visitor's
    conversation as it was after their last finished turn, its state from the store."""
    first = client_at()
    key = first.predict(None, api_name="/resume")[0]
    chat(first, "Good morrow, my lord.", 12, 1)
    before = chat(first, "What news?", 12, 2)[0]
    engine.store.flush()
    other = client_at()  # no resume: as if this were another process
    out = other.predict("And then?", "Bob", "Alice", "", *SAMPLING, 8, 3, "", key, api_name="/chat")
    assert [text_of(m) for m in out[0][:4]] == [text_of(m) for m in before] and len(out[0]) == 6
    assert "took over your session" in out[1] and "read back from your saved work" in out[1]
    assert out[2][-1]["tokens_saved"] > 0 and "history_reread" not in out[2][-1]
    # an unknown key takes over nothing (and is not given a workspace either)
    stranger = client_at().predict("Hello.", "Bob", "Alice", "", *SAMPLING, 4, 1, "", "x" * 43, api_name="/chat")
    assert len(stranger[0]) == 2 and "took over" not in stranger[1]
