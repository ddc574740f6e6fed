"""Many visitors on one server: latency under load and memory over many sessions (loopback only).

    python benchmarks/bench_serving.py                    # the demo model and a 169M-shape model
    python benchmarks/bench_serving.py --models demo --sessions 200

The app runs as its own process (python app.py, on 127.0.0.1 and a free port). Latency: each
visitor is a Gradio session driven through the REST API by light asyncio clients in this one
process (on a 2-core machine, heavier clients take the CPU the server is measured on). Memory:
each short session is a gradio_client Client, closed at the end as a browser tab would be.

1. Simultaneous chats: the same chat turns sent by one session alone, then by 16 sessions at
   once; median turn latency of each (target: 16 at once <= 2x alone).
2. A chat turn while another visitor's 1500-token blog post is being written, against the same
   turn on an idle server (target: <= 3x).
3. Memory: `--sessions` short sessions one after another (a chat turn, an inspector recording,
   then the client closes); the server's resident memory after 10 and after all of them
   (target: within 10 %), and the session store's files against its disk budget.
4. The session store: the same chat turns (alone, and 16 visitors at once) on two servers side by
   side, one keeping every turn and its states in its store (the default) and one with
   --no-store, measured in alternating rounds (target: median turn latency within 10 %).

Every visitor opens its page the way a browser does (the "resume" call with no key: a new key,
its work kept), so the store's saves are part of every turn measured.

The 169M-shape model has random weights and the World vocabulary (12 x 768, vocab 65536: the
shape of RWKV-4 World 0.1B), so it replies at a real model's speed; the demo model is tiny and
fast, so there the web server's own overhead dominates a turn.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

import httpx
import torch

from common import CACHE, ROOT, machine, results_dir, write_results

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
SAMPLING = [1.0, 0.7, 0, 0.4, 0.4, 0.996]
TURNS = 4
TEMPLATE = "Bob: Write about {topic}.{details}\n\nAlice: Here it is:\n\nTitle:"


def world_169m() -> str:
    from rwkv_playground.models.rwkv4 import RWKVConfig, init_random_weights

    path = CACHE / "random-world-169M-bf16.pth"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        config = RWKVConfig(n_layer=12, n_embd=768, vocab_size=65536, ffn_dim=3072)
        torch.save(init_random_weights(config, seed=0, dtype=torch.bfloat16), path)
    return str(path)


class Server:
    """python app.py in its own process, on a free loopback port."""

    def __init__(self, model: str, dtype: str, store: bool = True, budget_mb: int = 2048):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/"
        self.store = store
        self.data_dir = tempfile.mkdtemp(prefix="rwkv-bench-data-")  # never the user's own data folder
        flags = ["--data-dir", self.data_dir, "--store-budget-mb", str(budget_mb)] if store else ["--no-store"]
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "app.py"), "--model", model, "--dtype", dtype, "--port", str(self.port),
             *flags], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=str(ROOT))
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                urllib.request.urlopen(self.url + "gradio_api/info", timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("the app did not start")

    def rss_mb(self) -> float:
        for line in open(f"/proc/{self.process.pid}/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
        return -1.0

    def store_mb(self) -> float:
        """The session store's files (the database and its write-ahead log)."""
        folder = self.data_dir
        return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) / 2**20

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def client(url: str):
    from gradio_client import Client

    return Client(url, verbose=False)


async def rest_call(http, url: str, api: str, data: list, session_hash: str) -> tuple[float, list]:
    """One call through Gradio's REST API (POST, then the event's stream): seconds, final data."""
    t0 = time.perf_counter()
    response = await http.post(f"{url}gradio_api/call/{api}", json={"data": data, "session_hash": session_hash})
    event_id = response.json()["event_id"]
    kind, final = None, None
    async with http.stream("GET", f"{url}gradio_api/call/{api}/{event_id}") as stream:
        async for line in stream.aiter_lines():
            if line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:") and kind in ("complete", "error"):
                final = json.loads(line[5:]) if kind == "complete" else line[5:]
                break
    if kind != "complete":
        raise RuntimeError(f"{api} failed: {final}")
    return time.perf_counter() - t0, final


