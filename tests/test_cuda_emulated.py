"""The CUDA kernels, run on the CPU: kernels/wkv_cuda.cu and its binding compiled as host C++
(tests/cuda_emulation/cuda_shim.h runs every block and thread), against the PyTorch reference.

No GPU is needed and none of these tests skip: they prove indexing, bounds guards, dtype
conversions, state carried across calls, zero-sized inputs, the binding's checks, and that every
output is written, nothing outside the arrays is, inputs stay untouched, and block order does not
matter. What they cannot prove (warp behaviour, the device's expf rounding, timing) is for
`python -m rwkv_playground.selftest` on a real GPU. The same build with AddressSanitizer and UBSan
runs in CI (tests/cuda_emulation/run_sanitized.sh).
"""

import itertools
import sys

import pytest
import torch

from conftest import ROOT
from rwkv_playground.wkv import empty_wkv_state, wkv_reference, wkv_train_reference
from test_wkv_kernels import DTYPES, OUT_TOL, check_forward, make_inputs

sys.path.insert(0, str(ROOT / "tests" / "cuda_emulation"))


@pytest.fixture(scope="session")
def emulated():
    import os

    from build import build_emulated

    # RWKV_CUDA_EMULATION_SANITIZE=1: the AddressSanitizer + UBSan build (CI runs it, see .ci/run);
    # RWKV_CUDA_EMULATION_KERNELS: another copy of kernels/ (tools/check_cuda_emulation.py plants bugs in one)
    kernels = os.environ.get("RWKV_CUDA_EMULATION_KERNELS") or str(ROOT / "kernels")
    try:
        return build_emulated(kernels, sanitize=os.environ.get("RWKV_CUDA_EMULATION_SANITIZE") == "1")
    except Exception as exc:  # a failure to build is a failure, never a skip
        pytest.fail(f"the CPU emulation of the CUDA kernels did not build: {exc}")


def forward(module):
    return lambda *args: module.wkv_forward(*args)


# B*C: 1, 37, 300, 768 and x3: never a multiple of the 128-thread block, except 768 and 2304
GRID = list(itertools.product([1, 3], [0, 1, 2, 17, 256, 1024], [1, 37, 300, 768], list(DTYPES)))


@pytest.mark.parametrize("B,T,C,dtype_name", GRID)
def test_forward_grid_matches_the_reference_and_writes_only_its_outputs(emulated, B, T, C, dtype_name):
    inputs = make_inputs(B, T, C, DTYPES[dtype_name], seed=B * 1000 + T + C)
    if T == 0:
        y, aa, bb, pp = emulated.wkv_forward(*inputs)
        assert y.shape == (B, 0, C)
        for got, given in zip((aa, bb, pp), inputs[4:]):
            assert torch.equal(got, given)  # nothing read, the state passes through
        return
    check_forward(forward(emulated), inputs, dtype_name)
    # the same call on buffers with guard zones: every y written, nothing outside, inputs intact
    y, aa, bb, pp = emulated.guarded_forward(*inputs)
    y_ref, aa_ref, bb_ref, pp_ref = emulated.wkv_forward(*inputs)
    assert torch.equal(y, y_ref) and torch.equal(aa, aa_ref) and torch.equal(pp, pp_ref)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_extreme_values(emulated, dtype_name):
    inputs = make_inputs(2, 300, 70, DTYPES[dtype_name], extreme=True)
    y, aa, bb, pp = emulated.wkv_forward(*inputs)
    assert torch.isfinite(y.float()).all() and torch.isfinite(aa).all() and torch.isfinite(bb).all()
    check_forward(forward(emulated), inputs, dtype_name)


def test_state_carried_across_chunks_equals_one_pass(emulated):
    w, u, k, v, aa, bb, pp = make_inputs(3, 1100, 129, torch.float32, seed=3)
    y_full, *state_full = emulated.wkv_forward(w, u, k, v, aa, bb, pp)
    state, ys = (aa, bb, pp), []
    for start in range(0, 1100, 256):
        chunk = slice(start, start + 256)
        y, *state = emulated.wkv_forward(w, u, k[:, chunk].contiguous(), v[:, chunk].contiguous(), *state)
        ys.append(y)
    assert torch.allclose(torch.cat(ys, 1), y_full, atol=1e-6)
    for a, b in zip(state, state_full):
        assert torch.allclose(a, b, atol=1e-6)


