"""Patching from a clean run, the restore sweep, removing a token and blending states, on RWKV-4
and RWKV-5/6/7 (rwkv_playground/inspector/patching.py), held to the independent float64 numpy forward of
tests/numpy_rwkv.py where it exists (v5.2, v6, v7) and to exact identities everywhere:
restoring every layer after the texts agree again gives the clean run; one restored layer is the
numpy forward with that layer's state copied; the sweep's cells are the single patches; removing a
token subtracts exactly the memory the recurrence would hold without its value, and is re-reading
the text without the token where the math says it must be (one layer, no token shift, decay 1); a
decay knock-out is the forward with that decay."""

import numpy as np
import pytest
import torch

import numpy_rwkv
from rwkv_playground.models import by_name
from rwkv_playground.models.common import Edits
from rwkv_playground.models.rwkv4 import RWKVConfig
from rwkv_playground.models.rwkv5 import RWKV5Config
from rwkv_playground.models.rwkv6 import RWKV6Config
from rwkv_playground.models.rwkv7 import RWKV7Config
from rwkv_playground.inspector.patching import (StatePart, blend, blend_states, patch, remove_token_experiment, restore_sweep,
                                      token_contribution)

CONFIGS = {
    "rwkv4": RWKVConfig(2, 64, 97, 224),
    "rwkv5": RWKV5Config(2, 64, 97, 224, 4, 16),
    "rwkv6": RWKV6Config(2, 64, 97, 224, 4, 16, mix_lora=8, decay_lora=16),
    "rwkv7": RWKV7Config(3, 64, 97, 256, 2, 32, decay_lora=16, iclr_lora=16, value_lora=8, gate_lora=16),
}
T, DIFF = 24, 4  # the texts differ at token 4 only


def close(a, b, tol=1e-4):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.abs(a - b).max() <= tol * max(1.0, np.abs(b).max())


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, tmp_path_factory):
    from rwkv_playground import load_runtime

    arch = request.param
    config = CONFIGS[arch]
    weights = by_name(arch).random_weights(config, seed=11, dtype=torch.float32)
    path = tmp_path_factory.mktemp(arch) / f"{arch}.pth"
    torch.save(weights, path)
    runtime = load_runtime(path, dtype="fp32")
    clean = torch.randint(0, config.vocab_size, (T,), generator=torch.Generator().manual_seed(2)).tolist()
    corrupt = list(clean)
    corrupt[DIFF] = (clean[DIFF] + 1) % config.vocab_size
    return arch, config, weights, runtime, clean, corrupt


def test_restoring_every_layer_after_the_texts_agree_gives_the_clean_run(case):
    arch, config, _, runtime, clean, corrupt = case
    every = [StatePart(layer) for layer in range(config.n_layer)]
    # one part covering all layers: patch them one after another by listing each as its own row
    # and also all together (a part per layer on the same row is what copy() of each does)
    result = patch(runtime, None, clean, corrupt, DIFF, every)
    assert result.recovery.shape == (config.n_layer, T - DIFF)
    # restoring all layers at once: apply every part to one row
    from rwkv_playground.state import State

    row = runtime.new_state()
    runtime.forward(corrupt[:DIFF + 1], row, inplace=True)
    clean_state = runtime.new_state()
    runtime.forward(clean[:DIFF + 1], clean_state, inplace=True)
    for part in every:
        part.copy(row, clean_state)
    for name, t in row.tensors().items():
        assert torch.equal(t, clean_state.tensors()[name]), name
    patched_logits, _ = runtime.forward(corrupt[DIFF + 1:], row, full_output=True)
    clean_logits, _ = runtime.forward(clean, full_output=True)
    assert torch.allclose(patched_logits, clean_logits[DIFF + 1:], atol=1e-5)
    assert isinstance(row, State)
    # the corrupted row differs from clean, so there is something to recover
    assert result.kl[0, 1:].max() > 1e-6
    assert np.all(result.kl[0] >= 0)


