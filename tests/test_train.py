"""The training path of the demo models (RWKV-4 and RWKV-7): a tiny run whose loss goes down,
resuming after an interruption gives exactly the weights of an uninterrupted run (synthetic
corpus, no download), and the forward trained through is the engine's inference forward."""

import numpy as np
import pytest
import torch

from tools.demo_model import train as train_mod
from tools.demo_model.train import TrainConfig, bigram_baseline, lr_at


class FakeTokenizer:
    vocab_size = 64


def fake_data(out, cfg, cache):
    rng = np.random.default_rng(0)
    # a learnable sequence: a repeating pattern with a little noise
    pattern = np.tile(np.arange(16, dtype=np.uint16), 400)
    noise = rng.integers(0, 64, size=pattern.shape).astype(np.uint16)
    tokens = np.where(rng.random(pattern.shape) < 0.1, noise, pattern)
    return FakeTokenizer(), tokens[:5000], tokens[5000:], ["synthetic"], ""


@pytest.fixture
def patched(monkeypatch):
    monkeypatch.setattr(train_mod, "prepare_data", fake_data)
    monkeypatch.setattr(train_mod, "write_card", lambda *a, **k: {"validation": {}})


CFG = dict(n_layer=2, n_embd=32, vocab_size=64, ctx_len=32, batch_size=4, lr=3e-3, lr_final=1e-3,
           warmup_steps=2, eval_every=1000, checkpoint_every=3, seed=7)


def history(work):
    return torch.load(work / train_mod.TRAIN_STATE_NAME, weights_only=True)


