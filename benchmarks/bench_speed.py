"""This engine against the rwkv pip package, interleaved in one run (CPU).

    python benchmarks/bench_speed.py                  # 169M and 430M shapes, fp32, bf16 and int8
    python benchmarks/bench_speed.py --shapes 169M --passes 2
    python benchmarks/bench_speed.py --shapes v7-0.1B v7-0.4B v6-24x1024 --dtypes fp32 bf16

RWKV-7 rows run the package in a child process (its RWKV-7 class is chosen at import time, by
RWKV_V7_ON=1), driven pass by pass so the two engines still alternate.

For each shape and dtype, on deterministic random-weight checkpoints of the real shapes: a prompt
of 512 tokens, and 128 generated tokens including sampling (top_p 0.7, penalties), alternating the
two engines pass by pass so both see the same machine conditions. Reports tokens/s of each, the
ratio, the fraction of the machine's own bounds (a streaming-read bandwidth and a matmul GFLOP/s
it measures first), and the peak RSS of loading each engine (in a fresh process).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

from common import ROOT, SHAPES, architecture_of, best_of, checkpoint, machine, results_dir, write_results

os.environ.setdefault("RWKV_JIT_ON", "1")
os.environ["RWKV_CUDA_ON"] = "0"
PROMPT, GENERATE, GENERATE_INT8 = 512, 128, 32
RESULTS_NAME = "speed_vs_rwkv_pip"  # --results-name


def last_level_cache_bytes() -> int:
    """The largest cache this CPU reports (sysfs), 0 if unknown."""
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        text = open(path).read().strip()
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return max(sizes, default=0)


class StreamBound:
    """What the cores can actually stream: the C++ kernels' `stream_read` (every thread, the widest
    SIMD this CPU has) over a buffer of at least 8x the last-level cache and 2 GB, so no read is
    served by a cache (this Xeon VM reports a 480 MB L3: torch's sum of 256 MB gave ~50 GB/s,
    memory ~31). Sampled between the engines' passes and the best kept: this VM's bandwidth drifts
    by +-10 % over minutes, so a bound measured only before and after a run can fall below what a
    pass saw. Also per row, a slice the size of that row's weights (a working set of 1-2 GB is not
    much larger than the L3, which keeps part of it across passes, for generation and this read alike)."""

    def __init__(self):
        from rwkv_playground.kernels import load_kernel

        self.kernel = load_kernel("cpu")
        self.llc = last_level_cache_bytes()
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        size = min(max(2 << 30, 8 * self.llc), available // 3)
        self.buffer = torch.empty(size, dtype=torch.uint8).fill_(1)  # touched: every page resident
        self.best = 0.0
        self.working_set: dict[str, float] = {}

    def _gb_s(self, buffer, repeat: int) -> float:
        return buffer.numel() / best_of(lambda: self.kernel.stream_read(buffer, "auto"), repeat=repeat)["min_s"] / 1e9

    def sample(self, key: str | None = None, nbytes: int = 0, repeat: int = 3) -> None:
        self.best = max(self.best, self._gb_s(self.buffer, repeat))
        if key:
            ws = self._gb_s(self.buffer[:min(nbytes, self.buffer.numel())], repeat)
            self.working_set[key] = max(self.working_set.get(key, 0.0), ws)

    def bounds(self) -> dict:
        return {"stream_read_GB_s": round(self.best, 1), "stream_buffer_GB": round(self.buffer.numel() / 1e9, 2),
                "last_level_cache_MB": round(self.llc / 1e6),
                "working_set_GB_s": {k: round(v, 1) for k, v in self.working_set.items()}}


def gemm_bounds() -> dict:
    """fp32 and bf16 matmul GFLOP/s at 1024^3, best of 10 each."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    gflops = 2 * 1024 ** 3 / best_of(lambda: a @ b, repeat=10)["min_s"] / 1e9
    a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)  # AMX / AVX512-BF16 where the CPU has them
    gflops_bf16 = 2 * 1024 ** 3 / best_of(lambda: a16 @ b16, repeat=10)["min_s"] / 1e9
    return {"matmul_GFLOP_s": round(gflops, 1), "bf16_matmul_GFLOP_s": round(gflops_bf16, 1)}


def weight_bytes(shape: str, dtype: str) -> int:
    c = SHAPES[shape]
    per_token = c.n_params - c.vocab_size * c.n_embd  # the embedding is a lookup, not read whole
    return per_token * {"fp32": 4, "bf16": 2, "int8": 1}[dtype]


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