def test_one_restored_layer_is_the_numpy_forward_with_that_layer_copied(case):
    arch, config, weights, runtime, clean, corrupt = case
    position, layer = DIFF + 2, config.n_layer - 1
    if arch == "rwkv4":  # (no numpy forward of RWKV-4 here: held to the engine read by hand)
        parts = [StatePart(layer), StatePart(0, channels=(1, 2, 30))]
        result = patch(runtime, None, clean, corrupt, position, parts)
        clean_logits, clean_state = runtime.forward(clean, full_output=True)
        _, clean_state = runtime.forward(clean[:position + 1])
        top = clean_logits[position:].argmax(-1)
        for k, part in enumerate(parts):
            _, row = runtime.forward(corrupt[:position + 1])
            part.copy(row, clean_state)
            logits, _ = runtime.forward(corrupt[position + 1:], row, full_output=True)
            lp = torch.log_softmax(logits.double(), -1)[torch.arange(len(top) - 1), top[1:]].numpy()
            assert close(result.log_prob[k + 1, 1:], lp, 1e-6), part.label
        return
    parts = [StatePart(layer), StatePart(0, head=1), StatePart(1, channels=(0, 3, 5), axis="columns")]
    result = patch(runtime, None, clean, corrupt, position, parts)
    _, _, clean_state = numpy_rwkv.forward(arch, weights, clean[:position + 1], config.n_head)
    clean_logits, _, _ = numpy_rwkv.forward(arch, weights, clean, config.n_head)
    top = clean_logits[position:].argmax(-1)
    assert result.clean_top == top.tolist()

    def edit_for(part):
        def edit(t, st):
            if t != position:
                return
            if part.head is not None:
                st["S"][part.layer, part.head] = clean_state["S"][part.layer, part.head]
            elif part.channels is not None:
                idx = list(part.channels)
                st["S"][part.layer][:, :, idx] = clean_state["S"][part.layer][:, :, idx]
            else:
                for name in ("att_x", "S", "ffn_x"):
                    st[name][part.layer] = clean_state[name][part.layer]
        return edit

    for k, part in enumerate(parts):
        logits, _, _ = numpy_rwkv.forward(arch, weights, corrupt, config.n_head, edit=edit_for(part))
        lp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
        want = lp[position:][np.arange(len(top)), top]
        assert close(result.log_prob[k + 1], want), part.label


def test_the_sweep_cells_are_the_single_patches(case):
    arch, config, _, runtime, clean, corrupt = case
    sweep = restore_sweep(runtime, None, clean, corrupt, target=T - 1, window=6)
    assert sweep.recovery.shape == (config.n_layer, 6) and sweep.positions == list(range(T - 7, T - 1))
    for j in (0, 3, 5):
        pos = sweep.positions[j]
        single = patch(runtime, None, clean, corrupt, pos, [StatePart(g) for g in range(config.n_layer)])
        col = T - 1 - pos  # the target's column in the patch result
        assert single.clean_top[col] == sweep.answer
        assert close(single.log_prob[1:, col], sweep.log_prob[:, j], 1e-5)
    # restoring after the last differing token leaves nothing of the corruption in that layer's state...
    assert np.isfinite(sweep.corrupt_log_prob) and sweep.clean_log_prob >= sweep.corrupt_log_prob - 50
    assert "recovery" in sweep.to_json() and sweep.to_csv().count("\n") == config.n_layer * 6 + 1


def test_removing_a_token_subtracts_exactly_its_memory(case):
    arch, config, weights, runtime, clean, _ = case
    removed, at, layer = 3, 9, config.n_layer - 1
    contribution = token_contribution(runtime, clean, removed, at, layer)
    if arch == "rwkv4":
        # the state without the token's term: read the text with that token's weight in this layer zero
        from rwkv_playground.inspector.patching import remove_token

        _, state = runtime.forward(clean[:at + 1])
        edited = remove_token(runtime, state, contribution, layer)
        assert torch.all(edited.bb[layer] < state.bb[layer] + 1e-6)
        assert not torch.equal(edited.aa[layer], state.aa[layer])
        return
    _, obs, _ = numpy_rwkv.forward(arch, weights, clean[:at + 1], config.n_head)
    H, N = config.n_head, config.head_size
    # the recurrence of this layer replayed on the same inputs with the token's value zeroed
    get = lambda n: obs[n][:, layer].reshape(at + 1, H, N)  # noqa: E731
    r, k, v, w = get("r"), get("k"), get("v").copy(), get("w")
    v[removed] = 0
    S = np.zeros((H, N, N))
    for t in range(at + 1):
        for h in range(H):
            if arch == "rwkv7":
                kk, a = get("kk")[t, h], get("a")[t, h]
                S[h] = S[h] * w[t, h][None] - np.outer(S[h] @ kk, kk * a) + np.outer(v[t, h], k[t, h])
            else:
                S[h] = np.outer(k[t, h], v[t, h]) + w[t, h][:, None] * S[h]
    expected = obs["S"][at, layer] - S
    assert close(contribution["wkv_state"].numpy(), expected, 1e-5)
    result = remove_token_experiment(runtime, None, clean, removed, at, layers=[layer])

    def edit(t, st):
        if t == at:
            st["S"][layer] = S

    logits, _, _ = numpy_rwkv.forward(arch, weights, clean, config.n_head, edit=edit)
    orig, _, _ = numpy_rwkv.forward(arch, weights, clean, config.n_head)
    lp = lambda x: x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))  # noqa: E731
    kl = (np.exp(lp(orig)) * (lp(orig) - lp(logits))).sum(-1)[at + 1:]
    assert close(result.kl, kl, 1e-4) and result.kl.max() > 0


