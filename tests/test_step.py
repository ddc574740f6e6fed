"""The fused one-token step (kernels/step_rwkv4.cpp, matvecs in matvec_cpu.cpp) and its matvecs, held to the model's math.

The model's PyTorch forward (model.py) is the reference: the C++ step must give the same logits
and states (1e-5) on every instruction set this CPU can run (the AVX2 path is exercised on
AVX-512 machines too), fp32 and bf16, shapes that hit every SIMD tail, and extreme decays. A
batched step must give each row exactly the bits of the one-sequence step. The weights cross into
C++ by name: a swap of two same-shaped matrices is caught here.
"""

import pytest
import torch

from rwkv_playground.models.rwkv4 import LN_EPS, RWKVConfig, init_random_weights

SHAPES = {
    "tiny": RWKVConfig(n_layer=3, n_embd=64, vocab_size=500, ffn_dim=256),
    # C and F not multiples of any kernel step (8/16/32), N not a multiple of 4: every tail
    "odd": RWKVConfig(n_layer=2, n_embd=37, vocab_size=333, ffn_dim=100),
    "half-step": RWKVConfig(n_layer=2, n_embd=48, vocab_size=1001, ffn_dim=144),
}


def isas():
    from rwkv_playground.kernels import load_kernel

    return load_kernel("cpu").available_isas()


def checkpoint(tmp_path, shape, seed=3):
    config = SHAPES[shape]
    weights = init_random_weights(config, seed=seed)
    # channels with extreme decay / bonus: the step must keep the running-max trick
    weights["blocks.0.att.time_decay"][:3] = torch.tensor([-30.0, 8.0, 0.0])
    weights["blocks.1.att.time_first"][:2] = torch.tensor([25.0, -25.0])
    path = tmp_path / f"{shape}.pth"
    torch.save(weights, path)
    return config, path


def step_weights(runtime, isa, named=None):
    named = named or {name: t for name, t in runtime.model.state_dict().items()}
    return runtime.backends.cpu_kernels.StepWeights(named, runtime.config.n_layer, LN_EPS, isa)


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


def assert_states_close(got, expected, tol=1e-5):
    for name, tensor in expected.tensors().items():
        scale = tensor.abs().max().clamp_min(1e-6)
        if name == "pp":  # exponents: compare on their own scale
            scale = scale.clamp_max(1e3).clamp_min(1.0)
        assert ((got.tensors()[name] - tensor).abs().max() / scale).item() <= tol, name


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_fused_step_matches_the_model_on_every_instruction_set(tmp_path, shape, dtype):
    from rwkv_playground import load_runtime

    config, path = checkpoint(tmp_path, shape)
    fused = load_runtime(path, dtype=dtype, step="cpu")
    plain = load_runtime(path, dtype=dtype, step="reference")  # the model's PyTorch forward
    prompt = torch.randint(0, config.vocab_size, (9,), generator=torch.Generator().manual_seed(1)).tolist()
    tokens = torch.randint(0, config.vocab_size, (12,), generator=torch.Generator().manual_seed(2)).tolist()
    for isa in isas():
        fused._step_weights = step_weights(fused, isa)
        assert fused.describe()["step"] == f"cpu ({isa})"
        _, state_f = fused.forward(prompt)
        _, state_p = plain.forward(prompt)
        for token in tokens:
            logits_f = fused.step([token], [state_f])[0]
            logits_p = plain.step([token], [state_p])[0]
            assert logits_f.shape == (config.vocab_size,)
            assert rel(logits_f, logits_p) <= 1e-5, isa
            assert_states_close(state_f, state_p)
        assert state_f.token_count == state_p.token_count == 21


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_batched_rows_equal_the_one_sequence_step_bit_for_bit(tmp_path, dtype):
    """Rows of different histories, joining and leaving: each row's logits and state are exactly
    those of the one-sequence step (the scheduler's promise that nobody's text depends on others)."""
    from rwkv_playground import load_runtime

    config, path = checkpoint(tmp_path, "odd")
    runtime = load_runtime(path, dtype=dtype, step="cpu")
    g = torch.Generator().manual_seed(5)
    for isa in isas():
        runtime._step_weights = step_weights(runtime, isa)
        prompts = [torch.randint(0, config.vocab_size, (n,), generator=g).tolist() for n in (1, 4, 7, 2, 9, 3)]
        alone = [runtime.forward(p)[1] for p in prompts]
        together = [s.clone() for s in alone]
        for tick in range(8):
            active = [b for b in range(len(prompts)) if b <= tick + 1 and (b + tick) % 5 != 4]  # join / leave
            tokens = [int(torch.randint(0, config.vocab_size, (1,), generator=g)) for _ in active]
            batch = runtime.step(tokens, [together[b] for b in active])
            for row, b in enumerate(active):
                single = runtime.step([tokens[row]], [alone[b]])[0]
                assert torch.equal(batch[row], single), (isa, tick, b)
                for name, tensor in alone[b].tensors().items():
                    assert torch.equal(together[b].tensors()[name], tensor), (isa, name)


