"""State inspector on the demo models (CPU): record a 512-token text and draw every view (target:
under 2 s), then the experiments: a sweep of 32 knock-outs over those 512 tokens (one batched pass
from the first edit; target: at most 5 s), a causal trace, a logit lens, and their figures. Then
the same on the RWKV-7 demo model's matrix state: record + draw every matrix view (target < 2 s),
32 patchings from a clean run over 512 tokens (target <= 5 s), a restore sweep, remove, blend.

    python benchmarks/bench_inspector.py
"""

from __future__ import annotations

import time

from common import ROOT, machine, write_results


def main() -> None:
    from rwkv_playground.serving.engine import DEMO_CHECKPOINT, Engine
    from rwkv_playground.inspector import record
    from rwkv_playground.ui import figures
    from rwkv_playground.ui.inspector_tab import draw_views

    loaded = Engine().load(DEMO_CHECKPOINT)
    text = (ROOT / "README.md").read_text() * 3
    tokens = loaded.tokenizer.encode(text)[:512]
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        rec = record(loaded.runtime, loaded.tokenizer, tokens)
        t1 = time.perf_counter()
        draw_views(rec, 2, 256, "0-63", 128)
        figures.decay_spectrum(rec.time_decay), figures.half_life_heatmap(rec.time_decay)
        figures.bonus_heatmap(rec.time_first), figures.bonus_vs_decay(rec.time_decay, rec.time_first)
        t2 = time.perf_counter()
        draw_views(rec, 3, 100, "0-63", 128)  # a slider move
        t3 = time.perf_counter()
        times.append((t1 - t0, t2 - t1, t3 - t2))
    best = min(times, key=sum)
    data = {"machine": machine(), "tokens": len(tokens), "record_s": best[0], "draw_all_s": best[1],
            "redraw_after_slider_s": best[2], "total_s": best[0] + best[1]}
    data["experiments"] = experiment_times(loaded, rec, tokens)
    data["rwkv7"] = matrix_times(text)
    md = ("# State inspector on the demo model (CPU)\n\n"
          f"Machine: {data['machine']['cpu']}, {data['machine']['cores']} cores, {data['machine']['date']}.\n\n"
          f"| step | time (best of 3) |\n|---|---|\n| record {len(tokens)} tokens | {best[0]:.3f} s |\n"
          f"| draw every view | {best[1]:.3f} s |\n| **record + draw** | **{best[0] + best[1]:.3f} s** (target < 2 s) |\n"
          f"| redraw after a slider move | {best[2]:.3f} s |\n")
    e = data["experiments"]
    md += ("\n## Experiments (best of 3 each)\n\n| experiment | engine | figure |\n|---|---|---|\n"
           f"| **32 knock-outs (erase; 4 layers x 8 channel groups, edits at tokens 0-31) x {len(tokens)} tokens** "
           f"| **{e['knockouts_s']:.3f} s** (target <= 5 s) | {e['knockouts_figure_s']:.3f} s |\n"
           f"| causal trace of token 500 (24 groups x 24 positions) | {e['causal_trace_s']:.3f} s "
           f"| {e['causal_trace_figure_s']:.3f} s |\n"
           f"| logit lens, {len(tokens)} tokens | {e['logit_lens_s']:.3f} s | {e['logit_lens_figure_s']:.3f} s |\n"
           f"| memory probe (from the recording) | {e['memory_probe_s']:.3f} s | {e['memory_probe_figure_s']:.3f} s |\n")
    m = data["rwkv7"]
    md += ("\n## RWKV-7 demo model: the matrix state (best of 3 each)\n\n| step | time |\n|---|---|\n"
           f"| record {m['tokens']} tokens | {m['record_s']:.3f} s |\n"
           f"| draw every matrix view (layer 2, head 1, window 128) | {m['draw_all_s']:.3f} s |\n"
           f"| **record + draw** | **{m['record_s'] + m['draw_all_s']:.3f} s** (target < 2 s) |\n"
           f"| redraw after a slider move | {m['redraw_s']:.3f} s |\n"
           f"| **32 patchings from the clean run (24 heads + 6 layers + 2 channel groups, restored after token 16), "
           f"{m['tokens']} tokens** | **{m['patch32_s']:.3f} s** (target <= 5 s) |\n"
           f"| restore sweep: 6 layers x 32 positions before token {m['tokens'] - 1} (192 patchings) | "
           f"{m['sweep_s']:.3f} s |\n"
           f"| remove token 20 from every layer at token 100, read to {m['tokens']} | {m['remove_s']:.3f} s |\n"
           f"| blend two {m['tokens']}-token texts, 5 alphas, 12 greedy tokens | {m['blend_s']:.3f} s |\n")
    write_results("inspector", data, md)


