"""Engine-side logic behind the Chat and Blog tabs (no Gradio): state reuse, regenerate, undo,
stop mid-stream, isolation, outline forks, states dropped and rebuilt, and the model folder's path
safety. Sessions run the model through the engine's scheduler."""

import gradio as gr
import pytest
import torch

from rwkv_playground import GenerationError, LoadError
from rwkv_playground.blog import BlogSession, build_prompt, parse_outline, DEFAULT_TEMPLATE
from rwkv_playground.chat import ChatFormat, ChatSession, newline_bias
from rwkv_playground.sampling import SamplingSettings


def settings(seed=1):
    return SamplingSettings(temperature=1.0, top_p=0.8, presence_penalty=0.4, count_penalty=0.4, seed=seed)


def run(stream):
    last = ""
    for last in stream:
        pass
    return last


def state_after_text(loaded, text):
    return loaded.runtime.forward(loaded.tokenizer.encode(text))


def test_turn_reads_only_new_tokens_and_state_matches_history(engine, loaded):
    enc = loaded.tokenizer.encode
    s = ChatSession(ChatFormat("Bob", "Alice"))
    reply1 = run(s.send(engine, "Good morrow, sweet lady.", settings(1), 30))
    first = s.turns[0]
    assert first.stats["prompt_tokens"] == len(enc("Bob: Good morrow, sweet lady.\n\nAlice:"))
    assert reply1 == first.reply == loaded.tokenizer.decode(first.reply_tokens).strip()
    run(s.send(engine, "What news?", settings(2), 30))
    second = s.turns[1]
    assert second.stats["prompt_tokens"] == len(enc("\n\nBob: What news?\n\nAlice:"))
    assert second.stats["tokens_saved"] == first.state_after.token_count > 0
    # the state equals reading the whole conversation's tokens from scratch
    expected_logits, expected_state = loaded.runtime.forward(
        enc("Bob: Good morrow, sweet lady.\n\nAlice:") + first.reply_tokens
        + enc("\n\nBob: What news?\n\nAlice:") + second.reply_tokens)
    assert torch.allclose(second.logits_after, expected_logits, atol=1e-3)
    assert torch.allclose(second.state_after.value_estimate(), expected_state.value_estimate(), atol=1e-4)


def test_regenerate_uses_saved_state_and_seed(engine, loaded):
    s = ChatSession()
    a = run(s.send(engine, "Speak, I pray thee.", settings(5), 25))
    b = run(s.regenerate(engine, settings(5), 25))
    assert a == b and s.turns[-1].stats["prompt_tokens"] == 0
    c = run(s.regenerate(engine, settings(6), 25))
    assert len(s.turns) == 1 and isinstance(c, str)


def test_undo_returns_to_previous_state(engine, loaded):
    s1 = ChatSession()
    run(s1.send(engine, "Hello.", settings(1), 20))
    run(s1.send(engine, "A detour.", settings(2), 20))
    assert s1.undo() == "A detour."
    r1 = run(s1.send(engine, "How fares the king?", settings(3), 20))
    s2 = ChatSession()
    run(s2.send(engine, "Hello.", settings(1), 20))
    r2 = run(s2.send(engine, "How fares the king?", settings(3), 20))
    assert r1 == r2


def test_stop_mid_stream_keeps_history_and_state_consistent(engine, loaded):
    s = ChatSession()
    stream = s.send(engine, "Tell me a long tale.", settings(4), 200)
    shown = ""
    for shown in stream:
        if len(shown) > 15:
            break
    stream.close()  # what Gradio does on Stop
    turn = s.turns[-1]
    assert turn.complete and turn.reply == shown.strip()
    assert turn.stats["stop_reason"] == "closed"
    # the next turn continues from exactly the shown text
    reply = run(s.send(engine, "Go on.", settings(5), 10))
    assert isinstance(reply, str) and len(s.turns) == 2


def test_stop_while_reading_the_message_drops_the_turn(engine, loaded):
    s = ChatSession()
    stream = s.send(engine, "word " * 700, settings(), 10)
    assert next(stream) == ""
    stream.close()
    assert s.turns == []


def test_sessions_are_isolated_and_empty_message_is_refused(engine, loaded):
    a, b = ChatSession(), ChatSession()
    run(a.send(engine, "Only for A.", settings(1), 10))
    assert b.turns == [] and b.state is None
    with pytest.raises(GenerationError, match="Type a message"):
        run(b.send(engine, "   ", settings(), 10))


