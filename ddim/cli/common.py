"""The ``main`` click group and helpers shared by the command modules."""

from __future__ import annotations

import click

from ddim import __version__


class UsageError(click.UsageError):
    """A bad flag value: one line on stderr, exit status 2."""


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="ddim")
def main() -> None:
    """Sample DDPM-trained diffusion models fast: DDIM and its successors."""


def _load_model(path: str | None):
    from ddim.checkpoint import load

    try:
        return load(path)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"--model: {e}") from None


def _sampling_options(f):
    from ddim.sampling import SAMPLERS
    from ddim.timesteps import SPACINGS

    opts = [
        click.option("--model", "model_path", default=None, help="Model folder or .safetensors [embedded default]."),
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
            help="η: 0 deterministic DDIM, 1 DDPM-like.",
        ),
        click.option(
            "--spacing",
            default="leading",
            show_default=True,
            type=click.Choice(sorted(SPACINGS)),
            help="Which S timesteps.",
        ),
        click.option(
            "--timesteps",
            "timesteps_list",
            default=None,
            help="Explicit descending comma list of timesteps (overrides --steps/--spacing).",
        ),
        click.option("--sampler", default="ddim", show_default=True, type=click.Choice(sorted(SAMPLERS))),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _parse_timesteps(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--timesteps must be a comma list of ints, got {text!r}") from None


def _guidance(config: dict, guidance: float | None) -> float:
    return float(config.get("sampling", {}).get("guidance", 1.0)) if guidance is None else guidance
