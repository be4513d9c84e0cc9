"""`ddim edit IMAGE… --out OUT`: class edits, SDEdit, inpainting and latent arithmetic on real images.

A thin layer over :mod:`ddim.edit`: every input (images, mask, strength, classes, output) is checked
before the first network call; usage errors exit 2 with one line on stderr.
"""

from __future__ import annotations

from pathlib import Path

import click

from ddim.cli.common import UsageError, _check_out_file, _check_out_folder, _check_seeds, _load_model, main


def _class(value: int | None, flag: str, num_classes: int) -> int | None:
    if value is None:
        return None
    if not num_classes:
        raise UsageError(f"{flag}: this model is unconditional (it has no classes)")
    if not 0 <= value < num_classes:
        raise UsageError(f"{flag} {value}: the model has classes 0..{num_classes - 1}")
    return value


def _outputs(images: tuple[str, ...], out: str) -> list[Path]:
    """The PNG each input is written to: OUT itself for one input and OUT ending in .png, else OUT/<stem>.png."""
    if len(images) == 1 and out.lower().endswith(".png"):
        return [_check_out_file(out, (".png",))]
    if Path(out).suffix:
        raise UsageError(f"--out {out}: give a folder for several images (or a .png for one image)")
    folder = _check_out_folder(out)
    stems = [Path(p).stem for p in images]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise UsageError(f"IMAGES: several inputs are named {dup[0]!r}; their outputs would overwrite each other")
    return [_check_out_file(str(folder / f"{s}.png"), (".png",)) for s in stems]


def _read_images(images, channels: int, size: tuple[int, int]) -> list:
    """Every IMAGES file as uint8 [H, W, C] (``read_image``), refused (usage error) unless its aspect ratio
    is the model's ``size`` (H, W): checked before any network call."""
    from ddim.edit import read_image

    u8s = []
    for p in images:
        try:
            u8 = read_image(p, channels)
            H, W = u8.shape[:2]
            if H * size[1] != W * size[0]:
                raise ValueError(f"{p} is {W}×{H} (W×H); the model makes {size[1]}×{size[0]} images: crop or pad it")
        except ValueError as e:
            raise UsageError(f"IMAGES: {e}") from None
        u8s.append(u8)
    return u8s


