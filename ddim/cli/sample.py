"""`ddim sample`, `ddim invert`, `ddim interpolate` and `ddim compare`."""

from __future__ import annotations

from pathlib import Path

import click

from ddim.cli.common import (
    RUNTIME_ONLY,
    UsageError,
    _check_device,
    _check_out_file,
    _check_out_folder,
    _check_seeds,
    _guidance,
    _load_model,
    _model_default,
    _parse_timesteps,
    _prepare_model,
    main,
)
from ddim.cli.options import (
    batch_option,
    class_option,
    count_option,
    guidance_option,
    model_option,
    progress_option,
    runtime_options,
    sampling_options,
    seed_option,
)


@main.command("sample")
@sampling_options
@runtime_options
@count_option(16, "Number of images (write -n under torchrun, whose parser takes --n for its own options).")
@seed_option()
@class_option(None, "Class: an int, a comma list, or 'all' (image i gets class i mod K). Absent: unconditional.")
@guidance_option()
@batch_option(256, "Images per batch (8 for Stable Diffusion folders unless given).")
@click.option(
    "--out",
    default="samples.png",
    show_default=True,
    help="*.png grid, *.npz arrays (images, labels, seeds), or a folder of PNGs named by seed. Models of "
    "signals or video: *.npz only (samples float32 [N, C, ...], labels, seeds).",
)
@click.option(
    "--use-clipped-model-output/--model-eps",
    "use_clipped",
    default=None,
    help="With x̂₀ clipping: recompute ε̂ from the clipped x̂₀, or keep the model's ε̂ (diffusers' DDIM) [model]",
)
@progress_option()
@click.option("--prompt", default=None, help='Text prompt (Stable Diffusion folders) [""].')
@click.option("--negative-prompt", default=None, help='Negative prompt: the unconditional half of guidance [""].')
@click.option(
    "--prompts",
    "prompts_file",
    default=None,
    type=click.Path(dir_okay=False),
    help="Text file, one prompt per line: image i uses prompt i mod their number (instead of --prompt).",
)
@click.option("--height", default=None, type=int, help="Image height in pixels, a multiple of the VAE factor.")
@click.option("--width", default=None, type=int, help="Image width in pixels [model's].")
@click.option(
    "--guidance-rescale",
    default=0.0,
    show_default=True,
    type=float,
    help="φ of Lin et al. 2023 (for zero-SNR / v-prediction models; 0.7 is theirs).",
)
@click.option(
    "--vae-tiling/--no-vae-tiling",
    default=False,
    show_default=True,
    help="Decode latents in overlapping tiles (bounded memory for large images; seams are blended).",
)
@click.option(
    "--rtol",
    default=None,
    type=click.FloatRange(min=0),
    help="Adaptive steps instead of --steps: the relative error tolerance of DPM-Solver's order-1/2 pair "
    "(0.05 is theirs; smaller: more calls, closer to the exact ODE map). Each image takes its own steps; "
    "the summary reports the calls used.",
)
@click.option(
    "--atol",
    default=None,
    type=click.FloatRange(min=0),
    help="The absolute part of the --rtol tolerance [0.0078: half a uint8 level of [-1, 1]].",
)
def sample_cmd(
    model_path,
    steps,
    eta,
    spacing,
    timesteps_list,
    sampler,
    device,
    precision,
    compile_model,
    channels_last,
    threads,
    n,
    seed,
    class_spec,
    guidance,
    batch,
    out,
    use_clipped,
    progress,
    prompt,
    negative_prompt,
    prompts_file,
    height,
    width,
    guidance_rescale,
    vae_tiling,
    rtol,
    atol,
) -> None:
    """Sample images (DDIM by default) from a model: the embedded MNIST model unless --model is given.

    A Stable Diffusion pipeline folder as --model samples from text: --prompt (or --prompts FILE),
    --negative-prompt, --guidance (default 7.5), --height/--width.

    --rtol TOL takes adaptive steps (DPM-Solver's order-1/2 pair) instead of --steps: each image as many
    as its own trajectory needs for that tolerance."""
    from ddim.diffusers_io import sampling_kwargs
    from ddim.distributed import RankError, local_device
    from ddim.generate import generate, parse_classes, sample_shape
    from ddim.shard import SampleJob

    ts = _parse_timesteps(timesteps_list)
    ctx = click.get_current_context()
    _check_tolerance_flags(ctx, rtol, atol)
    _check_seeds(seed, n)
    _check_sample_out(out)
    device = _check_device(local_device(_check_device(device)))  # under torchrun, "cuda" is this rank's GPU
    model, schedule, config = _load_model(model_path, device)
    steps, sampler = _model_default("steps", steps, config), _model_default("sampler", sampler, config)
    if rtol is not None:  # the adaptive solver picks its own timesteps
        sampler, eta = "ddim", 0.0
    text = _text_options(model, prompt, negative_prompt, prompts_file, height, width, guidance_rescale, vae_tiling)
    try:
        _check_sample_memory(model, n, out)
        labels = parse_classes(class_spec, n, model.config.num_classes)
        # --spacing if given, else the model's (a diffusers scheduler's spacing, offset, clipping...)
        given = ctx.get_parameter_source("spacing") is not click.core.ParameterSource.DEFAULT
        if text is not None:  # the timesteps of the folder's own scheduler (DDIM, DPM-Solver, UniPC, Euler)
            from ddim.stable_diffusion import pipeline_sampling_kwargs as sampling_kwargs
        skw = sampling_kwargs(config, schedule, steps, spacing if given else None, ts)
        if use_clipped is not None:
            skw["use_clipped_model_output"] = use_clipped
        # under torchrun: this rank's share; a folder: only the seeds not yet written
        settings = {k: v for k, v in ctx.params.items() if k not in RUNTIME_ONLY}
        images = len(sample_shape(model)) == 3  # else signals [C, L] or video [C, F, H, W]: float arrays
        if not images and Path(out).suffix.lower() != ".npz":
            raise ValueError(
                f"this model makes samples shaped {list(sample_shape(model))}, not images: "
                f"--out must end in .npz, got {out!r}"
            )
        job = SampleJob.plan(out, n=n, seed=seed, labels=labels, model=model, settings=settings, batch=batch)
        if job.idle_ranks and job.ctx.is_main:
            click.echo(
                f"note: {job.chunks} batch(es) of --batch {batch} for {job.ctx.world_size} processes: "
                f"{job.idle_ranks} of them have nothing to do; a smaller --batch spreads the work",
                err=True,
            )
        fast = _prepare_model(model, device, precision, compile_model, channels_last, threads)
        extra = {}
        if text is not None:  # prompts are encoded once, on the device and in the precision of the model
            from ddim.stable_diffusion import PromptConditioning

            skw["guidance_rescale"] = guidance_rescale
            if ctx.get_parameter_source("batch") is click.core.ParameterSource.DEFAULT:
                batch = 8  # 2 × 8 latents of 64×64 per guided forward of SD at 512×512
            prompts, shape = text
            cond = PromptConditioning.from_prompts(model, prompts, negative_prompt, first_seed=seed)
            extra = dict(image_shape=shape, conditioning=cond, decode=model.decode)
        # Memory stays bounded by --batch: a folder gets each chunk's PNGs as it finishes and keeps
        # nothing; a .npz/.png keeps only the uint8 images it will write (under torchrun each rank
        # keeps its float images for ddim.shard's gather, as before).
        keep = "none" if job.kind == "folder" else "float" if job.ctx.distributed else "uint8"
        if not images:
            if job.ctx.distributed:
                raise ValueError(f"samples shaped {list(sample_shape(model))} are written by one process (no torchrun)")
            keep = "float"
        result = generate(
            fast,
            schedule,
            seeds=job.seeds,
            labels=job.labels,
            guidance=_guidance(config, guidance),
            steps=steps,
            eta=eta,
            spacing=skw.pop("spacing"),
            sampler=sampler,
            timesteps=skw.pop("timesteps"),
            prediction=config["prediction"],
            clip_sample=skw.pop("clip_sample"),
            batch=batch,
            progress=progress and job.progress,
            on_batch=job.on_batch,
            keep=keep,
            device=device,
            sample_kwargs=skw,
            rtol=rtol,
            atol=atol,
            **extra,
        )
        summary = job.finish(result)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    except (RankError, OSError) as e:  # another rank failed; an image could not be written
        raise click.ClickException(str(e)) from None
    if summary:
        click.echo(summary)


