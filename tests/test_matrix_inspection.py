"""The State inspector on RWKV-5/6/7 (rwkv_playground/inspector/matrix.py) against an independent
float64 numpy forward written in the tests (tests/numpy_rwkv.py), itself checked here against the
engine: the recorded inputs, the states after every token, their norms, and the exact effective
attention per head (sum of weights x values + carried-in memory == the head's output before the
group norm, in float64, for every version)."""

import numpy as np
import pytest
import torch

import numpy_rwkv
from rwkv_playground.models import by_name
from rwkv_playground.models.rwkv5 import RWKV5Config
from rwkv_playground.models.rwkv6 import RWKV6Config
from rwkv_playground.models.rwkv7 import RWKV7Config

CONFIGS = {
    "rwkv5": RWKV5Config(2, 64, 97, 224, 4, 16),
    "rwkv6": RWKV6Config(2, 64, 97, 224, 4, 16, mix_lora=8, decay_lora=16),
    "rwkv7": RWKV7Config(3, 64, 97, 256, 2, 32, decay_lora=16, iclr_lora=16, value_lora=8, gate_lora=16),
}
T = 37  # crosses two 16-token checkpoints


def rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


class Tok:
    def token_text(self, t):
        return f"<{t}>"


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, tmp_path_factory):
    from rwkv_playground import load_runtime

    arch = request.param
    config = CONFIGS[arch]
    weights = by_name(arch).random_weights(config, seed=3, dtype=torch.float32)
    path = tmp_path_factory.mktemp(arch) / f"{arch}.pth"
    torch.save(weights, path)
    runtime = load_runtime(path, dtype="fp32")
    tokens = torch.randint(0, config.vocab_size, (T,), generator=torch.Generator().manual_seed(5)).tolist()
    ref = numpy_rwkv.forward(arch, weights, tokens, config.n_head)
    return arch, config, weights, runtime, tokens, ref


def test_the_numpy_forward_is_the_engine(case):
    arch, config, _, runtime, tokens, (logits, obs, state) = case
    engine_logits, engine_state = runtime.forward(tokens, full_output=True)
    assert rel(engine_logits.numpy(), logits) < 1e-5
    assert rel(engine_state.wkv_state.numpy(), state["S"]) < 1e-5
    assert rel(engine_state.att_x.numpy(), state["att_x"]) < 1e-5


def test_recording_holds_the_inputs_and_every_state(case):
    from rwkv_playground.inspector.matrix import record_matrix

    arch, config, _, runtime, tokens, (_, obs, _) = case
    rec = record_matrix(runtime, Tok(), tokens)
    assert (rec.n_tokens, rec.n_layer, rec.n_head, rec.head_size) == (T, config.n_layer, config.n_head, config.head_size)
    for name in ("r", "k", "v", "w", "wkv") + (("kk", "a") if arch == "rwkv7" else ()):
        assert rel(rec.arrays[name], obs[name]) < 1e-5, name
    H, N = config.n_head, config.head_size
    for t in (0, 5, 15, 16, 31, T - 1):  # checkpoints and replays between them
        for layer in range(config.n_layer):
            for h in range(H):
                assert rel(rec.state_at(t, layer, h), obs["S"][t, layer, h]) < 1e-5, (t, layer, h)
    assert rel(rec.state_norm, np.linalg.norm(obs["S"], axis=(-2, -1))) < 1e-5
    full = rec.full_state_at(20)
    _, engine_state = runtime.forward(tokens[:21])
    for name, t in engine_state.tensors().items():
        assert rel(full.tensors()[name].numpy(), t.numpy()) < 1e-5, name
    lives = rec.half_life(0)
    assert lives.shape == (T, config.n_embd) and np.all(lives > 0)
    assert rel(rec.states_of_head(1, 1), obs["S"][:, 1, 1]) < 1e-5
    rank = rec.effective_rank(0, 0)
    assert rank.shape == (T,) and np.all((rank >= 1 - 1e-9) & (rank <= N + 1e-9))
    assert np.allclose(rec.effective_rank(0, 0, 7, 15), rank[7:15], rtol=1e-5)  # a window replays from its checkpoint
    assert rel(rec.states_of_head(1, 1, 17, 30), obs["S"][17:30, 1, 1]) < 1e-5
    assert rec.nbytes() > 0


