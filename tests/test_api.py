"""The OpenAI-compatible API of the real app on 127.0.0.1, through the official `openai` client
(sync and async): the peers' defects as test cases, state reuse, concurrency, errors, access."""

import asyncio
import concurrent.futures
import json
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import WORLD_TINY, free_port, paced, wait_until, write_checkpoint

MODEL = "rwkv4-demo-shakespeare"
HELLO = [{"role": "user", "content": "Good morrow, sweet lady."}]


@pytest.fixture(scope="module")
def base_url(app_url):
    return app_url + "v1"


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url, api_key="unused-on-loopback", max_retries=0, timeout=120)


def chat(client, messages=HELLO, **kw):
    kw.setdefault("max_tokens", 24)
    return client.chat.completions.create(model=MODEL, messages=messages, **kw)


def lp_tokens(choice):
    return [(e.token, e.logprob) for e in choice.logprobs.content]


# ---- the routes ------------------------------------------------------------------------------------

def test_health_models_and_the_ui_share_the_port(app_url, client):
    health = httpx.get(app_url + "health")
    assert health.status_code == 200 and health.json() == {"status": "ok", "model": MODEL}
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert httpx.get(app_url).status_code == 200  # the Gradio UI on the same port
    assert httpx.get(app_url + "gradio_api/info").status_code == 200


def test_health_is_503_until_a_model_is_loaded():
    from starlette.testclient import TestClient

    from rwkv_playground.serving.api import create_api_app
    from rwkv_playground.serving.engine import Engine

    engine = Engine()
    try:
        http = TestClient(create_api_app(engine))
        assert http.get("/health").status_code == 503
        response = http.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO})
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "model_not_loaded" and response.headers["retry-after"]
    finally:
        engine.scheduler.close()


# ---- the peers' defects --------------------------------------------------------------------------------

def test_finish_reason_is_length_when_max_tokens_cut_and_stop_when_a_stop_ended(client):
    cut = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=7, seed=1, logprobs=0)
    assert cut.choices[0].finish_reason == "length"
    assert cut.usage.completion_tokens == 7 == len(cut.choices[0].logprobs.tokens)
    first_word = cut.choices[0].text.split()[1]
    stopped = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=7, seed=1, stop=[first_word])
    assert stopped.choices[0].finish_reason == "stop"
    assert first_word not in stopped.choices[0].text and cut.choices[0].text.startswith(stopped.choices[0].text)
    reply = chat(client, max_tokens=3, seed=2)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 3
    long = chat(client, max_tokens=400, seed=2)  # a reply ends at the turn separator
    assert long.choices[0].finish_reason == "stop" and long.usage.completion_tokens < 400
    assert "\n\n" not in long.choices[0].message.content


def test_completions_honour_max_tokens_and_stream_valid_sse(client, app_url, engine):
    for n in (1, 5, 33):
        out = client.completions.create(model=MODEL, prompt="JULIET:", max_tokens=n, seed=4)
        assert out.usage.completion_tokens == n
    whole = client.completions.create(model=MODEL, prompt="JULIET:", max_tokens=30, seed=4)
    with paced(engine, 0.03):  # a real model's pace: a chunk per token (faster ones share chunks)
        chunks = list(client.completions.create(model=MODEL, prompt="JULIET:", max_tokens=30, seed=4, stream=True))
    assert len(chunks) > 20
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    # the wire format itself: every event is one `data:` line and a blank line, the last is [DONE]
    raw = httpx.post(app_url + "v1/completions", json={"model": MODEL, "prompt": "JULIET:", "max_tokens": 5,
                                                       "stream": True}).text
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") and "\n" not in e for e in events[:-2])


def test_penalties_and_seed_change_the_tokens(client, loaded):
    def text(top_k=None, penalty_decay=None, **kw):  # (the two RWKV parameters go as extra fields)
        extra = {k: v for k, v in (("top_k", top_k), ("penalty_decay", penalty_decay)) if v is not None}
        return client.completions.create(model=MODEL, prompt="KING:", max_tokens=40, extra_body=extra,
                                         **kw).choices[0].text

    assert text(seed=11) == text(seed=11)
    assert text(seed=11) != text(seed=12)
    greedy = text(temperature=0)
    assert text(temperature=0) == greedy
    assert text(temperature=0, frequency_penalty=2.0) != greedy
    assert text(temperature=0, presence_penalty=2.0) != greedy
    decayed = text(temperature=0, frequency_penalty=1.0, penalty_decay=0.5)
    assert decayed != text(temperature=0, frequency_penalty=1.0)
    assert text(temperature=0, top_k=1) == greedy
    # logit_bias: forbidding the greedy first token changes it
    first = client.completions.create(model=MODEL, prompt="KING:", max_tokens=1, temperature=0, logprobs=1)
    token = first.choices[0].logprobs.tokens[0]
    (token_id,) = loaded.tokenizer.encode(token)
    biased = client.completions.create(model=MODEL, prompt="KING:", max_tokens=1, temperature=0,
                                       logit_bias={str(token_id): -100})
    assert biased.choices[0].text != token


