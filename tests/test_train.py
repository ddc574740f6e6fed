"""The training path of the demo model: a tiny run whose loss goes down, and resuming after an
interruption gives exactly the weights of an uninterrupted run (synthetic corpus, no download)."""

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


def test_tiny_run_loss_goes_down_and_ships_bf16(patched, tmp_path):
    cfg = TrainConfig(steps=30, **CFG)
    assert train_mod.train(tmp_path / "out", cfg, "cpu", tmp_path / "cache", tmp_path / "work")
    losses = [r["loss"] for r in history(tmp_path / "work")["history"]]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
    shipped = torch.load(tmp_path / "out" / train_mod.CHECKPOINT_NAME, weights_only=True)
    assert all(t.dtype == torch.bfloat16 for t in shipped.values())
    from rwkv_playground import load_runtime

    model = load_runtime(tmp_path / "out" / train_mod.CHECKPOINT_NAME)  # loads like a released RWKV-4
    assert model.config.n_layer == 2 and model.describe()["wkv"] == "cpu"


def test_resume_after_interruption_equals_one_run(patched, tmp_path):
    cfg = TrainConfig(steps=8, **CFG)
    train_mod.train(tmp_path / "a", cfg, "cpu", tmp_path / "c", tmp_path / "wa")
    assert not train_mod.train(tmp_path / "b", cfg, "cpu", tmp_path / "c", tmp_path / "wb", stop_after=5)
    assert history(tmp_path / "wb")["step"] == 5
    assert train_mod.train(tmp_path / "b", cfg, "cpu", tmp_path / "c", tmp_path / "wb")
    a = torch.load(tmp_path / "a" / train_mod.CHECKPOINT_NAME, weights_only=True)
    b = torch.load(tmp_path / "b" / train_mod.CHECKPOINT_NAME, weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_schedule_and_baseline():
    cfg = TrainConfig()
    assert lr_at(0, cfg) < lr_at(cfg.warmup_steps, cfg) == pytest.approx(cfg.lr)
    assert lr_at(cfg.steps, cfg) == pytest.approx(cfg.lr_final)
    tokens = np.tile(np.array([1, 2, 3]), 100)
    assert bigram_baseline(tokens, tokens, 5)["loss"] < 0.2  # a deterministic sequence is easy
