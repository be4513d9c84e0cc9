"""Copy a trained run's EMA weights into the package as the embedded default model (fp16 storage).

    python scripts/ship_default.py runs/default [--guidance G] [--clip-sample] [--spacing S] [--out FOLDER]

Writes ddim/weights/default/model.safetensors (fp16) and config.json (the run's config, with the
storage dtype noted). `ddim.load()` then loads it as float32.
"""

import argparse

import torch

from ddim.checkpoint import default_model_path, load, save_model

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--out", default=str(default_model_path()))
    ap.add_argument("--guidance", type=float, default=None, help="default guidance weight to store")
    ap.add_argument("--clip-sample", action="store_true", help="clip x̂₀ to [-1, 1] by default when sampling")
    ap.add_argument(
        "--use-clipped-model-output",
        action="store_true",
        help="with clipping, recompute ε̂ from the clipped x̂₀ by default (as the shipped model)",
    )
    ap.add_argument("--spacing", default=None, help="default spacing to store (a flow model: trailing)")
    args = ap.parse_args()
    model, schedule, config = load(args.run)
    extra = {k: v for k, v in config.items() if k not in ("format", "unet", "schedule", "prediction")}
    extra["storage_dtype"] = "float16"
    sampling = dict(extra.get("sampling", {}))
    if args.guidance is not None:
        sampling["guidance"] = args.guidance
    sampling["clip_sample"] = bool(args.clip_sample)
    sampling["use_clipped_model_output"] = bool(args.use_clipped_model_output)
    if args.spacing is not None:
        sampling["spacing"] = args.spacing
    extra["sampling"] = sampling
    save_model(args.out, model, schedule, config["prediction"], extra, dtype=torch.float16)
    print(f"shipped {args.run} (step {config['train']['step']}) -> {args.out}")
