import numpy as np
import pytest
import torch

from rwkv_playground import GenerationError
from rwkv_playground.sampling import Sampler, SamplingSettings, sample_probs


def reference_support(probs: np.ndarray, top_p: float, top_k: int) -> set:
    """The token set ChatRWKV's PIPELINE.sample_logits keeps (its exact numpy steps)."""
    sorted_ids = np.argsort(probs)
    sorted_probs = probs[sorted_ids][::-1]
    cumulative = np.cumsum(sorted_probs)
    # Deliberate difference: when float32 rounding keeps the cumsum below top_p (top_p=1.0), the
    # reference's argmax over all-False picks index 0 and silently samples greedily. We keep all.
    reach = np.argmax(cumulative >= top_p) if (cumulative >= top_p).any() else len(cumulative) - 1
    cutoff = float(sorted_probs[reach])
    kept = probs.copy()
    kept[kept < cutoff] = 0
    if 0 < top_k < len(kept):
        kept[sorted_ids[:-top_k]] = 0
    return set(np.nonzero(kept)[0].tolist())


@pytest.mark.parametrize("vocab", [10, 1000, 50277])
@pytest.mark.parametrize("top_p,top_k", [(0.5, 0), (0.9, 0), (0.3, 5), (1.0, 0), (0.99, 40)])
def test_support_and_distribution_match_reference(vocab, top_p, top_k):
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(vocab, generator=g) * 3
    probs = torch.softmax(logits, -1)
    support = reference_support(probs.numpy(), top_p, top_k)
    gen = np.random.default_rng(0)
    draws = [sample_probs(probs, 0.8, top_p, top_k, gen) for _ in range(2000)]
    assert set(draws) <= support
    # frequencies follow probs ** (1/T) renormalised over the support
    ids = sorted(support)
    target = probs[ids].double() ** (1 / 0.8)
    target = (target / target.sum()).numpy()
    counts = np.bincount([ids.index(d) for d in draws], minlength=len(ids)) / len(draws)
    assert np.abs(counts - target).max() < 0.05


def test_ties_at_cutoff_are_kept_like_reference():
    probs = torch.full((100,), 0.01)
    support = reference_support(probs.numpy(), 0.3, 0)
    gen = np.random.default_rng(1)
    draws = {sample_probs(probs, 1.0, 0.3, 0, gen) for _ in range(3000)}
    assert len(support) == 100 and len(draws) > 90


def test_greedy_cases():
    probs = torch.softmax(torch.tensor([0.1, 3.0, 0.2, 2.9]), -1)
    for t, p, k in ((0.0, 0.9, 0), (1.0, 0.0, 0), (1.0, 0.9, 1)):
        assert sample_probs(probs, t, p, k, None) == 1


def test_penalties_only_for_generated_tokens_and_decay():
    s = Sampler(SamplingSettings(presence_penalty=0.5, count_penalty=0.25, penalty_decay=0.5), vocab_size=6)
    logits = torch.zeros(6)
    assert np.array_equal(s.adjust_logits(logits), logits.numpy())  # nothing generated yet: prompt never counts
    s.observe(2)
    s.observe(2)
    s.observe(4)
    adjusted = s.adjust_logits(logits)
    # token 2: counts 1 -> 0.5 -> 1.5 -> 0.75 ; token 4: 1
    assert adjusted[2].item() == pytest.approx(-(0.5 + 0.75 * 0.25))
    assert adjusted[4].item() == pytest.approx(-(0.5 + 1.0 * 0.25))
    assert adjusted[0].item() == 0


def test_bans_and_seed_reproducibility():
    settings = SamplingSettings(temperature=1.0, top_p=1.0, banned_tokens=(0, 3), seed=42)
    logits = torch.zeros(5)
    logits[0] = logits[3] = 10
    draws = [Sampler(settings, 5).sample(logits) for _ in range(3)]
    assert len(set(draws)) == 1
    s = Sampler(settings, 5)
    seq = [s.sample(logits) for _ in range(200)]
    assert 0 not in seq and 3 not in seq
    s2 = Sampler(settings, 5)
    assert seq == [s2.sample(logits) for _ in range(200)]


