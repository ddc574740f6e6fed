"""The scheduler: one owner of the model for every session (engine level, no Gradio).

Generations of different sessions advance together (one batched step per tick) and every reply is
bit for bit what the same request gives alone, whoever joins or leaves; Stop lands within a tick;
long prompts and recordings are read in chunks between ticks; the queue has limits and places; a
model switch ends what runs with one sentence and releases the old model first; sessions' kept
objects stay within the memory budget.
"""

import gc
import threading
import time
import weakref

import pytest
import torch

from conftest import TINY, write_checkpoint
from rwkv_playground import GenerationError, LoadError
from rwkv_playground.serving.engine import Engine, ServingSettings
from rwkv_playground.generation import Generation, generate
from rwkv_playground.sampling import SamplingSettings
from rwkv_playground.serving.scheduler import SchedulerSettings


@pytest.fixture(scope="module")
def engine(app_model_path):
    eng = Engine(settings=ServingSettings(scheduler=SchedulerSettings(max_active=8, max_queue=8)))
    eng.load(app_model_path)
    yield eng
    eng.scheduler.close()


REQUESTS = [  # (prompt, settings, max_tokens, stop): different seeds, penalties, limits, stops
    ("Romeo: ", dict(temperature=1.0, top_p=0.7, seed=1), 40, ()),
    ("Juliet: O Romeo, Romeo!", dict(temperature=0.8, top_p=0.9, seed=2, presence_penalty=1.0), 25, ("\n\n",)),
    ("HAMLET: To be, or not to be", dict(temperature=1.2, top_p=0.5, top_k=20, seed=3), 60, ()),
    ("The king", dict(temperature=0.0, seed=4), 15, ()),
    ("Enter a messenger.\n\nMESSENGER:", dict(temperature=1.0, top_p=0.95, seed=5, count_penalty=1.0), 50, ("\n",)),
    ("word " * 150, dict(temperature=1.0, top_p=0.7, seed=6), 30, ()),  # a prompt of several chunks
]


def new_generation(loaded, prompt, settings, max_tokens, stop, chunk_len=64):
    return Generation(loaded.tokenizer, prompt, settings=SamplingSettings(**settings), max_tokens=max_tokens,
                      stop=stop, chunk_len=chunk_len, sampler_kernel=loaded.runtime.sampler_kernel)


def solo(loaded, request):
    """The request alone on the model (the calling thread drives it)."""
    gen = new_generation(loaded, *request)
    stream = generate.__globals__["Stream"](loaded.runtime, gen)
    text = "".join(stream)
    return text, list(gen.tokens), gen.state, gen.last_logits


def assert_same(result, gen):
    text, tokens, state, logits = result
    assert gen.text == text and gen.tokens == tokens
    assert torch.equal(gen.last_logits, logits)
    for name, tensor in state.tensors().items():
        assert torch.equal(gen.state.tensors()[name], tensor), name


def read_until(ticket, n_text_events):
    seen = 0
    for event in ticket:
        if event.kind == "text":
            seen += 1
            if seen >= n_text_events:
                return
        if event.kind in ("done", "error"):
            return


def test_sessions_generating_together_equal_their_solo_runs_bit_for_bit(engine):
    loaded = engine.require()
    alone = [solo(loaded, r) for r in REQUESTS]
    ticks_before = engine.scheduler.ticks
    gens = [new_generation(loaded, *r) for r in REQUESTS]
    # staggered: three start, then the others join while those run; short ones leave early
    tickets = [engine.scheduler.submit_generation(g) for g in gens[:3]]
    read_until(tickets[0], 5)
    tickets += [engine.scheduler.submit_generation(g) for g in gens[3:5]]
    read_until(tickets[2], 10)
    tickets.append(engine.scheduler.submit_generation(gens[5]))
    for ticket in tickets:
        ticket.wait(timeout=60)
    for result, gen in zip(alone, gens):
        assert_same(result, gen)
    assert engine.scheduler.ticks > ticks_before
    assert max(engine.scheduler.batch_sizes) >= 3  # they really shared steps