@main.command("edit")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, help="A .png (one image) or a folder (OUT/<name>.png per image).")
@click.option("--model", "model_path", default=None, help="Model folder or .safetensors [embedded default].")
@click.option("--to-class", "to_class", type=int, default=None, help="Target class (inversion edit; or the condition).")
@click.option("--source-class", "source_class", type=int, default=None, help="The images' class [null class].")
@click.option("--strength", type=float, default=None, help="SDEdit: noise level in (0, 1], then exactly --steps steps.")
@click.option("--mask", "mask_path", default=None, type=click.Path(dir_okay=False), help="Inpaint: white = regenerate.")
@click.option("--resample", default=1, show_default=True, type=click.IntRange(min=1), help="Inpaint: RePaint takes.")
@click.option("--add-class", "add_class", type=int, default=None, help="Latent arithmetic: + mean latent of class A.")
@click.option("--subtract-class", "sub_class", type=int, default=None, help="Latent arithmetic: - mean of class B.")
@click.option("--scale", default=1.0, show_default=True, type=float, help="Latent arithmetic: scale of A - B.")
@click.option("--data", default=None, help="Latent arithmetic: labelled images for the class means [held-out digits].")
@click.option("--per-class", default=20, show_default=True, type=click.IntRange(min=1), help="Images per class mean.")
@click.option("--steps", default=50, show_default=True, type=click.IntRange(min=1))
@click.option("--spacing", default="leading", show_default=True)
@click.option("--seed", default=0, show_default=True, type=int, help="Image i uses seed K+i (SDEdit, inpainting).")
@click.option("--eta", default=0.0, show_default=True, type=click.FloatRange(min=0.0), help="SDEdit/inpaint η.")
@click.option("--guidance", default=1.0, show_default=True, type=float, help="Guidance weight of the regeneration.")
@click.option(
    "--method",
    default="fixed_point",
    show_default=True,
    type=click.Choice(["ddim", "fixed_point"]),
    help="Inversion of --to-class and --add-class edits (fixed_point: exact, 4 calls a step front-loaded).",
)
@click.option("--prompt", default=None, help="Stable Diffusion folders: the target text (a latent-space edit).")
@click.option("--source-prompt", default="", help='Stable Diffusion folders: the images\' own text [""].')
def edit_cmd(
    images, out, model_path, to_class, source_class, strength, mask_path, resample, add_class, sub_class, scale, data,
    per_class, steps, spacing, seed, eta, guidance, method, prompt, source_prompt,
) -> None:  # fmt: skip
    """Edit real IMAGES: --to-class C (invert, regenerate as C), --strength s (SDEdit), --mask M (inpaint),
    or --add-class A --subtract-class B (latent arithmetic). Writes PNGs at the inputs' sizes."""
    import math

    import torch

    from ddim.edit import check_strength, read_mask, strength_timesteps
    from ddim.timesteps import check_spacing

    modes = [m for m, on in (("--strength", strength is not None), ("--mask", mask_path is not None),
                             ("--add-class", add_class is not None or sub_class is not None)) if on]  # fmt: skip
    if len(modes) > 1:
        raise UsageError(f"{modes[0]} and {modes[1]} are different edits: give one")
    if not modes and to_class is None and prompt is None:
        raise UsageError("nothing to do: give --to-class, --strength, --mask or --add-class/--subtract-class")
    mode = modes[0] if modes else "--to-class"
    if mode == "--add-class" and (add_class is None or sub_class is None):
        raise UsageError("--add-class and --subtract-class go together")
    if mode == "--add-class" and to_class is not None:
        raise UsageError("--to-class: latent arithmetic decodes unconditionally; leave --to-class out")
    if mode != "--mask" and resample != 1:
        raise UsageError("--resample: only with --mask")
    if strength is not None:
        try:
            check_strength(strength)
        except ValueError as e:
            raise UsageError(f"--strength: {e}") from None
    for flag, v in (("--guidance", guidance), ("--scale", scale)):
        if not math.isfinite(v):
            raise UsageError(f"{flag} must be a finite number, got {v}")
    try:
        check_spacing(spacing)
    except ValueError as e:
        raise UsageError(f"--spacing: {e}") from None
    _check_seeds(seed, len(images))
    paths = _outputs(images, out)
    model, schedule, config = _load_model(model_path)
    if hasattr(model, "encode_prompt"):
        return _edit_text(model, schedule, config, images, paths, prompt, source_prompt, modes, to_class,
                          source_class, steps, guidance, method)  # fmt: skip
    if prompt is not None or source_prompt:
        raise UsageError("--prompt/--source-prompt: this model has no text encoder (Stable Diffusion folders only)")
    cfg = model.config
    k = int(getattr(cfg, "num_classes", 0) or 0)
    to_class = _class(to_class, "--to-class", k)
    source_class = _class(source_class, "--source-class", k)
    add_class, sub_class = _class(add_class, "--add-class", k), _class(sub_class, "--subtract-class", k)
    if guidance != 1.0 and (to_class is None or not k):
        raise UsageError("--guidance needs --to-class (the condition guided against the null class)")
    if steps > schedule.T:
        raise UsageError(f"--steps {steps}: the model has {schedule.T} timesteps")
    if strength is not None:
        try:
            strength_timesteps(schedule, steps, spacing, strength)
        except ValueError as e:
            raise UsageError(f"--strength/--steps: {e}") from None
    # read and check every image (and the mask) before any network call
    size = (cfg.image_size, cfg.image_size)
    u8s = _read_images(images, cfg.in_channels, size)
    mask = None
    if mask_path is not None:
        shapes = {u.shape[:2] for u in u8s}
        if len(shapes) > 1:
            raise UsageError("--mask: one mask for several images needs images of one size")
        try:
            mask = read_mask(mask_path, next(iter(shapes)))
        except ValueError as e:
            raise UsageError(f"--mask: {e}") from None
    means = None
    if mode == "--add-class":
        from ddim.evaluation.sources import heldout_data

        try:
            d, _ = heldout_data(model, config, data)
        except (ValueError, RuntimeError) as e:
            raise UsageError(f"--data: {e}") from None
        if d.labels is None:
            raise UsageError("--data: latent arithmetic needs labelled images (class means)")
        for c in (add_class, sub_class):
            if not bool((d.labels == c).any()):
                raise UsageError(f"--data: no image of class {c} to average")
    resized = [u.shape[:2] != size for u in u8s]
    if any(resized):
        click.echo(f"note: images not {size[1]}×{size[0]} are resized to it and the result back (bicubic)", err=True)
    with torch.inference_mode():
        if mode == "--add-class":
            from ddim.edit import class_mean_latents

            means = class_mean_latents(
                model, schedule, d.images, d.labels, [add_class, sub_class], steps=steps, spacing=spacing,
                prediction=config["prediction"], model_kwargs=_null(k), method=method,
                max_iter=_caps(method, steps), per_class=per_class,
            )  # fmt: skip
        for i, (p, u8, dest) in enumerate(zip(images, u8s, paths, strict=True)):
            x = _edit_one(model, schedule, config, u8, size, mode, mask, i + seed, to_class, source_class, k,
                          strength, resample, means, add_class, sub_class, scale, steps, spacing, eta, guidance,
                          method)  # fmt: skip
            _write(x, u8, mask, dest)
            click.echo(f"{p} -> {dest}")


