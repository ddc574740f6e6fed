"""RWKV-4: the model definition used for inference and for training the demo model.

The module's parameter names are BlinkDL's checkpoint keys (`emb.weight`, `blocks.N.att.key.weight`,
`blocks.N.att.time_decay`...), so `state_dict()` *is* a BlinkDL checkpoint and loading one is a
plain `load_state_dict(assign=True)` after a safe read.

Inference keeps the residual stream, LayerNorms, token-shift mixing and the WKV state in float32;
the big matrices stay in the chosen dtype (fp32 / bf16 / fp16) and each matmul casts its input to
that dtype and its output back to float32.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import read_checkpoint
from .errors import LoadError, StateError
from .state import State

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_CHUNK_LEN = 512  # tokens per pass in a prompt: larger GEMMs run closer to peak; [T, 4C] fp32 stays small
LN_EPS = 1e-5
# fp16: halve the residual stream every this many layers (weights pre-divided to match), as ChatRWKV.
FP16_RESCALE_EVERY = 6


@dataclass(frozen=True)
class RWKVConfig:
    n_layer: int
    n_embd: int
    vocab_size: int
    ffn_dim: int

    @property
    def n_params(self) -> int:
        C, F_, V, L = self.n_embd, self.ffn_dim, self.vocab_size, self.n_layer
        per_layer = 4 * C * C + 2 * C * F_ + C * C + 2 * 2 * C + 2 * C + 3 * C + 2 * C
        return 2 * V * C + L * per_layer + 2 * C + 2 * C


class TimeMix(nn.Module):
    def __init__(self, n_embd: int):
        super().__init__()
        self.time_decay = nn.Parameter(torch.empty(n_embd))
        self.time_first = nn.Parameter(torch.empty(n_embd))
        self.time_mix_k = nn.Parameter(torch.empty(1, 1, n_embd))
        self.time_mix_v = nn.Parameter(torch.empty(1, 1, n_embd))
        self.time_mix_r = nn.Parameter(torch.empty(1, 1, n_embd))
        self.key = nn.Linear(n_embd, n_embd, bias=False)
        self.value = nn.Linear(n_embd, n_embd, bias=False)
        self.receptance = nn.Linear(n_embd, n_embd, bias=False)
        self.output = nn.Linear(n_embd, n_embd, bias=False)


class ChannelMix(nn.Module):
    def __init__(self, n_embd: int, ffn_dim: int):
        super().__init__()
        self.time_mix_k = nn.Parameter(torch.empty(1, 1, n_embd))
        self.time_mix_r = nn.Parameter(torch.empty(1, 1, n_embd))
        self.key = nn.Linear(n_embd, ffn_dim, bias=False)
        self.receptance = nn.Linear(n_embd, n_embd, bias=False)
        self.value = nn.Linear(ffn_dim, n_embd, bias=False)


class Block(nn.Module):
    def __init__(self, layer_id: int, n_embd: int, ffn_dim: int):
        super().__init__()
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(n_embd, eps=LN_EPS)
        self.ln1 = nn.LayerNorm(n_embd, eps=LN_EPS)
        self.ln2 = nn.LayerNorm(n_embd, eps=LN_EPS)
        self.att = TimeMix(n_embd)
        self.ffn = ChannelMix(n_embd, ffn_dim)


def _linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T computed in the weight's dtype, returned as float32."""
    if weight.dtype == torch.float32:
        return F.linear(x.float(), weight)
    return F.linear(x.to(weight.dtype), weight).float()


