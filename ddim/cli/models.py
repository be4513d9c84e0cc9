"""`ddim models`: the models shipped inside the package."""

from __future__ import annotations

import click

from ddim.cli.common import main


@main.command("models")
def models_cmd() -> None:
    """List the models shipped in the package, one line each: name, what it is, its default sampler and
    steps, size. Use the name as --model NAME (or ddim.load("NAME"))."""
    from ddim.checkpoint import model_summaries

    for m in model_summaries():
        steps = f"{m['steps']} step{'s' if m['steps'] != 1 else ''}" if m["steps"] else "any steps"
        click.echo(
            f"{m['name']:<8} {m['description']} [--sampler {m['sampler']}, {steps}, guidance {m['guidance']:g}; "
            f"{m['parameters'] / 1e6:.2f}M parameters, {m['megabytes']:.1f} MB]"
        )
