"""The runtime: a model (any architecture of `models/`) placed for inference, and everything
about *how* it runs.

The model (models/rwkv4.py ... rwkv7.py) is parameters and math. The runtime owns: the device; the storage dtype of
the matrices (fp32 / bf16 / fp16 / int8, via `StoredLinear`); the backend of each fast path
(backends.py); prompts read in chunks of `chunk_len` tokens (constant memory for any length); the
fused one-token step for one or many sequences; and observation of the internals, which is an
argument of the call (what the inspector records), never a hook left on the shared model.

    runtime = load_runtime("assets/rwkv4-demo-shakespeare.pth", dtype="bf16")
    logits, state = runtime.forward(tokens)                  # [V], State
    logits = runtime.step([token_a, token_b], [state_a, state_b])  # [2, V]; states advance in place
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import backends as backends_mod
from .errors import LoadError, StateError
from .models import MissingKey, by_name, identify
from .models.checkpoint import read_checkpoint, release_file_pages
from .models.common import FP16_RESCALE_EVERY, NO_EDITS, Edits
from .quantization import quantize_rows
from .state import State

# storage of the matrices; int8 keeps the embedding in bf16 (one row is read per token)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8}
# tokens per pass in a prompt: larger GEMMs run closer to peak, and [T, 4C] fp32 stays small
DEFAULT_CHUNK_LEN = 512

# observe(layer, name, tensor [B, T_chunk, ...]): called per chunk, chunks in order
Observer = Callable[[int, str, torch.Tensor], None]


class StoredLinear(nn.Module):
    """A Linear layer's weight [N, K] as inference stores it, computing x @ W^T in float32.

    Storage: fp32; bf16; int8 with one float32 scale per row (`weight_scale`, quantization.py);
    fp16 (GPU storage, multiplies fp16 activations; also runs on the CPU, slowly).
    On the CPU a product of a few rows (< MATVEC_MAX_ROWS: a prompt's last layer) runs the C++
    streaming matvec on the stored weights when the runtime set `matvec`. A product of more rows
    is a GEMM, in one of two forms the runtime chooses per CPU (backends.py, "gemm"):
      upcast  the weights are converted to float32 block by block (int8: dequantized) and
              multiply float32 activations: exact, and the fast form on CPUs without bf16 units;
      native  PyTorch's bf16 GEMM (AMX / AVX512-BF16 through oneDNN): activations rounded to
              bf16, int8 blocks dequantized to bf16; several times faster where the units exist.
    """

    def __init__(self, out_features: int, in_features: int, storage: torch.dtype, device="meta"):
        super().__init__()
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=storage, device=device))
        if storage == torch.int8:
            self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32, device=device))
        else:
            self.weight_scale = None
        self.native_bf16 = False
        self.matvec = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, scale = self.weight, self.weight_scale
        rows = x.numel() // w.shape[1]
        on_cpu = w.device.type == "cpu"
        if self.matvec is not None and rows < MATVEC_MAX_ROWS and on_cpu and w.dtype != torch.float16:
            y = self.matvec(w, x.reshape(rows, -1).float(), scale, "auto")
            return y.reshape(*x.shape[:-1], w.shape[0])
        if w.dtype == torch.float32:
            return F.linear(x.float(), w)
        if on_cpu and self.native_bf16 and rows >= MATVEC_MAX_ROWS:
            if scale is None:
                return F.linear(x.to(torch.bfloat16), w).float()
            return upcast_linear(x.to(torch.bfloat16), w, scale).float()
        if w.dtype == torch.bfloat16 and on_cpu or scale is not None:
            return upcast_linear(x.float(), w, scale)
        return F.linear(x.to(w.dtype), w).float()


# Below this many rows a product reads the weights (matvec); from it on it is a GEMM.
MATVEC_MAX_ROWS = 16


# A product that converts its weight does so this many values at a time (64 MB in fp32): a
# 50k-row head, or a 14B model's FFN, never gets a whole converted copy.
UPCAST_BLOCK_FLOATS = 16 << 20


def upcast_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x @ (weight * scale[:, None]).T in x's dtype, the weight converted block of rows by block."""
    rows = max(1, UPCAST_BLOCK_FLOATS // weight.shape[1])

    def block(start: int) -> torch.Tensor:
        w = weight[start:start + rows]
        if scale is None:
            return w.to(x.dtype)
        return w.float().mul_(scale[start:start + rows, None]).to(x.dtype)

    if weight.shape[0] <= rows:
        return F.linear(x, block(0))
    out = x.new_empty(*x.shape[:-1], weight.shape[0])
    for start in range(0, weight.shape[0], rows):
        out[..., start:start + rows] = F.linear(x, block(start))
    return out


def infer_config(tensors: dict[str, torch.Tensor], filename: str = "the checkpoint"):
    """(architecture, config) of a checkpoint: the architecture from its key names, every
    dimension from its tensors' shapes."""
    arch = identify(tensors, filename)
    try:
        return arch, arch.config_from(tensors)
    except MissingKey as exc:
        raise LoadError(f"The checkpoint is missing key '{exc.key}' (an {arch.title} checkpoint has it).") from None


def check_tensors(arch, config, tensors: dict[str, torch.Tensor]) -> None:
    """Every expected key with its shape and a floating dtype, nothing else."""
    expected = arch.expected_shapes(config)
    for key, shape in expected.items():
        if key not in tensors:
            raise LoadError(f"The checkpoint is missing key '{key}' (an {arch.title} checkpoint has it).")
        t = tensors[key]
        if tuple(t.shape) != shape:
            raise LoadError(f"Key '{key}' has shape {list(t.shape)}, expected {list(shape)}.")
        if not t.is_floating_point():
            raise LoadError(f"Key '{key}' holds {str(t.dtype).replace('torch.', '')} values; an {arch.title} "
                            "checkpoint stores floating-point weights.")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise LoadError(f"The checkpoint has unexpected key '{unexpected[0]}' (not a plain {arch.title} model?).")


def fingerprint_of(arch, config, tensors: dict[str, torch.Tensor]) -> str:
    """A short id of the weights: architecture and shape plus a hash of small per-layer tensors
    and one row of the embedding (cheap, yet differs between any two trained or random models)."""
    h = hashlib.sha256(repr(config).encode())
    for i in range(config.n_layer):
        for name in arch.fingerprint_keys:
            h.update(tensors[f"blocks.{i}.{name}"].float().contiguous().numpy().tobytes())
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


class Runtime:
    """A model ready for inference. Build it with `load_runtime`."""

    def __init__(self, model: torch.nn.Module, *, device: torch.device, dtype: str, backends: backends_mod.Backends,
                 chunk_len: int, fingerprint: str, source_path: str | None, architecture: str | None = None):
        self.model = model
        self.layout = model.state_layout()
        self.architecture = by_name(architecture or self.layout.architecture)
        self.device = device
        self.dtype = dtype
        self.backends = backends
        self.chunk_len = chunk_len
        self.fingerprint = fingerprint
        self.source_path = source_path
        self._step_weights = None
        for module in model.modules():
            if isinstance(module, StoredLinear):
                module.native_bf16 = backends.gemm == "native"
        if backends.step == "cpu":
            for module in model.modules():  # few-row products (a prompt's last layer) read, not convert
                if isinstance(module, StoredLinear):
                    module.matvec = backends.cpu_kernels.matvec
            # the fused step reads the weights by their checkpoint names (validated once here)
            self._step_weights = model.fused_step(backends.cpu_kernels)

    # ---- description -----------------------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def sampler_kernel(self):
        return self.backends.sampler_kernel

    def describe(self) -> dict:
        c = self.config
        step = self.backends.step
        if self._step_weights is not None:
            step += f" ({self._step_weights.isa})"
        info = self.architecture.describe(c)
        info.update({
            "n_layer": c.n_layer, "n_embd": c.n_embd, "vocab_size": c.vocab_size, "ffn_dim": c.ffn_dim,
            "parameters": c.n_params, "state_bytes": self.layout.nbytes(), "dtype": self.dtype, "device": str(self.device),
            "wkv": self.backends.recurrence(self.architecture.recurrence).name, "step": step, "sampler": self.backends.sampler,
            "simd": self.backends.simd, "gemm": self.backends.gemm, "gemm_reason": self.backends.gemm_reason,
            "notes": list(self.backends.notes), "chunk_len": self.chunk_len,
            "fingerprint": self.fingerprint, "path": self.source_path,
        })
        return info

    # ---- state -------------------------------------------------------------------------------------
    def new_state(self, batch: int | None = None) -> State:
        return State.empty(self.layout, batch, self.device, self.fingerprint)

    def check_state(self, state: State) -> None:
        """Refuse a state of another architecture, shape or model (one sentence); a state whose
        architecture is not named (a file from before RWKV-5) takes this model's once it fits."""
        c = self.config
        if state.architecture and state.architecture != self.layout.architecture:
            theirs = by_name(state.architecture).title if state.architecture.startswith("rwkv") else "another model"
            raise StateError(f"This state is from an {theirs} model; the loaded model is {self.architecture.title} "
                             "(a state only fits the architecture that made it).")
        expected = {name: (c.n_layer,) + shape for name, shape, _ in self.layout.parts}
        if state.shapes() != expected:
            raise StateError(
                f"This state is for a model with {state.n_layer} layers x {state.n_embd} channels; "
                f"the loaded model has {c.n_layer} x {c.n_embd}."
            )
        if state.fingerprint and self.fingerprint and state.fingerprint != self.fingerprint:
            raise StateError("This state was produced by a different model (fingerprints differ).")
        if not state.architecture:
            state.architecture = self.layout.architecture

    # ---- inference ---------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, tokens, state: State | None = None, full_output: bool = False, chunk_len: int | None = None,
                inplace: bool = False, observe: Observer | None = None, edits: Edits | None = None):
        """Run tokens through the model. Returns (logits, new_state).

        tokens: list of ids / 1-D tensor (one sequence) or 2-D [B, T] tensor (a batch).
        logits: float32 [V] for the last token ([T, V] with full_output); [B, V] / [B, T, V] batched.
        The input state is left untouched unless inplace=True. observe(layer, name, tensor) sees
        the internals chunk by chunk (the fused step never runs then). edits (models.common.Edits,
        decays built from `architecture.decay_rows` and `decay_value`): an experiment's changes for this call, the
        model's parameters untouched: per-row decays of some layers, and first_layers [B] (a batch):
        row b reads exactly as row 0 below layer first_layers[b] (the same tokens, the same state
        and decay there: checked), so those layers are computed once (an experiment's rows that
        edit one layer; the results are the same).
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
        state = self._prepare_state(state, B if batched else None, inplace)

        edits = edits or NO_EDITS
        if edits.first_layers is not None:
            self._check_first_layers(edits.first_layers, tokens, state, edits.decay, batched, observe)
        if T == 1 and observe is None and not edits.decay:
            rows = state.unbind_views() if batched else [state]
            logits = self.step(tokens[:, 0].tolist(), rows)
            logits = logits.unsqueeze(1) if full_output else logits
            if not batched:
                logits = logits[0]
            if batched:
                state.token_count = [c + 1 for c in state.token_count]
            return logits, state

        work = state if batched else state.as_batch()
        chunk_len = chunk_len or self.chunk_len
        wkv = self.backends.recurrence(self.architecture.recurrence)
        outputs = []
        for start in range(0, T, chunk_len):
            chunk = tokens[:, start:start + chunk_len]
            logits, new = self.model(chunk, work, wkv=wkv, last_only=not full_output and observe is None,
                                     observe=observe, edits=edits)
            work.assign(new)
            outputs.append(logits)
        logits = torch.cat(outputs, dim=1) if full_output else outputs[-1]
        if not batched:
            logits = logits[0]  # (work is a view of state: state has the new values already)
        state.token_count = [c + T for c in state.token_count] if batched else state.token_count + T
        return logits, state

    def _check_first_layers(self, first_layers, tokens, state: State, edits: dict, batched: bool, observe) -> None:
        """What forward's first_layers promises: below its first layer a row is row 0."""
        L = self.config.n_layer
        if not batched or len(first_layers) != tokens.shape[0] or observe is not None:
            raise ValueError("first_layers takes one layer per row of a batch, and no observer.")
        if int(first_layers[0]) != 0 or not all(0 <= int(f) < L for f in first_layers):
            raise ValueError(f"first_layers: row 0's is 0 and each is a layer (0 to {L - 1}).")
        for b, first in enumerate(int(f) for f in first_layers):
            if first == 0:
                continue
            if not torch.equal(tokens[b], tokens[0]):
                raise ValueError(f"Row {b} reads other tokens than row 0: it cannot share row 0's layers.")
            for name, t in state.tensors().items():
                if not torch.equal(t[b, :first], t[0, :first]):
                    raise ValueError(f"Row {b}'s {name} differs from row 0's below layer {first}.")
            for layer, edit in edits.items():
                if layer < first and not torch.equal(edit[b].nan_to_num(-1.0), edit[0].nan_to_num(-1.0)):
                    raise ValueError(f"Row {b}'s decay at layer {layer} differs from row 0's.")

    @torch.no_grad()
    def step(self, tokens: Sequence[int], states: Sequence[State]) -> torch.Tensor:
        """One token for each of B sequences (their single-sequence states advance in place).
        Returns logits [B, V] float32. Row b does not depend on the other rows: the fused step
        accumulates every row in one fixed order, and the PyTorch path runs rows one at a time."""
        if len(tokens) != len(states):
            raise ValueError("step() needs one state per token.")
        for s in states:
            self.check_state(s)
        if self._step_weights is not None and self.device.type == "cpu":
            logits = self._step_weights.step(torch.tensor(list(tokens), dtype=torch.long),
                                             *([getattr(s, name) for s in states] for name in self.layout.names))
        else:  # one row at a time: a row's arithmetic never depends on the batch
            wkv = self.backends.recurrence(self.architecture.recurrence)
            rows = []
            for token, s in zip(tokens, states):
                work = s.as_batch()
                out, new = self.model(torch.tensor([[token]], device=self.device), work, wkv=wkv, last_only=True)
                s.assign(new.single())
                rows.append(out[0])
            logits = torch.stack(rows) if rows else torch.empty(0, self.config.vocab_size)
        for s in states:
            s.token_count += 1
        return logits

    def _prepare_state(self, state: State | None, batch: int | None, inplace: bool) -> State:
        if state is None:
            return self.new_state(batch)
        self.check_state(state)
        if state.is_batched != (batch is not None) or (batch is not None and state.batch_size != batch):
            raise StateError("The state's batch size does not match the tokens' batch size.")
        if not inplace:
            state = state.clone()
        if state.device != self.device:
            state = state.to(self.device)  # (inplace on another device cannot be honoured)
        if not state.fingerprint:
            state.fingerprint = self.fingerprint
        return state


def load_runtime(path, device: str = "cpu", dtype: str = "fp32", wkv: str | None = None, step: str | None = None,
                 sampler: str | None = None, gemm: str | None = None, chunk_len: int = DEFAULT_CHUNK_LEN,
                 progress: Callable[[str, float], None] | None = None) -> Runtime:
    """Load an RWKV-4, 5, 6 or 7 checkpoint (.pth or .safetensors) for inference.

    dtype: "fp32" | "bf16" | "int8" | "fp16" for the matrices (the residual stream, LayerNorms,
    token shift and the WKV state are float32 in every case). int8 quantizes each matrix at load
    (one scale per row), one tensor at a time; its embedding is stored in bf16.
    wkv / step / sampler / gemm: each fast path's backend (see backends.py); default "auto".
    progress: optional callback(message, fraction) for long loads.
    Raises LoadError with a one-sentence explanation on any problem.
    """
    report = progress or (lambda msg, frac: None)
    if dtype not in DTYPES:
        raise LoadError(f"Unknown dtype '{dtype}': choose fp32, bf16, int8 or fp16.")
    dev = _resolve_device(device)
    t0 = time.perf_counter()
    report(f"Reading {os.path.basename(str(path))}", 0.0)
    raw = read_checkpoint(path)
    tensors = raw.tensors
    arch, config = infer_config(tensors, raw.path.name)
    check_tensors(arch, config, tensors)
    fingerprint = fingerprint_of(arch, config, tensors)

    with torch.device("meta"):
        model = arch.build(config)
    storage = DTYPES[dtype]
    _store_linears(model, storage)
    # The matrices of the Linear layers (and the embedding) take the storage dtype; everything
    # else (lerps, decays, LoRAs, norms: small) is float32.
    stored = {name + ".weight" for name, m in model.named_modules() if isinstance(m, StoredLinear)} | {"emb.weight"}
    rescale = dtype == "fp16" and arch.fp16_rescale
    converted = {}
    keys = list(arch.expected_shapes(config))
    every = max(1, len(keys) // 10)
    for n, key in enumerate(keys):
        original = t = tensors.pop(key)  # drop our reference as we go: peak memory stays near the final size
        is_matrix = key in stored
        if not is_matrix and not bool(torch.isfinite(t).all()):
            raise LoadError(f"Key '{key}' holds NaN or infinite values: the checkpoint is corrupt.")
        if arch.lora_suffixes and key.endswith(arch.lora_suffixes):
            # [in, out] as a transposed view of [out, in] memory: the fused step reads rows
            t = t.to(device=dev, dtype=torch.float32).mT.contiguous().mT
        if rescale and key.endswith(("att.output.weight", "ffn.value.weight")):
            # Pre-divide so fp16 activations stay in range; the forward halves x to match.
            t = t.float() / (2 ** (int(key.split(".")[1]) // FP16_RESCALE_EVERY))
        if dtype == "int8" and is_matrix and key != "emb.weight":
            q, scale = quantize_rows(t, release=release_file_pages)
            if not bool(torch.isfinite(scale).all()):
                raise LoadError(f"Key '{key}' holds NaN or infinite values: the checkpoint is corrupt.")
            converted[key], converted[key + "_scale"] = q.to(dev), scale.to(dev)
        else:
            want = (torch.bfloat16 if storage == torch.int8 else storage) if is_matrix else torch.float32
            converted[key] = t.to(device=dev, dtype=want)
        if converted[key] is not original:
            release_file_pages(original)  # the mmap'd original is read once: let its pages go
        del t, original
        if (n + 1) % every == 0 or n + 1 == len(keys):  # about ten lines, the fraction only ever growing
            report(f"Converting weights ({n + 1}/{len(keys)})", 0.9 * (n + 1) / len(keys))
    model.load_state_dict(converted, assign=True, strict=True)
    del converted
    model.requires_grad_(False)
    model.eval()
    model.rescale_every = FP16_RESCALE_EVERY if rescale else 0

    report("Preparing the kernels", 0.95)
    chosen = backends_mod.resolve(dev, dtype, wkv=wkv, step=step, sampler=sampler, gemm=gemm,
                                  progress=lambda msg: report(msg, 0.97))
    runtime = Runtime(model, device=dev, dtype=dtype, backends=chosen, chunk_len=chunk_len,
                      fingerprint=fingerprint, source_path=str(raw.path), architecture=arch.name)
    # One probe token: a corrupt matrix (NaN, inf) or an fp16 overflow shows here, not at a sampler.
    probe, _ = runtime.forward([0])
    if not bool(torch.isfinite(probe).all()):
        raise LoadError(f"{raw.path.name} produces NaN or infinite logits ("
                        + ("fp16 overflows on this model: use bf16 or fp32" if dtype == "fp16"
                           else "its weights are corrupt") + ").")
    report(f"Loaded in {time.perf_counter() - t0:.1f} s", 1.0)
    return runtime


def _store_linears(model: torch.nn.Module, storage: torch.dtype) -> None:
    """Swap every nn.Linear for an (empty, meta) StoredLinear of the storage dtype, to be loaded."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, StoredLinear(child.out_features, child.in_features, storage))
