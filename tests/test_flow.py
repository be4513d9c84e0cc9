"""Flow models (prediction="flow": the velocity v = ε - x₀ of z_τ = (1-τ) x₀ + τ ε) through the one adapter.

Closed form first: for data x₀ ~ N(μ, s²) per dimension, z_τ is Gaussian and the flow-matching field is

    v*(z, τ) = E[ε - x₀ | z_τ = z] = (τ - (1-τ) s²) / ((1-τ)² s² + τ²) · (z - (1-τ) μ) - μ,

from E[x₀ | z] = μ + (1-τ) s² (z - (1-τ) μ) / ((1-τ)² s² + τ²) and E[ε | z] = τ (z - (1-τ) μ) / ((1-τ)² s² + τ²).
Its ODE dz/dτ = v* is the probability-flow ODE in other coordinates, so the exact map is the Gaussian's
affine one (:class:`conftest.GaussianData`), in VP terms x = z / √((1-τ)² + τ²).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import ddim
from ddim import NoiseSchedule
from ddim.prediction import Denoiser, conversion_coefficients, input_scale, to_x0_eps

MU, S = 0.5, 0.3
#: sampler -> (lowest, highest) accepted slope of log error against log steps (as tests/test_convergence.py).
ORDERS = {"ddim": (0.85, 1.2), "dpmpp_2m": (1.8, 3.5), "unipc": (1.8, 4.0), "heun": (1.8, 2.6)}
SIZES = [16, 23, 32, 45, 64]


class GaussianFlow:
    """The exact flow-matching velocity of x₀ ~ N(mu, s²) as a flow "model" on ``NoiseSchedule.flow``:
    called with the flow state z and the int timestep t, τ = schedule.flow_times()[t]."""

    def __init__(self, schedule: NoiseSchedule, mu: float | torch.Tensor = MU, s: float = S) -> None:
        self.tau, self.mu, self.s = schedule.flow_times(), mu, s
        self.inputs: list[torch.Tensor] = []

    def __call__(self, z: torch.Tensor, t: torch.Tensor, **_: object) -> torch.Tensor:
        self.inputs.append(z.clone())
        tau = self.tau[t.cpu()].reshape(-1, *([1] * (z.ndim - 1))).to(z)
        a, b = 1 - tau, tau
        return (b - a * self.s**2) / (a**2 * self.s**2 + b**2) * (z - a * self.mu) - self.mu


def _exact(x: torch.Tensor, ab_from: float, ab_to: float) -> torch.Tensor:
    """Exact ODE map of the Gaussian between VP levels (the invariant (x - √ᾱ μ)/√(ᾱ s² + 1 - ᾱ))."""
    z = (x - ab_from**0.5 * MU) / (ab_from * S**2 + 1 - ab_from) ** 0.5
    return ab_to**0.5 * MU + (ab_to * S**2 + 1 - ab_to) ** 0.5 * z


def _rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).pow(2).mean().sqrt().item()


@pytest.fixture(scope="module")
def flow() -> NoiseSchedule:
    return NoiseSchedule.flow(1000)


# ----------------------------------------------------------------- the schedule
def test_flow_schedule_grid(flow):
    tau = torch.arange(1, 1001, dtype=torch.float64) / 1000
    ab = (1 - tau) ** 2 / ((1 - tau) ** 2 + tau**2)
    torch.testing.assert_close(flow.alphas_cumprod, ab, rtol=0, atol=1e-15)
    torch.testing.assert_close(flow.flow_times(), tau, rtol=0, atol=1e-12)
    assert flow.alphas_cumprod[-1].item() == 0.0 and flow.alphas_cumprod[0].item() < 1.0
    assert flow.is_flow and not NoiseSchedule.linear(1000).is_flow
    again = NoiseSchedule.from_dict(flow.to_dict())
    assert again.is_flow and torch.equal(again.alphas_cumprod, flow.alphas_cumprod)
    shifted = NoiseSchedule.flow(1000, shift=3.0)
    t = tau[500].item()
    assert shifted.flow_times()[500].item() == pytest.approx(3 * t / (1 + 2 * t), abs=1e-12)
    assert NoiseSchedule.from_dict(shifted.to_dict()).params["shift"] == 3.0


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), True, "3"])
def test_flow_schedule_rejects_bad_shift(bad):
    with pytest.raises(ValueError, match="shift"):
        NoiseSchedule.flow(100, shift=bad)


# ----------------------------------------------------------------- the adapter's conversion
def test_conversion_both_ways():
    g = torch.Generator().manual_seed(0)
    tau = torch.tensor([0.0, 1e-3, 0.2, 0.5, 0.77, 0.999, 1.0], dtype=torch.float64)
    norm = ((1 - tau) ** 2 + tau**2).sqrt()
    ab = ((1 - tau) / norm) ** 2
    x0, eps = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(7, 5, generator=g, dtype=torch.float64)
    z = (1 - tau[:, None]) * x0 + tau[:, None] * eps
    x_vp = z / norm[:, None]
    # (x₀, ε) -> (x_vp, v) -> adapter -> (x₀, ε)
    x0_hat, eps_hat = to_x0_eps(x_vp, eps - x0, ab, "flow")
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(eps_hat, eps, rtol=0, atol=1e-12)
    # any output: x̂₀ = z - τ v, ε̂ = z + (1 - τ) v with z = x_vp·√((1-τ)² + τ²)
    out = torch.randn(7, 5, generator=g, dtype=torch.float64)
    x0_hat, eps_hat = to_x0_eps(x_vp, out, ab, "flow")
    zz = x_vp * norm[:, None]
    torch.testing.assert_close(x0_hat, zz - tau[:, None] * out, rtol=0, atol=1e-12)
    torch.testing.assert_close(eps_hat, zz + (1 - tau[:, None]) * out, rtol=0, atol=1e-12)
    # the input scale is that norm, and the table stays linear in (x_vp, out) and finite at ᾱ = 0 and 1
    torch.testing.assert_close(input_scale(ab, "flow"), norm, rtol=0, atol=1e-12)
    assert input_scale(ab, "epsilon") is None
    c = conversion_coefficients(ab, "flow")
    assert torch.isfinite(c).all()
    torch.testing.assert_close(c[:, 0], norm, rtol=0, atol=1e-12)
    torch.testing.assert_close(c[:, 1], -tau, rtol=0, atol=1e-12)
    torch.testing.assert_close(c[:, 3], 1 - tau, rtol=0, atol=1e-12)


def test_network_sees_the_flow_state(flow):
    """Every entry point (plan/output fused and checked, predict, __call__, guided) feeds z = k·x_vp."""
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ts = torch.tensor([999, 600, 10])
    k = 1 / (flow.alphas_cumprod[ts].sqrt() + (1 - flow.alphas_cumprod[ts]).sqrt())
    tau = (ts + 1).double() / 1000
    torch.testing.assert_close(k, ((1 - tau) ** 2 + tau**2).sqrt(), rtol=0, atol=1e-12)
    model = GaussianFlow(flow)
    d = Denoiser(model, flow, "flow")
    plan = d.plan(ts, x)
    for i in range(3):
        d.output(x, plan, i, check=False)
        d.output(x, plan, i)
        d.predict(x, plan, i)
        d(x, int(ts[i]))
        for z in model.inputs:
            torch.testing.assert_close(z, k[i] * x, rtol=0, atol=1e-12)
        model.inputs.clear()
    guided = Denoiser(model, flow, "flow", guidance_scale=2.0, model_kwargs={}, uncond_kwargs={})
    guided.predict(x, guided.plan(ts, x), 1)
    torch.testing.assert_close(model.inputs[0], torch.cat([k[1] * x, k[1] * x]), rtol=0, atol=1e-12)


# ----------------------------------------------------------------- samplers on the flow model
def test_ddim_is_euler_on_the_flow_path(flow):
    """DDIM (η = 0) on a flow model is Euler on dz/dτ = v: z' = z + (τ' - τ)·v(z, τ)."""
    x = torch.randn(64, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ts = [999, 700, 420, 200, 50, 0]
    tau = flow.flow_times()
    z = x.clone()  # k = 1 at ᾱ = 0
    model = GaussianFlow(flow)
    for t, t_next in zip(ts, ts[1:], strict=False):
        z = z + (tau[t_next] - tau[t]).item() * model(z, torch.full((64,), t))
    end = tau[0].item()
    expected = z / ((1 - end) ** 2 + end**2) ** 0.5  # back to the VP state at ᾱ_0
    out = ddim.sample(model, x, flow, timesteps=ts, prediction="flow", set_alpha_to_one=False)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    # and the final step to ᾱ = 1 (τ = 0) lands on z - τ·v = x̂₀
    out1 = ddim.sample(model, x, flow, timesteps=ts, prediction="flow")
    torch.testing.assert_close(out1, z - end * model(z, torch.zeros(64, dtype=torch.int64)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("sampler", list(ORDERS))
def test_convergence_order_on_flow_model(flow, sampler):
    """Steps uniform in flow time τ from t = 998 (ᾱ > 0: Heun steps in σ, infinite at ᾱ = 0) to t = 0."""
    lo, hi = ORDERS[sampler]
    ab = flow.alphas_cumprod
    x = torch.randn(256, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = _exact(x, ab[998].item(), ab[0].item())
    errors = []
    for n in SIZES:
        ts = np.linspace(998, 0, n).round().astype(int).tolist()
        out = ddim.sample(
            GaussianFlow(flow), x, flow, timesteps=ts, sampler=sampler, prediction="flow", set_alpha_to_one=False
        )
        errors.append(_rms(out, exact))
    slope = -np.polyfit(np.log(SIZES), np.log(errors), 1)[0]
    print(f"\n[flow gaussian] {sampler:9s} RMS error at S={SIZES}: {[f'{e:.2e}' for e in errors]}, order {slope:.2f}")
    assert lo <= slope <= hi, (sampler, slope, errors)
    assert errors[-1] < errors[0]


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "unipc"])
def test_samplers_start_from_pure_noise(flow, sampler):
    """From t = T-1 (ᾱ = 0, τ = 1: zero terminal SNR, finite for flow) log-SNR steps converge too."""
    x = torch.randn(256, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    exact = _exact(x, 0.0, flow.alphas_cumprod[0].item())
    errs = [
        _rms(
            ddim.sample(
                GaussianFlow(flow),
                x,
                flow,
                steps=n,
                spacing="logsnr",
                sampler=sampler,
                prediction="flow",
                set_alpha_to_one=False,
            ),
            exact,
        )
        for n in (16, 64)
    ]
    assert errs[1] < errs[0] / 3, errs
    assert errs[1] < 2e-2, errs


def test_straight_field_one_euler_step_is_exact(flow):
    """Data a single point μ (s = 0): every path is the straight line from ε to μ, v = ε - μ, so one
    DDIM/Euler step from pure noise lands on μ, and so does any number of steps."""
    mu = torch.tensor([0.3, -0.7, 1.2], dtype=torch.float64)
    model = GaussianFlow(flow, mu=mu, s=0.0)
    x = torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    for ts in ([999], [999, 500], [999, 998, 3]):
        out = ddim.sample(model, x, flow, timesteps=ts, prediction="flow")
        torch.testing.assert_close(out, mu.expand_as(out), rtol=0, atol=1e-12)
    out = ddim.sample(model, x.float(), flow, timesteps=[999], prediction="flow")  # float32 too
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, mu.float().expand_as(out), rtol=0, atol=1e-6)


# ----------------------------------------------------------------- bad input
def test_flow_prediction_needs_a_flow_schedule():
    model = GaussianFlow(NoiseSchedule.flow(1000))
    with pytest.raises(ValueError, match=r"prediction='flow' needs the flow time grid NoiseSchedule\.flow"):
        Denoiser(model, NoiseSchedule.linear(1000), "flow")
    with pytest.raises(ValueError, match="flow time grid"):
        ddim.sample(model, torch.randn(2, 3), NoiseSchedule.cosine(1000), steps=4, prediction="flow")
    with pytest.raises(ValueError, match="flow"):
        ddim.sample(model, torch.randn(2, 3), NoiseSchedule.flow(1000), steps=4, prediction="flux")


# ----------------------------------------------------------------- training with the flow-matching objective
TINY = {"base_channels": 8, "channel_mults": [1, 2], "num_heads": 2}


def _train_cfg(tmp_path, name="flow", **kw):
    from ddim.train import TrainConfig

    base = dict(
        data="digits", out=str(tmp_path / name), steps=4, batch_size=8, unet=TINY, checkpoint_every=2,
        sample_every=0, log_every=1, T=100, warmup=2, prediction="flow", schedule="flow",
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


def test_flow_matching_loss_is_the_definition():
    """The network sees z_τ = (1-τ) x₀ + τ ε at its int t (τ = (t+1)/T) and regresses ε - x₀."""
    from ddim.train import diffusion_loss

    sched = NoiseSchedule.flow(10)
    x0, noise, t = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4), torch.tensor([0, 5, 9])
    tau = ((t + 1) / 10).view(-1, 1, 1, 1)
    seen = []

    def model(z, tt):
        seen.append((z, tt))
        return noise - x0

    assert diffusion_loss(model, x0, t, noise, sched.alphas_cumprod, "flow").item() < 1e-12
    torch.testing.assert_close(seen[0][0], (1 - tau) * x0 + tau * noise, rtol=0, atol=1e-6)
    assert torch.equal(seen[0][1], t)
    loss = diffusion_loss(lambda z, tt: torch.zeros_like(z), x0, t, noise, sched.alphas_cumprod, "flow")
    assert loss.item() == pytest.approx((noise - x0).pow(2).mean().item(), rel=1e-6)


def test_train_flow_saves_a_flow_model_that_samples(tmp_path):
    from ddim.checkpoint import load
    from ddim.data import sklearn_digits
    from ddim.train import train

    data = sklearn_digits()
    out = train(_train_cfg(tmp_path), progress=False, data=data)
    model, schedule, config = load(out)
    assert config["prediction"] == "flow" and config["schedule"]["name"] == "flow" and schedule.is_flow
    assert config["train"]["step"] == 4
    x = ddim.sample(
        model, ddim.randn((2, 1, 8, 8), [0, 1]), schedule, steps=4, spacing="trailing", prediction="flow",
        model_kwargs={"y": torch.tensor([1, 2])},
    )  # fmt: skip
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()
    # resume is exact as for the DDPM objective
    train(_train_cfg(tmp_path, "resumed", steps=2), progress=False, data=data)
    train(_train_cfg(tmp_path, "resumed", steps=4), progress=False, data=data)
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "flow" / "state.safetensors"), load_file(tmp_path / "resumed" / "state.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "kw", [dict(prediction="flow", schedule="linear"), dict(prediction="epsilon", schedule="flow")]
)
def test_train_flow_needs_both_halves(tmp_path, kw):
    from ddim.train import train

    with pytest.raises(ValueError, match="prediction='flow' with schedule='flow'"):
        train(_train_cfg(tmp_path, **kw), progress=False)


def test_cli_train_objective_flow_then_sample(tmp_path, capsys):
    from ddim.cli import run

    out = tmp_path / "run"
    args = ["train", "--objective", "flow", "--data", "digits", "--out", str(out), "--steps", "2", "--batch", "8"]
    args += ["--T", "50", "--base-channels", "8", "--channel-mults", "1,2", "--sample-every", "0"]
    assert run(args) == 0, capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["prediction"] == "flow"
    png = tmp_path / "s.png"
    rc = run(["sample", "--model", str(out), "--n", "2", "--steps", "3", "--out", str(png), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert png.is_file()
    capsys.readouterr()
    assert run(args[:3] + ["--schedule", "cosine"] + args[3:]) == 2
    assert "--objective flow sets --schedule" in capsys.readouterr().err


def test_a_flow_model_saved_on_another_schedule_is_refused_at_load(tmp_path, capsys):
    """A config that says prediction "flow" on a non-flow schedule fails in ddim.load, before any sampling,
    and on the command line with one line and exit status 2."""
    from ddim.checkpoint import default_model_path, load
    from ddim.cli import run

    folder = tmp_path / "bad"
    folder.mkdir()
    config = json.loads((default_model_path() / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "prediction": "flow"}))
    (folder / "model.safetensors").write_bytes((default_model_path() / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="prediction 'flow' needs the flow time grid"):
        load(folder)
    capsys.readouterr()
    assert run(["sample", "--model", str(folder), "-n", "1", "--steps", "2", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "flow time grid" in err and not (tmp_path / "x.png").exists()
