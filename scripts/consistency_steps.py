"""Choose a consistency model's multistep timesteps by the digit classifier's Fréchet distance (greedy, as
Song et al. 2023 choose theirs): step k's timestep is the candidate that, after the k-1 already chosen, gives
the lowest distance on tuning seeds; the lists are then measured on other seeds.

    python scripts/consistency_steps.py --model cd --steps 4 [--n 200] [--tune-seed 3000] [--grid 25]

Prints the lists for 2..steps calls (ready for ``--timesteps`` or a config's ``optimized_timesteps``) with
their distances on the tuning seeds and on held-out seeds (2000 + i; image i has class i mod 10).

    python scripts/consistency_steps.py --model cd --n 500 --test-seed 0 --measure "999 999,100 999,400,200,100"

measures given lists only (the Fréchet distance and class accuracy on seeds test-seed + i).
"""

from __future__ import annotations

import argparse
import json

import torch

import ddim
from ddim.classifier import load_classifier
from ddim.data import mnist5k
from ddim.diffusers_io import sampling_kwargs
from ddim.metrics import frechet_distance


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cd")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--n", type=int, default=200, help="Samples per measurement.")
    ap.add_argument("--tune-seed", type=int, default=3000)
    ap.add_argument("--test-seed", type=int, default=2000)
    ap.add_argument("--grid", type=int, default=25, help="Candidate timesteps: multiples of this below the last.")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--measure", default=None, help="Only measure these lists: space-separated, each comma-separated.")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, sched, config = ddim.load(args.model)
    clf = load_classifier()
    real, _ = clf.predict_features(mnist5k().images)

    def fd(ts: list[int], first_seed: int, accuracy: list | None = None) -> float:
        seeds = list(range(first_seed, first_seed + args.n))
        y = torch.tensor(seeds) % 10
        kw = sampling_kwargs(config, sched, len(ts), None, ts)
        kw.pop("spacing"), kw.pop("timesteps")
        with torch.inference_mode():
            x = ddim.sample(
                model, ddim.randn((args.n, *model.config.sample_shape), seeds), sched, timesteps=ts,
                sampler="consistency", seeds=seeds, prediction=config["prediction"], model_kwargs={"y": y}, **kw,
            )  # fmt: skip
        feats, pred = clf.predict_features(x.clamp(-1, 1))
        if accuracy is not None:
            accuracy.append((pred == y).float().mean().item())
        return frechet_distance(feats, real)

    if args.measure:
        for text in args.measure.split():
            ts = [int(t) for t in text.split(",")]
            acc: list = []
            print(f"{ts}: FD {fd(ts, args.test_seed, acc):.2f}, accuracy {acc[0]:.3f} (n = {args.n})", flush=True)
        return

    chosen = [sched.T - 1]
    out = {}
    for k in range(2, args.steps + 1):
        candidates = range(args.grid, chosen[-1], args.grid)
        if not candidates:
            print(f"{k} calls: no candidate below {chosen[-1]} on a grid of {args.grid}; stopping")
            break
        scores = {t: fd([*chosen, t], args.tune_seed) for t in candidates}
        best = min(scores, key=scores.get)
        chosen.append(best)
        out[str(k)] = {"timesteps": list(chosen), "tune_fd": scores[best], "test_fd": fd(chosen, args.test_seed)}
        print(f"{k} calls: {chosen} tuning FD {scores[best]:.2f}, held-out FD {out[str(k)]['test_fd']:.2f}", flush=True)
    print(json.dumps({k: v["timesteps"] for k, v in out.items()}))


if __name__ == "__main__":
    main()