def _check_tolerance_flags(ctx: click.Context, rtol: float | None, atol: float | None) -> None:
    """--rtol/--atol: adaptive steps exclude the flags that choose a fixed list of steps."""
    if rtol is None:
        if atol is not None:
            raise UsageError("--atol: it is the absolute part of the --rtol tolerance; give --rtol with it")
        return
    if rtol == 0 and (atol is not None and atol == 0):
        raise UsageError("--rtol 0 with --atol 0: one of them must be > 0")
    fixed = [
        f"--{name.replace('_list', '').replace('_', '-')}"
        for name in ("steps", "spacing", "timesteps_list", "sampler", "eta")
        if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT
    ]
    if fixed:
        raise UsageError(
            "--rtol takes adaptive steps (DPM-Solver's order-1/2 pair picks its own timesteps): "
            f"drop {', '.join(fixed)}, or drop --rtol for a fixed step count"
        )


def _check_sample_memory(model, n: int, out: str) -> None:
    """Refuse an -n whose bookkeeping (about 150 bytes an image: labels, seed lists) or, for a .npz/.png,
    whose images (uint8, float32 under torchrun, and the file's copy) would not fit in this machine's RAM."""
    import math
    import os

    from ddim.generate import sample_shape
    from ddim.outputs import check_memory

    per = 150
    if Path(out).suffix:  # a .npz/.png holds every image in memory until it is written (floats for non-images)
        size = math.prod(sample_shape(model))
        per += size * (8 if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 4)
    hint = "write a folder (--out DIR/) or ask for fewer" if Path(out).suffix else "ask for fewer"
    check_memory(n * per, f"-n {n} with --out {out}", hint)


