"""`ddim stats`: DPM-Solver-v3's empirical model statistics of a model, written beside its weights."""

from __future__ import annotations

from pathlib import Path

import click

from ddim.cli.common import UsageError, _check_seeds, _finite_cb, _guidance, _load_model, main


@main.command("stats")
@click.option("--model", "model_path", default=None, help="Model folder or .safetensors [embedded default].")
@click.option(
    "--out",
    default=None,
    help="Statistics file (.safetensors) [beside the model's weights: model.ems.safetensors].",
)
@click.option(
    "--data",
    default="mnist",
    show_default=True,
    help="Clean samples: 'mnist' (MNIST-5k less the held-out digits), 'digits', a .npz or a folder of images.",
)
@click.option("--n", "-n", default=256, show_default=True, type=click.IntRange(min=2), help="Data samples used.")
@click.option(
    "--levels",
    default=40,
    show_default=True,
    type=click.IntRange(min=2),
    help="Grid levels (timesteps uniform in log-SNR from T-1 to 0).",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Seeds the choice of samples, noises and probes.")
@click.option(
    "--guidance",
    default=None,
    type=float,
    callback=_finite_cb,
    help="Classifier-free guidance weight the statistics are for [model's default].",
)
@click.option("--batch", default=128, show_default=True, type=click.IntRange(min=1), help="Samples per call.")
@click.option(
    "--l-only",
    is_flag=True,
    help="Keep l and write s = b = 0 (what the embedded model ships: its estimated s, b made the map worse).",
)
@click.option("--threads", default=None, type=click.IntRange(min=1), help="torch threads [torch's default].")
@click.option("--progress/--no-progress", default=True, show_default=True)
def stats_cmd(model_path, out, data, n, levels, seed, guidance, batch, l_only, threads, progress) -> None:
    """Compute DPM-Solver-v3's empirical model statistics (l, s, b per pixel and log-SNR level) on N data samples.

    `ddim sample --sampler dpmv3` and ddim.load() use the file beside the model's weights. Cost: LEVELS · N
    forward and backward passes plus twice as many forwards (guided ones count twice)."""
    import torch

    from ddim.checkpoint import _resolve
    from ddim.data import load_data
    from ddim.model_stats import compute_stats, save_stats, stats_path

    _check_seeds(seed, 1)
    if threads is not None:
        torch.set_num_threads(threads)
    model, schedule, config = _load_model(model_path)
    if not hasattr(model, "config") or not hasattr(model.config, "in_channels"):
        raise UsageError("--model: statistics are computed for ddim U-Net models only")
    target = Path(out) if out is not None else stats_path(_resolve(model_path)[0])
    if target.suffix != ".safetensors":
        raise UsageError(f"--out must end in .safetensors, got {str(target)!r}")
    if not target.parent.is_dir():
        raise UsageError(f"--out: folder {target.parent} does not exist")
    try:
        images = load_data(data, getattr(model.config, "image_size", None))
    except (ValueError, RuntimeError) as e:
        raise UsageError(f"--data: {e}") from None
    if tuple(images.images.shape[1:]) != tuple(_sample_shape(model)):
        raise UsageError(
            f"--data: samples shaped {list(images.images.shape[1:])}, the model makes {list(_sample_shape(model))}"
        )
    if n > len(images):
        raise UsageError(f"--n {n} is more than the {len(images)} samples of --data {data}")
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
    x0 = images.images[idx]
    k = int(getattr(model.config, "num_classes", 0) or 0)
    weight = _guidance(config, guidance)
    kw: dict = {}
    if k:
        if images.labels is None:
            raise UsageError(f"--data {data} has no labels, and this model is class-conditional")
        y = images.labels[idx]
        kw["model_kwargs"] = {"y": y}
        if weight != 1.0:
            kw.update(guidance_scale=weight, uncond_kwargs={"y": torch.full_like(y, k)})
    s = config.get("sampling", {})
    result = compute_stats(
        model,
        schedule,
        x0,
        levels=levels,
        prediction=config["prediction"],
        batch=batch,
        seed=seed,
        progress=progress,
        clip_sample=bool(s.get("clip_sample", False)),
        use_clipped_model_output=bool(s.get("use_clipped_model_output", False)),
        **kw,
    )
    result.meta["data"] = str(data)
    if l_only:
        from ddim.model_stats import ModelStats

        zero = torch.zeros_like(result.s)
        result = ModelStats(result.lam, result.l, zero, zero.clone(), {**result.meta, "l_only": "true"})
    save_stats(result, target)
    click.echo(f"wrote {target} ({levels} levels, {n} samples, guidance {weight})")


def _sample_shape(model) -> tuple[int, ...]:
    from ddim.generate import sample_shape

    return sample_shape(model)
