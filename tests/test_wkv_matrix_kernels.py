"""The RWKV-5/6/7 matrix-state recurrences: the C++ kernels (kernels/wkv_matrix_cpu.cpp) against the
PyTorch references (wkv.py), and the references against a float64 loop written here.

Grid: B in {1, 3}; T in {1, 2, 17, 256}; (H, N) in {(1, 64), (2, 64), (3, 32), (4, 16)}; decays
from almost 0 (forget at once) to almost 1 (remember everything), the state carried across chunks
(one pass == the same tokens in pieces), a batch row equal to the row alone bit for bit.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F

from rwkv_playground.wkv import compiled_matrix_wkv, reference_matrix_wkv, wkv5_reference, wkv7_reference

SHAPES = [(1, 64), (2, 64), (3, 32), (4, 16), (2, 6)]  # (2, 6): a head size that is not a multiple of 4
TOL = 2e-5  # max |diff| / max |reference|: only the order of fp32 sums differs


@pytest.fixture(scope="module")
def kernel(cpu_kernel_module):
    return compiled_matrix_wkv(cpu_kernel_module, "cpu")


def inputs(kind, B, T, H, N, seed=0, decay="mixed"):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=g)

    r, k, v = randn(B, T, H, N), randn(B, T, H, N), randn(B, T, H, N)
    if decay == "fast":
        w = torch.full((B, T, H, N), 1e-6)
    elif decay == "slow":
        w = 1 - 1e-6 * torch.rand((B, T, H, N), generator=g)
    else:
        w = torch.exp(-torch.exp(randn(B, T, H, N) * 2 - 2))
    state = randn(B, H, N, N)
    if kind == "wkv5":
        return r, k, v, w, randn(H, N), state
    if kind == "wkv7":
        w = torch.exp(-0.606531 * torch.sigmoid(randn(B, T, H, N) * 3)) if decay == "mixed" else w
        kk = F.normalize(randn(B, T, H, N), dim=-1)
        a = torch.sigmoid(randn(B, T, H, N))
        return r, w, k, v, kk, a, state
    raise ValueError(kind)


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


GRID = list(itertools.product(["wkv5", "wkv7"], [1, 3], [1, 2, 17, 256], SHAPES))


@pytest.mark.parametrize("kind,B,T,shape", GRID)
def test_kernel_matches_reference(kernel, kind, B, T, shape):
    H, N = shape
    args = inputs(kind, B, T, H, N, seed=B * 1000 + T)
    y_ref, S_ref = getattr(reference_matrix_wkv, kind)(*args)
    before = [a.clone() for a in args]
    y, S = getattr(kernel, kind)(*args)
    assert y.shape == (B, T, H, N) and S.shape == (B, H, N, N) and y.dtype == S.dtype == torch.float32
    assert rel(y, y_ref) <= TOL and rel(S, S_ref) <= TOL
    assert all(torch.equal(a, b) for a, b in zip(args, before))  # inputs (the state too) untouched


@pytest.mark.parametrize("kind,decay", list(itertools.product(["wkv5", "wkv7"], ["fast", "slow"])))
def test_extreme_decays(kernel, kind, decay):
    args = inputs(kind, 2, 300, 2, 64, seed=7, decay=decay)
    y_ref, S_ref = getattr(reference_matrix_wkv, kind)(*args)
    y, S = getattr(kernel, kind)(*args)
    assert torch.isfinite(y).all() and torch.isfinite(S).all()
    assert rel(y, y_ref) <= TOL and rel(S, S_ref) <= TOL


@pytest.mark.parametrize("kind", ["wkv5", "wkv7"])
def test_state_carried_across_chunks_and_rows_independent(kernel, kind):
    B, T, H, N = 3, 40, 2, 32
    args = inputs(kind, B, T, H, N, seed=3)
    op = getattr(kernel, kind)
    y_all, S_all = op(*args)
    # in pieces: 1 + 16 + 23 tokens, each starting from the state the previous one left
    S, pieces = args[-1], []
    for lo, hi in ((0, 1), (1, 17), (17, 40)):
        y, S = op(*[a[:, lo:hi].contiguous() if a.dim() == 4 else a for a in args[:-1]], S)
        pieces.append(y)
    assert torch.equal(torch.cat(pieces, dim=1), y_all) and torch.equal(S, S_all)
    # row 1 of the batch equals row 1 run alone, bit for bit
    alone = op(*[a[1:2].contiguous() if a.dim() == 4 else a for a in args[:-1]], args[-1][1:2].contiguous())
    assert torch.equal(alone[0], y_all[1:2]) and torch.equal(alone[1], S_all[1:2])


def test_references_match_a_float64_loop():
    """The references against the equations written out per head, channel by channel, in float64."""
    B, T, H, N = 1, 5, 2, 4
    r, k, v, w, u, S0 = (t.double() for t in inputs("wkv5", B, T, H, N, seed=11))
    y, S = wkv5_reference(r, k, v, w, u, S0)
    S_loop = S0.clone()
    for t in range(T):
        for h in range(H):
            out = torch.zeros(N, dtype=torch.float64)
            for j in range(N):
                for i in range(N):
                    kv = k[0, t, h, j] * v[0, t, h, i]
                    out[i] += r[0, t, h, j] * (u[h, j] * kv + S_loop[0, h, j, i])
                    S_loop[0, h, j, i] = kv + w[0, t, h, j] * S_loop[0, h, j, i]
            assert torch.allclose(y[0, t, h], out, rtol=1e-12, atol=1e-12)
    assert torch.allclose(S, S_loop, rtol=1e-12, atol=1e-12)

    r, w, k, v, kk, a, S0 = (t.double() for t in inputs("wkv7", B, T, H, N, seed=12))
    y, S = wkv7_reference(r, w, k, v, kk, a, S0)
    S_loop = S0.clone()
    for t in range(T):
        for h in range(H):
            old = S_loop[0, h].clone()
            for i in range(N):
                removed = sum(old[i, j] * kk[0, t, h, j] for j in range(N))
                for j in range(N):
                    S_loop[0, h, i, j] = (old[i, j] * w[0, t, h, j] - removed * kk[0, t, h, j] * a[0, t, h, j]
                                          + v[0, t, h, i] * k[0, t, h, j])
            out = S_loop[0, h] @ r[0, t, h]
            assert torch.allclose(y[0, t, h], out, rtol=1e-12, atol=1e-12)
    assert torch.allclose(S, S_loop, rtol=1e-12, atol=1e-12)


# ---- CUDA on a real GPU (marked gpu: deselected unless asked for with -m gpu; the CPU emulation in
# test_cuda_emulated.py runs the same kernels everywhere) ---------------------------------------------

def cuda_module():
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need an NVIDIA GPU visible to PyTorch")
    from rwkv_playground.kernels import load_kernel

    return load_kernel("cuda")


CUDA_TOL = {torch.float32: 5e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


@pytest.mark.gpu
@pytest.mark.parametrize("kind,B,T,shape,dtype", [
    (kind, B, T, shape, dtype) for kind in ("wkv5", "wkv7") for B in (1, 3) for T in (1, 17, 1024)
    for shape in ((2, 64), (3, 32), (4, 16)) for dtype in (torch.float32, torch.bfloat16, torch.float16)])
def test_cuda_matrix_kernels_match_the_reference(kind, B, T, shape, dtype):
    module = cuda_module()
    H, N = shape
    args = inputs(kind, B, T, H, N, seed=T + B)
    low = {"wkv5": (0, 1, 2), "wkv7": (0, 2, 3, 4, 5)}[kind]
    cast = [a.to(dtype) if i in low else a for i, a in enumerate(args)]
    y_ref, S_ref = getattr(reference_matrix_wkv, kind)(*[a.float() for a in cast])
    y, S = getattr(module, f"{kind}_forward")(*[a.cuda().contiguous() for a in cast])
    assert rel(y.float().cpu(), y_ref) <= CUDA_TOL[dtype] and rel(S.cpu(), S_ref) <= 5e-5


@pytest.mark.gpu
@pytest.mark.parametrize("arch_name", ["rwkv5", "rwkv6", "rwkv7"])
def test_cuda_model_matches_the_cpu_model(tmp_path, arch_name):
    cuda_module()
    from rwkv_playground import load_runtime
    from rwkv_playground.models import by_name
    from rwkv_playground.models.rwkv5 import RWKV5Config
    from rwkv_playground.models.rwkv6 import RWKV6Config
    from rwkv_playground.models.rwkv7 import RWKV7Config

    config = {"rwkv5": RWKV5Config(3, 128, 500, 448, 2, 64), "rwkv6": RWKV6Config(3, 128, 500, 448, 2, 64),
              "rwkv7": RWKV7Config(3, 128, 500, 512, 2, 64)}[arch_name]
    path = tmp_path / f"{arch_name}.pth"
    torch.save(by_name(arch_name).random_weights(config, seed=2), path)
    tokens = list(range(1, 300))
    cpu, cpu_state = load_runtime(path).forward(tokens, full_output=True)
    for dtype, tol in (("fp32", 1e-4), ("fp16", 3e-2), ("bf16", 5e-2)):
        runtime = load_runtime(path, device="cuda", dtype=dtype)
        assert runtime.describe()["wkv"] == "cuda"
        gpu, state = runtime.forward(tokens, full_output=True)
        assert rel(gpu.cpu(), cpu) <= tol, dtype
        step, _ = runtime.forward([7], state)  # the one-token step on the GPU
        ref_step, _ = load_runtime(path).forward([7], cpu_state)
        assert rel(step.cpu(), ref_step) <= tol, dtype


# ---- RWKV-7's training form: the C++ forward + hand-written backward (wkv.wkv7_train) ------------------

TRAIN_GRID = list(itertools.product([1, 2], [1, 15, 16, 17, 70], [(1, 64), (2, 16), (3, 6)],
                                    ["mixed", "fast", "slow"]))


def train_inputs(B, T, H, N, decay, dtype, seed=0):
    r, w, k, v, kk, a, _ = inputs("wkv7", B, T, H, N, seed=seed, decay=decay)
    return [t.to(dtype).requires_grad_() for t in (r, w, k, v, kk, a)]


@pytest.mark.parametrize("B,T,shape,decay", TRAIN_GRID)
def test_wkv7_training_backward_matches_autograd_through_the_reference(cpu_kernel_module, B, T, shape, decay):
    """float64: y and all six gradients equal autograd through wkv7_reference (chunk borders at 16
    crossed, T = 1, decays ~0 and ~1); float32: the same within fp32 rounding."""
    from rwkv_playground.wkv import wkv7_train

    H, N = shape
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-5)):
        args = train_inputs(B, T, H, N, decay, dtype, seed=B * 100 + T)
        y, S = wkv7_train(cpu_kernel_module, *args)
        y_ref, S_ref = wkv7_reference(*args, None)
        assert y.dtype == dtype and rel(y, y_ref) <= tol and rel(S, S_ref) <= tol
        grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(T), dtype=dtype)
        grads = torch.autograd.grad((y * grad_y).sum(), args)
        grads_ref = torch.autograd.grad((y_ref * grad_y).sum(), args)
        for name, g, g_ref in zip("r w k v kk a".split(), grads, grads_ref):
            assert torch.isfinite(g).all(), name
            assert rel(g, g_ref) <= tol, (name, dtype, rel(g, g_ref))


@pytest.mark.parametrize("T", [1, 5, 20])
def test_wkv7_training_backward_passes_float64_gradcheck(cpu_kernel_module, T):
    from rwkv_playground.wkv import wkv7_train

    args = train_inputs(1, T, 2, 4, "mixed", torch.float64, seed=T)
    assert torch.autograd.gradcheck(lambda *t: wkv7_train(cpu_kernel_module, *t)[0], args, eps=1e-6, atol=1e-8)


def test_the_cpu_operator_trains_through_the_kernel_and_infers_through_the_forward(kernel, cpu_kernel_module):
    """state None + inputs needing gradients -> the training kernel (its gradients are the reference's);
    with a state, or under no_grad, the inference kernel; a state + gradients -> the reference (autograd)."""
    args = train_inputs(1, 20, 2, 16, "mixed", torch.float32)
    y, _ = kernel.wkv7(*args, None)
    assert y.grad_fn is not None and "CompiledWKV7Train" in type(y.grad_fn).__name__
    with torch.no_grad():
        y_plain, _ = kernel.wkv7(*args, None)
    assert rel(y_plain, y.detach()) <= TOL
    state = torch.zeros(1, 2, 16, 16)
    y_state, _ = kernel.wkv7(*args, state)
    assert y_state.grad_fn is not None and rel(y_state.detach(), y.detach()) <= TOL


def test_wkv7_training_refuses_bad_inputs(cpu_kernel_module):
    from rwkv_playground.wkv import wkv7_train

    args = train_inputs(1, 4, 1, 8, "mixed", torch.float32)
    with pytest.raises(RuntimeError, match="must be"):
        cpu_kernel_module.wkv7_train_forward(*[a.detach() for a in args[:5]], args[5].detach()[:, :2].contiguous())
    with pytest.raises(RuntimeError, match="dtype"):
        cpu_kernel_module.wkv7_train_forward(*[a.detach() for a in args[:5]], args[5].detach().double())
    assert wkv7_train(cpu_kernel_module, *args)[0].shape == (1, 4, 1, 8)
