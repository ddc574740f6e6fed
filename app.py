"""RWKV Playground: a browser playground for RWKV-4 language models.

    python app.py                                   # the bundled demo model, on 127.0.0.1:7860
    python app.py --model RWKV-4-Raven-7B.pth --tokenizer 20B_tokenizer.json --device cuda --dtype fp16
    python app.py --models-dir ~/models             # switch among the checkpoints of a folder
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no phone-home: works offline
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def parse_args(argv=None):
    from rwkv_playground.engine import DEMO_CHECKPOINT

    p = argparse.ArgumentParser(description="RWKV Playground (RWKV-4)")
    p.add_argument("--model", default=str(DEMO_CHECKPOINT), help="checkpoint (.pth or .safetensors); "
                   "default: the bundled demo model")
    p.add_argument("--tokenizer", default=None, help="tokenizer file (.json or World .txt); default: found "
                   "beside the checkpoint")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="default: fp32 on CPU, fp16 on CUDA")
    p.add_argument("--wkv", default=None, choices=["auto", "reference", "cpu", "cuda"],
                   help="WKV implementation (default: auto; env RWKV_PLAYGROUND_WKV)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--models-dir", default=None, help="folder whose checkpoints the browser may switch to")
    p.add_argument("--share", action="store_true", help="ask Gradio for a public share link (off by default)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from rwkv_playground import PlaygroundError
    from rwkv_playground.engine import Engine

    dtype = args.dtype or ("fp16" if args.device == "cuda" else "fp32")
    engine = Engine(models_dir=args.models_dir, device=args.device, dtype=dtype, wkv=args.wkv)

    def progress(message: str, fraction: float) -> None:
        print(f"[{fraction * 100:5.1f}%] {message}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    try:
        loaded = engine.load(args.model, tokenizer=args.tokenizer, progress=progress)
    except PlaygroundError as exc:
        print(f"Could not load the model: {exc}", file=sys.stderr)
        return 2
    info = loaded.describe()
    print(f"Model ready in {time.perf_counter() - t0:.1f} s: {info['name']} ({info['n_layer']}x{info['n_embd']}, "
          f"{info['parameters'] / 1e6:.1f} M parameters, {info['dtype']} on {info['device']}, WKV {info['wkv']})",
          file=sys.stderr)

    from rwkv_playground.ui import create_app, launch_options

    demo = create_app(engine)
    demo.queue(default_concurrency_limit=1)
    demo.launch(**launch_options(args.host, args.port, args.share))
    return 0


if __name__ == "__main__":
    sys.exit(main())