def test_health_answers_while_sixteen_streams_run(app_url, base_url, engine):
    aclient = openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=120)

    async def stream(i):
        chunks = await aclient.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=60, seed=i,
                                                       stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])

    async def main():
        tasks = [asyncio.ensure_future(stream(i)) for i in range(16)]
        latencies = []
        async with httpx.AsyncClient() as http:
            while not all(t.done() for t in tasks):
                t0 = time.perf_counter()
                assert (await http.get(app_url + "health")).status_code == 200
                latencies.append(time.perf_counter() - t0)
                await asyncio.sleep(0.01)
        return await asyncio.gather(*tasks), latencies

    start = engine.scheduler.ticks
    with paced(engine, 0.01):
        texts, latencies = asyncio.run(main())
    assert all(texts) and len(latencies) >= 5
    # (speed is measured in benchmarks/bench_api.py; here: answered at all, never stuck behind the model)
    assert max(latencies) < 2.0
    new = list(engine.scheduler.batch_sizes)[-(engine.scheduler.ticks - start):]
    assert max(new) >= 8, "concurrent API streams are batched into the same ticks"


# ---- reproducibility, state reuse ----------------------------------------------------------------------

def test_seed_gives_the_same_tokens_whoever_else_is_using_the_server(client):
    alone = chat(client, max_tokens=40, seed=77, logprobs=True)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        noise = [pool.submit(chat, client, [{"role": "user", "content": f"Speak, {i}!"}], max_tokens=50, seed=i)
                 for i in range(6)]
        time.sleep(0.05)
        loaded = chat(client, max_tokens=40, seed=77, logprobs=True)
        [f.result() for f in noise]
    assert loaded.choices[0].message.content == alone.choices[0].message.content
    assert lp_tokens(loaded.choices[0]) == lp_tokens(alone.choices[0])


def test_n_choices_and_choice_zero_is_the_single_choice(client):
    one = chat(client, max_tokens=20, seed=5)
    three = chat(client, max_tokens=20, seed=5, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert three.choices[0].message.content == one.choices[0].message.content
    assert len({c.message.content for c in three.choices}) > 1
    # usage sums the choices: two choices cut at 5 tokens each (end-of-text forbidden)
    two = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=5, seed=5, n=2, logit_bias={"0": -100})
    assert two.usage.completion_tokens == 10 and all(c.finish_reason == "length" for c in two.choices)


def test_a_continued_conversation_reads_only_its_new_tokens_and_matches_a_fresh_read(client, engine):
    messages = [{"role": "system", "content": "A scene in Verona."},
                {"role": "user", "content": "Who goes there?"}]
    first = chat(client, messages, max_tokens=30, seed=3)
    again = chat(client, messages, max_tokens=30, seed=3)  # the same prompt: read once, kept
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens
    assert again.choices[0].message.content == first.choices[0].message.content
    turn2 = messages + [{"role": "assistant", "content": first.choices[0].message.content},
                        {"role": "user", "content": "A friend to this ground."}]
    # the reply is re-read as the client sends it back when the model is otherwise idle
    assert wait_until(lambda: engine.scheduler.status()["background"] == 0)
    cached = chat(client, turn2, max_tokens=30, seed=9, logprobs=True, top_logprobs=3)
    reused = cached.usage.prompt_tokens_details.cached_tokens
    assert reused > first.usage.prompt_tokens  # the prompt and the reply came from the kept state
    assert cached.usage.prompt_tokens - reused < 20  # only the new turn was read
    # another scope shares no kept state: the whole conversation is read again
    fresh = chat(client, turn2, max_tokens=30, seed=9, logprobs=True, top_logprobs=3, user="someone-else")
    assert fresh.usage.prompt_tokens_details.cached_tokens == 0
    assert fresh.usage.prompt_tokens == cached.usage.prompt_tokens
    assert fresh.choices[0].message.content == cached.choices[0].message.content
    assert lp_tokens(fresh.choices[0]) == lp_tokens(cached.choices[0])  # bit for bit: floats compared exactly
    assert [[(t.token, t.logprob) for t in e.top_logprobs] for e in fresh.choices[0].logprobs.content] == \
        [[(t.token, t.logprob) for t in e.top_logprobs] for e in cached.choices[0].logprobs.content]


