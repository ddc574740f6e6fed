"""State inspector on the demo model (CPU): record a 512-token text and draw every view (target:
under 2 s), then the experiments: a sweep of 32 knock-outs over those 512 tokens (one batched pass
from the first edit; target: at most 5 s), a causal trace, a logit lens, and their figures.

    python benchmarks/bench_inspector.py
"""

from __future__ import annotations

import time

from common import ROOT, machine, write_results


def main() -> None:
    from rwkv_playground.engine import DEMO_CHECKPOINT, Engine
    from rwkv_playground.inspection import record
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
    write_results("inspector", data, md)


def experiment_times(loaded, rec, tokens) -> dict:
    from rwkv_playground import experiments
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