def test_format_and_newline_bias():
    fmt = ChatFormat("User", "Assistant", scenario="A chat.")
    assert fmt.turn_prompt("hi\n\n\nthere", first=True) == "A chat.\n\nUser: hi\nthere\n\nAssistant:"
    assert fmt.turn_prompt("again", first=False) == "\n\nUser: again\n\nAssistant:"
    assert newline_bias(0) == float("-inf") and newline_bias(20) == -2.0
    assert newline_bias(100) == 0 and newline_bias(1000) == 3.0


def test_blog_write_continue_and_constant_state(engine, loaded):
    b = BlogSession()
    prompt = build_prompt(DEFAULT_TEMPLATE, "the art of sleep", audience="students", tone="light",
                          key_points="dreams\n- naps")
    assert "The readers are students." in prompt and "Cover these points: dreams; naps." in prompt
    text1 = run(b.write(engine, prompt, settings(1), 120))
    assert text1.startswith("Title:") and b.state is not None
    size = b.state.nbytes()
    count = b.state.token_count
    text2 = run(b.continue_(engine, settings(2), 120))
    assert text2.startswith(text1) and len(text2) > len(text1)
    assert b.state.nbytes() == size and b.state.token_count > count  # memory is constant
    with pytest.raises(GenerationError, match="topic"):
        build_prompt(DEFAULT_TEMPLATE, "  ")


def test_outline_sections_fork_the_outline_state(engine, loaded):
    from rwkv_playground.blog import OUTLINE_TEMPLATE

    b = BlogSession()
    forks = []
    original_clone = type(loaded.runtime.new_state()).clone

    def spy(self):
        copy = original_clone(self)
        forks.append(copy)
        return copy

    type(loaded.runtime.new_state()).clone = spy
    try:
        text = run(b.write_with_outline(engine, build_prompt(OUTLINE_TEMPLATE, "gardens"), settings(3), 40))
    finally:
        type(loaded.runtime.new_state()).clone = original_clone
    assert text.startswith("Outline:\n1.")
    assert parse_outline("1. Intro\n2) Body:\n- Extra\nplain") == ["Intro", "Body", "Extra"]
    assert forks  # sections started from copies of the outline state


def test_models_folder_path_safety(engine, tmp_path):
    assert "other-tiny.pth" in engine.list_models()
    assert engine.resolve_choice("other-tiny.pth").name == "other-tiny.pth"
    (tmp_path / "secret.pth").write_bytes(b"x")
    for bad in ("../secret.pth", str(tmp_path / "secret.pth"), "/etc/passwd", "other-tiny.txt", "../../x.pth"):
        with pytest.raises(LoadError):
            engine.resolve_choice(bad)


def test_download_offline_gives_a_clear_message_at_once(engine, monkeypatch):
    import time

    from huggingface_hub import constants

    from conftest import free_port

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LoadError, match="Download failed.*offline mode"):
        engine.download("RWKV-4 Pile 169M")
    # no network: a hub that does not answer is said at once (huggingface_hub alone retried for 23 s)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    with pytest.raises(LoadError, match=r"Download failed \(is this machine offline\?\): 127.0.0.1 cannot be reached"):
        engine.download("RWKV-4 Pile 169M")
    assert time.monotonic() - started < 5


def test_event_functions_in_process(engine):
    """The Gradio handlers themselves, called directly (no server)."""
    from rwkv_playground.inspector import InspectorSession
    from rwkv_playground.ui import create_app

    demo = create_app(engine)
    fns = {f.api_name: f.fn for f in demo.fns.values() if f.api_name}
    sampling = (1.0, 0.7, 0, 0.4, 0.4, 0.996)
    chat = ChatSession()
    outs = list(fns["chat"]("Good morrow.", chat, "Bob", "Alice", "", *sampling, 20, 1))
    messages, status, table, session, textbox = outs[-1]
    # the box is emptied once, when the message is taken; later updates leave what is typed meanwhile
    assert session is chat and len(chat.turns) == 1 and outs[0][4] == ""
    assert all(out[4] == gr.skip() for out in outs[1:])
    assert messages[-1] == {"role": "assistant", "content": chat.turns[0].reply}  # the reply alone
    assert "generated" in status and table[0]["generated_tokens"] == chat.turns[0].stats["generated_tokens"]
    # people read the statistics as a table (the API keeps the JSON above)
    from rwkv_playground.ui.chat_tab import stats_frame

    frame = stats_frame(table)
    assert frame["headers"][:4] == ["Turn", "Prompt tokens", "Prompt tok/s", "Generated"]
    assert frame["data"][0][0] == 1 and frame["data"][0][3] == chat.turns[0].stats["generated_tokens"]
    hint = list(fns["chat"]("   ", chat, "Bob", "Alice", "", *sampling, 20, 1))[-1]
    assert "Type a message" in hint[1] and len(chat.turns) == 1
    huge = list(fns["chat"]("Again.", chat, "Bob", "Alice", "", *sampling, 10**9, 1))[-1]
    assert len(chat.turns) == 2 and "generated" in huge[1]  # max tokens capped, not an error
    blog = BlogSession()
    out = list(fns["blog"](blog, "the sea", "", "", "", False, DEFAULT_TEMPLATE, *sampling, 40, 2))[-1]
    assert out[0].startswith("Title:") and out[3].endswith(".md")
    inspector = InspectorSession()
    rec_out = list(fns["inspect"]("Current chat", "", chat, blog, inspector, 0, "0-15", 32))[-1]
    assert "Recorded" in rec_out[0] and inspector.recording is not None
    assert inspector.recording.tokens == chat.history_tokens()
    report = fns["selftest"]()  # the model panel's self-test button, through the scheduler
    assert report.startswith("**All ") and "| step RWKV-4 | cpu (" in report and "| step RWKV-7 | cpu (" in report