def test_weights_cross_by_name_and_a_swap_is_caught(tiny_fp32):
    """The extension reads each weight by its checkpoint name (no positional list): a swap of the
    two same-shaped attention matrices key and value changes the step, and the comparison with
    the model (the test above) catches it."""
    from rwkv_playground import load_runtime

    runtime = load_runtime(tiny_fp32, step="cpu")
    named = dict(runtime.model.state_dict())
    slots = runtime.backends.cpu_kernels.StepWeights.slot_names(runtime.config.n_layer)
    assert set(slots) <= set(named) and "blocks.2.att.value.weight" in slots and len(slots) == 6 + 18 * 3
    swapped = dict(named)
    swapped["blocks.1.att.key.weight"], swapped["blocks.1.att.value.weight"] = (
        named["blocks.1.att.value.weight"], named["blocks.1.att.key.weight"])
    reference = load_runtime(tiny_fp32, step="reference")
    _, state = reference.forward([1, 2, 3])
    expected = reference.step([4], [state.clone()])[0]
    runtime._step_weights = step_weights(runtime, "auto", named)
    assert rel(runtime.step([4], [state.clone()])[0], expected) <= 1e-5
    runtime._step_weights = step_weights(runtime, "auto", swapped)
    assert rel(runtime.step([4], [state.clone()])[0], expected) > 1e-3  # caught
    del named["blocks.2.ffn.value.weight"]
    with pytest.raises(RuntimeError, match="missing 'blocks.2.ffn.value.weight'"):
        step_weights(runtime, "auto", named)
    bad_shape = dict(runtime.model.state_dict())
    bad_shape["blocks.0.ffn.value.weight"] = bad_shape["blocks.0.ffn.key.weight"]
    with pytest.raises(RuntimeError, match="has shape"):
        step_weights(runtime, "auto", bad_shape)


def test_layer_norm_eps_comes_from_the_model(tiny_fp32):
    """The C++ step takes LayerNorm's eps from model.LN_EPS: another eps gives other logits."""
    from rwkv_playground import load_runtime

    runtime = load_runtime(tiny_fp32, step="cpu")
    named = dict(runtime.model.state_dict())
    _, state = runtime.forward([1, 2, 3])
    ours = runtime.step([4], [state.clone()])[0]
    runtime._step_weights = runtime.backends.cpu_kernels.StepWeights(named, runtime.config.n_layer, 1e-1, "auto")
    assert rel(runtime.step([4], [state.clone()])[0], ours) > 1e-4


def test_step_leaves_the_input_state_alone_through_forward(tiny_fp32):
    from rwkv_playground import load_runtime

    runtime = load_runtime(tiny_fp32, step="cpu")
    _, state = runtime.forward([1, 2, 3])
    before = state.clone()
    logits, after = runtime.forward([4], state, full_output=True)
    assert logits.shape == (1, runtime.config.vocab_size)
    for name, tensor in before.tensors().items():
        assert torch.equal(state.tensors()[name], tensor), name  # not inplace: input untouched
    assert not torch.equal(after.aa, before.aa) and after.token_count == 4
    batch_logits, batch_after = runtime.forward(torch.tensor([[4], [5]]), type(state).stack([before, before]))
    assert batch_logits.shape == (2, runtime.config.vocab_size) and batch_after.token_count == [4, 4]
    assert torch.equal(batch_logits[0], logits[0])


# K: every loader's step (8/16/32/64) and its tails; N: blocks of 2 and 4 rows and their tails
@pytest.mark.parametrize("N,K", [(1, 1), (3, 5), (5, 37), (9, 48), (6, 63), (5, 65), (11, 127), (13, 1000), (7, 768),
                                 (768, 768), (3072, 768), (768, 3072), (50277, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("B", [1, 3, 6])
def test_matvec_matches_float64_on_every_instruction_set(cpu_kernel_module, N, K, dtype, B):
    """int8 weights against the float64 product with the matrix they stand for (q * scale)."""
    from rwkv_playground.quantization import dequantize_rows, quantize_rows

    g = torch.Generator().manual_seed(N + K)
    W = torch.randn(N, K, generator=g)
    scale = None
    if dtype == torch.int8:
        W, scale = quantize_rows(W)
        expected_W = dequantize_rows(W, scale, torch.float64)
    else:
        W = W.to(dtype)
        expected_W = W.double()
    x = torch.randn(B, K, generator=g)
    expected = x.double() @ expected_W.T
    for isa in cpu_kernel_module.available_isas():
        got = cpu_kernel_module.matvec(W, x, scale, isa)
        assert got.dtype == torch.float32 and got.shape == (B, N)
        assert ((got.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-9)).item() < 1e-5, isa
        if B > 1:  # each row as the one-input product, bit for bit
            assert torch.equal(got[B - 1], cpu_kernel_module.matvec(W, x[B - 1], scale, isa)), isa
