"""Per-step overhead of one `ddim.sample` call as a user makes it, on the bench's one-op network.

    OMP_NUM_THREADS=1 python scripts/loop_overhead.py [--sampler dpmpp_2m] [--steps 10] [--batch 1]
        [--runs 2000] [--inference-mode]

`ddim bench` times both loops under `torch.inference_mode()`, as pipelines run; a direct
`ddim.sample(...)` call usually has gradients on, and `sample` then switches them off itself. This
times that call: the median over --runs runs (each after an untimed run, as in the bench) of
(wall time − time in the network) / network calls, with the bench's timer around the network.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

import ddim
from ddim.bench import TrivialModel, _Timed
from ddim.train import make_schedule


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--runs", type=int, default=2000)
    p.add_argument("--inference-mode", action="store_true", help="call sample under torch.inference_mode()")
    a = p.parse_args()
    torch.set_num_threads(1)
    schedule = make_schedule("linear", 1000)
    model = TrivialModel()
    x_T = ddim.randn((a.batch, 1, 28, 28), list(range(a.batch)))

    def run() -> tuple[float, float, int]:
        timed = _Timed(model, x_T.device)
        tic = time.perf_counter()
        ddim.sample(timed, x_T, schedule, steps=a.steps, sampler=a.sampler)
        return time.perf_counter() - tic, timed.seconds, timed.calls

    with torch.inference_mode() if a.inference_mode else contextlib.nullcontext():
        for _ in range(100):
            run()
        runs = []
        for _ in range(a.runs):
            run()
            runs.append(run())
    total = statistics.median(r[0] for r in runs)
    network = statistics.median(r[1] for r in runs)
    calls = runs[0][2]
    print(
        f"{a.sampler}, {a.steps} steps, batch {a.batch}: {total * 1e6:.1f} µs a run, {network * 1e6:.1f} µs in the "
        f"network, overhead {(total - network) / calls * 1e6:.2f} µs per call"
    )


if __name__ == "__main__":
    main()
