"""The recurrences of every architecture: PyTorch references, compiled kernels wrapped to the same
signatures, and each matrix recurrence's one-token transition written once.

- RWKV-4's WKV operator (`WKVOperator`: the reference, C++ and CUDA behind one signature):

    wkv_forward(w, u, k, v, aa, bb, pp) -> (y, aa, bb, pp)

  w      [C] float32   per-channel decay, already -exp(time_decay) (negative)
  u      [C] float32   per-channel bonus of the current token (time_first)
  k, v   [B, T, C]     fp32 / fp16 / bf16
  aa, bb, pp [B, C]    float32 state in; the new state is returned, inputs are never modified
  y      [B, T, C]     same dtype as v

For each channel, with the numerically stable running maximum `pp`:
  y_t  = (e^{pp-p} aa + e^{u+k_t-p} v_t) / (e^{pp-p} bb + e^{u+k_t-p}),   p = max(pp, u+k_t)
  then aa, bb <- e^{pp+w-q} aa + e^{k_t-q} v_t,  e^{pp+w-q} bb + e^{k_t-q},  pp <- q = max(pp+w, k_t)

`wkv_reference` is the plain PyTorch loop everything else is tested against. The compiled C++ and
CUDA kernels (kernels/, loaded by `kernels.py`) implement the same signature; `wkv_train` is the
state-less training form (empty state in, gradients for w, u, k, v out).

- RWKV-5/6's and RWKV-7's matrix recurrences (`MatrixWKV`: `wkv5_reference`, `wkv7_reference` and the
  compiled kernels), see below; `WKV5` / `WKV7` hold one token's transition, which the references,
  the inspector's replay and exact attention (`effective_attention`) and patching all call.
"""

from __future__ import annotations

import numpy as np
import torch

from .state import EMPTY_PP


def empty_wkv_state(batch: int, channels: int, device="cpu"):
    aa = torch.zeros(batch, channels, dtype=torch.float32, device=device)
    bb = torch.zeros_like(aa)
    pp = torch.full_like(aa, EMPTY_PP)
    return aa, bb, pp


def wkv_reference(w, u, k, v, aa, bb, pp, return_states: bool = False):
    """Pure-PyTorch WKV, one time step at a time. Differentiable (autograd) in all inputs.

    w and u may also be [B, C] (one set per batch row: the inspector replays all layers at once).
    With return_states=True, also returns the state after every step: (aa, bb, pp) each [B, T, C].
    """
    T = k.shape[1]
    out_dtype = v.dtype
    acc = torch.float64 if k.dtype == torch.float64 else torch.float32  # float64 kept for gradcheck
    k, v = k.to(acc), v.to(acc)
    aa, bb, pp = aa.to(acc), bb.to(acc), pp.to(acc)
    outputs, states = [], []
    for t in range(T):
        kt, vt = k[:, t], v[:, t]
        ww = u + kt
        p = torch.maximum(pp, ww)
        e1 = torch.exp(pp - p)
        e2 = torch.exp(ww - p)
        outputs.append((e1 * aa + e2 * vt) / (e1 * bb + e2))
        ww = pp + w
        p = torch.maximum(ww, kt)
        e1 = torch.exp(ww - p)
        e2 = torch.exp(kt - p)
        aa = e1 * aa + e2 * vt
        bb = e1 * bb + e2
        pp = p
        if return_states:
            states.append((aa, bb, pp))
    y = torch.stack(outputs, dim=1) if outputs else k.new_empty(k.shape)
    if return_states:
        per_step = tuple(torch.stack([s[i] for s in states], dim=1) for i in range(3))
        return y.to(out_dtype), aa, bb, pp, per_step
    return y.to(out_dtype), aa, bb, pp


def wkv_train_reference(w, u, k, v):
    """Training form of the reference: empty state in, only y out."""
    B, _, C = k.shape
    aa, bb, pp = empty_wkv_state(B, C, k.device)
    return wkv_reference(w, u, k, v, aa, bb, pp)[0]


