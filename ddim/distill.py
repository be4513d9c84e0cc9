"""Progressive distillation (Salimans & Ho 2022, Algorithm 2): one student DDIM step for two teacher steps.

Notation (as the paper, VP): z_t = α_t x + σ_t ε with α_t = √ᾱ_t, σ_t = √(1-ᾱ_t). A deterministic
DDIM step (η = 0) from level t to level s, given the model's (x̂₀, ε̂) at z_t, is

    z_s = α_s x̂₀ + σ_s ε̂,   ε̂ = (z_t - α_t x̂₀) / σ_t,

i.e. z_s = (σ_s/σ_t) z_t + (α_s - (σ_s/σ_t) α_t) x̂₀: linear in x̂₀ for a fixed z_t.

The teacher runs K (= 2) DDIM steps t → t' → t'' on its grid, landing on z_t''. The student should do it
in ONE step t → t''. Solving the line above for the x̂₀ that lands exactly on z_t'' gives the target

    x̃ = (z_t'' - (σ_t''/σ_t) z_t) / (α_t'' - (σ_t''/σ_t) α_t).

(At the last student step, t'' is the final level ᾱ = 1: σ_t'' = 0 and x̃ = z_t'', the teacher's output.)
The denominator α_t'' - (σ_t''/σ_t) α_t = (α_t'' σ_t - σ_t'' α_t)/σ_t is > 0 exactly when t'' has the higher
SNR (α_t''/σ_t'' > α_t/σ_t), so x̃ is well defined on a strictly descending grid.

The student's loss is the paper's "truncated SNR" weighting, which we use: with SNR_t = α_t²/σ_t²,

    L = max(SNR_t, 1) · mean ‖x̂₀_student(z_t) - x̃‖²,

averaged over the batch. Since SNR·‖x̂₀ - x̃‖² = ‖ε̂ - ε̃‖² (ε̃ the ε consistent with x̃ at z_t), this is the
ε error at low noise (SNR > 1) and the plain x̂₀ error at high noise, where the ε-loss (weight SNR) would give
the steps near pure noise, the ones a few-step student depends on most, almost no weight.
``weighting="snr_plus_one"`` gives the paper's other choice (SNR + 1, the v-loss).

``weighting="landing"`` (ours) weighs by where the step lands: a student x̂₀ error δ moves its landing point
z_t'' by (α_t'' - (σ_t''/σ_t) α_t)·δ, so w = (α_t'' - (σ_t''/σ_t) α_t)² makes L the mean squared distance
between the student's and the teacher's z_t''. In ε terms (w/SNR_t) it stays between ~0.2 and ~5 over a
16-step grid where max(SNR, 1)/SNR spans 1 to 2.5·10⁴, which is what an ε-output student needs: it can
start as an exact copy of an ε-trained teacher (``student_prediction="epsilon"``) instead of re-learning
its output as v.

Guided teachers are distilled at one fixed guidance weight (Meng et al. 2023's first stage): the teacher's
(x̂₀, ε̂) come from :class:`ddim.prediction.Denoiser` with classifier-free guidance, and the student is the
conditional network alone (it takes the class label, no null-label pass), so it learns the guided map.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ddim.prediction import Denoiser, check_prediction
from ddim.schedule import NoiseSchedule

__all__ = [
    "WEIGHTINGS",
    "halving_rounds",
    "landing_weight",
    "progressive_distill_loss",
    "student_grid",
    "teacher_target",
]

#: Loss weightings of :func:`progressive_distill_loss` (Salimans & Ho 2022, Sec. 4).
WEIGHTINGS = ("truncated_snr", "snr_plus_one", "landing")

Model = Callable[..., Any]


def _as_grid(timesteps: Sequence[int] | torch.Tensor, T: int, name: str) -> torch.Tensor:
    ts = torch.as_tensor(timesteps).reshape(-1)
    if ts.dtype.is_floating_point or ts.dtype == torch.bool:
        raise ValueError(f"{name} must be integer timesteps, got dtype {ts.dtype}")
    ts = ts.to(torch.int64).cpu()
    if ts.numel() == 0:
        raise ValueError(f"{name} is empty")
    if int(ts.min()) < 0 or int(ts.max()) > T - 1:
        raise ValueError(f"{name} must lie in [0, {T - 1}], got {ts.tolist()}")
    if ts.numel() > 1 and not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError(f"{name} must be strictly descending, got {ts.tolist()}")
    return ts


def student_grid(
    teacher_timesteps: Sequence[int] | torch.Tensor, teacher_steps_per_student_step: int = 2
) -> torch.Tensor:
    """The student's timesteps for a teacher grid: every K-th teacher timestep, starting with the first.

    Args:
        teacher_timesteps: the teacher's N·K timesteps, strictly descending. Student step i runs from
            teacher position K·i to K·i + K (the last one to the final level), so the student starts where the
            teacher starts. "trailing" spacing nests: ``timesteps(schedule, 2N, "trailing")[::2] ==
            timesteps(schedule, N, "trailing")`` (starting at T-1, as few-step samplers should); "leading"
            does not (its 2N grid starts at T - T/2N, its N grid at T - T/N), so sample a student trained on a
            leading teacher grid with these very timesteps.
        teacher_steps_per_student_step: K ≥ 1 (default 2, the paper's halving).

    Returns: int64 CPU tensor [N]. Raises ValueError if the teacher's step count is not a multiple of K.
    """
    k = _check_k(teacher_steps_per_student_step)
    ts = torch.as_tensor(teacher_timesteps).reshape(-1).to(torch.int64)
    if ts.numel() == 0 or ts.numel() % k:
        raise ValueError(
            f"the teacher's {ts.numel()} steps cannot be split into student steps of "
            f"teacher_steps_per_student_step={k} teacher steps each (need a positive multiple of {k})"
        )
    return ts[::k].clone()


def _check_k(k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"teacher_steps_per_student_step must be an int >= 1, got {k!r}")
    return k


def halving_rounds(from_steps: int, to_steps: int, factor: int = 2) -> list[int]:
    """The student step counts of progressive distillation from ``from_steps`` down to ``to_steps``.

    Each round divides the step count by ``factor`` (default 2, the paper's halving):
    ``halving_rounds(64, 4) == [32, 16, 8, 4]`` (round r distils the teacher of ``from_steps // 2**(r-1)``
    steps into a student of half as many); ``halving_rounds(16, 4, factor=4) == [4]``. Raises ValueError
    unless both are positive ints, ``factor`` is an int ≥ 2 and ``to_steps = from_steps / factor^r`` for some
    r ≥ 1.
    """
    for name, v in (("from_steps", from_steps), ("to_steps", to_steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 2:
        raise ValueError(f"teacher_steps_per_step must be an int >= 2, got {factor!r}")
    rounds, n = [], from_steps
    while n > to_steps and n % factor == 0:
        n //= factor
        rounds.append(n)
    if n != to_steps or not rounds:
        reachable = []
        m = from_steps
        while m % factor == 0:
            m //= factor
            reachable.append(m)
        how = "halving" if factor == 2 else f"dividing by {factor}"
        valid = ", ".join(map(str, reachable)) or f"none (from_steps is not a multiple of {factor})"
        raise ValueError(
            f"to_steps={to_steps} is not reachable by {how} from_steps={from_steps}; valid to_steps: {valid}"
        )
    return rounds


def _levels(schedule: NoiseSchedule, teacher_ts: torch.Tensor, set_alpha_to_one: bool) -> torch.Tensor:
    """ᾱ of the teacher grid followed by the final level (1, or ᾱ_0), float64 [N·K + 1]."""
    ab = schedule.alphas_cumprod.to(torch.float64)
    final = torch.ones(1, dtype=torch.float64) if set_alpha_to_one else ab[:1]
    return torch.cat([ab[teacher_ts], final])


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (x.ndim - 1))).to(device=x.device, dtype=x.dtype)


def landing_weight(ab_t: torch.Tensor, ab_end: torch.Tensor) -> torch.Tensor:
    """The "landing" weight (α_end − (σ_end/σ_t) α_t)²: the squared move of a one-step DDIM landing point
    z_end per unit error of the x̂₀ it was taken with (module docstring).

    Args:
        ab_t: ᾱ of the level the step starts at, any shape (float64 recommended).
        ab_end: ᾱ of the level it lands on, the same shape (1 for the final ᾱ = 1).

    Returns:
        The weight, same shape and dtype.
    """
    return (ab_end.sqrt() - (1 - ab_end).sqrt() / (1 - ab_t).sqrt() * ab_t.sqrt()).pow(2)


@torch.no_grad()
def teacher_target(
    teacher: Denoiser,
    z_t: torch.Tensor,
    index: torch.Tensor,
    teacher_timesteps: Sequence[int] | torch.Tensor,
    teacher_steps_per_student_step: int = 2,
    *,
    set_alpha_to_one: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K teacher DDIM (η = 0) steps from each sample's student level, and the x̂₀ target that makes ONE
    student DDIM step land on the teacher's result (see the module docstring).

    Args:
        teacher: the teacher as a :class:`~ddim.prediction.Denoiser` (prediction, guidance and labels set).
        z_t: [B, ...] noisy samples; sample b is at ᾱ of ``teacher_timesteps[K·index[b]]``.
        index: int64 [B], the student step of each sample, in [0, N).
        teacher_timesteps: the teacher's N·K timesteps, strictly descending.
        teacher_steps_per_student_step: K (default 2).
        set_alpha_to_one: the level after the last timestep is ᾱ = 1 (default, as :func:`ddim.sample`) or ᾱ_0.

    Returns:
        (x̃, z_end, ᾱ_end): the target [B, ...], the teacher's z after K steps [B, ...] (z_t's dtype), and
        the float64 [B] ᾱ of the level it is at. K network calls, no gradients.
    """
    k = _check_k(teacher_steps_per_student_step)
    ts = _as_grid(teacher_timesteps, teacher.schedule.T, "teacher_timesteps")
    n = student_grid(ts, k).numel()
    idx = torch.as_tensor(index, dtype=torch.int64).reshape(-1).cpu()
    if idx.numel() != z_t.shape[0] or (idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n)):
        raise ValueError(f"index must hold one student step in [0, {n}) per sample ({z_t.shape[0]})")
    levels = _levels(teacher.schedule, ts, set_alpha_to_one)
    z = z_t
    for j in range(k):
        pos = k * idx + j
        ab_from, ab_to = levels[pos], levels[pos + 1]
        x0, eps = teacher(z, ts[pos].to(z.device), ab_from)
        z = _bcast(ab_to.sqrt(), z) * x0 + _bcast((1 - ab_to).sqrt(), z) * eps  # DDIM, η = 0
    ab_t, ab_end = levels[k * idx], levels[k * idx + k]
    a_t, s_t = ab_t.sqrt(), (1 - ab_t).sqrt()
    a_e, s_e = ab_end.sqrt(), (1 - ab_end).sqrt()
    ratio = s_e / s_t  # σ_t''/σ_t, float64
    x_tilde = (z - _bcast(ratio, z) * z_t) / _bcast(a_e - ratio * a_t, z)
    return x_tilde, z, ab_end


def progressive_distill_loss(
    student: Model,
    teacher: Model,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    teacher_timesteps: Sequence[int] | torch.Tensor,
    student_timesteps: Sequence[int] | torch.Tensor | None = None,
    teacher_steps_per_student_step: int = 2,
    prediction: str = "epsilon",
    student_prediction: str | None = None,
    guidance_scale: float = 1.0,
    null_label: int | None = None,
    teacher_options: Mapping[str, Any] | None = None,
    weighting: str = "truncated_snr",
    set_alpha_to_one: bool = True,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """The progressive-distillation loss of one batch (Salimans & Ho 2022, Algorithm 2, x̂₀ target).

    For each sample: a student step i ~ U{0..N-1}, its level t = ``student_timesteps[i]``,
    z_t = √ᾱ_t x0 + √(1-ᾱ_t) ε, K teacher DDIM steps t → … → t'' (:func:`teacher_target`, no gradients),
    and the weighted x̂₀ error of the student at (z_t, t) against the target x̃ (module docstring).

    Args:
        student: network ``student(x, t, y=labels)`` (or ``student(x, t)`` when ``labels`` is None), with
            gradients; usually a copy of the teacher.
        teacher: the teacher network, same call convention.
        schedule: the training schedule of both.
        x0: [B, ...] data batch (the dtype the loss is computed in).
        labels: int64 [B] class labels, or None for unconditional models.
        teacher_timesteps: the teacher's N·K timesteps, strictly descending.
        student_timesteps: the student's N timesteps; default (and required value) ``teacher_timesteps[::K]``.
        teacher_steps_per_student_step: K (default 2).
        prediction: what the teacher predicts (see :data:`ddim.prediction.PREDICTIONS`, default "epsilon").
        student_prediction: what the student predicts (default: the teacher's).
        guidance_scale: the teacher's classifier-free guidance weight (default 1 = none); the model's default
            guidance to distil the guided model, as Meng et al. 2023. Needs ``labels`` and ``null_label``.
        null_label: the unconditional class index (``num_classes`` for :class:`ddim.unet.UNet`).
        teacher_options: further :class:`~ddim.prediction.Denoiser` settings of the teacher, e.g. the model's
            sampling defaults ``{"clip_sample": True, "use_clipped_model_output": True}`` (default none); not
            guidance or kwargs, which the arguments above set.
        weighting: "truncated_snr" (default, max(SNR, 1)), "snr_plus_one" (SNR + 1) or "landing"
            ((α_t'' - (σ_t''/σ_t) α_t)²: the squared distance of the landing points, module docstring).
        set_alpha_to_one: the level after the last timestep is ᾱ = 1 (default) or ᾱ_0.
        generator: for the step indices and the noise.
        noise: ε [B, ...] to use instead of drawing it; index: int64 [B] student steps to use instead.

    Returns:
        0-d tensor in x0's dtype, differentiable w.r.t. the student's parameters. 1 student + K teacher calls
        (a guided teacher call runs batch 2B).

    Raises:
        ValueError, before any network call, for grids that do not nest (teacher steps not a multiple of K,
        student_timesteps other than teacher_timesteps[::K]), unknown weighting or prediction, guidance
        without labels/null_label, or shapes that do not match x0.
    """
    k = _check_k(teacher_steps_per_student_step)
    ts = _as_grid(teacher_timesteps, schedule.T, "teacher_timesteps")
    grid = student_grid(ts, k)
    if student_timesteps is not None:
        given = _as_grid(student_timesteps, schedule.T, "student_timesteps")
        if not torch.equal(given, grid):
            raise ValueError(
                f"student_timesteps {given.tolist()} are not every {k}-th teacher timestep: with "
                f"teacher_timesteps {ts.tolist()} and teacher_steps_per_student_step={k} they must be {grid.tolist()}"
            )
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; valid: {', '.join(WEIGHTINGS)}")
    prediction = check_prediction(prediction)
    student_prediction = check_prediction(prediction if student_prediction is None else student_prediction)
    if not isinstance(x0, torch.Tensor) or not x0.dtype.is_floating_point or x0.ndim < 2 or x0.shape[0] == 0:
        raise ValueError("x0 must be a non-empty floating tensor [B, ...]")
    B = x0.shape[0]
    kwargs: dict[str, Any] = {}
    uncond: dict[str, Any] | None = None
    if labels is not None:
        labels = torch.as_tensor(labels, device=x0.device)
        if labels.shape != (B,):
            raise ValueError(f"labels must be [B] = [{B}], got shape {tuple(labels.shape)}")
        kwargs = {"y": labels}
    if guidance_scale != 1.0:
        if labels is None or null_label is None:
            raise ValueError(f"guidance_scale={guidance_scale} needs labels and null_label (the unconditional class)")
        uncond = {"y": torch.full_like(labels, int(null_label))}
    options = dict(teacher_options or {})
    clash = sorted(set(options) & {"guidance_scale", "model_kwargs", "uncond_kwargs", "prediction", "schedule"})
    if clash:
        raise ValueError(f"teacher_options may not set {', '.join(clash)}: pass them as arguments")
    if noise is not None and noise.shape != x0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} differs from x0 shape {tuple(x0.shape)}")
    n = grid.numel()
    if index is None:
        index = torch.randint(0, n, (B,), generator=generator)
    index = torch.as_tensor(index, dtype=torch.int64).reshape(-1).cpu()
    if index.numel() != B or int(index.min()) < 0 or int(index.max()) >= n:
        raise ValueError(f"index must hold one student step in [0, {n}) per sample ({B})")
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)

    ab_t = _levels(schedule, ts, set_alpha_to_one)[k * index]  # float64 [B]; ab_end (below) likewise
    z_t = _bcast(ab_t.sqrt(), x0) * x0 + _bcast((1 - ab_t).sqrt(), x0) * noise
    teach = Denoiser(
        teacher,
        schedule,
        prediction,
        guidance_scale=guidance_scale,
        model_kwargs=kwargs,
        uncond_kwargs=uncond,
        **options,
    )
    x_tilde, _, ab_end = teacher_target(teach, z_t, index, ts, k, set_alpha_to_one=set_alpha_to_one)
    stud = Denoiser(student, schedule, student_prediction, model_kwargs=kwargs)
    x0_student, _ = stud(z_t, grid[index].to(x0.device), ab_t)
    snr = ab_t / (1 - ab_t)
    if weighting == "truncated_snr":
        w = snr.clamp(min=1.0)
    elif weighting == "snr_plus_one":
        w = snr + 1.0
    else:  # landing: the z_t'' error per unit x̂₀ error
        w = landing_weight(ab_t, ab_end)
    err = (x0_student - x_tilde).pow(2).reshape(B, -1).mean(dim=1)
    return (w.to(device=err.device, dtype=err.dtype) * err).mean()
