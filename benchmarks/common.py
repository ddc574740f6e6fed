"""Shared helpers for the benchmarks: random checkpoints of real shapes, timing, result files."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / "build" / "bench"

from rwkv_playground.model import RWKVConfig, init_random_weights  # noqa: E402

SHAPES = {
    "169M": RWKVConfig(n_layer=12, n_embd=768, vocab_size=50277, ffn_dim=3072),
    "430M": RWKVConfig(n_layer=24, n_embd=1024, vocab_size=50277, ffn_dim=4096),
}


def checkpoint(shape: str, dtype=torch.float32) -> Path:
    """A deterministic random-weight checkpoint of a released shape (created once, cached)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    name = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    path = CACHE / f"random-{shape}-{name}.pth"
    if not path.exists():
        torch.save(init_random_weights(SHAPES[shape], seed=0, dtype=dtype), path)
    return path


def best_of(fn, repeat: int = 5, warmup: int = 1) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"min_s": min(times), "median_s": statistics.median(times), "runs": repeat}


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write_results(name: str, data: dict, markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown)
    print(markdown)
    print(f"written: benchmarks/results/{name}.json and .md")
