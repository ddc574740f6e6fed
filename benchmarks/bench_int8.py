"""Our int8 generation against our bf16 generation, interleaved pass by pass (CPU).

    python benchmarks/bench_int8.py                  # 169M and 430M shapes
    python benchmarks/bench_int8.py --shapes 430M --passes 7

bench_speed measures each dtype's row minutes apart; on a VM whose memory bandwidth drifts
(30-58 GB/s within minutes on the AVX-512 EPYC), a ratio of two such rows is partly the drift.
Here both models are loaded side by side and alternate in every pass: 128 generated tokens with
sampling (bench_speed's loop: top_p 0.7, the fused step), and the fused step alone. Target: int8
at least 1.7x bf16.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench_speed import Ours
from common import SHAPES, checkpoint, machine, write_results

GENERATE = 128


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(shape: str, passes: int) -> dict:
    path = checkpoint(shape, torch.bfloat16)
    engines = {dtype: Ours(path, dtype) for dtype in ("bf16", "int8")}
    prompt = torch.randint(0, SHAPES[shape].vocab_size, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    start = {dtype: e.prompt(prompt) for dtype, e in engines.items()}
    generation = {dtype: [] for dtype in engines}
    step = {dtype: [] for dtype in engines}
    for _ in range(passes):
        for dtype, e in engines.items():
            logits, state = start[dtype]
            generation[dtype].append(timed(lambda: e.generate(logits, state.clone(), GENERATE)))
            one = state.clone()
            step[dtype].append(min(timed(lambda: e.runtime.step([7], [one])) for _ in range(16)))
    row = {"shape": shape, "passes": passes}
    for dtype in engines:
        row[f"{dtype}_generate_tok_s"] = GENERATE / min(generation[dtype])
        row[f"{dtype}_generate_median_tok_s"] = GENERATE / statistics.median(generation[dtype])
        row[f"{dtype}_step_tok_s"] = 1 / min(step[dtype])
    row["generate_ratio"] = row["int8_generate_tok_s"] / row["bf16_generate_tok_s"]
    row["generate_median_ratio"] = row["int8_generate_median_tok_s"] / row["bf16_generate_median_tok_s"]
    row["step_ratio"] = row["int8_step_tok_s"] / row["bf16_step_tok_s"]
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["169M", "430M"], choices=list(SHAPES))
    parser.add_argument("--passes", type=int, default=5)
    args = parser.parse_args()
    rows = [measure(shape, args.passes) for shape in args.shapes]
    m = machine()
    md = ["# int8 against bf16 generation, interleaved (this engine, CPU)", "",
          f"Machine: {m['cpu']} ({', '.join(m['cpu_features'])}), {m['cores']} cores, torch {m['torch']}, "
          f"{m['date']}. {args.passes} passes; in each, bf16 then int8: {GENERATE} generated tokens with sampling, "
          "then the fused step alone (best of 16).", "",
          "| shape | generation tok/s, bf16 / int8 (best) | int8 / bf16, best (median) | step alone tok/s, bf16 / int8 "
          "| int8 / bf16 |", "|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['shape']} | {r['bf16_generate_tok_s']:.1f} / {r['int8_generate_tok_s']:.1f} | "
                  f"**{r['generate_ratio']:.2f}x** ({r['generate_median_ratio']:.2f}x) | "
                  f"{r['bf16_step_tok_s']:.1f} / {r['int8_step_tok_s']:.1f} | {r['step_ratio']:.2f}x |")
    md += ["", "Target: int8 generation at least 1.7x our bf16 generation."]
    write_results("int8_vs_bf16", {"machine": m, "generated_tokens": GENERATE, "results": rows}, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
