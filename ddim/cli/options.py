"""The command line's shared option groups: each a click decorator (or a function making one) used by
several commands, so that a flag reads and checks the same everywhere."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

from ddim.cli.common import _finite_cb, _threads_cb

__all__ = [
    "batch_option",
    "class_option",
    "collect",
    "count_option",
    "device_option",
    "eta_option",
    "guidance_option",
    "model_option",
    "option_group",
    "progress_option",
    "runtime_options",
    "sampling_options",
    "seed_option",
    "spacing_option",
    "threads_option",
]


def option_group(*decorators: Callable) -> Callable:
    """Click options as one decorator, in the order listed (the first shows first in ``--help``)."""

    def apply(f: Callable) -> Callable:
        for o in reversed(decorators):
            f = o(f)
        return f

    return apply


def collect(arg: str, *decorators: Callable) -> Callable:
    """:func:`option_group`, the options' values passed to the command as ONE argument ``arg``: a dict
    from parameter name to value (commands that share a group then share its handling, not a long
    parameter list)."""
    probe = option_group(*decorators)(lambda: None)
    names = [p.name for p in probe.__click_params__]

    def apply(f: Callable) -> Callable:
        @functools.wraps(f)
        def command(**kwargs: Any) -> Any:
            kwargs[arg] = {name: kwargs.pop(name) for name in names}
            return f(**kwargs)

        return option_group(*decorators)(command)

    return apply


def model_option(help: str = "Model folder or .safetensors [embedded default].") -> Callable:
    """--model PATH (parameter ``model_path``; None: the embedded default)."""
    return click.option("--model", "model_path", default=None, help=help)


def device_option(help: str = "Where to run: cpu, cuda, cuda:1, mps.") -> Callable:
    """--device [cpu]."""
    return click.option("--device", default="cpu", show_default=True, help=help)


def threads_option() -> Callable:
    """--threads N (checked against the CPU count; None: $OMP_NUM_THREADS, else all)."""
    return click.option(
        "--threads",
        default=None,
        type=click.IntRange(min=1),
        callback=_threads_cb,
        help="CPU threads [$OMP_NUM_THREADS, else all].",
    )


def eta_option(help: str) -> Callable:
    """--eta η [0], a finite float >= 0."""
    return click.option(
        "--eta", default=0.0, show_default=True, type=click.FloatRange(min=0), callback=_finite_cb, help=help
    )


def progress_option() -> Callable:
    """--progress/--no-progress [on]."""
    return click.option("--progress/--no-progress", default=True, show_default=True)


def count_option(default: int, help: str, least: int = 1) -> Callable:
    """--n/-n, an int >= ``least``."""
    return click.option("--n", "-n", default=default, show_default=True, type=click.IntRange(min=least), help=help)


def batch_option(default: int, help: str = "Images per batch.") -> Callable:
    """--batch, an int >= 1."""
    return click.option("--batch", default=default, show_default=True, type=click.IntRange(min=1), help=help)


def seed_option(help: str = "Image i uses seed K+i.", full_range: bool = False) -> Callable:
    """--seed K [0] (``full_range``: checked to lie in [0, 2**32) at parse time)."""
    kind = click.IntRange(0, 2**32 - 1) if full_range else int
    return click.option("--seed", default=0, show_default=True, type=kind, help=help)


def class_option(default: str | None = None, help: str = "Class spec as in `ddim sample` [unconditional].") -> Callable:
    """--class SPEC (parameter ``class_spec``)."""
    return click.option("--class", "class_spec", default=default, show_default=default is not None, help=help)


def guidance_option(help: str = "Classifier-free guidance weight [model's default].") -> Callable:
    """--guidance W, finite (None: the model's default)."""
    return click.option("--guidance", default=None, type=float, callback=_finite_cb, help=help)


def runtime_options(f):
    """--device, --dtype, --compile, --channels-last, --threads (see :mod:`ddim.perf`)."""
    return option_group(
        device_option(),
        click.option(
            "--dtype",
            "precision",
            default="fp32",
            show_default=True,
            type=click.Choice(["fp32", "fp16", "bf16"]),
            help="Network precision (the sampler's state stays fp32); fp16 needs an accelerator.",
        ),
        click.option(
            "--compile/--no-compile",
            "compile_model",
            default=False,
            show_default=True,
            help="torch.compile the network (CUDA graphs on CUDA); compiling takes minutes on a small CPU.",
        ),
        click.option(
            "--channels-last/--no-channels-last", default=None, help="Channels-last memory format [on for conv nets]."
        ),
        threads_option(),
    )(f)


def sampling_options(f):
    """--model, --steps, --eta, --spacing, --timesteps, --sampler."""
    from ddim.sampling import SAMPLERS
    from ddim.timesteps import SPACINGS

    return option_group(
        model_option(),
        click.option(
            "--steps",
            default=50,
            show_default=True,
            type=click.IntRange(min=1),
            help="Sampling steps S (timesteps listed).",
        ),
        eta_option("η: 0 deterministic DDIM, 1 DDPM-like."),
        spacing_option(
            sorted([*SPACINGS, "optimized"]),
            help="Which S timesteps ('optimized': the model's optimised list for S, if it ships one).",
        ),
        click.option(
            "--timesteps",
            "timesteps_list",
            default=None,
            help="Explicit descending comma list of timesteps (overrides --steps/--spacing).",
        ),
        click.option("--sampler", default="ddim", show_default=True, type=click.Choice(sorted(SAMPLERS))),
    )(f)


def spacing_option(choices: list[str] | None = None, help: str | None = None) -> Callable:
    """--spacing [leading], one of ``choices`` when given."""
    kind = None if choices is None else click.Choice(choices)
    return click.option("--spacing", default="leading", show_default=True, type=kind, help=help)
