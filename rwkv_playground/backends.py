"""Which implementation runs each fast path, chosen separately and shown to the user.

Four choices, each "auto" by default:
  wkv      the WKV recurrence in prompts (and in steps the model's PyTorch forward runs):
           "reference" (PyTorch, wkv.py), "cpu" (kernels/wkv_cpu.cpp), "cuda" (kernels/wkv_cuda.cu)
  step     the one-token step of generation: "reference" (the model's PyTorch forward, with the
           chosen WKV) or "cpu" (kernels/step_rwkv*.cpp: every layer and the head in one call)
  sampler  top-p sampling: "reference" (numpy, sampling.py) or "cpu" (kernels/sampling_cpu.cpp)
  gemm     prompt products of bf16 / int8 weights on the CPU (runtime.StoredLinear): "upcast"
           (to float32, exact) or "native" (PyTorch's bf16 GEMM: AMX / AVX512-BF16 via oneDNN)

"auto" takes the compiled kernel for the device when it builds, else the reference with one note
that names the cause; an explicit kernel choice that cannot run is a LoadError. The SIMD code in
the kernels is chosen by cpuid at run time (AVX-512, AVX2, scalar). "auto" for gemm is "native"
only where the CPU has bf16 units (cpuid) *and* a one-time measurement on this machine shows it
faster; the measurement is cached beside the compiled kernels. Environment defaults:
RWKV_PLAYGROUND_WKV, RWKV_PLAYGROUND_STEP, RWKV_PLAYGROUND_SAMPLER, RWKV_PLAYGROUND_GEMM.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .errors import LoadError
from .kernels import kernel_cache_dir, load_kernel
from .wkv import MatrixWKV, WKVOperator, compiled_matrix_wkv, compiled_wkv, reference_matrix_wkv, reference_wkv

log = logging.getLogger(__name__)

CHOICES = {
    "wkv": ("auto", "reference", "cpu", "cuda"),
    "step": ("auto", "reference", "cpu"),
    "sampler": ("auto", "reference", "cpu"),
    "gemm": ("auto", "upcast", "native"),
}
ENV = {"wkv": "RWKV_PLAYGROUND_WKV", "step": "RWKV_PLAYGROUND_STEP", "sampler": "RWKV_PLAYGROUND_SAMPLER",
       "gemm": "RWKV_PLAYGROUND_GEMM"}
BF16_UNITS = ("amx_bf16", "avx512_bf16")  # cpuid features that make a native bf16 GEMM worth measuring
NATIVE_GEMM_MIN_SPEEDUP = 1.25  # "auto" picks native only when clearly faster (the upcast is exact)
_warned: set[str] = set()


@dataclass
class Backends:
    """What runs, once "auto" is resolved for a device and storage dtype."""
    wkv: WKVOperator
    step: str  # "cpu" or "reference"
    sampler: str  # "cpu" or "reference"
    cpu_kernels: object | None = None  # the compiled CPU module, when any choice uses it
    notes: list[str] = field(default_factory=list)  # why a kernel is not in use
    gemm: str = "fp32"  # "native" / "upcast" (bf16 and int8 weights on the CPU), else the storage's own
    gemm_reason: str = ""  # what decided it, shown in the model panel
    matrix_wkv: MatrixWKV = reference_matrix_wkv  # the RWKV-5/6/7 recurrences

    def recurrence(self, kind: str):
        """The operator a model's forward takes: "wkv4" (RWKV-4) or "matrix" (RWKV-5/6/7)."""
        return self.wkv if kind == "wkv4" else self.matrix_wkv

    @property
    def sampler_kernel(self):
        return self.cpu_kernels if self.sampler == "cpu" else None

    @property
    def simd(self) -> str:
        """The instruction set the kernels' SIMD code runs ("avx512", "avx2", "scalar")."""
        return self.cpu_kernels.available_isas()[0] if self.cpu_kernels is not None else "none"

    def describe(self) -> dict:
        return {"wkv": self.wkv.name, "step": self.step, "sampler": self.sampler, "gemm": self.gemm}


def _preference(kind: str, value: str | None) -> str:
    choice = (value or os.environ.get(ENV[kind]) or "auto").strip().lower()
    if choice not in CHOICES[kind]:
        raise LoadError(f"Unknown {kind} implementation '{choice}': choose one of {', '.join(CHOICES[kind])}.")
    return choice


def _fallback(note: str) -> None:
    if note not in _warned:  # once per process: a model switch does not repeat it
        _warned.add(note)
        warnings.warn(note, RuntimeWarning, stacklevel=3)
        log.warning(note)