def _check_sample_out(out: str) -> None:
    """``ddim sample --out``: a .png or .npz file, or a folder (no suffix), that can be written."""
    suffix = Path(out).suffix.lower() if out.strip() else ""
    if suffix in (".png", ".npz"):
        _check_out_file(out, (".png", ".npz"))
    elif suffix:
        raise UsageError(f"--out {out}: must end in .png or .npz, or be a folder (no suffix)")
    else:
        _check_out_folder(out)


def _spacing_option(f):
    from ddim.timesteps import SPACINGS

    return click.option(
        "--spacing", default="leading", show_default=True, type=click.Choice(sorted(SPACINGS)), help="Which timesteps."
    )(f)


def _text_options(model, prompt, negative_prompt, prompts_file, height, width, guidance_rescale, vae_tiling):
    """Check the text-to-image flags against the model: None for a model without a text encoder (then
    none may be given), else (prompts, latent shape [C, h, w])."""
    given = [
        flag
        for flag, v in (
            ("--prompt", prompt),
            ("--negative-prompt", negative_prompt),
            ("--prompts", prompts_file),
            ("--height", height),
            ("--width", width),
        )
        if v is not None
    ]
    if guidance_rescale:
        given.append("--guidance-rescale")
    if vae_tiling:
        given.append("--vae-tiling")
    if not hasattr(model, "encode_prompt"):
        if given:
            raise UsageError(
                f"{given[0]}: this model has no text encoder or VAE (only Stable Diffusion pipeline folders take it)"
            )
        return None
    from ddim.stable_diffusion import read_prompts

    if prompt is not None and prompts_file is not None:
        raise UsageError("--prompt and --prompts: give one of them")
    if not 0.0 <= guidance_rescale <= 1.0:
        raise UsageError(f"--guidance-rescale must lie in [0, 1], got {guidance_rescale}")
    try:
        prompts = read_prompts(prompts_file) if prompts_file is not None else [prompt or ""]
    except ValueError as e:
        raise UsageError(f"--prompts: {e}") from None
    try:
        shape = model.latent_shape(height, width)
    except ValueError as e:
        raise UsageError(f"--{str(e).split()[0]}: {e}") from None
    model.vae_tiling = vae_tiling
    return prompts, shape


