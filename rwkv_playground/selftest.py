"""Every fast path against its reference, on this machine's own hardware.

    python -m rwkv_playground.selftest              # the CPU, and every GPU PyTorch can see
    python -m rwkv_playground.selftest --device cpu
    python -m rwkv_playground.selftest --json       # the same, as JSON for a bug report

GPU owners: run this first, and attach its output to a bug report. The CUDA code is developed on
machines without a GPU (see README, "CUDA: what is verified where"): this is where it meets one.

Each row: an implementation on a device and dtype, its largest error against the reference on
random inputs (relative to the reference's largest value) next to the tolerance, and the speed of
a short generation where that applies. The exit status is 1 if any row is over its tolerance.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass

import torch

from .backends import resolve
from .errors import PlaygroundError
from .kernels import load_kernel
from .models import rwkv4, rwkv5, rwkv6, rwkv7
from .models.rwkv4 import RWKVConfig
from .models.rwkv5 import RWKV5Config
from .models.rwkv6 import RWKV6Config
from .models.rwkv7 import RWKV7Config
from .wkv import compiled_wkv, empty_wkv_state, reference_matrix_wkv, wkv_reference

# Output tolerance relative to the largest |value|: the inputs are identical, so only rounding of
# the input dtype, fp32 summation order and exp accuracy differ.
WKV_TOL = {"fp32": 2e-5, "bf16": 1e-2, "fp16": 2e-3}
# The one-token step against the model's PyTorch forward on the CPU (fp32 math on the same weights;
# fp16 against fp32). On a GPU, bf16 and fp16 matmuls round their activations too.
STEP_TOL = {("cpu", "fp32"): 1e-5, ("cpu", "bf16"): 1e-5, ("cpu", "fp16"): 2e-2,
            ("cuda", "fp32"): 1e-4, ("cuda", "bf16"): 3e-2, ("cuda", "fp16"): 2e-2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# one small model per architecture (head size 64, as every released model)
STEP_MODELS = [
    (rwkv4.ARCHITECTURE, RWKVConfig(n_layer=4, n_embd=256, vocab_size=1000, ffn_dim=1024)),
    (rwkv5.ARCHITECTURE, RWKV5Config(3, 256, 1000, 896, 4, 64)),
    (rwkv6.ARCHITECTURE, RWKV6Config(3, 256, 1000, 896, 4, 64, mix_lora=32, decay_lora=64)),
    (rwkv7.ARCHITECTURE, RWKV7Config(3, 256, 1000, 1024, 4, 64, decay_lora=32, iclr_lora=32, value_lora=16,
                                     gate_lora=64)),
]


@dataclass
class Row:
    check: str  # "wkv", "step", "sampler"
    implementation: str
    device: str
    dtype: str
    max_error: float
    tolerance: float
    tokens_per_second: float | None = None
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.max_error <= self.tolerance


def _relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    got, expected = got.detach().double().cpu(), expected.detach().double().cpu()
    return float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


def _wkv_inputs(dtype: torch.dtype, device: str, extreme: bool):
    g = torch.Generator().manual_seed(7)
    B, T, C = 2, 160, 97  # B*C not a multiple of a CUDA block; T over several steps of every loop
    w = -torch.exp(torch.randn(C, generator=g) * 2)
    if extreme:
        w[::5] = -3000.0
        w[1::7] = 0.3
    u = torch.randn(C, generator=g)
    k = (torch.randn(B, T, C, generator=g) * (20 if extreme else 2)).clamp(-60, 60)
    v = torch.randn(B, T, C, generator=g)
    aa, bb, pp = empty_wkv_state(B, C)
    aa, bb, pp = wkv_reference(w, u, k[:, :40], v[:, :40], aa, bb, pp)[1:]  # a non-empty state in
    return [t.to(device) for t in (w, u, k.to(dtype), v.to(dtype), aa, bb, pp)]


def check_wkv(devices: list[str]) -> list[Row]:
    rows = []
    for device in devices:
        try:
            module = load_kernel(device)
        except RuntimeError as exc:
            rows.append(Row("wkv", device, device, "-", float("inf"), 0.0, note=f"unavailable: {exc}"))
            continue
        operator = compiled_wkv(module, device)
        for name, dtype in DTYPES.items():
            error = 0.0
            for extreme in (False, True):
                inputs = _wkv_inputs(dtype, device, extreme)
                y_ref, aa_r, bb_r, pp_r = wkv_reference(*(t.cpu().float() if t.dim() == 3 else t.cpu()
                                                          for t in inputs))
                y, aa, bb, pp = operator.forward(*inputs)
                error = max(error, _relative(y.float(), y_ref), _relative(aa / bb, aa_r / bb_r),
                            _relative(pp + torch.log(bb), pp_r + torch.log(bb_r)))
            rows.append(Row("wkv", f"{device} kernel", device, name, error, WKV_TOL[name]))
    return rows


def _matrix_inputs(kind: str, dtype: torch.dtype, device: str):
    """[B, T, H, N] inputs of the RWKV-5/6 or RWKV-7 recurrence (w, u and the state float32)."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(9)
    B, T, H, N = 2, 70, 3, 64

    def randn(*shape):
        return torch.randn(shape, generator=g)

    r, k, v = randn(B, T, H, N), randn(B, T, H, N), randn(B, T, H, N)
    state = randn(B, H, N, N)
    if kind == "wkv5":
        w = torch.exp(-torch.exp(randn(B, T, H, N) * 2 - 2))
        args = [r.to(dtype), k.to(dtype), v.to(dtype), w, randn(H, N), state]
    else:
        w = torch.exp(-0.606531 * torch.sigmoid(randn(B, T, H, N) * 3))
        kk, a = F.normalize(randn(B, T, H, N), dim=-1), torch.sigmoid(randn(B, T, H, N))
        args = [r.to(dtype), w, k.to(dtype), v.to(dtype), kk.to(dtype), a.to(dtype), state]
    return [t.contiguous().to(device) for t in args]