def test_blend_ends_are_the_two_texts(case):
    arch, config, _, runtime, clean, corrupt = case
    other = clean[5:] + clean[:5]
    result = blend(runtime, None, clean, other, alphas=(0, 0.5, 1), continuation=4)
    assert result.kl_from_a[0] < 1e-9  # alpha 0: text a itself
    # alpha 1: text b's memory reading text a's last token
    logits, _ = runtime.forward(other[:-1] + [clean[-1]])
    lp = torch.log_softmax(logits.double(), -1)
    assert abs(float(lp.exp().max()) - float(result.top_probs[2, 0])) < 1e-5
    assert len(result.continuations) == 3 and all(isinstance(c, str) for c in result.continuations)
    _, sa = runtime.forward(clean)
    _, sb = runtime.forward(other)
    half = blend_states(sa, sb, 0.5)
    assert all(torch.isfinite(t).all() for t in half.tensors().values())
    assert result.to_csv().count("\n") == 4


def test_bad_requests_are_refused_in_one_sentence(case):
    from rwkv_playground.errors import GenerationError

    arch, config, _, runtime, clean, corrupt = case
    with pytest.raises(GenerationError, match="same number of tokens"):
        patch(runtime, None, clean, corrupt[:-1], 2, [StatePart(0)])
    with pytest.raises(GenerationError, match="Layer 9"):
        patch(runtime, None, clean, corrupt, 2, [StatePart(9)])
    if arch == "rwkv4":
        with pytest.raises(GenerationError, match="no heads"):
            patch(runtime, None, clean, corrupt, 2, [StatePart(0, head=0)])
    with pytest.raises(GenerationError, match="outside"):
        patch(runtime, None, clean, corrupt, T, [StatePart(0)])


def test_erasing_a_head_or_rows_is_a_knock_out(case):
    arch, config, weights, runtime, clean, _ = case
    if arch == "rwkv4":
        parts = [StatePart(0, channels=(0, 1, 2, 3))]
    else:
        parts = [StatePart(1, head=0), StatePart(0, channels=(0, 1), axis="rows"),
                 StatePart(0, channels=(2,), axis="columns")]
    result = patch(runtime, None, clean, clean, 8, parts, kind="erase")
    assert np.all(result.kl[0] < 1e-5)  # the same text twice: the unedited row is the clean run (float32 KL)
    assert result.kl[1:, 1:].max() > 0
    # by hand: the state after token 8 with the part emptied, then the rest
    _, row = runtime.forward(clean[:9])
    parts[0].erase(row)
    logits, _ = runtime.forward(clean[9:], row, full_output=True)
    top = torch.tensor(result.clean_top[1:])
    lp = torch.log_softmax(logits.double(), -1)[torch.arange(len(top)), top].numpy()
    assert close(result.log_prob[1, 1:], lp, 1e-6)
    if arch != "rwkv4":
        _, row = runtime.forward(clean[:9])
        parts[0].erase(row)
        assert row.wkv_state[1, 0].abs().max() == 0 and row.wkv_state[1, 1].abs().max() > 0


