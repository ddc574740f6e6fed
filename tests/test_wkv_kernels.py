"""Compiled WKV kernels (C++ CPU, CUDA) against the pure-PyTorch reference.

Grid: B in {1, 3}, T in {1, 2, 17, 256, 1024}, C in {1, 37, 768}, input dtypes fp32 / bf16 / fp16,
extreme values (w from -3000 to positive, k up to +-60), state carried across chunks, and the
training backward against autograd of the reference (float64 gradcheck on small sizes).
"""

import itertools

import pytest
import torch

from rwkv_playground.wkv import empty_wkv_state, make_compiled_wkv, wkv_reference, wkv_train_reference

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Output tolerance relative to max |y|: inputs are identical, so only the rounding of y to the
# input dtype (and fp32 summation order / exp accuracy) differs.
OUT_TOL = {"fp32": 2e-5, "bf16": 1e-2, "fp16": 2e-3}


@pytest.fixture(scope="module")
def cpu_kernel(cpu_kernel_module):
    return make_compiled_wkv(cpu_kernel_module)


def cuda_kernel():
    """The real CUDA module (tests marked gpu: `python -m pytest -m gpu` on a machine with an
    NVIDIA GPU; the default run deselects them, and the CPU emulation in test_cuda_emulated.py
    covers the same kernels without a GPU)."""
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need an NVIDIA GPU visible to PyTorch")
    from rwkv_playground.kernels import load_kernel

    return make_compiled_wkv(load_kernel("cuda"))


