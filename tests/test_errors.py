"""Every bad input is refused up front with an error that names the parameter."""

import pytest
import torch
from conftest import dummy_model

import ddim
from ddim import Denoiser, NoiseSchedule, check_timesteps


class Never:
    """A model that must not be called (validation happens before any network call)."""

    def __call__(self, x, t, **kw):
        raise AssertionError("model called before validation finished")


X = torch.zeros(2, 3)


@pytest.mark.parametrize(
    "kwargs, exc, word",
    [
        ({"steps": 0}, ValueError, "steps"),
        ({"steps": 1001}, ValueError, "steps"),
        ({"steps": 2.5}, TypeError, "steps"),
        ({"spacing": "cubic"}, ValueError, "spacing"),
        ({"prediction": "score"}, ValueError, "prediction"),
        ({"sampler": "euler_ancestral_magic"}, ValueError, "sampler"),
        ({"eta": -0.1}, ValueError, "eta"),
        ({"eta": float("nan")}, ValueError, "eta"),
        ({"sampler": "ddpm", "eta": 0.5}, ValueError, "eta"),
        ({"variance": "huge"}, ValueError, "variance"),
        ({"timesteps": [10, 10, 5]}, ValueError, "timesteps"),
        ({"timesteps": [5, 10]}, ValueError, "timesteps"),
        ({"timesteps": [1000, 3]}, ValueError, "timesteps"),
        ({"timesteps": [10, -1]}, ValueError, "timesteps"),
        ({"timesteps": [9.5, 3]}, ValueError, "timesteps"),
        ({"timesteps": [[9, 3]]}, ValueError, "timesteps"),
        ({"timesteps": []}, ValueError, "timesteps"),
        ({"seeds": [1, 2, 3]}, ValueError, "seeds"),
        ({"seeds": [1, "a"]}, TypeError, "seeds"),
        ({"seeds": 7}, TypeError, "seeds"),
        ({"set_alpha_to_one": "yes"}, TypeError, "set_alpha_to_one"),
        ({"clip_sample": 1}, TypeError, "clip_sample"),
        ({"clip_sample_range": 0.0}, ValueError, "clip_sample_range"),
        ({"dynamic_thresholding_ratio": 1.5}, ValueError, "dynamic_thresholding_ratio"),
        ({"callback": 3}, TypeError, "callback"),
        ({"guidance_scale": 3.0}, ValueError, "uncond_kwargs"),
        ({"guidance_scale": "3"}, TypeError, "guidance_scale"),
        ({"model_kwargs": [1]}, TypeError, "model_kwargs"),
    ],
)
def test_sample_rejects_bad_arguments(linear, kwargs, exc, word):
    with pytest.raises(exc, match=word):
        ddim.sample(Never(), X, linear, **kwargs)


@pytest.mark.parametrize(
    "x, exc",
    [
        ([[0.0, 1.0]], TypeError),
        (torch.zeros(2, 3, dtype=torch.long), TypeError),
        (torch.tensor(1.0), ValueError),
        (torch.zeros(0, 3), ValueError),
    ],
)
def test_sample_rejects_bad_x_T(linear, x, exc):
    with pytest.raises(exc, match="x_T"):
        ddim.sample(Never(), x, linear)


def test_bad_model_and_schedule(linear):
    with pytest.raises(TypeError, match="model"):
        ddim.sample("not a model", X, linear)
    with pytest.raises(TypeError, match="schedule"):
        ddim.sample(dummy_model, X, torch.ones(10))


def test_guidance_kwargs_must_batch(linear):
    kw = dict(guidance_scale=2.0, model_kwargs={"y": torch.ones(2)})
    with pytest.raises(ValueError, match="uncond_kwargs"):
        ddim.sample(Never(), X, linear, uncond_kwargs={"z": torch.ones(2)}, **kw)
    with pytest.raises(ValueError, match="uncond_kwargs"):
        ddim.sample(Never(), X, linear, uncond_kwargs={"y": torch.ones(3)}, **kw)
    with pytest.raises(ValueError, match="uncond_kwargs"):
        ddim.sample(Never(), X, linear, guidance_scale=2.0, model_kwargs={"m": "a"}, uncond_kwargs={"m": "b"})


def test_model_output_shape_mismatch_names_shapes(linear):
    with pytest.raises(ValueError, match=r"shape \(2, 4\).*expected \(2, 3\)"):
        ddim.sample(lambda x, t: torch.zeros(2, 4), X, linear, steps=3)
    with pytest.raises(TypeError, match="model must return a tensor"):
        ddim.sample(lambda x, t: "nope", X, linear, steps=3)


def test_nan_output_names_step_and_timestep(linear):
    def blows_up(x, t):
        return torch.full_like(x, float("nan")) if int(t[0]) == 600 else dummy_model(x, t)

    # leading, 5 steps: [800, 600, 400, 200, 0] -> NaN at step i=1, t=600
    with pytest.raises(FloatingPointError, match=r"i=1 \(timestep t=600\)"):
        ddim.sample(blows_up, X, linear, steps=5)

    def inf_at_600(x, t):
        return torch.where(t[:, None] == 600, float("inf"), dummy_model(x, t))

    with pytest.raises(FloatingPointError, match=r"t=600"):
        ddim.sample(inf_at_600, X, linear, steps=5, eta=1.0)
    with pytest.raises(FloatingPointError, match="timestep"):
        ddim.invert(blows_up, X, linear, steps=5)