@main.command("invert")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@model_option()
@click.option("--steps", default=50, show_default=True, type=click.IntRange(min=1))
@_spacing_option
@class_option(None, "Condition on this class (int or comma list) [null class].")
@click.option(
    "--out",
    default="inverted",
    show_default=True,
    help="Folder: latents.npz (latents, names, mse) and reconstruction.png (originals over reconstructions).",
)
@click.option("--prompt", default=None, help='Stable Diffusion folders: the text to invert under [""].')
@click.option("--guidance", default=1.0, show_default=True, type=float, help="Guidance weight (SD folders).")
@click.option(
    "--method",
    default="ddim",
    show_default=True,
    type=click.Choice(["ddim", "fixed_point", "bdia"]),
    help="ddim: plain inversion (one call a step); fixed_point: exact inversion (up to --max-iter calls a step); "
    "bdia: exact BDIA inversion (one call a step; latents.npz also holds x_next: ddim.inversion.bdia_sample).",
)
@click.option(
    "--max-iter", default=4, show_default=True, type=click.IntRange(min=1), help="fixed_point: calls per step at most."
)
@click.option(
    "--budget",
    default="front",
    show_default=True,
    type=click.Choice(["uniform", "front"]),
    help="fixed_point: --max-iter calls every step, or the same total front-loaded (more on the first steps).",
)
def invert_cmd(images, model_path, steps, spacing, class_spec, out, prompt, guidance, method, max_iter, budget) -> None:
    """DDIM-invert IMAGES to their noise x_T and decode them back; prints the reconstruction error.

    With a Stable Diffusion folder the images are encoded by its VAE and inverted in latent space
    (conditioned on --prompt); latents.npz also holds latent_mse, the inversion's own error."""
    import numpy as np
    import torch

    from ddim.generate import invert_images, load_images, parse_classes, save_npz
    from ddim.images import make_grid, save_png, to_uint8

    outdir = _check_out_folder(out)
    for name in ("latents.npz", "reconstruction.png"):
        _check_out_file(str(outdir / name), None)
    model, schedule, config = _load_model(model_path)
    cfg = model.config
    if hasattr(model, "encode_prompt"):
        if method != "ddim":
            raise UsageError(f"--method {method}: Stable Diffusion folders are inverted with ddim only")
        return _invert_text(model, schedule, config, images, steps, spacing, class_spec, out, prompt, guidance)
    if prompt is not None:
        raise UsageError("--prompt: this model has no text encoder (only Stable Diffusion pipeline folders take it)")
    if method == "bdia" and steps < 2:
        raise UsageError("--steps: BDIA needs at least 2 steps (its first step is plain DDIM)")
    try:
        x = load_images(images, cfg.in_channels, cfg.image_size)
        labels = parse_classes(class_spec, len(images), cfg.num_classes) if class_spec is not None else None
        res = invert_images(
            model,
            schedule,
            x,
            steps=steps,
            spacing=spacing,
            labels=labels,
            prediction=config["prediction"],
            method=method,
            max_iter=max_iter,
            budget=budget,
        )
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        extra = {} if res["x_next"] is None else {"x_next": res["x_next"].float().numpy()}
        save_npz(
            outdir / "latents.npz",
            latents=res["latents"].float().numpy(),
            names=np.array([str(p) for p in images]),
            mse=res["mse"].double().numpy(),
            **extra,
        )
        both = torch.cat([x, res["reconstruction"]])
        save_png(make_grid(to_uint8(both), nrow=len(images)), outdir / "reconstruction.png")
    except OSError as e:
        raise click.ClickException(f"--out {outdir}: {e}") from None
    for p, m in zip(images, res["mse"].tolist(), strict=True):
        click.echo(f"{p}: reconstruction MSE {m:.6f}")
    click.echo(
        f"mean reconstruction MSE (per dimension, [0,1] scale) {res['mse'].mean():.6f} at {steps} steps "
        f"({method} inversion, {res['nfe']} network calls), "
        f"{res['seconds']:.2f} s -> {outdir}/latents.npz, {outdir}/reconstruction.png"
    )