def test_a_reply_not_re_read_yet_is_read_by_the_next_turn_with_the_same_result(client, engine):
    """While the model is busy the reply's re-read waits; the next turn reads the reply itself."""
    messages = [{"role": "user", "content": "What light through yonder window breaks?"}]
    with paced(engine, 0.01), concurrent.futures.ThreadPoolExecutor(1) as pool:
        busy = pool.submit(client.completions.create, model=MODEL, prompt="IAGO:", max_tokens=400,
                           logit_bias={"0": -100}, user="busy")
        assert wait_until(lambda: engine.scheduler.status()["generating"] == 1)
        first = chat(client, messages, max_tokens=20, seed=4, user="deferred")
        turn2 = messages + [{"role": "assistant", "content": first.choices[0].message.content},
                            {"role": "user", "content": "It is the east."}]
        assert engine.scheduler.status()["background"] >= 1  # not re-read: the model was never idle
        deferred = chat(client, turn2, max_tokens=20, seed=4, logprobs=True, user="deferred")
        assert not busy.done()
        busy.result()
    assert deferred.usage.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens
    fresh = chat(client, turn2, max_tokens=20, seed=4, logprobs=True, user="fresh")
    assert fresh.usage.prompt_tokens_details.cached_tokens == 0
    assert lp_tokens(fresh.choices[0]) == lp_tokens(deferred.choices[0])


def test_the_chat_template_is_the_chat_tabs(loaded):
    """A system message is the scenario; each turn is what the Chat tab reads for it."""
    from rwkv_playground.chat import ChatFormat, model_chat_format
    from rwkv_playground.serving.completions import chat_segments

    fmt = model_chat_format(loaded)
    segments = chat_segments(fmt, [("system", "In Verona."), ("user", "Hello"), ("assistant", "Good day."),
                                   ("user", "Who\n\nare you?")])
    with_scenario = ChatFormat(fmt.user, fmt.bot, scenario="In Verona.")
    assert segments == [with_scenario.turn_prompt("Hello", first=True), " Good day.",
                        fmt.turn_prompt("Who\n\nare you?", first=False)]
    assert chat_segments(fmt, [("user", "Hi")]) == [fmt.turn_prompt("Hi", first=True)]


def test_logprobs_are_the_models_distribution(client):
    out = chat(client, max_tokens=10, temperature=0, logprobs=True, top_logprobs=5)
    content = out.choices[0].logprobs.content
    # one entry per token of the reply (the tokens of a stop string are counted in usage, not shown)
    assert "".join(e.token for e in content).strip() == out.choices[0].message.content
    assert len(content) <= out.usage.completion_tokens
    for entry in content:
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True) and len(tops) == 5
        assert entry.token == entry.top_logprobs[0].token  # greedy: the chosen one is the most likely
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
        assert sum(2.718281828 ** lp for lp in tops) <= 1.0 + 1e-5


def test_echo_returns_the_prompt_first(client):
    out = client.completions.create(model=MODEL, prompt="ROMEO: Peace!", max_tokens=4, seed=1, echo=True)
    assert out.choices[0].text.startswith("ROMEO: Peace!") and len(out.choices[0].text) > len("ROMEO: Peace!")


# ---- concurrency with the browser, disconnects -------------------------------------------------------

def test_an_api_stream_and_a_browser_chat_run_in_the_same_ticks(client, app_url, engine):
    from gradio_client import Client

    alone = client.completions.create(model=MODEL, prompt="HAMLET:", max_tokens=600, seed=8).choices[0].text
    ui = Client(app_url, verbose=False)
    ticks_before = engine.scheduler.ticks
    with paced(engine, 0.004):
        stream = client.completions.create(model=MODEL, prompt="HAMLET:", max_tokens=600, seed=8, stream=True)
        pieces = [next(stream).choices[0].text, next(stream).choices[0].text]
        ui_reply = ui.predict("Good morrow, my lord.", "Bob", "Alice", "", 1.0, 0.7, 0, 0.4, 0.4, 0.996, 30, 3,
                              api_name="/chat")
        pieces += [c.choices[0].text for c in stream]
    assert "".join(pieces) == alone  # batched with a visitor, the same text
    assert ui_reply[0][-1]["role"] == "assistant"
    sizes = list(engine.scheduler.batch_sizes)[-(engine.scheduler.ticks - ticks_before):]
    assert 2 in sizes, "the browser's reply and the API stream shared ticks"