def check_matrix_wkv(devices: list[str]) -> list[Row]:
    """The RWKV-5/6 and RWKV-7 recurrences of each device's kernels against the PyTorch reference."""
    rows = []
    for device in devices:
        try:
            module = load_kernel(device)
        except RuntimeError as exc:
            rows.append(Row("wkv5/7", device, device, "-", float("inf"), 0.0, note=f"unavailable: {exc}"))
            continue
        for kind in ("wkv5", "wkv7"):
            for name, dtype in DTYPES.items():
                if device == "cpu" and name != "fp32":
                    continue  # the CPU kernels take float32 (the models compute r, k, v in fp32)
                inputs = _matrix_inputs(kind, dtype, device)
                y_ref, s_ref = getattr(reference_matrix_wkv, kind)(*(t.cpu().float() for t in inputs))
                y, state = getattr(module, f"{kind}_forward")(*inputs)
                error = max(_relative(y.float(), y_ref), _relative(state, s_ref))
                rows.append(Row(kind, f"{device} kernel", device, name, error, WKV_TOL[name]))
    return rows


def _step_reference(weights, dtype: str, tokens: list[int]) -> list[torch.Tensor]:
    """The model's PyTorch forward on the CPU: logits after each token (fp16 is held to fp32)."""
    return _run_steps(_runtime_from(weights, "cpu", "fp32" if dtype == "fp16" else dtype, "reference"), tokens)[0]


def _runtime_from(weights, device: str, dtype: str, step: str):
    """A Runtime of random weights without a file (the same conversions as load_runtime)."""
    import tempfile
    from pathlib import Path

    from .runtime import load_runtime

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "selftest.pth"
        torch.save(weights, path)
        return load_runtime(path, device=device, dtype=dtype, step=step, wkv="auto")


def _run_steps(runtime, tokens: list[int]) -> tuple[list[torch.Tensor], float]:
    _, state = runtime.forward(tokens[:8])
    outputs, t0 = [], time.perf_counter()
    for token in tokens[8:]:
        outputs.append(runtime.step([token], [state])[0].float().cpu())
    if runtime.device.type == "cuda":
        torch.cuda.synchronize()
    return outputs, (len(tokens) - 8) / (time.perf_counter() - t0)


def check_step(devices: list[str]) -> list[Row]:
    rows = []
    for arch, config in STEP_MODELS:
        rows += _check_step_of(arch, config, devices)
    return rows


