"""Several app processes behind HAProxy on one PostgreSQL, on this machine (deploy/local_cluster.py).

    python benchmarks/bench_scaleout.py                  # the 169M-shape model (random weights)
    python benchmarks/bench_scaleout.py --model demo

1. 16 visitors chatting at once (each its own cookie jar, as browsers are: HAProxy's cookie keeps
   each on one process), TURNS turns each, with 1 and with 2 app processes: aggregate tokens/s
   and the median turn latency.
2. Failover: a visitor in a conversation on one of 2 processes; that process is killed (SIGKILL);
   the time from the kill until their next reply's first text arrives (served by the other
   process, their conversation and state read from PostgreSQL).

On a 2-core machine both processes share the same cores, so a second process adds no compute:
what it shows is the cost (or not) of the extra hop and of splitting the batch. On separate
machines each process brings its own cores and the aggregate grows with them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid

import httpx

from bench_serving import SAMPLING, world_169m
from common import ROOT, machine, write_results

sys.path.insert(0, str(ROOT / "deploy"))
from local_cluster import LocalCluster  # noqa: E402

TURNS = 3


async def call(http: httpx.AsyncClient, url: str, api: str, data: list, session_hash: str,
               first_text: list | None = None) -> list:
    """One call through Gradio's REST API; `first_text` gets the time of the first streamed update."""
    response = await http.post(f"{url}gradio_api/call/{api}", json={"data": data, "session_hash": session_hash})
    response.raise_for_status()
    event_id = response.json()["event_id"]
    kind = None
    async with http.stream("GET", f"{url}gradio_api/call/{api}/{event_id}") as stream:
        async for line in stream.aiter_lines():
            if line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:"):
                if kind == "generating" and first_text is not None and not first_text:
                    first_text.append(time.perf_counter())
                if kind == "complete":
                    return json.loads(line[5:])
                if kind == "error":
                    raise RuntimeError(f"{api} failed: {line[5:]}")
    raise RuntimeError(f"{api}: the stream ended without a result")


async def visitor(url: str, n: int, max_tokens: int, start_at: float) -> tuple[list[float], int]:
    """TURNS chat turns of one visitor with its own cookie jar: (turn seconds, tokens generated)."""
    async with httpx.AsyncClient(timeout=600) as http:
        session = uuid.uuid4().hex
        key = (await call(http, url, "resume", [None], session))[0]
        await asyncio.sleep(max(0.0, start_at - time.time()))
        times, tokens = [], 0
        for turn in range(TURNS):
            t0 = time.perf_counter()
            out = await call(http, url, "chat", [f"Tell me about the sea, part {turn}.", "Bob", "Alice", "",
                                                 *SAMPLING, max_tokens, 100 * n + turn, "", key], session)
            times.append(time.perf_counter() - t0)
            tokens += out[2][-1]["generated_tokens"]
        return times, tokens


async def load(url: str, visitors: int, max_tokens: int) -> dict:
    await visitor(url, 999, max_tokens, 0)  # warm-up
    start_at = time.time() + 2
    results = await asyncio.gather(*[visitor(url, n, max_tokens, start_at) for n in range(visitors)])
    wall = time.time() - start_at
    times = [t for r in results for t in r[0]]
    tokens = sum(r[1] for r in results)
    return {"visitors": visitors, "median_turn_s": statistics.median(times), "tokens": tokens, "wall_s": wall,
            "aggregate_tok_s": tokens / wall}


async def failover(cluster: LocalCluster, max_tokens: int) -> dict:
    async with httpx.AsyncClient(timeout=600) as http:
        session = uuid.uuid4().hex
        key = (await call(http, cluster.url, "resume", [None], session))[0]
        served = http.cookies.get("RWKVSRV")
        for turn in range(2):
            await call(http, cluster.url, "chat", [f"A question, part {turn}.", "Bob", "Alice", "", *SAMPLING,
                                                   max_tokens, turn, "", key], session)
        victim = int(served[3:]) - 1
        killed = time.perf_counter()
        cluster.kill_app(victim)
        first: list = []
        out = await call(http, cluster.url, "chat", ["And after that?", "Bob", "Alice", "", *SAMPLING, max_tokens, 7,
                                                     "", key], session, first_text=first)
        return {"killed": f"app{victim + 1}", "wait_to_first_text_s": first[0] - killed,
                "turn_after_s": time.perf_counter() - killed, "state_from_store": bool(out[2][-1].get("state_from_store")),
                "history_tokens_reused": out[2][-1].get("tokens_saved")}


def main(model_name: str) -> None:
    model, dtype, max_tokens = ((str(ROOT / "assets" / "rwkv4-demo-shakespeare.pth"), "fp32", 40)
                                if model_name == "demo" else (world_169m(), "bf16", 24))
    rows = {}
    for processes in (1, 2):
        with LocalCluster(processes, app_args=["--model", model, "--dtype", dtype]) as cluster:
            rows[processes] = asyncio.run(load(cluster.url, 16, max_tokens))
            print(processes, rows[processes], flush=True)
            if processes == 2:
                rows["failover"] = asyncio.run(failover(cluster, max_tokens))
                print(rows["failover"], flush=True)
    data = {"machine": machine(), "model": model_name, "dtype": dtype, "max_tokens": max_tokens,
            "turns_per_visitor": TURNS, "results": rows}
    m, f = data["machine"], rows["failover"]
    md = ["# Several app processes behind HAProxy on one PostgreSQL (loopback)", "",
          f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['date']}. Model: {model_name} ({dtype}), "
          f"{max_tokens}-token replies, {TURNS} turns per visitor, 16 visitors at once.", "",
          "| app processes | aggregate tokens/s | median turn |", "|---|---|---|"]
    for p in (1, 2):
        md.append(f"| {p} | {rows[p]['aggregate_tok_s']:.1f} | {rows[p]['median_turn_s']:.2f} s |")
    md += ["", f"Failover: {f['killed']} killed (SIGKILL) between two turns of a visitor it served; their next "
               f"reply's first text came {f['wait_to_first_text_s']:.2f} s after the kill (the whole turn "
               f"{f['turn_after_s']:.2f} s), from the other process, which read the conversation and its state from "
               f"PostgreSQL (state from the store: {f['state_from_store']}; {f['history_tokens_reused']} history "
               "tokens not re-read).", "",
           "Both processes share this machine's cores: a second process adds no compute here. On separate machines "
           "each brings its own cores."]
    write_results(f"scaleout_{model_name}", data, "\n".join(md) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="169M", choices=["demo", "169M"])
    main(parser.parse_args().model)
