"""The ``ddim`` command line: a thin layer over the library (every command calls public functions).

Commands live in one module each under ``ddim/cli/`` and register on the :func:`main` group:
``train`` (train.py), ``reflow`` (reflow.py), ``sample``/``invert``/``interpolate``/``compare`` (sample.py),
``edit`` (edit.py), ``distill`` (distill.py), ``models`` (models.py).
"""

from __future__ import annotations

import sys

import click

from ddim.cli.common import UsageError, main

__all__ = ["main", "run", "console", "UsageError"]


def run(argv: list[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    A usage error (bad flag or value) prints ONE line on stderr and returns 2.
    """
    try:
        rv = main.main(args=argv, prog_name="ddim", standalone_mode=False)
    except click.UsageError as e:
        hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None and e.ctx.parent is not None else ""
        click.echo(f"ddim: error: {e.format_message()}{hint}", err=True)
        return 2
    except click.ClickException as e:
        click.echo(f"ddim: error: {e.format_message()}", err=True)
        return e.exit_code
    except click.exceptions.Abort:
        click.echo("ddim: aborted", err=True)
        return 130
    except MemoryError as e:
        click.echo(
            f"ddim: error: out of memory ({_first_line(e) or 'MemoryError'}); ask for less (-n, --batch)", err=True
        )
        return 1
    except RuntimeError as e:  # torch's allocators raise RuntimeError
        text = str(e)
        if "can't allocate memory" not in text and "out of memory" not in text.lower():
            raise
        click.echo(f"ddim: error: out of memory ({_first_line(e)}); ask for less (-n, --batch)", err=True)
        return 1
    if rv in (None, 0):  # every rank got here: leave the process group before the interpreter shuts down
        from ddim import distributed as ddist

        ddist.finish()
    return rv if isinstance(rv, int) else 0


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0][:300] if lines else ""


def console() -> None:  # pragma: no cover - the installed `ddim` script
    sys.exit(run())


# Register the commands.
from ddim.cli import bench as _bench  # noqa: E402,F401
from ddim.cli import distill as _distill  # noqa: E402,F401
from ddim.cli import edit as _edit  # noqa: E402,F401
from ddim.cli import eval as _eval  # noqa: E402,F401
from ddim.cli import models as _models  # noqa: E402,F401
from ddim.cli import optimize as _optimize  # noqa: E402,F401
from ddim.cli import reflow as _reflow  # noqa: E402,F401
from ddim.cli import sample as _sample  # noqa: E402,F401
from ddim.cli import serve as _serve  # noqa: E402,F401
from ddim.cli import stats as _stats  # noqa: E402,F401
from ddim.cli import train as _train  # noqa: E402,F401
