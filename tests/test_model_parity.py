"""The engine against the world: the `rwkv` pip package (0.8.x, cpu fp32) on the same checkpoints.

Tolerance: max |diff| / max |logit| <= 1e-5 (the documented realistic fp32 tolerance). States are
compared as aa/bb, pp + log bb, att_x, ffn_x because the (aa, bb, pp) scaling is not unique.

Note on bf16 files: the rwkv package applies LN0 to the embedding while it is still bf16, which
rounds it (~1e-3). So the package reads the exact fp32 upcast of a bf16 file, and the engine reads
the bf16 file itself: the values are identical, and the bf16 loading path is covered.
"""

import pytest
import torch

from conftest import MID, TINY, write_checkpoint
from rwkv_playground.models.rwkv4 import RWKVConfig, init_random_weights

TOL = 1e-5


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def rwkv_pkg():
    return pytest.importorskip("rwkv.model", reason="the rwkv pip package is a test dependency (requirements-dev)")


def reference_model(rwkv_pkg, path):
    return rwkv_pkg.RWKV(str(path), strategy="cpu fp32", verbose=False)


def random_tokens(n, vocab, seed=0):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def compare_states(ref_state, state, n_layer):
    for i in range(n_layer):
        att_x, aa, bb, pp, ffn_x = ref_state[5 * i: 5 * i + 5]
        assert rel(state.att_x[i], att_x) <= TOL
        assert rel(state.ffn_x[i], ffn_x) <= TOL
        assert rel(state.value_estimate()[i], aa / bb) <= TOL
        assert (state.log_mass()[i] - (pp + torch.log(bb))).abs().max().item() <= 1e-4


@pytest.mark.parametrize("wkv", ["reference", "cpu"])
def test_tiny_sequence_rnn_and_states_match_package(rwkv_pkg, tiny_fp32, wkv):
    from rwkv_playground import load_runtime

    ref = reference_model(rwkv_pkg, tiny_fp32)
    model = load_runtime(tiny_fp32, wkv=wkv)
    tokens = random_tokens(70, TINY.vocab_size)
    ref_all, ref_state = ref.forward(tokens, None, full_output=True)
    all_logits, state = model.forward(tokens, None, full_output=True)
    assert all_logits.shape == (70, TINY.vocab_size) and all_logits.dtype == torch.float32
    assert rel(all_logits, ref_all) <= TOL
    last, _ = model.forward(tokens)
    assert last.shape == (TINY.vocab_size,)
    assert rel(last, ref_all[-1]) <= TOL
    compare_states(ref_state, state, TINY.n_layer)

    # RNN mode, token by token, on both sides
    ref_s, s = None, None
    for t in tokens[:20]:
        ref_out, ref_s = ref.forward([t], ref_s)
        out, s = model.forward([t], s)
        assert rel(out, ref_out) <= TOL
    compare_states(ref_s, s, TINY.n_layer)


def test_bf16_file_loads_exactly(rwkv_pkg, tiny_bf16, ckpt_dir):
    from rwkv_playground import load_runtime

    upcast = ckpt_dir / "tiny-bf16-as-fp32.pth"
    torch.save({k: v.float() for k, v in torch.load(tiny_bf16, weights_only=True).items()}, upcast)
    ref = reference_model(rwkv_pkg, upcast)
    model = load_runtime(tiny_bf16, dtype="fp32")
    tokens = random_tokens(40, TINY.vocab_size, seed=5)
    ref_all, ref_state = ref.forward(tokens, None, full_output=True)
    all_logits, state = model.forward(tokens, None, full_output=True)
    assert rel(all_logits, ref_all) <= TOL
    compare_states(ref_state, state, TINY.n_layer)