class _CompiledWKVTrain(torch.autograd.Function):
    """Autograd wrapper around a compiled kernel's forward/backward (training, empty state)."""

    @staticmethod
    def forward(ctx, kernel_module, w, u, k, v):
        # float64 is kept (the C++ kernel supports it, for gradcheck); anything else runs in fp32.
        dtype = torch.float64 if k.dtype == torch.float64 and k.device.type == "cpu" else torch.float32
        w, u, k, v = (t.to(dtype).contiguous() for t in (w, u, k, v))
        y = kernel_module.wkv_train_forward(w, u, k, v)
        ctx.kernel_module = kernel_module
        ctx.save_for_backward(w, u, k, v, y)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        w, u, k, v, y = ctx.saved_tensors
        gw, gu, gk, gv = ctx.kernel_module.wkv_train_backward(w, u, k, v, y, grad_y.to(y.dtype).contiguous())
        return None, gw, gu, gk, gv


def make_compiled_wkv(kernel_module):
    """Wrap a compiled kernel module (C++ or CUDA) in the engine's WKV signature."""

    def wkv_forward(w, u, k, v, aa, bb, pp):
        y, aa2, bb2, pp2 = kernel_module.wkv_forward(
            w.float().contiguous(), u.float().contiguous(), k.contiguous(), v.contiguous(),
            aa.float().contiguous(), bb.float().contiguous(), pp.float().contiguous(),
        )
        return y, aa2, bb2, pp2

    def wkv_train(w, u, k, v):
        return _CompiledWKVTrain.apply(kernel_module, w, u, k, v)

    return wkv_forward, wkv_train


class WKVOperator:
    """The WKV recurrence as the model calls it: `wkv(w, u, k, v, state) -> (y, state)`.

    state is (aa, bb, pp), each [B, C] float32, and the new state is returned; state None is the
    training form (an empty state in, differentiable in w, u, k, v, no state out)."""

    def __init__(self, name: str, forward, train):
        self.name = name
        self.forward = forward
        self.train = train

    def __call__(self, w, u, k, v, state):
        if state is None:
            return self.train(w, u, k, v), None
        y, aa, bb, pp = self.forward(w, u, k, v, *state)
        return y, (aa, bb, pp)

    def __repr__(self) -> str:
        return f"WKVOperator({self.name!r})"


reference_wkv = WKVOperator("reference", wkv_reference, wkv_train_reference)


def compiled_wkv(kernel_module, name: str) -> WKVOperator:
    """The WKV operator of a compiled kernel module ("cpu" or "cuda")."""
    return WKVOperator(name, *make_compiled_wkv(kernel_module))


# ---- RWKV-5/6/7: the matrix-state recurrences ----------------------------------------------------
#
#   wkv5(r, k, v, w, u, state) -> (y, state)        RWKV-5.x and RWKV-6, per head h:
#       y_t = r_t^T (diag(u) k_t v_t^T + S)           S [key j, value i]; the bonus u on the diagonal
#       S  <- k_t v_t^T + diag(w_t) S                 read first, then decay (w: factor in (0, 1))
#   wkv7(r, w, k, v, kk, a, state) -> (y, state)    RWKV-7 ("generalised delta rule"), per head:
#       S  <- S diag(w_t) - (S kk_t)(kk_t * a_t)^T + v_t k_t^T     S [value i, key j]; both terms
#       y_t = S r_t                                                  use the old S; read after
#
# r, k, v, w, kk, a: [B, T, H, N]; u: [H, N]; state: [B, H, N, N] float32 (None: zeros, training).
# y: [B, T, H, N] float32 (float64 kept for gradcheck); each_state(t, S) sees the state after each
# token (the inspector summarises states without keeping them all). These loops are the references the
# compiled kernels (kernels/wkv_matrix_cpu.cpp, ...) are held to; autograd runs through them.