def test_a_long_api_prompt_never_freezes_a_chat(client, engine, monkeypatch):
    """A 20000-token prompt is read in chunks between ticks: a short chat meanwhile is answered first."""
    runtime = engine.current.runtime
    read = runtime.forward

    def slow_forward(*args, **kwargs):  # a laptop's pace for the demo model's prompt reading
        time.sleep(0.01)
        return read(*args, **kwargs)

    monkeypatch.setattr(runtime, "forward", slow_forward)
    long_prompt = [(7 * i) % 500 + 10 for i in range(20000)]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        long = pool.submit(client.completions.create, model=MODEL, prompt=long_prompt, max_tokens=4, seed=1)
        assert wait_until(lambda: engine.scheduler.status()["generating"] == 1)
        short = chat(client, max_tokens=12, seed=1)
        assert short.usage.completion_tokens > 0
        assert not long.done(), "the chat was answered while the long prompt was still being read"
        assert long.result().usage.prompt_tokens == 20000


def test_a_client_that_disconnects_frees_its_slot_within_a_tick(app_url, engine):
    body = {"model": MODEL, "prompt": "OTHELLO:", "max_tokens": 5000, "stream": True}
    with paced(engine, 0.01):
        with httpx.stream("POST", app_url + "v1/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            got = [next(lines) for _ in range(8)]
            assert engine.scheduler.status()["generating"] == 1
        assert any(line.startswith("data: {") for line in got)
        assert wait_until(lambda: engine.scheduler.status()["generating"] == 0, timeout=5)
    # the same for a request that is not streamed: its socket closes while the reply is written
    # (a raw socket: closing an httpx client from another thread does not end a request in flight)
    import json
    import socket
    from urllib.parse import urlparse

    url = urlparse(app_url)
    payload = json.dumps({**body, "stream": False}).encode()
    with paced(engine, 0.01):
        client = socket.create_connection((url.hostname, url.port), timeout=10)
        client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
        assert wait_until(lambda: engine.scheduler.status()["generating"] == 1, timeout=10)
        client.close()  # the connection goes away mid-request
        assert wait_until(lambda: engine.scheduler.status()["generating"] == 0, timeout=5)


# ---- errors ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("body, status, needle", [
    ({"model": "gpt-4", "messages": HELLO}, 404, "does not exist"),
    ({"model": MODEL, "messages": HELLO, "temperature": "hot"}, 400, "temperature"),
    ({"model": MODEL, "messages": HELLO, "max_tokens": 1.5}, 400, "max_tokens"),
    ({"model": MODEL, "messages": HELLO, "top_p": 2}, 400, "top_p"),
    ({"model": MODEL, "messages": HELLO, "max_tokens": 10 ** 7}, 400, "at most"),
    ({"model": MODEL, "messages": HELLO, "n": 100}, 400, "'n'"),
    ({"model": MODEL, "messages": []}, 400, "messages"),
    ({"model": MODEL}, 400, "Missing required parameter: 'messages'"),
    ({"model": MODEL, "messages": HELLO, "tools": [{"type": "function"}]}, 400, "'tools' is not supported"),
    ({"model": MODEL, "messages": HELLO, "response_format": {"type": "json_object"}}, 400, "response_format"),
    ({"model": MODEL, "messages": HELLO, "mirostat": 2}, 400, "Unrecognized request argument supplied: mirostat"),
    ({"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}, 400, "tool messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "only text"),
    ({"model": MODEL, "messages": HELLO, "logit_bias": {"hello": 1}}, 400, "logit_bias"),
    ({"model": MODEL, "messages": HELLO, "stop": ["a"] * 20}, 400, "stop"),
    ({"model": MODEL, "messages": HELLO, "top_logprobs": 3}, 400, "logprobs"),
    ({"model": MODEL, "messages": HELLO, "stream_options": {"include_usage": True}}, 400, "stream_options"),
])
def test_bad_chat_requests_get_openai_shaped_errors(app_url, body, status, needle):
    response = httpx.post(app_url + "v1/chat/completions", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert needle in error["message"] and set(error) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("body, needle", [
    ({"model": MODEL, "prompt": ""}, "empty"),
    ({"model": MODEL, "prompt": list(range(70000))}, "at most 65536"),
    ({"model": MODEL, "prompt": [999999]}, "Token ids"),
    ({"model": MODEL, "prompt": ["a", "b"]}, "one prompt per request"),
    ({"model": MODEL, "prompt": "x", "suffix": "y"}, "'suffix' is not supported"),
    ({"model": MODEL, "prompt": "x", "best_of": 3}, "best_of"),
    ({"model": MODEL, "prompt": "x", "logprobs": 9}, "logprobs"),
])
def test_bad_completion_requests(client, body, needle):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(**body)
    assert needle in err.value.message


def test_malformed_json_and_unknown_routes(app_url):
    response = httpx.post(app_url + "v1/chat/completions", content=b"{not json", headers={"content-type":
                                                                                        "application/json"})
    assert response.status_code == 400 and "could not parse the JSON" in response.json()["error"]["message"]
    assert httpx.post(app_url + "v1/chat/completions", json=[1, 2]).status_code == 400
    missing = httpx.get(app_url + "v1/engines")
    assert missing.status_code == 404 and "Unknown request URL" in missing.json()["error"]["message"]
    huge = httpx.post(app_url + "v1/completions", content=b"x" * (9 << 20))
    assert huge.status_code == 413


def test_nothing_is_lost_after_errors(client):
    """A request refused for its input leaves the server serving the same tokens as before."""
    before = chat(client, max_tokens=12, seed=21).choices[0].message.content
    for bad in ({"temperature": -1}, {"top_p": 7}):
        with pytest.raises(openai.BadRequestError):
            chat(client, **bad)
    assert chat(client, max_tokens=12, seed=21).choices[0].message.content == before


def test_a_model_that_yields_nan_mid_generation_is_a_clear_server_error(client, app_url, engine, monkeypatch):
    runtime = engine.current.runtime
    step = runtime.step
    calls = {"n": 0}

    def broken(tokens, states):
        logits = step(tokens, states)
        calls["n"] += 1
        return logits * float("nan") if calls["n"] > 3 else logits

    monkeypatch.setattr(runtime, "step", broken)
    with pytest.raises(openai.InternalServerError) as err:
        client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=20, seed=1)
    assert "NaN" in err.value.message
    calls["n"] = 0
    raw = httpx.post(app_url + "v1/completions", json={"model": MODEL, "prompt": "ROMEO:", "max_tokens": 20,
                                                       "stream": True}).text
    events = [e for e in raw.split("\n\n") if e]
    assert '"error"' in events[-2] and "NaN" in events[-2] and events[-1] == "data: [DONE]"
    monkeypatch.undo()
    assert client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=5).usage.completion_tokens == 5


