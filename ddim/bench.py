"""``ddim bench``: this package's sampling loop against diffusers' scheduler loop, same network, same inputs.

Sampling time = network calls × network time + the sampler's own overhead. The network part is the
same for both (the same module is called on the same x_T at the same batch size), so what differs is
the overhead: everything a run does outside the network, setup included (``set_timesteps`` and the
scheduler's step for diffusers; argument checks, tables and the fused update for ours).

Each run is timed end to end, and the time spent inside the network is measured in the same run by
wrapping the network with a timer (on CUDA the wrapper synchronises, so there the split is exact but
the loop loses its asynchrony). Then, per run:

- overhead per step = (wall time - time in the network) / network calls;
- total = wall time; images/s = batch / total.

The table gives medians over the repeats (the two loops take turns, the first one alternating;
each timed run follows an untimed run of the same loop, so its code and data are in the CPU's
caches, as the floor's are: timed strictly alternating, each loop would also pay for the other
having pushed it out of cache: 20-90 µs more a run here, a large share of a 10-step run),
their ratios (diffusers ÷ ours: how many times less overhead / time ours takes), the
network's time per call, and the floor: two fused tensor ops on the batch (best of 7), the least a
DDIM update can cost. ``max |Δ|`` is the largest difference between the two loops'
final samples: it shows that both did the same work (the DPM-Solver++ row gives ours diffusers'
timesteps for that reason).

This is a benchmark, not a test: nothing here asserts a time.
"""

from __future__ import annotations

import functools
import os
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ddim.noise import randn
from ddim.sampling import SAMPLERS, sample
from ddim.schedule import NoiseSchedule

__all__ = [
    "ALGORITHMS",
    "BenchRow",
    "Timing",
    "TrivialModel",
    "bench_rows",
    "format_table",
    "run_bench",
    "sd_bench_rows",
]

#: Row name -> (our sampler, steps, diffusers scheduler class name).
ALGORITHMS = {
    "DDIM-50": ("ddim", 50, "DDIMScheduler"),
    "DPM-Solver++-10": ("dpmpp_2m", 10, "DPMSolverMultistepScheduler"),
}


class TrivialModel(torch.nn.Module):
    """A network of one tensor op, ε̂ = 0.1·x (t and keywords ignored): what is left is the sampler.

    ``config`` describes MNIST-size images, [1, 28, 28], unconditional.
    """

    @dataclass
    class Config:
        image_size: int = 28
        in_channels: int = 1
        num_classes: int = 0

    def __init__(self) -> None:
        super().__init__()
        self.config = TrivialModel.Config()

    def forward(self, x: torch.Tensor, t: torch.Tensor, **_: Any) -> torch.Tensor:
        return x * 0.1


class _Timed:
    """Call ``model`` and add the seconds spent in it (synchronising CUDA around the call)."""

    def __init__(self, model: Callable[..., Any], device: torch.device) -> None:
        self.model, self.seconds, self.calls = model, 0.0, 0
        self._sync = torch.cuda.synchronize if device.type == "cuda" else None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kw: Any) -> Any:
        # as little as possible outside the timed span: it counts as the loop's overhead
        sync = self._sync
        if sync is not None:
            sync()
        tic = time.perf_counter()
        out = self.model(x, t, **kw)
        if sync is not None:
            sync()
        self.seconds += time.perf_counter() - tic
        self.calls += 1
        return out


@dataclass
class Timing:
    """One loop's medians over the repeats: wall seconds per run, seconds in the network, network calls."""

    total: float
    network: float
    calls: int
    batch: int

    @property
    def overhead_per_step(self) -> float:
        """Seconds per network call spent outside the network."""
        return max(self.total - self.network, 0.0) / self.calls

    @property
    def images_per_s(self) -> float:
        return self.batch / self.total


