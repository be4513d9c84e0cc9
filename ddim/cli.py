"""The ``ddim`` command line: a thin layer over the library (every command calls public functions)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ddim import __version__


class UsageError(click.UsageError):
    """A bad flag value: one line on stderr, exit status 2."""


def run(argv: list[str] | None = None) -> int:
    """Console entry point: runs :func:`main`; a usage error prints ONE line and exits with status 2."""
    try:
        rv = main.main(args=argv, prog_name="ddim", standalone_mode=False)
    except click.UsageError as e:
        hint = f" (see 'ddim {e.ctx.info_name} --help')" if e.ctx is not None and e.ctx.parent is not None else ""
        click.echo(f"ddim: error: {e.format_message()}{hint}", err=True)
        return 2
    except click.ClickException as e:
        click.echo(f"ddim: error: {e.format_message()}", err=True)
        return e.exit_code
    except click.exceptions.Abort:
        click.echo("ddim: aborted", err=True)
        return 130
    return rv if isinstance(rv, int) else 0


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="ddim")
def main() -> None:
    """Sample DDPM-trained diffusion models fast: DDIM and its successors."""


@main.command("train")
@click.option(
    "--data",
    default="mnist",
    show_default=True,
    help="'mnist' (MNIST-5k less 500 held-out), 'mnist-all', 'digits' (sklearn 8x8), a .npz, or a folder.",
)
@click.option("--out", default="runs/default", show_default=True, help="Run folder (checkpoints, log, grids).")
@click.option("--steps", default=10000, show_default=True, type=click.IntRange(min=1), help="Total optimizer steps.")
@click.option("--batch", "batch_size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", default=1e-3, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--warmup", default=200, show_default=True, type=click.IntRange(min=0))
@click.option("--ema", "ema_decay", default=0.999, show_default=True, type=click.FloatRange(0, 1, max_open=True))
@click.option("--grad-clip", default=1.0, show_default=True, type=click.FloatRange(min=0))
@click.option(
    "--prediction",
    default="epsilon",
    show_default=True,
    type=click.Choice(["epsilon", "sample", "v_prediction"]),
    help="Network target.",
)
@click.option(
    "--schedule", default="linear", show_default=True, type=click.Choice(["linear", "cosine", "scaled_linear"])
)
@click.option("--T", "T", default=1000, show_default=True, type=click.IntRange(min=1), help="Training timesteps.")
@click.option(
    "--class-cond/--no-class-cond",
    default=True,
    show_default=True,
    help="Condition on labels (when the data has them).",
)
@click.option(
    "--label-dropout",
    default=0.2,
    show_default=True,
    type=click.FloatRange(0, 1, max_open=True),
    help="Probability of the null class, for classifier-free guidance.",
)
@click.option("--image-size", default=None, type=click.IntRange(min=4), help="Size for image folders [64].")
@click.option("--base-channels", default=None, type=click.IntRange(min=4), help="U-Net width [16].")
@click.option("--channel-mults", default=None, help="U-Net channel multipliers per level, e.g. 1,3,6.")
@click.option("--checkpoint-every", default=500, show_default=True, type=click.IntRange(min=0))
@click.option("--sample-every", default=1000, show_default=True, type=click.IntRange(min=0))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--threads", default=0, show_default=True, type=click.IntRange(min=0), help="CPU threads (0 = torch).")
@click.option("--fresh", is_flag=True, help="Start over even if the run folder holds a resumable state.")
def train_cmd(fresh: bool, base_channels, channel_mults, **kw) -> None:
    """Train a U-Net with the DDPM objective; resumes exactly from the run folder's last checkpoint."""
    from ddim.train import TrainConfig, train

    unet = {}
    if base_channels:
        unet["base_channels"] = base_channels
    if channel_mults:
        try:
            unet["channel_mults"] = [int(m) for m in channel_mults.split(",")]
        except ValueError:
            raise UsageError(f"--channel-mults must be comma-separated ints, got {channel_mults!r}") from None
    cfg = TrainConfig(unet=unet, **kw)
    try:
        out = train(cfg, resume=not fresh, progress=True)
    except ValueError as e:
        raise UsageError(str(e)) from None
    click.echo(f"trained {cfg.steps} steps -> {out}")


# ------------------------------------------------------------------ shared options
def _load_model(path: str | None):
    from ddim.checkpoint import load

    try:
        return load(path)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"--model: {e}") from None