# ---- a server of our own: queue limits, access ---------------------------------------------------------

@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    """One generation at a time and one waiting (a tiny World-vocabulary model), with an API key."""
    from rwkv_playground.serving.api import ApiSettings
    from rwkv_playground.serving.engine import Engine, ServingSettings
    from rwkv_playground.serving.scheduler import SchedulerSettings
    from rwkv_playground.server import Server, build_server_app
    from rwkv_playground.ui import create_app

    path = write_checkpoint(tmp_path_factory.mktemp("api") / "tiny-world.pth", WORLD_TINY, seed=5)
    engine = Engine(settings=ServingSettings(scheduler=SchedulerSettings(max_active=1, max_queue=1)))
    engine.load(path)
    demo = create_app(engine)
    server = Server(build_server_app(demo, engine, ApiSettings(api_key="s3cret")), port=free_port()).start()
    server.engine = engine
    yield server
    server.close()
    demo.close()
    engine.scheduler.close()


def test_an_api_key_guards_every_v1_route(small_server):
    url = small_server.url + "v1"
    bad = openai.OpenAI(base_url=url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="tiny-world", messages=HELLO, max_tokens=2)
    for route in ("/models", "/chat/completions", "/completions", "/anything"):
        response = httpx.post(url + route, json={})  # no Authorization header at all
        assert response.status_code == 401 and "didn't provide an API key" in response.json()["error"]["message"]
    good = openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0)
    assert [m.id for m in good.models.list()] == ["tiny-world"]
    assert good.chat.completions.create(model="tiny-world", messages=HELLO, max_tokens=3).usage.completion_tokens == 3
    assert httpx.get(small_server.url + "health").status_code == 200  # health needs no key (load balancers)


