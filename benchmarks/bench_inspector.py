"""State inspector: record a 512-token text on the demo model, then draw every view (CPU).

    python benchmarks/bench_inspector.py      # target: under 2 s in all
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
    md = ("# State inspector on the demo model (CPU)\n\n"
          f"Machine: {data['machine']['cpu']}, {data['machine']['cores']} cores, {data['machine']['date']}.\n\n"
          f"| step | time (best of 3) |\n|---|---|\n| record {len(tokens)} tokens | {best[0]:.3f} s |\n"
          f"| draw every view | {best[1]:.3f} s |\n| **record + draw** | **{best[0] + best[1]:.3f} s** (target < 2 s) |\n"
          f"| redraw after a slider move | {best[2]:.3f} s |\n")
    write_results("inspector", data, md)


if __name__ == "__main__":
    main()