def _sampling_options(f):
    from ddim.sampling import SAMPLERS
    from ddim.timesteps import SPACINGS

    opts = [
        click.option("--model", "model_path", default=None, help="Model folder or .safetensors [embedded default]."),
        click.option(
            "--steps",
            default=50,
            show_default=True,
            type=click.IntRange(min=1),
            help="Sampling steps S (timesteps listed).",
        ),
        click.option(
            "--eta",
            default=0.0,
            show_default=True,
            type=click.FloatRange(min=0),
            help="η: 0 deterministic DDIM, 1 DDPM-like.",
        ),
        click.option(
            "--spacing",
            default="leading",
            show_default=True,
            type=click.Choice(sorted(SPACINGS)),
            help="Which S timesteps.",
        ),
        click.option(
            "--timesteps",
            "timesteps_list",
            default=None,
            help="Explicit descending comma list of timesteps (overrides --steps/--spacing).",
        ),
        click.option("--sampler", default="ddim", show_default=True, type=click.Choice(sorted(SAMPLERS))),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _parse_timesteps(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--timesteps must be a comma list of ints, got {text!r}") from None


def _guidance(config: dict, guidance: float | None) -> float:
    return float(config.get("sampling", {}).get("guidance", 1.0)) if guidance is None else guidance


@main.command("sample")
@_sampling_options
@click.option("--n", default=16, show_default=True, type=click.IntRange(min=1), help="Number of images.")
@click.option("--seed", default=0, show_default=True, type=int, help="Image i uses seed K+i.")
@click.option(
    "--class",
    "class_spec",
    default=None,
    help="Class: an int, a comma list, or 'all' (image i gets class i mod K). Absent: unconditional.",
)
@click.option("--guidance", default=None, type=float, help="Classifier-free guidance weight [model's default].")
@click.option("--batch", default=256, show_default=True, type=click.IntRange(min=1), help="Images per batch.")
@click.option(
    "--out",
    default="samples.png",
    show_default=True,
    help="*.png grid, *.npz arrays (images, labels, seeds), or a folder of PNGs named by seed.",
)
@click.option("--progress/--no-progress", default=True, show_default=True)
def sample_cmd(
    model_path, steps, eta, spacing, timesteps_list, sampler, n, seed, class_spec, guidance, batch, out, progress
) -> None:
    """Sample images (DDIM by default) from a model: the embedded MNIST model unless --model is given."""
    from ddim.generate import generate, parse_classes, write_images

    ts = _parse_timesteps(timesteps_list)
    model, schedule, config = _load_model(model_path)
    try:
        labels = parse_classes(class_spec, n, model.config.num_classes)
        result = generate(
            model,
            schedule,
            n=n,
            seed=seed,
            labels=labels,
            guidance=_guidance(config, guidance),
            steps=steps,
            eta=eta,
            spacing=spacing,
            sampler=sampler,
            timesteps=ts,
            prediction=config["prediction"],
            clip_sample=config.get("sampling", {}).get("clip_sample", False),
            batch=batch,
            progress=progress,
        )
        paths = write_images(result, out)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    where = out if len(paths) == 1 else f"{out}/ ({len(paths)} files)"
    click.echo(
        f"{n} images, {result.nfe} network evaluations per image, {result.seconds:.2f} s "
        f"({n / result.seconds:.1f} images/s) -> {where}"
    )


def console() -> None:  # pragma: no cover - the installed `ddim` script
    sys.exit(run())


@main.command("invert")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--model", "model_path", default=None, help="Model folder or .safetensors [embedded default].")
@click.option("--steps", default=50, show_default=True, type=click.IntRange(min=1))
@click.option("--spacing", default="leading", show_default=True)
@click.option("--class", "class_spec", default=None, help="Condition on this class (int or comma list) [null class].")
@click.option(
    "--out",
    default="inverted",
    show_default=True,
    help="Folder: latents.npz (latents, names, mse) and reconstruction.png (originals over reconstructions).",
)
def invert_cmd(images, model_path, steps, spacing, class_spec, out) -> None:
    """DDIM-invert IMAGES to their noise x_T and decode them back; prints the reconstruction error."""
    import numpy as np
    import torch

    from ddim.generate import invert_images, load_images, parse_classes, save_npz
    from ddim.images import make_grid, save_png, to_uint8

    model, schedule, config = _load_model(model_path)
    cfg = model.config
    try:
        x = load_images(images, cfg.in_channels, cfg.image_size)
        labels = parse_classes(class_spec, len(images), cfg.num_classes) if class_spec is not None else None
        res = invert_images(
            model, schedule, x, steps=steps, spacing=spacing, labels=labels, prediction=config["prediction"]
        )
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    save_npz(
        outdir / "latents.npz",
        latents=res["latents"].float().numpy(),
        names=np.array([str(p) for p in images]),
        mse=res["mse"].double().numpy(),
    )
    both = torch.cat([x, res["reconstruction"]])
    save_png(make_grid(to_uint8(both), nrow=len(images)), outdir / "reconstruction.png")
    for p, m in zip(images, res["mse"].tolist(), strict=True):
        click.echo(f"{p}: reconstruction MSE {m:.6f}")
    click.echo(
        f"mean reconstruction MSE (per dimension, [0,1] scale) {res['mse'].mean():.6f} at {steps} steps, "
        f"{res['seconds']:.2f} s -> {outdir}/latents.npz, {outdir}/reconstruction.png"
    )


@main.command("interpolate")
@click.option("--model", "model_path", default=None, help="Model folder or .safetensors [embedded default].")
@click.option("--seed-a", default=0, show_default=True, type=int)
@click.option("--seed-b", default=1, show_default=True, type=int)
@click.option("--frames", default=9, show_default=True, type=click.IntRange(min=2))
@click.option("--class", "class_spec", default=None, type=int, help="Class of the strip [unconditional].")
@click.option("--guidance", default=None, type=float, help="Guidance weight [model's default].")
@click.option("--steps", default=50, show_default=True, type=click.IntRange(min=1))
@click.option("--spacing", default="leading", show_default=True)
@click.option("--out", default="interpolation.png", show_default=True, help="PNG strip.")
def interpolate_cmd(model_path, seed_a, seed_b, frames, class_spec, guidance, steps, spacing, out) -> None:
    """Decode a slerp strip between the noises of two seeds (deterministic DDIM)."""
    from ddim.generate import interpolate_seeds
    from ddim.images import make_grid, save_png, to_uint8

    model, schedule, config = _load_model(model_path)
    label = -1 if class_spec is None else class_spec
    if label >= 0 and not 0 <= label < model.config.num_classes:
        raise UsageError(f"--class {label} is out of range for this model")
    try:
        x = interpolate_seeds(
            model,
            schedule,
            seed_a,
            seed_b,
            frames=frames,
            label=label,
            guidance=_guidance(config, guidance),
            steps=steps,
            spacing=spacing,
            prediction=config["prediction"],
        )
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    save_png(make_grid(to_uint8(x), nrow=frames), out)
    click.echo(f"{frames} frames between seeds {seed_a} and {seed_b} -> {out}")


@main.command("compare")
@click.option("--model", "model_path", default=None, help="Model folder or .safetensors [embedded default].")
@click.option("--seeds", default="0,1,2,3,4,5,6,7", show_default=True, help="Comma list of seeds (one column each).")
@click.option("--steps", "steps_list", default="10,20,50,100", show_default=True, help="DDIM step counts.")
@click.option(
    "--ddpm-steps",
    default=1000,
    show_default=True,
    type=click.IntRange(min=1),
    help="Steps of the DDPM reference row (the model's T for the full chain).",
)
@click.option("--class", "class_spec", default=None, help="Class spec as in `ddim sample` [unconditional].")
@click.option("--guidance", default=None, type=float, help="Guidance weight [model's default].")
@click.option("--out", default="compare.png", show_default=True, help="Figure (PNG).")
def compare_cmd(model_path, seeds, steps_list, ddpm_steps, class_spec, guidance, out) -> None:
    """DDPM with the full chain next to DDIM at a few step counts, same seeds, with the time each took."""
    from ddim.compare import compare_samplers, plot_comparison

    model, schedule, config = _load_model(model_path)
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
        steps = [int(s) for s in steps_list.split(",") if s.strip()]
    except ValueError:
        raise UsageError("--seeds and --steps must be comma lists of ints") from None
    try:
        rows = compare_samplers(
            model,
            schedule,
            config,
            seed_list,
            steps,
            ddpm_steps=ddpm_steps,
            class_spec=class_spec,
            guidance=_guidance(config, guidance),
        )
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    plot_comparison(rows, out)
    for r in rows:
        click.echo(
            f"{r['name']:>14}: {r['nfe']:5d} NFE  {r['seconds']:7.2f} s  "
            f"mean |x - DDPM| on [0,1] {r['dist_to_first']:.4f}"
        )
    click.echo(f"-> {out}")