def test_two_models_on_one_text(case, tmp_path):
    from rwkv_playground import load_runtime
    from rwkv_playground.inspector.patching import compare_models

    arch, config, weights, runtime, clean, _ = case
    other_weights = by_name(arch).random_weights(config, seed=12, dtype=torch.float32)
    torch.save(other_weights, tmp_path / "other.pth")
    other = load_runtime(tmp_path / "other.pth", dtype="fp32")
    result = compare_models(runtime, other, None, clean, names=("a", "b"))
    for row, rt in enumerate((runtime, other)):
        logits, _ = rt.forward(clean, full_output=True)
        lp = torch.log_softmax(logits.double(), -1)
        want = -lp[torch.arange(T - 1), torch.tensor(clean[1:])].numpy()
        assert close(result.surprisal[row, 1:], want, 1e-6) and np.isnan(result.surprisal[row, 0])
    assert len(result.half_life[0]) == config.n_layer and all(h > 0 for h in result.half_life[0])
    assert result.half_life[0] != result.half_life[1]
    assert result.to_csv().count("\n") == T + 1
    # every channel's half-life side by side: RWKV-4's from its parameter, the others' the median over
    # the text's tokens of -ln2 / ln w (the numpy forward's decay)
    for h, w in zip(result.channel_half_life, (weights, other_weights)):
        assert h.shape == (config.n_layer, config.n_embd)
        if arch == "rwkv4":
            want = np.stack([np.log(2) / np.exp(w[f"blocks.{i}.att.time_decay"].double().numpy())
                             for i in range(config.n_layer)])
        else:
            _, obs, _ = numpy_rwkv.forward(arch, w, clean, config.n_head)
            want = np.median(-np.log(2) / np.log(obs["w"]), axis=0)
        assert close(h, want, 1e-4)
    from rwkv_playground.ui.patching_panel import models_figure

    fig = models_figure(result)
    heat = [t for t in fig.data if t.type == "heatmap"]
    assert len(heat) == 2 and heat[0].zmin == heat[1].zmin and heat[0].zmax == heat[1].zmax
    assert np.allclose(heat[1].z, np.log10(result.channel_half_life[1]))


def _log_softmax(x):
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@pytest.mark.parametrize("factor", [0.0, 0.9, 1.0])
def test_a_decay_knock_out_is_the_forward_with_that_decay(case, factor):
    from rwkv_playground.errors import GenerationError

    arch, config, weights, runtime, clean, _ = case
    position = 8
    if arch == "rwkv4":  # held to the inspector's RWKV-4 decay knock-out (experiments.py), the same edit
        import math

        from rwkv_playground.inspector.knockouts import Knockout, knockouts

        parts = [StatePart(0, channels=(0, 1, 2, 3)), StatePart(config.n_layer - 1)]
        result = patch(runtime, None, clean, clean, position, parts, kind="decay", decay=factor)
        time_decay = min(40.0, max(-40.0, math.log(-math.log(min(max(factor, 1e-300), 1 - 1e-16)))))
        for k, part in enumerate(parts):
            channels = part.channels or tuple(range(config.n_embd))
            ref = knockouts(runtime, None, clean, [Knockout(layer=part.layer, channels=channels, position=position + 1,
                                                            kind="decay", time_decay=time_decay)])
            assert close(result.kl[k + 1, 1:], ref.kl[0], 1e-4), part.label
        assert result.kl[1:, 1:].max() > 0
        return
    key_axis = "columns" if arch == "rwkv7" else "rows"
    H, N = config.n_head, config.head_size
    parts = [StatePart(1, head=0), StatePart(0, channels=(0, 1, 5), axis=key_axis), StatePart(config.n_layer - 1)]
    result = patch(runtime, None, clean, clean, position, parts, kind="decay", decay=factor)
    assert np.all(result.kl[0] < 1e-5) and result.kl[1:, 1:].max() > 0 and np.all(result.kl[1:, 0] < 1e-5)
    top = np.array(result.clean_top)

    def channels_of(part):
        if part.head is not None:
            return list(range(part.head * N, (part.head + 1) * N))
        if part.channels is not None:
            return [h * N + c for h in range(H) for c in part.channels]
        return list(range(H * N))

    for k, part in enumerate(parts):
        picked = channels_of(part)

        def decay_edit(t, layer, w, part=part, picked=picked):
            if t > position and layer == part.layer:
                w = np.array(w, dtype=np.float64)
                w[picked] = factor
            return w

        logits, _, _ = numpy_rwkv.forward(arch, weights, clean, config.n_head, decay_edit=decay_edit)
        want = _log_softmax(logits)[position:][np.arange(len(top)), top]
        assert close(result.log_prob[k + 1], want, 1e-4), part.label
    value_axis = "rows" if arch == "rwkv7" else "columns"
    with pytest.raises(GenerationError, match=f"key channels, which are the matrix's {key_axis}"):
        patch(runtime, None, clean, clean, position, [StatePart(0, channels=(0,), axis=value_axis)], kind="decay",
              decay=factor)
    with pytest.raises(GenerationError, match="between 0"):
        patch(runtime, None, clean, clean, position, parts, kind="decay", decay=1.5)