def test_invalid_settings():
    for bad in (dict(temperature=-1), dict(top_p=1.5), dict(top_k=-2), dict(penalty_decay=2)):
        with pytest.raises(GenerationError):
            SamplingSettings(**bad).validate()


def _logit_cases():
    g = torch.Generator().manual_seed(7)
    for vocab in (10, 1000, 50277, 65536):
        yield f"flat-{vocab}", torch.randn(vocab, generator=g) * 3
        yield f"peaked-{vocab}", torch.randn(vocab, generator=g) * 8
    banned = torch.randn(50277, generator=g) * 4
    banned[torch.randint(0, 50277, (3000,), generator=g)] = -float("inf")
    yield "banned-50277", banned
    ties = torch.zeros(1000)
    ties[:7] = 5.0  # seven equal leaders: ties at the top-p and top-k cut-offs
    yield "ties-1000", ties
    yield "huge-range", torch.cat([torch.tensor([80.0, -90.0]), torch.randn(998, generator=g) * 30])


@pytest.mark.parametrize("name,logits", list(_logit_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_kernel_sampler_draws_the_reference_token(cpu_kernel_module, name, logits):
    """kernels/sampling_cpu.cpp on every instruction set against the numpy reference: same token
    for the same draw."""
    from rwkv_playground.sampling import sample_logits

    class OneIsa:  # the kernel module with its instruction set pinned
        def __init__(self, isa):
            self.isa = isa

        def sample_top_p(self, *args):
            return cpu_kernel_module.sample_top_p(*args, isa=self.isa)

    values = logits.numpy().astype(np.float32)
    mismatches, total = 0, 0
    for temperature, top_p, top_k in ((1.0, 0.1, 0), (1.0, 0.5, 0), (1.0, 0.9, 0), (1.0, 0.99, 0), (1.0, 1.0, 0),
                                      (0.7, 0.7, 0), (1.5, 0.95, 0), (1.0, 0.9, 5), (1.0, 1.0, 3), (0.8, 0.6, 40)):
        for seed in range(12):
            ref = sample_logits(values, temperature, top_p, top_k, np.random.default_rng(seed))
            for isa in cpu_kernel_module.available_isas():  # scalar, avx2, avx512: each its own passes
                fast = sample_logits(values, temperature, top_p, top_k, np.random.default_rng(seed),
                                     kernel=OneIsa(isa))
                total += 1
                mismatches += ref != fast
    # The two differ only in the last bits of exp() and of summation order: a differing token
    # needs a draw within ~1e-7 of a boundary. Any systematic difference shows up as many.
    assert mismatches == 0, f"{mismatches} of {total} draws differ"


def test_the_sampler_backend_is_the_runtimes_choice_and_gives_the_same_tokens(cpu_kernel_module, tiny_fp32):
    from rwkv_playground import load_runtime

    assert load_runtime(tiny_fp32, sampler="cpu").sampler_kernel is cpu_kernel_module
    assert load_runtime(tiny_fp32, sampler="reference").sampler_kernel is None
    s = Sampler(SamplingSettings(top_p=0.8, seed=3), 50277, kernel=cpu_kernel_module)
    s_ref = Sampler(SamplingSettings(top_p=0.8, seed=3), 50277)
    logits = torch.randn(50277, generator=torch.Generator().manual_seed(0)) * 5
    a, b = [], []
    for _ in range(50):  # same seed, penalties evolving: the same sequence from both paths
        a.append(s.sample(logits))
        s.observe(a[-1])
        b.append(s_ref.sample(logits))
        s_ref.observe(b[-1])
    assert a == b


def test_kernel_returns_minus_one_without_a_finite_logit(cpu_kernel_module):
    nothing = torch.full((100,), -float("inf"))
    assert cpu_kernel_module.sample_top_p(nothing, 1.0, 0.9, 0, 0.5) == -1
    nan = torch.full((100,), float("nan"))
    assert cpu_kernel_module.sample_top_p(nan, 1.0, 0.9, 0, 0.5) == -1