@dataclass
class BenchRow:
    """One row of the table: a model, an algorithm, a batch size, and both loops' timings."""

    model: str
    algorithm: str
    batch: int
    ours: Timing | None
    diffusers: Timing | None
    floor: float
    max_diff: float | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _floor(x: torch.Tensor, n: int = 200) -> float:
    """Seconds of one DDIM update at its floor: two fused ops with 0-d coefficients into a preallocated
    tensor (best of 7 × n: the least it can cost, whatever else shares the machine)."""
    out, buf = x * 0.5, torch.empty_like(x)
    a, b = torch.tensor(0.9, dtype=x.dtype, device=x.device), torch.tensor(0.1, dtype=x.dtype, device=x.device)
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    runs = []
    for _ in range(7):
        sync()
        tic = time.perf_counter()
        for _ in range(n):
            torch.mul(x, a, out=buf).addcmul_(out, b)
        sync()
        runs.append((time.perf_counter() - tic) / n)
    return min(runs)


def _diffusers_scheduler(name: str, schedule: NoiseSchedule, prediction: str) -> Any:
    import diffusers

    cls = getattr(diffusers, name)
    common = dict(
        num_train_timesteps=schedule.T,
        trained_betas=schedule.betas.float().tolist(),
        prediction_type=prediction,
    )
    with warnings.catch_warnings():  # diffusers' own numpy-2 deprecation notice, not ours to act on
        warnings.simplefilter("ignore", DeprecationWarning)
        if name == "DDIMScheduler":
            return cls(**common, clip_sample=False, set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")
        return cls(**common, algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True)


def _diffusers_loop(
    scheduler: Any, steps: int, x_T: torch.Tensor, kwargs: dict, guidance: float, uncond: dict | None
) -> Callable[[_Timed], torch.Tensor]:
    """The loop a diffusers pipeline runs: set_timesteps, then model + scheduler.step per timestep
    (classifier-free guidance as pipelines do it: one forward on [x; x], then u + s·(c - u))."""
    guided = guidance != 1.0
    both = None
    if guided:
        both = {k: torch.cat([v, uncond[k]]) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}

    def run(model: _Timed) -> torch.Tensor:
        scheduler.set_timesteps(steps)
        x = x_T
        for t in scheduler.timesteps:
            if guided:
                out = model(torch.cat([x, x]), t, **both)
                cond, unc = out.chunk(2)
                out = unc + guidance * (cond - unc)
            else:
                out = model(x, t, **kwargs)
            x = scheduler.step(out, t, x).prev_sample
        return x

    return run


def _our_loop(
    sampler: str,
    steps: int,
    schedule: NoiseSchedule,
    x_T: torch.Tensor,
    prediction: str,
    kwargs: dict,
    guidance: float,
    uncond: dict | None,
    timesteps: list[int] | None,
) -> Callable[[_Timed], torch.Tensor]:
    def run(model: _Timed) -> torch.Tensor:
        return sample(
            model,
            x_T,
            schedule,
            steps=steps,
            sampler=sampler,
            timesteps=timesteps,
            prediction=prediction,
            model_kwargs=kwargs,
            guidance_scale=guidance,
            uncond_kwargs=uncond if guidance != 1.0 else None,
        )

    return run


def bench_rows(
    model: torch.nn.Module,
    schedule: NoiseSchedule,
    *,
    name: str,
    batches: Sequence[int] = (1, 64),
    algorithms: Sequence[str] = tuple(ALGORITHMS),
    repeats: int = 15,
    budget: float | None = None,
    prediction: str = "epsilon",
    guidance: float = 1.0,
    device: str | torch.device = "cpu",
    log: Callable[[str], None] | None = None,
    warm: bool = True,
) -> list[BenchRow]:
    """Time our loop and diffusers' on ``model`` for each algorithm and batch size.

    Args:
        model: called as ``model(x, t, **kw)``; a class-conditional model (``model.config.num_classes``
            > 0) is given the null class, or with ``guidance`` != 1 class 0 and the null class.
        schedule, prediction: the model's.
        name: the model's name in the table.
        batches, algorithms: rows to run (algorithms are keys of :data:`ALGORITHMS`).
        repeats: timed runs of each loop (median reported), after one warm-up run each.
        budget: seconds a row may take: fewer repeats are made when the next would overrun it
            (at least one is always made). None: no limit.
        device: where x_T and the network live.
        log: called with a line after each row (progress).
        warm: time each run right after an untimed run of the same loop (default), as the floor is
            timed in a tight loop; False times the loops strictly alternating, each run following a
            run of the other loop, whose code and data have pushed its own out of the CPU's caches.

    Returns:
        One :class:`BenchRow` per (algorithm, batch). An algorithm whose sampler is not registered
        gives a row with ``ours=None`` and a note.
    """
    device = torch.device(device)
    cfg = getattr(model, "config", None)
    shape = (int(getattr(cfg, "in_channels", 1)), int(getattr(cfg, "image_size", 28)))
    classes = int(getattr(cfg, "num_classes", 0) or 0)
    rows: list[BenchRow] = []
    trivial = TrivialModel()
    for algo in algorithms:
        sampler, steps, sched_name = ALGORITHMS[algo]
        for B in batches:
            x_T = randn((B, shape[0], shape[1], shape[1]), list(range(B)), device=device)
            floor = _floor(x_T)
            if sampler not in SAMPLERS:
                rows.append(
                    BenchRow(name, algo, B, None, None, floor, note=f"sampler {sampler!r} is not registered: skipped")
                )
                continue
            kwargs: dict[str, Any] = {}
            uncond: dict[str, Any] | None = None
            if classes:
                null = torch.full((B,), classes, dtype=torch.long, device=device)
                kwargs = {"y": torch.zeros_like(null) if guidance != 1.0 else null}
                uncond = {"y": null}
            scheduler = _diffusers_scheduler(sched_name, schedule, prediction)
            scheduler.set_timesteps(steps)
            # DPM-Solver++: ours on diffusers' own timesteps, so that both compute the same thing.
            ts = scheduler.timesteps.tolist() if sched_name != "DDIMScheduler" else None
            ours = _our_loop(sampler, steps, schedule, x_T, prediction, kwargs, guidance, uncond, ts)
            theirs = _diffusers_loop(scheduler, steps, x_T, kwargs, guidance, uncond)
            with torch.inference_mode():
                for loop in (ours, theirs):  # warm-up: same loop and shapes, one-op network
                    loop(_Timed(trivial, device))
                runs: dict[str, list[tuple[float, float, int]]] = {"ours": [], "diffusers": []}
                finals: dict[str, torch.Tensor] = {}
                start = time.perf_counter()
                for k in range(repeats):
                    order = (("ours", ours), ("diffusers", theirs))
                    for key, loop in order if k % 2 == 0 else order[::-1]:  # alternate who goes first
                        if warm:  # an untimed run of the same loop first: its code and data are in cache
                            loop(_Timed(model, device))
                        m = _Timed(model, device)
                        tic = time.perf_counter()
                        finals[key] = loop(m)
                        runs[key].append((time.perf_counter() - tic, m.seconds, m.calls))
                    spent = time.perf_counter() - start
                    if budget is not None and spent * (k + 2) / (k + 1) > budget:
                        break  # another repeat would overrun the row's time budget
            timings = {
                k: Timing(statistics.median(r[0] for r in v), statistics.median(r[1] for r in v), v[0][2], B)
                for k, v in runs.items()
            }
            diff = float((finals["ours"].float() - finals["diffusers"].float()).abs().max())
            rows.append(BenchRow(name, algo, B, timings["ours"], timings["diffusers"], floor, diff))
            if log is not None:
                log(format_row(rows[-1]))
    return rows


# ----------------------------------------------------------------- Stable Diffusion: whole text-to-image calls
class _UNetTimer:
    """Forward hooks on a module that add the seconds spent in it (synchronising CUDA around each call)."""

    def __init__(self, module: torch.nn.Module, device: torch.device) -> None:
        self.seconds, self.calls, self._tic = 0.0, 0, 0.0
        self._sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self._handles = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]

    def _pre(self, *_: Any) -> None:
        self._sync()
        self._tic = time.perf_counter()

    def _post(self, *_: Any) -> None:
        self._sync()
        self.seconds += time.perf_counter() - self._tic
        self.calls += 1

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _sd_ours(model, schedule, config, *, prompt, n, steps, guidance, sampler, device) -> torch.Tensor:
    from ddim.stable_diffusion import text_to_image

    res = text_to_image(
        model, schedule, config, prompt, n=n, steps=steps, sampler=sampler, guidance=guidance, batch=n, device=device
    )
    return (res.images / 2 + 0.5).clamp(0, 1)


