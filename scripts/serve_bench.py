"""Latency of ``ddim serve``'s /api/sample as a client sees it: p50/p95 at S steps with C concurrent clients.

Starts ``python -m ddim serve`` (the embedded model) on a free loopback port, then for each (steps,
clients) cell has C threads each send R requests one after another over HTTP; every request has its
own seed, so nothing comes from the cache (the page's default settings otherwise: DDIM, η = 0, class 3,
guidance 2). Prints a Markdown table, and the load average before and after (other processes on the
machine make the figures noisy).

    python scripts/serve_bench.py --steps 10,20 --clients 1,8 --requests 24 --threads 2 --page 20

``--page N`` also measures at the page, in headless Chromium: N times a new seed is typed into the
seed box and the time from the page's request to the decoded image on screen is read (the page's own
``performance.now()``; the 120 ms debounce before the request is not included).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from serve_harness import Browser, find_chromium, start_server, stop_server  # noqa: E402


def cell(url: str, steps: int, clients: int, total: int, seed0: int) -> tuple[list[float], float]:
    per = max(1, total // clients)
    lat: list[float] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        for r in range(per):
            seed = seed0 + c * per + r
            q = f"api/sample?seed={seed}&steps={steps}&eta=0&sampler=ddim&class=3&guidance=2"
            tic = time.perf_counter()
            with urllib.request.urlopen(url + q, timeout=300) as resp:
                resp.read()
                assert resp.headers["X-Cache"] == "miss"
            with lock:
                lat.append(time.perf_counter() - tic)

    tic = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lat, time.perf_counter() - tic


def page_cell(url: str, n: int) -> list[float]:
    """Milliseconds from request to decoded draft, as the page measures them, for n new seeds."""
    import tempfile

    binary = find_chromium()
    if binary is None:
        raise SystemExit("--page needs Chromium (Debian package 'chromium')")
    browser = Browser(binary, tempfile.mkdtemp(prefix="ddim-bench-chromium-"))
    try:
        browser.send("Page.navigate", url=url)
        browser.wait("document.getElementById('main-img')?.dataset.loads >= 1", 120, "the first draft")
        browser.wait("document.getElementById('cmp-b').dataset.loads >= 1", 120, "the pair")
        browser.wait("document.getElementById('interp-img').dataset.loads >= 1", 120, "the interpolation")
        out = []
        for i in range(n):
            seed = 50_000 + i
            browser.js(f"(() => {{ const s = document.getElementById('seed'); s.value = '{seed}';"
                       f" s.dispatchEvent(new Event('input', {{bubbles: true}})); }})()")  # fmt: skip
            browser.wait(f"document.getElementById('main-img').dataset.url.includes('seed={seed}&')", 120)
            out.append(float(browser.js("document.getElementById('main-img').dataset.pageMs")))
            # let the 50-step side of the pair finish, so that each draft starts on an idle worker
            browser.wait(f"document.getElementById('cmp-b').dataset.url.includes('seed={seed}&')", 120)
        return out
    finally:
        browser.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", default="10,20")
    ap.add_argument("--clients", default="1,8")
    ap.add_argument("--requests", type=int, default=24, help="requests per cell (split over the clients)")
    ap.add_argument("--threads", type=int, default=2, help="the server's torch threads")
    ap.add_argument("--page", type=int, default=0, help="also time N drafts at the page (headless Chromium)")
    args = ap.parse_args()
    proc, url = start_server("--threads", str(args.threads))
    load0 = os.getloadavg()
    rows = []
    try:
        seed = 10_000
        for steps in map(int, args.steps.split(",")):
            for clients in map(int, args.clients.split(",")):
                cell(url, steps, 1, 2, seed)  # warm these timesteps' tables
                seed += 1000
                lat, wall = cell(url, steps, clients, args.requests, seed)
                seed += 1000
                ms = np.array(lat) * 1000
                rows.append(
                    f"| {steps} | {clients} | {len(lat)} | {np.percentile(ms, 50):.0f} | {np.percentile(ms, 95):.0f} "
                    f"| {len(lat) / wall:.2f} |"
                )
                print(rows[-1], flush=True)
        if args.page:
            ms = np.array(page_cell(url, args.page))
            rows.append(
                f"| 10 | 1 (the page) | {len(ms)} | {np.percentile(ms, 50):.0f} | {np.percentile(ms, 95):.0f} | |"
            )
            print(rows[-1], flush=True)
    finally:
        stop_server(proc)
    load1 = os.getloadavg()
    print(f"\nserver threads {args.threads}; load average before {load0[0]:.2f}, after {load1[0]:.2f}\n")
    print("| steps | clients | requests | p50 ms | p95 ms | requests/s |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
