"""`ddim reflow`: pairs from a teacher's ODE, then a flow student trained on them (see :mod:`ddim.reflow`)."""

from __future__ import annotations

import click

from ddim.cli.common import UsageError, _finite_cb, _threads_cb, main


@main.command("reflow")
@click.option(
    "--teacher",
    default=None,
    help="The model whose ODE is straightened: a model folder, a shipped name, or left out for the embedded model.",
)
@click.option("--pairs", "n", default=10000, show_default=True, type=click.IntRange(min=1), help="Pairs N.")
@click.option(
    "--out",
    required=True,
    help="Folder: pairs.json and pairs/ (the cached pairs), then the student (model.safetensors, config.json, "
    "state, log.csv). A stopped run resumes where it stopped.",
)
@click.option("--sampler", default="dpmpp_2m", show_default=True, help="Deterministic ODE solver for the pairs.")
@click.option("--solver-steps", default=12, show_default=True, type=click.IntRange(min=1), help="Its steps.")
@click.option("--spacing", default="trailing", show_default=True, help="Its spacing (trailing starts at t = T-1).")
@click.option(
    "--guidance",
    default=None,
    type=float,
    callback=_finite_cb,
    help="Teacher's guidance scale for the pairs [the teacher's own].",
)
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**32 - 1), help="Pair i: seed + i.")
@click.option("--shard-size", default=256, show_default=True, type=click.IntRange(min=1), help="Pairs per shard.")
@click.option("--pair-batch", default=64, show_default=True, type=click.IntRange(min=1), help="Teacher's batch.")
@click.option("--batch", default=64, show_default=True, type=click.IntRange(min=1), help="Student's training batch.")
@click.option(
    "--steps", default=3000, show_default=True, type=click.IntRange(min=0), help="Student steps (0: pairs only)."
)
@click.option("--lr", default=3e-4, show_default=True, type=click.FloatRange(min=0, min_open=True), callback=_finite_cb)
@click.option("--warmup", default=100, show_default=True, type=click.IntRange(min=0))
@click.option("--ema", "ema_decay", default=0.999, show_default=True, type=click.FloatRange(0, 1, max_open=True))
@click.option("--lr-decay-start", default=None, type=click.IntRange(min=0), help="Cosine decay from here [never].")
@click.option("--init/--no-init", default=True, show_default=True, help="Start the student from the teacher's weights.")
@click.option("--checkpoint-every", default=250, show_default=True, type=click.IntRange(min=0))
@click.option(
    "--threads",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    callback=lambda c, p, v: v and _threads_cb(c, p, v),
    help="CPU threads (0 = torch).",
)
def reflow_cmd(
    teacher, n, out, sampler, solver_steps, spacing, guidance, seed, shard_size, pair_batch, batch, steps, **kw
) -> None:
    """Straighten a model (rectified flow): solve its ODE from --pairs noises, then train a flow student
    on the (noise, image) pairs.

    Under torchrun the missing shards of pairs are dealt to the processes, and the student trains with
    DistributedDataParallel."""
    import torch

    from ddim import distributed as ddist
    from ddim.outputs import check_folder
    from ddim.reflow import PairSettings, load_teacher, make_pairs, reflow
    from ddim.timesteps import SPACINGS

    if spacing not in SPACINGS:
        raise UsageError(f"--spacing must be one of {', '.join(SPACINGS)}, got {spacing!r}")
    if kw["lr_decay_start"] is not None and steps and kw["lr_decay_start"] >= steps:
        raise UsageError(f"--lr-decay-start must be below --steps ({steps}), got {kw['lr_decay_start']}")
    settings = PairSettings(
        n=n, sampler=sampler, steps=solver_steps, spacing=spacing, guidance=guidance, seed=seed,
        shard_size=shard_size, batch=min(pair_batch, shard_size),
    )  # fmt: skip
    try:
        settings.validate()
        check_folder(out, flag="out")
        load_teacher(teacher)  # a teacher that is not a model fails here, before any work
    except ValueError as e:
        raise UsageError(_flag(str(e))) from None
    if kw["threads"]:
        torch.set_num_threads(kw["threads"])
    try:
        make_pairs(teacher, out, settings)
        if steps:
            reflow(out, out, steps=steps, batch_size=batch, **kw)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(_flag(str(e))) from None
    except ddist.RankError as e:
        raise click.ClickException(str(e)) from None
    if ddist.context().is_main:
        click.echo(f"{n} pairs" + (f", student trained {steps} steps" if steps else "") + f" -> {out}")


def _flag(text: str) -> str:
    """A library message with its field names as the flags that set them."""
    for field_name, flag in (
        ("teacher", "--teacher"),
        ("n ", "--pairs "),
        ("steps", "--solver-steps"),
        ("out", "--out"),
    ):
        if text.startswith(field_name):
            return flag + text[len(field_name) :]
    return text