def test_epsilon_at_zero_snr_refused_before_any_call():
    sched = NoiseSchedule.linear(1000).rescale_zero_terminal_snr()
    with pytest.raises(ValueError, match="v-prediction"):
        ddim.sample(Never(), X, sched, steps=10, spacing="trailing")
    with pytest.raises(ValueError, match="v-prediction"):
        ddim.sample(Never(), X, sched, timesteps=[999, 500], sampler="ddpm")
    with pytest.raises(ValueError, match="v-prediction"):
        ddim.to_x0_eps(X, X, 0.0, "epsilon")
    with pytest.raises(ValueError, match="v-prediction"):
        ddim.ddim_step(X, X, 0.0, 0.5)
    # leading never visits t = T-1, so ε-prediction is fine there
    assert torch.isfinite(ddim.sample(dummy_model, X, sched, steps=10, spacing="leading")).all()
    # inversion never evaluates the network at the top level
    assert torch.isfinite(ddim.invert(dummy_model, X, sched, steps=10, spacing="trailing")).all()


def test_timesteps_function_errors(linear):
    with pytest.raises(ValueError, match="steps"):
        ddim.timesteps(linear, 0)
    with pytest.raises(ValueError, match="steps"):
        ddim.timesteps(linear, 1001)
    with pytest.raises(TypeError, match="steps"):
        ddim.timesteps(linear, True)
    with pytest.raises(ValueError, match=r"spacing.*leading.*linspace.*quadratic.*trailing"):
        ddim.timesteps(linear, 10, "uniform")


def test_check_timesteps_errors():
    for bad, exc in [
        ([3, 3], ValueError),
        ([1, 2], ValueError),
        ([10], ValueError),
        ([-1], ValueError),
        ([2.5], ValueError),
        (["a"], TypeError),
        ([True, False], TypeError),
        (torch.zeros(2, 2, dtype=torch.long), ValueError),
    ]:
        with pytest.raises(exc, match="timesteps"):
            check_timesteps(bad, 10)


def test_ddim_step_errors():
    with pytest.raises(ValueError, match="eta"):
        ddim.ddim_step(X, X, 0.3, 0.5, eta=-1.0)
    with pytest.raises(ValueError, match="noise"):
        ddim.ddim_step(X, X, 0.3, 0.5, eta=0.5)
    with pytest.raises(ValueError, match="noise"):
        ddim.ddim_step(X, X, 0.3, 0.5, eta=0.5, noise=torch.zeros(5))
    with pytest.raises(ValueError, match="prediction"):
        ddim.ddim_step(X, X, 0.3, 0.5, prediction="x0")
    with pytest.raises(ValueError, match="variance"):
        ddim.ddim_step(X, X, 0.3, 0.5, variance="big")
    with pytest.raises(ValueError, match="alpha_bar"):
        ddim.ddim_step(X, X, 1.3, 0.5)
    with pytest.raises(ValueError, match="model_output"):
        ddim.ddim_step(X, torch.zeros(3), 0.3, 0.5)


def test_randn_errors():
    with pytest.raises(ValueError, match="seeds"):
        ddim.randn((3, 2), [1, 2])
    with pytest.raises(TypeError, match="seeds"):
        ddim.randn((2, 2), [1.5, 2])


def test_invert_errors(linear):
    with pytest.raises(TypeError, match="x_0"):
        ddim.invert(Never(), [1.0], linear)
    with pytest.raises(ValueError, match="steps"):
        ddim.invert(Never(), X, linear, steps=0)
    with pytest.raises(ValueError, match="timesteps"):
        ddim.invert(Never(), X, linear, timesteps=[1, 5])
    with pytest.raises(ValueError, match="prediction"):
        ddim.invert(Never(), X, linear, prediction="noise")


def test_denoiser_and_slerp_errors(linear):
    with pytest.raises(ValueError, match="t must"):
        Denoiser(dummy_model, linear)(X, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="same shape"):
        ddim.slerp(torch.zeros(3), torch.zeros(4), 0.5)
    with pytest.raises(TypeError, match="floating"):
        ddim.slerp(torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long), 0.5)
    with pytest.raises(ValueError, match="alpha"):
        ddim.slerp(torch.ones(3), torch.ones(3), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="unknown sampler"):
        ddim.nfe("lms", 10)


def test_deferred_nonfinite_report_as_on_accelerators(linear):
    # Off CPU the check is recorded on the device and raised after the loop; emulate it on CPU.
    def nan_at_400(x, t):
        return torch.where(t[:, None] == 400, float("nan"), dummy_model(x, t))

    d = Denoiser(nan_at_400, linear)
    ts = ddim.timesteps(linear, 5)  # [800, 600, 400, 200, 0]
    plan = d.plan(ts, X)
    plan.bad = torch.zeros(5, dtype=torch.bool)
    for i in range(5):
        d.predict(X, plan, i)  # no raise inside the loop
    with pytest.raises(FloatingPointError, match=r"i=2 \(timestep t=400\)"):
        d.finish(plan)