class PipChild:
    """The package's RWKV-7 class in a child process (RWKV_V7_ON=1 at its import), one pass per
    request: the same prompt and sampling as `Pip`, timed there."""
    name = "rwkv 0.8.32"

    def __init__(self, path, dtype):
        env = dict(os.environ, RWKV_V7_ON="1", RWKV_JIT_ON="1", RWKV_CUDA_ON="0")
        self.child = subprocess.Popen([sys.executable, __file__, "--pip-child", str(path), dtype], env=env,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.child.stdout.readline().strip() == "ready"

    def timed_pass(self, tokens, n):
        self.child.stdin.write(json.dumps({"tokens": tokens, "generate": n}) + "\n")
        self.child.stdin.flush()
        reply = json.loads(self.child.stdout.readline())
        return reply["prompt_s"], reply["generate_s"]

    def close(self):
        self.child.stdin.close()
        self.child.wait(timeout=60)


def pip_child(path: str, dtype: str) -> None:
    """The child's loop (RWKV_V7_ON=1 is set by the parent): one timed pass per line of stdin.
    Replies go to the original stdout; whatever the package prints goes to stderr."""
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    engine = Pip(path[:-4], dtype)  # the RWKV-7 class appends ".pth" itself
    print("ready", file=replies, flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        t0 = time.perf_counter()
        logits, state = engine.prompt(job["tokens"])
        t1 = time.perf_counter()
        engine.generate(logits, state, job["generate"])
        print(json.dumps({"prompt_s": t1 - t0, "generate_s": time.perf_counter() - t1}), file=replies, flush=True)


class Pip:
    name = "rwkv 0.8.32"

    def __init__(self, path, dtype):
        from rwkv.model import RWKV
        from rwkv.utils import PIPELINE

        # int8: the package's own int8 CPU strategy (fp32 activations, int8 weights)
        strategy = "cpu fp32i8" if dtype == "int8" else f"cpu {dtype}"
        v7 = os.environ.get("RWKV_V7_ON") == "1"  # (its RWKV-7 class takes no verbose flag)
        self.model = RWKV(str(path), strategy=strategy, **({} if v7 else {"verbose": False}))
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
    # fraction of the bandwidth bound: every weight is read once per generated token; the bound is
    # the better of streaming far more than the caches and streaming a buffer of the weights' size
    bandwidth = max(bounds["stream_read_GB_s"], bounds.get("working_set_GB_s", {}).get(f"{shape}-{dtype}", 0))
    row["bandwidth_bound_GB_s"] = bandwidth
    bound_tok_s = bandwidth * 1e9 / weight_bytes(shape, dtype)
    row["ours_generate_fraction_of_bandwidth_bound"] = row["ours_generate_tok_s"] / bound_tok_s
    row["pip_generate_fraction_of_bandwidth_bound"] = row["pip_generate_tok_s"] / bound_tok_s
    # a prompt multiplies every layer's matrices per token; the head runs for the last token only
    c = SHAPES[shape]
    # every matrix but the embedding (a lookup) and the head (the last token only): 2 flops a weight
    flops_per_token = 2 * (c.n_params - 2 * c.vocab_size * c.n_embd)
    # (nominal flops for both: ours skips part of the last layer, so up to 1/0.93 is possible)
    # bf16 / int8 weights may multiply in bf16: their bound is the faster of the two GEMMs
    gemm = bounds["matmul_GFLOP_s"] if dtype == "fp32" else max(bounds["matmul_GFLOP_s"],
                                                                bounds.get("bf16_matmul_GFLOP_s", 0))
    for key in ("ours", "pip"):
        row[f"{key}_prompt_fraction_of_matmul_bound"] = row[f"{key}_prompt_tok_s"] * flops_per_token / (gemm * 1e9)


def run(shapes, dtypes, passes) -> None:
    gemm = gemm_bounds()
    stream = StreamBound()
    stream.sample(repeat=6)
    rows = []
    for shape in shapes:
        for dtype in dtypes:
            path = checkpoint(shape, torch.float32 if dtype == "fp32" else torch.bfloat16)
            # the package's int8 CPU path runs ~1-3 tok/s: fewer tokens keep the run short
            generate = GENERATE_INT8 if dtype == "int8" else GENERATE
            v7 = architecture_of(shape) == "rwkv7"
            engines = [Ours(path, dtype), (PipChild if v7 else Pip)(path, dtype)]
            tokens = np.random.default_rng(0).integers(0, min(50277, SHAPES[shape].vocab_size), PROMPT).tolist()
            times = {e.name: {"prompt": [], "generate": []} for e in engines}
            for _ in range(passes):
                for e in engines:  # interleaved: same conditions for both
                    if isinstance(e, PipChild):
                        prompt_s, generate_s = e.timed_pass(tokens, generate)
                    else:
                        t0 = time.perf_counter()
                        logits, state = e.prompt(tokens)
                        t1 = time.perf_counter()
                        e.generate(logits, state, generate)
                        prompt_s, generate_s = t1 - t0, time.perf_counter() - t1
                    times[e.name]["prompt"].append(prompt_s)
                    times[e.name]["generate"].append(generate_s)
                stream.sample(f"{shape}-{dtype}", weight_bytes(shape, dtype))  # same conditions as the pass
            if v7:
                engines[1].close()
            del engines
            row = {"shape": shape, "dtype": dtype, "architecture": architecture_of(shape), "generated_tokens": generate}
            for name, t in times.items():
                key = "ours" if name == "rwkv_playground" else "pip"
                row[f"{key}_prompt_tok_s"] = PROMPT / min(t["prompt"])
                row[f"{key}_generate_tok_s"] = generate / min(t["generate"])
            row["prompt_ratio"] = row["ours_prompt_tok_s"] / row["pip_prompt_tok_s"]
            row["generate_ratio"] = row["ours_generate_tok_s"] / row["pip_generate_tok_s"]
            row["ours_peak_load_rss_MB"] = peak_load_rss("Ours", path, dtype) / 1e6
            row["pip_peak_load_rss_MB"] = peak_load_rss("Pip", path, dtype) / 1e6
            row["weights_MB"] = path.stat().st_size / 1e6
            rows.append(row)
            print(json.dumps(row), flush=True)
    # the bounds again after the runs, keeping the best: the fractions are against the machine's best
    stream.sample(repeat=6)
    after = gemm_bounds()
    bounds = {**stream.bounds(), **{key: max(gemm[key], after[key]) for key in gemm}}
    for row in rows:
        add_fractions(row, bounds)
    data = {"machine": machine(), "bounds": bounds, "prompt_tokens": PROMPT, "generated_tokens": GENERATE,
            "passes": passes, "results": rows}
    write(data)


def rebound() -> None:
    """Re-measure the machine's bounds (best of several) and recompute the fractions of the last
    results file; the tokens/s are kept as measured. Keeps the better of the stored and new bounds."""
    data = json.loads((results_dir() / f"{RESULTS_NAME}.json").read_text())
    stream = StreamBound()
    for _ in range(3):
        for row in data["results"]:
            stream.sample(f"{row['shape']}-{row['dtype']}", weight_bytes(row["shape"], row["dtype"]))
    now = {**stream.bounds(), **gemm_bounds()}
    data["bounds"] = {**now, **{key: max(data["bounds"].get(key, 0), now[key])
                                for key in ("stream_read_GB_s", "matmul_GFLOP_s", "bf16_matmul_GFLOP_s")}}
    data["bounds_note"] = "re-measured after the run; the better of both kept"
    for row in data["results"]:
        add_fractions(row, data["bounds"])
    write(data)


def write(data: dict) -> None:
    bounds, rows, passes = data["bounds"], data["results"], data["passes"]
    md = [f"# This engine vs the rwkv pip package (CPU, {passes} interleaved passes, best of each)", "",
          f"Machine: {data['machine']['cpu']}, {data['machine']['cores']} cores, torch {data['machine']['torch']}, "
          f"{data['machine']['date']}. Measured bounds: streaming read {bounds['stream_read_GB_s']} GB/s, "
          f"matmul {bounds['matmul_GFLOP_s']} GFLOP/s fp32, {bounds.get('bf16_matmul_GFLOP_s', '?')} bf16"
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
    ours = {(r["shape"], r["dtype"]): r["ours_generate_tok_s"] for r in rows}
    int8 = [f"{shape} **{ours[shape, 'int8'] / ours[shape, 'bf16']:.2f}x**" for shape in dict.fromkeys(r["shape"] for r in rows)
            if (shape, "int8") in ours and (shape, "bf16") in ours]
    if int8:
        md += ["", "Our int8 generation against our bf16 generation, same run (target >= 1.7x): " + ", ".join(int8) + ".",
               "int8 rows: the package's peer is its `cpu fp32i8` strategy; both engines generate "
               f"{GENERATE_INT8} tokens there (the package's int8 CPU path is slow)."]
    working = ", ".join(f"{k} {v} GB/s" for k, v in bounds.get("working_set_GB_s", {}).items())
    bound = (f"Bandwidth bound: generation reads every weight once per token (the embedding row aside); the "
             f"bound is the better of `stream_read` (all threads, widest SIMD) over {bounds.get('stream_buffer_GB', '?')}"
             f" GB (last-level cache {bounds.get('last_level_cache_MB', '?')} MB) and over a buffer of each row's "
             f"weight size ({working}): the L3 keeps part of a working set of 1-2 GB.")
    md += ["", bound]
    write_results(RESULTS_NAME, data, "\n".join(md) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", nargs="+", default=["169M", "430M"], choices=list(SHAPES))
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16", "int8"], choices=["fp32", "bf16", "int8"])
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--rebound", action="store_true",
                        help="only re-measure the bounds and recompute the fractions of the last results")
    parser.add_argument("--pip-child", nargs=2, metavar=("PATH", "DTYPE"), help=argparse.SUPPRESS)
    parser.add_argument("--results-name", default="speed_vs_rwkv_pip",
                        help="the results file (several runs of different shapes keep apart)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    RESULTS_NAME = args.results_name
    if args.pip_child:
        pip_child(*args.pip_child)
    elif args.rebound:
        rebound()
    else:
        run(args.shapes, args.dtypes, args.passes)
