"""Load test of `turbokit serve`: K concurrent HTTP clients (and optionally live WebSocket clients)
for T seconds against a server on loopback.

Starts `turbokit serve` on a free loopback port — on a tiny random-weight model unless `-m` names
one — or targets `--url` (loopback addresses only). After a warm-up, each HTTP client posts
/api/txt2img in a loop (a new prompt and seed each time, the same settings, so the server may
batch them) and, after a 429, waits min(Retry-After, 1 s). Each live client streams `params`
messages every 50 ms and counts the images that come back (the latest request wins, so far fewer
images than messages). Reports p50/p95 latency of the answered requests, throughput, 429s,
failures (any other status, or a transport error) and the server's resident memory (VmRSS from
/proc/PID/status) after the warm-up, at its peak and at the end.

    python benchmarks/load_serve.py [--clients 8] [--live 2] [--seconds 60] [--max-queue 16] [-m MODEL]
    python benchmarks/load_serve.py --url http://127.0.0.1:7860 --pid 12345
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import websockets


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    live_sent: int = 0
    live_images: int = 0
    live_errors: int = 0


def rss_mib(pid: int | None) -> float | None:
    if pid is None:
        return None
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_loopback(url: str) -> None:
    host = urlsplit(url).hostname or ""
    if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
        raise SystemExit(f"--url must be a loopback address (127.0.0.0/8, ::1, localhost), got {host}")


async def http_client(client: httpx.AsyncClient, deadline: float, tally: Tally, index: int) -> None:
    n = 0
    while time.monotonic() < deadline:
        n += 1
        body = {"prompt": f"load test client {index} request {n}", "seed": index * 1_000_000 + n}
        start = time.perf_counter()
        try:
            response = await client.post("/api/txt2img", json=body)
        except httpx.HTTPError as err:
            tally.errors[type(err).__name__] += 1
            continue
        tally.statuses[response.status_code] += 1
        if response.status_code == 200:
            tally.latencies.append(time.perf_counter() - start)
        elif response.status_code == 429:
            await asyncio.sleep(min(float(response.headers.get("retry-after", 1)), 1.0))


async def live_client(url: str, key: str | None, deadline: float, tally: Tally, index: int) -> None:
    ws_url = url.replace("http", "ws", 1) + "/ws" + (f"?api_key={key}" if key else "")
    try:
        async with websockets.connect(ws_url, max_size=None) as ws:

            async def reader() -> None:
                async for text in ws:
                    kind = json.loads(text)["type"]
                    if kind == "image":
                        tally.live_images += 1
                    else:
                        tally.live_errors += 1

            reading = asyncio.create_task(reader())
            n = 0
            while time.monotonic() < deadline:
                n += 1
                await ws.send(json.dumps({"type": "params", "prompt": f"live {index} typing {n}", "seed": n}))
                tally.live_sent += 1
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)  # the last image
            reading.cancel()
    except (OSError, websockets.WebSocketException) as err:
        tally.errors[f"live {type(err).__name__}"] += 1


async def run_load(args: argparse.Namespace, url: str, pid: int | None) -> None:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.clients + 4)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=args.timeout, limits=limits) as client:

        def clients(seconds: float, tally: Tally) -> asyncio.Future:
            deadline = time.monotonic() + seconds
            tasks = [http_client(client, deadline, tally, i) for i in range(args.clients)]
            tasks += [live_client(url, args.api_key, deadline, tally, i) for i in range(args.live)]
            return asyncio.gather(*tasks)

        await clients(args.warmup, Tally())  # the same mix, so every code path has allocated its memory
        rss_before = rss_mib(pid)
        samples: list[float] = []  # RSS every 0.5 s: a leak grows steadily, warm-up levels off
        tally = Tally()
        start = time.perf_counter()
        load = clients(args.seconds, tally)
        while not load.done():
            await asyncio.wait([load], timeout=0.5)
            samples.append(rss_mib(pid) or 0.0)
        await load
        elapsed = time.perf_counter() - start
        rss_after = rss_mib(pid)

    ok = tally.statuses[200]
    failures = sum(n for status, n in tally.statuses.items() if status not in (200, 429)) + sum(tally.errors.values())
    lat = sorted(tally.latencies)
    print(f"{args.clients} HTTP clients + {args.live} live clients for {elapsed:.0f} s against {url}")
    if lat:
        p95 = lat[min(len(lat) - 1, int(0.95 * len(lat)))]
        print(f"  latency of 200s: p50 {statistics.median(lat) * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms")
    print(f"  throughput: {ok / elapsed:.1f} images/s over HTTP ({ok} requests answered 200)")
    print(f"  429s: {tally.statuses[429]}; failures: {failures} {dict(tally.statuses)} {dict(tally.errors)}")
    if args.live:
        print(
            f"  live: {tally.live_sent} params sent, {tally.live_images} images back "
            f"({tally.live_images / elapsed:.1f}/s), {tally.live_errors} error messages"
        )
    if rss_before and rss_after:
        growth = (rss_after - rss_before) / rss_before * 100
        quarters = " / ".join(f"{samples[len(samples) * q // 4 - 1]:.0f}" for q in (1, 2, 3, 4))
        print(
            f"  server RSS: {rss_before:.0f} MiB after warm-up, {quarters} MiB at each quarter of the run, "
            f"peak {max(samples):.0f} MiB, {rss_after:.0f} MiB at the end ({growth:+.1f}%)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-m", "--model", default=None, help="model to serve (default: a tiny random-weight SD 2.x)")
    parser.add_argument("--url", default=None, help="target a running server instead (loopback only)")
    parser.add_argument("--pid", type=int, default=None, help="the targeted server's process id, for its RSS")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--clients", type=int, default=8, help="concurrent HTTP clients (default: %(default)s)")
    parser.add_argument("--live", type=int, default=2, help="concurrent live WebSocket clients (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=60, help="load duration (default: %(default)s)")
    parser.add_argument("--warmup", type=float, default=10, help="warm-up seconds (default: %(default)s)")
    parser.add_argument("--max-queue", type=int, default=16, help="the started server's --max-queue")
    parser.add_argument("--max-batch", type=int, default=4, help="the started server's --max-batch")
    parser.add_argument("--timeout", type=float, default=120, help="client time-out per request, s")
    args = parser.parse_args()

    if args.url:
        require_loopback(args.url)
        asyncio.run(run_load(args, args.url.rstrip("/"), args.pid))
        return
    with tempfile.TemporaryDirectory() as folder:
        model = args.model
        if model is None:
            from turbokit.tiny import save_tiny_model

            model = str(save_tiny_model(Path(folder) / "tiny-sd2", "sd2"))
        port = free_port()
        env = {**os.environ, **({"TURBOKIT_API_KEY": args.api_key} if args.api_key else {})}
        command = [sys.executable, "-m", "turbokit", "serve", "-m", model, "--port", str(port), "-q"]
        command += ["--max-queue", str(args.max_queue), "--max-batch", str(args.max_batch)]
        server = subprocess.Popen(command, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                if server.poll() is not None:
                    raise SystemExit(f"the server exited with {server.returncode}")
                time.sleep(0.2)
            else:
                raise SystemExit("the server did not answer /health within 120 s")
            asyncio.run(run_load(args, url, server.pid))
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()


if __name__ == "__main__":
    main()