# Where the math says removing a token must equal re-reading the text without it: one layer (no
# layer above reads the token's output), no token shift (no later input mixes it in) and a decay of
# 1 (dropping a token shifts no one's age; RWKV-7: no in-context removal either, a = 0). Then the
# token lives only in its additive term of the state, and subtracting that term is the text without it.
ONE_LAYER = {
    "rwkv4": RWKVConfig(1, 64, 97, 224),
    "rwkv5": RWKV5Config(1, 64, 97, 224, 4, 16),
    "rwkv6": RWKV6Config(1, 64, 97, 224, 4, 16, mix_lora=8, decay_lora=16),
    "rwkv7": RWKV7Config(1, 64, 97, 256, 2, 32, decay_lora=16, iclr_lora=16, value_lora=8, gate_lora=16),
}
NO_SHIFT = {"rwkv4": {"att.time_mix_k": 1, "att.time_mix_v": 1, "att.time_mix_r": 1, "ffn.time_mix_k": 1,
                      "ffn.time_mix_r": 1},
            "rwkv5": {"att.time_mix_k": 1, "att.time_mix_v": 1, "att.time_mix_r": 1, "att.time_mix_g": 1,
                      "ffn.time_mix_k": 1, "ffn.time_mix_r": 1},
            "rwkv6": {"att.time_maa_x": 0, "att.time_maa_w": 0, "att.time_maa_k": 0, "att.time_maa_v": 0,
                      "att.time_maa_r": 0, "att.time_maa_g": 0, "att.time_maa_w1": 0, "ffn.time_maa_k": 0,
                      "ffn.time_maa_r": 0},
            "rwkv7": {f"att.x_{m}": 0 for m in "rwkvag"} | {"ffn.x_k": 0}}
KEEP_ALL = {"rwkv4": {"att.time_decay": -50}, "rwkv5": {"att.time_decay": -50},
            "rwkv6": {"att.time_decay": -50, "att.time_decay_w1": 0},
            "rwkv7": {"att.w0": -50, "att.w1": 0, "att.a0": -50, "att.a1": 0}}