def test_stop_lands_within_a_tick_and_the_others_go_on(engine):
    loaded = engine.require()
    requests = [("Romeo: ", dict(seed=s, temperature=1.0, top_p=0.9), 400, ()) for s in (11, 12, 13)]
    alone = [solo(loaded, r) for r in requests[1:]]
    gens = [new_generation(loaded, *r) for r in requests]
    tickets = [engine.scheduler.submit_generation(g) for g in gens]
    read_until(tickets[0], 8)
    tickets[0].cancel()
    ticks = engine.scheduler.ticks
    tickets[0].wait(timeout=10)
    assert engine.scheduler.ticks - ticks <= 2  # ended within a tick (or two, if one was under way)
    assert gens[0].stats.stop_reason == "cancelled" and len(gens[0].tokens) < 400
    # the stopped state is in sync with its text
    expected, _ = loaded.runtime.forward(gens[0].prompt_tokens + gens[0].tokens)
    assert torch.allclose(gens[0].last_logits, expected, atol=1e-4)
    assert loaded.tokenizer.decode(gens[0].tokens) == gens[0].text
    for ticket in tickets[1:]:
        ticket.wait(timeout=60)
    for result, gen in zip(alone, gens[1:]):
        assert_same(result, gen)


def test_a_long_prompt_is_read_between_the_ticks_of_others(engine):
    loaded = engine.require()
    runner = new_generation(loaded, "Romeo: ", dict(seed=21), 300, ())
    ticket = engine.scheduler.submit_generation(runner)
    read_until(ticket, 3)
    reader = new_generation(loaded, "And the night " * 200, dict(seed=22), 5, (), chunk_len=32)
    reader_ticket = engine.scheduler.submit_generation(reader)
    ticks_during_prompt = []
    while reader.prompt_state is None and not reader_ticket.finished.is_set():
        ticks_during_prompt.append(engine.scheduler.ticks)
        time.sleep(0.001)
    assert reader.prompt_read == len(reader.prompt_tokens) > 32 * 10  # many chunks
    assert ticks_during_prompt[-1] - ticks_during_prompt[0] >= 10  # the other kept generating meanwhile
    ticket.cancel()
    ticket.wait(timeout=10)
    reader_ticket.wait(timeout=30)


def test_short_prompts_arriving_together_start_in_the_same_tick(engine):
    """Eight chat-sized prompts are read before one tick (up to a chunk's worth of tokens), so
    the first tick already steps all eight; each still equals its solo run."""
    loaded = engine.current
    requests = [(f"Romeo {i}: good night", dict(seed=i), 5, ()) for i in range(8)]
    solos = [solo(loaded, r) for r in requests]
    ticks = engine.scheduler.ticks
    gens = [new_generation(loaded, *r, chunk_len=loaded.runtime.chunk_len) for r in requests]
    with engine.scheduler._lock:  # all eight waiting before the worker looks
        tickets = [engine.scheduler.submit_generation(g) for g in gens]
    for t in tickets:
        t.wait(60)
    first = list(engine.scheduler.batch_sizes)[-(engine.scheduler.ticks - ticks)]
    assert first == 8
    for result, gen in zip(solos, gens):
        assert gen.text == result[0] and gen.tokens == result[1]


def test_background_work_runs_only_when_the_model_is_otherwise_idle(engine):
    ran = []

    def background(runtime):
        ran.append(engine.scheduler.status()["generating"])
        yield None
        ran.append(engine.scheduler.status()["generating"])

    loaded = engine.current
    gen = new_generation(loaded, "HAMLET: To be", dict(seed=1), 40, ())
    with engine.scheduler._lock:
        ticket = engine.scheduler.submit_generation(gen)
        engine.scheduler.submit_background(background)
    ticket.wait(60)
    deadline = time.time() + 10
    while len(ran) < 2 and time.time() < deadline:
        time.sleep(0.01)
    assert ran == [0, 0]
    assert engine.scheduler.status()["background"] == 0


def test_the_queue_has_a_limit_and_says_the_place(app_model_path):
    eng = Engine(settings=ServingSettings(scheduler=SchedulerSettings(max_active=1, max_queue=2)))
    try:
        loaded = eng.load(app_model_path)
        first = eng.scheduler.submit_generation(new_generation(loaded, "Romeo: ", dict(seed=1), 2000, ()))
        read_until(first, 2)
        waiting = [eng.scheduler.submit_generation(new_generation(loaded, "Juliet: ", dict(seed=s), 3, ()))
                   for s in (2, 3)]
        refused = eng.scheduler.submit_generation(new_generation(loaded, "Nurse: ", dict(seed=4), 3, ()))
        with pytest.raises(GenerationError, match="busy"):
            refused.wait(timeout=5)
        assert [t.position for t in waiting] == [1, 2]
        assert waiting[1].events.get(timeout=5).value == 2  # told its place
        first.cancel()
        for t in waiting:
            assert t.wait(timeout=30).stats.generated_tokens == 3
    finally:
        eng.scheduler.close()


