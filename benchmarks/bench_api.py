"""The OpenAI-compatible API under concurrent streaming clients (loopback only).

    python benchmarks/bench_api.py                     # the 169M shape (bf16), 1 / 4 / 16 streams
    python benchmarks/bench_api.py --model demo --tokens 64

The app runs as its own process (python app.py on a free port). For 1, 4 and 16 concurrent
clients (`openai.AsyncOpenAI`, streaming chat completions, each its own conversation and seed):
time to first token, tokens/s per stream and in aggregate, and while 16 stream, `GET /health`
latency probed every 20 ms. The same turns go through the UI's `/chat` endpoint with
`gradio_client` in the same run (one Client per visitor), timed the same way.

Targets (issue #23): aggregate tokens/s at 16 streams >= 5x one stream; /health p99 under load
< 50 ms. The 169M shape has random weights and the World vocabulary (12 x 768, vocab 65536);
end-of-text and the turn separator are banned through logit_bias so every reply has the same
length.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import threading
import time

import httpx
import openai

from bench_serving import Server, world_169m
from common import ROOT, machine, write_results

PROMPTS = ["Tell me about the sea.", "What is a river?", "Describe a mountain.", "Why do stars shine?"]


async def api_stream(client, model: str, i: int, tokens: int, bias: dict) -> dict:
    t0 = time.perf_counter()
    first = None
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": f"{PROMPTS[i % 4]} ({i})"}], max_tokens=tokens, seed=i,
        stream=True, stream_options={"include_usage": True}, logit_bias=bias)
    generated = 0
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter() - t0
        if chunk.usage:
            generated = chunk.usage.completion_tokens
    total = time.perf_counter() - t0
    return {"ttft_s": first, "seconds": total, "tokens": generated}


async def api_round(url: str, model: str, clients: int, tokens: int, bias: dict, probe_health: bool) -> dict:
    client = openai.AsyncOpenAI(base_url=url + "v1", api_key="unused", max_retries=0, timeout=600)
    await api_stream(client, model, 99, 8, bias)  # warm-up
    health: list[float] = []
    done = asyncio.Event()

    async def probe():
        async with httpx.AsyncClient() as http:
            while not done.is_set():
                t0 = time.perf_counter()
                await http.get(url + "health")
                health.append(time.perf_counter() - t0)
                await asyncio.sleep(0.02)

    prober = asyncio.ensure_future(probe()) if probe_health else None
    t0 = time.perf_counter()
    rows = await asyncio.gather(*[api_stream(client, model, i, tokens, bias) for i in range(clients)])
    wall = time.perf_counter() - t0
    done.set()
    if prober:
        await prober
    out = summarize(rows, wall)
    if health:
        ordered = sorted(health)
        out["health_ms"] = {"n": len(ordered), "p50": 1000 * ordered[len(ordered) // 2],
                            "p99": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
                            "max": 1000 * ordered[-1]}
    return out


def summarize(rows: list[dict], wall: float) -> dict:
    tokens = sum(r["tokens"] for r in rows)
    return {"clients": len(rows), "tokens_per_stream": statistics.median(r["tokens"] for r in rows),
            "ttft_median_s": statistics.median(r["ttft_s"] for r in rows),
            "stream_tok_s_median": statistics.median(r["tokens"] / r["seconds"] for r in rows),
            "aggregate_tok_s": tokens / wall, "wall_s": wall}


def gradio_round(url: str, clients: int, tokens: int) -> dict:
    """The same number of visitors through the UI's /chat endpoint (gradio_client, one per visitor)."""
    from gradio_client import Client

    visitors = [Client(url, verbose=False) for _ in range(clients)]
    rows: list[dict] = [None] * clients

    def one(i: int) -> None:
        t0 = time.perf_counter()
        job = visitors[i].submit(f"{PROMPTS[i % 4]} ({i})", "User", "Assistant", "", 1.0, 0.7, 0, 0.0, 0.0, 1.0,
                                 tokens, i, api_name="/chat")
        first = None
        for out in job:
            if first is None and out[0] and out[0][-1]["role"] == "assistant" and out[0][-1]["content"]:
                first = time.perf_counter() - t0
        status = job.outputs()[-1][1]
        match = re.search(r"(\d+) generated", status)
        rows[i] = {"ttft_s": first or time.perf_counter() - t0, "seconds": time.perf_counter() - t0,
                   "tokens": int(match.group(1)) if match else 0}

    one(0)  # warm-up
    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    for v in visitors:
        v.close()
    return summarize(rows, wall)