def matrix_times(text: str) -> dict:
    from rwkv_playground.inspector import patching
    from rwkv_playground.serving.engine import DEMO_CHECKPOINTS, Engine
    from rwkv_playground.inspector.matrix import record_matrix
    from rwkv_playground.ui.inspector_tab import draw_views

    loaded = Engine().load(DEMO_CHECKPOINTS[1])
    runtime, tokenizer = loaded.runtime, loaded.tokenizer
    clean = tokenizer.encode(text)[:512]
    corrupt = list(clean)
    corrupt[10] = (corrupt[10] + 1) % runtime.config.vocab_size
    c = runtime.config

    def best(run, repeat=3):
        out, fastest = None, float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            out = run()
            fastest = min(fastest, time.perf_counter() - t0)
        return out, fastest

    rec, record_s = best(lambda: record_matrix(runtime, tokenizer, clean))
    _, draw_s = best(lambda: draw_views(rec, 2, 256, "0-63", 128, 1))
    _, redraw_s = best(lambda: draw_views(rec, 3, 100, "0-63", 128, 2))
    parts = ([patching.StatePart(layer, head=h) for layer in range(c.n_layer) for h in range(c.n_head)]
             + [patching.StatePart(layer) for layer in range(c.n_layer)]
             + [patching.StatePart(0, channels=tuple(range(16))), patching.StatePart(5, channels=tuple(range(16)))])
    parts = parts[:32]
    _, patch_s = best(lambda: patching.patch(runtime, tokenizer, clean, corrupt, 16, parts))
    _, sweep_s = best(lambda: patching.restore_sweep(runtime, tokenizer, clean, corrupt, len(clean) - 1, 32))
    _, remove_s = best(lambda: patching.remove_token_experiment(runtime, tokenizer, clean, 20, 100))
    other = clean[256:] + clean[:256]
    _, blend_s = best(lambda: patching.blend(runtime, tokenizer, clean, other))
    out = {"tokens": len(clean), "patchings": len(parts), "record_s": record_s, "draw_all_s": draw_s,
           "redraw_s": redraw_s, "patch32_s": patch_s, "sweep_s": sweep_s, "remove_s": remove_s, "blend_s": blend_s}
    print("rwkv7", {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}, flush=True)
    return out


def experiment_times(loaded, rec, tokens) -> dict:
    from rwkv_playground.inspector import knockouts as experiments
    from rwkv_playground.ui import figures

    runtime, tokenizer = loaded.runtime, loaded.tokenizer
    C = runtime.config.n_embd
    groups = experiments.channel_groups(4, C, 8)  # layers 0-3, 8 groups each: 32 knock-outs
    sweep = [experiments.Knockout(layer, tuple(range(a, b)), i) for i, (layer, (a, b)) in enumerate(groups)]
    runs = {
        "knockouts": (lambda: experiments.knockouts(runtime, tokenizer, tokens, sweep), figures.knockout_effects),
        "causal_trace": (lambda: experiments.causal_trace(runtime, tokenizer, tokens, 500, 4, 24),
                         figures.causal_trace_heatmap),
        "logit_lens": (lambda: experiments.logit_lens(runtime, tokenizer, tokens), figures.logit_lens_heatmap),
        "memory_probe": (lambda: experiments.memory_probe(rec, 100), figures.memory_probe_lines),
    }
    out = {}
    for name, (run, draw) in runs.items():
        best_run = best_draw = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            result = run()
            t1 = time.perf_counter()
            draw(result)
            best_run, best_draw = min(best_run, t1 - t0), min(best_draw, time.perf_counter() - t1)
        out[f"{name}_s"], out[f"{name}_figure_s"] = best_run, best_draw
        print(name, f"{best_run:.3f} s, figure {best_draw:.3f} s", flush=True)
    return out


if __name__ == "__main__":
    main()
