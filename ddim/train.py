"""Training with the DDPM "simple" objective (Ho et al. 2020, Eq. 14), ε, x₀ or v targets, or flow matching.

Flow matching / rectified flow (Lipman et al. 2023; Liu et al. 2023; ``prediction="flow"`` on
``schedule="flow"``, what ``ddim train --objective flow`` sets): the network regresses the velocity
ε - x₀ of the straight path z_τ = (1 - τ) x₀ + τ ε at the flow times τ_t = (t + 1)/T of
:meth:`~ddim.schedule.NoiseSchedule.flow`, t uniform in [0, T-1] (the int t it is later sampled at).

``train(TrainConfig(...))`` trains a :class:`~ddim.unet.UNet` with AdamW, gradient clipping and
EMA weights, writes a checkpoint every ``checkpoint_every`` steps and resumes exactly: weights,
EMA, optimizer moments, both random number generators and the step all come back, so a run
stopped and resumed ends bit-identical to one that never stopped.

Run folder layout::

    model.safetensors, config.json   EMA weights + config: what ``ddim.load(folder)`` samples with
    state.safetensors                everything needed to resume (raw weights, EMA, AdamW, RNG, step)
    log.csv                          step, loss, learning rate, images/s, wall seconds
    samples/step_XXXXXXX.png         a sample grid every ``sample_every`` steps
    train.lock                       held while a run trains (a second run into the folder is refused)

Under ``torchrun`` the model is wrapped in DistributedDataParallel: each of the N ranks draws its
own ``batch_size`` images (so the effective batch is ``batch_size`` × N), gradients are averaged,
and rank 0 alone writes checkpoints, grids and the log. Rank 0's random streams are those of a
single-process run; rank r > 0 seeds its own from ``(seed, r)``. The state file keeps every rank's
generators (``rng.data``/``rng.torch`` for rank 0, ``rng.data.R``/``rng.torch.R`` for rank R), so
a run resumed on the same number of processes ends bit-identical to one that never stopped.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save_file

from ddim import distributed as ddist
from ddim.checkpoint import CONFIG, WEIGHTS, atomic_write, build_unet, save_model
from ddim.data import ImageData, load_data
from ddim.noise import check_seed_range
from ddim.outputs import check_folder
from ddim.perf import check_threads
from ddim.schedule import NoiseSchedule
from ddim.unet import UNet, UNetConfig

__all__ = ["TrainConfig", "train", "make_schedule", "diffusion_loss", "RunLock"]

STATE = "state.safetensors"
TARGETS = ("epsilon", "sample", "v_prediction", "flow")
SCHEDULES = ("linear", "cosine", "scaled_linear", "flow")


@dataclass
class TrainConfig:
    """Everything a training run depends on (saved in the run's config.json).

    Attributes:
        data: data spec for :func:`ddim.data.load_data` ("mnist", "digits", a .npz, a folder).
        out: run folder.
        steps: total optimizer steps (a resumed run continues up to this number).
        batch_size: images per step.
        lr: AdamW learning rate after a linear warm-up of ``warmup`` steps; constant after, or,
            with ``lr_decay_start`` set, constant up to that step and then cosine-annealed to 0 at ``steps``.
        weight_decay, grad_clip: AdamW weight decay; max global gradient norm.
        ema_decay: EMA decay of the sampling weights (with the usual (1+n)/(10+n) warm-up).
        prediction: network target: "epsilon", "sample" (x₀), "v_prediction" or "flow" (the velocity
            ε - x₀: flow matching; needs ``schedule="flow"``).
        schedule: "linear", "cosine", "scaled_linear" or "flow" (only with ``prediction="flow"``, and the
            only schedule it takes); ``T`` training timesteps.
        class_cond: condition on labels when the data has them; ``label_dropout`` is the
            probability of replacing a label by the null class (classifier-free guidance).
        image_size: size for image folders (other sources keep their size).
        unet: architecture overrides for :class:`~ddim.unet.UNetConfig`.
        checkpoint_every, sample_every, log_every: in steps (0 = never, except the final checkpoint).
        seed: seeds the data order, timesteps, noise, label dropout and the network's dropout.
        threads: torch CPU threads (0 = torch's default).
        init: fine-tune: a model folder or checkpoint (anything :func:`ddim.load` reads) whose
            weights start the run, raw and EMA alike; its architecture, schedule and prediction are
            kept (they must agree with the data and the settings). The step count, optimizer and
            learning-rate schedule start afresh. ``None`` (default) starts from random weights.
        pairs: reflow (see :mod:`ddim.reflow`): the pairs folder the data came from. Then each image's
            noise is its pair's x_T (``train(..., noise=...)``) rather than a fresh draw, and ``init`` may
            predict another target on another schedule (only its architecture must fit: the weights are
            the starting point of a fine-tune to the new target).
    """

    data: str = "mnist"
    out: str = "runs/default"
    steps: int = 10000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 200
    lr_decay_start: int | None = None
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    prediction: str = "epsilon"
    schedule: str = "linear"
    T: int = 1000
    class_cond: bool = True
    label_dropout: float = 0.2
    image_size: int | None = None
    unet: dict[str, Any] = field(default_factory=dict)
    checkpoint_every: int = 500
    sample_every: int = 1000
    log_every: int = 50
    seed: int = 0
    threads: int = 0
    guidance: float = 2.0
    init: str | None = None
    pairs: str | None = None

    def validate(self) -> None:
        if self.prediction not in TARGETS:
            raise ValueError(f"prediction must be one of {TARGETS}, got {self.prediction!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if (self.prediction == "flow") != (self.schedule == "flow"):
            raise ValueError(
                "flow matching takes prediction='flow' with schedule='flow' (ddim train --objective flow), got "
                f"prediction={self.prediction!r} with schedule={self.schedule!r}"
            )
        for name in ("steps", "batch_size", "T"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.lr_decay_start is not None and not 0 <= self.lr_decay_start < self.steps:
            raise ValueError(f"lr_decay_start must be in [0, steps={self.steps}), got {self.lr_decay_start}")
        for name in ("lr", "weight_decay", "grad_clip", "guidance"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("weight_decay and grad_clip must be >= 0 (grad_clip 0 = no clipping)")
        for name in ("warmup", "checkpoint_every", "sample_every", "log_every", "threads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        check_seed_range(self.seed, 1, "seed")
        if self.init is not None and not Path(self.init).exists():
            raise FileNotFoundError(f"init {self.init} does not exist (a run or model folder, or a .safetensors file)")
        check_threads(self.threads or None)
        if not isinstance(self.unet, dict):
            raise ValueError(f"unet must be a dict of UNetConfig fields, got {type(self.unet).__name__}")
        if self.unet:  # the data fixes image_size and channels later; check the rest now
            levels = self.unet.get("channel_mults", (1, 3, 6))
            size = 2 ** (len(levels) - 1) if isinstance(levels, (list, tuple)) and levels else 1
            UNetConfig.from_dict({"image_size": size, **self.unet})


def make_schedule(name: str, T: int) -> NoiseSchedule:
    """The training schedule by name ("linear", "cosine", "scaled_linear", "flow")."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {name!r}")
    return getattr(NoiseSchedule, name)(T)


def diffusion_loss(
    model: torch.nn.Module,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction: str,
    y: torch.Tensor | None = None,
) -> torch.Tensor:
    """The "simple" loss ‖target − model(x_t, t)‖² averaged over all elements.

    Args:
        x0: clean images [B, C, H, W] (or any [B, ...]: signals, video); t: int64 [B];
        noise: ε ~ N(0, I) shaped like x0;
        alphas_cumprod: float64 [T]; prediction: the target ("epsilon", "sample", "v_prediction", or
            "flow": the network sees z_τ = (1-τ) x₀ + τ ε with τ = √(1-ᾱ_t)/(√ᾱ_t + √(1-ᾱ_t)) and
            regresses ε - x₀: the flow-matching loss on the flow grid ᾱ of ``NoiseSchedule.flow``).
    """
    if prediction == "flow":  # the flow state: the VP state with the same SNR, times 1/(√ᾱ + √(1-ᾱ))
        ab = alphas_cumprod[t].view(-1, *([1] * (x0.ndim - 1)))
        a, s = ab.sqrt(), (1 - ab).clamp(min=0).sqrt()
        a, s = (a / (a + s)).to(x0.dtype), (s / (a + s)).to(x0.dtype)
    else:
        ab = alphas_cumprod[t].to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
        a, s = ab.sqrt(), (1 - ab).sqrt()
    x_t = a * x0 + s * noise
    target = {"epsilon": noise, "sample": x0, "v_prediction": a * noise - s * x0, "flow": noise - x0}[prediction]
    out = model(x_t, t, y) if y is not None else model(x_t, t)
    return torch.mean((out.float() - target.float()) ** 2)


# ------------------------------------------------------------------ state (de)serialisation
def _state_tensors(model, ema, opt, rngs) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    # CPU copies: a checkpoint reads back on any device
    tensors = {f"model.{k}": v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v.detach().to("cpu", copy=True).contiguous() for k, v in ema.state_dict().items()})
    osd = opt.state_dict()
    scalars: dict[str, Any] = {}
    for pid, st in osd["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"opt.{pid}.{key}"] = val.detach().to("cpu", copy=True).contiguous()
            else:
                scalars[f"{pid}.{key}"] = val
    for rank, (data_state, torch_state) in enumerate(rngs):  # [(gen state, torch state)] per rank
        suffix = f".{rank}" if rank else ""
        tensors[f"rng.data{suffix}"] = data_state
        tensors[f"rng.torch{suffix}"] = torch_state
    meta = {"param_groups": osd["param_groups"], "opt_scalars": scalars, "world_size": len(rngs)}
    return tensors, meta


def _read_state(blob: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and the "ddim" metadata of a state file's bytes."""
    header = json.loads(blob[8 : 8 + int.from_bytes(blob[:8], "little")])
    return load(blob), json.loads(header["__metadata__"]["ddim"])


def _restore_state(blob: bytes, model, ema, opt, gen, rank: int = 0) -> dict[str, Any]:
    tensors, meta = _read_state(blob)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, key = k.split(".", 2)
            state.setdefault(int(pid), {})[key] = v
    for k, v in meta["opt_scalars"].items():
        pid, key = k.split(".", 1)
        state.setdefault(int(pid), {})[key] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    suffix = f".{rank}" if rank else ""
    gen.set_state(tensors[f"rng.data{suffix}"])
    torch.set_rng_state(tensors[f"rng.torch{suffix}"])
    return meta


def _rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s random streams (rank 0: ``seed`` itself, as single-process)."""
    if rank == 0:
        return seed
    import numpy as np

    return int(np.random.SeedSequence([seed % 2**63, rank]).generate_state(1, np.uint64)[0] >> 1)


# ------------------------------------------------------------------ the loop
def _shape_arch(shape: tuple[int, ...]) -> dict[str, Any]:
    """The U-Net settings of data shaped [N, C, L], [N, C, H, W] or [N, C, F, H, W]."""
    dims = len(shape) - 2
    if dims == 1:
        return {"image_size": shape[2], "in_channels": shape[1], "dims": 1}
    if dims == 3:
        return {"image_size": shape[3], "in_channels": shape[1], "dims": 3, "frames": shape[2]}
    return {"image_size": shape[2], "in_channels": shape[1]}


def _build(cfg: TrainConfig, data: ImageData) -> UNet:
    num_classes = data.num_classes if (cfg.class_cond and data.labels is not None) else 0
    arch = {**_shape_arch(tuple(data.images.shape)), "num_classes": num_classes, **cfg.unet}
    if cfg.init is None:
        return build_unet(arch, "unet")
    return _init_from(cfg, arch)


def _init_from(cfg: TrainConfig, arch: dict[str, Any]) -> UNet:
    """The network of ``cfg.init`` (fine-tuning), checked against the data and the settings."""
    from ddim.checkpoint import load as load_model

    model, _, config = load_model(cfg.init)
    got, want = asdict(model.config), asdict(UNetConfig.from_dict({**asdict(model.config), **arch}))
    wrong = [f"{k} {got[k]!r} (the run wants {want[k]!r})" for k in got if got[k] != want[k]]
    if wrong:
        raise ValueError(f"init {cfg.init}: its network does not fit this run: " + ", ".join(wrong))
    sched = config.get("schedule", {})
    if cfg.pairs is not None:  # reflow: the teacher's weights start a fine-tune to the velocity target
        return model.train().requires_grad_(True)
    if config.get("prediction") != cfg.prediction:
        raise ValueError(f"init {cfg.init}: it predicts {config.get('prediction')!r}, the run {cfg.prediction!r}")
    if sched.get("name") != cfg.schedule or int(sched.get("T", -1)) != cfg.T:
        raise ValueError(
            f"init {cfg.init}: its schedule is {sched.get('name')!r} with T={sched.get('T')}, "
            f"the run's {cfg.schedule!r} with T={cfg.T}"
        )
    return model.train().requires_grad_(True)  # ddim.load gives float32 weights


def _lr_at(cfg: TrainConfig, step: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based): warm-up, plateau, optional cosine tail."""
    lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))
    start = cfg.lr_decay_start
    if start is not None and step >= start:
        lr *= 0.5 * (1.0 + math.cos(math.pi * (step - start) / (cfg.steps - start)))
    return lr


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
        pe.lerp_(pm, 1.0 - decay)
    for be, bm in zip(ema.buffers(), model.buffers(), strict=True):
        be.copy_(bm)