async def chat_turns(http, url: str, seed: int, max_tokens: int, start_at: float = 0.0, turns: int = TURNS
                     ) -> list[float]:
    """`turns` chat turns of one visitor (its own session, opened as a page opens); the wall time of each."""
    session_hash = uuid.uuid4().hex
    await asyncio.sleep(max(0.0, start_at - time.time()))
    key = await open_page(http, url, session_hash)
    times = []
    for turn in range(turns):
        seconds, _ = await rest_call(http, url, "chat", [f"Tell me about the sea, part {turn}.", "Bob", "Alice", "",
                                                          *SAMPLING, max_tokens, seed + turn, "",
                                                          *([key] if key else [])], session_hash)
        times.append(seconds)
    return times


async def open_page(http, url: str, session_hash: str) -> str | None:
    """What a browser's page load does: "resume" (with a store: with no key, so a new one, which
    the browser then sends with each message, as here). Returns the key (None: no store)."""
    info = (await http.get(f"{url}gradio_api/info")).json()
    takes_key = bool(info["named_endpoints"]["/resume"]["parameters"])
    _, data = await rest_call(http, url, "resume", [None] if takes_key else [], session_hash)
    return data[0] if takes_key else None


async def simultaneous(url: str, sessions: int, max_tokens: int) -> dict:
    async with httpx.AsyncClient(timeout=300) as http:
        await chat_turns(http, url, 0, max_tokens)  # warm-up
        alone = [t for s in range(4) for t in await chat_turns(http, url, 100 * s, max_tokens)]
        start_at = time.time() + 1
        together = [t for times in await asyncio.gather(
            *[chat_turns(http, url, 100 * s, max_tokens, start_at) for s in range(sessions)]) for t in times]
    solo, load = statistics.median(alone), statistics.median(together)
    return {"sessions": sessions, "max_tokens": max_tokens, "solo_median_s": solo, "together_median_s": load,
            "ratio": load / solo}


async def during_blog(url: str, max_tokens: int, blog_tokens: int) -> dict:
    async with httpx.AsyncClient(timeout=600) as http:
        idle = [t for s in range(3) for t in await chat_turns(http, url, 500 + s, max_tokens)]
        blog = asyncio.create_task(rest_call(http, url, "blog", ["the tides", "", "", "", False, TEMPLATE, *SAMPLING,
                                                                  blog_tokens, 1], uuid.uuid4().hex))
        await asyncio.sleep(1.0)  # the post is being written
        busy = [t for s in range(3) for t in await chat_turns(http, url, 500 + s, max_tokens)]
        still_writing = not blog.done()
        await blog
    return {"max_tokens": max_tokens, "blog_tokens": blog_tokens, "idle_median_s": statistics.median(idle),
            "during_blog_median_s": statistics.median(busy), "ratio": statistics.median(busy) / statistics.median(idle),
            "blog_still_writing_at_the_end": still_writing}


def soak(server: Server, sessions: int) -> dict:
    def short_session(n):
        c = client(server.url)
        c.predict(*([None] if server.store else []), api_name="/resume")
        c.predict(f"Good morrow, number {n}.", "Bob", "Alice", "", *SAMPLING, 16, n, "", api_name="/chat")
        c.predict("Text below", "Romeo: But soft, what light through yonder window breaks? " * 8, 0, "0-31", 96,
                  api_name="/inspect")
        c.close()

    readings = {}
    for n in range(sessions):
        short_session(n)
        if n + 1 == 10 or (n + 1) % 50 == 0 or n + 1 == sessions:  # a plateau or a steady climb
            time.sleep(20)  # the closed clients' heartbeats end (Gradio notices within ~15 s)
            readings[n + 1] = server.rss_mb()
            print(f"after {n + 1} sessions: {readings[n + 1]:.0f} MB", flush=True)
    first, last = readings[10], readings[sessions]
    return {"sessions": sessions, "rss_after_10_MB": first, f"rss_after_{sessions}_MB": last,
            "growth": last / first - 1, "readings_MB": readings,
            "store_MB": server.store_mb() if server.store else None}


