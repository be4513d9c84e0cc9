"""Distance to the teacher's converged ODE map, for teachers' samplers and distilled students alike.

    python scripts/student_map_distance.py --runs default:ddim:2,default:ddim:8,pd4:ddim:4,cd:consistency:1 \
        [--n 100] [--ref-steps 200] [--cache runs/eval/ref200.pt]

Image i: seed i, class i mod 10. The reference is the teacher's (``--teacher``, default the embedded
model) DDIM at ``--ref-steps`` (default 200) "trailing" steps with its own guidance and clipping,
from x_T = ``ddim.randn(seed i)``; every run ``model:sampler:steps[:spacing]`` (a shipped name or a
folder; spacing default "trailing") samples from the same x_T with ITS model's settings (a student's
guidance is 1: it learnt the guided map). Printed is the RMS difference on [0, 1] (pixels clamped to
[-1, 1] first). The reference is cached in ``--cache`` (keyed by teacher, n and steps) so that runs can
be added later; ``--bootstrap B`` adds the standard deviation of the figure over B resamples of the
n images, and ``--paired`` (with ``--bootstrap``) each later run's difference to the first run with the
standard deviation of that difference over the same resamples. Used in docs/samplers.md and
ddim/weights/MODEL_CARD.md (the distilled students).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import ddim
from ddim.diffusers_io import sampling_kwargs


def sample_like(
    spec: str, sampler: str, steps: int, spacing: str, n: int, batch: int = 100, progress: bool = False
) -> torch.Tensor:
    """n class-conditional samples (seed i, class i mod 10) of model ``spec`` on [0, 1], float32 [n, C, H, W]."""
    model, schedule, config = ddim.load(spec)
    cfg = model.config
    k = int(getattr(cfg, "num_classes", 0) or 0)
    base = sampling_kwargs(config, schedule, steps, spacing)
    kw: dict = {"prediction": config["prediction"], "sampler": sampler, "spacing": spacing, "steps": steps}
    for key in ("clip_sample", "clip_sample_range", "use_clipped_model_output", "set_alpha_to_one"):
        if key in base:
            kw[key] = base[key]
    guidance = float(config.get("sampling", {}).get("guidance", 1.0))
    out = []
    for lo in range(0, n, batch):
        seeds = list(range(lo, min(n, lo + batch)))
        x_T = ddim.randn((len(seeds), *cfg.sample_shape), seeds)
        extra: dict = {}
        if k:
            y = torch.tensor(seeds) % k
            extra["model_kwargs"] = {"y": y}
            if guidance != 1.0:
                extra.update(guidance_scale=guidance, uncond_kwargs={"y": torch.full_like(y, k)})
        with torch.inference_mode():
            x = ddim.sample(model, x_T, schedule, seeds=seeds, progress=progress, **kw, **extra)
        out.append((x.clamp(-1, 1) + 1) / 2)
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="default")
    ap.add_argument("--runs", required=True, help="model:sampler:steps[:spacing], comma-separated")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--ref-steps", type=int, default=200)
    ap.add_argument("--cache", default=None, help="a .pt file for the reference images")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--bootstrap", type=int, default=0, help="resamples of the n images for a standard deviation (0 = none)"
    )
    ap.add_argument(
        "--paired", action="store_true", help="print each run's difference to the first run (paired bootstrap sd)"
    )
    args = ap.parse_args()
    if args.paired and not args.bootstrap:
        ap.error("--paired needs --bootstrap B (B > 0)")
    torch.set_num_threads(args.threads)
    key = f"{args.teacher}|{args.n}|{args.ref_steps}"
    ref = None
    if args.cache and Path(args.cache).is_file():
        saved = torch.load(args.cache)
        ref = saved["images"] if saved.get("key") == key else None
    tic = time.perf_counter()
    if ref is None:
        ref = sample_like(args.teacher, "ddim", args.ref_steps, "trailing", args.n, progress=True)
        if args.cache:
            Path(args.cache).parent.mkdir(parents=True, exist_ok=True)
            torch.save({"key": key, "images": ref}, args.cache)
    print(f"n = {args.n}, reference {args.teacher} DDIM-{args.ref_steps} trailing ({time.perf_counter() - tic:.0f} s)")
    boot = torch.randint(0, args.n, (args.bootstrap, args.n), generator=torch.Generator().manual_seed(0))
    sd_head = " bootstrap sd |" if args.bootstrap else ""
    print(f"| model | sampler | steps | spacing | RMS to the teacher's converged map |{sd_head}")
    print("|---|---|---:|---|---:|" + ("---:|" if args.bootstrap else ""))
    first = None
    for run in [r.strip() for r in args.runs.split(",") if r.strip()]:
        parts = run.split(":")
        spec, sampler, steps = parts[0], parts[1], int(parts[2])
        spacing = parts[3] if len(parts) > 3 else "trailing"
        x = sample_like(spec, sampler, steps, spacing, args.n)
        per = (x - ref).pow(2).flatten(1).mean(1)  # each image's mean squared difference
        rms = per.mean().sqrt().item()
        sd = f" {per[boot].mean(1).sqrt().std().item():.4f} |" if args.bootstrap else ""
        print(f"| {spec} | {sampler} | {steps} | {spacing} | {rms:.4f} |{sd}", flush=True)
        if args.paired:
            if first is None:
                first = (run, per)
            else:
                diff = per[boot].mean(1).sqrt() - first[1][boot].mean(1).sqrt()
                delta = rms - first[1].mean().sqrt().item()
                print(f"  {run} - {first[0]}: {delta:+.4f} (paired sd {diff.std().item():.4f})")


if __name__ == "__main__":
    main()
