"""`ddim distill progressive` and `ddim distill consistency`: few-step students by training."""

from __future__ import annotations

import click

from ddim.cli.common import UsageError, _check_device, _finite_cb, _threads_cb, main

_DATA_HELP = "Training images, as `ddim train --data`: 'mnist', 'mnist-all', 'digits', a .npz, or a folder."


@main.group("distill")
def distill_group() -> None:
    """Distil a model into a few-step student (progressive distillation, consistency distillation)."""


def _common(f):
    """Options both methods share (data, optimiser, run folder, seed, threads)."""
    opts = [
        click.option(
            "--teacher",
            default="default",
            show_default=True,
            help="The teacher: a ddim model folder or .safetensors file, or a shipped model name (`ddim models`).",
        ),
        click.option("--out", required=True, help="Run folder (rounds/checkpoints, log; the final student)."),
        click.option("--data", default="mnist", show_default=True, help=_DATA_HELP),
        click.option("--image-size", default=None, type=click.IntRange(min=4), help="Size for image folders [64]."),
        click.option("--batch", "batch_size", default=32, show_default=True, type=click.IntRange(min=1)),
        click.option("--grad-clip", default=1.0, show_default=True, type=click.FloatRange(min=0), callback=_finite_cb),
        click.option("--warmup", default=20, show_default=True, type=click.IntRange(min=0)),
        click.option("--checkpoint-every", default=100, show_default=True, type=click.IntRange(min=0)),
        click.option("--log-every", default=10, show_default=True, type=click.IntRange(min=0)),
        click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**32 - 1)),
        click.option(
            "--threads",
            default=0,
            show_default=True,
            type=click.IntRange(min=0),
            callback=lambda c, p, v: v and _threads_cb(c, p, v),
            help="CPU threads (0 = torch).",
        ),
        click.option(
            "--device",
            default="cpu",
            show_default=True,
            callback=lambda c, p, v: _check_device(v),
            help="Where the networks train (cpu, cuda, cuda:N, mps); a run may resume on another one.",
        ),
        click.option("--fresh", is_flag=True, help="Start over even if the run folder holds a resumable state."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


@distill_group.command("progressive")
@_common
@click.option(
    "--init",
    default=None,
    help="Start round 1's student from this model's network (a ddim model folder of the teacher's architecture, "
    "its output the --student-prediction) [a copy of the teacher].",
)
@click.option("--from-steps", default=64, show_default=True, type=click.IntRange(min=2), help="The teacher's steps.")
@click.option("--to-steps", default=4, show_default=True, type=click.IntRange(min=1), help="The final student's steps.")
@click.option(
    "--teacher-steps-per-step",
    default=2,
    show_default=True,
    type=click.IntRange(min=2),
    help="Teacher DDIM steps one student step learns: 2 halves the steps each round (the paper); 4 quarters "
    "them (fewer rounds, so less compounded error; each target costs 4 teacher calls).",
)
@click.option("--steps", default=500, show_default=True, type=click.IntRange(min=1), help="Optimizer steps per round.")
@click.option(
    "--first-round-steps",
    default=None,
    type=click.IntRange(min=1),
    help="Optimizer steps of round 1 (which also turns the ε output into v) [--steps].",
)
@click.option("--lr", default=2e-4, show_default=True, type=click.FloatRange(min=0, min_open=True), callback=_finite_cb)
@click.option("--ema", "ema_decay", default=0.995, show_default=True, type=click.FloatRange(0, 1, max_open=True))
@click.option(
    "--guidance",
    default=None,
    type=float,
    callback=_finite_cb,
    help="The teacher's guidance weight in round 1 [the teacher's default].",
)
@click.option(
    "--student-prediction",
    default="v_prediction",
    show_default=True,
    type=click.Choice(["v_prediction", "sample", "epsilon"]),
)
@click.option(
    "--weighting",
    default="truncated_snr",
    show_default=True,
    type=click.Choice(["truncated_snr", "snr_plus_one", "landing"]),
    help="The loss weight per step: max(SNR, 1), SNR + 1, or 'landing' (the squared distance of where the "
    "student's and the teacher's steps land; pairs with --student-prediction epsilon).",
)
def progressive_cmd(fresh: bool, **kw) -> None:
    """Progressive distillation (Salimans & Ho 2022): rounds that halve the teacher's DDIM steps, each
    student trained to do two teacher steps in one (or K with --teacher-steps-per-step K; "trailing" grids,
    v output, guided teachers distilled at their default guidance into a class-conditional student).
    Resumes exactly from --out."""
    from ddim.distill_train import ProgressiveConfig, distill_progressive

    cfg = ProgressiveConfig(**kw)
    try:
        cfg.validate()
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(_flags(str(e))) from None
    try:
        out = distill_progressive(cfg, resume=not fresh, progress=True)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(_flags(str(e))) from None
    click.echo(f"distilled {cfg.from_steps} -> {cfg.to_steps} steps -> {out}")


_FLAGS = {
    "from_steps": "--from-steps",
    "to_steps": "--to-steps",
    "first_round_steps": "--first-round-steps",
    "teacher_steps_per_step": "--teacher-steps-per-step",
    "teacher ": "--teacher ",
    "lr": "--lr",
    "seed": "--seed",
    "threads": "--threads",
    "out": "--out",
    "init ": "--init ",
    "intervals": "--intervals",
}


def _flags(text: str) -> str:
    """A library message with its field names written as the flags that set them."""
    for name, flag in _FLAGS.items():
        text = text.replace(name + "=", flag + "=") if name.endswith("steps") else text
        if text.startswith(name):
            return flag + text[len(name) :]
    return text


@distill_group.command("consistency")
@_common
@click.option(
    "--init",
    default=None,
    help="Start from this model's network (a ddim model folder of the teacher's architecture) [the teacher].",
)
@click.option(
    "--intervals", default=16, show_default=True, type=click.IntRange(min=1), help="N: the grid's trailing steps."
)
@click.option("--steps", default=3000, show_default=True, type=click.IntRange(min=1), help="Optimizer steps.")
@click.option("--lr", default=1e-4, show_default=True, type=click.FloatRange(min=0, min_open=True), callback=_finite_cb)
@click.option(
    "--target-ema", "target_decay", default=0.95, show_default=True, type=click.FloatRange(0, 1, max_open=True)
)
@click.option("--ema", "ema_decay", default=0.995, show_default=True, type=click.FloatRange(0, 1, max_open=True))
@click.option(
    "--student-prediction",
    default="v_prediction",
    show_default=True,
    type=click.Choice(["v_prediction", "sample", "epsilon"]),
)
@click.option("--distance", default="pseudo_huber", show_default=True, type=click.Choice(["pseudo_huber", "l2"]))
@click.option(
    "--sigma-data",
    default=0.5,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    callback=_finite_cb,
    help="σ_d of the skip/out coefficients: c_skip = σ_d²/((σ-σ_min)²+σ_d²).",
)
@click.option("--guidance", default=None, type=float, callback=_finite_cb, help="The teacher's guidance [its default].")
def consistency_cmd(fresh: bool, **kw) -> None:
    """Consistency distillation (Song et al. 2023): f(x, σ_min) = x by the skip/out parameterisation, the
    teacher's DDIM step as the ODE solver, an EMA target network, pseudo-Huber distance. Sample the result
    with --sampler consistency (1, 2, 4 steps). Resumes exactly from --out."""
    from ddim.distill_train import ConsistencyConfig, distill_consistency

    cfg = ConsistencyConfig(**kw)
    try:
        cfg.validate()
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(_flags(str(e))) from None
    try:
        out = distill_consistency(cfg, resume=not fresh, progress=True)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(_flags(str(e))) from None
    click.echo(f"distilled a consistency model -> {out}")
