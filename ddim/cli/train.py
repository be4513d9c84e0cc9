"""`ddim train`."""

from __future__ import annotations

import click

from ddim.cli.common import UsageError, _finite_cb, _threads_cb, main


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
@click.option("--lr", default=1e-3, show_default=True, type=click.FloatRange(min=0, min_open=True), callback=_finite_cb)
@click.option("--warmup", default=200, show_default=True, type=click.IntRange(min=0))
@click.option(
    "--lr-decay-start",
    default=None,
    type=click.IntRange(min=0),
    help="Keep --lr constant up to this step, then cosine-anneal it to 0 at --steps [never].",
)
@click.option("--ema", "ema_decay", default=0.999, show_default=True, type=click.FloatRange(0, 1, max_open=True))
@click.option(
    "--grad-clip", default=1.0, show_default=True, type=click.FloatRange(min=0), callback=_finite_cb, help="0 = off."
)
@click.option(
    "--objective",
    default="ddpm",
    show_default=True,
    type=click.Choice(["ddpm", "flow"]),
    help="'ddpm': the DDPM simple loss on --prediction/--schedule; 'flow': flow matching (rectified flow): "
    "the network predicts the velocity noise - image of the straight path on the flow time grid "
    "(prediction 'flow', schedule 'flow'; --prediction and --schedule must be left out).",
)
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
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**32 - 1))
@click.option(
    "--threads",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    callback=lambda c, p, v: v and _threads_cb(c, p, v),
    help="CPU threads (0 = torch).",
)
@click.option(
    "--init",
    default=None,
    help="Fine-tune: start from this model's weights (a run or model folder); its architecture is kept, "
    "the step count, optimizer and LR schedule start afresh.",
)
@click.option("--fresh", is_flag=True, help="Start over even if the run folder holds a resumable state.")
def train_cmd(fresh: bool, base_channels, channel_mults, objective: str, **kw) -> None:
    """Train a U-Net with the DDPM objective or flow matching (--objective flow); resumes exactly from
    the run folder's last checkpoint.

    Under torchrun (DistributedDataParallel) each process draws --batch images: the effective batch
    is --batch times the number of processes."""
    from ddim import distributed as ddist
    from ddim.train import TrainConfig, train

    if objective == "flow":
        ctx_click = click.get_current_context()
        for name in ("prediction", "schedule"):
            if ctx_click.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT):
                raise UsageError(f"--objective flow sets --{name} (to 'flow'): leave --{name} out")
        kw.update(prediction="flow", schedule="flow")
    unet = {}
    if base_channels:
        unet["base_channels"] = base_channels
    if channel_mults:
        try:
            unet["channel_mults"] = [int(m) for m in channel_mults.split(",")]
        except ValueError:
            raise UsageError(f"--channel-mults must be comma-separated ints, got {channel_mults!r}") from None
    cfg = TrainConfig(unet=unet, **kw)
    if cfg.lr_decay_start is not None and cfg.lr_decay_start >= cfg.steps:
        raise UsageError(f"--lr-decay-start must be below --steps ({cfg.steps}), got {cfg.lr_decay_start}")
    try:
        cfg.validate()
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise UsageError(_flag_message(str(e))) from None
    try:
        ctx = ddist.init()
        if ctx.distributed and ctx.is_main:
            click.echo(
                f"DistributedDataParallel on {ctx.world_size} processes ({ctx.backend}): batch {cfg.batch_size} "
                f"per process, effective batch {cfg.batch_size * ctx.world_size}"
            )
        out = train(cfg, resume=not fresh, progress=True)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(_flag_message(str(e))) from None
    except ddist.RankError as e:
        raise click.ClickException(str(e)) from None
    if ctx.is_main:
        click.echo(f"trained {cfg.steps} steps -> {out}")


_FLAGS = {
    "lr": "--lr",
    "grad_clip": "--grad-clip",
    "seed": "--seed",
    "threads": "--threads",
    "out": "--out",
    "channel_mults entries": "--channel-mults entries",
    "channel_mults": "--channel-mults",
    "base_channels": "--base-channels",
    "unet: ": "--base-channels/--channel-mults: ",
}


def _flag_message(text: str) -> str:
    """A library message with its field names (``lr``, ``out``...) written as the flags that set them."""
    for field_name, flag in _FLAGS.items():
        if text.startswith(field_name + " ") or text.startswith(field_name + ":") or text.startswith(field_name):
            return flag + text[len(field_name) :]
    return text


# ------------------------------------------------------------------ shared options
