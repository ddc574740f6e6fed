"""RWKV Playground: a browser playground for RWKV-4, 5, 6 and 7 language models.

    python app.py                                   # the bundled demo model, on 127.0.0.1:7860
    python app.py --model RWKV-4-Raven-7B.pth --tokenizer 20B_tokenizer.json --device cuda --dtype fp16
    python app.py --models-dir ~/models             # switch among the checkpoints of a folder
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
import time

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no phone-home: works offline
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def parse_args(argv=None):
    from rwkv_playground.serving.engine import DEMO_CHECKPOINT, ServingSettings
    from rwkv_playground.serving.scheduler import SchedulerSettings

    serving, scheduling = ServingSettings(), SchedulerSettings()
    p = argparse.ArgumentParser(description="RWKV Playground (RWKV-4, 5, 6 and 7)")
    p.add_argument("--model", default=str(DEMO_CHECKPOINT), help="checkpoint (.pth or .safetensors); "
                   "default: the bundled demo model")
    p.add_argument("--tokenizer", default=None, help="tokenizer file (.json or World .txt); default: found "
                   "beside the checkpoint")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "int8", "fp16"],
                   help="storage of the matrices; default: fp32 on CPU, fp16 on CUDA. int8 quantizes at load "
                        "(a quarter of fp32's memory; Raven 14B fits 24 GB)")
    g = p.add_argument_group("backends (each: auto, or force one; the model panel shows what runs)")
    g.add_argument("--wkv", default=None, choices=["auto", "reference", "cpu", "cuda"],
                   help="the WKV operator (env RWKV_PLAYGROUND_WKV)")
    g.add_argument("--step", default=None, choices=["auto", "reference", "cpu"],
                   help="the one-token step of generation (env RWKV_PLAYGROUND_STEP)")
    g.add_argument("--sampler", default=None, choices=["auto", "reference", "cpu"],
                   help="the top-p sampler (env RWKV_PLAYGROUND_SAMPLER)")
    g.add_argument("--gemm", default=None, choices=["auto", "upcast", "native"],
                   help="prompt products of bf16/int8 weights: fp32 on converted weights, or the CPU's native "
                        "bf16 GEMM (env RWKV_PLAYGROUND_GEMM; auto measures once where AMX/AVX512-BF16 exist)")
    s = p.add_argument_group("serving many visitors")
    s.add_argument("--max-active", type=int, default=scheduling.max_active,
                   help="generations advancing together, one batched step per token (default %(default)s)")
    s.add_argument("--max-queue", type=int, default=scheduling.max_queue,
                   help="requests waiting beyond those; visitors see their place (default %(default)s)")
    s.add_argument("--session-memory-mb", type=int, default=serving.memory_budget_bytes >> 20,
                   help="budget for what all sessions keep (states, recordings); past it the largest objects "
                        "of idle sessions are dropped (default: a tenth of this machine's memory, %(default)s)")
    s.add_argument("--session-ttl", type=float, default=serving.session_ttl_s / 60,
                   help="minutes after which an idle session is freed (default %(default)s)")
    s.add_argument("--undo-depth", type=int, default=serving.undo_depth,
                   help="chat turns whose states are kept for Undo / Regenerate (default %(default)s)")
    s.add_argument("--lock-models", action=argparse.BooleanOptionalAction, default=None,
                   help="no model switching or downloading from the browser (default: on with --share or a "
                        "non-loopback --host)")
    a = p.add_argument_group("OpenAI-compatible API (/v1/..., /health, /metrics on the same port)")
    a.add_argument("--no-api", dest="api", action="store_false", help="serve the UI only")
    a.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every /v1 route (env "
                   "RWKV_PLAYGROUND_API_KEY); beyond loopback the API is off unless a key is set")
    a.add_argument("--api-max-tokens", type=int, default=8192, help="most tokens one choice may ask for "
                   "(default %(default)s)")
    a.add_argument("--api-max-prompt-tokens", type=int, default=65536, help="most prompt tokens one request may "
                   "send (default %(default)s)")
    d = p.add_argument_group("saved work (conversations, posts, notebooks and their states)")
    d.add_argument("--data-dir", default=None, help="folder of the session store (SQLite); default: "
                   "$XDG_DATA_HOME/rwkv-playground (~/.local/share/rwkv-playground)")
    d.add_argument("--store", default=os.environ.get("RWKV_PLAYGROUND_STORE"),
                   help="a database URL instead (postgresql://user@host/db) for several app processes on one "
                   "database; a URL with a password belongs in the environment (RWKV_PLAYGROUND_STORE) or in "
                   "libpq's ~/.pgpass (PGPASSFILE), where `ps` does not show it")
    d.add_argument("--no-store", dest="use_store", action="store_false",
                   help="keep nothing beyond this process (an ephemeral public demo): work lasts as long as the tab")
    d.add_argument("--store-budget-mb", type=int, default=2048, help="disk the stored states may use; past it the "
                   "least recently used are dropped (rebuilt by reading the text again), never what visitors wrote")
    d.add_argument("--retention-days", type=float, default=30.0, help="delete the saved work of visitors idle "
                   "this long")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--models-dir", default=None, help="folder whose checkpoints the browser may switch to")
    p.add_argument("--share", action="store_true", help="ask Gradio for a public share link (off by default)")
    return p.parse_args(argv)


def is_public(host: str, share: bool) -> bool:
    if share:
        return True
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


def serving_settings(args):
    from rwkv_playground.serving.engine import ServingSettings
    from rwkv_playground.serving.scheduler import SchedulerSettings

    lock = args.lock_models if args.lock_models is not None else is_public(args.host, args.share)
    return ServingSettings(scheduler=SchedulerSettings(max_active=args.max_active, max_queue=args.max_queue),
                           memory_budget_bytes=args.session_memory_mb << 20, session_ttl_s=args.session_ttl * 60,
                           undo_depth=args.undo_depth, lock_models=lock)


def api_settings(args):
    """The API's settings from the flags: off with --no-api, off on a public host without a key."""
    from rwkv_playground.serving.api import API_KEY_ENV, ApiSettings, settings_from_env

    settings = settings_from_env(ApiSettings(enabled=args.api, api_key=args.api_key or None,
                                             max_tokens=args.api_max_tokens,
                                             max_prompt_tokens=args.api_max_prompt_tokens))
    if not args.api:
        settings.off_reason = "the app was started with --no-api"
    elif is_public(args.host, args.share) and not settings.api_key:
        settings.enabled = False
        settings.off_reason = ("the app listens beyond loopback and no API key is set (start it with --api-key KEY "
                               f"or {API_KEY_ENV})")
    return settings


