"""This engine against the rwkv pip package, interleaved in one run (CPU).

    python benchmarks/bench_speed.py                  # 169M and 430M shapes, fp32 and bf16
    python benchmarks/bench_speed.py --shapes 169M --passes 2

For each shape and dtype, on deterministic random-weight checkpoints of the real shapes: a prompt
of 512 tokens, and 128 generated tokens including sampling (top_p 0.7, penalties), alternating the
two engines pass by pass so both see the same machine conditions. Reports tokens/s of each, the
ratio, the fraction of the machine's own bounds (a streaming-read bandwidth and a matmul GFLOP/s
it measures first), and the peak RSS of loading each engine (in a fresh process).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

from common import ROOT, SHAPES, best_of, checkpoint, machine, results_dir, write_results

os.environ.setdefault("RWKV_JIT_ON", "1")
os.environ["RWKV_CUDA_ON"] = "0"
PROMPT, GENERATE = 512, 128


def machine_bounds() -> dict:
    """Best of several measurements (a single one moves by +-20 % on a shared VM)."""
    big = torch.empty(256 * 1024 * 1024 // 4).normal_()
    bandwidth = big.numel() * 4 / best_of(big.sum, repeat=8)["min_s"] / 1e9
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    gflops = 2 * 1024 ** 3 / best_of(lambda: a @ b, repeat=10)["min_s"] / 1e9
    return {"stream_read_GB_s": round(bandwidth, 1), "matmul_GFLOP_s": round(gflops, 1)}


def weight_bytes(shape: str, dtype: str) -> int:
    c = SHAPES[shape]
    per_token = c.n_params - c.vocab_size * c.n_embd  # the embedding is a lookup, not read whole
    return per_token * (4 if dtype == "fp32" else 2)


class Ours:
    name = "rwkv_playground"

    def __init__(self, path, dtype):
        from rwkv_playground import load_runtime
        from rwkv_playground.sampling import Sampler, SamplingSettings

        self.runtime = load_runtime(path, dtype=dtype)
        self.Sampler, self.Settings = Sampler, SamplingSettings

    def prompt(self, tokens):
        return self.runtime.forward(tokens)

    def generate(self, logits, state, n):
        sampler = self.Sampler(self.Settings(top_p=0.7, seed=0), logits.shape[-1], kernel=self.runtime.sampler_kernel)
        for _ in range(n):
            token = sampler.sample(logits)
            sampler.observe(token)
            logits = self.runtime.step([token], [state])[0]


class Pip:
    name = "rwkv 0.8.32"

    def __init__(self, path, dtype):
        from rwkv.model import RWKV
        from rwkv.utils import PIPELINE

        self.model = RWKV(str(path), strategy=f"cpu {dtype}", verbose=False)
        self.pipeline = PIPELINE(self.model, "rwkv_vocab_v20230424")

    def prompt(self, tokens):
        return self.model.forward(tokens, None)

    def generate(self, logits, state, n):
        occurrence = {}
        for _ in range(n):
            out = logits.clone()
            for t, c in occurrence.items():
                out[t] -= 0.2 + c * 0.2
            token = self.pipeline.sample_logits(out, temperature=1.0, top_p=0.7)
            for t in occurrence:
                occurrence[t] *= 0.996
            occurrence[token] = occurrence.get(token, 0) + 1
            logits, state = self.model.forward([token], state)


def peak_load_rss(engine: str, path, dtype) -> int:
    """Peak RSS growth while loading in a fresh process (VmHWM reset before the load)."""
    code = (
        "import os, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / 'benchmarks')!r})\n"
        "os.environ['RWKV_CUDA_ON'] = '0'\n"
        "import bench_speed\n"
        "def status(key):\n"
        "    return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith(key))\n"
        f"cls = bench_speed.{engine}\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "before = status('VmRSS')\n"
        f"e = cls({str(path)!r}, {dtype!r})\n"
        "print(status('VmHWM') - before)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return int(out.stdout.split()[-1]) if out.returncode == 0 and out.stdout.strip() else -1


def add_fractions(row: dict, bounds: dict) -> None:
    shape, dtype = row["shape"], row["dtype"]
    # fraction of the bandwidth bound: every weight is read once per generated token
    bound_tok_s = bounds["stream_read_GB_s"] * 1e9 / weight_bytes(shape, dtype)
    row["ours_generate_fraction_of_bandwidth_bound"] = row["ours_generate_tok_s"] / bound_tok_s
    row["pip_generate_fraction_of_bandwidth_bound"] = row["pip_generate_tok_s"] / bound_tok_s
    # a prompt multiplies every layer's matrices per token; the head runs for the last token only
    c = SHAPES[shape]
    flops_per_token = 2 * c.n_layer * (5 * c.n_embd ** 2 + 2 * c.n_embd * c.ffn_dim)
    # (nominal flops for both: ours skips part of the last layer, so up to 1/0.93 is possible)
    for key in ("ours", "pip"):
        row[f"{key}_prompt_fraction_of_matmul_bound"] = (row[f"{key}_prompt_tok_s"] * flops_per_token
                                                         / (bounds["matmul_GFLOP_s"] * 1e9))


def run(shapes, dtypes, passes) -> None:
    bounds = machine_bounds()
    rows = []
    for shape in shapes:
        for dtype in dtypes:
            path = checkpoint(shape, torch.bfloat16 if dtype == "bf16" else torch.float32)
            engines = [Ours(path, dtype), Pip(path, dtype)]
            tokens = np.random.default_rng(0).integers(0, 50277, PROMPT).tolist()
            times = {e.name: {"prompt": [], "generate": []} for e in engines}
            for _ in range(passes):
                for e in engines:  # interleaved: same conditions for both
                    t0 = time.perf_counter()
                    logits, state = e.prompt(tokens)
                    t1 = time.perf_counter()
                    e.generate(logits, state, GENERATE)
                    t2 = time.perf_counter()
                    times[e.name]["prompt"].append(t1 - t0)
                    times[e.name]["generate"].append(t2 - t1)
            del engines
            row = {"shape": shape, "dtype": dtype}
            for name, t in times.items():
                key = "ours" if name == "rwkv_playground" else "pip"
                row[f"{key}_prompt_tok_s"] = PROMPT / min(t["prompt"])
                row[f"{key}_generate_tok_s"] = GENERATE / min(t["generate"])
            row["prompt_ratio"] = row["ours_prompt_tok_s"] / row["pip_prompt_tok_s"]
            row["generate_ratio"] = row["ours_generate_tok_s"] / row["pip_generate_tok_s"]
            row["ours_peak_load_rss_MB"] = peak_load_rss("Ours", path, dtype) / 1e6
            row["pip_peak_load_rss_MB"] = peak_load_rss("Pip", path, dtype) / 1e6
            row["weights_MB"] = path.stat().st_size / 1e6
            rows.append(row)
            print(json.dumps(row), flush=True)
    # the bounds again after the runs, keeping the best: the fractions are against the machine's best
    after = machine_bounds()
    bounds = {key: max(bounds[key], after[key]) for key in bounds}
    for row in rows:
        add_fractions(row, bounds)
    data = {"machine": machine(), "bounds": bounds, "prompt_tokens": PROMPT, "generated_tokens": GENERATE,
            "passes": passes, "results": rows}
    write(data)


def rebound() -> None:
    """Re-measure the machine's bounds (best of several) and recompute the fractions of the last
    results file; the tokens/s are kept as measured. Keeps the better of the stored and new bounds."""
    data = json.loads((results_dir() / "speed_vs_rwkv_pip.json").read_text())
    now = machine_bounds()
    data["bounds"] = {key: max(data["bounds"][key], now[key]) for key in now}
    data["bounds_note"] = "re-measured after the run (best of 8 reads / 10 GEMMs); the better of both kept"
    for row in data["results"]:
        add_fractions(row, data["bounds"])
    write(data)


def write(data: dict) -> None:
    bounds, rows, passes = data["bounds"], data["results"], data["passes"]
    md = [f"# This engine vs the rwkv pip package (CPU, {passes} interleaved passes, best of each)", "",
          f"Machine: {data['machine']['cpu']}, {data['machine']['cores']} cores, torch {data['machine']['torch']}, "
          f"{data['machine']['date']}. Measured bounds: streaming read {bounds['stream_read_GB_s']} GB/s, "
          f"matmul {bounds['matmul_GFLOP_s']} GFLOP/s"
          + (f" ({data['bounds_note']})." if data.get("bounds_note") else "."), "",
          "| shape | dtype | prompt tok/s (ours / pip / ratio) | prompt, fraction of matmul bound (ours / pip) "
          "| generation tok/s (ours / pip / ratio) | "
          "generation, fraction of bandwidth bound (ours / pip) | peak RSS loading, MB (ours / pip / file) |",
          "|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['shape']} | {r['dtype']} | {r['ours_prompt_tok_s']:.0f} / {r['pip_prompt_tok_s']:.0f} / "
                  f"**{r['prompt_ratio']:.2f}x** | {r['ours_prompt_fraction_of_matmul_bound']:.0%} / "
                  f"{r['pip_prompt_fraction_of_matmul_bound']:.0%} | "
                  f"{r['ours_generate_tok_s']:.1f} / {r['pip_generate_tok_s']:.1f} / "
                  f"**{r['generate_ratio']:.2f}x** | {r['ours_generate_fraction_of_bandwidth_bound']:.0%} / "
                  f"{r['pip_generate_fraction_of_bandwidth_bound']:.0%} | {r['ours_peak_load_rss_MB']:.0f} / "
                  f"{r['pip_peak_load_rss_MB']:.0f} / {r['weights_MB']:.0f} |")
    write_results("speed_vs_rwkv_pip", data, "\n".join(md) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", nargs="+", default=["169M", "430M"], choices=list(SHAPES))
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--rebound", action="store_true",
                        help="only re-measure the bounds and recompute the fractions of the last results")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    if args.rebound:
        rebound()
    else:
        run(args.shapes, args.dtypes, args.passes)
