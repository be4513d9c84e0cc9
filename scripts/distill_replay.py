"""Progressive distillation with a replayed pool of teacher targets: how the shipped `pd4` was trained on CPU.

`ddim distill progressive` draws fresh teacher targets for every optimizer step (Salimans & Ho 2022), so each
target is used once and the teacher's calls cost most of a step. On a 2-core machine the student then
sees too few examples. Here the two halves run side by side, one process each:

    # 1. teacher targets, written as shards of --chunk examples until stopped (or --max-chunks)
    python scripts/distill_replay.py targets --pool runs/pool --from-steps 16 --to-steps 4 --bf16 &
    # 2. the student, trained on the newest --window targets of the pool as they arrive
    python scripts/distill_replay.py train --pool runs/pool --init runs/k4 --out runs/k4r --steps 5000 --window 16000

Targets (``targets``): image x₀ from the teacher's data, class y, student step i drawn with ``--step-probs``
(default 0.1, 0.35, 0.35, 0.2: the middle steps of a 4-step student cost the most distance to the teacher's
map), z_t = α_t x₀ + σ_t ε on the student's trailing grid, and the x̂₀ target x̃ of
:func:`ddim.distill.teacher_target` after K = from/to teacher DDIM steps at the teacher's own guidance and
clipping. ``--bf16`` runs the teacher under bfloat16 autocast (1.6x faster here; its landing points move
by 0.003 RMS, about 2% of the student's remaining squared error). Chunk c uses the seed 10000 + c, so a
pool is reproducible chunk by chunk; chunk 0 is the validation set and never trained on.

The teacher's grid is ``--from-steps`` "trailing" steps; the student's 4 levels are every K-th of them,
so ``--from-steps 32`` writes targets for the same student levels from eight teacher DDIM steps (DDIM-32,
0.015 from the teacher's DDIM-200 map where DDIM-16 is 0.030), at half the rate. Chunk c draws the same
x₀, class, step and noise whatever ``--from-steps``, so pools of two grids hold the same z_t.

Training (``train``): the student starts from ``--init`` (a ddim model on the same schedule, e.g. a
`ddim distill progressive --teacher-steps-per-step K` run), draws batches from the newest ``--window``
targets (all when 0), and minimises the "landing" loss of :mod:`ddim.distill` (the squared distance
between the student's and the teacher's landing points) with AdamW, a 50-step warm-up, a linear decay
to 0, gradient clipping at 1 and EMA weights (decay 0.999 with the (1+n)/(10+n) warm-up). The pool is
re-read every 50 steps. Every 250 steps it prints the EMA's validation loss per student step; every 1000
and at the end it saves the EMA as a ddim model folder (its config: the init's sampling settings and a
``distill`` record). A stopped run restarts from ``--init``. Timing follows the pool, so a run is not
bit-reproducible unless the pool is complete before training starts.
"""

from __future__ import annotations

import argparse
import copy
import glob
import os
import time
from pathlib import Path

import torch

import ddim
from ddim.checkpoint import save_model
from ddim.data import load_data
from ddim.distill import _levels, landing_weight, teacher_target
from ddim.prediction import Denoiser
from ddim.timesteps import timesteps as make_timesteps
from ddim.train import _ema_update