def open_store(args):
    """The session store the flags name (None with --no-store); raises StoreError with a sentence."""
    from rwkv_playground.serving.store import SessionStore

    if not args.use_store:
        return None
    return SessionStore.open(args.store or args.data_dir, disk_budget_bytes=args.store_budget_mb << 20,
                             retention_days=args.retention_days)


def main(argv=None) -> int:
    args = parse_args(argv)
    from rwkv_playground import PlaygroundError
    from rwkv_playground.serving.engine import Engine

    try:
        store = open_store(args)
    except PlaygroundError as exc:
        print(f"Could not open the session store: {exc}", file=sys.stderr)
        return 2
    dtype = args.dtype or ("fp16" if args.device == "cuda" else "fp32")
    engine = Engine(models_dir=args.models_dir, device=args.device, dtype=dtype,
                    backends={"wkv": args.wkv, "step": args.step, "sampler": args.sampler, "gemm": args.gemm},
                    settings=serving_settings(args), store=store)
    if store is not None:
        print(f"Saved work: {store.url_shown} (states up to {args.store_budget_mb} MB; visitors idle "
              f"{args.retention_days:g} days are deleted)", file=sys.stderr)
    else:
        print("Saved work: off (--no-store): nothing outlives a visitor's tab.", file=sys.stderr)

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
          f"{info['parameters'] / 1e6:.1f} M parameters, {info['dtype']} on {info['device']}; WKV {info['wkv']}, "
          f"step {info['step']}, sampler {info['sampler']}, prompt GEMM {info['gemm']})", file=sys.stderr)
    if engine.settings.lock_models:
        print("The model panel is locked (public deployment): no switching or downloads from the browser.",
              file=sys.stderr)

    from rwkv_playground.server import serve
    from rwkv_playground.ui import create_app, launch

    api = api_settings(args)
    if args.share:  # Gradio's share link needs its own server: the UI only
        print("With --share the app is served by Gradio's own server: the API is off.", file=sys.stderr)
        launch(create_app(engine), engine, args.host, args.port, args.share)
        return 0
    where = f"http://{args.host}:{args.port}"
    if api.enabled:
        print(f"OpenAI-compatible API at {where}/v1 ({'key required' if api.api_key else 'no key needed on loopback'}); "
              f"health at {where}/health, metrics at {where}/metrics", file=sys.stderr)
    else:
        print(f"The API is off: {api.off_reason}.", file=sys.stderr)
    print(f"Open {where}/ in a browser.", file=sys.stderr)
    try:
        serve(create_app(engine), engine, args.host, args.port, api)
    finally:
        if store is not None:
            store.close()  # what the writer thread still holds is committed
    return 0


if __name__ == "__main__":
    sys.exit(main())
