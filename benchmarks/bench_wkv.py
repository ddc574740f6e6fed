"""WKV kernels against the reference and against the rwkv pip package, in one run.

    python benchmarks/bench_wkv.py            # CPU: 169M shape, prompt of 512 tokens
    python benchmarks/bench_wkv.py --cuda     # on a GPU: kernel bandwidth + fp16 prompt vs rwkv's CUDA path

CPU: the whole prompt forward (12 x 768 x 50277, T=512) with the C++ kernel, with the PyTorch
reference WKV, and with the rwkv package's sequence path; plus the share of the forward spent in
WKV (timed inside the engine's forward). GPU: effective bandwidth of the forward kernel
(bytes read + written / time) for B*C >= 65536, T = 1024.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from common import best_of, checkpoint, machine, write_results

os.environ.setdefault("RWKV_JIT_ON", "1")


def timed_wkv(runtime):
    """Wrap the runtime's WKV operator to accumulate the seconds spent in it."""
    operator = runtime.backends.wkv
    inner = operator.forward
    spent = [0.0]

    def wrapper(*args):
        t0 = time.perf_counter()
        out = inner(*args)
        if out[0].is_cuda:
            torch.cuda.synchronize()
        spent[0] += time.perf_counter() - t0
        return out

    operator.forward = wrapper
    return spent


def cpu_benchmark(tokens_n: int, repeat: int) -> None:
    from rwkv_playground import load_runtime
    from rwkv_playground.wkv import WKVOperator

    path = checkpoint("169M")
    tokens = torch.randint(0, 50277, (tokens_n,), generator=torch.Generator().manual_seed(0)).tolist()
    rows = {}
    for impl in ("cpu", "reference"):
        runtime = load_runtime(path, wkv=impl, chunk_len=tokens_n)
        op = runtime.backends.wkv
        runtime.backends.wkv = WKVOperator(op.name, op.forward, op.train)  # a private copy to time
        rows[impl] = best_of(lambda r=runtime: r.forward(tokens), repeat=repeat)
        spent = timed_wkv(runtime)
        runtime.forward(tokens)
        spent[0] = 0.0
        t0 = time.perf_counter()
        runtime.forward(tokens)
        rows[impl]["wkv_share"] = spent[0] / (time.perf_counter() - t0)
        rows[impl]["tokens_per_s"] = tokens_n / rows[impl]["min_s"]
        del runtime
    os.environ["RWKV_CUDA_ON"] = "0"
    from rwkv.model import RWKV

    ref = RWKV(str(path), strategy="cpu fp32", verbose=False)
    rows["rwkv_pip"] = best_of(lambda: ref.forward(tokens, None), repeat=repeat)
    rows["rwkv_pip"]["tokens_per_s"] = tokens_n / rows["rwkv_pip"]["min_s"]
    data = {"machine": machine(), "shape": "169M (12 x 768 x 50277)", "prompt_tokens": tokens_n, "results": rows}
    md = [f"# WKV on CPU: prompt of {tokens_n} tokens, 169M shape, fp32",
          "", f"Machine: {data['machine']['cpu']}, {data['machine']['cores']} cores, torch "
          f"{data['machine']['torch']}, {data['machine']['date']}.", "",
          "| implementation | prompt time (best of %d) | tokens/s | WKV share of the forward |" % repeat,
          "|---|---|---|---|"]
    names = {"cpu": "this engine, C++ WKV kernel", "reference": "this engine, PyTorch reference WKV",
             "rwkv_pip": "rwkv 0.8.32 pip package (cpu fp32)"}
    for key, row in rows.items():
        share = f"{row['wkv_share'] * 100:.1f} %" if "wkv_share" in row else "(about 37 % per the issue; not instrumented)"
        md.append(f"| {names[key]} | {row['min_s'] * 1000:.0f} ms | {row['tokens_per_s']:.0f} | {share} |")
    md.append("")
    md.append(f"Speed-up of the engine (C++ kernel) over the pip package: "
              f"{rows['rwkv_pip']['min_s'] / rows['cpu']['min_s']:.2f}x.")
    write_results("wkv_cpu", data, "\n".join(md) + "\n")


def cuda_benchmark(repeat: int) -> None:
    from rwkv_playground.kernels import load_kernel
    from rwkv_playground.wkv import empty_wkv_state, make_compiled_wkv

    forward, _ = make_compiled_wkv(load_kernel("cuda", progress=print))
    rows = []
    for B, C, dtype in ((64, 1024, torch.float16), (64, 1024, torch.float32), (16, 4096, torch.float16),
                        (128, 768, torch.bfloat16)):
        T = 1024
        g = torch.Generator(device="cuda").manual_seed(0)
        k = torch.randn(B, T, C, device="cuda", generator=g).to(dtype)
        v = torch.randn(B, T, C, device="cuda", generator=g).to(dtype)
        w = -torch.exp(torch.randn(C, device="cuda"))
        u = torch.randn(C, device="cuda")
        aa, bb, pp = empty_wkv_state(B, C, "cuda")

        def run():
            forward(w, u, k, v, aa, bb, pp)
            torch.cuda.synchronize()

        timing = best_of(run, repeat=repeat * 4, warmup=3)
        elem = k.element_size()
        moved = 3 * B * T * C * elem + 2 * 3 * B * C * 4 + 2 * C * 4  # k, v in, y out; state in/out
        rows.append({"B": B, "C": C, "T": T, "dtype": str(dtype), "ms": timing["min_s"] * 1e3,
                     "GB_per_s": moved / timing["min_s"] / 1e9})
    data = {"machine": machine(), "results": rows}
    md = ["# WKV CUDA forward: effective bandwidth (bytes read + written / time)", "",
          f"Device: {data['machine'].get('gpu')}, {data['machine']['date']}.", "",
          "| B | C | T | dtype | time | effective GB/s |", "|---|---|---|---|---|---|"]
    md += [f"| {r['B']} | {r['C']} | {r['T']} | {r['dtype']} | {r['ms']:.3f} ms | {r['GB_per_s']:.0f} |" for r in rows]
    write_results("wkv_cuda", data, "\n".join(md) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cuda", action="store_true")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    if args.cuda:
        cuda_benchmark(args.repeat)
    else:
        cpu_benchmark(args.tokens, args.repeat)