async def store_rounds(servers: dict, max_tokens: int, rounds: int) -> dict:
    """The same visitors' turns on each server, in pairs run back to back (which server goes first
    alternates): one visitor alone (TURNS turns), then 16 visitors at once (2 turns each). This VM's
    speed drifts by tens of percent over a minute, so each pair's ratio is taken (neighbours in
    time) and the median of the pairs' ratios is the figure."""
    alone = {name: [] for name in servers}
    together = {name: [] for name in servers}
    pairs = []
    async with httpx.AsyncClient(timeout=300) as http:
        for url in servers.values():
            await chat_turns(http, url, 0, max_tokens)  # warm-up
        for r in range(rounds):
            medians = {}
            for name, url in (servers.items() if r % 2 == 0 else reversed(servers.items())):
                solo = await chat_turns(http, url, 100 * r, max_tokens)
                start_at = time.time() + 0.5
                many = [t for times in await asyncio.gather(
                    *[chat_turns(http, url, 100 * s + r, max_tokens, start_at, turns=2) for s in range(16)])
                        for t in times]
                alone[name] += solo
                together[name] += many
                medians[name] = (statistics.median(solo), statistics.median(many))
            pairs.append([medians["store"][i] / medians["no_store"][i] for i in (0, 1)])
            print(f"pair {r + 1}: store / no store = {pairs[-1][0]:.3f} alone, {pairs[-1][1]:.3f} 16 at once", flush=True)
    out = {"max_tokens": max_tokens, "rounds": rounds, "per_round_ratios": pairs}
    for name in servers:
        out[f"{name}_alone_median_s"] = statistics.median(alone[name])
        out[f"{name}_16_median_s"] = statistics.median(together[name])
    out["alone_ratio"] = statistics.median(p[0] for p in pairs)
    out["16_ratio"] = statistics.median(p[1] for p in pairs)
    return out