def test_mid_size_shape_matches_package(rwkv_pkg, mid_fp32):
    """6 x 512 x vocab 50277: sequence (chunked over a chunk boundary) and RNN mode."""
    from rwkv_playground import load_runtime

    ref = reference_model(rwkv_pkg, mid_fp32)
    model = load_runtime(mid_fp32, chunk_len=48)
    tokens = random_tokens(100, MID.vocab_size, seed=7)
    ref_all, ref_state = ref.forward(tokens, None, full_output=True)
    all_logits, state = model.forward(tokens, None, full_output=True)
    assert rel(all_logits, ref_all) <= TOL
    compare_states(ref_state, state, MID.n_layer)
    ref_out, ref_s = ref.forward(tokens[:1], ref_state)
    out, s = model.forward(tokens[:1], state)
    assert rel(out, ref_out) <= TOL
    compare_states(ref_s, s, MID.n_layer)


def test_sequence_equals_rnn_and_chunking_is_invisible(tiny_fp32):
    from rwkv_playground import load_runtime

    model = load_runtime(tiny_fp32)
    tokens = random_tokens(50, TINY.vocab_size, seed=9)
    full, state_full = model.forward(tokens, full_output=True, chunk_len=1000)
    chunked, state_chunked = model.forward(tokens, full_output=True, chunk_len=7)
    assert rel(chunked, full) <= 1e-6
    s, outs = None, []
    for t in tokens:
        out, s = model.forward([t], s)
        outs.append(out)
    assert rel(torch.stack(outs), full) <= 1e-6
    for a, b in ((state_chunked, state_full), (s, state_full)):
        assert rel(a.value_estimate(), b.value_estimate()) <= 1e-6
        assert rel(a.att_x, b.att_x) <= 1e-6
    assert state_full.token_count == 50 and s.token_count == 50


def test_last_token_prompt_skips_work_but_not_state(tiny_fp32):
    """Without full_output the last layer runs its output projections and FFN on the last
    token(s) only: the logits and every part of the state must not notice."""
    from rwkv_playground import load_runtime

    model = load_runtime(tiny_fp32)
    tokens = random_tokens(40, TINY.vocab_size, seed=21)
    for chunk_len in (1000, 7, 1):
        full, state_full = model.forward(tokens, full_output=True, chunk_len=chunk_len)
        last, state_last = model.forward(tokens, chunk_len=chunk_len)
        assert rel(last, full[-1]) <= 1e-6
        for name, tensor in state_full.tensors().items():
            assert torch.allclose(state_last.tensors()[name], tensor, rtol=1e-6, atol=1e-6), (chunk_len, name)


def test_bf16_prompt_is_fp32_math_on_bf16_weights(ckpt_dir, tiny_bf16):
    """CPU prompts with bf16 weights through the "upcast" GEMM: same numbers as an fp32 model of
    the bf16-rounded weights ("native", PyTorch's bf16 GEMM, rounds the activations too: held to
    this within bf16 rounding in test_int8.py)."""
    from rwkv_playground import load_runtime

    upcast = ckpt_dir / "tiny-bf16-upcast-for-prompt.pth"
    torch.save({k: v.float() for k, v in torch.load(tiny_bf16, weights_only=True).items()}, upcast)
    tokens = random_tokens(64, TINY.vocab_size, seed=22)
    bf16, state_bf16 = load_runtime(tiny_bf16, dtype="bf16", gemm="upcast").forward(tokens, full_output=True)
    fp32, state_fp32 = load_runtime(upcast, dtype="fp32").forward(tokens, full_output=True)
    assert rel(bf16, fp32) <= 1e-5
    assert rel(state_bf16.att_x, state_fp32.att_x) <= 1e-5


def test_kernel_and_reference_give_same_logits(tiny_fp32):
    from rwkv_playground import load_runtime

    tokens = random_tokens(300, TINY.vocab_size, seed=11)
    a, _ = load_runtime(tiny_fp32, wkv="reference").forward(tokens, full_output=True)
    b, _ = load_runtime(tiny_fp32, wkv="cpu").forward(tokens, full_output=True)
    assert rel(b, a) <= 1e-6


