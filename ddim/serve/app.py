"""The ``ddim serve`` web app: :func:`create_app` (a Flask app) and :func:`serve` (waitress on a socket).

The page (``static/index.html``) uses only the HTTP API below (documented in docs/serve.md); images are
PNGs, settings are query parameters, uploads are multipart form fields. Response headers on every
image: ``X-Wall-Time`` (seconds in the server for this request), ``X-Compute-Time`` (seconds the work
took, the original work's for a cached result), ``X-Queue-Time``, ``X-Network-Calls`` (network
evaluations made for this response: 0 when cached), ``X-NFE`` (network evaluations the image needs),
``X-Cache`` (hit / miss).
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flask import Flask, Response, g, jsonify, request, send_from_directory
from werkzeug.exceptions import HTTPException

from ddim.images import _png_bytes
from ddim.sampling import SAMPLERS
from ddim.serve.drafts import Drafts, image_key
from ddim.serve.engine import Engine, JobInfo, QueueFull, ShuttingDown, Superseded
from ddim.serve.params import BadParam, Limits, read_params
from ddim.timesteps import SPACINGS

__all__ = ["create_app", "serve", "LOOPBACK_HOSTS", "STATIC"]

#: Host names a server bound to the loopback interface answers to (others get 400: DNS rebinding).
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")

#: The page and its assets (served as they are; nothing is fetched from elsewhere).
STATIC = Path(__file__).parent / "static"

#: Most pixels an uploaded image may have (before it is resized to the model's size).
MAX_UPLOAD_PIXELS = 4096 * 4096


class _Refused(Exception):
    """An HTTP error with a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _text(status: int, message: str) -> Response:
    line = " ".join(str(message).split())  # one line, whatever the message held
    return Response(f"error: {line}\n", status=status, mimetype="text/plain")


def _read_upload(field: str, channels: int, size: int, *, required: bool = True) -> np.ndarray | None:
    """The multipart file ``field`` as uint8 [1, size, size, channels] (converted and resized)."""
    from PIL import Image, UnidentifiedImageError

    f = request.files.get(field)
    if f is None:
        if required:
            raise _Refused(400, f"{field}: upload an image file in the multipart form field {field!r}")
        return None
    data = f.read()
    if not data:
        raise _Refused(400, f"{field}: the uploaded file is empty")
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > MAX_UPLOAD_PIXELS:
                raise _Refused(413, f"{field}: {w}x{h} pixels is too large (at most {MAX_UPLOAD_PIXELS} pixels)")
            im = im.convert("L" if channels == 1 else "RGB")
            if im.size != (size, size):  # area-average down (a k-times enlarged image comes back exactly)
                down = im.width >= size and im.height >= size
                im = im.resize((size, size), Image.Resampling.BOX if down else Image.Resampling.BICUBIC)
            a = np.asarray(im)
    except _Refused:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise _Refused(400, f"{field}: not a readable image (PNG, JPEG, ...): {type(e).__name__}") from None
    return (a[..., None] if a.ndim == 2 else a)[None]


