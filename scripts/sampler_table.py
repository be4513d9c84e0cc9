"""The samplers side by side: error against the exact ODE solution on closed-form data, and the
classifier Fréchet distance of a model's samples at 10 network calls.

    python scripts/sampler_table.py --closed-form                # (a) only, ~1 min on one core
    python scripts/sampler_table.py --model runs/default --n 100 # (a) and (b) on a checkpoint
    python scripts/sampler_table.py --n 5000                     # (b) on the embedded model, full size

(a) Closed form: data x₀ ~ a Gaussian mixture in 8 dimensions (3 components, stds 0.1–0.3:
``ddim.GaussianMixture.random(schedule, 8, 3, seed=0)``) with its exact ε* as the model, linear
schedule T = 1000, 256 noises. The error is the RMS distance of each sampler's output (default
settings: the last step lands on ᾱ = 1) to the exact probability-flow ODE solution from the level of
its first listed timestep (RK4 on 1,000 steps; error ~1e-8), at 5/10/20/50 network calls for each
sampler × spacing. Heun makes 2·steps − 1 calls, so it is shown at 5/9/19/49 calls. "euler" is
omitted (it equals "ddim" to 1e-12), and so are the stochastic samplers (they do not solve the ODE).
"leading" and "quadratic" start below T-1, so their rows solve a shorter path (see the note printed).

(b) Model: images of the model (``ddim.load(--model)``, default the embedded one), class i mod 10 for
image i with the model's default guidance (config sampling.guidance), seeds 0..n-1, each sampler at
10 calls (``--calls``; heun: 5 steps = 9 calls) on ``--spacing`` (default logsnr), and DDIM at 50 and 1000 steps
(``--ddim-spacing``, default leading, as the paper). Reported: the Fréchet distance between the shipped
digit classifier's features of the n samples and of the 5,000 MNIST-5k digits, and the share of
samples classified as their class. Small n inflates the distance (compare rows at equal n only).
"""

from __future__ import annotations

import argparse
import time

import torch

import ddim
from ddim import GaussianMixture, NoiseSchedule

ODE = ["ddim", "plms", "plms4", "dpmpp_2m", "dpmpp_3m", "unipc", "heun", "dpmv3"]
ALL = ["ddim", "ddpm", "plms", "plms4", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "unipc", "euler", "heun", "dpmv3"]
SPACINGS = ["leading", "trailing", "linspace", "quadratic", "logsnr", "karras"]
BUDGETS = [5, 10, 20, 50]


def steps_for(sampler: str, calls: int) -> int:
    """The most steps whose network calls do not exceed ``calls``."""
    return (calls + 1) // 2 if sampler == "heun" else calls


#: Closed-form problems: (dimension, mixture components).
PROBLEMS = {"mixture8": (8, 3), "gaussian64": (64, 1)}