@pytest.mark.parametrize("arch", list(ONE_LAYER))
def test_removing_a_token_is_re_reading_without_it_where_the_math_says_so(arch, tmp_path):
    from rwkv_playground import load_runtime
    from rwkv_playground.inspector.patching import remove_token

    config = ONE_LAYER[arch]
    weights = by_name(arch).random_weights(config, seed=5, dtype=torch.float32)
    for name, value in (NO_SHIFT[arch] | KEEP_ALL[arch]).items():
        weights[f"blocks.0.{name}"].fill_(value)
    torch.save(weights, tmp_path / "m.pth")
    runtime = load_runtime(tmp_path / "m.pth", dtype="fp32")
    tokens = torch.randint(0, config.vocab_size, (20,), generator=torch.Generator().manual_seed(4)).tolist()
    removed, at = 5, 11
    without = tokens[:removed] + tokens[removed + 1:]
    reread, _ = runtime.forward(without, full_output=True)
    _, state = runtime.forward(tokens[:at + 1])
    edited = remove_token(runtime, state, token_contribution(runtime, tokens, removed, at, 0), 0)
    logits, _ = runtime.forward(tokens[at + 1:], edited, full_output=True)
    assert torch.allclose(logits, reread[at:], atol=1e-4, rtol=1e-4)
    _, reread_state = runtime.forward(without[:at])
    if arch == "rwkv4":  # the memory the state stands for: aa e^{pp}, bb e^{pp}
        for name in ("aa", "bb"):
            a = getattr(edited, name).double() * torch.exp(edited.pp.double())
            b = getattr(reread_state, name).double() * torch.exp(reread_state.pp.double())
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max())), name
    else:
        assert torch.allclose(edited.wkv_state, reread_state.wkv_state, atol=1e-4)
    # the experiment reports exactly that: its KL is the KL of re-reading without the token
    result = remove_token_experiment(runtime, None, tokens, removed, at)
    original, _ = runtime.forward(tokens, full_output=True)
    lp_o = torch.log_softmax(original[at + 1:].double(), -1)
    lp_r = torch.log_softmax(reread[at:].double(), -1)
    want = (lp_o.exp() * (lp_o - lp_r)).sum(-1).numpy()
    assert np.abs(result.kl - want).max() <= 1e-3 * want.max() and want.max() > 1e-4
    # and without those conditions it is not the same thing (the model's own decay ages every token)
    own = by_name(arch).random_weights(config, seed=5, dtype=torch.float32)
    torch.save(own, tmp_path / "own.pth")
    runtime = load_runtime(tmp_path / "own.pth", dtype="fp32")
    reread, _ = runtime.forward(without, full_output=True)
    _, state = runtime.forward(tokens[:at + 1])
    edited = remove_token(runtime, state, token_contribution(runtime, tokens, removed, at, 0), 0)
    logits, _ = runtime.forward(tokens[at + 1:], edited, full_output=True)
    assert (logits - reread[at:]).abs().max() > 1e-3


def test_long_readings_go_chunk_by_chunk_with_the_same_results(case, monkeypatch, tmp_path):
    """Patching, removal and the two-model comparison read the rest of a text a chunk of positions
    at a time, so the logits held at once stay bounded (rows x tokens x vocabulary, however long the
    text or many the parts): squeezed to a few tokens per read, every number is the same."""
    from rwkv_playground.inspector import knockouts as experiments
    from rwkv_playground.inspector.patching import compare_models

    arch, config, _, runtime, clean, corrupt = case
    parts = [StatePart(layer) for layer in range(config.n_layer)] + [StatePart(0, channels=(1, 2))]
    decay_parts = [StatePart(config.n_layer - 1), StatePart(0, channels=(0, 1), axis="columns" if arch == "rwkv7" else "rows")]

    def run_all():
        return (patch(runtime, None, clean, corrupt, 2, parts),
                patch(runtime, None, clean, clean, 3, decay_parts, kind="decay", decay=0.5),
                remove_token_experiment(runtime, None, clean, 1, 5),
                compare_models(runtime, runtime, None, clean))

    whole = run_all()
    rows = len(parts) + 2  # the clean reading, the corrupted one, one per part
    limit = 3 * rows * config.vocab_size
    monkeypatch.setattr(experiments, "MAX_BATCH_LOGITS", limit)
    monkeypatch.setattr(runtime, "chunk_len", 4)
    held = []
    forward = runtime.forward

    def counting_forward(tokens, *args, **kwargs):
        logits, state = forward(tokens, *args, **kwargs)
        held.append(logits.numel())
        return logits, state

    monkeypatch.setattr(runtime, "forward", counting_forward)
    chunked = run_all()
    assert max(held) <= limit and len(held) > 3 * T // 4
    for a, b in zip(whole[:2], chunked[:2]):
        assert a.clean_top == b.clean_top
        assert close(a.log_prob, b.log_prob, 1e-5) and close(a.kl, b.kl, 1e-5)
        assert np.array_equal(np.isnan(a.recovery), np.isnan(b.recovery))
    a, b = whole[2], chunked[2]
    assert a.kl.shape == b.kl.shape == (T - 6,) and close(a.kl, b.kl, 1e-5) and a.top_texts == b.top_texts
    assert close(a.surprisal[:, :-1], b.surprisal[:, :-1], 1e-5) and np.isnan(b.surprisal[:, -1]).all()
    a, b = whole[3], chunked[3]
    assert close(a.surprisal[:, 1:], b.surprisal[:, 1:], 1e-5) and np.isnan(b.surprisal[:, 0]).all()
    # the decays of every chunk count, not the last chunk's only
    assert close(a.half_life, b.half_life, 1e-5)
    assert all(close(x, y, 1e-5) for x, y in zip(a.channel_half_life, b.channel_half_life))