def step_ceiling(model: str, dtype: str) -> dict:
    """The batched step alone (this process, after the server closed): B = 16 over B = 1 is the
    most any serving of 16 streams could gain over one on this machine."""
    from rwkv_playground.runtime import load_runtime

    runtime = load_runtime(model, dtype=dtype)
    out = {}
    for batch in (1, 16):
        states = [runtime.new_state() for _ in range(batch)]
        runtime.step([1] * batch, states)
        t0 = time.perf_counter()
        for _ in range(20):
            runtime.step([1] * batch, states)
        out[f"B{batch}_tok_s"] = 20 * batch / (time.perf_counter() - t0)
    out["ratio"] = out["B16_tok_s"] / out["B1_tok_s"]
    return out


def main(model_name: str, tokens: int, counts: list[int]) -> None:
    model, dtype = ((str(ROOT / "assets" / "rwkv4-demo-shakespeare.pth"), "fp32") if model_name == "demo"
                    else (world_169m(), "bf16"))
    server = Server(model, dtype)
    try:
        served = httpx.get(server.url + "health").json()["model"]
        from rwkv_playground.tokenizer import load_tokenizer
        from rwkv_playground.serving.engine import WORLD_VOCAB

        bias = {"0": -100}
        if model_name != "demo":  # every reply the same length: no turn separator either
            bias.update({str(t): -100 for t in load_tokenizer(WORLD_VOCAB).encode("\n\n")})
        rows = []
        for n in counts:
            row = {"clients": n, "api": asyncio.run(api_round(server.url, served, n, tokens, bias, n == max(counts)))}
            row["gradio"] = gradio_round(server.url, n, tokens)
            rows.append(row)
            print(row, flush=True)
    finally:
        server.close()
    ceiling = step_ceiling(model, dtype)
    one = next(r for r in rows if r["clients"] == 1)["api"]["aggregate_tok_s"]
    data = {"machine": machine(), "model": model_name, "dtype": dtype, "tokens": tokens, "results": rows,
            "batched_step_alone": ceiling,
            "aggregate_16_over_1": next((r["api"]["aggregate_tok_s"] / one for r in rows if r["clients"] == 16), None)}
    m = data["machine"]
    md = [f"# OpenAI-compatible API: concurrent streaming clients ({model_name}, {dtype}, {tokens}-token replies)", "",
          f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['date']}. The app in its own process, "
          "the clients in this one (loopback).", "",
          "| clients | API: first token (median) | API: tok/s per stream | API: aggregate tok/s | "
          "gradio_client /chat: first token | per stream | aggregate |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        a, g = r["api"], r["gradio"]
        md.append(f"| {r['clients']} | {a['ttft_median_s'] * 1000:.0f} ms | {a['stream_tok_s_median']:.1f} | "
                  f"{a['aggregate_tok_s']:.1f} | {g['ttft_median_s'] * 1000:.0f} ms | {g['stream_tok_s_median']:.1f} | "
                  f"{g['aggregate_tok_s']:.1f} |")
    if data["aggregate_16_over_1"]:
        md += ["", f"Aggregate at 16 streams / one stream: **{data['aggregate_16_over_1']:.2f}x** (target >= 5x). "
                   f"The batched step alone, same run: B = 16 {ceiling['B16_tok_s']:.0f} tok/s / B = 1 "
                   f"{ceiling['B1_tok_s']:.0f} tok/s = {ceiling['ratio']:.2f}x (the ceiling of any serving here)."]
    for r in rows:
        if "health_ms" in r["api"]:
            h = r["api"]["health_ms"]
            md += ["", f"`/health` while {r['clients']} streams run ({h['n']} probes): p50 {h['p50']:.1f} ms, "
                       f"**p99 {h['p99']:.1f} ms** (target < 50 ms), max {h['max']:.1f} ms."]
    write_results(f"api_{model_name}_{tokens}tok", data, "\n".join(md) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="169M", choices=["demo", "169M"])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    args = parser.parse_args()
    main(args.model, args.tokens, args.clients)