def _null(k: int) -> dict:
    import torch

    return {"y": torch.tensor([k])} if k else {}


def _caps(method: str, steps: int) -> int | list[int]:
    from ddim.inversion import front_loaded

    return front_loaded(steps, 4 * steps) if method == "fixed_point" else 1


def _edit_one(model, schedule, config, u8, size, mode, mask, seed, to_class, source_class, k, strength, resample,
              means, add_class, sub_class, scale, steps, spacing, eta, guidance, method):  # fmt: skip
    """One image through the chosen edit (float [1, C, h, w] at the model's size)."""
    import numpy as np
    import torch

    from ddim.edit import class_swap, fit_image, inpaint, latent_arithmetic, sdedit

    x = fit_image(u8, size)
    pred = config["prediction"]
    y = (lambda c: {"y": torch.tensor([k if c is None else c])}) if k else (lambda c: {})
    guided = {"guidance_scale": guidance, "uncond_kwargs": y(None)} if guidance != 1.0 else {}
    common = {"steps": steps, "spacing": spacing, "prediction": pred}
    if mode == "--to-class":
        out, _ = class_swap(model, schedule, x, source_kwargs=y(source_class), target_kwargs=y(to_class),
                            method=method, max_iter=_caps(method, steps), **common, **guided)  # fmt: skip
        return out
    if mode == "--strength":
        return sdedit(model, schedule, x, strength, seeds=[seed], eta=eta, model_kwargs=y(to_class), **common,
                      **guided)  # fmt: skip
    if mode == "--mask":
        from PIL import Image

        pil = Image.fromarray(mask.astype(np.uint8) * 255)
        small = np.asarray(pil.resize((size[1], size[0]), Image.Resampling.BOX))
        m = torch.from_numpy(small > 0).float()[None, None]  # any covered pixel: regenerate there
        return inpaint(model, schedule, x, m, seeds=[seed], eta=eta, model_kwargs=y(to_class), resample=resample,
                       **common, **guided)  # fmt: skip
    out, _ = latent_arithmetic(model, schedule, x, means[add_class], means[sub_class], model_kwargs=y(None),
                               method=method, max_iter=_caps(method, steps), scale=scale, **common)  # fmt: skip
    return out


def _write(x, u8, mask, dest: Path) -> None:
    """The edit at the input's size; with a mask, the input's own pixels outside it, bit for bit."""
    from ddim.edit import composite, to_input_size
    from ddim.images import save_png

    out = to_input_size(x, u8.shape[:2])
    if mask is not None:
        out = composite(out, u8, mask)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        save_png(out, dest)
    except OSError as e:
        raise click.ClickException(f"--out {dest}: {e}") from None


def _edit_text(model, schedule, config, images, paths, prompt, source_prompt, modes, to_class, source_class, steps,
               guidance, method) -> None:  # fmt: skip
    """`ddim edit --prompt` on a Stable Diffusion folder: :func:`ddim.edit.prompt_edit`, one image at a time."""
    import torch

    from ddim.edit import fit_image, prompt_edit

    if prompt is None:
        raise UsageError("--prompt: a Stable Diffusion folder edits by text (give --prompt, and --source-prompt)")
    if modes or to_class is not None or source_class is not None:
        raise UsageError("--to-class/--strength/--mask/--add-class: an SD folder takes --prompt edits only")
    cfg = model.config
    size = (cfg.height, cfg.width)
    u8s = _read_images(images, cfg.image_channels, size)
    with torch.inference_mode():
        for p, u8, dest in zip(images, u8s, paths, strict=True):
            res = prompt_edit(model, schedule, config, fit_image(u8, size, p), source_prompt, prompt, steps=steps,
                              guidance=guidance, method=method)  # fmt: skip
            _write(res["images"], u8, None, dest)
            click.echo(f"{p} -> {dest}")
