"""What the CUDA toolkit can check without a GPU (CI runs this when nvcc is present).

    python tools/check_cuda_build.py

1. kernels/wkv_cuda.cu and wkv_matrix_cuda.cu compile with nvcc for sm_80 and sm_90 with the flags
   the runtime builds them with (rwkv_playground.kernels.CUDA_FLAGS), and `-Xptxas -v` reports no
   spill stores or loads and no local memory (stack frame, lmem) for any kernel: a kernel whose
   state left the registers would fail here, not on a user's card.
2. The binding (kernels/wkv_cuda.cpp) compiles with nvcc against this torch's headers (compile only:
   a CPU build of torch has no CUDA libraries to link).
Exit status 1 on any failure, with nvcc's message.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARCHS = ("sm_80", "sm_90")


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True)


def demangle(symbol: str) -> str:
    out = run(["c++filt", symbol]) if shutil.which("c++filt") else None
    name = out.stdout.strip() if out and out.returncode == 0 else symbol
    name = re.sub(r"\(anonymous namespace\)::", "", name)
    return re.sub(r"^void ", "", name.split("(")[0])


SOURCES = ("wkv_cuda.cu", "wkv_matrix_cuda.cu")


def kernel_resources(arch: str, out_dir: Path) -> list[str]:
    """Compile every kernel source for one architecture; returns the problems found ([] when clean)."""
    sys.path.insert(0, str(ROOT))
    from rwkv_playground.kernels import CUDA_FLAGS

    problems, kernels = [], 0
    for source in SOURCES:
        out = run(["nvcc", "-std=c++17", *CUDA_FLAGS, "-Xptxas", "-v", f"-arch={arch}", "-c",
                   str(ROOT / "kernels" / source), "-o", str(out_dir / f"{source}_{arch}.o")])
        if out.returncode != 0:
            return [f"nvcc failed for {source} ({arch}):\n{out.stderr[-3000:]}"]
        found, count = parse_resources(arch, out.stderr)
        problems += found
        kernels += count
    if kernels == 0:
        problems.append(f"{arch}: ptxas reported no kernel (is -Xptxas -v still honoured?)")
    return problems


def parse_resources(arch: str, report: str) -> tuple[list[str], int]:
    """The spill / stack / local-memory problems in ptxas' -v report, and how many kernels it lists."""
    problems, kernel, kernels = [], None, 0
    for line in report.splitlines():
        entry = re.search(r"Compiling entry function '(\w+)'", line)
        if entry:
            kernel, kernels = demangle(entry.group(1)), kernels + 1
            continue
        for label, pattern in (("stack frame", r"(\d+) bytes stack frame"), ("spill stores", r"(\d+) bytes spill stores"),
                               ("spill loads", r"(\d+) bytes spill loads"), ("local memory", r"(\d+) bytes lmem")):
            found = re.search(pattern, line)
            if found and int(found.group(1)) != 0:
                problems.append(f"{arch} {kernel}: {found.group(1)} bytes of {label}")
        used = re.search(r"Used (\d+) registers", line)
        if used:
            clean = not any(p.startswith(f"{arch} {kernel}:") for p in problems)
            print(f"  {arch} {kernel}: {used.group(1)} registers, "
                  + ("no spills, no local memory" if clean else "SPILLS / LOCAL MEMORY"), flush=True)
    return problems, kernels


def binding_compiles(out_dir: Path) -> list[str]:
    import torch.utils.cpp_extension as ext

    # A CPU build of torch ships the c10/cuda headers but not the one CMake generates.
    stub = out_dir / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    includes = [f"-I{p}" for p in ext.include_paths()] + [f"-I{out_dir / 'stub'}",
                                                           f"-I{sysconfig.get_paths()['include']}"]
    out = run(["nvcc", "-std=c++20", "-x", "cu", "-arch=sm_80", "-c", str(ROOT / "kernels" / "wkv_cuda.cpp"),
               "-o", str(out_dir / "wkv_cuda_binding.o"), "-DTORCH_EXTENSION_NAME=rwkv_cuda_kernels_check",
               "-w", *includes])
    return [] if out.returncode == 0 else [f"the binding does not compile with nvcc:\n{out.stderr[-3000:]}"]


def main() -> int:
    if shutil.which("nvcc") is None:
        print("nvcc not found: the CUDA build checks need the CUDA toolkit")
        return 1
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ARCHS:
            problems += kernel_resources(arch, Path(tmp))
        problems += binding_compiles(Path(tmp))
    for problem in problems:
        print("FAIL:", problem)
    print("CUDA build checks: " + ("all clean" if not problems else f"{len(problems)} problem(s)"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
