"""Experiments on the state (experiments.py), each against a brute-force reference.

- a batched knock-out equals re-running that one text alone, in an independent float64 numpy
  RWKV-4 (below, itself checked against the engine), with the state edited by hand (or the decay
  changed from that token on), and the KL, surprisal and top tokens computed from those logits;
- a causal-trace cell equals the single erasure run alone in float64;
- the logit lens's last layer is the model's own prediction, and any layer equals ln_out + head
  applied by hand to the residual observed after that layer;
- the memory probe equals the effective attention of the recording (itself tested against an
  independent float64 forward in test_inspect.py), and its prediction starts where it does.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY, write_checkpoint
from rwkv_playground import GenerationError, load_runtime
from rwkv_playground.inspector.knockouts import (Knockout, causal_trace, channel_groups, channels_by,
                                         knockouts, logit_lens, memory_probe)
from rwkv_playground.inspector import effective_attention, half_life, record


class Ids:  # a tokenizer stand-in for random-weight models: token ids as text
    @staticmethod
    def token_text(t):
        return f"<{t}>"


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    return load_runtime(write_checkpoint(tmp_path_factory.mktemp("exp") / "tiny.pth", TINY, seed=11))


def text(n, seed=0):
    return torch.randint(0, TINY.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


class Float64RWKV:
    """An independent RWKV-4 in numpy float64, token by token (rwkv4.md's RNN form), on the
    checkpoint's own tensors: the brute-force reference the experiments are held to."""

    def __init__(self, path):
        raw = torch.load(path, weights_only=True)
        self.w = {k: v.double().squeeze().numpy() for k, v in raw.items()}
        self.L = 1 + max(int(k.split(".")[1]) for k in raw if k.startswith("blocks."))
        self.C = self.w["emb.weight"].shape[1]

    def empty_state(self):
        zeros = np.zeros((self.L, self.C))
        return {"att_x": zeros.copy(), "aa": zeros.copy(), "bb": zeros.copy(), "pp": np.full((self.L, self.C), -1e30),
                "ffn_x": zeros.copy()}

    @staticmethod
    def _ln(x, w, b):
        return (x - x.mean()) / np.sqrt(x.var() + 1e-5) * w + b

    def run(self, tokens, state, time_decay=None):
        """Logits [T, V] after each token; `state` is advanced in place. time_decay: {layer: [C]}."""
        w, sigmoid, out = self.w, (lambda z: 1 / (1 + np.exp(-z))), []
        for token in tokens:
            x = self._ln(w["emb.weight"][token], w["blocks.0.ln0.weight"], w["blocks.0.ln0.bias"])
            for i in range(self.L):
                b = f"blocks.{i}."
                xx = self._ln(x, w[b + "ln1.weight"], w[b + "ln1.bias"])
                mix = lambda name, prev: xx * w[b + name] + prev * (1 - w[b + name])  # noqa: E731
                k = w[b + "att.key.weight"] @ mix("att.time_mix_k", state["att_x"][i])
                v = w[b + "att.value.weight"] @ mix("att.time_mix_v", state["att_x"][i])
                r = sigmoid(w[b + "att.receptance.weight"] @ mix("att.time_mix_r", state["att_x"][i]))
                state["att_x"][i] = xx
                aa, bb, pp = state["aa"][i], state["bb"][i], state["pp"][i]
                decay = -np.exp((time_decay or {}).get(i, w[b + "att.time_decay"]))
                ww = w[b + "att.time_first"] + k
                p = np.maximum(pp, ww)
                wkv = (np.exp(pp - p) * aa + np.exp(ww - p) * v) / (np.exp(pp - p) * bb + np.exp(ww - p))
                ww = pp + decay
                p = np.maximum(ww, k)
                state["aa"][i] = np.exp(ww - p) * aa + np.exp(k - p) * v
                state["bb"][i] = np.exp(ww - p) * bb + np.exp(k - p)
                state["pp"][i] = p
                x = x + w[b + "att.output.weight"] @ (r * wkv)
                xx = self._ln(x, w[b + "ln2.weight"], w[b + "ln2.bias"])
                mix = lambda name, prev: xx * w[b + name] + prev * (1 - w[b + name])  # noqa: E731
                kf = np.maximum(w[b + "ffn.key.weight"] @ mix("ffn.time_mix_k", state["ffn_x"][i]), 0) ** 2
                rf = sigmoid(w[b + "ffn.receptance.weight"] @ mix("ffn.time_mix_r", state["ffn_x"][i]))
                state["ffn_x"][i] = xx
                x = x + rf * (w[b + "ffn.value.weight"] @ kf)
            out.append(w["head.weight"] @ self._ln(x, w["ln_out.weight"], w["ln_out.bias"]))
        return torch.tensor(np.stack(out))


@pytest.fixture(scope="module")
def float64_model(runtime):
    return Float64RWKV(runtime.source_path)


def alone(model: Float64RWKV, tokens, knockout):
    """Brute force in float64: the one knock-out, one sequence, the state edited by hand (or the
    decay changed from that token on); logits of every position from `knockout.position` on."""
    state = model.empty_state()
    model.run(tokens[:knockout.position], state)
    rest, ch, layer = tokens[knockout.position:], list(knockout.channels), knockout.layer
    if knockout.kind == "decay":
        decay = model.w[f"blocks.{layer}.att.time_decay"].copy()
        decay[ch] = knockout.time_decay
        return model.run(rest, state, time_decay={layer: decay})
    if knockout.kind == "erase":
        state["aa"][layer, ch], state["bb"][layer, ch], state["pp"][layer, ch] = 0.0, 0.0, -1e30
    else:
        state["att_x"][layer, ch], state["ffn_x"][layer, ch] = 0.0, 0.0
    return model.run(rest, state)


def test_the_float64_reference_is_the_engine(runtime, float64_model):
    """The reference itself agrees with the engine on the unedited text (so a difference below is
    the experiment's)."""
    tokens = text(30, seed=9)
    ours = runtime.forward(tokens, full_output=True)[0].double()
    assert torch.allclose(float64_model.run(tokens, float64_model.empty_state()), ours, atol=2e-4, rtol=1e-4)


def test_batched_knockouts_equal_each_one_run_alone(runtime, float64_model):
    tokens = text(40)
    chosen = [Knockout(1, (3, 4, 5), 10), Knockout(0, tuple(range(64)), 4, "shift"),
              Knockout(2, (0, 63), 10, "decay", time_decay=-8.0), Knockout(2, (7,), 25),
              Knockout(0, tuple(range(20)), 4, "erase")]
    result = knockouts(runtime, Ids, tokens, chosen, top_k=3)
    assert result.start == 4 and result.kl.shape == (5, 36) and result.surprisal.shape == (6, 36)
    base = torch.log_softmax(runtime.forward(tokens, full_output=True)[0].double(), -1)
    for i, k in enumerate(chosen):
        log_p = torch.log_softmax(alone(float64_model, tokens, k), -1)
        cols = slice(k.position - result.start, None)
        ref_base = base[k.position:]
        kl = (ref_base.exp() * (ref_base - log_p)).sum(-1).numpy()
        assert np.allclose(result.kl[i, cols], kl, atol=1e-5, rtol=1e-4), k.label
        assert (result.kl[i, :k.position - result.start] < 1e-9).all()  # nothing changes before the edit
        nxt = torch.tensor(tokens[k.position + 1:])
        surprisal = (-log_p[:-1].gather(1, nxt[:, None])[:, 0]).numpy()
        assert np.allclose(result.surprisal[i + 1, cols][:-1], surprisal, atol=1e-4), k.label
        assert np.isnan(result.surprisal[i + 1, -1])
        assert (result.top_ids[i + 1, cols][:, 0] == log_p.argmax(-1).numpy()).all()
    # row 0 is the unedited text
    assert np.allclose(result.surprisal[0, :-1], -base[4:-1].gather(1, torch.tensor(tokens[5:])[:, None])[:, 0].numpy(),
                       atol=1e-4)
    assert result.kl.max() > 1e-3  # the edits do something
    assert result.summary()[0]["knockout"] == "L1 ch 3-5 @10 erase"
    csv_text = result.to_csv()
    assert csv_text.count("\n") == 1 + 5 * 36 and "L2 ch 0,63 @10 decay to -8" in csv_text
    data = json.loads(result.to_json())
    assert data["labels"] == result.labels and data["surprisal"][0][-1] is None


def test_a_knockout_at_the_last_token_exports_valid_json(runtime):
    """One position and no next token to score: the summary's surprisal change is undefined, and
    the JSON says null (JSON has no NaN) instead of failing."""
    tokens = text(12)
    result = knockouts(runtime, Ids, tokens, [Knockout(1, (0, 1), 11)])
    assert result.kl.shape == (1, 1) and np.isnan(result.summary()[0]["mean_surprisal_change"])
    data = json.loads(result.to_json())
    assert data["summary"][0]["mean_surprisal_change"] is None and data["surprisal"] == [[None], [None]]


def test_knockouts_refuse_bad_requests_in_one_sentence(runtime):
    tokens = text(10)
    for bad, message in ((Knockout(9, (1,), 2), "Layer 9"), (Knockout(0, (64,), 2), "Channels"),
                         (Knockout(0, (1,), 10), "Position 10"), (Knockout(0, (1,), 2, "melt"), "Unknown"),
                         (Knockout(0, (1,), 2, "decay"), "time_decay")):
        with pytest.raises(GenerationError, match=message):
            knockouts(runtime, Ids, tokens, [bad])
    with pytest.raises(GenerationError, match="no text"):
        knockouts(runtime, Ids, [], [Knockout(0, (1,), 0)])
    with pytest.raises(GenerationError, match="at least one"):
        knockouts(runtime, Ids, tokens, [])


def test_top_channels_by_half_life(runtime):
    rec = record(runtime, Ids, text(5))
    life = half_life(rec.time_decay[1])
    chosen = channels_by(life, 5)
    assert len(chosen) == 5 and min(life[list(chosen)]) >= np.sort(life)[-5]


def test_causal_trace_cells_equal_single_erasures(runtime, float64_model):
    tokens = text(30, seed=3)
    trace = causal_trace(runtime, Ids, tokens, target=20, groups_per_layer=2, window=6)
    assert trace.positions == list(range(14, 20)) and trace.delta.shape == (3 * 2, 6)
    assert trace.groups == channel_groups(3, 64, 2)
    base = torch.log_softmax(runtime.forward(tokens[:20])[0].double(), -1)[tokens[20]]
    assert trace.base_log_prob == pytest.approx(float(base), abs=1e-6)
    for g, j in ((0, 0), (3, 5), (5, 2)):
        layer, (a, b) = trace.groups[g]
        knockout = Knockout(layer, tuple(range(a, b)), trace.positions[j])
        logits = alone(float64_model, tokens[:20], knockout)[-1]
        expected = float(torch.log_softmax(logits.double(), -1)[tokens[20]] - base)
        assert trace.delta[g, j] == pytest.approx(expected, abs=1e-5)
    assert np.abs(trace.delta).max() > 1e-4
    assert trace.strongest(3)[0]["delta_log_prob"] == trace.delta.min()
    assert trace.to_csv().count("\n") == 1 + 6 * 6
    with pytest.raises(GenerationError, match="positions 1 to 29"):
        causal_trace(runtime, Ids, tokens, target=0)


def test_logit_lens_matches_the_model_and_a_hand_readout(runtime):
    tokens = text(23, seed=4)
    lens = logit_lens(runtime, Ids, tokens)
    assert lens.top_ids.shape == (3, 23)
    log_p = torch.log_softmax(runtime.forward(tokens, full_output=True)[0].double(), -1)
    assert (lens.top_ids[-1] == log_p.argmax(-1).numpy()).all()
    assert np.allclose(lens.next_token_probs[-1, :-1],
                       log_p[:-1].gather(1, torch.tensor(tokens[1:])[:, None])[:, 0].exp().numpy(), atol=1e-5)
    seen = {}
    runtime.forward(tokens, full_output=True, observe=lambda layer, name, value: seen.__setitem__(layer, value[0])
                    if name == "residual" else None)
    model = runtime.model
    by_hand = torch.log_softmax((model.head.weight.double() @ model.ln_out(seen[1]).double().T).T, -1)
    assert (lens.top_ids[1] == by_hand.argmax(-1).numpy()).all()
    assert np.allclose(lens.top_probs[1], by_hand.max(-1).values.exp().numpy(), atol=1e-5)
    assert np.isnan(lens.next_token_probs[:, -1]).all()
    assert lens.to_csv().count("\n") == 1 + 3 * 23


def test_memory_probe_is_the_recordings_effective_attention(runtime):
    tokens = text(30, seed=5)
    rec = record(runtime, Ids, tokens)
    probe = memory_probe(rec, position=8)
    assert probe.measured.shape == (3, 21)
    for layer in range(3):
        weights, _ = effective_attention(rec, layer, np.arange(64), t_from=8)
        assert np.allclose(probe.measured[layer], weights[1:, 0], atol=1e-9)
    assert np.allclose(probe.predicted[:, 0], probe.measured[:, 0])
    assert (np.diff(probe.predicted, axis=1) <= 0).all()  # decay alone only ever shrinks it
    assert not np.allclose(probe.measured, probe.predicted)  # the text's other tokens matter too
    assert memory_probe(rec, 8, horizon=5).measured.shape == (3, 5)
    with pytest.raises(GenerationError, match="after it"):
        memory_probe(rec, 29)


def test_the_experiments_tab_runs_each_experiment_and_exports(engine):
    """The handler behind the Experiments tab, in process on the demo model: each experiment draws
    a figure and exports HTML + CSV + JSON; without a recording it says what to do."""
    import plotly.graph_objects as go

    from rwkv_playground.inspector import InspectorSession
    from rwkv_playground.ui.experiments_panel import CHANNEL_MODES, ExperimentsPanel, KnockoutChoice, TraceChoice

    panel = ExperimentsPanel(engine)
    session = engine.add_session(InspectorSession())
    *_, last = panel.on_run(session, "Knock-out", 5, KnockoutChoice("erase", "all", CHANNEL_MODES[1], "", 8, None),
                            TraceChoice(4, 8))
    assert "Press Record first" in last[0]
    loaded = engine.require()
    for _ in session.record(engine, loaded.tokenizer.encode("ROMEO: Good night, good night!\n\nJULIET: Parting is "
                                                            "such sweet sorrow.\n\nROMEO: Sleep dwell upon thine eyes.")):
        pass
    n = session.recording.n_tokens
    runs = {"Knock-out": ("erase", "0-2", CHANNEL_MODES[1]), "Causal trace": ("erase", "all", CHANNEL_MODES[0]),
            "Logit lens": ("erase", "all", CHANNEL_MODES[0]), "Memory probe": ("erase", "all", CHANNEL_MODES[0])}
    for experiment, (kind, layers, mode) in runs.items():
        *_, (status, fig, summary, files) = panel.on_run(session, experiment, n // 2,
                                                         KnockoutChoice(kind, layers, mode, "0-15", 8, -8.0),
                                                         TraceChoice(2, 6))
        assert status.endswith("CSV, JSON)."), (experiment, status)
        if experiment == "Knock-out":  # the top next token where each knock-out mattered most
            assert "before → after" in summary and summary.count(" → ") >= 4
            # accounted with its token texts, not only its arrays (in a sweep those weigh more)
            result = session.experiment
            arrays = sum(a.nbytes for a in vars(result).values() if isinstance(a, np.ndarray))
            strings = sum(len(position) for row in result.top_texts for position in row)
            assert dict(session.memory_items())["experiment"] >= arrays + 49 * strings
        assert isinstance(fig, go.Figure) and len(fig.data) > 0
        assert [Path(f).suffix for f in files] == [".html", ".csv", ".json"]
        assert "plotly" in Path(files[0]).read_text() and json.loads(Path(files[2]).read_text())
        assert dict(session.memory_items())["experiment"] > 0
    assert session.experiment.position == n // 2
    *_, last = panel.on_run(session, "Knock-out", 3, KnockoutChoice("erase", "7-9", CHANNEL_MODES[0], "0-3", 8, None),
                            TraceChoice(4, 8))
    assert last[0].startswith("⚠") and "Layers" in last[0]
    engine.forget(session)
