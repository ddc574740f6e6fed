"""Every bad input to load_model gets a LoadError with one clear sentence, and nothing runs."""

import pickle
import zipfile

import pytest
import torch

from conftest import TINY
from rwkv_playground import LoadError, load_model
from rwkv_playground.model import init_random_weights


def load_error(path, **kw):
    with pytest.raises(LoadError) as info:
        load_model(path, **kw)
    message = str(info.value)
    assert "\n" not in message and len(message) < 300
    return message


def test_missing_file_and_folder(tmp_path):
    assert "not found" in load_error(tmp_path / "nope.pth")
    assert "folder" in load_error(tmp_path)


def test_empty_text_and_random_files(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    assert "empty" in load_error(tmp_path / "empty.pth")
    (tmp_path / "notes.pth").write_text("just some text, not a model\n")
    assert "not a PyTorch or safetensors checkpoint" in load_error(tmp_path / "notes.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}" + b"\0" * 100)
    assert "not a safetensors checkpoint" in load_error(tmp_path / "junk.safetensors")


def test_truncated_files(tiny_fp32, tmp_path):
    data = tiny_fp32.read_bytes()
    for fraction in (0.5, 0.99):
        cut = tmp_path / f"cut{fraction}.pth"
        cut.write_bytes(data[: int(len(data) * fraction)])
        assert "truncated or corrupt" in load_error(cut)
    from safetensors.torch import save_file

    st = tmp_path / "full.safetensors"
    save_file({k: v.contiguous() for k, v in torch.load(tiny_fp32, weights_only=True).items()}, str(st))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(st.read_bytes()[:-1000])
    assert "truncated or corrupt" in load_error(cut)


class Exploit:
    """A pickle that would create a file if unpickled without weights_only."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_with_code_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    weights = init_random_weights(TINY)
    weights["payload"] = Exploit(marker)
    evil = tmp_path / "evil.pth"
    torch.save(weights, evil, pickle_module=pickle)
    assert "refused" in load_error(evil)
    assert not marker.exists()


@pytest.mark.parametrize("version,extra_key", [
    ("5", "blocks.0.att.time_faaaa"),
    ("6", "blocks.0.att.time_maa_x"),
    ("7", "blocks.0.att.w0"),
])
def test_newer_rwkv_versions_are_named(tmp_path, version, extra_key):
    weights = {"emb.weight": torch.zeros(10, 4), extra_key: torch.zeros(4), "blocks.0.att.key.weight": torch.zeros(4, 4)}
    path = tmp_path / f"v{version}.pth"
    torch.save(weights, path)
    assert load_error(path) == f"RWKV-{version} checkpoints are not supported yet (this playground runs RWKV-4)."


def test_not_rwkv_and_not_a_dict(tmp_path):
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "mlp.pth")
    assert "not an RWKV-4 checkpoint" in load_error(tmp_path / "mlp.pth")
    torch.save([torch.zeros(3)], tmp_path / "list.pth")
    assert "dictionary of tensors" in load_error(tmp_path / "list.pth")


def test_missing_and_misshaped_keys(tmp_path):
    weights = init_random_weights(TINY)
    del weights["blocks.1.att.value.weight"]
    torch.save(weights, tmp_path / "missing.pth")
    assert "missing key 'blocks.1.att.value.weight'" in load_error(tmp_path / "missing.pth")
    weights = init_random_weights(TINY)
    weights["blocks.2.ffn.value.weight"] = torch.zeros(64, 100)
    torch.save(weights, tmp_path / "shape.pth")
    assert "'blocks.2.ffn.value.weight' has shape [64, 100], expected [64, 256]" in load_error(tmp_path / "shape.pth")


def test_unavailable_device_and_dtype(tiny_fp32):
    assert "fp16 is not supported on CPU" in load_error(tiny_fp32, dtype="fp16")
    assert "Unknown dtype 'int4'" in load_error(tiny_fp32, dtype="int4")
    if not torch.cuda.is_available():
        assert "no NVIDIA GPU" in load_error(tiny_fp32, device="cuda")
    assert "Unknown device" in load_error(tiny_fp32, device="tpu")
    assert "Unknown WKV implementation" in load_error(tiny_fp32, wkv="fastest")