def make_inputs(B, T, C, dtype, device="cpu", seed=0, extreme=False):
    g = torch.Generator().manual_seed(seed)
    time_decay = torch.randn(C, generator=g) * 2
    if extreme:
        # w spans -3000 (forget at once) .. -1e-8 (never forget) .. +0.3 (growing memory)
        choices = torch.tensor([8.0, -18.0, 0.0, 2.0, -3.0])
        time_decay = choices[torch.arange(C) % len(choices)]
    w = -torch.exp(time_decay)
    if extreme:
        w[torch.arange(C) % 7 == 6] = 0.3
    u = torch.randn(C, generator=g)
    k = torch.randn(B, T, C, generator=g) * (20 if extreme else 2)
    if extreme:
        k = k.clamp(-60, 60)
        k[..., ::5] = 60.0
        k[..., 1::5] = -60.0
    v = torch.randn(B, T, C, generator=g)
    aa, bb, pp = empty_wkv_state(B, C)
    if T > 1:  # start from a non-empty state half of the time
        aa, bb, pp = wkv_reference(w, u, k[:, : T // 2].float(), v[:, : T // 2].float(), aa, bb, pp)[1:]
    to = lambda t: t.to(device)  # noqa: E731
    return to(w), to(u), to(k.to(dtype)), to(v.to(dtype)), to(aa), to(bb), to(pp)


def check_forward(kernel_forward, inputs, dtype_name):
    w, u, k, v, aa, bb, pp = inputs
    y_ref, aa_r, bb_r, pp_r = wkv_reference(*(t.cpu() for t in inputs))
    y, aa_k, bb_k, pp_k = kernel_forward(*inputs)
    assert y.dtype == v.dtype and y.shape == v.shape
    y, aa_k, bb_k, pp_k = (t.cpu() for t in (y, aa_k, bb_k, pp_k))
    scale = y_ref.float().abs().max().clamp_min(1e-6)
    assert ((y.float() - y_ref.float()).abs().max() / scale).item() <= OUT_TOL[dtype_name]
    # the state is float32 whatever the input dtype; compare it in its invariant form
    assert torch.allclose(aa_k / bb_k, aa_r / bb_r, rtol=1e-4, atol=1e-5)
    assert torch.allclose(pp_k + torch.log(bb_k), pp_r + torch.log(bb_r), rtol=1e-5, atol=1e-4)
    # inputs were not modified
    assert torch.equal(aa.cpu(), inputs[4].cpu())


GRID = list(itertools.product([1, 3], [1, 2, 17, 256, 1024], [1, 37, 768], list(DTYPES)))
# The largest shape (3 x 1024 x 768) runs in fp32 only: the reference loop is slow on CI's 2 cores.
CPU_GRID = [g for g in GRID if not (g[:3] == (3, 1024, 768) and g[3] != "fp32")]


@pytest.mark.parametrize("B,T,C,dtype_name", CPU_GRID)
def test_cpu_forward_grid(cpu_kernel, B, T, C, dtype_name):
    check_forward(cpu_kernel[0], make_inputs(B, T, C, DTYPES[dtype_name]), dtype_name)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_cpu_forward_extreme_values(cpu_kernel, dtype_name):
    inputs = make_inputs(2, 300, 70, DTYPES[dtype_name], extreme=True)
    y, aa, bb, pp = cpu_kernel[0](*inputs)
    assert torch.isfinite(y.float()).all() and torch.isfinite(aa).all() and torch.isfinite(bb).all()
    check_forward(cpu_kernel[0], inputs, dtype_name)


def test_cpu_state_carried_across_chunks_equals_one_pass(cpu_kernel):
    w, u, k, v, aa, bb, pp = make_inputs(3, 777, 129, torch.float32, seed=3)
    y_full, *state_full = cpu_kernel[0](w, u, k, v, aa, bb, pp)
    state, ys = (aa, bb, pp), []
    for start in range(0, 777, 100):
        y, *state = cpu_kernel[0](w, u, k[:, start:start + 100], v[:, start:start + 100], *state)
        ys.append(y)
    assert torch.allclose(torch.cat(ys, 1), y_full, atol=1e-6)
    for a, b in zip(state, state_full):
        assert torch.allclose(a, b, atol=1e-6)


def test_cpu_backward_gradcheck_float64(cpu_kernel):
    train = cpu_kernel[1]
    g = torch.Generator().manual_seed(5)
    B, T, C = 2, 11, 5
    time_decay = (torch.randn(C, generator=g, dtype=torch.float64) * 1.5).requires_grad_()
    u = torch.randn(C, generator=g, dtype=torch.float64).requires_grad_()
    k = (torch.randn(B, T, C, generator=g, dtype=torch.float64) * 3).requires_grad_()
    v = torch.randn(B, T, C, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda td, u, k, v: train(-torch.exp(td), u, k, v), (time_decay, u, k, v))
    assert torch.autograd.gradcheck(lambda td, u, k, v: wkv_train_reference(-torch.exp(td), u, k, v),
                                    (time_decay, u, k, v))


@pytest.mark.parametrize("B,T,C,extreme", [(1, 1, 1, False), (3, 64, 37, False), (2, 300, 96, True)])
def test_cpu_backward_matches_reference_autograd(cpu_kernel, B, T, C, extreme):
    w, u, k, v, *_ = make_inputs(B, T, C, torch.float64, extreme=extreme, seed=B + T)
    grad_y = torch.randn(B, T, C, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref_in = [t.clone().requires_grad_() for t in (w, u, k, v)]
    ker_in = [t.float().clone().requires_grad_() for t in (w, u, k, v)]
    y_ref = wkv_train_reference(*ref_in)
    y_ker = cpu_kernel[1](*ker_in)
    # float32 itself is ~1e-5 off float64 when exponents reach ~90 (w > 0 over 300 steps)
    assert torch.allclose(y_ker.double(), y_ref, rtol=1e-4, atol=1e-4 if extreme else 1e-5)
    y_ref32 = wkv_train_reference(*(t.detach().float() for t in ref_in))
    assert torch.allclose(y_ker.detach(), y_ref32, rtol=1e-5, atol=1e-6)
    ref_grads = torch.autograd.grad((y_ref * grad_y).sum(), ref_in, allow_unused=True)  # w unused at T=1
    ref_grads = [torch.zeros_like(x) if g is None else g for g, x in zip(ref_grads, ref_in)]
    ker_grads = torch.autograd.grad((y_ker * grad_y.float()).sum(), ker_in)
    for name, a, b in zip("wukv", ker_grads, ref_grads):
        scale = b.abs().max().clamp_min(1e-6)
        assert ((a.double() - b).abs().max() / scale).item() < 1e-3, name


def test_fallback_and_forced_choice(monkeypatch, tiny_fp32):
    from rwkv_playground import LoadError, backends, kernels, load_runtime

    assert load_runtime(tiny_fp32, wkv="reference").describe()["wkv"] == "reference"
    monkeypatch.setenv(backends.ENV["wkv"], "reference")
    assert load_runtime(tiny_fp32).describe()["wkv"] == "reference"
    monkeypatch.delenv(backends.ENV["wkv"])
    # kernels that cannot be built: 'auto' falls back with one clear note per path, a forced choice errors
    monkeypatch.setitem(kernels._failed, "cpu", "no C++ compiler was found (install g++ or clang)")
    monkeypatch.delitem(kernels._loaded, "cpu", raising=False)
    monkeypatch.setattr(backends, "_warned", set())
    with pytest.warns(RuntimeWarning, match="no C.. compiler"):
        runtime = load_runtime(tiny_fp32)
    info = runtime.describe()
    assert (info["wkv"], info["step"], info["sampler"]) == ("reference", "reference", "reference")
    assert any("no C++ compiler" in note for note in info["notes"])
    for choice in ({"wkv": "cpu"}, {"step": "cpu"}, {"sampler": "cpu"}):
        with pytest.raises(LoadError, match="unavailable"):
            load_runtime(tiny_fp32, **choice)
    with pytest.raises(LoadError, match="cannot run a model on cpu"):
        load_runtime(tiny_fp32, wkv="cuda")


def test_each_backend_is_chosen_on_its_own(tiny_fp32):
    from rwkv_playground import load_runtime

    info = load_runtime(tiny_fp32, wkv="reference", step="cpu", sampler="reference").describe()
    assert info["wkv"] == "reference" and info["step"].startswith("cpu") and info["sampler"] == "reference"
    runtime = load_runtime(tiny_fp32, wkv="cpu", step="reference", sampler="cpu")
    info = runtime.describe()
    assert info["wkv"] == "cpu" and info["step"] == "reference" and info["sampler"] == "cpu"
    assert runtime.sampler_kernel is not None and runtime._step_weights is None


def test_second_start_loads_from_cache_without_compiling(tmp_path):
    """A fresh process finds the cached library and never calls the compiler."""
    import subprocess
    import sys

    from rwkv_playground import kernels

    kernels.load_kernel("cpu")
    code = (
        "import torch.utils.cpp_extension as ext\n"
        "ext.load = lambda *a, **k: (_ for _ in ()).throw(SystemExit('compiler was invoked'))\n"
        "from rwkv_playground import kernels\n"
        "msgs = []\n"
        "kernels.load_kernel('cpu', progress=msgs.append)\n"
        "print(msgs[-1])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=str(kernels.KERNEL_DIR.parent))
    assert out.returncode == 0, out.stderr
    assert "loaded from cache" in out.stdout


# ---- CUDA on a real GPU (marked gpu: deselected unless asked for with -m gpu) -------------------

@pytest.mark.gpu
@pytest.mark.parametrize("B,T,C,dtype_name", [g for g in GRID if g[2] != 1 or g[1] < 1024])
def test_cuda_forward_grid(B, T, C, dtype_name):
    forward, _ = cuda_kernel()
    check_forward(forward, make_inputs(B, T, C, DTYPES[dtype_name], device="cuda"), dtype_name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_cuda_forward_extreme_values(dtype_name):
    forward, _ = cuda_kernel()
    check_forward(forward, make_inputs(2, 300, 70, DTYPES[dtype_name], device="cuda", extreme=True), dtype_name)


@pytest.mark.gpu
def test_cuda_state_carried_across_chunks():
    forward, _ = cuda_kernel()
    w, u, k, v, aa, bb, pp = make_inputs(3, 2100, 129, torch.float32, device="cuda", seed=3)
    y_full, *state_full = forward(w, u, k, v, aa, bb, pp)
    state, ys = (aa, bb, pp), []
    for start in range(0, 2100, 512):
        y, *state = forward(w, u, k[:, start:start + 512], v[:, start:start + 512], *state)
        ys.append(y)
    assert torch.allclose(torch.cat(ys, 1), y_full, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("B,T,C,extreme", [(1, 1, 1, False), (3, 64, 37, False), (2, 1100, 96, True)])
def test_cuda_backward_matches_reference(B, T, C, extreme):
    _, train = cuda_kernel()
    w, u, k, v, *_ = make_inputs(B, T, C, torch.float64, extreme=extreme, seed=B + T)
    grad_y = torch.randn(B, T, C, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref_in = [t.clone().requires_grad_() for t in (w, u, k, v)]
    ker_in = [t.float().cuda().requires_grad_() for t in (w, u, k, v)]
    y_ref = wkv_train_reference(*ref_in)
    y_ker = train(*ker_in)
    ref_grads = torch.autograd.grad((y_ref * grad_y).sum(), ref_in, allow_unused=True)  # w unused at T=1
    ref_grads = [torch.zeros_like(x) if g is None else g for g, x in zip(ref_grads, ref_in)]
    ker_grads = torch.autograd.grad((y_ker * grad_y.float().cuda()).sum(), ker_in)
    assert torch.allclose(y_ker.double().cpu(), y_ref, rtol=1e-4, atol=1e-4 if extreme else 1e-5)
    for name, a, b in zip("wukv", ker_grads, ref_grads):
        scale = b.abs().max().clamp_min(1e-6)
        assert ((a.double().cpu() - b).abs().max() / scale).item() < 1e-3, name


@pytest.mark.gpu
def test_cuda_model_matches_cpu_model(tiny_fp32):
    cuda_kernel()
    from rwkv_playground import load_runtime

    tokens = list(range(1, 300))
    cpu, _ = load_runtime(tiny_fp32).forward(tokens, full_output=True)
    for dtype, tol in (("fp32", 1e-5), ("fp16", 3e-2), ("bf16", 3e-2)):
        gpu, _ = load_runtime(tiny_fp32, device="cuda", dtype=dtype).forward(tokens, full_output=True)
        assert ((gpu.cpu() - cpu).abs().max() / cpu.abs().max()).item() <= tol, dtype
