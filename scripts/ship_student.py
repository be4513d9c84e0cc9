"""Copy a distilled student (a `ddim distill` run folder) into the package as a shipped model (fp16 storage).

    python scripts/ship_student.py /work/runs/pd/run pd4 --description "4-step progressive-distillation student"
    python scripts/ship_student.py /work/runs/cd/run cd --description "consistency model, 1-4 steps" \
        --optimized-timesteps '{"2": [999, 250], "4": [999, 250, 200, 100]}' --note "scripts/consistency_steps.py ..." \
        --default-optimized

Writes ddim/weights/NAME/model.safetensors (fp16) and config.json (the run's config: its sampling defaults,
the distillation record, and ``description``, the line `ddim models` prints). ``ddim.load("NAME")`` then
loads it as float32 (a consistency model wrapped as :class:`ddim.consistency.ConsistencyModel`).
"""

import argparse
import json
from pathlib import Path

import torch

from ddim.checkpoint import load, save_model

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("name")
    ap.add_argument("--description", required=True)
    ap.add_argument(
        "--optimized-timesteps", default=None, help='JSON {"S": [t, ...]}: the lists --spacing optimized uses.'
    )
    ap.add_argument("--note", default=None, help="How the optimised lists were made (config optimized_timesteps_note).")
    ap.add_argument(
        "--default-optimized",
        action="store_true",
        help="Make the lists the model's default spacing ('optimized'; its own spacing stays the fallback at "
        "step counts without a list).",
    )
    args = ap.parse_args()
    model, schedule, config = load(args.run)
    net = getattr(model, "net", model)  # a consistency model stores its network's weights
    extra = {k: v for k, v in config.items() if k not in ("format", "unet", "schedule", "prediction")}
    if "data" not in extra:  # runs before the data record: the evaluations' reference set
        from ddim.data import load_data

        data = load_data(config["distill"]["settings"]["data"])
        extra["data"] = {**data.source, "n": len(data), "class_names": data.class_names}
    extra["description"] = args.description
    if args.optimized_timesteps:
        lists = {str(k): [int(t) for t in v] for k, v in json.loads(args.optimized_timesteps).items()}
        extra["sampling"] = {**extra.get("sampling", {}), "optimized_timesteps": lists}
        if args.note:
            extra["sampling"]["optimized_timesteps_note"] = args.note
        if args.default_optimized:
            own = extra["sampling"].get("spacing", "leading")
            extra["sampling"].update(spacing="optimized", fallback_spacing=own)
    extra["storage_dtype"] = "float16"
    out = Path(__file__).resolve().parent.parent / "ddim" / "weights" / args.name
    save_model(out, net, schedule, config["prediction"], extra, dtype=torch.float16)
    print(f"shipped {args.run} (step {config['distill']['step']}) -> {out}")
