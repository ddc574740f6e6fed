"""Where the CPU speed comes from: each optimisation on and off, in the same run (169M shape).

    python benchmarks/bench_step.py

1. matvec: the streaming kernel (kernels/matvec_cpu.cpp, every instruction set this CPU runs) vs
   torch.mv on the 169M matrices, fp32 and bf16, as GB/s of weights read (cold: each matrix is
   read once per pass, as in generation), next to a plain streaming read of the same bytes.
2. the one-token step: the fused whole-model C++ step vs the model's PyTorch forward, tokens/s
   without sampling.
3. the prompt (512 tokens): with and without the last-layer shortcut, and for bf16 weights with
   and without the per-matmul fp32 upcast.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from common import SHAPES, best_of, checkpoint, machine, write_results


def per_call(fn, repeat: int = 5) -> float:
    """Best time of `repeat` calls after one warm-up (seconds)."""
    return best_of(fn, repeat=repeat)["min_s"]


def matvec_rows(kernel) -> list[dict]:
    c = SHAPES["169M"]
    shapes = {"att (C x C)": (c.n_embd, c.n_embd), "ffn key (4C x C)": (c.ffn_dim, c.n_embd),
              "ffn value (C x 4C)": (c.n_embd, c.ffn_dim), "head (V x C)": (c.vocab_size, c.n_embd)}
    rows = []
    for name, (n, k) in shapes.items():
        for dtype in (torch.float32, torch.bfloat16):
            one = torch.randn(n, k).to(dtype)
            nbytes = one.numel() * one.element_size()
            # enough distinct copies to exceed the caches: every call reads from memory
            mats = [one.clone() for _ in range(max(2, min(64, int(256e6 // nbytes))))]
            x = torch.randn(k)
            x_w = x.to(dtype)
            ours = {isa: per_call(lambda isa=isa: [kernel.matvec(m, x, None, isa) for m in mats], 3) / len(mats)
                    for isa in kernel.available_isas() if isa != "scalar"}
            torch_mv = per_call(lambda: [torch.mv(m, x_w) for m in mats], 3) / len(mats)
            # the same bytes read as float32 (torch's bf16/int16 sums are not vectorised)
            flat = torch.cat([m.view(-1) for m in mats]).view(torch.float32)
            stream = per_call(lambda: flat.sum(), 3) / len(mats)
            rows.append({"matrix": name, "dtype": str(dtype).split(".")[-1],
                         **{f"ours_{isa}_GB_s": nbytes / t / 1e9 for isa, t in ours.items()},
                         "torch_mv_GB_s": nbytes / torch_mv / 1e9, "stream_sum_GB_s": nbytes / stream / 1e9})
            print(rows[-1], flush=True)
    return rows


def step_rows() -> list[dict]:
    from rwkv_playground import load_runtime

    rows = []
    for dtype in ("fp32", "bf16"):
        path = checkpoint("169M", torch.bfloat16 if dtype == "bf16" else torch.float32)
        fused = load_runtime(path, dtype=dtype, step="cpu")
        plain = load_runtime(path, dtype=dtype, step="reference")  # the model's PyTorch forward
        _, state = fused.forward([1, 2, 3])
        n = 24

        def steps(runtime):
            s = state.clone()
            for t in range(n):
                runtime.step([t], [s])

        rows.append({"dtype": dtype, "fused_step_tok_s": n / per_call(lambda: steps(fused), 3),
                     "pytorch_step_tok_s": n / per_call(lambda: steps(plain), 3)})
        print(rows[-1], flush=True)
    return rows


def prompt_rows() -> list[dict]:
    from rwkv_playground import load_runtime
    from rwkv_playground import runtime as runtime_module

    tokens = np.random.default_rng(0).integers(0, 50277, 512).tolist()
    rows = []
    for dtype in ("fp32", "bf16"):
        m = load_runtime(checkpoint("169M", torch.bfloat16 if dtype == "bf16" else torch.float32), dtype=dtype)
        full = per_call(lambda: m.forward(tokens), 2)
        # the last-layer shortcut is off whenever something observes the internals
        no_shortcut = per_call(lambda: m.forward(tokens, observe=lambda *a: None), 2)
        row = {"dtype": dtype, "prompt_tok_s": 512 / full, "without_last_layer_shortcut_tok_s": 512 / no_shortcut}
        if dtype == "bf16":  # PyTorch's bf16 GEMM (activations rounded to bf16) instead of the upcast
            linears = [mod for mod in m.model.modules() if isinstance(mod, runtime_module.StoredLinear)]
            for mod in linears:
                mod.native_bf16 = True
            try:
                row["with_pytorch_bf16_gemm_tok_s"] = 512 / per_call(lambda: m.forward(tokens), 1)
            finally:
                for mod in linears:
                    mod.native_bf16 = False
        rows.append(row)
        print(row, flush=True)
    return rows


def main() -> None:
    from rwkv_playground.kernels import load_kernel

    kernel = load_kernel("cpu")
    data = {"machine": machine(), "matvec": matvec_rows(kernel), "step": step_rows(), "prompt": prompt_rows()}
    m = data["machine"]
    md = ["# Where the CPU speed comes from (169M shape)", "",
          f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['date']}.", "",
          "## Matrix-vector product (generation reads every weight once per token)", "",
          "| matrix | dtype | matvec_cpu.cpp matvec (per instruction set) | torch.mv | plain streaming read (torch sum) |",
          "|---|---|---|---|---|"]
    for r in data["matvec"]:
        ours = ", ".join(f"{key[5:-5]} {value:.1f}" for key, value in r.items() if key.startswith("ours_"))
        md.append(f"| {r['matrix']} | {r['dtype']} | {ours} GB/s | {r['torch_mv_GB_s']:.1f} GB/s | "
                  f"{r['stream_sum_GB_s']:.1f} GB/s |")
    md += ["", "## One-token step, no sampling (tokens/s)", "",
           "| dtype | fused C++ step | the model's PyTorch forward |", "|---|---|---|"]
    md += [f"| {r['dtype']} | {r['fused_step_tok_s']:.1f} | {r['pytorch_step_tok_s']:.1f} |" for r in data["step"]]
    md += ["", "## 512-token prompt (tokens/s)", "",
           "| dtype | as shipped | without the last-layer shortcut | with PyTorch's bf16 GEMM instead of the upcast |",
           "|---|---|---|---|"]
    md += [f"| {r['dtype']} | {r['prompt_tok_s']:.0f} | {r['without_last_layer_shortcut_tok_s']:.0f} | "
           f"{r['with_pytorch_bf16_gemm_tok_s']:.0f} |" if "with_pytorch_bf16_gemm_tok_s" in r else
           f"| {r['dtype']} | {r['prompt_tok_s']:.0f} | {r['without_last_layer_shortcut_tok_s']:.0f} | - |"
           for r in data["prompt"]]
    write_results("cpu_step_breakdown", data, "\n".join(md) + "\n")


if __name__ == "__main__":
    torch.set_num_threads(os.cpu_count() or 1)
    main()
