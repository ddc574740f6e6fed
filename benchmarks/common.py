"""Shared helpers for the benchmarks: random checkpoints of real shapes, timing, result files."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / "build" / "bench"

from rwkv_playground.models import by_name  # noqa: E402
from rwkv_playground.models.rwkv4 import RWKVConfig  # noqa: E402
from rwkv_playground.models.rwkv6 import RWKV6Config  # noqa: E402
from rwkv_playground.models.rwkv7 import RWKV7Config  # noqa: E402

SHAPES = {
    "169M": RWKVConfig(n_layer=12, n_embd=768, vocab_size=50277, ffn_dim=3072),
    "430M": RWKVConfig(n_layer=24, n_embd=1024, vocab_size=50277, ffn_dim=4096),
    # RWKV-7 G1 0.1B and 0.4B (LoRA widths of the releases), RWKV-6 World at 24 x 1024
    "v7-0.1B": RWKV7Config(12, 768, 65536, 3072, 12, 64, decay_lora=64, iclr_lora=64, value_lora=32, gate_lora=128),
    "v7-0.4B": RWKV7Config(24, 1024, 65536, 4096, 16, 64, decay_lora=64, iclr_lora=64, value_lora=32, gate_lora=128),
    "v6-24x1024": RWKV6Config(24, 1024, 65536, 3584, 16, 64, mix_lora=32, decay_lora=64),
}


def architecture_of(shape: str) -> str:
    return {"v7": "rwkv7", "v6": "rwkv6", "v5": "rwkv5"}.get(shape.split("-")[0], "rwkv4")


def checkpoint(shape: str, dtype=torch.float32) -> Path:
    """A deterministic random-weight checkpoint of a released shape (created once, cached)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    name = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    path = CACHE / f"random-{shape}-{name}.pth"
    if not path.exists():
        torch.save(by_name(architecture_of(shape)).random_weights(SHAPES[shape], seed=0, dtype=dtype), path)
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


# CPU features that decide which code paths run (and so which results are comparable)
FEATURES = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_bf16", "amx_int8")


def cpu_features() -> list[str]:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return [f for f in FEATURES if f in flags]
    except OSError:
        pass
    return []


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_features": cpu_features(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def machine_slug(info: dict | None = None) -> str:
    """The results folder of this kind of machine: vendor/model name plus the widest vector units,
    e.g. "amd-epyc_avx2" or "intel-xeon_avx512-amx"."""
    info = info or machine()
    name = re.sub(r"\(r\)|\(tm\)|processor|cpu|@.*", "", info["cpu"].lower())
    name = re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "unknown"
    features = set(info.get("cpu_features", []))
    vector = "avx512" if "avx512f" in features else "avx2" if "avx2" in features else "novec"
    extra = "-amx" if "amx_bf16" in features else "-bf16" if "avx512_bf16" in features else ""
    return f"{name}_{vector}{extra}"


def results_dir() -> Path:
    return RESULTS / machine_slug()


def write_results(name: str, data: dict, markdown: str) -> None:
    """Results go to results/<machine kind>/: every kind of CPU keeps its own."""
    folder = results_dir()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    (folder / f"{name}.md").write_text(markdown)
    print(markdown)
    print(f"written: {folder.relative_to(ROOT)}/{name}.json and .md")
