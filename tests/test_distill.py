"""Progressive distillation: the x̂₀ target reproduces two teacher steps with one, the loss, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import GaussianData

import ddim
from ddim.distill import halving_rounds, progressive_distill_loss, student_grid, teacher_target
from ddim.prediction import Denoiser
from ddim.schedule import NoiseSchedule
from ddim.unet import UNet, UNetConfig


def _gaussian_teacher(schedule: NoiseSchedule) -> tuple[GaussianData, object]:
    data = GaussianData(schedule, mu=0.5, s=0.3)
    return data, lambda x, t, **_: data.eps(x, t)


def _ddim(z, x0, eps, ab_to):
    return ab_to**0.5 * x0 + (1 - ab_to) ** 0.5 * eps


@pytest.mark.parametrize("k", [2, 3])
def test_one_student_step_on_the_target_lands_on_the_teachers_steps(k):
    sched = NoiseSchedule.linear(1000)
    _, model = _gaussian_teacher(sched)
    teach = Denoiser(model, sched)
    ts = ddim.timesteps(sched, 4 * k, "trailing")
    n = 4
    g = torch.Generator().manual_seed(0)
    B = 4 * n
    index = torch.arange(B) % n
    ab = sched.alphas_cumprod.double()
    levels = torch.cat([ab[ts], torch.ones(1, dtype=torch.float64)])
    z_t = torch.randn(B, 1, 3, 3, generator=g, dtype=torch.float64) * 1.2
    x_tilde, z_end, ab_end = teacher_target(teach, z_t, index, ts, k)
    for b in range(B):
        i = int(index[b])
        # the teacher's k DDIM steps, by hand
        z = z_t[b : b + 1]
        for j in range(k):
            a_from, a_to = float(levels[k * i + j]), float(levels[k * i + j + 1])
            eps = model(z, ts[k * i + j].reshape(1))
            x0 = (z - (1 - a_from) ** 0.5 * eps) / a_from**0.5
            z = _ddim(z, x0, eps, a_to)
        assert float(ab_end[b]) == float(levels[k * i + k])
        torch.testing.assert_close(z_end[b : b + 1], z, rtol=0, atol=1e-12)
        # one student DDIM step from z_t with x̂₀ = x̃ (ε̂ consistent with z_t) lands on the teacher's z
        a_t = float(levels[k * i])
        eps_s = (z_t[b : b + 1] - a_t**0.5 * x_tilde[b : b + 1]) / (1 - a_t) ** 0.5
        one = _ddim(z_t[b : b + 1], x_tilde[b : b + 1], eps_s, float(ab_end[b]))
        assert (one - z).abs().max() < 1e-10
    # with ddim.ddim_step and a "sample"-predicting student too
    out, _ = ddim.ddim_step(
        z_t, x_tilde, levels[k * index].reshape(-1, 1, 1, 1), ab_end.reshape(-1, 1, 1, 1), 0.0, prediction="sample"
    )
    assert (out - z_end).abs().max() < 1e-10


def test_loss_is_zero_for_the_exact_one_step_map():
    sched = NoiseSchedule.linear(1000)
    _, model = _gaussian_teacher(sched)
    ts = ddim.timesteps(sched, 8)
    grid = student_grid(ts)
    teach = Denoiser(model, sched)

    def exact_student(z, t, **_):  # predicts x̂₀ ("sample") = the target for z at its student step
        index = torch.stack([(grid == int(v)).nonzero()[0, 0] for v in t.cpu()])
        return teacher_target(teach, z, index, ts)[0]

    x0 = 0.5 + 0.3 * torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    loss = progressive_distill_loss(
        exact_student,
        model,
        sched,
        x0,
        teacher_timesteps=ts,
        student_prediction="sample",
        generator=torch.Generator().manual_seed(2),
    )
    assert 0 <= float(loss) < 1e-20
    # the teacher itself as student (one DDIM step of its own ε̂ for two) is off, by less as the steps shrink
    # (measured, every student step equally often: N = 8, 16, 32, 64 give 2.5e-3, 1.0e-3, 3.8e-4, 9.4e-5;
    # below N = 8 the max(SNR, 1) weight of the step nearest t = 0 dominates and the trend is not monotone)
    losses = []
    for n in (8, 16, 32, 64):
        loss = progressive_distill_loss(
            model,
            model,
            sched,
            x0.repeat(n, 1, 1, 1),
            teacher_timesteps=ddim.timesteps(sched, 2 * n, "trailing"),
            index=torch.arange(64 * n) % n,
            generator=torch.Generator().manual_seed(0),
        )
        losses.append(float(loss))
    assert losses[0] > losses[1] > losses[2] > losses[3] > 0, losses


def test_landing_weighting_is_the_squared_distance_of_the_landing_points():
    """weighting="landing": per sample, the mean squared distance between where ONE student DDIM step lands
    and where the teacher's two steps land (computed here by hand with ddim.ddim_step), for an ε student."""
    sched = NoiseSchedule.linear(1000)
    _, model = _gaussian_teacher(sched)
    ts = ddim.timesteps(sched, 8, "trailing")
    grid = student_grid(ts)

    def student(z, t, **_):  # the teacher's ε, a little off: its landing point misses the teacher's
        return model(z, t) * 1.1 + 0.05

    g = torch.Generator().manual_seed(3)
    B = 32
    x0 = 0.5 + 0.3 * torch.randn(B, 1, 2, 2, generator=g, dtype=torch.float64)
    noise = torch.randn(B, 1, 2, 2, generator=g, dtype=torch.float64)
    index = torch.arange(B) % grid.numel()
    loss = progressive_distill_loss(
        student, model, sched, x0, teacher_timesteps=ts, student_prediction="epsilon", weighting="landing",
        noise=noise, index=index,
    )  # fmt: skip
    ab = sched.alphas_cumprod.double()
    levels = torch.cat([ab[ts], torch.ones(1, dtype=torch.float64)])
    ab_t, ab_end = levels[2 * index].reshape(-1, 1, 1, 1), levels[2 * index + 2].reshape(-1, 1, 1, 1)
    z_t = ab_t.sqrt() * x0 + (1 - ab_t).sqrt() * noise
    _, z_teacher, _ = teacher_target(Denoiser(model, sched), z_t, index, ts)
    z_student, _ = ddim.ddim_step(z_t, student(z_t, grid[index]), ab_t, ab_end, 0.0, prediction="epsilon")
    by_hand = (z_student - z_teacher).pow(2).reshape(B, -1).mean(dim=1).mean()
    assert float(by_hand) > 1e-6  # the student is off: the test compares a real distance
    torch.testing.assert_close(loss, by_hand, rtol=1e-10, atol=0)