def closed_form_table(noises: int = 256, problem: str = "mixture8", samplers: list[str] | None = None) -> str:
    from ddim.model_stats import attach_stats, compute_stats

    sched = NoiseSchedule.linear(1000)
    dim, components = PROBLEMS[problem]
    mix = GaussianMixture.random(sched, dim=dim, components=components, seed=0)
    # DPM-Solver-v3's statistics, estimated as for a network: 2,048 exact draws of x₀, 250 log-SNR levels
    attach_stats(mix, compute_stats(mix, sched, mix.sample_data(2048, seed=7), levels=250, batch=2048))
    x = torch.randn(noises, mix.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    exact: dict[int, torch.Tensor] = {}  # first listed timestep -> exact solution at ᾱ = 1

    def error(sampler: str, spacing: str, calls: int) -> tuple[float, int]:
        steps = steps_for(sampler, calls)
        t0 = int(ddim.timesteps(sched, steps, spacing)[0])
        if t0 not in exact:
            exact[t0] = mix.ode_solve(x, float(sched.alphas_cumprod[t0]), 1.0, 1000)
        stats: dict = {}
        out = ddim.sample(mix, x, sched, steps=steps, spacing=spacing, sampler=sampler, stats=stats)
        return (out - exact[t0]).pow(2).mean().sqrt().item(), stats["nfe"]

    lines = [
        "| sampler | spacing | " + " | ".join(f"{b} calls" for b in BUDGETS) + " |",
        "|---|---|" + "---:|" * len(BUDGETS),
    ]
    for sampler in samplers or ODE:
        for spacing in SPACINGS:
            cells = []
            for b in BUDGETS:
                e, calls = error(sampler, spacing, b)
                cells.append(f"{e:.2e}" + (f" ({calls})" if calls != b else ""))
            lines.append(f"| {sampler} | {spacing} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def model_table(args: argparse.Namespace) -> str:
    from ddim.classifier import load_classifier
    from ddim.data import mnist5k
    from ddim.generate import generate, parse_classes
    from ddim.metrics import frechet_distance

    torch.set_num_threads(args.threads)
    model, schedule, config = ddim.load(args.model)
    guidance = float(config.get("sampling", {}).get("guidance", 1.0)) if args.guidance is None else args.guidance
    clip = bool(config.get("sampling", {}).get("clip_sample", False))
    clipped_eps = bool(config.get("sampling", {}).get("use_clipped_model_output", False))
    k = model.config.num_classes
    labels = parse_classes("all", args.n, k) if k else None
    clf = load_classifier()
    real, _ = clf.predict_features(mnist5k().images)

    budgets = [int(c) for c in args.calls.split(",") if c.strip()]
    runs = [(s, steps_for(s, c), args.spacing) for c in budgets for s in args.samplers]
    runs += [("ddim", int(s), args.ddim_spacing) for s in args.ddim_steps.split(",") if s.strip()]
    lines = [
        f"Model {args.model or 'embedded default'}, n = {args.n}, guidance {guidance}, seeds 0..{args.n - 1}",
        "",
        "| sampler | spacing | steps | calls | Fréchet distance | accuracy | s/image |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for sampler, steps, spacing in runs:
        tic = time.perf_counter()
        res = generate(
            model,
            schedule,
            n=args.n,
            seed=0,
            labels=labels,
            guidance=guidance,
            steps=steps,
            spacing=spacing,
            sampler=sampler,
            prediction=config["prediction"],
            clip_sample=clip,
            batch=args.batch,
            progress=args.progress,
            sample_kwargs={"use_clipped_model_output": clipped_eps},
        )
        seconds = time.perf_counter() - tic
        feats, pred = clf.predict_features(res.images.clamp(-1, 1))
        fd = frechet_distance(feats, real)
        acc = f"{(pred == res.labels).float().mean().item():.3f}" if labels is not None else "–"
        lines.append(f"| {sampler} | {spacing} | {steps} | {res.nfe} | {fd:.2f} | {acc} | {seconds / args.n:.3f} |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--closed-form", action="store_true", help="Only table (a).")
    ap.add_argument("--problem", default="mixture8", choices=sorted(PROBLEMS), help="Data of table (a).")
    ap.add_argument("--closed-form-samplers", default=None, help="Samplers of table (a) [all ODE samplers].")
    ap.add_argument("--no-closed-form", action="store_true", help="Only table (b).")
    ap.add_argument("--model", default=None, help="Model folder or .safetensors [embedded default].")
    ap.add_argument("--n", type=int, default=1000, help="Images per row of table (b).")
    ap.add_argument("--calls", default="10", help="Network-call budgets of the sampler rows, e.g. 10,20.")
    ap.add_argument("--spacing", default="logsnr", help="Spacing of the sampler rows.")
    ap.add_argument("--ddim-spacing", default="leading", help="Spacing of the DDIM reference rows.")
    ap.add_argument("--ddim-steps", default="50,1000", help="Steps of the DDIM reference rows.")
    ap.add_argument("--samplers", default=",".join(ALL), help="Samplers of the --calls rows.")
    ap.add_argument("--guidance", type=float, default=None, help="Guidance of table (b) [the model's default].")
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for table (b).")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args()
    args.samplers = [s for s in args.samplers.split(",") if s.strip()]
    for s in args.samplers:
        ddim.nfe(s, 10)  # refuses unknown names before any work
    if not args.no_closed_form:
        dim, k = PROBLEMS[args.problem]
        print(f"Error against the exact ODE solution (RMS over 256 noises, {dim}-D, {k} component(s)):\n")
        chosen = args.closed_form_samplers.split(",") if args.closed_form_samplers else None
        print(closed_form_table(problem=args.problem, samplers=chosen), flush=True)
        print(
            "\n'leading' and 'quadratic' do not start at t = T-1 (quadratic starts at t = 799): their error is"
            " measured from their own first level, a shorter path; the mismatch of an N(0, I) x_T with that"
            " level is a model error this table does not count.\n",
            flush=True,
        )
    if not args.closed_form:
        print("Classifier Fréchet distance against MNIST-5k:\n")
        print(model_table(args))


if __name__ == "__main__":
    main()
