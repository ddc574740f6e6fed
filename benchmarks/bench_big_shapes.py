"""The big models on this machine: Raven 14B's shape (40 x 5120) and 7B's (32 x 4096), RWKV-7 G1
7.2B (32 x 4096, head 64, LoRA widths 128 / 128 / 96 / 480) and a 13B-class RWKV-7 (61 x 4096 with
the 7.2B widths: 13.2B parameters; the released 13.3B's layout is not published in what we read).

    python benchmarks/bench_big_shapes.py                      # 14B int8, 7B bf16, 7B int8
    python benchmarks/bench_big_shapes.py --runs v7-7.2B:bf16 v7-7.2B:int8 v7-13B:int8
    python benchmarks/bench_big_shapes.py --runs 14B:int8 --scratch /big/disk

For each run: a random-weight bf16 checkpoint of the shape (vocab 50277) is written to a scratch
folder as .safetensors, one tensor at a time (a 14B model is ~28 GB and is never in memory whole;
the free disk is checked first; RWKV-7 files have the World vocabulary, 65536), then loaded in a fresh process with the requested dtype. Recorded:
load time, the process's peak resident memory (loading, then generating; the 4 GB buffer of the
bandwidth measurement is allocated after that) against the machine's memory and the model's size,
tokens/s of one-token generation (the fused step, no sampling), and that speed as a fraction of
the bandwidth bound (weights read per token / `stream_read` GB/s measured in the same process).
The checkpoints are deleted afterwards unless --keep; they are never committed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import CACHE, ROOT, machine, results_dir, write_results
from rwkv_playground.models import by_name
from rwkv_playground.models import random_init, rwkv4
from rwkv_playground.models.rwkv4 import RWKVConfig
from rwkv_playground.models.rwkv7 import RWKV7Config

G1_7B_LORAS = dict(decay_lora=128, iclr_lora=128, value_lora=96, gate_lora=480)
BIG_SHAPES = {
    "14B": RWKVConfig(n_layer=40, n_embd=5120, vocab_size=50277, ffn_dim=4 * 5120),
    "7B": RWKVConfig(n_layer=32, n_embd=4096, vocab_size=50277, ffn_dim=4 * 4096),
    "v7-7.2B": RWKV7Config(32, 4096, 65536, 4 * 4096, 64, 64, **G1_7B_LORAS),
    "v7-13B": RWKV7Config(61, 4096, 65536, 4 * 4096, 64, 64, **G1_7B_LORAS),
}


def expected_shapes(config) -> dict:
    return by_name("rwkv7" if isinstance(config, RWKV7Config) else "rwkv4").expected_shapes(config)


def iter_random_weights(config, seed: int, dtype):
    if isinstance(config, RWKV7Config):
        return random_init.iter_random_weights(expected_shapes(config), config, seed, dtype)
    return rwkv4.iter_random_weights(config, seed, dtype)
DEFAULT_RUNS = ("14B:int8", "7B:bf16", "7B:int8")
PROMPT, GENERATE = 16, 16
MARGIN = 1 << 30  # free disk kept after writing a checkpoint


def file_bytes(config) -> int:
    return sum(2 * torch.Size(shape).numel() for shape in expected_shapes(config).values())


def write_safetensors(path: Path, config) -> float:
    """Random bf16 weights of `config` streamed to a .safetensors file; returns seconds taken."""
    shapes = expected_shapes(config)
    header, offset = {}, 0
    for key, shape in shapes.items():
        size = 2 * torch.Size(shape).numel()
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned
    t0 = time.perf_counter()
    partial = path.with_suffix(".partial")
    with open(partial, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for n, (key, tensor) in enumerate(iter_random_weights(config, seed=0, dtype=torch.bfloat16)):
            f.write(tensor.contiguous().view(torch.uint8).numpy().tobytes())
            if n % 40 == 0:
                print(f"  writing {path.name}: {f.tell() / 1e9:.1f} / {offset / 1e9:.1f} GB", flush=True)
    partial.rename(path)  # only a complete file has the final name
    return time.perf_counter() - t0


MEASURE = r'''
import json, os, sys, time
sys.path.insert(0, {root!r})
import torch
from rwkv_playground import load_runtime
from rwkv_playground.kernels import load_kernel

def status(key):
    return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith(key))

kernel = load_kernel('cpu')
open('/proc/self/clear_refs', 'w').write('5')
before = status('VmRSS')
t0 = time.perf_counter()
runtime = load_runtime({path!r}, dtype={dtype!r})
load_s = time.perf_counter() - t0
loaded_peak = status('VmHWM')
model_bytes = sum(t.numel() * t.element_size() for t in runtime.model.state_dict().values())
emb = runtime.model.emb.weight
read_per_token = model_bytes - emb.numel() * emb.element_size()  # the embedding: one row a token
logits, state = runtime.forward(list(range({prompt})))
for _ in range(4):  # warm-up steps: the generating process's memory, before the bound's buffer
    logits = runtime.step([int(logits.argmax())], [state])[0]
generating_peak = status('VmHWM')
# the bound is sampled between the steps (this VM's bandwidth drifts): all threads streaming a
# buffer of 8x the last-level cache, the best kept
buffer = torch.empty(4 << 30, dtype=torch.uint8).fill_(1)
times, reads = [], []
for i in range({generate}):
    t = time.perf_counter()
    logits = runtime.step([int(logits.argmax())], [state])[0]
    times.append(time.perf_counter() - t)
    t = time.perf_counter()
    kernel.stream_read(buffer, 'auto')
    reads.append(time.perf_counter() - t)
assert bool(torch.isfinite(logits).all())
best = min(reads)
del buffer
tok_s = 1 / min(times)
print(json.dumps({{"load_s": load_s, "peak_rss_GB": (loaded_peak - before) / 1e9,
                   "peak_rss_after_generation_GB": (generating_peak - before) / 1e9,
                   "model_GB": model_bytes / 1e9, "tok_s": tok_s, "median_tok_s": 1 / sorted(times)[len(times) // 2],
                   "stream_read_GB_s": (4 << 30) / best / 1e9,
                   "fraction_of_bandwidth_bound": tok_s * read_per_token / ((4 << 30) / best),
                   "describe": {{k: v for k, v in runtime.describe().items() if k in ("dtype", "step", "gemm", "simd")}}}}))
'''


def mem_total() -> int:
    return next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal"))


def run_one(shape: str, dtype: str, scratch: Path, keep: bool) -> dict:
    config = BIG_SHAPES[shape]
    need = file_bytes(config)
    path = scratch / f"random-{shape}-bf16.safetensors"
    row = {"shape": shape, "dtype": dtype, "n_layer": config.n_layer, "n_embd": config.n_embd,
           "file_GB": need / 1e9, "machine_memory_GB": mem_total() / 1e9}
    if not path.exists():
        scratch.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".partial").unlink(missing_ok=True)  # an interrupted write
        free = shutil.disk_usage(scratch).free
        if free < need + MARGIN:
            row["not_run"] = (f"not enough free disk in {scratch}: {free / 1e9:.1f} GB free, "
                              f"{(need + MARGIN) / 1e9:.1f} GB needed for the {need / 1e9:.1f} GB checkpoint")
            print(row["not_run"], flush=True)
            return row
        row["write_s"] = write_safetensors(path, config)
    code = MEASURE.format(root=str(ROOT), path=str(path), dtype=dtype, prompt=PROMPT, generate=GENERATE)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        row["not_run"] = "the load or generation failed: " + out.stderr.strip().splitlines()[-1][-300:]
        print(row["not_run"], flush=True)
    else:
        row.update(json.loads(out.stdout.strip().splitlines()[-1]))
    return row


def write(rows: list[dict]) -> None:
    existing = {}
    stored = results_dir() / "big_shapes.json"
    if stored.exists():  # runs made separately (e.g. one shape at a time) are kept side by side
        existing = {(r["shape"], r["dtype"]): r for r in json.loads(stored.read_text())["results"]}
    for r in rows:
        existing[r["shape"], r["dtype"]] = r
    rows = list(existing.values())
    m = machine()
    md = ["# Big shapes: Raven 14B and 7B, RWKV-7 G1 7.2B and a 13B-class RWKV-7 (random weights, bf16 file)", "",
          f"Machine: {m['cpu']}, {m['cores']} cores, {rows[0]['machine_memory_GB']:.1f} GB memory, "
          f"torch {m['torch']}, {m['date']}. Generation: the fused one-token step after a {PROMPT}-token "
          f"prompt, best of {GENERATE} steps; bound: weights read per token / `stream_read` (4 GB buffer, "
          "sampled between the steps, best kept).", "",
          "| shape | dtype | file GB | model in memory GB | load s | peak RSS GB (load / after generating) "
          "| tok/s (best / median) | fraction of bandwidth bound (best) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = f"{r['shape']} ({r['n_layer']} x {r['n_embd']})"
        if "not_run" in r:
            md.append(f"| {name} | {r['dtype']} | {r['file_GB']:.1f} | - | - | - | - | not run: {r['not_run']} |")
            continue
        md.append(f"| {name} | {r['dtype']} | {r['file_GB']:.1f} | {r['model_GB']:.1f} | {r['load_s']:.0f} | "
                  f"{r['peak_rss_GB']:.1f} / {r['peak_rss_after_generation_GB']:.1f} | "
                  f"{r['tok_s']:.2f} / {r['median_tok_s']:.2f} | "
                  f"{r['fraction_of_bandwidth_bound']:.0%} |")
    write_results("big_shapes", {"machine": m, "results": rows}, "\n".join(md) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS), help="shape:dtype, e.g. 14B:int8 7B:bf16")
    parser.add_argument("--scratch", type=Path, default=CACHE / "big", help="where the checkpoints are written")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints for another run")
    args = parser.parse_args()
    runs = [tuple(r.split(":")) for r in args.runs]
    for shape, dtype in runs:
        if shape not in BIG_SHAPES or dtype not in ("bf16", "int8", "fp32"):
            parser.error(f"unknown run {shape}:{dtype}")
    rows = []
    for i, (shape, dtype) in enumerate(runs):
        rows.append(run_one(shape, dtype, args.scratch, args.keep))
        print(json.dumps(rows[-1]), flush=True)
        path = args.scratch / f"random-{shape}-bf16.safetensors"
        if not args.keep and path.exists() and all(s != shape for s, _ in runs[i + 1:]):
            path.unlink()  # 28 GB of scratch: gone as soon as no later run needs it
    write(rows)


if __name__ == "__main__":
    main()