def test_outline_mode_stopped_midway_can_continue(engine, loaded):
    from rwkv_playground.blog import OUTLINE_TEMPLATE

    b = BlogSession()
    stream = b.write_with_outline(engine, build_prompt(OUTLINE_TEMPLATE, "rivers"), settings(8), 40)
    next(stream)
    next(stream)
    stream.close()
    assert b.state is not None and b.text.startswith("Outline:")
    more = run(b.continue_(engine, settings(9), 10))
    assert more.startswith(b.text[: len("Outline:")])


def test_stop_while_a_stop_string_is_held_back_keeps_state_equal_to_the_reply(engine, loaded, monkeypatch):
    """Stop arrives while the reply ends in '\\n' (a possible start of the '\\n\\n' end marker,
    held back): the reply and the state must both exclude it."""
    import rwkv_playground.chat as chat_mod

    enc = loaded.tokenizer.encode
    forced = enc("Ay, my lord") + enc("\n") + enc(" more words follow here")

    def force(step, logits):
        logits.fill_(float("-inf"))
        logits[forced[min(step, len(forced) - 1)]] = 0.0

    real_generation = chat_mod.Generation
    monkeypatch.setattr(chat_mod, "Generation", lambda *a, **k: real_generation(*a, **{**k, "logits_hook": force}))
    s = ChatSession()
    stream = s.send(engine, "Speak.", settings(1), 30)
    for shown in stream:
        if shown == "Ay, my lord":
            break
    stream.close()
    turn = s.turns[-1]
    assert turn.reply == "Ay, my lord"
    assert loaded.tokenizer.decode(turn.reply_tokens).strip() == "Ay, my lord"
    expected, _ = loaded.runtime.forward(turn.prompt_tokens + turn.reply_tokens)
    assert torch.allclose(turn.logits_after, expected, atol=1e-3)


def test_the_page_config_never_reaches_the_model(engine, monkeypatch):
    """Gradio deep-copies the page config on every page load (and a State's delete_callback is in
    it): nothing in it may lead to the engine, or every visitor would copy the model."""
    import copy

    from rwkv_playground.runtime import Runtime
    from rwkv_playground.ui import create_app

    demo = create_app(engine)

    def reached(self, memo):
        raise AssertionError("the page config reaches the model")

    monkeypatch.setattr(Runtime, "__deepcopy__", reached, raising=False)
    copy.deepcopy(demo.get_config_file())  # what every page load does


