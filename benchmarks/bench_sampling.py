"""One sampling step at vocab 50277: this engine's sampler vs the rwkv package's PIPELINE.

    python benchmarks/bench_sampling.py

Both get the same logits; each draw includes penalties (ours) / the full sort (theirs).
Distributions: a flat one (std 3) and a peaked one (std 8, closer to a trained LM).
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from common import machine, write_results


def per_call(fn, n=300) -> float:
    for _ in range(20):
        fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def main() -> None:
    os.environ.setdefault("RWKV_JIT_ON", "1")
    from rwkv.utils import PIPELINE

    from rwkv_playground.kernels import load_kernel
    from rwkv_playground.sampling import Sampler, SamplingSettings

    load_kernel("cpu")  # the sampler uses the C++ path when the CPU kernels are loaded

    pipeline = PIPELINE(None, "rwkv_vocab_v20230424")  # the tokenizer is irrelevant here
    rows = []
    for name, std in (("flat (std 3)", 3.0), ("peaked (std 8)", 8.0)):
        logits = torch.randn(50277, generator=torch.Generator().manual_seed(1)) * std
        for top_p in (0.3, 0.7, 0.95):
            times = {}
            for path, use_kernel in (("kernel", True), ("numpy", False)):
                sampler = Sampler(SamplingSettings(temperature=1.0, top_p=top_p, seed=0), 50277, use_kernel)
                for t in np.random.default_rng(0).integers(0, 50277, 64):  # a realistic penalty table
                    sampler.observe(int(t))
                times[path] = per_call(lambda: sampler.sample(logits))
            theirs = per_call(lambda: pipeline.sample_logits(logits, temperature=1.0, top_p=top_p), n=100)
            rows.append({"distribution": name, "top_p": top_p, "ours_ms": times["kernel"] * 1e3,
                         "ours_numpy_ms": times["numpy"] * 1e3, "rwkv_pip_ms": theirs * 1e3})
    data = {"machine": machine(), "vocab": 50277, "results": rows}
    md = ["# Sampling one token at vocab 50277", "",
          f"Machine: {data['machine']['cpu']}, {data['machine']['cores']} cores, {data['machine']['date']}.", "",
          "Per token, penalties included. *kernel*: kernels/sampling_cpu.cpp (used whenever the CPU kernels "
          "are loaded); *numpy*: the reference path beside it.", "",
          "| logits | top_p | this engine (kernel) | this engine (numpy) | rwkv 0.8.32 PIPELINE.sample_logits "
          "| ratio (kernel vs rwkv) |", "|---|---|---|---|---|---|"]
    md += [f"| {r['distribution']} | {r['top_p']} | {r['ours_ms']:.3f} ms | {r['ours_numpy_ms']:.3f} ms | "
           f"{r['rwkv_pip_ms']:.3f} ms | {r['rwkv_pip_ms'] / r['ours_ms']:.1f}x |" for r in rows]
    write_results("sampling", data, "\n".join(md) + "\n")


if __name__ == "__main__":
    torch.set_num_threads(os.cpu_count() or 1)
    main()
