"""Show that the CPU emulation of the CUDA kernels catches real bugs: plant known bugs in a copy of
kernels/, one at a time, and run the emulated tests (tests/test_cuda_emulated.py) on each.

    python tools/check_cuda_emulation.py            # a table; exit 1 if a planted bug goes unnoticed
    python tools/check_cuda_emulation.py --sanitize # the same with the AddressSanitizer + UBSan build

The unmutated copy runs first, as the control: it must pass.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (name, file, text in the original, replacement)
MUTATIONS = [
    ("missing bounds guard", "wkv_cuda.cu", "  if (idx >= B * C) return;\n", ""),
    ("swapped state weights", "wkv_step.h",
     "  const acc_t e1 = d > 0 ? acc_t(1) : ed;  // weight of the state\n"
     "  const acc_t e2 = d > 0 ? ed : acc_t(1);  // weight of the current token (with its bonus)\n",
     "  const acc_t e1 = d > 0 ? ed : acc_t(1);\n  const acc_t e2 = d > 0 ? acc_t(1) : ed;\n"),
    ("state not written back", "wkv_cuda.cu", "  aa[idx] = a;\n  bb[idx] = bsum;\n  pp[idx] = p;\n", ""),
    ("grid rounded down", "cuda_launch.h", "return static_cast<unsigned>((n + kThreads - 1) / kThreads);",
     "return static_cast<unsigned>(n / kThreads);"),
    # the RWKV-5/6/7 kernels (kernels/wkv_matrix_cuda.cu)
    ("v5 state read transposed", "wkv_matrix_cuda.cu", "s[j] = S[j * N + i];", "s[j] = S[i * N + j];"),
    ("v7 state not written back", "wkv_matrix_cuda.cu", "  for (int j = 0; j < N; ++j) S[j] = s[j];\n", ""),
    ("v7 decay by the wrong channel", "wkv_matrix_cuda.cu", "s[j] * w[base + j] - removed", "s[j] * w[base + i] - removed"),
    ("every block on head 0", "wkv_matrix_cuda.cu", "const int b = bh / H, h = bh % H;", "const int b = bh / H, h = 0;"),
]


def run_tests(kernels: Path, sanitize: bool) -> tuple[bool, str]:
    env = {**os.environ, "RWKV_CUDA_EMULATION_KERNELS": str(kernels)}
    if sanitize:
        preload = [subprocess.run(["gcc", f"-print-file-name={lib}"], capture_output=True, text=True).stdout.strip()
                   for lib in ("libasan.so", "libstdc++.so")]
        env.update({"RWKV_CUDA_EMULATION_SANITIZE": "1", "LD_PRELOAD": " ".join(preload),
                    "ASAN_OPTIONS": "detect_leaks=0", "UBSAN_OPTIONS": "print_stacktrace=1"})
    # -s under the sanitizers: their report goes to the real stderr (pytest's capture would swallow it)
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-rfE", "-p", "no:cacheprovider",
                          *(["-s"] if sanitize else []), str(ROOT / "tests" / "test_cuda_emulated.py")], cwd=ROOT,
                         env=env, capture_output=True, text=True)
    text = out.stdout + out.stderr
    sanitizer = re.search(r"(AddressSanitizer: [\w-]+|runtime error: [^\n]{0,80})", text)
    if sanitizer:
        where = re.search(r"#\d+ 0x[0-9a-f]+ in (\w+) \S*(wkv_cuda\.cu:\d+)", text)
        return False, sanitizer.group(1) + (f" in {where.group(1)} ({where.group(2)})" if where else "")
    if "Fatal Python error" in text or out.returncode < 0:
        test = re.search(r"File \"[^\"]*test_cuda_emulated.py\", line \d+ in (\w+)", text)
        return False, f"the test process crashed ({test.group(1) if test else 'segmentation fault'})"
    failed = re.search(r"^(?:FAILED|ERROR) (\S+)", text, re.M)
    caught = re.search(r"(AddressSanitizer|runtime error|emulated CUDA: [^\n]*|AssertionError|RuntimeError[^\n]*)", text)
    evidence = (failed.group(1).split("::")[-1] if failed else "") + (f" - {caught.group(1)[:90]}" if caught else "")
    return out.returncode == 0, evidence or (text.strip().splitlines() or [f"exit status {out.returncode}"])[-1][:120]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sanitize", action="store_true")
    args = parser.parse_args()
    rows, ok = [], True
    for name, file, old, new in [("none (control)", None, None, None), *MUTATIONS]:
        with tempfile.TemporaryDirectory() as tmp:
            kernels = Path(tmp) / "kernels"
            shutil.copytree(ROOT / "kernels", kernels)
            if file is not None:
                source = (kernels / file).read_text()
                assert source.count(old) >= 1, f"{name}: the text to mutate is not in {file}"
                (kernels / file).write_text(source.replace(old, new))
            t0 = time.perf_counter()
            passed, evidence = run_tests(kernels, args.sanitize)
        expected = file is None
        ok &= passed == expected
        verdict = ("passes, as it must" if passed else "FAILS (control broken)") if expected else \
            ("caught: " + evidence if not passed else "NOT CAUGHT")
        rows.append((name, verdict, time.perf_counter() - t0))
        print(f"{name:24s} {verdict}  ({rows[-1][2]:.0f} s)", flush=True)
    print("\nevery planted bug was caught" if ok else "\nA PLANTED BUG WENT UNNOTICED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