ARCHS = {"v4": {}, "v7": {"head_size": 16}}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_tiny_run_loss_goes_down_and_ships_bf16(patched, tmp_path, arch):
    cfg = TrainConfig(steps=30, arch=arch, **ARCHS[arch], **CFG)
    assert train_mod.train(tmp_path / "out", cfg, "cpu", tmp_path / "cache", tmp_path / "work")
    losses = [r["loss"] for r in history(tmp_path / "work")["history"]]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
    name = train_mod.DEMO_MODELS[arch].checkpoint_name
    shipped = torch.load(tmp_path / "out" / name, weights_only=True)
    assert all(t.dtype == torch.bfloat16 for t in shipped.values())
    from rwkv_playground import load_runtime

    model = load_runtime(tmp_path / "out" / name)  # loads like a released checkpoint of its architecture
    assert model.config.n_layer == 2 and model.describe()["wkv"] == "cpu"
    assert model.architecture.name == {"v4": "rwkv4", "v7": "rwkv7"}[arch]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_resume_after_interruption_equals_one_run(patched, tmp_path, arch):
    cfg = TrainConfig(steps=8, arch=arch, **ARCHS[arch], **CFG)
    train_mod.train(tmp_path / "a", cfg, "cpu", tmp_path / "c", tmp_path / "wa")
    assert not train_mod.train(tmp_path / "b", cfg, "cpu", tmp_path / "c", tmp_path / "wb", stop_after=5)
    assert history(tmp_path / "wb")["step"] == 5
    assert train_mod.train(tmp_path / "b", cfg, "cpu", tmp_path / "c", tmp_path / "wb")
    name = train_mod.DEMO_MODELS[arch].checkpoint_name
    a = torch.load(tmp_path / "a" / name, weights_only=True)
    b = torch.load(tmp_path / "b" / name, weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_rwkv7_training_forward_is_the_inference_forward_position_by_position(patched, tmp_path):
    """A trained tiny RWKV-7 (so no projection is still zero): the forward the trainer runs (empty
    state, parameters requiring gradients, the C++ training kernel) gives at every position the
    logits the engine gives reading the same tokens one at a time (its fused C++ step) and in one
    prompt pass."""
    from rwkv_playground import load_runtime
    from rwkv_playground.backends import resolve

    cfg = TrainConfig(steps=12, arch="v7", head_size=16, **CFG)
    train_mod.train(tmp_path / "out", cfg, "cpu", tmp_path / "cache", tmp_path / "work")
    path = tmp_path / "out" / train_mod.DEMO_MODELS["v7"].checkpoint_name
    weights = {k: v.float() for k, v in torch.load(path, weights_only=True).items()}
    assert all(weights[f"blocks.{i}.att.output.weight"].abs().max() > 0 for i in range(cfg.n_layer))
    model, _, operator = train_mod.build_training_model(cfg, 64)
    model.load_state_dict(weights)
    model.train()
    wkv = resolve(torch.device("cpu"), "fp32", wkv="auto", step="reference", sampler="reference").recurrence(operator)
    tokens = fake_data(None, cfg, None)[1][:40].astype(np.int64)
    train_logits, _ = model(torch.from_numpy(tokens)[None], wkv=wkv)
    assert train_logits.requires_grad
    train_logits = train_logits.detach()[0]

    runtime = load_runtime(path, dtype="fp32")
    assert runtime.describe()["step"].startswith("cpu")  # the fused one-token step, not this module's forward
    state = None
    for t, token in enumerate(tokens.tolist()):
        logits, state = runtime.forward([token], state)
        assert torch.allclose(logits, train_logits[t], rtol=1e-4, atol=1e-4), t
    prompt_logits, _ = runtime.forward(tokens.tolist(), full_output=True)
    assert torch.allclose(prompt_logits, train_logits, rtol=1e-4, atol=1e-4)


def test_rwkv7_training_uses_the_kernel_backward(patched, tmp_path):
    """One training step's gradients through the C++ backward equal autograd through the reference loop."""
    from rwkv_playground.backends import resolve
    from rwkv_playground.wkv import reference_matrix_wkv

    cfg = TrainConfig(steps=1, arch="v7", head_size=16, **CFG)
    model, _, operator = train_mod.build_training_model(cfg, 64)
    with torch.no_grad():  # leave the identity init: every weight gets a gradient
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    wkv = resolve(torch.device("cpu"), "fp32", wkv="auto", step="reference", sampler="reference").recurrence(operator)
    tokens = torch.from_numpy(fake_data(None, cfg, None)[1][:66].astype(np.int64)).reshape(2, 33)
    grads = []
    for op in (wkv, reference_matrix_wkv):
        model.zero_grad(set_to_none=True)
        logits, _ = model(tokens[:, :-1], wkv=op)
        torch.nn.functional.cross_entropy(logits.reshape(-1, 64), tokens[:, 1:].reshape(-1)).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    unused = {n for n, g in grads[0].items() if g is None}
    assert unused == {n for n, g in grads[1].items() if g is None} == {"blocks.0.att.v0", "blocks.0.att.v1",
                                                                       "blocks.0.att.v2"}  # layer 0 has no residual
    for name, g in grads[0].items():
        if name in unused:
            continue
        ref = grads[1][name]
        assert (g - ref).abs().max() <= 1e-4 * ref.abs().max().clamp_min(1e-8), name


def test_rwkv7_init_and_lora_widths():
    from rwkv_playground.models import rwkv7

    # RWKV-LM's suggestion gives the released 0.1B's widths at its C = 768 ...
    assert [train_mod.rwkv7_lora_width(768, f) for f in (2.5, 2.5, 1.7, 5.0)] == [64, 64, 32, 128]
    # ... and 32/32/32/64 at the demo's C = 256
    config = train_mod.rwkv7_config(6, 256, 4096)
    assert (config.decay_lora, config.iclr_lora, config.value_lora, config.gate_lora) == (32, 32, 32, 64)
    assert (config.n_head, config.head_size) == (4, 64)
    weights = train_mod.init_rwkv7_weights(config, seed=1)
    shapes = rwkv7.expected_shapes(config)
    assert set(weights) == set(shapes) and all(tuple(weights[k].shape) == s for k, s in shapes.items())
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert weights["blocks.3.att.output.weight"].abs().max() == 0  # each block starts as the identity
    # decay biases span fast to slow channels: the decay factor per channel covers (0.55, 1)
    w = torch.exp(-0.606531 * torch.sigmoid(weights["blocks.0.att.w0"]))
    assert w.min() < 0.6 and w.max() > 0.99
    assert train_mod.init_rwkv7_weights(config, seed=1)["head.weight"].equal(weights["head.weight"])


def test_schedule_and_baseline():
    cfg = TrainConfig()
    assert lr_at(0, cfg) < lr_at(cfg.warmup_steps, cfg) == pytest.approx(cfg.lr)
    assert lr_at(cfg.steps, cfg) == pytest.approx(cfg.lr_final)
    tokens = np.tile(np.array([1, 2, 3]), 100)
    assert bigram_baseline(tokens, tokens, 5)["loss"] < 0.2  # a deterministic sequence is easy
