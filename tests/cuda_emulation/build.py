"""Build the CPU emulation of the CUDA module (kernels/wkv_cuda.cu + wkv_cuda.cpp as host C++).

    module = build_emulated()                          # the project's kernels
    module = build_emulated(kernels_dir=mutated_copy)  # a mutated copy (tools/check_cuda_emulation.py)
    module = build_emulated(sanitize=True)             # with AddressSanitizer + UBSan

Needs the CUDA toolkit's host headers (cuda_runtime.h, cuda_fp16.h, cuda_bf16.h): from the pip
packages nvidia-cuda-runtime, nvidia-cuda-crt and nvidia-cuda-cccl (requirements-dev.txt), or
from $CUDA_HOME/include (default /usr/local/cuda). No GPU, no nvcc, no libcudart.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
KERNELS = ROOT / "kernels"
SOURCES = ("wkv_cuda.cu", "wkv_matrix_cuda.cu", "wkv_cuda.cpp", "wkv_step.h", "cuda_launch.h", "cuda_dtype.h")


def cuda_include_dirs() -> list[str]:
    """The CUDA headers: the pip packages' if installed, else the toolkit's."""
    site = Path(sysconfig.get_paths()["purelib"]) / "nvidia" / "cu13" / "include"
    if (site / "cuda_runtime.h").exists() and (site / "cccl" / "nv" / "target").exists():
        return [str(site), str(site / "cccl")]
    home = Path(os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda") / "include"
    if (home / "cuda_runtime.h").exists():
        return [str(home)]
    raise RuntimeError("The emulated CUDA tests need the CUDA headers: pip install nvidia-cuda-runtime "
                       "nvidia-cuda-crt nvidia-cuda-cccl (requirements-dev.txt), or set CUDA_HOME to a toolkit.")


def build_emulated(kernels_dir: Path = KERNELS, sanitize: bool = False, verbose: bool = False):
    from torch.utils.cpp_extension import load

    kernels_dir = Path(kernels_dir).resolve()
    h = hashlib.sha256()
    for path in [HERE / "wkv_cuda_emulated.cpp", HERE / "cuda_shim.h", *sorted((HERE / "include").rglob("*.h"))]:
        h.update(path.read_bytes())
    for name in SOURCES:
        h.update((kernels_dir / name).read_bytes())
    h.update(str(sanitize).encode() + sys.version.encode())
    import torch

    h.update(torch.__version__.encode())
    name = f"rwkv_cuda_emulated_{'asan_' if sanitize else ''}{h.hexdigest()[:12]}"
    cache = Path(os.environ.get("RWKV_PLAYGROUND_CACHE") or Path.home() / ".cache" / "rwkv_playground" / "kernels")
    build_dir = cache / name
    build_dir.mkdir(parents=True, exist_ok=True)
    cflags = ["-O1" if sanitize else "-O2", "-DRWKV_CUDA_EMULATION=1", "-Wno-deprecated-declarations"]
    ldflags = []
    if sanitize:
        cflags += ["-g", "-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
        ldflags += ["-fsanitize=address,undefined"]
    return load(name=name, sources=[str(HERE / "wkv_cuda_emulated.cpp")], build_directory=str(build_dir),
                extra_include_paths=[str(HERE), str(HERE / "include"), str(kernels_dir), *cuda_include_dirs()],
                extra_cflags=cflags, extra_ldflags=ldflags, verbose=verbose)