def test_bf16_close_to_fp32(ckpt_dir):
    from rwkv_playground import load_runtime

    path = write_checkpoint(ckpt_dir / "tiny-bf16-cmp.pth", TINY, seed=12)
    tokens = random_tokens(200, TINY.vocab_size, seed=13)
    fp32, _ = load_runtime(path, dtype="fp32").forward(tokens, full_output=True)
    bf16, _ = load_runtime(path, dtype="bf16").forward(tokens, full_output=True)
    assert rel(bf16, fp32) <= 0.03
    agreement = (bf16.argmax(-1) == fp32.argmax(-1)).float().mean().item()
    assert agreement >= 0.90


def test_safetensors_and_hf_names_load_the_same(tiny_fp32, ckpt_dir):
    from safetensors.torch import save_file

    from rwkv_playground import load_runtime

    weights = torch.load(tiny_fp32, weights_only=True)
    st_path = ckpt_dir / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in weights.items()}, str(st_path))
    hf = {}
    for k, v in weights.items():
        name = k.replace("emb.", "embeddings.").replace(".ln0.", ".pre_ln.").replace(".att.", ".attention.")
        name = name.replace(".ffn.", ".feed_forward.").replace("time_mix_k", "time_mix_key")
        name = name.replace("time_mix_v", "time_mix_value").replace("time_mix_r", "time_mix_receptance")
        hf[name if name == "head.weight" else "rwkv." + name] = v
    hf_path = ckpt_dir / "tiny-hf.pth"
    torch.save(hf, hf_path)
    tokens = random_tokens(30, TINY.vocab_size)
    expected, _ = load_runtime(tiny_fp32).forward(tokens)
    for path in (st_path, hf_path):
        got, _ = load_runtime(path).forward(tokens)
        assert torch.equal(got, expected)


def test_config_is_inferred_from_weights(tiny_fp32):
    from rwkv_playground import load_runtime

    info = load_runtime(tiny_fp32).describe()
    assert (info["n_layer"], info["n_embd"], info["vocab_size"], info["ffn_dim"]) == (3, 64, 500, 256)
    assert info["parameters"] == sum(v.numel() for v in torch.load(tiny_fp32, weights_only=True).values())
    assert info["wkv"] in ("cpu", "reference")


def test_bf16_file_loads_as_bf16_without_an_fp32_copy(ckpt_dir):
    """Peak RSS while loading a bf16 checkpoint as bf16 stays close to the weights' size, measured
    in a fresh process: the high-water mark (VmHWM) is reset right before load_runtime."""
    from conftest import MID, load_peak_in_fresh_process

    path = write_checkpoint(ckpt_dir / "mid-bf16.pth", MID, seed=3, dtype=torch.bfloat16)
    weights_bytes = sum(t.numel() * 2 for t in torch.load(path, weights_only=True, mmap=True).values())
    peak = load_peak_in_fresh_process(path, dtype="bf16", wkv="reference")
    assert peak["dtype"] == "torch.bfloat16"
    assert peak["grown"] <= 1.15 * weights_bytes, f"peak grew by {peak['grown'] / weights_bytes:.2f}x the weights"


@pytest.mark.parametrize("wkv", ["reference", "cpu"])
def test_training_forward_equals_inference_forward_position_by_position(tiny_fp32, cpu_kernel_module, wkv):
    """One math for both: the training form (autograd, empty state, the kernel's backward) and the
    runtime's inference (chunked, from a State) give the same logits at every position."""
    from rwkv_playground import load_runtime
    from rwkv_playground.models.rwkv4 import RWKV4
    from rwkv_playground.wkv import compiled_wkv, reference_wkv

    weights = torch.load(tiny_fp32, weights_only=True)
    model = RWKV4(TINY)
    model.load_state_dict(weights)
    op = reference_wkv if wkv == "reference" else compiled_wkv(cpu_kernel_module, "cpu")
    tokens = torch.tensor([random_tokens(33, TINY.vocab_size, seed=s) for s in (1, 2)])
    train_logits, no_state = model(tokens, wkv=op)
    assert no_state is None and train_logits.shape == (2, 33, TINY.vocab_size) and train_logits.requires_grad
    train_logits.logsumexp(-1).mean().backward()  # differentiable end to end
    assert model.blocks[0].att.time_decay.grad is not None and model.emb.weight.grad is not None
    runtime = load_runtime(tiny_fp32, wkv=wkv)
    for row in range(2):
        inference, _ = runtime.forward(tokens[row].tolist(), full_output=True, chunk_len=10)
        per_position = ((train_logits[row].detach() - inference).abs().amax(-1) / inference.abs().amax(-1))
        assert per_position.max().item() <= 1e-5