def _matrix_acc(*tensors) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def wkv5_reference(r, k, v, w, u, state, return_states: bool = False, each_state=None):
    B, T, H, N = k.shape
    acc = _matrix_acc(r, k, v, w)
    r, k, v, w, u = (t.to(acc) for t in (r, k, v, w, u))
    S = torch.zeros(B, H, N, N, dtype=acc, device=k.device) if state is None else state.to(acc)
    ys, states = [], []
    for t in range(T):
        x = {"k": k[:, t], "v": v[:, t], "w": w[:, t]}
        ys.append(WKV5.read(S, r[:, t], x, u))
        S = WKV5.transition(S, x)
        if return_states:
            states.append(S)
        if each_state is not None:
            each_state(t, S)
    y = torch.stack(ys, dim=1) if ys else k.new_zeros(B, 0, H, N, dtype=acc)
    if return_states:
        return y, S, torch.stack(states, dim=1)
    return y, S


def wkv7_reference(r, w, k, v, kk, a, state, return_states: bool = False, each_state=None):
    B, T, H, N = k.shape
    acc = _matrix_acc(r, w, k, v)
    r, w, k, v, kk, a = (t.to(acc) for t in (r, w, k, v, kk, a))
    S = torch.zeros(B, H, N, N, dtype=acc, device=k.device) if state is None else state.to(acc)
    ys, states = [], []
    for t in range(T):
        S = WKV7.transition(S, {"w": w[:, t], "k": k[:, t], "v": v[:, t], "kk": kk[:, t], "a": a[:, t]})
        ys.append(WKV7.read(S, r[:, t]))
        if return_states:
            states.append(S)
        if each_state is not None:
            each_state(t, S)
    y = torch.stack(ys, dim=1) if ys else k.new_zeros(B, 0, H, N, dtype=acc)
    if return_states:
        return y, S, torch.stack(states, dim=1)
    return y, S


# ---- one token of each recurrence, written once ---------------------------------------------------
#
# The references above, the inspector's replay and exact attention (inspector: matrix recordings)
# and patching's token removal all step a head's state through these functions. They take numpy
# arrays or torch tensors alike, with any leading (batch, head) axes: S [..., N, N], and a mapping x
# of one token's inputs, each [..., N]. `decay_keys(P, x)` is the part of the transition that acts on
# the key index: P [..., M, N] holds M key-space row vectors (what the state remembers of each
# value channel, or one earlier token's key carried forward), and the decay maps each of them to
# what is left of it after this token.

def _swap(S):
    return S.swapaxes(-1, -2)


class _MatrixRecurrence:
    @classmethod
    def transition(cls, S, x):
        """The state after one token: what decays of the state, plus the token's own term."""
        return cls.decay_state(S, x) + cls.write(x)


class WKV5(_MatrixRecurrence):
    """RWKV-5.x and RWKV-6: S [key j, value i]; y_t = r_t^T (diag(u) k_t v_t^T + S) reads the state
    before the token, then S <- k_t v_t^T + diag(w_t) S."""

    name = "wkv5"
    inputs = ("r", "k", "v", "w")        # the per-token inputs the inspector records
    state_axes = ("key j", "value i")    # what a head's matrix indexes: (rows, columns)
    key_axis = "rows"                    # where the decay acts
    reads_before_update = True

    @staticmethod
    def decay_keys(P, x):
        return P * x["w"][..., None, :]

    @staticmethod
    def write(x):
        """The token's own term, k v^T."""
        return x["k"][..., :, None] * x["v"][..., None, :]

    @classmethod
    def decay_state(cls, S, x):
        return _swap(cls.decay_keys(_swap(S), x))  # the key index is S's rows

    @staticmethod
    def read(S, r, x, u):
        """The output of the token: r^T (diag(u) k v^T + S), S the state before it."""
        return ((r * u * x["k"]).sum(-1)[..., None] * x["v"]) + (r[..., None, :] @ S)[..., 0, :]

    @staticmethod
    def bonus_weight(r, k, u):
        """The weight of the token's own value in its output (the diagonal of the attention)."""
        return (r * u * k).sum(-1)

    @staticmethod
    def run(inputs: dict, S, each_state=None):
        """Every token of [B, T, H, N] inputs from S [B, H, N, N] (the bonus does not enter the state)."""
        zeros = inputs["k"].new_zeros(inputs["k"].shape[-2:])
        return wkv5_reference(inputs["r"], inputs["k"], inputs["v"], inputs["w"], zeros, S, each_state=each_state)