def train(
    cfg: TrainConfig,
    *,
    resume: bool = True,
    progress: bool = True,
    data: ImageData | None = None,
    noise: torch.Tensor | None = None,
) -> Path:
    """Train (or resume) a run; returns the run folder. See :class:`TrainConfig`.

    ``data`` (default: loaded from ``cfg.data``) overrides the data; ``noise`` (reflow, with ``cfg.pairs``
    set) is a float tensor shaped like ``data.images``: image i is always noised with ``noise[i]``.

    With ``resume=True`` and a ``state.safetensors`` in ``cfg.out``, training continues from
    that exact state up to ``cfg.steps``; the stored config must agree on the architecture,
    data, schedule and prediction.
    """
    cfg.validate()
    out = check_folder(cfg.out, flag="out")
    ctx = ddist.init()
    lock, error = None, None
    if ctx.is_main:  # one run per folder: rank 0 holds the lock for the whole run
        try:
            out.mkdir(parents=True, exist_ok=True)
            lock = RunLock.acquire(out)
        except (ValueError, OSError) as e:
            error = e
    try:
        ddist.check(error, ctx)
        return _train(cfg, out, ctx, resume, progress, data, noise)
    finally:
        if lock is not None:
            lock.release()


def _train(
    cfg: TrainConfig,
    out: Path,
    ctx: ddist.Context,
    resume: bool,
    progress: bool,
    data: ImageData | None,
    pair_noise: torch.Tensor | None,
) -> Path:
    world = ctx.world_size
    data = data if data is not None else load_data(cfg.data, cfg.image_size)
    if len(data) == 0:
        raise ValueError(f"data {cfg.data!r} holds no images")
    if (pair_noise is not None) != (cfg.pairs is not None):
        raise ValueError("reflow training takes both cfg.pairs and the pairs' noise (ddim.reflow.reflow), or neither")
    if pair_noise is not None and tuple(pair_noise.shape) != tuple(data.images.shape):
        raise ValueError(f"noise shape {tuple(pair_noise.shape)} differs from the images' {tuple(data.images.shape)}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = _build(cfg, data)  # the same initial weights on every rank
    if ctx.rank:
        gen.manual_seed(_rank_seed(cfg.seed, ctx.rank))
        torch.manual_seed(_rank_seed(cfg.seed, ctx.rank))
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = make_schedule(cfg.schedule, cfg.T)
    ab = schedule.alphas_cumprod
    num_classes = model.config.num_classes

    step, wall_before, last_loss = 0, 0.0, float("nan")
    state_path = out / STATE
    # rank 0 reads the state and hands it to the others (their disks need not hold it)
    blob = state_path.read_bytes() if resume and ctx.is_main and state_path.is_file() else None
    blob = ddist.broadcast_object(blob, ctx=ctx)
    if blob is not None:
        try:
            _, meta = _read_state(blob)
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise ValueError(
                f"cannot resume {out}: {STATE} is damaged ({type(e).__name__}: {e}); start over with --fresh"
            ) from None
        if meta.get("world_size", 1) != world:
            raise ValueError(
                f"cannot resume {out}: it was trained on {meta.get('world_size', 1)} processes and this run has "
                f"{world}; resume it with torchrun --nproc_per_node={meta.get('world_size', 1)} "
                "(each rank has its own random streams) or start over (ddim train --fresh)"
            )
        if meta.get("train"):
            old, new = _identity(meta["train"]), _identity(asdict(cfg))
            diff = [f"{k} {old[k]!r} there, {new[k]!r} now" for k in old if old[k] != new[k]]
            if diff:
                raise ValueError(
                    f"cannot resume {out}: its run was trained with different settings ({'; '.join(diff)}); "
                    "use the same settings, another --out, or --fresh to start over"
                )
        try:
            meta = _restore_state(blob, model, ema, opt, gen, ctx.rank)
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
            first = next((ln for ln in lines if "mismatch" in ln or "key" in ln.lower()), lines[0])
            raise ValueError(
                f"cannot resume {out}: its saved state does not fit this run's network (the data or the "
                f"architecture changed?): {first}; use another --out, or --fresh to start over"
            ) from None
        step, wall_before, last_loss = meta["step"], meta["wall_seconds"], meta["loss"]
    n_params = sum(p.numel() for p in model.parameters())
    images, labels = data.images, data.labels
    model.train()
    net = model
    if ctx.distributed:  # averages the gradients over the ranks in backward()
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model)

    bar = None
    if progress and ctx.is_main:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=step, unit="step", dynamic_ncols=True, mininterval=1.0)
    t_start = time.perf_counter()
    smooth = None
    log_rows: list[list[Any]] = []
    while step < cfg.steps:
        tic = time.perf_counter()
        idx = torch.randint(0, len(images), (cfg.batch_size,), generator=gen)
        x0 = images[idx]
        t = torch.randint(0, cfg.T, (cfg.batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen) if pair_noise is None else pair_noise[idx]
        y = None
        if num_classes:
            drop = torch.rand(cfg.batch_size, generator=gen) < cfg.label_dropout
            y = torch.where(drop, torch.full_like(labels[idx], num_classes), labels[idx])
        for g in opt.param_groups:
            g["lr"] = _lr_at(cfg, step)
        loss = diffusion_loss(net, x0, t, noise, ab, cfg.prediction, y)
        loss_value = loss.detach()
        if ctx.distributed:  # the mean over all ranks: logged, and checked by every rank alike
            loss_value = ddist.all_reduce_sum(loss_value, ctx) / world
        if not torch.isfinite(loss_value):
            raise FloatingPointError(
                f"training loss became {loss_value.item()} at step {step}; lower the learning rate"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        _ema_update(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))
        last_loss = float(loss_value)
        smooth = last_loss if smooth is None else 0.98 * smooth + 0.02 * last_loss
        ips = cfg.batch_size * world / max(time.perf_counter() - tic, 1e-9)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{smooth:.4f}", img_s=f"{ips:.0f}", refresh=False)
        wall = wall_before + time.perf_counter() - t_start
        if cfg.log_every and step % cfg.log_every == 0:
            log_rows.append(
                [step, f"{last_loss:.6f}", f"{smooth:.6f}", f"{_lr_at(cfg, step - 1):.3g}", f"{ips:.1f}", f"{wall:.1f}"]
            )
        final = step == cfg.steps
        if final or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
            rngs = ddist.gather_objects((gen.get_state(), torch.get_rng_state()), ctx=ctx)
            error = None
            if ctx.is_main:
                try:
                    _flush_log(out, log_rows)
                    _checkpoint(out, cfg, data, model, ema, opt, rngs, schedule, step, wall, smooth, n_params)
                except OSError as e:
                    error = e
            log_rows = []
            ddist.check(error, ctx)  # a checkpoint that could not be written stops every rank
        if cfg.sample_every and (step % cfg.sample_every == 0 or final) and ctx.is_main:
            _sample_grid(out / "samples" / f"step_{step:07d}.png", ema, schedule, cfg)
    if bar is not None:
        bar.close()
    return out


class RunLock:
    """An exclusive lock on a run folder (``train.lock``, an OS lock on an open file).

    The operating system drops the lock when its process ends, however it ends (a crash, ``kill -9``,
    a lost node), so a killed run never leaves the folder stuck; the file itself stays and is reused.
    Where the OS has no file locks (no ``fcntl``, e.g. Windows) it does nothing.
    """

    NAME = "train.lock"

    def __init__(self, path: Path, fd: int | None) -> None:
        self.path, self.fd = path, fd

    @classmethod
    def acquire(cls, folder: str | Path) -> RunLock:
        """Take the lock of ``folder`` (which must exist), or raise ValueError naming the holder's pid."""
        import os

        path = Path(folder) / cls.NAME
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return cls(path, None)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ValueError(
                f"{folder} is in use by another `ddim train` (pid {holder}); wait for it to finish, "
                "or train into another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(path, fd)

    def release(self) -> None:
        """Let the next run in (closing the file drops the OS lock)."""
        import os

        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _identity(d: dict[str, Any]) -> dict[str, Any]:
    """Settings that must agree between a run and its resumption."""
    keys = (
        "data",
        "prediction",
        "schedule",
        "T",
        "class_cond",
        "image_size",
        "unet",
        "seed",
        "batch_size",
        "init",
        "pairs",
    )
    return {k: d.get(k) for k in keys}


def _flush_log(out: Path, rows: list[list[Any]]) -> None:
    if not rows:
        return
    path = out / "log.csv"
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["step", "loss", "loss_smooth", "lr", "images_per_s", "wall_s"])
        w.writerows(rows)


def _checkpoint(out, cfg, data, model, ema, opt, rngs, schedule, step, wall, loss, n_params) -> None:
    train_info = {**asdict(cfg), "step": step, "wall_seconds": round(wall, 1), "loss": loss, "parameters": n_params}
    if len(rngs) > 1:
        train_info.update(world_size=len(rngs), effective_batch_size=cfg.batch_size * len(rngs))
    extra = {
        "data": {**data.source, "n": len(data), "class_names": data.class_names},
        "train": train_info,
        "sampling": {"guidance": cfg.guidance, "clip_sample": False, **_flow_sampling(cfg.prediction)},
    }
    save_model(out, ema, schedule, cfg.prediction, extra)
    tensors, meta = _state_tensors(model, ema, opt, rngs)
    meta.update(step=step, wall_seconds=wall, loss=loss if loss is not None else math.nan, train=asdict(cfg))
    atomic_write(out / STATE, lambda tmp: save_file(tensors, tmp, metadata={"ddim": json.dumps(meta)}))


def _flow_sampling(prediction: str) -> dict[str, Any]:
    """A flow model samples from τ = 1 (t = T-1, pure noise): "trailing" spacing, whose first step is there."""
    return {"spacing": "trailing"} if prediction == "flow" else {}


def _sample_grid(path: Path, ema: UNet, schedule: NoiseSchedule, cfg: TrainConfig) -> None:
    """A grid of DDIM-50 samples from the EMA weights (classes 0..K-1 by row when conditional); images only."""
    from ddim.images import save_grid
    from ddim.sampling import sample

    if ema.config.dims != 2:  # signals and video have no grid picture: sample them with `ddim sample`
        return
    k = ema.config.num_classes
    n = 8 * max(k, 1) if k else 64
    gen = torch.Generator().manual_seed(1234)
    x_T = torch.randn((n, *ema.config.sample_shape), generator=gen)
    kwargs, guidance = {}, 1.0
    if k:
        kwargs = {"y": torch.arange(n) // 8 % k}
        guidance = cfg.guidance
    with torch.inference_mode():
        x0 = sample(
            ema,
            x_T,
            schedule,
            steps=50,
            spacing=_flow_sampling(cfg.prediction).get("spacing", "leading"),
            prediction=cfg.prediction,
            model_kwargs=kwargs,
            guidance_scale=guidance,
            uncond_kwargs={"y": torch.full((n,), k)} if k else None,
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    save_grid(x0, path, nrow=8)


__all__ += ["STATE", "WEIGHTS", "CONFIG"]