def test_tiny_unet_student_learns_a_fixed_batch():
    torch.manual_seed(0)
    sched = NoiseSchedule.linear(100)
    teacher = (
        UNet(UNetConfig(image_size=8, in_channels=1, base_channels=8, channel_mults=[1, 2], num_heads=2, num_classes=3))
        .double()
        .eval()
    )
    with torch.no_grad():  # a teacher whose output is not zero (zero-initialised last layers otherwise)
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    student = copy.deepcopy(teacher).train()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 1, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    ts = ddim.timesteps(sched, 8)
    kw = dict(teacher_timesteps=ts, guidance_scale=2.0, null_label=3, noise=noise, index=torch.arange(6) % 4)
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss = progressive_distill_loss(student, teacher, sched, x0, labels, **kw)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0], losses  # measured: 0.047 -> 0.024 in 6 steps
    assert all(p.grad is None for p in teacher.parameters())


def test_bad_input_is_refused():
    sched = NoiseSchedule.linear(100)
    _, model = _gaussian_teacher(sched)
    x0 = torch.zeros(2, 1, 2, 2)
    calls = []

    def counting(x, t, **_):
        calls.append(1)
        return model(x, t)

    ts = ddim.timesteps(sched, 8)
    bad = [
        (dict(teacher_timesteps=ddim.timesteps(sched, 7)), "multiple of 2"),
        (dict(teacher_timesteps=ts, student_timesteps=ddim.timesteps(sched, 3)), "every 2-th"),
        (dict(teacher_timesteps=ts, student_timesteps=ts[1::2]), "every 2-th"),
        (dict(teacher_timesteps=ts.flip(0)), "strictly descending"),
        (dict(teacher_timesteps=[100, 50]), r"\[0, 99\]"),
        (dict(teacher_timesteps=ts, teacher_steps_per_student_step=0), "teacher_steps_per_student_step"),
        (dict(teacher_timesteps=ts, weighting="snr"), "weighting"),
        (dict(teacher_timesteps=ts, prediction="x0"), "prediction"),
        (dict(teacher_timesteps=ts, guidance_scale=3.0), "null_label"),
        (dict(teacher_timesteps=ts, noise=torch.zeros(3, 1, 2, 2)), "noise shape"),
        (dict(teacher_timesteps=ts, index=torch.tensor([0, 4])), "index"),
        (dict(teacher_timesteps=ts, teacher_options={"guidance_scale": 2.0}), "teacher_options"),
        (dict(teacher_timesteps=ts, teacher_options={"clip_sample_range": -1.0}), "clip_sample_range"),
    ]
    for kw, match in bad:
        with pytest.raises(ValueError, match=match):
            progressive_distill_loss(counting, counting, sched, x0, **kw)
    with pytest.raises(ValueError, match="labels must be"):
        progressive_distill_loss(counting, counting, sched, x0, torch.tensor([1]), teacher_timesteps=ts)
    assert not calls