class WKV7(_MatrixRecurrence):
    """RWKV-7: S [value i, key j]; S <- S diag(w_t) - (S kk_t)(kk_t * a_t)^T + v_t k_t^T, then
    y_t = S r_t (the bonus r_k is added after the group norm, outside the recurrence)."""

    name = "wkv7"
    inputs = ("r", "k", "v", "w", "kk", "a")
    state_axes = ("value i", "key j")
    key_axis = "columns"
    reads_before_update = False

    @staticmethod
    def decay_keys(P, x):
        kk = x["kk"]
        return P * x["w"][..., None, :] - (P @ kk[..., :, None]) * (kk * x["a"])[..., None, :]

    @staticmethod
    def write(x):
        """The token's own term, v k^T."""
        return x["v"][..., :, None] * x["k"][..., None, :]

    @classmethod
    def decay_state(cls, S, x):
        return cls.decay_keys(S, x)  # the key index is S's columns

    @staticmethod
    def read(S, r, x=None, u=None):
        return (S @ r[..., :, None])[..., 0]

    @staticmethod
    def bonus_weight(r, k, r_k):
        """RWKV-7's bonus weight sum_j r k r_k (added after the group norm, times v)."""
        return (r * k * r_k).sum(-1)

    @staticmethod
    def run(inputs: dict, S, each_state=None):
        return wkv7_reference(*(inputs[n] for n in ("r", "w", "k", "v", "kk", "a")), S, each_state=each_state)


def effective_attention(recurrence, x: dict, S0, bonus=None):
    """Exact effective attention of one head over n tokens: (alpha [n, n], carried [n, N]) with
    sum_i alpha[t, i] v_i + carried[t] the head's output at t (before the group norm), alpha zero
    above the diagonal. x: each input [n, N] float64; S0 the state before the first token.

    The state is linear in the values: token i's value enters through its key, k_i, carried forward
    by the decay of every later token (`decay_keys`), and is read by r_t; the memory from before the
    window, S0, is carried forward the same way. RWKV-5/6 read before updating and add the bonus
    u on the diagonal; RWKV-7 updates first. O(n^2 N)."""
    r, k = x["r"], x["k"]
    n, N = k.shape
    alpha = np.zeros((n, n))
    carried = np.zeros((n, N))
    keys = np.zeros((n, N))  # keys[i]: token i's key as the state holds it now
    memory = np.asarray(S0, dtype=np.float64)
    memory = _swap(memory) if recurrence.reads_before_update else memory  # rows in key space
    for t in range(n):
        token = {name: x[name][t] for name in x}
        if recurrence.reads_before_update:
            alpha[t, :t] = keys[:t] @ r[t]
            alpha[t, t] = recurrence.bonus_weight(r[t], k[t], bonus)
            carried[t] = memory @ r[t]
        keys[:t] = recurrence.decay_keys(keys[:t], token)
        keys[t] = k[t]
        memory = recurrence.decay_keys(memory, token)
        if not recurrence.reads_before_update:
            alpha[t, :t + 1] = keys[:t + 1] @ r[t]
            carried[t] = memory @ r[t]
    return alpha, carried


class MatrixWKV:
    """The matrix-state recurrences as the RWKV-5/6/7 models call them (`wkv.wkv5(...)`,
    `wkv.wkv7(...)`, signatures above), from one implementation."""

    def __init__(self, name: str, wkv5, wkv7):
        self.name = name
        self.wkv5 = wkv5
        self.wkv7 = wkv7

    def __repr__(self) -> str:
        return f"MatrixWKV({self.name!r})"


reference_matrix_wkv = MatrixWKV("reference", wkv5_reference, wkv7_reference)