def test_rows_that_edit_one_layer_share_the_layers_below(case, monkeypatch):
    """Runtime.forward(edits=Edits(first_layers=...)): a row that reads as row 0 below its layer is computed
    from that layer on only (row 0's residual stream copied in), with the same logits and state
    as reading every row in full; what the promise needs is checked."""
    arch, config, _, runtime, clean, corrupt = case
    L = config.n_layer
    start = runtime.new_state()
    runtime.forward(clean[:6], start, inplace=True)
    from rwkv_playground.state import State

    firsts = [0, 0, L - 1, 1, 0, L - 1]
    rows = State.stack([start] * len(firsts))
    singles = rows.unbind_views()
    g = torch.Generator().manual_seed(5)
    for b, first in enumerate(firsts[1:], start=1):  # each row edits its own layer (row 1 also its tokens)
        for t in singles[b].tensors().values():
            t[first].add_(torch.randn(t[first].shape, generator=g, dtype=t.dtype))
    tokens = torch.tensor([corrupt[6:]] * len(firsts))
    tokens[1] = torch.tensor(clean[6:])
    decay = None
    if arch != "rwkv4":
        decay = {L - 1: torch.full((len(firsts), config.n_head, config.head_size), float("nan"))}
        decay[L - 1][2, 1] = 0.5
    if arch == "rwkv4":
        decay = {1: runtime.architecture.decay_rows(runtime.model, 1, len(firsts))}
        decay[1][3, :5] = 2.0
    want, want_state = runtime.forward(tokens, rows, full_output=True, edits=Edits(decay))
    seen = []
    for i, block in enumerate(runtime.model.blocks):
        original = block.forward
        monkeypatch.setattr(block, "forward", lambda x, *a, i=i, f=original, **k: (seen.append((i, x.shape[0])), f(x, *a, **k))[1])
    got, got_state = runtime.forward(tokens, rows, full_output=True, edits=Edits(decay, firsts))
    assert seen == [(i, sum(f <= i for f in firsts)) for i in range(L)]  # only the rows joined by each layer
    assert torch.allclose(got, want, atol=1e-5)
    for name, t in got_state.tensors().items():
        assert torch.allclose(t, want_state.tensors()[name], atol=1e-5), name
    bad_tokens = tokens.clone()
    bad_tokens[2, 3] = (bad_tokens[2, 3] + 1) % config.vocab_size
    with pytest.raises(ValueError, match="other tokens"):
        runtime.forward(bad_tokens, rows, edits=Edits(first_layers=firsts))
    with pytest.raises(ValueError, match="Row 4's att_x differs from row 0's below layer 1"):
        runtime.forward(tokens, rows, edits=Edits(first_layers=firsts[:4] + [1] + firsts[5:]))  # row 4 edited layer 0
    if arch == "rwkv4":
        bad = {0: runtime.model.blocks[0].att.time_decay.detach().float().expand(len(firsts), -1).clone()}
        bad[0][2, :3] = 1.0
    else:
        bad = {0: torch.full((len(firsts), config.n_head, config.head_size), float("nan"))}
        bad[0][2, 0] = 0.1
    with pytest.raises(ValueError, match="decay at layer 0 differs"):
        runtime.forward(tokens, rows, edits=Edits(bad, firsts))
    with pytest.raises(ValueError, match="row 0's is 0"):
        runtime.forward(tokens, rows, edits=Edits(first_layers=[1] + firsts[1:]))


def test_a_comparison_too_long_to_keep_its_decays_is_refused_in_one_sentence(case, monkeypatch):
    from rwkv_playground.inspector import patching
    from rwkv_playground.errors import GenerationError

    arch, config, _, runtime, clean, _ = case
    monkeypatch.setattr(patching, "MAX_COMPARE_FLOATS", config.n_layer * config.n_embd * 10)
    if arch == "rwkv4":  # its half-lives come from the parameters: nothing per token is kept
        assert patching.compare_models(runtime, runtime, None, clean).surprisal.shape == (2, T)
        return
    with pytest.raises(GenerationError, match=f"at most 10 tokens \\({T} given\\)"):
        patching.compare_models(runtime, runtime, None, clean)
    assert patching.compare_models(runtime, runtime, None, clean[:10]).surprisal.shape == (2, 10)
