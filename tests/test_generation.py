import pytest
import torch

from rwkv_playground import GenerationError, load_runtime
from rwkv_playground.generation import generate
from rwkv_playground.sampling import SamplingSettings


@pytest.fixture(scope="module")
def model(world_tiny):
    return load_runtime(world_tiny)


def force(token_ids):
    """A logits hook that makes the model emit exactly token_ids, one per step."""

    def hook(step, logits):
        logits.fill_(float("-inf"))
        logits[token_ids[min(step, len(token_ids) - 1)]] = 0.0

    return hook


def assert_state_matches_text(model, tokenizer, gen, prompt):
    """The generation's state is exactly: read the prompt, then the kept tokens, whose text is
    exactly what was yielded (token boundaries may differ from encode(prompt + text))."""
    assert tokenizer.decode(gen.tokens) == gen.text
    prompt_ids = tokenizer.encode(prompt)
    expected_logits, expected_state = model.forward(prompt_ids + gen.tokens)
    assert torch.allclose(gen.last_logits, expected_logits, atol=1e-4)
    got, _ = model.forward([1], gen.state)
    ref, _ = model.forward([1], expected_state)
    assert torch.allclose(got, ref, atol=1e-4)


def test_same_seed_same_text_and_stats(model, world_tokenizer):
    settings = SamplingSettings(temperature=1.0, top_p=0.9, seed=7)
    a = generate(model, world_tokenizer, "Hello", settings=settings, max_tokens=30)
    text_a = "".join(a)
    b = generate(model, world_tokenizer, "Hello", settings=SamplingSettings(temperature=1.0, top_p=0.9, seed=7),
                 max_tokens=30)
    assert text_a == "".join(b) and text_a == a.text
    st = a.stats
    assert st.prompt_tokens == len(world_tokenizer.encode("Hello"))
    assert st.generated_tokens == 30 and st.stop_reason == "max_tokens"
    assert st.tokens_per_second > 0 and st.prompt_seconds > 0
    assert_state_matches_text(model, world_tokenizer, a, "Hello")


def test_partial_utf8_is_held_back(model, world_tokenizer):
    # "é" (C3 A9) and "🤖" (4 bytes) emitted one byte-token at a time
    byte_token = {world_tokenizer.decode_bytes([i]): i for i in range(1, 257)}
    forced = [byte_token[bytes([b])] for b in "é🤖".encode()] + world_tokenizer.encode(" ok")
    gen = generate(model, world_tokenizer, "x", max_tokens=len(forced), logits_hook=force(forced))
    pieces = [p for p in gen if p]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == "é🤖 ok"
    assert pieces[0] == "é"  # released as soon as its 2nd byte arrived


def test_incomplete_character_at_the_end_is_dropped_with_its_state(model, world_tokenizer):
    byte_token = {world_tokenizer.decode_bytes([i]): i for i in range(1, 257)}
    forced = world_tokenizer.encode("ab") + [byte_token[b"\xf0"], byte_token[b"\x9f"]]
    gen = generate(model, world_tokenizer, "x", max_tokens=len(forced), logits_hook=force(forced))
    assert "".join(gen) == "ab"
    assert_state_matches_text(model, world_tokenizer, gen, "x")


def test_stop_string_inside_a_token_cuts_text_and_state(model, world_tokenizer):
    # "\n\n" ends a chat reply; here it arrives inside the token "!\n\nB"-like sequence
    forced = world_tokenizer.encode("Sure thing!\n\nBob: next")
    gen = generate(model, world_tokenizer, "Q", max_tokens=40, stop=["\n\n"], logits_hook=force(forced))
    pieces = list(gen)
    assert gen.text == "Sure thing!" == "".join(pieces)
    assert gen.stats.stop_reason == "stop_string"
    assert all("\n" not in p for p in pieces)
    assert_state_matches_text(model, world_tokenizer, gen, "Q")


def test_stop_string_split_across_tokens(model, world_tokenizer):
    newline = world_tokenizer.encode("\n")
    forced = world_tokenizer.encode("one") + newline + newline + world_tokenizer.encode("two")
    gen = generate(model, world_tokenizer, "Q", max_tokens=10, stop=["\n\n"], logits_hook=force(forced))
    assert "".join(gen) == "one"
    assert_state_matches_text(model, world_tokenizer, gen, "Q")


def test_held_back_prefix_is_released_when_no_stop_follows(model, world_tokenizer):
    forced = world_tokenizer.encode("a\nb")
    gen = generate(model, world_tokenizer, "Q", max_tokens=len(forced), stop=["\n\n"], logits_hook=force(forced))
    assert "".join(gen) == "a\nb"


def test_cancel_between_tokens(model, world_tokenizer):
    gen = generate(model, world_tokenizer, "Hi", settings=SamplingSettings(seed=1), max_tokens=500)
    received = ""
    for piece in gen:
        received += piece
        if gen.stats.generated_tokens >= 5:
            gen.cancel()
    assert gen.stats.stop_reason == "cancelled"
    assert 5 <= gen.stats.generated_tokens <= 6 and received == gen.text
    assert_state_matches_text(model, world_tokenizer, gen, "Hi")


def test_consumer_closing_mid_stream_keeps_state_in_sync(model, world_tokenizer):
    forced = world_tokenizer.encode("alpha beta\ngamma delta")
    gen = generate(model, world_tokenizer, "Q", max_tokens=50, stop=["\n\n"], logits_hook=force(forced))
    it = iter(gen)
    received = ""
    for piece in it:
        received += piece
        if "\n" in received or len(received) > 8:
            break
    it.close()
    assert gen.stats.stop_reason == "closed" and gen.text == received
    assert_state_matches_text(model, world_tokenizer, gen, "Q")


def test_continue_from_state_and_input_state_untouched(model, world_tokenizer):
    first = generate(model, world_tokenizer, "Once", settings=SamplingSettings(seed=3), max_tokens=8)
    "".join(first)
    saved = first.state.clone()
    second = generate(model, world_tokenizer, "", state=first.state, logits=first.last_logits,
                      settings=SamplingSettings(seed=4), max_tokens=8)
    "".join(second)
    assert torch.equal(first.state.aa, saved.aa)
    assert world_tokenizer.decode(second.tokens) == second.text
    expected, _ = model.forward(world_tokenizer.encode("Once") + first.tokens + second.tokens)
    assert torch.allclose(second.last_logits, expected, atol=1e-4)


def test_end_of_text_stops(model, world_tokenizer):
    gen = generate(model, world_tokenizer, "Q", max_tokens=10, logits_hook=force([0]))
    assert "".join(gen) == "" and gen.stats.stop_reason == "end_of_text"


def test_bad_requests(model, world_tokenizer):
    with pytest.raises(GenerationError, match="empty"):
        generate(model, world_tokenizer, "")
    with pytest.raises(GenerationError, match="max_tokens"):
        generate(model, world_tokenizer, "hi", max_tokens=10**9)
    with pytest.raises(GenerationError, match="max_tokens"):
        generate(model, world_tokenizer, "hi", max_tokens=0)


def test_long_prompt_is_chunked_and_cancellable_in_prefill(model, world_tokenizer):
    prompt = "word " * 600
    gen = generate(model, world_tokenizer, prompt, max_tokens=5, chunk_len=128)
    it = iter(gen)
    assert next(it) == ""  # one prefill chunk read
    gen.cancel()
    assert list(it) == []
    assert gen.stats.stop_reason == "cancelled" and gen.prompt_read == 128