def with_decay(wkv: MatrixWKV, factor: torch.Tensor) -> MatrixWKV:
    """`wkv` with the decay w [B, T, H, N] replaced by `factor` [B, H, N] wherever it is not NaN, at
    every token of the call (the patching knock-outs: a head's or key channels' decay set by hand;
    the decay acts on the key index in every version)."""

    def replace(w):
        f = factor.to(device=w.device, dtype=w.dtype)[:, None]               # [B, 1, H, N]
        return torch.where(torch.isnan(f), w, f)

    return MatrixWKV(f"{wkv.name}, decay edited",
                     lambda r, k, v, w, u, state: wkv.wkv5(r, k, v, replace(w), u, state),
                     lambda r, w, k, v, kk, a, state: wkv.wkv7(r, replace(w), k, v, kk, a, state))


# head sizes the CUDA kernels are compiled for (kernels/wkv_matrix_cuda.cu); the CPU ones take any
CUDA_HEAD_SIZES = (16, 32, 64)


class _CompiledWKV7Train(torch.autograd.Function):
    """RWKV-7's recurrence from an empty state with the C++ kernel's hand-written backward
    (kernels/wkv_matrix_cpu.cpp: wkv7_train_forward / wkv7_train_backward); float64 stays float64
    (gradcheck), anything else runs in float32. The final state is returned, not differentiable."""

    @staticmethod
    def forward(ctx, kernel_module, r, w, k, v, kk, a):
        dtype = torch.float64 if k.dtype == torch.float64 else torch.float32
        inputs = tuple(t.to(dtype).contiguous() for t in (r, w, k, v, kk, a))
        y, checkpoints, final_state = kernel_module.wkv7_train_forward(*inputs)
        ctx.kernel_module = kernel_module
        ctx.save_for_backward(*inputs, checkpoints)
        ctx.mark_non_differentiable(final_state)
        return y, final_state

    @staticmethod
    def backward(ctx, grad_y, _grad_state):
        *inputs, checkpoints = ctx.saved_tensors
        grad_y = torch.zeros_like(inputs[0]) if grad_y is None else grad_y.to(inputs[0].dtype).contiguous()
        grads = ctx.kernel_module.wkv7_train_backward(*inputs, checkpoints, grad_y)
        return (None, *grads)


def wkv7_train(kernel_module, r, w, k, v, kk, a):
    """Differentiable wkv7 from an empty state on the CPU: (y [B, T, H, N], final state)."""
    return _CompiledWKV7Train.apply(kernel_module, r, w, k, v, kk, a)


def compiled_matrix_wkv(kernel_module, name: str) -> MatrixWKV:
    """The matrix-state recurrences of a compiled kernel module (float32 in, float32 out); on CUDA a
    head size the kernels are not compiled for runs the reference. Autograd runs through the CPU
    kernel's RWKV-7 training form (state None, inputs needing gradients); otherwise through the
    reference."""

    def f32(t):
        return t.float().contiguous()

    def empty_state(k):
        B, _, H, N = k.shape
        return torch.zeros(B, H, N, N, dtype=torch.float32, device=k.device)

    def unsupported(k) -> bool:
        return name == "cuda" and k.shape[-1] not in CUDA_HEAD_SIZES

    def wkv5(r, k, v, w, u, state):
        if unsupported(k):
            return wkv5_reference(r, k, v, w, u, state)
        S = empty_state(k) if state is None else state
        y, S = kernel_module.wkv5_forward(f32(r), f32(k), f32(v), f32(w), f32(u), f32(S))
        return y, S

    def needs_grad(*tensors) -> bool:
        return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)

    def wkv7(r, w, k, v, kk, a, state):
        if name == "cpu" and state is None and needs_grad(r, w, k, v, kk, a):
            return wkv7_train(kernel_module, r, w, k, v, kk, a)
        if unsupported(k) or needs_grad(r, w, k, v, kk, a):
            return wkv7_reference(r, w, k, v, kk, a, state)
        S = empty_state(k) if state is None else state
        y, S = kernel_module.wkv7_forward(f32(r), f32(w), f32(k), f32(v), f32(kk), f32(a), f32(S))
        return y, S

    return MatrixWKV(name, wkv5, wkv7)