def test_block_order_does_not_matter(emulated):
    inputs = make_inputs(3, 64, 300, torch.float32, seed=11)  # 900 threads: 8 blocks, the last partial
    outputs = []
    try:
        for order, seed in ((0, 0), (1, 0), (2, 1), (2, 7)):
            emulated.set_block_order(order, seed)
            outputs.append(emulated.wkv_forward(*inputs))
            outputs.append(emulated.guarded_train(*inputs[:4], torch.ones_like(inputs[2])))
    finally:
        emulated.set_block_order(0, 0)
    for other in outputs[2:]:
        for a, b in zip(other, outputs[len(other) == 5]):
            assert torch.equal(a, b)


def test_zero_sized_inputs_launch_nothing(emulated):
    for B, T, C in ((0, 5, 8), (2, 5, 0), (0, 0, 0)):
        w, u, k, v, aa, bb, pp = make_inputs(max(B, 1), max(T, 1), max(C, 1), torch.float32)
        k, v = torch.zeros(B, T, C), torch.zeros(B, T, C)
        w, u, aa, bb, pp = w[:C].contiguous(), u[:C].contiguous(), *empty_wkv_state(B, C)
        before = emulated.launch_counts()
        y, aa2, bb2, pp2 = emulated.wkv_forward(w, u, k, v, aa, bb, pp)
        assert y.shape == (B, T, C) and aa2.shape == (B, C)
        assert emulated.wkv_train_forward(w, u, k, v).shape == (B, T, C)
        gw, gu, gk, gv = emulated.wkv_train_backward(w, u, k, v, torch.zeros(B, T, C), torch.zeros(B, T, C))
        assert gk.shape == (B, T, C) and gw.shape == (C,)
        assert emulated.launch_counts()[0] == before[0]  # an empty grid is never launched
    w, u, k, v, aa, bb, pp = make_inputs(2, 1, 5, torch.float32)
    before = emulated.launch_counts()
    emulated.wkv_forward(w, u, k[:, :0].contiguous(), v[:, :0].contiguous(), aa, bb, pp)  # T = 0: a real grid
    assert emulated.launch_counts()[0] == before[0] + 1


def test_every_thread_of_a_partial_block_runs(emulated):
    inputs = make_inputs(1, 3, 300, torch.float32, seed=5)  # 300 threads: blocks of 128, 128, 44 useful
    before = emulated.launch_counts()
    emulated.guarded_forward(*inputs)
    launches, threads = (a - b for a, b in zip(emulated.launch_counts(), before))
    assert launches == 1 and threads == 3 * 128  # the whole last block ran; the guard kept 84 idle