def test_a_message_sent_during_a_reply_is_queued_then_sent_and_stop_hands_it_back(engine):
    """A message sent while a reply streams waits for it (shown as queued, the box emptied once and
    then left alone) and is sent when it ends: the conversation equals the two messages sent one
    after the other. Stop hands a queued message back to the box."""
    from conftest import paced
    from rwkv_playground.ui import create_app
    from rwkv_playground.ui.chat_tab import QUEUED, ChatTab

    fns = {f.api_name: f.fn for f in create_app(engine).fns.values() if f.api_name}
    sampling = (1.0, 0.7, 0, 0.4, 0.4, 0.996)

    def send(chat, message, limit, seed):
        return fns["chat"](message, chat, "Bob", "Alice", "", *sampling, limit, seed)

    alone = ChatSession()
    for message, limit, seed in (("Good morrow.", 40, 1), ("What news?", 12, 2)):
        run(send(alone, message, limit, seed))

    chat = ChatSession()
    with paced(engine, 0.01):
        first = send(chat, "Good morrow.", 40, 1)
        next(first)
        while not chat.busy:
            next(first)
        second = send(chat, "What news?", 12, 2)
        messages, status, _, _, box = next(second)
        assert status.startswith("Queued") and box == ""
        assert messages[-1] == {"role": "user", "content": "What news?" + QUEUED}
        assert next(second) == (gr.skip(),) * 5  # waiting: nothing changes
        rest = list(first)
        assert all(out[4] == gr.skip() for out in rest)  # the first reply never empties the box again
        assert "1 message queued" in rest[0][1]  # its updates say so (they replace the status)
        assert rest[-1][0][-1]["content"] == "What news?" + QUEUED
        list(second)
    assert [(t.user, t.reply) for t in chat.turns] == [(t.user, t.reply) for t in alone.turns]
    assert chat.queued_messages == []

    # Stop: the reply is cancelled (its generator closed, as Gradio's cancel does) and the queued
    # message comes back to the box, never sent
    with paced(engine, 0.01):
        first = send(chat, "Tell me more.", 40, 3)
        while not chat.busy:
            next(first)
        second = send(chat, "And then?", 12, 4)
        next(second)
        first.close()
        *_, box = ChatTab(engine).on_stop(chat)
        assert box == "And then?"
        assert list(second) == [] and chat.queued_messages == []
    users = [t.user for t in chat.turns]  # (a reply stopped before its first token leaves no turn)
    assert users[:2] == ["Good morrow.", "What news?"] and "And then?" not in users


def test_outline_mode_gives_a_usable_outline_or_says_why_and_sums_the_whole_post(engine, loaded, monkeypatch):
    """On the demo model (which often ends its outline after one item) the outline is led on item
    by item to three headings, or the visitor is told why there are no sections; the statistics are
    those of every stream of the post (outline and sections), not the last section's."""
    from rwkv_playground.blog import OUTLINE_TEMPLATE
    from rwkv_playground.ui.common import stats_line

    streams = []
    original = BlogSession._generate

    def recorded(self, *args, **kwargs):
        for gen, text in original(self, *args, **kwargs):
            if not streams or streams[-1] is not gen:
                streams.append(gen)
            yield gen, text

    monkeypatch.setattr(BlogSession, "_generate", recorded)
    for seed in range(1, 9):
        streams.clear()
        b = BlogSession()
        text = run(b.write_with_outline(engine, build_prompt(OUTLINE_TEMPLATE, "the AI model RWKV"), settings(seed), 30))
        headings = parse_outline(text.split("\n\n## ")[0].removeprefix("Outline:\n"))
        if len(headings) >= 2:
            assert text.count("\n\n## ") == len(headings), (seed, text)
        else:
            assert any("too few to write the post section by section" in n for n in b.notices), (seed, text)
        assert b.stats["generated_tokens"] == sum(g.stats.generated_tokens for g in streams), seed
        assert b.stats["prompt_tokens"] == sum(g.stats.prompt_tokens for g in streams), seed
        if len(streams) > 1:
            assert "the outline and" in stats_line(b.stats) or b.stats["streams"] == len(streams)


def test_blog_stop_status_is_the_stopped_runs_or_says_nothing_ran(engine):
    from conftest import paced
    from rwkv_playground.ui.blog_tab import BlogTab, Brief
    from rwkv_playground.ui.common import Sampling

    tab = BlogTab(engine)
    session = BlogSession()
    text, status, *_ = tab.on_stop(session, "")
    assert status == "Nothing was being written."  # (was "Stopped." with nothing stopped)
    run(tab.on_write(session, "the sea", Brief(), Sampling(max_tokens=20, seed=3)))
    first_run = dict(session.stats)
    with paced(engine, 0.01):
        writing = tab.on_write(session, "a much longer topic about the rivers and the mountains", Brief(),
                               Sampling(max_tokens=400, seed=3))
        while not session.busy:
            next(writing)
        for _ in range(5):
            next(writing)
        writing.close()  # what Gradio's cancel does to the stream
        _, status, *_ = tab.on_stop(session, "")
    assert status.startswith("Stopped.") and "stopped" in status
    assert session.stats["prompt_tokens"] != first_run["prompt_tokens"]  # this run's, not the previous one's
    assert f"{session.stats['generated_tokens']} generated" in status