def _invert_text(model, schedule, config, images, steps, spacing, class_spec, out, prompt, guidance) -> None:
    """`ddim invert` on a Stable Diffusion folder: VAE-encode, invert in latent space, report."""
    import numpy as np
    import torch

    from ddim.generate import load_images, save_npz
    from ddim.images import make_grid, save_png, to_uint8
    from ddim.stable_diffusion import invert_text_images

    if class_spec is not None:
        raise UsageError("--class: a Stable Diffusion model has no classes (use --prompt)")
    given = click.get_current_context().get_parameter_source("spacing") is not click.core.ParameterSource.DEFAULT
    try:
        x = load_images(images, model.config.image_channels, (model.config.height, model.config.width))
        res = invert_text_images(
            model, schedule, config, x, prompt or "", steps=steps, guidance=guidance, spacing=spacing if given else None
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
        latent_mse=res["latent_mse"].double().numpy(),
    )
    both = torch.cat([x, res["reconstruction"]])
    save_png(make_grid(to_uint8(both), nrow=len(images)), outdir / "reconstruction.png")
    for p, m, lm in zip(images, res["mse"].tolist(), res["latent_mse"].tolist(), strict=True):
        click.echo(f"{p}: reconstruction MSE {m:.6f} (latent round trip {lm:.3e})")
    click.echo(
        f"mean reconstruction MSE (per dimension, [0,1] scale, VAE included) {res['mse'].mean():.6f}, latent "
        f"round trip {res['latent_mse'].mean():.3e} at {steps} steps, {res['seconds']:.2f} s -> "
        f"{outdir}/latents.npz, {outdir}/reconstruction.png"
    )