def create_app(
    model: str | os.PathLike | tuple[Any, Any, dict] | None = None,
    *,
    device: str = "cpu",
    queue_size: int = 16,
    cache_size: int = 256,
    max_steps: int = 200,
    max_frames: int = 33,
    max_upload_bytes: int = 2 * 2**20,
    trusted_hosts: Sequence[str] | None = LOOPBACK_HOSTS,
    warm: bool = True,
) -> Flask:
    """The ``ddim serve`` app, with its model loaded once and kept warm.

    Args:
        model: a model folder or ``.safetensors`` (:func:`ddim.load`), None for the embedded MNIST model,
            or an already loaded ``(model, schedule, config)``. Requests can never choose another.
        device: where the model runs.
        queue_size: most requests waiting for the model; more get 503 (default 16).
        cache_size: results kept in the LRU cache (default 256).
        max_steps: most sampling steps a request may ask for (default 200; at most the schedule's T).
        max_frames: most frames of an interpolation strip (default 33).
        max_upload_bytes: largest request body (uploads), default 2 MiB; larger gets 413.
        trusted_hosts: the Host header values accepted (default the loopback names, for a server bound
            to 127.0.0.1); None accepts any (a server bound to another interface).
        warm: run one 10-step draft before returning, so the first request does not pay for start-up.

    Returns:
        A Flask app; ``app.extensions["ddim"]`` holds ``drafts`` (:class:`~ddim.serve.drafts.Drafts`),
        ``engine`` (:class:`~ddim.serve.engine.Engine`) and ``limits``. Call
        ``app.extensions["ddim"]["engine"].close()`` when done (:func:`serve` does).
    """
    from ddim.checkpoint import load
    from ddim.perf import prepare

    for name, value, least in (
        ("max_steps", max_steps, 1),
        ("max_frames", max_frames, 2),
        ("max_upload_bytes", max_upload_bytes, 1),
        ("queue_size", queue_size, 1),
        ("cache_size", cache_size, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    if isinstance(model, tuple):
        net, schedule, config = model
    else:
        net, schedule, config = load(None if model is None else str(model), device=device)
        net = prepare(net, device=device)
    engine = Engine(queue_size=queue_size, cache_size=cache_size)
    drafts = Drafts(net, schedule, config, device, stop=engine.stopping)
    sampling = config.get("sampling") or {}
    limits = Limits(
        max_steps=min(max_steps, schedule.T),
        max_frames=max_frames,
        num_classes=drafts.num_classes,
        samplers=tuple(sorted(SAMPLERS)),
        # "optimized": the model's own lists (sample and interpolate; the edits use its fallback spacing)
        spacings=tuple(sorted([*SPACINGS, *(["optimized"] if sampling.get("optimized_timesteps") else [])])),
        deterministic=tuple(sorted(k for k, s in SAMPLERS.items() if not s.noisy(0.0))),
        default_guidance=float(sampling.get("guidance", 1.0)),
        default_spacing=str(sampling.get("spacing", "leading")),
        optimized_steps=tuple(sorted(int(k) for k in (sampling.get("optimized_timesteps") or {}))),
        optimized_fallback=sampling.get("spacing") == "optimized",
    )

    # what the page shows: never a server path, only the model folder's own name
    model_name = "embedded" if model is None else "loaded" if isinstance(model, tuple) else Path(str(model)).name
    app = Flask(__name__, static_folder=str(STATIC), static_url_path="/static")
    app.config["MAX_CONTENT_LENGTH"] = max_upload_bytes
    app.config["TRUSTED_HOSTS"] = list(trusted_hosts) if trusted_hosts is not None else None
    app.extensions["ddim"] = {"drafts": drafts, "engine": engine, "limits": limits}
    C, S = drafts.shape[0], drafts.shape[1]

    # ------------------------------------------------------------------ plumbing
    @app.before_request
    def _start_clock() -> None:
        g.arrived = time.perf_counter()

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException) -> Response:
        if e.code == 413:
            return _text(413, f"the request is larger than {max_upload_bytes} bytes")
        return _text(e.code or 500, f"{e.name}: {e.description}")

    @app.errorhandler(_Refused)
    def _refused(e: _Refused) -> Response:
        return _text(e.status, str(e))

    @app.errorhandler(BadParam)
    def _bad_param(e: BadParam) -> Response:
        return _text(400, str(e))

    @app.errorhandler(QueueFull)
    def _full(e: QueueFull) -> Response:
        r = _text(503, str(e))
        r.headers["Retry-After"] = "1"
        return r

    @app.errorhandler(ShuttingDown)
    def _closing(e: ShuttingDown) -> Response:
        return _text(503, str(e))

    @app.errorhandler(Superseded)
    def _superseded(e: Superseded) -> Response:
        return _text(409, str(e))

    @app.errorhandler(Exception)
    def _internal(e: Exception) -> Response:
        if isinstance(e, (ValueError, TypeError)):  # the library refused the settings
            return _text(400, str(e))
        app.logger.exception("request failed")
        return _text(500, f"{type(e).__name__}: {e}")

    def client(kind: str) -> tuple[str, str] | None:
        """Who asks: the page's ``X-Client`` header (one id per page and panel); newer supersedes older."""
        c = request.headers.get("X-Client", "")
        return (kind, c[:80]) if c else None

    def png(u8: np.ndarray, info: Any, **extra: Any) -> Response:
        r = Response(_png_bytes(u8), mimetype="image/png")
        h = r.headers
        h["X-Wall-Time"] = f"{time.perf_counter() - g.arrived:.4f}"
        h["X-Compute-Time"] = f"{info.compute_seconds:.4f}"
        h["X-Queue-Time"] = f"{info.queue_seconds:.4f}"
        h["X-NFE"] = str(info.meta.get("nfe", 0))
        h["X-Network-Calls"] = "0" if info.cached else str(info.meta.get("calls", info.meta.get("nfe", 0)))
        h["X-Cache"] = "hit" if info.cached else "miss"
        for k, v in extra.items():
            h[f"X-{k.replace('_', '-').title()}"] = str(v)
        h["Cache-Control"] = "no-store"
        return r

    def run(key: tuple, fn: Callable[[], tuple[Any, dict]], kind: str, priority: int = 1) -> tuple[Any, Any]:
        """Drafts first (priority 0), then edits (1), then interpolation frames (2)."""
        return engine.run(key, fn, client=client(kind), priority=priority)

    def params(kind: str) -> dict[str, Any]:
        return read_params(kind, request.args.to_dict(flat=False), limits)

    def inverted(u8: np.ndarray, key: str, steps: int, spacing: str, label: int) -> tuple[Any, int]:
        """DDIM latents of an upload and the network calls made for them (0 when cached: an edit after an
        edit reuses them). Runs on the worker."""
        ikey = ("invert", key, steps, spacing, label)
        calls = 0 if engine.cached(ikey) is not None else steps
        return engine.memo(ikey, lambda: drafts.invert(u8, steps, spacing, label)), calls

    # ------------------------------------------------------------------ routes
    @app.get("/")
    def index() -> Response:
        return send_from_directory(STATIC, "index.html")

    @app.get("/api/info")
    def info() -> Response:
        return jsonify(
            {
                "model": model_name,
                "image_size": S,
                "channels": C,
                "num_classes": limits.num_classes,
                "class_names": (config.get("data") or {}).get("class_names"),
                "samplers": list(limits.samplers),
                "deterministic_samplers": list(limits.deterministic),
                "spacings": list(limits.spacings),
                "max_steps": limits.max_steps,
                "max_frames": limits.max_frames,
                "default_guidance": limits.default_guidance,
                "default_spacing": limits.default_spacing,
                "max_upload_bytes": max_upload_bytes,
                "queue_size": engine.queue_size,
                "engine": dict(engine.stats, queued=engine.queued),
            }
        )

    @app.get("/api/sample")
    def api_sample() -> Response:
        p = params("sample")
        key = ("sample", *sorted(p.items()))
        u8, inf = run(key, lambda: drafts.sample(p), "sample", priority=0)
        return png(u8[0], inf)

    @app.get("/api/interpolate")
    def api_interpolate() -> Response:
        p = params("interpolate")
        frame = p.pop("frame")

        def one(k: int) -> tuple[np.ndarray, Any]:  # each frame computed once, then cached
            return run(("frame", k, *sorted(p.items())), lambda: drafts.frame(p, k), "interpolate", priority=2)

        if frame is not None:
            img, inf = one(frame)
            return png(img[0], inf, frames=p["frames"], frame=frame)
        parts = [one(k) for k in range(p["frames"])]  # the whole strip, frames side by side
        inf = JobInfo(
            all(i.cached for _, i in parts),
            sum(i.queue_seconds for _, i in parts),
            sum(i.compute_seconds for _, i in parts),
            {"nfe": parts[0][1].meta["nfe"], "calls": sum(0 if i.cached else i.meta["nfe"] for _, i in parts)},
        )
        return png(np.concatenate([img[0] for img, _ in parts], axis=1), inf, frames=p["frames"])

    @app.post("/api/reconstruct")
    def api_reconstruct() -> Response:
        p = params("reconstruct")
        u8 = _read_upload("image", C, S)
        k = image_key(u8)

        def work() -> tuple[Any, dict]:
            z, calls = inverted(u8, k, p["steps"], p["spacing"], p["class"])
            img, meta = drafts.reconstruct(u8, p, z)
            return img, {**meta, "calls": calls + meta["nfe"]}

        img, inf = run(("reconstruct", k, *sorted(p.items())), work, "reconstruct")
        return png(img[0], inf, mse=f"{inf.meta['mse']:.6f}")

    @app.post("/api/swap")
    def api_swap() -> Response:
        p = params("swap")
        u8 = _read_upload("image", C, S)
        k = image_key(u8)

        def work() -> tuple[Any, dict]:
            z, calls = inverted(u8, k, p["steps"], p["spacing"], p["source"])
            img, meta = drafts.swap(u8, p, z)
            return img, {**meta, "calls": calls + meta["nfe"]}

        img, inf = run(("swap", k, *sorted(p.items())), work, "swap")
        return png(img[0], inf)

    @app.post("/api/sdedit")
    def api_sdedit() -> Response:
        p = params("sdedit")
        u8 = _read_upload("image", C, S)
        img, inf = run(("sdedit", image_key(u8), *sorted(p.items())), lambda: drafts.sdedit(u8, p), "sdedit")
        return png(img[0], inf)

    @app.post("/api/inpaint")
    def api_inpaint() -> Response:
        p = params("inpaint")
        u8 = _read_upload("image", C, S)
        m8 = _read_upload("mask", 1, S)
        mask = m8[0, ..., 0] >= 128
        key = ("inpaint", image_key(u8), image_key(mask.astype(np.uint8)), *sorted(p.items()))
        img, inf = run(key, lambda: drafts.inpaint(u8, mask, p), "inpaint")
        return png(img[0], inf, masked=int(mask.sum()))

    if warm:  # one draft at the page's first settings: the model's kernels and the sampler's tables warm
        p0 = (
            read_params("sample", {"class": ["3"]}, limits) if limits.num_classes else read_params("sample", {}, limits)
        )
        engine.run(("sample", *sorted(p0.items())), lambda: drafts.sample(p0))
    return app


def serve(
    app: Flask,
    host: str = "127.0.0.1",
    port: int = 7860,
    *,
    threads: int | None = None,
    ready: Callable[[str], None] | None = None,
) -> None:
    """Serve ``app`` with waitress until Ctrl-C (SIGINT) or SIGTERM, then stop cleanly.

    Args:
        host, port: where to listen (default 127.0.0.1:7860; port 0 picks a free one).
        threads: HTTP threads (default the queue size + 4, so that a full queue answers 503 rather than
            leaving connections waiting in the server).
        ready: called with the URL once the socket listens (e.g. to print it).

    On a signal the engine is closed first (waiting requests get 503 at once), the server stops
    accepting and closes its connections, and the job running on the model, if any, is let finish
    (at most one job's time, bounded by ``max_steps``); then the function returns normally.
    """
    import signal
    import threading

    from waitress.server import create_server

    engine: Engine = app.extensions["ddim"]["engine"]
    server = create_server(app, host=host, port=port, threads=threads or engine.queue_size + 4, ident="ddim")
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{server.effective_port}/"

    def stop(signum: int, frame: Any) -> None:
        engine.close(timeout=0)
        raise KeyboardInterrupt

    main = threading.current_thread() is threading.main_thread()  # signals can only be caught there
    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        if ready is not None:
            ready(url)
        server.run()  # returns after KeyboardInterrupt, having shut its task threads down
    except KeyboardInterrupt:
        pass
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        engine.close(timeout=None)  # the running job ends (torch must not be mid-kernel at exit)
        server.close()