FP16_TOL = 1e-2  # fp16 activations and weights: ~1e-3 relative per matmul, 12 layers


def test_fp16_with_its_rescale_stays_finite_where_plain_fp16_overflows(tmp_path):
    """fp16 (the GPU users' dtype) runs on the CPU too, so its per-layer rescale is tested here:
    layers 6-11 of this checkpoint write FFN outputs past fp16's range (65504). Stored as ChatRWKV
    does (those layers' output projections divided by 2, the residual halved after every 6th
    layer), the logits stay finite and within FP16_TOL of fp32; the same weights in fp16 without
    the rescale overflow to inf / NaN."""
    from rwkv_playground import load_runtime
    from rwkv_playground.runtime import StoredLinear

    config = RWKVConfig(n_layer=12, n_embd=64, vocab_size=500, ffn_dim=256)
    weights = init_random_weights(config, seed=3)
    for i in range(6, 12):
        weights[f"blocks.{i}.ffn.value.weight"] *= 40000.0
    path = tmp_path / "overflows-fp16.pth"
    torch.save(weights, path)
    tokens = random_tokens(60, config.vocab_size, seed=4)
    fp32, _ = load_runtime(path).forward(tokens, full_output=True)
    runtime = load_runtime(path, dtype="fp16")
    assert runtime.model.rescale_every == 6
    fp16, _ = runtime.forward(tokens, full_output=True)
    assert torch.isfinite(fp16).all()
    assert rel(fp16, fp32) <= FP16_TOL and (fp16.argmax(-1) == fp32.argmax(-1)).float().mean() >= 0.95
    plain = load_runtime(path)  # the same weights in fp16, no pre-division, no halving
    for module in plain.model.modules():
        if isinstance(module, StoredLinear):
            module.weight = module.weight.half()
    logits, _ = plain.forward(tokens, full_output=True)
    assert not torch.isfinite(logits).all()


def test_fp16_is_close_to_fp32_on_ordinary_weights(tiny_fp32):
    from rwkv_playground import load_runtime

    tokens = random_tokens(100, TINY.vocab_size, seed=6)
    fp32, state32 = load_runtime(tiny_fp32).forward(tokens, full_output=True)
    fp16, state16 = load_runtime(tiny_fp32, dtype="fp16").forward(tokens, full_output=True)
    assert rel(fp16, fp32) <= FP16_TOL and (fp16.argmax(-1) == fp32.argmax(-1)).float().mean() >= 0.95
    assert rel(state16.value_estimate(), state32.value_estimate()) <= FP16_TOL


def test_load_progress_only_grows_and_stays_short(tmp_path):
    """The start-up progress: about ten 'Converting weights' lines for any checkpoint, and a
    fraction that never goes back (it went 99.1 % -> 95.0 % at 'Preparing the kernels')."""
    from rwkv_playground import load_runtime

    deep = RWKVConfig(n_layer=24, n_embd=32, vocab_size=100, ffn_dim=64)  # many tensors, each small
    path = write_checkpoint(tmp_path / "deep.pth", deep, seed=5)
    seen = []
    load_runtime(path, wkv="reference", step="reference", progress=lambda message, fraction: seen.append((message, fraction)))
    fractions = [f for _, f in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0, seen
    assert 5 <= sum(m.startswith("Converting weights") for m, _ in seen) <= 11, seen
