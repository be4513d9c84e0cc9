"""The ``main`` click group and helpers shared by the command modules."""

from __future__ import annotations

from pathlib import Path

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


# ----------------------------------------------------------------- runtime (speed) options
#: Runtime options that change how fast images come, not which images (kept out of folder settings).
RUNTIME_ONLY = frozenset({"device", "compile_model", "channels_last", "threads"})


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


def _model_default(param: str, value, config: dict, key: str | None = None):
    """``value``, or the model's own ``config["sampling"][key]`` (key default ``param``) when the flag of
    ``param`` was left out: a distilled student samples with its own steps, sampler and spacing."""
    ctx = click.get_current_context()
    given = ctx.get_parameter_source(param) not in (None, click.core.ParameterSource.DEFAULT)
    sampling = config.get("sampling") or {}
    return value if given or (key or param) not in sampling else sampling[key or param]


def _guidance(config: dict, guidance: float | None) -> float:
    return float(config.get("sampling", {}).get("guidance", 1.0)) if guidance is None else guidance
