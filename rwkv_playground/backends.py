"""Which implementation runs each fast path, chosen separately and shown to the user.

Three choices, each "auto" by default:
  wkv      the WKV recurrence in prompts (and in steps the model's PyTorch forward runs):
           "reference" (PyTorch, wkv.py), "cpu" (kernels/wkv_cpu.cpp), "cuda" (kernels/wkv_cuda.cu)
  step     the one-token step of generation: "reference" (the model's PyTorch forward, with the
           chosen WKV) or "cpu" (kernels/rnn_cpu.cpp: every layer and the head in one call)
  sampler  top-p sampling: "reference" (numpy, sampling.py) or "cpu" (kernels/sampling_cpu.cpp)

"auto" takes the compiled kernel for the device when it builds, else the reference with one note
that names the cause; an explicit kernel choice that cannot run is a LoadError. Environment
defaults: RWKV_PLAYGROUND_WKV, RWKV_PLAYGROUND_STEP, RWKV_PLAYGROUND_SAMPLER.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from .errors import LoadError
from .kernels import load_kernel
from .wkv import WKVOperator, compiled_wkv, reference_wkv

log = logging.getLogger(__name__)

CHOICES = {
    "wkv": ("auto", "reference", "cpu", "cuda"),
    "step": ("auto", "reference", "cpu"),
    "sampler": ("auto", "reference", "cpu"),
}
ENV = {"wkv": "RWKV_PLAYGROUND_WKV", "step": "RWKV_PLAYGROUND_STEP", "sampler": "RWKV_PLAYGROUND_SAMPLER"}
_warned: set[str] = set()


@dataclass
class Backends:
    """What runs, once "auto" is resolved for a device and storage dtype."""
    wkv: WKVOperator
    step: str  # "cpu" or "reference"
    sampler: str  # "cpu" or "reference"
    cpu_kernels: object | None = None  # the compiled CPU module, when any choice uses it
    notes: list[str] = field(default_factory=list)  # why a kernel is not in use

    @property
    def sampler_kernel(self):
        return self.cpu_kernels if self.sampler == "cpu" else None

    def describe(self) -> dict:
        return {"wkv": self.wkv.name, "step": self.step, "sampler": self.sampler}


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
            sampler: str | None = None, progress: Callable[[str], None] | None = None) -> Backends:
    """Resolve the three choices for a model on `device` stored as `storage` (fp32/bf16/fp16/int8)."""
    device = torch.device(device)
    wanted = {kind: _preference(kind, value) for kind, value in (("wkv", wkv), ("step", step), ("sampler", sampler))}
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

    # WKV: the kernel of the model's device
    wkv_op = reference_wkv
    if wanted["wkv"] != "reference":
        kind = device.type if wanted["wkv"] == "auto" else wanted["wkv"]
        if kind != device.type:
            raise LoadError(f"The '{kind}' WKV kernel cannot run a model on {device.type}.")
        module = kernel(kind, "the WKV operator", forced=wanted["wkv"] != "auto")
        if module is not None:
            wkv_op = compiled_wkv(module, kind)

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

    return Backends(wkv=wkv_op, step=step_choice, sampler=sampler_choice, cpu_kernels=modules.get("cpu"),
                    notes=notes)
