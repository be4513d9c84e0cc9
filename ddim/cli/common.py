"""The ``main`` click group and helpers shared by the command modules."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ddim import __version__


class UsageError(click.UsageError):
    """A bad flag value: one line on stderr, exit status 2."""


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="ddim")
def main() -> None:
    """Sample DDPM-trained diffusion models fast: DDIM and its successors."""


def _load_model(path: str | None, device: str = "cpu"):
    from ddim.checkpoint import load

    if path is not None and not str(path).strip():
        raise UsageError("--model is empty: give a model folder or .safetensors file, or leave it out (embedded model)")
    try:
        return load(path, device=_check_device(device))
    except (FileNotFoundError, ValueError, ImportError, TypeError) as e:
        raise UsageError(f"--model: {_first_line(e)}") from None
    except OSError as e:  # e.g. a diffusers folder without its weights
        raise UsageError(f"--model {path}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


# ----------------------------------------------------------------- shared option groups
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


# ----------------------------------------------------------------- runtime (speed) options
#: Runtime options that change how fast images come, not which images (kept out of folder settings).
RUNTIME_ONLY = frozenset({"device", "compile_model", "channels_last", "threads"})


def _runtime_options(f):
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


def _check_device(device: str, flag: str = "--device") -> str:
    """``device`` if torch can put a tensor there, else a UsageError naming ``flag`` (one line)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"{flag} {device}: unknown device; valid: cpu, cuda, cuda:N, mps, ...") from None
    if dev.type == "meta":
        raise UsageError(f"{flag} meta holds no data; use cpu, cuda or mps")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{flag} {device}: no CUDA device is available") from None
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"{flag} {device}: there are {torch.cuda.device_count()} CUDA devices (cuda:0 ...)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"{flag} {device}: MPS is not available") from None
    try:
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError, NotImplementedError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UsageError(f"{flag} {device}: cannot use it ({first})") from None
    return device


def _threads_cb(ctx, param, threads: int | None) -> int | None:
    """click callback: --threads at most the machine's CPU count (far more crashes OpenMP)."""
    from ddim.perf import check_threads

    try:
        return check_threads(threads)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _finite_cb(ctx, param, value: float | None) -> float | None:
    """click callback: a float flag must be finite (click's FloatRange lets inf and nan through)."""
    import math

    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"must be a finite number, got {value}")
    return value


def _check_out_file(out: str, suffixes: tuple[str, ...] | None, flag: str = "--out") -> Path:
    """:func:`ddim.outputs.check_file` as a usage error."""
    from ddim.outputs import check_file

    try:
        return check_file(out, flag=flag, suffixes=suffixes)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _check_out_folder(out: str, flag: str = "--out") -> Path:
    """:func:`ddim.outputs.check_folder` as a usage error."""
    from ddim.outputs import check_folder

    try:
        return check_folder(out, flag=flag)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _check_seeds(first: int, n: int = 1, flag: str = "--seed") -> int:
    """Seeds ``first .. first + n - 1`` must lie in [0, 2**32) (torch aliases the others)."""
    from ddim.noise import check_seed_range

    try:
        check_seed_range(first, n, flag)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    return first


def _prepare_model(model, device: str, precision: str, compile_model: bool, channels_last: bool | None, threads):
    """The loaded model made fast for ``device`` (threads, precision, channels-last, compile)."""
    from ddim.perf import prepare, set_threads

    set_threads(threads)
    try:
        return prepare(model, device=device, dtype=precision, channels_last=channels_last, compile=compile_model)
    except ValueError as e:
        raise UsageError(f"--dtype: {e}") from None


def _sampling_options(f):
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
        click.option(
            "--eta",
            default=0.0,
            show_default=True,
            type=click.FloatRange(min=0),
            callback=_finite_cb,
            help="η: 0 deterministic DDIM, 1 DDPM-like.",
        ),
        spacing_option(sorted(SPACINGS), help="Which S timesteps."),
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


def _parse_timesteps(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--timesteps must be a comma list of ints, got {text!r}") from None
    if not values:
        raise UsageError(f"--timesteps must list at least one timestep, got {text!r}")
    return values


def _guidance(config: dict, guidance: float | None) -> float:
    return float(config.get("sampling", {}).get("guidance", 1.0)) if guidance is None else guidance