def resolve(device: torch.device, storage: str, wkv: str | None = None, step: str | None = None,
            sampler: str | None = None, gemm: str | None = None,
            progress: Callable[[str], None] | None = None) -> Backends:
    """Resolve the four choices for a model on `device` stored as `storage` (fp32/bf16/fp16/int8).
    Every choice serves every architecture: the kernels hold RWKV-4's operator and the RWKV-5/6/7
    recurrences, and the fused step runs all four (`model.fused_step`)."""
    device = torch.device(device)
    wanted = {kind: _preference(kind, value)
              for kind, value in (("wkv", wkv), ("step", step), ("sampler", sampler), ("gemm", gemm))}
    notes: list[str] = []
    modules: dict[str, object | None] = {}

    def kernel(kind: str, purpose: str, forced: bool):
        """The compiled module `kind`, or None with a note (auto) / a LoadError (forced)."""
        if kind not in modules:
            try:
                modules[kind] = load_kernel(kind, progress)
            except RuntimeError as exc:
                modules[kind] = None
                modules[kind + ":why"] = str(exc)
        if modules[kind] is None:
            note = (f"The {kind.upper()} kernels are unavailable ({modules[kind + ':why']}); "
                    f"{purpose} uses the slower reference.")
            if forced:
                raise LoadError(note)
            notes.append(note)
            _fallback(note)
        return modules[kind]

    # WKV: the kernel of the model's device (RWKV-4's, or RWKV-5/6/7's matrix recurrences)
    wkv_op, matrix_op = reference_wkv, reference_matrix_wkv
    if wanted["wkv"] != "reference":
        kind = device.type if wanted["wkv"] == "auto" else wanted["wkv"]
        if kind != device.type:
            raise LoadError(f"The '{kind}' WKV kernel cannot run a model on {device.type}.")
        module = kernel(kind, "the WKV operator", forced=wanted["wkv"] != "auto")
        if module is not None:
            wkv_op, matrix_op = compiled_wkv(module, kind), compiled_matrix_wkv(module, kind)

    # step: the fused C++ step runs fp32 / bf16 / int8 models on the CPU
    step_choice = "reference"
    if wanted["step"] == "cpu" or (wanted["step"] == "auto" and device.type == "cpu" and storage != "fp16"):
        if device.type != "cpu":
            raise LoadError("The C++ one-token step runs models on the CPU only.")
        if storage == "fp16":
            raise LoadError("The C++ one-token step reads fp32, bf16 or int8 weights, not fp16.")
        if kernel("cpu", "the one-token step", forced=wanted["step"] == "cpu") is not None:
            step_choice = "cpu"

    # sampler: runs on the CPU whatever the model's device
    sampler_choice = "reference"
    if wanted["sampler"] != "reference":
        if kernel("cpu", "sampling", forced=wanted["sampler"] == "cpu") is not None:
            sampler_choice = "cpu"

    # gemm: how prompts multiply bf16 / int8 weights on the CPU
    gemm_choice, gemm_reason = storage, ""
    if device.type == "cpu" and storage in ("bf16", "int8"):
        if wanted["gemm"] != "auto":
            gemm_choice, gemm_reason = wanted["gemm"], "chosen"
        else:
            module = modules.get("cpu") if "cpu" in modules else kernel("cpu", "the GEMM choice", forced=False)
            features = list(module.cpu_features()) if module is not None else []
            gemm_choice, gemm_reason = choose_gemm(features, lambda: measured_native_speedup(progress))
    return Backends(wkv=wkv_op, step=step_choice, sampler=sampler_choice, cpu_kernels=modules.get("cpu"),
                    notes=notes, gemm=gemm_choice, gemm_reason=gemm_reason, matrix_wkv=matrix_op)


def choose_gemm(features: list[str], speedup: Callable[[], float]) -> tuple[str, str]:
    """("native" | "upcast", why): by cpuid first; where the CPU has bf16 units, by measurement."""
    units = [f for f in BF16_UNITS if f in features]
    if not units:
        return "upcast", "no AMX / AVX512-BF16 on this CPU"
    ratio = speedup()
    name = units[0].replace("_bf16", "").upper().replace("AVX512", "AVX512-BF16")
    if ratio >= NATIVE_GEMM_MIN_SPEEDUP:
        return "native", f"{name}: measured {ratio:.1f}x the fp32 upcast"
    return "upcast", f"{name} present but measured only {ratio:.2f}x the fp32 upcast"


def measured_native_speedup(progress: Callable[[str], None] | None = None) -> float:
    """How much faster a bf16 GEMM runs natively than through the fp32 upcast, at a prompt chunk's
    shape (512 tokens x 1024 x 1024). Measured once per machine, cached beside the CPU kernels."""
    cache = kernel_cache_dir("cpu") / "gemm_speedup.json"
    try:
        return float(json.loads(cache.read_text())["native_over_upcast"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if progress:
        progress("Measuring this CPU's bf16 GEMM (once)")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 1024, generator=g)
    w = torch.randn(1024, 1024, generator=g).to(torch.bfloat16)

    def best(fn) -> float:
        fn()  # (the first call JIT-compiles oneDNN's kernel)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    ratio = best(lambda: F.linear(x, w.float())) / best(lambda: F.linear(x.to(torch.bfloat16), w))
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"native_over_upcast": ratio, "shape": [512, 1024, 1024],
                                     "torch": torch.__version__, "threads": torch.get_num_threads()}))
    except OSError:
        pass
    return ratio
