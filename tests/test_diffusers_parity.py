"""Parity with diffusers' DDIMScheduler (test-only dependency) where diffusers is right, and our own
behaviour where it is not. Run with ``pytest -s tests/test_diffusers_parity.py`` to see the worst error."""

import pytest
import torch
from conftest import dummy_model, dummy_sample_deter
from diffusers import DDIMScheduler

import ddim
from ddim import NoiseSchedule

WORST: dict[str, float] = {}


def _record(key: str, a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b)
    err = max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))
    WORST[key] = err
    return err


def _scheduler(**cfg) -> DDIMScheduler:
    base = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}
    return DDIMScheduler(**{**base, **cfg})


def _same_alphas(sch: DDIMScheduler) -> NoiseSchedule:
    # The very ᾱ table diffusers uses (float32 values, held in float64), so only the algorithm differs.
    return NoiseSchedule.from_alphas_cumprod(sch.alphas_cumprod.double())


def _diffusers_trajectory(sch, steps, x, eta=0.0, noise=None, use_clipped=True):
    sch.set_timesteps(steps)
    traj = [x]
    for t in sch.timesteps:
        out = dummy_model(x, t.reshape(1).expand(x.shape[0]))
        vn = noise() if noise is not None else None
        x = sch.step(out, t, x, eta, use_clipped_model_output=use_clipped, variance_noise=vn).prev_sample
        traj.append(x)
    return traj


def _our_trajectory(x, schedule, **kw):
    traj = []
    out = ddim.sample(dummy_model, x, schedule, callback=lambda i, t, x_t, x0: traj.append(x_t), **kw)
    return [*traj, out]


def _check_clip_parity(spacing, steps, prediction, clip, set_alpha_to_one, use_clipped) -> None:
    cfg = dict(clip_sample=clip, set_alpha_to_one=set_alpha_to_one, prediction_type=prediction)
    sch = _scheduler(timestep_spacing=spacing, **cfg)
    x = _wide_sample(prediction)
    ref = _diffusers_trajectory(sch, steps, x, use_clipped=use_clipped)
    ours = _our_trajectory(
        x,
        _same_alphas(sch),
        steps=steps,
        spacing=spacing,
        prediction=prediction,
        clip_sample=clip,
        set_alpha_to_one=set_alpha_to_one,
        **({"use_clipped_model_output": True} if use_clipped else {}),  # absent: the default, as diffusers'
    )
    key = f"{spacing}/S={steps}/{prediction}/clip={clip}/one={set_alpha_to_one}/clipped_eps={use_clipped}"
    err = _record(key, ours, ref)
    # With the model's ε̂ kept after clipping, (x̂₀, ε̂) no longer describe x_t, so diffusers' float32
    # coefficients (each rounded on its own) do not cancel as they do otherwise: 5e-5 relative there.
    tol = 5e-5 if clip and not use_clipped else 1e-5
    assert err < tol * x.abs().max().item(), err


def _wide_sample(prediction: str = "sample") -> torch.Tensor:
    # diffusers' sample stretched to [-2, 2] ([-10, 10] for ε, whose x̂₀ is smaller) so that clipping bites.
    half = 10.0 if prediction == "epsilon" else 2.0
    return (dummy_sample_deter() * 2 - 1) * half


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("steps", [10, 50])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_trajectory_parity_eta0(spacing, steps, prediction, clip, set_alpha_to_one):
    # clipping with diffusers' default use_clipped_model_output=False (ε̂ kept), and without clipping
    _check_clip_parity(spacing, steps, prediction, clip, set_alpha_to_one, use_clipped=False)


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("steps", [10, 50])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_trajectory_parity_eta0_use_clipped_model_output(spacing, steps, prediction, set_alpha_to_one):
    _check_clip_parity(spacing, steps, prediction, True, set_alpha_to_one, use_clipped=True)


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
def test_clipping_bites_on_the_parity_input(prediction):
    # Otherwise the clip=True parity cases above would prove nothing.
    schedule, x = NoiseSchedule.linear(1000), _wide_sample(prediction)
    seen = []
    ddim.sample(dummy_model, x, schedule, steps=10, prediction=prediction, callback=lambda *a: seen.append(a[3]))
    assert max(x0.abs().max().item() for x0 in seen) > 1.2


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_trajectory_parity_eta_half_same_noise(spacing, prediction):
    # One CPU generator per sample: x_T is its first draw, each step's noise the next one, exactly as a
    # diffusers pipeline given a list of generators draws them.
    seeds = [11, 22, 33, 44]
    sch = _scheduler(timestep_spacing=spacing, prediction_type=prediction, clip_sample=False)
    x_T = ddim.randn((4, 3, 8, 8), seeds)
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    first = torch.stack([torch.randn(3, 8, 8, generator=g) for g in gens])
    assert torch.equal(first, x_T)

    def step_noise():
        return torch.stack([torch.randn(3, 8, 8, generator=g) for g in gens])

    ref = _diffusers_trajectory(sch, 10, x_T, eta=0.5, noise=step_noise)
    ours = _our_trajectory(
        x_T, _same_alphas(sch), steps=10, spacing=spacing, prediction=prediction, eta=0.5, seeds=seeds
    )
    err = _record(f"eta=0.5/{spacing}/{prediction}", ours, ref)
    assert err < 5e-5, err