def test_recordings_interleave_with_generations(engine):
    from rwkv_playground.inspector import record, record_task

    loaded = engine.require()
    tokens = loaded.tokenizer.encode("Romeo: But soft, what light through yonder window breaks? " * 40)
    expected = record(loaded.runtime, loaded.tokenizer, tokens)
    gen = new_generation(loaded, "Romeo: ", dict(seed=31), 200, ())
    ticket = engine.scheduler.submit_generation(gen)
    task = engine.scheduler.submit_task(lambda runtime: record_task(runtime, loaded.tokenizer, tokens))
    progress = [e for e in task if e.kind == "progress"]
    rec = task.wait(timeout=60)
    assert len(progress) >= 2 and progress[-1].value[0] == 1.0  # chunk by chunk
    assert (rec.aa == expected.aa).all() and (rec.k == expected.k).all()
    ticket.wait(timeout=60)
    assert gen.stats.generated_tokens == 200


def test_a_model_switch_ends_generations_with_a_sentence_and_frees_the_old_model_first(app_model_path, tmp_path,
                                                                                         monkeypatch):
    import rwkv_playground.serving.engine as engine_module

    write_checkpoint(tmp_path / "other-tiny.pth", TINY, seed=5)  # vocab 500: no tokenizer fits it
    eng = Engine(models_dir=tmp_path)
    try:
        old = weakref.ref(eng.load(app_model_path).runtime)
        gen = new_generation(eng.require(), "Romeo: ", dict(seed=1), 5000, ())
        ticket = eng.scheduler.submit_generation(gen)
        read_until(ticket, 3)
        # a file that cannot be served is refused before anything ends: the model keeps serving
        with pytest.raises(LoadError, match="No tokenizer"):
            eng.load(tmp_path / "other-tiny.pth")
        assert not ticket.finished.is_set() and eng.current.runtime is old()

        old_alive_at_build = []
        real = engine_module.load_runtime

        def load_runtime(*args, **kwargs):
            gc.collect()
            old_alive_at_build.append(old() is not None)
            return real(*args, **kwargs)

        monkeypatch.setattr(engine_module, "load_runtime", load_runtime)
        eng.load(app_model_path)
        with pytest.raises(GenerationError, match="being switched"):
            ticket.wait(timeout=30)
        assert old_alive_at_build == [False]  # released before the new one was built
        assert gen.stats.stop_reason == "model_switched"
        expected, _ = eng.require().runtime.forward(gen.prompt_tokens + gen.tokens)  # same weights
        assert torch.allclose(gen.last_logits, expected, atol=1e-4)  # its state matches what was shown
    finally:
        eng.scheduler.close()


def test_memory_budget_drops_the_largest_objects_of_idle_sessions_and_says_so(app_model_path):
    from rwkv_playground.chat import ChatSession
    from rwkv_playground.inspector import InspectorSession

    eng = Engine(settings=ServingSettings(memory_budget_bytes=600_000, undo_depth=3))
    try:
        loaded = eng.load(app_model_path)
        settings = SamplingSettings(seed=1)
        idle = eng.add_session(ChatSession())
        for message in ("Good morrow.", "What news?"):
            list(idle.send(eng, message, settings, 20))
        inspector = eng.add_session(InspectorSession())
        list(inspector.record(eng, loaded.tokenizer.encode("Romeo: " * 40)))
        idle.last_active = inspector.last_active = time.monotonic() - 3600  # both idle for an hour
        active = eng.add_session(ChatSession())
        list(active.send(eng, "Speak.", settings, 20))  # its touch() enforces the budget
        assert eng.memory.used_bytes() <= 600_000
        assert inspector.recording is None  # the largest idle object went first
        assert any("recording" in n for n in inspector.take_notices())
        assert active.turns[-1].state_after is not None  # never the session that is acting
        # a dropped chat state is rebuilt by reading the conversation once, and says so
        eng.memory.limit_bytes = 1
        eng.memory.enforce(keep=active)
        assert idle.turns[-1].state_after is None and idle.take_notices()
        eng.memory.limit_bytes = 10 << 20
        list(idle.send(eng, "And then?", settings, 10))
        assert idle.turns[-1].stats["history_reread"] == len(idle.history_tokens(2)) > 0
        expected, _ = loaded.runtime.forward(idle.history_tokens())
        assert torch.allclose(idle.turns[-1].logits_after, expected, atol=1e-3)
    finally:
        eng.scheduler.close()


