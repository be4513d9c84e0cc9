"""Quality figures of a model for the model card, with the shipped digit classifier.

    python scripts/evaluate_default.py [--model PATH] [--n-cond 500] [--n-uncond 1000] [--json out.json]

F(n): Fréchet distance (classifier features) between n random real digits and all of MNIST-5k,
averaged over 5 draws: the floor for n samples. Conditional DDIM-50 (class i mod 10, the model's
default guidance and x̂₀ clipping): accuracy (classified as their class) and Fréchet distance for n-cond samples.
Unconditional (null class) DDIM-50: Fréchet distance for n-uncond samples. Then DDIM η = 0 against
η = 1 at 10 and 20 steps, conditional and unconditional. Seeds: 0..n-1 (image i uses seed i).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ddim.checkpoint import load
from ddim.classifier import load_classifier
from ddim.data import mnist5k
from ddim.generate import generate, parse_classes
from ddim.metrics import feature_stats, frechet_from_stats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--n-cond", type=int, default=500)
    ap.add_argument("--n-uncond", type=int, default=1000)
    ap.add_argument("--n-eta", type=int, default=500)
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument(
        "--clip-sample",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="clip x̂₀ to [-1, 1] [the model's sampling.clip_sample]",
    )
    ap.add_argument("--skip-eta", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    model, schedule, config = load(args.model)
    guidance = config.get("sampling", {}).get("guidance", 1.0) if args.guidance is None else args.guidance
    clf = load_classifier()
    data = mnist5k()
    real_f, _ = clf.predict_features(data.images)
    ref = feature_stats(real_f)
    clip = bool(config.get("sampling", {}).get("clip_sample", False)) if args.clip_sample is None else args.clip_sample
    clipped_eps = bool(config.get("sampling", {}).get("use_clipped_model_output", False))
    out: dict = {"model": args.model or "embedded default", "guidance": guidance, "clip_sample": clip}

    def floor(n: int) -> float:
        g = torch.Generator().manual_seed(0)
        vals = [
            frechet_from_stats(*feature_stats(real_f[torch.randperm(len(real_f), generator=g)[:n]]), *ref)
            for _ in range(5)
        ]
        return sum(vals) / len(vals)

    out["F(500)"], out["F(1000)"] = floor(500), floor(1000)
    print(f"F(500) = {out['F(500)']:.3f}   F(1000) = {out['F(1000)']:.3f}", flush=True)

    def measure(n: int, conditional: bool, steps: int, eta: float) -> dict:
        labels = parse_classes("all" if conditional else None, n, 10)
        r = generate(
            model,
            schedule,
            n=n,
            seed=0,
            labels=labels,
            guidance=guidance,
            steps=steps,
            eta=eta,
            prediction=config["prediction"],
            clip_sample=clip,
            batch=250,
            sample_kwargs={"use_clipped_model_output": clipped_eps},
        )
        f, pred = clf.predict_features(r.images.clamp(-1, 1))
        res = {
            "n": n,
            "steps": steps,
            "eta": eta,
            "conditional": conditional,
            "fd": frechet_from_stats(*feature_stats(f), *ref),
            "seconds": round(r.seconds, 1),
        }
        if conditional:
            res["accuracy"] = float((pred == labels).float().mean())
        print(json.dumps(res), flush=True)
        return res

    tic = time.perf_counter()
    out["cond_ddim50"] = measure(args.n_cond, True, 50, 0.0)
    out["uncond_ddim50"] = measure(args.n_uncond, False, 50, 0.0)
    if not args.skip_eta:
        out["eta"] = [measure(args.n_eta, c, s, e) for c in (True, False) for s in (10, 20) for e in (0.0, 1.0)]
    out["seconds"] = round(time.perf_counter() - tic, 1)
    c, u = out["cond_ddim50"], out["uncond_ddim50"]
    print(
        f"conditional DDIM-50: accuracy {c['accuracy']:.3f} (target >= 0.95), FD {c['fd']:.3f} "
        f"(target <= 2·F(500) = {2 * out['F(500)']:.3f})"
    )
    print(f"unconditional DDIM-50: FD {u['fd']:.3f} (target <= 5·F(1000) = {5 * out['F(1000)']:.3f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