@pytest.mark.parametrize("t_from", [0, 9])
def test_effective_attention_is_exact_in_float64(case, t_from):
    """From the numpy forward's float64 internals: for every layer, head and target token,
    sum_i alpha[t, i] v_i + carried[t] == the head's output before the group norm (1e-10), also
    from a non-empty state (a window that starts at token 9, and a recording that starts from a state)."""
    from rwkv_playground.models import by_name
    from rwkv_playground.wkv import effective_attention

    arch, config, weights, _, tokens, _ = case
    H, N = config.n_head, config.head_size
    start = numpy_rwkv.forward(arch, weights, tokens[:7], config.n_head)[2]  # a state from 7 other tokens
    _, obs, _ = numpy_rwkv.forward(arch, weights, tokens, config.n_head, state=start)
    for layer in range(config.n_layer):
        bonus = weights[f"blocks.{layer}.att.{'r_k' if arch == 'rwkv7' else 'time_faaaa'}"].double().numpy()
        for h in range(H):
            sl = slice(h * N, (h + 1) * N)
            get = lambda n: obs[n][t_from:, layer, sl]  # noqa: E731
            S0 = start["S"][layer, h] if t_from == 0 else obs["S"][t_from - 1, layer, h]
            recurrence = by_name(arch).wkv
            x = {name: get(name) for name in recurrence.inputs}
            alpha, carried = effective_attention(recurrence, x, S0, bonus.reshape(H, N)[h])
            assert np.allclose(np.triu(alpha, 1), 0)
            out = alpha @ get("v") + carried
            assert rel(out, get("wkv")) < 1e-10, (layer, h)


def test_recording_attention_reproduces_the_engine_output(case):
    from rwkv_playground.inspector.matrix import record_matrix

    arch, config, _, runtime, tokens, _ = case
    rec = record_matrix(runtime, Tok(), tokens)
    N = config.head_size
    for layer in range(config.n_layer):
        for h in range(config.n_head):
            for t_from in (0, 20):
                alpha, carried = rec.attention(layer, h, t_from)
                v = rec.head("v", layer, h)[t_from:].astype(np.float64)
                assert rel(alpha @ v + carried, rec.head("wkv", layer, h)[t_from:]) < 1e-4
    if arch == "rwkv7":
        r, k = rec.head("r", 0, 0), rec.head("k", 0, 0)
        assert np.allclose(rec.bonus_term(0, 0), (r * k * rec.bonus[0, 0]).sum(1))
    assert rec.bonus.shape == (config.n_layer, config.n_head, N)


def test_every_recording_method_refuses_an_index_outside_the_recording(case):
    """Out-of-range or negative layers, heads and tokens are refused with one sentence naming the
    range (numpy used to read another layer for a negative index, or fail with an IndexError or a
    shape error; tests/test_inspect.py holds RWKV-4's recording to the same)."""
    from rwkv_playground.errors import GenerationError
    from rwkv_playground.inspector.matrix import record_matrix

    _, _, _, runtime, tokens, _ = case
    rec = record_matrix(runtime, Tok(), tokens)
    L, H, T = rec.n_layer, rec.n_head, rec.n_tokens
    calls = {f"Layer {L} does not exist: this recording has layers 0 to {L - 1}.": [
                 lambda: rec.attention(L, 0), lambda: rec.decay(L), lambda: rec.half_life(L),
                 lambda: rec.effective_rank(L, 0), lambda: rec.bonus_term(L, 0)],
             "Layer -1 does not exist": [lambda: rec.state_at(3, -1, 0), lambda: rec.states_of_head(-1, 0)],
             f"Head {H} does not exist: this recording has heads 0 to {H - 1}.": [
                 lambda: rec.attention(0, H), lambda: rec.head("k", 0, H)],
             "Head -1 does not exist": [lambda: rec.attention(0, -1), lambda: rec.state_at(3, 0, -1)],
             f"Token {T} does not exist: this recording has tokens 0 to {T - 1}.": [
                 lambda: rec.state_at(T, 0, 0), lambda: rec.full_state_at(T)],
             "Token -1 does not exist": [lambda: rec.state_at(-1, 0, 0)],
             "The window starts at token -2, outside the recording": [lambda: rec.attention(0, 0, t_from=-2)],
             "The window ends at token 3: it must end after its start (5)": [
                 lambda: rec.attention(0, 0, t_from=5, t_to=3)]}
    for sentence, functions in calls.items():
        for f in functions:
            with pytest.raises(GenerationError) as caught:
                f()
            assert sentence in str(caught.value), (sentence, str(caught.value))
    assert rec.attention(L - 1, H - 1)[0].shape == (T, T)  # the last layer and head are fine