def test_the_budget_accounts_any_object_that_says_what_it_keeps():
    """memory.Accounted is a protocol, not a base class: the API's cache of conversation states is
    no Session, and a plain object of five members is accounted, dropped and told like a session."""
    from rwkv_playground.serving.completions import PrefixCache
    from rwkv_playground.serving.memory import MemoryBudget
    from rwkv_playground.serving.sessions import Session

    class Kept:
        busy, budget = False, None

        def __init__(self, sizes):
            self.sizes, self.told, self.last_active = dict(sizes), [], time.monotonic() - 3600

        def memory_items(self):
            return list(self.sizes.items())

        def drop(self, key):
            del self.sizes[key]
            return f"object {key}"

        def tell(self, sentence):
            self.told.append(sentence)

    assert not isinstance(PrefixCache(), Session)
    budget = MemoryBudget(limit_bytes=100)
    small, large = budget.add(Kept({"a": 30})), budget.add(Kept({"b": 60, "c": 50}))
    assert budget.used_bytes() == 140
    assert budget.enforce() == 80  # the largest object of the idle ones went first
    assert large.sizes == {"c": 50} and small.sizes == {"a": 30}
    assert large.told == ["To free memory for other visitors, the server dropped object b."]
    large.busy = True  # nothing of an owner that is generating is dropped
    budget.limit_bytes = 10
    assert budget.enforce() == 50 and small.sizes == {} and large.sizes == {"c": 50}


def test_undo_depth_caps_the_states_a_chat_keeps(engine):
    from rwkv_playground.chat import ChatSession

    chat = ChatSession(undo_depth=3)
    for n in range(6):
        list(chat.send(engine, f"Line {n}.", SamplingSettings(seed=n), 8))
    kept = [turn.state_after is not None for turn in chat.turns]
    assert kept == [False, False, False, True, True, True]
    for _ in range(4):
        chat.undo()
    assert chat.turns[-1].state_after is None
    list(chat.send(engine, "Again.", SamplingSettings(seed=9), 8))  # re-reads the history once
    assert chat.turns[-1].stats["history_reread"] > 0


def test_a_closed_session_stops_what_it_runs(engine):
    from rwkv_playground.blog import BlogSession

    blog = engine.add_session(BlogSession())
    stream = blog.write(engine, "Title: A very long post", SamplingSettings(seed=3), 5000)
    next(stream)
    closer = threading.Timer(0.2, engine.forget, args=(blog,))
    closer.start()
    for _ in stream:  # ends soon: the tab was closed
        pass
    assert blog.stats["stop_reason"] == "closed" and blog.stats["generated_tokens"] < 5000
    assert blog not in engine.memory.sessions()


def test_many_streams_share_the_update_rate_and_the_count_follows_the_streams(engine):
    """One stream gets its 20 updates a second; 16 at once get 5 each (80 together); a session
    that wants every event (scripts, Jupyter) always does. The count of followed streams goes up
    while a session follows a generation and back down when it ends."""
    from rwkv_playground.chat import ChatSession
    from rwkv_playground.sampling import SamplingSettings
    from rwkv_playground.serving.sessions import TOTAL_UPDATES_PER_SECOND, streams_followed, update_interval

    assert update_interval(0.05, 1) == 0.05 and update_interval(0.05, 4) == 0.05
    assert update_interval(0.05, 16) == pytest.approx(16 / TOTAL_UPDATES_PER_SECOND) == pytest.approx(0.2)
    assert update_interval(0.0, 16) == 0.0
    before = streams_followed()
    session = engine.add_session(ChatSession())
    seen = [streams_followed() for _ in session.send(engine, "Good morrow.", SamplingSettings(seed=2), 20)]
    assert seen and max(seen) == before + 1 and streams_followed() == before
    engine.forget(session)
