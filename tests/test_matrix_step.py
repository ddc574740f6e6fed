"""The fused one-token step for RWKV-5/6/7 (kernels/step_rwkv5.cpp ... step_rwkv7.cpp) held to the
models' PyTorch forward (models/rwkv5.py, rwkv6.py, rwkv7.py): logits and states within 1e-5 on
every instruction set this CPU can run, fp32 / bf16 / int8, shapes that hit every SIMD tail, more
than one head, extreme decays; a batched step gives each row exactly the bits of the one-sequence
step; the weights cross by name (a swap is caught)."""

import pytest
import torch

from rwkv_playground.models import by_name
from rwkv_playground.models.rwkv5 import RWKV5Config
from rwkv_playground.models.rwkv6 import RWKV6Config
from rwkv_playground.models.rwkv7 import RWKV7Config

CASES = {
    "v5.0": ("rwkv5", RWKV5Config(2, 64, 301, 224, 2, 32, subversion="5.0", bonus_key="time_first")),
    "v5.1": ("rwkv5", RWKV5Config(2, 64, 301, 224, 4, 16, subversion="5.1", bonus_key="time_first")),
    "v5.2": ("rwkv5", RWKV5Config(3, 96, 333, 336, 3, 32)),
    "v6": ("rwkv6", RWKV6Config(2, 96, 333, 336, 3, 32, mix_lora=8, decay_lora=16)),
    "v7": ("rwkv7", RWKV7Config(3, 96, 333, 384, 3, 32, decay_lora=16, iclr_lora=16, value_lora=8, gate_lora=24)),
    # N = 20 and widths that are not multiples of any kernel step: every SIMD tail
    "v7-odd": ("rwkv7", RWKV7Config(2, 60, 257, 200, 3, 20, decay_lora=12, iclr_lora=10, value_lora=6,
                                    gate_lora=14)),
    "v6-odd": ("rwkv6", RWKV6Config(2, 60, 257, 200, 3, 20, mix_lora=6, decay_lora=10)),
}


def isas():
    from rwkv_playground.kernels import load_kernel

    return load_kernel("cpu").available_isas()


def checkpoint(tmp_path, case, seed=3):
    arch_name, config = CASES[case]
    weights = by_name(arch_name).random_weights(config, seed=seed)
    # extreme decays: forget at once / remember (almost) everything
    decay_key = {"rwkv5": "att.time_decay", "rwkv6": "att.time_decay", "rwkv7": "att.w0"}[arch_name]
    flat = weights[f"blocks.0.{decay_key}"].view(-1)
    flat[:2] = torch.tensor([-20.0, 6.0] if arch_name != "rwkv7" else [-30.0, 30.0])
    path = tmp_path / f"{case}.pth"
    torch.save(weights, path)
    return config, path


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


def assert_states_close(got, expected, tol=1e-5):
    for name, tensor in expected.tensors().items():
        assert rel(got.tensors()[name], tensor) <= tol, name


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_fused_step_matches_the_model_on_every_instruction_set(tmp_path, case, dtype):
    from rwkv_playground import load_runtime

    config, path = checkpoint(tmp_path, case)
    fused = load_runtime(path, dtype=dtype, step="cpu")
    plain = load_runtime(path, dtype=dtype, step="reference")  # the model's PyTorch forward
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, config.vocab_size, (9,), generator=g).tolist()
    tokens = torch.randint(0, config.vocab_size, (10,), generator=g).tolist()
    for isa in isas():
        fused._step_weights = fused.model.fused_step(fused.backends.cpu_kernels, isa)
        assert fused.describe()["step"] == f"cpu ({isa})"
        _, state_f = fused.forward(prompt)
        _, state_p = plain.forward(prompt)
        for token in tokens:
            logits_f = fused.step([token], [state_f])[0]
            logits_p = plain.step([token], [state_p])[0]
            assert logits_f.shape == (config.vocab_size,)
            assert rel(logits_f, logits_p) <= 1e-5, isa
            assert_states_close(state_f, state_p)
        assert state_f.token_count == state_p.token_count == 19


@pytest.mark.parametrize("case", ["v5.2", "v6", "v7"])
def test_batched_rows_equal_the_one_sequence_step_bit_for_bit(tmp_path, case):
    from rwkv_playground import load_runtime

    config, path = checkpoint(tmp_path, case)
    runtime = load_runtime(path, dtype="bf16", step="cpu")
    g = torch.Generator().manual_seed(5)
    for isa in isas():
        runtime._step_weights = runtime.model.fused_step(runtime.backends.cpu_kernels, isa)
        prompts = [torch.randint(0, config.vocab_size, (n,), generator=g).tolist() for n in (1, 4, 7, 2, 9)]
        alone = [runtime.forward(p)[1] for p in prompts]
        together = [s.clone() for s in alone]
        for tick in range(6):
            active = [b for b in range(len(prompts)) if b <= tick + 1 and (b + tick) % 4 != 3]  # join / leave
            tokens = [int(torch.randint(0, config.vocab_size, (1,), generator=g)) for _ in active]
            batch = runtime.step(tokens, [together[b] for b in active])
            for row, b in enumerate(active):
                single = runtime.step([tokens[row]], [alone[b]])[0]
                assert torch.equal(batch[row], single), (isa, tick, b)
                for name, tensor in alone[b].tensors().items():
                    assert torch.equal(together[b].tensors()[name], tensor), (isa, name)


def test_weights_cross_by_name_and_a_swap_is_caught(tmp_path):
    from rwkv_playground import load_runtime

    config, path = checkpoint(tmp_path, "v7")
    runtime = load_runtime(path, step="cpu")
    reference = load_runtime(path, step="reference")
    _, state = reference.forward([1, 2, 3])
    expected = reference.step([4], [state.clone()])[0]
    kernels = runtime.backends.cpu_kernels
    named = runtime.model.step_weights()

    def step_with(weights):
        runtime._step_weights = kernels.RWKV7Step(weights, config.n_layer, config.n_head, config.head_size, 1e-5,
                                                  64e-5)
        return runtime.step([4], [state.clone()])[0]

    assert rel(step_with(named), expected) <= 1e-5
    swapped = dict(named)
    swapped["blocks.1.att.a1"], swapped["blocks.1.att.w1"] = named["blocks.1.att.w1"], named["blocks.1.att.a1"]
    assert rel(step_with(swapped), expected) > 1e-4  # caught
    missing = dict(named)
    del missing["blocks.2.att.k_a"]
    with pytest.raises(RuntimeError, match="missing 'blocks.2.att.k_a'"):
        step_with(missing)
    with pytest.raises(RuntimeError, match="RWKV6Step: missing 'blocks.0.att.time_maa_x'"):  # another version's
        kernels.RWKV6Step(named, config.n_layer, config.n_head, config.head_size, 1e-5, 64e-5)