@pytest.mark.parametrize(
    "cfg, expected_sum, expected_mean",
    [
        ({}, 172.0067, 0.223967),
        ({"prediction_type": "v_prediction"}, 52.5302, 0.0684),
        ({"set_alpha_to_one": True, "beta_start": 0.01}, 149.8295, 0.1951),
        ({"set_alpha_to_one": False, "beta_start": 0.01}, 149.0784, 0.1941),
    ],
)
def test_diffusers_own_full_loop_sums(cfg, expected_sum, expected_mean):
    # diffusers' tests/schedulers/test_scheduler_ddim.py full_loop: 10 leading steps, clip on, dummy model;
    # reproduced with OUR schedule constructor (float64), not diffusers' ᾱ table.
    sch_cfg = {"clip_sample": True, "beta_start": 0.0001, **cfg}
    schedule = NoiseSchedule.linear(1000, sch_cfg["beta_start"], 0.02)
    out = ddim.sample(
        dummy_model,
        dummy_sample_deter(),
        schedule,
        steps=10,
        prediction=sch_cfg.get("prediction_type", "epsilon"),
        clip_sample=True,
        set_alpha_to_one=sch_cfg.get("set_alpha_to_one", True),
    )
    assert abs(out.abs().sum().item() - expected_sum) < 1e-2
    assert abs(out.abs().mean().item() - expected_mean) < 1e-3


def _explicit_chain(x, schedule, ts, prediction="epsilon"):
    """Our own reference: ddim_step from each listed ᾱ to the next listed one, then to ᾱ = 1, in float64."""
    ab = schedule.alphas_cumprod
    traj, x = [x], x.double()
    levels = [*ab[ts].tolist(), 1.0]
    for i, t in enumerate(ts.tolist()):
        out = dummy_model(x, torch.full((x.shape[0],), t))
        x, _ = ddim.ddim_step(x, out, levels[i], levels[i + 1], prediction=prediction)
        traj.append(x)
    return traj


@pytest.mark.parametrize(
    "spacing, steps",
    [("linspace", 10), ("linspace", 50), ("trailing", 3), ("trailing", 7), ("trailing", 61), ("quadratic", 20)],
)
def test_where_diffusers_is_wrong_we_land_on_the_next_listed_level(spacing, steps):
    # diffusers' step() goes to t - T//S whatever the spacing (issues #11347, #12633): for "linspace", and
    # for "trailing" when S does not divide T, that is NOT the next timestep in its own list. We step
    # between listed levels exactly; check against an explicit float64 ddim_step chain on those levels.
    schedule = NoiseSchedule.linear(1000)
    ts = ddim.timesteps(schedule, steps, spacing)
    if spacing in ("linspace", "trailing"):
        wrong_prev = ts[:-1] - 1000 // steps
        assert not torch.equal(wrong_prev, ts[1:])  # what diffusers would do differs from the list
    x = _wide_sample()
    ours = _our_trajectory(x.double(), schedule, steps=steps, spacing=spacing)
    ref = _explicit_chain(x, schedule, ts)
    err = _record(f"own-chain/{spacing}/S={steps}", ours, ref)
    assert err < 1e-10, err


def test_report_worst_parity_error():
    diffusers_keys = [k for k in WORST if not k.startswith("own-chain")]
    assert diffusers_keys, "run the whole module"
    worst = max(diffusers_keys, key=WORST.get)
    print(f"\n[parity] worst max-abs trajectory error vs diffusers DDIMScheduler: {WORST[worst]:.3e} ({worst})")
    print(f"[parity] cases compared: {len(diffusers_keys)}, float32, inputs |x_T| <= 10, same ᾱ table")