def _grid_levels(schedule, from_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's trailing grid (int64 [N·K]) and its ᾱ levels followed by the final ᾱ = 1 (float64)."""
    ts = torch.as_tensor(make_timesteps(schedule, from_steps, "trailing"))
    return ts, _levels(schedule, ts, set_alpha_to_one=True)


def targets(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    teacher, schedule, config = ddim.load(args.teacher)
    teacher = teacher.eval().requires_grad_(False)
    sampling = config.get("sampling", {})
    guidance = float(sampling.get("guidance", 1.0))
    opts = {key: bool(sampling[key]) for key in ("clip_sample", "use_clipped_model_output") if key in sampling}
    k = args.from_steps // args.to_steps
    ts, levels = _grid_levels(schedule, args.from_steps)
    data = load_data(args.data)
    probs = torch.tensor([float(p) for p in args.step_probs.split(",")])
    if probs.numel() != args.to_steps:
        raise SystemExit(f"--step-probs needs {args.to_steps} values, got {probs.numel()}")
    null = teacher.config.num_classes
    pool = Path(args.pool)
    pool.mkdir(parents=True, exist_ok=True)
    c, made = args.worker, 0
    while args.max_chunks <= 0 or made < args.max_chunks:
        path = pool / f"c{c:05d}.pt"
        if path.exists():
            c += args.workers
            continue
        g = torch.Generator().manual_seed(10_000 + c)
        idx = torch.randint(0, len(data.images), (args.chunk,), generator=g)
        x0, y = data.images[idx], data.labels[idx]
        index = torch.multinomial(probs, args.chunk, replacement=True, generator=g)
        noise = torch.randn(x0.shape, generator=g)
        a = levels[k * index]
        z = (a.sqrt().view(-1, 1, 1, 1) * x0 + (1 - a).sqrt().view(-1, 1, 1, 1) * noise).float()
        uncond = {"y": torch.full_like(y, null)} if guidance != 1.0 else None
        teach = Denoiser(
            teacher, schedule, config["prediction"], guidance_scale=guidance, model_kwargs={"y": y},
            uncond_kwargs=uncond, **opts,
        )  # fmt: skip
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            x_tilde, _, _ = teacher_target(teach, z, index, ts, k)
        tmp = path.with_suffix(".tmp")
        torch.save({"z": z, "x_tilde": x_tilde.float(), "index": index, "y": y, "bf16": args.bf16}, tmp)
        os.replace(tmp, path)
        print("chunk", c, flush=True)
        c += args.workers
        made += 1


def _read_pool(pool: str, have: dict) -> dict:
    for f in sorted(glob.glob(f"{pool}/c*.pt")):
        if f not in have and not f.endswith("c00000.pt"):
            have[f] = torch.load(f)
    return have


def train(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    student, schedule, scfg = ddim.load(args.init)
    student = student.train(False).requires_grad_(True)
    ema = copy.deepcopy(student).requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    ts, lv = _grid_levels(schedule, args.from_steps)
    k = args.from_steps // args.to_steps
    w_land = landing_weight(lv[0:-1:k], lv[k::k]).float()  # per student step
    w_loss = w_land * torch.tensor([float(m) for m in args.step_weights.split(",")])
    print("landing weights", w_land.tolist(), flush=True)
    val = torch.load(f"{args.pool}/c00000.pt")
    prediction = scfg["prediction"]

    def loss_on(d: dict, idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        z, xt, i, y = d["z"], d["x_tilde"], d["index"], d["y"]
        if idx is not None:
            z, xt, i, y = z[idx], xt[idx], i[idx], y[idx]
        x0, _ = Denoiser(student, schedule, prediction, model_kwargs={"y": y})(z, ts[k * i], lv[k * i])
        return (x0 - xt).pow(2).flatten(1).mean(1), i

    extra = {key: v for key, v in scfg.items() if key not in ("format", "unet", "schedule", "prediction")}
    g = torch.Generator().manual_seed(0)
    pool: dict = {}
    cat = None
    t0, smooth = time.time(), None
    for step in range(args.steps):
        if step % 50 == 0:
            n_before = len(pool)
            pool = _read_pool(args.pool, pool)
            if len(pool) != n_before or cat is None:
                cat = {key: torch.cat([d[key] for d in pool.values()]) for key in ("z", "x_tilde", "index", "y")}
        lr = args.lr * min(1.0, (step + 1) / 50) * (1 - step / args.steps)
        for group in opt.param_groups:
            group["lr"] = lr
        n = len(cat["z"])
        lo = max(0, n - (args.window or n))
        idx = lo + torch.randint(0, n - lo, (args.batch,), generator=g)
        err, i = loss_on(cat, idx)
        loss = (w_loss[i] * err).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        _ema_update(ema, student, min(0.999, (1 + step) / (10 + step)))
        v = float(loss.detach())
        smooth = v if smooth is None else 0.98 * smooth + 0.02 * v
        if (step + 1) % 250 == 0 or step + 1 == args.steps:
            with torch.no_grad():
                student, raw = ema, student
                e, i = loss_on(val)
                student = raw
            per = [f"{(w_land[j] * e[i == j].mean()).item():.2e}" for j in range(args.to_steps)]
            print(
                f"step {step + 1} pool {n} train {smooth:.3e} val(ema) {(w_land[i] * e).mean():.3e} "
                f"per-step {per} lr {lr:.2e} {time.time() - t0:.0f}s",
                flush=True,
            )
        if (step + 1) % 1000 == 0 or step + 1 == args.steps:
            record = {
                "method": "progressive",
                "replay": {"init": str(args.init), "pool": str(args.pool), "pool_size": n, "window": args.window},
                "teacher_steps": args.from_steps,
                "student_steps": args.to_steps,
                "step": step + 1,
                "steps": args.steps,
                "batch_size": args.batch,
                "lr": args.lr,
                "wall_seconds": round(time.time() - t0, 1),
                "done": step + 1 == args.steps,
            }
            save_model(args.out, ema, schedule, prediction, {**extra, "distill": record})
    print("done", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    for name in ("targets", "train"):
        p = sub.add_parser(name)
        p.add_argument("--pool", required=True, help="folder of target shards")
        p.add_argument("--from-steps", type=int, default=16)
        p.add_argument("--to-steps", type=int, default=4)
        p.add_argument("--threads", type=int, default=1)
    t = sub.choices["targets"]
    t.add_argument("--teacher", default="default")
    t.add_argument("--data", default="mnist")
    t.add_argument("--chunk", type=int, default=128)
    t.add_argument("--step-probs", default="0.1,0.35,0.35,0.2")
    t.add_argument("--bf16", action="store_true")
    t.add_argument("--worker", type=int, default=0, help="this process writes chunks worker, worker + workers, ...")
    t.add_argument("--workers", type=int, default=1)
    t.add_argument("--max-chunks", type=int, default=0, help="stop after this many new chunks (0: never)")
    r = sub.choices["train"]
    r.add_argument("--init", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--steps", type=int, required=True)
    r.add_argument("--lr", type=float, default=1e-4)
    r.add_argument("--batch", type=int, default=64)
    r.add_argument("--window", type=int, default=0, help="train on the newest W targets (0: all)")
    r.add_argument(
        "--step-weights", default="1,1,1,1", help="factors on the landing weight of each student step (default 1)"
    )
    args = ap.parse_args()
    targets(args) if args.command == "targets" else train(args)


if __name__ == "__main__":
    main()