def main(models: list[str], sessions: int, parts: list[str]) -> None:
    rows = []
    for name in models:
        model, dtype, max_tokens = ((str(ROOT / "assets" / "rwkv4-demo-shakespeare.pth"), "fp32", 40) if name == "demo"
                                    else (world_169m(), "bf16", 24))
        row = {"model": name, "dtype": dtype}
        if "store" in parts:
            with_store, without = Server(model, dtype), Server(model, dtype, store=False)
            try:
                row["store"] = asyncio.run(store_rounds({"store": with_store.url, "no_store": without.url},
                                                        max_tokens, 12))
                row["store"]["store_MB_after"] = with_store.store_mb()
            finally:
                with_store.close()
                without.close()
            print(row, flush=True)
        if not {"latency", "memory"} & set(parts):
            rows.append(row)
            continue
        server = Server(model, dtype, budget_mb=16)  # a small disk budget: the soak shows it holds
        try:
            if "latency" in parts:
                row["simultaneous"] = asyncio.run(simultaneous(server.url, 16, max_tokens))
                print(row, flush=True)
                row["during_blog"] = asyncio.run(during_blog(server.url, max_tokens, 1500))
                print(row, flush=True)
            if name == "demo" and "memory" in parts:
                row["memory"] = soak(server, sessions)
            rows.append(row)
            print(row, flush=True)
        finally:
            server.close()
    stored = results_dir() / "serving.json"
    if stored.exists():  # parts measured separately (--parts, --models) are kept side by side
        earlier = {r["model"]: r for r in json.loads(stored.read_text())["results"]}
        for r in rows:
            earlier[r["model"]] = {**earlier.get(r["model"], {}), **r}
        rows = list(earlier.values())
    data = {"machine": machine(), "turns_per_session": TURNS, "results": rows}
    m = data["machine"]
    md = ["# Many visitors on one server (loopback; the app in its own process)", "",
          f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['date']}.", "",
          "Latency: Gradio sessions driven through its REST API by light asyncio clients; "
          f"{TURNS} chat turns per visitor, the same turns (seeds) alone and together.", "",
          "| model | 16 chats at once: median turn / alone (target <= 2x) | a chat turn during a 1500-token post / "
          "idle (target <= 3x) |", "|---|---|---|"]
    for r in rows:
        if "simultaneous" not in r:
            continue
        s, b = r["simultaneous"], r["during_blog"]
        md.append(f"| {r['model']} ({r['dtype']}, {s['max_tokens']}-token replies) | {s['together_median_s']:.2f} s / "
                  f"{s['solo_median_s']:.2f} s = **{s['ratio']:.2f}x** | {b['during_blog_median_s']:.2f} s / "
                  f"{b['idle_median_s']:.2f} s = **{b['ratio']:.2f}x**"
                  + ("" if b["blog_still_writing_at_the_end"] else " (the post ended before the last turn)") + " |")
    if any("store" in r for r in rows):
        md += ["", "The session store: the same turns on a server keeping every turn and its states (SQLite, the "
                   "default) and on one with --no-store, side by side in alternating rounds "
                   "(target: within 10 %).", "",
               "Each figure is the median over pairs of runs back to back (one visitor's turns, then 16 "
                   "visitors at once, on each server); the medians of all turns are beside it.", "",
               "| model | one visitor: store / no store | 16 at once: store / no store | store after |",
               "|---|---|---|---|"]
        for r in rows:
            if "store" in r:
                s = r["store"]
                md.append(f"| {r['model']} ({r['dtype']}, {s['max_tokens']}-token replies, {s['rounds']} rounds) | "
                          f"**{s['alone_ratio']:.3f}x** ({s['store_alone_median_s']:.3f} s / "
                          f"{s['no_store_alone_median_s']:.3f} s) | **{s['16_ratio']:.3f}x** "
                          f"({s['store_16_median_s']:.2f} s / {s['no_store_16_median_s']:.2f} s) | "
                          f"{s['store_MB_after']:.1f} MB |")
                if s.get("per_round_ratios"):
                    md.append(f"|  rounds (alone, 16): {', '.join(f'{a:.2f} / {b:.2f}' for a, b in s['per_round_ratios'])} "
                              "| | | |")
    for r in rows:
        if "memory" in r:
            mem = r["memory"]
            last = mem["rss_after_%d_MB" % mem["sessions"]]
            md += ["", f"Memory of the server process (demo model): after 10 short sessions "
                       f"{mem['rss_after_10_MB']:.0f} MB, after {mem['sessions']} "
                       f"{last:.0f} MB: **{mem['growth'] * 100:+.1f} %** "
                       "(target within 10 %). Each session: its page opened (a new key: its work kept), one chat "
                       "turn, one inspector recording, then the client closes."]
            if mem.get("store_MB") is not None:
                md += ["", f"The session store after them: {mem['store_MB']:.1f} MB on disk, its disk budget for "
                           "states 16 MB (the least recently used states dropped past it; every conversation kept)."]
            if mem.get("readings_MB"):
                md += ["", "Readings (sessions: MB): " + ", ".join(f"{n}: {v:.0f}" for n, v in mem["readings_MB"].items())]
    write_results("serving", data, "\n".join(md) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["demo", "169M"], choices=["demo", "169M"])
    parser.add_argument("--sessions", type=int, default=200, help="short sessions of the memory soak")
    parser.add_argument("--parts", nargs="+", default=["latency", "memory", "store"],
                        choices=["latency", "memory", "store"])
    args = parser.parse_args()
    main(args.models, args.sessions, args.parts)