def test_halving_rounds():
    assert halving_rounds(64, 4) == [32, 16, 8, 4]
    assert halving_rounds(8, 4) == [4]
    assert halving_rounds(6, 3) == [3]
    assert halving_rounds(16, 4, factor=4) == [4]
    assert halving_rounds(64, 1, factor=4) == [16, 4, 1]
    assert halving_rounds(27, 1, factor=3) == [9, 3, 1]
    with pytest.raises(ValueError, match="by dividing by 4.*valid to_steps: 16, 4, 1"):
        halving_rounds(64, 8, factor=4)
    for bad in (1, 0, 2.0, True):
        with pytest.raises(ValueError, match="teacher_steps_per_step must be an int >= 2"):
            halving_rounds(8, 4, factor=bad)
    for a, b in [(64, 3), (64, 64), (7, 1), (4, 8), (0, 1), (8, 0)]:
        with pytest.raises(ValueError, match="steps"):
            halving_rounds(a, b)
    with pytest.raises(ValueError, match="valid to_steps: 32, 16, 8, 4, 2, 1"):
        halving_rounds(64, 3)


def test_trailing_grids_nest():
    sched = NoiseSchedule.linear(1000)
    for n in (1, 2, 4, 8, 16, 32, 64, 125):
        assert torch.equal(student_grid(ddim.timesteps(sched, 2 * n, "trailing")), ddim.timesteps(sched, n, "trailing"))
    assert torch.equal(student_grid(ddim.timesteps(sched, 4, "trailing"), 4), torch.tensor([999]))


@pytest.mark.parametrize("spacing", ["trailing", "leading"])
def test_exact_student_samples_like_the_teacher_in_half_the_calls(spacing):
    """ddim.sample with the exact one-step student on the student grid = the teacher's DDIM on its own grid."""
    sched = NoiseSchedule.linear(1000)
    _, model = _gaussian_teacher(sched)
    ts = ddim.timesteps(sched, 8, spacing)
    grid = student_grid(ts)
    teach = Denoiser(model, sched)

    def exact_student(z, t, **_):
        index = torch.stack([(grid == int(v)).nonzero()[0, 0] for v in t.cpu()])
        return teacher_target(teach, z, index, ts)[0]

    x_T = torch.randn(5, 1, 2, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    want = ddim.sample(model, x_T, sched, timesteps=ts)
    got = ddim.sample(exact_student, x_T, sched, timesteps=grid, prediction="sample")
    assert (got - want).abs().max() < 1e-10


def test_teacher_options_reach_the_teacher():
    """A teacher sampled with x̂₀ clipping (the embedded model's default) is distilled with it."""
    sched = NoiseSchedule.linear(1000)
    _, model = _gaussian_teacher(sched)
    ts = ddim.timesteps(sched, 8, "trailing")
    grid = student_grid(ts)
    opts = {"clip_sample": True, "clip_sample_range": 0.6, "use_clipped_model_output": True}
    clipped = Denoiser(model, sched, **opts)

    def exact_student(z, t, **_):
        index = torch.stack([(grid == int(v)).nonzero()[0, 0] for v in t.cpu()])
        return teacher_target(clipped, z, index, ts)[0]

    x0 = 0.5 + 0.3 * torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    kw = dict(teacher_timesteps=ts, student_prediction="sample", generator=torch.Generator().manual_seed(2))
    assert float(progressive_distill_loss(exact_student, model, sched, x0, teacher_options=opts, **kw)) < 1e-20
    kw["generator"] = torch.Generator().manual_seed(2)
    assert float(progressive_distill_loss(exact_student, model, sched, x0, **kw)) > 1e-6


def test_landing_weight_is_the_squared_move_of_a_ddim_landing_point():
    """One DDIM step z_e = α_e x̂₀ + σ_e ε̂ with ε̂ = (z_t − α_t x̂₀)/σ_t: an x̂₀ error δ moves z_e by
    (α_e − (σ_e/σ_t) α_t) δ, so the weight is that factor squared (0 where α_e/σ_e = α_t/σ_t)."""
    from ddim.distill import landing_weight

    ab_t = torch.tensor([0.01, 0.3, 0.9], dtype=torch.float64)
    ab_e = torch.tensor([0.2, 0.7, 1.0], dtype=torch.float64)
    z_t, x0, delta = torch.tensor(0.37, dtype=torch.float64), torch.tensor(-0.5, dtype=torch.float64), 1e-3

    def land(x0_hat: torch.Tensor) -> torch.Tensor:
        eps = (z_t - ab_t.sqrt() * x0_hat) / (1 - ab_t).sqrt()
        return ab_e.sqrt() * x0_hat + (1 - ab_e).sqrt() * eps

    moved = (land(x0 + delta) - land(x0)) / delta
    torch.testing.assert_close(landing_weight(ab_t, ab_e), moved.pow(2), rtol=1e-9, atol=1e-12)
    assert landing_weight(ab_t, ab_t).abs().max() < 1e-12
