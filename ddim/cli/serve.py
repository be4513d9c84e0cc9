"""`ddim serve`: interactive drafts in the browser (a thin layer over :func:`ddim.serve.create_app`)."""

from __future__ import annotations

import ipaddress
import socket

import click

from ddim.cli.common import UsageError, _check_device, main
from ddim.cli.options import device_option, model_option, threads_option


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_listen(host: str, port: int) -> None:
    """Raise UsageError unless a socket can be bound at host:port now."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise UsageError(f"--host {host}: {e}") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        try:
            s.bind(addr)
        except OSError as e:
            raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


@main.command("serve")
@model_option()
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Interface to listen on (another than loopback makes the page reachable from the network).",
)
@click.option("--port", default=7860, show_default=True, type=click.IntRange(0, 65535), help="Port (0: a free one).")
@device_option("Where the model runs: cpu, cuda, mps.")
@threads_option()
@click.option(
    "--queue",
    "queue_size",
    default=16,
    show_default=True,
    type=click.IntRange(min=1),
    help="Requests that may wait for the model; more get 503.",
)
@click.option(
    "--cache",
    "cache_size",
    default=256,
    show_default=True,
    type=click.IntRange(min=0),
    help="Results kept in memory (LRU).",
)
@click.option(
    "--max-steps",
    default=200,
    show_default=True,
    type=click.IntRange(min=1),
    help="Most sampling steps one request may ask for.",
)
def serve_cmd(model_path, host, port, device, threads, queue_size, cache_size, max_steps) -> None:
    """Serve a page with live drafts, side-by-side settings, interpolation and image edits, and its HTTP API."""
    if model_path is not None and not model_path.strip():
        raise UsageError("--model is empty: give a model folder or .safetensors file, or leave it out (embedded model)")
    try:
        from ddim.serve import LOOPBACK_HOSTS, create_app, serve
    except ImportError as e:
        raise click.ClickException(f"ddim serve needs the 'serve' extra: pip install 'ddim[serve]' ({e})") from None
    from ddim.perf import set_threads

    _check_listen(host, port)  # before the model loads: a taken port or a foreign address fails at once
    set_threads(threads)
    loopback = _is_loopback(host)
    try:
        app = create_app(
            model_path,
            device=_check_device(device),
            queue_size=queue_size,
            cache_size=cache_size,
            max_steps=max_steps,
            trusted_hosts=LOOPBACK_HOSTS if loopback else None,
        )
    except (FileNotFoundError, ValueError, ImportError) as e:
        raise UsageError(f"--model: {e}") from None
    if not loopback:
        click.echo(f"ddim serve: warning: listening on {host}: the page is reachable from the network", err=True)
    try:
        serve(app, host, port, ready=lambda url: click.echo(f"ddim serve: {url} (Ctrl-C stops)", err=True))
    except OSError as e:  # the port is taken, the host is not ours
        raise click.ClickException(f"cannot listen on {host}:{port}: {e}") from None
    click.echo("ddim serve: stopped", err=True)
