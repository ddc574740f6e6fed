import pytest
import torch

from conftest import TINY, write_checkpoint
from rwkv_playground import LoadError, State, StateError, load_runtime


@pytest.fixture(scope="module")
def model(tiny_fp32):
    return load_runtime(tiny_fp32)


def test_components_shapes_and_initial_values(model):
    s = model.new_state()
    for name in ("att_x", "aa", "bb", "pp", "ffn_x"):
        t = getattr(s, name)
        assert t.shape == (TINY.n_layer, TINY.n_embd) and t.dtype == torch.float32
    assert torch.all(s.pp == -1e30) and torch.all(s.aa == 0) and s.token_count == 0


def test_input_state_untouched_unless_inplace(model):
    _, s = model.forward([1, 2, 3])
    before = {k: v.clone() for k, v in s.tensors().items()}
    _, s2 = model.forward([4, 5], s)
    assert all(torch.equal(before[k], v) for k, v in s.tensors().items())
    assert s2.token_count == 5 and s.token_count == 3
    _, s3 = model.forward([4, 5], s, inplace=True)
    assert s3 is s and not torch.equal(before["aa"], s.aa)
    assert torch.equal(s.aa, s2.aa)


def test_clone_is_independent(model):
    _, s = model.forward([1, 2, 3])
    c = s.clone()
    c.aa += 1
    assert not torch.equal(c.aa, s.aa)


def test_batched_forward_matches_single_sequences(model):
    prompts = [[1, 2, 3, 4], [9, 8, 7, 6]]
    singles = [model.forward(p) for p in prompts]
    batched = State.stack([model.new_state(), model.new_state()])
    logits, out = model.forward(torch.tensor(prompts), batched)
    assert logits.shape == (2, TINY.vocab_size)
    for b, (single_logits, single_state) in enumerate(singles):
        assert torch.allclose(logits[b], single_logits, atol=1e-5)
        assert torch.allclose(out.unbind()[b].value_estimate(), single_state.value_estimate(), atol=1e-6)
    assert out.token_count == [4, 4]
    # a batch can also be stacked from states with different histories
    mixed = State.stack([singles[0][1], singles[1][1]])
    nxt, _ = model.forward(torch.tensor([[5], [5]]), mixed)
    assert torch.allclose(nxt[1], model.forward([5], singles[1][1])[0], atol=1e-5)


def test_save_and_load_roundtrip(model, tmp_path):
    _, s = model.forward([3, 1, 4, 1, 5])
    path = tmp_path / "state.safetensors"
    s.save(path, extra_metadata={"text": "π"})
    loaded = State.load(path, runtime=model)
    assert all(torch.equal(a, b) for a, b in zip(loaded.tensors().values(), s.tensors().values()))
    assert loaded.token_count == 5 and loaded.fingerprint == model.fingerprint
    assert loaded.metadata == {"text": "π"}
    a, _ = model.forward([9], s)
    b, _ = model.forward([9], loaded)
    assert torch.equal(a, b)


def test_state_of_another_model_is_refused(model, ckpt_dir, tmp_path):
    _, s = model.forward([1, 2])
    path = tmp_path / "s.safetensors"
    s.save(path)
    other = load_runtime(write_checkpoint(ckpt_dir / "other.pth", TINY, seed=99))
    with pytest.raises(StateError, match="different model"):
        State.load(path, runtime=other)
    small = State.zeros(2, 16)
    with pytest.raises(StateError, match="2 layers x 16 channels"):
        model.forward([1], small)


def test_bad_state_files(tmp_path):
    with pytest.raises(LoadError, match="not found"):
        State.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"garbage")
    with pytest.raises(LoadError):
        State.load(tmp_path / "junk.safetensors")