def test_the_binding_checks_shapes_dtypes_and_devices(emulated):
    w, u, k, v, aa, bb, pp = make_inputs(2, 4, 8, torch.float32)
    cases = [
        ((w, u, k, v, aa[:1], bb, pp), "aa, bb, pp must be \\[B, C\\]"),
        ((w, u, k, v, aa, bb.double(), pp), "must be float32"),
        ((w, u, k, v, aa, bb, pp.to("meta")), "device"),
        ((w[:3], u, k, v, aa, bb, pp), "w and u must have C elements"),
        ((w, u, k, v[:, :2], aa, bb, pp), "equal shape"),
        ((w, u, k.double(), v.double(), aa, bb, pp), "float32, float16 or bfloat16"),
        ((w, u, k.transpose(1, 2).contiguous().transpose(1, 2), v, aa, bb, pp), "contiguous"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            emulated.wkv_forward(*args)
    with pytest.raises(RuntimeError, match="training takes float32"):
        emulated.wkv_train_forward(w, u, k.half(), v.half())


@pytest.mark.parametrize("B,T,C,extreme", [(1, 1, 1, False), (3, 64, 37, False), (2, 300, 96, True),
                                           (2, 1024, 130, False)])
def test_training_forward_and_backward_match_reference_autograd(emulated, B, T, C, extreme):
    w, u, k, v, *_ = make_inputs(B, T, C, torch.float64, extreme=extreme, seed=B + T)
    grad_y = torch.randn(B, T, C, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref_in = [t.clone().requires_grad_() for t in (w, u, k, v)]
    y_ref = wkv_train_reference(*ref_in)
    ref_grads = torch.autograd.grad((y_ref * grad_y).sum(), ref_in, allow_unused=True)  # w unused at T = 1
    ref_grads = [torch.zeros_like(x) if g is None else g for g, x in zip(ref_grads, ref_in)]
    f32 = [t.float().contiguous() for t in (w, u, k, v)]
    y, gw, gu, gk, gv = emulated.guarded_train(*f32, grad_y.float())  # every gradient written
    assert torch.equal(y, emulated.wkv_train_forward(*f32))
    assert torch.allclose(y.double(), y_ref.detach(), rtol=1e-4, atol=1e-4 if extreme else 1e-5)
    binding = emulated.wkv_train_backward(*f32, y, grad_y.float())
    for name, got, bound, ref in zip("wukv", (gw, gu, gk, gv), binding, ref_grads):
        assert torch.equal(got, bound), name
        scale = ref.abs().max().clamp_min(1e-6)
        assert ((got.double() - ref).abs().max() / scale).item() < 1e-3, name


def test_the_emulated_kernels_agree_with_the_cpu_kernels(emulated, cpu_kernel_module):
    """Two implementations of the same step header (wkv_step.h): within fp32 rounding."""
    for dtype_name in DTYPES:
        inputs = make_inputs(2, 200, 77, DTYPES[dtype_name], seed=9)
        a = emulated.wkv_forward(*inputs)
        b = cpu_kernel_module.wkv_forward(*inputs)
        scale = a[0].float().abs().max()
        assert ((a[0].float() - b[0].float()).abs().max() / scale).item() <= OUT_TOL[dtype_name]
        assert torch.allclose(a[1] / a[2], b[1] / b[2], rtol=1e-4, atol=1e-5)
    y_ref, *_ = wkv_reference(*make_inputs(1, 5, 3, torch.float32))
    assert y_ref.shape == (1, 5, 3)


# ---- RWKV-5/6/7: kernels/wkv_matrix_cuda.cu ---------------------------------------------------------

from test_wkv_matrix_kernels import inputs as matrix_inputs, rel as matrix_rel  # noqa: E402
from rwkv_playground.wkv import reference_matrix_wkv  # noqa: E402

MATRIX_TOL = {"fp32": 2e-5, "bf16": 2e-2, "fp16": 3e-3}
# (B, H) with B * H blocks; T includes 0 (a grid that reads nothing) and a long run; N = 16, 32, 64
MATRIX_GRID = list(itertools.product(["wkv5", "wkv7"], [(1, 1), (3, 2)], [0, 1, 17, 300], [16, 32, 64], list(DTYPES)))


def matrix_args(kind, B, T, H, N, dtype, seed=0, decay="mixed"):
    """The inputs in `dtype` (w, u and the state stay float32) and the reference's float32 inputs."""
    args = matrix_inputs(kind, B, T, H, N, seed=seed, decay=decay)
    low_precision = {"wkv5": (0, 1, 2), "wkv7": (0, 2, 3, 4, 5)}[kind]  # r, k, v (kk, a)
    cast = [a.to(dtype).contiguous() if i in low_precision else a for i, a in enumerate(args)]
    return cast, [a.float() for a in cast]


@pytest.mark.parametrize("kind,BH,T,N,dtype_name", MATRIX_GRID)
def test_matrix_kernels_match_the_reference_and_write_only_their_outputs(emulated, kind, BH, T, N, dtype_name):
    (B, H), dtype = BH, DTYPES[dtype_name]
    args, ref_args = matrix_args(kind, B, T, H, N, dtype, seed=B * 100 + T + N)
    y, S = getattr(emulated, f"{kind}_forward")(*args)
    assert y.dtype == dtype and S.dtype == torch.float32 and y.shape == (B, T, H, N)
    y_ref, S_ref = getattr(reference_matrix_wkv, kind)(*ref_args)
    if T == 0:
        assert torch.equal(S, args[-1])  # nothing read, the state passes through
    else:
        assert matrix_rel(y.float(), y_ref) <= MATRIX_TOL[dtype_name]
        assert matrix_rel(S, S_ref) <= 2e-5  # the state accumulates in fp32 from the same inputs
    y_g, S_g = getattr(emulated, f"guarded_{kind}")(*args)  # every y written, nothing outside, inputs intact
    assert torch.equal(y_g, y) and torch.equal(S_g, S)


@pytest.mark.parametrize("kind,decay", list(itertools.product(["wkv5", "wkv7"], ["fast", "slow"])))
def test_matrix_kernels_extreme_decays_and_chunks(emulated, kind, decay):
    args, _ = matrix_args(kind, 2, 120, 2, 32, torch.float32, seed=4, decay=decay)
    op = getattr(emulated, f"{kind}_forward")
    y, S = op(*args)
    y_ref, S_ref = getattr(reference_matrix_wkv, kind)(*args)
    assert torch.isfinite(y).all() and matrix_rel(y, y_ref) <= 2e-5 and matrix_rel(S, S_ref) <= 2e-5
    state, pieces = args[-1], []
    for lo, hi in ((0, 1), (1, 50), (50, 120)):  # the state carried across calls
        part, state = op(*[a[:, lo:hi].contiguous() if a.dim() == 4 else a for a in args[:-1]], state)
        pieces.append(part)
    assert torch.equal(torch.cat(pieces, 1), y) and torch.equal(state, S)


def test_matrix_kernels_block_order_and_the_cpu_kernels(emulated, cpu_kernel_module):
    for kind in ("wkv5", "wkv7"):
        args, _ = matrix_args(kind, 3, 20, 3, 16, torch.float32, seed=8)
        outputs = []
        try:
            for order, seed in ((0, 0), (1, 0), (2, 3)):
                emulated.set_block_order(order, seed)
                outputs.append(getattr(emulated, f"{kind}_forward")(*args))
        finally:
            emulated.set_block_order(0, 0)
        for other in outputs[1:]:
            assert all(torch.equal(a, b) for a, b in zip(other, outputs[0]))
        cpu = getattr(cpu_kernel_module, f"{kind}_forward")(*args)
        assert matrix_rel(outputs[0][0], cpu[0]) <= 2e-5 and matrix_rel(outputs[0][1], cpu[1]) <= 2e-5


def test_matrix_binding_checks(emulated):
    args, _ = matrix_args("wkv7", 2, 3, 2, 16, torch.float32)
    r, w, k, v, kk, a, S = args
    cases = [
        ((r, w, k, v, kk, a, S[:1]), "state must be \\[B, H, N, N\\]"),
        ((r, w.half(), k, v, kk, a, S), "w must be a contiguous float32"),
        ((r, w, k, v.half(), kk, a, S), "one dtype"),
        ((r, w, k, v, kk[:, :2].contiguous(), a, S), "one shape"),
        ((r, w, k, v, kk, a, S.double()), "float32"),
    ]
    for call_args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            emulated.wkv7_forward(*call_args)
    args, _ = matrix_args("wkv5", 1, 2, 1, 20, torch.float32)
    with pytest.raises(RuntimeError, match="head size 20 is not compiled"):
        emulated.wkv5_forward(*args)
    empty, _ = matrix_args("wkv5", 1, 4, 2, 16, torch.float32)
    before = emulated.launch_counts()
    y, S = emulated.wkv5_forward(*[t[:0].contiguous() if t.dim() == 4 else t for t in empty[:4]], empty[4],
                                 empty[5][:0].contiguous())
    assert y.shape == (0, 4, 2, 16) and emulated.launch_counts()[0] == before[0]  # B = 0: nothing launched
