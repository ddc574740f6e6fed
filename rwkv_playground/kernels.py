"""Building and loading the compiled extensions (kernels/) at first use.

Two extensions: "cpu" (kernels/cpu_bindings.cpp: the WKV operator, the one-token RNN step with its
matvecs, the top-p sampler) and "cuda" (kernels/wkv_cuda.cpp + .cu: the WKV operator on NVIDIA
GPUs). Each is compiled with `torch.utils.cpp_extension` + ninja into a cache folder keyed by the
sources' hash, the torch version and the CPU / GPU architecture; later starts import the cached
library directly, without a compiler. A failed build never stops the app: `backends.py` falls back
to the PyTorch / numpy references with one note that names the cause.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import torch


KERNEL_DIR = Path(__file__).resolve().parent.parent / "kernels"
ENV_CACHE = "RWKV_PLAYGROUND_CACHE"

_SOURCES = {
    "cpu": ["cpu_bindings.cpp", "wkv_cpu.cpp", "wkv_matrix_cpu.cpp", "matvec_cpu.cpp", "steps_cpu.cpp",
            "sampling_cpu.cpp"],
    "cuda": ["wkv_cuda.cpp", "wkv_cuda.cu", "wkv_matrix_cuda.cu"],
}
# included by the sources: part of the cache key
_HEADERS = {"cpu": ["wkv_step.h", "rnn_cpu.h", "step_common.h", "matrix_step.h", "matvec_block.inc",
                    "step_rwkv4.cpp", "matrix_step.cpp", "step_rwkv5.cpp", "step_rwkv6.cpp", "step_rwkv7.cpp"], "cuda": ["wkv_step.h", "cuda_launch.h", "cuda_dtype.h"]}
_lock = threading.Lock()
_loaded: dict[str, object] = {}
_failed: dict[str, str] = {}


def cache_root() -> Path:
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rwkv_playground" / "kernels"


def _cpu_signature() -> str:
    # -march=native code must not be reused on another CPU: key the cache on the CPU's flags.
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = line
                    break
    except OSError:
        pass
    return platform.machine() + hashlib.sha256(flags.encode()).hexdigest()[:8]


def build_key(kind: str) -> str:
    h = hashlib.sha256()
    for name in _SOURCES[kind] + _HEADERS[kind]:
        h.update((KERNEL_DIR / name).read_bytes())
    h.update(torch.__version__.encode())
    h.update(sys.version.split()[0].encode())
    if kind == "cuda":
        h.update(str(torch.version.cuda).encode())
        if torch.cuda.is_available():
            h.update(str(torch.cuda.get_device_capability()).encode())
    else:
        h.update(_cpu_signature().encode())
    return h.hexdigest()[:16]


CUDA_FLAGS = ["-O3", "-Xptxas", "-O3", "-res-usage"]


def _compile_flags(kind: str) -> dict:
    if kind == "cpu":
        # -ffp-contract=off: a dot product's rounding must not depend on where the compiler inlined it
        # (the batched step's rows equal the one-sequence step's bit for bit)
        cflags = ["-O3", "-fopenmp", "-fno-math-errno", "-ffp-contract=off"]
        if platform.machine() in ("x86_64", "AMD64"):
            cflags.append("-march=native")
        return {"extra_cflags": cflags, "extra_ldflags": ["-fopenmp"]}
    return {
        "extra_cflags": ["-O3"],
        # (no register cap: the matrix kernels keep an N-float state row in registers; each kernel's
        # __launch_bounds__ sets its budget, and tools/check_cuda_build.py fails on any spill)
        "extra_cuda_cflags": CUDA_FLAGS,
    }


def _why_unbuildable(kind: str) -> str | None:
    if shutil.which("ninja") is None:
        try:
            import ninja  # noqa: F401  (the PyPI package puts a ninja binary on PATH)
        except ImportError:
            return "ninja is not installed (pip install ninja)"
    if shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None:
        return "no C++ compiler was found (install g++ or clang)"
    if kind == "cuda":
        if not torch.cuda.is_available():
            return "no NVIDIA GPU is available to PyTorch"
        if torch.version.cuda is None:
            return "this PyTorch build has no CUDA support"
        from torch.utils.cpp_extension import CUDA_HOME

        if CUDA_HOME is None:
            return "nvcc / the CUDA toolkit was not found (set CUDA_HOME)"
    return None


def _import_library(name: str, path: Path):
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, str(path), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def load_kernel(kind: str, progress: Callable[[str], None] | None = None):
    """Return the compiled module for "cpu" or "cuda", building it on first use.
    Raises RuntimeError with the cause if it cannot be built."""
    report = progress or (lambda msg: None)
    with _lock:
        if kind in _loaded:
            return _loaded[kind]
        if kind in _failed:
            raise RuntimeError(_failed[kind])
        try:
            module = _build_or_import(kind, report)
        except Exception as exc:  # any build failure becomes a fallback, with its cause
            cause = _summarise_failure(exc)
            _failed[kind] = cause
            raise RuntimeError(cause) from exc
        _loaded[kind] = module
        return module


def kernel_cache_dir(kind: str) -> Path:
    """The folder of the compiled `kind` kernels for these sources, this torch and this CPU/GPU
    (one-time measurements of the machine are cached here too)."""
    return cache_root() / f"rwkv_{kind}_kernels_{build_key(kind)}"


def _build_or_import(kind: str, report: Callable[[str], None]):
    reason = _why_unbuildable(kind)
    if reason:
        raise RuntimeError(reason)
    build_dir = kernel_cache_dir(kind)
    name = build_dir.name
    built = build_dir / f"{name}.so"
    if built.exists():
        report(f"{kind.upper()} kernels: loaded from cache ({build_dir})")
        return _import_library(name, built)
    build_dir.mkdir(parents=True, exist_ok=True)
    report(f"{kind.upper()} kernels: compiling with ninja (first start only; "
           f"{'about 1-2 min' if kind == 'cuda' else 'about 1 min on 2 cores'})...")
    from torch.utils.cpp_extension import load

    t0 = time.perf_counter()
    stop = threading.Event()

    def heartbeat():  # builds are silent for tens of seconds: show they are alive
        while not stop.wait(5.0):
            report(f"{kind.upper()} kernels: still compiling ({time.perf_counter() - t0:.0f} s)")

    ticker = threading.Thread(target=heartbeat, daemon=True)
    ticker.start()
    try:
        module = load(
            name=name,
            sources=[str(KERNEL_DIR / s) for s in _SOURCES[kind]],
            build_directory=str(build_dir),
            verbose=False,
            **_compile_flags(kind),
        )
    finally:
        stop.set()
    report(f"{kind.upper()} kernels: built in {time.perf_counter() - t0:.0f} s, cached in {build_dir}")
    return module


def _summarise_failure(exc: Exception) -> str:
    text = str(exc).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    for ln in lines:  # the compiler's first error line says the most
        if "error" in ln.lower() and len(ln) < 300:
            return ln.strip()
    return lines[-1][:300] if lines else type(exc).__name__
