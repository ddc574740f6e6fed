"""Speed on an NVIDIA GPU: the CUDA recurrences against their PyTorch references, and whole models
(prompt of 512 tokens, then 128 one-token steps) per architecture and dtype.

    python benchmarks/bench_gpu.py            # (tools/gpu_check.sh runs it)

Shapes: RWKV-4 169M, RWKV-7 G1 0.1B and 0.4B, RWKV-6 24 x 1024, random weights. The kernels'
rows give the bandwidth they reach (bytes of inputs, outputs and state moved per second). No peer
engine here: the rwkv package is not installed on a bare GPU machine (bench_speed.py compares
with it where it is).
"""

from __future__ import annotations

import json
import sys
import time

import torch

from common import SHAPES, architecture_of, checkpoint, machine, write_results

ROWS = [("169M", "fp16"), ("v7-0.1B", "fp16"), ("v7-0.1B", "bf16"), ("v7-0.4B", "fp16"), ("v6-24x1024", "fp16")]
PROMPT, GENERATE = 512, 128


def timed(fn, repeat=5):
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def kernel_rows() -> list[dict]:
    import torch.nn.functional as F

    from rwkv_playground.kernels import load_kernel
    from rwkv_playground.wkv import reference_matrix_wkv

    module = load_kernel("cuda")
    rows = []
    for kind in ("wkv5", "wkv7"):
        B, T, H, N = 8, 512, 16, 64  # a 0.4B-shape layer, 8 prompts
        g = torch.Generator(device="cuda").manual_seed(0)
        t = [torch.randn(B, T, H, N, device="cuda", generator=g) for _ in range(6)]
        state = torch.randn(B, H, N, N, device="cuda", generator=g)
        if kind == "wkv5":
            args = [t[0], t[1], t[2], torch.sigmoid(t[3]), torch.randn(H, N, device="cuda"), state]
        else:
            args = [t[0], torch.sigmoid(t[1]) * 0.45 + 0.545, t[2], t[3], F.normalize(t[4], dim=-1),
                    torch.sigmoid(t[5]), state]
        seconds = timed(lambda: getattr(module, f"{kind}_forward")(*args))
        ref_seconds = timed(lambda: getattr(reference_matrix_wkv, kind)(*args), repeat=1)
        moved = sum(a.numel() * a.element_size() for a in args) + B * T * H * N * 4 + state.numel() * 4
        rows.append({"kernel": kind, "B": B, "T": T, "H": H, "N": N, "ms": seconds * 1e3,
                     "reference_ms": ref_seconds * 1e3, "speedup_vs_reference": ref_seconds / seconds,
                     "GB_s": moved / seconds / 1e9})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def model_rows() -> list[dict]:
    from rwkv_playground import load_runtime

    rows = []
    for shape, dtype in ROWS:
        path = checkpoint(shape, torch.float32)
        runtime = load_runtime(path, device="cuda", dtype=dtype)
        tokens = torch.randint(0, min(50277, SHAPES[shape].vocab_size), (PROMPT,)).tolist()
        prompt_s = timed(lambda: runtime.forward(tokens), repeat=3)
        _, state = runtime.forward(tokens)

        def generate():
            for i in range(GENERATE):
                runtime.step([i], [state])

        generate_s = timed(generate, repeat=2)
        rows.append({"shape": shape, "architecture": architecture_of(shape), "dtype": dtype,
                     "wkv": runtime.describe()["wkv"], "step": runtime.describe()["step"],
                     "prompt_tok_s": PROMPT / prompt_s, "generate_tok_s": GENERATE / generate_s})
        print(json.dumps(rows[-1]), flush=True)
        runtime = state = None  # the next shape's weights take this one's place on the card
        torch.cuda.empty_cache()
    return rows


def main() -> int:
    if not torch.cuda.is_available():
        print("bench_gpu needs an NVIDIA GPU visible to PyTorch", file=sys.stderr)
        return 1
    data = {"machine": machine(), "kernels": kernel_rows(), "models": model_rows()}
    md = [f"# On {data['machine'].get('gpu', 'a GPU')} ({data['machine']['date']}, torch {data['machine']['torch']})",
          "", "| kernel | B x T x H x N | ms | reference ms | speed-up | GB/s |", "|---|---|---|---|---|---|"]
    for r in data["kernels"]:
        md.append(f"| {r['kernel']} | {r['B']} x {r['T']} x {r['H']} x {r['N']} | {r['ms']:.2f} | "
                  f"{r['reference_ms']:.1f} | {r['speedup_vs_reference']:.0f}x | {r['GB_s']:.0f} |")
    md += ["", "| model | dtype | WKV | step | prompt tok/s | generation tok/s |", "|---|---|---|---|---|---|"]
    for r in data["models"]:
        md.append(f"| {r['shape']} | {r['dtype']} | {r['wkv']} | {r['step']} | {r['prompt_tok_s']:.0f} | "
                  f"{r['generate_tok_s']:.1f} |")
    write_results("gpu", data, "\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
