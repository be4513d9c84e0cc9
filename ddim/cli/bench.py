"""`ddim bench`: our sampling loop against diffusers' scheduler loop (see :mod:`ddim.bench`)."""

from __future__ import annotations

import time

import click

from ddim.cli.common import UsageError, _check_device, _finite_cb, main
from ddim.cli.options import device_option, model_option, threads_option


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag} must be a comma list of ints, got {text!r}") from None
    if not values or min(values) < 1:
        raise UsageError(f"{flag} must list positive ints, got {text!r}")
    return values


@main.command("bench")
@click.option(
    "--models",
    default="trivial,shipped",
    show_default=True,
    help="Comma list: 'trivial' (a one-op network: the samplers alone), 'shipped' (the default model), "
    "'tiny-sd' (text to image with a tiny random Stable Diffusion pipeline, against StableDiffusionPipeline).",
)
@model_option("Use this model for the 'shipped' rows [embedded default].")
@click.option("--batch", "batches", default="1,64", show_default=True, help="Comma list of batch sizes.")
@click.option(
    "--algorithms",
    default="DDIM-50,DPM-Solver++-10",
    show_default=True,
    help="Comma list of rows: DDIM-50 (our 'ddim'), DPM-Solver++-10 (our 'dpmpp_2m').",
)
@click.option(
    "--repeats", default=15, show_default=True, type=click.IntRange(min=1), help="Timed runs per loop (trivial)."
)
@click.option(
    "--model-repeats",
    default=5,
    show_default=True,
    type=click.IntRange(min=1),
    help="Most timed runs per loop with the shipped model, within --model-budget seconds per row.",
)
@click.option(
    "--model-budget",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds a shipped-model row may take (at least one run of each loop is always made).",
)
@click.option(
    "--guidance",
    default=1.0,
    show_default=True,
    type=float,
    callback=_finite_cb,
    help="Guidance weight (shipped model).",
)
@device_option(None)
@threads_option()
def bench_cmd(
    models, model_path, batches, algorithms, repeats, model_repeats, model_budget, guidance, device, threads
) -> None:
    """Time our sampling loop against diffusers' scheduler loop on the same network and inputs.

    Prints a Markdown table: per-step overhead (time outside the network), total time and images/s
    of both loops, their ratios, and the floor (two fused tensor ops). A benchmark: numbers depend on
    the machine and its load.
    """
    from ddim.bench import ALGORITHMS, environment, format_table, run_bench
    from ddim.perf import set_threads

    model_list = [m.strip() for m in models.split(",") if m.strip()]
    bad = [m for m in model_list if m not in ("trivial", "shipped", "tiny-sd")]
    if bad or not model_list:
        raise UsageError(f"--models must list 'trivial', 'shipped' and/or 'tiny-sd', got {models!r}")
    algo_list = [a.strip() for a in algorithms.split(",") if a.strip()]
    bad = [a for a in algo_list if a not in ALGORITHMS]
    if bad or not algo_list:
        raise UsageError(f"--algorithms: unknown {bad or algorithms!r}; valid: {', '.join(ALGORITHMS)}")
    try:
        import diffusers  # noqa: F401
    except ImportError:
        raise click.ClickException("ddim bench compares with diffusers: pip install 'ddim[diffusers]'") from None
    set_threads(threads)
    tic = time.perf_counter()
    rows, notes = run_bench(
        models=model_list,
        model_path=model_path,
        batches=_int_list(batches, "--batch"),
        algorithms=algo_list,
        repeats=repeats,
        model_repeats=model_repeats,
        model_budget=model_budget,
        guidance=guidance,
        device=_check_device(device),
        log=lambda line: click.echo(line, err=True),
    )
    click.echo(format_table(rows))
    click.echo("")
    click.echo(f"{environment()}; {time.perf_counter() - tic:.0f} s in all.")
    for note in notes:
        click.echo(f"- {note}")
