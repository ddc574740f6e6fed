"""Every bad input to load_runtime gets a LoadError with one clear sentence, and nothing runs."""

import pickle

import pytest
import torch

from conftest import ROOT, TINY
from rwkv_playground import LoadError, load_runtime
from rwkv_playground.models.rwkv4 import init_random_weights


def load_error(path, **kw):
    with pytest.raises(LoadError) as info:
        load_runtime(path, **kw)
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


@pytest.mark.parametrize("title,extra_key", [
    ("RWKV-5", "blocks.0.att.time_faaaa"),
    ("RWKV-6", "blocks.0.att.time_maa_x"),
    ("RWKV-7", "blocks.0.att.r_k"),
])
def test_newer_rwkv_versions_are_recognised_and_checked(tmp_path, title, extra_key):
    """A partial file of a newer generation is read as that generation and its first missing key named."""
    weights = {"emb.weight": torch.zeros(10, 4), extra_key: torch.zeros(2, 2), "blocks.0.att.key.weight": torch.zeros(4, 4)}
    path = tmp_path / "partial.pth"
    torch.save(weights, path)
    message = load_error(path)
    assert "missing key" in message and f"(an {title} checkpoint has it)" in message, message


@pytest.mark.parametrize("extra_key,named", [
    ("blocks.0.ffn.s_emb.weight", 'RWKV-7a "DeepEmbed"'),
    ("blocks.3.att.qq.weight", "RWKV-7b"),
    ("blocks.0.att.time_state", "state-tuned"),
    ("blocks.0.att.gate_w1", "x060a/b/c"),
])
def test_variants_we_do_not_run_are_refused_by_name(tmp_path, extra_key, named):
    weights = {"emb.weight": torch.zeros(10, 4), "blocks.0.att.r_k": torch.zeros(2, 2), extra_key: torch.zeros(4, 4)}
    path = tmp_path / "variant.pth"
    torch.save(weights, path)
    message = load_error(path)
    assert named in message and extra_key in message and message.count(".") >= 1, message


def test_not_rwkv_and_not_a_dict(tmp_path):
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "mlp.pth")
    assert "not an RWKV-4, 5, 6 or 7 checkpoint (keys such as fc.weight)" in load_error(tmp_path / "mlp.pth")
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
    assert "Unknown dtype 'int4'" in load_error(tiny_fp32, dtype="int4")
    if not torch.cuda.is_available():
        assert "no NVIDIA GPU" in load_error(tiny_fp32, device="cuda")
    assert "Unknown device" in load_error(tiny_fp32, device="tpu")
    assert "Unknown wkv implementation 'fastest'" in load_error(tiny_fp32, wkv="fastest")
    assert "Unknown step implementation" in load_error(tiny_fp32, step="gpu")
    assert "fp16" in load_error(tiny_fp32, dtype="fp16", step="cpu")  # the C++ step reads no fp16


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool])
def test_weights_of_a_non_floating_dtype_are_refused(tmp_path, dtype):
    weights = init_random_weights(TINY)
    weights["blocks.1.att.key.weight"] = weights["blocks.1.att.key.weight"].to(dtype)
    torch.save(weights, tmp_path / "ints.pth")
    message = load_error(tmp_path / "ints.pth")
    assert "'blocks.1.att.key.weight'" in message and str(dtype).replace("torch.", "") in message


def test_an_empty_vocabulary_is_refused(tmp_path):
    weights = init_random_weights(TINY)
    weights["emb.weight"] = torch.zeros(0, TINY.n_embd)
    weights["head.weight"] = torch.zeros(0, TINY.n_embd)
    torch.save(weights, tmp_path / "empty-vocab.pth")
    assert "empty vocabulary" in load_error(tmp_path / "empty-vocab.pth")


@pytest.mark.parametrize("key,where", [("blocks.0.att.time_decay", 3), ("blocks.2.ffn.value.weight", (5, 7)),
                                       ("head.weight", (1, 2))])
def test_nan_or_inf_weights_are_refused_at_load(tmp_path, key, where):
    """A corrupt file whose forward would yield NaN/inf logits: one sentence at load, never an
    error from deep inside the sampler."""
    weights = init_random_weights(TINY)
    weights[key][where] = float("nan") if key != "head.weight" else float("inf")
    torch.save(weights, tmp_path / "nan.pth")
    message = load_error(tmp_path / "nan.pth")
    assert "NaN or infinite" in message


def test_nan_logits_at_a_step_are_a_clear_generation_error(tiny_fp32):
    """If logits go non-finite during generation (fp16 overflow on a long text, a corrupt embedding
    row), the sampler's caller gets a GenerationError sentence."""
    from rwkv_playground import GenerationError, load_tokenizer
    from rwkv_playground.generation import generate

    runtime = load_runtime(tiny_fp32)

    def poison(step, logits):
        logits[7] = float("nan")

    tok = load_tokenizer(ROOT / "assets" / "rwkv4-demo-tokenizer.json")
    stream = generate(runtime, tok, [1, 2, 3], max_tokens=5, logits_hook=poison)
    with pytest.raises(GenerationError, match="NaN or infinite logits"):
        list(stream)
    assert stream.stats.stop_reason == "error" and stream.state is not None


def test_fp16_runs_on_the_cpu(tiny_fp32):
    runtime = load_runtime(tiny_fp32, dtype="fp16")
    info = runtime.describe()
    assert info["dtype"] == "fp16" and info["step"] == "reference"
    logits, _ = runtime.forward([1, 2, 3])
    assert torch.isfinite(logits).all()