def test_a_full_queue_answers_429_with_retry_after(small_server):
    url, engine = small_server.url, small_server.engine
    headers = {"Authorization": "Bearer s3cret"}
    body = {"model": "tiny-world", "prompt": "a", "max_tokens": 3000, "stream": True, "logit_bias": {"0": -100}}
    with paced(engine, 0.005):
        with httpx.Client(timeout=30, headers=headers) as http, \
                concurrent.futures.ThreadPoolExecutor(2) as pool:
            with http.stream("POST", url + "v1/completions", json=body) as running:
                lines = running.iter_lines()  # (kept: a dropped iterator closes the connection)
                next(lines)
                waiting = pool.submit(httpx.post, url + "v1/completions", json={**body, "stream": False,
                                                                                "max_tokens": 2},
                                      headers=headers, timeout=60)
                assert wait_until(lambda: engine.scheduler.status()["waiting"] == 1)
                refused = httpx.post(url + "v1/completions", json=body, headers=headers)
                assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
                assert refused.json()["error"]["code"] == "server_busy"
                client = openai.OpenAI(base_url=url + "v1", api_key="s3cret", max_retries=0)
                with pytest.raises(openai.RateLimitError):
                    client.completions.create(model="tiny-world", prompt="a", max_tokens=2)
            assert waiting.result().status_code == 200  # the waiting one ran once the stream was gone


def test_beyond_loopback_the_api_is_off_unless_a_key_is_set(monkeypatch):
    import app as app_module
    from rwkv_playground.serving.api import API_KEY_ENV

    monkeypatch.delenv(API_KEY_ENV, raising=False)
    public = app_module.api_settings(app_module.parse_args(["--host", "0.0.0.0"]))
    assert not public.enabled and "--api-key" in public.off_reason
    keyed = app_module.api_settings(app_module.parse_args(["--host", "0.0.0.0", "--api-key", "k"]))
    assert keyed.enabled and keyed.api_key == "k"
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert app_module.api_settings(app_module.parse_args(["--host", "0.0.0.0"])).api_key == "from-env"
    assert app_module.api_settings(app_module.parse_args([])).enabled
    assert not app_module.api_settings(app_module.parse_args(["--no-api"])).enabled

    from starlette.testclient import TestClient

    from rwkv_playground.serving.api import create_api_app
    from rwkv_playground.serving.engine import Engine

    engine = Engine()
    try:
        off = TestClient(create_api_app(engine, public)).post("/v1/chat/completions", json={})
        assert off.status_code == 404 and "API is off" in off.json()["error"]["message"]
    finally:
        engine.scheduler.close()


# ---- async client, metrics -----------------------------------------------------------------------------

def test_async_client_streaming_and_not_both_endpoints(base_url):
    async def main():
        client = openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0)
        whole = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=20, seed=6)
        stream = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=20, seed=6,
                                                      stream=True, stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens and not chunks[-1].choices
        assert text.strip() == whole.choices[0].message.content
        plain = await client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=9, seed=6)
        streamed = await client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=9, seed=6, stream=True)
        assert "".join([c.choices[0].text async for c in streamed]) == plain.choices[0].text
    asyncio.run(main())


def test_metrics_count_requests_tokens_batches_and_waits(app_url, client):
    def read():
        families = {f.name: f for f in text_string_to_metric_families(httpx.get(app_url + "metrics").text)}
        return {s.name + json.dumps(s.labels, sort_keys=True): s.value for f in families.values() for s in f.samples}

    before = read()
    client.completions.create(model=MODEL, prompt="ROMEO: Peace, peace!", max_tokens=10, seed=1)
    after = read()

    def grew(name):
        return after.get(name, 0) - before.get(name, 0)

    assert grew("rwkv_generated_tokens_total{}") >= 10 and grew("rwkv_prompt_tokens_total{}") >= 5
    assert grew("rwkv_batch_size_count{}") >= 10
    assert grew('rwkv_queue_wait_seconds_count{"kind": "generation"}') >= 1
    assert grew('rwkv_api_requests_total{"route": "completions", "status": "200"}') == 1
    assert 'rwkv_requests_running{"kind": "generation"}' in after and "rwkv_requests_queued{}" in after