def _token_shift(xx: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """[B, T, C] -> the previous token's values: prev for t=0, xx[t-1] after."""
    return torch.cat([prev.unsqueeze(1), xx[:, :-1]], dim=1)


def _mix(xx, shifted, time_mix):
    return xx * time_mix + shifted * (1 - time_mix)


class RWKV4(nn.Module):
    """An RWKV-4 language model. Build it with `load_model()` or `RWKV4(config)` (for training)."""

    def __init__(self, config: RWKVConfig):
        super().__init__()
        self.config = config
        self.emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(i, config.n_embd, config.ffn_dim) for i in range(config.n_layer))
        self.ln_out = nn.LayerNorm(config.n_embd, eps=LN_EPS)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.dtype_name = "fp32"
        self.fp16_rescale = False
        self.chunk_len = DEFAULT_CHUNK_LEN
        self.fingerprint = ""
        self.source_path: str | None = None
        from .wkv import wkv_reference, wkv_train_reference

        # Optional observer of internals (used by inspect.py): capture(layer, name, tensor [B, T, C]).
        self.capture: Callable[[int, str, torch.Tensor], None] | None = None
        self.wkv_impl = "reference"
        self.wkv_note = ""
        # CPU kernels for the one-token RNN step (kernels/rnn_cpu.cpp), when built: y = W x, and
        # the whole-model step with its weight list (made on first use; weights are read-only).
        self._matvec: Callable | None = None
        self._rnn_step: Callable | None = None
        self._step_weights: list[torch.Tensor] | None = None
        self._wkv_forward = wkv_reference
        self._wkv_train = wkv_train_reference

    # ---- description -------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.emb.weight.device

    def describe(self) -> dict:
        c = self.config
        return {
            "n_layer": c.n_layer,
            "n_embd": c.n_embd,
            "vocab_size": c.vocab_size,
            "ffn_dim": c.ffn_dim,
            "parameters": sum(p.numel() for p in self.parameters()),
            "dtype": self.dtype_name,
            "device": str(self.device),
            "wkv": self.wkv_impl,
            "fingerprint": self.fingerprint,
            "path": self.source_path,
        }

    def set_wkv(self, preference: str | None = None, progress: Callable[[str], None] | None = None) -> str:
        """Choose the WKV implementation: 'auto' (default; env RWKV_PLAYGROUND_WKV), 'reference',
        'cpu' or 'cuda'. Returns the one in use; a failed build falls back to the reference."""
        from .kernels import select_wkv

        choice = select_wkv(preference, self.device, progress=progress)
        self.wkv_impl, self._wkv_forward, self._wkv_train, self.wkv_note = choice
        self._matvec = self._rnn_step = self._step_weights = None
        if self.wkv_impl == "cpu":
            from .kernels import load_kernel

            kernel = load_kernel("cpu")
            self._matvec = getattr(kernel, "matvec", None)
            self._rnn_step = getattr(kernel, "rnn_step", None)
        return self.wkv_impl

    def _fused_step_weights(self) -> list[torch.Tensor]:
        """The weights in rnn_step's order (kernels/rnn_cpu.cpp: Global, then Slot per layer)."""
        if self._step_weights is None:
            vec = lambda t: t.detach().float().reshape(-1).contiguous()  # noqa: E731
            mat = lambda t: t.detach().contiguous()  # noqa: E731
            first = self.blocks[0].ln0
            weights = [vec(first.weight), vec(first.bias), vec(self.ln_out.weight), vec(self.ln_out.bias),
                       mat(self.head.weight)]
            for block in self.blocks:
                att, ffn = block.att, block.ffn
                weights += [vec(block.ln1.weight), vec(block.ln1.bias), vec(att.time_mix_k), vec(att.time_mix_v),
                            vec(att.time_mix_r), vec(-torch.exp(att.time_decay.float())), vec(att.time_first),
                            mat(att.key.weight), mat(att.value.weight), mat(att.receptance.weight),
                            mat(att.output.weight), vec(block.ln2.weight), vec(block.ln2.bias),
                            vec(ffn.time_mix_k), vec(ffn.time_mix_r), mat(ffn.key.weight),
                            mat(ffn.receptance.weight), mat(ffn.value.weight)]
            self._step_weights = weights
        return self._step_weights

    def _can_fuse_step(self, T: int, batched: bool, state: State) -> bool:
        """One token of one sequence on the CPU kernel, nothing observing the internals."""
        return (self._rnn_step is not None and T == 1 and not batched and self.capture is None
                and not self.fp16_rescale and self.head.weight.dtype in (torch.float32, torch.bfloat16)
                and all(t.is_contiguous() and t.dtype == torch.float32 for t in state.tensors().values()))

    def _linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x @ weight.T as float32. On CPU: one row goes through the streaming matvec kernel;
        many rows with bf16 weights are multiplied in fp32 with the weight upcast on the fly
        (PyTorch's bf16 GEMM runs at a fraction of its fp32 speed on CPUs without AVX512-BF16,
        and the upcast costs ~1/T of the product)."""
        if self._matvec is not None and x.shape[-1] == x.numel():
            return self._matvec(weight, x.reshape(-1)).reshape(*x.shape[:-1], weight.shape[0])
        if weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and x.numel() >= 16 * x.shape[-1]:
            return F.linear(x.float(), weight.float())
        return _linear(x, weight)

    # ---- state -------------------------------------------------------------------------------
    def new_state(self, batch: int | None = None) -> State:
        return State.zeros(self.config.n_layer, self.config.n_embd, batch, self.device, self.fingerprint)

    def check_state(self, state: State) -> None:
        c = self.config
        if (state.n_layer, state.n_embd) != (c.n_layer, c.n_embd):
            raise StateError(
                f"This state is for a model with {state.n_layer} layers x {state.n_embd} channels; "
                f"the loaded model has {c.n_layer} x {c.n_embd}."
            )
        if state.fingerprint and self.fingerprint and state.fingerprint != self.fingerprint:
            raise StateError("This state was produced by a different model (fingerprints differ).")

    # ---- inference ---------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, tokens, state: State | None = None, full_output: bool = False,
                chunk_len: int | None = None, inplace: bool = False):
        """Run tokens through the model. Returns (logits, new_state).

        tokens: list of ids / 1-D tensor (one sequence) or 2-D [B, T] tensor (a batch).
        logits: float32 [V] for the last token ([T, V] with full_output); [B, V] / [B, T, V] batched.
        The input state is left untouched unless inplace=True.
        """
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=self.device)
        batched = tokens.dim() == 2
        if not batched:
            tokens = tokens.reshape(1, -1)
        B, T = tokens.shape
        if T == 0:
            raise ValueError("forward() needs at least one token.")
        if int(tokens.min()) < 0 or int(tokens.max()) >= self.config.vocab_size:
            raise ValueError(f"Token ids must be in [0, {self.config.vocab_size}).")
        if state is None:
            state = self.new_state(B if batched else None)
        else:
            self.check_state(state)
            if state.is_batched != batched or (batched and state.batch_size != B):
                raise StateError("The state's batch size does not match the tokens' batch size.")
            if not inplace:
                state = state.clone()
            if state.device != self.device:
                state = state.to(self.device)
        if not state.fingerprint:
            state.fingerprint = self.fingerprint

        if self._can_fuse_step(T, batched, state):
            # Generation's hot path: one C++ call for every layer and the head, state in place.
            logits = self._rnn_step(self.emb.weight[tokens[0, 0]], self._fused_step_weights(), state.att_x,
                                    state.aa, state.bb, state.pp, state.ffn_x)
            if full_output:
                logits = logits.unsqueeze(0)
        else:
            # Internally always [B, L, C].
            s = {name: (t if batched else t.unsqueeze(0)) for name, t in state.tensors().items()}
            chunk_len = chunk_len or self.chunk_len
            outputs = []
            for start in range(0, T, chunk_len):
                chunk = tokens[:, start:start + chunk_len]
                outputs.append(self._forward_chunk(chunk, s, last_only=not full_output))
            logits = outputs[-1] if not full_output else torch.cat(outputs, dim=1)
            if not batched:
                logits = logits[0]
        if isinstance(state.token_count, list):
            state.token_count = [c + T for c in state.token_count]
        else:
            state.token_count += T
        return logits, state

    def _forward_chunk(self, tokens: torch.Tensor, s: dict, last_only: bool) -> torch.Tensor:
        x = self.emb.weight[tokens].float()  # [B, T, C]
        x = F.layer_norm(x, (x.shape[-1],), self.blocks[0].ln0.weight, self.blocks[0].ln0.bias, LN_EPS)
        last_layer = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            # The last layer's output feeds only the head: when only the last token's logits are
            # wanted, its attention output is needed for the last 2 tokens (the channel mix's token
            # shift reads the one before) and its channel mix for the last one. k, v still run on
            # every token: they make the WKV state. (~7 % of a 12-layer prompt's matmuls.)
            tail = 2 if last_only and i == last_layer and self.capture is None else None
            att = self._time_mix(i, block, x, s, tail)
            x = x[:, x.shape[1] - att.shape[1]:] + att
            ffn = self._channel_mix(i, block, x, s, 1 if tail else None)
            x = x[:, x.shape[1] - ffn.shape[1]:] + ffn
            if self.fp16_rescale and (i + 1) % FP16_RESCALE_EVERY == 0:
                x = x / 2
        if last_only:
            x = x[:, -1]  # [B, C]: only the last token needs the head
        x = F.layer_norm(x, (x.shape[-1],), self.ln_out.weight, self.ln_out.bias, LN_EPS)
        return self._linear(x, self.head.weight)

    def _time_mix(self, i: int, block: Block, x: torch.Tensor, s: dict, tail: int | None = None) -> torch.Tensor:
        """The attention's contribution to the residual stream ([B, T, C], or the last `tail`
        tokens only); advances the layer's att_x / aa / bb / pp state."""
        att = block.att
        xx = F.layer_norm(x, (x.shape[-1],), block.ln1.weight, block.ln1.bias, LN_EPS)
        shifted = _token_shift(xx, s["att_x"][:, i])
        s["att_x"][:, i] = xx[:, -1]
        # lerp(shifted, xx, m) = xx * m + shifted * (1 - m) in one pass (training keeps _mix)
        k = self._linear(torch.lerp(shifted, xx, att.time_mix_k), att.key.weight)
        v = self._linear(torch.lerp(shifted, xx, att.time_mix_v), att.value.weight)
        if tail is not None:
            xx, shifted = xx[:, -tail:], shifted[:, -tail:]
        r = torch.sigmoid_(self._linear(torch.lerp(shifted, xx, att.time_mix_r), att.receptance.weight))
        w = -torch.exp(att.time_decay.float())
        u = att.time_first.float()
        if k.shape[1] == 1:
            # RNN step: the reference formulas are already vectorised over channels.
            from .wkv import wkv_reference

            y, aa, bb, pp = wkv_reference(w, u, k, v, s["aa"][:, i], s["bb"][:, i], s["pp"][:, i])
        else:
            y, aa, bb, pp = self._wkv_forward(w, u, k, v, s["aa"][:, i], s["bb"][:, i], s["pp"][:, i])
        s["aa"][:, i], s["bb"][:, i], s["pp"][:, i] = aa, bb, pp
        if self.capture is not None:
            for name, value in (("att_x", xx), ("k", k), ("v", v), ("wkv", y)):
                self.capture(i, name, value)
        if tail is not None:
            y = y[:, -tail:]
        return self._linear(r.mul_(y), att.output.weight)

    def _channel_mix(self, i: int, block: Block, x: torch.Tensor, s: dict, tail: int | None = None) -> torch.Tensor:
        """The FFN's contribution to the residual stream (all tokens, or the last `tail`)."""
        ffn = block.ffn
        xx = F.layer_norm(x, (x.shape[-1],), block.ln2.weight, block.ln2.bias, LN_EPS)
        shifted = _token_shift(xx, s["ffn_x"][:, i])
        s["ffn_x"][:, i] = xx[:, -1]
        if self.capture is not None:
            self.capture(i, "ffn_x", xx)
        if tail is not None:
            xx, shifted = xx[:, -tail:], shifted[:, -tail:]
        k = torch.relu_(self._linear(torch.lerp(shifted, xx, ffn.time_mix_k), ffn.key.weight))
        k = k.mul_(k)  # relu(.)^2, in place: [T, 4C] is the largest activation
        r = torch.sigmoid_(self._linear(torch.lerp(shifted, xx, ffn.time_mix_r), ffn.receptance.weight))
        return r.mul_(self._linear(k, ffn.value.weight))

    # ---- training ----------------------------------------------------------------------------
    def forward_train(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] from an empty state, differentiable (used by train.py)."""
        x = self.blocks[0].ln0(self.emb(idx))
        B, T, C = x.shape
        zeros = x.new_zeros(B, C)
        for block in self.blocks:
            att, ffn = block.att, block.ffn
            xx = block.ln1(x)
            shifted = _token_shift(xx, zeros)
            k = att.key(_mix(xx, shifted, att.time_mix_k))
            v = att.value(_mix(xx, shifted, att.time_mix_v))
            r = torch.sigmoid(att.receptance(_mix(xx, shifted, att.time_mix_r)))
            y = self._wkv_train(-torch.exp(att.time_decay), att.time_first, k, v)
            x = x + att.output(r * y)
            xx = block.ln2(x)
            shifted = _token_shift(xx, zeros)
            kf = torch.square(torch.relu(ffn.key(_mix(xx, shifted, ffn.time_mix_k))))
            x = x + torch.sigmoid(ffn.receptance(_mix(xx, shifted, ffn.time_mix_r))) * ffn.value(kf)
        return self.head(self.ln_out(x))


# ---- loading ----------------------------------------------------------------------------------

def infer_config(tensors: dict[str, torch.Tensor]) -> RWKVConfig:
    if "emb.weight" not in tensors:
        raise LoadError("The checkpoint is missing key 'emb.weight'.")
    emb = tensors["emb.weight"]
    if emb.dim() != 2:
        raise LoadError(f"Key 'emb.weight' has shape {list(emb.shape)}, expected [vocab, n_embd].")
    vocab_size, n_embd = emb.shape
    layer_ids = {int(k.split(".")[1]) for k in tensors if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    if not layer_ids:
        raise LoadError("The checkpoint has no 'blocks.N.*' keys.")
    n_layer = max(layer_ids) + 1
    ffn_key = tensors.get("blocks.0.ffn.key.weight")
    if ffn_key is None:
        raise LoadError("The checkpoint is missing key 'blocks.0.ffn.key.weight'.")
    return RWKVConfig(n_layer=n_layer, n_embd=n_embd, vocab_size=vocab_size, ffn_dim=ffn_key.shape[0])


def _fingerprint(config: RWKVConfig, tensors: dict[str, torch.Tensor]) -> str:
    """A short id of the weights: shape plus a hash of the small per-channel tensors and one row
    of the embedding (cheap, yet differs between any two trained or random models)."""
    h = hashlib.sha256(repr(config).encode())
    for i in range(config.n_layer):
        for name in ("time_decay", "time_first"):
            h.update(tensors[f"blocks.{i}.att.{name}"].float().contiguous().numpy().tobytes())
    h.update(tensors["emb.weight"][:4].float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _resolve_device(device: str) -> torch.device:
    device = str(device)
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise LoadError("CUDA was requested but no NVIDIA GPU is available to PyTorch on this machine.")
    elif device != "cpu":
        raise LoadError(f"Unknown device '{device}': choose cpu or cuda.")
    return torch.device(device)


def load_model(path, device: str = "cpu", dtype: str = "fp32", wkv: str | None = None,
               chunk_len: int = DEFAULT_CHUNK_LEN,
               progress: Callable[[str, float], None] | None = None) -> RWKV4:
    """Load an RWKV-4 checkpoint (.pth or .safetensors) for inference.

    dtype: "fp32" | "bf16" | "fp16" for the large matrices (fp16 needs a GPU).
    wkv: "auto" (default; or env RWKV_PLAYGROUND_WKV) | "reference" | "cpu" | "cuda".
    progress: optional callback(message, fraction) for long loads.
    Raises LoadError with a one-sentence explanation on any problem.
    """
    report = progress or (lambda msg, frac: None)
    if dtype not in DTYPES:
        raise LoadError(f"Unknown dtype '{dtype}': choose fp32, bf16 or fp16.")
    dev = _resolve_device(device)
    if dtype == "fp16" and dev.type == "cpu":
        raise LoadError("fp16 is not supported on CPU (PyTorch's CPU LayerNorm lacks fp16): use fp32 or bf16.")
    t0 = time.perf_counter()
    report(f"Reading {os.path.basename(str(path))}", 0.0)
    raw = read_checkpoint(path)
    tensors = raw.tensors
    config = infer_config(tensors)
    expected = expected_shapes(config)
    for key, shape in expected.items():
        if key not in tensors:
            raise LoadError(f"The checkpoint is missing key '{key}'.")
        if tuple(tensors[key].shape) != shape:
            raise LoadError(f"Key '{key}' has shape {list(tensors[key].shape)}, expected {list(shape)}.")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise LoadError(f"The checkpoint has unexpected key '{unexpected[0]}' (not an RWKV-4 model?).")
    fingerprint = _fingerprint(config, tensors)

    with torch.device("meta"):
        model = RWKV4(config)
    target = DTYPES[dtype]
    converted = {}
    keys = list(expected)
    for n, key in enumerate(keys):
        t = tensors.pop(key)  # drop our reference as we go: peak memory stays near the final size
        is_matrix = t.dim() == 2
        want = target if is_matrix else torch.float32
        if dtype == "fp16" and is_matrix:
            layer = int(key.split(".")[1]) if key.startswith("blocks.") else -1
            if key.endswith(("att.output.weight", "ffn.value.weight")):
                # Pre-divide so fp16 activations stay in range; the forward halves x to match.
                t = t.float() / (2 ** (layer // FP16_RESCALE_EVERY))
        if t.dtype != want or t.device != dev:
            t = t.to(device=dev, dtype=want)
        converted[key] = t
        if n % 8 == 0:
            report(f"Converting weights ({n + 1}/{len(keys)})", (n + 1) / len(keys))
    model.load_state_dict(converted, assign=True, strict=True)
    del converted
    model.requires_grad_(False)
    model.eval()
    model.dtype_name = dtype
    model.fp16_rescale = dtype == "fp16"
    model.chunk_len = chunk_len
    model.fingerprint = fingerprint
    model.source_path = str(raw.path)
    report("Preparing the WKV kernel", 0.95)
    model.set_wkv(wkv, progress=lambda msg: report(msg, 0.97))
    report(f"Loaded in {time.perf_counter() - t0:.1f} s", 1.0)
    return model


def expected_shapes(config: RWKVConfig) -> dict[str, tuple]:
    C, F_, V = config.n_embd, config.ffn_dim, config.vocab_size
    shapes = {"emb.weight": (V, C), "blocks.0.ln0.weight": (C,), "blocks.0.ln0.bias": (C,)}
    for i in range(config.n_layer):
        p = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            shapes[p + ln + ".weight"] = (C,)
            shapes[p + ln + ".bias"] = (C,)
        shapes[p + "att.time_decay"] = (C,)
        shapes[p + "att.time_first"] = (C,)
        for m in ("k", "v", "r"):
            shapes[p + f"att.time_mix_{m}"] = (1, 1, C)
        for name in ("key", "value", "receptance", "output"):
            shapes[p + f"att.{name}.weight"] = (C, C)
        shapes[p + "ffn.time_mix_k"] = (1, 1, C)
        shapes[p + "ffn.time_mix_r"] = (1, 1, C)
        shapes[p + "ffn.key.weight"] = (F_, C)
        shapes[p + "ffn.receptance.weight"] = (C, C)
        shapes[p + "ffn.value.weight"] = (C, F_)
    shapes.update({"ln_out.weight": (C,), "ln_out.bias": (C,), "head.weight": (V, C)})
    return shapes


def init_random_weights(config: RWKVConfig, seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Random BlinkDL-format weights with realistic ranges (used by tests, benchmarks and as the
    starting point of training): time_decay spans about -5..3 across channels, time_first near
    log(0.3), time_mix in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    C, L = config.n_embd, config.n_layer
    out = {}
    for key, shape in expected_shapes(config).items():
        name = key.split(".")[-1] if not key.endswith(".weight") else key.split(".")[-2]
        layer = int(key.split(".")[1]) if key.startswith("blocks.") else 0
        if key.endswith("time_decay"):
            ratio = layer / max(1, L - 1)
            pos = torch.arange(C, dtype=torch.float32) / max(1, C - 1)
            t = -5 + 8 * pos ** (0.7 + 1.3 * ratio) + 0.3 * torch.randn(C, generator=g)
        elif key.endswith("time_first"):
            t = math.log(0.3) + 0.5 * torch.randn(C, generator=g)
        elif "time_mix" in key:
            t = torch.rand(shape, generator=g)
        elif ".ln" in key or key.startswith("ln_out"):
            t = torch.ones(shape) if key.endswith("weight") else torch.zeros(shape)
            t = t + 0.05 * torch.randn(shape, generator=g)
        elif key == "emb.weight":
            t = torch.randn(shape, generator=g) * 0.1
        else:
            fan_in = shape[1]
            t = torch.randn(shape, generator=g) / math.sqrt(fan_in)
            if name == "output" or (name == "value" and ".ffn." in key):
                t = t * 0.5
        out[key] = t.to(dtype)
    return out
