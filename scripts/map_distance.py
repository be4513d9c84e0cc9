"""Distance to the converged ODE map: how far a sampler's images are from DDIM-200's from the same x_T.

    python scripts/map_distance.py --runs ddim:10,plms:10,dpmpp_2m:10 [--spacing leading] [--n 64]

For the embedded model (or ``--model``), n class-conditional samples (image i: seed i, class i mod 10,
the model's guidance and clipping settings) are made with each ``sampler:steps`` run and with DDIM at
``--ref-steps`` (default 200) steps on the same spacing; printed is the RMS difference of the images on
[0, 1] (pixel values clamped to [-1, 1] first). A classifier's features barely see blur and speckle;
this distance does. Used in docs/samplers.md (PLMS at few steps).
"""

from __future__ import annotations

import argparse
import time

import torch

import ddim
from ddim.diffusers_io import sampling_kwargs


def map_rms(
    model: torch.nn.Module,
    schedule: ddim.NoiseSchedule,
    config: dict,
    runs: list[tuple[str, int]],
    *,
    n: int = 64,
    spacing: str = "leading",
    ref_steps: int = 200,
) -> dict[tuple[str, int], float]:
    """RMS on [0, 1] between each (sampler, steps) run and DDIM-``ref_steps`` from the same n noises."""
    cfg = model.config
    k = int(getattr(cfg, "num_classes", 0) or 0)
    x_T = ddim.randn((n, cfg.in_channels, cfg.image_size, cfg.image_size), range(n))
    kw: dict = {"prediction": config["prediction"]}
    base = sampling_kwargs(config, schedule, ref_steps, spacing)
    for key in ("clip_sample", "clip_sample_range", "use_clipped_model_output", "set_alpha_to_one"):
        if key in base:
            kw[key] = base[key]
    if k:
        y = torch.arange(n) % k
        kw["model_kwargs"] = {"y": y}
        guidance = float(config.get("sampling", {}).get("guidance", 1.0))
        if guidance != 1.0:
            kw.update(guidance_scale=guidance, uncond_kwargs={"y": torch.full_like(y, k)})

    def run(sampler: str, steps: int) -> torch.Tensor:
        with torch.inference_mode():
            x = ddim.sample(model, x_T, schedule, steps=steps, spacing=spacing, sampler=sampler, seeds=range(n), **kw)
        return (x.clamp(-1, 1) + 1) / 2

    ref = run("ddim", ref_steps)
    return {(s, st): (run(s, st) - ref).pow(2).mean().sqrt().item() for s, st in runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--runs", default="ddim:10,plms:10,dpmpp_2m:10", help="sampler:steps, comma-separated")
    ap.add_argument("--spacing", default="leading")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--ref-steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, schedule, config = ddim.load(args.model)
    runs = [(r.split(":")[0], int(r.split(":")[1])) for r in args.runs.split(",") if r.strip()]
    tic = time.perf_counter()
    res = map_rms(model, schedule, config, runs, n=args.n, spacing=args.spacing, ref_steps=args.ref_steps)
    print(f"n = {args.n}, spacing {args.spacing}, reference DDIM-{args.ref_steps} ({time.perf_counter() - tic:.0f} s)")
    print("| sampler | steps | RMS to the converged map |")
    print("|---|---:|---:|")
    for (s, st), v in res.items():
        print(f"| {s} | {st} | {v:.4f} |")


if __name__ == "__main__":
    main()