@main.command("interpolate")
@model_option()
@click.option("--seed-a", default=0, show_default=True, type=click.IntRange(0, 2**32 - 1))
@click.option("--seed-b", default=1, show_default=True, type=click.IntRange(0, 2**32 - 1))
@click.option("--frames", default=9, show_default=True, type=click.IntRange(min=2))
@click.option("--class", "class_spec", default=None, type=int, help="Class of the strip [unconditional].")
@guidance_option("Guidance weight [model's default].")
@click.option("--steps", default=50, show_default=True, type=click.IntRange(min=1))
@_spacing_option
@batch_option(256, "Frames per batch.")
@click.option("--out", default="interpolation.png", show_default=True, help="PNG strip.")
def interpolate_cmd(model_path, seed_a, seed_b, frames, class_spec, guidance, steps, spacing, batch, out) -> None:
    """Decode a slerp strip between the noises of two seeds (deterministic DDIM), with the model's sampling
    settings (x̂₀ clipping, its spacing unless --spacing is given), as `ddim sample` uses them."""
    import numpy as np

    from ddim.diffusers_io import sampling_kwargs
    from ddim.generate import interpolate_seeds
    from ddim.images import make_grid, save_png, to_uint8

    _check_out_file(out, (".png",))
    model, schedule, config = _load_model(model_path)
    if hasattr(model, "encode_prompt"):
        raise UsageError("--model: ddim interpolate does not take Stable Diffusion folders (it has no --prompt)")
    label = -1 if class_spec is None else class_spec
    k = model.config.num_classes
    if class_spec is not None and not 0 <= label < k:
        valid = f"classes 0..{k - 1}" if k else "no classes (it is unconditional)"
        raise UsageError(f"--class {label} is out of range: this model has {valid}")
    cfg = model.config
    try:
        from ddim.outputs import check_memory

        check_memory(3 * frames * cfg.in_channels * (cfg.image_size + 2) ** 2, f"--frames {frames}", "ask for fewer")
    except ValueError as e:
        raise UsageError(str(e)) from None
    u8 = np.empty((frames, cfg.image_size, cfg.image_size, cfg.in_channels), dtype=np.uint8)

    def keep(first, x):
        u8[first : first + x.shape[0]] = to_uint8(x)

    given = click.get_current_context().get_parameter_source("spacing") is not click.core.ParameterSource.DEFAULT
    try:
        skw = sampling_kwargs(config, schedule, steps, spacing if given else None)
        interpolate_seeds(
            model,
            schedule,
            seed_a,
            seed_b,
            frames=frames,
            label=label,
            guidance=_guidance(config, guidance),
            steps=steps,
            spacing=skw.pop("spacing"),
            timesteps=skw.pop("timesteps"),
            clip_sample=skw.pop("clip_sample"),
            sample_kwargs=skw,
            prediction=config["prediction"],
            batch=batch,
            on_batch=keep,
            keep=False,
        )
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    try:
        save_png(make_grid(u8, nrow=frames), out)
    except OSError as e:
        raise click.ClickException(f"--out {out}: {e}") from None
    click.echo(f"{frames} frames between seeds {seed_a} and {seed_b} -> {out}")


@main.command("compare")
@model_option()
@click.option("--seeds", default="0,1,2,3,4,5,6,7", show_default=True, help="Comma list of seeds (one column each).")
@click.option("--steps", "steps_list", default="10,20,50,100", show_default=True, help="DDIM step counts.")
@click.option(
    "--ddpm-steps",
    default=1000,
    show_default=True,
    type=click.IntRange(min=1),
    help="Steps of the DDPM reference row (the model's T for the full chain).",
)
@class_option()
@guidance_option("Guidance weight [model's default].")
@click.option("--out", default="compare.png", show_default=True, help="Figure (PNG).")
def compare_cmd(model_path, seeds, steps_list, ddpm_steps, class_spec, guidance, out) -> None:
    """DDPM with the full chain next to DDIM at a few step counts, same seeds, with the time each took."""
    from ddim.compare import compare_samplers, plot_comparison

    seed_list = _int_list(seeds, "--seeds")
    steps = _int_list(steps_list, "--steps")
    for s in seed_list:
        _check_seeds(s, 1, "--seeds:")
    bad = [s for s in steps if s < 1]
    if bad:
        raise UsageError(f"--steps: step counts must be >= 1, got {bad[0]}")
    _check_out_file(out, (".png",))
    model, schedule, config = _load_model(model_path)
    if hasattr(model, "encode_prompt"):
        raise UsageError("--model: ddim compare does not take Stable Diffusion folders (it has no --prompt)")
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
    try:
        plot_comparison(rows, out)
    except OSError as e:
        raise click.ClickException(f"--out {out}: {e}") from None
    for r in rows:
        click.echo(
            f"{r['name']:>14}: {r['nfe']:5d} NFE  {r['seconds']:7.2f} s  "
            f"mean |x - DDIM at most steps| on [0,1] {r['dist_to_first']:.4f}"
        )
    click.echo(f"-> {out}")


def _int_list(text: str, flag: str) -> list[int]:
    """A non-empty comma list of ints, or a usage error naming ``flag``."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag} must be a comma list of ints, got {text!r}") from None
    if not values:
        raise UsageError(f"{flag} must name at least one int, got {text!r}")
    return values
