"""State inspector: recordings equal the engine's states at every token; effective attention is
exact; figures have the expected traces, axes and shapes."""

import numpy as np
import pytest
import torch

from rwkv_playground.inspector import (compare_states, decay_per_token, effective_attention, half_life,
                                     model_decay_parameters, record)


@pytest.fixture(scope="module")
def rec(loaded):
    text = "Romeo: But soft, what light through yonder window breaks?\n\nJuliet: O Romeo, Romeo!"
    return record(loaded.runtime, loaded.tokenizer, loaded.tokenizer.encode(text))


def test_recorded_states_equal_engine_states_at_every_token(loaded, rec):
    state = None
    for t, token in enumerate(rec.tokens):
        _, state = loaded.runtime.forward([token], state)
        for layer in range(rec.n_layer):
            assert np.allclose(rec.value_estimate(layer)[t], state.value_estimate()[layer].numpy(), atol=1e-5)
            assert np.allclose(rec.log_mass(layer)[t], state.log_mass()[layer].numpy(), atol=1e-4)
            assert np.allclose(rec.att_x[t, layer], state.att_x[layer].numpy(), atol=1e-5)
            assert np.allclose(rec.ffn_x[t, layer], state.ffn_x[layer].numpy(), atol=1e-5)
    exported = rec.state_at(rec.n_tokens - 1)
    a, _ = loaded.runtime.forward([5], exported)
    b, _ = loaded.runtime.forward([5], state)
    assert torch.allclose(a, b, atol=1e-4)


def test_surprisal_is_minus_log_p_of_the_next_token(loaded, rec):
    logits, _ = loaded.runtime.forward(rec.tokens, full_output=True)
    expected = -torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(rec.tokens[1:])[:, None])[:, 0]
    assert np.isnan(rec.surprisal[0])
    assert np.allclose(rec.surprisal[1:], expected.numpy(), atol=1e-4)


@pytest.mark.parametrize("channels", [[0], [3, 7, 11], list(range(16))])
def test_effective_attention_rows_sum_to_one_and_reproduce_wkv(rec, channels):
    layer = rec.n_layer - 1
    weights, prior = effective_attention(rec, layer, channels)
    n = rec.n_tokens
    assert weights.shape == (n, n) and prior.shape == (n,)
    assert np.allclose(weights.sum(1) + prior, 1.0, atol=1e-9)
    assert np.all(np.triu(weights, 1) == 0)
    for c in channels[:3]:
        w1, p1 = effective_attention(rec, layer, [c])
        reproduced = (w1 * rec.v[:, layer, c][None, :]).sum(1)  # prior is 0 from an empty state
        assert np.allclose(reproduced, rec.wkv[:, layer, c], atol=1e-4)
    # a window starting later: the memory before it becomes the 'prior' column
    w2, p2 = effective_attention(rec, layer, [channels[0]], t_from=5)
    assert np.allclose(w2.sum(1) + p2, 1.0) and p2[0] > 0
    c = channels[0]
    before = rec.value_estimate(layer)[4, c]
    reproduced = (w2 * rec.v[5:, layer, c][None, :]).sum(1) + p2 * np.array(
        [before] * len(p2))  # the carried-in memory contributes its value estimate
    assert np.allclose(reproduced[0], rec.wkv[5, layer, c], atol=1e-4)


def test_decay_and_half_life_formulas(loaded):
    td, tf = model_decay_parameters(loaded.runtime)
    assert td.shape == (loaded.runtime.config.n_layer, loaded.runtime.config.n_embd) == tf.shape
    assert np.allclose(decay_per_token(np.array([0.0])), np.exp(-1))
    assert np.allclose(half_life(np.array([np.log(np.log(2))])), 1.0)  # decay 0.5 per token
    assert np.allclose(decay_per_token(td) ** half_life(td), 0.5)


def test_compare_states(rec):
    a, b = rec.state_at(3), rec.state_at(rec.n_tokens - 1)
    same = compare_states(a, a)
    assert all(r["relative_l2"] == 0 and r["cosine"] == pytest.approx(1.0, abs=1e-5) for r in same["per_layer"])
    diff = compare_states(a, b)
    assert any(r["relative_l2"] > 0.01 for r in diff["per_layer"]) and diff["top_channels"]


def test_figures_have_expected_traces_axes_and_shapes(rec):
    from rwkv_playground.ui import figures
    from rwkv_playground.ui.inspector_tab import draw_views, parse_channels

    td, tf = rec.time_decay, rec.time_first
    spectrum = figures.decay_spectrum(td)
    assert len(spectrum.data) == rec.n_layer and "layer" in spectrum.data[0].hovertemplate
    assert list(spectrum.data[0].y) == sorted(spectrum.data[0].y)
    life = figures.half_life_heatmap(td)
    assert life.data[0].z.shape == td.shape
    assert figures.bonus_heatmap(tf).data[0].z.shape == tf.shape
    assert len(figures.bonus_vs_decay(td, tf).data) == rec.n_layer
    value, mass, pp, lines, attention, summary, at_token, info, *matrix = draw_views(rec, 1, 10, "0-7", 16)
    assert len(matrix) == 7 and all(getattr(m, "value", None) is None for m in matrix)  # RWKV-4: no matrix views
    assert at_token.data[0].z.shape == (rec.n_layer, rec.n_embd)
    assert np.allclose(at_token.data[0].z[1], rec.value_estimate(1)[10])
    assert value.data[0].z.shape == (8, 16) and value.layout.xaxis.title.text == "token"
    assert value.data[0].x[0].startswith(str(value.data[0].x[0].split()[0]))  # labelled with tokens
    assert attention.data[0].z.shape == (16, 17)  # + the 'memory before' column
    assert summary.data[0].type == "bar" and summary.data[1].z.shape == (rec.n_layer, 16)
    assert "Token 10" in info
    assert parse_channels("3, 1-2, 999", rec.n_embd) == [3, 1, 2]
    html = figures.figures_to_html({"spectrum": spectrum, "value": value})
    assert html.count("plotly.js") >= 1 and "<h2>spectrum</h2>" in html


def test_the_vector_recording_refuses_an_index_outside_it(rec):
    """RWKV-4's recording as the matrix one (tests/test_matrix_inspection.py): one sentence naming
    the range, never numpy's negative indexing or an IndexError."""
    from rwkv_playground.errors import GenerationError

    L, T, C = rec.n_layer, rec.n_tokens, rec.n_embd
    calls = {f"Layer {L} does not exist: this recording has layers 0 to {L - 1}.": [
                 lambda: rec.value_estimate(L), lambda: effective_attention(rec, L, [0])],
             "Layer -1 does not exist": [lambda: rec.log_mass(-1)],
             f"Token {T} does not exist: this recording has tokens 0 to {T - 1}.": [lambda: rec.state_at(T)],
             "Token -1 does not exist": [lambda: rec.state_at(-1)],
             f"Channels must be between 0 and {C - 1}": [lambda: effective_attention(rec, 0, [C])],
             "The window starts at token -2": [lambda: effective_attention(rec, 0, [0], t_from=-2)]}
    for sentence, functions in calls.items():
        for f in functions:
            with pytest.raises(GenerationError) as caught:
                f()
            assert sentence in str(caught.value), (sentence, str(caught.value))
