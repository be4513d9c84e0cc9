"""`ddim optimize-timesteps`: adaptive step selection for a sampler and a step count."""

from __future__ import annotations

import click

from ddim.cli.common import UsageError, _check_seeds, _guidance, _load_model, main
from ddim.cli.options import class_option, count_option, guidance_option, model_option, progress_option, seed_option
from ddim.sampling import SAMPLERS
from ddim.solvers import STOCHASTIC_SAMPLERS

_DETERMINISTIC = sorted(s for s in SAMPLERS if s not in STOCHASTIC_SAMPLERS)


@main.command("optimize-timesteps")
@model_option()
@click.option("--steps", default=10, show_default=True, type=click.IntRange(min=1), help="Timesteps to choose (S).")
@click.option("--sampler", default="ddim", show_default=True, type=click.Choice(_DETERMINISTIC))
@count_option(16, "Training noises (seeds K…K+n-1).")
@seed_option("First seed K.")
@class_option("all", "Classes of the training noises as in `ddim sample` ('all', an int, a comma list), or 'none'.")
@guidance_option()
@click.option(
    "--reference-sampler",
    default="dpmpp_3m",
    show_default=True,
    type=click.Choice(_DETERMINISTIC),
    help="Sampler of the fine reference (log-SNR steps).",
)
@click.option("--reference-steps", default=200, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--max-evals",
    default=200,
    show_default=True,
    type=click.IntRange(min=0),
    help="Search budget in sampler runs (each costs the sampler's NFE on the n noises).",
)
@click.option(
    "--validate",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Also compare with the starting spacing on this many unseen noises (seeds after the training ones).",
)
@click.option(
    "--objective",
    default="trajectory",
    show_default=True,
    type=click.Choice(["trajectory", "klub"]),
    help="'trajectory': closest to the reference on the noises; 'klub': Align Your Steps' KL upper bound on "
    "--n data samples of --data (any sampler; exact on a --grid of log-SNR levels).",
)
@click.option("--data", default="mnist", show_default=True, help="Clean samples for --objective klub.")
@click.option("--grid", default=100, show_default=True, type=click.IntRange(min=2), help="KLUB grid levels.")
@progress_option()
def optimize_cmd(
    model_path,
    steps,
    sampler,
    n,
    seed,
    class_spec,
    guidance,
    reference_sampler,
    reference_steps,
    max_evals,
    validate,
    objective,
    data,
    grid,
    progress,
) -> None:
    """Choose STEPS timesteps for SAMPLER that bring its samples closest to a fine reference solution
    (or, with --objective klub, that minimise Align Your Steps' KL upper bound).

    Prints the list last, ready for `ddim sample --sampler SAMPLER --timesteps LIST`.
    """
    import torch

    if objective == "klub":
        _klub_cmd(model_path, steps, n, seed, guidance, data, grid, progress)
        return

    from ddim.generate import parse_classes
    from ddim.noise import randn
    from ddim.optimize import optimize_timesteps, trajectory_error
    from ddim.sampling import sample

    _check_seeds(seed, n + (validate or 0))
    model, schedule, config = _load_model(model_path)
    cfg = model.config
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    weight = _guidance(config, guidance)
    k = cfg.num_classes

    def settings(count: int, first: int) -> tuple[torch.Tensor, dict]:
        spec = None if class_spec.strip().lower() == "none" else class_spec
        labels = parse_classes(spec, count, k) if k else torch.full((count,), -1, dtype=torch.long)
        kw: dict = {"prediction": config["prediction"]}
        kw["clip_sample"] = config.get("sampling", {}).get("clip_sample", False)
        kw["use_clipped_model_output"] = config.get("sampling", {}).get("use_clipped_model_output", False)
        if k:
            y = torch.where(labels < 0, torch.full_like(labels, k), labels)
            kw["model_kwargs"] = {"y": y}
            if weight != 1.0 and bool((labels >= 0).any()):
                kw.update(guidance_scale=weight, uncond_kwargs={"y": torch.full_like(y, k)})
        return randn((count, *shape), range(first, first + count)), kw

    try:
        x_T, kw = settings(n, seed)
        stats: dict = {}
        with torch.inference_mode():
            ts = optimize_timesteps(
                model,
                schedule,
                steps,
                x_T,
                sampler=sampler,
                reference_sampler=reference_sampler,
                reference_steps=reference_steps,
                max_evals=max_evals,
                progress=progress,
                stats=stats,
                **kw,
            )
            held_out = None
            if validate:
                x_v, kw_v = settings(validate, seed + n)
                ref = sample(
                    model, x_v, schedule, steps=reference_steps, spacing="logsnr", sampler=reference_sampler, **kw_v
                )
                opt = sample(model, x_v, schedule, timesteps=ts, sampler=sampler, **kw_v)
                start = stats["start_spacing"]
                fixed = sample(model, x_v, schedule, steps=steps, spacing=start, sampler=sampler, **kw_v)
                held_out = (trajectory_error(fixed, ref), trajectory_error(opt, ref))
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    errors = ", ".join(f"{name} {err:.4f}" for name, err in stats["errors"].items())
    click.echo(f"RMS distance to {reference_sampler} at {reference_steps} steps on {n} noises: {errors}")
    click.echo(
        f"optimized from {stats['start_spacing']}: {stats['start_error']:.4f} -> {stats['error']:.4f} "
        f"({stats['evals']} runs, {stats['nfe']} network calls)"
    )
    if held_out is not None:
        start = stats["start_spacing"]
        click.echo(f"on {validate} unseen noises: {start} {held_out[0]:.4f} -> optimized {held_out[1]:.4f}")
    click.echo(",".join(str(t) for t in ts))


def _klub_cmd(model_path, steps, n, seed, guidance, data, grid, progress) -> None:
    """`--objective klub`: the KLUB-optimal STEPS timesteps on the grid, from N samples of DATA."""
    import torch

    from ddim.ays import klub, klub_table, klub_timesteps
    from ddim.data import load_data

    _check_seeds(seed, 1)
    model, schedule, config = _load_model(model_path)
    if steps > grid:
        raise UsageError(f"--steps {steps} is more than --grid {grid} levels")
    try:
        images = load_data(data, getattr(model.config, "image_size", None))
    except (ValueError, RuntimeError) as e:
        raise UsageError(f"--data: {e}") from None
    if n > len(images):
        raise UsageError(f"--n {n} is more than the {len(images)} samples of --data {data}")
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
    k = int(getattr(model.config, "num_classes", 0) or 0)
    weight = _guidance(config, guidance)
    kw: dict = {}
    if k and images.labels is not None:
        y = images.labels[idx]
        kw["model_kwargs"] = {"y": y}
        if weight != 1.0:
            kw.update(guidance_scale=weight, uncond_kwargs={"y": torch.full_like(y, k)})
    s = config.get("sampling", {})
    table = klub_table(
        model,
        schedule,
        images.images[idx],
        grid=grid,
        prediction=config["prediction"],
        seed=seed,
        progress=progress,
        clip_sample=bool(s.get("clip_sample", False)),
        use_clipped_model_output=bool(s.get("use_clipped_model_output", False)),
        **kw,
    )
    ts = klub_timesteps(table, steps)
    click.echo(f"KLUB on {n} samples of {data} ({grid} log-SNR levels): {klub(table, ts):.4g}")
    click.echo(",".join(str(t) for t in ts))
