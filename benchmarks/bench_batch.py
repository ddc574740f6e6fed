"""Batched generation: aggregate tokens/s of one batched step over B sequences, against B = 1 in
the same run (what the scheduler gains when many visitors generate at once).

    python benchmarks/bench_batch.py                      # 169M shape and the demo model, fp32 + bf16
    python benchmarks/bench_batch.py --models 169M --dtypes fp32

Each row: the fused C++ step (`Runtime.step`) over B sequences with different states, sampling
included (each row its own sampler, as the scheduler runs it), best of several passes. Target
(issue #12): at least 5x the B = 1 aggregate at B = 16 on the 169M shape, fp32.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from common import ROOT, checkpoint, machine, write_results

BATCHES = (1, 2, 4, 8, 16)
STEPS = 16


def measure(runtime, batch: int, passes: int) -> float:
    from rwkv_playground.sampling import Sampler, SamplingSettings

    g = torch.Generator().manual_seed(batch)
    states = []
    for _ in range(batch):  # different histories, as different visitors' chats
        _, state = runtime.forward(torch.randint(0, runtime.config.vocab_size, (8,), generator=g).tolist())
        states.append(state)
    samplers = [Sampler(SamplingSettings(top_p=0.7, seed=b), runtime.config.vocab_size,
                        kernel=runtime.sampler_kernel) for b in range(batch)]
    tokens = [1] * batch
    best = float("inf")
    for _ in range(passes):
        t0 = time.perf_counter()
        for _ in range(STEPS):
            logits = runtime.step(tokens, states)
            tokens = [s.sample(logits[b]) for b, s in enumerate(samplers)]
        best = min(best, time.perf_counter() - t0)
    return batch * STEPS / best


def main(models, dtypes, passes) -> None:
    from rwkv_playground import load_runtime

    rows = []
    for model in models:
        for dtype in dtypes:
            if model == "demo":
                path = ROOT / "assets" / "rwkv4-demo-shakespeare.pth"
            else:
                path = checkpoint(model, torch.bfloat16 if dtype == "bf16" else torch.float32)
            runtime = load_runtime(path, dtype=dtype)
            measure(runtime, 1, 1)  # warm-up
            speeds = {b: measure(runtime, b, passes) for b in BATCHES}
            row = {"model": model, "dtype": dtype, "step": runtime.describe()["step"],
                   **{f"B{b}_tok_s": speeds[b] for b in BATCHES},
                   **{f"B{b}_vs_B1": speeds[b] / speeds[1] for b in BATCHES}}
            rows.append(row)
            print(row, flush=True)
            del runtime
    data = {"machine": machine(), "steps_per_pass": STEPS, "passes": passes, "results": rows}
    m = data["machine"]
    md = ["# Batched generation: aggregate tokens/s (sampling included) against B = 1, same run", "",
          f"Machine: {m['cpu']} ({', '.join(m['cpu_features'])}), {m['cores']} cores, torch {m['torch']}, "
          f"{m['date']}. Best of {passes} passes of {STEPS} steps.", "",
          "| model | dtype | step | " + " | ".join(f"B = {b}" for b in BATCHES) + " |",
          "|---|---|---|" + "---|" * len(BATCHES)]
    for r in rows:
        md.append(f"| {r['model']} | {r['dtype']} | {r['step']} | " + " | ".join(
            f"{r[f'B{b}_tok_s']:.0f} tok/s (**{r[f'B{b}_vs_B1']:.2f}x**)" for b in BATCHES) + " |")
    md += ["", "Target: B = 16 at least 5x B = 1 on the 169M shape, fp32."]
    write_results("batched_generation", data, "\n".join(md) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["169M", "demo"], choices=["169M", "430M", "demo"])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--passes", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    main(args.models, args.dtypes, args.passes)