def _check_step_of(arch, config, devices: list[str]) -> list[Row]:
    weights = arch.random_weights(config, seed=11)
    tokens = torch.randint(0, config.vocab_size, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    title = arch.title
    rows = []
    for device in devices:
        for name in ("fp32", "bf16", "fp16"):
            reference = _step_reference(weights, name, tokens)
            choices = ["reference", "cpu"] if device == "cpu" and name != "fp16" else ["reference"]
            for step in choices:
                try:
                    runtime = _runtime_from(weights, device, name, step)
                except PlaygroundError as exc:
                    rows.append(Row(f"step {title}", step, device, name, float("inf"), 0.0, note=str(exc)))
                    continue
                isas = [None]
                if runtime._step_weights is not None:
                    isas = runtime.backends.cpu_kernels.available_isas()
                for isa in isas:
                    if isa is not None:
                        runtime._step_weights = runtime.model.fused_step(runtime.backends.cpu_kernels, isa)
                    outputs, speed = _run_steps(runtime, tokens)
                    error = max(_relative(o, r) for o, r in zip(outputs, reference))
                    label = runtime.describe()["step"] + ("" if runtime.describe()["step"] != "reference"
                                                          else f", WKV {runtime.describe()['wkv']}")
                    rows.append(Row(f"step {title}", label, device, name, error, STEP_TOL[device, name], speed))
    return rows


def check_sampler() -> list[Row]:
    import numpy as np

    from .sampling import sample_logits

    try:
        module = load_kernel("cpu")
    except RuntimeError as exc:
        return [Row("sampler", "cpu kernel", "cpu", "fp32", float("inf"), 0.0, note=f"unavailable: {exc}")]
    g = torch.Generator().manual_seed(5)
    mismatches, total = 0, 0
    for scale in (1.0, 3.0, 8.0):
        logits = (torch.randn(50277, generator=g) * scale).numpy().astype(np.float32)
        for top_p in (0.3, 0.7, 0.95):
            for seed in range(10):
                a = sample_logits(logits, 1.0, top_p, 0, np.random.default_rng(seed))
                b = sample_logits(logits, 1.0, top_p, 0, np.random.default_rng(seed), kernel=module)
                mismatches += a != b
                total += 1
    return [Row("sampler", "cpu kernel vs numpy", "cpu", "fp32", mismatches / total, 0.0,
                note=f"{mismatches} of {total} draws differ")]


def run(devices: list[str] | None = None) -> list[Row]:
    if devices is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return check_wkv(devices) + check_matrix_wkv(devices) + check_step(devices) + check_sampler()


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor()
            or platform.machine(), "cuda": torch.version.cuda}
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                           if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    return info


def table(rows: list[Row]) -> str:
    lines = ["| check | implementation | device | dtype | max error | tolerance | tokens/s | result |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speed = f"{r.tokens_per_second:.1f}" if r.tokens_per_second else "-"
        result = "ok" if r.ok else "**MISMATCH**"
        if r.note:
            result += f" ({r.note})"
        lines.append(f"| {r.check} | {r.implementation} | {r.device} | {r.dtype} | {r.max_error:.2e} | "
                     f"{r.tolerance:.0e} | {speed} | {result} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], action="append",
                        help="check only these devices (default: the CPU and any GPU)")
    parser.add_argument("--json", action="store_true", help="print JSON (machine, rows) instead of a table")
    args = parser.parse_args(argv)
    if args.device and "cuda" in args.device and not torch.cuda.is_available():
        print("No NVIDIA GPU is visible to PyTorch on this machine.", file=sys.stderr)
        return 1
    resolve(torch.device("cpu"), "fp32", progress=lambda msg: print(msg, file=sys.stderr))  # builds, with progress
    rows = run(args.device)
    if args.json:
        print(json.dumps({"machine": machine(), "rows": [{**asdict(r), "ok": r.ok} for r in rows]}, indent=2))
    else:
        print("RWKV Playground self-test: " + ", ".join(f"{k} {v}" for k, v in machine().items() if v))
        print(table(rows))
        bad = [r for r in rows if not r.ok]
        print(f"\n{len(rows) - len(bad)} of {len(rows)} checks passed" + (f"; {len(bad)} MISMATCH" if bad else "."))
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