def _sd_theirs(pipe, *, prompt, n, steps, guidance) -> torch.Tensor:
    gens = [torch.Generator("cpu").manual_seed(i) for i in range(n)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        out = pipe([prompt] * n, num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="pt")
    return out.images.float().cpu()


def sd_bench_rows(
    *,
    batches: Sequence[int] = (1, 8),
    algorithms: Sequence[str] = tuple(ALGORITHMS),
    repeats: int = 5,
    guidance: float = 7.5,
    device: str | torch.device = "cpu",
    log: Callable[[str], None] | None = None,
) -> list[BenchRow]:
    """Text to image with a tiny random Stable Diffusion pipeline (:func:`ddim.tiny_sd.tiny_stable_diffusion`,
    16×16 images): :func:`ddim.stable_diffusion.text_to_image` against ``StableDiffusionPipeline.__call__``
    on the same components (UNet, VAE, text encoder, tokenizer), one prompt, classifier-free guidance.

    Both are timed end to end (prompt encoding, the loop, VAE decoding); "network" is the time inside
    the UNet (forward hooks), so the overhead column holds everything else, the text encoder and VAE
    included, per UNet call. ``max |Δ|`` compares the decoded images on [0, 1]. Medians of ``repeats``.
    """
    import tempfile

    import diffusers

    from ddim.checkpoint import load
    from ddim.tiny_sd import tiny_stable_diffusion

    device = torch.device(device)
    with tempfile.TemporaryDirectory() as tmp:
        tiny = tiny_stable_diffusion(tokenizer_dir=os.path.join(tmp, "tok"))
        tiny.save_pretrained(os.path.join(tmp, "pipe"))
        model, schedule, config = load(os.path.join(tmp, "pipe"), device=device)
    rows: list[BenchRow] = []
    prompt = "a red cat and the dog"
    for algo in algorithms:
        sampler, steps, sched_name = ALGORITHMS[algo]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            scheduler = getattr(diffusers, sched_name).from_config(config["scheduler_config"])
        cfg = {**config, "scheduler": sched_name, "scheduler_config": dict(scheduler.config)}
        pipe = diffusers.StableDiffusionPipeline(
            unet=model.unet, vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
        pipe.set_progress_bar_config(disable=True)
        for B in batches:
            common = dict(prompt=prompt, n=B, steps=steps, guidance=guidance)
            ours = functools.partial(_sd_ours, model, schedule, cfg, sampler=sampler, device=device, **common)
            theirs = functools.partial(_sd_theirs, pipe, **common)
            runs: dict[str, list[tuple[float, float, int]]] = {"ours": [], "diffusers": []}
            finals: dict[str, torch.Tensor] = {}
            with torch.inference_mode():
                ours(), theirs()  # warm-up
                for k in range(repeats):
                    order = (("ours", ours), ("diffusers", theirs))
                    for key, fn in order if k % 2 == 0 else order[::-1]:
                        timer = _UNetTimer(model.unet, device)
                        tic = time.perf_counter()
                        finals[key] = fn()
                        runs[key].append((time.perf_counter() - tic, timer.seconds, timer.calls))
                        timer.remove()
            timings = {
                k: Timing(statistics.median(r[0] for r in v), statistics.median(r[1] for r in v), v[0][2], B)
                for k, v in runs.items()
            }
            floor = _floor(randn((B, *model.latent_shape()), list(range(B)), device=device))
            diff = float((finals["ours"] - finals["diffusers"]).abs().max())
            rows.append(BenchRow("tiny-sd", algo, B, timings["ours"], timings["diffusers"], floor, diff))
            if log is not None:
                log(format_row(rows[-1]))
    return rows


# ----------------------------------------------------------------- output
HEADER = (
    "| model | sampler | batch | NFE | network/call | overhead/step ours | overhead/step diffusers | ratio | "
    "total ours | total diffusers | ratio | images/s ours | images/s diffusers | floor (2 ops) | ours ÷ floor "
    "| max abs Δ |\n"
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def _us(s: float) -> str:
    return f"{s * 1e6:.1f} µs"


def _secs(s: float) -> str:
    if s < 1e-3:
        return _us(s)
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def format_row(r: BenchRow) -> str:
    """One Markdown table row."""
    if r.ours is None or r.diffusers is None:
        return f"| {r.model} | {r.algorithm} | {r.batch} | | | {r.note} | | | | | | | | {_us(r.floor)} | | |"
    o, d = r.ours, r.diffusers
    net = (o.network + d.network) / (o.calls + d.calls)
    return (
        f"| {r.model} | {r.algorithm} | {r.batch} | {o.calls} | {_secs(net)} | {_us(o.overhead_per_step)} | "
        f"{_us(d.overhead_per_step)} | {d.overhead_per_step / max(o.overhead_per_step, 1e-12):.1f}× | "
        f"{_secs(o.total)} | {_secs(d.total)} | {d.total / o.total:.2f}× | {o.images_per_s:.1f} | "
        f"{d.images_per_s:.1f} | {_us(r.floor)} | {o.overhead_per_step / r.floor:.1f}× | {r.max_diff:.1e} |"
    )


def format_table(rows: Sequence[BenchRow]) -> str:
    """The rows as one Markdown table."""
    return "\n".join([HEADER, *(format_row(r) for r in rows)])


def environment() -> str:
    """One line: torch and diffusers versions, device, threads, and whether other work shares the CPU."""
    import diffusers

    try:
        load = os.getloadavg()[0]
        load_s = f", load average {load:.1f} on {os.cpu_count()} CPUs"
    except OSError:  # pragma: no cover
        load_s = ""
    return f"torch {torch.__version__}, diffusers {diffusers.__version__}, {torch.get_num_threads()} thread(s){load_s}"


def run_bench(
    *,
    models: Sequence[str] = ("trivial", "shipped"),
    model_path: str | None = None,
    batches: Sequence[int] = (1, 64),
    algorithms: Sequence[str] = tuple(ALGORITHMS),
    repeats: int = 15,
    model_repeats: int = 5,
    model_budget: float = 30.0,
    guidance: float = 1.0,
    device: str = "cpu",
    log: Callable[[str], None] | None = None,
) -> tuple[list[BenchRow], list[str]]:
    """The whole benchmark: rows for the trivial model and for the shipped model (or ``model_path``), and
    with "tiny-sd" in ``models`` text-to-image rows for a tiny Stable Diffusion pipeline (:func:`sd_bench_rows`).

    The shipped model is :func:`ddim.load` ``()`` (or ``model_path``), prepared by
    :func:`ddim.perf.prepare` (eval, frozen, channels-last): the settings ``ddim sample`` uses. It is
    sampled without guidance by default (``guidance``: the model's classes, doubling the batch), with
    up to ``model_repeats`` repeats within ``model_budget`` seconds per row (a DDIM-50 run at batch 64
    takes ~10-20 s on one CPU core, so that row gets one).

    Returns ``(rows, notes)``; notes say which model was used or why rows were skipped.
    """
    from ddim.checkpoint import default_model_path, load
    from ddim.perf import prepare

    notes: list[str] = []
    rows: list[BenchRow] = []
    for which in models:
        if which == "tiny-sd":
            rows += sd_bench_rows(batches=batches, algorithms=algorithms, repeats=model_repeats, device=device, log=log)
            continue
        if which == "trivial":
            schedule = NoiseSchedule.linear(1000)
            rows += bench_rows(
                TrivialModel(), schedule, name="trivial", batches=batches, algorithms=algorithms,
                repeats=repeats, device=device, log=log,
            )  # fmt: skip
            continue
        path = model_path
        if path is None and not (default_model_path() / "model.safetensors").is_file():
            notes.append("shipped model: not found (ddim/weights/default is not shipped yet); rerun with --model PATH")
            continue
        try:
            model, schedule, config = load(path, device=device)
        except (FileNotFoundError, ValueError, ImportError) as e:
            notes.append(f"shipped model rows skipped: {e}")
            continue
        label = "shipped" if path is None else os.path.basename(os.path.normpath(str(path)))
        n_params = sum(p.numel() for p in model.parameters())
        notes.append(f"{label}: {path or default_model_path()} ({n_params / 1e6:.2f}M parameters)")
        fast = prepare(model, device=device)
        rows += bench_rows(
            fast, schedule, name=label, batches=batches, algorithms=algorithms, repeats=model_repeats,
            budget=model_budget, prediction=config["prediction"], guidance=guidance, device=device, log=log,
        )  # fmt: skip
    for r in rows:
        if r.note and r.note not in notes:
            notes.append(r.note)
    return rows, notes
