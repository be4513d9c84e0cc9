"""Training runs of progressive distillation (Salimans & Ho 2022): rounds that halve the step count (or divide
it by ``teacher_steps_per_step``).

``distill_progressive(ProgressiveConfig(...))`` distils a teacher sampled with N deterministic DDIM steps
into a student that takes N/2, then that student into one of N/4, … down to ``to_steps``. Each round's student
starts from its teacher's weights and is trained on :func:`ddim.distill.progressive_distill_loss` (the x̂₀
target of two teacher steps; truncated-SNR weighting) with AdamW, a linear warm-up and a linear decay of the
learning rate to 0 at the end of the round (as the paper), gradient clipping and EMA weights; the next round's
teacher is this round's EMA student.

Choices, and why:

* **Grids**: "trailing" spacing (the student's grid is every other teacher timestep, ``timesteps(N, "trailing")
  [::2] == timesteps(N/2, "trailing")``), so the students are sampled with plain ``ddim.sample(steps=n,
  spacing="trailing")``, and every grid starts at t = T-1, where a few-step sampler must start.
* **Student output**: v (``prediction="v_prediction"``, Salimans & Ho's choice). The student is the teacher's
  network, its output read as v instead of ε: x̂₀ = √ᾱ z - √(1-ᾱ) v stays well conditioned at the first,
  almost pure-noise step of a 4-step grid, where x̂₀ from ε divides by √ᾱ_{T-1} ≈ 0.006 and a small ε error
  becomes a large x̂₀ error. At high SNR v ≈ ε, so the start is close there; round 1 learns the rest.
* **Guided teachers** (Meng et al. 2023, stage 1): round 1's teacher is the guided model at its default
  guidance (``config["sampling"]["guidance"]``, or ``guidance``) with its own x̂₀ clipping settings; the
  student is the conditional network alone (one call of batch B per step, the true class label, no null
  label), so later rounds and sampling run without guidance. The students are class-conditional only:
  the null class is not distilled.
* **Dropout** is off in the student (a deterministic regression target); the students are saved with
  ``dropout`` unchanged in their architecture config, which only acts in training.

Run folder layout (``out``)::

    distill.json                  the run's settings (a resumed run must match them)
    round1_<n>/                   round 1's student (n steps): model.safetensors + config.json (EMA weights),
                                  state.safetensors (exact resume), log.csv
    round2_<n>/ …
    model.safetensors, config.json   the final student (a copy of the last round's), what ``ddim.load(out)`` reads

Resume is exact: a stopped run picks up the unfinished round from its last checkpoint (weights, EMA, AdamW
moments, random generators, step), and finished rounds are not trained again.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ddim.checkpoint import CONFIG, WEIGHTS, atomic_write, save_model, write_json
from ddim.data import ImageData, load_data
from ddim.distill import WEIGHTINGS, halving_rounds, progressive_distill_loss
from ddim.noise import check_seed_range
from ddim.outputs import check_folder
from ddim.perf import check_threads
from ddim.prediction import check_prediction
from ddim.schedule import NoiseSchedule
from ddim.timesteps import timesteps as make_timesteps
from ddim.train import STATE, RunLock, _ema_update, _restore_state, _state_tensors
from ddim.unet import UNet

__all__ = [
    "ConsistencyConfig",
    "ProgressiveConfig",
    "SETTINGS",
    "distill_consistency",
    "distill_progressive",
    "load_teacher",
    "round_folder",
]

SETTINGS = "distill.json"
#: Settings that a resumed run may change (they do not change the result).
RUNTIME = ("threads", "device", "checkpoint_every", "log_every", "out")


@dataclass
class ProgressiveConfig:
    """Everything a progressive-distillation run depends on (saved as ``distill.json``).

    Attributes:
        teacher: the teacher: a ddim model folder or .safetensors file, or a shipped model name ("default").
        out: run folder.
        init: the network round 1's student starts from (a ddim model folder of the teacher's architecture and
            schedule whose output is ``student_prediction``, e.g. a student of an earlier run to train on with
            a better teacher); default a copy of the teacher. Later rounds start from the previous student.
        from_steps, to_steps: the teacher's DDIM step count and the final student's (``to_steps = from_steps /
            K^r``, r ≥ 1 rounds).
        teacher_steps_per_step: K, the teacher steps one student step learns (default 2, the paper's halving;
            4 divides the step count by 4 per round: fewer rounds, each teacher target K network calls).
        steps: optimizer steps per round; ``first_round_steps`` for round 1 (default ``steps``), which also
            moves the output from ε to v and from guided to conditional.
        batch_size: images per step. lr: AdamW peak learning rate (linear warm-up of ``warmup`` steps, then
            linear decay to 0 at the end of each round). grad_clip: max gradient norm (0 = off).
        ema_decay: EMA decay of each round's student weights (with the (1+n)/(10+n) warm-up).
        data: training images as ``ddim train --data`` ("mnist", "digits", a .npz, a folder); ``image_size``
            for folders.
        guidance: the teacher's guidance weight in round 1 (default: its config's sampling guidance, else 1).
        student_prediction: the students' output ("v_prediction", default; "sample" or "epsilon").
        weighting: "truncated_snr" (default, max(SNR, 1)), "snr_plus_one" or "landing" (see :mod:`ddim.distill`).
        seed: seed of the data order, step indices and noise. threads: CPU threads (0 = torch's default).
        device: where the networks train ("cpu", default; "cuda", "cuda:1", "mps"). The data order, step
            indices and noise are drawn on the CPU whatever the device, and the checkpoints hold CPU tensors,
            so a run may resume on another device (the same draws; float results within the devices' rounding).
        checkpoint_every, log_every: in steps (0 = only at the end of a round / never).
    """

    teacher: str
    out: str
    init: str | None = None
    from_steps: int = 64
    to_steps: int = 4
    teacher_steps_per_step: int = 2
    steps: int = 500
    first_round_steps: int | None = None
    batch_size: int = 32
    lr: float = 2e-4
    warmup: int = 20
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    data: str = "mnist"
    image_size: int | None = None
    guidance: float | None = None
    student_prediction: str = "v_prediction"
    weighting: str = "truncated_snr"
    seed: int = 0
    threads: int = 0
    device: str = "cpu"
    checkpoint_every: int = 100
    log_every: int = 10

    def validate(self) -> list[int]:
        """Check every setting (ValueError naming it); returns the rounds' student step counts."""
        rounds = halving_rounds(self.from_steps, self.to_steps, self.teacher_steps_per_step)
        if self.init is not None and not Path(self.init).exists():
            raise FileNotFoundError(f"init {self.init} does not exist (a ddim model folder)")
        for name in ("steps", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if self.first_round_steps is not None and (
            isinstance(self.first_round_steps, bool) or not isinstance(self.first_round_steps, int)
        ):
            raise ValueError(f"first_round_steps must be an int >= 1, got {self.first_round_steps!r}")
        if self.first_round_steps is not None and self.first_round_steps < 1:
            raise ValueError(f"first_round_steps must be an int >= 1, got {self.first_round_steps!r}")
        for name in ("lr", "grad_clip"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if self.lr <= 0 or self.grad_clip < 0:
            raise ValueError(f"lr must be > 0 and grad_clip >= 0, got lr={self.lr}, grad_clip={self.grad_clip}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.guidance is not None and (
            isinstance(self.guidance, bool)
            or not isinstance(self.guidance, (int, float))
            or not math.isfinite(self.guidance)
        ):
            raise ValueError(f"guidance must be a finite number, got {self.guidance!r}")
        if check_prediction(self.student_prediction) == "flow":
            raise ValueError("student_prediction must be 'v_prediction', 'sample' or 'epsilon', not 'flow'")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {self.weighting!r}; valid: {', '.join(WEIGHTINGS)}")
        for name in ("warmup", "checkpoint_every", "log_every", "threads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        check_seed_range(self.seed, 1, "seed")
        check_threads(self.threads or None)
        _check_device(self.device)
        return rounds

    def round_steps(self, r: int) -> int:
        """Optimizer steps of round ``r`` (1-based)."""
        return self.first_round_steps if (r == 1 and self.first_round_steps is not None) else self.steps


def _check_device(device: object) -> torch.device:
    """``device`` as a torch.device (ValueError for a string torch does not parse, or "meta")."""
    try:
        dev = torch.device(device)  # type: ignore[arg-type]
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"device {device!r} is not a torch device; valid: cpu, cuda, cuda:N, mps") from None
    if dev.type == "meta":
        raise ValueError("device 'meta' holds no data; use cpu, cuda or mps")
    return dev


def _load_init(init: str, teacher: UNet, schedule: NoiseSchedule) -> tuple[UNet, dict[str, Any]]:
    """The network a student starts from (``init``, a ddim model folder) and its config; ValueError unless it
    is a ddim U-Net of the teacher's architecture and noise schedule."""
    from ddim.checkpoint import load

    net, isched, iconfig = load(init)
    if not isinstance(net, UNet) or net.config != teacher.config:
        raise ValueError(f"init {init}: its network is not the teacher's architecture")
    if not torch.equal(isched.alphas_cumprod, schedule.alphas_cumprod):
        raise ValueError(f"init {init}: its noise schedule differs from the teacher's")
    return net, iconfig


def load_teacher(spec: str | None) -> tuple[UNet, NoiseSchedule, dict[str, Any]]:
    """The teacher network of a distillation (eval mode, no gradients), its schedule and config.

    ``spec``: a ddim model folder or .safetensors file, a shipped model name (``ddim models``), or None for
    the embedded default. Raises ValueError for anything that is not a ddim U-Net with an ε, x₀ or v output
    (a diffusers or Stable Diffusion pipeline, a flow model), FileNotFoundError for a missing one.
    """
    from ddim.checkpoint import load

    model, schedule, config = load(spec)
    if not isinstance(model, UNet):
        raise ValueError(
            f"teacher {spec}: only ddim U-Net models can be distilled (the student is saved as one), "
            f"got {type(model).__name__}"
        )
    if config["prediction"] == "flow":
        raise ValueError(f"teacher {spec}: a flow-matching model has no DDIM steps to distil")
    return model.eval().requires_grad_(False), schedule, config


def round_folder(out: str | Path, r: int, n: int) -> Path:
    """The folder of round ``r`` (1-based) whose student takes ``n`` steps."""
    return Path(out) / f"round{r}_{n}"


def _settings(cfg: ProgressiveConfig | ConsistencyConfig) -> dict[str, Any]:
    return {k: v for k, v in asdict(cfg).items() if k not in RUNTIME}


def _lr_at(cfg: ProgressiveConfig, step: int, total: int) -> float:
    warm = min(1.0, (step + 1) / max(1, cfg.warmup))
    return cfg.lr * warm * max(0.0, 1.0 - step / total)


def _is_done(folder: Path) -> bool:
    cfg = folder / CONFIG
    if not cfg.is_file() or not (folder / WEIGHTS).is_file():
        return False
    try:
        return bool(json.loads(cfg.read_text()).get("distill", {}).get("done"))
    except (json.JSONDecodeError, AttributeError):
        return False


def _teacher_data(data: ImageData | None, spec: str, image_size: int | None, teacher: Any) -> ImageData:
    """``data``, or the images of the data spec ``spec`` (``load_data``), checked against the teacher:
    not empty, images shaped like its samples, labels when it is class-conditional (ValueError)."""
    data = data if data is not None else load_data(spec, image_size)
    if len(data) == 0:
        raise ValueError(f"data {spec!r} holds no images")
    if tuple(data.images.shape[1:]) != tuple(teacher.config.sample_shape):
        raise ValueError(
            f"data {spec!r} has images {tuple(data.images.shape[1:])}, the teacher takes "
            f"{tuple(teacher.config.sample_shape)}"
        )
    k = teacher.config.num_classes
    if k and data.labels is None:
        raise ValueError(f"the teacher is class-conditional ({k} classes) and data {spec!r} has no labels")
    return data


def distill_progressive(
    cfg: ProgressiveConfig, *, resume: bool = True, progress: bool = True, data: ImageData | None = None
) -> Path:
    """Run (or resume) progressive distillation; returns the run folder (the final student is saved there).

    Everything is checked before the first step: the settings, the teacher (a ddim U-Net), the data, and, when
    resuming, that the folder's ``distill.json`` holds the same settings (else ValueError: use the same
    settings, another ``out``, or ``resume=False``, which starts over and replaces the rounds).
    """
    rounds = cfg.validate()
    out = check_folder(cfg.out, flag="out")
    teacher, schedule, tconfig = load_teacher(None if cfg.teacher in ("default", "") else cfg.teacher)
    data = _teacher_data(data, cfg.data, cfg.image_size, teacher)
    init = None
    if cfg.init is not None:
        init, iconfig = _load_init(cfg.init, teacher, schedule)
        if iconfig["prediction"] != check_prediction(cfg.student_prediction):
            raise ValueError(
                f"init {cfg.init} predicts {iconfig['prediction']}, the students {cfg.student_prediction}: "
                f"set --student-prediction {iconfig['prediction']} or start from another model"
            )
    _check_nesting(schedule, cfg.from_steps, rounds, cfg.teacher_steps_per_step)
    settings_path = out / SETTINGS
    _check_resume(out, cfg, resume)
    out.mkdir(parents=True, exist_ok=True)
    lock = RunLock.acquire(out)
    try:
        if not resume:
            for r, n in enumerate(rounds, 1):
                shutil.rmtree(round_folder(out, r, n), ignore_errors=True)
        write_json(settings_path, _settings(cfg))
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        device = _check_device(cfg.device)
        teacher = teacher.to(device)
        guidance = float(tconfig.get("sampling", {}).get("guidance", 1.0)) if cfg.guidance is None else cfg.guidance
        sampling = tconfig.get("sampling", {})
        options = {key: bool(sampling[key]) for key in ("clip_sample", "use_clipped_model_output") if key in sampling}
        prediction, n_teacher = tconfig["prediction"], cfg.from_steps
        for r, n in enumerate(rounds, 1):
            folder = round_folder(out, r, n)
            if not _is_done(folder):
                start = init.to(device) if (r == 1 and init is not None) else teacher
                _round(
                    cfg,
                    r,
                    n,
                    n_teacher,
                    folder,
                    teacher,
                    start,
                    schedule,
                    prediction,
                    guidance,
                    options,
                    data,
                    progress,
                )
            from ddim.checkpoint import load

            teacher, _, _ = load(folder)
            teacher = teacher.to(device).eval().requires_grad_(False)
            prediction, guidance, n_teacher = cfg.student_prediction, 1.0, n
        for name in (WEIGHTS, CONFIG):
            src = folder / name
            atomic_write(out / name, lambda tmp, src=src: shutil.copyfile(src, tmp))
    finally:
        lock.release()
    return out


def _check_nesting(schedule: NoiseSchedule, from_steps: int, rounds: list[int], k: int) -> None:
    """ValueError unless every round's "trailing" student grid is every k-th timestep of its teacher's (so the
    student is sampled with plain ``ddim.sample(steps=n, spacing="trailing")``)."""
    n_teacher = from_steps
    for n in rounds:
        teacher_grid = torch.as_tensor(make_timesteps(schedule, n_teacher, "trailing"))
        student = torch.as_tensor(make_timesteps(schedule, n, "trailing"))
        if not torch.equal(teacher_grid[::k].to(student.dtype), student):
            raise ValueError(
                f"the {n}-step trailing grid {student.tolist()} is not every {k}-th step of the teacher's "
                f"{n_teacher}-step grid on this {schedule.T}-step schedule; choose from_steps and to_steps that nest"
            )
        n_teacher = n


def _round(
    cfg: ProgressiveConfig,
    r: int,
    n: int,
    n_teacher: int,
    folder: Path,
    teacher: UNet,
    start: UNet,
    schedule: NoiseSchedule,
    prediction: str,
    guidance: float,
    options: dict[str, bool],
    data: ImageData,
    progress: bool,
) -> None:
    """Train round ``r``: the ``n``-step student of the ``n_teacher``-step teacher, starting from the network
    ``start`` (the teacher itself, or ``init`` in round 1), into ``folder``."""
    total = cfg.round_steps(r)
    folder.mkdir(parents=True, exist_ok=True)
    seed = cfg.seed * 1000 + r
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    student = copy.deepcopy(start).requires_grad_(True).eval()  # eval: no dropout (see the module docstring)
    ema = copy.deepcopy(student).requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.0)
    step, wall_before, smooth = 0, 0.0, None
    state_path = folder / STATE
    if state_path.is_file():
        blob = state_path.read_bytes()
        try:
            meta = _restore_state(blob, student, ema, opt, gen)
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise ValueError(f"cannot resume {folder}: {STATE} is damaged or another network's ({e})") from None
        step, wall_before, smooth = meta["step"], meta["wall_seconds"], meta.get("loss")
    ts = make_timesteps(schedule, n_teacher, "trailing")
    k = teacher.config.num_classes
    device = next(teacher.parameters()).device
    images, labels = data.images, data.labels
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=step, unit="step", desc=f"round {r}: {n_teacher}->{n} steps", mininterval=1.0)
    t_start = time.perf_counter()
    rows: list[list[Any]] = []
    while step < total:
        idx = torch.randint(0, len(images), (cfg.batch_size,), generator=gen)
        x0, y = images[idx].to(device), (labels[idx].to(device) if k else None)
        for g in opt.param_groups:
            g["lr"] = _lr_at(cfg, step, total)
        loss = progressive_distill_loss(
            student,
            teacher,
            schedule,
            x0,
            y,
            teacher_timesteps=ts,
            teacher_steps_per_student_step=cfg.teacher_steps_per_step,
            prediction=prediction,
            student_prediction=cfg.student_prediction,
            guidance_scale=guidance,
            null_label=k if k else None,
            teacher_options=options,
            weighting=cfg.weighting,
            generator=gen,
        )
        if not torch.isfinite(loss):
            raise FloatingPointError(f"distillation loss became {loss.item()} in round {r} at step {step}; lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        _ema_update(ema, student, min(cfg.ema_decay, (1 + step) / (10 + step)))
        value = float(loss.detach())
        smooth = value if smooth is None else 0.95 * smooth + 0.05 * value
        wall = wall_before + time.perf_counter() - t_start
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{smooth:.4f}", refresh=False)
        if cfg.log_every and step % cfg.log_every == 0:
            rows.append(
                [r, step, f"{value:.6f}", f"{smooth:.6f}", f"{_lr_at(cfg, step - 1, total):.3g}", f"{wall:.1f}"]
            )
        final = step == total
        if final or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
            _flush_log(folder, rows)
            rows = []
            _save_round(
                cfg, r, n, n_teacher, folder, student, ema, opt, gen, schedule, step, total, wall, smooth, options
            )
            _add_data(folder, data)
    if bar is not None:
        bar.close()


def _data_record(data: ImageData) -> dict[str, Any]:
    """The training data as a model config records it (what evaluations take as the reference)."""
    return {**data.source, "n": len(data), "class_names": data.class_names}


def _add_data(folder: Path, data: ImageData) -> None:
    config = json.loads((folder / CONFIG).read_text())
    write_json(folder / CONFIG, {**config, "data": _data_record(data)})


def _flush_log(folder: Path, rows: list[list[Any]]) -> None:
    if not rows:
        return
    path = folder / "log.csv"
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["round", "step", "loss", "loss_smooth", "lr", "wall_s"])
        w.writerows(rows)


def _save_round(
    cfg, r, n, n_teacher, folder, student, ema, opt, gen, schedule, step, total, wall, smooth, options
) -> None:
    done = step == total
    extra = {
        "sampling": {"guidance": 1.0, **options, "steps": n, "spacing": "trailing"},
        "distill": {
            "method": "progressive",
            "round": r,
            "teacher_steps": n_teacher,
            "student_steps": n,
            "step": step,
            "steps": total,
            "wall_seconds": round(wall, 1),
            "loss": smooth,
            "done": done,
            "settings": _settings(cfg),
        },
    }
    # the state first: a crash between the two files leaves a resumable round, never a "done" one without state
    tensors, meta = _state_tensors(student, ema, opt, [(gen.get_state(), torch.get_rng_state())])
    meta.update(step=step, wall_seconds=wall, loss=smooth if smooth is not None else math.nan, round=r)
    atomic_write(folder / STATE, lambda tmp: save_file(tensors, tmp, metadata={"ddim": json.dumps(meta)}))
    save_model(folder, ema, schedule, cfg.student_prediction, extra)


# ====================================================================== consistency distillation
@dataclass
class ConsistencyConfig:
    """Everything a consistency-distillation run depends on (saved as ``distill.json``).

    Attributes:
        teacher: the teacher (its ODE solver step: DDIM at its default guidance and clipping), as
            :class:`ProgressiveConfig`. out: run folder.
        init: the network the consistency model starts from (a ddim model folder; default the teacher).
            Its output is read as ``student_prediction``.
        intervals: N, the grid of N "trailing" timesteps plus t = 0 (:func:`ddim.consistency.consistency_grid`).
        steps: optimizer steps. batch_size, lr (linear warm-up of ``warmup`` steps, then linear decay to 0),
            grad_clip: as :class:`ProgressiveConfig`.
        target_decay: μ of the target network θ⁻ ← μ θ⁻ + (1-μ) θ (Song et al.'s CD: 0.95).
        ema_decay: EMA decay of the weights that are saved and sampled (with the (1+n)/(10+n) warm-up).
        student_prediction: what the wrapped network predicts ("v_prediction", default).
        distance: "pseudo_huber" (default) or "l2". guidance: the teacher's (default its config's).
        sigma_data: σ_d of the skip/out coefficients (default 0.5, Song et al.'s; see
            :class:`~ddim.consistency.ConsistencyModel`).
        data, image_size, seed, threads, device, checkpoint_every, log_every: as :class:`ProgressiveConfig`.
    """

    teacher: str
    out: str
    init: str | None = None
    intervals: int = 16
    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-4
    warmup: int = 50
    grad_clip: float = 1.0
    target_decay: float = 0.95
    ema_decay: float = 0.995
    student_prediction: str = "v_prediction"
    distance: str = "pseudo_huber"
    sigma_data: float = 0.5
    guidance: float | None = None
    data: str = "mnist"
    image_size: int | None = None
    seed: int = 0
    threads: int = 0
    device: str = "cpu"
    checkpoint_every: int = 100
    log_every: int = 10

    def validate(self) -> None:
        """Check every setting (ValueError naming it)."""
        for name in ("steps", "batch_size", "intervals"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        for name in ("lr", "grad_clip"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if self.lr <= 0 or self.grad_clip < 0:
            raise ValueError(f"lr must be > 0 and grad_clip >= 0, got lr={self.lr}, grad_clip={self.grad_clip}")
        for name in ("target_decay", "ema_decay"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.guidance is not None and (
            isinstance(self.guidance, bool)
            or not isinstance(self.guidance, (int, float))
            or not math.isfinite(self.guidance)
        ):
            raise ValueError(f"guidance must be a finite number, got {self.guidance!r}")
        if check_prediction(self.student_prediction) == "flow":
            raise ValueError("student_prediction must be 'v_prediction', 'sample' or 'epsilon', not 'flow'")
        if self.distance not in ("pseudo_huber", "l2"):
            raise ValueError(f"unknown distance {self.distance!r}; valid: pseudo_huber, l2")
        if (
            isinstance(self.sigma_data, bool)
            or not isinstance(self.sigma_data, (int, float))
            or not (0 < self.sigma_data < math.inf)
        ):
            raise ValueError(f"sigma_data must be a positive number, got {self.sigma_data!r}")
        for name in ("warmup", "checkpoint_every", "log_every", "threads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        if self.init is not None and not Path(self.init).exists():
            raise FileNotFoundError(f"init {self.init} does not exist (a ddim model folder)")
        check_seed_range(self.seed, 1, "seed")
        check_threads(self.threads or None)
        _check_device(self.device)


def _check_resume(out: Path, cfg: ProgressiveConfig | ConsistencyConfig, resume: bool) -> None:
    """ValueError when ``out`` holds a run of other settings than ``cfg``'s; a setting that an older run's
    ``distill.json`` lacks (added since) counts as its default."""
    path = out / SETTINGS
    if resume and path.is_file():
        old = json.loads(path.read_text())
        new = json.loads(json.dumps(_settings(cfg)))
        for key, value in json.loads(json.dumps(_settings(type(cfg)(teacher="", out="")))).items():
            old.setdefault(key, value)
        diff = [f"{key} {old.get(key)!r} there, {new.get(key)!r} now" for key in new if old.get(key) != new[key]]
        if diff:
            raise ValueError(
                f"cannot resume {out}: it was distilled with other settings ({'; '.join(diff)}); use the same "
                "settings, another --out, or --fresh to start over"
            )


def distill_consistency(
    cfg: ConsistencyConfig, *, resume: bool = True, progress: bool = True, data: ImageData | None = None
) -> Path:
    """Run (or resume) consistency distillation (Song et al. 2023, Alg. 2); returns the run folder, which holds
    the consistency model (EMA weights; ``ddim.load(out)`` returns it wrapped as a
    :class:`~ddim.consistency.ConsistencyModel`, sampled with ``sampler="consistency"``).

    Checked before the first step: the settings, the teacher and ``init`` (ddim U-Nets of the same
    architecture and schedule), the data, and on resume the saved settings (ValueError otherwise).
    """
    from ddim.consistency import ConsistencyModel, consistency_distill_loss, consistency_grid

    cfg.validate()
    out = check_folder(cfg.out, flag="out")
    teacher, schedule, tconfig = load_teacher(None if cfg.teacher in ("default", "") else cfg.teacher)
    net = copy.deepcopy(teacher) if cfg.init is None else _load_init(cfg.init, teacher, schedule)[0]
    grid = consistency_grid(schedule, cfg.intervals)
    data = _teacher_data(data, cfg.data, cfg.image_size, teacher)
    k = teacher.config.num_classes
    settings = _settings(cfg)
    _check_resume(out, cfg, resume)
    out.mkdir(parents=True, exist_ok=True)
    lock = RunLock.acquire(out)
    try:
        state_path = out / STATE
        if not resume and state_path.exists():
            state_path.unlink()
        write_json(out / SETTINGS, settings)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        sampling = tconfig.get("sampling", {})
        guidance = float(sampling.get("guidance", 1.0)) if cfg.guidance is None else cfg.guidance
        options = {key: bool(sampling[key]) for key in ("clip_sample", "use_clipped_model_output") if key in sampling}
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        device = _check_device(cfg.device)
        teacher, net = teacher.to(device), net.to(device)
        model = ConsistencyModel(net.requires_grad_(True).eval(), schedule, cfg.student_prediction, cfg.sigma_data)
        target = copy.deepcopy(model).requires_grad_(False)
        ema = copy.deepcopy(model).requires_grad_(False)
        opt = torch.optim.AdamW(model.net.parameters(), lr=cfg.lr, weight_decay=0.0)
        step, wall_before, smooth = 0, 0.0, None
        if state_path.is_file():
            blob = state_path.read_bytes()
            try:
                meta = _restore_state(blob, model.net, ema.net, opt, gen)
                from safetensors.torch import load as load_bytes

                tensors = load_bytes(blob)
                target.net.load_state_dict({key[7:]: v for key, v in tensors.items() if key.startswith("target.")})
            except (ValueError, KeyError, TypeError, RuntimeError) as e:
                raise ValueError(f"cannot resume {out}: {STATE} is damaged or another network's ({e})") from None
            step, wall_before, smooth = meta["step"], meta["wall_seconds"], meta.get("loss")
        images, labels = data.images, data.labels
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=step, unit="step", desc="consistency", mininterval=1.0)
        t_start = time.perf_counter()
        rows: list[list[Any]] = []
        while step < cfg.steps:
            idx = torch.randint(0, len(images), (cfg.batch_size,), generator=gen)
            x0, y = images[idx].to(device), (labels[idx].to(device) if k else None)
            for g in opt.param_groups:
                g["lr"] = _lr_at(cfg, step, cfg.steps)
            loss = consistency_distill_loss(
                model,
                target,
                teacher,
                schedule,
                x0,
                y,
                grid=grid,
                prediction=tconfig["prediction"],
                guidance_scale=guidance,
                null_label=k if k else None,
                teacher_options=options,
                distance=cfg.distance,
                generator=gen,
            )
            if not torch.isfinite(loss):
                raise FloatingPointError(f"consistency loss became {loss.item()} at step {step}; lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.net.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            _ema_update(target.net, model.net, cfg.target_decay)
            _ema_update(ema.net, model.net, min(cfg.ema_decay, (1 + step) / (10 + step)))
            value = float(loss.detach())
            smooth = value if smooth is None else 0.95 * smooth + 0.05 * value
            wall = wall_before + time.perf_counter() - t_start
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{smooth:.4f}", refresh=False)
            if cfg.log_every and step % cfg.log_every == 0:
                lr_now = _lr_at(cfg, step - 1, cfg.steps)
                rows.append([0, step, f"{value:.6f}", f"{smooth:.6f}", f"{lr_now:.3g}", f"{wall:.1f}"])
            if step == cfg.steps or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                _flush_log(out, rows)
                rows = []
                tensors, meta = _state_tensors(model.net, ema.net, opt, [(gen.get_state(), torch.get_rng_state())])
                target_sd = target.net.state_dict()
                tensors.update({f"target.{key}": v.detach().to("cpu", copy=True) for key, v in target_sd.items()})
                meta.update(step=step, wall_seconds=wall, loss=smooth if smooth is not None else math.nan)
                blob_meta = {"ddim": json.dumps(meta)}
                atomic_write(state_path, lambda tmp, t=tensors, m=blob_meta: save_file(t, tmp, metadata=m))
                extra = {
                    "consistency": {"prediction": cfg.student_prediction, "sigma_data": model.sigma_data},
                    "sampling": {
                        "guidance": 1.0,
                        **options,
                        "sampler": "consistency",
                        "steps": 1,
                        "spacing": "trailing",
                    },
                    "distill": {
                        "method": "consistency",
                        "step": step,
                        "steps": cfg.steps,
                        "wall_seconds": round(wall, 1),
                        "loss": smooth,
                        "done": step == cfg.steps,
                        "settings": settings,
                    },
                }
                save_model(out, ema.net, schedule, "sample", {**extra, "data": _data_record(data)})
        if bar is not None:
            bar.close()
    finally:
        lock.release()
    return out
